"""Rate and concurrency limits and retention, end to end: one server and clusters."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

import pytest
import trio

from stackduck_trio import Client, InvalidArgument, JobInfo, JobRequest, NotFound, Worker
from stackduck_trio._config import ConfigError, load_config
from stackduck_trio.testing import open_test_server

from .test_shared import cluster, kind, schema  # noqa: F401  (fixtures)


class Running:
    """A handler that records how many of its jobs run at once, and when each starts."""

    def __init__(self, hold: float = 0.05) -> None:
        self.hold = hold
        self.now = 0
        self.peak = 0
        self.starts: list[float] = []
        self.done = 0

    async def __call__(self, job: JobInfo) -> None:
        self.starts.append(trio.current_time())
        self.now += 1
        self.peak = max(self.peak, self.now)
        try:
            await trio.sleep(self.hold)
        finally:
            self.now -= 1
            self.done += 1


async def wait_until(predicate: Callable[[], bool | Awaitable[bool]], within: float = 15) -> None:
    with trio.fail_after(within):
        while True:
            result = predicate()
            if not isinstance(result, bool):
                result = await result
            if result:
                return
            await trio.sleep(0.02)


async def test_max_running_holds_jobs_back_and_stats_show_it() -> None:
    async with open_test_server() as (port, _config):
        address = f"127.0.0.1:{port}"
        handler = Running()
        async with Client.connect(address) as client:
            limits = await client.set_limits("crunch", max_running=2)
            assert (limits.rate, limits.burst, limits.max_running) == (0.0, 0, 2)
            ids = [await client.enqueue("crunch", {"n": n}) for n in range(12)]
            worker = Worker(address, {"crunch": handler}, concurrency=10)
            async with trio.open_nursery() as nursery:
                await nursery.start(worker.run)
                await wait_until(lambda: handler.done == 12)
                worker.stop()
            assert handler.peak == 2  # 10 slots, never more than 2 at once
            stats = (await client.stats()).of("crunch")
            assert stats is not None
            assert (stats.max_running, stats.rate_limit, stats.completed) == (2, 0.0, 12)
            assert stats.throttled > 0
            for job_id in ids:
                assert (await client.get(job_id)).status == "completed"


async def test_rate_limit_spaces_starts_and_jobs_wait_instead_of_failing() -> None:
    async with open_test_server() as (port, _config):
        address = f"127.0.0.1:{port}"
        handler = Running(hold=0)
        async with Client.connect(address) as client:
            await client.set_limits("mail", rate=20, burst=2)
            for n in range(8):
                await client.enqueue("mail", {"n": n})
            worker = Worker(address, {"mail": handler}, concurrency=8)
            async with trio.open_nursery() as nursery:
                await nursery.start(worker.run)
                await wait_until(lambda: handler.done == 8)
                worker.stop()
            stats = (await client.stats()).of("mail")
            assert stats is not None
            assert (stats.rate_limit, stats.rate_burst, stats.failed) == (20.0, 2, 0)
        # 2 at once, then one every 50 ms: the 8th starts >= 300 ms after the first
        # (a correctness bound of the limit, with slack for scheduling: no upper bound)
        span = handler.starts[-1] - handler.starts[0]
        assert span >= 0.3 * 0.95, handler.starts
        gaps = [b - a for a, b in zip(handler.starts[2:], handler.starts[3:], strict=False)]
        assert min(gaps) >= 0.05 * 0.8, gaps


async def test_limits_can_be_changed_and_cleared_at_run_time() -> None:
    async with open_test_server() as (port, _config):
        address = f"127.0.0.1:{port}"
        handler = Running(hold=0)
        async with Client.connect(address) as client:
            await client.set_limits("slow", rate=0.001)  # one now, the next in 1000 s
            for n in range(5):
                await client.enqueue("slow", {"n": n})
            worker = Worker(address, {"slow": handler}, concurrency=5)
            async with trio.open_nursery() as nursery:
                await nursery.start(worker.run)
                await wait_until(lambda: handler.done == 1)
                await trio.sleep(0.2)
                assert handler.done == 1  # held back, waiting (not failed)
                cleared = await client.set_limits("slow")  # no limits: they all go
                assert (cleared.rate, cleared.max_running) == (0.0, 0)
                await wait_until(lambda: handler.done == 5)
                worker.stop()
            assert (await client.stats()).of("slow").rate_limit == 0.0  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rate": -1.0}, "rate must be"),
        ({"rate": float("nan")}, "rate must be"),
        ({"rate": 2e6}, "rate must be"),
        ({"burst": 5}, "a burst needs a rate"),
        ({"rate": 1.0, "burst": -1}, "burst must be"),
        ({"max_running": -3}, "max_running must be"),
    ],
)
async def test_bad_limits_are_invalid_argument(kwargs: dict[str, float], message: str) -> None:
    async with open_test_server() as (port, _config):
        async with Client.connect(f"127.0.0.1:{port}") as client:
            with pytest.raises(InvalidArgument, match=message):
                await client.set_limits("t", **kwargs)  # type: ignore[arg-type]
            with pytest.raises(InvalidArgument, match="job_type"):
                await client.set_limits("bad type", max_running=1)


async def test_configured_limits_apply_at_start_and_stored_ones_survive(tmp_path: object) -> None:
    async with open_test_server(tmp_path, limits="a:rate=5,burst=10;b:max_running=3") as (
        port,
        _config,
    ):
        async with Client.connect(f"127.0.0.1:{port}") as client:
            await client.set_limits("c", max_running=7)
            types = {t.job_type: t for t in (await client.stats()).types}
            assert (types["a"].rate_limit, types["a"].rate_burst) == (5.0, 10)
            assert types["b"].max_running == 3
    async with open_test_server(tmp_path) as (port, _config):  # restarted, no setting
        async with Client.connect(f"127.0.0.1:{port}") as client:
            types = {t.job_type: t for t in (await client.stats()).types}
            assert types["a"].rate_limit == 5.0
            assert types["b"].max_running == 3
            assert types["c"].max_running == 7


def test_limits_and_retention_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match="STACKDUCK_LIMITS"):
        load_config(environ={"STACKDUCK_LIMITS": "email:speed=3"})
    with pytest.raises(ConfigError, match="STACKDUCK_RETAIN_DEAD"):
        load_config(environ={"STACKDUCK_RETAIN_DEAD": "-1h"})
    config = load_config(
        environ={"STACKDUCK_RETAIN_COMPLETED": "30m", "STACKDUCK_RETAIN_DEAD": "0"}
    )
    assert (config.retain_completed, config.retain_dead) == (1800.0, 0.0)
    assert load_config(environ={}).retain_completed == 86_400.0


async def run_everywhere(
    client: Client, addresses: list[str], job_type: str, handler: Running, n: int, slots: int
) -> None:
    """Enqueue ``n`` jobs and run them with a worker of ``slots`` on every instance."""
    workers = [
        Worker(address, {job_type: handler}, concurrency=slots, stream_idle_timeout=1.0)
        for address in addresses
    ]
    async with trio.open_nursery() as nursery:
        for worker in workers:
            await nursery.start(worker.run)
        await client.enqueue_many(
            [JobRequest(job_type=job_type, payload={"n": i}) for i in range(n)]
        )
        await wait_until(lambda: handler.done == n, within=30)
        for worker in workers:
            worker.stop()


async def test_cluster_wide_max_running(schema: str, kind: str) -> None:  # noqa: F811
    """Workers on both instances; at most 3 of the type run at once across them."""
    handler = Running(hold=0.03)
    async with cluster(schema, kind) as addresses:
        async with Client.connect(addresses[0]) as client:
            await client.set_limits("crunch", max_running=3)
            await run_everywhere(client, addresses, "crunch", handler, n=40, slots=4)
            stats = (await client.stats()).of("crunch")
            assert stats is not None and stats.max_running == 3
        async with Client.connect(addresses[1]) as client_b:  # set on A, seen on B
            stats_b = (await client_b.stats()).of("crunch")
            assert stats_b is not None and stats_b.max_running == 3
    assert handler.peak <= 3
    print(f"\n{kind}: peak {handler.peak} running of 3 allowed")


async def test_cluster_wide_rate(schema: str, kind: str) -> None:  # noqa: F811
    """20 jobs/s, burst 1, over two instances: 10 starts span >= 450 ms."""
    handler = Running(hold=0)
    async with cluster(schema, kind) as addresses:
        async with Client.connect(addresses[0]) as client:
            await client.set_limits("mail", rate=20)
            await run_everywhere(client, addresses, "mail", handler, n=10, slots=5)
    span = handler.starts[-1] - handler.starts[0]
    assert span >= 0.45 * 0.95, handler.starts
    print(f"\n{kind}: 10 starts over {span * 1000:.0f} ms at 20/s")


# -- retention --------------------------------------------------------------------------------


async def check_retention(address: str) -> None:
    """Against a server keeping finished and dead jobs for 1 s."""

    async def handler(job: JobInfo) -> None:
        if job.data.get("fail"):
            raise RuntimeError("boom")

    async with Client.connect(address) as client:
        done = await client.enqueue("t", {"n": 1})
        dead = await client.enqueue("t", {"fail": True}, max_retries=0)
        kept = await client.enqueue("later", {"n": 2}, scheduled_at=time.time() + 3600)
        worker = Worker(address, {"t": handler}, stream_idle_timeout=1.0)
        async with trio.open_nursery() as nursery:
            await nursery.start(worker.run)

            async def finished() -> bool:
                return (await client.get(done)).status == "completed" and (
                    await client.get(dead)
                ).status == "failed"

            await wait_until(finished)
            worker.stop()
        assert [j.id for j in await client.dead_jobs()] == [dead]

        async def gone() -> bool:
            for job_id in (done, dead):
                try:
                    await client.get(job_id)
                    return False
                except NotFound:
                    pass
            return True

        await wait_until(gone, within=10)
        assert await client.dead_jobs() == []
        assert (await client.get(kept)).status == "scheduled"  # waiting jobs are never pruned
        assert (await client.stats()).dead == 0


async def test_retention_deletes_old_finished_and_dead_jobs(tmp_path: object) -> None:
    async with open_test_server(tmp_path, retain_completed=1.0, retain_dead=1.0) as (port, _):
        await check_retention(f"127.0.0.1:{port}")


async def test_retention_in_a_cluster(schema: str, kind: str) -> None:  # noqa: F811
    async with cluster(schema, kind, retain_completed=1.0, retain_dead=1.0) as (a, _b):
        await check_retention(a)
