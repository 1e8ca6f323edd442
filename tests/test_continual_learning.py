"""Learning on to the asymptote: while a regime lasts, the serving model keeps improving from every
labelled row since the change point, through the gate and a hot swap, at a bounded cost per row."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgemeta.bench.baselines import TorchNet
from edgemeta.bench.stream import run_edgemeta
from edgemeta.config import load_config
from edgemeta.daemon.journal import read_status
from edgemeta.daemon.metrics import Metrics
from edgemeta.daemon.runtime import Daemon
from edgemeta.meta.adapt import Adapter
from edgemeta.meta.bundle import read_bundle
from edgemeta.stream.regime import RegimeBuffer
from edgemeta.testing.streams import switching_stream
from tests.conftest import CpuBurners, counter, write_config

ADAPT = {"support_size": 10, "holdout_size": 20, "steps": 30, "timeout_s": 60}


def one_regime(n: int, seed: int):
    """A sinusoid stream whose task never switches: only learning on can improve on the
    few-shot adaptation."""
    return switching_stream("sinusoid", n=n, hazard=1e-9, seed=seed)


def test_a_long_regime_keeps_improving_after_the_few_shot_adaptations(tmp_path, sinusoid_bundle):
    stream = one_regime(900, seed=4)
    on = run_edgemeta(stream, sinusoid_bundle.path, tmp_path / "on", **ADAPT)
    off = run_edgemeta(stream, sinusoid_bundle.path, tmp_path / "off",
                       sections={"continual": {"enabled": False}}, **ADAPT)
    continual = [d for d in on.info["decisions"] if d[0] == "continual"]
    assert any(result == "accepted" for _, result, _, _ in continual)
    assert not any(d[0] == "continual" for d in off.info["decisions"])
    # The last 300 rows: served by a model fitted on hundreds of rows, not 10 to 100.
    assert on.loss[-300:].mean() < 0.6 * off.loss[-300:].mean()


def test_a_continual_episode_records_its_fit_and_its_step_budget(tmp_path, sinusoid_bundle):
    run_edgemeta(one_regime(700, seed=5), sinusoid_bundle.path, tmp_path, **ADAPT,
                 sections={"continual": {"steps_per_row": 2.0}})
    records = [json.loads(p.read_text()) for p in
               sorted((tmp_path / "state" / "episodes").glob("*.json"))]
    fits = [r for r in records if r["trigger"] == "continual"]
    assert fits, "continued fits ran"
    for r in fits:
        assert r["fit"]["start"] in ("meta-init", "current") or r["fit"]["start"].startswith("recent-")
        assert len(r["holdout"]["y"]) >= 20
        # Two steps per labelled row since the last fit, shared by the starts (at least 20
        # each, at most continual.max_steps); the time guard did not decide it.
        assert r["fit"]["budget"] <= 2 * (len(r["support"]["y"]) + len(r["holdout"]["y"]))
        assert 20 <= r["fit"]["budget_steps"] <= 300
        assert r["fit"]["steps"] <= r["fit"]["budget_steps"]
        assert r["fit"]["budget_exhausted"] is False


def test_a_bare_meta_initialization_is_challenged_until_a_fit_replaces_it(tmp_path,
                                                                         sinusoid_bundle):
    """No terminal state: with no initial adaptation and no drift, the stream would be served by
    the never-adapted model for ever; continued fits on the recent rows challenge it."""
    cfg = write_config(tmp_path, sinusoid_bundle.path, metrics={"enabled": False},
                       adaptation={**ADAPT, "adapt_on_start": False},
                       continual={"enabled": True})
    d = Daemon(load_config(cfg), metrics=Metrics())
    d.setup()
    try:
        assert d.adapter.wait_ready(120)
        d.write_status()
        assert read_status(d.settings.state_dir)["streams"]["sine"]["meta_init"] is True
        assert counter(d, "edgemeta_serving_meta_init", stream="sine") == 1
        stream = one_regime(400, seed=6)
        for lo in range(0, 400, 10):
            d.feed("sine", stream.x[lo:lo + 10], stream.y[lo:lo + 10])
            assert d.drain(60)
        assert d.models.of("sine").manifest.source == "continual"
        d.write_status()
        assert read_status(d.settings.state_dir)["streams"]["sine"]["meta_init"] is False
        assert counter(d, "edgemeta_serving_meta_init", stream="sine") == 0
    finally:
        d.shutdown(drain_s=0.5)


def _fit_points(regime: RegimeBuffer, rows: int) -> list[int]:
    """Feed ``rows`` labelled rows; the regime's row count at each fit it called for."""
    fits = []
    for i in range(rows):
        regime.add([float(i)], float(i))
        if regime.due:
            fits.append(regime.count)
            regime.take()
    return fits


def test_the_fit_schedule_is_geometric_then_bounded_by_the_window():
    r = RegimeBuffer(window=200, every=10, growth=0.5, min_holdout=5)
    fits = _fit_points(r, 2000)
    gaps = np.diff(fits)
    assert fits[0] == 15 and list(gaps[:3]) == [10, 13, 19]  # young regime: grows with it
    assert set(gaps[-5:]) == {100}  # window full: every growth * window rows
    assert len(r) == 200  # the memory budget holds


def test_a_drift_starts_a_new_regime_from_the_rows_since_the_change_point(tmp_path,
                                                                          sinusoid_bundle):
    cfg = write_config(tmp_path, sinusoid_bundle.path, metrics={"enabled": False},
                       adaptation=ADAPT, continual={"enabled": True})
    d = Daemon(load_config(cfg), metrics=Metrics())
    d.setup()
    try:
        x = np.linspace(-5, 5, 60, dtype=np.float32)[:, None]
        d.feed("sine", x, np.sin(x[:, 0]))
        assert d.streams.view("sine").regime_rows == 60
        d.streams.alarm("sine", "adwin")
        assert 0 < d.streams.view("sine").regime_rows < 60
    finally:
        d.shutdown(drain_s=0.5)


def test_a_long_regime_is_still_fitted_at_least_every_max_every_rows():
    r = RegimeBuffer(window=2000, every=50, growth=0.5, min_holdout=20, max_every=250)
    fits = _fit_points(r, 6000)
    assert max(np.diff(fits)) == 250  # without the cap: every 1,000 rows once the window is full
    episode = r.take()
    assert len(episode.holdout_y) == 100  # judged on the newest rows, not the newest 400


def _task(seed: int, n: int):
    s = switching_stream("sinusoid", n=n, hazard=1e-9, noise=0.05, seed=seed)
    return s.x, s.y


def test_a_fit_after_an_unseen_change_learns_from_the_recent_rows(sinusoid_bundle):
    """The serving weights fit concept A; the last rows are concept B and no detector said so.
    A fit on all rows would average A and B; one of the recent-window starts wins."""
    net = TorchNet(sinusoid_bundle.path)  # the bundle's network in torch, for predictions
    adapter = net.adapter
    (xa, ya), (xb, yb) = _task(1, 400), _task(2, 500)
    serving = adapter.fit(xa, ya, max_seconds=120.0, seed=0).weights
    x, y = np.concatenate([xa, xb[:200]]), np.concatenate([ya, yb[:200]])
    result = adapter.fit(x, y, init=serving, max_seconds=120.0, seed=0)
    assert result.start.startswith("recent-")

    def mse(weights):
        return float(np.mean((net.predict(weights, xb[200:]) - yb[200:]) ** 2))

    assert mse(result.weights) < 0.25 * mse(serving)


def test_the_meta_init_start_runs_its_inner_loop_for_as_long_as_the_rows_support(sinusoid_bundle):
    """The bundle's inner loop was meta-trained for K=5 rows and 1 step; on 300 rows the fit runs
    it for more steps, early-stopped on the newest rows, and ends better than the bundle's 1."""
    net = TorchNet(sinusoid_bundle.path)  # the bundle's network in torch, for predictions
    adapter = net.adapter
    x, y = _task(3, 600)
    one_step = adapter.adapt(x[:300], y[:300]).weights
    fitted = adapter.fit(x[:300], y[:300], max_seconds=120.0, max_steps=300, seed=0)
    assert fitted.start == "meta-init"

    def mse(weights):
        return float(np.mean((net.predict(weights, x[300:]) - y[300:]) ** 2))

    assert mse(fitted.weights) < 0.5 * mse(one_step)


@pytest.mark.slow
def test_what_the_daemon_learns_does_not_depend_on_the_machines_load(tmp_path, sinusoid_bundle):
    """Budgets are steps, not seconds: the same stream through the daemon's own path on an idle
    machine and with two CPU-bound processes beside it (as many as this machine has cores)
    gives the same episodes, the same decisions and the same served error, row for row."""
    stream = switching_stream("sinusoid", n=900, hazard=1 / 300, seed=7)
    quiet = run_edgemeta(stream, sinusoid_bundle.path, tmp_path / "quiet", **ADAPT)
    with CpuBurners():
        busy = run_edgemeta(stream, sinusoid_bundle.path, tmp_path / "busy", **ADAPT)
    assert any(d[0] == "continual" for d in quiet.info["decisions"])
    assert quiet.info["decisions"] == busy.info["decisions"]
    np.testing.assert_array_equal(quiet.loss, busy.loss)


def test_the_same_rows_and_seed_give_the_same_weights_and_the_guard_is_reported(sinusoid_bundle):
    adapter = Adapter(read_bundle(sinusoid_bundle.path))
    rng = np.random.default_rng(3)
    x = rng.uniform(-5, 5, (120, 1)).astype(np.float32)
    y = 2 * np.sin(x[:, 0] + 1)
    first = adapter.fit(x, y, steps=200, seed=5)
    again = adapter.fit(x, y, steps=200, seed=5)
    assert not first.budget_exhausted and first.budget_steps == 200
    assert all(np.array_equal(first.weights[k], again.weights[k]) for k in first.weights)
    # A guard that has already run out stops the fit with its best weights so far, and says so.
    guarded = adapter.fit(x, y, init=first.weights, steps=10**6, max_seconds=1e-9, seed=5)
    assert guarded.budget_exhausted
    assert all(np.isfinite(w).all() for w in guarded.weights.values())


def test_a_fit_stopped_by_its_time_guard_is_counted_and_logged(tmp_path, sinusoid_bundle, caplog):
    cfg = write_config(tmp_path, sinusoid_bundle.path,
                       continual={"enabled": True, "every": 50, "steps_per_row": 10**4,
                                  "max_steps": 10**6,
                                  "max_seconds": 0.3})
    daemon = Daemon(load_config(cfg), metrics=Metrics())
    daemon.setup()
    try:
        assert daemon.adapter.wait_ready(120)
        rng = np.random.default_rng(0)
        for _ in range(8):
            x = rng.uniform(-5, 5, (25, 1))
            daemon.feed("sine", x, np.sin(x[:, 0]))
            daemon.drain(60)
        assert counter(daemon, "edgemeta_fit_budget_exhausted_total", stream="sine") >= 1
        assert "hit its time guard" in caplog.text
    finally:
        daemon.shutdown()
