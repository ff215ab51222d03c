"""The benchmark scenarios. Each run starts its own server (fresh data directory).

Every scenario function takes a :class:`Ctx` and returns a flat dict of metrics
(numbers; lists and strings are kept in the JSON but not in medians). The table
columns each scenario shows are declared in :data:`SCENARIOS` (``Metric``).
"""

from __future__ import annotations

import contextlib
import pathlib
import shutil
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import attrs

from .server import BenchError, BenchServer, Child, Meter, NotApplicable, Profiler

JOB_TYPE = "bench"


# ---------------------------------------------------------------------------------------
# context
# ---------------------------------------------------------------------------------------


@attrs.define
class Ctx:
    backend: str
    workroot: pathlib.Path
    artifacts: pathlib.Path
    server_args: list[str]
    quick: bool = False
    big: bool = False
    profile: bool = False
    #: median metrics of scenarios already run (latency_half reads drain_1w's rate)
    done: dict[str, dict[str, Any]] = attrs.Factory(dict)
    half_rate: float | None = None
    scenario: str = ""
    run_index: int = 0
    _serial: int = 0

    def size(self, default: int, quick: int | None = None) -> int:
        return (quick if quick is not None else max(1, default // 10)) if self.quick else default

    def _label(self, what: str) -> str:
        self._serial += 1
        return f"{self.scenario}-r{self.run_index}-{self._serial:02d}-{what}"

    @contextlib.contextmanager
    def server(self) -> Iterator[BenchServer]:
        with self.servers(1) as (server,):
            yield server

    @contextlib.contextmanager
    def servers(self, n: int, extra_args: Sequence[str] = ()) -> Iterator[list[BenchServer]]:
        """n servers on one fresh schema (and Redis prefix), each with its own port,
        workdir and log: a cluster (n > 1 needs --backend postgres or redis). Started
        one after the other (the first migrates the schema); all are stopped before the
        first, the owner, drops the schema. ``extra_args`` follow ``--server-arg``'s."""
        args = [*self.server_args, *extra_args]
        labels = [self._label("server" if n == 1 else f"server{i}") for i in range(n)]
        cluster: list[BenchServer] = []
        for label in labels:
            share = cluster[0] if cluster else None
            cluster.append(BenchServer(self.backend, self.workroot / label, args, share_with=share))
        try:
            for server in cluster:
                server.start()
            yield cluster
        except BaseException:
            for server in cluster:
                server.kill()
            raise
        finally:
            for server in reversed(cluster):
                server.stop()
            for label, server in zip(labels, cluster, strict=True):
                try:
                    server.cleanup()
                except Exception as exc:  # noqa: BLE001 - report, do not mask the run's outcome
                    print(f"cleanup of {label} failed: {exc}", file=sys.stderr)
                log = server.log_path
                if log.exists():
                    shutil.copy(log, self.artifacts / f"{label}.log")
                shutil.rmtree(server.workdir, ignore_errors=True)

    def child(self, role: str, config: dict[str, Any]) -> Child:
        return Child(role, config, self.artifacts / f"{self._label(role)}.log")

    @contextlib.contextmanager
    def window(
        self,
        server: BenchServer | Sequence[BenchServer],
        what: str,
        children: Iterable[Child] = (),
    ) -> Iterator[dict[str, Any]]:
        """Measure server CPU (summed over a cluster's servers) and machine load over a
        block; with --profile, py-spy samples the server(s) and the given children
        (producers, workers) meanwhile."""
        servers = [server] if isinstance(server, BenchServer) else list(server)
        profilers: list[tuple[str, Profiler]] = []
        if self.profile:
            label = self._label(what)
            for j, srv in enumerate(servers):
                name = "server" if len(servers) == 1 else f"server{j}"
                out = self.artifacts / f"{label}.{name}.pyspy.raw"
                profilers.append(("profile", Profiler(srv.pid, out)))
            for i, child in enumerate(children):
                out = self.artifacts / f"{label}.{child.role}{i}.pyspy.raw"
                profilers.append((f"{child.role}_profile", Profiler(child.proc.pid, out)))
        meter = Meter(*(srv.pid for srv in servers)).start()
        out: dict[str, Any] = {}
        try:
            yield out
        finally:
            out.update(meter.stop())
            for key, profiler in profilers:
                path = profiler.stop()
                if path is not None:
                    if key == "profile" and len(servers) == 1:
                        out[key] = str(path)
                    else:
                        out.setdefault(key, []).append(str(path))


class StatsProbe:
    """``GetStats`` over grpcio, from the orchestrator (about 3 ms of server CPU per 10 calls).

    Given a cluster's addresses, :meth:`completed` sums the servers' counters (each
    counts the acks it took); the other readings are the first server's (``queued`` is
    the cluster's there: the shared tier's)."""

    def __init__(self, address: str, *more: str) -> None:
        import grpc

        from stackduck_trio._proto import stackduck_pb2 as pb
        from stackduck_trio._proto import stackduck_pb2_grpc as rpc

        self._pb = pb
        self._channels = [grpc.insecure_channel(a) for a in (address, *more)]
        self._stubs = [rpc.StackDuckServiceStub(c) for c in self._channels]

    def close(self) -> None:
        for channel in self._channels:
            channel.close()

    def of(self, job_type: str = JOB_TYPE, index: int = 0) -> Any:
        response = self._stubs[index].GetStats(self._pb.GetStatsRequest(), timeout=30)
        for t in response.types:
            if t.job_type == job_type:
                return t
        return None

    def completed(self, job_type: str = JOB_TYPE) -> int:
        total = 0
        for index in range(len(self._stubs)):
            t = self.of(job_type, index)
            total += 0 if t is None else int(t.completed)
        return total

    def queued(self, job_type: str = JOB_TYPE) -> int:
        t = self.of(job_type)
        return 0 if t is None else int(t.queued_p1 + t.queued_p2 + t.queued_p3)

    def wait(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise BenchError(f"timed out after {timeout:.0f} s waiting for {what}")
            time.sleep(0.02)


def pct(values: list[float], q: float) -> float:
    """The q-quantile (0..1) by linear interpolation; nan for no values."""
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def per_job_us(seconds: float, jobs: int) -> float:
    return seconds / jobs * 1e6 if jobs else float("nan")


def _timeout(n: int, floor_rate: float = 300.0) -> float:
    """Generous bound for n jobs (never below floor_rate jobs/s, plus 60 s)."""
    return 60.0 + n / floor_rate


# ---------------------------------------------------------------------------------------
# building blocks
# ---------------------------------------------------------------------------------------


def run_producer(
    ctx: Ctx, server: BenchServer, role: str, config: dict[str, Any], what: str
) -> dict[str, Any]:
    """One producer child, measured from ``go`` to its result."""
    return run_producers(ctx, [server], role, config, what)


def run_producers(
    ctx: Ctx, servers: Sequence[BenchServer], role: str, config: dict[str, Any], what: str
) -> dict[str, Any]:
    """One producer child per server (each with ``config``), all sent ``go`` together;
    the rate is all their jobs over [the first start, the last producer's last answer],
    the server CPU the servers' sum."""
    children = [ctx.child(role, {"address": s.address, **config}) for s in servers]
    try:
        for child in children:
            child.expect("READY", 60)
        with ctx.window(servers, what, children) as win:
            for child in children:
                child.send("go")
            timeout = _timeout(int(config.get("n", 0)))
            results = [child.expect("RESULT", timeout) for child in children]
        for child in children:
            child.finish()
    finally:
        for child in children:
            child.kill()
    n = sum(int(r["sent"]) for r in results)
    duration = max(r["t_end"] for r in results) - min(r["t_start"] for r in results)
    out = {
        "jobs": n,
        "duration_s": duration,
        "rate": n / duration if duration > 0 else float("nan"),
        "server_cpu_us_per_job": per_job_us(win["server_cpu_s"], n),
        "client_cpu_us_per_job": per_job_us(sum(r["cpu_s"] for r in results), n),
        "machine_busy_pct": win["machine_busy_pct"],
        "errors": sum(r["errors"] for r in results),
    }
    if len(results) > 1:
        out["producer_rates"] = [
            r["sent"] / (r["t_end"] - r["t_start"]) if r["t_end"] > r["t_start"] else None
            for r in results
        ]
        out["server_cpu_s_each"] = win["server_cpu_s_each"]
    first_errors = [e for r in results for e in r.get("first_errors") or ()]
    if first_errors:
        out["first_errors"] = first_errors[:3]
    out.update({k: v for k, v in win.items() if k.endswith("profile")})
    if any("rtts" in r for r in results):
        out["_rtts"] = [v for r in results for v in r.get("rtts", ())]
        out["_late_count"] = sum(r.get("late_count", 0) for r in results)
    return out


def fill(ctx: Ctx, server: BenchServer, n: int, batch: int = 5000) -> dict[str, Any]:
    """Enqueue n jobs with EnqueueJobs (set-up of drain scenarios)."""
    return run_producer(
        ctx,
        server,
        "producer",
        {"mode": "batch", "n": n, "batch": batch, "concurrency": 2},
        "fill",
    )


def start_workers(
    ctx: Ctx, server: BenchServer | Sequence[BenchServer], count: int, **config: Any
) -> list[Child]:
    """``count`` worker children; given a cluster, worker i connects to server i mod n."""
    servers = [server] if isinstance(server, BenchServer) else list(server)
    workers = [
        ctx.child(
            "worker",
            {"address": servers[i % len(servers)].address, "job_type": JOB_TYPE, **config},
        )
        for i in range(count)
    ]
    for w in workers:
        w.expect("READY", 60)
    return workers


def stop_workers(workers: list[Child]) -> list[dict[str, Any]]:
    for w in workers:
        w.send("stop")
    try:
        results = [w.expect("RESULT", 90) for w in workers]
    finally:
        for w in workers:
            w.finish(10)
    return results


def drain(
    ctx: Ctx,
    server: BenchServer | Sequence[BenchServer],
    probe: StatsProbe,
    *,
    workers: int,
    jobs: int,
    what: str,
    worker_config: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Start ``workers`` worker processes on a queue holding (at least) ``jobs`` jobs and
    measure until ``jobs`` more completions; the rate is over [first handler start,
    the ack that reached ``jobs``]. Given a cluster (and a probe of all its servers),
    the workers are spread over the servers and the server CPU is their sum."""
    base = probe.completed()
    children = start_workers(
        ctx, server, workers, track_acks=True, marks=[jobs], **(worker_config or {})
    )
    try:
        with ctx.window(server, what, children) as win:
            for w in children:
                w.send("go")
            probe.wait(lambda: probe.completed() - base >= jobs, _timeout(jobs), f"{what}")
            done_in_window = probe.completed() - base
        results = stop_workers(children)
    finally:
        for w in children:
            w.kill()
    first = min(r["first_start"] for r in results if r["first_start"] is not None)
    if workers == 1:
        end = results[0]["marks"].get(str(jobs)) or results[0]["last_ack_at"]
    else:
        end = max(r["last_ack_at"] for r in results if r["last_ack_at"] is not None)
    duration = end - first
    go = min(r["t_go"] for r in results)
    out = {
        "jobs": jobs,
        "duration_s": duration,
        "rate": jobs / duration if duration > 0 else float("nan"),
        "startup_ms": (first - go) * 1e3,
        "server_cpu_us_per_job": per_job_us(win["server_cpu_s"], done_in_window),
        "worker_cpu_us_per_job": per_job_us(
            sum(r["cpu_s"] for r in results), sum(r["handled"] for r in results)
        ),
        "machine_busy_pct": win["machine_busy_pct"],
        "ack_batch_mean": sum(r["acks_sent"] for r in results)
        / max(1, sum(r["ack_batches"] for r in results)),
        "handled_per_worker": [r["handled"] for r in results],
        "reconnects": sum(r["reconnects"] for r in results),
    }
    out.update({k: v for k, v in win.items() if k.endswith("profile")})
    return out


def latency_run(
    ctx: Ctx,
    server: BenchServer,
    probe: StatsProbe,
    *,
    rate: float,
    n: int,
    tick: float = 0.0,
    what: str,
    job_type: str = JOB_TYPE,
) -> dict[str, Any]:
    """One worker (default settings) connected, then a paced producer of ``n`` jobs at
    ``rate`` jobs/s; latency = handler start - the producer's send time."""
    base = probe.completed(job_type)
    (worker,) = start_workers(ctx, server, 1, latency=True, job_type=job_type)
    try:
        worker.send("go")
        worker.expect("CONNECTED", 30)
        produced = run_producer(
            ctx,
            server,
            "producer",
            {"mode": "paced", "n": n, "rate": rate, "tick": tick, "job_type": job_type},
            what,
        )
        probe.wait(lambda: probe.completed(job_type) - base >= n, _timeout(n), what)
        (result,) = stop_workers([worker])
    finally:
        worker.kill()
    lat_ms = [v * 1e3 for v in result["latencies"]]
    rtt_ms = [v * 1e3 for v in produced.pop("_rtts")]
    late = produced.pop("_late_count")
    return {
        "jobs": n,
        "target_rate": rate,
        "achieved_rate": produced["rate"],
        "producer_late_sends": late,
        "p50_ms": pct(lat_ms, 0.50),
        "p90_ms": pct(lat_ms, 0.90),
        "p99_ms": pct(lat_ms, 0.99),
        "max_ms": max(lat_ms, default=float("nan")),
        "mean_ms": statistics.fmean(lat_ms) if lat_ms else float("nan"),
        "call_rtt_p50_ms": pct(rtt_ms, 0.50),
        "call_rtt_p99_ms": pct(rtt_ms, 0.99),
        "server_cpu_us_per_job": produced["server_cpu_us_per_job"],
        "machine_busy_pct": produced["machine_busy_pct"],
        "samples": len(lat_ms),
        **{k: v for k, v in produced.items() if k.endswith("profile")},
    }


# ---------------------------------------------------------------------------------------
# scenarios
# ---------------------------------------------------------------------------------------


def enqueue_seq(ctx: Ctx) -> dict[str, Any]:
    with ctx.server() as server:
        return run_producer(
            ctx, server, "producer", {"mode": "seq", "n": ctx.size(10_000)}, "enqueue"
        )


def enqueue_inflight(ctx: Ctx) -> dict[str, Any]:
    with ctx.server() as server:
        return run_producer(
            ctx,
            server,
            "producer",
            {"mode": "inflight", "n": ctx.size(20_000), "concurrency": 64},
            "enqueue",
        )


def enqueue_grpcio(ctx: Ctx) -> dict[str, Any]:
    with ctx.server() as server:
        return run_producer(
            ctx, server, "grpcio", {"mode": "seq", "n": ctx.size(10_000)}, "enqueue"
        )


def enqueue_grpcio_inflight(ctx: Ctx) -> dict[str, Any]:
    with ctx.server() as server:
        return run_producer(
            ctx,
            server,
            "grpcio",
            {"mode": "inflight", "n": ctx.size(20_000), "concurrency": 64},
            "enqueue",
        )


def enqueue_batch(ctx: Ctx) -> dict[str, Any]:
    with ctx.server() as server:
        return run_producer(
            ctx,
            server,
            "producer",
            {"mode": "batch", "n": ctx.size(200_000), "batch": 1000, "concurrency": 1},
            "enqueue",
        )


def enqueue_batch_inflight(ctx: Ctx) -> dict[str, Any]:
    with ctx.server() as server:
        return run_producer(
            ctx,
            server,
            "producer",
            {"mode": "batch", "n": ctx.size(200_000), "batch": 1000, "concurrency": 4},
            "enqueue",
        )


def _drain_scenario(ctx: Ctx, workers: int, **worker_config: Any) -> dict[str, Any]:
    n = ctx.size(10_000)
    with ctx.server() as server:
        probe = StatsProbe(server.address)
        try:
            filled = fill(ctx, server, n)
            probe.wait(lambda: probe.queued() >= n, 60, "the queue to fill")
            out = drain(
                ctx,
                server,
                probe,
                workers=workers,
                jobs=n,
                what="drain",
                worker_config=worker_config,
            )
            out["fill_rate"] = filled["rate"]
            return out
        finally:
            probe.close()


def drain_1w(ctx: Ctx) -> dict[str, Any]:
    return _drain_scenario(ctx, 1)


def drain_4w(ctx: Ctx) -> dict[str, Any]:
    return _drain_scenario(ctx, 4)


def drain_1w_c100(ctx: Ctx) -> dict[str, Any]:
    return _drain_scenario(ctx, 1, concurrency=100)


def latency_light(ctx: Ctx) -> dict[str, Any]:
    n = ctx.size(200, quick=50)
    with ctx.server() as server:
        probe = StatsProbe(server.address)
        try:
            return latency_run(ctx, server, probe, rate=200.0, n=n, what="latency")
        finally:
            probe.close()


def _half_rate(ctx: Ctx) -> float:
    if ctx.half_rate:
        return ctx.half_rate
    if "drain_1w" not in ctx.done:
        scenario, run_index = ctx.scenario, ctx.run_index
        ctx.scenario = "drain_1w(for-half-rate)"
        try:
            ctx.done["drain_1w"] = drain_1w(ctx)
        finally:
            ctx.scenario, ctx.run_index = scenario, run_index
    ctx.half_rate = 0.5 * float(ctx.done["drain_1w"]["rate"])
    return ctx.half_rate


def _latency_half(ctx: Ctx, tick: float) -> dict[str, Any]:
    rate = _half_rate(ctx)
    duration = 1.0 if ctx.quick else 4.0
    n = max(100, min(int(rate * duration), 50_000))
    with ctx.server() as server:
        probe = StatsProbe(server.address)
        try:
            return latency_run(ctx, server, probe, rate=rate, n=n, tick=tick, what="latency")
        finally:
            probe.close()


def latency_half(ctx: Ctx) -> dict[str, Any]:
    return _latency_half(ctx, 0.0)


def latency_half_batched(ctx: Ctx) -> dict[str, Any]:
    return _latency_half(ctx, 0.005)


def idle_streams(ctx: Ctx) -> dict[str, Any]:
    streams = ctx.size(1000)
    idle_window = 2.5 if ctx.quick else 6.0
    n_probe = ctx.size(200, quick=50)
    with ctx.server() as server:
        probe = StatsProbe(server.address)
        idle = ctx.child("idle", {"address": server.address, "streams": streams})
        try:
            idle.expect("READY", 60)
            time.sleep(0.5)
            mem0 = server.memory()
            idle.send("go")
            opened = idle.expect("CONNECTED", 240)
            if opened["opened"] < streams:
                raise BenchError(f"only {opened['opened']} of {streams} streams opened")
            time.sleep(1.0)
            mem1 = server.memory()
            workers_seen = probe.of("idle")
            meter = Meter(server.pid).start()
            time.sleep(idle_window)
            idle_cpu = meter.stop()
            lat = latency_run(
                ctx, server, probe, rate=200.0, n=n_probe, what="latency-with-idle-streams"
            )
            mem2 = server.memory()
            idle.send("stop")
            result = idle.expect("RESULT", 120)
            idle.finish()
        finally:
            idle.kill()
            probe.close()
    return {
        "streams": streams,
        "open_s": opened["open_s"],
        "server_workers_seen": int(workers_seen.workers) if workers_seen is not None else -1,
        "rss_before_mb": mem0["rss_mb"],
        "rss_with_streams_mb": mem1["rss_mb"],
        "rss_after_probe_mb": mem2["rss_mb"],
        "kb_per_stream": (mem1["rss_mb"] - mem0["rss_mb"]) * 1024 / streams,
        "idle_server_cpu_pct": 100 * idle_cpu["server_cpu_s"] / idle_cpu["wall_s"],
        "p50_ms": lat["p50_ms"],
        "p99_ms": lat["p99_ms"],
        "max_ms": lat["max_ms"],
        "call_rtt_p50_ms": lat["call_rtt_p50_ms"],
        "call_rtt_p99_ms": lat["call_rtt_p99_ms"],
        "heartbeats": result["heartbeats"],
        "stream_errors": result["errors"],
        **{k: v for k, v in lat.items() if k.endswith("profile")},
    }


def big_queue(ctx: Ctx) -> dict[str, Any]:
    """Enqueue and claim costs on an empty queue vs one holding N jobs of the same type."""
    n_big = 1_000_000 if ctx.big else ctx.size(100_000)
    k_unary = ctx.size(2000)
    m_batch = ctx.size(10_000)
    out: dict[str, Any] = {"queued": n_big}
    with ctx.server() as server:
        probe = StatsProbe(server.address)
        try:

            def phase(name: str) -> None:
                unary = run_producer(
                    ctx, server, "producer", {"mode": "seq", "n": k_unary}, f"{name}-unary"
                )
                batch = run_producer(
                    ctx,
                    server,
                    "producer",
                    {"mode": "batch", "n": m_batch, "batch": 1000},
                    f"{name}-batch",
                )
                claim = drain(ctx, server, probe, workers=1, jobs=m_batch, what=f"{name}-drain")
                for key, res in (("unary", unary), ("batch", batch), ("drain", claim)):
                    out[f"{name}_{key}_rate"] = res["rate"]
                    out[f"{name}_{key}_server_us"] = res["server_cpu_us_per_job"]
                    for pkey, pval in res.items():
                        if pkey.endswith("profile"):
                            out[f"{name}_{key}_{pkey}"] = pval

            phase("empty")
            # the empty phase leaves k_unary jobs queued: drain them (untimed) first
            rest = probe.queued()
            if rest:
                drain(ctx, server, probe, workers=1, jobs=rest, what="empty-rest")
            out["rss_empty_mb"] = server.memory()["rss_mb"]
            filled = fill(ctx, server, n_big, batch=5000)
            probe.wait(lambda: probe.queued() >= n_big, 120, "the queue to fill")
            out["fill_rate"] = filled["rate"]
            out["fill_server_us"] = filled["server_cpu_us_per_job"]
            out["rss_full_mb"] = server.memory()["rss_mb"]
            phase("full")
            for key in ("unary", "batch", "drain"):
                out[f"{key}_rate_full_vs_empty"] = (
                    out[f"full_{key}_rate"] / out[f"empty_{key}_rate"]
                )
            if ctx.backend in ("sqlite", "postgres"):
                queued = probe.queued()
                probe.close()
                out["shutdown_s"] = server.stop()
                out["restart_s"] = server.start(timeout=600)
                out["restart_jobs"] = queued
                probe = StatsProbe(server.address)
                probe.wait(lambda: probe.queued() >= queued, 60, "the queue to be restored")
                out["rss_restored_mb"] = server.memory()["rss_mb"]
        finally:
            probe.close()
    return out


def _cluster_round(
    ctx: Ctx, n: int, per_producer: int, extra_args: list[str]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """A fresh cluster of n servers: one inflight producer per server (as
    enqueue_inflight), then the n * per_producer jobs drained by one worker per server."""
    total = per_producer * n
    with ctx.servers(n, extra_args) as cluster:
        probe = StatsProbe(*(s.address for s in cluster))
        try:
            enq = run_producers(
                ctx,
                cluster,
                "producer",
                {"mode": "inflight", "n": per_producer, "concurrency": 64},
                f"enqueue-{n}",
            )
            if enq["errors"]:
                raise BenchError(
                    f"{enq['errors']} enqueue errors with {n} servers: {enq.get('first_errors')}"
                )
            probe.wait(lambda: probe.queued() >= total, 60, "the queue to fill")
            dr = drain(ctx, cluster, probe, workers=n, jobs=total, what=f"drain-{n}")
        finally:
            probe.close()
    return enq, dr


def scale_servers(ctx: Ctx) -> dict[str, Any]:
    """Throughput of 1 vs 2 servers sharing one record store (and queue tier), each N
    on a fresh schema: enqueue with one producer per server, then drain with one worker
    (default settings) per server."""
    if ctx.backend not in ("redis", "postgres"):
        raise NotApplicable("needs --backend redis or postgres")
    # redis: REDIS_URL makes the tier redis; postgres: the record store is the queue
    # tier (without --queue postgres each server would keep a queue of its own)
    extra = ["--queue", "postgres"] if ctx.backend == "postgres" else []
    per_producer = ctx.size(20_000)  # as enqueue_inflight
    out: dict[str, Any] = {"jobs_per_producer": per_producer}
    for n in (1, 2):
        enq, dr = _cluster_round(ctx, n, per_producer, extra)
        out[f"enqueue_{n}"] = enq["rate"]
        out[f"drain_{n}"] = dr["rate"]
        for phase, res in (("enqueue", enq), ("drain", dr)):
            out[f"{phase}_server_cpu_us_per_job_{n}"] = res["server_cpu_us_per_job"]
            out[f"{phase}_machine_busy_pct_{n}"] = res["machine_busy_pct"]
            for key, value in res.items():
                if key.endswith("profile"):
                    out[f"{phase}_{n}_{key}"] = value
        out[f"enqueue_client_cpu_us_per_job_{n}"] = enq["client_cpu_us_per_job"]
        out[f"drain_worker_cpu_us_per_job_{n}"] = dr["worker_cpu_us_per_job"]
        out[f"drain_startup_ms_{n}"] = dr["startup_ms"]
        out[f"drain_handled_per_worker_{n}"] = dr["handled_per_worker"]
        if n > 1:
            out[f"enqueue_producer_rates_{n}"] = enq["producer_rates"]
    out["enqueue_gain"] = out["enqueue_2"] / out["enqueue_1"]
    out["drain_gain"] = out["drain_2"] / out["drain_1"]
    return out


# ---------------------------------------------------------------------------------------
# registry
# ---------------------------------------------------------------------------------------


@attrs.frozen
class Metric:
    key: str
    label: str
    unit: str  # "/s", "us", "ms", "MB", "KB", "%", "x", ""
    target: str = ""
    peer: str = ""


@attrs.frozen
class Scenario:
    name: str
    fn: Callable[[Ctx], dict[str, Any]]
    about: str
    metrics: tuple[Metric, ...]


_CPU = Metric("server_cpu_us_per_job", "server CPU / job", "us")
_BUSY = Metric("machine_busy_pct", "machine busy (2 cores)", "%")

SCENARIOS: tuple[Scenario, ...] = (
    Scenario(
        "enqueue_seq",
        enqueue_seq,
        "Python client, one job per call, each call awaited",
        (
            Metric("rate", "jobs/s", "/s", ">= 5,000", "dramatiq 3,670"),
            _CPU,
            Metric("client_cpu_us_per_job", "client CPU / job", "us"),
        ),
    ),
    Scenario(
        "enqueue_inflight",
        enqueue_inflight,
        "Python client, one job per call, 64 calls in flight on one connection",
        (
            Metric("rate", "jobs/s", "/s", ">= 5,000", "dramatiq 3,670"),
            _CPU,
            Metric("client_cpu_us_per_job", "client CPU / job", "us"),
            _BUSY,
        ),
    ),
    Scenario(
        "enqueue_grpcio",
        enqueue_grpcio,
        "grpcio stub, unary EnqueueJob (the original RPC), sequential",
        (
            Metric("rate", "jobs/s", "/s", ">= 5,000", "dramatiq 3,670"),
            _CPU,
            Metric("client_cpu_us_per_job", "client CPU / job", "us"),
        ),
    ),
    Scenario(
        "enqueue_grpcio_inflight",
        enqueue_grpcio_inflight,
        "grpcio stub, unary EnqueueJob, 64 futures in flight",
        (
            Metric("rate", "jobs/s", "/s", ">= 5,000", "dramatiq 3,670"),
            _CPU,
            Metric("client_cpu_us_per_job", "client CPU / job", "us"),
            _BUSY,
        ),
    ),
    Scenario(
        "enqueue_batch",
        enqueue_batch,
        "Python client, EnqueueJobs of 1,000 jobs, one call at a time",
        (
            Metric("rate", "jobs/s", "/s", ">= 50,000", "pgqueuer 34,800"),
            _CPU,
            Metric("client_cpu_us_per_job", "client CPU / job", "us"),
        ),
    ),
    Scenario(
        "enqueue_batch_inflight",
        enqueue_batch_inflight,
        "Python client, EnqueueJobs of 1,000 jobs, 4 calls in flight",
        (
            Metric("rate", "jobs/s", "/s", ">= 50,000", "pgqueuer 34,800"),
            _CPU,
            Metric("client_cpu_us_per_job", "client CPU / job", "us"),
            _BUSY,
        ),
    ),
    Scenario(
        "drain_1w",
        drain_1w,
        "N jobs queued, one worker process (Worker defaults: concurrency 10)",
        (
            Metric("rate", "jobs/s", "/s", ">= 10,000", "pgqueuer 4,800"),
            _CPU,
            Metric("worker_cpu_us_per_job", "worker CPU / job", "us"),
            Metric("ack_batch_mean", "acks per AckJobs call", ""),
            _BUSY,
        ),
    ),
    Scenario(
        "drain_4w",
        drain_4w,
        "N jobs queued, four worker processes",
        (
            Metric("rate", "jobs/s", "/s"),
            _CPU,
            Metric("worker_cpu_us_per_job", "worker CPU / job", "us"),
            _BUSY,
        ),
    ),
    Scenario(
        "drain_1w_c100",
        drain_1w_c100,
        "as drain_1w, but Worker(concurrency=100): prefetch 100, acks in batches of up to 100",
        (
            Metric("rate", "jobs/s", "/s", ">= 10,000", "pgqueuer 4,800"),
            _CPU,
            Metric("worker_cpu_us_per_job", "worker CPU / job", "us"),
            Metric("ack_batch_mean", "acks per AckJobs call", ""),
            _BUSY,
        ),
    ),
    Scenario(
        "latency_light",
        latency_light,
        "enqueue call -> handler start, 200 jobs 5 ms apart, one worker",
        (
            Metric("p50_ms", "latency p50", "ms", "<= 1", "saq 1.4"),
            Metric("p99_ms", "latency p99", "ms", "<= 3", "saq 1.9"),
            Metric("call_rtt_p50_ms", "enqueue call p50", "ms"),
        ),
    ),
    Scenario(
        "latency_half",
        latency_half,
        "as latency_light, one EnqueueJob per job at 50% of drain_1w's rate",
        (
            Metric("target_rate", "target jobs/s", "/s"),
            Metric("achieved_rate", "achieved jobs/s", "/s"),
            Metric("p50_ms", "latency p50", "ms"),
            Metric("p99_ms", "latency p99", "ms"),
            _BUSY,
        ),
    ),
    Scenario(
        "latency_half_batched",
        latency_half_batched,
        "as latency_half, but the producer sends the jobs due every 5 ms in one EnqueueJobs",
        (
            Metric("achieved_rate", "achieved jobs/s", "/s"),
            Metric("p50_ms", "latency p50", "ms"),
            Metric("p99_ms", "latency p99", "ms"),
            _BUSY,
        ),
    ),
    Scenario(
        "idle_streams",
        idle_streams,
        "1,000 idle ConsumeJobs streams (1,000 connections) + a light-load latency probe",
        (
            Metric("rss_with_streams_mb", "server RSS with streams", "MB", "< 200"),
            Metric("kb_per_stream", "RSS per stream", "KB"),
            Metric("idle_server_cpu_pct", "server CPU while idle", "%"),
            Metric("p50_ms", "latency p50", "ms"),
            Metric("p99_ms", "latency p99", "ms"),
            Metric("call_rtt_p99_ms", "enqueue call p99", "ms"),
        ),
    ),
    Scenario(
        "big_queue",
        big_queue,
        "enqueue/claim with N queued jobs (100k; 1M with --big) vs an empty queue",
        (
            Metric("empty_unary_rate", "unary enqueue, empty", "/s"),
            Metric("full_unary_rate", "unary enqueue, N queued", "/s"),
            Metric("empty_batch_rate", "batch enqueue, empty", "/s"),
            Metric("full_batch_rate", "batch enqueue, N queued", "/s"),
            Metric("empty_drain_rate", "claim (drain), empty", "/s"),
            Metric("full_drain_rate", "claim (drain), N queued", "/s"),
            Metric("empty_drain_server_us", "claim server CPU, empty", "us"),
            Metric("full_drain_server_us", "claim server CPU, N queued", "us"),
            Metric("fill_rate", "fill (EnqueueJobs 5k x 2)", "/s"),
            Metric("rss_full_mb", "server RSS, N queued", "MB"),
            Metric("restart_s", "restart with N queued (not memory)", "s"),
        ),
    ),
    Scenario(
        "scale_servers",
        scale_servers,
        "1 vs 2 servers sharing PostgreSQL (+ Redis): one producer (64 in flight), then one "
        "Worker, per server (redis/postgres only; on 2 cores the servers, producers, "
        "workers and databases share the two cores)",
        (
            Metric("enqueue_1", "enqueue, 1 server", "/s"),
            Metric("enqueue_2", "enqueue, 2 servers", "/s"),
            Metric("enqueue_gain", "enqueue gain, 2 vs 1", "x"),
            Metric("drain_1", "drain, 1 server", "/s"),
            Metric("drain_2", "drain, 2 servers", "/s"),
            Metric("drain_gain", "drain gain, 2 vs 1", "x"),
            Metric("enqueue_server_cpu_us_per_job_1", "enqueue servers' CPU / job, 1", "us"),
            Metric("enqueue_server_cpu_us_per_job_2", "enqueue servers' CPU / job, 2", "us"),
            Metric("drain_server_cpu_us_per_job_1", "drain servers' CPU / job, 1", "us"),
            Metric("drain_server_cpu_us_per_job_2", "drain servers' CPU / job, 2", "us"),
            Metric("enqueue_machine_busy_pct_1", "machine busy, enqueue, 1", "%"),
            Metric("enqueue_machine_busy_pct_2", "machine busy, enqueue, 2", "%"),
            Metric("drain_machine_busy_pct_1", "machine busy, drain, 1", "%"),
            Metric("drain_machine_busy_pct_2", "machine busy, drain, 2", "%"),
        ),
    ),
)

BY_NAME = {s.name: s for s in SCENARIOS}
