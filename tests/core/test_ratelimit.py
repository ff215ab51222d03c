"""Tests of GCRA rate limiting: golden rows, validation and properties."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stackduck_core._ratelimit import GcraDecision, RateLimit, RateLimiter, gcra

# ---------------------------------------------------------------------------
# Golden rows: (tat, now, rate, burst, cost) -> (allowed, new_tat, retry_after).
# Rates are chosen so that T = 1 / rate and every result is exact in binary.
GOLDEN = [
    # A fresh type (tat = now): the bucket is full.
    (0.0, 0.0, 1.0, 1, 1, True, 1.0, 0.0),
    # burst 1: the next token comes T later.
    (1.0, 0.0, 1.0, 1, 1, False, 1.0, 1.0),
    (1.0, 0.5, 1.0, 1, 1, False, 1.0, 0.5),
    (1.0, 1.0, 1.0, 1, 1, True, 2.0, 0.0),
    # A long idle period earns no more than the burst: max(tat, now).
    (0.0, 100.0, 1.0, 1, 1, True, 101.0, 0.0),
    # rate 2/s (T = 0.5), burst 3: three at once, then one every 0.5 s.
    (10.0, 10.0, 2.0, 3, 1, True, 10.5, 0.0),
    (10.5, 10.0, 2.0, 3, 1, True, 11.0, 0.0),
    (11.0, 10.0, 2.0, 3, 1, True, 11.5, 0.0),  # exactly at the limit: allowed
    (11.5, 10.0, 2.0, 3, 1, False, 11.5, 0.5),
    (11.5, 10.5, 2.0, 3, 1, True, 12.0, 0.0),
    # Costs: a batch of 3 takes the whole burst.
    (10.0, 10.0, 2.0, 3, 3, True, 11.5, 0.0),
    (10.5, 10.0, 2.0, 3, 3, False, 10.5, 0.5),
    (10.5, 10.0, 2.0, 3, 2, True, 11.5, 0.0),
    # Slow rate: 0.25/s (T = 4).
    (50.0, 45.0, 0.25, 1, 1, False, 50.0, 5.0),
    (50.0, 46.0, 0.25, 2, 1, True, 54.0, 0.0),
    # Epoch-sized times.
    (1_700_000_000.0, 1_700_000_000.0, 4.0, 1, 1, True, 1_700_000_000.25, 0.0),
    (1_700_000_000.25, 1_700_000_000.0, 4.0, 1, 1, False, 1_700_000_000.25, 0.25),
    # Negative times are just times.
    (-5.0, -5.0, 1.0, 1, 1, True, -4.0, 0.0),
]


@pytest.mark.parametrize(
    ("tat", "now", "rate", "burst", "cost", "allowed", "new_tat", "retry_after"), GOLDEN
)
def test_gcra_golden(
    tat: float,
    now: float,
    rate: float,
    burst: int,
    cost: int,
    allowed: bool,
    new_tat: float,
    retry_after: float,
) -> None:
    decision = gcra(tat, now, RateLimit(rate, burst), cost)
    assert decision == GcraDecision(allowed=allowed, new_tat=new_tat, retry_after=retry_after)


def test_rounding_does_not_refuse_an_on_time_arrival() -> None:
    # (now + T) - T != now in binary for these values; the tolerance absorbs it.
    now = 1_700_000_000.1
    limit = RateLimit(rate=10.0, burst=1)
    first = gcra(now, now, limit)
    second = gcra(first.new_tat, now + 0.1, limit)
    assert first.allowed and second.allowed


def test_retry_after_is_rounded_up_so_that_waiting_it_is_enough() -> None:
    # allow_at - now is rounded at the magnitude of 32768, far coarser than
    # the tolerance around allow_at (about 1.77): found by hypothesis.
    limit = RateLimit(rate=1.0, burst=1)
    tat, now = 1.7733425206708944, -32767.0
    decision = gcra(tat, now, limit)
    assert not decision.allowed
    assert now + decision.retry_after >= tat
    assert gcra(tat, now + decision.retry_after, limit).allowed


def test_an_early_arrival_beyond_rounding_is_refused() -> None:
    limit = RateLimit(rate=1.0, burst=1)
    decision = gcra(1_700_000_001.0, 1_700_000_000.0 - 1e-5, limit)
    assert not decision.allowed
    assert decision.retry_after == pytest.approx(1.0 + 1e-5)


@pytest.mark.parametrize(
    ("tat", "now", "cost"),
    [
        (math.inf, 0.0, 1),
        (0.0, math.nan, 1),
        (-math.inf, 0.0, 1),
        (0.0, 0.0, 0),
        (0.0, 0.0, -1),
        (0.0, 0.0, 4),  # above the burst of 3: could never be allowed
    ],
)
def test_gcra_refuses_bad_arguments(tat: float, now: float, cost: int) -> None:
    with pytest.raises(ValueError):
        gcra(tat, now, RateLimit(rate=1.0, burst=3), cost)


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"rate": 0.0}, ValueError),
        ({"rate": -1.0}, ValueError),
        ({"rate": math.nan}, ValueError),
        ({"rate": math.inf}, ValueError),
        ({"rate": "1"}, TypeError),
        ({"rate": True}, TypeError),
        ({"rate": 1.0, "burst": 0}, ValueError),
        ({"rate": 1.0, "burst": -2}, ValueError),
        ({"rate": 1.0, "burst": 1.5}, TypeError),
        ({"rate": 1.0, "burst": True}, TypeError),
    ],
)
def test_rate_limit_validation(kwargs: dict[str, object], error: type[Exception]) -> None:
    with pytest.raises(error):
        RateLimit(**kwargs)  # type: ignore[arg-type]


def test_rate_limit_defaults() -> None:
    limit = RateLimit(rate=4)
    assert limit.burst == 1
    assert limit.emission_interval == 0.25


# ---------------------------------------------------------------------------
# The limiter


def test_types_without_a_limit_are_always_allowed() -> None:
    limiter = RateLimiter()
    for _ in range(1000):
        assert limiter.try_acquire("email", 5.0, cost=50) == GcraDecision(True, 5.0, 0.0)
    assert limiter.next_allowed_at("email", 5.0) is None
    with pytest.raises(ValueError):
        limiter.try_acquire("email", 5.0, cost=0)


def test_limiter_script() -> None:
    limiter = RateLimiter()
    limiter.set_limit("email", RateLimit(rate=2.0, burst=2))
    assert limiter.next_allowed_at("email", 100.0) == 100.0
    assert limiter.try_acquire("email", 100.0).allowed
    assert limiter.try_acquire("email", 100.0).allowed
    refused = limiter.try_acquire("email", 100.0)
    assert refused == GcraDecision(False, 101.0, 0.5)
    # Asking does not take anything, and neither does a refusal.
    assert limiter.next_allowed_at("email", 100.0) == 100.5
    assert limiter.next_allowed_at("email", 100.2) == 100.5
    assert limiter.try_acquire("email", 100.5).allowed
    # Other types are independent.
    assert limiter.try_acquire("sms", 100.5).allowed
    with pytest.raises(ValueError):
        limiter.try_acquire("email", 100.5, cost=3)


def test_changing_a_limit_keeps_its_state_and_removing_forgets_it() -> None:
    limiter = RateLimiter()
    limiter.set_limit("email", RateLimit(rate=1.0, burst=1))
    assert limiter.try_acquire("email", 0.0).allowed
    limiter.set_limit("email", RateLimit(rate=1.0, burst=1))  # no fresh burst
    assert not limiter.try_acquire("email", 0.0).allowed
    limiter.set_limit("email", None)
    assert limiter.try_acquire("email", 0.0).allowed  # unlimited now
    limiter.set_limit("email", RateLimit(rate=1.0, burst=1))
    assert limiter.try_acquire("email", 0.0).allowed  # state was forgotten
    limiter.set_limit("never-limited", None)  # removing what isn't there is fine


def test_limits_snapshot() -> None:
    limiter = RateLimiter()
    assert dict(limiter.limits()) == {}
    limiter.set_limit("a", RateLimit(1.0, 2))
    snapshot = limiter.limits()
    limiter.set_limit("b", RateLimit(3.0))
    assert dict(snapshot) == {"a": RateLimit(1.0, 2)}
    assert dict(limiter.limits()) == {"a": RateLimit(1.0, 2), "b": RateLimit(3.0)}
    with pytest.raises(TypeError):
        snapshot["c"] = RateLimit(1.0)  # type: ignore[index]


def test_a_clock_step_back_only_delays() -> None:
    limiter = RateLimiter()
    limiter.set_limit("email", RateLimit(rate=1.0, burst=1))
    assert limiter.try_acquire("email", 1000.0).allowed
    stepped_back = limiter.try_acquire("email", 990.0)
    assert stepped_back == GcraDecision(False, 1001.0, 11.0)
    assert limiter.try_acquire("email", 990.0 + stepped_back.retry_after).allowed


# ---------------------------------------------------------------------------
# Properties

limits = st.builds(
    RateLimit,
    rate=st.floats(0.01, 1000.0),
    burst=st.integers(1, 5),
)


@given(
    limit=limits,
    tat=st.floats(-1e10, 1e10),
    now=st.floats(-1e10, 1e10),
    data=st.data(),
)
def test_gcra_decision_is_sound(
    limit: RateLimit, tat: float, now: float, data: st.DataObject
) -> None:
    cost = data.draw(st.integers(1, limit.burst))
    decision = gcra(tat, now, limit, cost)
    assert decision.retry_after >= 0.0
    if decision.allowed:
        assert decision.retry_after == 0.0
        assert decision.new_tat >= max(tat, now)  # TAT never moves back
    else:
        assert decision.retry_after > 0.0
        assert decision.new_tat == tat  # a refusal changes nothing
        # Coming back after retry_after works.
        assert gcra(tat, now + decision.retry_after, limit, cost).allowed


def _slack_tokens(limit: RateLimit, times: list[float], n: int) -> float:
    # Float rounding: the conformance tolerance (at most 8 ulps) plus half an
    # ulp of rounding per TAT update, at the largest magnitude involved.
    magnitude = max(abs(t) for t in times) + limit.burst * limit.emission_interval
    return limit.rate * (n + 16) * math.ulp(magnitude)


@settings(max_examples=300, deadline=None)
@given(
    limit=limits,
    start=st.floats(0.0, 4e9),
    arrivals=st.lists(st.tuples(st.floats(0.0, 3.0), st.integers(1, 5)), max_size=80),
)
def test_no_window_gets_more_than_burst_plus_rate_times_length(
    limit: RateLimit, start: float, arrivals: list[tuple[float, int]]
) -> None:
    limiter = RateLimiter()
    limiter.set_limit("t", limit)
    now = start
    allowed: list[tuple[float, int]] = []
    for gap, cost in arrivals:
        # Gaps in units of T, so every density from bursts to idling shows up.
        now += gap * limit.emission_interval
        cost = min(cost, limit.burst)
        if limiter.try_acquire("t", now, cost).allowed:
            allowed.append((now, cost))
    times = [start, now]
    slack = _slack_tokens(limit, times, len(allowed))
    for i in range(len(allowed)):
        total = 0
        for j in range(i, len(allowed)):
            total += allowed[j][1]
            window = allowed[j][0] - allowed[i][0]
            assert total <= limit.burst + limit.rate * window + slack


@settings(max_examples=300, deadline=None)
@given(
    limit=limits,
    start=st.floats(-4e9, 4e9),
    count=st.integers(1, 200),
)
def test_steady_arrivals_at_the_rate_are_all_allowed(
    limit: RateLimit, start: float, count: int
) -> None:
    limiter = RateLimiter()
    limiter.set_limit("t", limit)
    now = start
    for _ in range(count):
        decision = limiter.try_acquire("t", now)
        assert decision.allowed, (now, decision)
        now += limit.emission_interval


@given(
    limit=limits,
    start=st.floats(0.0, 4e9),
    gaps=st.lists(st.floats(0.0, 2.0), max_size=30),
)
def test_next_allowed_at_is_honest(limit: RateLimit, start: float, gaps: list[float]) -> None:
    limiter = RateLimiter()
    limiter.set_limit("t", limit)
    now = start
    for gap in gaps:
        now += gap * limit.emission_interval
        due = limiter.next_allowed_at("t", now)
        assert due is not None and due >= now
        decision = limiter.try_acquire("t", now)
        # They agree about now, and the promised time keeps its promise.
        assert decision.allowed == (due == now)
        if not decision.allowed:
            assert limiter.try_acquire("t", due).allowed
            now = due
