"""A stateful simulation of the queue with a failing record store and crashes.

The runtime composes three pieces of the core: the queue engine (QueueCore),
the record store's health machine (BackendHealth) and the routing decision
(route). This machine composes them the same way, without I/O:

* every change the engine makes is appended to an *outbox*; ``flush`` commits
  the outbox to a dict that stands for the record store -- or fails while the
  store is down, which is reported to the health machine (the runtime's group
  committer does exactly this);
* a new job is accepted only when ``route()`` says ACCEPT, enters the engine
  only once its write committed, and is "acknowledged" to the producer then;
* ``crash`` throws the engine away and rebuilds a new one from the store,
  as a restarted process does.

Invariants after every step: no acknowledged job is lost (it is in the store
and, unless finished, in the engine); while the store is unusable no new job
is acknowledged; the engine never holds a job the store does not know; the
store never has a newer version of a job than the engine; after a crash the
engine holds exactly the store's active jobs.
"""

from __future__ import annotations

import itertools

import attrs
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from stackduck_core import (
    BackendHealth,
    BackendRole,
    Durability,
    EnqueueMode,
    EnqueueRequest,
    Health,
    HealthPolicy,
    Job,
    LifecyclePolicy,
    OpFailed,
    OpSucceeded,
    ProbeFailed,
    ProbeSucceeded,
    QueueCore,
    ReconcileFinished,
    Rejected,
    StartReconcile,
    Status,
    new_job,
    route,
    validate_enqueue,
)

T0 = 1_800_000_000.0
ACTIVE = {Status.SCHEDULED, Status.QUEUED, Status.RUNNING, Status.FAILED}


class StoreMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.now = T0
        self.lease_ids = (f"lease{n}" for n in itertools.count(1))
        self.job_ids = (f"job{n}" for n in itertools.count(1))
        self.core = self._new_core()
        self.health = BackendHealth(
            "store", BackendRole.RECORD_STORE, HealthPolicy(failures_to_down=2)
        )
        self.store: dict[str, Job] = {}
        self.store_up = True
        # pending writes: (records, job to admit on commit or None)
        self.outbox: list[tuple[list[Job], Job | None]] = []
        self.acknowledged: set[str] = set()
        self.refused = 0
        self.reconcile_id: int | None = None

    def _new_core(self) -> QueueCore:
        return QueueCore(
            new_id=lambda: next(self.lease_ids), policy=LifecyclePolicy(max_lost_leases=3)
        )

    # -- the runtime's plumbing, in miniature -----------------------------------

    def _write(self, records: list[Job], admit: Job | None = None) -> None:
        if records:
            self.outbox.append((records, admit))

    def _report(self, failed: bool) -> None:
        if self.health.state in (Health.DOWN, Health.RECOVERING):
            event = ProbeFailed(now=self.now) if failed else ProbeSucceeded(now=self.now)
        else:
            event = OpFailed(now=self.now) if failed else OpSucceeded(now=self.now)
        for effect in self.health.handle(event):
            if isinstance(effect, StartReconcile):
                self.reconcile_id = effect.reconcile_id

    # -- rules -----------------------------------------------------------------------

    @rule(priority=st.sampled_from([None, 1, 2, 3]), later=st.booleans())
    def enqueue(self, priority: int | None, later: bool) -> None:
        decision = route(None, self.health.state, Durability.STRICT)
        if decision.enqueue is not EnqueueMode.ACCEPT:
            self.refused += 1
            assert self.health.state in (Health.DOWN, Health.RECOVERING)
            return
        request = EnqueueRequest(
            job_type="t", priority=priority, delay=1, scheduled_at=self.now + 5 if later else None
        )
        spec = validate_enqueue(request, now=self.now, limits=self.core.limits)
        assert not isinstance(spec, Rejected)
        job = new_job(next(self.job_ids), spec, self.now)
        self._write([job], admit=job)

    @rule(fail=st.booleans())
    def work_one(self, fail: bool) -> None:
        job = self.core.claim("t", now=self.now, worker_id="w")
        if job is None:
            return
        self._write([job])
        if fail:
            result = self.core.fail(job.id, lease_id=job.lease_id, error="e", now=self.now)
        else:
            result = self.core.complete(job.id, lease_id=job.lease_id, now=self.now)
        assert isinstance(result, Job)
        self._write([result])

    @rule()
    def claim_and_hang(self) -> None:
        job = self.core.claim("t", now=self.now, worker_id="w", lease_seconds=3)
        if job is not None:
            self._write([job])

    @rule(dt=st.floats(0, 10))
    def advance(self, dt: float) -> None:
        self.now += dt
        self._write(self.core.tick(now=self.now))

    @rule()
    def store_goes_down(self) -> None:
        self.store_up = False

    @rule()
    def store_comes_back(self) -> None:
        self.store_up = True

    @precondition(lambda self: bool(self.outbox) or self.reconcile_id is not None)
    @rule()
    def flush(self) -> None:
        """One group commit of everything pending (or a failed attempt)."""
        if not self.store_up:
            self._report(failed=True)
            return
        batch, self.outbox = self.outbox, []
        for records, _ in batch:
            for job in records:
                old = self.store.get(job.id)
                if old is None or job.version > old.version:
                    self.store[job.id] = job
        self._report(failed=False)
        for _, admit in batch:
            if admit is not None:
                self.core.restore(admit, now=self.now)
                self.acknowledged.add(admit.id)
        if self.reconcile_id is not None and not self.outbox:
            self.health.handle(ReconcileFinished(now=self.now, reconcile_id=self.reconcile_id))
            self.reconcile_id = None

    @rule()
    def crash(self) -> None:
        """The process dies: pending writes are lost, the engine is rebuilt."""
        self.outbox = []
        self.core = self._new_core()
        for job in sorted(self.store.values(), key=lambda j: (j.seq, j.created_at)):
            if job.status in ACTIVE:
                restored = self.core.restore(job, now=self.now)
                if restored is not job:
                    self._write([restored])
        self.health = BackendHealth(
            "store", BackendRole.RECORD_STORE, HealthPolicy(failures_to_down=2)
        )
        self.reconcile_id = None

    # -- invariants --------------------------------------------------------------------

    @invariant()
    def no_acknowledged_job_is_lost(self) -> None:
        for job_id in self.acknowledged:
            assert job_id in self.store, job_id
            stored = self.store[job_id]
            live = self.core.get(job_id)
            if stored.status in ACTIVE:
                # unfinished in the store: the engine holds it (maybe further along)
                assert live is not None or self._finished_in_outbox(job_id), job_id
            if live is not None:
                assert live.version >= stored.version

    def _finished_in_outbox(self, job_id: str) -> bool:
        return any(
            job.id == job_id and job.status in (Status.COMPLETED, Status.CANCELLED)
            for records, _ in self.outbox
            for job in records
        )

    @invariant()
    def the_engine_holds_only_stored_jobs(self) -> None:
        stats = self.core.statistics()
        held = stats.queued + stats.scheduled + stats.running + stats.dead
        assert held <= len(self.acknowledged)
        for job_id in self.acknowledged:
            live = self.core.get(job_id)
            if live is not None:
                assert job_id in self.store

    @invariant()
    def next_deadline_is_sane(self) -> None:
        deadline = self.core.next_deadline()
        assert deadline is None or deadline >= T0


StoreMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
TestStoreMachine = StoreMachine.TestCase


def test_strict_durability_refuses_while_the_store_is_down() -> None:
    """A scripted run of the machine's story, so the property above cannot be vacuous."""
    machine = StoreMachine()
    machine.store_goes_down()
    machine.enqueue(priority=None, later=False)  # accepted: the store is not known bad yet
    machine.flush()  # fails: suspect
    machine.flush()  # fails: down
    assert machine.health.state is Health.DOWN
    machine.enqueue(priority=1, later=False)
    assert machine.refused == 1 and not machine.acknowledged
    machine.store_comes_back()
    machine.now += 60  # past the probe backoff
    machine.flush()  # the retried commit is the probe: recovering, outbox flushed
    assert machine.acknowledged and machine.health.state in (Health.RECOVERING, Health.HEALTHY)
    machine.work_one(fail=False)
    machine.flush()
    machine.crash()
    assert machine.core.statistics().queued == 0
    assert attrs.has(Job)
    machine.teardown()
