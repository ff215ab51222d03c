"""The gRPC service: thin adapters from protobuf messages to the broker.

Each method decodes its request, calls the broker, and encodes the answer or
raises :class:`~stackduck_trio._rpc.RpcError` with a precise status. Method
names are the RPC names of ``proto/stackduck.proto``. No rule lives here:
validation is the core's (``validate_enqueue``), and a core rejection maps
to a status through :func:`~stackduck_trio._broker.rejected_to_status`.
"""

from __future__ import annotations

import logging
import random
from collections.abc import AsyncIterator, Sequence
from typing import Final

import trio
from purerpc.grpclib.status import StatusCode

from stackduck_core import (
    EnqueueMode,
    EnqueueRequest,
    Job,
    Limits,
    Rejected,
    limit_from_wire,
    validate_dead_selection,
    validate_job_id,
    validate_job_type,
    validate_lease_seconds,
    validate_prefetch,
)

from ._broker import (
    AckRequest,
    Broker,
    Duplicate,
    OutcomeUnknown,
    Unavailable,
    rejected_to_status,
)
from ._proto import health_pb2
from ._proto import stackduck_pb2 as pb
from ._rpc import CallContext, RpcError

log = logging.getLogger("stackduck.service")

#: Spreads the streams' heartbeats (not a secret: random.Random is enough).
_jitter = random.Random()

MAX_BATCH: Final = 10_000
MAX_LIST: Final = 1000
#: Payload + error bytes per ListDeadJobs page: under grpcio's default 4 MiB
#: receive limit, so any client can page through dead letters of any size.
MAX_PAGE_BYTES: Final = 3 * 1024 * 1024
#: Per-item codes in batch answers (google.rpc.Code numbers).
_CODE_NUMBER: Final = {name: StatusCode[name].value for name in StatusCode.__members__}


def _seconds(value: float | None) -> int:
    return 0 if value is None else int(value)


def job_to_pb(job: Job, notification: str = "") -> pb.GrpcJob:
    """Encode a job record as the wire ``GrpcJob`` (times in Unix seconds)."""
    return pb.GrpcJob(
        id=job.id,
        job_type=job.job_type,
        payload=job.payload,
        status=job.status.value,
        priority=job.priority,
        retry_count=job.retry_count,
        max_retries=job.max_retries,
        error_message=job.error_message,
        delay=job.delay,
        scheduled_at=_seconds(job.scheduled_at),
        started_at=_seconds(job.started_at),
        completed_at=_seconds(job.completed_at),
        created_at=_seconds(job.created_at),
        updated_at=_seconds(job.updated_at),
        lease_id=job.lease_id or "",
        attempt=job.attempt,
        lease_expires_at_ms=0 if job.lease_expires_at is None else int(job.lease_expires_at * 1000),
        worker_id=job.worker_id or "",
        idempotency_key=job.idempotency_key or "",
    )


def enqueue_request(message: pb.EnqueueJobRequest) -> EnqueueRequest:
    """Decode an enqueue request, keeping "omitted" apart from an explicit 0."""
    return EnqueueRequest(
        job_type=message.job_type,
        payload=message.payload or None,
        priority=message.priority if message.HasField("priority") else None,
        delay=message.delay if message.HasField("delay") else None,
        max_retries=message.max_retries if message.HasField("max_retries") else None,
        scheduled_at=message.scheduled_at or None,
        idempotency_key=message.idempotency_key or None,
    )


def _raise_for(result: Job | Rejected) -> Job:
    if isinstance(result, Rejected):
        status, message = rejected_to_status(result)
        raise RpcError(StatusCode[status], message)
    return result


def _item(result: Job | Duplicate | Rejected) -> pb.ItemResult:
    if isinstance(result, Rejected):
        status, message = rejected_to_status(result)
        return pb.ItemResult(code=_CODE_NUMBER[status], message=message)
    if isinstance(result, Duplicate):
        job = result.job
        return pb.ItemResult(job_id=job.id, code=0, status=job.status.value, duplicate=True)
    return pb.ItemResult(job_id=result.id, code=0, status=result.status.value)


def _optional(message: object, field: str) -> int | None:
    """A proto3 ``optional`` scalar, or ``None`` when the client omitted it."""
    if not message.HasField(field):  # type: ignore[attr-defined]
        return None
    value: int = getattr(message, field)
    return value


def _lease_length(message: object, limits: Limits) -> float | None:
    lease = validate_lease_seconds(_optional(message, "lease_seconds"), limits)
    if isinstance(lease, Rejected):
        raise RpcError(StatusCode.INVALID_ARGUMENT, lease.message)
    return None if lease is None else float(lease)


def _lease_or_none(lease_id: str) -> str | None:
    return lease_id or None


class StackDuckService:
    """Implementation of ``stackduck.StackDuckService``.

    Args:
        broker: the instance's broker.
        heartbeat_interval: seconds between heartbeat messages on idle
            ConsumeJobs streams (writes to a dead peer fail, and clients use
            them to notice a dead server).
    """

    def __init__(self, broker: Broker, *, heartbeat_interval: float = 2.0) -> None:
        self.broker = broker
        self.heartbeat_interval = heartbeat_interval

    # -- original RPCs ----------------------------------------------------------

    async def EnqueueJob(
        self, request: pb.EnqueueJobRequest, ctx: CallContext
    ) -> pb.EnqueueJobResponse:
        (result,) = await self._call(self.broker.enqueue([enqueue_request(request)]))
        duplicate = isinstance(result, Duplicate)
        job = result.job if isinstance(result, Duplicate) else _raise_for(result)
        return pb.EnqueueJobResponse(
            job_id=job.id, success=True, status=job.status.value, duplicate=duplicate
        )

    async def ConsumeJobs(
        self, request: pb.ConsumeJobsRequest, ctx: CallContext
    ) -> AsyncIterator[pb.JobMessage]:
        job_types = list(request.job_types)
        if not job_types:
            raise RpcError(
                StatusCode.INVALID_ARGUMENT, "job_types: at least one job type is required"
            )
        for job_type in job_types:
            _check_type(job_type, self.broker.core.limits, "job_types")
        limits = self.broker.core.limits
        prefetch = validate_prefetch(_optional(request, "prefetch"), limits)
        if isinstance(prefetch, Rejected):
            raise RpcError(StatusCode.INVALID_ARGUMENT, prefetch.message)
        lease = _lease_length(request, limits)
        try:
            stream_id, jobs = self.broker.open_stream(
                worker_id=_worker_id(request.worker_id, ctx.peer),
                job_types=job_types,
                prefetch=prefetch,
                lease_seconds=lease,
            )
        except Unavailable as exc:
            raise RpcError(StatusCode.UNAVAILABLE, str(exc)) from exc
        heartbeat = pb.JobMessage(notification_type="Heartbeat")
        # The first heartbeat comes at a random point of the interval: streams
        # opened together (workers reconnecting after a restart) would otherwise
        # beat together forever, one burst of ~0.1 ms of CPU per stream that
        # every other call waits behind. (The 80 ms p99 seen with 1,000 streams
        # was the garbage collector's, not theirs: see _cli.py.)
        wait = self.heartbeat_interval * _jitter.uniform(0.1, 1.0)
        try:
            while True:
                job: Job | None = None
                with trio.move_on_after(wait):
                    job = await jobs.receive()
                wait = self.heartbeat_interval
                if job is None:
                    yield heartbeat
                    continue
                kind = "RetryJob" if job.retry_count or job.attempt > 1 else "NewJob"
                yield pb.JobMessage(job=job_to_pb(job), notification_type=kind)
        except trio.EndOfChannel:
            # The broker closed the stream (server shutdown): end it cleanly.
            raise RpcError(StatusCode.UNAVAILABLE, "the server is shutting down") from None
        finally:
            # Detach first, synchronously: no checkpoint may come between the
            # end of this stream and the requeue of its jobs.
            self.broker.close_stream(stream_id)
            jobs.close()

    async def CompleteJob(
        self, request: pb.CompleteJobRequest, ctx: CallContext
    ) -> pb.CompleteJobResponse:
        _require_id(request.job_id)
        _raise_for(
            await self._call(self.broker.complete(request.job_id, _lease_or_none(request.lease_id)))
        )
        return pb.CompleteJobResponse(success=True)

    async def FailJob(self, request: pb.FailJobRequest, ctx: CallContext) -> pb.FailJobResponse:
        job = await self._fail(request)
        return pb.FailJobResponse(success=True, status=job.status.value)

    async def RetryJob(self, request: pb.RetryJobRequest, ctx: CallContext) -> pb.RetryJobResponse:
        # The original's "internal" retry endpoint: the same rule as FailJob.
        job = await self._fail(request)
        return pb.RetryJobResponse(success=True, status=job.status.value)

    async def _fail(self, request: pb.FailJobRequest | pb.RetryJobRequest) -> Job:
        _require_id(request.job_id)
        lease_id = _lease_or_none(request.lease_id)
        failed = self.broker.fail(request.job_id, lease_id, request.error_message)
        return _raise_for(await self._call(failed))

    async def DequeueJob(
        self, request: pb.DequeueJobRequest, ctx: CallContext
    ) -> pb.DequeueJobResponse:
        _check_type(request.queue_name, self.broker.core.limits, "queue_name")
        lease = _lease_length(request, self.broker.core.limits)
        job = await self._call(
            self.broker.claim(
                request.queue_name,
                worker_id=_worker_id(request.worker_id, ctx.peer),
                lease_seconds=lease,
            )
        )
        if job is None:
            raise RpcError(StatusCode.NOT_FOUND, f"no ready job of type {request.queue_name!r}")
        return pb.DequeueJobResponse(job=job_to_pb(job), success=True)

    async def DequeueRetriedJob(
        self, request: pb.DequeueRetriedJobRequest, ctx: CallContext
    ) -> pb.DequeueRetriedJobResponse:
        raise RpcError(
            StatusCode.UNIMPLEMENTED,
            "DequeueRetriedJob was an internal endpoint of the original server; "
            "retries are delivered by ConsumeJobs and DequeueJob",
        )

    # -- additions -----------------------------------------------------------------

    async def EnqueueJobs(
        self, request: pb.EnqueueJobsRequest, ctx: CallContext
    ) -> pb.EnqueueJobsResponse:
        if len(request.jobs) > MAX_BATCH:
            raise RpcError(
                StatusCode.RESOURCE_EXHAUSTED, f"jobs: at most {MAX_BATCH} jobs per batch"
            )
        results = await self._call(self.broker.enqueue([enqueue_request(j) for j in request.jobs]))
        return pb.EnqueueJobsResponse(results=[_item(r) for r in results])

    async def AckJobs(self, request: pb.AckJobsRequest, ctx: CallContext) -> pb.AckJobsResponse:
        if len(request.acks) > MAX_BATCH:
            raise RpcError(StatusCode.RESOURCE_EXHAUSTED, f"acks: at most {MAX_BATCH} per batch")
        acks = [
            AckRequest(a.job_id, _lease_or_none(a.lease_id), a.failed, a.error_message, a.release)
            for a in request.acks
        ]
        results = await self._call(self.broker.ack_many(acks))
        return pb.AckJobsResponse(results=[_item(r) for r in results])

    async def GetJob(self, request: pb.GetJobRequest, ctx: CallContext) -> pb.GetJobResponse:
        _require_id(request.job_id)
        job = await self._call(self.broker.get(request.job_id))
        if job is None:
            raise RpcError(StatusCode.NOT_FOUND, f"no job with id {request.job_id}")
        return pb.GetJobResponse(job=job_to_pb(job))

    async def CancelJob(
        self, request: pb.CancelJobRequest, ctx: CallContext
    ) -> pb.CancelJobResponse:
        _require_id(request.job_id)
        job = _raise_for(await self._call(self.broker.cancel(request.job_id)))
        return pb.CancelJobResponse(job=job_to_pb(job))

    async def ExtendLease(
        self, request: pb.ExtendLeaseRequest, ctx: CallContext
    ) -> pb.ExtendLeaseResponse:
        _require_id(request.job_id)
        lease = _lease_length(request, self.broker.core.limits)
        job = _raise_for(
            await self._call(
                self.broker.extend(
                    request.job_id,
                    _lease_or_none(request.lease_id),
                    lease,
                )
            )
        )
        assert job.lease_expires_at is not None
        return pb.ExtendLeaseResponse(lease_expires_at_ms=int(job.lease_expires_at * 1000))

    async def ListDeadJobs(
        self, request: pb.ListDeadJobsRequest, ctx: CallContext
    ) -> pb.ListDeadJobsResponse:
        limit = request.limit or 100
        if not 1 <= limit <= MAX_LIST:
            raise RpcError(StatusCode.INVALID_ARGUMENT, f"limit must be between 1 and {MAX_LIST}")
        if request.job_type:
            _check_type(request.job_type, self.broker.core.limits)
        try:
            jobs, cursor = await self._call(
                self.broker.dead_page(
                    request.job_type or None, request.page_token, limit, MAX_PAGE_BYTES
                )
            )
        except ValueError:
            raise RpcError(
                StatusCode.INVALID_ARGUMENT, "page_token: not a token from this server"
            ) from None
        return pb.ListDeadJobsResponse(jobs=[job_to_pb(j) for j in jobs], next_page_token=cursor)

    async def _select(self, job_ids: Sequence[str], job_type: str) -> list[str]:
        rejected = validate_dead_selection(
            job_ids, job_type, self.broker.core.limits, max_ids=MAX_BATCH
        )
        if rejected is not None:
            _raise_for(rejected)
        # By type: at most MAX_BATCH per call (the answer lists every item);
        # callers repeat until the count is 0.
        ids: list[str] = await self._call(self.broker.dead_ids(list(job_ids), job_type, MAX_BATCH))
        return ids

    async def RequeueDeadJobs(
        self, request: pb.RequeueDeadJobsRequest, ctx: CallContext
    ) -> pb.RequeueDeadJobsResponse:
        ids = await self._select(request.job_ids, request.job_type)
        results = await self._call(self.broker.requeue(ids))
        return pb.RequeueDeadJobsResponse(
            results=[_item(r) for r in results],
            count=sum(1 for r in results if isinstance(r, Job)),
        )

    async def PurgeDeadJobs(
        self, request: pb.PurgeDeadJobsRequest, ctx: CallContext
    ) -> pb.PurgeDeadJobsResponse:
        ids = await self._select(request.job_ids, request.job_type)
        results = await self._call(self.broker.purge(ids))
        return pb.PurgeDeadJobsResponse(
            results=[_item(r) for r in results],
            count=sum(1 for r in results if isinstance(r, Job)),
        )

    async def GetStats(self, request: pb.GetStatsRequest, ctx: CallContext) -> pb.GetStatsResponse:
        stats = await self._call(self.broker.statistics())
        limits = await self._call(self.broker.limits())
        streams = self.broker.core.dispatcher.statistics()
        types = [
            pb.TypeStats(
                job_type=v.job_type,
                queued_p1=v.queued[0],
                queued_p2=v.queued[1],
                queued_p3=v.queued[2],
                scheduled=v.scheduled,
                running=v.running,
                dead=v.dead,
                paused=v.paused,
                workers=v.workers,
                completed=v.completed,
                failed=v.failed,
                retried=v.retried,
                rate_limit=v.rate_limit,
                rate_burst=v.rate_burst,
                max_running=v.max_running,
                throttled=v.throttled,
            )
            for v in self.broker.type_views(stats, limits)
        ]
        return pb.GetStatsResponse(
            types=types,
            workers=streams.streams,
            running=stats.running,
            dead=stats.dead,
            backends=[
                pb.BackendHealth(name=name, kind=kind, state=state)
                for name, kind, state in self.broker.backends()
            ],
            queue_route=self.broker.queue_route(),
            route_reason=self.broker.route().reason,
        )

    async def PauseJobType(
        self, request: pb.PauseJobTypeRequest, ctx: CallContext
    ) -> pb.PauseJobTypeResponse:
        _check_type(request.job_type, self.broker.core.limits)
        await self._call(self.broker.pause(request.job_type))
        return pb.PauseJobTypeResponse(paused=True)

    async def ResumeJobType(
        self, request: pb.ResumeJobTypeRequest, ctx: CallContext
    ) -> pb.ResumeJobTypeResponse:
        _check_type(request.job_type, self.broker.core.limits)
        await self._call(self.broker.resume(request.job_type))
        return pb.ResumeJobTypeResponse(paused=False)

    async def SetJobTypeLimits(
        self, request: pb.SetJobTypeLimitsRequest, ctx: CallContext
    ) -> pb.SetJobTypeLimitsResponse:
        limit = limit_from_wire(
            request.job_type,
            request.rate,
            request.burst,
            request.max_running,
            self.broker.core.limits,
        )
        if isinstance(limit, Rejected):
            raise RpcError(StatusCode.INVALID_ARGUMENT, limit.message)
        await self._call(self.broker.set_limit(request.job_type, limit))
        rate = limit.rate if limit else None
        return pb.SetJobTypeLimitsResponse(
            job_type=request.job_type,
            rate=rate.rate if rate else 0.0,
            burst=rate.burst if rate else 0,
            max_running=(limit.max_running or 0) if limit else 0,
        )

    # -- helpers ---------------------------------------------------------------------

    @staticmethod
    async def _call(awaitable):  # type: ignore[no-untyped-def]
        try:
            return await awaitable
        except Unavailable as exc:
            raise RpcError(StatusCode.UNAVAILABLE, str(exc)) from exc
        except OutcomeUnknown as exc:
            raise RpcError(StatusCode.DEADLINE_EXCEEDED, str(exc)) from exc


def _require_id(job_id: str) -> None:
    rejected = validate_job_id(job_id)
    if rejected is not None:
        raise RpcError(StatusCode.INVALID_ARGUMENT, rejected.message)


def _worker_id(worker_id: str, peer: str) -> str:
    rejected = validate_job_id(worker_id, "worker_id") if worker_id else None
    if rejected is not None:
        raise RpcError(StatusCode.INVALID_ARGUMENT, rejected.message)
    return worker_id or peer


def _check_type(job_type: str, limits: Limits, field: str = "job_type") -> None:
    rejected = validate_job_type(job_type, limits, field)
    if rejected is not None:
        raise RpcError(StatusCode.INVALID_ARGUMENT, rejected.message)


class HealthService:
    """``grpc.health.v1.Health``: SERVING while the record store accepts writes.

    The overall service ("") and ``stackduck.StackDuckService`` are known;
    anything else is NOT_FOUND, as the health-checking protocol specifies.
    """

    KNOWN: Final = frozenset({"", "stackduck.StackDuckService"})

    def __init__(self, broker: Broker, *, interval: float = 1.0) -> None:
        self.broker = broker
        self.interval = interval

    def _status(self) -> int:
        if self.broker.draining:
            return health_pb2.HealthCheckResponse.NOT_SERVING
        if self.broker.route().enqueue is not EnqueueMode.ACCEPT:
            return health_pb2.HealthCheckResponse.NOT_SERVING
        return health_pb2.HealthCheckResponse.SERVING

    async def Check(
        self, request: health_pb2.HealthCheckRequest, ctx: CallContext
    ) -> health_pb2.HealthCheckResponse:
        if request.service not in self.KNOWN:
            raise RpcError(StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        return health_pb2.HealthCheckResponse(status=self._status())

    async def Watch(
        self, request: health_pb2.HealthCheckRequest, ctx: CallContext
    ) -> AsyncIterator[health_pb2.HealthCheckResponse]:
        if request.service not in self.KNOWN:
            yield health_pb2.HealthCheckResponse(
                status=health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
            )
            return
        last = None
        while True:
            status = self._status()
            if status != last:
                yield health_pb2.HealthCheckResponse(status=status)
                last = status
            await trio.sleep(self.interval)
