"""Rate and concurrency limits per job type: the rule, the settings, and dispatch."""

from __future__ import annotations

import math

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from stackduck_core import (
    MAX_BURST,
    MAX_RUNNING,
    Allowance,
    Limiter,
    QueueCore,
    RateLimit,
    Rejected,
    RejectReason,
    TypeLimit,
    gcra,
    gcra_allowance,
    limit_from_wire,
    parse_limits,
)

from .harness import T0, Harness, counter_ids

# -- gcra_allowance ----------------------------------------------------------------------

times = st.floats(min_value=-1e9, max_value=4e9, allow_nan=False)
rates = st.floats(min_value=1e-3, max_value=1e5)


@given(tat=times, now=times, rate=rates, burst=st.integers(1, 50))
def test_allowance_is_the_largest_conforming_cost(
    tat: float, now: float, rate: float, burst: int
) -> None:
    limit = RateLimit(rate, burst)
    k = gcra_allowance(tat, now, limit)
    assert 0 <= k <= burst
    if k:
        assert gcra(tat, now, limit, k).allowed
    if k < burst:
        assert not gcra(tat, now, limit, k + 1).allowed


@pytest.mark.parametrize(
    ("tat", "now", "rate", "burst", "expected"),
    [
        (0.0, 0.0, 1.0, 5, 5),  # a fresh bucket is full
        (3.0, 0.0, 1.0, 5, 2),  # three tokens owed
        (5.0, 0.0, 1.0, 5, 0),  # empty
        (6.0, 0.0, 1.0, 5, 0),  # more than empty (cannot happen, still 0)
        (0.0, 100.0, 1.0, 5, 5),  # idle: no more than the burst
        (10.5, 10.0, 2.0, 3, 2),
        # the bucket's level rounds to just below a whole token (the estimate
        # says 12) while the exact test of gcra() forgives the rounding: 13
        (1_000_000_000.0000001, 1_000_000_000.0, 3.0, 13, 13),
    ],
)
def test_allowance_golden(tat: float, now: float, rate: float, burst: int, expected: int) -> None:
    assert gcra_allowance(tat, now, RateLimit(rate, burst)) == expected


def test_allowance_refuses_infinite_times() -> None:
    with pytest.raises(ValueError, match="finite"):
        gcra_allowance(math.inf, 0.0, RateLimit(1.0))


# -- TypeLimit ------------------------------------------------------------------------------


def test_type_limit_needs_a_limit_and_checks_max_running() -> None:
    with pytest.raises(ValueError, match="needs a rate"):
        TypeLimit()
    with pytest.raises(ValueError, match="between 1"):
        TypeLimit(max_running=0)
    with pytest.raises(TypeError, match="integer"):
        TypeLimit(max_running=True)
    with pytest.raises(TypeError, match="integer"):
        TypeLimit(max_running=2.0)  # type: ignore[arg-type]
    assert TypeLimit(max_running=MAX_RUNNING).max_running == MAX_RUNNING


def test_decide_concurrency() -> None:
    limit = TypeLimit(max_running=3)
    assert limit.decide(5, tat=None, now=T0, running=1) == Allowance(2, "running")
    assert limit.decide(2, tat=None, now=T0, running=1) == Allowance(2)
    assert limit.decide(1, tat=None, now=T0, running=4) == Allowance(0, "running")
    assert limit.decide(-1, tat=None, now=T0, running=0) == Allowance(0)


def test_decide_rate_and_retry_time() -> None:
    limit = TypeLimit(rate=RateLimit(2.0, 3))  # T = 0.5
    assert limit.decide(2, tat=None, now=10.0, running=0) == Allowance(2)
    # 4 wanted, 3 tokens: the 4th may go once one more token is back
    assert limit.decide(4, tat=None, now=10.0, running=0) == Allowance(3, "rate", 10.5)
    # empty bucket (tat = now + b*T): next token at now + T
    assert limit.decide(1, tat=11.5, now=10.0, running=0) == Allowance(0, "rate", 10.5)


def test_decide_takes_the_tighter_limit() -> None:
    limit = TypeLimit(rate=RateLimit(1.0, 5), max_running=2)
    assert limit.decide(4, tat=None, now=0.0, running=0) == Allowance(2, "running")
    # the rate allows 1, the cap 2: the rate holds
    assert limit.decide(4, tat=4.0, now=0.0, running=0) == Allowance(1, "rate", 1.0)


def test_taken() -> None:
    limit = TypeLimit(rate=RateLimit(2.0, 3))
    assert limit.taken(2, tat=None, now=10.0) == 11.0
    assert limit.taken(0, tat=None, now=10.0) == 10.0
    assert limit.taken(0, tat=12.0, now=10.0) == 12.0
    with pytest.raises(ValueError, match="exceed"):
        limit.taken(2, tat=11.0, now=10.0)
    with pytest.raises(ValueError, match="between 1 and the burst"):
        limit.taken(4, tat=None, now=10.0)
    assert TypeLimit(max_running=1).taken(3, tat=None, now=10.0) is None


def test_describe() -> None:
    assert TypeLimit(rate=RateLimit(2.5, 4)).describe() == "rate=2.5/s burst=4"
    assert TypeLimit(max_running=2).describe() == "max_running=2"
    both = TypeLimit(rate=RateLimit(1.0), max_running=2)
    assert both.describe() == "rate=1/s burst=1 max_running=2"


# -- from the wire and from the setting ------------------------------------------------------


def test_limit_from_wire() -> None:
    assert limit_from_wire("email", 0.0, 0, 0) is None
    assert limit_from_wire("email", 5.0, 0, 0) == TypeLimit(rate=RateLimit(5.0, 1))
    assert limit_from_wire("email", 5.0, 10, 3) == TypeLimit(rate=RateLimit(5.0, 10), max_running=3)
    assert limit_from_wire("email", 0.0, 0, 3) == TypeLimit(max_running=3)


@pytest.mark.parametrize(
    ("job_type", "rate", "burst", "max_running", "field", "text"),
    [
        ("", 1.0, 0, 0, "job_type", "required"),
        ("bad type", 1.0, 0, 0, "job_type", "may contain only"),
        ("t", -1.0, 0, 0, "rate", "rate must be"),
        ("t", math.nan, 0, 0, "rate", "rate must be"),
        ("t", math.inf, 0, 0, "rate", "rate must be"),
        ("t", 2e6, 0, 0, "rate", "rate must be"),
        ("t", 1e-310, 0, 0, "rate", "rate must be"),  # the interval would be infinite
        ("t", 9e-7, 0, 0, "rate", "rate must be"),
        ("t", 1.0, -1, 0, "burst", "burst must be"),
        ("t", 1.0, MAX_BURST + 1, 0, "burst", "burst must be"),
        ("t", 0.0, 5, 0, "burst", "needs a rate"),
        ("t", 0.0, 0, -2, "max_running", "max_running must be"),
        ("t", 0.0, 0, MAX_RUNNING + 1, "max_running", "max_running must be"),
    ],
)
def test_limit_from_wire_rejects(
    job_type: str, rate: float, burst: int, max_running: int, field: str, text: str
) -> None:
    result = limit_from_wire(job_type, rate, burst, max_running)
    assert isinstance(result, Rejected)
    assert result.reason is RejectReason.INVALID_ARGUMENT
    assert result.field == field
    assert text in result.message


def test_parse_limits() -> None:
    assert parse_limits("") == {}
    assert parse_limits(" ; ") == {}
    parsed = parse_limits("email:rate=50,burst=100; reports:max_running=2;a.b:c:rate=0.5")
    assert parsed == {
        "email": TypeLimit(rate=RateLimit(50.0, 100)),
        "reports": TypeLimit(max_running=2),
        "a.b:c": TypeLimit(rate=RateLimit(0.5, 1)),
    }


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("email", "expected TYPE:key=value"),
        (":rate=1", "expected TYPE:key=value"),
        ("email:speed=1", "is not rate=N"),
        ("email:rate", "is not rate=N"),
        ("email:rate=1,rate=2", "rate given twice"),
        ("email:rate=fast", "could not convert"),
        ("email:max_running=1.5", "invalid literal"),
        ("email:rate=-1", "rate must be"),
        ("email:rate=0", "sets no limit"),
        ("email:rate=1;email:max_running=2", "given twice"),
        ("bad type:rate=1", "may contain only"),
    ],
)
def test_parse_limits_errors(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_limits(text)


# -- Limiter ------------------------------------------------------------------------------------


def test_limiter_counts_throttles_and_takes_tokens() -> None:
    limiter = Limiter()
    assert limiter.check("t", 3, now=0.0, running=0) == Allowance(3)
    assert limiter.check("t", -1, now=0.0, running=0) == Allowance(0)
    limiter.take("t", 3, now=0.0)  # no limit: nothing to record
    limiter.set("t", TypeLimit(rate=RateLimit(1.0, 2), max_running=5))
    assert limiter.get("t") == TypeLimit(rate=RateLimit(1.0, 2), max_running=5)
    assert dict(limiter.limits()) == {"t": limiter.get("t")}
    assert limiter.check("t", 3, now=0.0, running=0) == Allowance(2, "rate", 1.0)
    limiter.take("t", 2, now=0.0)
    limiter.take("t", 0, now=0.0)
    assert limiter.check("t", 1, now=0.5, running=0) == Allowance(0, "rate", 1.0)
    assert limiter.check("t", 1, now=0.0, running=5) == Allowance(0, "running")
    assert limiter.throttled == {("t", "rate"): 2, ("t", "running"): 1}
    with pytest.raises(ValueError, match="exceed"):
        limiter.take("t", 1, now=0.5)
    # changing only max_running keeps the bucket's state: no fresh burst
    limiter.set("t", TypeLimit(rate=RateLimit(1.0, 2)))
    assert limiter.check("t", 1, now=0.5, running=0).granted == 0
    # a new rate starts afresh (the old state is in the old rate's units)
    limiter.set("t", TypeLimit(rate=RateLimit(100.0, 2)))
    assert limiter.check("t", 2, now=0.5, running=0).granted == 2
    limiter.take("t", 2, now=0.5)
    # a concurrency-only limit forgets the rate state
    limiter.set("t", TypeLimit(max_running=1))
    limiter.set("t", TypeLimit(rate=RateLimit(1.0, 2)))
    assert limiter.check("t", 2, now=0.5, running=0).granted == 2
    limiter.set("t", None)
    assert limiter.get("t") is None
    assert limiter.check("t", 9, now=0.5, running=0) == Allowance(9)


# -- in the queue -----------------------------------------------------------------------------


def limited_harness(limit: TypeLimit) -> tuple[Harness, Limiter]:
    h = Harness()
    limiter = Limiter()
    limiter.set("t", limit)
    h.core = QueueCore(new_id=counter_ids("lease"), limiter=limiter)
    return h, limiter


def test_dispatch_respects_max_running() -> None:
    h, limiter = limited_harness(TypeLimit(max_running=2))
    h.core.attach(1, worker_id="w1", job_types=["t"], prefetch=5)
    h.core.attach(2, worker_id="w2", job_types=["t"], prefetch=5)
    h.enqueue_many(5)
    first = h.core.dispatch(now=h.now)
    assert len(first) == 2
    assert h.core.running_count("t") == 2
    assert h.core.dispatch(now=h.now) == []
    assert h.core.next_deadline() is not None  # the leases; no rate wait
    h.core.complete(first[0].job.id, lease_id=first[0].job.lease_id, now=h.now)
    assert len(h.core.dispatch(now=h.now)) == 1
    assert limiter.throttled[("t", "running")] == 3


def test_dispatch_respects_the_rate_and_wakes_when_it_allows() -> None:
    h, _ = limited_harness(TypeLimit(rate=RateLimit(10.0, 2)))  # T = 0.1
    h.core.attach(1, worker_id="w", job_types=["t", "u"], prefetch=50)
    h.enqueue_many(6)
    h.enqueue_many(3, "u")  # not limited: all go at once
    first = h.core.dispatch(now=h.now)
    assert sorted(d.job.job_type for d in first) == ["t", "t", "u", "u", "u"]
    wake = h.core.next_deadline()
    assert wake == pytest.approx(h.now + 0.1)
    assert h.core.dispatch(now=h.now) == []
    h.clock.advance(0.1)
    h.core.tick(now=h.now)
    assert h.core.next_deadline() == pytest.approx(h.now + 59.9)  # the wake-up came
    assert len(h.core.dispatch(now=h.now)) == 1
    h.clock.advance(1.0)
    assert len(h.core.dispatch(now=h.now)) == 2  # the burst, again
    h.clock.advance(1.0)
    assert len(h.core.dispatch(now=h.now)) == 1  # the last one
    assert h.core.next_deadline() == pytest.approx(h.now + 60.0)  # leases only


def test_unary_claim_respects_limits() -> None:
    h, _ = limited_harness(TypeLimit(rate=RateLimit(1.0, 1), max_running=5))
    assert h.core.claim("t", now=h.now, worker_id="w") is None  # nothing ready
    h.enqueue_many(2)
    assert h.core.claim("t", now=h.now, worker_id="w") is not None
    assert h.core.claim("t", now=h.now, worker_id="w") is None  # the rate
    h.clock.advance(1.0)
    assert h.core.claim("t", now=h.now, worker_id="w") is not None


# -- retention of dead letters ------------------------------------------------------------


def test_dead_before_lists_the_oldest_deaths_first() -> None:
    h = Harness()
    first = h.dead_letter(job_id="d1")
    h.clock.advance(10)
    second = h.dead_letter(job_id="d2")
    h.clock.advance(10)
    h.dead_letter(job_id="d3")
    assert first.completed_at is not None and second.completed_at is not None
    assert h.core.dead_before(h.now + 1, 2) == ["d1", "d2"]
    assert h.core.dead_before(second.completed_at, 10) == ["d1"]
    assert h.core.dead_before(first.completed_at, 10) == []
    h.core.requeue("d1", now=h.now)  # no longer dead: skipped
    assert h.core.dead_before(h.now + 1, 10) == ["d2", "d3"]
    assert h.core.dead_before(h.now + 1, 0) == []


def test_dead_before_does_not_stop_at_a_young_job() -> None:
    """After a restart dead jobs come back in the store's order, not in death order."""
    h = Harness()
    young = h.dead_letter(job_id="young")
    old = attrs.evolve(young, id="old", completed_at=young.completed_at - 100)  # type: ignore[operator]
    h.core.restore(old, now=h.now)
    assert h.core.dead_before(h.now - 50, 10) == ["old"]
