"""Errors a person can fix, and the exit codes the whole tool (CLI, Makefile, Kubernetes) shares."""

EXIT_OK = 0
EXIT_CRASH = 1
EXIT_BAD_INPUT = 2  # bad input or configuration: fail fast, nothing written
EXIT_DIVERGED = 3  # loss stayed non-finite; the last good checkpoint is kept
EXIT_PREEMPTED = 75  # stopped by SIGTERM/SIGINT after a complete checkpoint (EX_TEMPFAIL: retry)


class JobError(Exception):
    """A problem with the user's input or set-up: printed as one line, exit code 2."""

    exit_code = EXIT_BAD_INPUT

    def __init__(self, cause: str, fix: str | None = None):
        self.cause = cause
        self.fix = fix
        super().__init__(f"{cause} -- {fix}" if fix else cause)
