"""Retention ages: pass interval and cutoffs."""

from __future__ import annotations

import math

import pytest

from stackduck_core import Retention


@pytest.mark.parametrize(
    ("completed", "dead", "interval"),
    [
        (86_400, 604_800, 60.0),  # the defaults: a pass a minute
        (120, 0, 30.0),  # a quarter of the shorter age
        (0, 2, 1.0),  # never more often than once a second
        (0, 0, None),  # nothing pruned: no passes
    ],
)
def test_interval(completed: float, dead: float, interval: float | None) -> None:
    assert Retention(completed, dead).interval == interval


def test_cutoffs() -> None:
    assert Retention(100, 0).cutoffs(1_000.0) == (900.0, None)
    assert Retention(0, 50).cutoffs(1_000.0) == (None, 950.0)


@pytest.mark.parametrize("bad", [-1, math.inf, math.nan, "1"])
def test_bad_ages(bad: object) -> None:
    with pytest.raises(ValueError, match="keep forever"):
        Retention(bad, 0)  # type: ignore[arg-type]
