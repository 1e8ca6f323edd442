"""What the daemon keeps per stream: its detector, collector, lifecycle and regime, and the
figures ``status`` shows. Plain data, shared by the modules that route rows (``streams.py``),
change what serves (``promotion.py``) and recall remembered models (``recall.py``)."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np

from edgemeta.daemon import lifecycle as lc
from edgemeta.daemon.sanity import Probation
from edgemeta.stream.buffers import Episode, SupportCollector
from edgemeta.stream.drift import DriftMonitor
from edgemeta.stream.regime import RegimeBuffer
from edgemeta.stream.trivial import TrivialCheck


@dataclass
class StreamState:
    name: str
    lineage: str
    monitor: DriftMonitor
    collector: SupportCollector
    machine: lc.Lifecycle
    regime: RegimeBuffer
    trivial: TrivialCheck
    samples: int = 0
    drifts: int = 0  # detections so far (status shows them; so does the detections counter)
    restarts: int = 0  # drift collections restarted by a further drift
    superseded: int = 0  # open episodes and collections a drift ended
    worse_than_trivial: int = 0  # alarms: the serving model was worse than a constant
    last_loss: float | None = None
    drift_started: float | None = None
    # Labels seen while not collecting: the stream's recent history, against which a support
    # set's labels are checked for sanity.
    history: deque = field(default_factory=lambda: deque(maxlen=500))
    probation: Probation | None = None  # after a swap: the new version vs the one it replaced
    recalled: bool = False  # a remembered model was recalled since the last drift
    completed: Episode | None = None    # the collection that just completed, until submitted
    # An operator's support file that arrived while an episode was in flight: it seeds the
    # manual collection that opens when that episode ends.
    pending_support: list[tuple[np.ndarray, float]] = field(default_factory=list)
    # Labelled rows that arrived after an operator's trigger while an episode was in flight:
    # what the operator asked to adapt to, so they seed that manual collection too (after the
    # support file's rows). A drift empties it: they are the world before the change.
    pending_rows: list[tuple[np.ndarray, float]] = field(default_factory=list)
