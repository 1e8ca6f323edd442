"""The gate decides by a paired test on per-row holdout losses, with a stated false-accept rate."""

from __future__ import annotations

import numpy as np

from edgemeta.daemon.gate import decide, paired_p_value


def test_a_candidate_that_is_no_better_is_accepted_at_most_at_the_stated_rate():
    rng = np.random.default_rng(0)
    accepted = 0
    trials = 2000
    for _ in range(trials):
        # Both models equally good: per-row squared errors from the same heavy-tailed law.
        current = rng.normal(0, 1, 20) ** 2
        candidate = rng.normal(0, 1, 20) ** 2
        accepted += decide(current, candidate, alpha=0.05).accepted
    assert accepted / trials <= 0.05 + 3 * np.sqrt(0.05 * 0.95 / trials)


def test_a_real_improvement_on_twenty_rows_is_accepted_nearly_always():
    rng = np.random.default_rng(1)
    results = []
    for _ in range(200):
        err = rng.normal(0, 1, 20)
        current = (err + 1.5) ** 2      # the serving model is biased on this regime
        candidate = err ** 2            # the candidate removed the bias, same noise per row
        results.append(decide(current, candidate, alpha=0.05).accepted)
    assert np.mean(results) > 0.9


def test_the_early_gates_five_rows_pass_only_when_every_row_improved():
    current = np.ones(5)
    assert decide(current, np.full(5, 0.45), alpha=0.05).accepted
    better_on_four = np.array([0.1, 0.1, 0.1, 0.1, 1.2])
    assert not decide(current, better_on_four, alpha=0.05).accepted


def test_min_gain_stays_an_effect_size_floor():
    current, candidate = np.ones(30), np.full(30, 0.97)  # significant, but only 3% better
    assert decide(current, candidate, alpha=0.05).accepted
    verdict = decide(current, candidate, alpha=0.05, min_gain=0.05)
    assert not verdict.accepted and verdict.reason == "below_min_gain"


def test_a_non_finite_candidate_is_refused_whatever_the_test_says():
    assert decide(np.ones(10), np.array([0.0] * 9 + [np.nan]), alpha=0.5).reason == "non_finite"


def test_the_p_value_is_exact_on_few_rows_and_deterministic_on_many():
    assert paired_p_value(np.ones(3), np.zeros(3)) == 1 / 8
    rng = np.random.default_rng(2)
    a, b = rng.random(200), rng.random(200)
    assert paired_p_value(a, b) == paired_p_value(a, b)
