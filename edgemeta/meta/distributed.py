"""Data-parallel meta-training under ``torchrun``: split the meta-batch, all-reduce the gradient.

Why an explicit all-reduce and not DDP: the meta-learners are functional (a dict of tensors goes
through ``torch.func``), so there is no module whose backward DDP could hook. Each rank computes
the mean meta-loss over its share of the meta-batch; weighting its gradient by its share and
summing over ranks gives exactly the gradient of the mean over the whole meta-batch, so N
processes take the same optimizer steps that one process would take on the same tasks.

A control word rides with every gradient all-reduce: whether any rank wants to stop (its time
budget, Ctrl-C, a non-finite loss). All ranks therefore stop at the same iteration and never wait
in a collective that a peer will not join. A peer that dies makes the next collective fail after
``EDGEMETA_DIST_TIMEOUT`` seconds (default 60); rank 0 then keeps the best weights so far.

Outside torchrun (no ``WORLD_SIZE`` > 1 in the environment) :func:`context` is a single process
and nothing here touches ``torch.distributed``.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterable
from dataclasses import dataclass

import torch

STOP, NONFINITE = 0, 1


class PeerLost(RuntimeError):
    """A collective failed: another rank died or was stopped."""


@dataclass(frozen=True)
class Context:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def writer(self) -> bool:
        """Only rank 0 validates, writes the bundle and prints progress."""
        return self.rank == 0

    def share(self, meta_batch: int) -> int:
        """This rank's tasks of a meta-batch (the first ``meta_batch % world`` ranks take one more)."""
        return meta_batch // self.world + (1 if self.rank < meta_batch % self.world else 0)

    def reduce(self, params: Iterable[torch.Tensor], weight: float, stop: bool,
               nonfinite: bool) -> tuple[bool, bool]:
        """Sum ``weight * grad`` over ranks in place; returns (any rank stops, any non-finite)."""
        params = list(params)
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) * weight for g in grads])
        device = flat.device
        control = torch.tensor([float(stop), float(nonfinite)], dtype=flat.dtype, device=device)
        buffer = torch.cat([flat, control])
        if not torch.isfinite(buffer).all():  # a NaN would poison every rank's weights
            buffer = torch.cat([torch.zeros_like(flat), control.new_tensor([1.0, 1.0])])
        try:
            torch.distributed.all_reduce(buffer)
        except (RuntimeError, ValueError) as exc:  # gloo/nccl report a lost peer as RuntimeError
            raise PeerLost(f"rank {self.rank}: a collective failed ({exc}); another rank stopped "
                           "or died") from exc
        offset = 0
        for p, g in zip(params, grads, strict=True):
            n = g.numel()
            p.grad = buffer[offset:offset + n].view_as(g).clone()
            offset += n
        return bool(buffer[-2] > 0), bool(buffer[-1] > 0)


def context(device: str = "auto") -> Context:
    """The process group torchrun describes in the environment (joined once), or one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Context()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    dist = torch.distributed
    if not dist.is_initialized():
        cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
        if cuda:
            torch.cuda.set_device(local_rank)
        timeout = datetime.timedelta(seconds=float(os.environ.get("EDGEMETA_DIST_TIMEOUT", "60")))
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timeout)
    return Context(rank, world, local_rank)


def device_for(ctx: Context, device: str) -> str:
    """Each rank on its own GPU (``cuda:LOCAL_RANK``) when CUDA is asked for or automatic."""
    if ctx.world > 1 and (device == "cuda" or (device == "auto" and torch.cuda.is_available())):
        return f"cuda:{ctx.local_rank}"
    return device


def finish(ctx: Context) -> None:
    """Leave the group together: a rank that tears gloo down while a peer is still in it can
    abort at exit ("terminate called without an active exception")."""
    if ctx.world > 1 and torch.distributed.is_initialized():
        with contextlib.suppress(RuntimeError, ValueError):  # a peer is gone already
            torch.distributed.barrier()
        with contextlib.suppress(RuntimeError, ValueError):
            torch.distributed.destroy_process_group()
