"""Exceptions of the core.

Following h11's split between local and remote errors: bad input from a
client is *data* (a :class:`~stackduck_core.Rejected` value the runtime maps
to a gRPC status), never an exception. The exceptions here mean that the
runtime fed the core something impossible, which is a bug in the caller.
They carry structured fields so logs can say exactly what happened, and they
are raised before any state is mutated.
"""

from __future__ import annotations


class StackduckError(Exception):
    """Base class of every exception raised by ``stackduck_core``."""


class InvalidTransition(StackduckError):
    """An event that the job lifecycle table does not allow.

    Attributes:
        job_id: the job concerned, or ``None`` for a job not yet created.
        state: the job's status name when the event arrived.
        event_type: the name of the event's class.
    """

    def __init__(self, job_id: str | None, state: str | None, event_type: str) -> None:
        super().__init__(f"{event_type} is not allowed for job {job_id!r} in state {state!r}")
        self.job_id = job_id
        self.state = state
        self.event_type = event_type
