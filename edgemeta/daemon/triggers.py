"""Operator trigger files: ``adapt``, ``rollback``, ``reload`` dropped into ``<state>/triggers/``.

A trigger's command is its file name up to the first ``-`` or ``.`` (``adapt``,
``adapt-20261124.json``); its body is empty or a JSON object. Everything is checked before it acts:
unknown names, malformed JSON, oversized files, symlinks and paths that leave the state directory
are rejected with a reason. Each handled trigger moves to ``triggers/done/`` beside a result file.
"""

from __future__ import annotations

import json
import os
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgemeta.fsio import atomic_write, safe_name
from edgemeta.stream.parsing import IngestError, load_json

COMMANDS = ("adapt", "rollback", "reload")
REASONS = ("symlink", "not_regular", "unknown", "too_large", "malformed", "outside_state",
           "internal_error", "too_slow")
MAX_BYTES = 64 * 1024
MAX_DEPTH = 8  # a trigger body is a flat object; anything deeper is not a trigger


class TriggerRejected(ValueError):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass
class Trigger:
    path: Path
    command: str
    args: dict[str, Any] = field(default_factory=dict)


def command_of(name: str) -> str:
    return name.split(".", 1)[0].split("-", 1)[0]


def parse_trigger(path: Path, state_dir: Path, streams: list[str]) -> Trigger:
    """Validate one trigger file; raises :class:`TriggerRejected` with a metric-safe reason."""
    if path.is_symlink():
        raise TriggerRejected("symlink", f"{path.name} is a symlink")
    info = path.stat()
    if not stat.S_ISREG(info.st_mode):
        raise TriggerRejected("not_regular", f"{path.name} is not a regular file")
    command = command_of(path.name)
    if command not in COMMANDS:
        raise TriggerRejected("unknown", f"{path.name}: unknown trigger {command!r} "
                              f"(use {', '.join(COMMANDS)})")
    if info.st_size > MAX_BYTES:
        raise TriggerRejected("too_large", f"{path.name} is {info.st_size} bytes (limit "
                              f"{MAX_BYTES})")
    with path.open("rb") as fh:
        data = fh.read(MAX_BYTES + 1)
    if len(data) > MAX_BYTES:
        raise TriggerRejected("too_large", f"{path.name} grew over {MAX_BYTES} bytes")
    return parse_trigger_bytes(data, path, state_dir, streams, command)


def parse_trigger_bytes(data: bytes, path: Path, state_dir: Path, streams: list[str],
                        command: str | None = None) -> Trigger:
    """The checks on a trigger's body; any bytes either make a trigger or raise
    :class:`TriggerRejected` with a reason."""
    command = command or command_of(path.name)
    if command not in COMMANDS:
        raise TriggerRejected("unknown", f"{path.name}: unknown trigger {command!r} "
                              f"(use {', '.join(COMMANDS)})")
    if len(data) > MAX_BYTES:
        raise TriggerRejected("too_large", f"{path.name} is {len(data)} bytes (limit {MAX_BYTES})")
    args = _body(data, path)
    unknown = sorted(set(args) - ALLOWED_KEYS[command])
    if unknown:
        raise TriggerRejected("malformed", f"{path.name}: unknown key {unknown[0]!r} for {command}")
    if command == "adapt":
        args = _adapt_args(args, path, state_dir, streams)
    elif command == "rollback":
        _check_rollback_args(args, path, streams)
    return Trigger(path, command, args)


ALLOWED_KEYS = {"adapt": {"stream", "support"}, "rollback": {"version", "stream"}, "reload": set()}


def _body(data: bytes, path: Path) -> dict[str, Any]:
    """An empty body is no arguments; anything else must be a JSON object."""
    text = data.decode("utf-8", errors="replace").strip()
    if not text:
        return {}
    try:
        args = load_json(text, 1, MAX_DEPTH)
    except json.JSONDecodeError as exc:
        raise TriggerRejected("malformed", f"{path.name}: not valid JSON: {exc}") from exc
    except IngestError as exc:
        raise TriggerRejected("malformed", f"{path.name}: {exc}") from exc
    if not isinstance(args, dict):
        raise TriggerRejected("malformed", f"{path.name}: expected a JSON object")
    return args


def _adapt_args(args: dict[str, Any], path: Path, state_dir: Path,
                streams: list[str]) -> dict[str, Any]:
    """The stream (the only one when there is one) and the support file, inside the inbox."""
    stream = args.get("stream", streams[0] if len(streams) == 1 else None)
    if not isinstance(stream, str) or stream not in streams:
        raise TriggerRejected("malformed", f"{path.name}: 'stream' must name one of {streams}")
    args["stream"] = stream
    if "support" in args:
        args["support"] = _support_file(args["support"], path, state_dir)
    return args


def _support_file(support: Any, path: Path, state_dir: Path) -> Path:
    if not isinstance(support, str) or not support or len(support) > 4096 or "\x00" in support:
        raise TriggerRejected("malformed", f"{path.name}: 'support' must be a path string "
                              "(no NUL bytes, at most 4096 characters)")
    inbox = (state_dir / "inbox").resolve()
    target = (inbox / support).resolve()
    if not target.is_relative_to(inbox):
        raise TriggerRejected("outside_state", f"{path.name}: support path "
                              f"{support!r} leaves the inbox tree")
    try:
        found = target.is_file()
    except OSError as exc:  # a name or path the file system refuses (ENAMETOOLONG)
        raise TriggerRejected("malformed", f"{path.name}: support path "
                              f"{support[:80]!r}...: {exc.strerror}") from exc
    if not found:
        raise TriggerRejected("malformed", f"{path.name}: support file {target} not found")
    return target


def _check_rollback_args(args: dict[str, Any], path: Path, streams: list[str]) -> None:
    if "stream" in args and args["stream"] not in streams:
        raise TriggerRejected("malformed", f"{path.name}: 'stream' must name one of {streams}")
    version = args.get("version", 1)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise TriggerRejected("malformed", f"{path.name}: 'version' must be a positive integer")


def pending(trigger_dir: Path) -> list[Path]:
    """Everything an operator dropped (directories and FIFOs too: they are rejected, not left)."""
    try:
        return sorted(p for p in trigger_dir.iterdir()
                      if not p.name.startswith(".") and p.name != "done")
    except FileNotFoundError:
        return []


def finish(path: Path, result: str, message: str, extra: dict[str, Any] | None = None) -> Path:
    """Move a handled trigger to done/ and write its result next to it."""
    done = path.parent / "done"
    done.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    dest = done / safe_name(f"{stamp}-{time.time_ns() % 10**9:09d}-{path.name}")
    body = {"trigger": path.name, "result": result, "message": message, "time": time.time(),
            **(extra or {})}
    atomic_write(done / safe_name(dest.name, ".result.json"),
                 json.dumps(body, indent=2, default=str).encode())
    os.replace(path, dest)
    return dest


def write_trigger(trigger_dir: Path, command: str, args: dict[str, Any] | None = None) -> Path:
    """What ``edgemeta trigger`` does: temp name in the same directory, then rename."""
    if command not in COMMANDS:
        raise ValueError(f"unknown trigger {command!r}")
    trigger_dir.mkdir(parents=True, exist_ok=True)
    name = f"{command}-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}.json"
    path = trigger_dir / name
    tmp = trigger_dir / f".{name}.tmp"
    tmp.write_text(json.dumps(args or {}))
    os.replace(tmp, path)
    return path
