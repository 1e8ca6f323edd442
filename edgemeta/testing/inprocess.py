"""The daemon in this process, driven only through what it offers a caller.

The benchmarks that need deterministic figures (``bench stream``, ``bench daemon``,
``bench devices``) run the daemon in their own process instead of as a child: rows go in through
:meth:`InProcessDaemon.feed` (the path every inbox file takes, without the file) or a real file
through :meth:`handle`, work in flight is finished with :meth:`drain`, and what the daemon did is
read back through :meth:`view` (the stream's status, as ``edgemeta status`` shows it) and
:meth:`episodes` (the records ``status`` lists last). Nothing here reaches into the daemon's
parts, so a refactor of the daemon breaks this facade, not every benchmark.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from edgemeta.config import Settings
from edgemeta.daemon.journal import StreamView
from edgemeta.daemon.metrics import Metrics
from edgemeta.daemon.runtime import Daemon


class InProcessDaemon:
    """A started daemon with its adapter worker ready (:meth:`start`), until :meth:`shutdown`."""

    def __init__(self, settings: Settings, metrics: Metrics | None = None):
        self.settings = settings
        self._daemon = Daemon(settings, metrics=metrics or Metrics())

    def start(self, ready_s: float = 120.0) -> InProcessDaemon:
        self._daemon.setup()
        if not self._daemon.adapter.wait_ready(ready_s):
            self._daemon.shutdown(drain_s=0.0)
            raise RuntimeError(f"the adapter worker was not ready within {ready_s:.0f} s")
        return self

    # -- rows and files in --------------------------------------------------------------------
    def feed(self, stream: str, x: np.ndarray, y: np.ndarray | None = None,
             ids: list | None = None) -> tuple[list, int]:
        """Serve rows (and learn from their labels): the predictions and the version that made
        them."""
        return self._daemon.feed(stream, x, y, ids)

    def handle(self, stream: str, path: Path) -> None:
        """One input file already in the stream's inbox, handled as the watcher would."""
        self._daemon.inbox.handle(stream, path)

    def inbox(self, stream: str) -> Path:
        return self._daemon.layout.dir("inbox", stream)

    def processed(self, stream: str) -> Path:
        return self._daemon.layout.dir("processed", stream)

    def trigger(self, stream: str) -> None:
        """Ask for an adaptation, as ``edgemeta trigger adapt`` does."""
        self._daemon.streams.trigger(stream)

    def drain(self, timeout: float = 60.0) -> bool:
        """Finish every adaptation under way; False when one is still running at ``timeout``."""
        return self._daemon.drain(timeout)

    @contextlib.contextmanager
    def onnx_alone(self) -> Iterator[None]:
        """Serve the ONNX model alone for a while, as ``[portfolio] enabled = false`` would."""
        portfolios, self._daemon.inbox.portfolios = self._daemon.inbox.portfolios, {}
        try:
            yield
        finally:
            self._daemon.inbox.portfolios = portfolios

    # -- what it did ----------------------------------------------------------------------------
    def view(self, stream: str) -> StreamView:
        """The stream as ``edgemeta status`` shows it: version, phase, detections, samples."""
        return self._daemon.streams.view(stream)

    def version(self, stream: str) -> int:
        """The version serving ``stream`` now."""
        return self._daemon.models.version(stream)

    def episodes(self) -> list[dict[str, Any]]:
        """The latest episodes and events, oldest first (what ``status`` lists)."""
        return list(self._daemon.journal.recent)

    @property
    def worker_pid(self) -> int | None:
        return self._daemon.adapter.pid

    def shutdown(self, drain_s: float = 0.5) -> None:
        self._daemon.shutdown(drain_s=drain_s)
