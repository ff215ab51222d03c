"""A plain synchronous producer: a web app that enqueues a job per request, no async anywhere.

Producers rarely live in an event loop: a Django or Flask view, a cron script, a CLI. They
only need the official blocking gRPC client (``grpcio``) and stubs generated from
``proto/stackduck.proto``. This example uses the stubs shipped in ``stackduck_trio._proto``;
in your own project generate them once (``pip install grpcio grpcio-tools``)::

    python -m grpc_tools.protoc -I path/to/stackduck/proto \\
        --python_out=myapp/stackduck --grpc_python_out=myapp/stackduck \\
        --pyi_out=myapp/stackduck stackduck.proto

and import ``stackduck_pb2`` / ``stackduck_pb2_grpc`` from there instead. Any language with a
gRPC toolchain works the same way: the proto file is the whole contract.

What it shows:

* :func:`connect` -- one ``grpc.Channel`` per process, created once and shared by every
  request (channels are thread-safe and reconnect by themselves);
* :func:`enqueue_welcome_email` -- one ``EnqueueJob`` call with a deadline, the bearer token as
  metadata, and errors as ``grpc.RpcError`` with a status code and details;
* :class:`SignupApp` -- a minimal WSGI application (stdlib ``wsgiref``, the interface Flask and
  Django implement) whose ``POST /signup`` enqueues a welcome email and answers
  ``202 Accepted`` with the job id, without waiting for the email to be sent;
* :func:`main` -- ``python examples/sync_producer.py --server 127.0.0.1:50051`` serves the app
  on http://127.0.0.1:8000; ``--once ada@example.com`` enqueues one job and exits.

A worker for these jobs, in any language; in Python for example (``welcome.py``)::

    async def send_welcome(job):
        print("welcome,", job.data["to"])

    HANDLERS = {"email.welcome": send_welcome}

run with ``stackduck-trio worker welcome:HANDLERS``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.parse
from collections.abc import Callable, Iterable, Sequence
from typing import Any
from wsgiref.simple_server import make_server

import grpc  # type: ignore[import-untyped]

from stackduck_trio._proto import stackduck_pb2 as pb
from stackduck_trio._proto import stackduck_pb2_grpc

JOB_TYPE = "email.welcome"
DEFAULT_SERVER = "127.0.0.1:50051"

StartResponse = Callable[[str, list[tuple[str, str]]], Any]


def connect(
    server: str, *, tls: bool = False
) -> tuple[grpc.Channel, stackduck_pb2_grpc.StackDuckServiceStub]:
    """Open a channel to a Stackduck server and return it with a stub bound to it.

    Args:
        server: ``HOST:PORT``.
        tls: Use TLS with the system trust store.
    """
    # Don't send 127.0.0.1 traffic through an http_proxy from the environment.
    options = [("grpc.enable_http_proxy", 0)]
    if tls:
        channel = grpc.secure_channel(server, grpc.ssl_channel_credentials(), options=options)
    else:
        channel = grpc.insecure_channel(server, options=options)
    return channel, stackduck_pb2_grpc.StackDuckServiceStub(channel)  # type: ignore[no-untyped-call]


def enqueue_welcome_email(
    stub: stackduck_pb2_grpc.StackDuckServiceStub,
    address: str,
    *,
    name: str | None = None,
    token: str | None = None,
    timeout: float = 5.0,
) -> str:
    """Enqueue a high-priority ``email.welcome`` job for ``address``.

    Args:
        stub: A ``StackDuckServiceStub``.
        address: The recipient's e-mail address.
        name: Optional name to greet.
        token: Bearer token, if the server requires one.
        timeout: Deadline of the call, seconds.

    Returns:
        The job id.

    Raises:
        ValueError: ``address`` is not an e-mail address.
        grpc.RpcError: The server refused (``INVALID_ARGUMENT``, ``UNAUTHENTICATED``, ...) or
            could not be reached in time (``UNAVAILABLE``, ``DEADLINE_EXCEEDED``);
            ``.code()`` and ``.details()`` say which and why.
    """
    local, at, domain = address.partition("@")
    if not (local and at and "." in domain) or any(c.isspace() for c in address):
        raise ValueError(f"not an e-mail address: {address!r}")
    payload = {"to": address, "template": "welcome"}
    if name:
        payload["name"] = name
    request = pb.EnqueueJobRequest(
        job_type=JOB_TYPE,
        payload=json.dumps(payload),
        priority=1,  # before newsletters and reports
        max_retries=5,  # mail servers have bad minutes
        delay=10,  # retry after 10 s, 20 s, 40 s, ...
    )
    metadata = [("authorization", f"Bearer {token}")] if token else None
    response = stub.EnqueueJob(request, timeout=timeout, metadata=metadata)
    return str(response.job_id)


class SignupApp:
    """WSGI application: ``POST /signup`` (form or JSON: ``email``, optional ``name``).

    Answers ``202`` with ``{"job_id": ...}``; ``400`` for a bad address or a request the
    server rejects; ``503`` when the queue cannot be reached (the client may retry).

    Args:
        stub: A stub on a channel shared by all requests.
        token: Bearer token for the server.
    """

    def __init__(
        self, stub: stackduck_pb2_grpc.StackDuckServiceStub, *, token: str | None = None
    ) -> None:
        self.stub = stub
        self.token = token

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        if environ.get("PATH_INFO") != "/signup":
            return _reply(start_response, "404 Not Found", {"error": "try POST /signup"})
        if environ.get("REQUEST_METHOD") != "POST":
            return _reply(start_response, "405 Method Not Allowed", {"error": "use POST"})
        try:
            form = _read_form(environ)
            job_id = enqueue_welcome_email(
                self.stub, str(form.get("email", "")), name=form.get("name"), token=self.token
            )
        except ValueError as exc:
            return _reply(start_response, "400 Bad Request", {"error": str(exc)})
        except grpc.RpcError as exc:
            code = exc.code()
            body = {"error": f"{code.name}: {exc.details()}"}
            if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED):
                return _reply(start_response, "400 Bad Request", body)
            return _reply(start_response, "503 Service Unavailable", body)
        return _reply(start_response, "202 Accepted", {"job_id": job_id})


def _read_form(environ: dict[str, Any]) -> dict[str, Any]:
    try:
        length = int(environ.get("CONTENT_LENGTH") or 0)
    except ValueError:
        length = 0
    body = environ["wsgi.input"].read(min(length, 64 * 1024)) if length > 0 else b""
    if environ.get("CONTENT_TYPE", "").startswith("application/json"):
        try:
            data = json.loads(body or b"{}")
        except json.JSONDecodeError as exc:
            raise ValueError(f"invalid JSON body: {exc}") from None
        if not isinstance(data, dict):
            raise ValueError("expected a JSON object")
        return data
    return {k: v[0] for k, v in urllib.parse.parse_qs(body.decode("utf-8", "replace")).items()}


def _reply(start_response: StartResponse, status: str, body: dict[str, Any]) -> list[bytes]:
    data = json.dumps(body).encode()
    start_response(
        status, [("Content-Type", "application/json"), ("Content-Length", str(len(data)))]
    )
    return [data]


def main(argv: Sequence[str] | None = None) -> int:
    """Serve :class:`SignupApp`, or enqueue one job with ``--once ADDRESS``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument(
        "--server",
        default=os.environ.get("STACKDUCK_SERVER", DEFAULT_SERVER),
        help=f"Stackduck server HOST:PORT ($STACKDUCK_SERVER, default {DEFAULT_SERVER})",
    )
    parser.add_argument("--token", default=os.environ.get("STACKDUCK_TOKEN"), help="bearer token")
    parser.add_argument("--tls", action="store_true", help="connect with TLS")
    parser.add_argument("--listen", default="127.0.0.1:8000", help="HOST:PORT of the web app")
    parser.add_argument("--once", metavar="ADDRESS", help="enqueue one welcome e-mail and exit")
    args = parser.parse_args(argv)
    channel, stub = connect(args.server, tls=args.tls)
    with channel:
        if args.once:
            try:
                print(enqueue_welcome_email(stub, args.once, token=args.token))
            except ValueError as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 2
            except grpc.RpcError as exc:
                print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
                return 1
            return 0
        host, _, port = args.listen.rpartition(":")
        with make_server(host, int(port), SignupApp(stub, token=args.token)) as httpd:
            print(f"POST http://{args.listen}/signup  ->  {JOB_TYPE} jobs on {args.server}")
            try:
                httpd.serve_forever()
            except KeyboardInterrupt:
                pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
