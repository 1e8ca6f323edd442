"""The real daemon as a child process, for the black-box benchmarks (chaos, soak) and tests.

Everything here goes through the product's own doors: a config file, ``edgemeta run`` as a
process, files written into the inbox the way producers write them (temp name, then rename), the
metrics endpoint over HTTP and ``status.json``. Nothing reaches into the daemon's memory.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_or_train(path: Path, settings, tasks, progress=None,
                  before_training: Callable[[], None] | None = None) -> Path:
    """The bundle at ``path`` if it reads back whole, else meta-trained there with ``settings``
    on ``tasks`` (the one cache of the benchmarks and the demo: a run reuses what an earlier run
    trained, and a half-written bundle is trained again)."""
    from edgemeta.meta.bundle import BundleError, read_bundle
    from edgemeta.meta.train import save_bundle, train

    try:
        read_bundle(path)
        return path
    except BundleError:
        pass
    if before_training is not None:
        before_training()
    return save_bundle(train(settings, tasks, progress=progress), path)


def cached_bundle(directory: Path, iterations: int = 1000) -> Path:
    """A small sinusoid MAML bundle, trained once into ``directory`` and reused after."""
    from edgemeta.meta.tasks import SinusoidTasks
    from edgemeta.meta.train import TrainSettings

    settings = TrainSettings(algorithm="maml", iterations=iterations,
                             val_every=max(1, iterations // 4), seed=0, device="cpu")
    return read_or_train(directory / f"sinusoid-maml-{iterations}", settings,
                         SinusoidTasks(shots=5, queries=10))


def write_config(path: Path, bundle: Path, state: Path, port: int, **sections: dict) -> Path:
    tables: dict[str, dict[str, Any]] = {
        "bundle": {"path": str(Path(bundle).resolve())}, "state": {"dir": str(state)},
        "adaptation": {"support_size": 10, "holdout_size": 20, "steps": 5, "timeout_s": 20},
        "metrics": {"port": port}, "ingest": {"settle_s": 0.05, "rescan_interval_s": 1.0}}
    path.write_text(sine_config_toml(tables, sections))
    return path


def sine_config_toml(tables: dict[str, dict[str, Any]], overrides: dict[str, dict],
                     streams: dict[str, str | None] | None = None) -> str:
    """A config for sinusoid streams (columns id, x, y; default one stream ``sine``; ``streams``
    maps each name to the model it shares, or None for its own): ``tables`` with each table of
    ``overrides`` merged into it, written as TOML (JSON values are valid TOML here)."""
    merged = {name: dict(values) for name, values in tables.items()}
    for name, values in overrides.items():
        merged[name] = {**merged.get(name, {}), **values}
    lines = []
    for name, values in merged.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in values.items()]
    for stream, model in (streams or {"sine": None}).items():
        lines += ["[[streams]]", f'name = "{stream}"', 'features = ["x"]', 'label = "y"',
                  'id = "id"'] + ([f'model = "{model}"'] if model else [])
    return "\n".join(lines) + "\n"


def drop(inbox: Path, name: str, data: bytes) -> Path:
    """Write an input the way producers must: a temporary name, then a rename."""
    tmp = inbox / f".drop-{os.getpid()}-{time.monotonic_ns()}.tmp"  # short: names may be long
    try:
        tmp.write_bytes(data)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise
    os.rename(tmp, inbox / name)
    return inbox / name


def sine_csv(ids: list[str], x: np.ndarray, y: np.ndarray | None) -> bytes:
    if y is None:
        return ("id,x\n" + "".join(f"{i},{a:.6f}\n" for i, a in zip(ids, x, strict=True))).encode()
    return ("id,x,y\n" + "".join(f"{i},{a:.6f},{b:.6f}\n"
                                 for i, a, b in zip(ids, x, y, strict=True))).encode()


def proc_figures(pid: int) -> dict[str, float]:
    """RSS (MB), open file descriptors and threads of a live process, from /proc."""
    out = {"rss_mb": float("nan"), "fds": float("nan"), "threads": float("nan")}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                out["rss_mb"] = int(line.split()[1]) / 1024
            elif line.startswith("Threads:"):
                out["threads"] = float(line.split()[1])
        out["fds"] = float(len(os.listdir(f"/proc/{pid}/fd")))
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return out


class DaemonProcess:
    """``edgemeta run --config FILE`` as a child process (started with ``-P``, so the working
    directory can never shadow the installed package)."""

    def __init__(self, config: Path, state: Path, port: int, log_path: Path):
        self.config = config
        self.state = state
        self.port = port
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self) -> None:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-P", "-m", "edgemeta", "run", "--config", str(self.config)],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        self.starts += 1

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def status(self) -> dict[str, Any]:
        try:
            return json.loads((self.state / "status.json").read_text())
        except (OSError, ValueError):
            return {}

    def worker_pid(self) -> int | None:
        status = self.status()
        pid = (status.get("worker") or {}).get("pid")
        return pid if status.get("pid") == self.pid else None

    def metrics(self) -> dict[str, float]:
        """Every sample of the scrape, keyed ``name{label="v",...}`` (labels sorted)."""
        from prometheus_client.parser import text_string_to_metric_families

        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
        out = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
                out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
        return out

    def total(self, name: str, **labels: str) -> float:
        """Sum of a metric's samples whose labels include ``labels``."""
        try:
            samples = self.metrics()
        except OSError:
            return float("nan")
        want = [f'{k}="{v}"' for k, v in labels.items()]
        return sum(v for k, v in samples.items()
                   if (k == name or k.startswith(name + "{")) and all(w in k for w in want))

    def wait(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"the daemon exited (status {self.proc.returncode}) while "
                                   f"waiting for {what}; log: {self.log_path}")
            time.sleep(0.05)
        raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")

    def wait_ready(self, timeout: float = 120.0) -> None:
        def up() -> bool:
            try:
                return self.status().get("pid") == self.pid and self.metrics() is not None
            except OSError:
                return False
        self.wait(up, timeout, "the daemon to serve")

    def kill9(self) -> None:
        if self.alive():
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        # The worker is the daemon's child in the same session: it notices its stdin closing and
        # exits; make sure nothing is left over even so.
        self._reap_session()

    def _reap_session(self) -> None:
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)

    def stop(self, timeout: float = 20.0) -> int | None:
        if not self.alive():
            self._reap_session()
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self._reap_session()
        return code
