"""End to end with PostgreSQL as the record store (``DATABASE_URL``), and its faults.

* the shared test server (see test_backends.py), in a private schema: acknowledged jobs
  survive a SIGKILL of the Stackduck server and complete after its restart;
* a PRIVATE PostgreSQL instance (``initdb`` into a temporary directory, own port and socket
  directory; run as the ``postgres`` user when the tests run as root, since initdb refuses
  root) that the tests crash, restart and freeze: the pool recovers, a frozen server cannot
  hang a call, and a Stackduck server under load rides out the restart. The shared server is
  never stopped.

Measured numbers are printed (``pytest -s``).
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import pathlib
import pwd
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator

import grpc
import pytest

from stackduck_trio._postgres import PostgresBackend
from stackduck_trio._store import Batch, StorageUnavailable
from stackduck_trio.testing import ServerProcess

from .e2e_helpers import check_log_clean, new_type, open_client, pb, wait_until
from .test_backends import (
    SHARED_DATABASE_URL,
    admin_connection,
    free_port,
    make_job,
    private_schema,
)

pytestmark = pytest.mark.slow

FAST = ("--heartbeat-interval", "0.2")


def with_schema(url: str, schema: str) -> str:
    return f"{url}{'&' if '?' in url else '?'}schema={schema}"


def enqueue_batch(client: object, job_type: str, n: int, start: int = 0) -> list[str]:
    response = client.EnqueueJobs(  # type: ignore[attr-defined]
        pb.EnqueueJobsRequest(
            jobs=[
                pb.EnqueueJobRequest(job_type=job_type, payload=json.dumps({"i": i}))
                for i in range(start, start + n)
            ]
        )
    )
    assert [r.code for r in response.results] == [0] * n, response.results[:3]
    return [r.job_id for r in response.results]


@contextlib.contextmanager
def server_process(
    data_dir: pathlib.Path, *args: str, env: dict[str, str]
) -> Iterator[ServerProcess]:
    """A :class:`ServerProcess` that is killed at the end whatever happens."""
    server = ServerProcess(data_dir, *FAST, *args, env=env)
    try:
        yield server
    finally:
        server.kill()


def assert_alive(server: ServerProcess) -> None:
    assert server.proc is not None and server.proc.poll() is None, (
        f"server died:\n{server.log_path.read_text(errors='replace')[-4000:]}"
    )


# -- the shared server ------------------------------------------------------------------------


def test_acknowledged_jobs_survive_sigkill_and_complete_after_restart(
    tmp_path: pathlib.Path,
) -> None:
    with private_schema() as schema:
        env = {"DATABASE_URL": with_schema(SHARED_DATABASE_URL, schema)}
        with server_process(tmp_path / "data", env=env) as server:
            server.start()
            job_type = new_type("pg")
            with open_client(server.address) as client:
                ids = enqueue_batch(client, job_type, 300)
                with client.stream([job_type], prefetch=50) as stream:
                    delivered = stream.jobs(50, within=10)
                    for job in delivered[:40]:
                        client.complete(job)
                    # 10 jobs are running (leased) when the server dies
                    server.kill()
            completed = {job.id for job in delivered[:40]}

            server.start()  # same port, same schema
            with open_client(server.address) as client:
                statuses = {job_id: client.get(job_id).status for job_id in ids}
                assert {statuses[i] for i in completed} == {"completed"}
                # the running ones were requeued at start: nothing is left in limbo
                assert {s for i, s in statuses.items() if i not in completed} == {"queued"}
                with client.stream([job_type], prefetch=100) as stream:
                    for _ in range(len(ids) - len(completed)):
                        client.complete(stream.next_job(within=10))
                wait_until(lambda: all(client.get(i).status == "completed" for i in ids), within=10)
            assert server.terminate(timeout=20) == 0
            check_log_clean(server.log_path)
        with admin_connection() as admin:
            rows = admin.execute(
                f'SELECT status, count(*) FROM "{schema}".jobs GROUP BY status'
            ).fetchall()
        assert rows == [("completed", 300)]


# -- a private PostgreSQL instance ------------------------------------------------------------


def pg_tool(name: str) -> str:
    """An initdb/pg_ctl binary: on PATH, else the newest /usr/lib/postgresql/*/bin."""
    found = shutil.which(name)
    if found:
        return found
    for directory in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        candidate = os.path.join(directory, name)
        if os.access(candidate, os.X_OK):
            return candidate
    pytest.fail(f"{name} not found: the private-PostgreSQL tests need the server binaries")


class PrivatePostgres:
    """A throw-away PostgreSQL cluster on 127.0.0.1:<free port>, its socket in its own dir."""

    def __init__(self) -> None:
        # Not pytest's tmp_path: its parents are private to root, and the server runs as
        # the postgres user when we are root (initdb refuses to run as root).
        self.root = pathlib.Path(tempfile.mkdtemp(prefix="sdpg-"))
        self.data = self.root / "data"
        self.sock = self.root / "sock"
        self.sock.mkdir()
        self.log = self.root / "postgres.log"
        self.port = free_port()
        self.as_postgres = os.geteuid() == 0
        if self.as_postgres:
            try:
                user = pwd.getpwnam("postgres")
            except KeyError:
                shutil.rmtree(self.root, ignore_errors=True)
                pytest.fail("running as root: a 'postgres' user must exist (initdb refuses root)")
            for path in (self.root, self.sock):
                os.chown(path, user.pw_uid, user.pw_gid)

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *argv: str, timeout: float = 60.0) -> None:
        command = ["runuser", "-u", "postgres", "--", *argv] if self.as_postgres else list(argv)
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        if result.returncode != 0:
            log = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
            raise RuntimeError(
                f"{' '.join(argv)} exited with {result.returncode}:\n"
                f"{result.stdout}{result.stderr}\n{log}"
            )

    def init(self) -> None:
        self._run(
            pg_tool("initdb"),
            "-D",
            str(self.data),
            "-A",
            "trust",
            "-U",
            "postgres",
            "-E",
            "UTF8",
            "--no-sync",  # only speeds up initdb; the running server fsyncs as usual
        )

    def start(self) -> None:
        options = f"-p {self.port} -k {self.sock} -c listen_addresses=127.0.0.1"
        self._run(
            pg_tool("pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-w", "-t", "30",
            "-o", options, "start",
        )  # fmt: skip

    def stop(self, mode: str = "immediate") -> None:
        """``immediate`` is a crash: no checkpoint, WAL replay at the next start."""
        self._run(pg_tool("pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "-t", "30", "stop")

    def cleanup(self) -> None:
        with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
            self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture
def private_postgres() -> Iterator[PrivatePostgres]:
    pg = PrivatePostgres()
    try:
        pg.init()
        pg.start()
        yield pg
    finally:
        pg.cleanup()


def test_pool_recovers_after_a_crash_restart(private_postgres: PrivatePostgres) -> None:
    pg = private_postgres
    backend = PostgresBackend(pg.url, statement_timeout=2, connect_timeout=2)
    backend.open()
    try:
        backend.commit(Batch([make_job(n) for n in range(100)], ()))
        pg.stop()  # crash: every pooled connection breaks
        t0 = time.monotonic()
        with pytest.raises(StorageUnavailable) as failure:
            backend.commit(Batch([make_job(100)], ()))
        failed_in = time.monotonic() - t0
        assert failed_in < 5, failed_in
        pg.start()
        up = time.monotonic()
        attempts = 0
        while True:  # what the committer does: retry the same batch until it commits
            attempts += 1
            try:
                backend.commit(Batch([make_job(100)], ()))
                break
            except StorageUnavailable:
                assert time.monotonic() - up < 30, "no recovery within 30 s"
                time.sleep(0.05)
        recovered_in = time.monotonic() - up
        print(
            f"\nPostgreSQL crash: first failure in {failed_in:.2f} s ({failure.value}); "
            f"recovered {recovered_in:.2f} s after the server was back ({attempts} attempts)"
        )
        assert recovered_in < 10
        assert backend.counts() == {"queued": 101}
    finally:
        backend.close()


def test_a_frozen_server_cannot_hang_a_call(private_postgres: PrivatePostgres) -> None:
    """SIGSTOP the process running a statement: statement_timeout cannot fire; the watchdog does."""
    pg = private_postgres
    backend = PostgresBackend(pg.url, statement_timeout=1, connect_timeout=2)
    backend.open()
    outcome: list[BaseException | dict[str, int]] = []
    try:
        with admin_connection(pg.url) as admin, admin_connection(pg.url) as locker:
            locker.autocommit = False
            locker.execute("LOCK TABLE stackduck.jobs IN ACCESS EXCLUSIVE MODE")

            def count() -> None:
                try:
                    outcome.append(backend.counts())
                except StorageUnavailable as exc:
                    outcome.append(exc)

            t0 = time.monotonic()
            thread = threading.Thread(target=count)
            thread.start()
            pid = wait_until(
                lambda: admin.execute(
                    "SELECT pid FROM pg_stat_activity WHERE application_name = 'stackduck' "
                    "AND wait_event_type = 'Lock'"
                ).fetchone(),
                within=5,
            )[0]
            os.kill(pid, signal.SIGSTOP)
            try:
                thread.join(10)
                elapsed = time.monotonic() - t0
                assert not thread.is_alive(), "the call is still blocked after 10 s"
            finally:
                os.kill(pid, signal.SIGCONT)
                locker.rollback()
        assert len(outcome) == 1 and isinstance(outcome[0], StorageUnavailable), outcome
        assert "no answer within" in str(outcome[0])
        # statement_timeout 1 s + grace 0.5 s, cancel request, + 0.5 s: the socket is shut
        assert 1.5 < elapsed < 4.0, elapsed
        print(f"\nfrozen PostgreSQL: the call ended after {elapsed:.2f} s ({outcome[0]})")
        assert backend.counts() == {}  # a fresh connection serves the next call
    finally:
        backend.close()


class Load:
    """Producers (and optionally one slow worker) running against a server in threads."""

    def __init__(self, address: str, producers: int, worker: bool) -> None:
        self.address = address
        self.job_type = new_type("pgfault")
        self.acked: list[tuple[float, str]] = []  # (monotonic time, job id)
        self.errors: list[tuple[float, grpc.StatusCode]] = []
        self.completed: list[str] = []  # CompleteJob answered OK
        self.ack_errors: list[grpc.StatusCode] = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._produce) for _ in range(producers)]
        if worker:
            self.threads.append(threading.Thread(target=self._work))
        for thread in self.threads:
            thread.start()

    def _produce(self) -> None:
        with open_client(self.address) as client:
            while not self.stop.is_set():
                try:
                    job_id = client.enqueue(self.job_type, payload='{"x": 1}')
                except grpc.RpcError as exc:
                    self.errors.append((time.monotonic(), exc.code()))
                    time.sleep(0.05)
                else:
                    self.acked.append((time.monotonic(), job_id))

    def _work(self) -> None:
        # Slow on purpose: a backlog keeps deliveries (and so writes) going all along.
        with open_client(self.address) as client:
            while not self.stop.is_set():
                with client.stream([self.job_type], prefetch=5) as stream:
                    while not self.stop.is_set() and not stream.ended:
                        job = stream.poll_job(0.5)
                        if job is None:
                            continue
                        time.sleep(0.02)
                        try:
                            client.complete(job)
                        except grpc.RpcError as exc:
                            self.ack_errors.append(exc.code())
                        else:
                            self.completed.append(job.id)

    def acked_after(self, moment: float) -> int:
        return sum(1 for t, _ in list(self.acked) if t > moment)

    def first_ack_after(self, moment: float) -> float | None:
        return next((t for t, _ in list(self.acked) if t > moment), None)

    def finish(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(30)
        assert not any(thread.is_alive() for thread in self.threads), "a client thread hangs"


def restart_under_load(pg: PrivatePostgres, tmp_path: pathlib.Path, *, worker: bool) -> None:
    """Crash and restart PostgreSQL for 3 s while producers enqueue through the server.

    The write timeout (1.5 s) is shorter than the outage, and the outage is long enough
    for the record store's health to go DOWN: enqueues must be answered UNAVAILABLE (or
    succeed), the server must stay up, every acknowledged job and ack must be in the store
    afterwards, and enqueues must work again by themselves.
    """
    env = {"DATABASE_URL": pg.url}
    with server_process(tmp_path / "data", "--write-timeout", "1.5", env=env) as server:
        server.start()
        load = Load(server.address, producers=4, worker=worker)
        try:
            wait_until(lambda: len(load.acked) > 200, within=20)
            pg.stop()  # a crash
            down = time.monotonic()
            time.sleep(3.0)
            pg.start()
            up = time.monotonic()
            recovered = wait_until(lambda: load.first_ack_after(up), within=20)
            wait_until(lambda: load.acked_after(recovered) > 200, within=20)
        finally:
            load.finish()
        assert_alive(server)
        during = [code for t, code in load.errors if t >= down]
        # UNAVAILABLE: refused, nothing written. DEADLINE_EXCEEDED: accepted, not confirmed
        # within the write timeout (it may still commit). Nothing else, and no crash.
        allowed = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}
        assert {code for _, code in load.errors} <= allowed, load.errors[:5]
        assert during, "no enqueue failed during a 3 s outage with a 1.5 s write timeout"
        print(
            f"\nPostgreSQL restart under load ({'producers + worker' if worker else 'producers'}):"
            f" {len(load.acked)} enqueues acknowledged, {len(during)} failed from the outage"
            f" on ({during.count(grpc.StatusCode.UNAVAILABLE)} UNAVAILABLE, the rest"
            f" DEADLINE_EXCEEDED); first acknowledged enqueue {recovered - up:.2f} s after"
            f" PostgreSQL was back (outage {up - down:.1f} s); {len(load.completed)} acks"
            f" ({len(load.ack_errors)} refused)"
        )
        with open_client(server.address) as client:
            client.enqueue(load.job_type)  # new enqueues work
        assert server.terminate(timeout=20) == 0
        check_log_clean(server.log_path)

    # every acknowledged job is in the store, every acknowledged completion too
    ids = [job_id for _, job_id in load.acked]
    assert len(ids) == len(set(ids))
    with admin_connection(pg.url) as admin:
        stored = dict(
            admin.execute(
                "SELECT id, status FROM stackduck.jobs WHERE id = ANY(%s)", (ids,)
            ).fetchall()
        )
    missing = set(ids) - set(stored)
    assert not missing, f"{len(missing)} acknowledged jobs missing, e.g. {sorted(missing)[:3]}"
    assert {stored[i] for i in load.completed} <= {"completed"}


def test_server_rides_out_a_postgresql_restart_under_load(
    private_postgres: PrivatePostgres, tmp_path: pathlib.Path
) -> None:
    restart_under_load(private_postgres, tmp_path, worker=True)


def test_server_recovers_from_a_postgresql_restart_with_producers_only(
    private_postgres: PrivatePostgres, tmp_path: pathlib.Path
) -> None:
    """No worker writes anything after the outage: the writer's own probes must recover."""
    restart_under_load(private_postgres, tmp_path, worker=False)


# -- throughput: PostgreSQL vs SQLite ---------------------------------------------------------


def measure_enqueue(server: ServerProcess) -> tuple[float, float]:
    """(jobs/s with EnqueueJobs batches of 500, jobs/s with 8 threads of single EnqueueJob)."""
    job_type = new_type("bench")
    with open_client(server.address) as client:
        enqueue_batch(client, job_type, 500)  # warm up
        t0 = time.perf_counter()
        for k in range(20):
            enqueue_batch(client, job_type, 500, start=k * 500)
        batched = 10_000 / (time.perf_counter() - t0)

    def singles() -> None:
        with open_client(server.address) as client:
            for _ in range(250):
                client.enqueue(job_type, payload='{"x": 1}')

    threads = [threading.Thread(target=singles) for _ in range(8)]
    t0 = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    single = 2000 / (time.perf_counter() - t0)
    return batched, single


def test_enqueue_throughput_postgres_vs_sqlite(tmp_path: pathlib.Path) -> None:
    results: dict[str, tuple[float, float]] = {}
    with private_schema() as schema:
        env = {"DATABASE_URL": with_schema(SHARED_DATABASE_URL, schema)}
        with server_process(tmp_path / "pg", env=env) as server:
            results["postgres"] = measure_enqueue(server.start())
    with server_process(tmp_path / "sqlite", env={}) as server:
        results["sqlite"] = measure_enqueue(server.start())
    for kind, (batched, single) in results.items():
        print(
            f"\n{kind}: {batched:,.0f} jobs/s in EnqueueJobs batches of 500; "
            f"{single:,.0f} jobs/s as single EnqueueJob calls from 8 threads"
        )
    assert results["postgres"][0] > 1000 and results["postgres"][1] > 200
