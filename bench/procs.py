"""Load-generating child processes of the benchmark: producers, workers, idle streams.

``bench.run`` starts each as ``python -m bench.procs ROLE CONFIG_JSON``, so that
producers and workers never share a process (or a GIL) with the server or with
each other. The protocol is line-based on stdin/stdout:

* child -> ``READY {...}``: imports done and, for producers, connected (one
  warm-up ``GetStats`` call, so the first measured call pays no set-up);
* parent -> ``go``: start the measured work;
* child -> ``CONNECTED {...}`` (workers, idle streams): the job stream(s) are open;
* parent -> ``stop`` (workers, idle streams): stop gracefully;
* child -> ``RESULT {...}``: the measurements; then the child exits.

Diagnostics go to stderr (a log file per child). Times in results are
``time.time()`` (same machine, same clock as the other processes) unless named
``*_s`` (durations).

Roles:

``producer``  the Python client (trio). Modes: ``seq`` (one job per call, each
              awaited), ``inflight`` (``concurrency`` calls in flight on one
              connection), ``batch`` (``EnqueueJobs`` of ``batch`` jobs,
              ``concurrency`` batches in flight), ``paced`` (open loop at ``rate``
              jobs/s; each job's payload carries its send time, for latency;
              ``tick`` > 0 sends the jobs due every ``tick`` seconds as one batch).
``grpcio``    the official grpcio client, unary ``EnqueueJob``: ``seq`` or
              ``inflight`` (a window of ``concurrency`` futures).
``worker``    :class:`stackduck_trio.Worker` at its default settings (unless
              ``concurrency`` is given) with a no-op async handler that records
              its start time (and, with ``latency``, start minus the payload's send
              time).
``idle``      ``streams`` idle ``ConsumeJobs`` streams, one connection each, on a
              job type nobody enqueues; they receive only heartbeats.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

STREAM_HEARTBEAT_TIMEOUT = 30.0


def emit(tag: str, data: dict[str, Any] | None = None) -> None:
    sys.stdout.write(f"{tag} {json.dumps(data or {})}\n")
    sys.stdout.flush()


def wait_line(expected: str) -> None:
    """Block until the parent sends ``expected`` (EOF: the parent is gone, exit)."""
    while True:
        line = sys.stdin.readline()
        if not line:
            sys.exit(3)
        if line.strip() == expected:
            return


def cpu() -> float:
    return time.process_time()


def payload_counter(i: int) -> str:
    return f'{{"i":{i}}}'


def payload_now() -> str:
    return f'{{"t":{time.time():.6f}}}'


# ---------------------------------------------------------------------------------------
# producer (Python client)
# ---------------------------------------------------------------------------------------


async def _producer(cfg: dict[str, Any]) -> None:
    import trio

    from stackduck_trio import Client
    from stackduck_trio._client import ClientError, JobRequest

    mode = cfg["mode"]
    n = int(cfg["n"])
    job_type = cfg.get("job_type", "bench")
    concurrency = int(cfg.get("concurrency", 1))
    batch = int(cfg.get("batch", 1000))
    errors: list[str] = []
    rtts: list[float] = []
    late: list[float] = []

    async with Client.connect(cfg["address"], timeout=float(cfg.get("timeout", 30))) as client:
        await client.stats()  # warm-up: connection and method tables ready
        emit("READY")
        await trio.to_thread.run_sync(wait_line, "go")
        c0, t0 = cpu(), time.time()
        sent = 0

        if mode == "seq":
            for i in range(n):
                try:
                    await client.enqueue(job_type, payload_counter(i))
                except ClientError as exc:
                    errors.append(str(exc))
            sent = n

        elif mode == "inflight":
            counter = iter(range(n))

            async def loop() -> None:
                for i in counter:
                    try:
                        await client.enqueue(job_type, payload_counter(i))
                    except ClientError as exc:
                        errors.append(str(exc))

            async with trio.open_nursery() as nursery:
                for _ in range(concurrency):
                    nursery.start_soon(loop)
            sent = n

        elif mode == "batch":
            starts = iter(range(0, n, batch))

            async def batch_loop() -> None:
                for start in starts:
                    jobs = [
                        JobRequest(job_type=job_type, payload=payload_counter(i))
                        for i in range(start, min(n, start + batch))
                    ]
                    try:
                        results = await client.enqueue_many(jobs)
                    except ClientError as exc:
                        errors.append(str(exc))
                        continue
                    bad = [r for r in results if not r.ok]
                    if bad:
                        errors.append(f"{len(bad)} items rejected: {bad[0].message}")

            async with trio.open_nursery() as nursery:
                for _ in range(concurrency):
                    nursery.start_soon(batch_loop)
            sent = n

        elif mode == "paced":
            rate = float(cfg["rate"])
            tick = float(cfg.get("tick", 0.0))
            max_inflight = int(cfg.get("max_inflight", 1000))
            limit = trio.Semaphore(max_inflight)
            start = time.monotonic() + 0.01

            async def one() -> None:
                try:
                    s = time.perf_counter()
                    await client.enqueue(job_type, payload_now())
                    rtts.append(time.perf_counter() - s)
                except ClientError as exc:
                    errors.append(str(exc))
                finally:
                    limit.release()

            async def many(k: int) -> None:
                try:
                    payload = payload_now()
                    s = time.perf_counter()
                    await client.enqueue_many([JobRequest(job_type=job_type, payload=payload)] * k)
                    rtts.append(time.perf_counter() - s)
                except ClientError as exc:
                    errors.append(str(exc))
                finally:
                    limit.release()

            async with trio.open_nursery() as nursery:
                i = 0
                if tick > 0:
                    # one EnqueueJobs call every tick with every job due by then
                    j = 0
                    while i < n:
                        delay = start + j * tick - time.monotonic()
                        if delay > 0:
                            await trio.sleep(delay)
                        else:
                            late.append(-delay)
                        due = min(n, int((time.monotonic() - start) * rate) + 1)
                        if due > i:
                            await limit.acquire()
                            nursery.start_soon(many, due - i)
                            i = due
                        j += 1
                else:
                    while i < n:
                        delay = start + i / rate - time.monotonic()
                        if delay > 0:
                            await trio.sleep(delay)
                        else:
                            late.append(-delay)
                        await limit.acquire()
                        nursery.start_soon(one)
                        i += 1
            sent = n
        else:
            raise SystemExit(f"unknown producer mode {mode!r}")

        t1, c1 = time.time(), cpu()
    emit(
        "RESULT",
        {
            "t_start": t0,
            "t_end": t1,
            "sent": sent,
            "errors": len(errors),
            "first_errors": errors[:3],
            "cpu_s": c1 - c0,
            "rtts": rtts,
            "late_count": len(late),
            "late_max_s": max(late, default=0.0),
        },
    )


# ---------------------------------------------------------------------------------------
# producer (grpcio)
# ---------------------------------------------------------------------------------------


def _grpcio(cfg: dict[str, Any]) -> None:
    import collections

    import grpc

    from stackduck_trio._proto import stackduck_pb2 as pb
    from stackduck_trio._proto import stackduck_pb2_grpc as rpc

    mode = cfg["mode"]
    n = int(cfg["n"])
    job_type = cfg.get("job_type", "bench")
    window = int(cfg.get("concurrency", 64))
    errors: list[str] = []
    channel = grpc.insecure_channel(cfg["address"])
    stub = rpc.StackDuckServiceStub(channel)
    grpc.channel_ready_future(channel).result(timeout=10)
    stub.GetStats(pb.GetStatsRequest(), timeout=10)  # warm-up
    emit("READY")
    wait_line("go")
    c0, t0 = cpu(), time.time()
    if mode == "seq":
        for i in range(n):
            try:
                stub.EnqueueJob(
                    pb.EnqueueJobRequest(job_type=job_type, payload=payload_counter(i)),
                    timeout=30,
                )
            except grpc.RpcError as exc:
                errors.append(str(exc.code()))
    elif mode == "inflight":
        pending: collections.deque[Any] = collections.deque()

        def settle(future: Any) -> None:
            try:
                future.result()
            except grpc.RpcError as exc:
                errors.append(str(exc.code()))

        for i in range(n):
            if len(pending) >= window:
                settle(pending.popleft())
            pending.append(
                stub.EnqueueJob.future(
                    pb.EnqueueJobRequest(job_type=job_type, payload=payload_counter(i)),
                    timeout=30,
                )
            )
        while pending:
            settle(pending.popleft())
    else:
        raise SystemExit(f"unknown grpcio mode {mode!r}")
    t1, c1 = time.time(), cpu()
    channel.close()
    emit(
        "RESULT",
        {
            "t_start": t0,
            "t_end": t1,
            "sent": n,
            "errors": len(errors),
            "first_errors": errors[:3],
            "cpu_s": c1 - c0,
        },
    )


# ---------------------------------------------------------------------------------------
# worker
# ---------------------------------------------------------------------------------------


async def _worker(cfg: dict[str, Any]) -> None:
    import trio

    from stackduck_trio import Worker

    job_type = cfg.get("job_type", "bench")
    latency = bool(cfg.get("latency", False))
    track_acks = bool(cfg.get("track_acks", False))
    marks = sorted(int(m) for m in cfg.get("marks", ()))
    state: dict[str, Any] = {"first": None, "last": None, "count": 0}
    latencies: list[float] = []

    async def handler(job: Any) -> None:
        now = time.time()
        if state["first"] is None:
            state["first"] = now
        state["last"] = now
        state["count"] += 1
        if latency:
            latencies.append(now - json.loads(job.payload)["t"])

    kwargs: dict[str, Any] = {}
    if cfg.get("concurrency"):
        kwargs["concurrency"] = int(cfg["concurrency"])
    worker = Worker(cfg["address"], {job_type: handler}, **kwargs)
    emit("READY")
    await trio.to_thread.run_sync(wait_line, "go")
    c0, t_go = cpu(), time.time()
    ack_state: dict[str, Any] = {"last_ack_at": None, "acks": 0, "marks": {}}

    async def watch_acks() -> None:
        # Polls the worker's counter to time-stamp the last accepted ack (the end of a
        # drain) and the moments given counts were reached.
        pending = list(marks)
        while True:
            acks = worker.statistics().acks_sent
            if acks != ack_state["acks"]:
                now = time.time()
                ack_state["acks"] = acks
                ack_state["last_ack_at"] = now
                while pending and acks >= pending[0]:
                    ack_state["marks"][str(pending.pop(0))] = now
            await trio.sleep(0.001)

    async def stop_on_line() -> None:
        await trio.to_thread.run_sync(wait_line, "stop", abandon_on_cancel=True)
        worker.stop()

    async def announce() -> None:
        await worker.wait_connected()
        emit("CONNECTED", {"t": time.time()})

    async with trio.open_nursery() as nursery:
        nursery.start_soon(stop_on_line)
        nursery.start_soon(announce)
        if track_acks:
            nursery.start_soon(watch_acks)
        # Returns after stop(): running handlers finished, acks flushed, stream reset.
        await worker.run()
        stats = worker.statistics()
        nursery.cancel_scope.cancel()
    c1 = cpu()
    emit(
        "RESULT",
        {
            "t_go": t_go,
            "first_start": state["first"],
            "last_start": state["last"],
            "handled": state["count"],
            "last_ack_at": ack_state["last_ack_at"],
            "marks": ack_state["marks"],
            "acks_sent": stats.acks_sent,
            "acks_rejected": stats.acks_rejected,
            "ack_batches": stats.ack_batches,
            "reconnects": stats.reconnects,
            "cpu_s": c1 - c0,
            "latencies": latencies,
        },
    )


# ---------------------------------------------------------------------------------------
# idle streams
# ---------------------------------------------------------------------------------------


async def _idle(cfg: dict[str, Any]) -> None:
    import trio

    from stackduck_trio import Client
    from stackduck_trio._client import ClientError

    n = int(cfg["streams"])
    job_type = cfg.get("job_type", "idle")
    opened = 0
    all_open = trio.Event()
    counters = {"heartbeats": 0, "jobs": 0, "errors": 0}
    errors: list[str] = []
    connect_limit = trio.Semaphore(int(cfg.get("connect_concurrency", 32)))

    streams: list[Any] = []

    async def one(i: int) -> None:
        nonlocal opened
        await connect_limit.acquire()
        released = False
        try:
            async with Client.connect(
                cfg["address"], timeout=30, stream_idle_timeout=STREAM_HEARTBEAT_TIMEOUT
            ) as client:
                async with client.consume([job_type], worker_id=f"idle-{i}", prefetch=10) as s:
                    streams.append(s)
                    connect_limit.release()
                    released = True
                    opened += 1
                    if opened == n:
                        all_open.set()
                    async for _job in s:
                        counters["jobs"] += 1
        except ClientError as exc:
            counters["errors"] += 1
            errors.append(str(exc))
        finally:
            if not released:
                connect_limit.release()

    emit("READY")
    await trio.to_thread.run_sync(wait_line, "go")
    c0, t0 = cpu(), time.time()
    async with trio.open_nursery() as nursery:
        for i in range(n):
            nursery.start_soon(one, i)
        with trio.move_on_after(120):
            await all_open.wait()
        emit("CONNECTED", {"t": time.time(), "open_s": time.time() - t0, "opened": opened})
        await trio.to_thread.run_sync(wait_line, "stop", abandon_on_cancel=True)
        nursery.cancel_scope.cancel()
    counters["heartbeats"] = sum(s.heartbeats for s in streams)
    emit(
        "RESULT",
        {"opened": opened, **counters, "first_errors": errors[:3], "cpu_s": cpu() - c0},
    )


def main(argv: list[str]) -> None:
    role, cfg = argv[0], json.loads(argv[1])
    if role == "grpcio":
        _grpcio(cfg)
        return
    import trio

    fn = {"producer": _producer, "worker": _worker, "idle": _idle}[role]
    trio.run(fn, cfg)


if __name__ == "__main__":
    main(sys.argv[1:])
