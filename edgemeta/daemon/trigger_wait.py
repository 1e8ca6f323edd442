"""``edgemeta trigger --wait``: follow a trigger to its outcome instead of leaving it in done/.

An operator who asks for an adaptation wants to know what became of it: the daemon's answer to
the trigger file (in ``triggers/done/``), then, for ``adapt``, the collection's progress (from
``status.json``) and the episode it ends in (from ``episodes/``). Everything is read from files the
daemon already writes, so waiting needs no socket and works on a read-only view of the state.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def trigger_result(trigger: Path) -> dict[str, Any] | None:
    """The daemon's result for a trigger file, once it has handled it."""
    for path in sorted((trigger.parent / "done").glob(f"*{trigger.name}.result.json")):
        body = _read_json(path)
        if body is not None and body.get("trigger") == trigger.name:
            return body
    return None


def manual_episode(state_dir: Path, stream: str, since: float) -> dict[str, Any] | None:
    """The first manual episode of ``stream`` recorded at or after ``since``."""
    found = []
    for path in (state_dir / "episodes").glob(f"*-{stream}.json"):
        body = _read_json(path)
        # The stream inside the file, not the name's suffix ("b" must not match "a-b").
        if (body and body.get("stream") == stream and body.get("trigger") == "manual"
                and body.get("time", 0) >= since):
            found.append(body)
    return min(found, key=lambda b: b["time"]) if found else None


def describe_episode(e: dict[str, Any]) -> str:
    figures = (f"holdout loss {e.get('holdout_current', float('nan')):.4g} (serving) -> "
               f"{e.get('holdout_candidate', float('nan')):.4g} (candidate)")
    if e["result"] == "accepted":
        return f"accepted: v{e.get('version')} now serves stream {e['stream']}; {figures}"
    return f"{e['result']} ({e.get('reason', '')}): v{e.get('serving_version')} keeps serving; " \
           f"{figures}"


def wait_for_trigger(state_dir: Path, trigger: Path, action: str, timeout: float,
                     say: Callable[[str], None] = print, poll: float = 0.2) -> int:
    """Report the trigger's outcome; 0 when it did what was asked, 1 when not, 3 on timeout."""
    written = time.time()
    deadline = time.monotonic() + timeout
    result = None
    while result is None:
        if time.monotonic() > deadline:
            say(f"no answer from the daemon after {timeout:.0f} s: is it running? the trigger "
                f"waits in {trigger.parent}")
            return 3
        time.sleep(poll)
        result = trigger_result(trigger)
    say(f"daemon: {result['result']}: {result.get('message', '')}")
    if result["result"] != "ok":
        return 1
    if action != "adapt":
        return 0
    stream = result["stream"]  # the daemon names the stream it resolved the trigger to
    last = ""
    while True:
        episode = manual_episode(state_dir, stream, written)
        if episode is not None:
            say(describe_episode(episode))
            return 0 if episode["result"] == "accepted" else 1
        status = _read_json(state_dir / "status.json") or {}
        view = (status.get("streams") or {}).get(stream) or {}
        line = ""
        if view.get("phase") in ("collecting", "refining") and view.get("reason") == "manual":
            line = (f"collecting labelled rows on stream {stream}: have {view['collected']} "
                    f"of {view['needed']}")
        elif view.get("phase") in ("adapting", "gating"):
            line = f"adapting on stream {stream}"
        if line and line != last:
            say(line)
            last = line
        if time.monotonic() > deadline:
            say(f"still waiting after {timeout:.0f} s ({last or 'no collection open'}); the "
                f"outcome will be in `edgemeta status` and {state_dir / 'episodes'}")
            return 3
        time.sleep(poll)
