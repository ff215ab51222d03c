"""Stackduck's core embedded in asyncio: an in-process job queue, no server.

``stackduck_core`` is sans-IO: it never reads a clock, sleeps or spawns a
task. This program supplies all of that with plain asyncio and drives one
:class:`stackduck_core.QueueCore`:

* a *producer* enqueues a few jobs, among them one scheduled half a second
  ahead (``scheduled_at``, RFC 3339) and one whose handler fails on its first
  attempt, so the core reschedules it after a backoff of ``delay = 1`` second;
* two *workers* are attached as streams (``QueueCore.attach``); the jobs the
  core dispatches to a stream land in that worker's inbox, and the worker
  reports the outcome with ``QueueCore.complete`` / ``QueueCore.fail``;
* the *timer* task sleeps until ``core.next_deadline()`` -- or until someone
  sets the ``changed`` event ("something changed") -- then calls
  ``core.tick()`` (promote due jobs, expire leases) and ``core.dispatch()``.

Everything runs on one event loop thread and no core call awaits, so the core
needs no lock. Time is converted in exactly one place (:class:`Clock`): the
core wants UTC epoch seconds, asyncio sleeps on its monotonic loop clock.

Run it from the repository root with ``python -m examples.asyncio_embedded``
(or ``python examples/asyncio_embedded.py`` once the package is installed): it
prints a short log and exits 0 once every job has reached a terminal state
(after about 1.2 seconds).
:func:`main` returns a summary, which ``tests/core/test_asyncio_example.py``
checks.
"""

from __future__ import annotations

import asyncio
import datetime
import itertools
import json
import sys
import time
from collections.abc import Iterable
from typing import Any

from stackduck_core import EnqueueRequest, Job, QueueCore, Rejected

JOB_TYPES = ("email", "resize")
#: A demo that has not finished by then is stuck: give up and exit 1.
GIVE_UP_AFTER = 10.0


class Clock:
    """Core time (UTC epoch seconds) on top of the loop's monotonic clock."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._offset = time.time() - loop.time()

    def now(self) -> float:
        """The current time for the core, in epoch seconds."""
        return self._loop.time() + self._offset

    def loop_time(self, epoch: float) -> float:
        """The loop time at which the epoch time ``epoch`` is reached."""
        return epoch - self._offset


class FlakyDependencyError(Exception):
    """What the demo handler raises on the first attempt of a flaky job."""


async def handle(job: Job) -> None:
    """The application's job handler: pretend to work, fail if asked to."""
    data = json.loads(job.payload)
    await asyncio.sleep(data.get("work", 0.05))
    if data.get("fail_first") and job.attempt == 1:
        raise FlakyDependencyError("upstream timed out")


class EmbeddedQueue:
    """A QueueCore plus the asyncio plumbing around it."""

    def __init__(self, *, verbose: bool) -> None:
        lease_ids = itertools.count(1)
        self.core = QueueCore(new_id=lambda: f"lease-{next(lease_ids)}")
        self.clock = Clock(asyncio.get_running_loop())
        self.started_at = self.clock.now()
        self.changed = asyncio.Event()  # "something changed": wake the timer
        self.all_done = asyncio.Event()
        self.inboxes: dict[int, asyncio.Queue[Job]] = {}
        self.records: dict[str, Job] = {}  # latest record of every job
        self.first_due: dict[str, float] = {}  # due time when enqueued
        self.starts: dict[str, list[float]] = {}
        self.failures: dict[str, list[float]] = {}
        self.workers: dict[str, list[str]] = {}
        self.expected: set[str] | None = None
        self.log: list[str] = []
        self.verbose = verbose

    def say(self, message: str) -> None:
        line = f"[+{self.clock.now() - self.started_at:5.3f}s] {message}"
        self.log.append(line)
        if self.verbose:
            print(line)

    def record(self, jobs: Iterable[Job]) -> None:
        """Keep the latest record of each job (a real runtime persists them)."""
        for job in jobs:
            self.records[job.id] = job
            self.say(f"{job.id} -> {job.status.value}")
        if self.expected is not None and all(
            self.records[job_id].status.terminal for job_id in self.expected
        ):
            self.all_done.set()

    # -- producer ------------------------------------------------------------

    def enqueue(self, job_id: str, job_type: str, payload: dict[str, Any], **options: Any) -> None:
        request = EnqueueRequest(job_type=job_type, payload=json.dumps(payload), **options)
        result = self.core.enqueue(request, job_id=job_id, now=self.clock.now())
        if isinstance(result, Rejected):
            raise RuntimeError(f"{job_id} rejected: {result.message}")
        self.first_due[job_id] = result.scheduled_at
        self.record([result])
        self.changed.set()

    async def produce(self) -> None:
        soon = datetime.datetime.fromtimestamp(self.clock.now() + 0.5, tz=datetime.UTC)
        self.enqueue("job-1", "resize", {"image": "duck.png"}, priority=3)
        self.enqueue("job-2", "email", {"to": "ops@example.com"}, priority=1)
        self.enqueue("job-3", "email", {"to": "flaky@example.com", "fail_first": True}, delay=1)
        self.enqueue("job-4", "email", {"to": "later@example.com"}, scheduled_at=soon.isoformat())
        self.enqueue("job-5", "resize", {"image": "goose.png"})
        await asyncio.sleep(0)
        self.expected = set(self.records)
        self.record([])

    # -- timer ---------------------------------------------------------------

    async def timer(self) -> None:
        """Sleep until the next deadline or a change; then tick and dispatch."""
        while True:
            deadline = self.core.next_deadline()
            when = None if deadline is None else self.clock.loop_time(deadline)
            try:
                async with asyncio.timeout_at(when):
                    await self.changed.wait()
            except TimeoutError:
                pass
            self.changed.clear()  # no await from here on: nothing is missed
            now = self.clock.now()
            self.record(self.core.tick(now=now))
            for delivery in self.core.dispatch(now=now):
                self.record([delivery.job])
                self.inboxes[delivery.stream_id].put_nowait(delivery.job)

    # -- workers -------------------------------------------------------------

    def attach(self, stream_id: int, name: str) -> None:
        self.inboxes[stream_id] = asyncio.Queue()
        self.core.attach(stream_id, worker_id=name, job_types=JOB_TYPES, prefetch=1)
        self.say(f"{name} attached as stream {stream_id}")

    async def work(self, stream_id: int, name: str) -> None:
        inbox = self.inboxes[stream_id]
        while True:
            job = await inbox.get()
            self.starts.setdefault(job.id, []).append(self.clock.now())
            self.workers.setdefault(job.id, []).append(name)
            self.say(f"{name} runs {job.id} ({job.job_type}, attempt {job.attempt})")
            try:
                await handle(job)
            except Exception as exc:  # noqa: BLE001 - any handler error is a nack
                now = self.clock.now()
                self.failures.setdefault(job.id, []).append(now)
                result = self.core.fail(job.id, lease_id=job.lease_id, error=str(exc), now=now)
            else:
                result = self.core.complete(job.id, lease_id=job.lease_id, now=self.clock.now())
            if isinstance(result, Rejected):  # e.g. the lease expired meanwhile
                self.say(f"{name}: {job.id} outcome refused: {result.message}")
            else:
                self.record([result])
            self.changed.set()

    # -- summary -------------------------------------------------------------

    def summary(self, finished: bool) -> dict[str, Any]:
        stats = self.core.statistics()
        return {
            "ok": finished,
            "elapsed": self.clock.now() - self.started_at,
            "flaky_job": "job-3",
            "delayed_job": "job-4",
            "remaining": stats.queued + stats.scheduled + stats.running + stats.dead,
            "jobs": {
                job_id: {
                    "job_type": job.job_type,
                    "status": job.status.value,
                    "attempts": job.attempt,
                    "retry_count": job.retry_count,
                    "error_message": job.error_message,
                    "due": self.first_due[job_id],
                    "started_at": job.started_at,
                    "completed_at": job.completed_at,
                    "starts": self.starts.get(job_id, []),
                    "failures": self.failures.get(job_id, []),
                    "workers": self.workers.get(job_id, []),
                }
                for job_id, job in sorted(self.records.items())
            },
            "log": self.log,
        }


async def main(*, verbose: bool = True) -> dict[str, Any]:
    """Run the demo; return a summary (``summary["ok"]``: every job finished)."""
    queue = EmbeddedQueue(verbose=verbose)
    workers = {1: "worker-1", 2: "worker-2"}
    finished = False
    async with asyncio.TaskGroup() as tasks:
        for stream_id, name in workers.items():
            queue.attach(stream_id, name)
        running = [tasks.create_task(queue.timer())] + [
            tasks.create_task(queue.work(stream_id, name)) for stream_id, name in workers.items()
        ]
        await queue.produce()
        try:
            async with asyncio.timeout(GIVE_UP_AFTER):
                await queue.all_done.wait()
            finished = True
        except TimeoutError:
            queue.say(f"gave up after {GIVE_UP_AFTER} s")
        finally:
            for task in running:
                task.cancel()
    for stream_id, name in workers.items():
        leftovers = queue.core.detach(stream_id, now=queue.clock.now())
        queue.say(f"{name} detached ({len(leftovers)} jobs requeued)")
    return queue.summary(finished)


if __name__ == "__main__":
    sys.exit(0 if asyncio.run(main())["ok"] else 1)
