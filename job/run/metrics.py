"""Live training metrics: throughput and MFU, a JSON-lines metrics file, a progress bar, a host token count.

The values the job adds to a log (tokens/s, MFU, perplexity) are added by `JobTrainer.log` through
`extra_log_values` before `Trainer.log` runs, so `trainer_state.json`'s `log_history`, TensorBoard and every
other reporter see them; the callbacks here only keep time, write and print.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

from job.core.metrics_log import TRAIN_BEGIN, MetricsRecord, record_line
from job.core.units import clock, peak_tflops_for_name, perplexity, significant, throughput

log = logging.getLogger("job")

TRAIN_LOG_KEY = "loss"  # present in the Trainer's periodic training logs only (eval logs carry eval_loss)


# ----------------------------------------------------------------------------------------------- peaks
def peak_tflops(device: torch.device | str | int | None = None) -> float | None:
    """The datasheet bf16 dense peak of a CUDA device in TFLOP/s; None for CPU or an unknown card."""
    if not torch.cuda.is_available():
        return None
    if isinstance(device, str):
        device = torch.device(device)
    if isinstance(device, torch.device):
        if device.type != "cuda":
            return None
        device = device.index if device.index is not None else torch.cuda.current_device()
    return peak_tflops_for_name(torch.cuda.get_device_name(device if device is not None else 0))


def measure_matmul_tflops(
    device: torch.device | str = "cuda", dtype: torch.dtype = torch.bfloat16, n: int = 8192, seconds: float = 1.0
) -> float:
    """The achieved TFLOP/s of a square matmul loop: a measured ceiling for MFU.

    On CPU it uses fp32 (CPU bf16 matmuls are emulated and slow) and n <= 512, and takes well under 2 s.
    """
    device = torch.device(device)
    cuda = device.type == "cuda"
    if not cuda:
        dtype, n, seconds = torch.float32, min(n, 512), min(seconds, 0.5)
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    with torch.inference_mode():
        for _ in range(3):  # warm-up: kernels chosen, clocks up
            torch.mm(a, b)
        sync()
        iters, started = 0, time.perf_counter()
        while True:
            for _ in range(10 if cuda else 1):
                torch.mm(a, b)
                iters += 1
            sync()
            elapsed = time.perf_counter() - started
            if elapsed >= seconds:
                break
    return 2.0 * n**3 * iters / elapsed / 1e12


def memory_gib() -> float:
    """Peak CUDA memory allocated by this process, else its resident set size, in GiB."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**30
    import psutil

    return psutil.Process().memory_info().rss / 2**30


# ----------------------------------------------------------------------------------------------- wiring
REAL_TOKENS_KEY = "job_real_tokens"  # rides in each batch from the collator to JobTrainer, never to the model


class CountingCollator:
    """A collator that also counts each batch's real (non-padding) tokens, on the host, as a Python int.

    The Trainer's own count (`include_num_input_tokens_seen`) gathers a GPU tensor and calls `.item()` on every
    micro-step, a host sync each time; this count is made where the batch is built (a DataLoader worker).
    """

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, features):
        batch = self.collator(features)
        mask = batch.get("attention_mask")
        batch[REAL_TOKENS_KEY] = int(mask.sum()) if mask is not None else int(batch["input_ids"].numel())
        return batch


def extra_log_values(callbacks, args, state, logs: dict) -> dict:
    """What the job adds to one Trainer log (called from `JobTrainer.log`, before the log reaches
    `log_history` and the reporters): throughput figures on training logs, a perplexity per held-out loss."""
    values: dict[str, float] = {}
    for cb in callbacks:
        if isinstance(cb, ThroughputCallback):
            values.update(cb.log_values(args, state, logs))
    for key in [k for k in logs if k.startswith("eval") and k.endswith("_loss")]:
        ppl = perplexity(logs[key])
        if ppl is not None:
            values[key[: -len("_loss")] + "_perplexity"] = ppl
    return values


# ----------------------------------------------------------------------------------------------- throughput
class ThroughputCallback(TrainerCallback):
    """tokens_per_s, tflops, tflops_per_device, mfu, mfu_measured, memory_gib and tokens_seen for each training
    log (`log_values`, through `extra_log_values`).

    Tokens are `state.num_input_tokens_seen` (real tokens: counted on the host by `CountingCollator`, or the
    Trainer's `include_num_input_tokens_seen="non_padding"` count, summed over ranks); the window is the wall
    time since the previous training log, less the time spent in evaluation and checkpoint saving, so the figure
    is training speed. The first window of a run (or of a
    resumed run) includes start-up: the report leaves it out.
    """

    def __init__(self, flops_per_token: float, peak_tflops: float | None, device_ceiling_tflops: float | None = None):
        self.flops_per_token = float(flops_per_token)
        self.peak_tflops = peak_tflops
        self.device_ceiling_tflops = device_ceiling_tflops
        self._window_start: float | None = None
        self._window_tokens = 0
        self._paused = 0.0
        self._mark = 0.0  # last moment training was known to be running
        self.last: dict[str, float] = {}  # the latest values, for the progress bar and tests

    def _start_window(self, state, now: float) -> None:
        self._window_start, self._window_tokens, self._paused, self._mark = now, state.num_input_tokens_seen, 0.0, now

    def on_train_begin(self, args, state, control, **kwargs):
        self._start_window(state, time.perf_counter())

    def on_step_end(self, args, state, control, **kwargs):
        self._mark = time.perf_counter()

    def _pause(self) -> None:
        """Evaluation or saving just ended: the time since training last ran is not training time."""
        if self._window_start is None:
            return
        now = time.perf_counter()
        self._paused += now - self._mark
        self._mark = now

    def on_evaluate(self, args, state, control, **kwargs):
        self._pause()

    def on_save(self, args, state, control, **kwargs):
        self._pause()

    def log_values(self, args, state, logs: dict) -> dict:
        """The figures for this log (training logs only), and a fresh window."""
        if TRAIN_LOG_KEY not in logs or self._window_start is None:
            return {}
        now = time.perf_counter()
        seconds = now - self._window_start - self._paused
        tokens = state.num_input_tokens_seen - self._window_tokens
        values: dict[str, float] = {
            "tokens_seen": int(state.num_input_tokens_seen),
            **throughput(
                tokens, seconds, self.flops_per_token, args.world_size, self.peak_tflops, self.device_ceiling_tflops
            ),
            "memory_gib": significant(memory_gib(), 4),
        }
        self.last = values
        self._start_window(state, now)
        return values


# ----------------------------------------------------------------------------------------------- metrics file
class MetricsFileCallback(TrainerCallback):
    """Appends every log (with step, epoch, time, tokens_seen) to a JSON-lines file on rank 0, flushed per line.

    Each training start appends `{"event": "train_begin", "step": N}`: a resumed run keeps the earlier lines and
    the report drops those that the resume repeats.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._file = None
        self._started = time.time()

    def _write(self, record: MetricsRecord) -> None:
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("a", encoding="utf-8")
        self._file.write(record_line(record))
        self._file.flush()

    def on_train_begin(self, args, state, control, **kwargs):
        self._started = time.time()
        if state.is_world_process_zero:
            self._write(
                {
                    "event": TRAIN_BEGIN,
                    "step": state.global_step,
                    "tokens_seen": state.num_input_tokens_seen,
                    "max_steps": state.max_steps,
                    "timestamp": round(self._started, 3),
                }
            )

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or not state.is_world_process_zero:
            return
        now = time.time()
        record: MetricsRecord = {
            **logs,
            "step": state.global_step,
            "epoch": state.epoch,
            "time": round(now - self._started, 3),
            "tokens_seen": state.num_input_tokens_seen,
            "timestamp": round(now, 3),
        }
        self._write(record)

    def on_train_end(self, args, state, control, **kwargs):
        if self._file is not None:
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __del__(self):
        self.close()


# ----------------------------------------------------------------------------------------------- progress
class ProgressCallback(TrainerCallback):
    """Steps, loss, tokens/s and time left on rank 0: a tqdm bar on a terminal, else a line every `interval_s`.

    Writes to stderr: the bar, else log records (or `stream`, if given). Trainer's own bar is off
    (`disable_tqdm=True`); `build_trainer` removes its PrinterCallback.
    """

    def __init__(self, interval_s: float = 30.0, stream=None, tty: bool | None = None):
        self.interval_s = interval_s
        self.stream = stream
        self.tty = tty
        self.bar = None
        self._started = 0.0
        self._first_step = 0
        self._last_line = 0.0
        self._latest: dict[str, float] = {}

    @property
    def _out(self):
        return self.stream if self.stream is not None else sys.stderr

    def _is_tty(self) -> bool:
        if self.tty is not None:
            return self.tty
        isatty = getattr(self._out, "isatty", None)
        return bool(isatty and isatty())

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        self._started = self._last_line = time.time()
        self._first_step = state.global_step
        if self._is_tty():
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=state.max_steps,
                initial=state.global_step,
                unit="step",
                file=self._out,
                dynamic_ncols=True,
                desc="train",
            )

    def _left(self, state) -> float | None:
        done = state.global_step - self._first_step
        if done <= 0 or not state.max_steps:
            return None
        return (time.time() - self._started) / done * (state.max_steps - state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)
            return
        now = time.time()
        if now - self._last_line >= self.interval_s or state.global_step >= state.max_steps:
            self._last_line = now
            self._print(self._line(state))

    def _line(self, state) -> str:
        parts = [
            f"step {state.global_step}/{state.max_steps}"
            + (f" ({100 * state.global_step / state.max_steps:.0f}%)" if state.max_steps else "")
        ]
        if "loss" in self._latest:
            parts.append(f"loss {self._latest['loss']:.4f}")
        if "tokens_per_s" in self._latest:
            parts.append(f"{self._latest['tokens_per_s']:,.0f} tok/s")
        if "mfu" in self._latest:
            parts.append(f"MFU {100 * self._latest['mfu']:.1f}%")
        parts.append(f"elapsed {clock(time.time() - self._started)}")
        parts.append(f"left {clock(self._left(state))}")
        return " | ".join(parts)

    def _print(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line, file=self._out)
        elif self.stream is None:
            log.info(line)  # a log line like the job's others (time, level, rank)
        else:
            print(line, file=self._out, flush=True)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        if "loss" in logs:
            self._latest = {k: v for k, v in logs.items() if isinstance(v, (int, float))}
            if self.bar is not None:
                post = {"loss": f"{logs['loss']:.4f}"}
                if "tokens_per_s" in logs:
                    post["tok/s"] = f"{logs['tokens_per_s']:,.0f}"
                if "mfu" in logs:
                    post["mfu"] = f"{100 * logs['mfu']:.1f}%"
                self.bar.set_postfix(post, refresh=False)
        evals = {k: v for k, v in logs.items() if k.startswith("eval_") and k.endswith(("_loss", "_perplexity"))}
        if evals:
            shown = ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in evals.items())
            self._print(f"eval at step {state.global_step}: {shown}")

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        elif state.is_world_process_zero:
            self._print(f"training ended at step {state.global_step} after {clock(time.time() - self._started)}")
