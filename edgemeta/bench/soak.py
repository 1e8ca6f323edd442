"""``edgemeta bench soak``: the real daemon under a steady stream for a long time; is memory flat?

A producer writes files of ``rate / 10`` rows ten times a second into the inbox: labelled files,
unlabelled files whose labels follow two files later, and a share of unlabelled rows whose labels
never come (they fill the label cache to its bound). The task switches every ``switch_s`` seconds,
so drifts, adaptations and swaps happen throughout. Every ``sample_s`` the daemon's RSS, open file
descriptors and threads are read from /proc. The figure of merit is the RSS slope after warm-up
(least squares, MB per minute); the target is <= 0.1 MB/min with fds and threads flat.
"""

from __future__ import annotations

import json
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from edgemeta.testing.harness import (
    DaemonProcess,
    cached_bundle,
    drop,
    free_port,
    proc_figures,
    sine_csv,
    write_config,
)

TASKS = ((1.0, 0.0), (4.0, 2.0), (2.5, 1.0), (0.5, 2.8))


def slope_per_minute(t_s: np.ndarray, values: np.ndarray) -> float:
    """Least-squares slope of ``values`` against time, per minute.

    >>> round(slope_per_minute(np.array([0.0, 60, 120]), np.array([10.0, 11, 12])), 6)
    1.0
    """
    if len(t_s) < 2:
        return float("nan")
    return float(np.polyfit(np.asarray(t_s) / 60.0, np.asarray(values), 1)[0])


def run_soak(out: Path, minutes: float = 30.0, rate: int = 1000, warmup_min: float = 5.0,
             switch_s: float = 120.0, sample_s: float = 10.0, seed: int = 0,
             label_cache: int = 20_000) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    bundle = cached_bundle(out)
    work = Path(tempfile.mkdtemp(prefix="edgemeta-soak-"))
    state, port = work / "state", free_port()
    config = write_config(work / "soak.toml", bundle, state, port,
                          ingest={"label_cache": label_cache, "settle_s": 0.02},
                          retention={"keep_episodes": 200})
    daemon = DaemonProcess(config, state, port, work / "daemon.log")
    daemon.start()
    daemon.wait_ready()
    inbox = state / "inbox" / "sine"
    rng = np.random.default_rng(seed)
    per_file = max(1, rate // 10)
    samples: list[dict[str, float]] = []
    pending_labels: list[tuple[str, list[str], np.ndarray]] = []
    started = time.monotonic()
    next_sample = started
    backlog_max, n_file = 0, 0
    print(f"soak: {minutes:g} min at {rate} rows/s, pid {daemon.pid}, state {state}", flush=True)
    while time.monotonic() - started < minutes * 60:
        tick = time.monotonic()
        amp, phase = TASKS[int((tick - started) // switch_s) % len(TASKS)]
        x = rng.uniform(-5, 5, per_file)
        y = amp * np.sin(x - phase) + rng.normal(0, 0.1, per_file)
        ids = [f"f{n_file}-{i}" for i in range(per_file)]
        kind = n_file % 10
        name = f"s{n_file:08d}"
        if kind < 5:
            drop(inbox, f"{name}.csv", sine_csv(ids, x, y))
        else:
            drop(inbox, f"{name}.csv", sine_csv(ids, x, None))
            if kind < 9:  # one file in ten never gets its labels: those rows age out of the cache
                pending_labels.append((name, ids, y))
        if len(pending_labels) > 2:
            lname, lids, ly = pending_labels.pop(0)
            body = "id,label\n" + "".join(f"{i},{v:.6f}\n" for i, v in zip(lids, ly, strict=True))
            drop(inbox, f"{lname}.labels.csv", body.encode())
        n_file += 1
        if tick >= next_sample:
            next_sample += sample_s
            backlog = sum(1 for _ in inbox.iterdir())
            backlog_max = max(backlog_max, backlog)
            figures = proc_figures(daemon.pid)
            worker = daemon.worker_pid()
            wfig = proc_figures(worker) if worker else {}
            samples.append({"t_s": tick - started, **figures,
                            "worker_rss_mb": wfig.get("rss_mb", float("nan")), "backlog": backlog})
            if len(samples) % 6 == 1:
                print(f"  {samples[-1]['t_s'] / 60:5.1f} min  rss {figures['rss_mb']:.1f} MB  fds "
                      f"{figures['fds']:.0f}  threads {figures['threads']:.0f}  backlog {backlog}",
                      flush=True)
            if not daemon.alive():
                break
        time.sleep(max(0.0, 0.1 - (time.monotonic() - tick)))
    alive = daemon.alive()
    totals = {k: daemon.total(k) for k in (
        "edgemeta_samples_total", "edgemeta_drift_detections_total",
        "edgemeta_internal_errors_total", "edgemeta_quarantined_files_total")}
    totals["accepted"] = daemon.total("edgemeta_adaptations_total", result="accepted")
    code = daemon.stop()
    t = np.array([s["t_s"] for s in samples])
    after = t >= warmup_min * 60
    rss = np.array([s["rss_mb"] for s in samples])
    fds = np.array([s["fds"] for s in samples])
    threads = np.array([s["threads"] for s in samples])
    result = {
        "machine": platform.platform(), "cpus": __import__("os").cpu_count(),
        "date": time.strftime("%Y-%m-%d"), "minutes": minutes, "rate_rows_per_s": rate,
        "warmup_min": warmup_min, "label_cache": label_cache,
        "rows_sent": n_file * per_file, "files_sent": n_file, "daemon_alive_at_end": alive,
        "exit_code": code, "max_backlog_files": backlog_max,
        "rss_slope_mb_per_min": slope_per_minute(t[after], rss[after]),
        "rss_mb_after_warmup": [float(rss[after].min()), float(rss[after].max())] if after.any()
        else None,
        "fds": [float(np.nanmin(fds[after])), float(np.nanmax(fds[after]))] if after.any() else None,
        "threads": [float(np.nanmin(threads[after])), float(np.nanmax(threads[after]))]
        if after.any() else None,
        "metrics": totals, "samples": samples, "work_dir": str(work)}
    (out / "soak.json").write_text(json.dumps(result, indent=2))
    print(f"RSS slope after {warmup_min:g} min warm-up: {result['rss_slope_mb_per_min']:.3f} MB/min "
          f"(target <= 0.1); RSS {result['rss_mb_after_warmup']} MB; fds {result['fds']}; threads "
          f"{result['threads']}; rows sent {result['rows_sent']}; max backlog {backlog_max} files")
    return result
