"""The lifecycle's ``Gate`` and ``Record``: a candidate judged on its holdout, and an episode's
outcome counted and journaled.

Why apart from the routing of rows (``streams.py``): the gate is where a candidate meets the
serving model (one ONNX session each, the two looks sharing ``gate.alpha``) and, when it wins,
hands it to ``promotion.py``; recording the outcome is the other end of the same job.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import numpy as np

from edgemeta.bundle_format import BundleInfo
from edgemeta.config import Settings
from edgemeta.daemon import lifecycle as lc
from edgemeta.daemon.gate import evaluate, per_sample_loss, split_alpha
from edgemeta.daemon.jobs import Job, JobTable
from edgemeta.daemon.journal import Journal
from edgemeta.daemon.metrics import Metrics
from edgemeta.daemon.models import ServedModels
from edgemeta.daemon.promotion import Promotion
from edgemeta.daemon.stream_state import StreamState
from edgemeta.fsio import is_storage_error
from edgemeta.serve.heap import trim
from edgemeta.serve.predictor import run
from edgemeta.stream.buffers import Episode

log = logging.getLogger("edgemeta.daemon")


class Judge:
    """Judges the worker's weights against the serving model and records every outcome.

    ``settings`` is replaced on a reload; ``event`` is the stream queue's entry point;
    ``degrade`` is told when committing a version hits a storage error.
    """

    def __init__(self, settings: Settings, bundle: BundleInfo, models: ServedModels,
                 jobs: JobTable, promotion: Promotion, journal: Journal, metrics: Metrics,
                 event: Callable[[StreamState, lc.Event], None],
                 degrade: Callable[[OSError, str], None]):
        self.settings = settings
        self.bundle = bundle
        self.models = models
        self.jobs = jobs
        self.promotion = promotion
        self.journal = journal
        self.metrics = metrics
        self.event = event
        self.degrade = degrade

    def gate(self, state: StreamState, job: Job, early: bool) -> None:
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
        kind = self.bundle.kind
        served = self.models.of(state.name)
        ep = job.episode
        g = self.settings.gate
        early_alpha = split_alpha(g.alpha, g.early_rows)
        alpha = early_alpha if early else g.alpha
        holdout_x = self.bundle.normalize(ep.holdout_x)
        verdict = evaluate(kind, self.models.template, served.predictor.live,
                           job.outcome.weights, holdout_x, ep.holdout_y, alpha, g.min_gain, early,
                           load=lambda model: served.predictor.load(model, 0),
                           looked=0 if early else job.looked, early_alpha=early_alpha)
        job.timings.update(verdict.timings)
        if verdict.result == "inconclusive":
            log.info("stream=%s: early gate inconclusive (%.4g vs %.4g on %d rows); waiting for "
                     "a full holdout", state.name, verdict.current, verdict.candidate,
                     len(ep.holdout_y))
            self.event(state, lc.Finished(job.job, "inconclusive", verdict.reason))
            return
        if verdict.result == "failed":
            job.figures["error"] = verdict.error
            self.event(state, lc.Finished(job.job, "failed", verdict.reason))
            return
        self.metrics.holdout_current.labels(state.name).set(verdict.current)
        self.metrics.holdout_candidate.labels(state.name).set(verdict.candidate)
        job.figures.update(holdout_current=verdict.current, holdout_candidate=verdict.candidate,
                           p_value=verdict.p_value, alpha=alpha)
        if not verdict.accepted:
            self.event(state, lc.Finished(job.job, "rejected", verdict.reason))
            return
        level = float(per_sample_loss(kind, run(served.predictor.live, holdout_x),
                                      ep.holdout_y).mean())
        try:
            manifest = self.promotion.promote(
                state.name, verdict.model, verdict.live, job.outcome.weights,
                source=state.machine.reason.value, previous_level=level, timings=job.timings,
                holdout={"current": verdict.current, "candidate": verdict.candidate},
                support_size=len(ep.support_y))
        except OSError as exc:
            # The registry is untouched (a commit is all or nothing): keep serving, go degraded.
            if is_storage_error(exc):
                self.degrade(exc, "committing a new version")
            job.figures["error"] = str(exc)
            self.event(state, lc.Finished(job.job, "failed", "io_error"))
            return
        job.timings["total"] = time.perf_counter() - job.complete_at
        job.figures["version"] = manifest.version
        log.info("adaptation accepted stream=%s version=%d holdout %.4g -> %.4g in %.1f ms",
                 state.name, manifest.version, verdict.current, verdict.candidate,
                 job.timings["total"] * 1e3)
        self.event(state, lc.Finished(job.job, "accepted", verdict.reason, verdict.expected))

    def record(self, state: StreamState, action: lc.Record) -> None:
        job = self.jobs.pop(state.name, action.job)
        self.metrics.adaptations.labels(state.name, action.result, action.reason.value).inc()
        for stage, seconds in job.timings.items():
            if stage != "total":
                self.metrics.stage_duration.labels(stage).observe(seconds)
        ep = job.episode
        self.journal.record(state.name, action.reason.value, action.result, action.why,
                            self.models.version(state.name), (ep.support_x, ep.support_y),
                            (ep.holdout_x, ep.holdout_y), job.timings, job.figures)
        if action.result != "accepted":
            # A continued fit or a refinement that is not better is routine, not a warning.
            routine = action.result == "rejected" and action.reason in (lc.Reason.CONTINUAL,
                                                                        lc.Reason.REFINE)
            log.log(logging.INFO if routine else logging.WARNING,
                    "adaptation %s stream=%s source=%s reason=%s version=%s", action.result,
                    state.name, action.reason.value, action.why, self.models.version(state.name))
        job = None  # the candidate's session goes with it: hand its pages back (serve/heap.py)
        trim()
