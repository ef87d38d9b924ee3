"""The one typed run config.

Defaults < recipe or JSON file (`--config`) < CLI flags. The effective config is written to
`OUTPUT/run_config.json`, every worker of a multi-process run reads that same file, and it
renders both the `TrainingArguments` and the DeepSpeed config, so the two can never disagree.
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from job.errors import JobError

PACKAGE_DIR = Path(__file__).resolve().parent
RECIPES_DIR = PACKAGE_DIR / "recipes"
REPO_DIR = PACKAGE_DIR.parent
DEFAULT_DS_CONFIG = REPO_DIR / "ds_config.json"
PRESETS = ("tiny", "bloom-389m-zh")
ATTENTIONS = ("auto", "eager", "sdpa", "flex")
FLEX_COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")
# Keys whose values may be credentials: never written to run_config.json or logs.
SECRET_ENV = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "WANDB_API_KEY")


def cache_root() -> Path:
    """Where prepared data and the built-in tokenizer are cached (a volume in the container)."""
    return Path(os.environ.get("JOB_CACHE", Path.home() / ".cache" / "job"))


@dataclass
class RunConfig:
    # --- data (prepare) ---
    data: str | None = None  # None: the built-in People's Daily corpus
    text_column: str = "completion"
    max_samples: int | None = None  # first N documents, deterministic
    eval_fraction: float = 0.02  # documents held out for evaluation (0 disables)
    max_length: int = 256
    packing: bool = True
    num_proc: int = 1
    prepared: str | None = None  # a folder written by `prepare`; skips preparation
    # --- tokenizer and model ---
    tokenizer: str | None = None  # None: the model's own, else the built-in BPE
    vocab_size: int = 8000  # for the built-in BPE
    model: str | None = None  # local HF folder; None: random init from `preset`
    preset: str = "tiny"
    attention: str = "auto"
    trust_remote_code: bool = False
    # --- training ---
    output_dir: str = "output/run"
    per_device_batch_size: int = 16
    grad_accum: int = 4
    epochs: float = 1.0
    max_steps: int = -1
    learning_rate: float = 2e-3
    lr_scheduler: str = "cosine"
    warmup_steps: int = 10
    weight_decay: float = 0.01
    adam_beta2: float = 0.95  # the usual LM pre-training value; 0.999 adapts too slowly early on
    max_grad_norm: float = 1.0
    logging_steps: int = 10
    eval_steps: int = 0  # 0: evaluate at the start and the end only
    eval_batches: int = 0  # cap on held-out batches per evaluation (0: all)
    save_steps: int = 500
    save_total_limit: int = 2
    bf16: bool = False
    seed: int = 42
    torch_compile: bool = False
    dataloader_workers: int = 2
    report_to: str = "tensorboard"
    max_nonfinite_steps: int = 3
    # --- throughput levers (each exact; `make bench-gpu` measures them one at a time) ---
    fold_padding: bool = True  # flex: padding becomes one-token documents, so the mask reads the document ids only
    flex_compile_mode: str = "default"  # torch.compile mode of FlexAttention: default | max-autotune-no-cudagraphs
    flex_kernel_options: str = ""  # JSON object for flex_attention(kernel_options=...), e.g. {"fwd_num_warps": 8}
    fused_gelu: bool = True  # BloomGelu's tanh formula as F.gelu(approximate="tanh"): one kernel each way
    liger_loss: bool = True  # liger-kernel's fused linear + cross-entropy on CUDA when importable; else chunked
    compile_blocks: bool = False  # torch.compile each BloomBlock in place (dynamic=False): regional compilation
    avoid_host_syncs: bool = True  # count real tokens on the host, no per-micro-step NaN check (StopCallback guards)
    # --- distributed ---
    device: str = "auto"  # auto: CUDA when visible, else CPU; "cuda" insists on GPUs
    deepspeed: str = str(DEFAULT_DS_CONFIG)  # a path, or "none" for plain DDP
    zero_stage: int | None = None  # overrides the file's zero_optimization.stage
    nproc: int | None = None  # None: every visible GPU, 1 without one
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int | None = None  # None: a free port on one node, 29500 across nodes
    resume: str = "auto"  # auto | never | a checkpoint folder
    shutdown_timeout_s: int = 600  # a signalled run gets this long to checkpoint
    # --- report ---
    prompts: list[str] = field(default_factory=lambda: ["下面是一则新闻，", "中国的经济", "北京"])

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
        values.update({k: v for k, v in overrides.items() if v is not None})
        unknown = sorted(set(values) - set(cls.field_names()))
        if unknown:
            raise JobError(
                f"unknown config key(s) {', '.join(unknown)}",
                f"valid keys are: {', '.join(cls.field_names())}",
            )
        hints = typing.get_type_hints(cls)
        coerced = {k: _coerce(k, v, hints[k]) for k, v in values.items()}
        cfg = cls(**coerced)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        def need(ok: bool, cause: str, fix: str) -> None:
            if not ok:
                raise JobError(cause, fix)

        need(
            self.max_length >= 2,
            f"--max-length {self.max_length} is below 2",
            "a causal LM needs at least one token and its next one; use e.g. --max-length 384",
        )
        need(
            0.0 <= self.eval_fraction < 1.0,
            f"--eval-fraction {self.eval_fraction} is outside [0, 1)",
            "use e.g. 0.02 to hold out 2% of the documents",
        )
        need(self.preset in PRESETS, f"unknown --preset {self.preset!r}", f"choose one of {', '.join(PRESETS)}")
        need(
            self.attention in ATTENTIONS,
            f"unknown --attention {self.attention!r}",
            f"choose one of {', '.join(ATTENTIONS)}",
        )
        need(
            self.flex_compile_mode in FLEX_COMPILE_MODES,
            f"unknown --flex-compile-mode {self.flex_compile_mode!r}",
            f"choose one of {', '.join(FLEX_COMPILE_MODES)}",
        )
        need(
            _is_json_object(self.flex_kernel_options),
            f"--flex-kernel-options {self.flex_kernel_options!r} is not a JSON object",
            'write e.g. {"fwd_num_warps": 8}, or leave it empty',
        )
        for name in ("per_device_batch_size", "grad_accum", "num_proc", "logging_steps", "save_steps", "nnodes"):
            need(
                getattr(self, name) >= 1, f"--{name.replace('_', '-')} must be at least 1", f"got {getattr(self, name)}"
            )
        need(
            self.max_samples is None or self.max_samples >= 1,
            "--max-samples must be at least 1",
            "leave it out to use every document",
        )
        need(
            self.epochs > 0 or self.max_steps > 0,
            "nothing to train: --epochs is 0 and --max-steps is not set",
            "set --epochs or --max-steps",
        )
        need(self.nproc is None or self.nproc >= 1, "--nproc must be at least 1", f"got {self.nproc}")
        need(
            0 <= self.node_rank < self.nnodes,
            f"--node-rank {self.node_rank} is not below --nnodes {self.nnodes}",
            "node ranks run from 0 to nnodes-1",
        )
        need(
            self.zero_stage in (None, 0, 1, 2, 3),
            f"--zero-stage {self.zero_stage} is not 0-3",
            "use 1, 2 or 3 (or --deepspeed none)",
        )
        need(
            self.resume in ("auto", "never") or Path(self.resume).is_dir(),
            f"--resume {self.resume!r} is neither auto, never nor a checkpoint folder",
            "use --resume auto to continue from the newest complete checkpoint",
        )
        need(self.device in ("auto", "cuda", "cpu"), f"unknown --device {self.device!r}", "use auto, cuda or cpu")
        need(
            self.master_port is None or 1 <= self.master_port <= 65535,
            f"--master-port {self.master_port} is not a port",
            "use 1-65535",
        )

    # ------------------------------------------------------------------ rendering
    @property
    def uses_deepspeed(self) -> bool:
        return self.deepspeed.lower() != "none"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def write(self, path: Path) -> None:
        """Write the effective config (no secrets: none of its fields holds one)."""
        tmp = path.with_suffix(f".{os.getpid()}.tmp")  # every node's launcher may write it at once
        tmp.write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        tmp.replace(path)

    def zero_stage_in_use(self) -> int | None:
        """The ZeRO stage this run trains with (DeepSpeed's default 0 if the file sets none); None without DeepSpeed."""
        ds = self.deepspeed_config()
        return None if ds is None else ds["zero_optimization"].get("stage", 0)

    def deepspeed_config(self) -> dict[str, Any] | None:
        """The DeepSpeed config this run uses: the file, with `--zero-stage` applied and checked."""
        if not self.uses_deepspeed:
            return None
        ds = read_deepspeed_file(self.deepspeed)
        zero = ds.setdefault("zero_optimization", {})
        if self.zero_stage is not None:
            zero["stage"] = self.zero_stage
        if zero.get("stage") == 3:
            # Without this ZeRO-3 saves no usable weights (a known trap).
            zero["stage3_gather_16bit_weights_on_model_save"] = True
        else:
            for key in [k for k in zero if k.startswith("stage3_")]:
                zero.pop(key)
        for key, ours in (("bf16", self.bf16), ("fp16", False)):
            section = ds.get(key)
            if isinstance(section, dict) and section.get("enabled") not in ("auto", ours):
                raise JobError(
                    f"{self.deepspeed} sets {key}.enabled={section['enabled']} but this run has --bf16={self.bf16}",
                    f'set "{key}": {{"enabled": "auto"}} in the DeepSpeed file',
                )
        return ds

    def check_batch_arithmetic(self, world_size: int) -> None:
        """DeepSpeed refuses train_batch_size != micro x accum x world; say so before any process starts."""
        ds = self.deepspeed_config()
        if not ds:
            return
        micro, accum = ds.get("train_micro_batch_size_per_gpu", "auto"), ds.get("gradient_accumulation_steps", "auto")
        total = ds.get("train_batch_size", "auto")
        if micro not in ("auto", self.per_device_batch_size):
            raise JobError(
                f"{self.deepspeed} sets train_micro_batch_size_per_gpu={micro} but "
                f"--per-device-batch-size is {self.per_device_batch_size}",
                'set it to "auto" in the DeepSpeed file so the run config decides',
            )
        if accum not in ("auto", self.grad_accum):
            raise JobError(
                f"{self.deepspeed} sets gradient_accumulation_steps={accum} but --grad-accum is {self.grad_accum}",
                'set it to "auto" in the DeepSpeed file',
            )
        expected = self.per_device_batch_size * self.grad_accum * world_size
        if total not in ("auto", expected):
            raise JobError(
                f"{self.deepspeed} sets train_batch_size={total} but batch {self.per_device_batch_size}"
                f" x accumulation {self.grad_accum} x {world_size} processes = {expected}",
                'set train_batch_size to "auto" or make the three agree',
            )

    def training_arguments(self, use_cpu: bool):
        """The `TrainingArguments` for this run (imported lazily: transformers is slow to import)."""
        from transformers import TrainingArguments

        eval_on = self.eval_fraction > 0
        return TrainingArguments(
            output_dir=self.output_dir,
            per_device_train_batch_size=self.per_device_batch_size,
            per_device_eval_batch_size=self.per_device_batch_size,
            gradient_accumulation_steps=self.grad_accum,
            num_train_epochs=self.epochs,
            max_steps=self.max_steps,
            learning_rate=self.learning_rate,
            lr_scheduler_type=self.lr_scheduler,
            warmup_steps=self.warmup_steps,
            weight_decay=self.weight_decay,
            adam_beta2=self.adam_beta2,
            max_grad_norm=self.max_grad_norm,
            logging_steps=self.logging_steps,
            logging_first_step=True,
            eval_strategy="steps" if eval_on and self.eval_steps > 0 else "no",
            eval_on_start=eval_on,  # the held-out loss before any update: the curve's first point
            eval_steps=self.eval_steps or None,
            save_strategy="steps",
            save_steps=self.save_steps,
            save_total_limit=None,  # rotation is ours: it only ever counts complete checkpoints
            bf16=self.bf16,
            seed=self.seed,
            data_seed=self.seed,
            torch_compile=self.torch_compile,
            dataloader_num_workers=self.dataloader_workers,
            dataloader_pin_memory=not use_cpu,
            dataloader_persistent_workers=self.dataloader_workers > 0,
            report_to=[] if self.report_to == "none" else [r.strip() for r in self.report_to.split(",")],
            deepspeed=self.deepspeed_config(),
            use_cpu=use_cpu,
            remove_unused_columns=False,
            include_num_input_tokens_seen="non_padding",  # real tokens, for tokens/s and MFU
            logging_nan_inf_filter=not self.avoid_host_syncs,  # a host sync per micro-step when on
            ddp_find_unused_parameters=False,  # every parameter gets a gradient; True re-walks the graph each step
            disable_tqdm=True,  # our progress bar shows tokens/s and time left
        )


# ---------------------------------------------------------------------- files
def read_json(path: Path, what: str) -> Any:
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


# Top-level keys DeepSpeed's config model accepts; anything else is most likely a typo.
DEEPSPEED_KEYS = {
    "train_batch_size",
    "train_micro_batch_size_per_gpu",
    "gradient_accumulation_steps",
    "gradient_clipping",
    "optimizer",
    "scheduler",
    "fp16",
    "bf16",
    "amp",
    "zero_optimization",
    "zero_allow_untested_optimizer",
    "zero_force_ds_cpu_optimizer",
    "steps_per_print",
    "wall_clock_breakdown",
    "dump_state",
    "prescale_gradients",
    "gradient_predivide_factor",
    "communication_data_type",
    "seq_parallel_communication_data_type",
    "sparse_gradients",
    "activation_checkpointing",
    "flops_profiler",
    "tensorboard",
    "wandb",
    "csv_monitor",
    "comms_logger",
    "data_types",
    "checkpoint",
    "aio",
    "elasticity",
    "compile",
    "memory_breakdown",
    "torch_autocast",
    "timers",
    "graph_harvesting",
    "use_data_before_expert_parallelism",
    "disable_allgather",
    "data_efficiency",
    "curriculum_learning",
    "pipeline",
    "weight_quantization",
    "compression_training",
    "autotuning",
    "nebula",
    "load_universal_checkpoint",
    "use_node_local_storage",
}


def read_deepspeed_file(path_str: str) -> dict[str, Any]:
    path = Path(path_str)
    ds = read_json(path, "DeepSpeed config")
    if not isinstance(ds, dict):
        raise JobError(f"DeepSpeed config {path} is not a JSON object", "see ds_config.json for the shape")
    unknown = sorted(k for k in ds if k not in DEEPSPEED_KEYS and not k.startswith("_"))
    if unknown:
        raise JobError(
            f"DeepSpeed config {path} has unknown key(s): {', '.join(unknown)}",
            "fix the spelling (see https://www.deepspeed.ai/docs/config-json/)",
        )
    return {k: v for k, v in ds.items() if not k.startswith("_")}


def _is_json_object(text: str) -> bool:
    if not text:
        return True
    try:
        return isinstance(json.loads(text), dict)
    except json.JSONDecodeError:
        return False


def _coerce(name: str, value: Any, hint: Any) -> Any:
    """Check a config value against its field's type; JSON ints may stand for floats."""
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if value is None and type(None) in options:
        return None
    for option in options:
        origin = typing.get_origin(option) or option
        if origin is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if origin is list and isinstance(value, list):
            return list(value)
        if origin in (int, str, bool) and type(value) is origin:
            return value
    wanted = " or ".join(getattr(o, "__name__", str(o)) for o in options)
    raise JobError(
        f"config key {name!r} is {value!r} ({type(value).__name__}), expected {wanted}",
        "fix the value in the config file or flag",
    )
