from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class EnqueueJobRequest(_message.Message):
    __slots__ = ("job_type", "payload", "priority", "delay", "max_retries", "scheduled_at", "idempotency_key")
    JOB_TYPE_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    DELAY_FIELD_NUMBER: _ClassVar[int]
    MAX_RETRIES_FIELD_NUMBER: _ClassVar[int]
    SCHEDULED_AT_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    job_type: str
    payload: str
    priority: int
    delay: int
    max_retries: int
    scheduled_at: str
    idempotency_key: str
    def __init__(self, job_type: _Optional[str] = ..., payload: _Optional[str] = ..., priority: _Optional[int] = ..., delay: _Optional[int] = ..., max_retries: _Optional[int] = ..., scheduled_at: _Optional[str] = ..., idempotency_key: _Optional[str] = ...) -> None: ...

class EnqueueJobResponse(_message.Message):
    __slots__ = ("job_id", "success", "error_message", "status", "duplicate")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    ERROR_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    success: bool
    error_message: str
    status: str
    duplicate: bool
    def __init__(self, job_id: _Optional[str] = ..., success: _Optional[bool] = ..., error_message: _Optional[str] = ..., status: _Optional[str] = ..., duplicate: _Optional[bool] = ...) -> None: ...

class DequeueJobRequest(_message.Message):
    __slots__ = ("queue_name", "worker_id", "lease_seconds")
    QUEUE_NAME_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    LEASE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    queue_name: str
    worker_id: str
    lease_seconds: int
    def __init__(self, queue_name: _Optional[str] = ..., worker_id: _Optional[str] = ..., lease_seconds: _Optional[int] = ...) -> None: ...

class DequeueJobResponse(_message.Message):
    __slots__ = ("job", "success", "error_message")
    JOB_FIELD_NUMBER: _ClassVar[int]
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    ERROR_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    job: GrpcJob
    success: bool
    error_message: str
    def __init__(self, job: _Optional[_Union[GrpcJob, _Mapping]] = ..., success: _Optional[bool] = ..., error_message: _Optional[str] = ...) -> None: ...

class DequeueRetriedJobRequest(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: GrpcJob
    def __init__(self, job: _Optional[_Union[GrpcJob, _Mapping]] = ...) -> None: ...

class DequeueRetriedJobResponse(_message.Message):
    __slots__ = ("success",)
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    success: bool
    def __init__(self, success: _Optional[bool] = ...) -> None: ...

class ConsumeJobsRequest(_message.Message):
    __slots__ = ("worker_id", "job_types", "prefetch", "lease_seconds")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    JOB_TYPES_FIELD_NUMBER: _ClassVar[int]
    PREFETCH_FIELD_NUMBER: _ClassVar[int]
    LEASE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    job_types: _containers.RepeatedScalarFieldContainer[str]
    prefetch: int
    lease_seconds: int
    def __init__(self, worker_id: _Optional[str] = ..., job_types: _Optional[_Iterable[str]] = ..., prefetch: _Optional[int] = ..., lease_seconds: _Optional[int] = ...) -> None: ...

class JobMessage(_message.Message):
    __slots__ = ("job", "notification_type")
    JOB_FIELD_NUMBER: _ClassVar[int]
    NOTIFICATION_TYPE_FIELD_NUMBER: _ClassVar[int]
    job: GrpcJob
    notification_type: str
    def __init__(self, job: _Optional[_Union[GrpcJob, _Mapping]] = ..., notification_type: _Optional[str] = ...) -> None: ...

class GrpcJob(_message.Message):
    __slots__ = ("id", "job_type", "payload", "status", "priority", "retry_count", "max_retries", "error_message", "delay", "scheduled_at", "started_at", "completed_at", "created_at", "updated_at", "lease_id", "attempt", "lease_expires_at_ms", "worker_id", "idempotency_key")
    ID_FIELD_NUMBER: _ClassVar[int]
    JOB_TYPE_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    RETRY_COUNT_FIELD_NUMBER: _ClassVar[int]
    MAX_RETRIES_FIELD_NUMBER: _ClassVar[int]
    ERROR_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    DELAY_FIELD_NUMBER: _ClassVar[int]
    SCHEDULED_AT_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    COMPLETED_AT_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    LEASE_EXPIRES_AT_MS_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    id: str
    job_type: str
    payload: str
    status: str
    priority: int
    retry_count: int
    max_retries: int
    error_message: str
    delay: int
    scheduled_at: int
    started_at: int
    completed_at: int
    created_at: int
    updated_at: int
    lease_id: str
    attempt: int
    lease_expires_at_ms: int
    worker_id: str
    idempotency_key: str
    def __init__(self, id: _Optional[str] = ..., job_type: _Optional[str] = ..., payload: _Optional[str] = ..., status: _Optional[str] = ..., priority: _Optional[int] = ..., retry_count: _Optional[int] = ..., max_retries: _Optional[int] = ..., error_message: _Optional[str] = ..., delay: _Optional[int] = ..., scheduled_at: _Optional[int] = ..., started_at: _Optional[int] = ..., completed_at: _Optional[int] = ..., created_at: _Optional[int] = ..., updated_at: _Optional[int] = ..., lease_id: _Optional[str] = ..., attempt: _Optional[int] = ..., lease_expires_at_ms: _Optional[int] = ..., worker_id: _Optional[str] = ..., idempotency_key: _Optional[str] = ...) -> None: ...

class CompleteJobRequest(_message.Message):
    __slots__ = ("job_id", "lease_id")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    lease_id: str
    def __init__(self, job_id: _Optional[str] = ..., lease_id: _Optional[str] = ...) -> None: ...

class CompleteJobResponse(_message.Message):
    __slots__ = ("success",)
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    success: bool
    def __init__(self, success: _Optional[bool] = ...) -> None: ...

class FailJobRequest(_message.Message):
    __slots__ = ("job_id", "error_message", "lease_id")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    ERROR_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    error_message: str
    lease_id: str
    def __init__(self, job_id: _Optional[str] = ..., error_message: _Optional[str] = ..., lease_id: _Optional[str] = ...) -> None: ...

class FailJobResponse(_message.Message):
    __slots__ = ("success", "status")
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    success: bool
    status: str
    def __init__(self, success: _Optional[bool] = ..., status: _Optional[str] = ...) -> None: ...

class RetryJobRequest(_message.Message):
    __slots__ = ("job_id", "error_message", "lease_id")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    ERROR_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    error_message: str
    lease_id: str
    def __init__(self, job_id: _Optional[str] = ..., error_message: _Optional[str] = ..., lease_id: _Optional[str] = ...) -> None: ...

class RetryJobResponse(_message.Message):
    __slots__ = ("success", "status")
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    success: bool
    status: str
    def __init__(self, success: _Optional[bool] = ..., status: _Optional[str] = ...) -> None: ...

class EnqueueJobsRequest(_message.Message):
    __slots__ = ("jobs",)
    JOBS_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[EnqueueJobRequest]
    def __init__(self, jobs: _Optional[_Iterable[_Union[EnqueueJobRequest, _Mapping]]] = ...) -> None: ...

class EnqueueJobsResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[ItemResult]
    def __init__(self, results: _Optional[_Iterable[_Union[ItemResult, _Mapping]]] = ...) -> None: ...

class ItemResult(_message.Message):
    __slots__ = ("job_id", "code", "message", "status", "duplicate")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    code: int
    message: str
    status: str
    duplicate: bool
    def __init__(self, job_id: _Optional[str] = ..., code: _Optional[int] = ..., message: _Optional[str] = ..., status: _Optional[str] = ..., duplicate: _Optional[bool] = ...) -> None: ...

class Ack(_message.Message):
    __slots__ = ("job_id", "lease_id", "failed", "error_message", "release")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    ERROR_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    RELEASE_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    lease_id: str
    failed: bool
    error_message: str
    release: bool
    def __init__(self, job_id: _Optional[str] = ..., lease_id: _Optional[str] = ..., failed: _Optional[bool] = ..., error_message: _Optional[str] = ..., release: _Optional[bool] = ...) -> None: ...

class AckJobsRequest(_message.Message):
    __slots__ = ("acks",)
    ACKS_FIELD_NUMBER: _ClassVar[int]
    acks: _containers.RepeatedCompositeFieldContainer[Ack]
    def __init__(self, acks: _Optional[_Iterable[_Union[Ack, _Mapping]]] = ...) -> None: ...

class AckJobsResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[ItemResult]
    def __init__(self, results: _Optional[_Iterable[_Union[ItemResult, _Mapping]]] = ...) -> None: ...

class GetJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class GetJobResponse(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: GrpcJob
    def __init__(self, job: _Optional[_Union[GrpcJob, _Mapping]] = ...) -> None: ...

class CancelJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class CancelJobResponse(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: GrpcJob
    def __init__(self, job: _Optional[_Union[GrpcJob, _Mapping]] = ...) -> None: ...

class ExtendLeaseRequest(_message.Message):
    __slots__ = ("job_id", "lease_id", "lease_seconds")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    LEASE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    lease_id: str
    lease_seconds: int
    def __init__(self, job_id: _Optional[str] = ..., lease_id: _Optional[str] = ..., lease_seconds: _Optional[int] = ...) -> None: ...

class ExtendLeaseResponse(_message.Message):
    __slots__ = ("lease_expires_at_ms",)
    LEASE_EXPIRES_AT_MS_FIELD_NUMBER: _ClassVar[int]
    lease_expires_at_ms: int
    def __init__(self, lease_expires_at_ms: _Optional[int] = ...) -> None: ...

class ListDeadJobsRequest(_message.Message):
    __slots__ = ("job_type", "limit", "page_token")
    JOB_TYPE_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    job_type: str
    limit: int
    page_token: str
    def __init__(self, job_type: _Optional[str] = ..., limit: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListDeadJobsResponse(_message.Message):
    __slots__ = ("jobs", "next_page_token")
    JOBS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[GrpcJob]
    next_page_token: str
    def __init__(self, jobs: _Optional[_Iterable[_Union[GrpcJob, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class RequeueDeadJobsRequest(_message.Message):
    __slots__ = ("job_ids", "job_type")
    JOB_IDS_FIELD_NUMBER: _ClassVar[int]
    JOB_TYPE_FIELD_NUMBER: _ClassVar[int]
    job_ids: _containers.RepeatedScalarFieldContainer[str]
    job_type: str
    def __init__(self, job_ids: _Optional[_Iterable[str]] = ..., job_type: _Optional[str] = ...) -> None: ...

class RequeueDeadJobsResponse(_message.Message):
    __slots__ = ("results", "count")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[ItemResult]
    count: int
    def __init__(self, results: _Optional[_Iterable[_Union[ItemResult, _Mapping]]] = ..., count: _Optional[int] = ...) -> None: ...

class PurgeDeadJobsRequest(_message.Message):
    __slots__ = ("job_ids", "job_type")
    JOB_IDS_FIELD_NUMBER: _ClassVar[int]
    JOB_TYPE_FIELD_NUMBER: _ClassVar[int]
    job_ids: _containers.RepeatedScalarFieldContainer[str]
    job_type: str
    def __init__(self, job_ids: _Optional[_Iterable[str]] = ..., job_type: _Optional[str] = ...) -> None: ...

class PurgeDeadJobsResponse(_message.Message):
    __slots__ = ("results", "count")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[ItemResult]
    count: int
    def __init__(self, results: _Optional[_Iterable[_Union[ItemResult, _Mapping]]] = ..., count: _Optional[int] = ...) -> None: ...

class GetStatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TypeStats(_message.Message):
    __slots__ = ("job_type", "queued_p1", "queued_p2", "queued_p3", "scheduled", "running", "dead", "paused", "workers", "completed", "failed", "retried", "rate_limit", "rate_burst", "max_running", "throttled")
    JOB_TYPE_FIELD_NUMBER: _ClassVar[int]
    QUEUED_P1_FIELD_NUMBER: _ClassVar[int]
    QUEUED_P2_FIELD_NUMBER: _ClassVar[int]
    QUEUED_P3_FIELD_NUMBER: _ClassVar[int]
    SCHEDULED_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    DEAD_FIELD_NUMBER: _ClassVar[int]
    PAUSED_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    COMPLETED_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    RETRIED_FIELD_NUMBER: _ClassVar[int]
    RATE_LIMIT_FIELD_NUMBER: _ClassVar[int]
    RATE_BURST_FIELD_NUMBER: _ClassVar[int]
    MAX_RUNNING_FIELD_NUMBER: _ClassVar[int]
    THROTTLED_FIELD_NUMBER: _ClassVar[int]
    job_type: str
    queued_p1: int
    queued_p2: int
    queued_p3: int
    scheduled: int
    running: int
    dead: int
    paused: bool
    workers: int
    completed: int
    failed: int
    retried: int
    rate_limit: float
    rate_burst: int
    max_running: int
    throttled: int
    def __init__(self, job_type: _Optional[str] = ..., queued_p1: _Optional[int] = ..., queued_p2: _Optional[int] = ..., queued_p3: _Optional[int] = ..., scheduled: _Optional[int] = ..., running: _Optional[int] = ..., dead: _Optional[int] = ..., paused: _Optional[bool] = ..., workers: _Optional[int] = ..., completed: _Optional[int] = ..., failed: _Optional[int] = ..., retried: _Optional[int] = ..., rate_limit: _Optional[float] = ..., rate_burst: _Optional[int] = ..., max_running: _Optional[int] = ..., throttled: _Optional[int] = ...) -> None: ...

class BackendHealth(_message.Message):
    __slots__ = ("name", "kind", "state")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    name: str
    kind: str
    state: str
    def __init__(self, name: _Optional[str] = ..., kind: _Optional[str] = ..., state: _Optional[str] = ...) -> None: ...

class GetStatsResponse(_message.Message):
    __slots__ = ("types", "workers", "running", "dead", "backends", "queue_route", "route_reason")
    TYPES_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    DEAD_FIELD_NUMBER: _ClassVar[int]
    BACKENDS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_ROUTE_FIELD_NUMBER: _ClassVar[int]
    ROUTE_REASON_FIELD_NUMBER: _ClassVar[int]
    types: _containers.RepeatedCompositeFieldContainer[TypeStats]
    workers: int
    running: int
    dead: int
    backends: _containers.RepeatedCompositeFieldContainer[BackendHealth]
    queue_route: str
    route_reason: str
    def __init__(self, types: _Optional[_Iterable[_Union[TypeStats, _Mapping]]] = ..., workers: _Optional[int] = ..., running: _Optional[int] = ..., dead: _Optional[int] = ..., backends: _Optional[_Iterable[_Union[BackendHealth, _Mapping]]] = ..., queue_route: _Optional[str] = ..., route_reason: _Optional[str] = ...) -> None: ...

class PauseJobTypeRequest(_message.Message):
    __slots__ = ("job_type",)
    JOB_TYPE_FIELD_NUMBER: _ClassVar[int]
    job_type: str
    def __init__(self, job_type: _Optional[str] = ...) -> None: ...

class PauseJobTypeResponse(_message.Message):
    __slots__ = ("paused",)
    PAUSED_FIELD_NUMBER: _ClassVar[int]
    paused: bool
    def __init__(self, paused: _Optional[bool] = ...) -> None: ...

class ResumeJobTypeRequest(_message.Message):
    __slots__ = ("job_type",)
    JOB_TYPE_FIELD_NUMBER: _ClassVar[int]
    job_type: str
    def __init__(self, job_type: _Optional[str] = ...) -> None: ...

class ResumeJobTypeResponse(_message.Message):
    __slots__ = ("paused",)
    PAUSED_FIELD_NUMBER: _ClassVar[int]
    paused: bool
    def __init__(self, paused: _Optional[bool] = ...) -> None: ...

class SetJobTypeLimitsRequest(_message.Message):
    __slots__ = ("job_type", "rate", "burst", "max_running")
    JOB_TYPE_FIELD_NUMBER: _ClassVar[int]
    RATE_FIELD_NUMBER: _ClassVar[int]
    BURST_FIELD_NUMBER: _ClassVar[int]
    MAX_RUNNING_FIELD_NUMBER: _ClassVar[int]
    job_type: str
    rate: float
    burst: int
    max_running: int
    def __init__(self, job_type: _Optional[str] = ..., rate: _Optional[float] = ..., burst: _Optional[int] = ..., max_running: _Optional[int] = ...) -> None: ...

class SetJobTypeLimitsResponse(_message.Message):
    __slots__ = ("job_type", "rate", "burst", "max_running")
    JOB_TYPE_FIELD_NUMBER: _ClassVar[int]
    RATE_FIELD_NUMBER: _ClassVar[int]
    BURST_FIELD_NUMBER: _ClassVar[int]
    MAX_RUNNING_FIELD_NUMBER: _ClassVar[int]
    job_type: str
    rate: float
    burst: int
    max_running: int
    def __init__(self, job_type: _Optional[str] = ..., rate: _Optional[float] = ..., burst: _Optional[int] = ..., max_running: _Optional[int] = ...) -> None: ...
