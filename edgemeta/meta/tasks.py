"""Task distributions: where few-shot episodes come from.

Each distribution samples batches of tasks as stacked tensors so the inner loop can ``vmap`` over
them. Splits are fixed by a split seed at construction, independent of the sampling seed, so the
meta-test tasks never leak into meta-training whatever seed a run uses.

>>> import numpy as np
>>> tasks = SinusoidTasks(shots=5, queries=10)
>>> batch = tasks.sample(4, np.random.default_rng(0))
>>> tuple(batch.support_x.shape), tuple(batch.query_y.shape)
((4, 5, 1), (4, 10, 1))
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

SPLITS = ("train", "val", "test")


class TaskDataError(ValueError):
    """Task data that cannot produce the requested episodes; the message names the file."""


@dataclass
class TaskBatch:
    """A batch of episodes: support (adapt on it) and query (judge the adapted model on it)."""

    support_x: torch.Tensor
    support_y: torch.Tensor
    query_x: torch.Tensor
    query_y: torch.Tensor

    def to(self, device: torch.device | str) -> TaskBatch:
        return TaskBatch(*(t.to(device) for t in
                           (self.support_x, self.support_y, self.query_x, self.query_y)))


@runtime_checkable
class TaskSource(Protocol):
    """What meta-training, evaluation and the CLI ask of a task distribution.

    Every distribution here implements it explicitly (no duck-typed ``getattr`` probes):
    ``kind`` is "regression" or "classification"; ``shots`` and ``queries`` are the default
    support and query rows per task (per class for an N-way array); ``normalization`` is the
    feature scaling its rows were given (None: as they are); :meth:`has` says whether a split
    holds any task (an evaluation-only folder has no training tasks); :meth:`origin` is the
    distribution the user named, under any wrapping (standardized targets, a replay mix), for
    reports about the user's own data.

    >>> isinstance(SinusoidTasks(), TaskSource), SinusoidTasks().origin().kind
    (True, 'regression')
    """

    kind: str
    in_features: int
    out_features: int
    shots: int
    queries: int
    normalization: dict[str, list[float]] | None

    def sample(self, n_tasks: int, rng: np.random.Generator, split: str = "train",
               shots: int | None = None, queries: int | None = None) -> TaskBatch: ...

    def has(self, split: str) -> bool: ...

    def describe(self) -> dict[str, Any]: ...

    def origin(self) -> TaskSource: ...


class _Generated:
    """A family sampled from its parameters: every split holds tasks, nothing wraps it."""

    def has(self, split: str) -> bool:
        return split in SPLITS

    def origin(self) -> TaskSource:
        return self  # type: ignore[return-value]


class SinusoidTasks(_Generated):
    """The MAML paper's regression tasks: y = A sin(x - phase), A in [0.1, 5], phase in [0, pi]."""

    kind = "regression"
    in_features = 1
    out_features = 1

    def __init__(self, shots: int = 5, queries: int = 10, amplitude=(0.1, 5.0),
                 phase=(0.0, math.pi), x_range=(-5.0, 5.0)):
        self.shots = shots
        self.queries = queries
        self.amplitude = tuple(amplitude)
        self.phase = tuple(phase)
        self.x_range = tuple(x_range)

    def sample_functions(self, n_tasks: int, rng: np.random.Generator) -> np.ndarray:
        amp = rng.uniform(*self.amplitude, size=n_tasks)
        phase = rng.uniform(*self.phase, size=n_tasks)
        return np.stack([amp, phase], axis=1)

    def evaluate(self, params: np.ndarray, x: np.ndarray) -> np.ndarray:
        """Targets of tasks ``params`` [B, 2] at inputs ``x`` [B, N, 1]."""
        return params[:, None, 0:1] * np.sin(x - params[:, None, 1:2])

    def sample(self, n_tasks: int, rng: np.random.Generator, split: str = "train",
               shots: int | None = None, queries: int | None = None) -> TaskBatch:
        shots = self.shots if shots is None else shots
        queries = self.queries if queries is None else queries
        params = self.sample_functions(n_tasks, rng)
        x = rng.uniform(*self.x_range, size=(n_tasks, shots + queries, 1))
        y = self.evaluate(params, x)
        return _split_batch(x, y, shots, np.float32)

    def describe(self) -> dict[str, Any]:
        return {"name": "sinusoid", "shots": self.shots, "queries": self.queries,
                "amplitude": list(self.amplitude), "phase": list(self.phase),
                "x_range": list(self.x_range)}

    normalization = None


class HyperplaneTasks(_Generated):
    """Binary classification by a random hyperplane: y = [w . x + b > 0], x uniform in [-1, 1]^d.

    The classification counterpart of the sinusoid family: every task is the same kind of rule
    with different parameters, so a stream can switch between tasks and a meta-learned
    initialization can pick up the new rule from a handful of labels. ``shots`` counts support rows
    per task (labels fall where the rule puts them, as on a stream), not rows per class.

    >>> tasks = HyperplaneTasks(shots=10, queries=20, dims=2)
    >>> batch = tasks.sample(3, np.random.default_rng(0))
    >>> tuple(batch.support_x.shape), sorted(set(batch.query_y.flatten().tolist()))
    ((3, 10, 2), [0, 1])
    """

    kind = "classification"
    out_features = 2
    normalization = None

    def __init__(self, shots: int = 10, queries: int = 20, dims: int = 2, offset: float = 0.3):
        self.shots = shots
        self.queries = queries
        self.dims = dims
        self.offset = offset
        self.in_features = dims

    def sample_functions(self, n_tasks: int, rng: np.random.Generator) -> np.ndarray:
        """Rows of [w_1..w_d, b] with w a random unit vector."""
        w = rng.normal(size=(n_tasks, self.dims))
        w /= np.linalg.norm(w, axis=1, keepdims=True)
        b = rng.uniform(-self.offset, self.offset, size=(n_tasks, 1))
        return np.concatenate([w, b], axis=1)

    def evaluate(self, params: np.ndarray, x: np.ndarray) -> np.ndarray:
        """Labels of tasks ``params`` [B, d+1] at inputs ``x`` [B, N, d]."""
        scores = np.einsum("bnd,bd->bn", x, params[:, :-1]) + params[:, None, -1]
        return (scores > 0).astype(np.int64)

    def sample(self, n_tasks: int, rng: np.random.Generator, split: str = "train",
               shots: int | None = None, queries: int | None = None) -> TaskBatch:
        shots = self.shots if shots is None else shots
        queries = self.queries if queries is None else queries
        params = self.sample_functions(n_tasks, rng)
        x = rng.uniform(-1.0, 1.0, size=(n_tasks, shots + queries, self.dims))
        return _split_batch(x, self.evaluate(params, x), shots, np.int64)

    def describe(self) -> dict[str, Any]:
        return {"name": "hyperplane", "shots": self.shots, "queries": self.queries,
                "dims": self.dims, "offset": self.offset}


def _split_batch(x: np.ndarray, y: np.ndarray, shots: int, y_dtype) -> TaskBatch:
    xt = torch.as_tensor(x, dtype=torch.float32)
    yt = torch.as_tensor(y.astype(y_dtype))
    return TaskBatch(xt[:, :shots], yt[:, :shots], xt[:, shots:], yt[:, shots:])


def load_labelled_array(path: str | Path, label_column: str = "label") -> tuple[np.ndarray, np.ndarray]:
    """Read X and y from ``.npz`` (arrays ``X`` and ``y``) or CSV (header row, a label column)."""
    path = Path(path)
    if not path.is_file():
        raise TaskDataError(f"{path}: no such file")
    if path.suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as data:
                missing = [k for k in ("X", "y") if k not in data.files]
                if missing:
                    raise TaskDataError(f"{path}: missing array(s) {missing}; need 'X' and 'y'")
                x, y = np.asarray(data["X"], dtype=np.float64), np.asarray(data["y"])
        except (OSError, ValueError) as exc:
            raise TaskDataError(f"{path}: cannot read npz: {exc}") from exc
    elif path.suffix == ".csv":
        x, y = _read_csv(path, label_column)
    else:
        raise TaskDataError(f"{path}: unsupported format {path.suffix!r}; use .npz or .csv")
    if x.ndim == 1:
        x = x[:, None]
    if x.ndim != 2 or len(x) != len(y):
        raise TaskDataError(f"{path}: X has shape {x.shape} but y has {len(y)} rows")
    if not np.isfinite(x).all():
        row = int(np.argwhere(~np.isfinite(x))[0][0])
        raise TaskDataError(f"{path}: non-finite feature value in row {row}")
    return x, y


def _read_csv(path: Path, label_column: str) -> tuple[np.ndarray, np.ndarray]:
    with path.open(newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if not header:
            raise TaskDataError(f"{path}: empty CSV, expected a header row")
        if label_column not in header:
            raise TaskDataError(f"{path}: no label column {label_column!r} in header {header}")
        li = header.index(label_column)
        rows, labels = [], []
        for lineno, row in enumerate(reader, start=2):
            if len(row) != len(header):
                raise TaskDataError(f"{path}, line {lineno}: {len(row)} fields, header has {len(header)}")
            try:
                rows.append([float(v) for i, v in enumerate(row) if i != li])
                labels.append(float(row[li]))
            except ValueError as exc:
                raise TaskDataError(f"{path}, line {lineno}: not a number: {exc}") from exc
    if not rows:
        raise TaskDataError(f"{path}: no data rows")
    return np.asarray(rows), np.asarray(labels)


def _split_indices(n: int, fractions: tuple[float, float, float], split_seed: int) -> dict[str, np.ndarray]:
    order = np.random.default_rng(split_seed).permutation(n)
    n_train = int(round(fractions[0] * n))
    n_val = int(round(fractions[1] * n))
    return {"train": order[:n_train], "val": order[n_train:n_train + n_val],
            "test": order[n_train + n_val:]}


class ArrayClassificationTasks:
    """N-way K-shot episodes from one labelled array, classes disjoint between splits.

    Labels are re-drawn per episode (class ``c`` becomes a random slot 0..N-1), so the model must
    learn from the support set rather than memorise a class identity.
    """

    kind = "classification"

    def __init__(self, path: str | Path, n_way: int = 5, shots: int = 1, queries: int = 15,
                 fractions=(0.6, 0.2, 0.2), split_seed: int = 0, label_column: str = "label"):
        self.path = str(path)
        self.n_way = n_way
        self.shots = shots
        self.queries = queries
        self.fractions = tuple(fractions)
        self.split_seed = split_seed
        self.label_column = label_column
        x, y = load_labelled_array(path, label_column)
        classes = np.unique(y)
        parts = _split_indices(len(classes), self.fractions, split_seed)
        self._by_split: dict[str, list[np.ndarray]] = {}
        train_rows = []
        share_val = self.fractions[1] == 0
        for split, idx in parts.items():
            members = [np.flatnonzero(y == c) for c in classes[np.sort(idx)]]
            if split == "val" and share_val:
                # Too few classes for a class-disjoint validation split (e.g. digits, 10 classes):
                # validate on held-out rows of the training classes instead.
                rng = np.random.default_rng(split_seed)
                shuffled = [rng.permutation(m) for m in self._by_split["train"]]
                cut = [max(len(m) // 5, 1) for m in shuffled]
                members = [m[:c] for m, c in zip(shuffled, cut, strict=True)]
                self._by_split["train"] = [m[c:] for m, c in zip(shuffled, cut, strict=True)]
                train_rows = np.concatenate(self._by_split["train"])
            if len(members) < n_way:
                raise TaskDataError(
                    f"{self.path}: the {split} split has {len(members)} classes, fewer than "
                    f"n_way={n_way} ({len(classes)} classes in all, fractions {list(self.fractions)})")
            need = shots + queries
            small = [i for i, m in enumerate(members) if len(m) < need]
            if small:
                raise TaskDataError(
                    f"{self.path}: {len(small)} class(es) of the {split} split have fewer than "
                    f"shots+queries={need} examples")
            self._by_split[split] = members
            if split == "train":
                train_rows = np.concatenate(members)
        mean = x[train_rows].mean(axis=0)
        std = x[train_rows].std(axis=0)
        std[std < 1e-8] = 1.0
        self.normalization = {"mean": mean.tolist(), "std": std.tolist()}
        self._x = ((x - mean) / std).astype(np.float32)
        self.in_features = x.shape[1]
        self.out_features = n_way

    def has(self, split: str) -> bool:
        return bool(self._by_split.get(split))

    def origin(self) -> TaskSource:
        return self

    def sample(self, n_tasks: int, rng: np.random.Generator, split: str = "train",
               shots: int | None = None, queries: int | None = None) -> TaskBatch:
        shots = self.shots if shots is None else shots
        queries = self.queries if queries is None else queries
        members = self._by_split[split]
        xs, ys = [], []
        for _ in range(n_tasks):
            chosen = rng.choice(len(members), size=self.n_way, replace=False)
            sx, sy, qx, qy = [], [], [], []
            for slot, c in enumerate(chosen):
                rows = rng.choice(members[c], size=shots + queries, replace=False)
                sx.append(self._x[rows[:shots]])
                qx.append(self._x[rows[shots:]])
                sy += [slot] * shots
                qy += [slot] * queries
            xs.append(np.concatenate(sx + qx))
            ys.append(np.asarray(sy + qy))
        return _split_batch(np.stack(xs), np.stack(ys), shots * self.n_way, np.int64)

    def pooled(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """All rows of a split with split-local class ids (for the pretrain baseline)."""
        members = self._by_split[split]
        x = np.concatenate([self._x[m] for m in members])
        y = np.concatenate([np.full(len(m), i) for i, m in enumerate(members)])
        return x, y.astype(np.int64)

    def describe(self) -> dict[str, Any]:
        return {"name": "array", "path": self.path, "n_way": self.n_way, "shots": self.shots,
                "queries": self.queries, "fractions": list(self.fractions),
                "split_seed": self.split_seed, "label_column": self.label_column}


class TaskFolderTasks:
    """A directory of user tasks, one ``.npz``/``.csv`` file each, split by task into train/val/test.

    Regression tasks sample ``shots`` support and ``queries`` query rows; classification tasks
    sample ``shots`` per class of the task (its labels are its own classes, 0..C-1).
    """

    def __init__(self, path: str | Path, kind: str = "regression", shots: int = 5,
                 queries: int = 10, fractions=(0.6, 0.2, 0.2), split_seed: int = 0,
                 label_column: str = "label", normalization: dict[str, list[float]] | None = None):
        if kind not in ("regression", "classification"):
            raise TaskDataError(f"task folder kind must be regression or classification, not {kind!r}")
        self.path = str(path)
        self.kind = kind
        self.shots = shots
        self.queries = queries
        self.fractions = tuple(fractions)
        self.split_seed = split_seed
        self.label_column = label_column
        root = Path(path)
        if not root.is_dir():
            raise TaskDataError(f"{root}: not a directory of task files")
        files = sorted(p for p in root.iterdir() if p.suffix in (".npz", ".csv"))
        if len(files) < 3:
            raise TaskDataError(f"{root}: {len(files)} task files; need at least 3 (.npz or .csv)")
        tasks = [load_labelled_array(f, label_column) for f in files]
        widths = {t[0].shape[1] for t in tasks}
        if len(widths) != 1:
            raise TaskDataError(f"{root}: task files disagree on the number of features: {sorted(widths)}")
        self.in_features = widths.pop()
        self.out_features = self._check_rows(root, files, tasks)
        parts = _split_indices(len(files), self.fractions, split_seed)
        self._check_splits(root, len(files), parts, evaluation_only=normalization is not None)
        self._splits = {s: [tasks[i] for i in np.sort(idx)] for s, idx in parts.items()}
        #: Which file went to which split, so `train` can say so (the split is by file: a file
        #: that holds a whole family keeps that family out of meta-training).
        self.split_files = {s: [files[i].name for i in np.sort(idx)] for s, idx in parts.items()}
        if self.fractions[1] == 0 and self._splits["train"]:
            self._hold_out_validation_rows(root, split_seed)
        #: Given (not fitted) when the tasks continue an existing bundle: its weights only mean
        #: something in the feature scale they were meta-trained in (``train --init``).
        self.given_normalization = normalization
        mean, std = (self._given_scale(root, normalization) if normalization is not None
                     else self._fitted_scale())
        self.normalization = {"mean": mean.tolist(), "std": std.tolist()}
        self._mean, self._std = mean, std

    def _check_rows(self, root: Path, files: list[Path], tasks: list) -> int:
        """Every file has rows enough for a support and a query (per class when classifying);
        returns the output width (the class count, the same in every file)."""
        need = self.shots + self.queries
        out_features = 1
        if self.kind == "classification":
            n_classes = {len(np.unique(y)) for _, y in tasks}
            if len(n_classes) != 1:
                raise TaskDataError(f"{root}: tasks have different class counts {sorted(n_classes)}")
            out_features = n_classes.pop()
        for f, (x, y) in zip(files, tasks, strict=True):
            if self.kind == "regression" and len(x) < need:
                raise TaskDataError(f"{f}: {len(x)} rows, fewer than shots+queries={need}")
            if self.kind == "classification":
                counts = np.unique(y, return_counts=True)[1]
                if counts.min() < need:
                    raise TaskDataError(f"{f}: a class has {counts.min()} rows, fewer than {need}")
        return out_features

    def _check_splits(self, root: Path, n_files: int, parts: dict, evaluation_only: bool) -> None:
        for split, idx in parts.items():
            # An evaluation-only folder (all of it meta-test, in a given bundle's scale) needs no
            # training files.
            if len(idx) or (evaluation_only and split in ("train", "val")):
                continue
            if split == "val" and self.fractions[1] == 0:
                continue
            raise TaskDataError(
                f"{root}: the {split} split is empty ({n_files} task files, fractions "
                f"{list(self.fractions)}); add task files")

    def _given_scale(self, root: Path, normalization: dict) -> tuple[np.ndarray, np.ndarray]:
        mean = np.asarray(normalization["mean"], dtype=np.float64).reshape(-1)
        std = np.asarray(normalization["std"], dtype=np.float64).reshape(-1)
        if mean.size not in (1, self.in_features) or std.size not in (1, self.in_features):
            raise TaskDataError(f"{root}: the given normalization has {mean.size} feature(s), "
                                f"the tasks {self.in_features}")
        return np.broadcast_to(mean, self.in_features), np.broadcast_to(std, self.in_features)

    def _fitted_scale(self) -> tuple[np.ndarray, np.ndarray]:
        train_x = np.concatenate([x for x, _ in self._splits["train"]])
        mean, std = train_x.mean(axis=0), train_x.std(axis=0)
        std[std < 1e-8] = 1.0
        return mean, std

    def _hold_out_validation_rows(self, root: Path, split_seed: int) -> None:
        """``--val-fraction 0``: validate on held-out rows of the training tasks (a fifth of
        each task's rows, and at least shots+queries), as class-split arrays do."""
        need = self.shots + self.queries
        rng = np.random.default_rng(split_seed)
        train, val = [], []
        for x, y in self._splits["train"]:
            if self.kind == "classification":
                train.append((x, y))  # rows per class are few: classes need all of theirs
                continue
            order = rng.permutation(len(x))
            cut = max(need, len(x) // 5)
            if len(x) - cut >= need:
                val.append((x[order[:cut]], y[order[:cut]]))
                train.append((x[order[cut:]], y[order[cut:]]))
            else:
                train.append((x, y))
        if not val:
            raise TaskDataError(
                f"{root}: --val-fraction 0 validates on held-out rows of the training tasks, but "
                f"no regression training task has 2 x (shots+queries) = {2 * need} rows; give a "
                "validation fraction instead")
        self._splits["train"], self._splits["val"] = train, val
        self.split_files["val"] = ["held-out rows of the training tasks"]

    def has(self, split: str) -> bool:
        """Whether ``split`` holds any task (an evaluation-only folder has no training files)."""
        return bool(self._splits.get(split))

    def origin(self) -> TaskSource:
        return self

    def sample(self, n_tasks: int, rng: np.random.Generator, split: str = "train",
               shots: int | None = None, queries: int | None = None) -> TaskBatch:
        shots = self.shots if shots is None else shots
        queries = self.queries if queries is None else queries
        pool = self._splits[split]
        xs, ys = [], []
        for _ in range(n_tasks):
            x, y = pool[rng.integers(len(pool))]
            if self.kind == "regression":
                rows = rng.choice(len(x), size=shots + queries, replace=False)
                xs.append(x[rows])
                ys.append(y[rows, None])
            else:
                classes = np.unique(y)
                picks = [rng.choice(np.flatnonzero(y == c), size=shots + queries, replace=False)
                         for c in classes]
                rows = np.concatenate([p[:shots] for p in picks] + [p[shots:] for p in picks])
                xs.append(x[rows])
                ys.append(np.searchsorted(classes, y[rows]))
        x = (np.stack(xs) - self._mean) / self._std
        n_support = shots if self.kind == "regression" else shots * self.out_features
        y_dtype = np.float32 if self.kind == "regression" else np.int64
        return _split_batch(x, np.stack(ys), n_support, y_dtype)

    def describe(self) -> dict[str, Any]:
        spec = {"name": "folder", "path": self.path, "kind": self.kind, "shots": self.shots,
                "queries": self.queries, "fractions": list(self.fractions),
                "split_seed": self.split_seed, "label_column": self.label_column}
        if self.given_normalization is not None:
            spec["normalization"] = self.given_normalization
        return spec


class StandardizedTargets:
    """A regression task distribution whose targets are standardized: ``(y - mean) / std``.

    Why: a family whose targets sit around 10-20 with spread 5 gives a meta-initialization that is
    off by hundreds in MSE before any step, and inner-loop rates that transfer to no other scale.
    Meta-training, adaptation and continued learning see standardized targets; the exported
    model maps its output back (``meta.bundle.append_output_scaling``), so predictions come out
    in the user's units. Everything else is the wrapped distribution's.

    Only where the scale needs it (:meth:`needed`): targets already near unit scale (the MAML
    paper's sinusoid, std about 2) are left in the user's units, so ``--inner-lr`` keeps its
    published meaning there. Standardizing them anyway made each of the paper's 0.01 steps 4x
    smaller and steps 2 to 10 lost most of their effect; running the paper's lr times std^2 on
    standardized targets instead is not the same inner loop either (the output layer's steps
    grow by std^2) and measured worse (docs/BENCHMARKS.md, issue 26).
    """

    #: Targets whose spread is within this factor of 1, and whose mean is within this many units
    #: of 0, are trained on as they are.
    UNIT = 4.0

    def __init__(self, tasks, mean: float, std: float):
        self.inner = tasks
        self.mean = float(mean)
        self.std = float(std)

    @classmethod
    def fit(cls, tasks, seed: int = 0, n_tasks: int = 200) -> StandardizedTargets:
        probe = tasks.sample(n_tasks, np.random.default_rng(seed), split="train")
        ys = np.concatenate([probe.support_y.numpy().ravel(), probe.query_y.numpy().ravel()])
        std = float(ys.std())
        return cls(tasks, float(ys.mean()), std if std > 1e-8 else 1.0)

    @property
    def scaling(self) -> dict[str, float]:
        return {"mean": self.mean, "std": self.std}

    def needed(self) -> bool:
        """Whether the targets are far enough from unit scale that standardizing them pays:
        a family around 15 with spread 5 starts hundreds off in MSE, and no inner rate that
        suits unit-scale targets suits it.

        >>> StandardizedTargets(None, mean=0.3, std=1.9).needed()
        False
        >>> StandardizedTargets(None, mean=14.0, std=5.0).needed()
        True
        """
        return (abs(self.mean) > self.UNIT or not 1 / self.UNIT <= self.std <= self.UNIT)

    # The wrapped distribution's shape, stated rather than forwarded blindly.
    @property
    def kind(self) -> str:
        return self.inner.kind

    @property
    def in_features(self) -> int:
        return self.inner.in_features

    @property
    def out_features(self) -> int:
        return self.inner.out_features

    @property
    def shots(self) -> int:
        return self.inner.shots

    @property
    def queries(self) -> int:
        return self.inner.queries

    @property
    def normalization(self) -> dict[str, list[float]] | None:
        return self.inner.normalization

    def has(self, split: str) -> bool:
        return self.inner.has(split)

    def describe(self) -> dict[str, Any]:
        return self.inner.describe()

    def origin(self) -> TaskSource:
        return self.inner.origin()

    def sample(self, *args, **kwargs) -> TaskBatch:
        b = self.inner.sample(*args, **kwargs)
        return TaskBatch(b.support_x, (b.support_y - self.mean) / self.std, b.query_x,
                         (b.query_y - self.mean) / self.std)


def same_scale(a: dict | None, b: dict | None, features: int) -> bool:
    """Two feature normalizations (None: the identity) that map features alike."""
    def arrays(n):
        n = n or {"mean": 0.0, "std": 1.0}
        return (np.broadcast_to(np.asarray(n["mean"], dtype=np.float64).reshape(-1), features),
                np.broadcast_to(np.asarray(n["std"], dtype=np.float64).reshape(-1), features))
    (ma, sa), (mb, sb) = arrays(a), arrays(b)
    return bool(np.allclose(ma, mb, rtol=1e-6, atol=1e-9) and np.allclose(sa, sb, rtol=1e-6))


class MixedTasks:
    """New tasks with a share of the original distribution replayed in every batch.

    Why: re-meta-training a base only on what the fleet met lately makes it forget the tasks it
    was good at; drawing ``replay_ratio`` of each meta-batch (and of validation) from the old
    distribution keeps both in the objective. Both parts must already share the feature scale.
    """

    def __init__(self, new, replay, replay_ratio: float):
        if not 0 <= replay_ratio < 1:
            raise TaskDataError(f"replay ratio must be in [0, 1), got {replay_ratio!r}")
        for attr in ("kind", "in_features", "out_features"):
            if getattr(new, attr) != getattr(replay, attr):
                raise TaskDataError(f"the new tasks and the replayed ones differ in {attr}: "
                                    f"{getattr(new, attr)!r} vs {getattr(replay, attr)!r}")
        if not same_scale(new.normalization, replay.normalization, new.in_features):
            raise TaskDataError("the new tasks are not in the replayed distribution's feature scale")
        self.new, self.replay, self.replay_ratio = new, replay, float(replay_ratio)
        self.kind, self.in_features, self.out_features = new.kind, new.in_features, new.out_features
        self.shots, self.queries = new.shots, new.queries
        self.normalization = new.normalization

    def sample(self, n_tasks: int, rng: np.random.Generator, split: str = "train",
               shots: int | None = None, queries: int | None = None) -> TaskBatch:
        n_old = int(round(n_tasks * self.replay_ratio))
        parts = [d.sample(n, rng, split=split, shots=shots, queries=queries)
                 for d, n in ((self.new, n_tasks - n_old), (self.replay, n_old)) if n > 0]
        if len(parts) == 1:
            return parts[0]
        return TaskBatch(*(torch.cat([getattr(p, f) for p in parts])
                           for f in ("support_x", "support_y", "query_x", "query_y")))

    def has(self, split: str) -> bool:
        return self.new.has(split)

    def origin(self) -> TaskSource:
        return self.new.origin()

    def describe(self) -> dict[str, Any]:
        return {"name": "mixed", "new": self.new.describe(), "replay": self.replay.describe(),
                "replay_ratio": self.replay_ratio}


def replayed_families(tasks) -> tuple[Any, Any, float] | None:
    """(new, replayed, replay ratio) of a warm start's mix, each distribution in the mix's target
    scale, or None when nothing is replayed: what a warm start balances and validates apart."""
    if isinstance(tasks, StandardizedTargets):
        parts = replayed_families(tasks.inner)
        if parts is None:
            return None
        new, old, ratio = parts
        return (StandardizedTargets(new, tasks.mean, tasks.std),
                StandardizedTargets(old, tasks.mean, tasks.std), ratio)
    if isinstance(tasks, MixedTasks) and tasks.replay_ratio > 0:
        return tasks.new, tasks.replay, tasks.replay_ratio
    return None


def build_tasks(spec: dict[str, Any]):
    """Recreate a task distribution from its ``describe()`` dict (stored in bundle.json)."""
    spec = dict(spec)
    name = spec.pop("name", None)
    if name == "sinusoid":
        return SinusoidTasks(**spec)
    if name == "hyperplane":
        return HyperplaneTasks(**spec)
    if name == "array":
        return ArrayClassificationTasks(**spec)
    if name == "folder":
        return TaskFolderTasks(**spec)
    if name == "mixed":
        return MixedTasks(build_tasks(spec["new"]), build_tasks(spec["replay"]), spec["replay_ratio"])
    raise TaskDataError(f"unknown task distribution {name!r}; use sinusoid, hyperplane, array or folder")
