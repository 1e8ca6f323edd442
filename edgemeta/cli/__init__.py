"""The ``edgemeta`` command: parse, validate, call into the rooms; no logic of its own.

One module per command group, each registering its own subcommands beside their handlers:
``learning`` (train, eval, tasks), ``operations`` (run, trigger, replay, status, config, models),
``bench`` and ``demo``; ``common`` holds what they share. Heavy imports (torch) happen inside the
handlers so ``edgemeta --help`` stays instant and the serving commands never load torch.
"""

from __future__ import annotations

import argparse
import os
import sys

from edgemeta import __version__
from edgemeta.cli import bench, demo, learning, operations
from edgemeta.cli.common import CliError

__all__ = ["CliError", "build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgemeta", description="meta-learned few-shot adaptation for edge devices")
    parser.add_argument("--version", action="version", version=f"edgemeta {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for group in (learning, bench, operations, demo):
        group.register(sub)
    return parser


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
