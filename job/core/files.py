"""How the job writes files: whole or not at all, readable as the user's umask says, and one run per lock.

Every file the job writes goes through `atomic_write_text` / `atomic_write_json` (a reader sees the old file or
the new one, never half) or is given the umask's permissions after a library wrote it (`apply_umask`), so a serving
pod or a colleague with another uid on the same volume can read what a run produced. `FileLock` is `filelock`'s
lock (the kernel drops it when its holder dies, so a killed run leaves nothing stuck) plus the holder's pid and
host written into the lock file, which a refused second run names.
"""

from __future__ import annotations

import json
import os
import socket
import uuid
from pathlib import Path
from typing import Any

import filelock


def umask() -> int:
    """The process's umask (read by setting it and putting it back: there is no getter)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(path: Path) -> None:
    """Give `path` (and everything below a folder) the permissions a plain `open`/`mkdir` would have had.

    Libraries write through `tempfile.mkstemp`/`mkdtemp` then rename (0600 files, 0700 folders); this undoes that,
    so the job's one permission policy holds: readable by group and others unless the umask says otherwise.
    """
    mask = umask()
    paths = [path, *path.rglob("*")] if path.is_dir() else [path]
    for p in paths:
        if p.is_symlink():
            continue
        p.chmod((0o777 if p.is_dir() else 0o666) & ~mask)


def refuse_link(path: Path, root: Path) -> None:
    """One line for a path the job would write or delete that is a symbolic link, or lies below one inside its
    folder `root`: through it the job would reach outside `root` (and a link is nothing the job made, so it is not its
    to remove either). `root` itself may be a link: the user named it."""
    from job.core.errors import JobError

    path, root = Path(path), Path(root)
    below_root = [path, *path.parents]
    below_root = below_root[: below_root.index(root)] if root in path.parents else [path]
    for link in (p for p in below_root if p.is_symlink()):
        raise JobError(
            f"{link} is a symbolic link (to {os.readlink(link)}): the job writes only inside {root}",
            f"remove the link {link} (what it points to stays), or use another folder",
        )


def new_folder(parent: Path, prefix: str) -> Path:
    """A new, uniquely named folder in `parent` with the umask's permissions (unlike `tempfile.mkdtemp`'s 0700)."""
    parent.mkdir(parents=True, exist_ok=True)
    path = parent / f"{prefix}{uuid.uuid4().hex[:12]}"
    path.mkdir()
    return path


def atomic_write_text(path: Path, text: str) -> Path:
    """Write `path` whole or not at all: a sibling temporary file (unique per process: several launchers may write
    one file at once), flushed to disk, then renamed over it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_json(path: Path, value: Any) -> Path:
    return atomic_write_text(path, json.dumps(value, indent=2, ensure_ascii=False) + "\n")


class FileLock:
    """An exclusive lock on `path` (filelock) that records its holder; `holder()` names it to whoever is refused."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock = filelock.FileLock(str(self.path))  # mode: the umask's

    def try_acquire(self) -> bool:
        """Take the lock without waiting; False when another process holds it."""
        if self._lock.is_locked:
            return True
        try:
            self._lock.acquire(blocking=False)
        except filelock.Timeout:
            return False
        with open(self.path, "w", encoding="utf-8") as f:
            f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        return True

    def held_elsewhere(self) -> str | None:
        """Who holds the lock, if another process does (a look: taken and given back at once, nothing written)."""
        if not self.path.exists():
            return None
        try:
            self._lock.acquire(blocking=False)
        except filelock.Timeout:
            return self.holder()
        self._lock.release()
        return None

    def acquire(self) -> None:
        """Wait for the lock (several writers of one cache entry: one writes, the others then reuse it)."""
        self._lock.acquire()

    def release(self) -> None:
        self._lock.release()

    def fileno(self) -> int | None:
        """The locked file's descriptor while held, for a child process that must hold the lock too (`pass_fds`:
        the child shares the lock, which is released only when every holder has closed it or died). filelock
        keeps it private; None if a filelock release moved it."""
        context = getattr(self._lock, "_context", None)
        return getattr(context, "lock_file_fd", None) if self._lock.is_locked else None

    def holder(self) -> str:
        try:
            return self.path.read_text(encoding="utf-8").strip() or "another process"
        except OSError:
            return "another process"

    def __enter__(self) -> FileLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
