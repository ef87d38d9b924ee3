"""The DeepSpeed config a run uses: `--deepspeed FILE` with `--zero-stage` applied, checked against the run config.

Sizes and optimizer values the file sets must be "auto" or agree with the run config (the Trainer fills "auto"
from its arguments); a disagreement is found here, before any process starts, instead of as a ValueError
inside `TrainingArguments` or DeepSpeed's batch assertion in every rank.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from job.core.config import RunConfig, read_json
from job.core.errors import JobError
from job.run.launch_record import Launch

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


def deepspeed_config(cfg: RunConfig) -> dict[str, Any] | None:
    """The DeepSpeed config this run uses: the file, with `--zero-stage` applied and checked."""
    if not cfg.uses_deepspeed:
        return None
    ds = read_deepspeed_file(str(cfg.deepspeed))
    zero = ds.setdefault("zero_optimization", {})
    if cfg.zero_stage is not None:
        zero["stage"] = cfg.zero_stage
    if zero.get("stage") == 3:
        # Without this ZeRO-3 saves no usable weights (a known trap).
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    else:
        for key in [k for k in zero if k.startswith("stage3_")]:
            zero.pop(key)
    if cfg.offload != "none":
        _render_offload(cfg, ds, zero)
    for key, ours in (("bf16", cfg.bf16), ("fp16", False)):
        section = ds.get(key)
        if isinstance(section, dict) and section.get("enabled") not in ("auto", ours):
            raise JobError(
                f"{cfg.deepspeed} sets {key}.enabled={section['enabled']} but this run has --bf16={cfg.bf16}",
                f'set "{key}": {{"enabled": "auto"}} in the DeepSpeed file',
            )
    return ds


# With offload DeepSpeed runs the optimizer step itself, on the CPU (DeepSpeedCPUAdam, from this block); the Trainer's
# torch AdamW would be refused there (zero_force_ds_cpu_optimizer). "auto": the run config's values.
OFFLOAD_OPTIMIZER = {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"}}


def _render_offload(cfg: RunConfig, ds: dict[str, Any], zero: dict[str, Any]) -> None:
    """`--offload optimizer|all` (and `--offload-nvme`) as DeepSpeed's offload sections, with the optimizer block it
    needs; what DeepSpeed would refuse mid-start (parameters or NVMe below ZeRO-3, offload at ZeRO-0) refused here."""
    stage = zero.get("stage", 0)
    if stage == 0:
        raise JobError(f"--offload {cfg.offload} needs ZeRO stage 1, 2 or 3; this run has 0", "add --zero-stage 2")
    if stage != 3 and (cfg.offload == "all" or cfg.offload_nvme):
        what = "parameters (--offload all)" if cfg.offload == "all" else "NVMe (--offload-nvme)"
        raise JobError(
            f"offloading {what} needs ZeRO-3; this run has ZeRO-{stage}",
            "add --zero-stage 3 (or use --offload optimizer to CPU memory)",
        )
    target: dict[str, Any] = {"device": "cpu", "pin_memory": True}
    if cfg.offload_nvme:
        target = {"device": "nvme", "nvme_path": cfg.offload_nvme, "pin_memory": True}
    zero["offload_optimizer"] = dict(target)
    if cfg.offload == "all":
        zero["offload_param"] = dict(target)
    ds.setdefault("optimizer", OFFLOAD_OPTIMIZER)


def offload_device(ds: dict[str, Any] | None) -> str:
    """Where a rendered DeepSpeed config offloads to: nvme if any section says so, else cpu."""
    zero = (ds or {}).get("zero_optimization", {})
    sections = (zero.get(key) or {} for key in ("offload_optimizer", "offload_param"))
    return "nvme" if any(section.get("device") == "nvme" for section in sections) else "cpu"


def offload_in_use(ds: dict[str, Any] | None) -> str:
    """What a rendered DeepSpeed config offloads: none, optimizer or all (a file may set the sections itself)."""
    zero = (ds or {}).get("zero_optimization", {})
    device = lambda key: (zero.get(key) or {}).get("device", "none")
    if device("offload_param") in ("cpu", "nvme"):
        return "all"
    return "optimizer" if device("offload_optimizer") in ("cpu", "nvme") else "none"


def zero_stage_in_use(cfg: RunConfig) -> int | None:
    """The ZeRO stage this run trains with (DeepSpeed's default 0 if the file sets none); None without DeepSpeed."""
    ds = deepspeed_config(cfg)
    return None if ds is None else ds["zero_optimization"].get("stage", 0)


def check_batch_arithmetic(cfg: RunConfig, launch: Launch) -> None:
    """DeepSpeed refuses train_batch_size != micro x accum x world; say so before any process starts."""
    ds = deepspeed_config(cfg)
    if not ds:
        return
    micro, accum = ds.get("train_micro_batch_size_per_gpu", "auto"), ds.get("gradient_accumulation_steps", "auto")
    total = ds.get("train_batch_size", "auto")
    if micro not in ("auto", cfg.per_device_batch_size):
        raise JobError(
            f"{cfg.deepspeed} sets train_micro_batch_size_per_gpu={micro} but "
            f"--per-device-batch-size is {cfg.per_device_batch_size}",
            'set it to "auto" in the DeepSpeed file so the run config decides',
        )
    if accum not in ("auto", cfg.grad_accum):
        raise JobError(
            f"{cfg.deepspeed} sets gradient_accumulation_steps={accum} but --grad-accum is {cfg.grad_accum}",
            'set it to "auto" in the DeepSpeed file',
        )
    expected = launch.global_batch
    if total not in ("auto", expected):
        raise JobError(
            f"{cfg.deepspeed} sets train_batch_size={total} but batch {cfg.per_device_batch_size}"
            f" x accumulation {cfg.grad_accum} x {launch.world_size} processes = {expected}",
            'set train_batch_size to "auto" or make the three agree',
        )


def check_optimizer_blocks(cfg: RunConfig) -> None:
    """An `optimizer`/`scheduler` block's values must be "auto" or the run's (what transformers' fill_match demands)."""
    ds = deepspeed_config(cfg)
    if not ds:
        return
    from transformers import TrainingArguments

    defaults = {f: TrainingArguments.__dataclass_fields__[f].default for f in ("adam_beta1", "adam_epsilon")}
    extra = {**defaults, **cfg.training_args}
    ours = {
        "gradient_clipping": (cfg.max_grad_norm, "--max-grad-norm"),
        "optimizer.params.lr": (cfg.learning_rate, "--learning-rate"),
        "optimizer.params.betas": ([extra["adam_beta1"], cfg.adam_beta2], "adam_beta1 and --adam-beta2"),
        "optimizer.params.eps": (extra["adam_epsilon"], "adam_epsilon"),
        "optimizer.params.weight_decay": (cfg.weight_decay, "--weight-decay"),
        "scheduler.params.warmup_max_lr": (cfg.learning_rate, "--learning-rate"),
        "scheduler.params.warmup_num_steps": (cfg.warmup_steps, "--warmup-steps"),
    }
    for dotted, (value, name) in ours.items():
        node: Any = ds
        for part in dotted.split("."):
            node = node.get(part, "auto") if isinstance(node, dict) else "auto"
        if node != "auto" and node != value:
            raise JobError(
                f"{cfg.deepspeed} sets {dotted}={node} but the run has {name}={value}",
                f'set {dotted} to "auto" in the DeepSpeed file so the run config decides',
            )
