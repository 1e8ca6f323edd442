"""``edgemeta demo``: the offline half end to end (meta-train, bundle, few-shot evaluation).

The daemon half (drift, hot swap) joins the demo when it lands; until then the demo shows what a
bundle buys on unseen sinusoid tasks against the baselines. The bundle is cached so a second run
starts at the evaluation.
"""

from __future__ import annotations

import os
from pathlib import Path


def run_demo(workdir: Path | None = None, iterations: int = 3000) -> int:
    from edgemeta.meta.bundle import BundleError, read_bundle
    from edgemeta.meta.evaluate import evaluate, format_table
    from edgemeta.meta.tasks import SinusoidTasks
    from edgemeta.meta.train import ProgressBar, TrainSettings, save_bundle, train

    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "edgemeta" / "demo"
    workdir = workdir or cache
    path = workdir / f"sinusoid-maml-{iterations}"
    try:
        bundle = read_bundle(path)
        print(f"reusing the cached bundle {path}")
    except BundleError:
        print(f"meta-training a sinusoid MAML bundle ({iterations} iterations) into {path}")
        settings = TrainSettings(algorithm="maml", iterations=iterations, val_every=250)
        bar = ProgressBar(iterations)
        result = train(settings, SinusoidTasks(shots=5, queries=10), progress=bar)
        bar.close()
        bundle = read_bundle(save_bundle(result, path))
    results = evaluate(bundle, shots=5, steps=(0, 1, 5, 10), n_tasks=200, pretrain_iterations=1000,
                       target=0.5)
    print(format_table(results))
    print(f"bundle: {bundle.path}  (try: edgemeta eval {bundle.path} --json)")
    return 0
