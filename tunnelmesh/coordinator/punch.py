"""Coordinated hole punching: `POST /v1/punch` and the notices the map long-poll carries.

A member whose session with a peer has no direct path asks `POST /v1/punch
{"peer": <the peer's WireGuard key>}` (member-signed, like /v1/register). The
coordinator puts a notice in both members' inboxes and wakes their long-polls at
once, so both start sending handshake initiations at the same moment, each
opening its own NAT for the other's (tunnelmesh/punch.py, the node's side).

A node says it takes notices by long-polling `GET /v1/map?...&punch=1`; its reply
then carries `"punch": [{"peer": <key>}, ...]` when there are any. A node that never
says so gets replies without the key (its map parser refuses unknown keys), and is
never asked to punch: a request naming it is refused (409).

Coordinators on one PostgreSQL database: a request naming a peer that long-polls
another coordinator is announced to them (NOTIFY, tunnelmesh.coordinator.store), and the
one the peer polls puts the notice in its inbox (`PunchBoard.notice`) and wakes it.

Bounded, in memory only, nothing persisted: at most INBOX notices wait per member,
each for NOTICE_TTL s; one punch per pair per PAIR_INTERVAL s (a second request in
that time, from either side, is answered as already told); at most NODE_LIMIT
requests per member per NODE_WINDOW s (429 past that).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web

from tunnelmesh.membership import MembershipError, b64, unb64

from . import bodies
from .guards import Refused

if TYPE_CHECKING:
    from .service import _Service

INBOX = 16
NOTICE_TTL = 10.0
PAIR_INTERVAL = 5.0
NODE_LIMIT = 30
NODE_WINDOW = 60.0
#: A member takes notices while its last `punch=1` long-poll is at most this old
#: (a long-poll is held 30 s at most and the next follows at once).
TAKER_GRACE = 40.0


class PunchBoard:
    """The inboxes, the takers, and the rate limits; time passed in (monotonic)."""

    def __init__(self) -> None:
        self._takers: dict[str, float] = {}  # member key -> its last punch=1 long-poll
        self._inbox: dict[str, deque[tuple[float, dict[str, Any]]]] = {}
        self._pairs: dict[frozenset[str], float] = {}  # pair -> when it was last told
        self._asked: dict[str, deque[float]] = {}  # member -> its recent requests

    def polled(self, key: str, now: float) -> None:
        self._takers[key] = now

    def takes(self, key: str, now: float) -> bool:
        return now - self._takers.get(key, float("-inf")) <= TAKER_GRACE

    def ask(self, key: str, peer: str, now: float, *, peer_here: bool = True) -> bool:
        """`key` asks for a punch with `peer` (both members, checked by the caller).
        Whether both were told now (False: they were, under PAIR_INTERVAL ago). With
        `peer_here` False the peer long-polls another coordinator on the same database:
        only `key` is told here, and the caller announces the request to the others."""
        if peer == key:
            raise Refused(400, "a node cannot punch towards itself")
        if not self.takes(key, now):
            raise Refused(409, "long-poll the map with punch=1 first: the notice for this node comes there")
        if peer_here and not self.takes(peer, now):
            raise Refused(409, "that peer is not connected to the coordinator, or its daemon takes no punch notices "
                               "(an older version)")
        asked = self._asked.setdefault(key, deque(maxlen=NODE_LIMIT))
        if len(asked) >= NODE_LIMIT and now - asked[0] < NODE_WINDOW:
            raise Refused(429, f"at most {NODE_LIMIT} punch requests per {NODE_WINDOW:g} s from one node")
        asked.append(now)
        self._pairs = {pair: at for pair, at in self._pairs.items() if now - at < PAIR_INTERVAL}
        pair = frozenset((key, peer))
        if pair in self._pairs:
            return False
        self._pairs[pair] = now
        self.notice(key, peer, now)
        if peer_here:
            self.notice(peer, key, now)
        return True

    def notice(self, key: str, peer: str, now: float) -> bool:
        """Put a notice "punch towards `peer`" in `key`'s inbox, if `key` takes notices here
        (for a request made through another coordinator: whether it was put)."""
        if not self.takes(key, now):
            return False
        self._inbox.setdefault(key, deque(maxlen=INBOX)).append((now, {"peer": peer}))
        return True

    def waiting(self, key: str, now: float) -> bool:
        return any(now - at < NOTICE_TTL for at, _ in self._inbox.get(key, ()))

    def take(self, key: str, now: float) -> list[dict[str, Any]]:
        """The fresh notices for `key`, removed from its inbox."""
        inbox = self._inbox.pop(key, None)
        return [notice for at, notice in inbox or () if now - at < NOTICE_TTL]


def take_notices(update: Any) -> tuple[list[bytes], int]:
    """The node's side: the peers' keys a map reply's "punch" notices name (at most INBOX),
    with the notices removed from the reply (the peer map's parser takes no such key),
    and how many were malformed and dropped."""
    if not isinstance(update, dict) or "punch" not in update:
        return [], 0
    notices = update.pop("punch")
    if not isinstance(notices, list):
        return [], 1
    keys, dropped = [], max(0, len(notices) - INBOX)
    for notice in notices[:INBOX]:
        try:
            if not isinstance(notice, dict) or notice.keys() != {"peer"}:
                raise MembershipError("not a notice")
            keys.append(unb64(notice["peer"], "peer", 32))
        except MembershipError:
            dropped += 1
    return keys, dropped


def handler(service: _Service, wake: Callable[[], None]) -> Callable[[web.Request], Any]:
    """POST /v1/punch over `service` (its member check and store); `wake` wakes long-polls."""

    async def punch(request: web.Request) -> web.Response:
        member, raw = await service._member(request)
        body = bodies.parse(raw)
        bodies.body_field.keys(body, {"peer"}, "the body")
        with bodies.status(400):
            peer_key = b64(unb64(body["peer"], "peer", 32))
        peer = await service.store.member(peer_key)
        if peer is None or peer.is_device:
            raise Refused(404, "no member with that key (a plain WireGuard device cannot punch)")
        now = service.monotonic()
        # On a shared database the peer may long-poll another coordinator: told through it.
        elsewhere = service.store.shared and not service.punches.takes(peer_key, now)
        told = service.punches.ask(member.wg_key, peer_key, now, peer_here=not elsewhere)
        if told:
            if elsewhere:
                await service.store.announce_punch(member.wg_key, peer_key)
            wake()
        return web.json_response({"told": told})

    return punch
