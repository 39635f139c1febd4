"""Connection tracking: a bounded flow table with timer-wheel expiry (sans-IO, time
passed in).

A flow is keyed ``(peer key, IP version, protocol, remote address, local address,
remote port, local port)`` (ICMP echo: the identifier as both ports), so a packet and
its reply find the same flow whichever way they travel. A `Flow` remembers who
opened it (`outbound`: this node), its state and when it expires.

States and idle timeouts (seconds; refreshed by every packet of the flow):

    TCP  OPENING      120   SYN seen, no answer yet (Linux nf_conntrack syn_sent)
         ESTABLISHED 7440   any answer (RFC 5382 REQ-5: at least 2 h 4 min; Linux's
                            5 days would keep dead flows in a bounded table for days,
                            nebula's 12 min cuts idle SSH sessions)
         CLOSING      120   FIN seen either way (Linux fin_wait / time_wait)
         CLOSED        10   RST seen (Linux close); a new SYN from the opener reopens
    UDP  OPENING       30   one way only (Linux udp_timeout)
         ESTABLISHED  180   answered (RFC 4787 REQ-5: at least 2 min; nebula 3 min)
    ICMP echo          30   (Linux icmp_timeout)

Bounded memory: at most `limit` flows, and at most `peer_limit` of them opened by any
one peer (default: limit // 8, at least 256), so that one peer cannot fill the table
and starve this node's own flows and the other peers'. Flows this node opens count
against `limit` only. `add` refuses (returns None) when the table, or the opening
peer's share of it, is full after reaping expired flows; the caller drops that new
flow and counts it (`peer_full` tells which limit refused it).

Bounded work: a timer wheel of one-second slots (as nebula's conntrack timer wheel).
Each flow sits in exactly one slot, at or before its expiry; a packet only moves the
flow's `expires` forward (no wheel work on the common path). `expire(now, budget)`
visits at most `budget` slots or flows: a visited flow that was refreshed moves to
the slot of its new expiry, an expired one is deleted. A timeout that shortens (FIN,
RST) moves the flow at once, so a closed flow does not linger for the long timeout.
A lookup that finds an expired flow treats it as gone.
"""

from __future__ import annotations

from collections.abc import Hashable

from tunnelmesh.filter.packet import ACK, FIN, RST, SYN, TCP, UDP

OPENING, ESTABLISHED, CLOSING, CLOSED = 0, 1, 2, 3
TCP_TIMEOUTS = (120.0, 7440.0, 120.0, 10.0)  # by state
UDP_TIMEOUTS = (30.0, 180.0)
ICMP_TIMEOUT = 30.0

DEFAULT_LIMIT = 65_536
#: Wheel work done by each `add`: keeps expiry moving with the traffic even if the
#: caller never calls `expire` itself.
ADD_BUDGET = 4
#: Wheel work before a full table refuses a flow.
FULL_BUDGET = 256
#: The smallest per-peer share of the table (the default is limit // 8).
MIN_PEER_LIMIT = 256
SLOT = 1.0  # seconds per wheel slot


class Flow:
    __slots__ = ("key", "peer", "proto", "state", "timeout", "expires", "generation", "revoked", "slot")

    def __init__(self, key: Hashable, peer: Hashable | None, proto: int, state: int, now: float,
                 generation: int) -> None:
        self.key = key
        self.peer = peer  # the peer that opened it, counted in its share; None: this node
        self.proto = proto
        self.state = state
        self.timeout = TCP_TIMEOUTS[state] if proto == TCP else UDP_TIMEOUTS[state] if proto == UDP else ICMP_TIMEOUT
        self.expires = now + self.timeout
        self.generation = generation  # the rule set it was last checked against
        self.revoked = False  # the rules no longer allow it: dropped both ways till idle
        self.slot = int(self.expires // SLOT)

    @property
    def outbound(self) -> bool:
        """Opened by this node."""
        return self.peer is None


class FlowTable:
    """The flows, at most `limit` of them, and the wheel that expires them."""

    def __init__(self, limit: int = DEFAULT_LIMIT, peer_limit: int | None = None) -> None:
        if limit < 1:
            raise ValueError("a flow table needs room for at least one flow")
        if peer_limit is not None and peer_limit < 1:
            raise ValueError("a peer's share of the flow table needs room for at least one flow")
        self.limit = limit
        self.peer_limit = max(MIN_PEER_LIMIT, limit // 8) if peer_limit is None else peer_limit
        self.flows: dict[Hashable, Flow] = {}
        self.by_peer: dict[Hashable, int] = {}  # flows each peer opened
        self._wheel: dict[int, set[Flow]] = {}
        self._cursor: int | None = None  # the oldest slot not yet swept

    def __len__(self) -> int:
        return len(self.flows)

    def get(self, key: Hashable, now: float) -> Flow | None:
        flow = self.flows.get(key)
        if flow is not None and flow.expires <= now:
            self.remove(flow)
            return None
        return flow

    def add(self, key: Hashable, peer: Hashable | None, proto: int, now: float, generation: int,
            state: int = OPENING) -> Flow | None:
        """A new flow opened by `peer` (None: by this node), or None when the table or
        the peer's share is full (the caller drops and counts)."""
        self.expire(now, ADD_BUDGET)
        if len(self.flows) >= self.limit or self.peer_full(peer):
            self.expire(now, FULL_BUDGET)
            if len(self.flows) >= self.limit or self.peer_full(peer):
                return None
        flow = Flow(key, peer, proto, state, now, generation)
        self.flows[key] = flow
        if peer is not None:
            self.by_peer[peer] = self.by_peer.get(peer, 0) + 1
        self._wheel.setdefault(flow.slot, set()).add(flow)
        return flow

    def peer_full(self, peer: Hashable | None) -> bool:
        """Whether `peer` has opened its whole share of the table (this node: never)."""
        return peer is not None and self.by_peer.get(peer, 0) >= self.peer_limit

    def touch(self, flow: Flow, from_opener: bool, flags: int, now: float) -> None:
        """A packet of `flow`: its state moves on and its idle timer restarts."""
        state = flow.state
        if flow.proto == TCP:
            if flags & RST:
                state = CLOSED
            elif flags & FIN:
                state = CLOSED if state == CLOSED else CLOSING
            elif state == OPENING and not from_opener:
                state = ESTABLISHED
            elif state >= CLOSING and from_opener and flags & (SYN | ACK) == SYN:
                state = OPENING  # the opener reuses the ports for a new connection
        elif flow.proto == UDP and not from_opener:
            state = ESTABLISHED
        if state != flow.state:
            flow.state = state
            old = flow.timeout
            flow.timeout = TCP_TIMEOUTS[state] if flow.proto == TCP else UDP_TIMEOUTS[state]
            if flow.timeout < old:
                flow.expires = now + flow.timeout
                self._move(flow)
                return
        flow.expires = now + flow.timeout

    def remove(self, flow: Flow) -> None:
        self._forget(flow)
        bucket = self._wheel[flow.slot]
        bucket.discard(flow)
        if not bucket:
            del self._wheel[flow.slot]

    def expire(self, now: float, budget: int) -> int:
        """Sweep at most `budget` slots or flows whose slot has passed; returns how
        many flows were deleted."""
        target = int(now // SLOT)
        if self._cursor is None or not self.flows:
            self._cursor = target  # nothing to sweep: skip any gap at no cost
            self._wheel.clear()  # only emptied slots can be left
            return 0
        removed = 0
        wheel = self._wheel
        while budget > 0 and self._cursor < target:
            budget -= 1
            bucket = wheel.get(self._cursor)
            if not bucket:
                wheel.pop(self._cursor, None)
                self._cursor += 1
                continue
            flow = bucket.pop()
            if flow.expires <= now:
                self._forget(flow)
                removed += 1
            else:  # refreshed since it was placed: to the slot of its expiry (> cursor)
                flow.slot = int(flow.expires // SLOT)
                wheel.setdefault(flow.slot, set()).add(flow)
        return removed

    def _forget(self, flow: Flow) -> None:
        del self.flows[flow.key]
        peer = flow.peer
        if peer is not None:
            left = self.by_peer[peer] - 1
            if left:
                self.by_peer[peer] = left
            else:
                del self.by_peer[peer]

    def _move(self, flow: Flow) -> None:
        bucket = self._wheel[flow.slot]
        bucket.discard(flow)
        if not bucket:
            del self._wheel[flow.slot]
        flow.slot = int(flow.expires // SLOT)
        self._wheel.setdefault(flow.slot, set()).add(flow)
