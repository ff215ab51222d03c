"""Per-job-type limits: a rate (jobs per second with a burst) and a concurrency cap.

A :class:`TypeLimit` holds jobs back *at dispatch*: they wait in the queue,
they are never failed. Two limits, either or both:

rate
    at most ``rate`` jobs of the type start per second, with up to ``burst``
    at once after a quiet period (GCRA, :mod:`._ratelimit`);
max_running
    at most ``max_running`` jobs of the type are running at any moment.

:meth:`TypeLimit.decide` is the whole rule, as a pure function of the
limit's state (the rate's TAT and the running count) so that every place a
job can start applies the same one: the single-server queue
(:class:`Limiter`, used by :class:`~stackduck_core.QueueCore`), and the shared
queue tiers of a cluster, which keep the state where every instance sees it
(the memory tier in its own dict, PostgreSQL in a row locked for the claim,
Redis in a key its claim script updates -- the script mirrors
:func:`~stackduck_core.gcra_allowance` operation for operation).

Limits come from the wire (proto3: 0 means "no such limit", see
:func:`limit_from_wire`) or from the ``STACKDUCK_LIMITS`` setting
(:func:`parse_limits`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from types import MappingProxyType
from typing import Final, Literal, final

import attrs

from ._job import Limits, Rejected, RejectReason, validate_job_type
from ._ratelimit import RateLimit, gcra, gcra_allowance

__all__ = [
    "MAX_BURST",
    "MAX_RATE",
    "MIN_RATE",
    "MAX_RUNNING",
    "Allowance",
    "Limiter",
    "TypeLimit",
    "limit_from_wire",
    "parse_limits",
]

#: Bounds of the settings (far beyond any real use; they keep the numbers sane).
MAX_RATE: Final = 1_000_000.0
#: One job per 11.6 days: slower rates would put the next start at a time no
#: clock can hold (a subnormal rate makes the interval infinite).
MIN_RATE: Final = 1e-6
MAX_BURST: Final = 1_000_000
MAX_RUNNING: Final = 1_000_000

Held = Literal["rate", "running"]


def _check_running(
    _instance: object, attribute: attrs.Attribute[int | None], value: int | None
) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{attribute.name} must be an integer, got {value!r}")
    if not 1 <= value <= MAX_RUNNING:
        raise ValueError(f"{attribute.name} must be between 1 and {MAX_RUNNING}, got {value!r}")


@final
@attrs.frozen
class Allowance:
    """What a limit lets start now.

    Attributes:
        granted: how many of the jobs asked for may start now.
        held: which limit held back the rest (``None``: nothing was held).
            When both would, the one that allows fewer.
        retry_at: when the rate limit allows the next job, if the rate held
            jobs back (``None`` otherwise: a concurrency limit frees up when
            a running job ends, not at a time).
    """

    granted: int
    held: Held | None = None
    retry_at: float | None = None


@final
@attrs.frozen(kw_only=True)
class TypeLimit:
    """The limits of one job type (at least one of them is set).

    Raises:
        TypeError, ValueError: on construction, for a value out of range or
            when neither limit is given.
    """

    rate: RateLimit | None = None
    max_running: int | None = attrs.field(default=None, validator=_check_running)

    def __attrs_post_init__(self) -> None:
        if self.rate is None and self.max_running is None:
            raise ValueError("a limit needs a rate, a max_running, or both")

    def decide(self, want: int, *, tat: float | None, now: float, running: int) -> Allowance:
        """How many of ``want`` jobs may start at ``now``.

        Args:
            want: jobs that could start (ready, with a worker to take them).
            tat: the rate's stored TAT, or None if the type has none yet.
            now: the current time, epoch seconds.
            running: jobs of the type running now (for ``max_running``).

        Nothing is taken: after starting ``n <= granted`` jobs the caller
        stores :meth:`taken`'s TAT.
        """
        granted = max(want, 0)
        held: Held | None = None
        retry_at: float | None = None
        if self.max_running is not None:
            room = max(self.max_running - running, 0)
            if room < granted:
                granted, held = room, "running"
        if self.rate is not None:
            base = now if tat is None else tat
            tokens = gcra_allowance(base, now, self.rate)
            if tokens < granted:
                granted, held = tokens, "rate"
                after = gcra(base, now, self.rate, tokens).new_tat if tokens else base
                retry_at = now + gcra(after, now, self.rate, 1).retry_after
        return Allowance(granted, held, retry_at)

    def taken(self, n: int, *, tat: float | None, now: float) -> float | None:
        """The rate's TAT after ``n`` jobs started at ``now`` (None without a rate).

        Raises:
            ValueError: ``n`` is more than the rate allows at ``now``.
        """
        if self.rate is None:
            return tat
        base = now if tat is None else tat
        if n <= 0:
            return base
        decision = gcra(base, now, self.rate, n)
        if not decision.allowed:
            raise ValueError(f"{n} jobs exceed the rate limit at {now!r}")
        return decision.new_tat

    def describe(self) -> str:
        """``rate=5/s burst=10 max_running=3``-style text for logs and the CLI."""
        parts = []
        if self.rate is not None:
            parts.append(f"rate={self.rate.rate:g}/s burst={self.rate.burst}")
        if self.max_running is not None:
            parts.append(f"max_running={self.max_running}")
        return " ".join(parts)


def limit_from_wire(
    job_type: str, rate: float, burst: int, max_running: int, limits: Limits | None = None
) -> TypeLimit | None | Rejected:
    """A limit as the API carries it: 0 means "no such limit".

    ``rate`` 0 and ``max_running`` 0 (whatever the burst) clear the type's
    limits (``None``). A burst needs a rate; burst 0 with a rate means 1.

    Returns:
        The limit, ``None`` to clear, or a rejection naming the bad field.
    """
    problem = validate_job_type(job_type, limits or Limits())
    if problem is not None:
        return problem
    if not (math.isfinite(rate) and (rate == 0 or MIN_RATE <= rate <= MAX_RATE)):
        return Rejected(
            RejectReason.INVALID_ARGUMENT,
            f"rate must be 0 (none) or {MIN_RATE:g} to {MAX_RATE:g} jobs per second, got {rate!r}",
            "rate",
        )
    if not 0 <= burst <= MAX_BURST:
        return Rejected(
            RejectReason.INVALID_ARGUMENT,
            f"burst must be between 0 and {MAX_BURST}, got {burst}",
            "burst",
        )
    if burst and not rate:
        return Rejected(RejectReason.INVALID_ARGUMENT, "a burst needs a rate", "burst")
    if not 0 <= max_running <= MAX_RUNNING:
        return Rejected(
            RejectReason.INVALID_ARGUMENT,
            f"max_running must be between 0 (none) and {MAX_RUNNING}, got {max_running}",
            "max_running",
        )
    if not rate and not max_running:
        return None
    return TypeLimit(
        rate=RateLimit(rate, max(burst, 1)) if rate else None,
        max_running=max_running or None,
    )


def parse_limits(text: str) -> dict[str, TypeLimit]:
    """Parse the ``STACKDUCK_LIMITS`` setting.

    Format: ``;``-separated entries ``TYPE:key=value,key=value`` with keys
    ``rate`` (jobs per second), ``burst`` and ``max_running``, e.g.
    ``email:rate=50,burst=100;reports:max_running=2``. Empty text: no limits.

    Raises:
        ValueError: with a message naming the entry and what is wrong.
    """
    limits: dict[str, TypeLimit] = {}
    for raw in text.split(";"):
        entry = raw.strip()
        if not entry:
            continue
        job_type, sep, spec = entry.rpartition(":")
        if not sep or not job_type:
            raise ValueError(f"{entry!r}: expected TYPE:key=value[,key=value]")
        values: dict[str, str] = {}
        for item in spec.split(","):
            key, eq, value = item.strip().partition("=")
            if not eq or key not in ("rate", "burst", "max_running"):
                raise ValueError(
                    f"{entry!r}: {item.strip()!r} is not rate=N, burst=N or max_running=N"
                )
            if key in values:
                raise ValueError(f"{entry!r}: {key} given twice")
            values[key] = value.strip()
        try:
            rate = float(values.get("rate", "0"))
            burst = int(values.get("burst", "0"))
            max_running = int(values.get("max_running", "0"))
        except ValueError as exc:
            raise ValueError(f"{entry!r}: {exc}") from None
        limit = limit_from_wire(job_type, rate, burst, max_running)
        if isinstance(limit, Rejected):
            raise ValueError(f"{entry!r}: {limit.message}")
        if limit is None:
            raise ValueError(f"{entry!r}: sets no limit (give rate or max_running above 0)")
        if job_type in limits:
            raise ValueError(f"{entry!r}: job type {job_type!r} given twice")
        limits[job_type] = limit
    return limits


class Limiter:
    """Limits by job type with their rate state, for one queue that sees every start.

    Throttles are counted per ``(job_type, held)``: each decision that held
    back jobs a worker had room for counts once.
    """

    def __init__(self) -> None:
        self._limits: dict[str, TypeLimit] = {}
        self._tats: dict[str, float] = {}
        self.throttled: dict[tuple[str, str], int] = {}

    def set(self, job_type: str, limit: TypeLimit | None) -> None:
        """Set, change or (None) remove a type's limits.

        The rate's state (its TAT) is kept while the rate and burst stay
        the same (changing ``max_running`` alone gives no fresh burst); a new
        rate or burst starts afresh -- a TAT measured in the old rate's
        intervals would mean a wrong debt in the new one (raising 1/s to
        100/s after a burst of 100 would block the type for 99 s).
        """
        old = self._limits.get(job_type)
        if limit is None:
            self._limits.pop(job_type, None)
        else:
            self._limits[job_type] = limit
        if limit is None or old is None or limit.rate != old.rate:
            self._tats.pop(job_type, None)

    def get(self, job_type: str) -> TypeLimit | None:
        return self._limits.get(job_type)

    def limits(self) -> Mapping[str, TypeLimit]:
        """A read-only snapshot of the limits, by job type."""
        return MappingProxyType(dict(self._limits))

    def check(self, job_type: str, want: int, *, now: float, running: int) -> Allowance:
        """How many of ``want`` may start now (nothing taken; throttles counted)."""
        limit = self._limits.get(job_type)
        if limit is None:
            return Allowance(max(want, 0))
        allowance = limit.decide(want, tat=self._tats.get(job_type), now=now, running=running)
        if allowance.held is not None:
            key = (job_type, allowance.held)
            self.throttled[key] = self.throttled.get(key, 0) + 1
        return allowance

    def take(self, job_type: str, n: int, *, now: float) -> None:
        """Record that ``n`` jobs (no more than :meth:`check` granted) started at ``now``.

        Raises:
            ValueError: more than the rate allows.
        """
        limit = self._limits.get(job_type)
        if limit is None or limit.rate is None or n <= 0:
            return
        tat = limit.taken(n, tat=self._tats.get(job_type), now=now)
        assert tat is not None
        self._tats[job_type] = tat
