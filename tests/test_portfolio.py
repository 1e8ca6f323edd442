"""The portfolio of online experts: mixing by live losses with a regret bound, experts that
misbehave dropped and never served, and the real daemon serving the mixture."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgemeta.portfolio.fixed_share import FixedShare, regret_bound
from edgemeta.portfolio.portfolio import Portfolio
from edgemeta.testing.harness import DaemonProcess, drop, free_port, sine_csv, write_config

from .conftest import run_edgemeta


def test_the_weights_move_to_the_expert_that_is_exactly_right():
    rng = np.random.default_rng(1)
    p = Portfolio("regression", outputs=1)
    errors = []
    for _ in range(40):
        x = rng.normal(size=(25, 5))  # five features: the neighbours are far apart
        y = x @ np.array([1.5, -0.5, 1.0, 2.0, -1.0]) + 2.0
        served, members = p.predict(x, np.full((25, 1), 7.0), version=1)  # ONNX: far off
        errors.append(float(np.mean((served[:, 0] - y) ** 2)))
        p.learn(x, y, members)
    w = p.weights()
    assert w["linear"] > 0.95 and p.champion() == "linear"
    assert errors[-1] < 1e-3 * errors[0]


def test_a_stream_switching_between_two_experts_regimes_stays_within_the_bound():
    """Expert 0 predicts 0, expert 1 predicts 1; the label is 0 or 1 by regime, switching every
    150 rows. The mixture predicts the weighted average; its squared error summed over the stream
    stays within Fixed-Share's bound of the best switching sequence (which loses nothing)."""
    eta, alpha, rows, every = 2.0, 0.01, 1200, 150
    mix = FixedShare(2, eta=eta, alpha=alpha)
    preds = np.array([0.0, 1.0])
    total = 0.0
    for t in range(rows):
        y = float((t // every) % 2)
        served = float(mix.weights_ @ preds)
        total += (served - y) ** 2
        mix.update((preds - y) ** 2)
    switches = rows // every - 1
    bound = regret_bound(2, rows, switches, eta, alpha, cap=1.0)
    assert total <= bound
    assert total < 0.25 * rows  # and far better than always answering 0.5
    # Tracking: a few rows after each switch the right expert carries the mixture.
    assert mix.weights_[1] > 0.9  # the last regime (t // 150 = 7) is expert 1's


class _Exploding:
    """An expert that learns normally, then predicts NaN (or a huge number) from its 3rd batch."""

    name = "bad"

    def __init__(self, outputs, value):
        self.outputs, self.value, self.rows_ = outputs, value, 0

    def predict(self, x):
        if self.rows_ >= 50:
            return np.full((len(x), self.outputs), self.value)
        return np.zeros((len(x), self.outputs))

    def learn(self, x, targets):
        self.rows_ += len(x)


@pytest.mark.parametrize("value", [float("nan"), 1e30])
def test_a_nan_or_exploding_expert_is_dropped_counted_and_never_served(value):
    rng = np.random.default_rng(2)
    p = Portfolio("regression", outputs=1, experts=("linear", "knn"))
    p._learners[1] = _Exploding(1, value)
    for _ in range(10):
        x = rng.normal(size=(25, 1))
        y = np.sin(x[:, 0])
        served, members = p.predict(x, np.sin(x), version=1)
        assert np.isfinite(served).all() and np.abs(served).max() < 10
        p.learn(x, y, members)
    assert p.dropped_ == {"knn": 1}
    assert p.weights()["knn"] == 0.0


def test_a_freshly_adapted_model_enters_with_its_prior_weight():
    rng = np.random.default_rng(3)
    p = Portfolio("regression", outputs=1, onnx_prior=0.5)
    for _ in range(20):
        x = rng.normal(size=(25, 1))
        y = 3 * x[:, 0]
        _, members = p.predict(x, np.zeros((25, 1)), version=1)
        p.learn(x, y, members)
    assert p.weights()["onnx"] < 0.05
    p.predict(rng.normal(size=(1, 1)), np.zeros((1, 1)), version=2)
    assert p.weights()["onnx"] == pytest.approx(0.5)


def test_classification_mixes_probabilities_and_serves_the_most_probable_class():
    rng = np.random.default_rng(4)
    p = Portfolio("classification", outputs=3)
    for _ in range(30):
        x = rng.normal(size=(30, 2))
        y = (x[:, 0] > 0).astype(int) + (x[:, 1] > 1).astype(int)
        served, members = p.predict(x, np.zeros((30, 3)), version=1)  # ONNX: uniform
        assert np.allclose(served.sum(axis=1), 1.0)
        p.learn(x, y, members)
    x = np.array([[2.0, -2.0], [-2.0, -2.0]])
    served, _ = p.predict(x, np.zeros((2, 3)), version=1)
    assert served.argmax(axis=1).tolist() == [1, 0]
    assert p.weights()["onnx"] < 0.1


def test_a_classifier_that_is_always_right_wins_even_when_its_scores_look_unsure():
    """The ONNX model's logits favour the right class by only 0.1 (raw softmax: 52.5%), the
    experts see features that say nothing: calibrated, the model's probabilities mean what
    they say, it carries the weight and the served probabilities are confident."""
    rng = np.random.default_rng(3)
    p = Portfolio("classification", outputs=2)
    for _ in range(20):
        y = rng.integers(0, 2, 25)
        logits = np.stack([-0.05 * (2 * y - 1), 0.05 * (2 * y - 1)], axis=1)
        served, members = p.predict(rng.normal(size=(25, 3)), logits, version=1)
        p.learn(rng.normal(size=(25, 3)), y, members)
    y = rng.integers(0, 2, 25)
    logits = np.stack([-0.05 * (2 * y - 1), 0.05 * (2 * y - 1)], axis=1)
    served, _ = p.predict(rng.normal(size=(25, 3)), logits, version=1)
    assert p.weights()["onnx"] > 0.95
    assert served[np.arange(25), y].min() > 0.9


@pytest.mark.parametrize("seed", [0, 1])
def test_a_classifier_mixture_errs_about_as_little_as_its_best_member(seed):
    """river's SEA stream: a threshold concept with 10% label noise, switching every ~300 rows.
    The experts differ by a few hundredths in error rate and barely at all in log loss; the
    mixture must serve about as few errors as its best member (weighed by log loss it erred
    0.012 more), never a blend that is worse than each of them."""
    from edgemeta.bench.river_families import river_stream

    stream = river_stream("river-sea", n=4000, hazard=1 / 300, seed=seed)
    p = Portfolio("classification", outputs=2)
    served_wrong, member_wrong = [], []
    for i in range(len(stream.y)):
        x, y = stream.x[i:i + 1], stream.y[i:i + 1].astype(int)
        served, members = p.predict(x, np.zeros((1, 2)), version=1)
        served_wrong.append(served.argmax(axis=1)[0] != y[0])
        member_wrong.append(np.nan_to_num(members, nan=0.0).argmax(axis=2)[0] != y[0])
        p.learn(x, y, members)
    best = np.mean(member_wrong, axis=0).min()
    assert np.mean(served_wrong) <= best + 0.005


@pytest.mark.parametrize("kind, expert", [("classification", "arf"), ("regression", "hat")])
def test_an_opt_in_river_tree_expert_learns_a_step_and_carries_the_mixture(kind, expert):
    """A step in one feature: a tree's shape, not a line's. With river's tree alone beside an
    ONNX model that knows nothing, the tree takes the weight and the served answers."""
    rng = np.random.default_rng(6)
    outputs = 2 if kind == "classification" else 1
    p = Portfolio(kind, outputs=outputs, experts=(expert,))
    for _ in range(40):
        x = rng.uniform(-1, 1, size=(20, 2))
        y = (x[:, 0] > 0.3).astype(int) if kind == "classification" else np.where(
            x[:, 0] > 0.3, 2.0, -2.0)
        _, members = p.predict(x, np.zeros((20, outputs)), version=1)
        p.learn(x, y, members)
    assert p.weights()[expert] > 0.9
    served, _ = p.predict(np.array([[0.9, 0.0], [-0.9, 0.0]]), np.zeros((2, outputs)), version=1)
    if kind == "classification":
        assert served.argmax(axis=1).tolist() == [1, 0]
    else:
        assert np.allclose(served.ravel(), [2.0, -2.0], atol=0.5)


def test_one_row_files_keep_the_linear_expert_on_a_linear_stream():
    """Files of one row each: the labels' spread is not known from the first row (its variance
    is 0), so it must not judge the experts' predictions as exploding."""
    rng = np.random.default_rng(4)
    p = Portfolio("regression", outputs=1)
    for _ in range(300):
        x = rng.normal(size=(1, 3))
        y = x @ np.array([2.0, -1.0, 0.5]) + 10.0
        _, members = p.predict(x, np.zeros((1, 1)), version=1)
        p.learn(x, y, members)
    assert p.dropped_ == {}
    assert p.champion() == "linear" and p.weights()["linear"] > 0.9


@pytest.mark.slow
def test_the_daemon_serves_the_mixture_says_where_each_answer_came_from_and_restarts_fresh(
        tmp_path, sinusoid_bundle):
    """A stream the bundle does not know (a line, not a sinusoid) with labels inline: the
    linear expert takes the stream over, each prediction names its members' weights, metrics
    and status show them; after a restart the experts start fresh and nothing is lost."""
    port = free_port()
    state = tmp_path / "state"
    cfg = write_config(tmp_path / "edgemeta.toml", sinusoid_bundle.path, state, port,
                       portfolio={"enabled": True}, memory={"capacity": 0},
                       adaptation={"support_size": 10, "holdout_size": 20, "steps": 5,
                                   "timeout_s": 20, "retries": 0})
    daemon = DaemonProcess(cfg, state, port, tmp_path / "daemon.log")
    inbox = state / "inbox" / "sine"
    rng = np.random.default_rng(5)
    sent = []

    def send(n_files: int) -> None:
        for _ in range(n_files):
            name = f"f{len(sent):04d}.csv"
            # The line is followed into x the stream has not shown yet: there the linear expert
            # is exactly right and the nearest neighbours (of x already seen) are not.
            x = rng.uniform(-5, 5, 25) + 0.4 * len(sent)
            y = 0.8 * x + 1.0
            drop(inbox, name, sine_csv([f"{name}-{i}" for i in range(25)], x, y))
            sent.append((name, y))
        daemon.wait(lambda: not any(p.suffix == ".csv" for p in inbox.iterdir()), 120,
                    "the inputs to be handled")

    def served_mse(names) -> float:
        errors = []
        for name, y in names:
            out = state / "outbox" / "sine" / f"{name}.predictions.jsonl"
            pred = np.array([json.loads(line)["prediction"] for line in out.read_text().splitlines()])
            errors.append((pred - y) ** 2)
        return float(np.concatenate(errors).mean())

    try:
        daemon.start()
        daemon.wait_ready(120)
        send(30)
        first = json.loads((state / "outbox" / "sine" / "f0029.csv.predictions.jsonl")
                           .read_text().splitlines()[0])
        assert set(first["experts"]) >= {"onnx", "linear"}
        assert sum(first["experts"].values()) == pytest.approx(1.0, abs=1e-3)
        assert served_mse(sent[-10:]) < 0.05 * served_mse(sent[:2])
        weights = {m: daemon.total("edgemeta_portfolio_weight", stream="sine", expert=m)
                   for m in ("onnx", "linear", "knn", "knn_recent", "knn_short")}
        assert weights["linear"] == max(weights.values()), weights
        assert daemon.total("edgemeta_portfolio_champion", stream="sine", expert="linear") == 1
        assert daemon.total("edgemeta_portfolio_champion", stream="sine", expert="onnx") == 0
        daemon.wait(lambda: (daemon.status()["streams"]["sine"].get("portfolio") or {})
                    .get("rows", 0) >= 700, 10, "status to show the portfolio")
        assert daemon.status()["streams"]["sine"]["portfolio"]["champion"] == "linear"
        shown = run_edgemeta("status", "--state", str(state))
        assert "served as a mixture, champion linear: onnx" in shown.stdout, shown.stdout
        assert daemon.stop() == 0
        daemon.start()
        daemon.wait_ready(120)
        send(4)
        rows = daemon.status()["streams"]["sine"].get("portfolio", {}).get("rows")
        daemon.wait(lambda: (daemon.status()["streams"]["sine"].get("portfolio") or {})
                    .get("rows", 10**9) <= 100, 10, "status after the restart")
        assert rows is None or rows <= 100  # fresh experts: only the rows since the restart
        processed = {p.name for p in (state / "processed" / "sine").iterdir()}
        assert {name for name, _ in sent} <= processed  # nothing lost
    finally:
        daemon.stop()


def test_the_portfolio_is_on_by_default_and_its_off_switch_serves_the_onnx_model_alone(
        sinusoid_bundle, tmp_path):
    from edgemeta.bundle_format import read_bundle_info
    from edgemeta.config import ConfigError, parse_config, validate
    from edgemeta.daemon.portfolios import build_portfolios

    bundle = read_bundle_info(sinusoid_bundle.path)
    raw = {"bundle": {"path": str(sinusoid_bundle.path)}, "state": {"dir": str(tmp_path)},
           "streams": [{"name": "a", "features": ["x"], "label": "y"},
                       {"name": "b", "features": ["x"], "label": "y"}]}
    on = build_portfolios(validate(parse_config(raw)), bundle)
    assert set(on) == {"a", "b"} and on["a"].members == ("onnx", "linear", "knn", "knn_recent", "knn_short")
    off = validate(parse_config({**raw, "portfolio": {"enabled": False}}))
    assert build_portfolios(off, bundle) == {}
    with pytest.raises(ConfigError, match="portfolio.experts: unknown expert 'forest'"):
        validate(parse_config({**raw, "portfolio": {"experts": ["linear", "forest"]}}))
    opted = build_portfolios(validate(parse_config(
        {**raw, "portfolio": {"experts": ["linear", "hat"]}})), bundle)
    assert opted["a"].members == ("onnx", "linear", "hat")
