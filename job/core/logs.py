"""How the job's log lines look, in every process of a run (the launcher and each torchrun worker): one setup.

Plain text by default, one line per record, readable in `kubectl logs`:

    2026-12-01T15:42:00Z INFO rank0 training output/run; resume from scratch

JSON lines with `JOB_LOG_FORMAT=json` (or `python -m job --log-format json ...`), one object per record with
`time`, `level`, `rank`, `logger` and `message`. The setting is put into the environment, so the workers torchrun
starts write the same format.

`rank` is the worker's global rank (`RANK`, set by torchrun and for an in-process run); a launcher, which has
none, shows its node instead (`node2`: `PET_NODE_RANK`, else `JOB_COMPLETION_INDEX`, else 0).

Library messages that ask nothing of the reader (`NOISE`) are dropped; transformers', DeepSpeed's and Python
warnings otherwise go through the same format (`adopt_library_loggers`, `logging.captureWarnings`), and what
a library prints while the process group and DeepSpeed start (`prints_logged`) becomes records too.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import sys
import time
from collections.abc import Iterator

from job.core.errors import JobError
from job.core.topology import TOPOLOGY_ENV

LOG_FORMAT_ENV = "JOB_LOG_FORMAT"
FORMATS = ("text", "json")
QUIET_LOGGERS = ("datasets", "DeepSpeed", "torch.distributed")  # their INFO records: WARNING and above only

# Messages that tell the reader nothing to do: (logger name prefix, any case; pattern searched in the message).
NOISE: tuple[tuple[str, str], ...] = (
    ("DeepSpeed", r"^Setting accelerator to CPU"),  # every CPU run; the devices row of the launch says where
    ("deepspeed", r"^DeepSpeed \S+ built successfully$"),  # print()ed: its CPU communication op, JIT-loaded
    ("py.warnings", r"OMP_NUM_THREADS/MKL_NUM_THREADS unset"),  # accelerate picks a value for us, as it says
    # one library's use of another's deprecated call: news for whoever bumps the pins, not for whoever runs the job
    ("py.warnings", r"site-packages/\S+:\d+: (FutureWarning|DeprecationWarning): "),
)
_NOISE = [(prefix.lower(), re.compile(pattern)) for prefix, pattern in NOISE]


_NODE_RANK: list[int] = []  # this launcher's node rank once resolved (a flag or the environment)


def set_node_rank(rank: int) -> None:
    """Name this launcher's node in its log lines from now on (`--node-rank` as well as the environment)."""
    _NODE_RANK[:] = [rank]


def rank_label(environ: dict[str, str] | None = None) -> str:
    """`rank{RANK}` in a worker, else `node{N}` (a launcher: its resolved node rank, until then the launch
    environment's)."""
    environ = os.environ if environ is None else environ
    rank = environ.get("RANK", "").strip()
    if rank:
        return f"rank{rank}"
    if _NODE_RANK:
        return f"node{_NODE_RANK[0]}"
    node = next((environ[v].strip() for v in TOPOLOGY_ENV["node_rank"] if environ.get(v, "").strip()), "0")
    return f"node{node}"


def _utc(created: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(created))


def _message(record: logging.LogRecord) -> str:
    """The record's text; a Python warning's without the echo of its source line (`file:line: Category: text`)."""
    message = record.getMessage()
    return message.strip().splitlines()[0] if record.name == "py.warnings" and message.strip() else message


class TextFormatter(logging.Formatter):
    """`TIME LEVEL RANK message` (UTC, seconds), a traceback below when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        line = f"{_utc(record.created)} {record.levelname} {rank_label()} {_message(record)}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per record (non-ASCII text kept as is)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": _utc(record.created),
            "level": record.levelname,
            "rank": rank_label(),
            "logger": record.name,
            "message": _message(record),
        }
        if record.exc_info:
            entry["traceback"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


class NoiseFilter(logging.Filter):
    """Drops the records `NOISE` lists."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        name = record.name.lower()
        return not any(name.startswith(prefix) and p.search(message) for prefix, p in _NOISE)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is when a record comes (a test runner swaps it), never a closed stream."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def log_format(value: str | None = None) -> str:
    """The format asked for (`value`, else $JOB_LOG_FORMAT, else text); an unknown one is refused in one line."""
    chosen = (value or os.environ.get(LOG_FORMAT_ENV) or "text").strip().lower()
    if chosen not in FORMATS:
        raise JobError(f"{LOG_FORMAT_ENV}={chosen!r} is not a log format", f"use one of: {', '.join(FORMATS)}")
    return chosen


def setup_logging(fmt: str | None = None, level: int = logging.INFO) -> None:
    """Send every record to stderr in `fmt` (see `log_format`), library noise filtered; idempotent."""
    chosen = log_format(fmt)
    os.environ[LOG_FORMAT_ENV] = chosen  # the workers torchrun starts inherit it
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, _StderrHandler)]:
        root.removeHandler(handler)
    handler = _StderrHandler()
    handler.setFormatter(JsonFormatter() if chosen == "json" else TextFormatter())
    handler.addFilter(NoiseFilter())
    root.addHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(True)  # warnings.warn(...) as records of `py.warnings`, in the same format
    for name in QUIET_LOGGERS:
        logger = logging.getLogger(name)
        logger.setLevel(logging.WARNING)
        if not any(isinstance(f, NoiseFilter) for f in logger.filters):
            logger.addFilter(NoiseFilter())  # also while the library still writes through a handler of its own


def adopt_library_loggers() -> None:
    """Where transformers and DeepSpeed run: their records go through our handler (format, filter) instead of the
    handlers each installs on its logger (transformers' `[transformers] message`, DeepSpeed's on stdout), and
    transformers' progress bars (loading and writing shards) are off: the job logs its own progress."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_default_handler()
    hf_logging.enable_propagation()
    hf_logging.disable_progress_bar()
    deepspeed = logging.getLogger("DeepSpeed")
    for handler in list(deepspeed.handlers):
        deepspeed.removeHandler(handler)
    deepspeed.propagate = True
    deepspeed.setLevel(logging.WARNING)  # DeepSpeed sets its own level when it is imported


class _LineWriter(io.TextIOBase):
    """A text stream that logs each complete line it is given (print() in a library, as a record)."""

    def __init__(self, logger: logging.Logger):
        self.logger = logger
        self.pending = ""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        lines = (self.pending + text).split("\n")
        self.pending = lines.pop()
        for line in lines:
            if line.strip():
                self.logger.info(line.rstrip())
        return len(text)

    def flush(self) -> None:
        if self.pending.strip():
            self.logger.info(self.pending.rstrip())
        self.pending = ""


@contextlib.contextmanager
def prints_logged(logger_name: str) -> Iterator[None]:
    """What is print()ed in the block becomes INFO records of `logger_name` (filtered and formatted like the rest;
    not one of `QUIET_LOGGERS`, whose INFO records are dropped)."""
    writer = _LineWriter(logging.getLogger(logger_name))
    try:
        with contextlib.redirect_stdout(writer):
            yield
    finally:
        writer.flush()
