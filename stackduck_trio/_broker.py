"""The broker: the trio side of one server instance's queue.

The broker owns the core's :class:`~stackduck_core.QueueCore` and the record
store's :class:`~stackduck_trio._store.GroupCommitter`, and gives the gRPC
service one async method per operation. It holds no rules: each method calls
the core (synchronously -- in trio nothing else runs between two awaits, so
every core call is atomic and the core needs no lock or inbox task), hands the
changed records to the group committer in the same step, and waits for the
commit before it answers. The rules -- validation, transitions, ordering,
backoff, leases, dispatch -- are the core's.

Order of durability:

* a new job is written first and enters the queue only when its batch has
  committed (``on_commit``), so a job is never delivered unless it is on
  disk, and an acknowledged enqueue survives ``kill -9``;
* an ack changes the queue at once and is answered once its write commits;
  if the store is slow the write stays queued (and is retried), and the
  client is told UNAVAILABLE after ``write_timeout``;
* deliveries (status ``running``) are written without waiting: after a crash
  a running job is requeued anyway;
* a pause or resume is written to the store first (on the store's thread,
  not through the group committer: it is no job row) and changes the core
  only once the store has it, so the answer always means "durable", and a
  failed write (UNAVAILABLE) changes nothing. Pauses and resumes are
  serialized so the store and the core see them in the same order.
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
import os
import random
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, NamedTuple

import attrs
import trio

from stackduck_core import (
    Completed,
    EnqueueRequest,
    Failed,
    Job,
    JobSpec,
    Limiter,
    QueueCore,
    QueueStats,
    Rejected,
    RejectReason,
    Released,
    Retention,
    Status,
    StreamInfo,
    TypeLimit,
    validate_enqueue,
)
from stackduck_core._failover import Durability, EnqueueMode, Health, Route, route

from ._clock import Clock
from ._store import GroupCommitter, StorageUnavailable, Written

if TYPE_CHECKING:
    from ._metrics import Metrics

log = logging.getLogger("stackduck.broker")
#: one line per job lifecycle event (STACKDUCK_LOG_JOBS=on)
jobs_log = logging.getLogger("stackduck.jobs")


def log_job(job: Job) -> None:
    """Log a job's new state with its identifiers as structured fields."""
    jobs_log.info(
        "job %s %s",
        job.id,
        job.status.value,
        extra={
            "job_id": job.id,
            "job_type": job.job_type,
            "status": job.status.value,
            "attempt": job.attempt,
            "worker_id": job.worker_id or "",
            "lease_id": job.lease_id or "",
        },
    )


class Unavailable(Exception):
    """The operation cannot be done now (record store down, server draining)."""


class OutcomeUnknown(Exception):
    """The write was accepted but not confirmed in time: it may still commit.

    Answered as DEADLINE_EXCEEDED, not UNAVAILABLE: gRPC clients treat
    UNAVAILABLE as "nothing happened, safe to retry", which here could create
    a second job.
    """


@attrs.define
class TypeCounters:
    completed: int = 0
    failed: int = 0
    retried: int = 0


@attrs.frozen(kw_only=True)
class TypeView:
    """One job type as GetStats and the dashboard show it (see ``TypeStats`` in the proto)."""

    job_type: str
    queued: tuple[int, int, int]
    scheduled: int
    running: int
    dead: int
    paused: bool
    workers: int
    completed: int
    failed: int
    retried: int
    rate_limit: float
    rate_burst: int
    max_running: int
    throttled: int


@attrs.frozen
class Duplicate:
    """An enqueue whose idempotency key names an existing job: none was created."""

    job: Job


class _KeyEntry:
    """An idempotency key this process is enqueueing: later requests share its job."""

    __slots__ = ("job", "ready", "written")

    def __init__(self) -> None:
        self.ready = trio.Event()  # set once ``job`` (and ``written``) are known
        self.job: Job | None = None  # stays None when the store lookup failed
        self.written: Written | None = None  # the commit of a new job


class AckRequest(NamedTuple):
    """One item of :meth:`Broker.ack_many`."""

    job_id: str
    lease_id: str | None
    failed: bool = False
    error: str = ""
    release: bool = False


# Ids only need to be unique, not secret: a lease id is a fencing token
# against stale workers, not a credential (the API's bearer tokens are). A
# Mersenne Twister seeded from the OS per process is three times cheaper than
# uuid4() (one getrandom syscall per id), which showed up at ~30% of server
# CPU in batch-enqueue profiles.
_ids = random.Random(os.urandom(32))


#: See :attr:`Broker.delivery_write_delay` (seconds).
DELIVERY_WRITE_DELAY = 0.05


def new_id() -> str:
    """A fresh job or lease id: a version-7 UUID (RFC 9562).

    Its first 48 bits are the Unix time in milliseconds, the rest random
    (74 bits). Ids made later sort later, so a new job's row lands at the end
    of the record store's id indexes (the primary key, the queued jobs'
    index) instead of at a random place in them: an insert touches the same
    few pages however many jobs are queued.
    """
    ms = f"{time.time_ns() // 1_000_000 & 0xFFFF_FFFF_FFFF:012x}"
    r = f"{_ids.getrandbits(80):020x}"
    return f"{ms[:8]}-{ms[8:]}-7{r[:3]}-{'89ab'[int(r[3], 16) & 3]}{r[4:7]}-{r[7:19]}"


class Broker:
    """One instance's queue: the core, the writer, the streams and the timer.

    Args:
        core: the in-memory queue engine.
        committer: the record store's single writer.
        clock: wall time for the core, and deadlines for trio.
        write_timeout: how long a request waits for its write to commit.
        durability: what new jobs get while the record store is away
            (ARCHITECTURE §4): refused (strict), or accepted into an outbox.
    """

    #: Whether this instance's core applies the limits (it sees every start).
    local_limits = True
    #: How long a delivery's record (running, with its lease) may wait for its
    #: commit: a job acknowledged within that time is written once, as
    #: completed (or retried), instead of twice. A crash meanwhile leaves it
    #: queued on record, and the job runs again, as a running one would.
    delivery_write_delay = DELIVERY_WRITE_DELAY

    def __init__(
        self,
        *,
        core: QueueCore,
        committer: GroupCommitter,
        clock: Clock,
        write_timeout: float = 10.0,
        durability: Durability = Durability.STRICT,
    ) -> None:
        self.core = core
        self.durability = durability
        self.committer = committer
        self.clock = clock
        self.write_timeout = write_timeout
        self.counters: dict[str, TypeCounters] = {}
        self._streams: dict[int, trio.MemorySendChannel[Job]] = {}
        self._receivers: dict[int, trio.MemoryReceiveChannel[Job]] = {}
        self._stream_ids = itertools.count(1)
        self._timer_wakeup = trio.Event()
        self._timer_target = math.inf
        self._idle = trio.Event()
        self._pause_lock = trio.Lock()
        self._keys: dict[str, _KeyEntry] = {}  # idempotency keys being enqueued
        self.draining = False
        #: Prometheus metrics, when the server exposes them
        self.metrics: Metrics | None = None
        #: Rate and concurrency limits by job type. Here the core applies them
        #: when jobs start; a shared tier applies them for the whole cluster.
        self.limiter = Limiter()
        core.limiter = self.limiter if self.local_limits else None
        #: Rows deleted by retention (``finished``: completed/cancelled, ``dead``)
        self.pruned = {"finished": 0, "dead": 0}
        #: Limits from the configuration (STACKDUCK_LIMITS), stored at start.
        self.configured_limits: Mapping[str, TypeLimit] = {}

    # -- plumbing --------------------------------------------------------------

    async def _committed(self, written: Written) -> None:
        with trio.move_on_after(self.write_timeout):
            await written.done.wait()
            return
        raise OutcomeUnknown(
            f"the record store ({self.committer.backend.kind}) did not confirm the write "
            f"within {self.write_timeout:g} s; it stays queued and may still be applied"
        )

    def _persist(self, jobs: Sequence[Job], *, settle: bool = True, defer: float = 0.0) -> Written:
        """Write changed records; :meth:`_applied` runs once they committed."""
        self._count(jobs)
        written = self.committer.write(
            jobs, on_commit=lambda: self._applied(jobs, written, settle=settle), defer=defer
        )
        return written

    def _applied(self, jobs: Sequence[Job], written: Written, *, settle: bool) -> None:
        """Records committed; those refused are stale copies: forget them here.

        The store writes a record only over the status and lease it was made
        from (``Job.base``); a refusal means the job changed elsewhere -- on
        one server, another server writing the same store with its own queue
        (several servers need a shared queue tier: ``STACKDUCK_QUEUE``).
        """
        for job_id in written.refused:
            if self.core.abandon(job_id) is not None:
                log.warning(
                    "job %s changed in the record store behind this server's back; "
                    "its copy here is dropped",
                    job_id,
                )

    async def _refusal(self, job_id: str) -> Rejected:
        """The answer to an ack whose record the store refused."""
        stored = await self._stored(job_id)
        now = "gone" if stored is None else stored.status.value
        return Rejected(
            RejectReason.WRONG_STATE,
            f"job {job_id} changed elsewhere meanwhile (it is {now}): this outcome was not applied",
        )

    def _count(self, jobs: Sequence[Job]) -> None:
        if jobs_log.isEnabledFor(logging.INFO):
            for job in jobs:
                log_job(job)
        for job in jobs:
            if job.status is Status.COMPLETED:
                self._counters(job.job_type).completed += 1
            elif job.status is Status.FAILED:
                self._counters(job.job_type).failed += 1
        if self.metrics is not None:
            self.metrics.on_changed(jobs)

    def _retried(self, job_type: str) -> None:
        self._counters(job_type).retried += 1
        if self.metrics is not None:
            self.metrics.on_retried(job_type)

    def _counters(self, job_type: str) -> TypeCounters:
        counters = self.counters.get(job_type)
        if counters is None:
            counters = self.counters[job_type] = TypeCounters()
        return counters

    def changed(self) -> None:
        """Deliver what can be delivered now and re-arm the timer.

        Called after every change of the queue. Deliveries go into the
        streams' channels, whose capacity is the stream's prefetch: the
        dispatcher never plans beyond a stream's credit, so ``send_nowait``
        cannot block.
        """
        if not self.draining and self._streams:
            now = self.clock.now()
            deliveries = self.core.dispatch(now=now)
            if deliveries:
                # One write per job: an acknowledgement takes along (and merges
                # with) its own job's delivery record, not the whole round's.
                for delivery in deliveries:
                    self._persist((delivery.job,), defer=self.delivery_write_delay)
                if self.metrics is not None:
                    self.metrics.on_delivered([d.job for d in deliveries], now)
                broken: set[int] = set()
                for delivery in deliveries:
                    try:
                        self._streams[delivery.stream_id].send_nowait(delivery.job)
                    except trio.BrokenResourceError:
                        # The handler closed its end and has not detached yet:
                        # treat the stream as gone; its leases are requeued.
                        broken.add(delivery.stream_id)
                for stream_id in broken:
                    self.close_stream(stream_id)
        deadline = self.core.next_deadline()
        if deadline is not None and deadline < self._timer_target:
            self._timer_wakeup.set()
        if self.draining and self.core.count(Status.RUNNING) == 0:
            self._idle.set()

    async def _admission(self) -> None:
        if self.draining:
            raise Unavailable("the server is shutting down")
        await self.committer.wait_capacity()

    # -- producers ---------------------------------------------------------------

    async def enqueue(self, requests: Sequence[EnqueueRequest]) -> list[Job | Duplicate | Rejected]:
        """Validate, persist and queue jobs; one result per request, in order.

        A request whose idempotency key names a job that exists (in the
        queue, being written by this process, or in the record store) creates
        nothing: its result is that job as a :class:`Duplicate`. Keys are
        looked up before anything is written, and concurrent requests with
        one key (also within one batch) share the first one's job.
        """
        await self._admission()
        decision = self.route()
        if decision.enqueue is EnqueueMode.REJECT_UNAVAILABLE:
            raise Unavailable(f"{self.committer.backend.kind}: {decision.reason}")
        # durability=buffered with the store away: the committer's backlog is
        # the outbox (flushed in order when the store is back); the jobs are
        # queued at once and the answer does not wait for the store.
        buffered = decision.enqueue is EnqueueMode.BUFFER
        now = self.clock.now()
        results: list[Job | Duplicate | Rejected | None] = []
        specs: dict[int, JobSpec] = {}
        owned: dict[str, tuple[int, _KeyEntry]] = {}  # keys this call looks up
        waiting: list[tuple[int, _KeyEntry]] = []  # requests sharing another's key
        for index, request in enumerate(requests):
            spec = validate_enqueue(request, now=now, limits=self.core.limits)
            if isinstance(spec, Rejected):
                results.append(spec)
                continue
            results.append(None)
            key = spec.idempotency_key
            if key is not None:
                known = self.core.find_key(key)
                if known is not None:
                    job = self.core.get(known)
                    assert job is not None  # the index holds jobs in memory only
                    results[index] = Duplicate(job)
                    continue
                entry = self._keys.get(key)
                if entry is not None:
                    waiting.append((index, entry))
                    continue
                entry = self._keys[key] = _KeyEntry()
                owned[key] = (index, entry)
            specs[index] = spec
        if owned:
            await self._lookup_keys(owned, specs, results)
        accepted: list[Job] = []
        new_keys: list[tuple[str, _KeyEntry]] = []
        for index, spec in specs.items():
            job = self.core.new_record(spec, job_id=new_id(), now=now)
            accepted.append(job)
            results[index] = job
            if spec.idempotency_key is not None:
                entry = owned[spec.idempotency_key][1]
                entry.job = job
                new_keys.append((spec.idempotency_key, entry))
        written: Written | None = None
        if accepted:

            def admit() -> None:
                self._admit_new(accepted)
                for key, entry in new_keys:
                    self._drop_key(key, entry)  # the core's index (or the store) has it now

            try:
                written = self.committer.write(accepted, on_commit=None if buffered else admit)
            except StorageUnavailable:  # shut down: requests sharing a key must not hang
                for key, entry in new_keys:
                    entry.job = None
                    self._drop_key(key, entry)
                raise
            if buffered:
                log.warning(
                    "record store away: %d new jobs accepted into the outbox (durability=buffered)",
                    len(accepted),
                )
                admit()
                written = None
            for _key, entry in new_keys:
                entry.written = written
                entry.ready.set()
        lookup_failed = False
        for index, entry in waiting:
            await entry.ready.wait()
            if entry.job is None:
                lookup_failed = True
                continue
            if entry.written is not None:
                await self._committed(entry.written)
            results[index] = Duplicate(self.core.get(entry.job.id) or entry.job)
        if written is not None:
            await self._committed(written)
        if accepted:
            await self._published(accepted)
            if self.metrics is not None:
                self.metrics.on_enqueued(accepted)
            if jobs_log.isEnabledFor(logging.INFO):
                for job in accepted:
                    log_job(job)
        if lookup_failed:
            message = "the record store failed on a request with the same idempotency key"
            raise OutcomeUnknown(message) if accepted else Unavailable(message)
        out = [r for r in results if r is not None]
        assert len(out) == len(requests)
        return out

    def _admit_new(self, jobs: Sequence[Job]) -> None:
        """New jobs have committed: make them deliverable (here: the memory queue)."""
        admitted_at = self.clock.now()
        for job in jobs:
            self.core.restore(job, now=admitted_at)
        self.changed()

    async def _published(self, jobs: Sequence[Job]) -> None:
        """New jobs have committed and been admitted; a shared tier pushes them here."""

    async def _lookup_keys(
        self,
        owned: dict[str, tuple[int, _KeyEntry]],
        specs: dict[int, JobSpec],
        results: list[Job | Duplicate | Rejected | None],
    ) -> None:
        """Look the keys up in the record store; a found job is a duplicate."""
        keys = list(owned)
        backend = self.committer.backend
        found: list[Job | None] | None = None
        try:
            found = await self.committer.run_read(lambda: [backend.find_key(k) for k in keys])
        except StorageUnavailable as exc:
            raise Unavailable(str(exc)) from exc
        finally:
            if found is None:  # failed or cancelled: release the keys
                for key, (_index, entry) in owned.items():
                    self._drop_key(key, entry)
        for key, job in zip(keys, found, strict=True):
            if job is not None:
                index, entry = owned.pop(key)
                entry.job = job
                self._drop_key(key, entry)  # the store answers for it from now on
                del specs[index]
                results[index] = Duplicate(job)

    def _drop_key(self, key: str, entry: _KeyEntry) -> None:
        if self._keys.get(key) is entry:
            del self._keys[key]
        entry.ready.set()

    async def cancel(self, job_id: str) -> Job | Rejected:
        await self._admission()
        return await self._finish(job_id, self.core.cancel(job_id, now=self.clock.now()))

    async def get(self, job_id: str) -> Job | None:
        job = self.core.get(job_id)
        if job is not None:
            return job
        return await self._stored(job_id)

    async def _stored(self, job_id: str) -> Job | None:
        backend = self.committer.backend
        try:
            result = await self.committer.run_read(lambda: backend.get(job_id))
        except StorageUnavailable as exc:
            raise Unavailable(str(exc)) from exc
        assert result is None or isinstance(result, Job)
        return result

    async def _finish(self, job_id: str, result: Job | Rejected) -> Job | Rejected:
        """Persist a changed record and answer after commit; explain NOT_FOUND."""
        if isinstance(result, Rejected):
            return await self._explain(job_id, result)
        written = self._persist([result])
        self.changed()
        await self._committed(written)
        if result.id in written.refused:
            return await self._refusal(job_id)
        return result

    # -- workers -------------------------------------------------------------------

    def open_stream(
        self,
        *,
        worker_id: str,
        job_types: Sequence[str],
        prefetch: int,
        lease_seconds: float | None,
    ) -> tuple[int, trio.MemoryReceiveChannel[Job]]:
        """Attach a worker stream; jobs for it arrive on the returned channel."""
        if self.draining:
            raise Unavailable("the server is shutting down")
        stream_id = next(self._stream_ids)
        send, receive = trio.open_memory_channel[Job](prefetch)
        self.core.attach(
            stream_id,
            worker_id=worker_id,
            job_types=job_types,
            prefetch=prefetch,
            lease_seconds=lease_seconds,
        )
        self._streams[stream_id] = send
        self._receivers[stream_id] = receive
        self.changed()
        return stream_id, receive

    def close_stream(self, stream_id: int, *, server_leaving: bool = False) -> None:
        """Detach a stream: its un-acked jobs are requeued at once.

        Jobs still in the stream's buffer never left this server: they are
        released (back to their place, no attempt used); the others reached
        the worker and count as lost leases.
        """
        send = self._streams.pop(stream_id, None)
        receive = self._receivers.pop(stream_id, None)
        if send is None or receive is None:
            return
        unsent: set[str] = set()
        while True:
            try:
                unsent.add(receive.receive_nowait().id)
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                break
        send.close()
        changed = self.core.detach(
            stream_id, now=self.clock.now(), unsent=unsent, server_leaving=server_leaving
        )
        if changed:
            self._persist(changed)
            log.info(
                "stream %d closed; %d jobs requeued (%d never sent)",
                stream_id,
                len(changed),
                len(unsent),
            )
        self.changed()

    async def claim(
        self, job_type: str, *, worker_id: str, lease_seconds: float | None
    ) -> Job | None:
        """Unary dequeue of one job under a lease."""
        await self._admission()
        job = self.core.claim(
            job_type, now=self.clock.now(), worker_id=worker_id, lease_seconds=lease_seconds
        )
        if job is not None:
            self._persist([job])
            if self.metrics is not None:
                self.metrics.on_delivered([job], self.clock.now())
            self.changed()
        return job

    async def complete(self, job_id: str, lease_id: str | None) -> Job | Rejected:
        result = self.core.complete(job_id, lease_id=lease_id, now=self.clock.now())
        replayed = self._replayed(job_id, lease_id, Completed, result)
        if replayed is not None:
            return await self._answer_replay(replayed)
        return await self._finish(job_id, result)

    async def fail(self, job_id: str, lease_id: str | None, error: str) -> Job | Rejected:
        result = self.core.fail(job_id, lease_id=lease_id, error=error, now=self.clock.now())
        replayed = self._replayed(job_id, lease_id, Failed, result)
        if replayed is not None:
            return await self._answer_replay(replayed)
        if isinstance(result, Job) and result.status is not Status.FAILED:
            self._retried(result.job_type)
        return await self._finish(job_id, result)

    def _replayed(
        self,
        job_id: str,
        lease_id: str | None,
        kind: type[Completed | Failed | Released],
        result: Job | Rejected,
    ) -> Job | None:
        """The first outcome of a retried ack (the core decides what is a retry)."""
        if not isinstance(result, Rejected):
            return None
        return self.core.replay(job_id, lease_id, kind, result)

    async def _answer_replay(self, job: Job) -> Job:
        # The first ack's write may still be pending: answer once everything
        # written so far has committed (batches commit in order).
        await self._committed(self.committer.write([]))
        return job

    async def ack_many(self, acks: Sequence[AckRequest]) -> list[Job | Rejected]:
        """Complete, fail or release many jobs with one commit."""
        now = self.clock.now()
        results: list[Job | Rejected] = []
        replays: set[int] = set()
        for job_id, lease_id, failed, error, release in acks:
            result: Job | Rejected
            kind: type[Completed | Failed | Released]
            if release:
                kind = Released
                result = self.core.release(job_id, lease_id=lease_id, now=now)
            elif failed:
                kind = Failed
                result = self.core.fail(job_id, lease_id=lease_id, error=error, now=now)
                if isinstance(result, Job) and result.status is not Status.FAILED:
                    self._retried(result.job_type)
            else:
                kind = Completed
                result = self.core.complete(job_id, lease_id=lease_id, now=now)
            replayed = self._replayed(job_id, lease_id, kind, result)
            if replayed is not None:
                replays.add(len(results))
                result = replayed
            results.append(result)
        changed = [r for i, r in enumerate(results) if isinstance(r, Job) and i not in replays]
        done = self._persist(changed) if changed or replays else None
        self.changed()
        out = [await self._explain(ack[0], r) for ack, r in zip(acks, results, strict=True)]
        if done is not None:
            await self._committed(done)
            for index, (ack, result) in enumerate(zip(acks, out, strict=True)):
                if isinstance(result, Job) and index not in replays and result.id in done.refused:
                    out[index] = await self._refusal(ack[0])
        return out

    async def extend(
        self, job_id: str, lease_id: str | None, lease_seconds: float | None
    ) -> Job | Rejected:
        """Extend a lease. Not persisted: after a restart every lease is void anyway."""
        result = self.core.extend(
            job_id, lease_id=lease_id, now=self.clock.now(), lease_seconds=lease_seconds
        )
        if isinstance(result, Job):
            self.changed()
            return result
        return await self._explain(job_id, result)

    # -- dead letters and pauses -------------------------------------------------------

    async def dead_page(
        self, job_type: str | None, page_token: str, limit: int, max_bytes: int
    ) -> tuple[list[Job], str]:
        """One page of dead letters in the order they died, and the next page's token.

        Raises:
            ValueError: ``page_token`` is not one this server issued.
        """
        after = 0
        if page_token:
            try:
                after = int(page_token)
            except ValueError:
                raise ValueError("not a token from this server") from None
        jobs, cursor = self.core.dead(
            job_type=job_type, after=after, limit=limit, max_bytes=max_bytes
        )
        return jobs, str(cursor) if cursor else ""

    async def dead_ids(self, job_ids: Sequence[str], job_type: str, limit: int) -> list[str]:
        if job_ids:
            return list(job_ids)[:limit]
        return self.core.dead_ids(None if job_type == "*" else job_type)[:limit]

    async def requeue(self, job_ids: Sequence[str]) -> list[Job | Rejected]:
        await self._admission()
        now = self.clock.now()
        results = [self.core.requeue(job_id, now=now) for job_id in job_ids]
        return await self._finish_many(job_ids, results)

    async def purge(self, job_ids: Sequence[str]) -> list[Job | Rejected]:
        now = self.clock.now()
        results = [self.core.purge(job_id, now=now) for job_id in job_ids]
        deleted = [r.id for r in results if isinstance(r, Job)]
        done = self.committer.write(deletes=deleted) if deleted else None
        out = [await self._explain(job_id, r) for job_id, r in zip(job_ids, results, strict=True)]
        if done is not None:
            await self._committed(done)
        return out

    async def _finish_many(
        self, job_ids: Sequence[str], results: list[Job | Rejected]
    ) -> list[Job | Rejected]:
        changed = [r for r in results if isinstance(r, Job)]
        done = self._persist(changed) if changed else None
        self.changed()
        out = [await self._explain(job_id, r) for job_id, r in zip(job_ids, results, strict=True)]
        if done is not None:
            await self._committed(done)
        return out

    async def _explain(self, job_id: str, result: Job | Rejected) -> Job | Rejected:
        if isinstance(result, Rejected) and result.reason is RejectReason.NOT_FOUND:
            stored = await self._stored(job_id)
            if stored is not None:
                return Rejected(RejectReason.WRONG_STATE, f"job {job_id} is {stored.status.value}")
            return Rejected(RejectReason.NOT_FOUND, f"no job with id {job_id}", "job_id")
        return result

    async def pause(self, job_type: str) -> None:
        """Stop delivering ``job_type``; returns once the pause is durable."""
        async with self._pause_lock:
            await self._store_paused(job_type, paused=True)
            self.core.pause(job_type)

    async def resume(self, job_type: str) -> None:
        """Deliver ``job_type`` again; returns once the resume is durable."""
        async with self._pause_lock:
            await self._store_paused(job_type, paused=False)
            self.core.resume(job_type)
        self.changed()

    async def _store_paused(self, job_type: str, *, paused: bool) -> None:
        # Store first, then the core (see the module docstring); the callers
        # hold the pause lock across both, so concurrent pauses and resumes
        # reach the store and the core in the same order.
        backend = self.committer.backend
        try:
            await self.committer.run_blocking(lambda: backend.set_paused(job_type, paused))
        except StorageUnavailable as exc:
            raise Unavailable(str(exc)) from exc

    async def set_limit(self, job_type: str, limit: TypeLimit | None) -> None:
        """Set, change or clear a type's limits; returns once they are durable."""
        async with self._pause_lock:
            backend = self.committer.backend
            try:
                await self.committer.run_blocking(lambda: backend.set_limit(job_type, limit))
            except StorageUnavailable as exc:
                raise Unavailable(str(exc)) from exc
            self.limiter.set(job_type, limit)
        log.info("limits of %s: %s", job_type, "none" if limit is None else limit.describe())
        self.changed()

    async def limits(self) -> Mapping[str, TypeLimit]:
        """The limits in force, by job type."""
        return self.limiter.limits()

    def type_views(
        self, stats: QueueStats | None, limits: Mapping[str, TypeLimit]
    ) -> list[TypeView]:
        """Every job type known here -- by its jobs, counters, streams or limits --
        with the queue's counts, this instance's counters and workers, and limits."""
        known = stats.types if stats is not None else {}
        by_type = self.core.dispatcher.statistics().streams_by_type
        names = known.keys() | self.counters.keys() | by_type.keys() | limits.keys()
        views = []
        for name in sorted(names):
            t = known.get(name)
            c = self.counters.get(name) or TypeCounters()
            limit = limits.get(name)
            rate = limit.rate if limit else None
            views.append(
                TypeView(
                    job_type=name,
                    queued=t.queued if t else (0, 0, 0),
                    scheduled=t.scheduled if t else 0,
                    running=t.running if t else 0,
                    dead=t.dead if t else 0,
                    paused=t.paused if t else False,
                    workers=by_type.get(name, 0),
                    completed=c.completed,
                    failed=c.failed,
                    retried=c.retried,
                    rate_limit=rate.rate if rate else 0.0,
                    rate_burst=rate.burst if rate else 0,
                    max_running=(limit.max_running or 0) if limit else 0,
                    throttled=self.throttled(name),
                )
            )
        return views

    def throttled(self, job_type: str) -> int:
        """Times a limit held back jobs of ``job_type`` on this instance."""
        return sum(n for (t, _held), n in self.limiter.throttled.items() if t == job_type)

    async def _restore_limits(self) -> int:
        """Load the stored limits, store the configured ones over them; returns the count."""
        backend = self.committer.backend
        stored = await self.committer.run_blocking(backend.load_limits)
        for job_type, limit in self.configured_limits.items():
            if stored.get(job_type) != limit:
                await self.committer.run_blocking(
                    functools.partial(backend.set_limit, job_type, limit)
                )
            stored[job_type] = limit
        for job_type, limit in stored.items():
            self.limiter.set(job_type, limit)
        return len(stored)

    def restore_paused(self, job_types: Sequence[str]) -> None:
        """Re-apply the stored pauses at start, before anything is delivered."""
        for job_type in job_types:
            self.core.pause(job_type)

    async def statistics(self) -> QueueStats:
        return self.core.statistics()

    def backends(self) -> list[tuple[str, str, str]]:
        """``(role, kind, health)`` of each backend, for GetStats."""
        return [
            ("record_store", self.committer.backend.kind, self.committer.health.state.value),
            ("queue_tier", "memory", "healthy"),
        ]

    def queue_route(self) -> str:
        """Where this instance enqueues and claims now (for GetStats)."""
        return "memory"

    def route(self) -> Route:
        """The storage path requests take now (decided by the core)."""
        return route(None, self.committer.health.state, self.durability)

    # -- tasks -------------------------------------------------------------------------

    async def prepare(self) -> str:
        """Rebuild the queue from the record store at start; returns a log line.

        Pauses first: nothing may be delivered for a paused type, ever.
        """
        backend = self.committer.backend
        paused = await self.committer.run_blocking(backend.load_paused)
        self.restore_paused(paused)
        limited = await self._restore_limits()
        jobs = await self.committer.run_blocking(backend.load_active)
        requeued = self.restore(jobs)
        return (
            f"record store {backend.kind}: {len(jobs)} active jobs restored, "
            f"{requeued} running jobs requeued, {len(paused)} job types paused, "
            f"{limited} limited"
        )

    async def run_tasks(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """The broker's background tasks (here: the timer), until cancelled."""
        await self.run_timer(task_status=task_status)

    async def run_timer(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Promote due jobs and expire leases at the core's next deadline."""
        task_status.started()
        while True:
            deadline = self.core.next_deadline()
            self._timer_target = math.inf if deadline is None else deadline
            self._timer_wakeup = trio.Event()
            trio_deadline = math.inf if deadline is None else self.clock.trio_deadline(deadline)
            with trio.move_on_at(trio_deadline):
                await self._timer_wakeup.wait()
            changed = self.core.tick(now=self.clock.now())
            if changed:
                self._persist(changed)
            self.changed()

    async def run_retention(self, retention: Retention, *, batch: int = 500) -> None:
        """Prune finished and dead jobs by ``retention``, a pass every
        ``retention.interval`` seconds, until cancelled."""
        interval = retention.interval
        if interval is None:
            return
        while True:
            try:
                await self.prune(retention, batch=batch)
            except (Unavailable, OutcomeUnknown) as exc:
                log.warning("retention: %s; next try in %g s", exc, interval)
            except Exception:
                # A maintenance pass must not take the server down with it.
                log.exception("retention pass failed; next try in %g s", interval)
            await trio.sleep(interval)

    async def prune(self, retention: Retention, *, batch: int = 500) -> tuple[int, int]:
        """One retention pass; returns ``(finished, dead)`` rows deleted.

        Bounded batches, with a pause between them, so the record store's
        writer (and the group commits of the hot path) get their turns.
        """
        if self.committer.health.state is not Health.HEALTHY:
            raise Unavailable(f"the record store is {self.committer.health.state.value}")
        finished_before, dead_before = retention.cutoffs(self.clock.now())
        backend = self.committer.backend
        finished = dead_n = 0
        if finished_before is not None:
            finished = await self._prune_batches(
                functools.partial(backend.prune_finished, finished_before), batch
            )
        if dead_before is not None:
            dead_n = await self._prune_dead(dead_before, batch)
        if finished or dead_n:
            log.info("retention: deleted %d finished and %d dead jobs", finished, dead_n)
        self.pruned["finished"] += finished
        self.pruned["dead"] += dead_n
        return finished, dead_n

    async def _prune_batches(self, prune: Callable[[int], int], batch: int) -> int:
        total = 0
        while True:
            try:
                n = await self.committer.run_blocking(functools.partial(prune, batch))
            except StorageUnavailable as exc:
                raise Unavailable(str(exc)) from exc
            total += n
            if n < batch:
                return total
            await trio.sleep(0.01)

    async def _prune_dead(self, before: float, batch: int) -> int:
        """Dead letters are in this instance's memory: purged through the core."""
        total = 0
        while ids := self.core.dead_before(before, batch):
            results = await self.purge(ids)
            total += sum(1 for r in results if isinstance(r, Job))
            if len(ids) < batch:
                break
            await trio.sleep(0.01)
        return total

    async def drain(self, grace: float) -> None:
        """Stop delivering; wait up to ``grace`` for running jobs; requeue the rest."""
        self.draining = True
        with trio.move_on_after(grace):
            while self.core.count(Status.RUNNING):
                self._idle = trio.Event()
                await self._idle.wait()
        for stream_id in list(self._streams):
            # The server is leaving, not the worker failing: no poison-pill count.
            self.close_stream(stream_id, server_leaving=True)

    def restore(self, jobs: Sequence[Job]) -> int:
        """Rebuild the queue from the record store at start; returns requeued count."""
        now = self.clock.now()
        requeued: list[Job] = []
        for job in jobs:
            restored = self.core.restore(job, now=now)
            if restored is not job:
                requeued.append(restored)
        if requeued:
            self._persist(requeued)
        return len(requeued)

    @property
    def stream_count(self) -> int:
        return len(self._streams)

    def stream_infos(self) -> list[StreamInfo]:
        """The worker streams attached to this instance (for the dashboard)."""
        infos = (self.core.dispatcher.stream(sid) for sid in list(self._streams))
        return [info for info in infos if info is not None]


def rejected_to_status(rejected: Rejected) -> tuple[str, str]:
    """The gRPC status name and message for a core rejection."""
    status = _STATUS_OF[rejected.reason]
    message = rejected.message
    if rejected.field and rejected.reason is RejectReason.INVALID_ARGUMENT:
        message = (
            f"{rejected.field}: {message}" if not message.startswith(rejected.field) else message
        )
    return status, message


_STATUS_OF: dict[RejectReason, str] = {
    RejectReason.INVALID_ARGUMENT: "INVALID_ARGUMENT",
    RejectReason.TOO_LARGE: "RESOURCE_EXHAUSTED",
    RejectReason.NOT_FOUND: "NOT_FOUND",
    RejectReason.WRONG_STATE: "FAILED_PRECONDITION",
    RejectReason.STALE_LEASE: "FAILED_PRECONDITION",
    RejectReason.NOT_DUE: "FAILED_PRECONDITION",
    RejectReason.LEASE_NOT_EXPIRED: "FAILED_PRECONDITION",
}
