"""Piecewise-stationary streams for ``edgemeta bench stream``: the task switches at random times.

>>> s = switching_stream("sinusoid", n=500, seed=1)
>>> len(s.x) == len(s.y) == len(s.task) == 500
True
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

FAMILIES = ("sinusoid", "hyperplane", "sinusoid-recurring", "hyperplane-recurring")
DEFAULT_NOISE = {"sinusoid": 0.1, "hyperplane": 0.05}


@dataclass
class SwitchingStream:
    """Rows, labels, the task of each row and the rows where a new task begins."""

    family: str
    kind: str
    x: np.ndarray
    y: np.ndarray
    task: np.ndarray
    switches: list[int]


def family_tasks(family: str):
    from edgemeta.meta.tasks import HyperplaneTasks, SinusoidTasks

    if family == "sinusoid":
        return SinusoidTasks(shots=10, queries=10)
    if family == "hyperplane":
        return HyperplaneTasks(shots=10, queries=20)
    raise ValueError(f"unknown family {family!r}; use {', '.join(FAMILIES)}")


def switch_points(n: int, hazard: float, min_segment: int, rng: np.random.Generator) -> list[int]:
    """The rows where a new task begins: geometric waits of at least ``min_segment`` rows."""
    switches: list[int] = []
    t = 0
    while True:
        t += max(min_segment, int(rng.geometric(hazard)))
        if t >= n:
            return switches
        switches.append(t)


def switching_stream(family: str, n: int = 20_000, hazard: float = 1 / 300,
                     noise: float | None = None, seed: int = 0,
                     min_segment: int = 30, tasks=None) -> SwitchingStream:
    """Draw a stream whose task switches after geometric waits (at least ``min_segment`` rows).

    ``noise`` is the standard deviation of Gaussian label noise (regression) or the probability of
    a flipped label (classification).

    >>> s = switching_stream("sinusoid", n=2000, hazard=1 / 300, seed=0)
    >>> len(s.y), len(s.switches) > 0, s.switches == sorted(s.switches)
    (2000, True, True)

    ``tasks`` replaces the family's distribution (e.g. a shifted sinusoid family, ``bench fleet``).
    """
    tasks = tasks if tasks is not None else family_tasks(family)
    noise = DEFAULT_NOISE[family] if noise is None else noise
    rng = np.random.default_rng(seed)
    switches = switch_points(n, hazard, min_segment, rng)
    params = tasks.sample_functions(len(switches) + 1, rng)
    task = np.searchsorted(np.asarray(switches, dtype=np.int64), np.arange(n), side="right")
    if family == "sinusoid":
        x = rng.uniform(*tasks.x_range, size=(n, 1))
    else:
        x = rng.uniform(-1.0, 1.0, size=(n, tasks.in_features))
    y = np.asarray(tasks.evaluate(params[task], x[:, None, :])).reshape(n)
    if tasks.kind == "regression":
        y = y + rng.normal(0.0, noise, n)
    else:
        flip = rng.random(n) < noise
        y = np.where(flip, 1 - y, y).astype(np.int64)
    return SwitchingStream(family, tasks.kind, x.astype(np.float32), y, task, switches)


def recurring_stream(family: str, n: int = 6000, concepts: int = 3, segment: int = 500,
                     noise: float | None = None, seed: int = 0) -> SwitchingStream:
    """A stream that cycles through a few concepts (A, B, C, A, B, C, ...), ``segment`` rows each:
    what concept memory is for. ``task`` numbers the segments; the concept of segment i is
    ``i % concepts``.

    >>> s = recurring_stream("sinusoid", n=1200, concepts=2, segment=300, seed=0)
    >>> s.switches, (s.task % 2).tolist()[::300]
    ([300, 600, 900], [0, 1, 0, 1])
    """
    tasks = family_tasks(family)
    noise = DEFAULT_NOISE[family] if noise is None else noise
    rng = np.random.default_rng(seed)
    params = tasks.sample_functions(concepts, rng)
    switches = list(range(segment, n, segment))
    task = np.arange(n) // segment
    if family == "sinusoid":
        x = rng.uniform(*tasks.x_range, size=(n, 1))
    else:
        x = rng.uniform(-1.0, 1.0, size=(n, tasks.in_features))
    y = np.asarray(tasks.evaluate(params[task % concepts], x[:, None, :])).reshape(n)
    if tasks.kind == "regression":
        y = y + rng.normal(0.0, noise, n)
    else:
        y = np.where(rng.random(n) < noise, 1 - y, y).astype(np.int64)
    return SwitchingStream(family, tasks.kind, x.astype(np.float32), y, task, switches)


def sample_loss(kind: str, prediction, y) -> np.ndarray:
    p, t = np.asarray(prediction, dtype=np.float64), np.asarray(y, dtype=np.float64)
    return (p - t) ** 2 if kind == "regression" else (p != t).astype(np.float64)


@dataclass
class Run:
    """One learner on one stream: per-sample loss and what it did."""

    name: str
    loss: np.ndarray
    seconds: float
    info: dict[str, Any] = field(default_factory=dict)
