"""Watched inboxes: parsing, quarantine, outbox and delayed labels.

Input files move through ``inbox/<stream>/`` to exactly one of ``processed/`` or ``quarantine/``;
predictions are durably written to ``outbox/`` before the input moves, so a crash at any point
leaves the file in the inbox and a restart handles it again with the same output. Bad input never
raises out of here: it becomes an :class:`IngestError` with a reason (a bounded set, used as a
metric label) and the line and column where it went wrong.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import queue
import stat
import threading
import time
import zipfile
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgemeta.config import StreamSettings
from edgemeta.serve.registry import atomic_write

REASONS = ("symlink", "too_large", "unreadable", "binary", "truncated", "wrong_columns",
           "non_numeric", "non_finite", "empty", "bad_label")
LABEL_SUFFIXES = (".labels.csv", ".labels.jsonl")
DATA_SUFFIXES = (".csv", ".jsonl", ".npz")


class IngestError(ValueError):
    def __init__(self, reason: str, message: str, line: int | None = None,
                 column: str | None = None):
        assert reason in REASONS, reason
        super().__init__(message)
        self.reason = reason
        self.line = line
        self.column = column

    def as_json(self, path: Path) -> dict[str, Any]:
        return {"file": path.name, "reason": self.reason, "message": str(self), "line": self.line,
                "column": self.column, "time": time.time()}


@dataclass
class Rows:
    ids: list[str]
    x: np.ndarray
    y: np.ndarray | None


def is_label_file(name: str) -> bool:
    return name.endswith(LABEL_SUFFIXES)


def is_candidate(path: Path) -> bool:
    """Files producers are still writing carry a temporary name: dot-prefixed or .tmp/.part."""
    name = path.name
    return not (name.startswith(".") or name.endswith((".tmp", ".part", ".error.json")))


def _read_checked(path: Path, max_bytes: int, text: bool) -> bytes | str:
    if path.is_symlink():
        raise IngestError("symlink", f"{path.name} is a symlink; inputs must be regular files")
    try:
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):
            raise IngestError("unreadable", f"{path.name} is not a regular file")
        size = info.st_size
        if size > max_bytes:
            raise IngestError("too_large", f"{path.name} is {size} bytes, over the limit of "
                              f"{max_bytes} (ingest.max_file_bytes)")
        data = path.read_bytes()
    except OSError as exc:
        raise IngestError("unreadable", f"cannot read {path.name}: {exc.strerror or exc}") from exc
    if not data.strip():
        raise IngestError("empty", f"{path.name} is empty")
    if not text:
        return data
    if b"\x00" in data:
        raise IngestError("binary", f"{path.name} contains NUL bytes: not a text file",
                          line=data[:data.index(b'\x00')].count(b"\n") + 1)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise IngestError("binary", f"{path.name} is not UTF-8 text (byte {exc.start})",
                          line=line) from exc


def _number(value: Any, line: int, column: str, integer: bool = False) -> float:
    if isinstance(value, bool) or value is None:
        raise IngestError("non_numeric", f"line {line}, column {column!r}: {value!r} is not a number",
                          line, column)
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise IngestError("non_numeric", f"line {line}, column {column!r}: {value!r} is not a "
                          "number", line, column) from None
    if not math.isfinite(number):
        raise IngestError("non_finite", f"line {line}, column {column!r}: {value!r} is not finite",
                          line, column)
    if integer and number != int(number):
        raise IngestError("bad_label", f"line {line}, column {column!r}: class label {value!r} is "
                          "not an integer", line, column)
    return number


def _records_csv(text: str) -> Iterable[tuple[int, dict[str, str]]]:
    reader = csv.reader(io.StringIO(text))
    header = next(reader)
    ends_clean = text.endswith("\n")
    lines = text.count("\n") + (0 if ends_clean else 1)
    for row in reader:
        line = reader.line_num
        if len(row) != len(header):
            last = line >= lines and not ends_clean
            reason = "truncated" if last and len(row) < len(header) else "wrong_columns"
            raise IngestError(reason, f"line {line}: {len(row)} fields, the header has "
                              f"{len(header)}" + (" (file ends mid-row)" if reason == "truncated"
                                                  else ""), line)
        yield line, dict(zip(header, row, strict=True))


def _header_csv(text: str) -> list[str]:
    return next(csv.reader(io.StringIO(text)), [])


def _records_jsonl(text: str) -> Iterable[tuple[int, dict[str, Any]]]:
    lines = text.split("\n")
    for i, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except json.JSONDecodeError as exc:
            last = i == len(lines) and not text.endswith("\n")
            raise IngestError("truncated" if last else "non_numeric",
                              f"line {i}: not valid JSON ({exc.msg})", i) from exc
        if not isinstance(record, dict):
            raise IngestError("wrong_columns", f"line {i}: expected a JSON object", i)
        yield i, record


def _columns(stream: StreamSettings, needed_label: bool) -> list[str]:
    cols = list(stream.features)
    if stream.id:
        cols.append(stream.id)
    if needed_label and stream.label:
        cols.append(stream.label)
    return cols


def parse_rows(path: Path, stream: StreamSettings, max_bytes: int,
               classification: bool = False) -> Rows:
    """Rows of a data file: features by name, optional id, the label when the file has it."""
    fmt = path.suffix.lstrip(".")
    if fmt == "npz":
        return _parse_npz(path, stream, max_bytes, classification)
    if fmt not in ("csv", "jsonl"):
        raise IngestError("wrong_columns", f"{path.name}: unsupported extension {path.suffix!r}")
    text = _read_checked(path, max_bytes, text=True)
    if fmt == "csv":
        header = _header_csv(text)
        missing = [c for c in _columns(stream, False) if c not in header]
        if missing:
            raise IngestError("wrong_columns", f"line 1: missing column(s) {missing} (header: "
                              f"{header})", 1, missing[0])
        has_label = bool(stream.label) and stream.label in header
        records = _records_csv(text)
    else:
        has_label = None
        records = _records_jsonl(text)
    ids, xs, ys = [], [], []
    for line, rec in records:
        if has_label is None:
            has_label = bool(stream.label) and stream.label in rec
        for col in _columns(stream, has_label):
            if col not in rec:
                raise IngestError("wrong_columns", f"line {line}: missing column {col!r}", line, col)
        xs.append([_number(rec[c], line, c) for c in stream.features])
        if has_label:
            ys.append(_number(rec[stream.label], line, stream.label, classification))
        ids.append(str(rec[stream.id]) if stream.id else f"{path.stem}:{len(ids)}")
    if not xs:
        raise IngestError("empty", f"{path.name} has no data rows")
    x = np.asarray(xs, dtype=np.float32)
    return Rows(ids, x, np.asarray(ys) if has_label else None)


def _parse_npz(path: Path, stream: StreamSettings, max_bytes: int, classification: bool) -> Rows:
    data = _read_checked(path, max_bytes, text=False)
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (zipfile.BadZipFile, EOFError) as exc:
        raise IngestError("truncated", f"{path.name}: not a complete npz archive ({exc})") from exc
    except (ValueError, OSError) as exc:
        raise IngestError("unreadable", f"{path.name}: cannot load npz: {exc}") from exc
    missing = [c for c in _columns(stream, False) if c not in arrays]
    if missing:
        raise IngestError("wrong_columns", f"{path.name}: missing array(s) {missing} (has "
                          f"{sorted(arrays)})", column=missing[0])
    n = len(arrays[stream.features[0]])
    cols = _columns(stream, stream.label in arrays if stream.label else False)
    for c in cols:
        if arrays[c].ndim != 1 or len(arrays[c]) != n:
            raise IngestError("wrong_columns", f"{path.name}: array {c!r} has shape "
                              f"{arrays[c].shape}, expected ({n},)", column=c)
    for c in [*stream.features, *([stream.label] if stream.label in arrays else [])]:
        if arrays[c].dtype.kind not in "biuf":
            raise IngestError("non_numeric", f"{path.name}: array {c!r} has dtype {arrays[c].dtype}",
                              column=c)
        bad = np.flatnonzero(~np.isfinite(arrays[c].astype(np.float64)))
        if len(bad):
            raise IngestError("non_finite", f"{path.name}: array {c!r} row {int(bad[0])} is not "
                              "finite", line=int(bad[0]), column=c)
    if n == 0:
        raise IngestError("empty", f"{path.name} has no rows")
    x = np.stack([arrays[c].astype(np.float32) for c in stream.features], axis=1)
    y = arrays[stream.label] if stream.label and stream.label in arrays else None
    if y is not None and classification and not np.all(y == np.round(y)):
        raise IngestError("bad_label", f"{path.name}: class labels must be integers",
                          column=stream.label)
    ids = ([str(v) for v in arrays[stream.id]] if stream.id
           else [f"{path.stem}:{i}" for i in range(n)])
    return Rows(ids, x, y)


def parse_labels(path: Path, max_bytes: int, classification: bool = False) -> list[tuple[str, float]]:
    """A delayed-label file: ``id,label`` rows (CSV with that header, or JSON Lines)."""
    text = _read_checked(path, max_bytes, text=True)
    if path.name.endswith(".csv"):
        header = _header_csv(text)
        if "id" not in header or "label" not in header:
            raise IngestError("wrong_columns", f"line 1: a label file needs columns 'id' and "
                              f"'label' (header: {header})", 1)
        records = _records_csv(text)
    else:
        records = _records_jsonl(text)
    out = []
    for line, rec in records:
        for col in ("id", "label"):
            if col not in rec:
                raise IngestError("wrong_columns", f"line {line}: missing {col!r}", line, col)
        out.append((str(rec["id"]), _number(rec["label"], line, "label", classification)))
    if not out:
        raise IngestError("empty", f"{path.name} has no label rows")
    return out


class LabelCache:
    """Bounded memory of recent predictions so late labels can score the model that made them."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._items: OrderedDict[tuple[str, str], tuple[np.ndarray, float, int]] = OrderedDict()
        self.evicted = 0

    def put(self, stream: str, row_id: str, x: np.ndarray, prediction: float, version: int) -> None:
        key = (stream, row_id)
        self._items[key] = (x, prediction, version)
        self._items.move_to_end(key)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)
            self.evicted += 1

    def pop(self, stream: str, row_id: str) -> tuple[np.ndarray, float, int] | None:
        return self._items.pop((stream, row_id), None)

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
        out = self.dir("outbox", stream) / f"{name}.predictions.jsonl"
        body = "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records)
        atomic_write(out, body.encode())
        return out

    def processed(self, stream: str, path: Path) -> Path:
        dest = self.dir("processed", stream) / path.name
        os.replace(path, dest)
        return dest

    def quarantine(self, stream: str, path: Path, error: IngestError) -> Path:
        qdir = self.dir("quarantine", stream)
        dest = qdir / path.name
        atomic_write(qdir / f"{path.name}.error.json",
                     json.dumps(error.as_json(path), indent=2).encode())
        os.replace(path, dest)  # a symlink is moved as the link itself, never followed
        return dest

    def scan(self, streams: Iterable[str]) -> list[tuple[str, Path]]:
        found = []
        for stream in streams:
            inbox = self.dir("inbox", stream)
            try:
                entries = sorted(inbox.iterdir())
            except FileNotFoundError:
                continue
            found += [(stream, p) for p in entries if is_candidate(p) and not p.is_dir()]
        return found


class PendingFiles:
    """Files seen but not yet handled; ready once their size has not changed for ``settle_s``."""

    def __init__(self, settle_s: float):
        self.settle_s = settle_s
        self._seen: dict[Path, tuple[str, int, float]] = {}

    def add(self, stream: str, path: Path, now: float | None = None) -> None:
        if path not in self._seen:
            self._seen[path] = (stream, -1, now if now is not None else time.monotonic())

    def ready(self, now: float | None = None) -> list[tuple[str, Path]]:
        now = time.monotonic() if now is None else now
        out = []
        for path, (stream, size, since) in list(self._seen.items()):
            try:
                current = path.lstat().st_size
            except FileNotFoundError:
                del self._seen[path]
                continue
            if current != size:
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
                if not event.is_directory:
                    self._put(event.src_path)

        for stream in streams:
            self._observer.schedule(Handler(stream), str(layout.dir("inbox", stream)),
                                    recursive=False)
        self._lock = threading.Lock()

    def start(self) -> None:
        self._observer.start()

    def stop(self) -> None:
        self._observer.stop()
        self._observer.join(timeout=5)
