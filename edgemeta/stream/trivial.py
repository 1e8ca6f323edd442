"""Is the serving model significantly worse than the trivial predictor on the recent rows?

Why: a drift detector learns what "normal" error is from the model it watches. A model that is
bad from its first row (a recall on a few lucky rows, a candidate that beat an even worse one)
sets a bad baseline, and the detector then calls its error stable for ever. The candidates are
held to a test the serving model never met: beat the trivial predictor (the recent labels' mean,
or their class frequencies). This check holds the serving model to it too.

Each labelled row is scored by the serving model and by the trivial predictor fitted on the
labels *before* it in the window (prequential: the trivial predictor never sees the row it is
scored on, as the model did not). The per-row differences of the recent ``window`` rows are
tested with a one-sided t-test every ``every`` rows once ``min_rows`` are in; a t statistic above
``threshold`` (4 by default: about 3e-5 one-sided per look under normality, so the repeated looks
of a long stable stream stay far from false alarms) says the model is worse than a constant.
Classification is scored by cross-entropy, not 0/1 error: a model at 55% error on a balanced
binary stream is about 0.05 per row worse than the majority class by 0/1 error, which takes
thousands of rows to see, but it is confidently wrong and far worse by cross-entropy.

When what an alarm opens cannot fix it (no candidate beats the serving model, which happens
when the bundle knows nothing better than a constant for this stream), alarming again every
``min_rows`` rows would only churn the worker: each alarm the caller acts on
(:meth:`acted`) doubles the rows the next one waits for, until the serving version changes.

>>> rng = np.random.default_rng(0)
>>> check = TrivialCheck("regression", min_rows=50)
>>> y = rng.normal(3.0, 1.0, 60)
>>> any(check.update((v + 3.0) ** 2, v, version=1) for v in y)  # answers -3: far off the mean
True
>>> check = TrivialCheck("regression", min_rows=50)
>>> any(check.update(rng.normal(0, 0.3) ** 2, v, version=1) for v in y)
False
"""

from __future__ import annotations

import math
from collections import deque

import numpy as np


class TrivialCheck:
    def __init__(self, kind: str, classes: int = 0, window: int = 200, min_rows: int = 100,
                 every: int = 25, threshold: float = 4.0, min_history: int = 5):
        self.kind = kind
        self.classes = classes
        self.window = window
        self.min_rows = min_rows
        self.every = every
        self.threshold = threshold
        self.min_history = min_history
        self._labels: deque[float] = deque(maxlen=window)
        self._diffs: deque[float] = deque(maxlen=window)
        self._label_sum = 0.0
        self._counts: dict[int, int] = {}
        self._since_look = 0
        self._version: int | None = None
        self._alarms = 0        # alarms acted on since the serving version last changed
        self._since_alarm = 0   # rows since the last of them
        self.last_t = 0.0

    @property
    def rows(self) -> int:
        """Paired rows in the window (what the last look judged)."""
        return len(self._diffs)

    def reset(self) -> None:
        """A new regime or a new model: the rows so far say nothing about it."""
        self._labels.clear()
        self._diffs.clear()
        self._label_sum = 0.0
        self._counts.clear()
        self._since_look = 0
        self.last_t = 0.0

    def acted(self) -> None:
        """The caller raised an alarm on this check's finding: back off until the model changes."""
        self._alarms += 1
        self._since_alarm = 0

    def _trivial_loss(self, y: float) -> float:
        n = len(self._labels)
        if self.kind == "regression":
            return (y - self._label_sum / n) ** 2
        # Class frequencies with one pseudo-count per class: never a zero probability.
        k = max(self.classes, len(self._counts), int(y) + 1)
        return -math.log((self._counts.get(int(y), 0) + 1) / (n + k))

    def _push_label(self, y: float) -> None:
        if len(self._labels) == self._labels.maxlen:
            old = self._labels[0]
            self._label_sum -= old
            if self.kind != "regression":
                self._counts[int(old)] -= 1
        self._labels.append(y)
        self._label_sum += y
        if self.kind != "regression":
            self._counts[int(y)] = self._counts.get(int(y), 0) + 1

    def update(self, loss: float, y: float, version: int) -> bool:
        """One labelled row the serving ``version`` predicted, with its loss (the gate's
        ``row_losses``: squared error, or cross-entropy); True when this row's look finds that
        version significantly worse than the trivial predictor."""
        if version != self._version:
            self.reset()
            self._version = version
            self._alarms = self._since_alarm = 0
        if self.threshold <= 0:
            return False
        self._since_alarm += 1
        y = float(y)
        if len(self._labels) >= self.min_history:
            d = float(loss) - self._trivial_loss(y)
            if math.isfinite(d):
                self._diffs.append(d)
                self._since_look += 1
        self._push_label(y)
        wait = self.min_rows * 2 ** min(self._alarms, 5)
        if (self._since_look < self.every or len(self._diffs) < self.min_rows
                or (self._alarms and self._since_alarm < wait)):
            return False
        self._since_look = 0
        d = np.fromiter(self._diffs, dtype=np.float64, count=len(self._diffs))
        mean, sd = float(d.mean()), float(d.std(ddof=1))
        self.last_t = mean / (sd / math.sqrt(len(d))) if sd > 0 else (math.inf if mean > 0 else 0.0)
        return self.last_t > self.threshold
