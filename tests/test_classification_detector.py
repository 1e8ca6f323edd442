"""The classification drift detector: a Bernoulli CUSUM on the serving model's 0/1 errors, the
default (``drift.detector = "auto"``) for classifiers, ADWIN staying the default for regressors."""

from __future__ import annotations

import numpy as np
import pytest

from edgemeta.config import ConfigError, load_config
from edgemeta.stream.cusum import BernoulliCusum
from edgemeta.stream.drift import DriftMonitor, resolve_detector


def _alarms(detector: BernoulliCusum, errors: np.ndarray) -> list[int]:
    hits = []
    for i, e in enumerate(errors):
        detector.update(float(e))
        if detector.drift_detected:
            hits.append(i)
    return hits


@pytest.mark.parametrize("rate", [0.01, 0.1, 0.3])
def test_the_cusum_stays_quiet_on_a_stable_error_rate_whatever_the_rate(rate):
    rng = np.random.default_rng(int(rate * 100))
    assert _alarms(BernoulliCusum(), rng.random(50_000) < rate) == []


def test_the_cusum_sees_a_rise_from_one_percent_to_twelve_within_a_hundred_rows():
    # SEA's change in `bench drift`: a frozen model's error rate goes from about 1% to 12%.
    delays = []
    for seed in range(10):
        rng = np.random.default_rng(seed)
        errors = np.concatenate([rng.random(5_000) < 0.01, rng.random(1_000) < 0.12])
        hits = _alarms(BernoulliCusum(), errors)
        assert hits and hits[0] >= 5_000, f"seed {seed}: alarms {hits[:3]}"
        delays.append(hits[0] - 5_000)
    assert np.median(delays) <= 100


def test_the_cusum_learns_its_baseline_so_a_bad_but_steady_model_is_no_drift():
    # After a swap the detector starts afresh: a 40% error rate that stays 40% is not a change.
    rng = np.random.default_rng(3)
    assert _alarms(BernoulliCusum(), rng.random(20_000) < 0.4) == []


def test_a_smaller_delta_waits_for_more_evidence():
    rng = np.random.default_rng(4)
    errors = np.concatenate([rng.random(3_000) < 0.05, rng.random(2_000) < 0.2])
    fast = _alarms(BernoulliCusum(delta=1e-3), errors)[0]
    slow = _alarms(BernoulliCusum(delta=1e-8), errors)[0]
    assert 3_000 <= fast < slow


def test_auto_picks_the_cusum_for_classifiers_and_adwin_for_regressors():
    assert DriftMonitor("auto", kind="classification").detector == "cusum"
    assert DriftMonitor("auto", kind="regression").detector == "adwin"
    assert resolve_detector("ddm", "classification") == "ddm"
    with pytest.raises(ValueError, match="0/1 errors"):
        DriftMonitor("cusum", kind="regression")


def test_the_daemon_monitor_with_the_cusum_reports_a_rise_and_never_a_fall():
    rng = np.random.default_rng(5)
    monitor = DriftMonitor("auto", kind="classification")
    falls = [monitor.update_error(float(e)) for e in rng.random(3_000) < 0.3]
    falls += [monitor.update_error(float(e)) for e in rng.random(3_000) < 0.02]
    assert not any(falls)
    rise = [monitor.update_error(float(e)) for e in rng.random(500) < 0.4]
    assert any(rise)


def _config(tmp_path, drift: str) -> str:
    path = tmp_path / "edgemeta.toml"
    path.write_text(f'[bundle]\npath = "{tmp_path}"\n[state]\ndir = "{tmp_path / "s"}"\n'
                    f'[drift]\n{drift}\n[[streams]]\nname = "s"\nfeatures = ["a"]\nlabel = "y"\n')
    return str(path)


def test_the_config_defaults_to_auto_and_takes_the_cusum_with_its_delta(tmp_path):
    assert load_config(_config(tmp_path, "")).drift.detector == "auto"
    settings = load_config(_config(tmp_path, 'detector = "cusum"\ndelta = 1e-6'))
    assert (settings.drift.detector, settings.drift.delta) == ("cusum", 1e-6)


def test_a_delta_without_a_named_detector_is_refused_with_the_key(tmp_path):
    with pytest.raises(ConfigError, match="drift.delta: name the detector"):
        load_config(_config(tmp_path, "delta = 0.01"))


def test_a_moderate_rise_the_cusum_cannot_see_is_still_detected_by_adwin_beside_it():
    # 18% -> 25%: under the CUSUM's alternative (36%) the statistic drifts down, never up.
    rng = np.random.default_rng(6)
    before, after = rng.random(3_000) < 0.18, rng.random(3_000) < 0.25
    alone = BernoulliCusum()
    assert _alarms(alone, np.concatenate([before, after])) == []
    monitor = DriftMonitor("auto", kind="classification")
    assert not any(monitor.update_error(float(e)) for e in before)
    assert any(monitor.update_error(float(e)) for e in after)
