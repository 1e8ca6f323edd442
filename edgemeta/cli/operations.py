"""``run``, ``trigger``, ``replay``, ``status``, ``config`` and ``models``: the daemon and what an
operator does to it.

None of these imports torch: they run beside a serving daemon on the device.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from edgemeta.cli.common import (
    CliError,
    _config,
    _setup_logging,
)


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


def _register_run(sub) -> None:
    r = sub.add_parser("run", help="the daemon", description="Serve the bundle's model on the "
                       "configured streams, watch them for drift and adapt when they change; "
                       "runs until SIGTERM or Ctrl-C (SIGHUP reloads the config). One daemon per "
                       "state directory.")
    r.add_argument("--config", required=True, help="the daemon's TOML config (edgemeta config "
                   "check FILE validates it)")
    r.add_argument("--verbose", action="store_true", help="log at DEBUG instead of INFO")
    r.set_defaults(func=cmd_run)


def _register_trigger(sub) -> None:
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


def _register_replay(sub) -> None:
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


def _register_status(sub) -> None:
    st = sub.add_parser("status", help="what the daemon is doing (from status.json)")
    where = st.add_mutually_exclusive_group(required=True)
    where.add_argument("--config", help="the daemon's config file")
    where.add_argument("--state", help="the daemon's state directory (no config needed; "
                       "degraded mode then comes from status.json alone)")
    st.add_argument("--json", action="store_true", help="the status as JSON (with running and "
                    "notes); exit 0 running, 3 not running")
    st.set_defaults(func=cmd_status)


def _register_config(sub) -> None:
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


def _register_models(sub) -> None:
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


def register(sub) -> None:
    """Add this group's commands to the ``edgemeta`` parser's subcommands."""
    _register_run(sub)
    _register_trigger(sub)
    _register_replay(sub)
    _register_status(sub)
    _register_config(sub)
    _register_models(sub)
