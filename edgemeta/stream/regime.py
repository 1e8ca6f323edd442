"""The labelled rows of the current regime, and when to learn from them again.

Why: a few-shot adaptation gives a fast start after a change, but a model fitted on 10 or 100 rows
stops there, while an online learner keeps improving on every label. The regime buffer keeps the
labelled rows since the estimated change point (at most ``window`` of them, the memory budget) and
says when a continued fit is due: after ``every`` new rows, and no sooner than the regime has grown
by ``growth`` since the last fit, so the fits come on a geometric schedule while a regime is young
(at 50, 100, 150, 225, 337, ... rows with the defaults), and at least every ``max_every`` rows
after that: a fit's optimizer steps are paid from the rows since the last one
(``continual.steps_per_row``, a count, so what is learned does not depend on the machine's load),
so the cost per labelled row stays bounded while a
long regime that drifts slowly, or changed unseen, is still followed.

A fit learns from the older rows and is judged on the newest ones (a fifth, between
``min_holdout`` and ``max_holdout``): they came after the serving model was fitted, so they judge
both models on rows neither learned from, and being the newest they judge it on the world as it
is now, not as it was a thousand rows ago.

>>> r = RegimeBuffer(window=100, every=10, growth=0.5, min_holdout=5)
>>> for i in range(30):
...     r.add([float(i)], float(i))
>>> r.due
True
>>> episode = r.take()
>>> len(episode.support_y), len(episode.holdout_y), r.due
(24, 6, False)
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence

import numpy as np

from edgemeta.stream.buffers import Episode


class RegimeBuffer:
    def __init__(self, window: int = 2000, every: int = 50, growth: float = 0.5,
                 min_holdout: int = 20, min_train: int = 10, max_every: int = 250,
                 max_holdout: int = 100):
        self.window = window
        self.every = every
        self.growth = growth
        self.max_every = max_every
        self.max_holdout = max_holdout
        self.min_holdout = min_holdout
        self.min_train = min_train
        self._rows: deque[tuple[Sequence[float], float]] = deque(maxlen=window)
        self._count = 0   # labelled rows since the change point (also those beyond the window)
        self._tried = 0   # the count at the last fit

    def restart(self, rows: Iterable[tuple[Sequence[float], float]] = ()) -> None:
        """A new regime begins; ``rows``: those already seen since its change point."""
        self._rows.clear()
        self._count = self._tried = 0
        for x, y in rows:
            self.add(x, y)

    def add(self, x: Sequence[float], y: float) -> None:
        self._rows.append((x, y))
        self._count += 1

    def rows(self) -> list[tuple[Sequence[float], float]]:
        return list(self._rows)

    def __len__(self) -> int:
        return len(self._rows)

    @property
    def count(self) -> int:
        return self._count

    @property
    def since_fit(self) -> int:
        """Labelled rows since the last fit was taken (the budget a fit may spend is per row)."""
        return self._count - self._tried

    @property
    def due(self) -> bool:
        enough = len(self._rows) >= self.min_train + self.min_holdout
        gap = max(self.every, min(self.growth * min(self._tried, self.window), self.max_every))
        return enough and self.since_fit >= gap

    def take(self) -> Episode:
        """The rows to learn from (older) and to judge on (newest), and the fit is counted."""
        x = np.asarray([r[0] for r in self._rows], dtype=np.float32)
        y = np.asarray([r[1] for r in self._rows])
        holdout = min(max(self.min_holdout, len(y) // 5), self.max_holdout, len(y) - self.min_train)
        self._tried = self._count
        cut = len(y) - holdout
        return Episode(x[:cut], y[:cut], x[cut:], y[cut:])
