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

import functools
import hmac
import logging
import ssl

import trio

from stackduck_core import LifecyclePolicy, Limits, QueueCore
from stackduck_core._failover import BackendHealth, BackendRole

from ._broker import Broker, new_id
from ._clock import Clock, WallClock
from ._config import ConfigError, ServerConfig
from ._proto import health_pb2, stackduck_pb2
from ._rpc import CallContext, RpcError, RpcServer, method_table, server_ssl_context
from ._service import HealthService, StackDuckService
from ._store import Backend, GroupCommitter, MemoryBackend, SqliteBackend

log = logging.getLogger("stackduck.server")


def make_backend(config: ServerConfig) -> Backend:
    """The record-store backend the configuration asks for."""
    if config.redis_url:
        raise ConfigError(
            "REDIS_URL is set, but the Redis queue tier is not part of this build yet; "
            "unset REDIS_URL to use the embedded in-memory queue"
        )
    if config.database_url:
        from ._postgres import PostgresBackend  # psycopg loads only when used

        return PostgresBackend(config.database_url)
    if config.data_dir == ":memory:":
        return MemoryBackend()
    return SqliteBackend(config.sqlite_path, synchronous=config.sqlite_synchronous)


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
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run a server until ``shutdown`` is set (or the caller cancels).

    Args:
        config: the configuration.
        shutdown: set it to shut down gracefully; ``None`` runs until cancelled.
        clock: wall clock (tests inject one that follows trio's mock clock).
        backend: a record-store backend to use instead of the configured one.
        task_status: receives the bound port once the server accepts calls.
    """
    clock = clock or WallClock()
    backend = backend or make_backend(config)
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
    broker = Broker(core=core, committer=committer, clock=clock, write_timeout=config.write_timeout)
    await committer.run_blocking(backend.open)
    try:
        async with trio.open_nursery() as root:
            await root.start(committer.run)
            # Pauses first: nothing may be delivered for a paused type, ever.
            paused = await committer.run_blocking(backend.load_paused)
            broker.restore_paused(paused)
            jobs = await committer.run_blocking(backend.load_active)
            requeued = broker.restore(jobs)
            log.info(
                "record store %s: %d active jobs restored, %d running jobs requeued, "
                "%d job types paused",
                backend.kind,
                len(jobs),
                requeued,
                len(paused),
            )
            async with trio.open_nursery() as services:
                await services.start(broker.run_timer)
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
