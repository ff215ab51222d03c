"""The in-memory queue engine.

:class:`QueueCore` is the queue tier of the embedded default and the Redis
fallback: ready jobs per job type ordered by ``(priority, seq)``, scheduled
jobs ordered by due time, leases ordered by expiry, the dead-letter set, and
per-type pauses, plus the :class:`~stackduck_core.Dispatcher` of this
instance's worker streams. Every status change goes through
:func:`~stackduck_core.apply` (the lifecycle table); this module only keeps
the indexes that make each operation O(log n).

Every mutating method returns the records it changed; the runtime persists
exactly those (group-committed) before it answers the client. Jobs that reach
``completed`` or ``cancelled`` leave memory (the record store keeps them);
dead-lettered jobs stay, because they can be listed, requeued and purged.

Indexes are heaps with *lazy deletion*: an entry is live only while it still
matches the job's current record (status and key), so cancelling a queued job
or extending a lease never searches a heap; stale entries are dropped when
they surface, and a heap is rebuilt when stale entries outnumber live ones.
"""

from __future__ import annotations

import bisect
import heapq
from collections import Counter, OrderedDict
from collections.abc import Callable, Collection, Iterable, Mapping
from typing import Final, final

import attrs

from ._dispatch import Dispatcher
from ._job import (
    Base,
    EnqueueRequest,
    Job,
    JobSpec,
    Limits,
    Rejected,
    RejectReason,
    Status,
    clip_error,
    validate_enqueue,
)
from ._limits import Limiter
from ._ordering import SequenceClock
from ._states import (
    Cancelled,
    Claimed,
    Completed,
    Enqueued,
    Event,
    Failed,
    LeaseExpired,
    LeaseExtended,
    LifecyclePolicy,
    Promoted,
    Purged,
    Released,
    Requeued,
    WorkerDetached,
    apply,
    needs_new_seq,
    new_job,
)

__all__ = ["DEFAULT_LEASE_SECONDS", "Delivery", "QueueCore", "QueueStats", "TypeStats"]

#: Lease length when neither the stream nor the request names one.
DEFAULT_LEASE_SECONDS: Final = 60.0


@final
@attrs.frozen
class Delivery:
    """A job claimed for a stream: send ``job`` on stream ``stream_id``."""

    stream_id: int
    job: Job


@final
@attrs.frozen(kw_only=True)
class TypeStats:
    """Counts for one job type. ``queued`` is indexed by priority - 1."""

    queued: tuple[int, int, int] = (0, 0, 0)
    scheduled: int = 0
    running: int = 0
    dead: int = 0
    paused: bool = False


@final
@attrs.frozen(kw_only=True)
class QueueStats:
    """A snapshot of the engine (trio's ``statistics()`` convention)."""

    types: Mapping[str, TypeStats]
    queued: int
    scheduled: int
    running: int
    dead: int
    streams: int


_Result = Job | Rejected


class QueueCore:
    """The in-memory queue: pure, synchronous, deterministic.

    Args:
        new_id: returns a fresh unique id (lease ids); injected so tests are
            deterministic and the core needs no randomness of its own.
        policy: lifecycle tunables (poison-pill limit, backoff cap).
        limits: bounds for enqueue validation.
        default_lease: lease length in seconds when none is asked for.
        seq_clock: the FIFO sequence source (shared with restored jobs).
        outcome_memory: how many recent ack outcomes :meth:`replay` remembers.
        limiter: rate and concurrency limits applied when jobs start
            (:meth:`dispatch`, :meth:`claim`); ``None`` when something else
            applies them (a shared queue tier, for a whole cluster).
    """

    def __init__(
        self,
        *,
        new_id: Callable[[], str],
        policy: LifecyclePolicy | None = None,
        limits: Limits | None = None,
        default_lease: float = DEFAULT_LEASE_SECONDS,
        seq_clock: SequenceClock | None = None,
        outcome_memory: int = 10_000,
        limiter: Limiter | None = None,
    ) -> None:
        self._new_id = new_id
        self.limiter = limiter
        # job type -> when its rate limit lets the next held-back job start
        self._rate_waits: dict[str, float] = {}
        self.policy = policy or LifecyclePolicy()
        self.limits = limits or Limits()
        self.default_lease = default_lease
        self.seq_clock = seq_clock or SequenceClock()
        self.dispatcher = Dispatcher()
        self._jobs: dict[str, Job] = {}
        self._ready: dict[str, list[tuple[int, int, str]]] = {}
        self._scheduled: list[tuple[float, str]] = []
        self._leases: list[tuple[float, str, str]] = []
        # dead letters in the order they died: dead_seq -> job_id, plus a
        # per-type view; pagination cursors are dead_seq values
        self._dead: dict[str, int] = {}
        self._dead_order: list[tuple[int, str]] = []
        self._dead_seq = 0
        self._paused: set[str] = set()
        # (job_id, lease_id) -> how that delivery ended, for replayed acks
        self._outcomes: OrderedDict[
            tuple[str, str], tuple[type[Completed | Failed | Released], Job]
        ] = OrderedDict()
        self.outcome_memory = outcome_memory
        # (job_type, status, priority) -> count of live records
        self._counts: dict[tuple[str, Status, int], int] = {}
        # the same counts summed per status, kept in step: O(1) totals on
        # hot paths however many job types clients invent
        self._totals: dict[Status, int] = dict.fromkeys(Status, 0)
        # idempotency key -> id of the job in memory that carries it
        self._keys: dict[str, str] = {}

    # -- bookkeeping ---------------------------------------------------------

    def _store(self, old: Job | None, new: Job | None) -> None:
        """Replace ``old`` by ``new`` in every index (either may be ``None``).

        Completed and cancelled records leave memory (``new`` is then only
        returned to the caller for persisting), so they are never counted.
        """
        if old is not None:
            key = (old.job_type, old.status, old.priority)
            self._counts[key] -= 1
            if not self._counts[key]:
                del self._counts[key]
            self._totals[old.status] -= 1
            if old.status is Status.FAILED:
                del self._dead[old.id]
            del self._jobs[old.id]
            idem = old.idempotency_key
            if idem is not None and self._keys.get(idem) == old.id:
                del self._keys[idem]
        if new is None or new.status in (Status.COMPLETED, Status.CANCELLED):
            assert old is not None  # only an existing job is removed
            self._compact(old)
            return
        key = (new.job_type, new.status, new.priority)
        self._counts[key] = self._counts.get(key, 0) + 1
        self._totals[new.status] += 1
        self._jobs[new.id] = new
        if new.idempotency_key is not None:
            self._keys[new.idempotency_key] = new.id
        status = new.status
        if status is Status.QUEUED:
            heap = self._ready.setdefault(new.job_type, [])
            heapq.heappush(heap, (new.priority, new.seq, new.id))
        elif status is Status.SCHEDULED:
            heapq.heappush(self._scheduled, (new.scheduled_at, new.id))
        elif status is Status.RUNNING:
            assert new.lease_expires_at is not None and new.lease_id is not None
            heapq.heappush(self._leases, (new.lease_expires_at, new.id, new.lease_id))
            if old is not None and old.status is Status.RUNNING:
                self._compact(old)  # an extension left the old expiry behind
        else:  # FAILED: append to the dead-letter order
            self._dead_seq += 1
            self._dead[new.id] = self._dead_seq
            self._dead_order.append((self._dead_seq, new.id))
            if len(self._dead_order) > 2 * len(self._dead) + 64:
                # drop entries of requeued/purged jobs so the list stays O(live)
                self._dead_order = [(s, i) for s, i in self._dead_order if self._dead.get(i) == s]

    def _compact(self, old: Job) -> None:
        """Rebuild a heap once its stale entries outnumber its live ones.

        Entries go stale when a job leaves a heap other than by being popped
        (cancelled while queued or scheduled, lease extended). Without this,
        enqueueing and cancelling jobs of a type nobody consumes would grow
        memory without bound. Amortised O(1) per stale entry.
        """
        if old.status is Status.QUEUED:
            heap = self._ready.get(old.job_type, [])
            if len(heap) > 2 * self.ready_count(old.job_type) + 64:
                live = [e for e in heap if self._live_ready(e)]
                heapq.heapify(live)
                self._ready[old.job_type] = live
        elif old.status is Status.SCHEDULED:
            if len(self._scheduled) > 2 * self.count(Status.SCHEDULED) + 64:
                self._scheduled = [e for e in self._scheduled if self._live_scheduled(*e)]
                heapq.heapify(self._scheduled)
        elif old.status is Status.RUNNING:
            if len(self._leases) > 2 * self.count(Status.RUNNING) + 64:
                self._leases = [e for e in self._leases if self._live_lease(*e)]
                heapq.heapify(self._leases)

    def count(self, status: Status) -> int:
        """How many jobs in memory have ``status`` (O(1)); 0 for completed/cancelled."""
        return self._totals[status]

    def _live_ready(self, entry: tuple[int, int, str]) -> bool:
        job = self._jobs.get(entry[2])
        return job is not None and job.status is Status.QUEUED and job.seq == entry[1]

    def _live_scheduled(self, due: float, job_id: str) -> bool:
        job = self._jobs.get(job_id)
        return job is not None and job.status is Status.SCHEDULED and job.scheduled_at == due

    def _live_lease(self, expires: float, job_id: str, lease_id: str) -> bool:
        job = self._jobs.get(job_id)
        return (
            job is not None
            and job.status is Status.RUNNING
            and job.lease_id == lease_id
            and job.lease_expires_at == expires
        )

    def _change(self, old: Job | None, event: Event) -> _Result:
        """Apply ``event`` through the lifecycle table and update the indexes."""
        new = apply(old, event, self.policy)
        if isinstance(new, Rejected):
            return new
        assert new is not None  # purge is handled by purge()
        if new.status is Status.QUEUED and needs_new_seq(old, new):
            new = attrs.evolve(new, seq=self.seq_clock.next(new.scheduled_at))
        if (
            old is not None
            and old.status is Status.RUNNING
            and new.status is not Status.RUNNING  # a lease extension does not end the delivery
            and old.lease_id is not None
        ):
            self.dispatcher.settled(old.id, old.lease_id, shrink=isinstance(event, Released))
            if isinstance(event, Completed | Failed | Released):
                self._remember_outcome(old.id, old.lease_id, type(event), new)
        self._store(old, new)
        return new

    def _remember_outcome(
        self, job_id: str, lease_id: str, kind: type[Completed | Failed | Released], job: Job
    ) -> None:
        self._outcomes[job_id, lease_id] = (kind, job)
        if len(self._outcomes) > self.outcome_memory:
            self._outcomes.popitem(last=False)

    def replay(
        self,
        job_id: str,
        lease_id: str | None,
        kind: type[Completed | Failed | Released],
        refusal: Rejected,
    ) -> Job | None:
        """The first answer to an ack that was just refused, if it is a retry.

        A worker that retries an ack (its first answer was lost, or came too
        late) must get that answer again, not "job is completed": acks are
        idempotent per lease. It is a retry when the same delivery (job and
        lease) already had an outcome of the same ``kind``; an ack without a
        lease acts on whatever lease is current and is never a retry. The last
        ``outcome_memory`` outcomes are kept.

        Args:
            job_id: the acked job.
            lease_id: the lease the ack names, if any.
            kind: the event the ack asked for.
            refusal: why :meth:`complete`, :meth:`fail` or :meth:`release` refused it.
        """
        if lease_id is None or refusal.reason not in _REPLAYABLE:
            return None
        remembered = self._outcomes.get((job_id, lease_id))
        if remembered is None or remembered[0] is not kind:
            return None
        return remembered[1]

    def _lookup(self, job_id: str) -> Job | Rejected:
        job = self._jobs.get(job_id)
        if job is None:
            return Rejected(RejectReason.NOT_FOUND, f"job {job_id} is not active", "job_id")
        return job

    # -- producers -----------------------------------------------------------

    def enqueue(self, request: EnqueueRequest, *, job_id: str, now: float) -> _Result:
        """Validate and add a job. Returns its first record or the rejection."""
        spec = validate_enqueue(request, now=now, limits=self.limits)
        if isinstance(spec, Rejected):
            return spec
        return self.add(spec, job_id=job_id, now=now)

    def add(self, spec: JobSpec, *, job_id: str, now: float) -> _Result:
        """Add a job from an already validated spec."""
        if job_id in self._jobs:
            return Rejected(RejectReason.WRONG_STATE, f"job {job_id} exists already", "job_id")
        return self._change(None, Enqueued(now=now, job_id=job_id, spec=spec))

    def new_record(self, spec: JobSpec, *, job_id: str, now: float) -> Job:
        """The first record of a new job, with its FIFO ``seq`` already stamped.

        For runtimes that write a job before it enters the queue: persist
        this record, then :meth:`restore` it once the write has committed. The
        ``seq`` is part of what is written, so a restart keeps the exact order.
        """
        job = new_job(job_id, spec, now)
        if job.status is Status.QUEUED:
            job = attrs.evolve(job, seq=self.seq_clock.next(job.scheduled_at))
        return job

    def restore(self, job: Job, *, now: float) -> Job:
        """Load a record from the record store at start.

        A job that was running when the previous process died lost its lease:
        it is requeued (or dead-lettered by the poison-pill guard) and the
        changed record is returned for persisting. Terminal records other than
        dead letters are ignored (they live only in the record store).
        """
        self.seq_clock.observe(job.seq)
        if job.status in (Status.COMPLETED, Status.CANCELLED) or job.id in self._jobs:
            return job
        if job.status is Status.QUEUED and job.seq == 0:
            job = attrs.evolve(job, seq=self.seq_clock.next(job.scheduled_at))
        if job.status is not Status.RUNNING:
            self._store(None, job)
            return job
        # The lease died with the previous process: register the record, then
        # lose its lease exactly as if its worker had vanished. (A row without
        # lease data -- written by hand or by an older version -- gets a
        # placeholder lease so that it takes the same path.)
        stored = Base(job.status, job.lease_id)
        if job.lease_id is None or job.lease_expires_at is None:
            job = attrs.evolve(
                job,
                lease_id=job.lease_id or "restored",
                lease_expires_at=job.lease_expires_at or now,
            )
        self._store(None, job)
        result = self._change(job, WorkerDetached(now=now, lease_id=job.lease_id or ""))
        assert isinstance(result, Job)
        # Written over the row as it is stored (not over the placeholder).
        return attrs.evolve(result, base=stored)

    def admit(self, job: Job, *, now: float) -> Job:
        """Take in a job claimed from a shared queue tier, ready for dispatch.

        ``job`` is queued, or scheduled and due at ``now`` (the tier promoted
        it): it is promoted here too and takes its place in the local order.
        Returns the record as held.

        Raises:
            ValueError: ``job`` is of another status, not due, or held already.
        """
        if job.id in self._jobs:
            raise ValueError(f"job {job.id} is held already")
        if job.status is Status.SCHEDULED:
            if job.scheduled_at > now:
                raise ValueError(f"job {job.id} is not due")
            self._store(None, job)
            result = self._change(job, Promoted(now=now))
            assert isinstance(result, Job)
            return result
        if job.status is not Status.QUEUED:
            raise ValueError(f"job {job.id} is {job.status.value}, not queued")
        return self.restore(job, now=now)

    def decide(self, job: Job, event: Event) -> Job | Rejected | None:
        """Apply ``event`` to a record this core does not hold (read from a store).

        The same transition, and the same FIFO ``seq`` stamping, as for a held
        job; no index changes. ``None`` means the job is deleted (purged).
        """
        new = apply(job, event, self.policy)
        if new is not None and not isinstance(new, Rejected):
            if new.status is Status.QUEUED and needs_new_seq(job, new):
                new = attrs.evolve(new, seq=self.seq_clock.next(new.scheduled_at))
        return new

    def evict(self, job_id: str) -> Job | None:
        """Forget a job that is not running (it went back to a shared tier).

        Returns the record forgotten, or ``None`` when the job is not held or
        is running (a delivery in progress is never forgotten).
        """
        job = self._jobs.get(job_id)
        if job is None or job.status is Status.RUNNING:
            return None
        self._store(job, None)
        return job

    def abandon(self, job_id: str) -> Job | None:
        """Forget a job in any status, without a transition.

        For a record the record store refused (the job changed elsewhere: its
        copy here is stale). A running job's stream gets its credit back and
        its lease is void here: acks of it find no job. Returns the record
        forgotten, or ``None`` when the job is not held.
        """
        job = self._jobs.get(job_id)
        if job is None:
            return None
        if job.status is Status.RUNNING and job.lease_id is not None:
            self.dispatcher.settled(job.id, job.lease_id)
        self._store(job, None)
        return job

    def demand(self, job_type: str) -> int:
        """How many more jobs of ``job_type`` the attached streams could take now.

        Their free credit minus the jobs of that type ready here already; 0
        while the type is paused. A runtime claiming from a shared tier asks
        for this many, so claimed jobs go straight to streams.
        """
        if job_type in self._paused:
            return 0
        return max(self.dispatcher.credit(job_type) - self.ready_count(job_type), 0)

    def cancel(self, job_id: str, *, now: float) -> _Result:
        """Cancel a scheduled, queued or running job."""
        job = self._lookup(job_id)
        if isinstance(job, Rejected):
            return job
        return self._change(job, Cancelled(now=now))

    # -- workers -------------------------------------------------------------

    def claim(
        self, job_type: str, *, now: float, worker_id: str, lease_seconds: float | None = None
    ) -> Job | None:
        """Take the next ready job of ``job_type`` (unary dequeue), or ``None``.

        Raises:
            ValueError: ``lease_seconds`` is given and not positive.
        """
        _check_lease(lease_seconds)
        if job_type in self._paused or not self.ready_count(job_type):
            return None
        if self.limiter is not None:
            running = self.running_count(job_type)
            if not self.limiter.check(job_type, 1, now=now, running=running).granted:
                return None
            self.limiter.take(job_type, 1, now=now)
        job = self._pop_ready(job_type)  # ready counts are exact in memory
        return self._lease(job, now, worker_id, lease_seconds or self.default_lease)

    def _lease(self, job: Job, now: float, worker_id: str, lease_seconds: float) -> Job:
        event = Claimed(
            now=now,
            lease_id=self._new_id(),
            worker_id=worker_id,
            lease_expires_at=now + lease_seconds,
        )
        result = self._change(job, event)
        assert isinstance(result, Job)
        return result

    def _pop_ready(self, job_type: str) -> Job:
        """The best ready job of ``job_type``; the caller knows there is one."""
        heap = self._ready[job_type]
        while True:
            entry = heapq.heappop(heap)
            if self._live_ready(entry):
                return self._jobs[entry[2]]

    def attach(
        self,
        stream_id: int,
        *,
        worker_id: str,
        job_types: Iterable[str],
        prefetch: int = 1,
        lease_seconds: float | None = None,
    ) -> None:
        """Register a worker stream with the dispatcher.

        Raises:
            ValueError: the id is attached already, ``prefetch < 1``, or
                ``lease_seconds`` is given and not positive.
        """
        _check_lease(lease_seconds)
        self.dispatcher.attach(
            stream_id,
            worker_id=worker_id,
            job_types=job_types,
            prefetch=prefetch,
            lease_seconds=lease_seconds or self.default_lease,
        )

    def detach(
        self,
        stream_id: int,
        *,
        now: float,
        unsent: Collection[str] = (),
        server_leaving: bool = False,
    ) -> list[Job]:
        """Unregister a stream and requeue every job it still held.

        Args:
            stream_id: the stream.
            now: the current time.
            unsent: ids of held jobs that never left this server (still in the
                stream's buffer): they are *released* -- back to their place,
                no attempt used. The others lost their lease: requeued, and
                counted by the poison-pill guard.
            server_leaving: the server itself is going away (graceful
                shutdown): every held job is requeued without counting the
                lost lease (no fault of the job); unsent ones are released.
        """
        changed: list[Job] = []
        for job_id, lease_id in self.dispatcher.detach(stream_id).items():
            event: Event
            if job_id in unsent:
                event = Released(now=now, lease_id=lease_id)
            else:
                event = WorkerDetached(now=now, lease_id=lease_id, counted=not server_leaving)
            result = self._change(self._jobs[job_id], event)
            assert isinstance(result, Job)
            changed.append(result)
        return changed

    def dispatch(self, *, now: float) -> list[Delivery]:
        """Hand ready jobs to streams with credit, fairly (see ``_dispatch``)."""
        wanted = self.dispatcher.wanted_types()
        ready = {
            job_type: n
            for job_type in wanted
            if job_type not in self._paused and (n := self.ready_count(job_type))
        }
        self._rate_waits.clear()
        if self.limiter is not None:
            for job_type, n in ready.items():
                want = min(n, self.dispatcher.credit(job_type))
                running = self.running_count(job_type)
                allowance = self.limiter.check(job_type, want, now=now, running=running)
                ready[job_type] = allowance.granted
                if allowance.retry_at is not None:
                    self._rate_waits[job_type] = allowance.retry_at
        deliveries: list[Delivery] = []
        for stream_id, job_type in self.dispatcher.plan(ready):
            job = self._pop_ready(job_type)  # ready counts are exact in memory
            info = self.dispatcher.stream(stream_id)
            assert info is not None
            leased = self._lease(job, now, info.worker_id, info.lease_seconds)
            assert leased.lease_id is not None
            self.dispatcher.delivered(stream_id, leased.id, leased.lease_id)
            deliveries.append(Delivery(stream_id, leased))
        if self.limiter is not None:
            started = Counter(d.job.job_type for d in deliveries)
            for job_type, n in started.items():
                self.limiter.take(job_type, n, now=now)
        return deliveries

    def _current_lease(self, job: Job, lease_id: str | None) -> str:
        # Clients of the original API send no lease: they act on the current one.
        return job.lease_id or "" if not lease_id else lease_id

    def complete(self, job_id: str, *, lease_id: str | None, now: float) -> _Result:
        """The lease holder finished the job."""
        job = self._lookup(job_id)
        if isinstance(job, Rejected):
            return job
        return self._change(job, Completed(now=now, lease_id=self._current_lease(job, lease_id)))

    def fail(self, job_id: str, *, lease_id: str | None, error: str, now: float) -> _Result:
        """The lease holder failed the job: retry with backoff, or dead-letter.

        An error text longer than ``limits.max_error_bytes`` is kept with its
        end cut off and a note of how much was dropped (see ``clip_error``).
        """
        job = self._lookup(job_id)
        if isinstance(job, Rejected):
            return job
        event = Failed(
            now=now,
            lease_id=self._current_lease(job, lease_id),
            error=clip_error(error, self.limits),
        )
        return self._change(job, event)

    def release(self, job_id: str, *, lease_id: str | None, now: float) -> _Result:
        """The lease holder gives the job back unstarted (graceful worker stop)."""
        job = self._lookup(job_id)
        if isinstance(job, Rejected):
            return job
        return self._change(job, Released(now=now, lease_id=self._current_lease(job, lease_id)))

    def extend(
        self, job_id: str, *, lease_id: str | None, now: float, lease_seconds: float | None = None
    ) -> _Result:
        """Push the lease's expiry to ``now + lease_seconds`` (never earlier).

        Without ``lease_seconds`` the lease length of the stream holding the
        job is used (what the worker asked for), else the default.

        Raises:
            ValueError: ``lease_seconds`` is given and not positive.
        """
        _check_lease(lease_seconds)
        job = self._lookup(job_id)
        if isinstance(job, Rejected):
            return job
        lease = self._current_lease(job, lease_id)
        if lease_seconds is None:
            info = self.dispatcher.holder(lease)
            lease_seconds = self.default_lease if info is None else info.lease_seconds
        event = LeaseExtended(now=now, lease_id=lease, lease_expires_at=now + lease_seconds)
        return self._change(job, event)

    # -- dead letters and pauses ----------------------------------------------

    def requeue(self, job_id: str, *, now: float) -> _Result:
        """Send a dead-lettered job back to the queue with its attempts reset."""
        job = self._lookup(job_id)
        if isinstance(job, Rejected):
            return job
        return self._change(job, Requeued(now=now))

    def purge(self, job_id: str, *, now: float) -> _Result:
        """Delete a dead-lettered job. Returns the deleted record."""
        job = self._lookup(job_id)
        if isinstance(job, Rejected):
            return job
        result = apply(job, Purged(now=now), self.policy)
        if isinstance(result, Rejected):
            return result
        self._store(job, None)
        return job

    def dead_before(self, before: float, limit: int) -> list[str]:
        """Ids of up to ``limit`` dead-lettered jobs that died before ``before``.

        In the order they died here (retention purges them). A job's time of
        death is its ``completed_at``; jobs restored at start are in the
        record store's order, so a young one does not end the scan.
        """
        found: list[str] = []
        for dead_seq, job_id in self._dead_order:
            if len(found) >= limit:
                break
            if self._dead.get(job_id) != dead_seq:
                continue  # requeued or purged since
            # (rows of old versions may lack the time: as the stores, 0)
            if (self._jobs[job_id].completed_at or 0.0) < before:
                found.append(job_id)
        return found

    def dead(
        self,
        *,
        job_type: str | None = None,
        after: int = 0,
        limit: int = 100,
        max_bytes: int | None = None,
    ) -> tuple[list[Job], int]:
        """Dead-lettered jobs in the order they died.

        Args:
            job_type: only this type, or every type when ``None``.
            after: the cursor returned by the previous page (0 = from the start).
            limit: most jobs per page (>= 1).
            max_bytes: most payload + error bytes per page (a page holds at
                least one job), so a page of large jobs still fits in one
                message.

        Returns:
            The page and the cursor of the next page (0 when there is no more).

        Raises:
            ValueError: ``limit < 1``.
        """
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        page: list[Job] = []
        size = 0
        # dead_seq values are unique: compare them alone, whatever the job ids
        start = bisect.bisect_right(self._dead_order, after, key=lambda entry: entry[0])
        for index in range(start, len(self._dead_order)):
            dead_seq, job_id = self._dead_order[index]
            if self._dead.get(job_id) != dead_seq:
                continue  # requeued or purged since
            job = self._jobs[job_id]
            if job_type is not None and job.job_type != job_type:
                continue
            cost = len(job.payload) + len(job.error_message)
            full = max_bytes is not None and page and size + cost > max_bytes
            if len(page) == limit or full:
                return page, self._dead[page[-1].id]
            page.append(job)
            size += cost
        return page, 0

    def dead_ids(self, job_type: str | None = None) -> list[str]:
        """Ids of every dead-lettered job (of ``job_type`` if given)."""
        return [
            job_id
            for job_id in self._dead
            if job_type is None or self._jobs[job_id].job_type == job_type
        ]

    def pause(self, job_type: str) -> None:
        """Stop delivering ``job_type``; its jobs wait, they are not failed."""
        self._paused.add(job_type)

    def resume(self, job_type: str) -> None:
        """Deliver ``job_type`` again."""
        self._paused.discard(job_type)

    @property
    def paused(self) -> frozenset[str]:
        """The paused job types."""
        return frozenset(self._paused)

    # -- time ----------------------------------------------------------------

    def tick(self, *, now: float) -> list[Job]:
        """Promote due scheduled jobs and expire leases that ran out.

        After ``tick(now)``, :meth:`next_deadline` is later than ``now``
        (a rate limit's wake-up that came is dropped: the :meth:`dispatch`
        that follows a tick sets it again if jobs are still held back).
        Returns every changed record, in the order of the changes.
        """
        self._rate_waits = {t: at for t, at in self._rate_waits.items() if at > now}
        changed: list[Job] = []
        while self._scheduled and self._scheduled[0][0] <= now:
            due, job_id = heapq.heappop(self._scheduled)
            if self._live_scheduled(due, job_id):
                result = self._change(self._jobs[job_id], Promoted(now=now))
                assert isinstance(result, Job)
                changed.append(result)
        while self._leases and self._leases[0][0] <= now:
            expires, job_id, lease_id = heapq.heappop(self._leases)
            if self._live_lease(expires, job_id, lease_id):
                result = self._change(self._jobs[job_id], LeaseExpired(now=now, lease_id=lease_id))
                assert isinstance(result, Job)
                changed.append(result)
        return changed

    def next_deadline(self) -> float | None:
        """The earliest time at which :meth:`tick` (or, for a job held back by a
        rate limit, :meth:`dispatch`) has work, or ``None``."""
        self._drop_stale()
        times = [heap[0][0] for heap in (self._scheduled, self._leases) if heap]
        times.extend(self._rate_waits.values())
        return min(times) if times else None

    def _drop_stale(self) -> None:
        while self._scheduled and not self._live_scheduled(*self._scheduled[0]):
            heapq.heappop(self._scheduled)
        while self._leases and not self._live_lease(*self._leases[0]):
            heapq.heappop(self._leases)

    # -- reading -------------------------------------------------------------

    def get(self, job_id: str) -> Job | None:
        """The active record of a job (not completed or cancelled ones)."""
        return self._jobs.get(job_id)

    def find_key(self, key: str) -> str | None:
        """The id of the job in memory enqueued with idempotency ``key``, if any.

        Completed and cancelled jobs have left memory: look for their key in
        the record store.
        """
        return self._keys.get(key)

    def ready_jobs(self, job_type: str) -> list[Job]:
        """The queued jobs of ``job_type``, in delivery order."""
        heap = self._ready.get(job_type, [])
        return [self._jobs[e[2]] for e in sorted(heap) if self._live_ready(e)]

    def running_count(self, job_type: str) -> int:
        """How many jobs of ``job_type`` are running (leased to a worker)."""
        return sum(self._counts.get((job_type, Status.RUNNING, p), 0) for p in (1, 2, 3))

    def ready_count(self, job_type: str) -> int:
        """How many jobs of ``job_type`` are queued (paused or not)."""
        return sum(self._counts.get((job_type, Status.QUEUED, p), 0) for p in (1, 2, 3))

    def statistics(self) -> QueueStats:
        """Counts per job type and in total."""
        queued: dict[str, list[int]] = {}
        other: dict[tuple[str, Status], int] = {}
        for (job_type, status, priority), n in self._counts.items():
            if status is Status.QUEUED:
                queued.setdefault(job_type, [0, 0, 0])[priority - 1] += n
            else:
                other[job_type, status] = other.get((job_type, status), 0) + n
        names = queued.keys() | {job_type for job_type, _ in other} | self._paused
        types = {
            job_type: TypeStats(
                queued=tuple(queued.get(job_type, (0, 0, 0))),  # type: ignore[arg-type]
                scheduled=other.get((job_type, Status.SCHEDULED), 0),
                running=other.get((job_type, Status.RUNNING), 0),
                dead=other.get((job_type, Status.FAILED), 0),
                paused=job_type in self._paused,
            )
            for job_type in sorted(names)
        }
        return QueueStats(
            types=types,
            queued=sum(sum(q) for q in queued.values()),
            scheduled=sum(s.scheduled for s in types.values()),
            running=sum(s.running for s in types.values()),
            dead=len(self._dead),
            streams=self.dispatcher.statistics().streams,
        )


#: Refusals an already settled delivery produces when its ack is retried.
_REPLAYABLE: Final = frozenset(
    {RejectReason.NOT_FOUND, RejectReason.STALE_LEASE, RejectReason.WRONG_STATE}
)


def _check_lease(lease_seconds: float | None) -> None:
    if lease_seconds is not None and not lease_seconds > 0:
        raise ValueError(f"lease_seconds must be positive, got {lease_seconds}")
