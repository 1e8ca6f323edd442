"""Did a bundle learn anything: judged by its loss, and for a classifier also by the class it serves."""

from __future__ import annotations

import torch

from edgemeta.meta.chance import chance_errors, chance_losses, versus_chance
from edgemeta.meta.tasks import TaskBatch


def _five_way_tasks(tasks: int = 200, seed: int = 0) -> TaskBatch:
    """Balanced 5-way tasks, 1 shot per class in the support, 15 query rows."""
    g = torch.Generator().manual_seed(seed)
    support_y = torch.arange(5).repeat(tasks, 1)
    query_y = torch.randint(0, 5, (tasks, 15), generator=g)
    return TaskBatch(torch.zeros(tasks, 5, 2), support_y, torch.zeros(tasks, 15, 2), query_y)


def _cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(logits.transpose(1, 2), y, reduction="none").mean(1)


def test_an_overconfident_classifier_that_serves_the_right_class_has_learned():
    # Right on ~80% of the query rows with a margin of 20 logits, wrong on the rest with the
    # same margin: its cross-entropy (~4) is far above chance (ln 5 = 1.61), its error rate
    # (~0.2) far below the most common class's (~0.8).
    batch = _five_way_tasks()
    g = torch.Generator().manual_seed(1)
    right = torch.rand(batch.query_y.shape, generator=g) < 0.8
    served = torch.where(right, batch.query_y, (batch.query_y + 1) % 5)
    logits = 20.0 * torch.nn.functional.one_hot(served, 5).double()
    losses = _cross_entropy(logits, batch.query_y)
    errors = (logits.argmax(-1) != batch.query_y).double().mean(1)
    check = versus_chance(losses, chance_losses("classification", batch, 5), errors,
                          chance_errors(batch, 5))
    assert check.loss > check.chance  # the loss alone would call it untrained
    assert check.error < 0.3 < 0.7 < check.chance_error
    assert check.learned
    assert "error rate" in check.describe()


def test_a_classifier_that_serves_noise_has_not_learned_by_either_test():
    batch = _five_way_tasks(seed=2)
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(*batch.query_y.shape, 5, generator=g, dtype=torch.float64)
    losses = _cross_entropy(logits, batch.query_y)
    errors = (logits.argmax(-1) != batch.query_y).double().mean(1)
    check = versus_chance(losses, chance_losses("classification", batch, 5), errors,
                          chance_errors(batch, 5))
    assert not check.learned


def test_the_most_common_class_is_the_support_majority():
    support_y = torch.tensor([[2, 2, 1], [0, 1, 1]])
    query_y = torch.tensor([[2, 2, 0, 1], [1, 1, 1, 1]])
    batch = TaskBatch(torch.zeros(2, 3, 1), support_y, torch.zeros(2, 4, 1), query_y)
    assert chance_errors(batch, 3).tolist() == [0.5, 0.0]
