"""Per-stream collection of the support and holdout sets after a drift.

After a change only post-drift samples describe the new task, so collection starts at the drift:
the next K labelled samples are the support set and the following H the holdout set (the gate's
judge, never seen by the inner loop). With ``selection="diverse"`` a post-drift window is kept and
the support set is chosen from it by greedy farthest-point sampling, which covers the input range
better than the K most recent samples when those happen to bunch together; for a classifier
(``classes``) every class in the window gets support rows, as evenly as K allows, because an
N-way initialization adapted on rows of half its classes learns nothing of the others. A
collection with a
smaller holdout than usual (the early gate's, right after a drift) does not wait for the window:
it is the K+H rows that have arrived.

>>> c = SupportCollector(support_size=2, holdout_size=1)
>>> c.start()
>>> [c.offer([float(i)], float(i)) for i in range(3)][-1] is not None
True
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass
class Episode:
    support_x: np.ndarray
    support_y: np.ndarray
    holdout_x: np.ndarray
    holdout_y: np.ndarray


def farthest_point_indices(x: np.ndarray, k: int) -> list[int]:
    """Greedy k-center: start at the first point, repeatedly add the point farthest from the set."""
    chosen = [0]
    dist = np.linalg.norm(x - x[0], axis=1)
    while len(chosen) < k:
        nxt = int(np.argmax(dist))
        chosen.append(nxt)
        dist = np.minimum(dist, np.linalg.norm(x - x[nxt], axis=1))
    return chosen


def class_balanced_indices(x: np.ndarray, y: np.ndarray, k: int) -> list[int]:
    """``k`` rows with every class of ``y`` in them as evenly as the counts allow (round-robin
    quotas), each class's rows spread over its inputs by farthest-point sampling.

    >>> y = np.array([0] * 8 + [1] * 2)
    >>> sorted(set(y[class_balanced_indices(np.arange(10.0)[:, None], y, 4)].tolist()))
    [0, 1]
    """
    classes, counts = np.unique(y, return_counts=True)
    quota = np.zeros(len(classes), dtype=int)
    left = min(k, len(y))
    while left > 0:
        for i in range(len(classes)):
            if left and quota[i] < counts[i]:
                quota[i] += 1
                left -= 1
    chosen: list[int] = []
    for c, q in zip(classes, quota, strict=True):
        if q:
            members = np.flatnonzero(y == c)
            chosen += members[farthest_point_indices(x[members], int(q))].tolist()
    return sorted(chosen)


class SupportCollector:
    """Idle until :meth:`start`; then gathers labelled rows until an :class:`Episode` is complete."""

    def __init__(self, support_size: int = 10, holdout_size: int = 20, selection: str = "recent",
                 window: int = 100, classes: int = 0):
        self.support_size = support_size
        self.holdout_size = holdout_size
        self.selection = selection
        self.window = window
        self.classes = classes
        self._x: list[Sequence[float]] = []
        self._y: list[float] = []
        self._k = support_size
        self._h = holdout_size
        self._window = window
        self.collecting = False

    @property
    def needed(self) -> int:
        if self.selection == "diverse":
            return max(self._window, self._k + self._h)
        return self._k + self._h

    @property
    def collected(self) -> int:
        return len(self._y)

    def start(self, rows: Sequence[tuple[Sequence[float], float]] = (),
              support_size: int | None = None, holdout_size: int | None = None) -> Episode | None:
        """Open a collection, optionally seeded with labelled rows already seen (oldest first,
        at most :attr:`needed`); returns the episode at once if those rows complete it.
        ``support_size`` overrides K for this collection (refinements use larger ones)."""
        self._k = self.support_size if support_size is None else support_size
        self._h = self.holdout_size if holdout_size is None else holdout_size
        self._window = self.window if holdout_size is None else 0
        self._x, self._y = [], []
        self.collecting = True
        episode = None
        for x, y in list(rows)[-self.needed:]:
            episode = self.offer(x, y)
        return episode

    def cancel(self) -> None:
        self._x, self._y = [], []
        self.collecting = False

    def offer(self, x: Sequence[float], y: float) -> Episode | None:
        """Add one labelled row; returns the episode once enough rows have arrived."""
        if not self.collecting:
            return None
        self._x.append(list(x))
        self._y.append(y)
        if len(self._y) < self.needed:
            return None
        x_all, y_all = np.asarray(self._x, dtype=np.float32), np.asarray(self._y)
        self.cancel()
        k, h = self._k, self._h
        if self.selection == "diverse":
            pool = len(y_all) - h
            idx = (class_balanced_indices(x_all[:pool], y_all[:pool], k) if self.classes
                   else farthest_point_indices(x_all[:pool], k))
            return Episode(x_all[idx], y_all[idx], x_all[pool:], y_all[pool:])
        return Episode(x_all[:k], y_all[:k], x_all[k:k + h], y_all[k:k + h])
