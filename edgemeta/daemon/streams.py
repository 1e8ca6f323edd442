"""Per-stream learning: labelled rows feed the drift detector (in every phase) and the open
collection, and the lifecycle's actions are carried out.

The decisions are the lifecycle's (``lifecycle.py``); this module routes rows and events and
hands each action to the part whose job it is, through one queue of (stream, event) pairs, so an
action that causes another event (a backfilled collection that is complete at once, a gate that
accepts) is handled after the actions of the event before it, never in the middle of them.
Building a stream's parts and rebuilding them on a reload is ``stream_parts.py``'s; sending jobs
to the worker ``dispatch.py``'s; the gate and the record ``judge.py``'s; changing what serves
``promotion.py``'s; recalling a remembered model ``recall.py``'s; the episodes in flight are
``jobs.py``'s.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable

import numpy as np

from edgemeta.bundle_format import BundleInfo
from edgemeta.config import Settings
from edgemeta.daemon import lifecycle as lc
from edgemeta.daemon.adapter import AdapterClient
from edgemeta.daemon.dispatch import Dispatch
from edgemeta.daemon.gate import per_sample_loss, row_losses
from edgemeta.daemon.jobs import JobTable
from edgemeta.daemon.journal import Journal, StreamView
from edgemeta.daemon.judge import Judge
from edgemeta.daemon.metrics import Metrics
from edgemeta.daemon.models import ServedModels
from edgemeta.daemon.promotion import Promotion
from edgemeta.daemon.recall import Recall
from edgemeta.daemon.stream_parts import StreamParts
from edgemeta.daemon.stream_state import StreamState

log = logging.getLogger("edgemeta.daemon")

__all__ = ["Streams", "StreamState"]


class Streams:
    def __init__(self, settings: Settings, bundle: BundleInfo, models: ServedModels,
                 adapter: AdapterClient, journal: Journal, metrics: Metrics,
                 degrade: Callable[[OSError, str], None]):
        self.settings = settings
        self.bundle = bundle
        self.kind = bundle.kind
        self.models = models
        self.journal = journal
        self.metrics = metrics
        self.parts = StreamParts(settings, bundle, models)
        self.states = {s.name: self.parts.fresh(s.name) for s in settings.streams}
        self.jobs = JobTable()
        self.promotion = Promotion(models, metrics, journal, self.states, self._event,
                                   settings.adaptation.holdout_size)
        self.recall = Recall(settings, bundle, models, self.promotion, journal, metrics,
                             self._event, degrade)
        self.dispatch = Dispatch(settings, bundle, models, adapter, self.jobs, self.recall,
                                 metrics, self.states, self._event)
        self.judge = Judge(settings, bundle, models, self.jobs, self.promotion, journal, metrics,
                           self._event, degrade)
        self._queue: deque[tuple[StreamState, lc.Event]] = deque()
        self.changed = True  # something ``status`` shows has changed

    @property
    def busy(self) -> bool:
        """An episode is queued for, running in, or being judged after the worker (an episode
        the early gate sent back to collect more rows waits for labels, not for the worker)."""
        return any(state.machine.busy for state in self.states.values())

    # -- events from the daemon -------------------------------------------------------------------
    def start(self) -> None:
        for state in self.states.values():
            meta_init = self.models.of(state.name).manifest.source == "meta-init"
            self._event(state, lc.Started(meta_init))

    def trigger(self, stream: str, support: tuple[np.ndarray, np.ndarray] | None = None) -> str:
        """An operator's ``adapt``, optionally with a support file's labelled rows; what the
        daemon does about it, in words."""
        state = self.states[stream]
        self._event(state, lc.Triggered())
        if state.machine.manual_pending:
            if support is not None:
                # The collection opens when the episode in flight ends: these rows seed it.
                state.pending_support = list(zip(*support, strict=True))
            kept = (f"with the {len(support[1])} rows given and the labelled rows that arrive "
                    f"meanwhile" if support is not None else "with the labelled rows that "
                    "arrive meanwhile")
            return (f"stream {stream}: an episode is in flight; a manual collection {kept} "
                    f"opens when it ends")
        if support is None:
            return f"collecting {state.collector.needed} labelled samples on stream {stream}"
        x, y = support
        outputs, _ = self.models.predict(stream, self.bundle.normalize(x))
        # The operator's chosen rows, not live traffic: they fill the collection but say
        # nothing about how the serving model meets the stream, so the detector never sees them.
        self.learn(stream, x, y, outputs, judged=np.zeros(len(y), bool))
        return f"support file gave {len(y)} labelled rows on stream {stream}"

    def rolled_back(self, lineage: str, to: int | None = None) -> str:
        """An operator's rollback of ``lineage``."""
        manifest = self.promotion.rollback(lineage, to=to)
        return f"{lineage} now serves v{manifest.version} (rollback to v{manifest.parent})"

    def reload(self, settings: Settings, changed: list[str]) -> None:
        """New settings (``changed``: the keys that differ). Only what a changed key shapes is
        rebuilt (``stream_parts.py``); an open collection that is rebuilt is reopened."""
        self.settings = settings
        for part in (self.parts, self.recall, self.dispatch, self.judge):
            part.settings = settings
        self.promotion.probation_rows = settings.adaptation.holdout_size
        for state in self.states.values():
            if self.parts.rebuild(state, changed):
                self._event(state, lc.Reloaded())

    def stopping(self) -> None:
        for state in self.states.values():
            self.journal.stop_following(state.name)  # keep what the episode has so far
            self._event(state, lc.Stopping())

    def learn(self, stream: str, x: np.ndarray, y: np.ndarray, outputs: np.ndarray,
              judged: np.ndarray | None = None) -> None:
        """Labelled rows (with the raw ``outputs`` that served them): each feeds the drift
        detector and the trivial-predictor check, whatever the phase, then the open collection
        or the stream's history.

        ``judged`` marks the rows whose prediction the serving version made: a late label for a
        prediction of an earlier version says nothing about the model serving now, so it may
        seed a support set but never feeds the detector.
        """
        state = self.states[stream]
        losses = per_sample_loss(self.kind, outputs, y)
        gate_losses = row_losses(self.kind, outputs, y)  # what the trivial check scores
        state.samples += len(y)
        state.last_loss = float(np.mean(losses))
        self.metrics.stream_loss.labels(stream).set(state.last_loss)
        changed = state.probation is not None and self.promotion.judge(
            state, x, y, losses, judged, self.bundle.normalize, self.kind) == "changed"
        drifts = state.drifts
        m = state.machine
        served = self.models.version(stream)
        for i in range(len(y)):
            # A promotion, recall or rollback within this batch: its later rows were predicted
            # by the version it replaced, and say nothing about the one serving now.
            mine = (judged is None or judged[i]) and self.models.version(stream) == served
            if mine and state.monitor.update_error(losses[i], (x[i], y[i])):
                self.drift(state, state.monitor.detector)
                continue  # the row is in the backfill already
            if mine and state.trivial.update(gate_losses[i], y[i], served) and m.phase in (
                    lc.Phase.WATCHING, lc.Phase.REFINING):
                # Worse than a constant: the detector took a bad model's error as normal. An
                # alarm of its own, so a collection opens (while an episode is already in
                # flight, that episode is what replaces the model).
                state.worse_than_trivial += 1
                state.trivial.acted()
                log.warning("stream=%s: v%d is significantly worse than the trivial predictor "
                            "on the last %d rows (t = %.1f)", stream, served,
                            state.trivial.rows, state.trivial.last_t)
                state.monitor.declare()
                self.drift(state, "trivial")
                continue
            state.regime.add(x[i], y[i])
            self.journal.labelled(stream, x[i], y[i])
            if m.collecting:
                self._offer(state, x[i], y[i])
            else:
                state.history.append(float(y[i]))
                if m.manual_pending and len(state.pending_rows) < self._manual_rows():
                    state.pending_rows.append((x[i], y[i]))
        if changed and state.drifts == drifts:
            # Probation saw the world change in these rows: a drift, called once the detector
            # has them too (its new baseline and the backfill are this batch's rows).
            self.alarm(state.name, "probation")
        if self.settings.continual.enabled and m.phase is lc.Phase.WATCHING and state.regime.due:
            self._event(state, lc.Due())
        self.changed = True

    def _manual_rows(self) -> int:
        """How many rows a manual collection takes at most (its support and full holdout)."""
        a = self.settings.adaptation
        return a.support_size + a.holdout_size

    def _offer(self, state: StreamState, x, y) -> None:
        episode = state.collector.offer(x, y)
        if episode is not None:
            state.completed = episode
            self._event(state, lc.Completed())

    def unlabelled(self, stream: str, x_normalized: np.ndarray) -> None:
        """Rows without labels: only a feature detector can learn anything from them."""
        state = self.states[stream]
        for row in x_normalized:
            if state.monitor.update_features(row):
                self.drift(state, "feature")

    def alarm(self, stream: str, detector: str) -> None:
        """A drift found by other evidence than the error detector's own alarm (probation; a
        test standing in for the detector): the detector re-baselines as after its own."""
        state = self.states[stream]
        state.monitor.declare()
        self.drift(state, detector)

    def drift(self, state: StreamState, detector: str) -> None:
        # A new regime: only the rows since the estimated change point describe it.
        backfill = detector != "feature" and self.settings.adaptation.backfill
        self.journal.stop_following(state.name)  # the rows from here on are another regime's
        self.recall.remember(state)
        rows = state.monitor.rows_since_change() if backfill else []
        state.regime.restart(rows)
        state.recalled = False
        state.trivial.reset()  # a new regime: its rows alone judge the model against a constant
        state.probation = None  # a drift is not a verdict on the model that serves
        state.pending_rows = []  # rows of the world before the change
        state.drifts += 1
        self.metrics.drift_detections.labels(state.name, detector).inc()
        log.warning("drift detected stream=%s detector=%s version=%d samples=%d phase=%s",
                    state.name, detector, self.models.version(state.name), state.samples,
                    state.machine.phase.value)
        self._event(state, lc.DriftDetected(backfill=detector != "feature"))
        if rows:
            self.recall.attempt(state, np.asarray([r[0] for r in rows]),
                                np.asarray([r[1] for r in rows]))

    def poll(self, wait: float = 0.0) -> None:
        """Take the worker's outcomes; send held episodes once it is up."""
        self.dispatch.poll(wait)
        if self.dispatch.changed:
            self.dispatch.changed, self.changed = False, True

    # -- carrying out the lifecycle's actions -----------------------------------------------------
    def _event(self, state: StreamState, event: lc.Event) -> None:
        self._queue.append((state, event))
        if len(self._queue) > 1:
            return  # an outer call is draining the queue
        while self._queue:
            st, ev = self._queue[0]
            for action in st.machine.handle(ev):
                self._do(st, action)
            self._queue.popleft()
            unresolved = st.machine.unresolved
            if unresolved and st.drift_started is None:
                st.drift_started = time.time()
            elif not unresolved:
                st.drift_started = None
            self.metrics.drift_active.labels(st.name).set(1 if unresolved else 0)
        self.changed = True

    def _do(self, state: StreamState, action: lc.Action) -> None:
        if isinstance(action, lc.Open):
            self._open(state, action)
        elif isinstance(action, lc.Cancel):
            state.collector.cancel()
        elif isinstance(action, lc.Superseded):
            self._superseded(state, action)
        elif isinstance(action, lc.ResetDetector):
            state.monitor.reset(cooldown=True, expected=action.expected)
        elif isinstance(action, lc.Submit):
            self.dispatch.start(state, action.job)
        elif isinstance(action, lc.Fit):
            self.dispatch.fit(state, action.job)
        elif isinstance(action, lc.Gate):
            self.judge.gate(state, self.jobs.get(state.name, action.job), action.early)
        elif isinstance(action, lc.Record):
            self.judge.record(state, action)

    def _superseded(self, state: StreamState, action: lc.Superseded) -> None:
        if action.restart:
            state.restarts += 1
            self.metrics.drift_restarts.labels(state.name).inc()
            log.warning("stream=%s: another drift during the drift collection: it restarts "
                        "from the new change point", state.name)
        else:
            state.superseded += 1
            log.warning("stream=%s: the %s episode is superseded by a drift", state.name,
                        action.reason.value)

    def _open(self, state: StreamState, action: lc.Open) -> None:
        rows: list = []
        support_size, holdout_size = action.support_size, action.holdout_size
        if action.seed == "backfill" and self.settings.adaptation.backfill:
            rows = state.monitor.rows_since_change()
        elif action.seed == "episode":
            # The early gate was inconclusive: the same weights wait for the rest of the full
            # holdout (the early rows stay its first; the two looks share gate.alpha, gate.py).
            early = len(self.jobs.get(state.name, state.machine.resumed).episode.holdout_y)
            support_size = 0
            holdout_size = max(1, self.settings.adaptation.holdout_size - early)
        elif action.reason is lc.Reason.MANUAL:
            rows = [*state.pending_support, *state.pending_rows]
            state.pending_support, state.pending_rows = [], []
        episode = state.collector.start(rows, support_size, holdout_size)
        if rows:
            log.info("stream=%s: %d labelled row(s) already seen seed the %s collection",
                     state.name, min(len(rows), state.collector.needed), action.reason.value)
        if episode is not None:
            state.completed = episode
            self._event(state, lc.Completed())

    # -- status ------------------------------------------------------------------------------------
    def view(self, name: str) -> StreamView:
        state, served = self.states[name], self.models.of(name)
        m = state.machine
        phase = m.phase.value
        if name in self.jobs.waiting_streams():
            phase = "waiting_for_worker"
        return StreamView(served.version, served.manifest.source, served.predictor.provider,
                          phase, m.reason.value if m.reason else None, m.unresolved,
                          state.drift_started, state.drifts, state.samples, state.last_loss,
                          state.collector.collected if m.collecting else 0,
                          state.collector.needed if m.collecting else 0, served.bare,
                          state.restarts, state.superseded, state.probation is not None,
                          state.worse_than_trivial, state.regime.count, state.monitor.seen)
