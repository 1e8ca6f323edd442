"""Operator trigger files: ``adapt``, ``rollback``, ``reload`` dropped into ``<state>/triggers/``.

A trigger's command is its file name up to the first ``-`` or ``.`` (``adapt``,
``adapt-20261124.json``); its body is empty or a JSON object. Everything is checked before it acts:
unknown names, malformed JSON, oversized files, symlinks and paths that leave the state directory
are rejected with a reason. Each handled trigger moves to ``triggers/done/`` beside a result file.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgemeta.serve.registry import atomic_write

COMMANDS = ("adapt", "rollback", "reload")
MAX_BYTES = 64 * 1024


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
    command = command_of(path.name)
    if command not in COMMANDS:
        raise TriggerRejected("unknown", f"{path.name}: unknown trigger {command!r} "
                              f"(use {', '.join(COMMANDS)})")
    size = path.stat().st_size
    if size > MAX_BYTES:
        raise TriggerRejected("too_large", f"{path.name} is {size} bytes (limit {MAX_BYTES})")
    text = path.read_bytes().decode("utf-8", errors="replace").strip()
    args: dict[str, Any] = {}
    if text:
        try:
            args = json.loads(text)
        except json.JSONDecodeError as exc:
            raise TriggerRejected("malformed", f"{path.name}: not valid JSON: {exc}") from exc
        if not isinstance(args, dict):
            raise TriggerRejected("malformed", f"{path.name}: expected a JSON object")
    allowed = {"adapt": {"stream", "support"}, "rollback": {"version"}, "reload": set()}[command]
    unknown = sorted(set(args) - allowed)
    if unknown:
        raise TriggerRejected("malformed", f"{path.name}: unknown key {unknown[0]!r} for {command}")
    if command == "adapt":
        stream = args.get("stream", streams[0] if len(streams) == 1 else None)
        if stream not in streams:
            raise TriggerRejected("malformed", f"{path.name}: 'stream' must name one of {streams}")
        args["stream"] = stream
        if "support" in args:
            if not isinstance(args["support"], str):
                raise TriggerRejected("malformed", f"{path.name}: 'support' must be a path string")
            inbox = (state_dir / "inbox").resolve()
            target = (inbox / args["support"]).resolve()
            if not target.is_relative_to(inbox):
                raise TriggerRejected("outside_state", f"{path.name}: support path "
                                      f"{args['support']!r} leaves the inbox tree")
            if not target.is_file():
                raise TriggerRejected("malformed", f"{path.name}: support file {target} not found")
            args["support"] = target
    if command == "rollback" and "version" in args and (
            not isinstance(args["version"], int) or isinstance(args["version"], bool)
            or args["version"] < 1):
        raise TriggerRejected("malformed", f"{path.name}: 'version' must be a positive integer")
    return Trigger(path, command, args)


def pending(trigger_dir: Path) -> list[Path]:
    try:
        return sorted(p for p in trigger_dir.iterdir()
                      if not p.name.startswith(".") and p.name != "done" and
                      (p.is_symlink() or p.is_file()))
    except FileNotFoundError:
        return []


def finish(path: Path, result: str, message: str, extra: dict[str, Any] | None = None) -> Path:
    """Move a handled trigger to done/ and write its result next to it."""
    done = path.parent / "done"
    done.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    dest = done / f"{stamp}-{path.name}"
    os.replace(path, dest)
    body = {"trigger": path.name, "result": result, "message": message, "time": time.time(),
            **(extra or {})}
    atomic_write(done / f"{dest.name}.result.json", json.dumps(body, indent=2, default=str).encode())
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
