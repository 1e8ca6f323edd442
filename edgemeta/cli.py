"""The ``edgemeta`` command: parse, validate, call into the rooms; no logic of its own.

Heavy imports (torch) happen inside the sub-commands so ``edgemeta --help`` stays instant and the
serving commands never load torch.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
import warnings
from pathlib import Path

from edgemeta import __version__


class CliError(Exception):
    """A user error: printed as one line, exit status 2."""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from exc
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def _positive_int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from exc
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"expected non-negative integers, got {text!r}")
    return values


def task_spec(args: argparse.Namespace) -> dict:
    if args.tasks in ("sinusoid", "hyperplane"):
        return {"name": args.tasks, "shots": args.shots, "queries": args.queries}
    if args.data is None:
        raise CliError(f"--tasks {args.tasks} needs --data PATH")
    common = {"path": str(Path(args.data).resolve()), "shots": args.shots, "queries": args.queries,
              "split_seed": args.split_seed, "label_column": args.label_column}
    if args.val_fraction is not None or args.test_fraction is not None:
        val = args.val_fraction if args.val_fraction is not None else 0.2
        test = args.test_fraction if args.test_fraction is not None else 0.2
        common["fractions"] = [1 - val - test, val, test]
    if args.tasks == "array":
        return {"name": "array", "n_way": args.ways, **common}
    return {"name": "folder", "kind": args.kind, **common}


def _require_runtime() -> None:
    """Fail before minutes of training when the bundle's ONNX check could not run at the end."""
    import onnxruntime  # noqa: F401 - main() turns its absence into the install advice


def cmd_train(args: argparse.Namespace) -> int:
    _require_runtime()
    from edgemeta.meta.bundle import BundleError, read_bundle
    from edgemeta.meta.models import ModelSpecError
    from edgemeta.meta.tasks import TaskDataError, build_tasks
    from edgemeta.meta.train import ProgressBar, SettingsError, TrainSettings, save_bundle, train

    model: dict = {"arch": "mlp", "hidden": args.hidden}
    if args.model_factory:
        try:
            kwargs = json.loads(args.model_kwargs)
        except json.JSONDecodeError as exc:
            raise CliError(f"--model-kwargs: not valid JSON: {exc}") from exc
        model = {"factory": args.model_factory, "kwargs": kwargs}
    settings = TrainSettings(
        algorithm=args.algorithm, tasks=task_spec(args), model=model,
        inner_steps=args.inner_steps, inner_lr=args.inner_lr, outer_lr=args.outer_lr,
        meta_batch=args.meta_batch, iterations=args.iterations, time_budget=args.time_budget,
        val_every=args.val_every, val_tasks=args.val_tasks, seed=args.seed, device=args.device,
        max_forgetting=args.max_forgetting)
    from edgemeta.meta import distributed

    parent = init = lineage = None
    try:
        if args.init:
            from edgemeta.meta import warmstart

            if not 0 <= args.replay < 1:
                raise CliError(f"--replay: must be in [0, 1), got {args.replay}")
            parent = read_bundle(args.init)
            _inherit(settings, parent.meta)
            print(f"continuing from {args.init}: {settings.algorithm}, {settings.inner_steps} inner "
                  f"step(s) at {settings.inner_lr}, K={settings.tasks['shots']} as it was trained; "
                  f"{args.replay:.0%} of each meta-batch replays its own tasks", file=sys.stderr)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", UserWarning)
            settings.validate()
        for w in caught:
            print(f"warning: {w.message}", file=sys.stderr)
        if parent is not None:
            tasks = warmstart.warm_start_tasks(parent, settings.tasks, args.replay)
            init = warmstart.initial_params(parent)
            lineage = warmstart.lineage(parent, settings.tasks, args.replay)
        else:
            tasks = build_tasks(settings.tasks)
        ctx = distributed.context(settings.device)
        settings.device = distributed.device_for(ctx, settings.device)
        if ctx.writer:
            for line in split_report(tasks.origin()):
                print(line, file=sys.stderr)
        if ctx.world > 1:
            print(f"rank {ctx.rank} of {ctx.world}: {ctx.share(settings.meta_batch)} of "
                  f"{settings.meta_batch} tasks per meta-batch on {settings.device}", file=sys.stderr)
            # torchrun stops the survivors of a dead rank with SIGTERM: end like Ctrl-C, with
            # the best bundle so far.
            signal.signal(signal.SIGTERM, _interrupt)
        quiet = args.quiet or not ctx.writer
        bar = None if quiet else ProgressBar(settings.iterations, settings.time_budget)
        cpu_before = time.process_time()
        try:
            result = train(settings, tasks, progress=bar, init=init, ctx=ctx)
        finally:
            if ctx.world > 1:
                signal.signal(signal.SIGTERM, signal.SIG_IGN)  # let the bundle be written
                distributed.finish(ctx)
        if bar:
            bar.close()
        if not ctx.writer:
            print(f"rank {ctx.rank}: {result.iterations_done} iterations; rank 0 writes the bundle",
                  file=sys.stderr)
            return 0
        if result.untrained and not args.allow_untrained:
            start = f"the parent bundle {args.init}" if parent else "the untrained initialization"
            raise CliError(
                f"no validation after {result.iterations_done} iterations "
                f"({result.seconds:.1f} s) beat {start} "
                f"(validation loss {result.best_val:.4f}); not writing {args.out}. Train longer "
                "(--time-budget, --iterations), check --inner-lr/--outer-lr, or pass "
                "--allow-untrained to write it anyway")
        if result.chance is not None and not result.chance.learned:
            learned_nothing = (
                f"the bundle learned nothing measurable: {result.chance.describe()}, after "
                f"{result.iterations_done} iterations ({result.seconds:.0f} s). Train longer "
                "(--time-budget, --iterations) or check --inner-lr/--outer-lr")
            if args.require_better_than_chance:
                raise CliError(f"{learned_nothing}; not writing {args.out}")
            print(f"warning: {learned_nothing}", file=sys.stderr)
        if result.interrupted:
            print(f"interrupted at iteration {result.iterations_done}; writing the best bundle so far",
                  file=sys.stderr)
        busy = _budget_starved(result, settings, time.process_time() - cpu_before)
        if busy:
            print(f"warning: {busy}", file=sys.stderr)
        path = save_bundle(result, args.out, lineage=lineage)
    except (SettingsError, TaskDataError, ModelSpecError, BundleError, FloatingPointError) as exc:
        raise CliError(str(exc)) from exc
    print(f"bundle written to {path} (best meta-validation loss {result.best_val:.4f}"
          f"{_loss_units(result)} at iteration {result.best_iteration}, "
          f"{result.iterations_done} iterations in {result.seconds:.1f}s)")
    return 130 if result.interrupted else 0


def _loss_units(result) -> str:
    """The validation loss is on the training targets; when those were standardized, say so and
    give it in the user's units too (what `eval` reports)."""
    from edgemeta.meta.tasks import StandardizedTargets

    tasks = result.tasks
    if not isinstance(tasks, StandardizedTargets):
        return ""
    return (f" on standardized targets, {result.best_val * tasks.std ** 2:.4f} in the targets' "
            f"own units")


def _budget_starved(result, settings, cpu_seconds: float) -> str | None:
    """A time budget that ended the run on a machine busy with other work: the process had less
    than half a CPU over the run (meta-training a small model keeps about one busy), so an idle
    machine would have done many more iterations."""
    if not settings.time_budget or result.iterations_done >= settings.iterations:
        return None
    share = cpu_seconds / max(result.seconds, 1e-9)
    if share >= 0.5:
        return None
    idle = int(result.iterations_done / max(share, 0.05))
    return (f"the time budget ({settings.time_budget:g} s) ended the run after "
            f"{result.iterations_done} iterations while this process had {share:.0%} of a CPU "
            f"(other work on the machine): an idle machine would have done about "
            f"{idle}. Give --iterations instead of a time budget for a result that does not "
            f"depend on the machine's load")


def _interrupt(signum, frame) -> None:
    """SIGTERM under torchrun: stop like Ctrl-C, once; a repeated signal must not interrupt the
    writing of the best bundle so far."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise KeyboardInterrupt


def _inherit(settings, meta: dict) -> None:
    """``--init``: the model, algorithm, inner loop and K are the parent's; the weights would
    mean nothing under other ones, and the devices adapt with the bundle's K."""
    settings.algorithm = meta["algorithm"]
    settings.model = dict(meta["model"])
    settings.inner_steps = int(meta["inner"]["steps"])
    settings.inner_lr = float(meta["inner"]["lr"])
    dist = meta["task"]["distribution"]
    for key in ("shots", "queries"):
        if key in dist:
            settings.tasks[key] = int(dist[key])
    if settings.tasks.get("name") == "folder":
        settings.tasks["kind"] = meta["task"]["kind"]


def split_report(tasks) -> list[str]:
    """What a task folder's split did with its files, and a warning when whole files are held out
    of meta-training from a folder too small for that to be harmless."""
    from edgemeta.meta.tasks import TaskFolderTasks

    if not isinstance(tasks, TaskFolderTasks) or not tasks.split_files:
        return []
    files = tasks.split_files
    val_files = files["val"] if tasks.fractions[1] else []
    held = val_files + files["test"]
    lines = [f"task folder: {len(files['train']) + len(held)} files; meta-train "
             f"{len(files['train'])}; validation: {', '.join(files['val']) or '-'}; "
             f"meta-test: {', '.join(files['test'])}"]
    if len(files["train"]) < 10:
        lines.append(
            f"warning: the split is by file and only {len(files['train'])} file(s) are "
            f"meta-trained on; {', '.join(held)} never reach meta-training. If a file holds a "
            "whole family of tasks rather than one task, split it into one file per task")
    return lines


def cmd_eval(args: argparse.Namespace) -> int:
    from edgemeta.meta.bundle import BundleError, read_bundle
    from edgemeta.meta.evaluate import compare, evaluate, format_comparison, format_table
    from edgemeta.meta.tasks import TaskDataError

    if len(args.bundle) > 1 and not args.tasks_folder:
        raise CliError("several bundles are compared on one task folder: add --tasks-folder DIR")
    outputs = []
    for i, path in enumerate(args.bundle):
        if len(args.bundle) > 1 or sys.stderr.isatty():
            print(f"evaluating {path} ({i + 1} of {len(args.bundle)}): {args.seeds} seed(s) x "
                  f"{args.tasks} tasks", file=sys.stderr, flush=True)
        try:
            bundle = read_bundle(path)
            tasks = _folder_tasks(bundle, args) if args.tasks_folder else None
            results = evaluate(bundle, shots=args.shots, steps=args.steps, n_tasks=args.tasks,
                               seed=args.seed, seeds=args.seeds, baselines=not args.no_baselines,
                               pretrain_iterations=args.pretrain_iterations, target=args.target,
                               tasks=tasks)
        except (BundleError, TaskDataError) as exc:
            raise CliError(str(exc)) from exc
        if args.tasks_folder:
            results["tasks_folder"] = str(args.tasks_folder)
        outputs.append(results)
    names = [str(p) for p in args.bundle]
    comparison = compare(outputs, names) if len(outputs) > 1 else []
    if args.json:
        print(json.dumps(outputs[0] if len(outputs) == 1 else
                         {"bundles": outputs, "comparison": comparison}, indent=2))
    else:
        tables = [format_table(r, name if len(outputs) > 1 else None)
                  for r, name in zip(outputs, names, strict=True)]
        print("\n\n".join(tables + ([format_comparison(comparison)] if comparison else [])))
    return 0


def _folder_tasks(bundle, args: argparse.Namespace):
    """The meta-test files of a task folder, in ``bundle``'s feature scale, so two bundles are
    judged on the same tasks (``--test-fraction 1`` uses every file)."""
    from edgemeta.meta.tasks import build_tasks
    from edgemeta.meta.warmstart import new_tasks_spec

    test = args.test_fraction
    if not 0 < test <= 1:
        raise CliError(f"--test-fraction: must be in (0, 1], got {test}")
    dist = bundle.meta["task"]["distribution"]
    spec = {"name": "folder", "path": str(Path(args.tasks_folder).resolve()),
            "kind": bundle.meta["task"]["kind"], "shots": int(dist.get("shots", 5)),
            "queries": int(dist.get("queries", 10)), "split_seed": args.split_seed,
            "fractions": [1 - 0.2 - test, 0.2, test] if test < 0.8 else [0.0, 0.0, test]}
    return build_tasks(new_tasks_spec(bundle, spec))


def _setup_logging(verbose: bool = False) -> None:
    import logging

    # Under systemd the journal stamps every line itself; in a terminal or a log file, we do.
    stamp = "" if "JOURNAL_STREAM" in os.environ else "%(asctime)s "
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, stream=sys.stderr,
                        format=stamp + "%(levelname)s %(name)s: %(message)s")


def _config(path: str):
    from edgemeta.config import ConfigError, load_config

    try:
        return load_config(path)
    except ConfigError as exc:
        raise CliError(str(exc)) from exc


def _warn_runtime_conflict() -> None:
    from edgemeta.ort_install import conflict

    warning = conflict()
    if warning:
        print(f"warning: {warning}", file=sys.stderr)


def cmd_run(args: argparse.Namespace) -> int:
    from edgemeta.daemon.runtime import Daemon, StartupError
    from edgemeta.serve.providers import ProviderError

    _setup_logging(args.verbose)
    settings = _config(args.config)
    _warn_runtime_conflict()
    daemon = Daemon(settings)
    daemon.install_signal_handlers()
    try:
        return daemon.run()
    except (StartupError, ProviderError, OSError) as exc:
        raise CliError(str(exc)) from exc


def cmd_trigger(args: argparse.Namespace) -> int:
    from edgemeta.daemon.triggers import write_trigger

    settings = _config(args.config)
    if not args.queue and _running_daemon(settings.state_dir) is None:
        raise CliError(f"no daemon is running on state.dir {settings.state_dir}: nothing written "
                       "(--queue leaves the trigger for the next start)")
    body: dict = {}
    for key in ("stream", "support", "version"):  # the options this action has, when given
        if getattr(args, key, None) is not None:
            body[key] = getattr(args, key)
    path = write_trigger(settings.state_dir / "triggers", args.action, body)
    print(f"trigger written: {path}", flush=True)
    wait = sys.stdout.isatty() if args.wait is None else args.wait
    if not wait:
        return 0
    from edgemeta.daemon.trigger_wait import wait_for_trigger

    return wait_for_trigger(settings.state_dir, path, args.action, args.timeout,
                            say=lambda line: print(line, flush=True))


def _live_degraded(settings) -> dict[str, str] | None:
    """The daemon's degraded reasons from its /metrics (which a full disk cannot make stale, as
    it can status.json); None when the endpoint does not answer."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    m = settings.metrics
    if not m.enabled:
        return None
    host = "127.0.0.1" if m.address in ("0.0.0.0", "") else m.address
    try:
        with urllib.request.urlopen(f"http://{host}:{m.port}/metrics", timeout=2) as resp:
            text = resp.read().decode()
    except (OSError, ValueError):
        return None
    reasons = {}
    for family in text_string_to_metric_families(text):
        if family.name == "edgemeta_degraded":
            reasons.update({s.labels.get("reason", "?"): "from /metrics" for s in family.samples
                            if s.value >= 1})
    return reasons


def cmd_replay(args: argparse.Namespace) -> int:
    from edgemeta.replay import ReplayError, replay, sources

    settings = _config(args.config)
    names = [s.name for s in settings.streams]
    stream = args.stream or (names[0] if len(names) == 1 else None)
    if stream is None:
        raise CliError(f"--stream: {args.config} has several streams; name one of "
                       f"{', '.join(names)}")
    if stream not in names:
        raise CliError(f"--stream: {stream!r} is not a stream of {args.config} "
                       f"({', '.join(names)})")
    spec = settings.stream(stream)
    if args.rate < 0 or args.rows_per_file < 1:
        raise CliError("--rate must be >= 0 rows/s and --rows-per-file >= 1")
    inbox = settings.state_dir / "inbox" / stream
    try:
        paths = sources(Path(args.source))
        print(f"replaying {len(paths)} file(s) into {inbox} at {args.rate:g} rows/s, "
              f"{args.rows_per_file} rows per file, labels {args.labels}", file=sys.stderr)
        rows = replay(paths, inbox, spec.features, spec.label, rate=args.rate,
                      rows_per_file=args.rows_per_file, labels=args.labels,
                      label_delay=args.label_delay, prefix=args.prefix,
                      say=lambda line: print(line, file=sys.stderr, flush=True))
    except (ReplayError, OSError) as exc:
        raise CliError(str(exc)) from exc
    except KeyboardInterrupt:
        print("stopped", file=sys.stderr)
        return 130
    print(f"{rows} rows written to {inbox}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """0: the daemon runs; 3: it does not (its last status is shown as such)."""

    from edgemeta.daemon.journal import read_status, render_status

    settings = _config(args.config) if args.config else None
    state = settings.state_dir if settings else Path(args.state)
    try:
        status = read_status(state)
    except FileNotFoundError as exc:
        raise CliError(f"{state / 'status.json'}: no status yet; is the daemon "
                       "running?") from exc
    running = _running_daemon(state) is not None
    notes = []
    if not running:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(status.get("updated", 0)))
        notes.append(f"NOT RUNNING: daemon pid {status.get('pid')} is gone; its last status "
                     f"(written {when}) follows")
    elif settings is not None:
        live = _live_degraded(settings)
        if live is not None:
            status["degraded"] = sorted({**dict.fromkeys(status.get("degraded") or []), **live})
            if not live:
                status["degraded"] = []
    if running:
        age = time.time() - status.get("updated", 0)
        if age > 30:
            source = ("degraded mode is read from /metrics" if settings is not None else
                      "--config would read degraded mode from /metrics")
            notes.append(f"status.json was last written {age:.0f}s ago (a full or read-only "
                         f"disk?); {source}")
    if args.json:
        print(json.dumps({**status, "running": running, "notes": notes}, indent=2))
    else:
        print("\n".join([*notes, render_status(status)]))
    return 0 if running else 3


def cmd_config(args: argparse.Namespace) -> int:
    if (args.config is None) == (args.file is None):
        raise CliError("config check: give the config as --config FILE (as run, status and "
                       "trigger take it)")
    args.file = args.config or args.file
    settings = _config(args.file)
    checked = ""
    if not args.skip_bundle:  # the same check `run` makes, so a config that passes here starts
        from edgemeta.daemon.runtime import StartupError, open_fitted

        try:
            settings, bundle, _, notes = open_fitted(settings)
        except StartupError as exc:
            raise CliError(f"{args.file}: {exc} (--skip-bundle checks the rest when the bundle "
                           "is installed later)") from exc
        for note in notes:
            print(f"{args.file}: warning: {note}", file=sys.stderr)
        kind = (f"classification, {bundle.classes} classes" if bundle.kind != "regression"
                else "regression")
        checked = (f" (bundle {settings.bundle}: {kind}, {bundle.features} feature(s), adapts "
                   f"on {settings.adaptation.support_size} rows, checksums verified)")
    print(json.dumps(settings.as_dict(), indent=2, default=str))
    print(f"{args.file}: OK{checked}", file=sys.stderr)
    _warn_runtime_conflict()
    return 0


def cmd_config_docs(args: argparse.Namespace) -> int:
    from edgemeta.config import setting_records

    print(f"{'key':<32} {'default':<22} {'reload':<8} what it is for")
    for r in setting_records():
        default = "(required)" if r.default is None and r.key in ("bundle.path", "state.dir",
                                                                   "streams") else repr(r.default)
        print(f"{r.key:<32} {default:<22} {'yes' if r.reloadable else 'restart':<8} {r.doc}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:

    from edgemeta.serve.registry import Registry, RegistryError

    settings = _config(args.config) if args.config else None
    state = settings.state_dir if settings else Path(args.state)
    if not (state / "models").is_dir():
        raise CliError(f"{state}: no models/ directory; is this a state directory?")
    lineage = None
    if args.stream:
        # A stream's lineage is its own name unless the config says it shares a model.
        known = {s.name: s.model or s.name for s in settings.streams} if settings else None
        if known is not None and args.stream not in known:
            raise CliError(f"--stream: {args.stream!r} is not a stream of {args.config}")
        lineage = known[args.stream] if known else args.stream
    if args.models == "rollback":
        return _models_rollback(args, settings, state, lineage)
    try:
        registry = Registry(state, writable=False)  # never a side effect on a running daemon
    except RegistryError as exc:
        raise CliError(str(exc)) from exc
    rows = registry.list(lineage)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'':2}{'version':>7}  {'source':<10} {'parent':>6}  {'created':<19}  {'lineage':<12} "
          f"{'stream':<12} status")
    for r in rows:
        mark = "*" if r["current"] else " "
        if not r["ok"]:
            print(f"{mark:2}{r['version']:>7}  BROKEN: {r['error']}")
            continue
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["created"]))
        serving = f", serves {', '.join(r['serving'])}" if r["serving"] else ""
        print(f"{mark:2}{r['version']:>7}  {r['source']:<10} "
              f"{r['parent'] if r['parent'] is not None else '-':>6}  {created:<19}  "
              f"{r['lineage'] or '(shared)':<12} {r['stream'] or '-':<12} ok{serving}")
    return 0


def _running_daemon(state: Path) -> int | None:
    """The pid of the live daemon holding ``state`` (its lock; for a daemon from before the
    lock, the one that wrote status.json), or None."""
    from edgemeta.daemon.journal import daemon_alive, read_status
    from edgemeta.daemon.state_lock import LOCK_NAME, holder

    if (state / LOCK_NAME).exists():
        return holder(state)
    try:
        status = read_status(state)
    except (OSError, ValueError):
        return None
    return status["pid"] if daemon_alive(status) else None


def _models_rollback(args: argparse.Namespace, settings, state: Path, lineage: str | None) -> int:
    """With a daemon running, the daemon is the only writer of models/: ask it by trigger and
    wait for its answer. Offline, roll back in place, pruning as the config's keep_models says
    (without a config nothing is pruned)."""
    from edgemeta.serve.registry import Registry, RegistryError

    pid = _running_daemon(state)
    if pid is not None:
        from edgemeta.daemon.trigger_wait import wait_for_trigger
        from edgemeta.daemon.triggers import write_trigger

        body = {k: v for k, v in (("stream", args.stream), ("version", args.to)) if v is not None}
        path = write_trigger(state / "triggers", "rollback", body)
        print(f"the daemon (pid {pid}) is running: asked it by {path}", flush=True)
        return wait_for_trigger(state, path, "rollback", 60.0,
                                say=lambda line: print(line, flush=True))
    keep = settings.retention.keep_models if settings else 10**9
    try:
        registry = Registry(state, keep=keep)
        for name in [lineage] if lineage else (registry.lineages() or [None]):
            manifest = registry.rollback(to=args.to, lineage=name)
            print(f"{'lineage ' + name if name else 'CURRENT'}: now serving "
                  f"v{manifest.version} (rollback to v{manifest.parent})")
    except (RegistryError, ValueError) as exc:
        raise CliError(str(exc)) from exc
    print("the daemon serves it when it next starts")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    if args.bench == "fewshot":
        from edgemeta.bench.fewshot import run_fewshot

        run_fewshot(Path(args.out), quick=args.quick, seed=args.seed)
    elif args.bench == "swap":
        from edgemeta.bench.swap import run_swap

        run_swap(Path(args.out), quick=args.quick)
    elif args.bench == "serve":
        from edgemeta.bench.swap import run_serve

        run_serve(Path(args.out), quick=args.quick)
    elif args.bench == "chaos":
        from edgemeta.bench.chaos import run_chaos

        if args.quick:
            run_chaos(Path(args.out), malformed_files=150, kills=6, poison_tries=5, seed=args.seed)
        else:
            run_chaos(Path(args.out), malformed_files=args.files, kills=args.kills,
                      poison_tries=args.poison, seed=args.seed)
    elif args.bench == "soak":
        from edgemeta.bench.soak import run_soak

        if args.quick:
            run_soak(Path(args.out), minutes=1.0, rate=200, warmup_min=0.25, switch_s=20)
        else:
            run_soak(Path(args.out), minutes=args.minutes, rate=args.rate,
                     warmup_min=args.warmup)
    elif args.bench == "fleet":
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
    elif args.bench == "devices":
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
    elif args.bench == "stream":
        from edgemeta.bench.stream import ALL_FAMILIES, run_stream_bench

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
        quick = {"n": 3000, "seeds": 1, "iterations": 500} if args.quick else {}
        run_stream_bench(Path(args.out), families, seeds=quick.get("seeds", args.seeds),
                         n=quick.get("n", args.samples), hazard=args.hazard, noise=args.noise,
                         steps=args.steps, support=args.support, holdout=args.holdout,
                         iterations=quick.get("iterations"))
    else:
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
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    _require_runtime()
    from edgemeta.demo import TASKS, run_demo

    if args.iterations < 1 or args.rows_per_task < 25:
        raise CliError("--iterations must be >= 1 and --rows-per-task >= 25")
    if not 2 <= args.tasks <= len(TASKS):
        raise CliError(f"--tasks must be between 2 and {len(TASKS)}")
    return run_demo(Path(args.workdir) if args.workdir else None, iterations=args.iterations,
                    rows_per_task=args.rows_per_task, tasks=TASKS[:args.tasks],
                    keep_running=args.keep_running,
                    state_dir=Path(args.state_dir) if args.state_dir else None)


def cmd_tasks_harvest(args: argparse.Namespace) -> int:
    from edgemeta.bundle_format import BundleFormatError, read_verified_meta
    from edgemeta.fleet.harvest import HarvestError, TaskShape, harvest, write_task_folder

    try:
        meta = read_verified_meta(Path(args.bundle))
        shape = TaskShape.of_bundle(meta)
    except (BundleFormatError, KeyError, TypeError, ValueError) as exc:
        raise CliError(f"--bundle: {exc}") from exc
    try:
        result, rows = harvest([Path(s) for s in args.sources], shape, args.per_stream_cap,
                               args.overlap, args.accepted_only, args.include_suspect)
        bundle = {"path": str(args.bundle),
                  "weights_sha256": (meta.get("sha256") or {}).get("weights.safetensors")}
        out = write_task_folder(Path(args.out), result, rows, shape, bundle)
    except HarvestError as exc:
        raise CliError(str(exc)) from exc
    print(f"{out}: {len(result.tasks)} task(s) of at least {shape.min_rows} rows "
          f"(K={shape.shots} + {shape.queries} queries"
          f"{' per class' if shape.classes else ''}) from {len({t['source'] for t in result.tasks})} "
          "source(s)")
    for reason, n in sorted(result.skipped.items()):
        print(f"  skipped {n}: {reason} (e.g. {result.examples[reason]})")
    return 0


def cmd_tasks_report(args: argparse.Namespace) -> int:
    from edgemeta.fleet.report import describe_tasks, format_report
    from edgemeta.meta.tasks import TaskDataError, load_labelled_array

    folder = Path(args.folder)
    if not folder.is_dir():
        raise CliError(f"{folder}: not a task folder")
    manifest = {}
    if (folder / "manifest.json").is_file():
        try:
            manifest = json.loads((folder / "manifest.json").read_text())
        except ValueError as exc:
            raise CliError(f"{folder / 'manifest.json'}: not valid JSON: {exc}") from exc
    kind = args.kind or manifest.get("kind") or "regression"
    files = sorted(p for p in folder.iterdir() if p.suffix in (".npz", ".csv"))
    try:
        tasks = [load_labelled_array(f, args.label_column) for f in files]
        report = describe_tasks(tasks, kind)
    except TaskDataError as exc:
        raise CliError(str(exc)) from exc
    except ValueError as exc:
        raise CliError(f"{folder}: {exc}") from exc
    listed = manifest.get("tasks") or []
    if listed:
        sources = {t.get("source") for t in listed}
        streams = {(t.get("source"), t.get("stream")) for t in listed}
        skipped = manifest.get("skipped") or {}
        said = (", ".join(f"{n} {why}" for why, n in skipped.items())
                if isinstance(skipped, dict) else str(skipped)) or "none"
        report["provenance"] = [f"from {len(sources)} source(s), {len(streams)} stream(s); "
                                f"skipped at harvest: {said}"]
    print(json.dumps(report, indent=2) if args.json else format_report(report, f"{folder}: "))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgemeta", description="meta-learned few-shot adaptation for edge devices")
    parser.add_argument("--version", action="version", version=f"edgemeta {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="meta-train a bundle")
    t.add_argument("--out", required=True, help="bundle directory to write")
    t.add_argument("--tasks", choices=["sinusoid", "hyperplane", "array", "folder"],
                   default="sinusoid", help="task distribution (default: %(default)s)")
    t.add_argument("--data", help="labelled array (.npz/.csv) or task folder (for array, folder)")
    t.add_argument("--kind", choices=["regression", "classification"], default="regression",
                   help="task kind of a task folder (default: %(default)s)")
    t.add_argument("--label-column", default="label",
                   help="label column of a CSV array (default: %(default)s)")
    t.add_argument("--ways", type=int, default=5,
                   help="N of N-way classification (default: %(default)s)")
    t.add_argument("--shots", type=int, default=5,
                   help="support rows per task (per class when classifying) (default: %(default)s)")
    t.add_argument("--queries", type=int, default=10,
                   help="query rows per task (per class when classifying) (default: %(default)s)")
    t.add_argument("--split-seed", type=int, default=0,
                   help="seed of the meta-train/val/test split (default: %(default)s)")
    t.add_argument("--val-fraction", type=float,
                   help="share of classes (array) or task files (folder) kept for validation")
    t.add_argument("--test-fraction", type=float,
                   help="share of classes (array) or task files (folder) kept for meta-test")
    t.add_argument("--algorithm", default="maml",
                   help="maml, fomaml, reptile, metasgd, anil or protonet (default: %(default)s)")
    t.add_argument("--hidden", type=_positive_int_list, default=[40, 40],
                   help="hidden layer widths of the MLP, e.g. 40,40 (default: 40,40)")
    t.add_argument("--model-factory", help="package.module:function returning an nn.Module")
    t.add_argument("--model-kwargs", default="{}",
                   help="JSON keyword arguments for the factory (default: {})")
    t.add_argument("--inner-steps", type=int, default=1,
                   help="inner-loop steps per task (default: %(default)s)")
    t.add_argument("--inner-lr", type=float, default=0.01,
                   help="inner-loop learning rate (default: %(default)s)")
    t.add_argument("--outer-lr", type=float, default=0.001,
                   help="Adam learning rate of the meta-update (default: %(default)s)")
    t.add_argument("--meta-batch", type=int, default=25,
                   help="tasks per meta-update (default: %(default)s)")
    t.add_argument("--iterations", type=int, default=10000,
                   help="meta-updates at most (default: %(default)s)")
    t.add_argument("--time-budget", type=float,
                   help="stop after this many seconds, whichever limit comes first (default: none)")
    t.add_argument("--val-every", type=int, default=500,
                   help="validate every N iterations (default: %(default)s); also every tenth of "
                        "the time budget (at most 30 s) and always at the end")
    t.add_argument("--val-tasks", type=int, default=100,
                   help="validation tasks (default: %(default)s)")
    t.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    t.add_argument("--device", default="auto",
                   help="auto, cpu or cuda[:N] (default: auto: CUDA when available)")
    t.add_argument("--init", metavar="BUNDLE",
                   help="continue from this bundle's weights (and learned rates), with its model, "
                        "algorithm, inner loop and K; the new bundle records it as its parent")
    t.add_argument("--replay", type=float, default=0.5,
                   help="with --init: share of each meta-batch drawn from the parent's own task "
                        "distribution, so it is not forgotten (default: %(default)s)")
    t.add_argument("--max-forgetting", type=float, default=0.05,
                   help="with --init and --replay: keep only weights whose validation loss on the "
                        "parent's own tasks is at most this share above the parent's "
                        "(default: %(default)s)")
    t.add_argument("--allow-untrained", action="store_true",
                   help="write the bundle even when no validation beat the initialization")
    t.add_argument("--require-better-than-chance", action="store_true",
                   help="refuse to write a bundle whose adapted validation loss is within noise "
                        "of the no-adaptation predictor's (default: write it with a warning)")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="few-shot evaluation with baselines")
    e.add_argument("bundle", nargs="+", help="the bundle folder(s) to evaluate (several: compared on "
                   "the same --tasks-folder tasks)")
    e.add_argument("--tasks-folder", metavar="DIR",
                   help="evaluate on this task folder's meta-test files instead of the bundle's own "
                        "distribution (e.g. harvested tasks)")
    e.add_argument("--test-fraction", type=float, default=0.2,
                   help="with --tasks-folder: share of its files that are meta-test, split as "
                        "`train` splits it (1 = every file) (default: %(default)s)")
    e.add_argument("--split-seed", type=int, default=0,
                   help="with --tasks-folder: the split's seed, as given to train (default: %(default)s)")
    e.add_argument("--shots", type=_positive_int,
                   help="support rows per task (default: the shots the bundle was trained with)")
    e.add_argument("--steps", type=_positive_int_list, default=[0, 1, 5, 10],
                   help="comma-separated inner-step counts to report (default: 0,1,5,10)")
    e.add_argument("--tasks", type=_positive_int, default=600,
                   help="meta-test tasks per evaluation seed (default: %(default)s)")
    e.add_argument("--seeds", type=_positive_int, default=5,
                   help="evaluation seeds; the figure pools their tasks (default: %(default)s)")
    e.add_argument("--seed", type=int, default=0,
                   help="first evaluation seed, also the baselines' seed (default: %(default)s)")
    e.add_argument("--target", type=float, help="report steps and shots needed to reach this loss")
    e.add_argument("--pretrain-iterations", type=_positive_int, default=2000,
                   help="training steps of the pretrain-finetune baseline (default: %(default)s)")
    e.add_argument("--no-baselines", action="store_true",
                   help="evaluate the bundle alone (no random-init, pretrain or no-adaptation rows)")
    e.add_argument("--json", action="store_true", help="print the results as JSON")
    e.set_defaults(func=cmd_eval)

    b = sub.add_parser("bench", help="reproducible benchmarks")
    bsub = b.add_subparsers(dest="bench", required=True)
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

    k = bsub.add_parser("soak", help="the real daemon under a steady stream: RSS, fds, threads")
    _out(k, "soak")
    k.add_argument("--minutes", type=float, default=30.0, help="duration (default: %(default)s)")
    k.add_argument("--rate", type=int, default=1000, help="rows per second (default: %(default)s)")
    k.add_argument("--warmup", type=float, default=5.0,
                   help="minutes left out of the slope (default: %(default)s)")
    k.add_argument("--quick", action="store_true", help="1 minute at 200 rows/s, a smoke test")
    k.set_defaults(func=cmd_bench)

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
    v = bsub.add_parser("devices", help="CPU vs CUDA: meta-training, adaptation, drift-to-serving")
    _out(v, "devices")
    v.add_argument("--bundle", default=None,
                   help="bundle for the adaptation figures (default: train a small one, 30 s)")
    v.add_argument("--devices", default=None,
                   help="comma-separated, e.g. cpu,cuda (default: cpu, and cuda when available)")
    v.add_argument("--quick", action="store_true", help="seconds instead of minutes, a smoke test")
    v.set_defaults(func=cmd_bench)

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
    s.add_argument("--quick", action="store_true", help="tiny sizes, for smoke tests")
    s.set_defaults(func=cmd_bench)

    ta = sub.add_parser("tasks", help="task folders from a fleet's episodes")
    tasub = ta.add_subparsers(dest="tasks_command", required=True)
    th = tasub.add_parser("harvest", help="archived adaptation episodes -> a task folder for "
                          "`train --tasks folder`")
    th.add_argument("sources", nargs="+", metavar="STATE_DIR_OR_TARBALL",
                    help="daemon state directories (or their episodes/ folders) and tarballs of them")
    th.add_argument("--out", required=True, help="the task folder to write (must be new or empty)")
    th.add_argument("--bundle", required=True,
                    help="the bundle the tasks are for: its kind, feature count and K + queries")
    th.add_argument("--per-stream-cap", type=_positive_int, default=200,
                    help="most tasks kept per device stream, spread over time (default: %(default)s)")
    th.add_argument("--overlap", type=float, default=0.5,
                    help="share of shared rows above which two episodes are one regime "
                         "(default: %(default)s)")
    th.add_argument("--accepted-only", action="store_true",
                    help="only episodes whose adaptation was accepted (default: also those the gate "
                         "rejected or that diverged: their labels are real, and they are the tasks "
                         "the base handled worst)")
    th.add_argument("--include-suspect", action="store_true",
                    help="also episodes the daemon refused as suspect labels (constant, collapsed "
                         "variance, out of the bundle's target range; default: left out)")
    th.set_defaults(func=cmd_tasks_harvest)
    tr_ = tasub.add_parser("report", help="sizes, label ranges and diversity of a task folder")
    tr_.add_argument("folder", help="a task folder (harvested or hand-made)")
    tr_.add_argument("--kind", choices=["regression", "classification"],
                     help="task kind (default: the harvest manifest's, else regression)")
    tr_.add_argument("--label-column", default="label",
                     help="label column of CSV tasks (default: %(default)s)")
    tr_.add_argument("--json", action="store_true", help="the report as JSON")
    tr_.set_defaults(func=cmd_tasks_report)

    r = sub.add_parser("run", help="the daemon", description="Serve the bundle's model on the "
                       "configured streams, watch them for drift and adapt when they change; "
                       "runs until SIGTERM or Ctrl-C (SIGHUP reloads the config). One daemon per "
                       "state directory.")
    r.add_argument("--config", required=True, help="the daemon's TOML config (edgemeta config "
                   "check FILE validates it)")
    r.add_argument("--verbose", action="store_true", help="log at DEBUG instead of INFO")
    r.set_defaults(func=cmd_run)

    tr = sub.add_parser("trigger", help="drop a trigger file safely",
                        description="Ask the running daemon to act: adapt, roll back or reload "
                        "(`edgemeta trigger ACTION --help` for each action's options).")
    tsub = tr.add_subparsers(dest="action", required=True)
    actions = {
        "adapt": ("collect labelled rows and adapt now", "Open a manual adaptation: the daemon "
                  "collects support and holdout rows (or takes --support's), adapts, and swaps "
                  "the candidate in only if the holdout gate says it is better."),
        "rollback": ("serve an earlier version again", "Serve the current version's parent "
                     "(or --to's) again, on every stream or on --stream's."),
        "reload": ("re-read the config (as SIGHUP does)", "Re-read the config file: the keys a "
                   "reload can apply are applied, the others are named as needing a restart."),
    }
    for action, (short, long) in actions.items():
        ta = tsub.add_parser(action, help=short, description=long)
        ta.add_argument("--config", required=True, help="the running daemon's config file")
        if action in ("adapt", "rollback"):
            ta.add_argument("--stream", help="the stream (default: the only one)" if action ==
                            "adapt" else "the stream whose model rolls back (default: every "
                            "stream's)")
        if action == "adapt":
            ta.add_argument("--support", help="a labelled file, relative to <state>/inbox, as "
                            "the support set")
        if action == "rollback":
            ta.add_argument("--to", "--version", dest="version", type=int, metavar="VERSION",
                            help="the version to serve (default: the current one's parent); "
                                 "--version is the old spelling, kept for one release")
        ta.add_argument("--wait", action=argparse.BooleanOptionalAction, default=None,
                        help="follow the trigger to its outcome: the daemon's answer, an "
                             "adaptation's collection and its verdict (default: on when output "
                             "goes to a terminal); exit 0 done, 1 refused/rejected, 3 timed out")
        ta.add_argument("--timeout", type=float, default=300.0,
                        help="seconds --wait waits (default: %(default)s)")
        ta.add_argument("--queue", action="store_true",
                        help="with no daemon running, leave the trigger for the next start "
                             "(without it, the command refuses and writes nothing)")
        ta.set_defaults(func=cmd_trigger)

    rp = sub.add_parser("replay", help="write a recorded stream into a daemon's inbox at a rate",
                        description="Replay a CSV (the stream's feature columns, its label "
                        "column optional) or NPZ (X, optional y), or a folder of them, into the "
                        "configured stream's inbox: files of --rows-per-file rows at --rate rows/s, "
                        "each written under a temporary name and renamed, labels inline, delayed "
                        "(a label file joined by id) or none. The shortest path to a running "
                        "daemon without writing a producer.")
    rp.add_argument("source", help="a .csv or .npz file, or a folder of them")
    rp.add_argument("--config", required=True, help="the daemon's config file")
    rp.add_argument("--stream", help="the stream to feed (default: the only one)")
    rp.add_argument("--rate", type=float, default=100.0,
                    help="rows per second, 0 for as fast as possible (default: %(default)s)")
    rp.add_argument("--rows-per-file", type=int, default=50,
                    help="rows in each input file (default: %(default)s)")
    rp.add_argument("--labels", choices=["inline", "delayed", "none"], default="inline",
                    help="labels in the data files, in .labels.csv files --label-delay files "
                         "later, or not at all (default: %(default)s)")
    rp.add_argument("--label-delay", type=int, default=2,
                    help="files between a data file and its labels (default: %(default)s)")
    rp.add_argument("--prefix", default="replay", help="file name prefix (default: %(default)s)")
    rp.set_defaults(func=cmd_replay)

    st = sub.add_parser("status", help="what the daemon is doing (from status.json)")
    where = st.add_mutually_exclusive_group(required=True)
    where.add_argument("--config", help="the daemon's config file")
    where.add_argument("--state", help="the daemon's state directory (no config needed; "
                       "degraded mode then comes from status.json alone)")
    st.add_argument("--json", action="store_true", help="the status as JSON (with running and "
                    "notes); exit 0 running, 3 not running")
    st.set_defaults(func=cmd_status)

    c = sub.add_parser("config", help="configuration tools")
    csub = c.add_subparsers(dest="config_command", required=True)
    cc = csub.add_parser("check", help="validate a config and print the effective settings")
    cc.add_argument("--config", dest="config", help="the daemon's TOML config")
    cc.add_argument("file", nargs="?", help="the same, as a positional argument (the old "
                    "spelling, kept for one release)")
    cc.add_argument("--skip-bundle", action="store_true",
                    help="do not open the bundle (for a config written before its bundle is "
                         "installed); by default it is checked as `run` checks it")
    cc.set_defaults(func=cmd_config)
    cd = csub.add_parser("docs", help="every config key with its default, whether a reload "
                                      "(SIGHUP) applies it, and what it is for")
    cd.set_defaults(func=cmd_config_docs)

    m = sub.add_parser("models", help="list the model registry or roll back")
    msub = m.add_subparsers(dest="models", required=True)
    ml = msub.add_parser("list", help="versions, lineage and checksum status")
    ml.add_argument("--json", action="store_true")
    mr = msub.add_parser("rollback", help="serve the previous (or a named) version again")
    mr.add_argument("--to", type=int, help="version to serve (default: the current one's parent)")
    for p in (ml, mr):
        p.add_argument("--stream", help="one stream's lineage (default: every version; rollback: "
                       "every lineage)")
        where = p.add_mutually_exclusive_group(required=True)
        where.add_argument("--config", help="the daemon's config file")
        where.add_argument("--state", help="the daemon's state directory")
        p.set_defaults(func=cmd_models)

    d = sub.add_parser("demo", help="the whole loop on a switching stream: train, serve, drift, "
                       "adapt, swap")
    d.add_argument("--workdir", help="where to cache the bundle (default: ~/.cache/edgemeta/demo)")
    d.add_argument("--iterations", type=int, default=3000,
                   help="meta-training iterations (default: %(default)s)")
    d.add_argument("--rows-per-task", type=int, default=400,
                   help="rows before the task switches (default: %(default)s)")
    d.add_argument("--tasks", type=int, default=6,
                   help="how many tasks the stream visits (default: %(default)s)")
    d.add_argument("--state-dir", help="the daemon's state directory (default: a new temp dir)")
    d.add_argument("--keep-running", action="store_true",
                   help="leave the daemon up to scrape it and drop trigger files")
    d.set_defaults(func=cmd_demo)
    return parser


# Benchmarks write outside any checkout by default (a run in a clone must not rewrite the
# committed figures); EDGEMETA_BENCH_OUT or --out chooses another place.
BENCH_OUT = Path(os.environ.get("EDGEMETA_BENCH_OUT", "~/.cache/edgemeta/bench")).expanduser()


def _out(parser: argparse.ArgumentParser, name: str) -> None:
    parser.add_argument("--out", default=str(BENCH_OUT / name),
                        help="output folder (default: %(default)s)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except CliError as exc:
        print(f"edgemeta {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:
        from edgemeta.ort_install import MISSING, is_missing

        if not is_missing(exc):
            raise
        print(f"edgemeta {args.command}: error: {MISSING}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"edgemeta {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `edgemeta status | head`: the reader left. Point stdout at /dev/null so the interpreter's
        # final flush does not raise again, and exit like a program killed by SIGPIPE would.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
