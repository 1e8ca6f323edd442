"""The bundle: what meta-training ships to devices (layout in docs/design.md).

Written atomically (a temp directory renamed into place) and only after the ONNX export has been
run with onnxruntime and matches the torch model; read back with every checksum verified, so a
truncated copy or a tampered file is refused instead of served. Nothing is unpickled.
"""

from __future__ import annotations

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

from edgemeta.bundle_format import (
    FILES,
    FORMAT_VERSION,
    LR_PREFIX,
    BundleFormatError,
    read_verified_meta,
    sha256_file,
)
from edgemeta.meta.models import build_model

PARITY_TOLERANCE = 1e-5
INPUT_NAME, OUTPUT_NAME = "x", "y"


class BundleError(BundleFormatError):
    """A bundle that cannot be trusted; the message names the file and what is wrong."""


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

    def to_user_units(self, out: np.ndarray) -> np.ndarray:
        """The network's raw output as ``model.onnx`` gives it: regression targets scaled back
        from the standardized ones it was trained on (identity without a scaling)."""
        scaling = self.meta["output"].get("scaling")
        return out * scaling["std"] + scaling["mean"] if scaling else out

    def build_model(self) -> torch.nn.Module:
        """The network in torch, whose outputs are standardized targets for a bundle with a
        target scaling (:meth:`to_user_units`)."""
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


def append_output_scaling(path: Path, mean: float, std: float) -> None:
    """Fold the target scaling into the exported graph: ``output * std + mean``.

    The constants are initializers the weight patcher never touches (it patches only the
    network's parameters), so every adapted version keeps them and serves in the user's units.
    """
    import onnx
    from onnx import helper, numpy_helper

    proto = onnx.load(str(path))
    graph = proto.graph
    raw = f"{OUTPUT_NAME}_standardized"
    for node in graph.node:
        node.output[:] = [raw if o == OUTPUT_NAME else o for o in node.output]
    graph.initializer.extend([
        numpy_helper.from_array(np.asarray([std], np.float32), "edgemeta_target_std"),
        numpy_helper.from_array(np.asarray([mean], np.float32), "edgemeta_target_mean")])
    graph.node.extend([
        helper.make_node("Mul", [raw, "edgemeta_target_std"], [f"{raw}_times_std"]),
        helper.make_node("Add", [f"{raw}_times_std", "edgemeta_target_mean"], [OUTPUT_NAME])])
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))


def onnx_parity(model: torch.nn.Module, onnx_path: Path, x: np.ndarray,
                scaling: dict[str, float] | None = None) -> float:
    """Max abs difference between torch (with the target scaling) and onnxruntime on ``x``."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = session.run([OUTPUT_NAME], {INPUT_NAME: x.astype(np.float32)})[0]
    with torch.no_grad():
        want = model.eval()(torch.from_numpy(x.astype(np.float32))).numpy()
    if scaling:
        want = want * scaling["std"] + scaling["mean"]
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
        scaling = meta["output"].get("scaling")
        if scaling:
            append_output_scaling(tmp / "model.onnx", scaling["mean"], scaling["std"])
        diff = onnx_parity(model, tmp / "model.onnx", probe_x, scaling)
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
    try:
        meta = read_verified_meta(path)
    except BundleFormatError as exc:
        raise BundleError(str(exc)) from exc
    weights = load_file(str(path / "weights.safetensors"))
    return Bundle(path, meta, weights)
