"""ClaimGate: claims that would find nothing are skipped; no wake-up is lost."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from stackduck_core import ClaimGate


def test_a_short_claim_quiets_its_type_until_the_tier_speaks_of_it() -> None:
    gate = ClaimGate()
    assert not gate.quiet("t")  # never claimed: worth a try
    gate.claimed("t", gate.ticket(), short=True)
    assert gate.quiet("t")
    assert not gate.quiet("u")  # other types are not affected
    gate.hear("u")
    assert gate.quiet("t")
    gate.hear("t")
    assert not gate.quiet("t")


def test_a_message_about_every_type_wakes_all() -> None:
    gate = ClaimGate()
    for job_type in ("a", "b"):
        gate.claimed(job_type, gate.ticket(), short=True)
    gate.hear(None)
    assert not gate.quiet("a") and not gate.quiet("b")


def test_a_full_claim_keeps_the_type_loud() -> None:
    gate = ClaimGate()
    gate.claimed("t", gate.ticket(), short=True)
    gate.hear("t")
    gate.claimed("t", gate.ticket(), short=False)
    assert not gate.quiet("t")


def test_a_message_heard_during_the_claim_is_not_lost() -> None:
    gate = ClaimGate()
    ticket = gate.ticket()  # the claim starts...
    gate.hear("t")  # ...a push lands (its message arrives) while it is under way...
    gate.claimed("t", ticket, short=True)  # ...and the claim comes back empty
    assert not gate.quiet("t")  # claimed again: the pushed job is not left behind
    ticket = gate.ticket()
    gate.hear(None)
    gate.claimed("t", ticket, short=True)
    assert not gate.quiet("t")


events = st.lists(
    st.one_of(
        st.tuples(st.just("hear"), st.sampled_from(["a", "b", None])),
        st.tuples(st.just("claim"), st.sampled_from(["a", "b"]), st.booleans()),
    ),
    max_size=30,
)


@given(events)
def test_quiet_only_when_nothing_was_heard_since_a_short_claim_began(
    steps: list[tuple[object, ...]],
) -> None:
    """Model: a type is quiet iff its last claim was short and no message about it
    (or about every type) came since that claim's ticket was taken."""
    gate = ClaimGate()
    clock = 0
    last_heard: dict[str | None, int] = {}
    short_since: dict[str, int | None] = {}
    for step in steps:
        if step[0] == "hear":
            job_type = step[1]
            assert job_type is None or isinstance(job_type, str)
            clock += 1
            last_heard[job_type] = clock
            gate.hear(job_type)
        else:
            job_type, short = str(step[1]), bool(step[2])
            ticket = gate.ticket()
            gate.claimed(job_type, ticket, short=short)
            short_since[job_type] = clock if short else None
        for name in ("a", "b"):
            since = short_since.get(name)
            expected = (
                since is not None and max(last_heard.get(name, 0), last_heard.get(None, 0)) <= since
            )
            assert gate.quiet(name) == expected
