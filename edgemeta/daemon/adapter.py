"""Starts and talks to the adapter worker process; restarts it, times it out, never blocks serving.

The worker is started by module name so this process never imports torch. A reader thread turns
the worker's frames into queue items; the control loop polls the queue, so a slow or hung
adaptation never stalls ingest or the systemd watchdog. The worker is serial: a request is timed
from the worker's "started" frame, not from when it was queued behind others, so several streams'
fits due together do not time out for waiting. A request that outlives its timeout kills the
worker (a hung CUDA kernel cannot be cancelled any other way) and a dead worker is restarted with
exponential back-off.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgemeta.wire import WireError, read_frame, write_frame

log = logging.getLogger("edgemeta.adapter")


@dataclass
class AdaptOutcome:
    request_id: int
    ok: bool
    weights: dict[str, np.ndarray] = field(default_factory=dict)
    losses: list[float] = field(default_factory=list)
    reason: str = ""
    error: str = ""
    seconds: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)  # a continued fit: its start, steps


class AdapterClient:
    def __init__(self, bundle: Path, device: str = "auto", timeout_s: float = 30.0,
                 start_timeout_s: float = 120.0, backoff: tuple[float, float] = (0.5, 30.0),
                 on_restart=None, cpu_threads: int = 1):
        self.bundle = Path(bundle)
        self.device = device
        self.cpu_threads = cpu_threads
        self.timeout_s = timeout_s
        self.start_timeout_s = start_timeout_s
        self.backoff = backoff
        self.on_restart = on_restart
        self._proc: subprocess.Popen | None = None
        self._inbox: queue.Queue = queue.Queue()
        self._next_id = 1
        # request id -> [when it was sent, when the worker started it (None: queued)]
        self._pending: dict[int, list[float | None]] = {}
        self._last_answer = 0.0  # when the worker last finished a request
        self._ready = False
        self._started_at = 0.0
        self._restart_at: float | None = None
        self._failures = 0
        self.info: dict[str, Any] = {}
        self.restarts = 0

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self._proc = subprocess.Popen(
            # -P: the working directory (a checkout named edgemeta, say) never shadows the package.
            [sys.executable, "-P", "-m", "edgemeta.meta.worker", "--bundle", str(self.bundle),
             "--device", self.device, "--cpu-threads", str(self.cpu_threads)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        self._ready = False
        self._started_at = time.monotonic()
        proc = self._proc
        threading.Thread(target=self._read, args=(proc,), daemon=True,
                         name="adapter-reader").start()
        log.info("adapter worker started pid=%d device=%s", proc.pid, self.device)

    def _read(self, proc: subprocess.Popen) -> None:
        try:
            while True:
                header, arrays = read_frame(proc.stdout)
                self._inbox.put((proc, header, arrays))
        except (WireError, ValueError, OSError):
            self._inbox.put((proc, {"type": "eof"}, {}))

    def stop(self, timeout: float = 5.0) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        try:
            write_frame(proc.stdin, {"type": "stop"})
            proc.stdin.close()
        except (OSError, ValueError):
            pass
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def kill(self) -> None:
        if self._proc is not None:
            self._proc.kill()

    @property
    def ready(self) -> bool:
        return self._ready and self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Block until the worker has loaded the bundle (used at start-up and in tests)."""
        deadline = time.monotonic() + (timeout or self.start_timeout_s)
        while time.monotonic() < deadline:
            self.poll(wait=0.1)
            if self.ready:
                return True
        return False

    # -- requests ------------------------------------------------------------------------------
    def submit(self, support_x: np.ndarray, support_y: np.ndarray, steps: int | None = None,
               init: Mapping[str, np.ndarray] | None = None,
               fit: Mapping[str, Any] | None = None) -> int | None:
        """Send an adapt request (``fit``: a continued fit with these options instead of the
        few-shot inner loop); returns its id, or None when the worker is not available."""
        if not self.ready:
            return None
        rid = self._next_id
        self._next_id += 1
        arrays = {"support_x": np.asarray(support_x, np.float32), "support_y": np.asarray(support_y)}
        for name, value in (init or {}).items():
            arrays[f"init/{name}"] = value
        header = ({"type": "fit", "id": rid, "options": dict(fit)} if fit is not None
                  else {"type": "adapt", "id": rid, "steps": steps})
        try:
            write_frame(self._proc.stdin, header, arrays)
        except (OSError, ValueError) as exc:
            log.warning("adapter worker pipe failed: %s", exc)
            self._worker_died("pipe closed")
            return None
        self._pending[rid] = [time.monotonic(), None]
        return rid

    def poll(self, wait: float = 0.0) -> list[AdaptOutcome]:
        """Outcomes that arrived, timeouts, and worker deaths; restarts the worker when due."""
        outcomes: list[AdaptOutcome] = []
        deadline = time.monotonic() + wait
        while True:
            timeout = max(0.0, deadline - time.monotonic())
            try:
                proc, header, arrays = self._inbox.get(timeout=timeout) if timeout else \
                    self._inbox.get_nowait()
            except queue.Empty:
                break
            if proc is not self._proc:
                continue  # a message from a worker we already replaced
            kind = header.get("type")
            if kind == "ready":
                self._ready = True
                self._failures = 0
                self.info = header
                log.info("adapter worker ready pid=%s device=%s (%s)", header.get("pid"),
                         header.get("device"), header.get("device_name"))
            elif kind == "started":
                if header.get("id") in self._pending:
                    self._pending[header["id"]][1] = time.monotonic()
            elif kind == "result":
                rid = header.get("id")
                self._last_answer = time.monotonic()
                if self._pending.pop(rid, None) is not None:
                    outcomes.append(AdaptOutcome(
                        rid, bool(header.get("ok")), arrays, header.get("losses", []),
                        header.get("reason", ""), header.get("error", ""),
                        header.get("seconds", 0.0),
                        {k: header[k] for k in ("start", "steps", "validation_loss",
                                                  "budget_steps", "budget_exhausted")
                         if k in header}))
            elif kind == "eof":
                outcomes += self._worker_died("worker exited")
            if wait and (outcomes or self._ready):
                break
        outcomes += self._check_timeouts()
        self._maybe_restart()
        return outcomes

    def _check_timeouts(self) -> list[AdaptOutcome]:
        now = time.monotonic()
        if not self._ready and self._proc is not None and self._restart_at is None \
                and now - self._started_at > self.start_timeout_s:
            log.error("adapter worker did not become ready in %.0fs; killing it", self.start_timeout_s)
            self._proc.kill()
            return self._worker_died("start timeout")
        late = [rid for rid, (_, started) in self._pending.items()
                if started is not None and now - started > self.timeout_s]
        if self._pending and all(started is None for _, started in self._pending.values()):
            # Nothing running: the oldest queued request should have started the moment it was
            # sent or the request before it was answered. A worker that does not start it is
            # hung (stopped, deadlocked) and is timed out like a request that runs too long.
            head = min(self._pending)
            if now - max(self._pending[head][0], self._last_answer) > self.timeout_s:
                late.append(head)
        if not late:
            return []
        log.error("adaptation request(s) %s timed out after %.1fs; killing the worker", late,
                  self.timeout_s)
        if self._proc is not None:
            self._proc.kill()
        out = [AdaptOutcome(rid, False, reason="timeout", error=f"no answer in {self.timeout_s}s")
               for rid in late]
        for rid in late:
            self._pending.pop(rid)
        return out + self._worker_died("timed out")

    def _worker_died(self, why: str) -> list[AdaptOutcome]:
        proc, self._proc = self._proc, None
        self._ready = False
        if proc is not None:
            with contextlib.suppress(OSError):
                proc.kill()
            proc.wait()
            log.warning("adapter worker pid=%d gone (%s, exit %s)", proc.pid, why, proc.returncode)
        out = [AdaptOutcome(rid, False, reason="worker_died", error=why) for rid in self._pending]
        self._pending.clear()
        delay = min(self.backoff[0] * (2 ** self._failures), self.backoff[1])
        self._failures += 1
        self._restart_at = time.monotonic() + delay
        return out

    def _maybe_restart(self) -> None:
        if self._restart_at is not None and time.monotonic() >= self._restart_at:
            self._restart_at = None
            self.restarts += 1
            if self.on_restart:
                self.on_restart()
            self.start()
