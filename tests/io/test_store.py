"""The SQLite record store and the group committer."""

from __future__ import annotations

import pathlib
import sqlite3

import pytest
import trio

from stackduck_core import (
    Claimed,
    Completed,
    EnqueueRequest,
    Job,
    Limits,
    Status,
    apply,
    new_job,
    validate_enqueue,
)
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


class BatchLog(MemoryBackend):
    """A memory store that records every batch it commits."""

    def __init__(self) -> None:
        super().__init__()
        self.batches: list[list[tuple[str, Status]]] = []

    def commit(self, batch: Batch) -> frozenset[str]:
        if not self.fail_next:
            self.batches.append([(job.id, job.status) for job in batch.upserts])
        return super().commit(batch)


def autojump_committer(backend: MemoryBackend) -> GroupCommitter:
    base = trio.current_time()
    return GroupCommitter(
        backend,
        BackendHealth("memory", BackendRole.RECORD_STORE),
        now=lambda: 1_800_000_000.0 + trio.current_time() - base,
        clock_deadline=lambda wall: base + wall - 1_800_000_000.0,
    )


def delivered(job: Job) -> Job:
    event = Claimed(now=job.created_at, lease_id="L1", worker_id="w", lease_expires_at=2e9)
    running = apply(job, event)
    assert isinstance(running, Job)
    return running


def completed(running: Job) -> Job:
    done = apply(running, Completed(now=running.created_at, lease_id="L1"))
    assert isinstance(done, Job)
    return done


async def test_a_deferred_write_waits_and_merges_with_the_jobs_next_write(
    autojump_clock: trio.abc.Clock,
) -> None:
    backend = BatchLog()
    committer = autojump_committer(backend)
    queued = make_job(1)
    running = delivered(queued)
    done = completed(running)
    async with trio.open_nursery() as nursery:
        await nursery.start(committer.run)
        await committer.write([queued]).wait()
        start = trio.current_time()
        deferred = committer.write([running], defer=0.05)
        await trio.sleep(0.01)
        assert not deferred.done.is_set() and backend.rows["job-1"].status is Status.QUEUED
        # the acknowledgement's write goes at once and takes the delivery along:
        # one row written, the completed record over the queued one
        await committer.write([done]).wait()
        assert deferred.done.is_set() and deferred.refused == frozenset()
        assert trio.current_time() - start < 0.05
        assert backend.batches == [[("job-1", Status.QUEUED)], [("job-1", Status.COMPLETED)]]
        assert backend.rows["job-1"] == done
        # a deferred write alone is committed when it is due, and not before
        other = make_job(2)
        await committer.write([other]).wait()
        start = trio.current_time()
        await committer.write([delivered(other)], defer=0.05).wait()
        assert trio.current_time() - start == pytest.approx(0.05, abs=1e-6)
        assert backend.batches[-1] == [("job-2", Status.RUNNING)]
        # other jobs' writes do not take it along
        third = make_job(3)
        await committer.write([third]).wait()
        late = committer.write([delivered(third)], defer=0.05)
        await committer.write([make_job(4)]).wait()
        assert not late.done.is_set()
        assert backend.batches[-1] == [("job-4", Status.QUEUED)]
        # closing commits what is deferred at once
        start = trio.current_time()
        committer.close()
        await committer.wait_closed()
        assert late.done.is_set() and trio.current_time() - start < 0.05
    assert backend.rows["job-3"].status is Status.RUNNING
    assert committer.statistics().pending == 0


async def test_a_failed_batch_is_retried_as_it_was_while_deferred_writes_wait(
    autojump_clock: trio.abc.Clock,
) -> None:
    backend = BatchLog()
    committer = autojump_committer(backend)
    jobs = [make_job(n) for n in range(3)]
    async with trio.open_nursery() as nursery:
        await nursery.start(committer.run)
        await committer.write(jobs[:2]).wait()
        backend.fail_next = 2
        first = committer.write([delivered(jobs[0])], defer=10.0)
        second = committer.write([jobs[2]])
        await second.wait()  # retried after the failures, without the deferred one
        assert not first.done.is_set()
        assert backend.batches[-1] == [("job-2", Status.QUEUED)]
        await committer.write([completed(delivered(jobs[0]))]).wait()
        assert first.done.is_set()
        assert backend.rows["job-0"].status is Status.COMPLETED
        committer.close()
    assert committer.statistics().pending == 0


@pytest.mark.parametrize("defer", [0.0, 0.05])
async def test_recovery_finishes_while_deferred_writes_keep_coming(
    autojump_clock: trio.abc.Clock, defer: float
) -> None:
    """The reconcile waits for the backlog of the outage, not for writes made after."""
    backend = MemoryBackend()
    committer = autojump_committer(backend)
    health = committer.health
    backend.fail_next = 6  # down, then recovering once it answers
    async with trio.open_nursery() as nursery:
        await nursery.start(committer.run)

        async def deliveries() -> None:  # 100 a second, each record deferred
            for n in range(1, 10_000):
                committer.write([make_job(n)], defer=defer)
                await trio.sleep(0.01)

        nursery.start_soon(deliveries)  # through the outage and after
        await committer.write([make_job(0)]).wait()
        with trio.move_on_after(60):
            await health_becomes(health, Health.HEALTHY)
        state = health.state
        nursery.cancel_scope.cancel()
    assert state is Health.HEALTHY, f"defer={defer}: still {state.value} after 60 s"


async def health_becomes(health: BackendHealth, state: Health) -> None:
    for _ in range(10_000):
        if health.state is state:
            return
        await trio.sleep(0.01)
