"""The `probe` control command: `Ladder.probe_better_now` brings the better-rung probe
forward to the next tick, under the ladder's own rules (never while searching, never
within HOLD, best rung first, the back-off kept); a session asked `ProbeNow` steps down
as soon as the rules allow."""

from __future__ import annotations

from collections.abc import Callable

from actors.messages import ProbeNow
from tests.unit.test_session_ladder import Pair, simulate, udp_fails_over_to_ssh  # noqa: F401 - simulate: a fixture
from tunnelmesh.ladder import BETTER_PROBE, FAILING_AFTER, HAPPY_EYEBALLS, HOLD, RELAY, RUNGS, SSH, UDP, Ladder, Probe


def settled(rung: str, rungs: tuple[str, ...] = RUNGS) -> Ladder:
    ladder = Ladder(rungs)
    ladder.handshake(rung, 0.0)
    return ladder


def test_on_a_worse_rung_the_next_tick_probes_the_best_rung_at_once() -> None:
    ladder = settled(RELAY)
    assert ladder.tick(12.0, unanswered_since=None, received_on_current=12.0, stray=None) == []  # not due before 20 s
    assert ladder.probe_better_now(12.0) == (True, "probing UDP, SSH now")
    assert ladder.tick(12.5, unanswered_since=None, received_on_current=12.5, stray=None) == [Probe((UDP,))]
    # Then as a scheduled probe: the next better rung HAPPY_EYEBALLS later, the next round at the interval.
    assert ladder.tick(12.5 + HAPPY_EYEBALLS, unanswered_since=None, received_on_current=14.0,
                       stray=None) == [Probe((UDP, SSH))]
    assert ladder.tick(12.5 + BETTER_PROBE - 1, unanswered_since=None, received_on_current=14.0,
                       stray=None) == []


def test_within_the_hold_the_probe_waits_for_it_to_end() -> None:
    ladder = settled(UDP)
    ladder.unavailable(UDP, "link down", 1.0)  # UDP fails: the search finds SSH
    ladder.handshake(SSH, 2.0)
    assert ladder.current == SSH
    probing, detail = ladder.probe_better_now(4.0)
    assert probing and detail == f"probing UDP in {2.0 + HOLD - 4.0:.0f} s (after the hold)"
    assert ladder.tick(5.0, unanswered_since=None, received_on_current=5.0, stray=None) == []
    assert ladder.tick(2.0 + HOLD, unanswered_since=None, received_on_current=11.0, stray=None) == [Probe((UDP,))]


def test_nothing_to_probe_on_the_best_rung_while_searching_or_without_a_path() -> None:
    assert settled(UDP).probe_better_now(5.0) == (False, "already on the best enabled rung (UDP)")
    assert settled(SSH, (SSH, RELAY)).probe_better_now(5.0) == (False, "already on the best enabled rung (SSH)")
    assert Ladder(RUNGS).probe_better_now(0.0)[0] is False
    failing = settled(SSH)
    failing.tick(5.0, unanswered_since=5.0 - FAILING_AFTER, received_on_current=None, stray=None)
    assert failing.searching
    probing, detail = failing.probe_better_now(5.5)
    assert not probing and "searching already" in detail
    # The search goes on as the ladder widens it (the failing rung and the next, then the rest).
    assert failing.tick(5.0 + HAPPY_EYEBALLS, unanswered_since=2.0, received_on_current=None,
                        stray=None) == [Probe((SSH, RELAY, UDP))]


# --- through the session, with real cores in virtual time (tests/unit/test_session_ladder.py's pair) ---


def test_a_session_asked_to_probe_steps_down_long_before_its_scheduled_probe(simulate: Callable[..., None]) -> None:
    async def body(p: Pair) -> None:
        pinger, _, switched = await udp_fails_over_to_ssh(p)
        p.net.unblock(UDP)
        within_hold = await p.sa.handle(ProbeNow())
        assert within_hold.peer == "b" and within_hold.probing and "(after the hold)" in within_hold.detail
        await p.net.run_until(lambda: p.sa.selector.ladder.current == UDP, HOLD + 3.0, "a back on UDP")
        stepped_down = p.net.clock.now
        assert stepped_down - switched < BETTER_PROBE  # the scheduled probe was not due yet
        assert p.sa.selector.transitions[-1].why == "step down after a probe"
        on_best = await p.sa.handle(ProbeNow())
        assert (on_best.probing, on_best.detail) == (False, "already on the best enabled rung (UDP)")
        pinger.stop()

    simulate(body)
