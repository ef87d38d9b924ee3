"""What a preflight check returns (`Check`, one row of `doctor`'s table) and what the checks hand along to the
checks and steps after them (`Preflight`). The checks themselves: `job.run.preflight` and `job.run.resume`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from job.core.config import RunConfig
from job.core.errors import JobError
from job.run.launch_record import Launch


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""


@dataclass
class Preflight:
    """The config, and what the checks found on the way (handed on to the steps after them)."""

    cfg: RunConfig  # resolved further by the checks (the launch settings), never changed in place
    corpus: Any = None  # job.data.corpus.Corpus, unless --prepared
    prepared_key: dict | None = None  # --prepared: its prepare_key.json
    corpora: dict[str, Any] = field(default_factory=dict)  # a --data mix: each source's Corpus, by name
    prepared_keys: dict[str, dict] = field(default_factory=dict)  # a --prepared mix: each folder's key, by name
    tokenizer: Any = None
    model_config: Any = None
    fingerprints: dict[str, Any] = field(default_factory=dict)
    launch: Launch | None = None  # the launch, resolved once (check_launch): every later check reads it
    launch_row: str = ""  # the launch settings and their sources (check_launch)
    setting_sources: dict[str, str] = field(default_factory=dict)  # where each launch setting came from (check_launch)


def require(check: Check) -> None:
    """Stop on a failed check."""
    if not check.ok:
        raise JobError(f"{check.name}: {check.detail}", check.fix or None)
