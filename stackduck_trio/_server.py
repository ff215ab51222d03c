"""``serve()``: one Stackduck server instance, structured as ARCHITECTURE §7.

One root nursery. Started in order with ``nursery.start``: the record store
(opened in a thread), its group-commit writer, the queue rebuilt from the
store, the timer (promotion and lease expiry), and the gRPC listener. The
server reports its port through ``task_status`` only when all of them run.

Shutdown (``shutdown`` event set, e.g. by SIGTERM in the CLI):

1. the broker drains: new enqueues and new streams get UNAVAILABLE, nothing
   more is delivered, health says NOT_SERVING;
2. running jobs get ``grace_period`` seconds to be acked (workers' acks
   still reach us over their connections);
3. the listener and every call are cancelled; streams' jobs still un-acked are
   requeued (their handlers' ``finally``);
4. the writer commits everything pending, and the store is closed.
"""

from __future__ import annotations

import contextlib
import functools
import hmac
import logging
import ssl

import trio

from stackduck_core import LifecyclePolicy, Limits, QueueCore, Retention, parse_limits
from stackduck_core._failover import BackendHealth, BackendRole, Durability

from ._broker import Broker, new_id
from ._clock import Clock, WallClock
from ._config import ConfigError, ServerConfig
from ._proto import health_pb2, stackduck_pb2
from ._rpc import CallContext, RpcError, RpcServer, method_table, server_ssl_context
from ._service import HealthService, StackDuckService
from ._shared import SharedBroker
from ._store import Backend, GroupCommitter, MemoryBackend, SqliteBackend
from ._tier import QueueTier as Tier

log = logging.getLogger("stackduck.server")


def make_backend(config: ServerConfig) -> Backend:
    """The record-store backend the configuration asks for."""
    check_queue(config)
    if config.database_url:
        from ._postgres import PostgresBackend  # psycopg loads only when used

        return PostgresBackend(config.database_url)
    if config.data_dir == ":memory:":
        return MemoryBackend()
    return SqliteBackend(config.sqlite_path, synchronous=config.sqlite_synchronous)


def queue_kind(config: ServerConfig) -> str:
    """The queue tier the configuration asks for: memory, redis or postgres."""
    if config.queue == "auto":
        return "redis" if config.redis_url else "memory"
    return config.queue


def check_queue(config: ServerConfig) -> None:
    """Refuse queue settings that cannot work, before anything starts."""
    kind = queue_kind(config)
    if kind == "redis" and not config.redis_url:
        raise ConfigError("STACKDUCK_QUEUE=redis needs REDIS_URL")
    if kind == "memory" and config.redis_url:
        raise ConfigError("REDIS_URL is set but STACKDUCK_QUEUE=memory: unset one of them")
    if kind == "postgres" and config.redis_url:
        raise ConfigError("REDIS_URL is set but STACKDUCK_QUEUE=postgres: unset one of them")
    if kind in ("redis", "postgres") and not config.database_url:
        raise ConfigError(
            f"a {kind} queue tier needs DATABASE_URL: instances share a queue only together "
            "with a shared PostgreSQL record store (the embedded SQLite store belongs to "
            "one instance)"
        )


def _authenticator(tokens: tuple[str, ...]):  # type: ignore[no-untyped-def]
    from purerpc.grpclib.status import StatusCode

    allowed = frozenset(tokens)

    def authenticate(ctx: CallContext) -> None:
        # The health service stays open so load balancers can probe it.
        if ctx.method.startswith("/grpc.health.v1.Health/"):
            return
        for key, value in ctx.metadata:
            if key.lower() == "authorization":
                text = value.decode() if isinstance(value, bytes) else value
                scheme, _, token = text.partition(" ")
                if scheme.lower() == "bearer" and any(
                    hmac.compare_digest(token.encode(), good.encode()) for good in allowed
                ):
                    return
                raise RpcError(StatusCode.UNAUTHENTICATED, "invalid bearer token")
        raise RpcError(StatusCode.UNAUTHENTICATED, "missing 'authorization: Bearer TOKEN' metadata")

    return authenticate


async def serve(
    config: ServerConfig,
    *,
    shutdown: trio.Event | None = None,
    clock: Clock | None = None,
    backend: Backend | None = None,
    tier: Tier | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run a server until ``shutdown`` is set (or the caller cancels).

    Args:
        config: the configuration.
        shutdown: set it to shut down gracefully; ``None`` runs until cancelled.
        clock: wall clock (tests inject one that follows trio's mock clock).
        backend: a record-store backend to use instead of the configured one.
        tier: a shared queue tier to use instead of the configured one (tests:
            several in-process instances on one :class:`MemoryTier`).
        task_status: receives the bound port once the server accepts calls.
    """
    backend = backend or make_backend(config)
    async with contextlib.AsyncExitStack() as stack:
        if tier is None and queue_kind(config) == "redis":
            from ._redis import open_redis_tier  # redis and trio-asyncio load only when used

            assert config.redis_url is not None  # check_queue
            tier = await stack.enter_async_context(
                open_redis_tier(config.redis_url, prefix=config.redis_prefix, must_connect=False)
            )
        await _serve(
            config,
            shutdown=shutdown,
            clock=clock or WallClock(),
            backend=backend,
            tier=tier,
            task_status=task_status,
        )


async def _serve(
    config: ServerConfig,
    *,
    shutdown: trio.Event | None,
    clock: Clock,
    backend: Backend,
    tier: Tier | None,
    task_status: trio.TaskStatus[int],
) -> None:
    ssl_context: ssl.SSLContext | None = None
    if config.tls_cert and config.tls_key:
        ssl_context = server_ssl_context(config.tls_cert, config.tls_key)
    if shutdown is None:
        shutdown = trio.Event()
    health = BackendHealth(backend.kind, BackendRole.RECORD_STORE)
    committer = GroupCommitter(backend, health, now=clock.now, clock_deadline=clock.trio_deadline)
    core = QueueCore(
        new_id=new_id,
        policy=LifecyclePolicy(max_lost_leases=config.max_lost_leases),
        limits=Limits(max_payload_bytes=config.max_payload_bytes),
        default_lease=config.lease_seconds,
    )
    broker: Broker
    fallback: Tier | None = None
    if backend.kind == "postgres":
        # The record store as a queue: the whole tier without Redis, or the
        # fallback every instance claims from while Redis is down.
        from ._pgtier import PostgresTier  # psycopg loads only when used
        from ._postgres import PostgresBackend

        assert isinstance(backend, PostgresBackend)
        if tier is None and queue_kind(config) == "postgres":
            tier = PostgresTier(backend)
        elif tier is not None:
            fallback = PostgresTier(backend)
    if tier is None:
        broker = Broker(
            core=core,
            committer=committer,
            clock=clock,
            write_timeout=config.write_timeout,
            durability=Durability(config.durability),
        )
    else:
        broker = SharedBroker(
            core=core,
            committer=committer,
            clock=clock,
            write_timeout=config.write_timeout,
            durability=Durability(config.durability),
            tier=tier,
            tier_health=BackendHealth(tier.kind, BackendRole.QUEUE_TIER),
            fallback=fallback,
            owner=new_id(),
            claim_seconds=config.lease_seconds,
        )
    broker.configured_limits = parse_limits(config.limits)
    await committer.run_blocking(backend.open)
    try:
        async with trio.open_nursery() as root:
            await root.start(committer.run)
            log.info("%s", await broker.prepare())
            async with trio.open_nursery() as services:
                await services.start(broker.run_tasks)
                services.start_soon(
                    broker.run_retention, Retention(config.retain_completed, config.retain_dead)
                )
                http_addr = config.http_addr or config.metrics_addr
                if http_addr:
                    # dashboard, JSON API and /metrics; prometheus loads only when used
                    from ._http import HttpApp, serve_http
                    from ._metrics import Metrics

                    metrics = Metrics()
                    broker.metrics = metrics
                    kind = backend.kind
                    committer.on_commit_time = lambda seconds, ok: metrics.on_commit(
                        kind, seconds, ok=ok
                    )
                    app = HttpApp(broker, metrics, tokens=config.tokens)
                    await services.start(app.run_sampler)
                    host, _, http_port = http_addr.rpartition(":")
                    await services.start(serve_http, app, host.strip("[]"), int(http_port))
                methods = {
                    **method_table(
                        stackduck_pb2.DESCRIPTOR.services_by_name["StackDuckService"],
                        StackDuckService(broker, heartbeat_interval=config.heartbeat_interval),
                    ),
                    **method_table(
                        health_pb2.DESCRIPTOR.services_by_name["Health"], HealthService(broker)
                    ),
                }
                rpc_server = RpcServer(
                    methods,
                    max_message_size=config.max_message_bytes,
                    authenticate=_authenticator(config.tokens) if config.tokens else None,
                )
                port = await services.start(
                    functools.partial(
                        rpc_server.serve,
                        host=config.host,
                        port=config.port,
                        ssl_context=ssl_context,
                    )
                )
                log.info(
                    "Stackduck serving on %s:%d (%s)",
                    config.host,
                    port,
                    "TLS" if ssl_context else "plaintext",
                )
                task_status.started(port)
                broker.changed()
                await shutdown.wait()
                log.info("shutting down: draining for up to %g s", config.grace_period)
                await broker.drain(config.grace_period)
                # Calls already in progress (the last acks, whose answers wait
                # for their commit) finish before the listener goes away.
                with trio.move_on_after(max(config.write_timeout, 1.0)):
                    await rpc_server.wait_quiet()
                services.cancel_scope.cancel()
            committer.close()
            # the writer task returns once every pending write has committed
            with trio.move_on_after(max(config.write_timeout, 1.0)) as scope:
                await committer.wait_closed()
            if scope.cancelled_caught:
                log.error(
                    "record store did not flush within %g s: %d records not written "
                    "(jobs involved are restored from their last committed state)",
                    config.write_timeout,
                    committer.statistics().pending,
                )
            root.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            await committer.run_blocking(backend.close)
        committer.stop_thread()
    log.info("stopped")
