"""The core's support for a shared queue tier: placement, admit, evict, demand."""

from __future__ import annotations

import math

import attrs
import pytest

from stackduck_core import (
    EPOCH,
    MAX_SEQ,
    Base,
    Job,
    LifecyclePolicy,
    Placement,
    Purged,
    QueueCore,
    Recovery,
    Rejected,
    Requeued,
    StackduckError,
    Status,
    WorkerDetached,
    decode_score,
    placement,
    ready_seq,
    recover_claim,
    score,
)
from tests.core.harness import T0, Harness, counter_ids, expect_job


def fresh(h: Harness) -> QueueCore:
    """A second core, as on another instance (its own ids)."""
    return QueueCore(new_id=counter_ids("other-lease"))


def test_ready_seq_is_microseconds_since_epoch_clamped() -> None:
    assert ready_seq(EPOCH) == 0
    assert ready_seq(EPOCH + 1.5) == 1_500_000
    assert ready_seq(EPOCH - 10) == 0
    assert ready_seq(1e30) == MAX_SEQ
    with pytest.raises(StackduckError):
        ready_seq(math.inf)
    with pytest.raises(StackduckError):
        ready_seq(math.nan)


def test_placement_of_queued_scheduled_and_other_jobs() -> None:
    h = Harness()
    queued = h.enqueue(priority=1)
    assert placement(queued) == Placement(True, score(1, queued.seq), queued.scheduled_at)
    later = h.enqueue(priority=3, scheduled_in=60)
    assert later.status is Status.SCHEDULED
    place = placement(later)
    assert place is not None and not place.ready
    assert place.due == later.scheduled_at
    assert decode_score(place.score) == (3, ready_seq(later.scheduled_at))
    # a queued record without a seq (never stamped) takes its ready time's
    unstamped = attrs.evolve(queued, seq=0)
    assert placement(unstamped) == Placement(
        True, score(1, ready_seq(queued.scheduled_at)), queued.scheduled_at
    )
    running = h.claim()
    assert placement(running) is None


def test_admit_queued_job_then_dispatch_leases_it() -> None:
    h = Harness()
    job = h.enqueue()
    other = fresh(h)
    other.attach(1, worker_id="w", job_types=["t"], prefetch=2)
    assert other.demand("t") == 2
    held = other.admit(job, now=h.now)
    assert held == job
    assert other.demand("t") == 1  # one is ready here already
    deliveries = other.dispatch(now=h.now)
    assert [d.job.id for d in deliveries] == [job.id]
    assert deliveries[0].job.status is Status.RUNNING
    assert other.demand("t") == 1
    with pytest.raises(ValueError, match="held already"):
        other.admit(job, now=h.now)


def test_admit_promotes_a_due_scheduled_job() -> None:
    h = Harness()
    job = h.enqueue(scheduled_in=10)
    other = fresh(h)
    with pytest.raises(ValueError, match="not due"):
        other.admit(job, now=h.now)
    held = other.admit(job, now=job.scheduled_at)
    assert held.status is Status.QUEUED and held.version == job.version + 1
    assert held.seq >= ready_seq(job.scheduled_at)
    assert other.count(Status.QUEUED) == 1 and other.count(Status.SCHEDULED) == 0
    assert other.next_deadline() is None  # the scheduled entry left with it
    assert expect_job(other.claim("t", now=job.scheduled_at, worker_id="w")).id == job.id


def test_admit_refuses_other_statuses() -> None:
    h = Harness()
    h.enqueue()
    running = h.claim()
    with pytest.raises(ValueError, match="running, not queued"):
        fresh(h).admit(running, now=h.now)


def test_evict_forgets_queued_scheduled_and_dead_jobs_but_not_running_ones() -> None:
    h = Harness()
    queued = h.enqueue()
    scheduled = h.enqueue(scheduled_in=5)
    dead = h.dead_letter("d")
    running = h.claim()  # the queued one
    assert running.id == queued.id
    assert h.core.evict(running.id) is None
    assert h.core.evict("nope") is None
    assert h.core.evict(scheduled.id) == scheduled
    assert h.core.evict(dead.id) == dead
    assert h.core.get(scheduled.id) is None and h.core.get(dead.id) is None
    assert h.core.dead_ids() == []
    assert h.core.next_deadline() == running.lease_expires_at  # the schedule entry is stale
    requeued = h.core.release(running.id, lease_id=running.lease_id, now=h.now)
    assert expect_job(requeued).status is Status.QUEUED
    assert h.core.evict(running.id) is not None
    assert h.core.ready_count("t") == 0
    assert h.core.claim("t", now=h.now, worker_id="w") is None
    assert h.core.statistics().types == {}


def test_demand_is_free_credit_of_interested_streams_and_zero_when_paused() -> None:
    core = QueueCore(new_id=counter_ids("lease"))
    assert core.demand("t") == 0
    core.attach(1, worker_id="a", job_types=["t", "u"], prefetch=3)
    core.attach(2, worker_id="b", job_types=["t"], prefetch=2)
    assert core.demand("t") == 5 and core.demand("u") == 3
    core.pause("t")
    assert core.demand("t") == 0
    core.resume("t")
    assert core.demand("t") == 5
    core.detach(2, now=T0)
    assert core.demand("t") == 3


def test_ready_jobs_in_delivery_order_without_stale_entries() -> None:
    h = Harness()
    low = h.enqueue(priority=3)
    high = h.enqueue(priority=1)
    gone = h.enqueue(priority=2)
    h.core.cancel(gone.id, now=h.now)
    assert [j.id for j in h.core.ready_jobs("t")] == [high.id, low.id]
    assert h.core.ready_jobs("nope") == []


def test_recover_claim_decisions() -> None:
    h = Harness()
    policy = LifecyclePolicy(max_lost_leases=2)
    queued = h.enqueue()
    assert recover_claim(None, now=h.now) == Recovery(None, None)
    assert recover_claim(queued, now=h.now) == Recovery(None, queued)
    running = h.claim()
    first = recover_claim(running, now=h.now + 1)
    assert first.write is not None and first.write == first.requeue
    assert first.write.status is Status.QUEUED
    assert first.write.lost_leases == 1 and first.write.seq == running.seq
    assert first.write.lease_id is None and first.write.version == running.version + 1
    # the second lost lease is the poison-pill limit: dead-lettered, out of the tier
    again = attrs.evolve(
        first.write, status=Status.RUNNING, lease_id="l2", lease_expires_at=h.now + 30
    )
    second = recover_claim(again, now=h.now + 2, policy=policy)
    assert second.write is not None and second.write.status is Status.FAILED
    assert second.requeue is None
    dead = h.dead_letter("d")
    assert recover_claim(dead, now=h.now) == Recovery(None, None)


def test_decide_applies_without_holding_and_stamps_seq() -> None:
    h = Harness()
    dead = h.dead_letter()
    other = fresh(h)
    requeued = other.decide(dead, Requeued(now=h.now + 5))
    assert isinstance(requeued, Job) and requeued.status is Status.QUEUED
    assert requeued.seq == ready_seq(h.now + 5)
    assert other.get(dead.id) is None and other.count(Status.QUEUED) == 0
    assert other.decide(dead, Purged(now=h.now)) is None
    refused = other.decide(requeued, Purged(now=h.now))
    assert isinstance(refused, Rejected)
    # a lost lease keeps its place: no new seq
    h2 = Harness()
    h2.enqueue()
    running = h2.claim()
    lost = fresh(h2).decide(running, WorkerDetached(now=h2.now, lease_id=running.lease_id or ""))
    assert isinstance(lost, Job) and lost.seq == running.seq


def test_abandon_forgets_any_job_and_frees_the_streams_credit() -> None:
    h = Harness()
    queued = h.enqueue()
    h.core.attach(1, worker_id="w", job_types=["t"], prefetch=1)
    [delivery] = h.core.dispatch(now=h.now)
    assert h.core.demand("t") == 0  # the stream's only credit is used
    assert h.core.abandon(delivery.job.id) == delivery.job
    assert h.core.get(queued.id) is None and h.core.count(Status.RUNNING) == 0
    assert h.core.demand("t") == 1  # credit back
    assert h.core.abandon(queued.id) is None
    other = h.enqueue()
    assert h.core.abandon(other.id) == other
    assert h.core.statistics().types == {}
    refused = h.core.complete(queued.id, lease_id=delivery.job.lease_id, now=h.now)
    assert isinstance(refused, Rejected)


def test_transitions_carry_their_base() -> None:
    h = Harness()
    job = h.enqueue()
    assert job.base is None  # a new job: inserted
    running = h.claim()
    assert running.base == Base(Status.QUEUED, None)
    done = h.core.complete(running.id, lease_id=running.lease_id, now=h.now)
    assert isinstance(done, Job) and done.base == Base(Status.RUNNING, running.lease_id)
    assert attrs.evolve(done, base=None) == done  # not part of the value


def test_restore_writes_over_the_row_as_stored() -> None:
    h = Harness()
    h.enqueue()
    running = h.claim()
    bare = attrs.evolve(running, lease_id=None, lease_expires_at=None)  # a hand-written row
    for row, lease in ((running, running.lease_id), (bare, None)):
        restored = fresh(h).restore(row, now=h.now)
        assert restored.status is Status.QUEUED
        assert restored.base == Base(Status.RUNNING, lease)
