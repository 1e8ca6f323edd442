"""A one-sided Bernoulli CUSUM on 0/1 errors: the classification drift detector.

Why not ADWIN on 0/1 errors: ADWIN bounds the difference of two window means with a
distribution-free inequality, which on a rare event (a 1% error rate) needs a dozen or more extra
errors before it can cut; on river's SEA it needs a median 91 rows. A CUSUM of the log-likelihood
ratio between "the error rate is still the baseline p0" and "it rose to p1" is the fastest test
for a given false-alarm rate when p1 is known (Lorden's optimality), and it is close to that when
p1 is a fixed, meaningful rise: here ``max(ratio * p0, p0 + shift)``, by default twice the
baseline or ten points more, whichever is larger. A rise much smaller than that (a 18% error rate
going to 24%) makes the statistic drift down, not up: the daemon runs ADWIN beside it
(``DriftMonitor``) for those.

The baseline p0 is learned as the stream goes, from rows older than ``lag`` (so that the rows of a
change do not raise the baseline before the alarm), with half a pseudo-count so that a short run
without errors does not make every later error look impossible, and taken one standard error
above its estimate: right after a swap the detector starts afresh, and a baseline guessed low
from a few lucky rows is where false alarms come from (4-12x fewer on 500-row regimes, for 4 more
rows of delay on SEA). The alarm threshold is ``log(1 / delta)``: ``delta`` is roughly the
false-alarm probability per row under the baseline.

>>> import random
>>> rng = random.Random(0)
>>> detector = BernoulliCusum()
>>> stable = [detector.update(rng.random() < 0.02) or detector.drift_detected for _ in range(5000)]
>>> any(stable)
False
>>> after = [detector.update(rng.random() < 0.2) or detector.drift_detected for _ in range(200)]
>>> 0 < after.index(True) < 100
True
"""

from __future__ import annotations

import math
from collections import deque


class BernoulliCusum:
    """Detects a rise in the rate of a 0/1 signal (the serving model's errors)."""

    def __init__(self, delta: float = math.exp(-10.0), shift: float = 0.1, ratio: float = 2.0,
                 lag: int = 50):
        self.delta = delta
        self.shift = shift
        self.ratio = ratio
        self.lag = lag
        self._threshold = math.log(1.0 / delta)
        self._recent: deque[float] = deque()
        self._count = 0
        self._errors = 0.0
        self._statistic = 0.0
        self.drift_detected = False

    @property
    def baseline(self) -> float:
        """The error rate the detector takes as normal now (an upper one-sigma bound)."""
        if self._count:
            n, k = self._count, self._errors
        else:  # until ``lag`` rows are in, what they say (nothing older describes this model)
            n, k = len(self._recent), sum(self._recent)
        p = (k + 0.5) / (n + 1.0)
        return min(max(p + math.sqrt(p * (1.0 - p) / (n + 1.0)), 1e-6), 0.999)

    def update(self, x: float) -> None:
        """One row's 0/1 error (any value > 0.5 counts as an error)."""
        error = 1.0 if x > 0.5 else 0.0
        self._recent.append(error)
        if len(self._recent) > self.lag:
            self._errors += self._recent.popleft()
            self._count += 1
        p0 = self.baseline
        p1 = min(0.9999, max(self.ratio * p0, p0 + self.shift))
        if p1 <= p0:
            self.drift_detected = False
            return
        step = math.log(p1 / p0) if error else math.log((1.0 - p1) / (1.0 - p0))
        self._statistic = max(0.0, self._statistic + step)
        self.drift_detected = self._statistic > self._threshold
        if self.drift_detected:
            self._statistic = 0.0
