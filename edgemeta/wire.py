"""Framing for the daemon <-> adapter-worker pipe: a JSON header plus numpy arrays, no pickle.

Frame: 4-byte big-endian header length, header (UTF-8 JSON), 4-byte body length, body (an .npz
archive, loaded with ``allow_pickle=False``). Shared by both ends so they cannot drift apart; it
imports only numpy, so the serving process stays torch-free.

>>> import io, numpy as np
>>> buf = io.BytesIO()
>>> write_frame(buf, {"type": "ping"}, {"a": np.arange(3)})
>>> _ = buf.seek(0)
>>> header, arrays = read_frame(buf)
>>> header["type"], arrays["a"].tolist()
('ping', [0, 1, 2])
"""

from __future__ import annotations

import io
import json
import struct
from collections.abc import Mapping
from typing import Any, BinaryIO

import numpy as np

MAX_FRAME = 1 << 30


class WireError(EOFError):
    """The other end closed the pipe or sent something that is not a frame."""


def encode_frame(header: Mapping[str, Any], arrays: Mapping[str, np.ndarray] | None = None) -> bytes:
    head = json.dumps(dict(header)).encode()
    body = b""
    if arrays:
        buf = io.BytesIO()
        np.savez(buf, **{k: np.asarray(v) for k, v in arrays.items()})
        body = buf.getvalue()
    return struct.pack(">I", len(head)) + head + struct.pack(">I", len(body)) + body


def write_frame(stream: BinaryIO, header: Mapping[str, Any],
                arrays: Mapping[str, np.ndarray] | None = None) -> None:
    stream.write(encode_frame(header, arrays))
    stream.flush()


def _read_exact(stream: BinaryIO, n: int) -> bytes:
    chunks, left = [], n
    while left:
        chunk = stream.read(left)
        if not chunk:
            raise WireError("pipe closed mid-frame" if chunks or n != 4 else "pipe closed")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def read_frame(stream: BinaryIO) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    (n,) = struct.unpack(">I", _read_exact(stream, 4))
    if n > MAX_FRAME:
        raise WireError(f"frame header of {n} bytes is too large")
    header = json.loads(_read_exact(stream, n))
    (m,) = struct.unpack(">I", _read_exact(stream, 4))
    if m > MAX_FRAME:
        raise WireError(f"frame body of {m} bytes is too large")
    arrays: dict[str, np.ndarray] = {}
    if m:
        with np.load(io.BytesIO(_read_exact(stream, m)), allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    return header, arrays
