"""Tests of the backend health machine, its table, probe backoff and routing.

Everything goes through the public API of ``stackduck_core._failover``; no
mocks, no I/O, time is plain floats.
"""

from __future__ import annotations

import itertools
import math
from collections import deque

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stackduck_core._errors import StackduckError
from stackduck_core._failover import (
    DEFAULT_HEALTH_POLICY,
    HEALTH_EVENT_TYPES,
    HEALTH_TRANSITIONS,
    BackendHealth,
    BackendRole,
    Durability,
    EnqueueMode,
    Health,
    HealthChanged,
    HealthEffect,
    HealthEvent,
    HealthPolicy,
    InvalidHealthTransition,
    OpFailed,
    OpSucceeded,
    OpTimedOut,
    ProbeFailed,
    ProbeSucceeded,
    QueueTier,
    ReconcileFinished,
    ReconcileStep,
    Route,
    StartReconcile,
    probe_delay,
    reconcile_plan,
    route,
)

H, S, D, R = Health.HEALTHY, Health.SUSPECT, Health.DOWN, Health.RECOVERING


def make(policy: HealthPolicy = DEFAULT_HEALTH_POLICY) -> BackendHealth:
    return BackendHealth("redis", BackendRole.QUEUE_TIER, policy)


def feed(machine: BackendHealth, *events: HealthEvent) -> list[HealthEffect]:
    effects: list[HealthEffect] = []
    for event in events:
        effects.extend(machine.handle(event))
    return effects


# Canonical ways into each state with the default policy. DOWN goes through a
# failed recovery so that a reconcile id has been issued (and is now stale).
PATHS: dict[Health, tuple[HealthEvent, ...]] = {
    H: (),
    S: (OpFailed(1.0),),
    D: (OpFailed(1.0), OpTimedOut(2.0), OpFailed(3.0), ProbeSucceeded(4.0), ProbeFailed(5.0)),
    R: (OpFailed(1.0), OpTimedOut(2.0), OpFailed(3.0), ProbeSucceeded(4.0)),
}


def in_state(state: Health) -> BackendHealth:
    machine = make()
    feed(machine, *PATHS[state])
    assert machine.state is state
    return machine


def canonical_event(event_type: type[HealthEvent], now: float = 10.0) -> HealthEvent:
    if event_type is ReconcileFinished:
        # Id 1: pending in the canonical RECOVERING, stale in the canonical DOWN.
        return ReconcileFinished(now, reconcile_id=1)
    return event_type(now)


# The new state for every pair, from the canonical machines above, and None
# for pairs that must be refused.
GOLDEN_NEXT: dict[tuple[Health, type[HealthEvent]], Health | None] = {
    (H, OpSucceeded): H,
    (H, OpFailed): S,
    (H, OpTimedOut): S,
    (H, ProbeSucceeded): H,
    (H, ProbeFailed): S,
    (H, ReconcileFinished): None,
    (S, OpSucceeded): H,
    (S, OpFailed): S,
    (S, OpTimedOut): S,
    (S, ProbeSucceeded): H,
    (S, ProbeFailed): S,
    (S, ReconcileFinished): None,
    (D, OpSucceeded): D,
    (D, OpFailed): D,
    (D, OpTimedOut): D,
    (D, ProbeSucceeded): R,
    (D, ProbeFailed): D,
    (D, ReconcileFinished): D,
    (R, OpSucceeded): R,
    (R, OpFailed): D,
    (R, OpTimedOut): D,
    (R, ProbeSucceeded): R,
    (R, ProbeFailed): D,
    (R, ReconcileFinished): R,
}


# ---------------------------------------------------------------------------
# The table, pair by pair


@pytest.mark.parametrize(
    ("state", "event_type"),
    list(itertools.product(Health, HEALTH_EVENT_TYPES)),
    ids=lambda v: v.name if isinstance(v, Health) else v.__name__,
)
def test_every_state_event_pair(state: Health, event_type: type[HealthEvent]) -> None:
    machine = in_state(state)
    before = machine.statistics()
    event = canonical_event(event_type)
    expected = GOLDEN_NEXT[state, event_type]
    if expected is None:
        assert (state, event_type) not in HEALTH_TRANSITIONS
        with pytest.raises(InvalidHealthTransition) as info:
            machine.handle(event)
        assert info.value.backend_name == "redis"
        assert info.value.state is state
        assert info.value.event_type == event_type.__name__
        assert machine.statistics() == before
        return
    effects = machine.handle(event)
    assert machine.state is expected
    assert expected in HEALTH_TRANSITIONS[state, event_type].targets
    changes = [e for e in effects if isinstance(e, HealthChanged)]
    if expected is state:
        assert effects == []
    else:
        assert changes == [HealthChanged("redis", state, expected, 10.0, event_type.__name__)]


def test_table_has_exactly_the_golden_pairs() -> None:
    allowed = {pair for pair, new in GOLDEN_NEXT.items() if new is not None}
    assert set(HEALTH_TRANSITIONS) == allowed
    assert len(GOLDEN_NEXT) == len(Health) * len(HEALTH_EVENT_TYPES)


def test_table_rows_are_documented() -> None:
    for row in HEALTH_TRANSITIONS.values():
        assert row.note
        assert row.targets
        assert "function" not in repr(row)  # readable when logged or rendered


def _graph() -> dict[Health, set[Health]]:
    graph: dict[Health, set[Health]] = {state: set() for state in Health}
    for (state, _event_type), row in HEALTH_TRANSITIONS.items():
        graph[state] |= row.targets
    return graph


def _reachable(start: Health, graph: dict[Health, set[Health]]) -> set[Health]:
    seen, todo = {start}, deque([start])
    while todo:
        for nxt in graph[todo.popleft()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_every_state_is_reachable_from_healthy() -> None:
    assert _reachable(H, _graph()) == set(Health)


def test_healthy_is_reachable_from_every_state() -> None:
    graph = _graph()
    for state in Health:
        assert H in _reachable(state, graph)


def test_the_only_refused_pairs_are_reconciles_outside_recovery() -> None:
    missing = set(itertools.product(Health, HEALTH_EVENT_TYPES)) - set(HEALTH_TRANSITIONS)
    assert missing == {(H, ReconcileFinished), (S, ReconcileFinished)}


# ---------------------------------------------------------------------------
# Scripts


def test_failures_of_any_kind_add_up_to_down() -> None:
    machine = make()
    assert feed(machine, OpFailed(1.0)) == [HealthChanged("redis", H, S, 1.0, "OpFailed")]
    assert feed(machine, ProbeFailed(2.0)) == []
    assert machine.statistics().consecutive_failures == 2
    assert feed(machine, OpTimedOut(3.0)) == [HealthChanged("redis", S, D, 3.0, "OpTimedOut")]
    assert machine.state is D


def test_a_success_in_between_restarts_the_count() -> None:
    machine = make()
    feed(machine, OpFailed(1.0), OpFailed(2.0), OpSucceeded(3.0))
    assert machine.state is H
    assert machine.statistics().consecutive_failures == 0
    feed(machine, OpFailed(4.0), OpFailed(5.0))
    assert machine.state is S


def test_a_successful_probe_clears_suspicion() -> None:
    machine = make()
    feed(machine, OpTimedOut(1.0), ProbeSucceeded(1.5))
    assert machine.state is H


def test_a_late_failed_probe_while_healthy_counts() -> None:
    machine = make()
    assert feed(machine, ProbeFailed(1.0)) == [HealthChanged("redis", H, S, 1.0, "ProbeFailed")]


def test_one_failure_is_enough_when_the_policy_says_so() -> None:
    machine = make(HealthPolicy(failures_to_down=1))
    assert feed(machine, OpTimedOut(1.0)) == [HealthChanged("redis", H, D, 1.0, "OpTimedOut")]


def test_late_operation_outcomes_while_down_are_ignored() -> None:
    machine = in_state(D)
    before = machine.statistics()
    assert feed(machine, OpSucceeded(6.0), OpFailed(6.0), OpTimedOut(6.0)) == []
    assert machine.statistics() == before


def test_recovery_reconcile_first_then_probes() -> None:
    machine = make()
    feed(machine, OpFailed(1.0), OpFailed(2.0), OpFailed(3.0))
    effects = feed(machine, ProbeSucceeded(4.0))
    assert effects == [
        HealthChanged("redis", D, R, 4.0, "ProbeSucceeded"),
        StartReconcile("redis", 1, (ReconcileStep.REQUEUE_MISSING_JOBS,)),
    ]
    assert feed(machine, ReconcileFinished(5.0, 1)) == []
    stats = machine.statistics()
    assert (stats.state, stats.reconciled, stats.recovery_successes) == (R, True, 1)
    assert stats.pending_reconcile is None
    assert feed(machine, ProbeSucceeded(6.0)) == [
        HealthChanged("redis", R, H, 6.0, "ProbeSucceeded")
    ]


def test_recovery_probes_first_then_reconcile() -> None:
    machine = in_state(R)
    assert feed(machine, ProbeSucceeded(5.0), ProbeSucceeded(6.0)) == []
    assert machine.statistics().recovery_successes == 3
    assert feed(machine, ReconcileFinished(7.0, 1)) == [
        HealthChanged("redis", R, H, 7.0, "ReconcileFinished")
    ]
    stats = machine.statistics()
    assert stats.consecutive_failures == stats.failed_probes == stats.recovery_successes == 0
    assert not stats.reconciled


def test_one_recovery_probe_is_enough_when_the_policy_says_so() -> None:
    machine = make(HealthPolicy(successes_to_recover=1))
    feed(machine, OpFailed(1.0), OpFailed(2.0), OpFailed(3.0), ProbeSucceeded(4.0))
    assert feed(machine, ReconcileFinished(5.0, 1)) == [
        HealthChanged("redis", R, H, 5.0, "ReconcileFinished")
    ]


def test_relapse_makes_the_running_reconcile_stale() -> None:
    machine = in_state(R)
    assert feed(machine, ProbeFailed(5.0)) == [HealthChanged("redis", R, D, 5.0, "ProbeFailed")]
    assert machine.statistics().pending_reconcile is None
    assert feed(machine, ReconcileFinished(5.5, 1)) == []  # stale, while DOWN
    effects = feed(machine, ProbeSucceeded(6.5))
    assert effects[-1] == StartReconcile("redis", 2, (ReconcileStep.REQUEUE_MISSING_JOBS,))
    assert feed(machine, ReconcileFinished(7.0, 1)) == []  # stale, while RECOVERING
    assert not machine.statistics().reconciled
    assert feed(machine, ProbeSucceeded(7.5)) == []  # enough probes, not reconciled yet
    assert feed(machine, ReconcileFinished(8.0, 2)) == [
        HealthChanged("redis", R, H, 8.0, "ReconcileFinished")
    ]


def test_a_reconcile_reported_twice_counts_once() -> None:
    machine = in_state(R)
    feed(machine, ReconcileFinished(4.2, 1))
    before = machine.statistics()
    assert feed(machine, ReconcileFinished(4.3, 1)) == []
    assert machine.statistics() == before


@pytest.mark.parametrize("state", [D, R])
@pytest.mark.parametrize("reconcile_id", [0, -1, 2, 99])
def test_a_reconcile_that_was_never_started_is_refused(state: Health, reconcile_id: int) -> None:
    machine = in_state(state)
    before = machine.statistics()
    with pytest.raises(InvalidHealthTransition, match="never started") as info:
        machine.handle(ReconcileFinished(10.0, reconcile_id))
    assert info.value.detail == f"reconcile {reconcile_id} was never started"
    assert machine.statistics() == before


def test_a_reconcile_that_fails_sends_the_backend_down() -> None:
    machine = in_state(R)
    assert feed(machine, OpFailed(5.0, started_at=4.5)) == [
        HealthChanged("redis", R, D, 5.0, "OpFailed")
    ]
    assert machine.statistics().failed_probes == 1


def test_operation_successes_prove_nothing_while_recovering() -> None:
    machine = in_state(R)
    before = machine.statistics()
    assert feed(machine, OpSucceeded(4.2), OpSucceeded(4.4)) == []
    assert machine.statistics() == before


def test_stale_success_does_not_clear_suspicion() -> None:
    machine = make()
    feed(machine, OpFailed(10.0))
    assert feed(machine, OpSucceeded(11.0, started_at=9.0)) == []
    assert machine.state is S
    # Started exactly when the trouble was seen: fresh enough.
    feed(machine, OpSucceeded(11.0, started_at=10.0))
    assert machine.state is H


def test_stale_failure_does_not_abort_recovery() -> None:
    machine = in_state(R)  # entered at 4.0, next probe at 4.5
    before = machine.statistics()
    assert feed(machine, OpTimedOut(4.3, started_at=3.0), OpFailed(4.3, started_at=3.9)) == []
    assert machine.statistics() == before
    feed(machine, OpTimedOut(4.4, started_at=4.0))
    assert machine.state is D


def test_reconcile_plans() -> None:
    assert reconcile_plan(BackendRole.QUEUE_TIER) == (ReconcileStep.REQUEUE_MISSING_JOBS,)
    assert reconcile_plan(BackendRole.RECORD_STORE) == (
        ReconcileStep.FLUSH_OUTBOX,
        ReconcileStep.FLUSH_BUFFERED_ACKS,
    )
    machine = BackendHealth("postgres", BackendRole.RECORD_STORE)
    effects = feed(machine, OpFailed(1.0), OpFailed(2.0), OpFailed(3.0), ProbeSucceeded(4.0))
    assert effects[-1] == StartReconcile(
        "postgres", 1, (ReconcileStep.FLUSH_OUTBOX, ReconcileStep.FLUSH_BUFFERED_ACKS)
    )


def test_machine_properties_and_statistics() -> None:
    policy = HealthPolicy(failures_to_down=2, successes_to_recover=1, probe_base=1.0, probe_cap=4.0)
    machine = BackendHealth("pg", BackendRole.RECORD_STORE, policy)
    assert (machine.name, machine.role, machine.policy) == ("pg", BackendRole.RECORD_STORE, policy)
    fresh = machine.statistics()
    assert fresh.last_change_at is None
    assert fresh.next_probe_at is None
    assert fresh.transitions == fresh.probes == fresh.reconciles_started == 0
    feed(machine, OpFailed(1.0), OpFailed(2.0), ProbeFailed(3.0), ProbeFailed(5.0))
    stats = machine.statistics()
    assert stats == attrs.evolve(
        fresh,
        state=D,
        consecutive_failures=2,
        failed_probes=2,
        probes=2,
        transitions=2,
        last_change_at=2.0,
        next_probe_at=9.0,
    )


def test_invalid_transition_error() -> None:
    error = InvalidHealthTransition(
        "redis", H, "ReconcileFinished", "no such row in HEALTH_TRANSITIONS"
    )
    assert isinstance(error, StackduckError)
    assert str(error) == (
        "ReconcileFinished is not allowed for backend 'redis' in state 'healthy': "
        "no such row in HEALTH_TRANSITIONS"
    )


# ---------------------------------------------------------------------------
# Probe scheduling and backoff

# (failed probes, base, cap) -> delay
PROBE_DELAYS = [
    (0, 0.5, 30.0, 0.5),
    (1, 0.5, 30.0, 1.0),
    (2, 0.5, 30.0, 2.0),
    (3, 0.5, 30.0, 4.0),
    (4, 0.5, 30.0, 8.0),
    (5, 0.5, 30.0, 16.0),
    (6, 0.5, 30.0, 30.0),  # 32 capped
    (7, 0.5, 30.0, 30.0),
    (100, 0.5, 30.0, 30.0),
    (10**9, 0.5, 30.0, 30.0),  # no overflow, no long loop
    (0, 2.0, 2.0, 2.0),  # cap == base: constant
    (5, 2.0, 2.0, 2.0),
    (2, 1.0, 3.0, 3.0),  # cap not a power of two
    (1, 1.0, 3.0, 2.0),
]


@pytest.mark.parametrize(("failed", "base", "cap", "expected"), PROBE_DELAYS)
def test_probe_delay_golden(failed: int, base: float, cap: float, expected: float) -> None:
    assert probe_delay(failed, HealthPolicy(probe_base=base, probe_cap=cap)) == expected


def test_probe_delay_default_policy() -> None:
    assert probe_delay(3) == 4.0


def test_probe_schedule_through_a_whole_outage() -> None:
    machine = make()
    assert machine.next_probe_at() is None
    feed(machine, OpFailed(100.0))
    assert machine.next_probe_at() == 100.5  # SUSPECT: probe_base after entering
    feed(machine, OpSucceeded(100.2, started_at=99.0))  # stale: ignored
    assert machine.next_probe_at() == 100.5  # ops don't move the probe clock
    feed(machine, ProbeFailed(100.5))
    assert machine.next_probe_at() == 101.0  # probe results do
    feed(machine, OpTimedOut(100.75))  # third failure: DOWN
    now = 100.75
    for expected_delay in [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]:
        due = machine.next_probe_at()
        assert due == now + expected_delay
        assert due is not None
        now = due
        feed(machine, ProbeFailed(now))
    recovered_at = now + 30.0
    feed(machine, ProbeSucceeded(recovered_at))
    assert machine.state is R
    assert machine.next_probe_at() == recovered_at + 0.5  # RECOVERING: probe_base
    relapsed_at = recovered_at + 0.5
    feed(machine, ProbeFailed(relapsed_at))  # relapse: the backoff resumes at the cap
    assert machine.next_probe_at() == relapsed_at + 30.0
    assert machine.statistics().failed_probes == 9


def test_an_overdue_probe_is_due_at_the_latest_time_seen() -> None:
    machine = in_state(D)  # failed_probes 1, probe clock at 5.0: due at 6.0
    assert machine.next_probe_at() == 6.0
    feed(machine, OpSucceeded(50.0))  # a late fact, ignored, but time has passed
    assert machine.next_probe_at() == 50.0
    feed(machine, OpSucceeded(20.0))  # the clock stepped back: still not earlier
    assert machine.next_probe_at() == 50.0


# ---------------------------------------------------------------------------
# Policy validation


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"failures_to_down": 0}, ValueError),
        ({"failures_to_down": -3}, ValueError),
        ({"failures_to_down": 2.0}, TypeError),
        ({"failures_to_down": True}, TypeError),
        ({"successes_to_recover": 0}, ValueError),
        ({"successes_to_recover": "2"}, TypeError),
        ({"probe_base": 0.0}, ValueError),
        ({"probe_base": -1.0}, ValueError),
        ({"probe_base": math.nan}, ValueError),
        ({"probe_base": math.inf, "probe_cap": math.inf}, ValueError),
        ({"probe_base": "1"}, TypeError),
        ({"probe_base": False}, TypeError),
        ({"probe_cap": math.inf}, ValueError),
        ({"probe_cap": 0.25}, ValueError),  # below the default base of 0.5
        ({"probe_base": 5.0, "probe_cap": 4.0}, ValueError),
    ],
)
def test_policy_validation(kwargs: dict[str, object], error: type[Exception]) -> None:
    with pytest.raises(error):
        HealthPolicy(**kwargs)  # type: ignore[arg-type]


def test_policy_defaults_and_integer_seconds() -> None:
    assert DEFAULT_HEALTH_POLICY == HealthPolicy(3, 2, 0.5, 30.0)
    assert HealthPolicy(probe_base=1, probe_cap=1).probe_cap == 1


# ---------------------------------------------------------------------------
# Routing

M, RD = QueueTier.MEMORY, QueueTier.REDIS
ACC, REJ, BUF = EnqueueMode.ACCEPT, EnqueueMode.REJECT_UNAVAILABLE, EnqueueMode.BUFFER
ST, BU = Durability.STRICT, Durability.BUFFERED

# (queue tier, record store, durability) -> (queue, claim from record store, enqueue, buffer acks)
GOLDEN_ROUTES: dict[
    tuple[Health | None, Health, Durability], tuple[QueueTier, bool, EnqueueMode, bool]
] = {
    # No Redis configured: memory is the complete queue tier.
    (None, H, ST): (M, False, ACC, False),
    (None, H, BU): (M, False, ACC, False),
    (None, S, ST): (M, False, ACC, False),
    (None, S, BU): (M, False, ACC, False),
    (None, D, ST): (M, False, REJ, True),
    (None, D, BU): (M, False, BUF, True),
    (None, R, ST): (M, False, REJ, True),
    (None, R, BU): (M, False, BUF, True),
    # Redis healthy.
    (H, H, ST): (RD, False, ACC, False),
    (H, H, BU): (RD, False, ACC, False),
    (H, S, ST): (RD, False, ACC, False),
    (H, S, BU): (RD, False, ACC, False),
    (H, D, ST): (RD, False, REJ, True),
    (H, D, BU): (RD, False, BUF, True),
    (H, R, ST): (RD, False, REJ, True),
    (H, R, BU): (RD, False, BUF, True),
    # Redis suspect: still used.
    (S, H, ST): (RD, False, ACC, False),
    (S, H, BU): (RD, False, ACC, False),
    (S, S, ST): (RD, False, ACC, False),
    (S, S, BU): (RD, False, ACC, False),
    (S, D, ST): (RD, False, REJ, True),
    (S, D, BU): (RD, False, BUF, True),
    (S, R, ST): (RD, False, REJ, True),
    (S, R, BU): (RD, False, BUF, True),
    # Redis down: memory, plus record-store claims while the store is usable.
    (D, H, ST): (M, True, ACC, False),
    (D, H, BU): (M, True, ACC, False),
    (D, S, ST): (M, True, ACC, False),
    (D, S, BU): (M, True, ACC, False),
    (D, D, ST): (M, False, REJ, True),
    (D, D, BU): (M, False, BUF, True),
    (D, R, ST): (M, False, REJ, True),
    (D, R, BU): (M, False, BUF, True),
    # Redis recovering: same as down until reconciled.
    (R, H, ST): (M, True, ACC, False),
    (R, H, BU): (M, True, ACC, False),
    (R, S, ST): (M, True, ACC, False),
    (R, S, BU): (M, True, ACC, False),
    (R, D, ST): (M, False, REJ, True),
    (R, D, BU): (M, False, BUF, True),
    (R, R, ST): (M, False, REJ, True),
    (R, R, BU): (M, False, BUF, True),
}


def test_golden_routes_cover_every_combination() -> None:
    combos = set(itertools.product([None, *Health], Health, Durability))
    assert set(GOLDEN_ROUTES) == combos


@pytest.mark.parametrize(
    ("queue_tier", "record_store", "durability"),
    list(itertools.product([None, *Health], Health, Durability)),
    ids=str,
)
def test_route(queue_tier: Health | None, record_store: Health, durability: Durability) -> None:
    result = route(queue_tier, record_store, durability)
    queue, claim, enqueue, buffer_acks = GOLDEN_ROUTES[queue_tier, record_store, durability]
    assert (result.queue, result.claim_record_store, result.enqueue, result.buffer_acks) == (
        queue,
        claim,
        enqueue,
        buffer_acks,
    )
    # The reason names both backends' situation, and explains every refusal.
    assert result.reason.startswith(f"record store is {record_store.value}")
    if queue_tier is None:
        assert "no redis configured" in result.reason
    else:
        assert f"redis is {queue_tier.value}" in result.reason
    if enqueue is REJ:
        assert "durability=strict refuses new jobs" in result.reason
    if enqueue is BUF:
        assert "outbox" in result.reason
    if claim:
        assert "claimed from the record store" in result.reason
    if queue is M and queue_tier is not None and not claim:
        assert "only jobs in this instance's memory can be delivered" in result.reason


def test_route_reason_examples() -> None:
    assert route(H, D, ST) == Route(
        queue=RD,
        claim_record_store=False,
        enqueue=REJ,
        buffer_acks=True,
        reason=(
            "record store is down; durability=strict refuses new jobs and buffers acks "
            "until it recovers; redis is healthy"
        ),
    )
    assert route(D, H, ST).reason == (
        "record store is healthy; redis is down; queue tier switched to memory; "
        "jobs held by other instances are claimed from the record store"
    )
    assert route(None, H, BU).reason == (
        "record store is healthy; queue tier is in memory (no redis configured)"
    )


# ---------------------------------------------------------------------------
# Properties over random event sequences

policies = st.builds(
    HealthPolicy,
    failures_to_down=st.integers(1, 4),
    successes_to_recover=st.integers(1, 3),
    probe_base=st.sampled_from([0.25, 0.5, 1.0]),
    probe_cap=st.sampled_from([1.0, 8.0, 30.0]),
)

steps = st.tuples(
    st.sampled_from(HEALTH_EVENT_TYPES),
    st.floats(0.0, 20.0),  # time since the previous event
    st.one_of(st.none(), st.floats(0.0, 40.0)),  # how long ago an op started
    st.integers(-1, 4),  # reconcile id
)


def build(
    event_type: type[HealthEvent], now: float, age: float | None, reconcile_id: int
) -> HealthEvent:
    if event_type is ReconcileFinished:
        return ReconcileFinished(now, reconcile_id)
    if event_type in (OpSucceeded, OpFailed, OpTimedOut):
        started_at = None if age is None else now - age
        return event_type(now, started_at=started_at)
    return event_type(now)


def check_invariants(machine: BackendHealth, latest_now: float) -> None:
    stats = machine.statistics()
    policy = machine.policy
    due = machine.next_probe_at()
    assert stats.next_probe_at == due
    if stats.state is H:
        assert due is None
        assert stats.consecutive_failures == stats.failed_probes == stats.recovery_successes == 0
        assert stats.pending_reconcile is None and not stats.reconciled
    else:
        assert due is not None
        # Never in the past, never further than the longest backoff.
        assert latest_now <= due <= latest_now + policy.probe_cap
    if stats.state is S:
        assert 1 <= stats.consecutive_failures < policy.failures_to_down
    if stats.state is D:
        assert stats.pending_reconcile is None and not stats.reconciled
        assert stats.recovery_successes == 0
    if stats.state is R:
        # Exactly one of: a reconcile is awaited, or it has finished.
        assert (stats.pending_reconcile is not None) != stats.reconciled
        assert stats.recovery_successes >= 1
        assert not (stats.reconciled and stats.recovery_successes >= policy.successes_to_recover)
    assert stats.pending_reconcile in (None, stats.reconciles_started)


@settings(max_examples=300, deadline=None)
@given(policy=policies, start=st.floats(0.0, 2e9), script=st.lists(steps, max_size=60))
def test_random_event_sequences(
    policy: HealthPolicy,
    start: float,
    script: list[tuple[type[HealthEvent], float, float | None, int]],
) -> None:
    machine = make(policy)
    now = seen = start  # seen: the latest time the machine accepted
    changes = 0
    for event_type, dt, age, reconcile_id in script:
        now += dt
        event = build(event_type, now, age, reconcile_id)
        old = machine.statistics()
        try:
            effects = machine.handle(event)
        except InvalidHealthTransition:
            assert machine.statistics() == old
            refused_pair = (old.state, event_type) not in HEALTH_TRANSITIONS
            bad_id = isinstance(event, ReconcileFinished) and not (
                1 <= event.reconcile_id <= old.reconciles_started
            )
            assert refused_pair or bad_id
        else:
            seen = now
            new = machine.state
            assert new in HEALTH_TRANSITIONS[old.state, event_type].targets
            expected: list[object] = []
            if new is not old.state:
                changes += 1
                expected.append(HealthChanged("redis", old.state, new, now, event_type.__name__))
                if new is R:
                    expected.append(
                        StartReconcile(
                            "redis",
                            old.reconciles_started + 1,
                            (ReconcileStep.REQUEUE_MISSING_JOBS,),
                        )
                    )
            assert effects == expected
            if isinstance(event, (ProbeSucceeded, ProbeFailed)) or new is not old.state:
                # The probe clock restarted now.
                due = machine.next_probe_at()
                assert due is None or now + policy.probe_base <= due
        check_invariants(machine, seen)
        assert machine.statistics().transitions == changes

    # Liveness: whatever happened, probes that succeed and a reconcile that
    # finishes always bring the backend back.
    for _ in range(policy.successes_to_recover + 2):
        if machine.state is H:
            break
        now += 1.0
        pending = machine.statistics().pending_reconcile
        if pending is not None:
            machine.handle(ReconcileFinished(now, pending))
        else:
            machine.handle(ProbeSucceeded(now))
    assert machine.state is H
