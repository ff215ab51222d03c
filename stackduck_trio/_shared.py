"""The broker of an instance that shares a queue tier (Redis) with other instances.

What changes from the embedded :class:`~stackduck_trio._broker.Broker`
(whose rules, lifecycle and fencing all still apply, through the same core):

* **New jobs** are committed to the record store, then pushed to the tier,
  then acknowledged: any instance can deliver them.
* **Claims.** A *feeder* task claims ready jobs from the tier for this
  instance, as many per job type as its worker streams have free credit
  (:meth:`~stackduck_core.QueueCore.demand`), and admits them into the local
  core, which leases them to streams exactly as in the embedded mode. It runs
  when credit frees up, when the tier announces ready jobs (pub/sub, so a job
  enqueued on another instance reaches an idle worker here within
  milliseconds), at the next scheduled job's due time, and every
  ``poll_interval`` as a safety net.
* **Ends of deliveries** (ack, nack, lost lease, release) are written to the
  record store as before; the job then leaves the local core and its claim is
  *settled* in the tier: back to the ready or scheduled set, or out of the
  tier. Settles are batched by one task.
* **Claims live while this instance does.** A renewer moves the deadline of
  every claim held here every ``claim_seconds / 3``. A *reaper* on every
  instance looks for claims whose deadline passed (their instance died or
  lost the tier), reads the jobs' records from the record store and lets the
  core decide (:func:`~stackduck_core.recover_claim`): a running job lost its
  lease (requeued, or dead-lettered by the poison-pill guard), a queued one
  goes back as it is, a finished one leaves the tier.
* **Dead letters, requeue and purge** work on the record store, so every
  instance sees every dead job.
* **Failover** follows the core's :func:`~stackduck_core.route`. When Redis
  fails (its health machine leaves HEALTHY/SUSPECT), every instance claims
  straight from the record store (the ``fallback`` tier,
  :class:`~stackduck_trio._pgtier.PostgresTier`: ``FOR UPDATE SKIP LOCKED``,
  LISTEN/NOTIFY wake-ups), so no job waits for Redis, whichever instance
  queued it. Probes with capped backoff watch Redis; when it answers again it
  is reconciled before use: every queued or scheduled job of the record store
  is pushed again (pushes never duplicate a claimed job), which also repairs a
  Redis that restarted empty or was flushed. With no fallback, the instance's
  memory queues new jobs meanwhile (moved to Redis by the reconcile).
* **Orphans.** Lease extensions are written through, and a *sweeper*
  requeues running jobs whose lease ran out on record long ago -- a delivery
  whose instance died while its claim was lost with Redis's data.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TypeVar

import trio

from stackduck_core import (
    BackendHealth,
    Cancelled,
    ClaimGate,
    Health,
    HealthChanged,
    Job,
    Purged,
    QueueStats,
    QueueTier,
    Rejected,
    RejectReason,
    Requeued,
    Route,
    StartReconcile,
    Status,
    TypeLimit,
    TypeStats,
    recover_claim,
    route,
)
from stackduck_core._failover import (
    HealthEvent,
    OpFailed,
    OpSucceeded,
    ProbeFailed,
    ProbeSucceeded,
    ReconcileFinished,
)

from ._broker import Broker, Unavailable, new_id
from ._store import StorageUnavailable, Written, dead_page_token
from ._tier import HELD, Claims, TierUnavailable
from ._tier import QueueTier as Tier

log = logging.getLogger("stackduck.shared")
T = TypeVar("T")

_WAITING = (Status.QUEUED, Status.SCHEDULED)
#: Settles waiting for the tier, per tier, before the oldest are given up to
#: the reaper (memory stays bounded when the tier is slow but not down).
MAX_PENDING_SETTLES = 100_000


class SharedBroker(Broker):
    """A broker whose queue is shared with other instances through a tier.

    Args:
        tier: the shared queue tier (Redis, or the record store's
            :class:`~stackduck_trio._pgtier.PostgresTier` for a cluster
            without Redis).
        tier_health: its health machine (role QUEUE_TIER).
        fallback: the tier to claim from while ``tier`` is down (the record
            store's PostgresTier), or ``None``: then only this instance's
            memory queues new jobs until ``tier`` is back.
        owner: this instance's id, recorded with its claims.
        claim_seconds: how long a claim lives without renewal; a dead
            instance's jobs are reaped after about this long.
        poll_interval: the feeder's safety-net period.
        claim_batch: most jobs claimed in one tier operation.
        sweep_interval: how often the record store is searched for running
            jobs nobody manages any more (see :meth:`sweep`).
        Other arguments: as :class:`Broker`.
    """

    #: The tier applies the limits, for every instance at once.
    local_limits = False

    def __init__(
        self,
        *,
        tier: Tier,
        tier_health: BackendHealth,
        fallback: Tier | None = None,
        owner: str,
        claim_seconds: float,
        poll_interval: float = 1.0,
        claim_batch: int = 256,
        sweep_interval: float = 5.0,
        **kwargs: object,
    ) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.tier = tier
        self.tier_health = tier_health
        self.fallback = fallback
        self.owner = owner
        self.claim_seconds = claim_seconds
        self.poll_interval = poll_interval
        self.claim_batch = claim_batch
        self.sweep_interval = sweep_interval
        # job id -> (tier, claim token), for the jobs held here
        self._tokens: dict[str, tuple[Tier, str]] = {}
        self._settles: dict[Tier, list[tuple[str, str, Job | None]]] = {}
        self._pushes: list[Job] = []
        self._tier_wakeup = trio.Event()  # settles or pushes are waiting
        self._feed_wakeup = trio.Event()
        self._health_wakeup = trio.Event()
        self._next_due: float | None = None
        self._due_dirty = True
        # Claims that would find nothing are not made (each is a tier round
        # trip): see stackduck_core.ClaimGate.
        self._gate = ClaimGate()
        self._reconcile: tuple[int, trio.CancelScope] | None = None
        self._nursery: trio.Nursery | None = None
        self.committer.on_health = self._store_health
        #: jobs claimed, claims reaped, orphans swept (for tests and logs)
        self.claimed = 0
        # job type -> when the tier's rate limit lets its next job go
        self._rate_waits: dict[str, float] = {}
        # tiers a limit change could not reach (retried by the renew loop)
        self._limits_unsynced: set[Tier] = set()
        self.dropped_settles = 0
        self.reaped = 0
        self.swept = 0

    # -- routing and health ---------------------------------------------------------------

    def route(self) -> Route:
        return route(self.tier_health.state, self.committer.health.state, self.durability)

    def active(self) -> Tier | None:
        """The tier to enqueue to and claim from now; ``None``: this instance's memory."""
        decision = self.route()
        if decision.queue is QueueTier.REDIS:
            return self.tier
        if decision.claim_record_store and self.fallback is not None:
            return self.fallback
        return None

    def queue_route(self) -> str:
        active = self.active()
        return "memory" if active is None else active.kind

    @property
    def tier_usable(self) -> bool:
        return self.active() is not None

    def backends(self) -> list[tuple[str, str, str]]:
        store = self.committer
        return [
            ("record_store", store.backend.kind, store.health.state.value),
            ("queue_tier", self.tier.kind, self.tier_health.state.value),
        ]

    def _health(self, event: HealthEvent) -> None:
        for effect in self.tier_health.handle(event):
            if isinstance(effect, HealthChanged):
                active = self.active()
                log.warning(
                    "queue tier (%s) health: %s -> %s; claiming from %s (%s)",
                    self.tier.kind,
                    effect.old.value,
                    effect.new.value,
                    active.kind if active else "this instance's memory",
                    self.route().reason,
                )
                self._health_wakeup.set()
                self._hear(None)
                self._due_dirty = True
            elif isinstance(effect, StartReconcile):
                self._start_reconcile(effect.reconcile_id)

    def _store_health(self, change: HealthChanged) -> None:
        """The record store is back: reconcile the tier from it.

        Jobs accepted while it was away (durability=buffered) may have been
        dropped from the tier by instances whose writes of them were refused
        before their rows existed; the reconcile puts every queued job back.
        """
        self._hear(None)
        if change.new is Health.HEALTHY and change.old is not Health.SUSPECT:
            self._start_reconcile(None)

    async def _call(self, fn: Callable[[], Awaitable[T]], tier: Tier) -> T:
        """One tier operation; the primary tier's outcomes feed its health machine.

        (The fallback's failures are the record store's, whose writer reports
        them to the store's own machine.)
        """
        started = self.clock.now()
        try:
            result = await fn()
        except TierUnavailable:
            self._observe(tier, started, ok=False)
            if tier is self.tier:
                self._health(OpFailed(now=self.clock.now(), started_at=started))
            raise
        self._observe(tier, started, ok=True)
        if tier is self.tier:
            self._health(OpSucceeded(now=self.clock.now(), started_at=started))
        return result

    def _observe(self, tier: Tier, started: float, *, ok: bool) -> None:
        if self.metrics is not None:
            self.metrics.on_tier_op(tier.kind, self.clock.now() - started, ok=ok)

    # -- producers ------------------------------------------------------------------------

    def _admit_new(self, jobs: Sequence[Job]) -> None:
        if not self.tier_usable:
            super()._admit_new(jobs)  # no tier: this instance's memory queues them

    async def _published(self, jobs: Sequence[Job]) -> None:
        fresh = [job for job in jobs if self.core.get(job.id) is None]
        tier = self.active()
        if not fresh or tier is None:
            return
        types = {job.job_type for job in fresh}
        try:
            await self._call(functools.partial(tier.push, fresh), tier)
            now_active = self.active()
            if tier is self.fallback and now_active is self.tier:
                # The route went back to the primary tier while this push went to
                # the record store: a reconcile that read its rows before these
                # were committed did not carry them over. (A copy claimed from the
                # record store meanwhile could run twice; the compare-and-set
                # writes fence the second completion.)
                with contextlib.suppress(TierUnavailable):
                    await self._call(functools.partial(self.tier.push, fresh), self.tier)
        except TierUnavailable as exc:
            if self.fallback is not None and tier is not self.fallback:
                # Committed and unclaimed in the record store: claimable there as
                # soon as the route switches to it, and pushed to the tier by the
                # reconcile when the tier is back.
                log.warning(
                    "queue tier push failed (%s): %d new jobs wait in the record store",
                    exc,
                    len(fresh),
                )
                # The rows are there already: this only wakes the instances
                # claiming from the record store (NOTIFY).
                with contextlib.suppress(TierUnavailable):
                    await self._call(functools.partial(self.fallback.push, fresh), self.fallback)
            else:
                log.warning("queue tier push failed (%s): %d new jobs queued here", exc, len(fresh))
                super()._admit_new([job for job in fresh if self.core.get(job.id) is None])
        # This instance claims them at once (its own streams may want them),
        # without waiting for the tier's message.
        for job_type in types:
            self._hear(job_type)

    async def cancel(self, job_id: str) -> Job | Rejected:
        if self.core.get(job_id) is not None:
            return await super().cancel(job_id)
        await self._admission()
        elsewhere = Rejected(
            RejectReason.WRONG_STATE,
            f"job {job_id} is running on another server instance; cancel it there",
        )
        record: Job | None = None
        tier = self.active()
        if tier is not None:
            try:
                removed = (await self._call(functools.partial(tier.remove, [job_id]), tier))[0]
            except TierUnavailable:
                removed = None
            if removed is HELD:
                # Claimed by an instance: it runs there (or is about to), even
                # while its record still says queued (a delivery's record may
                # wait up to delivery_write_delay for its commit).
                return elsewhere
            record = removed if isinstance(removed, Job) else None
        if record is None:
            record = await self._stored(job_id)
        if record is None:
            return Rejected(RejectReason.NOT_FOUND, f"no job with id {job_id}", "job_id")
        if record.status is Status.RUNNING:
            return elsewhere
        result = self.core.decide(record, Cancelled(now=self.clock.now()))
        if not isinstance(result, Job):
            assert result is not None  # only a purge deletes
            return await self._explain(job_id, result)
        written = self._persist([result], settle=False)
        await self._committed(written)
        if result.id in written.refused:
            return await self._refusal(job_id)
        return result

    # -- workers --------------------------------------------------------------------------

    def changed(self) -> None:
        super().changed()
        if self._streams:
            self._feed_wakeup.set()

    async def claim(
        self, job_type: str, *, worker_id: str, lease_seconds: float | None
    ) -> Job | None:
        await self._admission()
        tier = self.active()
        if tier and not self.core.ready_count(job_type) and job_type not in self.core.paused:
            try:
                await self._claim(tier, job_type, 1)
            except TierUnavailable:
                pass
        return await super().claim(job_type, worker_id=worker_id, lease_seconds=lease_seconds)

    async def _claim(self, tier: Tier, job_type: str, limit: int) -> Claims:
        now = self.clock.now()
        claims = await self._call(
            functools.partial(
                tier.claim,
                job_type,
                limit,
                now=now,
                owner=self.owner,
                token=new_id(),
                until=now + self.claim_seconds,
            ),
            tier,
        )
        if claims.held is not None:
            key = (job_type, claims.held)
            self.limiter.throttled[key] = self.limiter.throttled.get(key, 0) + 1
        if claims.retry_at is not None:
            self._rate_waits[job_type] = claims.retry_at
        else:
            self._rate_waits.pop(job_type, None)
        admitted_at = self.clock.now()
        for claim in claims:
            job = claim.job
            if self.core.get(job.id) is not None:
                # Held here already (queued here while the tier was away, and
                # pushed by a reconcile elsewhere): keep ours, end the claim.
                self._settle(tier, job.id, claim.token, None)
                continue
            self._tokens[job.id] = (tier, claim.token)
            held = self.core.admit(job, now=max(admitted_at, job.scheduled_at))
            if held.version != job.version:
                # Promoted here (a tier moves due jobs without changing their
                # record): on record, so the delivery's base matches the row.
                self._persist([held], settle=False)
        self.claimed += len(claims)
        if claims and self._next_due is not None and self._next_due <= now:
            self._due_dirty = True  # it may have promoted due jobs: the schedule changed
        return claims

    async def extend(
        self, job_id: str, lease_id: str | None, lease_seconds: float | None
    ) -> Job | Rejected:
        result = await super().extend(job_id, lease_id, lease_seconds)
        if isinstance(result, Job):
            # On record (not waited for): the sweeper must see that this
            # delivery is alive however long it runs.
            self._persist([result])
        return result

    def _applied(self, jobs: Sequence[Job], written: Written, *, settle: bool) -> None:
        """Records committed: jobs whose delivery ended leave this instance.

        Their claims are settled only now, once the record store has their
        new state -- so another instance never claims a job whose new record
        the store may still refuse. A refused record is a stale copy: the
        job is forgotten here and its claim dropped (the truth, written
        elsewhere, decides where it goes).
        """
        super()._applied(jobs, written, settle=settle)
        usable = self.tier_usable
        for job in jobs:
            if job.id in written.refused:
                held = self._tokens.pop(job.id, None)
                if held is not None:
                    self._settle(held[0], job.id, held[1], None)
                continue
            if not settle:
                continue
            current = self.core.get(job.id)
            if current is None:
                # Gone from memory: this write is the job's end (completed,
                # cancelled), or a later one ended it and will settle it.
                if job.status in _WAITING or job.status is Status.RUNNING:
                    continue
                record = job
            elif current.status is Status.RUNNING:
                continue  # delivered (here, again) meanwhile: still ours
            elif current.version != job.version:
                continue  # changed again meanwhile: that write settles it once committed
            else:
                record = current
            held = self._tokens.pop(job.id, None)
            if held is None:
                # Queued here while no tier was usable: it joins the tier when
                # one is back (now, or at the reconcile).
                if usable and record.status in _WAITING:
                    self.core.evict(job.id)
                    self._push(record)
                elif record.status is Status.FAILED:
                    self.core.evict(job.id)  # dead letters are listed from the store
                continue
            self.core.evict(job.id)
            back = record if record.status in _WAITING else None
            self._settle(held[0], job.id, held[1], back)

    def _settle(self, tier: Tier, job_id: str, token: str, record: Job | None) -> None:
        pending = self._settles.setdefault(tier, [])
        if len(pending) >= MAX_PENDING_SETTLES:
            # The tier lags far behind: the oldest settle is given up (its claim
            # expires and any instance's reaper decides from the record store).
            pending.pop(0)
            self.dropped_settles += 1
        pending.append((job_id, token, record))
        self._tier_wakeup.set()

    def _push(self, job: Job) -> None:
        self._pushes.append(job)
        self._tier_wakeup.set()

    def _return_excess(self) -> None:
        """Give back claimed jobs no stream here can take (their streams left)."""
        for job_type in self._ready_types():
            ready = self.core.ready_jobs(job_type)
            keep = 0 if self.draining else self.core.dispatcher.credit(job_type)
            if job_type in self.core.paused:
                keep = 0
            for job in ready[keep:]:
                held = self._tokens.pop(job.id, None)
                if held is not None:
                    self.core.evict(job.id)
                    self._settle(held[0], job.id, held[1], job)
                elif self.tier_usable:
                    self.core.evict(job.id)
                    self._push(job)

    def _ready_types(self) -> list[str]:
        types = self.core.statistics().types
        return sorted(t for t, stats in types.items() if sum(stats.queued))

    # -- dead letters and pauses -----------------------------------------------------------

    async def _blocking(self, fn: Callable[[], T]) -> T:
        """A read of the record store (off the writer's thread where possible)."""
        try:
            return await self.committer.run_read(fn)
        except StorageUnavailable as exc:
            raise Unavailable(str(exc)) from exc

    async def dead_page(
        self, job_type: str | None, page_token: str, limit: int, max_bytes: int
    ) -> tuple[list[Job], str]:
        backend = self.committer.backend
        jobs, token = await self._blocking(
            functools.partial(backend.list_dead, job_type, page_token, limit)
        )
        size = 0
        for index, job in enumerate(jobs):
            size += len(job.payload) + len(job.error_message) + 256
            if size > max_bytes and index:
                # Cut the page here; the next one starts after the last job kept.
                return jobs[:index], dead_page_token(jobs[index - 1])
        return jobs, token

    async def dead_ids(self, job_ids: Sequence[str], job_type: str, limit: int) -> list[str]:
        if job_ids:
            return list(job_ids)[:limit]
        backend = self.committer.backend
        kind = None if job_type == "*" else job_type
        return await self._blocking(functools.partial(backend.dead_ids, kind, limit))

    async def _records(self, job_ids: Sequence[str]) -> dict[str, Job]:
        backend = self.committer.backend
        jobs = await self._blocking(functools.partial(backend.load_running, list(job_ids)))
        return {job.id: job for job in jobs}

    async def _decide_stored(
        self, job_ids: Sequence[str], event: Requeued | Purged
    ) -> list[tuple[Job | None, Job | Rejected | None]]:
        """``(stored record, the core's decision on it)`` per id; NOT_FOUND if none."""
        records = await self._records(job_ids)
        out: list[tuple[Job | None, Job | Rejected | None]] = []
        for job_id in job_ids:
            record = records.get(job_id)
            if record is None:
                missing = Rejected(RejectReason.NOT_FOUND, f"no job with id {job_id}", "job_id")
                out.append((None, missing))
            else:
                out.append((record, self.core.decide(record, event)))
        return out

    async def requeue(self, job_ids: Sequence[str]) -> list[Job | Rejected]:
        await self._admission()
        decided = await self._decide_stored(job_ids, Requeued(now=self.clock.now()))
        results: list[Job | Rejected] = []
        for _record, result in decided:
            assert result is not None  # only a purge deletes
            results.append(result)
        changed = [r for r in results if isinstance(r, Job)]
        if changed:
            written = self._persist(changed, settle=False)
            await self._committed(written)
            for index, result in enumerate(results):
                if isinstance(result, Job) and result.id in written.refused:
                    results[index] = await self._refusal(result.id)
            changed = [r for r in results if isinstance(r, Job)]
            self._admit_new(changed)
            await self._published(changed)
        return results

    async def purge(self, job_ids: Sequence[str]) -> list[Job | Rejected]:
        decided = await self._decide_stored(job_ids, Purged(now=self.clock.now()))
        # A purge deletes (None); the answer names the job as it was.
        results = [result if result is not None else record for record, result in decided]
        assert all(r is not None for r in results)
        out: list[Job | Rejected] = [r for r in results if r is not None]
        deleted = [r.id for r in out if isinstance(r, Job)]
        if deleted:
            await self._committed(self.committer.write(deletes=deleted))
        return out

    async def pause(self, job_type: str) -> None:
        await super().pause(job_type)
        await self._tier_paused(job_type, paused=True)

    async def resume(self, job_type: str) -> None:
        await super().resume(job_type)
        await self._tier_paused(job_type, paused=False)

    async def _tier_paused(self, job_type: str, *, paused: bool) -> None:
        # The record store has it (the truth, applied again at every start
        # and reconcile; the record store's own tier reads it there); the
        # primary tier stops claims on every instance.
        try:
            await self._call(functools.partial(self.tier.set_paused, job_type, paused), self.tier)
        except TierUnavailable as exc:
            log.warning("queue tier pause of %r not applied yet: %s", job_type, exc)
        self._return_excess()
        self._hear(job_type)

    async def set_limit(self, job_type: str, limit: TypeLimit | None) -> None:
        await super().set_limit(job_type, limit)
        # The record store has them (the truth, applied to the tier again at
        # every start and reconcile); the tier applies them to every claim.
        for tier in (self.tier, self.fallback):
            if tier is None:
                continue
            try:
                await self._call(functools.partial(tier.set_limit, job_type, limit), tier)
            except TierUnavailable as exc:
                # applied with every other limit by the renew loop (or a reconcile)
                log.warning("queue tier limits of %r not applied yet: %s", job_type, exc)
                self._limits_unsynced.add(tier)
        self._hear(job_type)

    async def limits(self) -> Mapping[str, TypeLimit]:
        """The cluster's limits, as the record store has them (set on any instance);
        this instance's last view while the store is away."""
        try:
            return await self._stored_limits()
        except Unavailable:
            return self.limiter.limits()

    async def _stored_limits(self) -> Mapping[str, TypeLimit]:
        """The record store's limits (also made this instance's view)."""
        stored = await self._blocking(self.committer.backend.load_limits)
        for job_type in set(self.limiter.limits()) - set(stored):
            self.limiter.set(job_type, None)
        for job_type, limit in stored.items():
            self.limiter.set(job_type, limit)
        return self.limiter.limits()

    async def _prune_dead(self, before: float, batch: int) -> int:
        """Dead letters are only in the record store here."""
        backend = self.committer.backend
        return await self._prune_batches(functools.partial(backend.prune_dead, before), batch)

    async def _tier_limits(self, tier: Tier) -> None:
        """Make the tier's limits the record store's.

        The tier's types are listed *before* the store is read: a limit set
        meanwhile on another instance (store first, then tier) is then either
        not listed yet or already read from the store, never taken for stale.
        """
        in_tier = await self._call(tier.limited_types, tier)
        limits = await self._stored_limits()
        stale = in_tier - limits.keys()
        for job_type in sorted(stale):  # cleared while the tier was away
            await self._call(functools.partial(tier.set_limit, job_type, None), tier)
        for job_type, limit in sorted(limits.items()):
            await self._call(functools.partial(tier.set_limit, job_type, limit), tier)
        self._limits_unsynced.discard(tier)

    async def statistics(self) -> QueueStats:
        """Queued: the cluster's (from the tier); scheduled and dead: the
        record store's; running and streams: this instance's."""
        local = self.core.statistics()
        backend = self.committer.backend
        stored = await self._blocking(backend.waiting_counts)
        tier = self.active()
        ready: dict[str, tuple[int, int, int]] = {}
        if tier is not None:
            try:
                ready = (await self._call(tier.counts, tier)).ready
            except TierUnavailable:
                pass  # only what this instance holds, while the tier is away
        types: dict[str, TypeStats] = {}
        for name in ready.keys() | local.types.keys() | stored.keys():
            mine = local.types.get(name) or TypeStats()
            shared = ready.get(name, (0, 0, 0))
            scheduled, dead = stored.get(name, (0, 0))
            types[name] = TypeStats(
                queued=(
                    shared[0] + mine.queued[0],
                    shared[1] + mine.queued[1],
                    shared[2] + mine.queued[2],
                ),
                scheduled=scheduled,
                running=mine.running,
                dead=dead,
                paused=mine.paused,
            )
        return QueueStats(
            types=types,
            queued=sum(sum(t.queued) for t in types.values()),
            scheduled=sum(t.scheduled for t in types.values()),
            running=local.running,
            dead=sum(t.dead for t in types.values()),
            streams=local.streams,
        )

    # -- start and stop -------------------------------------------------------------------------

    async def prepare(self) -> str:
        """Apply the stored pauses (here and in the tier) before anything is delivered."""
        backend = self.committer.backend
        paused = await self.committer.run_blocking(backend.load_paused)
        self.restore_paused(paused)
        for job_type in paused:
            try:
                await self._call(functools.partial(self.tier.set_paused, job_type, True), self.tier)
            except TierUnavailable:
                break  # applied again by the reconcile
        limited = await self._restore_limits()
        try:
            await self._tier_limits(self.tier)
        except TierUnavailable:
            pass  # applied again by the reconcile
        fallback = f", fallback {self.fallback.kind}" if self.fallback else ""
        return (
            f"record store {backend.kind}, queue tier {self.tier.kind}{fallback} "
            f"(instance {self.owner}): {len(paused)} job types paused, {limited} limited"
        )

    async def run_tasks(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await nursery.start(self.run_timer)
            nursery.start_soon(self._feed_loop)
            nursery.start_soon(self._tier_writer)
            nursery.start_soon(self._renew_loop)
            nursery.start_soon(self._reap_loop)
            nursery.start_soon(self._probe_loop)
            nursery.start_soon(self.tier.wait_ready, self._on_ready)
            if self.fallback is not None:
                nursery.start_soon(self.fallback.wait_ready, self._on_ready)
            # The first reconcile: the tier may be new, or have restarted empty
            # while the record store holds queued jobs.
            self._start_reconcile(None)
            task_status.started()

    def _on_ready(self, job_type: str) -> None:
        if not job_type:
            self._due_dirty = True
            self._hear(None)
        else:
            self._hear(job_type)

    def _hear(self, job_type: str | None) -> None:
        """The tier may hold new ready jobs of ``job_type`` (None: of any type)."""
        self._gate.hear(job_type)
        if job_type is None or self.core.dispatcher.credit(job_type):
            self._feed_wakeup.set()

    async def drain(self, grace: float) -> None:
        await super().drain(grace)
        # The requeued jobs' claims are settled once their records commit:
        # wait for that (batches commit in order), so they go back now rather
        # than when their claims expire.
        with trio.move_on_after(max(self.write_timeout, 1.0)):
            await self.committer.write([]).done.wait()
        self._return_excess()  # jobs claimed but never delivered go back
        with trio.move_on_after(max(self.write_timeout, 1.0)):
            await self._flush_tier()

    # -- tasks -----------------------------------------------------------------------------------

    async def _feed_loop(self) -> None:
        while True:
            timeout = self.poll_interval
            now = self.clock.now()
            if self._next_due is not None and self._next_due > now:
                # (A due time already past is a job nobody here wants yet: the
                # record-store tier keeps reporting it; no busy loop on it.)
                timeout = min(timeout, self._next_due - now)
            # a type held back by its rate limit: claim again when it allows
            # (a time that came was served by the last pass: dropped, no spin)
            for job_type in [t for t, at in self._rate_waits.items() if at <= now]:
                del self._rate_waits[job_type]
                self._hear(job_type)  # its next token is due: claim it again
            if self._rate_waits:
                timeout = min(timeout, min(self._rate_waits.values()) - now)
            with trio.move_on_after(timeout) as waited:
                await self._feed_wakeup.wait()
            self._feed_wakeup = trio.Event()
            if waited.cancelled_caught:
                # a due time, a rate limit's next token, or the poll period (the
                # safety net for a lost message): look at every type again
                self._hear(None)
            self._return_excess()
            tier = self.active()
            if self.draining or tier is None:
                continue
            try:
                await self._feed_once(tier)
            except TierUnavailable as exc:
                log.debug("claim failed: %s", exc)

    async def _feed_once(self, tier: Tier) -> None:
        due = self._next_due is not None and self._next_due <= self.clock.now()
        if due:
            self._hear(None)  # due jobs become claimable (of any type)
        if self._due_dirty or due:
            self._due_dirty = False
            self._next_due = await self._call(tier.next_due, tier)
        for job_type in sorted(self.core.dispatcher.wanted_types()):
            while (want := self.core.demand(job_type)) > 0 and not self.draining:
                if self._gate.quiet(job_type):
                    break
                limit = min(want, self.claim_batch)
                ticket = self._gate.ticket()
                claims = await self._claim(tier, job_type, limit)
                if claims:
                    # Deliver them; not self.changed(), which would wake this
                    # loop again for nothing (it goes on while demand remains).
                    Broker.changed(self)
                # Short: nothing more now (or a limit holds the rest: its next
                # token or the end of a claim wakes the type).
                short = len(claims) < limit
                self._gate.claimed(job_type, ticket, short=short)
                if short:
                    break

    async def _tier_writer(self) -> None:
        """Apply settles and pushes in batches; one tier operation each."""
        while True:
            if not (self._settles or self._pushes):
                self._tier_wakeup = trio.Event()
                await self._tier_wakeup.wait()
            try:
                await self._flush_tier()
            except TierUnavailable as exc:
                self._drop_unreachable(exc)
                await trio.sleep(0.05)

    def _drop_unreachable(self, exc: Exception) -> None:
        """Stop retrying settles and pushes for tiers that are not in use now.

        Their claims expire and are reaped from the record store's truth
        once the tier is back (a tier that restarted empty has none left);
        jobs to push are queued here, and joined to a tier at the reconcile.
        """
        active = self.active()
        dropped = 0
        for tier in [t for t in self._settles if t is not active]:
            dropped += len(self._settles.pop(tier))
        moved: list[Job] = []
        if active is None and self._pushes:
            moved, self._pushes = self._pushes, []
            now = self.clock.now()
            for job in moved:
                if self.core.get(job.id) is None:
                    self.core.restore(job, now=now)
            self.changed()
        if dropped or moved:
            log.warning(
                "queue tier unreachable (%s): %d settles left to the reaper, %d jobs queued here",
                exc,
                dropped,
                len(moved),
            )

    async def _flush_tier(self) -> None:
        while self._settles or self._pushes:
            for tier in list(self._settles):
                pending = self._settles.pop(tier)
                settles, rest = pending[:1000], pending[1000:]
                if rest:
                    self._settles[tier] = rest
                try:
                    await self._call(functools.partial(tier.settle, settles), tier)
                except TierUnavailable:
                    self._settles.setdefault(tier, [])[:0] = settles
                    raise
            if not self._pushes:
                continue
            target = self.active()
            if target is None:
                raise TierUnavailable("no queue tier is usable")
            pushes, self._pushes = self._pushes[:1000], self._pushes[1000:]
            try:
                await self._call(functools.partial(target.push, pushes), target)
            except TierUnavailable:
                self._pushes[:0] = pushes
                raise

    async def _renew_loop(self) -> None:
        while True:
            await trio.sleep(self.claim_seconds / 3)
            by_tier: dict[Tier, list[tuple[str, str]]] = {}
            for job_id, (tier, token) in self._tokens.items():
                by_tier.setdefault(tier, []).append((job_id, token))
            for tier in list(self._limits_unsynced):
                try:
                    await self._tier_limits(tier)
                except (TierUnavailable, Unavailable) as exc:
                    log.debug("queue tier limits not applied yet: %s", exc)
            until = self.clock.now() + self.claim_seconds
            lost: list[str] = []
            for tier, items in by_tier.items():
                try:
                    for start in range(0, len(items), 1000):
                        chunk = items[start : start + 1000]
                        renewed = await self._call(
                            functools.partial(tier.renew, chunk, until=until), tier
                        )
                        lost.extend(
                            job_id for (job_id, _), ok in zip(chunk, renewed, strict=True) if not ok
                        )
                except TierUnavailable as exc:
                    log.warning("claim renewal (%s) failed: %s", tier.kind, exc)
            self._lose_claims(lost)

    def _lose_claims(self, job_ids: Sequence[str]) -> None:
        """Claims that are gone (reaped elsewhere, or the tier lost its data)."""
        for job_id in job_ids:
            if self._tokens.pop(job_id, None) is None:
                continue
            job = self.core.get(job_id)
            if job is not None and job.status is not Status.RUNNING:
                self.core.evict(job_id)  # another instance may deliver it now
        if job_ids:
            log.warning(
                "%d claims of this instance were gone from the tier (reaped after %g s "
                "without renewal, or the tier lost its data)",
                len(job_ids),
                self.claim_seconds,
            )

    async def _reap_loop(self) -> None:
        period = min(1.0, self.claim_seconds / 3)
        next_sweep = self.clock.now() + self.sweep_interval
        while True:
            await trio.sleep(period)
            for tier in (self.tier, self.fallback):
                if tier is None or (tier is self.tier and tier is not self.active()):
                    continue
                try:
                    await self.reap(tier)
                except (TierUnavailable, Unavailable) as exc:
                    log.warning("reaper (%s): %s", tier.kind, exc)
            if self.clock.now() >= next_sweep:
                next_sweep = self.clock.now() + self.sweep_interval
                try:
                    await self.sweep()
                except (TierUnavailable, Unavailable) as exc:
                    log.warning("sweeper: %s", exc)

    async def reap(self, tier: Tier, limit: int = 200) -> int:
        """Recover jobs whose claims in ``tier`` expired; returns how many."""
        now = self.clock.now()
        expired = await self._call(functools.partial(tier.expired, now=now, limit=limit), tier)
        ours = [
            (c.job.id, c.token) for c in expired if self._tokens.get(c.job.id) == (tier, c.token)
        ]
        if ours:  # a late renewal (a long pause?): still ours
            until = self.clock.now() + self.claim_seconds
            await self._call(functools.partial(tier.renew, ours, until=until), tier)
        mine = {job_id for job_id, _ in ours}
        others = [c for c in expired if c.job.id not in mine]
        if not others:
            return 0
        records = await self._records([c.job.id for c in others])
        writes: list[Job] = []
        settles: list[tuple[str, str, Job | None]] = []
        for claim in others:
            recovery = recover_claim(records.get(claim.job.id), now=now, policy=self.core.policy)
            if recovery.write is not None:
                writes.append(recovery.write)
            settles.append((claim.job.id, claim.token, recovery.requeue))
        if writes:
            # The record store first: a job goes back to the tier only once
            # its lost lease is on record. A refused write means the job moved
            # on meanwhile (its instance was alive after all): decided again,
            # from the new truth, at the next round.
            written = self._persist(writes, settle=False)
            await self._committed(written)
            settles = [item for item in settles if item[0] not in written.refused]
        done = await self._call(functools.partial(tier.settle, settles), tier)
        active = self.active()
        back = [r for (_, _, r), ok in zip(settles, done, strict=True) if ok and r is not None]
        if back and active is not None and active is not tier:
            # Claims left in the fallback from an outage: their jobs belong to
            # the tier in use now.
            await self._call(functools.partial(active.push, back), active)
        count = sum(done)
        self.reaped += count
        log.warning(
            "reaped %d expired claims in %s (%d running jobs lost their lease)",
            count,
            tier.kind,
            len(writes),
        )
        return count

    async def sweep(self, limit: int = 200) -> int:
        """Requeue running jobs that nobody manages any more; returns how many.

        A running job whose lease ran out ``claim_seconds`` ago on record
        (extensions are written through) has no live holder: its instance
        died while its claim was lost with the tier's data, for example. It
        lost its lease, as the core decides (:func:`recover_claim`).
        """
        backend = self.committer.backend
        stale = getattr(backend, "stale_running", None)
        if stale is None:
            return 0
        now = self.clock.now()
        jobs: list[Job] = await self._blocking(
            functools.partial(stale, now - self.claim_seconds, limit)
        )
        writes: list[Job] = []
        for job in jobs:
            if self.core.get(job.id) is not None:
                continue  # ours: the local core's own lease expiry handles it
            recovery = recover_claim(job, now=now, policy=self.core.policy)
            if recovery.write is not None:
                writes.append(recovery.write)
        if not writes:
            return 0
        written = self._persist(writes, settle=False)
        await self._committed(written)
        writes = [job for job in writes if job.id not in written.refused]
        back = [job for job in writes if job.status in _WAITING]
        self._admit_new(back)
        await self._published(back)
        self.swept += len(writes)
        log.warning("swept %d running jobs whose holders are gone", len(writes))
        return len(writes)

    async def _probe_loop(self) -> None:
        """Probe the tier while it is not healthy, at the health machine's pace."""
        while True:
            probe_at = self.tier_health.next_probe_at()
            self._health_wakeup = trio.Event()
            if probe_at is None:
                await self._health_wakeup.wait()
                continue
            with trio.move_on_at(self.clock.trio_deadline(probe_at)):
                await self._health_wakeup.wait()
                continue
            try:
                await self.tier.next_due()
            except TierUnavailable:
                self._health(ProbeFailed(now=self.clock.now()))
            else:
                self._health(ProbeSucceeded(now=self.clock.now()))

    def _start_reconcile(self, reconcile_id: int | None) -> None:
        if self._reconcile is not None:
            self._reconcile[1].cancel()
            self._reconcile = None
        if self._nursery is None:
            return
        scope = trio.CancelScope()
        if reconcile_id is not None:
            self._reconcile = (reconcile_id, scope)
        self._nursery.start_soon(self._run_reconcile, reconcile_id, scope)

    async def _run_reconcile(self, reconcile_id: int | None, scope: trio.CancelScope) -> None:
        with scope:
            try:
                pushed = await self.reconcile()
            except (TierUnavailable, Unavailable) as exc:
                log.warning("queue tier reconcile failed: %s", exc)
                return
            log.info("queue tier reconciled: %d jobs pushed from the record store", pushed)
            if reconcile_id is not None and self._reconcile and self._reconcile[0] == reconcile_id:
                self._reconcile = None
                self._health(ReconcileFinished(now=self.clock.now(), reconcile_id=reconcile_id))

    async def reconcile(self, page: int = 2000) -> int:
        """Make the primary tier hold every queued and scheduled job again.

        First the pauses; then the jobs queued in this instance's memory while
        no tier was usable (they leave memory); then every queued or scheduled
        job of the record store, page by page (pushes skip claimed jobs).
        """
        tier = self.tier
        if tier.holds_records:
            return 0  # the record store is the tier: nothing to repair
        for job_type in sorted(self.core.paused):
            await self._call(functools.partial(tier.set_paused, job_type, True), tier)
        await self._tier_limits(tier)
        local = [
            job
            for job_type in self._ready_types()
            for job in self.core.ready_jobs(job_type)
            if job.id not in self._tokens
        ]
        for job in local:
            self.core.evict(job.id)
        try:
            if local:
                await self._call(functools.partial(tier.push, local), tier)
        except TierUnavailable:
            now = self.clock.now()
            for job in local:
                self.core.restore(job, now=now)
            self.changed()
            raise
        backend = self.committer.backend
        pushed = len(local)
        after = ""
        while True:
            jobs, after = await self._blocking(functools.partial(backend.load_queued, after, page))
            fresh = [job for job in jobs if self.core.get(job.id) is None]
            if fresh:
                pushed += await self._call(functools.partial(tier.push, fresh), tier)
            if not after:
                break
        self._due_dirty = True
        self._hear(None)
        return pushed
