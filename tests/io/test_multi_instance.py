"""Several server instances sharing one Redis queue tier and one PostgreSQL record store.

Every test runs a cluster of real ``stackduck-trio serve`` processes (:func:`open_cluster`)
with the same ``DATABASE_URL`` (a private schema on the shared PostgreSQL), ``REDIS_URL`` (a
PRIVATE ``redis-server`` the tests may kill: tests/io/private_servers.py) and
``STACKDUCK_REDIS_PREFIX``, and drives it exactly as users would: grpcio producers, grpcio
workers (:class:`GrpcWorker`: one ConsumeJobs stream, acks with the delivery's lease id) and
the product's own :class:`stackduck_trio.Worker`. Every delivery is recorded
(:class:`Execution`: job, lease, instance, when it arrived, ran and was acked, how the ack
was answered), and every run is checked by :func:`check_executions`:

* no lease id is handed out twice;
* no job is held under two live leases at once (a lease is live from its delivery until
  the worker's ack was answered or the lease expired, whichever is first);
* a job's completion is accepted at most once, and a job is never delivered again after
  its completion was accepted.

The record store (the schema, queried directly) is the truth for "completed".

1. work is shared: jobs enqueued on either instance are run by workers on both (under load,
   and deterministically: a type only the other instance has a worker for);
2. SIGKILL of one instance under load: its jobs are reaped by the survivor within about
   ``--lease-seconds``, and the dead instance's leases are void there (a late ack is
   refused);
3. SIGKILL of Redis under load, restarted EMPTY a second later: enqueues stay accepted,
   health stays SERVING, GetStats shows the outage, every acknowledged job completes, and
   a completion is still accepted at most once (jobs delivered twice across the failover
   -- at-least-once -- are reported, not forbidden);
4. delayed jobs enqueued on one instance are delivered by the other one on time.

Every wait is bounded. Measured numbers are printed (``pytest -s``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import pathlib
import statistics
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence

import grpc
import psycopg
import pytest
import trio

from stackduck_trio import JobInfo, Worker
from stackduck_trio._proto import health_pb2
from stackduck_trio.testing import ServerProcess

from .e2e_helpers import (
    Client,
    Stream,
    call_error,
    check_log_clean,
    health_check,
    new_type,
    open_client,
    pb,
    wait_until,
)
from .private_servers import PrivateRedis

# registers the `private_redis` fixture in this module
from .private_servers import private_redis_fixture as private_redis_fixture
from .test_backends import SHARED_DATABASE_URL, admin_connection, private_schema
from .test_postgres_server import assert_alive, server_process, with_schema

pytestmark = pytest.mark.slow

SERVING = health_pb2.HealthCheckResponse.SERVING
#: Short calls of the pollers: a hung server must not stall a sampling loop.
POLL_TIMEOUT = 2.0


# -- the cluster --------------------------------------------------------------------------------


@dataclasses.dataclass
class Cluster:
    """Server processes sharing a record store (``schema``) and a queue tier (``redis``)."""

    schema: str
    prefix: str
    redis: PrivateRedis
    servers: dict[str, ServerProcess]
    admin: psycopg.Connection[tuple[object, ...]]

    def address(self, name: str) -> str:
        return self.servers[name].address

    def statuses(self, ids: Sequence[str]) -> dict[str, str]:
        """``{job id: status}`` straight from the record store."""
        rows = self.admin.execute(
            f'SELECT id, status FROM "{self.schema}".jobs WHERE id = ANY(%s)', (list(ids),)
        ).fetchall()
        return {str(job_id): str(status) for job_id, status in rows}

    def count_completed(self, ids: Sequence[str]) -> int:
        query = f'SELECT count(*) FROM "{self.schema}".jobs WHERE id = ANY(%s) AND status = %s'
        row = self.admin.execute(query, (list(ids), "completed")).fetchone()
        assert row is not None
        return int(str(row[0]))

    def type_counts(self, job_type: str) -> dict[str, int]:
        query = f'SELECT status, count(*) FROM "{self.schema}".jobs WHERE job_type = %s GROUP BY 1'
        rows = self.admin.execute(query, (job_type,)).fetchall()
        return {str(status): int(str(n)) for status, n in rows}

    def wait_completed(
        self,
        ids: Sequence[str],
        within: float,
        explain: Callable[[list[str]], str] | None = None,
    ) -> float:
        """Wait until every job in ``ids`` is ``completed`` in the store; the monotonic time.

        ``explain(pending ids)`` adds to the failure message (e.g. the jobs' deliveries).
        """
        deadline = time.monotonic() + within
        while True:
            done = self.count_completed(ids)
            now = time.monotonic()
            if done == len(set(ids)):
                return now
            if now > deadline:
                statuses = self.statuses(ids)
                missing = [i for i in ids if i not in statuses]
                pending = Counter(s for s in statuses.values() if s != "completed")
                stuck = missing + [i for i, s in statuses.items() if s != "completed"]
                raise AssertionError(
                    f"{len(set(ids)) - done} of {len(set(ids))} acknowledged jobs not completed "
                    f"within {within:g} s: not in the store {len(missing)} "
                    f"(e.g. {missing[:3]}), others by status {dict(pending)}"
                    + (f"\n{explain(stuck)}" if explain is not None else "")
                )
            time.sleep(0.1)

    def redis_keys(self) -> list[str]:
        with self.redis.client() as client:
            return list(client.scan_iter(count=1000))

    def finish(self, *names: str) -> None:
        """The named servers are alive, stop gracefully (exit 0) and logged nothing bad."""
        for name in names:
            server = self.servers[name]
            assert_alive(server)
            assert server.terminate(timeout=20) == 0, server.log_path.read_text()[-4000:]
            check_log_clean(server.log_path)


@contextlib.contextmanager
def open_cluster(
    tmp_path: pathlib.Path, redis: PrivateRedis, *args: str, names: Sequence[str] = ("A", "B")
) -> Iterator[Cluster]:
    """Started servers ``names`` sharing a private schema and ``redis``; all killed at the end."""
    prefix = f"sdtest{uuid.uuid4().hex[:10]}"
    with private_schema() as schema, contextlib.ExitStack() as stack:
        env = {
            "DATABASE_URL": with_schema(SHARED_DATABASE_URL, schema),
            "REDIS_URL": redis.url,
            "STACKDUCK_REDIS_PREFIX": prefix,
        }
        servers = {
            name: stack.enter_context(server_process(tmp_path / name, *args, env=env))
            for name in names
        }
        t0 = time.monotonic()
        for server in servers.values():
            server.start(timeout=30)
        print(f"\ncluster of {len(servers)} started in {time.monotonic() - t0:.2f} s")
        admin = stack.enter_context(admin_connection())
        yield Cluster(schema, prefix, redis, servers, admin)


def backend_states(address: str) -> dict[str, tuple[str, str]]:
    """GetStats' ``backends``: ``{name: (kind, state)}``."""
    with open_client(address) as client:
        response = client.GetStats(pb.GetStatsRequest())
    return {b.name: (b.kind, b.state) for b in response.backends}


def check_cluster_healthy(cluster: Cluster) -> None:
    for name in cluster.servers:
        states = backend_states(cluster.address(name))
        assert states.get("queue_tier") == ("redis", "healthy"), (name, states)
        assert states.get("record_store") == ("postgres", "healthy"), (name, states)
        with open_client(cluster.address(name)) as client:
            assert health_check(client) == SERVING, name


# -- recording deliveries -----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Execution:
    """One delivery of a job to a worker, and what became of it (monotonic times)."""

    job_id: str
    lease_id: str
    attempt: int
    instance: str  # the server the worker was connected to
    worker: str
    delivered: float  # the job arrived at the worker
    start: float  # the handler started
    end: float  # the ack was answered (or, for stackduck_trio.Worker, the handler returned)
    lease_expires: float  # as granted at delivery (inf: the worker keeps it alive)
    ack: str | None  # "OK", the refusal's status code, or None: unknown (acked in batches)

    def describe(self, origin: float = 0.0) -> str:
        """One line; times in seconds after ``origin``."""
        return (
            f"  job {self.job_id} lease {self.lease_id} attempt {self.attempt} on "
            f"{self.instance} ({self.worker}): delivered {self.delivered - origin:+.3f} s, "
            f"acked {self.end - origin:+.3f} s -> {self.ack}, lease until "
            f"{self.lease_expires - origin:+.3f} s"
        )

    def live_until(self) -> float:
        """The lease is live until the worker is done with it or it expires."""
        return min(self.end, self.lease_expires)


class ExecutionLog:
    """Every execution of every worker in a test (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: list[Execution] = []

    def add(self, execution: Execution) -> None:
        with self._lock:
            self._items.append(execution)

    def snapshot(self) -> list[Execution]:
        with self._lock:
            return list(self._items)

    def by_job(self) -> dict[str, list[Execution]]:
        runs: dict[str, list[Execution]] = defaultdict(list)
        for execution in self.snapshot():
            runs[execution.job_id].append(execution)
        for executions in runs.values():
            executions.sort(key=lambda e: e.delivered)
        return runs

    def explainer(
        self,
        origin: float,
        label: str,
        enqueued: Callable[[], dict[str, tuple[str, float]]] | None = None,
    ) -> Callable[[list[str]], str]:
        """For :meth:`Cluster.wait_completed`: the deliveries of the jobs still pending.

        ``enqueued()``: ``{job id: (instance, monotonic time)}`` of the acknowledged enqueues.
        """

        def explain(ids: list[str]) -> str:
            runs = self.by_job()
            where = enqueued() if enqueued is not None else {}
            lines = []
            by_instance: dict[str, list[tuple[float, bool]]] = defaultdict(list)
            for job_id in ids:
                if job_id in where:
                    instance, t = where[job_id]
                    by_instance[instance].append((t - origin, job_id in runs))
            for instance, items in sorted(by_instance.items()):
                times = [t for t, _ in items]
                lines.append(
                    f"{len(items)} of them enqueued on {instance}, from {min(times):+.3f} s "
                    f"to {max(times):+.3f} s; {sum(1 for _, seen in items if not seen)} of "
                    "those never delivered"
                )
            lines.append(f"their deliveries (times relative to {label}):")
            for job_id in ids[:6]:
                note = ""
                if job_id in where:
                    note = (
                        f" [enqueued on {where[job_id][0]} at {where[job_id][1] - origin:+.3f} s]"
                    )
                lines.extend(e.describe(origin) + note for e in runs.get(job_id, []))
                if job_id not in runs:
                    lines.append(f"  job {job_id}: never delivered{note}")
            return "\n".join(lines)

        return explain


@dataclasses.dataclass
class ExecutionReport:
    executions: int
    jobs: int
    delivered_twice: int  # jobs delivered more than once
    overlaps: list[tuple[Execution, Execution]]  # two live leases at once
    accepted_twice: list[Execution]  # accepted completions of jobs completed twice
    after_completion: list[Execution]  # deliveries after the job's completion was accepted
    reused_leases: list[str]

    def assert_fenced(
        self, origin: float = 0.0, label: str = "", notes: dict[str, str] | None = None
    ) -> None:
        """Fail on reused leases or a completion accepted twice (duplicates allowed)."""
        where = f" (times relative to {label})" if label else ""
        assert not self.reused_leases, (
            f"lease ids missing or handed out twice: {self.reused_leases[:5]}"
        )
        assert not self.accepted_twice, (
            f"completion accepted more than once for "
            f"{len({e.job_id for e in self.accepted_twice})} jobs{where}, e.g.\n"
            + "\n".join(
                e.describe(origin) + f" [{(notes or {}).get(e.job_id, '')}]"
                for e in self.accepted_twice[:6]
            )
        )

    def assert_clean(
        self, origin: float = 0.0, label: str = "", notes: dict[str, str] | None = None
    ) -> None:
        """Fail on any violation; times in the message are seconds after ``origin`` (``label``).

        ``notes``: more about a job (e.g. when it was enqueued), shown with its deliveries.
        """

        def show(e: Execution) -> str:
            note = (notes or {}).get(e.job_id)
            return e.describe(origin) + (f" [{note}]" if note else "")

        where = f" (times relative to {label})" if label else ""
        assert not self.reused_leases, (
            f"lease ids missing or handed out twice: {self.reused_leases[:5]}"
        )
        assert not self.overlaps, (
            f"{len(self.overlaps)} jobs held under two live leases at once{where}, e.g.\n"
            + "\n".join(f"{show(a)}\n{show(b)}" for a, b in self.overlaps[:2])
        )
        assert not self.accepted_twice, (
            f"completion accepted more than once for "
            f"{len({e.job_id for e in self.accepted_twice})} jobs{where}, e.g.\n"
            + "\n".join(show(e) for e in self.accepted_twice[:6])
        )
        assert not self.after_completion, (
            f"{len(self.after_completion)} deliveries of jobs whose completion had already "
            f"been accepted{where}, e.g.\n" + "\n".join(show(e) for e in self.after_completion[:3])
        )


def check_executions(log: ExecutionLog) -> ExecutionReport:
    runs = log.by_job()
    executions = [e for es in runs.values() for e in es]
    lease_counts = Counter(e.lease_id for e in executions)
    overlaps = []
    accepted_twice = []
    after_completion = []
    for job_runs in runs.values():
        live_until = -1.0
        holder: Execution | None = None
        completed_at: float | None = None
        for execution in job_runs:  # in delivery order
            if holder is not None and execution.delivered < live_until:
                overlaps.append((holder, execution))
            if completed_at is not None and execution.delivered >= completed_at:
                after_completion.append(execution)
            if execution.live_until() > live_until:
                live_until, holder = execution.live_until(), execution
            if execution.ack == "OK" and completed_at is None:
                completed_at = execution.end
        accepted = [e for e in job_runs if e.ack == "OK"]
        if len(accepted) > 1:
            accepted_twice.extend(accepted)
    return ExecutionReport(
        executions=len(executions),
        jobs=len(runs),
        delivered_twice=sum(1 for es in runs.values() if len(es) > 1),
        overlaps=overlaps,
        accepted_twice=accepted_twice,
        after_completion=after_completion,
        reused_leases=[lease for lease, n in lease_counts.items() if n > 1 or not lease],
    )


# -- workers ------------------------------------------------------------------------------------


class GrpcWorker:
    """A grpcio worker in a thread: one ConsumeJobs stream, one CompleteJob per job.

    Each job "runs" for ``work`` seconds, then is completed with its lease id; the answer
    (OK or the refusal's code) is recorded with the execution. When an ack cannot reach the
    server (UNAVAILABLE) the stream is given up: its other buffered jobs are void. With
    ``reconnect`` a new stream is opened after a lost one (as a real worker would).
    """

    def __init__(
        self,
        log: ExecutionLog,
        instance: str,
        address: str,
        job_types: Sequence[str],
        *,
        name: str,
        prefetch: int = 8,
        work: float = 0.0,
        reconnect: bool = True,
    ) -> None:
        self.log = log
        self.instance = instance
        self.address = address
        self.job_types = list(job_types)
        self.name = name
        self.prefetch = prefetch
        self.work = work
        self.reconnect = reconnect
        self.attached = threading.Event()
        self.busy = False  # a job is in hand
        self.lost: list[tuple[float, str]] = []  # streams that ended: (monotonic, why)
        self.unexpected: list[BaseException] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> GrpcWorker:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(20)
        assert not self._thread.is_alive(), f"{self.name} does not stop"
        assert not self.unexpected, f"{self.name} crashed: {self.unexpected!r}"

    def _run(self) -> None:
        try:
            with open_client(self.address) as client:
                while not self._stop.is_set():
                    with client.stream(
                        self.job_types, worker_id=self.name, prefetch=self.prefetch
                    ) as stream:
                        why = self._consume(client, stream)
                    if why is not None:
                        self.lost.append((time.monotonic(), why))
                    if not self.reconnect:
                        return
                    self._stop.wait(0.1)
        except BaseException as exc:  # noqa: BLE001 - reported by stop()
            self.unexpected.append(exc)

    def _consume(self, client: Client, stream: Stream) -> str | None:
        """Run jobs until stopped (``None``) or the stream is lost (the reason)."""
        while not self._stop.is_set():
            try:
                arrived, wall, message = stream.next_job_timed(within=0.1)
            except AssertionError:  # nothing within 0.1 s, or the stream ended
                if stream.heartbeats:
                    self.attached.set()
                if stream.ended:
                    error = stream.error
                    return error.code().name if error is not None else "ended"
                continue
            self.attached.set()
            job = message.job
            self.busy = True
            try:
                start = time.monotonic()
                if self.work:
                    time.sleep(self.work)
                try:
                    client.CompleteJob(pb.CompleteJobRequest(job_id=job.id, lease_id=job.lease_id))
                    ack = "OK"
                except grpc.RpcError as exc:
                    ack = exc.code().name
                end = time.monotonic()
            finally:
                self.busy = False
            expires = arrived + (job.lease_expires_at_ms / 1000 - wall)
            self.log.add(
                Execution(
                    job.id, job.lease_id, job.attempt, self.instance, self.name,
                    arrived, start, end, expires, ack,
                )
            )  # fmt: skip
            if ack == "UNAVAILABLE":
                # The server is gone: the jobs still buffered on this stream are void too.
                now = time.monotonic()
                for void in stream.unread_jobs():
                    self.log.add(
                        Execution(
                            void.id, void.lease_id, void.attempt, self.instance, self.name,
                            now, now, now, now, "ABANDONED",
                        )
                    )  # fmt: skip
                return "ack UNAVAILABLE"
        return None


class TrioWorkers:
    """The product's worker (:class:`stackduck_trio.Worker`), several run by trio in a thread.

    Its acks go in batches, so an execution's ack is recorded as unknown (``None``); the
    workers' counters say how many were accepted.
    """

    def __init__(
        self,
        log: ExecutionLog,
        job_type: str,
        placements: Sequence[tuple[str, str]],
        *,
        concurrency: int = 8,
        work: float = 0.0,
    ) -> None:
        self.log = log
        self.work = work
        self.workers = [
            Worker(
                address,
                {job_type: self._handler(instance, f"trio-{instance}")},
                concurrency=concurrency,
                worker_id=f"trio-{instance}",
                grace_period=2.0,
                reconnect_max=0.5,
            )
            for instance, address in placements
        ]
        self.error: BaseException | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._main, name="trio-workers", daemon=True)

    def _handler(self, instance: str, worker: str) -> Callable[[JobInfo], object]:
        async def handler(job: JobInfo) -> None:
            start = time.monotonic()
            if self.work:
                await trio.sleep(self.work)
            end = time.monotonic()
            self.log.add(
                Execution(
                    job.id, job.lease_id or "", job.attempt, instance, worker,
                    start, start, end, float("inf"), None,
                )
            )  # fmt: skip

        return handler

    def start(self) -> TrioWorkers:
        self._thread.start()
        assert self._started.wait(10), "the trio workers did not start"
        return self

    def _main(self) -> None:
        async def main() -> None:
            self._token = trio.lowlevel.current_trio_token()
            async with trio.open_nursery() as nursery:
                for worker in self.workers:
                    await nursery.start(worker.run)
                with trio.fail_after(10):
                    for worker in self.workers:
                        await worker.wait_connected()
                self._started.set()

        try:
            trio.run(main)
        except BaseException as exc:  # noqa: BLE001 - reported by stop()
            self.error = exc
        finally:
            self._started.set()

    def stop(self) -> None:
        if self._token is not None and self._thread.is_alive():
            with contextlib.suppress(trio.RunFinishedError):
                trio.from_thread.run_sync(
                    lambda: [w.stop() for w in self.workers], trio_token=self._token
                )
        self._thread.join(20)
        assert not self._thread.is_alive(), "the trio workers do not stop"
        assert self.error is None, f"a stackduck_trio.Worker failed: {self.error!r}"

    def acks_accepted(self) -> int:
        return sum(w.statistics().acks_sent for w in self.workers)

    def acks_rejected(self) -> int:
        return sum(w.statistics().acks_rejected for w in self.workers)


# -- producers and samplers -----------------------------------------------------------------------


class Producer:
    """Enqueues continuously into one instance (a thread): ``batch`` jobs every ``pause`` s.

    Records every acknowledged job id (and when) and every refusal. ``stop_on_error``: stop
    at the first failure (the instance is gone).
    """

    def __init__(
        self,
        instance: str,
        address: str,
        job_type: str,
        *,
        batch: int = 1,
        pause: float = 0.01,
        stop_on_error: bool = False,
    ) -> None:
        self.instance = instance
        self.address = address
        self.job_type = job_type
        self.batch = batch
        self.pause = pause
        self.stop_on_error = stop_on_error
        self.acked: list[tuple[float, str]] = []
        self.errors: list[tuple[float, str]] = []
        self.latencies: list[tuple[float, float]] = []  # (monotonic start, seconds)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"producer-{instance}", daemon=True)

    def start(self) -> Producer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)
        assert not self._thread.is_alive(), f"producer on {self.instance} hangs"

    @property
    def ids(self) -> list[str]:
        return [job_id for _, job_id in self.acked]

    def _run(self) -> None:
        n = 0
        with open_client(self.address) as client:
            while not self._stop.is_set():
                requests = [
                    pb.EnqueueJobRequest(
                        job_type=self.job_type,
                        payload=json.dumps({"from": self.instance, "n": n + i}),
                    )
                    for i in range(self.batch)
                ]
                n += self.batch
                t0 = time.monotonic()
                try:
                    if self.batch == 1:
                        results = [client.EnqueueJob(requests[0])]
                        ok = [(r.job_id, "OK") for r in results]
                    else:
                        reply = client.EnqueueJobs(pb.EnqueueJobsRequest(jobs=requests))
                        ok = [
                            (r.job_id, "OK" if r.code == 0 else f"item code {r.code}")
                            for r in reply.results
                        ]
                except grpc.RpcError as exc:
                    ok = [("", exc.code().name)]
                t1 = time.monotonic()
                self.latencies.append((t0, t1 - t0))
                for job_id, outcome in ok:
                    if outcome == "OK":
                        self.acked.append((t1, job_id))
                    else:
                        self.errors.append((t1, outcome))
                if self.errors and self.stop_on_error:
                    return
                self._stop.wait(self.pause)


@dataclasses.dataclass(frozen=True)
class Sample:
    t: float
    instance: str
    queue_tier: str  # state, or "error: CODE"
    record_store: str
    health: str  # "SERVING", "NOT_SERVING", or "error: CODE"


class StatsPoller:
    """Samples GetStats' backend states and the health service of each instance (a thread)."""

    def __init__(self, addresses: dict[str, str], every: float = 0.05) -> None:
        self.addresses = addresses
        self.every = every
        self.samples: list[Sample] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stats-poller", daemon=True)

    def start(self) -> StatsPoller:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(20)
        assert not self._thread.is_alive(), "the stats poller hangs"

    def _run(self) -> None:
        with contextlib.ExitStack() as stack:
            clients = {
                name: stack.enter_context(open_client(address))
                for name, address in self.addresses.items()
            }
            while not self._stop.is_set():
                for name, client in clients.items():
                    t = time.monotonic()
                    try:
                        response = client.GetStats(pb.GetStatsRequest(), timeout=POLL_TIMEOUT)
                        states = {b.name: b.state for b in response.backends}
                        queue, store = (
                            states.get("queue_tier", "?"),
                            states.get("record_store", "?"),
                        )
                    except grpc.RpcError as exc:
                        queue = store = f"error: {exc.code().name}"
                    try:
                        status = health_check(client, timeout=POLL_TIMEOUT)
                        health = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
                    except grpc.RpcError as exc:
                        health = f"error: {exc.code().name}"
                    self.samples.append(Sample(t, name, queue, store, health))
                self._stop.wait(self.every)

    def of(self, instance: str) -> list[Sample]:
        return [s for s in list(self.samples) if s.instance == instance]

    def queue_tier_now(self, instance: str) -> str | None:
        samples = self.of(instance)
        return samples[-1].queue_tier if samples else None


@dataclasses.dataclass
class Load:
    """A steady load on instances A and B (see :func:`steady_load`)."""

    log: ExecutionLog
    producers: list[Producer]
    poller: StatsPoller


@contextlib.contextmanager
def steady_load(cluster: Cluster, job_type: str, *, started: int = 200) -> Iterator[Load]:
    """grpcio workers on A and B (prefetch 8, 2 ms jobs), a GetStats/health poller, and a
    producer enqueueing one job every 5 ms into each; yields once ``started`` jobs ran.
    Everything is stopped at the end (producers may be stopped earlier)."""
    log = ExecutionLog()
    workers = [
        GrpcWorker(log, name, cluster.address(name), [job_type], name=f"grpc-{name}",
                   prefetch=8, work=0.002).start()
        for name in ("A", "B")
    ]  # fmt: skip
    poller = StatsPoller({name: cluster.address(name) for name in ("A", "B")}).start()
    producers: list[Producer] = []
    try:
        for worker in workers:
            assert worker.attached.wait(10), f"{worker.name} not attached"
        producers = [
            Producer(name, cluster.address(name), job_type, batch=1, pause=0.005).start()
            for name in ("A", "B")
        ]
        wait_until(lambda: len(log.snapshot()) > started, within=15)
        yield Load(log, producers, poller)
    finally:
        for producer in producers:
            producer.stop()
        for worker in workers:
            worker.stop()
        poller.stop()


def enqueued_where(producers: Sequence[Producer]) -> dict[str, tuple[str, float]]:
    """``{job id: (instance, monotonic time)}`` of every acknowledged enqueue."""
    return {job_id: (p.instance, t) for p in producers for t, job_id in p.acked}


def enqueue_notes(producers: Sequence[Producer], origin: float) -> dict[str, str]:
    """``{job id: "enqueued on X at +t s"}`` (seconds after ``origin``)."""
    return {
        job_id: f"enqueued on {instance} at {t - origin:+.3f} s"
        for job_id, (instance, t) in enqueued_where(producers).items()
    }


def healthy_since(poller: StatsPoller, instance: str, since: float) -> bool:
    """The instance's queue tier was sampled healthy after ``since``, and still is."""
    samples = poller.of(instance)
    return bool(samples) and samples[-1].queue_tier == "healthy" and samples[-1].t > since


def transitions(values: Sequence[str]) -> list[str]:
    """``values`` without consecutive repeats."""
    return [v for i, v in enumerate(values) if i == 0 or v != values[i - 1]]


def enqueue_batches(
    client: Client, job_type: str, instance: str, count: int, size: int
) -> list[str]:
    ids: list[str] = []
    for start in range(0, count, size):
        reply = client.EnqueueJobs(
            pb.EnqueueJobsRequest(
                jobs=[
                    pb.EnqueueJobRequest(
                        job_type=job_type, payload=json.dumps({"from": instance, "i": i})
                    )
                    for i in range(start, min(count, start + size))
                ]
            )
        )
        assert [r.code for r in reply.results] == [0] * len(reply.results), reply.results[:3]
        ids.extend(r.job_id for r in reply.results)
    return ids


def percentiles(values: Sequence[float]) -> str:
    if not values:
        return "none"
    ordered = sorted(values)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]

    return (
        f"min {ordered[0] * 1000:.1f} / p50 {at(0.5) * 1000:.1f} / p90 {at(0.9) * 1000:.1f} / "
        f"p99 {at(0.99) * 1000:.1f} / max {ordered[-1] * 1000:.1f} ms"
    )


# -- the private Redis helper itself ---------------------------------------------------------------


def test_private_redis_helper_kills_and_restarts_empty_on_the_same_port(
    private_redis: PrivateRedis,
) -> None:
    redis = private_redis
    assert redis.port != 6379 and redis.url == f"redis://127.0.0.1:{redis.port}/0"
    with redis.client() as client:
        client.set("k", "v")
        assert client.get("k") == "v"
    port = redis.port
    t0 = time.monotonic()
    redis.kill()
    assert not redis.running and not redis.ping()
    killed = time.monotonic() - t0
    t0 = time.monotonic()
    redis.restart()
    restarted = time.monotonic() - t0
    assert redis.port == port and redis.running
    with redis.client() as client:
        assert client.dbsize() == 0  # empty: nothing was kept on disk
    redis.freeze()
    t0 = time.monotonic()
    assert not redis.ping(timeout=0.2)  # a hung server: no answer, bounded wait
    frozen = time.monotonic() - t0
    redis.thaw()
    assert redis.ping()
    print(
        f"\nprivate Redis on port {port}: SIGKILL {killed * 1000:.1f} ms, restart (PING) "
        f"{restarted * 1000:.1f} ms, PING to a frozen server gave up after {frozen:.2f} s"
    )
    assert frozen < 1.0


# -- 1. work is shared ------------------------------------------------------------------------------


def test_two_instances_share_the_work_and_complete_every_job_once(
    private_redis: PrivateRedis, tmp_path: pathlib.Path
) -> None:
    per_instance, batch = 1000, 100  # via EnqueueJobs on each instance, and between batches
    singles_per_batch = 3  # single EnqueueJob calls
    singles = per_instance // batch * singles_per_batch
    with open_cluster(tmp_path, private_redis, "--lease-seconds", "10") as cluster:
        check_cluster_healthy(cluster)
        job_type = new_type("shared")
        log = ExecutionLog()
        grpc_workers = [
            GrpcWorker(log, name, cluster.address(name), [job_type], name=f"grpc-{name}",
                       prefetch=16).start()
            for name in ("A", "B")
        ]  # fmt: skip
        trio_workers = TrioWorkers(
            log, job_type, [("A", cluster.address("A")), ("B", cluster.address("B"))]
        ).start()
        for worker in grpc_workers:
            assert worker.attached.wait(10), f"{worker.name} not attached"

        enqueued: dict[str, list[str]] = {}

        def produce(name: str) -> None:
            with open_client(cluster.address(name)) as client:
                ids = []
                for k in range(per_instance // batch):
                    ids.extend(enqueue_batches(client, job_type, name, batch, batch))
                    for m in range(singles_per_batch):  # single calls between the batches
                        payload = json.dumps({"single": k * singles_per_batch + m})
                        ids.append(client.enqueue(job_type, payload=payload))
                enqueued[name] = ids

        producers = [threading.Thread(target=produce, args=(name,)) for name in ("A", "B")]
        keys_seen: set[str] = set()
        try:
            t0 = time.monotonic()
            for thread in producers:
                thread.start()
            while any(thread.is_alive() for thread in producers):
                keys_seen.update(cluster.redis_keys())  # the tier holds jobs meanwhile
                time.sleep(0.1)
                assert time.monotonic() - t0 < 60, "enqueueing takes more than 60 s"
            enqueue_done = time.monotonic()
            assert set(enqueued) == {"A", "B"}, "a producer failed (see the thread's traceback)"
            all_ids = enqueued["A"] + enqueued["B"]
            assert len(all_ids) == len(set(all_ids)) == 2 * (per_instance + singles)
            done = cluster.wait_completed(
                all_ids, within=60, explain=log.explainer(t0, "the start")
            )
        finally:
            for worker in grpc_workers:
                worker.stop()
            trio_workers.stop()

        report = check_executions(log)
        runs = log.by_job()
        ran_on = {job_id: {e.instance for e in es} for job_id, es in runs.items()}
        matrix = {
            (src, dst): sum(1 for i in enqueued[src] if dst in ran_on.get(i, set()))
            for src in ("A", "B")
            for dst in ("A", "B")
        }
        by_worker = Counter(e.worker for e in log.snapshot())
        grpc_ok = sum(1 for e in log.snapshot() if e.ack == "OK")
        grpc_refused = Counter(e.ack for e in log.snapshot() if e.ack not in (None, "OK"))
        total = len(all_ids)
        print(
            f"two instances, {total} jobs ({per_instance} batched + {singles} single enqueues "
            f"on each): enqueued in {enqueue_done - t0:.2f} s "
            f"({total / (enqueue_done - t0):,.0f} jobs/s), all completed "
            f"{done - t0:.2f} s after the first enqueue ({total / (done - t0):,.0f} jobs/s end "
            f"to end)\n  enqueued on -> run on: A->A {matrix['A', 'A']}, A->B {matrix['A', 'B']}, "
            f"B->A {matrix['B', 'A']}, B->B {matrix['B', 'B']}; per worker {dict(by_worker)}"
            f"\n  delivered twice: {report.delivered_twice}; acks accepted: {grpc_ok} grpcio + "
            f"{trio_workers.acks_accepted()} stackduck_trio.Worker, refused: "
            f"{dict(grpc_refused)} + {trio_workers.acks_rejected()}; "
            f"{len(keys_seen)} Redis keys seen"
        )

        # every job completed exactly once, in the record store
        assert cluster.type_counts(job_type) == {"completed": total}
        assert set(runs) == set(all_ids)
        report.assert_clean()
        assert report.delivered_twice == 0
        assert {e.attempt for e in log.snapshot()} == {1}
        assert not grpc_refused and trio_workers.acks_rejected() == 0
        assert grpc_ok + trio_workers.acks_accepted() == total
        # the work is shared both ways
        assert matrix["A", "B"] > 0 and matrix["B", "A"] > 0, matrix
        # the cluster used the private Redis, under its prefix only
        assert keys_seen, "no key appeared in Redis while jobs were queued"
        assert all(key.startswith(cluster.prefix) for key in keys_seen), sorted(keys_seen)[:5]
        # fencing across instances: a made-up lease, or another outcome for a finished
        # delivery sent to the other instance, is refused and changes nothing
        finished = [e for e in log.snapshot() if e.ack == "OK"][:4]
        assert finished
        for e in finished:
            other = "B" if e.instance == "A" else "A"
            with open_client(cluster.address(other)) as client:
                for request in (
                    pb.CompleteJobRequest(job_id=e.job_id, lease_id=str(uuid.uuid4())),
                    pb.FailJobRequest(job_id=e.job_id, lease_id=e.lease_id, error_message="x"),
                ):
                    method = getattr(client, type(request).__name__.removesuffix("Request"))
                    code, _ = call_error(functools.partial(method, request))
                    assert code is grpc.StatusCode.FAILED_PRECONDITION, (code, request)
        assert cluster.type_counts(job_type) == {"completed": total}
        check_cluster_healthy(cluster)
        cluster.finish("A", "B")


def test_a_type_served_only_by_the_other_instance_is_delivered_there(
    private_redis: PrivateRedis, tmp_path: pathlib.Path
) -> None:
    """The deterministic form of "work is shared": a worker only on B gets A's jobs."""
    with open_cluster(tmp_path, private_redis) as cluster:
        to_b, to_a = new_type("toB"), new_type("toA")
        with (
            open_client(cluster.address("A")) as a,
            open_client(cluster.address("B")) as b,
            b.stream([to_b], prefetch=100) as on_b,
            a.stream([to_a], prefetch=100) as on_a,
        ):
            on_b.wait_attached()
            on_a.wait_attached()
            t0 = time.monotonic()
            ids_b = enqueue_batches(a, to_b, "A", 50, 25) + [a.enqueue(to_b) for _ in range(5)]
            ids_a = enqueue_batches(b, to_a, "B", 50, 25) + [b.enqueue(to_a) for _ in range(5)]
            got_b = on_b.jobs(len(ids_b), within=15)
            got_a = on_a.jobs(len(ids_a), within=15)
            elapsed = time.monotonic() - t0
            assert sorted(j.id for j in got_b) == sorted(ids_b)
            assert sorted(j.id for j in got_a) == sorted(ids_a)
            for job in got_b:
                b.complete(job)
            for job in got_a:
                a.complete(job)
            on_b.no_job_within(0.3)
            on_a.no_job_within(0.3)
            assert b.type_stats(to_b) is not None
        cluster.wait_completed(ids_a + ids_b, within=10)
        print(
            f"{len(ids_b)} jobs enqueued on A delivered on B, {len(ids_a)} the other way, "
            f"in {elapsed:.2f} s"
        )
        cluster.finish("A", "B")


# -- 2. SIGKILL of one instance -----------------------------------------------------------------------


def test_sigkill_of_one_instance_its_jobs_are_finished_by_the_other(
    private_redis: PrivateRedis, tmp_path: pathlib.Path
) -> None:
    lease = 2
    margin = 8.0
    with open_cluster(tmp_path, private_redis, "--lease-seconds", str(lease)) as cluster:
        job_type = new_type("kill")
        log = ExecutionLog()
        # A's workers are slow: each holds a few jobs at any time.
        a_workers = [
            GrpcWorker(log, "A", cluster.address("A"), [job_type], name=f"grpc-A{k}",
                       prefetch=4, work=0.1, reconnect=False).start()
            for k in range(2)
        ]  # fmt: skip
        b_workers = [
            GrpcWorker(log, "B", cluster.address("B"), [job_type], name=f"grpc-B{k}",
                       prefetch=8, work=0.002).start()
            for k in range(3)
        ]  # fmt: skip
        producers: list[Producer] = []
        try:
            for worker in a_workers + b_workers:
                assert worker.attached.wait(10), f"{worker.name} not attached"
            producers = [
                Producer("A", cluster.address("A"), job_type, batch=4, pause=0.025,
                         stop_on_error=True).start(),
                Producer("B", cluster.address("B"), job_type, batch=4, pause=0.025).start(),
            ]  # fmt: skip
            # steady state: both instances' workers have run jobs
            wait_until(
                lambda: (
                    {e.instance for e in log.snapshot()} == {"A", "B"} and len(log.snapshot()) > 100
                ),
                within=15,
            )
            wait_until(lambda: all(w.busy for w in a_workers), within=5, every=0.001)
            killed = time.monotonic()
            cluster.servers["A"].kill()
            time.sleep(1.0)  # B's producer goes on for a while
            for producer in producers:
                producer.stop()
            # A's workers lost their connection
            wait_until(lambda: all(w.lost for w in a_workers), within=5)
            acked = producers[0].ids + producers[1].ids
            assert len(acked) == len(set(acked))
            done = cluster.wait_completed(
                acked,
                within=lease + margin - (time.monotonic() - killed),
                explain=log.explainer(
                    killed, "the SIGKILL of A", lambda: enqueued_where(producers)
                ),
            )
        finally:
            for producer in producers:
                producer.stop()
            for worker in a_workers + b_workers:
                worker.stop()

        report = check_executions(log)
        runs = log.by_job()
        # A's jobs at the kill: delivered on A, not acknowledged there
        held = {e.job_id for e in log.snapshot() if e.instance == "A" and e.ack != "OK"}
        reaped_after = []
        not_redelivered = []  # the ack reached A and was committed, its answer was lost
        for job_id in held:
            later = [e for e in runs[job_id] if e.instance == "B" and e.delivered > killed]
            if later:
                reaped_after.append(min(e.delivered for e in later) - killed)
            else:
                not_redelivered.append(job_id)
        finished_by = {
            job_id: {e.instance for e in es if e.ack == "OK"} for job_id, es in runs.items()
        }
        # (An ack answered just before the SIGKILL is recorded by the worker's thread a
        # moment later: 0.1 s of slack for that race, far below anything a live A
        # could do after its death.)
        completed_on_a_after_kill = [
            e
            for e in log.snapshot()
            if e.instance == "A" and e.ack == "OK" and e.end > killed + 0.1
        ]
        lost = [why for w in a_workers for _, why in w.lost]
        statuses = cluster.statuses(acked)
        rows = cluster.type_counts(job_type)
        print(
            f"SIGKILL of A (lease {lease} s): {len(acked)} enqueues acknowledged "
            f"(A {len(producers[0].acked)}, B {len(producers[1].acked)}; A's producer failed "
            f"with {[why for _, why in producers[0].errors]}); A's workers held "
            f"{len(held)} jobs and lost their streams ({lost}); {len(reaped_after)} held jobs "
            f"delivered again on B "
            f"{percentiles(reaped_after)} after the kill; everything completed "
            f"{done - killed:.2f} s after the kill ({len(not_redelivered)} held jobs not "
            f"delivered again: their ack had reached A)\n  delivered twice: {report.delivered_twice}"
            f" jobs; rows of the type by status: {rows} (includes enqueues committed "
            f"whose answer was lost with A)"
        )
        assert held, "A's workers held no job when A was killed: the test proved nothing"
        assert set(statuses.values()) == {"completed"} and len(statuses) == len(acked)
        assert done - killed <= lease + margin
        assert not completed_on_a_after_kill
        # the jobs A held were finished by B (or their last ack to A was committed)
        report.assert_clean(killed, "the SIGKILL of A")
        assert all(finished_by[job_id] <= {"B"} for job_id in held)
        assert all(statuses.get(job_id) == "completed" for job_id in not_redelivered)
        assert len(not_redelivered) <= len(a_workers), not_redelivered
        assert not producers[1].errors, producers[1].errors[:5]
        # the dead instance's leases are void on the survivor: their late acks are refused
        stale = [
            e
            for e in log.snapshot()
            if e.instance == "A" and e.ack != "OK" and finished_by.get(e.job_id) == {"B"}
        ]
        assert stale
        with open_client(cluster.address("B")) as b:
            for e in stale:
                request = pb.CompleteJobRequest(job_id=e.job_id, lease_id=e.lease_id)
                code, _ = call_error(functools.partial(b.CompleteJob, request))
                assert code is grpc.StatusCode.FAILED_PRECONDITION, (code, e)
        assert set(cluster.statuses([e.job_id for e in stale]).values()) == {"completed"}
        check_log_clean(cluster.servers["A"].log_path)
        cluster.finish("B")


def test_a_stale_ack_from_the_dead_instance_is_refused_by_the_survivor(
    private_redis: PrivateRedis, tmp_path: pathlib.Path
) -> None:
    """Fencing across a failover: the job runs again on B; A's delivery cannot finish it."""
    lease = 2
    with open_cluster(tmp_path, private_redis, "--lease-seconds", str(lease)) as cluster:
        job_type = new_type("fence")
        with (
            open_client(cluster.address("A")) as a,
            open_client(cluster.address("B")) as b,
        ):
            job_id = b.enqueue(job_type)
            with a.stream([job_type], prefetch=1) as on_a:
                first = on_a.next_job(within=10)
                assert first.id == job_id and first.attempt == 1
                wait_until(lambda: b.get(job_id).status == "running", within=5)  # on record
                with b.stream([job_type], prefetch=1) as on_b:
                    on_b.wait_attached()
                    on_b.no_job_within(0.3)  # A's claim holds it while A lives
                    killed = time.monotonic()
                    cluster.servers["A"].kill()
                    arrived, _, message = on_b.next_job_timed(within=lease + 8)
                    second = message.job
                    assert second.id == job_id and second.lease_id != first.lease_id
                    assert second.attempt == 2, second
                    for request in (
                        pb.CompleteJobRequest(job_id=job_id, lease_id=first.lease_id),
                        pb.FailJobRequest(job_id=job_id, lease_id=first.lease_id),
                        pb.ExtendLeaseRequest(job_id=job_id, lease_id=first.lease_id),
                    ):
                        method = getattr(b, type(request).__name__.removesuffix("Request"))
                        code, _ = call_error(functools.partial(method, request))
                        assert code is grpc.StatusCode.FAILED_PRECONDITION, (code, request)
                    assert b.get(job_id).status == "running"
                    b.complete(second)  # B's lease was not disturbed
                    assert b.get(job_id).status == "completed"
                    on_b.no_job_within(0.5)
        assert cluster.statuses([job_id]) == {job_id: "completed"}
        print(
            f"A killed while its worker held a job: delivered again on B "
            f"{arrived - killed:.2f} s later (lease {lease} s); A's late acks refused there"
        )
        assert arrived - killed <= lease + 3
        cluster.finish("B")


# -- 3. SIGKILL of Redis ------------------------------------------------------------------------------


def test_redis_sigkill_and_empty_restart_under_load_loses_no_job(
    private_redis: PrivateRedis, tmp_path: pathlib.Path
) -> None:
    outage = 1.0
    with open_cluster(tmp_path, private_redis, "--lease-seconds", "5") as cluster:
        check_cluster_healthy(cluster)
        job_type = new_type("redisdown")
        with steady_load(cluster, job_type) as load:
            log, producers, poller = load.log, load.producers, load.poller
            down = time.monotonic()
            private_redis.kill()
            time.sleep(outage)
            private_redis.restart()
            up = time.monotonic()
            # the queue tier comes back by itself, on both instances
            for name in ("A", "B"):
                wait_until(functools.partial(healthy_since, poller, name, up), within=20)
            healthy_again = time.monotonic()
            after = len(log.snapshot())
            wait_until(lambda: len(log.snapshot()) > after + 100, within=15)  # work goes on
            for producer in producers:
                producer.stop()
            acked = [job_id for p in producers for job_id in p.ids]
            done = cluster.wait_completed(
                acked,
                within=20,
                explain=log.explainer(
                    down,
                    f"the SIGKILL of Redis, back at {up - down:+.3f} s",
                    lambda: enqueued_where(producers),
                ),
            )

        report = check_executions(log)
        errors = [(p.instance, why) for p in producers for _, why in p.errors]
        during = sum(1 for p in producers for t, _ in p.acked if down <= t <= up)
        slowest = max(
            (seconds for p in producers for t, seconds in p.latencies if down - 1 <= t <= up + 1),
            default=0.0,
        )
        visible = {}
        for name in ("A", "B"):
            samples = poller.of(name)
            bad = [s.t for s in samples if s.queue_tier != "healthy" and s.t >= down - 0.1]
            states = transitions([s.queue_tier for s in samples if s.t >= down - 0.1])
            visible[name] = (
                bad[-1] - bad[0] if bad else 0.0,
                bad[0] - down if bad else None,
                states,
            )
        health = Counter((s.instance, s.health) for s in poller.samples)
        print(
            f"Redis SIGKILLed under load for {up - down:.2f} s, restarted empty: "
            f"{len(acked)} enqueues acknowledged ({during} during the outage, slowest enqueue "
            f"around it {slowest * 1000:.0f} ms), refused {len(errors)}; queue tier healthy "
            f"again on both {healthy_again - up:.2f} s after Redis was back; all completed "
            f"{done - up:.2f} s after Redis was back"
            + "".join(
                f"\n  {name}: outage visible in GetStats for {v[0]:.2f} s "
                f"(first seen {'never' if v[1] is None else f'{v[1]:.2f} s after the kill'}), "
                f"states {' -> '.join(v[2])}"
                for name, v in visible.items()
            )
            + f"\n  delivered twice: {report.delivered_twice} jobs; "
            f"acks refused: {dict(Counter(e.ack for e in log.snapshot() if e.ack != 'OK'))}; "
            f"health answers {dict(health)}"
        )
        assert not errors, f"enqueues refused while the record store was up: {errors[:5]}"
        assert done - up < 25
        assert during > 0, "no enqueue was acknowledged while Redis was down"
        assert set(cluster.statuses(acked).values()) == {"completed"}
        assert {h for (_, h) in health} == {"SERVING"}, health
        assert any(v[1] is not None for v in visible.values()), (
            "GetStats never showed the queue tier unhealthy while Redis was dead under load"
        )
        # At-least-once across a failover: while an instance still claims from the
        # record store and another already from the reconciled Redis, a job can be
        # delivered twice (reported above, as the issue asks). Fencing must hold
        # regardless: a completion is accepted at most once, the stale copy's
        # writes are refused by the record store's compare-and-set.
        print(
            f"  during the failover: {len(report.overlaps)} jobs held under two leases at "
            f"once, {len(report.after_completion)} deliveries of already completed jobs"
        )
        report.assert_fenced(
            down,
            f"the SIGKILL of Redis, back at {up - down:+.3f} s",
            enqueue_notes(producers, down),
        )
        check_cluster_healthy(cluster)
        cluster.finish("A", "B")


# -- 4. delayed jobs across instances -------------------------------------------------------------------


def test_delayed_jobs_enqueued_on_one_instance_are_delivered_on_time_by_the_other(
    private_redis: PrivateRedis, tmp_path: pathlib.Path
) -> None:
    delay = 0.3
    rounds, per_round = 10, 4
    with open_cluster(tmp_path, private_redis) as cluster:
        job_type = new_type("delayed")
        due: dict[str, float] = {}
        with (
            open_client(cluster.address("A")) as a,
            open_client(cluster.address("B")) as b,
            b.stream([job_type], prefetch=100) as on_b,
        ):
            on_b.wait_attached()
            for _ in range(rounds):
                at = time.time() + delay
                for _ in range(per_round):
                    reply = a.EnqueueJob(
                        pb.EnqueueJobRequest(job_type=job_type, scheduled_at=f"{at:.6f}")
                    )
                    assert reply.status == "scheduled", reply
                    due[reply.job_id] = at
                time.sleep(0.07)
            lateness = []
            for _ in range(len(due)):
                _, wall, message = on_b.next_job_timed(within=10)
                lateness.append(wall - due[message.job.id])
                b.complete(message.job)
            on_b.no_job_within(0.3)
        cluster.wait_completed(list(due), within=10)
        print(
            f"{len(due)} jobs delayed {delay} s enqueued on A, delivered on B: lateness "
            f"{percentiles(lateness)}, mean {statistics.mean(lateness) * 1000:.1f} ms"
        )
        assert min(lateness) >= -0.1, f"delivered {-min(lateness):.3f} s early"
        assert max(lateness) <= 0.1, f"delivered {max(lateness):.3f} s late"
        cluster.finish("A", "B")
