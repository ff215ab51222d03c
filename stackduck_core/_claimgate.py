"""Which job types are worth a claim from a shared queue tier.

An instance of a cluster claims jobs from the shared tier for its worker
streams. Each claim is a round trip; one that finds nothing is pure cost,
and a feeder woken by every local change would make many. :class:`ClaimGate`
remembers which types came back *short* (fewer jobs than asked: nothing more
was ready, or a limit held the rest) and keeps them *quiet* until the tier
says something changed for them: a message naming the type (a push, a job
back from a settle, a resume, a limit change, a freed concurrency slot) or
a message about every type (a schedule change, a reconnect, a health change,
a due time, the poll period).

No wake-up is lost: a claim takes a :meth:`ticket` (the count of messages
heard so far) before it starts, and a short claim records that ticket. A
message heard while the claim was under way counts after it, so the type
stays loud and is claimed again.
"""

from __future__ import annotations

from typing import final

__all__ = ["ClaimGate"]


@final
class ClaimGate:
    """Quiet and loud job types, from claims and the tier's messages (no I/O)."""

    def __init__(self) -> None:
        self._heard = 0
        self._heard_all = 0
        self._heard_by_type: dict[str, int] = {}
        self._quiet: dict[str, int] = {}

    def hear(self, job_type: str | None) -> None:
        """The tier may hold new ready jobs of ``job_type`` (``None``: of any type)."""
        self._heard += 1
        if job_type is None:
            self._heard_all = self._heard
        else:
            self._heard_by_type[job_type] = self._heard

    def ticket(self) -> int:
        """Take before a claim starts; give to :meth:`claimed` when it returns."""
        return self._heard

    def claimed(self, job_type: str, ticket: int, *, short: bool) -> None:
        """A claim of ``job_type`` returned: ``short`` if it got fewer than asked."""
        if short:
            self._quiet[job_type] = ticket
        else:
            self._quiet.pop(job_type, None)

    def quiet(self, job_type: str) -> bool:
        """Whether a claim of ``job_type`` would find nothing, as far as heard."""
        mark = self._quiet.get(job_type)
        if mark is None:
            return False
        return mark >= max(self._heard_by_type.get(job_type, 0), self._heard_all)
