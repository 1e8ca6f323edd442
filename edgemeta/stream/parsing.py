"""Input bytes -> rows, or one :class:`IngestError` with a reason; nothing else ever escapes.

This module is pure (bytes in, arrays out, no files) so that every parser can be fuzzed with
arbitrary bytes. Each limit is checked *before* the work it guards: line and field length before
the CSV reader, nesting depth and number length before ``json.loads`` builds anything, member
count, dtypes, shapes and the total inflated size of an NPZ from its headers before a single array
is read. A row whose features (or label) are not finite numbers is refused on its own and reported,
instead of failing the file or being predicted as NaN.

>>> from edgemeta.config import StreamSettings
>>> s = StreamSettings("s", ["x"], label="y")
>>> rows = parse_rows_bytes(b"\\xef\\xbb\\xbfx,y\\n1,2\\n1e999,3\\n", "a.csv", s, Limits())
>>> rows.x.tolist(), rows.y.tolist(), rows.refused[1].message
([[1.0]], [2.0], "line 3, column 'x': inf is not finite")
>>> parse_rows_bytes(b'{"x": [[[[1]]]]}', "a.jsonl", s, Limits(max_depth=3))
Traceback (most recent call last):
...
edgemeta.stream.parsing.IngestError: line 1: JSON nested deeper than 3 levels
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from edgemeta.config import StreamSettings

# Every reason is a metric label value, so the set is closed.
REASONS = ("symlink", "not_regular", "too_large", "too_long", "too_deep", "unreadable", "binary",
           "truncated", "wrong_columns", "non_numeric", "non_finite", "empty", "bad_label",
           "internal_error", "too_slow", "unsupported_format")
# Per-row refusals (rows of an otherwise good file): reported in the outbox, counted by reason.
ROW_REASONS = ("non_finite", "bad_label")
# No honest number is longer: a float printed with full precision takes 24 characters.
MAX_NUMBER_CHARS = 100
# The characters that open or close a level, a string, or escape inside one. One regex for a
# whole string (``"(?:[^"\\]|\\.)*"``) backtracks quadratically on an unterminated string of
# escaped quotes (a 32 KB line stalled the daemon for 11 s); these single characters cannot.
_STRUCTURE = re.compile(r'[\[\]{}"\\]')
_FLOAT32_MAX = float(np.finfo(np.float32).max)


class IngestError(ValueError):
    """Input that cannot be used; ``reason`` is one of :data:`REASONS`."""

    def __init__(self, reason: str, message: str, line: int | None = None,
                 column: str | None = None):
        if reason not in REASONS:
            raise ValueError(f"unknown ingest reason {reason!r}")
        super().__init__(message)
        self.reason = reason
        self.line = line
        self.column = column

    def as_json(self, name: str) -> dict[str, Any]:
        return {"file": name, "reason": self.reason, "message": str(self), "line": self.line,
                "column": self.column, "time": time.time()}


@dataclass(frozen=True)
class Limits:
    """What one input may cost before it is refused (``ingest.*`` in the config)."""

    max_file_bytes: int = 64 * 1024 * 1024
    max_line_bytes: int = 1024 * 1024
    max_depth: int = 32
    max_npz_members: int = 64


class Refusal(NamedTuple):
    """Why one row (or one delayed label) was not used; ``reason`` is one of ROW_REASONS."""

    reason: str
    message: str


@dataclass
class Rows:
    """Parsed rows in file order; ``refused`` maps a row index to why it was not used."""

    ids: list[str]
    x: np.ndarray  # only the rows that were not refused, float32
    y: np.ndarray | None
    refused: dict[int, Refusal] = field(default_factory=dict)
    all_ids: list[str] = field(default_factory=list)


def decode_text(data: bytes, name: str, limits: Limits) -> str:
    """UTF-8 text (a byte-order mark is dropped), with every line within the limit."""
    if not data.strip():
        raise IngestError("empty", f"{name} is empty")
    if b"\x00" in data:
        raise IngestError("binary", f"{name} contains NUL bytes: not a text file",
                          line=data[:data.index(b'\x00')].count(b"\n") + 1)
    if len(data) > limits.max_line_bytes:  # else no line can be too long
        for line, raw in enumerate(data.split(b"\n"), start=1):
            if len(raw) > limits.max_line_bytes:
                raise IngestError("too_long", f"{name}: line {line} is {len(raw)} bytes, over "
                                  f"the limit of {limits.max_line_bytes} (ingest.max_line_bytes)",
                                  line)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise IngestError("binary", f"{name} is not UTF-8 text (byte {exc.start})",
                          line=data[:exc.start].count(b"\n") + 1) from exc


def _number(value: Any, line: int, column: str) -> float:
    """A finite-or-not float from a CSV field or a JSON scalar; raises for what is no number."""
    if isinstance(value, bool) or value is None or isinstance(value, list | dict):
        raise IngestError("non_numeric", f"line {line}, column {column!r}: {_short(value)} is not "
                          "a number", line, column)
    if isinstance(value, str) and len(value) > MAX_NUMBER_CHARS:
        raise IngestError("too_long", f"line {line}, column {column!r}: a number of {len(value)} "
                          f"characters (limit {MAX_NUMBER_CHARS})", line, column)
    try:
        if isinstance(value, str) and "_" in value:
            raise ValueError("Python's digit separators are no number in a data file")
        return float(value)
    except (TypeError, ValueError, OverflowError):
        raise IngestError("non_numeric", f"line {line}, column {column!r}: {_short(value)} is not "
                          "a number", line, column) from None


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _row_problem(values: list[float], label: float | None, line: int, columns: list[str],
                 label_col: str | None, classes: int | None) -> Refusal | None:
    """Why this row cannot be used (a finite float32 feature vector, a valid label), or None."""
    for col, v in zip(columns, values, strict=True):
        if not math.isfinite(v) or abs(v) > _FLOAT32_MAX:
            return Refusal("non_finite", f"line {line}, column {col!r}: {v!r} is not finite")
    if label is None:
        return None
    if not math.isfinite(label) or abs(label) > _FLOAT32_MAX:
        return Refusal("bad_label", f"line {line}, column {label_col!r}: label {label!r} is not "
                       "finite")
    if classes is not None and (label != int(label) or not 0 <= label < classes):
        return Refusal("bad_label", f"line {line}, column {label_col!r}: class label {label!r} "
                       f"is not an integer in 0..{classes - 1}")
    return None


def _csv_records(text: str, name: str) -> Iterator[tuple[int, dict[str, str]]]:
    reader = csv.reader(io.StringIO(text))
    try:
        header = next(reader)
        ends_clean = text.endswith("\n")
        lines = text.count("\n") + (0 if ends_clean else 1)
        for row in reader:
            line = reader.line_num
            if len(row) != len(header):
                last = line >= lines and not ends_clean
                reason = "truncated" if last and len(row) < len(header) else "wrong_columns"
                raise IngestError(reason, f"line {line}: {len(row)} fields, the header has "
                                  f"{len(header)}" + (" (file ends mid-row)"
                                                      if reason == "truncated" else ""), line)
            yield line, dict(zip(header, row, strict=True))
    except csv.Error as exc:
        # A quoted field may span lines, so the line limit alone does not bound a field.
        reason = "too_long" if "field larger" in str(exc) else "wrong_columns"
        raise IngestError(reason, f"{name}: line {reader.line_num}: {exc}", reader.line_num) from exc


def csv_header(text: str, name: str) -> list[str]:
    try:
        return next(csv.reader(io.StringIO(text)), [])
    except csv.Error as exc:
        reason = "too_long" if "field larger" in str(exc) else "wrong_columns"
        raise IngestError(reason, f"{name}: line 1: {exc}", 1) from exc


def _check_depth(raw: str, line: int, max_depth: int) -> None:
    """Refuse JSON nested deeper than ``max_depth`` before ``json.loads`` recurses into it.

    One pass over the structural characters, linear in the input whatever its shape: brackets
    inside strings do not count, and an escaped quote does not end a string.

    >>> _check_depth('{"a": "[[[[\\\\"[[["}', 1, 2)  # in a string
    >>> _check_depth('[[[1]]]', 1, 2)
    Traceback (most recent call last):
    ...
    edgemeta.stream.parsing.IngestError: line 1: JSON nested deeper than 2 levels
    """
    if raw.count("[") + raw.count("{") <= max_depth:
        return  # cannot be deeper: the common case costs two C-level scans
    depth, in_string, escaped_at = 0, False, -1
    for match in _STRUCTURE.finditer(raw):
        pos = match.start()
        if pos == escaped_at:
            continue  # the character after a backslash in a string
        char = match.group()
        if in_string:
            if char == "\\":
                escaped_at = pos + 1
            elif char == '"':
                in_string = False
            continue
        if char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            if depth > max_depth:
                raise IngestError("too_deep", f"line {line}: JSON nested deeper than {max_depth} "
                                  "levels", line)
        elif char in "]}":
            depth -= 1


def _bounded_float(text: str) -> float:
    if len(text) > MAX_NUMBER_CHARS:
        raise _NumberTooLong(len(text))
    return float(text)


def _bounded_int(text: str) -> int:
    if len(text) > MAX_NUMBER_CHARS:
        raise _NumberTooLong(len(text))
    return int(text)


class _NumberTooLong(ValueError):
    pass


def load_json(raw: str, line: int, max_depth: int) -> Any:
    """``json.loads`` with the nesting depth and the length of every number checked first."""
    _check_depth(raw, line, max_depth)
    try:
        return json.loads(raw, parse_int=_bounded_int, parse_float=_bounded_float)
    except _NumberTooLong as exc:
        raise IngestError("too_long", f"line {line}: a number of {exc.args[0]} characters (limit "
                          f"{MAX_NUMBER_CHARS})", line) from None
    except RecursionError:
        raise IngestError("too_deep", f"line {line}: JSON nested too deeply", line) from None


def _jsonl_records(text: str, limits: Limits) -> Iterator[tuple[int, dict[str, Any]]]:
    lines = text.split("\n")
    for i, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            record = load_json(raw, i, limits.max_depth)
        except json.JSONDecodeError as exc:
            last = i == len(lines) and not text.endswith("\n")
            raise IngestError("truncated" if last else "non_numeric",
                              f"line {i}: not valid JSON ({exc.msg})", i) from exc
        if not isinstance(record, dict):
            raise IngestError("wrong_columns", f"line {i}: expected a JSON object", i)
        yield i, record


def _columns(stream: StreamSettings, with_label: bool) -> list[str]:
    cols = list(stream.features)
    if stream.id:
        cols.append(stream.id)
    if with_label and stream.label:
        cols.append(stream.label)
    return cols


def _row_id(value: Any, line: int, column: str) -> str:
    if isinstance(value, list | dict):
        raise IngestError("wrong_columns", f"line {line}, column {column!r}: an id must be a "
                          "string or a number", line, column)
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    text = value if isinstance(value, str) else str(value)
    if len(text) > 1024:
        raise IngestError("too_long", f"line {line}, column {column!r}: an id of {len(text)} "
                          "characters (limit 1024)", line, column)
    return text


def parse_rows_bytes(data: bytes, name: str, stream: StreamSettings, limits: Limits,
                     classes: int | None = None) -> Rows:
    """Rows of a data file by extension (.csv, .jsonl, .npz); ``classes`` bounds class labels."""
    if len(data) > limits.max_file_bytes:
        raise IngestError("too_large", f"{name} is {len(data)} bytes, over the limit of "
                          f"{limits.max_file_bytes} (ingest.max_file_bytes)")
    if name.endswith(".npz"):
        return _parse_npz(data, name, stream, limits, classes)
    if not name.endswith((".csv", ".jsonl")):
        raise IngestError("unsupported_format", f"{name}: unsupported extension (use .csv, .jsonl, "
                          ".npz)")
    text = decode_text(data, name, limits)
    if name.endswith(".csv"):
        header = csv_header(text, name)
        missing = [c for c in _columns(stream, False) if c not in header]
        if missing:
            raise IngestError("wrong_columns", f"line 1: missing column(s) {missing} (header: "
                              f"{_short(header)})", 1, missing[0])
        has_label: bool | None = bool(stream.label) and stream.label in header
        records: Iterator[tuple[int, dict[str, Any]]] = _csv_records(text, name)
    else:
        has_label = None
        records = _jsonl_records(text, limits)
    ids, xs, ys, refused, all_ids = [], [], [], {}, []
    for line, rec in records:
        if has_label is None:
            has_label = bool(stream.label) and stream.label in rec
        for col in _columns(stream, bool(has_label)):
            if col not in rec:
                raise IngestError("wrong_columns", f"line {line}: missing column {col!r}", line, col)
        values = [_number(rec[c], line, c) for c in stream.features]
        label = _number(rec[stream.label], line, stream.label) if has_label else None
        row_id = (_row_id(rec[stream.id], line, stream.id) if stream.id
                  else f"{name.rsplit('.', 1)[0]}:{len(all_ids)}")
        problem = _row_problem(values, label, line, stream.features, stream.label, classes)
        if problem is not None:
            refused[len(all_ids)] = problem
        else:
            ids.append(row_id)
            xs.append(values)
            if has_label:
                ys.append(label)
        all_ids.append(row_id)
    if not all_ids:
        raise IngestError("empty", f"{name} has no data rows")
    x = np.asarray(xs, dtype=np.float32).reshape(len(xs), len(stream.features))
    y = np.asarray(ys, dtype=np.float64) if has_label else None
    return Rows(ids, x, y, refused, all_ids)


# -- NPZ -------------------------------------------------------------------------------------------
def _npz_headers(zf: zipfile.ZipFile, name: str, wanted: list[str], id_column: str | None,
                 limits: Limits) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Shape and dtype of each wanted member, read from its .npy header alone."""
    members = zf.infolist()
    if len(members) > limits.max_npz_members:
        raise IngestError("too_large", f"{name}: {len(members)} archive members, over the limit "
                          f"of {limits.max_npz_members}")
    by_key = {m.filename[:-4] if m.filename.endswith(".npy") else m.filename: m for m in members}
    missing = [c for c in wanted if c not in by_key]
    if missing:
        raise IngestError("wrong_columns", f"{name}: missing array(s) {missing} (has "
                          f"{_short(sorted(by_key))})", column=missing[0])
    headers, total = {}, 0
    for key in wanted:
        info = by_key[key]
        with zf.open(info) as fh:
            try:
                version = np.lib.format.read_magic(fh)
                reader = {(1, 0): np.lib.format.read_array_header_1_0,
                          (2, 0): np.lib.format.read_array_header_2_0}.get(version)
                if reader is None:
                    raise ValueError(f"unsupported .npy version {version}")
                shape, _fortran, dtype = reader(fh, max_header_size=10_000)
            except (ValueError, SyntaxError, TypeError, EOFError) as exc:
                raise IngestError("unreadable", f"{name}: member {key!r} is not a valid .npy "
                                  f"array ({exc})", column=key) from exc
        kinds = "biufUS" if key == id_column else "biuf"
        if dtype.hasobject or dtype.kind not in kinds:
            raise IngestError("non_numeric", f"{name}: array {key!r} has dtype {dtype}", column=key)
        if len(shape) != 1:
            raise IngestError("wrong_columns", f"{name}: array {key!r} has shape {shape}, expected "
                              "one dimension", column=key)
        total += int(np.prod(shape, dtype=np.float64)) * dtype.itemsize
        if total > limits.max_file_bytes:
            raise IngestError("too_large", f"{name}: arrays inflate to more than "
                              f"{limits.max_file_bytes} bytes (ingest.max_file_bytes)", column=key)
        headers[key] = (shape, dtype)
    return headers


def _parse_npz(data: bytes, name: str, stream: StreamSettings, limits: Limits,
               classes: int | None) -> Rows:
    if not data:
        raise IngestError("empty", f"{name} is empty")
    if not zipfile.is_zipfile(io.BytesIO(data)):
        if data.startswith(b"PK\x03\x04"):
            raise IngestError("truncated", f"{name}: an npz (zip) archive without its directory: "
                              "cut short?")
        raise IngestError("unreadable", f"{name}: not an npz (zip) archive")
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            keys = [m.filename.removesuffix(".npy") for m in zf.infolist()]
            with_label = bool(stream.label) and stream.label in keys
            wanted = _columns(stream, with_label)
            headers = _npz_headers(zf, name, wanted, stream.id, limits)
            n = headers[stream.features[0]][0][0]
            for c in wanted:
                if headers[c][0] != (n,):
                    raise IngestError("wrong_columns", f"{name}: array {c!r} has shape "
                                      f"{headers[c][0]}, expected ({n},)", column=c)
            arrays = {}
            for c in wanted:
                with zf.open(c + ".npy" if c + ".npy" in zf.namelist() else c) as fh:
                    arrays[c] = np.lib.format.read_array(fh, allow_pickle=False)
    except IngestError:
        raise
    except (zipfile.BadZipFile, EOFError, zipfile.LargeZipFile) as exc:
        raise IngestError("truncated", f"{name}: not a complete npz archive ({exc})") from exc
    except (ValueError, OSError, NotImplementedError, RuntimeError) as exc:
        raise IngestError("unreadable", f"{name}: cannot read npz: {exc}") from exc
    if n == 0:
        raise IngestError("empty", f"{name} has no rows")
    x64 = np.stack([arrays[c].astype(np.float64) for c in stream.features], axis=1)
    y = arrays[stream.label].astype(np.float64) if with_label else None
    bad = ~np.isfinite(x64).all(axis=1) | (np.abs(x64) > _FLOAT32_MAX).any(axis=1)
    refused = {int(i): Refusal("non_finite", f"row {int(i)}: a feature is not finite")
               for i in np.flatnonzero(bad)}
    if y is not None:
        bad_y = ~np.isfinite(y) | (np.abs(y) > _FLOAT32_MAX)
        if classes is not None:
            with np.errstate(invalid="ignore"):
                bad_y |= (y != np.round(y)) | (y < 0) | (y >= classes)
        for i in np.flatnonzero(bad_y & ~bad):
            refused[int(i)] = Refusal("bad_label", f"row {int(i)}: label {y[i]!r} is not a valid "
                                      "label")
        bad |= bad_y
    all_ids = ([_row_id(v.item(), i, stream.id) for i, v in enumerate(arrays[stream.id])]
               if stream.id else [f"{name.rsplit('.', 1)[0]}:{i}" for i in range(n)])
    keep = ~bad
    ids = [i for i, ok in zip(all_ids, keep, strict=True) if ok]
    return Rows(ids, x64[keep].astype(np.float32), None if y is None else y[keep], refused, all_ids)


# -- delayed labels --------------------------------------------------------------------------------
def parse_labels_bytes(data: bytes, name: str, limits: Limits, classes: int | None = None
                       ) -> tuple[list[tuple[str, float]], dict[str, Refusal]]:
    """A delayed-label file (``id,label`` CSV or JSON Lines): the usable labels, and the refused
    ones by id with the reason."""
    if len(data) > limits.max_file_bytes:
        raise IngestError("too_large", f"{name} is {len(data)} bytes, over the limit of "
                          f"{limits.max_file_bytes} (ingest.max_file_bytes)")
    text = decode_text(data, name, limits)
    if name.endswith(".csv"):
        header = csv_header(text, name)
        if "id" not in header or "label" not in header:
            raise IngestError("wrong_columns", f"line 1: a label file needs columns 'id' and "
                              f"'label' (header: {_short(header)})", 1)
        records: Iterator[tuple[int, dict[str, Any]]] = _csv_records(text, name)
    else:
        records = _jsonl_records(text, limits)
    out, refused = [], {}
    for line, rec in records:
        for col in ("id", "label"):
            if col not in rec:
                raise IngestError("wrong_columns", f"line {line}: missing {col!r}", line, col)
        row_id = _row_id(rec["id"], line, "id")
        label = _number(rec["label"], line, "label")
        problem = _row_problem([], label, line, [], "label", classes)
        if problem is None:
            out.append((row_id, label))
        else:
            refused[row_id] = problem
    if not out and not refused:
        raise IngestError("empty", f"{name} has no label rows")
    return out, refused
