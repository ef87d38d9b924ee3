"""DeepSpeed's JIT-built ops, loaded so that a process killed while loading one cannot hang every later start.

DeepSpeed builds its C++ ops on first use into TORCH_EXTENSIONS_DIR (on CPU the shared-memory comm op of every
distributed run; CPU Adam for `--offload`), through torch's `cpp_extension.load`. That holds `<build folder>/lock`,
created with O_EXCL, while it builds or checks a build; every other process polls until the file goes, with no
timeout. A rank killed in that window (the OOM killer, a preemption, torchrun stopping its group, a test) leaves the
file behind, and every later start on that cache (a restarted pod on the same volume) waits forever, silently.

What this adds: each build runs under a kernel lock (`flock` on `<build folder>/job-build.lock`, released by the kernel
when its holder dies, so a job process waits for another's build and never for a dead one), and that file says
`building` while torch's lock may exist. A torch lock found by the flock's holder with `building` recorded was left
by a job process that died: it is removed, with a warning. One without that record belongs to another program
(or predates the job): the run ends in one line naming it instead of waiting forever.
"""

from __future__ import annotations

import fcntl
import functools
import logging
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from job.core.errors import JobError

log = logging.getLogger("job")

BUILD_LOCK = "job-build.lock"  # the flock file beside torch's lock, also the record of a build in progress
TORCH_LOCK = "lock"  # torch.utils.cpp_extension._jit_compile's FileBaton in the build folder
BUILDING = "building"


def build_folder(name: str) -> Path:
    """Where torch builds extension `name` (TORCH_EXTENSIONS_DIR/name, or its default root); created if missing."""
    from torch.utils.cpp_extension import _get_build_directory

    return Path(_get_build_directory(name, verbose=False))


@contextmanager
def build_lock(name: str) -> Iterator[None]:
    """Hold the job's lock on building op `name`; a torch lock a dead job process left is removed first."""
    folder = build_folder(name)
    with open(folder / BUILD_LOCK, "a+", encoding="utf-8") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)  # waits while another job process builds or loads this op
        guard.seek(0)
        record = guard.read()
        torch_lock = folder / TORCH_LOCK
        if torch_lock.exists():
            if not record.startswith(BUILDING):
                raise JobError(
                    f"{torch_lock} exists but no job process is building DeepSpeed's {name} op: another program "
                    "is building it, or one was killed while building it",
                    f"wait for that build to end, or remove {torch_lock} if none is running",
                )
            log.warning(
                "%s was left by a process killed while it built DeepSpeed's %s op (%s): removed, building again",
                torch_lock,
                name,
                record.strip(),
            )
            torch_lock.unlink()
        _record(guard, f"{BUILDING} {name}: pid {os.getpid()} on {socket.gethostname()}\n")
        try:
            yield
        finally:
            _record(guard, "")


def _record(guard, text: str) -> None:
    guard.seek(0)
    guard.truncate()
    guard.write(text)
    guard.flush()
    os.fsync(guard.fileno())


def guard_op_builds() -> None:
    """Route every DeepSpeed JIT op load in this process through `build_lock` (once; idempotent)."""
    from deepspeed.ops.op_builder.builder import OpBuilder

    if getattr(OpBuilder.jit_load, "job_build_lock", False):
        return
    unguarded = OpBuilder.jit_load

    @functools.wraps(unguarded)
    def jit_load(self, verbose=True):
        with build_lock(self.name):
            return unguarded(self, verbose)

    jit_load.job_build_lock = True
    OpBuilder.jit_load = jit_load
