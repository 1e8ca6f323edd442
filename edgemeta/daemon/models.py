"""The models the daemon serves: one lineage per stream (or per group of streams that share one),
each with its own live session, all adapted from the bundle's shared meta-initialization.

Why lineages: on a device with several sensors whose concepts drift independently, one shared
model makes the streams fight: a drift on one swaps the model every other stream is served by.
Here a promotion, a rollback and a probation touch one lineage; the streams that share it are told
(their detectors see a new model), the others are not.

Start-up always serves something valid: a lineage's pointer if its version is the bundle's graph
and loads, else the newest usable version, else the bundle's meta-initialization committed afresh.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgemeta.daemon.metrics import Metrics
from edgemeta.serve.onnx_weights import OnnxTemplate
from edgemeta.serve.predictor import Live, Predictor, PredictorError
from edgemeta.serve.registry import Manifest, Registry, RegistryError

log = logging.getLogger("edgemeta.daemon")


class ModelsError(RuntimeError):
    """Nothing can be served (the bundle's own model does not load or cannot be stored)."""


@dataclass
class Served:
    """One lineage's serving model: the live session (in ``predictor``), its weights (a
    ``start_from = "current"`` adaptation starts from them) and its manifest."""

    lineage: str
    predictor: Predictor
    weights: dict[str, np.ndarray]
    manifest: Manifest
    bare: bool = False  # the weights are the bundle's meta-initialization, never adapted

    @property
    def version(self) -> int:
        return self.manifest.version


@dataclass(frozen=True)
class Replaced:
    """The model a swap replaced, kept loaded while the new one is on probation."""

    live: Live
    weights: dict[str, np.ndarray]
    version: int


class ServedModels:
    def __init__(self, registry: Registry, template: OnnxTemplate, bundle: Path,
                 lineage_of: dict[str, str], metrics: Metrics,
                 providers: list[str] | None = None, intra_op_threads: int = 0):
        self.registry = registry
        self.template = template
        self.bundle = Path(bundle)
        self.lineage_of = dict(lineage_of)  # stream -> lineage
        self.metrics = metrics
        self.providers = providers
        self.intra_op_threads = intra_op_threads
        self._served: dict[str, Served] = {}
        self._meta_init = template.weights()

    # -- reading ---------------------------------------------------------------------------------
    def lineages(self) -> list[str]:
        return sorted(set(self.lineage_of.values()))

    def streams_of(self, lineage: str) -> list[str]:
        return [s for s, lin in self.lineage_of.items() if lin == lineage]

    def of(self, stream: str) -> Served:
        return self._served[self.lineage_of[stream]]

    def version(self, stream: str) -> int:
        return self.of(stream).version

    def predict(self, stream: str, x: np.ndarray) -> tuple[np.ndarray, int]:
        """Outputs of ``stream``'s serving model for normalized rows, and its version."""
        return self.of(stream).predictor.predict(x)

    # -- start-up and reload ---------------------------------------------------------------------
    def start(self) -> None:
        """Record the bundle's meta-initialization and load every lineage."""
        try:
            self.registry.init_from_bundle(self.bundle)
        except RegistryError as exc:
            raise ModelsError(f"bundle.path: {exc}") from exc
        except OSError as exc:
            # A full disk must not stop a start: versions already committed can still serve.
            log.error("cannot record the bundle's meta-initialization: %s", exc)
        self.load(self.lineages())

    def load(self, lineages: Iterable[str]) -> None:
        """(Re)load each lineage from its pointer (a ``models rollback`` may have moved it)."""
        for lineage in lineages:
            self._load(lineage)

    def _try(self, version: int, predictor: Predictor) -> tuple[bytes, Manifest, Live]:
        data, manifest = self.registry.load(version)
        problem = self.template.mismatch(data)
        if problem is not None:
            raise RegistryError(f"version {version}: {problem}")
        return data, manifest, predictor.swap(data, version)

    def _load(self, lineage: str) -> None:
        old = self._served.get(lineage)
        predictor = old.predictor if old else Predictor(self.providers, self.intra_op_threads)
        current = self.registry.current_version(lineage)
        if current is None:
            log.warning("%s is missing or unreadable: serving the newest usable version",
                        self.registry.pointer(lineage))
        order = ([current] if current is not None else []) + [
            v for v in reversed(self.registry.versions()) if v != current]
        loaded = None
        for version in order:
            try:
                loaded = self._try(version, predictor)
                break
            except (RegistryError, PredictorError) as exc:
                log.error("model refused: %s", exc)
                self.metrics.model_load_failures.inc()
        if loaded is None:
            loaded = self._reseed(predictor)
        data, manifest, live = loaded
        if manifest.version != self.registry.current_version(lineage, inherit=False):
            try:
                self.registry.activate(manifest.version, lineage)
            except (RegistryError, OSError) as exc:
                log.error("cannot point lineage %s at v%d: %s", lineage, manifest.version, exc)
        weights = OnnxTemplate(data, self.template.parameter_names).weights()
        self._served[lineage] = Served(lineage, predictor, weights, manifest,
                                       self._is_meta_init(weights))
        self._publish(lineage)
        log.info("lineage %s serves version=%d source=%s provider=%s", lineage, manifest.version,
                 manifest.source, live.provider)

    def _reseed(self, predictor: Predictor) -> tuple[bytes, Manifest, Live]:
        """No registry version is usable: serve the bundle's meta-initialization again."""
        data = (self.bundle / "model.onnx").read_bytes()
        try:
            live = predictor.swap(data, 0)
        except PredictorError as exc:
            raise ModelsError(f"bundle.path: the bundle's model does not load: {exc}") from exc
        try:
            manifest = self.registry.commit(data, source="meta-init", parent=None, note=(
                f"re-seeded from bundle {self.bundle}: no stored version was usable"))
        except OSError as exc:
            raise ModelsError(f"state.dir: no stored version is usable and the bundle's model "
                              f"cannot be stored: {exc}") from exc
        log.warning("no stored version was usable: serving the bundle's meta-initialization as "
                    "v%d", manifest.version)
        live = predictor.install(dataclasses.replace(live, version=manifest.version))
        return data, manifest, live

    # -- changing what serves --------------------------------------------------------------------
    def promote(self, stream: str, model: bytes, candidate: Live, weights: dict[str, np.ndarray],
                source: str, timings: dict[str, float] | None = None,
                **manifest_fields) -> tuple[Manifest, Replaced]:
        """Commit a gated candidate to ``stream``'s lineage and install it; the one way a new
        version starts serving. Raises OSError (the registry is untouched) when it cannot be
        stored. ``timings`` gets the ``commit`` and ``swap`` seconds."""
        timings = {} if timings is None else timings
        served = self.of(stream)
        t = time.perf_counter()
        manifest = self.registry.commit(
            model, source=source, parent=served.version, stream=stream,
            lineage=served.lineage, **manifest_fields)
        timings["commit"] = time.perf_counter() - t
        t = time.perf_counter()
        replaced = Replaced(served.predictor.live, served.weights, served.version)
        self._install(served, candidate, dict(weights), manifest)
        timings["swap"] = time.perf_counter() - t
        return manifest, replaced

    def rollback(self, lineage: str, to: int | None = None, note: str | None = None,
                 replaced: Replaced | None = None) -> Manifest:
        """Serve an earlier version of ``lineage`` again (a new version, source ``rollback``);
        ``replaced``: the version's session is still loaded (probation), so nothing is re-read."""
        manifest = self.registry.rollback(to=to, note=note, lineage=lineage)
        if replaced is None:
            self._load(lineage)
            return manifest
        self._install(self._served[lineage], replaced.live, replaced.weights, manifest)
        return manifest

    def _install(self, served: Served, live: Live, weights: dict[str, np.ndarray],
                 manifest: Manifest) -> None:
        """Serve an already loaded session as ``manifest``'s version of ``served``'s lineage."""
        served.predictor.install(dataclasses.replace(live, version=manifest.version))
        served.weights, served.manifest = weights, manifest
        served.bare = self._is_meta_init(weights)
        self._publish(served.lineage)

    def _is_meta_init(self, weights: dict[str, np.ndarray]) -> bool:
        """Whether ``weights`` are the bundle's own: status says so, since such a model has
        learned nothing from this device (a rollback can bring it back under another source)."""
        return weights.keys() == self._meta_init.keys() and all(
            np.array_equal(weights[n], w) for n, w in self._meta_init.items())

    def _publish(self, lineage: str) -> None:
        served = self._served[lineage]
        for stream in self.streams_of(lineage):
            self.metrics.set_model(stream, served.manifest.version, served.manifest.created,
                                   served.manifest.source, served.predictor.provider)
            self.metrics.meta_init.labels(stream).set(1 if served.bare else 0)
