"""One stream's portfolio: the served ONNX model and the online experts, mixed by Fixed-Share.

Member 0 is always the ONNX model (the adapted meta-learned one); the experts follow. Each file's
rows are predicted by every member, the prediction served is the weighted average (regression:
values; classification: probabilities, the class served is the most probable), and each label,
inline or arriving later, updates the weights with every member's loss on the prediction it made
before seeing it, then teaches the experts.

Losses are made comparable across streams and bounded, as the regret bound in
``fixed_share.py`` needs: a squared error is divided by the recent variance of the labels (the
trivial predictor's error, so 1 means "no better than the mean") and capped at ``loss_cap``. A
classifier member is judged by its errors: 1 for a row whose most probable class (under the
member's own scores) was not the label, else 0. Weighing classifiers by their cross-entropy
instead was measured worse on all four classification streams of ``bench stream`` (3 seeds x
6,000 rows; river's SEA: the mixture erred 0.152, its best member 0.146; weighed by errors
0.145): among members of similar accuracy the log loss differences are small and noisy, so
the weights stayed spread and the served class was a blend that erred more than its best
member. The rate each error moves the weights is ``eta`` (default 1.0 for classifiers, 2.0 per
normalized squared error for regression). A classifier member's class scores (the ONNX model's
logits, an expert's fitted scores) still become probabilities through a softmax whose
temperature is fitted online to that member's log loss (``calibration.py``), so that the
average the mixture serves mixes probabilities that mean what they say. A member whose
prediction is not finite, or a regression expert whose prediction is beyond ``explode`` label
standard deviations of the labels' mean, is dropped for the rest of the process's life,
counted in ``dropped_``, and never served.

A restart starts the experts fresh (they are rebuilt from the rows that follow, a few hundred
at the defaults); no input is lost, since every input is served and moved by the daemon as
before.

>>> rng = np.random.default_rng(0)
>>> p = Portfolio("regression", outputs=1, experts=("linear",))
>>> for _ in range(30):
...     x = rng.normal(size=(20, 1)); y = 2 * x[:, 0]
...     served, preds = p.predict(x, np.zeros((20, 1)), version=1)
...     p.learn(x, y, preds)
>>> w = p.weights(); bool(w["linear"] > 0.9 > w["onnx"])
True
"""

from __future__ import annotations

import math
from collections import OrderedDict

import numpy as np

from edgemeta.portfolio.calibration import TemperatureGrid
from edgemeta.portfolio.experts import DEFAULT_EXPERTS, make_expert
from edgemeta.portfolio.fixed_share import FixedShare

# The temperature a member's scores start at: the ONNX model's logits as they are; an expert's
# scores (fitted to one-hot rows, mostly in [0, 1]) about as sure as a 0.98 / 0.02 split.
ONNX_TEMPERATURE, EXPERT_TEMPERATURE = 1.0, 4.0
# The labels' spread is a scale for the losses and the explosion test only once this many have
# been seen; before, a file's own spread (or 1 for a single row) stands in.
MIN_SCALE_ROWS = 30
# eta when not given: per error (classification), per normalized squared error (regression).
DEFAULT_ETA = {"classification": 1.0, "regression": 2.0}


class Portfolio:
    def __init__(self, kind: str, outputs: int, experts: tuple[str, ...] = DEFAULT_EXPERTS,
                 eta: float | None = None, sharing: float = 0.01, onnx_prior: float = 0.5,
                 loss_cap: float = 4.0, explode: float = 1e4, pending: int = 100_000,
                 expert_params: dict[str, dict] | None = None):
        self.kind = kind
        self.outputs = outputs
        self.experts = experts
        self.eta = eta
        self.sharing = sharing
        self.onnx_prior = onnx_prior
        self.loss_cap = loss_cap
        self.explode = explode
        self.pending = pending
        params = expert_params or {}
        self.members = ("onnx", *experts)
        self._learners = [make_expert(name, kind, outputs, params.get(name)) for name in experts]
        self._calibration = ([TemperatureGrid(ONNX_TEMPERATURE)]
                             + [TemperatureGrid(EXPERT_TEMPERATURE) for _ in experts]
                             if kind != "regression" else [])
        self._mix = FixedShare(len(self.members), eta=self.rate, alpha=sharing)
        self._version: int | None = None
        self._mean, self._var = 0.0, None  # of the labels (regression), exponentially weighted
        self._waiting: OrderedDict[str, np.ndarray] = OrderedDict()  # row id -> members' preds
        self.loss_ = np.full(len(self.members), np.nan)  # recent loss per member
        self.dropped_: dict[str, int] = {}
        self.rows_ = 0

    @property
    def rate(self) -> float:
        """``eta`` as given, or the kind's default: per error (classification), per normalized
        squared error (regression)."""
        if self.eta is not None:
            return self.eta
        return DEFAULT_ETA[self.kind]

    # -- serving -------------------------------------------------------------------------------
    def _probabilities(self, preds: np.ndarray) -> np.ndarray:
        """The members' predictions as the mixture averages them: values for regression, each
        member's calibrated class probabilities for classification (NaN stays NaN)."""
        if self.kind == "regression":
            return preds
        return np.stack([cal.probabilities(preds[:, j]) for j, cal in
                         enumerate(self._calibration)], axis=1)

    def predict(self, x: np.ndarray, onnx_outputs: np.ndarray,
                version: int) -> tuple[np.ndarray, np.ndarray]:
        """The mixed outputs to serve, shape (n, outputs), and every member's prediction
        (values, or raw class scores), shape (n, members, outputs), to learn from once the
        labels come."""
        if version != self._version:
            if self._version is not None:  # a new model: let it take over fast when it is right
                self._mix.lift(0, self.onnx_prior)
            self._version = version
        onnx = np.asarray(onnx_outputs, np.float64)
        preds = np.empty((len(x), len(self.members), onnx.shape[1]))
        preds[:, 0] = onnx
        active = self._mix.active
        for j, learner in enumerate(self._learners, start=1):
            if not active[j]:
                preds[:, j] = np.nan
                continue
            out = learner.predict(x)
            if learner.rows_ and not self._sane(out):
                self._drop(j)
                out = np.full_like(out, np.nan)
            preds[:, j] = out
        return self._mixed(self._probabilities(preds)), preds

    def _sane(self, out: np.ndarray) -> bool:
        if not np.isfinite(out).all():
            return False
        if self.kind == "regression" and self._var is not None and self.rows_ >= MIN_SCALE_ROWS:
            scale = math.sqrt(max(self._var, 1e-12))
            return bool(np.abs(out - self._mean).max() <= self.explode * scale)
        return True

    def _drop(self, j: int) -> None:
        self._mix.drop(j)
        self.dropped_[self.members[j]] = self.dropped_.get(self.members[j], 0) + 1

    def _mixed(self, preds: np.ndarray) -> np.ndarray:
        """Each row's weighted average over the members that predicted it."""
        w = np.where(np.isfinite(preds[:, :, 0]), self._mix.weights_[None, :], 0.0)
        w /= np.maximum(w.sum(axis=1, keepdims=True), 1e-300)
        return np.einsum("nm,nmo->no", w, np.nan_to_num(preds, nan=0.0))

    def row_weights(self, preds: np.ndarray) -> list[dict[str, float]]:
        """What each served row came from: the members' weights in its mixture."""
        known = np.isfinite(preds[:, :, 0])
        if known.all():  # the common case: every row came from the same mixture
            same = {m: round(float(v), 4) for m, v in zip(self.members, self._mix.weights_,
                                                          strict=True) if v > 0}
            return [same] * len(preds)
        w = np.where(known, self._mix.weights_[None, :], 0.0)
        w /= np.maximum(w.sum(axis=1, keepdims=True), 1e-300)
        return [{m: round(v, 4) for m, v in zip(self.members, row, strict=True) if v > 0}
                for row in w.tolist()]

    # -- labels later ----------------------------------------------------------------------------
    def remember(self, ids: list, preds: np.ndarray) -> None:
        """Keep the members' predictions of rows whose labels come later (the oldest go first)."""
        for row_id, p in zip(ids, preds, strict=True):
            self._waiting[str(row_id)] = p
        while len(self._waiting) > self.pending:
            self._waiting.popitem(last=False)

    def recall(self, ids: list) -> np.ndarray | None:
        found = [self._waiting.pop(str(i), None) for i in ids]
        if any(p is None for p in found):
            return None
        return np.stack(found) if found else None

    # -- learning --------------------------------------------------------------------------------
    def _targets(self, y: np.ndarray) -> np.ndarray:
        if self.kind == "regression":
            return np.asarray(y, np.float64).reshape(-1, 1)
        return np.eye(self.outputs)[np.asarray(y, int)]

    def losses(self, y: np.ndarray, preds: np.ndarray) -> np.ndarray:
        """Each row's loss per member (NaN where a member did not predict): the normalized,
        capped squared error (regression), the error (classification)."""
        if self.kind == "regression":
            y = np.asarray(y, np.float64)
            var = (self._var if self._var is not None and self.rows_ >= MIN_SCALE_ROWS
                   else float(np.var(y)) if len(y) > 1 else 1.0)
            raw = (preds[:, :, 0] - y[:, None]) ** 2 / max(var, 1e-12)
            return np.minimum(raw, self.loss_cap)
        wrong = (np.nan_to_num(preds, nan=0.0).argmax(axis=2)
                 != np.asarray(y, int)[:, None]).astype(np.float64)
        return np.where(np.isfinite(preds).all(axis=2), wrong, np.nan)

    def learn(self, x: np.ndarray, y: np.ndarray, preds: np.ndarray) -> None:
        """Judge every member on the rows' labels (the predictions made before them), then teach
        the experts the rows."""
        losses = self.losses(y, preds)
        self._mix.update_many(losses)
        seen = np.isfinite(losses)
        for j, cal in enumerate(self._calibration):  # after judging: the loss used the old one
            cal.learn(preds[:, j], y)
        for j in range(len(self.members)):
            if seen[:, j].any():
                batch = float(losses[seen[:, j], j].mean())
                old = self.loss_[j]
                self.loss_[j] = batch if not np.isfinite(old) else 0.8 * old + 0.2 * batch
        if self.kind == "regression":
            self._track_labels(np.asarray(y, np.float64))
        targets = self._targets(y)
        for learner in self._learners:
            learner.learn(x, targets)
        self.rows_ += len(y)

    def _track_labels(self, y: np.ndarray) -> None:
        """The labels' mean and variance over about the last 500 rows. Until that many have
        come, every row counts alike (a running mean): a stream of one-row files would
        otherwise start from one row's variance, 0, and creep up from there, and the scale the
        losses and the explosion test use would be wrong for hundreds of rows."""
        n, mean, var = len(y), float(y.mean()), float(y.var())
        if self._var is None:
            self._mean, self._var = mean, var
            return
        a = max(1.0 - 0.998 ** n, n / (self.rows_ + n))
        self._var = (1 - a) * self._var + a * var + a * (1 - a) * (mean - self._mean) ** 2
        self._mean = (1 - a) * self._mean + a * mean

    # -- what status and metrics show ------------------------------------------------------------
    def weights(self) -> dict[str, float]:
        return {m: float(w) for m, w in zip(self.members, self._mix.weights_, strict=True)}

    def champion(self) -> str:
        return self.members[int(np.argmax(self._mix.weights_))]

    def view(self) -> dict:
        return {"champion": self.champion(), "rows": self.rows_,
                "members": {m: {"weight": round(float(w), 4),
                                "loss": None if not np.isfinite(v) else round(float(v), 4)}
                            for m, w, v in zip(self.members, self._mix.weights_, self.loss_,
                                               strict=True)},
                "dropped": dict(self.dropped_)}
