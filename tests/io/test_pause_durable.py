"""End to end: PauseJobType and ResumeJobType survive a SIGKILL of the server.

A pause is written to the record store before it is answered, and the server re-applies the
stored pauses before it accepts calls; a resume is just as durable.
"""

from __future__ import annotations

import pathlib
from collections.abc import Iterator

import pytest

from stackduck_trio.testing import ServerProcess

from .e2e_helpers import check_log_clean, new_type, open_client, pb

pytestmark = pytest.mark.slow


@pytest.fixture
def server(tmp_path: pathlib.Path) -> Iterator[ServerProcess]:
    process = ServerProcess(tmp_path / "data", "--heartbeat-interval", "0.2", "--grace-period", "1")
    process.start()
    try:
        yield process
    finally:
        process.kill()


def test_pause_survives_sigkill_and_resume_delivers(server: ServerProcess) -> None:
    job_type = new_type()
    with open_client(server.address) as client:
        assert client.PauseJobType(pb.PauseJobTypeRequest(job_type=job_type)).paused
        job_id = client.enqueue(job_type)
    server.kill()  # SIGKILL: no drain, no flush

    server.start()  # same data dir, same port
    with open_client(server.address) as client:
        with client.stream([job_type], prefetch=10) as worker:
            worker.wait_attached()
            worker.no_job_within(1.0)
            stats = client.type_stats(job_type)
            assert stats is not None
            assert (stats.paused, stats.queued_p2, stats.running, stats.workers) == (True, 1, 0, 1)

            assert not client.ResumeJobType(pb.ResumeJobTypeRequest(job_type=job_type)).paused
            job = worker.next_job(within=2.0)
            assert job.id == job_id
            stats = client.type_stats(job_type)
            assert stats is not None and (stats.paused, stats.running) == (False, 1)
    server.kill()

    # The resume is durable too: after another SIGKILL the (requeued) job is delivered at once.
    server.start()
    with open_client(server.address) as client:
        with client.stream([job_type], prefetch=10) as worker:
            job = worker.next_job(within=5.0)
            assert job.id == job_id
            client.complete(job)
            stats = client.type_stats(job_type)
            assert stats is not None and not stats.paused
    assert server.terminate() == 0
    check_log_clean(server.log_path)
