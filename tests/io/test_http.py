"""The HTTP listener (dashboard, JSON API, /metrics) over real HTTP against a real server."""

from __future__ import annotations

import http.client
import json
import socket
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

import pytest
import trio

from stackduck_trio import Client, _http
from stackduck_trio._config import ConfigError, load_config
from stackduck_trio._history import History, Totals, quantile
from stackduck_trio._http import MAX_BODY_BYTES
from stackduck_trio.testing import open_test_server

from .test_metrics import free_port

JSON = {"Content-Type": "application/json"}


class Answer:
    def __init__(self, status: int, headers: Mapping[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    @property
    def json(self) -> Any:
        return json.loads(self.body)

    def __repr__(self) -> str:
        return f"<{self.status} {self.body[:200]!r}>"


def _request(
    port: int,
    method: str,
    path: str,
    body: bytes | str | object | None = None,
    headers: Mapping[str, str] | None = None,
) -> Answer:
    if body is not None and not isinstance(body, bytes | str):
        body = json.dumps(body)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=dict(headers or {}))
        r = conn.getresponse()
        return Answer(r.status, {k.lower(): v for k, v in r.getheaders()}, r.read())
    finally:
        conn.close()


def exchange(port: int, data: bytes) -> bytes:
    """Send raw bytes to the listener; everything it answers until it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        out = b""
        while chunk := sock.recv(65536):
            out += chunk
        return out


async def call(
    port: int,
    method: str,
    path: str,
    body: bytes | str | object | None = None,
    headers: Mapping[str, str] | None = None,
) -> Answer:
    return await trio.to_thread.run_sync(_request, port, method, path, body, headers)


async def post(port: int, path: str, body: object, token: str | None = None) -> Answer:
    headers = dict(JSON)
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return await call(port, "POST", path, body, headers)


async def until(predicate: Any, within: float = 5.0) -> Any:
    """Poll an async predicate until it returns something truthy (polling on purpose)."""
    with trio.fail_after(within):
        while not (value := await predicate()):  # noqa: ASYNC110
            await trio.sleep(0.05)
    return value


@pytest.fixture
async def server() -> AsyncIterator[tuple[int, str]]:
    """(HTTP port, gRPC address) of a server without tokens."""
    port = free_port()
    async with open_test_server(http_addr=f"127.0.0.1:{port}", grace_period=1.0) as (
        grpc_port,
        _,
    ):
        yield port, f"127.0.0.1:{grpc_port}"


async def make_dead(client: Client, job_type: str, n: int = 1) -> list[str]:
    """Jobs with no retries, failed by a (hand-driven) worker: dead letters."""
    ids = []
    for i in range(n):
        job_id = await client.enqueue(job_type, {"n": i}, max_retries=0)
        job = await client.dequeue(job_type, worker_id="test-worker")
        assert job is not None and job.id == job_id
        assert await client.fail(job.id, job.lease_id, f"boom {i}") == "failed"
        ids.append(job_id)
    return ids


# -- every endpoint ------------------------------------------------------------------------


async def test_page_and_metrics(server: tuple[int, str]) -> None:
    port, _ = server
    page = await call(port, "GET", "/")
    assert page.status == 200
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    assert b"<title>Stackduck</title>" in page.body
    csp = page.headers["content-security-policy"]
    assert "script-src 'sha256-" in csp and "default-src 'none'" in csp
    assert "unsafe" not in csp
    head = await call(port, "HEAD", "/")
    assert head.status == 200 and head.body == b""
    assert head.headers["content-length"] == str(len(page.body))
    metrics = await call(port, "GET", "/metrics")
    assert metrics.status == 200
    assert metrics.headers["content-type"].startswith("text/plain")
    assert b"stackduck_workers" in metrics.body


async def test_stats_history_and_job_lookup(server: tuple[int, str]) -> None:
    port, address = server
    async with Client.connect(address) as client:
        queued = await client.enqueue("email_send", {"to": "ada"}, priority=1)
        await client.enqueue("email_send", {"to": "bob"}, priority=3)
        await client.enqueue("report", {}, scheduled_at=time.time() + 3600)
        await client.set_limits("email_send", rate=5, burst=2, max_running=3)

        async def typed() -> dict[str, Any] | None:
            stats = (await call(port, "GET", "/api/stats")).json
            types = {t["job_type"]: t for t in stats["types"]}
            if {"email_send", "report"} <= types.keys() and types["email_send"]["max_running"]:
                return stats
            return None

        stats = await until(typed)
        email = next(t for t in stats["types"] if t["job_type"] == "email_send")
        assert (email["rate_limit"], email["rate_burst"], email["max_running"]) == (5, 2, 3)
        assert email["queued"] == [1, 0, 1] and email["queued_total"] == 2
        assert email["paused"] is False and email["workers"] == 0
        assert stats["totals"]["queued"] == 2 and stats["totals"]["scheduled"] == 1
        assert {(b["role"], b["state"]) for b in stats["backends"]} == {
            ("record_store", "healthy"),
            ("queue_tier", "healthy"),
        }
        assert stats["queue_route"] == "memory" and stats["route_reason"]
        assert stats["auth_required"] is False and stats["workers"] == []

        # a worker stream shows up; a delivery makes a latency sample
        async with client.consume(["email_send"], worker_id="w-1", prefetch=4) as jobs:
            job = await jobs.__anext__()

            async def streaming() -> dict[str, Any] | None:
                stats = (await call(port, "GET", "/api/stats")).json
                return stats if stats["workers"] else None

            stats = await until(streaming)
            assert stats["workers"] == [
                {"worker_id": "w-1", "streams": 1, "job_types": ["email_send"], "prefetch": 4,
                 "in_flight": 2},
            ]  # fmt: skip
            assert stats["totals"]["workers"] == 1
            await client.complete(job.id, job.lease_id)

        async def sampled() -> list[dict[str, Any]]:
            samples = (await call(port, "GET", "/api/history")).json["samples"]
            return [s for s in samples if s["p50"] is not None] and samples

        samples = await until(sampled)
        assert sum(s["enqueued"] for s in samples) > 0
        started = [s for s in samples if s["started"]]
        assert started and all(s["p50"] <= s["p99"] for s in started)
        assert {"t", "enqueued", "completed", "failed", "p50", "p99"} <= samples[0].keys()
        later = await call(port, "GET", f"/api/history?since={samples[-1]['t']}")
        assert all(s["t"] > samples[-1]["t"] for s in later.json["samples"])

        found = await call(port, "GET", f"/api/jobs/{queued}")
        assert found.status == 200
        assert found.json["job"]["id"] == queued
        assert found.json["job"]["job_type"] == "email_send"
        assert json.loads(found.json["job"]["payload"]) == {"to": "ada"}
        missing = await call(port, "GET", "/api/jobs/no-such-job")
        assert (missing.status, missing.json) == (404, {"error": "no job with id no-such-job"})
        assert (await call(port, "GET", "/api/jobs/" + "x" * 200)).status == 400


async def test_dead_letters_requeue_purge_pause_resume(server: tuple[int, str]) -> None:
    port, address = server
    async with Client.connect(address) as client:
        dead = await make_dead(client, "resize", 3)
        (other,) = await make_dead(client, "thumbs", 1)

        page = (await call(port, "GET", "/api/dead")).json
        assert [j["id"] for j in page["jobs"]] == [*dead, other]
        assert page["jobs"][0]["error_message"] == "boom 0"
        assert page["jobs"][0]["status"] == "failed" and page["next_cursor"] == ""
        # paging with the cursor, by type
        first = (await call(port, "GET", "/api/dead?job_type=resize&limit=2")).json
        assert [j["id"] for j in first["jobs"]] == dead[:2] and first["next_cursor"]
        rest = (
            await call(
                port, "GET", f"/api/dead?job_type=resize&limit=2&cursor={first['next_cursor']}"
            )
        ).json
        assert [j["id"] for j in rest["jobs"]] == dead[2:] and rest["next_cursor"] == ""
        for bad in ("cursor=nonsense", "limit=0", "limit=abc", "job_type=no%20spaces"):
            answer = await call(port, "GET", f"/api/dead?{bad}")
            assert answer.status == 400, (bad, answer)
            assert answer.json["error"]

        # requeue by id: the job is queued again; a second time it is not dead any more
        answer = await post(port, "/api/dead/requeue", {"job_ids": [dead[0]]})
        assert answer.status == 200, answer
        assert answer.json == {
            "count": 1,
            "results": [{"job_id": dead[0], "ok": True, "status": "queued"}],
            "more": False,
        }
        assert (await client.get(dead[0])).status == "queued"
        again = (await post(port, "/api/dead/requeue", {"job_ids": [dead[0], "nope"]})).json
        assert again["count"] == 0
        assert [r["code"] for r in again["results"]] == ["FAILED_PRECONDITION", "NOT_FOUND"]
        # the stats snapshot follows an action at once
        stats = (await call(port, "GET", "/api/stats")).json
        assert next(t for t in stats["types"] if t["job_type"] == "resize")["dead"] == 2

        # purge by type, then requeue every type
        purged = (await post(port, "/api/dead/purge", {"job_type": "resize"})).json
        assert purged["count"] == 2 and purged["more"] is False
        assert (await call(port, "GET", f"/api/jobs/{dead[1]}")).status == 404
        everything = (await post(port, "/api/dead/requeue", {"job_type": "*"})).json
        assert everything["count"] == 1 and everything["results"][0]["job_id"] == other
        assert (await call(port, "GET", "/api/dead")).json["jobs"] == []

        # pause and resume, visible in the stats
        answer = await post(port, "/api/pause", {"job_type": "thumbs"})
        assert answer.json == {"job_type": "thumbs", "paused": True}
        stats = (await call(port, "GET", "/api/stats")).json
        assert next(t for t in stats["types"] if t["job_type"] == "thumbs")["paused"] is True
        assert await client.dequeue("thumbs") is None  # paused: nothing delivered
        answer = await post(port, "/api/resume", {"job_type": "thumbs"})
        assert answer.json == {"job_type": "thumbs", "paused": False}
        job = await client.dequeue("thumbs")
        assert job is not None
        await client.complete(job.id, job.lease_id)


# -- bad requests ----------------------------------------------------------------------------


async def test_bad_requests_get_precise_json_errors(server: tuple[int, str]) -> None:
    port, _ = server

    async def expect(status: int, answer: Answer, text: str = "") -> None:
        assert answer.status == status, answer
        assert answer.headers["content-type"] == "application/json"
        assert text in answer.json["error"]

    await expect(404, await call(port, "GET", "/nope"), "no such resource: /nope")
    await expect(404, await call(port, "GET", "/api/nope"))
    wrong = await call(port, "POST", "/api/stats", {}, JSON)
    await expect(405, wrong, "POST is not allowed here")
    assert wrong.headers["allow"] == "GET, HEAD"
    await expect(405, await call(port, "GET", "/api/pause"))
    await expect(405, await call(port, "DELETE", "/api/dead"))
    await expect(400, await post(port, "/api/pause", "{not json"), "not valid JSON")
    await expect(400, await post(port, "/api/pause", b"\xff\xfe"), "not valid JSON")
    await expect(400, await post(port, "/api/pause", [1, 2]), "must be a JSON object")
    await expect(400, await post(port, "/api/pause", {"job_type": 7}), "job_type")
    await expect(400, await post(port, "/api/pause", {"job_type": "a b"}), "job_type")
    await expect(400, await post(port, "/api/pause", {"job_type": "x", "y": 1}), "unknown field")
    await expect(400, await post(port, "/api/dead/requeue", {}), 'either "job_ids" or "job_type"')
    await expect(400, await post(port, "/api/dead/requeue", {"job_ids": ["a"], "job_type": "t"}))
    await expect(400, await post(port, "/api/dead/purge", {"job_ids": []}), "non-empty list")
    await expect(400, await post(port, "/api/dead/purge", {"job_ids": [""]}), "job_ids")
    await expect(400, await post(port, "/api/dead/purge", {"job_ids": "abc"}), "job_ids")
    await expect(
        413, await post(port, "/api/dead/purge", {"job_ids": ["a"] * 1001}), "at most 1000"
    )
    await expect(400, await call(port, "GET", "/api/history?since=later"), "since")
    await expect(400, await call(port, "GET", "/api/history?since=nan"), "since")
    # too large: by Content-Length, and a chunked body that keeps going
    big = b'{"job_type": "' + b"x" * MAX_BODY_BYTES + b'"}'
    await expect(413, await call(port, "POST", "/api/pause", big, JSON), "at most")

    def chunked() -> Answer:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            chunks = (b"y" * 16384 for _ in range(8))
            conn.request("POST", "/api/pause", body=chunks, headers=JSON, encode_chunked=True)
            r = conn.getresponse()
            return Answer(r.status, {k.lower(): v for k, v in r.getheaders()}, r.read())
        finally:
            conn.close()

    await expect(413, await trio.to_thread.run_sync(chunked))
    # no JSON content type (what a cross-site HTML form sends), a cross-site Origin
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    await expect(415, await call(port, "POST", "/api/pause", "job_type=x", form), "Content-Type")
    await expect(415, await call(port, "POST", "/api/pause", '{"job_type": "x"}'))
    cross = {**JSON, "Origin": "http://evil.example"}
    await expect(
        403, await call(port, "POST", "/api/pause", {"job_type": "x"}, cross), "cross-site"
    )
    fetch = {**JSON, "Sec-Fetch-Site": "cross-site"}
    await expect(403, await call(port, "POST", "/api/pause", {"job_type": "x"}, fetch))
    same = {**JSON, "Origin": f"http://127.0.0.1:{port}"}
    assert (await call(port, "POST", "/api/pause", {"job_type": "x"}, same)).status == 200


async def test_listener_survives_garbage_and_keeps_connections_alive(
    server: tuple[int, str],
) -> None:
    port, _ = server

    answer = await trio.to_thread.run_sync(exchange, port, b"\x00\x01 not http\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400 ") and b'"error"' in answer
    huge_header = b"GET / HTTP/1.1\r\nhost: x\r\nx-big: " + b"a" * 20000 + b"\r\n\r\n"
    answer = await trio.to_thread.run_sync(exchange, port, huge_header)
    assert answer.split(b" ")[1] in (b"400", b"431")
    for target in (b"http://elsewhere/", b"/api/jobs/%ff"):
        request = b"GET " + target + b" HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"
        answer = await trio.to_thread.run_sync(exchange, port, request)
        assert answer.startswith(b"HTTP/1.1 400 "), answer
    # a client that connects and says nothing, or goes away mid-request, costs nothing
    idle = socket.create_connection(("127.0.0.1", port))
    half = socket.create_connection(("127.0.0.1", port))
    half.sendall(b"POST /api/pause HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n{")
    half.close()

    def keep_alive() -> list[int]:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        statuses = []
        try:
            for path in ("/api/stats", "/nope", "/api/dead", "/metrics"):
                conn.request("GET", path)
                r = conn.getresponse()
                r.read()
                statuses.append(r.status)
                assert r.getheader("connection") != "close"
            conn.request("POST", "/api/resume", body='{"job_type": "k"}', headers=JSON)
            r = conn.getresponse()
            r.read()
            statuses.append(r.status)
            return statuses
        finally:
            conn.close()

    assert await trio.to_thread.run_sync(keep_alive) == [200, 404, 200, 200, 200]
    idle.close()
    assert (await call(port, "GET", "/api/stats")).status == 200


async def test_slow_clients_time_out_and_connections_are_bounded(
    server: tuple[int, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    port, _ = server
    monkeypatch.setattr(_http, "REQUEST_TIMEOUT", 0.5)

    # silence: closed without an answer; a body that never ends: 408
    assert await trio.to_thread.run_sync(exchange, port, b"") == b""
    started = b"POST /api/pause HTTP/1.1\r\nhost: x\r\ncontent-length: 50\r\n\r\n{"
    answer = await trio.to_thread.run_sync(exchange, port, started)
    assert answer.startswith(b"HTTP/1.1 408 ") and b"too long to arrive" in answer

    # past MAX_CONNECTIONS open at once, a new one is told 503 and closed
    held = [socket.create_connection(("127.0.0.1", port)) for _ in range(_http.MAX_CONNECTIONS)]
    try:
        # (until the server has accepted all of them, a probe is still served)
        with trio.fail_after(10):
            while True:
                probe = b"GET /api/stats HTTP/1.1\r\nhost: x\r\n\r\n"
                answer = await trio.to_thread.run_sync(exchange, port, probe)
                if not answer.startswith(b"HTTP/1.1 200 "):
                    break
                await trio.sleep(0.02)
        assert answer.startswith(b"HTTP/1.1 503 ") and b"too many connections" in answer
    finally:
        for sock in held:
            sock.close()

    async def served() -> bool:
        return (await call(port, "GET", "/api/stats")).status == 200

    await until(served)  # the slots come back as the connections close


# -- auth ----------------------------------------------------------------------------------


async def test_tokens_protect_actions_but_not_reads() -> None:
    port = free_port()
    async with open_test_server(http_addr=f"127.0.0.1:{port}", tokens=("s3cret", "other")) as (
        grpc_port,
        _,
    ):
        async with Client.connect(f"127.0.0.1:{grpc_port}", token="s3cret") as client:
            (dead,) = await make_dead(client, "guarded")
        for path in ("/", "/metrics", "/api/stats", "/api/history", "/api/dead"):
            assert (await call(port, "GET", path)).status == 200, path
        assert (await call(port, "GET", "/api/stats")).json["auth_required"] is True
        assert (await call(port, "GET", f"/api/jobs/{dead}")).status == 200

        for token in (None, "wrong", ""):
            answer = await post(port, "/api/dead/requeue", {"job_ids": [dead]}, token)
            assert answer.status == 401, (token, answer)
            assert answer.headers["www-authenticate"].startswith("Bearer")
            assert "token" in answer.json["error"]
        basic = {**JSON, "Authorization": "Basic czNjcmV0"}
        assert (await call(port, "POST", "/api/pause", {"job_type": "g"}, basic)).status == 401
        # 401 before anything else: nothing leaks about the body
        assert (await call(port, "POST", "/api/pause", "{bad")).status == 401
        assert (await call(port, "GET", "/api/dead")).json["jobs"][0]["id"] == dead

        ok = await post(port, "/api/dead/requeue", {"job_ids": [dead]}, "other")
        assert ok.status == 200 and ok.json["count"] == 1
        assert (await post(port, "/api/pause", {"job_type": "guarded"}, "s3cret")).status == 200
        assert (await post(port, "/api/resume", {"job_type": "guarded"}, "s3cret")).status == 200


# -- configuration and the pure history ------------------------------------------------------


def test_http_address_setting_and_its_alias() -> None:
    assert load_config(environ={}).http_addr == ""
    config = load_config(environ={"STACKDUCK_HTTP_ADDR": "127.0.0.1:8080"})
    assert config.http_addr == "127.0.0.1:8080"
    # the old name still works, and names the same listener
    config = load_config(environ={"STACKDUCK_METRICS_ADDR": "127.0.0.1:9090"})
    assert config.http_addr == "127.0.0.1:9090"
    both = {"STACKDUCK_HTTP_ADDR": "127.0.0.1:9090", "STACKDUCK_METRICS_ADDR": "127.0.0.1:9090"}
    assert load_config(environ=both).http_addr == "127.0.0.1:9090"
    with pytest.raises(ConfigError, match="STACKDUCK_HTTP_ADDR.*STACKDUCK_METRICS_ADDR"):
        load_config(environ={**both, "STACKDUCK_HTTP_ADDR": "127.0.0.1:8080"})
    with pytest.raises(ConfigError, match="--http-addr"):
        load_config(environ=both, overrides={"http_addr": "0.0.0.0:1"})
    with pytest.raises(ConfigError, match="STACKDUCK_HTTP_ADDR='8080'"):
        load_config(environ={"STACKDUCK_HTTP_ADDR": "8080"})


def test_history_is_a_bounded_ring_of_rates_and_quantiles() -> None:
    assert quantile([], 0.5) is None
    assert quantile([1.0], 0.99) == 1.0
    values = [float(i) for i in range(1, 101)]
    assert (quantile(values, 0.5), quantile(values, 0.99), quantile(values, 1.0)) == (50, 99, 100)
    history = History(size=3)
    assert history.record(100.0, Totals(5, 0, 0), [9.0]) is None  # baseline only
    sample = history.record(102.0, Totals(25, 4, 2), [0.3, 0.1, 0.2])
    assert sample is not None
    assert (sample.enqueued, sample.completed, sample.failed) == (10.0, 2.0, 1.0)
    assert (sample.p50, sample.p99, sample.started) == (0.2, 0.3, 3)
    assert history.record(102.0, Totals(30, 4, 2), []) is None  # no time passed
    for t in (103.0, 104.0, 105.0):
        history.record(t, Totals(30, 4, 2), [])
    assert [s.t for s in history.samples] == [103.0, 104.0, 105.0]
    assert history.samples[-1].p50 is None and history.samples[-1].enqueued == 0
    assert [s.t for s in history.since(103.5)] == [104.0, 105.0]
