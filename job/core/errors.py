"""Errors a person can fix, the exit codes the whole tool (CLI, Makefile, Kubernetes) shares, and a full disk
as one of those errors. Signals and process lifetime: `job.core.signals`."""

import errno
import os
import re

EXIT_OK = 0
EXIT_CRASH = 1
EXIT_BAD_INPUT = 2  # bad input or configuration: fail fast, nothing written
EXIT_DIVERGED = 3  # loss stayed non-finite; the last good checkpoint is kept
EXIT_PREEMPTED = 75  # stopped by SIGTERM/SIGINT: after a complete checkpoint, or before training began (EX_TEMPFAIL)
# errno in an error's text: pyarrow's "[errno 28] ...", Rust's (safetensors, tokenizers) "... (os error 27)"
_ERRNO_TEXT = re.compile(r"\[errno (\d+)\]|\(os error (\d+)\)", re.IGNORECASE)
# What each code means to whoever restarts the job (the termination message, Kubernetes' failure policies).
EXIT_MEANINGS = {
    EXIT_OK: "success",
    EXIT_CRASH: "crash: see the log; a retry may get past it",
    EXIT_BAD_INPUT: "bad input or configuration: a retry fails the same way until it is fixed",
    EXIT_DIVERGED: "diverged: the loss stayed non-finite; the last good checkpoint is kept",
    EXIT_PREEMPTED: "preempted: stopped by a signal; the same command resumes",
}


class JobError(Exception):
    """A problem with the user's input or set-up: printed as one line, exit code 2."""

    exit_code = EXIT_BAD_INPUT

    def __init__(self, cause: str, fix: str | None = None):
        self.cause = cause
        self.fix = fix
        super().__init__(f"{cause} -- {fix}" if fix else cause)


def crash_summary(error: BaseException) -> str:
    """A crash in one line: the exception's type and the first line of its text."""
    text = str(error).splitlines()[0][:500] if str(error).strip() else ""
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


_DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # no space, over quota, over a file-size limit


def raise_if_disk_full(error: BaseException, where) -> None:
    """Raise the one-line JobError for a full disk if `error` (or what caused it: libraries wrap it) is one;
    pyarrow's and Rust libraries' errors carry the errno only in their text (`_ERRNO_TEXT`)."""
    seen, depth = error, 0
    while seen is not None and depth < 20:  # a chain of causes and contexts; never a cycle, but bounded anyway
        depth += 1
        codes = {getattr(seen, "errno", None)} | {int(a or b) for a, b in _ERRNO_TEXT.findall(str(seen))}
        if codes & set(_DISK_FULL):
            code = next(c for c in _DISK_FULL if c in codes)
            raise JobError(
                f"no room to write {where} ({os.strerror(code)})", "free space or point JOB_CACHE/--output elsewhere"
            ) from None
        seen = seen.__cause__ or seen.__context__
