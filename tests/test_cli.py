"""The CLI as a user calls it: a real `python -m edgemeta` process, exit codes and messages."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import run_edgemeta

ROOT = Path(__file__).resolve().parents[1]


def test_train_then_eval_json(tmp_path):
    out = tmp_path / "b"
    proc = run_edgemeta("train", "--out", str(out), "--iterations", "60", "--val-every", "20",
                    "--seed", "3")
    assert proc.returncode == 0, proc.stderr
    assert "bundle written to" in proc.stdout and "meta-loss" in proc.stderr
    assert (out / "bundle.json").is_file() and (out / "model.onnx").is_file()
    proc = run_edgemeta("eval", str(out), "--tasks", "40", "--steps", "0,1", "--json",
                    "--pretrain-iterations", "20", "--target", "100")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert set(result["methods"]) == {"maml", "random-init", "pretrain-finetune", "no-adaptation"}
    assert [r["steps"] for r in result["methods"]["maml"]] == [0, 1]
    assert result["speed"]["steps_to_target"]["maml"] == 0


def test_classification_from_a_csv_file(tmp_path, digits_npz):
    import numpy as np

    with np.load(digits_npz) as d:
        x, y = d["X"], d["y"]
    csv = tmp_path / "digits.csv"
    header = ",".join([f"p{i}" for i in range(x.shape[1])] + ["label"])
    rows = [",".join(map(str, list(r) + [int(c)])) for r, c in zip(x, y, strict=True)]
    csv.write_text(header + "\n" + "\n".join(rows) + "\n")
    proc = run_edgemeta("train", "--out", str(tmp_path / "b"), "--tasks", "array", "--data", str(csv),
                    "--ways", "3", "--shots", "1", "--queries", "5", "--algorithm", "protonet",
                    "--val-fraction", "0", "--test-fraction", "0.4", "--iterations", "20",
                    "--val-every", "10", "--quiet")
    assert proc.returncode == 0, proc.stderr
    proc = run_edgemeta("eval", str(tmp_path / "b"), "--tasks", "20", "--no-baselines")
    assert proc.returncode == 0, proc.stderr
    assert "protonet" in proc.stdout and "accuracy" in proc.stdout


@pytest.mark.parametrize("args, message", [
    (["--algorithm", "magic"], "algorithm: unknown 'magic'"),
    (["--inner-steps", "0"], "inner_steps: must be a positive integer, got 0"),
    (["--shots", "-1"], "tasks.shots: must be a positive integer, got -1"),
    (["--tasks", "array"], "--tasks array needs --data PATH"),
    (["--tasks", "array", "--data", "/nonexistent.npz"], "/nonexistent.npz: no such file"),
    (["--model-factory", "nope:f"], "cannot import 'nope'"),
])
def test_nonsense_settings_fail_fast_with_the_setting_named(tmp_path, args, message):
    started = time.monotonic()
    proc = run_edgemeta("train", "--out", str(tmp_path / "b"), *args)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert not (tmp_path / "b").exists()
    assert time.monotonic() - started < 60


def test_inner_rate_not_above_outer_rate_warns_naming_both(tmp_path):
    proc = run_edgemeta("train", "--out", str(tmp_path / "b"), "--inner-lr", "0.001", "--outer-lr",
                    "0.01", "--iterations", "2", "--val-every", "1", "--quiet", "--allow-untrained")
    assert proc.returncode == 0, proc.stderr
    assert "inner_lr=0.001 is not above outer_lr=0.01" in proc.stderr


def test_eval_refuses_a_tampered_bundle(sinusoid_bundle, tmp_path):
    import shutil

    copy = tmp_path / "b"
    shutil.copytree(sinusoid_bundle.path, copy)
    with (copy / "model.onnx").open("ab") as fh:
        fh.write(b"x")
    proc = run_edgemeta("eval", str(copy))
    assert proc.returncode == 2 and "model.onnx: checksum mismatch" in proc.stderr


def test_ctrl_c_writes_the_best_bundle_so_far(tmp_path):
    out = tmp_path / "b"
    # A suite started in the background by a non-interactive shell inherits SIGINT ignored, and
    # so would train: give it the disposition a terminal's Ctrl-C meets.
    proc = subprocess.Popen([sys.executable, "-m", "edgemeta", "train", "--out", str(out),
                             "--iterations", "1000000", "--val-every", "20"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    seen = ""
    while not re.search(r"val \d", seen):
        assert time.monotonic() < deadline, seen
        seen += proc.stderr.read(64)
    proc.send_signal(signal.SIGINT)
    # Ending writes the bundle after a last look at it; on a loaded 2-core machine that took
    # longer than 120 s once (two CPU-bound processes and the suite beside it).
    stdout, stderr = proc.communicate(timeout=400)
    assert proc.returncode == 130, stderr
    assert "writing the best bundle so far" in stderr
    assert (out / "bundle.json").is_file()
    meta = json.loads((out / "bundle.json").read_text())
    assert meta["training"]["interrupted"] is True


def test_a_short_time_budget_still_validates_and_writes_trained_weights(tmp_path):
    # val-every far beyond what 4 s can reach: only the time schedule and the final check validate
    proc = run_edgemeta("train", "--out", str(tmp_path / "b"), "--iterations", "1000000",
                    "--val-every", "1000000", "--time-budget", "4", "--seed", "1")
    assert proc.returncode == 0, proc.stderr
    meta = json.loads((tmp_path / "b" / "bundle.json").read_text())
    assert meta["training"]["best_iteration"] > 0
    assert re.search(r"\d+/4s, \d+ it", proc.stderr), proc.stderr[-500:]  # time binds, not 1e6 it


def test_a_run_that_never_beats_its_initialization_writes_no_bundle(tmp_path):
    args = ["--iterations", "3", "--outer-lr", "1.0", "--inner-lr", "2", "--val-every", "1",
            "--quiet", "--seed", "0"]
    proc = run_edgemeta("train", "--out", str(tmp_path / "b"), *args)
    assert proc.returncode == 2
    assert "beat the untrained initialization" in proc.stderr and "--allow-untrained" in proc.stderr
    assert not (tmp_path / "b").exists()
    proc = run_edgemeta("train", "--out", str(tmp_path / "b"), *args, "--allow-untrained")
    assert proc.returncode == 0 and (tmp_path / "b" / "bundle.json").is_file()


def _task_folder(path: Path, files: int, rows: int = 60) -> Path:
    import numpy as np

    path.mkdir()
    rng = np.random.default_rng(0)
    for i in range(files):
        x = rng.uniform(-5, 5, rows)
        y = (1 + i) * np.sin(x - i / 3)
        (path / f"task{i:02d}.csv").write_text(
            "x,label\n" + "".join(f"{a:.5f},{b:.5f}\n" for a, b in zip(x, y, strict=True)))
    return path


def test_a_task_folder_split_says_what_went_where_and_warns_when_files_are_few(tmp_path):
    folder = _task_folder(tmp_path / "tasks", 5)
    proc = run_edgemeta("train", "--out", str(tmp_path / "b"), "--tasks", "folder", "--data",
                    str(folder), "--iterations", "30", "--val-every", "10", "--quiet",
                    "--allow-untrained")
    assert proc.returncode == 0, proc.stderr
    line = next(x for x in proc.stderr.splitlines() if x.startswith("task folder: 5 files"))
    assert "meta-train 3" in line and "meta-test: task" in line
    assert "never reach meta-training" in proc.stderr and "one file per task" in proc.stderr


def test_val_fraction_zero_validates_a_task_folder_on_held_out_rows(tmp_path):
    folder = _task_folder(tmp_path / "tasks", 16)
    proc = run_edgemeta("train", "--out", str(tmp_path / "b"), "--tasks", "folder", "--data",
                    str(folder), "--val-fraction", "0", "--test-fraction", "0.25",
                    "--iterations", "30", "--val-every", "10", "--quiet", "--allow-untrained")
    assert proc.returncode == 0, proc.stderr
    assert "task folder: 16 files; meta-train 12; validation: held-out rows of the training " \
           "tasks" in proc.stderr
    # 30 iterations learn nothing measurable (said so); no other warning.
    others = [ln for ln in proc.stderr.splitlines()
              if "warning" in ln and "learned nothing measurable" not in ln]
    assert not others, others
    short = _task_folder(tmp_path / "short", 4, rows=20)  # 20 rows: no room for held-out rows
    proc = run_edgemeta("train", "--out", str(tmp_path / "c"), "--tasks", "folder", "--data",
                    str(short), "--val-fraction", "0", "--test-fraction", "0.25", "--quiet")
    assert proc.returncode == 2 and "--val-fraction 0 validates on held-out rows" in proc.stderr


def test_train_and_eval_say_when_a_bundle_learned_nothing(tmp_path, digits_npz):
    """One meta-iteration on 5-way digits: the bundle adapts about as well as the predictor that
    ignores x (ln 5). train warns and writes it; --require-better-than-chance refuses it; eval
    prints the same warning."""
    common = ["--tasks", "array", "--data", str(digits_npz), "--ways", "5", "--shots", "1",
              "--queries", "5", "--val-fraction", "0", "--test-fraction", "0.5",
              "--iterations", "1", "--val-every", "1", "--quiet", "--allow-untrained"]
    proc = run_edgemeta("train", "--out", str(tmp_path / "b"), *common)
    assert proc.returncode == 0, proc.stderr
    assert "warning: the bundle learned nothing measurable" in proc.stderr
    assert "after 1 iterations" in proc.stderr
    meta = json.loads((tmp_path / "b" / "bundle.json").read_text())
    assert meta["training"]["versus_chance"]["learned"] is False
    refused = run_edgemeta("train", "--out", str(tmp_path / "strict"), *common,
                           "--require-better-than-chance")
    assert refused.returncode == 2 and "not writing" in refused.stderr
    assert not (tmp_path / "strict").exists()
    proc = run_edgemeta("eval", str(tmp_path / "b"), "--tasks", "100", "--seeds", "1",
                        "--no-baselines")
    assert proc.returncode == 0, proc.stderr
    assert "WARNING: this bundle learned nothing measurable" in proc.stdout


def test_eval_of_a_trained_bundle_shows_the_chance_level_without_a_warning(sinusoid_bundle):
    proc = run_edgemeta("eval", str(sinusoid_bundle.path), "--tasks", "100", "--seeds", "1",
                        "--no-baselines")
    assert proc.returncode == 0, proc.stderr
    assert "no-adaptation predictor" in proc.stdout and "WARNING" not in proc.stdout


def test_train_says_when_a_busy_machine_starved_its_time_budget_and_in_which_units_it_reports():
    from types import SimpleNamespace

    from edgemeta.cli.learning import _budget_starved, _loss_units
    from edgemeta.meta.tasks import SinusoidTasks, StandardizedTargets
    from edgemeta.meta.train import TrainSettings

    settings = TrainSettings(iterations=10**9, time_budget=10.0)
    run = SimpleNamespace(iterations_done=300, seconds=10.0)
    starved = _budget_starved(run, settings, cpu_seconds=1.0)  # 10% of one CPU: others had it
    assert starved and "300 iterations" in starved and "an idle machine would have done" in starved
    assert _budget_starved(run, settings, cpu_seconds=10.0) is None  # it had its CPU
    assert _budget_starved(run, TrainSettings(iterations=300, time_budget=10.0), 1.0) is None
    scaled = SimpleNamespace(best_val=0.5, tasks=StandardizedTargets(SinusoidTasks(), 14.0, 5.0))
    assert _loss_units(scaled) == " on standardized targets, 12.5000 in the targets' own units"
    assert _loss_units(SimpleNamespace(best_val=0.5, tasks=SinusoidTasks())) == ""


def test_bench_stream_refuses_a_run_it_cannot_leave_out_before_running_anything(tmp_path):
    proc = run_edgemeta("bench", "stream", "--without", "periodic,oracle", "--out",
                        str(tmp_path / "s"))
    assert proc.returncode == 2
    assert "--without: unknown oracle; use periodic,interleaved" in proc.stderr
    assert not (tmp_path / "s").exists()


def test_the_bench_extra_holds_every_package_the_benchmarks_import():
    """Every bench must run from the install the README names for it (`.[cpu,bench]`): the
    third-party modules edgemeta/bench imports are the daemon's dependencies or the bench
    extra's, and torch's dynamo ONNX exporter that `bench swap` measures needs onnxscript."""
    import ast
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = {re.split(r"[<>=;\[ ]", d, maxsplit=1)[0].lower()
             for d in project["dependencies"] + project["optional-dependencies"]["bench"]
             + project["optional-dependencies"]["cpu"]}
    distribution = {"sklearn": "scikit-learn", "prometheus_client": "prometheus-client"}
    stdlib = set(sys.stdlib_module_names) | {"edgemeta"}
    for module in (ROOT / "edgemeta" / "bench").glob("*.py"):
        for node in ast.walk(ast.parse(module.read_text())):
            if isinstance(node, ast.Import):
                tops = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                tops = [node.module.split(".")[0]]
            else:
                continue
            for top in tops:
                if top not in stdlib:
                    assert distribution.get(top, top).lower() in names, (module.name, top)
    if "dynamo=True" in (ROOT / "edgemeta" / "bench" / "swap.py").read_text():
        assert "onnxscript" in names
