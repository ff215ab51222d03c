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
import pathlib
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import IO, Final, Protocol, TypeVar

import attrs
import outcome
import trio

from stackduck_core import Job, Status
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


@attrs.frozen
class Batch:
    """What one transaction writes: upserts (newest version wins) and deletes."""

    upserts: Sequence[Job]
    deletes: Sequence[str]


class Backend(Protocol):
    """Blocking record-store operations, called from a worker thread."""

    kind: str

    def open(self) -> None: ...
    def close(self) -> None: ...
    def commit(self, batch: Batch) -> None: ...
    def load_active(self) -> list[Job]: ...
    def get(self, job_id: str) -> Job | None: ...
    def find_key(self, key: str) -> Job | None:
        """The (oldest) job enqueued with idempotency ``key``, if any."""
        ...

    def counts(self) -> dict[str, int]: ...
    def set_paused(self, job_type: str, paused: bool) -> None:
        """Record that ``job_type`` is (or is no longer) paused; idempotent."""
        ...

    def load_paused(self) -> list[str]:
        """The paused job types, sorted."""
        ...


class SqliteBackend:
    """SQLite in WAL mode, one connection used by one thread at a time.

    ``synchronous=FULL`` (the default) makes a committed batch survive an OS
    crash too; ``NORMAL`` survives process crashes (``kill -9``) only, for
    speed. The schema is versioned with ``PRAGMA user_version``: version 1
    is the jobs table, version 2 adds ``paused_types``, version 3 the
    ``idempotency_key`` column; an older file is migrated when it is opened.
    """

    kind = "sqlite"
    SCHEMA_VERSION: Final = 3

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

    def commit(self, batch: Batch) -> None:
        db = self.db
        try:
            db.execute("BEGIN IMMEDIATE")
            db.executemany(self._UPSERT, [job_to_row(job) for job in batch.upserts])
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


class MemoryBackend:
    """A record store that keeps rows in a dict: nothing survives the process."""

    kind = "memory"
    threaded = False

    def __init__(self) -> None:
        self.rows: dict[str, Job] = {}
        self.paused: set[str] = set()
        self.fail_next = 0  # tests: number of commits to fail

    def open(self) -> None:
        pass

    def close(self) -> None:
        pass

    def commit(self, batch: Batch) -> None:
        if self.fail_next:
            self.fail_next -= 1
            raise StorageUnavailable("injected failure")
        for job in batch.upserts:
            old = self.rows.get(job.id)
            if old is None or job.version > old.version:
                self.rows[job.id] = job
        for job_id in batch.deletes:
            self.rows.pop(job_id, None)

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

    def set_paused(self, job_type: str, paused: bool) -> None:
        if paused:
            self.paused.add(job_type)
        else:
            self.paused.discard(job_type)

    def load_paused(self) -> list[str]:
        return sorted(self.paused)


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


class _Pending:
    __slots__ = ("deletes", "done", "on_commit", "upserts")

    def __init__(
        self, upserts: Sequence[Job], deletes: Sequence[str], on_commit: Callable[[], None] | None
    ) -> None:
        self.upserts = upserts
        self.deletes = deletes
        self.on_commit = on_commit
        self.done = trio.Event()


@attrs.frozen(kw_only=True)
class CommitterStats:
    pending: int
    batches: int
    rows: int
    failures: int
    largest_batch: int


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
        self._finished = trio.Event()
        self._batches = 0
        self._rows = 0
        self._failures = 0
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
    ) -> trio.Event:
        """Queue records for the next batch; return an event set on commit.

        Synchronous on purpose: the caller appends in the same step as the
        core decision that produced the records, so writes keep its order.
        ``on_commit`` runs in the trio thread right after the commit.
        """
        if self._closed:
            raise StorageUnavailable("the record store is shut down")
        item = _Pending(tuple(upserts), tuple(deletes), on_commit)
        self._pending.append(item)
        self._pending_rows += len(item.upserts) + len(item.deletes)
        self._wakeup.set()
        return item.done

    async def run_blocking(self, fn: Callable[[], T]) -> T:
        """Run a blocking backend call on the store's thread, one at a time.

        Backends that do no I/O (``threaded = False``) run inline, which keeps
        tests under trio's autojump clock deterministic.
        """
        if not getattr(self.backend, "threaded", True):
            return fn()
        return await self._thread.run(fn)

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
        while True:
            items: list[_Pending] = []
            if not self._pending:
                if self._closed:
                    return
                self._wakeup = trio.Event()
                probe_at = self.health.next_probe_at()
                if probe_at is None:
                    await self._wakeup.wait()
                    continue
                # Not healthy and nothing to write: the health machine still
                # needs probes to leave SUSPECT/DOWN/RECOVERING (otherwise an
                # idle server would refuse enqueues forever). An empty commit
                # is the probe: it takes the write lock like a real one.
                with trio.move_on_at(self._deadline(probe_at)):
                    await self._wakeup.wait()
                    continue  # real writes arrived: they are the probe
            else:
                items = self._pending[: self._max_batch]
            batch = self._merge(items)
            try:
                await self.run_blocking(functools.partial(self.backend.commit, batch))
            except StorageUnavailable as exc:
                self._failures += 1
                self._report(failed=True)
                log.warning("record store write failed (%s); retrying %d writes", exc, len(items))
                # The health machine decides when to try again (capped backoff).
                retry_at = self.health.next_probe_at()
                assert retry_at is not None  # never HEALTHY right after a failure
                await trio.sleep_until(self._deadline(retry_at))
                continue
            self._report(failed=False)
            del self._pending[: len(items)]
            self._pending_rows -= sum(len(i.upserts) + len(i.deletes) for i in items)
            self._batches += bool(items)
            self._rows += len(batch.upserts) + len(batch.deletes)
            self._largest = max(self._largest, len(items))
            if self._pending_rows < self._max_pending:
                self._space.set()
            for item in items:
                if item.on_commit is not None:
                    try:
                        item.on_commit()
                    except Exception:
                        # A bug in one callback must not strand the others'
                        # waiters nor kill the writer (and with it the server).
                        log.exception("on_commit callback failed")
                item.done.set()
            if self._reconcile_id is not None and not self._pending:
                # Recovery's reconcile for a record store is flushing what
                # queued up while it was away: that backlog has now committed.
                reconcile_id, self._reconcile_id = self._reconcile_id, None
                self._apply_health(ReconcileFinished(now=self._now(), reconcile_id=reconcile_id))

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
            elif isinstance(effect, StartReconcile):
                self._reconcile_id = effect.reconcile_id

    @staticmethod
    def _merge(items: Sequence[_Pending]) -> Batch:
        latest: dict[str, Job] = {}
        deletes: dict[str, None] = {}
        for item in items:
            for job in item.upserts:
                latest[job.id] = job
                deletes.pop(job.id, None)
            for job_id in item.deletes:
                latest.pop(job_id, None)
                deletes[job_id] = None
        return Batch(tuple(latest.values()), tuple(deletes))

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
        )
