"""Hole punching, sans-IO: when a punch's handshake initiations go out, and where.

Both sides of a pair are told to punch by the coordinator's punch notice
(tunnelmesh/coordinator/punch.py), delivered to each through its long poll: the two
notices arrive within a round trip of each other, not at one moment. Each side then sends
WireGuard handshake initiations to the other's UDP candidates. Each side's first packet
opens its own NAT towards the other (a mapping, and a filter entry for the other's
address and port); the other side's packets then pass it. The first candidate a handshake
completes on wins: the session's path selector moves there.

The schedule is anchored at the notice's arrival, not at this side's first send: a side
whose last handshake is under REKEY_TIMEOUT (5 s) old may send its first initiation only
when WireGuard's rate limit ends, so the schedule (a burst, then every REPEAT seconds)
runs WINDOW seconds after the notice, longer than that wait plus the notices' skew: the
two sides' windows overlap whichever of them waited. Steps that fell in the wait go out
once, when it ends.

A NAT that maps per destination ("hard": a symmetric NAT) gives its node a new port for
us, not the one STUN servers saw. Facing such a peer from an easy NAT, this side also
sprays its outstanding initiation at ports the peer's mapping towards us may have: first
the other ports of the aligned 1024-port block that holds each of the peer's reflexive
ports (carrier-grade NATs give a subscriber such a block, RFC 7422: a prediction), nearest
first; then, in a sweep, the rest of the ephemeral range (LOWEST_PORT-65535) by distance
from the reflexive port (a NAT that picks any port at random: Linux's `masquerade
random,fully-random`). A guess that hits the peer's mapping towards us passes its NAT, and
ours opens our NAT's filter for the peer's own initiations from there.

Bounds: at most SPRAY_LIMIT (64,512) addresses per punch, SPRAY_BATCH (200) every
SPRAY_STEP (0.1 s): 2,000 packets a second; the block takes about 0.5 s, a sweep about
32 s. The block goes with every punch; a sweep at most once per SWEEP_EVERY (3) probe
intervals per peer (`sweep_due`; the session keeps the time), so that a pair that cannot
go direct does not send 64k packets every probe interval. The spray ends at the first UDP
handshake (the session ends the punch).

Meanwhile the hard side must keep its mapping towards us alive (an unanswered UDP mapping
lasts 30 s on Linux) and in place (a new destination would get another port): during a
punch where this side is hard and the peer easy, the initiation (the outstanding one, or a
new one when REKEY_TIMEOUT allows) goes to the peer's candidates every REPEAT seconds for
KEEP_OPEN seconds, the longest the peer's sweep can run after its notice.
Two hard NATs are left alone: each would have to guess the other's port.

Time is passed in; the session actor (actors/session.py) sends what `due` returns.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from itertools import chain, islice

from tunnelmesh.nat.report import ADDRESS_AND_PORT_DEPENDENT, ADDRESS_DEPENDENT, UNKNOWN, NatReport, PeerNat
from tunnelmesh.wireguard.constants import REKEY_TIMEOUT

Address = tuple[str, int]

#: Seconds after the notice at which the initiation goes to every candidate: a burst
#: (loss), then every REPEAT seconds until WINDOW (over REKEY_TIMEOUT plus the notices' skew).
BURST = (0.0, 0.1, 0.3, 0.7, 1.5)
REPEAT = 1.5
WINDOW = 7.5
#: The spray: which ports (a NAT maps to none below LOWEST_PORT), the aligned block
#: predicted first, how many at most, how many at a time and how often.
LOWEST_PORT = 1024
BLOCK = 1024
SPRAY_LIMIT = 65535 - LOWEST_PORT + 1
SPRAY_BATCH = 200
SPRAY_STEP = 0.1
SWEEP_SECONDS = math.ceil(SPRAY_LIMIT / SPRAY_BATCH) * SPRAY_STEP  # ~32.3 s
#: A sweep of the whole range at most once per this many probe intervals, per peer.
SWEEP_EVERY = 3
#: How long a hard side keeps its mapping towards an easy peer open: the peer's sweep may
#: start REKEY_TIMEOUT after its notice (WireGuard's rate limit), and notices arrive apart.
KEEP_OPEN = REKEY_TIMEOUT + SWEEP_SECONDS + 2.0  # ~39 s


def _steps(until: float) -> tuple[float, ...]:
    return BURST + tuple(BURST[-1] + REPEAT * i for i in range(1, int((until - BURST[-1]) / REPEAT + 1e-9) + 1))


SCHEDULE = _steps(WINDOW)  # 0, 0.1, 0.3, 0.7, 1.5, 3, 4.5, 6, 7.5
KEEP_OPEN_SCHEDULE = _steps(KEEP_OPEN)

_HARD = (ADDRESS_DEPENDENT, ADDRESS_AND_PORT_DEPENDENT)


def _own_hard(own: NatReport | None) -> bool:
    return own is not None and own.mapping in _HARD


def _nearest(anchor: int, low: int, high: int) -> Iterator[int]:
    """The ports low..high but `anchor`, nearest to `anchor` first (above, then below)."""
    for distance in range(1, max(anchor - low, high - anchor) + 1):
        for port in (anchor + distance, anchor - distance):
            if low <= port <= high:
                yield port


def spray_targets(own: NatReport | None, peer: PeerNat, *, sweep: bool = False) -> Iterator[Address]:
    """Where a punch sprays, lazily (a sweep is 64k addresses): when the peer's NAT maps
    per destination and ours does not, the aligned block of each of the peer's reflexive
    ports, nearest first; with `sweep`, then the rest of the range from LOWEST_PORT up,
    nearest to the reflexive port first. Each address once, the reflexive ones never (they
    are candidates already); SPRAY_LIMIT at most. Nothing otherwise."""
    if not peer.hard or not peer.reflexive or _own_hard(own):
        return iter(())
    reflexive = set(peer.reflexive)
    anchors: dict[tuple[str, int], int] = {}  # (host, block start) -> the first reflexive port in it
    for host, port in peer.reflexive:
        anchors.setdefault((host, port - port % BLOCK), port)
    blocks = (((host, port) for port in _nearest(anchor, max(start, LOWEST_PORT), min(start + BLOCK - 1, 65535))
               if (host, port) not in reflexive)
              for (host, start), anchor in anchors.items())
    sweeps: Iterable[Iterator[Address]] = ()
    if sweep:
        hosts = dict.fromkeys(host for host, _ in peer.reflexive)  # in order, once each
        sweeps = (((host, port) for port in _nearest(anchor, LOWEST_PORT, 65535)
                   if (host, port - port % BLOCK) not in anchors)
                  for host, anchor in ((h, next(p for x, p in peer.reflexive if x == h)) for h in hosts))
    return islice(chain(chain.from_iterable(blocks), chain.from_iterable(sweeps)), SPRAY_LIMIT)


def sweep_due(last_sweep: float, now: float, probe_interval: float) -> bool:
    """Whether a punch may sweep the whole range: the last sweep towards this peer began
    SWEEP_EVERY probe intervals ago or more."""
    return now - last_sweep >= SWEEP_EVERY * probe_interval


def keeps_open(own: NatReport | None, peer: PeerNat) -> bool:
    """Whether this side, behind a NAT that maps per destination, keeps its mapping towards
    an easy peer open for the peer's spray (KEEP_OPEN seconds of initiations)."""
    return _own_hard(own) and peer.mapping != UNKNOWN and not peer.hard


def why_not_direct(own: NatReport | None, peer: PeerNat) -> str | None:
    """What the two NATs say of a direct path, in words, when they explain its absence."""
    if _own_hard(own) and peer.hard:
        return "both behind NATs that map per destination"
    if own is not None and own.checked_at is not None and not own.udp_works:
        return "this node's UDP gets no answer from STUN servers"
    return None


@dataclass(slots=True)
class Punch:
    """One punch, told at `notice` (the schedule's anchor) and able to send from `start`
    (WireGuard's rate limit) towards `candidates`, on `schedule`, spraying `spray`
    (guessed addresses, taken SPRAY_BATCH at a time) on the side from `start`."""

    notice: float
    start: float
    candidates: tuple[Address, ...]
    spray: Iterator[Address] = field(default_factory=lambda: iter(()))
    schedule: tuple[float, ...] = SCHEDULE
    _step: int = 0  # the next schedule entry
    _batch: tuple[Address, ...] = ()  # the spray's next batch, taken ahead to know whether it is over
    _next_spray: float = 0.0

    def __post_init__(self) -> None:
        self._batch = tuple(islice(self.spray, SPRAY_BATCH))
        self._next_spray = self.start

    @property
    def spraying(self) -> bool:
        return bool(self._batch)

    def spray_left(self) -> Iterator[Address]:
        """What this punch has not sprayed yet (a new notice's punch goes on with it)."""
        batch, self._batch = self._batch, ()
        return chain(batch, self.spray)

    @property
    def next_at(self) -> float | None:
        """When `due` has something next; None when the punch is over."""
        times = []
        if self._step < len(self.schedule):
            times.append(max(self.start, self.notice + self.schedule[self._step]))
        if self._batch:
            times.append(self._next_spray)
        return min(times) if times else None

    def due(self, now: float) -> tuple[tuple[Address, ...], tuple[Address, ...]]:
        """What goes out now: (candidates, or () between the schedule's steps; the next
        batch of sprayed addresses, or ()). Steps missed while late go out once."""
        candidates: tuple[Address, ...] = ()
        if now >= self.start:
            while self._step < len(self.schedule) and now >= self.notice + self.schedule[self._step]:
                self._step += 1
                candidates = self.candidates
        batch: tuple[Address, ...] = ()
        if self._batch and now >= self._next_spray:
            batch, self._batch = self._batch, tuple(islice(self.spray, SPRAY_BATCH))
            self._next_spray = now + SPRAY_STEP
        return candidates, batch
