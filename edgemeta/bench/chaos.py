"""``edgemeta bench chaos``: the real daemon against hostile inputs, kills, a full disk, a tampered
registry and poisoned labels, with the outcome counted from the outside.

The daemon runs as ``edgemeta run`` in a child process. Malformed files of every known kind (and
random mutations of valid ones) are dropped into its inbox among valid files and delayed labels,
hostile triggers into ``triggers/``; at random moments the daemon or its worker is ``kill -9``-ed
(the daemon is then started again, which is not a "restart needed": those count only when the
daemon exits on its own). While the daemon is down once, the registry is tampered with. The state
directory sits on a small tmpfs where the machine allows a mount, and the disk is filled for a
while. Finally, poisoned label bursts (random, scaled, constant, shuffled) follow manual adapt
triggers. Targets are all 0: crashes, restarts needed, inputs lost, valid inputs without
predictions, registry invalid after a kill, poisoned candidates accepted.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import platform
import random
import subprocess
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from edgemeta.testing.harness import (
    DaemonProcess,
    cached_bundle,
    drop,
    free_port,
    sine_csv,
    write_config,
)


def _npz(arrays: dict[str, Any]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _huge_header_npz() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for key in ("id", "x"):
            body = io.BytesIO()
            np.lib.format.write_array_header_1_0(
                body, {"descr": "<f8", "fortran_order": False, "shape": (10**15,)})
            zf.writestr(f"{key}.npy", body.getvalue() + b"\0" * 64)
    return buf.getvalue()


def _zip_bomb(size: int) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for key in ("id", "x"):
            body = io.BytesIO()
            np.lib.format.write_array(body, np.zeros(size // 8))
            zf.writestr(f"{key}.npy", body.getvalue())
    return buf.getvalue()


def malformed(kind: str, rng: random.Random) -> tuple[str, bytes]:
    """One malformed input of ``kind``: (file name suffix, bytes)."""
    n = rng.randint(1, 5)
    try:
        make = _MALFORMED[kind]
    except KeyError:
        raise ValueError(kind) from None
    return make(n, rng)


def _npy_as_npz(n: int, rng: random.Random) -> tuple[str, bytes]:
    buf = io.BytesIO()
    np.save(buf, np.arange(n))
    return ".npz", buf.getvalue()


def _mutated(n: int, rng: random.Random) -> tuple[str, bytes]:
    base = bytearray(b"id,x,y\n1,0.5,1.0\n2,0.25,0.5\n")
    for _ in range(n):
        base[rng.randrange(len(base))] = rng.getrandbits(8)
    return rng.choice([".csv", ".jsonl", ".npz", ".labels.csv"]), bytes(base)


# Each kind: (the file name's suffix, its bytes) from a size jitter n and the rng.
_MALFORMED = {
    "long_field": lambda n, rng: (".csv", b"id,x,y\n1,0.5,\"" + b"9" * (140_000 + n) + b"\"\n"),
    "long_header": lambda n, rng: (".csv", b"x" * (140_000 + n) + b",y\n1,2\n"),
    "deep_json": lambda n, rng: (".jsonl", b'{"id": 1, "x": ' + b"[" * (100_000 + n) + b"\n"),
    "long_number": lambda n, rng: (
        ".jsonl", b'{"id": 1, "x": ' + b"7" * rng.choice([400, 5000]) + b', "y": 1}\n'),
    "npy_as_npz": _npy_as_npz,
    "npz_0d": lambda n, rng: (
        ".npz", _npz({"id": np.float64(1), "x": np.float64(0.5), "y": np.float64(1)})),
    "npz_huge_header": lambda n, rng: (".npz", _huge_header_npz()),
    "npz_bomb": lambda n, rng: (".npz", _zip_bomb(80 * 1024 * 1024)),
    "npz_object": lambda n, rng: (
        ".npz", _npz({"id": np.arange(2), "x": np.array(["a", "b"]), "y": np.zeros(2)})),
    "nan_rows": lambda n, rng: (".csv", b"id,x,y\n1,nan,1\n2,inf,2\n3,1e39,0\n4,0.5,0.1\n"),
    # valid: must be processed
    "bom": lambda n, rng: (".csv", b"\xef\xbb\xbfid,x,y\n1,0.5,0.2\n"),
    "binary": lambda n, rng: (".csv", bytes(rng.getrandbits(8) for _ in range(200))),
    "truncated": lambda n, rng: (".csv", b"id,x,y\n1,0.5,1.0\n2,0."),
    "wrong_columns": lambda n, rng: (".csv", b"id,z,y\n1,0.5,1.0\n"),
    "text": lambda n, rng: (".csv", b"id,x,y\n1,abc,1\n"),
    "empty": lambda n, rng: (".csv", b""),
    "labels_long_field": lambda n, rng: (
        ".labels.csv", b"id,label\n1,\"" + b"5" * 140_000 + b"\"\n"),
    "labels_garbage": lambda n, rng: (".labels.jsonl", b'{"id": [[[[' + b"]" * n + b"\n"),
    "mutated": _mutated,
}


KINDS = ("long_field", "long_header", "deep_json", "long_number", "npy_as_npz", "npz_0d",
         "npz_huge_header", "npz_bomb", "npz_object", "nan_rows", "bom", "binary", "truncated",
         "wrong_columns", "text", "empty", "labels_long_field", "labels_garbage", "mutated",
         "long_name", "directory", "fifo")
TRIGGER_KINDS = ("deep", "bigint", "nul", "long_name", "directory", "fifo", "unknown", "garbage")


def hostile_trigger(kind: str, directory: Path, i: int) -> None:
    if kind == "directory":
        (directory / f"adapt-dir{i}").mkdir()
    elif kind == "fifo":
        os.mkfifo(directory / f"reload-fifo{i}")
    else:
        name, body = {
            "deep": (f"adapt-deep{i}.json", b"[" * 60_000),
            "bigint": (f"rollback-big{i}.json", b'{"version": ' + b"9" * 4400 + b"}"),
            "nul": (f"adapt-nul{i}.json", b'{"support": "a\\u0000b"}'),
            "long_name": (f"rollback-{'r' * 230}{i}.json", b'{"version": 999999}'),
            "unknown": (f"explode{i}", b""),
            "garbage": (f"adapt-g{i}.json", bytes(range(256))),
        }[kind]
        drop(directory, name, body)


def _mean(values: list[float]) -> float:
    values = [v for v in values if np.isfinite(v)]
    return float(np.mean(values)) if values else float("nan")


def _mount_tmpfs(path: Path, size_mb: int) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(path)],
                          capture_output=True)
    return proc.returncode == 0


def _registry_valid(state: Path) -> tuple[bool, str]:
    """CURRENT names a version whose files verify; no version directory is half-written."""
    from edgemeta.serve.registry import Registry, RegistryError

    root = state / "models"
    try:
        current = (root / "CURRENT").read_text().strip()
    except OSError as exc:
        return False, f"CURRENT unreadable: {exc}"
    registry = Registry.__new__(Registry)  # read-only look: no temp clean-up, no mkdir
    registry.state_dir, registry.root, registry.keep = state, root, 10
    try:
        registry.load(int(current[1:]))
    except (RegistryError, ValueError) as exc:
        return False, str(exc)
    for version in registry.versions():
        if not (registry.path(version) / "manifest.json").is_file():
            return False, f"v{version} has no manifest"
    return True, ""


class Chaos:
    def __init__(self, out: Path, malformed_files: int, kills: int, poison_tries: int, seed: int,
                 bundle: Path | None = None):
        self.out = out
        self.bundle = bundle
        self.n_malformed = malformed_files
        self.n_kills = kills
        self.n_poison = poison_tries
        self.rng = random.Random(seed)
        self.nprng = np.random.default_rng(seed)
        self.work = Path(tempfile.mkdtemp(prefix="edgemeta-chaos-"))
        self.tmpfs = _mount_tmpfs(self.work / "disk", 512)
        self.state = (self.work / "disk" if self.tmpfs else self.work) / "state"
        self.sent: dict[str, str] = {}  # file name -> "valid" | "malformed" | "labels"
        self.valid_rows: dict[str, int] = {}
        self.truth: dict[str, np.ndarray] = {}  # valid file name -> its noise-free labels
        self.counts: dict[str, Any] = {"crashes": 0, "daemon_kills": 0, "worker_kills": 0,
                                       "registry_invalid_after_kill": 0, "registry_problems": []}
        self.file_no = 0

    # -- inputs ------------------------------------------------------------------------------
    def inbox(self) -> Path:
        return self.state / "inbox" / "sine"

    def inbox_empty(self) -> bool:
        return not any(not p.name.startswith(".") for p in self.inbox().iterdir())

    def send_valid(self, amp: float = 1.0, phase: float = 0.0, rows: int = 40,
                   labels: bool = True, stage: bool = False) -> str:
        self.file_no += 1
        name = f"v{self.file_no:06d}.csv"
        x = self.nprng.uniform(-5, 5, rows)
        self.truth[name] = amp * np.sin(x - phase)
        y = self.truth[name] + self.nprng.normal(0, 0.05, rows)
        drop(self.inbox(), f".staged-{name}" if stage else name,
             sine_csv([f"{name}-{i}" for i in range(rows)], x, y if labels else None))
        self.sent[name], self.valid_rows[name] = "valid", rows
        return name

    def send_malformed(self) -> None:
        self.file_no += 1
        kind = KINDS[self.file_no % len(KINDS)]
        base = f"m{self.file_no:06d}-{kind}"
        if kind == "directory":
            (self.inbox() / f"{base}.csv").mkdir()
            self.sent[f"{base}.csv"] = "malformed"
            return
        if kind == "fifo":
            os.mkfifo(self.inbox() / f"{base}.csv")
            self.sent[f"{base}.csv"] = "malformed"
            return
        if kind == "long_name":
            name = base + "n" * (250 - len(base)) + ".csv"
            drop(self.inbox(), name, b"id,x\n1,0.5\n")
            self.sent[name] = "valid_long_name"
            return
        suffix, data = malformed(kind, self.rng)
        drop(self.inbox(), base + suffix, data)
        self.sent[base + suffix] = "malformed"

    # -- daemon ------------------------------------------------------------------------------
    def check_alive(self, daemon: DaemonProcess) -> None:
        if not daemon.alive():
            self.counts["crashes"] += 1
            self.counts.setdefault("crash_logs", []).append(str(daemon.log_path))
            daemon.start()
            daemon.wait_ready()

    def kill(self, daemon: DaemonProcess) -> None:
        if self.rng.random() < 0.5:
            worker = daemon.worker_pid()
            if worker:
                try:
                    os.kill(worker, 9)
                    self.counts["worker_kills"] += 1
                    return
                except ProcessLookupError:
                    pass
        daemon.kill9()
        self.counts["daemon_kills"] += 1
        ok, problem = _registry_valid(self.state)
        if not ok:
            self.counts["registry_invalid_after_kill"] += 1
            self.counts["registry_problems"].append(problem)
        daemon.start()
        daemon.wait_ready()

    def tamper(self, daemon: DaemonProcess) -> dict[str, Any]:
        """A foreign model with a matching manifest checksum as CURRENT, then start."""
        import hashlib

        from onnx import TensorProto, helper, numpy_helper

        daemon.kill9()
        self.counts["daemon_kills"] += 1
        root = self.state / "models"
        versions = sorted(p for p in root.iterdir() if p.name.startswith("v"))
        w = numpy_helper.from_array(np.ones((1, 1), np.float32), "w")
        graph = helper.make_graph(
            [helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 1])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 1])], [w])
        foreign = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        data = foreign.SerializeToString()
        target = versions[-1]
        (target / "model.onnx").write_bytes(data)
        manifest = json.loads((target / "manifest.json").read_text())
        manifest["sha256"] = hashlib.sha256(data).hexdigest()
        (target / "manifest.json").write_text(json.dumps(manifest))
        (root / "CURRENT").write_text(target.name + "\n")
        daemon.start()
        daemon.wait_ready()
        served = daemon.status().get("version")
        return {"tampered_version": target.name, "served_version": served,
                "refused": served != int(target.name[1:])}

    def fill_disk(self, daemon: DaemonProcess, seconds: float) -> dict[str, Any]:
        if not self.tmpfs:
            return {"run": False, "why": "cannot mount a tmpfs here"}
        # Inputs written before the disk filled up arrive (a rename needs no space) while the
        # daemon cannot write their predictions.
        staged = []
        for _ in range(5):
            name = self.send_valid(stage=True)
            staged.append(name)
        filler = self.work / "disk" / "filler"
        with filler.open("wb") as fh:
            try:
                while True:
                    fh.write(b"\0" * (1 << 20))
            except OSError:
                pass
        for name in staged:
            os.rename(self.inbox() / f".staged-{name}", self.inbox() / name)
        names = []
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):  # the producer's own write may fail: disk full
                names.append(self.send_valid())
            time.sleep(0.2)
        degraded = daemon.total("edgemeta_degraded", reason="disk_full")
        alive = daemon.alive()
        waiting = sum(1 for n in staged if (self.inbox() / n).exists())
        filler.unlink()
        return {"run": True, "seconds": seconds, "degraded_metric_while_full": degraded,
                "alive_while_full": alive, "files_sent_while_full": len(names),
                "inputs_waiting_in_inbox_while_full": waiting}

    def _manifests(self) -> dict[str, dict[str, Any]]:
        out = {}
        for p in (self.state / "models").iterdir():
            if p.name.startswith("v") and p.is_dir():
                with contextlib.suppress(OSError, ValueError):
                    out[p.name] = json.loads((p / "manifest.json").read_text())
        return out

    def _current(self) -> str:
        """The version the stream serves ("v7"): its lineage's pointer, else the shared one."""
        for name in ("CURRENT.sine", "CURRENT"):
            with contextlib.suppress(OSError):
                return (self.state / "models" / name).read_text().strip()
        return ""

    def _episode_paths(self) -> list[Path]:
        return sorted((self.state / "episodes").glob("*.json"))

    @staticmethod
    def _episode(path: Path) -> dict[str, Any]:
        with contextlib.suppress(OSError, ValueError):
            return json.loads(path.read_text())
        return {}

    def _waiting_for_rows(self, daemon: DaemonProcess) -> bool:
        """The stream watches or collects: nothing is with the worker or at the gate. (Called
        after a drained inbox: status.json is rewritten at most every 0.5 s, so look after that.)"""
        phase = ((daemon.status().get("streams") or {}).get("sine") or {}).get("phase")
        return phase in ("watching", "collecting", "refining")

    @staticmethod
    def _outcome(e: dict[str, Any] | None) -> str:
        if e is None:
            return "none"
        return (f"{e.get('result')}/{e.get('reason')} "
                f"{e.get('holdout_current', float('nan')):.3g}->"
                f"{e.get('holdout_candidate', float('nan')):.3g}")

    def true_task_mse(self, names: list[str]) -> float:
        """The served predictions' squared error against the true task's noise-free labels.

        What a poisoned burst costs is measured on the rows after it, not on its own labels.
        """
        errors = []
        for name in names:
            path = self.state / "outbox" / "sine" / f"{name}.predictions.jsonl"
            with contextlib.suppress(OSError, ValueError):
                records = [json.loads(line) for line in path.read_text().splitlines()]
                pred = np.array([r["prediction"] for r in records], dtype=float).reshape(-1)
                if len(pred) == len(self.truth[name]):
                    errors.append((pred - self.truth[name]) ** 2)
        return float(np.concatenate(errors).mean()) if errors else float("nan")

    def poison(self, daemon: DaemonProcess) -> dict[str, Any]:
        """Manual adapt triggers followed by a burst of poisoned labels, then honest ones.

        The matrix per kind: candidates accepted, rolled back, and the true task's squared error
        on the honest rows just before the burst and on those just after it.
        """
        from edgemeta.daemon.triggers import write_trigger

        kinds = ("random", "scaled_x10", "scaled_x1000", "constant", "shuffled")
        triggers = self.state / "triggers"
        accepted = {k: 0 for k in kinds}
        tried = {k: 0 for k in kinds}
        rolled_back = {k: 0 for k in kinds}
        replaced = {k: 0 for k in kinds}  # poisoned versions no longer serving after honest rows
        error_before: dict[str, list[float]] = {k: [] for k in kinds}
        error_after: dict[str, list[float]] = {k: [] for k in kinds}
        outcomes: list[str] = []
        for i in range(self.n_poison):
            kind = kinds[i % len(kinds)]
            honest = [self.send_valid() for _ in range(3)]  # the serving model fits these
            daemon.wait(lambda: self.inbox_empty(), 60, "the inbox to drain")
            error_before[kind].append(self.true_task_mse(honest))
            before = self._manifests()
            seen = set(self._episode_paths())
            write_trigger(triggers, "adapt", {"stream": "sine"})
            daemon.wait(lambda: not any(p.is_file() for p in triggers.iterdir()), 30,
                        "the adapt trigger")
            self.file_no += 1
            name = f"p{self.file_no:06d}-{kind}.csv"
            x = self.nprng.uniform(-5, 5, 30)
            true = np.sin(x)
            y = {"random": self.nprng.uniform(-1, 1, 30), "scaled_x10": 10 * true,
                 "scaled_x1000": 1000 * true, "constant": np.full(30, 0.7),
                 "shuffled": self.nprng.permutation(true)}[kind]
            drop(self.inbox(), name, sine_csv([f"{name}-{j}" for j in range(30)], x, y))
            self.sent[name], self.valid_rows[name] = "valid", 30
            daemon.wait(lambda: self.inbox_empty(), 60, "the poisoned file")
            # Whatever the burst opened (the manual episode, or a drift episode: a rescaled task
            # is a change of the world to the detector) is decided or waits for more rows, however
            # long the worker takes on a busy machine.
            time.sleep(0.6)
            with contextlib.suppress(TimeoutError):
                daemon.wait(lambda: self._waiting_for_rows(daemon), 60, "the burst's episode")
            # Honest labels after the burst: they complete an episode that waits for rows, roll
            # back or replace what the burst put in serving, and show the true task's error.
            after = [self.send_valid() for _ in range(2)]
            daemon.wait(lambda: self.inbox_empty(), 60, "the inbox to drain")
            time.sleep(0.6)
            with contextlib.suppress(TimeoutError):
                daemon.wait(lambda: self._waiting_for_rows(daemon), 60, "the honest rows")
            error_after[kind].append(self.true_task_mse(after))
            # A poisoned version is one adapted on the burst's rows.
            burst = {round(float(v), 6) for v in x}
            episodes = [self._episode(p) for p in self._episode_paths() if p not in seen]
            poisoned_episodes = [e for e in episodes if burst & {
                round(float(v), 6) for v in np.ravel(e.get("support", {}).get("x", []))}]
            poisoned = {f"v{e['version']}" for e in poisoned_episodes
                        if e.get("result") == "accepted" and "version" in e}
            tried[kind] += 1
            accepted[kind] += len(poisoned)
            outcomes.append(f"{kind}:" + (", ".join(
                f"{e.get('trigger')} {self._outcome(e)}" for e in poisoned_episodes) or "none"))
            rolled_back[kind] += sum(1 for k, m in self._manifests().items()
                                     if k not in before and m.get("source") == "rollback")
            # Counted in versions, as accepted is: a burst can get into more than one (the
            # manual episode, then a continued fit whose window still holds its rows).
            replaced[kind] += len(poisoned - {self._current()})
        matrix = {k: {"tried": tried[k], "accepted": accepted[k], "rolled_back": rolled_back[k],
                      "no_longer_serving": replaced[k],
                      "true_task_mse_before": _mean(error_before[k]),
                      "true_task_mse_after": _mean(error_after[k])} for k in kinds}
        return {"tries": sum(tried.values()), "tried": tried, "outcomes": outcomes,
                "accepted_by_kind": accepted, "matrix": matrix,
                "accepted": sum(accepted.values()),
                "rolled_back_after": sum(rolled_back.values()),
                "no_longer_serving": sum(replaced.values())}

    # -- accounting --------------------------------------------------------------------------
    def account(self) -> dict[str, Any]:
        processed = {p.name for p in (self.state / "processed" / "sine").iterdir()}
        quarantined = {p.name for p in (self.state / "quarantine" / "sine").iterdir()
                       if not p.name.endswith(".error.json")}
        outbox = self.state / "outbox" / "sine"
        long_names = {}
        for p in outbox.glob("*.name.json"):
            m = json.loads(p.read_text())
            long_names[m["input"]] = m["predictions"]
        lost, no_pred, wrong_place = [], [], []
        for name, kind in self.sent.items():
            in_q = name in quarantined or any(q.startswith(name + ".") for q in quarantined)
            if name not in processed and not in_q:
                lost.append(name)
                continue
            if kind in ("valid", "valid_long_name"):
                if name not in processed:
                    wrong_place.append(name)
                pred = outbox / long_names.get(name, f"{name}.predictions.jsonl")
                try:
                    rows = pred.read_text().splitlines()
                except OSError:
                    no_pred.append(name)
                    continue
                if kind == "valid" and len(rows) != self.valid_rows[name]:
                    no_pred.append(name)
        return {"inputs_lost": len(lost), "lost_examples": lost[:5],
                "valid_without_predictions": len(no_pred), "no_prediction_examples": no_pred[:5],
                "valid_quarantined": len(wrong_place), "valid_quarantined_examples": wrong_place[:5]}

    def run(self) -> dict[str, Any]:
        bundle = self.bundle or cached_bundle(self.out)
        port = free_port()
        config = write_config(self.work / "chaos.toml", bundle, self.state, port,
                              ingest={"max_file_bytes": 64 * 1024 * 1024})
        daemon = DaemonProcess(config, self.state, port, self.work / "daemon.log")
        started = time.monotonic()
        daemon.start()
        daemon.wait_ready()
        phases = {"start": time.monotonic() - started}
        for _ in range(5):
            self.send_valid()
        total = self.n_malformed
        kill_at = sorted(self.rng.sample(range(1, total), min(self.n_kills, total - 1)))
        tamper_at, disk_at = total // 3, 2 * total // 3
        triggers, disk, tamper = 0, {"run": False}, {}
        for i in range(total):
            self.send_malformed()
            if i % 4 == 0:
                self.send_valid(labels=i % 8 == 0)
            if i % 25 == 0:
                hostile_trigger(TRIGGER_KINDS[triggers % len(TRIGGER_KINDS)],
                                self.state / "triggers", triggers)
                triggers += 1
            while kill_at and kill_at[0] == i:
                kill_at.pop(0)
                time.sleep(self.rng.uniform(0.0, 0.3))  # a random moment mid-work
                self.check_alive(daemon)
                self.kill(daemon)
            if i == tamper_at:
                self.check_alive(daemon)
                tamper = self.tamper(daemon)
            if i == disk_at:
                self.check_alive(daemon)
                disk = self.fill_disk(daemon, 8.0)
            if i % 10 == 0:
                time.sleep(0.05)
                self.check_alive(daemon)
        daemon.wait(lambda: self.inbox_empty(), 300, "the inbox to drain")
        phases["hostile_and_kills"] = time.monotonic() - started - sum(phases.values())
        self.check_alive(daemon)
        poison = self.poison(daemon) if self.n_poison else {"tries": 0}
        phases["poison"] = time.monotonic() - started - sum(phases.values())
        self.check_alive(daemon)
        daemon.wait(lambda: not any(p.name != "done" for p in (self.state / "triggers").iterdir()),
                    30, "the triggers to be handled")
        metrics = {k: daemon.total(k) for k in ("edgemeta_internal_errors_total",
                                                "edgemeta_quarantined_files_total",
                                                "edgemeta_rows_refused_total",
                                                "edgemeta_model_load_failures_total")}
        code = daemon.stop()
        accounting = self.account()
        done = self.state / "triggers" / "done"
        result = {
            "machine": platform.platform(), "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d"),
            "seconds": round(time.monotonic() - started, 1),
            "phase_seconds": {k: round(v, 1) for k, v in phases.items()},
            "files_sent": len(self.sent),
            "malformed_sent": sum(1 for k in self.sent.values() if k == "malformed"),
            "valid_sent": sum(1 for k in self.sent.values() if k.startswith("valid")),
            "hostile_triggers_sent": triggers,
            "triggers_handled": len(list(done.glob("*.result.json"))),
            **self.counts, "restarts_needed": self.counts["crashes"], **accounting,
            "tampered_registry": tamper, "full_disk": disk, "poison": poison,
            "metrics": metrics, "exit_code": code, "work_dir": str(self.work)}
        if self.tmpfs:
            subprocess.run(["umount", "-l", str(self.work / "disk")], check=False)
        return result


def run_chaos(out: Path, malformed_files: int = 1100, kills: int = 60, poison_tries: int = 24,
              seed: int = 0, bundle: Path | None = None) -> dict[str, Any]:
    """``bundle``: a sinusoid bundle to serve (default: a small one trained once into ``out``)."""
    out.mkdir(parents=True, exist_ok=True)
    result = Chaos(out, malformed_files, kills, poison_tries, seed, bundle).run()
    (out / "chaos.json").write_text(json.dumps(result, indent=2, default=str))
    keys = ("files_sent", "malformed_sent", "valid_sent", "hostile_triggers_sent", "daemon_kills",
            "worker_kills", "crashes", "restarts_needed", "inputs_lost", "valid_without_predictions",
            "valid_quarantined", "registry_invalid_after_kill")
    for key in keys:
        print(f"{key:28} {result[key]}")
    print(f"{'tampered registry':28} {result['tampered_registry']}")
    print(f"{'full disk':28} {result['full_disk']}")
    poison = result["poison"]
    print(f"{'poison':28} {poison['tries']} tries, {poison['accepted']} accepted, "
          f"{poison['rolled_back_after']} rolled back, {poison.get('no_longer_serving', 0)} "
          f"no longer serving after the honest rows")
    if poison.get("matrix"):
        print(f"  {'kind':14} {'tried':>5} {'accepted':>8} {'rolled back':>11} {'replaced':>8} "
              f"{'true-task MSE before':>20} {'after':>7}")
        for kind, m in poison["matrix"].items():
            print(f"  {kind:14} {m['tried']:>5} {m['accepted']:>8} {m['rolled_back']:>11} "
                  f"{m['no_longer_serving']:>8} {m['true_task_mse_before']:>20.3f} "
                  f"{m['true_task_mse_after']:>7.3f}")
    return result
