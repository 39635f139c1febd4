"""The transport ladder of one peer session: which rung carries its traffic.

Sans-IO like the protocol core: the session feeds it what happened (a
handshake completed on a rung, a link could not be made, the core's view of
unanswered traffic) with the time, and gets back actions: `Probe` (send a
handshake initiation on these rungs) and `Switch` (send on this rung from now
on). Rungs, best first: UDP, SSH, WebSocket relay.

Rules (DESIGN.md, "Transport ladder"):
- Searching (a new session, or the current rung failing): probe the best rung
  (a failing rung together with the next one); every HAPPY_EYEBALLS seconds
  without an answer, add the next rung and probe them all again. The first
  rung a handshake completes on carries the traffic.
- Failing: data sent and no authenticated packet for FAILING_AFTER seconds.
- Giving up: a search that finds nothing in GIVE_UP seconds ends (a failing rung stays
  where packets go, and better rungs are not probed) until the peer is heard again or
  data sent after that, unanswered, starts another search.
- Return: on a worse rung, probe the better ones every `probe_interval`
  (BETTER_PROBE, doubled up to MAX_PROBE_INTERVAL each time a step-down fails
  within STEP_DOWN_TRIAL without first carrying traffic for STEP_DOWN_PROVEN
  with no failure and no silence of FAILING_AFTER, and reset when one holds); a handshake on a better rung steps down. Each return
  probe starts with the best rung alone and adds the next better one every
  HAPPY_EYEBALLS seconds, so the best rung that answers wins (from the relay
  straight to UDP), not whichever of them answers first.
- Hysteresis: at most one rung change per HOLD seconds, whatever the reason;
  a change that is due but held is made when the hold ends, if its evidence
  is still fresh. Probes for a step-down are sent only when it could be made.
- Roaming: packets that arrive on another rung move the send path only when
  the current rung has received nothing for FAILING_AFTER seconds (the peer
  has moved), also in the middle of a search (the peer found a path first);
  a late packet on an old rung changes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

UDP, SSH, RELAY = "udp", "ssh", "relay"
RUNGS = (UDP, SSH, RELAY)
LABELS = {UDP: "UDP", SSH: "SSH", RELAY: "relay"}

HAPPY_EYEBALLS = 2.0
FAILING_AFTER = 3.0
BETTER_PROBE = 20.0
MAX_PROBE_INTERVAL = 300.0
HOLD = 10.0
STEP_DOWN_TRIAL = 60.0
STEP_DOWN_PROVEN = 10.0  # a step-down that carried traffic this long held, whatever fails later
FRESH = 5.0  # how long a handshake on a rung stays evidence for a held change
RESEARCH = 5.0  # once every rung is being probed, re-probe at this pace
GIVE_UP = 90.0  # a search ends unanswered after this (WireGuard's REKEY_ATTEMPT_TIME)


@dataclass(frozen=True, slots=True)
class Probe:
    rungs: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Switch:
    rung: str
    previous: str | None
    why: str  # "udp failing", "step down after a probe", "peer moved", "first handshake"


Action = Probe | Switch


@dataclass(slots=True)
class Reason:
    """Why a rung is not in use: text for `status` and when it started (monotonic)."""

    text: str
    since: float
    said: float = float("-inf")  # when the text was last set (a later unanswered probe replaces it)

    def __post_init__(self) -> None:
        self.said = max(self.said, self.since)


#: What a switch changes (Ladder.revert puts it back).
_SWITCH_STATE = ("current", "changes", "last_change", "probe_interval", "searching", "_failing", "_last_rx_current",
                 "_switched_at", "_next_better_probe", "_stepped_down_at", "_trial_failed", "reasons", "_returning")


class Ladder:
    def __init__(self, rungs: tuple[str, ...], *, unusable: dict[str, str] | None = None) -> None:
        """`rungs`: the enabled ones (config may disable or force); `unusable`:
        a fixed reason for each rung left out ("disabled in config"); one
        left out without a reason is "disabled"."""
        if not rungs or any(r not in RUNGS for r in rungs):
            raise ValueError(f"rungs must be a non-empty subset of {RUNGS}")
        self.rungs = tuple(r for r in RUNGS if r in rungs)
        self.fixed = {r: "disabled" for r in RUNGS if r not in self.rungs} | dict(unusable or {})
        self.current: str | None = None
        self.changes = 0
        self.last_change: float | None = None  # the first choice is not a change
        self.probe_interval = BETTER_PROBE
        self.reasons: dict[str, Reason] = {}
        # Searching: the rungs being probed, when the set widens next.
        self.searching: list[str] = []
        self._failing: str | None = None  # the current rung, while a search is on because it fails
        self._next_widen = 0.0
        self._next_better_probe = 0.0
        self._probed_at: dict[str, float] = {}
        self._answered_at: dict[str, float] = {}
        self._stepped_down_at: float | None = None
        # The rung stepped down to failed, or fell silent, once in its trial (even if held there):
        # then only STEP_DOWN_TRIAL proves it, not STEP_DOWN_PROVEN of traffic.
        self._trial_failed = False
        # Returning: the better rungs being probed, best first, and when the next one is added.
        self._returning: list[str] = []
        self._next_return_widen = 0.0
        self._last_rx_current = float("-inf")
        self._switched_at = float("-inf")
        self._search_started = float("-inf")
        #: When the last search gave up: data unanswered since before then is no reason to
        #: search again (only new traffic is), as after WireGuard's REKEY_ATTEMPT_TIME.
        self.gave_up_at = float("-inf")
        self._undo: dict[str, object] | None = None  # what the last switch changed, for revert

    # --- queries ----------------------------------------------------------------------

    def rank(self, rung: str) -> int:
        return RUNGS.index(rung)

    def why_not_better(self, now: float) -> list[tuple[str, str, float | None]]:
        """(rung, reason, since) for every rung better than the current one."""
        limit = self.rank(self.current) if self.current is not None else len(RUNGS)
        out: list[tuple[str, str, float | None]] = []
        for rung in RUNGS[:limit]:
            if rung in self.fixed:
                out.append((rung, self.fixed[rung], None))
            elif rung in self.reasons:
                out.append((rung, self.reasons[rung].text, self.reasons[rung].since))
            elif self.current is not None:
                wait = self._next_better_probe - now
                note = "probing now" if wait <= 0 else f"next probe in {wait:.0f} s"
                out.append((rung, f"not answering yet ({note})", None))
        return out

    def at_rest(self, now: float, *, unanswered_since: float | None, stray: tuple[str, float] | None) -> bool:
        """Whether `tick` can do nothing until an input comes (a handshake, a failure, data
        sent unanswered, a packet on another rung): the current rung is the best enabled one
        (or the search gave up), no probe or search is on, no step-down is on trial and no
        answer on another rung could still become a change. The caller may stop ticking and
        start again with the next input (the inputs are the same as `tick`'s)."""
        if self.searching or self._returning or self._probed_at or self._stepped_down_at is not None:
            return False
        if self.current is None:
            return True  # the search gave up: traffic starts it again
        if self._new_unanswered(unanswered_since) is not None:
            return False  # new traffic waits for an answer
        if self.current != self.rungs[0] and not self.peer_gone():
            return False  # a better rung to probe
        if stray is not None and stray[0] != self.current and now - stray[1] < FAILING_AFTER:
            return False
        return not self._fresh_answers(now, failing_since=float("inf"))

    def _may_change(self, now: float) -> bool:
        return self.last_change is None or now - self.last_change >= HOLD

    # --- inputs -----------------------------------------------------------------------

    def start(self, now: float) -> list[Action]:
        """A new session (or one to re-establish): search from the best rung."""
        return self._search([self.rungs[0]], now)

    def handshake(self, rung: str, now: float) -> list[Action]:
        """A handshake completed with proof coming in on `rung`."""
        if rung not in self.rungs:
            return []
        self._answered_at[rung] = now
        self.reasons.pop(rung, None)
        if rung == self.current:
            self._last_rx_current = now
            self.searching = []
            self._failing = None
            return []
        if self.current is None:
            return self._switch(rung, now, "first handshake")
        if not self._may_change(now):
            return []  # kept as evidence; `tick` makes the change when the hold ends
        return self._switch(rung, now, self._why(rung))

    def unavailable(self, rung: str, reason: str, now: float) -> list[Action]:
        """A link for `rung` could not be made or went down."""
        if rung not in self.rungs:
            return []
        if rung not in self.reasons:
            self.reasons[rung] = Reason(reason, now)
        else:
            self.reasons[rung].text, self.reasons[rung].said = reason, now
        if rung == self.current and not self.searching:
            return self._fail(rung, now)
        return []

    def tick(self, now: float, *, unanswered_since: float | None, received_on_current: float | None,
             stray: tuple[str, float] | None) -> list[Action]:
        """Called about once a second. `unanswered_since`: when data was first sent
        with no authenticated packet since (None when answered); `received_on_current`:
        the last authenticated packet on the current rung; `stray`: the rung and time
        of the last authenticated packet that came on another rung."""
        actions: list[Action] = []
        if received_on_current is not None:
            self._last_rx_current = max(self._last_rx_current, received_on_current)
        self._note_unanswered_probes(now)
        # A change that was held back, still backed by fresh evidence.
        if self.current is not None and self._may_change(now):
            held = self._held_change(now)
            if held is not None:
                return self._switch(held, now, self._why(held))
        if self._stepped_down_at is not None and now - self._last_rx_current >= FAILING_AFTER:
            self._trial_failed = True  # silent for a while: not proven by traffic (an idle pair waits the trial out)
        if self.current is not None and self._stepped_down_at is not None and (
                now - self._stepped_down_at >= STEP_DOWN_TRIAL
                or not self._trial_failed and self._last_rx_current - self._stepped_down_at >= STEP_DOWN_PROVEN):
            self._stepped_down_at = None
            self.probe_interval = BETTER_PROBE  # the step-down held
        # Roaming: the peer evidently sends on another rung and nothing comes on ours (in a
        # search too: the peer may have found the path first, and already sends on it).
        if self.current is not None and stray is not None and stray[0] in self.rungs and stray[0] != self.current \
                and now - stray[1] < FAILING_AFTER and now - self._last_rx_current >= FAILING_AFTER \
                and self._may_change(now):
            return self._switch(stray[0], now, "peer moved")
        if self.searching:
            if now - self._search_started >= GIVE_UP:
                # The peer is not there: the search ends, a failing rung stays where packets go,
                # and the session starts a search again when new traffic asks for the peer.
                self.searching, self._failing, self.gave_up_at = [], None, now
                return actions
            if now >= self._next_widen:
                missing = [r for r in self.rungs if r not in self.searching]
                if missing:
                    self.searching.append(missing[0])
                    self._next_widen = now + (HAPPY_EYEBALLS if len(missing) > 1 else RESEARCH)
                else:
                    self._next_widen = now + RESEARCH
                actions.append(self._probe(self.searching, now))
            return actions
        if self.current is None:
            return actions
        unanswered_since = self._new_unanswered(unanswered_since)
        if unanswered_since is not None:
            unanswered_since = max(unanswered_since, self._switched_at)  # silence on the old rung is not ours
        if unanswered_since is not None and now - unanswered_since >= FAILING_AFTER:
            self.reasons[self.current] = Reason(f"no reply for {FAILING_AFTER:g} s while sending", unanswered_since)
            return self._fail(self.current, now)
        if not self._may_change(now) or self.peer_gone():
            return actions
        better = [r for r in self.rungs if self.rank(r) < self.rank(self.current)]
        if better and now >= self._next_better_probe:
            self._next_better_probe = now + self.probe_interval
            self._returning = better[:1]
            self._next_return_widen = now + HAPPY_EYEBALLS
            actions.append(self._probe(self._returning, now))
        elif self._returning and now >= self._next_return_widen:
            if len(self._returning) < len(better):  # the best did not answer: add the next one
                self._returning.append(better[len(self._returning)])
                self._next_return_widen = now + HAPPY_EYEBALLS
                actions.append(self._probe(self._returning, now))
            else:
                self._returning = []
        return actions

    def probe_better_now(self, now: float) -> tuple[bool, str]:
        """Someone asks (`tunnelmesh tui`, the control `probe` command) for the better-rung
        probe now instead of at `probe_interval`: the next tick sends it, under the same
        rules as a scheduled one (not while searching, not within HOLD, best rung first).
        The back-off is kept: a step-down that fails still doubles the interval. Returns
        (whether a probe is due, what happens, in words)."""
        if self.peer_gone():
            return False, "the peer is unreachable: the search for a path gave up; new traffic starts another"
        if self.current is None:
            return False, "no path yet: the session is still searching for one"
        better = [r for r in self.rungs if self.rank(r) < self.rank(self.current)]
        if not better:
            return False, f"already on the best enabled rung ({LABELS[self.current]})"
        if self.searching:
            return False, f"{LABELS[self.current]} is failing: the session is searching already"
        self._next_better_probe = min(self._next_better_probe, now)
        names = ", ".join(LABELS[r] for r in better)
        if not self._may_change(now):
            assert self.last_change is not None
            return True, f"probing {names} in {self.last_change + HOLD - now:.0f} s (after the hold)"
        return True, f"probing {names} now"

    def revert(self, switch: Switch) -> None:
        """The caller could not carry `switch` out (its path vanished): undo it wholly, as
        if it had not been decided (the search goes on, no hold starts, the rung keeps
        its reason)."""
        if self.current == switch.rung and self._undo is not None:
            for name, value in self._undo.items():
                setattr(self, name, value)
            self._undo = None
            self._answered_at.pop(switch.rung, None)  # its evidence went with its path: not re-decided

    # --- internals ----------------------------------------------------------------------

    def _failing_set(self, rung: str) -> list[str]:
        later = [r for r in self.rungs if self.rank(r) > self.rank(rung)]
        return [rung] + later[:1]

    def _fail(self, rung: str, now: float) -> list[Action]:
        """The current rung fails: search from it and the next one."""
        self._failing = rung
        self._trial_failed = self._stepped_down_at is not None  # a step-down that failed has not held
        return self._search(self._failing_set(rung), now)

    def _search(self, rungs: list[str], now: float) -> list[Action]:
        self.searching = list(rungs)
        self._search_started = now
        self._next_widen = now + HAPPY_EYEBALLS
        return [self._probe(self.searching, now)]

    def _probe(self, rungs: list[str] | tuple[str, ...], now: float) -> Probe:
        for rung in rungs:
            self._probed_at.setdefault(rung, now)
        return Probe(tuple(rungs))

    def _note_unanswered_probes(self, now: float) -> None:
        for rung, at in list(self._probed_at.items()):
            if self._answered_at.get(rung, float("-inf")) >= at:
                del self._probed_at[rung]
            elif now - at >= HAPPY_EYEBALLS:
                del self._probed_at[rung]
                reason = self.reasons.get(rung)
                text = f"no handshake reply in {HAPPY_EYEBALLS:g} s"
                if reason is None:
                    self.reasons[rung] = Reason(text, at)
                elif reason.said < at:  # e.g. "no UDP address known yet" before this probe went out
                    reason.text, reason.said = text, at

    def _new_unanswered(self, unanswered_since: float | None) -> float | None:
        """`unanswered_since`, unless the data it dates from was sent before the last search
        gave up (that search answered it: nothing is there)."""
        return unanswered_since if unanswered_since is not None and unanswered_since > self.gave_up_at else None

    def peer_gone(self) -> bool:
        """A search gave up and nothing came on the current rung since: no better rung to
        probe either, until the peer answers or new traffic searches again."""
        return not self.searching and self.gave_up_at > self._last_rx_current

    def _why(self, rung: str) -> str:
        assert self.current is not None
        if self.rank(rung) < self.rank(self.current):
            return "step down after a probe"
        return f"{self.current} failing" if self._failing == self.current else "peer moved"

    def _held_change(self, now: float) -> str | None:
        """The rung a change held back by HOLD would go to, if still due: its
        answer is fresh, came after the last change, and (for a worse rung)
        the current one has heard nothing since. While the current rung fails,
        any answer since the failure began is fresh: the search re-probes only
        every RESEARCH s and a probe can be lost, so FRESH alone could let the
        hold end between two answers and keep the pair on a dead rung."""
        failing_since = self._search_started if self._failing == self.current and self.searching else float("inf")
        fresh = self._fresh_answers(now, failing_since=failing_since)
        if not fresh:
            return None
        return max(fresh, key=lambda r: self._answered_at[r])

    def _fresh_answers(self, now: float, *, failing_since: float) -> list[str]:
        """The other rungs whose answers could still make a change (see `_held_change`); an
        answer that is not fresh now never is again (the times it is held against only grow)."""
        assert self.current is not None
        current_rank = self.rank(self.current)
        return [r for r, at in self._answered_at.items() if r != self.current
                and (now - at < FRESH or at >= failing_since)
                and at > (self.last_change or float("-inf"))
                and (self.rank(r) < current_rank or at > self._last_rx_current)]

    def _switch(self, rung: str, now: float, why: str) -> list[Action]:
        self._undo = {name: getattr(self, name) for name in _SWITCH_STATE}
        self._undo["searching"] = list(self.searching)
        self._undo["_returning"] = list(self._returning)
        self._undo["reasons"] = dict(self.reasons)
        previous = self.current
        if previous is not None:
            self.changes += 1
            self.last_change = now
            if self.rank(rung) < self.rank(previous):
                self._stepped_down_at, self._trial_failed = now, False
            elif self._stepped_down_at is not None and now - self._stepped_down_at < STEP_DOWN_TRIAL:
                # The step-down failed within its trial: probe the better rung less often.
                self.probe_interval = min(self.probe_interval * 2, MAX_PROBE_INTERVAL)
                self._stepped_down_at = None
        self.current = rung
        self.searching = []
        self._returning = []
        self._failing = None
        self._last_rx_current = now
        self._switched_at = now
        self._next_better_probe = now + self.probe_interval
        self.reasons.pop(rung, None)
        return [Switch(rung, previous, why)]
