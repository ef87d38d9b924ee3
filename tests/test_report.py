"""The report from a metrics file: one history across a resume, warm-up windows left out of the means,
CJK samples safe in markdown, and a report even when nothing was logged."""

from __future__ import annotations

import json
import math

import pytest

from job.core.metrics_log import read_metrics
from job.run.report import throughput_summary, write_report


def _line(**record) -> str:
    return json.dumps(record, ensure_ascii=False) + "\n"


def _train_lines(steps_and_speeds, mfu: float, memory_gib: float) -> list[str]:
    """Training log lines: loss falling 0.1 a step, 500 tokens a step, TFLOP/s per device = 1000 x MFU."""
    return [
        _line(
            loss=6.5 - step * 0.1,
            step=step,
            tokens_seen=step * 500,
            tokens_per_s=tps,
            mfu=mfu,
            tflops_per_device=1000.0 * mfu,
            memory_gib=memory_gib,
        )
        for step, tps in steps_and_speeds
    ]


@pytest.fixture
def resumed_run(tmp_path):
    """Steps 1-6 logged, a crash after step 6 (checkpoint 4), a resume from 4 to 8; a torn last line."""
    lines = [_line(event="train_begin", step=0, tokens_seen=0)]
    lines.append(_line(eval_loss=6.0, eval_perplexity=math.exp(6.0), step=0, tokens_seen=0))
    lines += _train_lines([(1, 100.0), (2, 1000.0), (4, 1100.0), (6, 1200.0)], mfu=0.4, memory_gib=20.0)
    lines.append(_line(eval_loss=5.5, step=4, tokens_seen=2000))
    lines.append(_line(event="train_begin", step=4, tokens_seen=2000))
    lines.append(_line(eval_loss=5.4, step=4, tokens_seen=2000))  # eval_on_start again, after the resume
    lines += _train_lines([(6, 300.0), (8, 1300.0)], mfu=0.5, memory_gib=22.0)
    lines.append(_line(eval_loss=5.0, step=8, tokens_seen=4000))
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(lines) + '{"loss": 1.0, "ste', encoding="utf-8")
    return tmp_path


def test_one_history_across_a_resume(resumed_run):
    records = read_metrics(resumed_run / "metrics.jsonl")
    assert [(r["step"], r["tokens_per_s"]) for r in records if "loss" in r] == [
        (1, 100.0),
        (2, 1000.0),
        (4, 1100.0),
        (6, 300.0),
        (8, 1300.0),
    ]
    assert [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r] == [(0, 6.0), (4, 5.4), (8, 5.0)]
    assert [r["step"] for r in records if r.get("warmup")] == [1, 6]
    assert [r.get("window_tokens") for r in records if "loss" in r] == [500, 500, 1000, 1000, 1000]


def test_means_leave_out_start_up_windows(resumed_run):
    summary = throughput_summary(read_metrics(resumed_run / "metrics.jsonl"))
    seconds = [500 / 1000, 1000 / 1100, 1000 / 1300]  # steady windows at steps 2, 4, 8: 500, 1000, 1000 tokens
    assert summary["tokens_per_s"] == pytest.approx(2500 / sum(seconds))  # all tokens over all training time
    assert summary["mfu"] == pytest.approx((0.4 * seconds[0] + 0.4 * seconds[1] + 0.5 * seconds[2]) / sum(seconds))
    assert summary["tokens_per_s_median"] == 1100.0
    assert (summary["windows"], summary["windows_total"], summary["memory_gib"]) == (3, 5, 22.0)


def test_only_start_up_windows_are_still_reported(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(
        _line(event="train_begin", step=0) + _line(loss=3.0, step=1, tokens_per_s=50.0), encoding="utf-8"
    )
    summary = throughput_summary(read_metrics(tmp_path / "metrics.jsonl"))
    assert summary["tokens_per_s"] == 50.0 and summary["note"]


def test_report_contents(resumed_run):
    samples = [
        {"prompt": "中国的经济", "before": "的的的的", "after": "持续发展，\n人民生活 | 改善"},
        {"prompt": "北京", "before": "", "after": "是首都</s>"},
    ]
    config = {"max_length": 384, "prompts": ["中国的经济", "北京"], "bf16": True}
    hardware = {
        "device": "NVIDIA H100 80GB HBM3",
        "processes": 1,
        "torch": "2.13.0",
        "transformers": "5.24.0",
        "deepspeed": "0.19.8",
    }
    summary = {"steps": 8, "tokens_seen": 4000, "seconds": 3725.4, "final_eval_loss": 4.9, "flops_per_token": 2.38e9}
    path = write_report(resumed_run, config, hardware, summary, samples)
    text = path.read_text(encoding="utf-8")
    assert path.name == "report.md"
    assert "1:02:05" in text and "4,000" in text
    assert "Drawn as `python -m job generate` does by default: sampled with seed 0" in text  # not greedy
    assert "6.0000 (perplexity 403.43)" in text  # the first held-out loss
    assert f"4.9000 (perplexity {math.exp(4.9):,.2f})" in text  # the final one, from the summary
    assert "| mean tokens/s (whole job: tokens / training time) | 1,147.67 |" in text
    assert "| mean MFU (datasheet bf16 peak) | 43.5% |" in text
    assert "| 中国的经济 | 的的的的 | 持续发展，<br>人民生活 \\| 改善 |" in text
    assert "| 北京 | <i>(empty)</i> | 是首都&lt;/s&gt; |" in text
    assert "NVIDIA H100 80GB HBM3" in text and "0.19.8" in text
    assert '"max_length": 384' in text and '"中国的经济"' in text
    for png in ("loss.png", "throughput.png"):
        assert (resumed_run / png).stat().st_size > 10_000 and f"]({png})" in text


def test_report_without_metrics(tmp_path):
    path = write_report(tmp_path, {}, {"device": "cpu"}, {"steps": 0}, [])
    text = path.read_text(encoding="utf-8")
    assert "No loss was logged" in text and "No throughput was logged" in text and "No samples" in text
    assert not (tmp_path / "loss.png").exists() and not (tmp_path / "throughput.png").exists()


def test_a_source_whose_held_out_loss_was_never_finite_is_shown_as_such(tmp_path):
    """A mix source with a NaN held-out loss at every evaluation (logged as null): the figures, the table and the
    model card say n/a for it instead of failing the export."""
    from job.core.config import RunConfig
    from job.run.model_card import render_model_card
    from job.run.report import run_figures, source_table

    records = [
        {"step": 0, "eval_news_loss": 6.5, "eval_odd_loss": None},
        {"step": 6, "eval_news_loss": 6.1, "eval_odd_loss": None},
    ]
    figures = run_figures(records, {"final_source_eval_losses": {"news": 6.0}})
    assert figures["source_eval_losses"] == {"news": (6.5, 6.0), "odd": (None, None)}
    cfg = RunConfig.load(data="1:news=a.jsonl,1:odd=b.jsonl")
    table = source_table(figures, cfg.source_data)
    assert "| odd | 50% | n/a | n/a | n/a |" in table
    card = render_model_card(cfg, figures)
    assert "held-out loss of odd, before / after training" in card
