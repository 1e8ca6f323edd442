"""Serving: weight patching, the versioned registry and the hot-swapping predictor."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading

import numpy as np
import onnxruntime as ort
import pytest
import torch

from edgemeta.serve.onnx_weights import OnnxTemplate, WeightPatchError
from edgemeta.serve.predictor import Predictor, PredictorError
from edgemeta.serve.providers import ProviderError, select_providers
from edgemeta.serve.registry import Registry, RegistryError


def test_serving_package_never_imports_torch():
    code = ("import sys, edgemeta.serve.predictor, edgemeta.serve.registry, "
            "edgemeta.serve.onnx_weights, edgemeta.serve.providers; "
            "print('torch' in sys.modules, 'edgemeta.meta' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


@pytest.fixture(scope="module")
def template(sinusoid_bundle):
    return OnnxTemplate(sinusoid_bundle.onnx_path.read_bytes(), sinusoid_bundle.network_weights())


def _run(model: bytes, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x.astype(np.float32)})[0]


def test_patched_template_answers_like_the_adapted_torch_model(sinusoid_bundle, template):
    from edgemeta.meta.adapt import adapt

    x = np.linspace(-5, 5, 7)[:, None]
    adapted = adapt(sinusoid_bundle, x, 2 * np.sin(x)).weights
    model = sinusoid_bundle.build_model()
    model.load_state_dict({n: torch.from_numpy(w) for n, w in adapted.items()})
    with torch.no_grad():
        want = sinusoid_bundle.to_user_units(model(torch.from_numpy(x.astype(np.float32))).numpy())
    got = _run(template.patch(adapted), x)
    assert np.max(np.abs(got - want)) <= 1e-5
    assert not np.allclose(got, _run(sinusoid_bundle.onnx_path.read_bytes(), x))


@pytest.mark.parametrize("mutate, message", [
    (lambda w: w.pop("head.bias"), r"missing \['head.bias'\]"),
    (lambda w: w.update(extra=np.zeros(1, np.float32)), r"unexpected \['extra'\]"),
    (lambda w: w.update({"head.bias": np.zeros(2, np.float32)}), r"'head.bias': shape \(2,\)"),
    (lambda w: w.update({"head.bias": np.zeros(1, np.float64)}), r"'head.bias': dtype float64"),
    (lambda w: w.update({"head.weight": np.full((1, 40), np.nan, np.float32)}),
     r"'head.weight': contains NaN"),
])
def test_weight_patch_refuses_mismatches_naming_the_tensor(template, mutate, message):
    weights = template.weights()
    mutate(weights)
    with pytest.raises(WeightPatchError, match=message):
        template.patch(weights)


# -- registry ------------------------------------------------------------------------------------

@pytest.fixture
def registry(tmp_path, sinusoid_bundle):
    reg = Registry(tmp_path, keep=3)
    reg.init_from_bundle(sinusoid_bundle.path)
    return reg


def test_version_one_is_the_meta_initialization(registry, sinusoid_bundle):
    data, manifest, problems = registry.load_serving()
    assert manifest.version == 1 and manifest.source == "meta-init" and not problems
    assert data == sinusoid_bundle.onnx_path.read_bytes()


def test_commit_is_versioned_with_parent_and_manifest(registry):
    m = registry.commit(b"two", source="drift", holdout={"candidate": 0.1, "current": 0.5},
                        support_size=10, stream="s1")
    assert (m.version, m.parent) == (2, 1) and registry.current_version() == 2
    saved = json.loads((registry.path(2) / "manifest.json").read_text())
    assert saved["holdout"] == {"candidate": 0.1, "current": 0.5} and saved["stream"] == "s1"


def test_corrupt_current_is_refused_and_last_good_served(registry):
    registry.commit(b"good", source="drift")
    registry.commit(b"will-be-corrupted", source="drift")
    (registry.path(3) / "model.onnx").write_bytes(b"garbage")
    data, manifest, problems = registry.load_serving()
    assert (data, manifest.version) == (b"good", 2)
    assert any("version 3" in p and "checksum mismatch" in p for p in problems)
    assert registry.current_version() == 2


def test_missing_model_file_and_missing_current(registry):
    registry.commit(b"two", source="drift")
    (registry.root / "CURRENT").unlink()
    (registry.path(2) / "model.onnx").unlink()
    data, manifest, problems = registry.load_serving()
    assert manifest.version == 1
    assert any("CURRENT is missing" in p for p in problems)
    assert any("model.onnx is missing" in p for p in problems)


def test_nothing_servable_is_an_error(tmp_path):
    with pytest.raises(RegistryError, match="no version can be served"):
        Registry(tmp_path).load_serving()


def test_a_crash_between_write_and_rename_leaves_no_trace(registry):
    leftover = registry.root / ".tmp-v000002-abc"
    leftover.mkdir()
    (leftover / "model.onnx").write_bytes(b"half")
    reopened = Registry(registry.state_dir)
    assert not leftover.exists()
    assert reopened.versions() == [1] and reopened.current_version() == 1
    assert reopened.commit(b"next", source="drift").version == 2


def test_rollback_walks_back_the_lineage(registry):
    registry.commit(b"two", source="drift")
    registry.commit(b"three", source="drift")
    back = registry.rollback()
    assert (back.version, back.source, back.parent) == (4, "rollback", 2)
    assert registry.load_serving()[0] == b"two"
    back = registry.rollback()
    assert back.parent == 1 and registry.load_serving()[2] == []
    named = registry.rollback(to=3)
    assert registry.load_serving()[0] == b"three" and named.parent == 3
    with pytest.raises(RegistryError, match="version 42 does not exist"):
        registry.rollback(to=42)


def test_retention_keeps_newest_and_the_meta_init(registry):
    for i in range(6):
        registry.commit(f"m{i}".encode(), source="drift")
    assert registry.versions() == [1, 5, 6, 7]


def test_models_cli_lists_and_rolls_back(registry):
    registry.commit(b"two", source="manual")
    cmd = [sys.executable, "-m", "edgemeta", "models"]
    out = subprocess.run([*cmd, "list", "--state", str(registry.state_dir), "--json"],
                         capture_output=True, text=True, check=True)
    rows = json.loads(out.stdout)
    assert [(r["version"], r["current"]) for r in rows] == [(1, False), (2, True)]
    out = subprocess.run([*cmd, "rollback", "--state", str(registry.state_dir)],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "now serving v3 (rollback to v1)" in out.stdout
    out = subprocess.run([*cmd, "rollback", "--state", str(registry.state_dir), "--to", "9"],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "version 9 does not exist" in out.stderr


# -- predictor -----------------------------------------------------------------------------------

def test_predict_before_any_model_is_an_error():
    with pytest.raises(PredictorError, match="no model"):
        Predictor(["CPUExecutionProvider"]).predict(np.zeros((1, 1)))


def test_bad_model_is_refused_and_the_old_one_keeps_serving(sinusoid_bundle):
    predictor = Predictor(["CPUExecutionProvider"])
    predictor.swap(sinusoid_bundle.onnx_path.read_bytes(), 1)
    with pytest.raises(PredictorError, match="version 2 refused"):
        predictor.swap(b"not an onnx model", 2)
    assert predictor.predict(np.zeros((3, 1)))[1] == 1


def test_unknown_provider_is_a_config_error():
    with pytest.raises(ProviderError, match="NopeExecutionProvider"):
        select_providers(["NopeExecutionProvider"])


@pytest.mark.skipif("CUDAExecutionProvider" not in ort.get_available_providers(),
                    reason="this onnxruntime build has no CUDA provider to fail")
def test_gpu_provider_that_cannot_start_falls_back_to_cpu(sinusoid_bundle, caplog):
    import os

    if os.path.exists("/dev/nvidia0"):
        pytest.skip("a real GPU is present; the fallback path is not reachable")
    predictor = Predictor(["CUDAExecutionProvider"])
    with caplog.at_level(logging.WARNING, logger="edgemeta.providers"):
        predictor.swap(sinusoid_bundle.onnx_path.read_bytes(), 1)
    assert predictor.provider == "CPUExecutionProvider"
    assert any("CPU" in r.getMessage() for r in caplog.records)


def test_every_answer_matches_the_version_it_reports_during_swaps(sinusoid_bundle, template):
    """Version v serves the meta-init plus v on the output bias: answers identify their model."""
    base = template.weights()
    x = np.linspace(-4, 4, 16, dtype=np.float32)[:, None]
    reference = _run(template.patch(base), x)
    # +1 on the output bias is +std in the user's units when the bundle scales its targets.
    step = float(sinusoid_bundle.to_user_units(1.0) - sinusoid_bundle.to_user_units(0.0))
    models = {}
    for v in range(1, 41):
        w = dict(base)
        w["head.bias"] = base["head.bias"] + np.float32(v)
        models[v] = template.patch(w)
    predictor = Predictor(["CPUExecutionProvider"], intra_op_threads=1)
    predictor.swap(models[1], 1)
    stop = threading.Event()
    errors, answers = [], [0]

    def client():
        while not stop.is_set():
            try:
                y, version = predictor.predict(x)
                if not np.allclose(y - reference, step * version, atol=1e-3):
                    errors.append(f"answer does not match v{version}")
                answers[0] += 1
            except Exception as exc:  # noqa: BLE001 - any failure is a test failure
                errors.append(repr(exc))

    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    for _ in range(5):
        for v in range(1, 41):
            predictor.swap(models[v], v)
    stop.set()
    for t in threads:
        t.join()
    assert not errors, errors[:5]
    assert answers[0] > 100 and predictor.version == 40


def test_a_newly_shipped_bundle_becomes_a_new_meta_init_version(registry, sinusoid_bundle, tmp_path):
    import hashlib

    registry.commit(b"adapted", source="drift")
    registry.init_from_bundle(sinusoid_bundle.path)  # same bundle again: nothing changes
    assert registry.versions() == [1, 2] and registry.current_version() == 2
    shipped = tmp_path / "new-bundle"
    shipped.mkdir()
    (shipped / "model.onnx").write_bytes(b"new graph")
    (shipped / "bundle.json").write_text(json.dumps(
        {"sha256": {"model.onnx": hashlib.sha256(b"new graph").hexdigest()}}))
    manifest = registry.init_from_bundle(shipped)
    assert (manifest.version, manifest.source) == (3, "meta-init")
    assert registry.load_serving()[0] == b"new graph"
    (shipped / "model.onnx").write_bytes(b"tampered")
    with pytest.raises(RegistryError, match="checksum does not match bundle.json"):
        registry.init_from_bundle(shipped)
