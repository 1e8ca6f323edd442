"""Drifting streams from river's synthetic generators, and the related families a bundle for them
is meta-trained on (``edgemeta bench stream --families river-...``).

Why these: the project's own families (sinusoid, hyperplane) were designed beside the daemon. A
new user brings a stream nobody here tuned for, meta-trains on tasks they can collect that are
like it but not it, and drives the daemon with the README's settings. Each family below does the
same: the stream's regimes come from one of river's generators, the meta-training tasks from a
related family (other seeds, other noise, other coefficients, no drift inside a task), written to
a task folder and read back through ``--tasks folder`` as a user's would be.

- ``river-hyperplane``: river's ``Hyperplane`` (10 features, 5% label noise) with its weights
  drifting inside each regime (``mag_change``) and new weights at each switch. Meta-trained on
  noise-free, fixed hyperplanes of other seeds.
- ``river-rbf``: river's ``RandomRBFDrift`` (10 features, 2 classes, 20 centroids, 10 of them
  moving), new centroids at each switch. Meta-trained on static ``RandomRBF`` concepts with 15
  centroids.
- ``river-sea``: river's ``SEA`` (3 features, 10% label noise), switching between its four
  variants, so earlier concepts recur. Meta-trained on SEA-like thresholds drawn from [6, 11].
- ``river-friedman``: river's ``Friedman`` regression (targets around 14, spread about 5), the
  roles of the 10 features permuted at each switch (as river's ``FriedmanDrift`` does). Meta-trained
  on Friedman-like functions with random coefficients (+-50%) and random feature roles.

>>> s = river_stream("river-sea", n=600, hazard=1 / 200, seed=0)
>>> s.kind, s.x.shape, sorted(set(s.y.tolist()))
('classification', (600, 3), [0, 1])
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np

from edgemeta.testing.streams import SwitchingStream, switch_points

RIVER_FAMILIES = ("river-hyperplane", "river-rbf", "river-sea", "river-friedman")
KINDS = {"river-hyperplane": "classification", "river-rbf": "classification",
         "river-sea": "classification", "river-friedman": "regression"}
SEA_THRESHOLDS = (8.0, 9.0, 7.0, 9.5)  # river's SEA variants 0-3
FRIEDMAN = (10.0, 20.0, 10.0, 5.0)     # the coefficients of Friedman #1


def _take(generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    rows = list(itertools.islice(iter(generator), n))
    x = np.asarray([list(r[0].values()) for r in rows], dtype=np.float64)
    y = np.asarray([r[1] for r in rows], dtype=np.float64)
    return x.reshape(n, -1), y


def _regime(family: str, concept: int, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` rows of one regime of the stream: river's generator for that concept."""
    from river.datasets import synth

    if family == "river-hyperplane":
        return _take(synth.Hyperplane(seed=concept, n_features=10, n_drift_features=2,
                                      mag_change=0.001, noise_percentage=0.05, sigma=0.1), n)
    if family == "river-rbf":
        return _take(synth.RandomRBFDrift(seed_model=concept, seed_sample=seed, n_classes=2,
                                          n_features=10, n_centroids=20, change_speed=0.001,
                                          n_drift_centroids=10), n)
    if family == "river-sea":
        return _take(synth.SEA(variant=concept % 4, noise=0.1, seed=seed), n)
    x, y = _take(synth.Friedman(seed=seed), n)
    roles = np.random.default_rng(concept).permutation(10)
    shown = np.empty_like(x)
    shown[:, roles] = x  # feature i of the function is shown in column roles[i]
    return shown, y


def river_stream(family: str, n: int = 6000, hazard: float = 1 / 300, seed: int = 0,
                 min_segment: int = 30) -> SwitchingStream:
    """A stream of ``family`` whose concept switches after geometric waits."""
    if family not in RIVER_FAMILIES:
        raise ValueError(f"unknown river family {family!r}; use {', '.join(RIVER_FAMILIES)}")
    rng = np.random.default_rng(seed)
    switches = switch_points(n, hazard, min_segment, rng)
    bounds = [0, *switches, n]
    xs, ys, concepts = [], [], []
    for r, (lo, hi) in enumerate(itertools.pairwise(bounds)):
        if family == "river-sea":  # another of the four variants
            concept = int(rng.integers(4)) if r == 0 else (concepts[-1] + 1 + int(rng.integers(3))) % 4
        else:
            concept = 1_000 * seed + r
        concepts.append(concept)
        x, y = _regime(family, concept, hi - lo, seed=int(rng.integers(2**31)))
        xs.append(x)
        ys.append(y)
    task = np.searchsorted(np.asarray(switches, dtype=np.int64), np.arange(n), side="right")
    y = np.concatenate(ys)
    kind = KINDS[family]
    y = y.astype(np.int64) if kind == "classification" else y
    return SwitchingStream(family, kind, np.concatenate(xs).astype(np.float32), y, task, switches)


def _related_task(family: str, i: int, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Task ``i`` of the related family the bundle is meta-trained on."""
    from river.datasets import synth

    rng = np.random.default_rng([7, i])
    if family == "river-hyperplane":
        return _take(synth.Hyperplane(seed=10**6 + i, n_features=10, n_drift_features=0,
                                      noise_percentage=0.0), rows)
    if family == "river-rbf":
        return _take(synth.RandomRBF(seed_model=10**6 + i, seed_sample=i, n_classes=2,
                                     n_features=10, n_centroids=15), rows)
    if family == "river-sea":
        x = rng.uniform(0, 10, size=(rows, 3))
        return x, (x[:, 0] + x[:, 1] > rng.uniform(6.0, 11.0)).astype(np.float64)
    x = rng.uniform(0, 1, size=(rows, 10))
    a, b, c, d = np.asarray(FRIEDMAN) * rng.uniform(0.5, 1.5, 4)
    i0, i1, i2, i3, i4 = rng.permutation(10)[:5]
    y = (a * np.sin(np.pi * x[:, i0] * x[:, i1]) + b * (x[:, i2] - 0.5) ** 2 + c * x[:, i3]
         + d * x[:, i4] + rng.normal(0, 1.0, rows))
    return x, y


def write_related_tasks(family: str, folder: Path, n_tasks: int = 400, rows: int = 200,
                        min_per_class: int = 30) -> Path:
    """The meta-training folder for ``family``: one ``task-NNNNN.npz`` (``X``, ``y``) per
    task. A classification task with a class rarer than ``min_per_class`` rows is skipped (the
    folder reader needs shots + queries rows of each class)."""
    folder.mkdir(parents=True, exist_ok=True)
    written, i = 0, 0
    while written < n_tasks:
        x, y = _related_task(family, i, rows)
        i += 1
        if KINDS[family] == "classification":
            counts = np.unique(y, return_counts=True)[1]
            if len(counts) < 2 or counts.min() < min_per_class:
                continue
            y = y.astype(np.int64)
        np.savez(folder / f"task-{written:05d}.npz", X=x.astype(np.float32), y=y)
        written += 1
    return folder
