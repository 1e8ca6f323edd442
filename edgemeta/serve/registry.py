"""Versioned model store: atomic commits, verified loads, retention and rollback.

Layout (DESIGN.md): ``models/v000001/{model.onnx,manifest.json}`` and ``models/CURRENT``. A version
directory appears only by ``rename`` of a fully written and fsynced temp directory, and CURRENT is
replaced the same way, so a crash at any point leaves either the old or the new state, never half
of one. Leftover temp directories from a crash are removed when the registry is opened.

>>> import tempfile
>>> reg = Registry(tempfile.mkdtemp())
>>> reg.commit(b"model-bytes", source="meta-init").version
1
>>> reg.current_version()
1
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edgemeta.fsio import atomic_write, fsync_dir, write_durable

log = logging.getLogger("edgemeta.registry")

SOURCES = ("meta-init", "initial", "drift", "refine", "manual", "rollback")
_VERSION_DIR = re.compile(r"^v(\d{6})$")


class RegistryError(RuntimeError):
    """A version that cannot be served; the message names the version and the file."""


@dataclass
class Manifest:
    version: int
    parent: int | None
    source: str
    created: float
    sha256: str
    holdout: dict[str, Any] = field(default_factory=dict)
    support_size: int | None = None
    stream: str | None = None
    note: str | None = None

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Manifest:
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**known)


class Registry:
    """The ``models/`` directory of one daemon's state directory."""

    def __init__(self, state_dir: str | Path, keep: int = 10):
        self.state_dir = Path(state_dir)
        self.keep = keep
        self.root = self.state_dir / "models"
        self.root.mkdir(parents=True, exist_ok=True)
        self.cleanup_temp()

    # -- reading -------------------------------------------------------------------------------
    def path(self, version: int) -> Path:
        return self.root / f"v{version:06d}"

    def versions(self) -> list[int]:
        found = (_VERSION_DIR.match(p.name) for p in self.root.iterdir() if p.is_dir())
        return sorted(int(m.group(1)) for m in found if m)

    def manifest(self, version: int) -> Manifest:
        path = self.path(version) / "manifest.json"
        try:
            return Manifest.from_json(json.loads(path.read_text()))
        except FileNotFoundError as exc:
            raise RegistryError(f"version {version}: {path} is missing") from exc
        except (json.JSONDecodeError, UnicodeDecodeError, TypeError) as exc:
            raise RegistryError(f"version {version}: {path} is not a valid manifest: {exc}") from exc

    def load(self, version: int) -> tuple[bytes, Manifest]:
        """Model bytes and manifest of ``version``, refused unless the checksum matches."""
        manifest = self.manifest(version)
        model_path = self.path(version) / "model.onnx"
        try:
            data = model_path.read_bytes()
        except FileNotFoundError as exc:
            raise RegistryError(f"version {version}: {model_path} is missing") from exc
        digest = hashlib.sha256(data).hexdigest()
        if digest != manifest.sha256:
            raise RegistryError(f"version {version}: {model_path} checksum mismatch (manifest "
                                f"{manifest.sha256[:12]}..., file {digest[:12]}...)")
        return data, manifest

    def current_version(self) -> int | None:
        """The version CURRENT names, or None when CURRENT is missing or unreadable."""
        try:
            text = (self.root / "CURRENT").read_text().strip()
        except FileNotFoundError:
            return None
        m = _VERSION_DIR.match(text)
        return int(m.group(1)) if m else None

    def load_serving(self) -> tuple[bytes, Manifest, list[str]]:
        """What to serve: CURRENT if it verifies, else the newest version that does.

        Returns the problems met on the way so the caller can log and count them; raises only when
        no version at all can be served.
        """
        problems: list[str] = []
        current = self.current_version()
        if current is None:
            problems.append(f"{self.root / 'CURRENT'} is missing or unreadable")
        candidates = ([current] if current is not None else []) + [
            v for v in reversed(self.versions()) if v != current]
        for version in candidates:
            try:
                data, manifest = self.load(version)
            except RegistryError as exc:
                problems.append(str(exc))
                continue
            if version != current:
                log.warning("serving last good version %d instead: %s", version, "; ".join(problems))
                self._set_current(version)
            return data, manifest, problems
        raise RegistryError(f"{self.root}: no version can be served: {'; '.join(problems) or 'empty'}")

    def list(self) -> list[dict[str, Any]]:
        current = self.current_version()
        rows = []
        for v in self.versions():
            try:
                self.load(v)
                row = {**asdict(self.manifest(v)), "ok": True}
            except RegistryError as exc:
                row = {"version": v, "ok": False, "error": str(exc)}
            row["current"] = v == current
            rows.append(row)
        return rows

    # -- writing -------------------------------------------------------------------------------
    def cleanup_temp(self) -> list[Path]:
        """Remove temp directories and files a crash left between write and rename."""
        removed = []
        for p in self.root.iterdir():
            if p.name.startswith(".tmp-") or (p.name.startswith(".CURRENT.")):
                shutil.rmtree(p) if p.is_dir() else p.unlink()
                removed.append(p)
        if removed:
            log.warning("removed %d leftover temp entries from an interrupted commit", len(removed))
        return removed

    def commit(self, model: bytes, source: str, parent: int | None = None,
               holdout: dict[str, Any] | None = None, support_size: int | None = None,
               stream: str | None = None, note: str | None = None, activate: bool = True) -> Manifest:
        """Write a new version atomically and (by default) make it CURRENT; then apply retention."""
        if source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
        existing = self.versions()
        version = (existing[-1] + 1) if existing else 1
        if parent is None and activate:
            parent = self.current_version()
        manifest = Manifest(version, parent, source, time.time(), hashlib.sha256(model).hexdigest(),
                            holdout or {}, support_size, stream, note)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-v{version:06d}-", dir=self.root))
        try:
            write_durable(tmp / "model.onnx", model)
            write_durable(tmp / "manifest.json", json.dumps(asdict(manifest), indent=2).encode())
            fsync_dir(tmp)
            os.rename(tmp, self.path(version))
            fsync_dir(self.root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if activate:
            self._set_current(version)
        self.apply_retention()
        return manifest

    def _set_current(self, version: int) -> None:
        atomic_write(self.root / "CURRENT", f"v{version:06d}\n".encode())

    def activate(self, version: int) -> Manifest:
        """Point CURRENT at an existing, verified version."""
        _, manifest = self.load(version)
        self._set_current(version)
        return manifest

    def apply_retention(self) -> list[int]:
        """Keep the newest ``keep`` versions, version 1 (the meta-init) and CURRENT."""
        versions = self.versions()
        protected = set(versions[-self.keep:]) | {1}
        current = self.current_version()
        if current is not None:
            protected.add(current)
        removed = [v for v in versions if v not in protected]
        for v in removed:
            shutil.rmtree(self.path(v))
        return removed

    def rollback(self, to: int | None = None, note: str | None = None) -> Manifest:
        """Serve an earlier version again, recorded as a new version with source ``rollback``.

        Without ``to`` the target is the parent of the serving version, so repeated rollbacks walk
        back along the lineage.
        """
        current = self.current_version()
        if to is None:
            if current is None:
                raise RegistryError("nothing to roll back: CURRENT is missing")
            serving = current
            while (m := self.manifest(serving)).source == "rollback" and m.parent is not None:
                serving = m.parent  # a rollback version serves its parent's model
            to = self.manifest(serving).parent
            if to is None:
                raise RegistryError(f"version {current} serves v{serving}, which has no parent "
                                    "to roll back to")
        if to not in self.versions():
            raise RegistryError(f"version {to} does not exist (have {self.versions()})")
        data, target = self.load(to)
        return self.commit(data, source="rollback", parent=to, holdout=target.holdout,
                           support_size=target.support_size, stream=target.stream,
                           note=note or f"rollback from v{current} to v{to}")

    def init_from_bundle(self, bundle_dir: str | Path) -> Manifest:
        """Make sure the bundle's meta-initialization is in the registry.

        Version 1 is the first bundle's. When a different bundle is shipped later (an OTA update),
        its meta-initialization is committed as a new ``meta-init`` version and served: versions
        adapted from the old initialization stay in the registry for rollback but are not served.
        """
        bundle_dir = Path(bundle_dir)
        data = (bundle_dir / "model.onnx").read_bytes()
        meta = json.loads((bundle_dir / "bundle.json").read_text())
        digest = hashlib.sha256(data).hexdigest()
        if meta.get("sha256", {}).get("model.onnx") != digest:
            raise RegistryError(f"{bundle_dir / 'model.onnx'}: checksum does not match bundle.json")
        inits = []
        for v in self.versions():
            try:
                m = self.manifest(v)
            except RegistryError:
                continue
            if m.source == "meta-init":
                inits.append(m)
        if inits and inits[-1].sha256 == digest:
            return inits[-1]
        if inits:
            log.warning("a new bundle was shipped (%s): serving its meta-initialization", bundle_dir)
        return self.commit(data, source="meta-init", parent=None if not inits else
                           self.current_version(), note=f"bundle {bundle_dir} sha256 {digest}")
