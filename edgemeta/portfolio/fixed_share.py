"""Fixed-Share: exponentially weighted experts with a sharing rate, for switching streams.

After each row every expert's weight is multiplied by ``exp(-eta * loss)``; then a share
``alpha`` of the total is spread evenly over all experts (Herbster & Warmuth, 1998). Without the
share, an expert that was bad for long needs as many rows to recover as it was bad for; with it,
no weight falls below ``alpha / N``, so after a switch the right expert takes over in
``O(log(N / alpha) / (eta * gap))`` rows, where gap is its per-row loss advantage.

The bound, and what it assumes. With losses in ``[0, L]`` (here: normalized and capped, see
``portfolio.py``), a loss convex in the prediction, and the mixture predicting the weighted
average of the experts, for every sequence of experts that switches ``k`` times in ``T`` rows:

    loss(mixture) <= loss(sequence) + ((k + 1) ln N + k ln(1 / alpha)
                                       + (T - k - 1) ln(1 / (1 - alpha))) / eta + eta L^2 T / 8

(the mix-loss bound of Fixed-Share plus Hoeffding's term for predicting the average; convexity
lets the mixture's own loss stand for the averaged loss). ``regret_bound`` computes it, and the
tests check the mixture against it.

For classifiers the losses are errors (0 or 1), which are not convex in a prediction: the bound
then holds for the weighted average of the members' errors, the expected errors of serving one
member drawn by its weight. The portfolio serves the most probable class of the averaged
probabilities instead (deterministic, and an average of probabilities is right at least where
the weight is); that is measured (``bench stream``), not bounded.

>>> fs = FixedShare(3, eta=2.0, alpha=0.01)
>>> for _ in range(20):
...     fs.update(np.array([1.0, 0.0, 1.0]))
>>> int(np.argmax(fs.weights_)), bool(fs.weights_[1] > 0.95)
(1, True)
"""

from __future__ import annotations

import math

import numpy as np


class FixedShare:
    def __init__(self, n: int, eta: float = 2.0, alpha: float = 0.01):
        self.n = n
        self.eta = eta
        self.alpha = alpha
        self.weights_ = np.full(n, 1.0 / n)
        self._active = [True] * n

    def update(self, losses: np.ndarray) -> None:
        """One row's losses; NaN marks an expert that made no prediction: it keeps its weight
        relative to the others' mean outcome (it neither gains nor loses on that row)."""
        self.update_many(np.asarray(losses, np.float64)[None, :])

    def update_many(self, losses: np.ndarray) -> None:
        """Rows of losses in order. The exponentials are taken in one numpy call; the sharing
        makes each row depend on the last, so the rest is a loop over Python floats, several
        times faster per row than numpy's calls on arrays of a handful of experts."""
        losses = np.asarray(losses, np.float64)
        if losses.size == 0:
            return
        active = self._active
        factors = np.exp(-self.eta * np.nan_to_num(losses, nan=0.0)).tolist()
        known_rows = np.isfinite(losses).tolist()
        share = self.alpha / max(sum(active), 1)
        keep = 1.0 - self.alpha
        w = self.weights_.tolist()
        members = range(self.n)
        for f, known in zip(factors, known_rows, strict=True):
            use = [known[i] and active[i] for i in members]
            if not any(use):
                continue
            if all(use[i] for i in members if active[i]):  # every active expert predicted
                w = [w[i] * f[i] if active[i] else 0.0 for i in members]
            else:
                # Experts without a prediction on this row neither gain nor lose: they follow
                # the weighted mean factor of those that predicted.
                seen = sum(w[i] for i in members if use[i])
                mean = sum(w[i] * f[i] for i in members if use[i]) / max(seen, 1e-300)
                w = [(w[i] * (f[i] if use[i] else mean)) if active[i] else 0.0 for i in members]
            total = sum(w)
            if not total > 0:
                w, total = [1.0 if a else 0.0 for a in active], float(sum(active))
            scale = keep / total
            w = [(w[i] * scale + share) if active[i] else 0.0 for i in members]
        self.weights_ = np.asarray(w)

    def lift(self, i: int, prior: float) -> None:
        """Give expert ``i`` at least ``prior`` of the weight (a freshly adapted model)."""
        if self.weights_[i] >= prior:
            return
        rest = self.weights_.sum() - self.weights_[i]
        others = np.arange(self.n) != i
        self.weights_[others] *= (1.0 - prior) / rest if rest > 0 else 0.0
        self.weights_[i] = prior

    def drop(self, i: int) -> None:
        """Expert ``i`` is out for good: no weight, and no part of the sharing either."""
        self._active[i] = False
        self.weights_[i] = 0.0
        total = self.weights_.sum()
        self.weights_ = self.weights_ / total if total > 0 else np.asarray(
            [1.0 / sum(self._active) if a else 0.0 for a in self._active])

    @property
    def active(self) -> list[bool]:
        return list(self._active)


def regret_bound(n: int, rows: int, switches: int, eta: float, alpha: float, cap: float) -> float:
    """The most the mixture's cumulative loss can exceed a ``switches``-switch sequence's."""
    k, t = switches, rows
    return (((k + 1) * math.log(n) + k * math.log(1 / alpha)
             + max(t - k - 1, 0) * math.log(1 / (1 - alpha))) / eta + eta * cap * cap * t / 8)
