"""Checkpoints that count only once complete, and an export that is checked before it is published.

The Trainer writes `checkpoint-N/` in place; when every rank has finished writing, rank 0 adds the
marker file `COMPLETE`. Only marked checkpoints are resumed from or counted for rotation, so a kill
in the middle of a save loses that save and nothing else.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

MARKER = "COMPLETE"
_CHECKPOINT = re.compile(r"checkpoint-(\d+)")


def _step(path: Path) -> int:
    match = _CHECKPOINT.fullmatch(path.name)
    return int(match.group(1)) if match else -1


def all_checkpoints(output_dir: Path) -> list[Path]:
    """Every `checkpoint-N` folder, oldest first."""
    if not output_dir.is_dir():
        return []
    return sorted((p for p in output_dir.iterdir() if p.is_dir() and _step(p) >= 0), key=_step)


def complete_checkpoints(output_dir: Path) -> list[Path]:
    return [p for p in all_checkpoints(output_dir) if (p / MARKER).exists()]


def latest_complete(output_dir: Path) -> Path | None:
    done = complete_checkpoints(output_dir)
    return done[-1] if done else None


def mark_complete(checkpoint: Path, step: int) -> None:
    tmp = checkpoint / f".{MARKER}.tmp"
    tmp.write_text(json.dumps({"step": step, "time": time.time()}) + "\n")
    tmp.replace(checkpoint / MARKER)


def remove_incomplete(output_dir: Path) -> list[Path]:
    """Delete checkpoint folders a crash left half-written (call only when no save is in progress)."""
    partial = [p for p in all_checkpoints(output_dir) if not (p / MARKER).exists()]
    for path in partial:
        shutil.rmtree(path, ignore_errors=True)
    return partial


def rotate(output_dir: Path, keep: int) -> list[Path]:
    """Keep the newest `keep` complete checkpoints (never fewer than one); drop older and partial ones."""
    removed = remove_incomplete(output_dir)
    done = complete_checkpoints(output_dir)
    for path in done[: max(0, len(done) - max(1, keep))]:
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def checkpoint_bytes(checkpoint: Path) -> int:
    return sum(f.stat().st_size for f in checkpoint.rglob("*") if f.is_file())
