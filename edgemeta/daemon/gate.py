"""The holdout gate: a candidate is served only if it is finite and clearly better.

Both models are judged by the same holdout rows, which the inner loop never saw, and the candidate
is judged as the ONNX artifact that would be served (the caller passes predictions from the real
session), so what is checked is exactly what is deployed.

>>> decide(current=1.0, candidate=0.5, min_gain=0.05).accepted
True
>>> decide(current=1.0, candidate=0.97, min_gain=0.05).reason
'not_better'
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


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


def clear_win(current_rows: np.ndarray, candidate_rows: np.ndarray) -> bool:
    """The early gate: on a few rows, accept only a candidate with at most half the loss that is
    better on all rows but one; anything less waits for the full holdout.

    >>> clear_win(np.array([9.0, 4.0, 7.0, 1.0, 6.0]), np.array([0.1, 0.3, 0.2, 1.5, 0.1]))
    True
    >>> clear_win(np.array([1.0, 1.0, 1.0, 1.0, 1.0]), np.array([0.4, 0.4, 2.0, 2.0, 0.1]))
    False
    """
    wins = int(np.sum(candidate_rows < current_rows))
    return (bool(np.all(np.isfinite(candidate_rows))) and wins >= len(current_rows) - 1
            and float(candidate_rows.mean()) <= 0.5 * float(current_rows.mean()))


def decide(current: float, candidate: float, min_gain: float) -> GateDecision:
    """Accept when ``candidate <= current * (1 - min_gain)`` and the candidate is finite."""
    if not math.isfinite(candidate):
        return GateDecision(False, "non_finite", current, candidate)
    if math.isfinite(current) and candidate > current * (1 - min_gain):
        return GateDecision(False, "not_better", current, candidate)
    return GateDecision(True, "better", current, candidate)
