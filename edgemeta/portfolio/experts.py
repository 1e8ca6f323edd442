"""Online learners that learn from every labelled row, predict-then-learn.

Both work on a file's rows as one batch (a file is predicted before any of its labels is
learned from), so a batch costs a few numpy calls instead of a Python loop per row: river's
``LinearRegression`` and ``KNNRegressor`` learn one dict per row, about 30-60 us per row here,
which alone would take the daemon under its 20,000 labelled rows/s.

Targets are arrays of shape (n, outputs): the value for regression, one-hot rows for
classification (the experts then predict class frequencies or scores, which
``portfolio.py`` turns into probabilities).
"""

from __future__ import annotations

import numpy as np


class LinearExpert:
    """Ridge regression with exponential forgetting: recursive least squares in batch form.

    ``forgetting`` is the weight a row loses per newer row (0.995: a memory of about 200 rows),
    so after a switch the old regime fades instead of averaging with the new one forever;
    ``ridge`` keeps the solve well posed on few rows. An intercept is always fitted.

    For classifiers it fits one-hot targets (one score per class) and the portfolio's softmax
    turns the scores into probabilities with a temperature fitted to their log loss: a softmax
    over linear scores, updated in closed form per file, rather than a logistic regression fitted
    by its likelihood. Both were measured on river's SEA stream (3 seeds x 6,000 rows): a
    logistic model by bounded-curvature (Boehning) Newton steps over a forgetting window erred
    0.147-0.162 against this one's 0.143-0.154; a replica of river's SGD logistic regression
    (0.138-0.158 alone) added as one more member moved the mixture's error from 0.1446 to
    0.1439, less than its per-row cost (a Python loop per row) was worth.

    >>> rng = np.random.default_rng(0)
    >>> x = rng.normal(size=(200, 2)); y = (3 * x[:, :1] - x[:, 1:] + 0.5)
    >>> e = LinearExpert(outputs=1); e.learn(x, y)
    >>> bool(np.allclose(e.predict(np.array([[1.0, 1.0]])), [[2.5]], atol=0.05))
    True
    """

    name = "linear"

    def __init__(self, outputs: int, forgetting: float = 0.995, ridge: float = 1.0):
        self.outputs = outputs
        self.forgetting = forgetting
        self.ridge = ridge
        self._a: np.ndarray | None = None
        self._b: np.ndarray | None = None
        self._w: np.ndarray | None = None
        self.rows_ = 0

    @staticmethod
    def _design(x: np.ndarray) -> np.ndarray:
        return np.hstack([np.asarray(x, np.float64), np.ones((len(x), 1))])

    def predict(self, x: np.ndarray) -> np.ndarray:
        if self._w is None:
            return np.full((len(x), self.outputs), np.nan)
        return self._design(x) @ self._w

    def learn(self, x: np.ndarray, targets: np.ndarray) -> None:
        z = self._design(x)
        n, d = z.shape
        if self._a is None:
            self._a, self._b = np.zeros((d, d)), np.zeros((d, self.outputs))
        # The newest row has weight 1, the one before it `forgetting`, and so on.
        age = self.forgetting ** np.arange(n - 1, -1, -1, dtype=np.float64)
        decay = self.forgetting ** n
        self._a = decay * self._a + (z * age[:, None]).T @ z
        self._b = decay * self._b + (z * age[:, None]).T @ np.asarray(targets, np.float64)
        self._w = np.linalg.solve(self._a + self.ridge * np.eye(d), self._b)
        self.rows_ += n


class WindowKNN:
    """The mean target of the ``k`` nearest rows among the last ``window`` labelled ones.

    Distances are taken on features scaled by the window's own standard deviation, so a feature
    measured in thousands does not decide alone. A sliding window forgets an old regime within
    ``window`` rows; nothing else is fitted, so it is right wherever the stream's regime is
    local and smooth in the features and no global shape is known. With ``weighted`` (the
    default, as river's KNN) each neighbour counts by its inverse distance, so a row that sits
    on a stored one takes that row's target rather than its neighbour's.

    >>> e = WindowKNN(outputs=1, k=2, window=4)
    >>> e.learn(np.array([[0.0], [1.0], [10.0]]), np.array([[0.0], [1.0], [10.0]]))
    >>> np.round(e.predict(np.array([[0.4], [9.0]])), 2).ravel().tolist()
    [0.4, 9.0]
    >>> u = WindowKNN(outputs=1, k=2, window=4, weighted=False)
    >>> u.learn(np.array([[0.0], [1.0], [10.0]]), np.array([[0.0], [1.0], [10.0]]))
    >>> u.predict(np.array([[0.4], [9.0]])).ravel().tolist()
    [0.5, 5.5]
    """

    name = "knn"

    def __init__(self, outputs: int, k: int = 5, window: int = 500, weighted: bool = True):
        self.outputs = outputs
        self.k = k
        self.window = window
        self.weighted = weighted
        self._x: np.ndarray | None = None
        self._y: np.ndarray | None = None
        self.rows_ = 0

    def predict(self, x: np.ndarray) -> np.ndarray:
        if self._x is None or len(self._x) == 0:
            return np.full((len(x), self.outputs), np.nan)
        scale = self._x.std(axis=0)
        scale[~(scale > 1e-12)] = 1.0
        # float32 distances: twice as fast, and neighbours closer than its precision are ties.
        a = (np.asarray(x, np.float64) / scale).astype(np.float32)
        b = (self._x / scale).astype(np.float32)
        d2 = (a * a).sum(1)[:, None] - 2 * a @ b.T + (b * b).sum(1)[None, :]
        k = min(self.k, len(b))
        nearest = np.argpartition(d2, k - 1, axis=1)[:, :k]
        if not self.weighted:
            return self._y[nearest].mean(axis=1)
        d = np.sqrt(np.maximum(np.take_along_axis(d2, nearest, axis=1), 0.0)).astype(np.float64)
        w = 1.0 / np.maximum(d, 1e-6)
        w /= w.sum(axis=1, keepdims=True)
        return np.einsum("nk,nko->no", w, self._y[nearest])

    def learn(self, x: np.ndarray, targets: np.ndarray) -> None:
        x = np.asarray(x, np.float64)
        y = np.asarray(targets, np.float64)
        if self._x is None:
            self._x, self._y = x[-self.window:], y[-self.window:]
        else:
            self._x = np.vstack([self._x, x])[-self.window:]
            self._y = np.vstack([self._y, y])[-self.window:]
        self.rows_ += len(x)


class RecentKNN(WindowKNN):
    """The same neighbours over a short window (100 rows by default). Where regimes last a few
    hundred rows, a 500-row window mostly remembers other regimes; where they last long, the
    longer window has more neighbours to average. Both run, and the mixture picks the scale the
    stream has (measured: on river's RBF stream the 500-row window errs 0.101, the 100-row one
    0.108; on the project's hyperplane stream 0.273 and 0.155)."""

    name = "knn_recent"

    def __init__(self, outputs: int, k: int = 5, window: int = 100, weighted: bool = True):
        super().__init__(outputs, k=k, window=window, weighted=weighted)


class ShortKNN(WindowKNN):
    """The same neighbours over the last 20 rows: the time scale right after a switch, when
    the longer windows still hold mostly the old regime and the few-shot adaptation is not yet
    serving. Few neighbours are far apart, so alone it is coarse; the mixture gives it weight
    only while it is the best (measured, ``bench stream``, 3 seeds x 6,000 rows replayed: the
    mixture's MSE on sinusoid 0.348 -> 0.255, its first 100 rows after a switch 1.17 -> 0.83;
    error rate on the project's hyperplane 0.126 -> 0.109; no family worse)."""

    name = "knn_short"

    def __init__(self, outputs: int, k: int = 5, window: int = 20, weighted: bool = True):
        super().__init__(outputs, k=k, window=window, weighted=weighted)


class RiverTreeExpert:
    """river's adaptive random forest (``arf``) or Hoeffding adaptive tree (``hat``), row by
    row: opt-in, for streams slow enough to afford them. They learn one dict per row and do not
    vectorize: measured on 10 features in 100-row files, ``hat`` 60-120 us and ``arf``
    0.5-1.8 ms per row (classification-regression), where the four default experts together
    take 13-18 us. Classifiers give river's class probabilities as scores; regressors their
    value. Seeded, so a run repeats.

    >>> rng = np.random.default_rng(0)
    >>> e = TreeExpert(outputs=1, kind="regression")
    >>> x = rng.uniform(-1, 1, size=(400, 1)); e.learn(x, np.where(x > 0, 1.0, -1.0))
    >>> np.round(e.predict(np.array([[0.8], [-0.8]])), 1).ravel().tolist()
    [1.0, -1.0]
    """

    model: str  # "arf" or "hat", set by the subclass

    def __init__(self, outputs: int, kind: str = "regression", seed: int = 0):
        self.outputs = outputs
        self.kind = kind
        self.seed = seed
        self._learner = None
        self.rows_ = 0

    def _make(self):
        from river import forest, tree

        regression = self.kind == "regression"
        if self.model == "arf":
            return (forest.ARFRegressor if regression else forest.ARFClassifier)(seed=self.seed)
        return (tree.HoeffdingAdaptiveTreeRegressor if regression
                else tree.HoeffdingAdaptiveTreeClassifier)(seed=self.seed)

    def predict(self, x: np.ndarray) -> np.ndarray:
        out = np.full((len(x), self.outputs), np.nan)
        if self._learner is None:
            return out
        for i, row in enumerate(np.asarray(x, np.float64).tolist()):
            features = dict(enumerate(row))
            if self.kind == "regression":
                out[i, 0] = self._learner.predict_one(features)
            else:
                proba = self._learner.predict_proba_one(features)
                out[i] = [proba.get(c, 0.0) for c in range(self.outputs)]
        return out

    def learn(self, x: np.ndarray, targets: np.ndarray) -> None:
        if self._learner is None:
            self._learner = self._make()
        t = np.asarray(targets, np.float64)
        labels = t[:, 0].tolist() if self.kind == "regression" else t.argmax(axis=1).tolist()
        for row, label in zip(np.asarray(x, np.float64).tolist(), labels, strict=True):
            self._learner.learn_one(dict(enumerate(row)), label)
        self.rows_ += len(labels)


class ForestExpert(RiverTreeExpert):
    """river's adaptive random forest."""

    model = "arf"


class TreeExpert(RiverTreeExpert):
    """river's Hoeffding adaptive tree."""

    model = "hat"


EXPERTS = {"linear": LinearExpert, "knn": WindowKNN, "knn_recent": RecentKNN,
           "knn_short": ShortKNN, "arf": ForestExpert, "hat": TreeExpert}
DEFAULT_EXPERTS = ("linear", "knn", "knn_recent", "knn_short")


def make_expert(name: str, kind: str, outputs: int, params: dict | None = None):
    """The expert ``name`` for a stream of ``kind`` with ``outputs`` scores per row. Only
    river's learners need the kind; the others learn from one-hot targets either way."""
    cls = EXPERTS[name]
    extra = {"kind": kind} if issubclass(cls, RiverTreeExpert) else {}
    return cls(outputs, **extra, **(params or {}))
