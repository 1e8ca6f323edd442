"""The control loop as a user meets it: a real daemon process on a busy machine, a stream that
switches tasks in its first seconds, and a detector that watches in every phase."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from edgemeta.testing.harness import DaemonProcess, drop, free_port, sine_csv, write_config
from tests.conftest import CpuBurners

TASK_A = (1.0, 0.0)   # amplitude, phase
TASK_B = (4.5, 2.5)


class Producer(threading.Thread):
    """Writes labelled sinusoid files of ``rows_per_file`` rows at ``rate`` rows/s (temp name,
    then rename): ``plan`` is a list of (prefix, task, rows); ``more`` is called between files
    of the last task and says whether to go on past its rows (up to ``limit`` of them)."""

    def __init__(self, inbox: Path, plan, rate: float = 150.0, rows_per_file: int = 15,
                 more=None, limit: int = 0):
        super().__init__(daemon=True)
        self.inbox, self.plan, self.rate, self.per_file = inbox, plan, rate, rows_per_file
        self.more, self.limit = more, limit
        self.truth: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # file -> (ids order, y)
        self.order: list[str] = []

    def _write(self, name: str, task, rng) -> None:
        x = rng.uniform(-5, 5, self.per_file)
        y = task[0] * np.sin(x - task[1])
        ids = [f"{name}-{i}" for i in range(self.per_file)]
        drop(self.inbox, f"{name}.csv", sine_csv(ids, x, y))
        self.truth[name] = y
        self.order.append(name)
        time.sleep(self.per_file / self.rate)

    def run(self) -> None:
        rng = np.random.default_rng(0)
        for i, (prefix, task, rows) in enumerate(self.plan):
            last = i == len(self.plan) - 1
            written = 0
            while written < rows or (last and self.more is not None and written < self.limit
                                     and self.more()):
                self._write(f"{prefix}{written // self.per_file:04d}", task, rng)
                written += self.per_file


def served_errors(state: Path, producer: Producer, prefix: str) -> np.ndarray:
    """Squared error of every prediction the daemon wrote for the files of ``prefix``, in
    stream order."""
    errors = []
    for name in producer.order:
        if not name.startswith(prefix):
            continue
        out = state / "outbox" / "sine" / f"{name}.csv.predictions.jsonl"
        records = [json.loads(line) for line in out.read_text().splitlines()]
        pred = np.array([r["prediction"] for r in records], float)
        errors.append((pred - producer.truth[name]) ** 2)
    return np.concatenate(errors)


def start_daemon(tmp_path: Path, bundle: Path, **sections) -> DaemonProcess:
    port = free_port()
    state = tmp_path / "state"
    cfg = write_config(tmp_path / "edgemeta.toml", bundle, state, port, **sections)
    daemon = DaemonProcess(cfg, state, port, tmp_path / "daemon.log")
    daemon.start()
    daemon.wait_ready(120)
    return daemon


def wait_processed(daemon: DaemonProcess, producer: Producer, timeout: float = 120) -> None:
    producer.join(timeout)
    inbox = daemon.state / "inbox" / "sine"
    daemon.wait(lambda: not any(p.suffix == ".csv" for p in inbox.iterdir()), timeout,
                "every input to be handled")


@pytest.mark.slow
def test_a_switch_in_the_first_seconds_is_detected_and_adapted_to_on_a_busy_machine(
        tmp_path, sinusoid_bundle):
    """The scenario that failed from outside: a fresh daemon, 600 rows of task A then 600 of
    task B at about 150 labelled rows/s, starting as soon as the daemon serves, while two
    CPU-bound processes run beside it. The worker's cold start, the initial adaptation and the
    continued fits all overlap the stream; the detector must see the switch anyway."""
    burners = CpuBurners().start()
    daemon = None
    try:
        daemon = start_daemon(tmp_path, sinusoid_bundle.path)
        producer = Producer(daemon.state / "inbox" / "sine",
                            [("a", TASK_A, 600), ("b", TASK_B, 600)])
        producer.start()
        wait_processed(daemon, producer)
        assert daemon.total("edgemeta_drift_detections_total") >= 1, daemon.log_path.read_text()
        assert daemon.total("edgemeta_adaptations_total", result="accepted") >= 1, \
            daemon.log_path.read_text()
        b = served_errors(daemon.state, producer, "b")
        assert len(b) == 600
        assert b[-200:].mean() <= 0.5 * b[:10].mean(), (b[:10].mean(), b[-200:].mean())
    finally:
        if daemon is not None:
            daemon.stop()
        burners.stop()


@pytest.mark.slow
def test_start_up_serves_and_watches_while_the_worker_is_still_starting(
        tmp_path, sinusoid_bundle, monkeypatch):
    """A worker slower to start than task A lasts (as with a CUDA build on a small device): the
    switch to B is detected while the worker is not ready, the episode waits for it (one log
    line, a phase in status), and is adapted to once it is up."""
    monkeypatch.setenv("EDGEMETA_TEST_WORKER_START_DELAY_S", "12")
    daemon = start_daemon(tmp_path, sinusoid_bundle.path)
    seen_waiting, after = [], []

    def more() -> bool:
        """Task B goes on until 150 rows after the first accepted adaptation."""
        status = daemon.status().get("streams", {}).get("sine", {})
        if status.get("phase") == "waiting_for_worker":
            seen_waiting.append(True)
        if daemon.total("edgemeta_adaptations_total", result="accepted") >= 1:
            after.append(True)
        return len(after) * 15 < 150

    try:
        producer = Producer(daemon.state / "inbox" / "sine", [("a", TASK_A, 300),
                                                              ("b", TASK_B, 300)],
                            more=more, limit=6000)
        producer.start()
        daemon.wait(lambda: daemon.total("edgemeta_drift_detections_total") >= 1, 60,
                    "the switch to be detected")
        assert daemon.total("edgemeta_worker_up") == 0, "detected before the worker was up"
        wait_processed(daemon, producer, timeout=180)
        assert daemon.total("edgemeta_adaptations_total", result="accepted") >= 1
        assert seen_waiting, "status showed the episode waiting for the worker"
        log = daemon.log_path.read_text()
        assert log.count("adaptation waiting for the worker") <= 3, "logged once per episode"
        b = served_errors(daemon.state, producer, "b")
        assert b[-100:].mean() <= 0.5 * b[:10].mean(), (b[:10].mean(), b[-100:].mean())
    finally:
        daemon.stop()
