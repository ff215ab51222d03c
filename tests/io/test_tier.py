"""One conformance suite for the queue tier: MemoryTier (the reference), Redis, PostgreSQL.

Every test taking the ``tier`` fixture runs against all three with the same
assertions (PostgreSQL: the record store as the tier, in a private schema). Redis is the shared server named by ``STACKDUCK_TEST_REDIS_URL``
(default ``redis://127.0.0.1:6379/0``); each test uses a key prefix of its own
(``sdtest-<random>``), deleted at the end. An unreachable Redis makes the Redis
cases FAIL, never skip: CI must not pass without them.

Redis-only behaviour (a server that is down, a killed connection, the key
prefix) is at the end.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import random
import socket
import statistics
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import attrs
import pytest
import trio
import trio_asyncio  # type: ignore[import-untyped]
from redis.asyncio import Redis

from stackduck_core import Job, RateLimit, Status, TypeLimit, gcra, gcra_allowance, placement
from stackduck_core._ordering import MAX_SEQ, ready_seq
from stackduck_trio._pgtier import PostgresTier
from stackduck_trio._postgres import PostgresBackend
from stackduck_trio._redis import RedisTier, job_from_json, job_to_json, open_redis_tier
from stackduck_trio._tier import (
    HELD,
    Claim,
    MemoryTier,
    QueueTier,
    TierCounts,
    TierUnavailable,
)

from .test_backends import NOW, SHARED_DATABASE_URL, make_job, private_schema

REDIS_URL = os.environ.get("STACKDUCK_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
LATER = NOW + 30.0


def scheduled_job(n: int, due: float, **fields: Any) -> Job:
    """A scheduled job ``job-<n>`` due at ``due`` (never queued: ``seq`` 0)."""
    return make_job(n, status=Status.SCHEDULED, scheduled_at=due, seq=0, **fields)


def full_job(n: int) -> Job:
    """A record with every field set to an awkward value."""
    return make_job(
        n,
        payload='{"text": "\u00e9\U0001f986 \\" \\n", "lone": "\udc80"}',
        priority=3,
        max_retries=7,
        delay=1,
        scheduled_at=1.0000001,
        created_at=NOW + 0.1,
        updated_at=NOW + 1e-6,
        retry_count=3,
        error_message="Traceback\n  \u2603 failed\x00",
        started_at=NOW + 0.30000000000000004,
        completed_at=5e-324,
        seq=MAX_SEQ,
        attempt=4,
        lost_leases=2,
        lease_id="lease-\u00e9",
        lease_expires_at=NOW + 123.456789012345,
        worker_id="worker:1",
        version=17,
        idempotency_key="order 42",
    )


async def claim_ids(
    tier: QueueTier,
    job_type: str = "t",
    limit: int = 100,
    *,
    now: float = NOW,
    owner: str = "owner-a",
    token: str = "tok",
    until: float = LATER,
) -> list[str]:
    claims = await tier.claim(job_type, limit, now=now, owner=owner, token=token, until=until)
    for claim in claims:
        assert (claim.owner, claim.token, claim.until) == (owner, token, until)
    return [claim.job.id for claim in claims]


class Wakeups:
    """An ``on_ready`` callback that records what it was told, and when."""

    def __init__(self) -> None:
        self.seen: list[tuple[float, str]] = []
        self._send, self._receive = trio.open_memory_channel[tuple[float, str]](math.inf)

    def __call__(self, job_type: str) -> None:
        item = (trio.current_time(), job_type)
        self.seen.append(item)
        self._send.send_nowait(item)

    async def expect(self, job_type: str, within: float = 5.0) -> float:
        """Wait until ``job_type`` is reported (skipping others); return when it was."""
        with trio.fail_after(within):
            while True:
                at, got = await self._receive.receive()
                if got == job_type:
                    return at

    def drain(self) -> list[str]:
        out: list[str] = []
        while True:
            try:
                out.append(self._receive.receive_nowait()[1])
            except trio.WouldBlock:
                return out


async def listen(nursery: trio.Nursery, tier: QueueTier) -> Wakeups:
    """Run ``tier.wait_ready`` in ``nursery``; return once it certainly listens."""
    wakeups = Wakeups()
    nursery.start_soon(tier.wait_ready, wakeups)
    with trio.fail_after(5):
        while True:  # resuming publishes the type: repeat until it arrives
            await tier.set_paused("probe", False)
            with trio.move_on_after(0.05):
                await wakeups.expect("probe")
                break
    wakeups.drain()
    return wakeups


def new_prefix() -> str:
    return f"sdtest-{uuid.uuid4().hex[:12]}"


# -- fixtures ---------------------------------------------------------------------------


@pytest.fixture(params=["memory", "redis", "postgres"])
async def tier(request: pytest.FixtureRequest) -> AsyncIterator[QueueTier]:
    if request.param == "memory":
        memory = MemoryTier()
        await memory.open()
        yield memory
        await memory.close()
        return
    if request.param == "postgres":
        with private_schema() as schema:
            backend = PostgresBackend(SHARED_DATABASE_URL, schema=schema)
            await trio.to_thread.run_sync(backend.open)
            try:
                yield PostgresTier(backend)
            finally:
                await trio.to_thread.run_sync(backend.close)
        return
    async with open_redis_tier(REDIS_URL, prefix=new_prefix()) as redis_tier:
        try:
            yield redis_tier
        finally:
            await redis_tier.clear()


@asynccontextmanager
async def open_peer(tier: QueueTier) -> AsyncIterator[QueueTier]:
    """Another instance on the same tier (for Redis: a second client, same prefix)."""
    if isinstance(tier, RedisTier):
        async with open_redis_tier(tier.url, prefix=tier.prefix) as peer:
            yield peer
    elif isinstance(tier, PostgresTier):
        yield PostgresTier(tier.backend)  # its own LISTEN connection
    else:
        yield tier


# -- the records ------------------------------------------------------------------------


def test_job_json_round_trip() -> None:
    for job in (full_job(1), make_job(2), scheduled_job(3, NOW + 0.1)):
        text = job_to_json(job)
        assert isinstance(text, str) and text.isascii()
        back = job_from_json(text)
        assert back == job
        for field in attrs.fields(Job):
            assert type(getattr(back, field.name)) is type(getattr(job, field.name)), field.name
    as_int = make_job(4, scheduled_at=int(NOW))  # an int where a float belongs
    back = job_from_json(job_to_json(as_int))
    assert back == as_int and type(back.scheduled_at) is float


async def test_records_round_trip_exactly(tier: QueueTier) -> None:
    full, sparse = full_job(1), make_job(2, priority=1)
    if isinstance(tier, PostgresTier):
        # PostgreSQL text holds no NUL (the record store keeps U+FFFD instead, see
        # test_backends.py) and no lone surrogate (no protobuf string carries one).
        full = attrs.evolve(
            full,
            payload=full.payload.replace("\udc80", "\ufffd"),
            error_message=full.error_message.replace("\x00", ""),
        )
    assert await tier.push([full, sparse]) == 2
    [claim_sparse, claim_full] = await tier.claim(
        "t", 10, now=NOW, owner="o", token="k", until=LATER
    )
    assert claim_full.job == full and claim_sparse.job == sparse
    assert claim_full.job.payload.encode("utf-8", "surrogatepass") == full.payload.encode(
        "utf-8", "surrogatepass"
    )
    assert [c.job for c in await tier.expired(now=LATER, limit=10)] == [full, sparse]
    assert await tier.settle([(full.id, "k", full)]) == [True]
    assert await tier.remove([full.id]) == [full]


# -- push and claim ---------------------------------------------------------------------


async def test_claim_order_priority_then_fifo(tier: QueueTier) -> None:
    jobs = [
        make_job(5, priority=2),
        make_job(1, priority=3),
        make_job(4, priority=1),
        make_job(2, priority=2),
        make_job(3, priority=1),
        make_job(6, priority=3),
    ]
    assert await tier.push(jobs) == 6
    assert await tier.counts() == TierCounts({"t": (2, 2, 2)}, 0, 0)
    assert await claim_ids(tier, limit=3) == ["job-3", "job-4", "job-2"]
    assert await claim_ids(tier, limit=1) == ["job-5"]
    assert await claim_ids(tier, limit=100) == ["job-1", "job-6"]
    assert await claim_ids(tier, limit=100) == []
    assert await tier.counts() == TierCounts({}, 0, 6)


async def test_scores_are_exact_at_the_top_of_the_budget(tier: QueueTier) -> None:
    # neighbouring seqs near 2**51 and every priority: a rounded score would tie or swap
    jobs = [
        make_job(1, seq=MAX_SEQ, priority=3, id="c"),
        make_job(2, seq=MAX_SEQ - 1, priority=3, id="d"),
        make_job(3, seq=MAX_SEQ, priority=2, id="b"),
        make_job(4, seq=1, priority=3, id="a"),
        make_job(5, seq=MAX_SEQ - 1, priority=1, id="e"),
    ]
    await tier.push(jobs)
    assert await claim_ids(tier) == ["e", "b", "a", "d", "c"]


async def test_equal_scores_tie_by_id(tier: QueueTier) -> None:
    await tier.push([make_job(1, id="b", seq=7), make_job(2, id="a", seq=7)])
    assert await claim_ids(tier) == ["a", "b"]


async def test_limit_and_types(tier: QueueTier) -> None:
    await tier.push([make_job(n) for n in range(1, 6)] + [make_job(9, job_type="other")])
    assert await claim_ids(tier, limit=0) == []
    assert await claim_ids(tier, limit=-1) == []
    assert await claim_ids(tier, limit=2) == ["job-1", "job-2"]
    assert await claim_ids(tier, "nothing-here", limit=2) == []
    assert await claim_ids(tier, "other", limit=2) == ["job-9"]
    assert await tier.counts() == TierCounts({"t": (0, 3, 0)}, 0, 3)


async def test_concurrent_claims_never_overlap(tier: QueueTier) -> None:
    total = 300
    await tier.push([make_job(n, priority=1 + n % 3) for n in range(1, total + 1)])
    taken: dict[str, list[str]] = {}
    rng = random.Random(7)

    async def claimer(owner: str) -> None:
        taken[owner] = []
        round_ = 0
        while True:
            round_ += 1
            token = f"{owner}-{round_}"
            claims = await tier.claim(
                "t", rng.randint(1, 5), now=NOW, owner=owner, token=token, until=LATER
            )
            if not claims:
                return
            for claim in claims:
                assert (claim.owner, claim.token) == (owner, token)
            taken[owner] += [claim.job.id for claim in claims]
            await trio.lowlevel.checkpoint()  # MemoryTier never yields by itself

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            for i in range(30):
                nursery.start_soon(claimer, f"owner-{i}")
    every = [job_id for ids in taken.values() for job_id in ids]
    assert len(every) == total
    assert set(every) == {f"job-{n}" for n in range(1, total + 1)}
    assert sum(1 for ids in taken.values() if ids) > 1  # they really raced
    counts = await tier.counts()
    assert (counts.ready, counts.claimed) == ({}, total)


async def test_push_ignores_other_statuses(tier: QueueTier) -> None:
    await tier.push([make_job(1)])
    others = [
        make_job(2, status=status)
        for status in (Status.RUNNING, Status.COMPLETED, Status.FAILED, Status.CANCELLED)
    ]
    assert await tier.push(others) == 0
    assert await tier.push([make_job(1, status=Status.COMPLETED)]) == 0  # present: kept
    assert await tier.push([]) == 0
    assert await tier.counts() == TierCounts({"t": (0, 1, 0)}, 0, 0)
    assert await claim_ids(tier) == ["job-1"]


async def test_push_of_claimed_is_ignored_and_of_unclaimed_replaces(tier: QueueTier) -> None:
    await tier.push([make_job(1), make_job(2), make_job(3)])
    assert await claim_ids(tier, limit=1, token="held") == ["job-1"]
    new_1 = make_job(1, priority=1, payload='{"v": 2}', version=2)
    new_3 = make_job(3, priority=1, payload='{"v": 2}', version=2)
    assert await tier.push([new_1, new_3]) == 1
    counts = await tier.counts()
    assert counts == TierCounts({"t": (1, 1, 0)}, 0, 1)
    claims = await tier.claim("t", 10, now=NOW, owner="o", token="k", until=LATER)
    assert [c.job for c in claims] == [new_3, make_job(2)]
    # the claimed job kept the record it was claimed with
    [held] = [c for c in await tier.expired(now=LATER, limit=10) if c.token == "held"]
    assert held.job == make_job(1)
    # a scheduled job replaced by a queued one (and back) moves between the sets
    await tier.push([scheduled_job(4, NOW + 50)])
    assert (await tier.counts()).scheduled == 1
    await tier.push([make_job(4)])
    assert await tier.counts() == TierCounts({"t": (0, 1, 0)}, 0, 3)
    assert await tier.push([scheduled_job(4, NOW + 60)]) == 1
    assert await tier.counts() == TierCounts({}, 1, 3)
    assert await tier.next_due() == NOW + 60


# -- scheduled jobs ---------------------------------------------------------------------


async def test_scheduled_job_becomes_claimable_at_due(tier: QueueTier) -> None:
    due = NOW + 10.123456
    job = scheduled_job(1, due)
    assert await tier.push([job]) == 1
    assert await tier.counts() == TierCounts({}, 1, 0)
    assert await tier.next_due() == due
    assert await claim_ids(tier, now=due - 1e-6) == []
    assert await tier.counts() == TierCounts({}, 1, 0)
    claims = await tier.claim("t", 10, now=due, owner="o", token="k", until=LATER)
    assert [c.job for c in claims] == [job]  # the record as pushed, status scheduled
    assert claims[0].job.status is Status.SCHEDULED
    assert await tier.next_due() is None


async def test_promoted_job_takes_its_placement_score(tier: QueueTier) -> None:
    due = NOW + 10
    before = make_job(1, seq=ready_seq(NOW + 5))
    sched = scheduled_job(2, due)
    after = make_job(3, seq=ready_seq(NOW + 15))
    urgent = scheduled_job(4, due, priority=1)
    place = placement(sched)
    assert place is not None and not place.ready and place.due == due
    await tier.push([after, sched, before, urgent])
    assert await claim_ids(tier, now=due) == ["job-4", "job-1", "job-2", "job-3"]


def promotes_eagerly(tier: QueueTier) -> bool:
    """Whether any claim moves every due job to the ready sets (memory, Redis).

    The record-store tier has no separate ready set: a due scheduled row is
    claimable as it is, and counts as scheduled (and in next_due) until a claim
    of its own type takes it. The contract allows both (see ``_tier.py``).
    """
    return not isinstance(tier, PostgresTier)


async def test_claim_promotes_due_jobs_of_every_type(tier: QueueTier) -> None:
    await tier.push([scheduled_job(1, NOW + 1, job_type="s"), scheduled_job(2, NOW + 100)])
    await tier.set_paused("t", True)
    assert await claim_ids(tier, "t", now=NOW + 1) == []  # paused, but promotion happened
    if promotes_eagerly(tier):
        assert await tier.counts() == TierCounts({"s": (0, 1, 0)}, 1, 0)
        assert await tier.next_due() == NOW + 100
    else:
        assert await tier.counts() == TierCounts({}, 2, 0)
        assert await tier.next_due() == NOW + 1
    assert await claim_ids(tier, "s", now=NOW + 1) == ["job-1"]
    assert await tier.next_due() == NOW + 100


async def test_next_due(tier: QueueTier) -> None:
    assert await tier.next_due() is None
    await tier.push([scheduled_job(1, NOW + 20.5), scheduled_job(2, NOW + 10.000001)])
    assert await tier.next_due() == NOW + 10.000001
    assert await tier.remove(["job-2"]) == [scheduled_job(2, NOW + 10.000001)]
    assert await tier.next_due() == NOW + 20.5
    await tier.claim("t", 0, now=NOW + 21, owner="o", token="k", until=LATER)  # promotes
    if promotes_eagerly(tier):
        assert await tier.next_due() is None
        assert await tier.counts() == TierCounts({"t": (0, 1, 0)}, 0, 0)
    else:
        assert await tier.next_due() == NOW + 20.5
        assert await tier.counts() == TierCounts({}, 1, 0)
    assert await claim_ids(tier, now=NOW + 21) == ["job-1"]
    assert await tier.next_due() is None


# -- pause ------------------------------------------------------------------------------


async def test_paused_type_yields_nothing_and_resume_wakes(tier: QueueTier) -> None:
    assert await tier.paused() == frozenset()
    await tier.set_paused("t", True)
    await tier.set_paused("t", True)
    await tier.set_paused("u", True)
    assert await tier.paused() == {"t", "u"}
    await tier.push([make_job(1)])
    assert await claim_ids(tier) == []
    assert await tier.counts() == TierCounts({"t": (0, 1, 0)}, 0, 0)
    async with trio.open_nursery() as nursery:
        wakeups = await listen(nursery, tier)
        await tier.set_paused("t", False)
        await wakeups.expect("t")
        nursery.cancel_scope.cancel()
    assert await tier.paused() == {"u"}
    assert await claim_ids(tier) == ["job-1"]


# -- limits ---------------------------------------------------------------------------------


async def test_concurrency_limit_counts_the_types_claims(tier: QueueTier) -> None:
    await tier.set_limit("t", TypeLimit(max_running=2))
    await tier.set_limit("t", TypeLimit(max_running=2))  # idempotent
    await tier.push([make_job(n) for n in range(1, 6)] + [make_job(9, job_type="u")])
    claims = await tier.claim("t", 5, now=NOW, owner="a", token="k1", until=LATER)
    assert [c.job.id for c in claims] == ["job-1", "job-2"]
    assert (claims.held, claims.retry_at) == ("running", None)
    again = await tier.claim("t", 5, now=NOW, owner="b", token="k2", until=LATER)
    assert (list(again), again.held) == ([], "running")
    assert await claim_ids(tier, "u") == ["job-9"]  # other types are not limited
    async with open_peer(tier) as peer, trio.open_nursery() as nursery:
        wakeups = await listen(nursery, peer)
        # the end of a claim wakes the instances: room for one more
        assert await tier.settle([("job-1", "k1", None)]) == [True]
        await wakeups.expect("t")
        nursery.cancel_scope.cancel()
    # a renewed claim still counts; an ended one does not
    assert await tier.renew([("job-2", "k1")], until=LATER + 1) == [True]
    assert [c.job.id for c in await peer_claim(tier, 5)] == ["job-3"]
    assert list(await peer_claim(tier, 5)) == []
    await tier.set_limit("t", TypeLimit(max_running=4))  # raised at run time
    assert [c.job.id for c in await peer_claim(tier, 5)] == ["job-4", "job-5"]
    await tier.set_limit("t", None)
    await tier.push([make_job(n) for n in range(10, 13)])
    unlimited = await peer_claim(tier, 5)
    assert (len(unlimited), unlimited.held) == (3, None)


async def peer_claim(tier: QueueTier, limit: int, now: float = NOW) -> Any:
    return await tier.claim("t", limit, now=now, owner="p", token=f"p{now}", until=LATER)


async def test_rate_limit_follows_the_cores_rule(tier: QueueTier) -> None:
    """The tier's claims take exactly what TypeLimit.decide allows, step by step."""
    limit = TypeLimit(rate=RateLimit(10.0, 3))  # T = 0.1 s, 3 at once
    await tier.set_limit("t", limit)
    await tier.push([make_job(n) for n in range(1, 31)])
    tat: float | None = None
    taken = 0
    for step, (dt, want) in enumerate(
        [(0.0, 10), (0.0, 10), (0.05, 10), (0.1, 10), (0.35, 10), (1.0, 2), (5.0, 10)]
    ):
        now = NOW + dt + step * 1e-3
        expected = limit.decide(want, tat=tat, now=now, running=0)
        claims = await tier.claim("t", want, now=now, owner="o", token=f"k{step}", until=LATER)
        assert len(claims) == expected.granted, (step, expected)
        assert claims.held == expected.held
        if expected.held == "rate":
            assert claims.retry_at == pytest.approx(expected.retry_at, abs=1e-6)
        tat = limit.taken(len(claims), tat=tat, now=now)
        taken += len(claims)
        # settling does not give tokens back (the rate counts starts)
        await tier.settle([(c.job.id, f"k{step}", None) for c in claims])
    assert taken == 3 + 0 + 0 + 1 + 2 + 2 + 3


async def test_a_limit_holds_back_only_jobs_that_exist(tier: QueueTier) -> None:
    """Nothing ready (or fewer than asked): no hold, so no retry time to wake up at."""
    await tier.set_limit("t", TypeLimit(rate=RateLimit(50.0, 1)))
    empty = await tier.claim("t", 4, now=NOW, owner="o", token="k1", until=LATER)
    assert (list(empty), empty.held, empty.retry_at) == ([], None, None)
    await tier.push([make_job(1)])
    one = await tier.claim("t", 4, now=NOW + 1, owner="o", token="k2", until=LATER)
    assert (len(one), one.held, one.retry_at) == (1, None, None)
    await tier.push([make_job(2), make_job(3)])
    held = await tier.claim("t", 4, now=NOW + 1, owner="o", token="k3", until=LATER)
    assert (len(held), held.held) == (0, "rate")
    await tier.set_limit("t", TypeLimit(max_running=1))
    again = await tier.claim("t", 4, now=NOW + 1, owner="o", token="k4", until=LATER)
    assert (len(again), again.held) == (0, "running")  # job-1 is still claimed


async def test_limit_change_keeps_the_rate_state_only_for_the_same_rate(tier: QueueTier) -> None:
    await tier.set_limit("t", TypeLimit(rate=RateLimit(1.0, 2)))
    await tier.push([make_job(n) for n in range(1, 9)])
    assert len(await peer_claim(tier, 5)) == 2
    # a new burst through re-configuring max_running? no: the bucket is still empty
    await tier.set_limit("t", TypeLimit(rate=RateLimit(1.0, 2), max_running=100))
    assert len(await peer_claim(tier, 5)) == 0
    # a new rate starts afresh (the state was in the old rate's units)
    await tier.set_limit("t", TypeLimit(rate=RateLimit(100.0, 2)))
    assert len(await peer_claim(tier, 5)) == 2
    # without a rate the state goes; a new rate starts with a full bucket
    await tier.set_limit("t", TypeLimit(max_running=100))
    await tier.set_limit("t", TypeLimit(rate=RateLimit(100.0, 2)))
    assert len(await peer_claim(tier, 5)) == 2


async def test_redis_claimed_set_drops_ids_whose_claim_ended_elsewhere() -> None:
    """An id left in a type's claimed set (by an older version's settle) does not
    count against max_running for good: the claim script drops it."""
    async with open_redis_tier(REDIS_URL, prefix=new_prefix()) as tier:
        try:
            await tier.set_limit("t", TypeLimit(max_running=1))
            await tier.push([make_job(1)])

            async def leftover(client: Redis) -> Any:
                return await client.sadd(f"{tier.prefix}:claimed:t", "gone-1", "gone-2")

            assert await redis_admin(leftover) == 2
            assert await claim_ids(tier) == ["job-1"]
        finally:
            await tier.clear()


async def test_redis_gcra_mirrors_the_core_bit_for_bit() -> None:
    """The claim script's GCRA functions against stackduck_core, on hard cases."""
    from stackduck_trio._redis import _KEY_NAMES, _PRELUDE

    script = _PRELUDE + (
        "local tat, now = tonumber(ARGV[3]), tonumber(ARGV[4])\n"
        "local interval, burst = tonumber(ARGV[5]), tonumber(ARGV[6])\n"
        "local k = gcra_allowance(tat, now, interval, burst)\n"
        "local new_tat = math.max(tat, now) + k * interval\n"
        "return {k, string.format('%.17g', new_tat)}"
    )
    rng = random.Random(7)
    cases = [(1_000_000_000.0000001, 1_000_000_000.0, 3.0, 13)]
    for _ in range(300):
        rate = rng.choice([3.0, 7.0, 10.0, 0.3, 1 / 3, 13.7, 1e4, rng.uniform(0.001, 1e5)])
        burst = rng.randint(1, 40)
        now = rng.choice([NOW + rng.random() * 100, rng.random() * 10, 1e9, -5.5])
        owed = rng.uniform(0, burst + 2) / rate
        tat = now + owed + rng.choice([0.0, 1e-7, -1e-7, 1e-12])
        cases.append((tat, now, rate, burst))

    async def run(client: Any) -> list[Any]:
        keys = [f"sdtest-gcra:{name}" for name in _KEY_NAMES]
        out = []
        for tat, now, rate, burst in cases:
            interval = RateLimit(rate, burst).emission_interval
            args = ["p", "c", repr(tat), repr(now), repr(interval), str(burst)]
            out.append(await client.eval(script, len(keys), *keys, *args))
        return out

    async with trio_asyncio.open_loop():
        results = await redis_admin(run)
    for (tat, now, rate, burst), (k, new_tat) in zip(cases, results, strict=True):
        limit = RateLimit(rate, burst)
        assert int(k) == gcra_allowance(tat, now, limit), (tat, now, rate, burst)
        if int(k):
            assert float(new_tat) == gcra(tat, now, limit, int(k)).new_tat


# -- settle, renew, expired -------------------------------------------------------------


async def test_settle(tier: QueueTier) -> None:
    await tier.push([make_job(n) for n in range(1, 6)])
    assert await claim_ids(tier, token="tok") == [f"job-{n}" for n in range(1, 6)]
    requeued = make_job(1, priority=1, seq=1000, attempt=1, version=3)
    completed = make_job(4, status=Status.COMPLETED, completed_at=NOW + 2, version=3)
    later = scheduled_job(5, NOW + 40, retry_count=1, version=3)
    async with trio.open_nursery() as nursery:
        wakeups = await listen(nursery, tier)
        results = await tier.settle(
            [
                ("job-1", "tok", requeued),
                ("job-2", "tok", None),
                ("job-3", "wrong", None),
                ("job-4", "tok", completed),
                ("job-5", "tok", later),
                ("job-9", "tok", None),
            ]
        )
        assert results == [True, True, False, True, True, False]
        await wakeups.expect("")
        await wakeups.expect("t")
        nursery.cancel_scope.cancel()
    assert await tier.counts() == TierCounts({"t": (1, 0, 0)}, 1, 1)
    assert await tier.next_due() == NOW + 40
    # a settled claim is gone: its token no longer works
    assert await tier.settle([("job-1", "tok", None), ("job-2", "tok", None)]) == [False, False]
    claims = await tier.claim("t", 10, now=NOW + 40, owner="o", token="tok2", until=LATER)
    assert [c.job for c in claims] == [requeued, later]
    assert await tier.settle([("job-3", "tok", None), ("job-3", "tok", None)]) == [True, False]
    assert await tier.settle([]) == []
    assert await tier.counts() == TierCounts({}, 0, 2)


async def test_renew_and_expired(tier: QueueTier) -> None:
    await tier.push([make_job(1), make_job(2), make_job(3)])
    await claim_ids(tier, limit=1, token="a", until=NOW + 10)
    await claim_ids(tier, limit=1, token="b", until=NOW + 20)
    await claim_ids(tier, limit=1, token="c", until=NOW + 5, owner="owner-b")
    assert await tier.expired(now=NOW + 4.999, limit=10) == []
    expired = await tier.expired(now=NOW + 10, limit=10)
    assert [(c.job.id, c.token, c.owner, c.until) for c in expired] == [
        ("job-3", "c", "owner-b", NOW + 5),
        ("job-1", "a", "owner-a", NOW + 10),
    ]
    assert await tier.expired(now=NOW + 10, limit=10) == expired  # unchanged by looking
    assert await tier.expired(now=NOW + 10, limit=1) == expired[:1]
    assert await tier.expired(now=NOW + 10, limit=0) == []
    assert (await tier.counts()).claimed == 3
    renewed = await tier.renew(
        [("job-3", "c"), ("job-1", "wrong"), ("job-9", "a")], until=NOW + 30.25
    )
    assert renewed == [True, False, False]
    assert await tier.renew([], until=NOW) == []
    assert [c.job.id for c in await tier.expired(now=NOW + 10, limit=10)] == ["job-1"]
    everything = await tier.expired(now=NOW + 100, limit=10)
    assert everything == [
        Claim(make_job(1), "a", "owner-a", NOW + 10),
        Claim(make_job(2), "b", "owner-a", NOW + 20),
        Claim(make_job(3), "c", "owner-b", NOW + 30.25),
    ]
    # renewing keeps the token: settle still works with it
    assert await tier.settle([("job-3", "c", None)]) == [True]
    assert await tier.renew([("job-3", "c")], until=NOW + 99) == [False]


# -- remove -----------------------------------------------------------------------------


async def test_remove(tier: QueueTier) -> None:
    sched = scheduled_job(3, NOW + 50)
    await tier.push([make_job(1), make_job(2), sched])
    assert await claim_ids(tier, limit=1) == ["job-1"]
    out = await tier.remove(["job-1", "job-2", "job-3", "nope", "job-2"])
    assert out == [HELD, make_job(2), sched, None, None]  # job-1 is claimed: held
    assert await tier.remove([]) == []
    assert await tier.counts() == TierCounts({}, 0, 1)
    assert await tier.next_due() is None
    assert await claim_ids(tier, now=NOW + 100) == []
    # removed jobs can come back
    assert await tier.push([make_job(2)]) == 1
    assert await claim_ids(tier) == ["job-2"]


# -- wake-ups ---------------------------------------------------------------------------


async def test_wait_ready_wakes_across_instances(tier: QueueTier) -> None:
    async with open_peer(tier) as peer, trio.open_nursery() as nursery:
        wakeups = await listen(nursery, tier)
        await peer.push([make_job(1, job_type="alpha")])
        await wakeups.expect("alpha")
        await peer.push([scheduled_job(2, NOW + 5, job_type="beta")])
        await wakeups.expect("")
        latencies: list[float] = []
        for n in range(50):
            job_type = f"type-{n}"
            start = trio.current_time()
            await peer.push([make_job(100 + n, job_type=job_type)])
            latencies.append(await wakeups.expect(job_type) - start)
        nursery.cancel_scope.cancel()
    latencies.sort()
    p50 = statistics.median(latencies)
    p99 = latencies[min(len(latencies) - 1, math.ceil(0.99 * len(latencies)) - 1)]
    print(
        f"\n[{tier.kind}] push -> wake-up latency: p50 {p50 * 1e3:.3f} ms, p99 {p99 * 1e3:.3f} ms"
    )


async def test_claim_throughput(tier: QueueTier) -> None:
    total = 3000
    jobs = [make_job(n) for n in range(1, total + 1)]
    for start in range(0, total, 500):
        await tier.push(jobs[start : start + 500])
    singles = 500
    t0 = time.perf_counter()
    for _ in range(singles):
        assert len(await tier.claim("t", 1, now=NOW, owner="o", token="k", until=LATER)) == 1
    single_rate = singles / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    taken = 0
    while claims := await tier.claim("t", 100, now=NOW, owner="o", token="k", until=LATER):
        taken += len(claims)
    batch_rate = taken / (time.perf_counter() - t0)
    assert taken == total - singles
    print(
        f"\n[{tier.kind}] claims: {single_rate:,.0f} claims/s (limit 1), "
        f"{batch_rate:,.0f} jobs/s (limit 100)"
    )


# -- Redis only -------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_redis_down_raises_quickly_on_every_operation() -> None:
    port = free_port()
    op_timeout = 2.0
    job = make_job(1)
    operations: list[tuple[str, Callable[[RedisTier], Any]]] = [
        ("open", lambda t: t.open()),
        ("push", lambda t: t.push([job])),
        ("claim", lambda t: t.claim("t", 1, now=NOW, owner="o", token="k", until=LATER)),
        ("settle", lambda t: t.settle([("job-1", "k", None)])),
        ("renew", lambda t: t.renew([("job-1", "k")], until=LATER)),
        ("expired", lambda t: t.expired(now=NOW, limit=10)),
        ("remove", lambda t: t.remove(["job-1"])),
        ("set_paused", lambda t: t.set_paused("t", True)),
        ("paused", lambda t: t.paused()),
        ("next_due", lambda t: t.next_due()),
        ("counts", lambda t: t.counts()),
        ("clear", lambda t: t.clear()),
    ]
    async with trio_asyncio.open_loop():
        tier = RedisTier(
            f"redis://user:s3cret@127.0.0.1:{port}/0", prefix=new_prefix(), op_timeout=op_timeout
        )
        try:
            for name, operation in operations:
                start = time.perf_counter()
                with pytest.raises(TierUnavailable) as info:
                    await operation(tier)
                assert time.perf_counter() - start < op_timeout / 2, name
                message = str(info.value)
                assert name in message and f"127.0.0.1:{port}" in message
                assert "s3cret" not in message
            # wait_ready keeps retrying and never raises; cancelling it is clean
            wakeups = Wakeups()
            with trio.move_on_after(0.5):
                await tier.wait_ready(wakeups)
            assert wakeups.seen == []
        finally:
            await tier.close()
        await tier.close()  # twice is fine


async def test_redis_that_does_not_answer_times_out() -> None:
    op_timeout = 0.3
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, silent_server, 0, host="127.0.0.1")
        )
        port = listeners[0].socket.getsockname()[1]
        async with trio_asyncio.open_loop():
            tier = RedisTier(
                f"redis://127.0.0.1:{port}/0", prefix=new_prefix(), op_timeout=op_timeout
            )
            try:
                for operation in (tier.open, tier.counts, tier.paused):
                    start = time.perf_counter()
                    with pytest.raises(TierUnavailable, match=f"no answer within {op_timeout:g} s"):
                        await operation()
                    assert op_timeout <= time.perf_counter() - start < op_timeout + 0.5
            finally:
                await tier.close()
        nursery.cancel_scope.cancel()


class HoldingProxy:
    """A TCP proxy to the test Redis that can hold back its replies and release them late.

    A call that timed out leaves its reply in flight; if the client kept that
    connection, the reply would answer the *next* command on it.
    """

    def __init__(self) -> None:
        self.holding = False
        self.released = trio.Event()
        self.held = 0  # bytes held back so far

    async def serve(self, client: trio.SocketStream) -> None:
        host, port = REDIS_URL.split("//", 1)[1].split("/", 1)[0].rsplit(":", 1)
        async with client, await trio.open_tcp_stream(host, int(port)) as upstream:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._pump, client, upstream, False)
                nursery.start_soon(self._pump, upstream, client, True)

    async def _pump(self, src: trio.SocketStream, dst: trio.SocketStream, replies: bool) -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            while data := await src.receive_some():
                if replies and self.holding:
                    self.held += len(data)
                    await self.released.wait()
                await dst.send_all(data)
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await dst.send_eof()


async def test_redis_reply_that_comes_after_the_timeout_never_answers_a_later_call() -> None:
    op_timeout = 0.3
    proxy = HoldingProxy()
    prefix = new_prefix()
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, proxy.serve, 0, host="127.0.0.1")
        )
        port = listeners[0].socket.getsockname()[1]
        async with trio_asyncio.open_loop():
            tier = RedisTier(f"redis://127.0.0.1:{port}/0", prefix=prefix, op_timeout=op_timeout)
            try:
                await tier.open()
                await tier.push([make_job(1), make_job(2)])
                proxy.holding = True
                start = time.perf_counter()
                with pytest.raises(TierUnavailable, match=f"no answer within {op_timeout:g} s"):
                    await tier.claim("t", 1, now=NOW, owner="o", token="k1", until=LATER)
                assert op_timeout <= time.perf_counter() - start < op_timeout + 0.5
                assert proxy.held > 0  # the claim's answer exists, held back
                proxy.holding = False
                proxy.released.set()  # the late answer reaches the client now
                await trio.sleep(0.05)
                # The timed-out claim ran on the server: job-1 is claimed. The
                # next calls get their own answers, not the late one.
                counts = await tier.counts()
                assert counts.claimed == 1 and sum(counts.ready["t"]) == 1
                again = await tier.claim("t", 5, now=NOW, owner="o", token="k2", until=LATER)
                assert [c.job.id for c in again] == ["job-2"]
                assert await tier.paused() == frozenset()
            finally:
                with contextlib.suppress(TierUnavailable):
                    await tier.clear()
                await tier.close()
        nursery.cancel_scope.cancel()


async def silent_server(stream: trio.SocketStream) -> None:
    """Accepts a connection, reads everything, never answers."""
    async with stream:
        while await stream.receive_some():
            pass


async def test_redis_not_open() -> None:
    tier = RedisTier(REDIS_URL, prefix=new_prefix())
    with pytest.raises(TierUnavailable, match="not open"):
        await tier.counts()
    with pytest.raises(RuntimeError, match="trio-asyncio"):
        await tier.open()
    with pytest.raises(ValueError, match="prefix"):
        RedisTier(REDIS_URL, prefix="")
    with pytest.raises(ValueError, match="op_timeout"):
        RedisTier(REDIS_URL, op_timeout=0)


async def redis_admin(command: Callable[[Redis], Any]) -> Any:
    """Run ``command(client)`` on a plain client of the test server (inside the loop)."""
    client = Redis.from_url(REDIS_URL, decode_responses=True)
    try:
        return await trio_asyncio.aio_as_trio(command)(client)
    finally:
        await trio_asyncio.aio_as_trio(client.aclose)()


async def test_redis_recovers_after_its_connections_are_killed() -> None:
    prefix = new_prefix()
    async with (
        open_redis_tier(REDIS_URL, prefix=prefix) as tier,
        open_redis_tier(REDIS_URL, prefix=prefix) as peer,
    ):
        try:
            async with trio.open_nursery() as nursery:
                wakeups = await listen(nursery, tier)

                async def kill(client: Redis) -> int:
                    killed = 0
                    for info in await client.client_list():
                        if info["name"] == f"stackduck-tier:{prefix}":
                            killed += await client.client_kill_filter(_id=info["id"])
                    return killed

                assert await redis_admin(kill) >= 2  # the pub/sub and a command connection
                await wakeups.expect("")  # re-subscribed: "anything may have been missed"
                # the pool noticed its dead idle connections and replaces them:
                # no operation fails (the kill was before the re-subscription)
                await peer.push([make_job(1)])
                await wakeups.expect("t")
                assert await tier.counts() == TierCounts({"t": (0, 1, 0)}, 0, 0)
                nursery.cancel_scope.cancel()
        finally:
            await tier.clear()


async def test_redis_keepalive_pings_an_idle_subscription() -> None:
    async with open_redis_tier(REDIS_URL, prefix=new_prefix()) as tier:
        tier.keepalive = 0.05
        async with trio.open_nursery() as nursery:
            wakeups = await listen(nursery, tier)
            await trio.sleep(0.5)  # about ten PING/PONG rounds
            assert wakeups.drain() == []  # no reconnection ("") in between
            await tier.push([make_job(1)])
            await wakeups.expect("t")
            nursery.cancel_scope.cancel()
        await tier.clear()


async def test_redis_keys_stay_under_the_prefix_and_clear_removes_them() -> None:
    prefix = new_prefix()
    async with open_redis_tier(REDIS_URL, prefix=prefix + "*[x]") as tier:
        other = RedisTier(REDIS_URL, prefix=prefix)  # a glob-like prefix must not match it
        await other.open()
        try:
            await other.push([make_job(1)])
            await tier.push([make_job(1), scheduled_job(2, NOW + 5), make_job(3, job_type="u")])
            await tier.claim("t", 1, now=NOW, owner="o", token="k", until=LATER)
            await tier.set_paused("u", True)
            await tier.set_limit("t", TypeLimit(rate=RateLimit(1.0)))
            await tier.push([make_job(4)])
            assert len(await tier.claim("t", 1, now=NOW, owner="o", token="k2", until=LATER)) == 1

            async def keys(client: Redis) -> list[str]:
                return sorted([key async for key in client.scan_iter(match=f"{prefix}*")])

            found = await redis_admin(keys)
            mine = [key for key in found if key.startswith(prefix + "*[x]:")]
            assert {key[len(prefix) + 5 :] for key in mine} == {
                "job",
                "type",
                "score",
                "scheduled",
                "claim",
                "claims",
                "types",
                "paused",
                "ready:u",
                "claimed:t",
                "limits",
                "tat:t",
            }
            await tier.clear()
            assert await redis_admin(keys) == [
                f"{prefix}:{name}" for name in ("job", "ready:t", "type", "types")
            ]
        finally:
            await other.clear()
            await other.close()
