"""Figures, tables and plots of ``edgemeta bench stream``."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from edgemeta.testing.streams import DEFAULT_NOISE

# -- detection figures --------------------------------------------------------------------------------

def detection_figures(switches: list[int], detections: list[int], n: int) -> dict[str, Any]:
    """Delay of the first detection after each switch; detections with no switch to explain them.

    A detection explains the latest switch before it if it is the first one since that switch;
    later detections in the same segment, or any before the first switch, are false alarms.

    >>> detection_figures([100, 500], [130, 160, 520], 1000)["delays"]
    [30, 20]
    >>> detection_figures([100, 500], [130, 160, 520], 1000)["false_alarms"]
    1
    """
    delays, false_alarms, seen = [], 0, set()
    for d in detections:
        before = [s for s in switches if s <= d]
        if not before or before[-1] in seen:
            false_alarms += 1
            continue
        seen.add(before[-1])
        delays.append(d - before[-1])
    return {"delays": delays, "missed": len(switches) - len(seen), "false_alarms": false_alarms,
            "false_alarms_per_10k": false_alarms * 10_000 / n}


def interval(values) -> str:
    """Mean and a 95% t-interval over seeds, as the tables quote it.

    >>> interval([1.0, 1.2, 1.1])
    '1.10 +- 0.25 (1.00, 1.20, 1.10)'
    """
    v = np.asarray(values, dtype=np.float64)
    if len(v) < 2:
        return f"{v.mean():.2f}"
    t = {2: 12.71, 3: 4.30, 4: 3.18, 5: 2.78}.get(len(v), 2.26 if len(v) < 11 else 2.0)
    half = t * v.std(ddof=1) / np.sqrt(len(v))
    return f"{v.mean():.2f} +- {half:.2f} ({', '.join(f'{x:.2f}' for x in v)})"


def rolling(loss: np.ndarray, window: int) -> np.ndarray:
    c = np.concatenate([[0.0], np.cumsum(loss)])
    idx = np.arange(1, len(loss) + 1)
    lo = np.maximum(0, idx - window)
    return (c[idx] - c[lo]) / (idx - lo)


def regime_rows(switches: list[int], n: int) -> dict[str, np.ndarray]:
    """Row indices of the first 100 rows after each switch (and the start) and of the last
    half of each regime: the fast start and the asymptote, judged apart."""
    bounds = [0, *switches, n]
    first = [np.arange(a, min(a + 100, b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    last = [np.arange((a + b) // 2, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    return {"first100": np.concatenate(first), "last_half": np.concatenate(last)}


#: The name of edgemeta's run with the portfolio of online experts mixed in.
PORTFOLIO = "edgemeta + portfolio"


def _portfolio_figures(table: dict[str, Any], per_seed, best_river: str) -> dict[str, Any] | None:
    """Edgemeta with the portfolio against the oracle, the best river learner and itself
    without the portfolio (cumulative, and on the first 100 rows after each switch)."""
    if PORTFOLIO not in table:
        return None
    mixed, oracle = table[PORTFOLIO], table["oracle"]
    names = [r.name for r in per_seed[0]["runs"]]
    i, e = names.index(PORTFOLIO), names.index("edgemeta")
    river = [j for j, name in enumerate(names) if name.startswith("river")]

    def ratio(a: float, b: float) -> float:
        return a / b if b > 0 else math.inf
    return {
        "ratio_to_oracle": ratio(mixed["cumulative"], oracle["cumulative"]),
        "ratio_to_best_river": ratio(mixed["cumulative"], table[best_river]["cumulative"]),
        "ratio_to_edgemeta": ratio(mixed["cumulative"], table["edgemeta"]["cumulative"]),
        "first100_ratio_to_oracle": ratio(mixed["first100"], oracle["first100"]),
        "ratio_to_best_river_per_seed": [
            s["runs"][i].loss.mean() / min(s["runs"][j].loss.mean() for j in river)
            for s in per_seed],
        "ratio_to_edgemeta_per_seed": [s["runs"][i].loss.mean() / s["runs"][e].loss.mean()
                                       for s in per_seed],
        "ms_per_row": 1e3 * mixed["seconds"] / len(per_seed[0]["stream"].y)}


def summarize(family, per_seed, n, hazard, noise, steps, support, holdout) -> dict[str, Any]:
    names = [r.name for r in per_seed[0]["runs"]]
    table = {}
    parts = [regime_rows(s["stream"].switches, n) for s in per_seed]
    for i, name in enumerate(names):
        means = np.array([s["runs"][i].loss.mean() for s in per_seed])
        table[name] = {"cumulative": float(means.mean()), "per_seed": means.tolist(),
                       "seconds": float(np.mean([s["runs"][i].seconds for s in per_seed])),
                       **{k: float(np.mean([s["runs"][i].loss[p[k]].mean()
                                            for s, p in zip(per_seed, parts, strict=True)]))
                          for k in ("first100", "last_half")}}
    edge, oracle = table["edgemeta"]["cumulative"], table["oracle"]["cumulative"]
    river = {k: v["cumulative"] for k, v in table.items() if k.startswith("river")}
    best_river = min(river, key=river.get)
    delays = [d for s in per_seed for d in s["detection"]["delays"]]
    runs0 = per_seed[0]["runs"]
    edge_info = [s["runs"][0].info for s in per_seed]
    return {
        "family": family, "kind": per_seed[0]["stream"].kind, "samples": n, "hazard": hazard,
        "noise": DEFAULT_NOISE.get(family.removesuffix("-recurring")) if noise is None else noise,
        "seeds": len(per_seed),
        "switches": [len(s["stream"].switches) for s in per_seed],
        "adaptation": {"steps": steps, "support": support, "holdout": holdout},
        "cumulative": table,
        "ratio_to_oracle": edge / oracle if oracle > 0 else math.inf,
        "ratio_to_best_river": edge / river[best_river] if river[best_river] > 0 else math.inf,
        "best_river": best_river,
        "detection": {
            "median_delay": float(np.median(delays)) if delays else None,
            "missed": sum(s["detection"]["missed"] for s in per_seed),
            "false_alarms": sum(s["detection"]["false_alarms"] for s in per_seed),
            "false_alarms_per_10k": float(np.mean([s["detection"]["false_alarms_per_10k"]
                                                   for s in per_seed]))},
        "edgemeta": {k: sum(i[k] for i in edge_info) for k in ("accepted", "rejected", "failed")},
        "recalls": sum(i["recalls"] for i in edge_info),
        # worker time of the continued fits per labelled row (the budget is per row)
        "continual_ms_per_row": 1e3 * sum(i["continual_seconds"] for i in edge_info)
        / (n * len(per_seed)),
        "ratio_to_oracle_per_seed": [s["runs"][0].loss.mean() / s["runs"][1].loss.mean()
                                     for s in per_seed],
        "ratio_to_best_river_per_seed": [s["runs"][0].loss.mean() / min(
            r.loss.mean() for r in s["runs"] if r.name.startswith("river")) for s in per_seed],
        "portfolio": _portfolio_figures(table, per_seed, best_river),
        "last_half_ratio_to_arf": table["edgemeta"]["last_half"]
        / table["river ARF"]["last_half"],
        "interleaved": {
            "per_seed": [s["interleaved"] for s in per_seed if "interleaved" in s],
            # interleaved / alone, per stream and seed: 1.0 = no worse for sharing the daemon
            "ratios": [s["interleaved"][f"{k}_interleaved"] / s["interleaved"][f"{k}_alone"]
                       for s in per_seed if "interleaved" in s for k in ("a", "b")]},
        "_plot": {"switches": per_seed[0]["stream"].switches,
                  "detections": runs0[0].info["detections"],
                  "swaps": runs0[0].info["swaps"],
                  "served_version": runs0[0].info["served_version"],
                  "rolling": {r.name: rolling(r.loss, 200) for r in runs0}},
    }


def plot_family(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    p = result["_plot"]
    fig, (ax, bx) = plt.subplots(2, 1, figsize=(12, 6.5), sharex=True,
                                 gridspec_kw={"height_ratios": [3, 1]})
    for name, curve in p["rolling"].items():
        ax.plot(curve, label=name, lw=1.6 if name in ("edgemeta", "oracle") else 0.9)
    for s in p["switches"]:
        ax.axvline(s, color="grey", lw=0.5, alpha=0.5)
    ax.plot(p["detections"], np.full(len(p["detections"]), 0.02), "rv", ms=4,
            transform=ax.get_xaxis_transform(), label="drift detected")
    ax.set_yscale("log" if result["kind"] == "regression" else "linear")
    ax.set_ylabel("rolling error (200 samples)")
    ax.set_title(f"{result['family']} stream (seed 0): task switches (grey), edgemeta's detections")
    ax.legend(fontsize=8, ncol=4, loc="upper right")
    bx.step(np.arange(len(p["served_version"])), p["served_version"], where="post")
    bx.set_ylabel("served version")
    bx.set_xlabel("sample")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def format_results(results: list[dict[str, Any]]) -> str:
    lines = []
    for r in results:
        lines.append(f"\n{r['family']} ({r['kind']}, {r['samples']} samples x {r['seeds']} seeds, "
                     f"switches per seed {r['switches']}; loss = "
                     f"{'MSE' if r['kind'] == 'regression' else 'error rate'})")
        lines.append(f"  {'learner':<24}{'cumulative':>12}{'vs edgemeta':>13}{'first 100':>11}"
                     f"{'last half':>11}{'seconds':>10}")
        edge = r["cumulative"]["edgemeta"]["cumulative"]
        for name, v in r["cumulative"].items():
            ratio = v["cumulative"] / edge if edge > 0 else math.inf
            lines.append(f"  {name:<24}{v['cumulative']:>12.4g}{ratio:>12.2f}x"
                         f"{v['first100']:>11.4g}{v['last_half']:>11.4g}{v['seconds']:>10.1f}")
        d = r["detection"]
        lines.append(f"  edgemeta / oracle = {interval(r['ratio_to_oracle_per_seed'])} over seeds "
                     f"(pooled {r['ratio_to_oracle']:.2f}; target <= 1.0); edgemeta / best river "
                     f"(per seed) = {interval(r['ratio_to_best_river_per_seed'])} (pooled, "
                     f"{r['best_river']}: {r['ratio_to_best_river']:.2f}; target <= 1.0, "
                     f"sinusoid <= 0.5); last half vs river ARF {r['last_half_ratio_to_arf']:.2f} "
                     "(target <= 1.2)")
        pf = r.get("portfolio")
        if pf:
            lines.append(f"  {PORTFOLIO}: / best river (per seed) = "
                         f"{interval(pf['ratio_to_best_river_per_seed'])} (target <= 1.0); "
                         f"/ oracle {pf['ratio_to_oracle']:.2f}; / edgemeta alone (per seed) = "
                         f"{interval(pf['ratio_to_edgemeta_per_seed'])}; first 100 rows after a "
                         f"switch / oracle {pf['first100_ratio_to_oracle']:.2f}; "
                         f"{pf['ms_per_row']:.2f} ms per row")
        lines.append(f"  continued learning: {r['continual_ms_per_row']:.3f} ms of worker time per "
                     f"labelled row; recalls {r['recalls']}")
        lines.append(f"  detection: median delay {d['median_delay']} samples, missed {d['missed']}, "
                     f"false alarms {d['false_alarms']} ({d['false_alarms_per_10k']:.2f} per 10k); "
                     f"adaptations {r['edgemeta']}")
        ratios = np.asarray(r["interleaved"]["ratios"])
        if not len(ratios):
            continue
        lines.append(f"  two streams interleaved in one daemon vs each alone: loss ratio mean "
                     f"{ratios.mean():.3f} (min {ratios.min():.3f}, max {ratios.max():.3f}) over "
                     f"{len(ratios)} stream-seeds")
    return "\n".join(lines)
