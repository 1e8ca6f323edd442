"""The outer loop: meta-train an initialization, validate on held-out tasks, keep the best.

Settings are checked before any work so a typo costs nothing; the loop itself is deterministic
under a seed on CPU (task sampling uses a numpy Generator, weights a seeded torch generator).
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from edgemeta.meta.algorithms import ALGORITHMS, learner_class, make_learner
from edgemeta.meta.chance import ChanceCheck, judged_on
from edgemeta.meta.distributed import Context, PeerLost
from edgemeta.meta.inner import batch_loss, batch_predict
from edgemeta.meta.models import build_model, head_names
from edgemeta.meta.tasks import StandardizedTargets, replayed_families


class SettingsError(ValueError):
    """Meta-training settings that make no sense; the message names the setting."""


@dataclass
class TrainSettings:
    algorithm: str = "maml"
    tasks: dict[str, Any] = field(default_factory=lambda: {"name": "sinusoid"})
    model: dict[str, Any] = field(default_factory=lambda: {"arch": "mlp", "hidden": [40, 40]})
    inner_steps: int = 1
    inner_lr: float = 0.01
    outer_lr: float = 0.001
    meta_batch: int = 25
    iterations: int = 1000
    time_budget: float | None = None
    val_every: int = 100
    val_tasks: int = 100
    #: Also validate when this many seconds passed since the last validation (default: a tenth
    #: of the time budget, at most 30 s), so a short time budget cannot end before the first one.
    val_seconds: float | None = None
    seed: int = 0
    device: str = "auto"
    #: A warm start that replays its parent's tasks keeps only weights whose validation loss on
    #: those tasks is at most this much (relative) above the parent's own: re-meta-training must
    #: not buy the new family with the old one.
    max_forgetting: float = 0.05

    def validate(self) -> None:
        if self.algorithm not in ALGORITHMS:
            raise SettingsError(
                f"algorithm: unknown {self.algorithm!r}; choose one of {', '.join(ALGORITHMS)}")
        for name in ("inner_steps", "meta_batch", "iterations", "val_every", "val_tasks"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise SettingsError(f"{name}: must be a positive integer, got {value!r}")
        for name in ("inner_lr", "outer_lr"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise SettingsError(f"{name}: must be a positive number, got {value!r}")
        if not (isinstance(self.max_forgetting, int | float) and self.max_forgetting >= 0):
            raise SettingsError(f"max_forgetting: must be a share >= 0, got "
                                f"{self.max_forgetting!r}")
        if self.val_seconds is not None and not self.val_seconds > 0:
            raise SettingsError(f"val_seconds: must be positive seconds, got {self.val_seconds!r}")
        if self.time_budget is not None and not self.time_budget > 0:
            raise SettingsError(f"time_budget: must be positive seconds, got {self.time_budget!r}")
        if self.device not in ("auto", "cpu") and not self.device.startswith("cuda"):
            raise SettingsError(f"device: use auto, cpu or cuda[:N], got {self.device!r}")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise SettingsError(f"device: {self.device!r} asked for but CUDA is not available")
        for key in ("shots", "queries"):
            value = self.tasks.get(key, 1)
            if not isinstance(value, int) or value <= 0:
                raise SettingsError(f"tasks.{key}: must be a positive integer, got {value!r}")
        if self.inner_lr <= self.outer_lr and not learner_class(self.algorithm).closed_form:
            warnings.warn(
                f"inner_lr={self.inner_lr} is not above outer_lr={self.outer_lr}; the inner rate is "
                "normally about 10x the outer one", stacklevel=2)

    def validation_interval(self) -> float:
        if self.val_seconds is not None:
            return self.val_seconds
        return min(30.0, self.time_budget / 10) if self.time_budget else 30.0

    def resolved_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)


@dataclass
class TrainResult:
    params: dict[str, torch.Tensor]
    best_val: float
    best_iteration: int
    iterations_done: int
    seconds: float
    interrupted: bool
    history: list[dict[str, float]]
    model: torch.nn.Module
    tasks: Any
    head: list[str]
    settings: TrainSettings
    # The best weights on the validation tasks against the predictor that ignores x
    # (meta/chance.py); None on the ranks that do not validate.
    chance: ChanceCheck | None = None

    @property
    def untrained(self) -> bool:
        """No validation beat the random initialization: the bundle would hold iteration 0."""
        return self.best_iteration == 0

    def summary(self) -> dict[str, Any]:
        chance = self.chance.as_dict() if self.chance is not None else None
        return {"best_val_loss": self.best_val, "best_iteration": self.best_iteration,
                "versus_chance": chance,
                "iterations": self.iterations_done, "seconds": round(self.seconds, 2),
                "interrupted": self.interrupted, "settings": asdict(self.settings)}


def build_for(settings: TrainSettings, tasks) -> tuple[torch.nn.Module, list[str]]:
    spec = dict(settings.model)
    if spec.get("arch") == "mlp":
        spec.setdefault("in_features", tasks.in_features)
        spec.setdefault("out_features", tasks.out_features)
    model = build_model(spec)
    settings.model = spec
    return model, head_names(model, spec)


def meta_validate(learner, params, tasks, n_tasks: int, seed: int, device, split: str = "val",
                  steps: int | None = None) -> float:
    """Mean query loss after adaptation on ``n_tasks`` fixed held-out tasks."""
    batch = tasks.sample(n_tasks, np.random.default_rng(seed), split=split).to(device)
    with torch.enable_grad():
        fast = learner.adapt({n: p.detach() for n, p in params.items()}, batch, steps=steps,
                             first_order=True)
    loss = batch_loss(learner.model, learner.kind, fast, batch.query_x, batch.query_y)
    return float(loss.mean().detach())


def chance_check(learner, params, tasks, n_tasks: int, seed: int, device) -> ChanceCheck:
    """``params`` adapted on the validation tasks against the no-adaptation predictor on the same
    rows (standardized units, as the validation loss)."""
    batch = tasks.sample(n_tasks, np.random.default_rng(seed), split="val").to(device)
    with torch.enable_grad():
        fast = learner.adapt({n: p.detach() for n, p in params.items()}, batch, first_order=True)
    fast = {n: p.detach() for n, p in fast.items()}
    with torch.no_grad():
        losses = batch_loss(learner.model, learner.kind, fast, batch.query_x, batch.query_y)
        errors = None
        if learner.kind == "classification":
            served = batch_predict(learner.model, fast, batch.query_x).argmax(-1)
            errors = (served != batch.query_y).double().mean(-1)
    return judged_on(learner.kind, [batch], tasks.out_features, losses, errors)


def train(settings: TrainSettings, tasks,
          progress: Callable[[int, float, float | None], None] | None = None,
          init: dict[str, torch.Tensor] | None = None, ctx: Context | None = None) -> TrainResult:
    """Meta-train; Ctrl-C (KeyboardInterrupt) stops early and still returns the best so far.

    ``init`` continues from an existing meta-initialization (``train --init``): iteration 0 is
    those weights, so the run can only keep or improve on them. ``ctx`` is the torchrun process
    group (``meta.distributed``): each rank meta-trains on its share of every meta-batch with its
    own task sampler, gradients are all-reduced, and only rank 0 validates and keeps the best.
    """
    settings.validate()
    ctx = ctx or Context()
    if settings.meta_batch < ctx.world:
        raise SettingsError(f"meta_batch: {settings.meta_batch} tasks cannot be split over "
                            f"{ctx.world} processes; use at least {ctx.world}")
    if tasks.kind == "regression" and init is None and not isinstance(tasks, StandardizedTargets):
        # A warm start (init) stays in its parent's scale, whatever it was.
        fitted = StandardizedTargets.fit(tasks, seed=settings.seed + 11)
        if fitted.needed():
            tasks = fitted
    return _MetaTraining(settings, tasks, init, ctx, progress).run()


class _MetaTraining:
    """One run of :func:`train`. A class because the loop, the validations and the handling of
    an interruption share the weights, the best so far and the counters."""

    def __init__(self, settings: TrainSettings, tasks, init: dict[str, torch.Tensor] | None,
                 ctx: Context, progress: Callable[[int, float, float | None], None] | None):
        self.settings, self.tasks, self.ctx, self.progress = settings, tasks, ctx, progress
        self.device = settings.resolved_device()
        torch.manual_seed(settings.seed)  # the same initial weights on every rank
        self.rng = np.random.default_rng(settings.seed if ctx.world == 1
                                         else [settings.seed, ctx.rank])
        self.local_batch = ctx.share(settings.meta_batch)
        self.model, self.head = build_for(settings, tasks)
        self.model.to(self.device)
        self.learner = make_learner(settings.algorithm, self.model, tasks.kind,
                                    settings.inner_steps, settings.inner_lr, self.head)
        self.params = self._initial_params(init)
        self.optimizer = torch.optim.Adam(self.params.values(), lr=settings.outer_lr)
        self.best = {n: p.detach().clone() for n, p in self.params.items()}
        # A warm start that replays its parent's tasks validates the two families apart: the
        # best weights are those best on the new tasks among the ones within max_forgetting of
        # the parent on its own (iteration 0, the parent, always qualifies).
        self.families = replayed_families(tasks) if init is not None else None
        self.first = (self.scores() if ctx.writer or self.families
                      else {"val_loss": math.inf})
        self.best_val, self.best_it = self.first["val_loss"], 0
        self.replayed_limit = (self.first.get("val_replayed", math.inf)
                               * (1 + settings.max_forgetting))
        self.history: list[dict[str, float]] = [{"iteration": 0, **self.first}]
        self.start = self.last_val = time.perf_counter()
        self.interval = settings.validation_interval()
        self.interrupted = False
        self.it, self.validated = 0, 0
        self.loss: torch.Tensor | None = None

    def _initial_params(self, init: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
        net = {n: p.detach().clone() for n, p in self.model.named_parameters()}
        params = {**net, **self.learner.extra_params(net)}
        if init is not None:
            missing, unexpected = sorted(set(params) - set(init)), sorted(set(init) - set(params))
            if missing or unexpected:
                raise SettingsError(f"init: the weights do not fit the model (missing {missing}, "
                                    f"unexpected {unexpected})")
            for n, value in init.items():
                if tuple(value.shape) != tuple(params[n].shape):
                    raise SettingsError(f"init: {n} has shape {tuple(value.shape)}, the model "
                                        f"{tuple(params[n].shape)}")
                params[n] = value.detach().clone().to(device=self.device, dtype=params[n].dtype)
        for p in params.values():
            p.requires_grad_(True)
        return params

    # -- validation ---------------------------------------------------------------------------
    def scores(self) -> dict[str, float]:
        s = self.settings
        if self.families is None:
            return {"val_loss": meta_validate(self.learner, self.params, self.tasks, s.val_tasks,
                                              s.seed + 1, self.device)}
        new, old = (meta_validate(self.learner, self.params, f, s.val_tasks, s.seed + 1,
                                  self.device) for f in self.families[:2])
        return {"val_loss": new, "val_replayed": old}

    def validate(self) -> float:
        figures = self.scores()
        val = figures["val_loss"]
        self.history.append({"iteration": self.it, "meta_loss": self.loss.item(), **figures})
        if val < self.best_val and figures.get("val_replayed", 0.0) <= self.replayed_limit:
            self.best_val, self.best_it = val, self.it
            self.best = {n: p.detach().clone() for n, p in self.params.items()}
        self.validated, self.last_val = self.it, time.perf_counter()
        return val

    def _validation_due(self) -> bool:
        s = self.settings
        return (self.it % s.val_every == 0 or self.it == s.iterations
                or time.perf_counter() - self.last_val >= self.interval)

    # -- one meta-iteration ---------------------------------------------------------------------
    def outer_loss(self) -> torch.Tensor:
        if self.families is None:
            return self.learner.outer_loss(self.params,
                                           self.tasks.sample(self.local_batch, self.rng)
                                           .to(self.device))
        # Each family's loss relative to the parent's on it, weighted by its share of the
        # meta-batch: a family whose tasks have 10x the loss (larger amplitudes, say) would
        # otherwise own the gradient, and "replay half" would replay almost nothing.
        new, old, ratio = self.families
        n_old = int(round(self.local_batch * ratio))
        total = torch.zeros((), device=self.device)
        for family, n, share, scale in (
                (new, self.local_batch - n_old, 1 - ratio, self.first["val_loss"]),
                (old, n_old, ratio, self.first["val_replayed"])):
            if n > 0:
                batch = family.sample(n, self.rng).to(self.device)
                total = total + share * self.learner.outer_loss(self.params, batch) / max(scale,
                                                                                          1e-8)
        return total

    def _nonfinite(self) -> FloatingPointError:
        return FloatingPointError(
            f"meta-loss became {float(self.loss)} at iteration {self.it + 1}; lower outer_lr "
            f"({self.settings.outer_lr}) or inner_lr ({self.settings.inner_lr})")

    def _out_of_budget(self) -> bool:
        s = self.settings
        return self.it >= s.iterations or bool(
            s.time_budget and time.perf_counter() - self.start > s.time_budget)

    def _gradient(self) -> bool:
        """The local gradient of one meta-batch; returns whether a Ctrl-C came under torchrun
        (it is told to the other ranks through the next all-reduce; alone, it propagates)."""
        try:
            self.loss = self.outer_loss()
            self.optimizer.zero_grad()
            if torch.isfinite(self.loss):
                self.loss.backward()
        except KeyboardInterrupt:
            if self.ctx.world == 1:
                raise
            return True
        return False

    def _loop(self) -> None:
        stop_asked = False
        while True:
            stop = stop_asked or self._out_of_budget()
            if stop and self.ctx.world == 1:
                return
            if self._gradient():
                stop_asked = stop = True
            if self.ctx.world > 1:
                any_stop, any_bad = self.ctx.reduce(self.params.values(),
                                                    self.local_batch / self.settings.meta_batch,
                                                    stop, not torch.isfinite(self.loss))
                if any_bad:
                    raise self._nonfinite()
                if any_stop:
                    self.interrupted = stop_asked
                    return
            elif not torch.isfinite(self.loss):
                raise self._nonfinite()
            self.optimizer.step()
            self.it += 1
            val = self.validate() if self.ctx.writer and self._validation_due() else None
            if self.progress and self.ctx.writer:
                self.progress(self.it, self.loss.item(), val)

    # -- the run --------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        lost: PeerLost | None = None
        try:
            self._loop()
        except KeyboardInterrupt:
            self.interrupted = True
        except PeerLost as exc:
            lost, self.interrupted = exc, True
        # A second interruption (torchrun's SIGTERM right after a peer's death was noticed) must
        # not lose what was learned: nothing below lets one escape.
        with contextlib.suppress(KeyboardInterrupt):
            if lost is not None:
                warnings.warn(f"{lost}; keeping the best weights so far", stacklevel=3)
            if (self.ctx.writer and self.it > self.validated and self.loss is not None
                    and torch.isfinite(self.loss)):
                # Always judge the last weights too: a budget or Ctrl-C between validations
                # must not throw away everything learned since the last one.
                val = self.validate()
                if self.progress:
                    self.progress(self.it, self.loss.item(), val)
        chance = None
        if self.ctx.writer:
            with contextlib.suppress(KeyboardInterrupt):
                chance = chance_check(self.learner, self.best, self.tasks,
                                      max(self.settings.val_tasks, 200), self.settings.seed + 1,
                                      self.device)
        result = None
        while result is None:  # nor here: the caller ignores SIGTERM once it has the result
            with contextlib.suppress(KeyboardInterrupt):
                result = TrainResult({n: p.cpu() for n, p in self.best.items()}, self.best_val,
                                     self.best_it, self.it, time.perf_counter() - self.start,
                                     self.interrupted, self.history, self.model.cpu(),
                                     self.tasks, self.head, self.settings, chance)
        return result


class ProgressBar:
    """A one-line progress bar on stderr with the meta-loss and the latest validation loss.

    The bar follows whichever limit binds: the iteration count, or the time budget when that
    will end the run first (a 120 s budget must not show 2% of 10,000 iterations at the end).
    Into a file or a pipe (a log) it writes a plain line every ``log_every_s`` seconds instead of
    carriage-return frames, which would make one line of hundreds of kilobytes.
    """

    def __init__(self, total: int, time_budget: float | None = None, stream=sys.stderr,
                 every: int = 10, log_every_s: float = 10.0):
        self.total = total
        self.time_budget = time_budget
        self.stream = stream
        self.every = every
        self.log_every_s = log_every_s
        self._terminal = bool(getattr(stream, "isatty", lambda: False)())
        self._logged: float | None = None
        self._val: float | None = None
        self._start: float | None = None

    def __call__(self, it: int, loss: float, val: float | None) -> None:
        if self._start is None:  # the first iteration: the budget's clock started just before it
            self._start = time.perf_counter()
        if val is not None:
            self._val = val
        if it % self.every and val is None and it != self.total:
            return
        elapsed = time.perf_counter() - self._start
        by_iterations = it / self.total
        by_time = elapsed / self.time_budget if self.time_budget else 0.0
        if by_time > by_iterations:
            fraction, where = by_time, f"{elapsed:.0f}/{self.time_budget:.0f}s, {it} it"
        else:
            fraction, where = by_iterations, f"{it}/{self.total} it, {elapsed:.0f}s"
        done = int(30 * min(1.0, fraction))
        val_text = f"{self._val:.4f}" if self._val is not None else "-"
        text = f"[{'#' * done}{'.' * (30 - done)}] {where} meta-loss {loss:.4f} val {val_text}"
        if self._terminal:
            self.stream.write(f"\r{text}   ")
        elif self._logged is None or elapsed - self._logged >= self.log_every_s \
                or it == self.total:
            self._logged = elapsed
            self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self._terminal:
            self.stream.write("\n")


def bundle_meta(result: TrainResult) -> dict[str, Any]:
    """bundle.json contents for a training run (its fields: docs/design.md)."""
    s, tasks = result.settings, result.tasks
    adapts = result.head if learner_class(s.algorithm).head_only else "all"
    names = [f"x{i}" for i in range(tasks.in_features)]
    output: dict[str, Any] = {"size": tasks.out_features}
    if tasks.kind == "regression":
        # The targets the meta-initialization was trained on (in the user's units): the device
        # refuses to adapt on labels far outside them (poisoned or mis-scaled labels, see
        # daemon/sanity.py).
        raw = tasks.inner if isinstance(tasks, StandardizedTargets) else tasks
        probe = raw.sample(200, np.random.default_rng(s.seed + 11), split="train")
        ys = np.concatenate([probe.support_y.numpy().ravel(), probe.query_y.numpy().ravel()])
        output["target_range"] = [float(np.quantile(ys, 0.001)), float(np.quantile(ys, 0.999))]
        # None: trained on the targets as they are (near unit scale, StandardizedTargets.needed)
        output["scaling"] = tasks.scaling if isinstance(tasks, StandardizedTargets) else None
    return {
        "task": {"kind": tasks.kind, "distribution": tasks.describe()},
        "input": {"features": tasks.in_features, "feature_names": names,
                  "normalization": tasks.normalization},
        "output": output,
        "model": s.model,
        "algorithm": s.algorithm,
        "inner": {"steps": s.inner_steps, "lr": s.inner_lr, "adapts": adapts,
                  "learned_lr": s.algorithm == "metasgd"},
        "training": result.summary(),
    }


def save_bundle(result: TrainResult, path, lineage: dict[str, Any] | None = None) -> Any:
    """Write the bundle; ``lineage`` (``train --init``) records the parent and the task sources."""
    from edgemeta.meta.bundle import write_bundle

    probe = result.tasks.sample(4, np.random.default_rng(result.settings.seed + 7), split="test")
    probe_x = probe.query_x.reshape(-1, result.tasks.in_features).numpy()
    meta = bundle_meta(result)
    if lineage is not None:
        meta["lineage"] = lineage
    return write_bundle(path, meta, result.params, probe_x)
