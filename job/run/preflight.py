"""Preflight: everything that would otherwise fail an hour into a run, checked in seconds.

One list, `CHECKS`, in order. `train` runs it and stops at the first failure (one line, exit 2, nothing
written); `doctor` runs all of it and prints a table. A check reads the config and what earlier checks found
(`Preflight`: the corpus, the tokenizer, the model's config) and returns a `Check` row or raises `JobError`.
To add a check, write `def check_x(p: Preflight) -> Check` and put it in `CHECKS`.
"""

from __future__ import annotations

import dataclasses
import errno
import ipaddress
import os
import shutil
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path

from job.core.config import RunConfig, cache_root
from job.core.errors import JobError
from job.core.topology import (
    TOPOLOGY_DEFAULTS,
    resolve_topology,
    visible_gpus,
)
from job.core.units import config_parameter_count, size_text
from job.core.weights import check_weights
from job.run.check_results import Check, Preflight, require
from job.run.launch_record import resolve_launch
from job.run.resume import check_inputs, check_output, check_resume

BYTES_PER_PARAMETER_CHECKPOINT = 16  # 16-bit weights + fp32 master, Adam m and v (ZeRO layout, with margin)
# `--report-to` integrations the job ships as optional extras: the requirement file of each (pinned, installed with
# constraints.txt), which the image includes when built with that extra (see the README's Tracking section).
TRACKING_EXTRAS = {"wandb": "requirements-wandb.txt", "mlflow": "requirements-mlflow.txt"}


# ------------------------------------------------------------------------------------------------- settings
def check_settings(p: Preflight) -> Check:
    """What transformers itself would refuse in the worker: TrainingArguments (scheduler, --training-arg) and
    the reporting integrations."""
    from accelerate.state import PartialState
    from transformers import TrainingArguments
    from transformers.integrations.integration_utils import (
        INTEGRATION_TO_CALLBACK,
        get_available_reporting_integrations,
    )

    from job.run.training_args import extra_training_arguments, run_training_arguments

    cfg = p.cfg
    reporters = cfg.report_to
    unknown = [r for r in reporters if r not in (*INTEGRATION_TO_CALLBACK, "all")]
    if unknown:
        raise JobError(
            f"--report-to {', '.join(unknown)} is not a reporting integration",
            f"use none or some of: {', '.join(INTEGRATION_TO_CALLBACK)}",
        )
    missing = [r for r in reporters if r not in (*get_available_reporting_integrations(), "all")]
    if missing:  # transformers would fail in every worker, after the data is prepared and the model loaded
        raise JobError(f"--report-to {missing[0]}: its package is not installed here", _install_hint(missing[0]))
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
    shown = ", ".join(reporters) or "none"
    return Check("settings", True, f"schedule {cfg.lr_scheduler}, report to {shown}, {len(extra)} extra")


def _install_hint(reporter: str) -> str:
    if reporter in TRACKING_EXTRAS:
        return (
            f"install the job's {reporter} extra (pip install -c constraints.txt -r {TRACKING_EXTRAS[reporter]}; "
            f"in the image: build it with that extra), or leave {reporter} out of --report-to"
        )
    if reporter == "kubeflow":
        return "leave it out: transformers adds it itself in a TrainJob that sets KUBEFLOW_TRAINER_SERVER_URL"
    return f"install the package {reporter} needs, or leave it out of --report-to"


def check_releases(p: Preflight) -> Check:
    """The installed transformers and torch are releases the worker's private-API overrides were written for."""
    from job.run.private_apis import require_private_apis

    return Check("releases", True, f"private Trainer/DataLoader APIs written for {require_private_apis()}")


# ------------------------------------------------------------------------------------------------- devices
def check_devices(p: Preflight) -> Check:
    from job.model.attention import resolve_attention

    cfg, launch = p.cfg, p.launch
    gpus, nproc = visible_gpus(), launch.nproc_per_node
    wants_gpu = cfg.device == "cuda" or (cfg.device == "auto" and gpus > 0)
    if wants_gpu and nproc > gpus:
        return Check(
            "devices",
            False,
            f"--nproc {nproc} is above the {gpus} GPU(s) visible",
            f"use --nproc {gpus} or fewer (or --device cpu)" if gpus else "run where GPUs are visible",
        )
    resolve_attention(cfg.attention, launch.device)  # flex on a CPU: refused here, in this row
    where = f"{gpus} GPU(s)" if wants_gpu else "CPU (gloo)"
    return Check(
        "devices", True, f"{nproc} process(es) per node x {launch.nnodes} node(s) on {where}, {launch.attention}"
    )


def check_deepspeed(p: Preflight) -> Check:
    from job.run.deepspeed_config import check_batch_arithmetic, check_optimizer_blocks, zero_stage_in_use

    cfg = p.cfg
    if not cfg.uses_deepspeed:
        return Check("deepspeed", True, "off (--deepspeed none): plain DDP")
    stage = zero_stage_in_use(cfg)  # raises JobError on a bad file
    check_batch_arithmetic(cfg, p.launch)
    check_optimizer_blocks(cfg)
    return Check(
        "deepspeed",
        True,
        f"ZeRO-{stage}; global batch {cfg.per_device_batch_size} x {cfg.grad_accum} "
        f"x {p.launch.world_size} = {p.launch.global_batch} rows",
    )


def check_launch(p: Preflight) -> Check:
    """Fill the launch settings no flag set from the torchrun/Kubeflow environment; show where each came from.
    First: every later check reads the resolved config."""
    # The run folder by its real path: `a/missing/../run`, a symlink or `./run` name one folder for every check.
    p.cfg = dataclasses.replace(p.cfg, output_dir=os.path.realpath(p.cfg.output_dir))
    try:
        p.cfg, sources = resolve_topology(p.cfg)
    except JobError:
        p.cfg = _unresolved_fallback(p.cfg)  # doctor goes on with its other rows; train stops at this one
        p.launch = resolve_launch(dataclasses.replace(p.cfg, attention="auto"))
        raise
    p.setting_sources = sources
    try:
        p.launch = resolve_launch(p.cfg)
    except JobError:  # an attention kind the device cannot train: the devices row refuses it
        p.launch = resolve_launch(dataclasses.replace(p.cfg, attention="auto"))
    row = check_topology(p.cfg, sources, p.launch.nproc_per_node)
    p.launch_row = row.detail
    return row


def _unresolved_fallback(cfg: RunConfig) -> RunConfig:
    """After a launch setting could not be resolved: the flags' values and the defaults for the rest (else all the
    defaults: one node), so that doctor's later rows still run on whole numbers. The failed row says what to fix."""
    try:
        return resolve_topology(cfg, environ={})[0]
    except JobError:  # e.g. --node-rank 2 given, --nnodes from a variable that was refused
        return dataclasses.replace(cfg, **TOPOLOGY_DEFAULTS)


def check_topology(cfg: RunConfig, sources: dict[str, str], nproc: int) -> Check:
    """The launch settings and where each came from (flag, environment variable or default): under an
    operator (PyTorchJob, TrainJob, JobSet) this shows which of its variables the run picked up."""
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


def check_rendezvous(p: Preflight) -> Check:
    """Across nodes, every node but 0 connects to node 0 at master_addr: a loopback address from the environment or
    the default is this pod itself, and torchrun would wait out its whole join timeout for a rendezvous that never
    comes. An explicit `--master-addr` on loopback says every node runs on this host (a test, a workstation)."""
    cfg = p.cfg
    if cfg.nnodes == 1:
        return Check("rendezvous", True, "one node: nothing to join")
    if cfg.node_rank == 0:
        return Check("rendezvous", True, f"node 0 hosts it at {cfg.master_addr}:{cfg.master_port}")
    # an explicit loopback address: every node on this host, as it says
    if is_loopback(cfg.master_addr) and p.setting_sources.get("master_addr") == "flag":
        return Check("rendezvous", True, f"node {cfg.node_rank} joins node 0 on this host ({cfg.master_addr})")
    if is_loopback(cfg.master_addr):
        return Check(
            "rendezvous",
            False,
            f"node {cfg.node_rank} of {cfg.nnodes} would join the rendezvous at {cfg.master_addr}, its own pod, and "
            "wait there for a node 0 that never comes",
            "set PET_MASTER_ADDR (or --master-addr) to node 0's host name or address, e.g. its headless Service name",
        )
    return Check("rendezvous", True, f"node {cfg.node_rank} joins node 0 at {cfg.master_addr}:{cfg.master_port}")


def is_loopback(host: str) -> bool:
    """Whether `host` names this machine itself: a 127.x/::1 (or 0.0.0.0) address or `localhost` (no DNS look-up:
    node 0's name need not resolve before its pod is up)."""
    name = host.strip().strip("[]").rstrip(".").lower()
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        return False
    return address.is_loopback or address.is_unspecified


def check_shm(p: Preflight) -> Check:
    if not Path("/dev/shm").exists():
        return Check("/dev/shm", True, "absent (not Linux?)")
    size = shutil.disk_usage("/dev/shm").total
    # NCCL and GPU data loaders need it; a CPU run (gloo) does with the container's default
    ok = size >= 1 * 2**30 or p.launch.device == "cpu"
    return Check(
        "/dev/shm",
        ok,
        f"{size / 2**30:.1f} GiB",
        "" if ok else "mount a larger /dev/shm (docker --shm-size 16g; k8s emptyDir medium: Memory)",
    )


# Variables naming folders the run writes, when set (the image puts each on the /cache volume).
WRITTEN_FOLDER_VARIABLES = ("TORCH_EXTENSIONS_DIR", "TRITON_CACHE_DIR", "XDG_CACHE_HOME", "MPLCONFIGDIR", "HOME")


def written_folders(cfg: RunConfig) -> list[tuple[str, Path]]:
    """(what names it, folder) of every folder the run writes: the output, the caches, the temporary folder."""
    return [
        ("--output-dir", Path(cfg.output_dir)),
        ("JOB_CACHE", cache_root()),
        ("HF_HOME", Path(os.environ.get("HF_HOME", "~/.cache/huggingface")).expanduser()),
        *((name, Path(os.environ[name])) for name in WRITTEN_FOLDER_VARIABLES if os.environ.get(name)),
        ("the temporary folder", Path(tempfile.gettempdir())),
    ]


def check_writable(p: Preflight) -> Check:
    """Every folder the run writes takes a file from this uid. A real file, not os.access: access() answers yes to
    root whatever the mode, and a volume can refuse what the mode bits allow (a read-only mount, a squashed uid on
    NFS)."""
    uid, gid = os.getuid(), os.getgid()

    def refused(what: str, folder: Path | str, why: str) -> Check:
        return Check(
            "writable",
            False,
            f"{what} is not writable by uid {uid} gid {gid} ({why})",
            f"give uid {uid} write access to {folder}: on Kubernetes the pod's fsGroup does it on most volumes; "
            "a ReadWriteMany volume whose driver ignores fsGroup (NFS and the like) needs "
            "`make k8s-volume-permissions` once (k8s/README.md)",
        )

    try:
        folders = written_folders(p.cfg)
    except FileNotFoundError as e:  # tempfile found no writable candidate (TMPDIR, /tmp, /var/tmp, ...)
        return refused("no temporary folder", "TMPDIR or /tmp", str(e))
    for name, path in folders:
        existing = next(q for q in [path, *path.parents] if q.exists())
        if not existing.is_dir():
            continue  # a file in the way: check_output and cache_root name that
        try:
            with tempfile.NamedTemporaryFile(dir=existing, prefix=".job-write-test-"):
                pass
        except OSError as e:
            return refused(f"{name} {path}: {existing}", existing, e.strerror)
    return Check("writable", True, f"{len(folders)} folders take files from uid {uid} (JOB_CACHE={cache_root()})")


# ------------------------------------------------------------------------------------------------- inputs
def check_data(p: Preflight) -> Check:
    from job.data.corpus import load_run_corpus
    from job.data.mix import sources
    from job.data.prepare import read_prepared_key, read_prepared_stats

    cfg = p.cfg
    mix = sources(cfg)
    if mix is not None:
        return _check_mix(p, mix)
    if cfg.prepared:
        folder = cfg.prepared.path
        stats = read_prepared_stats(folder)
        p.prepared_key = read_prepared_key(folder)
        _load_prepared_whole(folder)
        return Check("data", True, f"prepared: {stats['rows']} rows of <= {stats['max_length']} tokens")
    p.corpus = load_run_corpus(cfg)
    return Check("data", True, f"{p.corpus.name}: {p.corpus.documents} documents, column {cfg.text_column!r}")


def _check_mix(p: Preflight, mix: list) -> Check:
    """Each source of a mix as one source is checked (a --prepared mix: one max length and layout); the row shows
    every source with its share."""
    from job.data.mix import load_source_corpora
    from job.data.prepare import read_prepared_key, read_prepared_stats

    shares = [f"{s.name} {share:.0%}" for s, share in p.cfg.source_data.shares()]
    if p.cfg.prepared:
        rows = []
        for source in mix:
            stats = read_prepared_stats(source.path)
            p.prepared_keys[source.name] = read_prepared_key(source.path)
            _load_prepared_whole(source.path)
            rows.append(f"{stats['rows']} rows")
        layouts = {(k["max_length"], k["packing"]) for k in p.prepared_keys.values()}
        if len(layouts) > 1:
            raise JobError(
                f"the --prepared mix's sources have different rows (max length, packing: {sorted(layouts)})",
                "prepare every source with the same --max-length and --packing",
            )
    else:
        p.corpora.update(load_source_corpora(p.cfg, mix))
        rows = [f"{len(p.corpora[s.name].rows)} documents" for s in mix]
    shown = "; ".join(f"{share}: {s.path} ({n})" for share, s, n in zip(shares, mix, rows, strict=True))
    return Check("data", True, f"mix of {len(mix)} sources: {shown}")


def _load_prepared_whole(folder: str) -> None:
    """Open every split and read its last row: a truncated or damaged Arrow file fails here, in one line."""
    from job.data.prepare import load_prepared

    try:
        for split in load_prepared(folder).values():
            if len(split):
                split[len(split) - 1]
    except JobError:
        raise
    except Exception as e:  # pyarrow and datasets raise many kinds for a damaged file
        raise JobError(
            f"{folder} is damaged ({type(e).__name__}: {str(e).splitlines()[0][:200]})",
            "prepare the data again (python -m job prepare)",
        ) from None


def check_tokenizer(p: Preflight) -> Check:
    from job.data.tokenizer import run_tokenizer

    p.tokenizer = tok = run_tokenizer(p.cfg)
    return Check("tokenizer", True, f"{len(tok)} tokens, eos {tok.eos_token_id}, pad {tok.pad_token_id}")


def check_model(p: Preflight) -> Check:
    from job.model.build import model_config

    cfg = p.cfg
    p.model_config = config = model_config(cfg, len(p.tokenizer) if p.tokenizer else None)
    if cfg.model:
        check_weights(Path(cfg.model))
    source = cfg.model or f"preset {cfg.preset} (random init)"
    return Check("model", True, f"{source}: {config_parameter_count(config) / 1e6:.1f}M parameters")


def check_memory(p: Preflight) -> Check:
    """The memory plan (`python -m job plan`) of the resolved launch on this machine: refused with the settings that
    would fit; with `--plan auto` those settings become the run's. The launch records the plan it settled on."""
    from job.run.memory_plan import (
        auto_conflict,
        machine_here,
        plan_run,
        planned_memory,
        refusal,
        why,
        with_settings,
    )

    cfg = p.cfg
    if p.model_config is None:
        return Check("memory", True, "not checked: needs the model's config")
    if cfg.plan == "off":
        return Check("memory", True, "not planned (--plan off)")
    try:
        launch = p.launch
        here = machine_here(launch.nproc_per_node, launch.nnodes, launch.device)
        mine, best = plan_run(cfg, p.model_config, here, launch.attention)
    except JobError as e:  # a DeepSpeed file or attention kind that cannot work: its own row (deepspeed, devices)
        return Check("memory", True, f"not planned: {e.cause}")
    if cfg.plan == "auto" and best is not None:
        chosen = with_settings(cfg, best.settings)
        conflict = auto_conflict(chosen, best.settings, launch)
        if conflict:
            return Check("memory", False, conflict.cause, conflict.fix or "")
        p.cfg = chosen
        p.launch = dataclasses.replace(p.launch, memory=planned_memory(best, "--plan auto"))
        return Check("memory", True, f"--plan auto: {why(best.settings, mine.settings)}; " + best.summary())
    if not mine.fits:
        error = refusal(mine, best)
        return Check("memory", False, error.cause, error.fix or "")
    p.launch = dataclasses.replace(p.launch, memory=planned_memory(mine, "the run's settings"))
    return Check("memory", True, mine.summary())


def check_disk(p: Preflight) -> Check:
    output = Path(p.cfg.output_dir)
    existing = next(q for q in [output, *output.parents] if q.exists())
    free = shutil.disk_usage(existing).free
    if p.model_config is None:
        return Check("disk", True, f"{size_text(free)} free (model size unknown)")
    need = config_parameter_count(p.model_config) * BYTES_PER_PARAMETER_CHECKPOINT * 2  # new + last checkpoint
    if free < need:
        return Check(
            "disk",
            False,
            f"{size_text(free)} free at {existing}, a checkpoint and the one before it need about {size_text(need)}",
            "free space or choose another --output-dir",
        )
    return Check("disk", True, f"{size_text(free)} free, ~{size_text(need)} needed per checkpoint pair")


# In order: later checks read what earlier ones found. `train` stops at the first failure; `doctor` runs all.
CHECKS: list[Callable[[Preflight], Check]] = [
    check_launch,
    check_settings,
    check_releases,
    check_devices,
    check_deepspeed,
    check_writable,
    check_output,
    check_port,
    check_rendezvous,
    check_shm,
    check_data,
    check_tokenizer,
    check_model,
    check_memory,  # before the resume checks: --plan auto may change settings a resumed run must keep
    check_inputs,
    check_resume,
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


def format_table(results: list[Check]) -> str:
    width = max(len(r.name) for r in results)
    lines = [
        f"{'ok ' if r.ok else 'FAIL'} {r.name:<{width}}  {r.detail}" + (f"  -> {r.fix}" if not r.ok and r.fix else "")
        for r in results
    ]
    return "\n".join(lines)
