"""Prometheus metrics, served as ``GET /metrics`` by the HTTP listener (``_http``).

Counters and histograms are updated by the broker as things happen (per
instance: in a cluster, sum them across instances); queue depths, running
jobs, workers and backend health are read from the broker at most once a
second by a refresher task and served from that snapshot (a scrape never
waits on the record store or the queue tier). The registry is this server's
own (``CollectorRegistry``), not prometheus-client's global one, so several
servers in one process (tests) do not mix.

Besides the Prometheus families, plain running totals (:meth:`Metrics.totals`)
and the delivery waits since the last sample (:meth:`Metrics.take_waits`) feed
the dashboard's history (``_history``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from stackduck_core import Job, QueueStats, Status

from ._history import Totals

if TYPE_CHECKING:
    from ._broker import Broker

log = logging.getLogger("stackduck.metrics")

#: Latency buckets (seconds): sub-millisecond to a minute.
_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_HEALTH = ("healthy", "suspect", "down", "recovering")
#: Most delivery waits kept between two history samples (beyond: not sampled).
_MAX_WAITS = 100_000


class Metrics:
    """This server's metrics; the broker reports events, :meth:`refresh` the gauges."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.enqueued = Counter(
            "stackduck_jobs_enqueued", "Jobs accepted (this instance)", ["job_type"], registry=r
        )
        self.started = Counter(
            "stackduck_jobs_started", "Deliveries to workers (this instance)", ["job_type"],
            registry=r,
        )  # fmt: skip
        self.completed = Counter(
            "stackduck_jobs_completed", "Jobs completed (this instance)", ["job_type"], registry=r
        )
        self.retried = Counter(
            "stackduck_jobs_retried", "Failures rescheduled for a retry (this instance)",
            ["job_type"], registry=r,
        )  # fmt: skip
        self.dead = Counter(
            "stackduck_jobs_dead_lettered", "Jobs that entered the dead-letter queue "
            "(this instance)", ["job_type"], registry=r,
        )  # fmt: skip
        self.wait = Histogram(
            "stackduck_job_wait_seconds",
            "From when a job became due (enqueue or scheduled time) to its delivery",
            ["job_type"], buckets=_BUCKETS, registry=r,
        )  # fmt: skip
        self.run = Histogram(
            "stackduck_job_run_seconds", "From delivery to completion",
            ["job_type"], buckets=_BUCKETS, registry=r,
        )  # fmt: skip
        self.commit = Histogram(
            "stackduck_store_commit_seconds", "Record-store batch commits",
            ["backend", "outcome"], buckets=_BUCKETS, registry=r,
        )  # fmt: skip
        self.tier_ops = Histogram(
            "stackduck_tier_op_seconds", "Queue-tier operations (Redis scripts, record-store claims)",
            ["tier", "outcome"], buckets=_BUCKETS, registry=r,
        )  # fmt: skip
        self._snapshot = _Snapshot()
        self.registry.register(self._snapshot)
        # running totals and recent waits, for the dashboard's history
        self._enqueued = self._completed = self._failed = 0
        self._waits: list[float] = []

    # -- events (called by the broker) ------------------------------------------------

    def on_enqueued(self, jobs: Iterable[Job]) -> None:
        for job in jobs:
            self.enqueued.labels(job.job_type).inc()
            self._enqueued += 1

    def on_delivered(self, jobs: Iterable[Job], now: float) -> None:
        for job in jobs:
            wait = max(now - max(job.created_at, job.scheduled_at), 0.0)
            self.started.labels(job.job_type).inc()
            self.wait.labels(job.job_type).observe(wait)
            if len(self._waits) < _MAX_WAITS:
                self._waits.append(wait)

    def on_changed(self, jobs: Iterable[Job]) -> None:
        """Records written: count outcomes (completions, retries, dead letters)."""
        for job in jobs:
            if job.status is Status.COMPLETED:
                self._completed += 1
                self.completed.labels(job.job_type).inc()
                if job.started_at is not None and job.completed_at is not None:
                    self.run.labels(job.job_type).observe(
                        max(job.completed_at - job.started_at, 0.0)
                    )
            elif job.status is Status.FAILED:
                self._failed += 1
                self.dead.labels(job.job_type).inc()

    def on_retried(self, job_type: str) -> None:
        self.retried.labels(job_type).inc()
        self._failed += 1

    def totals(self) -> Totals:
        """Jobs enqueued, completed and failed (retried or dead-lettered) so far."""
        return Totals(self._enqueued, self._completed, self._failed)

    def take_waits(self) -> list[float]:
        """The delivery waits (due → delivered, seconds) since the last call."""
        waits, self._waits = self._waits, []
        return waits

    def on_commit(self, backend: str, seconds: float, *, ok: bool) -> None:
        self.commit.labels(backend, "ok" if ok else "error").observe(seconds)

    def on_tier_op(self, tier: str, seconds: float, *, ok: bool) -> None:
        self.tier_ops.labels(tier, "ok" if ok else "error").observe(seconds)

    # -- gauges --------------------------------------------------------------------------

    async def refresh(self, broker: Broker) -> QueueStats | None:
        """Read the broker's state into the snapshot served by scrapes; returns the stats read.

        Called once a second by the HTTP listener's sampler task (``_http``).
        """
        stats: QueueStats | None
        try:
            stats = await broker.statistics()
            await broker.limits()  # in a cluster: the limits set on any instance
        except Exception as exc:  # noqa: BLE001 - a failed read keeps the last snapshot
            log.debug("metrics refresh failed: %s", exc)
            stats = None
        dispatch = broker.core.dispatcher.statistics()
        self._snapshot.update(
            stats=stats,
            workers=dispatch.streams,
            in_flight=dispatch.in_flight,
            backends=broker.backends(),
            route=broker.queue_route(),
            throttled=dict(broker.limiter.throttled),
            pruned=dict(broker.pruned),
        )
        return stats

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _Snapshot(Collector):
    """The gauges, from the last :meth:`Metrics.refresh`."""

    def __init__(self) -> None:
        self._stats: QueueStats | None = None
        self._workers = 0
        self._in_flight = 0
        self._backends: Sequence[tuple[str, str, str]] = ()
        self._route = ""
        self._throttled: dict[tuple[str, str], int] = {}
        self._pruned: dict[str, int] = {}

    def update(
        self,
        *,
        stats: QueueStats | None,
        workers: int,
        in_flight: int,
        backends: Sequence[tuple[str, str, str]],
        route: str,
        throttled: dict[tuple[str, str], int] | None = None,
        pruned: dict[str, int] | None = None,
    ) -> None:
        if stats is not None:
            self._stats = stats
        self._workers, self._in_flight = workers, in_flight
        self._backends, self._route = backends, route
        self._throttled = throttled or {}
        self._pruned = pruned or {}

    def collect(self) -> Iterator[Metric]:
        depth = GaugeMetricFamily(
            "stackduck_jobs",
            "Jobs by type, status and priority (queued: the cluster's; scheduled and dead: "
            "the record store's; running: this instance's)",
            labels=["job_type", "status", "priority"],
        )
        if self._stats is not None:
            for job_type, t in sorted(self._stats.types.items()):
                for priority, n in enumerate(t.queued, start=1):
                    depth.add_metric([job_type, "queued", str(priority)], n)
                depth.add_metric([job_type, "scheduled", ""], t.scheduled)
                depth.add_metric([job_type, "running", ""], t.running)
                depth.add_metric([job_type, "dead", ""], t.dead)
        yield depth
        yield GaugeMetricFamily(
            "stackduck_workers", "Worker streams connected to this instance", value=self._workers
        )
        yield GaugeMetricFamily(
            "stackduck_jobs_in_flight",
            "Jobs held by this instance's worker streams",
            value=self._in_flight,
        )
        health = GaugeMetricFamily(
            "stackduck_backend_health",
            "1 for the backend's current health state",
            labels=["role", "kind", "state"],
        )
        for role, kind, state in self._backends:
            for candidate in _HEALTH:
                health.add_metric([role, kind, candidate], 1.0 if candidate == state else 0.0)
        yield health
        route = GaugeMetricFamily(
            "stackduck_queue_route", "1 for where this instance enqueues and claims now",
            labels=["tier"],
        )  # fmt: skip
        if self._route:
            route.add_metric([self._route], 1.0)
        yield route
        throttled = CounterMetricFamily(
            "stackduck_jobs_throttled",
            "Times a rate or concurrency limit held back jobs that workers had room for "
            "(this instance's dispatch or claims)",
            labels=["job_type", "limit"],
        )
        for (job_type, held), n in sorted(self._throttled.items()):
            throttled.add_metric([job_type, held], n)
        yield throttled
        pruned = CounterMetricFamily(
            "stackduck_jobs_pruned",
            "Jobs deleted from the record store by retention (this instance)",
            labels=["kind"],
        )
        for kind, n in sorted(self._pruned.items()):
            pruned.add_metric([kind], n)
        yield pruned
