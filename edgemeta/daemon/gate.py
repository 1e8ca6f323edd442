"""The holdout gate: a candidate is served only if it is finite and clearly better.

Both models are judged by the same holdout rows, which the inner loop never saw, and the candidate
is judged as the ONNX artifact that would be served (:func:`evaluate` patches the weights into the
bundle's graph, loads the session that a promotion installs, and runs it), so what is checked is
exactly what is deployed. The early gate (a few holdout rows right after a drift) and the full gate
share one threshold, ``gate.min_gain``; on few rows the early gate also asks for a clear win, or
sends the episode back for the full holdout.

>>> decide(current=1.0, candidate=0.5, min_gain=0.05).accepted
True
>>> decide(current=1.0, candidate=0.97, min_gain=0.05).reason
'not_better'
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

from edgemeta.daemon.sanity import skill
from edgemeta.serve.onnx_weights import OnnxTemplate, WeightPatchError
from edgemeta.serve.predictor import Live, run


@dataclass(frozen=True)
class GateDecision:
    accepted: bool
    reason: str
    current: float
    candidate: float


def per_sample_loss(kind: str, outputs: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Squared error (regression) or 0/1 error (classification), one value per row."""
    outputs = np.asarray(outputs, dtype=np.float64)
    if kind == "regression":
        return (outputs.reshape(len(y), -1)[:, 0] - np.asarray(y, dtype=np.float64)) ** 2
    return (outputs.argmax(axis=1) != np.asarray(y).astype(np.int64)).astype(np.float64)


def holdout_loss(kind: str, outputs: np.ndarray, y: np.ndarray) -> float:
    """Mean MSE, or for classification the cross-entropy (smoother than 0/1 on small holdouts)."""
    outputs = np.asarray(outputs, dtype=np.float64)
    if kind == "regression":
        return float(per_sample_loss(kind, outputs, y).mean())
    shifted = outputs - outputs.max(axis=1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return float(-logp[np.arange(len(y)), np.asarray(y).astype(np.int64)].mean())


def clear_win(current_rows: np.ndarray, candidate_rows: np.ndarray, min_gain: float = 0.0) -> bool:
    """The early gate: on a few rows, accept only a candidate with at most half the loss (and
    within ``min_gain``, like the full gate) that is better on all rows but one; anything less
    waits for the full holdout.

    >>> clear_win(np.array([9.0, 4.0, 7.0, 1.0, 6.0]), np.array([0.1, 0.3, 0.2, 1.5, 0.1]))
    True
    >>> clear_win(np.array([1.0, 1.0, 1.0, 1.0, 1.0]), np.array([0.4, 0.4, 2.0, 2.0, 0.1]))
    False
    """
    wins = int(np.sum(candidate_rows < current_rows))
    share = min(0.5, 1.0 - min_gain)
    return (bool(np.all(np.isfinite(candidate_rows))) and wins >= len(current_rows) - 1
            and float(candidate_rows.mean()) <= share * float(current_rows.mean()))


def decide(current: float, candidate: float, min_gain: float) -> GateDecision:
    """Accept when ``candidate <= current * (1 - min_gain)`` and the candidate is finite."""
    if not math.isfinite(candidate):
        return GateDecision(False, "non_finite", current, candidate)
    if math.isfinite(current) and candidate > current * (1 - min_gain):
        return GateDecision(False, "not_better", current, candidate)
    return GateDecision(True, "better", current, candidate)


@dataclass(frozen=True)
class Verdict:
    """What the gate decided, with what a promotion needs (the loaded candidate) and the figures
    an episode record keeps.

    ``result`` is ``accepted``, ``rejected``, ``inconclusive`` (early gate: wait for the full
    holdout) or ``failed`` (the weights do not fit the bundle's graph).
    """

    result: str
    reason: str
    current: float = float("nan")
    candidate: float = float("nan")
    expected: float | None = None  # the candidate's mean per-row loss on the holdout
    live: Live | None = field(default=None, repr=False)
    model: bytes | None = field(default=None, repr=False)  # the patched graph a promotion commits
    timings: dict[str, float] = field(default_factory=dict)
    error: str = ""

    @property
    def accepted(self) -> bool:
        return self.result == "accepted"


def evaluate(kind: str, template: OnnxTemplate, serving: Live, weights: Mapping[str, np.ndarray],
             holdout_x: np.ndarray, holdout_y: np.ndarray, min_gain: float, early: bool,
             load: Callable[[bytes], Live]) -> Verdict:
    """Judge adapted ``weights`` against the ``serving`` model on a (normalized) holdout.

    ``load`` turns model bytes into a loaded, warmed session (the predictor's), which a
    promotion installs as it is.
    """
    t = time.perf_counter()
    try:
        model = template.patch(dict(weights))
    except WeightPatchError as exc:
        return Verdict("failed", "bad_weights", error=str(exc))
    timings = {"patch": time.perf_counter() - t}
    t = time.perf_counter()
    current_out = run(serving, holdout_x)
    current = holdout_loss(kind, current_out, holdout_y)
    try:
        live = load(model)
        candidate_out = run(live, holdout_x)
        candidate = holdout_loss(kind, candidate_out, holdout_y)
    except Exception:  # noqa: BLE001 - a candidate that cannot run is rejected, never served
        timings["gate"] = time.perf_counter() - t
        return Verdict("rejected", "non_finite", current, float("nan"), timings=timings)
    rows = per_sample_loss(kind, candidate_out, holdout_y)
    decision = decide(current, candidate, min_gain)
    # Beating the serving model is not enough: a candidate no better on its holdout than that
    # holdout's own mean (skill <= 0: R^2, or the share of the majority-class error removed)
    # learned nothing from x, which is what random or shuffled labels give. On the early gate's
    # few rows that is not conclusive either way. A candidate that halves the serving model's loss
    # is kept to the ordinary rule: after a real change the serving model is far off and even a
    # weak adaptation is worth serving.
    no_signal = candidate > 0.5 * current and skill(kind, holdout_y, rows) <= 0
    if early:
        won = not no_signal and clear_win(per_sample_loss(kind, current_out, holdout_y), rows,
                                          min_gain)
        result, reason = ("accepted", "clear_win") if won else ("inconclusive", "not_clear")
    elif decision.accepted and no_signal:
        result, reason = "rejected", "no_signal"
    else:
        result, reason = ("accepted" if decision.accepted else "rejected"), decision.reason
    timings["gate"] = time.perf_counter() - t
    accepted = result == "accepted"
    return Verdict(result, reason, current, candidate, float(rows.mean()),
                   live if accepted else None, model if accepted else None, timings)
