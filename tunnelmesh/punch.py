"""Hole punching, sans-IO: when a punch's handshake initiations go out, and where.

Both sides of a pair are told at the same moment (the coordinator's punch notice,
tunnelmesh/coordinator/punch.py) to send WireGuard handshake initiations to each
other's UDP candidates. Each side's first packet opens its own NAT towards the other
(a mapping, and a filter entry for the other's address and port); the other side's
packets, sent on the same schedule, then pass it. A few retries over three seconds
cover loss and the two notices arriving a round trip apart. The first candidate a
handshake completes on wins: the session's path selector moves there.

A NAT that maps per destination ("hard": a symmetric NAT) gives its node a new port
for us, not the one STUN servers saw. Facing such a peer from an easy NAT, this side
also sprays the outstanding initiation at the other ports of the aligned 1024-port
block that holds each of the peer's reflexive ports (carrier-grade NATs give a
subscriber such a block; RFC 7422), nearest first: the peer's own initiations to us
opened one of them, and ours to it opens our NAT's filter for it. Bounded: at most
SPRAY_PORTS ports per punch, in batches of SPRAY_BATCH every SPRAY_STEP seconds (a
punch sprays for about 1.6 s).
Two hard NATs are left alone: each would have to guess the other's port.

Time is passed in; the session actor (actors/session.py) sends what `due` returns.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tunnelmesh.nat.report import ADDRESS_AND_PORT_DEPENDENT, ADDRESS_DEPENDENT, NatReport, PeerNat

Address = tuple[str, int]

#: Seconds after the notice at which the initiation goes to every candidate again.
SCHEDULE = (0.0, 0.1, 0.3, 0.7, 1.5, 3.0)
#: The spray: how many ports at most (a symmetric NAT in the lab takes its ports from a
#: 1024-port block), how many at a time, and how often.
SPRAY_PORTS = 1024
SPRAY_BATCH = 64
SPRAY_STEP = 0.1
LOWEST_PORT = 1024  # NATs do not map to privileged ports

_HARD = (ADDRESS_DEPENDENT, ADDRESS_AND_PORT_DEPENDENT)


def spray_targets(own: NatReport | None, peer: PeerNat) -> tuple[Address, ...]:
    """Where a punch sprays: ports near the peer's reflexive ones, nearest first, when
    the peer's NAT maps per destination and ours does not; nothing otherwise."""
    if not peer.hard or not peer.reflexive or (own is not None and own.mapping in _HARD):
        return ()
    seen: set[Address] = set(peer.reflexive)  # the reflexive ports themselves are candidates already
    out: list[Address] = []
    for distance in range(1, SPRAY_PORTS):
        for host, port in peer.reflexive:
            block = port - port % SPRAY_PORTS  # NATs that give out port blocks align them
            for guess in (port + distance, port - distance):
                if block <= guess < block + SPRAY_PORTS and LOWEST_PORT <= guess <= 65535 \
                        and (host, guess) not in seen:
                    seen.add((host, guess))
                    out.append((host, guess))
                    if len(out) >= SPRAY_PORTS:
                        return tuple(out)
    return tuple(out)


def why_not_direct(own: NatReport | None, peer: PeerNat) -> str | None:
    """What the two NATs say of a direct path, in words, when they explain its absence."""
    own_hard = own is not None and own.mapping in _HARD
    if own_hard and peer.hard:
        return "both behind NATs that map per destination"
    if own is not None and own.checked_at is not None and not own.udp_works:
        return "this node's UDP gets no answer from STUN servers"
    return None


@dataclass(slots=True)
class Punch:
    """One punch: started at `started` (the notice's arrival) towards `candidates`,
    spraying `spray` (ports guessed) on the side."""

    started: float
    candidates: tuple[Address, ...]
    spray: tuple[Address, ...] = ()
    _step: int = 0  # the next SCHEDULE entry
    _sprayed: int = 0  # how many of `spray` went out
    _next_spray: float = field(init=False)

    def __post_init__(self) -> None:
        self._next_spray = self.started

    @property
    def next_at(self) -> float | None:
        """When `due` has something next; None when the punch is over."""
        times = []
        if self._step < len(SCHEDULE):
            times.append(self.started + SCHEDULE[self._step])
        if self._sprayed < len(self.spray):
            times.append(self._next_spray)
        return min(times) if times else None

    def due(self, now: float) -> tuple[tuple[Address, ...], tuple[Address, ...]]:
        """What goes out now: (candidates, or () between the schedule's steps; the next
        batch of sprayed ports, or ()). Steps missed while late go out once."""
        candidates: tuple[Address, ...] = ()
        while self._step < len(SCHEDULE) and now >= self.started + SCHEDULE[self._step]:
            self._step += 1
            candidates = self.candidates
        batch: tuple[Address, ...] = ()
        if self._sprayed < len(self.spray) and now >= self._next_spray:
            batch = self.spray[self._sprayed:self._sprayed + SPRAY_BATCH]
            self._sprayed += len(batch)
            self._next_spray = now + SPRAY_STEP
        return candidates, batch
