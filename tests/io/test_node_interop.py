"""The Node.js client in examples/node against a real server, next to the Python client.

Jobs cross languages both ways: the Node producer enqueues, the Python ``Worker`` consumes
(every JSON payload must arrive intact); the Python client enqueues, the Node worker runs the
jobs, completes, retries and dead-letters them, extends a lease and stops gracefully on a
signal; the Python client checks the outcomes with ``GetJob`` and ``GetStats``. The server
requires a bearer token, so the Node client's ``authorization`` metadata is exercised too.

Needs ``node`` (>= 18) on PATH and ``examples/node/node_modules`` (``scripts/test`` runs
``npm ci`` there); without them the tests fail, they never skip.
"""

from __future__ import annotations

import contextlib
import json
import pathlib
import shutil
import signal
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import trio

from stackduck_trio import Client, JobInfo, Worker
from stackduck_trio.testing import ServerProcess

from .e2e_helpers import new_type

pytestmark = pytest.mark.slow

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
NODE_DIR = REPO_ROOT / "examples" / "node"
PRODUCER = NODE_DIR / "producer.js"
WORKER = NODE_DIR / "worker.js"
TOKEN = "node-interop-token"


@pytest.fixture(scope="module")
def node() -> str:
    """The node binary; fails (never skips) when Node or the example's packages are missing."""
    binary = shutil.which("node")
    if binary is None:
        pytest.fail("`node` is not on PATH: the Node.js interop tests need Node.js >= 18")
    for package in ("grpc-js", "proto-loader"):
        if not (NODE_DIR / "node_modules" / "@grpc" / package / "package.json").is_file():
            pytest.fail(
                f"examples/node/node_modules/@grpc/{package} is missing: run "
                "`npm ci --no-audit --no-fund` in examples/node (scripts/test does it)"
            )
    return binary


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    process = ServerProcess(
        tmp_path_factory.mktemp("node-interop"),
        "--heartbeat-interval",
        "0.5",
        "--grace-period",
        "1",
        env={"STACKDUCK_TOKENS": TOKEN},
    )
    try:
        yield process.start()
    finally:
        process.kill()


@contextlib.asynccontextmanager
async def connect(server: ServerProcess) -> AsyncIterator[Client]:
    async with Client.connect(server.address, token=TOKEN) as client:
        yield client


async def run_node(node: str, script: pathlib.Path, *args: str, stdin: bytes = b"") -> Any:
    """Run a Node example to completion (bounded by the caller's fail_after)."""
    return await trio.run_process(
        [node, str(script), *args],
        stdin=stdin,
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )


@contextlib.asynccontextmanager
async def node_worker(
    node: str, server: ServerProcess, tmp_path: pathlib.Path, *args: str
) -> AsyncIterator[trio.Process]:
    """The Node worker in the background (stdout/stderr in tmp_path); killed at the end."""
    with (tmp_path / "worker.out").open("wb") as out, (tmp_path / "worker.err").open("wb") as err:
        proc = await trio.lowlevel.open_process(
            [node, str(WORKER), "--addr", server.address, "--token", TOKEN, "--json", *args],
            stdout=out,
            stderr=err,
        )
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
        with trio.CancelScope(shield=True):
            await proc.wait()


def worker_output(tmp_path: pathlib.Path) -> tuple[list[dict[str, Any]], dict[str, int], str]:
    """The Node worker's handled jobs (stdout), its final counters and its stderr."""
    events = [json.loads(line) for line in (tmp_path / "worker.out").read_text().splitlines()]
    err = (tmp_path / "worker.err").read_text()
    stopped = [line for line in err.splitlines() if line.startswith("worker stopped: ")]
    counters = json.loads(stopped[-1].removeprefix("worker stopped: ")) if stopped else {}
    return events, counters, err


async def stop_node_worker(proc: trio.Process, signum: int, within: float = 5.0) -> None:
    proc.send_signal(signum)
    with trio.fail_after(within):
        await proc.wait()


async def wait_for_stats(client: Client, job_type: str, **expected: int) -> None:
    """Poll GetStats until the job type's counters are ``expected`` (fails at the caller's deadline)."""
    while True:
        stats = (await client.stats()).of(job_type)
        if stats is not None and all(getattr(stats, k) == v for k, v in expected.items()):
            return
        await trio.sleep(0.05)


def sample_payloads(count: int) -> list[Any]:
    """JSON values a producer may send: objects, arrays, scalars, Unicode, escapes."""
    shapes: list[Any] = [
        {"to": "ada@example.com", "name": "Ada Lovelace"},
        {"text": "ünïcødé 日本語 🦆 ∑", "rtl": "مرحبا"},
        {"escapes": 'quote " backslash \\ slash / newline \n tab \t nul \u0000 bell \u0007'},
        {"nested": {"list": [1, [2, [3, {"deep": True}]]], "empty": {}, "none": None}},
        {"ints": [0, -1, 2**31, -(2**53) + 1, 2**53 - 1], "floats": [0.1, 2.5, -1e-7, 1.5e300]},
        {"bools": [True, False], "null": None, "": "empty key"},
        [1, "two", {"three": 3}],
        "just a string",
        42,
        3.25,
        None,
        True,
        {},
        [],
        {"big": "x" * 20_000},
    ]
    payloads: list[Any] = []
    for i in range(count):
        shape = shapes[i % len(shapes)]
        # Objects get the index so every payload differs; other shapes are sent as they are.
        payloads.append({**shape, "i": i} if isinstance(shape, dict) else shape)
    return payloads


# -- Node producer -> Python worker ------------------------------------------------------------


async def test_node_producer_to_python_worker(node: str, server: ServerProcess) -> None:
    job_type = new_type("node-produced")
    payloads = sample_payloads(50)
    lines = "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in payloads)
    with trio.fail_after(15):
        done = await run_node(
            node,
            PRODUCER,
            *("--addr", server.address, "--token", TOKEN, "--type", job_type),
            *("--stdin", "--json", "--priority", "1"),
            stdin=lines.encode(),
        )
        assert done.returncode == 0, done.stderr.decode()
        results = [json.loads(line) for line in done.stdout.decode().splitlines()]
        assert [r["status"] for r in results] == ["queued"] * 50
        expected = {r["id"]: p for r, p in zip(results, payloads, strict=True)}
        assert len(expected) == 50

        received: dict[str, Any] = {}
        order: list[str] = []  # every delivery, duplicates included
        priorities: set[int] = set()
        all_in = trio.Event()

        # (An exception here would only fail the job: record, and assert afterwards.)
        async def handler(job: JobInfo) -> None:
            order.append(job.id)
            priorities.add(job.priority)
            received[job.id] = job.data
            if len(received) == len(expected):
                all_in.set()

        worker = Worker(server.address, {job_type: handler}, concurrency=1, token=TOKEN)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(worker.run)
            await all_in.wait()
            worker.stop()

        assert received == expected  # every payload intact, none extra
        # Each delivered once, in FIFO order (the producer enqueues one job at a time).
        assert order == [r["id"] for r in results]
        assert priorities == {1}
        async with connect(server) as client:
            await wait_for_stats(client, job_type, completed=50, queued_p1=0, running=0)


async def test_node_producer_options_and_errors(node: str, server: ServerProcess) -> None:
    job_type = new_type("node-options")
    common = ("--addr", server.address, "--type", job_type)
    with trio.fail_after(15):
        # Explicit zeros are sent (proto3 optional fields) and win over the server defaults;
        # an idempotency key makes the second enqueue a duplicate of the first.
        args = (*common, "--token", TOKEN, "--json", "--delay", "0", "--max-retries", "0")
        args += ("--priority", "3", "--idempotency-key", "order-42")
        first = await run_node(node, PRODUCER, *args, '{"order": 42}')
        again = await run_node(node, PRODUCER, *args, '{"order": 42}')
        assert first.returncode == 0 and again.returncode == 0, (first.stderr, again.stderr)
        one, two = json.loads(first.stdout), json.loads(again.stdout)
        assert (one["duplicate"], two["duplicate"], two["id"]) == (False, True, one["id"])

        batch = await run_node(node, PRODUCER, *common, "--token", TOKEN, "--batch", "--count", "3")
        assert batch.returncode == 0, batch.stderr.decode()
        batch_ids = batch.stdout.decode().split()

        async with connect(server) as client:
            job = await client.get(one["id"])
            assert (job.priority, job.delay, job.max_retries) == (3, 0, 0)
            assert job.data == {"order": 42}
            assert [(await client.get(i)).data for i in batch_ids] == [
                {"n": n, "to": f"user{n}@example.com"} for n in range(3)
            ]

        # Errors carry the status name and the server's message, readable (grpc-js leaves
        # some percent-escapes of grpc-message in place; the client module undoes them).
        no_token = await run_node(node, PRODUCER, *common, "{}")
        assert no_token.returncode == 1
        assert (
            "UNAUTHENTICATED: missing 'authorization: Bearer TOKEN' metadata"
            in no_token.stderr.decode()
        ), no_token.stderr
        bad = await run_node(node, PRODUCER, *common, "--token", TOKEN, "--priority", "7", "{}")
        assert bad.returncode == 1
        assert "INVALID_ARGUMENT: priority must be between 1 and 3, got 7" in bad.stderr.decode()


# -- Python producer -> Node worker ------------------------------------------------------------


async def test_python_producer_to_node_worker(
    node: str, server: ServerProcess, tmp_path: pathlib.Path
) -> None:
    job_type = new_type("node-worker")
    error = "boom 💥: bad, input / 100%"
    async with connect(server) as client:
        ok_ids = [
            await client.enqueue(job_type, {"i": i, "text": "ünïcødé 🦆", "sleep_ms": 20 * (i % 3)})
            for i in range(20)
        ]
        # Fails on every attempt: one retry (delay 0: due at once), then the dead letter.
        dead_id = await client.enqueue(job_type, {"fail": error}, max_retries=1, delay=0)
        # Fails on its first attempt only: retried, then completed.
        flaky_id = await client.enqueue(
            job_type, {"fail": "first try", "fail_attempts": 1}, max_retries=3, delay=0
        )
        # Runs longer than its 1 s lease: the Node worker must extend it.
        slow_id = await client.enqueue(job_type, {"sleep_ms": 1600, "slow": True})

        args = ("--types", job_type, "--concurrency", "4", "--lease-seconds", "1")
        with trio.fail_after(15):
            async with node_worker(node, server, tmp_path, *args) as proc:
                await wait_for_stats(
                    client, job_type, completed=22, dead=1, queued_p2=0, scheduled=0, running=0
                )
                await stop_node_worker(proc, signal.SIGTERM)
            events, counters, err = worker_output(tmp_path)
            assert proc.returncode == 0, err

            for job_id in ok_ids:
                job = await client.get(job_id)
                assert (job.status, job.attempt, job.retry_count) == ("completed", 1, 0), job
            dead = await client.get(dead_id)
            assert (dead.status, dead.attempt, dead.retry_count) == ("failed", 2, 1)
            assert dead.error_message == f"Error: {error}"
            assert [j.id for j in await client.dead_jobs(job_type)] == [dead_id]
            flaky = await client.get(flaky_id)
            assert (flaky.status, flaky.attempt, flaky.retry_count) == ("completed", 2, 1)
            slow = await client.get(slow_id)
            assert (slow.status, slow.attempt) == ("completed", 1)  # never redelivered

            await wait_for_stats(client, job_type, workers=0)  # the stream was closed
            stats = (await client.stats()).of(job_type)
            assert stats is not None
            assert (stats.completed, stats.failed, stats.retried) == (22, 1, 2)

        by_job: dict[str, list[str]] = {}
        for event in events:
            by_job.setdefault(event["id"], []).append(event["event"])
        assert by_job[dead_id] == ["failed", "failed"]
        assert by_job[flaky_id] == ["failed", "completed"]
        assert all(by_job[i] == ["completed"] for i in [*ok_ids, slow_id])
        assert {e["id"]: e["payload"] for e in events}[ok_ids[7]] == {
            "i": 7,
            "text": "ünïcødé 🦆",
            "sleep_ms": 20,
        }
        assert counters["acksSent"] == 25 and counters["acksRejected"] == 0, err
        assert counters["leaseExtensions"] >= 1 and counters["leasesLost"] == 0, err


async def test_node_worker_stops_gracefully(
    node: str, server: ServerProcess, tmp_path: pathlib.Path
) -> None:
    """SIGINT: the running job finishes and is acked, the buffered ones go back unstarted."""
    job_type = new_type("node-stop")
    async with connect(server) as client:
        ids = [await client.enqueue(job_type, {"sleep_ms": 700, "n": n}) for n in range(6)]
        with trio.fail_after(15):
            async with node_worker(
                node, server, tmp_path, "--types", job_type, "--concurrency", "1"
            ) as proc:
                # All six delivered (prefetch 32): one runs, five wait in the worker.
                await wait_for_stats(client, job_type, running=6)
                await stop_node_worker(proc, signal.SIGINT)
            events, counters, err = worker_output(tmp_path)
            assert proc.returncode == 0, err
            assert [e["id"] for e in events] == ids[:1]
            assert counters["released"] >= 5 and counters["abandoned"] == 0, err
            await wait_for_stats(client, job_type, completed=1, queued_p2=5, running=0, workers=0)
            for job_id in ids[1:]:
                job = await client.get(job_id)
                # Released: back in the queue, no attempt used, no failure recorded.
                assert (job.status, job.retry_count, job.error_message) == ("queued", 0, "")
