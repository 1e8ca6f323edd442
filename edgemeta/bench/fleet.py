"""``edgemeta bench fleet``: does re-meta-training on what a fleet met improve the base?

A base bundle is meta-trained on the MAML sinusoid family. Eight simulated devices (the daemon's
own in-process path, ``bench.stream.run_edgemeta``) each meet a switching stream from a *shifted*
family (wider amplitudes and phases, a wider input range) and archive their episodes. The episodes
are harvested (``fleet.harvest``) and the base is re-meta-trained from its own weights on them with
replay (``meta.warmstart``, as ``train --init`` does). Old and new bundle are then compared on
fresh held-out tasks of both families (pooled over evaluation seeds) and on a fresh switching
stream of the shifted family. The whole pipeline repeats for ``seeds`` fleet seeds.

Also: meta-iterations/s of ``edgemeta train`` with 1 and 2 torchrun processes on this machine.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

SHIFTED = {"amplitude": (1.0, 8.0), "phase": (0.0, 2 * math.pi), "x_range": (-7.5, 7.5)}
TARGETS = {"shifted_gain": 0.30, "original_loss": 0.05}


def _interval(values: list[float]) -> dict[str, Any]:
    v = np.asarray(values, dtype=np.float64)
    half = 1.96 * v.std(ddof=1) / math.sqrt(len(v)) if len(v) > 1 else float("nan")
    return {"mean": float(v.mean()), "ci95": float(half), "min": float(v.min()),
            "max": float(v.max()), "values": [float(x) for x in v]}


def _few_shot(bundle: Path, tasks, n_tasks: int, seeds: int) -> dict[str, float]:
    from edgemeta.meta.bundle import read_bundle
    from edgemeta.meta.evaluate import evaluate

    r = evaluate(read_bundle(bundle), steps=(1, 5), n_tasks=n_tasks, seeds=seeds, baselines=False,
                 tasks=tasks)
    rows = next(iter(r["methods"].values()))
    return {f"steps_{row['steps']}": float(row["loss"]["mean"]) for row in rows}


def _devices(base: Path, workdir: Path, devices: int, rows: int, seed: int) -> list[Path]:
    from edgemeta.bench.stream import run_edgemeta
    from edgemeta.meta.tasks import SinusoidTasks
    from edgemeta.testing.streams import switching_stream

    states = []
    for d in range(devices):
        stream = switching_stream("sinusoid", n=rows, hazard=1 / 200, seed=1000 * seed + d,
                                  tasks=SinusoidTasks(shots=10, queries=10, **SHIFTED))
        run_edgemeta(stream, base, workdir / f"device-{d}")
        states.append(workdir / f"device-{d}" / "state")
    return states


def _retrain(base: Path, folder: Path, out: Path, iterations: int, replay: float,
             seed: int) -> Path:
    from edgemeta.meta import warmstart
    from edgemeta.meta.bundle import read_bundle
    from edgemeta.meta.train import TrainSettings, save_bundle, train

    parent = read_bundle(base)
    meta = parent.meta
    spec = {"name": "folder", "path": str(folder), "shots": meta["task"]["distribution"]["shots"],
            "queries": meta["task"]["distribution"]["queries"]}
    settings = TrainSettings(algorithm=meta["algorithm"], tasks=spec, model=dict(meta["model"]),
                             inner_steps=meta["inner"]["steps"], inner_lr=meta["inner"]["lr"],
                             iterations=iterations, val_every=250, seed=seed, device="cpu")
    tasks = warmstart.warm_start_tasks(parent, spec, replay)
    result = train(settings, tasks, init=warmstart.initial_params(parent))
    return save_bundle(result, out, lineage=warmstart.lineage(parent, spec, replay))


def _stream_error(bundle: Path, workdir: Path, rows: int, seed: int) -> float:
    from edgemeta.bench.stream import run_edgemeta
    from edgemeta.meta.tasks import SinusoidTasks
    from edgemeta.testing.streams import switching_stream

    stream = switching_stream("sinusoid", n=rows, hazard=1 / 300, seed=777_000 + seed,
                              tasks=SinusoidTasks(shots=10, queries=10, **SHIFTED))
    return float(run_edgemeta(stream, bundle, workdir).loss.mean())


def _throughput(workdir: Path, processes: int, iterations: int) -> float:
    """Meta-iterations/s of the real `edgemeta train` (validation only at the end)."""
    out = workdir / f"tp-{processes}"
    launcher = [sys.executable] if processes == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes)]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // processes))}
    subprocess.run([*launcher, "-m", "edgemeta", "train", "--out", str(out), "--quiet",
                    "--device", "cpu", "--iterations", str(iterations), "--val-every",
                    str(iterations), "--allow-untrained"], check=True, capture_output=True,
                   env=env, timeout=900)
    training = json.loads((out / "bundle.json").read_text())["training"]
    return training["iterations"] / training["seconds"]


def run_fleet_bench(out: Path, seeds: int = 3, devices: int = 8, rows: int = 2400,
                    base_iterations: int = 6000, retrain_iterations: int = 3000,
                    replay: float = 0.5,
                    eval_tasks: int = 600, eval_seeds: int = 5, stream_rows: int = 6000,
                    throughput_iterations: int = 1500, log=print) -> dict[str, Any]:
    from edgemeta.fleet.harvest import TaskShape, harvest, write_task_folder
    from edgemeta.meta.bundle import read_bundle
    from edgemeta.meta.tasks import SinusoidTasks
    from edgemeta.meta.train import TrainSettings
    from edgemeta.testing.harness import read_or_train

    out = Path(out).resolve()  # the daemon resolves a relative state dir against its config
    out.mkdir(parents=True, exist_ok=True)
    # Budgets in iterations, not seconds: what the bench compares must not depend on how busy
    # the machine was while it ran (a 60 s budget gave one seed 447 iterations, another 4,589).
    settings = TrainSettings(algorithm="maml", iterations=base_iterations, val_every=500, seed=0,
                             device="cpu")
    base = read_or_train(out / f"base-sinusoid-maml-{base_iterations}", settings,
                         SinusoidTasks(shots=5, queries=10),
                         before_training=lambda: log(f"meta-training the base bundle "
                                                     f"({base_iterations} iterations)"))
    shape = TaskShape.of_bundle(read_bundle(base).meta)
    original, shifted = SinusoidTasks(shots=5, queries=10), SinusoidTasks(shots=5, queries=10, **SHIFTED)
    old = {"shifted": _few_shot(base, shifted, eval_tasks, eval_seeds),
           "original": _few_shot(base, original, eval_tasks, eval_seeds)}
    per_seed = []
    for seed in range(seeds):
        work = Path(tempfile.mkdtemp(prefix=f"fleet-{seed}-", dir=out))
        started = time.perf_counter()
        states = _devices(base, work, devices, rows, seed)
        result, task_rows = harvest(states, shape)
        folder = write_task_folder(work / "tasks", result, task_rows, shape, {"path": str(base)})
        log(f"seed {seed}: {len(result.tasks)} tasks harvested from {devices} devices "
            f"({dict(result.skipped)}) in {time.perf_counter() - started:.0f} s")
        new = _retrain(base, folder, work / "new-bundle", retrain_iterations, replay, seed)
        fig = {"seed": seed, "tasks": len(result.tasks), "skipped": dict(result.skipped),
               "new": {"shifted": _few_shot(new, shifted, eval_tasks, eval_seeds),
                       "original": _few_shot(new, original, eval_tasks, eval_seeds)},
               "stream_mse": {"old": _stream_error(base, work / "stream-old", stream_rows, seed),
                              "new": _stream_error(new, work / "stream-new", stream_rows, seed)}}
        for key in ("steps_1", "steps_5"):
            fig[f"shifted_gain_{key}"] = 1 - fig["new"]["shifted"][key] / old["shifted"][key]
            fig[f"original_change_{key}"] = fig["new"]["original"][key] / old["original"][key] - 1
        fig["stream_ratio"] = fig["stream_mse"]["new"] / fig["stream_mse"]["old"]
        log(f"seed {seed}: shifted 1-step {old['shifted']['steps_1']:.3f} -> "
            f"{fig['new']['shifted']['steps_1']:.3f}, original {old['original']['steps_1']:.3f} -> "
            f"{fig['new']['original']['steps_1']:.3f}, stream {fig['stream_mse']['old']:.3f} -> "
            f"{fig['stream_mse']['new']:.3f}")
        per_seed.append(fig)
    summary = {key: _interval([f[key] for f in per_seed]) for key in
               ("shifted_gain_steps_1", "shifted_gain_steps_5", "original_change_steps_1",
                "original_change_steps_5", "stream_ratio")}
    with tempfile.TemporaryDirectory(dir=out) as tp:
        throughput = {str(p): _throughput(Path(tp), p, throughput_iterations) for p in (1, 2)}
    results = {
        "setup": {"devices": devices, "rows_per_device": rows, "shifted_family": SHIFTED,
                  "base_iterations": base_iterations, "retrain_iterations": retrain_iterations,
                  "replay": replay, "eval_tasks": eval_tasks * eval_seeds, "seeds": seeds,
                  "stream_rows": stream_rows, "cpus": os.cpu_count()},
        "old": old, "per_seed": per_seed, "summary": summary,
        "targets": {"shifted_gain_steps_1 >= 0.30": summary["shifted_gain_steps_1"]["mean"] >= 0.30,
                    "original_change_steps_1 <= 0.05": summary["original_change_steps_1"]["mean"] <= 0.05,
                    "stream_ratio < 1": summary["stream_ratio"]["mean"] < 1},
        "meta_iterations_per_s": throughput,
    }
    (out / "fleet.json").write_text(json.dumps(results, indent=2))
    (out / "fleet.md").write_text(format_fleet(results))
    return results


def format_fleet(r: dict[str, Any]) -> str:
    s = r["summary"]

    def ci(key: str, pct: bool = True) -> str:
        v = s[key]
        f = (lambda x: f"{100 * x:+.1f}%") if pct else (lambda x: f"{x:.3f}")
        if len(v["values"]) < 2:  # one seed has no interval
            return f"{f(v['mean'])} (1 seed: no interval)"
        return f"{f(v['mean'])} ± {f(v['ci95']).lstrip('+')} (seeds {', '.join(f(x) for x in v['values'])})"

    old = r["old"]
    lines = [
        f"fleet: {r['setup']['devices']} devices x {r['setup']['rows_per_device']} rows, "
        f"{r['setup']['seeds']} seed(s), replay {r['setup']['replay']}",
        f"old bundle, MSE after 1/5 steps: shifted {old['shifted']['steps_1']:.3f}/"
        f"{old['shifted']['steps_5']:.3f}, original {old['original']['steps_1']:.3f}/"
        f"{old['original']['steps_5']:.3f}",
        f"shifted family, loss reduction after 1 step: {ci('shifted_gain_steps_1')} (target >= +30%)",
        f"shifted family, loss reduction after 5 steps: {ci('shifted_gain_steps_5')}",
        f"original family, loss change after 1 step: {ci('original_change_steps_1')} (target <= +5%)",
        f"original family, loss change after 5 steps: {ci('original_change_steps_5')}",
        f"shifted switching stream, new/old cumulative MSE: {ci('stream_ratio', pct=False)} (target < 1)",
        "meta-iterations/s of `edgemeta train`: " + ", ".join(
            f"{p} process(es) {v:.1f}" for p, v in r["meta_iterations_per_s"].items()),
        "targets: " + ", ".join(f"{k}: {'met' if v else 'MISSED'}" for k, v in r["targets"].items()),
    ]
    return "\n".join(lines) + "\n"
