"""Retention: how long finished and dead-lettered jobs stay in the record store.

Completed and cancelled jobs are deleted ``completed`` seconds after they
ended, dead-lettered ones ``dead`` seconds after they died; 0 keeps them
forever. Waiting and running jobs are never pruned. A runtime prunes in
passes, every :attr:`Retention.interval` seconds: a quarter of the shorter
retention, between 1 s and a minute, so a row outlives its retention by at
most that long and a busy store is not asked more often than that.
"""

from __future__ import annotations

import math
from typing import Final, final

import attrs

__all__ = ["Retention"]

#: Bounds of the time between two retention passes (seconds).
MIN_INTERVAL: Final = 1.0
MAX_INTERVAL: Final = 60.0


def _check_age(_instance: object, attribute: attrs.Attribute[float], value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
        raise ValueError(f"{attribute.name} must be 0 (keep forever) or seconds, got {value!r}")


@final
@attrs.frozen
class Retention:
    """Retention ages in seconds (0: keep forever).

    Raises:
        ValueError: on construction, for a negative or non-finite age.
    """

    completed: float = attrs.field(validator=_check_age)
    dead: float = attrs.field(validator=_check_age)

    @property
    def interval(self) -> float | None:
        """Seconds between passes, or ``None`` when nothing is ever pruned."""
        ages = [age for age in (self.completed, self.dead) if age]
        if not ages:
            return None
        return min(max(min(ages) / 4, MIN_INTERVAL), MAX_INTERVAL)

    def cutoffs(self, now: float) -> tuple[float | None, float | None]:
        """``(finished_before, dead_before)`` at ``now``: rows that ended (or died)
        before these times go; ``None`` where that kind is kept forever."""
        return (
            now - self.completed if self.completed else None,
            now - self.dead if self.dead else None,
        )
