"""Retry backoff: ``min(delay * 2 ** retry_count, cap)`` (ARCHITECTURE §1.5)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stackduck_core import BACKOFF_CAP, retry_delay

# (delay, retry_count, cap) -> seconds
GOLDEN: list[tuple[int, int, int, int]] = [
    # the default base: 30, 60, ..., 1920, then the one-hour cap
    (30, 0, 3600, 30),
    (30, 1, 3600, 60),
    (30, 2, 3600, 120),
    (30, 3, 3600, 240),
    (30, 4, 3600, 480),
    (30, 5, 3600, 960),
    (30, 6, 3600, 1920),
    (30, 7, 3600, 3600),  # 3840 capped
    (30, 8, 3600, 3600),
    (30, 12, 3600, 3600),
    (30, 13, 3600, 3600),
    (30, 64, 3600, 3600),
    (30, 10**6, 3600, 3600),
    # no backoff at all
    (0, 0, 3600, 0),
    (0, 5, 3600, 0),
    (0, 10**6, 3600, 0),
    (-5, 3, 3600, 0),  # defensive: a negative base means no backoff, never < 0
    # base 1: the slowest climb to the cap
    (1, 0, 3600, 1),
    (1, 1, 3600, 2),
    (1, 10, 3600, 1024),
    (1, 11, 3600, 2048),
    (1, 12, 3600, 3600),  # 4096 capped
    (1, 10**6, 3600, 3600),
    # landing exactly on the cap, and one step either side
    (225, 3, 3600, 1800),
    (225, 4, 3600, 3600),  # 225 * 16 == 3600
    (1800, 1, 3600, 3600),
    (1799, 1, 3600, 3598),
    (1801, 1, 3600, 3600),
    (3600, 0, 3600, 3600),
    (3601, 0, 3600, 3600),
    # other caps
    (3, 0, 10, 3),
    (3, 1, 10, 6),
    (3, 2, 10, 10),
    (5, 0, 0, 0),
    (1, 69, 2**70, 2**69),
    (1, 70, 2**70, 2**70),
    (1, 10**6, 2**70, 2**70),
    (7, 100, 10**40, 7 * 2**100),
]


@pytest.mark.parametrize(
    ("delay", "retry_count", "cap", "expected"),
    GOLDEN,
    ids=[f"{d}-{n}-{c}" for d, n, c, _ in GOLDEN],
)
def test_golden(delay: int, retry_count: int, cap: int, expected: int) -> None:
    assert retry_delay(delay, retry_count, cap) == expected


def test_default_cap_is_one_hour() -> None:
    assert BACKOFF_CAP == 3600
    assert retry_delay(30, 7) == 3600
    assert retry_delay(30, 6) == 1920


def test_result_is_an_int() -> None:
    assert type(retry_delay(30, 3)) is int
    assert type(retry_delay(0, 3)) is int


delays = st.integers(0, 10**6)
counts = st.integers(0, 10**7)
caps = st.integers(0, 2**80)


@settings(max_examples=150, deadline=None)
@given(delays, counts, caps)
def test_within_zero_and_cap(delay: int, retry_count: int, cap: int) -> None:
    assert 0 <= retry_delay(delay, retry_count, cap) <= cap


@settings(max_examples=150, deadline=None)
@given(delays, counts, counts, caps)
def test_monotone_in_retry_count(delay: int, n1: int, n2: int, cap: int) -> None:
    low, high = sorted((n1, n2))
    assert retry_delay(delay, low, cap) <= retry_delay(delay, high, cap)


@settings(max_examples=150, deadline=None)
@given(delays, delays, counts, caps)
def test_monotone_in_delay(d1: int, d2: int, retry_count: int, cap: int) -> None:
    low, high = sorted((d1, d2))
    assert retry_delay(low, retry_count, cap) <= retry_delay(high, retry_count, cap)


@settings(max_examples=150, deadline=None)
@given(st.integers(0, 10**9), st.integers(0, 63), caps)
def test_matches_naive_formula(delay: int, retry_count: int, cap: int) -> None:
    assert retry_delay(delay, retry_count, cap) == min(delay * 2**retry_count, cap)


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 3600), st.integers(0, 3000), st.integers(0, 2**40))
def test_matches_naive_formula_for_big_counts(delay: int, retry_count: int, cap: int) -> None:
    assert retry_delay(delay, retry_count, cap) == min(delay * 2**retry_count, cap)
