"""Operator commands: trigger files in ``<state>/triggers/`` acted on by the control loop.

Whatever a trigger file holds, it ends in ``triggers/done/`` with a result file (ok, rejected with
a reason, or failed with the error), is counted, and never stops the daemon; only a full disk
leaves it in place for a later retry.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from edgemeta.daemon.degraded import DegradedMode
from edgemeta.daemon.inbox import Inbox
from edgemeta.daemon.metrics import Metrics
from edgemeta.daemon.models import ModelsError
from edgemeta.daemon.streams import Streams
from edgemeta.daemon.triggers import Trigger, TriggerRejected, finish, parse_trigger, pending
from edgemeta.fsio import is_storage_error
from edgemeta.serve.predictor import PredictorError
from edgemeta.serve.registry import RegistryError
from edgemeta.stream.budget import TooSlow, time_budget
from edgemeta.stream.ingest import IngestError, parse_rows

log = logging.getLogger("edgemeta.daemon")

MAX_TRIGGER_SECONDS = 1.0  # a trigger is a few bytes of JSON: reading one never takes longer


class Commands:
    def __init__(self, directory: Path, state_dir: Path, inbox: Inbox, streams: Streams,
                 metrics: Metrics, degraded: DegradedMode, reload: Callable[[], None]):
        self.directory = directory
        self.state_dir = state_dir
        self.inbox = inbox
        self.streams = streams
        self.metrics = metrics
        self.degraded = degraded
        self.reload = reload
        self.stuck: set[Path] = set()  # triggers that could not be moved to done/ (logged once)

    def handle_all(self) -> None:
        try:
            paths = pending(self.directory)
        except OSError as exc:
            log.error("cannot list %s: %s", self.directory, exc)
            return
        for path in paths:
            if path not in self.stuck:
                self.handle(path)

    def handle(self, path: Path) -> None:
        """Act on one trigger file; whatever it holds, it ends in triggers/done/ with a result."""
        try:
            with time_budget(MAX_TRIGGER_SECONDS):
                trigger = parse_trigger(path, self.state_dir, list(self.streams.states))
        except TooSlow as exc:
            log.warning("trigger rejected file=%s reason=too_slow: %s", path.name, exc)
            return self._finish(path, "rejected", "too_slow", f"{path.name}: {exc} to read")
        except TriggerRejected as exc:
            log.warning("trigger rejected file=%s reason=%s: %s", path.name, exc.reason, exc)
            return self._finish(path, "rejected", exc.reason, str(exc))
        except Exception as exc:  # noqa: BLE001 - containment: no trigger may stop the daemon
            log.exception("internal error reading trigger %s", path.name)
            self.metrics.internal_errors.labels("trigger").inc()
            return self._finish(path, "rejected", "internal_error",
                                f"{type(exc).__name__}: {exc}"[:2000])
        try:
            message = self.act(trigger)
        except (RegistryError, PredictorError, IngestError, ModelsError) as exc:
            log.error("trigger failed file=%s: %s", path.name, exc)
            return self._finish(path, "failed", "error", str(exc))
        except Exception as exc:  # noqa: BLE001
            if is_storage_error(exc):
                self.degraded.fail(exc, f"trigger {path.name} (it stays for a later retry)")
                return None
            log.exception("internal error acting on trigger %s", path.name)
            self.metrics.internal_errors.labels("trigger").inc()
            return self._finish(path, "failed", "internal_error",
                                f"{type(exc).__name__}: {exc}"[:2000])
        log.info("trigger %s: %s", path.name, message)
        # The stream it acted on, so `trigger --wait` can follow it without parsing the message.
        stream = trigger.args.get("stream")
        return self._finish(path, "ok", "", message, {"stream": stream} if stream else None)

    def _finish(self, path: Path, result: str, reason: str, message: str,
                extra: dict | None = None) -> None:
        try:
            finish(path, result, message, {**({"reason": reason} if reason else {}),
                                           **(extra or {})} or None)
        except OSError as exc:
            # Not even done/ takes it: remember it so it is not acted on again every turn.
            log.error("cannot move trigger %s to done/: %s", path.name, exc)
            self.stuck.add(path)
            if is_storage_error(exc):
                self.degraded.fail(exc, f"moving trigger {path.name}")
        self.metrics.triggers.labels(result, reason).inc()

    def act(self, trigger: Trigger) -> str:
        if trigger.command == "reload":
            self.reload()
            return "reloaded"
        if trigger.command == "rollback":
            models = self.streams.models
            stream = trigger.args.get("stream")
            lineages = [models.lineage_of[stream]] if stream else models.lineages()
            return "; ".join(self.streams.rolled_back(lineage, to=trigger.args.get("version"))
                             for lineage in lineages)
        stream = trigger.args["stream"]
        support = trigger.args.get("support")
        if support is None:
            return self.streams.trigger(stream)
        rows = parse_rows(support, self.inbox.settings.stream(stream), self.inbox.limits,
                          self.inbox.bundle.classes)
        if rows.y is None:
            raise IngestError("wrong_columns", f"{support.name}: a support file needs the label "
                              f"column {self.inbox.settings.stream(stream).label!r}")
        return f"{support.name}: " + self.streams.trigger(stream, (rows.x, rows.y))
