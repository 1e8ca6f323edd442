"""``train``, ``eval`` and ``tasks``: meta-training a bundle, judging it, and the task folders
a fleet's episodes become.

Heavy imports (torch) happen inside the handlers so ``edgemeta --help`` stays instant.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
import warnings
from pathlib import Path

from edgemeta.cli.common import (
    CliError,
    _positive_int,
    _positive_int_list,
    _require_runtime,
)


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


def _train_settings(args: argparse.Namespace):
    """The training settings the flags describe (a warm start's are inherited later)."""
    from edgemeta.meta.train import TrainSettings

    model: dict = {"arch": "mlp", "hidden": args.hidden}
    if args.model_factory:
        try:
            kwargs = json.loads(args.model_kwargs)
        except json.JSONDecodeError as exc:
            raise CliError(f"--model-kwargs: not valid JSON: {exc}") from exc
        model = {"factory": args.model_factory, "kwargs": kwargs}
    return TrainSettings(
        algorithm=args.algorithm, tasks=task_spec(args), model=model,
        inner_steps=args.inner_steps, inner_lr=args.inner_lr, outer_lr=args.outer_lr,
        meta_batch=args.meta_batch, iterations=args.iterations, time_budget=args.time_budget,
        val_every=args.val_every, val_tasks=args.val_tasks, seed=args.seed, device=args.device,
        max_forgetting=args.max_forgetting)


def _validated(settings) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        settings.validate()
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)


def _train_tasks(args: argparse.Namespace, settings):
    """(tasks, initial weights, lineage, parent bundle): a warm start continues its parent on
    its own tasks plus the new ones; otherwise the flags' task distribution from scratch."""
    from edgemeta.meta.bundle import read_bundle
    from edgemeta.meta.tasks import build_tasks

    if not args.init:
        _validated(settings)
        return build_tasks(settings.tasks), None, None, None
    from edgemeta.meta import warmstart

    if not 0 <= args.replay < 1:
        raise CliError(f"--replay: must be in [0, 1), got {args.replay}")
    parent = read_bundle(args.init)
    _inherit(settings, parent.meta)
    print(f"continuing from {args.init}: {settings.algorithm}, {settings.inner_steps} inner "
          f"step(s) at {settings.inner_lr}, K={settings.tasks['shots']} as it was trained; "
          f"{args.replay:.0%} of each meta-batch replays its own tasks", file=sys.stderr)
    _validated(settings)
    return (warmstart.warm_start_tasks(parent, settings.tasks, args.replay),
            warmstart.initial_params(parent), warmstart.lineage(parent, settings.tasks, args.replay),
            parent)


def _run_training(args: argparse.Namespace, settings, tasks, init, ctx):
    """Meta-train on this rank; under torchrun a SIGTERM (a dead rank) ends it like Ctrl-C, with
    the best bundle so far."""
    from edgemeta.meta import distributed
    from edgemeta.meta.train import ProgressBar, train

    if ctx.writer:
        for line in split_report(tasks.origin()):
            print(line, file=sys.stderr)
    if ctx.world > 1:
        print(f"rank {ctx.rank} of {ctx.world}: {ctx.share(settings.meta_batch)} of "
              f"{settings.meta_batch} tasks per meta-batch on {settings.device}", file=sys.stderr)
        signal.signal(signal.SIGTERM, _interrupt)
    quiet = args.quiet or not ctx.writer
    bar = None if quiet else ProgressBar(settings.iterations, settings.time_budget)
    try:
        result = train(settings, tasks, progress=bar, init=init, ctx=ctx)
    finally:
        if ctx.world > 1:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # let the bundle be written
            distributed.finish(ctx)
    if bar:
        bar.close()
    return result


def _judge_training(args: argparse.Namespace, result, parent, settings, cpu_seconds: float) -> None:
    """Refuse a bundle that beat nothing, warn about one that learned nothing measurable (or
    refuse it, with --require-better-than-chance) and about a budget a busy machine starved."""
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
    busy = _budget_starved(result, settings, cpu_seconds)
    if busy:
        print(f"warning: {busy}", file=sys.stderr)


def cmd_train(args: argparse.Namespace) -> int:
    _require_runtime()
    from edgemeta.meta import distributed
    from edgemeta.meta.bundle import BundleError
    from edgemeta.meta.models import ModelSpecError
    from edgemeta.meta.tasks import TaskDataError
    from edgemeta.meta.train import SettingsError, save_bundle

    settings = _train_settings(args)
    try:
        tasks, init, lineage, parent = _train_tasks(args, settings)
        ctx = distributed.context(settings.device)
        settings.device = distributed.device_for(ctx, settings.device)
        cpu_before = time.process_time()
        result = _run_training(args, settings, tasks, init, ctx)
        if not ctx.writer:
            print(f"rank {ctx.rank}: {result.iterations_done} iterations; rank 0 writes the bundle",
                  file=sys.stderr)
            return 0
        _judge_training(args, result, parent, settings, time.process_time() - cpu_before)
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


def _register_train(sub) -> None:
    t = sub.add_parser("train", help="meta-train a bundle")
    t.add_argument("--out", required=True, help="bundle directory to write")
    _task_arguments(t.add_argument_group("tasks"))
    _learner_arguments(t.add_argument_group("model and meta-learning"))
    _run_arguments(t.add_argument_group("the run"))
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(func=cmd_train)


def _task_arguments(t) -> None:
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


def _learner_arguments(t) -> None:
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


def _run_arguments(t) -> None:
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
                   help="refuse to write a bundle that adapts no better than the predictor that "
                        "ignores x, by its loss or (classifying) its error rate (default: write "
                        "it with a warning)")


def _register_eval(sub) -> None:
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


def _register_tasks(sub) -> None:
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


def register(sub) -> None:
    """Add this group's commands to the ``edgemeta`` parser's subcommands."""
    _register_train(sub)
    _register_eval(sub)
    _register_tasks(sub)
