"""Copy a run's results from the output claim to this machine: `final/` (the model and its card), the report and
its plots, `metrics.jsonl`, the verdict and the config; TensorBoard events with --tensorboard. Never checkpoints.

    python -m tools.k8s_fetch --image IMAGE:TAG [--claim bloom-zh-output] [--run run] [--dest output/fetched/run]

A short-lived pod mounts the claim read-only (the job's image, which the nodes already pulled and which has tar),
`kubectl exec ... tar` streams the files out into DEST, and the pod is deleted however the copy ends: done, failed,
timed out, SIGTERM or Ctrl-C (it also ends by itself after an hour: activeDeadlineSeconds). It ends on its own:
every kubectl call has a time limit, and a tar stream that brings no byte for --stall-timeout-s is cut; either way
one line and exit 2. The pod passes Pod Security "restricted" (non-root, no privilege escalation, no capabilities,
seccomp RuntimeDefault). A ReadWriteOnce claim that a running pod holds on another node cannot be mounted: fetch
after the job ended, or use ReadWriteMany claims.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import shlex
import signal
import subprocess
import sys
import tarfile
import time
import uuid
from collections.abc import Iterator
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
UID = 1000  # the image's user, who wrote the files
KUBECTL_TIMEOUT_S = 120  # apply, delete (a kubectl that hangs on an unreachable API server ends here)
READY_TIMEOUT_S = 300  # the pod's image pull and start
STALL_TIMEOUT_S = 120  # the tar stream: no byte for this long and it is cut
# In the pod: the results that exist, as one tar stream on stdout; exit 3 when there are none.
PACK = 'cd "$1" && shift && set -- $(ls -d "$@" 2>/dev/null) && [ $# -gt 0 ] && exec tar cf - "$@"; exit 3'


class FetchError(Exception):
    """Why the fetch failed, in one line."""


class Interrupted(BaseException):
    """SIGTERM or SIGINT: unwind (the pod is deleted on the way out), then exit 128 + the signal."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def pod_manifest(name: str, claim: str, image: str, pull_secret: str | None = None) -> dict:
    """A pod that only holds the claim mounted read-only, for `kubectl exec`; Pod Security "restricted"."""
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
            "automountServiceAccountToken": False,
            "enableServiceLinks": False,
            "securityContext": {
                "runAsNonRoot": True,
                "runAsUser": UID,
                "runAsGroup": UID,
                "seccompProfile": {"type": "RuntimeDefault"},
            },
            **({"imagePullSecrets": [{"name": pull_secret}]} if pull_secret else {}),
            "containers": [
                {
                    "name": "fetch",
                    "image": image,
                    "command": ["sleep", str(LIFETIME_S)],
                    "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "512Mi"}},
                    "securityContext": {
                        "allowPrivilegeEscalation": False,
                        "readOnlyRootFilesystem": True,
                        "capabilities": {"drop": ["ALL"]},
                    },
                    "volumeMounts": [{"name": "output", "mountPath": MOUNT, "readOnly": True}],
                }
            ],
            "volumes": [{"name": "output", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}}],
        },
    }


# SIGTERM/SIGINT raise Interrupted, but are held while a child starts and while it is stopped: raised inside
# Popen() after the fork, the child would run on with no handle to stop it.
_holding = False
_pending: list[int] = []


def _interrupt(signum: int, _frame) -> None:
    if _holding:
        _pending.append(signum)
        return
    raise Interrupted(signum)


def _raise_pending() -> None:
    if _pending:
        raise Interrupted(_pending.pop())


@contextlib.contextmanager
def child(command: list[str], **kw) -> Iterator[subprocess.Popen]:
    """Popen whose process is killed, if still running, and reaped however the block ends (what subprocess.run
    does for one call, for a process read while it runs)."""
    global _holding
    _holding = True
    proc = None
    try:
        proc = subprocess.Popen(command, **kw)
        _holding = False
        _raise_pending()
        yield proc
    finally:
        _holding = True
        if proc is not None:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            for pipe in (proc.stdin, proc.stdout):
                if pipe:
                    pipe.close()
        _holding = False
    _raise_pending()  # a signal during the cleanup of a block that ended well


def kubectl_run(command: list[str], timeout_s: float, stdin_text: str | None = None) -> None:
    """One kubectl call that must succeed within `timeout_s` (the process is killed past it, or on a signal)."""
    what = f"`kubectl {' '.join(command[1:4])}`"
    stdin = subprocess.PIPE if stdin_text is not None else None
    with child(command, stdin=stdin, stdout=subprocess.DEVNULL, text=True) as proc:
        try:
            proc.communicate(stdin_text, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise FetchError(f"{what} did not answer within {timeout_s:g} s") from None
    if proc.returncode != 0:
        raise FetchError(f"{what} failed (exit {proc.returncode})")


class StallGuard:
    """The pipe of `kubectl exec ... tar`, as tarfile reads it, cut when it brings no byte for `stall_s`. What it adds
    to tarfile's stream reading: a time limit per byte (a stalled stream would block the read for ever), and a wait
    for data that wakes up twice a second, so that a signal landing just before a blocking read still runs its
    handler at once."""

    def __init__(self, proc: subprocess.Popen, stall_s: float):
        self.proc, self.fd, self.stall_s = proc, proc.stdout.fileno(), stall_s
        self.stalled = False

    def read(self, size: int = -1) -> bytes:
        """What the pipe holds, up to `size`; b"" at its end, or once it stalled (the process is then killed)."""
        end = time.monotonic() + self.stall_s
        while not select.select([self.fd], [], [], 0.5)[0]:
            if time.monotonic() > end:
                self.stalled = True
                self.proc.kill()
                return b""
        return os.read(self.fd, size if size > 0 else 1 << 16)


def stream_results(command: list[str], dest: Path, stall_s: float) -> list[str]:
    """Run `kubectl exec ... tar cf -` and unpack what it sends into `dest`; the members' names."""
    fetched: list[str] = []
    with child(command, stdout=subprocess.PIPE) as proc:
        guard = StallGuard(proc, stall_s)
        damaged = False
        try:
            with tarfile.open(fileobj=guard, mode="r|") as tar:
                for member in tar:
                    tar.extract(member, dest, filter="data")  # no absolute paths, no links out of dest
                    fetched.append(member.name)
        except tarfile.TarError:
            damaged = True  # a stall or kubectl's failure, below, says why; else the stream itself
        while guard.read(1 << 16):  # the archive's end padding (or the rest), until kubectl closes the pipe
            pass
        try:
            proc.wait(timeout=stall_s)
        except subprocess.TimeoutExpired:
            guard.stalled = True  # the pipe closed, the process hangs on (killed by child())
    if guard.stalled:
        raise FetchError(f"the tar stream stalled: no data for {stall_s:g} s (after {len(fetched)} files)")
    if proc.returncode == 3:
        raise FetchError("no results there")
    if proc.returncode != 0:  # the pod's tar failed, or kubectl exec did
        raise FetchError(f"`kubectl exec ... tar` failed (exit {proc.returncode})")
    if damaged:
        raise FetchError("the tar stream is damaged")
    return fetched


def fetch(
    kubectl: list[str], pod: str, manifest: dict, run: str, dest: Path, tensorboard: bool, limits: argparse.Namespace
) -> list[str]:
    """Start the pod, stream the results into `dest`, delete the pod (also on SIGTERM/SIGINT); the names fetched."""
    try:
        kubectl_run([*kubectl, "apply", "-f", "-"], limits.kubectl_timeout_s, stdin_text=json.dumps(manifest))
        wait = [*kubectl, "wait", "--for=condition=Ready", f"pod/{pod}", f"--timeout={limits.ready_timeout_s:g}s"]
        kubectl_run(wait, limits.ready_timeout_s + limits.kubectl_timeout_s)
        names = RESULTS + (["tensorboard"] if tensorboard else [])
        command = [*kubectl, "exec", pod, "--", "sh", "-c", PACK, "sh", f"{MOUNT}/{run}", *names]
        dest.mkdir(parents=True, exist_ok=True)
        fetched = stream_results(command, dest, limits.stall_timeout_s)
        return sorted({name.split("/")[0] for name in fetched})
    finally:
        # A second signal must not cut the deletion short.
        previous = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            subprocess.run(
                [*kubectl, "delete", "pod", pod, "--ignore-not-found", "--wait=false"],
                stdout=subprocess.DEVNULL,
                timeout=limits.kubectl_timeout_s,
            )
        except subprocess.TimeoutExpired:
            print(f"warning: deleting pod {pod} timed out: `kubectl delete pod {pod}`", file=sys.stderr)
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", required=True, help="an image with sh and tar (the job's IMAGE:TAG)")
    parser.add_argument("--claim", default="bloom-zh-output", help="the output claim")
    parser.add_argument("--run", default="run", help="the run folder inside the claim (--output-dir /output/RUN)")
    parser.add_argument("--dest", default=None, help="local folder (default: output/fetched/RUN)")
    parser.add_argument("--namespace", default=None)
    parser.add_argument("--kubectl", default="kubectl", help="the kubectl command")
    parser.add_argument("--tensorboard", action="store_true", help="also the TensorBoard events")
    parser.add_argument("--pull-secret", default=None, help="imagePullSecrets of the pod (a private registry)")
    parser.add_argument("--kubectl-timeout-s", type=float, default=KUBECTL_TIMEOUT_S, help="per kubectl call")
    parser.add_argument("--ready-timeout-s", type=float, default=READY_TIMEOUT_S, help="for the pod to start")
    parser.add_argument("--stall-timeout-s", type=float, default=STALL_TIMEOUT_S, help="the stream: no byte this long")
    args = parser.parse_args(argv)
    kubectl = [*shlex.split(args.kubectl), *(["--namespace", args.namespace] if args.namespace else [])]
    dest = Path(args.dest or f"output/fetched/{args.run}")
    pod = f"bloom-zh-fetch-{uuid.uuid4().hex[:8]}"
    manifest = pod_manifest(pod, args.claim, args.image, args.pull_secret)
    previous = {s: signal.signal(s, _interrupt) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        fetched = fetch(kubectl, pod, manifest, args.run, dest, args.tensorboard, args)
    except Interrupted as e:
        print(f"stopped by {e}: pod {pod} is deleted; {dest} may hold part of the results", file=sys.stderr)
        return 128 + e.signum
    except (FetchError, tarfile.TarError, OSError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(
            f"error: fetching {MOUNT}/{args.run} from claim {args.claim} failed: {reason} -- check the claim, the run "
            f"folder and kubectl's message above (pod {pod} is deleted)",
            file=sys.stderr,
        )
        return 2
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    print(f"fetched {', '.join(fetched)} into {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
