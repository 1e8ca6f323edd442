"""What the serving side reads from a bundle, torch-free, with every checksum verified first.

``meta/bundle.py`` writes bundles and reads them for learning (torch); the daemon needs much less:
the task kind, the input width and normalization, the output size, the targets it was trained on,
the ONNX template and the names of the parameters that adapt. A truncated or modified bundle file
is refused with its name before anything is served from it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

FORMAT_VERSION = 1
FILES = ("weights.safetensors", "model.onnx")
LR_PREFIX = "metasgd_lr."  # Meta-SGD's learned step sizes live beside the weights


class BundleFormatError(ValueError):
    """A bundle the daemon cannot serve from; the message names the file and what is wrong."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class BundleInfo:
    path: Path
    meta: dict[str, Any]
    kind: str
    features: int
    outputs: int
    mean: np.ndarray
    std: np.ndarray
    target_range: tuple[float, float] | None
    parameter_names: tuple[str, ...]

    @property
    def support_rows(self) -> int | None:
        """Rows of one meta-training support set (K, or K per class times the classes), if the
        bundle records its task distribution: what an adaptation should see."""
        return _task_rows((self.meta.get("task") or {}).get("distribution") or {}, "shots",
                          self.outputs)

    @property
    def query_rows(self) -> int | None:
        """Rows of one meta-training query set, counted like :attr:`support_rows`."""
        return _task_rows((self.meta.get("task") or {}).get("distribution") or {}, "queries",
                          self.outputs)

    @property
    def classes(self) -> int | None:
        return self.outputs if self.kind == "classification" else None

    def normalize(self, x: np.ndarray) -> np.ndarray:
        """Raw feature rows as the model takes them (the bundle's feature normalization)."""
        return normalize(x, self.mean, self.std)


def feature_scale(meta: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """The feature normalization a bundle was meta-trained with: (mean, std), float32."""
    norm = meta["input"].get("normalization") or {}
    return (np.asarray(norm.get("mean", 0.0), dtype=np.float32),
            np.asarray(norm.get("std", 1.0), dtype=np.float32))


def normalize(x: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """The one place raw rows become the model's inputs, for serving and for learning alike: a
    second copy that drifted from it would adapt on rows scaled unlike those served."""
    return ((np.asarray(x) - mean) / std).astype(np.float32)


def _task_rows(spec: dict[str, Any], key: str, outputs: int) -> int | None:
    """``shots`` or ``queries`` of a task distribution's ``describe()`` as rows per task: the
    N-way distributions (``array``; ``folder`` for classification) count them per class."""
    if spec.get("name") == "mixed":  # a warm start's new family sets the shape
        spec = spec.get("new") or {}
    n = spec.get(key)
    if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
        return None
    per_class = spec.get("name") == "array" or (spec.get("name") == "folder"
                                                and spec.get("kind") == "classification")
    ways = spec.get("n_way", outputs)
    return n * int(ways) if per_class and isinstance(ways, int) else n


def read_verified_meta(path: Path) -> dict[str, Any]:
    """bundle.json, once its format version and the checksum of every other file check out.

    The one check both sides make: ``meta/bundle.py`` before it loads weights for learning, the
    daemon before it serves.
    """
    meta_path = path / "bundle.json"
    if not meta_path.is_file():
        raise BundleFormatError(f"{path}: not a bundle (no bundle.json)")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as exc:
        raise BundleFormatError(f"{meta_path}: not valid JSON: {exc}") from exc
    version = meta.get("format_version") if isinstance(meta, dict) else None
    if version != FORMAT_VERSION:
        raise BundleFormatError(f"{meta_path}: format_version {version!r}, this edgemeta reads "
                                f"{FORMAT_VERSION}")
    sums = meta.get("sha256") or {}
    for name in FILES:
        file = path / name
        if not file.is_file():
            raise BundleFormatError(f"{file}: missing from the bundle")
        if name not in sums:
            raise BundleFormatError(f"{meta_path}: no sha256 recorded for {name}")
        actual = sha256_file(file)
        if actual != sums[name]:
            raise BundleFormatError(f"{file}: checksum mismatch (recorded {sums[name][:12]}..., "
                                    f"found {actual[:12]}...): the file is truncated or was "
                                    "modified")
    return meta


def read_bundle_info(path: str | Path) -> BundleInfo:
    path = Path(path)
    meta = read_verified_meta(path)
    meta_path = path / "bundle.json"
    try:
        kind = meta["task"]["kind"]
        features = int(meta["input"]["features"])
        outputs = int(meta["output"]["size"])
        mean, std = feature_scale(meta)
        rng = meta["output"].get("target_range")
        target_range = (float(rng[0]), float(rng[1])) if rng else None
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise BundleFormatError(f"{meta_path}: missing or invalid field: {exc!r}") from exc
    if kind not in ("regression", "classification"):
        raise BundleFormatError(f"{meta_path}: task.kind {kind!r} is not regression or "
                                "classification")
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path / "weights.safetensors"), framework="np") as fh:
            names = tuple(k for k in fh.keys() if not k.startswith(LR_PREFIX))  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as exc:
        raise BundleFormatError(f"{path / 'weights.safetensors'}: not readable: {exc}") from exc
    return BundleInfo(path, meta, kind, features, outputs, mean, std, target_range, names)
