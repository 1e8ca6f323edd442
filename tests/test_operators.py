"""Operators can't break it: readers of the registry have no side effects, a hostile file cannot
stall the loop, degraded mode ends only when the paused work goes through, names used twice."""

from __future__ import annotations

import errno
import json
import subprocess
import sys
import time

import pytest

from edgemeta.config import ConfigError, load_config
from edgemeta.daemon.metrics import Metrics
from edgemeta.daemon.runtime import Daemon
from edgemeta.serve.registry import Registry, RegistryError
from tests.conftest import ROOT, counter, inbox, run_edgemeta, run_until, sine_file, write_config

WRITER = """
import json, sys, time
from edgemeta.serve.registry import Registry
reg = Registry(sys.argv[1], keep=5)
failed = 0
for i in range(300):
    try:
        reg.commit(b"model-%d" % i + b"x" * 20000, source="drift", lineage="s")
    except Exception as exc:
        failed += 1
        print(repr(exc), file=sys.stderr)
    time.sleep(0.01)
print(json.dumps({"failed": failed}))
"""


@pytest.mark.slow
def test_models_list_in_a_loop_during_300_commits_breaks_nothing(tmp_path):
    """`models list` used to sweep the temp folders of commits in progress: commits failed,
    CLI runs crashed and version folders were left broken."""
    state = tmp_path / "state"
    Registry(state).commit(b"meta-init", source="meta-init")
    writer = subprocess.Popen([sys.executable, "-P", "-c", WRITER, str(state)], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lists = []
    while writer.poll() is None:
        lists.append(run_edgemeta("models", "list", "--state", str(state)))
    out, err = writer.communicate()
    assert json.loads(out)["failed"] == 0, err
    assert len(lists) >= 2
    assert all(r.returncode == 0 for r in lists), [r.stderr for r in lists if r.returncode][:2]
    assert not any("BROKEN" in r.stdout for r in lists)
    rows = Registry(state, writable=False).list()
    assert rows and all(r["ok"] for r in rows)


def test_a_read_only_registry_has_no_side_effect_and_refuses_writes(tmp_path):
    reg = Registry(tmp_path)
    reg.commit(b"m", source="meta-init")
    leftover = reg.root / ".tmp-v000002-inflight"
    leftover.mkdir()  # a commit the daemon is writing right now
    view = Registry(tmp_path, writable=False)
    assert [r["version"] for r in view.list()] == [1]
    assert leftover.is_dir()
    with pytest.raises(RegistryError, match="read-only"):
        view.commit(b"m2", source="drift")
    with pytest.raises(RegistryError, match="no models directory"):
        Registry(tmp_path / "elsewhere", writable=False)


def test_a_rollback_stays_within_its_lineage(tmp_path):
    reg = Registry(tmp_path)
    reg.commit(b"m", source="meta-init")
    other = reg.commit(b"pump", source="drift", lineage="pump").version
    reg.commit(b"fan", source="drift", lineage="fan")
    with pytest.raises(RegistryError, match="belongs to lineage 'pump'"):
        reg.rollback(to=other, lineage="fan")
    assert reg.rollback(to=1, lineage="fan").parent == 1  # the shared meta-init is every lineage's


def test_keep_models_below_two_is_refused_by_name(tmp_path, sinusoid_bundle):
    cfg = write_config(tmp_path, sinusoid_bundle.path, retention={"keep_models": 1})
    with pytest.raises(ConfigError, match="retention.keep_models: must be >= 2"):
        load_config(cfg)


def test_committed_versions_are_readable_by_the_operators_group(tmp_path):
    reg = Registry(tmp_path)
    reg.commit(b"m", source="meta-init")
    assert reg.path(1).stat().st_mode & 0o050 == 0o050


def test_degraded_mode_ends_only_when_the_paused_work_goes_through(tmp_path, sinusoid_bundle,
                                                                   monkeypatch):
    """Room for status.json but not for a predictions file: every status write used to end
    degraded mode (368 flips in 120 s), so the alert's `for: 2m` could never fire."""
    cfg = write_config(tmp_path, sinusoid_bundle.path, metrics={"enabled": False})
    d = Daemon(load_config(cfg), metrics=Metrics())
    d.setup()
    try:
        real = d.layout.write_predictions

        def full(*args, **kwargs):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(d.layout, "write_predictions", full)
        sine_file(inbox(d), "held", 1.0, 0.0)
        assert run_until(d, lambda: d.degraded.active, timeout=10)
        seen = []
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline:
            d.step(wait=0.02)
            d.write_status()  # status writes go through: they must not end the mode
            seen.append(counter(d, "edgemeta_degraded", reason="disk_full"))
        assert set(seen) == {1.0}
        assert (inbox(d) / "held.csv").exists()
        monkeypatch.setattr(d.layout, "write_predictions", real)
        d.degraded.state._next = 0.0  # the back-off's next try, now
        assert run_until(d, lambda: not d.degraded.active, timeout=10)
        assert not (inbox(d) / "held.csv").exists()
        assert counter(d, "edgemeta_degraded", reason="disk_full") == 0
    finally:
        d.shutdown(drain_s=0.5)
