"""The deployment artefacts: docker/Dockerfile, k8s/, the Makefile's image and cluster targets and the workflows,
checked offline with the real tools (`make setup` installs them: hadolint, kubernetes-validate, kubectl with its
kustomize) for properties, not for their exact text:

- every manifest and every rendering is strictly valid: kubernetes-validate for the built-in kinds, the vendored
  CRD schemas (k8s/crd_validate.py) for JobSet and TrainJob;
- what no schema knows: each container's command parses with the project's own CLI and resolves, from its flags
  and environment, to as many processes per node as it has GPUs and as many nodes as the workload has pods; the
  rendezvous address names pod 0; /dev/shm is in memory; the grace period holds --shutdown-timeout-s plus a step;
  the failure policies use job/errors.py's exit codes; make's settings and components reach the fields they set;
- the image: hadolint clean, base pinned by digest, an init as PID 1 in front of the CLI, the OCI labels;
- every deployment fact written once: torch's version (docker/Dockerfile), the container's environment (the
  Dockerfile's ENV, never repeated in a manifest), the CLI's defaults (never repeated as flags).
The image reference and the release workflow: tests/test_release.py. The image itself is built and run by
`make image-test` (docker/image-test.sh), not here.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import click
import pytest
import yaml

from job.core import errors
from job.core.config import RunConfig
from job.core.topology import resolve_topology

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DOCKERFILE = REPO / "docker" / "Dockerfile"
K8S = REPO / "k8s"
KUSTOMIZATIONS = [K8S, K8S / "jobset", K8S / "indexed", K8S / "trainjob"]
CLI = ["python", "-m", "job"]
UID = 1000
GRACE_MARGIN_S = 60  # one h100 optimizer step and the exit, after --shutdown-timeout-s allowed for the save
# What Kubeflow Trainer's torch runtime injects into the trainer container (pkg/constants: ContainerTrainerPort).
TRAINER_PORT = "29500"
# Settings make is given in `rendered` (the values each must reach).
MAKE_SETTINGS = {
    "IMAGE": "registry.example.com/ml/bloom",
    "TAG": "v9.9.9",
    "GPUS": "4",
    "CPUS": "32",
    "MEMORY": "256Gi",
    "NNODES": "3",
    "K8S_QUEUE": "team-a",
    "K8S_KUEUE_PRIORITY": "high",
    "K8S_PRIORITY_CLASS": "training",
    "K8S_GPU_PRODUCT": "NVIDIA-H100-80GB-HBM3",
    "K8S_TOLERATE": "dedicated",
    "K8S_PULL_SECRET": "ghcr-pull",
    "K8S_RDMA": "1",
}


# ---------------------------------------------------------------------------------------------- helpers
def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=kw.pop("cwd", REPO), capture_output=True, text=True, timeout=300, **kw)


def tool(name: str) -> str:
    path = BIN / name
    assert path.exists(), f"{path} missing: run `make setup` (requirements-dev.txt)"
    return str(path)


def make_var(name: str) -> str:
    """A variable's value as the Makefile computes it (the one place it is written)."""
    out = run(["make", "-s", "--no-print-directory", "--eval", f"print-var: ; @echo $({name})", "print-var"])
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


MANIFESTS = [REPO / p for p in make_var("K8S_MANIFESTS").split()]


def load_docs(text: str) -> list[dict]:
    # Through JSON: the manifests use YAML anchors, and aliased nodes must not stay one shared object.
    return [json.loads(json.dumps(d)) for d in yaml.safe_load_all(text) if d]


def kustomize(root: Path) -> list[dict]:
    out = run([tool("kubectl"), "kustomize", "--load-restrictor", "LoadRestrictionsNone", str(root)])
    assert out.returncode == 0, out.stderr
    return load_docs(out.stdout)


def validate(paths: list[Path], version: str, strict: bool = True) -> subprocess.CompletedProcess:
    flags = ["--strict"] if strict else []
    return run([tool("kubernetes-validate"), *flags, "--quiet", "-k", version, *map(str, paths)])


def crd_validate(paths: list[Path]) -> subprocess.CompletedProcess:
    return run([sys.executable, str(K8S / "crd_validate.py"), *map(str, paths)])


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> dict[str, list[dict]]:
    """Every way the workloads reach a cluster: the files as they are, `kubectl kustomize` of each folder, and
    `make k8s-render` with every setting and component (K8S_BUILD in a tmp folder)."""
    build = tmp_path_factory.mktemp("k8s-build")
    out = run(["make", "-s", "k8s-render", f"K8S_BUILD={build}", *(f"{k}={v}" for k, v in MAKE_SETTINGS.items())])
    assert out.returncode == 0, out.stderr
    found = {str(p.relative_to(REPO)): load_docs(p.read_text()) for p in MANIFESTS}
    for root in KUSTOMIZATIONS:
        found[f"kustomize {root.relative_to(REPO)}"] = kustomize(root)
    for name in make_var("K8S_OVERLAYS").split():
        found[f"make {name}"] = load_docs((build / f"{name}.yaml").read_text())
    return found


# ------------------------------------------------------------ workloads, whatever their kind, as pods
WORKLOADS = ("Job", "JobSet", "TrainJob")


def workloads(docs: list[dict]) -> list[dict]:
    """The workloads; a TrainJob carries the TrainingRuntime it names (`_runtime`): the one rendered beside it,
    else k8s/trainjob/runtime.yaml as it is (the TrainJob's file alone)."""
    runtimes = {d["metadata"]["name"]: d for d in docs if d["kind"] == "TrainingRuntime"}
    found = []
    for w in (d for d in docs if d["kind"] in WORKLOADS):
        if w["kind"] == "TrainJob":  # a copy: the rendered documents stay as they were (other tests validate them)
            ref = w["spec"]["runtimeRef"]
            assert (ref.get("apiGroup"), ref.get("kind")) == ("trainer.kubeflow.org", "TrainingRuntime"), ref
            runtime = runtimes.get(ref["name"]) or load_docs((K8S / "trainjob" / "runtime.yaml").read_text())[0]
            assert runtime["metadata"]["name"] == ref["name"]
            w = {**w, "_runtime": runtime}
        found.append(w)
    return found


def component(w: dict) -> str:
    return w["metadata"]["labels"]["app.kubernetes.io/component"]


def pods(w: dict) -> list[tuple[dict, dict]]:
    """(pod spec, the Job that runs it) of a workload; a TrainJob's pod is its runtime patch plus the trainer
    container with the PET_* variables the torch runtime adds (what the runtime's JobSet will run)."""
    if w["kind"] == "Job":
        return [(w["spec"]["template"]["spec"], w["spec"])]
    if w["kind"] == "JobSet":
        return [(r["template"]["spec"]["template"]["spec"], r["template"]["spec"]) for r in w["spec"]["replicatedJobs"]]
    trainer, name = w["spec"]["trainer"], w["metadata"]["name"]
    assert "runtimePatches" not in w["spec"], "the pod template is the project's runtime's"
    (node,) = w["_runtime"]["spec"]["template"]["spec"]["replicatedJobs"]
    spec = json.loads(json.dumps(node["template"]["spec"]["template"]["spec"]))
    (container,) = spec["containers"]
    runtime_env = {
        "PET_NNODES": str(trainer["numNodes"]),
        "PET_NPROC_PER_NODE": str(trainer["numProcPerNode"]),
        "PET_MASTER_ADDR": f"{name}-node-0-0.{name}",
        "PET_MASTER_PORT": TRAINER_PORT,
    }
    node_rank = {"fieldRef": {"fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}}
    container.update(
        image=trainer["image"],
        args=trainer["args"],
        env=[
            *trainer.get("env", []),
            *({"name": k, "value": v} for k, v in runtime_env.items()),
            {"name": "PET_NODE_RANK", "valueFrom": node_rank},
        ],
        resources=trainer["resourcesPerNode"],
    )
    job = {**node["template"]["spec"], "completions": trainer["numNodes"], "parallelism": trainer["numNodes"]}
    return [(spec, job)]


def containers(spec: dict) -> list[dict]:
    return [*spec.get("initContainers", []), *spec.get("containers", [])]


def env_of(container: dict, index: str = "0") -> dict[str, str]:
    """The container's environment in pod `index`, with what the Job controller adds to an Indexed Job's pods."""
    env = {"JOB_COMPLETION_INDEX": index}
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = item["value"]
        elif "job-completion-index" in item.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath", ""):
            env[item["name"]] = index
    return env


def argv(container: dict, index: str = "0") -> list[str]:
    """The CLI words the container runs: its args after the image's `python -m job`, $(VAR) expanded from env."""
    assert "command" not in container, "the image's entrypoint (init + CLI) must stay in front"
    env = env_of(container, index)
    return [re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), w) for w in container["args"]]


def parse_cli(words: list[str]) -> tuple[str, dict]:
    """Parse `SUBCOMMAND ...` with the project's own Click commands (types and names checked)."""
    from job.cli import cli

    name, *rest = words
    assert name in cli.commands, f"no subcommand {name!r}"
    ctx = cli.commands[name].make_context(name, list(rest), parent=click.Context(cli, info_name="job"))
    return name, {k: v for k, v in ctx.params.items() if v is not None}


def launch_config(container: dict, index: str = "0") -> tuple[RunConfig, dict[str, str]]:
    """The effective config the container's `train`/`doctor` runs with: its flags, then its environment."""
    _, params = parse_cli(argv(container, index))
    cfg = RunConfig.load(params.get("config"), **{k: v for k, v in params.items() if k in RunConfig.field_names()})
    return resolve_topology(cfg, env_of(container, index))


def option(words: list[str], flag: str) -> str | None:
    return words[words.index(flag) + 1] if flag in words else None


# ------------------------------------------------------------------------------------- schema validation
@pytest.mark.parametrize("version", ["1.31.0", "1.37.0"])
def test_manifests_and_renderings_are_strictly_valid(rendered, tmp_path, version):
    assert version in make_var("K8S_VERSIONS").split()
    paths = [*MANIFESTS]
    for i, (name, docs) in enumerate(rendered.items()):
        if name.startswith(("kustomize", "make")):
            paths.append(tmp_path / f"{i}.yaml")
            paths[-1].write_text(yaml.safe_dump_all(docs))
    out = validate(paths, version)
    assert out.returncode == 0, out.stdout + out.stderr
    custom = crd_validate(paths)
    assert custom.returncode == 0, custom.stdout + custom.stderr
    kinds = {d["kind"] for docs in rendered.values() for d in docs}
    assert {"JobSet", "TrainJob"} <= kinds
    custom_kinds = ("JobSet", "TrainJob", "TrainingRuntime")
    count = sum(d["kind"] in custom_kinds for p in paths for d in load_docs(p.read_text()))
    assert f"{count} checked" in custom.stdout


def test_misspelled_field_fails_strict_validation(tmp_path):
    bad = tmp_path / "job.yaml"
    bad.write_text((K8S / "job.yaml").read_text().replace("backoffLimit:", "backofLimit:"))
    strict = validate([bad], "1.37.0")
    assert strict.returncode != 0 and "backofLimit" in strict.stdout + strict.stderr, strict.stdout + strict.stderr
    loose = validate([bad], "1.37.0", strict=False)
    assert loose.returncode == 0, loose.stdout + loose.stderr  # why --strict is on


@pytest.mark.parametrize(
    "file, edit, message",
    [
        ("jobset/jobset.yaml", ("backoffLimit: 0", "backofLimit: 0"), "'backofLimit' was unexpected"),
        ("jobset/jobset.yaml", ("maxRestarts: 6", "maxRestarts: six"), "is not of type 'integer'"),
        ("jobset/jobset.yaml", ("action: FailJobSet", "action: Fail"), "is not one of"),
        ("trainjob/trainjob.yaml", ("numProcPerNode:", "numProcsPerNode:"), "'numProcsPerNode' was unexpected"),
        ("trainjob/trainjob.yaml", ("kind: TrainJob", "kind: TrainingJob"), "no schema for"),
        ("trainjob/runtime.yaml", ("maxRestarts: 6", "maxRestart: 6"), "'maxRestart' was unexpected"),
        ("trainjob/trainjob.yaml", ("activeDeadlineSeconds:", "activeDeadline:"), "'activeDeadline' was unexpected"),
        ("trainjob/runtime.yaml", ("numNodes: 1", "numNode: 1"), "'numNode' was unexpected"),
        ("trainjob/runtime.yaml", ("backoffLimit: 0", "backoffLimit: none"), "is not of type 'integer'"),
    ],
)
def test_custom_resources_are_checked_against_their_crds(tmp_path, file, edit, message):
    text = (K8S / file).read_text()
    assert edit[0] in text
    bad = tmp_path / "bad.yaml"
    bad.write_text(text.replace(edit[0], edit[1], 1))
    out = crd_validate([bad])
    assert out.returncode != 0 and message in out.stderr, out.stdout + out.stderr
    # kubernetes-validate alone lets every one of these through.
    alone = validate([bad], "1.37.0")
    assert alone.returncode == 0, alone.stdout + alone.stderr


# ------------------------------------------------------------------------- what each container runs
def test_commands_parse_and_resolve_to_the_gpus_and_nodes_they_have(rendered):
    """Flags + environment (PET_*, JOB_COMPLETION_INDEX) give nproc = GPUs and nnodes = pods, in every pod."""
    subcommands = set()
    for name, docs in rendered.items():
        for w in workloads(docs):
            for spec, job in pods(w):
                for c in containers(spec):
                    sub, _ = parse_cli(argv(c))
                    subcommands.add(sub)
                    gpus = c["resources"].get("limits", {}).get("nvidia.com/gpu")
                    if sub == "prepare":
                        assert gpus is None, f"{name}: the prepare job takes no GPU"
                        continue
                    pods_n = job.get("completions", 1)
                    assert job.get("parallelism", 1) == pods_n, f"{name}: every node at once, or no rendezvous"
                    for index in range(pods_n):
                        cfg, sources = launch_config(c, str(index))
                        assert cfg.nproc == int(gpus), (name, c["name"], cfg.nproc, gpus)
                        assert cfg.nnodes == pods_n, (name, c["name"], cfg.nnodes, pods_n)
                        assert cfg.node_rank == index, (name, sources)
                    if pods_n > 1:
                        assert (job.get("completionMode") == "Indexed") != (w["kind"] == "TrainJob"), name
                        _check_rendezvous(rendered, w, spec, cfg)
    assert subcommands == {"doctor", "train", "prepare"}


def test_the_prepare_job_writes_each_shard_once():
    """Pod I of the Indexed prepare Job runs `--shard I/N` with N = completions, so the pods write every shard of
    one set, each once; one pod at a time on the default (ReadWriteOnce) claims (make k8s-prepare: more on
    ReadWriteMany ones, tests/test_k8s_claims.py)."""
    from job.data.prepare import Shard

    (job,) = load_docs((K8S / "prepare-job.yaml").read_text())
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed" and spec["completions"] > 1
    claims = load_docs((K8S / "pvcs.yaml").read_text())
    assert {m for c in claims for m in c["spec"]["accessModes"]} == {"ReadWriteOnce"} and spec["parallelism"] == 1
    (c,) = containers(spec["template"]["spec"])
    shards = [Shard.parse(parse_cli(argv(c, str(i)))[1]["shard"]) for i in range(spec["completions"])]
    assert shards == [Shard(i, spec["completions"]) for i in range(spec["completions"])]


def _check_rendezvous(rendered: dict, w: dict, spec: dict, cfg: RunConfig) -> None:
    """The master address is pod 0's DNS name, on the port the workload exposes."""
    name = w["metadata"]["name"]
    if w["kind"] == "Job":  # the Indexed Job + its headless Service
        services = {d["metadata"]["name"]: d for docs in rendered.values() for d in docs if d["kind"] == "Service"}
        service = services[spec["subdomain"]]
        assert service["spec"]["clusterIP"] == "None"
        assert service["spec"]["selector"] == {"batch.kubernetes.io/job-name": name}
        assert cfg.master_addr == f"{name}-0.{spec['subdomain']}"
        assert cfg.master_port == service["spec"]["ports"][0]["port"]
    elif w["kind"] == "JobSet":
        (replicated,) = w["spec"]["replicatedJobs"]
        subdomain = w["spec"].get("network", {}).get("subdomain", name)
        assert w["spec"]["network"]["enableDNSHostnames"] is True
        assert cfg.master_addr == f"{name}-{replicated['name']}-0-0.{subdomain}"
        ports = {p["containerPort"] for c in spec["containers"] for p in c.get("ports", [])}
        assert cfg.master_port in ports
    else:
        assert cfg.master_addr == f"{name}-node-0-0.{name}"


def test_doctor_checks_the_flags_and_environment_that_train_runs_with(rendered):
    for name, docs in rendered.items():
        for w in workloads(docs):
            for spec, _ in pods(w):
                for doctor in spec.get("initContainers", []):
                    (train,) = spec["containers"]
                    assert doctor["args"][0] == "doctor" and train["args"][0] == "train", name
                    assert doctor["args"][1:] == train["args"][1:], name
                    assert env_of(doctor) == env_of(train), name
                    assert doctor["image"] == train["image"] and doctor["volumeMounts"] == train["volumeMounts"]
                if component(w) == "train":
                    (train,) = spec["containers"]
                    assert option(argv(train), "--resume") == "auto", name


def test_volumes_claims_and_shm(rendered):
    claims = {d["metadata"]["name"] for d in load_docs((K8S / "pvcs.yaml").read_text())}
    for name, docs in rendered.items():
        for w in workloads(docs):
            for spec, _ in pods(w):
                volumes = {v["name"]: v for v in spec["volumes"]}
                mounted = set()
                for c in containers(spec):
                    mounts = {m["mountPath"]: volumes[m["name"]] for m in c["volumeMounts"]}
                    mounted |= {m["name"] for m in c["volumeMounts"]}
                    shm = mounts["/dev/shm"]["emptyDir"]
                    assert shm["medium"] == "Memory" and shm["sizeLimit"], name
                    env = image_env() | env_of(c)  # the image's ENV, then the pod's
                    for var in ("HF_HOME", "JOB_CACHE"):
                        assert any(env[var].startswith(p + "/") for p in mounts), f"{name}: {var} not on a volume"
                    assert env["HF_HUB_OFFLINE"] == env["HF_DATASETS_OFFLINE"] == "1"
                assert mounted == set(volumes), f"{name}: unused volumes {set(volumes) - mounted}"
                for v in volumes.values():
                    if "persistentVolumeClaim" in v:
                        assert v["persistentVolumeClaim"]["claimName"] in claims, f"{name}: no PVC manifest"


def quantity(text: str) -> float:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    return float(text[:-2]) * units[text[-2:]] if text[-2:] in units else float(text)


def test_nccl_settings_and_shm(rendered):
    """k8s/README.md's multi-node networking: the image sets NCCL_DEBUG=WARN and TORCH_NCCL_ASYNC_ERROR_HANDLING=1
    for every pod; no manifest pins NCCL_SOCKET_IFNAME or any NCCL_IB_* (only the rdma component sets
    NCCL_IB_DISABLE); /dev/shm is memory-backed and sized, at most half the train container's memory."""
    env = image_env()
    assert env["NCCL_DEBUG"] == "WARN" and env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"
    readme = (K8S / "README.md").read_text()
    assert "`NCCL_DEBUG=WARN`" in readme and "`TORCH_NCCL_ASYNC_ERROR_HANDLING=1`" in readme
    from transformers import TrainingArguments

    ddp_timeout = TrainingArguments.__dataclass_fields__["ddp_timeout"].default
    assert f"`ddp_timeout` (TrainingArguments' default, {ddp_timeout} s)" in readme
    for name, docs in rendered.items():
        for w in workloads(docs):
            for spec, _ in pods(w):
                volumes = {v["name"]: v for v in spec["volumes"]}
                for c in containers(spec):
                    nccl = {k for k in env_of(c) if k.startswith("NCCL_")}
                    assert nccl <= ({"NCCL_IB_DISABLE"} if name.startswith("make") else set()), (name, nccl)
                if component(w) != "train":
                    continue
                (train,) = spec["containers"]
                (shm,) = [volumes[m["name"]] for m in train["volumeMounts"] if m["mountPath"] == "/dev/shm"]
                size = quantity(shm["emptyDir"]["sizeLimit"])
                assert 2**30 <= size <= quantity(train["resources"]["limits"]["memory"]) / 2, name


def test_the_grace_period_holds_the_shutdown_timeout_and_a_step(rendered):
    for name, docs in rendered.items():
        for w in workloads(docs):
            for spec, _ in pods(w):
                for c in containers(spec):
                    sub, _ = parse_cli(argv(c))
                    if sub in ("train", "doctor"):
                        timeout = launch_config(c)[0].shutdown_timeout_s
                        grace = spec["terminationGracePeriodSeconds"]
                        assert timeout + GRACE_MARGIN_S <= grace, f"{name}: --shutdown-timeout-s {timeout}, {grace}"


# ------------------------------------------------------------------------------------- failure policies
def _pod_failure_rules(job_spec: dict) -> list[tuple[str, set[int], set[str]]]:
    """(action, exit codes, pod conditions) of each podFailurePolicy rule, in order."""
    rules = []
    for rule in job_spec["podFailurePolicy"]["rules"]:
        codes = rule.get("onExitCodes", {})
        assert not codes or codes["operator"] == "In"
        conditions = {c["type"] for c in rule.get("onPodConditions", []) if c["status"] == "True"}
        rules.append((rule["action"], set(codes.get("values", [])), conditions))
    return rules


def test_plain_jobs_fail_fast_on_bad_input_and_do_not_count_preemption(rendered):
    seen = 0
    for name, docs in rendered.items():
        for job in (d for d in docs if d["kind"] == "Job"):
            spec, seen = job["spec"], seen + 1
            assert spec["template"]["spec"]["restartPolicy"] == "Never"  # podFailurePolicy requires it
            retries = spec.get("backoffLimit", spec.get("backoffLimitPerIndex", 0))  # per index: the Indexed Job
            assert retries >= 1 and spec["activeDeadlineSeconds"] > 0
            assert spec["ttlSecondsAfterFinished"] > 0 and spec["podReplacementPolicy"] == "Failed"
            rules = _pod_failure_rules(spec)
            fail = set().union(*(codes for action, codes, _ in rules if action == "FailJob"))
            ignore = set().union(*(codes for action, codes, _ in rules if action == "Ignore"))
            assert ("Ignore", set(), {"DisruptionTarget"}) in rules, name
            if component(job) == "train":
                assert fail == {errors.EXIT_BAD_INPUT, errors.EXIT_DIVERGED}, name
                assert ignore == {errors.EXIT_PREEMPTED}, name
            else:
                assert fail == {errors.EXIT_BAD_INPUT} and not ignore, name
    assert seen >= 3


def _jobset_action(jobset: dict, job_failure_message: str) -> str:
    """What the JobSet controller does when a child Job fails with reason PodFailurePolicy and this message:
    the first rule whose reasons and message patterns match (no rule: RestartJobSet)."""
    for rule in jobset["spec"]["failurePolicy"].get("rules", []):
        reasons, patterns = rule.get("onJobFailureReasons", []), rule.get("onJobFailureMessagePatterns", [])
        if (not reasons or "PodFailurePolicy" in reasons) and (
            not patterns or any(re.search(p, job_failure_message) for p in patterns)
        ):
            return rule["action"]
    return "RestartJobSet"


def test_a_jobset_restarts_every_node_and_fails_fast_on_bad_input(rendered):
    """A failed pod fails its Job at once (backoffLimit 0); the Job controller's failure message names the
    podFailurePolicy rule, and the JobSet's rules turn it into: fail (2, 3), or a counted restart of the whole
    group (75, DisruptionTarget, a crash)."""
    seen = 0
    for name, docs in rendered.items():
        # A TrainJob runs the JobSet its runtime describes: the project's runtime has the JobSet's contract.
        runtimes = [{"spec": d["spec"]["template"]["spec"]} for d in docs if d["kind"] == "TrainingRuntime"]
        for jobset in [d for d in docs if d["kind"] == "JobSet"] + runtimes:
            seen += 1
            assert jobset["spec"]["failurePolicy"]["maxRestarts"] >= 1, name
            for job in (r["template"]["spec"] for r in jobset["spec"]["replicatedJobs"]):
                assert job["backoffLimit"] == 0 and job["template"]["spec"]["restartPolicy"] == "Never", name
                # The messages of kubernetes pkg/controller/job/pod_failure_policy.go.
                messages = {}
                for index, (action, codes, conditions) in enumerate(_pod_failure_rules(job)):
                    assert action == "FailJob", name
                    for code in codes:
                        messages[code] = (
                            f"Container train for pod ml/x failed with exit code {code} matching FailJob rule at "
                            f"index {index}"
                        )
                    for condition in conditions:
                        messages[condition] = (
                            f"Pod ml/x has condition {condition} matching FailJob rule at index {index}"
                        )
                expect = {
                    errors.EXIT_BAD_INPUT: "FailJobSet",
                    errors.EXIT_DIVERGED: "FailJobSet",
                    errors.EXIT_PREEMPTED: "RestartJobSet",
                    "DisruptionTarget": "RestartJobSet",
                }
                assert set(messages) == set(expect), name
                for cause, action in expect.items():
                    assert _jobset_action(jobset, messages[cause]) == action, (name, cause)
                assert _jobset_action(jobset, "Job has reached the specified backoff limit") == "RestartJobSet"
    assert seen >= 6  # JobSets and the TrainJob's runtime, as files and rendered


def test_restarts_and_the_whole_run_are_bounded(rendered):
    """A run preempted forever ends. JobSet (and the TrainJob's runtime): no rule restarts without counting, so at
    most maxRestarts + 1 attempts, each ending at its Job's activeDeadlineSeconds; the TrainJob's own deadline is
    that product. k8s/README.md states these very numbers."""
    readme = (K8S / "README.md").read_text()
    bounds = set()
    for name, docs in rendered.items():
        for w in workloads(docs):
            if w["kind"] == "Job":
                assert 0 < w["spec"]["activeDeadlineSeconds"] <= 172800, name  # the whole Job, retries included
                continue
            group = w["spec"] if w["kind"] == "JobSet" else w["_runtime"]["spec"]["template"]["spec"]
            policy = group["failurePolicy"]
            assert {r["action"] for r in policy["rules"]} <= {"FailJobSet", "RestartJobSet"}, name
            ((job),) = [r["template"]["spec"] for r in group["replicatedJobs"]]
            attempts, per_attempt = policy["maxRestarts"] + 1, job["activeDeadlineSeconds"]
            if w["kind"] == "TrainJob":
                assert w["spec"]["activeDeadlineSeconds"] == attempts * per_attempt, name
            bounds.add((policy["maxRestarts"], per_attempt))
    ((max_restarts, per_attempt),) = bounds
    whole_days = (max_restarts + 1) * per_attempt // 86400
    for promise in (
        f"`maxRestarts: {max_restarts}`",
        f"`activeDeadlineSeconds: {per_attempt}` ({per_attempt // 3600} h)",
        f"{max_restarts + 1} x {per_attempt // 3600} h = {whole_days} days",
        f"`activeDeadlineSeconds: {whole_days * 86400}`",
    ):
        assert promise in readme, promise


# ------------------------------------------------------------------------ settings, components, images
def test_make_settings_reach_every_field_they_size(rendered):
    for name in ("make train", "make jobset", "make indexed", "make trainjob"):
        (w,) = workloads(rendered[name])
        for spec, job in pods(w):
            for c in containers(spec):
                assert c["resources"]["limits"]["nvidia.com/gpu"] == MAKE_SETTINGS["GPUS"], (name, c["name"])
            train = spec["containers"][0]
            cpu, memory = MAKE_SETTINGS["CPUS"], MAKE_SETTINGS["MEMORY"]
            assert train["resources"]["requests"]["cpu"] == train["resources"]["limits"]["cpu"] == cpu, name
            assert train["resources"]["requests"]["memory"] == train["resources"]["limits"]["memory"] == memory
            if name != "make train":
                assert job["completions"] == int(MAKE_SETTINGS["NNODES"]), name
    # Without settings, kustomize gives exactly the plain files (the image aside).
    for root, file in ((K8S, "job.yaml"), (K8S / "jobset", "jobset.yaml"), (K8S / "trainjob", "trainjob.yaml")):
        assert without_images(workloads(kustomize(root))) == without_images(
            workloads(load_docs((root / file).read_text()))
        ), root


def without_images(docs: list[dict]) -> list[dict]:
    text = json.dumps(docs)
    return json.loads(re.sub(r'"image": "[^"]*"', '"image": "-"', text))


def test_make_components_queue_and_place_the_workloads(rendered):
    """K8S_QUEUE and friends: Kueue's labels and suspend on every workload, the pods' priority class and pull
    secret, the GPU model and the extra toleration on every training pod; and none of it without the settings."""
    for name, docs in rendered.items():
        on = name.startswith("make")
        for w in workloads(docs):
            labels = w["metadata"]["labels"]
            assert (labels.get("kueue.x-k8s.io/queue-name") == MAKE_SETTINGS["K8S_QUEUE"]) == on, name
            assert (labels.get("kueue.x-k8s.io/priority-class") == MAKE_SETTINGS["K8S_KUEUE_PRIORITY"]) == on
            assert (w["spec"].get("suspend") is True) == on, f"{name}: Kueue admits a workload created suspended"
            for spec, job in pods(w):
                assert "suspend" not in job or w["kind"] == "Job", f"{name}: only the top-level object is queued"
                if w["kind"] != "TrainJob":  # a runtime patch cannot set it
                    assert (spec.get("priorityClassName") == MAKE_SETTINGS["K8S_PRIORITY_CLASS"]) == on, name
                pull = [{"name": MAKE_SETTINGS["K8S_PULL_SECRET"]}] if on else None
                assert spec.get("imagePullSecrets") == pull, name  # every pod, the prepare Job's too
                if component(w) != "train":
                    continue
                product = spec.get("nodeSelector", {}).get("nvidia.com/gpu.product")
                assert (product == MAKE_SETTINGS["K8S_GPU_PRODUCT"]) == on, name
                keys = {t["key"] for t in spec["tolerations"]}
                assert "nvidia.com/gpu" in keys and (MAKE_SETTINGS["K8S_TOLERATE"] in keys) == on, name
                # RDMA: the device and IPC_LOCK on the train container, NCCL_IB_DISABLE=0 in both; nothing else added.
                (train,) = spec["containers"]
                assert train["securityContext"]["capabilities"].get("add") == (["IPC_LOCK"] if on else None), name
                assert (train["resources"]["limits"].get("rdma/ib") == MAKE_SETTINGS["K8S_RDMA"]) == on, name
                for c in containers(spec):
                    assert (env_of(c).get("NCCL_IB_DISABLE") == "0") == on, (name, c["name"])
                    if c is not train:
                        assert "add" not in c["securityContext"]["capabilities"], name


def tracked_files() -> list[Path]:
    return [REPO / f for f in run(["git", "ls-files"]).stdout.split()]


# --------------------------------------------------------------------------- facts written once
def image_env() -> dict[str, str]:
    """The environment docker/Dockerfile sets (ENV), what every container of the image starts with."""
    env = " ".join(v for k, v in instructions(DOCKERFILE.read_text()) if k == "ENV")
    return {k: v.strip('"') for k, v in re.findall(r"(\w+)=(\"[^\"]*\"|\S+)", env)}


def test_the_manifests_do_not_repeat_the_image_environment_or_the_cli_defaults(rendered):
    """The container's environment is the image's (set once, in the Dockerfile); a flag that passes the CLI's
    default is a second copy of it. `--resume auto` is the exception: a retried pod must resume whatever the
    default becomes."""
    from job.cli import cli

    baked = set(image_env())
    for name, docs in rendered.items():
        for w in workloads(docs):
            for spec, _ in pods(w):
                for c in containers(spec):
                    assert not baked & {e["name"] for e in c.get("env", [])}, f"{name}: repeats the image's ENV"
                    sub, *words = argv(c)
                    defaults = {p.opts[0]: p.default for p in cli.commands[sub].params if p.opts}
                    for flag, value in zip(words, [*words[1:], None], strict=True):
                        if flag in defaults and flag != "--resume" and value == str(defaults[flag]):
                            raise AssertionError(f"{name}: {flag} {value} is the CLI's default")


def test_torch_version_is_written_once():
    """docker/Dockerfile's ARG TORCH_VERSION; the Makefile reads it (make setup's pin)."""
    (version,) = [v.split("=", 1)[1] for k, v in instructions(DOCKERFILE.read_text()) if v.startswith("TORCH_VERSION=")]
    assert make_var("TORCH_VERSION") == version
    for path in (REPO / "Makefile", REPO / ".github", K8S, REPO / "README.md", REPO / ".ci"):
        for f in [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]:
            assert version not in f.read_text(errors="replace"), f


def test_make_setup_installs_the_cpu_torch_without_a_gpu():
    """No GPU: torch's +cpu build from PyTorch's CPU index as an extra index (a local wheel still satisfies the
    pin, an unreachable index does not fail); a GPU: PyPI's (CUDA) build of the same version."""
    version = make_var("TORCH_VERSION")
    cpu = make_dry("-B", "setup", "HAS_GPU=")
    gpu = make_dry("-B", "setup", "HAS_GPU=1")
    if run(["uname", "-s"]).stdout.strip() == "Linux":
        assert f"--extra-index-url https://download.pytorch.org/whl/cpu torch=={version}+cpu" in cpu
    assert f"pip install -q torch=={version}\n" in gpu and "download.pytorch.org" not in gpu


def test_pods_run_as_the_image_user_without_privileges(rendered):
    for name, docs in rendered.items():
        for w in workloads(docs):
            for spec, _ in pods(w):
                sc = spec["securityContext"]
                assert sc["runAsNonRoot"] is True and sc["runAsUser"] == UID and sc["fsGroup"] == UID, name
                assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
                if w["kind"] != "TrainJob":  # the runtime's
                    assert spec["automountServiceAccountToken"] is False
                for c in containers(spec):
                    csc = c["securityContext"]
                    assert csc["allowPrivilegeEscalation"] is False and csc["capabilities"]["drop"] == ["ALL"]
                    # The root filesystem read-only, as `make image-test` runs the image; scratch space on /tmp.
                    assert csc["readOnlyRootFilesystem"] is True, name
                    volumes = {v["name"]: v for v in spec["volumes"]}
                    (tmp,) = [m for m in c["volumeMounts"] if m["mountPath"] == "/tmp"]
                    assert "emptyDir" in volumes[tmp["name"]], name
                    assert not csc.get("privileged") and "runAsUser" not in csc
                    requests, limits = c["resources"]["requests"], c["resources"]["limits"]
                    assert requests["cpu"] == limits["cpu"] and requests["memory"] == limits["memory"], name


# ----------------------------------------------------------------------------------------- Dockerfile
def instructions(text: str) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", text)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1] if " " in ln else "") for ln in lines]


def dockerfile_problems(text: str) -> list[str]:
    """What hadolint does not check: the base pinned by tag AND digest, the last USER non-root by number,
    an init (not the CLI) as PID 1."""
    problems = []
    ins = instructions(text)
    args = dict(v.split("=", 1) for k, v in ins if k == "ARG" and "=" in v)
    stages = [v.split()[0] for k, v in ins if k == "FROM"]
    base = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), ""), stages[-1])
    if not re.fullmatch(r"[\w./-]+:[\w.-]+@sha256:[0-9a-f]{64}", base):
        problems.append(f"base image {base!r} is not a tag pinned by digest")
    users = [v.strip() for k, v in ins if k == "USER"]
    if not users:
        problems.append("no USER: the image runs as root")
    elif users[-1].split(":")[0] != str(UID):
        problems.append(f"last USER is {users[-1]!r}, not uid {UID}")
    entrypoint = json.loads([v for k, v in ins if k == "ENTRYPOINT"][-1])
    if entrypoint[0] not in ("dumb-init", "tini") or entrypoint[-3:] != CLI:
        problems.append(f"ENTRYPOINT {entrypoint}: not an init in front of {' '.join(CLI)}")
    return problems


def test_dockerfile_is_hadolint_clean_and_pinned():
    out = run([tool("hadolint"), str(DOCKERFILE)])
    assert out.returncode == 0, out.stdout + out.stderr
    assert dockerfile_problems(DOCKERFILE.read_text()) == []


def test_dockerfile_contract():
    ins = instructions(DOCKERFILE.read_text())
    get = lambda key: [v for k, v in ins if k == key]
    cmd = json.loads(get("CMD")[-1])
    _, params = parse_cli(cmd)
    assert params["resume"] == "auto"
    entrypoint = json.loads(get("ENTRYPOINT")[-1])
    assert "--single-child" in entrypoint or entrypoint[0] == "tini"  # the signal goes to the CLI, not its group
    env = dict(re.findall(r"(\w+)=(\"[^\"]*\"|\S+)", " ".join(get("ENV"))))
    assert env["HF_HUB_OFFLINE"] == env["HF_DATASETS_OFFLINE"] == env["PYTHONUNBUFFERED"] == "1"
    assert env["JOB_CACHE"] == "/cache/job" and env["HF_HOME"].startswith("/cache/")
    assert set(json.loads(get("VOLUME")[-1])) == {"/data", "/models", "/output", "/cache"}
    # torch: TORCH_VERSION from TORCH_INDEX_URL (default: a CUDA index, and a CUDA build is required), installed
    # first; nothing else names torch, and the installed build is a constraint of the rest.
    for name in ("requirements.txt", "constraints.txt"):
        assert not re.search(r"^torch\b", (REPO / name).read_text(), re.M), f"{name} names torch"
    args = dict(v.split("=", 1) for v in get("ARG") if "=" in v)
    assert re.fullmatch(r"https://download\.pytorch\.org/whl/cu\d+", args["TORCH_INDEX_URL"])
    assert args["TORCH_CUDA"] == "required"
    assert env["VIRTUAL_ENV"] == "/opt/venv" and env["PATH"].startswith("/opt/venv/bin:")
    install = next(v for v in get("RUN") if "pip install" in v)
    assert "torch==${TORCH_VERSION}" in install and "TORCH_CUDA" in install
    assert "-c constraints.txt" in install and "torch-pin" in install and "-r requirements.txt" in install
    assert entrypoint[0] in install  # the init comes from the same (mirrorable) index as the rest
    # A mirror and a wheelhouse for air-gapped builds; OCI labels from build arguments.
    assert {"PIP_INDEX_URL", "SOURCE", "REVISION", "VERSION", "CREATED"} <= {v.split("=")[0] for v in get("ARG")}
    assert any(v.endswith(" AS wheelhouse") for v in get("FROM")) and "from=wheelhouse" in install
    labels = " ".join(get("LABEL"))
    for key in ("source", "revision", "version", "created"):
        assert f"org.opencontainers.image.{key}=" in labels, key
    for source in (w for v in get("COPY") for w in v.split()[:-1] if not w.startswith("--")):
        assert (REPO / source).exists(), source
        assert dockerignore_keeps(source.rstrip("/") + ("/cli.py" if source.endswith("/") else "")), source


@pytest.mark.parametrize(
    "edit, hadolint_fails",
    [
        (lambda t: t.replace("USER 1000:1000", "USER root"), True),  # DL3002: last USER should not be root
        (lambda t: t + "USER root\n", True),
        (lambda t: t.replace("USER 1000:1000\n", ""), False),  # hadolint misses it; our check does not
        (lambda t: re.sub(r"(ARG BASE_IMAGE=\S+)@sha256:[0-9a-f]+", r"\1", t), False),
        (lambda t: re.sub(r"ENTRYPOINT \[.*\]", 'ENTRYPOINT ["python", "-m", "job"]', t), False),
    ],
    ids=["user-root", "user-root-appended", "no-user", "base-without-digest", "cli-as-pid-1"],
)
def test_dockerfile_negative(tmp_path, edit, hadolint_fails):
    bad = tmp_path / "Dockerfile"
    bad.write_text(edit(DOCKERFILE.read_text()))
    assert bad.read_text() != DOCKERFILE.read_text()
    out = run([tool("hadolint"), str(bad)])
    assert (out.returncode != 0) == hadolint_fails, out.stdout
    if hadolint_fails:
        assert "DL3002" in out.stdout
    assert dockerfile_problems(bad.read_text()), "the broken Dockerfile passed our checks"


def dockerignore_keeps(path: str) -> bool:
    """Docker's rule: the last matching pattern wins; a pattern matching a folder matches what is inside."""
    keep = True
    for line in (REPO / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate, pattern = line.startswith("!"), line.lstrip("!").rstrip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatch(p, pattern) or fnmatch.fnmatch(p, pattern.replace("**/", "")) for p in prefixes):
            keep = negate
    return keep


def test_the_default_deepspeed_file_is_one_file_at_the_top_level():
    """`--deepspeed default` is ds_config.json at the repository root (the design's top level), and the image
    copies that very file to /app, beside the package (PYTHONPATH=/app): no second copy anywhere."""
    from job.core.config import DEFAULT_DS_CONFIG

    assert DEFAULT_DS_CONFIG == REPO / "ds_config.json"
    assert json.loads(DEFAULT_DS_CONFIG.read_text())["zero_optimization"]["stage"] == 2
    assert [p for p in tracked_files() if p.name == "ds_config.json"] == [DEFAULT_DS_CONFIG]
    steps = instructions(DOCKERFILE.read_text())
    (workdir,) = [v for k, v in steps if k == "WORKDIR"]
    copied = [v.split() for k, v in steps if k == "COPY" and "ds_config.json" in v.split()]
    assert copied and copied[0][-1] in ("./", workdir, workdir + "/"), copied
    assert f"PYTHONPATH={workdir}" in " ".join(v for k, v in steps if k == "ENV")
    assert [v for k, v in steps if k == "COPY" and v.split()[-1] == "./job/"], "the package lands beside it"


def test_dockerignore_sends_only_the_project():
    for path in ("job/cli.py", "job/recipes/h100.json", "requirements.txt", "constraints.txt", "ds_config.json"):
        assert dockerignore_keeps(path), path
    for path in (".venv/bin/python", ".git/HEAD", "output/run/checkpoint-1/x", "job/__pycache__/cli.pyc", "tests/x"):
        assert not dockerignore_keeps(path), path


# ----------------------------------------------------------------------------------- Makefile and CI
def make_dry(*args: str) -> str:
    out = run(["make", "-n", *args])
    assert out.returncode == 0, out.stderr
    return out.stdout


def image_commands(text: str, image: str) -> list[list[str]]:
    """The CLI words of each `docker run ... IMAGE args` line of a dry run."""
    found = []
    for line in text.replace("\\\n", " ").splitlines():
        words = shlex.split(line)
        if words[:2] == ["docker", "run"] and image in words:
            found.append(words[words.index(image) + 1 :])
    return found


def test_the_documented_make_targets_exist():
    """Every `make TARGET` in the READMEs is a target `make help` lists."""
    listed = set(re.findall(r"^\s+([a-z0-9-]+)\s", run(["make", "help"]).stdout, re.M))
    documented = set()
    for readme in (REPO / "README.md", K8S / "README.md"):
        documented |= set(re.findall(r"(?:^|`)\s*make ([a-z][a-z0-9-]*[a-z0-9])\b(?!-)", readme.read_text(), re.M))
    assert documented and documented <= listed, documented - listed


def test_make_refuses_latest():
    for target in ("build", "push", "docker-train", "k8s-overlays"):
        out = run(["make", target, "TAG=latest", "DOCKER=false", "KUBECTL=false", "K8S_BUILD=/nonexistent"])
        assert out.returncode != 0 and "never latest" in out.stderr, target


def test_train_and_docker_train_run_the_same_flags(tmp_path):
    settings = ["RECIPE=h100", "NPROC=2", "ZERO=3", "MAX_STEPS=5", "DATA=/data/news.jsonl", "TOKENIZER=/data/tok"]
    host = next(line for line in make_dry("train", *settings).splitlines() if " -m job train " in line)
    _, on_host = parse_cli(shlex.split(host.split(" -m job ", 1)[1]))
    image = "registry.example.com/ml/bloom:v1"
    dry = make_dry(
        "docker-train",
        "IMAGE=registry.example.com/ml/bloom",
        "TAG=v1",
        f"MODEL_DIR={tmp_path}/m",
        f"DATA_DIR={tmp_path}/d",
        f"OUTPUT_DIR={tmp_path}/o",
        f"CACHE_DIR={tmp_path}/c",
        *settings,
    )
    ((_, in_image),) = [parse_cli(c) for c in image_commands(dry, image)]
    assert in_image.pop("output_dir") == "/output/h100" and in_image.pop("model") == "/models"
    assert in_image.pop("resume") == "auto"
    on_host.pop("output_dir")
    assert in_image == on_host
    for needle in ("--gpus all", "--shm-size", f"{tmp_path}/m:/models:ro", f"{tmp_path}/d:/data:ro"):
        assert needle in dry, needle
    assert "docker" not in make_dry("train", *settings)


def test_make_build_labels_the_image_and_takes_a_mirror_and_a_wheelhouse():
    words = shlex.split(
        " ".join(
            make_dry(
                "build",
                "IMAGE=ghcr.io/acme/bloom",
                "TAG=v1.2.3",
                "PIP_INDEX_URL=https://pypi.acme/simple",
                "WHEELHOUSE=/srv/wheels",
            )
            .replace("\\\n", " ")
            .split()
        )
    )
    build_args = dict(words[i + 1].split("=", 1) for i, w in enumerate(words) if w == "--build-arg")
    assert build_args["VERSION"] == "v1.2.3" and build_args["SOURCE"] == "https://github.com/acme/bloom"
    assert re.fullmatch(r"[0-9a-f]{40}", build_args["REVISION"]) and build_args["CREATED"].endswith("Z")
    assert build_args["PIP_INDEX_URL"] == "https://pypi.acme/simple"
    assert "wheelhouse=/srv/wheels" in words and words[words.index("-t") + 1] == "ghcr.io/acme/bloom:v1.2.3"


def test_make_docker_smoke_runs_train_resume_and_smoke(tmp_path):
    image = "registry.example.com/ml/bloom:v1"
    dry = make_dry("docker-smoke", "IMAGE=registry.example.com/ml/bloom", "TAG=v1", f"OUTPUT_DIR={tmp_path}/o")
    smoke = [parse_cli(c) for c in image_commands(dry, image)]
    assert [s for s, _ in smoke] == ["train", "train", "smoke"]
    assert all(p["deepspeed"] == "default" and p["bf16"] for _, p in smoke[:2])  # the image's ds_config.json
    assert smoke[1][1]["max_steps"] > smoke[0][1]["max_steps"] and smoke[1][1]["resume"] == "auto"


def test_the_gpu_workflow_waits_for_no_runner_that_does_not_exist():
    gpu = yaml.safe_load((REPO / ".github" / "workflows" / "gpu-smoke.yml").read_text())
    triggers = gpu.get("on", gpu.get(True))  # YAML 1.1 reads the key `on` as true
    assert "workflow_dispatch" in triggers
    for job in gpu["jobs"].values():
        if "self-hosted" in job["runs-on"] and set(triggers) - {"workflow_dispatch"}:
            assert "workflow_dispatch" in job["if"] and "vars." in job["if"], job.get("if")


# ------------------------------------------------------------------------------------------ image test
IMAGE_TEST = REPO / "docker" / "image-test.sh"


def test_ci_builds_and_runs_the_image_after_the_tests():
    """.ci/run: make lint, make test, then make image-test (the image built from docker/Dockerfile, then run)."""
    steps = re.findall(r"\bmake ([a-z-]+)", (REPO / ".ci" / "run").read_text())
    assert steps.index("image-test") > steps.index("test") > steps.index("lint"), steps
    assert "docker/image-test.sh" in make_dry("image-test")
    syntax = run(["bash", "-n", str(IMAGE_TEST)])
    assert syntax.returncode == 0, syntax.stderr


def test_image_test_runs_the_image_as_a_cluster_would():
    """What docker/image-test.sh promises, in its text: the project's Dockerfile through `make build`, and every
    run as uid 1000, read-only, without network, with the image's volumes from host folders."""
    text = IMAGE_TEST.read_text()
    assert "make --no-print-directory build" in text and "TORCH_CUDA=no" in text
    run_opts = re.search(r"run_opts=\((.*?)\)\n", text, re.S).group(1)
    for needle in ("--network none", "--read-only", "--user 1000:1000", "/output", "/cache", "/data:ro", "/models:ro"):
        assert needle in run_opts, needle
    volumes = set(json.loads([v for k, v in instructions(DOCKERFILE.read_text()) if k == "VOLUME"][-1]))
    assert volumes == set(re.findall(r":(/\w+)(?::ro)?\"", run_opts)), "every volume of the image from the host"
    for check in ('expect stop "$stop_rc" 75', "nothing to do", "--user 2000:2000", "! -perm -o=r"):
        assert check in text, check


def test_make_build_takes_the_same_arguments_with_either_engine():
    settings = [
        "IMAGE=ghcr.io/acme/bloom",
        "TAG=1.2.3",
        "BASE_IMAGE=localhost/base:1",
        "TORCH_INDEX_URL=",
        "TORCH_CUDA=no",
    ]
    lines = {}
    for engine in ("docker", "podman"):
        dry = make_dry("build", f"ENGINE={engine}", *settings).replace("\\\n", " ")
        (line,) = [ln for ln in dry.splitlines() if " build " in ln]
        words = shlex.split(re.sub(r"CREATED=\S+", "CREATED=x", line))
        if engine == "docker":  # BuildKit: the Dockerfile uses RUN --mount
            assert words.pop(0) == "DOCKER_BUILDKIT=1"
        assert words[:2] == [engine, "build"]
        lines[engine] = [w for w in words[2:] if w not in ("--format", "docker", "--runtime", "runc")]
        build_args = dict(words[i + 1].split("=", 1) for i, w in enumerate(words) if w == "--build-arg")
        assert build_args["TORCH_INDEX_URL"] == "" and build_args["TORCH_CUDA"] == "no"
        assert build_args["BASE_IMAGE"] == "localhost/base:1"
    assert lines["docker"] == lines["podman"]
    # Not given: the Dockerfile's defaults (the GPU image), no empty override.
    assert "TORCH_INDEX_URL" not in make_dry("build", "TAG=1.2.3")
