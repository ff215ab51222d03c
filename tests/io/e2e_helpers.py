"""Shared helpers of the end-to-end tests (tests/io/test_e2e_*.py).

Those tests run real ``stackduck-trio serve`` processes (:class:`ServerProcess`) and talk to
them with the official, blocking grpcio client, exactly as a user's producer or worker would.
Streams are read by a background thread each (:class:`Stream`), so a test can wait for "the
next job" with a deadline instead of sleeping.

Measured numbers are printed (``pytest -s`` shows them).
"""

from __future__ import annotations

import contextlib
import pathlib
import queue
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import grpc

from stackduck_trio._proto import health_pb2, health_pb2_grpc
from stackduck_trio._proto import stackduck_pb2 as pb
from stackduck_trio._proto import stackduck_pb2_grpc as pb_grpc
from stackduck_trio.testing import ServerProcess

__all__ = [
    "CALL_TIMEOUT",
    "CHANNEL_OPTIONS",
    "Client",
    "Stream",
    "assert_clean_message",
    "call_error",
    "check_log_clean",
    "health_check",
    "new_type",
    "open_client",
    "pb",
    "started_server",
    "wait_until",
]

# grpcio would honour http_proxy variables even for 127.0.0.1.
CHANNEL_OPTIONS = [("grpc.enable_http_proxy", 0)]
#: Every unary call: bounds how long a failing test can hang.
CALL_TIMEOUT = 10.0
#: Every stream: bounds how long a reader thread can outlive its test.
STREAM_TIMEOUT = 120.0

T = TypeVar("T")

# What a Python repr or traceback leaking into a status message looks like.
_REPR_MARKERS = ("Traceback", "object at", "<")
# The one documented placeholder that legitimately contains "<": the auth hint.
_ALLOWED_PLACEHOLDERS = ("Bearer <token>",)


def new_type(prefix: str = "t") -> str:
    """A job type no other test uses (tests sharing a server must not see each other's jobs)."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def assert_clean_message(details: str | None) -> None:
    """A status message is present and is no Python repr or traceback."""
    assert details, "an error status must carry a message"
    text = details
    for placeholder in _ALLOWED_PLACEHOLDERS:
        text = text.replace(placeholder, "")
    for marker in _REPR_MARKERS:
        assert marker not in text, f"status message leaks Python internals: {details!r}"
    assert not re.search(r"0x[0-9a-fA-F]{6,}", text), f"status message has an address: {details!r}"


def call_error(fn: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
    """Run a grpcio call that must fail; return ``(code, details)``; check the message."""
    try:
        fn()
    except grpc.RpcError as exc:
        code, details = exc.code(), exc.details()
        assert_clean_message(details)
        return code, details
    raise AssertionError("the call unexpectedly succeeded")


def wait_until(predicate: Callable[[], T], within: float = 5.0, every: float = 0.02) -> T:
    """Poll ``predicate`` until it returns something truthy; fail after ``within`` s."""
    deadline = time.monotonic() + within
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not reached within {within} s (last: {value!r})")
        time.sleep(every)


class Client:
    """A grpcio channel with the StackDuck and Health stubs; ``metadata`` goes on every call."""

    def __init__(self, address: str, metadata: Sequence[tuple[str, str]] | None = None) -> None:
        self.address = address
        self.metadata = list(metadata) if metadata else None
        self.channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
        self.stub = pb_grpc.StackDuckServiceStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def __getattr__(self, name: str) -> Callable[..., Any]:
        """``client.EnqueueJob(request)``: the stub's method with timeout and metadata."""
        if not name[:1].isupper():  # RPC names only; never recurse during __init__
            raise AttributeError(name)
        method = getattr(self.stub, name)

        def call(request: object, **kwargs: Any) -> Any:
            kwargs.setdefault("timeout", CALL_TIMEOUT)
            if self.metadata is not None:
                kwargs.setdefault("metadata", self.metadata)
            return method(request, **kwargs)

        return call

    # -- conveniences ---------------------------------------------------------------

    def enqueue(self, job_type: str, **fields: Any) -> str:
        response = self.EnqueueJob(pb.EnqueueJobRequest(job_type=job_type, **fields))
        assert response.success and response.job_id
        return str(response.job_id)

    def get(self, job_id: str) -> pb.GrpcJob:
        return self.GetJob(pb.GetJobRequest(job_id=job_id)).job

    def complete(self, job: pb.GrpcJob) -> None:
        response = self.CompleteJob(pb.CompleteJobRequest(job_id=job.id, lease_id=job.lease_id))
        assert response.success

    def type_stats(self, job_type: str) -> pb.TypeStats | None:
        for stats in self.GetStats(pb.GetStatsRequest()).types:
            if stats.job_type == job_type:
                return stats
        return None

    def stream(self, job_types: Sequence[str], **fields: Any) -> Stream:
        return Stream(self, job_types, **fields)


@contextlib.contextmanager
def open_client(
    address: str, metadata: Sequence[tuple[str, str]] | None = None
) -> Iterator[Client]:
    client = Client(address, metadata)
    try:
        yield client
    finally:
        client.close()


class Stream:
    """A ConsumeJobs call read by a background thread.

    Every message is queued with its arrival time; :meth:`next_job` skips heartbeats.
    Use as a context manager (or call :meth:`cancel`) so the call ends with the test.
    """

    def __init__(
        self,
        client: Client,
        job_types: Sequence[str],
        *,
        worker_id: str = "",
        prefetch: int | None = None,
        lease_seconds: int | None = None,
        metadata: Sequence[tuple[str, str]] | None = None,
    ) -> None:
        request = pb.ConsumeJobsRequest(worker_id=worker_id, job_types=list(job_types))
        if prefetch is not None:
            request.prefetch = prefetch
        if lease_seconds is not None:
            request.lease_seconds = lease_seconds
        metadata = metadata if metadata is not None else client.metadata
        self.call = client.stub.ConsumeJobs(request, timeout=STREAM_TIMEOUT, metadata=metadata)
        self._messages: queue.Queue[tuple[float, float, pb.JobMessage] | None] = queue.Queue()
        self.heartbeats: list[float] = []  # monotonic arrival times
        self.error: grpc.RpcError | None = None
        self.ended = False
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for message in self.call:
                self._messages.put((time.monotonic(), time.time(), message))
        except grpc.RpcError as exc:
            self.error = exc
        finally:
            self._messages.put(None)

    def _next(self, deadline: float) -> tuple[float, float, pb.JobMessage] | None:
        """The next message (heartbeats included) or ``None`` at the deadline."""
        while True:
            if self.ended:
                return None
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            try:
                item = self._messages.get(timeout=remaining)
            except queue.Empty:
                return None
            if item is None:
                self.ended = True
                return None
            if not item[2].HasField("job"):
                assert item[2].notification_type == "Heartbeat", item[2]
                self.heartbeats.append(item[0])
            return item

    def next_message(self, within: float = 5.0) -> tuple[float, pb.JobMessage]:
        """The next message of any kind: ``(monotonic arrival, message)``."""
        item = self._next(time.monotonic() + within)
        if item is None:
            raise AssertionError(self._why_nothing(within))
        return item[0], item[2]

    def next_job_timed(self, within: float = 5.0) -> tuple[float, float, pb.JobMessage]:
        """``(monotonic arrival, wall arrival, message)`` of the next job message."""
        deadline = time.monotonic() + within
        while True:
            item = self._next(deadline)
            if item is None:
                raise AssertionError(self._why_nothing(within))
            if item[2].HasField("job"):
                return item

    def next_job(self, within: float = 5.0) -> pb.GrpcJob:
        return self.next_job_timed(within)[2].job

    def poll_job(self, within: float) -> pb.GrpcJob | None:
        """The next job, or ``None`` if none arrives within ``within`` s or the stream ended."""
        deadline = time.monotonic() + within
        while True:
            item = self._next(deadline)
            if item is None:
                return None
            if item[2].HasField("job"):
                return item[2].job

    def jobs(self, n: int, within: float = 5.0) -> list[pb.GrpcJob]:
        deadline = time.monotonic() + within
        return [self.next_job(max(0.0, deadline - time.monotonic())) for _ in range(n)]

    def unread_jobs(self) -> list[pb.GrpcJob]:
        """Jobs that arrived but were not taken yet (also after the stream ended)."""
        jobs = []
        while True:
            try:
                item = self._messages.get_nowait()
            except queue.Empty:
                return jobs
            if item is not None and item[2].HasField("job"):
                jobs.append(item[2].job)

    def no_job_within(self, seconds: float) -> None:
        """Assert that no job arrives for ``seconds`` (heartbeats are fine)."""
        deadline = time.monotonic() + seconds
        while True:
            item = self._next(deadline)
            if item is None:
                assert not self.ended, f"stream ended: {self._status()}"
                return
            assert not item[2].HasField("job"), f"unexpected job: {item[2].job}"

    def wait_attached(self, within: float = 5.0) -> None:
        """Wait for the first heartbeat: the server has registered this stream by then."""
        deadline = time.monotonic() + within
        while not self.heartbeats:
            item = self._next(deadline)
            if item is None:
                raise AssertionError(self._why_nothing(within))
            assert not item[2].HasField("job"), "a job arrived before the first heartbeat"

    def wait_end(self, within: float = 5.0) -> grpc.RpcError | None:
        """Wait until the stream ends (skipping messages); return its error."""
        self._thread.join(within)
        assert not self._thread.is_alive(), f"stream still open after {within} s"
        return self.error

    def cancel(self) -> None:
        self.call.cancel()
        self._thread.join(10)

    def _status(self) -> str:
        if self.error is None:
            return "ended without error"
        return f"{self.error.code()}: {self.error.details()}"

    def _why_nothing(self, within: float) -> str:
        if self.ended:
            return f"stream ended ({self._status()}) before the expected message"
        return f"no message within {within:g} s"

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.cancel()


def check_log_clean(log_path: pathlib.Path) -> None:
    """The server logged no traceback and no internal error."""
    text = log_path.read_text(errors="replace")
    assert "Traceback" not in text, f"server logged a traceback:\n{text[-4000:]}"
    assert "internal error" not in text, f"server logged an internal error:\n{text[-4000:]}"


@contextlib.contextmanager
def started_server(
    data_dir: pathlib.Path, *args: str, check_log: bool = True
) -> Iterator[ServerProcess]:
    """A started :class:`ServerProcess`; at the end: it must still be alive, and exit 0."""
    server = ServerProcess(data_dir, *args).start()
    try:
        yield server
        assert server.proc is not None
        assert server.proc.poll() is None, (
            f"server died with {server.proc.returncode}:\n{server.log_path.read_text()[-4000:]}"
        )
        assert server.terminate(timeout=20) == 0
        if check_log:
            check_log_clean(server.log_path)
    finally:
        server.kill()


def health_check(client: Client, service: str = "", **kwargs: Any) -> int:
    kwargs.setdefault("timeout", CALL_TIMEOUT)
    response = client.health.Check(health_pb2.HealthCheckRequest(service=service), **kwargs)
    return int(response.status)
