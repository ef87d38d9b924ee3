"""The `TrainingArguments` of a run: the values the run config owns, plus `--training-arg NAME=VALUE` for the rest
(checked against transformers' own fields and types). The preflight builds them once to let transformers refuse
what it would refuse in the worker; the worker builds them for the Trainer."""

from __future__ import annotations

import typing

from job.core.config import CoercionError, RunConfig, coerce
from job.core.errors import JobError
from job.run.deepspeed_config import deepspeed_config


def run_training_arguments(
    cfg: RunConfig, use_cpu: bool, deepspeed: dict | None = None, has_eval: bool | None = None
) -> dict:
    """The `TrainingArguments` values the run config owns (`--training-arg` may not set these). `has_eval`: whether
    the data has a held-out split (a one-document corpus or `--prepared` data made with no eval fraction has none);
    None: as the config asks."""
    eval_on = cfg.eval_fraction > 0 if has_eval is None else has_eval
    return dict(
        output_dir=cfg.output_dir,
        per_device_train_batch_size=cfg.per_device_batch_size,
        per_device_eval_batch_size=cfg.per_device_batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup_steps,
        weight_decay=cfg.weight_decay,
        adam_beta2=cfg.adam_beta2,
        max_grad_norm=cfg.max_grad_norm,
        logging_steps=cfg.logging_steps,
        logging_first_step=True,
        eval_strategy="steps" if eval_on and cfg.eval_steps > 0 else "no",
        eval_on_start=eval_on,  # the held-out loss before any update: the curve's first point
        eval_steps=cfg.eval_steps or None,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=None,  # rotation is ours: it only ever counts complete checkpoints
        bf16=cfg.bf16,
        seed=cfg.seed,
        data_seed=cfg.seed,
        torch_compile=cfg.torch_compile,
        activation_checkpointing=cfg.gradient_checkpointing,
        # non-reentrant: the blocks take their attention inputs as keywords, which the reentrant form cannot carry
        activation_checkpointing_kwargs={"use_reentrant": False} if cfg.gradient_checkpointing else None,
        dataloader_num_workers=cfg.dataloader_workers,
        dataloader_pin_memory=not use_cpu,
        dataloader_persistent_workers=cfg.dataloader_workers > 0,
        report_to=list(cfg.report_to),
        deepspeed=deepspeed,
        use_cpu=use_cpu,
        remove_unused_columns=False,
        include_num_input_tokens_seen="non_padding",  # real tokens, for tokens/s and MFU
        logging_nan_inf_filter=not cfg.avoid_host_syncs,  # a host sync per micro-step when on
        ddp_find_unused_parameters=False,  # every parameter gets a gradient; True re-walks the graph each step
        disable_tqdm=True,  # our progress bar shows tokens/s and time left
    )


# TrainingArguments that would break the job's contract, refused by name with what to do instead.
REFUSED_TRAINING_ARGS = {
    "fsdp": "this job shards with DeepSpeed ZeRO: use --zero-stage 3 (FSDP checkpoints do not resume here)",
    "fsdp_config": "this job shards with DeepSpeed ZeRO: use --zero-stage 3",
    "save_only_model": "a checkpoint without optimizer state cannot resume; the export in final/ is the model alone",
    # (it would push intermediate checkpoints, from an image that is offline by default)
    "push_to_hub": "push the verified export after the run: python -m job push --model OUTPUT/final --repo OWNER/NAME",
    "resume_from_checkpoint": "use --resume (auto, never or a checkpoint folder)",
    "overwrite_output_dir": "the job never overwrites another run: use another --output-dir",
    "logging_dir": "TensorBoard events go to OUTPUT/tensorboard",
}
# Credentials come from the environment (a Secret), never from the config: it is written to run_config.json.
SECRET_WORDS = ("token", "password", "secret", "api_key")


def extra_training_arguments(cfg: RunConfig, owned: dict) -> dict:
    """`training_args` (`--training-arg NAME=VALUE`): TrainingArguments fields the run config does not own, each
    value coerced to its field's type (a command line gives strings)."""
    from transformers import TrainingArguments

    hints = typing.get_type_hints(TrainingArguments)
    extra = {}
    for name, value in cfg.training_args.items():
        if name not in hints:
            raise JobError(f"--training-arg {name} is not a TrainingArguments field", "check the name in its docs")
        if name in owned:
            raise JobError(
                f"--training-arg {name} is set by the run config",
                "use the run's own option instead (see `python -m job train --help`)",
            )
        if any(word in name for word in SECRET_WORDS):  # the value is never echoed
            raise JobError(
                f"--training-arg {name} would write a credential into run_config.json and the report",
                "pass credentials in the environment (e.g. HF_TOKEN from a Kubernetes Secret)",
            )
        if name in REFUSED_TRAINING_ARGS or name.startswith("hub_"):
            fix = REFUSED_TRAINING_ARGS.get(name, REFUSED_TRAINING_ARGS["push_to_hub"])
            raise JobError(f"--training-arg {name} is not supported by this job", fix)
        try:
            extra[name] = coerce(value, hints[name], from_text=True)  # a command line gives strings
        except CoercionError as e:
            raise JobError(f"--training-arg {name}={value!r} does not fit its type", f"{name} takes {e}") from None
    return extra


def training_arguments(cfg: RunConfig, use_cpu: bool, has_eval: bool | None = None):
    """The `TrainingArguments` for this run: the run config's values plus its checked `training_args`."""
    from transformers import TrainingArguments

    owned = run_training_arguments(cfg, use_cpu, deepspeed_config(cfg), has_eval)
    return TrainingArguments(**owned, **extra_training_arguments(cfg, owned))
