"""What every command group shares: its error type, argument types, logging and config loading.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


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


def _require_runtime() -> None:
    """Fail before minutes of training when the bundle's ONNX check could not run at the end."""
    import onnxruntime  # noqa: F401 - main() turns its absence into the install advice


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


# Benchmarks write outside any checkout by default (a run in a clone must not rewrite the
# committed figures); EDGEMETA_BENCH_OUT or --out chooses another place.
BENCH_OUT = Path(os.environ.get("EDGEMETA_BENCH_OUT", "~/.cache/edgemeta/bench")).expanduser()


def _out(parser: argparse.ArgumentParser, name: str) -> None:
    parser.add_argument("--out", default=str(BENCH_OUT / name),
                        help="output folder (default: %(default)s)")
