"""The asyncio embedding example runs and does what it promises.

The example is product documentation (ARCHITECTURE §2, "Embedding"), so it is
tested: it uses real asyncio and the wall clock, which is fine here -- only
the core must stay free of I/O.
"""

from __future__ import annotations

import asyncio
import importlib.util
import pathlib
import types
from typing import Any

import pytest

from stackduck_core import retry_delay

EXAMPLE = pathlib.Path(__file__).resolve().parents[2] / "examples" / "asyncio_embedded.py"


def load_example() -> types.ModuleType:
    spec = importlib.util.spec_from_file_location("asyncio_embedded", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def summary() -> dict[str, Any]:
    module = load_example()
    result: dict[str, Any] = asyncio.run(module.main(verbose=False))
    return result


def test_every_job_completed(summary: dict[str, Any]) -> None:
    assert summary["ok"] is True
    jobs = summary["jobs"]
    assert len(jobs) == 5
    assert {job["status"] for job in jobs.values()} == {"completed"}
    assert summary["remaining"] == 0
    assert summary["elapsed"] < 3.0


def test_each_job_ran_once_except_the_flaky_one(summary: dict[str, Any]) -> None:
    for job_id, job in summary["jobs"].items():
        expected = 2 if job_id == summary["flaky_job"] else 1
        assert job["attempts"] == expected, job_id
        assert len(job["starts"]) == expected, job_id
        assert job["completed_at"] >= job["started_at"] >= job["due"]


def test_the_flaky_job_retried_once_after_its_backoff(summary: dict[str, Any]) -> None:
    job = summary["jobs"][summary["flaky_job"]]
    assert job["retry_count"] == 1
    assert len(job["failures"]) == 1
    assert job["error_message"] == ""  # success clears the last failure's message
    backoff = retry_delay(1, 0)
    assert backoff == 1
    failed_at = job["failures"][0]
    # the core's record: re-delivered no earlier than failure + backoff
    assert job["started_at"] >= failed_at + backoff
    assert job["starts"][1] >= failed_at + backoff
    # ... and not absurdly later either (the timer woke up at the deadline)
    assert job["starts"][1] < failed_at + backoff + 0.5


def test_the_delayed_job_did_not_start_early(summary: dict[str, Any]) -> None:
    jobs = summary["jobs"]
    delayed = jobs[summary["delayed_job"]]
    first_due = min(job["due"] for job in jobs.values())
    assert delayed["due"] >= first_due + 0.49  # it really was scheduled ahead
    assert delayed["starts"][0] >= delayed["due"]
    assert delayed["started_at"] >= delayed["due"]
    assert delayed["starts"][0] < delayed["due"] + 0.5


def test_both_workers_took_part(summary: dict[str, Any]) -> None:
    names = {name for job in summary["jobs"].values() for name in job["workers"]}
    assert names == {"worker-1", "worker-2"}


def test_log_tells_the_story(summary: dict[str, Any]) -> None:
    log = "\n".join(summary["log"])
    assert "job-4 -> scheduled" in log
    assert "job-3 -> scheduled" in log  # the retry
    assert "attempt 2" in log
    assert log.count("detached (0 jobs requeued)") == 2
