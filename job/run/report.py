"""The end-of-run report: `report.md`, `loss.png` and `throughput.png`, from `OUTPUT/metrics.jsonl`.

Plot labels stay ASCII (matplotlib's default font has no CJK glyphs); Chinese text appears in the markdown only.
Figures are drawn on an Agg canvas directly, so no pyplot backend or global state is touched.
"""

from __future__ import annotations

import html
import json
import logging
import os
import platform
import statistics
from pathlib import Path
from typing import Any

from job.core.data_spec import DataSpec, Source
from job.core.files import atomic_write_text
from job.core.metrics_log import eval_losses, number, read_metrics
from job.core.run_files import LOSS_PNG, METRICS, REPORT, THROUGHPUT_PNG
from job.core.units import clock, flops_per_token, perplexity
from job.model.sampling import describe

log = logging.getLogger("job")


def _series(records: list[dict], x: str, y: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for r in records:
        a, b = number(r.get(x)), number(r.get(y))
        if a is not None and b is not None:
            xs.append(a)
            ys.append(b)
    return xs, ys


# ----------------------------------------------------------------------------------------------- plots
def _figure(width: float = 8.0, height: float = 4.5):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def _tokens_formatter():
    from matplotlib.ticker import FuncFormatter

    def label(v, _pos):
        for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
            if abs(v) >= div:
                return f"{v / div:g}{unit}"
        return f"{v:g}"

    return FuncFormatter(label)


def plot_loss(records: list[dict], path: Path) -> bool:
    """Train loss and the held-out loss (a mix: one line per source: what the model learned of each)."""
    train = _series([r for r in records if "loss" in r], "tokens_seen", "loss")
    evals = {
        source: _series(records, "tokens_seen", f"eval_{source}_loss" if source else "eval_loss")
        for source in sources_evaluated(records)
    }
    if not train[0] and not any(xs for xs, _ in evals.values()):
        return False
    fig = _figure()
    ax = fig.add_subplot(1, 1, 1)
    if train[0]:
        ax.plot(*train, color="tab:blue", linewidth=1.4, label="train loss (per logging window)")
    colors = iter(["tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:olive"] * 9)
    for source, series in evals.items():
        label = f"held-out eval loss, {source}" if source else "held-out eval loss"
        ax.plot(*series, color=next(colors), marker="o", linewidth=1.4, label=label)
    ax.set_xlabel("tokens seen (real, non-padding)")
    ax.set_ylabel("cross-entropy loss (nats / token)")
    ax.set_title("Training and held-out loss")
    ax.xaxis.set_major_formatter(_tokens_formatter())
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best")
    fig.tight_layout()
    fig.savefig(path)
    return True


def plot_throughput(records: list[dict], path: Path) -> bool:
    """tokens/s against step; MFU (%) in a second panel below when it was logged (the two would overlap on twin
    axes: MFU is tokens/s times a constant)."""
    rows = [r for r in records if "tokens_per_s" in r]
    steps, tps = _series(rows, "step", "tokens_per_s")
    if not steps:
        return False
    mfu = [
        (label, color, _series(rows, "step", key))
        for key, label, color in (
            ("mfu", "MFU vs datasheet bf16 peak", "tab:red"),
            ("mfu_measured", "MFU vs measured matmul ceiling", "tab:purple"),
        )
    ]
    mfu = [m for m in mfu if m[2][0]]
    fig = _figure(8.0, 6.5 if mfu else 4.5)
    ax = fig.add_subplot(2 if mfu else 1, 1, 1)
    ax.plot(steps, tps, color="tab:blue", marker=".", label="real tokens/s (whole job)")
    warm = [
        (s, t)
        for r in rows
        if r.get("warmup")
        for s, t in [(number(r.get("step")), number(r.get("tokens_per_s")))]
        if s is not None and t is not None
    ]
    if warm:
        ax.plot(
            *zip(*warm, strict=True),
            linestyle="none",
            marker="x",
            color="tab:gray",
            markersize=9,
            label="start-up window (left out of means)",
        )
    ax.set_ylabel("real tokens / s")
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best")
    ax.set_title("Training throughput (evaluation and saving excluded)")
    if mfu:
        ax_mfu = fig.add_subplot(2, 1, 2, sharex=ax)
        for label, color, (xs, ys) in mfu:
            ax_mfu.plot(xs, [100 * y for y in ys], marker=".", color=color, label=label)
        ax_mfu.set_ylabel("MFU (%)")
        ax_mfu.set_ylim(bottom=0)
        ax_mfu.grid(True, alpha=0.3)
        ax_mfu.legend(loc="best")
        ax_mfu.set_xlabel("optimizer step")
    else:
        ax.set_xlabel("optimizer step")
    fig.tight_layout()
    fig.savefig(path)
    return True


# ----------------------------------------------------------------------------------------------- markdown
def _cell(text: Any) -> str:
    """Text safe in a markdown table cell: HTML-escaped (`</s>` stays visible), pipes and newlines kept."""
    if text is None:
        return "n/a"
    s = html.escape(str(text), quote=False).replace("|", "\\|").replace("\r", "")
    return s.replace("\n", "<br>") if s.strip() else "<i>(empty)</i>"


def fmt(value: Any, digits: int = 4) -> str | None:
    v = number(value)
    if v is None:
        return None if value is None else str(value)
    if v.is_integer() and abs(v) >= 1000:
        return f"{int(v):,}"
    return f"{v:,.{digits}g}" if abs(v) < 1e6 else f"{v:,.0f}"


def duration(seconds: Any) -> str | None:
    s = number(seconds)
    return None if s is None else f"{clock(s)} ({round(s):,} s)"


def _pct(fraction: float | None) -> str | None:
    if fraction is None:
        return None
    return f"{100 * fraction:.1f}%" if 100 * fraction >= 0.1 else f"{100 * fraction:.2g}%"


def throughput_summary(records: list[dict]) -> dict[str, Any]:
    """Means over the logging windows, leaving out each run's first (start-up) window when others exist.

    Rates are weighted by each window's training time (tokens / tokens_per_s), so the mean tokens/s is all tokens
    over all training time; without window sizes (an older file) every window counts the same.
    """
    rows = [r for r in records if (number(r.get("tokens_per_s")) or 0) > 0]
    steady = [r for r in rows if not r.get("warmup")]
    note = None
    if not steady and rows:
        steady, note = rows, "only start-up windows were logged; the means include them"
    seconds = [(number(r.get("window_tokens")) or 0) / r["tokens_per_s"] for r in steady]
    if not all(s > 0 for s in seconds):
        seconds = [1.0] * len(steady)

    def mean(key: str) -> float | None:
        pairs = [(v, w) for r, w in zip(steady, seconds, strict=True) if (v := number(r.get(key))) is not None]
        total = sum(w for _, w in pairs)
        return sum(v * w for v, w in pairs) / total if pairs and total > 0 else None

    rates = [r["tokens_per_s"] for r in steady]
    return {
        "windows": len(steady),
        "windows_total": len(rows),
        "tokens_per_s": mean("tokens_per_s"),
        "tokens_per_s_median": statistics.median(rates) if rates else None,
        "tflops": mean("tflops"),
        "tflops_per_device": mean("tflops_per_device"),
        "mfu": mean("mfu"),
        "mfu_measured": mean("mfu_measured"),
        "memory_gib": max((v for r in rows if (v := number(r.get("memory_gib"))) is not None), default=None),
        "note": note,
    }


def sources_evaluated(records: list[dict]) -> list[str]:
    """The held-out sets in the records, in order of appearance ("" for a run on one source, NAME in a mix)."""
    return list(dict.fromkeys(source for r in records for source in eval_losses(r)))


def loss_pair(loss: float | None) -> str | None:
    if loss is None:
        return None
    return f"{loss:.4f} (perplexity {perplexity(loss):,.2f})"


def run_summary(state: dict, final_metrics: dict, seconds: float | None) -> dict[str, Any]:
    """What the end of a run knows for certain: steps and tokens (the last checkpoint's trainer state), the final
    held-out loss and the training time."""
    return {
        "steps": state["global_step"],
        "tokens_seen": state.get("num_input_tokens_seen"),
        "seconds": None if seconds is None else round(seconds, 1),
        "final_eval_loss": final_metrics.get("eval_loss"),
        **({"final_source_eval_losses": by_source} if (by_source := _named(eval_losses(final_metrics))) else {}),
    }


def _named(losses: dict) -> dict:
    return {source: loss for source, loss in losses.items() if source}


def run_figures(records: list[dict], summary: dict) -> dict[str, Any]:
    """The run's headline figures, from `summary` (`run_summary`) where it has them, else from the metrics records:
    steps, tokens seen, the first and final held-out loss, the first and last logged train loss, seconds.
    The report and the model card both show these."""
    evals = [v for r in records if (v := number(r.get("eval_loss"))) is not None]
    final_eval = number(summary.get("final_eval_loss"))
    if final_eval is None and evals:
        final_eval = evals[-1]
    train_losses = [v for r in records if (v := number(r.get("loss"))) is not None]
    tokens = summary.get("tokens_seen")
    if tokens is None:
        tokens = next((r["tokens_seen"] for r in reversed(records) if number(r.get("tokens_seen")) is not None), None)
    steps = summary.get("steps")
    if steps is None:
        steps = next((r["step"] for r in reversed(records) if number(r.get("step")) is not None), None)
    final_by_source = summary.get("final_source_eval_losses") or {}
    by_source = {}  # a mix: each source's held-out loss, first and final (what was learned, what was forgotten)
    for source in [s for s in sources_evaluated(records) if s]:
        values = [v for r in records if (v := number(eval_losses(r).get(source))) is not None]
        final = number(final_by_source.get(source))
        if final is None and values:
            final = values[-1]
        by_source[source] = (values[0] if values else None, final)  # None: no finite loss was ever logged
    return {
        "steps": steps,
        "tokens_seen": tokens,
        "first_eval_loss": evals[0] if evals else None,
        "final_eval_loss": final_eval,
        "source_eval_losses": by_source,
        "train_losses": train_losses[:1] + train_losses[-1:],
        "seconds": summary.get("seconds"),
    }


def source_table(figures: dict, data: DataSpec | None) -> list[str]:
    """A mix's held-out loss per source, first and final, with its share of the training rows (`data`: the run's
    data spec); [] for one source."""
    by_source = figures.get("source_eval_losses") or {}
    if not by_source:
        return []
    shares = {source.name: share for source, share in source_shares(data)}
    lines = [
        "| source | share | held-out loss, first | held-out loss, final | change |",
        "| --- | --- | --- | --- | --- |",
    ]
    for source, (first, final) in by_source.items():
        change = f"{final - first:+.4f}" if first is not None and final is not None else "n/a"
        share = f"{shares[source]:.0%}" if source in shares else "n/a"
        lines.append(f"| {source} | {share} | {loss_pair(first) or 'n/a'} | {loss_pair(final) or 'n/a'} | {change} |")
    return lines


def source_shares(data: DataSpec | None) -> list[tuple[Source, float]]:
    """Each source of a mix with its share of the training rows; [] for one source (the card's and the report's)."""
    if data is None or not data.mixed:
        return []
    return data.shares()


def write_report(
    output_dir: Path, config: dict, hardware: dict, summary: dict, samples: list[dict], data: DataSpec | None = None
) -> Path:
    """Write `report.md` (plus `loss.png` and `throughput.png` when there is data) into `output_dir`; `config`: the
    effective config's JSON form, shown whole; `data`: the run's data spec, for a mix's shares."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    records = read_metrics(output_dir / METRICS)
    has_loss = plot_loss(records, output_dir / LOSS_PNG)
    has_tput = plot_throughput(records, output_dir / THROUGHPUT_PNG)
    figures = run_figures(records, summary)
    tput = throughput_summary(records)

    lines = ["# Training report", ""]
    if summary.get("final_model"):
        lines += [f"Final model: `{summary['final_model']}`", ""]
    lines += ["## Summary", "", "| | |", "| --- | --- |"]
    rows = [
        ("duration (training, wall clock)", duration(figures["seconds"])),
        ("optimizer steps", fmt(figures["steps"])),
        ("tokens seen (real, non-padding)", fmt(figures["tokens_seen"])),
        ("held-out eval loss, first", loss_pair(figures["first_eval_loss"])),
        ("held-out eval loss, final", loss_pair(figures["final_eval_loss"])),
        (
            "train loss, first / last logged",
            " / ".join(f"{v:.4f}" for v in figures["train_losses"]) if figures["train_losses"] else None,
        ),
        ("mean tokens/s (whole job: tokens / training time)", fmt(tput["tokens_per_s"], 6)),
        ("median tokens/s of the logging windows", fmt(tput["tokens_per_s_median"], 6)),
        ("mean model TFLOP/s per device", fmt(tput["tflops_per_device"])),
        ("mean MFU (datasheet bf16 peak)", _pct(tput["mfu"])),
        ("peak memory (GiB)", fmt(tput["memory_gib"])),
        ("FLOPs per token (6N + 12·L·d·T)", fmt(summary.get("flops_per_token"))),
    ]
    lines += [f"| {k} | {v} |" for k, v in rows if v is not None]  # only figures that exist
    lines += [
        "",
        f"Throughput means cover {tput['windows']} of {tput['windows_total']} logging windows: each run's "
        "first window (start-up, compilation) is left out; evaluation and checkpoint time is excluded from "
        "every window." + (f" Note: {tput['note']}." if tput["note"] else ""),
        "",
    ]
    table = source_table(figures, data)
    if table:
        lines += ["## Held-out loss by source", "", *table, ""]
        lines += ["A falling loss is what the model learned of a source; a rising one, what it forgot.", ""]
    lines += ["## Loss", ""]
    lines += (
        [f"![train and held-out loss against tokens seen]({LOSS_PNG})", ""]
        if has_loss
        else ["No loss was logged (metrics.jsonl is missing or empty).", ""]
    )
    lines += ["## Throughput", ""]
    lines += (
        [f"![tokens/s and MFU against step]({THROUGHPUT_PNG})", ""] if has_tput else ["No throughput was logged.", ""]
    )

    lines += [
        "## Samples before and after training",
        "",
        f"Drawn as `python -m job generate` does by default: {describe()}.",
        "",
    ]
    if samples:
        lines += ["| prompt | before | after |", "| --- | --- | --- |"]
        lines += [f"| {_cell(s.get('prompt'))} | {_cell(s.get('before'))} | {_cell(s.get('after'))} |" for s in samples]
    else:
        lines += ["No samples (no prompts configured, or the model could not be generated from)."]
    lines += [""]

    lines += ["## Hardware and software", "", "| | |", "| --- | --- |"]
    lines += [f"| {_cell(k)} | {_cell(v)} |" for k, v in hardware.items()]
    lines += [
        "",
        "## Effective configuration",
        "",
        "```json",
        json.dumps(config, indent=2, ensure_ascii=False, default=str),
        "```",
        "",
    ]

    return atomic_write_text(output_dir / REPORT, "\n".join(lines))


def report_run(cfg, state: dict, processes, final: Path, before, final_metrics, seconds) -> None:
    """The run's report.md from the exported model: samples before and after, the summary, the hardware.

    `state`: the last checkpoint's trainer_state.json; `before`: the untrained model's samples."""
    import deepspeed
    import torch
    import transformers

    from job.model.generate import generate, load_for_inference
    from job.model.sampling import READING_SAMPLES

    model, tokenizer = load_for_inference(str(final))
    after = generate(model, tokenizer, cfg.prompts, max_new_tokens=32, **READING_SAMPLES)
    by_prompt = {s["prompt"]: s["text"] for s in before}
    samples = [{"prompt": s["prompt"], "before": by_prompt.get(s["prompt"], "n/a"), "after": s["text"]} for s in after]
    summary = {
        **run_summary(state, final_metrics, seconds),
        "flops_per_token": flops_per_token(model.config, cfg.max_length),
        "final_model": str(final),
    }
    hardware = {
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu",
        "processes": processes,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "deepspeed": deepspeed.__version__,
        "host": os.uname().nodename,
    }
    write_report(Path(cfg.output_dir), cfg.to_dict(), hardware, summary, samples, cfg.source_data)
    figures = run_figures(read_metrics(Path(cfg.output_dir) / METRICS), summary)
    pairs = {"": (figures["first_eval_loss"], figures["final_eval_loss"]), **figures["source_eval_losses"]}
    for source, (first, final) in pairs.items():
        if first is not None and final is not None:
            name = f"held-out loss of {source}" if source else "held-out loss"
            log.info("%s %.4f -> %.4f (%.0f%% of the start)", name, first, final, 100 * final / first)
    for sample in samples:
        log.info("sample: %s|%s", sample["prompt"], sample["after"].replace("\n", " "))
