"""End-to-end tests of stackduck_trio.Worker against real servers.

Most tests use an in-process server (open_test_server) with a 0.2 s heartbeat; the crash
tests use a server subprocess (ServerProcess) that is SIGKILLed / SIGSTOPped and restarted
on the same port. Timings the design relies on are printed (`pytest -s` shows them).
"""

from __future__ import annotations

import functools
import os
import pathlib
import signal
import time
from collections.abc import AsyncIterator, Callable, Iterator

import pytest
import trio

from stackduck_trio import Client, JobInfo, Unauthenticated, Worker
from stackduck_trio._worker import _is_async
from stackduck_trio.testing import ServerProcess, open_test_server

HEARTBEAT = 0.2
IDLE = 5 * HEARTBEAT  # the worker declares the server dead after this much silence


@pytest.fixture
async def address() -> AsyncIterator[str]:
    async with open_test_server(heartbeat_interval=HEARTBEAT, grace_period=0.5) as (port, _):
        yield f"127.0.0.1:{port}"


def make_worker(address: str, handlers: dict[str, Callable[..., object]], **kw: object) -> Worker:
    options: dict[str, object] = {"stream_idle_timeout": IDLE, "reconnect_max": 0.5, **kw}
    return Worker(address, handlers, **options)  # type: ignore[arg-type]


async def wait_for(predicate: Callable[[], bool], within: float = 5.0) -> None:
    """Poll a condition (counters and other processes' state have no events to wait on)."""
    with trio.fail_after(within):
        while not predicate():  # noqa: ASYNC110 - polling on purpose
            await trio.sleep(0.01)


async def wait_status(client: Client, job_id: str, status: str, within: float = 5.0) -> JobInfo:
    """Poll the server until a job reaches ``status``."""
    with trio.fail_after(within):
        while (job := await client.get(job_id)).status != status:  # noqa: ASYNC110
            await trio.sleep(0.02)
    return job


def test_handler_kinds() -> None:
    async def coro(job: JobInfo) -> None: ...

    def plain(job: JobInfo) -> None: ...

    class AsyncCallable:
        async def __call__(self, job: JobInfo) -> None: ...

    assert _is_async(coro) and _is_async(functools.partial(coro)) and _is_async(AsyncCallable())
    assert not _is_async(plain) and not _is_async(functools.partial(plain))
    with pytest.raises(ValueError):
        Worker("127.0.0.1:1", {})
    with pytest.raises(ValueError):
        Worker("127.0.0.1:1", {"x": plain}, concurrency=0)


async def test_handlers_run_and_complete(address: str) -> None:
    seen: list[tuple[str, object, str | None]] = []
    thread_seen: list[int] = []

    async def email(job: JobInfo) -> None:
        seen.append((job.job_type, job.data, job.lease_id))

    def resize(job: JobInfo) -> None:  # sync: runs in a thread
        thread_seen.append(job.data["n"])

    worker = make_worker(address, {"email": email, "resize": resize}, worker_id="w-test")
    with trio.fail_after(10):
        async with Client.connect(address) as client, trio.open_nursery() as nursery:
            ids = [
                r.job_id
                for r in await client.enqueue_many(
                    [{"job_type": "email", "payload": {"n": i}} for i in range(10)]
                    + [{"job_type": "resize", "payload": {"n": i}} for i in range(5)]
                )
            ]
            await nursery.start(worker.run)
            await wait_for(lambda: worker.statistics().acks_sent == 15)
            worker.stop()
        async with Client.connect(address) as client:
            jobs = [await client.get(job_id) for job_id in ids]
    assert all(j.status == "completed" and j.worker_id is None for j in jobs)
    assert sorted(d["n"] for _, d, _ in seen) == list(range(10))  # type: ignore[index]
    assert all(lease for _, _, lease in seen)
    assert sorted(thread_seen) == list(range(5))
    stats = worker.statistics()
    assert (stats.processed, stats.failed, stats.received, stats.running) == (15, 0, 15, 0)
    assert stats.acks_rejected == 0 and stats.reconnects == 0 and not stats.connected


async def test_failures_are_retried_then_dead_lettered(address: str) -> None:
    attempts: list[int] = []

    async def flaky(job: JobInfo) -> None:
        attempts.append(job.attempt)
        raise ValueError(f"bad input {job.data['n']}")

    worker = make_worker(address, {"flaky": flaky})
    with trio.fail_after(10):
        async with Client.connect(address) as client, trio.open_nursery() as nursery:
            job_id = await client.enqueue("flaky", {"n": 7}, max_retries=2, delay=0)
            await nursery.start(worker.run)
            job = await wait_status(client, job_id, "failed")
            worker.stop()
    assert attempts == [1, 2, 3]
    assert job.retry_count == 2
    assert job.error_message == "ValueError: bad input 7"
    assert worker.statistics().failed == 3


async def test_acks_are_batched(address: str) -> None:
    gate = trio.Event()

    async def slow(job: JobInfo) -> None:
        await gate.wait()

    worker = make_worker(address, {"batch": slow}, concurrency=10)
    with trio.fail_after(10):
        async with Client.connect(address) as client, trio.open_nursery() as nursery:
            await client.enqueue_many([{"job_type": "batch"}] * 10)
            await nursery.start(worker.run)
            await wait_for(lambda: worker.statistics().running == 10)
            gate.set()  # ten outcomes at once
            await wait_for(lambda: worker.statistics().acks_sent == 10)
            worker.stop()
    assert worker.statistics().ack_batches <= 2


async def test_concurrency_and_prefetch_are_respected(address: str) -> None:
    running = 0
    peak = 0
    server_peak = 0

    async def job(job: JobInfo) -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await trio.sleep(0.05)
        running -= 1

    worker = make_worker(address, {"c": job}, concurrency=3, prefetch=3)
    with trio.fail_after(10):
        async with Client.connect(address) as client, trio.open_nursery() as nursery:
            await client.enqueue_many([{"job_type": "c"}] * 15)
            await nursery.start(worker.run)
            while worker.statistics().acks_sent < 15:
                stats = (await client.stats()).of("c")
                assert stats is not None
                server_peak = max(server_peak, stats.running)
                await trio.sleep(0.01)
            worker.stop()
    assert peak == 3
    assert server_peak <= 3  # the server never leased more than the prefetch


async def test_long_job_keeps_its_lease(address: str) -> None:
    """lease_seconds=2, the job runs 3.5 s: extended every ~0.67 s, never redelivered."""
    calls: list[int] = []
    expiries: list[float | None] = []

    async def long(job: JobInfo) -> None:
        calls.append(job.attempt)
        await trio.sleep(3.5)

    worker = make_worker(address, {"long": long}, lease_seconds=2)
    with trio.fail_after(15):
        async with Client.connect(address) as client, trio.open_nursery() as nursery:
            job_id = await client.enqueue("long")
            await nursery.start(worker.run)
            await wait_status(client, job_id, "running")
            for _ in range(4):
                await trio.sleep(0.7)
                expiries.append((await client.get(job_id)).lease_expires_at)
            job = await wait_status(client, job_id, "completed")
            worker.stop()
    assert calls == [1]
    assert job.attempt == 1
    assert all(e is not None for e in expiries)
    assert expiries == sorted(expiries) and expiries[-1] > expiries[0]  # type: ignore[operator]
    assert worker.statistics().lease_extensions >= 4
    assert worker.statistics().leases_lost == 0


async def test_graceful_stop_finishes_running_jobs(address: str) -> None:
    started = trio.Event()

    async def slow(job: JobInfo) -> None:
        started.set()
        await trio.sleep(0.5)

    worker = make_worker(address, {"slow": slow}, concurrency=1)
    with trio.fail_after(10):
        async with Client.connect(address) as client:
            first, second = (
                r.job_id for r in await client.enqueue_many([{"job_type": "slow"}] * 2)
            )
            async with trio.open_nursery() as nursery:
                await nursery.start(worker.run)
                await started.wait()
                stopped_at = trio.current_time()
                worker.stop()
            # run() returned only after the running job finished and its ack went out.
            assert trio.current_time() - stopped_at >= 0.4
            assert (await client.get(first)).status == "completed"
            assert (await client.get(second)).status == "queued"  # never started
            assert (await client.stats()).workers == 0


async def test_stop_cancels_handlers_after_grace_period(address: str) -> None:
    async def stuck(job: JobInfo) -> None:
        await trio.sleep_forever()

    worker = make_worker(address, {"stuck": stuck}, grace_period=0.3)
    with trio.fail_after(10):
        async with Client.connect(address) as client:
            job_id = await client.enqueue("stuck")
            async with trio.open_nursery() as nursery:
                await nursery.start(worker.run)
                await wait_status(client, job_id, "running")
                worker.stop()
            job = await wait_status(client, job_id, "queued")  # requeued, not failed
    assert job.retry_count == 0
    assert worker.statistics().cancelled == 1


async def test_cancelling_run_flushes_done_work(address: str) -> None:
    """Cancelled while one job is done (its ack still waiting for the batch) and one runs:
    the done job's ack is sent before the stream is reset, the running one is requeued."""

    async def handler(job: JobInfo) -> None:
        if job.data["n"] == 1:
            await trio.sleep_forever()

    worker = make_worker(address, {"q": handler}, ack_flush_interval=60.0, ack_batch_size=100)
    with trio.fail_after(10):
        async with Client.connect(address) as client:
            stuck = await client.enqueue("q", {"n": 1})
            async with trio.open_nursery() as nursery:
                await nursery.start(worker.run)
                await wait_for(lambda: worker.statistics().running == 1)
                quick = await client.enqueue("q", {"n": 0})
                await wait_for(lambda: worker.statistics().processed == 1)
                assert worker.statistics().acks_sent == 0  # waiting for more acks
                nursery.cancel_scope.cancel()
            assert (await client.get(quick)).status == "completed"
            assert (await wait_status(client, stuck, "queued")).retry_count == 0


async def test_fatal_error_ends_run() -> None:
    async def never(job: JobInfo) -> None:  # pragma: no cover
        raise AssertionError

    with trio.fail_after(10):
        async with open_test_server(tokens=("right",)) as (port, _):
            worker = make_worker(f"127.0.0.1:{port}", {"x": never}, token="wrong")
            with pytest.raises(Unauthenticated):
                await worker.run()


async def test_drain_throughput(address: str) -> None:
    count = 2000
    done = 0

    async def noop(job: JobInfo) -> None:
        nonlocal done
        done += 1

    worker = make_worker(address, {"noop": noop}, concurrency=50)
    with trio.fail_after(30):
        async with Client.connect(address) as client, trio.open_nursery() as nursery:
            for _ in range(0, count, 1000):
                results = await client.enqueue_many([{"job_type": "noop"}] * 1000)
                assert all(r.ok for r in results)
            begin = time.perf_counter()
            await nursery.start(worker.run)
            await wait_for(lambda: worker.statistics().acks_sent == count, within=25)
            elapsed = time.perf_counter() - begin
            worker.stop()
    stats = worker.statistics()
    print(
        f"\nworker drained {count} no-op jobs in {elapsed:.2f} s "
        f"({count / elapsed:.0f} jobs/s, in-process server, {stats.ack_batches} AckJobs calls)"
    )
    assert done == count


# ---------------------------------------------------------------------------------------------
# Crashes: a server subprocess that dies, hangs and comes back
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def server_process(tmp_path: pathlib.Path) -> Iterator[ServerProcess]:
    """A started server subprocess (sync fixture: starting it blocks for a moment)."""
    with ServerProcess(
        tmp_path / "data", "--heartbeat-interval", str(HEARTBEAT), "--grace-period", "1"
    ) as server:
        yield server


async def test_reconnects_after_sigkill_and_restart(server_process: ServerProcess) -> None:
    done: list[str] = []

    async def record(job: JobInfo) -> None:
        done.append(job.data["name"])

    server = server_process
    port = server.port
    worker = make_worker(server.address, {"rec": record}, reconnect_min=0.05)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(worker.run)
            async with Client.connect(server.address, lazy=True, timeout=2) as client:
                await client.enqueue("rec", {"name": "before"})
                await wait_for(lambda: worker.statistics().acks_sent == 1)

                killed_at = trio.current_time()
                await trio.to_thread.run_sync(server.kill)
                await wait_for(lambda: not worker.statistics().connected)
                noticed = trio.current_time() - killed_at

                await trio.sleep(0.3)  # a few failed reconnect attempts
                await trio.to_thread.run_sync(functools.partial(server.start, port=port))
                assert server.port == port
                restarted_at = trio.current_time()
                await client.enqueue("rec", {"name": "after"})  # reconnects by itself
                await wait_for(lambda: worker.statistics().acks_sent == 2, within=10)
                recovered = trio.current_time() - restarted_at
            worker.stop()
    print(
        f"\nSIGKILLed server noticed after {noticed * 1000:.0f} ms; job enqueued after the "
        f"restart done {recovered * 1000:.0f} ms after the server was ready"
    )
    assert done == ["before", "after"]
    assert noticed < 2.0
    assert worker.statistics().reconnects >= 1


async def test_notices_hung_server_by_missing_heartbeats(server_process: ServerProcess) -> None:
    """SIGSTOP: no EOF, no RST -- only the missing heartbeats reveal the dead server."""

    async def noop(job: JobInfo) -> None:
        pass

    server = server_process
    assert server.proc is not None
    worker = make_worker(server.address, {"h": noop}, reconnect_min=0.05, call_timeout=1.0)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(worker.run)
            await worker.wait_connected()
            os.kill(server.proc.pid, signal.SIGSTOP)
            stopped_at = trio.current_time()
            try:
                await wait_for(lambda: not worker.statistics().connected, within=10)
                noticed = trio.current_time() - stopped_at
            finally:
                os.kill(server.proc.pid, signal.SIGCONT)
            # The server answers again: the worker reconnects and processes new jobs.
            async with Client.connect(server.address, timeout=5) as client:
                job_id = await client.enqueue("h")
                await wait_status(client, job_id, "completed", within=10)
            worker.stop()
    print(
        f"\nhung (SIGSTOPped) server noticed after {noticed * 1000:.0f} ms (idle timeout {IDLE} s)"
    )
    assert IDLE * 0.9 <= noticed < IDLE + 2.0


async def test_default_prefetch_buffers_beyond_concurrency_and_releases_on_stop(
    address: str,
) -> None:
    """prefetch = 4 x concurrency: jobs wait here with live leases; stop() gives them back."""
    started = trio.Event()
    gate = trio.Event()

    async def slow(job: JobInfo) -> None:
        started.set()
        await gate.wait()

    worker = make_worker(address, {"buffered": slow}, concurrency=2)
    assert worker.prefetch == 32
    with trio.fail_after(15):
        async with Client.connect(address) as client, trio.open_nursery() as nursery:
            ids = [r.job_id for r in await client.enqueue_many([{"job_type": "buffered"}] * 10)]
            await nursery.start(worker.run)
            await started.wait()
            while (await client.stats()).of("buffered").running < 10:  # type: ignore[union-attr]  # noqa: ASYNC110
                await trio.sleep(0.01)  # all 10 leased to this worker, 2 running
            worker.stop()
            gate.set()
        stats = worker.statistics()
        assert (stats.processed, stats.released) == (2, 8)
        async with Client.connect(address) as client:
            states = [await client.get(job_id) for job_id in ids]
    done = [s for s in states if s.status == "completed"]
    back = [s for s in states if s.status == "queued"]
    assert len(done) == 2 and len(back) == 8
    assert all(s.attempt == 0 for s in back)  # released: no attempt used


async def test_buffered_jobs_start_in_delivery_order(address: str) -> None:
    """One slot, a prefetch of 32: jobs start by priority, then first in, first out."""
    order: list[int] = []

    async def record(job: JobInfo) -> None:
        order.append(job.data["n"])

    worker = make_worker(address, {"ordered": record}, concurrency=1)
    priorities = [3, 1, 2, 1, 3, 2, 1, 2, 3, 1] * 2
    with trio.fail_after(10):
        async with Client.connect(address) as client, trio.open_nursery() as nursery:
            await client.enqueue_many(
                [
                    {"job_type": "ordered", "payload": {"n": n}, "priority": p}
                    for n, p in enumerate(priorities)
                ]
            )
            await nursery.start(worker.run)
            await wait_for(lambda: worker.statistics().processed == len(priorities))
            worker.stop()
    expected = sorted(range(len(priorities)), key=lambda n: (priorities[n], n))
    assert order == expected


async def test_stop_releases_waiting_jobs_when_running_ones_outlast_the_grace_period() -> None:
    """A stop releases every prefetched job that has not started at once, not when a slot
    frees up: a running handler that outlasts ``grace_period`` is cancelled (its lease is
    lost), but the jobs waiting behind it are given back unstarted, uncharged.

    The report: concurrency 1, 5 jobs of 3 s, grace 1 s, stop() after 0.5 s; after 5 such
    stops all 5 jobs were dead-lettered as poison pills although 4 never started (they were
    cancelled with the handler, unreleased, and the stream's reset counted their leases as
    lost). Here with shorter times and ``max_lost_leases = rounds``: the job that runs each
    round is dead-lettered after the last round, the other four are still queued, unused.
    """
    rounds = 3
    started: list[str] = []

    async def slow(job: JobInfo) -> None:
        started.append(job.id)
        await trio.sleep(1.5)  # outlasts the worker's grace period of 0.3 s

    with trio.fail_after(30):
        async with open_test_server(
            heartbeat_interval=HEARTBEAT, grace_period=0.5, max_lost_leases=rounds
        ) as (port, _):
            address = f"127.0.0.1:{port}"
            async with Client.connect(address) as client:
                ids = [r.job_id for r in await client.enqueue_many([{"job_type": "long"}] * 5)]
                first, waiting = ids[0], ids[1:]
                for round_ in range(1, rounds + 1):
                    worker = make_worker(address, {"long": slow}, concurrency=1, grace_period=0.3)
                    async with trio.open_nursery() as nursery:
                        await nursery.start(worker.run)
                        await wait_for(lambda: len(started) == round_)  # noqa: B023
                        await wait_for(lambda: worker.statistics().received == 5)  # noqa: B023
                        await trio.sleep(0.1)
                        stopped_at = trio.current_time()
                        worker.stop()
                    took = trio.current_time() - stopped_at
                    stats = worker.statistics()
                    assert (stats.released, stats.cancelled, stats.processed) == (4, 1, 0)
                    assert stats.acks_rejected == 0 and stats.acks_lost == 0
                    assert took < 1.0  # the grace period, not the 1.5 s handler
                    # The started job lost its lease (charged: attempt kept, lost_leases + 1).
                    status = "failed" if round_ == rounds else "queued"
                    job = await wait_status(client, first, status)
                    assert job.attempt == round_ and job.retry_count == 0
                    # The others never started: released, no attempt, no lost lease.
                    for job_id in waiting:
                        job = await client.get(job_id)
                        assert (job.status, job.attempt, job.retry_count) == ("queued", 0, 0)
                        assert job.worker_id is None and job.error_message == ""
                assert started == [first] * rounds  # lost and released jobs keep their place
                # lost_leases is not on the wire; the poison-pill message counts them.
                dead = await client.get(first)
                assert dead.error_message.startswith(
                    f"poison pill: {rounds} deliveries ended with a lost lease"
                )
                # The released jobs run normally afterwards: their first real attempt.
                done: list[int] = []

                async def quick(job: JobInfo) -> None:
                    done.append(job.attempt)

                worker = make_worker(address, {"long": quick}, concurrency=1)
                async with trio.open_nursery() as nursery:
                    await nursery.start(worker.run)
                    await wait_for(lambda: worker.statistics().acks_sent == 4)
                    worker.stop()
                assert done == [1, 1, 1, 1]
