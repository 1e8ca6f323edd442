"""MAML and its family as small objects over the shared functional inner loop.

Each learner turns a batch of episodes into an outer loss whose gradient is the algorithm's
meta-gradient, so one outer optimizer drives all of them. Reptile's update ``theta - phi`` is
expressed as the gradient of ``0.5 * ||theta - stopgrad(phi)||^2`` for the same reason.

>>> learner = make_learner("maml", None, "regression", inner_steps=1, inner_lr=0.01, head=[])
>>> (learner.name, learner.first_order)
('maml', False)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn
from torch.func import functional_call

from edgemeta.bundle_format import LR_PREFIX
from edgemeta.meta.inner import Params, adapt_batch, batch_loss
from edgemeta.meta.tasks import TaskBatch

ALGORITHMS = ("maml", "fomaml", "reptile", "metasgd", "anil", "protonet")


class MetaLearner:
    """MAML (second order): adapt every parameter, backpropagate through the inner loop."""

    name = "maml"
    first_order = False
    #: Adaptation is one closed-form computation (no gradient steps to count or budget).
    closed_form = False
    #: Only the head adapts on a device (the bundle says so; the rest is shared by all tasks).
    head_only = False

    def __init__(self, model: nn.Module, kind: str, inner_steps: int, inner_lr: float,
                 head: Sequence[str]):
        self.model = model
        self.kind = kind
        self.inner_steps = inner_steps
        self.inner_lr = inner_lr
        self.head = list(head)

    def adapt_names(self, params: Mapping[str, torch.Tensor]) -> list[str]:
        return [n for n in params if not n.startswith(LR_PREFIX)]

    def extra_params(self, params: Mapping[str, torch.Tensor]) -> Params:
        """Meta-learned tensors besides the network (Meta-SGD's step sizes)."""
        return {}

    def learning_rate(self, params: Mapping[str, torch.Tensor]):
        return self.inner_lr

    def network(self, params: Mapping[str, torch.Tensor]) -> Params:
        return {n: p for n, p in params.items() if not n.startswith(LR_PREFIX)}

    def adapt(self, params: Mapping[str, torch.Tensor], batch: TaskBatch,
              steps: int | None = None, first_order: bool | None = None) -> Params:
        first_order = self.first_order if first_order is None else first_order
        return adapt_batch(self.model, self.kind, self.network(params), batch.support_x,
                           batch.support_y, self.inner_steps if steps is None else steps,
                           self.learning_rate(params), self.adapt_names(params), first_order)

    def outer_loss(self, params: Mapping[str, torch.Tensor], batch: TaskBatch) -> torch.Tensor:
        fast = self.adapt(params, batch)
        return batch_loss(self.model, self.kind, fast, batch.query_x, batch.query_y).mean()


class FirstOrderMAML(MetaLearner):
    """First-order MAML: the query gradient at the adapted weights, no second derivatives."""

    name = "fomaml"
    first_order = True


class Reptile(MetaLearner):
    """Reptile: move the initialization towards the weights adapted on support and query."""

    name = "reptile"
    first_order = True

    def outer_loss(self, params: Mapping[str, torch.Tensor], batch: TaskBatch) -> torch.Tensor:
        x = torch.cat([batch.support_x, batch.query_x], dim=1)
        y = torch.cat([batch.support_y, batch.query_y], dim=1)
        fast = adapt_batch(self.model, self.kind, {n: p.detach() for n, p in params.items()},
                           x, y, self.inner_steps, self.inner_lr, None, True)
        return sum(0.5 * ((params[n] - fast[n].mean(0)) ** 2).sum() for n in params)


class MetaSGD(MetaLearner):
    """Meta-SGD: a learned step size for every parameter element, trained with the init."""

    name = "metasgd"

    def extra_params(self, params: Mapping[str, torch.Tensor]) -> Params:
        return {LR_PREFIX + n: torch.full_like(p, self.inner_lr) for n, p in params.items()
                if not n.startswith(LR_PREFIX)}

    def learning_rate(self, params: Mapping[str, torch.Tensor]):
        return {n[len(LR_PREFIX):]: p for n, p in params.items() if n.startswith(LR_PREFIX)}


class ANIL(MetaLearner):
    """ANIL: only the head adapts in the inner loop; the body is shared by all tasks."""

    name = "anil"
    head_only = True

    def adapt_names(self, params: Mapping[str, torch.Tensor]) -> list[str]:
        return list(self.head)


class ProtoNet(MetaLearner):
    """Prototypical networks; adapting writes the prototypes into the linear head.

    logits = 2 c_k . z - ||c_k||^2 equals -||z - c_k||^2 up to a per-row constant, so the head
    ``W = 2 C, b = -||C||^2`` classifies exactly like the prototypes and exports like any head.
    """

    name = "protonet"
    first_order = True
    closed_form = True
    head_only = True

    def embed(self, params: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        head_module = self.model.get_submodule(self.head[0].rsplit(".", 1)[0])
        captured: list[torch.Tensor] = []
        hook = head_module.register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
        try:
            functional_call(self.model, dict(self.network(params)), (x,))
        finally:
            hook.remove()
        return captured[0]

    def prototypes(self, params: Mapping[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor,
                   n_way: int) -> torch.Tensor:
        z = self.embed(params, x)  # [B, K, D]
        onehot = nn.functional.one_hot(y, n_way).to(z.dtype)  # [B, K, N]
        return onehot.transpose(1, 2) @ z / onehot.sum(1)[..., None].clamp_min(1)

    def n_way(self, params: Mapping[str, torch.Tensor]) -> int:
        weight = next(n for n in self.head if n.endswith("weight"))
        return int(params[weight].shape[0])

    def head_from_prototypes(self, params: Mapping[str, torch.Tensor],
                             protos: torch.Tensor) -> Params:
        weight = next(n for n in self.head if n.endswith("weight"))
        bias = next((n for n in self.head if n.endswith("bias")), None)
        batch = protos.shape[0]
        fast = {n: p.expand(batch, *p.shape) for n, p in self.network(params).items()}
        fast[weight] = 2 * protos
        if bias is not None:
            fast[bias] = -(protos ** 2).sum(-1)
        return fast

    def adapt(self, params: Mapping[str, torch.Tensor], batch: TaskBatch,
              steps: int | None = None, first_order: bool | None = None) -> Params:
        protos = self.prototypes(params, batch.support_x, batch.support_y, self.n_way(params))
        return self.head_from_prototypes(params, protos)


_CLASSES = {c.name: c for c in (MetaLearner, FirstOrderMAML, Reptile, MetaSGD, ANIL, ProtoNet)}


def learner_class(name: str) -> type[MetaLearner]:
    """The learner behind an algorithm's name: what callers ask instead of testing the name."""
    if name not in _CLASSES:
        raise ValueError(f"unknown algorithm {name!r}; choose one of {', '.join(ALGORITHMS)}")
    return _CLASSES[name]


def make_learner(name: str, model: nn.Module, kind: str, inner_steps: int, inner_lr: float,
                 head: Sequence[str]) -> MetaLearner:
    cls = learner_class(name)
    if cls.closed_form and kind != "classification":
        raise ValueError(f"algorithm {name!r} needs a classification task distribution")
    return cls(model, kind, inner_steps, inner_lr, head)
