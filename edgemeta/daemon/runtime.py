"""Wires the rooms together and runs the control loop of ``edgemeta run``.

One thread acts: the control loop. Everything else only enqueues: signal handlers (SIGHUP reload,
SIGTERM/SIGINT stop), the watchdog observer (file events) and the adapter client's reader thread.
This keeps the daemon predictable: no handler ever touches a model, the registry or a file.

What happens to a stream's rows is the business of ``inbox.py`` (files) and ``streams.py``
(learning, carrying out the lifecycle in ``lifecycle.py``); which model serves a stream is
``models.py``'s; episode records and ``status.json`` are ``journal.py``'s.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import queue
import signal
import time

import numpy as np

from edgemeta.bundle_format import BundleFormatError, BundleInfo, read_bundle_info
from edgemeta.config import (
    BINARY_DETECTORS,
    ConfigError,
    Settings,
    changed_keys,
    fit_to_bundle,
    load_config,
    reloadable,
)
from edgemeta.daemon.adapter import AdapterClient
from edgemeta.daemon.commands import Commands
from edgemeta.daemon.degraded import DegradedMode
from edgemeta.daemon.inbox import Inbox
from edgemeta.daemon.journal import Journal
from edgemeta.daemon.metrics import Metrics, serve_http
from edgemeta.daemon.models import ModelsError, ServedModels
from edgemeta.daemon.portfolios import build_portfolios
from edgemeta.daemon.state_lock import StateLock, StateLocked
from edgemeta.daemon.streams import Streams
from edgemeta.daemon.systemd import Notifier
from edgemeta.serve.onnx_weights import OnnxTemplate, WeightPatchError
from edgemeta.serve.registry import Registry, RegistryError
from edgemeta.stream.drift import resolve_detector
from edgemeta.stream.ingest import InboxWatcher, LabelCache, PendingFiles, StateLayout

log = logging.getLogger("edgemeta.daemon")


class StartupError(RuntimeError):
    """The daemon cannot start serving; the message says what to fix."""


def _keep_running_value(new: Settings, old: Settings, key: str) -> None:
    """Put ``old``'s value of a restart-only ``key`` back into ``new``."""
    top = {"bundle.path": "bundle", "state.dir": "state_dir", "streams": "streams"}
    if key in top:
        setattr(new, top[key], getattr(old, top[key]))
        return
    section, name = key.split(".", 1)
    setattr(getattr(new, section), name, getattr(getattr(old, section), name))


def open_bundle(settings: Settings) -> tuple[BundleInfo, OnnxTemplate]:
    """The bundle the config names, checked as the daemon needs it (also by `config check`)."""
    try:
        bundle = read_bundle_info(settings.bundle)
        template = OnnxTemplate((settings.bundle / "model.onnx").read_bytes(),
                                bundle.parameter_names)
    except (BundleFormatError, WeightPatchError, OSError) as exc:
        raise StartupError(f"bundle.path: {exc}") from exc
    for i, stream in enumerate(settings.streams):
        if len(stream.features) != bundle.features:
            raise StartupError(f"streams[{i}].features: {len(stream.features)} columns, the "
                               f"bundle expects {bundle.features}")
    detector = resolve_detector(settings.drift.detector, bundle.kind)
    if detector in BINARY_DETECTORS and bundle.kind != "classification":
        raise StartupError(f"drift.detector: {detector!r} watches 0/1 errors and needs a "
                           f"classification bundle; {settings.bundle} is a {bundle.kind} bundle "
                           "(use \"auto\" or \"adwin\")")
    return bundle, template


def open_fitted(settings: Settings) -> tuple[Settings, BundleInfo, OnnxTemplate, list[str]]:
    """:func:`open_bundle`, then the settings with the bundle's shape as their defaults
    (``config.fit_to_bundle``) and the warnings about them: what start-up, reload and
    ``config check`` all run."""
    bundle, template = open_bundle(settings)
    try:
        fitted, notes = fit_to_bundle(settings, bundle.support_rows, bundle.query_rows)
    except ConfigError as exc:
        raise StartupError(str(exc)) from exc
    return fitted, bundle, template, notes


class Daemon:
    def __init__(self, settings: Settings, metrics: Metrics | None = None,
                 notifier: Notifier | None = None):
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.notifier = notifier or Notifier()
        # SimpleQueue: put() is reentrant, so a signal handler may call it at any moment.
        self.events: queue.SimpleQueue = queue.SimpleQueue()
        self.degraded = DegradedMode(self.metrics.degraded)
        self.layout = StateLayout(settings.state_dir)
        self._stopping = False
        self._last = {"rescan": 0.0, "triggers": 0.0, "status": 0.0}
        self._http = None
        self._worker_ready: bool | None = None
        self._status_failing = False
        self.watcher: InboxWatcher | None = None
        self.lock = StateLock(settings.state_dir)
        self._strangers: set[str] = set()  # inbox entries that are no stream's (logged once)

    # -- start-up --------------------------------------------------------------------------------
    def setup(self) -> None:
        s, self.bundle, self.template, notes = open_fitted(self.settings)
        self.settings = s
        for note in notes:
            log.warning("%s", note)
        try:
            s.state_dir.mkdir(parents=True, exist_ok=True)
            self.lock = StateLock(s.state_dir).acquire()  # before anything in it is touched
        except StateLocked as exc:
            raise StartupError(str(exc)) from exc
        except OSError as exc:
            raise StartupError(f"state.dir: cannot prepare {s.state_dir}: {exc}") from exc
        try:
            self._setup(s)
        except BaseException:
            self.lock.release()
            raise

    def _setup(self, s: Settings) -> None:
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
        self.models = ServedModels(self.registry, self.template, s.bundle,
                                   {st.name: st.model or st.name for st in s.streams},
                                   self.metrics, s.serving.providers or None,
                                   s.serving.intra_op_threads)
        try:
            self.models.start()
        except ModelsError as exc:
            raise StartupError(str(exc)) from exc
        self.journal = Journal(s.state_dir, s.retention.keep_episodes,
                               bundle=self._bundle_identity(), after_rows=self._after_rows(s))
        self.adapter = AdapterClient(s.bundle, s.adaptation.device, s.adaptation.timeout_s,
                                     on_restart=self.metrics.worker_restarts.inc,
                                     cpu_threads=s.adaptation.cpu_threads)
        self.metrics.init_streams([st.name for st in s.streams],
                                  resolve_detector(s.drift.detector, self.bundle.kind),
                                  s.drift.feature_detector)
        self.pending = PendingFiles(s.ingest.settle_s)
        self.streams = Streams(s, self.bundle, self.models, self.adapter, self.journal,
                               self.metrics, self.degraded.fail)
        self.inbox = Inbox(self.layout, self.bundle, self.models, self.streams, LabelCache(
            s.ingest.label_cache, s.ingest.label_cache_bytes), self.pending, self.metrics,
            self.degraded, s, portfolios=build_portfolios(s, self.bundle))
        self.commands = Commands(s.state_dir / "triggers", s.state_dir, self.inbox, self.streams,
                                 self.metrics, self.degraded, self.reload)
        if s.metrics.enabled:  # before the worker: a taken port must not leave a worker behind
            try:
                self._http = serve_http(self.metrics, s.metrics.address, s.metrics.port)
            except OSError as exc:
                raise StartupError(
                    f"metrics.port: cannot listen on {s.metrics.address}:{s.metrics.port}: "
                    f"{exc.strerror or exc} (another process holds it? choose another port, or "
                    "set metrics.enabled = false)") from exc
            log.info("metrics on http://%s:%d/metrics", s.metrics.address, s.metrics.port)
        self.streams.start()
        self.adapter.start()
        self.watcher = InboxWatcher(self.layout, self.streams.states, self.events)
        self.watcher.start()
        self.rescan()

    def _bundle_identity(self) -> dict:
        """What an episode records of the bundle it adapted, so a harvest can say which base
        each task was met under."""
        sums = self.bundle.meta.get("sha256") or {}
        return {"path": str(self.settings.bundle), "weights_sha256": sums.get("weights.safetensors"),
                "algorithm": self.bundle.meta.get("algorithm")}

    def _after_rows(self, s: Settings) -> int:
        if s.retention.episode_after_rows is not None:
            return s.retention.episode_after_rows
        return int(self.bundle.support_rows or s.adaptation.support_size)

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
        """One turn of the control loop (tests call it directly)."""
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
                if not self.inbox.handle(stream, path):
                    break  # the disk is still full: the rest wait for the next try
        if now - self._last["rescan"] >= self.settings.ingest.rescan_interval_s:
            self.rescan()
        if now - self._last["triggers"] >= 0.25:
            self._last["triggers"] = now
            self.commands.handle_all()
        self.streams.poll()
        if self.adapter.ready != self._worker_ready:
            self._worker_ready = self.adapter.ready
            self.metrics.worker_up.set(1 if self._worker_ready else 0)
            self.streams.changed = True  # `edgemeta status` shows the worker coming and going
        if self.notifier.watchdog_due(now):
            self.notifier.ping(now)
        if ((self.streams.changed or self.degraded.changed)
                and now - self._last["status"] >= 0.5):
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
        self._last["rescan"] = time.monotonic()
        for name in self.layout.strangers(self.streams.states):
            if name not in self._strangers:
                self._strangers.add(name)
                log.warning("inbox/%s is not a configured stream (streams: %s): nothing in it is "
                            "read", name, ", ".join(self.streams.states))
        for stream, path in self.layout.scan(self.streams.states):
            if path not in self.inbox.stuck:
                self.pending.add(stream, path)

    # -- driving the daemon in-process (the stream benchmark and tests) ---------------------------
    def feed(self, stream: str, x: np.ndarray, y: np.ndarray | None = None,
             ids: list | None = None) -> tuple[list, int]:
        """Serve raw rows on ``stream`` and learn from their labels (or keep them for delayed
        labels): the path every inbox file takes, without the file. Returns the predictions and
        the version that made them."""
        inputs = self.inbox.normalize(x)
        outputs, version = self.inbox.predict(stream, inputs)
        served, members = self.inbox.mix(stream, inputs, outputs, version)
        self.inbox.observe(stream, x, inputs, outputs, version, y, ids, members)
        return self.inbox.predictions(served), version

    def drain(self, timeout: float = 60.0) -> bool:
        """Finish every adaptation under way, as the daemon would over its next turns; False when
        ``timeout`` ran out first. (The daemon itself never waits: it serves meanwhile.)"""
        deadline = time.monotonic() + timeout
        while self.streams.busy and time.monotonic() < deadline:
            self.streams.poll(wait=0.002)
        return not self.streams.busy

    # -- operator commands -----------------------------------------------------------------------
    def reload(self) -> None:
        """SIGHUP: re-read the config and apply what a reload can, re-load every lineage from the
        registry (a `models rollback` may have moved a pointer).

        The new config is checked exactly as start-up checks it (against the bundle too): one
        that would not start is refused and the running one stays, with the reason logged and
        counted. Of an accepted one, the keys a reload can apply are applied and each key that
        needs a restart is named (`edgemeta config docs` lists which is which); detectors,
        collections and regimes are rebuilt only where their own settings changed.
        """
        self.notifier.reloading()
        log.info("reloading")
        new = self._checked_reload()
        if new is not None:
            new, changed = new
            self.settings = self.inbox.settings = new
            self.adapter.timeout_s = new.adaptation.timeout_s
            self.pending.settle_s = new.ingest.settle_s
            self.journal.keep_episodes = new.retention.keep_episodes
            self.journal.after_rows = self._after_rows(new)
            self.registry.keep = new.retention.keep_models
            self.streams.reload(new, changed)
            self.metrics.reloads.labels("applied").inc()
            log.info("reload applied: %s", ", ".join(changed) or "no key changed")
        try:
            self.models.load(self.models.lineages())
        except (RegistryError, ModelsError) as exc:
            log.error("reload: keeping the serving models: %s", exc)
        self.notifier.ready(self.summary())

    def _checked_reload(self) -> tuple[Settings, list[str]] | None:
        if self.settings.source is None:
            return None
        try:
            new = load_config(self.settings.source)
            new, _, _, notes = open_fitted(new)  # start-up's checks, and the bundle's shape
            for note in notes:
                log.warning("reload: %s", note)
        except (ConfigError, StartupError) as exc:
            log.error("reload refused, the running config stays: %s", exc)
            self.metrics.reloads.labels("refused").inc()
            return None
        changed = changed_keys(self.settings, new)
        for key in [k for k in changed if not reloadable(k)]:
            log.warning("reload: %s changed; it takes effect on restart (running with the old "
                        "value)", key)
            _keep_running_value(new, self.settings, key)
        return new, [k for k in changed if reloadable(k)]

    # -- status and shutdown ---------------------------------------------------------------------
    def summary(self) -> str:
        streams = getattr(self, "streams", None)
        states = streams.states.values() if streams else []
        served = ", ".join(f"{st.name} v{self.models.version(st.name)}" for st in states)
        drifting = [st.name for st in states if st.machine.unresolved]
        degraded = (f"; DEGRADED ({', '.join(self.degraded.state.reasons)}): ingest paused"
                    if self.degraded.active else "")
        return (f"serving {served or 'nothing yet'}; drift: {', '.join(drifting) or 'none'}"
                f"{degraded}")

    def _view(self, name: str):
        view = self.streams.view(name)
        portfolio = self.inbox.portfolios.get(name)
        return view if portfolio is None else dataclasses.replace(view, portfolio=portfolio.view())

    def write_status(self) -> None:
        self.streams.changed = self.degraded.changed = False
        self._last["status"] = time.monotonic()
        self.notifier.status(self.summary())
        worker = {"ready": self.adapter.ready, "pid": self.adapter.pid,
                  "device": self.adapter.info.get("device"), "restarts": self.adapter.restarts}
        try:
            self.journal.write_status(os.getpid(), worker, {
                name: self._view(name) for name in self.streams.states},
                self.degraded.state.reasons)
        except OSError as exc:
            # status.json is a view for operators: a full disk must not stop serving for it, and
            # it neither starts nor ends degraded mode (only the paused work going through ends
            # it: a status write that fits where a predictions file does not made the mode flap).
            # `edgemeta status` reads the mode from /metrics, which a full disk cannot stop.
            if not self._status_failing:
                log.error("cannot write status.json: %s (edgemeta status reads /metrics)", exc)
            self._status_failing = True
            self.streams.changed = True
            return
        self._status_failing = False

    def shutdown(self, drain_s: float = 5.0) -> int:
        self.notifier.stopping("draining")
        if self.watcher:
            self.watcher.stop()
        for stream, path in self.pending.ready(time.monotonic() + 3600):
            self.inbox.handle(stream, path)  # files already seen and settled: finish them
        self.streams.stopping()
        self.drain(drain_s)
        self.adapter.stop(timeout=2.0)
        if self._http is not None:
            self._http.shutdown()
        self.write_status()
        self.lock.release()
        log.info("stopped")
        return 0
