"""The record store's write rules: compare-and-set, and merging a job's chain of records."""

from __future__ import annotations

import attrs

from stackduck_core import Base, Status, merge_chain, writes_over
from tests.core.harness import Harness


def test_a_record_without_base_is_inserted_or_overwrites_an_older_version() -> None:
    job = Harness().enqueue()
    assert writes_over(job, None)
    assert writes_over(attrs.evolve(job, version=2), job)
    assert not writes_over(job, job)  # not newer
    assert not writes_over(job, attrs.evolve(job, version=2))


def test_a_transitions_record_is_compare_and_set_on_status_and_lease() -> None:
    h = Harness()
    queued = h.enqueue()
    running = h.claim()
    assert running.base == Base(Status.QUEUED, None)
    assert writes_over(running, queued)
    assert not writes_over(running, None)  # a purged row is never resurrected
    assert not writes_over(running, attrs.evolve(queued, status=Status.SCHEDULED))
    assert not writes_over(running, attrs.evolve(queued, lease_id="other"))
    assert not writes_over(running, attrs.evolve(queued, version=running.version))
    done = h.core.complete(running.id, lease_id=running.lease_id, now=h.now)
    assert writes_over(done, running)  # type: ignore[arg-type]
    # a stale copy of the same job with the same version but another lease loses
    assert not writes_over(done, attrs.evolve(running, lease_id="newer"))  # type: ignore[arg-type]


def test_merge_chain_writes_the_newest_over_the_first_base() -> None:
    h = Harness()
    h.enqueue(job_id="first")
    running = h.claim()  # the chain starts at queued
    other = h.enqueue(job_id="other")
    done = h.core.complete(running.id, lease_id=running.lease_id, now=h.now)
    assert isinstance(done, type(running))
    merged = merge_chain([running, done])
    assert list(merged) == [running.id]
    assert merged[running.id] == done and merged[running.id].base == running.base
    # equal versions: the later wins; an older one never replaces a newer one
    twin = attrs.evolve(done, error_message="twin")
    assert merge_chain([done, twin])[done.id].error_message == "twin"
    assert merge_chain([done, running])[done.id] == done
    # records of several jobs keep their first-seen order
    assert list(merge_chain([done, other, running])) == [done.id, other.id]
