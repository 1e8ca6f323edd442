"""Harvest: episodes the daemon archived become a task folder that `train --tasks folder` reads."""

from __future__ import annotations

import json
import os
import shutil
import tarfile

import numpy as np
import pytest

from edgemeta.config import load_config
from edgemeta.daemon.journal import Journal
from edgemeta.daemon.metrics import Metrics
from edgemeta.daemon.runtime import Daemon
from edgemeta.episode_format import read_episode
from edgemeta.fleet.harvest import HarvestError, TaskShape, harvest, write_task_folder
from edgemeta.meta.tasks import TaskFolderTasks

from .conftest import counter, feed, run_edgemeta, run_until, write_config

SINE = TaskShape("regression", features=1, shots=5, queries=10)


def _journal_episodes(state, n_tasks, stream="sine", seed=0, after=5, support=10, holdout=20):
    """Episodes as the daemon's Journal writes them: one sinusoid task each, then ``after`` rows."""
    rng = np.random.default_rng(seed)
    (state / "episodes").mkdir(parents=True, exist_ok=True)  # the daemon's layout makes it
    journal = Journal(state, keep_episodes=1000, bundle={"path": "b", "weights_sha256": "ab"},
                      after_rows=after)
    for _ in range(n_tasks):
        amp, phase = rng.uniform(0.5, 5), rng.uniform(0, np.pi)

        def rows(n, amp=amp, phase=phase):
            x = rng.uniform(-5, 5, (n, 1))
            return x, amp * np.sin(x[:, 0] - phase)

        journal.record(stream, "drift", "accepted", "better", 1, rows(support), rows(holdout),
                       {"adapt": 0.01}, {})
        for x, y in zip(*rows(after), strict=True):
            journal.labelled(stream, x, y)
    return state



@pytest.fixture(scope="module")
def daemon_state(tmp_path_factory, sinusoid_bundle):
    """A real daemon meets two drifts; its episodes/ folder is what a device would ship."""
    tmp_path = tmp_path_factory.mktemp("device")
    cfg = write_config(tmp_path, sinusoid_bundle.path, metrics={"enabled": False})
    d = Daemon(load_config(cfg), metrics=Metrics())
    d.setup()
    try:
        assert d.adapter.wait_ready(120)
        accepted = lambda: counter(d, "edgemeta_adaptations_total", stream="sine",  # noqa: E731
                                   result="accepted")
        feed(d, "a", 1.0, 0.0, 12)
        feed(d, "b", 4.5, 2.5, 6)
        assert run_until(d, lambda: accepted() >= 1, 60)
        feed(d, "bb", 4.5, 2.5, 2)  # the labelled rows after the swap
        feed(d, "c", 2.0, 1.0, 8)
        assert run_until(d, lambda: accepted() >= 2, 60)
        feed(d, "cc", 2.0, 1.0, 2)
    finally:
        d.shutdown(drain_s=0.5)
    return tmp_path / "state"


def test_the_daemon_keeps_k_rows_after_an_accepted_episode_and_names_its_bundle(daemon_state,
                                                                                 sinusoid_bundle):
    episodes = [read_episode(p) for p in sorted((daemon_state / "episodes").glob("*.json"))]
    accepted = [e for e in episodes if e["result"] == "accepted"]
    assert len(accepted) >= 2
    assert all(e["after"] is not None and len(e["after"][1]) == 5 for e in accepted)  # K=5
    sums = json.loads((sinusoid_bundle.path / "bundle.json").read_text())["sha256"]
    assert {e["bundle"]["weights_sha256"] for e in episodes} == {sums["weights.safetensors"]}


def test_harvest_of_real_episodes_skips_hostile_files_and_duplicate_devices(daemon_state, tmp_path):
    daemon_state = shutil.copytree(daemon_state, tmp_path / "device")
    folder = daemon_state / "episodes"
    real = sorted(folder.glob("*.json"))
    alone, _ = harvest([daemon_state], SINE)
    n_tasks = len(alone.tasks)
    assert n_tasks >= 2 and not alone.skipped.get("malformed")
    (folder / "zz-truncated.json").write_bytes(real[0].read_bytes()[:100])
    (folder / "zz-foreign.json").write_text('{"hello": "world"}')
    (folder / "zz-binary.json").write_bytes(os.urandom(300))
    (folder / "zz-empty.json").write_bytes(b"")
    (folder / "notes.txt").write_text("not an episode")
    (folder / "zz-dir.json").mkdir()
    (folder / "zz-link.json").symlink_to(real[0])
    copy = tmp_path / "same-device-again"
    shutil.copytree(daemon_state, copy, symlinks=True)
    tarball = tmp_path / "device.tar.gz"
    with tarfile.open(tarball, "w:gz") as tar:
        tar.add(daemon_state, arcname="state")
    broken = tmp_path / "broken.tar.gz"
    broken.write_bytes(tarball.read_bytes()[: tarball.stat().st_size // 2])

    result, rows = harvest([daemon_state, copy, tarball, broken], SINE)

    assert len(result.tasks) == n_tasks  # copies of a device add nothing
    s = result.skipped
    assert s["malformed"] >= 3 * 3  # truncated, foreign, binary in each full copy
    assert s["empty"] >= 3 and s["not_regular"] >= 2 and s["not_an_episode_file"] >= 2
    assert s["duplicate"] >= 2 * n_tasks  # the copy, the tarball (and what the broken one held)
    assert s["truncated_source"] == 1 or s["unreadable_source"] == 1
    assert all(len(y) >= SINE.min_rows for _, y in rows)


def test_a_harvested_folder_trains_and_its_manifest_says_where_each_task_came_from(tmp_path):
    state = _journal_episodes(tmp_path / "dev1", 12)
    result, rows = harvest([state], SINE)
    out = write_task_folder(tmp_path / "tasks", result, rows, SINE, {"path": "b"})
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(manifest["tasks"]) == 12 and manifest["kind"] == "regression"
    first = manifest["tasks"][0]
    assert first["stream"] == "sine" and first["rows"] == 35 and first["after_rows"] == 5
    assert first["bundle"]["weights_sha256"] == "ab" and first["source"] == str(state)
    tasks = TaskFolderTasks(out, shots=5, queries=10)
    batch = tasks.sample(4, np.random.default_rng(0))
    assert batch.support_x.shape == (4, 5, 1) and batch.query_y.shape == (4, 10, 1)
    x, y = np.load(out / first["file"])["X"], np.load(out / first["file"])["y"]
    assert x.shape == (35, 1) and np.isfinite(y).all()


def test_suspect_labels_stay_out_unless_asked_and_accepted_only_is_stricter(tmp_path):
    state = tmp_path / "dev"
    (state / "episodes").mkdir(parents=True)
    journal = Journal(state, keep_episodes=100)
    rng = np.random.default_rng(0)
    rows = lambda: (rng.uniform(-5, 5, (20, 1)), rng.normal(size=20))  # noqa: E731
    journal.record("s", "drift", "rejected", "out_of_range", 1, rows(), rows(), {}, {})
    journal.record("s", "drift", "rejected", "not_better", 1, rows(), rows(), {}, {})
    journal.record("s", "drift", "failed", "diverged", 1, rows(), rows(), {}, {})
    result, _ = harvest([state], SINE)
    assert len(result.tasks) == 2 and result.skipped["suspect_out_of_range"] == 1
    assert len(harvest([state], SINE, include_suspect=True)[0].tasks) == 3
    strict, _ = harvest([state], SINE, accepted_only=True)
    assert strict.tasks == [] and strict.skipped["result_rejected"] == 2


def test_tasks_too_small_for_the_bundle_are_refused_with_a_count(tmp_path):
    state = _journal_episodes(tmp_path / "dev", 6, support=5, holdout=5, after=0)
    result, rows = harvest([state], SINE)  # 10 rows < K + queries = 15
    assert rows == [] and result.skipped["too_small"] == 6
    with pytest.raises(HarvestError, match="no usable tasks.*6 too_small"):
        write_task_folder(tmp_path / "out", result, rows, SINE, {})


def test_one_chatty_stream_is_capped_and_its_kept_tasks_span_its_time(tmp_path):
    state = _journal_episodes(tmp_path / "dev", 30, stream="chatty")
    _journal_episodes(tmp_path / "dev", 3, stream="quiet", seed=1)
    result, _ = harvest([state], SINE, per_stream_cap=5)
    by_stream = {s: [t for t in result.tasks if t["stream"] == s] for s in ("chatty", "quiet")}
    assert len(by_stream["chatty"]) == 5 and len(by_stream["quiet"]) == 3
    assert result.skipped["stream_cap"] == 25
    times = [t["time"] for t in by_stream["chatty"]]
    all_times = sorted(read_episode(p)["time"] for p in (state / "episodes").glob("*chatty.json"))
    assert times[0] == all_times[0] and times[-1] == all_times[-1]


def test_the_cli_harvests_and_reports_and_names_what_is_wrong(tmp_path, sinusoid_bundle):
    state = _journal_episodes(tmp_path / "dev", 12)
    done = run_edgemeta("tasks", "harvest", str(state), "--out", str(tmp_path / "tasks"),
                "--bundle", str(sinusoid_bundle.path))
    assert done.returncode == 0, done.stderr
    assert "12 task(s) of at least 15 rows" in done.stdout
    report = run_edgemeta("tasks", "report", str(tmp_path / "tasks"), "--json")
    assert report.returncode == 0, report.stderr
    r = json.loads(report.stdout)
    assert r["tasks"] == 12 and r["rows"]["min"] == 35 and r["diversity"]["mean_pairwise"] > 0.1
    text = run_edgemeta("tasks", "report", str(tmp_path / "tasks")).stdout
    assert "skipped at harvest:" in text and "{" not in text, text  # words, not a Python dict
    again = run_edgemeta("tasks", "harvest", str(state), "--out", str(tmp_path / "tasks"),
                 "--bundle", str(sinusoid_bundle.path))
    assert again.returncode == 2 and "not empty" in again.stderr
    missing = run_edgemeta("tasks", "harvest", str(tmp_path / "nowhere"), "--out", str(tmp_path / "t2"),
                   "--bundle", str(sinusoid_bundle.path))
    assert missing.returncode == 2 and "nowhere: no such state directory" in missing.stderr


def test_the_report_warns_about_near_identical_tasks(tmp_path):
    from edgemeta.fleet.report import describe_tasks

    rng = np.random.default_rng(0)
    same = [(x, np.sin(x[:, 0])) for x in (rng.uniform(-5, 5, (200, 1)) for _ in range(12))]
    report = describe_tasks(same)
    assert report["diversity"]["near_identical_pairs"] > report["diversity"]["pairs"] / 2
    assert any("near-identical" in a for a in report["advice"])


def test_a_negative_episode_after_rows_is_refused_naming_the_key(tmp_path, sinusoid_bundle):
    from edgemeta.config import ConfigError

    cfg = write_config(tmp_path, sinusoid_bundle.path, retention={"episode_after_rows": -1})
    with pytest.raises(ConfigError, match=r"retention.episode_after_rows: must be >= 0, got -1"):
        load_config(cfg)


def test_harvest_survives_any_episode_file_and_never_leaves_its_source(tmp_path):
    """Each of these aborted a whole fleet harvest with a traceback, or read outside the tree."""
    state = _journal_episodes(tmp_path / "device", 3)
    folder = state / "episodes"
    good = json.loads(sorted(folder.glob("*.json"))[0].read_text())
    hostile = {
        "deep": "[" * 100_000 + "]" * 100_000,
        "empty-rows": {**good, "support": {"x": [], "y": []}, "holdout": {"x": [], "y": []},
                       "after": None},
        "list-for-key": {**good, "support": [[1.0], [2.0]]},
        "string-time": {**good, "time": "yesterday"},
        "big-number": {**good, "time": int("9" * 401)},
        "list-body": [good],
        "row-overflow": {**good, "support": {"x": [[1e308 * 10]], "y": [1.0]}},
    }
    for name, body in hostile.items():
        text = body if isinstance(body, str) else json.dumps(body)
        (folder / f"zz-{name}.json").write_text(text)
    outside = tmp_path / "outside"
    _journal_episodes(outside, 2, seed=9)
    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / "episodes").symlink_to(outside / "episodes")

    result, rows = harvest([state, linked], SINE)

    assert len(result.tasks) == 3  # the honest episodes, none from outside the tree
    skipped = sum(result.skipped.values())
    assert skipped >= len(hostile) + 1, result.skipped
    assert all(result.examples[reason] for reason in result.skipped)
