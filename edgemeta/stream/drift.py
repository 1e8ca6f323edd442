"""Drift detectors per stream (river's, and a Bernoulli CUSUM), with warm-up and cooldown.

The error detector watches the per-sample loss of the serving model (squared error for regression,
0/1 error for classification), so it reacts to what matters: the model getting worse. Defaults are
chosen for few false alarms on stable data: ADWIN at delta 0.002 on squared errors, a Bernoulli
CUSUM (``cusum.py``) on 0/1 errors, where ADWIN is slow; river's KSWIN, PageHinkley and
EDDM defaults alarm often on stable streams, so KSWIN gets a stricter alpha here and EDDM is not
offered. A cooldown keeps one change from firing twice while the adaptation it caused is pending.

>>> import random
>>> rng = random.Random(0)
>>> monitor = DriftMonitor("adwin", kind="regression")
>>> stable = [monitor.update_error(rng.gauss(0, 1) ** 2) for _ in range(2000)]
>>> any(stable)
False
>>> shifted = [monitor.update_error(9 * rng.gauss(0, 1) ** 2) for _ in range(300)]
>>> any(shifted)
True
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import Any

import numpy as np
from river import drift

from edgemeta.config import BINARY_DETECTORS, CONFIDENCE_DEFAULTS, DriftSettings
from edgemeta.stream.cusum import BernoulliCusum


def resolve_detector(name: str, kind: str) -> str:
    """``auto``: the CUSUM for a classifier's 0/1 errors, ADWIN for squared errors.

    >>> resolve_detector("auto", "classification"), resolve_detector("auto", "regression")
    ('cusum', 'adwin')
    """
    if name != "auto":
        return name
    return "cusum" if kind == "classification" else "adwin"


def make_detector(name: str, delta: float | None = None):
    """A fresh river detector. ``delta`` is the detector's confidence (ADWIN's delta, HDDM's
    drift confidence, KSWIN's alpha; None: the tuned default in ``CONFIDENCE_DEFAULTS``); DDM and
    Page-Hinkley have none (the config refuses a delta for them)."""
    if name in CONFIDENCE_DEFAULTS and delta is None:
        delta = CONFIDENCE_DEFAULTS[name]
    if name == "adwin":
        return drift.ADWIN(delta=delta, clock=8)  # check every 8 samples, not 32: faster alarms
    if name == "cusum":
        return BernoulliCusum(delta=delta)
    if name == "ddm":
        return drift.binary.DDM()
    if name == "hddm_a":
        return drift.binary.HDDMA(drift_confidence=delta)
    if name == "hddm_w":
        return drift.binary.HDDMW(drift_confidence=delta)
    if name == "page_hinkley":
        return drift.PageHinkley(min_instances=100, delta=0.005, threshold=100.0)
    if name == "kswin":
        return drift.KSWIN(alpha=delta, window_size=300, stat_size=100, seed=0)
    raise ValueError(f"unknown drift detector {name!r}")


# After a swap, a first-warm-up mean loss this many times the holdout figure means a misfit.
MISFIT_FACTOR = 3.0
MISFIT_MIN_ROWS = 5


def rows_since_change(losses: Sequence[float], min_side: int = 5) -> int:
    """How many of the most recent losses come after the most likely change point.

    The split that maximises the standardised difference of the two means (one step of binary
    segmentation). The daemon uses it to reuse the labelled rows that already show the new regime
    instead of waiting for new ones.

    >>> rows_since_change([0.1] * 200 + [5.0] * 12)
    12
    >>> rows_since_change([0.1, 0.2])
    0
    """
    values = np.asarray(losses, dtype=np.float64)
    n = len(values)
    if n < 2 * min_side:
        return 0
    csum = np.cumsum(values)
    t = np.arange(min_side, n - min_side + 1)
    left = csum[t - 1] / t
    right = (csum[-1] - csum[t - 1]) / (n - t)
    score = np.abs(right - left) * np.sqrt(t * (n - t) / n)
    return int(n - t[int(np.argmax(score))])


class DriftMonitor:
    """Error-based (and optionally feature-based) drift detection for one stream."""

    def __init__(self, detector: str = "auto", kind: str = "regression",
                 delta: float | None = None, feature_detector: str = "none",
                 cooldown_samples: int = DriftSettings.cooldown_samples,
                 min_samples: int = DriftSettings.min_samples, n_features: int = 1):
        detector = resolve_detector(detector, kind)
        if detector in BINARY_DETECTORS and kind != "classification":
            raise ValueError(f"drift.detector {detector!r} needs 0/1 errors: classification only")
        self.detector = detector
        self.kind = kind
        self.delta = delta
        self.feature_detector = feature_detector
        self.cooldown_samples = cooldown_samples
        self.min_samples = min_samples
        self.n_features = n_features
        # (loss, row) since the last reset: the losses locate a change, the rows seed the support set.
        self._recent: deque[tuple[float, Any]] = deque(maxlen=500)
        self.reset()

    def reset(self, cooldown: bool = False, expected: float | None = None) -> None:
        """Forget the past: after a swap the new model's errors form a new baseline.

        ``expected`` is the new model's mean loss on the gate's holdout set. A change detector
        cannot see a model that is bad from its first sample (the world moved again while it was
        being adapted), so once the warm-up is over the error is also checked against it.
        """
        self._expected = expected
        self._fresh_error_detectors()
        n = min(self.n_features, 8)
        # The feature detector keeps its own tuned confidence: ``delta`` is the error detector's.
        self._features = ([make_detector(self.feature_detector) for _ in range(n)]
                          if self.feature_detector != "none" else [])
        self._seen = 0
        self._rows = 0
        self._cooldown = self.cooldown_samples if cooldown else 0
        self._recent.clear()
        self._deferred = False
        self.active = False

    def _fresh_error_detectors(self) -> None:
        self._error = make_detector(self.detector, self.delta)
        # The CUSUM tests for a large rise (twice the error rate, or ten points more) and cannot
        # see a smaller one at all; ADWIN beside it sees any lasting rise, only later.
        self._slow = make_detector("adwin") if self.detector == "cusum" else None

    def _rebaseline(self, whole: bool = False) -> None:
        """After an error alarm the serving model keeps serving (an adaptation takes a while) and
        the detector keeps watching it: its baseline becomes the new regime's error, learned
        from the rows since the change point, so only a further change alarms again (a drift
        collection is then restarted) and the backfill holds this regime's rows only."""
        since = len(self._recent) if whole else rows_since_change(self._losses())
        keep = list(self._recent)[len(self._recent) - since:] if since else []
        self._recent.clear()
        self._fresh_error_detectors()
        for loss, row in keep:
            self._recent.append((loss, row))
            self._error.update(loss)
            if self._slow is not None:
                self._slow.update(loss)
        self._seen = len(keep)
        self._expected = None

    def _losses(self) -> np.ndarray:
        return np.fromiter((loss for loss, _ in self._recent), dtype=np.float64,
                           count=len(self._recent))

    def _worse(self) -> bool:
        """ADWIN is two-sided; only a rise in the error is a drift to adapt to. After a fall the
        losses before it are forgotten, so the next change point is looked for in this regime."""
        values = self._losses()
        since = rows_since_change(values)
        if not since:
            return True
        if float(values[-since:].mean()) > float(values[:-since].mean()):
            return True
        for _ in range(len(values) - since):
            self._recent.popleft()
        return False

    def _rising(self) -> bool:
        """The CUSUM only ever alarms on a rise; ADWIN's alarms are checked for one."""
        return self.detector == "cusum" or self._worse()

    def rows_since_change(self) -> list[Any]:
        """After an error alarm: the rows given to :meth:`update_error` since the estimated change
        point, oldest first (those that carried one)."""
        return [row for _, row in self._recent if row is not None]

    def _alarm(self, error: bool = True, misfit: bool = False) -> bool:
        """``misfit``: the model was bad from its first row, so every row since the reset is
        the new regime's."""
        if error:
            self._rebaseline(whole=misfit)
        self._deferred = False
        self.active = True
        self._cooldown = self.cooldown_samples
        return True

    @property
    def seen(self) -> int:
        """Labelled rows in the detector's baseline: since its last reset or alarm (a fresh
        detector may not alarm before ``min_samples``)."""
        return self._seen

    def declare(self) -> None:
        """A drift found by other evidence (probation saw the world change): the detector takes
        the new regime as its baseline, as after its own alarm."""
        self._alarm()

    def _quiet(self) -> bool:
        return self._seen < self.min_samples or self._cooldown > 0

    def update_error(self, loss: float, row: Any = None) -> bool:
        """Feed one labelled sample's loss (and, to get it back after an alarm, its row); True
        when a drift is detected now."""
        self._seen += 1
        if self._cooldown:
            self._cooldown -= 1
        self._error.update(float(loss))
        self._recent.append((float(loss), row))
        fired = self._error.drift_detected and self._rising()
        if self._slow is not None:
            self._slow.update(float(loss))
            fired = fired or (self._slow.drift_detected and self._worse())
        if self._expected is not None and self._seen >= MISFIT_MIN_ROWS:
            # Sequential: a gross misfit shows in a few rows, a mild one needs the whole warm-up;
            # the allowed ratio shrinks from 3 * sqrt(6) at 5 rows to 3 at min_samples rows.
            n = self._seen
            factor = MISFIT_FACTOR * np.sqrt(max(self.min_samples, n) / n)
            if float(self._losses().mean()) > factor * self._expected + 1e-9:
                self._expected = None
                return self._alarm(misfit=True)
            if n >= self.min_samples:
                self._expected = None
        if self._quiet():
            # The detector has already cut its window: remember the rise and look again once
            # the warm-up or cooldown is over, or a change right after a swap goes unseen.
            self._deferred = self._deferred or fired
            return False
        if fired or (self._deferred and self._rising()):
            return self._alarm()
        self._deferred = False
        return False

    def update_features(self, row: Sequence[float]) -> bool:
        """Feed one (normalized) unlabelled row; True when the feature distribution shifted."""
        self._rows += 1
        fired = False
        for det, value in zip(self._features, row, strict=False):
            det.update(float(value))
            fired = fired or det.drift_detected
        if fired and self._cooldown == 0 and self._rows >= self.min_samples:
            return self._alarm(error=False)
        return False
