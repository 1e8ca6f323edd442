"""The functional inner loop, shared by meta-training, evaluation and the adapter worker.

Parameters are plain ``dict[str, Tensor]`` run through ``torch.func.functional_call``; gradients
come from ``torch.func.grad`` and a task batch is processed at once with ``vmap``. Keeping one loop
means the device adapts with exactly the update rule the initialization was trained for.

>>> import torch
>>> from edgemeta.meta.models import MLP
>>> torch.manual_seed(0) and None
>>> model = MLP(1, 1, [8])
>>> params = {n: p.detach() for n, p in model.named_parameters()}
>>> x, y = torch.linspace(-1, 1, 5)[:, None], torch.ones(5, 1)
>>> fast = adapt_task(model, "regression", params, x, y, steps=3, lr=0.1)
>>> bool(task_loss(model, "regression", fast, x, y) < task_loss(model, "regression", params, x, y))
True
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

Params = dict[str, torch.Tensor]
LearningRate = float | Mapping[str, torch.Tensor]


def output_loss(kind: str, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """MSE for regression, cross-entropy for classification (the loss the bundle is trained on)."""
    if kind == "regression":
        return torch.mean((out - y.reshape(out.shape)) ** 2)
    return nn.functional.cross_entropy(out, y)


def task_loss(model: nn.Module, kind: str, params: Mapping[str, torch.Tensor],
              x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return output_loss(kind, functional_call(model, dict(params), (x,)), y)


def adapt_task(model: nn.Module, kind: str, params: Mapping[str, torch.Tensor], x: torch.Tensor,
               y: torch.Tensor, steps: int, lr: LearningRate,
               adapt_names: Sequence[str] | None = None, first_order: bool = False) -> Params:
    """Run ``steps`` gradient steps on one task's support set; returns all parameters.

    ``lr`` is a scalar or, for Meta-SGD, a tensor per parameter. Only ``adapt_names`` move (ANIL
    passes the head). With ``first_order`` the inner gradients are cut from the outer graph.
    """
    fast = dict(params)
    names = list(adapt_names) if adapt_names is not None else list(fast)

    def loss_of(sub: Params) -> torch.Tensor:
        return task_loss(model, kind, {**fast, **sub}, x, y)

    for _ in range(steps):
        grads = grad(loss_of)({n: fast[n] for n in names})
        for n in names:
            g = grads[n].detach() if first_order else grads[n]
            step = lr[n] if isinstance(lr, Mapping) else lr
            fast[n] = fast[n] - step * g
    return fast


def adapt_batch(model: nn.Module, kind: str, params: Mapping[str, torch.Tensor],
                xs: torch.Tensor, ys: torch.Tensor, steps: int, lr: LearningRate,
                adapt_names: Sequence[str] | None = None, first_order: bool = False) -> Params:
    """``adapt_task`` over a task batch ``xs`` [B, K, ...] with ``vmap``; outputs stack on dim 0."""

    def one(x: torch.Tensor, y: torch.Tensor) -> Params:
        return adapt_task(model, kind, params, x, y, steps, lr, adapt_names, first_order)

    return vmap(one, randomness="error")(xs, ys)


def batch_loss(model: nn.Module, kind: str, fast: Mapping[str, torch.Tensor],
               xs: torch.Tensor, ys: torch.Tensor, batched_params: bool = True) -> torch.Tensor:
    """Per-task losses [B] of stacked (``batched_params``) or shared parameters."""
    dims = (0 if batched_params else None, 0, 0)
    return vmap(lambda p, x, y: task_loss(model, kind, p, x, y), in_dims=dims)(dict(fast), xs, ys)


def batch_predict(model: nn.Module, fast: Mapping[str, torch.Tensor], xs: torch.Tensor,
                  batched_params: bool = True) -> torch.Tensor:
    dims = (0 if batched_params else None, 0)
    return vmap(lambda p, x: functional_call(model, p, (x,)), in_dims=dims)(dict(fast), xs)
