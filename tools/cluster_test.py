"""`make cluster-test`: every workload of the rendered manifests run as a kubelet runs its pods, in podman
containers of the `make image-test` image on one host; the controllers' parts (pod names, hostnames,
JOB_COMPLETION_INDEX, PET_*, replacing a failed pod, a JobSet's gang restart) are played here, and every exit
code is judged by the podFailurePolicy / failurePolicy rules read from the rendered manifest.

    python -m tools.cluster_test --rendered DIR --image IMAGE [--replace-delay-s S] [CASE...]

DIR holds train.yaml, prepare.yaml, jobset.yaml, indexed.yaml and trainjob.yaml (make cluster-test renders them
with the CI overlay of k8s/ci/). Cases: prepare (b, first: the others train on its data), train (a), jobset (c),
trainjob (e), indexed (d). Each pod's containers run on one podman network, each in its own network namespace,
named by its pod's hostname and <hostname>.<subdomain>; the claims are host folders under WORK shared by every
pod. Prints one line per check and a JSON summary last; exit 0 only if every case passes. Needs root (podman,
and the claims' group ownership that fsGroup gives).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

from job.core.metrics_log import read_metrics
from job.data.prepare import BLOCK_DOCUMENTS
from tools.pod_run import Pod, Refused, failure_message, host_folders, jobset_action, judge, run_args, workloads

PODMAN = ["podman", "--runtime", "runc"] if shutil.which("runc") else ["podman"]
CASES = ("prepare", "train", "jobset", "trainjob", "indexed")
LOSS_TOLERANCE = 1e-5  # README "Preemption and resume": the resumed curve equals the uninterrupted one to 1e-5
POLL_S = 1.0
CORPUS_DOCUMENTS = 2 * BLOCK_DOCUMENTS + 500  # 3 of prepare's blocks: each of 2 shards gets rows


class CaseFailed(AssertionError):
    pass


def log(text: str) -> None:
    print(f"[cluster-test {time.monotonic() - T0:6.0f}s] {text}", flush=True)


T0 = time.monotonic()


def check(condition: bool, text: str) -> None:
    if not condition:
        raise CaseFailed(text)
    log(f"ok: {text}")


def _host_ulimits() -> list[str]:
    """Explicit limits within this shell's hard limits (as docker/image-test.sh): runc fails to set larger ones."""
    import resource

    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    nofile = min(65536, hard if hard != resource.RLIM_INFINITY else 65536)
    return ["--ulimit", f"nofile={nofile}:{nofile}", "--ulimit", "nproc=4096:4096"]


class Host:
    """The podman side: one network, the containers started, their logs; all removed on close, also on failure."""

    def __init__(self, work: Path, image: str):
        self.work, self.image = work, image
        self.network = f"cluster-test-{os.getpid()}"
        self.started: list[str] = []
        self.logs = work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.ulimits = _host_ulimits()
        subprocess.run([*PODMAN, "network", "create", self.network], check=True, capture_output=True)

    def close(self) -> None:
        for name in self.started:
            subprocess.run([*PODMAN, "rm", "-f", "-t", "0", name], capture_output=True)
        subprocess.run([*PODMAN, "network", "rm", "-f", self.network], capture_output=True)

    def start(self, pod: Pod, container: dict, claims: Path, attempt: str) -> str:
        scratch = self.work / "pods" / f"{pod.name}-{attempt}"
        host_folders(pod, claims, scratch)
        args = run_args(pod, container, image=self.image, claims=claims, scratch=scratch, network=self.network)
        name = args[args.index("--name") + 1]
        subprocess.run([*PODMAN, "rm", "-f", "-t", "0", name], capture_output=True)
        self.started.append(name)
        subprocess.run([*PODMAN, "run", "-d", *self.ulimits, *args], check=True, capture_output=True)
        return name

    def wait(self, name: str, timeout_s: float) -> int | None:
        """The container's exit code, or None if it still runs after timeout_s. Its log is saved either way."""
        deadline = time.monotonic() + timeout_s
        while self.running(name) and time.monotonic() < deadline:
            time.sleep(POLL_S)
        if self.running(name):
            return None
        code = subprocess.run(
            [*PODMAN, "inspect", "--format", "{{.State.ExitCode}}", name], capture_output=True, text=True
        )
        (self.logs / f"{name}-{int(time.time() * 1000)}.log").write_text(self.log_text(name))
        return int(code.stdout.strip())

    def running(self, name: str) -> bool:
        state = subprocess.run(
            [*PODMAN, "inspect", "--format", "{{.State.Running}}", name], capture_output=True, text=True
        )
        return state.stdout.strip() == "true"

    def log_text(self, name: str) -> str:
        return subprocess.run(
            [*PODMAN, "logs", name], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        ).stdout

    def signal(self, name: str, sig: str) -> None:
        subprocess.run([*PODMAN, "kill", "--signal", sig, name], check=True, capture_output=True)

    def stop(self, name: str, grace_s: int) -> None:
        """What the kubelet does to a deleted pod: SIGTERM, SIGKILL after the grace period."""
        subprocess.run([*PODMAN, "stop", "-t", str(grace_s), name], capture_output=True)


class PodRun:
    """One pod: its init containers in order, each to exit 0, then its containers. The pod fails with the first
    container that fails; `result` is (container, exit code) once it has ended."""

    def __init__(self, host: Host, pod: Pod, claims: Path, attempt: str, timeout_s: float = 600):
        self.host, self.pod, self.main = host, pod, None
        self.result: tuple[str, int] | None = None
        for container in pod.spec.get("initContainers", []):
            name = host.start(pod, container, claims, attempt)
            code = host.wait(name, timeout_s)
            if code is None:
                raise CaseFailed(f"{name}: init container still running after {timeout_s:.0f} s")
            if code != 0:
                self.result = (container["name"], code)
                return
        (container,) = pod.spec["containers"]
        self.container = container["name"]
        self.main = host.start(pod, container, claims, attempt)

    def wait(self, timeout_s: float) -> tuple[str, int]:
        if self.result is None:
            code = self.host.wait(self.main, timeout_s)
            if code is None:
                raise CaseFailed(f"{self.main}: still running after {timeout_s:.0f} s")
            self.result = (self.container, code)
        return self.result

    def verdict(self, timeout_s: float = 900) -> tuple[str, int, str, int | None]:
        container, code = self.wait(timeout_s)
        action, index = judge(self.pod.policy, code, container)
        log(f"{self.pod.name}: container {container} exit {code} -> podFailurePolicy: {action} (rule {index})")
        return container, code, action, index


def _output(claims: Path, run: str) -> Path:
    return claims / "bloom-zh-output" / run


def _arg(container: dict, flag: str) -> str:
    args = container["args"]
    return args[args.index(flag) + 1]


def _steps_logged(output: Path) -> int:
    path = output / "metrics.jsonl"
    try:
        return max((r.get("step", 0) for r in read_metrics(path) if "loss" in r), default=0)
    except (OSError, ValueError):
        return 0


def _checkpoints(output: Path) -> list[int]:
    return sorted(int(p.parent.name.split("-")[1]) for p in output.glob("checkpoint-*/COMPLETE"))


def _wait_for(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise CaseFailed(f"no {what} within {timeout_s:.0f} s")
        time.sleep(POLL_S)


def _losses(output: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(output / "metrics.jsonl") if "loss" in r}


def _same_curve(got: dict[int, float], want: dict[int, float], what: str) -> None:
    check(sorted(got) == sorted(want), f"{what}: the same logged steps as the uninterrupted run ({sorted(want)})")
    worst = max(abs(got[s] - want[s]) / max(abs(want[s]), 1e-12) for s in want)
    check(worst <= LOSS_TOLERANCE, f"{what}: loss curve equal to the uninterrupted run's (worst relative {worst:.1e})")


class Cluster:
    def __init__(self, rendered: Path, image: str, work: Path, replace_delay_s: float):
        self.rendered, self.work, self.replace_delay_s = rendered, work, replace_delay_s
        self.host = Host(work, image)
        self.claims = work / "claims"
        self.figures: dict[str, object] = {}
        self.reference: dict[int, float] | None = None

    def workload(self, file: str) -> dict:
        docs = [d for d in yaml.safe_load_all((self.rendered / file).read_text()) if d]
        (found,) = [w for w in workloads(docs).values()]
        return found

    def start_all(self, pods: list[Pod], claims: Path, attempt: str) -> list[PodRun]:
        """Every pod at once, as the controllers create them (each pod's init containers, then its containers)."""
        with ThreadPoolExecutor(len(pods)) as pool:
            return list(pool.map(lambda pod: PodRun(self.host, pod, claims, attempt), pods))

    def claims_for(self, name: str) -> Path:
        """Claims for one run: an output claim of its own; data, models and cache shared by every case, as a
        cluster's claims are (the cache holds what DeepSpeed compiles on a first start: minutes on 2 cores)."""
        root = self.work / f"claims-{name}"
        if root.exists():
            shutil.rmtree(root)
        root.mkdir(parents=True)
        for claim in ("bloom-zh-data", "bloom-zh-models", "bloom-zh-cache"):
            (self.claims / claim).mkdir(parents=True, exist_ok=True)
            (root / claim).symlink_to(self.claims / claim)
        return root

    # ---------------------------------------------------------------- b. the prepare Indexed Job
    def write_corpus(self) -> None:
        """The CI overlay's --data: the built-in corpus's first CORPUS_DOCUMENTS sentences, one document each, so
        that the corpus spans several of prepare's blocks and every pod of the Indexed Job has rows to write."""
        from job.data.corpus import TEXT, builtin_articles

        sentences = (s for text in builtin_articles() for s in re.split(r"(?<=。)", text) if s.strip())
        raw = self.claims / "bloom-zh-data" / "raw"
        raw.mkdir(parents=True, exist_ok=True)
        with open(raw / "ci-corpus.jsonl", "w") as f:
            for sentence in itertools.islice(sentences, CORPUS_DOCUMENTS):
                f.write(json.dumps({TEXT: sentence}, ensure_ascii=False) + "\n")

    def case_prepare(self) -> None:
        workload = self.workload("prepare.yaml")
        self.write_corpus()
        pods = workload["pods"]
        check(len(pods) == workload["spec"]["completions"] > 1, f"{len(pods)} indexed pods")
        runs = self.start_all(pods, self.claims, "0")  # parallelism = completions: all at once
        for run in runs:
            check(run.verdict()[2] == "Succeeded", f"{run.pod.name} (JOB_COMPLETION_INDEX {run.pod.annotations})")
        # The reference: the same container, one process, no --shard, into a folder of its own.
        one = Pod("prepare-one-process", json.loads(json.dumps(pods[0].spec)), pods[0].policy, pods[0].annotations)
        container = one.spec["containers"][0]
        i = container["args"].index("--shard")
        del container["args"][i : i + 2]
        prepared = _arg(container, "--output")
        container["args"][container["args"].index("--output") + 1] = f"{prepared}-one-process"
        check(PodRun(self.host, one, self.claims, "0").verdict()[2] == "Succeeded", "the one-process prepare")
        from job.data.prepare import load_prepared

        data = self.claims / "bloom-zh-data"
        sharded = data / prepared.removeprefix("/data/")
        single = data / f"{prepared.removeprefix('/data/')}-one-process"
        a, b = load_prepared(str(sharded)), load_prepared(str(single))
        check(sorted(a) == sorted(b), f"the same splits: {sorted(b)}")
        for split in b:
            check(a[split]["input_ids"] == b[split]["input_ids"], f"{split}: the same {len(b[split])} rows in order")
        for folder in json.loads((sharded / "shards.json").read_text())["shards"]:  # an empty shard proves nothing
            rows = json.loads((sharded / folder / "stats.json").read_text())["train"]["rows"]
            check(rows > 0, f"{folder}: {rows} training rows of its own")
        stats = [json.loads((p / "stats.json").read_text()) for p in (sharded, single)]
        check(stats[0] == stats[1], "the same stats.json")
        self.figures["prepare_rows"] = {split: len(b[split]) for split in b}

    # ---------------------------------------------------------------- a. the single-node Job
    def case_train(self) -> None:
        (pod,) = self.workload("train.yaml")["pods"]
        claims = self.claims_for("train")
        train = pod.spec["containers"][0]
        output = _output(claims, _arg(train, "--output-dir").removeprefix("/output/"))
        max_steps = int(_arg(train, "--max-steps"))
        first = PodRun(self.host, pod, claims, "0")
        check(first.main is not None, "doctor (init container) exit 0, then train starts")
        _wait_for(lambda: _checkpoints(output) and _steps_logged(output) > _checkpoints(output)[0], 600, "checkpoint")
        self.host.signal(first.main, "TERM")  # the kubelet on preemption or drain
        _, code, action, _ = first.verdict()
        check(code == 75 and action == "Ignore", f"SIGTERM mid-run: exit {code}, podFailurePolicy {action}")
        stopped_at = _checkpoints(output)[-1]
        check(0 < stopped_at < max_steps, f"a complete checkpoint at step {stopped_at}, mid-run")
        second = PodRun(self.host, pod, claims, "1")
        _, code, action, _ = second.verdict()
        check(code == 0 and action == "Succeeded", "a new pod with the same spec: exit 0")
        check(f"checkpoint-{stopped_at}" in self.host.log_text(second.main), f"it resumed from checkpoint-{stopped_at}")
        check(_checkpoints(output)[-1] == max_steps, f"and finished at step {max_steps}")
        # A bad setting: the pod's NPROC (what GPUS sets) not a number -> doctor, the init container, exits 2.
        bad = Pod(pod.name, json.loads(json.dumps(pod.spec)), pod.policy)
        for container in (*bad.spec["initContainers"], *bad.spec["containers"]):
            container["env"] = [{"name": "NPROC", "value": "two"}]
        container, code, action, _ = PodRun(self.host, bad, claims, "bad").verdict()
        check(
            (container, code, action) == ("doctor", 2, "FailJob"), f"a bad setting: {container} exit {code}, {action}"
        )

    # ---------------------------------------------------------------- c / e. the JobSet and the TrainJob
    def _gang(self, file: str, name: str, reference: bool) -> None:
        workload = self.workload(file)
        pods, spec = workload["pods"], workload["spec"]
        check(len(pods) == 2, f"{name}: 2 pods: {[p.fqdn for p in pods]}")
        node = pods[0].spec["containers"][0]
        output_dir = _arg(node, "--output-dir").removeprefix("/output/")
        if reference and self.reference is None:  # the uninterrupted 2-node run
            claims = self.claims_for(f"{name}-reference")
            runs = self.start_all(pods, claims, "ref")
            for run in runs:
                check(run.verdict()[2] == "Succeeded", f"{name}: uninterrupted {run.pod.name} exit 0")
            self.reference = _losses(_output(claims, output_dir))
        claims = self.claims_for(name)
        output = _output(claims, output_dir)
        runs = self.start_all(pods, claims, "0")
        _wait_for(lambda: _checkpoints(output) and _steps_logged(output) > _checkpoints(output)[0], 600, "checkpoint")
        self.host.signal(runs[1].main, "KILL")  # the node is lost
        killed_at = time.monotonic()
        container, code, action, rule = runs[1].verdict()
        child = spec["replicatedJobs"][0]["template"]["spec"]
        # backoffLimit 0: the pod's failure fails the child Job (reason BackoffLimitExceeded, or PodFailurePolicy)
        reason = "PodFailurePolicy" if action == "FailJob" else "BackoffLimitExceeded"
        message = failure_message(runs[1].pod, container, code, rule) if action == "FailJob" else ""
        check(action == "FailJob" or child.get("backoffLimit") == 0, f"{name}: node 1 killed: the child Job fails")
        decision = jobset_action(spec.get("failurePolicy"), reason, message)
        check(
            decision.startswith("RestartJobSet"),
            f"{name}: the failurePolicy says {decision} (max {spec['failurePolicy'].get('maxRestarts')})",
        )
        # The gang restart deletes the other pod: SIGTERM, SIGKILL after its grace period.
        grace = int(pods[0].spec.get("terminationGracePeriodSeconds", 30))
        self.host.stop(runs[0].main, grace)
        _, code0, _, _ = runs[0].verdict(timeout_s=grace + 60)
        ended_s = time.monotonic() - killed_at
        check(
            ended_s <= grace,
            f"{name}: the other node ended {ended_s:.0f} s after the kill (exit {code0}), within its {grace} s grace",
        )
        self.figures[f"{name}_other_node_ended_s"] = round(ended_s)
        resumed_from = _checkpoints(output)[-1]
        again = self.start_all(pods, claims, "1")
        for run in again:
            check(run.verdict()[2] == "Succeeded", f"{name}: {run.pod.name} restarted with the group: exit 0")
        check(
            f"checkpoint-{resumed_from}" in self.host.log_text(again[0].main),
            f"{name}: resumed from checkpoint-{resumed_from}",
        )
        _same_curve(_losses(output), self.reference, name)

    def case_jobset(self) -> None:
        self._gang("jobset.yaml", "jobset", reference=True)

    def case_trainjob(self) -> None:
        self._gang("trainjob.yaml", "trainjob", reference=True)

    # ---------------------------------------------------------------- d. the Indexed Job, one pod replaced
    def case_indexed(self) -> None:
        workload = self.workload("indexed.yaml")
        pods, spec = workload["pods"], workload["spec"]
        check(len(pods) == 2, f"indexed: 2 pods: {[p.fqdn for p in pods]}")
        claims = self.claims_for("indexed")
        output = _output(claims, _arg(pods[0].spec["containers"][0], "--output-dir").removeprefix("/output/"))
        runs = self.start_all(pods, claims, "0")
        _wait_for(lambda: _checkpoints(output) and _steps_logged(output) > _checkpoints(output)[0], 600, "checkpoint")
        self.host.signal(runs[1].main, "KILL")
        killed_at = time.monotonic()
        _, _, action1, _ = runs[1].verdict()
        # No in-place restart: the surviving launcher ends on its own, and its pod is replaced too.
        _, code0, action0, _ = runs[0].verdict(timeout_s=300)
        ended_s = time.monotonic() - killed_at
        check(
            code0 == 1 and action0 == "Count",
            f"indexed: the surviving node exits {code0} on its own, {ended_s:.0f} s after the kill ({action0})",
        )
        limit = spec["backoffLimitPerIndex"]  # each index failed once: one restart of the group
        check((action1, action0) == ("Count", "Count") and limit >= 1, f"indexed: 1 failure per index of {limit}")
        self.figures["indexed_survivor_ended_s"] = round(ended_s)
        resumed_from = _checkpoints(output)[-1]
        new0 = PodRun(self.host, pods[0], claims, "1")  # replaced at once
        log(f"indexed: pod 1's replacement arrives in {self.replace_delay_s:.0f} s (a node to find, an image to pull)")
        time.sleep(self.replace_delay_s)  # the scenario itself: the scheduler's and the kubelet's delay
        check(self.host.running(new0.main), "indexed: pod 0's replacement waits in the rendezvous meanwhile")
        new1 = PodRun(self.host, pods[1], claims, "1")
        for run in (new0, new1):
            check(run.verdict()[2] == "Succeeded", f"indexed: replacement {run.pod.name} exit 0")
        check(
            f"checkpoint-{resumed_from}" in self.host.log_text(new0.main),
            f"indexed: resumed from checkpoint-{resumed_from}",
        )
        if self.reference is not None:
            _same_curve(_losses(output), self.reference, "indexed")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rendered", type=Path, required=True)
    parser.add_argument("--image", required=True)
    parser.add_argument("--work", type=Path, default=Path("output/cluster-test"))
    parser.add_argument("--replace-delay-s", type=float, default=30.0)
    parser.add_argument("cases", nargs="*", metavar="CASE", help=f"some of {', '.join(CASES)} (default: all, in order)")
    args = parser.parse_args(argv)
    cases = args.cases or list(CASES)
    if set(cases) - set(CASES):
        parser.error(f"unknown cases {sorted(set(cases) - set(CASES))}: choose from {', '.join(CASES)}")
    cases = [c for c in CASES if c in {"prepare", *cases}]  # in order; prepare first: the others train on its data
    if args.work.exists():
        shutil.rmtree(args.work)
    args.work.mkdir(parents=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # through `finally`: the containers go too
    cluster = Cluster(args.rendered, args.image, args.work.resolve(), args.replace_delay_s)
    results: dict[str, object] = {}
    try:
        for case in cases:
            started = time.monotonic()
            log(f"case {case}")
            try:
                getattr(cluster, f"case_{case}")()
                results[case] = "pass"
            except (CaseFailed, Refused, subprocess.CalledProcessError) as e:
                results[case] = f"FAIL: {e}"
                log(f"FAIL {case}: {e}")
            cluster.figures[f"{case}_s"] = round(time.monotonic() - started)
    finally:
        cluster.host.close()
    print(json.dumps({"cases": results, **cluster.figures, "total_s": round(time.monotonic() - T0)}))
    return 0 if all(v == "pass" for v in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
