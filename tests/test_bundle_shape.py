"""The bundle's shape is the default: an N-way K-shot bundle adapts on K x N rows unless the
config says otherwise, a smaller configured support is warned about, and the diverse selection
keeps every class in the support."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from edgemeta.config import load_config
from edgemeta.daemon.metrics import Metrics
from edgemeta.daemon.runtime import Daemon
from edgemeta.meta.tasks import ArrayClassificationTasks
from edgemeta.meta.train import TrainSettings, save_bundle, train
from edgemeta.stream.buffers import SupportCollector
from edgemeta.testing.harness import free_port
from tests.conftest import run_edgemeta

WAYS, SHOTS, QUERIES = 3, 4, 5


@pytest.fixture(scope="module")
def n_way_bundle(tmp_path_factory, digits_npz):
    # Validation on held-out rows of the training classes (val fraction 0).
    tasks = ArrayClassificationTasks(digits_npz, n_way=WAYS, shots=SHOTS, queries=QUERIES,
                                     fractions=(0.6, 0.0, 0.4))
    result = train(TrainSettings(algorithm="maml", iterations=5, val_every=5, seed=0,
                                 device="cpu"), tasks)
    return save_bundle(result, tmp_path_factory.mktemp("shape") / "digits-n-way")


def config(tmp_path, bundle, **adaptation) -> str:
    features = json.dumps([f"p{i}" for i in range(64)])
    lines = ["[bundle]", f'path = "{bundle}"', "[state]", f'dir = "{tmp_path / "state"}"',
             "[metrics]", f"port = {free_port()}", "[adaptation]"]
    lines += [f"{k} = {json.dumps(v)}" for k, v in adaptation.items()]
    lines += ["[[streams]]", 'name = "digits"', f"features = {features}", 'label = "label"']
    path = tmp_path / "edgemeta.toml"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_config_check_takes_the_support_from_the_bundle(tmp_path, n_way_bundle):
    proc = run_edgemeta("config", "check", config(tmp_path, n_way_bundle))
    assert proc.returncode == 0, proc.stderr
    effective = json.loads(proc.stdout)
    assert effective["adaptation"]["support_size"] == WAYS * SHOTS
    assert effective["adaptation"]["holdout_size"] == max(20, WAYS * QUERIES)
    assert "warning" not in proc.stderr
    assert f"adapts on {WAYS * SHOTS} rows" in proc.stderr


def test_a_support_smaller_than_the_bundles_is_warned_about_by_check_and_run(
        tmp_path, n_way_bundle, caplog):
    path = config(tmp_path, n_way_bundle, support_size=10)
    proc = run_edgemeta("config", "check", path)
    assert proc.returncode == 0, proc.stderr
    assert "warning: adaptation.support_size: 10 rows is fewer than the bundle was " \
           f"meta-trained to adapt on ({WAYS * SHOTS})" in proc.stderr
    assert json.loads(proc.stdout)["adaptation"]["support_size"] == 10  # the config's, kept
    daemon = Daemon(load_config(path), metrics=Metrics())
    with caplog.at_level(logging.WARNING, logger="edgemeta.daemon"):
        daemon.setup()
    try:
        assert daemon.settings.adaptation.support_size == 10
        assert "fewer than the bundle was meta-trained to adapt on" in caplog.text
    finally:
        daemon.shutdown(drain_s=0.5)


def test_the_diverse_selection_keeps_every_class_when_the_rows_allow():
    """A window where one class is rare and the rows of another bunch together: the support
    still holds every class, the rare ones with all the rows they have."""
    rng = np.random.default_rng(0)
    y = np.r_[np.zeros(60), np.ones(30), np.full(8, 2), np.full(2, 3)].astype(np.int64)
    rng.shuffle(y)
    x = rng.normal(size=(100, 4)) + y[:, None] * 0.1
    collector = SupportCollector(support_size=12, holdout_size=20, selection="diverse",
                                 window=120, classes=4)
    collector.start()
    episode = None
    for i in range(120):
        episode = collector.offer(x[i % 100], int(y[i % 100]))
    assert episode is not None
    counts = np.bincount(episode.support_y.astype(np.int64), minlength=4)
    assert len(episode.support_y) == 12 and (counts > 0).all(), counts
    assert counts[3] == 2 and counts[2] == 3
