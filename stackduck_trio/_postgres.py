"""The PostgreSQL record store (ARCHITECTURE §3: ``DATABASE_URL``).

:class:`PostgresBackend` implements the :class:`~stackduck_trio._store.Backend`
protocol with the same semantics as :class:`~stackduck_trio._store.SqliteBackend`:
one row per job, upserts guarded by ``version`` (a late retry never overwrites
a newer record), records made by a transition written only over the row they
were made from (compare-and-set on status and lease), deletes in the same
transaction.

Threads, not asyncio
    psycopg's ``AsyncConnection`` does not run under trio (STACK_NOTES), so
    every method is synchronous and is called from the group committer's worker
    thread (``GroupCommitter.run_blocking``), one call at a time.

Connections
    A ``psycopg_pool.ConnectionPool`` whose ``check`` callback
    (``ConnectionPool.check_connection``) tests a connection before it is
    handed out, so connections broken by a server restart are replaced instead
    of failing a commit -- unless the connection answered a statement within
    the last :data:`CHECK_AFTER_IDLE` seconds: under load the check was an
    extra round trip per commit (a third of a one-row commit's cost), and a
    server restarted faster than that costs at most one failed attempt, which
    the committer retries. When one broken connection is found the whole pool is
    drained: after a restart every idle connection is dead, and checking them
    one by one would cost the pool's growing retry sleeps (a failover to a
    read-only standby drains it too). While the server refuses connections a
    call gives up after a short wait instead of the whole ``connect_timeout``:
    the core's health machine, not the driver, paces retries. An empty commit
    still makes a round trip, so the committer can use it as a health probe.
    Session state (``statement_timeout``, the COPY staging table) needs direct
    connections or session pooling; PgBouncer's transaction pooling is not
    supported.

Bounded calls
    A thread cannot be interrupted. Each connection runs with
    ``statement_timeout`` (default 10 s), so a slow or locked server fails the
    statement itself; a server that does not answer at all (frozen, or a
    network that drops packets) cannot enforce it, so a :class:`_Watchdog`
    thread watches every statement: ``grace`` seconds after the statement
    timeout it sends a cancel request (``cancel_safe``), and if the call still
    has not returned ``grace`` seconds later it shuts the socket down, which
    wakes libpq with an error. Every blocking call therefore ends within about
    ``statement_timeout + 2 * grace`` with :class:`StorageUnavailable`, and
    the committer retries the batch (commits are idempotent, see below).
    :meth:`PostgresBackend.interrupt` does the same at once: it is what the
    trio side should call when the task waiting for the thread is cancelled
    (``trio.to_thread.run_sync`` cannot tell the thread; the caller can).

Schema
    Everything lives in one schema (default ``stackduck``; ``?schema=`` in the
    URL or the ``schema`` argument), so tests and tenants can share a database.
    Versioned migrations are recorded in ``<schema>.schema_migrations`` and are
    applied at :meth:`~PostgresBackend.open` in one transaction that holds
    ``pg_advisory_xact_lock``: instances starting together serialize, and the
    later ones find the work done. A database migrated by a newer Stackduck is
    refused, like SQLite's ``user_version``.

Writes
    ``commit`` returns the ids of the records it did not write (see
    ``Backend.commit``). A record without a base is an upsert, ``INSERT ...
    ON CONFLICT (id) DO UPDATE ... WHERE jobs.version < EXCLUDED.version``. A
    record with a base is a compare-and-set ``UPDATE`` that never inserts: the
    row is locked (``SELECT ... FOR UPDATE`` in a CTE), and written if, as
    locked, it has the base's status and lease (``IS NOT DISTINCT FROM``) and
    an older version -- so it is compared with what a concurrent writer
    committed, not with what the statement's snapshot saw. A record is
    refused when its statement wrote no row (rowcount 0), or when the COPY
    merge did not return its id. Deletes are one ``DELETE ... WHERE id =
    ANY(...)``. A lone write or a lone delete is one autocommit statement
    (atomic by itself). Other small batches are one pipelined transaction,
    one statement per row (``BEGIN``, ``executemany`` per kind, ``DELETE``,
    ``COMMIT`` in one round trip). From ``copy_threshold`` rows on, the rows
    and their bases are ``COPY``-ed (binary) into a per-connection temporary
    table and merged with one ``UPDATE ... FROM`` (the conditional ones) and
    one ``INSERT ... SELECT`` (the others). Several versions of one job in a
    batch are reduced to one (``merge_upserts``; one statement cannot touch a
    row twice). Rows are locked in id order (code points), so concurrent
    writers, ``PostgresTier`` included, cannot deadlock: one statement per row
    follows the sorted rows, and a batch of both kinds first locks all its
    rows in that order (the COPY merge always does). A batch retried after an
    unknown outcome (a connection lost during ``COMMIT``) writes nothing
    twice; the records the first attempt wrote are then reported refused.

Text
    PostgreSQL ``text`` cannot hold NUL. Payloads cannot contain one (they are
    validated JSON), but error texts and worker ids come from clients; a NUL is
    stored as U+FFFD. Refusing the row instead would make the committer retry
    that batch forever and block every other write.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import logging
import math
import operator
import os
import socket
import threading
import time
import weakref
from collections.abc import Iterator, Sequence
from typing import Any, Final
from urllib.parse import unquote, urlsplit, urlunsplit

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg_pool import ConnectionPool, PoolTimeout

from stackduck_core import Job, TypeLimit

from ._config import ConfigError
from ._store import (
    _COLUMNS,
    ACTIVE_STATUSES,
    WAITING_STATUSES,
    Batch,
    StorageUnavailable,
    _check_limit,
    _plain_text,
    dead_page_token,
    limit_columns,
    limit_from_columns,
    merge_upserts,
    parse_dead_page_token,
    parse_id_token,
    row_to_job,
)

log = logging.getLogger("stackduck.store.postgres")

#: The newest schema version this code knows; see :data:`_MIGRATIONS`.
SCHEMA_VERSION: Final = 6
DEFAULT_SCHEMA: Final = "stackduck"

# Column types, used by COPY's binary format (which needs exact types).
_TYPES: Final = {
    "id": "text",
    "job_type": "text",
    "payload": "text",
    "status": "text",
    "priority": "int4",
    "max_retries": "int4",
    "delay": "int4",
    "scheduled_at": "float8",
    "created_at": "float8",
    "updated_at": "float8",
    "retry_count": "int4",
    "error_message": "text",
    "started_at": "float8",
    "completed_at": "float8",
    "seq": "int8",
    "attempt": "int4",
    "lost_leases": "int4",
    "lease_id": "text",
    "lease_expires_at": "float8",
    "worker_id": "text",
    "version": "int8",
    "idempotency_key": "text",
}
# A column added to the Job record without a migration here must fail loudly.
if tuple(_TYPES) != _COLUMNS:  # pragma: no cover - guards future edits
    raise RuntimeError("stackduck_trio._postgres is out of date with the record columns")
# A record with its base (NULL, NULL when it has none): the rows of the
# conditional writes, and of the COPY staging table.
_CAS_COLUMNS: Final = (*_COLUMNS, "base_status", "base_lease")
_CAS_TYPES: Final = {**_TYPES, "base_status": "text", "base_lease": "text"}
_COPY_TYPES: Final = [_CAS_TYPES[c] for c in _CAS_COLUMNS]
_BASE_STATUS: Final = _CAS_COLUMNS.index("base_status")
_VERSION: Final = _COLUMNS.index("version")
_TEXT_INDEXES: Final = tuple(i for i, c in enumerate(_COLUMNS) if _TYPES[c] == "text")
_STATUS_INDEX: Final = _COLUMNS.index("status")
_ROW_OF: Final = operator.attrgetter(*_COLUMNS)

# The active-row predicate, spelled exactly as in the partial index of
# migration 1 so the planner can prove the index applies.
_ACTIVE_SQL: Final = "status IN ('scheduled', 'queued', 'running', 'failed')"
if {s.value for s in ACTIVE_STATUSES} != {"scheduled", "queued", "running", "failed"}:
    raise RuntimeError("ACTIVE_STATUSES changed: add a migration for the jobs_active index")
# Likewise for load_queued and the jobs_queued index of migration 4.
_WAITING_SQL: Final = "status IN ('queued', 'scheduled')"
if {s.value for s in WAITING_STATUSES} != {"queued", "scheduled"}:
    raise RuntimeError("WAITING_STATUSES changed: add a migration for the jobs_queued index")
# The time of death (``died_at`` in _store): the dead-letter order, and the
# leading expression of migration 4's jobs_dead indexes. Queries spell it
# exactly so, or the planner cannot match the index expression.
_DEAD_AT: Final = "coalesce(completed_at, 0)"
# The running rows nobody claimed through the record store's queue tier: the
# predicate of migration 5's jobs_running index, spelled the same in the query.
_UNCLAIMED_RUNNING_SQL: Final = "status = 'running' AND claim_token IS NULL"

# Migrations: (version, description, statements). Never edit a released one;
# append a new version. ``{jobs}`` is the schema-qualified jobs table,
# ``{paused}`` the schema-qualified paused_types table, ``{limits}`` type_limits.
#
# HOT: a lease-extension heartbeat rewrites a running row changing only
# lease_expires_at, updated_at and version. PostgreSQL updates a row in place
# (a HOT update: no new index entries, no index bloat) only if no index uses a
# changed column, in its keys, expressions or predicate. So no index may
# mention those three columns (test_pg_heartbeat_updates_are_hot checks it).
_MIGRATIONS: Final[tuple[tuple[int, str, tuple[str, ...]], ...]] = (
    (
        1,
        "jobs table, active-row and status indexes",
        (
            """
            CREATE TABLE {jobs} (
                id text PRIMARY KEY,
                job_type text NOT NULL,
                payload text NOT NULL,
                status text NOT NULL,
                priority integer NOT NULL,
                max_retries integer NOT NULL,
                delay integer NOT NULL,
                scheduled_at double precision NOT NULL,
                created_at double precision NOT NULL,
                updated_at double precision NOT NULL,
                retry_count integer NOT NULL,
                error_message text NOT NULL,
                started_at double precision,
                completed_at double precision,
                seq bigint NOT NULL,
                attempt integer NOT NULL,
                lost_leases integer NOT NULL,
                lease_id text,
                lease_expires_at double precision,
                worker_id text,
                version bigint NOT NULL
            )
            """,
            # load_active: a restart reads the active rows in queue order; the
            # partial index stays small however many completed rows pile up.
            "CREATE INDEX jobs_active ON {jobs} (seq, created_at) "
            "WHERE status IN ('scheduled', 'queued', 'running', 'failed')",
            # counts(): GROUP BY status as an index-only scan.
            "CREATE INDEX jobs_status ON {jobs} (status)",
        ),
    ),
    (
        2,
        "paused_types table (pauses survive restarts)",
        ("CREATE TABLE {paused} (job_type text PRIMARY KEY, paused_at double precision)",),
    ),
    (
        3,
        "idempotency_key column and index",
        (
            "ALTER TABLE {jobs} ADD COLUMN idempotency_key text",
            # Not unique: a violation would fail a group-committed batch forever;
            # the broker dedupes keys before it writes.
            "CREATE INDEX jobs_idempotency_key ON {jobs} (idempotency_key) "
            "WHERE idempotency_key IS NOT NULL",
        ),
    ),
    (
        4,
        "dead-letter and waiting-row indexes (list_dead, dead_ids, load_queued)",
        (
            # Ids compare in code-point order (COLLATE "C"), whatever the
            # database's collation: the same order as SQLite and Python, and
            # cheaper. Queries spell the same collation, or the index is unusable.
            # Partial indexes: only dead (or waiting) rows, however many
            # completed rows pile up. Dead rows by the time of death
            # (completed_at, NULL as 0), never updated_at (see HOT above).
            # INCLUDE (completed_at): the planner only reads an expression's
            # column from an index that holds it, so dead_ids stays index-only.
            f'CREATE INDEX jobs_dead ON {{jobs}} (({_DEAD_AT}), id COLLATE "C") '
            "INCLUDE (completed_at) WHERE status = 'failed'",
            # One type's dead jobs: without it a rare type's page would walk
            # every dead job of the other types before it.
            f'CREATE INDEX jobs_dead_type ON {{jobs}} (job_type, ({_DEAD_AT}), id COLLATE "C") '
            "INCLUDE (completed_at) WHERE status = 'failed'",
            'CREATE INDEX jobs_queued ON {jobs} (id COLLATE "C") WHERE ' + _WAITING_SQL,
        ),
    ),
    (
        5,
        "claim columns and indexes (the record store as a queue tier), stale_running index",
        (
            # Claims of stackduck_trio._pgtier. Not record columns: the record
            # upserts list their columns and never touch these.
            "ALTER TABLE {jobs} ADD COLUMN claim_token text, ADD COLUMN claim_owner text, "
            "ADD COLUMN claim_until double precision",
            # Each predicate is spelled as in PostgresTier's queries, so the
            # planner can prove the partial index applies. None of these
            # columns changes on a heartbeat (see HOT above).
            # A type's ready rows in claim order (and the ready counts).
            "CREATE INDEX jobs_ready ON {jobs} (job_type, priority, seq) "
            "WHERE status = 'queued' AND claim_token IS NULL",
            # A type's due scheduled rows, by due time.
            "CREATE INDEX jobs_due ON {jobs} (job_type, scheduled_at) "
            "WHERE status = 'scheduled' AND claim_token IS NULL",
            # The next due time over every type: jobs_due cannot answer it
            # (job_type leads), this one is min() as one index probe.
            "CREATE INDEX jobs_next_due ON {jobs} (scheduled_at) "
            "WHERE status = 'scheduled' AND claim_token IS NULL",
            # Expired claims, in the reaper's order (no sort under its LIMIT).
            # claim_until is indexed, so PostgresTier.renew (a batch every
            # claim_seconds / 3) is not a HOT update; record heartbeats still are.
            'CREATE INDEX jobs_claims ON {jobs} (claim_until, id COLLATE "C") '
            "WHERE claim_token IS NOT NULL",
            # stale_running: the running rows in started_at order (its
            # ORDER BY spells the same NULLS FIRST); the sweeper filters on
            # lease_expires_at, which is deliberately not indexed.
            'CREATE INDEX jobs_running ON {jobs} (started_at NULLS FIRST, id COLLATE "C") '
            "WHERE " + _UNCLAIMED_RUNNING_SQL,
        ),
    ),
    (
        6,
        "type_limits table (rate and concurrency limits), jobs_finished index (retention)",
        (
            # tat: the rate's GCRA state for the record-store queue tier,
            # updated in the claim's transaction under the row's lock.
            "CREATE TABLE {limits} (job_type text PRIMARY KEY, rate double precision, "
            "burst integer, max_running integer, tat double precision, "
            "updated_at double precision)",
            # Retention deletes finished rows oldest first, in bounded batches.
            "CREATE INDEX jobs_finished ON {jobs} (completed_at) "
            "WHERE status IN ('completed', 'cancelled')",
        ),
    ),
)
assert _MIGRATIONS[-1][0] == SCHEMA_VERSION

#: Libpq settings applied unless the URL sets them.
_CONNECT_DEFAULTS: Final = {
    "application_name": "stackduck",
    # Detect a dead peer on idle pooled connections (TCP only).
    "keepalives": "1",
    "keepalives_idle": "10",
    "keepalives_interval": "5",
    "keepalives_count": "3",
}
_READ_ONLY: Final = "25006"  # read_only_sql_transaction
#: Slices of the wait for a pooled connection (see ``PostgresBackend._acquire``).
_SLICE: Final = 0.25
#: A pooled connection idle longer than this (seconds) is checked before use.
CHECK_AFTER_IDLE: Final = 1.0
# The per-connection temporary table of COPY (named anew when its shape changes).
_STAGE: Final = "stackduck_stage_v2"
# A schema name we create and quote: keep it a plain identifier.
_SCHEMA_CHARS: Final = frozenset("abcdefghijklmnopqrstuvwxyz0123456789_")


def _clean(text: str) -> str:
    return text.replace("\x00", "\ufffd") if "\x00" in text else text


def _row(job: Job) -> list[Any]:
    """The SQL row of a job (attrgetter: one C call instead of 21 getattr)."""
    row: list[Any] = list(_ROW_OF(job))
    row[_STATUS_INDEX] = job.status.value
    for i in _TEXT_INDEXES:
        value = row[i]
        if value is not None and "\x00" in value:
            row[i] = _clean(value)
    return row


def _cas_row(job: Job) -> list[Any]:
    """The row of a job followed by its base: status and lease (NULL, NULL without one)."""
    row = _row(job)
    base = job.base
    if base is None:
        row += (None, None)
    else:
        lease = base.lease_id
        row += (base.status.value, lease if lease is None else _clean(lease))
    return row


def _update_params(row: Sequence[Any]) -> list[Any]:
    """The parameters of ``_q_update`` for a :func:`_cas_row`: the row, then its version."""
    return [*row, row[_VERSION]]


def _describe(exc: BaseException) -> str:
    """One line for logs and UNAVAILABLE messages (psycopg's are multi-line)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    sqlstate = getattr(exc, "sqlstate", None)
    return f"{text} [{sqlstate}]" if sqlstate else text


def _lock_key(schema: str) -> int:
    """A stable signed 64-bit advisory-lock key for migrating ``schema``."""
    digest = hashlib.blake2b(f"stackduck.migrate:{schema}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def _split_url(url: str) -> tuple[str, dict[str, str]]:
    """Remove Stackduck's own query parameters from a ``postgresql://`` URL.

    libpq rejects unknown URI parameters, so ``schema`` and
    ``statement_timeout`` are taken out here. Other parameters are kept
    verbatim (re-encoding them could change their meaning: libpq does not
    decode ``+`` as a space).
    """
    parts = urlsplit(url)
    if parts.scheme not in ("postgresql", "postgres") or not parts.query:
        return url, {}
    ours: dict[str, str] = {}
    kept: list[str] = []
    for item in parts.query.split("&"):
        key, _, value = item.partition("=")
        if key in ("schema", "statement_timeout"):
            ours[key] = unquote(value)
        elif item:
            kept.append(item)
    return urlunsplit(parts._replace(query="&".join(kept))), ours


class _Guard:
    """One watched blocking call: its connection and deadline."""

    __slots__ = ("cancelled", "conn", "deadline", "limit", "severed")

    def __init__(self, conn: psycopg.Connection[Any], limit: float) -> None:
        self.conn = conn
        self.limit = limit
        self.deadline = time.monotonic() + limit
        self.cancelled = False
        self.severed = False


class _Watchdog:
    """Ends blocking calls whose server stopped answering (see the module docstring).

    One daemon thread per backend sleeps until the earliest deadline. An
    overdue call first gets a cancel request, then, ``grace`` seconds later,
    its socket is shut down. Shutting a socket down (not closing it: the file
    descriptor stays libpq's) makes the blocked ``poll``/``recv`` return at
    once with end-of-file, so psycopg raises and the connection is marked
    broken; the pool then replaces it.
    """

    def __init__(self, name: str, grace: float) -> None:
        self.name = name
        self.grace = grace
        self._cond = threading.Condition()
        self._guards: set[_Guard] = set()
        self._thread: threading.Thread | None = None
        # Each started thread runs while the generation it got is current, so
        # a thread that outlived stop()'s join can never run beside its successor.
        self._generation = 0
        self._wake_at = math.inf  # when the thread wakes up next (under the lock)

    def start(self) -> None:
        with self._cond:
            if self._thread is not None:
                return
            self._generation += 1
            self._thread = threading.Thread(
                target=self._run, args=(self._generation,), name=self.name, daemon=True
            )
            self._thread.start()

    def stop(self) -> None:
        with self._cond:
            thread, self._thread = self._thread, None
            self._generation += 1
            self._cond.notify_all()
        if thread is not None:
            thread.join(timeout=2 * self.grace + 1)

    @contextlib.contextmanager
    def watch(self, conn: psycopg.Connection[Any], limit: float) -> Iterator[_Guard]:
        guard = _Guard(conn, limit)
        with self._cond:
            self._guards.add(guard)
            if guard.deadline < self._wake_at:
                self._cond.notify()  # otherwise the thread wakes early enough
        try:
            yield guard
        finally:
            with self._cond:
                self._guards.discard(guard)

    def renew(self, guard: _Guard) -> None:
        """A new statement starts: it gets the full limit again."""
        with self._cond:
            guard.deadline = time.monotonic() + guard.limit
            guard.cancelled = False
            # No notify: a later deadline never needs an earlier wake-up.

    def interrupt(self) -> int:
        """Cancel every watched call now; returns how many there were."""
        with self._cond:
            now = time.monotonic()
            for guard in self._guards:
                guard.deadline = min(guard.deadline, now)
            self._cond.notify()
            return len(self._guards)

    def _run(self, generation: int) -> None:
        with self._cond:
            while self._generation == generation:
                now = time.monotonic()
                wake = math.inf
                to_cancel: list[_Guard] = []
                for guard in list(self._guards):
                    if guard.deadline > now:
                        wake = min(wake, guard.deadline)
                    elif not guard.cancelled:
                        guard.cancelled = True
                        guard.deadline = now + self.grace
                        to_cancel.append(guard)
                    else:
                        # Still blocked after the cancel request: the server
                        # is not answering at all. Under the lock, so a call
                        # that already finished is never touched.
                        self._guards.discard(guard)
                        self._sever(guard)
                if to_cancel:
                    self._cond.release()
                    try:
                        for guard in to_cancel:
                            self._cancel(guard)
                    finally:
                        self._cond.acquire()
                    continue
                self._wake_at = wake
                self._cond.wait(None if wake == math.inf else wake - now)
                self._wake_at = -math.inf  # awake: every new guard must notify

    def _cancel(self, guard: _Guard) -> None:
        log.warning(
            "PostgreSQL statement still running after %.1f s: sending a cancel request",
            guard.limit,
        )
        try:
            # cancel_safe: the request has its own timeout (a frozen server
            # may not accept the cancel connection either).
            guard.conn.cancel_safe(timeout=self.grace)
        except Exception as exc:  # noqa: BLE001 - any failure: the sever step follows
            log.warning("PostgreSQL cancel request failed: %s", _describe(exc))

    @staticmethod
    def _sever(guard: _Guard) -> None:
        guard.severed = True
        try:
            fd = guard.conn.pgconn.socket
            dup = socket.socket(fileno=os.dup(fd))
        except (OSError, psycopg.Error):
            return  # already closed: nothing is blocked on it
        log.warning("PostgreSQL server not answering the cancel request: closing the connection")
        with dup:
            with contextlib.suppress(OSError):
                dup.shutdown(socket.SHUT_RDWR)


def render_queries(owner: object) -> None:
    """Render each ``_q_*`` statement of ``owner`` to bytes once.

    psycopg renders a composed statement (identifiers quoted, parts joined)
    at every execute: about 5 % of the server's CPU per job in a cluster's
    one-job-at-a-time profile. The text never changes (no connection-specific
    parts: identifiers and literals render the same without one).
    """
    for name, query in list(vars(owner).items()):
        if name.startswith("_q_") and isinstance(query, sql.Composable):
            setattr(owner, name, query.as_bytes(None))


class PostgresBackend:
    """PostgreSQL as the record store.

    No I/O happens before :meth:`open`, so a bad URL is reported at
    configuration time (:class:`~stackduck_trio._config.ConfigError`).

    Args:
        url: a ``postgresql://`` URL (or a libpq ``key=value`` string). Besides
            libpq's own parameters the URL may carry ``schema`` and
            ``statement_timeout`` (seconds).
        schema: the schema holding the tables; wins over the URL's ``schema``;
            default ``stackduck``. Created if missing.
        pool_min, pool_max: connections the pool keeps and may open. The
            committer uses one at a time; more help concurrent reads.
        statement_timeout: seconds any statement may run (server side), and
            the base of the watchdog's deadline; wins over the URL's.
        connect_timeout: seconds to open a connection, or to wait for the pool
            to provide one.
        copy_threshold: batches with this many upserts or more use COPY.
    """

    kind = "postgres"
    threaded = True
    #: reads may run on other threads than the writer's (each takes its own
    #: pooled connection)
    concurrent_reads = True

    def __init__(
        self,
        url: str,
        *,
        schema: str | None = None,
        pool_min: int = 1,
        pool_max: int = 4,
        statement_timeout: float | None = None,
        connect_timeout: float = 5.0,
        copy_threshold: int = 64,
    ) -> None:
        libpq_url, ours = _split_url(url)
        try:
            params = conninfo_to_dict(libpq_url)
        except psycopg.Error as exc:
            raise ConfigError(
                f"DATABASE_URL is not a valid PostgreSQL URL: {_describe(exc)}"
            ) from None
        # libpq checks ports only when connecting; a typo should fail at start-up.
        if not all(p.isdigit() for p in str(params.get("port") or "").split(",") if p):
            raise ConfigError(
                f"DATABASE_URL is not a valid PostgreSQL URL: bad port {params['port']!r}"
            )
        schema = schema if schema is not None else ours.get("schema", DEFAULT_SCHEMA)
        if not schema or schema[0].isdigit() or not set(schema) <= _SCHEMA_CHARS:
            raise ConfigError(
                f"schema {schema!r}: use lowercase letters, digits and _, not starting with a digit"
            )
        if len(schema) > 63 or schema.startswith("pg_"):
            raise ConfigError(f"schema {schema!r}: at most 63 characters, not starting with pg_")
        if statement_timeout is None:
            try:
                statement_timeout = float(ours.get("statement_timeout", "10"))
            except ValueError:
                raise ConfigError("DATABASE_URL: statement_timeout must be seconds") from None
        if not (math.isfinite(statement_timeout) and statement_timeout > 0):
            raise ConfigError("statement_timeout must be a positive number of seconds")
        if not 1 <= pool_min <= pool_max:
            raise ConfigError("pool sizes must satisfy 1 <= pool_min <= pool_max")
        for key, value in _CONNECT_DEFAULTS.items():
            params.setdefault(key, value)
        # libpq counts whole seconds (and treats 1 as 2).
        params.setdefault("connect_timeout", str(max(2, math.ceil(connect_timeout))))
        self.url = url
        self.schema = schema
        self.pool_min = pool_min
        self.pool_max = pool_max
        self.statement_timeout = statement_timeout
        self.connect_timeout = connect_timeout
        self.copy_threshold = copy_threshold
        #: Where the store is, for messages (never the password).
        self.display = (
            f"{params.get('host') or 'localhost'}:{params.get('port') or 5432}/"
            f"{params.get('dbname') or params.get('user') or ''} (schema {schema})"
        )
        self._conninfo = make_conninfo("", **params)
        self._grace = min(2.0, max(0.25, statement_timeout / 2))
        self._watchdog = _Watchdog(f"stackduck-pg-watchdog-{schema}", self._grace)
        self._pool: ConnectionPool[psycopg.Connection[Any]] | None = None
        self._staged: weakref.WeakSet[psycopg.Connection[Any]] = weakref.WeakSet()
        self._last_connect_error: str | None = None
        self._last_connect_error_at = -math.inf
        self._build_queries()
        render_queries(self)

    # -- SQL -------------------------------------------------------------------

    def _build_queries(self) -> None:
        jobs = sql.Identifier(self.schema, "jobs")
        cols = sql.SQL(", ").join(map(sql.Identifier, _COLUMNS))
        guarded = sql.SQL(
            " ON CONFLICT (id) DO UPDATE SET {sets} WHERE {jobs}.version < EXCLUDED.version"
        ).format(
            sets=sql.SQL(", ").join(
                sql.SQL("{c} = EXCLUDED.{c}").format(c=sql.Identifier(c)) for c in _COLUMNS[1:]
            ),
            jobs=jobs,
        )
        # Records without a base: insert, or overwrite an older version. One row:
        # its rowcount (0 or 1) tells whether it was written (cheaper than
        # RETURNING).
        self._q_upsert = (
            sql.SQL("INSERT INTO {jobs} ({cols}) VALUES ({values})").format(
                jobs=jobs, cols=cols, values=sql.SQL(", ").join([sql.Placeholder()] * len(_COLUMNS))
            )
            + guarded
        )
        # Records with a base: compare-and-set on status, lease and version, and
        # never an insert (a missing row was purged meanwhile). The row is
        # locked first and compared as locked: its latest version, after any
        # concurrent writer committed (the UPDATE's own scan would compare
        # the version its snapshot sees, which may be older). One row: the
        # parameters are _update_params(_cas_row(job)).
        self._q_update = sql.SQL(
            "WITH cur AS (SELECT id, status, lease_id, version FROM {jobs} WHERE id = %s "
            "FOR UPDATE) UPDATE {jobs} j SET {sets} FROM cur WHERE j.id = cur.id "
            "AND cur.status = %s AND cur.lease_id IS NOT DISTINCT FROM %s AND cur.version < %s"
        ).format(
            jobs=jobs,
            sets=sql.SQL(", ").join(
                sql.SQL("{c} = %s").format(c=sql.Identifier(c)) for c in _COLUMNS[1:]
            ),
        )
        # Lock order: rows are locked in id order (code points, as sorted() and
        # PostgresTier lock them), so concurrent writers cannot deadlock. One
        # statement per row (small batches) locks in the order of the rows,
        # but a batch of both kinds runs the rows of each kind in turn: before
        # them, every existing row of the batch is locked in id order. (The
        # COPY merge does the same in a CTE: an UPDATE ... FROM locks in
        # whatever order its join plan yields.)
        self._q_lock = sql.SQL(
            "WITH locked AS (SELECT id FROM {jobs} WHERE id = ANY(%s::text[]) "
            'ORDER BY id COLLATE "C" FOR UPDATE) SELECT count(*) FROM locked'
        ).format(jobs=jobs)
        # COPY: the staging table holds both kinds (base_status NULL: no base).
        # Only the record columns are copied and merged: never the claim_*
        # columns of PostgresTier.
        stage = sql.Identifier("pg_temp", _STAGE)
        self._q_stage = sql.SQL(
            "CREATE TEMP TABLE IF NOT EXISTS {stage} (LIKE {jobs}, base_status text, "
            "base_lease text) ON COMMIT DELETE ROWS"
        ).format(stage=sql.Identifier(_STAGE), jobs=jobs)
        self._q_copy = sql.SQL("COPY {stage} ({cols}) FROM STDIN (FORMAT BINARY)").format(
            stage=stage, cols=sql.SQL(", ").join(map(sql.Identifier, _CAS_COLUMNS))
        )
        # The lock is a CTE of the conditional UPDATE (no extra round trip),
        # and the rows are compared as locked (see _q_update). It carries the
        # staged rows, so the UPDATE joins two relations only: with three, the
        # planner underestimates the join and may rescan a CTE for every row.
        # Both merges answer one row: how many rows they wrote, and which ones
        # only if some were refused (parameter: the number of rows merged) --
        # 10k ids travelling back cost more than the merge's tail.
        written = sql.SQL(
            " RETURNING {id}) SELECT count(*), CASE WHEN count(*) < %s THEN array_agg(id) END "
            "FROM written"
        )
        self._q_merge_cas = sql.SQL(
            "WITH s AS (SELECT {scols}, j.status AS row_status, j.lease_id AS row_lease, "
            "j.version AS row_version FROM {jobs} j JOIN {stage} s ON j.id = s.id "
            'ORDER BY j.id COLLATE "C" FOR UPDATE OF j), written AS ('
            "UPDATE {jobs} j SET {sets} FROM s WHERE j.id = s.id AND s.base_status IS NOT NULL "
            "AND s.row_status = s.base_status AND s.row_lease IS NOT DISTINCT FROM s.base_lease "
            "AND s.row_version < s.version"
        ).format(
            jobs=jobs,
            stage=stage,
            sets=sql.SQL(", ").join(
                sql.SQL("{c} = s.{c}").format(c=sql.Identifier(c)) for c in _COLUMNS[1:]
            ),
            scols=sql.SQL(", ").join(
                sql.SQL("s.{}").format(sql.Identifier(c)) for c in _CAS_COLUMNS
            ),
        ) + written.format(id=sql.SQL("j.id"))
        self._q_merge = (
            sql.SQL(
                "WITH written AS (INSERT INTO {jobs} ({cols}) SELECT {cols} FROM {stage} "
                "WHERE base_status IS NULL"
            ).format(jobs=jobs, cols=cols, stage=stage)
            + guarded
            + written.format(id=sql.SQL("id"))
        )
        self._q_delete = sql.SQL("DELETE FROM {jobs} WHERE id = ANY(%s)").format(jobs=jobs)
        self._q_active = sql.SQL(
            "SELECT {cols} FROM {jobs} WHERE " + _ACTIVE_SQL + " ORDER BY seq, created_at"
        ).format(cols=cols, jobs=jobs)
        self._q_get = sql.SQL("SELECT {cols} FROM {jobs} WHERE id = %s").format(
            cols=cols, jobs=jobs
        )
        self._q_find_key = sql.SQL(
            "SELECT {cols} FROM {jobs} WHERE idempotency_key = %s ORDER BY created_at, id LIMIT 1"
        ).format(cols=cols, jobs=jobs)
        # Two partial indexes answer these (jobs_due/jobs_dead_type): cheap
        # however many completed rows there are.
        self._q_waiting_counts = sql.SQL(
            "SELECT job_type, 'scheduled', count(*) FROM {jobs} "
            "WHERE status = 'scheduled' AND claim_token IS NULL GROUP BY job_type "
            "UNION ALL SELECT job_type, 'failed', count(*) FROM {jobs} "
            "WHERE status = 'failed' GROUP BY job_type"
        ).format(jobs=jobs)
        self._q_counts = sql.SQL("SELECT status, count(*) FROM {jobs} GROUP BY status").format(
            jobs=jobs
        )
        # Keyset pages (migration 4's indexes); the first page starts after (-inf, '').
        dead = (
            "FROM {jobs} WHERE status = 'failed'{of_type} "
            f'AND ({_DEAD_AT}, id COLLATE "C") > (%s, %s) '
            f'ORDER BY {_DEAD_AT}, id COLLATE "C" LIMIT %s'
        )
        of_type = sql.SQL(" AND job_type = %s")
        self._q_dead = sql.SQL("SELECT {cols} " + dead).format(
            cols=cols, jobs=jobs, of_type=sql.SQL("")
        )
        self._q_dead_type = sql.SQL("SELECT {cols} " + dead).format(
            cols=cols, jobs=jobs, of_type=of_type
        )
        self._q_dead_ids = sql.SQL("SELECT id " + dead).format(jobs=jobs, of_type=sql.SQL(""))
        self._q_dead_ids_type = sql.SQL("SELECT id " + dead).format(jobs=jobs, of_type=of_type)
        # Rows the record-store tier holds (claimed, or settled with a final
        # write pending) are not waiting for a queue: a reconcile must not
        # push them into another tier.
        self._q_queued = sql.SQL(
            "SELECT {cols} FROM {jobs} WHERE " + _WAITING_SQL + ' AND id COLLATE "C" > %s '
            "AND claim_token IS NULL AND claim_owner IS NULL "
            'ORDER BY id COLLATE "C" LIMIT %s'
        ).format(cols=cols, jobs=jobs)
        self._q_load_running = sql.SQL("SELECT {cols} FROM {jobs} WHERE id = ANY(%s)").format(
            cols=cols, jobs=jobs
        )
        # jobs_running (migration 5), read in its order; the lease test is a filter.
        self._q_stale = sql.SQL(
            "SELECT {cols} FROM {jobs} WHERE " + _UNCLAIMED_RUNNING_SQL + " "
            "AND (lease_expires_at IS NULL OR lease_expires_at < %s) "
            'ORDER BY started_at NULLS FIRST, id COLLATE "C" LIMIT %s'
        ).format(cols=cols, jobs=jobs)
        paused = sql.Identifier(self.schema, "paused_types")
        # Pausing twice keeps the first pause's time; resuming twice deletes nothing.
        self._q_pause = sql.SQL(
            "INSERT INTO {paused} (job_type, paused_at) VALUES (%s, %s) "
            "ON CONFLICT (job_type) DO NOTHING"
        ).format(paused=paused)
        self._q_resume = sql.SQL("DELETE FROM {paused} WHERE job_type = %s").format(paused=paused)
        self._q_paused = sql.SQL("SELECT job_type FROM {paused} ORDER BY job_type").format(
            paused=paused
        )
        limits = sql.Identifier(self.schema, "type_limits")
        # The rate's state (tat) is kept only while the rate and burst stay the
        # same (stackduck_core.Limiter.set says why).
        self._q_set_limit = sql.SQL(
            "INSERT INTO {limits} (job_type, rate, burst, max_running, updated_at) "
            "VALUES (%s, %s, %s, %s, %s) ON CONFLICT (job_type) DO UPDATE SET "
            "rate = excluded.rate, burst = excluded.burst, max_running = excluded.max_running, "
            "updated_at = excluded.updated_at, "
            "tat = CASE WHEN excluded.rate IS NOT DISTINCT FROM {limits}.rate "
            "AND excluded.burst IS NOT DISTINCT FROM {limits}.burst THEN {limits}.tat END"
        ).format(limits=limits)
        self._q_clear_limit = sql.SQL("DELETE FROM {limits} WHERE job_type = %s").format(
            limits=limits
        )
        self._q_limits = sql.SQL(
            "SELECT job_type, rate, burst, max_running FROM {limits} ORDER BY job_type"
        ).format(limits=limits)
        # Retention: bounded deletes, oldest first, by an index range scan
        # (jobs_finished, jobs_dead); rows locked elsewhere are left for later.
        self._q_prune_finished = sql.SQL(
            "DELETE FROM {jobs} WHERE id IN (SELECT id FROM {jobs} "
            "WHERE status IN ('completed', 'cancelled') AND completed_at < %s "
            "ORDER BY completed_at LIMIT %s FOR UPDATE SKIP LOCKED)"
        ).format(jobs=jobs)
        self._q_prune_dead = sql.SQL(
            "DELETE FROM {jobs} WHERE id IN (SELECT id FROM {jobs} "
            f"WHERE status = 'failed' AND {_DEAD_AT} < %s "
            f"ORDER BY {_DEAD_AT} LIMIT %s FOR UPDATE SKIP LOCKED)"
        ).format(jobs=jobs)

    # -- lifecycle ---------------------------------------------------------------

    def open(self) -> None:
        """Migrate the schema (under the advisory lock) and fill the pool."""
        if self._pool is not None:
            return
        self._watchdog.start()
        opened = False
        try:
            self._migrate()
            pool: ConnectionPool[psycopg.Connection[Any]] = ConnectionPool(
                self._conninfo,
                connection_class=self._connection_class(),
                kwargs={"autocommit": True},
                min_size=self.pool_min,
                max_size=self.pool_max,
                open=False,
                configure=self._configure,
                check=self._check,
                name=f"stackduck-{self.schema}",
                timeout=self.connect_timeout,
                # Give up a background reconnect after this long: the next
                # request starts a fresh one at once, so the core's health
                # backoff, not the pool's growing one, paces a long outage.
                reconnect_timeout=max(self.connect_timeout, 5.0),
            )
            try:
                pool.open(wait=True, timeout=self.connect_timeout)
            except PoolTimeout:
                pool.close(timeout=1.0)
                raise StorageUnavailable(
                    f"cannot open the PostgreSQL store at {self.display}: "
                    f"no pooled connection within {self.connect_timeout:g} s"
                    + self._last_error_note()
                ) from None
            opened = True
        except psycopg.Error as exc:
            raise StorageUnavailable(
                f"cannot open the PostgreSQL store at {self.display}: {_describe(exc)}"
            ) from exc
        finally:
            if not opened:
                self._watchdog.stop()
        self._pool = pool
        log.info("PostgreSQL record store at %s, schema version %d", self.display, SCHEMA_VERSION)

    def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.close(timeout=self._grace)
        self._watchdog.stop()

    def interrupt(self) -> int:
        """Cancel the statements running now (thread-safe; call from any thread).

        The blocked call raises :class:`StorageUnavailable` shortly after;
        this is what a trio task should call when it is cancelled while
        waiting for the store's thread. Returns the number of calls affected.
        """
        return self._watchdog.interrupt()

    def _connection_class(self) -> type[psycopg.Connection[Any]]:
        """A Connection class that remembers why the last connect failed.

        The pool retries connections in the background and reports only "no
        connection within N s"; the reason (refused, bad password...) is what
        an operator needs, so it is kept for :class:`StorageUnavailable`.
        """
        backend = weakref.proxy(self)

        class _Connection(psycopg.Connection[Any]):
            #: time.monotonic() when a statement on it last succeeded
            last_ok = -math.inf

            @classmethod
            def connect(cls, conninfo: str = "", **kwargs: Any) -> Any:
                try:
                    conn = super().connect(conninfo, **kwargs)
                except psycopg.Error as exc:
                    with contextlib.suppress(ReferenceError):
                        backend._last_connect_error = _describe(exc)
                        backend._last_connect_error_at = time.monotonic()
                    raise
                with contextlib.suppress(ReferenceError):
                    backend._last_connect_error = None
                return conn

        return _Connection

    def _last_error_note(self) -> str:
        error = self._last_connect_error
        return f" (last connection error: {error})" if error else ""

    def _configure(self, conn: psycopg.Connection[Any]) -> None:
        """Session settings of every new connection (pool ``configure`` hook)."""
        conn.execute(
            "SELECT set_config('statement_timeout', %s, false)",
            (f"{math.ceil(self.statement_timeout * 1000)}ms",),
        )

    def _check(self, conn: psycopg.Connection[Any]) -> None:
        """Pool ``check`` hook: ``check_connection``, watched, draining on a dead server.

        Skipped for a connection that answered within :data:`CHECK_AFTER_IDLE`.
        """
        if time.monotonic() - getattr(conn, "last_ok", -math.inf) < CHECK_AFTER_IDLE:
            return
        try:
            with self._watchdog.watch(conn, self.connect_timeout):
                ConnectionPool.check_connection(conn)
        except Exception:
            if conn.broken and self._pool is not None:
                # The server went away: every idle connection is dead too.
                self._pool.drain()
            raise

    def _migrate(self) -> None:
        """Bring the schema to :data:`SCHEMA_VERSION` (first instance wins the lock)."""
        migrate_timeout = max(60.0, self.statement_timeout)
        with psycopg.connect(self._conninfo, autocommit=True) as conn:
            with self._watchdog.watch(conn, migrate_timeout + self._grace):
                with conn.transaction():
                    conn.execute(
                        "SELECT set_config('statement_timeout', %s, true)",
                        (f"{math.ceil(migrate_timeout * 1000)}ms",),
                    )
                    # Transaction-scoped: released by COMMIT/ROLLBACK and by a
                    # dropped connection, so it can never leak.
                    conn.execute("SELECT pg_advisory_xact_lock(%s)", (_lock_key(self.schema),))
                    self._migrate_locked(conn)

    def _migrate_locked(self, conn: psycopg.Connection[Any]) -> None:
        schema = sql.Identifier(self.schema)
        # Look before creating: IF NOT EXISTS still needs the CREATE privilege,
        # and a least-privilege role must be able to run an up-to-date schema.
        if conn.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", (self.schema,)).fetchone():
            pass
        else:
            conn.execute(sql.SQL("CREATE SCHEMA {}").format(schema))
        has_table = conn.execute(
            "SELECT 1 FROM pg_tables WHERE schemaname = %s AND tablename = 'schema_migrations'",
            (self.schema,),
        ).fetchone()
        if not has_table:
            conn.execute(
                sql.SQL(
                    "CREATE TABLE {} (version integer PRIMARY KEY, description text NOT NULL, "
                    "applied_at timestamptz NOT NULL)"
                ).format(sql.Identifier(self.schema, "schema_migrations"))
            )
        row = conn.execute(
            sql.SQL("SELECT coalesce(max(version), 0) FROM {}").format(
                sql.Identifier(self.schema, "schema_migrations")
            )
        ).fetchone()
        current = int(row[0]) if row else 0
        if current > SCHEMA_VERSION:
            raise StorageUnavailable(
                f"the PostgreSQL store at {self.display} has schema version {current}, newer "
                f"than this server ({SCHEMA_VERSION}); upgrade Stackduck"
            )
        jobs = sql.Identifier(self.schema, "jobs")
        paused = sql.Identifier(self.schema, "paused_types")
        limits = sql.Identifier(self.schema, "type_limits")
        for version, description, statements in _MIGRATIONS:
            if version <= current:
                continue
            for statement in statements:
                conn.execute(sql.SQL(statement).format(jobs=jobs, paused=paused, limits=limits))
            conn.execute(
                sql.SQL(
                    "INSERT INTO {} (version, description, applied_at) VALUES (%s, %s, %s)"
                ).format(sql.Identifier(self.schema, "schema_migrations")),
                (version, description, datetime.datetime.now(datetime.UTC)),
            )
            log.info("PostgreSQL schema %s migrated to version %d", self.schema, version)

    def _acquire(
        self, pool: ConnectionPool[psycopg.Connection[Any]], what: str
    ) -> psycopg.Connection[Any]:
        """A checked connection from the pool within ``connect_timeout``.

        The pool connects in the background and, while it cannot, only says
        "no connection within N s". Waiting in short slices lets a call give
        up as soon as a connection attempt has been refused, instead of
        holding the committer for the whole timeout on every retry of an
        outage (the core's health machine paces the retries); a server that
        is merely slow to accept still gets the full ``connect_timeout``.
        """
        start = time.monotonic()
        deadline = start + self.connect_timeout
        while True:
            try:
                return pool.getconn(timeout=max(0.01, min(_SLICE, deadline - time.monotonic())))
            except PoolTimeout:
                now = time.monotonic()
                refused = (
                    self._last_connect_error is not None
                    and now - self._last_connect_error_at < self.connect_timeout
                )
                if refused or now >= deadline:
                    raise StorageUnavailable(
                        f"PostgreSQL {what}: no connection to {self.display} "
                        f"(waited {now - start:.1f} s)" + self._last_error_note()
                    ) from None

    @contextlib.contextmanager
    def _connection(
        self, what: str, limit: float | None = None
    ) -> Iterator[tuple[psycopg.Connection[Any], _Guard]]:
        """A pooled connection, watched; psycopg errors become StorageUnavailable."""
        pool = self._pool
        if pool is None:
            raise StorageUnavailable("the PostgreSQL store is not open")
        try:
            conn = self._acquire(pool, what)
        except psycopg.Error as exc:  # PoolClosed: closed under our feet
            raise StorageUnavailable(f"PostgreSQL {what}: {_describe(exc)}") from exc
        try:
            with self._watchdog.watch(
                conn, (limit or self.statement_timeout) + self._grace
            ) as guard:
                try:
                    yield conn, guard
                    conn.last_ok = time.monotonic()  # type: ignore[attr-defined]
                except psycopg.Error as exc:
                    if guard.severed or guard.cancelled:
                        reason = (
                            f"no answer within {guard.limit:g} s; the statement was cancelled "
                            f"by the client ({_describe(exc)})"
                        )
                    else:
                        reason = _describe(exc)
                    if conn.broken or getattr(exc, "sqlstate", None) == _READ_ONLY:
                        # The server restarted (the idle connections are dead too),
                        # or a failover left us on a read-only standby: reconnect
                        # all, re-resolving the host name.
                        pool.drain()
                    raise StorageUnavailable(f"PostgreSQL {what} failed: {reason}") from exc
        finally:
            pool.putconn(conn)

    # -- the Backend protocol ----------------------------------------------------

    def commit(self, batch: Batch) -> frozenset[str]:
        """Write one batch in one transaction; the ids of the refused upserts.

        See ``Backend.commit``: records without a base are upserted (guarded
        by version), records with one are compare-and-set updates; deletes
        follow. Rows are locked in id order (see :meth:`_build_queries`).
        """
        # One statement cannot touch a row twice: one record per job.
        latest = merge_upserts(batch.upserts)
        # A stable order of row locks: concurrent writers cannot deadlock.
        jobs = [latest[key] for key in sorted(latest)]
        deletes = sorted({_clean(job_id) for job_id in batch.deletes})
        if not jobs and not deletes:
            # Nothing to write, but still a round trip (the pool's check), as
            # SQLite's empty transaction is: an empty commit is a health probe.
            with self._connection("probe"):
                return frozenset()
        with self._connection("commit") as (conn, guard):
            if (len(jobs), bool(deletes)) in ((1, False), (0, True)):
                # One statement is a transaction of its own (autocommit): the
                # common group commit of a lone write costs one round trip and
                # half the client CPU of a pipelined transaction.
                if not jobs:
                    conn.execute(self._q_delete, (deletes,))
                    return frozenset()
                (job,) = jobs
                if job.base is None:
                    cur = conn.execute(self._q_upsert, _row(job))
                else:
                    cur = conn.execute(self._q_update, _update_params(_cas_row(job)))
                return frozenset() if cur.rowcount == 1 else frozenset(latest)
            if len(jobs) < self.copy_threshold:
                return self._commit_small(conn, jobs, deletes)
            return self._commit_copy(conn, guard, jobs, deletes)

    def _commit_small(
        self, conn: psycopg.Connection[Any], jobs: list[Job], deletes: list[str]
    ) -> frozenset[str]:
        """:meth:`commit` of a few rows (in id order): one statement per row, pipelined.

        BEGIN, the statements and COMMIT travel together: one round trip
        however far away the server is. (A set-based statement over arrays
        costs more here: its generic plan cannot know how few rows come.)
        """
        cas = [job for job in jobs if job.base is not None]
        plain = [job for job in jobs if job.base is None]
        cursors: list[tuple[psycopg.Cursor[Any], list[Job]]] = []
        with conn.pipeline(), conn.transaction():
            if cas and plain:
                conn.execute(self._q_lock, ([_clean(job.id) for job in jobs],))
            if cas:
                cur = conn.cursor()
                params = [_update_params(_cas_row(job)) for job in cas]
                cur.executemany(self._q_update, params, returning=True)
                cursors.append((cur, cas))
            if plain:
                cur = conn.cursor()
                cur.executemany(self._q_upsert, [_row(job) for job in plain], returning=True)
                cursors.append((cur, plain))
            if deletes:
                conn.execute(self._q_delete, (deletes,))
        # One result per row, in order: its rowcount is 0 if the row was refused.
        refused: list[str] = []
        for cur, kind in cursors:
            for job in kind:
                if cur.rowcount != 1:
                    refused.append(job.id)
                cur.nextset()
        return frozenset(refused)

    def _commit_copy(
        self,
        conn: psycopg.Connection[Any],
        guard: _Guard,
        jobs: list[Job],
        deletes: list[str],
    ) -> frozenset[str]:
        """:meth:`commit` of many rows (in id order): COPY them (binary) into the
        staging table, then merge."""
        if conn not in self._staged:
            # Outside the transaction: a rollback would undo the CREATE.
            conn.execute(self._q_stage)
            self._staged.add(conn)
        refused: set[str] = set()
        # COPY cannot be pipelined; each statement gets a full window.
        with conn.transaction(), conn.cursor() as cur:
            with cur.copy(self._q_copy) as copy:
                copy.set_types(_COPY_TYPES)
                for job in jobs:
                    copy.write_row(_cas_row(job))
            # The conditional updates first: they lock every row of the batch.
            cas = [job for job in jobs if job.base is not None]
            plain = [job for job in jobs if job.base is None]
            for query, kind in ((self._q_merge_cas, cas), (self._q_merge, plain)):
                if kind:
                    self._watchdog.renew(guard)
                    count, written = cur.execute(query, (len(kind),)).fetchone() or (0, None)
                    if count < len(kind):
                        # The ids as stored (a NUL is U+FFFD), of the rows written.
                        done = set(written or ())
                        refused.update(job.id for job in kind if _clean(job.id) not in done)
            if deletes:
                self._watchdog.renew(guard)
                cur.execute(self._q_delete, (deletes,))
            self._watchdog.renew(guard)  # and COMMIT
        return frozenset(refused)

    def load_active(self) -> list[Job]:
        """The rows the queue must hold after a restart, in queue order."""
        # A start-up read of possibly many rows: a longer limit than one write.
        limit = max(60.0, self.statement_timeout)
        with self._connection("load", limit) as (conn, _guard):
            with conn.transaction():
                conn.execute(
                    "SELECT set_config('statement_timeout', %s, true)",
                    (f"{math.ceil(limit * 1000)}ms",),
                )
                rows = conn.execute(self._q_active).fetchall()
        return [row_to_job(row) for row in rows]

    def get(self, job_id: str) -> Job | None:
        if "\x00" in job_id:
            # No stored id has one (ids are ours); PostgreSQL would refuse it.
            if self._pool is None:
                raise StorageUnavailable("the PostgreSQL store is not open")
            return None
        with self._connection("read") as (conn, _guard):
            row = conn.execute(self._q_get, (job_id,)).fetchone()
        return None if row is None else row_to_job(row)

    def find_key(self, key: str) -> Job | None:
        """The (oldest) job enqueued with idempotency ``key``, if any."""
        with self._connection("read") as (conn, _guard):
            row = conn.execute(self._q_find_key, (_clean(key),)).fetchone()
        return None if row is None else row_to_job(row)

    def counts(self) -> dict[str, int]:
        with self._connection("count") as (conn, _guard):
            rows: Sequence[tuple[str, int]] = conn.execute(self._q_counts).fetchall()
        return {status: int(n) for status, n in rows}

    def waiting_counts(self) -> dict[str, tuple[int, int]]:
        """Per job type ``(scheduled, dead)``; see ``Backend.waiting_counts``.

        Scheduled rows claimed by the record-store tier (being delivered) are
        not counted as scheduled.
        """
        with self._connection("count") as (conn, _guard):
            rows: Sequence[tuple[str, str, int]] = conn.execute(self._q_waiting_counts).fetchall()
        out: dict[str, tuple[int, int]] = {}
        for job_type, status, n in rows:
            scheduled, dead = out.get(job_type, (0, 0))
            if status == "scheduled":
                scheduled += int(n)
            else:
                dead += int(n)
            out[job_type] = (scheduled, dead)
        return out

    def set_paused(self, job_type: str, paused: bool) -> None:
        """Record a pause (or its end) of ``job_type``: one autocommit statement."""
        job_type = _clean(job_type)  # job types are validated; never store a NUL
        with self._connection("pause" if paused else "resume") as (conn, _guard):
            if paused:
                conn.execute(self._q_pause, (job_type, time.time()))
            else:
                conn.execute(self._q_resume, (job_type,))

    def load_paused(self) -> list[str]:
        """The paused job types, sorted."""
        with self._connection("load paused") as (conn, _guard):
            rows: Sequence[tuple[str]] = conn.execute(self._q_paused).fetchall()
        return [job_type for (job_type,) in rows]

    def set_limit(self, job_type: str, limit: TypeLimit | None) -> None:
        """Record (or remove) a type's limits: one autocommit statement."""
        job_type = _clean(job_type)
        with self._connection("set limit") as (conn, _guard):
            if limit is None:
                conn.execute(self._q_clear_limit, (job_type,))
            else:
                conn.execute(self._q_set_limit, (job_type, *limit_columns(limit), time.time()))

    def load_limits(self) -> dict[str, TypeLimit]:
        with self._connection("load limits") as (conn, _guard):
            rows: Sequence[tuple[Any, ...]] = conn.execute(self._q_limits).fetchall()
        return {str(t): limit_from_columns(r, b, m) for (t, r, b, m) in rows}

    def prune_finished(self, before: float, limit: int) -> int:
        with self._connection("prune finished") as (conn, _guard):
            return conn.execute(self._q_prune_finished, (before, limit)).rowcount

    def prune_dead(self, before: float, limit: int) -> int:
        with self._connection("prune dead") as (conn, _guard):
            return conn.execute(self._q_prune_dead, (before, limit)).rowcount

    def _dead_rows(
        self, job_type: str | None, start: tuple[float, str], n: int, *, ids_only: bool
    ) -> list[tuple[Any, ...]]:
        """The first ``n`` dead rows after ``start`` (whole records, or ids only)."""
        with self._connection("dead-letter read") as (conn, _guard):
            if job_type is None:
                query = self._q_dead_ids if ids_only else self._q_dead
                return conn.execute(query, (*start, n)).fetchall()
            query = self._q_dead_ids_type if ids_only else self._q_dead_type
            return conn.execute(query, (_clean(job_type), *start, n)).fetchall()

    def list_dead(self, job_type: str | None, after: str, limit: int) -> tuple[list[Job], str]:
        """Dead-lettered jobs by ``(completed_at, id)``; see ``Backend.list_dead``.

        One index range scan (``jobs_dead``, or ``jobs_dead_type`` for one
        type) of ``limit + 1`` rows: the extra row tells whether a next page exists.
        """
        start = parse_dead_page_token(after)
        _check_limit(limit)
        jobs = [
            row_to_job(row) for row in self._dead_rows(job_type, start, limit + 1, ids_only=False)
        ]
        if len(jobs) > limit:
            return jobs[:limit], dead_page_token(jobs[limit - 1])
        return jobs, ""

    def dead_ids(self, job_type: str | None, limit: int) -> list[str]:
        """Ids of the first ``limit`` dead jobs; see ``Backend.dead_ids`` (index-only)."""
        _check_limit(limit)
        rows = self._dead_rows(job_type, (-math.inf, ""), limit, ids_only=True)
        return [job_id for (job_id,) in rows]

    def load_queued(self, after: str, limit: int) -> tuple[list[Job], str]:
        """Queued and scheduled jobs by id; see ``Backend.load_queued`` (``jobs_queued``).

        Rows held by the record store as a queue tier (claim columns set: claimed,
        removed or settled) are left out: they are in no other tier's business.
        """
        start = parse_id_token(after)
        _check_limit(limit)
        with self._connection("load queued") as (conn, _guard):
            rows = conn.execute(self._q_queued, (start, limit + 1)).fetchall()
        jobs = [row_to_job(row) for row in rows]
        if len(jobs) > limit:
            return jobs[:limit], jobs[limit - 1].id
        return jobs, ""

    def load_running(self, job_ids: Sequence[str]) -> list[Job]:
        """The current records of ``job_ids``: one ``= ANY`` query (``jobs_pkey``).

        See ``Backend.load_running``; records come in the order of ``job_ids``.
        """
        # No stored id has a NUL (ids are ours), and PostgreSQL would refuse one.
        wanted = [i for i in dict.fromkeys(job_ids) if _plain_text(i)]
        if not wanted:
            if self._pool is None:
                raise StorageUnavailable("the PostgreSQL store is not open")
            return []
        with self._connection("load running") as (conn, _guard):
            rows = conn.execute(self._q_load_running, (wanted,)).fetchall()
        found = {job.id: job for job in map(row_to_job, rows)}
        return [found[i] for i in wanted if i in found]

    def stale_running(self, before: float, limit: int) -> list[Job]:
        """Running jobs whose lease ran out before ``before``; see ``Backend.stale_running``.

        Rows claimed through the record store's queue tier (``claim_token``
        set) are left out: :class:`~stackduck_trio._pgtier.PostgresTier`'s
        reaper owns them. One scan of ``jobs_running`` in ``started_at``
        order, stopping after ``limit`` matches.
        """
        _check_limit(limit)
        with self._connection("stale running read") as (conn, _guard):
            rows = conn.execute(self._q_stale, (before, limit)).fetchall()
        return [row_to_job(row) for row in rows]
