"""The adaptation lifecycle of one stream, as one explicit state machine: events in, actions out.

Why a machine: the lifecycle (drift -> collect -> adapt -> gate -> swap -> refine -> retry) used to
be the product of half a dozen flags spread over the daemon, and its bugs lived in their
combinations (a manual episode committed as ``drift``, a reload that dropped open collections but
kept their reasons). Here the phase, the reason an episode was opened, its job number, the retry
count, the refinement stage and the fit level live in one place, every transition is in
:meth:`Lifecycle.handle`, and nothing does I/O: the daemon carries out the returned actions and
reports what happened as further events. ``docs/lifecycle.md`` holds the diagram
:func:`diagram` draws from this code.

>>> m = Lifecycle(Policy(early_rows=5, refine=(40,), retries=1))
>>> m.handle(DriftDetected(backfill=True))
[Open(reason=<Reason.DRIFT: 'drift'>, support_size=None, holdout_size=5, seed='backfill')]
>>> m.handle(Completed())
[Submit(job=1, reason=<Reason.DRIFT: 'drift'>)]
>>> m.handle(WeightsReady(job=1))
[Gate(job=1, early=True)]
>>> [type(a).__name__ for a in m.handle(Finished(job=1, result="accepted", why="better",
...                                              expected=0.1))]
['Record', 'ResetDetector', 'Open']
>>> m.phase, m.reason
(<Phase.REFINING: 'refining'>, <Reason.REFINE: 'refine'>)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum


class Phase(StrEnum):
    # The drift detector watches the serving model in every phase: a drift while an episode is
    # open supersedes it (its rows span two regimes, or only the old one).
    WATCHING = "watching"      # serving, nothing open
    COLLECTING = "collecting"  # gathering support + holdout rows
    ADAPTING = "adapting"      # the episode is complete: queued for or running in the worker
    GATING = "gating"          # weights are back: the candidate is being judged on the holdout
    REFINING = "refining"      # an accepted model serves and a larger support is gathered


class Reason(StrEnum):
    """Why an episode was opened; recorded with it and in the registry as the version's source."""

    INITIAL = "initial"  # the bundle's bare meta-initialization serves: adapt it to this device
    DRIFT = "drift"      # the detector saw the serving model get worse
    MANUAL = "manual"    # an operator's ``trigger adapt``
    REFINE = "refine"    # more labels since an accepted adaptation: adapt again on more rows
    RETRY = "retry"      # a drift episode was not accepted and the drift stands
    CONTINUAL = "continual"  # the regime has grown: learn on from all its rows (and challenge a
    #                          serving model that a fresh fit would beat, accepted or not)


RESULTS = ("accepted", "rejected", "failed", "timeout", "inconclusive")
#: Results an episode record can carry: the worker's and the gate's, and ``superseded`` (a drift
#: while it was open: its rows no longer describe the world that serving meets).
RECORDED = ("accepted", "rejected", "failed", "timeout", "superseded")


@dataclass(frozen=True)
class Policy:
    """The settings the lifecycle decides by (``adaptation.*`` and ``gate.early_rows``)."""

    early_rows: int | None = None  # holdout size of the early gate; None: always the full one
    refine: tuple[int, ...] = ()   # support sizes of the refinements after an accepted episode
    retries: int = 0               # new collections after a drift episode is not accepted
    adapt_on_start: bool = True


# -- events ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Started:
    """The daemon is up; ``meta_init``: the stream is served by a bare meta-initialization."""

    meta_init: bool


@dataclass(frozen=True)
class DriftDetected:
    """An alarm; ``backfill``: the rows since the estimated change point may seed the support."""

    backfill: bool = True


@dataclass(frozen=True)
class Due:
    """The regime's rows have grown enough for a continued fit (``stream/regime.py``)."""


@dataclass(frozen=True)
class Recalled:
    """A model remembered from an earlier regime now serves (``daemon/recall.py``): the drift
    is resolved, the detector watches the recalled model, a refinement of the model it replaced
    is dropped, and a drift episode in flight goes on and must beat the recalled model."""

    expected: float | None = None


@dataclass(frozen=True)
class Triggered:
    """An operator asked for an adaptation."""


@dataclass(frozen=True)
class Completed:
    """The open collection has its support and holdout rows."""


@dataclass(frozen=True)
class WeightsReady:
    job: int


@dataclass(frozen=True)
class Finished:
    """How episode ``job`` ended; ``inconclusive``: the early gate wants the full holdout."""

    job: int
    result: str
    why: str = ""
    expected: float | None = None  # the accepted model's holdout loss


@dataclass(frozen=True)
class RolledBack:
    """The model this stream is served by was rolled back (probation or an operator)."""


@dataclass(frozen=True)
class Swapped:
    """Another stream that shares this stream's model had a new version swapped in."""


@dataclass(frozen=True)
class Reloaded:
    """The config was re-read: open collections were replaced by fresh ones."""


@dataclass(frozen=True)
class Stopping:
    """The daemon drains: jobs in flight finish, nothing new is opened."""


Event = (Started | DriftDetected | Due | Recalled | Triggered | Completed | WeightsReady
         | Finished | RolledBack | Swapped | Reloaded | Stopping)


# -- actions ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Open:
    """Start a collection; ``seed``: ``none``, ``backfill`` (rows since the change point) or
    ``episode`` (the rows of the episode the early gate found inconclusive)."""

    reason: Reason
    support_size: int | None = None
    holdout_size: int | None = None
    seed: str = "none"


@dataclass(frozen=True)
class Cancel:
    """Discard the open collection (it never became an episode, so nothing is recorded)."""


@dataclass(frozen=True)
class Superseded:
    """A drift ended the open collection or episode of ``reason`` (``restart``: it was a drift
    collection, restarted from the new change point). A job among them is recorded as
    ``superseded`` by its own :class:`Record`."""

    reason: Reason
    restart: bool = False


@dataclass(frozen=True)
class Submit:
    job: int
    reason: Reason


@dataclass(frozen=True)
class Fit:
    """A continued fit on the regime's rows: the episode is the regime buffer's, not a
    collection's, and the worker trains on to the asymptote instead of the few-shot loop."""

    job: int


@dataclass(frozen=True)
class Gate:
    job: int
    early: bool


@dataclass(frozen=True)
class Record:
    """Episode ``job`` is over: count it and write it, with the reason that opened it."""

    job: int
    reason: Reason
    result: str
    why: str


@dataclass(frozen=True)
class ResetDetector:
    """A new baseline for the detector (after a swap, or a settled episode); ``expected``: the new
    model's holdout loss, against which an immediate misfit is caught."""

    expected: float | None = None


Action = Open | Cancel | Superseded | Submit | Fit | Gate | Record | ResetDetector


class LifecycleError(RuntimeError):
    """An event the current phase cannot take (a bug in the caller, never an input's fault)."""


@dataclass
class Lifecycle:
    """One stream's lifecycle. All fields are read-only outside :meth:`handle`."""

    policy: Policy
    phase: Phase = Phase.WATCHING
    reason: Reason | None = None
    job: int | None = None           # the episode in the worker or at the gate
    jobs: int = 0                    # episodes submitted so far (job numbers are 1, 2, ...)
    early: bool = False              # the open collection's holdout is the early gate's
    support_size: int | None = None  # of the open collection (None: adaptation.support_size)
    retries: int = 0
    refine_stage: int = 0
    fit_level: float | None = None   # best holdout loss accepted since the last drift
    unresolved: bool = False         # a detected drift awaits an accepted adaptation
    manual_pending: bool = False     # a trigger arrived while an episode was in flight
    resumed: int | None = None       # the job an inconclusive early gate sent back to collect
    stopping: bool = False
    log: list[Action] = field(default_factory=list, repr=False)

    @property
    def collecting(self) -> bool:
        return self.phase in (Phase.COLLECTING, Phase.REFINING)

    @property
    def busy(self) -> bool:
        """An episode is queued for, running in, or being judged after the worker."""
        return self.phase in (Phase.ADAPTING, Phase.GATING)

    def handle(self, event: Event) -> list[Action]:
        actions = self._handle(event)
        self.log = actions
        return actions

    # -- transitions -------------------------------------------------------------------------------
    def _handle(self, event: Event) -> list[Action]:
        if isinstance(event, Stopping):
            self.stopping = True
            self.manual_pending = False
            return self._to_watching() if self.collecting else []
        if self.stopping:
            return [] if not isinstance(event, (WeightsReady, Finished)) else self._job_event(event)
        for kind, handler in self._HANDLERS:
            if isinstance(event, kind):
                return handler(self, event)
        raise LifecycleError(f"unknown event {event!r}")

    def _started(self, event: Started) -> list[Action]:
        if event.meta_init and self.policy.adapt_on_start and self.phase is Phase.WATCHING:
            return self._open(Reason.INITIAL, early=True)
        return []

    def _recalled(self, event: Recalled) -> list[Action]:
        self.unresolved, self.fit_level = False, event.expected
        self.retries = 0
        # The model a refinement was improving no longer serves.
        cancel = self._to_watching() if self.phase is Phase.REFINING else []
        return [*cancel, ResetDetector(event.expected)]

    def _due(self, event: Due) -> list[Action]:
        if self.phase is not Phase.WATCHING or self.manual_pending:
            return []  # an episode is open: its own adaptation comes first
        self.jobs += 1
        self.job, self.phase, self.reason, self.early = (self.jobs, Phase.ADAPTING,
                                                         Reason.CONTINUAL, False)
        return [Fit(self.job)]

    def _triggered(self, event: Triggered) -> list[Action]:
        if self.busy:
            self.manual_pending = True  # honoured when the episode in flight ends
            return []
        return [*self._cancel(), *self._open(Reason.MANUAL)]

    def _completed(self, event: Completed) -> list[Action]:
        if not self.collecting:
            raise LifecycleError(f"a collection completed in phase {self.phase.value}")
        if self.resumed is not None:
            # The full holdout of an episode the early gate found inconclusive: its weights
            # are judged on it, not adapted again.
            self.job, self.resumed, self.phase = self.resumed, None, Phase.GATING
            return [Gate(self.job, early=False)]
        self.jobs += 1
        self.job, self.phase = self.jobs, Phase.ADAPTING
        return [Submit(self.job, self.reason)]

    def _rolled_back(self, event: RolledBack) -> list[Action]:
        self.refine_stage, self.fit_level = 0, None
        cancel = self._to_watching() if self.phase is Phase.REFINING else []
        return [*cancel, ResetDetector()]

    def _swapped(self, event: Swapped) -> list[Action]:
        # The model a refinement was improving is gone: watch the new one instead.
        cancel = self._to_watching() if self.phase is Phase.REFINING else []
        return [*cancel, ResetDetector()]

    def _reloaded(self, event: Reloaded) -> list[Action]:
        if not self.collecting:
            return []
        # The collector was replaced: reopen it for the same reason with the new settings.
        if self.resumed is not None:
            return [Open(self.reason, self.support_size, None, seed="episode")]
        return [Open(self.reason, self.support_size,
                     self.policy.early_rows if self.early else None)]

    def _drift(self, event: DriftDetected) -> list[Action]:
        """A drift in any phase: whatever is open learned from rows of the world before the
        change (or of both worlds), so it is superseded and a drift collection opens from the
        new change point; a drift during a drift collection restarts it."""
        superseded: list[Action] = []
        if self.busy:
            superseded = [Superseded(self.reason),
                          Record(self.job, self.reason, "superseded", "drift")]
            self.job = None  # its outcome, when the worker sends it, is stale
        elif self.collecting:
            restart = self.reason in (Reason.DRIFT, Reason.RETRY)
            superseded = [Superseded(self.reason, restart), *self._cancel("superseded", "drift")]
        self.unresolved = True
        self.retries, self.refine_stage, self.fit_level = 0, 0, None
        return [*superseded, *self._open(Reason.DRIFT, early=True,
                                         seed="backfill" if event.backfill else "none")]

    def _job_event(self, event: WeightsReady | Finished) -> list[Action]:
        if event.job != self.job:
            return []  # a stale outcome (its episode was already concluded)
        if isinstance(event, WeightsReady):
            if self.phase is not Phase.ADAPTING:
                raise LifecycleError(f"weights for job {event.job} in phase {self.phase.value}")
            self.phase = Phase.GATING
            return [Gate(event.job, self.early)]
        if event.result not in RESULTS:
            raise LifecycleError(f"unknown result {event.result!r}")
        if event.result == "inconclusive":
            if self.early and not self.stopping and not self.manual_pending:
                # Same episode and weights, judged again on the full holdout (the early rows and
                # those after them; the two looks share ``gate.alpha``, see gate.py); the
                # episode keeps its job number.
                self.resumed, self.job = self.job, None
                reason = self.reason
                self.phase, self.early = Phase.COLLECTING, False
                return [Open(reason, self.support_size, None, seed="episode")]
            return self._conclude(Finished(event.job, "rejected", event.why or "inconclusive"))
        return self._conclude(event)

    def _conclude(self, event: Finished) -> list[Action]:
        reason, accepted = self.reason, event.result == "accepted"
        actions: list[Action] = [Record(event.job, reason, event.result, event.why)]
        self.job, self.reason, self.phase, self.early = None, None, Phase.WATCHING, False
        expected = event.expected
        if accepted:
            if reason is Reason.REFINE and self.fit_level is not None and expected is not None:
                # A refinement whose holdout straddles a new change can beat a model that no
                # longer fits and still be bad: judge the next rows by the best fit so far.
                expected = min(expected, self.fit_level)
            self.fit_level = expected
            self.unresolved = False
        if accepted and reason is not Reason.CONTINUAL:
            # A new model serves: a new baseline. (A continued fit is the same regime and a
            # better model: its error falls, which no detector alarms on. A rejected episode
            # changed nothing, and the detector never stopped watching.)
            actions.append(ResetDetector(expected))
        stage = self.refine_stage + 1 if reason is Reason.REFINE else 0
        self.refine_stage = 0
        retry = (not accepted and reason in (Reason.DRIFT, Reason.RETRY) and self.unresolved
                 and self.retries < self.policy.retries)
        if self.stopping:
            return actions
        if self.manual_pending:
            self.manual_pending, self.retries = False, 0
            return actions + self._open(Reason.MANUAL)
        if (accepted and reason not in (Reason.MANUAL, Reason.CONTINUAL)
                and stage < len(self.policy.refine)):
            # Labels keep coming: adapt again on a larger support while the new model serves.
            self.refine_stage, self.retries = stage, 0
            return actions + self._open(Reason.REFINE, support_size=self.policy.refine[stage])
        if retry:
            # The drift stands and the drifted model still serves: a fresh detector would take its
            # bad error as the new normal, so collect again on new rows.
            self.retries += 1
            return actions + self._open(Reason.RETRY)
        self.retries = 0
        return actions

    # -- helpers -----------------------------------------------------------------------------------
    def _open(self, reason: Reason, early: bool = False, support_size: int | None = None,
              seed: str = "none") -> list[Action]:
        holdout = self.policy.early_rows if early and self.policy.early_rows else None
        self.phase = Phase.REFINING if reason is Reason.REFINE else Phase.COLLECTING
        self.reason, self.early, self.support_size = reason, holdout is not None, support_size
        return [Open(reason, support_size, holdout, seed)]

    def _cancel(self, result: str = "rejected", why: str = "inconclusive") -> list[Action]:
        """Abandon the open collection. A fresh one is not an episode yet (nothing to record);
        one that an inconclusive early gate sent back for more rows is, and ends here."""
        if not self.collecting:
            return []
        actions: list[Action] = [Cancel()]
        if self.resumed is not None:
            actions.append(Record(self.resumed, self.reason, result, why))
            self.resumed = None
        return actions

    def _to_watching(self) -> list[Action]:
        actions = self._cancel()
        self.phase, self.reason, self.early, self.support_size = Phase.WATCHING, None, False, None
        return actions

    def check(self) -> None:
        """Raise when the fields contradict each other (the property tests call it after every
        event; a contradiction is a bug in :meth:`handle`)."""
        problems = []
        if (self.phase is Phase.WATCHING) != (self.reason is None):
            problems.append("a reason exactly when not watching")
        if self.busy != (self.job is not None):
            problems.append("a job exactly while adapting or gating")
        if (self.phase is Phase.REFINING) and self.reason is not Reason.REFINE:
            problems.append("refining only for a refinement")
        if self.reason is Reason.REFINE and self.phase is Phase.COLLECTING:
            problems.append("a refinement collects while watching (REFINING)")
        if self.retries > self.policy.retries:
            problems.append("retries within adaptation.retries")
        if self.early and not self.policy.early_rows:
            problems.append("an early gate only when gate.early_rows is set")
        if self.refine_stage and self.refine_stage >= len(self.policy.refine):
            problems.append("a refinement stage that exists")
        if problems:
            raise LifecycleError(f"invalid state {self!r}: expected {'; '.join(problems)}")


# Which transition each event takes (Stopping, and everything while stopping, come first).
Lifecycle._HANDLERS = (
    (Started, Lifecycle._started), (DriftDetected, Lifecycle._drift),
    (Recalled, Lifecycle._recalled), (Due, Lifecycle._due), (Triggered, Lifecycle._triggered),
    (Completed, Lifecycle._completed), (WeightsReady, Lifecycle._job_event),
    (Finished, Lifecycle._job_event), (RolledBack, Lifecycle._rolled_back),
    (Swapped, Lifecycle._swapped), (Reloaded, Lifecycle._reloaded),
)

# -- the diagram in docs/lifecycle.md --------------------------------------------------------------
_PROBES: tuple[tuple[str, object], ...] = (
    ("start on a meta-init", Started(meta_init=True)),
    ("drift", DriftDetected()),
    ("trigger", Triggered()),
    ("regime grown", Due()),
    ("sets complete", Completed()),
    ("weights", "weights"),
    ("accepted", "accepted"),
    ("rejected", "rejected"),
    ("failed/timeout", "failed"),
    ("inconclusive", "inconclusive"),
    ("recalled", Recalled()),
    ("rolled back", RolledBack()),
    ("shared model swapped", Swapped()),
)


def _state_name(m: Lifecycle) -> str:
    return m.phase.value if m.reason is None else f"{m.phase.value}:{m.reason.value}"


def diagram(policy: Policy | None = None) -> str:
    """A Mermaid state diagram of every (phase, reason) reachable under ``policy``, found by
    driving the machine itself, so the picture cannot drift from the code."""
    import copy

    policy = policy or Policy(early_rows=5, refine=(40,), retries=1)
    start = Lifecycle(policy)
    seen, edges, todo = {_state_name(start)}, set(), [start]
    while todo:
        m = todo.pop()
        for label, probe in _PROBES:
            n = copy.deepcopy(m)
            if isinstance(probe, str):
                # Outcomes as the daemon sends them: a verdict only from the gate, and
                # "inconclusive" only for an early gate.
                if n.job is None or (probe in ("accepted", "inconclusive")
                                     and n.phase is not Phase.GATING) or (
                        probe == "inconclusive" and not n.early):
                    continue
                event = WeightsReady(n.job) if probe == "weights" else Finished(n.job, probe)
            else:
                event = probe
            try:
                n.handle(event)
            except LifecycleError:
                continue
            a, b = _state_name(m), _state_name(n)
            if a == b and not any(isinstance(x, (Open, Superseded)) for x in n.log):
                continue  # a reset of the detector at most: not a transition
            edges.add((a, b, label))
            if b not in seen:
                seen.add(b)
                todo.append(n)
    lines = ["stateDiagram-v2", "    [*] --> watching"]
    for a, b, label in sorted(edges):
        lines.append(f"    {a.replace(':', '_')} --> {b.replace(':', '_')}: {label}")
    return "\n".join(lines) + "\n"
