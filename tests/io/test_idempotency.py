"""Idempotency keys for enqueue: a producer's retry never creates a second job.

In-process servers (open_test_server) for the semantics, and a server process on
SQLite for "the key outlives a restart" (found in the record store).
"""

from __future__ import annotations

import pathlib
from collections.abc import Callable

import pytest
import trio
import trio.testing

from stackduck_core import EnqueueRequest, Job, Rejected
from stackduck_trio._broker import Duplicate, OutcomeUnknown, Unavailable
from stackduck_trio._client import Client, InvalidArgument, JobRequest
from stackduck_trio._proto import stackduck_pb2 as pb
from stackduck_trio._store import StorageUnavailable
from stackduck_trio.testing import ServerProcess, open_test_server

from .conftest import BrokerHarness


async def _enqueue(
    client: Client, job_type: str, key: str, **fields: object
) -> pb.EnqueueJobResponse:
    """A unary EnqueueJob, answering the whole response (``duplicate`` included)."""
    request = JobRequest(job_type=job_type, idempotency_key=key, **fields).to_pb()  # type: ignore[arg-type]
    return await client._unary("EnqueueJob", request, pb.EnqueueJobResponse)


async def _drain(client: Client, job_type: str) -> list[str]:
    """Dequeue every ready job of ``job_type``; their ids."""
    ids: list[str] = []
    while (job := await client.dequeue(job_type, worker_id="w")) is not None:
        ids.append(job.id)
    return ids


async def test_same_key_twice_answers_the_same_job() -> None:
    with trio.fail_after(20):
        async with open_test_server(grace_period=0.5) as (port, _):
            async with Client.connect(f"127.0.0.1:{port}", batch_enqueue=False) as client:
                first = await _enqueue(client, "mail", "order-1", payload={"n": 1})
                again = await _enqueue(client, "mail", "order-1", payload={"n": 2})
                assert not first.duplicate and again.duplicate
                assert again.job_id == first.job_id and again.status == "queued"
                other = await _enqueue(client, "mail", "order-2")
                assert not other.duplicate and other.job_id != first.job_id
                plain = [await client.enqueue("mail") for _ in range(2)]  # no key: two jobs
                assert len(set(plain)) == 2
                info = await client.get(first.job_id)
                assert info.payload == '{"n":1}'  # the first request's job, unchanged
                raw = await client._unary(
                    "GetJob", pb.GetJobRequest(job_id=first.job_id), pb.GetJobResponse
                )
                assert raw.job.idempotency_key == "order-1"
                assert sorted(await _drain(client, "mail")) == sorted(
                    [first.job_id, other.job_id, *plain]
                )


async def test_concurrent_enqueues_with_one_key_make_one_job() -> None:
    with trio.fail_after(20):
        async with open_test_server(grace_period=0.5) as (port, _):
            async with (
                Client.connect(f"127.0.0.1:{port}", batch_enqueue=False) as unary,
                Client.connect(f"127.0.0.1:{port}") as batching,
            ):
                ids: list[str] = []
                created_by_unary = 0

                async def one(n: int) -> None:
                    nonlocal created_by_unary
                    if n % 2:
                        response = await _enqueue(unary, "conc", "same")
                        ids.append(response.job_id)
                        created_by_unary += not response.duplicate
                    else:  # coalesced into EnqueueJobs batches by the client
                        ids.append(await batching.enqueue("conc", idempotency_key="same"))

                async with trio.open_nursery() as nursery:
                    for n in range(20):
                        nursery.start_soon(one, n)
                assert len(ids) == 20 and len(set(ids)) == 1
                assert created_by_unary <= 1
                assert await _drain(unary, "conc") == [ids[0]]


async def test_a_batch_with_the_key_twice_makes_one_job() -> None:
    with trio.fail_after(20):
        async with open_test_server(grace_period=0.5) as (port, _):
            async with Client.connect(f"127.0.0.1:{port}") as client:
                results = await client.enqueue_many(
                    [
                        {"job_type": "b", "idempotency_key": "k"},
                        {"job_type": "b"},
                        JobRequest(job_type="b", idempotency_key="k", priority=1),
                        {"job_type": "b", "idempotency_key": "bad\n"},
                    ]
                )
                assert [r.code for r in results] == [0, 0, 0, 3]
                assert [r.duplicate for r in results] == [False, False, True, False]
                assert results[2].job_id == results[0].job_id
                assert results[2].status == "queued"
                assert "idempotency_key" in results[3].message
                again = await client.enqueue_many([{"job_type": "b", "idempotency_key": "k"}])
                assert again[0].duplicate and again[0].job_id == results[0].job_id
                assert sorted(await _drain(client, "b")) == sorted(
                    [results[0].job_id, results[1].job_id]
                )


async def test_key_of_a_completed_job_still_answers_it() -> None:
    with trio.fail_after(20):
        async with open_test_server(grace_period=0.5) as (port, _):
            async with Client.connect(f"127.0.0.1:{port}", batch_enqueue=False) as client:
                first = await _enqueue(client, "done", "once")
                job = await client.dequeue("done", worker_id="w")
                assert job is not None and job.id == first.job_id
                await client.complete(job.id, job.lease_id)
                again = await _enqueue(client, "done", "once")  # found in the record store
                assert again.duplicate and again.job_id == first.job_id
                assert again.status == "completed"
                cancelled = await _enqueue(client, "done", "gone")
                await client.cancel(cancelled.job_id)
                answer = await _enqueue(client, "done", "gone")
                assert answer.duplicate and answer.status == "cancelled"
                assert await _drain(client, "done") == []


@pytest.mark.parametrize("key", ["x" * 201, "caf\u00e9", "tab\t", " \x7f"])
async def test_invalid_keys_are_rejected(key: str) -> None:
    with trio.fail_after(20):
        async with open_test_server(grace_period=0.5) as (port, _):
            async with Client.connect(f"127.0.0.1:{port}", batch_enqueue=False) as client:
                with pytest.raises(InvalidArgument, match="idempotency_key"):
                    await client.enqueue("bad", idempotency_key=key)
                assert await _drain(client, "bad") == []
                # an empty key is no key
                ids = {await client.enqueue("ok", idempotency_key="") for _ in range(2)}
                assert len(ids) == 2


@pytest.mark.slow
def test_key_is_known_after_a_restart(tmp_path: pathlib.Path) -> None:
    server = ServerProcess(tmp_path / "data", "--grace-period", "1")

    async def enqueue(key: str) -> pb.EnqueueJobResponse:
        async with Client.connect(server.address, batch_enqueue=False) as client:
            return await _enqueue(client, "restart", key)

    async def complete_one() -> str:
        async with Client.connect(server.address) as client:
            job = await client.dequeue("restart", worker_id="w")
            assert job is not None
            await client.complete(job.id, job.lease_id)
            return job.id

    with server:
        done = trio.run(enqueue, "gets-done")
        queued = trio.run(enqueue, "stays-queued")
        assert trio.run(complete_one) == done.job_id
    with server.start():
        again = trio.run(enqueue, "stays-queued")  # restored into memory from the store
        assert again.duplicate and again.job_id == queued.job_id and again.status == "queued"
        server.kill()  # no flush, no drain: the store alone answers next time
    with server.start():
        again = trio.run(enqueue, "gets-done")  # a completed row of the store
        assert again.duplicate and again.job_id == done.job_id
        assert trio.run(enqueue, "stays-queued").job_id == queued.job_id
        assert not trio.run(enqueue, "new-key").duplicate


# -- the broker (memory store, autojump clock) --------------------------------------------------


async def test_broker_answers_duplicates_as_such(
    harness: BrokerHarness, autojump_clock: trio.abc.Clock
) -> None:
    broker = harness.broker
    (job,) = await broker.enqueue([EnqueueRequest(job_type="t", idempotency_key="k")])
    assert isinstance(job, Job) and job.idempotency_key == "k"
    assert harness.backend.rows[job.id].idempotency_key == "k"
    assert broker.core.find_key("k") == job.id
    again = await broker.enqueue(
        [
            EnqueueRequest(job_type="t", idempotency_key="k"),
            EnqueueRequest(job_type="t", idempotency_key=""),
        ]
    )
    assert again[0] == Duplicate(job)
    assert isinstance(again[1], Rejected) and again[1].field == "idempotency_key"


async def test_broker_store_failure_during_a_key_lookup(
    harness: BrokerHarness, autojump_clock: trio.abc.Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    broker = harness.broker
    release = trio.Event()

    run_blocking = broker.committer.run_blocking

    def find_key(key: str) -> None:
        raise StorageUnavailable("the store is down")

    async def slow_failure(fn: Callable[[], object]) -> object:
        try:
            return await run_blocking(fn)
        except StorageUnavailable:
            await release.wait()  # the lookup takes a while, then fails
            raise

    monkeypatch.setattr(harness.backend, "find_key", find_key)
    monkeypatch.setattr(broker.committer, "run_blocking", slow_failure)

    async def owner() -> None:
        with pytest.raises(Unavailable, match="the store is down"):
            await broker.enqueue([EnqueueRequest(job_type="t", idempotency_key="k")])

    async def waiter_with_a_new_job() -> None:
        with pytest.raises(OutcomeUnknown, match="idempotency key"):
            await broker.enqueue(
                [EnqueueRequest(job_type="t", idempotency_key="k"), EnqueueRequest(job_type="u")]
            )

    async def waiter() -> None:
        with pytest.raises(Unavailable, match="idempotency key"):
            await broker.enqueue([EnqueueRequest(job_type="t", idempotency_key="k")])

    async with trio.open_nursery() as nursery:
        nursery.start_soon(owner)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(waiter_with_a_new_job)
        nursery.start_soon(waiter)
        await trio.testing.wait_all_tasks_blocked()
        release.set()
    monkeypatch.undo()
    (job,) = await broker.enqueue([EnqueueRequest(job_type="t", idempotency_key="k")])
    assert isinstance(job, Job)  # the key was released: this one created the job
    assert [j.idempotency_key for j in harness.backend.rows.values()] == [None, "k"]
