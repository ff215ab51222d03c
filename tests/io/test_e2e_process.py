"""End to end: processes die. Workers SIGKILLed, servers SIGKILLed and restarted, SIGTERM.

Each test starts its own ``stackduck-trio serve`` (SQLite in a temporary data dir) because it
kills, stops or restarts it, or because it checks server-wide numbers. Measured numbers are
printed (``pytest -s``).
"""

from __future__ import annotations

import collections
import json
import pathlib
import select
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator

import grpc
import pytest

from stackduck_trio._proto import health_pb2
from stackduck_trio.testing import ServerProcess

from .e2e_helpers import (
    call_error,
    check_log_clean,
    health_check,
    new_type,
    open_client,
    pb,
    started_server,
    wait_until,
)

pytestmark = pytest.mark.slow

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
FAST = ("--heartbeat-interval", "0.2")


@pytest.fixture
def make_server(tmp_path: pathlib.Path) -> Iterator[Callable[..., ServerProcess]]:
    """Start servers the test may kill, stop and restart; all killed at the end."""
    started: list[ServerProcess] = []

    def make(*args: str) -> ServerProcess:
        process = ServerProcess(tmp_path / f"data{len(started)}", *FAST, *args)
        started.append(process)
        return process.start()

    try:
        yield make
    finally:
        for process in started:
            process.kill()


@pytest.fixture
def server(make_server: Callable[..., ServerProcess]) -> ServerProcess:
    return make_server("--grace-period", "1")


# -- dying workers -----------------------------------------------------------------------------

WORKER_SCRIPT = textwrap.dedent(
    """
    import sys
    import grpc
    from stackduck_trio._proto import stackduck_pb2 as pb, stackduck_pb2_grpc as pb_grpc

    channel = grpc.insecure_channel(sys.argv[1], options=[("grpc.enable_http_proxy", 0)])
    stub = pb_grpc.StackDuckServiceStub(channel)
    request = pb.ConsumeJobsRequest(worker_id="doomed", job_types=[sys.argv[2]])
    for message in stub.ConsumeJobs(request, timeout=60):
        if message.HasField("job"):
            print(message.job.id, flush=True)  # and never ack it
    """
)


def test_sigkilled_worker_process_has_its_job_redelivered_at_once(
    server: ServerProcess, tmp_path: pathlib.Path
) -> None:
    job_type = new_type()
    with open_client(server.address) as client:
        job_id = client.enqueue(job_type)
        with open(tmp_path / "worker.log", "wb") as stderr:
            worker = subprocess.Popen(
                [sys.executable, "-c", WORKER_SCRIPT, server.address, job_type],
                stdout=subprocess.PIPE,
                stderr=stderr,
                cwd=REPO_ROOT,
            )
        try:
            assert worker.stdout is not None
            readable, _, _ = select.select([worker.stdout], [], [], 20)
            assert readable, "the worker process received no job"
            assert worker.stdout.readline().decode().strip() == job_id
            held = client.get(job_id)
            assert (held.status, held.worker_id, held.attempt) == ("running", "doomed", 1)
            with client.stream([job_type], worker_id="survivor") as survivor:
                survivor.wait_attached()
                survivor.no_job_within(0.1)
                start = time.monotonic()
                worker.kill()  # SIGKILL: no goodbye, the kernel closes its socket
                arrival, _, message = survivor.next_job_timed(within=5)
                latency = arrival - start
                print(f"\nworker SIGKILL -> job redelivered: {latency * 1000:.1f} ms")
                assert latency < 1.0
                job = message.job
                assert (job.id, job.worker_id, job.attempt) == (job_id, "survivor", 2)
                assert job.lease_id != held.lease_id
                client.complete(job)
        finally:
            worker.kill()
            worker.wait(10)
            if worker.stdout is not None:
                worker.stdout.close()
        assert client.get(job_id).status == "completed"


# -- dying servers -----------------------------------------------------------------------------


def test_server_sigkill_and_restart_loses_no_acknowledged_job(server: ServerProcess) -> None:
    n = 500
    prefetch = 10
    job_type = new_type()
    with open_client(server.address) as producer:
        ids = [producer.enqueue(job_type, payload=json.dumps({"i": i})) for i in range(100)]
        for batch in range(4):
            response = producer.EnqueueJobs(
                pb.EnqueueJobsRequest(
                    jobs=[
                        pb.EnqueueJobRequest(job_type=job_type, payload=json.dumps({"b": batch}))
                        for _ in range(100)
                    ]
                )
            )
            assert all(r.code == 0 for r in response.results)
            ids += [r.job_id for r in response.results]
    assert len(set(ids)) == n

    deliveries: collections.Counter[str] = collections.Counter()
    acked_before: set[str] = set()
    halfway = threading.Event()
    errors: list[Exception] = []

    def work_until_the_server_dies() -> None:
        try:
            with open_client(server.address) as c, c.stream([job_type], prefetch=prefetch) as s:
                try:
                    while True:
                        job = s.poll_job(5.0)
                        if job is None:
                            assert s.ended, "no job for 5 s while the server was alive"
                            return
                        deliveries[job.id] += 1
                        try:
                            c.complete(job)
                        except grpc.RpcError:
                            return  # the server died under this ack: its outcome is unknown
                        acked_before.add(job.id)
                        if len(acked_before) >= 200:
                            halfway.set()
                finally:
                    # delivered to this worker (prefetched) but not looked at yet
                    for job in s.unread_jobs():
                        deliveries[job.id] += 1
        except Exception as exc:  # noqa: BLE001 - the main thread reports it
            errors.append(exc)
            halfway.set()

    thread = threading.Thread(target=work_until_the_server_dies)
    thread.start()
    assert halfway.wait(60), "the worker made no progress"
    server.kill()
    thread.join(30)
    assert not thread.is_alive() and not errors, errors
    delivered_before = set(deliveries)
    print(
        f"\nSIGKILL after {len(acked_before)} acked completions "
        f"({len(delivered_before - acked_before)} delivered but not acked)"
    )
    assert 200 <= len(acked_before) < n, "the server was not killed mid-way"

    server.start()  # same data dir, same port
    acked_after: set[str] = set()
    redelivered_acked: list[str] = []
    with open_client(server.address) as c, c.stream([job_type], prefetch=prefetch) as s:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            job = s.poll_job(0.3)
            if job is None:
                assert not s.ended, "the new worker's stream ended"
                stats = c.type_stats(job_type)
                assert stats is not None
                if stats.queued_p2 == stats.running == stats.scheduled == 0:
                    break
                continue
            deliveries[job.id] += 1
            if job.id in acked_before:
                redelivered_acked.append(job.id)
            c.complete(job)
            acked_after.add(job.id)
        else:
            raise AssertionError("the new worker did not finish within 60 s")
        statuses = collections.Counter(c.get(job_id).status for job_id in ids)
        stats = c.type_stats(job_type)
    duplicates = sum(1 for count in deliveries.values() if count > 1)
    print(
        f"after restart: {len(acked_after)} completed by the new worker; "
        f"{duplicates} of {n} jobs delivered twice"
    )
    assert statuses == {"completed": n}, statuses
    # A completion the server acknowledged survives kill -9: such a job never runs again.
    assert not redelivered_acked, f"{len(redelivered_acked)} acked jobs ran again"
    assert acked_before | acked_after == set(ids)
    assert not acked_before & acked_after
    # At-least-once costs at most the jobs that were in flight at the kill.
    assert duplicates <= prefetch
    assert all(count <= 2 for count in deliveries.values())
    assert stats is not None and stats.completed == len(acked_after)  # counters since start


def test_sigterm_waits_for_running_jobs_then_requeues_the_unacked(
    make_server: Callable[..., ServerProcess],
) -> None:
    grace = 2.0
    server = make_server("--grace-period", str(grace))
    job_type = new_type()
    with open_client(server.address) as client:
        acked_id = client.enqueue(job_type)
        dropped_id = client.enqueue(job_type)
        pulled_id = client.enqueue(job_type, priority=3)
        watch = client.health.Watch(health_pb2.HealthCheckRequest(), timeout=30)
        with client.stream([job_type], prefetch=2) as worker:
            held = {j.id: j for j in worker.jobs(2)}
            assert set(held) == {acked_id, dropped_id}
            # and one held through the unary pull, outside any stream
            pulled = client.DequeueJob(pb.DequeueJobRequest(queue_name=job_type)).job
            assert pulled.id == pulled_id
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
            assert server.proc is not None
            start = time.monotonic()
            server.proc.send_signal(signal.SIGTERM)
            wait_until(
                lambda: health_check(client) == health_pb2.HealthCheckResponse.NOT_SERVING,
                within=grace,
            )
            # the running job's ack is accepted
            client.complete(held[acked_id])
            acked_at = time.monotonic() - start
            # ...but nothing new gets in
            code, details = call_error(lambda: client.enqueue(job_type))
            assert code is grpc.StatusCode.UNAVAILABLE and "shutting down" in details
            code, _ = call_error(
                lambda: next(
                    client.stub.ConsumeJobs(pb.ConsumeJobsRequest(job_types=[job_type]), timeout=5)
                )
            )
            assert code is grpc.StatusCode.UNAVAILABLE
            # health watchers (load balancers) are told as well
            assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
            returncode = server.proc.wait(grace + 10)
            stopped = time.monotonic() - start
        watch.cancel()
    print(
        f"\nSIGTERM: ack accepted {acked_at:.3f} s in, exit {returncode} after {stopped:.3f} s "
        f"(grace {grace} s, two jobs never acked)"
    )
    assert returncode == 0
    assert acked_at < grace
    assert grace - 0.1 <= stopped < grace + 3.0  # waited for the unacked job, then stopped
    check_log_clean(server.log_path)

    server.start()
    with open_client(server.address) as client:
        assert client.get(acked_id).status == "completed"
        assert client.get(dropped_id).status == "queued"
        assert client.get(pulled_id).status == "queued"
        with client.stream([job_type]) as worker:
            for job_id in (dropped_id, pulled_id):
                again = worker.next_job()
                assert (again.id, again.attempt) == (job_id, 2)
                client.complete(again)
            worker.no_job_within(0.3)


def test_sigterm_exits_as_soon_as_running_jobs_are_acked(
    make_server: Callable[..., ServerProcess],
) -> None:
    grace = 10.0
    server = make_server("--grace-period", str(grace))
    job_type = new_type()
    with open_client(server.address) as client:
        job_id = client.enqueue(job_type)
        with client.stream([job_type]) as worker:
            job = worker.next_job()
            assert server.proc is not None
            start = time.monotonic()
            server.proc.send_signal(signal.SIGTERM)
            wait_until(
                lambda: health_check(client) == health_pb2.HealthCheckResponse.NOT_SERVING,
                within=5,
            )
            assert server.proc.poll() is None, "the server did not wait for the running job"
            client.complete(job)
            acked = time.monotonic()
            returncode = server.proc.wait(grace)
            after_ack = time.monotonic() - acked
    print(
        f"\nSIGTERM with a running job: exit {after_ack * 1000:.0f} ms after its ack "
        f"({time.monotonic() - start:.3f} s after SIGTERM)"
    )
    assert returncode == 0
    assert after_ack < 2.0
    check_log_clean(server.log_path)
    server.start()
    with open_client(server.address) as client:
        assert client.get(job_id).status == "completed"


def test_idle_server_stops_promptly_on_sigterm(make_server: Callable[..., ServerProcess]) -> None:
    server = make_server("--grace-period", "10")
    with open_client(server.address) as client:
        client.enqueue(new_type())  # state to flush
        with client.stream([new_type()]) as worker:  # an idle worker holds no job
            worker.wait_attached()
            start = time.monotonic()
            returncode = server.terminate(timeout=15)
            stopped = time.monotonic() - start
    print(f"\nidle server with an idle worker: SIGTERM -> exit {stopped * 1000:.0f} ms")
    assert returncode == 0
    assert stopped < 2.0
    check_log_clean(server.log_path)


def test_restart_keeps_scheduled_retried_and_dead_jobs(server: ServerProcess) -> None:
    job_type = new_type()
    with open_client(server.address) as client:
        later = client.enqueue(job_type, scheduled_at=str(int(time.time()) + 3600))
        retried = client.enqueue(job_type, delay=600)
        dead = client.enqueue(job_type, max_retries=0)
        for _ in range(2):
            job = client.DequeueJob(pb.DequeueJobRequest(queue_name=job_type)).job
            client.FailJob(
                pb.FailJobRequest(job_id=job.id, lease_id=job.lease_id, error_message="x")
            )
        before = {job_id: client.get(job_id) for job_id in (later, retried, dead)}
    assert [before[i].status for i in (later, retried, dead)] == [
        "scheduled",
        "scheduled",
        "failed",
    ]
    server.kill()
    server.start()
    with open_client(server.address) as client:
        for job_id, old in before.items():
            new = client.get(job_id)
            assert (new.status, new.scheduled_at, new.retry_count, new.error_message) == (
                old.status,
                old.scheduled_at,
                old.retry_count,
                old.error_message,
            )
        listed = client.ListDeadJobs(pb.ListDeadJobsRequest(job_type=job_type))
        assert [j.id for j in listed.jobs] == [dead]
        stats = client.type_stats(job_type)
        assert stats is not None and (stats.scheduled, stats.dead) == (2, 1)
        requeued = client.RequeueDeadJobs(pb.RequeueDeadJobsRequest(job_ids=[dead]))
        assert requeued.count == 1
        job = client.DequeueJob(pb.DequeueJobRequest(queue_name=job_type)).job
        assert (job.id, job.attempt) == (dead, 1)
        client.complete(job)


# -- leases set by the server ------------------------------------------------------------------


@pytest.fixture(scope="module")
def short_lease_address(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    data_dir = tmp_path_factory.mktemp("e2e-lease")
    with started_server(
        data_dir, *FAST, "--lease-seconds", "1", "--max-lost-leases", "2"
    ) as server:
        yield server.address


def test_server_lease_flag_expires_unacked_jobs(short_lease_address: str) -> None:
    with open_client(short_lease_address) as client:
        job_type = new_type()
        job_id = client.enqueue(job_type)
        claimed = client.DequeueJob(pb.DequeueJobRequest(queue_name=job_type)).job
        claimed_at = time.monotonic()
        assert abs(claimed.lease_expires_at_ms / 1000 - (time.time() + 1.0)) < 0.5
        with client.stream([job_type], lease_seconds=30) as worker:
            arrival, _, message = worker.next_job_timed(within=5)
            waited = arrival - claimed_at
            print(f"\n--lease-seconds 1: redelivered {waited:.3f} s after the claim")
            assert (message.job.id, message.job.attempt) == (job_id, 2)
            assert 0.9 <= waited < 2.5
            code, _ = call_error(lambda: client.complete(claimed))
            assert code is grpc.StatusCode.FAILED_PRECONDITION
            client.complete(message.job)
        assert client.get(job_id).status == "completed"


def test_job_that_keeps_losing_its_lease_is_dead_lettered(short_lease_address: str) -> None:
    # --max-lost-leases 2: the poison-pill guard (the original redelivered such jobs forever).
    with open_client(short_lease_address) as client:
        job_type = new_type()
        job_id = client.enqueue(job_type)
        first = client.DequeueJob(pb.DequeueJobRequest(queue_name=job_type)).job
        wait_until(lambda: client.get(job_id).status == "queued", within=3)
        second = client.DequeueJob(pb.DequeueJobRequest(queue_name=job_type)).job
        assert (second.id, second.attempt) == (first.id, 2)
        dead = wait_until(lambda: (j := client.get(job_id)).status == "failed" and j, within=3)
        assert "poison" in dead.error_message, dead.error_message
        listed = client.ListDeadJobs(pb.ListDeadJobsRequest(job_type=job_type))
        assert [j.id for j in listed.jobs] == [job_id]


# -- statistics --------------------------------------------------------------------------------


def test_get_stats_matches_the_workload(server: ServerProcess) -> None:
    job_type = new_type()
    with open_client(server.address) as client:
        a1 = client.enqueue(job_type, priority=1)
        a2 = client.enqueue(job_type, priority=1, max_retries=0)
        a3 = client.enqueue(job_type, priority=1)
        b = [client.enqueue(job_type) for _ in range(3)]
        client.enqueue(job_type, priority=3)
        client.enqueue(job_type, scheduled_at=str(int(time.time()) + 3600))

        def take() -> pb.GrpcJob:
            return client.DequeueJob(pb.DequeueJobRequest(queue_name=job_type)).job

        taken = [take() for _ in range(3)]
        assert [j.id for j in taken] == [a1, a2, a3]
        client.complete(taken[0])
        for job in taken[1:]:
            client.FailJob(pb.FailJobRequest(job_id=job.id, lease_id=job.lease_id))
        assert take().id == b[0]
        client.PauseJobType(pb.PauseJobTypeRequest(job_type=job_type))
        with client.stream([job_type]) as w1, client.stream([new_type()]) as w2:
            w1.wait_attached()
            w2.wait_attached()
            response = client.GetStats(pb.GetStatsRequest())
    (stats,) = [t for t in response.types if t.job_type == job_type]
    assert (stats.queued_p1, stats.queued_p2, stats.queued_p3) == (0, 2, 1)
    assert (stats.scheduled, stats.running, stats.dead) == (2, 1, 1)  # scheduled: +1 h and a3
    assert (stats.completed, stats.failed, stats.retried) == (1, 1, 1)
    assert (stats.paused, stats.workers) == (True, 1)
    assert (response.workers, response.running, response.dead) == (2, 1, 1)
    backends = {(b.name, b.kind, b.state) for b in response.backends}
    assert backends == {("record_store", "sqlite", "healthy"), ("queue_tier", "memory", "healthy")}
