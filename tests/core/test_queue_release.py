"""QueueCore: giving jobs back, bounded records and pages, stream-aware
lease extension, and memory that stays bounded under churn."""

from __future__ import annotations

import attrs
import pytest

from stackduck_core import Job, Limits, Rejected, RejectReason, Status, clip_error
from tests.core.harness import Harness, expect_job, expect_rejected


def test_release_gives_the_job_back_unstarted() -> None:
    h = Harness()
    first, second = h.enqueue(), h.enqueue()
    running = h.claim()
    assert running.id == first.id and running.attempt == 1
    back = expect_job(h.core.release(first.id, lease_id=running.lease_id, now=h.now))
    assert back.status is Status.QUEUED
    assert (back.attempt, back.lost_leases, back.seq) == (0, 0, running.seq)
    # it kept its place: delivered before the job behind it
    assert h.claim().id == first.id
    assert h.claim().id == second.id


def test_release_with_a_stale_lease_or_unknown_job_is_rejected() -> None:
    h = Harness()
    h.enqueue()
    running = h.claim()
    expect_rejected(
        h.core.release(running.id, lease_id="nope", now=h.now), RejectReason.STALE_LEASE
    )
    expect_rejected(h.core.release("ghost", lease_id=None, now=h.now), RejectReason.NOT_FOUND)
    # omitted lease (original clients): the current one
    assert expect_job(h.core.release(running.id, lease_id=None, now=h.now)).status is Status.QUEUED


def test_detach_releases_unsent_jobs_and_penalises_sent_ones() -> None:
    h = Harness()
    a, b = h.enqueue(), h.enqueue()
    h.core.attach(1, worker_id="w", job_types=["t"], prefetch=2)
    delivered = h.core.dispatch(now=h.now)
    assert [d.job.id for d in delivered] == [a.id, b.id]
    changed = {j.id: j for j in h.core.detach(1, now=h.now, unsent={b.id})}
    assert changed[a.id].lost_leases == 1  # it reached the worker: counted
    assert changed[b.id].lost_leases == 0 and changed[b.id].attempt == 0  # never left
    assert h.core.dispatcher.statistics().in_flight == 0


def test_error_text_is_clipped_with_a_note() -> None:
    h = Harness()
    job = h.enqueue(max_retries=0)
    running = h.claim()
    huge = "x" * 100_000
    dead = expect_job(h.core.fail(job.id, lease_id=running.lease_id, error=huge, now=h.now))
    limit = Limits().max_error_bytes
    assert len(dead.error_message.encode()) <= limit
    assert dead.error_message.endswith(f" [... {100_000 - limit} more bytes]")
    assert dead.error_message.startswith("xxx")


@pytest.mark.parametrize(
    ("text", "limit", "expected"),
    [
        ("short", 10, "short"),
        ("exactly10!", 10, "exactly10!"),
        ("x" * 40, 30, "xxxxxxxxxx [... 10 more bytes]"),
        # never splits a multi-byte character
        ("é" * 30, 30, "ééééé [... 30 more bytes]"),
        ("abc", 0, "abc"[:0] + " [... 3 more bytes]"),
    ],
)
def test_clip_error_golden(text: str, limit: int, expected: str) -> None:
    assert clip_error(text, Limits(max_error_bytes=limit)) == expected


def test_dead_pages_are_bounded_by_bytes_but_never_empty() -> None:
    h = Harness()
    payload = '"' + "p" * 998 + '"'  # 1,000 bytes of JSON
    for n in range(5):
        h.enqueue(f"big{n}", max_retries=0, payload=payload)
        running = h.claim(f"big{n}")
        h.core.fail(running.id, lease_id=running.lease_id, error="e" * 100, now=h.now)
    page, cursor = h.core.dead(limit=100, max_bytes=2_500)
    assert len(page) == 2 and cursor  # 2 x 1,100 bytes fit, a third would not
    pages = [page]
    while cursor:
        page, cursor = h.core.dead(limit=100, after=cursor, max_bytes=2_500)
        pages.append(page)
    assert [len(p) for p in pages] == [2, 2, 1]
    # a job larger than the budget still comes, alone
    page, cursor = h.core.dead(limit=100, max_bytes=10)
    assert len(page) == 1 and cursor


def test_extension_without_length_uses_the_stream_lease() -> None:
    h = Harness(default_lease=60.0)
    h.enqueue()
    h.enqueue()
    h.core.attach(1, worker_id="w", job_types=["t"], prefetch=1, lease_seconds=7.0)
    (delivery,) = h.core.dispatch(now=h.now)
    extended = expect_job(h.core.extend(delivery.job.id, lease_id=None, now=h.now + 5))
    assert extended.lease_expires_at == h.now + 5 + 7.0
    unary = h.claim()  # no stream: the default
    extended = expect_job(h.core.extend(unary.id, lease_id=unary.lease_id, now=h.now + 1))
    assert extended.lease_expires_at == h.now + 1 + 60.0


@pytest.mark.parametrize("bad", [0.0, -1.0])
def test_non_positive_lease_lengths_are_refused(bad: float) -> None:
    h = Harness()
    h.enqueue()
    with pytest.raises(ValueError, match="lease_seconds must be positive"):
        h.core.claim("t", now=h.now, worker_id="w", lease_seconds=bad)
    with pytest.raises(ValueError, match="lease_seconds must be positive"):
        h.core.attach(1, worker_id="w", job_types=["t"], lease_seconds=bad)
    running = h.claim()
    with pytest.raises(ValueError, match="lease_seconds must be positive"):
        h.core.extend(running.id, lease_id=None, now=h.now, lease_seconds=bad)


def test_restore_of_a_running_row_without_lease_data_requeues_it() -> None:
    h = Harness()
    h.enqueue()
    running = h.claim()
    legacy = attrs.evolve(running, lease_id=None, lease_expires_at=None)
    h.restart()
    restored = h.core.restore(legacy, now=h.now)
    assert restored.status is Status.QUEUED and restored.lost_leases == 1
    assert h.claim().id == running.id


def _heap_sizes(h: Harness) -> tuple[int, int, int]:
    # White-box on purpose: the promise under test is bounded memory.
    core = h.core
    return (
        sum(len(heap) for heap in core._ready.values()),
        len(core._scheduled),
        len(core._leases),
    )


def test_cancel_churn_keeps_the_ready_and_scheduled_heaps_bounded() -> None:
    h = Harness()
    for _ in range(2_000):
        job = h.enqueue("nobody")
        expect_job(h.core.cancel(job.id, now=h.now))
        later = h.enqueue("nobody", scheduled_in=3600)
        expect_job(h.core.cancel(later.id, now=h.now))
    ready, scheduled, _ = _heap_sizes(h)
    assert ready <= 2 * 0 + 65 and scheduled <= 65
    assert h.core.statistics().queued == 0


def test_heartbeats_keep_the_lease_heap_bounded() -> None:
    h = Harness()
    h.enqueue()
    running = h.claim()
    for n in range(2_000):
        expect_job(h.core.extend(running.id, lease_id=None, now=h.now + n / 1000))
    assert _heap_sizes(h)[2] <= 2 * 1 + 65
    assert h.core.next_deadline() == pytest.approx(h.now + 1.999 + 60.0)
    assert isinstance(h.core.get(running.id), Job)


def test_a_release_shrinks_the_streams_prefetch_to_what_it_holds() -> None:
    h = Harness()
    jobs = [h.enqueue() for _ in range(4)]
    h.core.attach(1, worker_id="w", job_types=["t"], prefetch=2)
    first = h.core.dispatch(now=h.now)
    assert [d.job.id for d in first] == [jobs[0].id, jobs[1].id]
    # the worker is stopping: it gives job 1 back...
    expect_job(h.core.release(jobs[1].id, lease_id=first[1].job.lease_id, now=h.now))
    # ...and is not sent anything in its place
    assert h.core.dispatch(now=h.now) == []
    info = h.core.dispatcher.stream(1)
    assert info is not None and (info.prefetch, info.in_flight) == (1, 1)
    # even with more credit than held jobs, a release stops the stream's deliveries
    h.core.attach(2, worker_id="w2", job_types=["t"], prefetch=10)
    (to_two,) = [d for d in h.core.dispatch(now=h.now) if d.stream_id == 2][:1]
    expect_job(h.core.release(to_two.job.id, lease_id=to_two.job.lease_id, now=h.now))
    two = h.core.dispatcher.stream(2)
    assert two is not None and two.prefetch == two.in_flight
    h.core.detach(2, now=h.now)
    # finishing job 0 does not give the stopping stream credit back: it would
    # only be sent a job to give back again
    expect_job(h.core.complete(jobs[0].id, lease_id=first[0].job.lease_id, now=h.now))
    assert h.core.dispatch(now=h.now) == []
    info = h.core.dispatcher.stream(1)
    assert info is not None and (info.prefetch, info.in_flight) == (0, 0)
    # another worker gets the released job, which kept its place
    h.core.attach(3, worker_id="w3", job_types=["t"], prefetch=1)
    (again,) = h.core.dispatch(now=h.now)
    assert again.job.id == jobs[1].id


def test_detach_without_penalty_when_the_server_leaves() -> None:
    h = Harness()
    a, b = h.enqueue(), h.enqueue()
    h.core.attach(1, worker_id="w", job_types=["t"], prefetch=2)
    assert len(h.core.dispatch(now=h.now)) == 2
    changed = h.core.detach(1, now=h.now, server_leaving=True, unsent={b.id})
    assert {j.id for j in changed} == {a.id, b.id}
    assert all(j.lost_leases == 0 and j.status is Status.QUEUED for j in changed)
    by_id = {j.id: j for j in changed}
    assert by_id[a.id].attempt == 1  # it did reach a worker: the attempt stays
    assert by_id[b.id].attempt == 0  # never left the server


def test_status_totals_follow_every_change() -> None:
    h = Harness()
    jobs = [h.enqueue() for _ in range(3)]
    later = h.enqueue(scheduled_in=60)
    assert (h.core.count(Status.QUEUED), h.core.count(Status.SCHEDULED)) == (3, 1)
    running = h.claim()
    assert h.core.count(Status.RUNNING) == 1 and h.core.count(Status.QUEUED) == 2
    expect_job(h.core.complete(running.id, lease_id=running.lease_id, now=h.now))
    expect_job(h.core.cancel(later.id, now=h.now))
    assert h.core.count(Status.RUNNING) == 0 and h.core.count(Status.SCHEDULED) == 0
    assert h.core.count(Status.COMPLETED) == 0  # finished jobs leave memory
    stats = h.core.statistics()
    assert stats.queued == h.core.count(Status.QUEUED) == len(jobs) - 1


def test_new_record_is_stamped_before_it_is_written() -> None:
    h = Harness()
    from stackduck_core import EnqueueRequest, validate_enqueue

    spec = validate_enqueue(EnqueueRequest(job_type="t"), now=h.now, limits=Limits())
    assert not isinstance(spec, type(None))
    first = h.core.new_record(spec, job_id="a", now=h.now)  # type: ignore[arg-type]
    second = h.core.new_record(spec, job_id="b", now=h.now)  # type: ignore[arg-type]
    assert 0 < first.seq < second.seq and first.status is Status.QUEUED
    # admitted later, in the opposite order: the stamped order wins
    h.core.restore(second, now=h.now)
    h.core.restore(first, now=h.now)
    assert [h.claim().id, h.claim().id] == ["a", "b"]
    later = validate_enqueue(
        EnqueueRequest(job_type="t", scheduled_at=h.now + 10), now=h.now, limits=Limits()
    )
    scheduled = h.core.new_record(later, job_id="c", now=h.now)  # type: ignore[arg-type]
    assert scheduled.status is Status.SCHEDULED and scheduled.seq == 0  # stamped when due


def test_outcomes_are_remembered_per_lease_for_replayed_acks() -> None:
    from stackduck_core import Completed, Failed, QueueCore, Released

    REFUSED = Rejected(RejectReason.WRONG_STATE, "refused")  # noqa: N806

    h = Harness()
    h.core = QueueCore(new_id=h.new_lease_id, outcome_memory=2)
    done, failed, given_back = h.enqueue(), h.enqueue(max_retries=1), h.enqueue()
    a, b, c = h.claim(), h.claim(), h.claim()
    completed = expect_job(h.core.complete(a.id, lease_id=a.lease_id, now=h.now))
    assert h.core.replay(done.id, a.lease_id or "", Completed, REFUSED) is completed
    assert h.core.replay(done.id, a.lease_id or "", Failed, REFUSED) is None  # another kind of ack
    assert h.core.replay(done.id, "other-lease", Completed, REFUSED) is None
    retried = expect_job(h.core.fail(b.id, lease_id=b.lease_id, error="x", now=h.now))
    assert h.core.replay(failed.id, b.lease_id or "", Failed, REFUSED) is retried
    released = expect_job(h.core.release(c.id, lease_id=c.lease_id, now=h.now))
    assert h.core.replay(given_back.id, c.lease_id or "", Released, REFUSED) is released
    # only the last two outcomes are kept
    assert h.core.replay(done.id, a.lease_id or "", Completed, REFUSED) is None
    # not for acks without a lease, nor for refusals a retry cannot produce
    assert h.core.replay(given_back.id, None, Released, REFUSED) is None
    bad = Rejected(RejectReason.INVALID_ARGUMENT, "bad")
    assert h.core.replay(given_back.id, c.lease_id, Released, bad) is None
    # extensions and lost leases are not ack outcomes
    d = h.claim()
    expect_job(h.core.extend(d.id, lease_id=d.lease_id, now=h.now))
    assert h.core.replay(d.id, d.lease_id or "", Completed, REFUSED) is None
