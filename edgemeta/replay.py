"""``edgemeta replay``: a recorded stream into a daemon's inbox, written the way producers should.

Why: the shortest path from data on disk to a running daemon that serves, detects and adapts is
not writing a producer. This one reads a CSV (a header with the stream's feature columns, the
label column optional) or an NPZ (``X``, optional ``y``), or a folder of them in name order, and
writes files of ``rows_per_file`` rows at ``rate`` rows/s: each under a temporary name, then
renamed (a file is never read half written). Labels go inline, later in a label file joined by
id (as sensors whose ground truth arrives late do), or not at all.

>>> import tempfile
>>> src = Path(tempfile.mkdtemp()) / "rec.csv"
>>> _ = src.write_text("x,y\\n0.5,1.0\\n1.5,2.0\\n2.5,3.0\\n")
>>> inbox = Path(tempfile.mkdtemp())
>>> replay([src], inbox, ["x"], "y", rate=0, rows_per_file=2, prefix="demo")
3
>>> sorted(p.name for p in inbox.iterdir())
['demo-000000.csv', 'demo-000001.csv']
>>> (inbox / "demo-000001.csv").read_text()
'id,x,y\\ndemo-000001-0,2.5,3.0\\n'
"""

from __future__ import annotations

import csv
import io
import os
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np

LABEL_MODES = ("inline", "delayed", "none")


class ReplayError(ValueError):
    """A source that cannot be replayed on this stream; the message names the file."""


def sources(path: Path) -> list[Path]:
    """The files to replay: ``path`` itself, or a folder's .csv and .npz files in name order."""
    if path.is_dir():
        found = sorted(p for p in path.iterdir() if p.suffix in (".csv", ".npz"))
        if not found:
            raise ReplayError(f"{path}: no .csv or .npz files to replay")
        return found
    if path.suffix not in (".csv", ".npz"):
        raise ReplayError(f"{path}: replay reads .csv or .npz files")
    if not path.is_file():
        raise ReplayError(f"{path}: no such file")
    return [path]


def read_rows(path: Path, features: Sequence[str], label: str | None
              ) -> tuple[np.ndarray, np.ndarray | None]:
    """(x, y or None) of one source file, in the stream's feature order."""
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as data:
            if "X" not in data:
                raise ReplayError(f"{path}: an NPZ source needs an array 'X' (and optionally 'y')")
            x = np.asarray(data["X"], dtype=np.float64).reshape(len(data["X"]), -1)
            y = np.asarray(data["y"], dtype=np.float64) if "y" in data else None
        if x.shape[1] != len(features):
            raise ReplayError(f"{path}: X has {x.shape[1]} column(s), the stream's features are "
                              f"{list(features)}")
        return x, y
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in features if c not in (reader.fieldnames or [])]
        if missing:
            raise ReplayError(f"{path}: line 1: missing feature column(s) {missing} (header: "
                              f"{reader.fieldnames})")
        has_label = bool(label) and label in (reader.fieldnames or [])
        xs, ys = [], []
        for line, row in enumerate(reader, start=2):
            try:
                xs.append([float(row[c]) for c in features])
                if has_label:
                    ys.append(float(row[label]))
            except (TypeError, ValueError) as exc:
                raise ReplayError(f"{path}: line {line}: not a number ({exc})") from exc
    return np.asarray(xs, dtype=np.float64).reshape(-1, len(features)), (
        np.asarray(ys) if has_label else None)


def _csv(columns: Sequence[str], rows: Iterator[Sequence]) -> bytes:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows(rows)
    return out.getvalue().encode()


def _drop(inbox: Path, name: str, data: bytes) -> None:
    tmp = inbox / f".{name}.tmp"  # dot-prefixed and .tmp: the daemon never reads it
    tmp.write_bytes(data)
    os.replace(tmp, inbox / name)


def replay(paths: Sequence[Path], inbox: Path, features: Sequence[str], label: str | None,
           rate: float = 100.0, rows_per_file: int = 50, labels: str = "inline",
           label_delay: int = 2, prefix: str = "replay",
           say: Callable[[str], None] | None = None) -> int:
    """Write every row of ``paths`` into ``inbox``; returns the rows written. ``rate`` rows/s
    (0: as fast as possible); ``labels``: inline, delayed (a ``.labels.csv`` joined by id,
    ``label_delay`` files later) or none."""
    if labels not in LABEL_MODES:
        raise ReplayError(f"--labels: use one of {', '.join(LABEL_MODES)}, got {labels!r}")
    inbox.mkdir(parents=True, exist_ok=True)
    column = label or "label"
    start, written, file_no = time.monotonic(), 0, 0
    pending: list[tuple[str, list[str], np.ndarray]] = []  # delayed label files to write
    for path in paths:
        x, y = read_rows(path, features, label)
        with_labels = y is not None and labels != "none"
        for lo in range(0, len(x), rows_per_file):
            name = f"{prefix}-{file_no:06d}"
            ids = [f"{name}-{i}" for i in range(len(x[lo:lo + rows_per_file]))]
            chunk = x[lo:lo + rows_per_file]
            inline = with_labels and labels == "inline"
            rows = (([i, *map(repr, r)] + ([repr(float(v))] if inline else []))
                    for i, r, v in zip(ids, chunk.tolist(),
                                       y[lo:lo + rows_per_file] if inline else [0] * len(ids),
                                       strict=True))
            _drop(inbox, f"{name}.csv", _csv(["id", *features] + ([column] if inline else []),
                                             rows))
            if with_labels and labels == "delayed":
                pending.append((name, ids, y[lo:lo + rows_per_file]))
            while len(pending) > label_delay or (pending and path is paths[-1]
                                                 and lo + rows_per_file >= len(x)):
                late, late_ids, late_y = pending.pop(0)
                _drop(inbox, f"{late}.labels.csv",
                      _csv(["id", "label"], ([i, repr(float(v))] for i, v in
                                             zip(late_ids, late_y, strict=True))))
            written += len(chunk)
            file_no += 1
            if rate > 0:  # keep to the schedule, whatever writing each file cost
                time.sleep(max(0.0, start + written / rate - time.monotonic()))
        if say:
            say(f"{path}: {len(x)} rows replayed ({written} in all)")
    return written
