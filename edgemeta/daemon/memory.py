"""Concept memory: the models fitted to earlier regimes, kept loaded so a recurring one is recalled.

Why: streams revisit their concepts (a machine's modes, day and night, seasons). After a drift the
daemon used to adapt from the meta-initialization again although it had served a model fitted to
that very regime before. When a drift is detected, the model that served the regime that just
ended joins a bounded library (per lineage, least recently useful out first) with the statistics
of the rows it served. After the next drift, the rows seen since the change point judge every
remembered model against the serving one with the gate's paired test; the best is recalled at once
(a new version, source ``recall``) when the evidence says it is better, and the fresh adaptation
goes on beside it and must then beat the recalled model.

A concept is its weights, not its version: a recalled model is committed under a new version,
and remembering that copy again at the next drift refreshes the concept instead of filling the
library with copies of one regime (which evicted the others).

>>> w = {v: {"w": np.full(2, float(v))} for v in (3, 5, 7)}
>>> m = ConceptMemory(capacity=2)
>>> for v in (3, 5, 7):
...     m.remember("s", Concept(v, b"", None, w[v], {}))
>>> [c.version for c in m.concepts("s")]
[5, 7]
>>> m.remember("s", Concept(9, b"", None, w[5], {}))  # v9: a recalled copy of v5
>>> [c.version for c in m.concepts("s")]
[7, 5]
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgemeta.serve.predictor import Live


@dataclass
class Concept:
    """One remembered model: its version, graph (what a recall commits), loaded session and
    weights (what it installs), and the regime it served (row count, feature and label means)."""

    version: int
    model: bytes = field(repr=False)
    live: Live | None = field(repr=False)
    weights: dict[str, np.ndarray] = field(repr=False)
    regime: dict[str, Any]
    recalls: int = 0
    # The weights' hash, computed once: every recall compares it with the serving model's.
    key: str = field(init=False, repr=False, default="")

    def __post_init__(self) -> None:
        self.key = weights_key(self.weights)


def weights_key(weights: Mapping[str, np.ndarray]) -> str:
    """The identity of a model: a hash of its weights, whatever version number it carries."""
    h = hashlib.sha256()
    for name in sorted(weights):
        value = np.ascontiguousarray(weights[name])
        h.update(name.encode())
        h.update(str(value.dtype).encode() + str(value.shape).encode())
        h.update(value.tobytes())
    return h.hexdigest()


def regime_stats(rows: list[tuple[Any, float]]) -> dict[str, Any]:
    """What a remembered model was fitted on, for the record (and an operator's eyes)."""
    if not rows:
        return {"rows": 0}
    x = np.asarray([r[0] for r in rows], dtype=np.float64)
    y = np.asarray([r[1] for r in rows], dtype=np.float64)
    return {"rows": len(rows), "x_mean": x.mean(axis=0).round(6).tolist(),
            "y_mean": round(float(y.mean()), 6), "y_std": round(float(y.std()), 6)}


class ConceptMemory:
    def __init__(self, capacity: int = 8):
        self.capacity = capacity
        self._by_lineage: dict[str, OrderedDict[str, Concept]] = {}

    def remember(self, lineage: str, concept: Concept) -> None:
        """Keep ``concept``; one already kept (the same weights under any version) is refreshed
        and keeps its first version and recall count; the stalest beyond ``capacity`` is
        dropped (and its session with it)."""
        if self.capacity <= 0:
            return
        kept = self._by_lineage.setdefault(lineage, OrderedDict())
        key = concept.key
        if key in kept:
            kept.move_to_end(key)
            return
        kept[key] = concept
        while len(kept) > self.capacity:
            kept.popitem(last=False)

    def used(self, lineage: str, concept: Concept) -> None:
        """A recalled concept is the most useful one: it is dropped last."""
        kept = self._by_lineage.get(lineage)
        if kept and concept.key in kept:
            kept[concept.key].recalls += 1
            kept.move_to_end(concept.key)

    def concepts(self, lineage: str) -> list[Concept]:
        return list(self._by_lineage.get(lineage, {}).values())

    def knows(self, lineage: str, weights: Mapping[str, np.ndarray]) -> bool:
        return weights_key(weights) in self._by_lineage.get(lineage, {})
