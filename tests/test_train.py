"""The worker end to end on one CPU process: train, checkpoint, export, reload, smoke, report; plus the
collator's label semantics and the guard against a diverging loss."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from job.core.config import RunConfig
from tests.conftest import REPO, launch_of, train_args

pytestmark = pytest.mark.slow


def _env():
    return {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}


def quickstart_args(data: Path, tokenizer: Path, output: Path, **options) -> list[str]:
    """`train` as a user starts it: the quickstart recipe on DATA with TOKENIZER into OUTPUT, then OPTIONS."""
    return train_args(tiny=False, config="quickstart", data=data, tokenizer=tokenizer, output_dir=output, **options)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_tokenizer_dir):
    """`python -m job train` as a user runs it: tiny preset, DeepSpeed ZeRO-2 (the default file), one process."""
    from job.data.corpus import builtin_articles
    from tests.conftest import write_jsonl

    root = tmp_path_factory.mktemp("train")
    write_jsonl(root / "docs.jsonl", builtin_articles()[:300])
    output = root / "out"
    args = quickstart_args(
        root / "docs.jsonl",
        tiny_tokenizer_dir,
        output,
        max_length=64,
        max_steps=40,
        per_device_batch_size=8,
        grad_accum=1,
        logging_steps=5,
        eval_steps=20,
        save_steps=20,
        learning_rate="3e-3",
        eval_fraction=0.1,
    )
    env = {**_env(), "JOB_TERMINATION_LOG": str(root / "termination-log")}
    proc = subprocess.run(
        [sys.executable, "-m", "job", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=root,
        timeout=900,
        preexec_fn=lambda: os.umask(0o022),  # the usual umask: what the job writes must then be readable by all
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return output, proc


def test_everything_the_run_wrote_is_readable_by_other_users(trained):
    """One permission policy (the umask's): a serving pod or a colleague with another uid reads the export, the
    checkpoints, the report and the prepared data (libraries write 0600 files and 0700 folders through mkstemp)."""
    import stat

    output, _ = trained
    cfg = RunConfig.load(str(output / "run_config.json"))
    written = [output, *output.rglob("*"), Path(cfg.prepared.path), *Path(cfg.prepared.path).rglob("*")]
    unreadable = [
        str(p)
        for p in written
        if not p.is_symlink() and p.name != "job.lock" and (stat.S_IMODE(p.stat().st_mode) & 0o044) != 0o044
    ]
    assert unreadable == [], unreadable[:10]
    assert stat.S_IMODE((output / "final" / "model.safetensors").stat().st_mode) == 0o644


def test_final_folder_reloads_with_stock_transformers(trained):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    output, _ = trained
    final = output / "final"
    assert (final / "model.safetensors").stat().st_size > 0
    model = AutoModelForCausalLM.from_pretrained(final)
    tokenizer = AutoTokenizer.from_pretrained(final)
    assert model.config.model_type == "bloom"
    assert model.config.eos_token_id == tokenizer.eos_token_id == 2 and tokenizer.pad_token_id == 3
    assert all(p.numel() > 0 and p.isfinite().all() for p in model.parameters())


def test_run_config_checkpoints_and_status(trained):
    output, proc = trained
    cfg = RunConfig.load(str(output / "run_config.json"))
    assert (cfg.max_length, cfg.max_steps, cfg.per_device_batch_size) == (64, 40, 8)
    assert cfg.prepared and cfg.tokenizer  # resolved folders, read by every worker
    assert sorted(p.name for p in output.glob("checkpoint-*")) == ["checkpoint-20", "checkpoint-40"]
    assert all((p / "COMPLETE").exists() for p in output.glob("checkpoint-*"))
    assert json.loads((output / "exit_status.json").read_text())["code"] == 0
    assert "final" in proc.stdout


def test_every_log_line_has_time_level_and_rank_and_the_verdict_is_the_termination_message(trained):
    from tests.test_logs import LINE

    output, proc = trained
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines and [line for line in lines if not LINE.match(line)] == [], proc.stderr[-3000:]
    assert not any(noise in proc.stderr for noise in ("Setting accelerator to CPU", "built successfully"))
    assert (output.parent / "termination-log").read_text().splitlines() == [
        "exit 0 (success)",
        f"model saved to {output / 'final'}",
        "last step: 40",
        f"checkpoint: {output / 'checkpoint-40'}",
        f"model: {output / 'final'}",
    ]


def test_final_carries_a_model_card_with_the_runs_figures(trained):
    from huggingface_hub import ModelCard

    output, _ = trained
    card = ModelCard.load(output / "final" / "README.md")
    assert card.data.language == ["zh"] and card.data.license == "other" and card.data.pipeline_tag == "text-generation"
    assert "| optimizer steps | 40 |" in card.text and "| held-out loss after training |" in card.text


def test_held_out_loss_falls_and_metrics_are_logged(trained):
    output, _ = trained
    rows = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval_loss" in r]
    assert len(evals) >= 3  # at the start, at step 20, at the end
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"] - 0.5  # nats: well past noise
    assert math.isclose(evals[-1]["eval_perplexity"], math.exp(evals[-1]["eval_loss"]), rel_tol=1e-6)
    assert any(r.get("tokens_per_s", 0) > 0 for r in rows)


def test_report_and_tensorboard(trained):
    output, _ = trained
    report = (output / "report.md").read_text(encoding="utf-8")
    assert "loss.png" in report and "perplexity" in report.lower()
    assert (output / "loss.png").stat().st_size > 5000
    assert list((output / "tensorboard").rglob("events.out.tfevents.*"))


def test_smoke_passes_in_a_fresh_process(trained):
    output, _ = trained
    proc = subprocess.run(
        [sys.executable, "-m", "job", "smoke", "--model", str(output / "final")],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(proc.stdout)
    assert result["ok"] is True and all(result["checks"].values())


def test_a_run_trains_on_a_sharded_prepared_dataset(tmp_path, tiny_tokenizer_dir):
    """Two `prepare --shard` processes into one folder, then `train --prepared` on the set (the worker reads it
    through `load_prepared`): it trains, and the held-out loss is logged. 300 documents are one block, so shard 1
    is empty here; tests/test_prepare.py concatenates non-empty shards."""
    args = ["--tokenizer", str(tiny_tokenizer_dir), "--max-samples", "300", "--max-length", "64"]
    for shard in ("1/2", "0/2"):
        proc = subprocess.run(
            [sys.executable, "-m", "job", "prepare", *args, "--shard", shard, "--output", str(tmp_path / "set")],
            capture_output=True,
            text=True,
            env=_env(),
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "set" / "shards.json").exists()
    run = train_args(
        prepared=tmp_path / "set",
        tokenizer=tiny_tokenizer_dir,
        preset="tiny",
        max_steps=2,
        deepspeed="none",
        report_to="none",
        eval_batches=1,
        nproc=1,
        grad_accum=1,
        device="cpu",
        output_dir=tmp_path / "run",
    )
    proc = subprocess.run([sys.executable, "-m", "job", *run], capture_output=True, text=True, env=_env(), timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("eval_loss" in r for r in records)


def test_training_batches_keep_eos_labels_mask_padding_and_count_real_tokens(tiny_tokenizer):
    """The worker's collator: right padding whatever the tokenizer's side, eos labels kept, padding masked, the real
    tokens counted on the host, and the tokenizer (left-padding, for generation) left as it was."""
    from job.run.metrics import REAL_TOKENS_KEY
    from job.run.worker import training_collator

    eos, pad = tiny_tokenizer.eos_token_id, tiny_tokenizer.pad_token_id
    side = tiny_tokenizer.padding_side
    batch = training_collator(tiny_tokenizer, count_tokens=True)([{"input_ids": [10, 11, eos]}, {"input_ids": [12]}])
    assert batch["input_ids"].tolist() == [[10, 11, eos], [12, pad, pad]]
    assert batch["labels"].tolist() == [[10, 11, eos], [12, -100, -100]]  # the shift happens inside the model
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch[REAL_TOKENS_KEY] == 4
    assert tiny_tokenizer.padding_side == side == "left"
    plain = training_collator(tiny_tokenizer, count_tokens=False, pad_to_multiple_of=8)([{"input_ids": [10, eos]}])
    assert REAL_TOKENS_KEY not in plain and plain["input_ids"].shape == (1, 8)


def test_diverging_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, tiny_tokenizer, docs_jsonl):
    import torch

    from job.core.checkpoints import complete_checkpoints
    from job.data.prepare import prepare
    from job.run.worker import build_trainer

    cfg = RunConfig.load(
        data=str(docs_jsonl),
        tokenizer=tiny_tokenizer.name_or_path,
        output_dir=str(tmp_path / "o"),
        max_length=8,
        per_device_batch_size=2,
        grad_accum=1,
        max_steps=20,
        save_steps=2,
        deepspeed="none",
        report_to="none",
        eval_fraction=0.0,
        dataloader_workers=0,
        max_nonfinite_steps=3,
        prompts=[],
    )
    cfg = dataclasses.replace(cfg, prepared=str(prepare(cfg, tiny_tokenizer).path))
    trainer = build_trainer(cfg, launch_of(cfg), callbacks=[])
    real_compute_loss = trainer.compute_loss

    def poisoned(model, inputs, **kwargs):  # the loss turns NaN from step 5 on, as after a blow-up
        loss = real_compute_loss(model, inputs, **kwargs)
        return loss * float("nan") if trainer.state.global_step >= 4 else loss

    trainer.compute_loss = poisoned
    trainer.train()
    assert trainer.stop_guard.reason == "diverged"
    assert trainer.state.global_step == 4 + 3  # three non-finite steps in a row, then stop
    kept = [p.name for p in complete_checkpoints(tmp_path / "o")]
    assert kept[-1] == "checkpoint-4"  # nothing saved from a non-finite step
    assert torch.isfinite(
        torch.load(tmp_path / "o" / "checkpoint-4" / "rng_state.pth", weights_only=False)["cpu"].float()
    ).all()


# Kill both workers of a 2-worker DataLoader after its first batch, then read the rest. Run in a fresh process:
# the unhooked case leaves torch's loader in a state where a dead worker may be found (RuntimeError) or the
# read may hang, and neither belongs in the test runner's own process.
_KILL_WORKERS = """
import os, signal, sys
from accelerate.data_loader import DataLoaderShard
from job.run.worker import _workers_ignore_signals

prepared = DataLoaderShard(list(range(64)), batch_size=2, num_workers=2)  # what Trainer.get_*_dataloader give
if sys.argv[1] == "hooked":
    _workers_ignore_signals(prepared)
batches = iter(prepared.base_dataloader)
next(batches)
for worker in batches._workers:
    os.kill(worker.pid, signal.SIGTERM)
    worker.join(timeout=2)
print("batches after the signal:", sum(1 for _ in batches), flush=True)
"""


@pytest.mark.parametrize("hooked", [True, False])
def test_dataloader_workers_survive_a_sigterm_to_the_group(hooked):
    """torchrun, a terminal and `timeout` signal the whole process group: the workers must leave it to the rank."""
    argv = [sys.executable, "-c", _KILL_WORKERS, "hooked" if hooked else "plain"]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, env=_env(), timeout=60)
    except subprocess.TimeoutExpired:
        done = None  # a loader waiting forever on its dead workers
    if hooked:
        assert done is not None and done.returncode == 0, done and done.stderr[-2000:]
        assert "batches after the signal: 31" in done.stdout
    else:  # the check itself can fail: torch's workers die of a SIGTERM that is not from their parent
        assert done is None or (done.returncode != 0 and "DataLoader worker" in done.stderr), done and done.stdout


def _files(folder):
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.iterdir())}


def test_rerunning_a_finished_run_trains_nothing_and_keeps_final(trained):
    output, proc = trained
    final, metrics = _files(output / "final"), (output / "metrics.jsonl").read_bytes()
    again = subprocess.run(proc.args, capture_output=True, text=True, env=_env(), cwd=output.parent, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "nothing to do" in again.stderr
    assert _files(output / "final") == final  # byte-identical, not even rewritten
    assert (output / "metrics.jsonl").read_bytes() == metrics  # not a step more
    assert sorted(p.name for p in output.glob("checkpoint-*")) == ["checkpoint-20", "checkpoint-40"]


def test_an_interrupted_export_is_redone_from_the_last_checkpoint(trained):
    output, proc = trained
    weights = (output / "final" / "model.safetensors").read_bytes()
    metrics = (output / "metrics.jsonl").read_bytes()
    shutil.rmtree(output / "final")  # what a kill between training and the rename leaves
    (output / "final.partial").mkdir()
    (output / "final.partial" / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    again = subprocess.run(proc.args, capture_output=True, text=True, env=_env(), cwd=output.parent, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert (output / "final" / "model.safetensors").read_bytes() == weights
    assert not (output / "final.partial").exists()
    assert (output / "metrics.jsonl").read_bytes() == metrics  # exported, not trained
    assert json.loads((output / "exit_status.json").read_text())["code"] == 0
    assert "perplexity" in (output / "report.md").read_text(encoding="utf-8").lower()


def test_a_signal_during_the_export_exits_75_and_the_rerun_exports_without_training(tmp_path, tiny_tokenizer_dir):
    import signal
    import time

    from job.core.checkpoints import all_checkpoints, step_of
    from job.core.errors import EXIT_PREEMPTED
    from job.data.corpus import builtin_articles
    from tests.conftest import write_jsonl

    write_jsonl(tmp_path / "docs.jsonl", builtin_articles()[:100])
    output = tmp_path / "out"
    flags = quickstart_args(
        tmp_path / "docs.jsonl",
        tiny_tokenizer_dir,
        output,
        max_length=32,
        max_steps=2,
        per_device_batch_size=4,
        grad_accum=1,
        eval_fraction=0,
        dataloader_workers=0,
        report_to="none",
        deepspeed="none",
    )
    command = [sys.executable, "-m", "job", *flags]
    for _attempt in range(3):  # the signal must land while final.partial is being written and checked
        shutil.rmtree(output, ignore_errors=True)
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env())
        while not (output / "final.partial").exists() and proc.poll() is None:
            time.sleep(0.002)
        proc.send_signal(signal.SIGTERM)
        log = proc.communicate(timeout=120)[0]
        if not (output / "final").exists():
            break
    else:
        pytest.fail("could not land a signal inside the export in 3 attempts")
    assert proc.returncode == EXIT_PREEMPTED, log[-3000:]
    assert "Traceback" not in log
    assert "export it" in json.loads((output / "exit_status.json").read_text())["message"]
    again = subprocess.run(command, capture_output=True, text=True, env=_env(), timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert (output / "final" / "model.safetensors").exists() and not (output / "final.partial").exists()
    assert [step_of(p) for p in all_checkpoints(output)] == [2]  # exported from it, not a step more


def test_held_out_rows_without_a_target_are_left_out_of_the_evaluation(caplog, tiny_tokenizer):
    """A row of one token has no next token to predict: alone in a batch its loss is 0/0 = NaN (a held-out document
    of exactly max_length tokens leaves its eos alone in the last row). Such rows are dropped per source, a source
    with nothing else is not evaluated, and a run where no source has anything to predict is refused."""
    import datasets
    import torch

    from job.core.errors import JobError
    from job.run.worker import _predictable, training_collator
    from tests.conftest import tiny_bloom

    rows = lambda *r: datasets.Dataset.from_dict({"input_ids": [list(x) for x in r]})
    lone_eos = rows([2])
    model = tiny_bloom(len(tiny_tokenizer)).eval()
    with torch.no_grad():  # what the held-out loss of such a batch is
        batch = training_collator(tiny_tokenizer, count_tokens=False)([{"input_ids": [tiny_tokenizer.eos_token_id]}])
        assert math.isnan(model(**batch).loss.item())
    kept = _predictable({"news": rows([5, 6, 7, 8], [2]), "lone": lone_eos})
    assert list(kept) == ["news"] and kept["news"]["input_ids"] == [[5, 6, 7, 8]]
    assert "source lone: no held-out row has a token to predict" in caplog.text
    assert _predictable(rows([5, 6], [7, 2]))["input_ids"] == [[5, 6], [7, 2]]  # one source, nothing dropped
    with pytest.raises(JobError, match="no held-out row has a token to predict"):
        _predictable({"lone": lone_eos})
