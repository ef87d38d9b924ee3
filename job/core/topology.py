"""The launch topology: processes per node, nodes, this node's rank, the rendezvous address; from flags, else the
torchrun/Kubeflow environment, else defaults; and the devices the workers will train on.

Where a launch setting comes from when no flag (or --config file) sets it: torchrun's own PET_* variables, which
Kubeflow's PyTorchJob and TrainJob set in every pod, then an Indexed Job's completion index (JobSet pods have it
too) for the node rank; else the default. The same names torchrun reads, so one pod spec works under every
launcher.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from job.core.config import CoercionError, RunConfig, coerce, field_meta, field_types, flag
from job.core.errors import JobError

TOPOLOGY_ENV = {
    "nproc": ("PET_NPROC_PER_NODE",),
    "nnodes": ("PET_NNODES",),
    "node_rank": ("PET_NODE_RANK", "JOB_COMPLETION_INDEX"),
    "master_addr": ("PET_MASTER_ADDR",),
    "master_port": ("PET_MASTER_PORT",),
}
TOPOLOGY_DEFAULTS = {"nproc": None, "nnodes": 1, "node_rank": 0, "master_addr": "127.0.0.1", "master_port": None}
MULTINODE_PORT = 29500  # every node must agree, so across nodes the port cannot be picked at random


def resolve_topology(cfg: RunConfig, environ: dict[str, str] | None = None) -> tuple[RunConfig, dict[str, str]]:
    """The config with every launch setting filled (flag, else `environ` (default os.environ), else default), and
    where each one came from: "flag" (a flag or the --config file), a variable's name, or "default"."""
    environ = os.environ if environ is None else environ
    sources, values = {}, {}
    for name, variables in TOPOLOGY_ENV.items():
        if getattr(cfg, name) is not None:
            sources[name] = "flag"
            continue
        variable = next((v for v in variables if environ.get(v, "").strip()), None)
        sources[name] = variable or "default"
        values[name] = TOPOLOGY_DEFAULTS[name] if variable is None else _env_value(name, variable, environ[variable])
    _check_rank_below_nodes({**{n: getattr(cfg, n) for n in ("node_rank", "nnodes")}, **values}, sources)
    resolved = dataclasses.replace(cfg, **values)  # validates: node rank below the node count, a real port
    if resolved.master_port is None and resolved.nnodes > 1:
        resolved = dataclasses.replace(resolved, master_port=MULTINODE_PORT)
    return resolved, sources


def _check_rank_below_nodes(values: dict, sources: dict[str, str]) -> None:
    """The node rank below the node count, refused naming each as the user set it (a flag or a variable)."""
    rank, nodes = values["node_rank"], values["nnodes"]
    if rank is None or nodes is None or rank < nodes:
        return
    shown = {name: _as_set(name, values[name], sources[name]) for name in ("node_rank", "nnodes")}
    raise JobError(
        f"{shown['node_rank']} is not below {shown['nnodes']}",
        "node ranks run from 0 to nnodes-1: fix the one set wrong",
    )


def _as_set(name: str, value, source: str) -> str:
    """A launch setting as the user set it: `VARIABLE=value`, `--flag value`, or the default."""
    if source == "flag":
        return f"{flag(name)} {value}"
    if source == "default":
        return f"{flag(name)} {value} (the default)"
    return f"{source}={value}"


def _env_value(name: str, variable: str, text: str) -> int | str | None:
    text = text.strip()
    if name == "nproc" and text in ("auto", "gpu"):
        return None  # torchrun's words for "one process per GPU": our default too
    hint = field_types()[name]
    try:
        value = coerce(text, hint, from_text=True)
    except CoercionError:
        value = None
    whole = text.removeprefix("-").isdigit()  # -1 is a whole number; the bound below refuses it by name
    if value is None or isinstance(value, bool) or (isinstance(value, int) and not whole):
        elastic = " (an elastic range: a ZeRO checkpoint is tied to its world size)" if ":" in text else ""
        raise JobError(
            f"{variable}={text!r} is not a whole number{elastic}", f"set {variable} to one, or pass {flag(name)}"
        )
    bound = field_meta(name)["bound"]
    if bound is not None and not bound[0](value):  # named as the variable it came from, not as a flag
        raise JobError(f"{variable}={text!r} is not {bound[1]}", f"fix {variable}, or pass {flag(name)}")
    return value


def visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def usable_cpus(cgroup: Path = Path("/sys/fs/cgroup")) -> int:
    """The CPUs this process may keep busy: its affinity mask (taskset, a container's cpuset), capped by a cgroup
    CPU quota (a pod's CPU limit, which the mask does not show), rounded down so that no process is throttled."""
    count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota = _cgroup_cpu_limit(cgroup)
    return max(1, min(count, int(quota))) if quota else max(1, count)


def _cgroup_cpu_limit(cgroup: Path) -> float | None:
    """CPUs of quota per period: cgroup v2 `cpu.max` ("max 100000" = none), else v1 `cpu.cfs_quota_us` (-1 = none)."""
    try:
        quota, period = (cgroup / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int((cgroup / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((cgroup / "cpu" / "cpu.cfs_period_us").read_text())
        return quota / period if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None


def processes_per_node(cfg: RunConfig) -> int:
    """`--nproc`, else one per visible GPU, else 1 (CPU)."""
    if cfg.nproc is not None:
        return cfg.nproc
    gpus = visible_gpus()
    return gpus if gpus and cfg.device != "cpu" else 1


def device_type(cfg: RunConfig) -> str:
    """Where the workers train: what the model's patches and the Trainer decide."""
    return "cuda" if cfg.device != "cpu" and visible_gpus() > 0 else "cpu"
