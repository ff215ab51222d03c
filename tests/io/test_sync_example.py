"""examples/sync_producer.py works against a real server process (grpcio, blocking)."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import pathlib
import socket
import subprocess
import sys
import types
import urllib.parse
from collections.abc import Iterator
from typing import Any
from wsgiref.util import setup_testing_defaults

import grpc
import pytest

from stackduck_trio._proto import stackduck_pb2 as pb
from stackduck_trio.testing import ServerProcess

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
EXAMPLE = REPO_ROOT / "examples" / "sync_producer.py"
TOKEN = "example-token"
AUTH = [("authorization", f"Bearer {TOKEN}")]


def load_example() -> types.ModuleType:
    spec = importlib.util.spec_from_file_location("sync_producer", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


example = load_example()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with ServerProcess(
        tmp_path_factory.mktemp("sync-example"), env={"STACKDUCK_TOKENS": TOKEN}
    ) as process:
        yield process


@pytest.fixture
def stub(server: ServerProcess) -> Iterator[Any]:
    channel, stub = example.connect(server.address)
    with channel:
        yield stub


def test_enqueue_welcome_email(stub: Any) -> None:
    job_id = example.enqueue_welcome_email(stub, "ada@example.com", name="Ada", token=TOKEN)
    job = stub.GetJob(pb.GetJobRequest(job_id=job_id), metadata=AUTH, timeout=5).job
    assert job.job_type == "email.welcome"
    assert json.loads(job.payload) == {
        "to": "ada@example.com",
        "template": "welcome",
        "name": "Ada",
    }
    assert (job.priority, job.max_retries, job.delay, job.status) == (1, 5, 10, "queued")


def test_errors(stub: Any) -> None:
    with pytest.raises(ValueError):
        example.enqueue_welcome_email(stub, "not an address", token=TOKEN)
    with pytest.raises(grpc.RpcError) as refused:
        example.enqueue_welcome_email(stub, "ada@example.com")  # no token
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED


def call_app(
    app: Any, method: str, path: str, body: bytes = b"", content_type: str = ""
) -> tuple[str, dict[str, Any]]:
    environ: dict[str, Any] = {
        "REQUEST_METHOD": method,
        "PATH_INFO": path,
        "CONTENT_LENGTH": str(len(body)),
        "CONTENT_TYPE": content_type,
        "wsgi.input": io.BytesIO(body),
    }
    setup_testing_defaults(environ)
    status: list[str] = []
    chunks = app(environ, lambda s, headers: status.append(s))
    return status[0], json.loads(b"".join(chunks))


def test_wsgi_app_enqueues_per_request(stub: Any) -> None:
    app = example.SignupApp(stub, token=TOKEN)
    form = urllib.parse.urlencode({"email": "grace@example.com", "name": "Grace"}).encode()
    status, body = call_app(app, "POST", "/signup", form, "application/x-www-form-urlencoded")
    assert status == "202 Accepted"
    job = stub.GetJob(pb.GetJobRequest(job_id=body["job_id"]), metadata=AUTH, timeout=5).job
    assert json.loads(job.payload)["name"] == "Grace"

    status, body = call_app(
        app,
        "POST",
        "/signup",
        json.dumps({"email": "linus@example.com"}).encode(),
        "application/json",
    )
    assert status == "202 Accepted" and body["job_id"] != job.id

    assert call_app(app, "POST", "/signup", b"email=nobody")[0] == "400 Bad Request"
    assert call_app(app, "POST", "/signup", b"{", "application/json")[0] == "400 Bad Request"
    assert call_app(app, "GET", "/signup")[0] == "405 Method Not Allowed"
    assert call_app(app, "POST", "/other")[0] == "404 Not Found"
    status, body = call_app(example.SignupApp(stub), "POST", "/signup", b"email=a@b.io")
    assert status == "503 Service Unavailable" and body["error"].startswith("UNAUTHENTICATED")


def test_wsgi_app_when_the_queue_is_down() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{sock.getsockname()[1]}"
    channel, stub = example.connect(dead)
    with channel:
        status, body = call_app(example.SignupApp(stub), "POST", "/signup", b"email=a@b.io")
    assert status == "503 Service Unavailable"
    assert body["error"].startswith("UNAVAILABLE")


def test_main_once(server: ServerProcess) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STACKDUCK_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    done = subprocess.run(
        [
            sys.executable,
            str(EXAMPLE),
            "--server",
            server.address,
            "--token",
            TOKEN,
            "--once",
            "x@y.org",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.strip()) == 36
