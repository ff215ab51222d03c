"""The dashboard's recent history: throughput and latency, one sample a second.

Pure and small: :class:`History` is fed the instance's running totals and the
delivery waits observed since the previous sample (by a runtime task, with
the time passed in) and keeps the last ``size`` samples in a ring buffer.
Nothing here reads a clock or does I/O.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Sequence

import attrs


@attrs.frozen
class Totals:
    """Monotonic counts since the server started (this instance)."""

    enqueued: int = 0
    completed: int = 0
    #: failed attempts: retried or dead-lettered
    failed: int = 0


@attrs.frozen
class Sample:
    """One interval: rates per second, and enqueue→start latency quantiles (seconds)."""

    t: float
    enqueued: float
    completed: float
    failed: float
    #: ``None`` when nothing started in the interval
    p50: float | None
    p99: float | None
    started: int


def quantile(ordered: Sequence[float], q: float) -> float | None:
    """Nearest-rank quantile of sorted values; ``None`` for no values."""
    if not ordered:
        return None
    rank = max(math.ceil(q * len(ordered)), 1)
    return ordered[min(rank, len(ordered)) - 1]


class History:
    """A ring buffer of :class:`Sample` (the last ``size`` intervals)."""

    def __init__(self, size: int = 600) -> None:
        self.samples: collections.deque[Sample] = collections.deque(maxlen=size)
        self._last: tuple[float, Totals] | None = None

    def record(self, t: float, totals: Totals, waits: Sequence[float]) -> Sample | None:
        """Close the interval ending at ``t``; the first call only sets the baseline."""
        last, self._last = self._last, (t, totals)
        if last is None or t <= last[0]:
            return None
        then, before = last
        span = t - then
        ordered = sorted(waits)
        sample = Sample(
            t=t,
            enqueued=max(totals.enqueued - before.enqueued, 0) / span,
            completed=max(totals.completed - before.completed, 0) / span,
            failed=max(totals.failed - before.failed, 0) / span,
            p50=quantile(ordered, 0.50),
            p99=quantile(ordered, 0.99),
            started=len(ordered),
        )
        self.samples.append(sample)
        return sample

    def since(self, t: float) -> list[Sample]:
        """The samples after ``t`` (all of them for ``t`` = 0), oldest first."""
        return [s for s in self.samples if s.t > t]
