"""End to end: the job lifecycle over real sockets, official grpcio client, real server process.

One ``stackduck-trio serve`` process (SQLite in a temporary data dir) serves the whole module;
each test uses job types of its own, so tests cannot see each other's jobs. Workers are
ConsumeJobs streams read by a background thread (``e2e_helpers.Stream``), so waits are
"the next message, with a deadline", never blind sleeps. Measured latencies are printed
(``pytest -s``).
"""

from __future__ import annotations

import datetime
import json
import math
import pathlib
import threading
import time
from collections.abc import Iterator

import grpc
import pytest

from stackduck_trio._proto import health_pb2

from .e2e_helpers import (
    CALL_TIMEOUT,
    Client,
    call_error,
    health_check,
    new_type,
    open_client,
    pb,
    started_server,
)

pytestmark = pytest.mark.slow

HEARTBEAT = 0.2
STATUSES = {"scheduled", "queued", "running", "completed", "failed", "cancelled"}


@pytest.fixture(scope="module")
def address(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    data_dir: pathlib.Path = tmp_path_factory.mktemp("e2e-jobs")
    with started_server(
        data_dir,
        "--heartbeat-interval",
        str(HEARTBEAT),
        "--lease-seconds",
        "30",
        "--grace-period",
        "1",
    ) as server:
        yield server.address


@pytest.fixture
def client(address: str) -> Iterator[Client]:
    with open_client(address) as c:
        yield c


def dequeue(client: Client, job_type: str, **fields: object) -> pb.GrpcJob:
    response = client.DequeueJob(pb.DequeueJobRequest(queue_name=job_type, **fields))
    assert response.success
    return response.job


def utc_text(wall: float, offset_minutes: int = 0) -> str:
    """RFC 3339 text for a wall time, in the given UTC offset ("Z" for 0)."""
    tz = datetime.timezone(datetime.timedelta(minutes=offset_minutes))
    text = datetime.datetime.fromtimestamp(wall, tz).isoformat()
    return text.replace("+00:00", "Z")


# -- defaults ----------------------------------------------------------------------------------


def test_omitted_fields_take_the_documented_defaults(client: Client) -> None:
    job_type = new_type()
    before = time.time()
    response = client.EnqueueJob(pb.EnqueueJobRequest(job_type=job_type))
    assert response.success and response.status == "queued"
    job = client.get(response.job_id)
    # The original read an omitted max_retries as 0 (proto3 zero); the documented default is 2.
    assert (job.priority, job.max_retries, job.delay, job.payload) == (2, 2, 30, "{}")
    assert job.status == "queued" and job.job_type == job_type
    assert (job.retry_count, job.attempt, job.error_message, job.lease_id) == (0, 0, "", "")
    assert math.floor(before) <= job.created_at <= time.time()
    assert job.scheduled_at == job.created_at  # due at once
    assert job.started_at == 0 and job.completed_at == 0
    # An explicitly empty payload means "{}" as well.
    assert client.get(client.enqueue(job_type, payload="")).payload == "{}"


def test_explicit_zero_is_honoured(client: Client) -> None:
    job_type = new_type()
    # max_retries=0: the first failure dead-letters the job.
    no_retries = client.enqueue(job_type, max_retries=0, priority=1)
    stored = client.get(no_retries)
    assert (stored.max_retries, stored.delay, stored.priority) == (0, 30, 1)
    claimed = dequeue(client, job_type)
    assert claimed.id == no_retries and claimed.status == "running"
    failed = client.FailJob(
        pb.FailJobRequest(job_id=claimed.id, lease_id=claimed.lease_id, error_message="boom")
    )
    assert failed.success and failed.status == "failed"
    dead = client.get(no_retries)
    assert (dead.status, dead.retry_count, dead.error_message) == ("failed", 0, "boom")

    # delay=0: a failed job with retries left is ready again at once.
    immediate = client.enqueue(job_type, delay=0)
    stored = client.get(immediate)
    assert (stored.delay, stored.max_retries) == (0, 2)
    claimed = dequeue(client, job_type)
    assert claimed.id == immediate
    failed = client.FailJob(pb.FailJobRequest(job_id=claimed.id, lease_id=claimed.lease_id))
    assert failed.status == "queued"
    requeued = client.get(immediate)
    assert requeued.status == "queued" and requeued.retry_count == 1
    assert requeued.scheduled_at == requeued.updated_at  # no backoff
    again = dequeue(client, job_type)  # no waiting
    assert (again.id, again.attempt, again.retry_count) == (immediate, 2, 1)
    client.complete(again)


# -- ordering ----------------------------------------------------------------------------------


def enqueue_mixed_priorities(client: Client, job_type: str, n: int) -> dict[int, list[str]]:
    """``n`` jobs, lowest priority first (the original delivered priority 3 first)."""
    expected: dict[int, list[str]] = {1: [], 2: [], 3: []}
    for i in range(n):
        priority = (3, 2, 1)[i % 3]
        job_id = client.enqueue(job_type, priority=priority, payload=json.dumps({"i": i}))
        expected[priority].append(job_id)
    return expected


def test_priority_then_fifo_through_consume_jobs(client: Client) -> None:
    job_type = new_type()
    expected = enqueue_mixed_priorities(client, job_type, 18)
    got = []
    with client.stream([job_type], prefetch=1) as worker:
        for _ in range(18):
            job = worker.next_job()
            assert job.status == "running"
            got.append((job.priority, job.id))
            client.complete(job)
        assert [job_id for _, job_id in got] == expected[1] + expected[2] + expected[3], got

        # Priority 1 runs at once (the original scored it ~33 minutes into the future).
        start = time.monotonic()
        urgent = client.enqueue(job_type, priority=1)
        arrival, _, message = worker.next_job_timed(within=5)
        latency = arrival - start
        print(f"\npriority-1 job enqueue -> delivery: {latency * 1000:.1f} ms")
        assert message.job.id == urgent and message.notification_type == "NewJob"
        assert latency < 1.0
        client.complete(message.job)


def test_priority_then_fifo_through_dequeue_job(client: Client) -> None:
    job_type = new_type()
    expected = enqueue_mixed_priorities(client, job_type, 18)
    got = []
    for _ in range(18):
        job = dequeue(client, job_type, worker_id="puller")
        assert job.worker_id == "puller" and job.lease_id and job.attempt == 1
        got.append(job.id)
        client.complete(job)
    assert got == expected[1] + expected[2] + expected[3]
    code, details = call_error(lambda: dequeue(client, job_type))
    assert code is grpc.StatusCode.NOT_FOUND and job_type in details


# -- delayed jobs ------------------------------------------------------------------------------


def check_delayed_delivery(
    client: Client, job_type: str, due: float, texts: list[str], label: str
) -> None:
    with client.stream([job_type], prefetch=len(texts)) as worker:
        worker.wait_attached()
        ids = []
        for text in texts:
            response = client.EnqueueJob(pb.EnqueueJobRequest(job_type=job_type, scheduled_at=text))
            assert response.status == "scheduled", text
            ids.append(response.job_id)
            stored = client.get(response.job_id)
            assert stored.status == "scheduled" and stored.scheduled_at == math.floor(due), text
        # Not available early through the unary pull either.
        code, _ = call_error(lambda: dequeue(client, job_type))
        assert code is grpc.StatusCode.NOT_FOUND
        arrivals = [worker.next_job_timed(within=due - time.time() + 5) for _ in texts]
    assert sorted(m.job.id for _, _, m in arrivals) == sorted(ids)
    walls = [wall for _, wall, _ in arrivals]
    early = due - min(walls)
    lateness = max(walls) - due
    print(
        f"\n{label}: {len(texts)} delayed jobs, first {-early * 1000:.1f} ms after due, last "
        f"{lateness * 1000:.1f} ms after due"
    )
    assert early <= 0.001, f"delivered {early:.3f} s before scheduled_at"
    # The original found due jobs with a 5-second poller, one job per tick.
    assert lateness < 1.0


def test_delayed_jobs_rfc3339_are_not_early_and_not_late(client: Client) -> None:
    due = time.time() + 1.5
    # the same instant in three offsets: RFC 3339 offsets must be honoured
    texts = [utc_text(due), utc_text(due, 120), utc_text(due, -330), utc_text(due), utc_text(due)]
    check_delayed_delivery(client, new_type(), due, texts, "RFC 3339")


def test_delayed_jobs_unix_seconds_are_not_early_and_not_late(client: Client) -> None:
    due = float(math.ceil(time.time()) + 1)
    check_delayed_delivery(client, new_type(), due, [str(int(due))] * 3, "Unix seconds")


def test_scheduled_at_in_the_past_is_due_at_once(client: Client) -> None:
    job_type = new_type()
    past = [utc_text(time.time() - 3600), str(int(time.time()) - 60)]
    with client.stream([job_type], prefetch=2) as worker:
        for text in past:
            response = client.EnqueueJob(pb.EnqueueJobRequest(job_type=job_type, scheduled_at=text))
            assert response.status == "queued", text
            job = worker.next_job(within=1.0)
            assert job.id == response.job_id
            # due "now", not in the past: FIFO is by the time a job became ready
            assert job.scheduled_at >= job.created_at
            client.complete(job)


# -- retries and the dead-letter queue ------------------------------------------------------------


def test_fail_and_retry_back_off_exponentially_then_dead_letter(client: Client) -> None:
    job_type = new_type()
    job_id = client.enqueue(job_type, delay=1, max_retries=2)
    with client.stream([job_type]) as worker:
        job = worker.next_job()
        message_kind = "NewJob"
        waits = []
        for retry_count, rpc in enumerate(("FailJob", "RetryJob")):
            assert (job.id, job.attempt, job.retry_count) == (job_id, retry_count + 1, retry_count)
            before = time.time()
            request_cls = pb.FailJobRequest if rpc == "FailJob" else pb.RetryJobRequest
            response = getattr(client, rpc)(
                request_cls(job_id=job.id, lease_id=job.lease_id, error_message=f"e{retry_count}")
            )
            assert response.success and response.status == "scheduled", rpc
            stored = client.get(job_id)
            backoff = 1 * 2**retry_count
            assert stored.status == "scheduled" and stored.retry_count == retry_count + 1
            assert stored.error_message == f"e{retry_count}" and stored.lease_id == ""
            # min(delay * 2 ** retry_count, 3600), retry_count before the increment
            assert stored.scheduled_at == stored.updated_at + backoff, (stored, backoff)
            _, wall, message = worker.next_job_timed(within=backoff + 5)
            waits.append(wall - before)
            assert wall - before >= backoff - 0.001, f"retry {wall - before:.3f} s < {backoff} s"
            assert wall - before < backoff + 1.0
            job = message.job
            message_kind = message.notification_type
            assert message_kind == "RetryJob"
        print(f"\nretry waits (delay=1): {', '.join(f'{w:.3f} s' for w in waits)}")
        # Third failure with max_retries=2: dead-lettered.
        assert (job.attempt, job.retry_count) == (3, 2)
        response = client.FailJob(
            pb.FailJobRequest(job_id=job.id, lease_id=job.lease_id, error_message="final")
        )
        assert response.status == "failed"
        worker.no_job_within(0.3)
    dead = client.get(job_id)
    assert (dead.status, dead.retry_count, dead.error_message) == ("failed", 2, "final")
    assert dead.completed_at > 0
    listed = client.ListDeadJobs(pb.ListDeadJobsRequest(job_type=job_type))
    assert [j.id for j in listed.jobs] == [job_id] and listed.next_page_token == ""


def test_dead_letters_list_requeue_purge(client: Client) -> None:
    job_type = new_type()
    ids = [client.enqueue(job_type, max_retries=0, payload=json.dumps({"n": n})) for n in range(3)]
    for expected in ids:
        job = dequeue(client, job_type)
        assert job.id == expected
        response = client.FailJob(
            pb.FailJobRequest(job_id=job.id, lease_id=job.lease_id, error_message="bad")
        )
        assert response.status == "failed"
    # Listed in the order they died, with pagination.
    page = client.ListDeadJobs(pb.ListDeadJobsRequest(job_type=job_type, limit=2))
    assert [j.id for j in page.jobs] == ids[:2] and page.next_page_token
    assert all(j.status == "failed" and j.error_message == "bad" for j in page.jobs)
    rest = client.ListDeadJobs(
        pb.ListDeadJobsRequest(job_type=job_type, limit=2, page_token=page.next_page_token)
    )
    assert [j.id for j in rest.jobs] == ids[2:] and rest.next_page_token == ""
    stats = client.type_stats(job_type)
    assert stats is not None and stats.dead == 3 and stats.failed == 3

    # Requeue: back in the queue with its attempts reset, and delivered again.
    requeued = client.RequeueDeadJobs(pb.RequeueDeadJobsRequest(job_ids=[ids[0]]))
    assert requeued.count == 1
    assert [(r.job_id, r.code, r.status) for r in requeued.results] == [(ids[0], 0, "queued")]
    stored = client.get(ids[0])
    assert (stored.status, stored.retry_count, stored.attempt) == ("queued", 0, 0)
    again = dequeue(client, job_type)
    assert (again.id, again.attempt) == (ids[0], 1)
    client.complete(again)

    # Purge: gone for good.
    purged = client.PurgeDeadJobs(pb.PurgeDeadJobsRequest(job_ids=[ids[1]]))
    assert purged.count == 1 and purged.results[0].code == 0
    code, _ = call_error(lambda: client.get(ids[1]))
    assert code is grpc.StatusCode.NOT_FOUND
    again = client.PurgeDeadJobs(pb.PurgeDeadJobsRequest(job_ids=[ids[1]]))
    assert again.count == 0 and again.results[0].code == grpc.StatusCode.NOT_FOUND.value[0]
    listed = client.ListDeadJobs(pb.ListDeadJobsRequest(job_type=job_type))
    assert [j.id for j in listed.jobs] == [ids[2]]

    # By type; a job that is not dead cannot be purged or requeued.
    by_type = client.RequeueDeadJobs(pb.RequeueDeadJobsRequest(job_type=job_type))
    assert by_type.count == 1 and client.get(ids[2]).status == "queued"
    not_dead = client.PurgeDeadJobs(pb.PurgeDeadJobsRequest(job_ids=[ids[2]]))
    assert not_dead.count == 0
    assert not_dead.results[0].code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
    assert client.get(ids[2]).status == "queued"
    client.complete(dequeue(client, job_type))
    assert not client.ListDeadJobs(pb.ListDeadJobsRequest(job_type=job_type)).jobs


def test_list_dead_jobs_pages_stay_receivable_with_large_payloads(client: Client) -> None:
    job_type = new_type()
    payload = json.dumps({"blob": "x" * 900_000})  # under the default 1 MiB payload limit
    ids = [client.enqueue(job_type, payload=payload, max_retries=0) for _ in range(5)]
    for _ in ids:
        job = dequeue(client, job_type)
        client.FailJob(pb.FailJobRequest(job_id=job.id, lease_id=job.lease_id))
    listed: list[str] = []
    token = ""
    for _ in range(10):
        page = client.ListDeadJobs(pb.ListDeadJobsRequest(job_type=job_type, page_token=token))
        listed += [j.id for j in page.jobs]
        token = page.next_page_token
        if not token:
            break
    assert listed == ids


# -- workers -----------------------------------------------------------------------------------


def test_competing_workers_never_receive_the_same_job(address: str, client: Client) -> None:
    job_type = new_type()
    response = client.EnqueueJobs(
        pb.EnqueueJobsRequest(
            jobs=[
                pb.EnqueueJobRequest(job_type=job_type, payload=json.dumps({"i": i}))
                for i in range(300)
            ]
        )
    )
    assert all(r.code == 0 for r in response.results)
    ids = {r.job_id for r in response.results}
    assert len(ids) == 300

    received: list[list[str]] = [[], []]
    errors: list[Exception] = []
    lock = threading.Lock()
    done = threading.Event()
    completed = 0

    def work(k: int) -> None:
        nonlocal completed
        try:
            with open_client(address) as c, c.stream([job_type], prefetch=4) as s:
                while not done.is_set():
                    job = s.poll_job(0.1)
                    if job is None:
                        assert not s.ended, "stream ended"
                        continue
                    received[k].append(job.id)
                    c.complete(job)
                    with lock:
                        completed += 1
                        if completed == 300:
                            done.set()
        except Exception as exc:  # noqa: BLE001 - the main thread reports it
            errors.append(exc)
            done.set()

    threads = [threading.Thread(target=work, args=(k,)) for k in range(2)]
    for thread in threads:
        thread.start()
    done.wait(60)
    for thread in threads:
        thread.join(15)
    assert not errors, errors
    first, second = set(received[0]), set(received[1])
    print(f"\ncompeting workers: {len(received[0])} + {len(received[1])} jobs")
    assert first | second == ids
    assert not first & second, f"{len(first & second)} jobs went to both workers"
    assert len(received[0]) + len(received[1]) == 300  # no job delivered twice at all
    assert received[0] and received[1], "one worker starved"
    stats = client.type_stats(job_type)
    assert stats is not None
    assert (stats.completed, stats.running, stats.queued_p2) == (300, 0, 0)


def test_prefetch_bounds_unacked_jobs(client: Client) -> None:
    job_type = new_type()
    ids = [client.enqueue(job_type, payload=json.dumps({"i": i})) for i in range(10)]
    with client.stream([job_type], prefetch=3) as worker:
        start = time.monotonic()
        held = worker.jobs(3, within=1.0)
        worker.no_job_within(max(0.5, start + 1.0 - time.monotonic()))
        assert [j.id for j in held] == ids[:3]
        stats = client.type_stats(job_type)
        assert stats is not None and (stats.running, stats.queued_p2) == (3, 7)
        client.complete(held[0])
        fourth = worker.next_job(within=1.0)
        assert fourth.id == ids[3]
        worker.no_job_within(0.5)
        stats = client.type_stats(job_type)
        assert stats is not None and (stats.running, stats.queued_p2) == (3, 6)


def test_default_prefetch_is_one(client: Client) -> None:
    job_type = new_type()
    ids = [client.enqueue(job_type) for _ in range(2)]
    with client.stream([job_type]) as worker:
        assert worker.next_job().id == ids[0]
        worker.no_job_within(0.5)
        stats = client.type_stats(job_type)
        assert stats is not None and (stats.running, stats.queued_p2) == (1, 1)


def test_jobs_of_a_disconnected_worker_keep_their_place_in_line(client: Client) -> None:
    job_type = new_type()
    ids = [client.enqueue(job_type) for _ in range(5)]
    first = client.stream([job_type], prefetch=3)
    try:
        assert [j.id for j in first.jobs(3)] == ids[:3]
    finally:
        first.cancel()
    with client.stream([job_type], prefetch=5) as second:
        got = second.jobs(5)
        # requeued jobs go back to their old place (front), not behind jobs 4 and 5
        assert [j.id for j in got] == ids
        assert [j.attempt for j in got] == [2, 2, 2, 1, 1]
        for job in got:
            client.complete(job)


def test_cancelled_worker_stream_requeues_its_job_at_once(client: Client) -> None:
    job_type = new_type()
    job_id = client.enqueue(job_type)
    first = client.stream([job_type], worker_id="a")
    try:
        held = first.next_job()
        assert (held.id, held.worker_id) == (job_id, "a")
        with client.stream([job_type], worker_id="b") as second:
            second.wait_attached()
            second.no_job_within(0.1)  # the job is held by "a"
            start = time.monotonic()
            first.cancel()
            arrival, _, message = second.next_job_timed(within=5)
            latency = arrival - start
            print(
                f"\ngrpcio call.cancel() -> job redelivered to another worker: "
                f"{latency * 1000:.1f} ms"
            )
            assert latency < 1.0
            again = message.job
            assert (again.id, again.worker_id, again.attempt) == (job_id, "b", 2)
            assert again.lease_id != held.lease_id and message.notification_type == "RetryJob"
            code, _ = call_error(lambda: client.complete(held))  # the old lease is fenced off
            assert code is grpc.StatusCode.FAILED_PRECONDITION
            client.complete(again)
        assert client.get(job_id).status == "completed"
    finally:
        first.cancel()


# -- leases ------------------------------------------------------------------------------------


def test_stream_lease_expiry_redelivers_and_fences_the_stale_ack(client: Client) -> None:
    job_type = new_type()
    job_id = client.enqueue(job_type)
    with client.stream([job_type], worker_id="slow", lease_seconds=1) as worker:
        first_arrival, _, message = worker.next_job_timed()
        first = message.job
        assert first.id == job_id and first.lease_expires_at_ms > 0
        second_arrival, _, message = worker.next_job_timed(within=5)
        second = message.job
        waited = second_arrival - first_arrival
        print(f"\nlease_seconds=1: redelivered after {waited:.3f} s")
        assert 0.95 <= waited < 2.0
        assert (second.id, second.attempt) == (job_id, 2) and second.lease_id != first.lease_id
        assert second.lease_expires_at_ms >= first.lease_expires_at_ms + 950
        code, details = call_error(lambda: client.complete(first))
        assert code is grpc.StatusCode.FAILED_PRECONDITION and "lease" in details
        code, _ = call_error(
            lambda: client.FailJob(pb.FailJobRequest(job_id=first.id, lease_id=first.lease_id))
        )
        assert code is grpc.StatusCode.FAILED_PRECONDITION
        assert client.get(job_id).status == "running"  # the stale acks changed nothing
        client.complete(second)
    stored = client.get(job_id)
    assert (stored.status, stored.attempt, stored.retry_count) == ("completed", 2, 0)


def test_dequeue_lease_expiry_redelivers_to_a_stream(client: Client) -> None:
    job_type = new_type()
    job_id = client.enqueue(job_type)
    claimed = dequeue(client, job_type, worker_id="hung", lease_seconds=1)
    claimed_at = time.monotonic()
    assert claimed.id == job_id
    with client.stream([job_type], worker_id="rescuer") as worker:
        arrival, _, message = worker.next_job_timed(within=5)
        waited = arrival - claimed_at
        print(f"\nDequeueJob lease_seconds=1: redelivered after {waited:.3f} s")
        assert 0.95 <= waited < 2.0
        rescued = message.job
        assert (rescued.id, rescued.worker_id, rescued.attempt) == (job_id, "rescuer", 2)
        code, _ = call_error(lambda: client.complete(claimed))
        assert code is grpc.StatusCode.FAILED_PRECONDITION
        client.complete(rescued)
    assert client.get(job_id).status == "completed"


def test_extend_lease_keeps_a_job_alive_past_its_lease(client: Client) -> None:
    job_type = new_type()
    job_id = client.enqueue(job_type)
    claimed = dequeue(client, job_type, lease_seconds=1)
    deadline = claimed.lease_expires_at_ms
    with client.stream([job_type], worker_id="thief") as thief:
        thief.wait_attached()
        until = time.monotonic() + 2.5  # 2.5x the original lease
        while time.monotonic() < until:
            response = client.ExtendLease(
                pb.ExtendLeaseRequest(job_id=job_id, lease_id=claimed.lease_id, lease_seconds=1)
            )
            assert response.lease_expires_at_ms >= deadline
            deadline = response.lease_expires_at_ms
            thief.no_job_within(0.3)
        assert deadline > claimed.lease_expires_at_ms + 2000
        stored = client.get(job_id)
        assert (stored.status, stored.lease_id, stored.attempt) == ("running", claimed.lease_id, 1)
        code, _ = call_error(
            lambda: client.ExtendLease(pb.ExtendLeaseRequest(job_id=job_id, lease_id="not-it"))
        )
        assert code is grpc.StatusCode.FAILED_PRECONDITION
        client.complete(claimed)
        thief.no_job_within(0.2)
    assert client.get(job_id).status == "completed"


def test_extend_lease_of_a_finished_job_is_failed_precondition(client: Client) -> None:
    job_type = new_type()
    job_id = client.enqueue(job_type)
    claimed = dequeue(client, job_type)
    client.complete(claimed)
    client.complete(claimed)  # a retried ack with the same lease: answered as the first
    code, _ = call_error(
        lambda: client.FailJob(pb.FailJobRequest(job_id=job_id, lease_id=claimed.lease_id))
    )
    assert code is grpc.StatusCode.FAILED_PRECONDITION  # the reference: another outcome
    code, details = call_error(
        lambda: client.ExtendLease(pb.ExtendLeaseRequest(job_id=job_id, lease_id=claimed.lease_id))
    )
    assert code is grpc.StatusCode.FAILED_PRECONDITION, (code, details)


# -- cancel ------------------------------------------------------------------------------------


def test_cancelled_queued_and_scheduled_jobs_are_never_delivered(client: Client) -> None:
    job_type = new_type()
    queued = client.enqueue(job_type)
    scheduled = client.enqueue(job_type, scheduled_at=utc_text(time.time() + 0.5))
    survivor = client.enqueue(job_type)
    for job_id, before in ((queued, "queued"), (scheduled, "scheduled")):
        assert client.get(job_id).status == before
        response = client.CancelJob(pb.CancelJobRequest(job_id=job_id))
        assert response.job.id == job_id and response.job.status == "cancelled"
        assert client.get(job_id).status == "cancelled"
    with client.stream([job_type], prefetch=5) as worker:
        assert worker.next_job().id == survivor
        worker.no_job_within(1.0)  # past the scheduled job's due time
    assert client.get(scheduled).status == "cancelled"


def test_cancelling_a_running_job_fences_its_worker(client: Client) -> None:
    job_type = new_type()
    running_id = client.enqueue(job_type)
    waiting_id = client.enqueue(job_type)
    with client.stream([job_type], prefetch=1) as worker:
        running = worker.next_job()
        assert running.id == running_id
        response = client.CancelJob(pb.CancelJobRequest(job_id=running_id))
        assert response.job.status == "cancelled"
        code, details = call_error(lambda: client.complete(running))
        assert code is grpc.StatusCode.FAILED_PRECONDITION and "cancelled" in details
        code, _ = call_error(
            lambda: client.FailJob(pb.FailJobRequest(job_id=running.id, lease_id=running.lease_id))
        )
        assert code is grpc.StatusCode.FAILED_PRECONDITION
        # The cancel freed the worker's slot: the next job arrives.
        nxt = worker.next_job(within=2)
        assert nxt.id == waiting_id
        client.complete(nxt)
    assert client.get(running_id).status == "cancelled"


def test_cancelling_a_finished_or_unknown_job_fails(client: Client) -> None:
    job_type = new_type()
    job_id = client.enqueue(job_type)
    client.complete(dequeue(client, job_type))
    code, details = call_error(lambda: client.CancelJob(pb.CancelJobRequest(job_id=job_id)))
    assert code is grpc.StatusCode.FAILED_PRECONDITION and "completed" in details
    assert client.get(job_id).status == "completed"
    code, _ = call_error(lambda: client.CancelJob(pb.CancelJobRequest(job_id="no-such-job")))
    assert code is grpc.StatusCode.NOT_FOUND


# -- pause / resume ----------------------------------------------------------------------------


def test_paused_type_is_not_delivered_until_resumed(client: Client) -> None:
    job_type = new_type()
    assert client.PauseJobType(pb.PauseJobTypeRequest(job_type=job_type)).paused
    with client.stream([job_type], prefetch=10) as worker:
        worker.wait_attached()
        ids = [client.enqueue(job_type) for _ in range(3)]
        worker.no_job_within(0.5)
        stats = client.type_stats(job_type)
        assert stats is not None
        assert (stats.paused, stats.queued_p2, stats.running, stats.workers) == (True, 3, 0, 1)
        code, _ = call_error(lambda: dequeue(client, job_type))
        assert code is grpc.StatusCode.NOT_FOUND
        start = time.monotonic()
        assert not client.ResumeJobType(pb.ResumeJobTypeRequest(job_type=job_type)).paused
        jobs = worker.jobs(3, within=1.0)
        print(f"\nresume -> 3 jobs delivered in {(time.monotonic() - start) * 1000:.1f} ms")
        assert [j.id for j in jobs] == ids
        stats = client.type_stats(job_type)
        assert stats is not None and (stats.paused, stats.running) == (False, 3)
        for job in jobs:
            client.complete(job)


# -- batches -----------------------------------------------------------------------------------


def test_enqueue_jobs_answers_per_item(client: Client) -> None:
    job_type = new_type()
    R = pb.EnqueueJobRequest
    items = [
        (R(job_type=job_type), 0),
        (R(job_type=job_type, priority=0), 3),
        (R(job_type=job_type, scheduled_at=utc_text(time.time() + 3600)), 0),
        (R(job_type=job_type, payload="{bad json"), 3),
        (R(job_type="bad type!"), 3),
        (R(job_type=job_type, payload=json.dumps({"x": "y" * (1024 * 1024)})), 8),
        (R(job_type=job_type, max_retries=101), 3),
        (R(job_type=job_type, priority=3, max_retries=0, delay=0), 0),
    ]
    response = client.EnqueueJobs(pb.EnqueueJobsRequest(jobs=[r for r, _ in items]))
    assert [r.code for r in response.results] == [code for _, code in items]
    for result in response.results:
        if result.code:
            assert result.job_id == "" and result.message
            assert "Traceback" not in result.message and "object at" not in result.message
        else:
            assert result.job_id and result.status in ("queued", "scheduled")
    assert [r.status for r in response.results if r.code == 0] == ["queued", "scheduled", "queued"]
    last = client.get(response.results[-1].job_id)
    assert (last.priority, last.max_retries, last.delay) == (3, 0, 0)
    stats = client.type_stats(job_type)
    assert stats is not None
    assert (stats.queued_p1, stats.queued_p2, stats.queued_p3, stats.scheduled) == (0, 1, 1, 1)


def test_ack_jobs_completes_and_fails_many(client: Client) -> None:
    job_type = new_type()
    ids = [client.enqueue(job_type) for _ in range(4)]
    ids += [client.enqueue(job_type, max_retries=0) for _ in range(2)]
    with client.stream([job_type], prefetch=6) as worker:
        jobs = {j.id: j for j in worker.jobs(6)}
        assert set(jobs) == set(ids)
        j = [jobs[i] for i in ids]
        A = pb.Ack
        acks = [
            A(job_id=j[0].id, lease_id=j[0].lease_id),
            A(job_id=j[1].id, lease_id=j[1].lease_id),
            A(job_id=j[2].id, lease_id=j[2].lease_id, failed=True, error_message="retry me"),
            A(job_id=j[4].id, lease_id=j[4].lease_id, failed=True, error_message="dead"),
            A(job_id=j[3].id, lease_id="not-the-lease"),
            A(job_id="no-such-job", lease_id="x"),
            A(job_id=j[5].id),  # no lease: the current one (original clients)
        ]
        response = client.AckJobs(pb.AckJobsRequest(acks=acks))
        codes = [r.code for r in response.results]
        assert codes == [0, 0, 0, 0, 9, 5, 0], response
        assert [r.status for r in response.results if r.code == 0] == [
            "completed",
            "completed",
            "scheduled",
            "failed",
            "completed",
        ]
        for result in response.results[4:6]:
            assert result.message and "Traceback" not in result.message
        assert client.get(j[0].id).status == "completed"
        retried = client.get(j[2].id)
        assert (retried.status, retried.retry_count, retried.error_message) == (
            "scheduled",
            1,
            "retry me",
        )
        assert client.get(j[4].id).status == "failed"
        assert client.get(j[3].id).status == "running"  # the bad ack changed nothing
        # the same ack twice (a client retrying a batch): the first answer again,
        # not applied twice (the counters below count it once)
        again = client.AckJobs(pb.AckJobsRequest(acks=[acks[0]]))
        assert (again.results[0].code, again.results[0].status) == (0, "completed"), again
        client.complete(j[3])
    stats = client.type_stats(job_type)
    assert stats is not None
    assert (stats.completed, stats.failed, stats.retried) == (4, 1, 1)
    assert (stats.running, stats.dead, stats.scheduled) == (0, 1, 1)


def test_duplicate_ack_in_one_batch_is_applied_once(client: Client) -> None:
    job_type = new_type()
    job_id = client.enqueue(job_type)
    job = dequeue(client, job_type)
    ack = pb.Ack(job_id=job_id, lease_id=job.lease_id)
    response = client.AckJobs(pb.AckJobsRequest(acks=[ack, ack]))
    assert [(r.code, r.status) for r in response.results] == [(0, "completed")] * 2, response
    assert client.get(job_id).status == "completed"
    failing = pb.Ack(job_id=job_id, lease_id=job.lease_id, failed=True, error_message="late")
    conflicting = client.AckJobs(pb.AckJobsRequest(acks=[failing]))
    assert conflicting.results[0].code == 9, conflicting  # another outcome: refused


def test_get_stats_shows_workers_of_an_idle_type(client: Client) -> None:
    job_type = new_type()
    with client.stream([job_type]) as worker:
        worker.wait_attached()
        stats = client.type_stats(job_type)
    assert stats is not None and stats.workers == 1


# -- heartbeats and health -------------------------------------------------------------------------


def test_idle_stream_receives_heartbeats(client: Client) -> None:
    client.GetStats(pb.GetStatsRequest())  # connection established: time only the stream
    start = time.monotonic()
    with client.stream([new_type()]) as worker:
        arrivals = []
        for _ in range(4):
            arrival, message = worker.next_message(within=2 * HEARTBEAT + 0.5)
            assert not message.HasField("job") and message.notification_type == "Heartbeat"
            arrivals.append(arrival)
    gaps = [b - a for a, b in zip([start, *arrivals], arrivals, strict=False)]
    print(f"\nheartbeat gaps (interval {HEARTBEAT} s): {', '.join(f'{g:.3f}' for g in gaps)}")
    assert all(g < 2 * HEARTBEAT for g in gaps), gaps


def test_standard_health_service(client: Client) -> None:
    serving = health_pb2.HealthCheckResponse.SERVING
    assert health_check(client) == serving
    assert health_check(client, "stackduck.StackDuckService") == serving
    code, _ = call_error(lambda: health_check(client, "no.such.Service"))
    assert code is grpc.StatusCode.NOT_FOUND
    watch = client.health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=CALL_TIMEOUT)
    try:
        assert next(watch).status == serving
    finally:
        watch.cancel()
    unknown = client.health.Watch(
        health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=CALL_TIMEOUT
    )
    try:
        assert next(unknown).status == health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
    finally:
        unknown.cancel()


def test_statuses_on_the_wire_are_lowercase(client: Client) -> None:
    job_type = new_type()
    job_id = client.enqueue(job_type)
    seen = {client.get(job_id).status}
    job = dequeue(client, job_type)
    seen.add(job.status)
    client.complete(job)
    seen.add(client.get(job_id).status)
    assert seen == {"queued", "running", "completed"} and seen <= STATUSES
