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

import dataclasses
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from edgemeta.bench.baselines import (
    TorchNet,
    river_learners,
    run_expert,
    run_meta_init,
    run_oracle,
    run_periodic,
    run_river,
)
from edgemeta.bench.report import (
    PORTFOLIO,
    detection_figures,
    format_results,
    plot_family,
    summarize,
)
from edgemeta.bench.river_families import (
    KINDS,
    RIVER_FAMILIES,
    river_stream,
    write_related_tasks,
)
from edgemeta.portfolio.experts import DEFAULT_EXPERTS
from edgemeta.testing.streams import (
    FAMILIES,
    Run,
    SwitchingStream,
    family_tasks,
    recurring_stream,
    sample_loss,
    switching_stream,
)

# The project's own families, then river's generators (``river_families``).
ALL_FAMILIES = (*FAMILIES, *RIVER_FAMILIES)

__all__ = ["ALL_FAMILIES", "FAMILIES", "OPTIONAL_RUNS", "run_stream_bench", "run_edgemeta",
           "run_daemon", "daemon_config", "switching_stream"]

# -- edgemeta: the daemon's own path ----------------------------------------------------------------

def daemon_config(workdir: Path, bundle: Path, features: int, streams: tuple[str, ...] = ("s",),
                  shared: bool = False, sections: dict[str, dict] | None = None,
                  **adaptation) -> Path:
    """A daemon config for the in-process run: no metrics endpoint, one table per stream
    (``shared``: all streams served by one model, as before lineages); ``sections``: other
    tables (``{"continual": {"enabled": False}}``)."""
    workdir.mkdir(parents=True, exist_ok=True)
    names = [f"x{i}" for i in range(features)]
    a = {"support_size": 10, "holdout_size": 20, "timeout_s": 60, **adaptation}
    lines = ["[bundle]", f'path = "{bundle.resolve()}"', "[state]", f'dir = "{workdir / "state"}"',
             "[metrics]", "enabled = false", "[adaptation]"]
    lines += [f"{k} = {json.dumps(v)}" for k, v in a.items()]
    # "edgemeta" in this bench is the ONNX model alone; the portfolio (the daemon's default)
    # is the run that asks for it, so both are reported side by side.
    tables = {"retention": {"keep_models": 5, "keep_episodes": 100000},
              "portfolio": {"enabled": False}}
    for section, values in (sections or {}).items():
        tables[section] = {**tables.get(section, {}), **values}
    for section, values in tables.items():
        lines += [f"[{section}]"] + [f"{k} = {json.dumps(v)}" for k, v in values.items()]
    for name in streams:
        lines += ["[[streams]]", f'name = "{name}"', f"features = {json.dumps(names)}",
                  'label = "y"'] + (['model = "shared"'] if shared else [])
    path = workdir / "edgemeta.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def run_edgemeta(stream: SwitchingStream, bundle: Path, workdir: Path, batch: int = 1,
                 sections: dict[str, dict] | None = None, **adaptation) -> Run:
    """One stream through the daemon (:func:`run_daemon`)."""
    return run_daemon({"s": stream}, bundle, workdir, batch, sections=sections, **adaptation)["s"]


def run_daemon(streams: dict[str, SwitchingStream], bundle: Path, workdir: Path, batch: int = 1,
               shared: bool = False, sections: dict[str, dict] | None = None,
               **adaptation) -> dict[str, Run]:
    """Feed streams through :meth:`Daemon.feed`, interleaved batch by batch (``batch`` rows of
    each stream in turn), finishing each requested adaptation before the next batch
    (:meth:`Daemon.drain`): deterministic figures, where the daemon proper keeps serving the old
    model for the few milliseconds an adaptation takes."""
    from edgemeta.config import load_config
    from edgemeta.testing.inprocess import InProcessDaemon

    first = next(iter(streams.values()))
    cfg = daemon_config(workdir, bundle, first.x.shape[1], tuple(streams), shared, sections,
                        **adaptation)
    daemon = InProcessDaemon(load_config(cfg)).start()
    quiet = logging.getLogger("edgemeta.daemon")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    info = {name: {"loss": np.empty(len(st.y)), "served": np.empty(len(st.y), dtype=np.int64),
                   "detections": [], "swaps": []} for name, st in streams.items()}

    serving = {name: daemon.version(name) for name in streams}
    try:
        started = time.perf_counter()
        for lo in range(0, max(len(st.y) for st in streams.values()), batch):
            for name, st in streams.items():
                hi = min(len(st.y), lo + batch)
                if lo >= hi:
                    continue
                d, before = info[name], daemon.view(name).drifts
                predictions, version = daemon.feed(name, st.x[lo:hi], st.y[lo:hi])
                d["loss"][lo:hi] = sample_loss(st.kind, predictions, st.y[lo:hi])
                d["served"][lo:hi] = version
                if daemon.view(name).drifts > before:
                    d["detections"].append(hi - 1)
                if not daemon.drain(120):
                    raise RuntimeError("an adaptation did not finish within 120 s")
                for other in streams:  # a shared model changes for every stream that uses it
                    if daemon.version(other) != serving[other]:
                        serving[other] = daemon.version(other)
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
            "recalls": sum(e["trigger"] == "recall" for e in mine),
            "continual_seconds": sum(e.get("worker_seconds", 0.0) for e in mine
                                     if e["trigger"] == "continual"),
            "rejected": sum(e["result"] == "rejected" for e in mine),
            "failed": sum(e["result"] in ("failed", "timeout") for e in mine)})
    return runs


# -- the benchmark ----------------------------------------------------------------------------------

BUNDLE_SETTINGS = {
    "sinusoid": {"algorithm": "maml", "inner_steps": 1, "inner_lr": 0.01, "outer_lr": 0.001},
    "hyperplane": {"algorithm": "maml", "inner_steps": 5, "inner_lr": 0.1, "outer_lr": 0.001},
}


# A new user's settings for a family of their own: MAML, 5 inner steps (the README's `train`).
RIVER_BUNDLE_SETTINGS = {"algorithm": "maml", "inner_steps": 5, "inner_lr": 0.1,
                         "outer_lr": 0.001}


def ensure_river_bundle(family: str, directory: Path, iterations: int) -> Path:
    """Meta-train on the family's related tasks (``river_families``), read from a task folder
    as a user's own tasks would be; later runs reuse the bundle."""
    from edgemeta.meta.tasks import TaskFolderTasks

    folder = directory / f"{family}-tasks"
    if not (folder / "task-00399.npz").is_file():
        write_related_tasks(family, folder)
    kind = KINDS[family]
    tasks = TaskFolderTasks(folder, kind=kind, shots=5 if kind == "classification" else 10,
                            queries=10)
    return _train_once(family, tasks, directory, iterations, RIVER_BUNDLE_SETTINGS,
                       f" on {folder}")


def ensure_bundle(family: str, directory: Path, iterations: int) -> Path:
    """Meta-train the family's bundle once; later runs reuse it."""
    return _train_once(family, family_tasks(family), directory, iterations,
                       BUNDLE_SETTINGS[family])


def _train_once(family: str, tasks, directory: Path, iterations: int, algorithm: dict[str, Any],
                source: str = "") -> Path:
    """The bundle ``<family>-maml-<iterations>`` in ``directory``, meta-trained there unless an
    earlier run left it whole (``harness.read_or_train``)."""
    from edgemeta.meta.train import TrainSettings
    from edgemeta.testing.harness import read_or_train

    settings = TrainSettings(iterations=iterations, val_every=max(1, iterations // 10), seed=0,
                             device="cpu", tasks=tasks.describe(), **algorithm)
    return read_or_train(directory / f"{family}-maml-{iterations}", settings, tasks,
                         before_training=lambda: print(f"meta-training the {family} bundle"
                                                       f"{source} ({iterations} iterations)",
                                                       flush=True))


def make_stream(family: str, n: int, hazard: float, noise: float | None,
                seed: int) -> SwitchingStream:
    if family in RIVER_FAMILIES:
        return river_stream(family, n=n, hazard=hazard, seed=seed)
    base = family.removesuffix("-recurring")
    if family.endswith("-recurring"):
        return recurring_stream(base, n=n, concepts=3, segment=int(round(1 / hazard)),
                                noise=noise, seed=seed)
    return switching_stream(family, n=n, hazard=hazard, noise=noise, seed=seed)


#: Runs a long benchmark can leave out (``--without``): neither is in a target of the
#: portfolio's, and together they are about half of a sinusoid seed's time.
OPTIONAL_RUNS = ("periodic", "interleaved")


def run_family(family: str, bundle: Path, seeds: list[int], n: int, hazard: float,
               noise: float | None, steps: int, support: int, holdout: int,
               without: frozenset[str] = frozenset()) -> dict[str, Any]:
    net = TorchNet(bundle)
    per_seed = []
    for seed in seeds:
        stream = make_stream(family, n, hazard, noise, seed)
        with tempfile.TemporaryDirectory() as tmp:
            runs = [run_edgemeta(stream, bundle, Path(tmp), steps=steps, support_size=support,
                                 holdout_size=holdout)]
        runs.append(run_oracle(stream, net, support, steps))
        runs.append(run_meta_init(stream, net))
        with tempfile.TemporaryDirectory() as tmp:
            mixed = run_edgemeta(stream, bundle, Path(tmp), steps=steps, support_size=support,
                                 holdout_size=holdout, sections={"portfolio": {"enabled": True}})
        runs.append(dataclasses.replace(mixed, name=PORTFOLIO))
        runs += [run_expert(name, stream) for name in DEFAULT_EXPERTS]
        if "periodic" not in without:
            runs.append(run_periodic(stream, net, period=100, window=50, steps=steps))
        for name, make in river_learners(stream.kind, seed).items():
            runs.append(run_river(name, make, stream))
        edge = runs[0]
        det = detection_figures(stream.switches, edge.info["detections"], n)
        record = {"seed": seed, "stream": stream, "runs": runs, "detection": det}
        if family in ("sinusoid", "hyperplane") and "interleaved" not in without:
            # Two streams of the family interleaved in one daemon, each with its own lineage.
            record["interleaved"] = interleaved(
                stream, make_stream(family, n, hazard, noise, seed + 1000), bundle, edge,
                steps=steps, support_size=support, holdout_size=holdout)
        per_seed.append(record)
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


def run_stream_bench(out: Path, families: list[str], seeds: int = 3, n: int = 20_000,
                     hazard: float = 1 / 300, noise: float | None = None, steps: int = 30,
                     support: int = 10, holdout: int = 20, iterations: int | None = None,
                     bundles: Path | None = None,
                     without: frozenset[str] = frozenset()) -> list[dict[str, Any]]:
    out.mkdir(parents=True, exist_ok=True)
    bundles = bundles or out / "bundles"
    results = []
    for family in families:
        base = family.removesuffix("-recurring")
        if family in RIVER_FAMILIES:
            bundle = ensure_river_bundle(family, bundles, iterations or 3000)
        else:
            its = iterations or {"sinusoid": 6000, "hyperplane": 3000}[base]
            bundle = ensure_bundle(base, bundles, its)
        result = run_family(family, bundle, list(range(seeds)), n, hazard, noise, steps, support,
                            holdout, without)
        result["bundle"] = str(bundle)
        plot_family(result, out / f"stream-{family}.png")
        results.append(result)
        # After every family: a run of hours that is stopped keeps the families it finished.
        clean = [{k: v for k, v in r.items() if not k.startswith("_")} for r in results]
        (out / "stream.json").write_text(json.dumps(clean, indent=2))
    print(format_results(results))
    return results
