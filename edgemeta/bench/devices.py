"""``edgemeta bench devices``: the same work on the CPU and on CUDA, side by side on one machine.

Three figures decide whether a GPU is worth having on a device or for meta-training: outer-loop
meta-iterations per second (the real ``train`` loop, at the default size and at a size where a GPU
should win), one adaptation's latency through the real worker process (cold: from spawning the
worker, CUDA start-up included, to the first result; warm: a round trip once it runs), and
drift-to-serving latency of the whole daemon with its worker on that device. Every figure is
measured in the same run for each device, so the ratio is what to quote.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

SIZES = {
    # name: (model hidden sizes, meta-batch, inner steps)
    "default": ([40, 40], 25, 1),
    "large": ([256, 256, 256], 400, 5),
}


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def meta_throughput(device: str, size: str, seconds: float, seed: int = 0) -> dict[str, Any]:
    """Meta-iterations per second of ``train`` itself (validation left out of the timed part)."""
    from edgemeta.meta.tasks import build_tasks
    from edgemeta.meta.train import TrainSettings, train

    hidden, meta_batch, inner_steps = SIZES[size]
    settings = TrainSettings(
        algorithm="maml", tasks={"name": "sinusoid", "shots": 5, "queries": 10},
        model={"arch": "mlp", "hidden": hidden}, inner_steps=inner_steps, meta_batch=meta_batch,
        iterations=10**9, time_budget=seconds, val_every=10**9, val_tasks=25, seed=seed,
        device=device)
    result = train(settings, build_tasks(settings.tasks))
    return {"device": device, "size": size, "hidden": hidden, "meta_batch": meta_batch,
            "inner_steps": inner_steps, "iterations": result.iterations_done,
            "seconds": result.seconds,
            "iterations_per_s": result.iterations_done / result.seconds}


def _round_trip(client, x: np.ndarray, y: np.ndarray,
                fit: dict | None = None) -> tuple[float, float, bool]:
    """Seconds from submit to outcome, seconds inside the worker, and whether it succeeded (a
    refused adaptation, e.g. one whose support loss rose, costs the same work)."""
    started = time.perf_counter()
    rid = client.submit(x, y, fit=fit)
    if rid is None:
        raise RuntimeError("adapter worker not ready")
    while True:
        for outcome in client.poll(wait=0.05):
            if outcome.request_id == rid:
                if not outcome.ok and outcome.reason != "diverged":
                    raise RuntimeError(f"adaptation failed: {outcome.reason} {outcome.error}")
                return time.perf_counter() - started, outcome.seconds, outcome.ok


def adaptation_latency(bundle: Path, device: str, repeats: int, seed: int = 0) -> dict[str, Any]:
    """Latency of one adaptation through the real worker process on ``device``."""
    from edgemeta.daemon.adapter import AdapterClient

    rng = np.random.default_rng(seed)

    def task(rows: int) -> tuple[np.ndarray, np.ndarray]:
        x = rng.uniform(-5, 5, (rows, 1)).astype(np.float32)
        return x, (rng.uniform(0.1, 5) * np.sin(x[:, 0] - rng.uniform(0, np.pi))).astype(np.float32)

    client = AdapterClient(bundle, device=device, timeout_s=120, start_timeout_s=300)
    spawned = time.perf_counter()
    client.start()
    try:
        if not client.wait_ready(300):
            raise RuntimeError(f"adapter worker on {device} did not start")
        ready_s = time.perf_counter() - spawned
        first_s, _, _ = _round_trip(client, *task(10))
        cold_s = time.perf_counter() - spawned
        warm, worker, refused = [], [], 0
        for _ in range(repeats):
            total, inside, ok = _round_trip(client, *task(10))
            warm.append(total)
            worker.append(inside)
            refused += not ok
        fits = [_round_trip(client, *task(500), fit={"max_steps": 100, "max_seconds": 30.0})[0]
                for _ in range(max(3, repeats // 10))]
        info = dict(client.info)
    finally:
        client.stop()
    return {"device": info.get("device", device), "device_name": info.get("device_name"),
            "cold_ready_s": ready_s, "cold_first_result_s": cold_s, "first_request_s": first_s,
            "warm_p50_ms": float(np.median(warm) * 1e3),
            "warm_p90_ms": float(np.percentile(warm, 90) * 1e3),
            "warm_worker_p50_ms": float(np.median(worker) * 1e3),
            "fit_500_rows_100_steps_p50_ms": float(np.median(fits) * 1e3), "repeats": repeats,
            "refused_as_diverged": refused}


def drift_to_serving(bundle: Path, device: str, episodes: int) -> dict[str, Any]:
    from edgemeta.bench.daemon import in_process_daemon, latency

    with tempfile.TemporaryDirectory() as tmp:
        daemon = in_process_daemon(bundle, Path(tmp) / "state", device=device)
        try:
            return {"device": device, **latency(daemon, episodes)}
        finally:
            daemon.shutdown(drain_s=1.0)


def train_bundle(path: Path, seconds: float) -> Path:
    """A small sinusoid bundle for the adaptation figures (trained on the CPU, as a fleet would)."""
    from edgemeta.meta.tasks import build_tasks
    from edgemeta.meta.train import TrainSettings, save_bundle, train

    settings = TrainSettings(tasks={"name": "sinusoid", "shots": 10, "queries": 10},
                             iterations=10**9, time_budget=seconds, val_every=200, device="cpu")
    save_bundle(train(settings, build_tasks(settings.tasks)), path)
    return path


def run_devices_bench(out: Path, bundle: Path | None = None, quick: bool = False,
                      devices: list[str] | None = None) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    devices = devices or (["cpu", "cuda"] if cuda_available() else ["cpu"])
    seconds, repeats, episodes = (3.0, 10, 5) if quick else (20.0, 50, 50)
    report: dict[str, Any] = {
        "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPUs",
        "date": time.strftime("%Y-%m-%d"), "devices": devices,
        "throughput": [], "adaptation": [], "drift_to_serving": []}
    if bundle is None:
        bundle = train_bundle(out / "bundle", 5.0 if quick else 30.0)
    report["bundle"] = str(bundle)
    for size in SIZES:
        for device in devices:
            row = meta_throughput(device, size, seconds)
            report["throughput"].append(row)
            print(f"meta-train {size:7s} on {device:4s}: {row['iterations_per_s']:8.1f} it/s "
                  f"(MLP {row['hidden']}, meta-batch {row['meta_batch']}, "
                  f"{row['inner_steps']} inner step(s))", flush=True)
    for device in devices:
        row = adaptation_latency(bundle, device, repeats)
        report["adaptation"].append(row)
        print(f"adaptation on {device:4s} ({row['device_name']}): cold {row['cold_first_result_s']:.2f} s "
              f"(worker ready {row['cold_ready_s']:.2f} s), warm p50 {row['warm_p50_ms']:.1f} ms "
              f"(in worker {row['warm_worker_p50_ms']:.1f} ms), continued fit on 500 rows "
              f"{row['fit_500_rows_100_steps_p50_ms']:.0f} ms", flush=True)
    for device in devices:
        row = drift_to_serving(bundle, device, episodes)
        report["drift_to_serving"].append(row)
        print(f"drift-to-serving, worker on {device:4s}: p50 {row['p50_ms']:.1f} ms, "
              f"p90 {row['p90_ms']:.1f} ms ({row['accepted']}/{row['episodes']} accepted)",
              flush=True)
    by = {(r["size"], r["device"]): r["iterations_per_s"] for r in report["throughput"]}
    if "cuda" in devices:
        report["cuda_over_cpu"] = {size: by[(size, "cuda")] / by[(size, "cpu")] for size in SIZES}
        print("meta-iterations/s, CUDA over CPU: " + ", ".join(
            f"{k} {v:.2f}x" for k, v in report["cuda_over_cpu"].items()))
    (out / "devices.json").write_text(json.dumps(report, indent=2))
    return report
