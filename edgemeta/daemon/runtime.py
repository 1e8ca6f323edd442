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

from edgemeta.bundle_format import BundleFormatError, read_bundle_info
from edgemeta.config import ConfigError, Settings, load_config
from edgemeta.daemon.adapter import AdapterClient, AdaptOutcome
from edgemeta.daemon.degraded import Degraded
from edgemeta.daemon.degraded import reason_of as degraded_reason
from edgemeta.daemon.gate import GateDecision, clear_win, decide, holdout_loss, per_sample_loss
from edgemeta.daemon.metrics import Metrics, serve_http
from edgemeta.daemon.sanity import Probation, degenerate_labels, skill
from edgemeta.daemon.systemd import Notifier
from edgemeta.daemon.triggers import TriggerRejected, finish, parse_trigger, pending
from edgemeta.fsio import atomic_write, is_storage_error
from edgemeta.serve.onnx_weights import OnnxTemplate, WeightPatchError
from edgemeta.serve.predictor import Live, Predictor, PredictorError, run
from edgemeta.serve.registry import Registry, RegistryError
from edgemeta.stream.buffers import Episode, SupportCollector
from edgemeta.stream.drift import DriftMonitor
from edgemeta.stream.ingest import (
    InboxWatcher,
    IngestError,
    LabelCache,
    Limits,
    PendingFiles,
    StateLayout,
    is_label_file,
    parse_labels,
    parse_rows,
)

log = logging.getLogger("edgemeta.daemon")


class StartupError(RuntimeError):
    """The daemon cannot start serving; the message says what to fix."""


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
    # Labels seen while watching (not collecting): the stream's recent history, against which a
    # support set's labels are checked for sanity.
    history: deque = field(default_factory=lambda: deque(maxlen=500))
    probation: Probation | None = None  # after a swap: new version vs the one it replaced


@dataclass(frozen=True)
class Replaced:
    """The model a swap replaced, kept loaded while the new one is on probation."""

    live: Live | None
    weights: dict[str, np.ndarray]


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
        # SimpleQueue: put() is reentrant, so a signal handler may call it at any moment.
        self.events: queue.SimpleQueue = queue.SimpleQueue()
        self.degraded = Degraded()
        self._stuck: set[Path] = set()  # inputs that could not even be moved aside (logged once)
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
        try:
            self.bundle = read_bundle_info(s.bundle)
            self.template = OnnxTemplate((s.bundle / "model.onnx").read_bytes(),
                                         self.bundle.parameter_names)
        except (BundleFormatError, WeightPatchError, OSError) as exc:
            raise StartupError(f"bundle.path: {exc}") from exc
        self.kind = self.bundle.kind
        for i, stream in enumerate(s.streams):
            if len(stream.features) != self.bundle.features:
                raise StartupError(f"streams[{i}].features: {len(stream.features)} columns, the "
                                   f"bundle expects {self.bundle.features}")
        self._mean, self._std = self.bundle.mean, self.bundle.std
        try:
            self.layout.ensure(st.name for st in s.streams)
            (s.state_dir / "episodes").mkdir(parents=True, exist_ok=True)
            triggers = s.state_dir / "triggers"
            triggers.mkdir(parents=True, exist_ok=True)
            # setgid + group-writable: operators in the daemon's group can drop trigger files.
            os.chmod(triggers, 0o2770)
            self.registry = Registry(s.state_dir, keep=s.retention.keep_models)
        except OSError as exc:
            raise StartupError(f"state.dir: cannot prepare {s.state_dir}: {exc}") from exc
        removed = self.layout.sweep_temp(st.name for st in s.streams)
        if removed:
            log.warning("removed %d temp file(s) left by an interrupted write", len(removed))
        self.predictor = Predictor(s.serving.providers or None, s.serving.intra_op_threads)
        self.load_current(startup=True)
        self.cache = LabelCache(s.ingest.label_cache, s.ingest.label_cache_bytes)
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

    @property
    def limits(self) -> Limits:
        """The ingest limits of the settings in force (a reload may change them)."""
        i = self.settings.ingest
        return Limits(i.max_file_bytes, i.max_line_bytes, i.max_json_depth, i.max_npz_members)

    def _try_version(self, version: int):
        """Load ``version`` if it is the bundle's graph and runs; raises with the reason if not."""
        data, manifest = self.registry.load(version)
        problem = self.template.mismatch(data)
        if problem is not None:
            raise RegistryError(f"version {version}: {problem}")
        return data, manifest, self.predictor.swap(data, version)

    def load_current(self, startup: bool = False) -> None:
        """Serve CURRENT if it is usable, else the newest usable version, else the bundle's
        meta-initialization committed afresh; only a bundle that cannot serve stops the start.

        "Usable" is more than a matching checksum: the model must be the bundle's own graph with
        finite weights and must load in ONNX Runtime.
        """
        if startup:
            try:
                self.registry.init_from_bundle(self.settings.bundle)
            except RegistryError as exc:
                raise StartupError(f"bundle.path: {exc}") from exc
            except OSError as exc:
                # A full disk must not stop a start: versions already committed can still serve.
                log.error("cannot record the bundle's meta-initialization: %s", exc)
        current = self.registry.current_version()
        if current is None:
            log.warning("%s is missing or unreadable: serving the newest usable version",
                        self.registry.root / "CURRENT")
        order = ([current] if current is not None else []) + [
            v for v in reversed(self.registry.versions()) if v != current]
        loaded = None
        for version in order:
            try:
                loaded = self._try_version(version)
                break
            except (RegistryError, PredictorError) as exc:
                log.error("model refused: %s", exc)
                self.metrics.model_load_failures.inc()
        if loaded is None:
            loaded = self._reseed_from_bundle()
        data, manifest, live = loaded
        if manifest.version != current:
            try:
                self.registry.activate(manifest.version)
            except (RegistryError, OSError) as exc:
                log.error("cannot point CURRENT at v%d: %s", manifest.version, exc)
        self.current_weights = OnnxTemplate(data, self.template.parameter_names).weights()
        self.current_manifest = manifest
        self.metrics.set_model(manifest.version, manifest.created, manifest.source, live.provider)
        log.info("serving version=%d source=%s provider=%s", manifest.version, manifest.source,
                 live.provider)
        self._status_dirty = True

    def _reseed_from_bundle(self):
        """No registry version is usable: serve the bundle's meta-initialization again."""
        data = (self.settings.bundle / "model.onnx").read_bytes()
        try:
            live = self.predictor.swap(data, 0)
        except PredictorError as exc:
            raise StartupError(f"bundle.path: the bundle's model does not load: {exc}") from exc
        try:
            manifest = self.registry.commit(data, source="meta-init", parent=None, note=(
                f"re-seeded from bundle {self.settings.bundle}: no stored version was usable"))
        except OSError as exc:
            raise StartupError(f"state.dir: no stored version is usable and the bundle's model "
                               f"cannot be stored: {exc}") from exc
        log.warning("no stored version was usable: serving the bundle's meta-initialization as "
                    "v%d", manifest.version)
        live = self.predictor.install(dataclasses.replace(live, version=manifest.version))
        return data, manifest, live

    # -- the loop --------------------------------------------------------------------------------
    def install_signal_handlers(self) -> None:
        for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda signum, _frame: self.events.put(("signal", signum)))

    def run(self) -> int:
        self.setup()
        self.notifier.ready(self.summary())
        log.info("ready: %s", self.summary())
        while not self._stopping:
            try:
                self.step()
            except Exception:  # noqa: BLE001 - the last line of defence: log, count, go on
                log.exception("unexpected error in the control loop; serving continues")
                self.metrics.internal_errors.labels("loop").inc()
                time.sleep(0.1)
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
        if self.degraded.due(now):
            # While degraded, files stay pending (and in the inbox) until the back-off says retry.
            for stream, path in self.pending.ready(now):
                if not self.handle_file(stream, path):
                    break  # the disk is still full: the rest wait for the next try
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
            if path not in self._stuck:
                self.pending.add(stream, path)

    # -- ingest ----------------------------------------------------------------------------------
    def normalize(self, x: np.ndarray) -> np.ndarray:
        return ((x - self._mean) / self._std).astype(np.float32)

    def handle_file(self, stream: str, path: Path) -> bool:
        """Handle one input so that it always ends in processed/ or quarantine/, whatever it
        holds; returns False only when the disk cannot take writes (the file stays in the inbox
        and the daemon runs degraded until a retry goes through)."""
        if not os.path.lexists(path):
            return True
        try:
            if is_label_file(path.name):
                self.handle_labels(stream, path)
            else:
                self.handle_data(stream, path)
            self.layout.processed(stream, path)
        except IngestError as exc:
            return self._quarantine(stream, path, exc)
        except Exception as exc:  # noqa: BLE001 - containment: no input may stop the daemon
            if is_storage_error(exc):
                return self._storage_failed(stream, path, exc)
            log.exception("internal error on stream=%s file=%s", stream, path.name)
            self.metrics.internal_errors.labels("ingest").inc()
            return self._quarantine(stream, path, IngestError(
                "internal_error", f"{type(exc).__name__}: {exc}"[:2000]))
        self.metrics.files.labels(stream, "processed").inc()
        self._storage_ok()
        return True

    def _quarantine(self, stream: str, path: Path, exc: IngestError) -> bool:
        try:
            self.layout.quarantine(stream, path, exc)
        except OSError as move_exc:
            if is_storage_error(move_exc):
                return self._storage_failed(stream, path, move_exc)
            if path not in self._stuck:
                log.error("cannot move %s to quarantine (%s): leaving it in the inbox", path,
                          move_exc)
                self._stuck.add(path)
            return True
        self.metrics.quarantined.labels(stream, exc.reason).inc()
        self.metrics.files.labels(stream, "quarantined").inc()
        log.warning("quarantined stream=%s file=%s reason=%s: %s", stream, path.name, exc.reason,
                    exc)
        self._storage_ok()
        return True

    def _degrade(self, exc: OSError, what: str) -> None:
        """A write failed for want of disk: run degraded (logged once) and back off."""
        reason = degraded_reason(exc)
        if not self.degraded.active:
            log.error("degraded (%s): %s: %s; ingest paused, inputs stay in the inbox", reason,
                      what, exc)
        self.degraded.fail(reason, str(exc), time.monotonic())
        self.metrics.degraded.labels(reason).set(1)
        self._status_dirty = True

    def _storage_failed(self, stream: str, path: Path, exc: OSError) -> bool:
        self._degrade(exc, f"handling {path.name}")
        self.pending.add(stream, path)
        return False

    def _storage_ok(self) -> None:
        if self.degraded.active:
            for reason in self.degraded.recover():
                self.metrics.degraded.labels(reason).set(0)
            log.warning("writes go through again: ingest resumed")
            self._status_dirty = True

    def handle_data(self, stream: str, path: Path) -> None:
        rows = parse_rows(path, self.settings.stream(stream), self.limits, self.bundle.classes)
        outputs, version = self.predict_rows(stream, rows.x)
        predictions = self._predictions(outputs)
        records, served = [], iter(predictions)
        for i, row_id in enumerate(rows.all_ids):
            if i in rows.refused:
                records.append({"id": row_id, "prediction": None, "version": version,
                                "refused": rows.refused[i].message})
            else:
                records.append({"id": row_id, "prediction": next(served), "version": version})
        # Predictions are durable before anything is learned from the rows, so a file retried
        # after a full disk is not learned from twice.
        self.layout.write_predictions(stream, path.name, records)
        for refusal in rows.refused.values():
            self.metrics.rows_refused.labels(stream, refusal.reason).inc()
        if rows.refused:
            log.warning("stream=%s file=%s: %d row(s) refused, e.g. %s", stream, path.name,
                        len(rows.refused), next(iter(rows.refused.values())).message)
        self.observe_rows(stream, rows.x, outputs, version, rows.y, rows.ids)

    def _predictions(self, outputs: np.ndarray) -> list:
        return (outputs[:, 0].tolist() if self.kind == "regression"
                else outputs.argmax(axis=1).tolist())

    def predict_rows(self, stream: str, x: np.ndarray) -> tuple[np.ndarray, int]:
        started = time.perf_counter()
        if len(x) == 0:
            return np.zeros((0, self.bundle.outputs), np.float32), self.predictor.version
        outputs, version = self.predictor.predict(self.normalize(x))
        self.metrics.inference_latency.labels(stream).observe(time.perf_counter() - started)
        self.metrics.samples.labels(stream).inc(len(x))
        self.metrics.predictions.labels(stream).inc(len(x))
        return outputs, version

    def serve_rows(self, stream: str, x: np.ndarray, y: np.ndarray | None = None,
                   ids: list | None = None) -> tuple[list, int]:
        """Predict raw rows, then learn from their labels (or remember them for delayed labels).

        Every input takes this path, whether it came from an inbox file or from the stream
        benchmark, which drives the daemon in-process: both make the same decisions.
        """
        outputs, version = self.predict_rows(stream, x)
        self.observe_rows(stream, x, outputs, version, y, ids)
        return self._predictions(outputs), version

    def observe_rows(self, stream: str, x: np.ndarray, outputs: np.ndarray, version: int,
                     y: np.ndarray | None = None, ids: list | None = None) -> None:
        """Learn from served rows: their labels now, or later through the label cache."""
        state = self.streams[stream]
        if len(x) == 0:
            return
        if y is not None:
            self.learn(state, x, y, per_sample_loss(self.kind, outputs, y))
            return
        for i, row_id in enumerate(ids if ids is not None else range(len(x))):
            self.cache.put(stream, str(row_id), x[i], outputs[i], version)
        if self.settings.drift.feature_detector != "none":
            for row in self.normalize(x):
                if state.monitor.update_features(row):
                    self.on_drift(state, "feature")

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
        labels, refused = parse_labels(path, self.limits, self.bundle.classes)
        if refused:
            self.metrics.labels.labels(stream, "refused").inc(len(refused))
            log.warning("stream=%s file=%s: %d label(s) refused, e.g. %s", stream, path.name,
                        len(refused), next(iter(refused.values())).message)
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
        if state.probation is not None:
            self._judge_probation(state, x, y, losses, judged)
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
            else:
                state.history.append(float(y[i]))
        self._status_dirty = True

    def _judge_probation(self, state: StreamState, x: np.ndarray, y: np.ndarray,
                         losses: np.ndarray, judged: np.ndarray | None) -> None:
        """Score the rows the new version served with the version it replaced as well; roll
        back at once when they show it worse."""
        probation = state.probation
        if self.predictor.version != probation.new_version:
            state.probation = None  # another swap (or a rollback) has replaced it already
            return
        mask = np.ones(len(x), bool) if judged is None else np.asarray(judged, bool)
        if not mask.any():
            return
        old = run(probation.previous.live, self.normalize(x[mask]))
        probation.add(losses[mask], per_sample_loss(self.kind, old, np.asarray(y)[mask]))
        verdict = probation.verdict()
        if verdict == "ok":
            state.probation = None
        elif verdict == "worse":
            state.probation = None
            self.auto_rollback(state, probation)

    def auto_rollback(self, state: StreamState, probation: Probation) -> None:
        """Serve the replaced version again (as a new version with source ``rollback``)."""
        fig = probation.figures()
        note = (f"automatic rollback: v{probation.new_version} was worse than "
                f"v{probation.previous_version} on the next {fig['rows']} labelled rows of stream "
                f"{state.name} (mean loss {fig['new_loss']:.4g} vs {fig['old_loss']:.4g})")
        try:
            manifest = self.registry.rollback(to=probation.previous_version, note=note)
        except (RegistryError, OSError) as exc:
            log.error("automatic rollback to v%s failed: %s", probation.previous_version, exc)
            return
        previous = probation.previous
        live = self.predictor.install(dataclasses.replace(previous.live, version=manifest.version))
        self.current_weights = previous.weights
        self.current_manifest = manifest
        self.metrics.set_model(manifest.version, manifest.created, manifest.source, live.provider)
        self.metrics.rollbacks.labels(state.name).inc()
        log.warning("%s: now serving v%d", note, manifest.version)
        if state.trigger == "refine":
            state.collector.cancel()  # refining the model just rolled back is pointless
            state.trigger = None
        state.refine_stage, state.fit_level = 0, None
        for other in self.streams.values():
            other.monitor.reset(cooldown=True)
        self.episodes.append({"time": time.time(), "stream": state.name, "trigger": "rollback",
                              "result": "rolled_back", "reason": "worse_after_swap",
                              "serving_version": manifest.version, **fig})
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
        problem = degenerate_labels(self.kind, np.concatenate([episode.support_y, episode.holdout_y]),
                                    np.asarray(state.history), self.bundle.target_range,
                                    holdout=episode.holdout_y)
        if problem is not None:
            log.warning("stream=%s: not adapting on these labels (%s)", state.name, problem)
            self.record(state.name, episode, state.trigger or "drift", "rejected", problem, {}, {})
            self.after_episode(state, accepted=False)
            return
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
            candidate_out = run(live, hx)
            candidate = holdout_loss(self.kind, candidate_out, job.episode.holdout_y)
        except Exception as exc:  # noqa: BLE001 - a candidate that cannot run is rejected
            live, candidate = None, float("nan")
            log.error("candidate model failed to run: %s", exc)
        current = holdout_loss(self.kind, current_out, job.episode.holdout_y)
        decision = decide(current, candidate, self.settings.gate.min_gain)
        # Beating the serving model is not enough: a candidate no better on its holdout than that
        # holdout's own mean (skill <= 0: R^2, or the share of the majority-class error removed)
        # learned nothing from x, which is what random or shuffled labels give. On the early
        # gate's few rows that is not conclusive either way: it waits for the full holdout.
        # A candidate that halves the serving model's loss is kept to the ordinary rule: after a
        # real change the serving model is far off and even a weak adaptation is worth serving.
        no_signal = live is not None and candidate > 0.5 * current and skill(
            self.kind, job.episode.holdout_y,
            per_sample_loss(self.kind, candidate_out, job.episode.holdout_y)) <= 0
        if job.early:
            y = job.episode.holdout_y
            if live is not None and not no_signal and clear_win(
                    per_sample_loss(self.kind, current_out, y),
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
        if decision.accepted and no_signal:
            decision = GateDecision(False, "no_signal", current, candidate)
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
        try:
            manifest = self.registry.commit(
                model, source=job.source, parent=self.predictor.version,
                holdout={"current": current, "candidate": candidate}, stream=job.stream,
                support_size=len(job.episode.support_y))
        except OSError as exc:
            # The registry is untouched (a commit is all or nothing): keep serving, go degraded.
            if is_storage_error(exc):
                self._degrade(exc, "committing a new version")
            self.record(job.stream, job.episode, job.source, "failed", "io_error", timings,
                        {**figures, "error": str(exc)})
            self.after_episode(state, accepted=False)
            return
        timings["commit"] = time.perf_counter() - t
        t = time.perf_counter()
        replaced_version = self.predictor.version
        replaced = Replaced(self.predictor.live, self.current_weights)
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
        for other in self.streams.values():
            other.probation = None
        state.probation = Probation(self.settings.adaptation.holdout_size, replaced,
                                    replaced_version, manifest.version)
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
        try:
            atomic_write(directory / name, json.dumps(body, default=float).encode())
            self._prune_episodes(directory)
        except OSError as exc:
            log.error("cannot write the episode record %s: %s", name, exc)
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
        try:
            paths = pending(directory)
        except OSError as exc:
            log.error("cannot list %s: %s", directory, exc)
            return
        for path in paths:
            if path in self._stuck:
                continue
            self.handle_trigger(path)

    def handle_trigger(self, path: Path) -> None:
        """Act on one trigger file; whatever it holds, it ends in triggers/done/ with a result."""
        try:
            trigger = parse_trigger(path, self.settings.state_dir, list(self.streams))
        except TriggerRejected as exc:
            log.warning("trigger rejected file=%s reason=%s: %s", path.name, exc.reason, exc)
            return self._finish_trigger(path, "rejected", exc.reason, str(exc))
        except Exception as exc:  # noqa: BLE001 - containment: no trigger may stop the daemon
            log.exception("internal error reading trigger %s", path.name)
            self.metrics.internal_errors.labels("trigger").inc()
            return self._finish_trigger(path, "rejected", "internal_error",
                                        f"{type(exc).__name__}: {exc}"[:2000])
        try:
            message = self.act(trigger)
        except (RegistryError, PredictorError, IngestError, StartupError) as exc:
            log.error("trigger failed file=%s: %s", path.name, exc)
            return self._finish_trigger(path, "failed", "error", str(exc))
        except Exception as exc:  # noqa: BLE001
            if is_storage_error(exc):
                self._degrade(exc, f"trigger {path.name} (it stays for a later retry)")
                return None
            log.exception("internal error acting on trigger %s", path.name)
            self.metrics.internal_errors.labels("trigger").inc()
            return self._finish_trigger(path, "failed", "internal_error",
                                        f"{type(exc).__name__}: {exc}"[:2000])
        log.info("trigger %s: %s", path.name, message)
        return self._finish_trigger(path, "ok", "", message)

    def _finish_trigger(self, path: Path, result: str, reason: str, message: str) -> None:
        try:
            finish(path, result, message, {"reason": reason} if reason else None)
        except OSError as exc:
            # Not even done/ takes it: remember it so it is not acted on again every turn.
            log.error("cannot move trigger %s to done/: %s", path.name, exc)
            self._stuck.add(path)
            if is_storage_error(exc):
                self._degrade(exc, f"moving trigger {path.name}")
        self.metrics.triggers.labels(result, reason).inc()

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
        rows = parse_rows(support, self.settings.stream(state.name), self.limits,
                          self.bundle.classes)
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
        degraded = (f"; DEGRADED ({', '.join(self.degraded.reasons)}): ingest paused"
                    if self.degraded.active else "")
        return (f"serving v{self.predictor.version} on {self.predictor.provider}; "
                f"{len(self.settings.streams)} stream(s); drift: {', '.join(drifting) or 'none'}"
                f"{degraded}")

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
            "degraded": self.degraded.reasons,
        }

    def write_status(self) -> None:
        self._status_dirty = False
        self._last_status = time.monotonic()
        self.notifier.status(self.summary())
        try:
            atomic_write(self.settings.state_dir / "status.json",
                         json.dumps(self.status(), indent=2, default=float).encode())
        except OSError as exc:
            # status.json is a view for operators: a full disk must not stop serving for it.
            if is_storage_error(exc):
                self._degrade(exc, "writing status.json")
            else:
                log.error("cannot write status.json: %s", exc)
            self._status_dirty = True
            return
        self._storage_ok()

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
