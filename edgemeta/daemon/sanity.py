"""Adaptation sanity: labels that cannot describe a task are not adapted on, and a swapped model
that the next labels show worse than the one it replaced is rolled back.

The holdout gate compares the candidate with the serving model on the same labels, so it cannot
tell a poisoned label stream from a real change: both make the candidate look better. What it can
check is whether the labels look like a task at all: constant labels, a variance collapsed far
below the stream's own recent history, targets far outside what the bundle was trained on, or a
candidate that explains nothing (no better than a constant). And after a swap, the labels that
follow judge the new version against the old one row by row.

>>> degenerate_labels("regression", np.full(30, 2.0), recent=np.random.default_rng(0).normal(size=200))
'constant_labels'
>>> degenerate_labels("regression", np.linspace(-1, 1, 30), recent=np.linspace(-1, 1, 200)) is None
True
>>> p = Probation(rows=5)
>>> for _ in range(5):
...     p.add(new_losses=np.array([4.0]), old_losses=np.array([1.0]))
>>> p.verdict()
'worse'
"""

from __future__ import annotations

from typing import Any

import numpy as np

# Variance this many times below the stream's recent history is a stuck sensor, not a task.
COLLAPSE_STD_RATIO = 0.005
# "Far outside the training range": this share of labels beyond the range widened by its width.
OUT_OF_RANGE_SHARE = 0.2
# A single-class set is suspicious only where the recent history was not itself one-sided.
SINGLE_CLASS_MAX_SHARE = 0.75
MIN_HISTORY = 100
# Continuous targets rarely repeat exactly; this share of one value in a support set is a stuck
# or defaulted label source.
REPEATED_SHARE = 0.8


def _mostly_one_value(y: np.ndarray) -> bool:
    _, counts = np.unique(y, return_counts=True)
    return counts.max() >= REPEATED_SHARE * len(y)


def degenerate_labels(kind: str, y: np.ndarray, recent: np.ndarray | None = None,
                      target_range: tuple[float, float] | None = None,
                      holdout: np.ndarray | None = None) -> str | None:
    """Why these support+holdout labels (``y``; ``holdout`` the gate's part of them) are not a
    task to adapt to, or None."""
    y = np.asarray(y, dtype=np.float64)
    if len(y) < 2:
        return None
    if kind == "regression":
        # After a drift the support is seeded with rows since an *estimated* change point, so a
        # few honest rows can hide a stuck sensor: look at the share of one repeated value, and
        # at the holdout on its own (the gate judges by it alone).
        hold = np.asarray(holdout if holdout is not None else [], np.float64)
        if _mostly_one_value(y) or (len(hold) >= 3 and len(np.unique(hold)) == 1):
            return "constant_labels"
    recent = np.asarray(recent if recent is not None else [], dtype=np.float64)
    if kind == "classification":
        if len(np.unique(y)) == 1 and len(recent) >= MIN_HISTORY:
            _, counts = np.unique(recent, return_counts=True)
            if counts.max() / len(recent) <= SINGLE_CLASS_MAX_SHARE:
                return "single_class"
        return None
    spread = float(y.std())
    if spread <= 1e-9 * max(1.0, float(np.abs(y).mean())):
        return "constant_labels"
    if len(recent) >= MIN_HISTORY and spread < COLLAPSE_STD_RATIO * float(recent.std()):
        return "collapsed_variance"
    if target_range is not None:
        lo, hi = target_range
        width = max(hi - lo, 1e-9)
        outside = (y < lo - width) | (y > hi + width)
        if float(outside.mean()) > OUT_OF_RANGE_SHARE:
            return "out_of_range"
    return None


def constant_baseline_loss(kind: str, holdout_y: np.ndarray) -> float:
    """Per-row loss on the holdout of the best constant *for the holdout itself*: its variance
    (regression, squared error) or its minority share (classification, 0/1 error).

    The constant is chosen in hindsight, so beating it means the candidate explains part of the
    holdout from x (R^2 > 0); labels that do not depend on x (random, shuffled) cannot, except by
    rare chance.

    >>> constant_baseline_loss("regression", np.array([1.0, 3.0]))
    1.0
    """
    hy = np.asarray(holdout_y, np.float64)
    if kind == "regression":
        return float(hy.var())
    _, counts = np.unique(hy, return_counts=True)
    return float(1.0 - counts.max() / len(hy))


def skill(kind: str, labels: np.ndarray, losses: np.ndarray) -> float:
    """1 - loss / (loss of the best constant in hindsight): R^2 for regression, the share of the
    majority-class error removed for classification; 0 or less means no signal at all.

    >>> skill("regression", np.array([0.0, 2.0]), np.array([0.5, 0.5]))
    0.5
    """
    base = constant_baseline_loss(kind, labels)
    if base <= 0:
        return 0.0
    return 1.0 - float(np.mean(losses)) / base


class Probation:
    """The rows after a swap, judged by both the new version and the one it replaced.

    ``verdict`` is ``'worse'`` when the new version's per-row losses are higher than the old one's
    by a one-sided paired t-test at about 2.5% (t > 2), ``'ok'`` otherwise, and None until
    ``rows`` rows have been seen.

    Probation judges the new version on the regime it was adapted to. When the replaced version's
    own error on these rows is clearly not what it was on the gate's holdout (``previous_level``:
    |t| > 2 and ``CHANGED_RATIO`` times higher or lower), the world changed under both: the
    verdict is ``'changed'``, a drift, and no verdict on the new model.

    >>> p = Probation(rows=5, previous_level=1.0)
    >>> for _ in range(5):
    ...     p.add(new_losses=np.array([9.0, 8.0]), old_losses=np.array([6.0, 5.0]))
    >>> p.verdict()
    'changed'
    """

    T_CRITICAL = 2.0
    CHANGED_RATIO = 1.5

    def __init__(self, rows: int, previous: Any = None, previous_version: int | None = None,
                 new_version: int | None = None, previous_level: float | None = None):
        self.rows = rows
        self.previous = previous  # the replaced model, still loaded (opaque here)
        self.previous_version = previous_version
        self.new_version = new_version
        self.previous_level = previous_level
        self._diffs: list[float] = []
        self._new: list[float] = []
        self._old: list[float] = []

    def add(self, new_losses: np.ndarray, old_losses: np.ndarray) -> None:
        new, old = np.asarray(new_losses, np.float64), np.asarray(old_losses, np.float64)
        self._new += new.tolist()
        self._old += old.tolist()
        self._diffs += (new - old).tolist()

    @property
    def seen(self) -> int:
        return len(self._diffs)

    def figures(self) -> dict[str, float]:
        return {"rows": self.seen, "new_loss": float(np.mean(self._new)) if self._new else 0.0,
                "old_loss": float(np.mean(self._old)) if self._old else 0.0}

    def _t(self, values: np.ndarray, against: float = 0.0) -> float:
        mean = float(values.mean()) - against
        sd = float(values.std(ddof=1)) if len(values) > 1 else 0.0
        if sd == 0.0:
            return float("inf") if mean > 0 else 0.0
        return mean / (sd / np.sqrt(len(values)))

    def changed(self) -> bool:
        """The replaced version's error on these rows is clearly not what it was on the
        holdout (higher or lower): these rows are of another regime than the one the new
        version was adapted to and judged on."""
        if self.previous_level is None or not self._old:
            return False
        old = np.asarray(self._old)
        mean, level = float(old.mean()), self.previous_level
        shifted = mean > self.CHANGED_RATIO * level or mean * self.CHANGED_RATIO < level
        return shifted and abs(self._t(old, level)) > self.T_CRITICAL

    def verdict(self) -> str | None:
        if self.seen < self.rows:
            return None
        d = np.asarray(self._diffs)
        if float(d.mean()) <= 0:
            return "ok"
        if self._t(d) <= self.T_CRITICAL:
            return "ok"
        return "changed" if self.changed() else "worse"
