"""Watched inboxes: the file-system side of ingest (parsing itself is in ``parsing.py``).

Input files move through ``inbox/<stream>/`` to exactly one of ``processed/`` or ``quarantine/``;
predictions are durably written to ``outbox/`` before the input moves, so a crash at any point
leaves the file in the inbox and a restart handles it again with the same output. Bad input never
raises out of here as anything but an :class:`IngestError` with a reason (a bounded set, used as a
metric label) and the line and column where it went wrong; a full disk raises the ``OSError`` so
the daemon can pause instead of quarantining good files.
"""

from __future__ import annotations

import json
import os
import queue
import stat
import time
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from edgemeta.config import StreamSettings
from edgemeta.fsio import atomic_write, is_storage_error, safe_name, sweep_temp
from edgemeta.stream.parsing import (
    REASONS,
    IngestError,
    Limits,
    Refusal,
    Rows,
    parse_labels_bytes,
    parse_rows_bytes,
)

__all__ = ["REASONS", "IngestError", "Limits", "Rows", "LabelCache", "StateLayout", "PendingFiles",
           "InboxWatcher", "parse_rows", "parse_labels", "read_checked"]

LABEL_SUFFIXES = (".labels.csv", ".labels.jsonl")
DATA_SUFFIXES = (".csv", ".jsonl", ".npz")


def is_label_file(name: str) -> bool:
    return name.endswith(LABEL_SUFFIXES)


def is_candidate(path: Path) -> bool:
    """Files producers are still writing carry a temporary name: dot-prefixed or .tmp/.part."""
    name = path.name
    return not (name.startswith(".") or name.endswith((".tmp", ".part", ".error.json")))


def read_checked(path: Path, max_bytes: int) -> bytes:
    """The bytes of a regular input file within the size limit, checked before it is read."""
    if path.is_symlink():
        raise IngestError("symlink", f"{path.name} is a symlink; inputs must be regular files")
    try:
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):
            kind = "a directory" if stat.S_ISDIR(info.st_mode) else "not a regular file"
            raise IngestError("not_regular", f"{path.name} is {kind}; inputs must be regular files")
        if info.st_size > max_bytes:
            raise IngestError("too_large", f"{path.name} is {info.st_size} bytes, over the limit "
                              f"of {max_bytes} (ingest.max_file_bytes)")
        with path.open("rb") as fh:
            data = fh.read(max_bytes + 1)  # a file still growing cannot slip past the limit
    except OSError as exc:
        if is_storage_error(exc):
            raise
        raise IngestError("unreadable", f"cannot read {path.name}: {exc.strerror or exc}") from exc
    if len(data) > max_bytes:
        raise IngestError("too_large", f"{path.name} grew over the limit of {max_bytes} bytes "
                          "(ingest.max_file_bytes)")
    if not data.strip():
        raise IngestError("empty", f"{path.name} is empty")
    return data


def parse_rows(path: Path, stream: StreamSettings, limits: Limits,
               classes: int | None = None) -> Rows:
    """Rows of a data file: features by name, optional id, the label when the file has it."""
    return parse_rows_bytes(read_checked(path, limits.max_file_bytes), path.name, stream, limits,
                            classes)


def parse_labels(path: Path, limits: Limits, classes: int | None = None
                 ) -> tuple[list[tuple[str, float]], dict[str, Refusal]]:
    """A delayed-label file: ``id,label`` rows (CSV with that header, or JSON Lines)."""
    return parse_labels_bytes(read_checked(path, limits.max_file_bytes), path.name, limits,
                              classes)


class LabelCache:
    """Recent predictions kept so late labels can score the model that made them.

    Bounded by entries and by bytes: each entry holds its own copy of the row and the model's
    output (a view would keep the whole input batch alive), and the oldest go first.

    >>> cache = LabelCache(capacity=10, max_bytes=1000)
    >>> for i in range(50):
    ...     cache.put("s", str(i), np.zeros(8, np.float32), np.zeros(1, np.float32), 1)
    >>> len(cache) < 10 and cache.nbytes <= 1000 and cache.pop("s", "49") is not None
    True
    """

    ENTRY_OVERHEAD = 400  # dict slot, key tuple and strings, value tuple, two array headers

    def __init__(self, capacity: int, max_bytes: int = 64 * 1024 * 1024):
        self.capacity = capacity
        self.max_bytes = max_bytes
        self._items: OrderedDict[tuple[str, str], tuple[np.ndarray, np.ndarray, int]] = OrderedDict()
        self.nbytes = 0
        self.evicted = 0

    def _size(self, key: tuple[str, str], x: np.ndarray, output: np.ndarray) -> int:
        return self.ENTRY_OVERHEAD + len(key[0]) + len(key[1]) + x.nbytes + output.nbytes

    def put(self, stream: str, row_id: str, x: np.ndarray, output: np.ndarray, version: int) -> None:
        key = (stream, row_id)
        old = self._items.pop(key, None)
        if old is not None:
            self.nbytes -= self._size(key, old[0], old[1])
        x, output = np.array(x, dtype=np.float32), np.array(output, dtype=np.float32)
        self._items[key] = (x, output, version)
        self.nbytes += self._size(key, x, output)
        while self._items and (len(self._items) > self.capacity or self.nbytes > self.max_bytes):
            old_key, (ox, oout, _) = self._items.popitem(last=False)
            self.nbytes -= self._size(old_key, ox, oout)
            self.evicted += 1

    def peek(self, stream: str, row_id: str) -> tuple[np.ndarray, np.ndarray, int] | None:
        """The cached row, left in place (a label file is learned from only once it is moved)."""
        return self._items.get((stream, row_id))

    def pop(self, stream: str, row_id: str) -> tuple[np.ndarray, np.ndarray, int] | None:
        key = (stream, row_id)
        hit = self._items.pop(key, None)
        if hit is not None:
            self.nbytes -= self._size(key, hit[0], hit[1])
        return hit

    def __len__(self) -> int:
        return len(self._items)


class StateLayout:
    """The state directory's folders for one stream, and the moves between them."""

    def __init__(self, state_dir: Path):
        self.root = Path(state_dir)

    def dir(self, kind: str, stream: str) -> Path:
        return self.root / kind / stream

    def ensure(self, streams: Iterable[str]) -> None:
        for stream in streams:
            for kind in ("inbox", "outbox", "processed", "quarantine"):
                self.dir(kind, stream).mkdir(parents=True, exist_ok=True)

    def write_predictions(self, stream: str, name: str, records: list[dict[str, Any]]) -> Path:
        """``<name>.predictions.jsonl``; a name too long for that gets a shortened, unique one and
        a ``.name.json`` beside it that maps it back to the input."""
        outbox = self.dir("outbox", stream)
        out_name = safe_name(name, ".predictions.jsonl")
        body = "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records)
        if out_name != name + ".predictions.jsonl":
            base = out_name.removesuffix(".predictions.jsonl")
            atomic_write(outbox / f"{base}.name.json", json.dumps(
                {"input": name, "predictions": out_name}).encode())
        out = outbox / out_name
        atomic_write(out, body.encode())
        return out

    def processed(self, stream: str, path: Path, name: str | None = None) -> Path:
        dest = self.dir("processed", stream) / (name or path.name)
        os.replace(path, dest)
        return dest

    def unique_name(self, stream: str, name: str) -> str:
        """``name``, or a unique variant of it when an earlier input of that name was already
        processed (its processed copy and predictions must not be overwritten)."""
        taken = (os.path.lexists(self.dir("processed", stream) / name) or os.path.lexists(
            self.dir("outbox", stream) / safe_name(name, ".predictions.jsonl")))
        if not taken:
            return name
        stem, dot, ext = name.rpartition(".")
        suffix = f"dup{time.time_ns()}"
        return safe_name(f"{stem}.{suffix}.{ext}" if dot and stem else f"{name}.{suffix}")

    def quarantine(self, stream: str, path: Path, error: IngestError) -> Path:
        """Move the input aside beside an ``.error.json`` naming the reason; an earlier file of
        the same name already in quarantine is kept (the new one gets a unique name)."""
        qdir = self.dir("quarantine", stream)
        name = path.name
        if os.path.lexists(qdir / name):
            name = safe_name(f"{path.name}.{time.time_ns()}")
        atomic_write(qdir / safe_name(name, ".error.json"),
                     json.dumps(error.as_json(path.name), indent=2).encode())
        os.replace(path, qdir / name)  # a symlink is moved as the link itself, never followed
        return qdir / name

    def sweep_temp(self, streams: Iterable[str]) -> list[Path]:
        """Temp files a kill left in the daemon's own folders (never in the producers' inbox)."""
        removed = sweep_temp(self.root) + sweep_temp(self.root / "episodes")
        removed += sweep_temp(self.root / "triggers" / "done")
        for stream in streams:
            for kind in ("outbox", "quarantine", "processed"):
                removed += sweep_temp(self.dir(kind, stream))
        return removed

    def strangers(self, streams: Iterable[str]) -> list[str]:
        """Entries of ``inbox/`` that are no configured stream's folder (a misspelt stream name:
        files dropped there would otherwise wait forever without a word)."""
        known = set(streams)
        try:
            return sorted(p.name for p in (self.root / "inbox").iterdir() if p.name not in known)
        except OSError:
            return []

    def scan(self, streams: Iterable[str]) -> list[tuple[str, Path]]:
        found = []
        for stream in streams:
            inbox = self.dir("inbox", stream)
            try:
                entries = sorted(inbox.iterdir())
            except FileNotFoundError:
                continue
            # Directories and FIFOs are reported too: they are quarantined as not_regular.
            found += [(stream, p) for p in entries if is_candidate(p)]
        return found


class PendingFiles:
    """Files seen but not yet handled; ready once neither their size nor their modification time
    has changed for ``settle_s`` (a producer that writes in chunks under the final name, instead
    of renaming a finished temp file, is read only after it has been quiet that long)."""

    def __init__(self, settle_s: float):
        self.settle_s = settle_s
        self._seen: dict[Path, tuple[str, tuple[int, int], float]] = {}

    def add(self, stream: str, path: Path, now: float | None = None) -> None:
        if path not in self._seen:
            self._seen[path] = (stream, (-1, -1), now if now is not None else time.monotonic())

    def ready(self, now: float | None = None) -> list[tuple[str, Path]]:
        now = time.monotonic() if now is None else now
        out = []
        for path, (stream, signature, since) in list(self._seen.items()):
            try:
                info = path.lstat()
            except FileNotFoundError:
                del self._seen[path]
                continue
            current = (info.st_size, info.st_mtime_ns)
            if current != signature:
                self._seen[path] = (stream, current, now)
            elif now - since >= self.settle_s:
                del self._seen[path]
                out.append((stream, path))
        return sorted(out, key=lambda item: item[1].name)

    def __len__(self) -> int:
        return len(self._seen)


class InboxWatcher:
    """watchdog observer that only enqueues (stream, path); the control loop does the work."""

    def __init__(self, layout: StateLayout, streams: Iterable[str], events: queue.Queue):
        from watchdog.events import FileSystemEventHandler
        from watchdog.observers import Observer

        self._observer = Observer()
        events_q = events

        class Handler(FileSystemEventHandler):
            def __init__(self, stream: str):
                self.stream = stream

            def _put(self, raw: str | bytes) -> None:
                path = Path(os.fsdecode(raw))
                if is_candidate(path):
                    events_q.put(("file", self.stream, path))

            def on_closed(self, event):
                self._put(event.src_path)

            def on_moved(self, event):
                self._put(event.dest_path)

            def on_created(self, event):
                self._put(event.src_path)

        for stream in streams:
            self._observer.schedule(Handler(stream), str(layout.dir("inbox", stream)),
                                    recursive=False)

    def start(self) -> None:
        self._observer.start()

    def stop(self) -> None:
        self._observer.stop()
        self._observer.join(timeout=5)
