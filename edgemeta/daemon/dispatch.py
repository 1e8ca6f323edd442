"""Episodes to the worker and its outcomes back: the lifecycle's ``Submit`` and ``Fit``.

Why apart from the routing of rows (``streams.py``): what a job carries (a few-shot support, or
a continued fit's rows and step budget), the labels' sanity check before any worker time is
spent, holding a job while the worker starts, and turning the worker's answers into lifecycle
events are one job, with one dependency the rest does not have: the worker.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable

import numpy as np

from edgemeta.bundle_format import BundleInfo
from edgemeta.config import Settings
from edgemeta.daemon import lifecycle as lc
from edgemeta.daemon.adapter import AdapterClient
from edgemeta.daemon.jobs import Job, JobTable
from edgemeta.daemon.metrics import Metrics
from edgemeta.daemon.models import ServedModels
from edgemeta.daemon.recall import Recall
from edgemeta.daemon.sanity import degenerate_labels
from edgemeta.daemon.stream_state import StreamState

log = logging.getLogger("edgemeta.daemon")


class Dispatch:
    """Sends the lifecycle's jobs to the worker and reports what came back as events.

    ``settings`` is replaced on a reload; ``event`` is the stream queue's entry point.
    """

    def __init__(self, settings: Settings, bundle: BundleInfo, models: ServedModels,
                 adapter: AdapterClient, jobs: JobTable, recall: Recall, metrics: Metrics,
                 states: dict[str, StreamState],
                 event: Callable[[StreamState, lc.Event], None]):
        self.settings = settings
        self.bundle = bundle
        self.models = models
        self.adapter = adapter
        self.jobs = jobs
        self.recall = recall
        self.metrics = metrics
        self.states = states
        self.event = event
        self.changed = False  # a job started waiting for the worker (status shows it)

    def fit(self, state: StreamState, job_id: int) -> None:
        """A continued fit: the regime's older rows to learn from, its newest to judge on; the
        fit may take ``continual.steps_per_row`` optimizer steps per labelled row since the
        last one (a count, so what is learned does not depend on the machine's load), with
        ``continual.max_seconds`` only as a guard."""
        c = self.settings.continual
        steps = math.ceil(c.steps_per_row * state.regime.since_fit)
        state.completed = state.regime.take()
        options = {"max_steps": c.max_steps, "lr": c.lr, "seed": job_id, "steps": steps,
                   "max_seconds": min(c.max_seconds, 0.75 * self.settings.adaptation.timeout_s)}
        self.start(state, job_id, fit=options)

    def start(self, state: StreamState, job_id: int, fit: dict | None = None) -> None:
        """The completed collection (or regime) as a job: checked, then sent or held."""
        episode, state.completed = state.completed, None
        job = self.jobs.add(Job(state.name, job_id, episode, time.perf_counter(), fit=fit))
        kind = self.bundle.kind
        problem = degenerate_labels(kind, np.concatenate([episode.support_y, episode.holdout_y]),
                                    np.asarray(state.history), self.bundle.target_range,
                                    holdout=episode.holdout_y)
        if problem is not None:
            # These rows are not a task: the regime goes on from the rows after them, so they
            # do not block every later candidate built on the honest rows that follow.
            log.warning("stream=%s: not adapting on these labels (%s); the regime restarts "
                        "after them", state.name, problem)
            state.regime.restart()
            self.event(state, lc.Finished(job_id, "rejected", problem))
            return
        if fit is None and state.machine.reason in (lc.Reason.DRIFT, lc.Reason.RETRY):
            self.recall.attempt(state, np.concatenate([episode.support_x, episode.holdout_x]),
                                np.concatenate([episode.support_y, episode.holdout_y]))
        self.submit(job)

    def submit(self, job: Job) -> None:
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
            self.event(self.states[job.stream], lc.Finished(job.job, "failed",
                                                            "worker_unavailable"))
        elif self.jobs.hold(job):
            # The worker is starting or restarting: hold the episode until it is ready (the
            # detector goes on watching meanwhile).
            log.info("adaptation waiting for the worker stream=%s", job.stream)
            self.changed = True

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
                self.event(state, lc.WeightsReady(job.job))
            else:
                job.figures["error"] = outcome.error
                self.event(state, lc.Finished(job.job, "timeout" if outcome.reason == "timeout"
                                              else "failed", outcome.reason or "error"))
        if self.adapter.ready:
            for job in self.jobs.held():
                self.submit(job)
