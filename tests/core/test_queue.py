"""Unit tests of :class:`QueueCore` through its public API (no I/O, no mocks)."""

from __future__ import annotations

import attrs
import pytest

from stackduck_core import (
    DEFAULT_LEASE_SECONDS,
    EnqueueRequest,
    Job,
    JobSpec,
    LifecyclePolicy,
    QueueCore,
    RejectReason,
    SequenceClock,
    Status,
    TypeStats,
)
from tests.core.harness import T0, Harness, expect_job, expect_rejected, ids

# -- ordering ------------------------------------------------------------------


def test_claim_order_is_priority_then_fifo() -> None:
    h = Harness()
    for name, priority in [("a", 3), ("b", 2), ("c", 1), ("d", 2), ("e", 1), ("f", 3)]:
        h.enqueue(priority=priority, job_id=name)
    assert h.claim_ids() == ["c", "e", "b", "d", "a", "f"]


def test_dispatch_order_is_priority_then_fifo() -> None:
    h = Harness()
    for name, priority in [("a", 3), ("b", 2), ("c", 1), ("d", 2), ("e", 1), ("f", 3)]:
        h.enqueue(priority=priority, job_id=name)
    h.core.attach(1, worker_id="w", job_types=["t"], prefetch=10)
    deliveries = h.core.dispatch(now=h.now)
    assert [d.job.id for d in deliveries] == ["c", "e", "b", "d", "a", "f"]
    assert {d.stream_id for d in deliveries} == {1}


def test_high_priority_job_enqueued_last_is_delivered_first() -> None:
    h = Harness()
    h.enqueue_many(50, priority=3)
    urgent = h.enqueue(priority=1)
    assert h.claim().id == urgent.id


def test_seq_is_strictly_increasing_and_defaults_apply() -> None:
    h = Harness()
    jobs = h.enqueue_many(5)
    seqs = [job.seq for job in jobs]
    assert seqs == sorted(set(seqs)) and seqs[0] > 0
    assert jobs[0].priority == 2 and jobs[0].max_retries == 2 and jobs[0].delay == 30
    assert jobs[0].status is Status.QUEUED and jobs[0].scheduled_at == T0


def test_claim_of_unknown_type_returns_none() -> None:
    h = Harness()
    h.enqueue("a")
    assert h.core.claim("b", now=h.now, worker_id="w") is None


def test_claim_records_worker_and_lease() -> None:
    h = Harness()
    h.enqueue()
    job = h.claim(worker_id="w7", lease_seconds=10)
    assert job.worker_id == "w7"
    assert job.lease_id == "lease1"
    assert job.lease_expires_at == T0 + 10
    assert job.attempt == 1 and job.started_at == T0
    assert h.core.get(job.id) == job


def test_claim_with_default_lease() -> None:
    h = Harness(default_lease=7.0)
    h.enqueue()
    assert h.claim().lease_expires_at == T0 + 7.0


# -- scheduled jobs and time --------------------------------------------------------


def test_delayed_job_is_not_claimable_before_due_and_promoted_at_due() -> None:
    h = Harness()
    job = h.enqueue(scheduled_in=30)
    assert job.status is Status.SCHEDULED and job.scheduled_at == T0 + 30 and job.seq == 0
    assert h.core.next_deadline() == T0 + 30
    assert h.core.claim("t", now=h.now, worker_id="w") is None
    assert h.advance(29.999) == []
    assert h.core.claim("t", now=h.now, worker_id="w") is None
    promoted = h.advance_to(T0 + 30)
    assert ids(promoted) == [job.id]
    assert promoted[0].status is Status.QUEUED and promoted[0].seq > 0
    assert h.core.next_deadline() is None
    assert h.claim().id == job.id


def test_scheduled_at_in_the_past_is_due_now() -> None:
    h = Harness()
    request = EnqueueRequest(job_type="t", scheduled_at=T0 - 100)
    job = expect_job(h.core.enqueue(request, job_id="j", now=h.now))
    assert job.status is Status.QUEUED and job.scheduled_at == T0


def test_promoted_job_goes_behind_jobs_already_queued() -> None:
    h = Harness()
    later = h.enqueue(scheduled_in=10)
    h.advance(5)
    first = h.enqueue()
    h.advance(5)
    assert h.claim_ids() == [first.id, later.id]


def test_promotions_in_due_order() -> None:
    h = Harness()
    b = h.enqueue(scheduled_in=20)
    a = h.enqueue(scheduled_in=10)
    promoted = h.advance(30)
    assert ids(promoted) == [a.id, b.id]
    assert h.claim_ids() == [a.id, b.id]


def test_next_deadline_values() -> None:
    h = Harness()
    assert h.core.next_deadline() is None
    late = h.enqueue(scheduled_in=100)
    assert h.core.next_deadline() == T0 + 100
    h.enqueue()
    running = h.claim(lease_seconds=30)
    assert h.core.next_deadline() == T0 + 30
    expect_job(h.core.complete(running.id, lease_id=running.lease_id, now=h.now))
    assert h.core.next_deadline() == T0 + 100
    expect_job(h.core.cancel(late.id, now=h.now))
    assert h.core.next_deadline() is None


def test_tick_leaves_next_deadline_in_the_future() -> None:
    h = Harness()
    h.enqueue(scheduled_in=10)
    h.enqueue(scheduled_in=10)
    h.enqueue(scheduled_in=25)
    h.enqueue()
    h.claim(lease_seconds=15)
    h.advance(12)
    assert h.core.next_deadline() == T0 + 15
    h.advance(3)
    assert h.core.next_deadline() == T0 + 25


# -- leases --------------------------------------------------------------------------


def test_expired_lease_requeues_the_job_in_its_fifo_place() -> None:
    h = Harness()
    a, b, _ = h.enqueue_many(3)
    running = h.claim()
    assert running.id == a.id
    assert h.advance(59.5) == []
    changed = h.advance(0.5)
    assert ids(changed) == [a.id]
    requeued = changed[0]
    assert requeued.status is Status.QUEUED
    assert requeued.seq == a.seq
    assert requeued.lost_leases == 1 and requeued.retry_count == 0
    assert requeued.lease_id is None and requeued.worker_id is None
    assert requeued.scheduled_at == h.now
    # the worker that lost the lease cannot complete the queued job
    expect_rejected(
        h.core.complete(a.id, lease_id=running.lease_id, now=h.now), RejectReason.WRONG_STATE
    )
    again = h.claim()
    assert again.id == a.id and again.attempt == 2 and again.lease_id != running.lease_id
    # ... nor the re-delivered one
    expect_rejected(
        h.core.complete(a.id, lease_id=running.lease_id, now=h.now), RejectReason.STALE_LEASE
    )
    assert h.claim().id == b.id


def test_poison_pill_after_max_lost_leases() -> None:
    h = Harness(policy=LifecyclePolicy(max_lost_leases=3))
    job = h.enqueue()
    for lost in (1, 2):
        h.claim(lease_seconds=10)
        (record,) = h.advance(10)
        assert record.status is Status.QUEUED and record.lost_leases == lost
    h.claim(lease_seconds=10)
    (dead,) = h.advance(10)
    assert dead.status is Status.FAILED and dead.lost_leases == 3
    assert dead.retry_count == 0
    assert "poison pill" in dead.error_message
    assert h.core.dead_ids() == [job.id]
    assert h.core.statistics().dead == 1
    assert h.core.claim("t", now=h.now, worker_id="w") is None


def test_poison_pill_by_detaches() -> None:
    h = Harness(policy=LifecyclePolicy(max_lost_leases=2))
    job = h.enqueue()
    h.core.attach(1, worker_id="w", job_types=["t"])
    assert [d.job.id for d in h.core.dispatch(now=h.now)] == [job.id]
    (requeued,) = h.core.detach(1, now=h.now)
    assert requeued.status is Status.QUEUED and requeued.lost_leases == 1
    h.core.attach(2, worker_id="w", job_types=["t"])
    assert [d.job.id for d in h.core.dispatch(now=h.now)] == [job.id]
    (dead,) = h.core.detach(2, now=h.now)
    assert dead.status is Status.FAILED and h.core.dead_ids() == [job.id]


def test_extend_lease_never_shortens_and_old_expiry_is_skipped() -> None:
    h = Harness()
    job = h.enqueue()
    running = h.claim(lease_seconds=60)
    h.advance(10)
    extended = expect_job(
        h.core.extend(job.id, lease_id=running.lease_id, now=h.now, lease_seconds=100)
    )
    assert extended.lease_expires_at == T0 + 110
    assert extended.lease_id == running.lease_id and extended.status is Status.RUNNING
    h.advance(10)
    shorter = expect_job(h.core.extend(job.id, lease_id=None, now=h.now, lease_seconds=5))
    assert shorter.lease_expires_at == T0 + 110
    assert h.advance_to(T0 + 60) == []  # the first expiry is stale now
    assert h.core.get(job.id) == shorter
    assert h.core.next_deadline() == T0 + 110
    (expired,) = h.advance_to(T0 + 110)
    assert expired.status is Status.QUEUED and expired.lost_leases == 1


def test_extend_uses_the_default_lease() -> None:
    h = Harness(default_lease=20.0)
    h.enqueue()
    running = h.claim()
    h.advance(15)
    extended = expect_job(h.core.extend(running.id, lease_id=running.lease_id, now=h.now))
    assert extended.lease_expires_at == T0 + 35


def test_extend_with_stale_lease_or_wrong_state_is_rejected() -> None:
    h = Harness()
    queued = h.enqueue()
    expect_rejected(h.core.extend(queued.id, lease_id=None, now=h.now), RejectReason.WRONG_STATE)
    running = h.claim()
    expect_rejected(h.core.extend(running.id, lease_id="nope", now=h.now), RejectReason.STALE_LEASE)
    assert h.core.get(running.id) == running


def test_extend_keeps_the_stream_holding_the_job() -> None:
    """A heartbeat must not free the stream's credit nor orphan the job on detach."""
    h = Harness()
    first, second = h.enqueue_many(2)
    h.core.attach(1, worker_id="w", job_types=["t"], prefetch=1)
    assert [d.job.id for d in h.core.dispatch(now=h.now)] == [first.id]
    expect_job(h.core.extend(first.id, lease_id=None, now=h.now))
    assert h.core.dispatch(now=h.now) == []  # prefetch 1: still holding one job
    info = h.core.dispatcher.stream(1)
    assert info is not None and info.in_flight == 1
    (requeued,) = h.core.detach(1, now=h.now)
    assert requeued.id == first.id and requeued.status is Status.QUEUED
    assert h.core.get(second.id) is not None
    assert h.core.statistics().running == 0


# -- complete and fail -----------------------------------------------------------------


def test_complete_with_current_lease() -> None:
    h = Harness()
    h.enqueue()
    running = h.claim()
    h.advance(3)
    done = expect_job(h.core.complete(running.id, lease_id=running.lease_id, now=h.now))
    assert done.status is Status.COMPLETED and done.completed_at == h.now
    assert done.lease_id is None
    assert h.core.get(running.id) is None
    stats = h.core.statistics()
    assert stats.running == 0 and stats.types == {}
    assert h.core.next_deadline() is None


def test_complete_with_omitted_lease_acts_on_current_lease() -> None:
    h = Harness()
    h.enqueue()
    running = h.claim()
    done = expect_job(h.core.complete(running.id, lease_id=None, now=h.now))
    assert done.status is Status.COMPLETED


def test_complete_with_stale_lease_changes_nothing() -> None:
    h = Harness()
    h.enqueue()
    running = h.claim()
    expect_rejected(
        h.core.complete(running.id, lease_id="lease999", now=h.now), RejectReason.STALE_LEASE
    )
    expect_rejected(
        h.core.fail(running.id, lease_id="lease999", error="x", now=h.now),
        RejectReason.STALE_LEASE,
    )
    assert h.core.get(running.id) == running


def test_complete_or_fail_of_a_queued_job_is_rejected() -> None:
    h = Harness()
    job = h.enqueue()
    expect_rejected(h.core.complete(job.id, lease_id=None, now=h.now), RejectReason.WRONG_STATE)
    expect_rejected(
        h.core.fail(job.id, lease_id=None, error="x", now=h.now), RejectReason.WRONG_STATE
    )
    assert h.core.get(job.id) == job


def test_fail_backoff_is_exact_then_dead_letters() -> None:
    h = Harness()
    job = h.enqueue(delay=30, max_retries=3)
    for retry_count, wait in enumerate([30, 60, 120]):
        running = h.claim()
        h.advance(1.5)
        failed = expect_job(
            h.core.fail(job.id, lease_id=running.lease_id, error=f"e{retry_count}", now=h.now)
        )
        assert failed.status is Status.SCHEDULED
        assert failed.scheduled_at == h.now + wait
        assert failed.retry_count == retry_count + 1
        assert failed.error_message == f"e{retry_count}"
        assert h.core.next_deadline() == h.now + wait
        assert h.advance(wait - 0.5) == []
        (promoted,) = h.advance(0.5)
        assert promoted.status is Status.QUEUED
    running = h.claim()
    dead = expect_job(h.core.fail(job.id, lease_id=None, error="last", now=h.now))
    assert dead.status is Status.FAILED and dead.retry_count == 3
    assert dead.error_message == "last" and dead.completed_at == h.now
    assert h.core.dead_ids() == [job.id]
    assert h.core.next_deadline() is None


def test_fail_backoff_is_capped() -> None:
    h = Harness()
    job = h.enqueue(delay=3000, max_retries=5)
    h.claim()
    first = expect_job(h.core.fail(job.id, lease_id=None, error="x", now=h.now))
    assert first.scheduled_at == h.now + 3000
    h.advance(3000)
    h.claim()
    second = expect_job(h.core.fail(job.id, lease_id=None, error="x", now=h.now))
    assert second.scheduled_at == h.now + 3600


def test_fail_backoff_uses_the_policy_cap() -> None:
    h = Harness(policy=LifecyclePolicy(backoff_cap=45))
    job = h.enqueue(delay=30, max_retries=5)
    h.claim()
    h.core.fail(job.id, lease_id=None, error="x", now=h.now)
    h.advance(30)
    h.claim()
    second = expect_job(h.core.fail(job.id, lease_id=None, error="x", now=h.now))
    assert second.scheduled_at == h.now + 45


def test_fail_with_zero_delay_requeues_at_the_back() -> None:
    h = Harness()
    job = h.enqueue(delay=0)
    other = h.enqueue(delay=0)
    running = h.claim()
    assert running.id == job.id
    retried = expect_job(h.core.fail(job.id, lease_id=running.lease_id, error="x", now=h.now))
    assert retried.status is Status.QUEUED and retried.retry_count == 1
    assert retried.seq > other.seq
    assert h.claim_ids() == [other.id, job.id]


def test_fail_with_no_retries_dead_letters_at_once() -> None:
    h = Harness()
    dead = h.dead_letter()
    assert dead.retry_count == 0 and dead.max_retries == 0
    assert h.core.statistics().types["t"] == TypeStats(dead=1)


# -- cancel --------------------------------------------------------------------------------


def test_cancel_scheduled_job() -> None:
    h = Harness()
    job = h.enqueue(scheduled_in=10)
    cancelled = expect_job(h.core.cancel(job.id, now=h.now))
    assert cancelled.status is Status.CANCELLED and cancelled.completed_at == h.now
    assert h.core.get(job.id) is None
    assert h.core.next_deadline() is None
    assert h.advance(20) == []
    assert h.core.claim("t", now=h.now, worker_id="w") is None


def test_tick_skips_a_cancelled_scheduled_job() -> None:
    h = Harness()
    gone = h.enqueue(scheduled_in=10)
    kept = h.enqueue(scheduled_in=20)
    expect_job(h.core.cancel(gone.id, now=h.now))
    # no next_deadline() in between: tick itself meets the stale entry
    assert ids(h.advance(30)) == [kept.id]
    assert h.core.get(gone.id) is None


def test_cancel_queued_job_then_claim_skips_it() -> None:
    h = Harness()
    a, b = h.enqueue_many(2)
    expect_job(h.core.cancel(a.id, now=h.now))
    assert h.claim_ids() == [b.id]


def test_claim_after_every_queued_job_was_cancelled() -> None:
    h = Harness()
    for job in h.enqueue_many(3):
        h.core.cancel(job.id, now=h.now)
    assert h.core.claim("t", now=h.now, worker_id="w") is None
    assert h.core.statistics().queued == 0


def test_cancel_running_unary_job_then_worker_ack_is_rejected() -> None:
    h = Harness()
    job = h.enqueue()
    running = h.claim()
    cancelled = expect_job(h.core.cancel(job.id, now=h.now))
    assert cancelled.status is Status.CANCELLED and cancelled.lease_id is None
    expect_rejected(
        h.core.complete(job.id, lease_id=running.lease_id, now=h.now), RejectReason.NOT_FOUND
    )
    expect_rejected(
        h.core.fail(job.id, lease_id=running.lease_id, error="x", now=h.now),
        RejectReason.NOT_FOUND,
    )
    assert h.advance(3600) == []  # the lease entry is stale


def test_cancel_running_stream_job_frees_the_stream() -> None:
    h = Harness()
    a, b = h.enqueue_many(2)
    h.core.attach(1, worker_id="w", job_types=["t"], prefetch=1)
    (delivery,) = h.core.dispatch(now=h.now)
    assert delivery.job.id == a.id
    expect_job(h.core.cancel(a.id, now=h.now))
    expect_rejected(
        h.core.complete(a.id, lease_id=delivery.job.lease_id, now=h.now), RejectReason.NOT_FOUND
    )
    assert [d.job.id for d in h.core.dispatch(now=h.now)] == [b.id]
    assert h.core.detach(1, now=h.now)[0].id == b.id


def test_cancel_of_dead_or_unknown_job_is_rejected() -> None:
    h = Harness()
    dead = h.dead_letter()
    expect_rejected(h.core.cancel(dead.id, now=h.now), RejectReason.WRONG_STATE)
    assert h.core.get(dead.id) == dead
    expect_rejected(h.core.cancel("nope", now=h.now), RejectReason.NOT_FOUND)


# -- dead letters ------------------------------------------------------------------------------


def test_requeue_dead_job_resets_attempts_and_goes_to_the_back() -> None:
    h = Harness(policy=LifecyclePolicy(max_lost_leases=1))
    job = h.enqueue(max_retries=0)
    h.claim(lease_seconds=5)
    (dead,) = h.advance(5)
    assert dead.status is Status.FAILED and dead.lost_leases == 1
    other = h.enqueue()
    requeued = expect_job(h.core.requeue(job.id, now=h.now))
    assert requeued.status is Status.QUEUED
    assert (requeued.retry_count, requeued.attempt, requeued.lost_leases) == (0, 0, 0)
    assert requeued.completed_at is None and requeued.scheduled_at == h.now
    assert requeued.seq > other.seq
    assert h.core.dead_ids() == [] and h.core.dead() == ([], 0)
    assert h.claim_ids() == [other.id, job.id]


def test_requeue_or_purge_of_live_or_unknown_job_is_rejected() -> None:
    h = Harness()
    job = h.enqueue()
    expect_rejected(h.core.requeue(job.id, now=h.now), RejectReason.WRONG_STATE)
    expect_rejected(h.core.purge(job.id, now=h.now), RejectReason.WRONG_STATE)
    assert h.core.get(job.id) == job
    expect_rejected(h.core.requeue("nope", now=h.now), RejectReason.NOT_FOUND)
    expect_rejected(h.core.purge("nope", now=h.now), RejectReason.NOT_FOUND)


def test_purge_dead_job() -> None:
    h = Harness()
    dead = h.dead_letter()
    assert expect_job(h.core.purge(dead.id, now=h.now)) == dead
    assert h.core.get(dead.id) is None
    assert h.core.dead_ids() == [] and h.core.statistics().types == {}
    expect_rejected(h.core.purge(dead.id, now=h.now), RejectReason.NOT_FOUND)


def _all_dead(h: Harness, *, job_type: str | None = None, limit: int) -> list[str]:
    seen: list[str] = []
    cursor = 0
    for _ in range(len(h.core.dead_ids()) + 1):  # bounded: a cursor bug must not hang
        page, cursor = h.core.dead(job_type=job_type, after=cursor, limit=limit)
        assert len(page) <= limit
        assert cursor == 0 or len(page) == limit
        seen += ids(page)
        if not cursor:
            return seen
    raise AssertionError(f"pagination does not end; pages so far: {seen}")


def test_dead_pagination_with_cursors_and_type_filter() -> None:
    h = Harness()
    names = [f"d{i}" for i in range(7)]
    for i, name in enumerate(names):
        h.dead_letter("a" if i % 2 == 0 else "b", job_id=name)
    page, cursor = h.core.dead(limit=3)
    assert ids(page) == ["d0", "d1", "d2"] and cursor
    page, cursor = h.core.dead(after=cursor, limit=3)
    assert ids(page) == ["d3", "d4", "d5"] and cursor
    page, cursor = h.core.dead(after=cursor, limit=3)
    assert ids(page) == ["d6"] and cursor == 0
    # a page that ends exactly at the last job has no next cursor
    assert h.core.dead(limit=7) == (h.core.dead(limit=100)[0], 0)
    page, cursor = h.core.dead(job_type="a", limit=2)
    assert ids(page) == ["d0", "d2"] and cursor
    page, cursor = h.core.dead(job_type="a", after=cursor, limit=2)
    assert ids(page) == ["d4", "d6"] and cursor == 0
    assert h.core.dead(job_type="zzz") == ([], 0)
    assert _all_dead(h, job_type="b", limit=1) == ["d1", "d3", "d5"]
    assert h.core.dead_ids("b") == ["d1", "d3", "d5"]
    assert h.core.dead_ids() == names


def test_dead_pagination_after_requeue_and_purge() -> None:
    h = Harness()
    for i in range(6):
        h.dead_letter(job_id=f"d{i}")
    page, cursor = h.core.dead(limit=2)
    assert ids(page) == ["d0", "d1"]
    # the cursor job itself leaves, and another one in the next page
    expect_job(h.core.purge("d1", now=h.now))
    expect_job(h.core.requeue("d2", now=h.now))
    page, cursor = h.core.dead(after=cursor, limit=2)
    assert ids(page) == ["d3", "d4"] and cursor
    # the requeued job dies again: it moves to the end
    running = h.claim()
    assert running.id == "d2"
    expect_job(h.core.fail("d2", lease_id=None, error="again", now=h.now))
    page, cursor = h.core.dead(after=cursor, limit=2)
    assert ids(page) == ["d5", "d2"] and cursor == 0
    assert _all_dead(h, limit=2) == ["d0", "d3", "d4", "d5", "d2"]


def test_dead_order_survives_compaction() -> None:
    h = Harness()
    for i in range(100):
        h.dead_letter("a" if i % 3 else "b", job_id=f"x{i:03}")
    for i in range(100):
        if i % 20:
            if i % 2:
                expect_job(h.core.purge(f"x{i:03}", now=h.now))
            else:
                expect_job(h.core.requeue(f"x{i:03}", now=h.now))
    h.claim_ids("a")
    h.claim_ids("b")
    # 100 entries for 5 live dead letters: the next deaths compact the order list
    for i in range(5):
        h.dead_letter("b", job_id=f"y{i}")
    expected = ["x000", "x020", "x040", "x060", "x080"] + [f"y{i}" for i in range(5)]
    assert _all_dead(h, limit=3) == expected
    assert h.core.dead_ids() == expected
    assert _all_dead(h, job_type="a", limit=2) == ["x020", "x040", "x080"]
    assert h.core.statistics().dead == len(expected)
    # cursors handed out before the compaction keep working
    page, cursor = h.core.dead(limit=2)
    for i in range(100, 200):
        h.dead_letter("c", job_id=f"x{i:03}")
        expect_job(h.core.purge(f"x{i:03}", now=h.now))
    assert _all_dead(h, limit=100) == expected
    page, cursor = h.core.dead(after=cursor, limit=3)
    assert ids(page) == expected[2:5]


def test_dead_pagination_with_ids_outside_the_bmp() -> None:
    h = Harness()
    for name in ["a", "\U0001f600", "b"]:
        h.dead_letter(job_id=name)
    assert _all_dead(h, limit=1) == ["a", "\U0001f600", "b"]
    assert _all_dead(h, limit=2) == ["a", "\U0001f600", "b"]


@pytest.mark.parametrize("limit", [0, -1])
def test_dead_limit_below_one_is_refused(limit: int) -> None:
    h = Harness()
    h.dead_letter()
    with pytest.raises(ValueError, match="limit"):
        h.core.dead(limit=limit)


# -- pause and resume ---------------------------------------------------------------------------


def test_paused_type_is_neither_claimed_nor_dispatched() -> None:
    h = Harness()
    job = h.enqueue("a")
    other = h.enqueue("b")
    later = h.enqueue("a", scheduled_in=5)
    h.core.attach(1, worker_id="w", job_types=["a"], prefetch=5)
    h.core.pause("a")
    h.core.pause("a")  # idempotent
    assert h.core.paused == frozenset({"a"})
    assert h.core.claim("a", now=h.now, worker_id="w") is None
    assert h.core.dispatch(now=h.now) == []
    assert ids(h.advance(5)) == [later.id]  # time still promotes paused jobs
    stats = h.core.statistics()
    assert stats.types["a"] == TypeStats(queued=(0, 2, 0), paused=True)
    assert h.core.get(job.id) == job
    assert h.claim("b").id == other.id
    h.core.resume("a")
    h.core.resume("a")
    assert h.core.paused == frozenset()
    assert [d.job.id for d in h.core.dispatch(now=h.now)] == [job.id, later.id]


def test_paused_type_without_jobs_shows_in_statistics() -> None:
    h = Harness()
    h.core.pause("idle")
    assert h.core.statistics().types == {"idle": TypeStats(paused=True)}
    h.core.resume("idle")
    assert h.core.statistics().types == {}


# -- restore -------------------------------------------------------------------------------------


def _records() -> dict[str, Job]:
    """One record of every status, made by a real core."""
    h = Harness()
    records: dict[str, Job] = {}
    records["scheduled"] = h.enqueue("s", scheduled_in=50)
    records["queued"] = h.enqueue("q", priority=1)
    h.enqueue("r")
    records["running"] = h.claim("r")
    h.enqueue("c")
    records["completed"] = expect_job(h.core.complete(h.claim("c").id, lease_id=None, now=h.now))
    records["cancelled"] = expect_job(h.core.cancel(h.enqueue("x").id, now=h.now))
    records["failed"] = h.dead_letter("f")
    return records


def test_restore_every_status() -> None:
    records = _records()
    h = Harness(start=T0 + 10)
    restored = {name: h.core.restore(job, now=h.now) for name, job in records.items()}
    for name in ("scheduled", "queued", "failed", "completed", "cancelled"):
        assert restored[name] == records[name]
    running = records["running"]
    back = restored["running"]
    assert back.status is Status.QUEUED and back.lost_leases == 1
    assert back.seq == running.seq and back.lease_id is None
    assert back.scheduled_at == h.now and back.updated_at == h.now
    assert h.core.get(records["completed"].id) is None
    assert h.core.get(records["cancelled"].id) is None
    assert h.core.get(back.id) == back
    assert h.core.dead_ids() == [records["failed"].id]
    stats = h.core.statistics()
    assert (stats.queued, stats.scheduled, stats.running, stats.dead) == (2, 1, 0, 1)
    assert h.core.next_deadline() == records["scheduled"].scheduled_at
    assert h.claim("r").id == back.id
    assert h.claim("q").id == records["queued"].id


def test_restore_keeps_fifo_order_and_the_sequence() -> None:
    h = Harness()
    old = h.enqueue()
    newer = h.enqueue()
    fresh = Harness(start=T0 - 1000)
    fresh.core.restore(newer, now=fresh.now)
    fresh.core.restore(old, now=fresh.now)
    assert fresh.core.seq_clock.last == newer.seq
    job = fresh.enqueue(job_id="fresh")  # the clock is behind, the sequence is not
    assert job.seq > newer.seq
    assert fresh.claim_ids() == [old.id, newer.id, job.id]


def test_restore_stamps_queued_job_without_seq() -> None:
    h = Harness()
    legacy = attrs.evolve(h.enqueue(), seq=0, id="legacy")
    with_seq = h.enqueue()
    fresh = Harness()
    fresh.core.restore(with_seq, now=fresh.now)
    stamped = fresh.core.restore(legacy, now=fresh.now)
    assert stamped.seq > with_seq.seq
    assert fresh.core.get("legacy") == stamped
    assert fresh.claim_ids() == [with_seq.id, "legacy"]


def test_restore_running_job_without_seq_is_stamped() -> None:
    h = Harness()
    h.enqueue()
    running = attrs.evolve(h.claim(), seq=0)
    fresh = Harness()
    back = fresh.core.restore(running, now=fresh.now)
    assert back.status is Status.QUEUED and back.seq > 0 and back.lost_leases == 1


def test_restore_running_job_may_be_poisoned() -> None:
    h = Harness()
    h.enqueue()
    running = attrs.evolve(h.claim(), lost_leases=4)
    fresh = Harness(policy=LifecyclePolicy(max_lost_leases=5))
    dead = fresh.core.restore(running, now=fresh.now)
    assert dead.status is Status.FAILED and dead.lost_leases == 5
    assert fresh.core.dead_ids() == [running.id]


def test_restore_duplicate_id_is_ignored() -> None:
    records = _records()
    h = Harness()
    first = h.core.restore(records["queued"], now=h.now)
    dup = attrs.evolve(records["failed"], id=first.id)
    assert h.core.restore(dup, now=h.now) == dup
    assert h.core.get(first.id) == first
    assert h.core.dead_ids() == []
    assert h.core.statistics().queued == 1


# -- producers: add, validation, unknown ids ------------------------------------------------------------


def test_add_with_an_existing_id_is_rejected() -> None:
    h = Harness()
    job = h.enqueue(job_id="same")
    spec = JobSpec(
        job_type="other", payload="{}", priority=1, delay=0, max_retries=0, scheduled_at=h.now
    )
    rejected = expect_rejected(h.core.add(spec, job_id="same", now=h.now), RejectReason.WRONG_STATE)
    assert rejected.field == "job_id"
    assert h.core.get("same") == job
    assert h.core.statistics().queued == 1
    added = expect_job(h.core.add(spec, job_id="new", now=h.now))
    assert added.job_type == "other" and added.priority == 1


def test_invalid_enqueue_is_rejected_without_change() -> None:
    h = Harness()
    bad = h.core.enqueue(EnqueueRequest(job_type="t", priority=0), job_id="j", now=h.now)
    assert expect_rejected(bad, RejectReason.INVALID_ARGUMENT).field == "priority"
    assert h.core.get("j") is None and h.core.statistics().types == {}


def test_unknown_ids_are_not_found() -> None:
    h = Harness()
    core, now = h.core, h.now
    for result in (
        core.cancel("x", now=now),
        core.complete("x", lease_id=None, now=now),
        core.complete("x", lease_id="l", now=now),
        core.fail("x", lease_id=None, error="e", now=now),
        core.extend("x", lease_id=None, now=now),
        core.requeue("x", now=now),
        core.purge("x", now=now),
    ):
        assert expect_rejected(result, RejectReason.NOT_FOUND).field == "job_id"
    assert core.get("x") is None


# -- statistics -------------------------------------------------------------------------------------


def test_statistics_counts_per_type_priority_and_status() -> None:
    h = Harness()
    h.enqueue("a", priority=3)
    h.enqueue("a", priority=1)
    h.enqueue("a", priority=1)
    h.enqueue("a", priority=1)
    h.enqueue("a", priority=2, scheduled_in=10)
    h.claim("a")  # one priority-1 job runs
    h.dead_letter("d")
    h.enqueue("c", priority=3)
    h.core.pause("b")
    h.core.attach(1, worker_id="w", job_types=["x"])
    h.core.attach(2, worker_id="w", job_types=["y"])
    stats = h.core.statistics()
    assert stats.types == {
        "a": TypeStats(queued=(2, 0, 1), scheduled=1, running=1),
        "b": TypeStats(paused=True),
        "c": TypeStats(queued=(0, 0, 1)),
        "d": TypeStats(dead=1),
    }
    assert list(stats.types) == ["a", "b", "c", "d"]
    assert (stats.queued, stats.scheduled, stats.running, stats.dead, stats.streams) == (
        4,
        1,
        1,
        1,
        2,
    )
    assert h.core.ready_count("a") == 3 and h.core.ready_count("zzz") == 0


# -- streams -----------------------------------------------------------------------------------------


def test_attach_and_dispatch_use_stream_settings() -> None:
    h = Harness(default_lease=60.0)
    h.enqueue_many(2)
    h.core.attach(1, worker_id="w1", job_types=["t"], prefetch=1, lease_seconds=5)
    h.core.attach(2, worker_id="w2", job_types=["t"], prefetch=1)
    deliveries = h.core.dispatch(now=h.now)
    assert [(d.stream_id, d.job.worker_id, d.job.lease_expires_at) for d in deliveries] == [
        (1, "w1", T0 + 5),
        (2, "w2", T0 + DEFAULT_LEASE_SECONDS),
    ]
    info = h.core.dispatcher.stream(1)
    assert info is not None and info.lease_seconds == 5 and info.in_flight == 1


def test_attach_validation() -> None:
    h = Harness()
    h.core.attach(1, worker_id="w", job_types=["t"])
    with pytest.raises(ValueError, match="already attached"):
        h.core.attach(1, worker_id="w", job_types=["t"])
    with pytest.raises(ValueError, match="prefetch"):
        h.core.attach(2, worker_id="w", job_types=["t"], prefetch=0)
    assert h.core.statistics().streams == 1


def test_dispatch_respects_prefetch_and_ack_frees_credit() -> None:
    h = Harness()
    jobs = h.enqueue_many(5)
    h.core.attach(1, worker_id="w", job_types=["t"], prefetch=2)
    first = h.core.dispatch(now=h.now)
    assert [d.job.id for d in first] == ids(jobs[:2])
    assert h.core.dispatch(now=h.now) == []
    expect_job(h.core.complete(jobs[0].id, lease_id=first[0].job.lease_id, now=h.now))
    assert [d.job.id for d in h.core.dispatch(now=h.now)] == [jobs[2].id]
    expect_job(h.core.fail(jobs[1].id, lease_id=None, error="x", now=h.now))
    assert [d.job.id for d in h.core.dispatch(now=h.now)] == [jobs[3].id]


def test_lease_expiry_frees_stream_credit() -> None:
    h = Harness()
    a, b = h.enqueue_many(2)
    h.core.attach(1, worker_id="w", job_types=["t"], prefetch=1, lease_seconds=10)
    assert [d.job.id for d in h.core.dispatch(now=h.now)] == [a.id]
    h.advance(10)
    # a keeps its place and the stream has credit again
    assert [d.job.id for d in h.core.dispatch(now=h.now)] == [a.id]
    info = h.core.dispatcher.stream(1)
    assert info is not None and info.in_flight == 1
    assert h.core.get(b.id) == b


def test_detach_requeues_only_that_streams_jobs() -> None:
    h = Harness()
    jobs = h.enqueue_many(5)
    h.core.attach(1, worker_id="w1", job_types=["t"], prefetch=2)
    h.core.attach(2, worker_id="w2", job_types=["t"], prefetch=2)
    deliveries = h.core.dispatch(now=h.now)
    mine = sorted(d.job.id for d in deliveries if d.stream_id == 1)
    theirs = [d.job for d in deliveries if d.stream_id == 2]
    assert len(mine) == 2 and len(theirs) == 2
    unary = h.claim()
    h.advance(1)
    changed = h.core.detach(1, now=h.now)
    assert sorted(ids(changed)) == mine
    assert all(j.status is Status.QUEUED and j.lost_leases == 1 for j in changed)
    for job in theirs + [unary]:
        assert h.core.get(job.id) == job
    assert h.core.detach(1, now=h.now) == []
    assert h.core.detach(99, now=h.now) == []
    assert h.core.statistics().streams == 1
    assert jobs[4].id == unary.id
    assert sorted(h.claim_ids()) == mine


def test_dispatch_skips_types_without_streams_or_jobs() -> None:
    h = Harness()
    h.enqueue("a")
    h.core.attach(1, worker_id="w", job_types=["b"])
    assert h.core.dispatch(now=h.now) == []
    h.enqueue("b")
    assert [d.job.job_type for d in h.core.dispatch(now=h.now)] == ["b"]


def test_core_accepts_an_injected_sequence_clock() -> None:
    clock = SequenceClock(last=10**15)
    core = QueueCore(new_id=lambda: "l", seq_clock=clock)
    job = expect_job(core.enqueue(EnqueueRequest(job_type="t"), job_id="j", now=T0))
    assert job.seq == 10**15 + 1 and clock.last == job.seq


# -- idempotency keys ----------------------------------------------------------------


def _keyed(h: Harness, key: str, job_id: str, **fields: object) -> Job:
    request = EnqueueRequest(job_type="t", idempotency_key=key, **fields)  # type: ignore[arg-type]
    return expect_job(h.core.enqueue(request, job_id=job_id, now=h.now))


def test_find_key_follows_the_job_while_it_is_in_memory() -> None:
    h = Harness()
    job = _keyed(h, "k1", "a")
    h.enqueue(job_id="plain")
    assert job.idempotency_key == "k1"
    assert h.core.find_key("k1") == "a"
    assert h.core.find_key("k2") is None
    claimed = expect_job(h.core.claim("t", now=h.now, worker_id="w"))
    assert claimed.id == "a" and h.core.find_key("k1") == "a"  # kept across changes
    expect_job(h.core.complete("a", lease_id=claimed.lease_id, now=h.now))
    assert h.core.find_key("k1") is None  # left memory: the record store knows it


def test_find_key_of_cancelled_dead_and_purged_jobs() -> None:
    h = Harness()
    _keyed(h, "c", "cancelled")
    expect_job(h.core.cancel("cancelled", now=h.now))
    assert h.core.find_key("c") is None
    _keyed(h, "d", "dead", max_retries=0)
    leased = expect_job(h.core.claim("t", now=h.now, worker_id="w"))
    dead = expect_job(h.core.fail("dead", lease_id=leased.lease_id, error="x", now=h.now))
    assert dead.status is Status.FAILED and h.core.find_key("d") == "dead"  # any status
    expect_job(h.core.purge("dead", now=h.now))
    assert h.core.find_key("d") is None


def test_find_key_of_new_record_and_restored_jobs() -> None:
    h = Harness()
    spec = JobSpec(
        job_type="t",
        payload="{}",
        priority=2,
        delay=30,
        max_retries=2,
        scheduled_at=h.now,
        idempotency_key="n",
    )
    record = h.core.new_record(spec, job_id="new", now=h.now)
    assert record.idempotency_key == "n"
    assert h.core.find_key("n") is None  # not in memory until restored (after its write)
    h.core.restore(record, now=h.now)
    assert h.core.find_key("n") == "new"
    running = attrs.evolve(
        record,
        id="run",
        idempotency_key="r",
        status=Status.RUNNING,
        lease_id="l",
        lease_expires_at=h.now + 60,
    )
    h.core.restore(running, now=h.now)  # requeued: still indexed
    assert h.core.find_key("r") == "run"
    done = attrs.evolve(record, id="done", idempotency_key="x", status=Status.COMPLETED)
    h.core.restore(done, now=h.now)
    assert h.core.find_key("x") is None


def test_find_key_when_two_jobs_in_memory_share_a_key() -> None:
    # The broker never lets this happen; the index stays consistent anyway.
    h = Harness()
    _keyed(h, "k", "first")
    _keyed(h, "k", "second")
    assert h.core.find_key("k") == "second"
    expect_job(h.core.cancel("first", now=h.now))
    assert h.core.find_key("k") == "second"  # removing the other holder keeps it
    expect_job(h.core.cancel("second", now=h.now))
    assert h.core.find_key("k") is None
