"""Fuzzing the transport ladder: any sequence of inputs, with time only moving
forward, keeps its invariants: changes only to enabled rungs and never two
within HOLD seconds, probes only on enabled rungs, the probe interval within
[BETTER_PROBE, MAX_PROBE_INTERVAL], status naming only better rungs, and no
exceptions.

Times are drawn as offsets (a step forward, or how long ago something
happened), never as bounds that depend on the clock."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from tunnelmesh.ladder import BETTER_PROBE, HOLD, MAX_PROBE_INTERVAL, RUNGS, Ladder, Probe, Switch

FUZZ = settings(max_examples=500, deadline=None)

rung_names = st.sampled_from(RUNGS + ("tcp",))  # an unknown name now and then
steps = st.floats(min_value=0.0, max_value=40.0, allow_nan=False)
ages = st.floats(min_value=0.0, max_value=30.0, allow_nan=False)

inputs = st.one_of(
    st.tuples(st.just("start")),
    st.tuples(st.just("handshake"), rung_names),
    st.tuples(st.just("unavailable"), rung_names),
    st.tuples(st.just("tick"), st.none() | ages, st.none() | ages, st.none() | st.tuples(rung_names, ages)),
)


def feed(ladder: Ladder, event: tuple, now: float) -> list:
    match event:
        case ("start",):
            return ladder.start(now)
        case ("handshake", rung):
            return ladder.handshake(rung, now)
        case ("unavailable", rung):
            return ladder.unavailable(rung, "link down", now)
        case ("tick", unanswered, rx, stray):
            return ladder.tick(
                now,
                unanswered_since=None if unanswered is None else now - unanswered,
                received_on_current=None if rx is None else now - rx,
                stray=None if stray is None else (stray[0], now - stray[1]),
            )
    raise AssertionError(event)


@FUZZ
@given(
    enabled=st.sets(st.sampled_from(RUNGS), min_size=1),
    script=st.lists(st.tuples(steps, inputs), max_size=80),
)
def test_ladder_invariants_hold_for_any_inputs(enabled: set[str], script: list) -> None:
    ladder = Ladder(tuple(enabled))
    now = 0.0
    last_change: float | None = None
    changes = 0
    for step, event in script:
        now += step
        before = ladder.current
        actions = feed(ladder, event, now)
        switches = [a for a in actions if isinstance(a, Switch)]
        assert len(switches) <= 1 and all(isinstance(a, Probe | Switch) for a in actions)
        for switch in switches:
            assert switch.rung in enabled and switch.rung != before and switch.previous == before
            if before is not None:
                assert last_change is None or now - last_change >= HOLD, (last_change, now)
                last_change = now
                changes += 1
        for probe in (a for a in actions if isinstance(a, Probe)):
            assert probe.rungs and set(probe.rungs) <= enabled
            assert len(set(probe.rungs)) == len(probe.rungs)
        assert ladder.current is None or ladder.current in enabled
        assert BETTER_PROBE <= ladder.probe_interval <= MAX_PROBE_INTERVAL
        why = ladder.why_not_better(now)
        limit = RUNGS.index(ladder.current) if ladder.current is not None else len(RUNGS)
        assert [rung for rung, _, _ in why] == [r for r in RUNGS[:limit] if r in {r for r, _, _ in why}]
        assert {r for r in RUNGS[:limit] if r not in enabled} <= {r for r, _, _ in why}
    assert ladder.changes == changes


@FUZZ
@given(
    enabled=st.sets(st.sampled_from(RUNGS), min_size=1),
    script=st.lists(st.tuples(steps, inputs), max_size=60),
    later=st.lists(st.floats(min_value=0.0, max_value=400.0, allow_nan=False), min_size=1, max_size=8),
)
def test_a_ladder_at_rest_does_nothing_on_any_later_tick_without_new_input(
        enabled: set[str], script: list, later: list[float]) -> None:
    """What lets a session stop ticking (actors/session.py): once `at_rest`, ticks at any
    later times, with nothing new (no unanswered data, no packet on another rung, the
    current rung heard last when it was), return no action and leave it at rest."""
    ladder = Ladder(tuple(enabled))
    now = 0.0
    rested = 0
    for step, event in script:
        now += step
        feed(ladder, event, now)
        if not ladder.at_rest(now, unanswered_since=None, stray=None):
            continue
        rested += 1
        received = ladder._last_rx_current if ladder.current is not None else None
        state = (ladder.current, ladder.changes, ladder.probe_interval, dict(ladder.reasons), ladder._stepped_down_at,
                 ladder._trial_failed)
        for offset in sorted(later):
            assert ladder.tick(now + offset, unanswered_since=None, received_on_current=received, stray=None) == []
            assert ladder.at_rest(now + offset, unanswered_since=None, stray=None)
        assert (ladder.current, ladder.changes, ladder.probe_interval, dict(ladder.reasons), ladder._stepped_down_at,
                ladder._trial_failed) == state
        now += max(later)
