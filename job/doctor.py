"""Preflight: everything that would otherwise fail an hour into a run, checked in seconds.

`train` runs these checks and stops at the first failure (one line, exit 2, nothing written);
`doctor` runs them all and prints a table.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from job.config import RunConfig, cache_root
from job.errors import JobError

# Fields a resumed run may change without becoming a different run.
RESUMABLE_FIELDS = {
    "nproc",
    "nnodes",
    "node_rank",
    "master_addr",
    "master_port",
    "resume",
    "save_steps",
    "save_total_limit",
    "logging_steps",
    "eval_steps",
    "eval_batches",
    "dataloader_workers",
    "report_to",
    "shutdown_timeout_s",
    "max_steps",
    "epochs",
    "num_proc",
    "prepared",
    "device",
    "max_nonfinite_steps",
    "prompts",
}
BYTES_PER_PARAMETER_CHECKPOINT = 16  # 16-bit weights + fp32 master, Adam m and v (ZeRO layout, with margin)


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""


def visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def processes_per_node(cfg: RunConfig) -> int:
    """`--nproc`, else one per visible GPU, else 1 (CPU)."""
    gpus = visible_gpus()
    if cfg.nproc is not None:
        return cfg.nproc
    return gpus if gpus and cfg.device != "cpu" else 1


def check_devices(cfg: RunConfig) -> Check:
    gpus, nproc = visible_gpus(), processes_per_node(cfg)
    wants_gpu = cfg.device == "cuda" or (cfg.device == "auto" and gpus > 0)
    if wants_gpu and nproc > gpus:
        return Check(
            "devices",
            False,
            f"--nproc {nproc} is above the {gpus} GPU(s) visible",
            f"use --nproc {gpus} or fewer (or --device cpu)" if gpus else "run where GPUs are visible",
        )
    where = f"{gpus} GPU(s)" if wants_gpu else "CPU (gloo)"
    return Check("devices", True, f"{nproc} process(es) per node x {cfg.nnodes} node(s) on {where}")


def check_deepspeed(cfg: RunConfig) -> Check:
    if not cfg.uses_deepspeed:
        return Check("deepspeed", True, "off (--deepspeed none): plain DDP")
    stage = cfg.zero_stage_in_use()  # raises JobError on a bad file
    cfg.check_batch_arithmetic(processes_per_node(cfg) * cfg.nnodes)
    world = processes_per_node(cfg) * cfg.nnodes
    return Check(
        "deepspeed",
        True,
        f"ZeRO-{stage}; global batch {cfg.per_device_batch_size} x {cfg.grad_accum} "
        f"x {world} = {cfg.per_device_batch_size * cfg.grad_accum * world} rows",
    )


def check_output(cfg: RunConfig) -> Check:
    """The output folder must be creatable, and if it holds a run it must be this one, resumed."""
    output = Path(cfg.output_dir)
    existing = output
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        return Check("output", False, f"cannot create {output}: {existing} is a file", "choose another --output-dir")
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".job-write-test-"):
            pass
    except OSError as e:
        return Check("output", False, f"{existing} is not writable ({e.strerror})", "choose a writable --output-dir")
    previous = output / "run_config.json"
    if previous.exists():
        if cfg.resume == "never":
            return Check(
                "output",
                False,
                f"{output} already holds a run",
                "use --resume auto to continue it, or another --output-dir",
            )
        try:
            old = json.loads(previous.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            old = {}
        changed = sorted(
            k
            for k, v in cfg.to_dict().items()
            if k not in RESUMABLE_FIELDS and k in old and old[k] != v and k != "tokenizer"
        )
        batch = _global_batch_on_resume(cfg, old)
        if batch is not None:
            if not batch.ok:
                return batch
            changed = [k for k in changed if k != "grad_accum"]  # another process count, the same global batch
        if changed:
            return Check(
                "output",
                False,
                f"{output} holds a different run (changed: {', '.join(changed)})",
                "use another --output-dir, or the same settings to resume",
            )
        return Check("output", True, f"{output} holds this run: it will resume")
    return Check("output", True, f"{output} (new)")


def _global_batch_on_resume(cfg: RunConfig, old: dict) -> Check | None:
    """Resuming on another number of processes (elastic) keeps the global batch, or the curve would not continue.

    DDP checkpoints load at any world size; a ZeRO one is converted to DeepSpeed's universal checkpoint at
    launch. `--grad-accum` may change on resume only to keep per-device batch x accumulation x processes.
    """
    from job import checkpoints

    last = checkpoints.latest_complete(Path(cfg.output_dir)) if cfg.resume == "auto" else None
    if cfg.resume not in ("auto", "never"):
        last = Path(cfg.resume)
    written_by = checkpoints.world_size(last) if last else None
    if written_by is None or "grad_accum" not in old or "per_device_batch_size" not in old:
        return None
    world = processes_per_node(cfg) * cfg.nnodes
    before = old["per_device_batch_size"] * old["grad_accum"] * written_by
    now = cfg.per_device_batch_size * cfg.grad_accum * world
    if before == now:
        return Check("output", True, f"resumes {last.name} on {world} process(es), global batch {now} rows")
    per_step = cfg.per_device_batch_size * world
    fix = (
        f"pass --grad-accum {before // per_step} to keep it"
        if before % per_step == 0
        else f"use a process count that divides {before // cfg.per_device_batch_size} batches"
    )
    return Check(
        "output",
        False,
        f"{last} was trained with a global batch of {before} rows ({old['per_device_batch_size']} x "
        f"{old['grad_accum']} x {written_by} processes); this run's would be {now}",
        fix,
    )


def check_disk(cfg: RunConfig, parameters: int | None) -> Check:
    output = Path(cfg.output_dir)
    existing = next(p for p in [output, *output.parents] if p.exists())
    free = shutil.disk_usage(existing).free
    if parameters is None:
        return Check("disk", True, f"{free / 2**30:.1f} GiB free (model size unknown)")
    need = parameters * BYTES_PER_PARAMETER_CHECKPOINT * 2  # a new checkpoint while the last one still exists
    if free < need:
        return Check(
            "disk",
            False,
            f"{free / 2**30:.1f} GiB free at {existing}, a checkpoint needs about {need / 2**30:.1f} GiB",
            "free space or choose another --output-dir",
        )
    return Check("disk", True, f"{free / 2**30:.1f} GiB free, ~{need / 2**30:.1f} GiB needed per checkpoint pair")


def resolve_master_port(cfg: RunConfig) -> int:
    """The rendezvous port: as given; else any free port on one node, else 29500 (every node must agree)."""
    if cfg.master_port is not None:
        return cfg.master_port
    if cfg.nnodes > 1:
        return 29500
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def check_port(cfg: RunConfig) -> Check:
    if cfg.master_port is None and cfg.nnodes == 1:
        return Check("master port", True, "a free port is chosen at launch")
    port = resolve_master_port(cfg)
    if cfg.node_rank != 0:
        return Check("master port", True, f"node {cfg.node_rank} connects to {cfg.master_addr}:{port}")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # As torch's TCPStore does: a port left in TIME_WAIT by a killed run is free; a listening one is not.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("", port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                return Check(
                    "master port",
                    False,
                    f"port {port} is already in use",
                    "pass another --master-port (or stop the process holding it)",
                )
            raise
    return Check("master port", True, f"{port} free")


def check_shm() -> Check:
    if not Path("/dev/shm").exists():
        return Check("/dev/shm", True, "absent (not Linux?)")
    size = shutil.disk_usage("/dev/shm").total
    ok = size >= 1 * 2**30
    return Check(
        "/dev/shm",
        ok,
        f"{size / 2**30:.1f} GiB",
        "" if ok else "mount a larger /dev/shm (docker --shm-size 16g; k8s emptyDir medium: Memory)",
    )


def check_cache() -> Check:
    for name, path in (
        ("JOB_CACHE", cache_root()),
        ("HF_HOME", Path(os.environ.get("HF_HOME", "~/.cache/huggingface")).expanduser()),
    ):
        existing = next(p for p in [path, *path.parents] if p.exists())
        if not os.access(existing, os.W_OK):
            return Check("caches", False, f"{name}={path} is not writable", f"set {name} to a writable folder")
    return Check("caches", True, f"JOB_CACHE={cache_root()}")


def model_parameters(cfg: RunConfig, vocab: int | None) -> int | None:
    """Parameter estimate from the model's config (or the preset) without building it."""
    from job.model import config_parameter_count, model_config

    return config_parameter_count(model_config(cfg, vocab))


def run_checks(cfg: RunConfig, extra: list[Callable[[], Check]] | None = None) -> list[Check]:
    """Every check, errors turned into failed rows (for `doctor`)."""
    results = []
    for fn in [
        lambda: check_devices(cfg),
        lambda: check_deepspeed(cfg),
        lambda: check_output(cfg),
        lambda: check_port(cfg),
        check_shm,
        check_cache,
        *(extra or []),
    ]:
        try:
            results.append(fn())
        except JobError as e:
            results.append(Check(getattr(fn, "__name__", "check"), False, e.cause, e.fix or ""))
    return results


def require(check: Check) -> None:
    """For `train`: stop on a failed check."""
    if not check.ok:
        raise JobError(f"{check.name}: {check.detail}", check.fix or None)


def format_table(results: list[Check]) -> str:
    width = max(len(r.name) for r in results)
    lines = [
        f"{'ok ' if r.ok else 'FAIL'} {r.name:<{width}}  {r.detail}" + (f"  -> {r.fix}" if not r.ok and r.fix else "")
        for r in results
    ]
    return "\n".join(lines)
