"""Helpers that make core tests read like scripts (h11's ``helpers.py`` role).

Everything is deterministic: ids come from counters, time from a clock that
only moves forward (trio's ``MockClock.jump`` refuses negative jumps, and so
does :class:`Clock`). No I/O, no mocks: the :class:`QueueCore` is the real one.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable

from stackduck_core import (
    EnqueueRequest,
    Job,
    LifecyclePolicy,
    QueueCore,
    Rejected,
    RejectReason,
    Status,
)

#: 2026-01-01T00:00:00Z: a realistic start, so ``seq`` values are real
#: microsecond timestamps and stay far inside the 51-bit budget.
T0 = 1_767_225_600.0


def counter_ids(prefix: str) -> Callable[[], str]:
    """A ``new_id`` callable returning ``prefix1``, ``prefix2``, ..."""
    numbers = itertools.count(1)
    return lambda: f"{prefix}{next(numbers)}"


class Clock:
    """A clock that only moves forward."""

    def __init__(self, start: float = T0) -> None:
        self._now = start

    @property
    def now(self) -> float:
        return self._now

    def advance(self, dt: float) -> float:
        """Move forward by ``dt >= 0`` seconds; return the new time."""
        if dt < 0:
            raise ValueError(f"time only moves forward (dt={dt})")
        self._now += dt
        return self._now

    def set(self, when: float) -> float:
        """Jump to ``when`` (not earlier than now); return it."""
        if when < self._now:
            raise ValueError(f"time only moves forward ({when} < {self._now})")
        self._now = when
        return self._now


def expect_job(result: Job | Rejected | None) -> Job:
    """``result`` as a :class:`Job`, failing the test on anything else."""
    assert isinstance(result, Job), f"expected a job, got {result!r}"
    return result


def expect_rejected(result: object, reason: RejectReason) -> Rejected:
    """``result`` as a :class:`Rejected` with ``reason``."""
    assert isinstance(result, Rejected), f"expected a rejection, got {result!r}"
    assert result.reason is reason, result
    return result


class Harness:
    """A :class:`QueueCore` with counter ids and a forward-only clock.

    Job ids are ``job1, job2, ...``, lease ids ``lease1, lease2, ...``.
    """

    def __init__(
        self,
        *,
        policy: LifecyclePolicy | None = None,
        default_lease: float = 60.0,
        start: float = T0,
    ) -> None:
        self.clock = Clock(start)
        self.new_lease_id = counter_ids("lease")
        self.new_job_id = counter_ids("job")
        self.policy = policy
        self.default_lease = default_lease
        self.core = self._new_core()

    def _new_core(self) -> QueueCore:
        return QueueCore(
            new_id=self.new_lease_id, policy=self.policy, default_lease=self.default_lease
        )

    def restart(self) -> QueueCore:
        """Replace the core by a fresh one (a new process); return the old core.

        The fresh core shares the lease-id source (ids stay unique, as UUIDs
        would) but nothing else: the caller restores the records it wants.
        """
        old, self.core = self.core, self._new_core()
        return old

    @property
    def now(self) -> float:
        return self.clock.now

    # -- producers -----------------------------------------------------------

    def enqueue(
        self,
        job_type: str = "t",
        *,
        priority: int | None = None,
        delay: int | None = None,
        max_retries: int | None = None,
        scheduled_in: float | None = None,
        payload: str | None = None,
        job_id: str | None = None,
    ) -> Job:
        """Enqueue one job (``scheduled_in`` seconds from now, if given)."""
        request = EnqueueRequest(
            job_type=job_type,
            payload=payload,
            priority=priority,
            delay=delay,
            max_retries=max_retries,
            scheduled_at=None if scheduled_in is None else self.now + scheduled_in,
        )
        job_id = job_id or self.new_job_id()
        return expect_job(self.core.enqueue(request, job_id=job_id, now=self.now))

    def enqueue_many(
        self,
        n: int,
        job_type: str = "t",
        *,
        priority: int | None = None,
        max_retries: int | None = None,
        delay: int | None = None,
    ) -> list[Job]:
        """Enqueue ``n`` due jobs of ``job_type``."""
        return [
            self.enqueue(job_type, priority=priority, max_retries=max_retries, delay=delay)
            for _ in range(n)
        ]

    # -- workers -------------------------------------------------------------

    def claim(
        self, job_type: str = "t", *, worker_id: str = "w", lease_seconds: float | None = None
    ) -> Job:
        """Claim the next job of ``job_type``, which must exist."""
        job = self.core.claim(
            job_type, now=self.now, worker_id=worker_id, lease_seconds=lease_seconds
        )
        assert job is not None, f"no {job_type} job to claim"
        assert job.status is Status.RUNNING
        return job

    def claim_ids(self, job_type: str = "t") -> list[str]:
        """Claim every ready job of ``job_type``; their ids in claim order."""
        ids: list[str] = []
        while (job := self.core.claim(job_type, now=self.now, worker_id="w")) is not None:
            ids.append(job.id)
        return ids

    def dead_letter(self, job_type: str = "t", *, job_id: str | None = None) -> Job:
        """Create a job of ``job_type`` and drive it into the dead-letter queue.

        ``job_type`` must have no other ready job (the claim must return it).
        """
        job = self.enqueue(job_type, max_retries=0, job_id=job_id)
        running = self.claim(job_type)
        assert running.id == job.id, "dead_letter() needs a job type with no other ready job"
        dead = expect_job(
            self.core.fail(job.id, lease_id=running.lease_id, error="boom", now=self.now)
        )
        assert dead.status is Status.FAILED
        return dead

    # -- time ----------------------------------------------------------------

    def advance(self, dt: float) -> list[Job]:
        """Move the clock forward by ``dt`` and tick; the changed records."""
        return self.core.tick(now=self.clock.advance(dt))

    def advance_to(self, when: float) -> list[Job]:
        """Jump the clock to ``when`` and tick; the changed records."""
        return self.core.tick(now=self.clock.set(when))


def ids(jobs: Iterable[Job]) -> list[str]:
    """The ids of ``jobs``, in order."""
    return [job.id for job in jobs]
