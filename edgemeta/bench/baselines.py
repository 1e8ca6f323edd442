"""The alternatives ``edgemeta bench stream`` compares the daemon with: the oracle, the bare
meta-initialization and periodic fine-tuning (the bundle's network in torch), and river's online
learners for drifting streams."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from edgemeta.testing.streams import Run, SwitchingStream, sample_loss

# -- the meta-learned alternatives, in torch ----------------------------------------------------------

class TorchNet:
    """The bundle's network for the oracle, meta-init and periodic baselines."""

    def __init__(self, bundle: Path):
        import torch

        from edgemeta.meta.adapt import Adapter
        from edgemeta.meta.bundle import read_bundle

        self.torch = torch
        self.adapter = Adapter(read_bundle(bundle))
        self.kind = self.adapter.kind_
        self.init = self.adapter.bundle.network_weights()

    def predict(self, weights: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
        torch = self.torch
        a = self.adapter
        xt = torch.as_tensor(a.normalize(x))
        with torch.no_grad():
            out = torch.func.functional_call(a.model_, {k: torch.as_tensor(v) for k, v in
                                                        weights.items()}, (xt,)).numpy()
        if self.kind == "regression":
            return a.bundle.to_user_units(out[:, 0])
        return out.argmax(axis=1)

    def adapt(self, x, y, steps: int | None, init=None) -> dict[str, np.ndarray] | None:
        from edgemeta.meta.adapt import AdaptationFailed

        try:
            return self.adapter.adapt(x, y, steps=steps, init=init).weights
        except AdaptationFailed:
            return None


def _piecewise(net: TorchNet, stream: SwitchingStream, changes: list[tuple[int, dict]]) -> np.ndarray:
    """Loss when the weights change at given rows (each change applies from that row on)."""
    n = len(stream.y)
    loss = np.empty(n)
    bounds = [c[0] for c in changes] + [n]
    for (start, weights), stop in zip(changes, bounds[1:], strict=True):
        if stop > start:
            pred = net.predict(weights, stream.x[start:stop])
            loss[start:stop] = sample_loss(stream.kind, pred, stream.y[start:stop])
    return loss


def run_oracle(stream: SwitchingStream, net: TorchNet, support: int, steps: int | None) -> Run:
    started = time.perf_counter()
    changes = [(0, net.init)]
    for s in [0, *stream.switches]:
        end = s + support
        if end >= len(stream.y):
            break
        weights = net.adapt(stream.x[s:end], stream.y[s:end], steps)
        if weights is not None:
            changes.append((end, weights))
    changes.sort(key=lambda c: c[0])
    return Run("oracle", _piecewise(net, stream, changes), time.perf_counter() - started)


def run_meta_init(stream: SwitchingStream, net: TorchNet) -> Run:
    started = time.perf_counter()
    return Run("meta-init", _piecewise(net, stream, [(0, net.init)]), time.perf_counter() - started)


def run_periodic(stream: SwitchingStream, net: TorchNet, period: int, window: int,
                 steps: int | None) -> Run:
    started = time.perf_counter()
    current = net.init
    changes = [(0, current)]
    for t in range(period, len(stream.y), period):
        weights = net.adapt(stream.x[t - window:t], stream.y[t - window:t], steps, init=current)
        if weights is not None:
            current = weights
            changes.append((t, current))
    return Run("periodic", _piecewise(net, stream, changes), time.perf_counter() - started,
               {"period": period, "window": window})


# -- river ------------------------------------------------------------------------------------------

def river_learners(kind: str, seed: int) -> dict[str, Callable[[], Any]]:
    from river import forest, linear_model, neighbors, preprocessing, tree

    if kind == "regression":
        return {"river ARF": lambda: forest.ARFRegressor(seed=seed),
                "river HAT": lambda: tree.HoeffdingAdaptiveTreeRegressor(seed=seed),
                "river KNN (window 100)": lambda: neighbors.KNNRegressor(
                    n_neighbors=5, engine=neighbors.LazySearch(window_size=100)),
                "river linear": lambda: preprocessing.StandardScaler()
                | linear_model.LinearRegression()}
    return {"river ARF": lambda: forest.ARFClassifier(seed=seed),
            "river HAT": lambda: tree.HoeffdingAdaptiveTreeClassifier(seed=seed),
            "river KNN (window 100)": lambda: neighbors.KNNClassifier(
                n_neighbors=5, engine=neighbors.LazySearch(window_size=100)),
            "river linear": lambda: preprocessing.StandardScaler()
            | linear_model.LogisticRegression()}


def run_river(name: str, make: Callable[[], Any], stream: SwitchingStream) -> Run:
    model = make()
    n = len(stream.y)
    loss = np.empty(n)
    names = [f"x{i}" for i in range(stream.x.shape[1])]
    started = time.perf_counter()
    for i in range(n):
        row = dict(zip(names, map(float, stream.x[i]), strict=True))
        label = float(stream.y[i]) if stream.kind == "regression" else int(stream.y[i])
        pred = model.predict_one(row)
        if pred is None:
            pred = 0.0 if stream.kind == "regression" else 0
        loss[i] = sample_loss(stream.kind, pred, label)
        model.learn_one(row, label)
    return Run(name, loss, time.perf_counter() - started)


def run_expert(name: str, stream: SwitchingStream, classes: int = 2) -> Run:
    """One of the portfolio's online experts alone, predict-then-learn row by row (on the raw
    features: the daemon gives them the bundle-normalized ones, which a linear model and a
    standardized KNN do not mind)."""
    from edgemeta.portfolio.experts import make_expert

    regression = stream.kind == "regression"
    outputs = 1 if regression else max(classes, int(np.max(stream.y)) + 1)
    model = make_expert(name, stream.kind, outputs)
    n = len(stream.y)
    loss = np.empty(n)
    started = time.perf_counter()
    for i in range(n):
        x = stream.x[i:i + 1]
        out = model.predict(x)[0]
        if not np.isfinite(out).all():
            out = np.zeros(outputs)
        pred = float(out[0]) if regression else int(np.argmax(out))
        loss[i] = sample_loss(stream.kind, pred, stream.y[i])
        target = (np.array([[float(stream.y[i])]]) if regression
                  else np.eye(outputs)[[int(stream.y[i])]])
        model.learn(x, target)
    return Run(f"{name} (expert)", loss, time.perf_counter() - started)
