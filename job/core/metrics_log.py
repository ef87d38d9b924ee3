"""`OUTPUT/metrics.jsonl`: the record type its writer (the worker's `MetricsFileCallback`) and its readers (the
report, finish) share, how a record is written, and how the file is read back as one consistent history.

A record is one Trainer log (its own keys: `loss`, `grad_norm`, `learning_rate`, `eval_loss`, `eval_runtime`, ...)
plus the keys below; a resumed run appends a `train_begin` event and the reader drops what the resume repeats.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, TypedDict


class MetricsRecord(TypedDict, total=False):
    # every record
    step: int
    epoch: float
    time: float  # seconds since this training start
    timestamp: float  # Unix time
    tokens_seen: int  # real (non-padding) tokens so far
    # a training start: {"event": "train_begin", "step", "tokens_seen", "max_steps", "timestamp"}
    event: str
    max_steps: int
    # training logs (job.core.units.throughput), besides the Trainer's loss, grad_norm, learning_rate
    loss: float
    tokens_per_s: float
    tflops: float
    tflops_per_device: float
    mfu: float
    mfu_measured: float
    memory_gib: float
    # evaluation logs, besides the Trainer's eval_loss, eval_runtime, ... (a mix: eval_NAME_loss, eval_NAME_perplexity,
    # eval_NAME_runtime, ... one record per source, see `eval_losses`)
    eval_loss: float
    eval_perplexity: float
    # added by `read_metrics`, never written
    window_tokens: float  # tokens of this throughput window (tokens / tokens_per_s = its seconds)
    warmup: bool  # the first throughput window of a training start (start-up, compilation)


TRAIN_BEGIN = "train_begin"
# The Trainer's held-out loss key: eval_loss for one eval set, eval_NAME_loss for eval_dataset[NAME] (a data mix).
_EVAL_LOSS = re.compile(r"eval_(?:(?P<source>.+)_)?loss")


def eval_losses(record: dict[str, Any]) -> dict[str, float | None]:
    """A record's held-out losses by source: "" for a run on one source (`eval_loss`), NAME for a source of a mix."""
    return {m["source"] or "": v for k, v in record.items() if (m := _EVAL_LOSS.fullmatch(k))}


def json_safe(value: Any) -> Any:
    """Strict JSON: non-finite floats become null (a NaN loss is still visible as a null loss)."""
    if hasattr(value, "numel") and hasattr(value, "item") and value.numel() == 1:  # a one-element tensor
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (int, float, str, bool)) or value is None:
        return value
    return str(value)


def record_line(record: MetricsRecord | dict[str, Any]) -> str:
    """One line of the file."""
    return json.dumps({k: json_safe(v) for k, v in record.items()}, ensure_ascii=False, allow_nan=False) + "\n"


def number(value: Any) -> float | None:
    """A finite number from a record's field, else None."""
    return (
        float(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        else None
    )


def read_metrics(path: Path) -> list[MetricsRecord]:
    """The records of a metrics file, as one consistent history.

    A torn last line (a crash mid-write) is skipped. At each `train_begin` marker (a resume from step N) the
    records after step N that the crashed run had written are dropped, since the resumed run repeats them; its
    first throughput window (start-up) is flagged `warmup`.
    """
    if not path.exists():
        return []
    records: list[MetricsRecord] = []
    warm_next = False
    last_tokens: float | None = None
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(record, dict):
            continue
        if record.get("event") == TRAIN_BEGIN:
            step = record.get("step", 0) or 0
            records = [r for r in records if (r.get("step") or 0) <= step]
            warm_next, last_tokens = True, number(record.get("tokens_seen"))
            continue
        if "tokens_per_s" in record:
            record = dict(record)
            tokens = number(record.get("tokens_seen"))
            if tokens is not None and last_tokens is not None and tokens > last_tokens:
                record["window_tokens"] = tokens - last_tokens
            last_tokens = tokens
            if warm_next:
                record["warmup"], warm_next = True, False
        records.append(record)

    # an eval repeated at the resume step (eval_on_start again): keep the latest
    def eval_key(r: dict) -> tuple | None:
        sources = tuple(sorted(eval_losses(r)))
        return (r.get("step"), sources) if sources else None

    seen = {key: i for i, r in enumerate(records) if (key := eval_key(r)) is not None}
    return [r for i, r in enumerate(records) if (key := eval_key(r)) is None or seen[key] == i]
