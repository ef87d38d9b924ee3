"""The arithmetic of figures the job reports, in one place: FLOPs per token, throughput and MFU, perplexity, and
how times and numbers are shown. The live metrics, the report and the benchmarks all call these."""

from __future__ import annotations

import math
import re

# bf16 dense tensor-core peaks (TFLOP/s, no sparsity) from the datasheets. First match wins: specific names first.
PEAK_BF16_TFLOPS: list[tuple[tuple[str, ...], float]] = [
    (("GH200",), 989.0),
    (("H200", "NVL"), 835.0),
    (("H200",), 989.0),
    (("H100", "PCIE"), 756.0),
    (("H100", "NVL"), 835.0),
    (("H100",), 989.0),  # SXM ("NVIDIA H100 80GB HBM3")
    (("H800", "PCIE"), 756.0),
    (("H800",), 989.0),
    (("B200",), 2250.0),
    (("B100",), 1750.0),
    (("A100",), 312.0),
    (("A800",), 312.0),
    (("L40S",), 362.0),
    (("L40",), 181.0),
    (("L4",), 121.0),
    (("A10G",), 125.0),
    (("A10",), 125.0),
    (("6000", "ADA"), 364.0),  # RTX 6000 Ada
    (("A6000",), 155.0),
    (("4090",), 165.0),
    (("3090",), 71.0),
]


def peak_tflops_for_name(name: str) -> float | None:
    """The datasheet bf16 dense peak of a GPU by its name; whole words match: "L4" is not "L40S", "A10" not "A100"."""
    words = set(re.split(r"[^0-9A-Z]+", name.upper()))
    for parts, tflops in PEAK_BF16_TFLOPS:
        if all(p in words for p in parts):
            return tflops
    return None


def config_parameter_count(model_config) -> int:
    """A Bloom config's parameter count without building it (equals the built model's, tied embeddings once)."""
    d, layers, vocab = model_config.hidden_size, model_config.n_layer, model_config.vocab_size
    n = vocab * d + layers * (12 * d * d + 13 * d) + 4 * d  # embeddings, blocks, embedding LN + final LN
    if not getattr(model_config, "tie_word_embeddings", True):
        n += vocab * d  # an untied head
    return n


def flops_per_token(model_config, seq_len: int) -> float:
    """Training FLOPs per token by PaLM's formula 6N + 12*L*d*T (tied embeddings once in N: the head is real work)."""
    return 6.0 * config_parameter_count(model_config) + 12.0 * model_config.n_layer * model_config.hidden_size * seq_len


def throughput(
    tokens: float,
    seconds: float,
    flops_per_token: float,
    processes: int,
    peak_tflops: float | None = None,
    ceiling_tflops: float | None = None,
) -> dict[str, float]:
    """tokens_per_s, tflops (whole job), tflops_per_device, and MFU per device against the datasheet peak (`mfu`)
    and against a measured matmul ceiling (`mfu_measured`) when those are known; {} when nothing was timed."""
    if seconds <= 0 or tokens <= 0:
        return {}
    tokens_per_s = tokens / seconds
    tflops = tokens_per_s * flops_per_token / 1e12
    per_device = tflops / max(1, processes)
    figures = {
        "tokens_per_s": significant(tokens_per_s),
        "tflops": significant(tflops),
        "tflops_per_device": significant(per_device),
    }
    if peak_tflops:
        figures["mfu"] = significant(per_device / peak_tflops)
    if ceiling_tflops:
        figures["mfu_measured"] = significant(per_device / ceiling_tflops)
    return figures


def perplexity(loss: float | None) -> float | None:
    """exp(loss): the one place it is computed (logs, metrics.jsonl, TensorBoard, the report)."""
    if loss is None or not math.isfinite(loss):
        return None
    return math.exp(loss) if loss < 700 else math.inf


def significant(value: float, digits: int = 6) -> float:
    """Rounded to significant digits (tiny CPU TFLOP/s must not round to 0)."""
    return float(f"{value:.{digits}g}")


def clock(seconds: float | None) -> str:
    """h:mm:ss (the progress line and the report); "?" when unknown."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    s = round(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def size_text(count: float) -> str:
    """A byte count in the largest binary unit that keeps it at least 1, three significant figures: never "0.0 GiB"
    for a few megabytes."""
    value, unit = float(count), "bytes"
    for name in ("KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(value) < 1024:
            break
        value, unit = value / 1024, name
    return f"{int(value)} bytes" if unit == "bytes" else f"{value:.3g} {unit}"
