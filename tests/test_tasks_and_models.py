"""Task distributions follow their protocols and bad data is refused with the file and line."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from edgemeta.meta.models import ModelSpecError, build_model, head_names
from edgemeta.meta.tasks import (
    ArrayClassificationTasks,
    SinusoidTasks,
    TaskDataError,
    TaskFolderTasks,
)


def test_sinusoid_follows_the_maml_protocol():
    tasks = SinusoidTasks(shots=5, queries=10)
    rng = np.random.default_rng(0)
    params = tasks.sample_functions(10_000, rng)
    assert params[:, 0].min() >= 0.1 and params[:, 0].max() <= 5.0
    assert params[:, 1].min() >= 0.0 and params[:, 1].max() <= math.pi
    batch = tasks.sample(200, rng)
    xs = torch.cat([batch.support_x, batch.query_x], 1)
    assert xs.min() >= -5 and xs.max() <= 5
    assert batch.support_x.shape == (200, 5, 1) and batch.query_x.shape == (200, 10, 1)


def test_array_splits_are_class_disjoint(digits_npz):
    tasks = ArrayClassificationTasks(digits_npz, n_way=2, shots=2, queries=3)
    from sklearn.datasets import load_digits

    d = load_digits()
    seen = {}
    for split in ("train", "val", "test"):
        x, _ = tasks.pooled(split)
        mean, std = np.array(tasks.normalization["mean"]), np.array(tasks.normalization["std"])
        raw = np.round(x * std + mean).astype(int)
        lookup = {row.tobytes(): int(c) for row, c in zip(d.data.astype(int), d.target, strict=True)}
        seen[split] = {lookup[r.tobytes()] for r in raw}
    assert not seen["train"] & seen["val"] and not seen["train"] & seen["test"]
    assert not seen["val"] & seen["test"]
    batch = tasks.sample(4, np.random.default_rng(0), split="test")
    assert batch.support_y.shape == (4, 4) and set(batch.support_y[0].tolist()) == {0, 1}


def test_too_many_ways_for_the_classes_is_a_clear_error(digits_npz):
    with pytest.raises(TaskDataError, match=r"digits.npz: the val split has 2 classes, fewer than n_way=5"):
        ArrayClassificationTasks(digits_npz, n_way=5)


def test_more_shots_than_examples_is_a_clear_error(digits_npz):
    with pytest.raises(TaskDataError, match="fewer than shots\\+queries=400"):
        ArrayClassificationTasks(digits_npz, n_way=2, shots=200, queries=200)


def test_csv_errors_name_the_line(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("a,b,label\n1,2,0\n3,oops,1\n")
    with pytest.raises(TaskDataError, match=r"data.csv, line 3: not a number"):
        ArrayClassificationTasks(path)
    path.write_text("a,b,label\n1,2,0\n3,4\n")
    with pytest.raises(TaskDataError, match=r"data.csv, line 3: 2 fields, header has 3"):
        ArrayClassificationTasks(path)
    path.write_text("a,b,cls\n1,2,0\n")
    with pytest.raises(TaskDataError, match=r"no label column 'label'"):
        ArrayClassificationTasks(path)


def test_npz_without_y_is_refused(tmp_path):
    np.savez(tmp_path / "bad.npz", X=np.zeros((3, 2)))
    with pytest.raises(TaskDataError, match=r"bad.npz: missing array\(s\) \['y'\]"):
        ArrayClassificationTasks(tmp_path / "bad.npz")


def test_task_folder_regression_and_classification(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(10):
        x = rng.normal(size=(30, 3))
        np.savez(tmp_path / f"task{i:02d}.npz", X=x, y=x @ rng.normal(size=3))
    tasks = TaskFolderTasks(tmp_path, kind="regression", shots=5, queries=10)
    b = tasks.sample(2, rng, split="test")
    assert b.support_x.shape == (2, 5, 3) and b.query_y.shape == (2, 10, 1)
    cls_dir = tmp_path / "cls"
    cls_dir.mkdir()
    for i in range(6):
        y = np.repeat([0, 1, 2], 10)
        np.savez(cls_dir / f"t{i}.npz", X=rng.normal(size=(30, 2)) + y[:, None], y=y)
    tasks = TaskFolderTasks(cls_dir, kind="classification", shots=2, queries=3)
    b = tasks.sample(2, rng)
    assert tasks.out_features == 3 and b.support_y.shape == (2, 6)


def test_task_folder_with_too_few_rows_names_the_file(tmp_path):
    for i in range(3):
        rows = 4 if i == 1 else 30
        np.savez(tmp_path / f"task{i}.npz", X=np.zeros((rows, 1)), y=np.zeros(rows))
    with pytest.raises(TaskDataError, match=r"task1.npz: 4 rows, fewer than shots\+queries=15"):
        TaskFolderTasks(tmp_path, shots=5, queries=10)


def with_batchnorm() -> nn.Module:
    return nn.Sequential(nn.Linear(2, 4), nn.BatchNorm1d(4), nn.Linear(4, 1))


def small_user_model(width: int = 8) -> nn.Module:
    return nn.Sequential(nn.Linear(2, width), nn.Tanh(), nn.Linear(width, 1))


def test_user_factory_builds_the_model_and_finds_its_head():
    model = build_model({"factory": "tests.test_tasks_and_models:small_user_model", "kwargs": {"width": 3}})
    assert head_names(model) == ["2.weight", "2.bias"]


def test_batchnorm_is_refused_with_the_module_name():
    with pytest.raises(ModelSpecError, match=r"module '1' is BatchNorm1d"):
        build_model({"factory": "tests.test_tasks_and_models:with_batchnorm"})


@pytest.mark.parametrize("path, message", [
    ("nodots", "must look like 'package.module:function'"),
    ("no_such_pkg_xyz:f", "cannot import 'no_such_pkg_xyz'"),
    ("tests.test_tasks_and_models:missing", "has no 'missing'"),
])
def test_bad_factory_paths_are_clear_errors(path, message):
    with pytest.raises(ModelSpecError, match=message):
        build_model({"factory": path})
