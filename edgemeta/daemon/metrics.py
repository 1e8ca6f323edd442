"""Prometheus metrics on the daemon's own registry (tests build their own, nothing is global).

Naming follows Prometheus conventions: ``edgemeta_`` prefix, base units, ``_total`` counters, few
bounded labels (stream, detector, result, reason, stage).
"""

from __future__ import annotations

import platform

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

from edgemeta import __version__

# The *_created series double the scrape for no operational use; Prometheus does not need them.
disable_created_metrics()

LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                   1.0)
DEGRADED_REASONS = ("disk_full", "io_error")
STAGE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

#: The stages of an adaptation, in order, as timed in each episode's ``timings_ms``.
STAGES = ("adapt", "patch", "gate", "commit", "swap")
# Why an episode opened (lifecycle.Reason): continued fits and refinements are rejected often by
# design, so alerts count only the sources whose rejection means something (drift, retry, manual).
SOURCES = ("initial", "drift", "retry", "refine", "continual", "manual")


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        r = self.registry = registry if registry is not None else CollectorRegistry()
        self.build_info = Gauge("edgemeta_build_info", "edgemeta build; always 1",
                                ["version", "python"], registry=r)
        self.build_info.labels(__version__, platform.python_version()).set(1)
        self.samples = Counter("edgemeta_samples_total", "Rows ingested", ["stream"], registry=r)
        self.predictions = Counter("edgemeta_predictions_total", "Predictions written", ["stream"],
                                   registry=r)
        self.labels = Counter("edgemeta_labels_total", "Labels received, by join result",
                              ["stream", "result"], registry=r)
        self.files = Counter("edgemeta_files_total", "Input files handled, by result",
                             ["stream", "result"], registry=r)
        self.quarantined = Counter("edgemeta_quarantined_files_total",
                                   "Input files moved to quarantine", ["stream", "reason"], registry=r)
        self.inference_latency = Histogram("edgemeta_inference_latency_seconds",
                                           "ONNX Runtime call duration per input batch", ["stream"],
                                           buckets=LATENCY_BUCKETS, registry=r)
        self.stream_loss = Gauge("edgemeta_stream_loss", "Mean per-sample loss of the serving "
                                 "model over the last labelled file or label batch", ["stream"],
                                 registry=r)
        self.drift_detections = Counter("edgemeta_drift_detections_total", "Drift detections",
                                        ["stream", "detector"], registry=r)
        self.drift_active = Gauge("edgemeta_drift_active", "1 while a detected drift awaits an "
                                  "accepted adaptation", ["stream"], registry=r)
        self.adaptations = Counter("edgemeta_adaptations_total", "Adaptation episodes by outcome "
                                   "(superseded: a drift came while it was open) and source "
                                   "(why the episode opened: initial, drift, retry, refine, "
                                   "continual, manual)", ["stream", "result", "source"],
                                   registry=r)
        self.portfolio_weight = Gauge("edgemeta_portfolio_weight", "Weight of each member of a "
                                      "stream's portfolio in the served mixture (onnx: the adapted "
                                      "model)", ["stream", "expert"], registry=r)
        self.portfolio_loss = Gauge("edgemeta_portfolio_loss", "Recent loss of each portfolio "
                                    "member: normalized squared error (1: as good as the labels' "
                                    "mean), or error rate for classifiers",
                                    ["stream", "expert"], registry=r)
        self.portfolio_champion = Gauge("edgemeta_portfolio_champion", "1 for the portfolio member "
                                        "with the most weight in a stream's mixture, 0 for the "
                                        "others", ["stream", "expert"], registry=r)
        self.portfolio_dropped = Counter("edgemeta_portfolio_dropped_total", "Experts dropped "
                                         "from a portfolio for non-finite or exploding "
                                         "predictions", ["stream", "expert"], registry=r)
        self.reloads = Counter("edgemeta_reloads_total", "Config reloads: applied, or refused "
                               "(the running config stays)", ["result"], registry=r)
        self.drift_restarts = Counter("edgemeta_drift_restarts_total", "Drift collections "
                                      "restarted from a new change point by a further drift",
                                      ["stream"], registry=r)
        self.fit_budget_exhausted = Counter(
            "edgemeta_fit_budget_exhausted_total", "Continued fits stopped by their time guard "
            "(continual.max_seconds) before their step budget: the machine is too slow for it",
            ["stream"], registry=r)
        self.recalls = Counter("edgemeta_recalls_total", "Models of earlier regimes served again "
                               "after a drift (concept memory)", ["stream"], registry=r)
        self.stage_duration = Histogram("edgemeta_adaptation_stage_duration_seconds",
                                        "Adaptation duration by stage", ["stage"],
                                        buckets=STAGE_BUCKETS, registry=r)
        self.holdout_current = Gauge("edgemeta_holdout_loss_current",
                                     "Holdout loss of the serving model at the last gate", ["stream"],
                                     registry=r)
        self.holdout_candidate = Gauge("edgemeta_holdout_loss_candidate",
                                       "Holdout loss of the last candidate", ["stream"], registry=r)
        self.model_version = Gauge("edgemeta_model_version", "Version serving this stream",
                                   ["stream"], registry=r)
        self.model_created = Gauge("edgemeta_model_created_timestamp_seconds",
                                   "Creation time of the version serving this stream", ["stream"],
                                   registry=r)
        self.model_info = Gauge("edgemeta_model_info", "The version serving this stream; always 1",
                                ["stream", "source", "provider"], registry=r)
        self._info: dict[str, tuple[str, str, str]] = {}
        self.meta_init = Gauge("edgemeta_serving_meta_init", "1 while this stream is served by the "
                               "bundle's bare meta-initialization (never adapted to this device)",
                               ["stream"], registry=r)
        self.triggers = Counter("edgemeta_trigger_files_total", "Trigger files by result",
                                ["result", "reason"], registry=r)
        self.worker_restarts = Counter("edgemeta_worker_restarts_total",
                                       "Adapter worker restarts", registry=r)
        self.worker_up = Gauge("edgemeta_worker_up", "1 when the adapter worker is ready",
                               registry=r)
        self.model_load_failures = Counter("edgemeta_model_load_failures_total",
                                           "Model versions refused at load", registry=r)
        self.rows_refused = Counter("edgemeta_rows_refused_total", "Rows of an accepted file "
                                    "that were not used (non-finite feature, invalid label)",
                                    ["stream", "reason"], registry=r)
        self.degraded = Gauge("edgemeta_degraded", "1 while the daemon runs degraded (ingest "
                              "paused) for this reason", ["reason"], registry=r)
        self.internal_errors = Counter("edgemeta_internal_errors_total", "Unexpected errors "
                                       "contained by the daemon, by where they happened",
                                       ["where"], registry=r)
        self.rollbacks = Counter("edgemeta_rollbacks_total", "Automatic rollbacks of a swapped "
                                 "version that the next labelled rows showed worse", ["stream"],
                                 registry=r)

    def init_streams(self, streams, detector: str, feature_detector: str) -> None:
        """Create every labelled series at 0, so ``increase()`` in alerts sees the first event."""
        from edgemeta.stream.parsing import REASONS, ROW_REASONS

        for reason in DEGRADED_REASONS:
            self.degraded.labels(reason).set(0)
        for result in ("applied", "refused"):
            self.reloads.labels(result)
        for where in ("ingest", "trigger", "loop", "adaptation"):
            self.internal_errors.labels(where)
        for stream in streams:
            self.rollbacks.labels(stream)
            for reason in ROW_REASONS:
                self.rows_refused.labels(stream, reason)
            self.samples.labels(stream)
            self.predictions.labels(stream)
            for result in ("inline", "matched", "unknown", "refused"):
                self.labels.labels(stream, result)
            for result in ("processed", "quarantined"):
                self.files.labels(stream, result)
            for reason in REASONS:
                self.quarantined.labels(stream, reason)
            # "trivial": the serving model was worse than a constant (stream/trivial.py)
            for det in {detector, "trivial"} | ({"feature"} if feature_detector != "none" else set()):
                self.drift_detections.labels(stream, det)
            self.drift_active.labels(stream).set(0)
            for result in ("accepted", "rejected", "failed", "timeout", "superseded"):
                for source in SOURCES:
                    self.adaptations.labels(stream, result, source)
            self.drift_restarts.labels(stream)
            self.fit_budget_exhausted.labels(stream)
            self.recalls.labels(stream)
            # NaN until the first gate: "no figure yet", not a loss of 0.
            self.holdout_current.labels(stream).set(float("nan"))
            self.holdout_candidate.labels(stream).set(float("nan"))
        for stage in STAGES:
            self.stage_duration.labels(stage)
        from edgemeta.daemon.triggers import REASONS as TRIGGER_REASONS

        for result, reason in (("ok", ""), ("failed", "error"), ("failed", "internal_error"),
                               *(("rejected", r) for r in TRIGGER_REASONS)):
            self.triggers.labels(result, reason)

    def set_model(self, stream: str, version: int, created: float, source: str,
                  provider: str) -> None:
        self.model_version.labels(stream).set(version)
        self.model_created.labels(stream).set(created)
        previous = self._info.pop(stream, None)
        if previous is not None:
            self.model_info.remove(*previous)
        self._info[stream] = (stream, source, provider)
        self.model_info.labels(stream, source, provider).set(1)


def serve_http(metrics: Metrics, address: str, port: int):
    """Start the /metrics endpoint; returns the server so it can be shut down."""
    from prometheus_client import start_http_server

    server, _thread = start_http_server(port, addr=address, registry=metrics.registry)
    return server
