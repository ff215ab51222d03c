"""End-to-end tests of the trio client (stackduck_trio._client) against real servers.

Servers run in the test's trio loop (open_test_server) with a short heartbeat interval;
dead and silent servers are simulated with a closed port and a listener that never answers.
Every test is bounded by trio.fail_after.
"""

from __future__ import annotations

import datetime
import json
import shutil
import socket
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from stackduck_trio import (
    Client,
    ClientError,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    JobInfo,
    NotFound,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from stackduck_trio._client import (
    Ack,
    ItemResult,
    JobRequest,
    encode_payload,
    encode_time,
    error_for_code,
    parse_address,
)
from stackduck_trio.testing import open_test_server

HEARTBEAT = 0.1


@pytest.fixture
async def address() -> AsyncIterator[str]:
    async with open_test_server(heartbeat_interval=HEARTBEAT, grace_period=0.5) as (port, _):
        yield f"127.0.0.1:{port}"


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (connections are refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


# ---------------------------------------------------------------------------------------------
# Pure helpers
# ---------------------------------------------------------------------------------------------


def test_encode_payload() -> None:
    assert encode_payload(None) == ""
    assert encode_payload('{"a": 1}') == '{"a": 1}'  # str is JSON text already
    assert encode_payload(b"[1,2]") == "[1,2]"
    assert json.loads(encode_payload({"é": [1, 2.5, None]})) == {"é": [1, 2.5, None]}
    with pytest.raises(ValueError):
        encode_payload({"x": float("nan")})


def test_encode_time() -> None:
    utc = datetime.UTC
    assert encode_time(None) == ""
    assert encode_time(1_800_000_000) == "1800000000"
    assert encode_time(1_800_000_000.25) == "1800000000.25"
    assert encode_time(datetime.datetime(2030, 1, 2, 3, 4, 5, tzinfo=utc)) == (
        "2030-01-02T03:04:05+00:00"
    )
    assert encode_time("2030-01-02T03:04:05Z") == "2030-01-02T03:04:05Z"
    with pytest.raises(ValueError, match="timezone-aware"):
        encode_time(datetime.datetime(2030, 1, 2))
    with pytest.raises(ValueError):
        encode_time(float("inf"))


def test_parse_address() -> None:
    assert parse_address("127.0.0.1:50051") == ("127.0.0.1", 50051)
    assert parse_address("[::1]:7") == ("::1", 7)
    for bad in ("localhost", ":50051", "host:http", "host:0", "host:70000"):
        with pytest.raises(ValueError):
            parse_address(bad)


def test_error_classes_map_status_codes() -> None:
    for code, cls, name in [
        (3, InvalidArgument, "INVALID_ARGUMENT"),
        (5, NotFound, "NOT_FOUND"),
        (8, ResourceExhausted, "RESOURCE_EXHAUSTED"),
        (9, FailedPrecondition, "FAILED_PRECONDITION"),
        (14, Unavailable, "UNAVAILABLE"),
        (16, Unauthenticated, "UNAUTHENTICATED"),
        (4, DeadlineExceeded, "DEADLINE_EXCEEDED"),
    ]:
        error = error_for_code(code, "why")
        assert type(error) is cls
        assert isinstance(error, ClientError)
        assert (error.code, error.status, error.message) == (code, name, "why")
        assert str(error) == f"{name}: why"
    assert error_for_code(99, "odd").status == "UNKNOWN"
    assert ItemResult("j", 9, "stale", "").code_name == "FAILED_PRECONDITION"
    assert isinstance(ItemResult("j", 9, "stale", "").error(), FailedPrecondition)
    assert ItemResult("j", 0, "", "queued").error() is None


# ---------------------------------------------------------------------------------------------
# Producers
# ---------------------------------------------------------------------------------------------


async def test_enqueue_and_get_defaults(address: str) -> None:
    with trio.fail_after(10):
        async with Client.connect(address) as client:
            job_id = await client.enqueue("email", {"to": "ada@example.com"})
            job = await client.get(job_id)
    assert isinstance(job, JobInfo)
    assert job.id == job_id
    assert (job.job_type, job.status, job.priority, job.max_retries, job.delay) == (
        "email",
        "queued",
        2,
        2,
        30,
    )
    assert job.data == {"to": "ada@example.com"}
    assert isinstance(job.created_at, float)
    assert job.started_at is None and job.completed_at is None
    assert job.lease_id is None and job.worker_id is None and job.lease_expires_at is None
    assert job.to_dict()["id"] == job_id


async def test_enqueue_options_and_schedule(address: str) -> None:
    later = datetime.datetime.now(datetime.UTC) + datetime.timedelta(hours=1)
    with trio.fail_after(10):
        async with Client.connect(address) as client:
            job_id = await client.enqueue(
                "report", None, priority=1, delay=0, max_retries=0, scheduled_at=later
            )
            job = await client.get(job_id)
            assert (job.priority, job.delay, job.max_retries, job.status) == (1, 0, 0, "scheduled")
            assert job.scheduled_at == pytest.approx(int(later.timestamp()), abs=1)
            assert job.data == {}
            # Unix seconds and RFC 3339 text are accepted too.
            soon = await client.get(await client.enqueue("x", scheduled_at=later.timestamp()))
            assert soon.status == "scheduled"
            text = await client.get(await client.enqueue("x", scheduled_at=later.isoformat()))
            assert text.status == "scheduled"


async def test_enqueue_many(address: str) -> None:
    with trio.fail_after(10):
        async with Client.connect(address) as client:
            results = await client.enqueue_many(
                [
                    {"job_type": "a", "payload": [1, 2]},
                    JobRequest(job_type="b", priority=3),
                    {"job_type": "a", "priority": 7},
                    {"job_type": "a", "payload": "not json"},
                ]
            )
            assert [r.ok for r in results] == [True, True, False, False]
            assert [r.code_name for r in results] == [
                "OK",
                "OK",
                "INVALID_ARGUMENT",
                "INVALID_ARGUMENT",
            ]
            assert "priority" in results[2].message
            assert results[0].status == "queued" and results[0].job_id
            assert (await client.get(results[1].job_id)).priority == 3
            assert (await client.get(results[0].job_id)).data == [1, 2]


async def test_status_errors_are_mapped(address: str) -> None:
    with trio.fail_after(10):
        async with Client.connect(address) as client:
            with pytest.raises(NotFound) as not_found:
                await client.get("no-such-job")
            assert not_found.value.status == "NOT_FOUND"
            assert "no-such-job" in not_found.value.message
            with pytest.raises(InvalidArgument, match="priority"):
                await client.enqueue("email", priority=0)
            with pytest.raises(InvalidArgument, match="JSON"):
                await client.enqueue("email", "{broken")
            with pytest.raises(InvalidArgument):
                await client.enqueue("", {})
            job_id = await client.enqueue("email")
            with pytest.raises(FailedPrecondition):
                await client.complete(job_id, "not-the-lease")  # not running
            # The client stays usable after errors.
            assert (await client.get(job_id)).status == "queued"


async def test_error_raised_in_block_is_not_wrapped(address: str) -> None:
    """The client's nursery must not turn the caller's exception into an ExceptionGroup."""
    with trio.fail_after(10):
        with pytest.raises(NotFound):
            async with Client.connect(address) as client:
                await client.get("missing")
        with pytest.raises(KeyError):
            async with Client.connect(address):
                raise KeyError("mine")


async def test_resource_exhausted() -> None:
    with trio.fail_after(10):
        async with open_test_server(max_payload_bytes=64) as (port, _):
            async with Client.connect(f"127.0.0.1:{port}") as client:
                with pytest.raises(ResourceExhausted, match="payload"):
                    await client.enqueue("big", {"blob": "x" * 100})


async def test_bearer_token() -> None:
    with trio.fail_after(10):
        async with open_test_server(tokens=("s3cret",)) as (port, _):
            address = f"127.0.0.1:{port}"
            async with Client.connect(address) as client:
                with pytest.raises(Unauthenticated, match="authorization"):
                    await client.stats()
            async with Client.connect(address, token="wrong") as client:
                with pytest.raises(Unauthenticated):
                    await client.enqueue("email")
            async with Client.connect(address, token="s3cret") as client:
                assert await client.enqueue("email")


async def test_cancel(address: str) -> None:
    with trio.fail_after(10):
        async with Client.connect(address) as client:
            job_id = await client.enqueue("email")
            cancelled = await client.cancel(job_id)
            assert cancelled.status == "cancelled"
            assert (await client.get(job_id)).status == "cancelled"
            with pytest.raises(FailedPrecondition):
                await client.cancel(job_id)
            with pytest.raises(NotFound):
                await client.cancel("nope")


# ---------------------------------------------------------------------------------------------
# Administration
# ---------------------------------------------------------------------------------------------


async def test_stats_pause_resume(address: str) -> None:
    with trio.fail_after(10):
        async with Client.connect(address) as client:
            await client.enqueue_many(
                [{"job_type": "img", "priority": p} for p in (1, 2, 2, 3)] + [{"job_type": "mail"}]
            )
            await client.pause("img")
            stats = await client.stats()
            img = stats.of("img")
            assert img is not None
            assert (img.queued_p1, img.queued_p2, img.queued_p3, img.queued) == (1, 2, 1, 4)
            assert img.paused
            assert stats.of("nothing") is None
            assert {b.name for b in stats.backends} == {"record_store", "queue_tier"}
            assert stats.to_dict()["types"][0]["job_type"] == "img"
            # Paused: a stream gets nothing, resume delivers.
            async with client.consume(["img"], prefetch=1) as jobs:
                # The stream's request is sent; the server attaches it a moment later.
                while (stats := await client.stats()).workers != 1:  # noqa: ASYNC110
                    await trio.sleep(0.01)
                assert stats.of("img").workers == 1  # type: ignore[union-attr]
                with trio.move_on_after(3 * HEARTBEAT) as idle:
                    await jobs.__anext__()
                assert idle.cancelled_caught
                await client.resume("img")
                job = await jobs.__anext__()
                assert job.priority == 1  # priority order
            assert not (await client.stats()).of("img").paused  # type: ignore[union-attr]
            with pytest.raises(InvalidArgument):
                await client.pause("")


async def _dead_letter(client: Client, job_type: str, count: int) -> list[str]:
    """Enqueue `count` jobs without retries and fail each once: they become dead."""
    results = await client.enqueue_many(
        [{"job_type": job_type, "max_retries": 0, "payload": {"n": i}} for i in range(count)]
    )
    ids = [r.job_id for r in results]
    async with client.consume([job_type], prefetch=count) as jobs:
        for _ in range(count):
            job = await jobs.__anext__()
            assert await client.fail(job.id, job.lease_id, "boom") == "failed"
    return ids


async def test_dead_letter_queue(address: str) -> None:
    with trio.fail_after(10):
        async with Client.connect(address) as client:
            ids = await _dead_letter(client, "dlq", 3)
            other = await _dead_letter(client, "other", 1)
            dead = await client.dead_jobs("dlq")
            assert [j.id for j in dead] == ids  # in dead-letter order
            assert all(j.status == "failed" and j.error_message == "boom" for j in dead)
            assert len(await client.dead_jobs()) == 4
            assert len(await client.dead_jobs(limit=2)) == 2
            assert len(await client.dead_jobs(limit=None, page_size=1)) == 4
            page = await client.list_dead_jobs("dlq", limit=2)
            assert [j.id for j in page.jobs] == ids[:2] and page.next_page_token
            page = await client.list_dead_jobs("dlq", limit=2, page_token=page.next_page_token)
            assert [j.id for j in page.jobs] == ids[2:] and page.next_page_token == ""
            with pytest.raises(InvalidArgument):
                await client.list_dead_jobs(limit=5000)

            requeued = await client.requeue_dead([ids[0], "unknown"])
            assert requeued.count == 1
            assert [r.code_name for r in requeued.results] == ["OK", "NOT_FOUND"]
            assert (await client.get(ids[0])).status == "queued"
            purged = await client.purge_dead(job_type="dlq")
            assert purged.count == 2
            with pytest.raises(NotFound):
                await client.get(ids[1])
            assert (await client.requeue_dead(job_type="*")).count == 1
            assert (await client.get(other[0])).status == "queued"
            with pytest.raises(InvalidArgument):
                await client.requeue_dead()  # neither ids nor type
            with pytest.raises(InvalidArgument):
                await client.purge_dead(["x"], job_type="dlq")  # both


# ---------------------------------------------------------------------------------------------
# Workers' calls
# ---------------------------------------------------------------------------------------------


async def test_consume_complete_fail_and_fencing(address: str) -> None:
    with trio.fail_after(10):
        async with Client.connect(address) as client:
            first = await client.enqueue("work", {"n": 1}, delay=0)
            second = await client.enqueue("work", {"n": 2})
            async with client.consume(["work"], worker_id="w-1", prefetch=2) as jobs:
                a = await jobs.__anext__()
                b = await jobs.__anext__()
                assert {a.id, b.id} == {first, second}
                assert a.status == "running" and a.attempt == 1 and a.lease_id
                assert a.worker_id == "w-1" and a.lease_expires_at is not None
                job1, job2 = (a, b) if a.id == first else (b, a)
                with pytest.raises(FailedPrecondition):
                    await client.complete(job1.id, "stale-lease")
                # Retries left (delay 0): rescheduled, delivered again with a new lease.
                assert await client.fail(job1.id, job1.lease_id, "flaky") in ("queued", "scheduled")
                again = await jobs.__anext__()
                assert again.id == first and again.attempt == 2 and again.retry_count == 1
                assert again.lease_id != job1.lease_id
                with pytest.raises(FailedPrecondition):  # the old attempt is fenced off
                    await client.complete(job1.id, job1.lease_id)
                await client.complete(again.id, again.lease_id)
                await client.complete(job2.id, job2.lease_id)
            assert (await client.get(first)).status == "completed"
            assert (await client.get(second)).completed_at is not None


async def test_ack_many_extend_lease_and_dequeue(address: str) -> None:
    with trio.fail_after(10):
        async with Client.connect(address) as client:
            assert await client.dequeue("pull") is None  # nothing ready
            ids = [r.job_id for r in await client.enqueue_many([{"job_type": "pull"}] * 3)]
            jobs = [await client.dequeue("pull", worker_id="puller", lease_seconds=5)]
            jobs += [await client.dequeue("pull") for _ in range(2)]
            assert all(j is not None and j.status == "running" for j in jobs)
            j0, j1, j2 = jobs  # type: ignore[misc]
            assert j0.worker_id == "puller"
            expires = await client.extend_lease(j0.id, j0.lease_id, 30)
            assert expires > j0.lease_expires_at + 20  # type: ignore[operator]
            with pytest.raises(FailedPrecondition):
                await client.extend_lease(j0.id, "stale", 30)
            results = await client.ack_many(
                [
                    Ack(j0.id, j0.lease_id),
                    Ack(j1.id, j1.lease_id, failed=True, error="nope"),
                    Ack(j2.id, "stale"),
                ]
            )
            assert [r.code_name for r in results] == ["OK", "OK", "FAILED_PRECONDITION"]
            assert (await client.get(j0.id)).status == "completed"
            assert (await client.get(j1.id)).error_message == "nope"
            assert sorted(ids) == sorted(j.id for j in jobs)


async def test_consume_skips_heartbeats_and_respects_prefetch(address: str) -> None:
    with trio.fail_after(10):
        async with Client.connect(address) as client:
            await client.enqueue_many([{"job_type": "pf", "payload": {"n": i}} for i in range(5)])
            async with client.consume(["pf"], prefetch=2) as jobs:
                got = [await jobs.__anext__(), await jobs.__anext__()]
                # No ack: the server must not send a third job, only heartbeats.
                with trio.move_on_after(5 * HEARTBEAT) as idle:
                    await jobs.__anext__()
                assert idle.cancelled_caught
                assert jobs.heartbeats >= 2
                assert (await client.stats()).of("pf").running == 2  # type: ignore[union-attr]
                await client.complete(got[0].id, got[0].lease_id)
                third = await jobs.__anext__()
                assert third.id not in {g.id for g in got}
            # Leaving the block resets the stream: its un-acked jobs are requeued at once.
            with trio.fail_after(2):
                while (await client.stats()).of("pf").running:  # type: ignore[union-attr]  # noqa: ASYNC110
                    await trio.sleep(0.01)
            assert (await client.get(third.id)).status == "queued"


async def test_consume_rejects_bad_request(address: str) -> None:
    with trio.fail_after(10):
        async with Client.connect(address) as client:
            with pytest.raises(InvalidArgument):
                async with client.consume([]) as jobs:
                    await jobs.__anext__()
            with pytest.raises(InvalidArgument, match="prefetch"):
                async for _ in client.consume(["x"], prefetch=0):
                    pass


async def test_many_concurrent_calls_share_one_connection(address: str) -> None:
    with trio.fail_after(10):
        async with Client.connect(address) as client:
            results: list[str] = []

            async def produce(n: int) -> None:
                results.append(await client.enqueue("fan", {"n": n}))

            async with trio.open_nursery() as nursery:
                for n in range(100):
                    nursery.start_soon(produce, n)
            assert len(set(results)) == 100
            assert client.connections == 1


async def test_tls(tmp_path: Path) -> None:
    openssl = shutil.which("openssl")
    # no skip: a CI machine without openssl must fail here, not pass silently
    assert openssl is not None, "the TLS tests need the openssl command"
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    await trio.run_process(
        [
            openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
            "-addext", "subjectAltName=IP:127.0.0.1",
            "-keyout", str(key), "-out", str(cert),
        ],
        capture_stdout=True,
        capture_stderr=True,
    )  # fmt: skip
    context = ssl.create_default_context(cafile=str(cert))
    with trio.fail_after(10):
        async with open_test_server(tls_cert=str(cert), tls_key=str(key)) as (port, _):
            async with Client.connect(f"127.0.0.1:{port}", tls=context) as client:
                job_id = await client.enqueue("secure", {"ok": True})
                assert (await client.get(job_id)).data == {"ok": True}
            # A client that does not trust the certificate cannot connect.
            with pytest.raises(Unavailable):
                async with Client.connect(f"127.0.0.1:{port}", tls=True):
                    pass


# ---------------------------------------------------------------------------------------------
# Dead and silent servers
# ---------------------------------------------------------------------------------------------


async def test_refused_connection_is_unavailable_at_once() -> None:
    address = f"127.0.0.1:{free_port()}"
    with trio.fail_after(5):
        start = trio.current_time()
        with pytest.raises(Unavailable, match="cannot connect"):
            async with Client.connect(address):
                pass  # pragma: no cover
        async with Client.connect(address, lazy=True) as client:
            with pytest.raises(Unavailable):
                await client.stats()
            with pytest.raises(Unavailable):
                async with client.consume(["x"]):
                    pass  # pragma: no cover
        assert trio.current_time() - start < 1.0


async def _silent_server(task_status: trio.TaskStatus[int]) -> None:
    """Accepts TCP connections, reads everything, answers nothing (a hung server)."""

    async def swallow(stream: trio.SocketStream) -> None:
        async with stream:
            while await stream.receive_some(65536):
                pass

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(swallow, listeners)


async def test_deadline_on_silent_server() -> None:
    async with trio.open_nursery() as nursery:
        port = await nursery.start(_silent_server)
        with trio.fail_after(5):
            async with Client.connect(
                f"127.0.0.1:{port}", timeout=0.3, probe_timeout=0.2, stream_idle_timeout=0.4
            ) as client:
                start = trio.current_time()
                with pytest.raises(DeadlineExceeded, match="GetStats"):
                    await client.stats()
                assert 0.3 <= trio.current_time() - start < 1.0
                # The PING probe found the server dead: the next call uses a new connection.
                await trio.sleep(0.3)
                with pytest.raises(DeadlineExceeded):
                    await client.get("x")
                assert client.connections == 2
                await trio.sleep(0.3)  # let that probe fail too
                # A job stream that hears nothing (no heartbeat) is declared dead.
                start = trio.current_time()
                with pytest.raises(Unavailable, match="no message"):
                    async with client.consume(["x"]) as jobs:
                        await jobs.__anext__()
                assert trio.current_time() - start < 1.0
        nursery.cancel_scope.cancel()


async def test_server_shutdown_ends_stream_and_calls() -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            shutdown = trio.Event()
            ready = trio.Event()
            stopped = trio.Event()
            port_box: list[int] = []

            async def run_server() -> None:
                async with open_test_server(heartbeat_interval=HEARTBEAT, grace_period=0.2) as (
                    port,
                    _,
                ):
                    port_box.append(port)
                    ready.set()
                    await shutdown.wait()
                stopped.set()

            nursery.start_soon(run_server)
            await ready.wait()
            async with Client.connect(f"127.0.0.1:{port_box[0]}") as client:
                async with client.consume(["x"]) as jobs:
                    shutdown.set()
                    start = trio.current_time()
                    with pytest.raises(Unavailable):
                        await jobs.__anext__()
                    assert trio.current_time() - start < 2.0
                await stopped.wait()
                with pytest.raises(Unavailable):  # the connection is gone, the port closed
                    await client.stats()
