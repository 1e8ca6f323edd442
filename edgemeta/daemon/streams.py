"""Per-stream learning: labelled rows feed the drift detector (in every phase) and the open
collection, and the lifecycle's actions are carried out (collections, worker jobs, the gate).

The decisions are the lifecycle's (``lifecycle.py``); this module only does what it is told and
reports back what happened, through one queue of (stream, event) pairs, so an action that causes
another event (a backfilled collection that is complete at once, a gate that accepts) is handled
after the actions of the event before it, never in the middle of them. Changing what serves is
``promotion.py``'s, recalling a remembered model ``recall.py``'s, the episodes in flight are
``jobs.py``'s.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Callable

import numpy as np

from edgemeta.bundle_format import BundleInfo
from edgemeta.config import Settings
from edgemeta.daemon import lifecycle as lc
from edgemeta.daemon.adapter import AdapterClient
from edgemeta.daemon.gate import evaluate, per_sample_loss, row_losses, split_alpha
from edgemeta.daemon.jobs import Job, JobTable
from edgemeta.daemon.journal import Journal, StreamView
from edgemeta.daemon.metrics import Metrics
from edgemeta.daemon.models import ServedModels
from edgemeta.daemon.promotion import Promotion
from edgemeta.daemon.recall import Recall
from edgemeta.daemon.sanity import degenerate_labels
from edgemeta.daemon.stream_state import StreamState
from edgemeta.fsio import is_storage_error
from edgemeta.serve.predictor import run
from edgemeta.stream.buffers import Episode, SupportCollector
from edgemeta.stream.drift import DriftMonitor
from edgemeta.stream.regime import RegimeBuffer
from edgemeta.stream.trivial import TrivialCheck

log = logging.getLogger("edgemeta.daemon")

__all__ = ["Streams", "StreamState", "policy"]

# The settings a support collector is built from (a change rebuilds and reopens collections).
COLLECTOR_KEYS = ("adaptation.support_size", "adaptation.holdout_size", "adaptation.selection",
                  "adaptation.window")


def policy(settings: Settings) -> lc.Policy:
    a, g = settings.adaptation, settings.gate
    return lc.Policy(early_rows=g.early_rows or None, refine=tuple(a.refine), retries=a.retries,
                     adapt_on_start=a.adapt_on_start)


class Streams:
    def __init__(self, settings: Settings, bundle: BundleInfo, models: ServedModels,
                 adapter: AdapterClient, journal: Journal, metrics: Metrics,
                 degrade: Callable[[OSError, str], None]):
        self.settings = settings
        self.bundle = bundle
        self.kind = bundle.kind
        self.models = models
        self.adapter = adapter
        self.journal = journal
        self.metrics = metrics
        self.degrade = degrade
        self.states = {s.name: self._fresh(s.name) for s in settings.streams}
        self.jobs = JobTable()
        self.promotion = Promotion(models, metrics, journal, self.states, self._event,
                                   settings.adaptation.holdout_size)
        self.recall = Recall(settings, bundle, models, self.promotion, journal, metrics,
                             self._event, degrade)
        self._queue: deque[tuple[StreamState, lc.Event]] = deque()
        self.changed = True  # something ``status`` shows has changed

    def _parts(self, name: str) -> tuple[DriftMonitor, SupportCollector]:
        """A detector and a collector built from the settings in force."""
        d, a = self.settings.drift, self.settings.adaptation
        monitor = DriftMonitor(d.detector, self.kind, d.delta, d.feature_detector,
                               d.cooldown_samples, d.min_samples,
                               n_features=len(self.settings.stream(name).features))
        return monitor, SupportCollector(a.support_size, a.holdout_size, a.selection, a.window,
                                         self.bundle.classes or 0)

    def _regime(self) -> RegimeBuffer:
        c = self.settings.continual
        return RegimeBuffer(c.window, c.every, c.growth, min_holdout=self.settings.adaptation.holdout_size,
                            max_every=c.max_every)

    def _fresh(self, name: str) -> StreamState:
        return StreamState(name, self.models.lineage_of[name], *self._parts(name),
                           lc.Lifecycle(policy(self.settings)), self._regime(), self._trivial())

    def _trivial(self) -> TrivialCheck:
        return TrivialCheck(self.kind, self.bundle.outputs,
                            threshold=self.settings.drift.trivial_threshold)

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
            kept = f" with the {len(support[1])} rows given" if support is not None else ""
            return (f"stream {stream}: an episode is in flight; a manual collection{kept} "
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
        rebuilt: a detector keeps its baseline, a collection its rows and a regime its count
        unless their own settings changed; an open collection that is rebuilt is reopened."""
        self.settings = self.recall.settings = settings
        self.promotion.probation_rows = settings.adaptation.holdout_size
        detector = any(k.startswith("drift.") for k in changed)
        collector = any(k in COLLECTOR_KEYS for k in changed)
        regime = any(k.startswith("continual.") or k == "adaptation.holdout_size"
                     for k in changed)
        for name, state in self.states.items():
            monitor, fresh = self._parts(name)
            if detector:
                state.monitor = monitor
                state.trivial = self._trivial()
            if regime:
                old, state.regime = state.regime, self._regime()
                state.regime.restart(old.rows())
            state.machine.policy = policy(settings)
            if collector:
                state.collector = fresh
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
        if changed and state.drifts == drifts:
            # Probation saw the world change in these rows: a drift, called once the detector
            # has them too (its new baseline and the backfill are this batch's rows).
            self.alarm(state.name, "probation")
        if self.settings.continual.enabled and m.phase is lc.Phase.WATCHING and state.regime.due:
            self._event(state, lc.Due())
        self.changed = True

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
        for outcome in self.adapter.poll(wait=wait):
            job = self.jobs.answered(outcome.request_id)
            if job is None:
                continue  # superseded, or over already
            job.timings["adapt"] = time.perf_counter() - job.submitted_at
            state = self.states[job.stream]
            if outcome.ok:
                job.outcome = outcome
                fit = {"fit": {**outcome.info, "budget": job.fit["steps"]}} if job.fit else {}
                if outcome.info.get("budget_exhausted"):
                    self.metrics.fit_budget_exhausted.labels(state.name).inc()
                    log.warning("stream=%s: continued fit %d hit its time guard "
                                "(continual.max_seconds = %g) before its %d steps per start; "
                                "it keeps its best weights so far", state.name, job.job,
                                job.fit["max_seconds"], outcome.info.get("budget_steps", 0))
                job.figures.update(support_losses=outcome.losses, worker_seconds=outcome.seconds,
                                   **fit)
                self._event(state, lc.WeightsReady(job.job))
            else:
                job.figures["error"] = outcome.error
                self._event(state, lc.Finished(job.job, "timeout" if outcome.reason == "timeout"
                                               else "failed", outcome.reason or "error"))
        if self.adapter.ready:
            for job in self.jobs.held():
                self._submit(job)

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
            self._start(state, action.job)
        elif isinstance(action, lc.Fit):
            self._fit(state, action.job)
        elif isinstance(action, lc.Gate):
            self._gate(state, self.jobs.get(state.name, action.job), action.early)
        elif isinstance(action, lc.Record):
            self._record(state, action)

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
        elif action.reason is lc.Reason.MANUAL and state.pending_support:
            rows, state.pending_support = state.pending_support, []
        episode = state.collector.start(rows, support_size, holdout_size)
        if rows:
            log.info("stream=%s: %d labelled row(s) already seen seed the %s collection",
                     state.name, min(len(rows), state.collector.needed), action.reason.value)
        if episode is not None:
            state.completed = episode
            self._event(state, lc.Completed())

    def _fit(self, state: StreamState, job_id: int) -> None:
        """A continued fit: the regime's older rows to learn from, its newest to judge on; the
        fit may take ``continual.steps_per_row`` optimizer steps per labelled row since the
        last one (a count, so what is learned does not depend on the machine's load), with
        ``continual.max_seconds`` only as a guard."""
        c = self.settings.continual
        steps = math.ceil(c.steps_per_row * state.regime.since_fit)
        state.completed = state.regime.take()
        options = {"max_steps": c.max_steps, "lr": c.lr, "seed": job_id, "steps": steps,
                   "max_seconds": min(c.max_seconds, 0.75 * self.settings.adaptation.timeout_s)}
        self._start(state, job_id, fit=options)

    def _start(self, state: StreamState, job_id: int, fit: dict | None = None) -> None:
        episode, state.completed = state.completed, None
        job = self.jobs.add(Job(state.name, job_id, episode, time.perf_counter(), fit=fit))
        problem = degenerate_labels(self.kind, np.concatenate([episode.support_y,
                                                               episode.holdout_y]),
                                    np.asarray(state.history), self.bundle.target_range,
                                    holdout=episode.holdout_y)
        if problem is not None:
            # These rows are not a task: the regime goes on from the rows after them, so they
            # do not block every later candidate built on the honest rows that follow.
            log.warning("stream=%s: not adapting on these labels (%s); the regime restarts "
                        "after them", state.name, problem)
            state.regime.restart()
            self._event(state, lc.Finished(job_id, "rejected", problem))
            return
        if fit is None and state.machine.reason in (lc.Reason.DRIFT, lc.Reason.RETRY):
            self.recall.attempt(state, np.concatenate([episode.support_x, episode.holdout_x]),
                                np.concatenate([episode.support_y, episode.holdout_y]))
        self._submit(job)

    def _submit(self, job: Job) -> None:
        a = self.settings.adaptation
        current = a.start_from == "current" or job.fit is not None
        init = self.models.of(job.stream).weights if current else None
        rid = self.adapter.submit(job.episode.support_x, job.episode.support_y, a.steps, init,
                                  fit=job.fit)
        if rid is not None:
            self.jobs.sent(job, rid)
            log.info("adaptation requested stream=%s support=%d holdout=%d", job.stream,
                     len(job.episode.support_y), len(job.episode.holdout_y))
        elif time.perf_counter() - job.complete_at > self.adapter.start_timeout_s:
            self._event(self.states[job.stream], lc.Finished(job.job, "failed",
                                                             "worker_unavailable"))
        elif self.jobs.hold(job):
            # The worker is starting or restarting: hold the episode until it is ready (the
            # detector goes on watching meanwhile).
            log.info("adaptation waiting for the worker stream=%s", job.stream)
            self.changed = True

    def _gate(self, state: StreamState, job: Job, early: bool) -> None:
        if state.completed is not None:
            # The full holdout an inconclusive early gate waited for (the weights stay; so does
            # their support, whatever the collector would select now).
            done, state.completed = state.completed, None
            ep = job.episode
            job.figures["early_holdout_rows"] = job.looked = len(ep.holdout_y)
            job.episode = Episode(ep.support_x, ep.support_y,
                                  np.concatenate([ep.holdout_x, done.holdout_x]),
                                  np.concatenate([ep.holdout_y, done.holdout_y]))
            job.complete_at = time.perf_counter()
        served = self.models.of(state.name)
        ep = job.episode
        g = self.settings.gate
        early_alpha = split_alpha(g.alpha, g.early_rows)
        alpha = early_alpha if early else g.alpha
        holdout_x = self.bundle.normalize(ep.holdout_x)
        verdict = evaluate(self.kind, self.models.template, served.predictor.live,
                           job.outcome.weights, holdout_x, ep.holdout_y, alpha, g.min_gain, early,
                           load=lambda model: served.predictor.load(model, 0),
                           looked=0 if early else job.looked, early_alpha=early_alpha)
        job.timings.update(verdict.timings)
        if verdict.result == "inconclusive":
            log.info("stream=%s: early gate inconclusive (%.4g vs %.4g on %d rows); waiting for "
                     "a full holdout", state.name, verdict.current, verdict.candidate,
                     len(ep.holdout_y))
            self._event(state, lc.Finished(job.job, "inconclusive", verdict.reason))
            return
        if verdict.result == "failed":
            job.figures["error"] = verdict.error
            self._event(state, lc.Finished(job.job, "failed", verdict.reason))
            return
        self.metrics.holdout_current.labels(state.name).set(verdict.current)
        self.metrics.holdout_candidate.labels(state.name).set(verdict.candidate)
        job.figures.update(holdout_current=verdict.current, holdout_candidate=verdict.candidate,
                           p_value=verdict.p_value, alpha=alpha)
        if not verdict.accepted:
            self._event(state, lc.Finished(job.job, "rejected", verdict.reason))
            return
        level = float(per_sample_loss(self.kind, run(served.predictor.live, holdout_x),
                                      ep.holdout_y).mean())
        try:
            manifest = self.promotion.promote(
                state, verdict.model, verdict.live, job.outcome.weights,
                source=state.machine.reason.value, previous_level=level, timings=job.timings,
                holdout={"current": verdict.current, "candidate": verdict.candidate},
                support_size=len(ep.support_y))
        except OSError as exc:
            # The registry is untouched (a commit is all or nothing): keep serving, go degraded.
            if is_storage_error(exc):
                self.degrade(exc, "committing a new version")
            job.figures["error"] = str(exc)
            self._event(state, lc.Finished(job.job, "failed", "io_error"))
            return
        job.timings["total"] = time.perf_counter() - job.complete_at
        job.figures["version"] = manifest.version
        log.info("adaptation accepted stream=%s version=%d holdout %.4g -> %.4g in %.1f ms",
                 state.name, manifest.version, verdict.current, verdict.candidate,
                 job.timings["total"] * 1e3)
        self._event(state, lc.Finished(job.job, "accepted", verdict.reason, verdict.expected))

    def _record(self, state: StreamState, action: lc.Record) -> None:
        job = self.jobs.pop(state.name, action.job)
        self.metrics.adaptations.labels(state.name, action.result).inc()
        for stage, seconds in job.timings.items():
            if stage != "total":
                self.metrics.stage_duration.labels(stage).observe(seconds)
        ep = job.episode
        self.journal.record(state.name, action.reason.value, action.result, action.why,
                            self.models.version(state.name), (ep.support_x, ep.support_y),
                            (ep.holdout_x, ep.holdout_y), job.timings, job.figures)
        if action.result != "accepted":
            log.warning("adaptation %s stream=%s reason=%s version=%s", action.result,
                        state.name, action.why, self.models.version(state.name))

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
                          state.worse_than_trivial)
