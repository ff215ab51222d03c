"""Delivery order: strict priority, then first in, first out.

The order key of a ready job is ``(priority, seq)``: priority 1 sorts before 2
before 3, and ``seq`` orders jobs within a priority by the moment they became
ready. ``seq`` is the job's ready time in whole microseconds since
:data:`EPOCH` (2020-01-01T00:00:00Z), made strictly increasing per instance by
:class:`SequenceClock` (a hybrid logical clock: if two jobs become ready in the
same microsecond, or the wall clock steps back, the later one gets
``previous + 1``). Using time rather than a bare counter keeps instances that
share a Redis queue roughly FIFO with one another without a shared counter.

Redis sorted-set scores are IEEE-754 doubles, exact for integers below 2**53.
The score packs the key into that budget::

    score = (priority - 1) * 2**SEQ_BITS + seq        SEQ_BITS = 51

    bits 51..52   priority - 1   (0, 1, 2; 3 is unused)
    bits  0..50   seq            (2**51 us = 71.3 years: until 2091)

Every score is an integer below 3 * 2**51 < 2**53, so it is represented exactly
as a double, the encoding is injective, and score order equals key order
(tests/core/test_ordering.py proves both with hypothesis). ``seq`` values
outside the budget are refused with ``ValueError`` rather than wrapped.
"""

from __future__ import annotations

import math
from typing import Final

import attrs

from ._errors import StackduckError
from ._job import Job, Status

__all__ = [
    "EPOCH",
    "MAX_SEQ",
    "SEQ_BITS",
    "Placement",
    "SequenceClock",
    "decode_score",
    "order_key",
    "placement",
    "ready_seq",
    "score",
]

#: 2020-01-01T00:00:00Z in Unix seconds.
EPOCH: Final = 1577836800
SEQ_BITS: Final = 51
MAX_SEQ: Final = (1 << SEQ_BITS) - 1


def order_key(priority: int, seq: int) -> tuple[int, int]:
    """The total-order key of a ready job: smaller is delivered first."""
    return (priority, seq)


def score(priority: int, seq: int) -> float:
    """Encode ``(priority, seq)`` as an exact Redis sorted-set score."""
    if not 1 <= priority <= 3:
        raise ValueError(f"priority {priority} is outside 1..3")
    if not 0 <= seq <= MAX_SEQ:
        raise ValueError(f"seq {seq} is outside 0..{MAX_SEQ}")
    return float(((priority - 1) << SEQ_BITS) | seq)


def decode_score(value: float) -> tuple[int, int]:
    """Invert :func:`score`: return ``(priority, seq)``."""
    if (
        not math.isfinite(value)
        or (number := int(value)) != value
        or not 0 <= number < 3 << SEQ_BITS
    ):
        raise ValueError(f"{value!r} is not a Stackduck score")
    return ((number >> SEQ_BITS) + 1, number & MAX_SEQ)


class SequenceClock:
    """Issues strictly increasing ``seq`` values from ready times.

    Args:
        last: the highest ``seq`` already issued (e.g. the maximum found in the
            record store at start), so that restarts keep FIFO order.
    """

    def __init__(self, last: int = 0) -> None:
        self._last = last

    @property
    def last(self) -> int:
        """The highest ``seq`` issued or observed."""
        return self._last

    def observe(self, seq: int) -> None:
        """Note a ``seq`` issued elsewhere (restored job, another instance)."""
        self._last = max(self._last, seq)

    def next(self, ready_at: float) -> int:
        """The ``seq`` of a job that becomes ready at ``ready_at`` (epoch seconds)."""
        offset = (ready_at - EPOCH) * 1_000_000
        if not math.isfinite(offset):
            raise StackduckError(f"ready time {ready_at!r} is not a finite time")
        micros = int(offset)
        seq = max(self._last + 1, micros)
        if seq > MAX_SEQ:
            raise StackduckError(f"sequence {seq} exceeds the {SEQ_BITS}-bit budget")
        self._last = seq
        return seq


def ready_seq(ready_at: float) -> int:
    """The ``seq`` a job ready at ``ready_at`` takes in a shared queue tier.

    The job's ready time in whole microseconds since :data:`EPOCH`, clamped
    to the budget, with no per-instance clock: instances that promote
    scheduled jobs in a shared tier agree on it, and jobs due at the same
    microsecond tie (the tier then orders them by id).
    """
    offset = (ready_at - EPOCH) * 1_000_000
    if not math.isfinite(offset):
        raise StackduckError(f"ready time {ready_at!r} is not a finite time")
    return min(max(int(offset), 0), MAX_SEQ)


@attrs.frozen
class Placement:
    """Where a job sits in a shared queue tier.

    Attributes:
        ready: deliverable now (``queued``); otherwise it waits until ``due``.
        score: its ready-set score (for a scheduled job: once it is due).
        due: when it becomes deliverable.
    """

    ready: bool
    score: float
    due: float


def placement(job: Job) -> Placement | None:
    """The tier placement of a queued or scheduled job; ``None`` for any other status.

    A queued job keeps the ``seq`` its record carries (stamped by the
    instance that queued it); one that has none, and every scheduled job,
    takes :func:`ready_seq` of its due time.
    """
    if job.status is Status.QUEUED:
        seq = job.seq or ready_seq(job.scheduled_at)
        return Placement(True, score(job.priority, seq), job.scheduled_at)
    if job.status is Status.SCHEDULED:
        return Placement(False, score(job.priority, ready_seq(job.scheduled_at)), job.scheduled_at)
    return None
