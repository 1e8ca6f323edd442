"""The episode record's format: what the daemon writes and the fleet's harvest reads back.

An episode record (``<state>/episodes/<time>-<stream>.json``) keeps an adaptation's support and
holdout rows with its outcome and the bundle it adapted; an accepted one later gets the next
labelled rows of its stream (``after``). It lives beside ``bundle_format.py``, importing neither
the daemon nor torch, because both sides of the loop need it: the daemon on the device, the
harvest (``edgemeta tasks harvest``) off it, and a harvest must not pull in a daemon.

>>> import json
>>> import numpy as np
>>> rows = (np.zeros((2, 1)), np.ones(2))
>>> body = episode_body({"time": 1.0, "stream": "s", "result": "accepted"}, {}, rows, rows)
>>> e = parse_episode(json.dumps(body).encode())
>>> e["support"][0].shape, e["after"]
((2, 1), None)
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from edgemeta.stream.parsing import IngestError, load_json

EPISODE_FORMAT = 1
EPISODE_MAX_DEPTH = 8  # an episode nests rows in parts: 4 levels; anything deeper is not one


class EpisodeError(ValueError):
    """An episode file that cannot be read back (truncated, foreign, malformed)."""


def episode_body(entry: dict[str, Any], bundle: dict[str, Any],
                 support: tuple[np.ndarray, np.ndarray],
                 holdout: tuple[np.ndarray, np.ndarray]) -> dict[str, Any]:
    """The JSON body of one episode: its ``entry`` (time, stream, result, ...), the bundle it
    adapted and its rows."""
    return {"format": EPISODE_FORMAT, **entry, "bundle": bundle,
            "support": {"x": support[0].tolist(), "y": support[1].tolist()},
            "holdout": {"x": holdout[0].tolist(), "y": holdout[1].tolist()}}


def _rows(body: dict, key: str, required: bool = True) -> tuple[np.ndarray, np.ndarray] | None:
    part = body.get(key)
    if part is None and not required:
        return None
    if not isinstance(part, dict) or "x" not in part or "y" not in part:
        raise EpisodeError(f"'{key}' is missing or has no x/y")
    try:
        x = np.asarray(part["x"], dtype=np.float64)
        y = np.asarray(part["y"], dtype=np.float64)
    except (TypeError, ValueError, OverflowError) as exc:
        raise EpisodeError(f"'{key}' rows are not numbers: {exc}") from exc
    if x.ndim == 1 and len(x) == 0:
        x = x.reshape(0, 0)
    if x.ndim != 2 or y.ndim != 1 or len(x) != len(y):
        raise EpisodeError(f"'{key}': x has shape {x.shape}, y has {y.shape}")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise EpisodeError(f"'{key}' holds a non-finite value")
    return x, y


def read_episode(path: Path) -> dict[str, Any]:
    """The episode record in ``path``; see :func:`parse_episode`."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise EpisodeError(f"cannot read: {exc}") from exc
    return parse_episode(data)


def parse_episode(data: bytes) -> dict[str, Any]:
    """An episode record with its rows as arrays (``support``, ``holdout``, ``after`` or None).

    Raises :class:`EpisodeError` naming what is wrong; files written before the ``format`` field
    existed are read too (they have no ``bundle`` and no ``after``).
    """
    try:
        # Depth and number length bounded: a file nested 100,000 deep or holding a 401-digit
        # number is refused, never a RecursionError or OverflowError in the reader.
        body = load_json(data.decode("utf-8"), 1, EPISODE_MAX_DEPTH)
    except (ValueError, IngestError) as exc:  # JSONDecodeError and UnicodeDecodeError too
        raise EpisodeError(f"not a readable JSON episode: {exc}") from exc
    if not isinstance(body, dict):
        raise EpisodeError("not an episode record (not a JSON object)")
    if body.get("format", EPISODE_FORMAT) != EPISODE_FORMAT:
        raise EpisodeError(f"episode format {body.get('format')!r}, this edgemeta reads {EPISODE_FORMAT}")
    for key in ("stream", "result", "time"):
        if key not in body:
            raise EpisodeError(f"not an episode record (no '{key}')")
    for key in ("stream", "result"):
        if not isinstance(body[key], str) or not body[key] or len(body[key]) > 256:
            raise EpisodeError(f"'{key}' must be a short string, got {str(body[key])[:40]!r}")
    for key in ("trigger", "reason"):
        if body.get(key) is not None and not isinstance(body[key], str):
            raise EpisodeError(f"'{key}' must be a string")
    t = body["time"]
    if isinstance(t, bool) or not isinstance(t, int | float) or not math.isfinite(t):
        raise EpisodeError(f"'time' must be a number of seconds, got {str(t)[:40]!r}")
    if body.get("bundle") is not None and not isinstance(body["bundle"], dict):
        raise EpisodeError("'bundle' must be an object")
    body["support"] = _rows(body, "support")
    body["holdout"] = _rows(body, "holdout")
    body["after"] = _rows(body, "after", required=False)
    widths = {part[0].shape[1] for part in (body["support"], body["holdout"], body["after"])
              if part is not None and len(part[0])}
    if len(widths) > 1:
        raise EpisodeError(f"rows disagree on the number of features: {sorted(widths)}")
    return body
