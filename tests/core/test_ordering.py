"""Delivery order: the (priority, seq) key, its exact Redis score, the seq clock."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stackduck_core import (
    EPOCH,
    MAX_SEQ,
    SEQ_BITS,
    SequenceClock,
    StackduckError,
    decode_score,
    order_key,
    score,
)

priorities = st.integers(1, 3)
seqs = st.integers(0, MAX_SEQ)
# the domain's edges are where encodings break: weight them explicitly
edge_seqs = st.sampled_from([0, 1, 2, MAX_SEQ - 1, MAX_SEQ, 2**52 // 4]) | seqs
keys = st.tuples(priorities, edge_seqs)


def test_constants() -> None:
    assert EPOCH == 1577836800  # 2020-01-01T00:00:00Z
    assert SEQ_BITS == 51
    assert MAX_SEQ == 2**51 - 1
    assert 3 << SEQ_BITS <= 2**53  # every score is an exact double


@pytest.mark.parametrize(
    ("priority", "seq", "expected"),
    [
        (1, 0, 0.0),
        (1, 1, 1.0),
        (1, MAX_SEQ, float(2**51 - 1)),
        (2, 0, float(2**51)),
        (2, 12345, float(2**51 + 12345)),
        (3, 0, float(2**52)),
        (3, MAX_SEQ, float(3 * 2**51 - 1)),
    ],
)
def test_score_golden(priority: int, seq: int, expected: float) -> None:
    assert score(priority, seq) == expected
    assert decode_score(expected) == (priority, seq)


def test_order_key() -> None:
    assert order_key(2, 7) == (2, 7)
    assert order_key(1, MAX_SEQ) < order_key(2, 0)


@settings(max_examples=150, deadline=None)
@given(keys)
def test_score_is_exact(key: tuple[int, int]) -> None:
    priority, seq = key
    value = score(priority, seq)
    assert value == float(int(value))
    assert int(value) == (priority - 1) * 2**SEQ_BITS + seq  # no rounding happened
    assert 0 <= value < 3 * 2**SEQ_BITS


@settings(max_examples=150, deadline=None)
@given(keys, keys)
def test_score_is_injective_and_order_preserving(a: tuple[int, int], b: tuple[int, int]) -> None:
    sa, sb = score(*a), score(*b)
    ka, kb = order_key(*a), order_key(*b)
    assert (sa == sb) == (a == b)
    assert (sa < sb) == (ka < kb)
    assert (sa > sb) == (ka > kb)


@settings(max_examples=150, deadline=None)
@given(keys)
def test_decode_inverts_score(key: tuple[int, int]) -> None:
    assert decode_score(score(*key)) == key


@settings(max_examples=150, deadline=None)
@given(st.floats(allow_nan=True, allow_infinity=True) | st.integers(-(2**60), 2**60).map(float))
def test_decode_accepts_exactly_the_scores(value: float) -> None:
    """Every float is either a score (and round-trips) or a ValueError."""
    try:
        priority, seq = decode_score(value)
    except ValueError:
        assert not (0 <= value < 3 * 2**SEQ_BITS and value == int(value))
    else:
        assert score(priority, seq) == value


@pytest.mark.parametrize(
    ("priority", "seq"),
    [(0, 0), (4, 0), (-1, 5), (1, -1), (2, MAX_SEQ + 1), (3, 2**53)],
)
def test_score_rejects_out_of_range(priority: int, seq: int) -> None:
    with pytest.raises(ValueError):
        score(priority, seq)


@pytest.mark.parametrize(
    "value",
    [
        -1.0,
        -0.5,
        0.5,
        float(2**51) + 0.5,
        float(3 * 2**51),  # priority 4 does not exist
        float(2**53),
        1e300,
        math.inf,
        -math.inf,
        math.nan,
    ],
)
def test_decode_rejects_non_scores(value: float) -> None:
    with pytest.raises(ValueError, match="not a Stackduck score"):
        decode_score(value)


# -- SequenceClock -----------------------------------------------------------


@pytest.mark.parametrize(
    ("ready_at", "seq"),
    [
        (EPOCH + 1.0, 1_000_000),
        (EPOCH + 0.5, 500_000),
        (EPOCH + 0.125, 125_000),
        (EPOCH + 86_400.0, 86_400_000_000),
        (1_769_860_800.0, 192_024_000_000_000),  # 2026-01-31T12:00:00Z
    ],
)
def test_seq_is_microseconds_since_epoch(ready_at: float, seq: int) -> None:
    assert SequenceClock().next(ready_at) == seq


def test_seq_is_strictly_increasing_when_time_stalls_or_steps_back() -> None:
    clock = SequenceClock()
    t = EPOCH + 10.0
    assert clock.next(t) == 10_000_000
    assert clock.next(t) == 10_000_001  # same microsecond
    assert clock.next(t - 5.0) == 10_000_002  # wall clock stepped back
    assert clock.next(EPOCH - 100.0) == 10_000_003  # before the epoch
    assert clock.next(t + 1.0) == 11_000_000  # time moved on: follow it again
    assert clock.last == 11_000_000


def test_initial_last_and_observe() -> None:
    clock = SequenceClock(last=41)
    assert clock.last == 41
    assert clock.next(EPOCH) == 42
    clock.observe(1_000)
    assert clock.last == 1_000
    clock.observe(5)  # never goes back
    assert clock.last == 1_000
    assert clock.next(EPOCH) == 1_001
    assert SequenceClock().last == 0


def test_overflow_raises_without_changing_state() -> None:
    clock = SequenceClock(last=MAX_SEQ - 1)
    assert clock.next(EPOCH) == MAX_SEQ  # the last seq of the budget is usable
    with pytest.raises(StackduckError, match="51-bit"):
        clock.next(EPOCH)
    assert clock.last == MAX_SEQ
    with pytest.raises(StackduckError):
        SequenceClock().next(EPOCH + (MAX_SEQ + 1) / 1_000_000 + 1.0)  # the year 2091


@pytest.mark.parametrize("ready_at", [math.inf, -math.inf, math.nan, 1e300])
def test_impossible_ready_times_raise_stackduck_error(ready_at: float) -> None:
    clock = SequenceClock(last=7)
    with pytest.raises(StackduckError):
        clock.next(ready_at)
    assert clock.last == 7


ready_times = st.floats(EPOCH - 1e6, EPOCH + 2e9)


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 2**40), st.lists(ready_times, max_size=40))
def test_clock_is_strictly_increasing(start: int, times: list[float]) -> None:
    clock = SequenceClock(last=start)
    issued = [clock.next(t) for t in times]
    assert all(a < b for a, b in zip([start, *issued], issued, strict=False))
    assert clock.last == (issued[-1] if issued else start)
    for seq in issued:
        assert score(1, seq) >= 0  # every issued seq fits the score budget


@settings(max_examples=200, deadline=None)
@given(st.lists(ready_times, min_size=1, max_size=40))
def test_clock_follows_ready_time_when_it_moves_forward(times: list[float]) -> None:
    clock = SequenceClock()
    for t in times:
        before = clock.last
        seq = clock.next(t)
        micros = (Fraction(t) - EPOCH) * 1_000_000
        if micros >= before + 2:
            # whole microseconds since EPOCH (within float rounding of t - EPOCH)
            assert abs(seq - micros) < 1
        else:
            assert seq == before + 1


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 2**50), st.integers(0, 2**50), ready_times)
def test_observe_then_next(last: int, seen: int, t: float) -> None:
    clock = SequenceClock(last=last)
    clock.observe(seen)
    assert clock.last == max(last, seen)
    assert clock.next(t) > max(last, seen)
