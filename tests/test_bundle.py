"""The bundle round-trips, its ONNX graph matches torch, and a damaged bundle is refused."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from edgemeta.meta.bundle import BundleError, read_bundle


def test_bundle_round_trip_and_onnx_parity(sinusoid_bundle):
    meta = sinusoid_bundle.meta
    assert meta["algorithm"] == "maml" and meta["inner"] == {
        "steps": 1, "lr": 0.01, "adapts": "all", "learned_lr": False}
    assert meta["onnx_parity_max_abs_diff"] <= 1e-5
    model = sinusoid_bundle.build_model()
    x = np.linspace(-5, 5, 101, dtype=np.float32)[:, None]
    session = ort.InferenceSession(str(sinusoid_bundle.onnx_path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"x": x})[0]
    with torch.no_grad():
        want = sinusoid_bundle.to_user_units(model(torch.from_numpy(x)).numpy())
    assert np.max(np.abs(got - want)) <= 1e-5


def test_onnx_initializer_names_equal_parameter_names(sinusoid_bundle):
    graph = onnx.load(str(sinusoid_bundle.onnx_path)).graph
    names = {init.name for init in graph.initializer}
    assert set(sinusoid_bundle.network_weights()) <= names


@pytest.fixture
def copy_of(sinusoid_bundle, tmp_path):
    path = tmp_path / "bundle"
    shutil.copytree(sinusoid_bundle.path, path)
    return path


def test_tampered_weights_are_refused(copy_of):
    data = bytearray((copy_of / "weights.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (copy_of / "weights.safetensors").write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"weights.safetensors: checksum mismatch"):
        read_bundle(copy_of)


def test_truncated_onnx_is_refused(copy_of):
    onnx_path = copy_of / "model.onnx"
    onnx_path.write_bytes(onnx_path.read_bytes()[:100])
    with pytest.raises(BundleError, match=r"model.onnx: checksum mismatch"):
        read_bundle(copy_of)


def test_missing_file_and_bad_json_are_refused(copy_of):
    (copy_of / "model.onnx").unlink()
    with pytest.raises(BundleError, match=r"model.onnx: missing"):
        read_bundle(copy_of)
    (copy_of / "bundle.json").write_text("{not json")
    with pytest.raises(BundleError, match=r"bundle.json: not valid JSON"):
        read_bundle(copy_of)


def test_unknown_format_version_is_refused(copy_of):
    meta = json.loads((copy_of / "bundle.json").read_text())
    meta["format_version"] = 99
    (copy_of / "bundle.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="format_version 99"):
        read_bundle(copy_of)


def test_not_a_bundle(tmp_path):
    with pytest.raises(BundleError, match="no bundle.json"):
        read_bundle(tmp_path)
