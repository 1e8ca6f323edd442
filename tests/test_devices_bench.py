from __future__ import annotations

import json
import subprocess
import sys

import pytest

from edgemeta.bench.devices import cuda_available, run_devices_bench


@pytest.mark.slow
def test_the_devices_bench_measures_training_adaptation_and_drift_to_serving_on_the_cpu(
        sinusoid_bundle, tmp_path):
    report = run_devices_bench(tmp_path, sinusoid_bundle.path, quick=True, devices=["cpu"])
    sizes = {row["size"] for row in report["throughput"]}
    assert sizes == {"default", "large"}
    assert all(row["iterations"] >= 1 and row["iterations_per_s"] > 0 for row in report["throughput"])
    adaptation = report["adaptation"][0]
    assert adaptation["device"] == "cpu"
    assert 0 < adaptation["warm_p50_ms"] < adaptation["cold_first_result_s"] * 1e3
    assert adaptation["fit_500_rows_100_steps_p50_ms"] > 0
    drift = report["drift_to_serving"][0]
    assert drift["accepted"] >= 1 and drift["p50_ms"] > 0
    assert "cuda_over_cpu" not in report  # no ratio without a second device
    assert json.loads((tmp_path / "devices.json").read_text())["devices"] == ["cpu"]


@pytest.mark.skipif(cuda_available(), reason="this machine has CUDA")
def test_asking_the_devices_bench_for_cuda_without_a_gpu_is_a_clear_error(tmp_path):
    out = subprocess.run([sys.executable, "-m", "edgemeta", "bench", "devices", "--devices", "cuda",
                          "--out", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "--devices: cuda asked for but CUDA is not available" in out.stderr
    assert "Traceback" not in out.stderr
