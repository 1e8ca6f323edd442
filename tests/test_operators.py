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
        _alert_fires_on(seen)
        monkeypatch.setattr(d.layout, "write_predictions", real)
        d.degraded.state._next = 0.0  # the back-off's next try, now
        assert run_until(d, lambda: not d.degraded.active, timeout=10)
        assert not (inbox(d) / "held.csv").exists()
        assert counter(d, "edgemeta_degraded", reason="disk_full") == 0
    finally:
        d.shutdown(drain_s=0.5)


@pytest.mark.slow
def test_hostile_shapes_are_handled_in_well_under_a_second_while_metrics_answer(tmp_path,
                                                                                sinusoid_bundle):
    """A 32 KB JSONL line and a 64 KB trigger of escaped quotes in an unterminated string froze
    the daemon for 11 s and 35.7 s (a quadratic regex): now each is refused at once."""
    import threading
    import urllib.request

    from edgemeta.testing.harness import DaemonProcess, drop

    cfg = write_config(tmp_path, sinusoid_bundle.path)
    port = int(next(line.split("=")[1] for line in cfg.read_text().splitlines()
                    if line.startswith("port")))
    daemon = DaemonProcess(cfg, tmp_path / "state", port, tmp_path / "daemon.log")
    daemon.start()
    slowest = []
    stop = threading.Event()

    def scrape():
        while not stop.is_set():
            t = time.monotonic()
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as r:
                r.read()
            slowest.append(time.monotonic() - t)
            time.sleep(0.05)

    try:
        daemon.wait_ready()
        scraper = threading.Thread(target=scrape, daemon=True)
        scraper.start()
        state = tmp_path / "state"
        line = b'{"x": 1, "y": "' + b'\\"' * 16_000 + b"\n"
        start = time.monotonic()
        drop(state / "inbox" / "sine", "hostile.jsonl", b"[" * 40 + line)
        trigger = state / "triggers" / "adapt-hostile.json"
        tmp = state / "triggers" / ".adapt-hostile.tmp"
        tmp.write_bytes(b'{"stream": "' + b'\\"' * 32_000)
        tmp.rename(trigger)
        quarantined = state / "quarantine" / "sine" / "hostile.jsonl"
        daemon.wait(lambda: quarantined.exists() and not trigger.exists(), 10,
                    "both hostile inputs to be refused")
        elapsed = time.monotonic() - start
        stop.set()
        scraper.join(5)
        assert elapsed < 3.0, elapsed  # incl. settle_s and the trigger poll
        assert slowest and max(slowest) < 1.0, max(slowest)
    finally:
        stop.set()
        daemon.stop()


def test_a_file_over_its_time_budget_is_quarantined_too_slow(tmp_path, sinusoid_bundle,
                                                              monkeypatch):
    import edgemeta.daemon.inbox as inbox_module

    cfg = write_config(tmp_path, sinusoid_bundle.path, metrics={"enabled": False},
                       ingest={"settle_s": 0.05, "max_file_seconds": 0.3})
    d = Daemon(load_config(cfg), metrics=Metrics())
    d.setup()
    real = inbox_module.parse_rows

    def slow(*args, **kwargs):
        time.sleep(5)  # a shape no parser limit anticipated
        return real(*args, **kwargs)

    try:
        monkeypatch.setattr(inbox_module, "parse_rows", slow)
        sine_file(inbox(d), "slow", 1.0, 0.0)
        start = time.monotonic()
        assert run_until(d, lambda: not any(inbox(d).iterdir()), timeout=10)
        assert time.monotonic() - start < 3
        error = json.loads((d.layout.dir("quarantine", "sine") / "slow.csv.error.json")
                           .read_text())
        assert error["reason"] == "too_slow" and "max_file_seconds" in error["message"]
    finally:
        d.shutdown(drain_s=0.5)


def test_an_input_name_used_twice_keeps_both_files_and_both_predictions(tmp_path,
                                                                        sinusoid_bundle):
    cfg = write_config(tmp_path, sinusoid_bundle.path, metrics={"enabled": False})
    d = Daemon(load_config(cfg), metrics=Metrics())
    d.setup()
    try:
        for seed in (1, 2):
            sine_file(inbox(d), "same", 1.0, 0.0, n=10 + seed, seed=seed)
            assert run_until(d, lambda: not any(inbox(d).iterdir()), timeout=10)
        processed = sorted(p.name for p in d.layout.dir("processed", "sine").iterdir())
        outbox = sorted(p.name for p in d.layout.dir("outbox", "sine").iterdir())
        assert len(processed) == 2 and processed[0] != processed[1]
        rows = sorted(len(p.read_text().splitlines())
                      for p in d.layout.dir("outbox", "sine").iterdir())
        assert len(outbox) == 2 and rows == [11, 12]
    finally:
        d.shutdown(drain_s=0.5)


def test_small_input_mistakes_get_their_own_names(tmp_path):
    from edgemeta.config import StreamSettings
    from edgemeta.daemon.triggers import TriggerRejected, parse_trigger_bytes
    from edgemeta.stream.ingest import PendingFiles
    from edgemeta.stream.parsing import IngestError, Limits, parse_rows_bytes

    stream = StreamSettings(name="s", features=["x"], label="y", id="id")
    with pytest.raises(IngestError) as exc:
        parse_rows_bytes(b"x,y\n1,2\n", "data.txt", stream, Limits())
    assert exc.value.reason == "unsupported_format"
    with pytest.raises(IngestError) as exc:
        parse_rows_bytes(b"id,x,y\na,1_000,2\n", "data.csv", stream, Limits())
    assert exc.value.reason == "non_numeric" and "1_000" in str(exc.value)
    (tmp_path / "inbox").mkdir()
    with pytest.raises(TriggerRejected) as rejected:
        parse_trigger_bytes(json.dumps({"support": "s" * 300}).encode(),
                            tmp_path / "triggers" / "adapt-1.json", tmp_path, ["s"])
    assert rejected.value.reason == "malformed" and "too long" in str(rejected.value)
    # A producer writing in chunks under the final name: a new mtime restarts the wait.
    path = tmp_path / "chunked.csv"
    path.write_text("id,x,y\n")
    pending = PendingFiles(settle_s=1.0)
    pending.add("s", path, now=0.0)
    assert pending.ready(now=0.0) == []
    import os

    os.utime(path, ns=(10**9, 10**9))  # same size, rewritten
    assert pending.ready(now=1.5) == []
    assert pending.ready(now=3.0) == [("s", path)]


def test_a_reload_is_checked_as_a_start_applies_what_it_can_and_names_the_rest(
        tmp_path, sinusoid_bundle, caplog):
    cfg = write_config(tmp_path, sinusoid_bundle.path, metrics={"enabled": False})
    d = Daemon(load_config(cfg), metrics=Metrics())
    d.setup()
    try:
        sine_file(inbox(d), "before", 1.0, 0.0)
        assert run_until(d, lambda: not any(inbox(d).iterdir()), timeout=10)
        text = cfg.read_text()
        # A config the bundle cannot serve (two features for a one-feature bundle): refused.
        cfg.write_text(text.replace('features = ["x"]', 'features = ["x", "id2"]'))
        d.reload()
        assert counter(d, "edgemeta_reloads_total", result="refused") == 1
        assert "reload refused" in caplog.text and "features" in caplog.text
        sine_file(inbox(d), "after", 1.0, 0.0)
        assert run_until(d, lambda: not any(inbox(d).iterdir()), timeout=10)
        assert (d.layout.dir("processed", "sine") / "after.csv").exists()  # still served
        # A good one: the reloadable key applies, the restart-only one is named and kept.
        cfg.write_text(text.replace("[retention]", "[retention]\nkeep_models = 3", 1)
                       if "[retention]" in text else
                       text + "[retention]\nkeep_models = 3\n[serving]\nintra_op_threads = 2\n")
        caplog.clear()
        before = d.streams.view("sine")
        assert before.regime_rows > 0 and before.baseline_rows > 0
        d.reload()
        assert counter(d, "edgemeta_reloads_total", result="applied") == 1
        assert d.registry.keep == 3 and d.settings.retention.keep_models == 3
        assert "serving.intra_op_threads changed; it takes effect on restart" in caplog.text
        assert d.settings.serving.intra_op_threads == 1
        # Nothing the detector or the regime depends on changed: both kept what they learned.
        after = d.streams.view("sine")  # a rebuilt detector or regime would start from 0
        assert (after.regime_rows, after.baseline_rows) == (before.regime_rows,
                                                            before.baseline_rows)
    finally:
        d.shutdown(drain_s=0.5)


def test_config_docs_lists_every_key_with_its_default_and_reload_policy():
    out = run_edgemeta("config", "docs")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert any(line.startswith("gate.alpha") and " yes " in line for line in lines)
    assert any(line.startswith("metrics.port") and " restart " in line for line in lines)
    assert any(line.startswith("retention.keep_models") and ">= 2" in line for line in lines)
    # Every key says what it is for, whether its comment trails it or stands above it.
    undocumented = [line.split()[0] for line in lines[1:] if len(line.split()) <= 3]
    assert not undocumented, undocumented
    assert any(line.startswith("adaptation.cpu_threads") and "busy" in line for line in lines)


def _alert_fires_on(samples: list[float]) -> None:
    """The gauge as the daemon exported it, replayed one sample per 15 s scrape through the
    real alert rule: EdgemetaDegraded (for: 2m) fires. (It never could while the mode flapped.)"""
    import shutil
    import tempfile
    from pathlib import Path

    from tests.conftest import MISSING_TOOL

    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip(MISSING_TOOL + "promtool (Debian package prometheus)")
    rules = Path(ROOT / "deploy" / "prometheus" / "edgemeta.rules.yml")
    series = " ".join(f"{v:g}" for v in (samples * 12)[:12])  # 3 minutes of scrapes
    description = next(line.split("description: ", 1)[1].strip().strip('"')
                       for line in rules.read_text().splitlines()
                       if "description:" in line and "Writes to the state directory" in line)
    description = description.replace("{{ $labels.reason }}", "disk_full")
    test = f"""rule_files: [{rules}]
evaluation_interval: 15s
tests:
  - interval: 15s
    input_series:
      - series: 'edgemeta_degraded{{instance="d", reason="disk_full"}}'
        values: '{series}'
    alert_rule_test:
      - eval_time: 2m45s
        alertname: EdgemetaDegraded
        exp_alerts:
          - exp_labels: {{severity: critical, instance: d, reason: disk_full}}
            exp_annotations:
              summary: "edgemeta on d is degraded: disk_full"
              description: "@DESCRIPTION@"
              runbook_url: "file:///usr/share/doc/edgemeta/operations.md#edgemetadegraded"
"""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "flapping.test.yml"
        path.write_text(test.replace("@DESCRIPTION@", description))
        out = subprocess.run([promtool, "test", "rules", str(path)], capture_output=True,
                             text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
