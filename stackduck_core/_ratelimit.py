"""Per-job-type rate limits: the generic cell rate algorithm (GCRA).

The math
--------

A limit of ``rate`` jobs per second with a ``burst`` of ``b`` is a leaky bucket
that holds ``b`` tokens and refills one every ``T = 1 / rate`` seconds. GCRA
keeps the same bucket as one number, the *theoretical arrival time* ``tat``:
the time at which the bucket would be full again if nothing else arrived.
Its only state is that float, so a Redis Lua script can mirror
:func:`gcra` exactly (Lua numbers are doubles too) and keep the state in a
single key per job type.

For a request of ``cost`` tokens at time ``now``::

    new_tat  = max(tat, now) + cost * T
    allow_at = new_tat - b * T              # earliest time the request conforms
    allowed  = allow_at <= now + tolerance
    retry_after = 0                if allowed
                  allow_at - now   otherwise   (> 0)

and ``tat`` becomes ``new_tat`` only if the request is allowed. A type never
seen before has ``tat = now``: its bucket is full. ``now < tat`` is the normal
case, not an error: it means the bucket is partly drained. ``max(tat, now)``
forgets the credit an idle type would otherwise pile up beyond ``b``, and
``tat`` never decreases, so the limiter's notion of time only moves forward.
If the wall clock steps back by ``d`` seconds, requests simply wait up to
``d`` seconds longer; nothing breaks.

Why this bounds the rate: every allowed request pushes ``tat`` forward by
``cost * T`` from at least ``max(tat, now)``, and a request is only allowed
while ``tat - now <= b * T`` afterwards. So over any window of ``W`` seconds,
the tokens allowed are at most ``b + W * rate`` (plus the tolerance below).
And a client that arrives exactly every ``T`` seconds finds ``tat == now``
each time and is always allowed, even with ``b = 1``.

The tolerance absorbs float rounding, which otherwise refuses that exactly
periodic client: ``(now + T) - T`` need not equal ``now``. It is relative to
the magnitude of the times involved (``2**-50`` of it, i.e. 4 to 8 units in
the last place, about 1.5 microseconds for today's epoch seconds), so it only
ever forgives rounding, never a real early arrival.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from types import MappingProxyType
from typing import Final, final

import attrs

__all__ = [
    "GcraDecision",
    "RateLimit",
    "RateLimiter",
    "gcra",
    "gcra_allowance",
]

# Relative slack of the conformance test: 4 to 8 ulps of the largest time involved.
_ROUNDING: Final = 2.0**-50


def _check_rate(_instance: object, attribute: attrs.Attribute[float], value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{attribute.name} must be a number of jobs per second, got {value!r}")
    # `not (0 < value < inf)` also refuses NaN.
    if not (0 < value < math.inf):
        raise ValueError(f"{attribute.name} must be positive and finite, got {value!r}")


def _check_burst(_instance: object, attribute: attrs.Attribute[int], value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{attribute.name} must be an integer, got {value!r}")
    if value < 1:
        raise ValueError(f"{attribute.name} must be at least 1, got {value!r}")


@final
@attrs.frozen
class RateLimit:
    """A rate limit for one job type.

    Attributes:
        rate: sustained jobs per second; positive and finite.
        burst: how many jobs may go at once after a quiet period; at least 1.

    Raises:
        TypeError, ValueError: on construction, for a value out of range.
    """

    rate: float = attrs.field(validator=_check_rate)
    burst: int = attrs.field(default=1, validator=_check_burst)

    @property
    def emission_interval(self) -> float:
        """``T = 1 / rate``: seconds per token."""
        return 1.0 / self.rate


@final
@attrs.frozen
class GcraDecision:
    """The outcome of one :func:`gcra` step.

    Attributes:
        allowed: whether the request conforms to the limit.
        new_tat: the state to store: the advanced TAT if allowed, else the
            TAT passed in, unchanged.
        retry_after: 0 if allowed, else the seconds to wait (always > 0)
            before the same request would be allowed; ``now + retry_after``
            is never short of that time, even by a rounding error.
    """

    allowed: bool
    new_tat: float
    retry_after: float


def gcra(tat: float, now: float, limit: RateLimit, cost: int = 1) -> GcraDecision:
    """One step of the generic cell rate algorithm (see the module docstring).

    Args:
        tat: the stored theoretical arrival time; ``now`` for a type never seen.
        now: the current time, UTC epoch seconds.
        limit: the limit to apply.
        cost: tokens the request takes, from 1 to ``limit.burst``.

    Returns:
        The decision, with the TAT to store.

    Raises:
        ValueError: ``tat`` or ``now`` is not finite, or ``cost`` is out of
            range (a cost above the burst could never be allowed).
    """
    if not (math.isfinite(tat) and math.isfinite(now)):
        raise ValueError(f"times must be finite, got tat={tat!r}, now={now!r}")
    if not 1 <= cost <= limit.burst:
        raise ValueError(f"cost must be between 1 and the burst ({limit.burst}), got {cost!r}")
    interval = limit.emission_interval
    new_tat = max(tat, now) + cost * interval
    allow_at = new_tat - limit.burst * interval
    tolerance = max(abs(now), abs(new_tat)) * _ROUNDING
    if allow_at <= now + tolerance:
        return GcraDecision(allowed=True, new_tat=new_tat, retry_after=0.0)
    # allow_at > now here, and the difference of two distinct floats is never 0.
    retry_after = allow_at - now
    # That difference is rounded at its own magnitude, which can exceed the
    # tolerance at allow_at (e.g. when `now` is far below zero). Round it up so
    # that a caller who comes back at exactly `now + retry_after` is allowed.
    while now + retry_after < allow_at:
        retry_after = math.nextafter(retry_after, math.inf)
    return GcraDecision(allowed=False, new_tat=tat, retry_after=retry_after)


def gcra_allowance(tat: float, now: float, limit: RateLimit) -> int:
    """How many tokens could be taken at once at ``now``: 0 to ``limit.burst``.

    The largest ``k`` for which ``gcra(tat, now, limit, k)`` is allowed (0 if
    even one token is not). Conformance is monotonic in ``k``, so the answer
    is unique: an estimate from the bucket's level, one token short so that
    rounding can never make it too high, then raised while the exact test of
    :func:`gcra` allows one more (one to three steps).
    The Redis tier's claim script mirrors this function operation for
    operation (doubles both sides), so both agree to the last bit.

    Raises:
        ValueError: ``tat`` or ``now`` is not finite.
    """
    if not (math.isfinite(tat) and math.isfinite(now)):
        raise ValueError(f"times must be finite, got tat={tat!r}, now={now!r}")
    interval = limit.emission_interval
    level = (now - max(tat, now)) / interval  # <= 0: tokens owed
    k = min(max(math.floor(level) + limit.burst - 1, 0), limit.burst)
    while k < limit.burst and _conforms(tat, now, interval, limit.burst, k + 1):
        k += 1
    return k


def _conforms(tat: float, now: float, interval: float, burst: int, cost: int) -> bool:
    """:func:`gcra`'s test, step for step."""
    new_tat = max(tat, now) + cost * interval
    allow_at = new_tat - burst * interval
    return allow_at <= now + max(abs(now), abs(new_tat)) * _ROUNDING


class RateLimiter:
    """Rate limits keyed by job type, with their GCRA state.

    Types without a limit are always allowed. Time is passed in; it need not
    be monotonic (see the module docstring).
    """

    def __init__(self) -> None:
        self._limits: dict[str, RateLimit] = {}
        self._tats: dict[str, float] = {}

    def set_limit(self, job_type: str, limit: RateLimit | None) -> None:
        """Set, change or (with None) remove the limit of a job type.

        Changing a limit keeps the type's TAT, so re-configuring cannot be
        used to get a fresh burst; removing it forgets the TAT.

        Args:
            job_type: the job type.
            limit: the new limit, or None for no limit.
        """
        if limit is None:
            self._limits.pop(job_type, None)
            self._tats.pop(job_type, None)
        else:
            self._limits[job_type] = limit

    def try_acquire(self, job_type: str, now: float, cost: int = 1) -> GcraDecision:
        """Take ``cost`` tokens for a job type if its limit allows it now.

        Args:
            job_type: the job type.
            now: the current time, UTC epoch seconds.
            cost: tokens to take, from 1 to the type's burst.

        Returns:
            The decision. For a type without a limit: allowed, with
            ``new_tat = now`` (there is no state).

        Raises:
            ValueError: as :func:`gcra`; nothing changes.
        """
        limit = self._limits.get(job_type)
        if limit is None:
            if cost < 1:
                raise ValueError(f"cost must be at least 1, got {cost!r}")
            return GcraDecision(allowed=True, new_tat=now, retry_after=0.0)
        decision = gcra(self._tats.get(job_type, now), now, limit, cost)
        self._tats[job_type] = decision.new_tat
        return decision

    def next_allowed_at(self, job_type: str, now: float) -> float | None:
        """When a job of this type (cost 1) would next be allowed.

        Args:
            job_type: the job type.
            now: the current time, UTC epoch seconds.

        Returns:
            None if the type has no limit; otherwise a time ``>= now``, equal
            to ``now`` if a job may go at once. Nothing is taken.
        """
        limit = self._limits.get(job_type)
        if limit is None:
            return None
        return now + gcra(self._tats.get(job_type, now), now, limit).retry_after

    def limits(self) -> Mapping[str, RateLimit]:
        """A read-only snapshot of the configured limits, by job type."""
        return MappingProxyType(dict(self._limits))
