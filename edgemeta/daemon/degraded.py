"""Degraded mode: when the disk cannot take writes, pause and retry instead of exiting.

A full disk (or a read-only remount, or an I/O error) is not the fault of the file being handled,
so the file must not be quarantined, and exiting only turns it into a crash loop. Instead ingest
pauses, inputs stay in the inbox, the registry is left alone, and the daemon retries with an
exponential back-off until a write goes through. This class is the pure bookkeeping; the daemon
does the I/O.

>>> d = Degraded(backoff=(1.0, 8.0))
>>> d.fail("disk_full", "No space left on device", now=0.0)
>>> d.active, d.due(0.5), d.due(1.0)
(True, False, True)
>>> d.fail("disk_full", "still full", now=1.0)
>>> d.due(2.5), d.due(3.0)
(False, True)
>>> d.recover(), d.active
(['disk_full'], False)
"""

from __future__ import annotations

import errno
import logging
import time

log = logging.getLogger("edgemeta.daemon")


def reason_of(exc: OSError) -> str:
    return "disk_full" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else "io_error"


class Degraded:
    def __init__(self, backoff: tuple[float, float] = (1.0, 60.0)):
        self.backoff = backoff
        self._reasons: dict[str, str] = {}
        self._delay = 0.0
        self._next = 0.0

    @property
    def active(self) -> bool:
        return bool(self._reasons)

    @property
    def reasons(self) -> dict[str, str]:
        return dict(self._reasons)

    def fail(self, reason: str, message: str, now: float) -> None:
        """A write failed: (stay) degraded and wait longer before the next try."""
        self._reasons[reason] = message
        first, cap = self.backoff
        self._delay = first if self._delay == 0 else min(cap, self._delay * 2)
        self._next = now + self._delay

    def due(self, now: float) -> bool:
        """Whether to try the paused work again (always, when not degraded)."""
        return not self._reasons or now >= self._next

    def recover(self) -> list[str]:
        """A write went through: leave degraded mode; returns the reasons that cleared."""
        cleared = sorted(self._reasons)
        self._reasons.clear()
        self._delay = 0.0
        return cleared


class DegradedMode:
    """The daemon's side of :class:`Degraded`: logs once, keeps ``edgemeta_degraded`` in step,
    and tells ``status`` (``changed``) when the mode comes or goes."""

    def __init__(self, gauge, backoff: tuple[float, float] = (1.0, 60.0)):
        self.state = Degraded(backoff)
        self.gauge = gauge  # edgemeta_degraded{reason}
        self.changed = False

    @property
    def active(self) -> bool:
        return self.state.active

    def due(self, now: float) -> bool:
        return self.state.due(now)

    def fail(self, exc: OSError, what: str) -> None:
        """A write failed for want of disk: run degraded (logged once) and back off."""
        reason = reason_of(exc)
        if not self.state.active:
            log.error("degraded (%s): %s: %s; ingest paused, inputs stay in the inbox", reason,
                      what, exc)
        self.state.fail(reason, str(exc), time.monotonic())
        self.gauge.labels(reason).set(1)
        self.changed = True

    def ok(self) -> None:
        """A write went through: leave degraded mode if in it."""
        if self.state.active:
            for reason in self.state.recover():
                self.gauge.labels(reason).set(0)
            log.warning("writes go through again: ingest resumed")
            self.changed = True
