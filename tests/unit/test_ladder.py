"""The transport ladder (tunnelmesh.ladder), driven with explicit times: the
search of a new session, failure detection, the way back to better rungs,
hysteresis and its probe back-off, roaming between rungs, and what `status`
is told about rungs not in use.

Every scenario runs through `Run`, which checks the hysteresis rule on every
action it sees: no two rung changes less than HOLD seconds apart."""

from __future__ import annotations

import pytest

from tunnelmesh.ladder import (
    BETTER_PROBE,
    FAILING_AFTER,
    FRESH,
    HAPPY_EYEBALLS,
    HOLD,
    MAX_PROBE_INTERVAL,
    RELAY,
    RESEARCH,
    RUNGS,
    SSH,
    STEP_DOWN_PROVEN,
    STEP_DOWN_TRIAL,
    UDP,
    Action,
    Ladder,
    Probe,
    Switch,
)


class Run:
    """A ladder and the log of its actions; every Switch after the first choice
    must come at least HOLD seconds after the one before."""

    def __init__(self, rungs: tuple[str, ...] = RUNGS, **kwargs: object) -> None:
        self.ladder = Ladder(rungs, **kwargs)  # type: ignore[arg-type]
        self.log: list[tuple[float, Action]] = []

    def _record(self, now: float, actions: list[Action]) -> list[Action]:
        assert not self.log or now >= self.log[-1][0], "times go forward"
        for action in actions:
            if isinstance(action, Switch) and action.previous is not None:
                changes = [t for t, a in self.log if isinstance(a, Switch) and a.previous is not None]
                assert not changes or now - changes[-1] >= HOLD, f"rung changes at {changes[-1]} and {now}"
            self.log.append((now, action))
        return actions

    def start(self, now: float) -> list[Action]:
        return self._record(now, self.ladder.start(now))

    def handshake(self, rung: str, now: float) -> list[Action]:
        return self._record(now, self.ladder.handshake(rung, now))

    def unavailable(self, rung: str, now: float, reason: str = "link down") -> list[Action]:
        return self._record(now, self.ladder.unavailable(rung, reason, now))

    def tick(self, now: float, *, unanswered: float | None = None, rx: float | None = None,
             stray: tuple[str, float] | None = None) -> list[Action]:
        return self._record(now, self.ladder.tick(now, unanswered_since=unanswered, received_on_current=rx, stray=stray))

    def ticks(self, start: float, end: float, **kwargs: object) -> list[Action]:
        """A tick every second from `start` up to, not including, `end`."""
        out: list[Action] = []
        now = start
        while now < end:
            out += self.tick(now, **kwargs)  # type: ignore[arg-type]
            now += 1.0
        return out

    @property
    def switches(self) -> list[tuple[float, Switch]]:
        return [(t, a) for t, a in self.log if isinstance(a, Switch)]


def settled(rung: str, rungs: tuple[str, ...] = RUNGS, **kwargs: object) -> Run:
    """A ladder whose first handshake, at 0, was on `rung`."""
    run = Run(rungs, **kwargs)
    assert run.handshake(rung, 0.0) == [Switch(rung, None, "first handshake")]
    return run


def fail_over(run: Run, now: float) -> float:
    """The current rung stops answering data sent at `now`; the next rung answers
    the probe at once. Returns the time of the change."""
    current = run.ladder.current
    failing_at = now + FAILING_AFTER
    assert run.tick(failing_at, unanswered=now)[0].rungs[0] == current  # type: ignore[union-attr]
    (switch,) = run.handshake(run.ladder.searching[1], failing_at + 0.1)
    assert isinstance(switch, Switch) and switch.previous == current
    return failing_at + 0.1


def step_down(run: Run, now: float) -> None:
    """The better-rung probe due at `now` is answered at once."""
    assert run.tick(now) == [Probe((UDP,))]
    assert run.handshake(UDP, now + 0.1) == [Switch(UDP, SSH, "step down after a probe")]


# --- a new session -----------------------------------------------------------------


def test_new_session_takes_udp_when_it_answers() -> None:
    run = Run()
    assert run.start(0.0) == [Probe((UDP,))]
    assert run.handshake(UDP, 0.2) == [Switch(UDP, None, "first handshake")]
    assert run.ladder.current == UDP and run.ladder.searching == []
    assert run.ticks(1.0, 30.0) == []  # on the best rung: nothing to search, nothing better
    assert run.ladder.why_not_better(30.0) == []


def test_search_widens_every_two_seconds_then_keeps_probing_all_rungs() -> None:
    run = Run()
    assert run.start(0.0) == [Probe((UDP,))]
    assert run.tick(1.0) == []
    assert run.tick(HAPPY_EYEBALLS) == [Probe((UDP, SSH))]
    assert run.tick(3.0) == []
    assert run.tick(2 * HAPPY_EYEBALLS) == [Probe((UDP, SSH, RELAY))]
    # Every rung in play: all of them again at the slower re-search pace.
    assert run.ticks(5.0, 2 * HAPPY_EYEBALLS + RESEARCH) == []
    assert run.tick(2 * HAPPY_EYEBALLS + RESEARCH) == [Probe((UDP, SSH, RELAY))]
    assert run.ladder.current is None


def test_a_new_sessions_search_gives_up_after_90_s_and_can_start_again() -> None:
    run = Run()
    run.start(0.0)
    probes = [a for t in range(1, 200) for a in run.tick(float(t))]
    assert 10 <= len(probes) <= 25 and run.ladder.searching == []  # none after 90 s
    assert run.start(300.0) == [Probe((UDP,))]


@pytest.mark.parametrize("current", [UDP, SSH])
def test_a_failing_rungs_search_gives_up_after_90_s_and_only_new_traffic_starts_another(current: str) -> None:
    # Once GIVE_UP ended only a search with no rung current: a failing rung's went on forever.
    run = settled(current)
    sent = 10.0
    assert run.tick(sent + FAILING_AFTER, unanswered=sent) != []
    probes = [a for t in range(14, 200) for a in run.tick(float(t), unanswered=sent)]
    assert 10 <= len(probes) <= 25 and run.ladder.searching == []  # none after 90 s of search
    gave_up = run.ladder.gave_up_at
    assert gave_up == sent + FAILING_AFTER + 90.0 and run.ladder.current == current  # packets go where they went
    assert run.ladder.at_rest(200.0, unanswered_since=sent, stray=None)  # the peer is gone: no probe of a better rung
    # Data sent after the search gave up and unanswered for FAILING_AFTER: a new search.
    resent = 250.0
    assert run.ticks(200.0, resent + FAILING_AFTER, unanswered=resent) == []
    assert run.tick(resent + FAILING_AFTER, unanswered=resent)[0].rungs[0] == current  # type: ignore[union-attr]


def test_after_a_give_up_an_asked_for_probe_says_the_peer_is_unreachable_and_a_handshake_elsewhere_is_a_move() -> None:
    run = settled(UDP)
    run.tick(13.0, unanswered=10.0)
    run.ticks(14.0, 200.0, unanswered=10.0)
    assert run.ladder.peer_gone()
    due, detail = run.ladder.probe_better_now(200.0)
    assert not due and "unreachable" in detail
    # The peer turns up on SSH by itself (no search of ours on): it moved, UDP is not "failing".
    assert run.handshake(SSH, 201.0) == [Switch(SSH, UDP, "peer moved")]


def test_after_a_search_gave_up_on_ssh_the_peer_heard_again_brings_back_the_udp_probe() -> None:
    run = settled(SSH)
    run.tick(13.0, unanswered=10.0)
    run.ticks(14.0, 200.0, unanswered=10.0)
    assert run.ladder.searching == [] and run.ticks(200.0, 300.0) == []
    assert run.tick(300.0, rx=299.5) == [Probe((UDP,))]  # it answered on SSH: UDP is worth a try again


@pytest.mark.parametrize("winner", RUNGS)
def test_first_handshake_in_a_search_carries_the_traffic_and_ends_the_search(winner: str) -> None:
    run = Run()
    run.start(0.0)
    run.tick(2.0)
    run.tick(4.0)
    assert run.handshake(winner, 4.5) == [Switch(winner, None, "first handshake")]
    assert run.ladder.searching == []
    assert run.handshake(winner, 5.0) == []  # the same rung again changes nothing
    # No more search probes; only the better-rung probe when it is due.
    better = tuple(r for r in RUNGS if RUNGS.index(r) < RUNGS.index(winner))
    assert run.ticks(5.0, 4.5 + BETTER_PROBE) == []
    # The way back starts with the best rung alone, then adds the next better one.
    assert run.tick(4.5 + BETTER_PROBE) == ([Probe(better[:1])] if better else [])
    if len(better) > 1:
        assert run.tick(5.5 + BETTER_PROBE) == []
        assert run.tick(4.5 + BETTER_PROBE + HAPPY_EYEBALLS) == [Probe(better)]


def test_first_handshake_while_nothing_is_searching_still_chooses() -> None:
    run = Run()
    assert run.handshake(RELAY, 7.0) == [Switch(RELAY, None, "first handshake")]


# --- an established path failing ---------------------------------------------------


@pytest.mark.parametrize(("rungs", "current", "probed"), [
    (RUNGS, UDP, (UDP, SSH)),
    (RUNGS, SSH, (SSH, RELAY)),
    (RUNGS, RELAY, (RELAY,)),
    ((UDP, RELAY), UDP, (UDP, RELAY)),
])
def test_failing_after_three_seconds_probes_the_current_and_next_rung(rungs: tuple[str, ...], current: str,
                                                                    probed: tuple[str, ...]) -> None:
    run = settled(current, rungs)
    sent = 10.0  # the failure is seen at 13, before the first better-rung probe
    assert run.ticks(sent, sent + FAILING_AFTER, unanswered=sent) == []
    assert run.tick(sent + FAILING_AFTER, unanswered=sent) == [Probe(probed)]
    assert run.ladder.current == current  # probing does not move traffic
    reason = run.ladder.reasons[current]
    assert (reason.text, reason.since) == (f"no reply for {FAILING_AFTER:g} s while sending", sent)


def test_answered_traffic_is_not_failing() -> None:
    run = settled(UDP)
    assert run.ticks(1.0, 60.0, unanswered=None, rx=0.5) == []


def test_silence_from_before_a_change_does_not_count_against_the_new_rung() -> None:
    run = settled(UDP)
    changed = fail_over(run, 20.0)  # now on SSH
    # Data first unanswered at 20 (on UDP): on SSH the clock starts at the change.
    assert run.ticks(changed + 1, changed + FAILING_AFTER, unanswered=20.0) == []
    assert run.tick(changed + FAILING_AFTER, unanswered=20.0) == [Probe((SSH, RELAY))]


@pytest.mark.parametrize("answer_at", [0.5, 2.5], ids=["before widening", "after widening"])
def test_the_current_rung_answering_ends_the_search_without_a_change(answer_at: float) -> None:
    run = settled(UDP)
    failing = 23.0
    run.tick(failing, unanswered=20.0)
    run.ticks(failing + 1, failing + answer_at)
    assert run.handshake(UDP, failing + answer_at) == []
    assert run.ladder.current == UDP and run.ladder.searching == []
    assert UDP not in run.ladder.reasons
    assert run.ticks(failing + answer_at, failing + 30.0) == []
    assert run.switches == [(0.0, Switch(UDP, None, "first handshake"))]


def test_a_held_answer_on_a_worse_rung_lapses_when_the_current_rung_answers() -> None:
    run = settled(SSH)
    step_down(run, BETTER_PROBE)  # on UDP from 20.1: held until 30.1
    run.tick(24.0, unanswered=21.0)  # failing: probe (UDP, SSH)
    assert run.handshake(SSH, 27.5) == []  # held
    assert run.handshake(UDP, 28.0) == []  # UDP answers after all: search over
    # When the hold ends (31), the SSH answer is under FRESH seconds old, but
    # UDP has answered since: there is nothing to change.
    assert run.ticks(29.0, 40.0, rx=28.0) == []
    assert run.ladder.current == UDP


def test_a_failing_change_says_which_rung_failed() -> None:
    run = settled(UDP)
    run.tick(23.0, unanswered=20.0)
    assert run.handshake(SSH, 23.2) == [Switch(SSH, UDP, "udp failing")]


# --- hysteresis ----------------------------------------------------------------------


def failing_during_hold(answer_at: float) -> Run:
    """Stepped down to UDP at 20.1; UDP fails at 24, SSH answers at `answer_at`."""
    run = settled(SSH)
    step_down(run, BETTER_PROBE)
    assert run.tick(24.0, unanswered=21.0) == [Probe((UDP, SSH))]
    assert run.handshake(SSH, answer_at) == []  # held: the last change was at 20.1
    return run


def test_a_held_change_is_made_when_the_hold_ends_while_its_evidence_is_fresh() -> None:
    run = failing_during_hold(answer_at=26.5)
    # The search widens at 26; the first tick after the hold (at 31) changes.
    assert run.ticks(25.0, 32.0) == [Probe((UDP, SSH, RELAY)), Switch(SSH, UDP, "udp failing")]
    assert run.switches[-1][0] == 31.0 and 31.0 - 26.5 < FRESH


def test_a_held_change_away_from_a_failing_rung_is_made_however_old_its_answer() -> None:
    # The answer came early in the failure (24.5), the hold ends at 30.1 and the search's
    # next answers are lost or rate-limited: the rung that answered during the failure is
    # still the way out (an e2e cycle once sat on a dead SSH link for 20 s this way).
    run = failing_during_hold(answer_at=24.5)
    assert [a for a in run.ticks(25.0, 32.0) if isinstance(a, Switch)] == [Switch(SSH, UDP, "udp failing")]
    assert run.switches[-1][0] == 31.0 and 31.0 - 24.5 >= FRESH


def test_a_held_change_with_stale_evidence_is_not_made_once_the_current_rung_is_heard_again() -> None:
    run = failing_during_hold(answer_at=24.5)
    actions = run.ticks(25.0, 34.0, rx=25.0)  # UDP carries packets again after SSH answered
    assert not [a for a in actions if isinstance(a, Switch)]
    assert run.ladder.current == UDP
    # The search goes on; a fresh answer after the hold changes at once.
    assert run.ladder.searching == [UDP, SSH, RELAY]
    assert run.handshake(SSH, 34.5) == [Switch(SSH, UDP, "udp failing")]


def test_an_answer_from_before_the_failure_is_only_fresh_for_fresh_seconds() -> None:
    run = settled(SSH)
    step_down(run, BETTER_PROBE)  # on UDP from 20.1: held until 30.1
    assert run.handshake(SSH, 22.0) == []  # held (say a late answer to an old probe)
    assert run.tick(26.0, unanswered=23.0, rx=21.0) == [Probe((UDP, SSH))]  # UDP fails at 26
    actions = run.ticks(27.0, 34.0, rx=21.0)
    assert not [a for a in actions if isinstance(a, Switch)]  # 22.0 is before the failure, and stale at 30.1
    assert run.ladder.current == UDP


def test_a_handshake_on_another_rung_within_the_hold_does_not_switch() -> None:
    run = settled(SSH)
    step_down(run, BETTER_PROBE)
    for rung in (SSH, RELAY):
        assert run.handshake(rung, 21.0) == []
    assert run.ladder.current == UDP


# --- back to better rungs --------------------------------------------------------------


@pytest.mark.parametrize(("current", "better"), [(SSH, (UDP,)), (RELAY, (UDP, SSH))])
def test_better_rungs_are_probed_every_twenty_seconds(current: str, better: tuple[str, ...]) -> None:
    run = settled(current)
    run.ticks(1.0, 101.0, rx=0.0)
    probes = [(t, a) for t, a in run.log if isinstance(a, Probe)]
    # Each round: the best rung alone, then every better one HAPPY_EYEBALLS later.
    rounds = [[(t, Probe(better[:1]))] + ([(t + HAPPY_EYEBALLS, Probe(better))] if len(better) > 1 else [])
              for t in (20.0, 40.0, 60.0, 80.0, 100.0)]
    assert probes == [probe for one in rounds for probe in one if probe[0] < 101.0]


def test_no_better_rung_probe_until_a_change_is_allowed() -> None:
    run = settled(SSH)
    step_down(run, BETTER_PROBE)  # UDP at 20.1
    run.tick(24.0, unanswered=21.0)
    run.handshake(SSH, 28.0)  # held until 30.1, made at 31
    run.ticks(25.0, 200.0)
    switches = [t for t, _ in run.switches]
    probes = [t for t, a in run.log if isinstance(a, Probe) and a.rungs == (UDP,)]
    assert switches == [0.0, 20.1, 31.0]
    assert probes == [20.0] + [31.0 + BETTER_PROBE * 2 * k for k in (1, 2, 3, 4)]  # the failed step-down doubled it
    assert all(t - max(c for c in switches if c <= t) >= HOLD for t in probes)


def test_no_better_rung_probe_while_searching() -> None:
    run = settled(SSH)
    run.tick(18.0, unanswered=15.0)  # SSH failing: the search is on
    actions = run.ticks(19.0, 40.0)
    assert all(isinstance(a, Probe) and a.rungs[0] == SSH for a in actions)


def test_a_better_rung_answering_steps_down() -> None:
    run = settled(RELAY)
    assert run.tick(BETTER_PROBE) == [Probe((UDP,))]
    assert run.tick(BETTER_PROBE + HAPPY_EYEBALLS) == [Probe((UDP, SSH))]  # UDP did not answer
    assert run.handshake(SSH, BETTER_PROBE + HAPPY_EYEBALLS + 0.3) == [Switch(SSH, RELAY, "step down after a probe")]
    assert RELAY not in run.ladder.why_not_better(BETTER_PROBE + 1)


def flap(run: Run, now: float) -> float:
    """Step down to UDP at `now` (the probe is due then) and fail back to SSH
    within the trial. Returns the time the next better-rung probe is due."""
    step_down(run, now)
    changed = fail_over(run, now + HOLD - FAILING_AFTER)
    assert run.ladder.current == SSH and changed - now < STEP_DOWN_TRIAL
    return changed + run.ladder.probe_interval


def test_failed_step_downs_double_the_probe_interval_up_to_five_minutes() -> None:
    run = settled(SSH)
    due = BETTER_PROBE
    intervals = []
    for _ in range(6):
        run.ticks(run.log[-1][0] + 1, due, rx=run.log[-1][0])
        due = flap(run, due)
        intervals.append(run.ladder.probe_interval)
    assert intervals == [40.0, 80.0, 160.0, MAX_PROBE_INTERVAL, MAX_PROBE_INTERVAL, MAX_PROBE_INTERVAL]
    # And the probe waits that long.
    last = run.log[-1][0]
    assert not [a for a in run.ticks(last + 1, due, rx=last) if isinstance(a, Probe)]
    assert run.tick(due) == [Probe((UDP,))]


def test_a_step_down_that_holds_resets_the_probe_interval() -> None:
    run = settled(SSH)
    due = flap(run, BETTER_PROBE)
    assert run.ladder.probe_interval == 2 * BETTER_PROBE
    run.ticks(run.log[-1][0] + 1, due, rx=run.log[-1][0])
    step_down(run, due)
    run.ticks(due + 1, due + STEP_DOWN_TRIAL, rx=due + 1)
    assert run.ladder.probe_interval == 2 * BETTER_PROBE  # not yet: the trial runs
    run.tick(due + 0.1 + STEP_DOWN_TRIAL, rx=due + 50)
    assert run.ladder.probe_interval == BETTER_PROBE


def test_a_step_down_failing_after_its_trial_does_not_double() -> None:
    run = settled(SSH)
    step_down(run, BETTER_PROBE)
    run.ticks(21.0, 90.0, rx=20.5)
    fail_over(run, 90.0)
    assert run.ladder.probe_interval == BETTER_PROBE


# --- roaming -------------------------------------------------------------------------


def test_a_stray_packet_moves_the_path_once_the_current_rung_is_silent() -> None:
    run = settled(UDP)
    # UDP heard 2 s ago: a packet on SSH changes nothing.
    assert run.tick(40.0, rx=38.0, stray=(SSH, 39.5)) == []
    assert run.tick(40.9, rx=38.0, stray=(SSH, 40.5)) == []
    assert run.tick(41.0, rx=38.0, stray=(SSH, 40.5)) == [Switch(SSH, UDP, "peer moved")]


def test_packets_already_arriving_on_another_rung_move_a_searching_session() -> None:
    # UDP failing: the search is on. The peer found SSH first and already sends on it; the
    # session follows it at once instead of waiting for its own probes to be answered.
    run = settled(UDP)
    assert run.tick(23.0, unanswered=20.0) == [Probe((UDP, SSH))]
    assert run.ladder.searching == [UDP, SSH]
    assert run.tick(24.0, unanswered=20.0, rx=19.0, stray=(SSH, 23.6)) == [Switch(SSH, UDP, "peer moved")]
    assert run.ladder.current == SSH and run.ladder.searching == []


def test_a_searching_session_is_not_moved_by_a_stale_packet_on_another_rung() -> None:
    run = settled(UDP)
    run.tick(23.0, unanswered=20.0)
    assert all(not isinstance(a, Switch) for a in run.ticks(24.0, 30.0, unanswered=20.0, rx=19.0, stray=(SSH, 19.5)))
    assert run.ladder.current == UDP


def test_a_step_down_that_carried_traffic_is_not_a_failed_one() -> None:
    # UDP carried traffic for STEP_DOWN_PROVEN after the step down: a cut later on is the
    # network changing, not the step down failing, and the next return comes as soon as ever.
    run = settled(SSH)
    step_down(run, BETTER_PROBE)  # on UDP from 20.1
    for now in range(21, 21 + int(STEP_DOWN_PROVEN) + 1):
        run.tick(float(now), rx=now - 0.5)
    changed = fail_over(run, 35.0)
    assert changed - BETTER_PROBE < STEP_DOWN_TRIAL and run.ladder.current == SSH
    assert run.ladder.probe_interval == BETTER_PROBE


def test_a_step_down_that_failed_before_it_carried_traffic_backs_off() -> None:
    run = settled(SSH)
    step_down(run, BETTER_PROBE)
    run.ticks(21.0, 28.0, rx=20.1)  # nothing heard on UDP after the handshake
    fail_over(run, 28.0)
    assert run.ladder.probe_interval == 2 * BETTER_PROBE


def test_a_stale_stray_packet_moves_nothing() -> None:
    run = settled(UDP)
    assert run.ticks(40.0, 60.0, rx=30.0, stray=(SSH, 40.0 - FAILING_AFTER)) == []


def test_a_late_packet_on_the_old_rung_does_not_pull_the_path_back() -> None:
    run = settled(UDP)
    changed = fail_over(run, 20.0)  # UDP -> SSH at 23.1
    late = changed + 0.2
    # SSH carries traffic; the late UDP packet is noted as stray each tick.
    for now in range(24, 60):
        run.tick(float(now), rx=now - 0.5, stray=(UDP, late))
    # Even with SSH idle later on, the old packet is too old to count.
    run.ticks(60.0, 80.0, rx=59.5, stray=(UDP, late))
    assert run.ladder.current == SSH and len(run.switches) == 2


def test_a_stray_packet_within_the_hold_waits() -> None:
    run = settled(SSH)
    step_down(run, BETTER_PROBE)  # UDP from 20.1, hold until 30.1
    assert run.ticks(24.0, 30.0, rx=20.1, stray=(SSH, 23.5)) == []
    assert run.tick(30.2, rx=20.1, stray=(SSH, 30.0)) == [Switch(SSH, UDP, "peer moved")]


@pytest.mark.parametrize("stray_rung", [UDP, "carrier pigeon"])
def test_a_stray_packet_on_a_disabled_or_unknown_rung_is_ignored(stray_rung: str) -> None:
    run = settled(SSH, (SSH, RELAY), unusable={UDP: "disabled in the config"})
    assert run.ticks(30.0, 40.0, rx=20.0, stray=(stray_rung, 29.5)) == []


# --- disabled rungs and why_not_better ---------------------------------------------------


def test_disabled_rungs_are_never_probed_and_say_why() -> None:
    run = Run((SSH, RELAY), unusable={UDP: "disabled in the config"})
    assert run.start(0.0) == [Probe((SSH,))]
    assert run.tick(2.0) == [Probe((SSH, RELAY))]
    assert run.ticks(3.0, 2.0 + RESEARCH) == []  # every enabled rung is in: the slower pace
    assert run.tick(2.0 + RESEARCH) == [Probe((SSH, RELAY))]
    assert run.handshake(UDP, 7.5) == []  # cannot happen, and would not count
    assert run.handshake(RELAY, 8.0) == [Switch(RELAY, None, "first handshake")]
    assert run.ticks(9.0, 28.0) == []
    assert run.tick(28.0) == [Probe((SSH,))]
    why = run.ladder.why_not_better(28.5)
    assert why[0] == (UDP, "disabled in the config", None)
    assert why[1][0] == SSH


def test_a_rung_left_out_without_a_reason_is_reported_disabled() -> None:
    ladder = Ladder((RELAY,))
    ladder.handshake(RELAY, 0.0)
    why = dict((rung, text) for rung, text, _ in ladder.why_not_better(1.0))
    assert set(why) == {UDP, SSH}
    assert all("disabled" in text for text in why.values()), why


@pytest.mark.parametrize("rungs", [(), ("tcp",), (UDP, "tcp")])
def test_only_known_rungs_can_be_enabled(rungs: tuple[str, ...]) -> None:
    with pytest.raises(ValueError):
        Ladder(rungs)


def test_enabled_rungs_are_kept_best_first() -> None:
    assert Ladder((RELAY, UDP)).rungs == (UDP, RELAY)


def test_why_not_better_names_unanswered_probes_and_link_failures() -> None:
    run = Run()
    run.start(0.0)
    run.tick(2.0)
    run.unavailable(SSH, 2.5, "ssh: connection refused")
    run.tick(4.0)
    assert run.handshake(RELAY, 4.5) == [Switch(RELAY, None, "first handshake")]
    assert run.ladder.why_not_better(5.0) == [
        (UDP, f"no handshake reply in {HAPPY_EYEBALLS:g} s", 0.0),
        (SSH, "ssh: connection refused", 2.5),
    ]
    # A later failure updates the text, not when the rung stopped working.
    run.unavailable(SSH, 6.0, "ssh: host key mismatch")
    assert run.ladder.why_not_better(6.0)[1] == (SSH, "ssh: host key mismatch", 2.5)
    # An answer clears the reason.
    run.handshake(SSH, 30.0)
    assert [rung for rung, _, _ in run.ladder.why_not_better(30.0)] == [UDP]


def test_an_unanswered_probe_replaces_an_earlier_reason_but_not_a_later_one() -> None:
    run = Run()
    run.start(0.0)
    run.unavailable(UDP, 0.0, "no UDP address known yet")  # the probe could not go out
    assert run.tick(2.0) == [Probe((UDP, SSH))]  # the search widens and probes UDP again
    assert run.ladder.reasons[UDP].text == "no UDP address known yet"  # nothing was sent at 0.0
    run.unavailable(SSH, 2.0, "ssh: connection refused")  # said when its probe was made
    run.tick(4.0)  # UDP's probe at 2.0 went out (its address known by then) and got no answer
    udp, ssh = run.ladder.reasons[UDP], run.ladder.reasons[SSH]
    assert (udp.text, udp.since) == (f"no handshake reply in {HAPPY_EYEBALLS:g} s", 0.0)
    assert ssh.text == "ssh: connection refused"


def test_why_not_better_before_any_reason_says_when_the_next_probe_goes() -> None:
    run = settled(SSH)
    assert run.ladder.why_not_better(5.0) == [(UDP, "not answering yet (next probe in 15 s)", None)]
    assert run.ladder.why_not_better(20.0) == [(UDP, "not answering yet (probing now)", None)]


def test_why_not_better_while_searching_lists_only_known_reasons() -> None:
    run = Run()
    run.start(0.0)
    assert run.ladder.why_not_better(1.0) == []
    run.tick(2.0)
    assert run.ladder.why_not_better(2.0) == [(UDP, f"no handshake reply in {HAPPY_EYEBALLS:g} s", 0.0)]


# --- links that cannot be made --------------------------------------------------------------


@pytest.mark.parametrize(("current", "probed"), [(UDP, (UDP, SSH)), (SSH, (SSH, RELAY)), (RELAY, (RELAY,))])
def test_the_current_rung_unavailable_starts_a_search(current: str, probed: tuple[str, ...]) -> None:
    run = settled(current)
    assert run.unavailable(current, 5.0) == [Probe(probed)]
    assert run.tick(5.0 + HAPPY_EYEBALLS) != []  # the search widens (or re-probes) as usual


def test_another_rung_unavailable_only_records_why() -> None:
    run = settled(SSH)
    assert run.unavailable(RELAY, 5.0) == []
    assert run.unavailable(UDP, 5.0, "no UDP address known yet") == []
    assert run.ladder.why_not_better(5.0) == [(UDP, "no UDP address known yet", 5.0)]


def test_unavailable_during_a_search_starts_no_second_one() -> None:
    run = settled(UDP)
    run.tick(23.0, unanswered=20.0)
    assert run.unavailable(UDP, 23.5) == []
    assert run.tick(25.0) == [Probe((UDP, SSH, RELAY))]  # the widening keeps its pace


@pytest.mark.parametrize("rung", ["tcp", "carrier pigeon"])
def test_unknown_rungs_are_ignored(rung: str) -> None:
    run = settled(UDP)
    assert run.handshake(rung, 1.0) == []
    assert run.unavailable(rung, 1.0) == []
    assert run.ladder.current == UDP


def test_changes_are_counted_without_the_first_choice() -> None:
    run = settled(SSH)
    step_down(run, BETTER_PROBE)
    fail_over(run, 30.0)
    assert run.ladder.changes == 2


# --- a switch the caller could not carry out -----------------------------------------------------


def test_a_reverted_switch_is_undone_wholly_and_not_decided_again() -> None:
    run = settled(UDP)
    failing_at = 20.0 + FAILING_AFTER
    assert run.tick(failing_at, unanswered=20.0) == [Probe((UDP, SSH))]
    before = (run.ladder.changes, run.ladder.last_change, list(run.ladder.searching), run.ladder.probe_interval)
    (switch,) = run.handshake(SSH, failing_at + 0.1)
    assert isinstance(switch, Switch) and switch.rung == SSH
    run.ladder.revert(switch)  # the SSH link closed before the switch was made
    assert run.ladder.current == UDP
    assert (run.ladder.changes, run.ladder.last_change, run.ladder.searching, run.ladder.probe_interval) == before
    # Its evidence went with it: no tick decides the same switch again; the search goes on.
    actions = run.ticks(failing_at + 1, failing_at + FRESH + 1, unanswered=20.0)
    assert not any(isinstance(a, Switch) for a in actions), actions
    assert any(isinstance(a, Probe) for a in actions), actions


def test_a_step_down_that_failed_in_its_trial_backs_off_even_after_traffic_came_again() -> None:
    # Flapping: UDP fails within the hold (the ladder stays on it), then answers again for a
    # while. The trial failed once: leaving UDP later within STEP_DOWN_TRIAL still doubles.
    run = settled(SSH)
    step_down(run, BETTER_PROBE)  # on UDP from 20.1
    assert run.tick(25.0, unanswered=21.0, rx=20.5)[0] == Probe((UDP, SSH))  # failing within the hold
    run.handshake(UDP, 25.5)  # UDP answers again: the search ends on UDP
    for now in range(26, 40):
        run.tick(float(now), rx=now - 0.5)
    fail_over(run, 40.0)
    assert run.ladder.probe_interval == 2 * BETTER_PROBE


def test_a_step_down_whose_rung_fell_silent_in_its_trial_backs_off_even_after_traffic_came_again() -> None:
    # Flapping seen from the side that follows: its pings are answered over the old rung
    # (no failure of its own), UDP falls silent, then carries traffic again for a while.
    run = settled(SSH)
    step_down(run, BETTER_PROBE)  # on UDP from 20.1
    run.ticks(21.0, 25.0, rx=20.5)
    run.ticks(25.0, 29.0, rx=20.5, stray=(SSH, 24.5))  # nothing on UDP; the peer answers on SSH
    for now in range(29, 41):  # UDP carries traffic for longer than STEP_DOWN_PROVEN
        run.tick(float(now), rx=now - 0.5)
    assert run.ladder.current == UDP
    run.ticks(41.0, 43.0, rx=40.5)
    assert run.tick(43.5, rx=40.5, stray=(SSH, 43.2)) == [Switch(SSH, UDP, "peer moved")]
    assert run.ladder.probe_interval == 2 * BETTER_PROBE
