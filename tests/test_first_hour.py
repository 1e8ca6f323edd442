"""What a new user meets in the first hour: child processes, Ctrl-C, pipes, a taken port."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from edgemeta.daemon.adapter import AdapterClient
from tests.conftest import write_config


def test_a_folder_holding_a_checkout_named_edgemeta_does_not_shadow_the_worker(
        tmp_path, sinusoid_bundle, monkeypatch):
    """... and the worker it starts runs one torch thread unless told otherwise (two threads
    waiting on each other's barriers are 3-4x slower on a busy 2-core device)."""
    fake = tmp_path / "edgemeta"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise ImportError('the wrong edgemeta was imported')\n")
    monkeypatch.chdir(tmp_path)
    client = AdapterClient(sinusoid_bundle.path, device="cpu")
    client.start()
    try:
        assert client.wait_ready(120), "the worker imported the folder's edgemeta"
        assert client.info["cpu_threads"] == 1
    finally:
        client.stop()


def _wait_for_worker(state: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        try:
            status = json.loads((state / "status.json").read_text())
        except (OSError, ValueError):
            status = {}
        if status.get("pid") == proc.pid and (status.get("worker") or {}).get("ready"):
            return
        time.sleep(0.1)
    raise AssertionError("the daemon's worker never came up")


def test_ctrl_c_on_run_stops_the_daemon_and_its_worker_without_a_traceback(tmp_path, sinusoid_bundle):
    cfg = write_config(tmp_path, sinusoid_bundle.path, metrics={"enabled": False})
    proc = subprocess.Popen([sys.executable, "-P", "-m", "edgemeta", "run", "--config", str(cfg)],
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _wait_for_worker(tmp_path / "state", proc)
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole group
        _, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, stderr[-3000:]
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr[-3000:]


def test_a_metrics_port_in_use_refuses_to_start_naming_the_key_and_the_port(tmp_path, sinusoid_bundle):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cfg = write_config(tmp_path, sinusoid_bundle.path,
                           metrics={"port": port, "address": "127.0.0.1"})
        out = subprocess.run([sys.executable, "-P", "-m", "edgemeta", "run", "--config", str(cfg)],
                             capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert f"metrics.port: cannot listen on 127.0.0.1:{port}" in out.stderr
    assert "Traceback" not in out.stderr, out.stderr[-3000:]


def test_output_into_a_closed_pipe_ends_quietly(tmp_path, sinusoid_bundle):
    cfg = write_config(tmp_path, sinusoid_bundle.path)
    read_end, write_end = os.pipe()
    os.close(read_end)  # `| head` that has already gone
    try:
        out = subprocess.run([sys.executable, "-P", "-m", "edgemeta", "config", "check", str(cfg)],
                             stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=60)
    finally:
        os.close(write_end)
    assert out.returncode == 141
    assert out.stderr == ""


def test_a_second_daemon_on_the_same_state_dir_refuses_naming_the_first_and_the_lock_is_freed(
        tmp_path, sinusoid_bundle):
    """Two daemons on one state dir would share an inbox and a registry: the second `run`
    (another metrics port) refuses and names the pid that holds it; once the first stops, the
    directory is free again."""
    from edgemeta.config import load_config
    from edgemeta.daemon.metrics import Metrics
    from edgemeta.daemon.runtime import Daemon

    first_cfg = write_config(tmp_path, sinusoid_bundle.path, metrics={"enabled": False})
    first = Daemon(load_config(first_cfg), metrics=Metrics())
    first.setup()
    try:
        second_cfg = tmp_path / "second.toml"
        second_cfg.write_text(write_config(tmp_path, sinusoid_bundle.path).read_text())
        out = subprocess.run([sys.executable, "-P", "-m", "edgemeta", "run", "--config",
                              str(second_cfg)], capture_output=True, text=True, timeout=120)
        assert out.returncode == 2
        assert f"is in use by pid {os.getpid()}" in out.stderr, out.stderr[-2000:]
        assert "Traceback" not in out.stderr
        first.write_status()
        status = subprocess.run([sys.executable, "-P", "-m", "edgemeta", "status", "--config",
                                 str(second_cfg)], capture_output=True, text=True, timeout=60)
        assert status.returncode == 0 and f"pid {os.getpid()}" in status.stdout, status
    finally:
        first.shutdown(drain_s=0.2)
    again = Daemon(load_config(first_cfg), metrics=Metrics())
    again.setup()
    again.shutdown(drain_s=0.2)


def test_a_misspelt_inbox_folder_and_a_file_without_its_label_column_are_each_said_once(
        tmp_path, sinusoid_bundle, caplog):
    """Two silent acceptances a newcomer met: files in ``inbox/sensors/`` (no such stream) that
    waited forever, and a CSV without the configured label column, served while the stream's
    drift could never be watched. Each is one log line, not one per file or per rescan."""
    import logging

    from edgemeta.config import load_config
    from edgemeta.daemon.metrics import Metrics
    from edgemeta.daemon.runtime import Daemon
    from tests.conftest import inbox, run_until

    cfg = write_config(tmp_path, sinusoid_bundle.path, metrics={"enabled": False})
    d = Daemon(load_config(cfg), metrics=Metrics())
    d.setup()
    caplog.set_level(logging.WARNING, logger="edgemeta")
    try:
        stray = d.settings.state_dir / "inbox" / "sensors"
        stray.mkdir()
        (stray / "a.csv").write_text("x,y\n1,2\n")
        for i in range(3):
            (inbox(d) / f"nolabel{i}.csv").write_text(f"id,x\nn{i}a,0.5\nn{i}b,1.5\n")
            d.rescan()
        assert run_until(d, lambda: not any(inbox(d).iterdir()), timeout=10)
        text = caplog.text
        assert text.count("inbox/sensors is not a configured stream (streams: sine)") == 1
        assert text.count("has no label column 'y'") == 1
        assert "drift on this stream cannot be detected" in text
        assert (stray / "a.csv").exists()  # left alone, not lost
    finally:
        d.shutdown(drain_s=0.2)


def test_replay_feeds_a_running_daemon_with_delayed_labels_and_refuses_a_foreign_source(
        tmp_path, sinusoid_bundle):
    """`edgemeta replay` is the shortest path to a daemon at work: a recorded CSV goes into the
    stream's inbox as renamed files, its labels later in label files joined by id; every row
    is answered and every label matched. A source without the stream's features is refused
    with the file and the columns named."""
    import numpy as np

    from edgemeta.config import load_config
    from edgemeta.daemon.metrics import Metrics
    from edgemeta.daemon.runtime import Daemon
    from tests.conftest import counter, inbox, run_until

    cfg = write_config(tmp_path, sinusoid_bundle.path, metrics={"enabled": False})
    x = np.linspace(-5, 5, 120)
    source = tmp_path / "recording.csv"
    source.write_text("x,y\n" + "".join(f"{a},{np.sin(a)}\n" for a in x))
    d = Daemon(load_config(cfg), metrics=Metrics())
    d.setup()
    try:
        proc = subprocess.Popen([sys.executable, "-P", "-m", "edgemeta", "replay", str(source),
                                 "--config", str(cfg), "--rate", "600", "--rows-per-file", "20",
                                 "--labels", "delayed"], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        assert run_until(d, lambda: proc.poll() is not None and not any(inbox(d).iterdir()),
                         timeout=120)
        out, err = proc.communicate()
        assert proc.returncode == 0 and "120 rows written" in out, err
        outbox = d.settings.state_dir / "outbox" / "sine"
        answered = sum(len(p.read_text().splitlines()) for p in outbox.glob("*.predictions.jsonl")
                       if not p.name.endswith(".labels.csv.predictions.jsonl"))
        assert answered == 120
        assert counter(d, "edgemeta_labels_total", stream="sine", result="matched") == 120
    finally:
        d.shutdown(drain_s=0.2)
    (tmp_path / "other.csv").write_text("z\n1\n")
    refused = subprocess.run([sys.executable, "-P", "-m", "edgemeta", "replay",
                              str(tmp_path / "other.csv"), "--config", str(cfg)],
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2
    assert "other.csv: line 1: missing feature column(s) ['x']" in refused.stderr


def _edgemeta(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-P", "-m", "edgemeta", *args], capture_output=True,
                          text=True, timeout=120)


def test_one_spelling_for_the_same_thing_across_commands_with_the_old_ones_kept(
        tmp_path, sinusoid_bundle):
    """`--config FILE` everywhere (config check took a positional), `--state DIR` wherever a
    state directory will do (models list had it, status did not), `--to` for the version a
    rollback serves (models rollback had it, trigger rollback said --version); the old
    spellings still work for one release."""
    from edgemeta.config import load_config
    from edgemeta.daemon.metrics import Metrics
    from edgemeta.daemon.runtime import Daemon

    cfg = write_config(tmp_path, sinusoid_bundle.path, metrics={"enabled": False})
    assert _edgemeta("config", "check", "--config", str(cfg)).returncode == 0
    assert _edgemeta("config", "check", str(cfg)).returncode == 0
    neither = _edgemeta("config", "check")
    assert neither.returncode == 2 and "--config FILE" in neither.stderr

    daemon = Daemon(load_config(cfg), metrics=Metrics())
    daemon.setup()
    daemon.write_status()
    daemon.shutdown(drain_s=0.2)
    state = daemon.settings.state_dir
    by_state = _edgemeta("status", "--state", str(state))
    assert by_state.returncode == 3 and "NOT RUNNING" in by_state.stdout, by_state
    by_config = _edgemeta("status", "--config", str(cfg))
    # The same status either way (up to its age in seconds: the two reads may straddle one).
    def aged(text: str) -> str:
        return re.sub(r"updated \d+s ago", "updated Ns ago", text)
    assert by_config.returncode == 3 and aged(by_config.stdout) == aged(by_state.stdout)

    for spelling, version in (("--to", "1"), ("--version", "2")):
        out = _edgemeta("trigger", "rollback", "--config", str(cfg), spelling, version,
                        "--queue", "--no-wait")
        assert out.returncode == 0, out.stderr
    bodies = sorted(json.loads(p.read_text())["version"]
                    for p in (state / "triggers").glob("rollback-*.json"))
    assert bodies == [1, 2]
