"""The server's HTTP listener (``STACKDUCK_HTTP_ADDR``): dashboard, JSON API, ``/metrics``.

Routes:

* ``GET /`` -- the dashboard: one static HTML page (``dashboard.html``, package
  data) with its CSS and JS inline, served with a Content-Security-Policy
  that allows exactly that script and style;
* ``GET /metrics`` -- Prometheus text format (``_metrics``);
* ``GET /api/stats``, ``/api/history``, ``/api/dead``, ``/api/jobs/<id>`` --
  read-only JSON, always open;
* ``POST /api/dead/requeue``, ``/api/dead/purge``, ``/api/pause``,
  ``/api/resume`` -- actions: a JSON body (``Content-Type: application/json``,
  which a cross-site form cannot send), no cross-site ``Origin``, and, when
  ``STACKDUCK_TOKENS`` is set, ``Authorization: Bearer <token>``.

Every error is a JSON object ``{"error": message}`` with a precise status
(400, 401, 403, 404, 405, 408, 409, 413, 415, 503, 504; 500 only for a bug,
which is logged). Stats and gauges come from a snapshot that one sampler task
refreshes once a second (``run_sampler``), so no number of viewers makes the
server read its backends more often; the same task samples the history.

The HTTP side is h11 (sans-IO HTTP/1.1) over trio streams: keep-alive, every
request bounded in size (8 KiB of headers, 64 KiB of body) and time, at most
64 connections at once, and nothing a client sends can end the listener.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import importlib.resources
import json
import logging
import re
import urllib.parse
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Final

import attrs
import h11
import trio

from stackduck_core import (
    Job,
    QueueStats,
    Rejected,
    validate_dead_selection,
    validate_job_id,
    validate_job_type,
)

from ._broker import Broker, OutcomeUnknown, Unavailable, rejected_to_status
from ._history import History, Sample
from ._metrics import Metrics

log = logging.getLogger("stackduck.http")

MAX_HEADER_BYTES: Final = 8 * 1024
MAX_BODY_BYTES: Final = 64 * 1024
#: to receive one request (headers and body) and to send its answer
REQUEST_TIMEOUT: Final = 10.0
#: keep-alive: how long an idle connection waits for its next request
IDLE_TIMEOUT: Final = 5.0
MAX_CONNECTIONS: Final = 64
MAX_REQUESTS_PER_CONNECTION: Final = 1000
#: job ids per requeue or purge call
MAX_IDS: Final = 1000
#: dead jobs requeued or purged per call by type (the answer says if more remain)
BATCH_BY_TYPE: Final = 1000
MAX_DEAD_PAGE: Final = 200
DEAD_PAGE_BYTES: Final = 2 * 1024 * 1024

_STATUS_OF_GRPC: Final = {
    "INVALID_ARGUMENT": 400,
    "NOT_FOUND": 404,
    "FAILED_PRECONDITION": 409,
    "RESOURCE_EXHAUSTED": 413,
}
_REASONS: Final = {
    200: b"OK", 400: b"Bad Request", 401: b"Unauthorized", 403: b"Forbidden",
    404: b"Not Found", 405: b"Method Not Allowed", 408: b"Request Timeout",
    409: b"Conflict", 413: b"Content Too Large", 415: b"Unsupported Media Type",
    431: b"Request Header Fields Too Large",
    500: b"Internal Server Error", 503: b"Service Unavailable", 504: b"Gateway Timeout",
}  # fmt: skip


class HttpError(Exception):
    """An answer other than 200: ``{"error": message}`` with ``status``."""

    def __init__(
        self, status: int, message: str, headers: tuple[tuple[str, str], ...] = ()
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers


@attrs.frozen
class Request:
    method: str
    path: str
    query: Mapping[str, str]
    headers: Mapping[str, str]
    body: bytes = b""


@attrs.frozen
class Response:
    status: int
    body: bytes
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()


def json_response(value: object, status: int = 200) -> Response:
    body = json.dumps(value, separators=(",", ":"), allow_nan=False).encode()
    return Response(status, body)


def error_response(error: HttpError) -> Response:
    response = json_response({"error": error.message}, error.status)
    return attrs.evolve(response, headers=error.headers)


def job_json(job: Job) -> dict[str, Any]:
    """A job record for the API (times: Unix seconds, ``null`` when unset)."""
    return {
        "id": job.id,
        "job_type": job.job_type,
        "status": job.status.value,
        "priority": job.priority,
        "payload": job.payload,
        "retry_count": job.retry_count,
        "max_retries": job.max_retries,
        "attempt": job.attempt,
        "error_message": job.error_message,
        "delay": job.delay,
        "scheduled_at": job.scheduled_at,
        "created_at": job.created_at,
        "updated_at": job.updated_at,
        "started_at": job.started_at,
        "completed_at": job.completed_at,
        "worker_id": job.worker_id,
        "lease_expires_at": job.lease_expires_at,
        "idempotency_key": job.idempotency_key,
    }


def sample_json(sample: Sample) -> dict[str, Any]:
    return attrs.asdict(sample)


# -- the page ----------------------------------------------------------------------------


def _load_page() -> tuple[bytes, str]:
    """The dashboard's HTML and a CSP that allows exactly its inline script and style."""
    page = importlib.resources.files("stackduck_trio").joinpath("dashboard.html").read_bytes()

    def hashes(tag: bytes) -> str:
        blocks = re.findall(rb"<" + tag + rb">(.*?)</" + tag + rb">", page, re.DOTALL)
        digests = (base64.b64encode(hashlib.sha256(b).digest()).decode() for b in blocks)
        return " ".join(f"'sha256-{d}'" for d in digests)

    csp = (
        f"default-src 'none'; script-src {hashes(b'script')}; style-src {hashes(b'style')}; "
        "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; "
        "frame-ancestors 'none'"
    )
    return page, csp


# -- the application ---------------------------------------------------------------------

Handler = Callable[[Request], Awaitable[Response]]


class HttpApp:
    """Routes and handlers; the connection handling is :func:`serve_http`'s.

    Args:
        broker: the instance's broker.
        metrics: its metrics (the broker reports events to them).
        tokens: when not empty, actions (POST) need one of them as a bearer token.
        interval: seconds between two samples (stats snapshot and history).
        history_size: samples kept (600: ten minutes at one a second).
    """

    def __init__(
        self,
        broker: Broker,
        metrics: Metrics,
        *,
        tokens: tuple[str, ...] = (),
        interval: float = 1.0,
        history_size: int = 600,
    ) -> None:
        self.broker = broker
        self.metrics = metrics
        self.tokens = tuple(t.encode() for t in tokens)
        self.interval = interval
        self.history = History(history_size)
        self._stats: QueueStats | None = None
        self._stats_at = 0.0
        self._view: dict[str, Any] | None = None
        self._page, self._csp = _load_page()
        self._routes: dict[str, dict[str, Handler]] = {
            "/": {"GET": self._dashboard},
            "/metrics": {"GET": self._prometheus},
            "/api/stats": {"GET": self._get_stats},
            "/api/history": {"GET": self._get_history},
            "/api/dead": {"GET": self._get_dead},
            "/api/dead/requeue": {"POST": self._requeue},
            "/api/dead/purge": {"POST": self._purge},
            "/api/pause": {"POST": self._pause},
            "/api/resume": {"POST": self._resume},
        }

    # -- sampling ----------------------------------------------------------------------

    async def refresh(self) -> None:
        """Take the snapshot ``/api/stats`` serves (and the Prometheus gauges')."""
        stats = await self.metrics.refresh(self.broker)
        if stats is not None:
            self._stats, self._stats_at = stats, self.broker.clock.now()
        self._view = self._build_view()

    def sample(self) -> Sample | None:
        """Close one history interval (the pure part is :class:`History`)."""
        return self.history.record(
            self.broker.clock.now(), self.metrics.totals(), self.metrics.take_waits()
        )

    async def run_sampler(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Once every ``interval``: a history sample, then a fresh stats snapshot."""
        self.sample()
        await self.refresh()
        task_status.started()
        deadline = trio.current_time()
        while True:
            deadline = max(deadline + self.interval, trio.current_time())
            await trio.sleep_until(deadline)
            try:
                self.sample()
                await self.refresh()
            except Exception:  # a bug here must not end the server
                log.exception("dashboard sampling failed")

    # -- dispatch ----------------------------------------------------------------------

    def route(self, method: str, path: str) -> Handler:
        """The handler of a request, or 404 / 405 (HEAD is served as GET)."""
        methods = self._routes.get(path)
        if methods is None and path.startswith("/api/jobs/"):
            methods = {"GET": self._get_job}
        if methods is None:
            raise HttpError(404, f"no such resource: {path}")
        handler = methods.get("GET" if method == "HEAD" else method)
        if handler is None:
            allowed = ", ".join(sorted({*methods, *(["HEAD"] if "GET" in methods else [])}))
            raise HttpError(
                405, f"{method} is not allowed here; use {allowed}", (("allow", allowed),)
            )
        return handler

    async def handle(self, handler: Handler, request: Request) -> Response:
        """Run a handler; every failure becomes a JSON error answer."""
        try:
            if request.method == "POST":
                self._check_action(request)
            return await handler(request)
        except HttpError as exc:
            return error_response(exc)
        except Unavailable as exc:
            return error_response(HttpError(503, str(exc)))
        except OutcomeUnknown as exc:
            return error_response(HttpError(504, str(exc)))
        except Exception:
            log.exception("HTTP %s %s failed", request.method, request.path)
            return error_response(HttpError(500, "internal error (logged by the server)"))

    def _check_action(self, request: Request) -> None:
        """POST: bearer token (when configured), same origin, JSON body."""
        if self.tokens:
            scheme, _, token = request.headers.get("authorization", "").partition(" ")
            challenge = (("www-authenticate", 'Bearer realm="stackduck"'),)
            if scheme.lower() != "bearer" or not token.strip():
                raise HttpError(
                    401,
                    "actions need a bearer token on this server: "
                    "send Authorization: Bearer <token> (one of STACKDUCK_TOKENS)",
                    challenge,
                )
            given = token.strip().encode()
            if not any(hmac.compare_digest(given, good) for good in self.tokens):
                raise HttpError(401, "invalid bearer token", challenge)
        origin = request.headers.get("origin")
        if origin is not None:
            host = urllib.parse.urlsplit(origin).netloc
            if not host or host != request.headers.get("host"):
                raise HttpError(403, f"cross-site request refused (Origin {origin})")
        if request.headers.get("sec-fetch-site") == "cross-site":
            raise HttpError(403, "cross-site request refused")
        kind = request.headers.get("content-type", "").partition(";")[0].strip().lower()
        if kind != "application/json":
            raise HttpError(415, "actions take a JSON body: send Content-Type: application/json")

    # -- pages -------------------------------------------------------------------------

    async def _dashboard(self, request: Request) -> Response:
        return Response(
            200,
            self._page,
            "text/html; charset=utf-8",
            (
                ("content-security-policy", self._csp),
                ("x-frame-options", "DENY"),
                ("referrer-policy", "no-referrer"),
            ),
        )

    async def _prometheus(self, request: Request) -> Response:
        return Response(200, self.metrics.render(), "text/plain; version=0.0.4")

    # -- read-only API ---------------------------------------------------------------

    async def _get_stats(self, request: Request) -> Response:
        view = self._view if self._view is not None else self._build_view()
        return json_response({**view, "time": self.broker.clock.now()})

    def _build_view(self) -> dict[str, Any]:
        """Per type and in total: depths, workers, counters, backends, as of now."""
        stats = self._stats
        broker = self.broker
        dispatch = broker.core.dispatcher.statistics()
        types = []
        for view in broker.type_views(stats, broker.limiter.limits()):
            fields = attrs.asdict(view)
            fields["queued"] = list(view.queued)
            fields["queued_total"] = sum(view.queued)
            types.append(fields)
        workers: dict[str, dict[str, Any]] = {}
        for info in broker.stream_infos():
            w = workers.setdefault(
                info.worker_id,
                {"worker_id": info.worker_id, "streams": 0, "job_types": [], "prefetch": 0,
                 "in_flight": 0},
            )  # fmt: skip
            w["streams"] += 1
            w["prefetch"] += info.prefetch
            w["in_flight"] += info.in_flight
            w["job_types"] = sorted({*w["job_types"], *info.job_types})
        return {
            "stats_time": self._stats_at or None,
            "types": types,
            "totals": {
                "queued": stats.queued if stats else 0,
                "scheduled": stats.scheduled if stats else 0,
                "running": stats.running if stats else 0,
                "dead": stats.dead if stats else 0,
                "workers": dispatch.streams,
                "in_flight": dispatch.in_flight,
                "completed": sum(c.completed for c in broker.counters.values()),
                "failed": sum(c.failed for c in broker.counters.values()),
                "retried": sum(c.retried for c in broker.counters.values()),
            },
            "workers": sorted(workers.values(), key=lambda w: str(w["worker_id"])),
            "backends": [
                {"role": role, "kind": kind, "state": state}
                for role, kind, state in broker.backends()
            ],
            "queue_route": broker.queue_route(),
            "route_reason": broker.route().reason,
            "draining": broker.draining,
            "auth_required": bool(self.tokens),
        }

    async def _get_history(self, request: Request) -> Response:
        since = _number(request.query, "since", 0.0)
        return json_response(
            {
                "interval": self.interval,
                "samples": [sample_json(s) for s in self.history.since(since)],
            }
        )

    async def _get_dead(self, request: Request) -> Response:
        job_type = request.query.get("job_type") or None
        if job_type is not None:
            self._check_type(job_type)
        limit = int(_number(request.query, "limit", 50, integer=True))
        if not 1 <= limit <= MAX_DEAD_PAGE:
            raise HttpError(400, f"limit must be between 1 and {MAX_DEAD_PAGE}")
        cursor = request.query.get("cursor", "")
        try:
            jobs, next_cursor = await self.broker.dead_page(
                job_type, cursor, limit, DEAD_PAGE_BYTES
            )
        except ValueError:
            raise HttpError(400, "cursor: not a cursor from this server") from None
        return json_response({"jobs": [job_json(j) for j in jobs], "next_cursor": next_cursor})

    async def _get_job(self, request: Request) -> Response:
        job_id = request.path[len("/api/jobs/") :]
        _check(validate_job_id(job_id, "job id"))
        job = await self.broker.get(job_id)
        if job is None:
            raise HttpError(404, f"no job with id {job_id}")
        return json_response({"job": job_json(job)})

    # -- actions -------------------------------------------------------------------------

    async def _requeue(self, request: Request) -> Response:
        return await self._dead_action(request, self.broker.requeue)

    async def _purge(self, request: Request) -> Response:
        return await self._dead_action(request, self.broker.purge)

    async def _dead_action(
        self, request: Request, action: Callable[[list[str]], Awaitable[list[Job | Rejected]]]
    ) -> Response:
        body = _json_body(request, {"job_ids", "job_type"})
        job_ids, job_type = body.get("job_ids"), body.get("job_type")
        if (job_ids is None) == (job_type is None):
            raise HttpError(400, 'give either "job_ids" or "job_type" ("*" for every type)')
        if job_ids is not None and (not isinstance(job_ids, list) or not job_ids):
            raise HttpError(400, "job_ids: a non-empty list of job ids")
        if job_type is not None and not isinstance(job_type, str):
            raise HttpError(400, "job_type: a string")
        limits = self.broker.core.limits
        _check(validate_dead_selection(job_ids or [], job_type or "", limits, max_ids=MAX_IDS))
        if job_ids is not None:
            ids = list(dict.fromkeys(job_ids))
        else:
            ids = await self.broker.dead_ids([], job_type, BATCH_BY_TYPE)
        results = await action(ids) if ids else []
        items = []
        for job_id, result in zip(ids, results, strict=True):
            if isinstance(result, Rejected):
                code, message = rejected_to_status(result)
                items.append({"job_id": job_id, "ok": False, "code": code, "error": message})
            else:
                items.append({"job_id": job_id, "ok": True, "status": result.status.value})
        await self.refresh()
        return json_response(
            {
                "count": sum(1 for item in items if item["ok"]),
                "results": items,
                "more": job_ids is None and len(ids) == BATCH_BY_TYPE,
            }
        )

    async def _pause(self, request: Request) -> Response:
        job_type = self._job_type_body(request)
        await self.broker.pause(job_type)
        await self.refresh()
        return json_response({"job_type": job_type, "paused": True})

    async def _resume(self, request: Request) -> Response:
        job_type = self._job_type_body(request)
        await self.broker.resume(job_type)
        await self.refresh()
        return json_response({"job_type": job_type, "paused": False})

    def _job_type_body(self, request: Request) -> str:
        job_type = _json_body(request, {"job_type"}).get("job_type")
        if not isinstance(job_type, str):
            raise HttpError(400, 'give "job_type" (a string)')
        self._check_type(job_type)
        return job_type

    def _check_type(self, job_type: str) -> None:
        _check(validate_job_type(job_type, self.broker.core.limits))


def _check(rejected: Rejected | None) -> None:
    """A core rejection as an HTTP error (the gRPC status it maps to, in HTTP)."""
    if rejected is not None:
        status, message = rejected_to_status(rejected)
        raise HttpError(_STATUS_OF_GRPC.get(status, 400), message)


def _number(query: Mapping[str, str], name: str, default: float, *, integer: bool = False) -> float:
    text = query.get(name)
    if text is None or text == "":
        return default
    try:
        value = int(text) if integer else float(text)
    except ValueError:
        kind = "an integer" if integer else "a number"
        raise HttpError(400, f"{name}: {text[:40]!r} is not {kind}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise HttpError(400, f"{name}: must be finite")
    return value


def _json_body(request: Request, fields: set[str]) -> dict[str, Any]:
    try:
        body = json.loads(request.body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise HttpError(400, f"the body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise HttpError(400, "the body must be a JSON object")
    unknown = sorted(set(body) - fields)
    if unknown:
        raise HttpError(
            400, f"unknown field(s) {', '.join(unknown)}; expected {', '.join(sorted(fields))}"
        )
    return body


# -- HTTP/1.1 over trio ------------------------------------------------------------------


async def serve_http(
    app: HttpApp,
    host: str,
    port: int,
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` on ``host:port`` until cancelled; reports the bound port."""
    listeners = await trio.open_tcp_listeners(port, host=host)
    bound = listeners[0].socket.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    log.info("dashboard on http://%s:%d/ (metrics: /metrics)", shown, bound)
    slots = trio.CapacityLimiter(MAX_CONNECTIONS)

    async def handler(stream: trio.SocketStream) -> None:
        try:
            slots.acquire_nowait()
        except trio.WouldBlock:
            await _refuse(stream)
            return
        try:
            await _connection(app, stream)
        finally:
            slots.release()

    task_status.started(bound)
    await trio.serve_listeners(handler, listeners)


async def _refuse(stream: trio.abc.Stream) -> None:
    body = b'{"error":"too many connections; retry later"}'
    head = (
        b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\nconnection: close\r\n\r\n" % len(body)
    )
    with trio.move_on_after(1):
        try:
            await stream.send_all(head + body)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        else:
            await _drain(stream, 0.25)
    await trio.aclose_forcefully(stream)


class _Closed(Exception):
    """The peer went away (or broke the protocol beyond an answer)."""


async def _connection(app: HttpApp, stream: trio.abc.Stream) -> None:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADER_BYTES)
    try:
        for served in range(MAX_REQUESTS_PER_CONNECTION):
            event: object = None
            with trio.move_on_after(IDLE_TIMEOUT if served else REQUEST_TIMEOUT):
                event = await _next_event(conn, stream)
            if not isinstance(event, h11.Request):
                return  # closed, or a timeout before a whole request head
            await _exchange(app, conn, stream, event)
            if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                return
            conn.start_next_cycle()
    except h11.RemoteProtocolError as exc:
        # A malformed request: answer 400 (or 413/431) when we still can.
        if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            error = HttpError(exc.error_status_hint, f"malformed HTTP request: {exc}")
            with trio.move_on_after(1):
                try:
                    await _send(conn, stream, error_response(error), head=False, close=True)
                except (h11.LocalProtocolError, trio.BrokenResourceError, trio.ClosedResourceError):
                    return
            await _drain(stream)
    except (_Closed, trio.BrokenResourceError, trio.ClosedResourceError):
        pass  # the client's problem
    except Exception:
        # A bug here must not end the listener (or the server with it).
        log.exception("HTTP connection failed")
    finally:
        await trio.aclose_forcefully(stream)


async def _next_event(conn: h11.Connection, stream: trio.abc.Stream) -> object:
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        if conn.they_are_waiting_for_100_continue:
            await stream.send_all(
                conn.send(h11.InformationalResponse(status_code=100, headers=[])) or b""
            )
        # b"" (EOF) makes h11 report ConnectionClosed, or an error mid-message
        conn.receive_data(await stream.receive_some(16384))


async def _exchange(
    app: HttpApp, conn: h11.Connection, stream: trio.abc.Stream, head: h11.Request
) -> None:
    """Answer one request whose head ``conn`` has just given.

    Receiving the body and sending the answer are bounded by ``REQUEST_TIMEOUT``;
    the handler is not (the broker bounds its own waits: 503, 504).
    """
    method = head.method.decode("ascii", "replace")
    headers = {name.decode("latin-1"): value.decode("latin-1") for name, value in head.headers}
    failure: HttpError | None = None
    try:
        path, query = _parse_target(head.target)
        handler = app.route(method, path)
    except HttpError as exc:
        failure = exc
    length = headers.get("content-length")
    too_large = HttpError(413, f"request bodies are at most {MAX_BODY_BYTES} bytes")
    if length is not None and int(length) > MAX_BODY_BYTES:
        failure = too_large
    body = b""
    # Read the body (bounded) unless it is too large or of unknown length for a
    # request refused anyway: then the connection ends after the answer.
    if failure is None or (failure is not too_large and "transfer-encoding" not in headers):
        try:
            with trio.fail_after(REQUEST_TIMEOUT):
                body = await _read_body(conn, stream)
        except HttpError as exc:
            failure = exc
        except trio.TooSlowError:
            failure = HttpError(408, "the request took too long to arrive")
    if failure is None:
        request = Request(method=method, path=path, query=query, headers=headers, body=body)
        response = await app.handle(handler, request)
    else:
        response = error_response(failure)
    close = conn.their_state is not h11.DONE
    with trio.move_on_after(REQUEST_TIMEOUT) as sending:
        await _send(conn, stream, response, head=method == "HEAD", close=close)
    if sending.cancelled_caught:
        raise _Closed  # a client that does not read its answer
    if close:
        await _drain(stream)


def _parse_target(target: bytes) -> tuple[str, dict[str, str]]:
    text = target.decode("ascii", "replace")
    if not text.startswith("/"):
        raise HttpError(400, "the request target must be a path")
    split = urllib.parse.urlsplit(text)
    try:
        path = urllib.parse.unquote(split.path, errors="strict")
        query = dict(urllib.parse.parse_qsl(split.query, errors="strict"))
    except UnicodeDecodeError:
        raise HttpError(400, "the request target is not valid UTF-8") from None
    return path, query


async def _read_body(conn: h11.Connection, stream: trio.abc.Stream) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        event = await _next_event(conn, stream)
        if isinstance(event, h11.Data):
            size += len(event.data)
            if size > MAX_BODY_BYTES:
                raise HttpError(413, f"request bodies are at most {MAX_BODY_BYTES} bytes")
            chunks.append(bytes(event.data))
        elif isinstance(event, h11.EndOfMessage):
            return b"".join(chunks)
        else:
            raise _Closed


async def _send(
    conn: h11.Connection, stream: trio.abc.Stream, response: Response, *, head: bool, close: bool
) -> None:
    headers = [
        ("content-type", response.content_type),
        ("content-length", str(len(response.body))),
        ("cache-control", "no-store"),
        ("x-content-type-options", "nosniff"),
        *response.headers,
    ]
    if close:
        headers.append(("connection", "close"))
    out = conn.send(
        h11.Response(
            status_code=response.status,
            headers=headers,
            reason=_REASONS.get(response.status, b""),
        )
    )
    assert out is not None
    if not head:
        out += conn.send(h11.Data(data=response.body)) or b""
    out += conn.send(h11.EndOfMessage()) or b""
    await stream.send_all(out)


async def _drain(stream: trio.abc.Stream, seconds: float = 1.0) -> None:
    """Read (and drop) what the client still sends, briefly, so it sees our answer.

    Closing a socket with unread data makes the kernel reset the connection,
    and the client may then lose the answer it has not read yet.
    """
    received = 0
    with trio.move_on_after(seconds):
        try:
            if isinstance(stream, trio.abc.HalfCloseableStream):
                await stream.send_eof()  # the client sees the end of our answer
            while received < 4 * MAX_BODY_BYTES:
                data = await stream.receive_some(16384)
                if not data:
                    return
                received += len(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return
