"""The verdict where Kubernetes shows it: the container's termination message (`kubectl describe pod`, and
`.status.containerStatuses[].state.terminated.message`), a short text the process writes to a file before it ends.

The file is $JOB_TERMINATION_LOG (empty: none), else `/dev/termination-log` when it is there and writable (a
container's `terminationMessagePath`); elsewhere nothing is written. Kubernetes keeps at most 4096 bytes of it.
The message: the exit code and its meaning (`EXIT_MEANINGS`), the job's own one-line verdict, and for a run folder
the last complete checkpoint, its step and the exported model.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from job.core import checkpoints, run_files
from job.core.errors import EXIT_MEANINGS

TERMINATION_LOG_ENV = "JOB_TERMINATION_LOG"
DEFAULT_PATH = Path("/dev/termination-log")
LIMIT_BYTES = 4096  # what the kubelet keeps of it


def termination_path(environ: dict[str, str] | None = None) -> Path | None:
    """Where the message goes: $JOB_TERMINATION_LOG (empty: nowhere), else the default path if it is writable."""
    environ = os.environ if environ is None else environ
    if TERMINATION_LOG_ENV in environ:
        return Path(environ[TERMINATION_LOG_ENV]) if environ[TERMINATION_LOG_ENV].strip() else None
    return DEFAULT_PATH if DEFAULT_PATH.exists() and os.access(DEFAULT_PATH, os.W_OK) else None


def termination_message(code: int, message: str, output_dir: Path | None = None) -> str:
    """`exit CODE (meaning)`, the verdict, then what a run folder holds: the last checkpoint, its step, the model."""
    meaning = EXIT_MEANINGS.get(code, "unexpected exit code")
    lines = [f"exit {code} ({meaning})", message.strip()]
    if output_dir is not None and output_dir.is_dir():
        last = checkpoints.latest_complete(output_dir)
        if last is not None:
            with contextlib.suppress(OSError, ValueError, KeyError):  # no readable trainer state: no step
                lines.append(f"last step: {checkpoints.step_of(last)}")
            lines.append(f"checkpoint: {last}")
        final = output_dir / run_files.FINAL
        if final.is_dir():
            lines.append(f"model: {final}")
    text = "\n".join(line for line in lines if line) + "\n"
    data = text.encode()
    return text if len(data) <= LIMIT_BYTES else data[: LIMIT_BYTES - 4].decode(errors="ignore") + "...\n"


def record_termination(code: int, message: str, output_dir: Path | str | None = None) -> Path | None:
    """Write the termination message (see the module's text); never fails the job: returns the path written."""
    path = termination_path()
    if path is None:
        return None
    text = termination_message(code, message, Path(output_dir) if output_dir is not None else None)
    try:
        path.write_text(text, encoding="utf-8")  # not atomic: /dev/termination-log is a bind-mounted file
    except OSError:
        return None
    return path


def no_termination_message() -> None:
    """For a worker process: the launcher writes the verdict of the whole run, the workers none."""
    os.environ[TERMINATION_LOG_ENV] = ""
