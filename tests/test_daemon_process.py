"""`edgemeta run` as systemd runs it: a real process, a real notify socket, a real metrics port."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import drop_drifting_stream, sine_file, write_config

ROOT = Path(__file__).resolve().parents[1]


class FakeSystemd:
    """Owns the NOTIFY_SOCKET datagram socket and records what the daemon says."""

    def __init__(self, path: Path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.1)
        self.path = path
        self.messages: list[tuple[float, dict[str, str]]] = []

    def pump(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            self.messages.append((time.monotonic(), fields))

    def wait_for(self, key: str, timeout: float, after: float = 0.0) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for t, fields in self.messages:
                if t >= after and key in fields:
                    return fields
            self.pump(0.1)
        raise AssertionError(f"no {key} within {timeout}s; got {[m for _, m in self.messages][-5:]}")

    def count(self, key: str, since: float) -> int:
        return sum(1 for t, f in self.messages if t >= since and key in f)


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        return resp.read().decode()


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def metric_sum(text: str, name: str, *labels: str) -> float:
    """Sum of ``name``'s samples whose label set holds every one of ``labels``."""
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") and all(label in line for label in labels))


@pytest.mark.slow
def test_daemon_speaks_the_systemd_notify_protocol_and_serves_metrics(tmp_path, sinusoid_bundle):
    cfg = write_config(tmp_path, sinusoid_bundle.path)
    port = int(next(line.split("=")[1] for line in cfg.read_text().splitlines()
                    if line.startswith("port")))
    systemd = FakeSystemd(tmp_path / "notify.sock")
    env = {**os.environ, "NOTIFY_SOCKET": str(systemd.path), "WATCHDOG_USEC": "400000"}
    proc = subprocess.Popen([sys.executable, "-m", "edgemeta", "run", "--config", str(cfg)],
                            cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    try:
        ready = systemd.wait_for("READY", timeout=60)
        assert "serving sine v1" in ready["STATUS"]
        # READY only once the model serves and the inboxes exist.
        assert metric(scrape(port), 'edgemeta_model_version{stream="sine"}') == 1
        inbox = tmp_path / "state" / "inbox" / "sine"
        assert inbox.is_dir()
        start = time.monotonic()
        systemd.pump(1.0)
        assert systemd.count("WATCHDOG", start) >= 3

        drop_drifting_stream(inbox)
        deadline = time.monotonic() + 60
        while metric_sum(scrape(port), "edgemeta_adaptations_total", 'result="accepted"') < 1:
            if time.monotonic() > deadline:
                proc.kill()
                raise AssertionError(proc.communicate()[1][-5000:])
            systemd.pump(0.2)
        text = scrape(port)
        assert metric(text, 'edgemeta_model_version{stream="sine"}') == 2
        assert metric(text, 'edgemeta_drift_detections_total{detector="adwin",stream="sine"}') >= 1

        # An adaptation that hangs (frozen worker) must not stop the watchdog pings.
        worker = int(subprocess.run(["pgrep", "-f", "edgemeta.meta.worker", "-P", str(proc.pid)],
                                    capture_output=True, text=True).stdout.split()[0])
        os.kill(worker, signal.SIGSTOP)
        subprocess.run([sys.executable, "-m", "edgemeta", "trigger", "adapt", "--config", str(cfg),
                        "--no-wait"], check=True, cwd=ROOT, capture_output=True)
        done = tmp_path / "state" / "triggers" / "done"
        deadline = time.monotonic() + 30
        while not any(done.glob("*adapt-*.result.json")) and time.monotonic() < deadline:
            systemd.pump(0.1)  # the daemon answers the trigger (it keeps pinging meanwhile)
        sine_file(inbox, "c000", 2.0, 1.0, seed=7)
        hang = time.monotonic()
        systemd.pump(1.5)
        assert systemd.count("WATCHDOG", hang) >= 4
        os.kill(worker, signal.SIGCONT)

        before = time.monotonic()
        proc.send_signal(signal.SIGHUP)
        reloading = systemd.wait_for("RELOADING", timeout=10, after=before)
        assert int(reloading["MONOTONIC_USEC"]) > 0
        systemd.wait_for("READY", timeout=10, after=before)

        before = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        systemd.wait_for("STOPPING", timeout=10, after=before)
        assert proc.wait(timeout=10) == 0
        assert time.monotonic() - before < 10
    finally:
        if proc.poll() is None:
            proc.kill()
        stderr = proc.communicate()[1]
    assert "drift detected stream=sine" in stderr and "adaptation accepted stream=sine" in stderr


def test_bad_config_refuses_to_start_naming_the_key(tmp_path, sinusoid_bundle):
    cfg = write_config(tmp_path, sinusoid_bundle.path, drift={"detector": "magic"})
    proc = subprocess.run([sys.executable, "-m", "edgemeta", "run", "--config", str(cfg)],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "drift.detector: 'magic' is not one of" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "edgemeta", "config", "check", str(cfg)],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "edgemeta.toml: drift.detector" in proc.stderr


def test_serving_process_never_imports_torch(tmp_path):
    code = ("import sys, edgemeta.daemon.runtime, edgemeta.cli; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=ROOT)
    assert out.stdout.strip() == "False"
