"""The job lifecycle: one table, every rule about a job's status.

Rule 1: everything that decides how a job's status changes lives in this file.
Drivers, the memory queue and the runtime never change a status except by
calling :func:`apply`; a rule written anywhere else is a bug.

Theory of operation
-------------------

A job is an immutable :class:`~stackduck_core.Job` record. Something happens to
it (an *event*: a past-tense fact carrying ``now``), and :func:`apply` returns
either the job's next record or a :class:`~stackduck_core.Rejected` value that
says why the event is not allowed. Nothing is mutated, so a rejected event
leaves every copy of the job exactly as it was, and the same function serves
the in-memory queue, SQLite, PostgreSQL and Redis (whose drivers persist the
returned record with a conditional write on the old ``status``/``version``).

The table :data:`TRANSITIONS` maps ``(status, event type)`` to the action that
computes the next record and the set of statuses it may produce. A pair that is
not in the table is rejected (``WRONG_STATE``) without touching the job: e.g.
completing a queued job, failing a job twice, or cancelling a finished one --
the defects of the original server that duplicated jobs or left them stuck.
``None`` stands for "no job yet" (the only thing you can do to it is enqueue).

The picture (ARCHITECTURE §5)::

    Enqueued ──> SCHEDULED ──Promoted──> QUEUED ──Claimed──> RUNNING ──Completed──> COMPLETED
        └────────(due now)──────────────────^ ^                 │ │ │
                         ┌──Failed (retries left, backoff)──────┘ │ └─LeaseExpired / WorkerDetached
                         v                                        │     (queued again, or FAILED
                     SCHEDULED (or QUEUED when the backoff is 0)  │      by the poison-pill guard)
                                    Failed (no retries left) ─────┴──> FAILED ──Requeued──> QUEUED
    Released (unstarted): RUNNING ──> QUEUED (same place, attempt not counted)
    Cancelled: SCHEDULED | QUEUED | RUNNING ──> CANCELLED            FAILED ──Purged──> (gone)

Fencing. Each delivery (``Claimed``) carries a fresh lease id, stored on the
job. ``Completed``, ``Failed``, ``LeaseExtended``, ``LeaseExpired``,
``WorkerDetached`` and ``Released`` name the lease they are about; if it is not the job's
current lease the event is rejected as ``STALE_LEASE``. So a worker whose lease
expired and whose job was delivered again cannot overwrite the newer
attempt's outcome, and a late expiry timer cannot requeue a renewed lease.

Retries. ``Failed`` with retries left reschedules the job at
``now + retry_delay(delay, retry_count)`` and then increments
``retry_count``; with none left the job is dead-lettered (FAILED). A lost
lease is not a failure the job reported, so it does not use a retry; instead
``lost_leases`` counts it, and when it reaches ``policy.max_lost_leases`` the
job is dead-lettered as a poison pill rather than redelivered forever.

Ordering is not decided here: when a record leaves with status QUEUED its
``seq`` is stamped by the caller's :class:`~stackduck_core.SequenceClock`
(``_ordering``), because only the caller knows the instance's clock.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Final, Protocol, TypeAlias, final

import attrs

from ._backoff import BACKOFF_CAP, retry_delay
from ._job import Base, Job, JobSpec, Rejected, RejectReason, Status

__all__ = [
    "EVENT_TYPES",
    "TRANSITIONS",
    "Cancelled",
    "Claimed",
    "Completed",
    "Enqueued",
    "Event",
    "Failed",
    "LeaseExpired",
    "LeaseExtended",
    "LifecyclePolicy",
    "Promoted",
    "Purged",
    "Released",
    "Requeued",
    "WorkerDetached",
    "Recovery",
    "apply",
    "merge_chain",
    "PendingWrite",
    "needs_new_seq",
    "new_job",
    "plan_commit",
    "recover_claim",
    "writes_over",
]


@final
@attrs.frozen(kw_only=True)
class LifecyclePolicy:
    """Tunables of the lifecycle.

    Attributes:
        max_lost_leases: deliveries that may end with a lost lease before the
            job is dead-lettered as a poison pill (>= 1).
        backoff_cap: ceiling of the retry delay, seconds.
    """

    max_lost_leases: int = attrs.field(default=5, validator=attrs.validators.ge(1))
    backoff_cap: int = attrs.field(default=BACKOFF_CAP, validator=attrs.validators.ge(0))


# -- events: facts, in the past tense ---------------------------------------


@final
@attrs.frozen(kw_only=True)
class Enqueued:
    """A producer's validated request was accepted under ``job_id``."""

    now: float
    job_id: str
    spec: JobSpec


@final
@attrs.frozen(kw_only=True)
class Promoted:
    """A scheduled job's due time has come."""

    now: float


@final
@attrs.frozen(kw_only=True)
class Claimed:
    """A worker took the job under a new lease."""

    now: float
    lease_id: str
    worker_id: str
    lease_expires_at: float


@final
@attrs.frozen(kw_only=True)
class Completed:
    """The lease holder reported success."""

    now: float
    lease_id: str


@final
@attrs.frozen(kw_only=True)
class Failed:
    """The lease holder reported failure (FailJob, RetryJob, a failed ack)."""

    now: float
    lease_id: str
    error: str


@final
@attrs.frozen(kw_only=True)
class LeaseExtended:
    """The lease holder asked for more time (heartbeat)."""

    now: float
    lease_id: str
    lease_expires_at: float


@final
@attrs.frozen(kw_only=True)
class LeaseExpired:
    """The lease ran out without an ack (hung worker, dead server)."""

    now: float
    lease_id: str


@final
@attrs.frozen(kw_only=True)
class WorkerDetached:
    """The worker holding the lease disconnected, or the server lost it.

    ``counted`` is ``False`` when the server itself is leaving (graceful
    shutdown): the job is requeued, but the lost lease is not the job's fault
    and does not count toward the poison-pill guard.
    """

    now: float
    lease_id: str
    counted: bool = True


@final
@attrs.frozen(kw_only=True)
class Released:
    """The lease holder gave the job back unstarted (or it never left the server).

    A worker that stops gracefully returns the jobs it prefetched but did not
    start, and a stream that ends with jobs still buffered on the server
    returns those: no handler ran, so this is neither a failure nor a lost
    lease. The job goes back to its place in the queue and the delivery does
    not count as an attempt.
    """

    now: float
    lease_id: str


@final
@attrs.frozen(kw_only=True)
class Cancelled:
    """An operator or producer cancelled the job."""

    now: float


@final
@attrs.frozen(kw_only=True)
class Requeued:
    """A dead-lettered job was sent back to the queue (attempts reset)."""

    now: float


@final
@attrs.frozen(kw_only=True)
class Purged:
    """A dead-lettered job was deleted."""

    now: float


Event: TypeAlias = (
    Enqueued
    | Promoted
    | Claimed
    | Completed
    | Failed
    | LeaseExtended
    | LeaseExpired
    | WorkerDetached
    | Released
    | Cancelled
    | Requeued
    | Purged
)
EVENT_TYPES: Final[tuple[type[Event], ...]] = (
    Enqueued,
    Promoted,
    Claimed,
    Completed,
    Failed,
    LeaseExtended,
    LeaseExpired,
    WorkerDetached,
    Released,
    Cancelled,
    Requeued,
    Purged,
)

# An action gets the current record (None before enqueue), the event and the
# policy; it returns the next record, None for a deleted job, or a rejection.
_Result: TypeAlias = Job | None | Rejected
_Action: TypeAlias = Callable[[Job | None, Event, LifecyclePolicy], _Result]


def new_job(job_id: str, spec: JobSpec, now: float) -> Job:
    """The first record of a job: queued if due, else scheduled."""
    return Job(
        id=job_id,
        job_type=spec.job_type,
        payload=spec.payload,
        status=Status.QUEUED if spec.scheduled_at <= now else Status.SCHEDULED,
        priority=spec.priority,
        max_retries=spec.max_retries,
        delay=spec.delay,
        scheduled_at=spec.scheduled_at,
        created_at=now,
        updated_at=now,
        idempotency_key=spec.idempotency_key,
    )


def _stale(job: Job, lease_id: str) -> Rejected | None:
    if lease_id != job.lease_id:
        return Rejected(
            RejectReason.STALE_LEASE,
            f"lease {lease_id!r} is not the current lease of job {job.id}",
        )
    return None


def _released(job: Job, now: float) -> Job:
    """``job`` without its lease, as a new version at ``now``."""
    return attrs.evolve(
        job,
        lease_id=None,
        lease_expires_at=None,
        worker_id=None,
        updated_at=now,
        version=job.version + 1,
    )


def _enqueue(job: Job | None, event: Event, policy: LifecyclePolicy) -> _Result:
    assert isinstance(event, Enqueued)
    return new_job(event.job_id, event.spec, event.now)


def _promote(job: Job | None, event: Event, policy: LifecyclePolicy) -> _Result:
    assert job is not None and isinstance(event, Promoted)
    if event.now < job.scheduled_at:
        return Rejected(RejectReason.NOT_DUE, f"job {job.id} is not due yet")
    return attrs.evolve(job, status=Status.QUEUED, updated_at=event.now, version=job.version + 1)


def _claim(job: Job | None, event: Event, policy: LifecyclePolicy) -> _Result:
    assert job is not None and isinstance(event, Claimed)
    return attrs.evolve(
        job,
        status=Status.RUNNING,
        lease_id=event.lease_id,
        lease_expires_at=event.lease_expires_at,
        worker_id=event.worker_id,
        started_at=event.now,
        attempt=job.attempt + 1,
        updated_at=event.now,
        version=job.version + 1,
    )


def _complete(job: Job | None, event: Event, policy: LifecyclePolicy) -> _Result:
    assert job is not None and isinstance(event, Completed)
    return _stale(job, event.lease_id) or attrs.evolve(
        _released(job, event.now), status=Status.COMPLETED, completed_at=event.now, error_message=""
    )


def _fail(job: Job | None, event: Event, policy: LifecyclePolicy) -> _Result:
    assert job is not None and isinstance(event, Failed)
    stale = _stale(job, event.lease_id)
    if stale is not None:
        return stale
    if not job.retries_left:
        return attrs.evolve(
            _released(job, event.now),
            status=Status.FAILED,
            completed_at=event.now,
            error_message=event.error,
        )
    due = event.now + retry_delay(job.delay, job.retry_count, policy.backoff_cap)
    return attrs.evolve(
        _released(job, event.now),
        status=Status.SCHEDULED if due > event.now else Status.QUEUED,
        scheduled_at=due,
        retry_count=job.retry_count + 1,
        error_message=event.error,
    )


def _extend(job: Job | None, event: Event, policy: LifecyclePolicy) -> _Result:
    assert job is not None and isinstance(event, LeaseExtended)
    return _stale(job, event.lease_id) or attrs.evolve(
        job,
        lease_expires_at=max(event.lease_expires_at, job.lease_expires_at or 0.0),
        updated_at=event.now,
        version=job.version + 1,
    )


def _lose_lease(job: Job, now: float, lease_id: str, why: str, policy: LifecyclePolicy) -> _Result:
    stale = _stale(job, lease_id)
    if stale is not None:
        return stale
    lost = job.lost_leases + 1
    if lost >= policy.max_lost_leases:
        return attrs.evolve(
            _released(job, now),
            status=Status.FAILED,
            lost_leases=lost,
            completed_at=now,
            error_message=f"poison pill: {lost} deliveries ended with a lost lease (last: {why})",
        )
    return attrs.evolve(
        _released(job, now), status=Status.QUEUED, lost_leases=lost, scheduled_at=now
    )


def _expire(job: Job | None, event: Event, policy: LifecyclePolicy) -> _Result:
    assert job is not None and isinstance(event, LeaseExpired)
    if job.lease_id == event.lease_id and event.now < (job.lease_expires_at or 0.0):
        return Rejected(RejectReason.LEASE_NOT_EXPIRED, f"lease of job {job.id} has not expired")
    return _lose_lease(job, event.now, event.lease_id, "lease expired", policy)


def _detach(job: Job | None, event: Event, policy: LifecyclePolicy) -> _Result:
    assert job is not None and isinstance(event, WorkerDetached)
    if not event.counted:
        return _stale(job, event.lease_id) or attrs.evolve(
            _released(job, event.now), status=Status.QUEUED, scheduled_at=event.now
        )
    return _lose_lease(job, event.now, event.lease_id, "worker detached", policy)


def _release(job: Job | None, event: Event, policy: LifecyclePolicy) -> _Result:
    assert job is not None and isinstance(event, Released)
    return _stale(job, event.lease_id) or attrs.evolve(
        _released(job, event.now),
        status=Status.QUEUED,
        attempt=max(job.attempt - 1, 0),
        scheduled_at=event.now,
    )


def _cancel(job: Job | None, event: Event, policy: LifecyclePolicy) -> _Result:
    assert job is not None and isinstance(event, Cancelled)
    return attrs.evolve(_released(job, event.now), status=Status.CANCELLED, completed_at=event.now)


def _requeue(job: Job | None, event: Event, policy: LifecyclePolicy) -> _Result:
    assert job is not None and isinstance(event, Requeued)
    return attrs.evolve(
        _released(job, event.now),
        status=Status.QUEUED,
        scheduled_at=event.now,
        retry_count=0,
        attempt=0,
        lost_leases=0,
        completed_at=None,
    )


def _purge(job: Job | None, event: Event, policy: LifecyclePolicy) -> _Result:
    return None


S = Status
#: ``(status or None, event type) -> (action, statuses it may produce)``;
#: ``None`` among the targets means the job is deleted.
TRANSITIONS: Final[
    dict[tuple[Status | None, type[Event]], tuple[_Action, frozenset[Status | None]]]
] = {
    (None, Enqueued): (_enqueue, frozenset({S.SCHEDULED, S.QUEUED})),
    (S.SCHEDULED, Promoted): (_promote, frozenset({S.QUEUED})),
    (S.SCHEDULED, Cancelled): (_cancel, frozenset({S.CANCELLED})),
    (S.QUEUED, Claimed): (_claim, frozenset({S.RUNNING})),
    (S.QUEUED, Cancelled): (_cancel, frozenset({S.CANCELLED})),
    (S.RUNNING, Completed): (_complete, frozenset({S.COMPLETED})),
    (S.RUNNING, Failed): (_fail, frozenset({S.SCHEDULED, S.QUEUED, S.FAILED})),
    (S.RUNNING, LeaseExtended): (_extend, frozenset({S.RUNNING})),
    (S.RUNNING, LeaseExpired): (_expire, frozenset({S.QUEUED, S.FAILED})),
    (S.RUNNING, WorkerDetached): (_detach, frozenset({S.QUEUED, S.FAILED})),
    (S.RUNNING, Released): (_release, frozenset({S.QUEUED})),
    (S.RUNNING, Cancelled): (_cancel, frozenset({S.CANCELLED})),
    (S.FAILED, Requeued): (_requeue, frozenset({S.QUEUED})),
    (S.FAILED, Purged): (_purge, frozenset({None})),
}
del S


def needs_new_seq(old: Job | None, new: Job) -> bool:
    """Whether ``new`` (status QUEUED) takes a fresh FIFO ``seq``.

    A job entering the queue goes to the back of its priority when it is new,
    promoted, retried or requeued from the dead letters. A job whose delivery
    ended without an outcome (lease lost, or released unstarted) had reached
    the front before, so it keeps its place (``seq`` unchanged) instead of
    being punished for a worker's death or shutdown.
    """
    no_outcome = (
        old is not None and old.status is Status.RUNNING and new.retry_count == old.retry_count
    )
    return not (no_outcome and new.seq != 0)


def apply(job: Job | None, event: Event, policy: LifecyclePolicy | None = None) -> _Result:
    """Apply ``event`` to ``job``.

    Args:
        job: the current record, or ``None`` for a job that does not exist yet.
        event: what happened.
        policy: lifecycle tunables (defaults when ``None``).

    Returns:
        The next record; ``None`` when the job is deleted (purged); or a
        :class:`Rejected` (``WRONG_STATE``, ``STALE_LEASE``, ``NOT_DUE``,
        ``LEASE_NOT_EXPIRED``) with the job unchanged.
    """
    status = None if job is None else job.status
    entry = TRANSITIONS.get((status, type(event)))
    if entry is None:
        name = "new" if status is None else status.value
        subject = "a job that does not exist" if job is None else f"job {job.id} ({name})"
        return Rejected(
            RejectReason.WRONG_STATE,
            f"{_VERB[type(event)]} is not possible for {subject}",
        )
    result = entry[0](job, event, policy or _DEFAULT_POLICY)
    if job is not None and isinstance(result, Job):
        # What the store must still hold to take this record (compare-and-set).
        result = attrs.evolve(result, base=Base(job.status, job.lease_id))
    return result


_DEFAULT_POLICY: Final = LifecyclePolicy()
_VERB: Final[dict[type[Event], str]] = {
    Enqueued: "enqueue",
    Promoted: "promote",
    Claimed: "claim",
    Completed: "complete",
    Failed: "fail",
    LeaseExtended: "extend lease",
    LeaseExpired: "lease expiry",
    WorkerDetached: "worker detach",
    Released: "release",
    Cancelled: "cancel",
    Requeued: "requeue",
    Purged: "purge",
}


@final
@attrs.frozen
class Recovery:
    """What becomes of a job whose instance's claim in a shared tier expired.

    Attributes:
        write: the record to write to the record store (``None``: it is
            right as it is).
        requeue: the record to put back into the tier (``None``: the job
            leaves the tier).
    """

    write: Job | None
    requeue: Job | None


def recover_claim(
    job: Job | None, *, now: float, policy: LifecyclePolicy | None = None
) -> Recovery:
    """Decide for a job claimed by an instance that stopped renewing its claims.

    The instance died or lost the tier for a whole claim period, so nothing it
    delivered can still be acked through it. ``job`` is the record store's
    current record (``None`` if the row is gone):

    * finished (completed, cancelled, dead-lettered) or gone: leaves the tier;
    * queued or scheduled (the instance claimed it but never delivered it, or
      settled the store but not the tier): back into the tier as it is;
    * running: its delivery lost its lease like a vanished worker's -- requeued
      in its FIFO place, or dead-lettered by the poison-pill guard.
    """
    if job is None or job.status in (Status.COMPLETED, Status.CANCELLED, Status.FAILED):
        return Recovery(None, None)
    if job.status is not Status.RUNNING:
        return Recovery(None, job)
    event = WorkerDetached(now=now, lease_id=job.lease_id or "", counted=True)
    result = apply(job, event, policy)
    assert isinstance(result, Job)
    return Recovery(result, result if result.status is Status.QUEUED else None)


# -- what a record store writes ------------------------------------------------


def writes_over(job: Job, row: Job | None) -> bool:
    """Whether a record store writes ``job`` over its current ``row``.

    * a record with no base (a new job, or one written unconditionally):
      inserted when there is no row, else written only over an older version;
    * a record with a base (made by a transition): compare-and-set -- only
      over a row that still has the base's status and lease and an older
      version; never inserted (a missing row was purged meanwhile).

    Drivers implement the same rule in SQL; this is its definition.
    """
    base = job.base
    if base is None:
        return row is None or row.version < job.version
    return (
        row is not None
        and row.status is base.status
        and row.lease_id == base.lease_id
        and row.version < job.version
    )


def merge_chain(records: Iterable[Job]) -> dict[str, Job]:
    """One record per job id, in first-seen order, for one write.

    The records of one job written together form a chain (each one's base is
    the one before, which never reaches the store): the newest version (of
    equal ones, the later) is written over what the *first* one expected.
    """
    latest: dict[str, Job] = {}
    for job in records:
        old = latest.get(job.id)
        if old is None:
            latest[job.id] = job
        elif job.version >= old.version:
            latest[job.id] = job if job.base == old.base else attrs.evolve(job, base=old.base)
    return latest


class PendingWrite(Protocol):
    """What :func:`plan_commit` needs to know of one pending write."""

    @property
    def ids(self) -> frozenset[str]:
        """The jobs it writes (upserts and deletes)."""

    @property
    def due(self) -> float:
        """When it must be committed (``-inf``: with the next commit)."""


def plan_commit(
    pending: Sequence[PendingWrite], *, now: float, max_writes: int, flush: bool = False
) -> tuple[list[int], float | None]:
    """Which pending writes the next commit takes: their positions, in order.

    ``pending`` is in the order the writes were made. Writes that are due
    (``due <= now``; all of them when ``flush``) go first come first, at most
    ``max_writes`` of them. A write that is not due yet -- a delivery's record,
    which the job's acknowledgement usually replaces within milliseconds --
    waits for its time, unless a later write of one of its jobs goes now: that
    record's chain starts at this one (its base), so it goes along, and
    :func:`merge_chain` folds the two into one row.

    Returns ``(positions, None)``, or ``([], when)`` with the earliest due
    time when nothing is due yet (``when`` is None when nothing is pending).
    """
    taken: set[int] = set()
    for position, write in enumerate(pending):
        if flush or write.due <= now:
            if len(taken) == max_writes:
                break
            taken.add(position)
    if not taken:
        return [], min((write.due for write in pending), default=None)
    # Walking back from the last write taken: an earlier write that is not
    # taken yet shares a job with one taken after it, so it goes too (and so
    # on, transitively). A job's writes that go are always its oldest ones.
    needed: set[str] = set()
    for position in range(max(taken), -1, -1):
        write = pending[position]
        if position in taken:
            needed |= write.ids
        elif not needed.isdisjoint(write.ids):
            taken.add(position)
            needed |= write.ids
    return sorted(taken), None
