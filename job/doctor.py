"""Preflight: everything that would otherwise fail an hour into a run, checked in seconds.

One list, `CHECKS`, in order. `train` runs it and stops at the first failure (one line, exit 2, nothing
written); `doctor` runs all of it and prints a table. A check reads the config and what earlier checks found
(`Preflight`: the corpus, the tokenizer, the model's config) and returns a `Check` row or raises `JobError`.
To add a check, write `def check_x(p: Preflight) -> Check` and put it in `CHECKS`.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import socket
import struct
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from job import checkpoints
from job.config import RunConfig, cache_root, comparable, resumable_fields
from job.errors import JobError

BYTES_PER_PARAMETER_CHECKPOINT = 16  # 16-bit weights + fp32 master, Adam m and v (ZeRO layout, with margin)
INPUTS_FILE = "inputs.json"  # fingerprints of what the run trains on, compared when it resumes


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""


@dataclass
class Preflight:
    """The config, and what the checks found on the way (handed on to the steps after them)."""

    cfg: RunConfig
    corpus: Any = None  # job.corpus.Corpus, unless --prepared
    prepared_key: dict | None = None  # --prepared: its prepare_key.json
    tokenizer: Any = None
    model_config: Any = None
    fingerprints: dict[str, Any] = field(default_factory=dict)
    launch: str = ""  # the launch settings and their sources (check_launch)


def visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def processes_per_node(cfg: RunConfig) -> int:
    """`--nproc`, else one per visible GPU, else 1 (CPU)."""
    gpus = visible_gpus()
    if cfg.nproc is not None:
        return cfg.nproc
    return gpus if gpus and cfg.device != "cpu" else 1


def device_type(cfg: RunConfig) -> str:
    """Where the workers train: what `build_model` and the Trainer decide."""
    return "cuda" if cfg.device != "cpu" and visible_gpus() > 0 else "cpu"


# ------------------------------------------------------------------------------------------------- settings
def check_settings(p: Preflight) -> Check:
    """What transformers itself would refuse in the worker: TrainingArguments (scheduler, --training-arg) and
    the reporting integrations."""
    from accelerate.state import PartialState
    from transformers import TrainingArguments
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    from job.train import extra_training_arguments, run_training_arguments

    cfg = p.cfg
    reporters = [r.strip() for r in cfg.report_to.split(",")]
    unknown = [r for r in reporters if r not in (*INTEGRATION_TO_CALLBACK, "none", "all")]
    if unknown:
        raise JobError(
            f"--report-to {', '.join(unknown)} is not a reporting integration",
            f"use none or some of: {', '.join(INTEGRATION_TO_CALLBACK)}",
        )
    # use_cpu: no CUDA context in the launcher; the accelerate state this builds is dropped after
    owned = run_training_arguments(cfg, use_cpu=True)
    extra = extra_training_arguments(cfg, owned)
    try:
        TrainingArguments(**{**owned, "output_dir": tempfile.gettempdir()}, **extra)  # writes nothing
    except (ValueError, TypeError) as e:
        raise JobError(
            f"transformers refuses these training settings: {str(e).splitlines()[0][:300]}",
            "fix the named setting (see `python -m job train --help`)",
        ) from None
    finally:
        PartialState._reset_state()
    return Check("settings", True, f"schedule {cfg.lr_scheduler}, report to {cfg.report_to}, {len(extra)} extra")


# ------------------------------------------------------------------------------------------------- devices
def check_devices(p: Preflight) -> Check:
    from job.attention import resolve_attention

    cfg = p.cfg
    gpus, nproc = visible_gpus(), processes_per_node(cfg)
    wants_gpu = cfg.device == "cuda" or (cfg.device == "auto" and gpus > 0)
    if wants_gpu and nproc > gpus:
        return Check(
            "devices",
            False,
            f"--nproc {nproc} is above the {gpus} GPU(s) visible",
            f"use --nproc {gpus} or fewer (or --device cpu)" if gpus else "run where GPUs are visible",
        )
    attention = resolve_attention(cfg.attention, device_type(cfg))  # flex on a CPU: refused here
    where = f"{gpus} GPU(s)" if wants_gpu else "CPU (gloo)"
    return Check("devices", True, f"{nproc} process(es) per node x {cfg.nnodes} node(s) on {where}, {attention}")


def check_deepspeed(p: Preflight) -> Check:
    from job.deepspeed_config import check_batch_arithmetic, check_optimizer_blocks, zero_stage_in_use

    cfg = p.cfg
    if not cfg.uses_deepspeed:
        return Check("deepspeed", True, "off (--deepspeed none): plain DDP")
    stage = zero_stage_in_use(cfg)  # raises JobError on a bad file
    world = processes_per_node(cfg) * cfg.nnodes
    check_batch_arithmetic(cfg, world)
    check_optimizer_blocks(cfg)
    return Check(
        "deepspeed",
        True,
        f"ZeRO-{stage}; global batch {cfg.per_device_batch_size} x {cfg.grad_accum} "
        f"x {world} = {cfg.per_device_batch_size * cfg.grad_accum * world} rows",
    )


# ------------------------------------------------------------------------------------------------- output
def has_run_state(output: Path) -> bool:
    """A run left something to resume or keep: a complete checkpoint or an export."""
    return checkpoints.latest_complete(output) is not None or (output / "final").is_dir()


def check_output(p: Preflight) -> Check:
    """The output folder must be creatable, ours or new, and if it holds a run it must be this one, resumed."""
    cfg = p.cfg
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
    if not previous.exists():
        # (a volume's root holds lost+found: the file system's, never touched by a run; the lock file is ours, left
        # by a start that stopped before writing run_config.json)
        ours = {"lost+found", checkpoints.LOCK_FILE}
        others = sorted(p.name for p in output.iterdir() if p.name not in ours) if output.is_dir() else []
        if others:  # someone else's folder: the job deletes only what it wrote
            shown = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
            return Check(
                "output",
                False,
                f"{output} is not empty ({shown}) and holds no run of this job (no run_config.json)",
                "choose a new or empty --output-dir",
            )
        return Check("output", True, f"{output} (new)")
    if not has_run_state(output):  # a start that failed before its first checkpoint: begin again
        return Check("output", True, f"{output} holds no checkpoint yet: the run starts afresh")
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
    resumable = resumable_fields()
    changed = sorted(
        k
        for k, v in cfg.to_dict().items()
        if k not in resumable and k in old and comparable(k, old[k]) != comparable(k, v)
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


def _global_batch_on_resume(cfg: RunConfig, old: dict) -> Check | None:
    """Resuming on another number of processes (elastic) keeps the global batch, or the curve would not continue.

    DDP checkpoints load at any world size; a ZeRO one is converted to DeepSpeed's universal checkpoint at
    launch. `--grad-accum` may change on resume only to keep per-device batch x accumulation x processes.
    """
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


def check_launch(p: Preflight) -> Check:
    """Fill the launch settings no flag set from the torchrun/Kubeflow environment; show where each came from."""
    from job.launch import resolve_topology

    row = check_topology(p.cfg, resolve_topology(p.cfg))
    p.launch = row.detail
    return row


def check_topology(cfg: RunConfig, sources: dict[str, str]) -> Check:
    """The launch settings and where each came from (flag, environment variable or default): under an
    operator (PyTorchJob, TrainJob, JobSet) this shows which of its variables the run picked up."""
    nproc = processes_per_node(cfg)
    shown = {**{name: getattr(cfg, name) for name in sources}, "nproc": nproc}
    if cfg.master_port is None:
        shown["master_port"] = "any (torchrun --standalone)"
    return Check("launch", True, ", ".join(f"{k}={v} ({sources[k]})" for k, v in shown.items()))


def check_port(p: Preflight) -> Check:
    """The rendezvous port on the node that hosts it (after check_launch resolved the settings)."""
    cfg = p.cfg
    if cfg.master_port is None:
        return Check("master port", True, "torchrun binds a free one (--standalone)")
    port = cfg.master_port
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


def check_shm(p: Preflight) -> Check:
    if not Path("/dev/shm").exists():
        return Check("/dev/shm", True, "absent (not Linux?)")
    size = shutil.disk_usage("/dev/shm").total
    # NCCL and GPU data loaders need it; a CPU run (gloo) does with the container's default
    ok = size >= 1 * 2**30 or device_type(p.cfg) == "cpu"
    return Check(
        "/dev/shm",
        ok,
        f"{size / 2**30:.1f} GiB",
        "" if ok else "mount a larger /dev/shm (docker --shm-size 16g; k8s emptyDir medium: Memory)",
    )


def check_cache(p: Preflight) -> Check:
    for name, path in (
        ("JOB_CACHE", cache_root()),
        ("HF_HOME", Path(os.environ.get("HF_HOME", "~/.cache/huggingface")).expanduser()),
    ):
        existing = next(q for q in [path, *path.parents] if q.exists())
        if not os.access(existing, os.W_OK):
            return Check("caches", False, f"{name}={path} is not writable", f"set {name} to a writable folder")
    return Check("caches", True, f"JOB_CACHE={cache_root()}")


# ------------------------------------------------------------------------------------------------- inputs
def check_data(p: Preflight) -> Check:
    from job.corpus import load_corpus
    from job.prepare import read_prepared_key, read_prepared_stats

    cfg = p.cfg
    if cfg.prepared:
        stats = read_prepared_stats(cfg.prepared)
        p.prepared_key = read_prepared_key(cfg.prepared)
        return Check("data", True, f"prepared: {stats['rows']} rows of <= {stats['max_length']} tokens")
    p.corpus = load_corpus(cfg.data, cfg.text_column, cfg.max_samples)
    return Check("data", True, f"{p.corpus.name}: {len(p.corpus.rows)} documents, column {cfg.text_column!r}")


def check_tokenizer(p: Preflight) -> Check:
    from job.tokenizer import resolve_tokenizer

    cfg = p.cfg
    p.tokenizer = tok = resolve_tokenizer(cfg.tokenizer, cfg.model, cfg.vocab_size, cfg.trust_remote_code)
    return Check("tokenizer", True, f"{len(tok)} tokens, eos {tok.eos_token_id}, pad {tok.pad_token_id}")


def check_model(p: Preflight) -> Check:
    from job.model import config_parameter_count, model_config

    cfg = p.cfg
    p.model_config = config = model_config(cfg, len(p.tokenizer) if p.tokenizer else None)
    if cfg.model:
        check_weights(Path(cfg.model))
    source = cfg.model or f"preset {cfg.preset} (random init)"
    return Check("model", True, f"{source}: {config_parameter_count(config) / 1e6:.1f}M parameters")


def check_inputs(p: Preflight) -> Check:
    """Fingerprint what the run trains on; `--prepared` data and a resumed run must match it."""
    from job.tokenizer import tokenizer_fingerprint

    cfg = p.cfg
    if p.tokenizer is None:
        return Check("inputs", True, "not checked: needs a loadable tokenizer")
    tokenizer = tokenizer_fingerprint(p.tokenizer)
    if p.prepared_key is not None:
        check_prepared_tokenizer(cfg.prepared, p.prepared_key, tokenizer)
    key = p.prepared_key or {"corpus": p.corpus.fingerprint if p.corpus else None}
    p.fingerprints = {
        "tokenizer": tokenizer,
        "data": key["corpus"],
        "model": model_fingerprint(Path(cfg.model)) if cfg.model else None,
        "preset": None if cfg.model else cfg.preset,
        "max_length": key.get("max_length", cfg.max_length),
        "packing": key.get("packing", cfg.packing),
    }
    output = Path(cfg.output_dir)
    recorded = output / INPUTS_FILE
    if cfg.resume != "never" and recorded.exists() and has_run_state(output):
        old = json.loads(recorded.read_text(encoding="utf-8"))
        changed = sorted(k for k, v in p.fingerprints.items() if k in old and old[k] != v)
        if changed:
            raise JobError(
                f"{output} was trained on other inputs (changed: {', '.join(changed)})",
                "resume with the same tokenizer, data and model, or use another --output-dir",
            )
        return Check("inputs", True, "the same tokenizer, data and model as the run being resumed")
    return Check("inputs", True, f"tokenizer {tokenizer}, data {p.fingerprints['data']}")


def check_prepared_tokenizer(prepared: str, key: dict, tokenizer: str) -> None:
    if key.get("tokenizer") != tokenizer:
        raise JobError(
            f"{prepared} was prepared with another tokenizer (fingerprint {key.get('tokenizer')}, this one's is "
            f"{tokenizer}): changed: tokenizer",
            "prepare the data again with this tokenizer, or pass the tokenizer it was prepared with",
        )


def check_resume(p: Preflight) -> Check:
    """`--resume FOLDER` must be a Trainer checkpoint of a model of this shape."""
    cfg = p.cfg
    if cfg.resume in ("auto", "never"):
        return Check("resume", True, cfg.resume)
    folder = Path(cfg.resume)
    if not (folder / "trainer_state.json").is_file():
        raise JobError(
            f"--resume {folder} is not a checkpoint (no trainer_state.json)",
            "pass a checkpoint-N folder of a run, or --resume auto",
        )
    saved = folder / "config.json"
    if saved.is_file() and p.model_config is not None:
        old = json.loads(saved.read_text(encoding="utf-8"))
        shape = ("vocab_size", "hidden_size", "n_layer", "n_head")
        differ = [
            f"{k} {old.get(k)} vs {getattr(p.model_config, k, None)}"
            for k in shape
            if old.get(k) != getattr(p.model_config, k, None)
        ]
        if differ:
            raise JobError(
                f"--resume {folder} is a checkpoint of another model shape ({'; '.join(differ)})",
                "resume with the --model/--preset and tokenizer that checkpoint was trained with",
            )
    return Check("resume", True, f"from {folder}")


def check_memory(p: Preflight) -> Check:
    """A lower bound of one process's activation memory for sequence length x batch, against the device's."""
    if p.model_config is None:
        return Check("memory", True, "not checked: needs the model's config")
    cfg, config = p.cfg, p.model_config
    where = device_type(cfg)
    need = activation_bytes(cfg, config, where)
    have = device_memory(where) // (1 if where == "cuda" else processes_per_node(cfg))
    if need > have:
        return Check(
            "memory",
            False,
            f"batch {cfg.per_device_batch_size} x {cfg.max_length} tokens needs at least {need / 2**30:.1f} GiB of "
            f"activations per process, the {where} has {have / 2**30:.1f} GiB",
            "lower --max-length or --per-device-batch-size (raise --grad-accum to keep the global batch)",
        )
    return Check("memory", True, f"activations >= {need / 2**30:.2f} GiB of {have / 2**30:.1f} GiB ({where})")


def activation_bytes(cfg: RunConfig, config, where: str) -> int:
    """Never more than a step needs (a lower bound): per layer, 4 fp32 [B, T, d] tensors kept for the backward, and
    unless flex attention runs (it never builds them), the fp32 [B, H, T, T] attention scores."""
    from job.attention import resolve_attention

    try:
        flex = resolve_attention(cfg.attention, where) == "flex"
    except JobError:  # flex where it cannot train: the devices check reports that
        flex = False
    batch, length = cfg.per_device_batch_size, cfg.max_length
    per_layer = 4 * batch * length * config.hidden_size * 4
    if not flex:
        per_layer += batch * config.n_head * length * length * 4
    return per_layer * config.n_layer


def device_memory(where: str) -> int:
    if where == "cuda":
        import torch

        return torch.cuda.get_device_properties(0).total_memory
    import psutil

    return psutil.virtual_memory().available


def check_disk(p: Preflight) -> Check:
    from job.model import config_parameter_count

    output = Path(p.cfg.output_dir)
    existing = next(q for q in [output, *output.parents] if q.exists())
    free = shutil.disk_usage(existing).free
    if p.model_config is None:
        return Check("disk", True, f"{free / 2**30:.1f} GiB free (model size unknown)")
    need = config_parameter_count(p.model_config) * BYTES_PER_PARAMETER_CHECKPOINT * 2  # new + last checkpoint
    if free < need:
        return Check(
            "disk",
            False,
            f"{free / 2**30:.1f} GiB free at {existing}, a checkpoint needs about {need / 2**30:.1f} GiB",
            "free space or choose another --output-dir",
        )
    return Check("disk", True, f"{free / 2**30:.1f} GiB free, ~{need / 2**30:.1f} GiB needed per checkpoint pair")


# In order: later checks read what earlier ones found. `train` stops at the first failure; `doctor` runs all.
CHECKS: list[Callable[[Preflight], Check]] = [
    check_launch,
    check_settings,
    check_devices,
    check_deepspeed,
    check_output,
    check_port,
    check_shm,
    check_cache,
    check_data,
    check_tokenizer,
    check_model,
    check_inputs,
    check_resume,
    check_memory,
    check_disk,
]


def run_checks(cfg: RunConfig, stop_at_failure: bool = False) -> tuple[list[Check], Preflight]:
    """Every check in order, errors turned into failed rows; with `stop_at_failure` (train) raise the first."""
    found = Preflight(cfg)
    results = []
    for check in CHECKS:
        try:
            result = check(found)
        except JobError as e:
            result = Check(check.__name__.removeprefix("check_"), False, e.cause, e.fix or "")
            if stop_at_failure:
                raise
        if stop_at_failure:
            require(result)
        results.append(result)
    return results, found


def preflight(cfg: RunConfig) -> Preflight:
    """For `train`: every check, stopping at the first failure; what they found."""
    return run_checks(cfg, stop_at_failure=True)[1]


def require(check: Check) -> None:
    """Stop on a failed check."""
    if not check.ok:
        raise JobError(f"{check.name}: {check.detail}", check.fix or None)


def format_table(results: list[Check]) -> str:
    width = max(len(r.name) for r in results)
    lines = [
        f"{'ok ' if r.ok else 'FAIL'} {r.name:<{width}}  {r.detail}" + (f"  -> {r.fix}" if not r.ok and r.fix else "")
        for r in results
    ]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------- weights
def check_weights(folder: Path) -> None:
    """Every safetensors file in `folder` has a readable header whose tensors end exactly at the file's end
    (a truncated download or copy fails here, in one line, instead of deep inside `from_pretrained`)."""
    for path in sorted(folder.glob("*.safetensors")):
        size = path.stat().st_size
        problem = None
        with path.open("rb") as f:
            head = f.read(8)
            length = struct.unpack("<Q", head)[0] if len(head) == 8 else None
            if length is None or length > size - 8 or length > 100 * 2**20:
                problem = "no valid header"
            else:
                try:
                    header = json.loads(f.read(length))
                    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
                except (ValueError, KeyError, TypeError, IndexError):
                    problem = "a corrupt header"
                else:
                    if 8 + length + end != size:
                        problem = f"{size} bytes where its header describes {8 + length + end}"
        if problem:
            raise JobError(
                f"weights {path} are truncated or corrupt ({problem})",
                "copy or download the model folder again",
            )


def model_fingerprint(folder: Path) -> str:
    """Changes with the model's config or weights (their headers and sizes: cheap, no tensor read)."""
    digest = hashlib.sha256()
    for path in sorted(folder.iterdir()):
        if path.name == "config.json" or path.suffix in (".safetensors", ".bin"):
            digest.update(path.name.encode() + str(path.stat().st_size).encode())
            with path.open("rb") as f:
                digest.update(f.read(1 << 16) if path.suffix != ".json" else f.read())
    return digest.hexdigest()[:16]
