"""Client subcommands of ``stackduck-trio``: talk to a running server.

::

    stackduck-trio enqueue email '{"to": "ada@example.com"}' --priority 1
    stackduck-trio job 5f0c...            stackduck-trio stats
    stackduck-trio dlq list --type email  stackduck-trio dlq requeue --type email
    stackduck-trio pause email            stackduck-trio resume email
    stackduck-trio limit email --rate 50 --burst 100 --max-running 10
    stackduck-trio cancel 5f0c...         stackduck-trio worker myapp.jobs:HANDLERS

Every command takes ``--server HOST:PORT`` (default ``$STACKDUCK_SERVER``, else
``127.0.0.1:50051``), ``--token`` (default ``$STACKDUCK_TOKEN``), ``--tls`` /
``--ca-file`` and ``--json`` (machine-readable output on stdout). A failed call
prints ``error: STATUS: message`` on stderr and exits 1; bad usage exits 2.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import importlib
import json
import logging
import os
import signal
import ssl
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import trio

from ._client import BatchResult, Client, ClientError, JobInfo, Stats, parse_address
from ._config import ConfigError
from ._logging import configure_logging
from ._worker import Worker

__all__ = ["add_client_commands"]

DEFAULT_SERVER = "127.0.0.1:50051"

Command = Callable[[Client, argparse.Namespace], Awaitable[int]]


# ---------------------------------------------------------------------------------------------
# Output helpers
# ---------------------------------------------------------------------------------------------


def _when(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    moment = datetime.datetime.fromtimestamp(seconds, tz=datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Align columns: numbers to the right, text to the left; ``-`` for empty cells."""
    cells = [[("-" if v is None or v == "" else str(v)) for v in row] for row in rows]
    numeric = [
        all(isinstance(row[i], int | float) and not isinstance(row[i], bool) for row in rows)
        if rows
        else False
        for i in range(len(headers))
    ]
    widths = [max([len(h)] + [len(row[i]) for row in cells]) for i, h in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        parts = [
            v.rjust(widths[i]) if numeric[i] else v.ljust(widths[i]) for i, v in enumerate(values)
        ]
        return "  ".join(parts).rstrip()

    return "\n".join([line(list(headers)), *(line(row) for row in cells)])


def _print_json(value: object) -> None:
    print(json.dumps(value, indent=2, ensure_ascii=False))


def _shorten(text: str, width: int = 60) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


# ---------------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------------


async def _enqueue(client: Client, args: argparse.Namespace) -> int:
    payload: str | None = args.payload
    if payload == "-":
        payload = sys.stdin.read()
    job_id = await client.enqueue(
        args.job_type,
        payload,
        priority=args.priority,
        delay=args.delay,
        max_retries=args.max_retries,
        scheduled_at=args.at,
    )
    if args.json:
        _print_json({"job_id": job_id})
    else:
        print(job_id)
    return 0


async def _job(client: Client, args: argparse.Namespace) -> int:
    job = await client.get(args.job_id)
    if args.json:
        _print_json(job.to_dict())
        return 0
    fields = job.to_dict()
    width = max(len(k) for k in fields)
    for key, value in fields.items():
        if key.endswith("_at") or key == "lease_expires_at":
            shown = _when(value)
        elif value is None or value == "":
            shown = "-"
        else:
            shown = str(value)
        print(f"{key.ljust(width)}  {shown}")
    return 0


def _stats_text(stats: Stats) -> str:
    headers = (
        "TYPE", "P1", "P2", "P3", "SCHEDULED", "RUNNING", "DEAD", "PAUSED", "WORKERS",
        "COMPLETED", "FAILED", "RETRIED", "LIMITS",
    )  # fmt: skip
    rows = [
        (
            t.job_type,
            t.queued_p1,
            t.queued_p2,
            t.queued_p3,
            t.scheduled,
            t.running,
            t.dead,
            "yes" if t.paused else "no",
            t.workers,
            t.completed,
            t.failed,
            t.retried,
            _limits_text(t.rate_limit, t.rate_burst, t.max_running, t.throttled),
        )  # fmt: skip
        for t in stats.types
    ]
    lines = [format_table(headers, rows) if rows else "(no job types yet)", ""]
    lines.append(f"workers {stats.workers}   running {stats.running}   dead {stats.dead}")
    lines += [f"{b.name}: {b.kind} ({b.state})" for b in stats.backends]
    if stats.queue_route:
        lines.append(f"route: {stats.queue_route} ({stats.route_reason})")
    return "\n".join(lines)


def _limits_text(rate: float, burst: int, max_running: int, throttled: int = 0) -> str:
    parts = []
    if rate:
        parts.append(f"{rate:g}/s burst {burst}")
    if max_running:
        parts.append(f"max {max_running} running")
    if throttled:
        parts.append(f"throttled {throttled}x")
    return ", ".join(parts) or "-"


async def _stats(client: Client, args: argparse.Namespace) -> int:
    stats = await client.stats()
    if args.json:
        _print_json(stats.to_dict())
    else:
        print(_stats_text(stats))
    return 0


async def _dlq_list(client: Client, args: argparse.Namespace) -> int:
    jobs = await client.dead_jobs(args.type, limit=args.limit)
    if args.json:
        _print_json([job.to_dict() for job in jobs])
        return 0
    if not jobs:
        print("the dead-letter queue is empty")
        return 0
    rows = [
        (j.id, j.job_type, j.retry_count, _when(j.updated_at), _shorten(j.error_message))
        for j in jobs
    ]
    print(format_table(("ID", "TYPE", "RETRIES", "DEAD SINCE", "ERROR"), rows))
    return 0


def _selection(args: argparse.Namespace) -> tuple[list[str], str | None]:
    if bool(args.job_ids) == bool(args.type):
        raise ConfigError(
            f"dlq {args.dlq_command}: give either job ids or --type TYPE ('*' for every type)"
        )
    return list(args.job_ids), args.type


def _report_batch(verb: str, result: BatchResult, args: argparse.Namespace) -> int:
    failed = [r for r in result.results if not r.ok]
    if args.json:
        _print_json(
            {
                "count": result.count,
                "results": [
                    {
                        "job_id": r.job_id,
                        "code": r.code_name,
                        "message": r.message,
                        "status": r.status,
                    }
                    for r in result.results
                ],
            }
        )
    else:
        print(f"{verb} {result.count} job{'s' if result.count != 1 else ''}")
    for item in failed:
        print(f"error: {item.code_name}: {item.message}", file=sys.stderr)
    return 1 if failed else 0


async def _dlq_requeue(client: Client, args: argparse.Namespace) -> int:
    ids, job_type = _selection(args)
    return _report_batch("requeued", await client.requeue_dead(ids, job_type=job_type), args)


async def _dlq_purge(client: Client, args: argparse.Namespace) -> int:
    ids, job_type = _selection(args)
    return _report_batch("purged", await client.purge_dead(ids, job_type=job_type), args)


async def _pause(client: Client, args: argparse.Namespace) -> int:
    await client.pause(args.job_type)
    _say(args, {"job_type": args.job_type, "paused": True}, f"paused {args.job_type}")
    return 0


async def _resume(client: Client, args: argparse.Namespace) -> int:
    await client.resume(args.job_type)
    _say(args, {"job_type": args.job_type, "paused": False}, f"resumed {args.job_type}")
    return 0


async def _limit(client: Client, args: argparse.Namespace) -> int:
    if args.clear and (args.rate or args.burst or args.max_running):
        raise ConfigError("limit: --clear takes no other limit")
    if not args.clear and not (args.rate or args.max_running):
        raise ConfigError("limit: give --rate and/or --max-running, or --clear")
    limits = await client.set_limits(
        args.job_type, rate=args.rate, burst=args.burst, max_running=args.max_running
    )
    text = _limits_text(limits.rate, limits.burst, limits.max_running)
    _say(
        args,
        {
            "job_type": limits.job_type,
            "rate": limits.rate,
            "burst": limits.burst,
            "max_running": limits.max_running,
        },
        f"limits of {limits.job_type}: {'none' if text == '-' else text}",
    )
    return 0


async def _cancel(client: Client, args: argparse.Namespace) -> int:
    job: JobInfo = await client.cancel(args.job_id)
    _say(args, job.to_dict(), f"cancelled {job.id}")
    return 0


def _say(args: argparse.Namespace, data: object, text: str) -> None:
    if args.json:
        _print_json(data)
    else:
        print(text)


# ---------------------------------------------------------------------------------------------
# Worker
# ---------------------------------------------------------------------------------------------


def load_handlers(spec: str) -> Mapping[str, Any]:
    """Import ``MODULE:ATTRIBUTE`` (``ATTRIBUTE`` defaults to ``HANDLERS``): a dict
    mapping job types to handlers. The current directory is importable.

    Raises:
        ConfigError: the module or attribute is missing, or is not such a dict.
    """
    module_name, _, attribute = spec.partition(":")
    attribute = attribute or "HANDLERS"
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"worker: cannot import {module_name!r}: {exc}") from exc
    handlers = getattr(module, attribute, None)
    if not isinstance(handlers, Mapping) or not handlers:
        raise ConfigError(
            f"worker: {module_name}.{attribute} must be a non-empty dict of job type -> handler"
        )
    for job_type, handler in handlers.items():
        if not isinstance(job_type, str) or not callable(handler):
            raise ConfigError(
                f"worker: {module_name}.{attribute}[{job_type!r}] must map a job type to a callable"
            )
    return handlers


async def _run_worker(worker: Worker) -> None:
    """Run ``worker`` until SIGINT/SIGTERM (graceful stop; a second signal stops now)."""
    log = logging.getLogger("stackduck.worker")
    error: ClientError | None = None
    async with trio.open_nursery() as nursery:

        async def watch_signals() -> None:
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                stopping = False
                async for signum in signals:
                    name = signal.Signals(signum).name
                    if stopping:
                        log.warning("second %s: stopping now", name)
                        nursery.cancel_scope.cancel()
                        return
                    stopping = True
                    log.info("%s: stopping once running jobs are done", name)
                    worker.stop()

        async def work() -> None:
            nonlocal error
            try:
                await worker.run()
            except ClientError as exc:  # raised below, outside the nursery
                error = exc
            nursery.cancel_scope.cancel()  # stopped: stop watching signals

        nursery.start_soon(watch_signals)
        nursery.start_soon(work)
    if error is not None:
        raise error


def _worker_command(args: argparse.Namespace) -> int:
    handlers = load_handlers(args.handlers)
    configure_logging("human", args.log_level)
    worker = Worker(
        _address(args),
        handlers,
        concurrency=args.concurrency,
        lease_seconds=args.lease_seconds,
        token=args.token,
        tls=_tls(args),
        worker_id=args.worker_id,
        grace_period=args.grace_period,
    )
    log = logging.getLogger("stackduck.worker")
    log.info(
        "worker %s: %s on %s (concurrency %d)",
        worker.worker_id,
        ", ".join(sorted(handlers)),
        worker.address,
        worker.concurrency,
    )
    try:
        trio.run(_run_worker, worker)
    except ClientError as exc:
        print(f"error: {exc.status}: {exc.message}", file=sys.stderr)
        return 1
    stats = worker.statistics()
    log.info(
        "worker stopped: %d processed, %d failed, %d reconnects",
        stats.processed,
        stats.failed,
        stats.reconnects,
    )
    if args.json:
        _print_json(
            {
                "processed": stats.processed,
                "failed": stats.failed,
                "reconnects": stats.reconnects,
                "acks_rejected": stats.acks_rejected,
            }
        )
    return 0


# ---------------------------------------------------------------------------------------------
# Wiring
# ---------------------------------------------------------------------------------------------


def _address(args: argparse.Namespace) -> str:
    try:
        parse_address(args.server)
    except ValueError as exc:
        raise ConfigError(f"--server: {exc}") from None
    return str(args.server)


def _tls(args: argparse.Namespace) -> ssl.SSLContext | None:
    if args.ca_file:
        return ssl.create_default_context(cafile=args.ca_file)
    if args.tls:
        return ssl.create_default_context()
    return None


def _run(command: Command, args: argparse.Namespace) -> int:
    address = _address(args)
    tls = _tls(args)

    async def main() -> int:
        async with Client.connect(
            address, token=args.token, tls=tls, timeout=args.timeout, lazy=True
        ) as client:
            return await command(client, args)

    try:
        return trio.run(main)
    except ClientError as exc:
        print(f"error: {exc.status}: {exc.message}", file=sys.stderr)
        return 1


def _common() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("connection")
    group.add_argument(
        "--server",
        metavar="HOST:PORT",
        default=os.environ.get("STACKDUCK_SERVER") or DEFAULT_SERVER,
        help=f"server address ($STACKDUCK_SERVER, default {DEFAULT_SERVER})",
    )
    group.add_argument(
        "--token",
        default=os.environ.get("STACKDUCK_TOKEN") or None,
        help="bearer token ($STACKDUCK_TOKEN)",
    )
    group.add_argument("--tls", action="store_true", help="connect with TLS")
    group.add_argument(
        "--ca-file", metavar="PEM", default=None, help="trust this CA for TLS (implies --tls)"
    )
    group.add_argument(
        "--timeout", type=float, default=10.0, metavar="SECONDS", help="deadline of each call"
    )
    common.add_argument("--json", action="store_true", help="print JSON on stdout")
    return common


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def add_client_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register the client subcommands on the ``stackduck-trio`` parser.

    Each subcommand sets ``args.run``, a function ``(args) -> exit code``.
    """
    common = _common()

    def command(name: str, fn: Command, help_text: str) -> argparse.ArgumentParser:
        parser = sub.add_parser(name, parents=[common], help=help_text, description=help_text)
        parser.set_defaults(run=functools.partial(_run, fn))
        return parser

    enqueue = command("enqueue", _enqueue, "enqueue a job; prints its id")
    enqueue.add_argument("job_type", metavar="TYPE")
    enqueue.add_argument(
        "payload", metavar="PAYLOAD", nargs="?", default=None, help="JSON text; '-' reads stdin"
    )
    enqueue.add_argument("--priority", type=int, metavar="1-3", help="1 high .. 3 low (default 2)")
    enqueue.add_argument(
        "--delay", type=int, metavar="SECONDS", help="retry backoff base (default 30)"
    )
    enqueue.add_argument("--max-retries", type=int, metavar="N", help="default 2")
    enqueue.add_argument(
        "--at", metavar="TIME", help="not before TIME: RFC 3339 with offset, or Unix seconds"
    )

    job = command("job", _job, "show a job")
    job.add_argument("job_id", metavar="ID")

    command("stats", _stats, "queue statistics per job type")

    dlq = sub.add_parser("dlq", help="the dead-letter queue: list, requeue, purge")
    dlq_sub = dlq.add_subparsers(dest="dlq_command", required=True, metavar="ACTION")
    listing = dlq_sub.add_parser("list", parents=[common], help="list dead jobs")
    listing.add_argument("--type", metavar="TYPE", help="only this job type")
    listing.add_argument("--limit", type=_positive, default=100, help="at most N jobs (100)")
    listing.set_defaults(run=functools.partial(_run, _dlq_list))
    for name, fn, verb in (("requeue", _dlq_requeue, "requeue"), ("purge", _dlq_purge, "delete")):
        action = dlq_sub.add_parser(
            name, parents=[common], help=f"{verb} dead jobs: by id, or every one of --type"
        )
        action.add_argument("job_ids", metavar="ID", nargs="*")
        action.add_argument("--type", metavar="TYPE", help="every dead job of TYPE ('*': all)")
        action.set_defaults(run=functools.partial(_run, fn))

    pause = command("pause", _pause, "stop delivering jobs of a type")
    pause.add_argument("job_type", metavar="TYPE")
    resume = command("resume", _resume, "resume delivering jobs of a type")
    resume.add_argument("job_type", metavar="TYPE")
    limit = command("limit", _limit, "set a job type's rate and concurrency limits (cluster-wide)")
    limit.add_argument("job_type", metavar="TYPE")
    limit.add_argument("--rate", type=float, default=0.0, help="jobs per second that may start")
    limit.add_argument(
        "--burst", type=int, default=0, help="jobs that may start at once (needs --rate; 1)"
    )
    limit.add_argument(
        "--max-running", type=int, default=0, help="jobs running at most, across every worker"
    )
    limit.add_argument("--clear", action="store_true", help="remove the type's limits")
    cancel = command("cancel", _cancel, "cancel a job that has not finished")
    cancel.add_argument("job_id", metavar="ID")

    worker = sub.add_parser(
        "worker",
        parents=[common],
        help="run handlers for jobs (until SIGINT/SIGTERM)",
        description="Run a worker. HANDLERS names a dict in an importable module mapping job "
        "types to handlers (async def handler(job) or plain functions, run in threads), e.g. "
        "myapp.jobs:HANDLERS. SIGINT/SIGTERM stops gracefully; a second one stops now.",
    )
    worker.add_argument("handlers", metavar="MODULE:HANDLERS")
    worker.add_argument("--concurrency", type=_positive, default=10, help="jobs at once (10)")
    worker.add_argument("--lease-seconds", type=_positive, default=None, metavar="SECONDS")
    worker.add_argument("--worker-id", default=None)
    worker.add_argument(
        "--grace-period",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="on stop, how long running jobs may finish (30)",
    )
    worker.add_argument(
        "--log-level", default="info", choices=("debug", "info", "warning", "error")
    )
    worker.set_defaults(run=_worker_command)
