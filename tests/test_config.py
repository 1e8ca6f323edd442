"""A bad config refuses to start with a message naming the key."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from edgemeta.config import ConfigError, load_config


def write(tmp_path, text: str):
    path = tmp_path / "c.toml"
    path.write_text(text)
    return path


BASE = '[bundle]\npath = "b"\n[state]\ndir = "s"\n[[streams]]\nname = "s1"\nfeatures = ["x"]\n'


def test_relative_paths_resolve_against_the_config_file(tmp_path):
    settings = load_config(write(tmp_path, BASE))
    assert settings.bundle == tmp_path / "b" and settings.state_dir == tmp_path / "s"


@pytest.mark.parametrize("extra, message", [
    ("[drift]\ndetecter = 'adwin'\n", "drift.detecter: unknown key"),
    ("[adaptation]\nsupport_size = 'ten'\n", "adaptation.support_size: must be int, got 'ten'"),
    ("[adaptation]\nsupport_size = 0\n", "adaptation.support_size: must be > 0, got 0"),
    ("[gate]\nmin_gain = 1.5\n", "gate.min_gain: must be in [0, 1)"),
    ("[adaptation]\ncpu_threads = 0\n", "adaptation.cpu_threads: must be > 0, got 0"),
    ("[metrics]\nport = 70000\n", "metrics.port: 70000 is not a TCP port"),
    ("[serving]\nproviders = 'CPU'\n", "serving.providers: must be a list of strings"),
    ("[adaptation]\nselection = 'diverse'\nwindow = 5\n", "adaptation.window: 5 is smaller"),
    ("[typo]\nx = 1\n", "typo: unknown section"),
    ("[[streams]]\nname = \"s1\"\nfeatures = [\"x\"]\n", "streams[1].name: duplicate stream 's1'"),
    ("[[streams]]\nname = \"s2\"\nformat = \"xml\"\nfeatures = [\"x\"]\n",
     "streams[1].format: 'xml' is not one of csv, jsonl, npz"),
    ("[[streams]]\nname = \"../up\"\nfeatures = [\"x\"]\n", "streams[1].name: '../up' must be"),
])
def test_config_errors_name_the_key(tmp_path, extra, message):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, BASE + extra))
    assert message in str(err.value) and "c.toml" in str(err.value)


def test_missing_sections_and_bad_toml(tmp_path):
    with pytest.raises(ConfigError, match="bundle.path: required"):
        load_config(write(tmp_path, "[state]\ndir = 's'\n"))
    with pytest.raises(ConfigError, match="c.toml: not valid TOML"):
        load_config(write(tmp_path, "[bundle\n"))
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "missing.toml")


def test_config_check_prints_the_effective_settings(tmp_path):
    path = write(tmp_path, BASE)
    out = subprocess.run([sys.executable, "-m", "edgemeta", "config", "check", "--skip-bundle",
                          str(path)], capture_output=True, text=True, check=True)
    effective = json.loads(out.stdout)
    assert effective["drift"]["detector"] == "auto"
    assert effective["metrics"] == {"address": "127.0.0.1", "port": 9781, "enabled": True}


def test_the_shipped_example_config_is_accepted_and_sets_every_key():
    import tomllib
    from dataclasses import fields
    from pathlib import Path

    from edgemeta import config as cfg

    path = Path(__file__).resolve().parents[1] / "deploy" / "edgemeta.toml.example"
    settings = load_config(path)
    assert settings.streams[0].name == "sensor"
    raw = tomllib.loads(path.read_text())
    commented = path.read_text()
    for section, cls in (("drift", cfg.DriftSettings), ("adaptation", cfg.AdaptationSettings),
                         ("gate", cfg.GateSettings), ("serving", cfg.ServingSettings),
                         ("metrics", cfg.MetricsSettings), ("ingest", cfg.IngestSettings),
                         ("retention", cfg.RetentionSettings)):
        for f in fields(cls):
            assert f.name in raw[section] or f"# {f.name} =" in commented, f"{section}.{f.name}"


def test_config_check_opens_the_bundle_as_run_does(tmp_path, sinusoid_bundle):
    def check(text: str) -> subprocess.CompletedProcess:
        path = write(tmp_path, text)
        return subprocess.run([sys.executable, "-m", "edgemeta", "config", "check", str(path)],
                              capture_output=True, text=True, timeout=60)

    missing = check(BASE)
    assert missing.returncode == 2
    assert "c.toml: bundle.path:" in missing.stderr and "--skip-bundle" in missing.stderr
    real = BASE.replace('path = "b"', f'path = "{sinusoid_bundle.path}"')
    assert real != BASE
    ok = check(real)
    assert ok.returncode == 0, ok.stderr
    assert "OK (bundle" in ok.stderr and "checksums verified" in ok.stderr
    assert ": regression, 1 feature(s)" in ok.stderr  # a classifier on a regression stream shows
    two_columns = real.replace('features = ["x"]', 'features = ["x", "z"]')
    assert two_columns != real
    wrong = check(two_columns)
    assert wrong.returncode == 2
    assert "streams[0].features: 2 columns, the bundle expects 1" in wrong.stderr


def test_a_binary_detector_with_a_regression_bundle_refuses_to_start_and_names_the_key(
        tmp_path, sinusoid_bundle):
    path = write(tmp_path, BASE.replace('path = "b"', f'path = "{sinusoid_bundle.path}"')
                 + '[drift]\ndetector = "cusum"\n')
    out = subprocess.run([sys.executable, "-m", "edgemeta", "config", "check", str(path)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "drift.detector: 'cusum' watches 0/1 errors" in out.stderr
    assert "regression bundle" in out.stderr
