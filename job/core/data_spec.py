"""A data mix: several sources, each with a weight and a name, in one `--data` (or `--prepared`) value.

    --data 0.8:wiki=/data/wiki.jsonl,0.2:replay=/data/replay.parquet

Each item is `WEIGHT:NAME=PATH` (Megatron-LM's `--data-path W1 P1 W2 P2`, with a name for the metrics). A value
without a comma and without a `:` or `=` before its first `/` is one source, exactly as before: a path, glob or hub
id (a plain relative file named like `a=b.jsonl` is written `./a=b.jsonl`). The weights are relative (normalised
to probabilities); the name tags each source's held-out metrics (`eval_NAME_loss`).

Text only (the config validates it); `job.data.mix` prepares, loads and interleaves the sources.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from job.core.errors import JobError

EXAMPLE = "0.8:wiki=/data/wiki.jsonl,0.2:replay=/data/replay.parquet"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")  # becomes part of metric keys and TensorBoard tags


@dataclass(frozen=True)
class Source:
    name: str
    weight: float
    path: str


def is_mix(text: str | None) -> bool:
    return text is not None and ("," in text or re.match(r"[^/]*[:=]", text) is not None)


def parse_mix(text: str | None, option: str = "--data") -> list[Source] | None:
    """The sources of a mix, in order; None when `text` is one source (today's single path)."""
    if not is_mix(text):
        return None
    sources: list[Source] = []
    for item in text.split(","):
        weight, colon, rest = item.partition(":")
        name, equals, path = rest.partition("=")
        weight, name, path = weight.strip(), name.strip(), path.strip()
        if not (colon and equals and path):
            raise JobError(f"{option} item {item.strip()!r} is not WEIGHT:NAME=PATH", f"e.g. {option} {EXAMPLE}")
        try:
            value = float(weight)
        except ValueError:
            value = None
        if value is None or not math.isfinite(value) or value <= 0:
            raise JobError(
                f"{option} weight {weight!r} of source {name!r} is not a positive number",
                "give each source a finite weight above 0 (weights are relative: 0.8 and 0.2, or 4 and 1)",
            )
        if not _NAME.fullmatch(name):
            raise JobError(
                f"{option} source name {name!r} is not letters, digits, _ and - (starting with a letter or digit)",
                "name each source for its metrics, e.g. wiki or replay",
            )
        if any(s.name == name for s in sources):
            raise JobError(f"{option} names source {name!r} twice", "give each source its own name")
        sources.append(Source(name, value, path))
    return sources


def format_mix(sources: list[Source]) -> str:
    """The `--data`/`--prepared` text of `sources` (parse_mix's inverse, weights in their shortest form)."""
    return ",".join(f"{s.weight:g}:{s.name}={s.path}" for s in sources)


def probabilities(sources: list[Source]) -> list[float]:
    total = sum(s.weight for s in sources)
    return [s.weight / total for s in sources]


def comparable_mix(text: str) -> str:
    """A mix as two runs compare it: the weights as probabilities, each path resolved when it exists."""

    def resolved(path: str) -> str:
        p = Path(path).expanduser()
        return str(p.resolve()) if p.exists() else path

    sources = parse_mix(text)
    return ",".join(
        f"{p:.6g}:{s.name}={resolved(s.path)}" for s, p in zip(sources, probabilities(sources), strict=True)
    )
