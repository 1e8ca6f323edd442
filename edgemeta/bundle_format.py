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


def _sha256(path: Path) -> str:
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
    def classes(self) -> int | None:
        return self.outputs if self.kind == "classification" else None


def read_bundle_info(path: str | Path) -> BundleInfo:
    path = Path(path)
    meta_path = path / "bundle.json"
    try:
        meta = json.loads(meta_path.read_text())
    except FileNotFoundError as exc:
        raise BundleFormatError(f"{meta_path}: missing (is {path} a bundle?)") from exc
    except (OSError, ValueError) as exc:
        raise BundleFormatError(f"{meta_path}: cannot read: {exc}") from exc
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        raise BundleFormatError(f"{meta_path}: format_version "
                                f"{meta.get('format_version') if isinstance(meta, dict) else None!r},"
                                f" this edgemeta reads {FORMAT_VERSION}")
    sums = meta.get("sha256") or {}
    for name in FILES:
        file = path / name
        if not file.is_file():
            raise BundleFormatError(f"{file}: missing from the bundle")
        if _sha256(file) != sums.get(name):
            raise BundleFormatError(f"{file}: checksum does not match bundle.json: the file is "
                                    "truncated or was modified")
    try:
        kind = meta["task"]["kind"]
        features = int(meta["input"]["features"])
        outputs = int(meta["output"]["size"])
        norm = meta["input"].get("normalization") or {}
        mean = np.asarray(norm.get("mean", 0.0), dtype=np.float32)
        std = np.asarray(norm.get("std", 1.0), dtype=np.float32)
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
