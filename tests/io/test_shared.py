"""Several instances sharing a queue tier, in one process (fast, deterministic enough).

Each test runs two or three servers (``open_test_server``) on one :class:`MemoryTier`
and one private PostgreSQL schema: the same code path as ``REDIS_URL`` + ``DATABASE_URL``
except the tier's transport (``test_tier.py`` proves the Redis tier keeps the same
contract; ``test_multi_instance.py`` runs real processes on a real Redis).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator

import pytest
import redis
import trio
import trio_asyncio  # type: ignore[import-untyped]

from stackduck_core import LifecyclePolicy, QueueCore, TypeLimit
from stackduck_core._failover import BackendHealth, BackendRole
from stackduck_trio import Client, FailedPrecondition, JobInfo, Worker
from stackduck_trio._broker import new_id
from stackduck_trio._clock import TrioWallClock
from stackduck_trio._postgres import PostgresBackend
from stackduck_trio._redis import open_redis_tier
from stackduck_trio._shared import SharedBroker
from stackduck_trio._store import GroupCommitter, MemoryBackend
from stackduck_trio._tier import MemoryTier, QueueTier, TierUnavailable
from stackduck_trio.testing import open_test_server

from .private_servers import PrivateRedis

# registers the `private_redis` fixture in this module
from .private_servers import private_redis_fixture as private_redis_fixture
from .test_backends import SHARED_DATABASE_URL, admin_connection, private_schema
from .test_tier import REDIS_URL

HEARTBEAT = 0.2


def schema_url(schema: str) -> str:
    return f"{SHARED_DATABASE_URL}?schema={schema}"


@pytest.fixture
def schema() -> Iterator[str]:
    """A private PostgreSQL schema, and the Redis key prefix of the same name."""
    with private_schema() as name:
        try:
            yield name
        finally:
            _MEMORY.pop(name, None)
            client = redis.Redis.from_url(REDIS_URL)
            with client:
                keys = list(client.scan_iter(match=f"{name}:*"))
                if keys:
                    client.delete(*keys)


@pytest.fixture(params=["memory", "redis", "postgres"])
def kind(request: pytest.FixtureRequest) -> str:
    """The shared tier: MemoryTier (one object shared in-process), Redis, or the
    record store itself (``STACKDUCK_QUEUE=postgres``: no Redis)."""
    return str(request.param)


@contextlib.asynccontextmanager
async def cluster(
    schema: str, kind: str, n: int = 2, redis_url: str = REDIS_URL, **overrides: object
) -> AsyncIterator[list[str]]:
    """``n`` servers on one tier and one schema; yields their addresses.

    Redis: each server has its own client on the test Redis, under a prefix
    named after the schema (several clusters of one test share it).
    """
    options: dict[str, object] = {
        "heartbeat_interval": HEARTBEAT,
        "grace_period": 0.5,
        "lease_seconds": 3.0,
        **overrides,
    }
    async with contextlib.AsyncExitStack() as stack:
        if kind == "redis" and trio_asyncio.current_loop.get() is None:
            await stack.enter_async_context(trio_asyncio.open_loop())
        addresses = []
        for _ in range(n):
            tier: QueueTier | None = None
            if kind == "memory":
                tier = _MEMORY.setdefault(schema, MemoryTier())
            elif kind == "redis":
                tier = await stack.enter_async_context(
                    open_redis_tier(redis_url, prefix=schema, op_timeout=1.0, must_connect=False)
                )
            else:
                options["queue"] = "postgres"
            backend = PostgresBackend(schema_url(schema))
            port, _config = await stack.enter_async_context(
                open_test_server(backend=backend, tier=tier, **options)
            )
            addresses.append(f"127.0.0.1:{port}")
        yield addresses


_MEMORY: dict[str, MemoryTier] = {}


def rows(schema: str) -> dict[str, int]:
    with admin_connection() as admin:
        found = admin.execute(
            f'SELECT status, count(*) FROM "{schema}".jobs GROUP BY status'
        ).fetchall()
    return {status: int(n) for status, n in found}


async def wait_for(predicate, within: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    with trio.fail_after(within):
        while not await predicate():  # noqa: ASYNC110
            await trio.sleep(0.02)


async def test_a_job_enqueued_on_one_instance_runs_on_the_other(schema: str, kind: str) -> None:
    async with cluster(schema, kind) as (a, b):
        done = trio.Event()
        seen: list[JobInfo] = []

        async def handler(job: JobInfo) -> None:
            seen.append(job)
            done.set()

        worker = Worker(b, {"mail": handler}, stream_idle_timeout=5 * HEARTBEAT)
        async with trio.open_nursery() as nursery:
            await nursery.start(worker.run)
            async with Client.connect(a) as client, Client.connect(b) as client_b:

                async def attached() -> bool:
                    return (await client_b.stats()).workers == 1

                await wait_for(attached)
                started = trio.current_time()
                job_id = await client.enqueue("mail", {"to": "x"})
                with trio.fail_after(5):
                    await done.wait()
                latency = trio.current_time() - started
                print(f"\nenqueue on A -> handler on B: {latency * 1000:.1f} ms")

                async def completed() -> bool:
                    return (await client.get(job_id)).status == "completed"

                await wait_for(completed)
            worker.stop()
        assert [j.id for j in seen] == [job_id]


async def test_a_job_delivered_on_one_instance_is_not_cancelled_from_the_other(
    schema: str, kind: str
) -> None:
    async with cluster(schema, kind) as (a, b):
        async with Client.connect(a) as client_a, Client.connect(b) as client_b:
            async with client_b.consume(["held"], prefetch=1) as jobs:
                job_id = await client_a.enqueue("held", {"n": 1})
                with trio.fail_after(5):
                    job = await jobs.__anext__()
                assert job.id == job_id
                # At once: its delivery's record may still say queued (it waits
                # up to 50 ms for its commit), but the tier knows B holds it.
                with pytest.raises(FailedPrecondition, match="running on another server"):
                    await client_a.cancel(job_id)

                async def on_record() -> bool:  # the delivery's deferred write committed
                    return (await client_a.get(job_id)).status == "running"

                await wait_for(on_record)
                with pytest.raises(FailedPrecondition, match="running on another server"):
                    await client_a.cancel(job_id)
                await client_b.complete(job_id, job.lease_id)
            assert (await client_a.get(job_id)).status == "completed"


async def test_every_job_wakes_the_idle_worker_at_once(schema: str, kind: str) -> None:
    """No lost wake-up: claims that would find nothing are skipped until the tier
    says there is something new, so a lost message would show as a job waiting for
    the 1 s poll. Each of 30 jobs, enqueued on A one at a time while the worker on
    B is idle, starts well before that."""
    async with cluster(schema, kind) as (a, b):
        started: dict[str, float] = {}
        seen = trio.Event()

        async def handler(job: JobInfo) -> None:
            started[job.id] = trio.current_time()
            seen.set()

        worker = Worker(b, {"mail": handler, "other": handler}, stream_idle_timeout=5 * HEARTBEAT)
        async with trio.open_nursery() as nursery:
            await nursery.start(worker.run)
            async with Client.connect(a) as client, Client.connect(b) as client_b:

                async def attached() -> bool:
                    return (await client_b.stats()).workers == 1

                await wait_for(attached)
                waits = []
                for n in range(30):
                    seen = trio.Event()
                    sent = trio.current_time()
                    job_id = await client.enqueue("mail" if n % 3 else "other", {"n": n})
                    with trio.fail_after(5):
                        await seen.wait()
                    waits.append(started[job_id] - sent)
            worker.stop()
        waits.sort()
        print(f"\n{kind}: enqueue on A -> start on B p50 {waits[15] * 1e3:.1f} ms, "
              f"max {waits[-1] * 1e3:.1f} ms")  # fmt: skip
        assert waits[-1] < 0.5, waits


async def test_many_jobs_shared_by_workers_on_both_instances_each_runs_once(
    schema: str, kind: str
) -> None:
    runs: dict[str, list[str]] = {}
    async with cluster(schema, kind) as addresses:
        workers = []
        for index, address in enumerate(addresses):

            async def handler(job: JobInfo, name: str = f"w{index}") -> None:
                runs.setdefault(job.id, []).append(name)
                await trio.sleep(0.001)

            workers.append(Worker(address, {"t": handler}, concurrency=4, stream_idle_timeout=1.0))
        async with trio.open_nursery() as nursery:
            for worker in workers:
                await nursery.start(worker.run)
            ids: list[str] = []
            for address in addresses:
                async with Client.connect(address) as client:
                    for start in range(0, 300, 100):
                        results = await client.enqueue_many(
                            [
                                {"job_type": "t", "payload": {"i": i}}
                                for i in range(start, start + 100)
                            ]
                        )
                        ids.extend(r.job_id for r in results)

            async def all_done() -> bool:
                return rows(schema).get("completed", 0) == len(ids)

            await wait_for(all_done, within=30)
            for worker in workers:
                worker.stop()
    assert sorted(runs) == sorted(ids)
    assert all(len(v) == 1 for v in runs.values())
    by_worker = {name: sum(1 for v in runs.values() if v[0] == name) for name in ("w0", "w1")}
    print(f"\nruns per instance: {by_worker}")
    assert by_worker["w0"] and by_worker["w1"]  # both instances took work


async def test_dead_letters_are_listed_requeued_and_purged_from_any_instance(
    schema: str, kind: str
) -> None:
    async with cluster(schema, kind) as (a, b):

        async def boom(job: JobInfo) -> None:
            raise RuntimeError("boom")

        worker = Worker(a, {"bad": boom}, stream_idle_timeout=1.0)
        async with trio.open_nursery() as nursery:
            await nursery.start(worker.run)
            async with Client.connect(a) as client_a, Client.connect(b) as client_b:
                ids = [await client_a.enqueue("bad", {"i": i}, max_retries=0) for i in range(5)]

                async def all_dead() -> bool:
                    stats = await client_b.stats()  # another instance: counts from the store
                    bad = stats.of("bad")
                    return stats.dead == 5 and bad is not None and bad.dead == 5

                await wait_for(all_dead)
                worker.stop()
                page = await client_b.list_dead_jobs("bad", limit=3)
                rest = await client_b.list_dead_jobs(
                    "bad", limit=3, page_token=page.next_page_token
                )
                listed = [j.id for j in page.jobs] + [j.id for j in rest.jobs]
                assert len(page.jobs) == 3 and not rest.next_page_token
                assert sorted(listed) == sorted(ids)  # each once, in the order they died
                requeued = await client_b.requeue_dead(job_ids=ids[:2])
                assert requeued.count == 2
                purged = await client_a.purge_dead(job_type="bad")
                assert purged.count == 3
                assert rows(schema) == {"queued": 2}
                assert (await client_a.get(ids[0])).status == "queued"


async def test_scheduled_job_enqueued_on_a_is_delivered_on_b_when_due(
    schema: str, kind: str
) -> None:
    async with cluster(schema, kind) as (a, b):
        started: list[float] = []

        async def handler(job: JobInfo) -> None:
            started.append(trio.current_time())

        worker = Worker(b, {"later": handler}, stream_idle_timeout=1.0)
        async with trio.open_nursery() as nursery:
            await nursery.start(worker.run)
            await trio.sleep(0.2)
            async with Client.connect(a) as client:
                import time

                due = time.time() + 0.5
                enqueued_at = trio.current_time()
                await client.enqueue("later", {}, scheduled_at=due)

                async def ran() -> bool:
                    return bool(started)

                await wait_for(ran)
            worker.stop()
        late = started[0] - enqueued_at - 0.5
        print(f"\nscheduled job on B: {late * 1000:+.1f} ms from its due time")
        assert -0.05 < late < 0.5


async def test_a_killed_instance_claims_are_reaped_by_the_survivor(schema: str, kind: str) -> None:
    async with cluster(schema, kind, n=1, lease_seconds=1.0) as (b,):
        async with Client.connect(b) as client:
            ids = [await client.enqueue("t", {"i": i}) for i in range(3)]
        # Instance A claims them and dies without a word (cancelled, no drain).
        with trio.CancelScope() as doomed:
            async with cluster(schema, kind, n=1, lease_seconds=1.0) as (a,):
                async with Client.connect(a) as client:
                    held = [await client.dequeue("t") for _ in range(3)]
                    assert sorted(j.id for j in held if j) == sorted(ids)
                    doomed.cancel()
        runs: list[str] = []

        async def handler(job: JobInfo) -> None:
            runs.append(job.id)

        worker = Worker(b, {"t": handler}, stream_idle_timeout=1.0)
        async with trio.open_nursery() as nursery:
            started = trio.current_time()
            await nursery.start(worker.run)

            async def finished() -> bool:
                return rows(schema).get("completed", 0) == 3

            await wait_for(finished, within=10)
            print(f"\nreaped and finished {trio.current_time() - started:.2f} s after the kill")
            worker.stop()
        assert sorted(runs) == sorted(ids)


async def test_redis_down_jobs_queued_on_a_reach_a_worker_on_b_through_postgres(
    schema: str, private_redis: PrivateRedis
) -> None:
    """Redis dies: B's worker still gets A's new jobs (claimed from the record store);
    Redis restarts empty: it is reconciled and used again."""
    runs: list[str] = []
    ran = trio.Event()

    async def handler(job: JobInfo) -> None:
        runs.append(job.id)
        ran.set()

    async with cluster(schema, "redis", redis_url=private_redis.url) as (a, b):
        worker = Worker(b, {"t": handler}, stream_idle_timeout=1.0)
        async with trio.open_nursery() as nursery:
            await nursery.start(worker.run)
            async with Client.connect(a) as client_a, Client.connect(b) as client_b:

                async def routes() -> set[str]:
                    return {(await c.stats()).queue_route for c in (client_a, client_b)}

                async def on_redis() -> bool:
                    return await routes() == {"redis"}

                await wait_for(on_redis)
                first = await client_a.enqueue("t", {"n": 1})
                with trio.fail_after(5):
                    await ran.wait()
                private_redis.kill()
                killed = trio.current_time()
                # Enqueues keep being accepted (committed to PostgreSQL)...
                during = [await client_a.enqueue("t", {"n": i}) for i in range(2, 12)]

                async def all_ran() -> bool:
                    return set(during) <= set(runs)

                # ...and reach B's worker while Redis is still dead.
                await wait_for(all_ran, within=20)
                took = trio.current_time() - killed
                stats = await client_b.stats()
                assert stats.queue_route == "postgres", stats
                assert "claimed from the record store" in stats.route_reason
                private_redis.restart()
                back = trio.current_time()
                await wait_for(on_redis, within=20)
                healthy = trio.current_time() - back
                after = [await client_a.enqueue("t", {"n": i}) for i in range(12, 20)]

                async def rest_ran() -> bool:
                    return set(after) <= set(runs)

                await wait_for(rest_ran, within=10)
                print(
                    f"\nRedis killed: 10 new jobs enqueued on A ran on B within {took:.2f} s "
                    f"(through PostgreSQL); Redis back, used again after {healthy:.2f} s"
                )
            worker.stop()
    assert sorted(runs) == sorted([first, *during, *after])  # each ran once


async def test_failing_handlers_retry_and_no_ack_is_refused(schema: str, kind: str) -> None:
    """A job that fails at once is retried (delay 0) through the tier and completes,
    and the record store accepts every ack (no nack is refused as stale)."""
    attempts: dict[str, int] = {}

    async def flaky(job: JobInfo) -> None:
        attempts[job.id] = attempts.get(job.id, 0) + 1
        if attempts[job.id] == 1:
            raise RuntimeError("first attempt fails")

    async with cluster(schema, kind) as (a, b):
        worker = Worker(b, {"flaky": flaky}, concurrency=4, stream_idle_timeout=1.0)
        async with trio.open_nursery() as nursery:
            await nursery.start(worker.run)
            async with Client.connect(a) as client:
                ids = [await client.enqueue("flaky", {"i": i}, delay=0) for i in range(40)]

                async def all_done() -> bool:
                    return rows(schema).get("completed", 0) == len(ids)

                await wait_for(all_done, within=20)
            stats = worker.statistics()
            worker.stop()
    assert stats.acks_rejected == 0, stats
    assert sorted(attempts) == sorted(ids) and set(attempts.values()) == {2}


async def test_cluster_metrics_show_the_tier_and_its_operations(schema: str, kind: str) -> None:
    from .test_metrics import free_port, scrape

    port = free_port()
    async with cluster(schema, kind, n=1, metrics_addr=f"127.0.0.1:{port}") as (a,):
        done = trio.Event()

        async def handler(job: JobInfo) -> None:
            done.set()

        worker = Worker(a, {"m": handler}, stream_idle_timeout=1.0)
        async with trio.open_nursery() as nursery:
            await nursery.start(worker.run)
            async with Client.connect(a) as client:
                await client.enqueue("m", {})
                with trio.fail_after(10):
                    await done.wait()
            tier = "postgres" if kind == "postgres" else kind
            route = ("stackduck_queue_route", (("tier", tier),))
            with trio.fail_after(5):  # the gauges follow within a refresh (once a second)
                while (samples := await scrape(port)).get(route) != 1:  # noqa: ASYNC110
                    await trio.sleep(0.1)
            worker.stop()
    ops = samples.get(("stackduck_tier_op_seconds_count", (("outcome", "ok"), ("tier", tier))))
    assert ops is not None and ops > 0, sorted(k for k in samples if "tier" in k[0])
    assert samples[("stackduck_jobs_started_total", (("job_type", "m"),))] == 1


def test_settles_waiting_for_a_lagging_tier_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    from stackduck_core import BackendHealth, BackendRole, QueueCore
    from stackduck_trio import _shared
    from stackduck_trio._broker import new_id
    from stackduck_trio._clock import WallClock
    from stackduck_trio._store import GroupCommitter, MemoryBackend

    monkeypatch.setattr(_shared, "MAX_PENDING_SETTLES", 3)
    clock = WallClock()
    backend = MemoryBackend()
    health = BackendHealth("memory", BackendRole.RECORD_STORE)
    committer = GroupCommitter(backend, health, now=clock.now, clock_deadline=clock.trio_deadline)
    tier = MemoryTier()
    broker = _shared.SharedBroker(
        core=QueueCore(new_id=new_id),
        committer=committer,
        clock=clock,
        tier=tier,
        tier_health=BackendHealth("memory", BackendRole.QUEUE_TIER),
        owner="o",
        claim_seconds=10.0,
    )
    for n in range(5):
        broker._settle(tier, f"job-{n}", "token", None)
    assert [job_id for job_id, _, _ in broker._settles[tier]] == ["job-2", "job-3", "job-4"]
    assert broker.dropped_settles == 2


class _FlakyLimitsTier(MemoryTier):
    """A MemoryTier whose set_limit fails while ``down`` (a network blip)."""

    down = False

    async def set_limit(self, job_type: str, limit: TypeLimit | None) -> None:
        if self.down:
            raise TierUnavailable("network blip")
        await super().set_limit(job_type, limit)


async def test_a_limit_change_that_missed_the_tier_reaches_it_later(
    autojump_clock: trio.abc.Clock,
) -> None:
    clock = TrioWallClock(epoch=1_800_000_000.0)
    backend = MemoryBackend()
    committer = GroupCommitter(
        backend,
        BackendHealth("memory", BackendRole.RECORD_STORE),
        now=clock.now,
        clock_deadline=clock.trio_deadline,
    )
    tier = _FlakyLimitsTier()
    broker = SharedBroker(
        core=QueueCore(new_id=new_id, policy=LifecyclePolicy(), default_lease=30.0),
        committer=committer,
        clock=clock,
        tier=tier,
        tier_health=BackendHealth("memory", BackendRole.QUEUE_TIER),
        owner="A",
        claim_seconds=30.0,
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(committer.run)
        await nursery.start(broker.run_tasks)
        await broker.set_limit("t", TypeLimit(max_running=1))
        await broker.set_limit("u", TypeLimit(max_running=2))
        tier.down = True
        await broker.set_limit("t", None)  # stored; the tier missed it
        await broker.set_limit("u", TypeLimit(max_running=5))
        assert await tier.limited_types() == {"t", "u"}
        tier.down = False
        await trio.sleep(30)  # the renew loop retries
        assert backend.load_limits() == {"u": TypeLimit(max_running=5)}
        assert await tier.limited_types() == {"u"}
        # a reconcile also replaces the whole set (limits set elsewhere, or cleared)
        await tier.set_limit("stale", TypeLimit(max_running=1))
        await broker.reconcile()
        assert await tier.limited_types() == {"u"}
        nursery.cancel_scope.cancel()
