"""`edgemeta eval` reports figures that do not hinge on one lucky task draw or one exploding task."""

from __future__ import annotations

import copy
import dataclasses
import subprocess
import sys

from edgemeta.meta.evaluate import evaluate, format_table


def test_eval_pools_several_evaluation_seeds_and_shows_their_spread(sinusoid_bundle):
    res = evaluate(sinusoid_bundle, steps=(1,), n_tasks=100, seeds=4, baselines=False)
    row = res["methods"]["maml"][0]["loss"]
    assert res["tasks"] == 400 and res["seeds"] == [0, 1, 2, 3]
    assert row["tasks"] + row["diverged"] == 400
    assert len(row["seed_means"]) == 4
    assert min(row["seed_means"]) <= row["mean"] <= max(row["seed_means"])
    assert len(set(row["seed_means"])) == 4  # four different task draws, not one repeated
    one = evaluate(sinusoid_bundle, steps=(1,), n_tasks=100, seeds=1, seed=2, baselines=False)
    assert one["methods"]["maml"][0]["loss"]["mean"] == row["seed_means"][2]


def test_a_task_whose_loss_explodes_is_counted_as_diverged_and_kept_out_of_the_mean(sinusoid_bundle):
    meta = copy.deepcopy(sinusoid_bundle.meta)
    meta["inner"]["lr"] = 3.0  # far past what the initialization was trained for
    wild = dataclasses.replace(sinusoid_bundle, meta=meta)
    res = evaluate(wild, steps=(5,), n_tasks=100, seeds=2, baselines=False)
    loss = res["methods"]["maml"][0]["loss"]
    assert loss["diverged"] > 0
    assert loss["diverged"] + loss["tasks"] == 200
    table = format_table(res)
    assert f"({loss['diverged']} of 200 tasks diverged)" in table
    if loss["tasks"]:
        assert loss["mean"] < 1e3  # what is left is a loss, not 6e16


def test_eval_command_names_a_bad_option_value_without_a_traceback(sinusoid_bundle):
    out = subprocess.run([sys.executable, "-m", "edgemeta", "eval", str(sinusoid_bundle.path),
                          "--seeds", "0"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "--seeds: must be > 0, got 0" in out.stderr
    assert "Traceback" not in out.stderr
