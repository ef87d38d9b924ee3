"""tools/pod_run.py: every pod-spec field it reads becomes a `podman run` flag, every other field is refused in one
line, the controllers' additions (names, hostnames, JOB_COMPLETION_INDEX, PET_*) are theirs, and exit codes are
judged by the manifests' own podFailurePolicy and JobSet failurePolicy. No podman needed (make cluster-test runs
the containers)."""

from __future__ import annotations

import copy
import itertools
import json
from pathlib import Path

import pytest
import yaml

from tools.pod_run import Pod, Refused, failure_message, host_folders, jobset_action, judge, run_args, workloads

K8S = Path(__file__).resolve().parent.parent / "k8s"


def _load(*files: str) -> dict:
    docs = [d for f in files for d in yaml.safe_load_all((K8S / f).read_text()) if d]
    return workloads(docs)


def _no_gpus(pod: Pod) -> Pod:
    for container in (*pod.spec.get("initContainers", []), *pod.spec["containers"]):
        container.get("resources", {}).get("limits", {}).pop("nvidia.com/gpu", None)
    return pod


def _args(pod: Pod, container: dict, tmp_path: Path, network: str | None = None) -> list[str]:
    return run_args(
        pod, container, image="img:1", claims=tmp_path / "claims", scratch=tmp_path / "pod", network=network
    )


def _pairs(args: list[str]) -> list[tuple[str, str]]:
    return list(itertools.pairwise(args))


def test_every_field_of_the_single_node_job_is_a_flag(tmp_path):
    pod = _no_gpus(_load("job.yaml")["bloom-zh-pretrain"]["pods"][0])
    train = pod.spec["containers"][0]
    args = _args(pod, train, tmp_path)
    pairs = _pairs(args)
    claims, scratch = tmp_path / "claims", tmp_path / "pod"
    for pair in [
        ("--user", "1000:1000"), ("--group-add", "1000"), ("--security-opt", "no-new-privileges"),
        ("--stop-timeout", "900"), ("--cpus", "8"), ("--memory", str(64 * 2**30)), ("--network", "none"),
        ("--shm-size", f"{16 * 2**30}b"), ("--env", "NPROC=1"), ("--name", "bloom-zh-pretrain-train"),
        ("--hostname", "bloom-zh-pretrain"), ("--pull", "never"),
        ("-v", f"{claims}/bloom-zh-data:/data:ro"), ("-v", f"{claims}/bloom-zh-models:/models:ro"),
        ("-v", f"{claims}/bloom-zh-output:/output"), ("-v", f"{claims}/bloom-zh-cache:/cache"),
        ("-v", f"{scratch}/tmp:/tmp"),
    ]:  # fmt: skip
        assert pair in pairs, (pair, args)
    assert "--read-only" in args and "--read-only-tmpfs=false" in args and "--cap-drop=ALL" in args
    image = args.index("img:1")  # the image, then the args with $(NPROC) expanded from the container's env
    assert args[image + 1 :] == [a.replace("$(NPROC)", "1") for a in train["args"]]
    assert "--entrypoint" not in args  # no command: the image's entrypoint, as in Kubernetes
    assert ("--env", "JOB_COMPLETION_INDEX=0") not in pairs  # a plain Job has no index


def test_command_working_dir_capabilities_and_memory_volumes(tmp_path):
    pod = Pod("p", {
        "restartPolicy": "Never", "automountServiceAccountToken": False, "enableServiceLinks": False,
        "securityContext": {"runAsUser": 5, "runAsGroup": 6},
        "volumes": [{"name": "m", "emptyDir": {"medium": "Memory", "sizeLimit": "1Mi"}}],
        "containers": [{
            "name": "c", "command": ["sh", "-c", "echo $(A) $$(A)"], "args": ["$(B)"], "workingDir": "/w",
            "env": [{"name": "A", "value": "a"}, {"name": "B", "value": "$(A)-b"}],
            "securityContext": {"capabilities": {"add": ["NET_RAW"]}, "runAsUser": 7},
            "volumeMounts": [{"name": "m", "mountPath": "/scratch", "readOnly": False}],
        }],
    })  # fmt: skip
    args = _args(pod, pod.spec["containers"][0], tmp_path, network="net")
    pairs = _pairs(args)
    assert ("--entrypoint", json.dumps(["sh", "-c", "echo a $(A)"])) in pairs  # $$ is a literal $
    assert ("--workdir", "/w") in pairs and ("--user", "7:6") in pairs and "--cap-add=NET_RAW" in args
    assert ("--tmpfs", f"/scratch:rw,size={2**20},mode=1777") in pairs
    assert ("--env", "B=a-b") in pairs and args[-1] == "a-b"
    assert ("--network", "net") in pairs and ("--network-alias", "p") in pairs
    assert "--read-only" not in args and "--security-opt" not in args and "--group-add" not in args


def _refusal(tmp_path, change) -> str:
    pod = _no_gpus(_load("job.yaml")["bloom-zh-pretrain"]["pods"][0])
    change(pod.spec, pod.spec["containers"][0])
    with pytest.raises(Refused) as refused:
        _args(pod, pod.spec["containers"][0], tmp_path)
    assert "\n" not in str(refused.value)
    return str(refused.value)


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (lambda s, c: s.update(hostNetwork=True), "spec.hostNetwork"),
        (lambda s, c: s.update(restartPolicy="OnFailure"), "spec.restartPolicy"),
        (lambda s, c: s.update(automountServiceAccountToken=True), "automountServiceAccountToken"),
        (lambda s, c: s["securityContext"].update(supplementalGroups=[5]), "spec.securityContext.supplementalGroups"),
        (lambda s, c: s["securityContext"].update(seccompProfile={"type": "Unconfined"}), "seccompProfile"),
        (lambda s, c: s["securityContext"].update(runAsUser=0), "runAsNonRoot"),
        (lambda s, c: c.update(livenessProbe={}), "train.livenessProbe"),
        (lambda s, c: c["securityContext"].update(privileged=True), "train.securityContext.privileged"),
        (lambda s, c: c["securityContext"]["capabilities"].update(keep=[]), "capabilities.keep"),
        (lambda s, c: c["resources"]["limits"].update({"nvidia.com/gpu": "1"}), "limits.nvidia.com/gpu"),
        (lambda s, c: c["volumeMounts"][0].update(subPath="x"), "volumeMounts.subPath"),
        (lambda s, c: s["volumes"][0].update(hostPath={"path": "/"}), "spec.volumes.data.hostPath"),
        (lambda s, c: s["volumes"][4]["emptyDir"].update(medium="HugePages"), "medium"),
        (lambda s, c: c["env"].append({"name": "X", "valueFrom": {"secretKeyRef": {}}}), "train.env.X.secretKeyRef"),
        (lambda s, c: c["env"].append({"name": "X", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}),
         "status.podIP"),
        (lambda s, c: c["envFrom"][0]["secretRef"].pop("optional"), "train.envFrom"),
        (lambda s, c: c["envFrom"].append({"configMapRef": {"name": "x"}}), "train.envFrom.configMapRef"),
    ],
)  # fmt: skip
def test_a_field_it_does_not_honour_is_refused_in_one_line(tmp_path, change, named):
    assert named in _refusal(tmp_path, change)


def test_scheduling_fields_have_no_effect_on_one_host(tmp_path):
    pod = _no_gpus(_load("job.yaml")["bloom-zh-pretrain"]["pods"][0])
    plain = _args(pod, pod.spec["containers"][0], tmp_path)
    pod.spec.update(nodeSelector={"a": "b"}, priorityClassName="high", affinity={})
    assert _args(pod, pod.spec["containers"][0], tmp_path) == plain


def test_host_folders_are_prepared_as_the_kubelet_does(tmp_path, monkeypatch):
    pod = _load("job.yaml")["bloom-zh-pretrain"]["pods"][0]
    owners = {}  # (changing a folder's group needs root: recorded here, done by make cluster-test)
    monkeypatch.setattr("tools.pod_run.os.chown", lambda path, uid, gid: owners.update({Path(path).name: (uid, gid)}))
    made = host_folders(pod, tmp_path / "claims", tmp_path / "pod")
    assert {p.name for p in made} == {"bloom-zh-data", "bloom-zh-models", "bloom-zh-output", "bloom-zh-cache", "tmp"}
    assert owners == {c: (-1, 1000) for c in ("bloom-zh-data", "bloom-zh-models", "bloom-zh-output", "bloom-zh-cache")}
    output = tmp_path / "claims" / "bloom-zh-output"
    assert output.stat().st_mode & 0o7777 == 0o2775  # fsGroup: group-writable, new files in its group (setgid)
    assert (tmp_path / "pod" / "tmp").stat().st_mode & 0o777 == 0o777  # an emptyDir: writable by any uid


def test_an_indexed_job_names_its_pods_and_gives_each_its_index(tmp_path):
    workload = _load("indexed/job.yaml", "indexed/service.yaml")["bloom-zh-pretrain-mn"]
    pods = [_no_gpus(p) for p in workload["pods"]]
    assert [p.name for p in pods] == ["bloom-zh-pretrain-mn-0", "bloom-zh-pretrain-mn-1"]
    assert pods[1].fqdn == "bloom-zh-pretrain-mn-1.bloom-zh-pretrain-mn"
    train = pods[1].spec["containers"][0]
    args = _args(pods[1], train, tmp_path, network="net")
    pairs = _pairs(args)
    assert ("--env", "JOB_COMPLETION_INDEX=1") in pairs  # the controller's env, and the annotation's fieldRef
    assert ("--node-rank", "1") in pairs and ("--network-alias", pods[1].fqdn) in pairs
    assert ("--master-addr", f"{pods[0].fqdn}") in pairs  # the manifest's rendezvous is pod 0's DNS name


def test_a_jobset_names_its_pods_in_its_subdomain(tmp_path):
    workload = _load("jobset/jobset.yaml")["bloom-zh-pretrain-js"]
    pods = workload["pods"]
    assert [p.fqdn for p in pods] == [f"bloom-zh-pretrain-js-node-0-{i}.bloom-zh-pretrain-js" for i in (0, 1)]
    env = dict(
        e.split("=", 1)
        for k, e in _pairs(_args(_no_gpus(pods[1]), pods[1].spec["containers"][0], tmp_path))
        if k == "--env"
    )
    assert env["PET_MASTER_ADDR"] == pods[0].fqdn and env["JOB_COMPLETION_INDEX"] == "1"


def test_a_trainjob_gets_the_torch_plugins_variables_on_its_node_container(tmp_path):
    workload = _load("trainjob/runtime.yaml", "trainjob/trainjob.yaml")["bloom-zh-pretrain-tj"]
    pods = [_no_gpus(p) for p in workload["pods"]]
    assert [p.fqdn for p in pods] == [f"bloom-zh-pretrain-tj-node-0-{i}.bloom-zh-pretrain-tj" for i in (0, 1)]
    node = pods[1].spec["containers"][0]
    args = _args(pods[1], node, tmp_path)
    env = dict(e.split("=", 1) for k, e in _pairs(args) if k == "--env")
    assert env["PET_NNODES"] == "2" and env["PET_NPROC_PER_NODE"] == "8" and env["PET_NODE_RANK"] == "1"
    assert env["PET_MASTER_ADDR"] == pods[0].fqdn and env["PET_MASTER_PORT"] == "29500"
    trainer = yaml.safe_load((K8S / "trainjob/trainjob.yaml").read_text())["spec"]["trainer"]
    assert args[args.index("img:1") + 1 :] == trainer["args"] and ("--cpus", "64") in _pairs(args)
    doctor = pods[1].spec["initContainers"][0]  # the runtime's own env on the doctor: the same topology
    doctor_env = dict(e.split("=", 1) for k, e in _pairs(_args(pods[1], doctor, tmp_path)) if k == "--env")
    assert {k: doctor_env[k] for k in ("PET_NNODES", "PET_MASTER_ADDR", "PET_MASTER_PORT", "PET_NODE_RANK")} == {
        k: env[k] for k in ("PET_NNODES", "PET_MASTER_ADDR", "PET_MASTER_PORT", "PET_NODE_RANK")
    }


def test_exit_codes_are_judged_by_the_manifests_pod_failure_policy():
    policy = _load("job.yaml")["bloom-zh-pretrain"]["pods"][0].policy
    assert judge(policy, 75, "train") == ("Ignore", 1)
    assert judge(policy, 2, "doctor") == ("FailJob", 0) and judge(policy, 3, "train") == ("FailJob", 0)
    assert judge(policy, 1, "train") == ("Count", None) and judge(policy, 137, "train") == ("Count", None)
    assert judge(policy, 0, "train") == ("Succeeded", None)
    assert judge(policy, 0, "train", disrupted=True) == ("Ignore", 2)
    other = {
        "rules": [{"action": "FailJob", "onExitCodes": {"containerName": "a", "operator": "NotIn", "values": [5]}}]
    }
    assert judge(other, 7, "a") == ("FailJob", 0) and judge(other, 5, "a") == ("Count", None)
    assert judge(other, 7, "b") == ("Count", None)  # another container's code


def test_a_jobset_acts_on_the_index_of_its_child_jobs_rule():
    workload = _load("jobset/jobset.yaml")["bloom-zh-pretrain-js"]
    pod, policy = workload["pods"][0], workload["spec"]["failurePolicy"]
    marked = copy.deepcopy(policy)  # which rule acted: each rule's action made its own
    for i, rule in enumerate(marked["rules"]):
        rule["action"] = f"rule-{i}"
    for code, want, rule in ((2, "FailJobSet", 0), (3, "FailJobSet", 0), (75, "RestartJobSet", 1)):
        action, index = judge(pod.policy, code, "train")
        assert action == "FailJob"
        message = failure_message(pod, "train", code, index)
        assert jobset_action(policy, "PodFailurePolicy", message) == want
        assert jobset_action(marked, "PodFailurePolicy", message) == f"rule-{rule}"
    assert judge(pod.policy, 137, "train") == ("Count", None)  # a lost node: backoffLimit 0 is exceeded
    assert jobset_action(policy, "BackoffLimitExceeded", "") == "RestartJobSet"


def test_the_pod_spec_is_not_changed_by_translating_it(tmp_path):
    pod = _no_gpus(_load("jobset/jobset.yaml")["bloom-zh-pretrain-js"]["pods"][1])
    before = copy.deepcopy(pod.spec)
    _args(pod, pod.spec["containers"][0], tmp_path)
    assert pod.spec == before
