"""``edgemeta demo``: the whole loop on a switching sinusoid stream, with nothing to set up.

It meta-trains (or reuses) a sinusoid bundle, starts the real daemon (``edgemeta run`` as a child
process: watchdog inboxes, the adapter worker, the metrics endpoint on loopback) on a fresh state
directory, and replays a stream whose task switches every ``rows_per_task`` rows into the inbox as
files, with the labels of each file arriving ``label_delay`` files later, the way ground truth
arrives late on a device. It reads back only what a user could: the outbox, the episode records
and the metrics endpoint. At the end it prints a summary, writes ``demo-summary.json`` and a plot
``demo.png`` into the state directory, and stops the daemon unless ``keep_running``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgemeta.testing.harness import free_port

# (amplitude, phase) of the tasks the stream switches between; far enough apart to be seen.
TASKS = ((1.0, 0.0), (4.5, 2.5), (2.0, 1.2), (4.0, 0.3), (0.8, 2.8), (3.0, 1.8))


@dataclass
class DemoRun:
    """What the demo saw, file by file: enough to rebuild the table and the plot."""

    state_dir: Path
    metrics_url: str
    files: list[dict[str, Any]] = field(default_factory=list)
    drifts: list[int] = field(default_factory=list)  # sample index when the counter rose
    episodes: list[dict[str, Any]] = field(default_factory=list)
    switches: list[int] = field(default_factory=list)
    rollbacks: list[dict[str, Any]] = field(default_factory=list)  # versions a rollback made


def demo_bundle(workdir: Path, iterations: int) -> Path:
    """The cached demo bundle, meta-trained with a progress bar the first time."""
    from edgemeta.meta.tasks import SinusoidTasks
    from edgemeta.meta.train import ProgressBar, TrainSettings
    from edgemeta.testing.harness import read_or_train

    path = workdir / f"sinusoid-maml-{iterations}"
    settings = TrainSettings(algorithm="maml", iterations=iterations,
                             val_every=max(1, iterations // 10), seed=0, device="cpu")
    bar: list[ProgressBar] = []

    def announce() -> None:
        print(f"meta-training a sinusoid MAML bundle ({iterations} iterations) into {path}")
        bar.append(ProgressBar(iterations))

    result = read_or_train(path, settings, SinusoidTasks(shots=5, queries=10),
                           progress=lambda *args: bar[0](*args), before_training=announce)
    if bar:
        bar[0].close()
    else:
        print(f"reusing the cached bundle {path}")
    return result


def write_config(state_dir: Path, bundle: Path, port: int) -> Path:
    path = state_dir.parent / f"{state_dir.name}.toml"
    path.write_text(f"""# written by `edgemeta demo`
[bundle]
path = "{bundle.resolve()}"
[state]
dir = "{state_dir}"
[adaptation]
support_size = 10
holdout_size = 20
steps = 5
[metrics]
address = "127.0.0.1"
port = {port}
[ingest]
settle_s = 0.05
rescan_interval_s = 1.0
[[streams]]
name = "sine"
id = "id"
features = ["x"]
label = "y"
""")
    return path


def scrape(url: str) -> dict[str, float]:
    """Sum of each metric's samples by name (the demo only needs totals)."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=5) as resp:
        text = resp.read().decode()
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
    return totals


def _write_atomic(path: Path, text: str) -> None:
    """How producers should write: a temporary name, then a rename."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.rename(tmp, path)


def _wait(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the daemon exited (status {proc.returncode}) while waiting for "
                               f"{what}")
        time.sleep(0.02)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


def replay(run: DemoRun, proc: subprocess.Popen, tasks, rows_per_task: int, rows_per_file: int,
           label_delay: int, seed: int) -> None:
    """Write the stream into the inbox file by file; labels follow ``label_delay`` files later."""
    inbox = run.state_dir / "inbox" / "sine"
    outbox = run.state_dir / "outbox" / "sine"
    rng = np.random.default_rng(seed)
    pending_labels: list[tuple[str, list[str], np.ndarray]] = []
    seen_episodes: set[str] = set()
    drifts_seen = 0.0
    sample = 0
    for t, (amp, phase) in enumerate(tasks):
        if t:
            run.switches.append(sample)
            print(f"-- sample {sample}: the task switches to A={amp} phase={phase}")
        for _ in range(rows_per_task // rows_per_file):
            name = f"d{len(run.files):04d}"
            x = rng.uniform(-5, 5, rows_per_file)
            y = amp * np.sin(x - phase) + rng.normal(0, 0.05, rows_per_file)
            ids = [f"{name}-{i}" for i in range(rows_per_file)]
            _write_atomic(inbox / f"{name}.csv", "id,x\n" + "".join(
                f"{i},{v:.6f}\n" for i, v in zip(ids, x, strict=True)))
            out = outbox / f"{name}.csv.predictions.jsonl"
            _wait(out.exists, 30, f"predictions for {name}", proc)
            records = [json.loads(line) for line in out.read_text().splitlines()]
            pred = np.array([r["prediction"] for r in records])
            run.files.append({"name": name, "start": sample, "rows": rows_per_file, "task": t,
                              "version": records[0]["version"],
                              "mse": float(np.mean((pred - y) ** 2))})
            sample += rows_per_file
            pending_labels.append((name, ids, y))
            if len(pending_labels) > label_delay:
                _send_labels(inbox, *pending_labels.pop(0))
            drifts_seen = _report(run, seen_episodes, drifts_seen, sample)
    while pending_labels:
        _send_labels(inbox, *pending_labels.pop(0))
    _wait(lambda: not any(p for p in inbox.iterdir() if not p.name.startswith(".")), 30,
          "the last labels to be read", proc)
    _wait(lambda: json.loads((run.state_dir / "status.json").read_text())["streams"]["sine"]
          ["phase"] not in ("adapting", "gating"), 30, "the last adaptation", proc)
    time.sleep(0.6)  # one more status/episode write
    _report(run, seen_episodes, drifts_seen, sample)


def _send_labels(inbox: Path, name: str, ids: list[str], y: np.ndarray) -> None:
    _write_atomic(inbox / f"{name}.labels.csv", "id,label\n" + "".join(
        f"{i},{v:.6f}\n" for i, v in zip(ids, y, strict=True)))


def _report(run: DemoRun, seen: set[str], drifts_seen: float, sample: int) -> float:
    """Print what happened since the last look: new drift detections and episodes."""
    drifts = scrape(run.metrics_url).get("edgemeta_drift_detections_total", 0.0)
    if drifts > drifts_seen:
        run.drifts.append(sample)
        print(f"   by sample {sample}: drift detected (labels arrive late, so this is a little "
              f"after the switch)")
    for path in sorted((run.state_dir / "episodes").glob("*.json")):
        if path.name in seen:
            continue
        seen.add(path.name)
        episode = json.loads(path.read_text())
        episode["sample"] = sample
        run.episodes.append(episode)
        ms = episode["timings_ms"]
        stages = ", ".join(f"{k} {v:.1f}" for k, v in ms.items() if k != "total")
        verdict = f"{episode['result']} ({episode['reason']})"
        if episode["result"] == "rejected" and episode["reason"] == "not_better":
            # A lower holdout MSE can still be "not better": say what the gate decided.
            p = episode.get("p_value")
            verdict = "rejected: not significantly better" + (
                f" (p = {p:.2g}, alpha {episode.get('alpha', float('nan')):.2g})"
                if p is not None else "")
        if episode["result"] == "accepted":
            # The swap happened between files: name the first sample the new version answered,
            # the same figure the summary table shows, not the sample at which we looked.
            first = next((f["start"] for f in run.files if f["version"] == episode["version"]),
                         None)
            verdict = f"accepted -> v{episode['version']}" + (
                f" serving from sample {first}" if first is not None else " serving next")
        print(f"   by sample {sample}: adaptation ({episode['trigger']}) {verdict}; holdout MSE "
              f"{episode.get('holdout_current', float('nan')):.3f} -> "
              f"{episode.get('holdout_candidate', float('nan')):.3f}"
              + (f"; ms: {stages}" if stages else "")
              + (f"; total {ms['total']:.1f} ms" if "total" in ms else ""))
    _report_rollbacks(run, sample)
    return max(drifts, drifts_seen)


def _report_rollbacks(run: DemoRun, sample: int) -> None:
    """A rollback (the daemon's own after a bad probation, or an operator's) makes a new version
    without an episode: the registry is where the feed learns of it."""
    from edgemeta.serve.registry import Registry

    known = {r["version"] for r in run.rollbacks}
    for m in Registry(run.state_dir, writable=False).manifests():
        if m.source != "rollback" or m.version in known:
            continue
        entry = {"version": m.version, "trigger": "rollback", "parent": m.parent,
                 "note": m.note or "", "sample": sample}
        run.rollbacks.append(entry)
        print(f"   by sample {sample}: rollback -> v{m.version} (serves v{m.parent}'s weights "
              f"again)" + (f": {m.note}" if m.note else ""))


def summarize(run: DemoRun) -> dict[str, Any]:
    """Stream error before and after each swap, drift-to-serving latency, versions served.

    "Before" is the four files before the new version's first file; "after" the files it served
    on the same task as its first file (rows after the next task switch say nothing about how well
    it adapted), with the sample range they cover.
    """
    files = run.files
    rows = []
    made = [e for e in run.episodes if e["result"] == "accepted"] + run.rollbacks
    for e in sorted(made, key=lambda e: e["version"]):
        first = next((i for i, f in enumerate(files) if f["version"] == e["version"]), None)
        if first is None:  # made after the last file: in the feed, so in the table too
            rows.append({"version": e["version"], "trigger": e["trigger"],
                         "drift_to_serving_ms": (e["timings_ms"].get("total")
                                                 if e["trigger"] == "drift" else None),
                         "samples_after_switch": None, "mse_before": None, "mse_after": None,
                         "after_samples": None})
            continue
        task = files[first]["task"]
        before = [f["mse"] for f in files[max(0, first - 4):first]]
        after = [f for f in files[first:] if f["version"] == e["version"] and f["task"] == task]
        task_start = run.switches[task - 1] if task else 0
        rows.append({"version": e["version"], "trigger": e["trigger"],
                     # Only a drift's episode measures detection-to-serving; the others
                     # (initial, refine, manual...) have no drift to measure from.
                     "drift_to_serving_ms": (e["timings_ms"].get("total")
                                             if e["trigger"] == "drift" else None),
                     "samples_after_switch": files[first]["start"] - task_start,
                     "mse_before": float(np.mean(before)) if before else None,
                     "mse_after": float(np.mean([f["mse"] for f in after])) if after else None,
                     "after_samples": ([after[0]["start"], after[-1]["start"] + after[-1]["rows"]]
                                       if after else None)})
    return {"state_dir": str(run.state_dir), "metrics": run.metrics_url,
            "samples": sum(f["rows"] for f in files), "switches": run.switches,
            "drifts_detected": len(run.drifts), "drift_detections_at": list(run.drifts),
            "adaptations": {r: sum(e["result"] == r for e in run.episodes)
                            for r in ("accepted", "rejected", "failed", "timeout")},
            "versions_served": sorted({f["version"] for f in files}),
            "swaps": rows, "stream_mse": float(np.mean([f["mse"] for f in files]))}


def format_summary(summary: dict[str, Any]) -> str:
    lines = [f"{'version':>7} {'trigger':>8} {'drift->serving':>15} {'samples after switch':>21} "
             f"{'MSE before':>11} {'MSE after':>10} {'after: samples':>15}"]
    for r in summary["swaps"]:
        ms = f"{r['drift_to_serving_ms']:.1f} ms" if r["drift_to_serving_ms"] is not None else "-"
        before = f"{r['mse_before']:.3f}" if r["mse_before"] is not None else "-"
        after = f"{r['mse_after']:.3f}" if r["mse_after"] is not None else "-"
        span = "{}-{}".format(*r["after_samples"]) if r["after_samples"] else "-"
        after_switch = (r["samples_after_switch"] if r["samples_after_switch"] is not None
                        else "not served")
        lines.append(f"{r['version']:>7} {r['trigger']:>8} {ms:>15} "
                     f"{after_switch:>21} {before:>11} {after:>10} {span:>15}")
    lines.append("MSE before: the 4 files before the swap; MSE after: the files the version served "
                 "on the same task (samples shown); drift->serving for drift episodes only; "
                 "not served: made after the stream's last file")
    a = summary["adaptations"]
    lines.append(f"drifts detected: {summary['drifts_detected']} for {len(summary['switches'])} "
                 f"task switches; adaptations: {a['accepted']} accepted, {a['rejected']} rejected, "
                 f"{a['failed'] + a['timeout']} failed; versions served: "
                 f"{', '.join(f'v{v}' for v in summary['versions_served'])}")
    return "\n".join(lines)


def plot(run: DemoRun, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    starts = [f["start"] for f in run.files]
    fig, (ax, bx) = plt.subplots(2, 1, figsize=(11, 6), sharex=True,
                                 gridspec_kw={"height_ratios": [3, 1]})
    ax.semilogy(starts, [max(f["mse"], 1e-4) for f in run.files], "-o", ms=3,
                label="stream MSE per file")
    for i, s in enumerate(run.switches):
        ax.axvline(s, color="grey", ls="--", lw=1, label="task switch" if i == 0 else None)
    # Each swap coloured by why its version exists (the registry's source: drift, refine,
    # continual, recall, rollback...), so the kinds of change can be told apart.
    from edgemeta.serve.registry import Registry

    sources = {m.version: m.source for m in Registry(run.state_dir, writable=False).manifests()}
    colours = {"drift": "tab:green", "retry": "tab:olive", "refine": "tab:cyan",
               "continual": "tab:blue", "recall": "tab:purple", "rollback": "tab:orange",
               "manual": "tab:brown", "initial": "tab:pink"}
    labelled: set[str] = set()
    for a, f in zip(run.files, run.files[1:], strict=False):
        if f["version"] == a["version"]:
            continue
        source = sources.get(f["version"], "other")
        ax.axvline(f["start"], color=colours.get(source, "black"), lw=1.5,
                   label=f"new version: {source}" if source not in labelled else None)
        labelled.add(source)
    for i, d in enumerate(run.drifts):
        ax.axvline(d, color="tab:red", ls=":", lw=1, label="drift detected" if i == 0 else None)
    ax.set_ylabel("MSE (log)")
    ax.set_title("edgemeta demo: switching sinusoid stream, delayed labels")
    ax.legend(fontsize=8, loc="upper right")
    bx.step(starts, [f["version"] for f in run.files], where="post", label="served version")
    # Detections get their own markers below the version line: drawn as lines on the MSE panel
    # they fell on the swap lines (detection and swap are a file apart) and vanished.
    low = min(f["version"] for f in run.files) - 0.6
    bx.plot(run.drifts, [low] * len(run.drifts), "v", color="tab:red", ms=8, ls="none",
            label="drift detected")
    bx.set_ylim(low - 0.5, max(f["version"] for f in run.files) + 0.5)
    bx.legend(fontsize=8, loc="upper left")
    bx.set_ylabel("served version")
    bx.set_xlabel("sample")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_demo(workdir: Path | None = None, iterations: int = 3000, rows_per_task: int = 400,
             rows_per_file: int = 25, label_delay: int = 2, tasks=TASKS,
             keep_running: bool = False, state_dir: Path | None = None, seed: int = 0) -> int:
    try:
        import matplotlib  # noqa: F401 - checked before minutes of work, not after
    except ImportError:
        print("edgemeta demo: error: the plot needs matplotlib: "
              "pip install -c constraints.txt -e '.[cpu,demo]'", file=sys.stderr)
        return 2
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "edgemeta" / "demo"
    workdir = workdir or cache
    bundle = demo_bundle(workdir, iterations)
    state_dir = state_dir or Path(tempfile.mkdtemp(prefix="edgemeta-demo-")) / "state"
    state_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config = write_config(state_dir, bundle, port)
    log = (state_dir / "daemon.log").open("ab")
    print(f"starting the daemon: edgemeta run --config {config}")
    proc = subprocess.Popen([sys.executable, "-P", "-m", "edgemeta", "run", "--config", str(config)],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    run = DemoRun(state_dir, f"http://127.0.0.1:{port}/metrics")
    stop = True
    try:
        _wait(lambda: (state_dir / "status.json").exists()
              and json.loads((state_dir / "status.json").read_text())["worker"]["ready"], 180,
              "the daemon and its adapter worker to start", proc)
        print(f"daemon ready (pid {proc.pid}); metrics on {run.metrics_url}")
        replay(run, proc, tasks, rows_per_task, rows_per_file, label_delay, seed)
        summary = summarize(run)
        (state_dir / "demo-summary.json").write_text(json.dumps(summary, indent=2))
        plot(run, state_dir / "demo.png")
        print()
        print(format_summary(summary))
        print(f"\nstate directory: {state_dir}\nplot:            {state_dir / 'demo.png'}\n"
              f"summary:         {state_dir / 'demo-summary.json'}\n"
              f"daemon log:      {state_dir / 'daemon.log'}")
        if keep_running:
            stop = False
            print(f"\nthe daemon keeps running (pid {proc.pid}); try:\n"
                  f"  curl -s {run.metrics_url} | grep ^edgemeta_\n"
                  f"  edgemeta status --config {config}\n"
                  f"  edgemeta trigger rollback --config {config}\n"
                  f"  edgemeta models list --config {config}\n"
                  f"stop it with: kill {proc.pid}")
        return 0
    except (RuntimeError, TimeoutError) as exc:
        print(f"edgemeta demo: error: {exc}; the daemon's log is {state_dir / 'daemon.log'}",
              file=sys.stderr)
        return 1
    finally:
        if stop and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()
