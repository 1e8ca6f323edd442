"""The one durable atomic write, and the names and clean-up that go with it.

Every file another reader may see (predictions, error reports, manifests, status, episodes,
trigger results) is written as a temp file in the same directory, fsynced, renamed over the final
name and the directory fsynced, so a reader or a crash sees the old file or the new one, never half
of one. Temp files carry one recognisable shape (``.<name>.<random>.tmp``) so that a restart can
remove what a kill left behind without touching anything else.

>>> import tempfile
>>> d = Path(tempfile.mkdtemp())
>>> atomic_write(d / "a.json", b"{}")
>>> (d / "a.json").read_bytes(), sweep_temp(d)
(b'{}', [])
>>> len(safe_name("x" * 300 + ".csv", ".predictions.jsonl").encode()) <= NAME_MAX
True
"""

from __future__ import annotations

import errno
import hashlib
import os
import tempfile
from pathlib import Path

TEMP_SUFFIX = ".tmp"
# The longest file name most Linux file systems take (ext4, xfs, tmpfs, btrfs: 255 bytes).
NAME_MAX = 255
# Errors that say "the disk (or the file system) cannot take writes now", not "this file is bad":
# the daemon pauses and retries instead of quarantining.
STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO})


def is_storage_error(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in STORAGE_ERRNOS


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durable(path: Path, data: bytes) -> None:
    """Write and fsync ``path`` in place (inside a temp directory that is renamed as a whole)."""
    with path.open("wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def atomic_write(path: Path, data: bytes, mode: int = 0o640) -> None:
    """Temp file + fsync + rename + fsync of the directory: readers see old or new, never half.

    ``mode`` defaults to group-readable (the state directory's group is the operators', see
    docs/operations.md); mkstemp alone would leave 0600.
    """
    path = Path(path)
    prefix = f".{path.name[:NAME_MAX - 24]}."
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=TEMP_SUFFIX, dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def is_temp(name: str) -> bool:
    """A temp file of :func:`atomic_write` (or of the registry's commit)."""
    return name.startswith(".") and name.endswith(TEMP_SUFFIX)


def sweep_temp(directory: Path) -> list[Path]:
    """Remove temp files a kill left between write and rename; returns what was removed."""
    removed = []
    try:
        entries = list(Path(directory).iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return removed
    for entry in entries:
        if is_temp(entry.name) and not entry.is_symlink() and entry.is_file():
            entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


def safe_name(name: str, suffix: str = "") -> str:
    """``name + suffix`` if the file system takes it, else a shortened name that stays unique.

    Input names may be up to NAME_MAX bytes, so anything the daemon derives from them (the outbox
    file, the quarantine report, a trigger's result) can be too long. The shortened form keeps a
    readable head of the name and a hash of the whole, so two long names never collide.
    """
    full = name + suffix
    if len(os.fsencode(full)) <= NAME_MAX:
        return full
    raw = os.fsencode(name)
    digest = hashlib.sha256(raw).hexdigest()[:16]
    room = NAME_MAX - len(os.fsencode(suffix)) - len(digest) - 2
    head = raw[:max(room, 0)].decode("utf-8", "ignore")
    return f"{head}~{digest}{suffix}"
