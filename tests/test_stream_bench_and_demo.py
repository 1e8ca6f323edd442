"""The demo end to end, and the stream benchmark's in-process path against the file-driven daemon."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from edgemeta.bench.stream import daemon_config, run_edgemeta, switching_stream
from edgemeta.config import load_config
from edgemeta.daemon.metrics import Metrics
from edgemeta.daemon.runtime import Daemon
from edgemeta.stream.drift import DriftMonitor

ROOT = Path(__file__).resolve().parents[1]


def test_switching_stream_switches_at_about_the_hazard_rate_and_is_seeded():
    a = switching_stream("sinusoid", n=30_000, hazard=1 / 300, seed=1)
    b = switching_stream("sinusoid", n=30_000, hazard=1 / 300, seed=1)
    assert np.array_equal(a.y, b.y) and a.switches == b.switches
    segments = np.diff([0, *a.switches])  # the last one is cut short by the end of the stream
    assert 200 < segments.mean() < 400 and segments.min() >= 30
    assert len(np.unique(a.task)) == len(a.switches) + 1
    c = switching_stream("hyperplane", n=5000, noise=0.0, seed=2)
    assert set(np.unique(c.y)) == {0, 1} and c.x.shape == (5000, 2)


def test_an_error_that_falls_is_not_a_drift():
    rng = np.random.default_rng(0)
    monitor = DriftMonitor("adwin", kind="regression")
    falls = [monitor.update_error(v) for v in
             np.concatenate([5 * rng.chisquare(1, 400), 0.1 * rng.chisquare(1, 400)])]
    assert not any(falls)
    rises = [monitor.update_error(v) for v in 8 * rng.chisquare(1, 300)]
    assert any(rises)


def _feed_file(daemon: Daemon, inbox: Path, name: str, x: np.ndarray, y: np.ndarray) -> None:
    tmp = inbox / f".{name}.tmp"
    tmp.write_text("x0,y\n" + "".join(f"{float(a)!r},{float(b)!r}\n"
                                      for a, b in zip(x[:, 0], y, strict=True)))
    tmp.rename(inbox / f"{name}.csv")
    deadline = time.monotonic() + 20
    while any(inbox.iterdir()) and time.monotonic() < deadline:
        daemon.step(wait=0.01)
    assert not any(inbox.iterdir()), f"{name} was not handled"
    assert daemon.drain(60)


def test_the_benchmark_path_and_the_file_driven_daemon_make_the_same_decisions(
        tmp_path, sinusoid_bundle):
    stream = switching_stream("sinusoid", n=1500, hazard=1 / 300, seed=3)
    batch = 50
    # A continued fit's effort is counted in steps: both paths learn exactly alike.
    unbounded = None
    bench = run_edgemeta(stream, sinusoid_bundle.path, tmp_path / "bench", batch=batch, steps=5,
                         sections=unbounded)
    assert bench.info["accepted"] >= 2, bench.info["decisions"]

    workdir = tmp_path / "files"
    workdir.mkdir()
    cfg = daemon_config(workdir, sinusoid_bundle.path, 1, steps=5,
                        sections={"ingest": {"settle_s": 0.01}})
    daemon = Daemon(load_config(cfg), metrics=Metrics())
    daemon.setup()
    try:
        assert daemon.adapter.wait_ready(120)
        inbox = daemon.layout.dir("inbox", "s")
        for i, lo in enumerate(range(0, len(stream.y), batch)):
            _feed_file(daemon, inbox, f"f{i:04d}", stream.x[lo:lo + batch],
                       stream.y[lo:lo + batch])
        outbox = daemon.layout.dir("outbox", "s")
        served = [json.loads(line)["version"]
                  for i in range(len(stream.y) // batch)
                  for line in (outbox / f"f{i:04d}.csv.predictions.jsonl").read_text().splitlines()]
        episodes = [json.loads(p.read_text()) for p in
                    sorted((workdir / "state" / "episodes").glob("*.json"))]
    finally:
        daemon.shutdown(drain_s=0.5)
    decisions = [(e["trigger"], e["result"], e["reason"], e.get("version")) for e in episodes]
    assert decisions == bench.info["decisions"]
    assert served == bench.info["served_version"].tolist()


@pytest.mark.slow
def test_the_demo_runs_end_to_end_and_reuses_its_bundle(tmp_path):
    cmd = [sys.executable, "-m", "edgemeta", "demo", "--workdir", str(tmp_path / "cache"),
           "--iterations", "1000", "--rows-per-task", "300", "--tasks", "3", "--state-dir",
           str(tmp_path / "state")]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "meta-training a sinusoid MAML bundle" in out.stdout
    summary = json.loads((tmp_path / "state" / "demo-summary.json").read_text())
    assert summary["drifts_detected"] >= 1
    assert any(s["trigger"] == "drift" for s in summary["swaps"])
    assert summary["adaptations"]["accepted"] >= 2 and len(summary["versions_served"]) >= 3
    # After a drift the learning of that regime (the drift swap and the refinements after it,
    # before the next switch) cuts the error by 3x; when labels arrive decides how much of that
    # the first swap alone does, so it is not pinned.
    switches = [*summary["switches"], summary["samples"]]
    swaps = summary["swaps"]

    swaps = [s for s in swaps if s["after_samples"]]  # versions that served a file

    def regime_best(i):
        end = next(t for t in switches if t > swaps[i]["after_samples"][0])
        return min(s["mse_after"] for s in swaps[i:] if s["after_samples"][0] < end)

    assert any(regime_best(i) < s["mse_before"] / 3 for i, s in enumerate(swaps)
               if s["trigger"] == "drift")
    assert len(summary["drift_detections_at"]) == summary["drifts_detected"]
    for swap in summary["swaps"]:
        assert (swap["drift_to_serving_ms"] is not None) == (swap["trigger"] == "drift")
    assert (tmp_path / "state" / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "drift->serving" in out.stdout and "demo.png" in out.stdout
    assert not list((tmp_path / "state" / "inbox" / "sine").iterdir())  # everything was handled

    again = subprocess.run(cmd[:-1] + [str(tmp_path / "state2")], cwd=ROOT, capture_output=True,
                           text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "reusing the cached bundle" in again.stdout


def test_the_demo_table_scores_a_version_on_its_own_task_only(tmp_path):
    from edgemeta.demo import DemoRun, format_summary, summarize

    run = DemoRun(tmp_path, "http://unused", switches=[100])
    # v2 serves from sample 50 on task 0, and goes on serving after the switch to task 1 at 100
    for start, task, version, mse in [(0, 0, 1, 4.0), (25, 0, 1, 4.0), (50, 0, 2, 0.5),
                                      (75, 0, 2, 0.3), (100, 1, 2, 9.0), (125, 1, 2, 9.0)]:
        run.files.append({"name": f"f{start}", "start": start, "rows": 25, "task": task,
                          "version": version, "mse": mse})
    run.drifts.append(110)
    run.episodes.append({"result": "accepted", "version": 2, "trigger": "initial",
                         "timings_ms": {"total": 12.0}})
    summary = summarize(run)
    swap = summary["swaps"][0]
    assert swap["mse_after"] == pytest.approx(0.4)  # not 4.7: the rows of task 1 are left out
    assert swap["after_samples"] == [50, 100]
    assert swap["drift_to_serving_ms"] is None  # an initial adaptation has no drift
    assert summary["drift_detections_at"] == [110]
    table = format_summary(summary)
    assert "50-100" in table and "same task" in table


def test_the_demo_table_lists_every_version_the_feed_mentioned_rollbacks_included(tmp_path):
    from edgemeta.demo import DemoRun, format_summary, summarize

    run = DemoRun(tmp_path, "http://unused", switches=[100])
    for start, version in [(0, 1), (25, 2), (50, 3), (75, 4)]:
        run.files.append({"name": f"f{start}", "start": start, "rows": 25, "task": 0,
                          "version": version, "mse": 1.0})
    run.episodes += [{"result": "accepted", "version": v, "trigger": t, "timings_ms": {}}
                     for v, t in [(2, "initial"), (3, "continual"), (5, "refine")]]
    run.rollbacks.append({"version": 4, "trigger": "rollback", "parent": 2, "note": "", "sample": 75})
    summary = summarize(run)
    assert [(s["version"], s["trigger"]) for s in summary["swaps"]] == [
        (2, "initial"), (3, "continual"), (4, "rollback"), (5, "refine")]
    last = summary["swaps"][-1]  # made after the last file: listed, not scored
    assert last["mse_after"] is None and last["samples_after_switch"] is None
    table = format_summary(summary).splitlines()
    assert any(line.split()[:2] == ["4", "rollback"] for line in table)
    assert any(line.split()[:2] == ["5", "refine"] and "not served" in line for line in table)
