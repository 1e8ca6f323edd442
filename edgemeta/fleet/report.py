"""Describe a task folder, so an operator sees whether it is worth meta-training on.

Meta-learning buys a fast start only where tasks differ in a way a few labels reveal: a folder
of near-identical tasks is better served by plain fine-tuning, and a handful of tasks cannot
define a distribution. The report gives the sizes, the label or target ranges, and a diversity
figure: each task is summarised by statistics in units of the pooled data's spread (feature
means and spreads, target mean and spread, the least-squares slope of the target on each
feature; per-class feature means for classification), and tasks are compared pairwise.

>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> xs = [rng.normal(size=(40, 1)) for _ in range(3)]
>>> r = describe_tasks([(x, a * x[:, 0]) for x, a in zip(xs, (1.0, -1.0, 3.0))])
>>> r["tasks"], r["diversity"]["near_identical_pairs"]
(3, 0)
"""

from __future__ import annotations

from typing import Any

import numpy as np

NEAR = 0.1  # tasks closer than this (in pooled-spread units) say the same thing


def _stats(x: np.ndarray, y: np.ndarray, kind: str, classes: np.ndarray,
           x_scale: np.ndarray, y_scale: float) -> np.ndarray:
    if kind == "classification":
        means = [x[y == c].mean(axis=0) if np.any(y == c) else np.zeros(x.shape[1]) for c in classes]
        return np.concatenate(means) / np.tile(x_scale, len(classes))
    xc = x - x.mean(axis=0)
    var = (xc ** 2).sum(axis=0)
    slope = (xc * (y - y.mean())[:, None]).sum(axis=0) / np.where(var > 0, var, 1.0)
    return np.concatenate([x.mean(axis=0) / x_scale, x.std(axis=0) / x_scale,
                           [y.mean() / y_scale, y.std() / y_scale], slope * x_scale / y_scale])


def describe_tasks(tasks: list[tuple[np.ndarray, np.ndarray]], kind: str = "regression") -> dict[str, Any]:
    """Sizes, ranges and pairwise diversity of ``tasks`` (a list of (X, y))."""
    if not tasks:
        raise ValueError("no tasks to describe")
    sizes = np.asarray([len(y) for _, y in tasks])
    all_x = np.concatenate([x for x, _ in tasks])
    all_y = np.concatenate([np.asarray(y, dtype=np.float64) for _, y in tasks])
    x_scale = all_x.std(axis=0)
    x_scale[x_scale < 1e-12] = 1.0
    y_scale = float(all_y.std()) or 1.0
    classes = np.unique(all_y) if kind == "classification" else np.asarray([])
    stats = np.stack([_stats(x, np.asarray(y, dtype=np.float64), kind, classes, x_scale, y_scale)
                      for x, y in tasks])
    n = len(tasks)
    if n > 1:
        diff = stats[:, None, :] - stats[None, :, :]
        dist = np.sqrt((diff ** 2).mean(axis=2))
        upper = dist[np.triu_indices(n, 1)]
        nearest = np.where(np.eye(n, dtype=bool), np.inf, dist).min(axis=1)
        diversity = {"mean_pairwise": float(upper.mean()), "median_nearest": float(np.median(nearest)),
                     "near_identical_pairs": int((upper < NEAR).sum()), "pairs": int(len(upper))}
    else:
        diversity = {"mean_pairwise": 0.0, "median_nearest": 0.0, "near_identical_pairs": 0, "pairs": 0}
    report: dict[str, Any] = {
        "tasks": n, "kind": kind, "features": int(all_x.shape[1]),
        "rows": {"total": int(sizes.sum()), "min": int(sizes.min()), "median": float(np.median(sizes)),
                 "max": int(sizes.max())},
        "labels": {"min": float(all_y.min()), "max": float(all_y.max())},
        "diversity": diversity}
    if kind == "regression":
        means = np.asarray([np.mean(y) for _, y in tasks])
        spreads = np.asarray([np.std(y) for _, y in tasks])
        report["labels"].update({"task_mean_range": [float(means.min()), float(means.max())],
                                 "task_std_range": [float(spreads.min()), float(spreads.max())]})
    else:
        report["labels"]["classes"] = [int(c) for c in classes]
    report["advice"] = _advice(report)
    return report


def _advice(report: dict[str, Any]) -> list[str]:
    advice = []
    if report["tasks"] < 10:
        advice.append(f"only {report['tasks']} tasks: too few to stand for a task distribution "
                      "(harvest more devices or keep more episodes)")
    d = report["diversity"]
    if d["pairs"] and d["near_identical_pairs"] > d["pairs"] / 2:
        advice.append("most task pairs are near-identical: meta-training learns little here "
                      "that plain fine-tuning would not")
    if d["pairs"] and d["mean_pairwise"] < NEAR:
        advice.append(f"mean pairwise distance {d['mean_pairwise']:.3f} < {NEAR}: the tasks barely differ")
    return advice


def format_report(report: dict[str, Any], where: str = "") -> str:
    r, d = report["rows"], report["diversity"]
    lines = [f"{where}{report['tasks']} {report['kind']} task(s), {report['features']} feature(s)",
             f"  rows per task: min {r['min']}, median {r['median']:g}, max {r['max']} "
             f"({r['total']} in all)",
             f"  labels: {report['labels']['min']:.4g} to {report['labels']['max']:.4g}"]
    if "task_mean_range" in report["labels"]:
        lo, hi = report["labels"]["task_mean_range"]
        slo, shi = report["labels"]["task_std_range"]
        lines.append(f"  per-task target mean {lo:.4g} to {hi:.4g}, spread {slo:.4g} to {shi:.4g}")
    else:
        classes = report["labels"]["classes"]
        said = (", ".join(f"{c}: {n} rows" for c, n in classes.items())
                if isinstance(classes, dict) else str(classes))
        lines.append(f"  classes: {said}")
    lines.append(f"  diversity (pooled-spread units): mean pairwise {d['mean_pairwise']:.3f}, "
                 f"median nearest {d['median_nearest']:.3f}, near-identical pairs "
                 f"{d['near_identical_pairs']} of {d['pairs']}")
    for sources_line in report.get("provenance", []):
        lines.append(f"  {sources_line}")
    lines += [f"  warning: {a}" for a in report["advice"]]
    return "\n".join(lines)
