"""The shared queue tier: which jobs are ready, scheduled or claimed, across instances.

With ``REDIS_URL`` several server instances share one queue tier
(:class:`~stackduck_trio._redis.RedisTier`). Each instance *claims* ready jobs
from it in batches, only as many as its attached worker streams can take
(their free prefetch credit), and keeps the claimed jobs in its own
:class:`~stackduck_core.QueueCore`, which hands them to streams under worker
leases exactly as in the embedded mode. A claim belongs to the instance
(its *owner* id) under a *token*, and it expires at a deadline the instance
renews while it is alive; a claim whose deadline has passed is found by any
instance (:meth:`QueueTier.expired`) and its job put back, so the jobs of a
server that died are finished by the others.

The tier holds job ids, scores and the job records as last pushed (so a claim
needs no database read). It is an index, not the truth: the record store is.
Everything in it can be rebuilt from the record store (:meth:`QueueTier.push`
never duplicates a claimed job, so it is safe to push every queued row
again after Redis restarted empty).

Scores and times come from the core (:func:`stackduck_core.placement`), never
from the tier's own clock. :class:`MemoryTier` is the reference
implementation of the contract (one process only); the conformance suite
``tests/io/test_tier.py`` runs the same tests against it and against Redis.
"""

from __future__ import annotations

import bisect
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import Final, Protocol

import attrs
import trio

from stackduck_core import Job, Limiter, Status, TypeLimit, placement


@attrs.frozen
class Claim:
    """A job an instance took from the tier.

    Attributes:
        job: the record as it was last pushed (status ``queued``, or
            ``scheduled`` for a scheduled job that has come due).
        token: the claim's id; :meth:`QueueTier.settle` and
            :meth:`QueueTier.renew` only act with it.
        owner: the instance that holds the claim.
        until: when the claim expires unless renewed.
    """

    job: Job
    token: str
    owner: str
    until: float


class Claims(list[Claim]):
    """The claims a :meth:`QueueTier.claim` took, best first.

    Attributes:
        held: which limit of the type held back jobs that were asked for
            (``"rate"`` or ``"running"``), or ``None``.
        retry_at: when the rate limit lets the next job go, if it held some.
    """

    held: str | None = None
    retry_at: float | None = None

    @classmethod
    def limited(cls, claims: Iterable[Claim], held: str | None, retry_at: float | None) -> Claims:
        out = cls(claims)
        out.held = held
        out.retry_at = retry_at
        return out


@attrs.frozen
class Held:
    """:meth:`QueueTier.remove`'s answer for a job some instance has claimed."""

    def __repr__(self) -> str:
        return "HELD"


#: The one :class:`Held` value.
HELD: Final = Held()


@attrs.frozen
class TierCounts:
    """What the tier holds: ready jobs per type and priority, and totals."""

    ready: dict[str, tuple[int, int, int]]
    scheduled: int
    claimed: int


class TierUnavailable(Exception):
    """The tier could not be reached, or did not answer in time."""


class QueueTier(Protocol):
    """Atomic queue operations shared by all server instances.

    Every method is one atomic step on the tier (one Lua script for Redis):
    it happens entirely or not at all, and no other instance sees it half
    done. Methods raise :class:`TierUnavailable` when the tier cannot be
    reached; an operation that raised may or may not have happened (the
    callers only retry idempotent ones: push, renew, remove, set_paused).
    """

    kind: str
    #: The tier is the record store itself (nothing to reconcile from it).
    holds_records: bool

    async def open(self) -> None:
        """Connect (and load scripts). Raises TierUnavailable."""
        ...

    async def close(self) -> None: ...

    async def push(self, jobs: Sequence[Job]) -> int:
        """Make queued and scheduled jobs available to claims.

        A ``queued`` job enters the ready set of its type at its
        :func:`~stackduck_core.placement` score; a ``scheduled`` one waits
        until its due time, then is ready at its placement's ready score. A
        job already in the tier unclaimed is replaced (new record, new place);
        a job that is *claimed* is left alone (its holder settles it). Jobs of
        other statuses are ignored. Returns how many jobs were added or
        replaced. Wakes instances waiting for the jobs' types.
        """
        ...

    async def claim(
        self, job_type: str, limit: int, *, now: float, owner: str, token: str, until: float
    ) -> Claims:
        """Take up to ``limit`` ready jobs of ``job_type``, best first.

        The type's limits (:meth:`set_limit`) apply here, for every instance
        at once: no more are taken than ``TypeLimit.decide`` allows, given
        the type's claims (its jobs running, or about to) as the running
        count and the rate's state kept in the tier; the result says which
        limit held jobs back and when the rate allows more.

        Scheduled jobs that are due at ``now`` are claimable like ready
        ones, at their placement's ready score. (Memory and Redis first move
        every due job, of any type, to the ready sets; the record-store tier
        has no separate ready set, so there a due job counts as scheduled, and
        in :meth:`next_due`, until a claim of its type takes it.) Nothing is
        taken while ``job_type`` is paused. Every job taken is claimed by
        ``owner`` under ``token`` until ``until``.
        """
        ...

    async def settle(self, items: Sequence[tuple[str, str, Job | None]]) -> list[bool]:
        """End claims: ``(job_id, token, record)`` each.

        Applied only when the job is claimed under ``token`` (else ``False``:
        the claim expired and was reaped, or the job was removed). The record
        then replaces the job: ``queued``/``scheduled`` records go back to
        the ready or scheduled set (as :meth:`push`), anything else (or
        ``None``) removes the job from the tier.
        """
        ...

    async def renew(self, items: Sequence[tuple[str, str]], *, until: float) -> list[bool]:
        """Move the deadline of claims ``(job_id, token)`` to ``until``."""
        ...

    async def expired(self, *, now: float, limit: int) -> list[Claim]:
        """Claims whose deadline is at or before ``now`` (oldest first), unchanged."""
        ...

    async def remove(self, job_ids: Sequence[str]) -> list[Job | Held | None]:
        """Remove unclaimed jobs (cancel): the record of each one removed,
        :data:`HELD` for a job an instance has claimed, ``None`` for an
        unknown one."""
        ...

    async def set_paused(self, job_type: str, paused: bool) -> None: ...

    async def paused(self) -> frozenset[str]: ...

    async def set_limit(self, job_type: str, limit: TypeLimit | None) -> None:
        """Set (or with None, remove) the limits every claim of ``job_type`` obeys.

        The rate's state is kept while the rate and burst stay the same (as
        :meth:`stackduck_core.Limiter.set`). Idempotent. While a type
        has a concurrency limit, the end of one of its claims wakes the
        instances waiting for that type (room for one more)."""
        ...

    async def limited_types(self) -> frozenset[str]:
        """The job types that have limits in the tier."""
        ...

    async def next_due(self) -> float | None:
        """The earliest due time among scheduled jobs, or ``None`` (it may be past:
        see :meth:`claim`)."""
        ...

    async def counts(self) -> TierCounts: ...

    async def wait_ready(self, on_ready: Callable[[str], None]) -> None:
        """Run forever, calling ``on_ready(job_type)`` when another instance
        (or this one) pushed ready jobs of ``job_type``, and ``on_ready("")``
        when the schedule changed (a new earliest due time may exist) or the
        connection was re-established (anything may have been missed).
        Cancel to stop."""
        ...


# -- the reference implementation ------------------------------------------------------


@attrs.define
class _Entry:
    job: Job
    where: str  # "ready", "scheduled" or "claimed"
    key: tuple[float, str]  # (score or due, id) in its sorted list
    claim: Claim | None = None


class MemoryTier:
    """The tier contract in one process: the reference for the conformance tests."""

    kind = "memory"
    holds_records = False

    def __init__(self) -> None:
        self._entries: dict[str, _Entry] = {}
        self._ready: dict[str, list[tuple[float, str]]] = {}
        self._scheduled: list[tuple[float, str]] = []
        self._claims: list[tuple[float, str]] = []
        self._paused: set[str] = set()
        self._listeners: list[Callable[[str], None]] = []
        self._limiter = Limiter()  # the core's bookkeeping of the limits and rate state
        self._claimed: Counter[str] = Counter()  # claims per job type

    async def open(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def _notify(self, job_types: Iterable[str]) -> None:
        for job_type in job_types:
            for listener in list(self._listeners):
                listener(job_type)

    def _unlink(self, entry: _Entry) -> None:
        if entry.where == "ready":
            lst = self._ready[entry.job.job_type]
        elif entry.where == "scheduled":
            lst = self._scheduled
        else:
            lst = self._claims
            self._claimed[entry.job.job_type] -= 1
        lst.pop(bisect.bisect_left(lst, entry.key))
        del self._entries[entry.job.id]

    def _place(self, job: Job) -> str | None:
        """Put ``job`` (unclaimed, not present) where its status says; returns its type if ready."""
        place = placement(job)
        if place is None:
            return None
        if place.ready:
            key = (place.score, job.id)
            bisect.insort(self._ready.setdefault(job.job_type, []), key)
            self._entries[job.id] = _Entry(job, "ready", key)
            return job.job_type
        key = (place.due, job.id)
        bisect.insort(self._scheduled, key)
        self._entries[job.id] = _Entry(job, "scheduled", key)
        return ""

    async def push(self, jobs: Sequence[Job]) -> int:
        woken: set[str] = set()
        added = 0
        for job in jobs:
            if job.status not in (Status.QUEUED, Status.SCHEDULED):
                continue
            entry = self._entries.get(job.id)
            if entry is not None:
                if entry.where == "claimed":
                    continue
                self._unlink(entry)
            kind = self._place(job)
            if kind is not None:
                woken.add(kind)
                added += 1
        self._notify(sorted(woken))
        return added

    def _promote(self, now: float) -> None:
        while self._scheduled and self._scheduled[0][0] <= now:
            _due, job_id = self._scheduled[0]
            entry = self._entries[job_id]
            self._unlink(entry)
            place = placement(entry.job)
            assert place is not None
            key = (place.score, job_id)
            bisect.insort(self._ready.setdefault(entry.job.job_type, []), key)
            self._entries[job_id] = _Entry(entry.job, "ready", key)

    async def claim(
        self, job_type: str, limit: int, *, now: float, owner: str, token: str, until: float
    ) -> Claims:
        self._promote(now)
        if job_type in self._paused or limit <= 0:
            return Claims()
        ready = self._ready.get(job_type, [])
        allowance = self._limiter.check(
            job_type, min(limit, len(ready)), now=now, running=self._claimed[job_type]
        )
        limit, held, retry_at = allowance.granted, allowance.held, allowance.retry_at
        taken = ready[:limit]
        del ready[:limit]
        self._limiter.take(job_type, len(taken), now=now)
        self._claimed[job_type] += len(taken)
        claims = Claims.limited((), held, retry_at)
        for _score, job_id in taken:
            entry = self._entries.pop(job_id)
            claim = Claim(entry.job, token, owner, until)
            key = (until, job_id)
            bisect.insort(self._claims, key)
            self._entries[job_id] = _Entry(entry.job, "claimed", key, claim)
            claims.append(claim)
        return claims

    async def settle(self, items: Sequence[tuple[str, str, Job | None]]) -> list[bool]:
        results: list[bool] = []
        woken: set[str] = set()
        for job_id, token, record in items:
            entry = self._entries.get(job_id)
            if entry is None or entry.claim is None or entry.claim.token != token:
                results.append(False)
                continue
            self._unlink(entry)
            if record is not None and record.status in (Status.QUEUED, Status.SCHEDULED):
                kind = self._place(record)
                if kind is not None:
                    woken.add(kind)
            rules = self._limiter.get(entry.job.job_type)
            if rules is not None and rules.max_running is not None:
                woken.add(entry.job.job_type)  # room for one more
            results.append(True)
        self._notify(sorted(woken))
        return results

    async def renew(self, items: Sequence[tuple[str, str]], *, until: float) -> list[bool]:
        results: list[bool] = []
        for job_id, token in items:
            entry = self._entries.get(job_id)
            if entry is None or entry.claim is None or entry.claim.token != token:
                results.append(False)
                continue
            self._unlink(entry)
            key = (until, job_id)
            bisect.insort(self._claims, key)
            claim = attrs.evolve(entry.claim, until=until)
            self._entries[job_id] = _Entry(entry.job, "claimed", key, claim)
            self._claimed[entry.job.job_type] += 1  # (the unlink counted it out)
            results.append(True)
        return results

    async def expired(self, *, now: float, limit: int) -> list[Claim]:
        out: list[Claim] = []
        for until, job_id in self._claims:
            if until > now or len(out) >= limit:
                break
            claim = self._entries[job_id].claim
            assert claim is not None
            out.append(claim)
        return out

    async def remove(self, job_ids: Sequence[str]) -> list[Job | Held | None]:
        out: list[Job | Held | None] = []
        for job_id in job_ids:
            entry = self._entries.get(job_id)
            if entry is None or entry.where == "claimed":
                out.append(None if entry is None else HELD)
                continue
            self._unlink(entry)
            out.append(entry.job)
        return out

    async def set_paused(self, job_type: str, paused: bool) -> None:
        if paused:
            self._paused.add(job_type)
        else:
            self._paused.discard(job_type)
            self._notify([job_type])

    async def paused(self) -> frozenset[str]:
        return frozenset(self._paused)

    async def set_limit(self, job_type: str, limit: TypeLimit | None) -> None:
        self._limiter.set(job_type, limit)  # keeps the rate's state only for the same rate
        self._notify([job_type])  # a looser limit may let jobs go now

    async def limited_types(self) -> frozenset[str]:
        return frozenset(self._limiter.limits())

    async def next_due(self) -> float | None:
        return self._scheduled[0][0] if self._scheduled else None

    async def counts(self) -> TierCounts:
        ready: dict[str, tuple[int, int, int]] = {}
        for job_type, entries in self._ready.items():
            per = [0, 0, 0]
            for _key, job_id in entries:
                per[self._entries[job_id].job.priority - 1] += 1
            if entries:
                ready[job_type] = (per[0], per[1], per[2])
        return TierCounts(ready, len(self._scheduled), len(self._claims))

    async def wait_ready(self, on_ready: Callable[[str], None]) -> None:
        self._listeners.append(on_ready)
        try:
            await trio.sleep_forever()
        finally:
            self._listeners.remove(on_ready)
