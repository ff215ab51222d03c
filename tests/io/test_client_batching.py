"""Client-side enqueue batching (stackduck_trio._client: Client.enqueue with batch_enqueue).

Concurrent ``enqueue()`` calls on one client are coalesced into ``EnqueueJobs`` batches;
each caller still gets its own job id or its own error. ``client.statistics()`` counts
the RPCs made, so the tests can tell batches from unary calls.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator

import pytest
import trio

from stackduck_trio import (
    Client,
    DeadlineExceeded,
    InvalidArgument,
    ResourceExhausted,
    Unavailable,
)
from stackduck_trio._store import Batch, MemoryBackend, StorageUnavailable
from stackduck_trio.testing import open_test_server


@pytest.fixture
async def address() -> AsyncIterator[str]:
    async with open_test_server(heartbeat_interval=0.1, grace_period=0.5) as (port, _):
        yield f"127.0.0.1:{port}"


async def test_concurrent_enqueues_are_batched(address: str) -> None:
    ids: dict[int, str] = {}
    with trio.fail_after(20):
        async with Client.connect(address) as client:
            before = client.statistics()

            async def produce(n: int) -> None:
                ids[n] = await client.enqueue("batched", {"n": n}, priority=1 + n % 3)

            async with trio.open_nursery() as nursery:
                for n in range(200):
                    nursery.start_soon(produce, n)
            after = client.statistics()
            assert len(ids) == 200
            assert len(set(ids.values())) == 200
            rpcs = after["rpcs"] - before["rpcs"]
            assert rpcs == after["enqueue_batches"] - before["enqueue_batches"]
            assert rpcs <= 20, f"{rpcs} RPCs for 200 concurrent enqueues"
            assert after["enqueue_batched_jobs"] - before["enqueue_batched_jobs"] == 200
            for n, job_id in ids.items():
                info = await client.get(job_id)
                assert info.data == {"n": n}
                assert info.priority == 1 + n % 3
                assert info.job_type == "batched"


async def test_batch_max_bounds_each_batch(address: str) -> None:
    with trio.fail_after(20):
        async with Client.connect(address, batch_max=7) as client:
            async with trio.open_nursery() as nursery:
                for n in range(50):
                    nursery.start_soon(client.enqueue, "bounded", {"n": n})
            stats = client.statistics()
            assert stats["enqueue_batched_jobs"] == 50
            assert stats["enqueue_batches"] >= 50 // 7 + 1


async def test_mixed_valid_and_invalid_in_one_batch(address: str) -> None:
    results: dict[int, str | BaseException] = {}
    with trio.fail_after(20):
        # The unary answers, for comparison.
        async with Client.connect(address, batch_enqueue=False) as unary:
            with pytest.raises(InvalidArgument) as prio:
                await unary.enqueue("mixed", priority=0)
            with pytest.raises(InvalidArgument) as json_error:
                await unary.enqueue("mixed", "{broken")
            assert unary.statistics()["enqueue_batches"] == 0
        expected = {0: prio.value.message, 1: json_error.value.message}

        # A linger makes sure all of them travel in one batch.
        async with Client.connect(address, batch_linger=0.2) as client:

            async def produce(n: int) -> None:
                try:
                    if n % 3 == 0:
                        results[n] = await client.enqueue("mixed", priority=0)
                    elif n % 3 == 1:
                        results[n] = await client.enqueue("mixed", "{broken")
                    else:
                        results[n] = await client.enqueue("mixed", {"n": n})
                except InvalidArgument as exc:
                    results[n] = exc

            async with trio.open_nursery() as nursery:
                for n in range(30):
                    nursery.start_soon(produce, n)
            assert client.statistics()["enqueue_batches"] == 1
            for n, result in results.items():
                if n % 3 == 2:
                    assert isinstance(result, str)
                    assert (await client.get(result)).data == {"n": n}
                else:
                    assert isinstance(result, InvalidArgument)
                    assert result.status == "INVALID_ARGUMENT"
                    assert result.message == expected[n % 3]
            assert "priority" in expected[0]
            assert (await client.stats()).of("mixed").queued == 10  # type: ignore[union-attr]


async def test_sequential_enqueues_are_batches_of_one(address: str) -> None:
    with trio.fail_after(20):
        async with Client.connect(address) as client:
            ids = [await client.enqueue("seq", {"n": n}) for n in range(10)]
            assert len(set(ids)) == 10
            stats = client.statistics()
            assert stats["enqueue_batches"] == 10
            assert stats["enqueue_batched_jobs"] == 10
            for n, job_id in enumerate(ids):
                assert (await client.get(job_id)).data == {"n": n}
            with pytest.raises(InvalidArgument, match="priority"):
                await client.enqueue("seq", priority=7)
            assert await client.enqueue("seq")  # still usable after an item error


async def test_batching_disabled_sends_unary_calls(address: str) -> None:
    with trio.fail_after(20):
        async with Client.connect(address, batch_enqueue=False) as client:
            ids: list[str] = []

            async def produce(n: int) -> None:
                ids.append(await client.enqueue("unary", {"n": n}))

            async with trio.open_nursery() as nursery:
                for n in range(20):
                    nursery.start_soon(produce, n)
            stats = client.statistics()
            assert len(set(ids)) == 20
            assert stats["rpcs"] == 20
            assert stats["enqueue_batches"] == 0
            with pytest.raises(InvalidArgument, match="priority"):
                await client.enqueue("unary", priority=0)


async def test_cancelled_caller_does_not_affect_others(address: str) -> None:
    with trio.fail_after(20):
        async with Client.connect(address) as client:
            ok: list[str] = []
            cancelled: list[bool] = []

            async def produce(n: int) -> None:
                ok.append(await client.enqueue("cancel", {"n": n}))

            async def doomed() -> None:
                # Cancelled around the time its request is taken into a batch.
                with trio.CancelScope(deadline=trio.current_time()) as scope:
                    await client.enqueue("cancel", {"doomed": True})
                cancelled.append(scope.cancelled_caught)

            async def cancel_later(scope: trio.CancelScope) -> None:
                await trio.lowlevel.checkpoint()
                scope.cancel()

            async with trio.open_nursery() as nursery:
                for n in range(40):
                    nursery.start_soon(produce, n)
                nursery.start_soon(doomed)
                # One more that is cancelled after it was queued (likely in flight).
                in_flight = trio.CancelScope()

                async def waiter() -> None:
                    with in_flight:
                        await client.enqueue("cancel", {"late": True})

                nursery.start_soon(waiter)
                nursery.start_soon(cancel_later, in_flight)
                for n in range(40, 80):
                    nursery.start_soon(produce, n)
            assert cancelled == [True]
            assert len(set(ok)) == 80
            queued = (await client.stats()).of("cancel").queued  # type: ignore[union-attr]
            # The two cancelled jobs may or may not have been created (it depends on
            # whether their batch was sent before the cancellation); nothing else is.
            assert 80 <= queued <= 82
            # The client and its batcher keep working.
            assert await client.enqueue("cancel", {"after": True})


async def test_caller_cancelled_before_send_creates_no_job(address: str) -> None:
    with trio.fail_after(20):
        async with Client.connect(address, batch_linger=0.3) as client:
            async with trio.open_nursery() as nursery:
                for n in range(5):
                    nursery.start_soon(client.enqueue, "unsent", {"n": n})
                with trio.move_on_after(0.05) as scope:
                    await client.enqueue("unsent", {"gone": True})
                assert scope.cancelled_caught
            assert client.statistics()["enqueue_batched_jobs"] == 5
            assert (await client.stats()).of("unsent").queued == 5  # type: ignore[union-attr]


async def test_oversize_batch_falls_back_to_unary_outcomes() -> None:
    """A batch the server rejects as a whole for its size is retried call by call."""
    with trio.fail_after(20):
        async with open_test_server(max_message_bytes=4096) as (port, _):
            async with Client.connect(f"127.0.0.1:{port}", batch_linger=0.1) as client:
                ids: list[str] = []

                async def produce(n: int) -> None:
                    ids.append(await client.enqueue("chunky", {"blob": "x" * 1000, "n": n}))

                async with trio.open_nursery() as nursery:
                    for n in range(8):
                        nursery.start_soon(produce, n)
                assert len(set(ids)) == 8
                stats = client.statistics()
                assert stats["enqueue_batches"] == 1  # rejected whole, then ...
                assert stats["rpcs"] == 1 + 8  # ... one unary call per job
                # Alone, a too-large request gets the unary answer.
                with pytest.raises(ResourceExhausted):
                    await client.enqueue("chunky", {"blob": "x" * 8000})


async def test_deadline_applies_to_each_caller() -> None:
    async def silent(task_status: trio.TaskStatus[int]) -> None:
        async def swallow(stream: trio.SocketStream) -> None:
            async with stream:
                while await stream.receive_some(65536):
                    pass

        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        task_status.started(listeners[0].socket.getsockname()[1])
        await trio.serve_listeners(swallow, listeners)

    async with trio.open_nursery() as servers:
        port = await servers.start(silent)
        with trio.fail_after(5):
            async with Client.connect(f"127.0.0.1:{port}", timeout=0.3) as client:
                errors: list[BaseException] = []

                async def produce() -> None:
                    try:
                        await client.enqueue("slow")
                    except DeadlineExceeded as exc:
                        errors.append(exc)

                start = trio.current_time()
                async with trio.open_nursery() as nursery:
                    for _ in range(5):
                        nursery.start_soon(produce)
                assert len(errors) == 5
                assert trio.current_time() - start < 1.0
        servers.cancel_scope.cancel()


async def test_waiting_callers_fail_when_client_closes(address: str) -> None:
    errors: list[BaseException] = []
    with trio.fail_after(10):
        async with trio.open_nursery() as outside:
            async with Client.connect(address, batch_linger=5.0) as client:

                async def produce() -> None:
                    try:
                        await client.enqueue("closing")
                    except Unavailable as exc:
                        errors.append(exc)

                for _ in range(3):
                    outside.start_soon(produce)
                await trio.sleep(0.05)
    assert len(errors) == 3


class GatedStore(MemoryBackend):
    """A memory record store whose commits wait (on the store's thread) for a gate."""

    threaded = True

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.gate.set()

    def commit(self, batch: Batch) -> frozenset[str]:
        if not self.gate.wait(10):
            raise StorageUnavailable("gate left closed")
        return super().commit(batch)


@pytest.mark.parametrize("inflight", [1, 2])
async def test_calls_go_at_once_while_a_batch_slot_is_free(inflight: int) -> None:
    store = GatedStore()
    with trio.fail_after(20):
        async with (
            open_test_server(backend=store) as (port, _),
            Client.connect(f"127.0.0.1:{port}", batch_inflight=inflight) as client,
        ):
            await client.enqueue("warm")
            store.gate.clear()  # every commit waits: batches stay in flight
            ids: list[str] = []

            async def produce(n: int) -> None:
                ids.append(await client.enqueue("slots", {"n": n}))

            async with trio.open_nursery() as nursery:
                for n in range(6):
                    nursery.start_soon(produce, n)
                    await trio.sleep(0.02)  # one after the other, not in one go
                # The first call went alone, and so did the second if a slot was
                # free; the others wait for a slot and then travel together.
                with trio.fail_after(5):
                    while client.statistics()["enqueue_batches"] < 1 + inflight:  # noqa: ASYNC110
                        await trio.sleep(0.01)
                await trio.sleep(0.1)  # and no more go while the slots are taken
                assert client.statistics()["enqueue_batches"] == 1 + inflight
                store.gate.set()
            assert len(set(ids)) == 6
            assert client.statistics()["enqueue_batches"] == 1 + inflight + 1
            assert client.statistics()["enqueue_batched_jobs"] == 7


@pytest.mark.parametrize(
    ("option", "value"), [("batch_max", 0), ("batch_linger", -1.0), ("batch_inflight", 0)]
)
async def test_batching_options_are_checked(option: str, value: float) -> None:
    with pytest.raises(ValueError, match=option):
        async with Client.connect("127.0.0.1:1", lazy=True, **{option: value}):  # type: ignore[arg-type]
            pass
