"""From inbox files to served rows: every input ends in processed/ or quarantine/, whatever it
holds, and its predictions are durable before anything is learned from it.

The parsing is pure (``stream/parsing.py``) and the moving of files is the layout's
(``stream/ingest.py``); this is the daemon's part: serve the rows with the stream's model, hand
labelled rows to learning, count and log, and tell a bad file (quarantine) from a full disk
(pause, degraded, the file stays in the inbox).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from edgemeta.bundle_format import BundleInfo
from edgemeta.config import Settings
from edgemeta.daemon.degraded import DegradedMode
from edgemeta.daemon.metrics import Metrics
from edgemeta.daemon.models import ServedModels
from edgemeta.daemon.streams import Streams
from edgemeta.fsio import is_storage_error
from edgemeta.portfolio.portfolio import Portfolio
from edgemeta.stream.budget import TooSlow, time_budget
from edgemeta.stream.ingest import (
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


class Inbox:
    def __init__(self, layout: StateLayout, bundle: BundleInfo, models: ServedModels,
                 streams: Streams, cache: LabelCache, pending: PendingFiles, metrics: Metrics,
                 degraded: DegradedMode, settings: Settings,
                 portfolios: dict[str, Portfolio] | None = None):
        self.layout = layout
        self.bundle = bundle
        self.kind = bundle.kind
        self.models = models
        self.streams = streams
        self.cache = cache
        self.pending = pending
        self.metrics = metrics
        self.degraded = degraded
        self.settings = settings  # the settings in force (a reload replaces them)
        self.stuck: set[Path] = set()  # inputs that could not even be moved aside (logged once)
        self.without_labels: set[str] = set()  # streams told their files lack the label column
        self.portfolios = portfolios or {}  # stream -> its online experts, when configured
        for stream, portfolio in self.portfolios.items():  # every series exists from the start
            for member in portfolio.members[1:]:
                self.metrics.portfolio_dropped.labels(stream, member)
            self._portfolio_metrics(stream)

    @property
    def limits(self) -> Limits:
        """The ingest limits of the settings in force (a reload may change them)."""
        i = self.settings.ingest
        return Limits(i.max_file_bytes, i.max_line_bytes, i.max_json_depth, i.max_npz_members)

    def normalize(self, x: np.ndarray) -> np.ndarray:
        return self.bundle.normalize(x)

    # -- one file ----------------------------------------------------------------------------------
    def handle(self, stream: str, path: Path) -> bool:
        """Handle one input so that it always ends in processed/ or quarantine/; returns False
        only when the disk cannot take writes (the file stays in the inbox and the daemon runs
        degraded until a retry goes through)."""
        if not os.path.lexists(path):
            return True
        try:
            name = self.layout.unique_name(stream, path.name)
            if name != path.name:
                log.warning("stream=%s: an input named %s was processed before: this one is kept "
                            "as %s (its predictions too)", stream, path.name, name)
            with time_budget(self.settings.ingest.max_file_seconds):
                if is_label_file(path.name):
                    learn = self._labels(stream, path)
                else:
                    learn = self._data(stream, path, name)
            self.layout.processed(stream, path, name)
        except TooSlow as exc:
            return self._quarantine(stream, path, IngestError(
                "too_slow", f"{path.name}: {exc} to parse and serve (ingest.max_file_seconds)"))
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
        self.degraded.ok()
        # Learned from only once the file is safely in processed/: a file whose move failed is
        # handled again later, and must not be learned from twice.
        try:
            learn()
        except Exception:  # noqa: BLE001 - containment: the file is handled, serving goes on
            log.exception("internal error learning from stream=%s file=%s", stream, path.name)
            self.metrics.internal_errors.labels("ingest").inc()
        return True

    def _quarantine(self, stream: str, path: Path, exc: IngestError) -> bool:
        try:
            self.layout.quarantine(stream, path, exc)
        except OSError as move_exc:
            if is_storage_error(move_exc):
                return self._storage_failed(stream, path, move_exc)
            if path not in self.stuck:
                log.error("cannot move %s to quarantine (%s): leaving it in the inbox", path,
                          move_exc)
                self.stuck.add(path)
            return True
        self.metrics.quarantined.labels(stream, exc.reason).inc()
        self.metrics.files.labels(stream, "quarantined").inc()
        log.warning("quarantined stream=%s file=%s reason=%s: %s", stream, path.name, exc.reason,
                    exc)
        self.degraded.ok()
        return True

    def _storage_failed(self, stream: str, path: Path, exc: OSError) -> bool:
        self.degraded.fail(exc, f"handling {path.name}")
        self.pending.add(stream, path)
        return False

    def _data(self, stream: str, path: Path, name: str) -> Callable[[], None]:
        """Serve the file's rows and write their predictions; returns the learning to do once
        the file is moved."""
        rows = parse_rows(path, self.settings.stream(stream), self.limits, self.bundle.classes)
        inputs = self.normalize(rows.x)  # once per file: serving, mixing and learning share it
        outputs, version = self.predict(stream, inputs)
        served, members = self.mix(stream, inputs, outputs, version)
        predictions = iter(self.predictions(served))
        weights = iter(self.portfolios[stream].row_weights(members) if members is not None
                       else ())
        records = []
        for i, row_id in enumerate(rows.all_ids):
            if i in rows.refused:
                records.append({"id": row_id, "prediction": None, "version": version,
                                "refused": rows.refused[i].message})
            else:
                record = {"id": row_id, "prediction": next(predictions), "version": version}
                if members is not None:
                    record["experts"] = next(weights)
                records.append(record)
        # Predictions are durable before anything is learned from the rows, so a file retried
        # after a full disk is not learned from twice.
        self.layout.write_predictions(stream, name, records)
        for refusal in rows.refused.values():
            self.metrics.rows_refused.labels(stream, refusal.reason).inc()
        if rows.refused:
            log.warning("stream=%s file=%s: %d row(s) refused, e.g. %s", stream, path.name,
                        len(rows.refused), next(iter(rows.refused.values())).message)
        label = self.settings.stream(stream).label
        if rows.y is None and label and stream not in self.without_labels:
            # Legitimate with delayed labels (label files joined by id); silent otherwise, and a
            # stream that never sees a label never has its drift watched. Said once.
            self.without_labels.add(stream)
            log.warning("stream=%s file=%s has no label column %r: its rows are served and wait "
                        "for a label file joined by id; until labels arrive, drift on this "
                        "stream cannot be detected", stream, path.name, label)
        return lambda: self.observe(stream, rows.x, inputs, outputs, version, rows.y, rows.ids,
                                    members)

    def _labels(self, stream: str, path: Path) -> Callable[[], None]:
        """Join a label file with the cached rows; returns the learning to do once the file is
        moved (the joined rows leave the cache then: a file whose move failed joins again)."""
        labels, refused = parse_labels(path, self.limits, self.bundle.classes)
        if refused:
            self.metrics.labels.labels(stream, "refused").inc(len(refused))
            log.warning("stream=%s file=%s: %d label(s) refused, e.g. %s", stream, path.name,
                        len(refused), next(iter(refused.values())).message)
        xs, ys, outs, versions = [], [], [], []
        joined: list[str] = []
        for row_id, y in labels:
            hit = self.cache.peek(stream, row_id) if row_id not in joined else None
            if hit is not None:
                joined.append(row_id)
                xs.append(hit[0])
                ys.append(y)
                outs.append(hit[1])
                versions.append(hit[2])
        unknown = len(labels) - len(xs)
        if unknown:
            self.metrics.labels.labels(stream, "unknown").inc(unknown)
            log.info("stream=%s file=%s: %d label(s) with unknown or expired ids", stream,
                     path.name, unknown)
        if not xs:
            return lambda: None
        self.metrics.labels.labels(stream, "matched").inc(len(xs))
        y = np.asarray(ys)
        judged = np.asarray(versions) == self.models.version(stream)

        def learn() -> None:
            for row_id in joined:
                self.cache.pop(stream, row_id)
            self.streams.learn(stream, np.asarray(xs), y, np.asarray(outs), judged)
            portfolio = self.portfolios.get(stream)
            members = portfolio.recall(joined) if portfolio is not None else None
            if members is not None:
                portfolio.learn(self.normalize(np.asarray(xs)), y, members)
                self._portfolio_metrics(stream)
        return learn

    # -- rows, from a file or from a caller in this process ---------------------------------------
    def predictions(self, outputs: np.ndarray) -> list:
        return (outputs[:, 0].tolist() if self.kind == "regression"
                else outputs.argmax(axis=1).tolist())

    def predict(self, stream: str, inputs: np.ndarray) -> tuple[np.ndarray, int]:
        """The serving model's outputs on ``inputs``, rows as the model takes them
        (:meth:`normalize`)."""
        started = time.perf_counter()
        if len(inputs) == 0:
            return np.zeros((0, self.bundle.outputs), np.float32), self.models.version(stream)
        outputs, version = self.models.predict(stream, inputs)
        self.metrics.inference_latency.labels(stream).observe(time.perf_counter() - started)
        self.metrics.samples.labels(stream).inc(len(inputs))
        self.metrics.predictions.labels(stream).inc(len(inputs))
        return outputs, version

    def mix(self, stream: str, inputs: np.ndarray, outputs: np.ndarray,
            version: int) -> tuple[np.ndarray, np.ndarray | None]:
        """What to serve: the ONNX outputs, or with a portfolio the mixture of its members
        (and every member's prediction, to judge them by once the labels come)."""
        portfolio = self.portfolios.get(stream)
        if portfolio is None or len(inputs) == 0:
            return outputs, None
        dropped = dict(portfolio.dropped_)
        served, members = portfolio.predict(inputs, outputs, version)
        for name, count in portfolio.dropped_.items():
            if count > dropped.get(name, 0):
                self.metrics.portfolio_dropped.labels(stream, name).inc(count - dropped.get(name, 0))
                log.warning("stream=%s: expert %s dropped from the portfolio (its prediction was "
                            "not finite or far outside the labels' range)", stream, name)
        return served, members

    def _portfolio_metrics(self, stream: str) -> None:
        portfolio = self.portfolios[stream]
        shown = portfolio.view()
        for member, view in shown["members"].items():
            self.metrics.portfolio_champion.labels(stream, member).set(
                1.0 if member == shown["champion"] else 0.0)
            self.metrics.portfolio_weight.labels(stream, member).set(view["weight"])
            # NaN until the member's first labelled row: "no figure yet", not a loss of 0.
            self.metrics.portfolio_loss.labels(stream, member).set(
                float("nan") if view["loss"] is None else view["loss"])

    def observe(self, stream: str, x: np.ndarray, inputs: np.ndarray, outputs: np.ndarray,
                version: int, y: np.ndarray | None = None, ids: list | None = None,
                members: np.ndarray | None = None) -> None:
        """Learn from served rows: their labels now, or later through the label cache. ``x``
        is the raw rows (kept raw: the regime and the cache outlive a bundle's scale), ``inputs``
        the same rows normalized."""
        if len(x) == 0:
            return
        portfolio = self.portfolios.get(stream) if members is not None else None
        if y is not None:
            self.metrics.labels.labels(stream, "inline").inc(len(y))
            self.streams.learn(stream, x, y, outputs)
            if portfolio is not None:
                portfolio.learn(inputs, y, members)
                self._portfolio_metrics(stream)
            return
        row_ids = [str(i) for i in (ids if ids is not None else range(len(x)))]
        if portfolio is not None:
            portfolio.remember(row_ids, members)
        for i, row_id in enumerate(row_ids):
            self.cache.put(stream, row_id, x[i], outputs[i], version)
        if self.settings.drift.feature_detector != "none":
            self.streams.unlabelled(stream, inputs)
