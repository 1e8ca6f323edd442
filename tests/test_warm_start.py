"""`train --init`: continue a bundle on new (harvested) tasks with replay; eval compares bundles."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from edgemeta.meta.algorithms import make_learner
from edgemeta.meta.bundle import read_bundle
from edgemeta.meta.models import head_names
from edgemeta.meta.tasks import MixedTasks, SinusoidTasks, TaskFolderTasks, replayed_families
from edgemeta.meta.train import TrainSettings, meta_validate, train
from edgemeta.meta.warmstart import initial_params, warm_start_tasks

from .conftest import run_edgemeta
from .test_fleet_harvest import _journal_episodes


@pytest.fixture(scope="module")
def harvested(tmp_path_factory, sinusoid_bundle):
    """Tasks a fleet met: 20 sinusoid episodes, harvested by the CLI into a task folder."""
    root = tmp_path_factory.mktemp("fleet")
    state = _journal_episodes(root / "device", 20, seed=3)
    out = root / "tasks"
    done = run_edgemeta("tasks", "harvest", str(state), "--out", str(out), "--bundle",
                        str(sinusoid_bundle.path))
    assert done.returncode == 0, done.stderr
    return out


def test_iteration_zero_of_a_warm_start_is_the_parent_bundle(sinusoid_bundle, harvested):
    parent = read_bundle(sinusoid_bundle.path)
    tasks = warm_start_tasks(parent, {"name": "folder", "path": str(harvested), "shots": 5,
                                      "queries": 10}, replay_ratio=0.5)
    meta = parent.meta
    settings = TrainSettings(algorithm=meta["algorithm"], model=dict(meta["model"]),
                             inner_steps=meta["inner"]["steps"], inner_lr=meta["inner"]["lr"],
                             iterations=1, val_tasks=50, seed=0, device="cpu")
    result = train(settings, tasks, init=initial_params(parent))
    # The parent's own weights, judged by the same validation: what the run starts from.
    model = parent.build_model()
    learner = make_learner(meta["algorithm"], model, "regression", meta["inner"]["steps"],
                           meta["inner"]["lr"], head_names(model, meta["model"]))
    new, old = (meta_validate(learner, initial_params(parent), family, 50, settings.seed + 1, "cpu")
                for family in replayed_families(tasks)[:2])
    assert result.history[0] == {"iteration": 0, "val_loss": pytest.approx(new, rel=1e-6),
                                 "val_replayed": pytest.approx(old, rel=1e-6)}
    if result.best_iteration == 0:
        for name, w in parent.weights.items():
            assert torch.equal(result.params[name], torch.from_numpy(w))


def test_replay_puts_the_parents_tasks_into_every_meta_batch(sinusoid_bundle, tmp_path):
    # New tasks whose inputs lie where the parent's sinusoids never go (x in 20..30).
    rng = np.random.default_rng(0)
    for i in range(6):
        x = rng.uniform(20, 30, (40, 1))
        np.savez(tmp_path / f"t{i}.npz", X=x, y=np.sin(x[:, 0]))
    new = TaskFolderTasks(tmp_path, shots=5, queries=10,
                          normalization={"mean": [0.0], "std": [1.0]})
    mixed = MixedTasks(new, SinusoidTasks(shots=5, queries=10), replay_ratio=0.4)
    batch = mixed.sample(25, np.random.default_rng(1))
    from_parent = (batch.support_x.abs().amax(dim=(1, 2)) <= 5).sum().item()
    assert batch.support_x.shape[0] == 25 and from_parent == 10


def test_train_init_writes_a_child_bundle_in_the_parents_scale_and_eval_compares_both(
        sinusoid_bundle, harvested, tmp_path):
    child = tmp_path / "child"
    done = run_edgemeta("train", "--tasks", "folder", "--data", str(harvested), "--init",
                str(sinusoid_bundle.path), "--replay", "0.5", "--iterations", "300",
                "--val-every", "50", "--outer-lr", "0.0005", "--out", str(child), "--quiet",
                "--device", "cpu", "--allow-untrained")
    assert done.returncode == 0, done.stderr
    assert "continuing from" in done.stderr
    parent_meta = json.loads((sinusoid_bundle.path / "bundle.json").read_text())
    meta = json.loads((child / "bundle.json").read_text())
    lineage = meta["lineage"]
    assert lineage["parent"]["weights_sha256"] == parent_meta["sha256"]["weights.safetensors"]
    assert lineage["replay_ratio"] == 0.5 and lineage["harvest"]["tasks"] == 20
    assert meta["output"]["scaling"] == parent_meta["output"]["scaling"]
    assert meta["model"] == parent_meta["model"] and meta["algorithm"] == parent_meta["algorithm"]
    assert meta["task"]["distribution"]["name"] == "mixed"
    both = run_edgemeta("eval", str(sinusoid_bundle.path), str(child), "--tasks-folder", str(harvested),
                "--test-fraction", "1", "--tasks", "50", "--seeds", "2", "--steps", "0,1",
                "--no-baselines", "--json")
    assert both.returncode == 0, both.stderr
    report = json.loads(both.stdout)
    results = report["bundles"]
    assert [r["bundle"] for r in results] == [str(sinusoid_bundle.path), str(child)]
    assert all(r["tasks_folder"] == str(harvested) and r["tasks"] == 100 for r in results)
    # The child against the parent, paired by evaluation seed, with a verdict per step count.
    assert [(c["bundle"], c["steps"]) for c in report["comparison"]] == [(str(child), 0),
                                                                         (str(child), 1)]
    assert all(c["verdict"] in ("better", "worse", "no significant difference")
               for c in report["comparison"])
    table = run_edgemeta("eval", str(sinusoid_bundle.path), str(child), "--tasks-folder",
                         str(harvested), "--test-fraction", "1", "--tasks", "50", "--seeds", "2",
                         "--steps", "1", "--no-baselines")
    assert table.returncode == 0, table.stderr
    assert f"{child}: maml bundle" in table.stdout and f"against {sinusoid_bundle.path}" in table.stdout
    assert f"evaluating {child} (2 of 2)" in table.stderr
    assert read_bundle(child)  # checksums of the child verify


def test_a_warm_start_that_cannot_fit_is_refused_with_the_reason(sinusoid_bundle, harvested, tmp_path):
    bad_ratio = run_edgemeta("train", "--tasks", "folder", "--data", str(harvested), "--init",
                     str(sinusoid_bundle.path), "--replay", "1.5", "--out", str(tmp_path / "x"))
    assert bad_ratio.returncode == 2 and "--replay: must be in [0, 1)" in bad_ratio.stderr
    wide = tmp_path / "wide"
    wide.mkdir()
    for i in range(4):
        np.savez(wide / f"t{i}.npz", X=np.random.default_rng(i).normal(size=(30, 3)), y=np.ones(30))
    done = run_edgemeta("train", "--tasks", "folder", "--data", str(wide), "--init",
                str(sinusoid_bundle.path), "--out", str(tmp_path / "y"))
    assert done.returncode == 2 and "in_features=3, the bundle 1" in done.stderr
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def _shifted_warm_start(parent_path, replay: float, **settings):
    """Re-meta-train the parent on a shifted family (amplitudes 5-10, any phase: about 15x the
    parent family's loss) with ``replay`` of its own tasks."""
    parent = read_bundle(parent_path)
    meta = parent.meta
    tasks = MixedTasks(SinusoidTasks(amplitude=(5.0, 10.0), phase=(0.0, 6.28)),
                       SinusoidTasks(), replay_ratio=replay)
    settings = TrainSettings(algorithm=meta["algorithm"], model=dict(meta["model"]),
                             inner_steps=meta["inner"]["steps"], inner_lr=meta["inner"]["lr"],
                             val_every=20, val_tasks=100, seed=0, device="cpu", **settings)
    return train(settings, tasks, init=initial_params(parent))


def test_a_warm_start_keeps_only_weights_that_do_not_forget_the_parents_tasks(sinusoid_bundle):
    """With little replay the shared initialization drifts away from the parent's family; the
    weights kept are the best on the new family among those within max_forgetting of the parent
    on its own tasks (the two validated apart), never the new family bought with the old."""
    result = _shifted_warm_start(sinusoid_bundle.path, replay=0.1, outer_lr=0.003,
                                 iterations=200, max_forgetting=0.02)
    limit = result.history[0]["val_replayed"] * 1.02
    kept = next(h for h in result.history if h["iteration"] == result.best_iteration)
    assert kept["val_replayed"] <= limit
    assert any(h["val_replayed"] > limit for h in result.history), \
        "some weights forgot the parent's family (the guard had something to refuse)"
    allowed = [h["val_loss"] for h in result.history if h["val_replayed"] <= limit]
    assert kept["val_loss"] == min(allowed)


def test_replay_is_a_share_of_the_objective_whatever_each_familys_loss_scale(sinusoid_bundle):
    """Half the meta-batch replayed must be half the objective: the shifted family's losses are
    about 15x the parent's, and summed as they are they own the gradient (before this change,
    this run left the parent family 10% worse: 1.55 -> 1.70). Weighted each by its share and
    relative to the parent's own level, both families improve together."""
    result = _shifted_warm_start(sinusoid_bundle.path, replay=0.5, outer_lr=0.001,
                                 iterations=300, max_forgetting=1.0)
    first, last = result.history[0], result.history[-1]
    assert last["val_loss"] < 0.9 * first["val_loss"], (first, last)
    assert last["val_replayed"] <= 1.05 * first["val_replayed"], (first, last)
