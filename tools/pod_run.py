"""A rendered workload's pods as a kubelet runs them, translated into `podman run` arguments (make cluster-test).

What `podman kube play` does not do, and this adds: it plays Pods and Deployments, not Jobs, JobSets or
TrainJobs, so what their controllers add to a pod (JOB_COMPLETION_INDEX and its annotation, the pod hostnames
and subdomain, Kubeflow's PET_* variables) would have to be written in by hand anyway; and it silently skips
fields it does not know. Here every field of a pod spec is either copied into a flag, or known to have no effect
on one host (scheduling), or refused with one line: a manifest never runs with a setting quietly dropped.

    workloads(docs)            the pods of every Job, JobSet and TrainJob in a rendered kustomize stream
    run_args(pod, container)   the `podman run` arguments of one container of one pod
    judge(policy, code, name)  a Job's podFailurePolicy verdict on a container's exit code (Kubernetes' rules)
    jobset_action(...)         a JobSet failurePolicy's action on a child Job that failed by a FailJob rule
"""

from __future__ import annotations

import copy
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"
TRAINER_PORT = 29500  # Kubeflow Trainer's ContainerTrainerPort: PET_MASTER_PORT of its torch plugin


class Refused(ValueError):
    """A field this runner cannot honour: one line naming it."""


# Pod fields. Honoured ones are copied below; scheduling ones choose a node, and one host has no choice to make.
POD_HONOURED = {
    "initContainers", "containers", "volumes", "securityContext", "hostname", "subdomain", "restartPolicy",
    "terminationGracePeriodSeconds", "automountServiceAccountToken", "enableServiceLinks",
}  # fmt: skip
POD_SCHEDULING = {"tolerations", "nodeSelector", "priorityClassName", "affinity"}
POD_SECURITY = {"runAsNonRoot", "runAsUser", "runAsGroup", "fsGroup", "fsGroupChangePolicy", "seccompProfile"}
CONTAINER = {
    "name", "image", "imagePullPolicy", "command", "args", "workingDir", "env", "envFrom", "resources",
    "securityContext", "volumeMounts", "ports", "terminationMessagePolicy",
}  # fmt: skip
CONTAINER_SECURITY = {
    "allowPrivilegeEscalation", "readOnlyRootFilesystem", "capabilities", "runAsUser", "runAsGroup", "runAsNonRoot",
}  # fmt: skip
MOUNT = {"name", "mountPath", "readOnly"}
LIMITS = {"cpu", "memory"}


def _only(mapping: dict, known: set[str], where: str) -> None:
    for key in mapping:
        if key not in known:
            raise Refused(f"{where}.{key}: not honoured by tools/pod_run.py (add it there, with a test, or drop it)")


@dataclass
class Pod:
    """One pod as its controller creates it: its name (= hostname), the template's spec, and what the controller
    adds (annotations, environment appended to every container)."""

    name: str
    spec: dict
    policy: dict | None = None  # the owning Job's podFailurePolicy
    annotations: dict[str, str] = field(default_factory=dict)
    env: list[dict] = field(default_factory=list)

    @property
    def hostname(self) -> str:
        return self.spec.get("hostname", self.name)

    @property
    def fqdn(self) -> str | None:
        sub = self.spec.get("subdomain")
        return f"{self.hostname}.{sub}" if sub else None


def _indexed_pods(prefix: str, job_spec: dict, subdomain: str | None, extra_env=()) -> list[Pod]:
    if job_spec.get("completionMode") != "Indexed":
        return [Pod(prefix, copy.deepcopy(job_spec["template"]["spec"]), job_spec.get("podFailurePolicy"))]
    pods = []
    for index in range(int(job_spec["completions"])):
        spec = copy.deepcopy(job_spec["template"]["spec"])
        if subdomain:
            spec["subdomain"] = subdomain
        env = [{"name": "JOB_COMPLETION_INDEX", "value": str(index)}, *extra_env]
        pods.append(
            Pod(f"{prefix}-{index}", spec, job_spec.get("podFailurePolicy"), {COMPLETION_INDEX: str(index)}, env)
        )
    return pods


def workloads(docs: list[dict]) -> dict[str, dict]:
    """{workload name: {"kind", "pods": [Pod], "spec"}} for every Job, JobSet and TrainJob (on its
    TrainingRuntime) in a rendered stream. Pod names and hostnames are the controllers': an Indexed Job's pod i
    is <job>-<i>; a JobSet's is <jobset>-<replicatedJob>-<jobIndex>-<podIndex> in subdomain <jobset>."""
    runtimes = {d["metadata"]["name"]: d for d in docs if d.get("kind") == "TrainingRuntime"}
    found = {}
    for doc in docs:
        kind, name = doc.get("kind"), doc.get("metadata", {}).get("name")
        if kind == "Job":
            found[name] = {"kind": kind, "spec": doc["spec"], "pods": _indexed_pods(name, doc["spec"], None)}
        elif kind == "JobSet":
            found[name] = {"kind": kind, "spec": doc["spec"], "pods": _jobset_pods(name, doc["spec"])}
        elif kind == "TrainJob":
            runtime = runtimes[doc["spec"]["runtimeRef"]["name"]]
            jobset = _trainjob_jobset(name, doc["spec"]["trainer"], runtime["spec"])
            found[name] = {"kind": kind, "spec": jobset, "pods": _jobset_pods(name, jobset)}
    return found


def _jobset_pods(name: str, spec: dict) -> list[Pod]:
    network = spec.get("network", {})
    subdomain = network.get("subdomain", name) if network.get("enableDNSHostnames") else None
    pods = []
    for rjob in spec["replicatedJobs"]:
        for job_index in range(int(rjob.get("replicas", 1))):
            pods += _indexed_pods(f"{name}-{rjob['name']}-{job_index}", rjob["template"]["spec"], subdomain)
    return pods


def _trainjob_jobset(name: str, trainer: dict, runtime: dict) -> dict:
    """The JobSet Kubeflow Trainer makes of a TrainJob on a torch runtime: the trainer's image, command, args and
    resources on container `node`, numNodes pods, the torch plugin's PET_* variables, DNS hostnames on."""
    _only(trainer, {"image", "command", "args", "env", "numNodes", "numProcPerNode", "resourcesPerNode"}, "trainer")
    jobset = copy.deepcopy(runtime["template"]["spec"])
    jobset.setdefault("network", {})["enableDNSHostnames"] = True
    nodes = int(trainer.get("numNodes", runtime.get("mlPolicy", {}).get("numNodes", 1)))
    for rjob in jobset["replicatedJobs"]:
        if rjob["name"] != "node":
            continue
        job = rjob["template"]["spec"]
        job.update(completionMode="Indexed", completions=nodes, parallelism=nodes)
        for container in job["template"]["spec"]["containers"]:
            if container["name"] != "node":
                continue
            for key in ("image", "command", "args"):
                if key in trainer:
                    container[key] = trainer[key]
            if "resourcesPerNode" in trainer:
                container["resources"] = trainer["resourcesPerNode"]
            index = {"fieldRef": {"fieldPath": f"metadata.annotations['{COMPLETION_INDEX}']"}}
            container["env"] = [
                *trainer.get("env", []),
                {"name": "PET_NNODES", "value": str(nodes)},
                {"name": "PET_NPROC_PER_NODE", "value": str(trainer.get("numProcPerNode", "auto"))},
                {"name": "PET_NODE_RANK", "valueFrom": index},
                {"name": "PET_MASTER_ADDR", "value": f"{name}-node-0-0.{name}"},
                {"name": "PET_MASTER_PORT", "value": str(TRAINER_PORT)},
                *container.get("env", []),
            ]
    return jobset


def _expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion: a defined variable is replaced, $$ is a literal $, the rest stays as written."""
    return re.sub(
        r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)", lambda m: "$" if m[0] == "$$" else env.get(m[1], m[0]), text
    )


def container_env(pod: Pod, container: dict) -> dict[str, str]:
    """The container's environment in order: the controller's, then its own (expanded against those before it)."""
    env: dict[str, str] = {}
    for var in [*pod.env, *container.get("env", [])]:
        _only(var, {"name", "value", "valueFrom"}, f"{container['name']}.env")
        if "valueFrom" in var:
            env[var["name"]] = _field_ref(pod, var["valueFrom"], f"{container['name']}.env.{var['name']}")
        else:
            env[var["name"]] = _expand(str(var.get("value", "")), env)
    for source in container.get("envFrom", []):
        _only(source, {"secretRef"}, f"{container['name']}.envFrom")
        if not source["secretRef"].get("optional"):
            raise Refused(f"{container['name']}.envFrom: a required Secret; none exists on this host")
        # optional, and no Secret exists here: the kubelet adds nothing either
    return env


def _field_ref(pod: Pod, source: dict, where: str) -> str:
    _only(source, {"fieldRef"}, where)
    path = source["fieldRef"]["fieldPath"]
    annotation = re.fullmatch(r"metadata\.annotations\['([^']+)'\]", path)
    if annotation and annotation[1] in pod.annotations:
        return pod.annotations[annotation[1]]
    if path == "metadata.name":
        return pod.name
    raise Refused(f"{where}: fieldRef {path} has no value in this runner")


def _quantity(text: str) -> str:
    """A Kubernetes memory quantity as podman takes it (bytes)."""
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
    match = re.fullmatch(r"(\d+)([KMGT]i?|k)?", str(text))
    if not match:
        raise Refused(f"quantity {text!r}: not a whole number with a unit")
    return str(int(match[1]) * units.get(match[2] or "", 1))


def _cpus(text: str) -> str:
    text = str(text)
    return str(int(text[:-1]) / 1000) if text.endswith("m") else text


def run_args(pod: Pod, container: dict, *, image: str, claims: Path, scratch: Path, network: str | None) -> list[str]:
    """`podman run` arguments (after `run`) for one container of `pod`, image and command included.

    claims: host folder holding one folder per PersistentVolumeClaim name (shared by every pod, as a
    ReadWriteMany claim is); scratch: this pod's folder for its emptyDir volumes (shared by its containers).
    """
    spec = pod.spec
    _only(spec, POD_HONOURED | POD_SCHEDULING, "spec")
    where = container["name"]
    _only(container, CONTAINER, where)
    if spec.get("restartPolicy", "Always") != "Never":
        raise Refused("spec.restartPolicy: only Never (every retry a new pod, which the caller starts)")
    if spec.get("automountServiceAccountToken", True):
        raise Refused("spec.automountServiceAccountToken: only false (no API server here, so no token to mount)")
    # enableServiceLinks: the workloads' Services are headless, which get no link variables; the API server's
    # KUBERNETES_* ones are left out (no API server here), so true and false run alike.
    pod_security = spec.get("securityContext", {})
    _only(pod_security, POD_SECURITY, "spec.securityContext")
    if pod_security.get("seccompProfile", {"type": "RuntimeDefault"}) != {"type": "RuntimeDefault"}:
        raise Refused("spec.securityContext.seccompProfile: only RuntimeDefault (podman's default profile)")
    security = container.get("securityContext", {})
    _only(security, CONTAINER_SECURITY, f"{where}.securityContext")
    user = {**pod_security, **security}
    uid, gid = user.get("runAsUser"), user.get("runAsGroup")
    if uid is None or gid is None:
        raise Refused(f"{where}: runAsUser and runAsGroup must be set (the image's user is not read here)")
    if user.get("runAsNonRoot") and uid == 0:
        raise Refused(f"{where}: runAsNonRoot with runAsUser 0: the kubelet refuses to start it")
    args = [
        "--name", f"{pod.name}-{where}", "--hostname", pod.hostname, "--pull", "never",
        "--user", f"{uid}:{gid}", "--stop-timeout", str(spec.get("terminationGracePeriodSeconds", 30)),
    ]  # fmt: skip
    args += ["--network", network or "none"]
    if network:
        args += ["--network-alias", pod.hostname] + (["--network-alias", pod.fqdn] if pod.fqdn else [])
    if "fsGroup" in pod_security:
        args += ["--group-add", str(pod_security["fsGroup"])]
    if security.get("allowPrivilegeEscalation") is False:
        args += ["--security-opt", "no-new-privileges"]
    if security.get("readOnlyRootFilesystem"):
        args += ["--read-only", "--read-only-tmpfs=false"]  # no tmpfs of podman's own: only the pod's volumes
    capabilities = security.get("capabilities", {})
    _only(capabilities, {"drop", "add"}, f"{where}.securityContext.capabilities")
    args += [f"--cap-drop={c}" for c in capabilities.get("drop", [])]
    args += [f"--cap-add={c}" for c in capabilities.get("add", [])]
    resources = container.get("resources", {})
    _only(resources, {"requests", "limits"}, f"{where}.resources")  # requests: scheduling only
    for name, value in resources.get("limits", {}).items():
        if name not in LIMITS:
            raise Refused(f"{where}.resources.limits.{name}: no such device on this host (the CI overlay removes it)")
        args += ["--cpus", _cpus(value)] if name == "cpu" else ["--memory", _quantity(value)]
    args += _mounts(spec, container, claims, scratch)
    if "workingDir" in container:
        args += ["--workdir", container["workingDir"]]
    env = container_env(pod, container)
    for name, value in env.items():
        args += ["--env", f"{name}={value}"]
    if "command" in container:  # replaces the image's entrypoint, as in Kubernetes
        args += ["--entrypoint", json.dumps([_expand(c, env) for c in container["command"]])]
    return [*args, image, *[_expand(a, env) for a in container.get("args", [])]]


def _mounts(spec: dict, container: dict, claims: Path, scratch: Path) -> list[str]:
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    args = []
    for mount in container.get("volumeMounts", []):
        _only(mount, MOUNT, f"{container['name']}.volumeMounts")
        volume = volumes[mount["name"]]
        _only(volume, {"name", "persistentVolumeClaim", "emptyDir"}, f"spec.volumes.{volume['name']}")
        ro = ":ro" if mount.get("readOnly") else ""
        if "persistentVolumeClaim" in volume:
            host = claims / volume["persistentVolumeClaim"]["claimName"]
            args += ["-v", f"{host}:{mount['mountPath']}{ro}"]
            continue
        empty = volume["emptyDir"] or {}
        _only(empty, {"medium", "sizeLimit"}, f"spec.volumes.{volume['name']}.emptyDir")
        if empty.get("medium") == "Memory":
            size = _quantity(empty.get("sizeLimit", "64Mi"))
            if mount["mountPath"] == "/dev/shm":
                args += ["--shm-size", f"{size}b"]
            else:
                args += ["--tmpfs", f"{mount['mountPath']}:rw,size={size},mode=1777"]
        elif empty.get("medium", "") == "":
            args += ["-v", f"{scratch / volume['name']}:{mount['mountPath']}{ro}"]
        else:
            raise Refused(f"spec.volumes.{volume['name']}.emptyDir.medium {empty['medium']!r}: only Memory or disk")
    return args


def host_folders(pod: Pod, claims: Path, scratch: Path) -> list[Path]:
    """The host folders `run_args` mounts, as the kubelet prepares them: an emptyDir world-writable (0777), a
    claim owned by the pod's fsGroup with the setgid bit (what fsGroup does to a volume that supports it)."""
    made = []
    fs_group = pod.spec.get("securityContext", {}).get("fsGroup")
    for volume in pod.spec.get("volumes", []):
        if "persistentVolumeClaim" in volume:
            path, mode = claims / volume["persistentVolumeClaim"]["claimName"], 0o2775
        elif (volume.get("emptyDir") or {}).get("medium", "") == "":
            path, mode = scratch / volume["name"], 0o777
        else:
            continue
        path.mkdir(parents=True, exist_ok=True)
        if fs_group is not None and "persistentVolumeClaim" in volume:
            os.chown(path, -1, int(fs_group))
        path.chmod(mode)
        made.append(path)
    return made


def judge(policy: dict | None, exit_code: int, container: str, disrupted: bool = False) -> tuple[str, int | None]:
    """Kubernetes' podFailurePolicy on a failed pod: (action, index of the first matching rule), or ("Count",
    None) when no rule matches (the pod counts against backoffLimit). Exit 0 is ("Succeeded", None)."""
    if exit_code == 0 and not disrupted:
        return "Succeeded", None
    for index, rule in enumerate((policy or {}).get("rules", [])):
        codes = rule.get("onExitCodes")
        if codes and exit_code != 0 and codes.get("containerName", container) == container:
            inside = exit_code in codes["values"]
            if inside == (codes["operator"] == "In"):
                return rule["action"], index
        for condition in rule.get("onPodConditions", []):
            if disrupted and condition["type"] == "DisruptionTarget" and condition.get("status", "True") == "True":
                return rule["action"], index
    return "Count", None


def failure_message(pod: Pod, container: str, exit_code: int, index: int) -> str:
    """The child Job's failure message for a FailJob rule, as the Job controller writes it."""
    return (
        f"Container {container} for pod default/{pod.name} failed with exit code {exit_code} "
        f"matching FailJob rule at index {index}"
    )


def jobset_action(failure_policy: dict | None, reason: str, message: str) -> str:
    """A JobSet failurePolicy's action on a child Job that failed with (reason, message): the first rule whose
    reasons and message patterns match, else RestartJobSet (counted against maxRestarts)."""
    for rule in (failure_policy or {}).get("rules", []):
        reasons = rule.get("onJobFailureReasons")
        patterns = rule.get("onJobFailureMessagePatterns")
        if reasons and reason not in reasons:
            continue
        if patterns and not any(re.search(p, message) for p in patterns):
            continue
        return rule["action"]
    return "RestartJobSet"
