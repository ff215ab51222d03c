"""Exceptions of the core.

Following h11's split between local and remote errors: bad input from a
client is *data* (a :class:`~stackduck_core.Rejected` value the runtime maps
to a gRPC status), never an exception -- that includes an event the lifecycle
table does not allow (``Rejected(WRONG_STATE)``). Exceptions mean that the
runtime fed the core something impossible (a bug in the caller): they derive
from :class:`StackduckError` (or are ``ValueError`` for an out-of-range
argument), carry structured fields where that helps a log line, and are
raised before any state is mutated.
"""

from __future__ import annotations


class StackduckError(Exception):
    """Base class of every exception raised by ``stackduck_core``."""
