"""Episode records and ``status.json``: the one place that knows their formats.

An episode record (``<state>/episodes/<time>-<stream>.json``) keeps an adaptation's support and
holdout rows with its outcome, for audit and for re-meta-training later; ``status.json`` is what
``edgemeta status`` prints, rewritten atomically. The daemon hands over plain values; the CLI reads
the status back through :func:`read_status` and :func:`render_status`, so the format lives here
only.

>>> print(render_status({"pid": 7, "updated": 0.0, "worker": {"ready": True, "device": "cpu",
...     "restarts": 0}, "streams": {"s": {"version": 3, "source": "drift", "provider": "CPU",
...     "phase": "watching", "reason": None, "drift_active": False, "samples": 40,
...     "last_loss": 0.25, "collected": 0, "needed": 0}}, "last_adaptations": [],
...     "degraded": {}}, now=5.0).splitlines()[2])
  stream s: v3 (drift) on CPU; stable; 40 labelled samples, last loss 0.25
"""

from __future__ import annotations

import json
import logging
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgemeta.fsio import atomic_write

log = logging.getLogger("edgemeta.daemon")


@dataclass(frozen=True)
class StreamView:
    """What ``status`` shows of one stream."""

    version: int
    source: str
    provider: str | None
    phase: str
    reason: str | None
    drift_active: bool
    drift_since: float | None
    drifts: int
    samples: int
    last_loss: float | None
    collected: int
    needed: int
    meta_init: bool = False  # served by the bundle's bare meta-initialization


class Journal:
    def __init__(self, state_dir: Path, keep_episodes: int, recent: int = 20):
        self.directory = Path(state_dir) / "episodes"
        self.status_path = Path(state_dir) / "status.json"
        self.keep_episodes = keep_episodes
        self.recent: deque[dict[str, Any]] = deque(maxlen=recent)

    def record(self, stream: str, reason: str, result: str, why: str, serving_version: int,
               support: tuple[np.ndarray, np.ndarray], holdout: tuple[np.ndarray, np.ndarray],
               timings: dict[str, float], figures: dict[str, Any]) -> dict[str, Any]:
        """Write one episode; a write that fails is logged (the episode still counts)."""
        entry = {"time": time.time(), "stream": stream, "trigger": reason, "result": result,
                 "reason": why, "serving_version": serving_version,
                 "timings_ms": {k: round(v * 1e3, 3) for k, v in timings.items()}, **figures}
        self.recent.append(entry)
        body = {**entry, "support": {"x": support[0].tolist(), "y": support[1].tolist()},
                "holdout": {"x": holdout[0].tolist(), "y": holdout[1].tolist()}}
        name = f"{time.strftime('%Y%m%dT%H%M%S')}-{time.time_ns() % 10**9:09d}-{stream}.json"
        try:
            atomic_write(self.directory / name, json.dumps(body, default=float).encode())
            self._prune()
        except OSError as exc:
            log.error("cannot write the episode record %s: %s", name, exc)
        return entry

    def note(self, entry: dict[str, Any]) -> None:
        """An event without rows (an automatic rollback) that ``status`` should still show."""
        self.recent.append({"time": time.time(), **entry})

    def _prune(self) -> None:
        files = sorted(self.directory.glob("*.json"))
        for old in files[:max(0, len(files) - self.keep_episodes)]:
            old.unlink(missing_ok=True)

    def write_status(self, pid: int, worker: dict[str, Any], streams: dict[str, StreamView],
                     degraded: dict[str, str]) -> None:
        """Rewrite status.json atomically; raises OSError (the caller decides if it degrades)."""
        status = {"pid": pid, "updated": time.time(), "worker": worker,
                  "streams": {n: v.__dict__ for n, v in streams.items()},
                  "last_adaptations": list(self.recent)[-10:], "degraded": degraded}
        atomic_write(self.status_path, json.dumps(status, indent=2, default=float).encode())


def read_status(state_dir: Path) -> dict[str, Any]:
    """status.json as written by :meth:`Journal.write_status`; FileNotFoundError when absent."""
    return json.loads((Path(state_dir) / "status.json").read_text())


def _state_line(s: dict[str, Any]) -> str:
    phase = s["phase"]
    if phase in ("adapting", "gating"):
        return f"adapting ({s['reason']})"
    if phase in ("collecting", "refining"):
        return f"{'refining' if phase == 'refining' else 'collecting'} ({s['reason']}) " \
               f"{s['collected']}/{s['needed']}"
    return "DRIFT" if s["drift_active"] else "stable"


def render_status(status: dict[str, Any], now: float | None = None) -> str:
    """The human-readable ``edgemeta status``."""
    now = time.time() if now is None else now
    w = status["worker"]
    lines = [f"pid {status['pid']}, updated {now - status['updated']:.0f}s ago"
             + (f"; DEGRADED ({', '.join(status['degraded'])}): ingest paused"
                if status.get("degraded") else ""),
             f"adapter worker: {'ready' if w['ready'] else 'NOT READY'} on {w['device']}, "
             f"{w['restarts']} restart(s)"]
    for name, s in status["streams"].items():
        loss = f"{s['last_loss']:.4g}" if s["last_loss"] is not None else "-"
        bare = (", the bare meta-initialization" if s.get("meta_init")
                and s["source"] != "meta-init" else "")
        lines.append(f"  stream {name}: v{s['version']} ({s['source']}{bare}) on {s['provider']}; "
                     f"{_state_line(s)}; {s['samples']} labelled samples, last loss {loss}")
    for e in status["last_adaptations"]:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e["time"]))
        timings = e.get("timings_ms", {})
        lines.append(f"  {when} {e['stream']}: {e['trigger']} {e['result']} ({e['reason']}) "
                     f"{e.get('holdout_current', float('nan')):.4g} -> "
                     f"{e.get('holdout_candidate', float('nan')):.4g}, "
                     f"{timings.get('total', sum(timings.values())):.1f} ms")
    return "\n".join(lines)
