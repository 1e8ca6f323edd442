"""Run under torchrun by tests/test_distributed.py: one meta-gradient, split over the ranks.

Every rank draws the same 25 tasks, keeps its share, and all-reduces as `train` does; rank 0
saves the reduced gradient of each algorithm to the .npz named on the command line.
"""

from __future__ import annotations

import sys

import numpy as np
import torch

from edgemeta.meta.algorithms import make_learner
from edgemeta.meta.distributed import Context, context, finish
from edgemeta.meta.models import build_model, head_names
from edgemeta.meta.tasks import SinusoidTasks

ALGORITHMS = ("maml", "metasgd", "reptile")
META_BATCH = 25


def meta_gradient(algorithm: str, ctx: Context) -> dict[str, np.ndarray]:
    torch.manual_seed(0)
    spec = {"arch": "mlp", "in_features": 1, "out_features": 1, "hidden": [40, 40]}
    model = build_model(spec)
    learner = make_learner(algorithm, model, "regression", 1, 0.01, head_names(model, spec))
    net = {n: p.detach().clone() for n, p in model.named_parameters()}
    params = {**net, **learner.extra_params(net)}
    for p in params.values():
        p.requires_grad_(True)
    batch = SinusoidTasks().sample(META_BATCH, np.random.default_rng(0))
    start = sum(Context(r, ctx.world).share(META_BATCH) for r in range(ctx.rank))
    n = ctx.share(META_BATCH)
    part = type(batch)(*(t[start:start + n] for t in (batch.support_x, batch.support_y,
                                                        batch.query_x, batch.query_y)))
    learner.outer_loss(params, part).backward()
    if ctx.world > 1:
        ctx.reduce(params.values(), n / META_BATCH, stop=False, nonfinite=False)
    return {f"{algorithm}/{k}": p.grad.numpy() for k, p in params.items()}


if __name__ == "__main__":
    ctx = context("cpu")
    grads = {}
    for algorithm in ALGORITHMS:
        grads.update(meta_gradient(algorithm, ctx))
    if ctx.writer:
        np.savez(sys.argv[1], **grads)
    finish(ctx)
