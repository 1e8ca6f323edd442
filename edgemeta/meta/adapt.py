"""The adaptation API used everywhere: bundle weights + support set -> adapted weights.

By default it runs exactly the inner loop the bundle was trained for (steps, step sizes, which
parameters move). Run longer than trained, Meta-SGD's and ANIL's learned steps can diverge; a
non-finite or rising support loss is therefore reported as :class:`AdaptationFailed` rather than
returning weights that would be deployed.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from edgemeta.bundle_format import feature_scale, normalize
from edgemeta.meta.algorithms import make_learner
from edgemeta.meta.bundle import Bundle
from edgemeta.meta.inner import output_loss
from edgemeta.meta.models import head_names
from edgemeta.meta.tasks import TaskBatch


class AdaptationFailed(RuntimeError):
    """The inner loop diverged or was fed a support set it cannot use."""


@dataclass
class AdaptResult:
    weights: dict[str, np.ndarray]
    support_losses: list[float]
    steps: int
    start: str = "meta-init"  # what a continued fit started from (``meta-init`` or ``current``)
    validation_loss: float | None = None
    budget_steps: int | None = None  # a continued fit: the steps each start was allowed
    budget_exhausted: bool = False  # a continued fit stopped by its time guard, not its steps


class _Guard:
    """A wall-clock safety cap: checked between steps, it records that it fired.

    Time never decides how much is learned in the normal case (that would make the weights depend
    on the machine's load); it only stops a fit on a machine far too slow for its step budget.
    """

    def __init__(self, seconds: float):
        self.seconds = seconds
        self._deadline = time.perf_counter() + seconds
        self.fired = False

    def __call__(self) -> bool:
        if not self.fired and time.perf_counter() > self._deadline:
            self.fired = True
        return self.fired


class Adapter:
    """Holds the bundle's network once so repeated adaptations (the worker) skip the set-up."""

    def __init__(self, bundle: Bundle, device: str | torch.device = "cpu"):
        self.bundle = bundle
        self.device = torch.device(device)
        self.model_ = bundle.build_model().to(self.device)
        meta = bundle.meta
        self.kind_ = meta["task"]["kind"]
        self.head_ = head_names(self.model_, meta["model"])
        self.learner_ = make_learner(meta["algorithm"], self.model_, self.kind_,
                                     int(meta["inner"]["steps"]), float(meta["inner"]["lr"]),
                                     self.head_)
        self.init_ = self._tensors(bundle.weights)
        self._mean, self._std = feature_scale(meta)
        # Regression targets as meta-training saw them (the exported graph scales back).
        scaling = meta["output"].get("scaling") or {}
        self.target_mean_ = float(scaling.get("mean", 0.0))
        self.target_std_ = float(scaling.get("std", 1.0))

    def normalize(self, x: np.ndarray) -> np.ndarray:
        """Raw feature rows as the network takes them (:func:`edgemeta.bundle_format.normalize`)."""
        return normalize(x, self._mean, self._std)

    def _tensors(self, weights: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
        return {n: torch.as_tensor(np.asarray(w, dtype=np.float32), device=self.device)
                for n, w in weights.items()}

    def prepare(self, x: np.ndarray, y: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Validate and normalize a raw support set exactly as meta-training saw its data."""
        x = np.asarray(x, dtype=np.float32)
        features = int(self.bundle.meta["input"]["features"])
        if x.ndim == 1 and features == 1:
            x = x[:, None]
        if x.ndim != 2 or x.shape[1] != features:
            raise AdaptationFailed(f"support x has shape {x.shape}; the bundle expects (K, {features})")
        y = np.asarray(y)
        if len(y) != len(x) or len(x) == 0:
            raise AdaptationFailed(f"support set has {len(x)} rows of x and {len(y)} labels")
        if not (np.isfinite(x).all() and np.isfinite(y.astype(np.float64)).all()):
            raise AdaptationFailed("support set contains NaN or infinite values")
        xt = torch.as_tensor(self.normalize(x), device=self.device)
        if self.kind_ == "regression":
            y = (y.astype(np.float64) - self.target_mean_) / self.target_std_
            yt = torch.as_tensor(y.astype(np.float32).reshape(len(y), -1), device=self.device)
        else:
            outputs = int(self.bundle.meta["output"]["size"])
            if y.min() < 0 or y.max() >= outputs or not np.all(y == np.round(y)):
                raise AdaptationFailed(f"class labels must be integers in [0, {outputs})")
            yt = torch.as_tensor(y.astype(np.int64), device=self.device)
        return xt, yt

    def loss(self, params: Mapping[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> float:
        with torch.no_grad():
            out = torch.func.functional_call(self.model_, dict(params), (x,))
            return float(output_loss(self.kind_, out, y))

    def adapt(self, support_x: np.ndarray, support_y: np.ndarray, steps: int | None = None,
              init: Mapping[str, np.ndarray] | None = None) -> AdaptResult:
        """Adapt from the meta-initialization (or ``init``, e.g. the serving weights)."""
        x, y = self.prepare(support_x, support_y)
        params = dict(self.init_)
        if init is not None:
            params.update(self._tensors(init))
        steps = int(self.bundle.meta["inner"]["steps"]) if steps is None else int(steps)
        if steps < 0:
            raise AdaptationFailed(f"steps must be >= 0, got {steps}")
        batch = TaskBatch(x[None], y[None], x[None], y[None])
        net = self.learner_.network(params)
        losses = [self.loss(net, x, y)]
        if self.learner_.closed_form:
            fast = {n: p[0] for n, p in self.learner_.adapt(params, batch).items()}
            losses.append(self.loss(fast, x, y))
        else:
            fast = params
            for _ in range(steps):
                fast = self._inner_step(fast, batch)
                losses.append(self.loss(self.learner_.network(fast), x, y))
                if not np.isfinite(losses[-1]):
                    break
        if not np.all(np.isfinite(losses)):
            raise AdaptationFailed(f"support loss became non-finite: {losses}")
        if losses[-1] > losses[0] * (1 + 1e-6) + 1e-12:
            raise AdaptationFailed(
                f"support loss rose from {losses[0]:.4g} to {losses[-1]:.4g} over {steps} steps "
                f"(trained for {self.bundle.meta['inner']['steps']}); not returning the weights")
        weights = {n: p.detach().cpu().numpy().astype(np.float32)
                   for n, p in self.learner_.network(fast).items()}
        return AdaptResult(weights, losses, steps)

    def fit(self, x: np.ndarray, y: np.ndarray, init: Mapping[str, np.ndarray] | None = None,
            max_steps: int = 300, lr: float = 3e-3, steps: int | None = None,
            max_seconds: float = 30.0, batch: int = 256, seed: int = 0, recent_rows: int = 50,
            max_validation: int = 100) -> AdaptResult:
        """Continued learning on every labelled row of a regime, beyond the few-shot inner loop.

        Starts compete: the meta-initialization after its own inner loop run on all the rows for
        as many steps as they support (:meth:`_inner_path`; the few-shot start, best when the
        regime is new), ``init``, the serving weights trained on all the rows (best once they
        have seen most of a stationary regime), and the serving weights trained on only the
        newest half, quarter, eighth ... (down to ``recent_rows``): when the world drifts slowly,
        or changed in a way the detector could not see, the older rows describe a concept that
        is gone, and forgetting them is what an online learner does. Each is trained with Adam,
        early-stopped on the newest rows (a fifth, at most ``max_validation``: the rows closest
        to what comes next), and the start and step with the lowest validation loss win, so a
        stationary regime keeps all its rows and a drifting one learns from the recent ones.

        The effort is counted in steps, never in time, so the same rows and ``seed`` give the
        same weights on an idle machine and a loaded one: ``steps`` in all (default: one per
        row per start), shared evenly by the starts, each start at least 20 and at most
        ``max_steps``; each stops early once its validation loss stops improving.
        ``max_seconds`` is only a guard against a machine too slow for the budget: when it fires
        the fit returns its best so far and says so (``budget_exhausted``), and the caller
        counts it.
        """
        xt, yt = self.prepare(x, y)
        n = len(yt)
        if n < 10:
            raise AdaptationFailed(f"a continued fit needs at least 10 rows, got {n}")
        n_val = max(2, min(n // 5, max_validation))
        tx, ty, vx, vy = xt[:-n_val], yt[:-n_val], xt[-n_val:], yt[-n_val:]
        guard = _Guard(max_seconds)
        windows = []  # the newest half, quarter, ... of the training rows
        m = len(ty) // 2
        while init is not None and m >= recent_rows and len(windows) < 4:
            windows.append(m)
            m //= 2
        n_starts = 1 + (init is not None) + len(windows)
        total = n_starts * len(ty) if steps is None else int(steps)
        per_start = max(20, min(int(max_steps), total // n_starts))
        # Each start: its weights and how many of the newest training rows it learns from.
        adapted = self._inner_path(tx, ty, vx, vy, per_start, guard)
        starts = {"meta-init": (adapted, len(ty))}
        if init is not None:
            serving = {**adapted, **self._tensors(init)}
            starts["current"] = (serving, len(ty))
            starts.update({f"recent-{m}": (serving, m) for m in windows})
        # A closed-form fit (a protonet's prototypes of every row) has nothing to train beyond.
        closed_form = self.learner_.closed_form
        generator = torch.Generator(device="cpu").manual_seed(seed)
        best: tuple[float, str, int, dict[str, torch.Tensor]] | None = None
        curve: list[float] = []
        for name, (params, m) in starts.items():
            budget = 0 if closed_form or guard.fired else per_start
            loss, step, weights, losses = self._train(params, tx[-m:], ty[-m:], vx, vy, budget,
                                                      lr, batch, generator, guard)
            if best is None or loss < best[0]:
                best, curve = (loss, name, step, weights), losses
        loss, name, step, weights = best
        if not np.isfinite(loss):
            raise AdaptationFailed("every start of the continued fit diverged")
        out = {n_: p.detach().cpu().numpy().astype(np.float32) for n_, p in weights.items()}
        return AdaptResult(out, curve, step, start=name, validation_loss=float(loss),
                           budget_steps=per_start, budget_exhausted=guard.fired)

    def _inner_step(self, fast: dict[str, torch.Tensor], batch: TaskBatch) -> dict[str, torch.Tensor]:
        """One first-order step of the bundle's inner loop (its learned rates kept in ``fast``)."""
        with torch.enable_grad():
            stepped = self.learner_.adapt(fast, batch, steps=1, first_order=True)
        return {**fast, **{n: p[0].detach() for n, p in stepped.items()}}

    def _inner_path(self, tx: torch.Tensor, ty: torch.Tensor, vx: torch.Tensor, vy: torch.Tensor,
                    max_steps: int, guard: _Guard, every: int = 5, patience: int = 4
                    ) -> dict[str, torch.Tensor]:
        """The meta-initialization adapted by its own inner loop on all training rows, for as many
        steps as the validation rows keep improving: the inner loop was meta-trained for K rows
        and a few steps, and on hundreds of rows more steps of it are what the data supports
        (on 300 rows of a river hyperplane: 30 steps cut the error of the bundle's 5 by a
        third)."""
        params = dict(self.init_)
        batch = TaskBatch(tx[None], ty[None], tx[None], ty[None])
        if self.learner_.closed_form:
            return {n: p[0].detach() for n, p in self.learner_.adapt(params, batch).items()}
        fast = params
        best = (self.loss(self.learner_.network(fast), vx, vy), self.learner_.network(fast))
        worse = 0
        for step in range(1, max(1, int(max_steps)) + 1):
            fast = self._inner_step(fast, batch)
            late = guard()
            if step % every and step != max_steps and not late:
                continue
            val = self.loss(self.learner_.network(fast), vx, vy)
            if not np.isfinite(val):
                break
            if val < best[0]:
                best, worse = (val, self.learner_.network(fast)), 0
            else:
                worse += 1
            if worse >= patience or late:
                break
        return {n: p.detach() for n, p in best[1].items()}

    def _train(self, params: dict[str, torch.Tensor], tx: torch.Tensor, ty: torch.Tensor,
               vx: torch.Tensor, vy: torch.Tensor, steps: int, lr: float, batch: int,
               generator: torch.Generator, guard: _Guard, patience: int = 5, every: int = 10
               ) -> tuple[float, int, dict[str, torch.Tensor], list[float]]:
        """Adam from ``params``; returns the best validation loss, its step and weights."""
        leaves = {n: p.detach().clone().requires_grad_(True) for n, p in params.items()}
        best = (self.loss(leaves, vx, vy), 0, {n: p.detach().clone() for n, p in leaves.items()})
        losses = [best[0]]
        opt = torch.optim.Adam(leaves.values(), lr=lr)
        worse = 0
        for step in range(1, steps + 1):
            if len(ty) > batch:
                idx = torch.randint(len(ty), (batch,), generator=generator).to(tx.device)
                bx, by = tx[idx], ty[idx]
            else:
                bx, by = tx, ty
            opt.zero_grad()
            out = torch.func.functional_call(self.model_, leaves, (bx,))
            output_loss(self.kind_, out, by).backward()
            opt.step()
            late = guard()
            if step % every and step != steps and not late:
                continue
            val = self.loss(leaves, vx, vy)
            losses.append(val)
            if not np.isfinite(val):
                break
            if val < best[0]:
                best, worse = (val, step, {n: p.detach().clone() for n, p in leaves.items()}), 0
            else:
                worse += 1
            if worse >= patience or late:
                break
        return best[0], best[1], best[2], losses


def adapt(bundle: Bundle, support_x: np.ndarray, support_y: np.ndarray,
          steps: int | None = None, init: Mapping[str, np.ndarray] | None = None,
          device: str = "cpu") -> AdaptResult:
    """One-off adaptation; long-lived callers keep an :class:`Adapter`."""
    return Adapter(bundle, device).adapt(support_x, support_y, steps=steps, init=init)
