"""``edgemeta bench stream``: continual adaptation on a stream whose task keeps switching.

A piecewise-stationary stream (the task switches at random times, hazard ``1/300`` by default),
labels for every sample, prequential evaluation: each learner predicts a sample, then sees its
label. In one run, on the same stream:

- ``edgemeta``: the daemon's own code path (:meth:`Daemon.feed`: ONNX serving, the drift
  detector, support/holdout collection, the adapter worker process, the gate, the registry and the
  swap), driven in-process without inbox files. Each requested adaptation is finished before the
  next sample (:meth:`Daemon.drain`), which makes the figures deterministic; the daemon proper
  keeps serving the old model for the few milliseconds an adaptation takes.
- ``oracle``: told the true switch points; adapts the meta-initialization on the next K labels.
- ``meta-init``: the meta-initialization, never adapted.
- ``periodic``: fine-tunes the serving weights on the last ``window`` labels every ``period``
  samples, without drift detection or a gate.
- river's online learners for drifting streams: an adaptive random forest and a KNN over a sliding
  window (regressors for the sinusoid family, classifiers for the hyperplane family).
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

FAMILIES = ("sinusoid", "hyperplane")
DEFAULT_NOISE = {"sinusoid": 0.1, "hyperplane": 0.05}


@dataclass
class SwitchingStream:
    """Rows, labels, the task of each row and the rows where a new task begins."""

    family: str
    kind: str
    x: np.ndarray
    y: np.ndarray
    task: np.ndarray
    switches: list[int]


def family_tasks(family: str):
    from edgemeta.meta.tasks import HyperplaneTasks, SinusoidTasks

    if family == "sinusoid":
        return SinusoidTasks(shots=10, queries=10)
    if family == "hyperplane":
        return HyperplaneTasks(shots=10, queries=20)
    raise ValueError(f"unknown family {family!r}; use {', '.join(FAMILIES)}")


def switching_stream(family: str, n: int = 20_000, hazard: float = 1 / 300,
                     noise: float | None = None, seed: int = 0,
                     min_segment: int = 30) -> SwitchingStream:
    """Draw a stream whose task switches after geometric waits (at least ``min_segment`` rows).

    ``noise`` is the standard deviation of Gaussian label noise (regression) or the probability of
    a flipped label (classification).

    >>> s = switching_stream("sinusoid", n=2000, hazard=1 / 300, seed=0)
    >>> len(s.y), len(s.switches) > 0, s.switches == sorted(s.switches)
    (2000, True, True)
    """
    tasks = family_tasks(family)
    noise = DEFAULT_NOISE[family] if noise is None else noise
    rng = np.random.default_rng(seed)
    switches: list[int] = []
    t = 0
    while True:
        t += max(min_segment, int(rng.geometric(hazard)))
        if t >= n:
            break
        switches.append(t)
    params = tasks.sample_functions(len(switches) + 1, rng)
    task = np.searchsorted(np.asarray(switches, dtype=np.int64), np.arange(n), side="right")
    if family == "sinusoid":
        x = rng.uniform(*tasks.x_range, size=(n, 1))
    else:
        x = rng.uniform(-1.0, 1.0, size=(n, tasks.in_features))
    y = np.asarray(tasks.evaluate(params[task], x[:, None, :])).reshape(n)
    if tasks.kind == "regression":
        y = y + rng.normal(0.0, noise, n)
    else:
        flip = rng.random(n) < noise
        y = np.where(flip, 1 - y, y).astype(np.int64)
    return SwitchingStream(family, tasks.kind, x.astype(np.float32), y, task, switches)


def sample_loss(kind: str, prediction, y) -> np.ndarray:
    p, t = np.asarray(prediction, dtype=np.float64), np.asarray(y, dtype=np.float64)
    return (p - t) ** 2 if kind == "regression" else (p != t).astype(np.float64)


@dataclass
class Run:
    """One learner on one stream: per-sample loss and what it did."""

    name: str
    loss: np.ndarray
    seconds: float
    info: dict[str, Any] = field(default_factory=dict)


# -- edgemeta: the daemon's own path ----------------------------------------------------------------

def daemon_config(workdir: Path, bundle: Path, features: int, streams: tuple[str, ...] = ("s",),
                  shared: bool = False, **adaptation) -> Path:
    """A daemon config for the in-process run: no metrics endpoint, one table per stream
    (``shared``: all streams served by one model, as before lineages)."""
    workdir.mkdir(parents=True, exist_ok=True)
    names = [f"x{i}" for i in range(features)]
    a = {"support_size": 10, "holdout_size": 20, "timeout_s": 60, **adaptation}
    lines = ["[bundle]", f'path = "{bundle.resolve()}"', "[state]", f'dir = "{workdir / "state"}"',
             "[metrics]", "enabled = false", "[adaptation]"]
    lines += [f"{k} = {json.dumps(v)}" for k, v in a.items()]
    lines += ["[retention]", "keep_models = 5", "keep_episodes = 100000"]
    for name in streams:
        lines += ["[[streams]]", f'name = "{name}"', f"features = {json.dumps(names)}",
                  'label = "y"'] + (['model = "shared"'] if shared else [])
    path = workdir / "edgemeta.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def run_edgemeta(stream: SwitchingStream, bundle: Path, workdir: Path, batch: int = 1,
                 **adaptation) -> Run:
    """One stream through the daemon (:func:`run_daemon`)."""
    return run_daemon({"s": stream}, bundle, workdir, batch, **adaptation)["s"]


def run_daemon(streams: dict[str, SwitchingStream], bundle: Path, workdir: Path, batch: int = 1,
               shared: bool = False, **adaptation) -> dict[str, Run]:
    """Feed streams through :meth:`Daemon.feed`, interleaved batch by batch (``batch`` rows of
    each stream in turn), finishing each requested adaptation before the next batch
    (:meth:`Daemon.drain`): deterministic figures, where the daemon proper keeps serving the old
    model for the few milliseconds an adaptation takes."""
    from edgemeta.config import load_config
    from edgemeta.daemon.metrics import Metrics
    from edgemeta.daemon.runtime import Daemon

    first = next(iter(streams.values()))
    cfg = daemon_config(workdir, bundle, first.x.shape[1], tuple(streams), shared, **adaptation)
    daemon = Daemon(load_config(cfg), metrics=Metrics())
    daemon.setup()
    quiet = logging.getLogger("edgemeta.daemon")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    detector = daemon.settings.drift.detector
    info = {name: {"loss": np.empty(len(st.y)), "served": np.empty(len(st.y), dtype=np.int64),
                   "detections": [], "swaps": []} for name, st in streams.items()}

    def detections(name: str) -> float:
        return daemon.metrics.registry.get_sample_value(
            "edgemeta_drift_detections_total", {"stream": name, "detector": detector}) or 0.0

    serving = {name: daemon.models.version(name) for name in streams}
    try:
        if not daemon.adapter.wait_ready(120):
            raise RuntimeError("the adapter worker did not start")
        started = time.perf_counter()
        for lo in range(0, max(len(st.y) for st in streams.values()), batch):
            for name, st in streams.items():
                hi = min(len(st.y), lo + batch)
                if lo >= hi:
                    continue
                d, before = info[name], detections(name)
                predictions, version = daemon.feed(name, st.x[lo:hi], st.y[lo:hi])
                d["loss"][lo:hi] = sample_loss(st.kind, predictions, st.y[lo:hi])
                d["served"][lo:hi] = version
                if detections(name) > before:
                    d["detections"].append(hi - 1)
                if not daemon.drain(120):
                    raise RuntimeError("an adaptation did not finish within 120 s")
                for other in streams:  # a shared model changes for every stream that uses it
                    if daemon.models.version(other) != serving[other]:
                        serving[other] = daemon.models.version(other)
                        info[other]["swaps"].append((hi, serving[other]))
        seconds = time.perf_counter() - started
        episodes = [json.loads(p.read_text()) for p in
                    sorted((workdir / "state" / "episodes").glob("*.json"))]
    finally:
        quiet.setLevel(level)
        daemon.shutdown(drain_s=0.5)
    runs = {}
    for name, d in info.items():
        mine = [e for e in episodes if e["stream"] == name]
        runs[name] = Run("edgemeta", d["loss"], seconds, {
            "detections": d["detections"], "swaps": d["swaps"], "served_version": d["served"],
            "decisions": [(e["trigger"], e["result"], e["reason"], e.get("version"))
                          for e in mine],
            "accepted": sum(e["result"] == "accepted" for e in mine),
            "rejected": sum(e["result"] == "rejected" for e in mine),
            "failed": sum(e["result"] in ("failed", "timeout") for e in mine)})
    return runs


# -- the meta-learned alternatives, in torch ----------------------------------------------------------

class _Torch:
    """The bundle's network for the oracle, meta-init and periodic baselines."""

    def __init__(self, bundle: Path):
        import torch

        from edgemeta.meta.adapt import Adapter
        from edgemeta.meta.bundle import read_bundle

        self.torch = torch
        self.adapter = Adapter(read_bundle(bundle))
        self.kind = self.adapter.kind_
        self.init = self.adapter.bundle.network_weights()

    def predict(self, weights: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
        torch = self.torch
        a = self.adapter
        xt = torch.as_tensor((x - a._mean) / a._std)
        with torch.no_grad():
            out = torch.func.functional_call(a.model_, {k: torch.as_tensor(v) for k, v in
                                                        weights.items()}, (xt,)).numpy()
        return out[:, 0] if self.kind == "regression" else out.argmax(axis=1)

    def adapt(self, x, y, steps: int | None, init=None) -> dict[str, np.ndarray] | None:
        from edgemeta.meta.adapt import AdaptationFailed

        try:
            return self.adapter.adapt(x, y, steps=steps, init=init).weights
        except AdaptationFailed:
            return None


def _piecewise(net: _Torch, stream: SwitchingStream, changes: list[tuple[int, dict]]) -> np.ndarray:
    """Loss when the weights change at given rows (each change applies from that row on)."""
    n = len(stream.y)
    loss = np.empty(n)
    bounds = [c[0] for c in changes] + [n]
    for (start, weights), stop in zip(changes, bounds[1:], strict=True):
        if stop > start:
            pred = net.predict(weights, stream.x[start:stop])
            loss[start:stop] = sample_loss(stream.kind, pred, stream.y[start:stop])
    return loss


def run_oracle(stream: SwitchingStream, net: _Torch, support: int, steps: int | None) -> Run:
    started = time.perf_counter()
    changes = [(0, net.init)]
    for s in [0, *stream.switches]:
        end = s + support
        if end >= len(stream.y):
            break
        weights = net.adapt(stream.x[s:end], stream.y[s:end], steps)
        if weights is not None:
            changes.append((end, weights))
    changes.sort(key=lambda c: c[0])
    return Run("oracle", _piecewise(net, stream, changes), time.perf_counter() - started)


def run_meta_init(stream: SwitchingStream, net: _Torch) -> Run:
    started = time.perf_counter()
    return Run("meta-init", _piecewise(net, stream, [(0, net.init)]), time.perf_counter() - started)


def run_periodic(stream: SwitchingStream, net: _Torch, period: int, window: int,
                 steps: int | None) -> Run:
    started = time.perf_counter()
    current = net.init
    changes = [(0, current)]
    for t in range(period, len(stream.y), period):
        weights = net.adapt(stream.x[t - window:t], stream.y[t - window:t], steps, init=current)
        if weights is not None:
            current = weights
            changes.append((t, current))
    return Run("periodic", _piecewise(net, stream, changes), time.perf_counter() - started,
               {"period": period, "window": window})


# -- river ------------------------------------------------------------------------------------------

def river_learners(kind: str, seed: int) -> dict[str, Callable[[], Any]]:
    from river import forest, neighbors

    if kind == "regression":
        return {"river ARF": lambda: forest.ARFRegressor(seed=seed),
                "river KNN (window 100)": lambda: neighbors.KNNRegressor(
                    n_neighbors=5, engine=neighbors.LazySearch(window_size=100))}
    return {"river ARF": lambda: forest.ARFClassifier(seed=seed),
            "river KNN (window 100)": lambda: neighbors.KNNClassifier(
                n_neighbors=5, engine=neighbors.LazySearch(window_size=100))}


def run_river(name: str, make: Callable[[], Any], stream: SwitchingStream) -> Run:
    model = make()
    n = len(stream.y)
    loss = np.empty(n)
    names = [f"x{i}" for i in range(stream.x.shape[1])]
    started = time.perf_counter()
    for i in range(n):
        row = dict(zip(names, map(float, stream.x[i]), strict=True))
        label = float(stream.y[i]) if stream.kind == "regression" else int(stream.y[i])
        pred = model.predict_one(row)
        if pred is None:
            pred = 0.0 if stream.kind == "regression" else 0
        loss[i] = sample_loss(stream.kind, pred, label)
        model.learn_one(row, label)
    return Run(name, loss, time.perf_counter() - started)


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


# -- the benchmark ----------------------------------------------------------------------------------

BUNDLE_SETTINGS = {
    "sinusoid": {"algorithm": "maml", "inner_steps": 1, "inner_lr": 0.01, "outer_lr": 0.001},
    "hyperplane": {"algorithm": "maml", "inner_steps": 5, "inner_lr": 0.1, "outer_lr": 0.001},
}


def ensure_bundle(family: str, directory: Path, iterations: int) -> Path:
    """Meta-train the family's bundle once; later runs reuse it."""
    from edgemeta.meta.bundle import BundleError, read_bundle
    from edgemeta.meta.train import TrainSettings, save_bundle, train

    path = directory / f"{family}-maml-{iterations}"
    try:
        read_bundle(path)
        return path
    except BundleError:
        pass
    tasks = family_tasks(family)
    settings = TrainSettings(iterations=iterations, val_every=max(1, iterations // 10), seed=0,
                             device="cpu", tasks=tasks.describe(), **BUNDLE_SETTINGS[family])
    print(f"meta-training the {family} bundle ({iterations} iterations)", flush=True)
    return save_bundle(train(settings, tasks), path)


def rolling(loss: np.ndarray, window: int) -> np.ndarray:
    c = np.concatenate([[0.0], np.cumsum(loss)])
    idx = np.arange(1, len(loss) + 1)
    lo = np.maximum(0, idx - window)
    return (c[idx] - c[lo]) / (idx - lo)


def run_family(family: str, bundle: Path, seeds: list[int], n: int, hazard: float,
               noise: float | None, steps: int, support: int, holdout: int) -> dict[str, Any]:
    net = _Torch(bundle)
    per_seed = []
    for seed in seeds:
        stream = switching_stream(family, n=n, hazard=hazard, noise=noise, seed=seed)
        with tempfile.TemporaryDirectory() as tmp:
            runs = [run_edgemeta(stream, bundle, Path(tmp), steps=steps, support_size=support,
                                 holdout_size=holdout)]
        runs.append(run_oracle(stream, net, support, steps))
        runs.append(run_meta_init(stream, net))
        runs.append(run_periodic(stream, net, period=100, window=50, steps=steps))
        for name, make in river_learners(stream.kind, seed).items():
            runs.append(run_river(name, make, stream))
        edge = runs[0]
        det = detection_figures(stream.switches, edge.info["detections"], n)
        pair = interleaved(stream, switching_stream(family, n=n, hazard=hazard, noise=noise,
                                                    seed=seed + 1000),
                           bundle, edge, steps=steps, support_size=support, holdout_size=holdout)
        per_seed.append({"seed": seed, "stream": stream, "runs": runs, "detection": det,
                         "interleaved": pair})
        print(f"  {family} seed {seed}: " + ", ".join(
            f"{r.name} {r.loss.mean():.4g}" for r in runs), flush=True)
    return summarize(family, per_seed, n, hazard, noise, steps, support, holdout)


def interleaved(a: SwitchingStream, b: SwitchingStream, bundle: Path, a_alone: Run,
                **adaptation) -> dict[str, float]:
    """Two streams that drift independently, interleaved in one daemon (each with its own model
    lineage), against each stream run alone: the mean loss of each, both ways."""
    with tempfile.TemporaryDirectory() as tmp:
        both = run_daemon({"a": a, "b": b}, bundle, Path(tmp) / "both", **adaptation)
        b_alone = run_edgemeta(b, bundle, Path(tmp) / "b", **adaptation)
    return {"a_alone": float(a_alone.loss.mean()), "a_interleaved": float(both["a"].loss.mean()),
            "b_alone": float(b_alone.loss.mean()), "b_interleaved": float(both["b"].loss.mean())}


def summarize(family, per_seed, n, hazard, noise, steps, support, holdout) -> dict[str, Any]:
    names = [r.name for r in per_seed[0]["runs"]]
    table = {}
    for i, name in enumerate(names):
        means = np.array([s["runs"][i].loss.mean() for s in per_seed])
        table[name] = {"cumulative": float(means.mean()), "per_seed": means.tolist(),
                       "seconds": float(np.mean([s["runs"][i].seconds for s in per_seed]))}
    edge, oracle = table["edgemeta"]["cumulative"], table["oracle"]["cumulative"]
    river = {k: v["cumulative"] for k, v in table.items() if k.startswith("river")}
    best_river = min(river, key=river.get)
    delays = [d for s in per_seed for d in s["detection"]["delays"]]
    runs0 = per_seed[0]["runs"]
    edge_info = [s["runs"][0].info for s in per_seed]
    return {
        "family": family, "kind": per_seed[0]["stream"].kind, "samples": n, "hazard": hazard,
        "noise": DEFAULT_NOISE[family] if noise is None else noise, "seeds": len(per_seed),
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
        "interleaved": {
            "per_seed": [s["interleaved"] for s in per_seed],
            # interleaved / alone, per stream and seed: 1.0 = no worse for sharing the daemon
            "ratios": [s["interleaved"][f"{k}_interleaved"] / s["interleaved"][f"{k}_alone"]
                       for s in per_seed for k in ("a", "b")]},
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
        lines.append(f"  {'learner':<24}{'cumulative':>12}{'vs edgemeta':>13}{'seconds':>10}")
        edge = r["cumulative"]["edgemeta"]["cumulative"]
        for name, v in r["cumulative"].items():
            ratio = v["cumulative"] / edge if edge > 0 else math.inf
            lines.append(f"  {name:<24}{v['cumulative']:>12.4g}{ratio:>12.2f}x{v['seconds']:>10.1f}")
        d = r["detection"]
        lines.append(f"  edgemeta / oracle = {r['ratio_to_oracle']:.2f} (target <= 1.25); "
                     f"edgemeta / best river ({r['best_river']}) = {r['ratio_to_best_river']:.2f} "
                     f"(target <= 0.33)")
        lines.append(f"  detection: median delay {d['median_delay']} samples, missed {d['missed']}, "
                     f"false alarms {d['false_alarms']} ({d['false_alarms_per_10k']:.2f} per 10k); "
                     f"adaptations {r['edgemeta']}")
        ratios = np.asarray(r["interleaved"]["ratios"])
        lines.append(f"  two streams interleaved in one daemon vs each alone: loss ratio mean "
                     f"{ratios.mean():.3f} (min {ratios.min():.3f}, max {ratios.max():.3f}) over "
                     f"{len(ratios)} stream-seeds")
    return "\n".join(lines)


def run_stream_bench(out: Path, families: list[str], seeds: int = 3, n: int = 20_000,
                     hazard: float = 1 / 300, noise: float | None = None, steps: int = 30,
                     support: int = 10, holdout: int = 20, iterations: int | None = None,
                     bundles: Path | None = None) -> list[dict[str, Any]]:
    out.mkdir(parents=True, exist_ok=True)
    bundles = bundles or out / "bundles"
    results = []
    for family in families:
        its = iterations or {"sinusoid": 6000, "hyperplane": 3000}[family]
        bundle = ensure_bundle(family, bundles, its)
        result = run_family(family, bundle, list(range(seeds)), n, hazard, noise, steps, support,
                            holdout)
        result["bundle"] = str(bundle)
        plot_family(result, out / f"stream-{family}.png")
        results.append(result)
    report = format_results(results)
    print(report)
    clean = [{k: v for k, v in r.items() if not k.startswith("_")} for r in results]
    (out / "stream.json").write_text(json.dumps(clean, indent=2))
    return results
