"""The one path by which what a stream is served changes.

A gated candidate, a recalled concept, an automatic rollback after probation and an operator's
rollback all change which model answers a lineage's streams, and each must do the same things
in the same order: commit the version (all or nothing: a full disk leaves the registry and the
serving model untouched), install the loaded session, put the new version on probation against
the one it replaced, tell every other stream of the lineage that its model changed (their
detectors and refinements were about the old one), count and log it. Before this module the
four paths did different subsets of that (a recall never told its sibling streams).

The lifecycle hears of each change as an event (``Finished``/``Recalled`` for the stream that
asked, ``Swapped`` for its siblings, ``RolledBack`` for every stream of a rolled-back lineage).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np

from edgemeta.daemon import lifecycle as lc
from edgemeta.daemon.gate import per_sample_loss
from edgemeta.daemon.journal import Journal
from edgemeta.daemon.metrics import Metrics
from edgemeta.daemon.models import Replaced, ServedModels
from edgemeta.daemon.sanity import Probation
from edgemeta.daemon.stream_state import StreamState
from edgemeta.serve.predictor import Live, run
from edgemeta.serve.registry import Manifest, RegistryError

log = logging.getLogger("edgemeta.daemon")


class Promotion:
    def __init__(self, models: ServedModels, metrics: Metrics, journal: Journal,
                 states: dict[str, StreamState], emit: Callable[[StreamState, lc.Event], None],
                 probation_rows: int):
        self.models = models
        self.metrics = metrics
        self.journal = journal
        self.states = states
        self.emit = emit
        self.probation_rows = probation_rows  # adaptation.holdout_size (a reload may change it)

    def promote(self, stream: str, model: bytes, live: Live,
                weights: dict[str, np.ndarray], source: str, previous_level: float | None,
                timings: dict[str, float] | None = None, **manifest_fields) -> Manifest:
        """Serve a judged model on ``stream``'s lineage. Raises OSError when it cannot be
        stored (nothing changed). ``previous_level``: the replaced model's loss on the rows that
        judged the new one, against which probation tells a changed world from a worse model."""
        state = self.states[stream]
        manifest, replaced = self.models.promote(stream, model, live, weights, source=source,
                                                 timings=timings, **manifest_fields)
        state.probation = Probation(self.probation_rows, replaced, replaced.version,
                                    manifest.version, previous_level)
        self._tell_lineage(state.lineage, lc.Swapped(), but=state)
        return manifest

    def rollback(self, lineage: str, to: int | None = None, note: str | None = None,
                 replaced: Replaced | None = None) -> Manifest:
        """Serve an earlier version of ``lineage`` again (an operator's, or probation's)."""
        manifest = self.models.rollback(lineage, to=to, note=note, replaced=replaced)
        self._tell_lineage(lineage, lc.RolledBack())
        return manifest

    def judge(self, state: StreamState, x: np.ndarray, y: np.ndarray, losses: np.ndarray,
              judged: np.ndarray | None, normalize: Callable[[np.ndarray], np.ndarray],
              kind: str) -> str | None:
        """Probation: score the rows the new version served with the version it replaced as
        well; roll back at once when they show it worse. Returns the verdict once there is one;
        ``'changed'`` (the replaced version errs unlike it did on the holdout: the world changed)
        is the caller's drift."""
        probation = state.probation
        if self.models.version(state.name) != probation.new_version:
            state.probation = None  # another swap (or a rollback) has replaced it already
            return None
        mask = np.ones(len(x), bool) if judged is None else np.asarray(judged, bool)
        if not mask.any():
            return None
        old = run(probation.previous.live, normalize(x[mask]))
        probation.add(losses[mask], per_sample_loss(kind, old, np.asarray(y)[mask]))
        verdict = probation.verdict()
        if verdict is not None:
            state.probation = None
        if verdict == "worse":
            self.probation_failed(state, probation)
        elif verdict == "changed":
            log.warning("stream=%s: on the rows after v%d was swapped in, the v%d it replaced "
                        "errs unlike it did on the holdout: the world changed (a drift, not a "
                        "verdict on v%d)", state.name, probation.new_version,
                        probation.previous_version, probation.new_version)
        return verdict

    def probation_failed(self, state: StreamState, probation: Probation) -> None:
        """The rows after a swap showed the new version worse than the one it replaced."""
        fig = probation.figures()
        note = (f"automatic rollback: v{probation.new_version} was worse than "
                f"v{probation.previous_version} on the next {fig['rows']} labelled rows of stream "
                f"{state.name} (mean loss {fig['new_loss']:.4g} vs {fig['old_loss']:.4g})")
        previous: Replaced = probation.previous
        try:
            manifest = self.rollback(state.lineage, to=previous.version, note=note,
                                     replaced=previous)
        except (RegistryError, OSError) as exc:
            log.error("automatic rollback to v%s failed: %s", previous.version, exc)
            return
        self.metrics.rollbacks.labels(state.name).inc()
        log.warning("%s: now serving v%d", note, manifest.version)
        self.journal.note({"stream": state.name, "trigger": "rollback", "result": "rolled_back",
                           "reason": "worse_after_swap", "serving_version": manifest.version,
                           **fig})

    def _tell_lineage(self, lineage: str, event: lc.Event, but: StreamState | None = None) -> None:
        for other in self.states.values():
            if other is not but and other.lineage == lineage:
                other.probation = None  # the version it was judging no longer serves
                self.emit(other, event)
