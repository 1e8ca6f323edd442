from __future__ import annotations

import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest

from edgemeta.meta.bundle import read_bundle
from edgemeta.meta.tasks import SinusoidTasks
from edgemeta.meta.train import TrainSettings, save_bundle, train
from edgemeta.testing.harness import free_port, sine_config_toml

#: Prefix of the skip reason of a test that needs a real tool this machine lacks; the summary at
#: the end of the run lists them, so "passed with 3 skipped" never hides what was not checked.
MISSING_TOOL = "missing tool: "


ROOT = Path(__file__).resolve().parents[1]


def run_edgemeta(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """The `edgemeta` command as a user runs it (``-P``: the checkout never shadows the package)."""
    return subprocess.run([sys.executable, "-P", "-m", "edgemeta", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    missing: dict[str, int] = {}
    for report in terminalreporter.stats.get("skipped", []):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        if MISSING_TOOL in reason:
            what = reason.split(MISSING_TOOL, 1)[1]
            missing[what] = missing.get(what, 0) + 1
    if missing:
        terminalreporter.write_sep("=", "real tools missing here: these tests did not run")
        for what, count in sorted(missing.items()):
            terminalreporter.write_line(f"{count} test(s): {what}")


@pytest.fixture(scope="session")
def sinusoid_bundle(tmp_path_factory):
    """A small MAML sinusoid bundle shared by the tests that only read bundles."""
    settings = TrainSettings(algorithm="maml", iterations=1000, val_every=250, seed=0, device="cpu")
    result = train(settings, SinusoidTasks(shots=5, queries=10))
    return read_bundle(save_bundle(result, tmp_path_factory.mktemp("bundles") / "sinusoid"))


@pytest.fixture(scope="session")
def digits_npz(tmp_path_factory):
    from sklearn.datasets import load_digits

    d = load_digits()
    path = tmp_path_factory.mktemp("data") / "digits.npz"
    np.savez(path, X=d.data.astype(np.float32), y=d.target)
    return path


def write_config(tmp_path, bundle_path, streams=None, **sections) -> Path:  # noqa: F821
    """A daemon config in tmp_path; ``sections`` override/extend the TOML tables; ``streams``:
    name -> shared model name (or None), default one stream ``sine``."""
    tables = {
        "bundle": {"path": str(bundle_path)},
        "state": {"dir": str(tmp_path / "state")},
        # adapt_on_start off: these tests pin behaviour relative to v1 (the meta-init) serving.
        "adaptation": {"support_size": 10, "holdout_size": 20, "timeout_s": 20,
                       "adapt_on_start": False, "refine": []},
        # ... and without continued fits, which would add versions of their own
        # (tests/test_continual_learning.py turns them on) ...
        "continual": {"enabled": False},
        # ... and without the trivial-predictor alarm: this small bundle's meta-initialization
        # is worse than a constant on amplitude-1 tasks, which would open episodes of its own
        # (tests/test_trivial_baseline.py and the real-daemon scenarios keep it on).
        "drift": {"trivial_threshold": 0},
        "metrics": {"port": free_port()},
        "ingest": {"settle_s": 0.05, "rescan_interval_s": 1.0},
    }
    path = tmp_path / "edgemeta.toml"
    path.write_text(sine_config_toml(tables, sections, streams))
    return path


def sine_file(inbox, name, amplitude, phase, n=50, seed=0, labels=True, label_fn=None):
    """Write a CSV batch of one sinusoid task the way producers should: temp name, then rename."""
    import os

    rng = np.random.default_rng(seed)
    x = rng.uniform(-5, 5, n)
    y = amplitude * np.sin(x - phase)
    if label_fn is not None:
        y = label_fn(y)
    tmp = inbox / f".{name}.tmp"
    header = "id,x,y" if labels else "id,x"
    rows = [f"{name}-{i},{a}" + (f",{b}" if labels else "")
            for i, (a, b) in enumerate(zip(x, y, strict=True))]
    tmp.write_text(header + "\n" + "\n".join(rows) + "\n")
    final = inbox / f"{name}.csv"
    os.rename(tmp, final)
    return final, x, y


def drop_drifting_stream(inbox) -> None:
    """12 labelled files of task A (A=1, phase 0), then 6 of task B (A=4.5, phase 2.5)."""
    import time

    for i in range(12):
        sine_file(inbox, f"a{i:03d}", 1.0, 0.0, seed=i)
        time.sleep(0.05)
    for i in range(6):
        sine_file(inbox, f"b{i:03d}", 4.5, 2.5, seed=100 + i)
        time.sleep(0.05)


# -- driving an in-process Daemon ------------------------------------------------------------
class CpuBurners:
    """CPU-bound processes beside the code under test (two: as many as the machine's cores):
    devices are small and busy, and what the daemon learns must not depend on that."""

    def __init__(self, n: int = 2):
        self.n = n
        self.procs: list[subprocess.Popen] = []

    def start(self) -> CpuBurners:
        self.procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
                      for _ in range(self.n)]
        return self

    def stop(self) -> None:
        for p in self.procs:
            p.kill()
            p.wait()

    def __enter__(self) -> CpuBurners:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def run_until(daemon, predicate, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        daemon.step(wait=0.02)
        if predicate():
            return True
    return False


def inbox(daemon, stream="sine"):
    return daemon.layout.dir("inbox", stream)


def counter(daemon, name, **labels) -> float:
    """The sum of ``name``'s samples whose labels include ``labels`` (a label left out is summed
    over, as in PromQL's ``sum``)."""
    return sum(sample.value for family in daemon.metrics.registry.collect()
               for sample in family.samples
               if sample.name == name and labels.items() <= sample.labels.items())


def feed(daemon, prefix, amplitude, phase, files, n=50, stream="sine", **kw):
    base = zlib.crc32(prefix.encode()) % 1000  # not hash(): that changes with PYTHONHASHSEED
    for i in range(files):
        sine_file(inbox(daemon, stream), f"{prefix}{i:03d}", amplitude, phase, n=n, seed=base + i,
                  **kw)
        assert run_until(daemon, lambda: not any(inbox(daemon, stream).iterdir()))


