"""The episodes on their way through the worker and the gate, and those held until it is up.

Why a table of its own: an episode outlives the event that submitted it (the worker answers
later, or restarts and must be asked again), and a drift may supersede it meanwhile. The table
maps the worker's request ids back to episodes, keeps the episodes waiting for a worker that is
starting, and says which stream waits (``status`` shows it as a phase).

>>> from edgemeta.stream.buffers import Episode
>>> table = JobTable()
>>> job = table.add(Job("s", 1, Episode([], [], [], []), complete_at=0.0))
>>> table.hold(job)  # the worker is starting: log once, show it in status
True
>>> table.hold(job)
False
>>> table.waiting_streams()
{'s'}
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from edgemeta.daemon.adapter import AdaptOutcome
from edgemeta.stream.buffers import Episode


@dataclass
class Job:
    """One episode on its way through the worker and the gate."""

    stream: str
    job: int
    episode: Episode
    complete_at: float
    submitted_at: float = 0.0
    outcome: AdaptOutcome | None = None
    fit: dict | None = None  # a continued fit's options (None: the few-shot inner loop)
    looked: int = 0  # holdout rows an early look judged already (the first of the full holdout)
    timings: dict[str, float] = field(default_factory=dict)
    figures: dict = field(default_factory=dict)

    @property
    def key(self) -> tuple[str, int]:
        return self.stream, self.job


class JobTable:
    def __init__(self) -> None:
        self._jobs: dict[tuple[str, int], Job] = {}
        self._requests: dict[int, tuple[str, int]] = {}  # worker request id -> job
        self._waiting: list[tuple[str, int]] = []        # jobs held until the worker is up

    def add(self, job: Job) -> Job:
        self._jobs[job.key] = job
        return job

    def get(self, stream: str, job: int) -> Job | None:
        return self._jobs.get((stream, job))

    def pop(self, stream: str, job: int) -> Job | None:
        """The episode is over (recorded): forget it, its request and its wait."""
        self._waiting = [k for k in self._waiting if k != (stream, job)]
        return self._jobs.pop((stream, job), None)

    def sent(self, job: Job, request_id: int) -> None:
        job.submitted_at = time.perf_counter()
        self._requests[request_id] = job.key
        self._waiting = [k for k in self._waiting if k != job.key]

    def answered(self, request_id: int) -> Job | None:
        """The job a worker outcome belongs to; None when it was superseded or already over."""
        key = self._requests.pop(request_id, None)
        return self._jobs.get(key) if key else None

    def hold(self, job: Job) -> bool:
        """Keep ``job`` until the worker is up; True the first time (say so once)."""
        if job.key in self._waiting:
            return False
        self._waiting.append(job.key)
        return True

    def held(self) -> list[Job]:
        return [self._jobs[k] for k in self._waiting if k in self._jobs]

    def waiting_streams(self) -> set[str]:
        return {stream for stream, _ in self._waiting}
