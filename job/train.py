"""The worker: one process per device, started by `launch.py`, reading the effective `run_config.json`.

Trainer + DeepSpeed as configured; callbacks for checkpoint completion and rotation, signals,
non-finite losses and live throughput; at the end a verified HF export in `OUTPUT/final` and a report.

Signals: until the Trainer is built a SIGTERM/SIGINT stops at once (`errors.Stopped`, nothing to keep); in
training and evaluation it stops every rank at the next step boundary after a complete checkpoint; after the
last step it stops at once again, because the last checkpoint already holds everything and a rerun redoes
the export from it (`publish`).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import signal
import time
from pathlib import Path

import torch
from transformers import DataCollatorForLanguageModeling, Trainer, TrainerCallback, TrainingArguments, set_seed
from transformers.trainer_callback import PrinterCallback

from job import checkpoints
from job.checkpoints import STATUS_FILE
from job.config import RunConfig
from job.errors import EXIT_DIVERGED, EXIT_OK, EXIT_PREEMPTED, STOP_SIGNALS, Stopped, ignore_stop_signals, stop_at_once
from job.model import parameter_count
from job.monitor import REAL_TOKENS_KEY, CountingCollator, extra_log_values
from job.prepare import read_prepared_stats
from job.tokenizer import load_tokenizer

log = logging.getLogger("job")
SAMPLES_BEFORE = "samples_before.json"


def run_training_arguments(cfg: RunConfig, use_cpu: bool, deepspeed: dict | None = None) -> dict:
    """The `TrainingArguments` values the run config owns (`--training-arg` may not set these)."""
    eval_on = cfg.eval_fraction > 0
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
        dataloader_num_workers=cfg.dataloader_workers,
        dataloader_pin_memory=not use_cpu,
        dataloader_persistent_workers=cfg.dataloader_workers > 0,
        report_to=[] if cfg.report_to == "none" else [r.strip() for r in cfg.report_to.split(",")],
        deepspeed=deepspeed,
        use_cpu=use_cpu,
        remove_unused_columns=False,
        include_num_input_tokens_seen="non_padding",  # real tokens, for tokens/s and MFU
        logging_nan_inf_filter=not cfg.avoid_host_syncs,  # a host sync per micro-step when on
        ddp_find_unused_parameters=False,  # every parameter gets a gradient; True re-walks the graph each step
        disable_tqdm=True,  # our progress bar shows tokens/s and time left
    )


def extra_training_arguments(cfg: RunConfig, owned: dict) -> dict:
    """`training_args` (`--training-arg NAME=VALUE`): TrainingArguments fields the run config does not own, each
    value coerced to its field's type (a command line gives strings)."""
    import types
    import typing

    from job.errors import JobError

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
        hint = hints[name]
        kinds = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
        extra[name] = _coerce_argument(name, value, kinds)
    return extra


def _coerce_argument(name: str, value, kinds: tuple):
    import typing

    from job.errors import JobError

    if value is None and type(None) in kinds:
        return None
    if isinstance(value, str):  # from the command line: the first scalar type the field takes that parses
        for kind in (bool, int, float):
            if kind in kinds:
                try:
                    return {"true": True, "false": False}[value.lower()] if kind is bool else kind(value)
                except (KeyError, ValueError):
                    pass
    for kind in kinds:
        base = typing.get_origin(kind) or kind
        if base is float and type(value) is int:
            return float(value)
        if isinstance(base, type) and isinstance(value, base) and (base is bool) == isinstance(value, bool):
            return value
    raise JobError(
        f"--training-arg {name}={value!r} does not fit its type", f"{name} takes {' | '.join(map(str, kinds))}"
    )


def training_arguments(cfg: RunConfig, use_cpu: bool):
    """The `TrainingArguments` for this run: the run config's values plus its checked `training_args`."""
    from job.deepspeed_config import deepspeed_config

    owned = run_training_arguments(cfg, use_cpu, deepspeed_config(cfg))
    return TrainingArguments(**owned, **extra_training_arguments(cfg, owned))


class StopCallback(TrainerCallback):
    """Stops every rank at the same step boundary on SIGTERM/SIGINT (after a checkpoint) or on a diverged loss.

    Ranks receive signals at different moments; one all-reduce of two flags per optimizer step makes
    them agree, so no rank waits in a collective that the others have left.
    """

    def __init__(self, max_nonfinite_steps: int):
        self.max_nonfinite_steps = max_nonfinite_steps
        self.signal_name: str | None = None
        self.nonfinite_in_step = torch.zeros((), dtype=torch.bool)
        self.nonfinite_streak = 0
        self.reason: str | None = None  # "signal" | "diverged"
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame):
        self.signal_name = signal.Signals(signum).name

    def saw_loss(self, loss: torch.Tensor) -> None:
        """Called per micro-step; stays on the device (no sync) until the step ends."""
        finite = torch.isfinite(loss.detach()).all()
        self.nonfinite_in_step = self.nonfinite_in_step.to(finite.device) | ~finite

    def signalled_anywhere(self) -> bool:
        """Whether any rank has seen a signal (a collective: every rank calls it at the same point)."""
        return self._agree(torch.zeros_like(self.nonfinite_in_step))[0]

    def _agree(self, nonfinite: torch.Tensor) -> tuple[bool, bool]:
        flags = torch.stack([torch.tensor(self.signal_name is not None, device=nonfinite.device), nonfinite]).float()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        signalled, nonfinite = (bool(f) for f in flags.tolist())
        if signalled and self.signal_name is None:
            self.signal_name = "a signal to another rank"
        return signalled, nonfinite

    def on_step_end(self, args, state, control, **kwargs):
        signalled, nonfinite = self._agree(self.nonfinite_in_step)
        self.nonfinite_in_step = torch.zeros_like(self.nonfinite_in_step)
        self.nonfinite_streak = self.nonfinite_streak + 1 if nonfinite else 0
        if nonfinite:
            control.should_save = False  # never checkpoint weights a non-finite step may have touched
        if self.nonfinite_streak >= self.max_nonfinite_steps:
            self.reason = "diverged"
            control.should_training_stop = True
        elif signalled:
            self.reason = "signal"
            control.should_save = True
            control.should_training_stop = True
        return control


class CheckpointCallback(TrainerCallback):
    """After every save: wait for all ranks, mark the checkpoint complete, then rotate (rank 0)."""

    def __init__(self, keep: int):
        self.keep = keep

    def on_train_begin(self, args, state, control, **kwargs):
        # A resumed Trainer restores logging/eval/save steps from the checkpoint's state; this run's flags win.
        state.compute_steps(args, state.max_steps)
        return control

    def on_save(self, args, state, control, **kwargs):
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()
        path = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if state.is_world_process_zero and path.is_dir():
            checkpoints.mark_complete(path, state.global_step)
            checkpoints.rotate(Path(args.output_dir), self.keep)
        return control


class _WorkerInit:
    """A DataLoader `worker_init_fn`: the Trainer's own (seeding), then signals ignored (`ignore_stop_signals`).

    torch's workers die on a SIGTERM that is not from their parent, and torchrun, a terminal or `timeout`
    signal the whole process group: without this a worker dies first and the rank crashes before it saves.
    """

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, worker_id: int) -> None:
        if self.inner is not None:
            self.inner(worker_id)
        ignore_stop_signals()


def _workers_ignore_signals(prepared):
    loader = getattr(prepared, "base_dataloader", prepared)  # accelerate wraps the torch DataLoader
    if loader.num_workers and not isinstance(loader.worker_init_fn, _WorkerInit):
        loader.worker_init_fn = _WorkerInit(loader.worker_init_fn)
    return prepared


class JobTrainer(Trainer):
    """Trainer that reports each micro-step's loss to the stop guard, adds the job's values to each log,
    counts real tokens on the host (one process) when the collator is a `CountingCollator`, and gives its
    DataLoader workers a `worker_init_fn` that ignores SIGTERM/SIGINT."""

    def __init__(self, *args, stop_guard: StopCallback | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.stop_guard = stop_guard
        self._host_tokens: int | None = None

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.stop_guard is not None:
            self.stop_guard.saw_loss(loss)
        return loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Throughput, MFU and perplexity join the log first, so log_history and every reporter get them."""
        logs.update(extra_log_values(self.callback_handler.callbacks, self.args, self.state, logs))
        super().log(logs, start_time)

    def _prepare_inputs(self, inputs):
        # The host count must not reach the model (training and evaluation batches both pass here).
        self._host_tokens = inputs.pop(REAL_TOKENS_KEY, None)
        return super()._prepare_inputs(inputs)

    def _track_num_input_tokens(self, inputs):
        # Replaces a GPU gather + .item() per micro-step; several processes still need the Trainer's sum.
        if self._host_tokens is None or self.args.world_size > 1:
            return super()._track_num_input_tokens(inputs)
        self.state.num_input_tokens_seen += self._host_tokens
        self._host_tokens = None

    def get_train_dataloader(self):
        return _workers_ignore_signals(super().get_train_dataloader())

    def get_eval_dataloader(self, eval_dataset=None):
        return _workers_ignore_signals(super().get_eval_dataloader(eval_dataset))


def build_trainer(
    cfg: RunConfig, data=None, callbacks: list[TrainerCallback] | None = None, load_universal: bool = False
):
    """The Trainer for `cfg` (model, data, collator, guards); `data` overrides the prepared dataset (bench);
    `load_universal`: resume from the DeepSpeed universal checkpoint (another data-parallel world size)."""
    from job.model import build_model

    use_cpu = cfg.device == "cpu" or not torch.cuda.is_available()
    os.environ.setdefault("TENSORBOARD_LOGGING_DIR", str(Path(cfg.output_dir) / "tensorboard"))
    args = training_arguments(cfg, use_cpu=use_cpu)  # sets up the process group / DeepSpeed state
    if load_universal:  # before the Trainer hands the config to accelerate
        args.hf_deepspeed_config.config.setdefault("checkpoint", {})["load_universal"] = True
    if args.deepspeed:
        import deepspeed

        # ZeRO-3 partitions weights while they load (zero.Init): DeepSpeed's own comm layer must know the world
        # by then, or each rank believes it is alone.
        deepspeed.init_distributed(
            dist_backend=torch.distributed.get_backend() if torch.distributed.is_initialized() else None
        )
    set_seed(cfg.seed)
    tokenizer = load_tokenizer(cfg.tokenizer, cfg.trust_remote_code)
    model = build_model(cfg, tokenizer)
    data = data if data is not None else _load_prepared(cfg)
    # Training pads on the right (labels of padding become -100); generation keeps the tokenizer's side.
    train_tokenizer = copy.copy(tokenizer)
    train_tokenizer.padding_side = "right"
    collator = DataCollatorForLanguageModeling(train_tokenizer, mlm=False, pad_to_multiple_of=None if use_cpu else 8)
    if cfg.avoid_host_syncs:
        collator = CountingCollator(collator)
    stop_guard = StopCallback(cfg.max_nonfinite_steps)
    trainer = JobTrainer(
        model=model,
        args=args,
        train_dataset=data["train"],
        eval_dataset=data.get("eval"),
        data_collator=collator,
        processing_class=tokenizer,
        stop_guard=stop_guard,
        # after the Trainer's flow control; the monitors add nothing to the logs themselves (JobTrainer.log does)
        callbacks=[
            stop_guard,
            CheckpointCallback(cfg.save_total_limit),
            *(callbacks if callbacks is not None else _monitor_callbacks(cfg, model, use_cpu)),
        ],
    )
    if callbacks is None:
        trainer.remove_callback(PrinterCallback)  # prints every raw log dict; our ProgressCallback replaces it
    return trainer


def run_worker(cfg: RunConfig) -> int:
    """Train as configured; return the exit code (rank 0 also records it in STATUS_FILE)."""
    output = Path(cfg.output_dir)
    rank0 = int(os.environ.get("RANK", "0")) == 0
    stop_at_once()  # also when started by torchrun: the CLI's handlers are the launcher's, not ours
    try:
        return _train(cfg, output)
    except Stopped as e:
        last = checkpoints.latest_complete(output)
        if last is None:
            message = "before training began; nothing written to resume from. Run the same command again"
        elif checkpoints.finished(last, cfg.max_steps):
            message = f"after the last step; complete checkpoint {last}. Run again with --resume auto to export it"
        else:
            message = f"before training resumed; complete checkpoint {last}. Run again with --resume auto to continue"
        return _finish(output, rank0, EXIT_PREEMPTED, f"stopped by {e.signal_name} {message}")


def _train(cfg: RunConfig, output: Path) -> int:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # shard-writing bars; our ProgressCallback reports training
    resume = checkpoints.resume_point(cfg.resume, output)
    # written by another number of processes: the launcher made the universal checkpoint beside it
    universal = resume is not None and checkpoints.zero_world_size(resume) not in (
        None,
        int(os.environ.get("WORLD_SIZE", "1")),
    )
    trainer = build_trainer(cfg, load_universal=universal)  # from here on a signal stops at the next step boundary
    model, tokenizer, stop_guard = trainer.model, trainer.processing_class, trainer.stop_guard
    rank0 = trainer.args.process_index == 0
    if rank0:
        log.info("training %s; resume from %s", cfg.output_dir, resume or "scratch")
    _samples_before(cfg, model, tokenizer, rank0, resumed=resume is not None)  # kept on disk for the report
    started = time.time()
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)

    if stop_guard.reason == "diverged":
        last = checkpoints.latest_complete(output)
        message = (
            f"loss was not finite for {stop_guard.nonfinite_streak} consecutive steps at step "
            f"{trainer.state.global_step}; stopped. Last good checkpoint: {last or 'none'}. "
            "Lower --learning-rate or check the data, then resume with --resume auto"
        )
        return _finish(output, rank0, EXIT_DIVERGED, message)
    if stop_guard.reason == "signal":
        last = checkpoints.latest_complete(output)
        message = (
            f"stopped by {stop_guard.signal_name} at step {trainer.state.global_step}; complete checkpoint "
            f"{last}. Run again with --resume auto to continue"
        )
        return _finish(output, rank0, EXIT_PREEMPTED, message)

    final_metrics = _final_eval(trainer)  # every rank; a signal during it is only noted, then agreed on below
    last = checkpoints.latest_complete(output)
    if stop_guard.signalled_anywhere():
        message = (
            f"stopped by {stop_guard.signal_name} after the last step; complete checkpoint {last}. "
            "Run again with --resume auto to export it"
        )
        return _finish(output, rank0, EXIT_PREEMPTED, message)
    if last is None or checkpoints.step_of(last) != trainer.state.global_step:
        message = f"the last step ({trainer.state.global_step}) left no checkpoint (its loss was not finite)"
        return _finish(output, rank0, EXIT_DIVERGED, f"{message}; nothing exported. Resume with --resume auto")
    if not rank0:
        return EXIT_OK  # the export is rank 0's alone: no collective follows
    stop_at_once()  # the last checkpoint holds everything: a rerun redoes what follows from it
    if trainer.is_deepspeed_enabled:
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()  # else from_pretrained would partition (zero.Init) on rank 0 alone
    return publish(cfg, last, parameter_count(model), final_metrics, time.time() - started, trainer.args.world_size)


def publish(
    cfg: RunConfig,
    checkpoint: Path,
    expected_parameters: int | None = None,
    final_metrics: dict | None = None,
    seconds: float | None = None,
    processes: int | None = None,
) -> int:
    """Export the last checkpoint to OUTPUT/final, write the report and the verdict (one process).

    Also the whole of a rerun whose training had finished but whose export had not (`launch.train`).
    """
    output = Path(cfg.output_dir)
    state = checkpoints.trainer_state(checkpoint)
    if final_metrics is None:  # a rerun: the evaluation after the last step, if it was logged
        from job.report import read_metrics

        rows = [r for r in read_metrics(output / "metrics.jsonl") if "eval_loss" in r]
        rows = [r for r in rows if r.get("step") == state["global_step"]]
        final_metrics = rows[-1] if rows else {}
    final = checkpoints.export_final(checkpoint, output, expected_parameters)
    before_path = output / SAMPLES_BEFORE
    before = json.loads(before_path.read_text(encoding="utf-8")) if before_path.exists() else []
    from job.report import report_run

    report_run(cfg, state, processes, final, before, final_metrics, seconds)
    return _finish(output, True, EXIT_OK, f"model saved to {final}")


def _final_eval(trainer: Trainer) -> dict:
    """The held-out metrics at the last step: reuse the periodic evaluation if it fell on that step."""
    if trainer.eval_dataset is None:
        return {}
    last = next((h for h in reversed(trainer.state.log_history) if "eval_loss" in h), None)
    if last is not None and last.get("step") == trainer.state.global_step:
        return last
    return trainer.evaluate()


def _finish(output: Path, rank0: bool, code: int, message: str) -> int:
    if rank0:
        tmp = output / f".{STATUS_FILE}.tmp"
        tmp.write_text(json.dumps({"code": code, "message": message}) + "\n")
        tmp.replace(output / STATUS_FILE)
        log.info(message)
    return code


def _load_prepared(cfg: RunConfig):
    import datasets

    read_prepared_stats(cfg.prepared)  # fails with a clear message if it is not one
    data = datasets.load_from_disk(cfg.prepared)
    if "eval" in data and cfg.eval_batches:
        rows = cfg.eval_batches * cfg.per_device_batch_size * int(os.environ.get("WORLD_SIZE", "1"))
        data["eval"] = data["eval"].select(range(min(rows, len(data["eval"]))))
    return data


def _monitor_callbacks(cfg: RunConfig, model, use_cpu: bool) -> list[TrainerCallback]:
    from job.model import flops_per_token
    from job.monitor import MetricsFileCallback, ProgressCallback, ThroughputCallback, peak_tflops

    device = torch.device("cpu" if use_cpu else "cuda")
    return [
        ThroughputCallback(flops_per_token(model.config, cfg.max_length), peak_tflops(device)),
        MetricsFileCallback(Path(cfg.output_dir) / "metrics.jsonl"),
        ProgressCallback(),
    ]


def _samples_before(cfg: RunConfig, model, tokenizer, rank0: bool, resumed: bool) -> list[dict]:
    """Generations of the untrained model, kept on disk so a resumed run's report still has them."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    path = Path(cfg.output_dir) / SAMPLES_BEFORE
    if not rank0:
        return []
    if path.exists():
        return json.loads(path.read_text(encoding="utf-8"))
    if resumed or is_deepspeed_zero3_enabled() or not cfg.prompts:
        return []  # ZeRO-3 partitions the weights: rank 0 alone cannot generate
    from job.generate import generate

    samples = generate(model, tokenizer, cfg.prompts, max_new_tokens=32, greedy=True)
    path.write_text(json.dumps(samples, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    return samples
