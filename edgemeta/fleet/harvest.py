"""Episodes archived by daemons -> a task folder that ``edgemeta train --tasks folder`` reads.

Why a harvest step at all: the episodes a fleet meets are the task distribution the next base
should be meta-trained on, but they arrive as thousands of per-device JSON files, with overlaps
(a refinement's rows contain the first adaptation's), copies (the same state directory collected
twice), hostile or truncated files, and chatty devices. Harvest keeps one task per regime and
writes what it kept and why the rest was dropped into ``manifest.json``.

Sources are state directories or tarballs of them; tarballs are read member by member, never
extracted, so a hostile archive cannot write outside its own reading.
"""

from __future__ import annotations

import json
import tarfile
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgemeta.episode_format import EpisodeError, parse_episode
from edgemeta.fsio import atomic_write

MAX_EPISODE_BYTES = 64 * 1024 * 1024
#: Episodes the daemon's sanity checks stopped before adapting: the labels themselves looked
#: wrong (poisoned, stuck, mis-scaled). Left out unless asked for; every other episode holds
#: real labels, whatever the gate decided about the candidate adapted from them. A base that
#: diverged or lost to the serving model on a task is exactly what re-meta-training should fix.
SUSPECT = frozenset({"constant_labels", "collapsed_variance", "out_of_range"})


class HarvestError(ValueError):
    """A harvest that cannot run at all (no sources, an output folder in the way)."""


@dataclass(frozen=True)
class TaskShape:
    """What a task must hold for the bundle it will train: its kind, width and K + queries."""

    kind: str
    features: int
    shots: int
    queries: int
    classes: int | None = None

    @property
    def min_rows(self) -> int:
        per_class = self.shots + self.queries
        return per_class * (self.classes or 1)

    @classmethod
    def of_bundle(cls, meta: dict[str, Any]) -> TaskShape:
        dist = (meta.get("task") or {}).get("distribution") or {}
        kind = meta["task"]["kind"]
        return cls(kind, int(meta["input"]["features"]), int(dist.get("shots", 5)),
                   int(dist.get("queries", 10)),
                   int(meta["output"]["size"]) if kind == "classification" else None)


@dataclass
class Harvest:
    """What a harvest kept, and a count of everything it did not keep, by reason."""

    tasks: list[dict[str, Any]] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    examples: dict[str, str] = field(default_factory=dict)  # reason -> one file it happened to

    def skip(self, reason: str, where: str) -> None:
        self.skipped[reason] += 1
        self.examples.setdefault(reason, where)


def _episode_files(source: Path, harvest: Harvest) -> Iterator[tuple[str, str, bytes]]:
    """(device, file name, bytes) of every episode file in a state directory or tarball."""
    if source.is_dir():
        folder = source / "episodes"
        if folder.is_symlink():  # never followed out of the tree it was given
            harvest.skip("not_regular", str(folder))
            return
        folder = folder if folder.is_dir() else source
        for path in sorted(folder.iterdir()):
            if path.suffix != ".json":
                harvest.skip("not_an_episode_file", str(path))
            elif path.is_symlink() or not path.is_file():
                harvest.skip("not_regular", str(path))
            elif path.stat().st_size > MAX_EPISODE_BYTES:
                harvest.skip("too_large", str(path))
            else:
                yield str(source), path.name, path.read_bytes()
        return
    try:
        archive = tarfile.open(source, "r:*")  # noqa: SIM115 - closed by the with below
    except (OSError, tarfile.TarError) as exc:
        harvest.skip("unreadable_source", f"{source}: {exc}")
        return
    with archive:
        try:
            for member in archive:
                parts = Path(member.name).parts
                if "episodes" not in parts[:-1]:
                    continue
                where = f"{source}:{member.name}"
                if not member.name.endswith(".json"):
                    harvest.skip("not_an_episode_file", where)
                elif not member.isfile():
                    harvest.skip("not_regular", where)
                elif member.size > MAX_EPISODE_BYTES:
                    harvest.skip("too_large", where)
                else:
                    device = str(Path(*parts[:parts.index("episodes")])) or "."
                    yield f"{source}:{device}", parts[-1], archive.extractfile(member).read()
        except (OSError, tarfile.TarError, EOFError) as exc:  # a truncated archive ends here
            harvest.skip("truncated_source", f"{source}: {exc}")


def _task_rows(episode: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    parts = [p for p in (episode["support"], episode["holdout"], episode["after"]) if p is not None]
    parts = [p for p in parts if len(p[1])]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _row_keys(x: np.ndarray, y: np.ndarray) -> set[bytes]:
    """Rows rounded to float32, so the same row written by two paths compares equal."""
    rows = np.concatenate([x, y[:, None]], axis=1).astype(np.float32)
    return {r.tobytes() for r in rows}


def _fits(x: np.ndarray, y: np.ndarray, shape: TaskShape) -> str | None:
    """Why the rows cannot make a task of ``shape``; None when they can."""
    if x.shape[1] != shape.features:
        return "wrong_features"
    if shape.kind == "regression":
        return None if len(y) >= shape.min_rows else "too_small"
    if not np.all(y == np.round(y)) or y.min() < 0 or y.max() >= (shape.classes or 0):
        return "invalid_labels"
    counts = np.bincount(y.astype(int), minlength=shape.classes)
    return None if counts.min() >= shape.shots + shape.queries else "too_small"


def harvest(sources: list[Path], shape: TaskShape, per_stream_cap: int = 200,
            overlap: float = 0.5, accepted_only: bool = False,
            include_suspect: bool = False) -> tuple[Harvest, list]:
    """Read every episode, keep one task per regime, and cap each device's stream.

    Two episodes whose rows overlap by more than ``overlap`` (of the smaller one) are the same
    regime seen twice (a refinement, a copy of the same state directory): the larger is kept.
    Returns the harvest and the kept rows, in the order of ``harvest.tasks``.
    """
    if not sources:
        raise HarvestError("no state directories or tarballs given")
    missing = [str(s) for s in sources if not s.exists()]
    if missing:
        raise HarvestError(f"{missing[0]}: no such state directory or tarball")
    out = Harvest()
    candidates: list[tuple[dict[str, Any], np.ndarray, np.ndarray, set[bytes]]] = []
    for source in sources:
        for device, name, data in _episode_files(Path(source), out):
            where = f"{device}/{name}"
            if len(data) == 0:
                out.skip("empty", where)
                continue
            try:
                candidate = _candidate(device, name, data, shape, accepted_only, include_suspect)
            except EpisodeError as exc:
                out.skip("malformed", f"{where}: {exc}")
                continue
            except Exception as exc:  # noqa: BLE001 - one hostile file never ends a harvest
                out.skip("unreadable_episode", f"{where}: {type(exc).__name__}: {exc}"[:500])
                continue
            if isinstance(candidate, str):
                out.skip(candidate, where)
                continue
            candidates.append(candidate)
    kept = _drop_overlaps(candidates, overlap, out)
    kept = _cap(kept, per_stream_cap, out)
    kept.sort(key=lambda c: (c[0]["source"], c[0]["stream"], c[0]["time"]))
    out.tasks = [c[0] for c in kept]
    return out, [(c[1], c[2]) for c in kept]


def _candidate(device: str, name: str, data: bytes, shape: TaskShape, accepted_only: bool,
               include_suspect: bool) -> tuple | str:
    """One episode file as a task candidate, or the reason it is skipped."""
    episode = parse_episode(data)
    if accepted_only and episode["result"] != "accepted":
        return f"result_{episode['result']}"
    if episode.get("reason") in SUSPECT and not include_suspect:
        return f"suspect_{episode['reason']}"
    if not any(p is not None and len(p[1]) for p in (episode["support"], episode["holdout"],
                                                      episode["after"])):
        return "no_rows"
    x, y = _task_rows(episode)
    why = _fits(x, y, shape)
    if why:
        return why
    info = {"source": device, "episode_file": name, "stream": episode["stream"],
            "time": float(episode["time"]), "trigger": episode.get("trigger"),
            "result": episode["result"], "rows": int(len(y)),
            "after_rows": 0 if episode["after"] is None else int(len(episode["after"][1])),
            "bundle": episode.get("bundle") or {}}
    return info, x, y, _row_keys(x, y)


def _drop_overlaps(candidates: list, overlap: float, out: Harvest) -> list:
    """Largest first: a candidate that shares more than ``overlap`` of its rows with one kept
    already is a duplicate."""
    kept: list = []
    owner: dict[bytes, int] = {}
    for cand in sorted(candidates, key=lambda c: -len(c[3])):
        shared: dict[int, int] = defaultdict(int)
        for key in cand[3]:
            if key in owner:
                shared[owner[key]] += 1
        if shared and max(shared.values()) > overlap * len(cand[3]):
            out.skip("duplicate", f"{cand[0]['source']}/{cand[0]['episode_file']}")
            continue
        for key in cand[3]:
            owner.setdefault(key, len(kept))
        kept.append(cand)
    return kept


def _cap(kept: list, cap: int, out: Harvest) -> list:
    """At most ``cap`` tasks per (device, stream), spread evenly over its time span."""
    groups: dict[tuple[str, str], list] = defaultdict(list)
    for cand in kept:
        groups[(cand[0]["source"], cand[0]["stream"])].append(cand)
    result = []
    for group in groups.values():
        group.sort(key=lambda c: c[0]["time"])
        if len(group) > cap:
            picks = set(np.linspace(0, len(group) - 1, cap).round().astype(int).tolist())
            for i, cand in enumerate(group):
                if i not in picks:
                    out.skip("stream_cap", f"{cand[0]['source']}/{cand[0]['episode_file']}")
            group = [c for i, c in enumerate(group) if i in picks]
        result.extend(group)
    return result


def write_task_folder(out_dir: Path, result: Harvest, rows: list, shape: TaskShape,
                      bundle: dict[str, Any]) -> Path:
    """One ``task-NNNNN.npz`` (arrays X, y) per task and ``manifest.json`` beside them."""
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise HarvestError(f"{out_dir}: not empty; harvest into a new folder")
    if not rows:
        raise HarvestError(f"no usable tasks ({_summary(result)})")
    out_dir.mkdir(parents=True, exist_ok=True)
    for i, ((x, y), info) in enumerate(zip(rows, result.tasks, strict=True), start=1):
        info["file"] = f"task-{i:05d}.npz"
        y = y.astype(np.int64) if shape.kind == "classification" else y
        with (out_dir / info["file"]).open("wb") as fh:
            np.savez(fh, X=x, y=y)
    manifest = {"created": time.time(), "kind": shape.kind, "features": shape.features,
                "shots": shape.shots, "queries": shape.queries, "bundle": bundle,
                "tasks": result.tasks, "skipped": dict(result.skipped),
                "skipped_examples": result.examples}
    atomic_write(out_dir / "manifest.json", json.dumps(manifest, indent=2, default=float).encode())
    return out_dir


def _summary(result: Harvest) -> str:
    if not result.skipped:
        return "nothing skipped"
    return "skipped: " + ", ".join(f"{n} {reason}" for reason, n in sorted(result.skipped.items()))
