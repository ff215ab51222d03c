"""A small gRPC server on trio, built from purerpc's sans-IO protocol layer.

Theory of operation
===================

purerpc 0.8.0 ships two layers. The lower one, ``purerpc.grpclib.connection.GRPCConnection``,
is a synchronous, I/O-free translator between h2 and gRPC: bytes in, gRPC events out
(``RequestReceived``, ``MessageReceived``, ``RequestEnded``, ``WindowUpdated``), plus methods
that queue HEADERS / DATA / trailers. The upper one (``GRPCSocket``/``GRPCStream``/``Server``)
does the I/O and the dispatch, and that is where the measured defects live (see
``design/STACK_NOTES.md``): a client's RST_STREAM or disconnect never cancels a handler, an
oversized message kills the whole connection, exceptions leak ``repr()`` to the client, the
listener uses ``SO_REUSEPORT`` on all interfaces, ``grpc-timeout`` is ignored, each stream has
an unbounded inbox, and per-stream parse state is never freed for reset streams.

So this module keeps the lower layer (HTTP/2 framing, HPACK, flow-control bookkeeping, header
parsing and gRPC message framing all stay purerpc's and h2's) and replaces the upper one with a
trio-native connection loop. ``_GrpcServerProtocol`` subclasses ``GRPCConnection`` only to
surface what it drops or mishandles:

* h2 ``StreamReset`` -> ``_StreamReset``: the client cancelled the call (grpcio
  ``call.cancel()``, a client-side deadline, a dropped iterator).
* h2 ``ConnectionTerminated`` (GOAWAY from the client) -> ``_PeerWentAway``. h2 3.2 refuses to
  send anything after a GOAWAY was received, so the connection is finished at that point.
* message-level errors (oversized message, unsupported compression, malformed headers) become
  ``_RequestRejected`` for *that stream* instead of an exception that tears down the connection.
* inbound flow-control credit is returned per complete message and for every discarded byte,
  so rejected and reset streams cannot leak connection window.

Lifetimes (STYLE.md section 5):

* ``RpcServer.serve`` owns the listener; ``trio.serve_listeners`` runs one task per connection.
* A connection (``_Connection.run``) owns two nurseries. The outer one runs the writer task;
  the inner one ("the calls nursery") runs one task per HTTP/2 stream, each inside its own
  ``trio.CancelScope`` (``_Call.scope``). The reader loop runs in the connection task itself.
* RST_STREAM -> the reader cancels that call's scope; the handler sees ``trio.Cancelled`` at
  its next checkpoint (~1 ms). EOF, a socket error, a GOAWAY, an HTTP/2 protocol error, or a
  failed write -> the reader stops and the calls nursery is cancelled: every handler of the
  connection is cancelled at once and the connection closes only after their ``finally``
  blocks have run. Handlers therefore clean up (requeue leases, ...) with ordinary trio code.
* A call's ``grpc-timeout`` becomes a ``trio.move_on_at`` around auth + request + handler;
  expiry answers DEADLINE_EXCEEDED.

Error mapping (nothing reaches the client as a Python ``repr``):

* ``RpcError(status, message)`` -> that status and message (also when it is the only kind of
  exception inside an ``ExceptionGroup`` raised out of a handler's nursery);
* request bytes that do not parse -> INVALID_ARGUMENT "malformed request";
* request message larger than ``max_message_size`` -> RESOURCE_EXHAUSTED on that stream only;
  the connection stays usable;
* unknown path, or an RPC the implementation does not define -> UNIMPLEMENTED;
* any other ``Exception`` -> INTERNAL "internal error", traceback logged on ``stackduck.rpc``.
* ``trio.Cancelled`` and other ``BaseException`` are never caught.

Status trailers are built here (``_status_trailers``), not by purerpc's ``respond_status`` /
``end_response``: those percent-encode ``grpc-message`` with ``urllib.parse.quote(msg,
safe='')``, which also escapes ``:/?#@&=+$,;`` and space. The gRPC HTTP/2 spec leaves printable
ASCII except ``%`` literal, and clients decode only what it says: grpc-js shows
``authorization%3A Bearer`` for ``authorization: Bearer``. ``encode_grpc_message`` follows the
spec exactly.

Writing: handlers queue bytes into h2's outbound buffer and wake a single writer task per
connection, which sends everything queued in one ``send_all``. Messages produced in the same
scheduler tick (many streams, or a burst on one stream) leave in one syscall, and a message is
on the wire one scheduler tick after it was produced. Backpressure: a sender waits for the
peer's HTTP/2 flow-control window, and for the writer once more than ``_WRITE_HIGH_WATER`` bytes
are queued but unsent.

Server-streaming handlers are async generators. They must not ``yield`` inside a nursery or a
cancel scope (trio's async-generator rule, PEP 789): the generator is iterated from the call
task, and a scope left open across a ``yield`` corrupts that task's cancel-scope stack. Open
such scopes around the ``await``s between yields instead.

Known limitations: no compression (a compressed request gets UNIMPLEMENTED; responses are never
compressed); client-streaming and bidirectional RPCs are not served (UNIMPLEMENTED); no custom
response metadata; shutdown is abrupt (cancelling ``serve`` cancels all calls; no GOAWAY drain);
a header value that is not UTF-8 ends the whole connection with GOAWAY(PROTOCOL_ERROR), because
h2 raises in the middle of a frame; purerpc's limits stay (MAX_CONCURRENT_STREAMS 65536, a 1 GiB
connection receive window), so per-connection memory is bounded by those, not by a quota;
a silent network partition is only noticed by TCP keepalive or a failed write (leases with
expiry and stream heartbeats cover that, see STACK_NOTES.md).
"""

from __future__ import annotations

import contextlib
import enum
import inspect
import logging
import math
import socket
import ssl
import struct
import sys
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from typing import Any, Final, NoReturn

import attrs
import h2.errors  # type: ignore[import-untyped]
import h2.events  # type: ignore[import-untyped]
import h2.exceptions  # type: ignore[import-untyped]
import trio
from google.protobuf.descriptor import ServiceDescriptor  # type: ignore[import-untyped]
from google.protobuf.message import DecodeError, Message  # type: ignore[import-untyped]
from google.protobuf.message_factory import GetMessageClass  # type: ignore[import-untyped]
from purerpc.grpclib.config import GRPCConfiguration  # type: ignore[import-untyped]
from purerpc.grpclib.connection import GRPCConnection  # type: ignore[import-untyped]
from purerpc.grpclib.events import (  # type: ignore[import-untyped]
    MessageReceived,
    RequestEnded,
    RequestReceived,
    WindowUpdated,
)
from purerpc.grpclib.exceptions import (  # type: ignore[import-untyped]
    GRPCError,
    MessageTooLargeError,
    UnsupportedMessageEncodingError,
)
from purerpc.grpclib.status import Status, StatusCode  # type: ignore[import-untyped]

__all__ = [
    "DEFAULT_MAX_MESSAGE_SIZE",
    "CallContext",
    "Method",
    "MethodKind",
    "RpcError",
    "RpcServer",
    "RpcStatistics",
    "StatusCode",
    "encode_grpc_message",
    "method_table",
    "serve_rpc",
    "server_ssl_context",
]

log = logging.getLogger("stackduck.rpc")

#: Same default as grpcio's receive limit, so both ends agree out of the box.
DEFAULT_MAX_MESSAGE_SIZE: Final = 4 * 1024 * 1024

# purerpc advertises an initial stream window of 2 * max_message_size; HTTP/2 caps windows
# at 2**31 - 1, which bounds the message size we can configure.
_MAX_MESSAGE_SIZE_LIMIT: Final = 2**30 - 1
# trio's own default: a bigger buffer makes every small read allocate (and free) more.
_RECEIVE_SIZE: Final = 65536
# Queued-but-unsent bytes above which a sender waits for the writer (see _send_message).
_WRITE_HIGH_WATER: Final = 256 * 1024
_TLS_HANDSHAKE_TIMEOUT: Final = 10.0
# Bounded wait for the GOAWAY we owe a peer that broke the HTTP/2 protocol.
_GOODBYE_TIMEOUT: Final = 1.0
# Kernel clamps this to net.core.somaxconn (trio uses the same value).
_LISTEN_BACKLOG: Final = 0xFFFF
# gRPC length-prefixed message: 1-byte compressed flag + 4-byte big-endian length.
_MESSAGE_PREFIX: Final = struct.Struct(">?I")
_CONTENT_TYPE_SUFFIX: Final = "+proto"
# grpc-message bytes sent as they are (the spec's Percent-Byte-Unencoded): space and VCHAR
# except "%". Every other byte of the message's UTF-8 encoding is sent as %XX.
_MESSAGE_LITERAL: Final = frozenset(range(0x20, 0x7F)) - {ord("%")}


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------


def encode_grpc_message(message: str) -> str:
    """Percent-encode a status message for the ``grpc-message`` trailer, as the gRPC spec says.

    ``Percent-Encoded -> 1*(Percent-Byte-Unencoded / Percent-Byte-Encoded)``: space and
    printable ASCII except ``%`` (0x20-0x24, 0x26-0x7E) stay as they are; ``%``, control
    characters and every byte of a non-ASCII character's UTF-8 encoding become ``%XX``
    (upper-case hex). Any client decodes it: grpcio and grpc-go by the spec, grpc-js with
    ``decodeURI``, purerpc with ``urllib.parse.unquote``.

    One addition: a space at the very start or end is sent as ``%20`` (also valid per the
    spec), because HTTP/2 field values may not begin or end with whitespace -- h2 would
    strip it and strict peers would refuse the trailer. A lone surrogate (not UTF-8) is
    sent as its backslash escape.
    """
    data = message.encode("utf-8", "backslashreplace")
    last = len(data) - 1
    return "".join(
        chr(byte)
        if byte in _MESSAGE_LITERAL and not (byte == 0x20 and (i == 0 or i == last))
        else f"%{byte:02X}"
        for i, byte in enumerate(data)
    )


class RpcError(Exception):
    """Raise from a handler (or the ``authenticate`` hook) to answer with a gRPC status.

    Args:
        status: The gRPC status code; must not be ``StatusCode.OK``.
        message: Human-readable detail sent to the client as ``grpc-message``.
    """

    def __init__(self, status: StatusCode, message: str) -> None:
        if status is StatusCode.OK:
            raise ValueError("RpcError needs an error status, not OK")
        super().__init__(status, message)
        self.status: StatusCode = status
        self.message: str = message

    def __str__(self) -> str:
        return f"{self.status.name}: {self.message}"


@attrs.frozen
class CallContext:
    """What a handler knows about the call besides the request message.

    Attributes:
        method: The full path, e.g. ``"/grpc.health.v1.Health/Check"``.
        metadata: Request metadata without reserved headers; ``-bin`` values are ``bytes``.
        peer: The client address, ``"ipv4:127.0.0.1:50412"`` style (as grpcio reports it).
        deadline: The call's deadline on the trio clock, or ``None`` without ``grpc-timeout``.
    """

    method: str
    metadata: tuple[tuple[str, str | bytes], ...]
    peer: str
    deadline: float | None


class MethodKind(enum.Enum):
    """RPC shapes this server can serve."""

    UNARY = "unary"
    SERVER_STREAMING = "server_streaming"
    #: Client-streaming and bidirectional RPCs: always answered UNIMPLEMENTED.
    UNSUPPORTED = "unsupported"


#: ``async def Check(self, request, ctx) -> Response``
UnaryHandler = Callable[[Any, CallContext], Awaitable[Message]]
#: ``async def Watch(self, request, ctx) -> AsyncGenerator[Response, None]`` (uses ``yield``)
StreamHandler = Callable[[Any, CallContext], AsyncGenerator[Message, None]]


@attrs.frozen
class Method:
    """One entry of a method table. ``handler is None`` answers UNIMPLEMENTED."""

    kind: MethodKind
    request_cls: type[Message]
    response_cls: type[Message]
    handler: UnaryHandler | StreamHandler | None


@attrs.frozen
class RpcStatistics:
    """Snapshot of what a server currently holds (trio's ``statistics()`` convention).

    Attributes:
        connections: Open client connections (including ones still in the TLS handshake).
        active_calls: Calls whose task has not finished yet; 0 when idle proves there are no
            zombie handlers.
    """

    connections: int
    active_calls: int


def method_table(service: ServiceDescriptor, implementation: object) -> dict[str, Method]:
    """Build the method table of one protobuf service from an implementation object.

    Handlers are looked up on ``implementation`` by the RPC name exactly as written in the
    ``.proto`` file (CamelCase, e.g. ``EnqueueJob``), the same convention as grpcio servicers.
    A missing attribute maps to UNIMPLEMENTED. Merge the tables of several services with
    ``{**method_table(a, impl_a), **method_table(b, impl_b)}``.

    Args:
        service: e.g. ``health_pb2.DESCRIPTOR.services_by_name["Health"]``.
        implementation: Object whose ``async def`` / async-generator methods serve the RPCs.

    Returns:
        ``{"/package.Service/Method": Method}`` for every RPC of the service.

    Raises:
        TypeError: A handler has the wrong shape (a unary RPC needs an ``async def``, a
            server-streaming RPC an async generator function), or the implementation defines
            a client-streaming/bidirectional RPC, which this server cannot serve.
    """
    table: dict[str, Method] = {}
    for rpc in service.methods:
        path = f"/{service.full_name}/{rpc.name}"
        handler = getattr(implementation, rpc.name, None)
        if rpc.client_streaming:
            kind = MethodKind.UNSUPPORTED
        elif rpc.server_streaming:
            kind = MethodKind.SERVER_STREAMING
        else:
            kind = MethodKind.UNARY
        if handler is not None:
            # Fail at startup, not on the first call: a plain `def`, or a coroutine where a
            # generator is needed, would otherwise only surface as INTERNAL at runtime.
            if kind is MethodKind.UNSUPPORTED:
                raise TypeError(f"{path}: client-streaming RPCs are not supported")
            if kind is MethodKind.UNARY and not inspect.iscoroutinefunction(handler):
                raise TypeError(f"{path}: a unary handler must be an `async def`")
            if kind is MethodKind.SERVER_STREAMING and not inspect.isasyncgenfunction(handler):
                raise TypeError(f"{path}: a server-streaming handler must be an async generator")
        table[path] = Method(
            kind=kind,
            request_cls=GetMessageClass(rpc.input_type),
            response_cls=GetMessageClass(rpc.output_type),
            handler=handler,
        )
    return table


def server_ssl_context(certfile: str, keyfile: str) -> ssl.SSLContext:
    """Return a server TLS context suitable for gRPC.

    grpcio clients refuse a TLS server that does not negotiate ALPN ``h2``, so it is set here.

    Args:
        certfile: PEM certificate chain.
        keyfile: PEM private key.
    """
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    # HTTP/2 over TLS requires TLS 1.2+ (RFC 7540 section 9.2).
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(certfile, keyfile)
    context.set_alpn_protocols(["h2"])
    return context


class RpcServer:
    """A gRPC server for a method table. Constructing it starts nothing.

    Args:
        methods: ``{path: Method}``, usually from :func:`method_table`.
        max_message_size: Largest request message accepted, in bytes; a larger one is answered
            RESOURCE_EXHAUSTED on its own stream. Responses are not limited here.
        authenticate: Called before every call (before the method lookup, so unknown paths
            cannot be probed without credentials); raise ``RpcError(UNAUTHENTICATED, ...)`` to
            reject. It is synchronous: a check that needs I/O belongs in the handlers.
    """

    def __init__(
        self,
        methods: Mapping[str, Method],
        *,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        authenticate: Callable[[CallContext], None] | None = None,
    ) -> None:
        if not 0 < max_message_size <= _MAX_MESSAGE_SIZE_LIMIT:
            raise ValueError(f"max_message_size must be in 1..{_MAX_MESSAGE_SIZE_LIMIT}")
        self._methods = dict(methods)
        self._max_message_size = max_message_size
        self._authenticate = authenticate
        self._connections = 0
        self._active_calls = 0
        self._active_unary = 0  # calls that are not server streams
        self._live: set[_Connection] = set()

    def statistics(self) -> RpcStatistics:
        """Return how many connections and running calls the server holds right now."""
        return RpcStatistics(connections=self._connections, active_calls=self._active_calls)

    async def wait_quiet(self) -> None:
        """Wait until no unary call runs and every answer has been handed to its socket.

        For graceful shutdown: the caller stops new work elsewhere (the broker
        refuses it), waits here under a timeout, then cancels :meth:`serve`,
        so the last answers (acks waiting for their commit) are not cut off.
        Server streams are not waited for: they never end by themselves.
        """
        # A shutdown-only wait on counters that several tasks change: polling
        # keeps the hot path free of bookkeeping for a rare event.
        while self._active_unary or not all(c.flushed for c in self._live):  # noqa: ASYNC110
            await trio.sleep(0.005)

    async def serve(
        self,
        *,
        host: str,
        port: int,
        ssl_context: ssl.SSLContext | None = None,
        task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
    ) -> NoReturn:
        """Listen on exactly ``host:port`` and serve until cancelled.

        Args:
            host: Address to bind, e.g. ``"127.0.0.1"``, ``"::1"`` or ``"0.0.0.0"``. A name is
                resolved and its first address used: one socket, never several.
            port: TCP port; 0 picks a free one.
            ssl_context: Serve TLS with this context (see :func:`server_ssl_context`).
            task_status: Receives the bound port once the socket is listening.

        Raises:
            OSError: The address cannot be bound, e.g. ``EADDRINUSE`` when another server
                (or another instance) already listens on the port: ``SO_REUSEPORT`` is never
                set, so two servers cannot silently share a port.
        """
        tcp_listener = await _bind_tcp(host, port)
        bound_port: int = tcp_listener.socket.getsockname()[1]
        listener: trio.abc.Listener[trio.abc.Stream] = tcp_listener
        if ssl_context is not None:
            # https_compatible=False: HTTP/2 peers may close without TLS close_notify.
            listener = trio.SSLListener(tcp_listener, ssl_context, https_compatible=False)
        async with listener:  # closed even if cancelled before serve_listeners takes over
            task_status.started(bound_port)
            await trio.serve_listeners(self._handle_connection, [listener])

    async def _handle_connection(self, stream: trio.abc.Stream) -> None:
        # serve_listeners lets a handler's exception crash the whole server, so this is the
        # last line of defence: one broken connection must never take the others down.
        self._connections += 1
        peer = _peer_name(stream)
        try:
            if isinstance(stream, trio.SSLStream):
                with trio.move_on_after(_TLS_HANDSHAKE_TIMEOUT) as handshake_scope:
                    try:
                        await stream.do_handshake()
                    except trio.BrokenResourceError as exc:
                        log.debug("TLS handshake with %s failed: %r", peer, exc.__cause__)
                        return
                if handshake_scope.cancelled_caught:
                    log.debug("TLS handshake with %s timed out", peer)
                    return
            connection = _Connection(self, stream, peer)
            self._live.add(connection)
            try:
                await connection.run()
            finally:
                self._live.discard(connection)
        except Exception:
            log.exception("connection from %s failed", peer)
        finally:
            self._connections -= 1
            # serve_listeners also closes the stream; doing it here frees the socket before
            # the counter above could be read as "closed" by a test polling statistics().
            await trio.aclose_forcefully(stream)


async def serve_rpc(
    methods: Mapping[str, Method],
    *,
    host: str,
    port: int,
    ssl_context: ssl.SSLContext | None = None,
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
    authenticate: Callable[[CallContext], None] | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Shorthand for ``RpcServer(methods, ...).serve(...)`` when statistics are not needed."""
    server = RpcServer(methods, max_message_size=max_message_size, authenticate=authenticate)
    await server.serve(host=host, port=port, ssl_context=ssl_context, task_status=task_status)


# ---------------------------------------------------------------------------------------------
# Listener
# ---------------------------------------------------------------------------------------------


async def _bind_tcp(host: str, port: int) -> trio.SocketListener:
    # Not trio.open_tcp_listeners: a name may resolve to several addresses, and with port 0
    # each would get a different port. One address, one socket, one port.
    infos = await trio.socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )
    family, type_, proto, _, sockaddr = infos[0]
    sock = trio.socket.socket(family, type_, proto)
    try:
        if sys.platform != "win32":
            # Lets a restarted server rebind while old connections sit in TIME_WAIT. On Linux
            # it does NOT let a second socket listen on the port (that is SO_REUSEPORT, which
            # purerpc sets and we deliberately do not). On Windows it would allow hijacking.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        await sock.bind(sockaddr)
        sock.listen(_LISTEN_BACKLOG)
    except OSError:
        sock.close()
        raise
    return trio.SocketListener(sock)


def _peer_name(stream: trio.abc.Stream) -> str:
    transport = stream.transport_stream if isinstance(stream, trio.SSLStream) else stream
    if not isinstance(transport, trio.SocketStream):
        return "unknown"
    try:
        address = transport.socket.getpeername()
    except OSError:  # already disconnected
        return "unknown"
    if transport.socket.family == socket.AF_INET6:
        return f"ipv6:[{address[0]}]:{address[1]}"
    return f"ipv4:{address[0]}:{address[1]}"


# ---------------------------------------------------------------------------------------------
# Protocol: purerpc's GRPCConnection with the server-side gaps filled
# ---------------------------------------------------------------------------------------------


class _StreamReset:
    """The client reset a stream (RST_STREAM): cancel its call."""

    __slots__ = ("stream_id",)

    def __init__(self, stream_id: int) -> None:
        self.stream_id = stream_id


class _PeerWentAway:
    """The client sent GOAWAY; h2 forbids sending anything more on this connection."""

    __slots__ = ()


class _RequestRejected:
    """A stream's request cannot be served; answer it with this status, and only it."""

    __slots__ = ("message", "status", "stream_id")

    def __init__(self, stream_id: int, status: StatusCode, message: str) -> None:
        self.stream_id = stream_id
        self.status = status
        self.message = message


class _GrpcServerProtocol(GRPCConnection):  # type: ignore[misc]
    """purerpc's sans-IO server protocol, with the events it drops surfaced (see module doc).

    Inbound flow control: purerpc would acknowledge received bytes when the application reads
    a message. We acknowledge them when a message is complete and handed to its call (a call
    holds at most one request message), and at once for bytes we discard. Partial messages
    stay unacknowledged, so the peer's in-flight data is bounded by the HTTP/2 windows.
    """

    def __init__(self, max_message_size: int) -> None:
        super().__init__(GRPCConfiguration(client_side=False, max_message_length=max_message_size))
        # h2 treats a header value with surrounding whitespace (e.g. a client
        # sending "authorization: Bearer ") as a connection error and sends
        # GOAWAY, killing every other call of that connection -- a worker's
        # job stream included. RFC 9113 section 8.2.1 allows a stream error
        # instead. Header values are checked where they are used (the method
        # path, content-type, grpc-timeout and the auth hook), so h2's own
        # inbound header validation is turned off.
        self.h2_connection.config.validate_inbound_headers = False
        # Flow-controlled bytes received per stream but not yet acknowledged.
        self._unacked: dict[int, int] = {}

    def forget(self, stream_id: int) -> None:
        """Drop a stream's parse state and return its unacknowledged flow-control credit.

        purerpc never frees ``message_read_buffers`` of a stream that ends without END_STREAM,
        so every way a stream can end comes through here.
        """
        self.message_read_buffers.pop(stream_id, None)
        credit = self._unacked.pop(stream_id, 0)
        if credit:
            self.h2_connection.acknowledge_received_data(credit, stream_id)

    def _request_received(self, event: h2.events.RequestReceived) -> list[object]:
        stream_id = event.stream_id
        try:
            if event.stream_ended:
                # purerpc raises here, which would kill the connection: reject the stream.
                raise GRPCError("request without a message")
            events: list[Any] = super()._request_received(event)
        except (GRPCError, KeyError, ValueError) as exc:  # bad path, content-type, timeout...
            log.debug("rejecting stream %d: %s", stream_id, exc)
            self.forget(stream_id)
            return [_RequestRejected(stream_id, StatusCode.INTERNAL, "malformed request")]
        request = events[0]
        if request.message_encoding not in (None, "identity"):
            # purerpc would inflate without any size bound (and mis-decodes gzip): refuse.
            self.forget(stream_id)
            return [
                _RequestRejected(
                    stream_id,
                    StatusCode.UNIMPLEMENTED,
                    f"unsupported grpc-encoding {request.message_encoding!r}; use identity",
                )
            ]
        return events

    def _data_received(self, event: h2.events.DataReceived) -> list[object]:
        stream_id = event.stream_id
        length = event.flow_controlled_length
        buffer = self.message_read_buffers.get(stream_id)
        if buffer is None:
            # The stream was already answered or rejected: discard, but hand the credit back
            # or the connection window would shrink for good.
            if length:
                self.h2_connection.acknowledge_received_data(length, stream_id)
            return []
        self._unacked[stream_id] = self._unacked.get(stream_id, 0) + length
        try:
            # Raises on the 5-byte prefix, before buffering the oversized body.
            buffer.data_received(event.data, length)
        except MessageTooLargeError:
            self.forget(stream_id)
            limit = self.config.max_message_length
            return [
                _RequestRejected(
                    stream_id,
                    StatusCode.RESOURCE_EXHAUSTED,
                    f"request message larger than the server limit of {limit} bytes",
                )
            ]
        except UnsupportedMessageEncodingError:  # compressed flag set with identity encoding
            self.forget(stream_id)
            return [
                _RequestRejected(
                    stream_id,
                    StatusCode.UNIMPLEMENTED,
                    "compressed messages are not supported",
                )
            ]
        events: list[object] = []
        consumed = 0
        for message, message_length in buffer.read_all_complete_messages_flowcontrol():
            events.append(MessageReceived(stream_id, message, message_length))
            consumed += message_length
        if consumed:
            self._unacked[stream_id] -= consumed
            self.h2_connection.acknowledge_received_data(consumed, stream_id)
        return events

    def _stream_ended(self, event: h2.events.StreamEnded) -> list[object]:
        self.forget(event.stream_id)
        return [RequestEnded(event.stream_id)]

    def _stream_reset(self, event: h2.events.StreamReset) -> list[object]:
        self.forget(event.stream_id)
        return [_StreamReset(event.stream_id)]

    def _trailers_received(self, event: h2.events.TrailersReceived) -> list[object]:
        # gRPC clients send no trailers; purerpc would parse them as a *response* and raise.
        # h2 reports the END_STREAM that comes with them separately.
        return []

    def _connection_terminated(self, event: h2.events.ConnectionTerminated) -> list[object]:
        return [_PeerWentAway()]


# ---------------------------------------------------------------------------------------------
# Connection and calls
# ---------------------------------------------------------------------------------------------


class _Call:
    """State of one HTTP/2 stream, shared by the reader (producer) and the call task."""

    __slots__ = (
        "deadline",
        "error",
        "headers_sent",
        "metadata",
        "path",
        "request",
        "request_done",
        "reset",
        "scope",
        "stream_id",
        "window_opened",
    )

    def __init__(
        self,
        stream_id: int,
        path: str,
        metadata: tuple[tuple[str, str | bytes], ...],
        deadline: float | None,
    ) -> None:
        self.stream_id = stream_id
        self.path = path
        self.metadata = metadata
        self.deadline = deadline
        # Created here, not in the task, so an RST_STREAM that arrives before the task first
        # runs still cancels it.
        self.scope = trio.CancelScope()
        self.request: bytes | None = None
        self.error: RpcError | None = None
        self.request_done = trio.Event()  # request complete (END_STREAM) or rejected
        self.reset = False  # the client reset the stream: send nothing more
        self.headers_sent = False
        self.window_opened: trio.Event | None = None  # set while blocked on flow control

    def message_received(self, data: bytes) -> None:
        if self.request is None and self.error is None:
            self.request = data
        else:
            self.fail(RpcError(StatusCode.INTERNAL, "expected exactly one request message"))

    def fail(self, error: RpcError) -> None:
        if not self.request_done.is_set():
            self.error = error
            self.request_done.set()

    def request_ended(self) -> None:
        self.request_done.set()

    async def wait_request(self) -> bytes:
        await self.request_done.wait()
        if self.error is not None:
            raise self.error
        if self.request is None:
            raise RpcError(StatusCode.INTERNAL, "expected exactly one request message")
        return self.request


class _Connection:
    """One client connection: a reader loop, a writer task and one task per call."""

    def __init__(self, server: RpcServer, stream: trio.abc.Stream, peer: str) -> None:
        self._server = server
        self._stream = stream
        self._peer = peer
        self._protocol = _GrpcServerProtocol(server._max_message_size)
        self._h2 = self._protocol.h2_connection
        self._calls: dict[int, _Call] = {}
        self._blocked: set[_Call] = set()  # calls waiting for flow-control window
        self._wakeup = trio.Event()  # "the writer has something to send"
        self._drained = trio.lowlevel.ParkingLot()  # senders waiting below the high water
        self._queued = 0  # bytes queued since the writer last took the buffer
        self._sending = False  # the writer is inside send_all
        self._closing = False  # reader or writer gave up: send nothing more
        self._owe_goaway = False  # protocol error: h2 queued a GOAWAY worth flushing
        self._io_scope: trio.CancelScope | None = None

    async def run(self) -> None:
        self._protocol.initiate_connection()  # our SETTINGS + connection WINDOW_UPDATE
        self._wake_writer()
        async with trio.open_nursery() as io_nursery:
            # The writer cancels this scope when the socket breaks, which also cancels the
            # reader and every call below.
            self._io_scope = io_nursery.cancel_scope
            io_nursery.start_soon(self._write_loop)
            async with trio.open_nursery() as calls_nursery:
                await self._read_loop(calls_nursery)
                # EOF, reset, GOAWAY or protocol error: the peer is gone or unusable, so every
                # call of this connection is cancelled now, not when its handler next returns.
                self._closing = True
                calls_nursery.cancel_scope.cancel()
            io_nursery.cancel_scope.cancel()
        if self._owe_goaway and not self._sending:
            # Best effort, and only if the writer was not cut off mid-frame.
            data = self._protocol.data_to_send()
            if data:
                with trio.move_on_after(_GOODBYE_TIMEOUT):
                    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                        await self._stream.send_all(data)

    # -- reading --------------------------------------------------------------------------

    async def _read_loop(self, calls_nursery: trio.Nursery) -> None:
        receive_some = self._stream.receive_some
        receive_data = self._protocol.receive_data
        while True:
            try:
                data = await receive_some(_RECEIVE_SIZE)
            except trio.BrokenResourceError:  # ECONNRESET, TLS error
                return
            if not data:  # EOF: client closed the channel or its process died
                return
            try:
                events = receive_data(data)
            except h2.exceptions.ProtocolError as exc:
                # h2 already queued a GOAWAY with the right error code.
                log.info("closing connection from %s: HTTP/2 protocol error: %s", self._peer, exc)
                self._owe_goaway = True
                return
            except UnicodeDecodeError:
                # A header that is not UTF-8 (gRPC allows only ASCII). h2 raises this from the
                # middle of a frame, so its state is no longer trustworthy: end the connection.
                log.info("closing connection from %s: header is not UTF-8", self._peer)
                with contextlib.suppress(h2.exceptions.ProtocolError):
                    self._h2.close_connection(h2.errors.ErrorCodes.PROTOCOL_ERROR)
                    self._owe_goaway = True
                return
            for event in events:
                if isinstance(event, _PeerWentAway):
                    return
                self._dispatch(event, calls_nursery)
            self._wake_writer()  # SETTINGS/PING acks, WINDOW_UPDATEs, answers to rejections

    def _dispatch(self, event: object, calls_nursery: trio.Nursery) -> None:
        # Ordered by frequency. Events for streams without a call (finished, rejected) are
        # dropped: the protocol layer already returned their flow-control credit.
        if isinstance(event, MessageReceived):
            call = self._calls.get(event.stream_id)
            if call is not None:
                call.message_received(event.data)
        elif isinstance(event, RequestReceived):
            self._start_call(event, calls_nursery)
        elif isinstance(event, RequestEnded):
            call = self._calls.get(event.stream_id)
            if call is not None:
                call.request_ended()
        elif isinstance(event, WindowUpdated):
            if event.stream_id == 0:  # connection window or SETTINGS: wake every sender
                for blocked in self._blocked:
                    _wake_sender(blocked)
            else:
                call = self._calls.get(event.stream_id)
                if call is not None:
                    _wake_sender(call)
        elif isinstance(event, _StreamReset):
            call = self._calls.pop(event.stream_id, None)
            if call is not None:
                call.reset = True
                call.scope.cancel()
        elif isinstance(event, _RequestRejected):
            call = self._calls.get(event.stream_id)
            if call is not None:
                call.fail(RpcError(event.status, event.message))
            else:  # rejected at the headers: there is no call task to answer it
                self._send_status(
                    event.stream_id, Status(event.status, event.message), headers_sent=False
                )

    def _start_call(self, event: RequestReceived, calls_nursery: trio.Nursery) -> None:
        deadline = None
        if event.timeout is not None:
            deadline = trio.current_time() + event.timeout.total_seconds()
        call = _Call(
            event.stream_id,
            f"/{event.service_name}/{event.method_name}",
            event.custom_metadata,
            deadline,
        )
        self._calls[event.stream_id] = call
        calls_nursery.start_soon(self._run_call, call)

    # -- calls ----------------------------------------------------------------------------

    async def _run_call(self, call: _Call) -> None:
        server = self._server
        server._active_calls += 1
        method = server._methods.get(call.path)
        unary = method is None or method.kind is not MethodKind.SERVER_STREAMING
        server._active_unary += unary
        try:
            # Absorbs the cancellation caused by the client's RST_STREAM; a connection-wide
            # cancellation passes through to the calls nursery.
            with call.scope:
                with trio.move_on_at(math.inf if call.deadline is None else call.deadline) as dl:
                    status = await self._invoke(call)
                if dl.cancelled_caught:
                    status = Status(StatusCode.DEADLINE_EXCEEDED, "deadline exceeded")
                if not (call.reset or self._closing):
                    self._send_status(call.stream_id, status, headers_sent=call.headers_sent)
        finally:
            server._active_calls -= 1
            server._active_unary -= unary
            if self._calls.get(call.stream_id) is call:
                del self._calls[call.stream_id]

    async def _invoke(self, call: _Call) -> Status:
        """Run auth + handler; map every ``Exception`` to a status. Cancellation passes."""
        ctx = CallContext(
            method=call.path, metadata=call.metadata, peer=self._peer, deadline=call.deadline
        )
        server = self._server
        try:
            if server._authenticate is not None:
                server._authenticate(ctx)
            method = server._methods.get(call.path)
            if method is None or method.handler is None:
                raise RpcError(StatusCode.UNIMPLEMENTED, f"method {call.path} is not implemented")
            data = await call.wait_request()
            try:
                request = method.request_cls.FromString(data)
            except DecodeError:
                raise RpcError(StatusCode.INVALID_ARGUMENT, "malformed request") from None
            response_cls = method.response_cls
            if method.kind is MethodKind.UNARY:
                response = await method.handler(request, ctx)  # type: ignore[misc]
                await self._send_message(call, _checked(response, response_cls))
            else:
                responses = method.handler(request, ctx)
                # aclosing: on cancellation or error the generator's `finally` runs here, in
                # this task, under this call's scope, not later from the garbage collector.
                async with contextlib.aclosing(responses):  # type: ignore[type-var]
                    async for response in responses:  # type: ignore[union-attr]
                        await self._send_message(call, _checked(response, response_cls))
        except RpcError as exc:
            return Status(exc.status, exc.message)
        except Exception as exc:
            rpc_error = _only_rpc_error(exc)
            if rpc_error is not None:
                return Status(rpc_error.status, rpc_error.message)
            log.error("internal error in %s (peer %s)", call.path, self._peer, exc_info=exc)
            return Status(StatusCode.INTERNAL, "internal error")
        return Status(StatusCode.OK)

    async def _send_message(self, call: _Call, message: Message) -> None:
        """Queue one response message, respecting flow control; the writer sends it."""
        payload = message.SerializeToString()
        data = _MESSAGE_PREFIX.pack(False, len(payload)) + payload
        h2_conn = self._h2
        stream_id = call.stream_id
        offset = 0
        while True:
            if call.reset or self._closing:
                # The reader cancelled us after our last checkpoint returned: this checkpoint
                # raises Cancelled. Never touch the h2 stream, it is gone.
                await trio.lowlevel.checkpoint()
                raise AssertionError("call is gone but was not cancelled")
            if not call.headers_sent:
                self._protocol.start_response(stream_id, _CONTENT_TYPE_SUFFIX)
                call.headers_sent = True
            window = min(
                h2_conn.max_outbound_frame_size, h2_conn.local_flow_control_window(stream_id)
            )
            remaining = len(data) - offset
            if remaining <= window:
                # Fast path (nearly every message): one DATA frame, no copy.
                h2_conn.send_data(stream_id, data if offset == 0 else data[offset:])
                break
            if window > 0:
                h2_conn.send_data(stream_id, data[offset : offset + window])
                offset += window
                self._queued += window
                self._wake_writer()
            else:
                await self._wait_for_window(call)
        self._queued += remaining
        self._wake_writer()
        if self._queued > _WRITE_HIGH_WATER:
            # The socket is slower than the producer: wait for the writer to catch up.
            await self._drained.park()
        else:
            # Not a full yield (that would cost a scheduler round trip per message); the
            # writer runs when this task next blocks, e.g. on the handler's next `await`.
            await trio.lowlevel.checkpoint_if_cancelled()

    async def _wait_for_window(self, call: _Call) -> None:
        call.window_opened = trio.Event()
        self._blocked.add(call)
        try:
            await call.window_opened.wait()
        finally:
            call.window_opened = None
            self._blocked.discard(call)

    def _send_status(self, stream_id: int, status: Status, *, headers_sent: bool) -> None:
        """Queue the trailers that end a call (trailers-only if no message was sent)."""
        # Ask h2, not our own bookkeeping: h2 has already processed the whole received batch,
        # which may have ended or reset the stream after the event being answered.
        h2_stream = self._h2.streams.get(stream_id)
        if self._closing or h2_stream is None or h2_stream.closed:
            return
        # Not purerpc's end_response / respond_status: their grpc-message encoding is not the
        # spec's (see the module docstring). Same trailers otherwise.
        self._h2.send_headers(
            stream_id, _status_trailers(status, trailers_only=not headers_sent), end_stream=True
        )
        if not h2_stream.closed:
            # We answered before the client finished sending (oversized request, auth failure,
            # deadline): tell it to stop without error (RFC 7540 section 8.1). h2 answers any
            # DATA still in flight and returns its connection credit.
            self._protocol.reset_stream(stream_id, h2.errors.ErrorCodes.NO_ERROR)
            self._protocol.forget(stream_id)
        self._wake_writer()

    # -- writing --------------------------------------------------------------------------

    @property
    def flushed(self) -> bool:
        """Nothing queued for the writer and nothing being sent."""
        return not self._wakeup.is_set() and not self._sending

    def _wake_writer(self) -> None:
        self._wakeup.set()

    async def _write_loop(self) -> None:
        data_to_send = self._protocol.data_to_send
        send_all = self._stream.send_all
        try:
            while True:
                await self._wakeup.wait()
                # Replace the event before taking the buffer, so a wake-up that races with
                # send_all below is never lost.
                self._wakeup = trio.Event()
                data = data_to_send()
                self._queued = 0
                if data:
                    self._sending = True
                    await send_all(data)
                    self._sending = False
                self._drained.unpark_all()
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            log.debug("write to %s failed: %r", self._peer, exc)
            # The peer is unreachable: cancel the reader and every call of this connection.
            self._closing = True
            assert self._io_scope is not None
            self._io_scope.cancel()


def _status_trailers(status: Status, *, trailers_only: bool) -> list[tuple[str, str]]:
    """The header block that ends a call; ``trailers_only`` when no response headers went out.

    What purerpc's ``respond_status`` / ``end_response`` send (with no custom metadata), except
    that ``grpc-message`` is encoded by :func:`encode_grpc_message`.
    """
    trailers = (
        [(":status", "200"), ("content-type", "application/grpc" + _CONTENT_TYPE_SUFFIX)]
        if trailers_only
        else []
    )
    trailers.append(("grpc-status", str(status.int_value)))
    if status.status_message:
        trailers.append(("grpc-message", encode_grpc_message(status.status_message)))
    return trailers


def _wake_sender(call: _Call) -> None:
    if call.window_opened is not None:
        call.window_opened.set()


def _checked(response: object, response_cls: type[Message]) -> Message:
    # A wrong type would serialize into bytes the client parses as garbage: fail loudly.
    if not isinstance(response, response_cls):
        raise TypeError(
            f"handler returned {type(response).__name__}, expected {response_cls.__name__}"
        )
    return response


def _only_rpc_error(exc: Exception) -> RpcError | None:
    """The first RpcError of an exception group made only of RpcErrors, else None.

    A handler that raises RpcError inside its own nursery surfaces it wrapped in an
    ExceptionGroup; that is still a deliberate status, not an internal error.
    """
    if not isinstance(exc, ExceptionGroup):
        return None
    matched, rest = exc.split(RpcError)
    if matched is None or rest is not None:
        return None
    first: BaseException = matched
    while isinstance(first, BaseExceptionGroup):
        first = first.exceptions[0]
    return first if isinstance(first, RpcError) else None
