"""Dispatch: which worker stream gets which ready job.

The dispatcher is per server instance. It knows the worker streams attached
to this instance, the job types each one takes, how many un-acked jobs each
may hold (its *prefetch*), and which leases each one holds. It never looks at
jobs: it answers "which stream should receive the next job of which type",
and the queue tier (memory or Redis) supplies the job.

Fairness has two axes, both round-robin:

* across job types -- a :meth:`Dispatcher.plan` pass serves the types with
  ready jobs in turns of one job each, starting one type later on every
  pass, so a type with an endless backlog cannot starve another;
* across streams of one type -- each type keeps a rotating ring of streams;
  a stream that received a job goes to the back.

Flow control: a stream's *credit* is ``prefetch - len(held leases)``; a
stream with no credit receives nothing until an ack (or a lost lease) frees
one. So no worker ever holds more un-acked jobs than it asked for.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import final

import attrs

__all__ = ["Dispatcher", "DispatcherStats", "StreamInfo"]


@final
@attrs.frozen(kw_only=True)
class StreamInfo:
    """A snapshot of one attached stream."""

    stream_id: int
    worker_id: str
    job_types: tuple[str, ...]
    prefetch: int
    lease_seconds: float
    in_flight: int


@final
@attrs.frozen(kw_only=True)
class DispatcherStats:
    """A snapshot of the dispatcher: streams and in-flight jobs per type."""

    streams: int
    in_flight: int
    streams_by_type: Mapping[str, int]


@attrs.define
class _Stream:
    stream_id: int
    worker_id: str
    job_types: tuple[str, ...]
    prefetch: int
    lease_seconds: float
    # job_id -> lease_id of the jobs this stream holds
    held: dict[str, str] = attrs.field(factory=dict)
    # the worker gave a job back unstarted: it is winding down
    stopping: bool = False

    @property
    def credit(self) -> int:
        return self.prefetch - len(self.held)


class Dispatcher:
    """The registry of worker streams of one instance.

    Each job type has a *ring*: the streams taking that type that have credit
    left, in round-robin order (an insertion-ordered dict used as a rotating
    queue, so take-from-front, move-to-back and removal are all O(1)). A stream
    leaves the rings of all its types when its credit reaches 0 and comes back
    at the end when an ack frees a slot.
    """

    def __init__(self) -> None:
        self._streams: dict[int, _Stream] = {}
        self._rings: dict[str, dict[int, None]] = {}
        self._subscribers: dict[str, int] = {}
        self._type_turn = 0
        # lease_id -> stream_id, to route acks that arrive by unary RPC
        self._lease_owner: dict[str, int] = {}

    def attach(
        self,
        stream_id: int,
        *,
        worker_id: str,
        job_types: Iterable[str],
        prefetch: int,
        lease_seconds: float,
    ) -> None:
        """Register a stream (``stream_id`` unique per instance, never reused).

        Raises:
            ValueError: the id is attached already, or ``prefetch < 1``.
        """
        if stream_id in self._streams:
            raise ValueError(f"stream {stream_id} is already attached")
        if prefetch < 1:
            raise ValueError("prefetch must be at least 1")
        stream = _Stream(
            stream_id, worker_id, tuple(dict.fromkeys(job_types)), prefetch, lease_seconds
        )
        self._streams[stream_id] = stream
        for job_type in stream.job_types:
            self._subscribers[job_type] = self._subscribers.get(job_type, 0) + 1
        self._join_rings(stream)

    def detach(self, stream_id: int) -> dict[str, str]:
        """Forget a stream; return the ``job_id -> lease_id`` it still held.

        The caller turns each returned lease into a ``WorkerDetached`` event so
        the jobs are requeued at once. Unknown ids return ``{}`` (idempotent).
        """
        stream = self._streams.pop(stream_id, None)
        if stream is None:
            return {}
        self._leave_rings(stream)
        for job_type in stream.job_types:
            self._subscribers[job_type] -= 1
            if not self._subscribers[job_type]:
                del self._subscribers[job_type]
        for lease_id in stream.held.values():
            del self._lease_owner[lease_id]
        return stream.held

    def _join_rings(self, stream: _Stream) -> None:
        for job_type in stream.job_types:
            self._rings.setdefault(job_type, {})[stream.stream_id] = None

    def _leave_rings(self, stream: _Stream) -> None:
        for job_type in stream.job_types:
            ring = self._rings.get(job_type)
            if ring is not None and ring.pop(stream.stream_id, 0) is None and not ring:
                del self._rings[job_type]

    def stream(self, stream_id: int) -> StreamInfo | None:
        """A snapshot of one stream, or ``None`` if it is not attached."""
        s = self._streams.get(stream_id)
        if s is None:
            return None
        return StreamInfo(
            stream_id=s.stream_id,
            worker_id=s.worker_id,
            job_types=s.job_types,
            prefetch=s.prefetch,
            lease_seconds=s.lease_seconds,
            in_flight=len(s.held),
        )

    def holder(self, lease_id: str) -> StreamInfo | None:
        """The stream holding ``lease_id``, or ``None`` (unary claim, or settled)."""
        sid = self._lease_owner.get(lease_id)
        return None if sid is None else self.stream(sid)

    def wanted_types(self) -> frozenset[str]:
        """Job types at least one stream has credit for."""
        return frozenset(self._rings)

    def credit(self, job_type: str) -> int:
        """How many more jobs of ``job_type`` the streams that want it could take."""
        return sum(self._streams[sid].credit for sid in self._rings.get(job_type, ()))

    def plan(self, ready: Mapping[str, int]) -> list[tuple[int, str]]:
        """Assign ready jobs to streams.

        Args:
            ready: how many jobs of each type can be delivered now (after
                pauses and rate limits).

        Returns:
            ``(stream_id, job_type)`` pairs in delivery order. The caller claims
            one job of that type for that stream per pair and reports each
            success with :meth:`delivered`; a pair whose claim finds nothing
            is simply dropped. The plan never exceeds any stream's credit.
        """
        types = sorted(t for t, n in ready.items() if n > 0 and t in self._rings)
        if not types:
            return []
        turn = self._type_turn % len(types)
        self._type_turn += 1
        active = types[turn:] + types[:turn]
        remaining = {t: ready[t] for t in active}
        spent: dict[int, int] = {}
        plan: list[tuple[int, str]] = []
        while active:
            still: list[str] = []
            for job_type in active:
                sid = self._next_stream(job_type, spent)
                if sid is None:
                    continue
                plan.append((sid, job_type))
                spent[sid] = spent.get(sid, 0) + 1
                remaining[job_type] -= 1
                if remaining[job_type]:
                    still.append(job_type)
            active = still
        return plan

    def _next_stream(self, job_type: str, spent: Mapping[int, int]) -> int | None:
        ring = self._rings[job_type]
        for _ in range(len(ring)):
            sid = next(iter(ring))
            # move to the back: the next job of this type goes to another stream
            del ring[sid]
            ring[sid] = None
            if self._streams[sid].credit > spent.get(sid, 0):
                return sid
        return None

    def delivered(self, stream_id: int, job_id: str, lease_id: str) -> None:
        """Record that ``stream_id`` now holds ``job_id`` under ``lease_id``."""
        stream = self._streams[stream_id]
        stream.held[job_id] = lease_id
        self._lease_owner[lease_id] = stream_id
        if stream.credit == 0:
            self._leave_rings(stream)

    def settled(self, job_id: str, lease_id: str, *, shrink: bool = False) -> int | None:
        """Record the end of a delivery (ack, nack, lost lease, cancel, release).

        Args:
            job_id: the job.
            lease_id: the lease that ended.
            shrink: the holder gave the job back unstarted, which a worker does
                when it winds down: from then on the stream's prefetch follows
                what it still holds down (no credit, now or after its later
                acks), so a stopping worker is not sent jobs only to give them
                back (one round trip per ack) while it finishes the others.

        Returns:
            The stream that held it, or ``None`` if no attached stream held
            that lease.
        """
        sid = self._lease_owner.pop(lease_id, None)
        if sid is None:
            return None
        stream = self._streams[sid]
        del stream.held[job_id]
        stream.stopping = stream.stopping or shrink
        if stream.stopping:
            stream.prefetch = len(stream.held)
            self._leave_rings(stream)  # no credit left (a no-op if it had none)
        elif stream.credit == 1:
            self._join_rings(stream)
        return sid

    def statistics(self) -> DispatcherStats:
        """A snapshot of the attached streams."""
        return DispatcherStats(
            streams=len(self._streams),
            in_flight=len(self._lease_owner),
            streams_by_type=dict(sorted(self._subscribers.items())),
        )
