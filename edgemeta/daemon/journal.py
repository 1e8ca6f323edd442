"""Episode records and ``status.json``: the one place that knows their formats.

An episode record (``<state>/episodes/<time>-<stream>.json``) keeps an adaptation's support and
holdout rows with its outcome and the bundle it adapted, for audit and for re-meta-training later
(``edgemeta tasks harvest`` reads them back through ``edgemeta/episode_format.py``). An accepted episode
also gets the next labelled rows of its stream (``after``), so a harvested task has query rows
the adaptation never saw. ``status.json`` is what
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgemeta.episode_format import episode_body
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
    restarts: int = 0        # drift collections restarted by a further drift
    superseded: int = 0      # open episodes a drift ended
    on_probation: bool = False  # a new version is being judged against the one it replaced
    # Alarms because the serving model was significantly worse than the trivial predictor
    # (stream/trivial.py); each is also one of ``drifts``.
    worse_than_trivial: int = 0
    regime_rows: int = 0    # labelled rows since the last change point: what a continued fit has
    baseline_rows: int = 0  # labelled rows the error detector's baseline holds
    # The online experts beside the ONNX model (portfolio.enabled): weights, losses, champion.
    portfolio: dict | None = None


@dataclass
class _Following:
    """The labelled rows still wanted after an accepted episode."""

    name: str
    wanted: int
    x: list = field(default_factory=list)
    y: list = field(default_factory=list)


class Journal:
    def __init__(self, state_dir: Path, keep_episodes: int, recent: int = 20,
                 bundle: dict[str, Any] | None = None, after_rows: int = 0):
        self.directory = Path(state_dir) / "episodes"
        self.status_path = Path(state_dir) / "status.json"
        self.keep_episodes = keep_episodes
        self.recent: deque[dict[str, Any]] = deque(maxlen=recent)
        self.bundle = bundle or {}  # which meta-initialization the episodes adapted
        self.after_rows = after_rows
        self._following: dict[str, _Following] = {}

    def record(self, stream: str, reason: str, result: str, why: str, serving_version: int,
               support: tuple[np.ndarray, np.ndarray], holdout: tuple[np.ndarray, np.ndarray],
               timings: dict[str, float], figures: dict[str, Any]) -> dict[str, Any]:
        """Write one episode; a write that fails is logged (the episode still counts)."""
        entry = {"time": time.time(), "stream": stream, "trigger": reason, "result": result,
                 "reason": why, "serving_version": serving_version,
                 "timings_ms": {k: round(v * 1e3, 3) for k, v in timings.items()}, **figures}
        self.recent.append(entry)
        body = episode_body(entry, self.bundle, support, holdout)
        # One clock reading for both parts: the names sort in the order the episodes ended (two
        # readings could straddle a second and put a later episode first).
        now = time.time_ns()
        name = (f"{time.strftime('%Y%m%dT%H%M%S', time.localtime(now // 10**9))}-"
                f"{now % 10**9:09d}-{stream}.json")
        self.stop_following(stream)  # an older episode keeps what it has
        try:
            atomic_write(self.directory / name, json.dumps(body, default=float).encode())
            self._prune()
        except OSError as exc:
            log.error("cannot write the episode record %s: %s", name, exc)
            return entry
        if result == "accepted" and self.after_rows > 0:
            self._following[stream] = _Following(name, self.after_rows)
        return entry

    def labelled(self, stream: str, x: np.ndarray, y: Any) -> None:
        """A labelled row of ``stream``: kept with its last accepted episode while wanted."""
        following = self._following.get(stream)
        if following is None:
            return
        following.x.append(np.asarray(x).tolist())
        following.y.append(y.item() if hasattr(y, "item") else y)
        if len(following.y) >= following.wanted:
            self.stop_following(stream)

    def stop_following(self, stream: str) -> None:
        """The regime ended (a drift, a new episode): write the rows kept so far."""
        following = self._following.pop(stream, None)
        if following is None or not following.y:
            return
        path = self.directory / following.name
        try:
            body = json.loads(path.read_text())
            body["after"] = {"x": following.x, "y": following.y}
            atomic_write(path, json.dumps(body, default=float).encode())
        except FileNotFoundError:
            pass  # pruned meanwhile
        except (OSError, ValueError) as exc:
            log.error("cannot add the rows after episode %s: %s", following.name, exc)

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
        status = {"pid": pid, "pid_start": process_start(pid), "updated": time.time(),
                  "worker": worker,
                  "streams": {n: v.__dict__ for n, v in streams.items()},
                  "last_adaptations": list(self.recent)[-10:], "degraded": degraded}
        atomic_write(self.status_path, json.dumps(status, indent=2, default=float).encode())


def process_start(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks since boot, /proc/PID/stat field 22): with the
    pid, it names one process, so a reused pid is never taken for the daemon."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def daemon_alive(status: dict[str, Any]) -> bool:
    """Whether the process that wrote ``status`` still runs."""
    pid, start = status.get("pid"), status.get("pid_start")
    if not isinstance(pid, int) or isinstance(pid, bool):
        return False
    return start is not None and process_start(pid) == start


def read_status(state_dir: Path) -> dict[str, Any]:
    """status.json as written by :meth:`Journal.write_status`; FileNotFoundError when absent."""
    return json.loads((Path(state_dir) / "status.json").read_text())


def _state_line(s: dict[str, Any]) -> str:
    phase = s["phase"]
    if phase == "waiting_for_worker":
        return f"adapting ({s['reason']}), waiting for the worker to start"
    if phase in ("adapting", "gating"):
        return f"adapting ({s['reason']})"
    if phase in ("collecting", "refining"):
        return f"{'refining' if phase == 'refining' else 'collecting'} ({s['reason']}) " \
               f"{s['collected']}/{s['needed']}"
    return "DRIFT" if s["drift_active"] else "stable"


def _portfolio_line(p: dict[str, Any]) -> str:
    """Which members the stream's served mixture is made of, and how they have been doing."""
    members = ", ".join(
        f"{m} {v['weight']:.2f}" + (f" (loss {v['loss']:.3g})" if v.get("loss") is not None else "")
        for m, v in p["members"].items())
    dropped = f"; dropped: {', '.join(p['dropped'])}" if p.get("dropped") else ""
    return f"served as a mixture, champion {p['champion']}: {members}{dropped}"


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
                     f"{_state_line(s)}; {s['samples']} labelled samples"
                     + (f" ({s['regime_rows']} since the last change)" if "regime_rows" in s
                        else "") + f", last loss {loss}"
                     + (f"; {s['worse_than_trivial']} time(s) worse than the trivial predictor"
                        if s.get("worse_than_trivial") else ""))
        if s.get("portfolio"):
            lines.append("    " + _portfolio_line(s["portfolio"]))
    for e in status["last_adaptations"]:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e["time"]))
        timings = e.get("timings_ms", {})
        lines.append(f"  {when} {e['stream']}: {e['trigger']} {e['result']} ({e['reason']}) "
                     f"{e.get('holdout_current', float('nan')):.4g} -> "
                     f"{e.get('holdout_candidate', float('nan')):.4g}, "
                     f"{timings.get('total', sum(timings.values())):.1f} ms")
    return "\n".join(lines)
