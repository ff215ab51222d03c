"""The job record, the enqueue request, and their validation.

A :class:`Job` is an immutable record: every change of state produces a new
record (``attrs.evolve``), which the runtime persists as it is. Validation
turns an untrusted :class:`EnqueueRequest` (fields ``None`` when the client
omitted them) into a :class:`JobSpec` with every default applied, or into a
:class:`Rejected` value naming the field and the reason. Out-of-range values
are rejected, never silently replaced (a defect of the original server).
"""

from __future__ import annotations

import datetime
import enum
import json
import math
import re
from collections.abc import Sequence
from typing import Final, final

import attrs

__all__ = [
    "Base",
    "DEFAULT_DELAY",
    "DEFAULT_MAX_RETRIES",
    "DEFAULT_PAYLOAD",
    "DEFAULT_PRIORITY",
    "MAX_ID_LENGTH",
    "EnqueueRequest",
    "Job",
    "JobSpec",
    "Limits",
    "RejectReason",
    "Rejected",
    "Status",
    "clip_error",
    "parse_time",
    "validate_dead_selection",
    "validate_enqueue",
    "validate_job_id",
    "validate_job_type",
    "validate_lease_seconds",
    "validate_prefetch",
]

#: Longest job (or worker) id a request may name; the server's ids are 36.
MAX_ID_LENGTH: Final = 128
DEFAULT_PRIORITY: Final = 2
DEFAULT_MAX_RETRIES: Final = 2
DEFAULT_DELAY: Final = 30
#: Payload of a request that omitted it (proto3 cannot tell "" from omitted).
DEFAULT_PAYLOAD: Final = "{}"

_JOB_TYPE_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:\-]*")
_UNIX_SECONDS_RE: Final = re.compile(r"[0-9]{1,12}(\.[0-9]{1,9})?")
#: An idempotency key: 1..200 characters of printable ASCII.
_IDEMPOTENCY_KEY_RE: Final = re.compile(r"[\x20-\x7e]{1,200}")
MAX_IDEMPOTENCY_KEY_LENGTH: Final = 200


class Status(enum.Enum):
    """The status of a job, as spelled on the wire (lowercase)."""

    SCHEDULED = "scheduled"
    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        """``True`` for completed, failed (dead-lettered) and cancelled."""
        return self in _TERMINAL


_TERMINAL: Final = frozenset({Status.COMPLETED, Status.FAILED, Status.CANCELLED})


class RejectReason(enum.Enum):
    """Why the core refused a request; the runtime maps each to a gRPC status."""

    INVALID_ARGUMENT = "invalid_argument"
    TOO_LARGE = "too_large"
    NOT_FOUND = "not_found"
    WRONG_STATE = "wrong_state"
    STALE_LEASE = "stale_lease"
    NOT_DUE = "not_due"
    LEASE_NOT_EXPIRED = "lease_not_expired"


@final
@attrs.frozen
class Rejected:
    """A refusal, as data. ``field`` names the offending request field, if any."""

    reason: RejectReason
    message: str
    field: str | None = None


@final
@attrs.frozen(kw_only=True)
class Limits:
    """Documented bounds of enqueue requests.

    Attributes:
        max_payload_bytes: size limit of the UTF-8 payload (RESOURCE_EXHAUSTED above).
        max_error_bytes: how much of a failure's error text is kept (see
            :func:`clip_error`); a job's record stays small enough for one message.
        max_retries: upper bound of ``max_retries`` (inclusive).
        max_delay: upper bound of ``delay``, the backoff base in seconds (inclusive);
            the backoff itself is capped at one hour, so a larger base means nothing.
        max_job_type_length: length limit of a job type.
        max_schedule_ahead: how far in the future ``scheduled_at`` may lie, seconds.
        max_prefetch: most un-acked jobs a worker stream may ask for.
        max_lease_seconds: longest lease a worker may ask for.
    """

    max_payload_bytes: int = 1024 * 1024
    max_error_bytes: int = 16 * 1024
    max_retries: int = 100
    max_delay: int = 3600
    max_job_type_length: int = 128
    max_schedule_ahead: float = 366 * 86400.0
    max_prefetch: int = 1000
    max_lease_seconds: int = 86400


@final
@attrs.frozen(kw_only=True)
class EnqueueRequest:
    """An enqueue request as received: ``None`` means the client omitted the field."""

    job_type: str
    payload: str | None = None
    priority: int | None = None
    delay: int | None = None
    max_retries: int | None = None
    scheduled_at: str | float | None = None
    idempotency_key: str | None = None


@final
@attrs.frozen(kw_only=True)
class JobSpec:
    """A validated enqueue request with every default applied.

    ``scheduled_at`` is the absolute due time (epoch seconds); it is never
    earlier than the ``now`` of validation.
    """

    job_type: str
    payload: str
    priority: int
    delay: int
    max_retries: int
    scheduled_at: float
    idempotency_key: str | None = None


@final
@attrs.frozen
class Base:
    """What the record store must hold for a changed record to be written.

    A record made by a transition carries the status and lease of the record
    it was made from: the store writes it only over a row that still has them
    (compare-and-set), so two instances racing on one job -- or a stale copy
    of a job coming back from a queue tier -- can never both apply an outcome.
    """

    status: Status
    lease_id: str | None


@final
@attrs.frozen(kw_only=True)
class Job:
    """One job, as the record store keeps it.

    Attributes:
        scheduled_at: due time; the job is never delivered before it.
        seq: FIFO position within its priority, stamped when the job became
            queued (see ``_ordering``); 0 while it has never been queued.
        attempt: deliveries so far (1 during the first delivery).
        lost_leases: deliveries that ended with a lost lease (expired, or the
            worker vanished); bounded by the poison-pill guard.
        lease_id: the fencing token of the current delivery, if running.
        version: incremented on every change; drivers use it for conditional
            writes and readers for ordering updates of one job.
        idempotency_key: the producer's key for safe enqueue retries, if any.
        base: for a record made by a transition, what the record store must
            hold to write it (:class:`Base`); ``None`` for a new job or a
            record read from a store. Not part of the record's value: ignored
            by ``==`` and not stored.
    """

    id: str
    job_type: str
    payload: str
    status: Status
    priority: int
    max_retries: int
    delay: int
    scheduled_at: float
    created_at: float
    updated_at: float
    retry_count: int = 0
    error_message: str = ""
    started_at: float | None = None
    completed_at: float | None = None
    seq: int = 0
    attempt: int = 0
    lost_leases: int = 0
    lease_id: str | None = None
    lease_expires_at: float | None = None
    worker_id: str | None = None
    version: int = 1
    idempotency_key: str | None = None
    base: Base | None = attrs.field(default=None, eq=False, repr=False)

    @property
    def retries_left(self) -> bool:
        """Whether a failure reschedules the job instead of dead-lettering it."""
        return self.retry_count < self.max_retries


def parse_time(value: str | float) -> float | None:
    """Parse a time given as RFC 3339 text or Unix seconds.

    Returns epoch seconds, or ``None`` when the value is not a time. RFC 3339
    requires an offset (``Z`` or ``+hh:mm``): a naive time is ambiguous.
    """
    if isinstance(value, int | float):
        number = float(value)
        return number if math.isfinite(number) and number >= 0 else None
    text = value.strip()
    if _UNIX_SECONDS_RE.fullmatch(text):
        return float(text)
    if not (10 < len(text) <= 40) or text[4:5] != "-":
        return None
    try:
        parsed = datetime.datetime.fromisoformat(text)
    except ValueError:
        return None
    if parsed.tzinfo is None:
        return None
    return parsed.timestamp()


def _reject_constant(name: str) -> float:
    # Python's json accepts NaN and Infinity, which are not JSON (RFC 8259):
    # other clients' parsers and PostgreSQL's jsonb would choke on them.
    raise ValueError(f"{name} is not a JSON value")


def _check_int(field: str, value: int | None, default: int, low: int, high: int) -> int | Rejected:
    if value is None:
        return default
    if not low <= value <= high:
        return Rejected(
            RejectReason.INVALID_ARGUMENT,
            f"{field} must be between {low} and {high}, got {value}",
            field,
        )
    return value


def clip_error(error: str, limits: Limits) -> str:
    """An error text cut to ``limits.max_error_bytes`` UTF-8 bytes, with a note.

    Error texts are diagnostics a worker reports (often a traceback), not data
    a producer entrusted to us, so a long one is kept in part rather than
    refused: the start, then ``[... N more bytes]``.
    """
    data = error.encode("utf-8", "surrogatepass")
    if len(data) <= limits.max_error_bytes:
        return error
    note = f" [... {len(data) - limits.max_error_bytes} more bytes]"
    head = data[: max(limits.max_error_bytes - len(note), 0)]
    return head.decode("utf-8", "ignore") + note


def validate_prefetch(prefetch: int | None, limits: Limits) -> int | Rejected:
    """A worker stream's prefetch: 1 when omitted, else within ``1..max_prefetch``."""
    return _check_int("prefetch", prefetch, 1, 1, limits.max_prefetch)


def validate_lease_seconds(lease_seconds: int | None, limits: Limits) -> int | None | Rejected:
    """A requested lease length: ``None`` (the server's default) when omitted."""
    if lease_seconds is None:
        return None
    return _check_int("lease_seconds", lease_seconds, 0, 1, limits.max_lease_seconds)


def validate_job_type(job_type: str, limits: Limits, field: str = "job_type") -> Rejected | None:
    """Check a job type name (enqueue, consume, pause...); ``None`` when valid.

    Every request that names a job type uses this one rule, so a worker can
    never wait on, nor an operator pause, a type no job can have.
    """
    if not job_type:
        return Rejected(RejectReason.INVALID_ARGUMENT, f"{field} is required", field)
    if len(job_type) > limits.max_job_type_length:
        return Rejected(
            RejectReason.INVALID_ARGUMENT,
            f"{field} is longer than {limits.max_job_type_length} characters",
            field,
        )
    if not _JOB_TYPE_RE.fullmatch(job_type):
        return Rejected(
            RejectReason.INVALID_ARGUMENT,
            f"{field} may contain only letters, digits and _ . : - and must start "
            "with a letter or digit",
            field,
        )
    return None


def validate_job_id(job_id: object, field: str = "job_id") -> Rejected | None:
    """Check an id a request names (a job's, or a worker's); ``None`` when valid."""
    if not isinstance(job_id, str) or not job_id:
        return Rejected(RejectReason.INVALID_ARGUMENT, f"{field} is required", field)
    if len(job_id) > MAX_ID_LENGTH:
        return Rejected(
            RejectReason.INVALID_ARGUMENT,
            f"{field} is longer than {MAX_ID_LENGTH} characters",
            field,
        )
    return None


def validate_dead_selection(
    job_ids: Sequence[object], job_type: str, limits: Limits, *, max_ids: int
) -> Rejected | None:
    """Check which dead jobs a requeue or purge names: ids, or a type (``"*"``: all).

    One rule for every API that acts on dead letters; ``None`` when valid.
    """
    if bool(job_ids) == bool(job_type):
        return Rejected(
            RejectReason.INVALID_ARGUMENT,
            'give either job_ids or job_type ("*" for every type), not both or neither',
        )
    if len(job_ids) > max_ids:
        return Rejected(RejectReason.TOO_LARGE, f"job_ids: at most {max_ids} per call", "job_ids")
    for job_id in job_ids:
        rejected = validate_job_id(job_id, "job_ids")
        if rejected is not None:
            return rejected
    if job_type and job_type != "*":
        return validate_job_type(job_type, limits)
    return None


def validate_enqueue(request: EnqueueRequest, *, now: float, limits: Limits) -> JobSpec | Rejected:
    """Validate an enqueue request and apply the defaults.

    Args:
        request: the request as received.
        now: the current time (epoch seconds).
        limits: the configured bounds.

    Returns:
        The :class:`JobSpec`, or a :class:`Rejected` naming the first bad field
        (fields are checked in proto order).
    """
    job_type = request.job_type
    bad_type = validate_job_type(job_type, limits)
    if bad_type is not None:
        return bad_type
    payload = request.payload or DEFAULT_PAYLOAD
    size = len(payload.encode("utf-8", "surrogatepass"))
    if size > limits.max_payload_bytes:
        return Rejected(
            RejectReason.TOO_LARGE,
            f"payload is {size} bytes, larger than the limit of {limits.max_payload_bytes}",
            "payload",
        )
    try:
        json.loads(payload, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:  # RecursionError: absurdly deep nesting
        return Rejected(
            RejectReason.INVALID_ARGUMENT, f"payload is not valid JSON: {exc}", "payload"
        )
    priority = _check_int("priority", request.priority, DEFAULT_PRIORITY, 1, 3)
    if isinstance(priority, Rejected):
        return priority
    delay = _check_int("delay", request.delay, DEFAULT_DELAY, 0, limits.max_delay)
    if isinstance(delay, Rejected):
        return delay
    max_retries = _check_int(
        "max_retries", request.max_retries, DEFAULT_MAX_RETRIES, 0, limits.max_retries
    )
    if isinstance(max_retries, Rejected):
        return max_retries
    due = now
    if request.scheduled_at is not None and request.scheduled_at != "":
        parsed = parse_time(request.scheduled_at)
        if parsed is None:
            return Rejected(
                RejectReason.INVALID_ARGUMENT,
                "scheduled_at must be an RFC 3339 time with an offset "
                "(2026-01-31T12:00:00Z) or Unix seconds",
                "scheduled_at",
            )
        if parsed > now + limits.max_schedule_ahead:
            return Rejected(
                RejectReason.INVALID_ARGUMENT,
                f"scheduled_at is more than {limits.max_schedule_ahead:.0f} seconds ahead",
                "scheduled_at",
            )
        due = max(now, parsed)
    key = request.idempotency_key
    if key is not None and not _IDEMPOTENCY_KEY_RE.fullmatch(key):
        return Rejected(
            RejectReason.INVALID_ARGUMENT,
            f"idempotency_key must be 1 to {MAX_IDEMPOTENCY_KEY_LENGTH} characters "
            "of printable ASCII",
            "idempotency_key",
        )
    return JobSpec(
        job_type=job_type,
        payload=payload,
        priority=priority,
        delay=delay,
        max_retries=max_retries,
        scheduled_at=due,
        idempotency_key=key,
    )
