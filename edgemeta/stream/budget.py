"""A wall-clock guard around the handling of one input: no file may hold the control loop.

Every parser is linear in its input, but linear is not bounded: a guard catches what the parsers'
own limits do not (a pathological shape nobody thought of, a slow disk). It fires SIGALRM after
``seconds`` and raises :class:`TooSlow` in the code that is running, which the inbox quarantines
as ``too_slow``; the loop, the watchdog and ``/metrics`` go on. Signals reach the main thread
only, which is where the daemon's control loop runs; elsewhere the guard does nothing.

>>> import time
>>> try:
...     with time_budget(0.05):
...         time.sleep(1)
... except TooSlow as exc:
...     print(exc)
took longer than 0.05 s
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager


class TooSlow(RuntimeError):
    """The guarded block ran out of its time budget."""


@contextmanager
def time_budget(seconds: float) -> Iterator[None]:
    if seconds <= 0 or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expired(signum, frame):
        raise TooSlow(f"took longer than {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
