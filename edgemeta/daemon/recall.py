"""Recall: when a regime recurs, serve the model fitted to it before instead of adapting anew.

At each drift the model that served the regime just ended is remembered (``memory.py``, one
entry per set of weights). The rows seen since the change point, and later the drift episode's
support and holdout, judge every remembered model against the serving one with the gate's
paired test; the best is served at once (through ``promotion.py``, as a new version with source
``recall``) when the evidence says it is better. Those rows must first pass the same label
sanity checks as any support set: a poisoned label stream must not pick a model either.

Each stream looks at most twice per drift, so each look is at ``gate.alpha / 2``: a remembered
model that is in truth no better is recalled at most ``gate.alpha`` of the time.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np

from edgemeta.bundle_format import BundleInfo
from edgemeta.config import Settings
from edgemeta.daemon import lifecycle as lc
from edgemeta.daemon.gate import decide, per_sample_loss, row_losses
from edgemeta.daemon.journal import Journal
from edgemeta.daemon.memory import Concept, ConceptMemory, regime_stats, weights_key
from edgemeta.daemon.metrics import Metrics
from edgemeta.daemon.models import ServedModels
from edgemeta.daemon.promotion import Promotion
from edgemeta.daemon.sanity import degenerate_labels, skill
from edgemeta.daemon.stream_state import StreamState
from edgemeta.fsio import is_storage_error
from edgemeta.serve.predictor import run
from edgemeta.serve.registry import RegistryError

log = logging.getLogger("edgemeta.daemon")

LOOKS = 2  # per drift: at the alarm, and on the drift episode's rows


class Recall:
    def __init__(self, settings: Settings, bundle: BundleInfo, models: ServedModels,
                 promotion: Promotion, journal: Journal, metrics: Metrics,
                 emit: Callable[[StreamState, lc.Event], None],
                 degrade: Callable[[OSError, str], None]):
        self.settings = settings
        self.bundle = bundle
        self.kind = bundle.kind
        self.models = models
        self.promotion = promotion
        self.journal = journal
        self.metrics = metrics
        self.emit = emit
        self.degrade = degrade
        self.memory = ConceptMemory(settings.memory.capacity)

    def remember(self, state: StreamState) -> None:
        """The regime that just ended was served by this model: keep it for when it recurs."""
        served = self.models.of(state.name)
        if (self.memory.capacity <= 0 or served.bare
                or self.memory.knows(state.lineage, served.weights)):
            return
        try:
            model, _ = self.models.registry.load(served.version)
        except (RegistryError, OSError) as exc:
            log.warning("stream=%s: cannot remember v%d: %s", state.name, served.version, exc)
            return
        self.memory.remember(state.lineage, Concept(served.version, model, served.predictor.live,
                                                    dict(served.weights),
                                                    regime_stats(state.regime.rows())))

    def attempt(self, state: StreamState, x: np.ndarray, y: np.ndarray) -> bool:
        """Serve the remembered model that these rows (since the change point) prefer, when the
        paired test says it beats the serving one; True when one now serves."""
        concepts = self.memory.concepts(state.lineage)
        served = self.models.of(state.name)
        if state.recalled or not concepts or len(y) < self.settings.memory.min_rows:
            return False
        problem = degenerate_labels(self.kind, y, np.asarray(state.history),
                                    self.bundle.target_range)
        if problem is not None:
            log.info("stream=%s: no recall on these labels (%s)", state.name, problem)
            return False
        xn = self.bundle.normalize(x)
        current = row_losses(self.kind, run(served.predictor.live, xn), y)
        scored, serving = [], weights_key(served.weights)
        for concept in concepts:
            if concept.key != serving:
                out = run(concept.live, xn)
                scored.append((row_losses(self.kind, out, y), out, concept))
        if not scored:
            return False
        rows, out, best = min(scored, key=lambda item: float(np.mean(item[0])))
        g = self.settings.gate
        decision = decide(current, rows, g.alpha / LOOKS, g.min_gain)
        if not decision.accepted:
            return False
        recalled_rows = per_sample_loss(self.kind, out, y)
        if skill(self.kind, y, recalled_rows) <= 0:
            # Held to what any candidate is held to: a model no better than the labels' own
            # mean (or majority class) on these rows is not served, however bad the serving
            # one is (the drift episode's adaptation will challenge that).
            log.info("stream=%s: v%d beats the serving model on %d rows since the change but "
                     "not the trivial predictor; not recalled", state.name, best.version, len(y))
            return False
        expected = float(recalled_rows.mean())
        try:
            manifest = self.promotion.promote(
                state.name, best.model, best.live, best.weights, source="recall",
                previous_level=float(per_sample_loss(self.kind, run(served.predictor.live, xn),
                                                     y).mean()),
                holdout={"current": decision.current, "candidate": decision.candidate},
                note=f"recalled v{best.version}, fitted on an earlier regime {best.regime}")
        except OSError as exc:
            if is_storage_error(exc):
                self.degrade(exc, "committing a recalled version")
            return False
        state.recalled = True
        self.memory.used(state.lineage, best)
        self.metrics.recalls.labels(state.name).inc()
        # Recorded like an episode: the rows since the change point were its holdout.
        self.journal.record(state.name, "recall", "accepted", f"recalled_v{best.version}",
                            manifest.version, (x[:0], y[:0]), (x, y), {},
                            {"holdout_current": decision.current, "version": manifest.version,
                             "holdout_candidate": decision.candidate, "p_value": decision.p_value,
                             "recalled_version": best.version, "regime": best.regime})
        log.warning("stream=%s: recalled v%d (fitted on an earlier regime) as v%d: %.4g -> %.4g "
                    "on %d rows since the change", state.name, best.version, manifest.version,
                    decision.current, decision.candidate, len(y))
        self.emit(state, lc.Recalled(expected))
        return True
