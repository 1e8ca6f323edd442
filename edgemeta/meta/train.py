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
from edgemeta.meta.chance import ChanceCheck, chance_errors, chance_losses, versus_chance
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
        chance = chance_losses(learner.kind, batch, tasks.out_features)
        if learner.kind != "classification":
            return versus_chance(losses, chance)
        served = batch_predict(learner.model, fast, batch.query_x).argmax(-1)
        errors = (served != batch.query_y).double().mean(-1)
    return versus_chance(losses, chance, errors, chance_errors(batch, tasks.out_features))


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
    device = settings.resolved_device()
    torch.manual_seed(settings.seed)  # the same initial weights on every rank
    rng = np.random.default_rng(settings.seed if ctx.world == 1 else [settings.seed, ctx.rank])
    local_batch = ctx.share(settings.meta_batch)
    model, head = build_for(settings, tasks)
    model.to(device)
    learner = make_learner(settings.algorithm, model, tasks.kind, settings.inner_steps,
                           settings.inner_lr, head)
    net = {n: p.detach().clone() for n, p in model.named_parameters()}
    params = {**net, **learner.extra_params(net)}
    if init is not None:
        missing, unexpected = sorted(set(params) - set(init)), sorted(set(init) - set(params))
        if missing or unexpected:
            raise SettingsError(f"init: the weights do not fit the model (missing {missing}, "
                                f"unexpected {unexpected})")
        for n, value in init.items():
            if tuple(value.shape) != tuple(params[n].shape):
                raise SettingsError(f"init: {n} has shape {tuple(value.shape)}, the model "
                                    f"{tuple(params[n].shape)}")
            params[n] = value.detach().clone().to(device=device, dtype=params[n].dtype)
    for p in params.values():
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(params.values(), lr=settings.outer_lr)
    best = {n: p.detach().clone() for n, p in params.items()}
    # A warm start that replays its parent's tasks validates the two families apart: the best
    # weights are those best on the new tasks among the ones within max_forgetting of the
    # parent on its own (iteration 0, the parent, always qualifies).
    families = replayed_families(tasks) if init is not None else None

    def scores() -> dict[str, float]:
        if families is None:
            return {"val_loss": meta_validate(learner, params, tasks, settings.val_tasks,
                                              settings.seed + 1, device)}
        new, old = (meta_validate(learner, params, f, settings.val_tasks, settings.seed + 1,
                                  device) for f in families[:2])
        return {"val_loss": new, "val_replayed": old}

    first = scores() if ctx.writer or families else {"val_loss": math.inf}

    def outer_loss() -> torch.Tensor:
        # Each family's loss relative to the parent's on it, weighted by its share of the
        # meta-batch: a family whose tasks have 10x the loss (larger amplitudes, say) would
        # otherwise own the gradient, and "replay half" would replay almost nothing.
        new, old, ratio = families
        n_old = int(round(local_batch * ratio))
        total = torch.zeros((), device=device)
        for family, n, share, scale in ((new, local_batch - n_old, 1 - ratio, first["val_loss"]),
                                        (old, n_old, ratio, first["val_replayed"])):
            if n > 0:
                batch = family.sample(n, rng).to(device)
                total = total + share * learner.outer_loss(params, batch) / max(scale, 1e-8)
        return total

    best_val = first["val_loss"]
    replayed_limit = first.get("val_replayed", math.inf) * (1 + settings.max_forgetting)
    best_it = 0
    history: list[dict[str, float]] = [{"iteration": 0, **first}]
    start = last_val = time.perf_counter()
    interval = settings.validation_interval()
    interrupted = False
    lost: PeerLost | None = None
    it, validated, loss = 0, 0, None

    def validate() -> float:
        nonlocal best_val, best_it, best, validated, last_val
        figures = scores()
        val = figures["val_loss"]
        history.append({"iteration": it, "meta_loss": loss.item(), **figures})
        if val < best_val and figures.get("val_replayed", 0.0) <= replayed_limit:
            best_val, best_it = val, it
            best = {n: p.detach().clone() for n, p in params.items()}
        validated, last_val = it, time.perf_counter()
        return val

    def nonfinite(value: torch.Tensor) -> FloatingPointError:
        return FloatingPointError(
            f"meta-loss became {float(value)} at iteration {it + 1}; lower outer_lr "
            f"({settings.outer_lr}) or inner_lr ({settings.inner_lr})")

    stop_asked = False
    try:
        while True:
            stop = stop_asked or it >= settings.iterations or bool(
                settings.time_budget and time.perf_counter() - start > settings.time_budget)
            if stop and ctx.world == 1:
                break
            batch = tasks.sample(local_batch, rng).to(device) if families is None else None
            try:
                loss = learner.outer_loss(params, batch) if batch is not None else outer_loss()
                optimizer.zero_grad()
                if torch.isfinite(loss):
                    loss.backward()
            except KeyboardInterrupt:
                if ctx.world == 1:
                    raise
                stop_asked = stop = True  # tell the other ranks through the next all-reduce
            if ctx.world > 1:
                any_stop, any_bad = ctx.reduce(params.values(), local_batch / settings.meta_batch,
                                               stop, not torch.isfinite(loss))
                if any_bad:
                    raise nonfinite(loss)
                if any_stop:
                    interrupted = stop_asked
                    break
            elif not torch.isfinite(loss):
                raise nonfinite(loss)
            optimizer.step()
            it += 1
            val = None
            if ctx.writer and (it % settings.val_every == 0 or it == settings.iterations
                               or time.perf_counter() - last_val >= interval):
                val = validate()
            if progress and ctx.writer:
                progress(it, loss.item(), val)
    except KeyboardInterrupt:
        interrupted = True
    except PeerLost as exc:
        lost, interrupted = exc, True
    # A second interruption (torchrun's SIGTERM right after a peer's death was noticed) must not
    # lose what was learned: nothing below lets one escape.
    with contextlib.suppress(KeyboardInterrupt):
        if lost is not None:
            warnings.warn(f"{lost}; keeping the best weights so far", stacklevel=2)
        if ctx.writer and it > validated and loss is not None and torch.isfinite(loss):
            # Always judge the last weights too: a budget or Ctrl-C between validations must not
            # throw away everything learned since the last one.
            val = validate()
            if progress:
                progress(it, loss.item(), val)
    chance = None
    if ctx.writer:
        with contextlib.suppress(KeyboardInterrupt):
            chance = chance_check(learner, best, tasks, max(settings.val_tasks, 200),
                                  settings.seed + 1, device)
    result = None
    while result is None:  # nor here: the caller ignores SIGTERM once it has the result
        with contextlib.suppress(KeyboardInterrupt):
            result = TrainResult({n: p.cpu() for n, p in best.items()}, best_val, best_it, it,
                                 time.perf_counter() - start, interrupted, history, model.cpu(),
                                 tasks, head, settings, chance)
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
