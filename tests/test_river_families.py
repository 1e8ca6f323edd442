"""`bench stream`'s families built on river's generators: each stream's regimes are river's
concepts, and the bundle is meta-trained on a related family read from a task folder."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgemeta.bench.river_families import (
    RIVER_FAMILIES,
    SEA_THRESHOLDS,
    river_stream,
    write_related_tasks,
)
from edgemeta.meta.tasks import TaskFolderTasks
from tests.conftest import run_edgemeta


def _regimes(stream):
    bounds = [0, *stream.switches, len(stream.y)]
    return [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def test_every_family_switches_at_the_hazard_rate_and_is_seeded():
    for family in RIVER_FAMILIES:
        a = river_stream(family, n=3000, hazard=1 / 300, seed=2)
        b = river_stream(family, n=3000, hazard=1 / 300, seed=2)
        assert np.array_equal(a.x, b.x) and np.array_equal(a.y, b.y), family
        assert 3 <= len(a.switches) <= 20, (family, a.switches)
        assert a.x.dtype == np.float32 and len(a.x) == len(a.y) == 3000


def test_sea_regimes_are_river_sea_variants_that_change_at_every_switch():
    stream = river_stream("river-sea", n=4000, hazard=1 / 400, seed=1)
    variants = []
    for part in _regimes(stream):
        x, y = stream.x[part].astype(np.float64), stream.y[part]
        agreement = [np.mean((x[:, 0] + x[:, 1] > t) == y) for t in SEA_THRESHOLDS]
        assert max(agreement) >= 0.8  # river's SEA flips 10% of the labels
        variants.append(int(np.argmax(agreement)))
    assert all(a != b for a, b in zip(variants, variants[1:], strict=False))
    assert len(set(variants)) >= 3  # the four variants recur


def test_friedman_keeps_the_target_scale_and_only_permutes_the_features():
    stream = river_stream("river-friedman", n=3000, hazard=1 / 500, seed=0)
    assert 12 < stream.y.mean() < 17 and 3.5 < stream.y.std() < 6.5
    orders = []
    for r, part in enumerate(_regimes(stream)):
        # Regime r shows feature i of Friedman #1 in column roles[i] (seeded by its concept).
        roles = np.random.default_rng(1_000 * 0 + r).permutation(10)
        x = stream.x[part].astype(np.float64)[:, roles]
        f = (10 * np.sin(np.pi * x[:, 0] * x[:, 1]) + 20 * (x[:, 2] - 0.5) ** 2 + 10 * x[:, 3]
             + 5 * x[:, 4])
        assert abs(float(np.std(stream.y[part] - f)) - 1.0) < 0.25  # river's unit noise, nothing else
        orders.append(tuple(roles[:5]))
    assert len(set(orders)) == len(orders)  # every switch moves the relevant features


@pytest.mark.parametrize("family", RIVER_FAMILIES)
def test_the_related_tasks_form_a_folder_that_train_reads(tmp_path, family):
    folder = write_related_tasks(family, tmp_path / family, n_tasks=12, rows=120,
                                 min_per_class=20)
    stream = river_stream(family, n=400, seed=0)
    kind = stream.kind
    tasks = TaskFolderTasks(folder, kind=kind, shots=5, queries=10)
    assert len(list(folder.glob("task-*.npz"))) == 12
    assert tasks.in_features == stream.x.shape[1]
    batch = tasks.sample(4, np.random.default_rng(0))
    assert batch.support_x.shape[0] == 4


@pytest.mark.slow
def test_bench_stream_runs_a_river_family_end_to_end(tmp_path):
    out = tmp_path / "stream"
    proc = run_edgemeta("bench", "stream", "--families", "river-sea", "--quick", "--out",
                        str(out), timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((out / "stream.json").read_text())[0]
    assert result["family"] == "river-sea" and result["kind"] == "classification"
    table = result["cumulative"]
    for learner in ("edgemeta", "oracle", "meta-init", "periodic", "river ARF", "river HAT",
                    "river KNN (window 100)", "river linear"):
        assert 0.0 <= table[learner]["cumulative"] <= 1.0, learner
    # The stream is learnable and edgemeta serves it well under chance; its gate keeps it from
    # doing much worse than the never-adapted meta-initialization (SEA's concepts are close, and
    # on a loaded machine no adaptation may be accepted in 3,000 rows: equal is allowed).
    assert table["edgemeta"]["cumulative"] < 0.35
    assert table["edgemeta"]["cumulative"] <= 1.1 * table["meta-init"]["cumulative"]
    assert (out / "bundles" / "river-sea-tasks" / "task-00399.npz").is_file()
    assert "river-sea" in proc.stdout and "edgemeta / oracle" in proc.stdout
