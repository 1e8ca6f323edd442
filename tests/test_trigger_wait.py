"""`edgemeta trigger --wait` follows a trigger to its outcome against a real daemon process."""

from __future__ import annotations

import subprocess
import sys
import time

from edgemeta.testing.harness import DaemonProcess
from tests.conftest import sine_file, write_config


def trigger(cfg, *args: str, timeout: float = 180) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-P", "-m", "edgemeta", "trigger", *args, "--config",
                             str(cfg)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_wait_reports_the_collection_and_the_verdict_of_a_manual_adaptation(tmp_path, sinusoid_bundle):
    cfg = write_config(tmp_path, sinusoid_bundle.path)
    port = int(next(line.split("=")[1] for line in cfg.read_text().splitlines()
                    if line.startswith("port")))
    daemon = DaemonProcess(cfg, tmp_path / "state", port, tmp_path / "daemon.log")
    daemon.start()
    try:
        daemon.wait_ready()
        waiting = trigger(cfg, "adapt", "--wait", "--timeout", "120")
        done = tmp_path / "state" / "triggers" / "done"
        daemon.wait(lambda: done.is_dir() and any(done.glob("*adapt-*.result.json")), 60,
                    "the trigger to be answered")  # "collecting 30 labelled samples"
        sine_file(tmp_path / "state" / "inbox" / "sine", "new-task", 4.5, 2.5, n=60, seed=3)
        out, err = waiting.communicate(timeout=150)
        assert waiting.returncode == 0, out + err
        assert "daemon: ok: collecting 30 labelled samples on stream sine" in out
        assert "accepted: v2 now serves stream sine; holdout loss" in out

        rollback = trigger(cfg, "rollback", "--wait")
        out, err = rollback.communicate(timeout=60)
        assert rollback.returncode == 0, out + err
        assert "daemon: ok: sine now serves v3 (rollback to v1)" in out
    finally:
        daemon.stop()


def test_with_no_daemon_trigger_refuses_at_once_unless_queued_and_a_queued_wait_times_out(
        tmp_path, sinusoid_bundle):
    cfg = write_config(tmp_path, sinusoid_bundle.path)
    triggers = tmp_path / "state" / "triggers"
    refused = trigger(cfg, "adapt", "--wait")
    out, err = refused.communicate(timeout=60)
    assert refused.returncode != 0 and "no daemon is running on state.dir" in err
    assert not (triggers.exists() and any(triggers.iterdir())), "nothing left behind to fire later"
    started = time.monotonic()
    quick = trigger(cfg, "reload", "--queue")  # stdout is a pipe, not a terminal: no waiting
    out, _ = quick.communicate(timeout=60)
    assert quick.returncode == 0 and "trigger written" in out and "daemon:" not in out
    assert time.monotonic() - started < 30
    stuck = trigger(cfg, "reload", "--queue", "--wait", "--timeout", "1")
    out, _ = stuck.communicate(timeout=60)
    assert stuck.returncode == 3
    assert "no answer from the daemon after 1 s" in out
