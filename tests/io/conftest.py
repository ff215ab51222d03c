from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import trio

from stackduck_core import LifecyclePolicy, QueueCore
from stackduck_core._failover import BackendHealth, BackendRole
from stackduck_trio._broker import Broker, new_id
from stackduck_trio._clock import TrioWallClock
from stackduck_trio._store import GroupCommitter, MemoryBackend


class BrokerHarness:
    """A broker on the memory record store, its writer and timer running.

    Tests using it take ``autojump_clock`` themselves: pytest-trio only
    hands a clock to trio.run when the test function asks for it.
    """

    def __init__(self, broker: Broker, backend: MemoryBackend, clock: TrioWallClock) -> None:
        self.broker = broker
        self.backend = backend
        self.clock = clock


@pytest.fixture
async def harness() -> AsyncIterator[BrokerHarness]:
    clock = TrioWallClock(epoch=1_800_000_000.0)
    backend = MemoryBackend()
    health = BackendHealth("memory", BackendRole.RECORD_STORE)
    committer = GroupCommitter(backend, health, now=clock.now, clock_deadline=clock.trio_deadline)
    core = QueueCore(new_id=new_id, policy=LifecyclePolicy(max_lost_leases=3), default_lease=30.0)
    broker = Broker(core=core, committer=committer, clock=clock, write_timeout=5.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(committer.run)
        await nursery.start(broker.run_timer)
        yield BrokerHarness(broker, backend, clock)
        nursery.cancel_scope.cancel()
