"""The assembled server: dropped streams leave nothing behind, TLS and JSON logs
work end to end through the configuration."""

from __future__ import annotations

import json
import pathlib
import subprocess
import time

import grpc
import pytest
import trio

from stackduck_trio._proto import stackduck_pb2 as pb
from stackduck_trio._proto import stackduck_pb2_grpc as rpc
from stackduck_trio.testing import ServerProcess, open_test_server


def _stats(address: str) -> pb.GetStatsResponse:
    with grpc.insecure_channel(address) as channel:
        return rpc.StackDuckServiceStub(channel).GetStats(pb.GetStatsRequest(), timeout=5)


async def _wait_for(address: str, predicate) -> pb.GetStatsResponse:  # type: ignore[no-untyped-def]
    with trio.fail_after(10):
        while True:
            stats = await trio.to_thread.run_sync(_stats, address)
            if predicate(stats):
                return stats
            await trio.sleep(0.05)


async def test_500_dropped_streams_leave_no_handler_and_requeue_their_jobs(
    tmp_path: pathlib.Path,
) -> None:
    async with open_test_server(tmp_path, heartbeat_interval=0.5) as (port, _config):
        address = f"127.0.0.1:{port}"
        channels = [grpc.insecure_channel(address) for _ in range(5)]
        stub = rpc.StackDuckServiceStub(channels[0])
        request = pb.EnqueueJobsRequest(
            jobs=[pb.EnqueueJobRequest(job_type="drop") for _ in range(50)]
        )
        await trio.to_thread.run_sync(lambda: stub.EnqueueJobs(request, timeout=10))

        def open_streams() -> list[grpc.Future]:
            return [
                rpc.StackDuckServiceStub(channels[n % 5]).ConsumeJobs(
                    pb.ConsumeJobsRequest(worker_id=f"w{n}", job_types=["drop"])
                )
                for n in range(500)
            ]

        calls = await trio.to_thread.run_sync(open_streams)
        # every stream attached, and the 50 jobs handed out among them
        await _wait_for(address, lambda s: s.workers == 500 and s.running == 50)
        for n, call in enumerate(calls):
            if n % 2:
                call.cancel()  # RST_STREAM
        for channel in channels:
            channel.close()  # the other half by closing their connections
        stats = await _wait_for(address, lambda s: s.workers == 0 and s.running == 0)
        [drop] = [t for t in stats.types if t.job_type == "drop"]
        assert drop.queued_p2 == 50  # every delivered job is back in the queue


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[pathlib.Path, pathlib.Path]:
    directory = tmp_path_factory.mktemp("tls")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-days", "1", "-subj", "/CN=localhost",
            "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
            "-keyout", str(key), "-out", str(cert),
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


def test_tls_and_tokens_from_the_command_line(
    tmp_path: pathlib.Path, tls_files: tuple[pathlib.Path, pathlib.Path]
) -> None:
    cert, key = tls_files
    with ServerProcess(
        tmp_path,
        "--tls-cert", str(cert), "--tls-key", str(key), "--log-format", "json",
        env={"STACKDUCK_TOKENS": "s3cret"},
    ) as server:  # fmt: skip
        credentials = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
        with grpc.secure_channel(server.address, credentials) as channel:
            stub = rpc.StackDuckServiceStub(channel)
            with pytest.raises(grpc.RpcError) as error:
                stub.EnqueueJob(pb.EnqueueJobRequest(job_type="tls"), timeout=5)
            assert error.value.code() is grpc.StatusCode.UNAUTHENTICATED
            reply = stub.EnqueueJob(
                pb.EnqueueJobRequest(job_type="tls"),
                metadata=[("authorization", "Bearer s3cret")],
                timeout=5,
            )
            assert reply.success and reply.job_id
        with grpc.insecure_channel(server.address) as plain:
            with pytest.raises(grpc.RpcError) as error:
                rpc.StackDuckServiceStub(plain).GetStats(pb.GetStatsRequest(), timeout=2)
            assert error.value.code() is grpc.StatusCode.UNAVAILABLE
        assert server.terminate() == 0
    lines = [json.loads(line) for line in server.log_path.read_text().splitlines() if line]
    assert any("serving on" in line["msg"] and "(TLS)" in line["msg"] for line in lines)
    assert all({"ts", "level", "logger", "msg"} <= line.keys() for line in lines)


def test_second_server_on_the_same_port_fails_loudly(tmp_path: pathlib.Path) -> None:
    with ServerProcess(tmp_path / "a") as first:
        second = ServerProcess(tmp_path / "b")
        started = time.monotonic()
        with pytest.raises(RuntimeError, match="exited with 1"):
            second.start(port=first.port)
        assert time.monotonic() - started < 15
        assert "cannot serve on 127.0.0.1" in second.log_path.read_text()


def test_two_servers_cannot_share_a_data_directory(tmp_path: pathlib.Path) -> None:
    with ServerProcess(tmp_path):
        second = ServerProcess(tmp_path, log_path=tmp_path / "second.log")
        with pytest.raises(RuntimeError, match="exited with 1"):
            second.start()
        assert "in use by another Stackduck server" in second.log_path.read_text()


async def test_streams_opened_together_do_not_send_heartbeats_together() -> None:
    """Workers reconnecting together must not make the server beat in one burst."""
    import bisect

    from stackduck_trio import Client, JobStream

    interval, count = 1.0, 200
    first: dict[int, float] = {}

    async def read(stream: JobStream) -> None:
        async for _ in stream:
            pass  # nothing is ever enqueued: only heartbeats come

    with trio.fail_after(20):
        async with open_test_server(heartbeat_interval=interval) as (port, _):
            async with Client.connect(f"127.0.0.1:{port}") as client:
                streams = [client.consume(["nobody-enqueues-this"]) for _ in range(count)]
                async with trio.open_nursery() as nursery:
                    for stream in streams:
                        await stream.open()
                        nursery.start_soon(read, stream)
                    opened = trio.current_time()
                    for _ in range(int(3 * interval / 0.005)):
                        await trio.sleep(0.005)
                        for n, stream in enumerate(streams):
                            if stream.heartbeats and n not in first:
                                first[n] = stream.last_message_at - opened
                        if len(first) == count:
                            break
                    nursery.cancel_scope.cancel()
    times = sorted(first.values())
    assert len(times) == count
    assert times[-1] < interval + 0.5  # (slack for a loaded machine)
    # spread over the interval: no 50 ms holds more than 15% of the first heartbeats
    busiest = max(bisect.bisect(times, t + 0.05) - i for i, t in enumerate(times))
    print(
        f"\nfirst heartbeats of {count} streams over {times[0]:.3f}..{times[-1]:.3f} s, "
        f"busiest 50 ms: {busiest}"
    )
    assert busiest <= 0.15 * count
