"""The worker: one process per device, started by `launch.py`, reading the effective `run_config.json`.

Trainer + DeepSpeed as configured; callbacks for checkpoint completion and rotation, signals,
non-finite losses and live throughput; at the end a verified HF export in `OUTPUT/final` and a report.

Signals: until the Trainer is built a SIGTERM/SIGINT stops at once (`signals.Stopped`, nothing to keep); in
training and evaluation it stops every rank at the next step boundary after a complete checkpoint; after the
last step it stops at once again, because the last checkpoint already holds everything and a rerun redoes
the export from it (`finish_run`).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import signal
import time
import weakref
from pathlib import Path
from typing import NoReturn

import torch
from transformers import DataCollatorForLanguageModeling, Trainer, TrainerCallback, set_seed
from transformers.trainer_callback import PrinterCallback

from job.core import checkpoints, run_files
from job.core.config import RunConfig
from job.core.errors import (
    EXIT_CRASH,
    EXIT_DIVERGED,
    EXIT_OK,
    EXIT_PREEMPTED,
    JobError,
    crash_summary,
    raise_if_disk_full,
)
from job.core.files import atomic_write_json
from job.core.logs import adopt_library_loggers, prints_logged
from job.core.metrics_log import eval_losses
from job.core.signals import STOP_SIGNALS, Stopped, die_with_parent, ignore_stop_signals, stop_at_once
from job.core.units import flops_per_token
from job.data.mix import load_mix, prepared_splits
from job.data.prepare import load_prepared
from job.data.tokenizer import load_tokenizer
from job.model.build import build_model, parameter_count
from job.model.patches import apply_patches, model_patches
from job.run.finish import finish_run, record_verdict
from job.run.launch_record import Launch, read_launch
from job.run.metrics import REAL_TOKENS_KEY, CountingCollator, extra_log_values
from job.run.op_builds import guard_op_builds
from job.run.private_apis import require_private_apis
from job.run.tracking import continue_tracking, prepare_tracking
from job.run.training_args import training_arguments

log = logging.getLogger("job")


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

    def on_step_end(self, args, state, control, **kwargs):
        # After the flow and stop callbacks (which decide): the Trainer saves now. Claim the folder first.
        if control.should_save and state.is_world_process_zero:
            checkpoints.begin(Path(args.output_dir), state.global_step)
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
    """A DataLoader `worker_init_fn`: the Trainer's own (seeding), then signals ignored (`ignore_stop_signals`), and
    death with the rank (SIGKILL when it dies: a worker holds nothing worth saving).

    torch's workers die on a SIGTERM that is not from their parent, and torchrun, a terminal or `timeout`
    signal the whole process group: without this a worker dies first and the rank crashes before it saves.
    Because they ignore SIGTERM, the rank stops them itself at its end (`stop_dataloader_workers`).
    """

    def __init__(self, inner, parent: int):
        self.inner = inner
        self.parent = parent

    def __call__(self, worker_id: int) -> None:
        if self.inner is not None:
            self.inner(worker_id)
        ignore_stop_signals()
        die_with_parent(signal.SIGKILL, self.parent)


# Every DataLoader this process handed the Trainer: their workers are shut down when the rank ends.
_LOADERS: weakref.WeakSet = weakref.WeakSet()


def stop_dataloader_workers(timeout_s: float = 5.0) -> int:
    """Shut down the DataLoader workers of this process, however the run ended; returns how many had to be killed.

    Workers ignore SIGTERM (above), and persistent ones outlive the training loop: at interpreter exit,
    multiprocessing's exit handler would send them SIGTERM and then wait for them forever (a finished run that
    never exits holds its GPUs). torch's own shutdown asks them to stop; any still alive after it is killed.
    """
    workers, killed = [], 0
    for loader in list(_LOADERS):
        iterator = getattr(loader, "_iterator", None)
        if iterator is None:
            continue
        workers += list(getattr(iterator, "_workers", []))
        shutdown = getattr(iterator, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
        loader._iterator = None
    for worker in workers:
        worker.join(timeout_s if worker.is_alive() else 0)
        if worker.is_alive():
            worker.kill()
            worker.join(timeout_s)
            killed += 1
    return killed


def _workers_ignore_signals(prepared):
    loader = getattr(prepared, "base_dataloader", prepared)  # accelerate wraps the torch DataLoader
    if loader.num_workers and not isinstance(loader.worker_init_fn, _WorkerInit):
        loader.worker_init_fn = _WorkerInit(loader.worker_init_fn, os.getpid())
    _LOADERS.update({prepared, loader})
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

    # Private Trainer methods (job.run.private_apis: the transformers releases they were written for).
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
        if not (isinstance(self.eval_dataset, dict) and len(self.eval_dataset) > 1):
            return _workers_ignore_signals(super().get_eval_dataloader(eval_dataset))
        # A mix: one held-out set per source. Persistent loaders would keep `dataloader_workers` idle processes per
        # source for the whole run (100 for 50 sources); each source's workers end with its evaluation instead, so
        # at most one set is alive per process, whatever the number of sources.
        persistent = self.args.dataloader_persistent_workers
        self.args.dataloader_persistent_workers = False
        try:
            return _workers_ignore_signals(super().get_eval_dataloader(eval_dataset))
        finally:
            self.args.dataloader_persistent_workers = persistent


def training_collator(tokenizer, count_tokens: bool, pad_to_multiple_of: int | None = None):
    """Batches for causal-LM training: padded on the right, labels = input ids with padding masked (-100; the
    model shifts them), eos labels kept (pad != eos, checked when the tokenizer loads); with `count_tokens` each
    batch also carries its real-token count for the host (`CountingCollator`). The tokenizer itself keeps its
    padding side (left, for generation)."""
    train_tokenizer = copy.copy(tokenizer)
    train_tokenizer.padding_side = "right"
    collator = DataCollatorForLanguageModeling(train_tokenizer, mlm=False, pad_to_multiple_of=pad_to_multiple_of)
    return CountingCollator(collator) if count_tokens else collator


def build_trainer(
    cfg: RunConfig,
    launch: Launch,
    data=None,
    callbacks: list[TrainerCallback] | None = None,
    load_universal: bool = False,
):
    """The Trainer for `cfg` as `launch` resolved it (model, data, collator, guards); `data` overrides the prepared
    dataset (bench); `load_universal`: resume from the DeepSpeed universal checkpoint (another world size)."""
    require_private_apis()  # JobTrainer's overrides: also where no preflight ran (bench)
    guard_op_builds()  # before DeepSpeed's comm layer builds its first op
    use_cpu = launch.device == "cpu"
    os.environ.setdefault("TENSORBOARD_LOGGING_DIR", str(Path(cfg.output_dir) / run_files.TENSORBOARD))
    splits = data if data is not None else prepared_splits(cfg)
    if cfg.eval_fraction > 0 and "eval" not in splits:
        log.warning("the data has no held-out split (too few documents, or prepared without one): no evaluation")
    with prints_logged("deepspeed"):  # DeepSpeed print()s as it builds its ops: into the log's format
        # sets up the process group / DeepSpeed state
        args = training_arguments(cfg, use_cpu=use_cpu, has_eval=cfg.eval_fraction > 0 and "eval" in splits)
        if load_universal:  # before the Trainer hands the config to accelerate
            args.hf_deepspeed_config.config.setdefault("checkpoint", {})["load_universal"] = True
        if args.deepspeed:
            import deepspeed

            # ZeRO-3 partitions weights while they load (zero.Init): DeepSpeed's own comm layer must know the world
            # by then, or each rank believes it is alone.
            deepspeed.init_distributed(
                dist_backend=torch.distributed.get_backend() if torch.distributed.is_initialized() else None
            )
    adopt_library_loggers()  # transformers and DeepSpeed are loaded now: their records in our format
    set_seed(cfg.seed)
    tokenizer = load_tokenizer(cfg.tokenizer, cfg.trust_remote_code)
    model = build_model(cfg, tokenizer)
    # The fast paths, each named in the log (or why it is not installed and which stock path runs instead).
    from transformers.integrations import is_deepspeed_zero3_enabled

    patches = model_patches(cfg, launch.device, zero3=is_deepspeed_zero3_enabled(), attention=launch.attention)
    apply_patches(model, patches)
    data = data if data is not None else _load_prepared(cfg, launch)
    collator = training_collator(
        tokenizer, count_tokens=cfg.avoid_host_syncs, pad_to_multiple_of=None if use_cpu else 8
    )
    stop_guard = StopCallback(cfg.max_nonfinite_steps)
    # the folder's W&B / MLflow run, in the environment the Trainer's callbacks read as it builds them
    tracking = prepare_tracking(Path(cfg.output_dir), args.report_to, rank0=args.process_index == 0)
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
    if tracking is not None:
        continue_tracking(trainer, tracking)
    if callbacks is None:
        trainer.remove_callback(PrinterCallback)  # prints every raw log dict; our ProgressCallback replaces it
    return trainer


def run_worker(cfg: RunConfig, launch: Launch | None = None) -> int:
    """Train as configured and launched (default: the launch its launcher handed on); return the exit code (rank 0
    also records it in run_files.EXIT_STATUS)."""
    output = Path(cfg.output_dir)
    launch = launch or read_launch(output)
    rank0 = int(os.environ.get("RANK", "0")) == 0
    stop_at_once()  # also when started by torchrun: the CLI's handlers are the launcher's, not ours
    if os.environ.get("TORCHELASTIC_RUN_ID"):  # started by torchrun: a SIGKILLed torchrun stops this rank (checkpoint)
        die_with_parent(signal.SIGTERM)
    try:
        return _train(cfg, launch, output)
    except Stopped as e:
        last = checkpoints.latest_complete(output)
        if last is None:
            message = "before training began; nothing written to resume from. Run the same command again"
        elif checkpoints.finished(last, cfg.max_steps):
            message = f"after the last step; complete checkpoint {last}. Run again with --resume auto to export it"
        else:
            message = f"before training resumed; complete checkpoint {last}. Run again with --resume auto to continue"
        return record_verdict(output, rank0, EXIT_PREEMPTED, f"stopped by {e.signal_name} {message}")
    except Exception as e:
        _crashed(output, rank0, e)
    finally:
        stop_dataloader_workers()
        _leave_process_group()


def _crashed(output: Path, rank0: bool, error: Exception) -> NoReturn:
    """Every ending has a verdict: bad input found in a worker and a write the disk refused (full, over quota, over
    a file-size limit) are raised as their one-line JobError; any other error is recorded as a crash, then raised
    (its traceback in the log). Either way the process fails, and torchrun stops the other ranks."""
    try:
        raise_if_disk_full(error, output)
        if isinstance(error, JobError):
            raise error
    except JobError as refusal:
        if rank0:
            run_files.write_status_if_possible(output, refusal.exit_code, f"error: {refusal}")
        raise refusal from None  # the CLI prints its one line and exits with its code
    if rank0:
        run_files.write_status_if_possible(output, EXIT_CRASH, f"crash: {crash_summary(error)}")
    raise error


def _leave_process_group() -> None:
    """Destroy the process group before the interpreter exits, as torch asks: left to the exit-time destructors,
    gloo's worker threads may still run, and a rank that had finished can abort (std::terminate, SIGABRT), which
    torchrun reports as a failed run."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _train(cfg: RunConfig, launch: Launch, output: Path) -> int:
    resume = checkpoints.resume_point(cfg.resume, output)
    # written by another number of processes: the launcher made the universal checkpoint beside it. From here on a
    # signal stops at the next step boundary.
    trainer = build_trainer(cfg, launch, load_universal=launch.loads_universal(resume))
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
        return record_verdict(output, rank0, EXIT_DIVERGED, message)
    if stop_guard.reason == "signal":
        last = checkpoints.latest_complete(output)
        message = (
            f"stopped by {stop_guard.signal_name} at step {trainer.state.global_step}; complete checkpoint "
            f"{last}. Run again with --resume auto to continue"
        )
        return record_verdict(output, rank0, EXIT_PREEMPTED, message)

    final_metrics = _final_eval(trainer)  # every rank; a signal during it is only noted, then agreed on below
    last = checkpoints.latest_complete(output)
    if stop_guard.signalled_anywhere():
        message = (
            f"stopped by {stop_guard.signal_name} after the last step; complete checkpoint {last}. "
            "Run again with --resume auto to export it"
        )
        return record_verdict(output, rank0, EXIT_PREEMPTED, message)
    if last is None or checkpoints.step_of(last) != trainer.state.global_step:
        message = f"the last step ({trainer.state.global_step}) left no checkpoint (its loss was not finite)"
        return record_verdict(output, rank0, EXIT_DIVERGED, f"{message}; nothing exported. Resume with --resume auto")
    if not rank0:
        return EXIT_OK  # the export is rank 0's alone: no collective follows
    stop_at_once()  # the last checkpoint holds everything: a rerun redoes what follows from it
    if trainer.is_deepspeed_enabled:
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()  # else from_pretrained would partition (zero.Init) on rank 0 alone
    return finish_run(cfg, launch, last, parameter_count(model), final_metrics, time.time() - started)


def _final_eval(trainer: Trainer) -> dict:
    """The held-out metrics at the last step (a mix: every source's): reuse the periodic evaluation if it fell on
    that step."""
    if trainer.eval_dataset is None:
        return {}
    wanted = set(trainer.eval_dataset) if isinstance(trainer.eval_dataset, dict) else {""}
    last: dict = {}
    for h in trainer.state.log_history:
        if h.get("step") == trainer.state.global_step and eval_losses(h):
            last.update(h)
    if set(eval_losses(last)) == wanted:
        return last
    return trainer.evaluate()


def _load_prepared(cfg: RunConfig, launch: Launch):
    # memory-mapped; fails with a clear message if it is not one. A mix: its sources interleaved, an eval set each
    spec = cfg.prepared
    data = load_mix(spec, cfg.seed, cfg.mix_until) if spec.mixed else load_prepared(spec.path)
    if "eval" in data:
        data["eval"] = _predictable(data["eval"])
    if "eval" in data and cfg.eval_batches:
        rows = cfg.eval_batches * cfg.per_device_batch_size * launch.world_size
        first = lambda split: split.select(range(min(rows, len(split))))
        evals = data["eval"]
        data["eval"] = {n: first(e) for n, e in evals.items()} if isinstance(evals, dict) else first(evals)
    return data


def _predictable(evals):
    """The held-out rows that hold something to predict (a mix: per source). A row of one token has no next token:
    a batch of only such rows (a held-out document of exactly max_length tokens leaves its eos alone in a row) would
    make the held-out loss 0/0 = NaN. Dropping them changes no loss: they hold no target."""
    import pyarrow.compute as pc

    def keep(split):
        lengths = pc.list_value_length(split.with_format("arrow")["input_ids"]).to_numpy(zero_copy_only=False)
        rows = (lengths > 1).nonzero()[0]
        return split if len(rows) == len(split) else split.select(rows)  # an in-memory index: nothing written

    kept = {name: keep(split) for name, split in evals.items()} if isinstance(evals, dict) else {"": keep(evals)}
    empty = sorted(name for name, split in kept.items() if len(split) == 0)
    if len(empty) == len(kept):
        raise JobError(
            "no held-out row has a token to predict (each is a lone token)",
            "raise --eval-fraction, or use --eval-fraction 0",
        )
    for name in empty:
        log.warning("source %s: no held-out row has a token to predict; it is not evaluated", name)
        del kept[name]
    return kept if isinstance(evals, dict) else kept[""]


def _monitor_callbacks(cfg: RunConfig, model, use_cpu: bool) -> list[TrainerCallback]:
    from job.run.metrics import MetricsFileCallback, ProgressCallback, ThroughputCallback, peak_tflops

    device = torch.device("cpu" if use_cpu else "cuda")
    return [
        ThroughputCallback(flops_per_token(model.config, cfg.max_length), peak_tflops(device)),
        MetricsFileCallback(Path(cfg.output_dir) / run_files.METRICS),
        ProgressCallback(),
    ]


def _samples_before(cfg: RunConfig, model, tokenizer, rank0: bool, resumed: bool) -> list[dict]:
    """Generations of the untrained model, kept on disk so a resumed run's report still has them."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    path = Path(cfg.output_dir) / run_files.SAMPLES_BEFORE
    if not rank0:
        return []
    if path.exists():
        return json.loads(path.read_text(encoding="utf-8"))
    if resumed or is_deepspeed_zero3_enabled() or not cfg.prompts:
        return []  # ZeRO-3 partitions the weights: rank 0 alone cannot generate
    from job.model.generate import generate
    from job.model.sampling import READING_SAMPLES

    samples = generate(model, tokenizer, cfg.prompts, max_new_tokens=32, **READING_SAMPLES)
    atomic_write_json(path, samples)
    return samples
