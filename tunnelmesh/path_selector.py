"""One peer's path selector, sans-IO: where its packets go, and why.

The protocol core sends where it is told (`Peer.endpoint`) and reports where
authenticated messages came from: `HandshakeCompleted.source`, `NewSource`, and
`Peer.endpoint_rx_at` / `other_source` / `other_at`. This decides, with time
passed in. It owns the peer's transport ladder (tunnelmesh.ladder: which rung, when
to probe, failure detection), the UDP addresses the peer may be at (the
coordinator's candidates and what handshakes proved), the evidence per rung (where
a handshake last came from on it), roaming within a rung, the rungs the config
allows, and the last few path changes.

It never touches the core or a link: the session actor (actors/session.py) feeds
it, resolves a rung to a live endpoint (a UDP address, an SSH link it may have to
dial, a connected relay's link), and is the one writer of `Peer.endpoint`.
Endpoints are opaque here except for their rung: a UDP address is a tuple, a
link has a `rung` (and `closed`).
"""

from __future__ import annotations

from dataclasses import dataclass

from tunnelmesh import ladder as rungs
from tunnelmesh.config import UDP_ONLY, RungChoice
from tunnelmesh.ladder import Action, Ladder, Probe, Switch

Address = tuple[str, int]
TRANSITIONS_KEPT = 8

__all__ = ["PathSelector", "Transition", "rung_of", "describe", "Probe", "Switch"]


def rung_of(endpoint: object) -> str:
    return rungs.UDP if isinstance(endpoint, tuple) else endpoint.rung  # type: ignore[attr-defined]


def show_address(endpoint: object) -> str:
    if isinstance(endpoint, tuple) and len(endpoint) >= 2:
        host, port = endpoint[0], endpoint[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(endpoint)


def describe(endpoint: object) -> str:
    """How a path reads in logs: "udp 192.0.2.2:51820", "ssh 192.0.2.2:2222", ..."""
    return f"udp {show_address(endpoint)}" if isinstance(endpoint, tuple) \
        else str(getattr(endpoint, "description", endpoint))


@dataclass(frozen=True, slots=True)
class Transition:
    """One change of rung: to `rung` from `previous`, over `endpoint`, why, when (wall)."""

    rung: str
    previous: str
    endpoint: str
    why: str
    at: float


class PathSelector:
    def __init__(self, choice: RungChoice = UDP_ONLY, *,
                 candidates: tuple[Address, ...] = ()) -> None:
        unusable = {r: "disabled in the config" for r in rungs.RUNGS if r not in choice.rungs}
        if choice.force is not None:
            unusable.update({r: f"the config forces {choice.force}" for r in rungs.RUNGS if r != choice.force})
        self.ladder = Ladder(choice.enabled, unusable=unusable)
        #: Whether the config keeps this peer off some rungs (then the core checks `allows`
        #: per message: a forced or disabled rung is neither sent nor answered on).
        self.restricted = set(choice.enabled) != set(rungs.RUNGS)
        self.udp_address: Address | None = candidates[0] if candidates else None  # where its UDP port is, as far as known
        self.candidates: tuple[Address, ...] = candidates  # every address it may be at, best first
        self._evidence: dict[str, object] = {}  # rung -> where a handshake last came from on it
        self._other_taken = float("-inf")
        self.transitions: tuple[Transition, ...] = ()

    def allows(self, endpoint: object) -> bool:
        """Whether the config lets this peer's traffic use `endpoint`'s rung."""
        return rung_of(endpoint) in self.ladder.rungs

    @property
    def udp_allowed(self) -> bool:
        return rungs.UDP in self.ladder.rungs

    # --- what the core reported ---------------------------------------------------------

    def handshake(self, source: object, now: float) -> list[Action]:
        """A handshake completed with `source` as its proof."""
        rung = rung_of(source)
        self._evidence[rung] = source
        if rung == rungs.UDP:
            self.udp_address = source  # type: ignore[assignment]
        return self.ladder.handshake(rung, now)

    def roam(self, source: object, current: object | None) -> bool:
        """An authenticated message came from `source`, not the current endpoint: whether the
        send path follows it. Within a rung it does, as in WireGuard (a new NAT mapping, a
        reconnected link); to another rung only the ladder moves it (there it is evidence,
        weighed at the next tick)."""
        if current is not None and rung_of(source) != rung_of(current):
            return False
        if not self.allows(source):
            return False
        if isinstance(source, tuple):
            self.udp_address = source
        return True

    # --- what the coordinator said ------------------------------------------------------

    def set_candidates(self, addresses: tuple[Address, ...], *, up: bool, current: object | None) -> Address | None:
        """The coordinator's latest list of where the peer's UDP port may be. Returns the
        address to send to now, if any: only while the session is not up (an endpoint
        learnt from authenticated packets is never overridden) and only on UDP."""
        self.candidates = addresses
        if up or not addresses:
            return None
        first = addresses[0]
        self.udp_address = first
        if (current is None or isinstance(current, tuple)) and current != first and self.allows(first):
            return first
        return None

    # --- the ladder -----------------------------------------------------------------------

    def udp_targets(self) -> list[Address]:
        """Every address a UDP probe goes to: the one known to work first, then the candidates."""
        known = (self.udp_address,) if self.udp_address is not None else ()
        return list(dict.fromkeys(known + self.candidates))

    def start(self, current: object | None, now: float) -> list[Action]:
        if isinstance(current, tuple):
            self.udp_address = current
        return self.ladder.start(now)

    def tick(self, now: float, *, current: object | None, unanswered_since: float | None,
             received_on_current: float, other: object | None, other_at: float,
             handshaking: bool) -> tuple[list[Action], bool]:
        """Once a second. Returns the ladder's actions, and whether the search for a path
        gave up (then the caller stops the core's retries until new traffic asks)."""
        stray = _stray(current, other, other_at)
        if stray is not None:
            if other_at > self._other_taken:  # only newer than what was taken: never a stale address
                self._other_taken = other_at
                self._evidence[stray[0]] = other
        actions: list[Action] = []
        ladder = self.ladder
        if ladder.current is None and not ladder.searching and handshaking:
            actions += ladder.start(now)  # the search gave up; traffic wants the peer again
        searching = bool(ladder.searching)
        actions += ladder.tick(now, unanswered_since=unanswered_since, received_on_current=received_on_current,
                               stray=stray)
        return actions, searching and ladder.gave_up_at == now

    def at_rest(self, now: float, *, current: object | None, unanswered_since: float | None,
                other: object | None, other_at: float, handshaking: bool) -> bool:
        """Whether ticks can do nothing until the next input (Ladder.at_rest); the
        arguments are `tick`'s."""
        if handshaking and self.ladder.current is None:
            return False  # traffic wants the peer: the next tick starts the search
        return self.ladder.at_rest(now, unanswered_since=unanswered_since, stray=_stray(current, other, other_at))

    def unavailable(self, rung: str, reason: str, now: float) -> list[Action]:
        return self.ladder.unavailable(rung, reason, now)

    def revert(self, action: Switch) -> None:
        """The caller could not make `action` (its path closed since): as if it never came."""
        self.ladder.revert(action)

    @property
    def changes(self) -> int:
        return self.ladder.changes

    @property
    def probe_interval(self) -> float:
        """Seconds between probes of better rungs (doubled after failed step-downs)."""
        return self.ladder.probe_interval

    def evidence(self, rung: str) -> object | None:
        """Where a handshake last came from on `rung`, if that path is still open."""
        endpoint = self._evidence.get(rung)
        return None if endpoint is None or getattr(endpoint, "closed", False) else endpoint

    def switched(self, action: Switch, endpoint: object, wall: float) -> Transition | None:
        """The caller moved the endpoint as `action` said: note it (None for the first choice)."""
        if isinstance(endpoint, tuple):
            self.udp_address = endpoint  # e.g. followed to a new address: UDP probes go there now
        if action.previous is None:
            return None
        change = Transition(action.rung, action.previous, describe(endpoint), action.why, wall)
        self.transitions = (self.transitions + (change,))[-TRANSITIONS_KEPT:]
        return change

    def why_not_better(self, now: float) -> list[tuple[str, str, float | None]]:
        return self.ladder.why_not_better(now)


def _stray(current: object | None, other: object | None, other_at: float) -> tuple[str, float] | None:
    """The rung and time of the last authenticated packet that came on another rung than
    the current one's, if any (the core's `other_source`, `other_at`)."""
    if other is not None and (current is None or rung_of(other) != rung_of(current)):
        return rung_of(other), other_at
    return None
