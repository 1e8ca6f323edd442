"""adapt() runs the trained inner loop and refuses to return diverged weights."""

from __future__ import annotations

import numpy as np
import pytest

from edgemeta.meta.adapt import AdaptationFailed, Adapter, adapt
from edgemeta.meta.bundle import read_bundle
from edgemeta.meta.tasks import SinusoidTasks
from edgemeta.meta.train import TrainSettings, save_bundle, train


def _support(seed=0, k=5):
    rng = np.random.default_rng(seed)
    x = rng.uniform(-5, 5, size=(k, 1))
    return x, 3.0 * np.sin(x - 1.0)


def test_adapt_uses_the_bundles_trained_steps_and_lowers_support_loss(sinusoid_bundle):
    x, y = _support()
    result = adapt(sinusoid_bundle, x, y)
    assert result.steps == sinusoid_bundle.meta["inner"]["steps"] == 1
    assert len(result.support_losses) == 2 and result.support_losses[1] < result.support_losses[0]
    assert set(result.weights) == set(sinusoid_bundle.network_weights())
    changed = [n for n, w in result.weights.items()
               if not np.allclose(w, sinusoid_bundle.weights[n])]
    assert changed, "adaptation left every weight unchanged"


def test_adapt_can_start_from_the_serving_weights(sinusoid_bundle):
    x, y = _support()
    adapter = Adapter(sinusoid_bundle)
    first = adapter.adapt(x, y)
    second = adapter.adapt(x, y, init=first.weights)
    assert second.support_losses[0] == pytest.approx(first.support_losses[-1], rel=1e-5)


def test_too_large_a_step_is_reported_as_failed_not_returned(sinusoid_bundle):
    x, y = _support()
    adapter = Adapter(sinusoid_bundle)
    trained_lr = adapter.bundle.meta["inner"]["lr"]  # the bundle is shared by the whole session
    try:
        adapter.bundle.meta["inner"]["lr"] = 5.0  # a step size far beyond what was meta-trained
        adapter.learner_.inner_lr = 5.0
        with pytest.raises(AdaptationFailed, match="support loss (rose|became non-finite)"):
            adapter.adapt(x, y, steps=20)
    finally:
        adapter.bundle.meta["inner"]["lr"] = trained_lr


def test_metasgd_run_past_its_trained_steps_with_diverging_step_sizes_fails(tmp_path):
    tasks = SinusoidTasks()
    settings = TrainSettings(algorithm="metasgd", iterations=50, val_every=25, device="cpu")
    bundle = read_bundle(save_bundle(train(settings, tasks), tmp_path / "msgd"))
    for name in list(bundle.weights):
        if name.startswith("metasgd_lr."):
            bundle.weights[name] = np.full_like(bundle.weights[name], 3.0)
    with pytest.raises(AdaptationFailed):
        adapt(bundle, *_support(), steps=50)


@pytest.mark.parametrize("x, y, message", [
    (np.zeros((5, 2)), np.zeros(5), r"shape \(5, 2\); the bundle expects \(K, 1\)"),
    (np.zeros((5, 1)), np.zeros(4), "5 rows of x and 4 labels"),
    (np.full((5, 1), np.nan), np.zeros(5), "NaN or infinite"),
])
def test_unusable_support_sets_are_refused(sinusoid_bundle, x, y, message):
    with pytest.raises(AdaptationFailed, match=message):
        adapt(sinusoid_bundle, x, y)
