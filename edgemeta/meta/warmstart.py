"""``train --init``: continue meta-training from an existing bundle on new tasks, with replay.

Why this is more than loading weights: a bundle's weights only mean something in the feature
and target scale it was meta-trained in, so the new tasks are put into the parent's scale (not
fitted afresh), and the parent's distribution is replayed in every meta-batch so the new base
does not forget it. The new bundle names its parent and where its tasks came from.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from edgemeta.meta.bundle import Bundle
from edgemeta.meta.tasks import MixedTasks, StandardizedTargets, TaskDataError, build_tasks


def new_tasks_spec(parent: Bundle, spec: dict[str, Any]) -> dict[str, Any]:
    """``spec`` for the new tasks, in the parent's feature scale where the distribution has one
    of its own (a task folder); the identity when the parent had none."""
    spec = dict(spec)
    if spec.get("name") == "folder":
        features = int(parent.meta["input"]["features"])
        spec["normalization"] = parent.meta["input"].get("normalization") or {
            "mean": [0.0] * features, "std": [1.0] * features}
    return spec


def warm_start_tasks(parent: Bundle, spec: dict[str, Any], replay_ratio: float):
    """The distribution to continue on: the new tasks (and the parent's, replayed), standardized
    with the parent's target scaling."""
    new = build_tasks(new_tasks_spec(parent, spec))
    for split in ("train", "val"):
        if not getattr(new, "has", lambda _: True)(split):
            raise TaskDataError(f"{spec.get('path')}: the {split} split of the new tasks is empty; "
                                "add task files or change --val-fraction/--test-fraction")
    meta = parent.meta
    if new.kind != meta["task"]["kind"]:
        raise TaskDataError(f"--init: the bundle is {meta['task']['kind']}, the new tasks {new.kind}")
    for attr, want in (("in_features", int(meta["input"]["features"])),
                       ("out_features", int(meta["output"]["size"]))):
        if getattr(new, attr) != want:
            raise TaskDataError(f"--init: the new tasks have {attr}={getattr(new, attr)}, the "
                                f"bundle {want}")
    tasks = new
    if replay_ratio > 0:
        try:
            replay = build_tasks(meta["task"]["distribution"])
        except TaskDataError as exc:
            raise TaskDataError(f"--init: cannot rebuild the bundle's own task distribution to "
                                f"replay it ({exc}); make it available or pass --replay 0") from exc
        tasks = MixedTasks(new, replay, replay_ratio)
    scaling = meta["output"].get("scaling")
    if scaling:
        tasks = StandardizedTargets(tasks, scaling["mean"], scaling["std"])
    return tasks


def initial_params(parent: Bundle) -> dict[str, torch.Tensor]:
    """The parent's meta-initialization (and Meta-SGD's learned step sizes) as torch tensors."""
    return {n: torch.from_numpy(w.copy()) for n, w in parent.weights.items()}


def lineage(parent: Bundle, spec: dict[str, Any], replay_ratio: float) -> dict[str, Any]:
    """What the new bundle records of where it came from."""
    sums = parent.meta.get("sha256") or {}
    record: dict[str, Any] = {
        "parent": {"path": str(parent.path), "weights_sha256": sums.get("weights.safetensors"),
                   "algorithm": parent.meta.get("algorithm"),
                   "lineage": parent.meta.get("lineage")},
        "new_tasks": spec, "replay_ratio": replay_ratio,
        "replayed": parent.meta["task"]["distribution"] if replay_ratio > 0 else None}
    manifest = Path(spec.get("path", "")) / "manifest.json" if spec.get("name") == "folder" else None
    if manifest is not None and manifest.is_file():
        try:
            harvested = json.loads(manifest.read_text())
            tasks = harvested.get("tasks") or []
            record["harvest"] = {"tasks": len(tasks),
                                 "sources": sorted({t.get("source") for t in tasks}),
                                 "bundles": sorted({(t.get("bundle") or {}).get("weights_sha256") or ""
                                                    for t in tasks})}
        except ValueError:
            record["harvest"] = {"manifest": "unreadable"}
    return record
