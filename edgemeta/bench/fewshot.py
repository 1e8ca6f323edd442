"""``edgemeta bench fewshot``: the MAML paper's sinusoid protocol plus a digits classification line.

Targets from the issue (Finn et al. 2017, Table 2, K=5: 0.67 / 0.38 / 0.35 after 1 / 5 / 10 steps):
MAML <= 0.60 after 1 step and <= 0.33 after 10, meta-training <= 120 s; Meta-SGD <= 0.50 after 1
step; a vmapped meta-iteration >= 5x faster than a per-task loop, measured in the same run.
"""

from __future__ import annotations

import json
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgemeta.meta.algorithms import make_learner
from edgemeta.meta.bundle import read_bundle
from edgemeta.meta.evaluate import evaluate, format_table
from edgemeta.meta.inner import adapt_task, task_loss
from edgemeta.meta.models import MLP, head_names
from edgemeta.meta.tasks import ArrayClassificationTasks, SinusoidTasks
from edgemeta.meta.train import TrainSettings, save_bundle, train


def vmap_vs_loop(repeats: int = 20, seed: int = 0) -> dict[str, float]:
    """Seconds per second-order MAML meta-iteration (25 tasks): vmapped vs a Python loop."""
    torch.manual_seed(seed)
    model = MLP(1, 1, [40, 40])
    params = {n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters()}
    learner = make_learner("maml", model, "regression", 1, 0.01, head_names(model))
    batch = SinusoidTasks().sample(25, np.random.default_rng(seed))

    def vmapped() -> None:
        learner.outer_loss(params, batch).backward()

    def looped() -> None:
        total = 0.0
        for i in range(25):
            fast = adapt_task(model, "regression", params, batch.support_x[i], batch.support_y[i],
                              1, 0.01)
            total = total + task_loss(model, "regression", fast, batch.query_x[i], batch.query_y[i])
        (total / 25).backward()

    timings = {}
    for name, fn in (("vmap", vmapped), ("loop", looped)):
        for _ in range(3):
            fn()
        samples = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t0)
        timings[name] = float(np.median(samples))
    timings["speedup"] = timings["loop"] / timings["vmap"]
    return timings


def _steps(rows: list[dict[str, Any]], steps: int) -> float:
    return next(r["loss"]["mean"] for r in rows if r["steps"] == steps)


def run_fewshot(out: Path, quick: bool = False, seed: int = 0) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    budget = 5.0 if quick else 115.0
    n_tasks = 50 if quick else 600
    report: dict[str, Any] = {"machine": f"{platform.node()} {platform.processor() or platform.machine()}",
                              "torch_threads": torch.get_num_threads(),
                              "date": time.strftime("%Y-%m-%d"), "quick": quick}
    report["vmap_vs_loop"] = vmap_vs_loop(repeats=5 if quick else 30, seed=seed)
    print(f"meta-iteration (25 tasks, 2nd-order MAML): vmap {report['vmap_vs_loop']['vmap']*1e3:.1f} ms, "
          f"loop {report['vmap_vs_loop']['loop']*1e3:.1f} ms, {report['vmap_vs_loop']['speedup']:.1f}x")
    sinusoid = SinusoidTasks(shots=5, queries=10)
    for alg in ("maml", "metasgd"):
        settings = TrainSettings(algorithm=alg, tasks=sinusoid.describe(), iterations=1_000_000,
                                 time_budget=budget, val_every=500, val_tasks=200, seed=seed,
                                 device="cpu")
        t0 = time.perf_counter()
        result = train(settings, sinusoid)
        wall = time.perf_counter() - t0
        bundle = read_bundle(save_bundle(result, out / f"sinusoid-{alg}"))
        res = evaluate(bundle, shots=5, steps=(0, 1, 5, 10), n_tasks=n_tasks, seed=seed,
                       pretrain_iterations=200 if quick else 3000)
        print(format_table(res))
        rows = res["methods"][alg]
        report[f"sinusoid_{alg}"] = {"train_seconds": wall, "iterations": result.iterations_done,
                                     "mse_1": _steps(rows, 1), "mse_5": _steps(rows, 5),
                                     "mse_10": _steps(rows, 10), "eval": res}
    digits = out / "digits.npz"
    from sklearn.datasets import load_digits

    d = load_digits()
    np.savez(digits, X=d.data.astype(np.float32), y=d.target)
    for shots in (1, 5):
        for alg, lr in (("maml", 0.4), ("protonet", 0.4)):
            tasks = ArrayClassificationTasks(digits, n_way=5, shots=shots, queries=15,
                                             fractions=(0.5, 0.0, 0.5))
            settings = TrainSettings(algorithm=alg, tasks=tasks.describe(),
                                     model={"arch": "mlp", "hidden": [64, 64]}, inner_steps=1,
                                     inner_lr=lr, iterations=300 if quick else 3000,
                                     time_budget=budget / 2, val_every=100, seed=seed,
                                     meta_batch=16, device="cpu")
            result = train(settings, tasks)
            bundle = read_bundle(save_bundle(result, out / f"digits-{alg}-{shots}shot"))
            res = evaluate(bundle, shots=shots, steps=(0, 1, 5), n_tasks=n_tasks, seed=seed,
                           pretrain_iterations=200 if quick else 2000)
            print(format_table(res))
            report[f"digits_{alg}_{shots}shot"] = res
    (out / "fewshot.json").write_text(json.dumps(report, indent=2))
    _plot(report, out / "fewshot.png")
    print(f"results: {out / 'fewshot.json'}, plot: {out / 'fewshot.png'}")
    return report


def _plot(report: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for alg in ("maml", "metasgd"):
        for name, rows in report[f"sinusoid_{alg}"]["eval"]["methods"].items():
            if name == alg or alg == "maml":
                ax.plot([r["steps"] for r in rows], [r["loss"]["mean"] for r in rows], "o-",
                        label=name)
    ax.set_xlabel("inner steps")
    ax.set_ylabel("query MSE (K=5)")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title("sinusoid few-shot regression")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":  # pragma: no cover
    run_fewshot(Path(tempfile.mkdtemp()), quick=True)
