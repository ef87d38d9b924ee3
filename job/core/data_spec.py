"""The `--data`/`--prepared` value, parsed once when the config loads: one source, or a weighted mix of named ones.

    --data 0.8:wiki=/data/wiki.jsonl,0.2:replay=/data/replay.parquet

Each item of a mix is `WEIGHT:NAME=PATH` (Megatron-LM's `--data-path W1 P1 W2 P2`, with a name for the metrics). A
value without a comma and without a `:` or `=` before its first `/` is one source: a path, glob or hub id (a plain
relative file named like `a=b.jsonl` is written `./a=b.jsonl`). The weights are relative (normalised to
probabilities), and the largest may be at most `MAX_WEIGHT_RATIO` times the smallest: under `--mix-until
all_exhausted` an epoch ends once the rarest source has been read whole, so that ratio bounds the epoch's length
(at most about 1 + MAX_WEIGHT_RATIO x (sources - 1) times the largest source's rows). The name tags each source's
held-out metrics (`eval_NAME_loss`).

`job.data.mix` prepares, loads and interleaves the sources; every other reader takes a `DataSpec`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from pathlib import Path

from job.core.errors import JobError

EXAMPLE = "0.8:wiki=/data/wiki.jsonl,0.2:replay=/data/replay.parquet"
MAX_WEIGHT_RATIO = 1000  # largest weight / smallest: bounds an all_exhausted epoch (see above)
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")  # becomes part of metric keys and TensorBoard tags


@dataclass(frozen=True)
class Source:
    name: str  # "" for the one source of a plain (unmixed) value
    weight: float
    path: str


@dataclass(frozen=True)
class DataSpec:
    """One source (`mixed` False: `sources` holds it alone, unnamed) or a weighted mix of named sources."""

    sources: tuple[Source, ...]
    mixed: bool

    @classmethod
    def parse(cls, text: str, option: str = "--data") -> DataSpec:
        mix = parse_mix(text, option)
        return cls(tuple(mix), True) if mix is not None else cls((Source("", 1.0, text),), False)

    @classmethod
    def one(cls, path: str) -> DataSpec:
        return cls((Source("", 1.0, path),), False)

    @property
    def path(self) -> str:
        """The one source's path (a mix has several: read `sources`)."""
        assert not self.mixed, "a mix has no single path"
        return self.sources[0].path

    def probabilities(self) -> list[float]:
        return probabilities(list(self.sources))

    def shares(self) -> list[tuple[Source, float]]:
        """Each source with its share of the training rows."""
        return list(zip(self.sources, self.probabilities(), strict=True))

    def with_paths(self, paths: dict[str, str]) -> DataSpec:
        """The same sources and weights at other paths (by name), e.g. their prepared folders."""
        return replace(self, sources=tuple(replace(s, path=paths[s.name]) for s in self.sources))

    def comparable(self) -> str:
        """As two runs compare it: a mix's weights as probabilities, each path resolved when it exists."""
        if not self.mixed:
            return self.path
        return ",".join(f"{p:.6g}:{s.name}={_resolved(s.path)}" for s, p in self.shares())

    def __str__(self) -> str:
        """The text it was parsed from, in its shortest exact form (what run_config.json holds)."""
        return format_mix(list(self.sources)) if self.mixed else self.path


def is_mix(text: str | None) -> bool:
    return text is not None and ("," in text or re.match(r"[^/]*[:=]", text) is not None)


def parse_mix(text: str | None, option: str = "--data") -> list[Source] | None:
    """The sources of a mix, in order; None when `text` is one source."""
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
    heaviest, lightest = max(sources, key=lambda s: s.weight), min(sources, key=lambda s: s.weight)
    if heaviest.weight / lightest.weight > MAX_WEIGHT_RATIO:  # both finite and positive: the ratio is a number
        raise JobError(
            f"{option} weight of {heaviest.name!r} is {heaviest.weight / lightest.weight:.3g} times that of "
            f"{lightest.name!r}, more than {MAX_WEIGHT_RATIO}",
            f"keep the largest weight at most {MAX_WEIGHT_RATIO} times the smallest (it bounds an epoch's length)",
        )
    return sources


def format_mix(sources: list[Source]) -> str:
    """The `--data`/`--prepared` text of `sources` (parse_mix's inverse: each weight in the shortest form that reads
    back as the same float, so the workers mix with exactly the weights the launcher checked)."""
    return ",".join(f"{repr(s.weight).removesuffix('.0')}:{s.name}={s.path}" for s in sources)


def probabilities(sources: list[Source]) -> list[float]:
    """Each source's share; divided by the largest weight first, so that huge weights (1e308) cannot overflow."""
    top = max(s.weight for s in sources)
    scaled = [s.weight / top for s in sources]
    total = math.fsum(scaled)
    return [w / total for w in scaled]


def _resolved(path: str) -> str:
    p = Path(path).expanduser()
    return str(p.resolve()) if p.exists() else path
