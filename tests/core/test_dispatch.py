"""Unit and property tests of :class:`Dispatcher` (no I/O, no mocks)."""

from __future__ import annotations

import itertools
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stackduck_core import Dispatcher, DispatcherStats, StreamInfo


def _attach(d: Dispatcher, sid: int, *types: str, prefetch: int = 1) -> None:
    d.attach(sid, worker_id=f"w{sid}", job_types=types, prefetch=prefetch, lease_seconds=30.0)


class _Leases:
    """Delivers a plan: a fresh ``(job_id, lease_id)`` per pair."""

    def __init__(self) -> None:
        self._n = itertools.count(1)
        self.held: dict[int, dict[str, str]] = {}

    def deliver(self, d: Dispatcher, plan: list[tuple[int, str]]) -> None:
        for sid, _ in plan:
            n = next(self._n)
            d.delivered(sid, f"j{n}", f"l{n}")
            self.held.setdefault(sid, {})[f"j{n}"] = f"l{n}"

    def settle_one(self, d: Dispatcher, sid: int) -> None:
        job_id, lease_id = next(iter(self.held[sid].items()))
        del self.held[sid][job_id]
        assert d.settled(job_id, lease_id) == sid


# -- attach ------------------------------------------------------------------------------


def test_attach_rejects_duplicate_id_and_bad_prefetch() -> None:
    d = Dispatcher()
    _attach(d, 1, "t")
    with pytest.raises(ValueError, match="already attached"):
        _attach(d, 1, "u")
    for prefetch in (0, -3):
        with pytest.raises(ValueError, match="prefetch"):
            _attach(d, 2, "t", prefetch=prefetch)
    assert d.statistics() == DispatcherStats(streams=1, in_flight=0, streams_by_type={"t": 1})
    assert d.stream(2) is None
    assert d.wanted_types() == frozenset({"t"})


def test_stream_snapshot() -> None:
    d = Dispatcher()
    d.attach(7, worker_id="w", job_types=["b", "a", "b"], prefetch=3, lease_seconds=12.5)
    assert d.stream(7) == StreamInfo(
        stream_id=7,
        worker_id="w",
        job_types=("b", "a"),
        prefetch=3,
        lease_seconds=12.5,
        in_flight=0,
    )
    d.delivered(7, "j", "l")
    info = d.stream(7)
    assert info is not None and info.in_flight == 1
    assert d.stream(8) is None
    d.detach(7)
    assert d.stream(7) is None


def test_stream_without_job_types_gets_nothing() -> None:
    d = Dispatcher()
    _attach(d, 1)
    assert d.wanted_types() == frozenset()
    assert d.plan({"t": 3}) == []
    assert d.statistics().streams == 1


# -- plan -------------------------------------------------------------------------------------


def test_plan_with_no_types_or_zero_counts() -> None:
    d = Dispatcher()
    assert d.plan({}) == []
    assert d.plan({"t": 5}) == []  # nobody takes t
    _attach(d, 1, "t")
    assert d.plan({}) == []
    assert d.plan({"t": 0}) == []
    assert d.plan({"t": 0, "u": 4}) == []
    assert d.plan({"t": 1}) == [(1, "t")]


def test_plan_never_exceeds_prefetch() -> None:
    d = Dispatcher()
    leases = _Leases()
    _attach(d, 1, "t", prefetch=2)
    plan = d.plan({"t": 10})
    assert plan == [(1, "t"), (1, "t")]
    leases.deliver(d, plan)
    assert d.wanted_types() == frozenset()
    assert d.plan({"t": 10}) == []
    info = d.stream(1)
    assert info is not None and info.in_flight == 2


def test_plan_with_fewer_jobs_than_credit() -> None:
    d = Dispatcher()
    _attach(d, 1, "t", prefetch=5)
    assert d.plan({"t": 2}) == [(1, "t"), (1, "t")]


def test_shared_credit_across_types() -> None:
    d = Dispatcher()
    _attach(d, 1, "a", "b", prefetch=3)
    assert d.plan({"a": 10, "b": 10}) == [(1, "a"), (1, "b"), (1, "a")]


def test_one_credit_shared_by_two_types_serves_one_job() -> None:
    d = Dispatcher()
    _attach(d, 1, "a", "b", prefetch=1)
    assert len(d.plan({"a": 5, "b": 5})) == 1


def test_round_robin_across_streams() -> None:
    d = Dispatcher()
    for sid in (1, 2, 3):
        _attach(d, sid, "t", prefetch=100)
    assert [sid for sid, _ in d.plan({"t": 7})] == [1, 2, 3, 1, 2, 3, 1]
    # the ring keeps turning across plans
    assert [sid for sid, _ in d.plan({"t": 2})] == [2, 3]


def test_round_robin_skips_a_stream_out_of_credit_within_a_plan() -> None:
    d = Dispatcher()
    _attach(d, 1, "t", prefetch=1)
    _attach(d, 2, "t", prefetch=3)
    assert [sid for sid, _ in d.plan({"t": 10})] == [1, 2, 2, 2]


@settings(max_examples=200, deadline=None)
@given(
    k=st.integers(1, 6),
    batches=st.lists(st.integers(0, 12), max_size=8),
)
def test_round_robin_is_fair(k: int, batches: list[int]) -> None:
    """N jobs over k streams with room: counts differ by at most 1, plan after plan."""
    d = Dispatcher()
    leases = _Leases()
    for sid in range(k):
        _attach(d, sid, "t", prefetch=1000)
    counts: Counter[int] = Counter()
    for n in batches:
        plan = d.plan({"t": n})
        assert len(plan) == n
        leases.deliver(d, plan)
        counts.update(sid for sid, _ in plan)
        per_stream = [counts[sid] for sid in range(k)]
        assert max(per_stream) - min(per_stream) <= 1


def test_small_type_is_not_starved_by_a_backlog() -> None:
    d = Dispatcher()
    _attach(d, 1, "big", "small", prefetch=2)
    plan = d.plan({"big": 1_000_000, "small": 1})
    assert sorted(plan) == [(1, "big"), (1, "small")]


def test_small_type_first_on_its_turn() -> None:
    """Two streams sharing types: the lone job goes out in the first plan."""
    d = Dispatcher()
    _attach(d, 1, "big", "small", prefetch=1)
    _attach(d, 2, "big", "small", prefetch=1)
    plan = d.plan({"big": 1_000_000, "small": 1})
    assert len(plan) == 2 and (plan[0][1], plan[1][1]) in {("big", "small"), ("small", "big")}


@settings(max_examples=100, deadline=None)
@given(n_types=st.integers(1, 5), rounds=st.integers(1, 4))
def test_type_turns_rotate_with_a_single_credit(n_types: int, rounds: int) -> None:
    """With one credit, every type with a backlog is served once per ``n_types`` plans."""
    d = Dispatcher()
    leases = _Leases()
    types = [f"type{i}" for i in range(n_types)]
    _attach(d, 1, *types, prefetch=1)
    ready = dict.fromkeys(types, 10**6)
    for _ in range(rounds):
        served = []
        for _ in range(n_types):
            plan = d.plan(ready)
            assert len(plan) == 1
            served.append(plan[0][1])
            leases.deliver(d, plan)
            leases.settle_one(d, 1)
        assert sorted(served) == types


@settings(max_examples=100, deadline=None)
@given(
    n_types=st.integers(1, 6),
    backlog=st.integers(1, 10**6),
)
def test_every_ready_type_is_served_when_credit_allows(n_types: int, backlog: int) -> None:
    d = Dispatcher()
    types = [f"type{i}" for i in range(n_types)]
    _attach(d, 1, *types, prefetch=n_types)
    ready = {t: 1 for t in types} | {types[0]: backlog}
    assert sorted(t for _, t in d.plan(ready)) == sorted(types)


# -- delivered / settled ---------------------------------------------------------------------------


def test_settled_frees_credit_and_rejoins_the_rings_at_the_back() -> None:
    d = Dispatcher()
    _attach(d, 1, "t", prefetch=1)
    _attach(d, 2, "t", prefetch=1)
    _attach(d, 3, "t", prefetch=2)
    assert d.plan({"t": 4}) == [(1, "t"), (2, "t"), (3, "t"), (3, "t")]
    d.delivered(1, "j1", "l1")
    d.delivered(2, "j2", "l2")
    d.delivered(3, "j3", "l3")
    d.delivered(3, "j4", "l4")
    assert d.wanted_types() == frozenset()
    assert d.statistics().in_flight == 4
    assert d.settled("j2", "l2") == 2
    assert d.settled("j1", "l1") == 1
    assert d.plan({"t": 5}) == [(2, "t"), (1, "t")]
    assert d.settled("j3", "l3") == 3
    assert d.plan({"t": 5}) == [(2, "t"), (1, "t"), (3, "t")]
    # a stream that still had credit stays where it was
    assert d.settled("j4", "l4") == 3
    assert d.plan({"t": 1}) == [(2, "t")]


def test_settled_of_unknown_or_repeated_lease_returns_none() -> None:
    d = Dispatcher()
    _attach(d, 1, "t")
    d.delivered(1, "j", "l")
    assert d.settled("j", "other") is None
    assert d.settled("j", "l") == 1
    assert d.settled("j", "l") is None
    assert d.stream(1) == StreamInfo(
        stream_id=1, worker_id="w1", job_types=("t",), prefetch=1, lease_seconds=30.0, in_flight=0
    )


def test_delivered_below_prefetch_keeps_the_stream_in_the_ring() -> None:
    d = Dispatcher()
    _attach(d, 1, "t", prefetch=2)
    d.delivered(1, "j1", "l1")
    assert d.wanted_types() == frozenset({"t"})
    assert d.plan({"t": 5}) == [(1, "t")]


# -- detach ---------------------------------------------------------------------------------------


def test_detach_returns_held_leases_and_is_idempotent() -> None:
    d = Dispatcher()
    _attach(d, 1, "t", "u", prefetch=2)
    _attach(d, 2, "t", prefetch=2)
    d.delivered(1, "j1", "l1")
    d.delivered(1, "j2", "l2")
    d.delivered(2, "j3", "l3")
    assert d.detach(1) == {"j1": "l1", "j2": "l2"}
    assert d.detach(1) == {}
    assert d.detach(42) == {}
    # the detached stream's leases are no longer routed to it
    assert d.settled("j1", "l1") is None
    assert d.statistics() == DispatcherStats(streams=1, in_flight=1, streams_by_type={"t": 1})
    assert d.wanted_types() == frozenset({"t"})
    assert d.plan({"t": 5, "u": 5}) == [(2, "t")]
    assert d.settled("j3", "l3") == 2


def test_detach_of_a_stream_out_of_credit() -> None:
    d = Dispatcher()
    _attach(d, 1, "t", prefetch=1)
    _attach(d, 2, "t", prefetch=1)
    d.delivered(1, "j1", "l1")
    assert d.detach(1) == {"j1": "l1"}  # stream 1 had left the ring already
    assert d.plan({"t": 3}) == [(2, "t")]
    d.delivered(2, "j2", "l2")
    assert d.detach(2) == {"j2": "l2"}  # ... and now nobody is in the ring
    assert d.wanted_types() == frozenset()
    assert d.statistics() == DispatcherStats(streams=0, in_flight=0, streams_by_type={})


def test_detach_last_stream_with_credit_removes_the_type() -> None:
    d = Dispatcher()
    _attach(d, 1, "t", "u", prefetch=1)
    _attach(d, 2, "u", prefetch=1)
    d.detach(1)
    assert d.wanted_types() == frozenset({"u"})
    assert d.plan({"t": 1, "u": 1}) == [(2, "u")]


def test_statistics() -> None:
    d = Dispatcher()
    assert d.statistics() == DispatcherStats(streams=0, in_flight=0, streams_by_type={})
    _attach(d, 1, "b", "a", prefetch=2)
    _attach(d, 2, "a", prefetch=2)
    d.delivered(1, "j1", "l1")
    stats = d.statistics()
    assert stats == DispatcherStats(streams=2, in_flight=1, streams_by_type={"a": 2, "b": 1})
    assert list(stats.streams_by_type) == ["a", "b"]


# -- a model-checked random walk ---------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_random_walk_respects_credit_and_is_work_conserving(data: st.DataObject) -> None:
    d = Dispatcher()
    leases = _Leases()
    types = ["a", "b", "c"]
    prefetch: dict[int, int] = {}
    subscribed: dict[int, tuple[str, ...]] = {}
    next_sid = itertools.count(1)
    for _ in range(data.draw(st.integers(1, 30), label="steps")):
        action = data.draw(st.sampled_from(["attach", "detach", "plan", "settle"]))
        if action == "attach":
            sid = next(next_sid)
            prefetch[sid] = data.draw(st.integers(1, 3))
            subscribed[sid] = tuple(data.draw(st.lists(st.sampled_from(types), max_size=3)))
            _attach(d, sid, *subscribed[sid], prefetch=prefetch[sid])
        elif action == "detach" and prefetch:
            sid = data.draw(st.sampled_from(sorted(prefetch)))
            assert d.detach(sid) == leases.held.pop(sid, {})
            del prefetch[sid], subscribed[sid]
        elif action == "settle" and any(leases.held.values()):
            sid = data.draw(st.sampled_from(sorted(s for s, h in leases.held.items() if h)))
            leases.settle_one(d, sid)
        else:
            ready = {t: data.draw(st.integers(0, 4)) for t in types}
            plan = d.plan(ready)
            per_type = Counter(t for _, t in plan)
            assert all(per_type[t] <= ready[t] for t in types)
            for sid, job_type in plan:
                assert job_type in subscribed[sid]
            leases.deliver(d, plan)
            # work-conserving: a type with jobs left has no subscriber with credit
            for t in types:
                if per_type[t] < ready[t]:
                    for sid, taken in subscribed.items():
                        if t in taken:
                            assert len(leases.held.get(sid, {})) == prefetch[sid]
        for sid, limit in prefetch.items():
            info = d.stream(sid)
            assert info is not None
            assert info.in_flight == len(leases.held.get(sid, {})) <= limit
        wanted = {
            t
            for sid, ts in subscribed.items()
            for t in ts
            if len(leases.held.get(sid, {})) < prefetch[sid]
        }
        assert d.wanted_types() == wanted
        assert d.statistics().in_flight == sum(len(h) for h in leases.held.values())
