"""No single file, trigger, damaged registry or full disk stops the daemon."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgemeta.config import load_config
from edgemeta.daemon.metrics import Metrics
from edgemeta.daemon.runtime import Daemon
from edgemeta.serve.onnx_weights import OnnxTemplate
from edgemeta.serve.registry import Registry
from tests.conftest import MISSING_TOOL, counter, feed, inbox, run_until, write_config


def start(tmp_path, bundle, **sections) -> Daemon:
    cfg = write_config(tmp_path, bundle, metrics={"enabled": False}, **sections)
    d = Daemon(load_config(cfg), metrics=Metrics())
    d.setup()
    return d


@pytest.fixture
def daemon(tmp_path, sinusoid_bundle):
    d = start(tmp_path, sinusoid_bundle.path)
    assert d.adapter.wait_ready(120)
    yield d
    d.shutdown(drain_s=0.5)


def foreign_model() -> bytes:
    """A valid ONNX model that is not the bundle's graph (one MatMul, same input width)."""
    w = numpy_helper.from_array(np.ones((1, 1), np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 1])],
                              [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def adapted_model(bundle) -> bytes:
    template = OnnxTemplate(bundle.onnx_path.read_bytes(), bundle.network_weights())
    return template.patch({n: w * 0.5 for n, w in bundle.network_weights().items()})


# -- start-up on a damaged registry ----------------------------------------------------------------
def test_a_foreign_model_with_a_matching_checksum_is_refused_and_the_previous_version_serves(
        tmp_path, sinusoid_bundle):
    registry = Registry(tmp_path / "state")
    registry.init_from_bundle(sinusoid_bundle.path)
    registry.commit(adapted_model(sinusoid_bundle), source="drift")
    registry.commit(foreign_model(), source="drift")  # its manifest checksum matches: it is "valid"
    d = start(tmp_path, sinusoid_bundle.path)
    try:
        assert d.models.version("sine") == 2 and registry.current_version("sine") == 2
        assert counter(d, "edgemeta_model_load_failures_total") == 1
    finally:
        d.shutdown(drain_s=0.1)


def test_with_every_version_corrupt_the_bundles_meta_initialization_serves_again(
        tmp_path, sinusoid_bundle):
    registry = Registry(tmp_path / "state")
    registry.init_from_bundle(sinusoid_bundle.path)
    registry.commit(adapted_model(sinusoid_bundle), source="drift")
    for version in registry.versions():
        (registry.path(version) / "model.onnx").write_bytes(b"garbage")
    d = start(tmp_path, sinusoid_bundle.path)
    try:
        assert d.models.version("sine") == 3 and d.models.of("sine").manifest.source == "meta-init"
        assert "no stored version was usable" in d.models.of("sine").manifest.note
        data, _ = registry.load(3)
        assert data == sinusoid_bundle.onnx_path.read_bytes()
    finally:
        d.shutdown(drain_s=0.1)


def test_a_missing_current_is_not_reported_as_a_refused_model(tmp_path, sinusoid_bundle, caplog):
    registry = Registry(tmp_path / "state")
    registry.init_from_bundle(sinusoid_bundle.path)
    (registry.root / "CURRENT").unlink()
    with caplog.at_level(logging.INFO):
        d = start(tmp_path, sinusoid_bundle.path)
    try:
        assert d.models.version("sine") == 1
        assert "model refused" not in caplog.text, caplog.text
        assert "CURRENT.sine is missing" in caplog.text
        assert counter(d, "edgemeta_model_load_failures_total") == 0
    finally:
        d.shutdown(drain_s=0.1)


def test_a_truncated_bundle_stops_the_start_with_one_line_naming_the_file(tmp_path, sinusoid_bundle):
    bundle = tmp_path / "bundle"
    shutil.copytree(sinusoid_bundle.path, bundle)
    weights = bundle / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    cfg = write_config(tmp_path, bundle)
    proc = subprocess.run([sys.executable, "-P", "-m", "edgemeta", "run", "--config", str(cfg)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "weights.safetensors" in line]
    assert errors and "truncated or was modified" in errors[-1]


def test_temp_files_left_by_a_kill_are_removed_at_start_and_producers_temp_files_are_not(
        tmp_path, sinusoid_bundle):
    state = tmp_path / "state"
    leftovers = [state / "outbox" / "sine" / ".a.csv.predictions.jsonl.k2j3h4.tmp",
                 state / "episodes" / ".20261124-x.json.abcdefgh.tmp",
                 state / "quarantine" / "sine" / ".b.csv.error.json.zz.tmp",
                 state / ".status.json.q1w2e3.tmp"]
    for path in leftovers:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("half")
    producer = state / "inbox" / "sine" / ".still-writing.csv.tmp"
    producer.parent.mkdir(parents=True, exist_ok=True)
    producer.write_text("id,x\n")
    d = start(tmp_path, sinusoid_bundle.path)
    try:
        assert not any(p.exists() for p in leftovers)
        assert producer.exists()
    finally:
        d.shutdown(drain_s=0.1)


def test_state_files_are_group_readable(daemon):
    feed(daemon, "g", 1.0, 0.0, 1)
    out = daemon.layout.dir("outbox", "sine") / "g000.csv.predictions.jsonl"
    assert out.stat().st_mode & 0o040
    daemon.write_status()
    assert (daemon.settings.state_dir / "status.json").stat().st_mode & 0o040


# -- triggers --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, body", [
    ("adapt-deep.json", b"[" * 60000),
    ("rollback-big.json", b'{"version": ' + b"9" * 4400 + b"}"),
    ("adapt-nul.json", b'{"support": "a\\u0000b"}'),
    ("adapt-" + "x" * 240 + ".json", b""),
])
def test_a_hostile_trigger_is_rejected_and_moved_to_done(daemon, name, body):
    triggers = daemon.settings.state_dir / "triggers"
    (triggers / name).write_bytes(body)
    assert run_until(daemon, lambda: not (triggers / name).exists(), timeout=5)
    results = [json.loads(p.read_text()) for p in (triggers / "done").glob("*.result.json")]
    assert len(results) == 1 and results[0]["trigger"] == name
    assert results[0]["result"] in ("rejected", "ok")
    if body:
        assert results[0]["result"] == "rejected" and results[0]["reason"] == "malformed"
    feed(daemon, "after", 1.0, 0.0, 1)  # still serving


def test_directories_and_fifos_in_inbox_and_triggers_are_reported(daemon):
    triggers = daemon.settings.state_dir / "triggers"
    (triggers / "adapt-dir").mkdir()
    os.mkfifo(triggers / "reload-fifo")
    (inbox(daemon) / "folder.csv").mkdir()
    assert run_until(daemon, lambda: not any(p.name != "done" for p in triggers.iterdir())
                     and not any(inbox(daemon).iterdir()), timeout=10)
    reasons = sorted(json.loads(p.read_text())["reason"]
                     for p in (triggers / "done").glob("*.result.json"))
    assert reasons == ["not_regular", "not_regular"]
    error = json.loads((daemon.layout.dir("quarantine", "sine") / "folder.csv.error.json").read_text())
    assert error["reason"] == "not_regular"


def test_an_unexpected_error_quarantines_the_file_as_internal_error(daemon, monkeypatch):
    def explode(*_args, **_kw):
        raise ZeroDivisionError("boom")

    monkeypatch.setattr(daemon.inbox, "_data", explode)
    (inbox(daemon) / "x.csv").write_text("id,x\n1,0.5\n")
    assert run_until(daemon, lambda: not any(inbox(daemon).iterdir()), timeout=5)
    error = json.loads((daemon.layout.dir("quarantine", "sine") / "x.csv.error.json").read_text())
    assert error["reason"] == "internal_error" and "ZeroDivisionError: boom" in error["message"]
    assert counter(daemon, "edgemeta_internal_errors_total", where="ingest") == 1


# -- a full disk -----------------------------------------------------------------------------------
@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)],
                          capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"{MISSING_TOOL}tmpfs mount (needs root): " + proc.stderr.decode().strip())
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_pauses_ingest_and_it_resumes_by_itself(tmp_path, sinusoid_bundle, small_disk):
    cfg = write_config(tmp_path, sinusoid_bundle.path, metrics={"enabled": False},
                       state={"dir": str(small_disk / "state")})
    d = Daemon(load_config(cfg), metrics=Metrics())
    d.setup()
    d.degraded.backoff = (0.2, 0.5)
    try:
        feed_file = _csv(inbox(d) / "f.csv")  # arrives just as the disk fills up
        filler = small_disk / "filler"
        with filler.open("wb") as fh:  # fill the disk to the last block
            try:
                while True:
                    fh.write(b"\0" * 65536)
                    fh.flush()
            except OSError:
                pass
        assert run_until(d, lambda: d.degraded.active, timeout=10)
        assert counter(d, "edgemeta_degraded", reason="disk_full") == 1
        assert feed_file.exists()  # nothing quarantined, nothing lost
        assert not any(d.layout.dir("quarantine", "sine").iterdir())
        assert "DEGRADED" in d.summary()
        filler.unlink()
        assert run_until(d, lambda: not feed_file.exists(), timeout=10)
        assert (d.layout.dir("processed", "sine") / "f.csv").is_file()
        assert counter(d, "edgemeta_degraded", reason="disk_full") == 0
        assert d.registry.versions() == [1] and d.registry.current_version() == 1
    finally:
        d.shutdown(drain_s=0.1)


def _csv(path):
    x = np.linspace(-5, 5, 200)
    path.write_text("id,x,y\n" + "".join(f"r{i},{a},{np.sin(a)}\n" for i, a in enumerate(x)))
    return path


# -- adaptation sanity -----------------------------------------------------------------------------
def test_constant_labels_after_a_drift_are_not_adapted_on(daemon):
    feed(daemon, "a", 2.0, 0.5, 6)
    assert run_until(daemon, lambda: True, timeout=0.1)
    feed(daemon, "k", 2.0, 0.5, 4, label_fn=lambda y: np.full_like(y, 3.0))
    assert run_until(daemon, lambda: counter(daemon, "edgemeta_adaptations_total", stream="sine",
                                             result="rejected") >= 1, timeout=20)
    episodes = [json.loads(p.read_text())
                for p in (daemon.settings.state_dir / "episodes").glob("*.json")]
    assert any(e["reason"] == "constant_labels" for e in episodes)
    assert daemon.models.version("sine") == 1


def test_a_swapped_version_that_the_next_labels_of_its_regime_show_worse_is_rolled_back(daemon):
    """A version the gate was fooled into (here: a deliberately broken copy of v1, promoted
    through the one promotion path as a lucky candidate would be) meets the next labelled rows
    of the regime it was judged on: v1 errs on them as it did before, v2 clearly worse, so v1
    serves again. (Labels of *another* task after a swap are a change of the world, a drift,
    not a verdict on v2: tests/test_control_loop_paths.py.)"""
    rng = np.random.default_rng(0)
    x = rng.uniform(-5, 5, (40, 1))
    y = np.sin(x[:, 0])
    predictions, _ = daemon.feed("sine", x, y)
    level = float(np.mean((np.asarray(predictions) - y) ** 2))
    served = daemon.models.of("sine")
    broken = {name: w * 1.7 for name, w in served.weights.items()}
    model = daemon.models.template.patch(broken)
    live = served.predictor.load(model, 0)
    manifest = daemon.streams.promotion.promote("sine", model, live, broken, source="manual",
                                                previous_level=level)
    assert manifest.version == 2
    x = rng.uniform(-5, 5, (30, 1))
    daemon.feed("sine", x, np.sin(x[:, 0]))  # the same task goes on
    assert daemon.models.version("sine") == 3
    manifest = daemon.registry.manifest(3)
    assert manifest.source == "rollback" and manifest.parent == 1
    assert "automatic rollback" in manifest.note and "worse than v1" in manifest.note
    assert daemon.registry.load(3)[0] == daemon.registry.load(1)[0]
    assert counter(daemon, "edgemeta_rollbacks_total", stream="sine") == 1
    assert onnx.load_from_string(daemon.registry.load(3)[0]) is not None


def test_a_reload_applies_new_ingest_limits(daemon):
    source = daemon.settings.source
    source.write_text(source.read_text().replace("[ingest]", "[ingest]\nmax_line_bytes = 64", 1))
    daemon.reload()
    assert daemon.inbox.limits.max_line_bytes == 64
    (inbox(daemon) / "wide.csv").write_text("id,x,y\n1,0.5," + "1" * 80 + "\n")
    assert run_until(daemon, lambda: not any(inbox(daemon).iterdir()), timeout=5)
    error = json.loads((daemon.layout.dir("quarantine", "sine") / "wide.csv.error.json").read_text())
    assert error["reason"] == "too_long"
