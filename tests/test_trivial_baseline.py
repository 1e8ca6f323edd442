"""The serving model is held to the tests its challengers are held to: worse than a constant is
an alarm, and a candidate that beats such a model is not refused for not beating the constant."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgemeta.bench.stream import daemon_config
from edgemeta.config import load_config
from edgemeta.daemon.gate import evaluate, row_losses
from edgemeta.daemon.metrics import Metrics
from edgemeta.daemon.runtime import Daemon
from edgemeta.meta.bundle import read_bundle, write_bundle
from edgemeta.meta.tasks import HyperplaneTasks
from edgemeta.meta.train import TrainSettings, save_bundle, train
from edgemeta.stream.trivial import TrivialCheck
from tests.conftest import counter


@pytest.fixture(scope="module")
def confident_binary_bundle(tmp_path_factory):
    """A 2-d hyperplane MAML bundle whose meta-initialization is made sure of its answers (its
    output layer times 8): a model that is confidently wrong on half of a stream, as the
    recalled model of the Agrawal report was."""
    root = tmp_path_factory.mktemp("binary")
    result = train(TrainSettings(algorithm="maml", iterations=300, val_every=100, seed=0,
                                 device="cpu"), HyperplaneTasks(shots=10, queries=20))
    base = read_bundle(save_bundle(result, root / "base"))
    last = sorted(n for n in base.weights if n.endswith(".weight"))[-1].rsplit(".", 1)[0]
    params = {n: torch.as_tensor(w * (8.0 if n.startswith(last + ".") else 1.0))
              for n, w in base.weights.items()}
    probe = np.random.default_rng(0).uniform(-1, 1, (64, 2)).astype(np.float32)
    return read_bundle(write_bundle(root / "confident", base.meta, params, probe))


def predicted(bundle, x: np.ndarray) -> np.ndarray:
    model = bundle.build_model()
    with torch.no_grad():
        return model(torch.as_tensor(x, dtype=torch.float32)).argmax(1).numpy()


def rule_at_error(bundle, error: float, rng) -> np.ndarray:
    """A hyperplane through the origin (balanced labels) on which the bundle's meta-init errs
    about ``error`` of the time."""
    x = rng.uniform(-1, 1, (4000, 2))
    pred = predicted(bundle, x)
    angles = np.linspace(0, 2 * np.pi, 720, endpoint=False)
    errs = [np.mean(pred != (x @ [np.cos(a), np.sin(a)] > 0)) for a in angles]
    a = angles[int(np.argmin(np.abs(np.asarray(errs) - error)))]
    return np.array([np.cos(a), np.sin(a)])


def test_a_serving_model_worse_than_the_majority_class_is_replaced(tmp_path,
                                                                   confident_binary_bundle):
    """A balanced binary stream served at about 0.55 error (the majority class errs 0.50): the
    error detector's baseline is that error from the first row, so it never alarms; the
    trivial-predictor check does, a collection opens, and the candidate that beats the
    serving model is served although the serving model never beat the constant."""
    bundle = confident_binary_bundle
    rng = np.random.default_rng(1)
    w = rule_at_error(bundle, 0.55, rng)
    x = rng.uniform(-1, 1, (900, 2))
    y = (x @ w > 0).astype(np.int64)
    assert 0.52 <= np.mean(predicted(bundle, x) != y) <= 0.58
    cfg = daemon_config(tmp_path, bundle.path, 2, adapt_on_start=False, refine=[],
                        sections={"continual": {"enabled": False}})
    daemon = Daemon(load_config(cfg), metrics=Metrics())
    daemon.setup()
    errors = []
    try:
        assert daemon.adapter.wait_ready(120)
        for lo in range(0, len(y), 20):
            pred, _ = daemon.feed("s", x[lo:lo + 20], y[lo:lo + 20])
            errors += list(np.asarray(pred) != y[lo:lo + 20])
            assert daemon.drain(60)
        view = daemon.streams.view("s")
    finally:
        daemon.shutdown(drain_s=0.5)
    assert counter(daemon, "edgemeta_drift_detections_total", stream="s", detector="trivial") >= 1
    assert view.worse_than_trivial >= 1 and view.version > 1
    assert counter(daemon, "edgemeta_adaptations_total", stream="s", result="accepted") >= 1
    assert np.mean(errors[-200:]) < 0.45, np.mean(errors[-200:])


def test_a_model_as_good_as_the_labels_allow_never_alarms():
    """A long stable stream served by a model that is right but noisy: no look of the check
    finds it worse than the constant (the false-alarm side of the threshold)."""
    rng = np.random.default_rng(2)
    check = TrivialCheck("classification", classes=2)
    alarms = 0
    for _ in range(20_000):
        y = int(rng.random() < 0.5)
        right = rng.random() < 0.8
        logits = np.array([0.0, 1.5]) if (y == 1) == right else np.array([1.5, 0.0])
        loss = row_losses("classification", logits[None], np.array([y]))[0]
        alarms += check.update(loss, y, version=1)
    assert alarms == 0


def test_a_candidate_that_beats_a_skill_less_serving_model_is_not_refused_as_no_signal(
        confident_binary_bundle):
    """The gate's ``no_signal`` rule refuses candidates that learned nothing; it used to refuse
    one that beat, by the paired test, a serving model which itself did worse than the constant
    (here: the same answers as the serving model, 12 of 20 wrong, but less sure of them)."""
    from edgemeta.bundle_format import read_bundle_info
    from edgemeta.serve.onnx_weights import OnnxTemplate
    from edgemeta.serve.predictor import Predictor

    bundle = confident_binary_bundle
    info = read_bundle_info(bundle.path)
    rng = np.random.default_rng(3)
    pool = rng.uniform(-1, 1, (4000, 2)).astype(np.float32)
    with torch.no_grad():
        logits = bundle.build_model()(torch.as_tensor(pool)).numpy()
    margin = np.abs(logits[:, 1] - logits[:, 0])
    x = pool[(margin > 1.2) & (margin < 2.0)][:20]  # sure of its answers, not certain
    pred = predicted(bundle, x)
    y = np.where(np.arange(20) < 12, 1 - pred, pred)  # 12 of 20 wrong
    template = OnnxTemplate(bundle.onnx_path.read_bytes(), info.parameter_names)
    predictor = Predictor()
    serving = predictor.load(bundle.onnx_path.read_bytes(), 1)
    last = sorted(n for n in bundle.weights if n.endswith(".weight"))[-1].rsplit(".", 1)[0]
    humbler = {n: w * (0.05 if n.startswith(last + ".") else 1.0)
               for n, w in bundle.network_weights().items()}
    verdict = evaluate("classification", template, serving, humbler, info.normalize(x), y,
                       alpha=0.05, min_gain=0.0, early=False,
                       load=lambda model: predictor.load(model, 2))
    assert verdict.candidate > 0.5 * verdict.current  # not the "halves the loss" exemption
    assert verdict.result == "accepted", verdict


def test_an_alarm_that_changed_nothing_backs_off_until_the_model_changes():
    """When what an alarm opened could not replace the model, alarming every 100 rows would
    only churn the worker: each alarm acted on doubles the wait, and a new version resets it."""
    def run(check, rows, version):
        hits = []
        for i in range(rows):
            if check.update((5.0 - i % 2) ** 2, float(i % 2), version):  # answers 5
                check.acted()
                hits.append(i)
        return hits

    check = TrivialCheck("regression", min_rows=100, every=25)
    hits = run(check, 1500, version=1)
    gaps = np.diff(hits)
    assert len(hits) >= 3 and all(b >= 2 * a - 25 for a, b in zip(gaps, gaps[1:], strict=False))
    assert run(check, 130, version=2)  # a new version is judged afresh
