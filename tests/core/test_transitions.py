"""Every (status, event type) pair of the job lifecycle, enumerated.

The space is finite (7 statuses-or-None x 11 event types), so it is walked
completely rather than sampled: a pair in ``TRANSITIONS`` must produce one of
the table's target statuses *and* the specific record the rules promise; a
pair outside it must be rejected as ``WRONG_STATE`` with the input untouched.
"""

from __future__ import annotations

import copy
import itertools
import typing
from collections.abc import Callable

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stackduck_core import (
    EVENT_TYPES,
    TRANSITIONS,
    Cancelled,
    Claimed,
    Completed,
    Enqueued,
    Event,
    Failed,
    Job,
    JobSpec,
    LeaseExpired,
    LeaseExtended,
    LifecyclePolicy,
    Promoted,
    Purged,
    Rejected,
    RejectReason,
    Released,
    Requeued,
    Status,
    WorkerDetached,
    apply,
    needs_new_seq,
    new_job,
    retry_delay,
)

NOW = 1_769_860_800.0  # 2026-01-31T12:00:00Z
LATER = NOW + 1_000.0  # after every due time and lease expiry below
LEASE = "lease-1"
STATES: list[Status | None] = [None, *Status]
PAIRS = list(itertools.product(STATES, EVENT_TYPES))


def make_job(status: Status, **changes: typing.Any) -> Job:
    """A plausible record in ``status``: running jobs hold a lease, etc."""
    fields: dict[str, typing.Any] = dict(
        id="job-1",
        job_type="email",
        payload='{"to": "duck@example.com"}',
        status=status,
        priority=2,
        max_retries=2,
        delay=30,
        scheduled_at=NOW - 100.0,
        created_at=NOW - 200.0,
        updated_at=NOW - 50.0,
        seq=4_242,
        version=3,
    )
    if status is Status.SCHEDULED:
        fields.update(scheduled_at=NOW + 100.0, seq=0)
    elif status is Status.RUNNING:
        fields.update(
            lease_id=LEASE,
            lease_expires_at=NOW + 60.0,
            worker_id="worker-1",
            started_at=NOW - 10.0,
            attempt=1,
        )
    elif status is Status.FAILED:
        fields.update(
            retry_count=2,
            attempt=3,
            lost_leases=1,
            error_message="boom",
            started_at=NOW - 10.0,
            completed_at=NOW - 5.0,
        )
    elif status in (Status.COMPLETED, Status.CANCELLED):
        fields.update(started_at=NOW - 10.0, completed_at=NOW - 5.0)
    fields.update(changes)
    return Job(**fields)


SPEC = JobSpec(
    job_type="email",
    payload='{"to": "duck@example.com"}',
    priority=1,
    delay=30,
    max_retries=2,
    scheduled_at=LATER,
)


def make_event(event_type: type[Event], now: float = LATER, lease: str = LEASE) -> Event:
    """An event of ``event_type`` that the table accepts whenever the pair is in it."""
    factories: dict[type[Event], Callable[[], Event]] = {
        Enqueued: lambda: Enqueued(now=now, job_id="job-1", spec=SPEC),
        Promoted: lambda: Promoted(now=now),
        Claimed: lambda: Claimed(
            now=now, lease_id="lease-2", worker_id="worker-2", lease_expires_at=now + 30.0
        ),
        Completed: lambda: Completed(now=now, lease_id=lease),
        Failed: lambda: Failed(now=now, lease_id=lease, error="it broke"),
        LeaseExtended: lambda: LeaseExtended(now=now, lease_id=lease, lease_expires_at=now + 120.0),
        LeaseExpired: lambda: LeaseExpired(now=now, lease_id=lease),
        WorkerDetached: lambda: WorkerDetached(now=now, lease_id=lease),
        Released: lambda: Released(now=now, lease_id=lease),
        Cancelled: lambda: Cancelled(now=now),
        Requeued: lambda: Requeued(now=now),
        Purged: lambda: Purged(now=now),
    }
    return factories[event_type]()


def assert_released(old: Job, new: Job, now: float) -> None:
    """The common shape of a record that left RUNNING at ``now``."""
    assert new.lease_id is None
    assert new.lease_expires_at is None
    assert new.worker_id is None
    assert new.updated_at == now
    assert new.version == old.version + 1


# -- the specific promise of each pair, for the suitable event of make_event --

Check = Callable[[Job | None, Event, Job | None], None]


def _enqueued(old: Job | None, event: Event, new: Job | None) -> None:
    assert old is None and isinstance(event, Enqueued) and new is not None
    assert new == Job(
        id="job-1",
        job_type=SPEC.job_type,
        payload=SPEC.payload,
        status=Status.QUEUED,  # SPEC is due exactly at LATER
        priority=SPEC.priority,
        max_retries=SPEC.max_retries,
        delay=SPEC.delay,
        scheduled_at=SPEC.scheduled_at,
        created_at=LATER,
        updated_at=LATER,
    )
    assert new.version == 1 and new.seq == 0 and new.attempt == 0


def _promoted(old: Job | None, event: Event, new: Job | None) -> None:
    assert old is not None and new is not None
    assert new == attrs.evolve(old, status=Status.QUEUED, updated_at=LATER, version=4)


def _cancelled(old: Job | None, event: Event, new: Job | None) -> None:
    assert old is not None and new is not None
    assert new.status is Status.CANCELLED
    assert new.completed_at == LATER
    assert_released(old, new, LATER)
    assert new.retry_count == old.retry_count and new.attempt == old.attempt


def _claimed(old: Job | None, event: Event, new: Job | None) -> None:
    assert old is not None and new is not None
    assert new == attrs.evolve(
        old,
        status=Status.RUNNING,
        lease_id="lease-2",
        worker_id="worker-2",
        lease_expires_at=LATER + 30.0,
        started_at=LATER,
        attempt=old.attempt + 1,
        updated_at=LATER,
        version=old.version + 1,
    )


def _completed(old: Job | None, event: Event, new: Job | None) -> None:
    assert old is not None and new is not None
    assert new.status is Status.COMPLETED
    assert new.completed_at == LATER
    assert new.error_message == ""
    assert new.retry_count == old.retry_count and new.attempt == old.attempt
    assert_released(old, new, LATER)


def _failed(old: Job | None, event: Event, new: Job | None) -> None:
    # make_job(RUNNING) has retries left: retry_count 0 of 2, delay 30
    assert old is not None and new is not None
    assert new.status is Status.SCHEDULED
    assert new.scheduled_at == LATER + 30
    assert new.retry_count == 1
    assert new.error_message == "it broke"
    assert new.completed_at is None
    assert_released(old, new, LATER)


def _extended(old: Job | None, event: Event, new: Job | None) -> None:
    assert old is not None and new is not None
    assert new == attrs.evolve(
        old, lease_expires_at=LATER + 120.0, updated_at=LATER, version=old.version + 1
    )


def _lost(old: Job | None, event: Event, new: Job | None) -> None:
    assert old is not None and new is not None
    assert new.status is Status.QUEUED
    assert new.lost_leases == old.lost_leases + 1
    assert new.seq == old.seq  # keeps its place in the queue
    assert new.scheduled_at == LATER
    assert new.retry_count == old.retry_count  # a lost lease is not a reported failure
    assert new.attempt == old.attempt
    assert new.completed_at is None
    assert_released(old, new, LATER)


def _given_back(old: Job | None, event: Event, new: Job | None) -> None:
    assert old is not None and new is not None
    assert new.status is Status.QUEUED
    assert new.seq == old.seq  # keeps its place in the queue
    assert new.lost_leases == old.lost_leases  # no penalty: no handler ran
    assert new.attempt == old.attempt - 1  # the delivery was not an attempt
    assert new.retry_count == old.retry_count
    assert new.scheduled_at == LATER
    assert_released(old, new, LATER)
    assert not needs_new_seq(old, new)


def _requeued(old: Job | None, event: Event, new: Job | None) -> None:
    assert old is not None and new is not None
    assert new.status is Status.QUEUED
    assert (new.retry_count, new.attempt, new.lost_leases) == (0, 0, 0)
    assert new.scheduled_at == LATER
    assert new.completed_at is None
    assert_released(old, new, LATER)


def _purged(old: Job | None, event: Event, new: Job | None) -> None:
    assert new is None


EXPECT: dict[tuple[Status | None, type[Event]], Check] = {
    (None, Enqueued): _enqueued,
    (Status.SCHEDULED, Promoted): _promoted,
    (Status.SCHEDULED, Cancelled): _cancelled,
    (Status.QUEUED, Claimed): _claimed,
    (Status.QUEUED, Cancelled): _cancelled,
    (Status.RUNNING, Completed): _completed,
    (Status.RUNNING, Failed): _failed,
    (Status.RUNNING, LeaseExtended): _extended,
    (Status.RUNNING, LeaseExpired): _lost,
    (Status.RUNNING, WorkerDetached): _lost,
    (Status.RUNNING, Released): _given_back,
    (Status.RUNNING, Cancelled): _cancelled,
    (Status.FAILED, Requeued): _requeued,
    (Status.FAILED, Purged): _purged,
}


def test_every_table_entry_has_an_expectation() -> None:
    assert set(EXPECT) == set(TRANSITIONS)


@pytest.mark.parametrize(
    ("status", "event_type"),
    PAIRS,
    ids=[f"{s.value if s else 'none'}-{e.__name__}" for s, e in PAIRS],
)
def test_every_pair(status: Status | None, event_type: type[Event]) -> None:
    job = None if status is None else make_job(status)
    before = copy.deepcopy(job)
    event = make_event(event_type)

    result = apply(job, event)

    assert job == before  # never mutated, accepted or not
    if (status, event_type) in TRANSITIONS:
        assert not isinstance(result, Rejected), result
        _, targets = TRANSITIONS[status, event_type]
        assert (None if result is None else result.status) in targets
        if result is not None and job is not None:
            # identity and content never change through the lifecycle
            for name in ("id", "job_type", "payload", "priority", "max_retries", "delay"):
                assert getattr(result, name) == getattr(job, name)
            assert result.created_at == job.created_at
        EXPECT[status, event_type](job, event, result)
    else:
        assert isinstance(result, Rejected)
        assert result.reason is RejectReason.WRONG_STATE
        assert result.field is None
        assert "not possible" in result.message
        if job is None:
            assert "does not exist" in result.message
        else:
            assert f"job {job.id} ({job.status.value})" in result.message


def test_records_are_frozen() -> None:
    job = make_job(Status.RUNNING)
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        job.status = Status.COMPLETED  # type: ignore[misc]


# -- table introspection -----------------------------------------------------


def test_event_types_match_the_event_union() -> None:
    assert len(set(EVENT_TYPES)) == len(EVENT_TYPES)
    assert set(EVENT_TYPES) == set(typing.get_args(Event))
    assert {event_type for _, event_type in TRANSITIONS} <= set(EVENT_TYPES)


def test_every_status_is_reachable_from_nothing() -> None:
    reached: set[Status | None] = {None}
    frontier: list[Status | None] = [None]
    while frontier:
        state = frontier.pop()
        for (source, _), (_, targets) in TRANSITIONS.items():
            if source == state:
                for target in targets - reached:
                    reached.add(target)
                    frontier.append(target)
    assert set(Status) <= reached


def test_only_terminal_statuses_have_no_exit() -> None:
    exits: dict[Status | None, set[type[Event]]] = {state: set() for state in STATES}
    for source, event_type in TRANSITIONS:
        exits[source].add(event_type)
    assert {s for s in Status if not exits[s]} == {Status.COMPLETED, Status.CANCELLED}
    assert {s for s in Status if s.terminal} == {
        Status.COMPLETED,
        Status.CANCELLED,
        Status.FAILED,
    }
    # the dead-letter queue is terminal for the lifecycle but can be worked
    assert exits[Status.FAILED] == {Requeued, Purged}
    assert exits[None] == {Enqueued}
    assert all(exits[s] for s in Status if not s.terminal)


def test_only_enqueue_creates_and_only_purge_deletes() -> None:
    for (source, event_type), (_, targets) in TRANSITIONS.items():
        assert (source is None) == (event_type is Enqueued)
        assert (None in targets) == (event_type is Purged)


def test_cancellation_is_possible_exactly_before_the_end() -> None:
    cancellable = {source for source, event_type in TRANSITIONS if event_type is Cancelled}
    assert cancellable == {Status.SCHEDULED, Status.QUEUED, Status.RUNNING}


# -- enqueue -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("due", "status"),
    [(NOW - 1.0, Status.QUEUED), (NOW, Status.QUEUED), (NOW + 0.001, Status.SCHEDULED)],
)
def test_enqueue_is_queued_when_due_else_scheduled(due: float, status: Status) -> None:
    spec = attrs.evolve(SPEC, scheduled_at=due)
    result = apply(None, Enqueued(now=NOW, job_id="j", spec=spec))
    assert isinstance(result, Job)
    assert result.status is status
    assert result == new_job("j", spec, NOW)


# -- failures and backoff ----------------------------------------------------


@pytest.mark.parametrize(
    ("retry_count", "max_retries", "delay", "status", "due_in"),
    [
        (0, 2, 30, Status.SCHEDULED, 30),
        (1, 2, 30, Status.SCHEDULED, 60),
        (1, 100, 30, Status.SCHEDULED, 60),
        (7, 100, 30, Status.SCHEDULED, 3600),  # 3840 capped
        (0, 1, 1, Status.SCHEDULED, 1),
        (0, 2, 0, Status.QUEUED, 0),  # no backoff: straight back to the queue
        (5, 9, 0, Status.QUEUED, 0),
    ],
)
def test_failed_with_retries_left_is_retried_after_backoff(
    retry_count: int, max_retries: int, delay: int, status: Status, due_in: int
) -> None:
    job = make_job(Status.RUNNING, retry_count=retry_count, max_retries=max_retries, delay=delay)
    result = apply(job, Failed(now=NOW, lease_id=LEASE, error="E42"))
    assert isinstance(result, Job)
    assert result.status is status
    assert result.scheduled_at == NOW + due_in
    assert result.retry_count == retry_count + 1
    assert result.error_message == "E42"
    assert result.completed_at is None
    assert result.attempt == job.attempt
    assert_released(job, result, NOW)


@pytest.mark.parametrize(("retry_count", "max_retries"), [(0, 0), (2, 2), (100, 100)])
def test_failed_with_no_retries_left_is_dead_lettered(retry_count: int, max_retries: int) -> None:
    job = make_job(Status.RUNNING, retry_count=retry_count, max_retries=max_retries)
    result = apply(job, Failed(now=NOW, lease_id=LEASE, error="fatal"))
    assert isinstance(result, Job)
    assert result.status is Status.FAILED
    assert result.completed_at == NOW
    assert result.error_message == "fatal"
    assert result.retry_count == retry_count
    assert result.scheduled_at == job.scheduled_at
    assert_released(job, result, NOW)


def test_failed_uses_the_policy_backoff_cap() -> None:
    job = make_job(Status.RUNNING, retry_count=1, max_retries=5, delay=30)
    result = apply(job, Failed(now=NOW, lease_id=LEASE, error="x"), LifecyclePolicy(backoff_cap=45))
    assert isinstance(result, Job)
    assert result.scheduled_at == NOW + 45
    zero_cap = apply(
        job, Failed(now=NOW, lease_id=LEASE, error="x"), LifecyclePolicy(backoff_cap=0)
    )
    assert isinstance(zero_cap, Job)
    assert zero_cap.status is Status.QUEUED


@settings(max_examples=200, deadline=None)
@given(
    retry_count=st.integers(0, 120),
    max_retries=st.integers(0, 100),
    delay=st.integers(0, 3600),
    now=st.floats(0, 4e9),
)
def test_failed_property(retry_count: int, max_retries: int, delay: int, now: float) -> None:
    job = make_job(Status.RUNNING, retry_count=retry_count, max_retries=max_retries, delay=delay)
    result = apply(job, Failed(now=now, lease_id=LEASE, error="e"))
    assert isinstance(result, Job)
    if retry_count < max_retries:
        wait = retry_delay(delay, retry_count)
        assert result.scheduled_at == now + wait
        assert result.status is (Status.SCHEDULED if now + wait > now else Status.QUEUED)
        assert result.retry_count == retry_count + 1
    else:
        assert result.status is Status.FAILED
        assert result.retry_count == retry_count


# -- lost leases and the poison-pill guard -----------------------------------


LOSERS: list[Callable[[float, str], Event]] = [
    lambda now, lease: LeaseExpired(now=now, lease_id=lease),
    lambda now, lease: WorkerDetached(now=now, lease_id=lease),
]


@pytest.mark.parametrize("lose", LOSERS, ids=["expired", "detached"])
@pytest.mark.parametrize(
    ("lost_before", "limit", "status"),
    [
        (0, 5, Status.QUEUED),
        (3, 5, Status.QUEUED),
        (4, 5, Status.FAILED),  # the 5th lost lease of 5 allowed
        (0, 1, Status.FAILED),
        (0, 2, Status.QUEUED),
        (1, 2, Status.FAILED),
    ],
)
def test_lost_lease_requeues_or_poisons(
    lose: Callable[[float, str], Event], lost_before: int, limit: int, status: Status
) -> None:
    job = make_job(Status.RUNNING, lost_leases=lost_before, retry_count=1)
    result = apply(job, lose(LATER, LEASE), LifecyclePolicy(max_lost_leases=limit))
    assert isinstance(result, Job)
    assert result.status is status
    assert result.lost_leases == lost_before + 1
    assert result.retry_count == 1
    assert result.seq == job.seq
    assert_released(job, result, LATER)
    if status is Status.FAILED:
        assert result.completed_at == LATER
        assert result.error_message.startswith(f"poison pill: {lost_before + 1} deliveries")
        why = "lease expired" if isinstance(lose(0, ""), LeaseExpired) else "worker detached"
        assert why in result.error_message
    else:
        assert result.scheduled_at == LATER
        assert result.completed_at is None
        assert result.error_message == job.error_message


def test_default_poison_pill_limit_is_five() -> None:
    job = make_job(Status.RUNNING, lost_leases=4)
    result = apply(job, WorkerDetached(now=NOW, lease_id=LEASE))
    assert isinstance(result, Job) and result.status is Status.FAILED
    assert apply(job, WorkerDetached(now=NOW, lease_id=LEASE)) == apply(
        job, WorkerDetached(now=NOW, lease_id=LEASE), LifecyclePolicy()
    )
    assert LifecyclePolicy().max_lost_leases == 5


@pytest.mark.parametrize(("field", "value"), [("max_lost_leases", 0), ("backoff_cap", -1)])
def test_policy_rejects_nonsense(field: str, value: int) -> None:
    with pytest.raises(ValueError, match=field):
        LifecyclePolicy(**{field: value})


# -- time guards -------------------------------------------------------------


def test_promoted_before_due_is_not_due() -> None:
    job = make_job(Status.SCHEDULED)  # due at NOW + 100
    early = apply(job, Promoted(now=NOW + 99.999))
    assert isinstance(early, Rejected)
    assert early.reason is RejectReason.NOT_DUE
    on_time = apply(job, Promoted(now=NOW + 100.0))
    assert isinstance(on_time, Job) and on_time.status is Status.QUEUED


def test_lease_expired_before_expiry_is_refused() -> None:
    job = make_job(Status.RUNNING)  # expires at NOW + 60
    early = apply(job, LeaseExpired(now=NOW + 59.999, lease_id=LEASE))
    assert isinstance(early, Rejected)
    assert early.reason is RejectReason.LEASE_NOT_EXPIRED
    on_time = apply(job, LeaseExpired(now=NOW + 60.0, lease_id=LEASE))
    assert isinstance(on_time, Job) and on_time.status is Status.QUEUED


def test_lease_without_expiry_can_always_expire() -> None:
    job = make_job(Status.RUNNING, lease_expires_at=None)
    result = apply(job, LeaseExpired(now=0.0, lease_id=LEASE))
    assert isinstance(result, Job) and result.status is Status.QUEUED


def test_worker_detached_needs_no_expiry() -> None:
    job = make_job(Status.RUNNING)
    result = apply(job, WorkerDetached(now=NOW, lease_id=LEASE))
    assert isinstance(result, Job) and result.status is Status.QUEUED


# -- fencing -----------------------------------------------------------------

FENCED: list[Callable[[float, str], Event]] = [
    lambda now, lease: Completed(now=now, lease_id=lease),
    lambda now, lease: Failed(now=now, lease_id=lease, error="late"),
    lambda now, lease: LeaseExtended(now=now, lease_id=lease, lease_expires_at=now + 999),
    lambda now, lease: LeaseExpired(now=now, lease_id=lease),
    lambda now, lease: WorkerDetached(now=now, lease_id=lease),
    lambda now, lease: Released(now=now, lease_id=lease),
]


@pytest.mark.parametrize(
    "fenced", FENCED, ids=["completed", "failed", "extended", "expired", "detached", "released"]
)
@pytest.mark.parametrize("stale", ["lease-0", "", "LEASE-1"])
@pytest.mark.parametrize("now", [NOW, LATER], ids=["before-expiry", "after-expiry"])
def test_stale_lease_is_rejected(
    fenced: Callable[[float, str], Event], stale: str, now: float
) -> None:
    job = make_job(Status.RUNNING)
    before = copy.deepcopy(job)
    result = apply(job, fenced(now, stale))
    assert isinstance(result, Rejected)
    assert result.reason is RejectReason.STALE_LEASE
    assert repr(stale) in result.message
    assert job == before
    # and the current lease is still honoured afterwards
    assert not isinstance(apply(job, fenced(LATER, LEASE)), Rejected)


# -- lease extension ---------------------------------------------------------


@pytest.mark.parametrize(
    ("current", "asked", "expected"),
    [
        (NOW + 60, NOW + 120, NOW + 120),
        (NOW + 60, NOW + 30, NOW + 60),  # never shortens
        (NOW + 60, NOW + 60, NOW + 60),
        (None, NOW + 30, NOW + 30),
    ],
)
def test_lease_extended_never_shortens(
    current: float | None, asked: float, expected: float
) -> None:
    job = make_job(Status.RUNNING, lease_expires_at=current)
    result = apply(job, LeaseExtended(now=NOW, lease_id=LEASE, lease_expires_at=asked))
    assert isinstance(result, Job)
    assert result.status is Status.RUNNING
    assert result.lease_expires_at == expected
    assert result.lease_id == LEASE and result.worker_id == job.worker_id
    assert result.version == job.version + 1


@settings(max_examples=100, deadline=None)
@given(current=st.floats(0, 4e9), asked=st.floats(0, 4e9))
def test_lease_extended_is_max(current: float, asked: float) -> None:
    job = make_job(Status.RUNNING, lease_expires_at=current)
    result = apply(job, LeaseExtended(now=NOW, lease_id=LEASE, lease_expires_at=asked))
    assert isinstance(result, Job)
    assert result.lease_expires_at == max(current, asked)


# -- requeue / purge ---------------------------------------------------------


def test_requeue_resets_counters_but_keeps_identity() -> None:
    job = make_job(Status.FAILED, retry_count=7, max_retries=7, attempt=9, lost_leases=2)
    result = apply(job, Requeued(now=NOW))
    assert isinstance(result, Job)
    assert result.status is Status.QUEUED
    assert (result.retry_count, result.attempt, result.lost_leases) == (0, 0, 0)
    assert result.max_retries == 7
    assert result.retries_left
    assert result.scheduled_at == NOW
    assert result.completed_at is None
    assert result.version == job.version + 1


def test_purge_deletes() -> None:
    assert apply(make_job(Status.FAILED), Purged(now=NOW)) is None
    kept = apply(make_job(Status.COMPLETED), Purged(now=NOW))
    assert isinstance(kept, Rejected) and kept.reason is RejectReason.WRONG_STATE


# -- needs_new_seq -----------------------------------------------------------


def test_needs_new_seq_for_a_new_job() -> None:
    job = new_job("j", SPEC, LATER)
    assert needs_new_seq(None, job)


def test_needs_new_seq_after_promotion() -> None:
    old = make_job(Status.SCHEDULED)
    new = apply(old, Promoted(now=LATER))
    assert isinstance(new, Job)
    assert needs_new_seq(old, new)


def test_needs_new_seq_after_zero_delay_retry() -> None:
    old = make_job(Status.RUNNING, delay=0)
    new = apply(old, Failed(now=NOW, lease_id=LEASE, error="e"))
    assert isinstance(new, Job) and new.status is Status.QUEUED
    assert needs_new_seq(old, new)


def test_needs_new_seq_after_requeue_even_if_leases_were_lost() -> None:
    old = make_job(Status.FAILED, lost_leases=5)
    new = apply(old, Requeued(now=NOW))
    assert isinstance(new, Job)
    assert needs_new_seq(old, new)


@pytest.mark.parametrize("lose", LOSERS, ids=["expired", "detached"])
def test_lost_lease_keeps_its_seq(lose: Callable[[float, str], Event]) -> None:
    old = make_job(Status.RUNNING)
    new = apply(old, lose(LATER, LEASE))
    assert isinstance(new, Job) and new.status is Status.QUEUED
    assert not needs_new_seq(old, new)
    # ...unless it never had one (a record restored without a seq)
    unseq = make_job(Status.RUNNING, seq=0)
    renewed = apply(unseq, lose(LATER, LEASE))
    assert isinstance(renewed, Job)
    assert needs_new_seq(unseq, renewed)


# -- random walks ------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(EVENT_TYPES), st.floats(0, 500)), max_size=30))
def test_random_walk_stays_in_the_table(steps: list[tuple[type[Event], float]]) -> None:
    """Any sequence of events keeps the job inside the table's targets."""
    job: Job | None = None
    now = NOW
    lease = LEASE
    for event_type, dt in steps:
        now += dt
        current = LEASE if job is None or job.lease_id is None else job.lease_id
        event = make_event(event_type, now, current)
        if isinstance(event, Claimed):
            lease = event.lease_id
        status = None if job is None else job.status
        result = apply(job, event)
        if isinstance(result, Rejected):
            assert (status, event_type) not in TRANSITIONS or result.reason in {
                RejectReason.NOT_DUE,
                RejectReason.LEASE_NOT_EXPIRED,
            }
            continue
        assert (status, event_type) in TRANSITIONS
        assert (None if result is None else result.status) in TRANSITIONS[status, event_type][1]
        if result is not None:
            assert result.version == (1 if job is None else job.version + 1)
            assert (result.status is Status.RUNNING) == (result.lease_id is not None)
            assert result.retry_count <= result.max_retries
            if result.status is Status.RUNNING:
                assert result.lease_id == lease
        job = result


def test_a_detach_the_job_is_not_to_blame_for_is_not_counted() -> None:
    old = make_job(Status.RUNNING, lost_leases=4)
    new = apply(old, WorkerDetached(now=LATER, lease_id=LEASE, counted=False))
    assert isinstance(new, Job) and new.status is Status.QUEUED
    assert (new.lost_leases, new.attempt, new.seq) == (4, old.attempt, old.seq)
    assert_released(old, new, LATER)
    stale = apply(old, WorkerDetached(now=LATER, lease_id="other", counted=False))
    assert isinstance(stale, Rejected) and stale.reason is RejectReason.STALE_LEASE
