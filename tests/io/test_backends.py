"""One conformance suite for the record-store backends: memory, SQLite and PostgreSQL.

Every ``test_*`` taking the ``backend`` fixture runs against the three backends with the
same assertions; where a backend documents a different behaviour (the memory store keeps
nothing across a reopen, and ignores ``close``) the test asserts that documented behaviour
instead of skipping. PostgreSQL-only behaviour (migrations, URL parameters, timeouts) is at
the end.

PostgreSQL is the shared server named by ``STACKDUCK_TEST_DATABASE_URL`` (default
``postgresql://postgres@127.0.0.1:5432/test``). Each test works in a schema of its own
(``stackduck_test_<random>``), dropped at the end. An unreachable server makes the
PostgreSQL cases FAIL, never skip: CI must not pass without them.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import attrs
import psycopg
import pytest
import trio

from stackduck_core import Job, Status
from stackduck_core._failover import BackendHealth, BackendRole
from stackduck_trio._clock import WallClock
from stackduck_trio._config import ConfigError
from stackduck_trio._postgres import SCHEMA_VERSION, PostgresBackend
from stackduck_trio._store import (
    Backend,
    Batch,
    GroupCommitter,
    MemoryBackend,
    SqliteBackend,
    StorageUnavailable,
    job_to_row,
)

SHARED_DATABASE_URL = os.environ.get(
    "STACKDUCK_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test"
)
NOW = 1_800_000_000.0


# -- PostgreSQL plumbing (also used by test_postgres_server.py) ------------------------------


def admin_connection(url: str = SHARED_DATABASE_URL) -> psycopg.Connection[tuple[object, ...]]:
    """An autocommit connection to the test server, or a clear failure (never a skip)."""
    try:
        return psycopg.connect(url, autocommit=True, connect_timeout=5)
    except psycopg.Error as exc:
        pytest.fail(
            f"PostgreSQL is unreachable at {url} ({' '.join(str(exc).split())}). The PostgreSQL "
            "tests need it: start it, or point STACKDUCK_TEST_DATABASE_URL at one.",
            pytrace=False,
        )


def new_schema_name() -> str:
    return f"stackduck_test_{uuid.uuid4().hex[:12]}"


@contextlib.contextmanager
def private_schema(url: str = SHARED_DATABASE_URL) -> Iterator[str]:
    """A fresh schema name on the server; the schema is dropped at the end, whatever happens."""
    admin = admin_connection(url)
    name = new_schema_name()
    try:
        yield name
    finally:
        with admin:
            admin.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- fixtures ---------------------------------------------------------------------------------


def make_job(n: int, **fields: object) -> Job:
    base: dict[str, object] = {
        "id": f"job-{n}",
        "job_type": "t",
        "payload": f'{{"n": {n}}}',
        "status": Status.QUEUED,
        "priority": 2,
        "max_retries": 2,
        "delay": 30,
        "scheduled_at": NOW,
        "created_at": NOW,
        "updated_at": NOW,
        "seq": n,
    }
    base.update(fields)
    return Job(**base)  # type: ignore[arg-type]


@pytest.fixture
def pg_schema() -> Iterator[str]:
    with private_schema() as name:
        yield name


@pytest.fixture(params=["memory", "sqlite", "postgres"])
def backend(request: pytest.FixtureRequest, tmp_path: object) -> Iterator[Backend]:
    kind = request.param
    opened: Backend
    if kind == "memory":
        opened = MemoryBackend()
    elif kind == "sqlite":
        opened = SqliteBackend(tmp_path / "stackduck.db")  # type: ignore[operator]
    else:
        opened = PostgresBackend(SHARED_DATABASE_URL, schema=request.getfixturevalue("pg_schema"))
    opened.open()
    try:
        yield opened
    finally:
        opened.close()


@pytest.fixture
def reopen() -> Iterator[Callable[[Backend], Backend]]:
    """Close a backend and open a new one on the same storage (closed at teardown)."""
    reopened: list[Backend] = []

    def do(old: Backend) -> Backend:
        old.close()
        new: Backend
        if isinstance(old, SqliteBackend):
            new = SqliteBackend(old.path)
        elif isinstance(old, PostgresBackend):
            new = PostgresBackend(old.url, schema=old.schema)
        else:
            new = MemoryBackend()  # same "storage": none
        new.open()
        reopened.append(new)
        return new

    yield do
    for opened in reopened:
        opened.close()


# -- the conformance suite --------------------------------------------------------------------

# Text the stores must return byte for byte: multi-byte UTF-8, emoji outside the BMP (UTF-16
# surrogate pairs elsewhere), combining marks, right-to-left text, line separators and every
# control character except NUL (PostgreSQL's text cannot hold NUL; see the test further down).
UNICODE_TEXT = (
    "caf\u00e9 \u65e5\u672c\u8a9e \U0001f986\U0001f600\U0001f468\u200d\U0001f469\u200d\U0001f467"
    " e\u0301 \u05e9\u05dc\u05d5\u05dd \u2028\u2029 \ufeff \U0010ffff "
    + "".join(chr(c) for c in range(1, 32))
    + "\x7f\x80\x9f \\ ' \" %s $1 ?"
)


def test_round_trip_of_every_field(backend: Backend) -> None:
    full = Job(
        id="job-full",
        job_type="emails.send:v2",
        payload='{"text": "' + UNICODE_TEXT + '"}',  # stores keep text, they do not parse it
        status=Status.RUNNING,
        priority=1,
        max_retries=100,
        delay=3600,
        scheduled_at=NOW + 0.1 + 0.2,  # not exactly representable: must not drift
        created_at=1_700_000_000.123456789,
        updated_at=5e-324,  # the smallest subnormal double
        retry_count=7,
        error_message=UNICODE_TEXT,
        started_at=1.7976931348623157e308,  # the largest double
        completed_at=-0.5,
        seq=2**62,
        attempt=2**31 - 1,
        lost_leases=4,
        lease_id=str(uuid.uuid4()),
        lease_expires_at=NOW + 60.000001,
        worker_id="w\u00f6rker-\U0001f986",
        version=2**40,
        idempotency_key="order-42 ~!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}" + "k" * 160,
    )
    sparse = make_job(1)  # every optional field None, every default
    big = make_job(2, payload='{"p": "' + "\u00e9\U0001f986x" * (1024 * 1024 // 7) + '"}')
    assert len(big.payload.encode()) >= 1024 * 1024 - 16
    backend.commit(Batch([full, sparse, big], ()))
    for job in (full, sparse, big):
        stored = backend.get(job.id)
        assert stored == job
        assert stored is not None and stored.payload.encode() == job.payload.encode()
    assert backend.get("no-such-job") is None
    assert {job.id: job for job in backend.load_active()} == {j.id: j for j in (full, sparse, big)}


def test_find_key(backend: Backend, reopen: Callable[[Backend], Backend]) -> None:
    keyed = make_job(1, idempotency_key="order-1")
    done = make_job(2, idempotency_key="order-2", status=Status.COMPLETED)
    backend.commit(Batch([keyed, done, make_job(3)], ()))
    assert backend.find_key("order-1") == keyed
    assert backend.find_key("order-2") == done  # any status
    assert backend.find_key("order-3") is None
    assert backend.find_key("ORDER-1") is None  # keys are case-sensitive
    # two rows with one key (never written by the broker): the oldest answers
    later = make_job(4, idempotency_key="order-1", created_at=NOW + 1)
    backend.commit(Batch([later], ()))
    assert backend.find_key("order-1") == keyed
    backend.commit(Batch([], ["job-1"]))  # purged: the key is free again
    assert backend.find_key("order-1") == later
    again = reopen(backend)
    if isinstance(again, MemoryBackend):
        assert again.find_key("order-2") is None
    else:
        assert again.find_key("order-2") == done


def test_version_guard_keeps_the_newest_record(backend: Backend) -> None:
    v1 = make_job(1)
    v2 = attrs.evolve(v1, status=Status.RUNNING, attempt=1, version=2)
    v3 = attrs.evolve(v2, status=Status.COMPLETED, version=3)
    backend.commit(Batch([v2], ()))
    backend.commit(Batch([v1], ()))  # a late retry of an older write
    assert backend.get(v1.id) == v2
    # the same version again, different content: not applied either (strictly newer only)
    backend.commit(Batch([attrs.evolve(v2, error_message="other")], ()))
    assert backend.get(v1.id) == v2
    backend.commit(Batch([v3], ()))
    assert backend.get(v1.id) == v3
    # several versions of one job in one batch, in any order: the newest wins
    w1 = make_job(2)
    w2 = attrs.evolve(w1, version=2, status=Status.RUNNING)
    w3 = attrs.evolve(w1, version=3, status=Status.CANCELLED)
    backend.commit(Batch([w2, w3, w1], ()))
    assert backend.get(w1.id) == w3


def test_deletes(backend: Backend) -> None:
    jobs = [make_job(n) for n in range(5)]
    backend.commit(Batch(jobs, ()))
    backend.commit(Batch([], ["job-1", "job-3", "job-missing"]))  # a missing id is no error
    assert {j.id for j in backend.load_active()} == {"job-0", "job-2", "job-4"}
    assert backend.get("job-1") is None
    # upserts and deletes in one batch: the delete applies after the upsert
    backend.commit(Batch([attrs.evolve(jobs[0], version=2), make_job(9)], ["job-0", "job-4"]))
    assert {j.id for j in backend.load_active()} == {"job-2", "job-9"}
    backend.commit(Batch([], []))  # an empty batch is a no-op
    assert backend.counts() == {"queued": 2}


def test_load_active_returns_exactly_the_active_rows_in_queue_order(backend: Backend) -> None:
    statuses = list(Status)
    jobs = [
        make_job(n, status=status, seq=100 - n, created_at=NOW + n)
        for n, status in enumerate(statuses)
    ]
    # two rows with the same seq: created_at breaks the tie
    jobs.append(make_job(50, status=Status.QUEUED, seq=100 - 1, created_at=NOW - 1))
    backend.commit(Batch(jobs, ()))
    active = backend.load_active()
    assert {j.status for j in active} == {
        Status.SCHEDULED,
        Status.QUEUED,
        Status.RUNNING,
        Status.FAILED,
    }
    assert [(j.seq, j.created_at) for j in active] == sorted((j.seq, j.created_at) for j in active)
    assert sorted(j.id for j in active) == sorted(
        j.id for j in jobs if j.status not in (Status.COMPLETED, Status.CANCELLED)
    )


def test_counts(backend: Backend) -> None:
    assert backend.counts() == {}
    jobs = [make_job(n, status=list(Status)[n % 6]) for n in range(60)]
    backend.commit(Batch(jobs, ()))
    assert backend.counts() == {status.value: 10 for status in Status}


def test_big_batches(backend: Backend) -> None:
    """10k rows in one commit (PostgreSQL's COPY path), then 10k newer, then 10k older."""
    n = 10_000
    jobs = [make_job(i, payload=f'{{"i": {i}, "pad": "{"x" * 100}"}}') for i in range(n)]
    t0 = time.perf_counter()
    backend.commit(Batch(jobs, ()))
    first = time.perf_counter() - t0
    assert backend.counts() == {"queued": n}
    running = [attrs.evolve(j, status=Status.RUNNING, attempt=1, version=2) for j in jobs]
    t0 = time.perf_counter()
    backend.commit(Batch(running, [f"job-{i}" for i in range(0, n, 10)]))
    second = time.perf_counter() - t0
    # older versions of rows still there: all ignored (a deleted row has no version left to
    # compare with; the single writer never replays a write after a later delete)
    backend.commit(Batch([j for j in jobs[: n // 2] if j.seq % 10], ()))
    assert backend.counts() == {"running": n - n // 10}
    assert backend.get("job-11") == running[11]
    print(
        f"\n{type(backend).__name__}: {n} inserts {n / first:,.0f} rows/s; "
        f"{n} updates + {n // 10} deletes {n * 1.1 / second:,.0f} rows/s"
    )


def test_reopen(backend: Backend, reopen: Callable[[Backend], Backend]) -> None:
    jobs = [make_job(n) for n in range(3)]
    backend.commit(Batch(jobs, ()))
    again = reopen(backend)
    if isinstance(again, MemoryBackend):
        # documented: the memory store keeps nothing beyond its object
        assert again.get("job-1") is None and again.counts() == {}
    else:
        assert again.get("job-1") == jobs[1]
        assert again.load_active() == jobs


def test_errors_become_storage_unavailable(backend: Backend) -> None:
    if isinstance(backend, MemoryBackend):
        # The memory store ignores close (nothing to release); its failures are injected.
        backend.fail_next = 1
        with pytest.raises(StorageUnavailable):
            backend.commit(Batch([make_job(1)], ()))
        backend.commit(Batch([make_job(1)], ()))  # the next one works
        return
    backend.close()
    with pytest.raises(StorageUnavailable, match="not open"):
        backend.commit(Batch([make_job(1)], ()))
    for call in (
        backend.load_active,
        backend.counts,
        lambda: backend.get("job-1"),
        lambda: backend.set_paused("t", True),
        lambda: backend.set_paused("t", False),
        backend.load_paused,
    ):
        with pytest.raises(StorageUnavailable, match="not open"):
            call()


def test_paused_types_round_trip(backend: Backend, reopen: Callable[[Backend], Backend]) -> None:
    assert backend.load_paused() == []
    backend.set_paused("img", True)
    backend.set_paused("img", True)  # idempotent
    backend.set_paused("a.b:c-1", True)
    assert backend.load_paused() == ["a.b:c-1", "img"]
    backend.set_paused("img", False)
    backend.set_paused("img", False)  # idempotent
    backend.set_paused("never-paused", False)  # resuming an unpaused type is fine
    assert backend.load_paused() == ["a.b:c-1"]
    backend.set_paused("img", True)
    backend.commit(Batch([make_job(1, job_type="img")], ()))  # pauses and jobs are independent
    again = reopen(backend)
    if isinstance(again, MemoryBackend):
        assert again.load_paused() == []  # documented: nothing survives the object
    else:
        assert again.load_paused() == ["a.b:c-1", "img"]
        assert again.get("job-1") == make_job(1, job_type="img")


async def test_group_committer_batches_concurrent_writes(backend: Backend) -> None:
    """Through the real writer: threads for SQLite and PostgreSQL, inline for memory."""
    clock = WallClock()
    health = BackendHealth(backend.kind, BackendRole.RECORD_STORE)
    committer = GroupCommitter(backend, health, now=clock.now, clock_deadline=clock.trio_deadline)
    n = 300
    async with trio.open_nursery() as nursery:
        await nursery.start(committer.run)

        async def write(i: int) -> None:
            await committer.write([make_job(i)]).wait()

        with trio.fail_after(30):
            async with trio.open_nursery() as writers:
                for i in range(n):
                    writers.start_soon(write, i)
        committer.close()
        await committer.wait_closed()
    stats = committer.statistics()
    assert stats.rows == n and stats.failures == 0
    assert stats.batches < n  # concurrent writes shared transactions
    got = await committer.run_blocking(backend.counts)
    assert got == {"queued": n}


# -- SQLite only ------------------------------------------------------------------------------

# Schema version 1, as released (before paused_types): the jobs table and its index.
_SQLITE_V1 = """
BEGIN;
CREATE TABLE jobs (
    id TEXT PRIMARY KEY,
    job_type TEXT NOT NULL,
    payload TEXT NOT NULL,
    status TEXT NOT NULL,
    priority INTEGER NOT NULL,
    max_retries INTEGER NOT NULL,
    delay INTEGER NOT NULL,
    scheduled_at REAL NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    retry_count INTEGER NOT NULL,
    error_message TEXT NOT NULL,
    started_at REAL,
    completed_at REAL,
    seq INTEGER NOT NULL,
    attempt INTEGER NOT NULL,
    lost_leases INTEGER NOT NULL,
    lease_id TEXT,
    lease_expires_at REAL,
    worker_id TEXT,
    version INTEGER NOT NULL
);
CREATE INDEX jobs_active ON jobs (status)
    WHERE status IN ('scheduled', 'queued', 'running', 'failed');
PRAGMA user_version = 1;
COMMIT;
"""


def _v1_row(job: Job) -> tuple[object, ...]:
    """A row of the version-1/2 jobs table (no idempotency_key column)."""
    assert job.idempotency_key is None
    return job_to_row(job)[:-1]


def test_sqlite_version_2_file_is_migrated_to_3_and_keeps_its_jobs(tmp_path: Path) -> None:
    path = tmp_path / "stackduck.db"
    jobs = [make_job(1), make_job(2, status=Status.COMPLETED)]
    db = sqlite3.connect(path, isolation_level=None)
    db.executescript(_SQLITE_V1)
    db.executescript(
        "BEGIN; CREATE TABLE paused_types (job_type TEXT PRIMARY KEY, paused_at REAL);"
        "INSERT INTO paused_types VALUES ('img', 1.0); PRAGMA user_version = 2; COMMIT;"
    )
    db.executemany(
        f"INSERT INTO jobs VALUES ({', '.join('?' * len(_v1_row(jobs[0])))})",
        [_v1_row(job) for job in jobs],
    )
    db.close()
    backend = SqliteBackend(path)
    backend.open()
    try:
        assert backend.db.execute("PRAGMA user_version").fetchone() == (3,)
        assert backend.load_active() == [jobs[0]]
        assert backend.get("job-2") == jobs[1]
        assert backend.load_paused() == ["img"]
        keyed = make_job(3, idempotency_key="k")
        backend.commit(Batch([keyed], ()))
        assert backend.find_key("k") == keyed
        plan = backend.db.execute(
            "EXPLAIN QUERY PLAN SELECT id FROM jobs WHERE idempotency_key = ?", ("k",)
        ).fetchall()
        assert "jobs_idempotency_key" in str(plan), plan
    finally:
        backend.close()


def test_sqlite_version_1_file_is_migrated_on_open_and_keeps_its_jobs(tmp_path: Path) -> None:
    path = tmp_path / "stackduck.db"
    jobs = [make_job(1), make_job(2, status=Status.COMPLETED), make_job(3, job_type="img")]
    db = sqlite3.connect(path, isolation_level=None)
    db.executescript(_SQLITE_V1)
    db.executemany(
        f"INSERT INTO jobs VALUES ({', '.join('?' * len(_v1_row(jobs[0])))})",
        [_v1_row(job) for job in jobs],
    )
    assert db.execute("PRAGMA user_version").fetchone() == (1,)
    assert (
        db.execute("SELECT name FROM sqlite_master WHERE name = 'paused_types'").fetchone() is None
    )
    db.close()

    backend = SqliteBackend(path)
    backend.open()
    try:
        assert backend.db.execute("PRAGMA user_version").fetchone() == (
            SqliteBackend.SCHEMA_VERSION,
        )
        assert SqliteBackend.SCHEMA_VERSION == 3
        assert backend.load_active() == [jobs[0], jobs[2]]
        assert backend.get("job-2") == jobs[1]
        assert backend.load_paused() == []
        backend.set_paused("img", True)
    finally:
        backend.close()
    again = SqliteBackend(path)  # a current file opens as it is
    again.open()
    try:
        assert again.load_paused() == ["img"]
        assert again.counts() == {"queued": 2, "completed": 1}
    finally:
        again.close()


# -- PostgreSQL only --------------------------------------------------------------------------


def test_pg_instances_starting_together_migrate_once(pg_schema: str) -> None:
    """Eight instances open the same new schema at the same instant: no error, one migration."""
    barrier = threading.Barrier(8)
    errors: list[BaseException] = []
    backends = [PostgresBackend(SHARED_DATABASE_URL, schema=pg_schema) for _ in range(8)]

    def start(b: PostgresBackend) -> None:
        try:
            barrier.wait(timeout=10)
            b.open()
        except Exception as exc:  # noqa: BLE001 - collected and reported below
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(b,)) for b in backends]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    try:
        assert not errors, errors
        with admin_connection() as admin:
            rows = admin.execute(
                f'SELECT version FROM "{pg_schema}".schema_migrations ORDER BY version'
            ).fetchall()
        assert [r[0] for r in rows] == list(range(1, SCHEMA_VERSION + 1))
        backends[0].commit(Batch([make_job(1)], ()))
        assert backends[7].get("job-1") == make_job(1)
    finally:
        for b in backends:
            b.close()


def test_pg_refuses_a_newer_schema(pg_schema: str) -> None:
    PostgresBackend(SHARED_DATABASE_URL, schema=pg_schema).open()  # creates version 1
    with admin_connection() as admin:
        admin.execute(f"INSERT INTO \"{pg_schema}\".schema_migrations VALUES (99, 'future', now())")
    with pytest.raises(StorageUnavailable, match="schema version 99, newer than this server"):
        PostgresBackend(SHARED_DATABASE_URL, schema=pg_schema).open()


def test_pg_migrates_a_version_1_schema_and_keeps_its_jobs(pg_schema: str) -> None:
    b = PostgresBackend(SHARED_DATABASE_URL, schema=pg_schema)
    b.open()
    b.commit(Batch([make_job(1), make_job(2)], ()))
    b.close()
    with admin_connection() as admin:  # back to what a version-1 server left behind
        admin.execute(f'DROP TABLE "{pg_schema}".paused_types')
        admin.execute(f'ALTER TABLE "{pg_schema}".jobs DROP COLUMN idempotency_key')
        admin.execute(f'DELETE FROM "{pg_schema}".schema_migrations WHERE version >= 2')
    again = PostgresBackend(SHARED_DATABASE_URL, schema=pg_schema)
    again.open()
    try:
        assert again.load_active() == [make_job(1), make_job(2)]
        assert again.load_paused() == []
        again.set_paused("t", True)
        assert again.load_paused() == ["t"]
    finally:
        again.close()
    with admin_connection() as admin:
        rows = admin.execute(
            f'SELECT version FROM "{pg_schema}".schema_migrations ORDER BY version'
        ).fetchall()
    assert [r[0] for r in rows] == [1, 2, 3] == list(range(1, SCHEMA_VERSION + 1))


def test_pg_migrates_a_version_2_schema_to_3_and_keeps_its_jobs(pg_schema: str) -> None:
    b = PostgresBackend(SHARED_DATABASE_URL, schema=pg_schema)
    b.open()
    b.commit(Batch([make_job(1), make_job(2, status=Status.COMPLETED)], ()))
    b.set_paused("t", True)
    b.close()
    with admin_connection() as admin:  # back to what a version-2 server left behind
        admin.execute(f'ALTER TABLE "{pg_schema}".jobs DROP COLUMN idempotency_key')
        admin.execute(f'DELETE FROM "{pg_schema}".schema_migrations WHERE version >= 3')
    again = PostgresBackend(SHARED_DATABASE_URL, schema=pg_schema)
    again.open()
    try:
        assert again.load_active() == [make_job(1)]
        assert again.get("job-2") == make_job(2, status=Status.COMPLETED)
        assert again.load_paused() == ["t"]
        keyed = make_job(3, idempotency_key="k")
        again.commit(Batch([keyed], ()))
        assert again.find_key("k") == keyed
    finally:
        again.close()
    with admin_connection() as admin:
        rows = admin.execute(
            f'SELECT version FROM "{pg_schema}".schema_migrations ORDER BY version'
        ).fetchall()
    assert [r[0] for r in rows] == [1, 2, 3]


def test_pg_indexes_serve_the_queries(pg_schema: str) -> None:
    b = PostgresBackend(SHARED_DATABASE_URL, schema=pg_schema)
    b.open()
    b.close()
    with admin_connection() as admin:
        admin.execute("SET enable_seqscan = off")  # tiny table: make the planner show its hand
        # the backend's own statements, so a drift between query and index predicate shows
        for query, index in ((b._q_active, "jobs_active"), (b._q_counts, "jobs_status")):
            plan = admin.execute(b"EXPLAIN " + query.as_bytes(admin)).fetchall()
            assert index in str(plan), plan
        plan = admin.execute(b"EXPLAIN " + b._q_get.as_bytes(admin), ("x",)).fetchall()
        assert "jobs_pkey" in str(plan), plan
        plan = admin.execute(b"EXPLAIN " + b._q_find_key.as_bytes(admin), ("x",)).fetchall()
        assert "jobs_idempotency_key" in str(plan), plan


def test_pg_url_parameters_and_validation() -> None:
    b = PostgresBackend(
        "postgresql://u:s3cret@db.example:6543/app?sslmode=disable&schema=tenant_a"
        "&statement_timeout=2.5&options=-c%20work_mem%3D8MB"
    )
    assert (b.schema, b.statement_timeout) == ("tenant_a", 2.5)
    assert "s3cret" not in b.display and "db.example:6543/app" in b.display
    assert "schema" not in b._conninfo and "work_mem=8MB" in b._conninfo
    assert "application_name=stackduck" in b._conninfo
    # the constructor wins over the URL; the default schema is "stackduck"
    assert PostgresBackend("postgresql://h/db?schema=x", schema="y").schema == "y"
    assert PostgresBackend("postgresql://h/db").schema == "stackduck"
    assert PostgresBackend("host=h dbname=db").schema == "stackduck"  # libpq key=value form
    for bad in ("Upper", "1st", "a-b", "pg_x", "a" * 64, 'x"; DROP TABLE y; --'):
        with pytest.raises(ConfigError, match="schema"):
            PostgresBackend("postgresql://h/db", schema=bad)
    for url in ("postgresql://h:port/db", "postgresql://h/db?nonsense=1", "mysql://h"):
        with pytest.raises(ConfigError, match="not a valid PostgreSQL URL"):
            PostgresBackend(url)
    with pytest.raises(ConfigError, match="statement_timeout"):
        PostgresBackend("postgresql://h/db?statement_timeout=soon")
    with pytest.raises(ConfigError, match="statement_timeout"):
        PostgresBackend("postgresql://h/db", statement_timeout=0)


def test_pg_nul_characters_are_stored_as_replacement_characters(pg_schema: str) -> None:
    b = PostgresBackend(SHARED_DATABASE_URL, schema=pg_schema)
    b.open()
    try:
        job = make_job(1, error_message="bad\x00byte", worker_id="w\x00")
        b.commit(Batch([job], ()))  # must not fail (a refused row would block every write)
        stored = b.get("job-1")
        assert stored is not None
        assert (stored.error_message, stored.worker_id) == ("bad\ufffdbyte", "w\ufffd")
        assert b.get("job-1\x00") is None
        b.commit(Batch([], ["job-\x00"]))
    finally:
        b.close()


def test_pg_unreachable_server_fails_fast_with_the_reason() -> None:
    port = free_port()  # nothing listens there
    b = PostgresBackend(f"postgresql://postgres@127.0.0.1:{port}/test", connect_timeout=2)
    t0 = time.monotonic()
    with pytest.raises(StorageUnavailable, match=r"cannot open .*refused"):
        b.open()
    assert time.monotonic() - t0 < 5
    with pytest.raises(StorageUnavailable, match="not open"):
        b.counts()


@contextlib.contextmanager
def jobs_table_locked(schema: str) -> Iterator[None]:
    """Another session holds an exclusive lock on the jobs table for the block."""
    with admin_connection() as locker:
        locker.autocommit = False
        locker.execute(f'LOCK TABLE "{schema}".jobs IN ACCESS EXCLUSIVE MODE')
        try:
            yield
        finally:
            locker.rollback()


def test_pg_statement_timeout_surfaces_as_unavailable(pg_schema: str) -> None:
    b = PostgresBackend(SHARED_DATABASE_URL, schema=pg_schema, statement_timeout=0.5)
    b.open()
    try:
        with jobs_table_locked(pg_schema):
            t0 = time.monotonic()
            with pytest.raises(StorageUnavailable, match=r"statement timeout.*57014"):
                b.commit(Batch([make_job(1)], ()))
            assert time.monotonic() - t0 < 2.0
        b.commit(Batch([make_job(1)], ()))  # the same pool works again at once
        assert b.get("job-1") == make_job(1)
    finally:
        b.close()


def test_pg_interrupt_cancels_a_blocked_call(pg_schema: str) -> None:
    """interrupt() (what a cancelled trio task calls) ends a blocked call promptly."""
    b = PostgresBackend(SHARED_DATABASE_URL, schema=pg_schema, statement_timeout=30)
    b.open()
    try:
        with jobs_table_locked(pg_schema):
            timer = threading.Timer(0.3, b.interrupt)
            timer.start()
            t0 = time.monotonic()
            with pytest.raises(StorageUnavailable, match="cancel"):
                b.counts()
            elapsed = time.monotonic() - t0
            timer.join()
        assert elapsed < 3.0, elapsed
        assert b.counts() == {}
    finally:
        b.close()
