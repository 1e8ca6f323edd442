"""Did a bundle learn anything? Its adapted query loss against the no-adaptation predictor's.

Why: a time budget on a busy machine can end meta-training after a few dozen iterations, and the
bundle then adapts no better than a predictor that ignores x. Its loss is a number like any
other (2.218 looks like progress until one knows chance is ln 10 = 2.303), so ``train`` and
``eval`` say it outright.

The no-adaptation predictor sees the same support set and ignores the inputs: regression predicts
the support labels' mean; classification predicts the support's class frequencies (one pseudo-count
per class, so uniform, ln C, on a balanced N-way task). Both are scored on the same query rows as
the bundle, per task. The bundle learned something when its mean loss is below chance by more
than twice the standard error of the paired per-task differences *and* by at least
``MIN_GAIN`` of chance: one inner step from random weights already beats chance measurably on
hundreds of tasks, and 2.218 against ln 10 = 2.303 is not a bundle worth shipping.

A classifier is also judged by what it serves, the most probable class: its query error rate
against the support's most common class's, by the same two tests. A bundle that classifies well
but is overconfident where it errs can have a cross-entropy above ln C; it did learn, and is
not flagged.

>>> check = versus_chance(torch.tensor([0.5, 0.6, 0.4]), torch.tensor([1.0, 1.1, 0.9]))
>>> check.learned, round(check.chance, 2)
(True, 1.0)
>>> versus_chance(torch.tensor([1.0, 0.9, 1.1]), torch.tensor([1.0, 1.0, 1.0])).learned
False
>>> overconfident = versus_chance(torch.tensor([2.0, 2.2, 1.9]), torch.tensor([1.6, 1.6, 1.6]),
...                               torch.tensor([0.1, 0.2, 0.1]), torch.tensor([0.8, 0.8, 0.7]))
>>> overconfident.learned, round(overconfident.error, 3)
(True, 0.133)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from edgemeta.meta.tasks import TaskBatch

MIN_GAIN = 0.1  # a bundle must cut the no-adaptation predictor's loss by at least this share


@dataclass(frozen=True)
class ChanceCheck:
    loss: float    # the bundle's mean query loss after adaptation
    chance: float  # the no-adaptation predictor's, on the same rows
    noise: float   # twice the standard error of the per-task difference
    tasks: int
    # Classification only: the query error rate against the support's most common class's.
    error: float | None = None
    chance_error: float | None = None
    error_noise: float | None = None

    @property
    def learned(self) -> bool:
        return (_beats(self.loss, self.chance, self.noise)
                or (self.error is not None
                    and _beats(self.error, self.chance_error, self.error_noise)))

    def describe(self) -> str:
        text = (f"loss {self.loss:.4g} against {self.chance:.4g} for the no-adaptation predictor "
                f"(the support's mean or class frequencies; noise +-{self.noise:.2g} over "
                f"{self.tasks} tasks; a bundle must be at least {MIN_GAIN:.0%} below it)")
        if self.error is not None:
            text += (f", error rate {self.error:.3g} against {self.chance_error:.3g} for the "
                     f"support's most common class (noise +-{self.error_noise:.2g})")
        return text

    def as_dict(self) -> dict:
        return {"loss": self.loss, "chance_loss": self.chance, "noise": self.noise,
                "error": self.error, "chance_error": self.chance_error,
                "error_noise": self.error_noise, "learned": self.learned}


def _beats(value: float, chance: float | None, noise: float | None) -> bool:
    if chance is None or noise is None or not math.isfinite(value):
        return False
    gain = chance - value
    return gain > noise and gain >= MIN_GAIN * chance


def chance_losses(kind: str, batch: TaskBatch, classes: int) -> torch.Tensor:
    """Per-task query loss of the predictor that ignores x (in the batch's units)."""
    if kind == "regression":
        sy = batch.support_y.reshape(len(batch.support_y), -1).double()
        qy = batch.query_y.reshape(len(batch.query_y), -1).double()
        return ((qy - sy.mean(1, keepdim=True)) ** 2).mean(1)
    sy, qy = batch.support_y.long(), batch.query_y.long()
    counts = torch.nn.functional.one_hot(sy, classes).sum(1).double() + 1.0
    p = counts / counts.sum(1, keepdim=True)
    return -torch.log(torch.gather(p, 1, qy)).mean(1)


def chance_errors(batch: TaskBatch, classes: int) -> torch.Tensor:
    """Per-task query error rate of always answering the support's most common class."""
    counts = torch.nn.functional.one_hot(batch.support_y.long(), classes).sum(1)
    majority = counts.argmax(1, keepdim=True)
    return (batch.query_y.long() != majority).double().mean(1)


def versus_chance(losses: torch.Tensor, chance: torch.Tensor, errors: torch.Tensor | None = None,
                  chance_errors: torch.Tensor | None = None) -> ChanceCheck:
    """The paired comparison of per-task ``losses`` with per-task ``chance`` (and, for a
    classifier, of per-task ``errors`` with ``chance_errors``)."""
    losses, chance = losses.detach().double().flatten(), chance.detach().double().flatten()
    keep = torch.isfinite(losses) & torch.isfinite(chance)
    n = int(keep.sum())
    if n == 0:
        return ChanceCheck(math.nan, math.nan, math.nan, 0)
    loss, base, noise = _paired(losses[keep], chance[keep])
    check = ChanceCheck(loss, base, noise, n)
    if errors is None or chance_errors is None:
        return check
    error, base_error, error_noise = _paired(errors.detach().double().flatten(),
                                             chance_errors.detach().double().flatten())
    return ChanceCheck(loss, base, noise, n, error, base_error, error_noise)


def judged_on(kind: str, batches: Sequence[TaskBatch], classes: int, losses: torch.Tensor,
              errors: torch.Tensor | None = None, loss_scale: float = 1.0) -> ChanceCheck:
    """The check for per-task ``losses`` (and, classifying, per-task ``errors``) measured on
    ``batches``: the no-adaptation predictor scored on the same rows, in the same units."""
    chance = torch.cat([chance_losses(kind, b, classes) for b in batches]) * loss_scale
    if kind != "classification" or errors is None:
        return versus_chance(losses, chance)
    return versus_chance(losses, chance, errors,
                         torch.cat([chance_errors(b, classes) for b in batches]))


def _paired(values: torch.Tensor, chance: torch.Tensor) -> tuple[float, float, float]:
    """Both means and twice the standard error of their per-task difference."""
    n = len(values)
    d = chance - values
    se = float(d.std(unbiased=True)) / math.sqrt(n) if n > 1 else math.inf
    return float(values.mean()), float(chance.mean()), 2 * se
