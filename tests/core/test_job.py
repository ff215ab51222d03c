"""Golden tables for enqueue validation, defaults and time parsing."""

from __future__ import annotations

import math
import typing

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stackduck_core import (
    DEFAULT_DELAY,
    DEFAULT_MAX_RETRIES,
    DEFAULT_PAYLOAD,
    DEFAULT_PRIORITY,
    MAX_ID_LENGTH,
    EnqueueRequest,
    Job,
    JobSpec,
    Limits,
    Rejected,
    RejectReason,
    Status,
    parse_time,
    validate_dead_selection,
    validate_enqueue,
    validate_job_id,
)

NOW = 1_769_860_800.0  # 2026-01-31T12:00:00Z
LIMITS = Limits()
YEAR = 366 * 86400.0

INVALID = RejectReason.INVALID_ARGUMENT


def check(**request: typing.Any) -> JobSpec | Rejected:
    request.setdefault("job_type", "email")
    return validate_enqueue(EnqueueRequest(**request), now=NOW, limits=LIMITS)


def spec(**fields: typing.Any) -> JobSpec:
    """The expected JobSpec: the defaults, with ``fields`` replaced."""
    base: dict[str, typing.Any] = dict(
        job_type="email", payload="{}", priority=2, delay=30, max_retries=2, scheduled_at=NOW
    )
    base.update(fields)
    return JobSpec(**base)


def test_documented_defaults() -> None:
    assert (DEFAULT_PRIORITY, DEFAULT_MAX_RETRIES, DEFAULT_DELAY, DEFAULT_PAYLOAD) == (
        2,
        2,
        30,
        "{}",
    )
    limits = Limits()
    assert limits.max_payload_bytes == 1024 * 1024
    assert (limits.max_retries, limits.max_delay, limits.max_job_type_length) == (100, 3600, 128)


# -- accepted requests: (request fields, expected spec fields) ---------------

ACCEPTED: list[tuple[str, dict[str, typing.Any], dict[str, typing.Any]]] = [
    ("all-omitted", {}, {}),
    ("payload-empty-is-omitted", {"payload": ""}, {}),
    ("payload-kept", {"payload": '{"a": [1, 2.5, null]}'}, {"payload": '{"a": [1, 2.5, null]}'}),
    ("payload-scalar", {"payload": "42"}, {"payload": "42"}),
    (
        "payload-unicode",
        {"payload": '"d\u00fcck \U0001f986"'},
        {"payload": '"d\u00fcck \U0001f986"'},
    ),
    ("payload-huge-number", {"payload": "1e400"}, {"payload": "1e400"}),
    ("priority-1", {"priority": 1}, {"priority": 1}),
    ("priority-2", {"priority": 2}, {"priority": 2}),
    ("priority-3", {"priority": 3}, {"priority": 3}),
    ("delay-0-honoured", {"delay": 0}, {"delay": 0}),
    ("delay-1", {"delay": 1}, {"delay": 1}),
    ("delay-3600", {"delay": 3600}, {"delay": 3600}),
    ("max_retries-0-honoured", {"max_retries": 0}, {"max_retries": 0}),
    ("max_retries-100", {"max_retries": 100}, {"max_retries": 100}),
    (
        "all-explicit",
        {"payload": "[]", "priority": 1, "delay": 5, "max_retries": 9},
        {"payload": "[]", "priority": 1, "delay": 5, "max_retries": 9},
    ),
    # scheduled_at
    ("scheduled-empty-is-omitted", {"scheduled_at": ""}, {}),
    ("rfc3339-z", {"scheduled_at": "2026-01-31T12:30:00Z"}, {"scheduled_at": NOW + 1800}),
    (
        "rfc3339-offset",
        {"scheduled_at": "2026-01-31T13:30:00+01:00"},
        {"scheduled_at": NOW + 1800},
    ),
    (
        "rfc3339-negative-offset",
        {"scheduled_at": "2026-01-31T07:00:00-05:00"},
        {"scheduled_at": NOW},
    ),
    (
        "rfc3339-fraction",
        {"scheduled_at": "2026-01-31T12:30:00.5Z"},
        {"scheduled_at": NOW + 1800.5},
    ),
    (
        "rfc3339-space-separator",
        {"scheduled_at": "2026-01-31 12:30:00+00:00"},
        {"scheduled_at": NOW + 1800},
    ),
    ("rfc3339-padded", {"scheduled_at": "  2026-01-31T12:30:00Z\n"}, {"scheduled_at": NOW + 1800}),
    ("unix-text", {"scheduled_at": "1769862600"}, {"scheduled_at": NOW + 1800}),
    ("unix-text-fraction", {"scheduled_at": "1769862600.25"}, {"scheduled_at": NOW + 1800.25}),
    ("unix-float", {"scheduled_at": 1769862600.0}, {"scheduled_at": NOW + 1800}),
    ("unix-int", {"scheduled_at": 1769862600}, {"scheduled_at": NOW + 1800}),
    ("past-rfc3339-is-now", {"scheduled_at": "2020-01-01T00:00:00Z"}, {"scheduled_at": NOW}),
    ("past-unix-is-now", {"scheduled_at": "1"}, {"scheduled_at": NOW}),
    ("zero-is-now", {"scheduled_at": 0.0}, {"scheduled_at": NOW}),
    ("exactly-now", {"scheduled_at": NOW}, {"scheduled_at": NOW}),
    ("year-ahead-limit", {"scheduled_at": NOW + YEAR}, {"scheduled_at": NOW + YEAR}),
    # job types
    ("type-one-char", {"job_type": "a"}, {"job_type": "a"}),
    ("type-digit-first", {"job_type": "9lives"}, {"job_type": "9lives"}),
    ("type-punctuation", {"job_type": "Mail.send:v2-x_y"}, {"job_type": "Mail.send:v2-x_y"}),
    ("type-128", {"job_type": "t" * 128}, {"job_type": "t" * 128}),
]


@pytest.mark.parametrize(
    ("request_fields", "expected"),
    [(r, e) for _, r, e in ACCEPTED],
    ids=[name for name, _, _ in ACCEPTED],
)
def test_accepted(request_fields: dict[str, typing.Any], expected: dict[str, typing.Any]) -> None:
    assert check(**request_fields) == spec(**expected)


# -- rejected requests: (request fields, reason, field) ----------------------

REJECTED: list[tuple[str, dict[str, typing.Any], RejectReason, str]] = [
    ("type-empty", {"job_type": ""}, INVALID, "job_type"),
    ("type-129", {"job_type": "t" * 129}, INVALID, "job_type"),
    ("type-dash-first", {"job_type": "-x"}, INVALID, "job_type"),
    ("type-underscore-first", {"job_type": "_x"}, INVALID, "job_type"),
    ("type-space", {"job_type": "send mail"}, INVALID, "job_type"),
    ("type-slash", {"job_type": "a/b"}, INVALID, "job_type"),
    ("type-newline", {"job_type": "a\n"}, INVALID, "job_type"),
    ("type-non-ascii", {"job_type": "d\u00fcck"}, INVALID, "job_type"),
    ("type-non-ascii-digit", {"job_type": "\u0661"}, INVALID, "job_type"),
    ("payload-truncated", {"payload": '{"a": 1'}, INVALID, "payload"),
    ("payload-not-json", {"payload": "hello"}, INVALID, "payload"),
    ("payload-single-quotes", {"payload": "{'a': 1}"}, INVALID, "payload"),
    ("payload-trailing-garbage", {"payload": "{} {}"}, INVALID, "payload"),
    ("payload-nan", {"payload": "NaN"}, INVALID, "payload"),
    ("payload-infinity", {"payload": '{"a": -Infinity}'}, INVALID, "payload"),
    ("payload-deep-nesting", {"payload": "[" * 100_000 + "]" * 100_000}, INVALID, "payload"),
    ("priority-0", {"priority": 0}, INVALID, "priority"),
    ("priority-4", {"priority": 4}, INVALID, "priority"),
    ("priority-negative", {"priority": -1}, INVALID, "priority"),
    ("delay--1", {"delay": -1}, INVALID, "delay"),
    ("delay-3601", {"delay": 3601}, INVALID, "delay"),
    ("max_retries--1", {"max_retries": -1}, INVALID, "max_retries"),
    ("max_retries-101", {"max_retries": 101}, INVALID, "max_retries"),
    ("naive-time", {"scheduled_at": "2026-01-31T12:30:00"}, INVALID, "scheduled_at"),
    ("date-only", {"scheduled_at": "2026-01-31"}, INVALID, "scheduled_at"),
    ("impossible-date", {"scheduled_at": "2026-02-30T00:00:00Z"}, INVALID, "scheduled_at"),
    ("bad-offset", {"scheduled_at": "2026-01-31T12:00:00+24:00"}, INVALID, "scheduled_at"),
    ("basic-format", {"scheduled_at": "20260131T120000Z"}, INVALID, "scheduled_at"),
    ("slashes", {"scheduled_at": "2026/01/31T12:00:00Z"}, INVALID, "scheduled_at"),
    ("words", {"scheduled_at": "tomorrow"}, INVALID, "scheduled_at"),
    ("blank", {"scheduled_at": "   "}, INVALID, "scheduled_at"),
    ("exponent", {"scheduled_at": "1e9"}, INVALID, "scheduled_at"),
    ("negative-text", {"scheduled_at": "-5"}, INVALID, "scheduled_at"),
    ("milliseconds", {"scheduled_at": "1769862600000"}, INVALID, "scheduled_at"),
    ("negative-number", {"scheduled_at": -1.0}, INVALID, "scheduled_at"),
    ("nan", {"scheduled_at": math.nan}, INVALID, "scheduled_at"),
    ("inf", {"scheduled_at": math.inf}, INVALID, "scheduled_at"),
    ("too-long", {"scheduled_at": "2026-01-31T12:00:00" + "0" * 30 + "Z"}, INVALID, "scheduled_at"),
    ("too-far-ahead", {"scheduled_at": NOW + YEAR + 1}, INVALID, "scheduled_at"),
    ("too-far-ahead-text", {"scheduled_at": "2099-01-01T00:00:00Z"}, INVALID, "scheduled_at"),
    # the first bad field in proto order is the one reported
    ("first-bad-field", {"priority": 0, "delay": -1, "max_retries": -1}, INVALID, "priority"),
    ("type-before-payload", {"job_type": "", "payload": "nope"}, INVALID, "job_type"),
    ("payload-before-ints", {"payload": "nope", "priority": 9}, INVALID, "payload"),
    ("ints-before-time", {"max_retries": 101, "scheduled_at": "x"}, INVALID, "max_retries"),
]


@pytest.mark.parametrize(
    ("request_fields", "reason", "field"),
    [(r, reason, f) for _, r, reason, f in REJECTED],
    ids=[name for name, *_ in REJECTED],
)
def test_rejected(request_fields: dict[str, typing.Any], reason: RejectReason, field: str) -> None:
    result = check(**request_fields)
    assert isinstance(result, Rejected)
    assert (result.reason, result.field) == (reason, field)
    assert field in result.message  # the message names the field for humans too


def test_out_of_range_message_names_the_bounds() -> None:
    result = check(delay=3601)
    assert isinstance(result, Rejected)
    assert result.message == "delay must be between 0 and 3600, got 3601"


# -- payload size ------------------------------------------------------------

ONE_MIB = 1024 * 1024


@pytest.mark.parametrize(
    ("payload", "accepted"),
    [
        ('"' + "a" * (ONE_MIB - 2) + '"', True),  # exactly the limit
        ('"' + "a" * (ONE_MIB - 1) + '"', False),  # one byte over
        ('"' + "\u00e9" * ((ONE_MIB - 2) // 2) + '"', True),  # bytes, not characters
        ('"' + "\u00e9" * ((ONE_MIB - 2) // 2 + 1) + '"', False),
        ("[" * (ONE_MIB + 1), False),  # size is checked before parsing
    ],
    ids=["at-limit", "over-limit", "utf8-at-limit", "utf8-over-limit", "huge-and-invalid"],
)
def test_payload_size_limit(payload: str, accepted: bool) -> None:
    result = check(payload=payload)
    if accepted:
        assert isinstance(result, JobSpec) and result.payload == payload
    else:
        assert isinstance(result, Rejected)
        assert (result.reason, result.field) == (RejectReason.TOO_LARGE, "payload")
        assert str(ONE_MIB) in result.message


def test_limits_are_configurable() -> None:
    limits = Limits(
        max_payload_bytes=4,
        max_retries=3,
        max_delay=10,
        max_job_type_length=2,
        max_schedule_ahead=5,
    )

    def run(**fields: typing.Any) -> JobSpec | Rejected:
        fields.setdefault("job_type", "ab")
        return validate_enqueue(EnqueueRequest(**fields), now=NOW, limits=limits)

    assert isinstance(run(payload="[12]"), JobSpec)
    assert isinstance(run(payload="[123]"), Rejected)
    assert isinstance(run(job_type="abc"), Rejected)
    assert isinstance(run(max_retries=3), JobSpec)
    assert isinstance(run(max_retries=4), Rejected)
    assert isinstance(run(delay=10), JobSpec)
    assert isinstance(run(delay=11), Rejected)
    assert run(scheduled_at=NOW + 5) == JobSpec(
        job_type="ab", payload="{}", priority=2, delay=30, max_retries=2, scheduled_at=NOW + 5
    )
    assert isinstance(run(scheduled_at=NOW + 5.001), Rejected)


@settings(max_examples=200, deadline=None)
@given(
    priority=st.none() | st.integers(-5, 10),
    delay=st.none() | st.integers(-5, 4000),
    max_retries=st.none() | st.integers(-5, 200),
    scheduled_at=st.none() | st.floats(allow_nan=True, allow_infinity=True),
)
def test_validation_is_total(
    priority: int | None, delay: int | None, max_retries: int | None, scheduled_at: float | None
) -> None:
    """Any request gives a spec within bounds, or a rejection naming a field."""
    result = check(
        priority=priority, delay=delay, max_retries=max_retries, scheduled_at=scheduled_at
    )
    if isinstance(result, Rejected):
        assert result.field in {"priority", "delay", "max_retries", "scheduled_at"}
        return
    assert 1 <= result.priority <= 3
    assert 0 <= result.delay <= LIMITS.max_delay
    assert 0 <= result.max_retries <= LIMITS.max_retries
    assert NOW <= result.scheduled_at <= NOW + LIMITS.max_schedule_ahead
    assert result.priority == (DEFAULT_PRIORITY if priority is None else priority)
    assert result.delay == (DEFAULT_DELAY if delay is None else delay)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=50))
def test_any_text_is_validated_without_exceptions(text: str) -> None:
    for fields in ({"job_type": text}, {"payload": text}, {"scheduled_at": text}):
        result = check(**fields)
        assert isinstance(result, JobSpec | Rejected)


# -- parse_time --------------------------------------------------------------

PARSED: list[tuple[str | float, float | None]] = [
    ("2026-01-31T12:00:00Z", NOW),
    ("2026-01-31T12:00:00+00:00", NOW),
    ("2026-01-31T14:00:00+02:00", NOW),
    ("2026-01-31T17:30:00+05:30", NOW),
    ("2026-01-31T12:00:00.250Z", NOW + 0.25),
    ("1970-01-01T00:00:00Z", 0.0),
    ("1769860800", NOW),
    (" 1769860800.5 ", NOW + 0.5),
    ("0", 0.0),
    (NOW, NOW),
    (0, 0.0),
    (12, 12.0),
    ("2026-01-31T12:00:00", None),  # naive: ambiguous
    ("2026-01-31", None),
    ("2026-01-31T12:00:00+25:00", None),
    ("12:00:00Z", None),
    ("", None),
    ("abc", None),
    ("1769860800000", None),  # 13 digits: milliseconds, not seconds
    ("1.5e9", None),
    ("-1", None),
    ("2026-01-31T12:00:00Z" + " " * 30 + "x", None),
    (-0.5, None),
    (math.nan, None),
    (math.inf, None),
    (-math.inf, None),
]


@pytest.mark.parametrize(("value", "expected"), PARSED, ids=[repr(v) for v, _ in PARSED])
def test_parse_time(value: str | float, expected: float | None) -> None:
    assert parse_time(value) == expected


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 10**12 - 1), st.integers(0, 999_999))
def test_parse_time_unix_text_round_trips(seconds: int, micros: int) -> None:
    assert parse_time(f"{seconds}.{micros:06d}") == float(f"{seconds}.{micros:06d}")
    assert parse_time(str(seconds)) == float(seconds)


# -- Status and Job ----------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "terminal"),
    [
        (Status.SCHEDULED, False),
        (Status.QUEUED, False),
        (Status.RUNNING, False),
        (Status.COMPLETED, True),
        (Status.FAILED, True),
        (Status.CANCELLED, True),
    ],
)
def test_status_terminal(status: Status, terminal: bool) -> None:
    assert status.terminal is terminal


def test_status_wire_names() -> None:
    assert [s.value for s in Status] == [
        "scheduled",
        "queued",
        "running",
        "completed",
        "failed",
        "cancelled",
    ]


JOB = Job(
    id="j",
    job_type="t",
    payload="{}",
    status=Status.RUNNING,
    priority=2,
    max_retries=2,
    delay=30,
    scheduled_at=NOW,
    created_at=NOW,
    updated_at=NOW,
)


@pytest.mark.parametrize(
    ("retry_count", "max_retries", "left"),
    [(0, 0, False), (0, 1, True), (1, 1, False), (1, 2, True), (2, 2, False), (3, 2, False)],
)
def test_retries_left(retry_count: int, max_retries: int, left: bool) -> None:
    job = attrs.evolve(JOB, retry_count=retry_count, max_retries=max_retries)
    assert job.retries_left is left


def test_job_defaults() -> None:
    assert (JOB.retry_count, JOB.attempt, JOB.lost_leases, JOB.seq, JOB.version) == (0, 0, 0, 0, 1)
    assert JOB.lease_id is None and JOB.started_at is None and JOB.error_message == ""


# -- idempotency keys ------------------------------------------------------------


@pytest.mark.parametrize(
    "key", ["a", "order-42", " ~", "x" * 200, "".join(chr(c) for c in range(0x20, 0x7F))]
)
def test_idempotency_key_accepted(key: str) -> None:
    assert check(idempotency_key=key) == spec(idempotency_key=key)


@pytest.mark.parametrize(
    "key", ["", "x" * 201, "caf\u00e9", "tab\there", "new\nline", "nul\x00", "del\x7f", "k\n"]
)
def test_idempotency_key_rejected(key: str) -> None:
    result = check(idempotency_key=key)
    assert isinstance(result, Rejected)
    assert result.reason is INVALID and result.field == "idempotency_key"
    assert "1 to 200 characters of printable ASCII" in result.message


def test_idempotency_key_defaults_to_none() -> None:
    assert check() == spec()
    assert spec().idempotency_key is None and JOB.idempotency_key is None


@pytest.mark.parametrize(
    ("prefetch", "expected"),
    [(None, 1), (1, 1), (1000, 1000), (0, None), (1001, None), (-3, None)],
)
def test_validate_prefetch_golden(prefetch: int | None, expected: int | None) -> None:
    from stackduck_core import validate_prefetch

    result = validate_prefetch(prefetch, Limits())
    if expected is None:
        assert isinstance(result, Rejected) and result.field == "prefetch"
        assert result.message == f"prefetch must be between 1 and 1000, got {prefetch}"
    else:
        assert result == expected


@pytest.mark.parametrize(
    ("lease", "expected"),
    [(None, None), (1, 1), (86400, 86400), (0, "bad"), (86401, "bad")],
)
def test_validate_lease_seconds_golden(lease: int | None, expected: int | str | None) -> None:
    from stackduck_core import validate_lease_seconds

    result = validate_lease_seconds(lease, Limits())
    if expected == "bad":
        assert isinstance(result, Rejected) and result.field == "lease_seconds"
        assert "between 1 and 86400" in result.message
    else:
        assert result == expected


# -- ids and dead-letter selections -------------------------------------------------------


def test_validate_job_id() -> None:
    assert validate_job_id("5f0c") is None
    assert validate_job_id("x" * MAX_ID_LENGTH) is None
    for bad, text in (("", "job_id is required"), (None, "job_id is required"),
                      (7, "job_id is required"),
                      ("x" * (MAX_ID_LENGTH + 1), "longer than 128")):  # fmt: skip
        rejected = validate_job_id(bad)
        assert rejected is not None and rejected.reason is RejectReason.INVALID_ARGUMENT
        assert text in rejected.message and rejected.field == "job_id"
    worker = validate_job_id("w" * 200, "worker_id")
    assert worker is not None and worker.message.startswith("worker_id ")


@pytest.mark.parametrize(
    ("job_ids", "job_type", "reason", "text"),
    [
        ([], "", RejectReason.INVALID_ARGUMENT, "give either"),
        (["a"], "t", RejectReason.INVALID_ARGUMENT, "give either"),
        (["a", "b", "c"], "", RejectReason.TOO_LARGE, "at most 2 per call"),
        (["a", ""], "", RejectReason.INVALID_ARGUMENT, "job_ids is required"),
        ([], "bad type", RejectReason.INVALID_ARGUMENT, "may contain only"),
    ],
)
def test_validate_dead_selection_rejects(
    job_ids: list[object], job_type: str, reason: RejectReason, text: str
) -> None:
    rejected = validate_dead_selection(job_ids, job_type, Limits(), max_ids=2)
    assert rejected is not None and rejected.reason is reason and text in rejected.message


def test_validate_dead_selection_accepts() -> None:
    assert validate_dead_selection(["a", "b"], "", Limits(), max_ids=2) is None
    assert validate_dead_selection([], "email", Limits(), max_ids=2) is None
    assert validate_dead_selection([], "*", Limits(), max_ids=2) is None
