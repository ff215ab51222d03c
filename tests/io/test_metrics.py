"""``/metrics``: scraped during a real workload, the numbers match the workload."""

from __future__ import annotations

import json
import pathlib
import socket
import time
import urllib.error
import urllib.request

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from stackduck_trio import Client, JobInfo, Worker
from stackduck_trio._config import ConfigError, load_config
from stackduck_trio.testing import ServerProcess, open_test_server

from .e2e_helpers import open_client


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    def get() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            assert r.headers["content-type"].startswith("text/plain")
            return str(r.read().decode())

    text = await trio.to_thread.run_sync(get)
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def test_metrics_match_a_workload() -> None:
    port = free_port()
    async with open_test_server(metrics_addr=f"127.0.0.1:{port}", heartbeat_interval=0.2) as (
        grpc_port,
        _,
    ):
        address = f"127.0.0.1:{grpc_port}"

        async def ok(job: JobInfo) -> None:
            await trio.sleep(0.01)

        async def bad(job: JobInfo) -> None:
            raise RuntimeError("boom")

        worker = Worker(address, {"ok": ok, "bad": bad}, stream_idle_timeout=1.0)
        async with Client.connect(address) as client:
            await client.set_limits("ok", max_running=1)  # throttles: one at a time
            for i in range(10):
                await client.enqueue("ok", {"i": i})
            for i in range(4):
                await client.enqueue("bad", {"i": i}, max_retries=1, delay=0)
            await client.enqueue("later", {}, delay=0, scheduled_at=time.time() + 3600)
            async with trio.open_nursery() as nursery:
                await nursery.start(worker.run)
                with trio.fail_after(10):
                    while (await client.stats()).dead < 4:  # noqa: ASYNC110
                        await trio.sleep(0.05)
                    while True:
                        stats = await client.stats()
                        done = stats.of("ok")
                        if done is not None and done.completed == 10:
                            break
                        await trio.sleep(0.05)
                # the gauges follow within a refresh (once a second)
                dead = (
                    "stackduck_jobs",
                    (("job_type", "bad"), ("priority", ""), ("status", "dead")),
                )
                throttled = stats.of("ok").throttled  # type: ignore[union-attr]
                assert throttled > 0
                held = (
                    "stackduck_jobs_throttled_total",
                    (("job_type", "ok"), ("limit", "running")),
                )
                with trio.fail_after(5):
                    while (m := await scrape(port)).get(dead) != 4 or m.get(held) != throttled:  # noqa: ASYNC110
                        await trio.sleep(0.1)
                worker.stop()

    def value(name: str, **labels: str) -> float:
        return m.get((name, tuple(sorted(labels.items()))), 0.0)

    assert value("stackduck_jobs_enqueued_total", job_type="ok") == 10
    assert value("stackduck_jobs_enqueued_total", job_type="bad") == 4
    assert value("stackduck_jobs_completed_total", job_type="ok") == 10
    assert value("stackduck_jobs_started_total", job_type="ok") == 10
    assert value("stackduck_jobs_started_total", job_type="bad") == 8  # 4 jobs, 2 attempts
    assert value("stackduck_jobs_retried_total", job_type="bad") == 4
    assert value("stackduck_jobs_dead_lettered_total", job_type="bad") == 4
    assert value("stackduck_job_run_seconds_count", job_type="ok") == 10
    assert value("stackduck_job_run_seconds_sum", job_type="ok") >= 0.1
    assert value("stackduck_job_wait_seconds_count", job_type="bad") == 8
    assert value("stackduck_jobs", job_type="bad", status="dead", priority="") == 4
    assert value("stackduck_jobs", job_type="later", status="scheduled", priority="") == 1
    assert value("stackduck_jobs", job_type="ok", status="queued", priority="2") == 0
    assert value("stackduck_backend_health", role="record_store", kind="memory",
                 state="healthy") == 1  # fmt: skip
    assert value("stackduck_queue_route", tier="memory") == 1
    assert value("stackduck_store_commit_seconds_count", backend="memory", outcome="ok") > 0


async def test_metrics_http_answers_404_405_and_survives_garbage() -> None:
    port = free_port()
    async with open_test_server(metrics_addr=f"127.0.0.1:{port}"):

        def get(path: str, method: str = "GET") -> int:
            req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method)
            try:
                with urllib.request.urlopen(req, timeout=5) as r:
                    return int(r.status)
            except urllib.error.HTTPError as exc:
                return int(exc.code)

        assert await trio.to_thread.run_sync(get, "/nope") == 404
        assert await trio.to_thread.run_sync(get, "/metrics", "POST") == 405

        def garbage() -> None:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                sock.sendall(b"\x00\x01 not http\r\n\r\n")
                sock.recv(100)  # the server closes it, whatever it says

        await trio.to_thread.run_sync(garbage)
        assert await trio.to_thread.run_sync(get, "/metrics") == 200


def test_metrics_address_is_checked() -> None:
    assert load_config(environ={"STACKDUCK_METRICS_ADDR": "127.0.0.1:9090"}).metrics_addr
    assert load_config(environ={}).metrics_addr == ""
    with pytest.raises(ConfigError, match="STACKDUCK_METRICS_ADDR"):
        load_config(environ={"STACKDUCK_METRICS_ADDR": "nonsense"})


def test_job_lifecycle_logs_are_structured(tmp_path: pathlib.Path) -> None:
    """--log-jobs on --log-format json: one JSON line per lifecycle event, with ids."""
    with ServerProcess(
        tmp_path / "data", "--log-jobs", "on", "--log-format", "json", "--heartbeat-interval", "0.2"
    ) as server:
        with open_client(server.address) as client:
            job_id = client.enqueue("logged", payload='{"x": 1}')
            with client.stream(["logged"], prefetch=1) as stream:
                job = stream.next_job(within=5)
                client.complete(job)
        assert server.terminate(timeout=20) == 0
    events = [
        json.loads(line)
        for line in server.log_path.read_text().splitlines()
        if line.startswith("{") and '"stackduck.jobs"' in line
    ]
    mine = [e for e in events if e.get("job_id") == job_id]
    assert [e["status"] for e in mine] == ["queued", "running", "completed"]
    running = mine[1]
    assert running["job_type"] == "logged" and running["attempt"] == 1
    assert running["lease_id"] == job.lease_id and running["worker_id"]
