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
import functools
import math
import os
import socket
import sqlite3
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import psycopg
import pytest
import trio
from psycopg import sql

from stackduck_core import Base, Job, RateLimit, Status, TypeLimit
from stackduck_core._failover import BackendHealth, BackendRole
from stackduck_trio._clock import WallClock
from stackduck_trio._config import ConfigError
from stackduck_trio._pgtier import PostgresTier
from stackduck_trio._postgres import SCHEMA_VERSION, PostgresBackend
from stackduck_trio._postgres import _cas_row as pg_cas_row
from stackduck_trio._postgres import _row as pg_row
from stackduck_trio._postgres import _update_params as pg_update_params
from stackduck_trio._store import (
    Backend,
    Batch,
    GroupCommitter,
    MemoryBackend,
    SqliteBackend,
    StorageUnavailable,
    dead_page_token,
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
    assert backend.commit(Batch([v2], ())) == frozenset()
    assert backend.commit(Batch([v1], ())) == {"job-1"}  # a late retry of an older write
    assert backend.get(v1.id) == v2
    # the same version again, different content: not applied either (strictly newer only)
    assert backend.commit(Batch([attrs.evolve(v2, error_message="other")], ())) == {"job-1"}
    assert backend.get(v1.id) == v2
    assert backend.commit(Batch([v3], ())) == frozenset()
    assert backend.get(v1.id) == v3
    # several versions of one job in one batch, in any order: the newest wins
    w1 = make_job(2)
    w2 = attrs.evolve(w1, version=2, status=Status.RUNNING)
    w3 = attrs.evolve(w1, version=3, status=Status.CANCELLED)
    assert backend.commit(Batch([w2, w3, w1], ())) == frozenset()
    assert backend.get(w1.id) == w3


def test_deletes(backend: Backend) -> None:
    jobs = [make_job(n) for n in range(5)]
    backend.commit(Batch(jobs, ()))
    # a missing id is no error; deletes refuse nothing
    assert backend.commit(Batch([], ["job-1", "job-3", "job-missing"])) == frozenset()
    assert {j.id for j in backend.load_active()} == {"job-0", "job-2", "job-4"}
    assert backend.get("job-1") is None
    # upserts and deletes in one batch: the delete applies after the upsert
    backend.commit(Batch([attrs.evolve(jobs[0], version=2), make_job(9)], ["job-0", "job-4"]))
    assert {j.id for j in backend.load_active()} == {"job-2", "job-9"}
    assert backend.commit(Batch([], [])) == frozenset()  # an empty batch is a no-op
    assert backend.counts() == {"queued": 2}


# -- compare-and-set: records with a base -----------------------------------------------------


def delivery(n: int, *, lease: str | None = "lease-a", **fields: object) -> Job:
    """A job on record as delivered (version 2), its lease ``lease``."""
    values: dict[str, object] = {
        "status": Status.RUNNING,
        "attempt": 1,
        "started_at": NOW,
        "lease_id": lease,
        "lease_expires_at": NOW + 30,
        "worker_id": "worker-1",
        "version": 2,
    }
    values.update(fields)
    return make_job(n, **values)


def finished(row: Job, base: Base | None, **fields: object) -> Job:
    """The end of a delivery, made from ``row`` (version + 1), carrying ``base``."""
    values: dict[str, object] = {
        "status": Status.COMPLETED,
        "completed_at": NOW + 1,
        "lease_id": None,
        "lease_expires_at": None,
        "version": row.version + 1,
        "base": base,
    }
    values.update(fields)
    return attrs.evolve(row, **values)


def test_conditional_update_applies_over_a_row_with_its_base(backend: Backend) -> None:
    row = delivery(1)
    queued = make_job(2)  # no lease: the base's NULL lease matches the row's NULL
    assert backend.commit(Batch([row, queued], ())) == frozenset()
    done = finished(row, Base(Status.RUNNING, "lease-a"))
    claimed = delivery(2, version=2, base=Base(Status.QUEUED, None))
    assert backend.commit(Batch([done, claimed], ())) == frozenset()
    assert backend.get("job-1") == done
    assert backend.get("job-2") == claimed
    # a store returns records without a base (a record read from a store has none)
    stored = backend.get("job-1")
    assert stored is not None and stored.base is None
    # the version may jump: newer is enough
    again = attrs.evolve(done, status=Status.QUEUED, version=9, base=Base(Status.COMPLETED, None))
    assert backend.commit(Batch([again], ())) == frozenset()
    assert backend.get("job-1") == again


@pytest.mark.parametrize(
    ("stored", "base", "version"),
    [
        pytest.param(delivery(1), Base(Status.QUEUED, "lease-a"), 3, id="status-differs"),
        pytest.param(delivery(1), Base(Status.RUNNING, "lease-b"), 3, id="lease-differs"),
        pytest.param(delivery(1), Base(Status.RUNNING, None), 3, id="lease-set-base-null"),
        pytest.param(
            delivery(1, lease=None), Base(Status.RUNNING, "lease-a"), 3, id="lease-null-base-set"
        ),
        pytest.param(delivery(1), Base(Status.RUNNING, "lease-a"), 2, id="same-version"),
        pytest.param(delivery(1), Base(Status.RUNNING, "lease-a"), 1, id="older-version"),
        pytest.param(None, Base(Status.RUNNING, "lease-a"), 3, id="row-missing"),
    ],
)
def test_conditional_update_is_refused_unless_status_lease_and_version_fit(
    backend: Backend, stored: Job | None, base: Base, version: int
) -> None:
    other = delivery(2)  # a bystander in the same batches
    assert backend.commit(Batch([other] if stored is None else [stored, other], ())) == frozenset()
    record = finished(delivery(1), base, version=version)
    fine = finished(other, Base(Status.RUNNING, "lease-a"))
    assert backend.commit(Batch([record, fine], ())) == {"job-1"}
    assert backend.get("job-1") == stored  # unchanged; a missing row stays missing
    assert backend.get("job-2") == fine
    assert backend.commit(Batch([record], ())) == {"job-1"}  # alone as well
    assert backend.get("job-1") == stored
    if stored is None:
        assert backend.counts() == {"completed": 1}


def test_unconditional_records_are_upserted_by_version(backend: Backend) -> None:
    row = delivery(1)
    assert backend.commit(Batch([row], ())) == frozenset()  # inserted
    newer = finished(row, None, status=Status.QUEUED)  # whatever the stored status and lease
    assert backend.commit(Batch([newer], ())) == frozenset()
    assert backend.get("job-1") == newer
    assert backend.commit(Batch([row], ())) == {"job-1"}  # older: refused
    assert backend.commit(Batch([attrs.evolve(newer, payload="{}")], ())) == {"job-1"}
    assert backend.get("job-1") == newer


def test_several_records_of_one_job_in_a_batch_chain_from_the_first_base(
    backend: Backend,
) -> None:
    """The committer merges a job's records; a backend given several does the same: the
    newest is written over what the first one expected."""
    for n in (1, 2):
        assert backend.commit(Batch([make_job(n)], ())) == frozenset()
    claimed = delivery(1, base=Base(Status.QUEUED, None))
    done = finished(claimed, Base(Status.RUNNING, "lease-a"))
    assert backend.commit(Batch([claimed, done], ())) == frozenset()
    assert backend.get("job-1") == done
    # the other way round the first base (running) is not what the store holds
    claimed2 = delivery(2, base=Base(Status.QUEUED, None))
    done2 = finished(claimed2, Base(Status.RUNNING, "lease-a"))
    assert backend.commit(Batch([done2, claimed2], ())) == {"job-2"}
    assert backend.get("job-2") == make_job(2)


# One record of each kind the store must tell apart: (kind, whether it is written).
CASES: tuple[tuple[str, bool], ...] = (
    ("insert", True),
    ("cas", True),
    ("upsert-newer", True),
    ("cas-null-lease", True),
    ("upsert-same-version", False),
    ("cas-status", False),
    ("upsert-older", False),
    ("cas-lease", False),
    ("cas-lease-null", False),
    ("cas-version", False),
    ("cas-older", False),
    ("cas-missing", False),
)


def case(kind: str, i: int) -> tuple[Job | None, Job]:
    """The stored row (or None) and the record committed over it, for case ``kind``."""
    row = delivery(i, id=f"{kind}-{i}", lease=f"lease-{i}")
    base = Base(Status.RUNNING, f"lease-{i}")
    return {
        "insert": (None, make_job(i, id=f"{kind}-{i}")),
        "cas": (row, finished(row, base)),
        "upsert-newer": (row, finished(row, None, status=Status.QUEUED)),
        "cas-null-lease": (
            attrs.evolve(row, status=Status.QUEUED, lease_id=None),
            finished(row, Base(Status.QUEUED, None)),
        ),
        "upsert-same-version": (row, attrs.evolve(row, error_message="late")),
        "cas-status": (attrs.evolve(row, status=Status.QUEUED), finished(row, base)),
        "upsert-older": (row, attrs.evolve(row, status=Status.QUEUED, version=1)),
        "cas-lease": (attrs.evolve(row, lease_id="lease-x"), finished(row, base)),
        "cas-lease-null": (attrs.evolve(row, lease_id=None), finished(row, base)),
        "cas-version": (attrs.evolve(row, version=3), finished(row, base)),
        "cas-older": (attrs.evolve(row, version=7), finished(row, base)),
        "cas-missing": (None, finished(row, base)),
    }[kind]


@pytest.mark.parametrize(
    "size",
    [
        1,  # lone writes (PostgreSQL: one autocommit statement each)
        3,  # small batches (PostgreSQL: pipelined statements)
        64,  # PostgreSQL's copy_threshold: COPY and merge
        300,
    ],
)
def test_mixed_batches_return_exactly_the_refused_ids(backend: Backend, size: int) -> None:
    """Inserts, upserts and conditional updates of every outcome, with deletes, batched by
    ``size``: the same results whatever the size (and PostgreSQL's write path)."""
    count = max(size, len(CASES))
    count += -count % size  # whole batches
    cases = [(i, *CASES[i % len(CASES)]) for i in range(count)]
    pairs = {i: case(kind, i) for i, kind, _ in cases}
    seeds = [stored for stored, _ in pairs.values() if stored is not None]
    doomed = [make_job(100_000 + b, id=f"doomed-{b}") for b in range(count // size)]
    assert backend.commit(Batch([*seeds, *doomed], ())) == frozenset()
    refused: set[str] = set()
    for b in range(count // size):
        batch = cases[b * size : (b + 1) * size]
        upserts = [pairs[i][1] for i, _, _ in batch]
        # a lone write stays alone (PostgreSQL's single-statement path); its deletes follow
        deletes = [] if size == 1 else [f"doomed-{b}", f"never-{b}"]
        refused |= backend.commit(Batch(upserts, deletes))
        if size == 1:
            assert backend.commit(Batch([], [f"doomed-{b}"])) == frozenset()
    assert refused == {pairs[i][1].id for i, _, written in cases if not written}
    for i, _, written in cases:
        stored, record = pairs[i]
        assert backend.get(record.id) == (record if written else stored), record.id
    assert all(backend.get(job.id) is None for job in doomed)
    final = [
        record if written else pairs[i][0] for i, _, written in cases for record in [pairs[i][1]]
    ]
    assert backend.counts() == dict(Counter(job.status.value for job in final if job is not None))


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
    """10k rows in one commit (PostgreSQL's COPY path), then 10k newer, then 10k older,
    then 10k conditional updates (compare-and-set)."""
    n = 10_000
    jobs = [make_job(i, payload=f'{{"i": {i}, "pad": "{"x" * 100}"}}') for i in range(n)]
    t0 = time.perf_counter()
    assert backend.commit(Batch(jobs, ())) == frozenset()
    first = time.perf_counter() - t0
    assert backend.counts() == {"queued": n}
    running = [
        attrs.evolve(j, status=Status.RUNNING, attempt=1, lease_id=f"lease-{j.seq}", version=2)
        for j in jobs
    ]
    deleted = [f"job-{i}" for i in range(0, n, 10)]
    t0 = time.perf_counter()
    assert backend.commit(Batch(running, deleted)) == frozenset()
    second = time.perf_counter() - t0
    # older versions of rows still there: all ignored (a deleted row has no version left to
    # compare with; the single writer never replays a write after a later delete)
    older = [j for j in jobs[: n // 2] if j.seq % 10]
    assert backend.commit(Batch(older, ())) == {j.id for j in older}
    assert backend.counts() == {"running": n - n // 10}
    assert backend.get("job-11") == running[11]
    # the end of every delivery, conditional on its lease: the deleted rows are refused
    done = [
        attrs.evolve(
            j,
            status=Status.COMPLETED,
            lease_id=None,
            completed_at=NOW + 1,
            version=3,
            base=Base(Status.RUNNING, j.lease_id),
        )
        for j in running
    ]
    t0 = time.perf_counter()
    assert backend.commit(Batch(done, ())) == set(deleted)
    third = time.perf_counter() - t0
    assert backend.counts() == {"completed": n - n // 10}
    assert backend.get("job-11") == done[11]
    print(
        f"\n{type(backend).__name__}: {n} inserts {n / first:,.0f} rows/s; "
        f"{n} updates + {n // 10} deletes {n * 1.1 / second:,.0f} rows/s; "
        f"{n} conditional updates {n / third:,.0f} rows/s"
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
        lambda: backend.list_dead(None, "", 10),
        lambda: backend.list_dead("t", "", 10),
        lambda: backend.dead_ids(None, 10),
        lambda: backend.load_queued("", 10),
        lambda: backend.load_running(["job-1"]),
        lambda: backend.load_running([]),
        lambda: backend.stale_running(NOW, 10),
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


def test_limits_round_trip(backend: Backend, reopen: Callable[[Backend], Backend]) -> None:
    assert backend.load_limits() == {}
    both = TypeLimit(rate=RateLimit(2.5, 10), max_running=3)
    backend.set_limit("email", both)
    backend.set_limit("sms", TypeLimit(max_running=1))
    backend.set_limit("img", TypeLimit(rate=RateLimit(0.5)))
    backend.set_limit("img", TypeLimit(rate=RateLimit(100.0, 7)))  # changed
    backend.set_limit("never", None)  # clearing a type without limits is fine
    expected = {
        "email": both,
        "sms": TypeLimit(max_running=1),
        "img": TypeLimit(rate=RateLimit(100.0, 7)),
    }
    assert backend.load_limits() == expected
    backend.set_limit("sms", None)
    del expected["sms"]
    assert backend.load_limits() == expected
    again = reopen(backend)
    assert again.load_limits() == ({} if isinstance(again, MemoryBackend) else expected)


def test_prune_deletes_old_finished_and_dead_rows_oldest_first(backend: Backend) -> None:
    rows = [
        make_job(1, status=Status.COMPLETED, completed_at=NOW - 300),
        make_job(2, status=Status.CANCELLED, completed_at=NOW - 200),
        make_job(3, status=Status.COMPLETED, completed_at=NOW - 100),
        make_job(4, status=Status.COMPLETED, completed_at=NOW - 1),  # too young
        make_job(5),  # queued: never pruned
        make_job(6, status=Status.RUNNING, started_at=NOW, lease_id="l", lease_expires_at=NOW),
        dead_job("dead-1", NOW - 500),
        dead_job("dead-2", NOW - 400),
        dead_job("dead-3", NOW - 5),  # too young
    ]
    backend.commit(Batch(rows, ()))
    assert backend.prune_finished(NOW - 50, 2) == 2  # bounded: the two oldest
    assert backend.get("job-1") is None and backend.get("job-2") is None
    assert backend.get("job-3") is not None
    assert backend.prune_finished(NOW - 50, 100) == 1
    assert backend.prune_finished(NOW - 50, 100) == 0
    assert backend.prune_dead(NOW - 50, 1) == 1
    assert backend.get("dead-1") is None and backend.get("dead-2") is not None
    assert backend.prune_dead(NOW - 50, 100) == 1
    assert backend.prune_dead(NOW - 50, 100) == 0
    left = {job_id for job_id in ("job-4", "job-5", "job-6", "dead-3") if backend.get(job_id)}
    assert left == {"job-4", "job-5", "job-6", "dead-3"}


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


# -- the dead-letter list, the waiting rows and the reaper's batched read ---------------------

BAD_TOKEN = "not a page token from this server"


def dead_job(job_id: str, died_at: float, job_type: str = "t", **fields: object) -> Job:
    """A dead-lettered record as the core writes it: completed_at is the moment it died.

    updated_at runs the other way (the later the death, the earlier updated_at), so a
    store that ordered dead jobs by updated_at instead of completed_at fails the tests.
    """
    base: dict[str, object] = {
        "id": job_id,
        "job_type": job_type,
        "status": Status.FAILED,
        "updated_at": 2 * NOW - died_at,
        "completed_at": died_at,
        "error_message": f"{job_id} failed",
        "version": 3,
    }
    base.update(fields)
    return make_job(0, **base)


def all_dead_pages(
    backend: Backend, job_type: str | None, limit: int
) -> tuple[list[list[str]], list[str]]:
    """Every page of list_dead from the start: the ids of each page and every token returned."""
    pages: list[list[str]] = []
    tokens: list[str] = []
    token = ""
    for _ in range(100):  # bounded: a token bug must not hang the suite
        page, token = backend.list_dead(job_type, token, limit)
        pages.append([j.id for j in page])
        tokens.append(token)
        if not token:
            return pages, tokens
    raise AssertionError("list_dead never returned the last page")


# Two instants one ulp apart, and a time no decimal rendering of 6 digits keeps apart.
T1 = NOW + 0.1
T1_NEXT = math.nextafter(T1, math.inf)
# Ids whose order differs between code points and a natural-language collation (upper case
# before lower case, "10" before "9", non-ASCII last): stores order ids by code point.
DEAD = [
    dead_job("b-late", NOW + 50, "img"),
    dead_job("job-9", T1),
    dead_job("job-10", T1),  # same instant as job-9: the id breaks the tie ("job-10" first)
    dead_job("Z-upper", T1),  # same instant again: "Z" (U+005A) sorts before "j"
    dead_job("a-first", NOW - 100, "img"),
    dead_job("\u00e9t\u00e9", T1_NEXT),  # one ulp later than T1
    dead_job("c-mid", NOW + 10),
]
#: DEAD in the order they died.
DEAD_ORDER = ["a-first", "Z-upper", "job-10", "job-9", "\u00e9t\u00e9", "c-mid", "b-late"]


def commit_dead_and_others(backend: Backend) -> None:
    others = [
        make_job(1, status=Status.QUEUED, updated_at=NOW + 1),
        make_job(2, status=Status.SCHEDULED, updated_at=NOW + 2),
        make_job(3, status=Status.RUNNING, updated_at=NOW + 3),
        make_job(4, status=Status.COMPLETED, updated_at=NOW + 4, completed_at=NOW + 4),
        make_job(5, status=Status.CANCELLED, updated_at=NOW + 5, completed_at=NOW + 5),
    ]
    backend.commit(Batch([*DEAD, *others], ()))


def test_list_dead_is_in_order_of_death_then_id(backend: Backend) -> None:
    assert backend.list_dead(None, "", 10) == ([], "")
    assert backend.dead_ids(None, 10) == []
    commit_dead_and_others(backend)
    page, token = backend.list_dead(None, "", 100)
    assert [j.id for j in page] == DEAD_ORDER and token == ""
    by_id = {j.id: j for j in DEAD}
    assert page == [by_id[i] for i in DEAD_ORDER]  # whole records, every field intact
    # exactly as many rows as the limit: still the last page
    assert backend.list_dead(None, "", len(DEAD)) == (page, "")


def test_list_dead_of_one_type(backend: Backend) -> None:
    commit_dead_and_others(backend)
    page, token = backend.list_dead("img", "", 10)
    assert [j.id for j in page] == ["a-first", "b-late"] and token == ""
    page, token = backend.list_dead("t", "", 10)
    assert [j.id for j in page] == [i for i in DEAD_ORDER if i not in ("a-first", "b-late")]
    assert token == ""
    assert backend.list_dead("no-such-type", "", 10) == ([], "")
    assert backend.list_dead("IMG", "", 10) == ([], "")  # types are case-sensitive
    # paginated by type: the token of a typed page resumes the typed list
    first, token = backend.list_dead("t", "", 2)
    assert [j.id for j in first] == ["Z-upper", "job-10"]
    assert token == dead_page_token(first[-1])
    rest, end = backend.list_dead("t", token, 10)
    assert [j.id for j in rest] == ["job-9", "\u00e9t\u00e9", "c-mid"] and end == ""


def test_list_dead_pages_with_exact_tokens(backend: Backend) -> None:
    commit_dead_and_others(backend)
    for limit in range(1, len(DEAD) + 2):
        pages, tokens = all_dead_pages(backend, None, limit)
        assert [i for page in pages for i in page] == DEAD_ORDER, limit  # each once, in order
        assert all(len(page) == limit for page in pages[:-1]), limit
        assert 1 <= len(pages[-1]) <= limit, limit  # no empty trailing page
        assert tokens[-1] == ""
    # limit 2: page boundaries fall between Z-upper|job-10 (same completed_at) and
    # job-9|ete (one ulp apart): the tokens spell both exactly
    pages, tokens = all_dead_pages(backend, None, 2)
    assert pages == [
        ["a-first", "Z-upper"],
        ["job-10", "job-9"],
        ["\u00e9t\u00e9", "c-mid"],
        ["b-late"],
    ]
    assert tokens == [
        f"{T1.hex()}/Z-upper",
        f"{T1.hex()}/job-9",
        f"{float(NOW + 10).hex()}/c-mid",
        "",
    ]
    assert T1.hex() != T1_NEXT.hex() and repr(T1)[:12] == repr(T1_NEXT)[:12]
    # a token made elsewhere from the same (completed_at, id) resumes at the same row
    page, _ = backend.list_dead(None, f"{T1.hex()}/job-10", 1)
    assert [j.id for j in page] == ["job-9"]
    # a token of a row that no longer exists still resumes right after its position
    page, _ = backend.list_dead(None, f"{T1.hex()}/k", 10)
    assert [j.id for j in page] == ["\u00e9t\u00e9", "c-mid", "b-late"]


@pytest.mark.parametrize(
    "token",
    [
        "garbage",
        "/",
        "0x1.ad27480066666p+30",  # no id
        "0x1.ad27480066666p+30/",  # empty id
        "/job-1",  # no time
        "1800000000.1/job-1",  # decimal, not float.hex
        "1.8e9/job-1",
        "0x1.ad27480066666P+30/job-1",  # not the canonical spelling
        "0x1.ad274800666660p+30/job-1",
        " 0x1.ad27480066666p+30/job-1",
        "inf/job-1",
        "nan/job-1",
        "0x1p+99999/job-1",  # overflows
        "0x1.ad27480066666p+30/job\x00-1",
        "0x1.ad27480066666p+30/job\ud800",
    ],
)
def test_list_dead_refuses_a_malformed_token(backend: Backend, token: str) -> None:
    commit_dead_and_others(backend)
    with pytest.raises(ValueError, match=BAD_TOKEN):
        backend.list_dead(None, token, 10)
    with pytest.raises(ValueError, match=BAD_TOKEN):
        backend.list_dead("t", token, 10)


def test_pagination_refuses_a_limit_below_one(backend: Backend) -> None:
    for call in (
        lambda: backend.list_dead(None, "", 0),
        lambda: backend.list_dead("t", "", -1),
        lambda: backend.dead_ids(None, 0),
        lambda: backend.load_queued("", 0),
    ):
        with pytest.raises(ValueError, match="limit"):
            call()


def test_list_dead_sees_requeues_and_new_deaths_between_pages(backend: Backend) -> None:
    commit_dead_and_others(backend)
    first, token = backend.list_dead(None, "", 3)
    assert [j.id for j in first] == DEAD_ORDER[:3]
    # between the pages: job-9 (on the next page) and Z-upper (on this one) are requeued,
    # c-mid is purged, a job dies now, and a requeued job dies again
    by_id = {j.id: j for j in DEAD}
    requeued = [
        attrs.evolve(
            by_id[i], status=Status.QUEUED, completed_at=None, updated_at=NOW + 60, version=4
        )
        for i in ("job-9", "Z-upper")
    ]
    fresh = dead_job("d-new", NOW + 70)
    backend.commit(Batch([*requeued, fresh], ["c-mid"]))
    second, token = backend.list_dead(None, token, 3)
    assert [j.id for j in second] == ["\u00e9t\u00e9", "b-late", "d-new"] and token == ""
    again = attrs.evolve(
        requeued[0], status=Status.FAILED, completed_at=NOW + 80, updated_at=NOW + 80, version=6
    )
    backend.commit(Batch([again], ()))
    page, token = backend.list_dead(None, "", 100)
    assert [j.id for j in page] == [
        "a-first",
        "job-10",
        "\u00e9t\u00e9",
        "b-late",
        "d-new",
        "job-9",  # died again: now at the end, as the record it is now
    ]
    assert page[-1] == again and token == ""
    assert backend.dead_ids(None, 100) == [j.id for j in page]


def test_dead_ids_order_type_and_limit(backend: Backend) -> None:
    commit_dead_and_others(backend)
    assert backend.dead_ids(None, 100) == DEAD_ORDER
    for limit in range(1, len(DEAD) + 1):
        assert backend.dead_ids(None, limit) == DEAD_ORDER[:limit]
    assert backend.dead_ids("img", 100) == ["a-first", "b-late"]
    assert backend.dead_ids("img", 1) == ["a-first"]
    assert backend.dead_ids("t", 3) == ["Z-upper", "job-10", "job-9"]
    assert backend.dead_ids("no-such-type", 10) == []


def test_load_queued_pages_cover_every_waiting_row_once(backend: Backend) -> None:
    assert backend.load_queued("", 10) == ([], "")
    statuses = list(Status)
    jobs = [
        make_job(n, status=statuses[n % len(statuses)], job_type=f"t{n % 3}") for n in range(60)
    ]
    jobs += [make_job(0, id=i, status=Status.QUEUED) for i in ("Z", "a", "\u00e9", "job-")]
    backend.commit(Batch(jobs, ()))
    waiting = {j.id: j for j in jobs if j.status in (Status.QUEUED, Status.SCHEDULED)}
    assert len(waiting) == 24
    expected = sorted(waiting)  # by code point
    for limit in (1, 5, 7, 24, 25, 1000):
        seen: list[Job] = []
        token = ""
        for _ in range(100):
            page, next_token = backend.load_queued(token, limit)
            assert 1 <= len(page) <= limit
            seen += page
            if not next_token:
                break
            assert len(page) == limit and next_token == page[-1].id  # token = last id
            token = next_token
        assert [j.id for j in seen] == expected, limit
        assert seen == [waiting[i] for i in expected]
    # a token is an id: resuming after an id that is not (or no longer) stored works
    page, token = backend.load_queued("job-50", 100)
    assert [j.id for j in page] == [i for i in expected if i > "job-50"] and token == ""
    with pytest.raises(ValueError, match=BAD_TOKEN):
        backend.load_queued("job-\x00", 10)


def test_load_running_returns_the_current_records(backend: Backend) -> None:
    jobs = [make_job(n, status=Status.RUNNING, attempt=1, version=2) for n in range(5)]
    backend.commit(Batch(jobs, ()))
    # since claimed: one completed, one lost its lease and went back to the queue, one purged
    done = attrs.evolve(jobs[1], status=Status.COMPLETED, version=3, completed_at=NOW + 1)
    back = attrs.evolve(jobs[3], status=Status.QUEUED, lost_leases=1, version=3)
    backend.commit(Batch([done, back], ["job-4"]))
    asked = ["job-3", "missing", "job-1", "job-4", "job-0", "job-3", "job-\x00", ""]
    assert backend.load_running(asked) == [back, done, jobs[0]]  # asked order, each once
    assert backend.load_running([]) == []
    assert backend.load_running(["missing"]) == []
    # more ids than one statement takes in SQLite (chunks of 500), half of them missing
    many = [make_job(n, status=Status.RUNNING) for n in range(100, 1300)]
    backend.commit(Batch(many, ()))
    asked = [f"job-{n}" for n in range(2400, 99, -1)]
    assert backend.load_running(asked) == many[::-1]


# Failed rows without a completed_at (written by hand, or by an old version): they count as
# dead since 0.0 (the Unix epoch), so they come first, in id order together with a job that
# died at exactly 0.0.
UNDATED = [
    dead_job("z-undated", 0.0, "img", completed_at=None),
    dead_job("n-undated", 0.0, completed_at=None),
    dead_job("m-epoch", 0.0),  # died at 0.0 exactly: the place of no completed_at at all
]
UNDATED_ORDER = ["m-epoch", "n-undated", "z-undated"]


def test_list_dead_lists_rows_without_completed_at_first(backend: Backend) -> None:
    commit_dead_and_others(backend)
    backend.commit(Batch(UNDATED, ()))
    everything = UNDATED_ORDER + DEAD_ORDER
    page, token = backend.list_dead(None, "", 100)
    assert [j.id for j in page] == everything and token == ""
    by_id = {j.id: j for j in UNDATED}
    assert page[:3] == [by_id[i] for i in UNDATED_ORDER]  # completed_at still NULL (None)
    assert backend.dead_ids(None, 100) == everything
    assert backend.dead_ids(None, 2) == UNDATED_ORDER[:2]
    for limit in range(1, len(everything) + 1):
        pages, _ = all_dead_pages(backend, None, limit)
        assert [i for p in pages for i in p] == everything, limit  # each once, in order
    # an undated row's token spells 0.0: pages cross from the undated to the dated rows
    assert dead_page_token(by_id["n-undated"]) == "0x0.0p+0/n-undated"
    pages, tokens = all_dead_pages(backend, None, 2)
    assert pages[:2] == [["m-epoch", "n-undated"], ["z-undated", "a-first"]]
    assert tokens[:2] == ["0x0.0p+0/n-undated", f"{float(NOW - 100).hex()}/a-first"]
    page, _ = backend.list_dead(None, "0x0.0p+0/m-epoch", 1)
    assert [j.id for j in page] == ["n-undated"]
    # one type: its undated row comes before its dated ones
    pages, tokens = all_dead_pages(backend, "img", 1)
    assert pages == [["z-undated"], ["a-first"], ["b-late"]]
    assert tokens[0] == "0x0.0p+0/z-undated"
    assert backend.dead_ids("img", 1) == ["z-undated"]
    assert backend.dead_ids("t", 2) == ["m-epoch", "n-undated"]


def running_job(job_id: str, started_at: float | None, lease_expires_at: float | None) -> Job:
    """A delivery on record: claimed at started_at, its lease (as last extended) ends then."""
    return make_job(
        0,
        id=job_id,
        status=Status.RUNNING,
        attempt=1,
        started_at=started_at,
        lease_id=f"lease-{job_id}",
        lease_expires_at=lease_expires_at,
        worker_id="worker-1",
        version=2,
    )


def test_stale_running_oldest_first_of_the_expired_leases(backend: Backend) -> None:
    before = NOW
    assert backend.stale_running(before, 10) == []
    running = [
        running_job("live-oldest", NOW - 500, NOW + 30),  # runs long but heartbeats: not stale
        running_job("s-old", NOW - 100, NOW - 40),
        running_job("s-no-lease", NOW - 50, None),  # no lease on record: stale
        running_job("s-tie-a", NOW - 80, NOW - 1),
        running_job("S-tie-B", NOW - 80, NOW - 1),  # same started_at: ids by code point
        running_job("s-unstarted", None, NOW - 1),  # no started_at (hand-written): first
        running_job("edge", NOW - 90, before),  # runs out exactly at `before`: not yet
        running_job("live", NOW - 10, math.nextafter(before, math.inf)),
    ]
    # not running: never stale, whatever their lease fields say
    others = [
        attrs.evolve(running_job(f"other-{s.value}", NOW - 1000, NOW - 900), status=s)
        for s in Status
        if s is not Status.RUNNING
    ]
    backend.commit(Batch([*running, *others], ()))
    by_id = {j.id: j for j in running}
    expected = ["s-unstarted", "s-old", "S-tie-B", "s-tie-a", "s-no-lease"]
    assert backend.stale_running(before, 100) == [by_id[i] for i in expected]
    for limit in range(1, len(expected) + 1):
        assert [j.id for j in backend.stale_running(before, limit)] == expected[:limit]
    # a heartbeat extends the lease on record: no longer stale, until it runs out again
    beat = attrs.evolve(by_id["s-old"], lease_expires_at=NOW + 60, updated_at=NOW, version=3)
    backend.commit(Batch([beat], ()))
    assert [j.id for j in backend.stale_running(before, 100)] == [
        i for i in expected if i != "s-old"
    ]
    later = [j.id for j in backend.stale_running(NOW + 61, 100)]
    assert later == [
        "s-unstarted",
        "live-oldest",
        "s-old",
        "edge",
        "S-tie-B",
        "s-tie-a",
        "s-no-lease",
        "live",
    ]
    assert backend.stale_running(-math.inf, 10) == [by_id["s-no-lease"]]  # only the lease-less
    with pytest.raises(ValueError, match="limit"):
        backend.stale_running(before, 0)


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


def test_sqlite_version_2_file_is_migrated_to_current_and_keeps_its_jobs(tmp_path: Path) -> None:
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
        assert backend.db.execute("PRAGMA user_version").fetchone() == (
            SqliteBackend.SCHEMA_VERSION,
        )
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
        assert SqliteBackend.SCHEMA_VERSION == 6
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


# What each SQLite schema version added after version 3: undone by rewind_sqlite.
_SQLITE_UNDO = {
    5: "DROP INDEX jobs_running;",
    4: "DROP INDEX jobs_dead; DROP INDEX jobs_dead_type; DROP INDEX jobs_queued;",
}


def rewind_sqlite(backend: SqliteBackend, version: int) -> None:
    """Leave the (open) file as a server of schema ``version`` (3 or later) left it."""
    undo = "".join(sql for v, sql in sorted(_SQLITE_UNDO.items(), reverse=True) if v > version)
    backend.db.executescript(f"BEGIN; {undo} PRAGMA user_version = {version}; COMMIT;")


def sqlite_indexes(db: sqlite3.Connection) -> dict[str, str]:
    return dict(db.execute("SELECT name, sql FROM sqlite_master WHERE type = 'index'").fetchall())


@pytest.mark.parametrize("version", [3, 4])
def test_sqlite_file_is_migrated_to_current_and_the_indexes_serve_the_queries(
    tmp_path: Path, version: int
) -> None:
    fresh = SqliteBackend(tmp_path / "fresh" / "stackduck.db")
    fresh.open()
    current = sqlite_indexes(fresh.db)
    fresh.close()
    path = tmp_path / "stackduck.db"
    old = SqliteBackend(path)
    old.open()
    stale = running_job("r-1", NOW - 10, NOW - 5)
    old.commit(
        Batch([*DEAD, *UNDATED, make_job(1), make_job(2, status=Status.SCHEDULED), stale], ())
    )
    rewind_sqlite(old, version)
    assert "jobs_running" not in sqlite_indexes(old.db)
    old.close()
    backend = SqliteBackend(path)
    backend.open()
    try:
        assert backend.db.execute("PRAGMA user_version").fetchone() == (6,)
        assert sqlite_indexes(backend.db) == current  # the same schema as a new file
        assert backend.dead_ids(None, 100) == UNDATED_ORDER + DEAD_ORDER
        assert [j.id for j in backend.load_queued("", 10)[0]] == ["job-1", "job-2"]
        assert backend.stale_running(NOW, 10) == [stale]
        for sql, params, index in (
            (f"SELECT * {SqliteBackend._DEAD_ALL}", (-math.inf, -math.inf, "", 11), "jobs_dead "),
            (f"SELECT id {SqliteBackend._DEAD_ALL}", (T1, T1, "x", 11), "jobs_dead "),
            (f"SELECT * {SqliteBackend._DEAD_TYPE}", ("t", T1, T1, "x", 11), "jobs_dead_type"),
            (f"SELECT * {SqliteBackend._QUEUED}", ("", 11), "jobs_queued"),
        ):
            plan = str(backend.db.execute("EXPLAIN QUERY PLAN " + sql, params).fetchall())
            # a range search of the index, no sort
            assert "SEARCH jobs USING " in plan and index in plan, plan
            assert "TEMP B-TREE" not in plan, plan
        # the running rows in started_at order: a walk of the partial index, no sort
        plan = str(
            backend.db.execute(
                f"EXPLAIN QUERY PLAN SELECT * {SqliteBackend._STALE}", (NOW, 200)
            ).fetchall()
        )
        assert "USING INDEX jobs_running" in plan and "TEMP B-TREE" not in plan, plan
    finally:
        backend.close()


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


# What each PostgreSQL migration added after version 1, undone by rewind_pg_schema.
_PG_UNDO: dict[int, tuple[str, ...]] = {
    6: ("DROP TABLE {s}.type_limits", "DROP INDEX {s}.jobs_finished"),
    5: (
        "DROP INDEX {s}.jobs_ready, {s}.jobs_due, {s}.jobs_next_due, {s}.jobs_claims, "
        "{s}.jobs_running",
        "ALTER TABLE {s}.jobs DROP COLUMN claim_token, DROP COLUMN claim_owner, "
        "DROP COLUMN claim_until",
    ),
    4: ("DROP INDEX {s}.jobs_dead, {s}.jobs_dead_type, {s}.jobs_queued",),
    3: ("ALTER TABLE {s}.jobs DROP COLUMN idempotency_key",),  # and its index
    2: ("DROP TABLE {s}.paused_types",),
}
#: The indexes of migration 5, as tests expect them.
_MIGRATION_5_INDEXES = ("jobs_ready", "jobs_due", "jobs_next_due", "jobs_claims", "jobs_running")


def rewind_pg_schema(schema: str, version: int) -> None:
    """Leave ``schema`` as a server of schema ``version`` left it (its rows stay)."""
    with admin_connection() as admin:
        for undone in sorted(_PG_UNDO, reverse=True):
            if undone > version:
                for statement in _PG_UNDO[undone]:
                    admin.execute(statement.format(s=f'"{schema}"'))
        admin.execute(f'DELETE FROM "{schema}".schema_migrations WHERE version > %s', (version,))


def pg_shape(schema: str) -> tuple[list[tuple[object, ...]], dict[str, str]]:
    """The jobs table's columns (in order) and every index definition of ``schema``."""
    with admin_connection() as admin:
        columns = admin.execute(
            "SELECT attname, format_type(atttypid, atttypmod), attnotnull FROM pg_attribute "
            "WHERE attrelid = %s::regclass AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
            (f'"{schema}".jobs',),
        ).fetchall()
        indexes = admin.execute(
            "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = %s", (schema,)
        ).fetchall()
    return columns, {str(name): str(d).replace(schema, "<schema>") for name, d in indexes}


def fresh_pg_shape() -> tuple[list[tuple[object, ...]], dict[str, str]]:
    """The shape of a schema created by this version from nothing."""
    with private_schema() as fresh:
        b = PostgresBackend(SHARED_DATABASE_URL, schema=fresh)
        b.open()
        b.close()
        return pg_shape(fresh)


def migrated_versions(schema: str) -> list[int]:
    with admin_connection() as admin:
        rows = admin.execute(
            f'SELECT version FROM "{schema}".schema_migrations ORDER BY version'
        ).fetchall()
    return [int(str(r[0])) for r in rows]


def test_pg_migrates_a_version_1_schema_and_keeps_its_jobs(pg_schema: str) -> None:
    b = PostgresBackend(SHARED_DATABASE_URL, schema=pg_schema)
    b.open()
    b.commit(Batch([make_job(1), make_job(2)], ()))
    b.close()
    rewind_pg_schema(pg_schema, 1)  # back to what a version-1 server left behind
    assert migrated_versions(pg_schema) == [1]
    again = PostgresBackend(SHARED_DATABASE_URL, schema=pg_schema)
    again.open()
    try:
        assert again.load_active() == [make_job(1), make_job(2)]
        assert again.load_paused() == []
        again.set_paused("t", True)
        assert again.load_paused() == ["t"]
    finally:
        again.close()
    assert migrated_versions(pg_schema) == [1, 2, 3, 4, 5, 6] == list(range(1, SCHEMA_VERSION + 1))
    assert pg_shape(pg_schema) == fresh_pg_shape()


def test_pg_migrates_a_version_2_schema_to_current_and_keeps_its_jobs(pg_schema: str) -> None:
    b = PostgresBackend(SHARED_DATABASE_URL, schema=pg_schema)
    b.open()
    b.commit(Batch([make_job(1), make_job(2, status=Status.COMPLETED)], ()))
    b.set_paused("t", True)
    b.close()
    rewind_pg_schema(pg_schema, 2)  # back to what a version-2 server left behind
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
    assert migrated_versions(pg_schema) == [1, 2, 3, 4, 5, 6]
    assert pg_shape(pg_schema) == fresh_pg_shape()


def test_pg_indexes_serve_the_queries(pg_schema: str) -> None:
    b = PostgresBackend(SHARED_DATABASE_URL, schema=pg_schema)
    b.open()
    b.close()
    with admin_connection() as admin:
        admin.execute("SET enable_seqscan = off")  # tiny table: make the planner show its hand
        # the backend's own statements, so a drift between query and index predicate shows
        for query, index in ((b._q_active, "jobs_active"), (b._q_counts, "jobs_status")):
            plan = admin.execute(b"EXPLAIN " + query).fetchall()
            assert index in str(plan), plan
        plan = admin.execute(b"EXPLAIN " + b._q_get, ("x",)).fetchall()
        assert "jobs_pkey" in str(plan), plan
        plan = admin.execute(b"EXPLAIN " + b._q_find_key, ("x",)).fetchall()
        assert "jobs_idempotency_key" in str(plan), plan
        for query, index in (
            (b._q_prune_finished, "jobs_finished"),
            (b._q_prune_dead, "jobs_dead"),
        ):
            plan = admin.execute(b"EXPLAIN " + query, (1.0, 10)).fetchall()
            assert index in str(plan), plan


def test_pg_migrates_a_version_3_schema_to_current_and_keeps_its_jobs(pg_schema: str) -> None:
    b = PostgresBackend(SHARED_DATABASE_URL, schema=pg_schema)
    b.open()
    b.commit(Batch([*DEAD, *UNDATED, make_job(1), make_job(2, status=Status.COMPLETED)], ()))
    b.close()
    rewind_pg_schema(pg_schema, 3)  # back to what a version-3 server left behind
    again = PostgresBackend(SHARED_DATABASE_URL, schema=pg_schema)
    again.open()
    try:
        assert again.dead_ids(None, 100) == UNDATED_ORDER + DEAD_ORDER
        assert again.load_queued("", 10) == ([make_job(1)], "")
    finally:
        again.close()
    assert migrated_versions(pg_schema) == [1, 2, 3, 4, 5, 6]
    _, defs = shape = pg_shape(pg_schema)
    assert shape == fresh_pg_shape()
    # by the time of death (NULL as 0), dead rows only, ids by code point; never updated_at
    assert '(COALESCE(completed_at, (0)::double precision), id COLLATE "C")' in defs["jobs_dead"]
    assert "WHERE (status = 'failed'::text)" in defs["jobs_dead"]
    assert 'id COLLATE "C"' in defs["jobs_dead_type"]
    assert all("updated_at" not in d for d in defs.values())
    assert "jobs_queued" in defs


def test_pg_migrates_a_version_4_schema_to_5_and_keeps_its_jobs(pg_schema: str) -> None:
    b = PostgresBackend(SHARED_DATABASE_URL, schema=pg_schema)
    b.open()
    stale = running_job("r-1", NOW - 10, NOW - 5)
    jobs = [*DEAD, make_job(1), make_job(2, status=Status.SCHEDULED), stale]
    b.commit(Batch(jobs, ()))
    b.close()
    rewind_pg_schema(pg_schema, 4)  # back to what a version-4 server left behind
    columns, defs = pg_shape(pg_schema)
    assert not {"claim_token", "claim_owner", "claim_until"} & {c[0] for c in columns}
    assert not set(_MIGRATION_5_INDEXES) & set(defs)
    again = PostgresBackend(SHARED_DATABASE_URL, schema=pg_schema)
    again.open()
    try:
        assert {j.id: j for j in again.load_active()} == {
            j.id: j for j in jobs if j.status is not Status.COMPLETED
        }
        assert again.stale_running(NOW, 10) == [stale]
        assert again.dead_ids(None, 100) == DEAD_ORDER
    finally:
        again.close()
    assert migrated_versions(pg_schema) == [1, 2, 3, 4, 5, 6]
    columns, defs = shape = pg_shape(pg_schema)
    assert shape == fresh_pg_shape()
    assert columns[-3:] == [
        ("claim_token", "text", False),
        ("claim_owner", "text", False),
        ("claim_until", "double precision", False),
    ]
    unclaimed = "AND (claim_token IS NULL))"
    assert defs["jobs_ready"].endswith(
        "(job_type, priority, seq) WHERE ((status = 'queued'::text) " + unclaimed
    )
    assert defs["jobs_due"].endswith(
        "(job_type, scheduled_at) WHERE ((status = 'scheduled'::text) " + unclaimed
    )
    assert defs["jobs_next_due"].endswith(
        "(scheduled_at) WHERE ((status = 'scheduled'::text) " + unclaimed
    )
    assert defs["jobs_claims"].endswith(
        '(claim_until, id COLLATE "C") WHERE (claim_token IS NOT NULL)'
    )
    assert defs["jobs_running"].endswith(
        "(started_at NULLS FIRST, id COLLATE \"C\") WHERE ((status = 'running'::text) " + unclaimed
    )


def test_pg_heartbeat_updates_are_hot(pg_schema: str) -> None:
    """A lease extension (lease_expires_at, updated_at, version) is a HOT update.

    PostgreSQL rewrites a row in place, without new index entries, only when no index
    uses a changed column: in its keys, expressions, INCLUDE list or predicate.
    """
    b = PostgresBackend(SHARED_DATABASE_URL, schema=pg_schema)
    b.open()
    try:
        job = running_job("r-1", NOW, NOW + 30)
        b.commit(Batch([job], ()))
    finally:
        b.close()
    _, defs = pg_shape(pg_schema)
    for name, definition in defs.items():
        if " ON <schema>.jobs " not in definition:
            continue
        for column in ("lease_expires_at", "updated_at", "version"):
            assert column not in definition.split(" USING ", 1)[1], (name, definition)
    counters = (
        "SELECT pg_stat_get_xact_tuples_updated(%(t)s::regclass), "
        "pg_stat_get_xact_tuples_hot_updated(%(t)s::regclass)"
    )
    table = {"t": f'"{pg_schema}".jobs'}
    with admin_connection() as admin, admin.transaction():
        # the record store's own upsert, as the committer sends it for one heartbeat
        beat = attrs.evolve(job, lease_expires_at=NOW + 60, updated_at=NOW + 30, version=3)
        admin.execute(b._q_upsert, pg_row(beat))
        assert admin.execute(counters, table).fetchone() == (1, 1)
        # also while the row is claimed through the record store's queue tier
        admin.execute(
            f"UPDATE \"{pg_schema}\".jobs SET claim_token = 't', claim_owner = 'o', "
            "claim_until = 1 WHERE id = 'r-1'"
        )
        beat = attrs.evolve(beat, lease_expires_at=NOW + 90, updated_at=NOW + 60, version=4)
        admin.execute(b._q_upsert, pg_row(beat))
        assert admin.execute(counters, table).fetchone() == (3, 2)
        # a heartbeat as the core makes it: conditional on the lease (locked, then updated)
        beat = attrs.evolve(
            beat,
            lease_expires_at=NOW + 120,
            updated_at=NOW + 90,
            version=5,
            base=Base(Status.RUNNING, job.lease_id),
        )
        assert admin.execute(b._q_update, pg_update_params(pg_cas_row(beat))).rowcount == 1
        assert admin.execute(counters, table).fetchone() == (4, 3)
        # the counters can tell: the end of the delivery changes indexed columns
        done = attrs.evolve(beat, status=Status.COMPLETED, completed_at=NOW + 61, version=6)
        admin.execute(b._q_upsert, pg_row(done))
        assert admin.execute(counters, table).fetchone() == (5, 3)


@pytest.mark.parametrize(
    "n",
    [
        1,  # a lone upsert: one autocommit statement
        3,  # a pipelined executemany
        64,  # copy_threshold: COPY into the staging table, then the merge
        300,
    ],
)
@pytest.mark.parametrize("conditional", [False, True], ids=["upsert", "cas"])
def test_pg_record_upserts_leave_the_claim_columns_alone(
    pg_schema: str, n: int, conditional: bool
) -> None:
    """The queue tier's claim columns are not record columns: no record write touches them
    (upserts, and conditional updates, which a new row joins as an insert)."""
    b = PostgresBackend(SHARED_DATABASE_URL, schema=pg_schema)
    assert b.copy_threshold == 64
    b.open()
    try:
        jobs = [make_job(i) for i in range(n)]
        b.commit(Batch(jobs, ()))
        with admin_connection() as admin:
            claimed = admin.execute(
                f"UPDATE \"{pg_schema}\".jobs SET claim_token = 'token-' || id, "
                "claim_owner = 'instance-a', claim_until = seq + 0.5 "
                "WHERE claim_token IS NULL AND claim_owner IS NULL AND claim_until IS NULL"
            ).rowcount
        assert claimed == n  # new rows are unclaimed
        base = Base(Status.QUEUED, None) if conditional else None
        newer = [
            attrs.evolve(j, status=Status.RUNNING, attempt=1, started_at=NOW, version=2, base=base)
            for j in jobs
        ]
        new_row = make_job(10_000)
        # n rows, or with a new one (still on the same side of the COPY threshold)
        batch = newer if n in (1, 64) else [*newer, new_row]
        assert (len(batch) >= b.copy_threshold) == (n >= 64)
        b._staged.clear()  # forget the staging table: the COPY path notes it again
        assert b.commit(Batch(batch, ())) == frozenset()
        assert bool(b._staged) == (n >= 64)  # this commit took the COPY path (or did not)
        for job in batch:
            assert b.get(job.id) == job  # the record columns did change
        with admin_connection() as admin:
            rows = admin.execute(
                f'SELECT id, claim_token, claim_owner, claim_until FROM "{pg_schema}".jobs '
                "ORDER BY seq"
            ).fetchall()
        expected: list[tuple[object, ...]] = [
            (j.id, f"token-{j.id}", "instance-a", j.seq + 0.5) for j in jobs
        ]
        if new_row in batch:
            expected.append((new_row.id, None, None, None))  # inserted unclaimed (seq 10000)
        assert rows == expected
    finally:
        b.close()


def race(calls: dict[str, Callable[[], frozenset[str]]]) -> dict[str, frozenset[str]]:
    """Run ``calls`` in threads released together; their results (any error fails)."""
    barrier = threading.Barrier(len(calls))
    results: dict[str, frozenset[str]] = {}
    errors: list[BaseException] = []

    def run(name: str, call: Callable[[], frozenset[str]]) -> None:
        try:
            barrier.wait(timeout=10)
            results[name] = call()
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=item) for item in calls.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not errors, errors  # no deadlock, no error
    assert results.keys() == calls.keys()
    return results


@pytest.mark.parametrize("n", [1, 3, 64, 300])
def test_pg_concurrent_commits_from_one_base_apply_each_row_once(pg_schema: str, n: int) -> None:
    """Two instances (two backends on one schema) end the same deliveries at once.

    Each row gets a conditional record from one instance and, for half of the rows in a
    batch of several, an unconditional one of the same version from the other (the kinds
    swapped between them: without one lock order over both kinds they would deadlock).
    Exactly one of the two records of every row is written; the other is refused.
    """
    a = PostgresBackend(SHARED_DATABASE_URL, schema=pg_schema)
    b = PostgresBackend(SHARED_DATABASE_URL, schema=pg_schema)
    a.open()
    b.open()
    try:
        for attempt in range(6):
            rows = [delivery(i, id=f"r{attempt}-{i:03d}", lease=f"lease-{i}") for i in range(n)]
            assert a.commit(Batch(rows, ())) == frozenset()

            def outcome(row: Job, worker: str, cas: bool) -> Job:
                base = Base(Status.RUNNING, row.lease_id) if cas else None
                return finished(row, base, worker_id=worker)

            batches = {
                "a": [outcome(r, "a", n == 1 or i % 2 == 0) for i, r in enumerate(rows)],
                "b": [outcome(r, "b", n == 1 or i % 2 == 1) for i, r in enumerate(rows)][::-1],
            }
            refused = race(
                {
                    "a": functools.partial(a.commit, Batch(batches["a"], ())),
                    "b": functools.partial(b.commit, Batch(batches["b"], ())),
                }
            )
            ids = {r.id for r in rows}
            assert refused["a"] | refused["b"] == ids
            assert not refused["a"] & refused["b"]
            for row in rows:
                winner = "b" if row.id in refused["a"] else "a"
                stored = a.get(row.id)
                assert stored is not None and stored.worker_id == winner
                assert stored == next(j for j in batches[winner] if j.id == row.id)
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("n", [1, 3, 64])
@pytest.mark.parametrize("into_base", [True, False], ids=["into-base", "away-from-base"])
def test_pg_conditional_update_compares_what_a_concurrent_writer_commits(
    pg_schema: str, n: int, into_base: bool
) -> None:
    """A conditional update waits for a transaction writing its rows, then compares the rows
    it committed: the rows as they are when they are locked, not as the statement's
    snapshot saw them before.

    ``into-base``: the other transaction writes the very state the records were made from
    (as another instance's commit, in flight, of a record a queue tier handed over
    already): the records are then written. ``away-from-base``: it moves the rows away from
    it: refused.
    """
    b = PostgresBackend(SHARED_DATABASE_URL, schema=pg_schema)
    b.open()
    try:
        before = [make_job(i) if into_base else delivery(i) for i in range(n)]
        assert b.commit(Batch(before, ())) == frozenset()
        records = [finished(delivery(i), Base(Status.RUNNING, "lease-a")) for i in range(n)]
        with admin_connection() as admin:
            admin.execute("BEGIN")
            admin.execute(
                f'UPDATE "{pg_schema}".jobs SET status = %s, lease_id = %s, version = 2',
                ("running", "lease-a") if into_base else ("queued", None),
            )
            result: list[frozenset[str]] = []
            worker = threading.Thread(target=lambda: result.append(b.commit(Batch(records, ()))))
            worker.start()
            worker.join(0.5)
            assert worker.is_alive()  # waiting for the rows' lock
            admin.execute("COMMIT")
            worker.join(10)
        assert result == [frozenset() if into_base else {r.id for r in records}]
        for record in records:
            stored = b.get(record.id)
            assert stored is not None
            assert stored.status is (Status.COMPLETED if into_base else Status.QUEUED)
    finally:
        b.close()


def test_pg_stale_running_leaves_out_rows_claimed_through_the_record_store(
    pg_schema: str,
) -> None:
    b = PostgresBackend(SHARED_DATABASE_URL, schema=pg_schema)
    b.open()
    try:
        mine = running_job("r-unclaimed", NOW - 20, NOW - 10)
        tiers = running_job("r-claimed", NOW - 30, NOW - 10)
        b.commit(Batch([mine, tiers], ()))
        assert b.stale_running(NOW, 10) == [tiers, mine]
        with admin_connection() as admin:
            admin.execute(
                f"UPDATE \"{pg_schema}\".jobs SET claim_token = 't', claim_owner = 'o', "
                "claim_until = 1 WHERE id = 'r-claimed'"
            )
        assert b.stale_running(NOW, 10) == [mine]  # PostgresTier's reaper owns the other
    finally:
        b.close()


def explain(
    admin: psycopg.Connection[tuple[object, ...]], query: sql.Composable | bytes, params: Any = None
) -> str:
    text = query if isinstance(query, bytes) else query.as_bytes(admin)
    return "\n".join(str(row[0]) for row in admin.execute(b"EXPLAIN " + text, params))


@contextlib.contextmanager
def ordered_index_plans(admin: psycopg.Connection[tuple[object, ...]]) -> Iterator[None]:
    """Plans without Seq Scans, bitmap scans or sorts: only an ordered index scan is left.

    On a small table the planner may well prefer a bitmap scan of any index and a sort;
    with those ruled out, an index whose predicate or order does not fit the query shows
    as a Sort or Seq Scan node (the settings only add cost, they forbid nothing).
    """
    settings = ("enable_seqscan", "enable_bitmapscan", "enable_sort")
    for name in settings:
        admin.execute(f"SET {name} = off")
    try:
        yield
    finally:
        for name in settings:
            admin.execute(f"RESET {name}")


def assert_index_plan(plan: str, *indexes: str, ordered: bool = False) -> None:
    for index in indexes:
        assert f"Scan using {index} on jobs" in plan or f"Scan on {index}" in plan, plan
    assert "Seq Scan" not in plan, plan
    if ordered:
        assert "Sort" not in plan and "Bitmap" not in plan, plan


def test_pg_dead_letter_and_waiting_reads_use_their_indexes(pg_schema: str) -> None:
    """EXPLAIN of the backend's own statements on 5000 rows, after ANALYZE.

    With the planner left free: an index, never the whole table. With bitmap scans and
    sorts ruled out: the named index, read in order (its predicate and order fit).
    """
    b = PostgresBackend(SHARED_DATABASE_URL, schema=pg_schema)
    b.open()
    try:
        statuses = [Status.COMPLETED] * 14 + [Status.FAILED] * 3 + [Status.QUEUED, Status.RUNNING]
        jobs = [
            make_job(
                n,
                status=statuses[n % len(statuses)],
                job_type=f"type{n % 5}",
                completed_at=None if n % 97 == 0 else NOW + (n * 7919 % 5000) / 10,
            )
            for n in range(5000)
        ]
        b.commit(Batch(jobs, ()))
        # a page from the middle, for the keyset condition to be a real range
        _, token = b.list_dead(None, "", 100)
        _, type_token = b.list_dead("type3", "", 20)
        assert token and type_token
    finally:
        b.close()
    page_start = (-math.inf, "")
    at, _, after = token.partition("/")
    middle = (float.fromhex(at), after)
    type_at, _, type_after = type_token.partition("/")
    type_middle = (float.fromhex(type_at), type_after)
    with admin_connection() as admin:
        admin.execute(f'ANALYZE "{pg_schema}".jobs')
        cases: list[tuple[sql.Composable, tuple[object, ...], str]] = [
            (b._q_dead, (*page_start, 51), "jobs_dead"),
            (b._q_dead, (*middle, 51), "jobs_dead"),
            (b._q_dead_type, ("type3", *page_start, 51), "jobs_dead_type"),
            (b._q_dead_type, ("type3", *type_middle, 51), "jobs_dead_type"),
            (b._q_dead_ids, (*page_start, 100), "jobs_dead"),
            (b._q_dead_ids_type, ("type1", *page_start, 100), "jobs_dead_type"),
            (b._q_queued, ("", 101), "jobs_queued"),
            (b._q_queued, ("job-2500", 101), "jobs_queued"),
        ]
        for query, params, _index in cases:
            assert_index_plan(explain(admin, query, params))
        with ordered_index_plans(admin):
            for query, params, index in cases:
                plan = explain(admin, query, params)
                assert_index_plan(plan, index, ordered=True)
                assert "Index Cond" in plan, plan  # the keyset start is a range of the index
            # dead_ids reads the index alone (INCLUDE (completed_at) makes that possible)
            for query, params, _index in cases[4:6]:
                assert "Index Only Scan" in explain(admin, query, params)
        plan = explain(admin, b._q_load_running, (["job-1", "job-2", "job-x"],))
        assert_index_plan(plan, "jobs_pkey")


def claim_params(job_type: str) -> dict[str, object]:
    return {
        "type": job_type,
        "limit": 10,
        "now": NOW,
        "owner": "instance-a",
        "token": "token-1",
        "until": NOW + 30,
    }


@pytest.fixture
def tier_rows(pg_schema: str) -> Iterator[tuple[PostgresBackend, PostgresTier]]:
    """5000 rows, a few of them claimed through the record store's tier, analyzed."""
    b = PostgresBackend(SHARED_DATABASE_URL, schema=pg_schema)
    b.open()
    try:
        statuses = (
            [Status.COMPLETED] * 40
            + [Status.FAILED] * 4
            + [Status.QUEUED] * 2
            + [Status.SCHEDULED] * 2
            + [Status.RUNNING]
        )
        jobs: list[Job] = []
        for n in range(5000):
            status = statuses[n % len(statuses)]
            spread = (n * 7919 % 5000) / 10
            jobs.append(
                make_job(
                    n,
                    status=status,
                    job_type=f"type{n % 5}",
                    priority=1 + n % 3,
                    scheduled_at=NOW - 250 + spread,
                    started_at=NOW - spread if status is Status.RUNNING else None,
                    lease_expires_at=NOW - 35 + n % 7 * 10 if status is Status.RUNNING else None,
                    completed_at=NOW + spread if status is Status.COMPLETED else None,
                )
            )
        b.commit(Batch(jobs, ()))
        with admin_connection() as admin:
            admin.execute(
                f"UPDATE \"{pg_schema}\".jobs SET claim_token = md5(id), claim_owner = 'o', "
                "claim_until = %s + seq %% 97 "
                "WHERE status IN ('queued', 'scheduled', 'running') AND seq %% 10 < 3",
                (NOW,),
            )
            admin.execute(f'ANALYZE "{pg_schema}".jobs')
        yield b, PostgresTier(b)
    finally:
        b.close()


def test_pg_stale_running_and_the_tier_reads_use_their_indexes(
    tier_rows: tuple[PostgresBackend, PostgresTier],
) -> None:
    """EXPLAIN of stale_running and PostgresTier's queries on 5000 rows, after ANALYZE."""
    b, tier = tier_rows
    cases: list[tuple[sql.Composable, object, str]] = [
        (b._q_stale, (NOW - 30, 200), "jobs_running"),
        (b._q_stale, (NOW - 30, 10), "jobs_running"),
        (tier._q_next_due, None, "jobs_next_due"),
        (tier._q_expired, (NOW + 20, 100), "jobs_claims"),
    ]
    with admin_connection() as admin:
        for query, params, _index in cases:
            assert_index_plan(explain(admin, query, params))
        # the sweeper's page of a table this size: the index, in order, without a sort
        assert_index_plan(explain(admin, b._q_stale, (NOW - 30, 10)), "jobs_running", ordered=True)
        assert_index_plan(explain(admin, tier._q_next_due), "jobs_next_due", ordered=True)
        with ordered_index_plans(admin):
            for query, params, index in cases:
                assert_index_plan(explain(admin, query, params), index, ordered=True)


def test_pg_tier_claim_uses_the_ready_and_due_indexes(
    tier_rows: tuple[PostgresBackend, PostgresTier],
) -> None:
    _b, tier = tier_rows
    with admin_connection() as admin:
        plan = explain(admin, tier._q_claim, claim_params("type3"))
        assert_index_plan(plan, "jobs_ready", "jobs_due", "jobs_pkey")
        with ordered_index_plans(admin):
            # each arm reads its index in claim order (the final pick of at most twice
            # `limit` candidates is a small sort of its own)
            plan = explain(admin, tier._q_claim, claim_params("type3"))
            assert "Index Scan using jobs_ready on jobs" in plan, plan
            assert "Index Scan using jobs_due on jobs" in plan, plan
            assert "Seq Scan" not in plan, plan


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


def test_waiting_counts_per_type(backend: Backend) -> None:
    backend.commit(
        Batch(
            [
                make_job(1, status=Status.SCHEDULED, scheduled_at=NOW + 60),
                make_job(2, status=Status.SCHEDULED, scheduled_at=NOW + 60, job_type="u"),
                make_job(3, status=Status.FAILED, completed_at=NOW),
                make_job(4, status=Status.FAILED, completed_at=NOW),
                make_job(5),
                make_job(6, status=Status.COMPLETED, completed_at=NOW),
            ],
            (),
        )
    )
    assert backend.waiting_counts() == {"t": (1, 2), "u": (1, 0)}


def test_pg_checks_a_pooled_connection_only_after_it_was_idle(
    pg_schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from psycopg_pool import ConnectionPool

    from stackduck_trio import _postgres

    checks: list[object] = []
    real = ConnectionPool.check_connection

    def counting(conn: psycopg.Connection[Any]) -> None:
        checks.append(conn)
        real(conn)

    monkeypatch.setattr(ConnectionPool, "check_connection", staticmethod(counting))
    b = PostgresBackend(SHARED_DATABASE_URL, schema=pg_schema, pool_min=1, pool_max=1)
    b.open()
    try:
        b.commit(Batch([make_job(0)], ()))
        fresh = len(checks)
        assert fresh <= 1  # a connection that never answered a statement is checked
        for n in range(1, 11):  # in use: no extra round trip per commit
            b.commit(Batch([make_job(n)], ()))
        assert b.load_running([]) == []
        assert len(checks) == fresh
        monkeypatch.setattr(_postgres, "CHECK_AFTER_IDLE", 0.0)  # as if idle for long
        b.commit(Batch([make_job(11)], ()))
        assert len(checks) == fresh + 1
        # a connection a restart broke while idle is replaced, not used
        monkeypatch.setattr(_postgres, "CHECK_AFTER_IDLE", 1.0)
        with admin_connection() as admin:
            killed = admin.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE pid <> pg_backend_pid() AND query LIKE %s",
                (f"%{pg_schema}%",),
            ).fetchone()
        assert killed == (1,)
        monkeypatch.setattr(_postgres, "CHECK_AFTER_IDLE", 0.0)
        b.commit(Batch([make_job(12)], ()))
        assert b.counts() == {"queued": 13}
    finally:
        b.close()


def test_pg_statements_are_rendered_once() -> None:
    """psycopg would render a composed statement at every execute (half a commit's CPU)."""
    backend = PostgresBackend(SHARED_DATABASE_URL, schema="stackduck_render_check")
    tier = PostgresTier(backend)
    for owner in (backend, tier):
        queries = {k: v for k, v in vars(owner).items() if k.startswith("_q_")}
        assert len(queries) >= 10
        assert all(isinstance(v, bytes) for v in queries.values()), queries
    assert b'"stackduck_render_check"."jobs"' in backend._q_upsert
