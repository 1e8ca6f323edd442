from __future__ import annotations

import numpy as np
import pytest

from edgemeta.meta.bundle import read_bundle
from edgemeta.meta.tasks import SinusoidTasks
from edgemeta.meta.train import TrainSettings, save_bundle, train


@pytest.fixture(scope="session")
def sinusoid_bundle(tmp_path_factory):
    """A small MAML sinusoid bundle shared by the tests that only read bundles."""
    settings = TrainSettings(algorithm="maml", iterations=300, val_every=100, seed=0, device="cpu")
    result = train(settings, SinusoidTasks(shots=5, queries=10))
    return read_bundle(save_bundle(result, tmp_path_factory.mktemp("bundles") / "sinusoid"))


@pytest.fixture(scope="session")
def digits_npz(tmp_path_factory):
    from sklearn.datasets import load_digits

    d = load_digits()
    path = tmp_path_factory.mktemp("data") / "digits.npz"
    np.savez(path, X=d.data.astype(np.float32), y=d.target)
    return path
