"""The record store as the shared queue tier: claims with ``FOR UPDATE SKIP LOCKED``.

:class:`PostgresTier` keeps the :class:`~stackduck_trio._tier.QueueTier`
contract on the ``jobs`` table itself, so instances sharing a PostgreSQL
record store share a queue without Redis:

* the queue is the rows: ``queued`` rows are ready, ``scheduled`` rows wait
  for ``scheduled_at``; a claim stamps ``claim_token``/``claim_owner``/
  ``claim_until`` (columns of migration 5 that the record writes never
  touch), and only unclaimed rows can be claimed;
* a claim is one statement: the best unclaimed ready rows and due scheduled
  rows of the type, locked with ``FOR UPDATE SKIP LOCKED`` (concurrent
  claimers skip each other's rows instead of waiting), ordered by the same
  placement as every tier (priority, then ready time), then stamped;
* wake-ups: pushes and settles ``NOTIFY`` a channel of the schema with the
  job type; :meth:`PostgresTier.wait_ready` ``LISTEN``\\s on a dedicated
  connection watched by trio (``wait_readable``), so an idle worker on
  another instance hears of a new job within milliseconds.

It is the fallback when Redis is configured but down (ARCHITECTURE §4: "the
record store can be claimed directly"), and the queue of a cluster without
Redis (``STACKDUCK_QUEUE=postgres``). Every operation is one transaction in
a worker thread on the record store's connection pool; the pool's watchdog
bounds it.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import psycopg
import trio
from psycopg import sql

from stackduck_core import EPOCH, Allowance, Job, Status, TypeLimit

from ._postgres import PostgresBackend, render_queries
from ._postgres import _row as job_params
from ._store import (
    _COLUMNS,
    StorageUnavailable,
    limit_columns,
    limit_from_columns,
    row_to_job,
)
from ._tier import HELD, Claim, Claims, Held, TierCounts, TierUnavailable

_WAITING = (Status.QUEUED, Status.SCHEDULED)

log = logging.getLogger("stackduck.pgtier")
T = TypeVar("T")

#: The owner stamped on rows taken out of circulation by :meth:`PostgresTier.remove`
#: (a push of the same record brings them back) ...
REMOVED = "removed"
#: ... and by a settle that ends a delivery (only a newer record brings them back:
#: the holder's final write may not have landed yet, and until it does the row
#: still looks queued).
SETTLED = "settled"


class PostgresTier:
    """The :class:`QueueTier` contract on the record store's ``jobs`` table.

    Args:
        backend: the PostgreSQL record store (opened and migrated by the
            server before the tier is used).
    """

    kind = "postgres"
    holds_records = True

    def __init__(self, backend: PostgresBackend) -> None:
        self.backend = backend
        digest = hashlib.sha1(backend.schema.encode()).hexdigest()[:16]
        #: The NOTIFY channel of this schema (identifiers are at most 63 bytes).
        self.channel = f"stackduck_ready_{digest}"
        self._build_queries()
        render_queries(self)

    def _build_queries(self) -> None:
        jobs = sql.Identifier(self.backend.schema, "jobs")
        paused = sql.Identifier(self.backend.schema, "paused_types")
        cols = sql.SQL(", ").join(map(sql.Identifier, _COLUMNS))
        qcols = sql.SQL(", ").join(sql.SQL("j.{}").format(sql.Identifier(c)) for c in _COLUMNS)
        channel = sql.Literal(self.channel)
        # Ready order = placement(): priority, then the ready time in microseconds
        # since EPOCH (seq for queued rows that have one).
        ready_seq = sql.SQL(
            "CASE WHEN status = 'queued' AND seq > 0 THEN seq "
            "ELSE floor((scheduled_at - {epoch}) * 1000000)::bigint END"
        ).format(epoch=sql.Literal(EPOCH))
        not_paused = sql.SQL(
            "NOT EXISTS (SELECT 1 FROM {paused} p WHERE p.job_type = %(type)s)"
        ).format(paused=paused)
        # FOR UPDATE is not allowed inside UNION arms: each arm is its own CTE.
        self._q_claim = sql.SQL(
            """
            WITH ready AS (
                SELECT id, priority, seq AS rank FROM {jobs}
                WHERE job_type = %(type)s AND status = 'queued' AND claim_token IS NULL
                  AND claim_owner IS NULL
                ORDER BY priority, seq LIMIT %(limit)s FOR UPDATE SKIP LOCKED
            ), due AS (
                SELECT id, priority, {ready_seq} AS rank FROM {jobs}
                WHERE job_type = %(type)s AND status = 'scheduled' AND claim_token IS NULL
                  AND claim_owner IS NULL AND scheduled_at <= %(now)s
                ORDER BY scheduled_at LIMIT %(limit)s FOR UPDATE SKIP LOCKED
            ), picked AS (
                SELECT id, priority, rank FROM (SELECT * FROM ready UNION ALL SELECT * FROM due) c
                WHERE {not_paused}
                ORDER BY priority, rank, id COLLATE "C" LIMIT %(limit)s
            )
            UPDATE {jobs} j SET claim_token = %(token)s, claim_owner = %(owner)s,
                claim_until = %(until)s
            FROM picked WHERE j.id = picked.id
            RETURNING {qcols}, picked.priority, picked.rank
            """
        ).format(jobs=jobs, ready_seq=ready_seq, not_paused=not_paused, qcols=qcols)
        guarded_sets = sql.SQL(", ").join(
            sql.SQL("{c} = EXCLUDED.{c}").format(c=sql.Identifier(c)) for c in _COLUMNS[1:]
        )
        # A pushed record replaces an unclaimed row of an older version, or of
        # the same version when the row was removed (cancel) or is in
        # circulation and differs (another placement). A record equal to the
        # row -- a new job the committer has just written -- is not written
        # twice, and a settled row is left alone unless the record is newer.
        self._q_push = sql.SQL(
            "INSERT INTO {jobs} AS j ({cols}) VALUES ({values}) ON CONFLICT (id) DO UPDATE "
            "SET {sets}, claim_token = NULL, claim_owner = NULL, claim_until = NULL "
            "WHERE j.claim_token IS NULL AND (j.version < EXCLUDED.version "
            "OR (j.version = EXCLUDED.version AND (j.claim_owner = {removed} "
            "OR (j.claim_owner IS NULL AND ({jcols}) IS DISTINCT FROM ({ecols}))))) "
            "RETURNING j.id"
        ).format(
            jobs=jobs,
            cols=cols,
            values=sql.SQL(", ").join([sql.Placeholder()] * len(_COLUMNS)),
            sets=guarded_sets,
            removed=sql.Literal(REMOVED),
            jcols=sql.SQL(", ").join(sql.SQL("j.{}").format(sql.Identifier(c)) for c in _COLUMNS),
            ecols=sql.SQL(", ").join(
                sql.SQL("EXCLUDED.{}").format(sql.Identifier(c)) for c in _COLUMNS
            ),
        )
        self._q_notify = sql.SQL("SELECT pg_notify({channel}, t) FROM unnest(%s::text[]) t").format(
            channel=channel
        )
        # Ending a claim leaves the row out of circulation (a removal mark)
        # unless the job goes back: its record follows (a push, which clears
        # the mark) -- a row whose final write has not landed yet must not be
        # claimed again meanwhile.
        # Rows are locked in id order (code points, as the committer's batches
        # lock them): concurrent transactions on the same rows cannot deadlock.
        locked = (
            "WITH locked AS (SELECT j.id, s.back FROM {jobs} j "
            "JOIN unnest(%s::text[], %s::text[], %s::bool[]) AS s(id, token, back) "
            "ON j.id = s.id AND j.claim_token = s.token "
            'ORDER BY j.id COLLATE "C" FOR UPDATE OF j) '
        )
        # A job going back is in circulation again (its record is pushed in
        # the same transaction); one whose delivery ended is marked SETTLED.
        self._q_unclaim = sql.SQL(
            locked + "UPDATE {jobs} j SET claim_token = NULL, claim_until = NULL, "
            "claim_owner = CASE WHEN locked.back THEN NULL ELSE {settled} END "
            "FROM locked WHERE j.id = locked.id RETURNING j.id, j.job_type"
        ).format(jobs=jobs, settled=sql.Literal(SETTLED))
        self._q_renew = sql.SQL(
            locked + "UPDATE {jobs} j SET claim_until = %s "
            "FROM locked WHERE j.id = locked.id RETURNING j.id"
        ).format(jobs=jobs)
        self._q_expired = sql.SQL(
            "SELECT {cols}, claim_token, claim_owner, claim_until FROM {jobs} "
            "WHERE claim_token IS NOT NULL AND claim_until <= %s "
            'ORDER BY claim_until, id COLLATE "C" LIMIT %s'
        ).format(cols=cols, jobs=jobs)
        self._q_remove = sql.SQL(
            "WITH locked AS (SELECT id FROM {jobs} WHERE id = ANY(%s) "
            "AND claim_token IS NULL AND claim_owner IS NULL "
            "AND status IN ('queued', 'scheduled') "
            'ORDER BY id COLLATE "C" FOR UPDATE) '
            "UPDATE {jobs} j SET claim_owner = {removed} FROM locked "
            "WHERE j.id = locked.id RETURNING {qcols}"
        ).format(jobs=jobs, removed=sql.Literal(REMOVED), qcols=qcols)
        self._q_held = sql.SQL(
            "SELECT id FROM {jobs} WHERE id = ANY(%s) AND claim_token IS NOT NULL"
        ).format(jobs=jobs)
        limits = sql.Identifier(self.backend.schema, "type_limits")
        # Claims of a limited type hold its limits row: one claimer of the
        # type at a time, so the running count it reads cannot be stale.
        self._q_limit_lock = sql.SQL(
            "SELECT rate, burst, max_running, tat FROM {limits} WHERE job_type = %s FOR UPDATE"
        ).format(limits=limits)
        # Whether a limit held anything back: a claimable row of the type exists.
        self._q_any_ready = sql.SQL(
            "SELECT {not_paused} AND (EXISTS (SELECT 1 FROM {jobs} WHERE job_type = %(type)s "
            "AND status = 'queued' AND claim_token IS NULL AND claim_owner IS NULL) "
            "OR EXISTS (SELECT 1 FROM {jobs} WHERE job_type = %(type)s AND status = 'scheduled' "
            "AND claim_token IS NULL AND claim_owner IS NULL AND scheduled_at <= %(now)s))"
        ).format(jobs=jobs, not_paused=not_paused)
        self._q_claimed_count = sql.SQL(
            "SELECT count(*) FROM {jobs} WHERE claim_token IS NOT NULL AND job_type = %s"
        ).format(jobs=jobs)
        self._q_set_tat = sql.SQL("UPDATE {limits} SET tat = %s WHERE job_type = %s").format(
            limits=limits
        )
        self._q_running_limited = sql.SQL(
            "SELECT job_type FROM {limits} WHERE job_type = ANY(%s) AND max_running IS NOT NULL"
        ).format(limits=limits)
        self._q_next_due = sql.SQL(
            "SELECT min(scheduled_at) FROM {jobs} "
            "WHERE status = 'scheduled' AND claim_token IS NULL AND claim_owner IS NULL"
        ).format(jobs=jobs)
        self._q_ready_counts = sql.SQL(
            "SELECT job_type, priority, count(*) FROM {jobs} "
            "WHERE status = 'queued' AND claim_token IS NULL AND claim_owner IS NULL "
            "GROUP BY job_type, priority"
        ).format(jobs=jobs)
        self._q_other_counts = sql.SQL(
            "SELECT count(*) FILTER (WHERE status = 'scheduled' AND claim_token IS NULL "
            "AND claim_owner IS NULL), count(*) FILTER (WHERE claim_token IS NOT NULL) "
            "FROM {jobs} WHERE claim_token IS NOT NULL OR status = 'scheduled'"
        ).format(jobs=jobs)

    # -- plumbing ---------------------------------------------------------------------

    async def _run(self, what: str, fn: Callable[[psycopg.Connection[Any]], T]) -> T:
        """Run ``fn(conn)`` in one transaction in a worker thread."""

        def work() -> T:
            with self.backend._connection(f"queue {what}") as (conn, _guard):
                with conn.transaction():
                    return fn(conn)

        try:
            return await trio.to_thread.run_sync(work)
        except StorageUnavailable as exc:
            raise TierUnavailable(str(exc)) from exc

    def _notify(self, conn: psycopg.Connection[Any], job_types: set[str]) -> None:
        if job_types:
            conn.execute(self._q_notify, (sorted(job_types),))

    def _push_rows(
        self, conn: psycopg.Connection[Any], jobs: Sequence[Job]
    ) -> tuple[int, set[str]]:
        woken: set[str] = set()
        added = 0
        for job in sorted(jobs, key=lambda j: j.id):  # lock order: see _q_unclaim
            if job.status not in (Status.QUEUED, Status.SCHEDULED):
                continue
            if conn.execute(self._q_push, job_params(job)).fetchone() is not None:
                added += 1
            # Wake listeners even when the row was already right (a new job).
            woken.add(job.job_type if job.status is Status.QUEUED else "")
        return added, woken

    # -- the QueueTier contract -----------------------------------------------------------

    async def open(self) -> None:
        return None  # the record store's pool is opened by the server

    async def close(self) -> None:
        return None

    async def push(self, jobs: Sequence[Job]) -> int:
        if not any(job.status in (Status.QUEUED, Status.SCHEDULED) for job in jobs):
            return 0

        def push(conn: psycopg.Connection[Any]) -> int:
            added, woken = self._push_rows(conn, jobs)
            self._notify(conn, woken)
            return added

        return await self._run("push", push)

    async def claim(
        self, job_type: str, limit: int, *, now: float, owner: str, token: str, until: float
    ) -> Claims:
        if limit <= 0:
            return Claims()
        params = {
            "type": job_type,
            "limit": limit,
            "now": now,
            "owner": owner,
            "token": token,
            "until": until,
        }

        def claim(conn: psycopg.Connection[Any]) -> tuple[list[tuple[Any, ...]], Allowance | None]:
            row = conn.execute(self._q_limit_lock, (job_type,)).fetchone()
            if row is None:
                return conn.execute(self._q_claim, params).fetchall(), None
            rules = limit_from_columns(row[0], row[1], row[2])
            tat = None if row[3] is None else float(row[3])
            counted = conn.execute(self._q_claimed_count, (job_type,)).fetchone()
            running = int(counted[0]) if counted else 0
            allowance = rules.decide(limit, tat=tat, now=now, running=running)
            rows: list[tuple[Any, ...]] = []
            if allowance.granted:
                rows = conn.execute(
                    self._q_claim, {**params, "limit": allowance.granted}
                ).fetchall()
            if rules.rate is not None and rows:
                conn.execute(self._q_set_tat, (rules.taken(len(rows), tat=tat, now=now), job_type))
            if allowance.held is None or len(rows) < allowance.granted:
                return rows, None  # nothing held back: fewer were ready
            # A limit held back only what exists (the other tiers cap the
            # demand by their ready count): is anything claimable left?
            found = conn.execute(self._q_any_ready, params).fetchone()
            return rows, allowance if found and found[0] else None

        rows, allowance = await self._run("claim", claim)
        # RETURNING has no order: sort by the placement the query picked by.
        rows.sort(key=lambda r: (r[-2], r[-1], r[0]))
        claims = (Claim(row_to_job(r[: len(_COLUMNS)]), token, owner, until) for r in rows)
        if allowance is None:
            return Claims(claims)
        return Claims.limited(claims, allowance.held, allowance.retry_at)

    async def settle(self, items: Sequence[tuple[str, str, Job | None]]) -> list[bool]:
        if not items:
            return []

        def settle(conn: psycopg.Connection[Any]) -> list[bool]:
            ids = [i for i, _, _ in items]
            tokens = [t for _, t, _ in items]
            back_flags = [r is not None and r.status in _WAITING for _, _, r in items]
            rows = conn.execute(self._q_unclaim, (ids, tokens, back_flags)).fetchall()
            done = {r[0] for r in rows}
            ended_types = sorted({r[1] for r in rows})
            back = [
                record
                for job_id, _, record in items
                if job_id in done
                and record is not None
                and record.status in (Status.QUEUED, Status.SCHEDULED)
            ]
            _, woken = self._push_rows(conn, back)
            if ended_types:
                # room for one more of a type with a concurrency limit
                limited = conn.execute(self._q_running_limited, (ended_types,)).fetchall()
                woken.update(r[0] for r in limited)
            self._notify(conn, woken)
            return _first_hits(done, [job_id for job_id, _, _ in items])

        return await self._run("settle", settle)

    async def renew(self, items: Sequence[tuple[str, str]], *, until: float) -> list[bool]:
        if not items:
            return []

        def renew(conn: psycopg.Connection[Any]) -> set[str]:
            ids = [i for i, _ in items]
            tokens = [t for _, t in items]
            flags = [False] * len(ids)
            rows = conn.execute(self._q_renew, (ids, tokens, flags, until)).fetchall()
            return {r[0] for r in rows}

        done = await self._run("renew", renew)
        return [job_id in done for job_id, _ in items]

    async def expired(self, *, now: float, limit: int) -> list[Claim]:
        def expired(conn: psycopg.Connection[Any]) -> list[tuple[Any, ...]]:
            return conn.execute(self._q_expired, (now, limit)).fetchall()

        rows = await self._run("expired", expired)
        n = len(_COLUMNS)
        return [Claim(row_to_job(r[:n]), r[n], r[n + 1], float(r[n + 2])) for r in rows]

    async def remove(self, job_ids: Sequence[str]) -> list[Job | Held | None]:
        if not job_ids:
            return []

        def remove(conn: psycopg.Connection[Any]) -> tuple[dict[str, Job], set[str]]:
            rows = conn.execute(self._q_remove, (list(job_ids),)).fetchall()
            found = {r[0]: row_to_job(r) for r in rows}
            rest = [job_id for job_id in job_ids if job_id not in found]
            held = {r[0] for r in conn.execute(self._q_held, (rest,))} if rest else set()
            return found, held

        found, held = await self._run("remove", remove)
        # a repeated id: removed once
        return [
            found.pop(job_id) if job_id in found else HELD if job_id in held else None
            for job_id in job_ids
        ]

    async def set_paused(self, job_type: str, paused: bool) -> None:
        def pause(conn: psycopg.Connection[Any]) -> None:
            if paused:
                conn.execute(self.backend._q_pause, (job_type, time.time()))
            else:
                conn.execute(self.backend._q_resume, (job_type,))
                self._notify(conn, {job_type})

        await self._run("pause" if paused else "resume", pause)

    async def set_limit(self, job_type: str, limit: TypeLimit | None) -> None:
        """The limits live in the record store's type_limits table (where the
        broker has written them already: the same write again, idempotent),
        then wake the instances: a looser limit may let jobs go now."""
        backend = self.backend

        def store(conn: psycopg.Connection[Any]) -> None:
            if limit is None:
                conn.execute(backend._q_clear_limit, (job_type,))
            else:
                conn.execute(backend._q_set_limit, (job_type, *limit_columns(limit), time.time()))
            self._notify(conn, {job_type})

        await self._run("set limit", store)

    async def limited_types(self) -> frozenset[str]:
        backend = self.backend

        def limited(conn: psycopg.Connection[Any]) -> frozenset[str]:
            return frozenset(str(r[0]) for r in conn.execute(backend._q_limits).fetchall())

        return await self._run("limits", limited)

    async def paused(self) -> frozenset[str]:
        def paused(conn: psycopg.Connection[Any]) -> frozenset[str]:
            return frozenset(r[0] for r in conn.execute(self.backend._q_paused).fetchall())

        return await self._run("paused", paused)

    async def next_due(self) -> float | None:
        def next_due(conn: psycopg.Connection[Any]) -> float | None:
            row = conn.execute(self._q_next_due).fetchone()
            return None if row is None or row[0] is None else float(row[0])

        return await self._run("next due", next_due)

    async def counts(self) -> TierCounts:
        def counts(conn: psycopg.Connection[Any]) -> TierCounts:
            ready: dict[str, list[int]] = {}
            for job_type, priority, n in conn.execute(self._q_ready_counts).fetchall():
                ready.setdefault(job_type, [0, 0, 0])[int(priority) - 1] += int(n)
            row = conn.execute(self._q_other_counts).fetchone()
            scheduled, claimed = (int(row[0]), int(row[1])) if row else (0, 0)
            return TierCounts({t: (v[0], v[1], v[2]) for t, v in ready.items()}, scheduled, claimed)

        return await self._run("counts", counts)

    def _listen(self) -> psycopg.Connection[Any]:
        conn = psycopg.connect(self.backend._conninfo, autocommit=True)
        try:
            conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self.channel)))
        except BaseException:
            conn.close()
            raise
        return conn

    async def wait_ready(self, on_ready: Callable[[str], None]) -> None:
        """LISTEN on a dedicated connection, watched by trio; reconnect on failure."""
        delay = 0.05
        while True:
            conn: psycopg.Connection[Any] | None = None
            try:
                conn = await trio.to_thread.run_sync(self._listen)
                delay = 0.05
                on_ready("")  # anything may have been missed while not listening
                while True:
                    await trio.lowlevel.wait_readable(conn.pgconn.socket)
                    for notify in conn.notifies(timeout=0):
                        on_ready(notify.payload)
            except (psycopg.Error, OSError) as exc:
                log.warning("LISTEN %s: %s; reconnecting in %.2f s", self.channel, exc, delay)
            finally:
                if conn is not None:
                    conn.close()
            await trio.sleep(delay)
            delay = min(delay * 2, 2.0)


def _first_hits(done: set[str], ids: Sequence[str]) -> list[bool]:
    """Per item: whether it applied (an id named twice applied once, the first time)."""
    out: list[bool] = []
    for job_id in ids:
        out.append(job_id in done)
        done.discard(job_id)
    return out
