"""The broker over the memory record store, under trio's autojump clock:
backoff of hours and lease expiry run in milliseconds, exactly."""

from __future__ import annotations

import pytest
import trio
import trio.lowlevel

from stackduck_core import EnqueueRequest, Job, Rejected, RejectReason, Retention, Status
from stackduck_trio._broker import OutcomeUnknown, Unavailable
from stackduck_trio._store import StorageUnavailable

from .conftest import BrokerHarness


async def enqueue(h: BrokerHarness, **fields: object) -> Job:
    (job,) = await h.broker.enqueue([EnqueueRequest(job_type="t", **fields)])  # type: ignore[arg-type]
    assert isinstance(job, Job), job
    return job


async def test_enqueue_commits_before_answering_and_before_delivery(
    h: BrokerHarness, autojump_clock: trio.abc.Clock
) -> None:
    job = await enqueue(h, priority=1)
    assert h.backend.rows[job.id].status is Status.QUEUED
    sid, jobs = h.broker.open_stream(worker_id="w", job_types=["t"], prefetch=1, lease_seconds=None)
    delivered = jobs.receive_nowait()
    assert delivered.id == job.id and delivered.status is Status.RUNNING
    h.broker.close_stream(sid)


@pytest.fixture
def h(harness: BrokerHarness) -> BrokerHarness:
    return harness


async def test_a_delivery_is_on_record_after_a_short_delay_or_merged_with_its_ack(
    h: BrokerHarness, autojump_clock: trio.abc.Clock
) -> None:
    delay = h.broker.delivery_write_delay
    assert 0 < delay <= 0.1
    quick, slow = await enqueue(h), await enqueue(h)
    versions: list[tuple[str, Status]] = []
    commit = h.backend.commit

    def record(batch):  # type: ignore[no-untyped-def]
        versions.extend((job.id, job.status) for job in batch.upserts)
        return commit(batch)

    h.backend.commit = record  # type: ignore[method-assign]
    _, jobs = h.broker.open_stream(worker_id="w", job_types=["t"], prefetch=2, lease_seconds=60)
    first, second = jobs.receive_nowait(), jobs.receive_nowait()
    assert (first.id, second.id) == (quick.id, slow.id)
    await trio.sleep(delay / 2)
    assert h.backend.rows[slow.id].status is Status.QUEUED  # not on record yet
    # acknowledged within the delay: one row written, as completed
    assert isinstance(await h.broker.complete(quick.id, first.lease_id), Job)
    assert versions == [(quick.id, Status.COMPLETED)]
    assert h.backend.rows[quick.id].status is Status.COMPLETED
    # still running once the delay is over: on record as running, with its lease
    await trio.sleep(delay)
    assert versions[1:] == [(slow.id, Status.RUNNING)]
    assert h.backend.rows[slow.id].lease_id == second.lease_id


async def test_priority_then_fifo_over_a_stream(
    h: BrokerHarness, autojump_clock: trio.abc.Clock
) -> None:
    ids = {}
    for n, priority in enumerate([3, 2, 1, 2, 1, 3]):
        ids[n] = (await enqueue(h, priority=priority, payload=f'{{"n": {n}}}')).id
    _, jobs = h.broker.open_stream(worker_id="w", job_types=["t"], prefetch=10, lease_seconds=None)
    order = [jobs.receive_nowait().id for _ in range(6)]
    assert order == [ids[2], ids[4], ids[1], ids[3], ids[0], ids[5]]


async def test_exact_backoff_then_dead_letter(
    h: BrokerHarness, autojump_clock: trio.abc.Clock
) -> None:
    job = await enqueue(h, delay=30, max_retries=2)
    _, jobs = h.broker.open_stream(worker_id="w", job_types=["t"], prefetch=1, lease_seconds=600)
    running = await jobs.receive()
    for attempt, wait in enumerate([30, 60], 1):
        failed_at = h.clock.now()
        result = await h.broker.fail(job.id, running.lease_id, f"boom {attempt}")
        assert isinstance(result, Job) and result.status is Status.SCHEDULED
        assert result.retry_count == attempt
        assert result.scheduled_at == pytest.approx(failed_at + wait)
        with trio.move_on_after(wait - 0.01):
            early = await jobs.receive()
            pytest.fail(f"delivered before its backoff ran out: {early}")
        running = await jobs.receive()
        assert h.clock.now() == pytest.approx(failed_at + wait, abs=0.02)
        assert running.attempt == attempt + 1
    result = await h.broker.fail(job.id, running.lease_id, "boom 3")
    assert isinstance(result, Job) and result.status is Status.FAILED
    assert h.backend.rows[job.id].status is Status.FAILED
    assert h.backend.rows[job.id].error_message == "boom 3"
    assert h.broker.counters["t"].failed == 1 and h.broker.counters["t"].retried == 2


async def test_lease_expiry_requeues_to_another_worker(
    h: BrokerHarness, autojump_clock: trio.abc.Clock
) -> None:
    job = await enqueue(h)
    _, first = h.broker.open_stream(worker_id="a", job_types=["t"], prefetch=1, lease_seconds=10)
    got = await first.receive()
    assert got.id == job.id
    _, second = h.broker.open_stream(worker_id="b", job_types=["t"], prefetch=1, lease_seconds=10)
    start = trio.current_time()
    again = await second.receive()
    assert again.id == job.id and again.worker_id == "b"
    assert trio.current_time() - start == pytest.approx(10, abs=0.05)
    stale = await h.broker.complete(job.id, got.lease_id)
    assert isinstance(stale, Rejected) and stale.reason is RejectReason.STALE_LEASE
    done = await h.broker.complete(job.id, again.lease_id)
    assert isinstance(done, Job) and done.status is Status.COMPLETED


async def test_closing_a_stream_requeues_at_once(
    h: BrokerHarness, autojump_clock: trio.abc.Clock
) -> None:
    job = await enqueue(h)
    sid, first = h.broker.open_stream(
        worker_id="a", job_types=["t"], prefetch=1, lease_seconds=None
    )
    assert first.receive_nowait().id == job.id
    _, second = h.broker.open_stream(worker_id="b", job_types=["t"], prefetch=1, lease_seconds=None)
    h.broker.close_stream(sid)
    again = second.receive_nowait()
    assert again.id == job.id and again.lost_leases == 1


async def test_completed_job_explains_later_acks(
    h: BrokerHarness, autojump_clock: trio.abc.Clock
) -> None:
    job = await enqueue(h)
    claimed = await h.broker.claim("t", worker_id="w", lease_seconds=None)
    assert claimed is not None
    assert isinstance(await h.broker.complete(job.id, claimed.lease_id), Job)
    again = await h.broker.complete(job.id, None)  # an original client: no lease to replay
    assert isinstance(again, Rejected) and again.reason is RejectReason.WRONG_STATE
    assert "completed" in again.message
    missing = await h.broker.complete("nope", None)
    assert isinstance(missing, Rejected) and missing.reason is RejectReason.NOT_FOUND
    fetched = await h.broker.get(job.id)
    assert fetched is not None and fetched.status is Status.COMPLETED


async def test_failed_writes_are_retried_never_dropped(
    h: BrokerHarness, autojump_clock: trio.abc.Clock
) -> None:
    h.backend.fail_next = 2
    job = await enqueue(h)
    assert h.backend.rows[job.id].status is Status.QUEUED
    assert h.broker.committer.statistics().failures == 2


async def test_slow_store_answers_outcome_unknown_but_keeps_the_write(
    h: BrokerHarness, autojump_clock: trio.abc.Clock
) -> None:
    h.backend.fail_next = 1_000_000
    with pytest.raises(OutcomeUnknown, match="did not confirm .* may still be applied"):
        await enqueue(h)
    assert h.broker.core.statistics().queued == 0  # not queued before it is on disk
    h.backend.fail_next = 0
    await trio.sleep(60)  # autojump: the writer's capped backoff retries meanwhile
    assert h.backend.rows
    assert h.broker.core.statistics().queued == 1  # admitted once committed


async def test_drain_waits_for_running_jobs_then_requeues(
    h: BrokerHarness, autojump_clock: trio.abc.Clock
) -> None:
    a = await enqueue(h)
    b = await enqueue(h)
    sid, jobs = h.broker.open_stream(worker_id="w", job_types=["t"], prefetch=2, lease_seconds=None)
    first, second = jobs.receive_nowait(), jobs.receive_nowait()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(h.broker.drain, 5.0)
        await trio.sleep(1)
        assert isinstance(await h.broker.complete(first.id, first.lease_id), Job)
        with pytest.raises(Unavailable):
            await enqueue(h)
    # the grace period ran out for the second job: it was requeued
    assert h.broker.core.get(second.id).status is Status.QUEUED  # type: ignore[union-attr]
    assert {a.id, b.id} == {first.id, second.id}
    del sid


async def test_an_idle_server_recovers_from_a_store_outage_by_probing(
    h: BrokerHarness, autojump_clock: trio.abc.Clock
) -> None:
    from stackduck_core import Health

    h.backend.fail_next = 4  # suspect, down, then a failed probe
    job = await enqueue(h)  # committed once the store answers again
    assert h.backend.rows[job.id]
    assert h.broker.committer.health.state is not Health.HEALTHY
    # nothing else to write: the committer keeps probing on its own
    await trio.sleep(5)
    assert h.broker.committer.health.state is Health.HEALTHY
    await enqueue(h)  # accepted again


async def test_shutdown_requeues_running_jobs_without_a_poison_count(
    h: BrokerHarness, autojump_clock: trio.abc.Clock
) -> None:
    job = await enqueue(h)
    _, jobs = h.broker.open_stream(worker_id="w", job_types=["t"], prefetch=1, lease_seconds=None)
    running = jobs.receive_nowait()
    assert running.id == job.id
    await h.broker.drain(1.0)
    again = h.broker.core.get(job.id)
    assert again is not None and again.status is Status.QUEUED
    assert again.lost_leases == 0  # the server left; the job did nothing wrong


def test_ids_are_unique_version_7_uuids_that_sort_by_time() -> None:
    import time
    import uuid

    from stackduck_trio._broker import new_id

    before = time.time_ns() // 1_000_000
    ids = [new_id() for _ in range(50_000)]
    after = time.time_ns() // 1_000_000
    assert len(set(ids)) == len(ids)
    for text in ids[:2_000]:
        parsed = uuid.UUID(text)
        assert (parsed.version, parsed.variant, str(parsed)) == (7, uuid.RFC_4122, text)
    stamps = [int(uuid.UUID(text).hex[:12], 16) for text in ids]
    assert before <= stamps[0] and stamps[-1] <= after
    # ids of different milliseconds sort by time (the indexes' append order)
    assert stamps == sorted(stamps)
    first_of_each_ms: dict[int, str] = {}
    for stamp, text in zip(stamps, ids, strict=True):
        first_of_each_ms.setdefault(stamp, text)
    assert len(first_of_each_ms) > 1
    assert list(first_of_each_ms.values()) == sorted(first_of_each_ms.values())


async def test_pause_and_resume_are_stored_before_they_answer(
    h: BrokerHarness, autojump_clock: trio.abc.Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    job = await enqueue(h)
    await h.broker.pause("t")
    assert h.backend.paused == {"t"} and h.broker.core.paused == {"t"}
    _, jobs = h.broker.open_stream(worker_id="w", job_types=["t"], prefetch=1, lease_seconds=None)
    with pytest.raises(trio.WouldBlock):
        jobs.receive_nowait()

    def down(job_type: str, paused: bool) -> None:
        raise StorageUnavailable("injected failure")

    # A failed write answers UNAVAILABLE and changes nothing, in the store or the core.
    monkeypatch.setattr(h.backend, "set_paused", down)
    with pytest.raises(Unavailable, match="injected failure"):
        await h.broker.resume("t")
    assert h.broker.core.paused == {"t"}
    with pytest.raises(Unavailable):
        await h.broker.pause("other")
    assert h.broker.core.paused == {"t"}
    monkeypatch.undo()

    await h.broker.resume("t")
    assert h.backend.paused == set() and h.broker.core.paused == frozenset()
    assert jobs.receive_nowait().id == job.id


async def test_restore_paused_applies_stored_pauses(
    h: BrokerHarness, autojump_clock: trio.abc.Clock
) -> None:
    h.broker.restore_paused(["t", "u"])
    assert h.broker.core.paused == {"t", "u"}


async def test_a_retried_ack_gets_the_first_answer(
    h: BrokerHarness, autojump_clock: trio.abc.Clock
) -> None:
    from stackduck_trio._broker import AckRequest

    job = await enqueue(h)
    claimed = await h.broker.claim("t", worker_id="w", lease_seconds=None)
    assert claimed is not None
    first = await h.broker.complete(job.id, claimed.lease_id)
    again = await h.broker.complete(job.id, claimed.lease_id)
    assert isinstance(first, Job) and again == first  # not "job is completed"
    assert h.broker.counters["t"].completed == 1  # counted once
    [batched] = await h.broker.ack_many([AckRequest(job.id, claimed.lease_id)])
    assert batched == first
    # a different outcome for the same delivery is still refused
    other = await h.broker.fail(job.id, claimed.lease_id, "late")
    assert isinstance(other, Rejected) and other.reason is RejectReason.WRONG_STATE


async def test_buffered_durability_accepts_and_delivers_while_the_store_is_down(
    h: BrokerHarness, autojump_clock: trio.abc.Clock
) -> None:
    from stackduck_core import Durability, Health

    h.broker.durability = Durability.BUFFERED
    h.backend.fail_next = 1_000_000
    with pytest.raises(OutcomeUnknown):
        await enqueue(h)  # the store still looked usable: a plain write, unconfirmed
    assert h.broker.committer.health.state is Health.DOWN
    # Down: new jobs go to the queue and the outbox, answered at once.
    accepted = [await enqueue(h) for _ in range(3)]
    assert not h.backend.rows
    sid, jobs = h.broker.open_stream(
        worker_id="w", job_types=["t"], prefetch=10, lease_seconds=None
    )
    delivered = [jobs.receive_nowait() for _ in range(3)]
    assert {j.id for j in accepted} == {j.id for j in delivered}
    # Acks are buffered too; their answers wait for the store (an answer means durable).
    async with trio.open_nursery() as nursery:
        for job in delivered:
            nursery.start_soon(h.broker.complete, job.id, job.lease_id)
        await trio.sleep(1)
        h.backend.fail_next = 0  # the store is back: the outbox is written in order
    # ...and the first job, written (not buffered) before the store was known to be
    # down, is queued once its write commits.
    with trio.fail_after(60):
        late = await jobs.receive()
    assert isinstance(await h.broker.complete(late.id, late.lease_id), Job)
    await trio.sleep(1)
    assert {r.status for r in h.backend.rows.values()} == {Status.COMPLETED}
    assert len(h.backend.rows) == 4
    assert h.broker.committer.health.state is Health.HEALTHY
    del sid


async def test_strict_durability_refuses_new_jobs_while_the_store_is_down(
    h: BrokerHarness, autojump_clock: trio.abc.Clock
) -> None:
    h.backend.fail_next = 1_000_000
    with pytest.raises(OutcomeUnknown):
        await enqueue(h)
    with pytest.raises(Unavailable, match="durability=strict refuses new jobs"):
        await enqueue(h)


async def test_a_lost_commit_answer_is_not_taken_for_a_refusal(
    h: BrokerHarness, autojump_clock: trio.abc.Clock
) -> None:
    """The store applied a batch but its answer was lost: the retry finds the rows
    already written, which is success, not "changed elsewhere"."""
    job = await enqueue(h)
    sid, jobs = h.broker.open_stream(worker_id="w", job_types=["t"], prefetch=1, lease_seconds=None)
    delivered = jobs.receive_nowait()
    await trio.sleep(1)  # the delivery's write has committed
    h.backend.lose_next = 1
    done = await h.broker.complete(delivered.id, delivered.lease_id)
    assert isinstance(done, Job) and done.status is Status.COMPLETED
    assert h.backend.rows[job.id].status is Status.COMPLETED
    assert h.broker.committer.statistics().refused == 0
    del sid


async def test_retention_survives_a_failing_store_and_prunes_once_it_is_back(
    h: BrokerHarness, autojump_clock: trio.abc.Clock
) -> None:
    job = await enqueue(h, max_retries=0)
    _, jobs = h.broker.open_stream(worker_id="w", job_types=["t"], prefetch=1, lease_seconds=600)
    running = await jobs.receive()
    dead = await h.broker.fail(job.id, running.lease_id, "boom")
    assert isinstance(dead, Job) and dead.status is Status.FAILED
    await trio.sleep(10)
    h.backend.fail_next = 1_000_000  # every commit fails: the store is down
    async with trio.open_nursery() as nursery:
        nursery.start_soon(h.broker.run_retention, Retention(0, 5.0))
        await trio.sleep(120)  # passes keep failing; the task (and the server) live on
        assert h.broker.pruned["dead"] == 0
        h.backend.fail_next = 0
        with trio.fail_after(120):
            while job.id in h.backend.rows:  # noqa: ASYNC110 - polling the store
                await trio.sleep(1)
        nursery.cancel_scope.cancel()
    assert h.broker.core.get(job.id) is None
