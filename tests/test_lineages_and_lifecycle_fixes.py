"""Per-stream model lineages, the migration of older state directories, and the lifecycle
behaviours that used to go wrong (each test here failed before the lifecycle state machine)."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys

import numpy as np
import pytest

from edgemeta.config import ConfigError, DriftSettings, load_config, parse_config
from edgemeta.daemon.metrics import Metrics
from edgemeta.daemon.runtime import Daemon
from edgemeta.daemon.triggers import write_trigger
from edgemeta.serve.registry import Registry
from edgemeta.stream.buffers import SupportCollector
from edgemeta.stream.drift import DriftMonitor
from tests.conftest import counter, feed, run_until, write_config


def start(tmp_path, bundle, streams=None, **sections) -> Daemon:
    cfg = write_config(tmp_path, bundle, streams=streams, metrics={"enabled": False}, **sections)
    d = Daemon(load_config(cfg), metrics=Metrics())
    d.setup()
    assert d.adapter.wait_ready(120)
    return d


def accepted(d: Daemon, stream: str) -> float:
    return counter(d, "edgemeta_adaptations_total", stream=stream, result="accepted")


def episodes(d: Daemon) -> list[dict]:
    return [json.loads(p.read_text()) for p in
            sorted((d.settings.state_dir / "episodes").glob("*.json"))]


# -- lineages ----------------------------------------------------------------------------------------
def test_two_streams_drifting_independently_each_get_their_own_model(tmp_path, sinusoid_bundle):
    d = start(tmp_path, sinusoid_bundle.path, streams={"a": None, "b": None})
    try:
        feed(d, "a0", 1.0, 0.0, 8, stream="a")
        feed(d, "b0", 1.0, 0.0, 8, stream="b")
        feed(d, "a1", 4.5, 2.5, 6, stream="a")  # only stream a drifts
        assert run_until(d, lambda: accepted(d, "a") >= 1)
        va = d.models.version("a")
        assert va > 1 and d.models.version("b") == 1, "b is still served by the meta-init"
        assert d.registry.manifest(va).lineage == "a"
        feed(d, "b1", 3.5, 0.5, 6, stream="b")  # now b drifts to a different task
        assert run_until(d, lambda: accepted(d, "b") >= 1)
        vb = d.models.version("b")
        assert vb not in (1, va) and d.registry.manifest(vb).lineage == "b"
        assert d.registry.manifest(d.models.version("a")).lineage == "a"
        # Each model fits its own stream's task far better than the other stream's.
        x = np.linspace(-5, 5, 200)[:, None].astype(np.float32)
        out_a = d.feed("a", x)[0]
        out_b = d.feed("b", x)[0]
        mse = lambda p, amp, ph: float(np.mean((np.asarray(p) - amp * np.sin(x[:, 0] - ph)) ** 2))  # noqa: E731
        assert mse(out_a, 4.5, 2.5) < mse(out_a, 3.5, 0.5) / 3
        assert mse(out_b, 3.5, 0.5) < mse(out_b, 4.5, 2.5) / 3
        assert counter(d, "edgemeta_model_version", stream="a") == d.models.version("a")
        assert counter(d, "edgemeta_model_version", stream="b") == vb
        d.write_status()
        status = json.loads((d.settings.state_dir / "status.json").read_text())
        assert status["streams"]["b"]["version"] == vb
        out = subprocess.run([sys.executable, "-m", "edgemeta", "models", "list", "--config",
                              str(d.settings.source), "--stream", "b", "--json"],
                             capture_output=True, text=True, check=True)
        rows = json.loads(out.stdout)
        assert {r["lineage"] for r in rows} <= {None, "b"} and [r["version"] for r in rows
                                                               if r["current"]] == [vb]
    finally:
        d.shutdown(drain_s=0.5)


def test_streams_that_share_a_model_are_swapped_together(tmp_path, sinusoid_bundle):
    d = start(tmp_path, sinusoid_bundle.path, streams={"a": "pump", "b": "pump"})
    try:
        feed(d, "a0", 1.0, 0.0, 8, stream="a")
        feed(d, "a1", 4.5, 2.5, 6, stream="a")
        assert run_until(d, lambda: accepted(d, "a") >= 1)
        assert d.models.version("a") == d.models.version("b") > 1
        assert d.registry.manifest(d.models.version("b")).lineage == "pump"
    finally:
        d.shutdown(drain_s=0.5)


def test_a_state_directory_from_before_lineages_is_migrated_on_start_with_nothing_lost(
        tmp_path, sinusoid_bundle):
    # The old layout: versions without a lineage and one shared models/CURRENT.
    old = Registry(tmp_path / "state")
    old.init_from_bundle(sinusoid_bundle.path)
    adapted = old.commit((sinusoid_bundle.path / "model.onnx").read_bytes(), source="drift",
                         stream="a")
    assert adapted.lineage is None and old.current_version() == 2
    manifests_before = {v: (old.path(v) / "manifest.json").read_bytes() for v in old.versions()}
    d = start(tmp_path, sinusoid_bundle.path, streams={"a": None, "b": None})
    try:
        assert d.models.version("a") == d.models.version("b") == 2  # both serve what served
        assert d.registry.lineages() == ["a", "b"]
        assert d.registry.current_version("a", inherit=False) == 2
        assert {v: (d.registry.path(v) / "manifest.json").read_bytes()
                for v in d.registry.versions()} == manifests_before
        # A rollback of one stream walks its lineage back to the meta-init; the other is left.
        write_trigger(d.settings.state_dir / "triggers", "rollback", {"stream": "a"})
        assert run_until(d, lambda: d.models.version("a") == 3, timeout=5)
        assert d.registry.manifest(3).parent == 1 and d.models.version("b") == 2
    finally:
        d.shutdown(drain_s=0.5)


# -- the lifecycle fixes -----------------------------------------------------------------------------
def test_a_manual_trigger_during_a_drift_adaptation_is_committed_as_manual(
        tmp_path, sinusoid_bundle):
    d = start(tmp_path, sinusoid_bundle.path)
    try:
        feed(d, "a", 1.0, 0.0, 8)
        os.kill(d.adapter.pid, signal.SIGSTOP)  # hold the drift episode in the worker
        try:
            feed(d, "b", 4.5, 2.5, 4)
            assert run_until(d, lambda: d.streams.view("sine").phase == "adapting", timeout=5)
            write_trigger(d.settings.state_dir / "triggers", "adapt")
            assert run_until(d, lambda: counter(d, "edgemeta_trigger_files_total", result="ok",
                                                reason="") == 1, timeout=5)
        finally:
            os.kill(d.adapter.pid, signal.SIGCONT)
        assert run_until(d, lambda: len(episodes(d)) >= 1, timeout=30)
        assert episodes(d)[0]["trigger"] == "drift"
        assert d.streams.view("sine").reason == "manual", "the operator's request is not lost"
        feed(d, "m", 3.0, -1.0, 1)  # 50 rows complete the manual collection
        assert run_until(d, lambda: len(episodes(d)) >= 2, timeout=30)
        manual = episodes(d)[1]
        assert manual["trigger"] == "manual"
        if manual["result"] == "accepted":
            assert d.registry.manifest(manual["version"]).source == "manual"
    finally:
        d.shutdown(drain_s=0.5)


def test_a_reload_keeps_an_open_collection_open_for_the_same_reason(tmp_path, sinusoid_bundle):
    d = start(tmp_path, sinusoid_bundle.path)
    previous = {}
    try:
        write_trigger(d.settings.state_dir / "triggers", "adapt")
        assert run_until(d, lambda: d.streams.view("sine").phase == "collecting", timeout=5)
        d.settings.source.write_text(d.settings.source.read_text().replace(
            "holdout_size = 20", "holdout_size = 15"))
        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGHUP, signal.SIGTERM,
                                                           signal.SIGINT)}
        d.install_signal_handlers()
        os.kill(os.getpid(), signal.SIGHUP)  # the handler only enqueues; the loop reloads
        assert run_until(d, lambda: d.settings.adaptation.holdout_size == 15, timeout=5)
        view = d.streams.view("sine")
        assert view.phase == "collecting" and view.reason == "manual"
        assert view.needed == 25  # the new settings apply to the reopened collection
        feed(d, "m", 3.0, -1.0, 1)
        assert run_until(d, lambda: len(episodes(d)) == 1, timeout=30)
        assert episodes(d)[0]["trigger"] == "manual"
        assert len(episodes(d)[0]["holdout"]["y"]) == 15
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        d.shutdown(drain_s=0.5)


def test_signal_handlers_enqueue_into_a_reentrant_queue(tmp_path, sinusoid_bundle):
    d = Daemon(load_config(write_config(tmp_path, sinusoid_bundle.path)))
    assert isinstance(d.events, queue.SimpleQueue)  # Queue.put can deadlock inside a handler


def test_the_early_gate_works_with_diverse_selection():
    c = SupportCollector(support_size=4, holdout_size=20, selection="diverse", window=100)
    c.start(holdout_size=5)
    assert c.needed == 9  # not the 100-row window: the early gate judges right after the drift
    c.start()
    assert c.needed == 100


@pytest.mark.parametrize("detector", ["ddm", "page_hinkley"])
def test_a_delta_for_a_detector_without_a_confidence_is_refused(detector):
    raw = {"bundle": {"path": "/b"}, "state": {"dir": "/s"},
           "streams": [{"name": "s", "features": ["x"], "label": "y"}],
           "drift": {"detector": detector, "delta": 0.01}}
    with pytest.raises(ConfigError, match="drift.delta"):
        parse_config(raw)


def test_delta_reaches_every_detector_that_has_a_confidence():
    assert DriftMonitor("kswin", delta=0.05)._error.alpha == 0.05
    assert DriftMonitor("hddm_a", kind="classification", delta=0.05)._error.drift_confidence == 0.05
    assert DriftMonitor("adwin", delta=0.05)._error.delta == 0.05


def test_the_detectors_defaults_are_the_daemons():
    m = DriftMonitor()
    assert (m.cooldown_samples, m.min_samples) == (DriftSettings.cooldown_samples,
                                                   DriftSettings.min_samples)


# -- refinement, retries, fit level and start_from, in the daemon --------------------------------------
def test_an_accepted_drift_episode_is_refined_on_more_rows_starting_from_the_serving_weights(
        tmp_path, sinusoid_bundle):
    d = start(tmp_path, sinusoid_bundle.path,
              adaptation={"support_size": 10, "holdout_size": 20, "timeout_s": 20,
                          "adapt_on_start": False, "refine": [40], "start_from": "current"})
    try:
        feed(d, "a", 1.0, 0.0, 8)
        feed(d, "b", 4.5, 2.5, 4)
        assert run_until(d, lambda: accepted(d, "sine") >= 1)
        feed(d, "c", 4.5, 2.5, 2)  # more rows: 40 support + 20 holdout complete the refinement
        assert run_until(d, lambda: len(episodes(d)) >= 2, timeout=30)
        drift, refine = episodes(d)[:2]
        assert (drift["trigger"], drift["result"]) == ("drift", "accepted")
        assert refine["trigger"] == "refine" and len(refine["support"]["y"]) == 40
        # start_from = "current": the inner loop began at the serving model (the drift episode's
        # version), so its first support loss is that model's loss on the support rows.
        sx = np.asarray(refine["support"]["x"], np.float32)
        serving = drift["version"]
        served = d.registry.load(serving)[0]
        from edgemeta.serve.predictor import Predictor, run

        live = Predictor(["CPUExecutionProvider"]).load(served, serving)
        mse = float(np.mean((run(live, d.bundle.normalize(sx))[:, 0]
                             - np.asarray(refine["support"]["y"])) ** 2))
        # The worker's losses are on standardized targets (the bundle's target scaling).
        std = (d.bundle.meta["output"].get("scaling") or {}).get("std", 1.0)
        assert refine["support_losses"][0] == pytest.approx(mse / std ** 2, rel=1e-3)
        assert d.streams.view("sine").phase == "watching"  # one refinement stage configured
    finally:
        d.shutdown(drain_s=0.5)


def test_a_rejected_drift_episode_is_retried_with_reason_retry(tmp_path, sinusoid_bundle):
    d = start(tmp_path, sinusoid_bundle.path,
              adaptation={"support_size": 10, "holdout_size": 20, "timeout_s": 20,
                          "adapt_on_start": False, "refine": [], "retries": 1,
                          "backfill": False})
    try:
        feed(d, "a", 1.0, 0.0, 4)
        d.streams.alarm("sine", "adwin")
        # A stuck label: 16 rows (early holdout) are refused, 30 more (the retry) are refused too.
        feed(d, "k", 1.0, 0.0, 1, n=46, label_fn=lambda y: np.full_like(y, 7.0))
        assert run_until(d, lambda: len(episodes(d)) >= 2, timeout=10)
        assert [(e["trigger"], e["reason"]) for e in episodes(d)] == [
            ("drift", "constant_labels"), ("retry", "constant_labels")]
        view = d.streams.view("sine")
        assert view.phase == "watching" and view.drift_active
        assert counter(d, "edgemeta_drift_active", stream="sine") == 1
    finally:
        d.shutdown(drain_s=0.5)
