"""Per-stream learning: labelled rows feed the drift detector or the open collection, and the
lifecycle's actions are carried out (collections, worker jobs, the gate, promotion, records).

The decisions are the lifecycle's (``lifecycle.py``); this module only does what it is told and
reports back what happened, through one queue of (stream, event) pairs, so an action that causes
another event (a backfilled collection that is complete at once, a gate that accepts) is handled
after the actions of the event before it, never in the middle of them.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from edgemeta.bundle_format import BundleInfo
from edgemeta.config import Settings
from edgemeta.daemon import lifecycle as lc
from edgemeta.daemon.adapter import AdapterClient, AdaptOutcome
from edgemeta.daemon.gate import decide, evaluate, per_sample_loss, row_losses
from edgemeta.daemon.journal import Journal, StreamView
from edgemeta.daemon.memory import Concept, ConceptMemory, regime_stats
from edgemeta.daemon.metrics import Metrics
from edgemeta.daemon.models import Replaced, ServedModels
from edgemeta.daemon.sanity import Probation, degenerate_labels
from edgemeta.fsio import is_storage_error
from edgemeta.serve.predictor import run
from edgemeta.serve.registry import RegistryError
from edgemeta.stream.buffers import Episode, SupportCollector
from edgemeta.stream.drift import DriftMonitor
from edgemeta.stream.regime import RegimeBuffer

log = logging.getLogger("edgemeta.daemon")


@dataclass
class StreamState:
    name: str
    lineage: str
    monitor: DriftMonitor
    collector: SupportCollector
    machine: lc.Lifecycle
    regime: RegimeBuffer
    samples: int = 0
    drifts: int = 0  # detections so far (status shows them; so does the detections counter)
    last_loss: float | None = None
    drift_started: float | None = None
    # Labels seen while not collecting: the stream's recent history, against which a support
    # set's labels are checked for sanity.
    history: deque = field(default_factory=lambda: deque(maxlen=500))
    probation: Probation | None = None  # after a swap: the new version vs the one it replaced
    recalled: bool = False  # a remembered model was recalled since the last drift
    completed: Episode | None = None    # the collection that just completed, until submitted


@dataclass
class Job:
    """One episode on its way through the worker and the gate."""

    stream: str
    job: int
    episode: Episode
    complete_at: float
    submitted_at: float = 0.0
    outcome: AdaptOutcome | None = None
    fit: dict | None = None  # a continued fit's options (None: the few-shot inner loop)
    timings: dict[str, float] = field(default_factory=dict)
    figures: dict = field(default_factory=dict)


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
        self.memory = ConceptMemory(settings.memory.capacity)
        self._jobs: dict[tuple[str, int], Job] = {}
        self._requests: dict[int, tuple[str, int]] = {}  # worker request id -> job
        self._waiting: list[tuple[str, int]] = []        # jobs held until the worker is up
        self._queue: deque[tuple[StreamState, lc.Event]] = deque()
        self.changed = True  # something ``status`` shows has changed

    def _parts(self, name: str) -> tuple[DriftMonitor, SupportCollector]:
        """A detector and a collector built from the settings in force."""
        d, a = self.settings.drift, self.settings.adaptation
        monitor = DriftMonitor(d.detector, self.kind, d.delta, d.feature_detector,
                               d.cooldown_samples, d.min_samples,
                               n_features=len(self.settings.stream(name).features))
        return monitor, SupportCollector(a.support_size, a.holdout_size, a.selection, a.window)

    def _regime(self) -> RegimeBuffer:
        c = self.settings.continual
        return RegimeBuffer(c.window, c.every, c.growth, min_holdout=self.settings.adaptation.holdout_size,
                            max_every=c.max_every)

    def _fresh(self, name: str) -> StreamState:
        return StreamState(name, self.models.lineage_of[name], *self._parts(name),
                           lc.Lifecycle(policy(self.settings)), self._regime())

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

    def trigger(self, stream: str) -> int:
        """An operator's ``adapt``; returns how many labelled rows the collection needs."""
        state = self.states[stream]
        self._event(state, lc.Triggered())
        return state.collector.needed

    def rolled_back(self, lineage: str) -> None:
        for state in self.states.values():
            if state.lineage == lineage:
                state.probation = None
                self._event(state, lc.RolledBack())

    def reload(self, settings: Settings) -> None:
        """New settings: fresh detectors and collectors; open collections are reopened."""
        self.settings = settings
        for name, state in self.states.items():
            state.monitor, state.collector = self._parts(name)
            old, state.regime = state.regime, self._regime()
            state.regime.restart(old.rows())
            state.machine.policy = policy(settings)
            self._event(state, lc.Reloaded())

    def stopping(self) -> None:
        for state in self.states.values():
            self.journal.stop_following(state.name)  # keep what the episode has so far
            self._event(state, lc.Stopping())

    def learn(self, stream: str, x: np.ndarray, y: np.ndarray, losses: np.ndarray,
              judged: np.ndarray | None = None) -> None:
        """Labelled rows: feed the drift detector, or the collection while one is open.

        ``judged`` marks the rows whose prediction the serving version made: a late label for a
        prediction of an earlier version says nothing about the model serving now, so it may
        seed a support set but never feeds the detector.
        """
        state = self.states[stream]
        state.samples += len(y)
        state.last_loss = float(np.mean(losses))
        self.metrics.stream_loss.labels(stream).set(state.last_loss)
        if state.probation is not None:
            self._judge_probation(state, x, y, losses, judged)
        m = state.machine
        for i in range(len(y)):
            watched = m.watches and (judged is None or judged[i])
            if watched and state.monitor.update_error(losses[i], (x[i], y[i])):
                self.drift(state, state.monitor.detector)
                continue  # the row is in the backfill already
            state.regime.add(x[i], y[i])
            self.journal.labelled(stream, x[i], y[i])
            if m.collecting:
                episode = state.collector.offer(x[i], y[i])
                if episode is not None:
                    state.completed = episode
                    self._event(state, lc.Completed())
            else:
                state.history.append(float(y[i]))
        if self.settings.continual.enabled and m.phase is lc.Phase.WATCHING and state.regime.due:
            self._event(state, lc.Due())
        self.changed = True

    def unlabelled(self, stream: str, x_normalized: np.ndarray) -> None:
        """Rows without labels: only a feature detector can learn anything from them."""
        state = self.states[stream]
        for row in x_normalized:
            if state.monitor.update_features(row):
                self.drift(state, "feature")

    def drift(self, state: StreamState, detector: str) -> None:
        # A new regime: only the rows since the estimated change point describe it.
        backfill = detector != "feature" and self.settings.adaptation.backfill
        self.journal.stop_following(state.name)  # the rows from here on are another regime's
        self._remember(state)
        rows = state.monitor.rows_since_change() if backfill else []
        state.regime.restart(rows)
        state.recalled = False
        state.drifts += 1
        self.metrics.drift_detections.labels(state.name, detector).inc()
        log.warning("drift detected stream=%s detector=%s version=%d samples=%d", state.name,
                    detector, self.models.version(state.name), state.samples)
        self._event(state, lc.DriftDetected(backfill=detector != "feature"))
        if len(rows) >= self.settings.memory.min_rows:
            self._recall(state, np.asarray([r[0] for r in rows]), np.asarray([r[1] for r in rows]))

    def poll(self, wait: float = 0.0) -> None:
        """Take the worker's outcomes; send held episodes once it is up."""
        for outcome in self.adapter.poll(wait=wait):
            key = self._requests.pop(outcome.request_id, None)
            job = self._jobs.get(key) if key else None
            if job is None:
                continue
            job.timings["adapt"] = time.perf_counter() - job.submitted_at
            state = self.states[job.stream]
            if outcome.ok:
                job.outcome = outcome
                fit = {"fit": {**outcome.info, "budget_s": job.fit["max_seconds"]}} if job.fit else {}
                job.figures.update(support_losses=outcome.losses, worker_seconds=outcome.seconds,
                                   **fit)
                self._event(state, lc.WeightsReady(job.job))
            else:
                job.figures["error"] = outcome.error
                self._event(state, lc.Finished(job.job, "timeout" if outcome.reason == "timeout"
                                               else "failed", outcome.reason or "error"))
        if self._waiting:
            held, self._waiting = self._waiting, []
            for key in held:
                self._submit(self._jobs[key])

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
        elif isinstance(action, lc.ResetDetector):
            state.monitor.reset(cooldown=True, expected=action.expected)
        elif isinstance(action, lc.Submit):
            self._start(state, action.job)
        elif isinstance(action, lc.Fit):
            self._fit(state, action.job)
        elif isinstance(action, lc.Gate):
            self._gate(state, self._jobs[(state.name, action.job)], action.early)
        elif isinstance(action, lc.Record):
            self._record(state, action)

    def _open(self, state: StreamState, action: lc.Open) -> None:
        rows: list = []
        if action.seed == "backfill" and self.settings.adaptation.backfill:
            rows = state.monitor.rows_since_change()
        elif action.seed == "episode":
            ep = self._jobs[(state.name, state.machine.resumed)].episode
            rows = [*zip(ep.support_x, ep.support_y, strict=True),
                    *zip(ep.holdout_x, ep.holdout_y, strict=True)]
        episode = state.collector.start(rows, action.support_size, action.holdout_size)
        if rows:
            log.info("stream=%s: %d labelled row(s) already seen seed the %s collection",
                     state.name, min(len(rows), state.collector.needed), action.reason.value)
        if episode is not None:
            state.completed = episode
            self._event(state, lc.Completed())

    def _fit(self, state: StreamState, job_id: int) -> None:
        """A continued fit: the regime's older rows to learn from, its newest to judge on; the
        fit may spend ``continual.budget_ms_per_row`` per labelled row since the last one."""
        c = self.settings.continual
        budget = c.budget_ms_per_row * state.regime.since_fit / 1e3
        state.completed = state.regime.take()
        options = {"max_steps": c.max_steps, "lr": c.lr, "seed": job_id,
                   "max_seconds": min(budget, self.settings.adaptation.timeout_s / 2)}
        self._start(state, job_id, fit=options)

    def _start(self, state: StreamState, job_id: int, fit: dict | None = None) -> None:
        episode, state.completed = state.completed, None
        key = (state.name, job_id)
        job = self._jobs.get(key)
        now = time.perf_counter()
        if job is None:
            job = self._jobs[key] = Job(state.name, job_id, episode, now, fit=fit)
        else:  # the early gate was inconclusive: the same episode with its full holdout
            job.episode, job.outcome = episode, None
        if fit is None and state.machine.reason in (lc.Reason.DRIFT, lc.Reason.RETRY):
            self._recall(state, np.concatenate([episode.support_x, episode.holdout_x]),
                         np.concatenate([episode.support_y, episode.holdout_y]))
        problem = degenerate_labels(self.kind, np.concatenate([episode.support_y,
                                                               episode.holdout_y]),
                                    np.asarray(state.history), self.bundle.target_range,
                                    holdout=episode.holdout_y)
        if problem is not None:
            log.warning("stream=%s: not adapting on these labels (%s)", state.name, problem)
            self._event(state, lc.Finished(job_id, "rejected", problem))
            return
        self._submit(job)

    # -- concept memory ----------------------------------------------------------------------------
    def _remember(self, state: StreamState) -> None:
        """The regime that just ended was served by this model: keep it for when it recurs."""
        served = self.models.of(state.name)
        if self.memory.capacity <= 0 or served.bare or (state.lineage, served.version) in self.memory:
            return
        try:
            model, _ = self.models.registry.load(served.version)
        except (RegistryError, OSError) as exc:
            log.warning("stream=%s: cannot remember v%d: %s", state.name, served.version, exc)
            return
        self.memory.remember(state.lineage, Concept(served.version, model, served.predictor.live,
                                                    dict(served.weights),
                                                    regime_stats(state.regime.rows())))

    def _recall(self, state: StreamState, x: np.ndarray, y: np.ndarray) -> None:
        """Serve the remembered model that the rows since the change point prefer, when the
        paired test says it beats the serving one."""
        concepts = self.memory.concepts(state.lineage)
        served = self.models.of(state.name)
        if state.recalled or not concepts:
            return
        xn = self.bundle.normalize(x)
        current = row_losses(self.kind, run(served.predictor.live, xn), y)
        scored = []
        for concept in concepts:
            if concept.version != served.version:
                out = run(concept.live, xn)
                scored.append((row_losses(self.kind, out, y), out, concept))
        if not scored:
            return
        rows, out, best = min(scored, key=lambda item: float(np.mean(item[0])))
        g = self.settings.gate
        decision = decide(current, rows, g.alpha, g.min_gain)
        if not decision.accepted:
            return
        expected = float(per_sample_loss(self.kind, out, y).mean())
        try:
            manifest, replaced = self.models.promote(
                state.name, best.model, best.live, best.weights, source="recall",
                holdout={"current": decision.current, "candidate": decision.candidate},
                note=f"recalled v{best.version}, fitted on an earlier regime {best.regime}")
        except OSError as exc:
            if is_storage_error(exc):
                self.degrade(exc, "committing a recalled version")
            return
        state.recalled = True
        self.memory.used(state.lineage, best.version)
        state.probation = Probation(self.settings.adaptation.holdout_size, replaced,
                                    replaced.version, manifest.version)
        self.metrics.recalls.labels(state.name).inc()
        # Recorded like an episode: the rows since the change point were its holdout.
        self.journal.record(state.name, "recall", "accepted", f"recalled_v{best.version}",
                            manifest.version, (x[:0], y[:0]), (x, y), {},
                            {"holdout_current": decision.current, "version": manifest.version,
                             "holdout_candidate": decision.candidate, "p_value": decision.p_value,
                             "recalled_version": best.version, "regime": best.regime})
        log.warning("stream=%s: recalled v%d (fitted on an earlier regime) as v%d: %.4g -> %.4g "
                    "on %d rows since the change", state.name, best.version, manifest.version,
                    decision.current, decision.candidate, len(y))
        self._event(state, lc.Recalled(expected))

    def _submit(self, job: Job) -> None:
        a = self.settings.adaptation
        current = a.start_from == "current" or job.fit is not None
        init = self.models.of(job.stream).weights if current else None
        rid = self.adapter.submit(job.episode.support_x, job.episode.support_y, a.steps, init,
                                  fit=job.fit)
        key = (job.stream, job.job)
        if rid is not None:
            job.submitted_at = time.perf_counter()
            self._requests[rid] = key
            log.info("adaptation requested stream=%s support=%d holdout=%d", job.stream,
                     len(job.episode.support_y), len(job.episode.holdout_y))
        elif time.perf_counter() - job.complete_at > self.adapter.start_timeout_s:
            self._event(self.states[job.stream], lc.Finished(job.job, "failed",
                                                             "worker_unavailable"))
        else:
            # The worker is starting or restarting: hold the episode until it is ready.
            if key not in self._waiting:
                self._waiting.append(key)
                log.info("adaptation waiting for the worker stream=%s", job.stream)

    def _gate(self, state: StreamState, job: Job, early: bool) -> None:
        served = self.models.of(state.name)
        ep = job.episode
        verdict = evaluate(self.kind, self.models.template, served.predictor.live,
                           job.outcome.weights, self.bundle.normalize(ep.holdout_x), ep.holdout_y,
                           self.settings.gate.alpha, self.settings.gate.min_gain, early,
                           load=lambda model: served.predictor.load(model, 0))
        job.timings.update(verdict.timings)
        if verdict.result == "inconclusive":
            log.info("stream=%s: early gate inconclusive (%.4g vs %.4g on %d rows); waiting for "
                     "the full holdout", state.name, verdict.current, verdict.candidate,
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
                           p_value=verdict.p_value)
        if not verdict.accepted:
            self._event(state, lc.Finished(job.job, "rejected", verdict.reason))
            return
        try:
            self._promote(state, job, verdict)
        except OSError as exc:
            # The registry is untouched (a commit is all or nothing): keep serving, go degraded.
            if is_storage_error(exc):
                self.degrade(exc, "committing a new version")
            job.figures["error"] = str(exc)
            self._event(state, lc.Finished(job.job, "failed", "io_error"))
            return
        self._event(state, lc.Finished(job.job, "accepted", verdict.reason, verdict.expected))

    def _promote(self, state: StreamState, job: Job, verdict) -> None:
        manifest, replaced = self.models.promote(
            state.name, verdict.model, verdict.live, job.outcome.weights,
            source=state.machine.reason.value, timings=job.timings,
            holdout={"current": verdict.current, "candidate": verdict.candidate},
            support_size=len(job.episode.support_y))
        job.timings["total"] = time.perf_counter() - job.complete_at
        job.figures["version"] = manifest.version
        state.probation = Probation(self.settings.adaptation.holdout_size, replaced,
                                    replaced.version, manifest.version)
        for other in self.states.values():
            if other is not state and other.lineage == state.lineage:
                other.probation = None
                self._event(other, lc.Swapped())  # the model it is served by changed
        log.info("adaptation accepted stream=%s version=%d holdout %.4g -> %.4g in %.1f ms",
                 state.name, manifest.version, verdict.current, verdict.candidate,
                 job.timings["total"] * 1e3)

    def _record(self, state: StreamState, action: lc.Record) -> None:
        job = self._jobs.pop((state.name, action.job))
        self._waiting = [k for k in self._waiting if k != (state.name, action.job)]
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

    # -- probation ---------------------------------------------------------------------------------
    def _judge_probation(self, state: StreamState, x: np.ndarray, y: np.ndarray,
                         losses: np.ndarray, judged: np.ndarray | None) -> None:
        """Score the rows the new version served with the version it replaced as well; roll
        back at once when they show it worse."""
        probation = state.probation
        if self.models.version(state.name) != probation.new_version:
            state.probation = None  # another swap (or a rollback) has replaced it already
            return
        mask = np.ones(len(x), bool) if judged is None else np.asarray(judged, bool)
        if not mask.any():
            return
        old = run(probation.previous.live, self.bundle.normalize(x[mask]))
        probation.add(losses[mask], per_sample_loss(self.kind, old, np.asarray(y)[mask]))
        verdict = probation.verdict()
        if verdict is not None:
            state.probation = None
        if verdict == "worse":
            self._auto_rollback(state, probation)

    def _auto_rollback(self, state: StreamState, probation: Probation) -> None:
        fig = probation.figures()
        note = (f"automatic rollback: v{probation.new_version} was worse than "
                f"v{probation.previous_version} on the next {fig['rows']} labelled rows of stream "
                f"{state.name} (mean loss {fig['new_loss']:.4g} vs {fig['old_loss']:.4g})")
        previous: Replaced = probation.previous
        try:
            manifest = self.models.rollback(state.lineage, to=previous.version, note=note,
                                            replaced=previous)
        except (RegistryError, OSError) as exc:
            log.error("automatic rollback to v%s failed: %s", previous.version, exc)
            return
        self.metrics.rollbacks.labels(state.name).inc()
        log.warning("%s: now serving v%d", note, manifest.version)
        self.journal.note({"stream": state.name, "trigger": "rollback", "result": "rolled_back",
                           "reason": "worse_after_swap", "serving_version": manifest.version,
                           **fig})
        self.rolled_back(state.lineage)

    # -- status ------------------------------------------------------------------------------------
    def view(self, name: str) -> StreamView:
        state, served = self.states[name], self.models.of(name)
        m = state.machine
        return StreamView(served.version, served.manifest.source, served.predictor.provider,
                          m.phase.value, m.reason.value if m.reason else None, m.unresolved,
                          state.drift_started, state.drifts, state.samples, state.last_loss,
                          state.collector.collected if m.collecting else 0,
                          state.collector.needed if m.collecting else 0, served.bare)
