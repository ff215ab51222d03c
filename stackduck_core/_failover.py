"""Backend health state machines and failover routing.

One :class:`BackendHealth` machine per storage backend turns operation and
probe outcomes into a health state; :func:`route` turns the health states into
the storage path each request takes; :func:`reconcile_plan` says what to repair
when a backend comes back.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Final, TypeAlias, final

import attrs

from ._errors import StackduckError

__all__ = [
    "BackendHealth",
    "BackendRole",
    "DEFAULT_HEALTH_POLICY",
    "Durability",
    "EnqueueMode",
    "HEALTH_EVENT_TYPES",
    "HEALTH_TRANSITIONS",
    "Health",
    "HealthChanged",
    "HealthEffect",
    "HealthEvent",
    "HealthPolicy",
    "HealthStatistics",
    "HealthTransition",
    "InvalidHealthTransition",
    "OpFailed",
    "OpSucceeded",
    "OpTimedOut",
    "ProbeFailed",
    "ProbeSucceeded",
    "QueueTier",
    "ReconcileFinished",
    "ReconcileStep",
    "Route",
    "StartReconcile",
    "probe_delay",
    "reconcile_plan",
    "route",
]

################################################################
# Theory of operation
################################################################
#
# Rule 1: everything that decides a backend's health lives in this file. That
# covers when a backend counts as failing, when it is given up on, when and how
# often it is probed, what must be repaired before it is trusted again, and
# which storage path a request takes meanwhile. The runtime *measures* (it runs
# operations and probes under timeouts and reports what happened) and *acts*
# (it switches tiers, runs reconciles, buffers writes); it never decides. If
# you find yourself writing "if redis failed twice" in stackduck_trio, the rule
# belongs here instead.
#
# The machine
# -----------
#
# There is one BackendHealth per backend: one for the record store (PostgreSQL
# or SQLite), and one for the queue tier when Redis is configured. Each has four
# states:
#
#   HEALTHY     Requests go to the backend. Nothing is probed.
#   SUSPECT     Something failed recently. Requests *still* go to the backend:
#               a failover is expensive (it ends in a reconcile), and one
#               dropped connection is not worth it. Consecutive failures are
#               counted, and a probe is due probe_base seconds after the
#               state was entered, so a backend with little traffic is still
#               judged promptly.
#   DOWN        failures_to_down consecutive failures (operations, timeouts or
#               probes, in any mix) were seen. Routing avoids the backend. Only
#               probes can move it on, spaced by capped exponential backoff.
#   RECOVERING  A probe succeeded. The backend answers, but it is not yet
#               consistent with what happened while it was away: Redis may
#               have lost its data and has certainly missed the jobs that went
#               to memory; the record store has an outbox and buffered acks to
#               apply. Entering RECOVERING emits StartReconcile, and routing
#               keeps avoiding the backend until *both* the reconcile has
#               finished and successes_to_recover consecutive probes (counting
#               the one that ended DOWN) have succeeded, in either order.
#
#   HEALTHY --failure--> SUSPECT --failure number failures_to_down--> DOWN <--+
#     ^  ^                   |                                         ^  |     | probe fails
#     |  +----success--------+                                         |  |     | (backoff
#     |                                               probe fails or   |  |     |  grows)
#     |                                               fresh op fails   |  +-----+
#     |                                                                |  | probe ok
#     |                                                                |  v
#     +------------- reconciled and enough probes ---------------- RECOVERING
#
# HEALTHY -> DOWN is possible in one step when failures_to_down is 1.
#
# Events and effects
# ------------------
#
# Events are facts reported by the runtime, each carrying `now` (UTC epoch
# seconds): OpSucceeded, OpFailed and OpTimedOut for real operations (a Redis
# script, a SQL transaction), ProbeSucceeded and ProbeFailed for the cheap
# health checks (PING, SELECT 1) the runtime runs when next_probe_at() says so,
# and ReconcileFinished when the reconcile started by a StartReconcile completed.
# Errors and timeouts count the same: for routing, a backend that hangs is as
# useless as one that refuses. The operations of a reconcile are reported like
# any other, so a reconcile that fails sends the backend back to DOWN; a
# reconcile reports ReconcileFinished only when it completed.
#
# handle() returns effects, named as commands: HealthChanged on every change of
# state (the runtime logs it, counts it in metrics, and recomputes route()),
# and StartReconcile on entering RECOVERING.
#
# Late and stale facts
# --------------------
#
# The runtime is concurrent, so facts arrive late: an operation started while
# the backend was HEALTHY may time out after it went DOWN; a probe launched
# while SUSPECT may answer after an operation already proved the backend
# healthy. The table below therefore has a row for nearly every (state, event
# type) pair, and most late facts are simply ignored. Two kinds of staleness
# need more care, and both are handled by fencing, like leases on jobs:
#
# * Operation outcomes may carry `started_at`. An outcome of an operation that
#   started before the current state was entered describes the previous state.
#   Such a stale success does not clear SUSPECT (a reply to a request sent
#   before the trouble began proves nothing), and such a stale failure does not
#   throw RECOVERING back to DOWN (otherwise the timeouts of the operations
#   that were in flight when the backend died would abort its first reconcile).
#   Without `started_at`, an outcome is taken as fresh.
#
# * Every StartReconcile carries a new reconcile_id and ReconcileFinished
#   echoes it. Only the id of the reconcile started on the latest entry into
#   RECOVERING counts; a reconcile that was overtaken by a relapse to DOWN is
#   ignored when it reports. An id that was never issued is a runtime bug and
#   raises InvalidHealthTransition.
#
# The runtime runs at most one reconcile per backend: on StartReconcile it
# cancels the previous one of that backend and waits for it to end before
# starting the new one. Reports therefore come in order, a backend can only
# become HEALTHY after the report of its latest reconcile, and so a
# ReconcileFinished while HEALTHY or SUSPECT cannot happen. Those are the only
# two pairs missing from the table; feeding one in raises
# InvalidHealthTransition, and, as with every rejected event, nothing about
# the machine changes.
#
# Probes and backoff
# ------------------
#
# next_probe_at() is the time the runtime should run the next probe; the
# prober runs one probe at a time per backend and reports it before asking
# again. The probe clock restarts whenever the state changes and whenever a
# probe result arrives:
#
#   HEALTHY      no probe (None): live traffic is the health check.
#   SUSPECT      probe_base after the last restart.
#   DOWN         probe_delay(failed_probes) = min(probe_base * 2**n, probe_cap)
#                after the last restart, where n = failed_probes.
#   RECOVERING   probe_base after the last restart: the backend just answered,
#                and confirming it quickly shortens the failover.
#
# failed_probes counts the probes that failed since the backend was last
# HEALTHY (including a relapse from RECOVERING), not just the current run of
# failures. That way a flapping backend, which answers one probe and then
# fails again, keeps backing off instead of being probed and reconciled at
# full speed; only reaching HEALTHY resets it. A probe that is overdue is
# reported as due at the latest `now` the machine has seen, so next_probe_at()
# is never earlier than that and a runtime can sleep until it without a
# special case.
#
# Routing
# -------
#
# route() is a pure function of the two health states and the configured
# durability. A backend is *usable* while HEALTHY or SUSPECT and unusable
# while DOWN or RECOVERING (in RECOVERING it answers but is not reconciled).
#
# * Queue tier: Redis while usable, else the in-memory queue. Without Redis
#   configured, memory is the queue tier and is always complete, because it is
#   rebuilt from the record store at start. With Redis configured but unusable,
#   other instances may hold jobs in their own memory, so while the record
#   store is usable this instance also claims ready jobs straight from the
#   record store (SELECT ... FOR UPDATE SKIP LOCKED); nothing is stranded. A
#   job can therefore sit in two queues at once (Redis after a reconcile and
#   some instance's memory); the record store's conditional queued -> running
#   transition on claim decides which delivery wins.
# * Record store usable: enqueue is accepted and acks are written through.
#   Unusable: acks are buffered and retried in both durabilities; new jobs are
#   refused with UNAVAILABLE under durability=strict, and accepted into the
#   queue tier plus an outbox under durability=buffered. RECOVERING counts as
#   unusable so that everything written during the outage and the recovery
#   goes through the same buffers and is applied in order by the reconcile.
#
# What reconciling means is in reconcile_plan(). When the queue tier's route
# flips from memory back to Redis, the runtime also moves whatever is left in
# its memory queue into Redis (adds by job id are idempotent): jobs enqueued
# after the reconcile's scan were only in memory and the record store.


class Health(enum.Enum):
    """The health of one backend. See the theory of operation above."""

    HEALTHY = "healthy"
    SUSPECT = "suspect"
    DOWN = "down"
    RECOVERING = "recovering"


class BackendRole(enum.Enum):
    """What a backend is used for; it decides what reconciling it means."""

    QUEUE_TIER = "queue_tier"
    RECORD_STORE = "record_store"


class ReconcileStep(enum.Enum):
    """One step of a reconcile, run in the order given by :func:`reconcile_plan`."""

    #: Queue tier: add to Redis every job the record store holds as queued or
    #: scheduled but Redis lacks (missed during the outage, or lost with Redis's
    #: data). Adds are by job id and idempotent.
    REQUEUE_MISSING_JOBS = "requeue_missing_jobs"
    #: Record store: apply the outbox of jobs accepted under
    #: durability=buffered, oldest first (empty under durability=strict).
    FLUSH_OUTBOX = "flush_outbox"
    #: Record store: apply the acks buffered while the store was unusable,
    #: oldest first, with the usual lease fencing.
    FLUSH_BUFFERED_ACKS = "flush_buffered_acks"


_RECONCILE_PLANS: Final[Mapping[BackendRole, tuple[ReconcileStep, ...]]] = MappingProxyType(
    {
        BackendRole.QUEUE_TIER: (ReconcileStep.REQUEUE_MISSING_JOBS,),
        # The outbox goes first because a buffered ack may concern a job that
        # so far exists only in the outbox.
        BackendRole.RECORD_STORE: (ReconcileStep.FLUSH_OUTBOX, ReconcileStep.FLUSH_BUFFERED_ACKS),
    }
)


def reconcile_plan(role: BackendRole) -> tuple[ReconcileStep, ...]:
    """What to repair, in order, before a recovering backend is trusted again.

    Args:
        role: what the backend is used for.

    Returns:
        The steps, to be run one after the other. The same plan is carried by
        :class:`StartReconcile`.
    """
    return _RECONCILE_PLANS[role]


class InvalidHealthTransition(StackduckError):
    """The runtime reported a fact that the health machine cannot have caused.

    This is a bug in the caller. It is raised before anything changes.

    Attributes:
        backend_name: the machine's backend.
        state: the machine's state when the event arrived.
        event_type: the name of the event's class.
        detail: why the event was refused.
    """

    def __init__(self, backend_name: str, state: Health, event_type: str, detail: str) -> None:
        super().__init__(
            f"{event_type} is not allowed for backend {backend_name!r} "
            f"in state {state.value!r}: {detail}"
        )
        self.backend_name = backend_name
        self.state = state
        self.event_type = event_type
        self.detail = detail


################################################################
# Policy
################################################################


def _check_positive_seconds(
    _instance: object, attribute: attrs.Attribute[float], value: float
) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{attribute.name} must be a number of seconds, got {value!r}")
    # `not (value > 0)` also refuses NaN; infinity would freeze probing.
    if not (0 < value < float("inf")):
        raise ValueError(f"{attribute.name} must be positive and finite, got {value!r}")


def _check_count(_instance: object, attribute: attrs.Attribute[int], value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{attribute.name} must be an integer, got {value!r}")
    if value < 1:
        raise ValueError(f"{attribute.name} must be at least 1, got {value!r}")


@final
@attrs.frozen
class HealthPolicy:
    """Thresholds and probe timing of a :class:`BackendHealth`.

    Attributes:
        failures_to_down: consecutive failures (operation errors, timeouts or
            failed probes) that take a backend DOWN. The first one already
            makes it SUSPECT.
        successes_to_recover: consecutive successful probes a RECOVERING
            backend needs, counting the one that ended DOWN, before it can be
            HEALTHY (its reconcile must have finished too).
        probe_base: seconds before the first probe, and between probes while
            SUSPECT or RECOVERING.
        probe_cap: the longest wait between probes while DOWN.

    Raises:
        TypeError, ValueError: on construction, for a value out of range.
    """

    failures_to_down: int = attrs.field(default=3, validator=_check_count)
    successes_to_recover: int = attrs.field(default=2, validator=_check_count)
    probe_base: float = attrs.field(default=0.5, validator=_check_positive_seconds)
    probe_cap: float = attrs.field(default=30.0, validator=_check_positive_seconds)

    @probe_cap.validator
    def _check_cap_not_below_base(self, _attribute: attrs.Attribute[float], value: float) -> None:
        if value < self.probe_base:
            raise ValueError(
                f"probe_cap ({value!r}) must not be below probe_base ({self.probe_base!r})"
            )


DEFAULT_HEALTH_POLICY: Final = HealthPolicy()


def probe_delay(failed_probes: int, policy: HealthPolicy = DEFAULT_HEALTH_POLICY) -> float:
    """The wait before the next probe of a DOWN backend.

    Args:
        failed_probes: probes failed since the backend was last HEALTHY.
        policy: supplies probe_base and probe_cap.

    Returns:
        ``min(probe_base * 2 ** failed_probes, probe_cap)``.
    """
    # Doubling step by step instead of `2 ** n` keeps a huge count from
    # overflowing a float; the loop stops as soon as the cap is reached, so it
    # runs at most log2(cap / base) + 1 times.
    delay = policy.probe_base
    for _ in range(failed_probes):
        if delay >= policy.probe_cap:
            break
        delay *= 2.0
    return min(delay, policy.probe_cap)


################################################################
# Events (inputs: facts, in the past tense). Don't subclass these.
################################################################


@final
@attrs.frozen
class OpSucceeded:
    """An operation on the backend succeeded.

    Attributes:
        now: when the outcome was observed.
        started_at: when the operation started, if known. Outcomes of
            operations started before the current state was entered are stale
            (see the theory of operation).
    """

    now: float
    started_at: float | None = None


@final
@attrs.frozen
class OpFailed:
    """An operation on the backend raised an error (connection refused, reset, ...).

    Attributes:
        now: when the outcome was observed.
        started_at: when the operation started, if known.
    """

    now: float
    started_at: float | None = None


@final
@attrs.frozen
class OpTimedOut:
    """An operation on the backend did not finish within its timeout.

    Attributes:
        now: when the outcome was observed.
        started_at: when the operation started, if known.
    """

    now: float
    started_at: float | None = None


@final
@attrs.frozen
class ProbeSucceeded:
    """A health probe (PING, SELECT 1) succeeded.

    Attributes:
        now: when the outcome was observed.
    """

    now: float


@final
@attrs.frozen
class ProbeFailed:
    """A health probe failed or timed out.

    Attributes:
        now: when the outcome was observed.
    """

    now: float


@final
@attrs.frozen
class ReconcileFinished:
    """The reconcile started by ``StartReconcile(reconcile_id=...)`` completed every step.

    Attributes:
        now: when it completed.
        reconcile_id: the id from the StartReconcile effect.
    """

    now: float
    reconcile_id: int


HealthEvent: TypeAlias = (
    OpSucceeded | OpFailed | OpTimedOut | ProbeSucceeded | ProbeFailed | ReconcileFinished
)

#: Every event class, in a stable order (for tests and diagrams).
HEALTH_EVENT_TYPES: Final[tuple[type[HealthEvent], ...]] = (
    OpSucceeded,
    OpFailed,
    OpTimedOut,
    ProbeSucceeded,
    ProbeFailed,
    ReconcileFinished,
)


################################################################
# Effects (outputs: commands, imperative). Don't subclass these.
################################################################


@final
@attrs.frozen
class HealthChanged:
    """Log the change, count it in metrics and recompute :func:`route`.

    Attributes:
        backend_name: the backend whose health changed.
        old: the state before.
        new: the state after.
        now: the time of the event that caused the change.
        cause: the name of that event's class, for the log line.
    """

    backend_name: str
    old: Health
    new: Health
    now: float
    cause: str


@final
@attrs.frozen
class StartReconcile:
    """Run these steps against the backend, then report ``ReconcileFinished(now, reconcile_id)``.

    Report failures of the steps' operations as OpFailed/OpTimedOut instead.
    Cancel (and wait for) any earlier reconcile of the same backend first.

    Attributes:
        backend_name: the backend to reconcile.
        reconcile_id: echo it in ReconcileFinished.
        steps: :func:`reconcile_plan` for the backend's role.
    """

    backend_name: str
    reconcile_id: int
    steps: tuple[ReconcileStep, ...]


HealthEffect: TypeAlias = HealthChanged | StartReconcile


################################################################
# The transition table
################################################################

_Action: TypeAlias = "Callable[[BackendHealth, HealthEvent], Health]"


@final
@attrs.frozen
class HealthTransition:
    """One row of :data:`HEALTH_TRANSITIONS`.

    Attributes:
        targets: every state the row can lead to (the action picks one,
            depending on counters and staleness).
        note: the row's semantics in one line, for docs and diagrams.
        action: updates the machine's counters and returns the new state.
            Internal to :class:`BackendHealth`; call ``handle()`` instead.
    """

    targets: frozenset[Health]
    note: str
    action: _Action = attrs.field(repr=False)


# Actions update the counters that belong to the row and return the new state.
# What happens on *entering* a state (resets, StartReconcile) is in
# BackendHealth._enter, so it is the same whichever row led there.


def _stay(machine: BackendHealth, _event: HealthEvent) -> Health:
    return machine._state


def _become_healthy(_machine: BackendHealth, _event: HealthEvent) -> Health:
    return Health.HEALTHY


def _started_before_state(machine: BackendHealth, event: HealthEvent) -> bool:
    assert isinstance(event, (OpSucceeded, OpFailed, OpTimedOut))
    return event.started_at is not None and event.started_at < machine._entered_at


def _clear_suspicion(machine: BackendHealth, event: HealthEvent) -> Health:
    if _started_before_state(machine, event):
        return Health.SUSPECT
    return Health.HEALTHY


def _count_failure(machine: BackendHealth, _event: HealthEvent) -> Health:
    machine._consecutive_failures += 1
    if machine._consecutive_failures >= machine._policy.failures_to_down:
        return Health.DOWN
    return Health.SUSPECT


def _back_off(machine: BackendHealth, _event: HealthEvent) -> Health:
    machine._failed_probes += 1
    return Health.DOWN


def _start_recovery(_machine: BackendHealth, _event: HealthEvent) -> Health:
    return Health.RECOVERING


def _relapse_unless_stale(machine: BackendHealth, event: HealthEvent) -> Health:
    if _started_before_state(machine, event):
        return Health.RECOVERING
    return _back_off(machine, event)


def _recovered_if_complete(machine: BackendHealth) -> Health:
    if machine._reconciled and machine._recovery_successes >= machine._policy.successes_to_recover:
        return Health.HEALTHY
    return Health.RECOVERING


def _count_recovery_probe(machine: BackendHealth, _event: HealthEvent) -> Health:
    machine._recovery_successes += 1
    return _recovered_if_complete(machine)


def _finish_reconcile(machine: BackendHealth, event: HealthEvent) -> Health:
    assert isinstance(event, ReconcileFinished)
    if event.reconcile_id != machine._pending_reconcile:
        # Overtaken by a relapse and a newer reconcile, or reported twice.
        return Health.RECOVERING
    machine._pending_reconcile = None
    machine._reconciled = True
    return _recovered_if_complete(machine)


def _row(action: _Action, note: str, *targets: Health) -> HealthTransition:
    return HealthTransition(targets=frozenset(targets), note=note, action=action)


_H, _S, _D, _R = Health.HEALTHY, Health.SUSPECT, Health.DOWN, Health.RECOVERING

#: Every allowed (state, event type) pair. A pair that is missing is refused
#: with InvalidHealthTransition and changes nothing.
HEALTH_TRANSITIONS: Final[Mapping[tuple[Health, type[HealthEvent]], HealthTransition]] = (
    MappingProxyType(
        {
            # HEALTHY
            (_H, OpSucceeded): _row(_stay, "business as usual", _H),
            (_H, OpFailed): _row(
                _count_failure, "first failure: suspect (down if failures_to_down is 1)", _S, _D
            ),
            (_H, OpTimedOut): _row(_count_failure, "a timeout counts as a failure", _S, _D),
            (_H, ProbeSucceeded): _row(_stay, "late answer to a probe sent while suspect", _H),
            (_H, ProbeFailed): _row(
                _count_failure, "a failed probe, even a late one, counts as a failure", _S, _D
            ),
            # SUSPECT
            (_S, OpSucceeded): _row(
                _clear_suspicion, "healthy again, unless the op started before the trouble", _H, _S
            ),
            (_S, OpFailed): _row(
                _count_failure, "one more consecutive failure; down at failures_to_down", _S, _D
            ),
            (_S, OpTimedOut): _row(
                _count_failure, "one more consecutive failure; down at failures_to_down", _S, _D
            ),
            (_S, ProbeSucceeded): _row(_become_healthy, "the probe answered: healthy again", _H),
            (_S, ProbeFailed): _row(
                _count_failure, "one more consecutive failure; down at failures_to_down", _S, _D
            ),
            # DOWN: only probes count; ops were started before the backend went down.
            (_D, OpSucceeded): _row(_stay, "late outcome of an op started earlier: ignored", _D),
            (_D, OpFailed): _row(_stay, "late outcome of an op started earlier: ignored", _D),
            (_D, OpTimedOut): _row(_stay, "late outcome of an op started earlier: ignored", _D),
            (_D, ProbeSucceeded): _row(
                _start_recovery, "it answers: recover and start the reconcile", _R
            ),
            (_D, ProbeFailed): _row(_back_off, "still down: the probe backoff grows", _D),
            (_D, ReconcileFinished): _row(
                _stay, "a reconcile overtaken by the relapse: ignored", _D
            ),
            # RECOVERING
            (_R, OpSucceeded): _row(
                _stay, "ops prove nothing here; probes and the reconcile decide", _R
            ),
            (_R, OpFailed): _row(
                _relapse_unless_stale,
                "relapse (backoff grows), unless the op predates recovery",
                _D,
                _R,
            ),
            (_R, OpTimedOut): _row(
                _relapse_unless_stale,
                "relapse (backoff grows), unless the op predates recovery",
                _D,
                _R,
            ),
            (_R, ProbeSucceeded): _row(
                _count_recovery_probe, "healthy once reconciled with enough probes", _H, _R
            ),
            (_R, ProbeFailed): _row(_back_off, "relapse: down again, the backoff grows", _D),
            (_R, ReconcileFinished): _row(
                _finish_reconcile, "healthy if enough probes; a stale id is ignored", _H, _R
            ),
        }
    )
)


################################################################
# The machine
################################################################


@final
@attrs.frozen
class HealthStatistics:
    """A snapshot of a :class:`BackendHealth`, for the health RPC, metrics and tests.

    Attributes:
        backend_name: the backend.
        role: what it is used for.
        state: its health.
        consecutive_failures: failures counted towards failures_to_down since
            the backend was last HEALTHY (frozen while DOWN or RECOVERING).
        failed_probes: probes failed since the backend was last HEALTHY; the
            exponent of the probe backoff.
        recovery_successes: consecutive successful probes in the current
            RECOVERING spell (0 in other states).
        probes: probe results received, in total.
        reconciles_started: reconciles started, in total (the last id issued).
        pending_reconcile: the id of the reconcile whose report is awaited.
        reconciled: whether the current RECOVERING spell's reconcile finished.
        transitions: changes of state, in total.
        last_change_at: when the state last changed (None: never).
        next_probe_at: as returned by :meth:`BackendHealth.next_probe_at`.
    """

    backend_name: str
    role: BackendRole
    state: Health
    consecutive_failures: int
    failed_probes: int
    recovery_successes: int
    probes: int
    reconciles_started: int
    pending_reconcile: int | None
    reconciled: bool
    transitions: int
    last_change_at: float | None
    next_probe_at: float | None


class BackendHealth:
    """The health state machine of one backend. Starts HEALTHY.

    Args:
        name: the backend's name in effects, logs and errors ("redis", "postgres").
        role: what the backend is used for; decides the reconcile plan.
        policy: thresholds and probe timing.
    """

    def __init__(
        self, name: str, role: BackendRole, policy: HealthPolicy = DEFAULT_HEALTH_POLICY
    ) -> None:
        self._name = name
        self._role = role
        self._policy = policy
        self._state = Health.HEALTHY
        self._consecutive_failures = 0
        self._failed_probes = 0
        self._recovery_successes = 0
        self._probes = 0
        self._reconciles_started = 0
        self._pending_reconcile: int | None = None
        self._reconciled = False
        self._transitions = 0
        # -inf: nothing started before the initial state was entered.
        self._entered_at = float("-inf")
        self._probe_clock = float("-inf")
        self._latest_now = float("-inf")

    @property
    def name(self) -> str:
        """The backend's name."""
        return self._name

    @property
    def role(self) -> BackendRole:
        """What the backend is used for."""
        return self._role

    @property
    def policy(self) -> HealthPolicy:
        """The thresholds and probe timing in force."""
        return self._policy

    @property
    def state(self) -> Health:
        """The current health."""
        return self._state

    def handle(self, event: HealthEvent) -> list[HealthEffect]:
        """Apply one reported fact.

        Args:
            event: what happened, with its time.

        Returns:
            The effects to carry out, in order: HealthChanged if the state
            changed, then StartReconcile if the backend entered RECOVERING.

        Raises:
            InvalidHealthTransition: the pair (state, type of event) is not in
                :data:`HEALTH_TRANSITIONS`, or a ReconcileFinished names a reconcile
                that was never started. Nothing changes.
        """
        transition = HEALTH_TRANSITIONS.get((self._state, type(event)))
        if transition is None:
            raise InvalidHealthTransition(
                self._name, self._state, type(event).__name__, "no such row in HEALTH_TRANSITIONS"
            )
        if isinstance(event, ReconcileFinished) and not (
            1 <= event.reconcile_id <= self._reconciles_started
        ):
            raise InvalidHealthTransition(
                self._name,
                self._state,
                type(event).__name__,
                f"reconcile {event.reconcile_id} was never started",
            )
        # Validation is over: from here on the event is applied in full.
        old = self._state
        new = transition.action(self, event)
        assert new in transition.targets, (old, type(event), new)
        self._latest_now = max(self._latest_now, event.now)
        if isinstance(event, (ProbeSucceeded, ProbeFailed)):
            self._probes += 1
            self._probe_clock = event.now
        if new is old:
            return []
        effects: list[HealthEffect] = [
            HealthChanged(self._name, old, new, event.now, type(event).__name__)
        ]
        self._enter(new, event.now)
        if new is Health.RECOVERING:
            effects.append(
                StartReconcile(self._name, self._reconciles_started, reconcile_plan(self._role))
            )
        return effects

    def _enter(self, new: Health, now: float) -> None:
        self._state = new
        self._transitions += 1
        self._entered_at = now
        self._probe_clock = now
        if new is Health.HEALTHY:
            self._consecutive_failures = 0
            self._failed_probes = 0
            self._recovery_successes = 0
            self._reconciled = False
        elif new is Health.DOWN:
            # Whatever reconcile is running now reports too late to count.
            self._pending_reconcile = None
            self._recovery_successes = 0
            self._reconciled = False
        elif new is Health.RECOVERING:
            # The probe that ended DOWN is the first success.
            self._recovery_successes = 1
            self._reconciled = False
            self._reconciles_started += 1
            self._pending_reconcile = self._reconciles_started
        # SUSPECT has nothing to reset: its counter was just incremented.

    def next_probe_at(self) -> float | None:
        """When the runtime should run the next probe.

        Returns:
            None while HEALTHY. Otherwise a time that is never earlier than
            the latest ``now`` reported: a probe that is overdue is due at once.
        """
        if self._state is Health.HEALTHY:
            return None
        if self._state is Health.DOWN:
            delay = probe_delay(self._failed_probes, self._policy)
        else:
            delay = self._policy.probe_base
        return max(self._probe_clock + delay, self._latest_now)

    def statistics(self) -> HealthStatistics:
        """A frozen snapshot of the machine."""
        return HealthStatistics(
            backend_name=self._name,
            role=self._role,
            state=self._state,
            consecutive_failures=self._consecutive_failures,
            failed_probes=self._failed_probes,
            recovery_successes=self._recovery_successes,
            probes=self._probes,
            reconciles_started=self._reconciles_started,
            pending_reconcile=self._pending_reconcile,
            reconciled=self._reconciled,
            transitions=self._transitions,
            last_change_at=self._entered_at if self._transitions else None,
            next_probe_at=self.next_probe_at(),
        )


################################################################
# Routing
################################################################


class Durability(enum.Enum):
    """What happens to new jobs while the record store is unusable."""

    #: Refuse them with UNAVAILABLE: an accepted job is always in the record store.
    STRICT = "strict"
    #: Accept them into the queue tier plus an outbox, flushed in order on recovery.
    #: A crash of this instance before the flush loses them.
    BUFFERED = "buffered"


class QueueTier(enum.Enum):
    """Where ready jobs are queued and claimed from."""

    REDIS = "redis"
    MEMORY = "memory"


class EnqueueMode(enum.Enum):
    """What to do with a new job."""

    #: Write it to the record store (group commit), then to the queue tier.
    ACCEPT = "accept"
    #: Refuse it with gRPC UNAVAILABLE and :attr:`Route.reason` as the message.
    REJECT_UNAVAILABLE = "reject_unavailable"
    #: Put it in the queue tier and append it to the outbox.
    BUFFER = "buffer"


@final
@attrs.frozen
class Route:
    """Which storage path requests take, given the backends' health.

    Attributes:
        queue: the queue tier to enqueue to and claim from.
        claim_record_store: also claim ready jobs straight from the record
            store, because Redis is configured but unusable and other
            instances' memory queues are out of reach.
        enqueue: how to handle new jobs.
        buffer_acks: buffer acks (and other job state changes) and retry them
            later instead of writing them through.
        reason: a human explanation for logs, the health RPC and the
            UNAVAILABLE message.
    """

    queue: QueueTier
    claim_record_store: bool
    enqueue: EnqueueMode
    buffer_acks: bool
    reason: str


_USABLE: Final = frozenset({Health.HEALTHY, Health.SUSPECT})

_STORE_REASONS: Final[Mapping[tuple[Health, Durability], str]] = MappingProxyType(
    {
        (_H, Durability.STRICT): "record store is healthy",
        (_H, Durability.BUFFERED): "record store is healthy",
        (_S, Durability.STRICT): "record store is suspect (recent failures) but still in use",
        (_S, Durability.BUFFERED): "record store is suspect (recent failures) but still in use",
        (_D, Durability.STRICT): (
            "record store is down; durability=strict refuses new jobs "
            "and buffers acks until it recovers"
        ),
        (_D, Durability.BUFFERED): (
            "record store is down; durability=buffered accepts new jobs into an outbox "
            "and buffers acks, applied in order when it recovers"
        ),
        (_R, Durability.STRICT): (
            "record store is recovering; durability=strict refuses new jobs "
            "until the buffered acks are applied"
        ),
        (_R, Durability.BUFFERED): (
            "record store is recovering; new jobs and acks still go to the outbox "
            "until it is applied"
        ),
    }
)

_QUEUE_REASONS: Final[Mapping[Health | None, str]] = MappingProxyType(
    {
        None: "queue tier is in memory (no redis configured)",
        _H: "redis is healthy",
        _S: "redis is suspect (recent failures) but still in use",
        _D: "redis is down; queue tier switched to memory",
        _R: "redis is recovering; memory stays the queue tier until redis is reconciled",
    }
)


def route(queue_tier: Health | None, record_store: Health, durability: Durability) -> Route:
    """Decide the storage path from the backends' health.

    Args:
        queue_tier: the health of Redis, or None when Redis is not configured.
        record_store: the health of the record store.
        durability: the configured durability.

    Returns:
        The route. Recompute it on every HealthChanged.
    """
    store_usable = record_store in _USABLE
    reasons = [_STORE_REASONS[record_store, durability], _QUEUE_REASONS[queue_tier]]
    if queue_tier is None:
        queue, claim_record_store = QueueTier.MEMORY, False
    elif queue_tier in _USABLE:
        queue, claim_record_store = QueueTier.REDIS, False
    else:
        queue, claim_record_store = QueueTier.MEMORY, store_usable
        reasons.append(
            "jobs held by other instances are claimed from the record store"
            if store_usable
            else "only jobs in this instance's memory can be delivered"
        )
    if store_usable:
        enqueue = EnqueueMode.ACCEPT
    elif durability is Durability.STRICT:
        enqueue = EnqueueMode.REJECT_UNAVAILABLE
    else:
        enqueue = EnqueueMode.BUFFER
    return Route(
        queue=queue,
        claim_record_store=claim_record_store,
        enqueue=enqueue,
        buffer_acks=not store_usable,
        reason="; ".join(reasons),
    )
