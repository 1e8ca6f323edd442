"""Wires the rooms together and runs the control loop of ``edgemeta run``.

One thread acts: the control loop. Everything else only enqueues: signal handlers (SIGHUP reload,
SIGTERM/SIGINT stop), the watchdog observer (file events) and the adapter client's reader thread.
This keeps the daemon predictable: no handler ever touches the predictor, the registry or a file.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import queue
import signal
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgemeta.config import ConfigError, Settings, load_config
from edgemeta.daemon.adapter import AdapterClient, AdaptOutcome
from edgemeta.daemon.gate import GateDecision, clear_win, decide, holdout_loss, per_sample_loss
from edgemeta.daemon.metrics import Metrics, serve_http
from edgemeta.daemon.systemd import Notifier
from edgemeta.daemon.triggers import TriggerRejected, finish, parse_trigger, pending
from edgemeta.serve.onnx_weights import OnnxTemplate, WeightPatchError
from edgemeta.serve.predictor import Predictor, PredictorError
from edgemeta.serve.registry import Registry, RegistryError, atomic_write
from edgemeta.stream.buffers import Episode, SupportCollector
from edgemeta.stream.drift import DriftMonitor
from edgemeta.stream.ingest import (
    InboxWatcher,
    IngestError,
    LabelCache,
    PendingFiles,
    StateLayout,
    is_label_file,
    parse_labels,
    parse_rows,
)

log = logging.getLogger("edgemeta.daemon")
LR_PREFIX = "metasgd_lr."


class StartupError(RuntimeError):
    """The daemon cannot start serving; the message says what to fix."""


def bundle_parameter_names(bundle: Path) -> list[str]:
    """Network parameter names from the safetensors header (no torch, nothing unpickled)."""
    from safetensors import safe_open

    with safe_open(str(bundle / "weights.safetensors"), framework="np") as fh:
        return [k for k in fh.keys() if not k.startswith(LR_PREFIX)]  # noqa: SIM118


@dataclass
class StreamState:
    name: str
    monitor: DriftMonitor
    collector: SupportCollector
    samples: int = 0
    last_loss: float | None = None
    drift_started: float | None = None
    trigger: str | None = None  # "initial", "drift" or "manual": why the collection started
    drifts: int = 0  # drift detections so far (the stream benchmark reads it)
    retries: int = 0  # collections re-opened for the current drift after a failed episode
    refine_stage: int = 0  # index into adaptation.refine of the refinement being collected
    fit_level: float | None = None  # holdout loss of the best model accepted since the last drift
    early: bool = False  # the open collection's holdout is the early gate's few rows


@dataclass
class InFlight:
    stream: str
    episode: Episode
    source: str
    complete_at: float
    submitted_at: float
    early: bool = False  # gated first on gate.early_rows holdout rows
    timings: dict[str, float] = field(default_factory=dict)


class Daemon:
    def __init__(self, settings: Settings, metrics: Metrics | None = None,
                 notifier: Notifier | None = None):
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.notifier = notifier or Notifier()
        self.events: queue.Queue = queue.Queue()
        self.layout = StateLayout(settings.state_dir)
        self.episodes: deque[dict[str, Any]] = deque(maxlen=20)
        self.in_flight: dict[int, InFlight] = {}
        self.waiting: list[InFlight] = []
        self._stopping = False
        self._status_dirty = True
        self._last_rescan = 0.0
        self._last_trigger_scan = 0.0
        self._last_status = 0.0
        self._http = None
        self._worker_ready: bool | None = None
        self.watcher: InboxWatcher | None = None

    # -- start-up --------------------------------------------------------------------------------
    def setup(self) -> None:
        s = self.settings
        meta_path = s.bundle / "bundle.json"
        try:
            self.bundle_meta = json.loads(meta_path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise StartupError(f"bundle.path: cannot read {meta_path}: {exc}") from exc
        self.kind = self.bundle_meta["task"]["kind"]
        features = int(self.bundle_meta["input"]["features"])
        for i, stream in enumerate(s.streams):
            if len(stream.features) != features:
                raise StartupError(f"streams[{i}].features: {len(stream.features)} columns, the "
                                   f"bundle expects {features}")
        norm = self.bundle_meta["input"].get("normalization") or {}
        self._mean = np.asarray(norm.get("mean", 0.0), dtype=np.float32)
        self._std = np.asarray(norm.get("std", 1.0), dtype=np.float32)
        self.layout.ensure(st.name for st in s.streams)
        (s.state_dir / "episodes").mkdir(parents=True, exist_ok=True)
        triggers = s.state_dir / "triggers"
        triggers.mkdir(parents=True, exist_ok=True)
        # setgid + group-writable: operators in the daemon's group can drop trigger files.
        os.chmod(triggers, 0o2770)
        self.template = OnnxTemplate((s.bundle / "model.onnx").read_bytes(),
                                     bundle_parameter_names(s.bundle))
        self.registry = Registry(s.state_dir, keep=s.retention.keep_models)
        try:
            self.registry.init_from_bundle(s.bundle)
        except (RegistryError, OSError) as exc:
            raise StartupError(f"bundle.path: {exc}") from exc
        self.predictor = Predictor(s.serving.providers or None, s.serving.intra_op_threads)
        self.load_current()
        self.cache = LabelCache(s.ingest.label_cache)
        self.pending = PendingFiles(s.ingest.settle_s)
        self.streams = {st.name: self._stream_state(st.name) for st in s.streams}
        self.metrics.init_streams(self.streams, s.drift.detector, s.drift.feature_detector)
        if s.adaptation.adapt_on_start and self.current_manifest.source == "meta-init":
            # A meta-initialization is a starting point, not a model: adapt it to what this device
            # sees as soon as K+H labelled rows arrive, rather than waiting for a drift.
            for state in self.streams.values():
                self.begin_collection(state, "initial", holdout_size=self._early_rows())
        self.adapter = AdapterClient(s.bundle, s.adaptation.device, s.adaptation.timeout_s,
                                     on_restart=self.metrics.worker_restarts.inc)
        self.adapter.start()
        if s.metrics.enabled:
            self._http = serve_http(self.metrics, s.metrics.address, s.metrics.port)
            log.info("metrics on http://%s:%d/metrics", s.metrics.address, s.metrics.port)
        self.watcher = InboxWatcher(self.layout, self.streams, self.events)
        self.watcher.start()
        self.rescan()

    def _stream_state(self, name: str) -> StreamState:
        d, a = self.settings.drift, self.settings.adaptation
        monitor = DriftMonitor(d.detector, self.kind, d.delta, d.feature_detector,
                               d.cooldown_samples, d.min_samples,
                               n_features=len(self.settings.stream(name).features))
        return StreamState(name, monitor, SupportCollector(a.support_size, a.holdout_size,
                                                           a.selection, a.window))

    def load_current(self) -> None:
        """Serve what the registry says, falling back version by version past broken ones."""
        data, manifest, problems = self.registry.load_serving()
        for problem in problems:
            log.error("model refused: %s", problem)
            self.metrics.model_load_failures.inc()
        while True:
            try:
                live = self.predictor.swap(data, manifest.version)
                break
            except PredictorError as exc:
                log.error("model refused: %s", exc)
                self.metrics.model_load_failures.inc()
                older = [v for v in self.registry.versions() if v < manifest.version]
                if not older:
                    raise StartupError(f"no model version loads: {exc}") from exc
                data, manifest = self.registry.load(older[-1])
                self.registry.activate(manifest.version)
        self.current_weights = OnnxTemplate(data, self.template.parameter_names).weights()
        self.current_manifest = manifest
        self.metrics.set_model(manifest.version, manifest.created, manifest.source, live.provider)
        log.info("serving version=%d source=%s provider=%s", manifest.version, manifest.source,
                 live.provider)
        self._status_dirty = True

    # -- the loop --------------------------------------------------------------------------------
    def install_signal_handlers(self) -> None:
        for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda signum, _frame: self.events.put(("signal", signum)))

    def run(self) -> int:
        self.setup()
        self.notifier.ready(self.summary())
        log.info("ready: %s", self.summary())
        while not self._stopping:
            self.step()
        return self.shutdown()

    def step(self, wait: float = 0.05) -> None:
        """One turn of the control loop (tests and the benchmark call it directly)."""
        try:
            item = self.events.get(timeout=wait)
        except queue.Empty:
            item = None
        while item is not None:
            self._dispatch(item)
            try:
                item = self.events.get_nowait()
            except queue.Empty:
                item = None
        now = time.monotonic()
        for stream, path in self.pending.ready(now):
            self.handle_file(stream, path)
        if now - self._last_rescan >= self.settings.ingest.rescan_interval_s:
            self.rescan()
        if now - self._last_trigger_scan >= 0.25:
            self._last_trigger_scan = now
            self.handle_triggers()
        for outcome in self.adapter.poll():
            self.finish_adaptation(outcome)
        if self.waiting:
            self.submit_waiting()
        if self.adapter.ready != self._worker_ready:
            self._worker_ready = self.adapter.ready
            self.metrics.worker_up.set(1 if self._worker_ready else 0)
            self._status_dirty = True  # `edgemeta status` shows the worker coming and going
        if self.notifier.watchdog_due(now):
            self.notifier.ping(now)
        if self._status_dirty and now - self._last_status >= 0.5:
            self.write_status()

    def _dispatch(self, item: tuple) -> None:
        if item[0] == "file":
            self.pending.add(item[1], item[2])
        elif item[0] == "signal":
            if item[1] == signal.SIGHUP:
                self.reload()
            else:
                log.info("signal %s: draining and stopping", signal.Signals(item[1]).name)
                self._stopping = True

    def rescan(self) -> None:
        """watchdog can drop events when its queue overflows: look at the inboxes directly too."""
        self._last_rescan = time.monotonic()
        for stream, path in self.layout.scan(self.streams):
            self.pending.add(stream, path)

    # -- ingest ----------------------------------------------------------------------------------
    def normalize(self, x: np.ndarray) -> np.ndarray:
        return ((x - self._mean) / self._std).astype(np.float32)

    def handle_file(self, stream: str, path: Path) -> None:
        if not os.path.lexists(path):
            return
        try:
            if is_label_file(path.name):
                self.handle_labels(stream, path)
            else:
                self.handle_data(stream, path)
        except IngestError as exc:
            self.layout.quarantine(stream, path, exc)
            self.metrics.quarantined.labels(stream, exc.reason).inc()
            self.metrics.files.labels(stream, "quarantined").inc()
            log.warning("quarantined stream=%s file=%s reason=%s: %s", stream, path.name,
                        exc.reason, exc)
            return
        self.layout.processed(stream, path)
        self.metrics.files.labels(stream, "processed").inc()

    def handle_data(self, stream: str, path: Path) -> None:
        rows = parse_rows(path, self.settings.stream(stream), self.settings.ingest.max_file_bytes,
                          self.kind == "classification")
        predictions, version = self.serve_rows(stream, rows.x, rows.y, rows.ids)
        self.layout.write_predictions(stream, path.name, [
            {"id": i, "prediction": p, "version": version}
            for i, p in zip(rows.ids, predictions, strict=True)])

    def serve_rows(self, stream: str, x: np.ndarray, y: np.ndarray | None = None,
                   ids: list | None = None) -> tuple[list, int]:
        """Predict raw rows, then learn from their labels (or remember them for delayed labels).

        Every input takes this path, whether it came from an inbox file or from the stream
        benchmark, which drives the daemon in-process: both make the same decisions.
        """
        started = time.perf_counter()
        outputs, version = self.predictor.predict(self.normalize(x))
        self.metrics.inference_latency.labels(stream).observe(time.perf_counter() - started)
        predictions = (outputs[:, 0].tolist() if self.kind == "regression"
                       else outputs.argmax(axis=1).tolist())
        self.metrics.samples.labels(stream).inc(len(predictions))
        self.metrics.predictions.labels(stream).inc(len(predictions))
        state = self.streams[stream]
        if y is not None:
            self.learn(state, x, y, per_sample_loss(self.kind, outputs, y))
            return predictions, version
        for i, row_id in enumerate(ids if ids is not None else range(len(x))):
            self.cache.put(stream, row_id, x[i], outputs[i], version)
        if self.settings.drift.feature_detector != "none":
            for row in self.normalize(x):
                if state.monitor.update_features(row):
                    self.on_drift(state, "feature")
        return predictions, version

    def settle(self, timeout: float = 60.0) -> bool:
        """Finish every requested adaptation before going on (the benchmark's deterministic mode:
        the daemon proper never waits, it keeps serving while the worker adapts)."""
        deadline = time.monotonic() + timeout
        while (self.in_flight or self.waiting) and time.monotonic() < deadline:
            for outcome in self.adapter.poll(wait=0.002):
                self.finish_adaptation(outcome)
            if self.waiting:
                self.submit_waiting()
        return not (self.in_flight or self.waiting)

    def handle_labels(self, stream: str, path: Path) -> None:
        labels = parse_labels(path, self.settings.ingest.max_file_bytes,
                              self.kind == "classification")
        xs, ys, outs, versions = [], [], [], []
        unknown = 0
        for row_id, y in labels:
            hit = self.cache.pop(stream, row_id)
            if hit is None:
                unknown += 1
                continue
            xs.append(hit[0])
            ys.append(y)
            outs.append(hit[1])
            versions.append(hit[2])
        if unknown:
            self.metrics.labels.labels(stream, "unknown").inc(unknown)
            log.info("stream=%s file=%s: %d label(s) with unknown or expired ids", stream,
                     path.name, unknown)
        if xs:
            self.metrics.labels.labels(stream, "matched").inc(len(xs))
            y = np.asarray(ys)
            self.learn(self.streams[stream], np.asarray(xs), y,
                       per_sample_loss(self.kind, np.asarray(outs), y),
                       np.asarray(versions) == self.predictor.version)

    def learn(self, state: StreamState, x: np.ndarray, y: np.ndarray, losses: np.ndarray,
              judged: np.ndarray | None = None) -> None:
        """Labelled rows: feed the drift detector, or the support collector while one is open.

        ``judged`` marks the rows whose prediction the serving version made: a late label for a
        prediction of an earlier version says nothing about the model serving now, so it may
        seed a support set but never feeds the detector.
        """
        state.samples += len(y)
        state.last_loss = float(np.mean(losses))
        self.metrics.stream_loss.labels(state.name).set(state.last_loss)
        busy = any(f.stream == state.name for f in [*self.in_flight.values(), *self.waiting])
        for i in range(len(y)):
            # A refinement collects while the adapted model serves: the detector keeps watching.
            refining = state.collector.collecting and state.trigger == "refine"
            watched = (not busy and (refining or not state.collector.collecting)
                       and (judged is None or judged[i]))
            if watched and state.monitor.update_error(losses[i], (x[i], y[i])):
                self.on_drift(state, self.settings.drift.detector)
                busy = not state.collector.collecting
                continue  # the row is in the backfill already
            if state.collector.collecting:
                episode = state.collector.offer(x[i], y[i])
                if episode is not None:
                    self.start_adaptation(state, episode)
                    busy = True  # the rest of the batch is judged after the outcome
        self._status_dirty = True

    def on_drift(self, state: StreamState, detector: str) -> None:
        state.drifts += 1
        self.metrics.drift_detections.labels(state.name, detector).inc()
        self.metrics.drift_active.labels(state.name).set(1)
        if state.drift_started is None:
            state.drift_started = time.time()
        log.warning("drift detected stream=%s detector=%s version=%d samples=%d", state.name,
                    detector, self.predictor.version, state.samples)
        if state.trigger == "refine":
            state.collector.cancel()  # the world moved on: refining the old fit is pointless
        rows = []
        if self.settings.adaptation.backfill and detector != "feature":
            rows = state.monitor.rows_since_change()
        self.begin_collection(state, "drift", rows, holdout_size=self._early_rows())

    def _early_rows(self) -> int | None:
        """Holdout size for the early gate, or None (the full holdout) where it does not apply."""
        early = self.settings.gate.early_rows
        return early if early and self.settings.adaptation.selection == "recent" else None

    def begin_collection(self, state: StreamState, source: str, rows=(),
                         support_size: int | None = None, holdout_size: int | None = None) -> None:
        """Open the support/holdout collection, seeded with ``rows`` (backfill after a drift)."""
        if not state.collector.collecting:
            state.trigger = source
            state.early = holdout_size is not None
            episode = state.collector.start(rows, support_size, holdout_size)
            if rows:
                log.info("stream=%s: %d labelled row(s) since the estimated change point seed the "
                         "collection", state.name, min(len(rows), state.collector.needed))
            if episode is not None:
                self.start_adaptation(state, episode)

    # -- adaptation ------------------------------------------------------------------------------
    def start_adaptation(self, state: StreamState, episode: Episode) -> None:
        now = time.perf_counter()
        a = self.settings.adaptation
        init = self.current_weights if a.start_from == "current" else None
        source = state.trigger or "drift"
        rid = self.adapter.submit(episode.support_x, episode.support_y, a.steps, init)
        if rid is None:
            # The worker is starting or restarting: hold the episode until it is ready.
            self.waiting.append(InFlight(state.name, episode, source, now, now, state.early))
            log.info("adaptation waiting for the worker stream=%s", state.name)
            return
        self.in_flight[rid] = InFlight(state.name, episode, source, now, now, state.early)
        log.info("adaptation requested stream=%s support=%d holdout=%d", state.name,
                 len(episode.support_y), len(episode.holdout_y))

    def submit_waiting(self) -> None:
        """Send held episodes once the worker is up; give up on those held too long."""
        a = self.settings.adaptation
        init = self.current_weights if a.start_from == "current" else None
        still = []
        for job in self.waiting:
            rid = self.adapter.submit(job.episode.support_x, job.episode.support_y, a.steps, init)
            if rid is not None:
                job.submitted_at = time.perf_counter()
                self.in_flight[rid] = job
            elif time.perf_counter() - job.complete_at > self.adapter.start_timeout_s:
                self.record(job.stream, job.episode, job.source, "failed", "worker_unavailable",
                            {}, {})
                self.after_episode(self.streams[job.stream], accepted=False)
            else:
                still.append(job)
        self.waiting = still

    def finish_adaptation(self, outcome: AdaptOutcome) -> None:
        job = self.in_flight.pop(outcome.request_id, None)
        if job is None:
            return
        timings = {"adapt": time.perf_counter() - job.submitted_at}
        state = self.streams[job.stream]
        if not outcome.ok:
            result = "timeout" if outcome.reason == "timeout" else "failed"
            self.record(job.stream, job.episode, job.source, result, outcome.reason or "error",
                        timings, {"error": outcome.error})
            self.after_episode(state, accepted=False)
            return
        t = time.perf_counter()
        try:
            model = self.template.patch(outcome.weights)
        except WeightPatchError as exc:
            self.record(job.stream, job.episode, job.source, "failed", "bad_weights", timings,
                        {"error": str(exc)})
            self.after_episode(state, accepted=False)
            return
        timings["patch"] = time.perf_counter() - t
        t = time.perf_counter()
        hx = self.normalize(job.episode.holdout_x)
        current_out, _ = self.predictor.predict(hx)
        next_version = (self.registry.versions() or [0])[-1] + 1
        try:
            live = self.predictor.load(model, next_version)
            candidate_out = live.session.run([live.output_name], {live.input_name: hx})[0]
            candidate = holdout_loss(self.kind, candidate_out, job.episode.holdout_y)
        except Exception as exc:  # noqa: BLE001 - a candidate that cannot run is rejected
            live, candidate = None, float("nan")
            log.error("candidate model failed to run: %s", exc)
        current = holdout_loss(self.kind, current_out, job.episode.holdout_y)
        decision = decide(current, candidate, self.settings.gate.min_gain)
        if job.early:
            y = job.episode.holdout_y
            if live is not None and clear_win(per_sample_loss(self.kind, current_out, y),
                                              per_sample_loss(self.kind, candidate_out, y)):
                decision = GateDecision(True, "clear_win", current, candidate)
            else:
                # Not a clear win on a few rows: keep these rows and wait for the full holdout
                # (the same support gives the same candidate again, so nothing is lost).
                ep = job.episode
                rows = [*zip(ep.support_x, ep.support_y, strict=True),
                         *zip(ep.holdout_x, ep.holdout_y, strict=True)]
                state.collector.cancel()
                self.begin_collection(state, job.source, rows)
                log.info("stream=%s: early gate inconclusive (%.4g vs %.4g on %d rows); waiting "
                         "for the full holdout", job.stream, current, candidate, len(y))
                return
        timings["gate"] = time.perf_counter() - t
        self.metrics.holdout_current.labels(job.stream).set(current)
        self.metrics.holdout_candidate.labels(job.stream).set(candidate)
        figures = {"holdout_current": current, "holdout_candidate": candidate,
                   "support_losses": outcome.losses, "worker_seconds": outcome.seconds}
        if not decision.accepted:
            self.record(job.stream, job.episode, job.source, "rejected", decision.reason, timings,
                        figures)
            self.after_episode(state, accepted=False)
            return
        t = time.perf_counter()
        manifest = self.registry.commit(
            model, source=job.source, parent=self.predictor.version,
            holdout={"current": current, "candidate": candidate}, stream=job.stream,
            support_size=len(job.episode.support_y))
        timings["commit"] = time.perf_counter() - t
        t = time.perf_counter()
        self.predictor.install(dataclasses.replace(live, version=manifest.version))
        timings["swap"] = time.perf_counter() - t
        timings["total"] = time.perf_counter() - job.complete_at
        self.current_weights = dict(outcome.weights)
        self.current_manifest = manifest
        self.metrics.set_model(manifest.version, manifest.created, manifest.source, live.provider)
        self.record(job.stream, job.episode, job.source, "accepted", decision.reason, timings,
                    {**figures, "version": manifest.version})
        expected = float(per_sample_loss(self.kind, candidate_out, job.episode.holdout_y).mean())
        if job.source == "refine" and state.fit_level is not None:
            # A refinement whose holdout straddles a new change can beat a model that no longer
            # fits and still be bad: judge the next rows by the best fit seen in this regime.
            expected = min(expected, state.fit_level)
        state.fit_level = expected
        self.after_episode(state, accepted=True, expected=expected)
        log.info("adaptation accepted stream=%s version=%d holdout %.4g -> %.4g in %.1f ms",
                    job.stream, manifest.version, current, candidate, timings["total"] * 1e3)

    def after_episode(self, state: StreamState, accepted: bool,
                      expected: float | None = None) -> None:
        a = self.settings.adaptation
        source = state.trigger
        retry = (not accepted and source == "drift" and not self._stopping
                 and state.retries < a.retries)
        stage = state.refine_stage + 1 if source == "refine" else 0
        refine = (accepted and source in ("initial", "drift", "refine") and not self._stopping
                  and stage < len(a.refine))
        if accepted or source != "refine":  # a rejected refinement changed nothing: keep watching
            state.monitor.reset(cooldown=True, expected=expected)
        state.trigger = None
        if refine:
            # Labels keep coming: adapt again on a larger support set while the new model serves,
            # and let the gate decide whether the extra data bought anything.
            state.refine_stage = stage
            self.begin_collection(state, "refine", support_size=a.refine[stage])
        if retry:
            # The drift stands and the serving model is still the one that drifted: a fresh
            # detector would take its bad error as the new normal, so try again on new rows.
            state.retries += 1
            log.info("stream=%s: drift unresolved, collecting again (retry %d of %d)", state.name,
                     state.retries, self.settings.adaptation.retries)
            self.begin_collection(state, "drift")
        else:
            state.retries = 0
        if accepted:
            state.drift_started = None
            self.metrics.drift_active.labels(state.name).set(0)
            for other in self.streams.values():
                if other is not state:
                    other.monitor.reset(cooldown=True)  # every stream is now served by a new model
        self._status_dirty = True

    def record(self, stream: str, episode: Episode, source: str, result: str, reason: str,
               timings: dict[str, float], figures: dict[str, Any]) -> None:
        """Count the outcome and write the episode to episodes/ for audit and re-training."""
        self.metrics.adaptations.labels(stream, result).inc()
        for stage, seconds in timings.items():
            if stage != "total":
                self.metrics.stage_duration.labels(stage).observe(seconds)
        entry = {"time": time.time(), "stream": stream, "trigger": source, "result": result,
                 "reason": reason, "serving_version": self.predictor.version,
                 "timings_ms": {k: round(v * 1e3, 3) for k, v in timings.items()}, **figures}
        self.episodes.append(entry)
        body = {**entry, "support": {"x": episode.support_x.tolist(),
                                     "y": episode.support_y.tolist()},
                "holdout": {"x": episode.holdout_x.tolist(), "y": episode.holdout_y.tolist()}}
        directory = self.settings.state_dir / "episodes"
        name = f"{time.strftime('%Y%m%dT%H%M%S')}-{time.time_ns() % 10**9:09d}-{stream}.json"
        atomic_write(directory / name, json.dumps(body, default=float).encode())
        self._prune_episodes(directory)
        if result != "accepted":
            log.warning("adaptation %s stream=%s reason=%s version=%s", result, stream, reason,
                        self.predictor.version)
        self._status_dirty = True

    def _prune_episodes(self, directory: Path) -> None:
        files = sorted(directory.glob("*.json"))
        for old in files[:max(0, len(files) - self.settings.retention.keep_episodes)]:
            old.unlink(missing_ok=True)

    # -- operator commands -----------------------------------------------------------------------
    def handle_triggers(self) -> None:
        directory = self.settings.state_dir / "triggers"
        for path in pending(directory):
            try:
                trigger = parse_trigger(path, self.settings.state_dir, list(self.streams))
            except TriggerRejected as exc:
                log.warning("trigger rejected file=%s reason=%s: %s", path.name, exc.reason, exc)
                self.metrics.triggers.labels("rejected", exc.reason).inc()
                finish(path, "rejected", str(exc), {"reason": exc.reason})
                continue
            except OSError as exc:
                self.metrics.triggers.labels("rejected", "unreadable").inc()
                finish(path, "rejected", str(exc), {"reason": "unreadable"})
                continue
            try:
                message = self.act(trigger)
            except (RegistryError, PredictorError, IngestError, StartupError) as exc:
                log.error("trigger failed file=%s: %s", path.name, exc)
                self.metrics.triggers.labels("failed", "error").inc()
                finish(path, "failed", str(exc))
                continue
            self.metrics.triggers.labels("ok", "").inc()
            finish(path, "ok", message)
            log.info("trigger %s: %s", path.name, message)

    def act(self, trigger) -> str:
        if trigger.command == "reload":
            self.reload()
            return "reloaded"
        if trigger.command == "rollback":
            manifest = self.registry.rollback(to=trigger.args.get("version"))
            self.load_current()
            for state in self.streams.values():
                state.monitor.reset(cooldown=True)
            return f"now serving v{manifest.version} (rollback to v{manifest.parent})"
        state = self.streams[trigger.args["stream"]]
        state.collector.cancel()
        self.begin_collection(state, "manual")
        support = trigger.args.get("support")
        if support is None:
            return (f"collecting {state.collector.needed} labelled samples on stream "
                    f"{state.name}")
        rows = parse_rows(support, self.settings.stream(state.name),
                          self.settings.ingest.max_file_bytes, self.kind == "classification")
        if rows.y is None:
            raise IngestError("wrong_columns", f"{support.name}: a support file needs the label "
                              f"column {self.settings.stream(state.name).label!r}")
        outputs, _ = self.predictor.predict(self.normalize(rows.x))
        self.learn(state, rows.x, rows.y, per_sample_loss(self.kind, outputs, rows.y))
        return (f"support file {support.name} gave {len(rows.y)} labelled rows on stream "
                f"{state.name}")

    def reload(self) -> None:
        """SIGHUP: re-read the config (keeping the old one when the new one is invalid), re-load
        the serving model from the registry (a `models rollback` may have changed CURRENT)."""
        self.notifier.reloading()
        log.info("reloading")
        if self.settings.source is not None:
            try:
                new = load_config(self.settings.source)
            except ConfigError as exc:
                log.error("reload: keeping the running config: %s", exc)
                new = None
            if new is not None:
                if [s.name for s in new.streams] != [s.name for s in self.settings.streams]:
                    log.warning("reload: stream list changes take effect on restart")
                    new.streams = self.settings.streams
                self.settings = new
                self.adapter.timeout_s = new.adaptation.timeout_s
                self.pending.settle_s = new.ingest.settle_s
                for name, state in self.streams.items():
                    fresh = self._stream_state(name)
                    state.monitor, state.collector = fresh.monitor, fresh.collector
        try:
            self.load_current()
        except (RegistryError, StartupError) as exc:
            log.error("reload: keeping the serving model: %s", exc)
        self.notifier.ready(self.summary())

    # -- status and shutdown ---------------------------------------------------------------------
    def summary(self) -> str:
        drifting = [n for n, s in self.streams.items() if s.monitor.active] if hasattr(
            self, "streams") else []
        return (f"serving v{self.predictor.version} on {self.predictor.provider}; "
                f"{len(self.settings.streams)} stream(s); drift: {', '.join(drifting) or 'none'}")

    def status(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(), "updated": time.time(),
            "version": self.predictor.version, "provider": self.predictor.provider,
            "source": self.current_manifest.source,
            "worker": {"ready": self.adapter.ready, "pid": self.adapter.pid,
                       "device": self.adapter.info.get("device"),
                       "restarts": self.adapter.restarts},
            "streams": {n: {"samples": s.samples, "last_loss": s.last_loss,
                            "drift_active": s.monitor.active, "drift_since": s.drift_started,
                            "collecting": s.collector.collecting,
                            "collected": s.collector.collected, "needed": s.collector.needed,
                            "adapting": any(f.stream == n for f in self.in_flight.values())}
                        for n, s in self.streams.items()},
            "last_adaptations": list(self.episodes)[-10:],
        }

    def write_status(self) -> None:
        self._status_dirty = False
        self._last_status = time.monotonic()
        atomic_write(self.settings.state_dir / "status.json",
                     json.dumps(self.status(), indent=2, default=float).encode())
        self.notifier.status(self.summary())

    def shutdown(self, drain_s: float = 5.0) -> int:
        self.notifier.stopping("draining")
        if self.watcher:
            self.watcher.stop()
        for stream, path in self.pending.ready(time.monotonic() + 3600):
            self.handle_file(stream, path)  # files already seen and settled: finish them
        deadline = time.monotonic() + drain_s
        while self.in_flight and time.monotonic() < deadline:
            for outcome in self.adapter.poll(wait=0.1):
                self.finish_adaptation(outcome)
        self.adapter.stop(timeout=2.0)
        if self._http is not None:
            self._http.shutdown()
        self.write_status()
        log.info("stopped")
        return 0
