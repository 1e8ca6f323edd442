"""``edgemeta demo``: the whole loop on a switching stream.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from edgemeta.cli.common import (
    CliError,
    _require_runtime,
)


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


def _register_demo(sub) -> None:
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


def register(sub) -> None:
    """Add this group's commands to the ``edgemeta`` parser's subcommands."""
    _register_demo(sub)
