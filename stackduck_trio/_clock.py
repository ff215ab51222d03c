"""Wall-clock time for the core, and the one place it meets trio's clock.

The core works in UTC epoch seconds (a retry due at 12:00 must still be due
at 12:00 after a restart); trio sleeps on its own monotonic clock. A
:class:`Clock` gives the core's ``now`` and converts a wall deadline into a
trio deadline. :class:`TrioWallClock` derives wall time from trio's clock, so
under pytest-trio's ``autojump_clock`` hours of backoff and lease expiry pass
in milliseconds and both clocks stay in lock-step.
"""

from __future__ import annotations

import time
from typing import Protocol

import trio


class Clock(Protocol):
    def now(self) -> float:
        """The current UTC time, epoch seconds."""
        ...

    def trio_deadline(self, wall: float) -> float:
        """The trio deadline at which the wall clock reads ``wall``."""
        ...


class WallClock:
    """The real clock: ``time.time()``."""

    def now(self) -> float:
        return time.time()

    def trio_deadline(self, wall: float) -> float:
        return trio.current_time() + max(0.0, wall - time.time())


class TrioWallClock:
    """Wall time derived from trio's clock (for tests with a mock clock)."""

    def __init__(self, epoch: float | None = None) -> None:
        self._offset = (time.time() if epoch is None else epoch) - trio.current_time()

    def now(self) -> float:
        return trio.current_time() + self._offset

    def trio_deadline(self, wall: float) -> float:
        return wall - self._offset
