"""``edgemeta bench drift``: false alarms on stable data and delay after an abrupt change.

Detectors run exactly as the daemon runs them (:class:`edgemeta.stream.drift.DriftMonitor` with
the default settings: ADWIN on squared errors, a Bernoulli CUSUM on 0/1 errors) on per-sample errors
of a fixed model:
- the project's sinusoid stream: the bundle's meta-initialization served by onnxruntime, task A
  for the stable part, then an abrupt switch to a task B of larger amplitude (the monitor only
  reports rises in the error: a change that makes the model better is not a drift to adapt to);
- river's SEA and Agrawal generators: a river classifier trained on the first concept and then
  frozen, 0/1 errors, abrupt concept change.
River's own defaults for KSWIN and PageHinkley are run beside them to show why they are not ours.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from edgemeta.stream.drift import DriftMonitor, resolve_detector

STABLE = 10_000
AFTER = 1_000


def _run_monitor(errors: np.ndarray, change: int, make) -> tuple[int, int | None]:
    """False alarms before ``change`` and the delay of the first detection after it."""
    monitor = make()
    alarms, delay = 0, None
    for i, e in enumerate(errors):
        if monitor(float(e)):
            if i < change:
                alarms += 1
            elif delay is None:
                delay = i - change
                break
    return alarms, delay


def _alarms_with_resets(errors: np.ndarray, make, every: int = 500) -> int:
    """False alarms on the stable part with a fresh detector every ``every`` rows: the daemon
    resets its detector at each swap, and the first rows after a reset are where a detector that
    learns its baseline is weakest."""
    alarms = 0
    for lo in range(0, STABLE, every):
        monitor = make()
        alarms += sum(bool(monitor(float(e))) for e in errors[lo:lo + every])
    return alarms


def _daemon_monitor(detector: str, kind: str):
    def make():
        m = DriftMonitor(detector, kind=kind)
        return m.update_error
    return make


def _river_default(name: str):
    from river import drift

    def make():
        det = {"kswin": drift.KSWIN, "page_hinkley": drift.PageHinkley}[name]()

        def update(x: float) -> bool:
            det.update(x)
            return det.drift_detected
        return update
    return make


def sinusoid_errors(bundle: Path, seed: int) -> np.ndarray:
    import onnxruntime as ort

    rng = np.random.default_rng(seed)
    session = ort.InferenceSession(str(bundle / "model.onnx"), providers=["CPUExecutionProvider"])
    a, b = rng.uniform(0.1, 5.0, 2), rng.uniform(0, np.pi, 2)
    while abs(a[0] - a[1]) < 1.5:
        a = rng.uniform(0.1, 5.0, 2)
    a = np.sort(a)  # the larger amplitude second: a change that makes the served model worse
    x = rng.uniform(-5, 5, STABLE + AFTER).astype(np.float32)
    y = np.where(np.arange(len(x)) < STABLE, a[0] * np.sin(x - b[0]), a[1] * np.sin(x - b[1]))
    y = y + rng.normal(0, 0.1, len(x))
    pred = session.run(None, {"x": x[:, None]})[0][:, 0]
    return (pred - y) ** 2


def river_errors(name: str, seed: int) -> np.ndarray:
    from river import linear_model, preprocessing, tree
    from river.datasets import synth

    if name == "sea":
        before, after = synth.SEA(variant=0, seed=seed), synth.SEA(variant=3, seed=seed + 1)
        model = preprocessing.StandardScaler() | linear_model.LogisticRegression()
    else:
        before = synth.Agrawal(classification_function=0, seed=seed)
        after = synth.Agrawal(classification_function=4, seed=seed + 1)
        model = tree.HoeffdingTreeClassifier()
    train = 2_000
    stream_a = iter(before)
    for _ in range(train):
        xi, yi = next(stream_a)
        model.learn_one(xi, yi)
    errors = []
    for xi, yi in stream_a:
        errors.append(float(model.predict_one(xi) != yi))
        if len(errors) == STABLE:
            break
    for xi, yi in after.take(AFTER):
        errors.append(float(model.predict_one(xi) != yi))
    return np.asarray(errors)


def run_drift(out: Path, bundle: Path, seeds: int = 10) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    streams = {"sinusoid": ("regression", lambda s: sinusoid_errors(bundle, s)),
               "river-sea": ("classification", lambda s: river_errors("sea", s)),
               "river-agrawal": ("classification", lambda s: river_errors("agrawal", s))}
    report: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "stable_samples": STABLE,
                              "seeds": seeds, "streams": {}}
    for name, (kind, make_errors) in streams.items():
        errors = [make_errors(seed) for seed in range(seeds)]
        default = resolve_detector("auto", kind)
        detectors = {f"{default} (default)": _daemon_monitor(default, kind),
                     "kswin (river default)": _river_default("kswin"),
                     "page_hinkley (river default)": _river_default("page_hinkley")}
        if kind == "classification":
            for det in ("adwin", "ddm", "hddm_a", "hddm_w"):
                detectors[det] = _daemon_monitor(det, kind)
        rows = {}
        for det_name, make in detectors.items():
            results = [_run_monitor(e, STABLE, make) for e in errors]
            alarms = sum(r[0] for r in results)
            delays = [r[1] for r in results if r[1] is not None]
            after_resets = sum(_alarms_with_resets(e[:STABLE], make) for e in errors)
            rows[det_name] = {
                "false_alarms_per_10k": alarms / (seeds * STABLE) * 10_000,
                "false_alarms_per_10k_reset_every_500": after_resets / (seeds * STABLE) * 10_000,
                "median_delay": float(np.median(delays)) if delays else None,
                "detected": f"{len(delays)}/{seeds}"}
            print(f"{name:14} {det_name:28} false alarms/10k {rows[det_name]['false_alarms_per_10k']:6.2f}"
                  f" (reset every 500: {rows[det_name]['false_alarms_per_10k_reset_every_500']:5.2f})"
                  f"  median delay {rows[det_name]['median_delay']}  detected {rows[det_name]['detected']}")
        report["streams"][name] = rows
    (out / "drift.json").write_text(json.dumps(report, indent=2))
    return report
