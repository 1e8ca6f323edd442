"""The bundle: what meta-training ships to devices (layout in DESIGN.md).

Written atomically (a temp directory renamed into place) and only after the ONNX export has been
run with onnxruntime and matches the torch model; read back with every checksum verified, so a
truncated copy or a tampered file is refused instead of served. Nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.numpy import load_file, save_file

from edgemeta.meta.algorithms import LR_PREFIX
from edgemeta.meta.models import build_model

FORMAT_VERSION = 1
PARITY_TOLERANCE = 1e-5
FILES = ("weights.safetensors", "model.onnx")
INPUT_NAME, OUTPUT_NAME = "x", "y"


class BundleError(ValueError):
    """A bundle that cannot be trusted; the message names the file and what is wrong."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class Bundle:
    path: Path
    meta: dict[str, Any]
    weights: dict[str, np.ndarray]

    @property
    def onnx_path(self) -> Path:
        return self.path / "model.onnx"

    def network_weights(self) -> dict[str, np.ndarray]:
        """The meta-initialization without Meta-SGD's step sizes: what the ONNX graph holds."""
        return {n: w for n, w in self.weights.items() if not n.startswith(LR_PREFIX)}

    def learning_rates(self) -> dict[str, np.ndarray] | float:
        lrs = {n[len(LR_PREFIX):]: w for n, w in self.weights.items() if n.startswith(LR_PREFIX)}
        return lrs or float(self.meta["inner"]["lr"])

    def build_model(self) -> torch.nn.Module:
        model = build_model(self.meta["model"])
        state = {n: torch.from_numpy(w.copy()) for n, w in self.network_weights().items()}
        model.load_state_dict(state, strict=True)
        return model.eval()


def export_onnx(model: torch.nn.Module, in_features: int, path: Path) -> None:
    """One-time export; initializer names must equal parameter names for weight patching."""
    model = model.eval()
    example = torch.zeros(2, in_features)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), str(path), dynamo=False, export_params=True,
                          do_constant_folding=False, keep_initializers_as_inputs=False,
                          input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                          opset_version=17)
    import onnx

    graph = onnx.load(str(path))
    onnx.checker.check_model(graph)
    names = {init.name for init in graph.graph.initializer}
    missing = [n for n, _ in model.named_parameters() if n not in names]
    if missing:
        raise BundleError(f"{path}: ONNX export renamed or folded parameters {missing}; "
                          "weight patching needs initializer names equal to parameter names")


def onnx_parity(model: torch.nn.Module, onnx_path: Path, x: np.ndarray) -> float:
    """Max abs difference between torch and onnxruntime on ``x``."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = session.run([OUTPUT_NAME], {INPUT_NAME: x.astype(np.float32)})[0]
    with torch.no_grad():
        want = model.eval()(torch.from_numpy(x.astype(np.float32))).numpy()
    return float(np.max(np.abs(got - want)))


def write_bundle(path: str | Path, meta: dict[str, Any], params: dict[str, torch.Tensor],
                 probe_x: np.ndarray) -> Path:
    """Export, check parity on ``probe_x``, then write the bundle directory atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        model = build_model(meta["model"])
        net = {n: p.detach().cpu() for n, p in params.items() if not n.startswith(LR_PREFIX)}
        model.load_state_dict(net, strict=True)
        export_onnx(model, int(meta["input"]["features"]), tmp / "model.onnx")
        diff = onnx_parity(model, tmp / "model.onnx", probe_x)
        if not diff <= PARITY_TOLERANCE:
            raise BundleError(f"ONNX export differs from the torch model by {diff:.3g} "
                              f"(limit {PARITY_TOLERANCE}); refusing to write {path}")
        save_file({n: p.detach().cpu().numpy().astype(np.float32) for n, p in params.items()},
                  str(tmp / "weights.safetensors"))
        meta = {**meta, "format_version": FORMAT_VERSION, "onnx_parity_max_abs_diff": diff,
                "sha256": {f: sha256_file(tmp / f) for f in FILES}}
        (tmp / "bundle.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        for f in (*FILES, "bundle.json"):
            with (tmp / f).open("rb") as fh:
                os.fsync(fh.fileno())
        if path.exists():
            shutil.rmtree(path)
        os.rename(tmp, path)
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def read_bundle(path: str | Path) -> Bundle:
    """Load a bundle, verifying format version and every checksum first."""
    path = Path(path)
    meta_path = path / "bundle.json"
    if not meta_path.is_file():
        raise BundleError(f"{path}: not a bundle (no bundle.json)")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{meta_path}: not valid JSON: {exc}") from exc
    if meta.get("format_version") != FORMAT_VERSION:
        raise BundleError(f"{meta_path}: format_version {meta.get('format_version')!r}, "
                          f"this edgemeta reads {FORMAT_VERSION}")
    sums = meta.get("sha256", {})
    for f in FILES:
        if not (path / f).is_file():
            raise BundleError(f"{path / f}: missing from the bundle")
        if f not in sums:
            raise BundleError(f"{meta_path}: no sha256 recorded for {f}")
        actual = sha256_file(path / f)
        if actual != sums[f]:
            raise BundleError(f"{path / f}: checksum mismatch (recorded {sums[f][:12]}..., "
                              f"found {actual[:12]}...): the file is truncated or was modified")
    weights = load_file(str(path / "weights.safetensors"))
    return Bundle(path, meta, weights)
