"""End-to-end tests of stackduck_trio._rpc against the official grpcio client.

The server runs in the test's trio loop; grpcio is a blocking client, so every grpcio call runs
in a worker thread (trio.to_thread.run_sync) with its own grpcio timeout, which bounds how long
a thread can outlive a failing test. A few wire-level cases (server-side deadline enforcement,
malformed requests) use a minimal raw h2 client, because grpcio enforces deadlines itself and
never sends malformed framing.

Timings that the design relies on are printed (`pytest -s` shows them).
"""

from __future__ import annotations

import errno
import logging
import os
import pathlib
import signal
import struct
import subprocess
import sys
import urllib.parse
from collections.abc import AsyncGenerator, Callable, Iterator
from contextlib import contextmanager
from functools import partial
from types import SimpleNamespace
from typing import Any, TypeVar

import grpc
import h2.config
import h2.connection
import h2.errors
import h2.events
import pytest
import trio
from purerpc.grpclib.connection import GRPCConnection  # type: ignore[import-untyped]
from purerpc.grpclib.status import Status  # type: ignore[import-untyped]

from stackduck_trio import Client, NotFound
from stackduck_trio._proto import health_pb2, health_pb2_grpc, stackduck_pb2, stackduck_pb2_grpc
from stackduck_trio._rpc import (
    CallContext,
    RpcError,
    RpcServer,
    RpcStatistics,
    StatusCode,
    _status_trailers,
    encode_grpc_message,
    method_table,
    serve_rpc,
    server_ssl_context,
)

HEALTH = health_pb2.DESCRIPTOR.services_by_name["Health"]
STACKDUCK = stackduck_pb2.DESCRIPTOR.services_by_name["StackDuckService"]
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
# grpcio would honour http_proxy variables even for 127.0.0.1.
CHANNEL_OPTIONS = [("grpc.enable_http_proxy", 0)]
CLIENT_TIMEOUT = 10.0  # every grpcio call: bounds the worker threads

T = TypeVar("T")


# ---------------------------------------------------------------------------------------------
# Test services
# ---------------------------------------------------------------------------------------------


class HealthImpl:
    """grpc.health.v1.Health whose behaviour is chosen by `request.service`."""

    def __init__(self) -> None:
        self.peers: list[str] = []
        self.metadata: list[tuple[tuple[str, str | bytes], ...]] = []
        self.check_calls = 0
        self.running = 0  # handlers currently inside their body
        self.ended: list[float] = []  # trio time at which each cancellable handler's finally ran
        self.handler_started = trio.Event()
        self.handler_ended = trio.Event()

    @contextmanager
    def _track(self) -> Iterator[None]:
        self.running += 1
        self.handler_started.set()
        try:
            yield
        finally:
            self.running -= 1
            self.ended.append(trio.current_time())
            self.handler_ended.set()

    async def Check(
        self, request: health_pb2.HealthCheckRequest, ctx: CallContext
    ) -> health_pb2.HealthCheckResponse:
        self.check_calls += 1
        self.peers.append(ctx.peer)
        self.metadata.append(ctx.metadata)
        service = request.service
        if service == "notfound":
            raise RpcError(StatusCode.NOT_FOUND, "no such job")
        if service == "unicode":
            raise RpcError(StatusCode.FAILED_PRECONDITION, "état: 100% ✓ <lease>")
        if service == "boom":
            raise ValueError("secret-detail-0xdeadbeef")
        if service == "group":
            async with trio.open_nursery() as nursery:

                async def fail() -> None:
                    raise RpcError(StatusCode.ABORTED, "raised inside a nursery")

                nursery.start_soon(fail)
        if service == "wrong-type":
            return health_pb2.HealthCheckRequest()  # type: ignore[return-value]
        if service == "slow":
            with self._track():
                await trio.sleep_forever()
        if service == "deadline":
            assert ctx.deadline is not None
        if service.startswith("say:"):
            raise RpcError(StatusCode.FAILED_PRECONDITION, service.removeprefix("say:"))
        return health_pb2.HealthCheckResponse(status=SERVING)

    async def Watch(
        self, request: health_pb2.HealthCheckRequest, ctx: CallContext
    ) -> AsyncGenerator[health_pb2.HealthCheckResponse, None]:
        kind, _, arg = request.service.partition(":")
        if kind == "count":
            for i in range(int(arg)):
                yield health_pb2.HealthCheckResponse(status=SERVING if i % 2 else NOT_SERVING)
        elif kind == "fail-after":
            for _ in range(int(arg)):
                yield health_pb2.HealthCheckResponse(status=SERVING)
            raise RpcError(StatusCode.ABORTED, "stream aborted")
        elif kind == "say":
            # Trailers after a message (purerpc's end_response path, not respond_status).
            yield health_pb2.HealthCheckResponse(status=SERVING)
            raise RpcError(StatusCode.ABORTED, arg)
        elif kind == "hold":
            # A worker's job stream: one message, then wait for work forever.
            with self._track():
                yield health_pb2.HealthCheckResponse(status=SERVING)
                await trio.sleep_forever()
        else:
            raise RpcError(StatusCode.INVALID_ARGUMENT, f"unknown watch mode {kind!r}")


class JobsImpl:
    """StackDuckService with two RPCs: everything else must answer UNIMPLEMENTED."""

    def __init__(self) -> None:
        self.sent = 0
        self.ended = trio.Event()

    async def GetJob(
        self, request: stackduck_pb2.GetJobRequest, ctx: CallContext
    ) -> stackduck_pb2.GetJobResponse:
        if request.job_id.startswith("say:"):
            raise RpcError(StatusCode.NOT_FOUND, request.job_id.removeprefix("say:"))
        raise RpcError(StatusCode.NOT_FOUND, "no such job")

    async def ConsumeJobs(
        self, request: stackduck_pb2.ConsumeJobsRequest, ctx: CallContext
    ) -> AsyncGenerator[stackduck_pb2.JobMessage, None]:
        # worker_id "<count>:<payload bytes>"; count 0 = forever. Large messages exercise
        # HTTP/2 flow control and the writer's high-water mark.
        count, size = map(int, request.worker_id.split(":"))
        try:
            while count == 0 or self.sent < count:
                job = stackduck_pb2.GrpcJob(id=str(self.sent), payload="x" * size)
                self.sent += 1
                yield stackduck_pb2.JobMessage(job=job, notification_type="NewJob")
        finally:
            self.ended.set()


async def start_server(
    nursery: trio.Nursery, impl: HealthImpl, jobs: JobsImpl | None = None, **kwargs: Any
) -> tuple[RpcServer, int]:
    ssl_context = kwargs.pop("ssl_context", None)
    methods = {**method_table(HEALTH, impl), **method_table(STACKDUCK, jobs or JobsImpl())}
    server = RpcServer(methods, **kwargs)
    port = await nursery.start(
        partial(server.serve, host="127.0.0.1", port=0, ssl_context=ssl_context)
    )
    return server, port


async def in_thread(fn: Callable[..., T], *args: Any) -> T:
    return await trio.to_thread.run_sync(fn, *args)


def call_status(fn: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
    """Run a grpcio call that must fail; return (code, details)."""
    try:
        fn()
    except grpc.RpcError as exc:
        return exc.code(), exc.details()
    raise AssertionError("call unexpectedly succeeded")


async def wait_until(predicate: Callable[[], bool], within: float = 5.0) -> float:
    """Poll until predicate() holds (failing after `within` s); return how long it took.

    Polling is the point: the server's statistics() are observed from outside, as an operator
    would, rather than through an event the server would have to provide for tests.
    """
    start = trio.current_time()
    with trio.fail_after(within):
        while not predicate():  # noqa: ASYNC110
            await trio.sleep(0.001)
    return trio.current_time() - start


def idle(server: RpcServer) -> bool:
    return server.statistics().active_calls == 0


@pytest.fixture
async def impl() -> HealthImpl:
    return HealthImpl()


@pytest.fixture
async def jobs() -> JobsImpl:
    return JobsImpl()


@pytest.fixture
async def served(nursery: trio.Nursery, impl: HealthImpl, jobs: JobsImpl) -> tuple[RpcServer, int]:
    return await start_server(nursery, impl, jobs)


@pytest.fixture
async def channel(served: tuple[RpcServer, int]) -> AsyncGenerator[grpc.Channel, None]:
    _, port = served
    ch = grpc.insecure_channel(f"127.0.0.1:{port}", options=CHANNEL_OPTIONS)
    try:
        yield ch
    finally:
        await in_thread(ch.close)


def check(channel: grpc.Channel, service: str, **kwargs: Any) -> Any:
    stub = health_pb2_grpc.HealthStub(channel)
    request = health_pb2.HealthCheckRequest(service=service)
    return stub.Check(request, timeout=kwargs.pop("timeout", CLIENT_TIMEOUT), **kwargs)


# ---------------------------------------------------------------------------------------------
# Unary calls and status mapping
# ---------------------------------------------------------------------------------------------


async def test_unary_ok(channel: grpc.Channel, impl: HealthImpl) -> None:
    response = await in_thread(partial(check, channel, "", metadata=[("x-token", "abc")]))
    assert response.status == SERVING
    assert impl.peers[0].startswith("ipv4:127.0.0.1:")
    assert ("x-token", "abc") in impl.metadata[0]


@pytest.mark.parametrize(
    ("service", "code", "details"),
    [
        ("notfound", grpc.StatusCode.NOT_FOUND, "no such job"),
        ("unicode", grpc.StatusCode.FAILED_PRECONDITION, "état: 100% ✓ <lease>"),
        ("group", grpc.StatusCode.ABORTED, "raised inside a nursery"),
    ],
)
async def test_rpc_error_maps_to_status(
    channel: grpc.Channel, service: str, code: grpc.StatusCode, details: str
) -> None:
    assert await in_thread(call_status, partial(check, channel, service)) == (code, details)


async def test_unexpected_exception_is_internal_without_leak(
    channel: grpc.Channel, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="stackduck.rpc")
    code, details = await in_thread(call_status, partial(check, channel, "boom"))
    assert (code, details) == (grpc.StatusCode.INTERNAL, "internal error")
    # The traceback is logged for operators, never sent to the client.
    [record] = [r for r in caplog.records if r.name == "stackduck.rpc"]
    assert record.exc_info is not None and "secret-detail-0xdeadbeef" in str(record.exc_info[1])
    # A handler returning the wrong message type is a bug too.
    code, details = await in_thread(call_status, partial(check, channel, "wrong-type"))
    assert (code, details) == (grpc.StatusCode.INTERNAL, "internal error")


async def test_unimplemented(channel: grpc.Channel) -> None:
    # An RPC of the service that the implementation does not define.
    stub = stackduck_pb2_grpc.StackDuckServiceStub(channel)
    code, details = await in_thread(
        call_status, lambda: stub.GetStats(stackduck_pb2.GetStatsRequest(), timeout=CLIENT_TIMEOUT)
    )
    assert code == grpc.StatusCode.UNIMPLEMENTED
    assert "GetStats" in details
    # The one it does define answers normally.
    code, details = await in_thread(
        call_status, lambda: stub.GetJob(stackduck_pb2.GetJobRequest(), timeout=CLIENT_TIMEOUT)
    )
    assert (code, details) == (grpc.StatusCode.NOT_FOUND, "no such job")
    # A path that is in no table at all.
    unknown = channel.unary_unary("/no.Such/Method")
    code, _ = await in_thread(call_status, lambda: unknown(b"", timeout=CLIENT_TIMEOUT))
    assert code == grpc.StatusCode.UNIMPLEMENTED


async def test_malformed_request_is_invalid_argument(channel: grpc.Channel) -> None:
    raw = channel.unary_unary("/grpc.health.v1.Health/Check")  # bytes in, bytes out
    code, details = await in_thread(
        call_status, lambda: raw(b"\xff\xff\xff", timeout=CLIENT_TIMEOUT)
    )
    assert (code, details) == (grpc.StatusCode.INVALID_ARGUMENT, "malformed request")


def test_method_table_rejects_wrong_handler_shapes() -> None:
    class SyncCheck:
        def Check(self, request: object, ctx: object) -> None: ...

    class CoroutineWatch:
        async def Watch(self, request: object, ctx: object) -> None: ...

    with pytest.raises(TypeError, match="async def"):
        method_table(HEALTH, SyncCheck())
    with pytest.raises(TypeError, match="async generator"):
        method_table(HEALTH, CoroutineWatch())


# ---------------------------------------------------------------------------------------------
# Streaming and cancellation
# ---------------------------------------------------------------------------------------------


async def test_streaming_delivers_messages(channel: grpc.Channel) -> None:
    stub = health_pb2_grpc.HealthStub(channel)

    def watch(service: str) -> list[int]:
        request = health_pb2.HealthCheckRequest(service=service)
        return [m.status for m in stub.Watch(request, timeout=CLIENT_TIMEOUT)]

    statuses = await in_thread(watch, "count:1000")
    assert statuses == [SERVING if i % 2 else NOT_SERVING for i in range(1000)]

    def watch_until_error() -> tuple[int, grpc.StatusCode, str]:
        received = 0
        try:
            for _ in stub.Watch(
                health_pb2.HealthCheckRequest(service="fail-after:2"), timeout=CLIENT_TIMEOUT
            ):
                received += 1
        except grpc.RpcError as exc:
            return received, exc.code(), exc.details()
        raise AssertionError("stream ended without error")

    assert await in_thread(watch_until_error) == (2, grpc.StatusCode.ABORTED, "stream aborted")


async def test_streaming_large_messages_under_flow_control(
    channel: grpc.Channel, jobs: JobsImpl
) -> None:
    # 48 MiB in 1 MiB messages: far beyond grpcio's initial windows, so the sender waits for
    # WINDOW_UPDATEs, splits messages into frames and hits the writer's high-water mark.
    stub = stackduck_pb2_grpc.StackDuckServiceStub(channel)

    def consume() -> list[tuple[str, int]]:
        request = stackduck_pb2.ConsumeJobsRequest(worker_id=f"48:{1024 * 1024}")
        return [(m.job.id, len(m.job.payload)) for m in stub.ConsumeJobs(request, timeout=30)]

    started = trio.current_time()
    received = await in_thread(consume)
    elapsed = trio.current_time() - started
    print(f"\n48 x 1 MiB streamed in {elapsed:.2f} s ({48 / elapsed:.0f} MiB/s)")
    assert received == [(str(i), 1024 * 1024) for i in range(48)]


async def test_cancel_while_blocked_on_flow_control(
    served: tuple[RpcServer, int], channel: grpc.Channel, jobs: JobsImpl
) -> None:
    # A worker that stops reading: the handler ends up waiting for window; the client's
    # cancel must still reach it.
    server, _ = served
    stub = stackduck_pb2_grpc.StackDuckServiceStub(channel)

    def open_flood() -> Any:
        request = stackduck_pb2.ConsumeJobsRequest(worker_id=f"0:{256 * 1024}")
        call = stub.ConsumeJobs(request, timeout=CLIENT_TIMEOUT)
        next(call)
        return call

    call = await in_thread(open_flood)
    # Wait until the handler stops making progress: it is parked on flow control.
    with trio.fail_after(5):
        while True:
            before = jobs.sent
            await trio.sleep(0.1)
            if jobs.sent == before:
                break
    assert not jobs.ended.is_set()
    await in_thread(call.cancel)
    with trio.fail_after(1):
        await jobs.ended.wait()
    await wait_until(lambda: idle(server), within=1)


async def test_server_shutdown_cancels_handlers(impl: HealthImpl) -> None:
    async with trio.open_nursery() as nursery:
        server, port = await start_server(nursery, impl)
        channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=CHANNEL_OPTIONS)
        try:
            stub = health_pb2_grpc.HealthStub(channel)
            call = stub.Watch(health_pb2.HealthCheckRequest(service="hold"), timeout=CLIENT_TIMEOUT)
            await in_thread(next, call)
            assert server.statistics() == RpcStatistics(connections=1, active_calls=1)
            nursery.cancel_scope.cancel()  # what the server's shutdown does
        finally:
            await in_thread(channel.close)
    assert impl.running == 0 and len(impl.ended) == 1
    assert server.statistics() == RpcStatistics(connections=0, active_calls=0)


async def test_client_cancel_cancels_handler(
    served: tuple[RpcServer, int], channel: grpc.Channel, impl: HealthImpl
) -> None:
    server, _ = served
    stub = health_pb2_grpc.HealthStub(channel)

    def open_stream() -> Any:
        call = stub.Watch(health_pb2.HealthCheckRequest(service="hold"), timeout=CLIENT_TIMEOUT)
        next(call)  # the handler is running and parked in sleep_forever
        return call

    call = await in_thread(open_stream)
    assert impl.running == 1
    cancelled_at = trio.current_time()
    await in_thread(call.cancel)
    with trio.fail_after(1):
        await impl.handler_ended.wait()
    elapsed = impl.ended[0] - cancelled_at
    print(f"\nhandler finally ran {elapsed * 1000:.1f} ms after call.cancel()")
    assert elapsed < 1.0
    assert impl.running == 0
    await wait_until(lambda: idle(server), within=1)
    # The connection is still fine for further calls.
    assert (await in_thread(check, channel, "")).status == SERVING


_KILLED_CLIENT = """
import sys, grpc
from stackduck_trio._proto import health_pb2, health_pb2_grpc
channel = grpc.insecure_channel(sys.argv[1], options=[("grpc.enable_http_proxy", 0)])
call = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service="hold"))
next(call)
print("ready", flush=True)
import time
time.sleep(60)
"""


async def test_killed_client_cancels_handler(
    nursery: trio.Nursery, served: tuple[RpcServer, int], impl: HealthImpl
) -> None:
    server, port = served
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    with trio.fail_after(15):
        # run_process under nursery.start owns the child: it is killed and reaped however
        # this test ends.
        proc: trio.Process = await nursery.start(
            partial(
                trio.run_process,
                [sys.executable, "-c", _KILLED_CLIENT, f"127.0.0.1:{port}"],
                stdout=subprocess.PIPE,
                env=env,
                check=False,
            )
        )
        assert proc.stdout is not None
        output = b""
        while b"ready" not in output:
            chunk = await proc.stdout.receive_some()
            assert chunk, "client exited before its stream was up"
            output += chunk
        assert impl.running == 1
        killed_at = trio.current_time()
        proc.send_signal(signal.SIGKILL)
        with trio.fail_after(1):
            await impl.handler_ended.wait()
        await proc.wait()
    elapsed = impl.ended[0] - killed_at
    print(f"\nhandler finally ran {elapsed * 1000:.1f} ms after SIGKILL of the client")
    assert elapsed < 1.0
    await wait_until(lambda: server.statistics().connections == 0 and idle(server), within=1)


async def test_500_dropped_streams_leave_no_handlers(
    served: tuple[RpcServer, int], impl: HealthImpl
) -> None:
    server, port = served
    channels_count, per_channel = 5, 100

    def open_and_drop() -> None:
        channels = [
            grpc.insecure_channel(f"127.0.0.1:{port}", options=CHANNEL_OPTIONS)
            for _ in range(channels_count)
        ]
        try:
            calls = []
            for ch in channels:
                stub = health_pb2_grpc.HealthStub(ch)
                for _ in range(per_channel):
                    call = stub.Watch(
                        health_pb2.HealthCheckRequest(service="hold"), timeout=CLIENT_TIMEOUT
                    )
                    calls.append(call)
            for call in calls:
                next(call)  # every handler is running
            # Channels 0-2: cancel each call. Channels 3-4: close the channel under the calls.
            for call in calls[: 3 * per_channel]:
                call.cancel()
            for ch in channels[3:]:
                ch.close()
        finally:
            for ch in channels:
                ch.close()

    started = trio.current_time()
    with trio.fail_after(20):
        await in_thread(open_and_drop)
        drained = await wait_until(lambda: idle(server), within=5)
        await wait_until(lambda: server.statistics().connections == 0, within=5)
    total = trio.current_time() - started
    print(
        f"\n500 streams opened and dropped in {total:.2f} s; handlers gone {drained * 1000:.0f} ms later"
    )
    assert impl.running == 0
    assert len(impl.ended) == channels_count * per_channel


async def test_deadline_cancels_slow_handler(
    served: tuple[RpcServer, int], channel: grpc.Channel, impl: HealthImpl
) -> None:
    server, _ = served
    started = trio.current_time()
    code, _ = await in_thread(call_status, partial(check, channel, "slow", timeout=0.2))
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    with trio.fail_after(1):
        await impl.handler_ended.wait()
    assert 0.15 < impl.ended[0] - started < 1.0
    await wait_until(lambda: idle(server), within=1)


# ---------------------------------------------------------------------------------------------
# Wire-level cases with a raw HTTP/2 client
# ---------------------------------------------------------------------------------------------


class RawClient:
    """Just enough of a gRPC client to send what grpcio never sends."""

    def __init__(self, stream: trio.SocketStream, port: int) -> None:
        self._stream = stream
        self._port = port
        self.conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
        )
        self.conn.initiate_connection()
        self._next_id = 1

    def new_stream_id(self) -> int:
        stream_id, self._next_id = self._next_id, self._next_id + 2
        return stream_id

    async def call(
        self,
        path: str,
        messages: list[bytes],
        headers: list[tuple[str, str]] = (),  # type: ignore[assignment]
        *,
        compressed: bool = False,
    ) -> dict[str, str]:
        """Send one request (plus anything already queued on `conn`); return the response
        headers + trailers once the stream ends."""
        stream_id = self.new_stream_id()
        self.conn.send_headers(
            stream_id,
            [
                (":method", "POST"),
                (":scheme", "http"),
                (":authority", f"127.0.0.1:{self._port}"),
                (":path", path),
                ("te", "trailers"),
                ("content-type", "application/grpc"),
                *headers,
            ],
            end_stream=not messages,
        )
        for i, body in enumerate(messages):
            framed = struct.pack(">?I", compressed, len(body)) + body
            self.conn.send_data(stream_id, framed, end_stream=i == len(messages) - 1)
        await self._stream.send_all(self.conn.data_to_send())
        response: dict[str, str] = {}
        while True:
            data = await self._stream.receive_some(65536)
            assert data, "server closed the connection"
            for event in self.conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived | h2.events.TrailersReceived):
                    response.update(event.headers)
                elif isinstance(event, h2.events.DataReceived):
                    self.conn.acknowledge_received_data(event.flow_controlled_length, stream_id)
                elif isinstance(event, h2.events.StreamEnded) and event.stream_id == stream_id:
                    await self._stream.send_all(self.conn.data_to_send())
                    return response
            await self._stream.send_all(self.conn.data_to_send())


CHECK_PATH = "/grpc.health.v1.Health/Check"


async def test_server_enforces_grpc_timeout(
    served: tuple[RpcServer, int], impl: HealthImpl
) -> None:
    # grpcio enforces its deadline itself (and resets the stream); this client does not, so
    # only the server's own timer can end the call.
    server, port = served
    slow = health_pb2.HealthCheckRequest(service="slow").SerializeToString()
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
        client = RawClient(stream, port)
        started = trio.current_time()
        with trio.fail_after(3):
            response = await client.call(CHECK_PATH, [slow], [("grpc-timeout", "200m")])
        elapsed = trio.current_time() - started
        assert response["grpc-status"] == str(StatusCode.DEADLINE_EXCEEDED.value)
        assert 0.15 < elapsed < 1.0
        assert impl.running == 0 and len(impl.ended) == 1
        # ctx.deadline is set from grpc-timeout
        ok = health_pb2.HealthCheckRequest(service="deadline").SerializeToString()
        response = await client.call(CHECK_PATH, [ok], [("grpc-timeout", "5S")])
        assert response["grpc-status"] == "0"
    await wait_until(lambda: idle(server), within=1)


async def test_malformed_streams_fail_alone(
    served: tuple[RpcServer, int], impl: HealthImpl
) -> None:
    _, port = served
    ok = health_pb2.HealthCheckRequest().SerializeToString()
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
        client = RawClient(stream, port)
        with trio.fail_after(3):
            # HEADERS with END_STREAM: no request message at all (purerpc: connection killed).
            response = await client.call(CHECK_PATH, [])
            assert response["grpc-status"] == str(StatusCode.INTERNAL.value)
            # A path purerpc cannot split (purerpc: connection killed).
            response = await client.call("/a/b/c", [ok])
            assert response["grpc-status"] == str(StatusCode.INTERNAL.value)
            # Two messages on a unary call.
            response = await client.call(CHECK_PATH, [ok, ok])
            assert response["grpc-status"] == str(StatusCode.INTERNAL.value)
            # Compression we did not offer.
            response = await client.call(CHECK_PATH, [ok], [("grpc-encoding", "gzip")])
            assert response["grpc-status"] == str(StatusCode.UNIMPLEMENTED.value)
            response = await client.call(CHECK_PATH, [ok], compressed=True)
            assert response["grpc-status"] == str(StatusCode.UNIMPLEMENTED.value)
            # A request rejected at its headers and reset by the client in the same write:
            # the server must not answer a stream that is already closed.
            rejected = client.new_stream_id()
            client.conn.send_headers(
                rejected,
                [(":method", "POST"), (":scheme", "http"), (":authority", "x"), (":path", "/a/b/c"),
                 ("te", "trailers"), ("content-type", "application/grpc")],
            )  # fmt: skip
            client.conn.reset_stream(rejected, h2.errors.ErrorCodes.CANCEL)
            response = await client.call(CHECK_PATH, [ok])
            assert response["grpc-status"] == "0"
            # The same connection still serves calls.
            response = await client.call(CHECK_PATH, [ok])
            assert response["grpc-status"] == "0"
    assert impl.check_calls == 2  # only the two well-formed calls reached the handler


WATCH_PATH = "/grpc.health.v1.Health/Watch"


@pytest.mark.parametrize("how", ["goaway", "tcp-reset"])
async def test_connection_loss_cancels_handlers(
    served: tuple[RpcServer, int], impl: HealthImpl, how: str
) -> None:
    server, port = served
    hold = health_pb2.HealthCheckRequest(service="hold").SerializeToString()
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    try:
        conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
        )
        conn.initiate_connection()
        for stream_id in (1, 3):  # two streams: both handlers must go
            conn.send_headers(
                stream_id,
                [
                    (":method", "POST"), (":scheme", "http"), (":authority", "x"),
                    (":path", WATCH_PATH), ("te", "trailers"), ("content-type", "application/grpc"),
                ],
            )  # fmt: skip
            conn.send_data(stream_id, struct.pack(">?I", False, len(hold)) + hold, end_stream=True)
        await stream.send_all(conn.data_to_send())
        await wait_until(lambda: impl.running == 2, within=3)
        lost_at = trio.current_time()
        if how == "goaway":
            # The socket stays open: only the GOAWAY tells the server the client is leaving.
            conn.close_connection()
            await stream.send_all(conn.data_to_send())
        else:
            # SO_LINGER 0: close() sends RST instead of FIN; the server's read fails.
            stream.setsockopt(
                trio.socket.SOL_SOCKET, trio.socket.SO_LINGER, struct.pack("ii", 1, 0)
            )
            await stream.aclose()
        await wait_until(lambda: impl.running == 0, within=1)
        assert max(impl.ended) - lost_at < 1.0
        await wait_until(
            lambda: server.statistics() == RpcStatistics(connections=0, active_calls=0), within=1
        )
    finally:
        await stream.aclose()


async def read_until_eof(stream: trio.SocketStream) -> bytes:
    received = b""
    with trio.fail_after(3):
        while chunk := await stream.receive_some():
            received += chunk
    return received


async def test_protocol_errors_close_only_that_connection(
    served: tuple[RpcServer, int], channel: grpc.Channel
) -> None:
    server, port = served
    assert (await in_thread(check, channel, "")).status == SERVING
    # Not HTTP/2 at all: closed (h2 sends no GOAWAY before a valid preface).
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
        await stream.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        await read_until_eof(stream)
    # A valid preface, then a DATA frame on stream 0: GOAWAY(PROTOCOL_ERROR), then EOF.
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.initiate_connection()
    data_on_stream_0 = b"\x00\x00\x00\x00\x00\x00\x00\x00\x00"
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
        await stream.send_all(client.data_to_send() + data_on_stream_0)
        received = await read_until_eof(stream)
    [goaway] = [
        e for e in client.receive_data(received) if isinstance(e, h2.events.ConnectionTerminated)
    ]
    assert goaway.error_code == h2.errors.ErrorCodes.PROTOCOL_ERROR
    # A header value that is not UTF-8 (gRPC metadata is ASCII): GOAWAY(PROTOCOL_ERROR).
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.initiate_connection()
    client.send_headers(
        1,
        [(b":method", b"POST"), (b":scheme", b"http"), (b":authority", b"x"),
         (b":path", CHECK_PATH.encode()), (b"te", b"trailers"),
         (b"content-type", b"application/grpc"), (b"x-token", b"\xff\xfe")],
    )  # fmt: skip
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
        await stream.send_all(client.data_to_send())
        received = await read_until_eof(stream)
    [goaway] = [
        e for e in client.receive_data(received) if isinstance(e, h2.events.ConnectionTerminated)
    ]
    assert goaway.error_code == h2.errors.ErrorCodes.PROTOCOL_ERROR
    # The grpcio connection is unaffected.
    assert (await in_thread(check, channel, "")).status == SERVING
    await wait_until(lambda: server.statistics().connections == 1, within=1)


# ---------------------------------------------------------------------------------------------
# Limits, binding, auth, TLS
# ---------------------------------------------------------------------------------------------


async def test_oversized_request_fails_alone(nursery: trio.Nursery, impl: HealthImpl) -> None:
    limit = 1024 * 1024
    server, port = await start_server(nursery, impl, max_message_size=limit)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=CHANNEL_OPTIONS)
    try:
        await in_thread(check, channel, "peer")
        # Just over the limit, and far over it (more than the 2 MiB stream window, so the
        # client is still sending when the answer and the RST_STREAM(NO_ERROR) arrive).
        for size in (limit + 1, 8 * limit):
            code, details = await in_thread(call_status, partial(check, channel, "x" * size))
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert details == f"request message larger than the server limit of {limit} bytes"
        await in_thread(check, channel, "peer")
    finally:
        await in_thread(channel.close)
    # Both successful calls came over the same TCP connection: it survived the rejections.
    assert len(impl.peers) == 2 and impl.peers[0] == impl.peers[1]
    assert impl.check_calls == 2


async def test_binding_a_taken_port_fails(nursery: trio.Nursery, impl: HealthImpl) -> None:
    methods = method_table(HEALTH, impl)
    port = await nursery.start(partial(serve_rpc, methods, host="127.0.0.1", port=0))
    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=CHANNEL_OPTIONS)
    try:
        assert (await in_thread(check, channel, "")).status == SERVING
    finally:
        await in_thread(channel.close)
    with pytest.raises(OSError) as info:
        await nursery.start(partial(serve_rpc, methods, host="127.0.0.1", port=port))
    assert info.value.errno == errno.EADDRINUSE


async def test_authenticate_hook(nursery: trio.Nursery, impl: HealthImpl) -> None:
    seen: list[str] = []

    def authenticate(ctx: CallContext) -> None:
        seen.append(ctx.method)
        if ("authorization", "Bearer good") not in ctx.metadata:
            raise RpcError(StatusCode.UNAUTHENTICATED, "missing or invalid token")

    _, port = await start_server(nursery, impl, authenticate=authenticate)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=CHANNEL_OPTIONS)
    try:
        code, details = await in_thread(call_status, partial(check, channel, ""))
        assert (code, details) == (grpc.StatusCode.UNAUTHENTICATED, "missing or invalid token")
        assert impl.check_calls == 0  # the handler never ran
        good = [("authorization", "Bearer good")]
        assert (await in_thread(partial(check, channel, "", metadata=good))).status == SERVING
    finally:
        await in_thread(channel.close)
    assert seen == [CHECK_PATH, CHECK_PATH]


async def test_tls_round_trip(
    nursery: trio.Nursery, impl: HealthImpl, tmp_path: pathlib.Path
) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    await trio.run_process(
        [
            "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-days", "1", "-subj", "/CN=localhost",
            "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
            "-keyout", str(key), "-out", str(cert),
        ],
        capture_stdout=True,
        capture_stderr=True,
    )  # fmt: skip
    context = server_ssl_context(str(cert), str(key))
    _, port = await start_server(nursery, impl, ssl_context=context)
    credentials = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
    channel = grpc.secure_channel(f"127.0.0.1:{port}", credentials, options=CHANNEL_OPTIONS)
    plaintext = grpc.insecure_channel(f"127.0.0.1:{port}", options=CHANNEL_OPTIONS)
    try:
        assert (await in_thread(check, channel, "")).status == SERVING
        code, details = await in_thread(call_status, partial(check, channel, "notfound"))
        assert (code, details) == (grpc.StatusCode.NOT_FOUND, "no such job")
        # A client that does not speak TLS fails its handshake; the server is unaffected.
        code, _ = await in_thread(call_status, partial(check, plaintext, "", timeout=2))
        assert code == grpc.StatusCode.UNAVAILABLE
        assert (await in_thread(check, channel, "")).status == SERVING
    finally:
        await in_thread(plaintext.close)
        await in_thread(channel.close)


# ---------------------------------------------------------------------------------------------
# grpc-message: percent-encoded as the gRPC HTTP/2 spec says
# ---------------------------------------------------------------------------------------------

# Every kind of character the spec treats differently: literal (space, ':', '/', '?', '#', '@',
# '&', '=', '+', '$', ',', ';', quotes), and encoded ('%', a newline, a tab, DEL, 2- and 4-byte
# UTF-8). purerpc's quote(safe='') escaped the first kind too, which clients that decode
# only what the spec says (grpc-js: decodeURI) then showed as "%3A", "%2F", ...
SPEC_MESSAGE = (
    "missing 'authorization: Bearer TOKEN' metadata; see /docs/auth?a=b&c=d#e, "
    'user@host $5 + 1 = "6", 100% done\nnext\tline\x7f évé 🦆'
)
WATCH_PATH = "/grpc.health.v1.Health/Watch"


def spec_encoded(message: str) -> str:
    """The spec's Percent-Encoded form, byte by byte: an independent reference."""
    return "".join(
        chr(b) if 0x20 <= b <= 0x7E and b != 0x25 else f"%{b:02X}" for b in message.encode()
    )


async def test_grpc_message_is_spec_encoded_and_round_trips(
    served: tuple[RpcServer, int], channel: grpc.Channel
) -> None:
    _, port = served
    edge = " padded both ends "  # HTTP/2 values cannot start or end with a space: %20 there
    health = health_pb2_grpc.HealthStub(channel)

    def watch_error(message: str) -> tuple[grpc.StatusCode, str]:
        request = health_pb2.HealthCheckRequest(service=f"say:{message}")
        return call_status(lambda: list(health.Watch(request, timeout=CLIENT_TIMEOUT)))

    # On the wire: the raw trailer, both trailers-only (Check) and after a message (Watch).
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
        client = RawClient(stream, port)
        trailers: dict[tuple[str, str], str] = {}
        for path, code in (
            (CHECK_PATH, StatusCode.FAILED_PRECONDITION),
            (WATCH_PATH, StatusCode.ABORTED),
        ):
            for message in (SPEC_MESSAGE, edge):
                request = health_pb2.HealthCheckRequest(service=f"say:{message}")
                response = await client.call(path, [request.SerializeToString()])
                assert response["grpc-status"] == str(code.value)
                trailers[path, message] = response["grpc-message"]
    for path in (CHECK_PATH, WATCH_PATH):
        raw = trailers[path, SPEC_MESSAGE]
        assert raw == spec_encoded(SPEC_MESSAGE)
        assert "authorization: Bearer TOKEN" in raw and "/docs/auth?a=b&c=d#e, user@host" in raw
        assert "100%25 done%0Anext%09line%7F %C3%A9v%C3%A9 %F0%9F%A6%86" in raw
        assert all(0x20 <= ord(c) <= 0x7E for c in raw)
        assert trailers[path, edge] == "%20padded both ends%20"

    # grpcio decodes per the spec: details() is the exact message.
    for message in (SPEC_MESSAGE, edge):
        failed = await in_thread(call_status, partial(check, channel, f"say:{message}"))
        assert failed == (grpc.StatusCode.FAILED_PRECONDITION, message)
        assert await in_thread(watch_error, message) == (grpc.StatusCode.ABORTED, message)

    # Our own client (purerpc's protocol layer, urllib.parse.unquote) too.
    async with Client.connect(f"127.0.0.1:{port}", timeout=CLIENT_TIMEOUT) as ours:
        for message in (SPEC_MESSAGE, edge):
            with pytest.raises(NotFound) as info:
                await ours.get(f"say:{message}")
            assert info.value.message == message


@pytest.mark.parametrize(
    ("message", "encoded"),
    [
        ("", ""),
        ("no such job", "no such job"),
        ("a: b/c?d#e@f&g=h+i$j,k;l", "a: b/c?d#e@f&g=h+i$j,k;l"),
        ("%", "%25"),
        ("100%", "100%25"),
        ("%41", "%2541"),  # never decoded twice
        ("\r\n\x00\x1f\x7f", "%0D%0A%00%1F%7F"),
        ("é🦆", "%C3%A9%F0%9F%A6%86"),
        (" ", "%20"),
        ("  two  ", "%20 two %20"),
        ("lone \udc80 surrogate", "lone \\udc80 surrogate"),
    ],
)
def test_encode_grpc_message(message: str, encoded: str) -> None:
    assert encode_grpc_message(message) == encoded
    assert urllib.parse.unquote(encoded) == message.encode("utf-8", "backslashreplace").decode()


def test_status_trailers_match_purerpc_apart_from_the_message() -> None:
    """_status_trailers replaces purerpc's respond_status / end_response, whose grpc-message
    encoding is not the spec's: apart from that it must send what they send. If this fails,
    purerpc changed those methods: check whether our replacement is still right (or needed)."""

    class Recorder:
        def __init__(self) -> None:
            self.sent: list[tuple[list[tuple[str, str]], bool]] = []

        def send_headers(self, stream_id: int, headers: Any, end_stream: bool = False) -> None:
            self.sent.append((list(headers), end_stream))

    def purerpc_trailers(status: Status, *, trailers_only: bool) -> list[tuple[str, str]]:
        recorder = Recorder()
        connection = SimpleNamespace(h2_connection=recorder)
        if trailers_only:
            GRPCConnection.respond_status(connection, 1, status, "+proto")
        else:
            GRPCConnection.end_response(connection, 1, status)
        [(headers, end_stream)] = recorder.sent
        assert end_stream
        return headers

    for trailers_only in (True, False):
        for status in (
            Status(StatusCode.NOT_FOUND, "no_such_job"),  # nothing either side encodes
            Status(StatusCode.UNAVAILABLE),  # no message at all
        ):
            assert _status_trailers(status, trailers_only=trailers_only) == purerpc_trailers(
                status, trailers_only=trailers_only
            )
        status = Status(StatusCode.UNAUTHENTICATED, "missing 'authorization: Bearer TOKEN'")
        theirs = dict(purerpc_trailers(status, trailers_only=trailers_only))
        ours = dict(_status_trailers(status, trailers_only=trailers_only))
        assert theirs.pop("grpc-message") == "missing%20%27authorization%3A%20Bearer%20TOKEN%27"
        assert ours.pop("grpc-message") == "missing 'authorization: Bearer TOKEN'"
        assert ours == theirs
