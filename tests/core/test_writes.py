"""The record store's write rules: compare-and-set, and merging a job's chain of records."""

from __future__ import annotations

import attrs
from hypothesis import given
from hypothesis import strategies as st

from stackduck_core import Base, Status, merge_chain, plan_commit, writes_over
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


# -- plan_commit: which pending writes the next commit takes ------------------------------------

INF = float("inf")


@attrs.frozen
class W:
    ids: frozenset[str]
    due: float = -INF


def w(*ids: str, due: float = -INF) -> W:
    return W(frozenset(ids), due)


def test_plan_takes_due_writes_in_order_up_to_the_cap() -> None:
    pending = [w("a"), w("b"), w("c")]
    assert plan_commit(pending, now=0, max_writes=10) == ([0, 1, 2], None)
    assert plan_commit(pending, now=0, max_writes=2) == ([0, 1], None)
    assert plan_commit([], now=0, max_writes=10) == ([], None)


def test_a_deferred_write_waits_for_its_time() -> None:
    pending = [w("a", due=5.0), w("b", due=3.0)]
    assert plan_commit(pending, now=0, max_writes=10) == ([], 3.0)
    assert plan_commit(pending, now=3.0, max_writes=10) == ([1], None)
    assert plan_commit(pending, now=5.0, max_writes=10) == ([0, 1], None)
    assert plan_commit(pending, now=0, max_writes=10, flush=True) == ([0, 1], None)


def test_a_deferred_write_goes_along_with_a_later_write_of_its_job() -> None:
    # the delivery of a (deferred), then of b (deferred), then a's completion
    pending = [w("x"), w("a", due=9.0), w("b", due=9.0), w("a")]
    assert plan_commit(pending, now=0, max_writes=10) == ([0, 1, 3], None)
    # transitively: a's delivery shares a round with c, whose earlier record waits too
    pending = [w("c", due=9.0), w("a", "c", due=9.0), w("a")]
    assert plan_commit(pending, now=0, max_writes=10) == ([0, 1, 2], None)
    # a deferred write *after* the one that goes stays
    pending = [w("a"), w("a", due=9.0)]
    assert plan_commit(pending, now=0, max_writes=10) == ([0], None)


def test_the_cap_counts_due_writes_and_a_write_beyond_it_pulls_nothing() -> None:
    pending = [w("a", due=9.0), w("b"), w("a")]
    assert plan_commit(pending, now=0, max_writes=1) == ([1], None)
    assert plan_commit(pending, now=0, max_writes=2) == ([0, 1, 2], None)


@st.composite
def pendings(draw: st.DrawFn) -> list[W]:
    jobs = st.frozensets(st.sampled_from("abcdef"), min_size=1, max_size=3)
    due = st.one_of(st.just(-INF), st.integers(0, 10).map(float))
    return draw(st.lists(st.builds(W, jobs, due), max_size=12))


@given(pendings(), st.integers(0, 10).map(float), st.integers(1, 6), st.booleans())
def test_plan_commit_properties(pending: list[W], now: float, cap: int, flush: bool) -> None:
    taken, when = plan_commit(pending, now=now, max_writes=cap, flush=flush)
    assert taken == sorted(set(taken))
    due = [i for i, x in enumerate(pending) if flush or x.due <= now]
    if not due:
        assert taken == []
        assert when == min((x.due for x in pending), default=None)
        return
    assert when is None
    # the due writes go first come first, up to the cap
    assert [i for i in taken if i in due] == due[:cap]
    for i in taken:
        if i not in due:  # a write not due yet goes only with a later write of one of its jobs
            assert any(j > i and pending[j].ids & pending[i].ids for j in taken)
    # of every job, the writes that go are its oldest ones (a chain never skips a link)
    for job in "abcdef":
        mine = [i for i, x in enumerate(pending) if job in x.ids]
        went = [i for i in mine if i in taken]
        assert went == mine[: len(went)]
