"""The monitoring callbacks in a real (tiny, CPU) JobTrainer run: tokens/s and MFU reach metrics.jsonl,
log_history and TensorBoard, eval logs get a perplexity, the host token count is exact, a resume appends; plus
the throughput window arithmetic and peaks."""

from __future__ import annotations

import copy
import io
import json
import math
import random
import time
from types import SimpleNamespace

import pytest
import torch

from job.core.units import peak_tflops_for_name
from job.run import metrics as monitor
from job.run.metrics import (
    CountingCollator,
    MetricsFileCallback,
    ProgressCallback,
    ThroughputCallback,
    extra_log_values,
    measure_matmul_tflops,
    peak_tflops,
)
from tests.conftest import tiny_bloom

STEPS, BATCH, LOG_EVERY = 8, 4, 2


def _lengths(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randint(5, 24) for _ in range(n)]


def _trainer(tokenizer, output, callbacks=(), resume_steps: int = STEPS):
    import datasets
    from transformers import DataCollatorForLanguageModeling, TrainingArguments

    from job.run.worker import JobTrainer

    model = tiny_bloom(len(tokenizer), hidden_size=32, n_head=2)
    rng = random.Random(0)
    train_rows = [[rng.randrange(4, len(tokenizer)) for _ in range(n)] for n in _lengths(STEPS * BATCH, 1)]
    eval_rows = [[rng.randrange(4, len(tokenizer)) for _ in range(n)] for n in _lengths(8, 2)]
    right = copy.copy(tokenizer)
    right.padding_side = "right"
    args = TrainingArguments(
        output_dir=str(output),
        max_steps=resume_steps,
        per_device_train_batch_size=BATCH,
        per_device_eval_batch_size=4,
        learning_rate=1e-3,
        logging_steps=LOG_EVERY,
        logging_first_step=True,
        eval_strategy="steps",
        eval_steps=4,
        eval_on_start=True,
        save_strategy="steps",
        save_steps=4,
        report_to=["tensorboard"],
        use_cpu=True,
        include_num_input_tokens_seen="non_padding",
        disable_tqdm=True,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        seed=0,
    )
    trainer = JobTrainer(
        model=model,
        args=args,
        train_dataset=datasets.Dataset.from_dict({"input_ids": train_rows}),
        eval_dataset=datasets.Dataset.from_dict({"input_ids": eval_rows}),
        data_collator=CountingCollator(DataCollatorForLanguageModeling(right, mlm=False)),
        processing_class=tokenizer,
        callbacks=list(callbacks),
    )
    return trainer, sum(len(r) for r in train_rows)


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_tokenizer):
    """Train 8 steps with our callbacks installed; then resume from checkpoint-4 into the same folder."""
    output = tmp_path_factory.mktemp("monitor") / "out"
    tb = output / "tensorboard"
    progress_out = io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TENSORBOARD_LOGGING_DIR", str(tb))
        ceiling = measure_matmul_tflops("cpu", torch.float32)
        throughput = ThroughputCallback(flops_per_token=1e6, peak_tflops=10.0, device_ceiling_tflops=ceiling)
        metrics = MetricsFileCallback(output / "metrics.jsonl")
        progress = ProgressCallback(interval_s=0, stream=progress_out, tty=False)
        trainer, real_tokens = _trainer(tiny_tokenizer, output, [throughput, metrics, progress])
        trainer.train()
        metrics.close()
        first_lines = (output / "metrics.jsonl").read_text(encoding="utf-8").splitlines()

        again = MetricsFileCallback(output / "metrics.jsonl")
        resumed, _ = _trainer(tiny_tokenizer, output, [ThroughputCallback(1e6, None), again])
        resumed.train(resume_from_checkpoint=str(output / "checkpoint-4"))
        again.close()
    return SimpleNamespace(
        output=output,
        tb=tb,
        trainer=trainer,
        real_tokens=real_tokens,
        first_lines=first_lines,
        progress=progress_out.getvalue(),
        ceiling=ceiling,
    )


def _records(lines):
    return [json.loads(line) for line in lines]


def test_metrics_file_has_throughput_and_perplexity(run):
    records = _records(run.first_lines)
    assert records[0]["event"] == "train_begin" and records[0]["step"] == 0
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == [1, 2, 4, 6, 8]
    for r in train:
        assert r["tokens_per_s"] > 0 and r["memory_gib"] > 0
        assert r["tflops"] == pytest.approx(r["tokens_per_s"] * 1e6 / 1e12, rel=1e-3)
        assert r["tflops_per_device"] == pytest.approx(r["tflops"], rel=1e-3)  # one process
        assert r["mfu"] == pytest.approx(r["tflops_per_device"] / 10.0, rel=1e-4)
        assert "mfu_measured" in r and {"epoch", "time", "tokens_seen", "step"} <= set(r)
    assert [r["tokens_seen"] for r in train] == sorted(r["tokens_seen"] for r in train)
    # one epoch exactly: the count is of real tokens (padding excluded), summed over the run
    assert train[-1]["tokens_seen"] == run.real_tokens
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in evals] == [0, 4, 8]
    for r in evals:
        assert r["eval_perplexity"] == pytest.approx(math.exp(r["eval_loss"]))
        assert "tokens_per_s" not in r


def test_tensorboard_gets_our_scalars(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = list(run.tb.rglob("events.out.tfevents.*"))
    assert files, f"no event files under {run.tb}"
    acc = EventAccumulator(str(files[0].parent))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/tokens_per_s", "train/tflops", "train/mfu", "train/memory_gib", "eval/perplexity"} <= tags, tags
    points = acc.Scalars("train/tokens_per_s")
    assert [p.step for p in points][:5] == [1, 2, 4, 6, 8] and all(p.value > 0 for p in points)


def test_log_history_holds_our_values_in_the_callbacks_given_order(run):
    """JobTrainer.log adds them before Trainer.log: trainer_state.json's log_history has them too, although the
    callbacks stay where Trainer(callbacks=...) puts them (after the reporters)."""
    from transformers.integrations import TensorBoardCallback

    kinds = [type(cb) for cb in run.trainer.callback_handler.callbacks]
    assert kinds.index(TensorBoardCallback) < kinds.index(ThroughputCallback)
    history = run.trainer.state.log_history
    train = [h for h in history if "loss" in h]
    assert train and all(h["tokens_per_s"] > 0 and "mfu" in h for h in train)
    assert all(h["eval_perplexity"] == pytest.approx(math.exp(h["eval_loss"])) for h in history if "eval_loss" in h)
    saved = json.loads((run.output / "checkpoint-8" / "trainer_state.json").read_text())["log_history"]
    assert any("tokens_per_s" in h for h in saved) and any("eval_perplexity" in h for h in saved)


def test_resume_appends_and_report_reads_one_history(run):
    from job.core.metrics_log import read_metrics

    lines = (run.output / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    assert lines[: len(run.first_lines)] == run.first_lines  # appended, not truncated
    markers = [r for r in _records(lines) if r.get("event") == "train_begin"]
    assert [m["step"] for m in markers] == [0, 4]
    history = read_metrics(run.output / "metrics.jsonl")
    train_steps = [r["step"] for r in history if "loss" in r]
    assert train_steps == [1, 2, 4, 6, 8]  # the resumed run's 6 and 8 replace the first run's
    assert [r["step"] for r in history if "eval_loss" in r] == [0, 4, 8]
    assert [r["step"] for r in history if r.get("warmup")] == [1, 6]


def test_progress_lines_without_a_terminal(run):
    assert "step 8/8 (100%)" in run.progress
    assert "tok/s" in run.progress and "left " in run.progress
    assert "eval at step 4: eval_loss" in run.progress
    assert "training ended at step 8" in run.progress


def test_progress_bar_on_a_terminal():
    from transformers import TrainerControl, TrainerState

    out = io.StringIO()
    cb = ProgressCallback(stream=out, tty=True)
    state = TrainerState(max_steps=4, global_step=0, is_world_process_zero=True)
    args, control = SimpleNamespace(), TrainerControl()
    cb.on_train_begin(args, state, control)
    for step in range(1, 5):
        state.global_step = step
        cb.on_step_end(args, state, control)
        cb.on_log(args, state, control, logs={"loss": 2.0, "tokens_per_s": 1234.0})
    cb.on_train_end(args, state, control)
    assert "4/4" in out.getvalue() and "tok/s" in out.getvalue()


def test_throughput_window_leaves_out_eval_and_save(monkeypatch):
    from transformers import TrainerControl, TrainerState

    clock = [100.0]
    monkeypatch.setattr(monitor.time, "perf_counter", lambda: clock[0])
    cb = ThroughputCallback(flops_per_token=2e9, peak_tflops=100.0, device_ceiling_tflops=50.0)
    state = TrainerState(num_input_tokens_seen=0, is_world_process_zero=True)
    args, control = SimpleNamespace(world_size=2, report_to=[]), TrainerControl()

    cb.on_train_begin(args, state, control)
    clock[0] += 5  # eval_on_start: 5 s, not training
    cb.on_evaluate(args, state, control)
    clock[0] += 1
    state.num_input_tokens_seen = 1000
    cb.on_step_end(args, state, control)
    clock[0] += 10  # an evaluation, then a save
    cb.on_evaluate(args, state, control)
    clock[0] += 4
    cb.on_save(args, state, control)
    clock[0] += 1
    state.num_input_tokens_seen = 2000
    cb.on_step_end(args, state, control)
    logs = extra_log_values([cb], args, state, {"loss": 1.0})
    assert logs["tokens_per_s"] == pytest.approx(1000.0)  # 2000 tokens in 2 s of training
    assert logs["tflops"] == pytest.approx(2.0) and logs["tflops_per_device"] == pytest.approx(1.0)
    assert logs["mfu"] == pytest.approx(0.01) and logs["mfu_measured"] == pytest.approx(0.02)
    assert logs["tokens_seen"] == 2000

    eval_logs = extra_log_values([cb], args, state, {"eval_loss": 1.0})
    assert "tokens_per_s" not in eval_logs  # only training logs carry throughput
    assert eval_logs["eval_perplexity"] == pytest.approx(math.e)
    clock[0] += 3
    state.num_input_tokens_seen = 2600
    logs = extra_log_values([cb], args, state, {"loss": 1.0})
    assert logs["tokens_per_s"] == pytest.approx(200.0)  # a fresh window after each log


def test_metrics_file_only_on_rank_zero_and_nonfinite_as_null(tmp_path):
    from transformers import TrainerControl, TrainerState

    path = tmp_path / "m" / "metrics.jsonl"
    args, control = SimpleNamespace(report_to=[]), TrainerControl()
    other = MetricsFileCallback(path)
    other.on_train_begin(args, TrainerState(is_world_process_zero=False), control)
    other.on_log(args, TrainerState(is_world_process_zero=False), control, logs={"eval_loss": 2.0})
    assert not path.exists()

    cb = MetricsFileCallback(path)
    state = TrainerState(is_world_process_zero=True, global_step=3)
    logs = {"loss": float("nan"), "eval_loss": float("inf")}
    logs.update(extra_log_values([], args, state, logs))
    cb.on_log(args, state, control, logs=logs)
    record = json.loads(path.read_text().splitlines()[-1])  # strict JSON, written before close
    assert record["loss"] is None and record["step"] == 3 and "eval_perplexity" not in record
    cb.close()


def test_peaks_by_device_name():
    assert peak_tflops_for_name("NVIDIA H100 80GB HBM3") == 989.0
    assert peak_tflops_for_name("NVIDIA H100 PCIe") == 756.0
    assert peak_tflops_for_name("NVIDIA H200") == 989.0
    assert peak_tflops_for_name("NVIDIA A100-SXM4-80GB") == 312.0
    assert peak_tflops_for_name("NVIDIA L40S") == 362.0
    assert peak_tflops_for_name("NVIDIA L4") == 121.0
    assert peak_tflops_for_name("NVIDIA A10G") == 125.0
    assert peak_tflops_for_name("Tesla V100-SXM2-16GB") is None
    assert peak_tflops("cpu") is None


def test_measured_cpu_ceiling_is_quick():
    started = time.perf_counter()
    tflops = measure_matmul_tflops("cpu", torch.float32)
    assert time.perf_counter() - started < 60  # a fixed small amount of work: seconds even on a loaded machine
    assert 0 < tflops < 100


def test_report_from_the_run(run):
    from PIL import Image

    from job.run.report import write_report

    samples = [{"prompt": "北京", "before": "随机</s>", "after": "是中国的首都。"}]
    hardware = {"device": "cpu", "processes": 1, "torch": torch.__version__}
    summary = {
        "steps": STEPS,
        "tokens_seen": run.real_tokens,
        "seconds": 3.2,
        "final_eval_loss": None,
        "flops_per_token": 1e6,
    }
    report = write_report(run.output, {"max_length": 64, "prompts": ["北京"]}, hardware, summary, samples)
    text = report.read_text(encoding="utf-8")
    for png, size in (("loss.png", (880, 495)), ("throughput.png", (880, 715))):  # 8 x 4.5 (6.5) in at 110 dpi
        path = run.output / png
        assert path.stat().st_size > 10_000, png
        with Image.open(path) as image:
            assert image.size == size  # the throughput figure has an MFU panel: the run logged MFU
        assert f"]({png})" in text
    assert "是中国的首都。" in text and "随机&lt;/s&gt;" in text
    assert "mean tokens/s" in text and "perplexity" in text
