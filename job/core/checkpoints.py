"""Checkpoints that count only once complete, and an export that is checked before it is published.

Before the Trainer writes `checkpoint-N/`, rank 0 creates it with the marker `WRITING` (the job's own: only
such folders are ever deleted as incomplete); when every rank has finished writing, rank 0 replaces it with
`COMPLETE`, which records the step and every file's size. Only checkpoints whose contents still match their
`COMPLETE` (`trusted`) are resumed from or counted for rotation, so a kill in the middle of a save loses that
save and nothing else, and a damaged checkpoint falls back to the one before it.

`final/` is published from the last checkpoint (the Trainer always saves the last step): its model and
tokenizer files are copied aside, reloaded as stock transformers would, then renamed into place. An export
that was interrupted is therefore redone from that checkpoint without training a step more.

Stdlib only at import time: the launcher imports this module without torch.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import re
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

from job.core import run_files
from job.core.files import apply_umask, atomic_write_json, atomic_write_text, refuse_link

if TYPE_CHECKING:
    from job.core.config import ResumeFrom

MARKER = "COMPLETE"
WRITING = ".job-writing"  # this job is writing the checkpoint (it may delete it if the save never completes)
# What a checkpoint holds of the model itself (the rest is optimizer, scheduler, RNG and Trainer state).
MODEL_FILES = (
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "*.safetensors.index.json",
    "tokenizer*",
    "special_tokens_map.json",
    "chat_template*",
)
_CHECKPOINT = re.compile(r"checkpoint-(\d+)")


def _step(path: Path) -> int:
    match = _CHECKPOINT.fullmatch(path.name)
    return int(match.group(1)) if match else -1


def all_checkpoints(output_dir: Path) -> list[Path]:
    """Every `checkpoint-N` folder, oldest first (never a symbolic link: the job neither follows nor deletes one)."""
    if not output_dir.is_dir():
        return []
    return sorted((p for p in output_dir.iterdir() if _step(p) >= 0 and p.is_dir() and not p.is_symlink()), key=_step)


def linked_entries(output_dir: Path) -> list[Path]:
    """The names the job writes in a run folder (checkpoints, the export, its staging, run files) that are symbolic
    links: writing or deleting there would reach outside the folder."""
    if not output_dir.is_dir():
        return []
    own = {run_files.FINAL, _staging_name(), *run_files.NAMES}
    return sorted(p for p in output_dir.iterdir() if p.is_symlink() and (p.name in own or _step(p) >= 0))


def _staging_name() -> str:
    return f"{run_files.FINAL}.partial"


def complete_checkpoints(output_dir: Path) -> list[Path]:
    """The marked checkpoints whose contents match their marker, oldest first."""
    return [p for p in all_checkpoints(output_dir) if (p / MARKER).exists() and untrusted_reason(p) is None]


def damaged_checkpoints(output_dir: Path) -> list[tuple[Path, str]]:
    """Marked checkpoints whose contents no longer match the marker, with what is wrong."""
    return [(p, why) for p in all_checkpoints(output_dir) if (p / MARKER).exists() and (why := untrusted_reason(p))]


def latest_complete(output_dir: Path) -> Path | None:
    done = complete_checkpoints(output_dir)
    return done[-1] if done else None


def begin(output_dir: Path, step: int) -> None:
    """Before the Trainer writes checkpoint-`step`: claim the folder as this job's."""
    folder = output_dir / f"checkpoint-{step}"
    refuse_link(folder, output_dir)  # the Trainer would save through it
    folder.mkdir(parents=True, exist_ok=True)
    (folder / WRITING).touch()


def mark_complete(checkpoint: Path, step: int) -> None:
    """After every rank has written `checkpoint`: give it the umask's permissions, then mark it complete with the
    step and the size of every file, which `untrusted_reason` checks before the checkpoint is used."""
    apply_umask(checkpoint)
    files = {
        str(f.relative_to(checkpoint)): f.stat().st_size
        for f in sorted(checkpoint.rglob("*"))
        if f.is_file() and f.name not in (MARKER, WRITING)
    }
    atomic_write_json(checkpoint / MARKER, {"step": step, "time": time.time(), "files": files})
    (checkpoint / WRITING).unlink(missing_ok=True)


def untrusted_reason(checkpoint: Path) -> str | None:
    """Why the checkpoint's contents do not match its `COMPLETE` marker (None: they do)."""
    try:
        marker = json.loads((checkpoint / MARKER).read_text(encoding="utf-8"))
        step = trainer_state(checkpoint)["global_step"]
    except FileNotFoundError as e:
        return f"{Path(e.filename).name} is missing"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"a record is unreadable ({type(e).__name__})"
    marked = marker.get("step") if isinstance(marker, dict) else None
    if marked != step:
        return f"trainer_state.json says step {step}, {MARKER} says {marked}"
    for name, size in (marker.get("files") or {}).items():  # markers of older releases list no files
        path = checkpoint / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} is {path.stat().st_size} bytes, {MARKER} recorded {size}"
    return None


def remove_incomplete(output_dir: Path) -> list[Path]:
    """Delete the checkpoint folders this job began and never completed (a crash mid-save; call only when no save
    is in progress); those it removed. Folders without its `WRITING` claim are not its own: they stay."""
    partial = [p for p in all_checkpoints(output_dir) if not (p / MARKER).exists() and (p / WRITING).exists()]
    return [path for path in partial if _removed(path)]


def _removed(folder: Path) -> bool:
    """Delete `folder` (a real one, never a link); whether it is gone."""
    shutil.rmtree(folder, ignore_errors=True)
    return not folder.exists()


def rotate(output_dir: Path, keep: int) -> list[Path]:
    """Keep the newest `keep` complete checkpoints (never fewer than one); drop older and partial ones."""
    removed = remove_incomplete(output_dir)
    done = complete_checkpoints(output_dir)
    removed += [path for path in done[: max(0, len(done) - max(1, keep))] if _removed(path)]
    return removed


def trainer_state(checkpoint: Path) -> dict:
    """The Trainer's own state file of a checkpoint (step, step count, log history, tokens seen)."""
    return json.loads((checkpoint / "trainer_state.json").read_text())


def step_of(checkpoint: Path) -> int:
    """The optimizer step a checkpoint was written at."""
    return trainer_state(checkpoint)["global_step"]


def resume_point(resume: ResumeFrom, output_dir: Path) -> Path | None:
    """The checkpoint `--resume` names: auto = the newest complete one (None: start from scratch)."""
    if resume.mode == "never":
        return None
    if resume.mode == "folder":
        return resume.folder
    return latest_complete(output_dir)


def world_size(checkpoint: Path) -> int | None:
    """How many processes wrote `checkpoint` (the Trainer saves one RNG state per process); None: unknown."""
    per_rank = list(checkpoint.glob("rng_state_*.pth"))
    if per_rank:
        return len(per_rank)
    return 1 if (checkpoint / "rng_state.pth").exists() else None


def zero_world_size(checkpoint: Path) -> int | None:
    """The data-parallel world size a DeepSpeed ZeRO checkpoint is tied to (one optimizer shard per rank)."""
    latest = checkpoint / "latest"
    if not latest.exists():
        return None  # not a DeepSpeed checkpoint
    return len(list((checkpoint / latest.read_text().strip()).glob("*optim_states.pt"))) or None


def universal_tag(checkpoint: Path) -> str | None:
    """The DeepSpeed universal checkpoint beside the ZeRO one, if one was made (`latest_universal`)."""
    latest = checkpoint / "latest_universal"
    return latest.read_text().strip() if latest.exists() else None


def finished(checkpoint: Path | None, max_steps: int) -> bool:
    """Whether `checkpoint` is the end of training (`max_steps` <= 0: the step count the Trainer derived)."""
    if checkpoint is None or not (checkpoint / "trainer_state.json").exists():
        return False
    state = trainer_state(checkpoint)
    return state["global_step"] >= (max_steps if max_steps > 0 else state["max_steps"])


def export_final(
    checkpoint: Path, output_dir: Path, expected_parameters: int | None = None, texts: dict[str, str] | None = None
) -> Path:
    """Publish OUTPUT/final from `checkpoint`'s model and tokenizer files, plus `texts` ({file name: content}, e.g.
    the model card), verified before the rename: `final/` appears whole or not at all."""
    final, staging = output_dir / run_files.FINAL, output_dir / _staging_name()
    for path in (final, staging):
        refuse_link(path, output_dir)
    if staging.exists():
        shutil.rmtree(staging)  # an export a signal or a kill interrupted
    staging.mkdir()
    for path in checkpoint.iterdir():
        if path.is_file() and any(fnmatch.fnmatch(path.name, pattern) for pattern in MODEL_FILES):
            shutil.copy2(path, staging / path.name)
    for name, text in (texts or {}).items():
        (staging / name).write_text(text, encoding="utf-8")
    apply_umask(staging)  # copies keep the checkpoint's modes; the export is for others to read
    verify_export(staging, expected_parameters)
    record_hashes(staging)  # of what was verified: `push` uploads only these files (the card with its repo id)
    if final.exists():
        shutil.rmtree(final)
    staging.rename(final)
    return final


def record_hashes(folder: Path) -> Path:
    """Write `SHA256SUMS` (the format `sha256sum -c` reads) over every file of the export."""
    files = [p for p in sorted(folder.iterdir()) if p.is_file() and p.name != run_files.HASHES]
    return atomic_write_text(folder / run_files.HASHES, hashes_text({p.name: _sha256(p) for p in files}))


def hashes_text(hashes: dict[str, str]) -> str:
    """`SHA256SUMS` for {file name: sha256 hex}."""
    return "".join(f"{digest}  {name}\n" for name, digest in sorted(hashes.items()))


def recorded_hashes(folder: Path) -> dict[str, str] | None:
    """{file name: sha256 hex} as the export's `SHA256SUMS` records them (None: no readable one)."""
    try:
        recorded = (folder / run_files.HASHES).read_text(encoding="utf-8").splitlines()
    except OSError:
        return None
    return {name: digest for digest, name in (line.split("  ", 1) for line in recorded if "  " in line)}


def changed_files(folder: Path) -> str | None:
    """What in the export no longer matches the hashes recorded when it was verified (None: every file does)."""
    expected = recorded_hashes(folder)
    if expected is None:
        return f"it has no readable {run_files.HASHES} (an export of an older release, or not this job's)"
    present = {p.name for p in folder.iterdir() if p.is_file() and p.name != run_files.HASHES}
    if present != set(expected):
        return f"its files differ from those verified ({', '.join(sorted(present ^ set(expected)))})"
    changed = [name for name in sorted(expected) if _sha256(folder / name) != expected[name]]
    return f"{', '.join(changed)} changed since it was verified" if changed else None


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def verify_export(folder: Path, expected_parameters: int | None = None) -> int:
    """Reload the folder as stock transformers would; fail loudly on empty or missing weights."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    shards = sorted(folder.glob("*.safetensors"))
    if not shards:
        raise RuntimeError(f"export {folder} has no safetensors weights")
    for shard in shards:
        with safe_open(str(shard), framework="pt") as f:
            empty = [k for k in f.keys() if 0 in f.get_slice(k).get_shape()]  # noqa: SIM118 - not a dict
        if empty:
            raise RuntimeError(f"export {shard} holds empty tensors: {empty[:3]}")
    model = AutoModelForCausalLM.from_pretrained(str(folder))
    count = sum(p.numel() for p in model.parameters())
    if expected_parameters is not None and count != expected_parameters:
        raise RuntimeError(f"export {folder} reloads with {count} parameters, expected {expected_parameters}")
    return count
