"""The record store: every job row and every state change; the truth.

Two pieces:

* a *backend* does blocking I/O in a worker thread: :class:`SqliteBackend`
  (the embedded default) or :class:`MemoryBackend` (nothing persisted, for
  tests and throw-away servers); PostgreSQL joins them later with the same
  methods. Besides job rows a backend keeps the paused job types
  (:meth:`Backend.set_paused`, :meth:`Backend.load_paused`), so a pause
  survives a restart;
* :class:`GroupCommitter`, the single writer: requests append their changed
  records synchronously (so the order of writes is the order of the core's
  decisions), and one task commits everything pending as one transaction,
  then wakes every request of that batch. While a batch commits the next one
  gathers, so a thousand concurrent acks cost a handful of fsyncs.

A failed batch is never dropped: it is retried, with the backoff the core's
health machine decides, until it commits (ARCHITECTURE §4: acks are
buffered and retried). Requests waiting on it may give up (they answer
UNAVAILABLE), but their writes stay in line.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import logging
import math
import pathlib
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import IO, Any, Final, Protocol, TypeVar

import attrs
import outcome
import trio

from stackduck_core import (
    Job,
    RateLimit,
    Status,
    TypeLimit,
    merge_chain,
    plan_commit,
    writes_over,
)
from stackduck_core._failover import (
    BackendHealth,
    Health,
    HealthChanged,
    HealthEvent,
    OpFailed,
    OpSucceeded,
    ProbeFailed,
    ProbeSucceeded,
    ReconcileFinished,
    StartReconcile,
)

log = logging.getLogger("stackduck.store")
T = TypeVar("T")

_COLUMNS: Final = (
    "id",
    "job_type",
    "payload",
    "status",
    "priority",
    "max_retries",
    "delay",
    "scheduled_at",
    "created_at",
    "updated_at",
    "retry_count",
    "error_message",
    "started_at",
    "completed_at",
    "seq",
    "attempt",
    "lost_leases",
    "lease_id",
    "lease_expires_at",
    "worker_id",
    "version",
    "idempotency_key",
)
#: Statuses the queue tier must hold after a restart.
ACTIVE_STATUSES: Final = (Status.SCHEDULED, Status.QUEUED, Status.RUNNING, Status.FAILED)
#: Statuses of the jobs re-pushed into a queue tier that restarted empty (:meth:`Backend.load_queued`).
WAITING_STATUSES: Final = (Status.QUEUED, Status.SCHEDULED)
#: Most ids in one SQLite ``IN (...)`` (the default host-parameter limit was 999).
_SQLITE_CHUNK: Final = 500
_BAD_TOKEN: Final = "not a page token from this server"


class StorageUnavailable(Exception):
    """The backend could not be reached or refused the operation."""


def job_to_row(job: Job) -> tuple[object, ...]:
    """The SQL row of a job, in :data:`_COLUMNS` order."""
    return tuple(job.status.value if name == "status" else getattr(job, name) for name in _COLUMNS)


def row_to_job(row: Sequence[object]) -> Job:
    """Rebuild a :class:`Job` from a row in :data:`_COLUMNS` order."""
    fields = dict(zip(_COLUMNS, row, strict=True))
    fields["status"] = Status(fields["status"])
    return Job(**fields)  # type: ignore[arg-type]


def _check_limit(limit: int) -> None:
    if limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")


def _plain_text(text: str) -> bool:
    """Whether every store can compare ``text``: no NUL, valid UTF-8 (no lone surrogate)."""
    if "\x00" in text:
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def died_at(job: Job) -> float:
    """When a dead-lettered job died: its ``completed_at``, or ``0.0`` if it has none.

    The core sets ``completed_at`` to the moment of death (``_fail``,
    ``_lose_lease``) and nothing changes it while the job stays dead. A failed
    row without one (written by hand, or by an old version) counts as dead
    since ``0.0``, the Unix epoch: it is listed first, and it still gets a
    page token. The stores order by the same expression,
    ``coalesce(completed_at, 0)``, which their indexes hold.
    """
    return 0.0 if job.completed_at is None else float(job.completed_at)


def dead_page_token(job: Job) -> str:
    """The page token that resumes the dead-letter order right after ``job``.

    The token is ``<died_at>/<id>`` (see :func:`died_at`: ``completed_at``,
    ``0.0`` when it is NULL). ``float.hex`` spells the time exactly (a decimal
    rendering could round it and skip or repeat a row at a page boundary);
    the id breaks ties.
    """
    return f"{died_at(job).hex()}/{job.id}"


def parse_dead_page_token(token: str) -> tuple[float, str]:
    """The ``(died_at, id)`` a dead-letter page starts after (see :func:`died_at`).

    ``""`` is the start: ``(-inf, "")``, before every row (ids are never
    empty, and a NULL ``completed_at`` counts as ``0.0``). Only the exact
    spelling :func:`dead_page_token` produces is accepted.

    Raises:
        ValueError: ``token`` was not made by :func:`dead_page_token`.
    """
    if token == "":
        return -math.inf, ""
    head, sep, job_id = token.partition("/")
    try:
        dead_since = float.fromhex(head)
    except (ValueError, OverflowError):
        raise ValueError(_BAD_TOKEN) from None
    if (
        not sep
        or not job_id
        or not math.isfinite(dead_since)
        or dead_since.hex() != head  # canonical only: " 0x1p+0", "0x1.0p0" are not ours
        or not _plain_text(job_id)
    ):
        raise ValueError(_BAD_TOKEN)
    return dead_since, job_id


def parse_id_token(token: str) -> str:
    """The id a :meth:`Backend.load_queued` page starts after (``""``: the start).

    Raises:
        ValueError: ``token`` cannot be an id (a NUL, a lone surrogate).
    """
    if not _plain_text(token):
        raise ValueError(_BAD_TOKEN)
    return token


@attrs.frozen
class Batch:
    """What one transaction writes: upserts, then deletes (see :meth:`Backend.commit`).

    Each upsert is written under a rule its ``base`` decides:

    * ``base is None`` (a new job, or a record written unconditionally: a
      restore, a test): inserted if the row is absent, else written only over
      an older version (``row.version < job.version``);
    * ``base`` set (a record made by a transition): compare-and-set, written
      only over a row that still has the base's status and lease and an older
      version (``row.status == base.status``, ``row.lease_id IS NOT DISTINCT
      FROM base.lease_id``, ``row.version < job.version``); never inserted (a
      missing row was purged meanwhile).

    An upsert not written is *refused*, which is no error. Deletes are
    unconditional and apply after the upserts. The committer sends at most one
    record per id; should a batch hold several, the newest version (the later
    of equal ones) is written with the *first* one's base, as the committer
    merges a chain of records (:func:`stackduck_core.merge_chain`); the rule
    itself is :func:`stackduck_core.writes_over`.
    """

    upserts: Sequence[Job]
    deletes: Sequence[str]


#: The core's write rules, under the names the backends use.
merge_upserts = merge_chain
applies = writes_over


class Backend(Protocol):
    """Blocking record-store operations, called from a worker thread."""

    kind: str

    def open(self) -> None: ...
    def close(self) -> None: ...
    def commit(self, batch: Batch) -> frozenset[str]:
        """Write ``batch`` in one transaction; return the ids of the refused upserts.

        Each upsert follows its rule (see :class:`Batch`): with ``base is
        None`` it is inserted, or written over an older version of the row;
        with a ``base`` it is written only over an existing row that still has
        ``base.status`` and ``base.lease_id`` (NULL matching NULL) and an
        older version -- compare-and-set, so two instances racing on one job,
        or a stale copy of a job coming back from a queue tier, can never both
        apply an outcome; a missing row is never inserted. An upsert not
        written is refused: its id is in the result (refusals are no error).
        Deletes are unconditional and apply after the upserts.

        All or nothing: on an error nothing is written and
        :class:`StorageUnavailable` is raised. Retrying a batch writes nothing
        twice, but a batch retried after an unknown outcome (PostgreSQL: the
        connection lost during ``COMMIT``) that had in fact committed reports
        its records as refused (a record is not newer than itself). An empty
        batch still reaches the store (the committer's health probe).
        """
        ...

    def load_active(self) -> list[Job]: ...
    def get(self, job_id: str) -> Job | None: ...
    def find_key(self, key: str) -> Job | None:
        """The (oldest) job enqueued with idempotency ``key``, if any."""
        ...

    def counts(self) -> dict[str, int]: ...
    def waiting_counts(self) -> dict[str, tuple[int, int]]:
        """Per job type, ``(scheduled, dead)`` rows: what a cluster's stats
        cannot get from the queue tier (cheap: only those rows are counted)."""
        ...

    def set_paused(self, job_type: str, paused: bool) -> None:
        """Record that ``job_type`` is (or is no longer) paused; idempotent."""
        ...

    def load_paused(self) -> list[str]:
        """The paused job types, sorted."""
        ...

    def set_limit(self, job_type: str, limit: TypeLimit | None) -> None:
        """Record (or with None, remove) the rate/concurrency limits of a type."""
        ...

    def load_limits(self) -> dict[str, TypeLimit]:
        """The stored limits, by job type."""
        ...

    def prune_finished(self, before: float, limit: int) -> int:
        """Delete up to ``limit`` completed or cancelled rows that ended before
        ``before`` (oldest first); returns how many were deleted."""
        ...

    def prune_dead(self, before: float, limit: int) -> int:
        """Delete up to ``limit`` dead-lettered rows that died before ``before``
        (oldest first); returns how many were deleted."""
        ...

    def list_dead(self, job_type: str | None, after: str, limit: int) -> tuple[list[Job], str]:
        """One page of dead-lettered jobs (status ``failed``), in the order they died.

        The order is ``(completed_at, id)``, both ascending: the core sets the
        ``completed_at`` of a failed row to the moment it died, and nothing
        changes it while the job stays dead. A failed row whose
        ``completed_at`` is NULL (written by hand, or by an old version) counts
        as dead since ``0.0`` and comes first (:func:`died_at`). Not
        ``updated_at``: it is not the time of death in general, and PostgreSQL
        could not update a row in place (HOT) on a lease-extension heartbeat
        if an index held it. Pages are keyset-paginated, so
        every instance sharing the store sees the same list, a job requeued
        between two pages simply does not appear on the later ones, and a job
        dead-lettered meanwhile appears at the end.

        Args:
            job_type: only jobs of this type, or every type when ``None``.
            after: ``""`` for the first page, else the token a previous call
                returned (opaque to callers; see :func:`dead_page_token`).
            limit: most jobs on the page (>= 1).

        Returns:
            The page and the token of the next page: ``""`` when no dead job
            follows this page (at the time of the call).

        Raises:
            ValueError: ``after`` is not a page token from this server, or
                ``limit < 1``.
        """
        ...

    def dead_ids(self, job_type: str | None, limit: int) -> list[str]:
        """Ids of the first ``limit`` (>= 1) dead jobs, in :meth:`list_dead` order.

        For bulk requeue and purge (of one ``job_type``, or of every type when
        ``None``).
        """
        ...

    def load_queued(self, after: str, limit: int) -> tuple[list[Job], str]:
        """One page of the jobs a queue tier must hold: status queued or scheduled.

        Keyset-paginated by id (in code-point order); used to re-push a queue
        tier that restarted empty. ``after`` is ``""`` for the first page, else
        the token a previous call returned (the page's last id). Returns the
        page and the next token, ``""`` when no such job follows this page.

        Raises:
            ValueError: ``after`` cannot be an id, or ``limit < 1``.
        """
        ...

    def load_running(self, job_ids: Sequence[str]) -> list[Job]:
        """The current records of ``job_ids``, whatever their status.

        The batched :meth:`get`, for a reaper that must see the truth of jobs
        claimed by a dead instance. Records come in the order of ``job_ids``
        (each once); ids with no record are left out.
        """
        ...

    def stale_running(self, before: float, limit: int) -> list[Job]:
        """Running jobs whose lease ran out on record before ``before``.

        For the sweeper, which requeues deliveries nobody manages any more:
        rows with status ``running`` whose ``lease_expires_at`` is earlier
        than ``before`` (strictly) or NULL, oldest ``started_at`` first (a
        NULL ``started_at`` first of all), then by id (code point order); at
        most ``limit`` (>= 1). On PostgreSQL, rows claimed through the record
        store's own queue tier (``claim_token`` set) are left out: that
        tier's reaper owns them.

        Called every few seconds: each store scans an index of the running
        rows in ``started_at`` order and filters on ``lease_expires_at``
        (never indexed, so a heartbeat that extends a lease stays a cheap
        in-place update).

        Raises:
            ValueError: ``limit < 1``.
        """
        ...


class SqliteBackend:
    """SQLite in WAL mode, one connection used by one thread at a time.

    ``synchronous=FULL`` (the default) makes a committed batch survive an OS
    crash too; ``NORMAL`` survives process crashes (``kill -9``) only, for
    speed. The schema is versioned with ``PRAGMA user_version``: version 1
    is the jobs table, version 2 adds ``paused_types``, version 3 the
    ``idempotency_key`` column, version 4 the indexes of the dead-letter list
    and of :meth:`load_queued`, version 5 the index of :meth:`stale_running`;
    an older file is migrated when it is opened.
    """

    kind = "sqlite"
    SCHEMA_VERSION: Final = 6

    def __init__(self, path: pathlib.Path | str, *, synchronous: str = "FULL") -> None:
        self.path = str(path)
        self.synchronous = synchronous.upper()
        if self.synchronous not in ("FULL", "NORMAL", "EXTRA", "OFF"):
            raise ValueError(f"unknown synchronous mode {synchronous!r}")
        self._db: sqlite3.Connection | None = None
        self._lock: IO[str] | None = None

    @property
    def db(self) -> sqlite3.Connection:
        if self._db is None:
            raise StorageUnavailable("the SQLite store is not open")
        return self._db

    def open(self) -> None:
        if self.path != ":memory:":
            directory = pathlib.Path(self.path).parent
            directory.mkdir(parents=True, exist_ok=True)
            self._lock_directory(directory)
        try:
            self._open_database()
        except sqlite3.Error as exc:
            self.close()  # give the directory lock back
            raise StorageUnavailable(f"cannot open {self.path}: {exc}") from exc
        except Exception:
            self.close()
            raise

    def _open_database(self) -> None:
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(f"PRAGMA synchronous={self.synchronous}")
        db.execute("PRAGMA busy_timeout=5000")
        (version,) = db.execute("PRAGMA user_version").fetchone()
        if version > self.SCHEMA_VERSION:
            db.close()
            raise StorageUnavailable(
                f"{self.path} has schema version {version}, newer than this server "
                f"({self.SCHEMA_VERSION}); upgrade Stackduck"
            )
        try:
            self._migrate(db, version)
        except BaseException:
            db.close()  # also rolls back a half-applied migration
            raise
        self._db = db

    @staticmethod
    def _migrate(db: sqlite3.Connection, version: int) -> None:
        """Bring a database at schema ``version`` to :attr:`SCHEMA_VERSION`.

        Each step is one transaction that also sets ``user_version``, so a
        crash mid-way leaves the file at the previous version, to be
        migrated again on the next open. Never edit a released step.
        """
        if version < 1:
            db.executescript(
                """
                BEGIN;
                CREATE TABLE IF NOT EXISTS jobs (
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
                -- restart rebuilds the queue from the active rows only
                CREATE INDEX IF NOT EXISTS jobs_active ON jobs (status)
                    WHERE status IN ('scheduled', 'queued', 'running', 'failed');
                PRAGMA user_version = 1;
                COMMIT;
                """
            )
        if version < 2:
            db.executescript(
                """
                BEGIN;
                CREATE TABLE IF NOT EXISTS paused_types (
                    job_type TEXT PRIMARY KEY,
                    paused_at REAL
                );
                PRAGMA user_version = 2;
                COMMIT;
                """
            )
        if version < 3:
            # Not a unique index: a constraint violation inside a group-committed
            # batch would fail the whole batch forever; the broker dedupes keys
            # before it writes.
            db.executescript(
                """
                BEGIN;
                ALTER TABLE jobs ADD COLUMN idempotency_key TEXT;
                CREATE INDEX IF NOT EXISTS jobs_idempotency_key ON jobs (idempotency_key)
                    WHERE idempotency_key IS NOT NULL;
                PRAGMA user_version = 3;
                COMMIT;
                """
            )
        if version < 4:
            # list_dead/dead_ids, all types and one type (partial: only dead rows),
            # by the time of death: the expression is _DEAD_AT, spelled the same
            # in the queries (SQLite matches index expressions as written);
            # load_queued, in id order without reading finished rows.
            db.executescript(
                """
                BEGIN;
                CREATE INDEX IF NOT EXISTS jobs_dead ON jobs (coalesce(completed_at, 0.0), id)
                    WHERE status = 'failed';
                CREATE INDEX IF NOT EXISTS jobs_dead_type
                    ON jobs (job_type, coalesce(completed_at, 0.0), id)
                    WHERE status = 'failed';
                CREATE INDEX IF NOT EXISTS jobs_queued ON jobs (id)
                    WHERE status IN ('queued', 'scheduled');
                PRAGMA user_version = 4;
                COMMIT;
                """
            )
        if version < 5:
            # stale_running: the running rows in started_at order (the sweeper
            # filters on lease_expires_at, which no index holds).
            db.executescript(
                """
                BEGIN;
                CREATE INDEX IF NOT EXISTS jobs_running ON jobs (started_at, id)
                    WHERE status = 'running';
                PRAGMA user_version = 5;
                COMMIT;
                """
            )
        if version < 6:
            # Limits per job type; retention prunes finished rows by end time.
            db.executescript(
                """
                BEGIN;
                CREATE TABLE IF NOT EXISTS type_limits (
                    job_type TEXT PRIMARY KEY,
                    rate REAL,
                    burst INTEGER,
                    max_running INTEGER,
                    updated_at REAL
                );
                CREATE INDEX IF NOT EXISTS jobs_finished ON jobs (completed_at)
                    WHERE status IN ('completed', 'cancelled');
                PRAGMA user_version = 6;
                COMMIT;
                """
            )

    def _lock_directory(self, directory: pathlib.Path) -> None:
        # Two servers on one data directory would both restore and deliver the
        # same jobs: the second one must refuse to start. The lock dies with
        # the process, so a kill -9 leaves nothing stale behind.
        lock = open(directory / "lock", "a+")  # noqa: SIM115 - held until close()
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            raise StorageUnavailable(
                f"{directory} is in use by another Stackduck server (its lock file is held)"
            ) from None
        self._lock = lock

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
        if self._lock is not None:
            self._lock.close()  # releases the flock
            self._lock = None

    _UPSERT: Final = (
        f"INSERT INTO jobs ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))}) "
        "ON CONFLICT(id) DO UPDATE SET "
        + ", ".join(f"{c} = excluded.{c}" for c in _COLUMNS[1:])
        # a late write of an older version never overwrites a newer one
        + " WHERE excluded.version > jobs.version"
    )

    # A record with a base: compare-and-set (IS: NULL matches NULL); never an insert.
    _UPDATE_IF: Final = (
        "UPDATE jobs SET "
        + ", ".join(f"{c} = ?" for c in _COLUMNS[1:])
        + " WHERE id = ? AND status = ? AND lease_id IS ? AND version < ?"
    )
    _VERSION: Final = _COLUMNS.index("version")

    def commit(self, batch: Batch) -> frozenset[str]:
        """Write one batch in one transaction; the ids of refused upserts (``Backend.commit``).

        One statement per record, so that its ``rowcount`` tells whether it
        was written (``executemany`` only sums them); in SQLite that costs no
        more than ``executemany``.
        """
        db = self.db
        refused: list[str] = []
        try:
            db.execute("BEGIN IMMEDIATE")
            execute = db.execute
            for job in merge_upserts(batch.upserts).values():
                row = job_to_row(job)
                base = job.base
                if base is None:
                    written = execute(self._UPSERT, row).rowcount
                else:
                    written = execute(
                        self._UPDATE_IF,
                        (*row[1:], job.id, base.status.value, base.lease_id, row[self._VERSION]),
                    ).rowcount
                if written != 1:
                    refused.append(job.id)
            if batch.deletes:
                db.executemany("DELETE FROM jobs WHERE id = ?", [(i,) for i in batch.deletes])
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            # Also after a failed COMMIT (BUSY, FULL, IOERR): SQLite may leave the
            # transaction open, and every later BEGIN would fail until restart.
            if db.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
            raise StorageUnavailable(f"SQLite commit failed: {exc}") from exc
        return frozenset(refused)

    def _read(self, sql: str, params: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
        try:
            return self.db.execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            raise StorageUnavailable(f"SQLite read failed: {exc}") from exc

    def load_active(self) -> list[Job]:
        rows = self._read(
            f"SELECT {', '.join(_COLUMNS)} FROM jobs "
            "WHERE status IN ('scheduled', 'queued', 'running', 'failed') ORDER BY seq, created_at"
        )
        return [row_to_job(row) for row in rows]

    def get(self, job_id: str) -> Job | None:
        rows = self._read(f"SELECT {', '.join(_COLUMNS)} FROM jobs WHERE id = ?", (job_id,))
        return row_to_job(rows[0]) if rows else None

    def find_key(self, key: str) -> Job | None:
        rows = self._read(
            f"SELECT {', '.join(_COLUMNS)} FROM jobs WHERE idempotency_key = ? "
            "ORDER BY created_at, id LIMIT 1",
            (key,),
        )
        return row_to_job(rows[0]) if rows else None

    def counts(self) -> dict[str, int]:
        return {
            str(status): int(n)  # type: ignore[call-overload]
            for status, n in self._read("SELECT status, count(*) FROM jobs GROUP BY status")
        }

    def waiting_counts(self) -> dict[str, tuple[int, int]]:
        out: dict[str, tuple[int, int]] = {}
        rows = self._read(
            "SELECT job_type, status, count(*) FROM jobs "
            "WHERE status IN ('scheduled', 'failed') GROUP BY job_type, status"
        )
        for job_type, status, n in rows:
            scheduled, dead = out.get(str(job_type), (0, 0))
            count = int(n)  # type: ignore[call-overload]
            if status == "scheduled":
                scheduled += count
            else:
                dead += count
            out[str(job_type)] = (scheduled, dead)
        return out

    def set_paused(self, job_type: str, paused: bool) -> None:
        db = self.db
        try:
            if paused:
                # Keep the first pause's time: pausing twice changes nothing.
                db.execute(
                    "INSERT INTO paused_types (job_type, paused_at) VALUES (?, ?) "
                    "ON CONFLICT(job_type) DO NOTHING",
                    (job_type, time.time()),
                )
            else:
                db.execute("DELETE FROM paused_types WHERE job_type = ?", (job_type,))
        except sqlite3.Error as exc:
            if db.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
            raise StorageUnavailable(f"SQLite write failed: {exc}") from exc

    def load_paused(self) -> list[str]:
        return [
            str(t) for (t,) in self._read("SELECT job_type FROM paused_types ORDER BY job_type")
        ]

    def _write(self, statement: str, params: tuple[object, ...]) -> int:
        """One autocommit statement of the writer; returns the rows it changed."""
        db = self.db
        try:
            return db.execute(statement, params).rowcount
        except sqlite3.Error as exc:
            if db.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
            raise StorageUnavailable(f"SQLite write failed: {exc}") from exc

    def set_limit(self, job_type: str, limit: TypeLimit | None) -> None:
        if limit is None:
            self._write("DELETE FROM type_limits WHERE job_type = ?", (job_type,))
            return
        rate, burst, max_running = limit_columns(limit)
        self._write(
            "INSERT INTO type_limits (job_type, rate, burst, max_running, updated_at) "
            "VALUES (?, ?, ?, ?, ?) ON CONFLICT(job_type) DO UPDATE SET rate = excluded.rate, "
            "burst = excluded.burst, max_running = excluded.max_running, "
            "updated_at = excluded.updated_at",
            (job_type, rate, burst, max_running, time.time()),
        )

    def load_limits(self) -> dict[str, TypeLimit]:
        rows = self._read("SELECT job_type, rate, burst, max_running FROM type_limits")
        return {str(t): limit_from_columns(r, b, m) for (t, r, b, m) in rows}

    def prune_finished(self, before: float, limit: int) -> int:
        # jobs_finished (version 6): a range scan, oldest first.
        return self._write(
            "DELETE FROM jobs WHERE rowid IN (SELECT rowid FROM jobs "
            "WHERE status IN ('completed', 'cancelled') AND completed_at < ? "
            "ORDER BY completed_at LIMIT ?)",
            (before, limit),
        )

    def prune_dead(self, before: float, limit: int) -> int:
        # jobs_dead (version 4), spelled as its expression.
        return self._write(
            "DELETE FROM jobs WHERE rowid IN (SELECT rowid FROM jobs "
            "WHERE status = 'failed' AND coalesce(completed_at, 0.0) < ? "
            "ORDER BY coalesce(completed_at, 0.0) LIMIT ?)",
            (before, limit),
        )

    # The time of death (died_at): the expression the indexes of schema version
    # 4 hold, spelled exactly as there. SQLite does not turn a row value over an
    # indexed expression into a range search, so (dead_at, id) > (?, ?) is
    # spelled as a range on dead_at (a search of the index) refined on the id:
    # parameters (at, at, id). The start token is (-inf, "").
    _DEAD_AT: Final = "coalesce(completed_at, 0.0)"
    _DEAD_ALL: Final = (
        f"FROM jobs WHERE status = 'failed' AND {_DEAD_AT} >= ? AND ({_DEAD_AT} > ? OR id > ?) "
        f"ORDER BY {_DEAD_AT}, id LIMIT ?"
    )
    _DEAD_TYPE: Final = (
        f"FROM jobs WHERE status = 'failed' AND job_type = ? AND {_DEAD_AT} >= ? "
        f"AND ({_DEAD_AT} > ? OR id > ?) ORDER BY {_DEAD_AT}, id LIMIT ?"
    )
    # The index of schema version 5, in its order (NULL started_at first, as
    # SQLite sorts NULLs first).
    _STALE: Final = (
        "FROM jobs WHERE status = 'running' AND (lease_expires_at IS NULL OR lease_expires_at < ?) "
        "ORDER BY started_at, id LIMIT ?"
    )
    _QUEUED: Final = (
        "FROM jobs WHERE status IN ('queued', 'scheduled') AND id > ? ORDER BY id LIMIT ?"
    )

    def _dead(
        self, what: str, job_type: str | None, start: tuple[float, str], n: int
    ) -> list[tuple[object, ...]]:
        at, job_id = start
        if job_type is None:
            return self._read(f"SELECT {what} {self._DEAD_ALL}", (at, at, job_id, n))
        return self._read(f"SELECT {what} {self._DEAD_TYPE}", (job_type, at, at, job_id, n))

    def list_dead(self, job_type: str | None, after: str, limit: int) -> tuple[list[Job], str]:
        """Dead-lettered jobs by ``(completed_at, id)``; see :meth:`Backend.list_dead`."""
        start = parse_dead_page_token(after)
        _check_limit(limit)
        jobs = [row_to_job(r) for r in self._dead(", ".join(_COLUMNS), job_type, start, limit + 1)]
        if len(jobs) > limit:
            return jobs[:limit], dead_page_token(jobs[limit - 1])
        return jobs, ""

    def dead_ids(self, job_type: str | None, limit: int) -> list[str]:
        """Ids of the first ``limit`` dead jobs; see :meth:`Backend.dead_ids`."""
        _check_limit(limit)
        return [str(i) for (i,) in self._dead("id", job_type, (-math.inf, ""), limit)]

    def load_queued(self, after: str, limit: int) -> tuple[list[Job], str]:
        """Queued and scheduled jobs by id; see :meth:`Backend.load_queued`."""
        start = parse_id_token(after)
        _check_limit(limit)
        rows = self._read(f"SELECT {', '.join(_COLUMNS)} {self._QUEUED}", (start, limit + 1))
        jobs = [row_to_job(row) for row in rows]
        if len(jobs) > limit:
            return jobs[:limit], jobs[limit - 1].id
        return jobs, ""

    def load_running(self, job_ids: Sequence[str]) -> list[Job]:
        """The current records of ``job_ids``; see :meth:`Backend.load_running`."""
        # An id no store can hold (NUL, lone surrogate) has no record: skip it.
        wanted = [i for i in dict.fromkeys(job_ids) if _plain_text(i)]
        if not wanted:
            _ = self.db  # no query, but a closed store fails like every other read
            return []
        found: dict[str, Job] = {}
        for i in range(0, len(wanted), _SQLITE_CHUNK):
            chunk = wanted[i : i + _SQLITE_CHUNK]
            rows = self._read(
                f"SELECT {', '.join(_COLUMNS)} FROM jobs WHERE id IN ({', '.join('?' * len(chunk))})",
                tuple(chunk),
            )
            for row in rows:
                job = row_to_job(row)
                found[job.id] = job
        return [found[i] for i in wanted if i in found]

    def stale_running(self, before: float, limit: int) -> list[Job]:
        """Running jobs whose lease ran out before ``before``; see :meth:`Backend.stale_running`.

        A scan of ``jobs_running`` (schema version 5) in ``started_at`` order.
        """
        _check_limit(limit)
        rows = self._read(f"SELECT {', '.join(_COLUMNS)} {self._STALE}", (before, limit))
        return [row_to_job(row) for row in rows]


def limit_columns(limit: TypeLimit) -> tuple[float | None, int | None, int | None]:
    """``(rate, burst, max_running)`` as stored (NULL: no such limit)."""
    rate = limit.rate
    return (
        None if rate is None else rate.rate,
        None if rate is None else rate.burst,
        limit.max_running,
    )


def limit_from_columns(rate: Any, burst: Any, max_running: Any) -> TypeLimit:
    """A stored limit row back as a :class:`TypeLimit`."""
    return TypeLimit(
        rate=None if rate is None else RateLimit(float(rate), int(burst or 1)),
        max_running=None if max_running is None else int(max_running),
    )


class MemoryBackend:
    """A record store that keeps rows in a dict: nothing survives the process."""

    kind = "memory"
    threaded = False

    def __init__(self) -> None:
        self.rows: dict[str, Job] = {}
        self.paused: set[str] = set()
        self.limits: dict[str, TypeLimit] = {}
        self.fail_next = 0  # tests: number of commits to fail
        self.lose_next = 0  # tests: commits that apply, then fail (a lost COMMIT answer)

    def open(self) -> None:
        pass

    def close(self) -> None:
        pass

    def commit(self, batch: Batch) -> frozenset[str]:
        """Write one batch; the ids of refused upserts (see ``Backend.commit``)."""
        if self.fail_next:
            self.fail_next -= 1
            raise StorageUnavailable("injected failure")
        if self.lose_next:
            self.lose_next -= 1
            self.commit(batch)
            raise StorageUnavailable("injected failure after the commit")
        refused: list[str] = []
        for job in merge_upserts(batch.upserts).values():
            if applies(job, self.rows.get(job.id)):
                # A stored record has no base (a store never returns one).
                self.rows[job.id] = job if job.base is None else attrs.evolve(job, base=None)
            else:
                refused.append(job.id)
        for job_id in batch.deletes:
            self.rows.pop(job_id, None)
        return frozenset(refused)

    def load_active(self) -> list[Job]:
        return sorted(
            (j for j in self.rows.values() if j.status in ACTIVE_STATUSES),
            key=lambda j: (j.seq, j.created_at),
        )

    def get(self, job_id: str) -> Job | None:
        return self.rows.get(job_id)

    def find_key(self, key: str) -> Job | None:
        found = [j for j in self.rows.values() if j.idempotency_key == key]
        return min(found, key=lambda j: (j.created_at, j.id)) if found else None

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for job in self.rows.values():
            out[job.status.value] = out.get(job.status.value, 0) + 1
        return out

    def waiting_counts(self) -> dict[str, tuple[int, int]]:
        out: dict[str, tuple[int, int]] = {}
        for job in self.rows.values():
            if job.status in (Status.SCHEDULED, Status.FAILED):
                scheduled, dead = out.get(job.job_type, (0, 0))
                if job.status is Status.SCHEDULED:
                    scheduled += 1
                else:
                    dead += 1
                out[job.job_type] = (scheduled, dead)
        return out

    def set_paused(self, job_type: str, paused: bool) -> None:
        if paused:
            self.paused.add(job_type)
        else:
            self.paused.discard(job_type)

    def load_paused(self) -> list[str]:
        return sorted(self.paused)

    def set_limit(self, job_type: str, limit: TypeLimit | None) -> None:
        if limit is None:
            self.limits.pop(job_type, None)
        else:
            self.limits[job_type] = limit

    def load_limits(self) -> dict[str, TypeLimit]:
        return dict(self.limits)

    def _prune(self, statuses: tuple[Status, ...], before: float, limit: int) -> int:
        old = sorted(
            (job.completed_at or 0.0, job.id)
            for job in self.rows.values()
            if job.status in statuses and (job.completed_at or 0.0) < before
        )
        for _at, job_id in old[:limit]:
            del self.rows[job_id]
        return len(old[:limit])

    def prune_finished(self, before: float, limit: int) -> int:
        return self._prune((Status.COMPLETED, Status.CANCELLED), before, limit)

    def prune_dead(self, before: float, limit: int) -> int:
        return self._prune((Status.FAILED,), before, limit)

    def _dead_rows(self, job_type: str | None, start: tuple[float, str]) -> list[Job]:
        return sorted(
            (
                j
                for j in self.rows.values()
                if j.status is Status.FAILED
                and (job_type is None or j.job_type == job_type)
                and (died_at(j), j.id) > start
            ),
            key=lambda j: (died_at(j), j.id),
        )

    def list_dead(self, job_type: str | None, after: str, limit: int) -> tuple[list[Job], str]:
        """Dead-lettered jobs by ``(completed_at, id)``; see :meth:`Backend.list_dead`."""
        start = parse_dead_page_token(after)
        _check_limit(limit)
        jobs = self._dead_rows(job_type, start)
        if len(jobs) > limit:
            return jobs[:limit], dead_page_token(jobs[limit - 1])
        return jobs, ""

    def dead_ids(self, job_type: str | None, limit: int) -> list[str]:
        """Ids of the first ``limit`` dead jobs; see :meth:`Backend.dead_ids`."""
        _check_limit(limit)
        return [j.id for j in self._dead_rows(job_type, (-math.inf, ""))[:limit]]

    def load_queued(self, after: str, limit: int) -> tuple[list[Job], str]:
        """Queued and scheduled jobs by id; see :meth:`Backend.load_queued`."""
        start = parse_id_token(after)
        _check_limit(limit)
        jobs = sorted(
            (j for j in self.rows.values() if j.status in WAITING_STATUSES and j.id > start),
            key=lambda j: j.id,
        )
        if len(jobs) > limit:
            return jobs[:limit], jobs[limit - 1].id
        return jobs, ""

    def load_running(self, job_ids: Sequence[str]) -> list[Job]:
        """The current records of ``job_ids``; see :meth:`Backend.load_running`."""
        return [self.rows[i] for i in dict.fromkeys(job_ids) if i in self.rows and _plain_text(i)]

    def stale_running(self, before: float, limit: int) -> list[Job]:
        """Running jobs whose lease ran out before ``before``; see :meth:`Backend.stale_running`."""
        _check_limit(limit)
        stale = (
            j
            for j in self.rows.values()
            if j.status is Status.RUNNING
            and (j.lease_expires_at is None or j.lease_expires_at < before)
        )
        # NULL started_at first, as in the SQL stores' indexes.
        return sorted(stale, key=lambda j: (j.started_at is not None, j.started_at or 0.0, j.id))[
            :limit
        ]


class StoreThread:
    """One long-lived thread that runs a backend's blocking calls in order.

    ``trio.to_thread.run_sync`` hands every call to a cached thread and names
    it, which cost ~100 us per call in profiles -- a tenth of a sequential
    enqueue. Calls are not cancellable once queued (like ``to_thread``'s
    default): a commit in flight finishes, and the caller sees the outcome or
    its cancellation right after.
    """

    def __init__(self, name: str) -> None:
        self._name = name
        self._calls: queue.SimpleQueue[tuple[Callable[[], object], Callable[[object], None]] | None]
        self._calls = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def _loop(self) -> None:
        while True:
            call = self._calls.get()
            if call is None:
                return
            fn, deliver = call
            deliver(outcome.capture(fn))

    async def run(self, fn: Callable[[], T]) -> T:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name=self._name, daemon=True)
            self._thread.start()
        token = trio.lowlevel.current_trio_token()
        task = trio.lowlevel.current_task()

        def deliver(result: object) -> None:
            # From the store thread: wake the waiting task in trio's thread.
            token.run_sync_soon(trio.lowlevel.reschedule, task, result)

        self._calls.put((fn, deliver))  # type: ignore[arg-type]

        def abort(_: object) -> trio.lowlevel.Abort:
            return trio.lowlevel.Abort.FAILED  # the call runs to completion

        return await trio.lowlevel.wait_task_rescheduled(abort)  # type: ignore[no-any-return]

    def stop(self) -> None:
        if self._thread is not None:
            self._calls.put(None)
            self._thread = None


class Written:
    """One :meth:`GroupCommitter.write`: set ``done`` once its batch committed.

    Attributes:
        done: set when the batch holding these records has committed.
        refused: then, the ids of its records the store did not apply (their
            base no longer matched: the job changed elsewhere meanwhile).
    """

    __slots__ = ("deletes", "done", "due", "ids", "on_commit", "refused", "seq", "upserts")

    def __init__(
        self,
        upserts: Sequence[Job],
        deletes: Sequence[str],
        on_commit: Callable[[], None] | None,
        due: float = -math.inf,
    ) -> None:
        self.upserts = upserts
        self.deletes = deletes
        self.on_commit = on_commit
        self.done = trio.Event()
        self.refused: frozenset[str] = frozenset()
        #: when it must be committed at the latest (``-inf``: with the next commit)
        self.due = due
        #: the jobs it writes (for :func:`~stackduck_core.plan_commit`)
        self.ids = frozenset(job.id for job in upserts).union(deletes)
        #: its place among the committer's writes (1, 2, ...)
        self.seq = 0

    async def wait(self) -> None:
        """Until the batch holding these records has committed."""
        await self.done.wait()


_Pending = Written


@attrs.frozen(kw_only=True)
class CommitterStats:
    pending: int
    batches: int
    rows: int
    failures: int
    largest_batch: int
    refused: int = 0


class GroupCommitter:
    """The single writer of the record store (see the module docstring).

    Args:
        backend: the blocking backend.
        health: the backend's health machine (the core decides backoff).
        max_batch: most writes per transaction.
        max_pending: records that may wait before :meth:`wait_capacity` blocks
            new work (backpressure instead of unbounded memory).
    """

    def __init__(
        self,
        backend: Backend,
        health: BackendHealth,
        *,
        now: Callable[[], float],
        clock_deadline: Callable[[float], float],
        max_batch: int = 5000,
        max_pending: int = 50_000,
    ) -> None:
        self.backend = backend
        self.health = health
        self._now = now
        self._deadline = clock_deadline
        self._max_batch = max_batch
        self._max_pending = max_pending
        self._pending: list[_Pending] = []
        self._pending_rows = 0
        self._wakeup = trio.Event()
        self._space = trio.Event()
        self._space.set()
        self._thread = StoreThread(f"stackduck-{backend.kind}")
        self._closed = False
        self._reconcile_id: int | None = None
        self._reconcile_upto = 0  # the last write made before the reconcile began
        self._writes = 0  # writes made so far (Written.seq)
        self._finished = trio.Event()
        self._batches = 0
        self._rows = 0
        #: called with every HealthChanged of the store (the broker's hook)
        self.on_health: Callable[[HealthChanged], None] | None = None
        #: called with each commit attempt's duration and outcome (metrics)
        self.on_commit_time: Callable[[float, bool], None] | None = None
        self._failures = 0
        self._refused = 0
        self._largest = 0

    # -- producers -------------------------------------------------------------

    async def wait_capacity(self) -> None:
        """Block while too many records are pending (backpressure)."""
        while self._pending_rows >= self._max_pending:
            self._space = trio.Event() if self._space.is_set() else self._space
            await self._space.wait()

    def write(
        self,
        upserts: Iterable[Job] = (),
        deletes: Iterable[str] = (),
        *,
        on_commit: Callable[[], None] | None = None,
        defer: float = 0.0,
    ) -> Written:
        """Queue records for the next batch; its ``done`` is set on commit.

        Synchronous on purpose: the caller appends in the same step as the
        core decision that produced the records, so writes keep its order.
        ``on_commit`` runs in the trio thread right after the commit, when
        ``refused`` is known.

        ``defer`` (seconds): the records may wait that long for their commit
        instead of going with the next one, unless a later write of the same
        job goes first (see :func:`~stackduck_core.plan_commit`): a delivery's
        record then merges with the job's completion into one row.
        """
        if self._closed:
            raise StorageUnavailable("the record store is shut down")
        due = self._now() + defer if defer > 0 else -math.inf
        item = Written(tuple(upserts), tuple(deletes), on_commit, due)
        self._writes += 1
        item.seq = self._writes
        self._pending.append(item)
        self._pending_rows += len(item.upserts) + len(item.deletes)
        self._wakeup.set()
        return item

    async def run_blocking(self, fn: Callable[[], T]) -> T:
        """Run a blocking backend call on the store's thread, one at a time.

        Backends that do no I/O (``threaded = False``) run inline, which keeps
        tests under trio's autojump clock deterministic.
        """
        if not getattr(self.backend, "threaded", True):
            return fn()
        return await self._thread.run(fn)

    async def run_read(self, fn: Callable[[], T]) -> T:
        """Run a blocking read: on a thread of its own when the backend allows
        concurrent reads (``concurrent_reads``: PostgreSQL's pool), so lookups,
        listings and stats never wait behind the writer; else as
        :meth:`run_blocking`."""
        if getattr(self.backend, "concurrent_reads", False):
            return await trio.to_thread.run_sync(fn)
        return await self.run_blocking(fn)

    def stop_thread(self) -> None:
        """Let the store's thread end (after the backend is closed)."""
        self._thread.stop()

    async def wait_closed(self) -> None:
        """Wait until :meth:`run` has committed everything and returned."""
        await self._finished.wait()

    # -- the writer task ---------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Commit pending writes until :meth:`close` and every write is done."""
        task_status.started()
        try:
            await self._commit_loop()
        finally:
            self._finished.set()

    async def _commit_loop(self) -> None:
        # After a failed attempt the same writes are retried as they were (no
        # new ones merged in): that attempt may have committed after all (its
        # COMMIT's answer lost), and then its rows are checked against the
        # store rather than reported refused.
        retry: list[_Pending] = []
        while True:
            items: list[_Pending] = retry
            due_at: float | None = None
            if not retry:
                positions, due_at = plan_commit(
                    self._pending, now=self._now(), max_writes=self._max_batch, flush=self._closed
                )
                items = [self._pending[position] for position in positions]
            if not items:
                if self._closed and not self._pending:
                    return
                self._wakeup = trio.Event()
                probe_at = self.health.next_probe_at()
                if probe_at is None and due_at is None:
                    await self._wakeup.wait()
                    continue
                # Not healthy and nothing to write: the health machine still
                # needs probes to leave SUSPECT/DOWN/RECOVERING (otherwise an
                # idle server would refuse enqueues forever). An empty commit
                # is the probe: it takes the write lock like a real one.
                # Deferred writes wake the loop when they are due.
                wake_at = min(t for t in (probe_at, due_at) if t is not None)
                with trio.move_on_at(self._deadline(wake_at)):
                    await self._wakeup.wait()
                    continue  # real writes arrived: they are the probe
                if probe_at is None or (due_at is not None and due_at <= probe_at):
                    continue  # deferred writes are due: plan again
            batch = self._merge(items)
            started = time.monotonic()
            try:
                refused = await self.run_blocking(functools.partial(self.backend.commit, batch))
            except StorageUnavailable as exc:
                if self.on_commit_time is not None:
                    self.on_commit_time(time.monotonic() - started, False)
                retry = items
                self._failures += 1
                self._report(failed=True)
                log.warning("record store write failed (%s); retrying %d writes", exc, len(items))
                # The health machine decides when to try again (capped backoff).
                retry_at = self.health.next_probe_at()
                assert retry_at is not None  # never HEALTHY right after a failure
                await trio.sleep_until(self._deadline(retry_at))
                continue
            if self.on_commit_time is not None:
                self.on_commit_time(time.monotonic() - started, True)
            self._report(failed=False)
            if retry and refused:
                refused = await self._confirm(batch, refused)
            retry = []
            if len(items) == len(self._pending):
                self._pending.clear()
            elif items and self._pending[len(items) - 1] is items[-1]:
                del self._pending[: len(items)]  # a prefix: the usual case
            else:
                gone = {id(item) for item in items}
                self._pending = [item for item in self._pending if id(item) not in gone]
            self._pending_rows -= sum(len(i.upserts) + len(i.deletes) for i in items)
            self._batches += bool(items)
            self._rows += len(batch.upserts) + len(batch.deletes)
            self._largest = max(self._largest, len(items))
            if self._pending_rows < self._max_pending:
                self._space.set()
            if refused:
                self._refused += len(refused)
                log.info("record store refused %d stale records (changed elsewhere)", len(refused))
            for item in items:
                if refused:
                    item.refused = frozenset(j.id for j in item.upserts if j.id in refused)
                if item.on_commit is not None:
                    try:
                        item.on_commit()
                    except Exception:
                        # A bug in one callback must not strand the others'
                        # waiters nor kill the writer (and with it the server).
                        log.exception("on_commit callback failed")
                item.done.set()
            if self._reconcile_id is not None and (
                not self._pending or self._pending[0].seq > self._reconcile_upto
            ):
                # Recovery's reconcile for a record store is flushing what
                # queued up while it was away: that backlog (every write made
                # before it began) has now committed. Later writes do not
                # count: deliveries deferred by 50 ms keep arriving under load.
                reconcile_id, self._reconcile_id = self._reconcile_id, None
                self._apply_health(ReconcileFinished(now=self._now(), reconcile_id=reconcile_id))

    async def _confirm(self, batch: Batch, refused: frozenset[str]) -> frozenset[str]:
        """Of a retried batch's refused rows, those the store already holds as
        written (the failed attempt had committed) were applied after all."""
        ids = sorted(refused)
        try:
            stored = await self.run_blocking(functools.partial(self.backend.load_running, ids))
        except StorageUnavailable:
            return refused  # cannot tell: refused, the safe answer
        held = {job.id: job for job in stored}
        wanted = {job.id: job for job in batch.upserts}
        return frozenset(i for i in refused if held.get(i) != wanted.get(i))

    def _report(self, *, failed: bool) -> None:
        # While the store is down or recovering, every retried commit is the
        # probe; otherwise it is an ordinary operation outcome.
        now = self._now()
        event: HealthEvent
        if self.health.state in (Health.DOWN, Health.RECOVERING):
            event = ProbeFailed(now=now) if failed else ProbeSucceeded(now=now)
        else:
            event = OpFailed(now=now) if failed else OpSucceeded(now=now)
        self._apply_health(event)

    def _apply_health(self, event: HealthEvent) -> None:
        for effect in self.health.handle(event):
            if isinstance(effect, HealthChanged):
                log.warning(
                    "record store (%s) health: %s -> %s",
                    self.backend.kind,
                    effect.old.value,
                    effect.new.value,
                )
                if self.on_health is not None:
                    self.on_health(effect)
            elif isinstance(effect, StartReconcile):
                self._reconcile_id = effect.reconcile_id
                self._reconcile_upto = self._writes

    @staticmethod
    def _merge(items: Sequence[_Pending]) -> Batch:
        """One record per job: the newest, written over what the first one expected.

        (The records of one job in a batch form a chain: each one's base is the
        one before, which never reaches the store; only the first base says
        what the store holds.)
        """
        upserts: list[Job] = []
        deletes: dict[str, None] = {}
        for item in items:
            for job in item.upserts:
                upserts.append(job)
                deletes.pop(job.id, None)
            for job_id in item.deletes:
                upserts = [job for job in upserts if job.id != job_id]  # (deletes are rare)
                deletes[job_id] = None
        return Batch(tuple(merge_chain(upserts).values()), tuple(deletes))

    def close(self) -> None:
        """Accept no more writes; :meth:`run` returns once the backlog is committed."""
        self._closed = True
        self._wakeup.set()

    def statistics(self) -> CommitterStats:
        return CommitterStats(
            pending=self._pending_rows,
            batches=self._batches,
            rows=self._rows,
            failures=self._failures,
            largest_batch=self._largest,
            refused=self._refused,
        )
