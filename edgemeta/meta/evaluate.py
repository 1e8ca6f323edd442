"""Few-shot evaluation on meta-test tasks, beside the baselines a user would weigh it against.

Every method sees the same sampled tasks (same support and query sets), so differences between
rows are the methods', not the luck of the draw. One task set is not enough for a headline: the
sinusoid family's losses are heavy-tailed, and four seeds of 600 tasks gave 0.544 to 0.638 for the
same bundle. So the tasks come from several evaluation seeds, the figure is the mean over all of
them with a 95% normal-approximation interval over tasks, and the per-seed means are reported
beside it so the spread is visible.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from edgemeta.meta.algorithms import MetaLearner, make_learner
from edgemeta.meta.bundle import Bundle
from edgemeta.meta.chance import judged_on
from edgemeta.meta.inner import batch_loss, batch_predict, output_loss
from edgemeta.meta.models import build_model, head_names
from edgemeta.meta.tasks import (
    ArrayClassificationTasks,
    StandardizedTargets,
    TaskBatch,
    build_tasks,
)

#: A task whose query loss after adaptation is this many times its loss before has diverged: it is
#: counted and left out of the mean, so one exploding task cannot print 6e16 as "the" loss.
DIVERGED_RATIO = 100.0


def interval(values: torch.Tensor, diverged: torch.Tensor | None = None,
             groups: torch.Tensor | None = None) -> dict[str, Any]:
    """Mean and 95% half-width over the tasks that did not diverge (non-finite, or flagged in
    ``diverged``); ``groups`` (the evaluation seed of each task) adds the per-seed means.

    Meta-SGD run past its trained steps diverges on some tasks; one NaN must not hide the others.
    """
    v = values.detach().double()
    bad = ~torch.isfinite(v)
    if diverged is not None:
        bad |= diverged
    kept = v[~bad]
    out: dict[str, Any] = {"mean": float("nan"), "ci95": float("nan"), "diverged": int(bad.sum()),
                           "tasks": len(kept)}
    if len(kept):
        out["mean"] = float(kept.mean())
    if len(kept) > 1:
        out["ci95"] = 1.96 * float(kept.std(unbiased=True)) / math.sqrt(len(kept))
    if groups is not None:
        out["seed_means"] = [float(v[(groups == g) & ~bad].mean()) for g in groups.unique()]
    return out


def task_scores(learner: MetaLearner, params, batch: TaskBatch, steps: int,
                loss_scale: float = 1.0) -> dict[str, torch.Tensor]:
    """Per-task query loss after ``steps`` (and before any, to spot divergence) and accuracy.

    ``loss_scale``: std^2 of standardized targets, so MSE is reported in the user's units.
    """
    start = {n: p.detach() for n, p in params.items()}
    with torch.enable_grad():
        fast = learner.adapt(start, batch, steps=steps, first_order=True)
    fast = {n: p.detach() for n, p in fast.items()}
    with torch.no_grad():
        unadapted = MetaLearner.adapt(learner, start, batch, steps=0)  # any learner's own init
        before = batch_loss(learner.model, learner.kind, unadapted, batch.query_x, batch.query_y)
        losses = batch_loss(learner.model, learner.kind, fast, batch.query_x, batch.query_y)
        out = {"loss": losses * loss_scale,
               "diverged": ~torch.isfinite(losses) | (losses > DIVERGED_RATIO * before)}
        if learner.kind == "classification":
            pred = batch_predict(learner.model, fast, batch.query_x)
            out["accuracy"] = (pred.argmax(-1) == batch.query_y).double().mean(-1)
    return out


def score(learner: MetaLearner, params, batches: Sequence[TaskBatch], steps: int,
          loss_scale: float = 1.0) -> dict[str, Any]:
    """One table row: the tasks of every evaluation seed pooled, with the per-seed means."""
    parts = [task_scores(learner, params, b, steps, loss_scale) for b in batches]
    groups = torch.cat([torch.full((len(p["loss"]),), i) for i, p in enumerate(parts)])
    diverged = torch.cat([p["diverged"] for p in parts])
    row = {"steps": steps,
           "loss": interval(torch.cat([p["loss"] for p in parts]), diverged, groups)}
    if "accuracy" in parts[0]:
        row["accuracy"] = interval(torch.cat([p["accuracy"] for p in parts]), diverged, groups)
    return row


def pretrain(bundle: Bundle, tasks, iterations: int, seed: int) -> dict[str, torch.Tensor]:
    """One model trained jointly on the meta-train tasks: the transfer-learning baseline.

    For a class-split array the network is trained on all meta-train classes with a head as wide
    as those classes; the head is then replaced by a fresh n-way head to be fine-tuned.
    """
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    spec = dict(bundle.meta["model"])
    kind = bundle.meta["task"]["kind"]
    pooled = isinstance(tasks, ArrayClassificationTasks)
    if pooled:
        x_all, y_all = tasks.pooled("train")
        spec["out_features"] = int(y_all.max()) + 1
    model = build_model(spec)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(iterations):
        if pooled:
            rows = rng.integers(len(x_all), size=256)
            x, y = torch.as_tensor(x_all[rows]), torch.as_tensor(y_all[rows])
        else:
            b = tasks.sample(16, rng)
            x = torch.cat([b.support_x, b.query_x], 1).flatten(0, 1)
            y = torch.cat([b.support_y, b.query_y], 1).flatten(0, 1)
        loss = output_loss(kind, model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    params = {n: p.detach() for n, p in model.named_parameters()}
    if pooled:
        fresh = build_model(bundle.meta["model"])
        for n in head_names(fresh, bundle.meta["model"]):
            params[n] = dict(fresh.named_parameters())[n].detach()
    return params


def evaluate(bundle: Bundle, shots: int | None = None, steps: Sequence[int] = (0, 1, 5, 10),
             n_tasks: int = 600, seed: int = 0, seeds: int = 5, baselines: bool = True,
             pretrain_iterations: int = 2000, target: float | None = None,
             shot_grid: Sequence[int] = (1, 2, 5, 10, 20), tasks=None) -> dict[str, Any]:
    """Query loss (and accuracy) after each step count, for the bundle and the baselines, on
    ``n_tasks`` meta-test tasks from each of ``seeds`` evaluation seeds (``seed``, ``seed + 1``...).

    ``tasks`` replaces the bundle's own distribution (a task folder in the bundle's feature scale),
    so different bundles can be judged on the same tasks."""
    if seeds < 1 or n_tasks < 1:
        raise ValueError(f"seeds and n_tasks must be >= 1, got {seeds} and {n_tasks}")
    meta = bundle.meta
    tasks = tasks if tasks is not None else build_tasks(meta["task"]["distribution"])
    scaling = meta["output"].get("scaling")
    if scaling:
        tasks = StandardizedTargets(tasks, scaling["mean"], scaling["std"])
    scale = scaling["std"] ** 2 if scaling else 1.0
    shots = int(shots or tasks.shots)
    batches = [tasks.sample(n_tasks, np.random.default_rng(10_000 + s), split="test", shots=shots)
               for s in range(seed, seed + seeds)]
    model = bundle.build_model()
    head = head_names(model, meta["model"])
    kind = meta["task"]["kind"]
    inner_lr = float(meta["inner"]["lr"])
    learner = make_learner(meta["algorithm"], model, kind, int(meta["inner"]["steps"]), inner_lr, head)
    init = {n: torch.from_numpy(w.copy()) for n, w in bundle.weights.items()}
    plain = make_learner("maml", model, kind, 1, inner_lr, head)
    methods: dict[str, tuple[MetaLearner, dict[str, torch.Tensor]]] = {
        meta["algorithm"]: (learner, init)}
    if baselines:
        torch.manual_seed(seed)
        random_init = {n: p.detach() for n, p in build_model(meta["model"]).named_parameters()}
        methods["random-init"] = (plain, random_init)
        if tasks.has("train"):  # not for an evaluation-only folder
            methods["pretrain-finetune"] = (plain, pretrain(bundle, tasks, pretrain_iterations, seed))
    results: dict[str, Any] = {"bundle": str(bundle.path), "algorithm": meta["algorithm"],
                               "kind": kind, "shots": shots, "tasks": n_tasks * seeds,
                               "seeds": list(range(seed, seed + seeds)), "methods": {}}
    step_list = [0] if learner.closed_form else list(steps)
    for name, (lrn, params) in methods.items():
        rows = [score(lrn, params, batches, s, scale)
                for s in (step_list if lrn is learner else steps)]
        results["methods"][name] = rows
    if baselines:
        results["methods"]["no-adaptation"] = [score(plain, learner.network(init), batches,
                                                     0, scale)]
    trained = learner.inner_steps
    scores = [task_scores(learner, init, b, trained, scale) for b in batches]
    losses = torch.cat([s["loss"] for s in scores])
    errors = (1 - torch.cat([s["accuracy"] for s in scores]) if kind == "classification"
              else None)
    check = judged_on(kind, batches, tasks.out_features, losses, errors, loss_scale=scale)
    results["versus_chance"] = {"steps": trained, **check.as_dict(), "text": check.describe()}
    if target is not None:
        results["speed"] = speed_view(results, learner, init, tasks, target, shot_grid, seed,
                                      scale)
    return results


def speed_view(results: dict[str, Any], learner: MetaLearner, init, tasks, target: float,
               shot_grid: Sequence[int], seed: int, loss_scale: float = 1.0) -> dict[str, Any]:
    """How many steps, and how many shots, the bundle needs to reach ``target`` query loss."""
    steps_needed = {
        name: next((r["steps"] for r in rows if r["loss"]["mean"] <= target), None)
        for name, rows in results["methods"].items()}
    trained = learner.inner_steps
    shots_needed = None
    for k in shot_grid:
        try:
            b = tasks.sample(200, np.random.default_rng(20_000 + seed), split="test", shots=k)
        except ValueError:
            break
        if score(learner, init, [b], trained, loss_scale)["loss"]["mean"] <= target:
            shots_needed = k
            break
    return {"target_loss": target, "steps_to_target": steps_needed,
            "shots_to_target_at_trained_steps": shots_needed, "shot_grid": list(shot_grid)}


def format_table(results: dict[str, Any], name: str | None = None) -> str:
    seeds = results.get("seeds", [0])
    title = f"{name}: " if name else ""
    lines = [f"{title}{results['algorithm']} bundle, {results['shots']}-shot, {results['tasks']} "
             f"meta-test tasks from {len(seeds)} evaluation seed(s) {seeds[0]}..{seeds[-1]} "
             f"(mean +- 95% interval of query loss over tasks; the range of the per-seed means; "
             f"tasks whose loss grew {DIVERGED_RATIO:.0f}x counted as diverged and left out)"]
    header = f"{'method':<20} {'steps':>5} {'loss':>18} {'seed range':>17}"
    if results["kind"] == "classification":
        header += f" {'accuracy':>18}"
    lines.append(header)
    for name, rows in results["methods"].items():
        for r in rows:
            loss = r["loss"]
            spread = loss.get("seed_means") or [loss["mean"]]
            line = (f"{name:<20} {r['steps']:>5} {loss['mean']:>9.4f} +- {loss['ci95']:<6.4f} "
                    f"{min(spread):>8.4f}-{max(spread):<8.4f}")
            if "accuracy" in r:
                line += f" {r['accuracy']['mean']:>9.4f} +- {r['accuracy']['ci95']:<6.4f}"
            if loss["diverged"]:
                line += f"  ({loss['diverged']} of {loss['diverged'] + loss['tasks']} tasks diverged)"
            lines.append(line)
    chance = results.get("versus_chance")
    if chance:
        lines.append(f"no-adaptation predictor (the support's mean or class frequencies): "
                     f"{chance['chance_loss']:.4f}")
        if not chance["learned"]:
            lines.append(f"WARNING: this bundle learned nothing measurable: after "
                         f"{chance['steps']} step(s), {chance['text']}")
    if "speed" in results:
        s = results["speed"]
        needed = ", ".join(f"{k}: {v if v is not None else 'not reached'}"
                           for k, v in s["steps_to_target"].items())
        lines.append(f"target loss {s['target_loss']}: steps needed ({needed}); shots needed at "
                     f"the trained steps: {s['shots_to_target_at_trained_steps'] or 'not reached'}")
    return "\n".join(lines)


# Two-sided 95% Student t quantiles by degrees of freedom (seeds - 1); beyond 30, the normal's.
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
        9: 2.262, 10: 2.228, 15: 2.131, 20: 2.086, 30: 2.042}


def _t95(df: int) -> float:
    return next((v for k, v in sorted(_T95.items()) if df <= k), 1.96)


def compare(results: list[dict[str, Any]], names: list[str]) -> list[dict[str, Any]]:
    """Each bundle after the first against the first, on the same tasks: per step count, the
    difference of query loss (negative: better) paired by evaluation seed (each seed draws the
    same tasks for every bundle), its 95% interval over the seeds, and a verdict that says
    "better" or "worse" only when the interval leaves 0 out."""
    base = {r["steps"]: r["loss"] for r in results[0]["methods"][results[0]["algorithm"]]}
    out = []
    for other, name in zip(results[1:], names[1:], strict=True):
        for row in other["methods"][other["algorithm"]]:
            if row["steps"] not in base:
                continue
            a = np.asarray(base[row["steps"]].get("seed_means") or [base[row["steps"]]["mean"]])
            b = np.asarray(row["loss"].get("seed_means") or [row["loss"]["mean"]])
            if len(a) != len(b):
                continue
            d = b - a
            half = (_t95(len(d) - 1) * float(d.std(ddof=1)) / math.sqrt(len(d))
                    if len(d) > 1 else math.nan)
            mean = float(d.mean())
            verdict = ("no significant difference" if not half < abs(mean)
                       else "better" if mean < 0 else "worse")
            out.append({"bundle": name, "against": names[0], "steps": row["steps"],
                        "difference": mean, "ci95": half,
                        "relative": mean / float(a.mean()) if a.mean() else math.nan,
                        "verdict": verdict})
    return out


def format_comparison(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ""
    lines = [f"against {rows[0]['against']} (query loss, paired by evaluation seed; negative: "
             f"lower loss)", f"{'bundle':<28} {'steps':>5} {'difference':>20} {'change':>8}  "
             f"verdict"]
    for r in rows:
        lines.append(f"{r['bundle'][-28:]:<28} {r['steps']:>5} {r['difference']:>+10.4f} +- "
                     f"{r['ci95']:<7.4f} {r['relative']:>+8.1%}  {r['verdict']}")
    return "\n".join(lines)
