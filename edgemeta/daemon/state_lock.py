"""One daemon per state directory: an exclusive ``flock`` on ``state.dir/daemon.lock``, held for
the daemon's life.

Why a lock and not the pid in status.json: two daemons on one state directory share an inbox and
a registry (each sweeps the other's temp files, both commit versions), and a pid file outlives a
``kill -9``; a lock the kernel drops with the process cannot go stale. The file keeps the holder's
pid so the refusal can name it.

>>> import tempfile
>>> state = Path(tempfile.mkdtemp())
>>> first = StateLock(state).acquire()
>>> try:
...     StateLock(state).acquire()
... except StateLocked as exc:
...     print("refused:", "is in use by pid" in str(exc))
refused: True
>>> first.release()
>>> StateLock(state).acquire().release()  # free again
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

LOCK_NAME = "daemon.lock"


class StateLocked(RuntimeError):
    """Another live process holds the state directory."""


class StateLock:
    def __init__(self, state_dir: Path):
        self.state_dir = Path(state_dir)
        self._file = None  # a file object, so a daemon dropped without release() frees it

    @property
    def path(self) -> Path:
        return self.state_dir / LOCK_NAME

    def acquire(self) -> StateLock:
        file = open(self.path, "a+b")  # noqa: SIM115 (held for the daemon's life)
        fd = file.fileno()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            file.close()
            raise StateLocked(f"state.dir: {self.state_dir} is in use by pid {holder} (one "
                              "daemon per state directory; stop it first, or give this one "
                              "its own state.dir)") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._file = file
        return self

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing drops the lock; the file stays (no unlink race)
            self._file = None


def holder(state_dir: Path) -> int | None:
    """The pid of the live daemon holding ``state_dir``, or None when nobody holds it."""
    path = Path(state_dir) / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.pread(fd, 32, 0).decode(errors="replace").strip()
            return int(text) if text.isdigit() else -1
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)
