"""The ONNX Runtime build comes from an extra: a missing one is install advice, two are a warning."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from edgemeta.ort_install import conflict, installed

from .conftest import write_config


def _dist_info(folder: Path, name: str) -> None:
    info = folder / f"{name.replace('-', '_')}-1.31.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.31.1\n")


def _edgemeta(args: list[str], prelude: str = "", env: dict | None = None) -> subprocess.CompletedProcess:
    code = f"import sys; {prelude}from edgemeta.cli import main; sys.exit(main({args!r}))"
    return subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True,
                          timeout=120, env={**os.environ, **(env or {})})


def test_a_missing_runtime_stops_train_at_once_with_the_install_command(tmp_path):
    # sys.modules[name] = None is how Python itself reports a module that cannot be imported.
    done = _edgemeta(["train", "--out", str(tmp_path / "b"), "--time-budget", "60"],
                     prelude="sys.modules['onnxruntime'] = None; ")
    assert done.returncode == 2
    assert "ONNX Runtime is not installed" in done.stderr and "edgemeta[cpu]" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "b").exists()


def test_a_missing_runtime_stops_run_with_the_install_command(tmp_path, sinusoid_bundle):
    config = write_config(tmp_path, sinusoid_bundle.path)
    done = _edgemeta(["run", "--config", str(config)], prelude="sys.modules['onnxruntime'] = None; ")
    assert done.returncode == 2
    assert "edgemeta run: error: ONNX Runtime is not installed" in done.stderr
    assert "Traceback" not in done.stderr


def test_both_builds_installed_are_reported_as_a_conflict(tmp_path):
    _dist_info(tmp_path / "one", "onnxruntime")
    assert installed([str(tmp_path / "one")]) == ["onnxruntime"]
    assert conflict([str(tmp_path / "one")]) is None
    _dist_info(tmp_path / "both", "onnxruntime")
    _dist_info(tmp_path / "both", "onnxruntime-gpu")
    warning = conflict([str(tmp_path / "both")])
    assert warning and "pip uninstall -y onnxruntime onnxruntime-gpu" in warning


def test_config_check_warns_when_both_builds_are_installed(tmp_path, sinusoid_bundle):
    shadow = tmp_path / "site"
    _dist_info(shadow, "onnxruntime")
    _dist_info(shadow, "onnxruntime-gpu")
    config = write_config(tmp_path, sinusoid_bundle.path)
    done = _edgemeta(["config", "check", str(config)], env={"PYTHONPATH": str(shadow)})
    assert done.returncode == 0, done.stderr
    assert "warning: both onnxruntime and onnxruntime-gpu are installed" in done.stderr
