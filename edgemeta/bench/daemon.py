"""``edgemeta bench daemon``: drift-to-serving latency by stage, ingest throughput, process RSS.

The daemon runs in this process exactly as ``edgemeta run`` builds it (real state directory, real
worker process, real registry commits), driven without the file watcher so the figures measure the
work, not inotify latency. This module imports no torch: the RSS it reports is the serving
process's, and the worker's is read from /proc.
"""

from __future__ import annotations

import json
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from edgemeta.config import parse_config
from edgemeta.daemon.metrics import STAGES
from edgemeta.portfolio.experts import DEFAULT_EXPERTS
from edgemeta.portfolio.portfolio import Portfolio
from edgemeta.testing.inprocess import InProcessDaemon


def rss_mb(pid: int | str = "self") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def in_process_daemon(bundle: Path, state: Path, device: str = "auto") -> InProcessDaemon:
    settings = parse_config({
        "bundle": {"path": str(bundle)}, "state": {"dir": str(state)},
        "streams": [{"name": "sine", "features": ["x"], "label": "y", "id": "id"}],
        # One manual episode at a time: no start-up adaptation, no refinement after a swap.
        "adaptation": {"support_size": 10, "holdout_size": 20, "adapt_on_start": False,
                       "refine": [], "device": device},
        "metrics": {"enabled": False}, "ingest": {"max_file_bytes": 1 << 30},
        "retention": {"keep_models": 5, "keep_episodes": 50}})
    return InProcessDaemon(settings).start()


def latency(daemon: InProcessDaemon, episodes: int, seed: int = 0) -> dict[str, Any]:
    """From a complete support+holdout set to the first answer from the new version."""
    rng = np.random.default_rng(seed)
    totals, stages, results = [], {s: [] for s in STAGES}, []
    probe = np.zeros((1, 1), np.float32)
    for _ in range(episodes):
        amp, phase = rng.uniform(0.1, 5.0), rng.uniform(0, np.pi)
        x = rng.uniform(-5, 5, (30, 1)).astype(np.float32)
        y = amp * np.sin(x[:, 0] - phase)
        before = daemon.version("sine")
        daemon.trigger("sine")  # as `edgemeta trigger adapt` does
        started = time.perf_counter()
        daemon.feed("sine", x, y)  # completes the collection: the episode goes to the worker
        daemon.drain(120)
        _, version = daemon.feed("sine", probe)
        done = time.perf_counter()
        # The episode that served the new task: the manual one, or (the detector watches the
        # collection too) the drift episode that superseded it; a recall has no worker stages.
        recent = daemon.episodes()
        entry = next((e for e in reversed(recent) if e["trigger"] != "recall"), recent[-1])
        results.append(entry["result"])
        if (entry["result"] == "accepted" and version != before
                and all(s in entry.get("timings_ms", {}) for s in stages)):
            totals.append(done - started)
            for stage in stages:
                stages[stage].append(entry["timings_ms"][stage])
    ms = np.asarray(totals) * 1e3
    return {"episodes": episodes, "accepted": len(totals),
            "rejected": results.count("rejected"), "failed": results.count("failed"),
            "p50_ms": float(np.percentile(ms, 50)), "p90_ms": float(np.percentile(ms, 90)),
            "p99_ms": float(np.percentile(ms, 99)),
            "stage_p50_ms": {s: float(np.median(v)) for s, v in stages.items()}}


def throughput(daemon: InProcessDaemon, files: int, rows: int, seed: int = 1,
               prefix: str = "t") -> dict[str, Any]:
    """Rows per second through parse, predict, drift, outbox write and the move to processed/."""
    rng = np.random.default_rng(seed)
    inbox = daemon.inbox("sine")
    paths = []
    for i in range(files):
        x = rng.uniform(-5, 5, rows)
        y = 2.0 * np.sin(x - 0.5)
        path = inbox / f"{prefix}{i:04d}.csv"
        body = "".join(f"{prefix}{i}-{j},{a:.6f},{b:.6f}\n"
                       for j, (a, b) in enumerate(zip(x, y, strict=True)))
        path.write_text("id,x,y\n" + body)
        paths.append(path)
    started = time.perf_counter()
    for path in paths:
        daemon.handle("sine", path)
    seconds = time.perf_counter() - started
    processed = sum(1 for _ in daemon.processed("sine").glob(f"{prefix}*.csv"))
    return {"files": files, "rows_per_file": rows, "seconds": seconds,
            "rows_per_second": files * rows / seconds, "processed": processed}


def expert_costs(rows: int = 20_000) -> list[dict[str, Any]]:
    """Microseconds per row of each portfolio expert alone (predict, then learn), on 10 features,
    for 100-row files and for single-row files (where numpy's per-call cost dominates); "onnx
    only" is the mixing itself, with no expert beside the ONNX model."""
    rng = np.random.default_rng(0)
    results = []
    for kind, outputs in (("regression", 1), ("classification", 2)):
        for experts in ((), *((name,) for name in DEFAULT_EXPERTS), DEFAULT_EXPERTS):
            for batch in (100, 1):
                n = rows if batch > 1 else rows // 10
                x = rng.normal(size=(n + 1000, 10))
                y = x[:, 0] if kind == "regression" else (x[:, 0] > 0).astype(int)
                onnx = rng.normal(size=(len(x), outputs))
                p = Portfolio(kind, outputs, experts)
                for i in range(0, 1000, 100):  # a full KNN window first
                    _, members = p.predict(x[i:i + 100], onnx[i:i + 100], 1)
                    p.learn(x[i:i + 100], y[i:i + 100], members)
                started = time.perf_counter()
                for i in range(1000, len(x), batch):
                    _, members = p.predict(x[i:i + batch], onnx[i:i + batch], 1)
                    p.learn(x[i:i + batch], y[i:i + batch], members)
                results.append({"kind": kind, "experts": "+".join(experts) or "onnx only",
                                "rows_per_file": batch,
                                "us_per_row": 1e6 * (time.perf_counter() - started) / n})
    return results


def run_daemon_bench(out: Path, bundle: Path, quick: bool = False) -> dict[str, Any]:
    import sys

    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"machine": f"{platform.node()} {platform.machine()}",
                              "date": time.strftime("%Y-%m-%d"), "bundle": str(bundle)}
    with tempfile.TemporaryDirectory() as tmp:
        daemon = in_process_daemon(bundle, Path(tmp) / "state")
        try:
            report["rss_mb_serving_after_start"] = rss_mb()
            report["latency"] = latency(daemon, 20 if quick else 200)
            lat = report["latency"]
            print(f"drift-to-serving: p50 {lat['p50_ms']:.1f} ms, p90 {lat['p90_ms']:.1f} ms "
                  f"({lat['accepted']}/{lat['episodes']} accepted); stage p50 (ms): "
                  + ", ".join(f"{k} {v:.2f}" for k, v in lat["stage_p50_ms"].items()))
            # The ONNX model alone first, then with the portfolio of online experts (the default).
            with daemon.onnx_alone():
                report["throughput"] = throughput(daemon, 4 if quick else 20, 5_000)
            t = report["throughput"]
            print(f"ingest: {t['rows_per_second']:.0f} rows/s ({t['files']} files x "
                  f"{t['rows_per_file']} rows in {t['seconds']:.2f} s)")
            report["throughput_portfolio"] = throughput(daemon, 4 if quick else 20, 5_000,
                                                        seed=2, prefix="p")
            t = report["throughput_portfolio"]
            print(f"ingest with the default portfolio: {t['rows_per_second']:.0f} rows/s "
                  f"({t['files']} files x {t['rows_per_file']} rows in {t['seconds']:.2f} s)")
            report["expert_costs"] = expert_costs(4_000 if quick else 20_000)
            print("portfolio cost, us per row (100-row files / 1-row files):")
            costs = {(c["kind"], c["experts"], c["rows_per_file"]): c["us_per_row"]
                     for c in report["expert_costs"]}
            for kind, experts, batch in sorted(costs):
                if batch == 100:
                    print(f"  {kind:15s} {experts:12s} {costs[kind, experts, 100]:7.1f} / "
                          f"{costs[kind, experts, 1]:7.1f}")
            report["rss_mb_serving"] = rss_mb()
            report["rss_mb_worker"] = rss_mb(daemon.worker_pid)
            report["torch_in_serving_process"] = "torch" in sys.modules
            print(f"RSS: serving process {report['rss_mb_serving']:.0f} MB (torch imported: "
                  f"{report['torch_in_serving_process']}), worker {report['rss_mb_worker']:.0f} MB")
        finally:
            daemon.shutdown(drain_s=1.0)
    (out / "daemon.json").write_text(json.dumps(report, indent=2))
    return report
