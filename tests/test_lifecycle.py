"""The per-stream adaptation lifecycle: transition tables and random event sequences."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgemeta.daemon.lifecycle import (
    Cancel,
    Completed,
    DriftDetected,
    Due,
    Finished,
    Fit,
    Gate,
    Lifecycle,
    LifecycleError,
    Open,
    Phase,
    Policy,
    Reason,
    Recalled,
    Record,
    Reloaded,
    ResetDetector,
    RolledBack,
    Started,
    Stopping,
    Submit,
    Superseded,
    Swapped,
    Triggered,
    WeightsReady,
    diagram,
)

POLICY = Policy(early_rows=5, refine=(40, 100), retries=2)


def drive(m: Lifecycle, *events) -> list:
    out = []
    for e in events:
        out += m.handle(e)
        m.check()
    return out


def through_gate(m: Lifecycle, result: str, expected: float | None = None) -> list:
    """Complete the open collection and end its episode with ``result``."""
    submit = drive(m, Completed())[0]
    out = drive(m, WeightsReady(submit.job))
    return out + drive(m, Finished(submit.job, result, "why", expected))


@pytest.mark.parametrize("start, event, phase, reason, actions", [
    ("watching", DriftDetected(backfill=True), Phase.COLLECTING, Reason.DRIFT,
     [Open(Reason.DRIFT, None, 5, "backfill")]),
    ("watching", DriftDetected(backfill=False), Phase.COLLECTING, Reason.DRIFT,
     [Open(Reason.DRIFT, None, 5, "none")]),
    ("watching", Triggered(), Phase.COLLECTING, Reason.MANUAL, [Open(Reason.MANUAL)]),
    ("watching", Started(meta_init=True), Phase.COLLECTING, Reason.INITIAL,
     [Open(Reason.INITIAL, None, 5)]),
    ("watching", Started(meta_init=False), Phase.WATCHING, None, []),
    ("watching", Due(), Phase.ADAPTING, Reason.CONTINUAL, [Fit(1)]),
    ("collecting", Due(), Phase.COLLECTING, Reason.DRIFT, []),  # the episode's own fit first
    ("adapting", Due(), Phase.ADAPTING, Reason.DRIFT, []),
    ("refining", Due(), Phase.REFINING, Reason.REFINE, []),
    # The detector never sleeps: a drift restarts a drift collection from the new change point
    # and supersedes whatever else is open.
    ("collecting", DriftDetected(), Phase.COLLECTING, Reason.DRIFT,
     [Superseded(Reason.DRIFT, restart=True), Cancel(), Open(Reason.DRIFT, None, 5, "backfill")]),
    ("initial", DriftDetected(), Phase.COLLECTING, Reason.DRIFT,
     [Superseded(Reason.INITIAL), Cancel(), Open(Reason.DRIFT, None, 5, "backfill")]),
    ("adapting", DriftDetected(), Phase.COLLECTING, Reason.DRIFT,
     [Superseded(Reason.DRIFT), Record(1, Reason.DRIFT, "superseded", "drift"),
      Open(Reason.DRIFT, None, 5, "backfill")]),
    ("gating", DriftDetected(False), Phase.COLLECTING, Reason.DRIFT,
     [Superseded(Reason.DRIFT), Record(1, Reason.DRIFT, "superseded", "drift"),
      Open(Reason.DRIFT, None, 5, "none")]),
    ("continual", DriftDetected(), Phase.COLLECTING, Reason.DRIFT,
     [Superseded(Reason.CONTINUAL), Record(1, Reason.CONTINUAL, "superseded", "drift"),
      Open(Reason.DRIFT, None, 5, "backfill")]),
    ("resumed", DriftDetected(), Phase.COLLECTING, Reason.DRIFT,
     [Superseded(Reason.DRIFT, restart=True), Cancel(),
      Record(1, Reason.DRIFT, "superseded", "drift"), Open(Reason.DRIFT, None, 5, "backfill")]),
    # The full holdout of an inconclusive early gate judges the same weights: no new job.
    ("resumed", Completed(), Phase.GATING, Reason.DRIFT, [Gate(1, early=False)]),
    ("collecting", Recalled(0.4), Phase.COLLECTING, Reason.DRIFT, [ResetDetector(0.4)]),
    ("refining", Recalled(0.4), Phase.WATCHING, None, [Cancel(), ResetDetector(0.4)]),
    ("collecting", Triggered(), Phase.COLLECTING, Reason.MANUAL, [Cancel(), Open(Reason.MANUAL)]),
    ("collecting", Reloaded(), Phase.COLLECTING, Reason.DRIFT, [Open(Reason.DRIFT, None, 5)]),
    ("collecting", Stopping(), Phase.WATCHING, None, [Cancel()]),
    ("collecting", Completed(), Phase.ADAPTING, Reason.DRIFT, [Submit(1, Reason.DRIFT)]),
    ("adapting", WeightsReady(1), Phase.GATING, Reason.DRIFT, [Gate(1, True)]),
    ("adapting", WeightsReady(7), Phase.ADAPTING, Reason.DRIFT, []),  # stale job: ignored
    ("adapting", Triggered(), Phase.ADAPTING, Reason.DRIFT, []),      # pending, see below
    ("adapting", Reloaded(), Phase.ADAPTING, Reason.DRIFT, []),
    ("adapting", Finished(1, "failed", "worker_died"), Phase.COLLECTING, Reason.RETRY,
     [Record(1, Reason.DRIFT, "failed", "worker_died"), Open(Reason.RETRY)]),
    ("gating", Finished(1, "inconclusive"), Phase.COLLECTING, Reason.DRIFT,
     [Open(Reason.DRIFT, None, None, "episode")]),
    ("gating", Finished(1, "accepted", "better", 0.2), Phase.REFINING, Reason.REFINE,
     [Record(1, Reason.DRIFT, "accepted", "better"), ResetDetector(0.2),
      Open(Reason.REFINE, 40)]),
    ("refining", DriftDetected(), Phase.COLLECTING, Reason.DRIFT,
     [Superseded(Reason.REFINE), Cancel(), Open(Reason.DRIFT, None, 5, "backfill")]),
    ("refining", RolledBack(), Phase.WATCHING, None, [Cancel(), ResetDetector()]),
    ("refining", Swapped(), Phase.WATCHING, None, [Cancel(), ResetDetector()]),
    ("refining", Reloaded(), Phase.REFINING, Reason.REFINE, [Open(Reason.REFINE, 40, None)]),
])
def test_each_phase_takes_each_event_as_the_table_says(start, event, phase, reason, actions):
    m = Lifecycle(POLICY)
    setup = {"watching": [], "collecting": [DriftDetected()],
             "initial": [Started(meta_init=True)],
             "adapting": [DriftDetected(), Completed()],
             "continual": [Due()],
             "gating": [DriftDetected(), Completed(), WeightsReady(1)],
             "resumed": [DriftDetected(), Completed(), WeightsReady(1),
                         Finished(1, "inconclusive")]}
    if start == "refining":
        drive(m, DriftDetected())
        through_gate(m, "accepted", 0.2)
    else:
        drive(m, *setup[start])
    assert drive(m, event) == actions
    assert (m.phase, m.reason) == (phase, reason)


def test_a_trigger_while_a_drift_episode_is_in_flight_opens_a_manual_episode_after_it():
    """The bug this machine was written for: the manual episode used to be committed as drift."""
    m = Lifecycle(POLICY)
    drive(m, DriftDetected(), Completed(), Triggered(), WeightsReady(1))
    ended = drive(m, Finished(1, "accepted", "better", 0.3))
    assert ended[0] == Record(1, Reason.DRIFT, "accepted", "better")
    assert ended[-1] == Open(Reason.MANUAL)  # not a refinement: the operator asked first
    assert drive(m, Completed()) == [Submit(2, Reason.MANUAL)]


def test_rejected_drift_episodes_are_retried_then_given_up():
    m = Lifecycle(POLICY)
    drive(m, DriftDetected())
    reasons = []
    for _ in range(3):
        reasons.append(m.reason)
        through_gate(m, "rejected")
    assert reasons == [Reason.DRIFT, Reason.RETRY, Reason.RETRY]
    assert m.phase is Phase.WATCHING and m.retries == 0 and m.unresolved


def test_refinements_follow_an_accepted_drift_episode_and_the_fit_level_only_improves():
    m = Lifecycle(POLICY)
    drive(m, DriftDetected())
    through_gate(m, "accepted", 0.5)
    assert (m.reason, m.support_size, m.unresolved) == (Reason.REFINE, 40, False)
    out = through_gate(m, "accepted", 0.8)  # straddles a change: judged by the best fit, 0.5
    assert ResetDetector(0.5) in out and m.support_size == 100 and m.fit_level == 0.5
    out = through_gate(m, "rejected")
    assert not any(isinstance(a, ResetDetector) for a in out)  # nothing changed
    assert m.phase is Phase.WATCHING and m.refine_stage == 0


def test_a_reload_reopens_an_open_collection_with_its_reason():
    m = Lifecycle(POLICY)
    drive(m, Triggered())
    assert drive(m, Reloaded()) == [Open(Reason.MANUAL)]
    assert drive(m, Completed()) == [Submit(1, Reason.MANUAL)]


def test_while_stopping_jobs_finish_but_nothing_new_opens():
    m = Lifecycle(POLICY)
    drive(m, DriftDetected(), Completed(), Stopping())
    assert drive(m, Triggered(), DriftDetected()) == []
    out = drive(m, Finished(1, "rejected", "not_better"))
    assert out == [Record(1, Reason.DRIFT, "rejected", "not_better")]
    assert m.phase is Phase.WATCHING


def test_a_completed_collection_outside_a_collection_is_a_caller_bug():
    with pytest.raises(LifecycleError):
        Lifecycle(POLICY).handle(Completed())


EVENTS = st.one_of(
    st.builds(Started, st.booleans()), st.builds(DriftDetected, st.booleans()),
    st.just(Triggered()), st.just(Completed()), st.just(RolledBack()), st.just(Swapped()),
    st.just(Reloaded()), st.just(Stopping()), st.just(Due()), st.builds(Recalled, st.just(0.2)),
    st.tuples(st.sampled_from(["weights", "accepted", "rejected", "failed", "timeout",
                               "inconclusive"]), st.integers(0, 2)),
)


@settings(max_examples=1500, deadline=None)
@given(st.lists(EVENTS, max_size=60), st.sampled_from([
    POLICY, Policy(early_rows=None, refine=(), retries=0), Policy(early_rows=3, retries=5)]))
def test_random_event_sequences_keep_the_state_valid_and_record_each_episode_once(events, policy):
    m = Lifecycle(policy)
    opened: dict[int, Reason] = {}
    recorded: dict[int, int] = {}
    last_open: Reason | None = None
    for e in events:
        if isinstance(e, tuple):  # an outcome for the job in flight (or a stale one)
            kind, offset = e
            job = (m.job or 0) + (offset if offset == 2 else 0)
            e = WeightsReady(job) if kind == "weights" else Finished(job, kind, "x", 0.1)
        if isinstance(e, Completed) and not m.collecting:
            continue
        try:
            actions = m.handle(e)
        except LifecycleError:
            assert isinstance(e, WeightsReady)  # weights for the job while it is at the gate
            continue
        m.check()
        for a in actions:
            if isinstance(a, Open):
                last_open = a.reason
            elif isinstance(a, Submit):
                # Each job is submitted once (an inconclusive early gate judges its weights
                # again on new rows, it does not adapt again), with the reason that opened it.
                assert a.reason == last_open and a.job not in opened
                opened[a.job] = a.reason
            elif isinstance(a, Fit):
                assert a.job not in opened and m.reason is Reason.CONTINUAL
                opened[a.job] = Reason.CONTINUAL
            elif isinstance(a, Record):
                assert opened[a.job] == a.reason, "recorded with the reason that opened it"
                recorded[a.job] = recorded.get(a.job, 0) + 1
    assert all(n == 1 for n in recorded.values())
    in_flight = {j for j in (m.job, m.resumed) if j is not None}
    assert set(opened) == set(recorded) | in_flight, "every submitted episode ends in a record"


def test_the_state_diagram_in_the_docs_is_the_one_the_code_draws():
    doc = (Path(__file__).parent.parent / "docs" / "lifecycle.md").read_text()
    assert diagram() in doc, "regenerate it: python -c 'from edgemeta.daemon.lifecycle " \
                             "import diagram; print(diagram())'"


def test_a_continual_fit_neither_refines_nor_retries_nor_resets_the_detector():
    m = Lifecycle(POLICY)
    assert drive(m, Due()) == [Fit(1)]
    drive(m, WeightsReady(1))
    assert drive(m, Finished(1, "accepted", "better", 0.1)) == [
        Record(1, Reason.CONTINUAL, "accepted", "better")]
    assert m.phase is Phase.WATCHING and m.fit_level == 0.1
    drive(m, Due(), WeightsReady(2))
    assert drive(m, Finished(2, "rejected", "not_better")) == [
        Record(2, Reason.CONTINUAL, "rejected", "not_better")]
    assert m.phase is Phase.WATCHING


def test_an_accepted_continual_fit_resolves_a_drift_whose_episodes_were_all_rejected():
    m = Lifecycle(Policy(early_rows=None, refine=(), retries=0))
    drive(m, DriftDetected())
    through_gate(m, "rejected")
    assert m.unresolved and m.phase is Phase.WATCHING  # no retries left: the old model serves
    drive(m, Due(), WeightsReady(2), Finished(2, "accepted", "better", 0.3))
    assert not m.unresolved
