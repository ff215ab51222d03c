"""PostgreSQL restarted under load in a cluster, in both durability modes.

Two ``stackduck-trio serve`` processes share a PRIVATE PostgreSQL (``initdb`` + ``pg_ctl``
on a free port: tests/io/test_postgres_server.py) and a PRIVATE ``redis-server``; grpcio
producers enqueue one job per call into both and grpcio workers on both run the jobs,
while PostgreSQL is crashed (``pg_ctl stop -m immediate``) and started again 5 s later.

* ``strict``: enqueues during the outage are refused with UNAVAILABLE (and only then);
  jobs already queued keep being delivered; acks wait for the store;
* ``buffered``: enqueues during the outage are accepted (into Redis and the instance's
  outbox), delivered, and written in order once PostgreSQL is back.

Either way every acknowledged enqueue ends ``completed`` in the store, no job is held
under two live leases at once and no completion is accepted twice
(:func:`tests.io.test_multi_instance.check_executions`). Numbers are printed (``-s``).
"""

from __future__ import annotations

import contextlib
import pathlib
import time
import uuid
from collections import Counter
from collections.abc import Iterator

import pytest

from .e2e_helpers import new_type, wait_until
from .private_servers import PrivateRedis

# registers the fixtures in this module
from .private_servers import private_redis_fixture as private_redis_fixture
from .test_backends import admin_connection
from .test_multi_instance import Cluster, check_executions, enqueue_notes, steady_load
from .test_postgres_server import PrivatePostgres, server_process
from .test_postgres_server import private_postgres as private_postgres

pytestmark = pytest.mark.slow


@contextlib.contextmanager
def pg_cluster(
    tmp_path: pathlib.Path, pg: PrivatePostgres, redis: PrivateRedis, *args: str
) -> Iterator[Cluster]:
    prefix = f"sdtest{uuid.uuid4().hex[:10]}"
    env = {"DATABASE_URL": pg.url, "REDIS_URL": redis.url, "STACKDUCK_REDIS_PREFIX": prefix}
    with contextlib.ExitStack() as stack:
        servers = {
            name: stack.enter_context(server_process(tmp_path / name, *args, env=env))
            for name in ("A", "B")
        }
        for server in servers.values():
            server.start(timeout=30)
        admin = stack.enter_context(admin_connection(pg.url))
        yield Cluster("stackduck", prefix, redis, servers, admin)


@pytest.mark.parametrize("durability", ["strict", "buffered"])
def test_postgres_restart_under_load_loses_no_acknowledged_job(
    durability: str,
    private_postgres: PrivatePostgres,
    private_redis: PrivateRedis,
    tmp_path: pathlib.Path,
) -> None:
    pg = private_postgres
    args = ("--durability", durability, "--lease-seconds", "10", "--write-timeout", "2")
    with pg_cluster(tmp_path, pg, private_redis, *args) as cluster:
        job_type = new_type(f"pgdown{durability}")
        # the admin connection reopened after the restart lives until the end
        stack = contextlib.ExitStack()
        try:
            with steady_load(cluster, job_type) as load:
                log, producers, poller = load.log, load.producers, load.poller
                # Admin connections die with the server: reopen after the restart.
                cluster.admin.close()
                down = time.monotonic()
                pg.stop("immediate")
                time.sleep(5.0)
                pg.start()
                up = time.monotonic()
                cluster.admin = stack.enter_context(admin_connection(pg.url))
                after = len(log.snapshot())
                wait_until(lambda: len(log.snapshot()) > after + 100, within=30)  # work goes on
                for producer in producers:
                    producer.stop()
                acked = [job_id for p in producers for job_id in p.ids]
                done = cluster.wait_completed(acked, within=60)

            report = check_executions(log)
            refused = Counter(why for p in producers for _, why in p.errors)
            during = sum(1 for p in producers for t, _ in p.acked if down <= t <= up)
            store_states = {
                name: [s.record_store for s in poller.of(name) if s.t >= down]
                for name in ("A", "B")
            }
            seen_down = {
                name: any(v != "healthy" for v in states) for name, states in store_states.items()
            }
            acks = Counter(e.ack for e in log.snapshot())
            print(
                f"\nPostgreSQL crashed under load for {up - down:.2f} s (durability={durability}): "
                f"{len(acked)} enqueues acknowledged, {during} of them during the outage; "
                f"refused {dict(refused)}; all completed {done - up:.2f} s after PostgreSQL was "
                f"back\n  delivered twice: {report.delivered_twice} jobs; acks {dict(acks)}; "
                f"store seen unhealthy in GetStats: {seen_down}"
            )
            assert set(cluster.statuses(acked).values()) == {"completed"}
            assert any(seen_down.values()), "GetStats never showed the record store unhealthy"
            if durability == "strict":
                assert set(refused) <= {"UNAVAILABLE", "DEADLINE_EXCEEDED"}, refused
                assert refused.get("UNAVAILABLE"), (
                    "strict: no enqueue was refused while PostgreSQL was down"
                )
            else:
                assert during > 0, "buffered: no enqueue was accepted while PostgreSQL was down"
                assert set(refused) <= {"DEADLINE_EXCEEDED"}, refused
            print(
                f"  {len(report.overlaps)} jobs held under two leases at once, "
                f"{len(report.after_completion)} deliveries of already completed jobs"
            )
            if durability == "strict":
                report.assert_clean(down, "the PostgreSQL crash", enqueue_notes(producers, down))
            else:
                # Jobs accepted while the store was down reached Redis before their rows
                # existed: an instance that delivered one saw its writes refused and let go
                # of it, and it was delivered again later (at-least-once, reported above).
                # Fencing holds: no completion is accepted twice.
                report.assert_fenced(down, "the PostgreSQL crash", enqueue_notes(producers, down))
            cluster.finish("A", "B")
        finally:
            stack.close()
