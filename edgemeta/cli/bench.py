"""``edgemeta bench ...``: each benchmark's options and the call into ``edgemeta/bench``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from edgemeta.cli.common import (
    BENCH_OUT,
    CliError,
    _out,
    _positive_int,
)


def _fewshot(args: argparse.Namespace) -> None:
    from edgemeta.bench.fewshot import run_fewshot

    run_fewshot(Path(args.out), quick=args.quick, seed=args.seed)


def _swap(args: argparse.Namespace) -> None:
    from edgemeta.bench.swap import run_swap

    run_swap(Path(args.out), quick=args.quick)


def _serve(args: argparse.Namespace) -> None:
    from edgemeta.bench.swap import run_serve

    run_serve(Path(args.out), quick=args.quick)


def _chaos(args: argparse.Namespace) -> None:
    from edgemeta.bench.chaos import run_chaos

    if args.quick:
        run_chaos(Path(args.out), malformed_files=150, kills=6, poison_tries=5, seed=args.seed)
    else:
        run_chaos(Path(args.out), malformed_files=args.files, kills=args.kills,
                  poison_tries=args.poison, seed=args.seed)


def _soak(args: argparse.Namespace) -> None:
    from edgemeta.bench.soak import run_soak

    if args.quick:
        run_soak(Path(args.out), minutes=1.0, rate=200, warmup_min=0.25, switch_s=20)
    else:
        run_soak(Path(args.out), minutes=args.minutes, rate=args.rate,
                 warmup_min=args.warmup)


def _fleet(args: argparse.Namespace) -> None:
    from edgemeta.bench.fleet import format_fleet, run_fleet_bench

    sizes = dict(seeds=args.seeds, devices=args.devices, rows=args.rows,
                 base_iterations=args.base_iterations,
                 retrain_iterations=args.retrain_iterations, eval_tasks=args.eval_tasks,
                 stream_rows=args.stream_rows)
    if args.quick:
        sizes = dict(seeds=1, devices=3, rows=600, base_iterations=400,
                     retrain_iterations=200, eval_tasks=50, stream_rows=600,
                     throughput_iterations=100, eval_seeds=2)
    results = run_fleet_bench(Path(args.out), replay=args.replay,
                              log=lambda m: print(m, file=sys.stderr), **sizes)
    print(format_fleet(results), end="")


def _devices(args: argparse.Namespace) -> None:
    from edgemeta.bench.devices import run_devices_bench

    devices = [d.strip() for d in args.devices.split(",")] if args.devices else None
    for device in devices or []:
        if device != "cpu" and not device.startswith("cuda"):
            raise CliError(f"--devices: use cpu or cuda[:N], got {device!r}")
        if device.startswith("cuda"):
            from edgemeta.bench.devices import cuda_available

            if not cuda_available():
                raise CliError(f"--devices: {device} asked for but CUDA is not available here")
    run_devices_bench(Path(args.out), Path(args.bundle) if args.bundle else None,
                      quick=args.quick, devices=devices)


def _stream(args: argparse.Namespace) -> None:
    from edgemeta.bench.stream import ALL_FAMILIES, OPTIONAL_RUNS, run_stream_bench

    families = [f.strip() for f in args.families.split(",") if f.strip()]
    unknown = sorted(set(families) - set(ALL_FAMILIES))
    if unknown or not families:
        raise CliError(f"--families: unknown {', '.join(unknown) or '(none)'}; "
                       f"use {','.join(ALL_FAMILIES)}")
    if not 0 < args.hazard < 1:
        raise CliError(f"--hazard: must be in (0, 1), got {args.hazard}")
    for name in ("seeds", "samples", "steps", "support", "holdout"):
        if getattr(args, name) < 1:
            raise CliError(f"--{name}: must be >= 1, got {getattr(args, name)}")
    without = frozenset(w.strip() for w in args.without.split(",") if w.strip())
    if without - set(OPTIONAL_RUNS):
        raise CliError(f"--without: unknown {', '.join(sorted(without - set(OPTIONAL_RUNS)))}; "
                       f"use {','.join(OPTIONAL_RUNS)}")
    quick = {"n": 3000, "seeds": 1, "iterations": 500} if args.quick else {}
    run_stream_bench(Path(args.out), families, seeds=quick.get("seeds", args.seeds),
                     n=quick.get("n", args.samples), hazard=args.hazard, noise=args.noise,
                     steps=args.steps, support=args.support, holdout=args.holdout,
                     iterations=quick.get("iterations"), without=without)


def _with_bundle(args: argparse.Namespace) -> None:
    """drift and daemon: they run a bundle `bench fewshot` (or `train`) wrote."""
    bundle = Path(args.bundle)
    if not (bundle / "bundle.json").is_file():
        raise CliError(f"--bundle {bundle}: not a bundle; run `edgemeta bench fewshot` or "
                       "`edgemeta train` first")
    if args.bench == "drift":
        from edgemeta.bench.drift import run_drift

        run_drift(Path(args.out), bundle, seeds=3 if args.quick else 20)
    else:
        from edgemeta.bench.daemon import run_daemon_bench

        run_daemon_bench(Path(args.out), bundle, quick=args.quick)


#: Each bench's runner: its options checked, then the call into ``edgemeta/bench``.
_RUNNERS = {"fewshot": _fewshot, "swap": _swap, "serve": _serve, "chaos": _chaos, "soak": _soak,
            "fleet": _fleet, "devices": _devices, "stream": _stream, "drift": _with_bundle,
            "daemon": _with_bundle}


def cmd_bench(args: argparse.Namespace) -> int:
    _RUNNERS[args.bench](args)
    return 0


def _register_bench(sub) -> None:
    b = sub.add_parser("bench", help="reproducible benchmarks")
    bsub = b.add_subparsers(dest="bench", required=True)
    for register_one in (_register_small, _register_chaos, _register_soak, _register_fleet,
                         _register_devices, _register_stream):
        register_one(bsub)


def _register_small(bsub) -> None:
    """The benches with a size switch and at most a bundle."""
    f = bsub.add_parser("fewshot", help="sinusoid and digits few-shot benchmark")
    _out(f, "fewshot")
    f.add_argument("--quick", action="store_true", help="tiny budget, for smoke tests")
    f.add_argument("--seed", type=int, default=0)
    f.set_defaults(func=cmd_bench)
    for name, text in (("swap", "weight-patch hot swap: latency, under load, memory"),
                       ("serve", "serving cost: onnxruntime vs torch eager")):
        p = bsub.add_parser(name, help=text)
        _out(p, name)
        p.add_argument("--quick", action="store_true", help="tiny sizes, for smoke tests")
        p.set_defaults(func=cmd_bench)
    for name, text in (("drift", "false alarms and detection delay of the default detectors"),
                       ("daemon", "drift-to-serving latency, ingest throughput, RSS")):
        p = bsub.add_parser(name, help=text)
        _out(p, name)
        p.add_argument("--bundle", default=str(BENCH_OUT / "fewshot" / "sinusoid-maml"),
                       help="the bundle to run (default: the one `bench fewshot` wrote)")
        p.add_argument("--quick", action="store_true", help="tiny sizes, for smoke tests")
        p.set_defaults(func=cmd_bench)


def _register_chaos(bsub) -> None:
    c = bsub.add_parser("chaos", help="the real daemon against hostile inputs, kills, a full disk")
    _out(c, "chaos")
    c.add_argument("--files", type=int, default=1100,
                   help="malformed inputs to send (default: %(default)s)")
    c.add_argument("--kills", type=int, default=60,
                   help="kill -9 of the daemon or its worker (default: %(default)s)")
    c.add_argument("--poison", type=int, default=25,
                   help="poisoned-label adaptation tries (default: %(default)s)")
    c.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    c.add_argument("--quick", action="store_true", help="150 files, 6 kills, 5 poison tries")
    c.set_defaults(func=cmd_bench)


def _register_soak(bsub) -> None:
    k = bsub.add_parser("soak", help="the real daemon under a steady stream: RSS, fds, threads")
    _out(k, "soak")
    k.add_argument("--minutes", type=float, default=30.0, help="duration (default: %(default)s)")
    k.add_argument("--rate", type=int, default=1000, help="rows per second (default: %(default)s)")
    k.add_argument("--warmup", type=float, default=5.0,
                   help="minutes left out of the slope (default: %(default)s)")
    k.add_argument("--quick", action="store_true", help="1 minute at 200 rows/s, a smoke test")
    k.set_defaults(func=cmd_bench)


def _register_fleet(bsub) -> None:
    fl = bsub.add_parser("fleet", help="harvest a simulated fleet's episodes, re-meta-train with "
                         "--init, compare old and new bundle; 1 vs 2 torchrun processes")
    _out(fl, "fleet")
    fl.add_argument("--seeds", type=_positive_int, default=3,
                    help="fleet seeds (devices' streams, re-training) (default: %(default)s)")
    fl.add_argument("--devices", type=_positive_int, default=8,
                    help="simulated devices (default: %(default)s)")
    fl.add_argument("--rows", type=_positive_int, default=2400,
                    help="labelled rows each device meets (default: %(default)s)")
    fl.add_argument("--base-iterations", type=_positive_int, default=6000,
                    help="meta-training iterations of the base bundle (default: %(default)s)")
    fl.add_argument("--retrain-iterations", type=_positive_int, default=3000,
                    help="re-meta-training iterations from the base (default: %(default)s)")
    fl.add_argument("--replay", type=float, default=0.5,
                    help="share of each meta-batch replaying the base's family (default: %(default)s)")
    fl.add_argument("--eval-tasks", type=_positive_int, default=600,
                    help="held-out tasks per evaluation seed, 5 seeds (default: %(default)s)")
    fl.add_argument("--stream-rows", type=_positive_int, default=6000,
                    help="rows of the fresh shifted switching stream (default: %(default)s)")
    fl.add_argument("--quick", action="store_true",
                    help="1 seed, 3 devices x 600 rows, 400 + 200 iterations: a smoke test "
                    "(overrides the sizes above)")
    fl.set_defaults(func=cmd_bench)


def _register_devices(bsub) -> None:
    v = bsub.add_parser("devices", help="CPU vs CUDA: meta-training, adaptation, drift-to-serving")
    _out(v, "devices")
    v.add_argument("--bundle", default=None,
                   help="bundle for the adaptation figures (default: train a small one, 30 s)")
    v.add_argument("--devices", default=None,
                   help="comma-separated, e.g. cpu,cuda (default: cpu, and cuda when available)")
    v.add_argument("--quick", action="store_true", help="seconds instead of minutes, a smoke test")
    v.set_defaults(func=cmd_bench)


def _register_stream(bsub) -> None:
    s = bsub.add_parser("stream", help="continual adaptation vs an oracle, river and baselines")
    _out(s, "stream")
    s.add_argument("--families", default="sinusoid,hyperplane",
                   help="comma-separated; also sinusoid-recurring, hyperplane-recurring and "
                   "river's generators: river-hyperplane, river-rbf, river-sea, river-friedman")
    s.add_argument("--seeds", type=int, default=3,
                   help="streams per family, seeds 0..N-1 (default: %(default)s)")
    s.add_argument("--samples", type=int, default=20_000,
                   help="rows per stream (default: %(default)s)")
    s.add_argument("--hazard", type=float, default=1 / 300, help="switch probability per sample")
    s.add_argument("--noise", type=float, default=None,
                   help="label noise: std (sinusoid, default 0.1) or flip rate (hyperplane, 0.05); "
                   "river families keep their generator's noise")
    s.add_argument("--steps", type=int, default=30, help="inner steps per adaptation")
    s.add_argument("--support", type=int, default=10)
    s.add_argument("--holdout", type=int, default=20)
    s.add_argument("--without", default="",
                   help="comma-separated runs to leave out, for long runs: periodic (the "
                   "fine-tune-every-100-rows baseline), interleaved (two streams in one daemon)")
    s.add_argument("--quick", action="store_true", help="tiny sizes, for smoke tests")
    s.set_defaults(func=cmd_bench)


def register(sub) -> None:
    """Add this group's commands to the ``edgemeta`` parser's subcommands."""
    _register_bench(sub)
