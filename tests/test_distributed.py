"""torchrun data-parallel meta-training with gloo: same gradient, same convergence, rank 0 writes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from edgemeta.meta.distributed import Context

from .dist_meta_gradient import ALGORITHMS, meta_gradient

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


def _env(**extra):
    # OMP 1: two ranks on two cores; PYTHONPATH: the helper script imports the tests package.
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1]),
            **extra}


def test_the_meta_batch_is_shared_out_whole():
    assert [Context(r, 3).share(25) for r in range(3)] == [9, 8, 8]
    assert sum(Context(r, 4).share(10) for r in range(4)) == 10


def test_two_gloo_processes_compute_the_single_process_meta_gradient(tmp_path):
    out = tmp_path / "grads.npz"
    done = subprocess.run([*TORCHRUN, str(Path(__file__).with_name("dist_meta_gradient.py")),
                           str(out)], capture_output=True, text=True, timeout=180, env=_env())
    assert done.returncode == 0, done.stderr[-3000:]
    got = np.load(out)
    want = {}
    for algorithm in ALGORITHMS:
        want.update(meta_gradient(algorithm, Context()))
    assert set(got.files) == set(want)
    worst = max(float(np.abs(got[k] - want[k]).max()) for k in want)
    assert worst <= 1e-6
    assert max(float(np.abs(w).max()) for w in want.values()) > 1e-3  # not all zeros


def _train(args, tmp_path, name, launcher, **env):
    out = tmp_path / name
    return subprocess.run([*launcher, "-m", "edgemeta", "train", "--out", str(out), "--quiet",
                           "--device", "cpu", *args], capture_output=True, text=True, timeout=300,
                          env=_env(**env), cwd=tmp_path), out


def test_a_short_two_process_run_converges_like_one_process_and_only_rank_0_writes(tmp_path):
    args = ["--iterations", "400", "--val-every", "100", "--seed", "3"]
    single, one = _train(args, tmp_path, "one", [sys.executable])
    double, two = _train(args, tmp_path, "two", TORCHRUN)
    assert single.returncode == 0 and double.returncode == 0, double.stderr[-3000:]
    assert double.stdout.count("bundle written to") == 1
    assert "rank 1: 400 iterations; rank 0 writes the bundle" in double.stderr
    loss = {p.name: json.loads((p / "bundle.json").read_text())["training"] for p in (one, two)}
    assert loss["two"]["best_iteration"] > 0 and loss["two"]["iterations"] == 400
    assert loss["two"]["best_val_loss"] <= 1.3 * loss["one"]["best_val_loss"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two"]  # nothing else written


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a live process, from /proc (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("inf")  # gone: nothing more to wait for
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _rank_pid(marker: str, rank: int) -> int | None:
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            env = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"EDGEMETA_TEST_RUN={marker}".encode() in env and f"RANK={rank}".encode() in env:
            cmd = (proc / "cmdline").read_bytes()
            if b"edgemeta" in cmd and b"torch.distributed.run" not in cmd:
                return int(proc.name)
    return None


@pytest.mark.slow
def test_a_dying_rank_ends_the_job_with_the_best_bundle_so_far(tmp_path):
    marker = uuid.uuid4().hex
    out = tmp_path / "bundle"
    job = subprocess.Popen([*TORCHRUN, "-m", "edgemeta", "train", "--out", str(out), "--quiet",
                            "--device", "cpu", "--iterations", "10000000", "--time-budget", "300",
                            "--val-every", "50"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, env=_env(EDGEMETA_TEST_RUN=marker), cwd=tmp_path)
    lines: list[str] = []

    def collect() -> None:
        for line in job.stderr:
            lines.append(line)

    reader = threading.Thread(target=collect, daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 60
        pid = None
        while pid is None and time.monotonic() < deadline:
            pid = _rank_pid(marker, 1)
            time.sleep(0.2)
        assert pid is not None, "rank 1 never started"
        # Both ranks say how they share the meta-batch once set up; count the work from there
        # (importing torch alone takes seconds of CPU on a busy machine, and a SIGTERM that lands
        # before training began has no best bundle to write).
        deadline = time.monotonic() + 120
        while (not all(any(f"rank {r} of 2" in line for line in lines) for r in (0, 1))
               and time.monotonic() < deadline):
            time.sleep(0.2)
        # Let it train and validate a few times: a wait on the work done (CPU seconds), which a
        # busy machine stretches in wall-clock time but not in iterations.
        set_up = _cpu_seconds(pid)
        deadline = time.monotonic() + 120
        while _cpu_seconds(pid) < set_up + 3.0 and time.monotonic() < deadline:
            time.sleep(0.2)
        os.kill(pid, signal.SIGKILL)
        job.wait(timeout=90)
        stdout = job.stdout.read()
        reader.join(10)
        stderr = "".join(lines)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode != 0  # the job failed, and says so
    assert "bundle written to" in stdout, stderr[-3000:]
    meta = json.loads((out / "bundle.json").read_text())
    assert meta["training"]["interrupted"] and meta["training"]["best_iteration"] > 0
