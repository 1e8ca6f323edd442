"""The functional inner loop computes the true MAML meta-gradient, batched or not."""

from __future__ import annotations

import numpy as np
import torch

from edgemeta.meta.algorithms import make_learner
from edgemeta.meta.inner import adapt_batch, adapt_task, task_loss
from edgemeta.meta.models import MLP, head_names
from edgemeta.meta.tasks import SinusoidTasks


def _setup(dtype=torch.float32):
    torch.manual_seed(0)
    model = MLP(1, 1, [16, 16]).to(dtype)
    params = {n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters()}
    batch = SinusoidTasks().sample(6, np.random.default_rng(0))
    batch = type(batch)(*(t.to(dtype) for t in (batch.support_x, batch.support_y,
                                               batch.query_x, batch.query_y)))
    return model, params, batch


def _loop_loss(model, params, batch, steps=2, lr=0.05):
    total = 0
    for i in range(batch.support_x.shape[0]):
        fast = adapt_task(model, "regression", params, batch.support_x[i], batch.support_y[i], steps, lr)
        total = total + task_loss(model, "regression", fast, batch.query_x[i], batch.query_y[i])
    return total / batch.support_x.shape[0]


def test_vmapped_second_order_meta_gradient_equals_per_task_loop():
    model, params, batch = _setup()
    learner = make_learner("maml", model, "regression", 2, 0.05, head_names(model))
    g_vmap = torch.autograd.grad(learner.outer_loss(params, batch), list(params.values()))
    g_loop = torch.autograd.grad(_loop_loss(model, params, batch), list(params.values()))
    for a, b in zip(g_vmap, g_loop, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_second_order_meta_gradient_matches_finite_differences():
    model, params, batch = _setup(torch.float64)
    learner = make_learner("maml", model, "regression", 2, 0.05, head_names(model))
    grads = dict(zip(params, torch.autograd.grad(learner.outer_loss(params, batch),
                                                 list(params.values())), strict=True))
    rng = np.random.default_rng(1)
    eps = 1e-6
    for name in ("body.0.weight", "head.bias", "body.2.weight"):
        flat = params[name].detach().view(-1)
        for idx in rng.choice(flat.numel(), size=min(3, flat.numel()), replace=False):
            shifted = []
            for sign in (1, -1):
                p = {n: v.detach().clone() for n, v in params.items()}
                p[name].view(-1)[idx] += sign * eps
                shifted.append(float(learner.outer_loss(p, batch)))
            numeric = (shifted[0] - shifted[1]) / (2 * eps)
            assert abs(numeric - float(grads[name].view(-1)[idx])) < 1e-6 + 1e-4 * abs(numeric)


def test_first_order_gradient_differs_from_second_order():
    model, params, batch = _setup()
    second = make_learner("maml", model, "regression", 2, 0.05, head_names(model))
    first = make_learner("fomaml", model, "regression", 2, 0.05, head_names(model))
    g2 = torch.autograd.grad(second.outer_loss(params, batch), [params["body.0.weight"]])[0]
    g1 = torch.autograd.grad(first.outer_loss(params, batch), [params["body.0.weight"]])[0]
    assert not torch.allclose(g1, g2)


def test_anil_moves_only_the_head():
    model, params, batch = _setup()
    fast = adapt_batch(model, "regression", params, batch.support_x, batch.support_y, 3, 0.1,
                       adapt_names=head_names(model))
    for n, p in params.items():
        moved = not torch.allclose(fast[n][0], p)
        assert moved == n.startswith("head."), n
