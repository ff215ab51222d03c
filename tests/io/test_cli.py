"""The client subcommands of ``stackduck-trio``, run as subprocesses against a server process.

One server (with a bearer token) serves the whole module; every CLI run has a timeout. State
is checked with the official grpcio client, which is quick to poll from a plain test.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator

import grpc
import pytest

from stackduck_trio._proto import stackduck_pb2 as pb
from stackduck_trio._proto import stackduck_pb2_grpc
from stackduck_trio.testing import ServerProcess

TOKEN = "cli-t0ken"
REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with ServerProcess(
        tmp_path_factory.mktemp("cli-server"),
        "--heartbeat-interval",
        "0.2",
        "--grace-period",
        "1",
        env={"STACKDUCK_TOKENS": TOKEN},
    ) as process:
        yield process


@pytest.fixture(scope="module")
def stub(server: ServerProcess) -> Iterator[stackduck_pb2_grpc.StackDuckServiceStub]:
    channel = grpc.insecure_channel(server.address, options=[("grpc.enable_http_proxy", 0)])
    with channel:
        yield stackduck_pb2_grpc.StackDuckServiceStub(channel)


def env_for(server: ServerProcess, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STACKDUCK_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env.update({"STACKDUCK_SERVER": server.address, "STACKDUCK_TOKEN": TOKEN, **extra})
    return env


def cli(
    server: ServerProcess,
    *args: str,
    env: dict[str, str] | None = None,
    cwd: pathlib.Path | None = None,
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "stackduck_trio", *args],
        capture_output=True,
        text=True,
        timeout=30,
        env=env or env_for(server),
        cwd=cwd or REPO_ROOT,
    )


def get_job(stub: stackduck_pb2_grpc.StackDuckServiceStub, job_id: str) -> pb.GrpcJob:
    return stub.GetJob(
        pb.GetJobRequest(job_id=job_id), metadata=[("authorization", f"Bearer {TOKEN}")], timeout=5
    ).job


def test_enqueue_job_and_stats(server: ServerProcess) -> None:
    done = cli(server, "enqueue", "email", '{"to": "ada@example.com"}', "--priority", "1")
    assert done.returncode == 0, done.stderr
    job_id = done.stdout.strip()
    assert len(job_id) == 36

    shown = cli(server, "job", job_id)
    assert shown.returncode == 0, shown.stderr
    lines = dict(line.split(None, 1) for line in shown.stdout.splitlines())
    assert lines["status"] == "queued" and lines["priority"] == "1"
    assert lines["payload"] == '{"to": "ada@example.com"}'
    assert lines["started_at"] == "-"

    as_json = json.loads(cli(server, "job", job_id, "--json").stdout)
    assert as_json["id"] == job_id and as_json["payload"] == '{"to": "ada@example.com"}'

    table = cli(server, "stats")
    assert table.returncode == 0, table.stderr
    header, row = table.stdout.splitlines()[:2]
    assert header.split()[:4] == ["TYPE", "P1", "P2", "P3"]
    assert row.split()[0] == "email" and row.split()[1] == "1"
    # Columns are aligned: every value ends where its header ends (numbers right-aligned).
    assert header.index("P1") + 2 == row.index(row.split()[1]) + len(row.split()[1])
    assert "record_store: sqlite (healthy)" in table.stdout
    stats = json.loads(cli(server, "stats", "--json").stdout)
    assert any(t["job_type"] == "email" and t["queued_p1"] >= 1 for t in stats["types"])


def test_enqueue_options(
    server: ServerProcess, stub: stackduck_pb2_grpc.StackDuckServiceStub
) -> None:
    later = str(int(time.time()) + 3600)
    done = cli(
        server, "enqueue", "report", "--delay", "5", "--max-retries", "0", "--at", later, "--json"
    )
    assert done.returncode == 0, done.stderr
    job = get_job(stub, json.loads(done.stdout)["job_id"])
    assert (job.status, job.delay, job.max_retries, job.scheduled_at) == (
        "scheduled",
        5,
        0,
        int(later),
    )


def test_errors_and_usage(server: ServerProcess) -> None:
    missing = cli(server, "job", "no-such-job")
    assert missing.returncode == 1
    assert missing.stderr.strip() == "error: NOT_FOUND: no job with id no-such-job"
    invalid = cli(server, "enqueue", "email", "{not json")
    assert invalid.returncode == 1
    assert invalid.stderr.startswith("error: INVALID_ARGUMENT: payload is not valid JSON")
    anonymous = cli(server, "stats", env=env_for(server, STACKDUCK_TOKEN=""))
    assert anonymous.returncode == 1
    assert anonymous.stderr.startswith("error: UNAUTHENTICATED:")
    assert (
        cli(server, "stats", "--token", TOKEN, env=env_for(server, STACKDUCK_TOKEN="")).returncode
        == 0
    )
    assert cli(server, "dlq", "requeue").returncode == 2  # neither ids nor --type
    assert cli(server, "stats", "--server", "nohost").returncode == 2
    down = cli(server, "stats", "--server", "127.0.0.1:1", "--timeout", "2")
    assert down.returncode == 1 and down.stderr.startswith("error: UNAVAILABLE:")


def test_pause_resume_cancel(
    server: ServerProcess, stub: stackduck_pb2_grpc.StackDuckServiceStub
) -> None:
    assert cli(server, "pause", "thumbs").stdout.strip() == "paused thumbs"
    stats = json.loads(cli(server, "stats", "--json").stdout)
    assert any(t["job_type"] == "thumbs" and t["paused"] for t in stats["types"])
    assert cli(server, "resume", "thumbs").stdout.strip() == "resumed thumbs"
    stats = json.loads(cli(server, "stats", "--json").stdout)
    assert not any(t["job_type"] == "thumbs" and t["paused"] for t in stats["types"])

    job_id = cli(server, "enqueue", "thumbs").stdout.strip()
    assert cli(server, "cancel", job_id).stdout.strip() == f"cancelled {job_id}"
    assert get_job(stub, job_id).status == "cancelled"
    again = cli(server, "cancel", job_id)
    assert again.returncode == 1 and again.stderr.startswith("error: FAILED_PRECONDITION:")


def test_limit_command(server: ServerProcess) -> None:
    out = cli(server, "limit", "mail", "--rate", "2.5", "--burst", "5", "--max-running", "3")
    assert out.stdout.strip() == "limits of mail: 2.5/s burst 5, max 3 running"
    stats = json.loads(cli(server, "stats", "--json").stdout)
    mail = next(t for t in stats["types"] if t["job_type"] == "mail")
    assert (mail["rate_limit"], mail["rate_burst"], mail["max_running"]) == (2.5, 5, 3)
    assert "2.5/s burst 5, max 3 running" in cli(server, "stats").stdout
    as_json = json.loads(cli(server, "limit", "mail", "--max-running", "1", "--json").stdout)
    assert as_json == {"job_type": "mail", "rate": 0.0, "burst": 0, "max_running": 1}
    assert cli(server, "limit", "mail", "--clear").stdout.strip() == "limits of mail: none"
    bad = cli(server, "limit", "mail", "--rate", "-1")
    assert bad.returncode == 1 and bad.stderr.startswith("error: INVALID_ARGUMENT: rate must be")
    assert cli(server, "limit", "mail").returncode == 2  # nothing to set
    assert cli(server, "limit", "mail", "--clear", "--rate", "1").returncode == 2


HANDLERS_MODULE = """
import json, pathlib

OUT = pathlib.Path(__file__).with_name("done.txt")

async def greet(job):
    with OUT.open("a") as f:
        f.write(json.dumps(job.data) + "\\n")

def explode(job):  # a plain function: runs in a thread
    raise RuntimeError(f"exploded {job.data['n']}")

HANDLERS = {"cli-greet": greet, "cli-explode": explode}
"""


def wait_status(stub: stackduck_pb2_grpc.StackDuckServiceStub, job_id: str, status: str) -> None:
    deadline = time.monotonic() + 10
    while get_job(stub, job_id).status != status:
        assert time.monotonic() < deadline, f"job {job_id} never became {status}"
        time.sleep(0.05)


def test_worker_and_dead_letter_queue(
    server: ServerProcess, stub: stackduck_pb2_grpc.StackDuckServiceStub, tmp_path: pathlib.Path
) -> None:
    (tmp_path / "clijobs.py").write_text(textwrap.dedent(HANDLERS_MODULE))
    greet = cli(server, "enqueue", "cli-greet", '{"name": "ada"}').stdout.strip()
    boom = [
        cli(
            server, "enqueue", "cli-explode", json.dumps({"n": n}), "--max-retries", "0"
        ).stdout.strip()
        for n in range(3)
    ]
    worker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "stackduck_trio",
            "worker",
            "clijobs:HANDLERS",
            "--concurrency",
            "2",
        ],
        cwd=tmp_path,
        env=env_for(server),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_status(stub, greet, "completed")
        for job_id in boom:
            wait_status(stub, job_id, "failed")
    finally:
        worker.send_signal(signal.SIGINT)  # graceful stop
        _, err = worker.communicate(timeout=15)
    assert worker.returncode == 0, err
    assert "worker stopped: 1 processed, 3 failed" in err
    assert json.loads((tmp_path / "done.txt").read_text()) == {"name": "ada"}

    listing = cli(server, "dlq", "list", "--type", "cli-explode")
    assert listing.returncode == 0, listing.stderr
    lines = listing.stdout.splitlines()
    assert lines[0].split() == ["ID", "TYPE", "RETRIES", "DEAD", "SINCE", "ERROR"]
    assert {line.split()[0] for line in lines[1:]} == set(boom)
    assert "RuntimeError: exploded" in listing.stdout
    dead = json.loads(cli(server, "dlq", "list", "--json", "--type", "cli-explode").stdout)
    assert sorted(d["id"] for d in dead) == sorted(boom)
    assert all(d["status"] == "failed" and d["attempt"] == 1 for d in dead)
    assert len(json.loads(cli(server, "dlq", "list", "--json", "--limit", "1").stdout)) == 1

    requeued = cli(server, "dlq", "requeue", boom[0], "no-such-id")
    assert requeued.returncode == 1  # one id failed
    assert requeued.stdout.strip() == "requeued 1 job"
    assert "error: NOT_FOUND:" in requeued.stderr
    assert get_job(stub, boom[0]).status == "queued"

    purged = cli(server, "dlq", "purge", "--type", "cli-explode", "--json")
    assert purged.returncode == 0, purged.stderr
    assert json.loads(purged.stdout)["count"] == 2
    assert (
        "the dead-letter queue is empty"
        in cli(server, "dlq", "list", "--type", "cli-explode").stdout
    )


def test_worker_rejects_bad_handler_spec(server: ServerProcess, tmp_path: pathlib.Path) -> None:
    (tmp_path / "notadict.py").write_text("HANDLERS = [1, 2]\n")
    bad = cli(server, "worker", "notadict", cwd=tmp_path)
    assert bad.returncode == 2 and "must be a non-empty dict" in bad.stderr
    missing = cli(server, "worker", "no_such_module:HANDLERS", cwd=tmp_path)
    assert missing.returncode == 2 and "cannot import" in missing.stderr


def test_serve_leaves_its_start_up_objects_out_of_garbage_collections(
    server: ServerProcess,
) -> None:
    # gc.freeze() once ready: full collections no longer scan the objects of the
    # modules and the server's start (pauses of up to 80 ms with 1,000 streams).
    found = re.search(
        r"(\d+) objects alive at start left out of garbage collections",
        server.log_path.read_text(),
    )
    assert found is not None and int(found.group(1)) > 10_000, found
