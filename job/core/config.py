"""The one typed run config.

Defaults < recipe or JSON file (`--config`) < CLI flags. The effective config is written to
`OUTPUT/run_config.json` and every worker of a multi-process run reads that same file.

Each field is declared once, with `opt(default, help, ...)`: its help text (the CLI option's), its allowed
values (a `Literal` type becomes a Click choice), the range it must fall in, whether a resumed run may change
it, and whether it names a path (compared after resolving). The CLI, the validation and the resume check all
read that metadata; nothing else lists fields.

A value with structure (a data mix, the resume mode, the logging integrations, the DeepSpeed file, hub ids, kernel
options) is written as text on the command line and in `run_config.json`, and parsed once, here, into a typed
value (`opt(..., text=TextForm(parse, write))`): every reader gets the typed value, and an existing run folder's
JSON still loads.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import math
import os
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

from job.core.data_spec import DataSpec
from job.core.errors import JobError
from job.core.files import atomic_write_json

PACKAGE_DIR = Path(__file__).resolve().parent.parent  # job/
RECIPES_DIR = PACKAGE_DIR / "recipes"
# `--deepspeed default`: the file at the repository root (the image copies it to /app, beside job/), one source.
DEFAULT_DS_CONFIG = PACKAGE_DIR.parent / "ds_config.json"
# The names of job.model.build.PRESET_SHAPES and auto + job.model.attention.KINDS (tests/test_config.py holds them
# equal); here so that the CLI lists them without importing torch.
Preset = Literal["tiny", "bloom-389m-zh", "bloom-800m-zh", "bloom-1b4-zh", "bloom-2b5-zh", "bloom-6b4-zh"]
Attention = Literal["auto", "eager", "sdpa", "flex"]
Device = Literal["auto", "cuda", "cpu"]
FlexCompileMode = Literal["default", "max-autotune-no-cudagraphs"]
Offload = Literal["none", "optimizer", "all"]  # ZeRO-Offload: what moves from the GPUs to CPU memory (or NVMe)
PlanMode = Literal["check", "auto", "off"]  # job.run.memory_plan: refuse what does not fit, choose, or skip
MixUntil = Literal["first_exhausted", "all_exhausted"]  # datasets.interleave_datasets' stopping strategies
MIX_FIELDS = ("data", "prepared")  # the fields that take a weighted mix of sources (job.core.data_spec)


def cache_root() -> Path:
    """Where prepared data and the built-in tokenizer are cached (a volume in the container)."""
    root = Path(os.environ.get("JOB_CACHE", Path.home() / ".cache" / "job"))
    if root.exists() and not root.is_dir():
        raise JobError(f"JOB_CACHE={root} is a file, not a folder", "set JOB_CACHE to a folder (it is created)")
    return root


# ---------------------------------------------------------------------------------------- typed text values
@dataclass(frozen=True)
class TextForm:
    """How a structured field reads from its text (a flag, a config file, run_config.json) and is written back."""

    parse: Callable[[str, str], Any]  # (text, flag) -> the typed value; raises JobError naming the flag
    write: Callable[[Any], Any] = str  # the typed value -> its JSON form


@dataclass(frozen=True)
class ResumeFrom:
    """`--resume`: `auto` (the newest complete checkpoint), `never` (a fresh run only), or a checkpoint folder."""

    mode: Literal["auto", "never", "folder"]
    folder: Path | None = None

    @classmethod
    def parse(cls, text: str, option: str = "--resume") -> ResumeFrom:
        if text in ("auto", "never"):
            return cls(text)
        if not Path(text).is_dir():
            raise JobError(
                f"{option} {text!r} is neither auto, never nor a checkpoint folder",
                "use --resume auto to continue from the newest complete checkpoint",
            )
        return cls("folder", Path(text))

    def __str__(self) -> str:
        return str(self.folder) if self.mode == "folder" else self.mode


def parse_report_to(text: str, option: str = "--report-to") -> tuple[str, ...]:
    """`tensorboard,wandb` -> ("tensorboard", "wandb"); `none` alone -> () (no integration)."""
    names = tuple(name.strip() for name in text.split(","))
    if any(not name for name in names):
        raise JobError(
            f"{option} {text!r} has an empty item", "name integrations separated by commas, e.g. tensorboard"
        )
    if "none" in names and len(names) > 1:
        raise JobError(f"{option} {text!r} names none beside integrations", "give none alone, or only integrations")
    return () if names == ("none",) else names


def parse_deepspeed(text: str, option: str = "--deepspeed") -> Path | None:
    """`default` -> the packaged file, `none` -> None (plain DDP), else the file's path."""
    if text.lower() == "none":
        return None
    return DEFAULT_DS_CONFIG if text == "default" else Path(text)


def write_deepspeed(path: Path | None) -> str:
    return "none" if path is None else "default" if path == DEFAULT_DS_CONFIG else str(path)


def parse_hub_ids(text: str, option: str = "--dataset-ids") -> tuple[str, ...]:
    return tuple(item.strip() for item in text.split(",") if item.strip())


def parse_json_object(text: str, option: str) -> dict[str, Any]:
    try:
        value = json.loads(text) if text else {}
    except json.JSONDecodeError:
        value = None
    if not isinstance(value, dict):
        raise JobError(f"{option} {text!r} is not a JSON object", 'write it as {"NAME": VALUE, ...}')
    return value


DATA_SPEC = TextForm(DataSpec.parse)
RESUME = TextForm(ResumeFrom.parse)
REPORT_TO = TextForm(parse_report_to, lambda names: ",".join(names) or "none")
DEEPSPEED = TextForm(parse_deepspeed, write_deepspeed)
HUB_IDS = TextForm(parse_hub_ids, ",".join)
JSON_OBJECT = TextForm(parse_json_object, lambda value: json.dumps(value) if value else "")


# ------------------------------------------------------------------------------------------ field metadata
Bound = tuple[Callable[[Any], bool], str]


def at_least(n: float) -> Bound:
    return (lambda v: v >= n, f"at least {n}")


def above(n: float) -> Bound:
    return (lambda v: v > n, f"above {n}")


def between(low: float, high: float) -> Bound:
    """low <= v < high."""
    return (lambda v: low <= v < high, f"in [{low}, {high})")


# The concerns `train --help` groups the fields by, in this order (the field order follows it too).
GROUPS = ("data", "model", "optimisation", "distributed", "checkpoints", "throughput levers", "logging")


def opt(
    default: Any,
    help: str,
    *,
    group: str,
    prepare: bool = False,
    resumable: bool = False,
    bound: Bound | None = None,
    path: bool = False,
    factory: Callable[[], Any] | None = None,
    text: TextForm | None = None,
):
    """A RunConfig field: default, CLI help, its concern (`GROUPS`), whether `prepare` reads it, whether a resumed run
    may change it, its range, whether it is a path, and how it reads from text when it has structure (`TextForm`:
    the default is then given as text too)."""
    assert group in GROUPS, group
    metadata = {
        "help": help,
        "group": group,
        "prepare": prepare,
        "resumable": resumable,
        "bound": bound,
        "path": path,
        "text": text,
    }
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class RunConfig:
    """Every setting of a run, resolved once (defaults < recipe or file < flags < environment for the launch
    settings; then the prepared inputs) into a value no stage changes: a new stage gets a `dataclasses.replace`."""

    # --- data (prepare) ---
    data: DataSpec | None = opt(
        None,
        "corpus: save_to_disk folder, .json/.jsonl(.gz)/.parquet files, folder or glob, or hub id "
        "(default: built-in People's Daily); or a weighted mix WEIGHT:NAME=PATH,... "
        "(e.g. 0.8:wiki=/data/wiki.jsonl,0.2:replay=/data/replay.parquet; the largest weight at most 1000 times the "
        "smallest; see the README's Data mix)",
        group="data",
        prepare=True,
        path=True,
        text=DATA_SPEC,
    )
    text_column: str = opt("completion", "the column holding the documents' text", group="data", prepare=True)
    max_samples: int | None = opt(
        None, "use the first N documents (deterministic)", group="data", prepare=True, bound=at_least(1)
    )
    eval_fraction: float = opt(
        0.02,
        "fraction of documents held out for evaluation (0 disables)",
        group="data",
        prepare=True,
        bound=between(0, 1),
    )
    max_length: int = opt(256, "tokens per training row", group="data", prepare=True, bound=at_least(2))
    packing: bool = opt(
        True, "pack documents into full rows (else one truncated document per row)", group="data", prepare=True
    )
    num_proc: int | None = opt(
        None,
        "tokenizer threads (default: one per usable CPU: the affinity mask, capped by a cgroup CPU limit)",
        group="data",
        prepare=True,
        resumable=True,
        bound=at_least(1),
    )
    prepared: DataSpec | None = opt(
        None,
        "a folder written by `prepare` (skips preparation); or a mix of them, WEIGHT:NAME=FOLDER,...",
        group="data",
        resumable=True,
        path=True,
        text=DATA_SPEC,
    )  # resumable as a path: the inputs' fingerprints (with a mix's weights) are what a resume compares
    mix_until: MixUntil = opt(
        "first_exhausted",
        "with a data mix, where an epoch ends: when the first source runs out (no row repeats; the rest of the "
        "larger sources is never read), or when every source has been read whole (smaller ones repeat, by weight)",
        group="data",
    )
    tokenizer: str | None = opt(
        None,
        "HF tokenizer folder (default: the model's, else the built-in BPE)",
        group="data",
        prepare=True,
        resumable=True,
        path=True,
    )  # resumable as a path: the tokenizer's fingerprint is what a resume compares
    vocab_size: int = opt(
        8000,
        "vocabulary of a trained BPE (the built-in one, or `tokenizer`'s)",
        group="data",
        prepare=True,
        bound=between(260, 2**24 + 1),
    )
    # --- model ---
    model: str | None = opt(
        None,
        "local HF Bloom folder to continue from (default: random init from --preset)",
        group="model",
        prepare=True,
        path=True,
    )
    preset: Preset = opt("tiny", "model shape for a random init (when no --model)", group="model")
    attention: Attention = opt("auto", "attention kernel (auto: flex on CUDA, sdpa on CPU)", group="model")
    trust_remote_code: bool = opt(
        False, "allow a model folder's own Python code (Bloom-like models)", group="model", prepare=True
    )
    # --- optimisation ---
    per_device_batch_size: int = opt(16, "rows per device per micro-step", group="optimisation", bound=at_least(1))
    grad_accum: int = opt(4, "micro-steps per optimizer step", group="optimisation", bound=at_least(1))
    epochs: float = opt(
        1.0,
        "passes over the data (when --max-steps is not set)",
        group="optimisation",
        resumable=True,
        bound=at_least(0),
    )
    max_steps: int = opt(
        -1,
        "optimizer steps to train (-1: from --epochs)",
        group="optimisation",
        resumable=True,
        bound=(lambda v: v == -1 or v >= 1, "-1 or at least 1"),
    )
    learning_rate: float = opt(2e-3, "peak learning rate", group="optimisation", bound=above(0))
    lr_scheduler: str = opt(
        "cosine", "learning-rate schedule: a transformers SchedulerType (linear, cosine, ...)", group="optimisation"
    )
    warmup_steps: int = opt(10, "steps of linear warm-up", group="optimisation", bound=at_least(0))
    weight_decay: float = opt(0.01, "AdamW weight decay", group="optimisation", bound=at_least(0))
    adam_beta2: float = opt(
        0.95,
        "AdamW beta2 (0.95, usual for LM pre-training; 0.999 adapts too slowly early on)",
        group="optimisation",
        bound=between(0, 1),
    )
    max_grad_norm: float = opt(1.0, "gradient clipping norm (0: off)", group="optimisation", bound=at_least(0))
    bf16: bool = opt(False, "bf16 mixed precision", group="optimisation")
    seed: int = opt(
        42,
        "seed for init, data order and the eval split",
        group="optimisation",
        prepare=True,
        bound=between(0, 2**32),  # numpy's seeds are 32-bit
    )
    max_nonfinite_steps: int = opt(
        3,
        "stop as diverged after N optimizer steps in a row with a non-finite loss",
        group="optimisation",
        resumable=True,
        bound=at_least(1),
    )
    training_args: dict[str, Any] = opt(
        None,
        "other transformers TrainingArguments, NAME=VALUE (repeatable), e.g. ddp_timeout=3600",
        group="optimisation",
        factory=dict,
    )
    # --- distributed ---
    device: Device = opt(
        "auto", "auto: CUDA when visible, else CPU; cuda insists on GPUs", group="distributed", resumable=True
    )
    deepspeed: Path | None = opt(
        "default",
        "DeepSpeed JSON file; default: the ZeRO-2 file ds_config.json at the repository root; none: plain DDP",
        group="distributed",
        path=True,
        text=DEEPSPEED,
    )
    zero_stage: int | None = opt(
        None, "ZeRO stage 0-3 (overrides the DeepSpeed file's)", group="distributed", bound=between(0, 4)
    )
    gradient_checkpointing: bool = opt(
        False,
        "activation checkpointing: each block's activations are recomputed in the backward (about a third more "
        "compute, a fraction of the activation memory; the losses are the same)",
        group="distributed",
        resumable=True,
    )
    offload: Offload = opt(
        "none",
        "ZeRO-Offload: optimizer states (optimizer: ZeRO 1-3), or optimizer states and parameters (all: ZeRO-3) to "
        "CPU memory, or to --offload-nvme; needs DeepSpeed's CPU Adam (a C++ build on first use)",
        group="distributed",
    )
    offload_nvme: str | None = opt(
        None,
        "with --offload and --zero-stage 3: an NVMe folder instead of CPU memory (ZeRO-Infinity; needs libaio)",
        group="distributed",
        path=True,
    )
    plan: PlanMode = opt(
        "check",
        "the memory plan before any process starts (python -m job plan): check refuses a run that does not fit, "
        "auto picks the fastest ZeRO stage, offload, micro-batch and checkpointing that fit, off skips it",
        group="distributed",
        resumable=True,
    )
    # Launch settings left unset come from the torchrun/Kubeflow environment (job.core.topology.resolve_topology).
    nproc: int | None = opt(
        None,
        "processes per node (default: $PET_NPROC_PER_NODE, else every visible GPU, 1 without)",
        group="distributed",
        resumable=True,
        bound=at_least(1),
    )
    nnodes: int | None = opt(
        None, "nodes (default: $PET_NNODES, else 1)", group="distributed", resumable=True, bound=at_least(1)
    )
    node_rank: int | None = opt(
        None,
        "this node's rank, 0 to nnodes-1 (default: $PET_NODE_RANK, else $JOB_COMPLETION_INDEX, else 0)",
        group="distributed",
        resumable=True,
        bound=at_least(0),
    )
    master_addr: str | None = opt(
        None, "rendezvous host, node 0 (default: $PET_MASTER_ADDR, else 127.0.0.1)", group="distributed", resumable=True
    )
    master_port: int | None = opt(
        None,
        "rendezvous port (default: $PET_MASTER_PORT; else torchrun picks one on one node, 29500 across nodes)",
        group="distributed",
        resumable=True,
        bound=(lambda v: 1 <= v <= 65535, "a port, 1-65535"),
    )
    dataloader_workers: int = opt(
        2, "DataLoader worker processes per rank", group="distributed", resumable=True, bound=at_least(0)
    )
    # --- checkpoints ---
    output_dir: str = opt(
        "output/run",
        "run folder: run_config.json, checkpoints, final/, report",
        group="checkpoints",
        resumable=True,
        path=True,
    )  # resumable: a run folder moved or copied elsewhere is still that run
    save_steps: int = opt(500, "checkpoint every N steps", group="checkpoints", resumable=True, bound=at_least(1))
    save_total_limit: int = opt(2, "complete checkpoints kept", group="checkpoints", resumable=True, bound=at_least(1))
    resume: ResumeFrom = opt(
        "auto",
        "auto (newest complete checkpoint), never, or a checkpoint folder",
        group="checkpoints",
        resumable=True,
        path=True,
        text=RESUME,
    )
    shutdown_timeout_s: int = opt(
        600, "seconds a signalled run gets to checkpoint", group="checkpoints", resumable=True, bound=at_least(1)
    )
    # the model card final/ carries (README.md, Hugging Face format): what a hub page shows after `push`
    license: str | None = opt(
        None,
        "license id in final/'s model card, e.g. apache-2.0 (default: the base model's, from its card or hub id; "
        "else other)",
        group="checkpoints",
        resumable=True,
    )
    license_name: str | None = opt(
        None, "with --license other: the license's short name in the model card", group="checkpoints", resumable=True
    )
    license_link: str | None = opt(
        None,
        "with --license other: a URL (or a file of the pushed repository) of the license text",
        group="checkpoints",
        resumable=True,
    )
    base_model: str | None = opt(
        None, "hub id of --model, for the model card (e.g. Langboat/bloom-389m-zh)", group="checkpoints", resumable=True
    )
    dataset_ids: tuple[str, ...] = opt(
        "",
        "hub ids of the data, comma-separated, for the model card (default: --data when it is a hub id)",
        group="checkpoints",
        resumable=True,
        text=HUB_IDS,
    )
    # --- throughput levers (each exact; `make bench-gpu` measures them one at a time) ---
    torch_compile: bool = opt(False, "torch.compile the model", group="throughput levers")
    fold_padding: bool = opt(
        True,
        "flex: padding becomes one-token documents, so the mask reads the document ids only",
        group="throughput levers",
    )
    flex_compile_mode: FlexCompileMode = opt(
        "default", "torch.compile mode of FlexAttention", group="throughput levers"
    )
    flex_kernel_options: dict[str, Any] = opt(
        "",
        'JSON object for flex_attention(kernel_options=...), e.g. {"fwd_num_warps": 8}',
        group="throughput levers",
        text=JSON_OBJECT,
    )
    fused_gelu: bool = opt(
        True,
        'BloomGelu\'s tanh formula as F.gelu(approximate="tanh"): one kernel each way',
        group="throughput levers",
    )
    liger_loss: bool = opt(
        True,
        "liger-kernel's fused linear + cross-entropy on CUDA when importable; else chunked",
        group="throughput levers",
    )
    compile_blocks: bool = opt(
        False, "torch.compile each BloomBlock in place (regional compilation)", group="throughput levers"
    )
    avoid_host_syncs: bool = opt(
        True,
        "count real tokens on the host, no per-micro-step NaN check (the stop guard still catches them)",
        group="throughput levers",
    )
    # --- logging ---
    logging_steps: int = opt(10, "log every N steps", group="logging", resumable=True, bound=at_least(1))
    eval_steps: int = opt(
        0,
        "evaluate every N steps (0: at the start and the end only)",
        group="logging",
        resumable=True,
        bound=at_least(0),
    )
    eval_batches: int = opt(
        0, "held-out batches per evaluation (0: all)", group="logging", resumable=True, bound=at_least(0)
    )
    report_to: tuple[str, ...] = opt(
        "tensorboard",
        "logging integrations, comma-separated (tensorboard, wandb, ...; none alone: off)",
        group="logging",
        resumable=True,
        text=REPORT_TO,
    )
    prompts: list[str] = opt(
        None,
        "prompts for the report's samples",
        group="logging",
        resumable=True,
        factory=lambda: ["下面是一则新闻，", "中国的经济", "北京"],
    )

    # ------------------------------------------------------------------ building
    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def load(cls, config: str | None = None, **overrides: Any) -> RunConfig:
        """Defaults, then a recipe name or JSON file, then overrides whose value is not None."""
        values: dict[str, Any] = {}
        if config:
            values.update(read_config_file(config))
        for key, value in overrides.items():
            if isinstance(value, dict) and isinstance(values.get(key), dict):
                values[key] = {**values[key], **value}  # --training-arg adds to the file's training_args
            elif value is not None:
                values[key] = value
        unknown = sorted(set(values) - set(cls.field_names()))
        if unknown:
            raise JobError(
                f"unknown config key(s) {', '.join(unknown)}",
                f"valid keys are: {', '.join(cls.field_names())}",
            )
        hints = field_types()
        return cls(**{k: _coerce(k, v, hints[k]) for k, v in values.items()})  # validated in __post_init__

    def __post_init__(self) -> None:
        # The text of a structured value becomes its typed value (flags, files, run_config.json, a `replace`).
        for f in dataclasses.fields(self):
            form, value = f.metadata["text"], getattr(self, f.name)
            if form is not None and isinstance(value, str):
                object.__setattr__(self, f.name, form.parse(value, flag(f.name)))
        self.validate()  # also for every `dataclasses.replace` of a resolved config

    def validate(self) -> None:
        """Each field's range (from its metadata), then the rules that tie fields together."""
        for f in dataclasses.fields(self):
            value, bound = getattr(self, f.name), f.metadata["bound"]
            if isinstance(value, float) and not math.isfinite(value):
                raise JobError(
                    f"{flag(f.name)} {value} is not a finite number", f"{flag(f.name)} is the {f.metadata['help']}"
                )
            if bound is not None and value is not None and not bound[0](value):
                raise JobError(
                    f"{flag(f.name)} {value} is not {bound[1]}", f"{flag(f.name)} is the {f.metadata['help']}"
                )

        def need(ok: bool, cause: str, fix: str) -> None:
            if not ok:
                raise JobError(cause, fix)

        need(
            self.epochs > 0 or self.max_steps > 0,
            "nothing to train: --epochs is 0 and --max-steps is not set",
            "set --epochs or --max-steps",
        )
        need(
            self.node_rank is None or self.nnodes is None or self.node_rank < self.nnodes,
            f"--node-rank {self.node_rank} is not below --nnodes {self.nnodes}",
            "node ranks run from 0 to nnodes-1",
        )
        need(
            self.zero_stage is None or self.uses_deepspeed,
            f"--zero-stage {self.zero_stage} has no effect with --deepspeed none",
            "leave --zero-stage out, or name a DeepSpeed file",
        )
        need(
            self.offload == "none" or self.uses_deepspeed,
            f"--offload {self.offload} needs DeepSpeed ZeRO, but this run has --deepspeed none",
            "leave --offload out, or name a DeepSpeed file (default: the packaged ZeRO-2 one)",
        )
        need(
            self.offload_nvme is None or self.offload != "none",
            "--offload-nvme names where offloaded states go, but --offload is none",
            "add --offload optimizer or --offload all",
        )

    # ------------------------------------------------------------------ rendering
    @property
    def uses_deepspeed(self) -> bool:
        return self.deepspeed is not None

    @property
    def source_data(self) -> DataSpec | None:
        """The data as given: `--prepared` when set, else `--data` (None: the built-in corpus)."""
        return self.prepared if self.prepared is not None else self.data

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (`run_config.json`): each structured value as its text."""
        out = {}
        for f in dataclasses.fields(self):
            value, form = getattr(self, f.name), f.metadata["text"]
            out[f.name] = form.write(value) if form is not None and value is not None else copy.deepcopy(value)
        return out

    def write(self, path: Path) -> None:
        """Write the effective config (every node's launcher may write it at once: each whole)."""
        atomic_write_json(path, self.to_dict())


def flag(name: str) -> str:
    """The CLI flag of a RunConfig field."""
    return "--" + name.replace("_", "-")


@functools.cache
def field_types() -> dict[str, Any]:
    """Each RunConfig field's type (`typing.get_type_hints`, read once)."""
    return typing.get_type_hints(RunConfig)


def field_meta(name: str) -> dict[str, Any]:
    return next(f.metadata for f in dataclasses.fields(RunConfig) if f.name == name)


def prepare_fields() -> list[str]:
    """Fields the `prepare` step reads (the corpus, the tokenizer, the layout)."""
    return [f.name for f in dataclasses.fields(RunConfig) if f.metadata["prepare"]]


def resumable_fields() -> frozenset[str]:
    """Fields a resumed run may change without becoming a different run."""
    return frozenset(f.name for f in dataclasses.fields(RunConfig) if f.metadata["resumable"])


def comparable(name: str, value: Any) -> Any:
    """A field's value as two runs are compared: a path that exists is resolved (trailing slash, ./, relative)."""
    if name in MIX_FIELDS and isinstance(value, str):
        spec = DataSpec.parse(value, flag(name))
        if spec.mixed:
            return spec.comparable()
    words = {"resume": ("auto", "never"), "deepspeed": ("default", "none")}.get(name, ())  # values that name no path
    if field_meta(name)["path"] and isinstance(value, str) and value not in words:
        path = Path(value).expanduser()
        return str(path.resolve()) if path.exists() or path.parent.exists() else value
    return value


# ---------------------------------------------------------------------- files
def read_json(path: Path, what: str) -> Any:
    if path.is_dir():
        raise JobError(f"{what} {path} is a folder, not a JSON file", "pass the path of the JSON file itself")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise JobError(f"{what} {path} does not exist", "check the path") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise JobError(f"{what} {path} is not valid JSON ({e})", "fix the file's syntax") from None


def read_config_file(name_or_path: str) -> dict[str, Any]:
    """A recipe name (`job/recipes/NAME.json`) or a path to a JSON file of config keys."""
    path = Path(name_or_path)
    if not path.suffix and not path.exists():
        path = RECIPES_DIR / f"{name_or_path}.json"
        if not path.exists():
            names = sorted(p.stem for p in RECIPES_DIR.glob("*.json"))
            raise JobError(
                f"no recipe or config file {name_or_path!r}",
                f"use a JSON file path or one of the recipes: {', '.join(names)}",
            )
    values = read_json(path, "config file")
    if not isinstance(values, dict):
        raise JobError(f"config file {path} holds a {type(values).__name__}, not an object", 'write {"key": value}')
    return {k: v for k, v in values.items() if not k.startswith("_")}  # "_comment" keys are documentation


class CoercionError(ValueError):
    """A value that does not fit a type; each caller words it for where the value came from."""


def coerce(value: Any, hint: Any, *, from_text: bool = False) -> Any:
    """`value` as the type `hint` names, the one coercion of the job: config files and flags (JSON values, where an
    int may stand for a float), `--training-arg` values and environment variables (`from_text`: a string is
    parsed as the first of bool, int, float the hint admits; "true"/"false" for bool).

    Raises `CoercionError` (its message: the allowed choices or types); the caller names the source.
    """
    options = (
        typing.get_args(hint) if isinstance(hint, types.UnionType) or typing.get_origin(hint) is Union else (hint,)
    )
    if value is None and type(None) in options:
        return None
    if from_text and isinstance(value, str):
        text = value.strip()
        for kind in (bool, int, float):
            if kind in options:
                try:
                    return {"true": True, "false": False}[text.lower()] if kind is bool else kind(text)
                except (KeyError, ValueError):
                    pass
    for option in options:
        origin = typing.get_origin(option) or option
        if origin is Literal:
            choices = typing.get_args(option)
            if value in choices:
                return value
            raise CoercionError(f"one of {', '.join(map(str, choices))}")
        if origin is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if origin in (list, dict) and isinstance(value, origin):
            return origin(value)
        if isinstance(origin, type) and origin is not type(None) and type(value) is origin:
            return value
    raise CoercionError(" or ".join(getattr(o, "__name__", str(o)) for o in options))


def _coerce(name: str, value: Any, hint: Any) -> Any:
    """Check a config value against its field's type (a structured field: its text, parsed in __post_init__)."""
    if field_meta(name)["text"] is not None:
        if isinstance(value, str):
            return value
        if value is None and type(None) not in typing.get_args(hint):  # a JSON null (an older record): unset
            return next(f.default for f in dataclasses.fields(RunConfig) if f.name == name)
    try:
        return coerce(value, hint)
    except CoercionError as e:
        if str(e).startswith("one of "):
            raise JobError(f"{flag(name)} {value!r} is not {e}", "choose one of those") from None
        raise JobError(
            f"config key {name!r} is {value!r} ({type(value).__name__}), expected {e}",
            "fix the value in the config file or flag",
        ) from None
