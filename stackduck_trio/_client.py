"""An async (trio) Python client for Stackduck.

Usage::

    async with Client.connect("127.0.0.1:50051", token="s3cret") as client:
        job_id = await client.enqueue("email", {"to": "ada@example.com"}, priority=1)
        info = await client.get(job_id)
        async with client.consume(["email"], prefetch=10) as jobs:
            async for job in jobs:
                ...
                await client.complete(job.id, job.lease_id)

For a ready-made worker loop (concurrency, batched acks, lease extension,
reconnects) use :class:`stackduck_trio.Worker` instead of ``consume``.

Theory of operation
===================

Transport. The stock purerpc client (``purerpc.insecure_channel``) was measured
unfit for a long-lived worker (see ``design/STACK_NOTES.md``): when the server
dies its calls wait forever (its reader returns on EOF and never ends the open
streams); a later write to the dead socket crashes a task group that was
entered in the *caller's* task, which cancels the caller's whole ``async with``
block and ends it in an ``ExceptionGroup``; the TCP socket is never closed; and
there is no way to reset a stream, so a dropped server stream keeps its jobs
leased on the server until the connection closes. This module therefore keeps
purerpc's client-side *protocol* layer --
``purerpc.grpclib.connection.GRPCConnection(client_side=True)``: h2, HPACK,
flow-control bookkeeping, gRPC framing and trailer parsing -- and replaces its
I/O layer with a small trio-native connection (:class:`_Channel`), exactly as
``_rpc.py`` does on the server side. The method table is derived from the
service descriptor with purerpc's :class:`~purerpc.RPCSignature` /
:class:`~purerpc.Cardinality`; only unary and server-streaming RPCs are used
(purerpc's client-streaming support is broken in 0.8.0, and Stackduck needs
none).

Lifetimes. :meth:`Client.connect` is an async context manager that owns one
nursery. Each TCP connection (a :class:`_Channel`) runs one task in that
nursery: its reader loop, plus a writer task and a liveness prober in the
channel's own nursery. A channel never raises out of its task: whatever ends
it (EOF, reset, protocol error, a failed write, a failed PING probe,
:meth:`_Channel.close`) becomes the reason given to every call still open on
it, as :class:`Unavailable`. The next call opens a new connection, so a
client survives server restarts by itself. A channel's task runs in a
shielded cancel scope: cancelling the block (or a task using the client) does
not cut the connection under shielded cleanup code, such as a worker's last
ack flush; the channels are closed when the ``async with`` block exits.
Cancelling a call resets only its own stream.

Deadlines. Every call runs under ``timeout`` seconds (connect included) and
sends the remainder as ``grpc-timeout``. A call whose connection cannot be
established in time raises :class:`Unavailable`; a call sent but not answered
in time raises :class:`DeadlineExceeded`, resets its stream (RST_STREAM, so
the server cancels the handler) and asks the channel to probe the server
with an HTTP/2 PING: a server that does not answer the PING within
``probe_timeout`` is declared dead and the connection is closed, so the next
call reconnects instead of waiting on a half-dead socket. Server streams
(:meth:`Client.consume`) expect a message -- a job or a heartbeat, which the
server sends every ``heartbeat_interval`` seconds -- at least every
``stream_idle_timeout`` seconds; silence closes the connection and raises
:class:`Unavailable` (a SIGKILLed server is noticed this way when no TCP
reset reaches us, e.g. behind a partition; with a local kill the EOF is seen
within milliseconds).

Flow control. Received bytes of a server stream are acknowledged to the
server only when the application takes the message, so the HTTP/2 window
bounds what a slow consumer buffers (on top of the server's own prefetch
limit for job streams).

Errors. A non-OK status becomes an instance of the :class:`ClientError`
subclass for its code (``NotFound``, ``FailedPrecondition``, ...), with the
gRPC status name in ``.status`` and the server's message in ``.message``.
"""

from __future__ import annotations

import collections
import datetime
import json
import math
import os
import ssl
import struct
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any, ClassVar, Final, TypeVar

import attrs
import h2.errors  # type: ignore[import-untyped]
import h2.events  # type: ignore[import-untyped]
import h2.exceptions  # type: ignore[import-untyped]
import purerpc  # type: ignore[import-untyped]
import trio
from google.protobuf.message import DecodeError, Message  # type: ignore[import-untyped]
from google.protobuf.message_factory import GetMessageClass  # type: ignore[import-untyped]
from purerpc.grpclib.config import GRPCConfiguration  # type: ignore[import-untyped]
from purerpc.grpclib.connection import GRPCConnection  # type: ignore[import-untyped]
from purerpc.grpclib.events import (  # type: ignore[import-untyped]
    MessageReceived,
    ResponseEnded,
    ResponseReceived,
    WindowUpdated,
)
from purerpc.grpclib.exceptions import GRPCError  # type: ignore[import-untyped]

from ._proto import stackduck_pb2 as pb

__all__ = [
    "Aborted",
    "Ack",
    "AlreadyExists",
    "BackendState",
    "BatchResult",
    "CallCancelled",
    "Client",
    "ClientError",
    "DataLoss",
    "DeadJobsPage",
    "DeadlineExceeded",
    "FailedPrecondition",
    "Internal",
    "InvalidArgument",
    "ItemResult",
    "JobInfo",
    "JobRequest",
    "JobStream",
    "NotFound",
    "TypeLimits",
    "OutOfRange",
    "PermissionDenied",
    "ResourceExhausted",
    "Stats",
    "TypeStats",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "Unknown",
    "error_for_code",
    "parse_address",
]

#: Defaults of :meth:`Client.connect`.
DEFAULT_TIMEOUT: Final = 10.0
#: Three server heartbeats (the server's default interval is 2 s).
DEFAULT_STREAM_IDLE_TIMEOUT: Final = 6.0
DEFAULT_PROBE_TIMEOUT: Final = 2.0
#: Same as the server's default receive limit.
DEFAULT_MAX_MESSAGE_SIZE: Final = 4 * 1024 * 1024
#: Defaults of the client-side enqueue batching (see :meth:`Client.enqueue`).
DEFAULT_BATCH_MAX: Final = 500
#: Most ``EnqueueJobs`` batches in flight at once.
DEFAULT_BATCH_INFLIGHT: Final = 4
#: Largest ``EnqueueJobs`` request the batcher builds, in bytes: well under the
#: server's default 4 MiB receive limit. A single larger request goes unary.
BATCH_MAX_BYTES: Final = 1024 * 1024

_SERVICE_NAME: Final = "stackduck.StackDuckService"
_RECEIVE_SIZE: Final = 65536
# gRPC length-prefixed message: 1-byte compressed flag + 4-byte big-endian length.
_MESSAGE_PREFIX: Final = struct.Struct(">?I")
_USER_AGENT: Final = f"stackduck-trio-client purerpc/{purerpc.__version__}"


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


class ClientError(Exception):
    """A call failed with a gRPC status. Subclasses exist for every status code.

    Attributes:
        status: The gRPC status name, e.g. ``"NOT_FOUND"``.
        code: The gRPC status number, e.g. ``5``.
        message: The server's message (or the client's, for local failures such as
            timeouts and lost connections).
    """

    code: ClassVar[int] = 2
    status: ClassVar[str] = "UNKNOWN"

    def __init__(self, message: str = "") -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return f"{self.status}: {self.message}" if self.message else self.status


class CallCancelled(ClientError):
    """CANCELLED: the call was cancelled (by the server, or a reset stream)."""

    code = 1
    status = "CANCELLED"


class Unknown(ClientError):
    """UNKNOWN: the server reported an error without a known status."""

    code = 2
    status = "UNKNOWN"


class InvalidArgument(ClientError):
    """INVALID_ARGUMENT: the request is invalid whatever the server's state."""

    code = 3
    status = "INVALID_ARGUMENT"


class DeadlineExceeded(ClientError):
    """DEADLINE_EXCEEDED: no answer within the call's deadline."""

    code = 4
    status = "DEADLINE_EXCEEDED"


class NotFound(ClientError):
    """NOT_FOUND: no such job (or no ready job, for a unary dequeue)."""

    code = 5
    status = "NOT_FOUND"


class AlreadyExists(ClientError):
    """ALREADY_EXISTS."""

    code = 6
    status = "ALREADY_EXISTS"


class PermissionDenied(ClientError):
    """PERMISSION_DENIED."""

    code = 7
    status = "PERMISSION_DENIED"


class ResourceExhausted(ClientError):
    """RESOURCE_EXHAUSTED: a payload, message or batch is too large, or a limit was hit."""

    code = 8
    status = "RESOURCE_EXHAUSTED"


class FailedPrecondition(ClientError):
    """FAILED_PRECONDITION: wrong job state, or a stale lease (another attempt owns the job)."""

    code = 9
    status = "FAILED_PRECONDITION"


class Aborted(ClientError):
    """ABORTED."""

    code = 10
    status = "ABORTED"


class OutOfRange(ClientError):
    """OUT_OF_RANGE."""

    code = 11
    status = "OUT_OF_RANGE"


class Unimplemented(ClientError):
    """UNIMPLEMENTED: the server does not serve this RPC."""

    code = 12
    status = "UNIMPLEMENTED"


class Internal(ClientError):
    """INTERNAL: a bug on the server, or a malformed answer."""

    code = 13
    status = "INTERNAL"


class Unavailable(ClientError):
    """UNAVAILABLE: the server cannot be reached, went away, or cannot serve right now.

    Raised by the client itself when it cannot connect, when the connection is lost
    during a call, and when a job stream stays silent for too long. Retrying later
    (with backoff) is the expected reaction.
    """

    code = 14
    status = "UNAVAILABLE"


class DataLoss(ClientError):
    """DATA_LOSS."""

    code = 15
    status = "DATA_LOSS"


class Unauthenticated(ClientError):
    """UNAUTHENTICATED: missing or invalid bearer token."""

    code = 16
    status = "UNAUTHENTICATED"


_ERRORS: Final[dict[int, type[ClientError]]] = {
    cls.code: cls
    for cls in (
        CallCancelled,
        Unknown,
        InvalidArgument,
        DeadlineExceeded,
        NotFound,
        AlreadyExists,
        PermissionDenied,
        ResourceExhausted,
        FailedPrecondition,
        Aborted,
        OutOfRange,
        Unimplemented,
        Internal,
        Unavailable,
        DataLoss,
        Unauthenticated,
    )
}
#: gRPC status number -> name, OK included (for per-item results of batch calls).
_CODE_NAMES: Final[dict[int, str]] = {
    0: "OK",
    **{code: cls.status for code, cls in _ERRORS.items()},
}


def error_for_code(code: int, message: str) -> ClientError:
    """Return the :class:`ClientError` subclass instance for a gRPC status number.

    Args:
        code: A gRPC status number other than 0 (OK). Unknown numbers map to :class:`Unknown`.
        message: The status message.
    """
    cls = _ERRORS.get(code)
    if cls is None:
        return Unknown(f"status {code}: {message}")
    return cls(message)


# ---------------------------------------------------------------------------------------------
# Records
# ---------------------------------------------------------------------------------------------


def _time(seconds: int) -> float | None:
    return float(seconds) if seconds else None


@attrs.frozen
class JobInfo:
    """A job as the server reports it (``GrpcJob``). Times are Unix seconds, ``None`` if unset.

    Attributes:
        id: The job id.
        job_type: The job type (queue name).
        payload: The payload, as JSON text; see :attr:`data` for the decoded value.
        status: ``scheduled``, ``queued``, ``running``, ``completed``, ``failed``
            (dead-lettered) or ``cancelled``.
        priority: 1 (high) .. 3 (low).
        retry_count: Failures so far that were retried.
        max_retries: Failures that may be retried before the job is dead-lettered.
        error_message: The last failure's message ("" if none).
        delay: Backoff base in seconds (a retry waits ``delay * 2 ** retry_count``).
        scheduled_at: When the job is (or was) due.
        started_at: When the current or last delivery started.
        completed_at: When the job reached a terminal state.
        created_at: When the job was enqueued.
        updated_at: The last change.
        lease_id: The fencing token of the current delivery (set on delivered jobs);
            pass it to :meth:`Client.complete` / :meth:`Client.fail`.
        attempt: Deliveries so far (1 during the first).
        lease_expires_at: When the current lease expires (millisecond precision).
        worker_id: The worker holding the current lease.
    """

    id: str
    job_type: str
    payload: str
    status: str
    priority: int
    retry_count: int
    max_retries: int
    error_message: str
    delay: int
    scheduled_at: float | None
    started_at: float | None
    completed_at: float | None
    created_at: float | None
    updated_at: float | None
    lease_id: str | None
    attempt: int
    lease_expires_at: float | None
    worker_id: str | None

    @classmethod
    def from_pb(cls, job: pb.GrpcJob) -> JobInfo:
        """Decode a wire ``GrpcJob``."""
        return cls(
            id=job.id,
            job_type=job.job_type,
            payload=job.payload,
            status=job.status,
            priority=job.priority,
            retry_count=job.retry_count,
            max_retries=job.max_retries,
            error_message=job.error_message,
            delay=job.delay,
            scheduled_at=_time(job.scheduled_at),
            started_at=_time(job.started_at),
            completed_at=_time(job.completed_at),
            created_at=_time(job.created_at),
            updated_at=_time(job.updated_at),
            lease_id=job.lease_id or None,
            attempt=job.attempt,
            lease_expires_at=(job.lease_expires_at_ms / 1000) if job.lease_expires_at_ms else None,
            worker_id=job.worker_id or None,
        )

    @property
    def data(self) -> Any:
        """The payload decoded from JSON (``{}`` when the payload is empty)."""
        return json.loads(self.payload) if self.payload else {}

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict of every field (for ``--json`` output and logs)."""
        return attrs.asdict(self)


@attrs.frozen
class ItemResult:
    """Per-item outcome of a batch call (enqueue many, ack many, requeue, purge).

    Attributes:
        job_id: The job id ("" for a rejected enqueue).
        code: gRPC status number: 0 = OK, 3 = INVALID_ARGUMENT, 5 = NOT_FOUND,
            8 = RESOURCE_EXHAUSTED, 9 = FAILED_PRECONDITION, 14 = UNAVAILABLE.
        message: Why the item was rejected ("" when OK).
        status: The job's status after the operation ("" when rejected).
        duplicate: Enqueue: the item's ``idempotency_key`` named an existing job,
            whose id and status these are; no job was created.
    """

    job_id: str
    code: int
    message: str
    status: str
    duplicate: bool = False

    @property
    def ok(self) -> bool:
        """Whether the item succeeded."""
        return self.code == 0

    @property
    def code_name(self) -> str:
        """The status name of :attr:`code`, e.g. ``"OK"`` or ``"FAILED_PRECONDITION"``."""
        return _CODE_NAMES.get(self.code, f"CODE_{self.code}")

    def error(self) -> ClientError | None:
        """The item's failure as an exception (not raised), or ``None`` when OK."""
        return None if self.ok else error_for_code(self.code, self.message)

    @classmethod
    def from_pb(cls, item: pb.ItemResult) -> ItemResult:
        """Decode a wire ``ItemResult``."""
        return cls(
            job_id=item.job_id,
            code=item.code,
            message=item.message,
            status=item.status,
            duplicate=item.duplicate,
        )


@attrs.frozen
class BatchResult:
    """Outcome of :meth:`Client.requeue_dead` / :meth:`Client.purge_dead`.

    Attributes:
        count: How many jobs were requeued or purged.
        results: One result per selected job.
    """

    count: int
    results: tuple[ItemResult, ...]


@attrs.frozen
class DeadJobsPage:
    """One page of the dead-letter queue.

    Attributes:
        jobs: Dead jobs, in the order they were dead-lettered.
        next_page_token: Pass to :meth:`Client.list_dead_jobs` for the next page; "" at the end.
    """

    jobs: tuple[JobInfo, ...]
    next_page_token: str


@attrs.frozen
class TypeStats:
    """Counts of one job type (see ``TypeStats`` in the proto).

    ``completed``, ``failed`` and ``retried`` count since the server started.
    """

    job_type: str
    queued_p1: int
    queued_p2: int
    queued_p3: int
    scheduled: int
    running: int
    dead: int
    paused: bool
    workers: int
    completed: int
    failed: int
    retried: int
    rate_limit: float = 0.0
    rate_burst: int = 0
    max_running: int = 0
    throttled: int = 0

    @property
    def queued(self) -> int:
        """Ready jobs of every priority."""
        return self.queued_p1 + self.queued_p2 + self.queued_p3


@attrs.frozen
class TypeLimits:
    """The limits of a job type; 0 means "no such limit"."""

    job_type: str
    rate: float
    burst: int
    max_running: int


@attrs.frozen
class BackendState:
    """Health of one storage backend.

    Attributes:
        name: ``record_store`` or ``queue_tier``.
        kind: ``sqlite``, ``postgres``, ``memory`` or ``redis``.
        state: ``healthy``, ``suspect``, ``down`` or ``recovering``.
    """

    name: str
    kind: str
    state: str


@attrs.frozen
class Stats:
    """Queue statistics of a server (:meth:`Client.stats`).

    Attributes:
        types: Per job type, sorted by name.
        workers: Open worker streams.
        running: Jobs currently leased.
        dead: Jobs in the dead-letter queue.
        backends: Health of each storage backend.
        queue_route: Where the server enqueues and claims now: ``redis``,
            ``postgres`` (the record store, e.g. while Redis is down) or ``memory``.
        route_reason: Why, in words (from the backends' health).
    """

    types: tuple[TypeStats, ...]
    workers: int
    running: int
    dead: int
    backends: tuple[BackendState, ...]
    queue_route: str = ""
    route_reason: str = ""

    def of(self, job_type: str) -> TypeStats | None:
        """The stats of one job type, or ``None`` if the server does not know it."""
        for stats in self.types:
            if stats.job_type == job_type:
                return stats
        return None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (for ``--json`` output)."""
        return attrs.asdict(self)


@attrs.frozen(kw_only=True)
class JobRequest:
    """One job of :meth:`Client.enqueue_many`; the fields mean what they mean in
    :meth:`Client.enqueue`.
    """

    job_type: str
    payload: object = None
    priority: int | None = None
    delay: int | None = None
    max_retries: int | None = None
    scheduled_at: datetime.datetime | float | str | None = None
    idempotency_key: str | None = None

    def to_pb(self) -> pb.EnqueueJobRequest:
        """Encode as a wire ``EnqueueJobRequest`` (omitted fields stay unset)."""
        request = pb.EnqueueJobRequest(
            job_type=self.job_type,
            payload=encode_payload(self.payload),
            scheduled_at=encode_time(self.scheduled_at),
            idempotency_key=self.idempotency_key or "",
        )
        if self.priority is not None:
            request.priority = self.priority
        if self.delay is not None:
            request.delay = self.delay
        if self.max_retries is not None:
            request.max_retries = self.max_retries
        return request


@attrs.frozen
class Ack:
    """One outcome for :meth:`Client.ack_many`.

    Attributes:
        job_id: The job.
        lease_id: The lease of the delivery being acknowledged.
        failed: ``False`` completes the job; ``True`` fails it (retry or dead-letter).
        error: The failure message (only with ``failed=True``).
        release: Give the job back unstarted (a stopping worker does this with
            the jobs it has not started): the job keeps its place, the delivery
            is not an attempt, and the stream is winding down: it gets no new job
            from then on (its prefetch follows the jobs it still holds down).
    """

    job_id: str
    lease_id: str | None
    failed: bool = False
    error: str = ""
    release: bool = False


def encode_payload(payload: object) -> str:
    """Encode a payload as the JSON text the server expects.

    ``None`` means "no payload" (the server stores ``{}``); a ``str`` is taken to be
    JSON text already and sent unchanged (to send the JSON string ``hi``, pass
    ``'"hi"'``); ``bytes`` are decoded as UTF-8 JSON text; anything else is
    serialised with :func:`json.dumps` (NaN and infinities are refused, as JSON has none).
    """
    if payload is None:
        return ""
    if isinstance(payload, str):
        return payload
    if isinstance(payload, bytes | bytearray):
        return bytes(payload).decode("utf-8")
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def encode_time(value: datetime.datetime | float | str | None) -> str:
    """Encode a ``scheduled_at`` value: RFC 3339 text or Unix seconds, "" for now.

    Raises:
        ValueError: a naive datetime (its meaning depends on the local zone), or a
            number that is not finite.
    """
    if value is None:
        return ""
    if isinstance(value, datetime.datetime):
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError("scheduled_at: use a timezone-aware datetime (e.g. tzinfo=UTC)")
        return value.isoformat()
    if isinstance(value, bool):
        raise TypeError("scheduled_at: expected a datetime, Unix seconds or RFC 3339 text")
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError("scheduled_at must be finite")
        return f"{value:.6f}".rstrip("0").rstrip(".")
    return str(value)


def parse_address(address: str) -> tuple[str, int]:
    """Split ``HOST:PORT`` (``[v6]:PORT`` for IPv6) into host and port.

    Raises:
        ValueError: no port, or a port that is not a number in 1..65535.
    """
    host, sep, port_text = address.rpartition(":")
    if not sep or not host:
        raise ValueError(f"server address {address!r}: expected HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"server address {address!r}: port is not a number") from None
    if not 0 < port < 65536:
        raise ValueError(f"server address {address!r}: port must be in 1..65535")
    return host, port


# ---------------------------------------------------------------------------------------------
# Method table: built from the service descriptor with purerpc's signature types
# ---------------------------------------------------------------------------------------------


def _signatures() -> dict[str, Any]:
    service = pb.DESCRIPTOR.services_by_name["StackDuckService"]
    table: dict[str, Any] = {}
    for method in service.methods:
        table[method.name] = purerpc.RPCSignature(
            purerpc.Cardinality.get_cardinality_for(
                request_stream=method.client_streaming, response_stream=method.server_streaming
            ),
            GetMessageClass(method.input_type),
            GetMessageClass(method.output_type),
        )
    return table


#: ``{"EnqueueJob": RPCSignature(UNARY_UNARY, EnqueueJobRequest, EnqueueJobResponse), ...}``
SIGNATURES: Final = _signatures()

_ResponseT = TypeVar("_ResponseT", bound=Message)


# ---------------------------------------------------------------------------------------------
# Protocol and connection
# ---------------------------------------------------------------------------------------------


class _StreamReset:
    __slots__ = ("error_code", "stream_id")

    def __init__(self, stream_id: int, error_code: int) -> None:
        self.stream_id = stream_id
        self.error_code = error_code


class _GoAway:
    __slots__ = ("error_code",)

    def __init__(self, error_code: int) -> None:
        self.error_code = error_code


class _PingAcked:
    __slots__ = ()


class _ClientProtocol(GRPCConnection):  # type: ignore[misc]
    """purerpc's sans-IO client protocol with the events it drops surfaced.

    purerpc ignores a server's RST_STREAM and GOAWAY (its calls then wait forever) and
    PING acknowledgements (which the liveness probe needs), and raises ``KeyError`` on
    DATA for a stream without response headers.
    """

    def __init__(self, max_message_size: int) -> None:
        super().__init__(
            GRPCConfiguration(
                client_side=True, user_agent=_USER_AGENT, max_message_length=max_message_size
            )
        )

    def _stream_reset(self, event: h2.events.StreamReset) -> list[object]:
        self.message_read_buffers.pop(event.stream_id, None)
        return [_StreamReset(event.stream_id, int(event.error_code))]

    def _connection_terminated(self, event: h2.events.ConnectionTerminated) -> list[object]:
        return [_GoAway(int(event.error_code))]

    def _ping_acknowledged(self, event: h2.events.PingAcknowledged) -> list[object]:
        return [_PingAcked()]

    def _data_received(self, event: h2.events.DataReceived) -> list[object]:
        if event.stream_id not in self.message_read_buffers:
            # DATA before HEADERS: hand the credit back and let the call fail on its status.
            if event.flow_controlled_length:
                self.h2_connection.acknowledge_received_data(
                    event.flow_controlled_length, event.stream_id
                )
            return []
        events: list[object] = super()._data_received(event)
        return events


class _Call:
    """One HTTP/2 stream of a channel, fed by the channel's reader."""

    __slots__ = ("changed", "closed", "error", "messages", "method", "status", "stream_id")

    def __init__(self, stream_id: int, method: str) -> None:
        self.stream_id = stream_id
        self.method = method
        # Bounded by HTTP/2 flow control: bytes are acknowledged only when taken.
        self.messages: collections.deque[tuple[bytes, int]] = collections.deque()
        self.status: tuple[int, str] | None = None  # trailers received
        self.error: ClientError | None = None  # reset, or the connection ended
        self.closed = False  # removed from the channel (finished or reset by us)
        self.changed = trio.Event()

    def wake(self) -> None:
        self.changed.set()


def _format_timeout(seconds: float) -> str:
    # grpc-timeout: at most 8 digits and a unit.
    micros = max(1, math.ceil(seconds * 1_000_000))
    if micros < 100_000_000:
        return f"{micros}u"
    millis = math.ceil(seconds * 1000)
    if millis < 100_000_000:
        return f"{millis}m"
    return f"{min(math.ceil(seconds), 99_999_999)}S"


class _Channel:
    """One HTTP/2 connection to a server. Start :meth:`run` in a nursery right away.

    Args:
        stream: A connected (and, for TLS, handshaken) byte stream.
        authority: ``host:port`` for the ``:authority`` header.
        scheme: ``http`` or ``https``.
        max_message_size: Largest response message accepted.
        probe_timeout: How long a PING may stay unanswered before the channel is declared
            dead (see :meth:`suspect`).
    """

    def __init__(
        self,
        stream: trio.abc.Stream,
        *,
        authority: str,
        scheme: str,
        max_message_size: int,
        probe_timeout: float,
    ) -> None:
        self._stream = stream
        self._authority = authority
        self._scheme = scheme
        self._probe_timeout = probe_timeout
        self._protocol = _ClientProtocol(max_message_size)
        self._h2 = self._protocol.h2_connection
        self._calls: dict[int, _Call] = {}
        # Shielded: cancelling a task that uses the client does not cut the connection
        # under other tasks (or under that task's own shielded cleanup, e.g. a last ack
        # flush). The connection ends by close(), which Client.connect() calls on exit.
        self._scope = trio.CancelScope(shield=True)
        self._wakeup = trio.Event()  # the writer has something to send
        self._window = trio.Event()  # some flow-control window opened
        self._probe_wanted = trio.Event()
        self._ping_acked = trio.Event()
        self._closed_reason: str | None = None
        self._done = trio.Event()
        self._protocol.initiate_connection()  # SETTINGS + connection WINDOW_UPDATE
        self._wakeup.set()

    @property
    def usable(self) -> bool:
        """Whether new calls may be started on this connection."""
        return self._closed_reason is None

    async def run(self) -> None:
        """Read, write and probe until the connection ends; never raises ``Exception``."""
        try:
            with self._scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._write_loop)
                    nursery.start_soon(self._probe_loop)
                    reason = await self._read_loop()
                    self._mark_closed(reason)
                    nursery.cancel_scope.cancel()
        except Exception as exc:  # noqa: BLE001 - a bug here must not take the client down
            self._mark_closed(f"connection failed: {exc!r}")
        finally:
            self._mark_closed("connection closed")
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(self._stream)
            self._done.set()

    def close(self, reason: str) -> None:
        """End the connection: every open call fails with :class:`Unavailable` (``reason``)."""
        self._mark_closed(reason)
        self._scope.cancel()

    async def wait_closed(self) -> None:
        """Wait until :meth:`run` has finished and the socket is closed."""
        await self._done.wait()

    def suspect(self) -> None:
        """A call timed out: check with a PING that the server still answers."""
        self._probe_wanted.set()

    def _mark_closed(self, reason: str) -> None:
        if self._closed_reason is not None:
            return
        self._closed_reason = reason
        self._scope.cancel()
        error = Unavailable(reason)
        for call in self._calls.values():
            if call.status is None and call.error is None:
                call.error = error
            call.wake()
        self._calls.clear()
        self._window.set()

    # -- calls --------------------------------------------------------------------------

    async def start_call(
        self,
        method: str,
        request: bytes,
        *,
        metadata: Sequence[tuple[str, str]],
        grpc_timeout: float | None,
    ) -> _Call:
        """Open a stream, send the request message and half-close.

        Raises:
            Unavailable: The connection is closed.
        """
        if self._closed_reason is not None:
            raise Unavailable(self._closed_reason)
        try:
            stream_id = self._h2.get_next_available_stream_id()
        except h2.exceptions.NoAvailableStreamIDError:
            self.close("stream ids exhausted; reconnecting")
            raise Unavailable("stream ids exhausted; reconnecting") from None
        path = f"/{_SERVICE_NAME}/{method}"
        headers = [
            (":method", "POST"),
            (":scheme", self._scheme),
            (":path", path),
            (":authority", self._authority),
            ("te", "trailers"),
            ("content-type", "application/grpc+proto"),
            ("user-agent", _USER_AGENT),
        ]
        if grpc_timeout is not None:
            headers.append(("grpc-timeout", _format_timeout(grpc_timeout)))
        headers.extend(metadata)
        call = _Call(stream_id, method)
        self._calls[stream_id] = call
        try:
            self._h2.send_headers(stream_id, headers, end_stream=False)
            self._wake_writer()
            data = _MESSAGE_PREFIX.pack(False, len(request)) + request
            view = memoryview(data)
            while True:
                if call.error is not None:
                    raise call.error
                window = self._protocol.flow_control_window(stream_id)
                if window <= 0 and view:
                    await self._window.wait()
                    continue
                chunk, view = view[:window], view[window:]
                self._h2.send_data(stream_id, bytes(chunk), end_stream=not view)
                self._wake_writer()
                if not view:
                    break
        except h2.exceptions.StreamClosedError:
            self.finish(call)
            raise call.error or Unavailable("the server closed the stream") from None
        except h2.exceptions.TooManyStreamsError:
            self.finish(call)
            raise ResourceExhausted("too many concurrent calls on one connection") from None
        except h2.exceptions.ProtocolError as exc:
            self.finish(call)
            self.close(f"HTTP/2 error: {exc!r}")
            raise Unavailable(f"HTTP/2 error: {exc!r}") from None
        except BaseException:
            self.finish(call)
            raise
        return call

    async def receive(self, call: _Call) -> bytes | None:
        """The call's next message, or ``None`` once it ended with OK.

        Raises:
            ClientError: The call ended with an error status, was reset, or the
                connection ended.
        """
        while True:
            if call.messages:
                data, length = call.messages.popleft()
                if length and self._closed_reason is None:
                    self._protocol.acknowledge_received_data(call.stream_id, length)
                    self._wake_writer()
                return data
            if call.status is not None:
                code, message = call.status
                if code == 0:
                    return None
                raise error_for_code(code, message)
            if call.error is not None:
                raise call.error
            call.changed = trio.Event()
            await call.changed.wait()

    def finish(self, call: _Call) -> None:
        """Forget a call; reset its stream (RST_STREAM CANCEL) if it is still open."""
        if call.closed:
            return
        call.closed = True
        self._calls.pop(call.stream_id, None)
        if call.status is None and call.error is None and self._closed_reason is None:
            call.error = CallCancelled("cancelled by the client")
            try:
                self._h2.reset_stream(call.stream_id, h2.errors.ErrorCodes.CANCEL)
            except h2.exceptions.ProtocolError:
                pass  # never opened, or the server ended it meanwhile
            self._protocol.message_read_buffers.pop(call.stream_id, None)
            self._wake_writer()
        # Hand back the credit of messages nobody will read.
        unread = sum(length for _, length in call.messages)
        call.messages.clear()
        if unread and self._closed_reason is None:
            self._protocol.acknowledge_received_data(call.stream_id, unread)
            self._wake_writer()

    # -- I/O loops ------------------------------------------------------------------------

    def _wake_writer(self) -> None:
        self._wakeup.set()

    async def _write_loop(self) -> None:
        while True:
            data = self._protocol.data_to_send()
            if not data:
                await self._wakeup.wait()
                self._wakeup = trio.Event()
                continue
            try:
                await self._stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                self.close(f"connection lost while sending: {exc}")
                return

    async def _read_loop(self) -> str:
        while True:
            try:
                data = await self._stream.receive_some(_RECEIVE_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                return f"connection lost: {exc}"
            if not data:
                return "the server closed the connection"
            try:
                events = self._protocol.receive_data(data)
            except (GRPCError, h2.exceptions.ProtocolError, KeyError, ValueError) as exc:
                return f"protocol error from the server: {exc!r}"
            self._wake_writer()  # SETTINGS acks, PING acks, WINDOW_UPDATEs
            for event in events:
                if isinstance(event, _GoAway):
                    return f"the server sent GOAWAY (error code {event.error_code})"
                self._dispatch(event)

    def _dispatch(self, event: object) -> None:
        if isinstance(event, WindowUpdated):
            self._window.set()
            self._window = trio.Event()
            return
        if isinstance(event, _PingAcked):
            self._ping_acked.set()
            return
        stream_id = getattr(event, "stream_id", None)
        call = self._calls.get(stream_id) if stream_id is not None else None
        if isinstance(event, MessageReceived):
            if call is None:
                if event.flow_controlled_length:
                    self._protocol.acknowledge_received_data(
                        event.stream_id, event.flow_controlled_length
                    )
                return
            call.messages.append((event.data, event.flow_controlled_length))
            call.wake()
        elif isinstance(event, ResponseEnded):
            if call is not None:
                call.status = (event.status.int_value, event.status.status_message)
                self._calls.pop(event.stream_id, None)
                call.wake()
        elif isinstance(event, _StreamReset):
            if call is not None:
                code = event.error_code
                if code == h2.errors.ErrorCodes.REFUSED_STREAM:
                    call.error = Unavailable("the server refused the stream")
                elif code == h2.errors.ErrorCodes.CANCEL:
                    call.error = CallCancelled("the server cancelled the call")
                else:
                    call.error = Internal(f"the server reset the stream (error code {code})")
                self._calls.pop(event.stream_id, None)
                call.wake()
        elif isinstance(event, ResponseReceived):
            pass  # headers: nothing to do until messages or trailers arrive

    async def _probe_loop(self) -> None:
        while True:
            await self._probe_wanted.wait()
            self._probe_wanted = trio.Event()
            self._ping_acked = trio.Event()
            self._h2.ping(os.urandom(8))
            self._wake_writer()
            with trio.move_on_after(self._probe_timeout):
                await self._ping_acked.wait()
                continue
            self.close(f"the server did not answer a PING within {self._probe_timeout:g} s")
            return


async def _open_stream(host: str, port: int, ssl_context: ssl.SSLContext | None) -> trio.abc.Stream:
    tcp = await trio.open_tcp_stream(host, port)
    if ssl_context is None:
        return tcp
    # https_compatible=False: HTTP/2 peers may close without TLS close_notify.
    tls = trio.SSLStream(tcp, ssl_context, server_hostname=host, https_compatible=False)
    try:
        await tls.do_handshake()
    except BaseException:
        await trio.aclose_forcefully(tls)
        raise
    return tls


# ---------------------------------------------------------------------------------------------
# Client
# ---------------------------------------------------------------------------------------------


@attrs.define(eq=False)
class _PendingEnqueue:
    """One ``enqueue()`` call waiting for the batcher: the request and a one-shot slot."""

    request: pb.EnqueueJobRequest
    size: int
    deadline: float
    done: trio.Event = attrs.field(factory=trio.Event)
    job_id: str = ""
    error: ClientError | None = None
    #: The batch could not carry it (the server has no ``EnqueueJobs``, or rejected
    #: the batch as a whole for its size): the caller sends its own unary call.
    go_unary: bool = False
    #: The caller stopped waiting (cancelled or timed out): skip it if not yet sent.
    abandoned: bool = False

    def resolve(self, job_id: str = "", error: ClientError | None = None) -> None:
        if not self.done.is_set():
            self.job_id, self.error = job_id, error
            self.done.set()


def _check_batching(batch_max: int, batch_linger: float, batch_inflight: int) -> None:
    if batch_max < 1:
        raise ValueError("batch_max must be at least 1")
    if batch_linger < 0:
        raise ValueError("batch_linger must be >= 0")
    if batch_inflight < 1:
        raise ValueError("batch_inflight must be at least 1")


def _copy_error(exc: ClientError) -> ClientError:
    # One instance per waiting caller: an exception object raised in many tasks
    # would collect all their tracebacks.
    return type(exc)(exc.message)


class Client:
    """An async Stackduck client. Create it with :meth:`Client.connect`.

    A client is bound to the ``async with Client.connect(...)`` block that created it:
    its connections run in that block's nursery. Calls may be made concurrently from
    many tasks; they share one HTTP/2 connection, which is re-opened by the next call
    after it is lost.

    Every method raises a :class:`ClientError` subclass on failure: the status the
    server answered, :class:`Unavailable` when the server cannot be reached (or the
    connection is lost during the call), :class:`DeadlineExceeded` when no answer
    arrives within ``timeout``.
    """

    def __init__(
        self,
        address: str,
        *,
        nursery: trio.Nursery,
        token: str | None,
        ssl_context: ssl.SSLContext | None,
        timeout: float,
        connect_timeout: float,
        stream_idle_timeout: float,
        probe_timeout: float,
        max_message_size: int,
        batch_enqueue: bool = True,
        batch_max: int = DEFAULT_BATCH_MAX,
        batch_linger: float = 0.0,
        batch_inflight: int = DEFAULT_BATCH_INFLIGHT,
    ) -> None:
        # Private: use Client.connect(), which owns `nursery` for the client's lifetime.
        self.address = address
        self._host, self._port = parse_address(address)
        self._nursery = nursery
        self._ssl_context = ssl_context
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.stream_idle_timeout = stream_idle_timeout
        self._probe_timeout = probe_timeout
        self._max_message_size = max_message_size
        self._metadata: tuple[tuple[str, str], ...] = (
            (("authorization", f"Bearer {token}"),) if token else ()
        )
        self._channel: _Channel | None = None
        self._connect_lock = trio.Lock()
        self._closed = False
        self.connections = 0
        _check_batching(batch_max, batch_linger, batch_inflight)
        self._batch_enqueue = batch_enqueue
        self._batch_max = batch_max
        self._batch_linger = batch_linger
        self._batch_slots = trio.Semaphore(batch_inflight)
        self._batch_pending: collections.deque[_PendingEnqueue] = collections.deque()
        self._batch_wakeup = trio.Event()
        self._batcher_started = False
        #: Counters, see :meth:`statistics`.
        self._rpcs = 0
        self._enqueue_batches = 0
        self._enqueue_batched_jobs = 0

    @classmethod
    @asynccontextmanager
    async def connect(
        cls,
        address: str = "127.0.0.1:50051",
        *,
        token: str | None = None,
        tls: bool | ssl.SSLContext | None = None,
        timeout: float = DEFAULT_TIMEOUT,  # noqa: ASYNC109 - the deadline of each call
        connect_timeout: float | None = None,
        stream_idle_timeout: float = DEFAULT_STREAM_IDLE_TIMEOUT,
        probe_timeout: float = DEFAULT_PROBE_TIMEOUT,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        lazy: bool = False,
        batch_enqueue: bool = True,
        batch_max: int = DEFAULT_BATCH_MAX,
        batch_linger: float = 0.0,
        batch_inflight: int = DEFAULT_BATCH_INFLIGHT,
    ) -> AsyncIterator[Client]:
        """Connect to a server for the duration of an ``async with`` block.

        Args:
            address: ``HOST:PORT`` of the server.
            token: Bearer token, sent as ``authorization: Bearer <token>`` on every call.
            tls: ``True`` for TLS with the system's trust store, an ``ssl.SSLContext``
                for your own (ALPN ``h2`` is set on it), ``None``/``False`` for plaintext.
            timeout: Deadline of every call in seconds, connecting included.
            connect_timeout: Deadline of opening a connection (default: ``timeout``).
            stream_idle_timeout: A job stream that receives nothing (no job, no
                heartbeat) for this long is declared dead (:class:`Unavailable`). Keep it
                at about three times the server's heartbeat interval.
            probe_timeout: After a call times out, how long the server may take to
                answer a PING before the connection is declared dead.
            max_message_size: Largest response message accepted, in bytes.
            lazy: Do not connect now; the first call connects. By default the connection
                is opened at once, so a wrong address fails here.
            batch_enqueue: Coalesce concurrent :meth:`enqueue` calls into ``EnqueueJobs``
                batches (client-side group commit; see :meth:`enqueue`). ``False`` sends
                one unary ``EnqueueJob`` per call.
            batch_max: Most jobs per ``EnqueueJobs`` batch.
            batch_linger: Seconds the batcher waits for more calls before sending a
                batch. ``0`` (the default) sends at once while fewer than
                ``batch_inflight`` batches are in flight, so a lone sequential producer
                pays no added latency; calls made while that many are in flight go in
                the next one.
            batch_inflight: Most ``EnqueueJobs`` batches in flight at once (default
                4). A call does not wait behind a slow batch while a slot is free;
                under load, calls coalesce into at most this many concurrent batches.
                Jobs of concurrent calls in different batches are not ordered among
                themselves (an awaited call's job is always queued before the next).

        Yields:
            The client, usable inside the block only.

        Raises:
            Unavailable: ``lazy`` is false and the server cannot be reached.
            ValueError: ``address`` is not ``HOST:PORT``.
        """
        _check_batching(batch_max, batch_linger, batch_inflight)  # before the nursery
        ssl_context: ssl.SSLContext | None = None
        if isinstance(tls, ssl.SSLContext):
            ssl_context = tls
        elif tls:
            ssl_context = ssl.create_default_context()
        if ssl_context is not None:
            ssl_context.set_alpn_protocols(["h2"])
        body_error: BaseException | None = None
        async with trio.open_nursery() as nursery:
            client = cls(
                address,
                nursery=nursery,
                token=token,
                ssl_context=ssl_context,
                timeout=timeout,
                connect_timeout=timeout if connect_timeout is None else connect_timeout,
                stream_idle_timeout=stream_idle_timeout,
                probe_timeout=probe_timeout,
                max_message_size=max_message_size,
                batch_enqueue=batch_enqueue,
                batch_max=batch_max,
                batch_linger=batch_linger,
                batch_inflight=batch_inflight,
            )
            try:
                if not lazy:
                    with trio.move_on_after(client.connect_timeout) as scope:
                        await client._get_channel()
                    if scope.cancelled_caught:
                        raise Unavailable(
                            f"cannot connect to {address} within {client.connect_timeout:g} s"
                        )
                yield client
            except BaseException as exc:  # noqa: BLE001 - re-raised below, unchanged
                # Re-raised below, outside the nursery, so that the caller sees its own
                # exception and not an ExceptionGroup around it; Cancelled included.
                body_error = exc
            finally:
                client._close()
        if body_error is not None:
            try:
                raise body_error
            finally:
                body_error = None

    def _close(self) -> None:
        self._closed = True
        if self._channel is not None:
            self._channel.close("the client was closed")
        self._nursery.cancel_scope.cancel()

    # -- plumbing -----------------------------------------------------------------------

    async def _get_channel(self) -> _Channel:
        channel = self._channel
        if channel is not None and channel.usable:
            return channel
        async with self._connect_lock:
            channel = self._channel
            if channel is not None and channel.usable:
                return channel
            if self._closed:
                raise Unavailable("the client is closed")
            try:
                stream = await _open_stream(self._host, self._port, self._ssl_context)
            except (OSError, trio.BrokenResourceError, ssl.SSLError) as exc:
                raise Unavailable(f"cannot connect to {self.address}: {exc}") from exc
            channel = _Channel(
                stream,
                authority=f"{self._host}:{self._port}",
                scheme="https" if self._ssl_context is not None else "http",
                max_message_size=self._max_message_size,
                probe_timeout=self._probe_timeout,
            )
            self._nursery.start_soon(channel.run)
            self._channel = channel
            self.connections += 1
            return channel

    async def _connected(self, deadline: float) -> _Channel:
        """The live connection, opened if needed before ``deadline``.

        Raises:
            Unavailable: The server cannot be reached in time.
        """
        limit = min(deadline, trio.current_time() + self.connect_timeout)
        with trio.move_on_at(limit):
            return await self._get_channel()
        raise Unavailable(f"cannot connect to {self.address} within the deadline")

    def statistics(self) -> dict[str, int]:
        """Counters of this client, for tests and tuning.

        Returns:
            ``connections``: connections opened; ``rpcs``: unary RPCs started (each
            ``EnqueueJobs`` batch counts as one); ``enqueue_batches``: ``EnqueueJobs``
            calls made by the enqueue batcher; ``enqueue_batched_jobs``: jobs they
            carried.
        """
        return {
            "connections": self.connections,
            "rpcs": self._rpcs,
            "enqueue_batches": self._enqueue_batches,
            "enqueue_batched_jobs": self._enqueue_batched_jobs,
        }

    async def _unary(
        self,
        method: str,
        request: Message,
        response_type: type[_ResponseT],
        *,
        deadline: float | None = None,
    ) -> _ResponseT:
        now = trio.current_time()
        if deadline is None:
            timeout = self.timeout
            deadline = now + timeout
        else:
            timeout = max(deadline - now, 0.0)
        self._rpcs += 1
        channel = await self._connected(deadline)
        call: _Call | None = None
        with trio.move_on_at(deadline):
            try:
                call = await channel.start_call(
                    method,
                    request.SerializeToString(),
                    metadata=self._metadata,
                    grpc_timeout=max(deadline - trio.current_time(), 0.001),
                )
                data = await channel.receive(call)
                if data is None:
                    raise Internal(f"{method}: the server answered OK without a message")
                end = await channel.receive(call)
                if end is not None:
                    raise Internal(f"{method}: the server answered more than one message")
                try:
                    response: _ResponseT = response_type.FromString(data)
                except DecodeError:
                    raise Internal(f"{method}: malformed response from the server") from None
                return response
            finally:
                if call is not None:
                    channel.finish(call)
        # Only the deadline gets here: a hung call or a half-dead connection. The probe
        # tells them apart and closes the connection if the server no longer answers.
        channel.suspect()
        raise DeadlineExceeded(f"{method}: no answer within {timeout:g} s")

    # -- producers ----------------------------------------------------------------------

    async def enqueue(
        self,
        job_type: str,
        payload: object = None,
        *,
        priority: int | None = None,
        delay: int | None = None,
        max_retries: int | None = None,
        scheduled_at: datetime.datetime | float | str | None = None,
        idempotency_key: str | None = None,
    ) -> str:
        """Enqueue one job.

        Args:
            job_type: The job type (queue name); workers subscribe to types.
            payload: Any JSON-able value, or JSON text as ``str`` (see :func:`encode_payload`).
                ``None`` sends no payload (stored as ``{}``).
            priority: 1 (high) .. 3 (low); server default 2.
            delay: Backoff base in seconds (0..3600) for retries: the n-th retry waits
                ``min(delay * 2 ** n, 3600)`` seconds; server default 30. Use
                ``scheduled_at`` to run a job later.
            max_retries: 0..100 retries after failures; server default 2.
            scheduled_at: Do not deliver before this time: an aware ``datetime``, Unix
                seconds, or RFC 3339 text with an offset. ``None`` = now.
            idempotency_key: 1..200 printable ASCII characters. If a job with this key
                exists (until it is purged), none is created and its id is returned, so
                a retry after ``DeadlineExceeded`` or a network error is safe.

        Returns:
            The new job's id (or the existing job's, see ``idempotency_key``).

        Raises:
            InvalidArgument: A field is out of range or the payload is not JSON.
            ResourceExhausted: The payload is larger than the server allows.

        Batching: with ``batch_enqueue`` (the default, see :meth:`connect`), concurrent
        calls from many tasks are coalesced into ``EnqueueJobs`` batches (one group
        commit on the server for many jobs); a call made while fewer than
        ``batch_inflight`` batches are in flight is sent at once. Each call still gets
        its own result and the same exception a unary call would raise, and its own
        ``timeout``. A call cancelled (or timed out)
        before its batch is sent creates no job; once its batch is sent, the job may be
        created even though the caller no longer waits for the answer.
        """
        request = JobRequest(
            job_type=job_type,
            payload=payload,
            priority=priority,
            delay=delay,
            max_retries=max_retries,
            scheduled_at=scheduled_at,
            idempotency_key=idempotency_key,
        ).to_pb()
        if self._batch_enqueue:
            size = request.ByteSize()
            if size <= BATCH_MAX_BYTES:
                return await self._enqueue_batched(request, size)
        response = await self._unary("EnqueueJob", request, pb.EnqueueJobResponse)
        return str(response.job_id)

    # -- enqueue batching (client-side group commit) ------------------------------------
    #
    # enqueue() appends a _PendingEnqueue to _batch_pending and wakes the batcher, a
    # task in the client's nursery (started by the first batched call, ended with the
    # client). The batcher sends everything pending -- at most batch_max jobs and
    # BATCH_MAX_BYTES -- as one EnqueueJobs call, waits for its answer, and hands each
    # caller its own ItemResult: the job id, or the per-item status raised as the same
    # ClientError subclass and message a unary EnqueueJob would raise (the server maps
    # a rejection to a status the same way for both). Up to batch_inflight batches are
    # in flight, each in a task of its own; calls made while all slots are taken go in
    # the next one. An error of the batch call as a whole (transport, deadline, auth)
    # fails every caller in it with that error, except that
    # UNIMPLEMENTED (a server without EnqueueJobs: batching is switched off) and a
    # RESOURCE_EXHAUSTED batch of several jobs (too large for the server) make each
    # caller send its own unary call, so the outcome is the unary one.
    #
    # The batch call runs until the latest deadline among its callers; each caller
    # waits only until its own deadline. A caller that stops waiting (cancelled, timed
    # out) before its batch is sent is removed: its job is not created. Once sent, the
    # batch is not disturbed: the answer for that caller is dropped, and its job may
    # well have been created (as with a unary call cancelled in flight).

    async def _enqueue_batched(self, request: pb.EnqueueJobRequest, size: int) -> str:
        if self._closed:
            raise Unavailable("the client is closed")
        timeout = self.timeout
        item = _PendingEnqueue(request, size, trio.current_time() + timeout)
        if not self._batcher_started:
            self._batcher_started = True
            self._nursery.start_soon(self._enqueue_batcher)
        self._batch_pending.append(item)
        self._batch_wakeup.set()
        try:
            with trio.move_on_at(item.deadline):
                await item.done.wait()
        finally:
            if not item.done.is_set():
                item.abandoned = True
        if not item.done.is_set():
            raise DeadlineExceeded(f"EnqueueJob: no answer within {timeout:g} s")
        if item.go_unary:
            response = await self._unary("EnqueueJob", request, pb.EnqueueJobResponse)
            return str(response.job_id)
        if item.error is not None:
            raise item.error
        return item.job_id

    def _take_batch(self) -> list[_PendingEnqueue]:
        pending = self._batch_pending
        batch: list[_PendingEnqueue] = []
        size = 0
        while pending and len(batch) < self._batch_max:
            item = pending[0]
            if item.abandoned:
                pending.popleft()
                continue
            # ~8 bytes of framing per repeated field on top of the item itself.
            if batch and size + item.size + 8 > BATCH_MAX_BYTES:
                break
            pending.popleft()
            batch.append(item)
            size += item.size + 8
        return batch

    async def _enqueue_batcher(self) -> None:
        try:
            while True:
                while not self._batch_pending:
                    self._batch_wakeup = trio.Event()
                    await self._batch_wakeup.wait()
                if self._batch_linger > 0:
                    with trio.move_on_after(self._batch_linger):
                        while len(self._batch_pending) < self._batch_max:
                            self._batch_wakeup = trio.Event()
                            await self._batch_wakeup.wait()
                # A free slot first: while every slot is busy, calls pile up into
                # the next batch.
                await self._batch_slots.acquire()
                batch = self._take_batch()
                if not batch:
                    self._batch_slots.release()
                    continue
                self._nursery.start_soon(self._send_batch_in_slot, batch)
        finally:
            # The client is closing (its nursery is cancelled): nobody will send these.
            for item in self._batch_pending:
                item.resolve(error=Unavailable("the client is closed"))
            self._batch_pending.clear()

    async def _send_batch_in_slot(self, batch: list[_PendingEnqueue]) -> None:
        try:
            await self._send_batch(batch)
        finally:
            self._batch_slots.release()
            # Only a cancellation (the client closing) leaves items unresolved.
            for item in batch:
                item.resolve(error=Unavailable("the client is closed"))

    async def _send_batch(self, batch: list[_PendingEnqueue]) -> None:
        self._enqueue_batches += 1
        self._enqueue_batched_jobs += len(batch)
        request = pb.EnqueueJobsRequest(jobs=[item.request for item in batch])
        deadline = max(item.deadline for item in batch)
        try:
            response = await self._unary(
                "EnqueueJobs", request, pb.EnqueueJobsResponse, deadline=deadline
            )
            if len(response.results) != len(batch):
                raise Internal(
                    f"EnqueueJobs: {len(response.results)} results for {len(batch)} jobs"
                )
        except ClientError as exc:
            go_unary = isinstance(exc, Unimplemented) or (
                isinstance(exc, ResourceExhausted) and len(batch) > 1
            )
            if isinstance(exc, Unimplemented):
                self._batch_enqueue = False
            for item in batch:
                if go_unary:
                    item.go_unary = True
                    item.resolve()
                else:
                    item.resolve(error=_copy_error(exc))
            return
        except Exception as exc:  # noqa: BLE001 - a bug here must not kill the client
            for item in batch:
                item.resolve(error=Internal(f"EnqueueJobs batch failed: {exc!r}"))
            return
        for item, result in zip(batch, response.results, strict=True):
            if result.code == 0:
                item.resolve(job_id=str(result.job_id))
            else:
                item.resolve(error=error_for_code(result.code, result.message))

    async def enqueue_many(
        self, jobs: Iterable[JobRequest | Mapping[str, Any]]
    ) -> list[ItemResult]:
        """Enqueue many jobs in one call (one group commit on the server).

        Args:
            jobs: :class:`JobRequest` objects or dicts with the same keys
                (``job_type`` required; ``payload``, ``priority``, ``delay``,
                ``max_retries``, ``scheduled_at``, ``idempotency_key`` optional).

        Returns:
            One :class:`ItemResult` per job, in order; a rejected job does not stop the
            others (check :attr:`ItemResult.ok`).

        Raises:
            ResourceExhausted: More jobs than the server accepts in one batch (10,000),
                or a request larger than its message limit.
        """
        requests = [
            (job if isinstance(job, JobRequest) else JobRequest(**job)).to_pb() for job in jobs
        ]
        response = await self._unary(
            "EnqueueJobs", pb.EnqueueJobsRequest(jobs=requests), pb.EnqueueJobsResponse
        )
        return [ItemResult.from_pb(item) for item in response.results]

    async def get(self, job_id: str) -> JobInfo:
        """Look a job up by id.

        Raises:
            NotFound: No job with that id (or it was purged).
        """
        response = await self._unary("GetJob", pb.GetJobRequest(job_id=job_id), pb.GetJobResponse)
        return JobInfo.from_pb(response.job)

    async def cancel(self, job_id: str) -> JobInfo:
        """Cancel a job that has not finished.

        Returns:
            The cancelled job.

        Raises:
            NotFound: No such job.
            FailedPrecondition: The job is already completed, failed or cancelled.
        """
        response = await self._unary(
            "CancelJob", pb.CancelJobRequest(job_id=job_id), pb.CancelJobResponse
        )
        return JobInfo.from_pb(response.job)

    # -- administration -----------------------------------------------------------------

    async def stats(self) -> Stats:
        """Queue statistics: per job type, workers, running, dead, backend health."""
        response = await self._unary("GetStats", pb.GetStatsRequest(), pb.GetStatsResponse)
        return Stats(
            types=tuple(
                TypeStats(
                    job_type=t.job_type,
                    queued_p1=t.queued_p1,
                    queued_p2=t.queued_p2,
                    queued_p3=t.queued_p3,
                    scheduled=t.scheduled,
                    running=t.running,
                    dead=t.dead,
                    paused=t.paused,
                    workers=t.workers,
                    completed=t.completed,
                    failed=t.failed,
                    retried=t.retried,
                    rate_limit=t.rate_limit,
                    rate_burst=t.rate_burst,
                    max_running=t.max_running,
                    throttled=t.throttled,
                )
                for t in response.types
            ),
            workers=response.workers,
            running=response.running,
            dead=response.dead,
            backends=tuple(
                BackendState(name=b.name, kind=b.kind, state=b.state) for b in response.backends
            ),
            queue_route=response.queue_route,
            route_reason=response.route_reason,
        )

    async def list_dead_jobs(
        self, job_type: str | None = None, *, limit: int = 100, page_token: str = ""
    ) -> DeadJobsPage:
        """One page of the dead-letter queue.

        Args:
            job_type: Only this type (``None`` = every type).
            limit: Page size, 1..1000.
            page_token: ``next_page_token`` of the previous page ("" = first page).

        Raises:
            InvalidArgument: ``limit`` out of range or a foreign ``page_token``.
        """
        response = await self._unary(
            "ListDeadJobs",
            pb.ListDeadJobsRequest(job_type=job_type or "", limit=limit, page_token=page_token),
            pb.ListDeadJobsResponse,
        )
        return DeadJobsPage(
            jobs=tuple(JobInfo.from_pb(job) for job in response.jobs),
            next_page_token=response.next_page_token,
        )

    async def dead_jobs(
        self, job_type: str | None = None, limit: int | None = 100, *, page_size: int = 100
    ) -> list[JobInfo]:
        """Dead jobs, following pages until ``limit`` jobs (``None``: all of them).

        Args:
            job_type: Only this type (``None`` = every type).
            limit: At most this many jobs; ``None`` for every dead job.
            page_size: Jobs per call (1..1000).
        """
        jobs: list[JobInfo] = []
        token = ""
        while limit is None or len(jobs) < limit:
            want = page_size if limit is None else min(page_size, limit - len(jobs))
            page = await self.list_dead_jobs(job_type, limit=want, page_token=token)
            jobs.extend(page.jobs)
            token = page.next_page_token
            if not token:
                break
        return jobs

    async def requeue_dead(
        self, job_ids: Sequence[str] | None = None, *, job_type: str | None = None
    ) -> BatchResult:
        """Send dead jobs back to the queue (attempts reset).

        Args:
            job_ids: These jobs, or
            job_type: every dead job of this type (``"*"`` for every type). Give exactly
                one of the two.

        Raises:
            InvalidArgument: Both or neither of ``job_ids`` and ``job_type``.
        """
        response = await self._unary(
            "RequeueDeadJobs",
            pb.RequeueDeadJobsRequest(job_ids=list(job_ids or ()), job_type=job_type or ""),
            pb.RequeueDeadJobsResponse,
        )
        return BatchResult(
            count=response.count, results=tuple(ItemResult.from_pb(r) for r in response.results)
        )

    async def purge_dead(
        self, job_ids: Sequence[str] | None = None, *, job_type: str | None = None
    ) -> BatchResult:
        """Delete dead jobs for good; arguments as for :meth:`requeue_dead`."""
        response = await self._unary(
            "PurgeDeadJobs",
            pb.PurgeDeadJobsRequest(job_ids=list(job_ids or ()), job_type=job_type or ""),
            pb.PurgeDeadJobsResponse,
        )
        return BatchResult(
            count=response.count, results=tuple(ItemResult.from_pb(r) for r in response.results)
        )

    async def pause(self, job_type: str) -> None:
        """Stop delivering jobs of a type (enqueues are still accepted)."""
        await self._unary(
            "PauseJobType", pb.PauseJobTypeRequest(job_type=job_type), pb.PauseJobTypeResponse
        )

    async def resume(self, job_type: str) -> None:
        """Resume delivering jobs of a paused type."""
        await self._unary(
            "ResumeJobType", pb.ResumeJobTypeRequest(job_type=job_type), pb.ResumeJobTypeResponse
        )

    async def set_limits(
        self, job_type: str, *, rate: float = 0.0, burst: int = 0, max_running: int = 0
    ) -> TypeLimits:
        """Set the rate and concurrency limits of a job type, for the whole cluster.

        Jobs held back by a limit wait in the queue; they are not failed.

        Args:
            job_type: The type.
            rate: Jobs per second that may start (0: no rate limit).
            burst: Jobs that may start at once after a quiet period (needs a
                rate; 0 means 1).
            max_running: Jobs of the type running at most, across every
                worker and server instance (0: no limit).

        Calling with neither ``rate`` nor ``max_running`` clears the limits.

        Raises:
            InvalidArgument: A value out of range (the message names it).
        """
        response = await self._unary(
            "SetJobTypeLimits",
            pb.SetJobTypeLimitsRequest(
                job_type=job_type, rate=rate, burst=burst, max_running=max_running
            ),
            pb.SetJobTypeLimitsResponse,
        )
        return TypeLimits(
            job_type=response.job_type,
            rate=response.rate,
            burst=response.burst,
            max_running=response.max_running,
        )

    # -- workers ------------------------------------------------------------------------

    async def complete(self, job_id: str, lease_id: str | None) -> None:
        """Report a delivered job as done.

        Args:
            job_id: The job.
            lease_id: The delivery's lease (:attr:`JobInfo.lease_id`); ``None`` means
                "the current lease" (no fencing: avoid in workers).

        Raises:
            FailedPrecondition: The lease is stale (expired, or the job was redelivered)
                or the job is not running.
            NotFound: No such job.
        """
        await self._unary(
            "CompleteJob",
            pb.CompleteJobRequest(job_id=job_id, lease_id=lease_id or ""),
            pb.CompleteJobResponse,
        )

    async def fail(self, job_id: str, lease_id: str | None, error: str) -> str:
        """Report a delivered job as failed: retried with backoff, or dead-lettered.

        Returns:
            The job's new status: ``scheduled`` (retry later), ``queued`` or ``failed``
            (dead-lettered).

        Raises:
            FailedPrecondition: Stale lease, or the job is not running.
            NotFound: No such job.
        """
        response = await self._unary(
            "FailJob",
            pb.FailJobRequest(job_id=job_id, lease_id=lease_id or "", error_message=error),
            pb.FailJobResponse,
        )
        return str(response.status)

    async def ack_many(self, acks: Iterable[Ack]) -> list[ItemResult]:
        """Complete and fail many delivered jobs in one call.

        Returns:
            One :class:`ItemResult` per ack, in order (a stale lease is
            ``FAILED_PRECONDITION`` for that item only).
        """
        request = pb.AckJobsRequest(
            acks=[
                pb.Ack(
                    job_id=a.job_id,
                    lease_id=a.lease_id or "",
                    failed=a.failed,
                    error_message=a.error,
                    release=a.release,
                )
                for a in acks
            ]
        )
        response = await self._unary("AckJobs", request, pb.AckJobsResponse)
        return [ItemResult.from_pb(item) for item in response.results]

    async def extend_lease(
        self, job_id: str, lease_id: str | None, seconds: int | None = None
    ) -> float:
        """Push a delivery's lease expiry to ``now + seconds`` (heartbeat for long jobs).

        Args:
            job_id: The job.
            lease_id: The delivery's lease.
            seconds: New lease length, 1..86400 (default: the server's lease setting).

        Returns:
            The new expiry, Unix seconds.

        Raises:
            FailedPrecondition: The lease is stale; the job may already run elsewhere.
        """
        request = pb.ExtendLeaseRequest(job_id=job_id, lease_id=lease_id or "")
        if seconds is not None:
            request.lease_seconds = seconds
        response = await self._unary("ExtendLease", request, pb.ExtendLeaseResponse)
        return float(response.lease_expires_at_ms) / 1000

    async def dequeue(
        self, job_type: str, *, worker_id: str = "", lease_seconds: int | None = None
    ) -> JobInfo | None:
        """Pull one ready job under a lease (unary; prefer :meth:`consume`).

        Returns:
            The delivered job, or ``None`` when no job of that type is ready.
        """
        request = pb.DequeueJobRequest(queue_name=job_type, worker_id=worker_id)
        if lease_seconds is not None:
            request.lease_seconds = lease_seconds
        try:
            response = await self._unary("DequeueJob", request, pb.DequeueJobResponse)
        except NotFound:
            return None
        return JobInfo.from_pb(response.job)

    def consume(
        self,
        job_types: Sequence[str],
        *,
        worker_id: str = "",
        prefetch: int = 1,
        lease_seconds: int | None = None,
        idle_timeout: float | None = None,
    ) -> JobStream:
        """Open a job stream (``ConsumeJobs``): jobs are pushed as they become ready.

        Use it as ``async with client.consume(...) as jobs: async for job in jobs: ...``.
        At most ``prefetch`` delivered jobs are un-acked at a time; ack each one with
        :meth:`complete`, :meth:`fail` or :meth:`ack_many`. Leaving the block resets the
        stream, and the server requeues at once every job of it still un-acked.

        Args:
            job_types: Job types to receive (at least one).
            worker_id: Shown in job records and stats (default: the client's address).
            prefetch: Un-acked jobs the server may push at once, 1..1000.
            lease_seconds: Lease of each delivery (default: the server's setting).
            idle_timeout: Silence (no job, no heartbeat) after which the stream raises
                :class:`Unavailable` (default: the client's ``stream_idle_timeout``).
        """
        request = pb.ConsumeJobsRequest(worker_id=worker_id, job_types=list(job_types))
        request.prefetch = prefetch
        if lease_seconds is not None:
            request.lease_seconds = lease_seconds
        return JobStream(
            self,
            request,
            idle_timeout=self.stream_idle_timeout if idle_timeout is None else idle_timeout,
        )


class JobStream:
    """The jobs of one ``ConsumeJobs`` stream; see :meth:`Client.consume`.

    An async iterator of :class:`JobInfo` (heartbeats are skipped) and an async context
    manager that resets the stream on exit. Iteration raises :class:`Unavailable` when
    the server goes away or stays silent longer than ``idle_timeout``, and the status
    error the server ends the stream with (e.g. :class:`InvalidArgument`).

    Attributes:
        messages: Messages received so far, heartbeats included.
        heartbeats: Heartbeats received so far.
        last_message_at: ``trio.current_time()`` of the last message (or of the opening).
    """

    def __init__(
        self, client: Client, request: pb.ConsumeJobsRequest, *, idle_timeout: float
    ) -> None:
        self._client = client
        self._request = request
        self.idle_timeout = idle_timeout
        self._channel: _Channel | None = None
        self._call: _Call | None = None
        self._closed = False
        self.messages = 0
        self.heartbeats = 0
        self.last_message_at = 0.0

    async def open(self) -> None:
        """Send the request (done by ``async with`` or the first iteration).

        Raises:
            Unavailable: The server cannot be reached.
        """
        if self._call is not None:
            return
        if self._closed:
            raise RuntimeError("this job stream is closed")
        client = self._client
        deadline = trio.current_time() + client.timeout
        channel = await client._connected(deadline)
        with trio.move_on_at(deadline):
            self._call = await channel.start_call(
                "ConsumeJobs",
                self._request.SerializeToString(),
                metadata=client._metadata,
                grpc_timeout=None,
            )
            self._channel = channel
        if self._call is None:
            channel.suspect()
            raise Unavailable(f"cannot open a job stream within {client.timeout:g} s")
        self.last_message_at = trio.current_time()

    @property
    def alive(self) -> bool:
        """Whether the stream is open and its connection usable (acks are still accepted)."""
        call = self._call
        return (
            call is not None
            and not call.closed
            and call.status is None
            and call.error is None
            and self._channel is not None
            and self._channel.usable
        )

    async def aclose(self) -> None:
        """Reset the stream; the server requeues its un-acked jobs at once."""
        self._closed = True
        if self._channel is not None and self._call is not None:
            self._channel.finish(self._call)
        await trio.lowlevel.checkpoint()

    async def __aenter__(self) -> JobStream:
        await self.open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def __aiter__(self) -> JobStream:
        return self

    async def __anext__(self) -> JobInfo:
        await self.open()
        assert self._channel is not None and self._call is not None
        channel, call = self._channel, self._call
        while True:
            data: bytes | None = None
            received = False
            with trio.move_on_after(self.idle_timeout):
                data = await channel.receive(call)
                received = True
            if not received:
                reason = f"no message on the job stream for {self.idle_timeout:g} s"
                # Heartbeats stopped: the server (or the path to it) is dead. Close the
                # connection, so that every call on it fails now and the next reconnects.
                channel.close(reason + "; the server is presumed dead")
                await self.aclose()
                raise Unavailable(reason)
            self.last_message_at = trio.current_time()
            if data is None:
                await self.aclose()
                raise StopAsyncIteration
            self.messages += 1
            try:
                message = pb.JobMessage.FromString(data)
            except DecodeError:
                raise Internal("ConsumeJobs: malformed message from the server") from None
            if not message.HasField("job"):
                self.heartbeats += 1
                continue
            return JobInfo.from_pb(message.job)
