"""A stateful model of :class:`QueueCore` (STYLE §3), checked after every step.

:class:`QueueMachine` plays producers (enqueue with random priority, delay,
retries and schedule), workers (streams with random prefetch and job types,
dispatch, acks with the current, an omitted or a stale lease, heartbeats,
unary claims), a forward-only clock, lost workers (detach), restarts
(``restore``), pauses, cancels and dead-letter requeue/purge, against a small
reference model. :class:`MisuseMachine` throws arbitrary (type-correct) calls at
the core: each either returns or raises ``StackduckError``/``ValueError``.
"""

from __future__ import annotations

import itertools
from collections import Counter

import attrs
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from stackduck_core import (
    Delivery,
    EnqueueRequest,
    Job,
    LifecyclePolicy,
    RejectReason,
    StackduckError,
    Status,
    TypeStats,
)
from tests.core.harness import T0, Harness, expect_job, expect_rejected

TYPES = ("a", "b")
DEFAULT_LEASE = 60.0
#: ``holder`` of a job claimed by a unary DequeueJob (no stream).
UNARY = -1
ACTIVE = (Status.SCHEDULED, Status.QUEUED, Status.RUNNING, Status.FAILED)


@attrs.define
class MJob:
    """The model's view of one job. ``status`` ``None`` means purged."""

    id: str
    job_type: str
    priority: int
    max_retries: int
    delay: int
    status: Status | None
    due: float
    seq: int = 0
    retry_count: int = 0
    lost_leases: int = 0
    lease: str | None = None
    expires: float | None = None
    holder: int | None = None
    leases: list[str] = attrs.field(factory=list)

    @property
    def active(self) -> bool:
        return self.status in ACTIVE


@attrs.define
class MStream:
    types: tuple[str, ...]
    prefetch: int
    lease_seconds: float
    held: set[str] = attrs.field(factory=set)


def backoff(delay: int, retry_count: int) -> int:
    """ARCHITECTURE §1.5, written independently of ``retry_delay``."""
    return int(min(delay * 2**retry_count, 3600))


_JobSpec = tuple[str, int | None, int | None, int | None, float]
_JOB_SPECS: st.SearchStrategy[_JobSpec] = st.tuples(
    st.sampled_from(TYPES),
    st.one_of(st.none(), st.integers(1, 3)),  # priority
    st.one_of(st.none(), st.sampled_from([0, 1, 30, 2000])),  # delay (backoff base)
    st.one_of(st.none(), st.integers(0, 3)),  # max_retries
    st.sampled_from([0.0, 0.0, 0.0, 5.0, 45.5, 300.0]),  # scheduled_at - now
)


class QueueMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.jobs: dict[str, MJob] = {}
        self.streams: dict[int, MStream] = {}
        self.paused: set[str] = set()
        self.dead_order: list[str] = []
        self.max_seq = 0
        self.issued: set[str] = set()
        self.stream_ids = itertools.count(1)
        self.job_ids = itertools.count(1)
        self.max_lost = 3
        self.h = Harness(policy=LifecyclePolicy(max_lost_leases=3), default_lease=DEFAULT_LEASE)

    @initialize(
        max_lost=st.integers(1, 4),
        streams=st.lists(
            st.tuples(
                st.lists(st.sampled_from(TYPES), min_size=1, max_size=2),
                st.integers(1, 3),
                st.sampled_from([None, 5.0, 30.0]),
            ),
            max_size=3,
        ),
        backlog=st.lists(_JOB_SPECS, max_size=8),
    )
    def configure(
        self,
        max_lost: int,
        streams: list[tuple[list[str], int, float | None]],
        backlog: list[_JobSpec],
    ) -> None:
        """A starting point: a policy, some worker streams and some jobs."""
        self.max_lost = max_lost
        self.h = Harness(
            policy=LifecyclePolicy(max_lost_leases=max_lost), default_lease=DEFAULT_LEASE
        )
        for types, prefetch, lease_seconds in streams:
            self.attach(types, prefetch, lease_seconds, then_dispatch=False)
        if backlog:
            self.enqueue(backlog, then_dispatch=False)

    # -- helpers -------------------------------------------------------------------

    @property
    def now(self) -> float:
        return self.h.now

    def _pick(self, data: st.DataObject, jobs: list[MJob], label: str) -> MJob:
        return data.draw(st.sampled_from(sorted(jobs, key=lambda j: j.id)), label=label)

    def _with(self, *statuses: Status | None) -> list[MJob]:
        return [j for j in self.jobs.values() if j.status in statuses]

    def _fresh_seq(self, job: MJob, record: Job) -> None:
        """``record`` entered the queue at the back of its priority."""
        assert record.seq > self.max_seq, (record, self.max_seq)
        self.max_seq = job.seq = record.seq

    def _enter_queue(self, job: MJob, record: Job, *, due: float) -> None:
        assert record.status is Status.QUEUED, record
        assert record.scheduled_at == due
        self._fresh_seq(job, record)
        job.status, job.due = Status.QUEUED, due

    def _release(self, job: MJob) -> None:
        if job.holder is not None and job.holder != UNARY:
            self.streams[job.holder].held.discard(job.id)
        job.lease = job.expires = job.holder = None

    def _die(self, job: MJob) -> None:
        job.status = Status.FAILED
        self.dead_order.append(job.id)

    def _lose_lease(self, job: MJob, record: Job) -> None:
        """The job's lease was lost (expiry, detach, restart)."""
        assert job.status is Status.RUNNING
        self._release(job)
        job.lost_leases += 1
        assert record.lost_leases == job.lost_leases and record.lease_id is None
        if job.lost_leases >= self.max_lost:
            assert record.status is Status.FAILED, record
            assert "poison pill" in record.error_message
            self._die(job)
        else:
            # keeps its FIFO place
            assert record.status is Status.QUEUED and record.seq == job.seq != 0, record
            assert record.scheduled_at == self.now
            job.status, job.due = Status.QUEUED, self.now

    def _start(self, job: MJob, record: Job, holder: int, lease_seconds: float) -> None:
        """``record`` is the delivery of queued ``job`` to ``holder``."""
        assert job.status is Status.QUEUED and record.status is Status.RUNNING
        assert job.due <= self.now, "delivered before its scheduled_at"
        assert record.lease_id is not None and record.lease_id not in self.issued
        assert record.lease_expires_at == self.now + lease_seconds
        self.issued.add(record.lease_id)
        job.status, job.lease, job.expires, job.holder = (
            Status.RUNNING,
            record.lease_id,
            record.lease_expires_at,
            holder,
        )
        job.leases.append(record.lease_id)
        if holder != UNARY:
            stream = self.streams[holder]
            assert job.job_type in stream.types and job.job_type not in self.paused
            stream.held.add(job.id)

    def _queued_in_order(self, job_type: str) -> list[MJob]:
        return sorted(
            (j for j in self._with(Status.QUEUED) if j.job_type == job_type),
            key=lambda j: (j.priority, j.seq),
        )

    # -- producers -------------------------------------------------------------------

    @rule(batch=st.lists(_JOB_SPECS, min_size=1, max_size=4), then_dispatch=st.booleans())
    def enqueue(self, batch: list[_JobSpec], then_dispatch: bool) -> None:
        for job_type, priority, delay, max_retries, offset in batch:
            self._enqueue_one(job_type, priority, delay, max_retries, offset)
        if then_dispatch:
            self._dispatch()

    def _enqueue_one(
        self,
        job_type: str,
        priority: int | None,
        delay: int | None,
        max_retries: int | None,
        offset: float,
    ) -> None:
        job_id = f"job{next(self.job_ids)}"
        request = EnqueueRequest(
            job_type=job_type,
            priority=priority,
            delay=delay,
            max_retries=max_retries,
            scheduled_at=self.now + offset if offset else None,
        )
        record = expect_job(self.h.core.enqueue(request, job_id=job_id, now=self.now))
        job = MJob(
            id=job_id,
            job_type=job_type,
            priority=2 if priority is None else priority,
            max_retries=2 if max_retries is None else max_retries,
            delay=30 if delay is None else delay,
            status=Status.SCHEDULED,
            due=self.now + offset,
        )
        assert (record.priority, record.max_retries, record.delay) == (
            job.priority,
            job.max_retries,
            job.delay,
        )
        self.jobs[job_id] = job
        if offset:
            assert record.status is Status.SCHEDULED and record.scheduled_at == job.due
        else:
            self._enter_queue(job, record, due=self.now)

    # -- workers ------------------------------------------------------------------------

    @rule(
        types=st.lists(st.sampled_from(TYPES), min_size=1, max_size=3),
        prefetch=st.integers(1, 3),
        lease_seconds=st.sampled_from([None, 5.0, 30.0]),
        then_dispatch=st.booleans(),
    )
    def attach(
        self, types: list[str], prefetch: int, lease_seconds: float | None, then_dispatch: bool
    ) -> None:
        sid = next(self.stream_ids)
        self.h.core.attach(
            sid,
            worker_id=f"w{sid}",
            job_types=types,
            prefetch=prefetch,
            lease_seconds=lease_seconds,
        )
        self.streams[sid] = MStream(
            tuple(dict.fromkeys(types)), prefetch, lease_seconds or DEFAULT_LEASE
        )
        if then_dispatch:
            self._dispatch()

    @rule(data=st.data())
    def refused_calls(self, data: st.DataObject) -> None:
        """An id that exists, a stream attached twice, a prefetch below 1: no change."""
        active = sorted(j.id for j in self._with(*ACTIVE))
        if active and data.draw(st.booleans(), label="duplicate job id") is True:
            job_id = data.draw(st.sampled_from(active), label="job id")
            result = self.h.core.enqueue(EnqueueRequest(job_type="a"), job_id=job_id, now=self.now)
            expect_rejected(result, RejectReason.WRONG_STATE)
            return
        if self.streams and data.draw(st.booleans(), label="duplicate stream") is True:
            sid, prefetch = data.draw(st.sampled_from(sorted(self.streams)), label="sid"), 1
        else:
            sid, prefetch = 10**6, data.draw(st.integers(-2, 0), label="prefetch")
        with pytest.raises(ValueError):
            self.h.core.attach(sid, worker_id="x", job_types=TYPES, prefetch=prefetch)

    @rule(data=st.data())
    def detach(self, data: st.DataObject) -> None:
        sid = data.draw(st.sampled_from([*sorted(self.streams), 999]), label="sid")
        stream = self.streams.pop(sid, None)
        changed = self.h.core.detach(sid, now=self.now)
        held = set() if stream is None else stream.held
        assert sorted(j.id for j in changed) == sorted(held)
        for record in changed:
            job = self.jobs[record.id]
            job.holder = None  # the stream is gone already
            self._lose_lease(job, record)

    @rule()
    def dispatch(self) -> None:
        self._dispatch()

    def _dispatch(self) -> None:
        """The runtime's dispatch pass, checked: order, credit, work conservation."""
        before = {t: self._queued_in_order(t) for t in TYPES}
        credit = {sid: s.prefetch - len(s.held) for sid, s in self.streams.items()}
        deliveries = self.h.core.dispatch(now=self.now)
        per_stream = Counter(d.stream_id for d in deliveries)
        for sid, n in per_stream.items():
            assert n <= credit[sid], "a stream got more than its prefetch"
        for job_type in TYPES:
            got = [d.job.id for d in deliveries if d.job.job_type == job_type]
            # the best ready jobs of the type, best first
            assert got == [j.id for j in before[job_type][: len(got)]]
        for delivery in deliveries:
            stream = self.streams[delivery.stream_id]
            job = self.jobs[delivery.job.id]
            assert delivery.job.worker_id == f"w{delivery.stream_id}"
            self._start(job, delivery.job, delivery.stream_id, stream.lease_seconds)
        # work-conserving: no stream with credit left beside a ready, unpaused job
        for stream in self.streams.values():
            if len(stream.held) < stream.prefetch:
                for job_type in stream.types:
                    assert job_type in self.paused or not self._queued_in_order(job_type)

    @rule(data=st.data(), lease_seconds=st.sampled_from([None, 10.0]))
    def claim(self, data: st.DataObject, lease_seconds: float | None) -> None:
        ready = sorted({j.job_type for j in self._with(Status.QUEUED)})
        job_type = data.draw(st.sampled_from(ready or TYPES), label="job type")
        record = self.h.core.claim(
            job_type, now=self.now, worker_id="unary", lease_seconds=lease_seconds
        )
        queued = self._queued_in_order(job_type)
        if job_type in self.paused or not queued:
            assert record is None
            return
        assert record is not None and record.id == queued[0].id
        self._start(queued[0], record, UNARY, lease_seconds or DEFAULT_LEASE)

    @precondition(lambda self: any(j.status is Status.RUNNING for j in self.jobs.values()))
    @rule(data=st.data(), omit_lease=st.booleans(), then_dispatch=st.booleans())
    def ack_complete(self, data: st.DataObject, omit_lease: bool, then_dispatch: bool) -> None:
        job = self._pick(data, self._with(Status.RUNNING), "job")
        lease = None if omit_lease else job.lease
        record = expect_job(self.h.core.complete(job.id, lease_id=lease, now=self.now))
        assert record.status is Status.COMPLETED and record.completed_at == self.now
        self._release(job)
        job.status = Status.COMPLETED
        if then_dispatch:
            self._dispatch()

    @precondition(lambda self: any(j.status is Status.RUNNING for j in self.jobs.values()))
    @rule(data=st.data(), omit_lease=st.booleans(), then_dispatch=st.booleans())
    def ack_fail(self, data: st.DataObject, omit_lease: bool, then_dispatch: bool) -> None:
        self._fail(data, omit_lease)
        if then_dispatch:
            self._dispatch()

    def _fail(self, data: st.DataObject, omit_lease: bool) -> None:
        job = self._pick(data, self._with(Status.RUNNING), "job")
        lease = None if omit_lease else job.lease
        record = expect_job(self.h.core.fail(job.id, lease_id=lease, error="boom", now=self.now))
        assert record.error_message == "boom" and record.lease_id is None
        self._release(job)
        if job.retry_count >= job.max_retries:
            assert record.status is Status.FAILED and record.retry_count == job.retry_count
            self._die(job)
            return
        wait = backoff(job.delay, job.retry_count)
        job.retry_count += 1
        assert record.retry_count == job.retry_count
        if wait:
            assert record.status is Status.SCHEDULED
            assert record.scheduled_at == self.now + wait
            job.status, job.due = Status.SCHEDULED, self.now + wait
        else:
            self._enter_queue(job, record, due=self.now)

    @precondition(lambda self: any(j.status is Status.RUNNING for j in self.jobs.values()))
    @rule(
        data=st.data(),
        omit_lease=st.booleans(),
        lease_seconds=st.sampled_from([None, 1.0, 30.0, 120.0]),
        then_dispatch=st.booleans(),
    )
    def heartbeat(
        self,
        data: st.DataObject,
        omit_lease: bool,
        lease_seconds: float | None,
        then_dispatch: bool,
    ) -> None:
        job = self._pick(data, self._with(Status.RUNNING), "job")
        lease = None if omit_lease else job.lease
        record = expect_job(
            self.h.core.extend(job.id, lease_id=lease, now=self.now, lease_seconds=lease_seconds)
        )
        assert job.expires is not None
        if lease_seconds is None:
            # the lease length the holding stream asked for, else the default
            held_by_stream = job.holder is not None and job.holder != UNARY
            lease_seconds = (
                self.streams[job.holder].lease_seconds if held_by_stream else DEFAULT_LEASE  # type: ignore[index]
            )
        job.expires = max(job.expires, self.now + lease_seconds)
        assert record.status is Status.RUNNING and record.lease_id == job.lease
        assert record.lease_expires_at == job.expires
        if then_dispatch:
            self._dispatch()

    @precondition(lambda self: bool(self.jobs))
    @rule(data=st.data(), action=st.sampled_from(["complete", "fail", "extend"]))
    def misdirected_ack(self, data: st.DataObject, action: str) -> None:
        """An ack with a stale lease, or for a job that is not running."""
        job = self._pick(data, list(self.jobs.values()), "job")
        candidates = sorted(self.issued - {job.lease} if job.lease else self.issued)
        if job.status is not Status.RUNNING:
            candidates.append("")  # "" and None both mean "the current lease"
        lease = data.draw(st.sampled_from([*candidates, "never-issued"]), label="lease")
        lease_id = None if lease == "" else lease
        core = self.h.core
        if action == "complete":
            result = core.complete(job.id, lease_id=lease_id, now=self.now)
        elif action == "fail":
            result = core.fail(job.id, lease_id=lease_id, error="late", now=self.now)
        else:
            result = core.extend(job.id, lease_id=lease_id, now=self.now)
        if not job.active:
            expect_rejected(result, RejectReason.NOT_FOUND)
        elif job.status is Status.RUNNING:
            expect_rejected(result, RejectReason.STALE_LEASE)
        else:
            expect_rejected(result, RejectReason.WRONG_STATE)

    # -- operators ---------------------------------------------------------------------------

    @precondition(lambda self: bool(self.jobs))
    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        job = self._pick(data, list(self.jobs.values()), "job")
        result = self.h.core.cancel(job.id, now=self.now)
        if not job.active:
            expect_rejected(result, RejectReason.NOT_FOUND)
        elif job.status is Status.FAILED:
            expect_rejected(result, RejectReason.WRONG_STATE)
        else:
            assert expect_job(result).status is Status.CANCELLED
            self._release(job)
            job.status = Status.CANCELLED

    @precondition(lambda self: bool(self.jobs))
    @rule(data=st.data(), purge=st.booleans(), dead_only=st.booleans())
    def requeue_or_purge(self, data: st.DataObject, purge: bool, dead_only: bool) -> None:
        pool = self._with(Status.FAILED) if dead_only else []
        job = self._pick(data, pool or list(self.jobs.values()), "job")
        before = self.h.core.get(job.id)
        if purge:
            result = self.h.core.purge(job.id, now=self.now)
        else:
            result = self.h.core.requeue(job.id, now=self.now)
        if not job.active:
            expect_rejected(result, RejectReason.NOT_FOUND)
        elif job.status is not Status.FAILED:
            expect_rejected(result, RejectReason.WRONG_STATE)
        elif purge:
            assert expect_job(result) == before
            self.dead_order.remove(job.id)
            job.status = None
        else:
            record = expect_job(result)
            assert (record.retry_count, record.lost_leases, record.attempt) == (0, 0, 0)
            self.dead_order.remove(job.id)
            job.retry_count = job.lost_leases = 0
            self._enter_queue(job, record, due=self.now)

    @rule(job_type=st.sampled_from(TYPES), pause=st.booleans())
    def pause_or_resume(self, job_type: str, pause: bool) -> None:
        if pause:
            self.h.core.pause(job_type)
            self.paused.add(job_type)
        else:
            self.h.core.resume(job_type)
            self.paused.discard(job_type)

    @rule(job_type=st.sampled_from([None, *TYPES]), limit=st.integers(1, 4))
    def list_dead(self, job_type: str | None, limit: int) -> None:
        expected = [i for i in self.dead_order if job_type in (None, self.jobs[i].job_type)]
        seen: list[str] = []
        cursor = 0
        for _ in range(len(expected) + 1):
            page, cursor = self.h.core.dead(job_type=job_type, after=cursor, limit=limit)
            assert len(page) == limit or (cursor == 0 and len(page) <= limit)
            seen += [job.id for job in page]
            if not cursor:
                break
        assert seen == expected

    # -- time and restarts ------------------------------------------------------------------

    def _tick(self, changed: list[Job]) -> None:
        promote = {j.id for j in self._with(Status.SCHEDULED) if j.due <= self.now}
        expire = {
            j.id
            for j in self._with(Status.RUNNING)
            if j.expires is not None and j.expires <= self.now
        }
        assert sorted(j.id for j in changed) == sorted(promote | expire)
        for record in changed:
            job = self.jobs[record.id]
            if record.id in promote:
                self._enter_queue(job, record, due=job.due)
            else:
                self._lose_lease(job, record)
        deadline = self.h.core.next_deadline()
        assert deadline is None or deadline > self.now

    @rule(
        dt=st.sampled_from([0.0, 0.5, 1.0, 5.0, 29.5, 60.0, 300.0, 4000.0]),
        then_dispatch=st.booleans(),
    )
    def advance(self, dt: float, then_dispatch: bool) -> None:
        self._tick(self.h.advance(dt))
        if then_dispatch:
            self._dispatch()

    @precondition(lambda self: self.h.core.next_deadline() is not None)
    @rule()
    def advance_to_next_deadline(self) -> None:
        deadline = self.h.core.next_deadline()
        assert deadline is not None
        changed = self.h.advance_to(deadline)
        assert changed, "next_deadline() promised work"
        self._tick(changed)

    @rule()
    def restart(self) -> None:
        """A new process restores the records; streams and pauses are gone."""
        old = self.h.restart()
        records = [old.get(i) for i in self.dead_order] + [
            old.get(j.id) for j in self.jobs.values() if j.active and j.status is not Status.FAILED
        ]
        self.streams.clear()
        self.paused.clear()
        self.dead_order.clear()
        self.max_seq = max((r.seq for r in records if r is not None), default=0)
        for record in records:
            assert record is not None
            job = self.jobs[record.id]
            restored = self.h.core.restore(record, now=self.now)
            if record.status is Status.RUNNING:
                job.holder = None
                self._lose_lease(job, restored)
            else:
                assert restored == record
                if job.status is Status.FAILED:
                    self.dead_order.append(job.id)

    # -- invariants ------------------------------------------------------------------------------

    @invariant()
    def core_agrees_with_the_model(self) -> None:
        core = self.h.core
        counts: Counter[tuple[str, Status, int]] = Counter()
        leases: list[str] = []
        for job in self.jobs.values():
            record = core.get(job.id)
            if not job.active:
                assert record is None, record
                continue
            assert record is not None, f"{job.id} was lost"
            assert job.status is not None
            counts[job.job_type, job.status, job.priority] += 1
            assert record.status is job.status, (record, job)
            assert (record.job_type, record.priority, record.max_retries) == (
                job.job_type,
                job.priority,
                job.max_retries,
            )
            assert (record.retry_count, record.lost_leases) == (job.retry_count, job.lost_leases)
            assert record.retry_count <= record.max_retries
            if job.status is Status.SCHEDULED:
                assert record.scheduled_at == job.due > self.now
            elif job.status is Status.QUEUED:
                assert record.seq == job.seq and record.scheduled_at <= self.now
            elif job.status is Status.RUNNING:
                assert record.lease_id == job.lease is not None
                assert record.lease_expires_at == job.expires
                assert job.expires is not None and job.expires > self.now
                leases.append(job.lease)
                if job.holder != UNARY:
                    assert job.holder is not None and job.id in self.streams[job.holder].held
            else:
                assert (
                    record.retry_count == record.max_retries or record.lost_leases >= self.max_lost
                )
                assert record.lease_id is None
        assert len(leases) == len(set(leases)), "two running jobs share a lease"
        self._check_statistics(counts)

    def _check_statistics(self, counts: Counter[tuple[str, Status, int]]) -> None:
        stats = self.h.core.statistics()
        expected: dict[str, TypeStats] = {}
        for job_type in sorted({t for t, _, _ in counts} | self.paused):

            def n(status: Status, priority: int | None = None, t: str = job_type) -> int:
                return sum(
                    c
                    for (tt, s, p), c in counts.items()
                    if tt == t and s is status and priority in (None, p)
                )

            expected[job_type] = TypeStats(
                queued=(n(Status.QUEUED, 1), n(Status.QUEUED, 2), n(Status.QUEUED, 3)),
                scheduled=n(Status.SCHEDULED),
                running=n(Status.RUNNING),
                dead=n(Status.FAILED),
                paused=job_type in self.paused,
            )
        assert stats.types == expected
        totals = Counter[Status]()
        for (_, status, _), c in counts.items():
            totals[status] += c
        assert (stats.queued, stats.scheduled, stats.running, stats.dead) == (
            totals[Status.QUEUED],
            totals[Status.SCHEDULED],
            totals[Status.RUNNING],
            totals[Status.FAILED],
        )
        assert stats.streams == len(self.streams)
        assert self.h.core.paused == self.paused

    @invariant()
    def streams_never_exceed_prefetch(self) -> None:
        dispatcher = self.h.core.dispatcher
        for sid, stream in self.streams.items():
            info = dispatcher.stream(sid)
            assert info is not None
            assert info.in_flight == len(stream.held) <= stream.prefetch
            for job_id in stream.held:
                job = self.jobs[job_id]
                assert job.status is Status.RUNNING and job.holder == sid
        assert dispatcher.statistics().in_flight == sum(len(s.held) for s in self.streams.values())

    @invariant()
    def dead_letters_are_exactly_the_exhausted_jobs(self) -> None:
        assert self.h.core.dead_ids() == self.dead_order
        assert sorted(self.dead_order) == sorted(j.id for j in self._with(Status.FAILED))

    @invariant()
    def next_deadline_is_the_earliest_timer(self) -> None:
        times = [j.due for j in self._with(Status.SCHEDULED)]
        times += [j.expires for j in self._with(Status.RUNNING) if j.expires is not None]
        deadline = self.h.core.next_deadline()
        assert deadline == (min(times) if times else None)
        assert deadline is None or deadline > self.now


QueueMachine.TestCase.settings = settings(
    max_examples=250,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestQueueMachine = QueueMachine.TestCase


# -- robustness: misuse never raises anything but StackduckError / ValueError ----------------------

_IDS = st.sampled_from(["job1", "job2", "job3", "job4", "", "nope", "\U0001f600"])
_LEASES = st.sampled_from([None, "", "lease1", "lease2", "lease3", "lease4", "bogus"])
_SECONDS = st.sampled_from([None, 0.0, -5.0, 1e-9, 1.0, 30.0, 1e6])
_TYPES = st.sampled_from(["a", "b", "", "bad type!", "x" * 200])
_NOW_OFFSETS = st.sampled_from([0.0, 0.5, 10.0, 1000.0])


def _request() -> st.SearchStrategy[EnqueueRequest]:
    return st.builds(
        EnqueueRequest,
        job_type=_TYPES,
        payload=st.sampled_from([None, "", "{}", "[1]", "not json", '{"a":']),
        priority=st.one_of(st.none(), st.integers(-1, 5)),
        delay=st.one_of(st.none(), st.sampled_from([-1, 0, 1, 30, 3600, 3601, 10**9])),
        max_retries=st.one_of(st.none(), st.sampled_from([-1, 0, 1, 2, 100, 101])),
        scheduled_at=st.one_of(
            st.none(),
            st.sampled_from(
                [
                    "",
                    "garbage",
                    "2026-01-01T00:00:30Z",
                    "2026-01-01T00:00:30",
                    "1767225700",
                    T0 + 20,
                    -5.0,
                    1e13,
                    float("nan"),
                    float("inf"),
                ]
            ),
        ),
    )


class MisuseMachine(RuleBasedStateMachine):
    """Arbitrary type-correct calls: values, or StackduckError/ValueError."""

    def __init__(self) -> None:
        super().__init__()
        self.h = Harness(policy=LifecyclePolicy(max_lost_leases=2))
        self.records: list[Job] = []

    @initialize(seeded=st.booleans())
    def seed(self, seeded: bool) -> None:
        """Optionally start with a queued, a running and a dead-lettered job."""
        if seeded:
            self.records += [
                self.h.enqueue("a", job_id="job1"),
                self.h.enqueue("b", job_id="job2"),
                self.h.claim("b"),
                self.h.dead_letter("x", job_id="job3"),
            ]

    def _call(self, name: str, *args: object, **kwargs: object) -> object:
        try:
            result = getattr(self.h.core, name)(*args, **kwargs)
        except (StackduckError, ValueError):
            return None
        for item in result if isinstance(result, list) else [result]:
            if isinstance(item, Delivery):
                item = item.job
            if isinstance(item, Job):
                self.records.append(item)
        return result

    @rule(request=_request(), job_id=_IDS)
    def enqueue(self, request: EnqueueRequest, job_id: str) -> None:
        self._call("enqueue", request, job_id=job_id, now=self.h.now)

    @rule(
        job_type=st.sampled_from(["a", "b"]),
        job_id=_IDS,
        priority=st.integers(1, 3),
        max_retries=st.integers(0, 2),
        delay=st.sampled_from([0, 30]),
        scheduled_at=st.sampled_from([None, 5.0]),
    )
    def enqueue_valid(
        self,
        job_type: str,
        job_id: str,
        priority: int,
        max_retries: int,
        delay: int,
        scheduled_at: float | None,
    ) -> None:
        """Mostly-valid requests, so that the other calls find jobs to misuse."""
        request = EnqueueRequest(
            job_type=job_type,
            priority=priority,
            max_retries=max_retries,
            delay=delay,
            scheduled_at=None if scheduled_at is None else self.h.now + scheduled_at,
        )
        self._call("enqueue", request, job_id=job_id, now=self.h.now)

    @rule(job_type=_TYPES, lease_seconds=_SECONDS)
    def claim(self, job_type: str, lease_seconds: float | None) -> None:
        self._call("claim", job_type, now=self.h.now, worker_id="w", lease_seconds=lease_seconds)

    @rule(
        sid=st.integers(-1, 3),
        types=st.lists(_TYPES, max_size=3),
        prefetch=st.integers(-1, 3),
        lease_seconds=_SECONDS,
    )
    def attach(
        self, sid: int, types: list[str], prefetch: int, lease_seconds: float | None
    ) -> None:
        self._call(
            "attach",
            sid,
            worker_id="w",
            job_types=types,
            prefetch=prefetch,
            lease_seconds=lease_seconds,
        )

    @rule(sid=st.integers(-1, 3))
    def detach(self, sid: int) -> None:
        self._call("detach", sid, now=self.h.now)

    @rule()
    def dispatch(self) -> None:
        self._call("dispatch", now=self.h.now)

    @rule(
        action=st.sampled_from(["complete", "fail", "extend"]),
        job_id=_IDS,
        lease_id=_LEASES,
        lease_seconds=_SECONDS,
    )
    def ack(
        self, action: str, job_id: str, lease_id: str | None, lease_seconds: float | None
    ) -> None:
        if action == "complete":
            self._call("complete", job_id, lease_id=lease_id, now=self.h.now)
        elif action == "fail":
            self._call("fail", job_id, lease_id=lease_id, error="e", now=self.h.now)
        else:
            self._call(
                "extend", job_id, lease_id=lease_id, now=self.h.now, lease_seconds=lease_seconds
            )

    @rule(action=st.sampled_from(["cancel", "requeue", "purge"]), job_id=_IDS)
    def operate(self, action: str, job_id: str) -> None:
        self._call(action, job_id, now=self.h.now)

    @rule(
        job_type=st.one_of(st.none(), _TYPES),
        after=st.sampled_from([-1, 0, 1, 2, 5, 10**9]),
        limit=st.integers(-1, 3),
    )
    def dead(self, job_type: str | None, after: int, limit: int) -> None:
        self._call("dead", job_type=job_type, after=after, limit=limit)

    @rule(job_type=_TYPES, on=st.booleans())
    def pause_or_resume(self, job_type: str, on: bool) -> None:
        self._call("pause" if on else "resume", job_type)

    @rule(dt=_NOW_OFFSETS)
    def tick(self, dt: float) -> None:
        self.h.clock.advance(dt)
        self._call("tick", now=self.h.now)
        deadline = self.h.core.next_deadline()
        assert deadline is None or deadline > self.h.now

    @precondition(lambda self: bool(self.records))
    @rule(data=st.data())
    def restore_a_seen_record(self, data: st.DataObject) -> None:
        """Replaying any record the core returned earlier (stale or not)."""
        record = data.draw(st.sampled_from(self.records), label="record")
        self._call("restore", record, now=self.h.now)

    @rule()
    def restart(self) -> None:
        old = self.h.restart()
        for job_id in ["job1", "job2", "job3", "job4", "", "nope", "\U0001f600"]:
            record = old.get(job_id)
            if record is not None:
                self._call("restore", record, now=self.h.now)

    @invariant()
    def readers_work_and_agree(self) -> None:
        core = self.h.core
        stats = core.statistics()
        assert stats.queued == sum(core.ready_count(t) for t in stats.types)
        assert stats.dead == len(core.dead_ids())
        page, _ = core.dead(limit=1000)
        assert [j.id for j in page] == core.dead_ids()


MisuseMachine.TestCase.settings = settings(
    max_examples=200,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestMisuseMachine = MisuseMachine.TestCase
