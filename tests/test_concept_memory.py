"""Concept memory: when an earlier regime returns, the model fitted to it is recalled at once."""

from __future__ import annotations

import json

import numpy as np

from edgemeta.bench.stream import run_edgemeta
from edgemeta.serve.registry import Registry
from edgemeta.testing.streams import recurring_stream

ADAPT = {"support_size": 10, "holdout_size": 20, "steps": 30, "timeout_s": 60}


def test_a_recurring_regime_is_recalled_and_served_well_at_once(tmp_path, sinusoid_bundle):
    stream = recurring_stream("sinusoid", n=2400, concepts=2, segment=600, seed=3)
    recall = run_edgemeta(stream, sinusoid_bundle.path, tmp_path / "on", **ADAPT)
    forget = run_edgemeta(stream, sinusoid_bundle.path, tmp_path / "off",
                          sections={"memory": {"capacity": 0}}, **ADAPT)
    recalled = [d for d in recall.info["decisions"] if d[0] == "recall"]
    assert len(recalled) >= 2, "both returning concepts were recalled"
    assert all(d[1] == "accepted" and d[2].startswith("recalled_v") for d in recalled)
    assert not [d for d in forget.info["decisions"] if d[0] == "recall"]
    # The 100 rows after each return (segments 3 and 4 repeat 1 and 2): served by a model fitted
    # on hundreds of rows of that concept instead of one adapted on 10.
    returns = np.concatenate([np.arange(s, s + 100) for s in stream.switches[1:]])
    assert recall.loss[returns].mean() < 0.7 * forget.loss[returns].mean()


def _weights(v: float) -> dict[str, np.ndarray]:
    return {"w": np.full(3, v, np.float32), "b": np.zeros(1, np.float32)}


def test_memory_is_bounded_and_keeps_the_most_useful_concepts():
    from edgemeta.daemon.memory import Concept, ConceptMemory

    m = ConceptMemory(capacity=2)
    one = Concept(1, b"", None, _weights(1), {})
    m.remember("s", one)
    m.remember("s", Concept(2, b"", None, _weights(2), {}))
    m.used("s", one)  # recalled: kept over the stalest
    m.remember("s", Concept(3, b"", None, _weights(3), {}))
    assert [c.version for c in m.concepts("s")] == [1, 3]
    assert m.concepts("other") == []


def test_memory_keeps_concepts_not_the_copies_a_recall_commits():
    """Regimes A B A B C A B, capacity 3: each recall serves a remembered model as a new version,
    and at the next drift that copy is what served, so it is remembered again. Keyed by version,
    the copies filled the library and evicted real concepts (A was forgotten by its third
    occurrence); keyed by weights, the three concepts are kept and every recurrence is recalled."""
    from edgemeta.daemon.memory import Concept, ConceptMemory, weights_key

    concept_weights = {name: _weights(i) for i, name in enumerate("ABC", start=1)}
    memory = ConceptMemory(capacity=3)
    version, serving, recalled = 1, None, []
    for regime in "ABABCAB":
        if serving is not None:  # the drift into `regime`: remember what served the last one
            memory.remember("s", Concept(version, b"", None, serving, {}))
        version += 1  # what serves now is committed as a new version, recalled or adapted
        wanted = weights_key(concept_weights[regime])
        known = [c for c in memory.concepts("s") if c.key == wanted]
        if known:
            memory.used("s", known[0])
            recalled.append(regime)
        serving = dict(concept_weights[regime])
    assert recalled == list("ABAB")
    assert sorted(c.version for c in memory.concepts("s")) == [2, 3, 6]  # first versions kept


def test_a_recall_is_a_new_version_with_source_recall_and_an_episode_record(tmp_path,
                                                                           sinusoid_bundle):
    stream = recurring_stream("sinusoid", n=1500, concepts=2, segment=600, seed=3)
    run_edgemeta(stream, sinusoid_bundle.path, tmp_path, **ADAPT,
                 sections={"memory": {"capacity": 4}, "retention": {"keep_models": 1000}})
    manifests = Registry(tmp_path / "state").manifests()
    recall = next(m for m in manifests if m.source == "recall")
    assert recall.holdout["candidate"] < recall.holdout["current"]
    assert recall.note.startswith("recalled v")
    records = [json.loads(p.read_text()) for p in (tmp_path / "state" / "episodes").glob("*")]
    record = next(r for r in records if r["trigger"] == "recall")
    assert record["version"] == recall.version and len(record["holdout"]["y"]) >= 6
