"""Versioned model store: atomic commits, verified loads, retention and rollback.

Layout (docs/design.md): ``models/v000001/{model.onnx,manifest.json}``, and one pointer per lineage:
``models/CURRENT.<lineage>`` names the version a lineage (a stream, or streams that share one
model) serves. Version numbers are global, so a version names one model whatever its lineage, and
every lineage starts from the shared meta-initialization. ``models/CURRENT`` is the shared pointer
of state directories from before lineages: a lineage without a pointer of its own starts from it,
which is how an existing state directory is migrated (nothing is moved or deleted).

A version directory appears only by ``rename`` of a fully written and fsynced temp directory, and
every pointer is replaced the same way, so a crash at any point leaves either the old or the new
state, never half of one. Leftover temp directories from a crash are removed when the daemon
opens the registry as its writer. Every other reader (``models list``, ``status``, a harvest)
opens it with ``writable=False``: no side effect at all, so it can never sweep away the temp
directory of a commit the running daemon is writing.

>>> import tempfile
>>> reg = Registry(tempfile.mkdtemp())
>>> reg.commit(b"model-bytes", source="meta-init").version
1
>>> reg.current_version()
1
>>> reg.commit(b"adapted", source="drift", lineage="pump").parent
1
>>> reg.current_version("pump"), reg.current_version()
(2, 1)
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

SOURCES = ("meta-init", "initial", "drift", "retry", "refine", "continual", "recall", "manual",
           "rollback")
_VERSION_DIR = re.compile(r"^v(\d{6})$")
_LINEAGE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


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
    lineage: str | None = None  # None: shared (a meta-initialization, or from before lineages)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Manifest:
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**known)


def _dir_mode() -> int:
    """What ``mkdir`` would give under this process's umask (``mkdtemp`` gives 0700, which
    kept the operators' group out of committed versions)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o777 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o755


class Registry:
    """The ``models/`` directory of one daemon's state directory.

    ``writable=False`` opens it for reading only: nothing is created, swept or pruned, and every
    writing method raises :class:`RegistryError`.
    """

    def __init__(self, state_dir: str | Path, keep: int = 10, writable: bool = True):
        self.state_dir = Path(state_dir)
        self.keep = keep
        self.writable = writable
        self.root = self.state_dir / "models"
        if writable:
            self.root.mkdir(parents=True, exist_ok=True)
            self.cleanup_temp()
        elif not self.root.is_dir():
            raise RegistryError(f"{self.root}: no models directory")

    def _require_writable(self, what: str) -> None:
        if not self.writable:
            raise RegistryError(f"{self.root}: opened read-only, cannot {what} (the daemon is "
                                "the only writer of models/)")

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

    def pointer(self, lineage: str | None = None) -> Path:
        """The file naming the version ``lineage`` serves (None: the shared ``CURRENT``)."""
        if lineage is None:
            return self.root / "CURRENT"
        if not _LINEAGE.match(lineage):
            raise ValueError(f"lineage {lineage!r} must be 1-64 of A-Z a-z 0-9 _ . -")
        return self.root / f"CURRENT.{lineage}"

    def _read_pointer(self, path: Path) -> int | None:
        try:
            text = path.read_text().strip()
        except (FileNotFoundError, UnicodeDecodeError):
            return None
        m = _VERSION_DIR.match(text)
        return int(m.group(1)) if m else None

    def manifests(self) -> list[Manifest]:
        """The manifests that can be read, oldest first (a broken one is skipped here and
        reported by :meth:`list`)."""
        found = []
        for v in self.versions():
            try:
                found.append(self.manifest(v))
            except RegistryError:
                continue
        return found

    def current_version(self, lineage: str | None = None, inherit: bool = True) -> int | None:
        """The version ``lineage`` serves, or None when its pointer is missing or unreadable; a
        lineage that has no pointer yet inherits the shared ``CURRENT`` (unless ``inherit`` is
        False)."""
        own = self._read_pointer(self.pointer(lineage))
        if own is None and lineage is not None and inherit and not self.pointer(lineage).exists():
            return self._read_pointer(self.pointer(None))
        return own

    def lineages(self) -> list[str]:
        """The lineages that have a pointer of their own."""
        return sorted(p.name[len("CURRENT."):] for p in self.root.glob("CURRENT.*")
                      if _LINEAGE.match(p.name[len("CURRENT."):]))

    def load_serving(self, lineage: str | None = None) -> tuple[bytes, Manifest, list[str]]:
        """What to serve: the lineage's pointer if it verifies, else the newest version that does.

        Returns the problems met on the way so the caller can log and count them; raises only when
        no version at all can be served.
        """
        problems: list[str] = []
        current = self.current_version(lineage)
        if current is None:
            problems.append(f"{self.pointer(lineage)} is missing or unreadable")
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
                self._set_current(version, lineage)
            return data, manifest, problems
        raise RegistryError(f"{self.root}: no version can be served: {'; '.join(problems) or 'empty'}")

    def list(self, lineage: str | None = None) -> list[dict[str, Any]]:
        """Every version (or those of ``lineage`` and the shared ones), each with ``serving``: the
        lineages it serves, and ``current``: whether it serves (``lineage``, if given)."""
        pointers = {name: self.current_version(name) for name in self.lineages()}
        shared = self.current_version()
        mine = self.current_version(lineage) if lineage is not None else None
        rows = []
        for v in self.versions():
            try:
                self.load(v)
                row = {**asdict(self.manifest(v)), "ok": True}
            except RegistryError as exc:
                if not self.path(v).exists():
                    continue  # pruned by the daemon while we read: not broken, just gone
                row = {"version": v, "ok": False, "error": str(exc), "lineage": None}
            if lineage is not None and row.get("lineage") not in (None, lineage):
                continue
            row["serving"] = sorted(n for n, p in pointers.items() if p == v)
            row["current"] = (mine == v if lineage is not None
                              else v == shared or bool(row["serving"]))
            rows.append(row)
        return rows

    # -- writing -------------------------------------------------------------------------------
    def cleanup_temp(self) -> list[Path]:
        """Remove temp directories and files a crash left between write and rename."""
        self._require_writable("sweep temp directories")
        removed = []
        for p in self.root.iterdir():
            if p.name.startswith(".tmp-") or p.name.startswith(".CURRENT"):
                shutil.rmtree(p) if p.is_dir() else p.unlink()
                removed.append(p)
        if removed:
            log.warning("removed %d leftover temp entries from an interrupted commit", len(removed))
        return removed

    def commit(self, model: bytes, source: str, parent: int | None = None,
               holdout: dict[str, Any] | None = None, support_size: int | None = None,
               stream: str | None = None, note: str | None = None, activate: bool = True,
               lineage: str | None = None) -> Manifest:
        """Write a new version of ``lineage`` (None: shared) atomically and (by default) make it
        the lineage's serving version; then apply retention."""
        self._require_writable("commit")
        if source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
        pointer = self.pointer(lineage)  # refuses a bad lineage name before anything is written
        existing = self.versions()
        version = (existing[-1] + 1) if existing else 1
        if parent is None and activate:
            parent = self.current_version(lineage)
        manifest = Manifest(version, parent, source, time.time(), hashlib.sha256(model).hexdigest(),
                            holdout or {}, support_size, stream, note, lineage)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-v{version:06d}-", dir=self.root))
        try:
            os.chmod(tmp, _dir_mode())
            write_durable(tmp / "model.onnx", model)
            write_durable(tmp / "manifest.json", json.dumps(asdict(manifest), indent=2).encode())
            fsync_dir(tmp)
            os.rename(tmp, self.path(version))
            fsync_dir(self.root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if activate:
            atomic_write(pointer, f"v{version:06d}\n".encode())
        self.apply_retention()
        return manifest

    def _set_current(self, version: int, lineage: str | None = None) -> None:
        self._require_writable("move a pointer")
        atomic_write(self.pointer(lineage), f"v{version:06d}\n".encode())

    def activate(self, version: int, lineage: str | None = None) -> Manifest:
        """Point ``lineage`` (None: the shared CURRENT) at an existing, verified version."""
        _, manifest = self.load(version)
        self._set_current(version, lineage)
        return manifest

    def apply_retention(self) -> list[int]:
        """Per lineage (and for the shared versions), keep the newest ``keep`` versions; always
        keep version 1, the newest meta-initialization and every version a pointer names.

        A version whose manifest cannot be read is listed as broken, never removed behind the
        operator's back."""
        self._require_writable("prune")
        by_lineage: dict[str | None, list[int]] = {}
        inits = []
        for m in self.manifests():
            by_lineage.setdefault(m.lineage, []).append(m.version)
            if m.source == "meta-init":
                inits.append(m.version)
        protected = {1, *inits[-1:]}
        for group in by_lineage.values():
            protected.update(group[-self.keep:])
        for name in [None, *self.lineages()]:
            current = self.current_version(name, inherit=False)
            if current is not None:
                protected.add(current)
        removed = [v for group in by_lineage.values() for v in group if v not in protected]
        for v in sorted(removed):
            # Out of sight first, in one rename: a reader never meets a half-deleted version.
            doomed = self.root / f".tmp-prune-v{v:06d}-{os.getpid()}"
            os.rename(self.path(v), doomed)
            shutil.rmtree(doomed)
        return sorted(removed)

    def rollback(self, to: int | None = None, note: str | None = None,
                 lineage: str | None = None) -> Manifest:
        """Serve an earlier version again on ``lineage``, recorded as a new version with source
        ``rollback``.

        Without ``to`` the target is the parent of the serving version, so repeated rollbacks walk
        back along the lineage.
        """
        current = self.current_version(lineage)
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
        if target.lineage not in (None, lineage):
            raise RegistryError(f"version {to} belongs to lineage {target.lineage!r}, not "
                                f"{lineage or 'the shared CURRENT'!r}: a rollback stays within "
                                "its lineage")
        return self.commit(data, source="rollback", parent=to, holdout=target.holdout,
                           support_size=target.support_size, stream=target.stream,
                           note=note or f"rollback from v{current} to v{to}", lineage=lineage)

    def init_from_bundle(self, bundle_dir: str | Path) -> Manifest:
        """Make sure the bundle's meta-initialization is in the registry.

        Version 1 is the first bundle's. When a different bundle is shipped later (an OTA update),
        its meta-initialization is committed as a new ``meta-init`` version and every lineage
        serves it: versions adapted from the old initialization stay in the registry for rollback
        but are not served.
        """
        bundle_dir = Path(bundle_dir)
        data = (bundle_dir / "model.onnx").read_bytes()
        meta = json.loads((bundle_dir / "bundle.json").read_text())
        digest = hashlib.sha256(data).hexdigest()
        if meta.get("sha256", {}).get("model.onnx") != digest:
            raise RegistryError(f"{bundle_dir / 'model.onnx'}: checksum does not match bundle.json")
        inits = [m for m in self.manifests() if m.source == "meta-init"]
        if inits and inits[-1].sha256 == digest:
            return inits[-1]
        if inits:
            log.warning("a new bundle was shipped (%s): serving its meta-initialization", bundle_dir)
        manifest = self.commit(data, source="meta-init", parent=None if not inits else
                               self.current_version(), note=f"bundle {bundle_dir} sha256 {digest}")
        for name in self.lineages():
            self._set_current(manifest.version, name)
        return manifest
