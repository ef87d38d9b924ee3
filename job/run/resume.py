"""The resume rules: whether `--output-dir` may be written (new, empty, or a run of this job), whether a run in it
is this one resumed (the same settings, the same inputs by fingerprint, a global batch kept across a change of
process count), and whether an explicit `--resume` checkpoint fits. Each is a preflight check (`CHECKS`).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from job.core import checkpoints, run_files
from job.core.config import RunConfig, comparable, resumable_fields
from job.core.errors import JobError
from job.core.files import FileLock, refuse_link
from job.core.weights import model_fingerprint
from job.run.check_results import Check, Preflight
from job.run.launch_record import Launch


def has_run_state(output: Path) -> bool:
    """A run left something to resume or keep: a complete checkpoint or an export."""
    return checkpoints.latest_complete(output) is not None or (output / run_files.FINAL).is_dir()


def check_output(p: Preflight) -> Check:
    """The output folder must be creatable, ours or new, and if it holds a run it must be this one, resumed."""
    cfg = p.cfg
    output = Path(cfg.output_dir)
    existing = output
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        return Check("output", False, f"cannot create {output}: {existing} is a file", "choose another --output-dir")
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".job-write-test-"):
            pass
    except OSError as e:
        return Check("output", False, f"{existing} is not writable ({e.strerror})", "choose a writable --output-dir")
    previous = output / run_files.RUN_CONFIG
    if not previous.exists():
        # (a volume's root holds lost+found: the file system's, never touched by a run; the lock file is ours, left
        # by a start that stopped before writing run_config.json)
        ours = {"lost+found", run_files.LOCK}
        others = sorted(p.name for p in output.iterdir() if p.name not in ours) if output.is_dir() else []
        if others:  # someone else's folder: the job deletes only what it wrote
            shown = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
            return Check(
                "output",
                False,
                f"{output} is not empty ({shown}) and holds no run of this job (no run_config.json)",
                "choose a new or empty --output-dir",
            )
        return Check("output", True, f"{output} (new)")
    try:
        for link in checkpoints.linked_entries(output):
            refuse_link(link, output)
    except JobError as e:
        return Check("output", False, e.cause, e.fix)
    # What `doctor` says of a folder whose run is going (`train` takes the lock itself). Only node 0 (or an unset rank,
    # which means node 0) asks: node 0 holds the lock for the whole run, so another node of that same run that starts
    # after it finds the lock held by its own run.
    running = FileLock(output / run_files.LOCK).held_elsewhere() if not cfg.node_rank else None
    if running:
        return Check(
            "output", False, f"{output} is in use by a running job ({running})", "wait for it to end, or stop it"
        )
    damaged = checkpoints.damaged_checkpoints(output)
    if damaged and checkpoints.latest_complete(output) is None and cfg.resume.mode == "auto":
        shown = "; ".join(f"{path.name}: {why}" for path, why in damaged[-2:])
        return Check(
            "output",
            False,
            f"no checkpoint in {output} can be trusted ({shown})",
            "restore the checkpoint from a copy, or use another --output-dir (the job deletes nothing it cannot "
            "prove it wrote)",
        )
    if not has_run_state(output):  # a start that failed before its first checkpoint: begin again
        return Check("output", True, f"{output} holds no checkpoint yet: the run starts afresh")
    if cfg.resume.mode == "never":
        return Check(
            "output",
            False,
            f"{output} already holds a run",
            "use --resume auto to continue it, or another --output-dir",
        )
    old = read_record(previous)
    changed = changed_settings(cfg, old)
    batch = _global_batch_on_resume(cfg, old, p.launch)
    if batch is not None:
        if not batch.ok:
            return batch
        changed = [k for k in changed if k != "grad_accum"]  # another process count, the same global batch
    if changed:
        return Check(
            "output",
            False,
            f"{output} holds a different run (changed: {', '.join(changed)})",
            "use another --output-dir, or the same settings to resume",
        )
    fallback = f"; damaged, not used: {', '.join(p.name for p, _ in damaged)}" if damaged else ""
    return Check("output", True, f"{output} holds this run: it will resume{fallback}")


def read_record(path: Path) -> dict:
    """A run's own record (`run_config.json`, `inputs.json`): a missing or unreadable one is a refusal, never a
    fresh start, since without it nothing says the folder's checkpoints belong to this run."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise JobError(
            f"{path} is missing, so {path.parent} cannot be checked against this run",
            "restore it from a copy of the run folder, or use another --output-dir",
        ) from None
    except (OSError, ValueError) as e:
        raise JobError(
            f"{path} is unreadable ({type(e).__name__}), so {path.parent} cannot be checked against this run",
            "restore it from a copy of the run folder, or use another --output-dir",
        ) from None
    if not isinstance(value, dict):
        raise JobError(f"{path} is not a record of this job", "restore it, or use another --output-dir")
    return value


def changed_settings(cfg: RunConfig, old: dict) -> list[str]:
    """The settings a resumed run may not change that differ from the recorded run's."""
    resumable = resumable_fields()
    return sorted(
        k
        for k, v in cfg.to_dict().items()
        if k not in resumable and k in old and comparable(k, old[k]) != comparable(k, v)
    )


def _global_batch_on_resume(cfg: RunConfig, old: dict, launch: Launch) -> Check | None:
    """Resuming on another number of processes (elastic) keeps the global batch, or the curve would not continue.

    DDP checkpoints load at any world size; a ZeRO one is converted to DeepSpeed's universal checkpoint at
    launch. `--grad-accum` may change on resume only to keep per-device batch x accumulation x processes.
    """
    last = checkpoints.resume_point(cfg.resume, Path(cfg.output_dir))
    written_by = checkpoints.world_size(last) if last else None
    if written_by is None or "grad_accum" not in old or "per_device_batch_size" not in old:
        return None
    world = launch.world_size
    before = old["per_device_batch_size"] * old["grad_accum"] * written_by
    now = launch.global_batch
    if before == now:
        return Check("output", True, f"resumes {last.name} on {world} process(es), global batch {now} rows")
    per_step = cfg.per_device_batch_size * world
    fix = (
        f"pass --grad-accum {before // per_step} to keep it"
        if before % per_step == 0
        else f"use a process count that divides {before // cfg.per_device_batch_size} batches"
    )
    return Check(
        "output",
        False,
        f"{last} was trained with a global batch of {before} rows ({old['per_device_batch_size']} x "
        f"{old['grad_accum']} x {written_by} processes); this run's would be {now}",
        fix,
    )


def check_inputs(p: Preflight) -> Check:
    """Fingerprint what the run trains on; `--prepared` data and a resumed run must match it."""
    from job.data.mix import sources
    from job.data.tokenizer import tokenizer_fingerprint

    cfg = p.cfg
    if p.tokenizer is None:
        return Check("inputs", True, "not checked: needs a loadable tokenizer")
    tokenizer = tokenizer_fingerprint(p.tokenizer)
    if p.prepared_key is not None:
        check_prepared_tokenizer(cfg.prepared.path, p.prepared_key, tokenizer)
    key = p.prepared_key or {"corpus": p.corpus.fingerprint if p.corpus else None}
    data = key["corpus"]
    mix = sources(cfg)
    if mix is not None:  # each source's corpus and its share: another mix is other inputs
        for source in mix:
            if source.name in p.prepared_keys:
                check_prepared_tokenizer(source.path, p.prepared_keys[source.name], tokenizer)
        keys = p.prepared_keys or {n: {"corpus": c.fingerprint} for n, c in p.corpora.items()}
        key = next(iter(keys.values()), {})
        data = {
            s.name: {"corpus": keys[s.name]["corpus"] if s.name in keys else None, "share": round(share, 6)}
            for s, share in cfg.source_data.shares()
        }
    p.fingerprints = {
        "tokenizer": tokenizer,
        "data": data,
        "model": model_fingerprint(Path(cfg.model)) if cfg.model else None,
        "preset": None if cfg.model else cfg.preset,
        "max_length": key.get("max_length", cfg.max_length),
        "packing": key.get("packing", cfg.packing),
    }
    output = Path(cfg.output_dir)
    if cfg.resume.mode == "auto" and has_run_state(output):
        _require_same_inputs(p.fingerprints, output)
        return Check("inputs", True, "the same tokenizer, data and model as the run being resumed")
    return Check("inputs", True, f"tokenizer {tokenizer}, data {p.fingerprints['data']}")


def _require_same_inputs(fingerprints: dict, run: Path) -> None:
    old = read_record(run / run_files.INPUTS)
    changed = sorted(k for k, v in fingerprints.items() if k in old and old[k] != v)
    if changed:
        raise JobError(
            f"{run} was trained on other inputs (changed: {', '.join(changed)})",
            "resume with the same tokenizer, data and model, or use another --output-dir",
        )


def check_prepared_tokenizer(prepared: str, key: dict, tokenizer: str) -> None:
    if key.get("tokenizer") != tokenizer:
        raise JobError(
            f"{prepared} was prepared with another tokenizer (fingerprint {key.get('tokenizer')}, this one's is "
            f"{tokenizer}): changed: tokenizer",
            "prepare the data again with this tokenizer, or pass the tokenizer it was prepared with",
        )


def check_resume(p: Preflight) -> Check:
    """`--resume FOLDER` is checked as `--resume auto` would check its own: a complete checkpoint whose contents
    match its marker, of a run of this job with the same settings (and, in check_inputs, inputs), of a model of
    this shape."""
    cfg = p.cfg
    if cfg.resume.mode != "folder":
        return Check("resume", True, cfg.resume.mode)
    folder = cfg.resume.folder
    if not (folder / "trainer_state.json").is_file():
        raise JobError(
            f"--resume {folder} is not a checkpoint (no trainer_state.json)",
            "pass a checkpoint-N folder of a run, or --resume auto",
        )
    saved = folder / "config.json"
    if saved.is_file() and p.model_config is not None:
        old = json.loads(saved.read_text(encoding="utf-8"))
        shape = ("vocab_size", "hidden_size", "n_layer", "n_head")
        differ = [
            f"{k} {old.get(k)} vs {getattr(p.model_config, k, None)}"
            for k in shape
            if old.get(k) != getattr(p.model_config, k, None)
        ]
        if differ:
            raise JobError(
                f"--resume {folder} is a checkpoint of another model shape ({'; '.join(differ)})",
                "resume with the --model/--preset and tokenizer that checkpoint was trained with",
            )
    if not (folder / checkpoints.MARKER).is_file():
        raise JobError(
            f"--resume {folder} is not a complete checkpoint (no {checkpoints.MARKER}: its save never finished)",
            "pass a complete checkpoint-N folder, or --resume auto",
        )
    why = checkpoints.untrusted_reason(folder)
    if why:
        raise JobError(f"--resume {folder} is damaged ({why})", "pass another complete checkpoint, or --resume auto")
    old = read_record(folder.parent / run_files.RUN_CONFIG)
    changed = [k for k in changed_settings(cfg, old) if k != "grad_accum"]
    if changed:
        raise JobError(
            f"--resume {folder} is a checkpoint of a different run (changed: {', '.join(changed)})",
            "resume with that run's settings",
        )
    if p.fingerprints:  # (check_inputs made them)
        _require_same_inputs(p.fingerprints, folder.parent)
    return Check("resume", True, f"from {folder}")
