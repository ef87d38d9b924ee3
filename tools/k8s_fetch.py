"""Copy a run's results from the output claim to this machine: `final/` (the model and its card), the report and
its plots, `metrics.jsonl`, the verdict and the config; TensorBoard events with --tensorboard. Never checkpoints.

    python -m tools.k8s_fetch --image IMAGE:TAG [--claim bloom-zh-output] [--run run] [--dest output/fetched/run]

A short-lived pod mounts the claim read-only (the job's image, which the nodes already pulled and which has tar),
`kubectl exec ... tar` streams the files out into DEST, and the pod is deleted however the copy ends (it also
deletes itself after an hour: activeDeadlineSeconds). A ReadWriteOnce claim that a running pod holds on another
node cannot be mounted: fetch after the job ended, or use ReadWriteMany claims.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tarfile
import uuid
from pathlib import Path

RESULTS = [
    "final",
    "report.md",
    "loss.png",
    "throughput.png",
    "metrics.jsonl",
    "exit_status.json",
    "run_config.json",
    "inputs.json",
]
MOUNT = "/output"
LIFETIME_S = 3600
# In the pod: the results that exist, as one tar stream on stdout; exit 3 when there are none.
PACK = 'cd "$1" && shift && set -- $(ls -d "$@" 2>/dev/null) && [ $# -gt 0 ] && exec tar cf - "$@"; exit 3'


def pod_manifest(name: str, claim: str, image: str) -> dict:
    """A pod that only holds the claim mounted read-only, for `kubectl exec`."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "labels": {"app.kubernetes.io/part-of": "bloom-zh", "app.kubernetes.io/component": "fetch"},
        },
        "spec": {
            "restartPolicy": "Never",
            "activeDeadlineSeconds": LIFETIME_S,
            "terminationGracePeriodSeconds": 0,
            "containers": [
                {
                    "name": "fetch",
                    "image": image,
                    "command": ["sleep", str(LIFETIME_S)],
                    "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "512Mi"}},
                    "volumeMounts": [{"name": "output", "mountPath": MOUNT, "readOnly": True}],
                }
            ],
            "volumes": [{"name": "output", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}}],
        },
    }


def fetch(kubectl: list[str], pod: str, image: str, claim: str, run: str, dest: Path, tensorboard: bool) -> list[str]:
    """Start the pod, stream the results into `dest`, delete the pod; the names fetched."""
    manifest = json.dumps(pod_manifest(pod, claim, image))
    subprocess.run([*kubectl, "apply", "-f", "-"], input=manifest, text=True, check=True, stdout=subprocess.DEVNULL)
    try:
        subprocess.run([*kubectl, "wait", "--for=condition=Ready", f"pod/{pod}", "--timeout=300s"], check=True)
        names = RESULTS + (["tensorboard"] if tensorboard else [])
        command = [*kubectl, "exec", pod, "--", "sh", "-c", PACK, "sh", f"{MOUNT}/{run}", *names]
        dest.mkdir(parents=True, exist_ok=True)
        fetched: list[str] = []
        with subprocess.Popen(command, stdout=subprocess.PIPE) as proc:
            try:
                with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
                    for member in tar:
                        tar.extract(member, dest, filter="data")  # no absolute paths, no links out of dest
                        fetched.append(member.name)
            except tarfile.TarError:
                if proc.wait() == 0:
                    raise
        if proc.returncode != 0:  # the pod's tar (or sh: 3, nothing to fetch) failed
            raise subprocess.CalledProcessError(proc.returncode, command)
        return sorted({name.split("/")[0] for name in fetched})
    finally:
        subprocess.run(
            [*kubectl, "delete", "pod", pod, "--ignore-not-found", "--wait=false"], stdout=subprocess.DEVNULL
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", required=True, help="an image with sh and tar (the job's IMAGE:TAG)")
    parser.add_argument("--claim", default="bloom-zh-output", help="the output claim")
    parser.add_argument("--run", default="run", help="the run folder inside the claim (--output-dir /output/RUN)")
    parser.add_argument("--dest", default=None, help="local folder (default: output/fetched/RUN)")
    parser.add_argument("--namespace", default=None)
    parser.add_argument("--kubectl", default="kubectl", help="the kubectl command")
    parser.add_argument("--tensorboard", action="store_true", help="also the TensorBoard events")
    args = parser.parse_args(argv)
    kubectl = [*shlex.split(args.kubectl), *(["--namespace", args.namespace] if args.namespace else [])]
    dest = Path(args.dest or f"output/fetched/{args.run}")
    pod = f"bloom-zh-fetch-{uuid.uuid4().hex[:8]}"
    try:
        fetched = fetch(kubectl, pod, args.image, args.claim, args.run, dest, args.tensorboard)
    except (subprocess.CalledProcessError, tarfile.TarError, OSError) as e:
        reason = "no results there" if getattr(e, "returncode", None) == 3 else str(e).splitlines()[0]
        print(
            f"error: fetching {MOUNT}/{args.run} from claim {args.claim} failed: {reason} -- check the claim, the run "
            f"folder and kubectl's message above (pod {pod} is deleted)",
            file=sys.stderr,
        )
        return 1
    print(f"fetched {', '.join(fetched)} into {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
