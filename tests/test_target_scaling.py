"""Regression targets are standardized in meta-training and scaled back in the exported model, so a
task family far from zero mean and unit spread trains, adapts and serves in the user's units."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort

from edgemeta.meta.adapt import Adapter
from edgemeta.meta.bundle import read_bundle
from edgemeta.meta.tasks import TaskFolderTasks
from edgemeta.meta.train import TrainSettings, save_bundle, train
from edgemeta.serve.onnx_weights import OnnxTemplate


def offset_task_folder(root, n_tasks=12, rows=60, seed=0):
    """Linear tasks whose targets sit around 15 with spread ~5 (a sensor in its own units)."""
    rng = np.random.default_rng(seed)
    root.mkdir()
    for i in range(n_tasks):
        x = rng.uniform(-1, 1, size=(rows, 3))
        w = rng.normal(0, 1, 3)
        y = 15 + 3 * x @ w + rng.normal(0, 0.1, rows)
        np.savez(root / f"task{i:02d}.npz", X=x, y=y)
    return root


def predict(model_bytes: bytes, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.astype(np.float32)})[0][:, 0]


def test_a_bundle_for_offset_targets_serves_and_adapts_in_the_users_units(tmp_path):
    tasks = TaskFolderTasks(offset_task_folder(tmp_path / "tasks"), kind="regression", shots=10,
                            queries=10)
    result = train(TrainSettings(algorithm="maml", iterations=300, val_every=100, seed=0,
                                 inner_lr=0.1, device="cpu", tasks=tasks.describe()), tasks)
    path = save_bundle(result, tmp_path / "bundle")
    meta = json.loads((path / "bundle.json").read_text())
    scaling = meta["output"]["scaling"]
    assert 13 < scaling["mean"] < 17 and 1 < scaling["std"] < 8

    rng = np.random.default_rng(1)
    x = rng.uniform(-1, 1, size=(60, 3))
    y = 15 + 3 * x @ rng.normal(0, 1, 3)
    norm = meta["input"]["normalization"]
    xn = (x - np.asarray(norm["mean"])) / np.asarray(norm["std"])
    model = (path / "model.onnx").read_bytes()
    before = np.mean((predict(model, xn) - y) ** 2)
    # Unscaled, a zero-centred network would be off by ~15^2 = 225 before any step.
    assert before < 4 * np.var(y) + 1

    adapted = Adapter(read_bundle(path)).adapt(x[:20], y[:20], steps=20)
    patched = OnnxTemplate(model, read_bundle(path).network_weights()).patch(adapted.weights)
    after = np.mean((predict(patched, xn[20:]) - y[20:]) ** 2)
    assert after < 0.5 * np.mean((predict(model, xn[20:]) - y[20:]) ** 2)


def test_unit_scale_targets_are_trained_as_they_are_so_the_inner_lr_keeps_its_meaning(tmp_path):
    """The MAML paper's sinusoid (targets within +-5, std about 2) is not standardized: one
    inner step of the bundle is one SGD step of --inner-lr on the MSE in the user's units, as
    published. Standardizing it made each step about 4x smaller (issue 26)."""
    import torch

    from edgemeta.meta.tasks import SinusoidTasks

    result = train(TrainSettings(algorithm="maml", iterations=20, val_every=10, seed=0,
                                 inner_lr=0.01, device="cpu"), SinusoidTasks(shots=5, queries=10))
    bundle = read_bundle(save_bundle(result, tmp_path / "sine"))
    assert bundle.meta["output"]["scaling"] is None and bundle.meta["inner"]["lr"] == 0.01
    rng = np.random.default_rng(0)
    x = rng.uniform(-5, 5, (5, 1)).astype(np.float32)
    y = (3.0 * np.sin(x[:, 0] - 1.0)).astype(np.float32)
    adapted = Adapter(bundle).adapt(x, y, steps=1).weights
    model = bundle.build_model()
    params = {n: torch.tensor(w, requires_grad=True) for n, w in bundle.network_weights().items()}
    out = torch.func.functional_call(model, params, (torch.as_tensor(x),))
    loss = ((out[:, 0] - torch.as_tensor(y)) ** 2).mean()
    grads = torch.autograd.grad(loss, list(params.values()))
    for (name, p), g in zip(params.items(), grads, strict=True):
        np.testing.assert_allclose(adapted[name], (p - 0.01 * g).detach().numpy(), atol=1e-5)
