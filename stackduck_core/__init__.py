"""Stackduck's sans-IO core: every rule of the job queue, and no I/O.

The core is pure, synchronous and deterministic: time (``now``, UTC epoch
seconds) and ids come in as arguments, decisions come out as values. It imports
nothing from trio, purerpc, redis, psycopg, sqlite3, time, random, os or socket
(``tests/core/test_purity.py`` enforces it), so any event loop can drive it --
see ``examples/asyncio_embedded.py``.

Modules (all private; this package re-exports the public names):

* ``_job``: the job record, enqueue requests, validation, defaults, limits;
* ``_states``: the lifecycle transition table (``apply``);
* ``_backoff``: retry delays;
* ``_ordering``: priority/FIFO order keys and their Redis score encoding;
* ``_queue``: the in-memory queue engine (``QueueCore``);
* ``_dispatch``: fair assignment of ready jobs to worker streams;
* ``_ratelimit``: GCRA rate limiting per job type;
* ``_failover``: backend health machine and routing decisions.
"""

from __future__ import annotations

from ._backoff import BACKOFF_CAP as BACKOFF_CAP
from ._backoff import retry_delay as retry_delay
from ._claimgate import ClaimGate as ClaimGate
from ._dispatch import Dispatcher as Dispatcher
from ._dispatch import DispatcherStats as DispatcherStats
from ._dispatch import StreamInfo as StreamInfo
from ._errors import StackduckError as StackduckError
from ._failover import DEFAULT_HEALTH_POLICY as DEFAULT_HEALTH_POLICY
from ._failover import HEALTH_EVENT_TYPES as HEALTH_EVENT_TYPES
from ._failover import HEALTH_TRANSITIONS as HEALTH_TRANSITIONS
from ._failover import BackendHealth as BackendHealth
from ._failover import BackendRole as BackendRole
from ._failover import Durability as Durability
from ._failover import EnqueueMode as EnqueueMode
from ._failover import Health as Health
from ._failover import HealthChanged as HealthChanged
from ._failover import HealthEffect as HealthEffect
from ._failover import HealthEvent as HealthEvent
from ._failover import HealthPolicy as HealthPolicy
from ._failover import HealthStatistics as HealthStatistics
from ._failover import HealthTransition as HealthTransition
from ._failover import InvalidHealthTransition as InvalidHealthTransition
from ._failover import OpFailed as OpFailed
from ._failover import OpSucceeded as OpSucceeded
from ._failover import OpTimedOut as OpTimedOut
from ._failover import ProbeFailed as ProbeFailed
from ._failover import ProbeSucceeded as ProbeSucceeded
from ._failover import QueueTier as QueueTier
from ._failover import ReconcileFinished as ReconcileFinished
from ._failover import ReconcileStep as ReconcileStep
from ._failover import Route as Route
from ._failover import StartReconcile as StartReconcile
from ._failover import probe_delay as probe_delay
from ._failover import reconcile_plan as reconcile_plan
from ._failover import route as route
from ._job import DEFAULT_DELAY as DEFAULT_DELAY
from ._job import DEFAULT_MAX_RETRIES as DEFAULT_MAX_RETRIES
from ._job import DEFAULT_PAYLOAD as DEFAULT_PAYLOAD
from ._job import DEFAULT_PRIORITY as DEFAULT_PRIORITY
from ._job import MAX_ID_LENGTH as MAX_ID_LENGTH
from ._job import Base as Base
from ._job import EnqueueRequest as EnqueueRequest
from ._job import Job as Job
from ._job import JobSpec as JobSpec
from ._job import Limits as Limits
from ._job import Rejected as Rejected
from ._job import RejectReason as RejectReason
from ._job import Status as Status
from ._job import clip_error as clip_error
from ._job import parse_time as parse_time
from ._job import validate_dead_selection as validate_dead_selection
from ._job import validate_enqueue as validate_enqueue
from ._job import validate_job_id as validate_job_id
from ._job import validate_job_type as validate_job_type
from ._job import validate_lease_seconds as validate_lease_seconds
from ._job import validate_prefetch as validate_prefetch
from ._limits import MAX_BURST as MAX_BURST
from ._limits import MAX_RATE as MAX_RATE
from ._limits import MAX_RUNNING as MAX_RUNNING
from ._limits import MIN_RATE as MIN_RATE
from ._limits import Allowance as Allowance
from ._limits import Limiter as Limiter
from ._limits import TypeLimit as TypeLimit
from ._limits import limit_from_wire as limit_from_wire
from ._limits import parse_limits as parse_limits
from ._ordering import EPOCH as EPOCH
from ._ordering import MAX_SEQ as MAX_SEQ
from ._ordering import SEQ_BITS as SEQ_BITS
from ._ordering import Placement as Placement
from ._ordering import SequenceClock as SequenceClock
from ._ordering import decode_score as decode_score
from ._ordering import order_key as order_key
from ._ordering import placement as placement
from ._ordering import ready_seq as ready_seq
from ._ordering import score as score
from ._queue import DEFAULT_LEASE_SECONDS as DEFAULT_LEASE_SECONDS
from ._queue import Delivery as Delivery
from ._queue import QueueCore as QueueCore
from ._queue import QueueStats as QueueStats
from ._queue import TypeStats as TypeStats
from ._ratelimit import GcraDecision as GcraDecision
from ._ratelimit import RateLimit as RateLimit
from ._ratelimit import RateLimiter as RateLimiter
from ._ratelimit import gcra as gcra
from ._ratelimit import gcra_allowance as gcra_allowance
from ._retention import Retention as Retention
from ._states import EVENT_TYPES as EVENT_TYPES
from ._states import TRANSITIONS as TRANSITIONS
from ._states import Cancelled as Cancelled
from ._states import Claimed as Claimed
from ._states import Completed as Completed
from ._states import Enqueued as Enqueued
from ._states import Event as Event
from ._states import Failed as Failed
from ._states import LeaseExpired as LeaseExpired
from ._states import LeaseExtended as LeaseExtended
from ._states import LifecyclePolicy as LifecyclePolicy
from ._states import PendingWrite as PendingWrite
from ._states import Promoted as Promoted
from ._states import Purged as Purged
from ._states import Recovery as Recovery
from ._states import Released as Released
from ._states import Requeued as Requeued
from ._states import WorkerDetached as WorkerDetached
from ._states import apply as apply
from ._states import merge_chain as merge_chain
from ._states import needs_new_seq as needs_new_seq
from ._states import new_job as new_job
from ._states import plan_commit as plan_commit
from ._states import recover_claim as recover_claim
from ._states import writes_over as writes_over

__version__ = "0.2.0"
