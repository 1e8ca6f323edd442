"""The holdout gate: a candidate is served only if it is finite and better by the evidence.

Both models are judged by the same holdout rows, which the inner loop never saw, and the candidate
is judged as the ONNX artifact that would be served (:func:`evaluate` patches the weights into the
bundle's graph, loads the session that a promotion installs, and runs it), so what is checked is
exactly what is deployed.

Why a paired test and not a fixed margin: on 20 holdout rows a "5% better" threshold rejects real
improvements and accepts lucky ones alike. Each holdout row is scored by both models, and a
one-sided sign-flip permutation test on the per-row loss differences asks whether the candidate is
better; it is accepted at level ``gate.alpha``, which is its false-accept rate when the candidate is
in truth no better. ``gate.min_gain`` stays as an optional effect-size floor. The early gate (a few
holdout rows right after a drift) uses the same test: on 6 rows it can only pass when every row
improved, otherwise the episode's weights wait for the full holdout (the early rows first, then
the ones after them). The two looks share ``gate.alpha``: the early one takes most of it, at a
level its few rows can attain (:func:`split_alpha`), and the full one's p-value counts the
sign patterns the early look would have accepted too (:func:`sequential_p_value`), so an episode
looked at twice is accepted by chance at most ``gate.alpha`` of the time. A recall's two looks
(at the drift, and on the drift episode's rows) take half of it each.

>>> decide(np.full(20, 1.0), np.full(20, 0.5), alpha=0.05).accepted
True
>>> decide(np.array([1.0, 0.2, 0.9, 0.4]), np.array([0.9, 0.3, 0.8, 0.5]), alpha=0.05).reason
'not_better'
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

from edgemeta.daemon.sanity import skill
from edgemeta.serve.onnx_weights import OnnxTemplate, WeightPatchError
from edgemeta.serve.predictor import Live, run


def per_sample_loss(kind: str, outputs: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Squared error (regression) or 0/1 error (classification), one value per row."""
    outputs = np.asarray(outputs, dtype=np.float64)
    if kind == "regression":
        return (outputs.reshape(len(y), -1)[:, 0] - np.asarray(y, dtype=np.float64)) ** 2
    return (outputs.argmax(axis=1) != np.asarray(y).astype(np.int64)).astype(np.float64)


def row_losses(kind: str, outputs: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The gate's per-row loss: squared error, or for classification the cross-entropy (on a small
    holdout, 0/1 errors tie on most rows and a test on them has almost no power)."""
    outputs = np.asarray(outputs, dtype=np.float64)
    if kind == "regression":
        return per_sample_loss(kind, outputs, y)
    shifted = outputs - outputs.max(axis=1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return -logp[np.arange(len(y)), np.asarray(y).astype(np.int64)]


EXACT_ROWS = 12      # up to this many rows every sign pattern is enumerated (4,096)
RANDOM_FLIPS = 4000  # beyond it, this many seeded random patterns


def paired_p_value(current_rows: np.ndarray, candidate_rows: np.ndarray) -> float:
    """One-sided p-value that the candidate's mean per-row loss is lower than the current one's.

    A sign-flip permutation test on the paired differences: under "no better" each difference is
    as likely to have either sign, so the share of sign patterns whose mean is at least the
    observed one is the probability of seeing this much improvement by chance. It makes no
    assumption about the losses' distribution (squared errors are heavy-tailed) and is exact on
    the early gate's few rows. Deterministic: the random patterns are seeded.

    >>> round(paired_p_value(np.ones(5), np.zeros(5)), 4)  # 5 wins of 5: 1 pattern in 32
    0.0312
    >>> paired_p_value(np.ones(5), np.ones(5))
    1.0
    """
    d = np.asarray(current_rows, np.float64) - np.asarray(candidate_rows, np.float64)
    d = d[d != 0]
    if len(d) == 0:
        return 1.0
    observed = d.sum()
    if len(d) <= EXACT_ROWS:
        signs = 1 - 2 * ((np.arange(2 ** len(d))[:, None] >> np.arange(len(d))) & 1)
        sums = signs @ d
        return float(np.mean(sums >= observed - 1e-12 * np.abs(d).sum()))
    rng = np.random.default_rng(len(d))
    signs = rng.choice((-1.0, 1.0), size=(RANDOM_FLIPS, len(d)))
    sums = signs @ d
    return float((1 + np.sum(sums >= observed - 1e-12 * np.abs(d).sum())) / (1 + RANDOM_FLIPS))


#: The share of ``gate.alpha`` the full look keeps at least, after an early look.
FULL_LOOK_SHARE = 1 / 16


def split_alpha(alpha: float, early_rows: int) -> float:
    """The level of the early look on ``early_rows`` rows; the full look after it is judged by
    :func:`sequential_p_value` at ``alpha`` itself, so it gets what the early look left.

    Most of alpha goes to the early look: it comes right after a drift, where a good candidate is
    far better than the model that no longer fits (and passes the full look easily even at a
    small level), and every row it does not have to wait for is served by that model. Measured
    on `bench stream`'s sinusoid (docs/BENCHMARKS.md): half of alpha early cost 10-25% of the
    cumulative error against 15/16 of it. The sign-flip test on n <= EXACT_ROWS rows attains only
    multiples of 2^-n: the early look gets the largest one that leaves the full look at least
    ``FULL_LOOK_SHARE`` of alpha (or 2^-n, the one that lets all-better pass).

    >>> split_alpha(0.05, 6)  # 3/64: five wins of six pass when the loss is small
    0.046875
    >>> split_alpha(0.05, 0)
    0.0
    """
    if early_rows <= 0:
        return 0.0
    budget = alpha * (1 - FULL_LOOK_SHARE)
    if early_rows > EXACT_ROWS:
        return budget
    unit = 0.5 ** early_rows
    return math.floor(budget / unit + 1e-9) * unit or unit


def sequential_p_value(current_rows: np.ndarray, candidate_rows: np.ndarray, looked: int,
                       early_alpha: float) -> float:
    """The full look's p-value after an early look at the first ``looked`` rows found nothing
    at level ``early_alpha``: the share of sign patterns (the same null as
    :func:`paired_p_value`) under which the early look would have accepted, or the full
    statistic is at least the observed one.

    Accepting when this is <= alpha makes the rejection region of both looks together
    {early accepts} + {full statistic large}, of null probability <= alpha: the two looks share
    alpha exactly, conditional on the rows' magnitudes, however much their rows overlap (a
    union bound would give the full look only alpha - early_alpha).

    >>> cur, cand = np.ones(20), np.r_[np.full(5, 0.5), 1.05, np.full(14, 0.5)]
    >>> round(sequential_p_value(cur, cand, 6, 1 / 64), 3)  # five wins of six early, then all
    0.016
    """
    d = np.asarray(current_rows, np.float64) - np.asarray(candidate_rows, np.float64)
    observed = d.sum()
    a = np.abs(d)
    early = a[:looked]
    rng = np.random.default_rng(len(d))
    # The early statistic's null distribution: exact over its 2^looked sign patterns, as the
    # early look computed it, or from random ones beyond EXACT_ROWS.
    if looked <= EXACT_ROWS:
        patterns = 1 - 2 * ((np.arange(2 ** looked)[:, None] >> np.arange(looked)) & 1)
    else:
        patterns = np.random.default_rng(looked).choice((-1.0, 1.0), size=(RANDOM_FLIPS, looked))
    early_null = np.sort(patterns @ early)
    tol = 1e-12 * max(float(a.sum()), 1e-300)
    signs = rng.choice((-1.0, 1.0), size=(RANDOM_FLIPS, len(d)))
    t_early = signs[:, :looked] @ early
    # p_early of each pattern: the share of early patterns at least as large
    p_early = 1.0 - np.searchsorted(early_null, t_early - tol, side="left") / len(early_null)
    extreme = (p_early <= early_alpha) | (signs @ a >= observed - tol)
    return float((1 + extreme.sum()) / (1 + RANDOM_FLIPS))


@dataclass(frozen=True)
class GateDecision:
    accepted: bool
    reason: str
    current: float
    candidate: float
    p_value: float = 1.0


def decide(current_rows: np.ndarray, candidate_rows: np.ndarray, alpha: float = 0.05,
           min_gain: float = 0.0, looked: int = 0, early_alpha: float = 0.0) -> GateDecision:
    """Accept a finite candidate whose per-row losses are lower at level ``alpha`` and whose mean
    is at most ``current * (1 - min_gain)``; ``looked``: an early look at level ``early_alpha``
    already judged the first ``looked`` rows (the two looks then share ``alpha``)."""
    current, candidate = float(np.mean(current_rows)), float(np.mean(candidate_rows))
    if not (math.isfinite(candidate) and np.all(np.isfinite(candidate_rows))):
        return GateDecision(False, "non_finite", current, candidate)
    if not math.isfinite(current):
        p = 0.0
    elif looked:
        p = sequential_p_value(current_rows, candidate_rows, looked, early_alpha)
    else:
        p = paired_p_value(current_rows, candidate_rows)
    if p > alpha:
        return GateDecision(False, "not_better", current, candidate, p)
    if math.isfinite(current) and candidate > current * (1 - min_gain):
        return GateDecision(False, "below_min_gain", current, candidate, p)
    return GateDecision(True, "better", current, candidate, p)


@dataclass(frozen=True)
class Verdict:
    """What the gate decided, with what a promotion needs (the loaded candidate) and the figures
    an episode record keeps.

    ``result`` is ``accepted``, ``rejected``, ``inconclusive`` (early gate: wait for the full
    holdout) or ``failed`` (the weights do not fit the bundle's graph).
    """

    result: str
    reason: str
    current: float = float("nan")
    candidate: float = float("nan")
    expected: float | None = None  # the candidate's mean per-row loss on the holdout
    live: Live | None = field(default=None, repr=False)
    model: bytes | None = field(default=None, repr=False)  # the patched graph a promotion commits
    timings: dict[str, float] = field(default_factory=dict)
    error: str = ""
    p_value: float = 1.0  # of the paired test (candidate better than the serving model)

    @property
    def accepted(self) -> bool:
        return self.result == "accepted"


def evaluate(kind: str, template: OnnxTemplate, serving: Live, weights: Mapping[str, np.ndarray],
             holdout_x: np.ndarray, holdout_y: np.ndarray, alpha: float, min_gain: float,
             early: bool, load: Callable[[bytes], Live], looked: int = 0,
             early_alpha: float = 0.0) -> Verdict:
    """Judge adapted ``weights`` against the ``serving`` model on a (normalized) holdout.

    ``load`` turns model bytes into a loaded, warmed session (the predictor's), which a
    promotion installs as it is.
    """
    t = time.perf_counter()
    try:
        model = template.patch(dict(weights))
    except WeightPatchError as exc:
        return Verdict("failed", "bad_weights", error=str(exc))
    timings = {"patch": time.perf_counter() - t}
    t = time.perf_counter()
    serving_out = run(serving, holdout_x)
    current_rows = row_losses(kind, serving_out, holdout_y)
    try:
        live = load(model)
        candidate_out = run(live, holdout_x)
        candidate_rows = row_losses(kind, candidate_out, holdout_y)
    except Exception:  # noqa: BLE001 - a candidate that cannot run is rejected, never served
        timings["gate"] = time.perf_counter() - t
        return Verdict("rejected", "non_finite", float(current_rows.mean()), float("nan"),
                       timings=timings)
    decision = decide(current_rows, candidate_rows, alpha, min_gain, looked, early_alpha)
    current, candidate = decision.current, decision.candidate
    rows = per_sample_loss(kind, candidate_out, holdout_y)
    # Beating the serving model is not enough: a candidate no better on its holdout than that
    # holdout's own mean (skill <= 0: R^2, or the share of the majority-class error removed)
    # learned nothing from x, which is what random or shuffled labels give. A candidate that
    # halves the serving model's loss is kept to the ordinary rule: after a real change the
    # serving model is far off and even a weak adaptation is worth serving. And the rule holds
    # the candidate to no more than the serving model meets: when the serving model does no
    # better than the constant either, a candidate that beats it by the paired test is served.
    serving_skill = skill(kind, holdout_y, per_sample_loss(kind, serving_out, holdout_y))
    no_signal = (candidate > 0.5 * current and skill(kind, holdout_y, rows) <= 0
                 and serving_skill > 0)
    if early and not decision.accepted and decision.reason != "non_finite":
        result, reason = "inconclusive", "not_clear"
    elif decision.accepted and no_signal:
        result, reason = ("inconclusive", "not_clear") if early else ("rejected", "no_signal")
    else:
        result, reason = ("accepted" if decision.accepted else "rejected"), decision.reason
    if result == "accepted" and early:
        reason = "clear_win"
    timings["gate"] = time.perf_counter() - t
    accepted = result == "accepted"
    return Verdict(result, reason, current, candidate, float(rows.mean()),
                   live if accepted else None, model if accepted else None, timings,
                   p_value=decision.p_value)
