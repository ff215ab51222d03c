"""The SQLite record store and the group committer."""

from __future__ import annotations

import pathlib
import sqlite3

import pytest
import trio

from stackduck_core import EnqueueRequest, Limits, Status, new_job, validate_enqueue
from stackduck_core._failover import BackendHealth, BackendRole, Health
from stackduck_trio._clock import WallClock
from stackduck_trio._store import (
    Batch,
    GroupCommitter,
    MemoryBackend,
    SqliteBackend,
    StorageUnavailable,
)


def make_job(n: int, now: float = 1_800_000_000.0, job_type: str = "t", **fields: object):  # type: ignore[no-untyped-def]
    spec = validate_enqueue(
        EnqueueRequest(job_type=job_type, payload=f'{{"n": {n}}}', **fields),  # type: ignore[arg-type]
        now=now,
        limits=Limits(),
    )
    return new_job(f"job-{n}", spec, now)  # type: ignore[arg-type]


def test_sqlite_round_trip_and_active_rows(tmp_path: pathlib.Path) -> None:
    backend = SqliteBackend(tmp_path / "db" / "stackduck.db")
    backend.open()
    jobs = [make_job(n) for n in range(4)]
    backend.commit(Batch(jobs, ()))
    assert backend.get("job-1") == jobs[1]
    assert backend.get("nope") is None
    import attrs

    completed = attrs.evolve(jobs[0], status=Status.COMPLETED, version=jobs[0].version + 1)
    backend.commit(Batch([completed], ["job-2"]))
    active = {job.id for job in backend.load_active()}
    assert active == {"job-1", "job-3"}
    assert backend.counts() == {"completed": 1, "queued": 2}
    # an older version never overwrites a newer one (writes may be retried)
    backend.commit(Batch([jobs[0]], ()))
    assert backend.get("job-0").status is Status.COMPLETED  # type: ignore[union-attr]
    backend.close()
    # WAL mode, reopened with the same data
    reopened = SqliteBackend(tmp_path / "db" / "stackduck.db")
    reopened.open()
    assert reopened.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert reopened.get("job-3") == jobs[3]
    reopened.close()


def test_sqlite_refuses_a_newer_schema(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "stackduck.db"
    db = sqlite3.connect(path)
    db.execute("PRAGMA user_version = 99")
    db.close()
    with pytest.raises(StorageUnavailable, match="schema version 99"):
        SqliteBackend(path).open()


def test_sqlite_errors_become_storage_unavailable(tmp_path: pathlib.Path) -> None:
    backend = SqliteBackend(tmp_path / "stackduck.db")
    backend.open()
    backend.db.execute("DROP TABLE jobs")
    with pytest.raises(StorageUnavailable, match="SQLite commit failed"):
        backend.commit(Batch([make_job(1)], ()))
    backend.close()
    with pytest.raises(StorageUnavailable, match="not open"):
        backend.get("x")
    with pytest.raises(ValueError, match="synchronous"):
        SqliteBackend(tmp_path / "x.db", synchronous="sometimes")


async def test_group_commit_batches_concurrent_writes(tmp_path: pathlib.Path) -> None:
    backend = SqliteBackend(tmp_path / "stackduck.db")
    backend.open()
    clock = WallClock()
    committer = GroupCommitter(
        backend,
        BackendHealth("sqlite", BackendRole.RECORD_STORE),
        now=clock.now,
        clock_deadline=clock.trio_deadline,
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(committer.run)

        async def write(n: int) -> None:
            await committer.write([make_job(n)]).wait()

        async with trio.open_nursery() as writers:
            for n in range(500):
                writers.start_soon(write, n)
        stats = committer.statistics()
        assert stats.rows == 500
        assert stats.batches < 100, stats  # 500 concurrent writes, far fewer transactions
        committer.close()
        await committer.wait_closed()
    assert len(backend.load_active()) == 500
    backend.close()


async def test_committer_recovers_through_the_health_machine(
    autojump_clock: trio.abc.Clock,
) -> None:
    backend = MemoryBackend()
    health = BackendHealth("memory", BackendRole.RECORD_STORE)
    base = trio.current_time()
    committer = GroupCommitter(
        backend,
        health,
        now=lambda: 1_800_000_000.0 + trio.current_time() - base,
        clock_deadline=lambda wall: base + wall - 1_800_000_000.0,
    )
    backend.fail_next = 6  # down after 3, then probes with backoff
    seen: list[Health] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(committer.run)
        done = committer.write([make_job(1)]).done
        while not done.is_set():
            seen.append(health.state)
            await trio.sleep(0.1)
        assert backend.rows
        # a second write clears the recovery
        await committer.write([make_job(2)]).wait()
        committer.close()
    assert Health.DOWN in seen
    assert health.state is Health.HEALTHY
    assert committer.statistics().failures == 6


def test_a_failed_commit_does_not_leave_sqlite_in_a_transaction(tmp_path: pathlib.Path) -> None:
    backend = SqliteBackend(tmp_path / "stackduck.db")
    backend.open()
    # a trigger that fails the COMMIT-time work: a deferred foreign key violation
    backend.db.executescript(
        """
        CREATE TABLE parent (id TEXT PRIMARY KEY);
        CREATE TABLE child (id TEXT REFERENCES parent(id) DEFERRABLE INITIALLY DEFERRED);
        PRAGMA foreign_keys = ON;
        CREATE TRIGGER orphan AFTER INSERT ON jobs WHEN NEW.job_type = 'bad'
        BEGIN INSERT INTO child VALUES ('missing'); END;
        """
    )
    with pytest.raises(StorageUnavailable, match="commit failed"):
        backend.commit(Batch([make_job(1, job_type="bad")], ()))
    assert not backend.db.in_transaction
    backend.commit(Batch([make_job(2)], ()))  # the next commit works
    assert backend.get("job-2") is not None
    backend.close()


def test_a_data_directory_serves_one_server_at_a_time(tmp_path: pathlib.Path) -> None:
    first = SqliteBackend(tmp_path / "stackduck.db")
    first.open()
    second = SqliteBackend(tmp_path / "stackduck.db")
    with pytest.raises(StorageUnavailable, match="in use by another Stackduck server"):
        second.open()
    first.close()
    second.open()  # the lock went with the first one
    second.close()
