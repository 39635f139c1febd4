"""The device: one static key, many peers, one receiver-index table.

Inbound flow (the caller holds a datagram from any transport):

1. `Device.receive` looks at the type. A transport message (type 4) goes
   straight to the keypair its receiver index names; it is decrypted into the
   caller's buffer, and only then checked against the replay window. The
   inner packet is trimmed to its IP length and its source must route back
   to the same peer in the allowed-IPs table (cryptokey routing). The return value is the number
   of plaintext bytes to write to the TUN device, 0 if none.
2. Handshake messages must carry a valid mac1. Under load (an input: the
   caller knows its backlog), they must also carry a valid mac2, or they are
   answered with a cookie reply and not processed; those with a valid mac2 then
   pass the per-source token buckets of `handshake_limiter` (wireguard-go's
   ratelimiter, at the same place in its receive path), or are dropped. The
   source is the UDP address (IPv4, or an IPv6 /64), or for a link (SSH,
   relay) the peer it authenticated: one member cannot use up another's.
   Transport messages never touch the limiter.
3. An initiation is matched to a peer only after its static key decrypts; a
   response and a cookie reply by their receiver index.

Anything to send is appended to `transmits` as (datagram, endpoint); events
go to `events`; every dropped datagram is counted in `drops` by reason, and
once the peer it is for is known (a receiver index, an initiation's static key)
also in that `Peer.drops`: for a message that has not authenticated yet that is
the peer it names, not a proven sender.
Nothing here reads a clock, opens a socket or awaits: `now` (monotonic
seconds) and `wall` (Unix time, for TAI64N) are passed in.
"""

from __future__ import annotations

import ipaddress
import os
import random
from collections import Counter, deque
from collections.abc import Callable, Iterator

from cryptography.exceptions import InvalidTag

from tunnelmesh.ratelimit import UNKNOWN_SOURCE, Rate, RateLimiter, source_key

from .constants import DEFAULT_MTU, MSG_COOKIE_REPLY, MSG_INITIATION, REJECT_AFTER_TIME, TRANSPORT_MIN_SIZE
from .cookie import CookieChecker
from .crypto import NONCE_COUNTER, x25519_private, x25519_public
from .events import Event
from .keypair import Keypair
from .messages import TRANSPORT_HEADER, CookieReply, Initiation, MessageError, Response, message_type, parse
from .noise import HandshakeError, consume_initiation, consume_response
from .peer import Endpoint, IPNetwork, Peer

__all__ = ["HANDSHAKE_RATE_OVERALL", "HANDSHAKE_RATE_PER_SOURCE", "Device", "DeviceError"]

#: Under load, handshakes with a valid mac2 from one source: wireguard-go's 20 a second,
#: 5 at once. A valid mac2 proves the sender receives at its address, so spoofed floods
#: never get here; the overall bucket bounds the Diffie-Hellman work a crowd of proven
#: addresses can ask for (wireguard-go has none; the table evicts, see tunnelmesh.ratelimit).
HANDSHAKE_RATE_PER_SOURCE = Rate(per_second=20, burst=5)
HANDSHAKE_RATE_OVERALL = Rate(per_second=500, burst=100)


class DeviceError(ValueError):
    """A configuration the device refuses (e.g. a peer with our own key)."""


def _refused_path(source: Endpoint, peer: Peer) -> str | None:
    """Why a message from `source` cannot be `peer`'s (the drop's reason), or None.
    A link (SSH, relay) authenticated who is at its other end: a message it carries
    must be for that very peer, or a member could replay another member's ciphertext
    over its own link and pull that member's send path onto it. And the caller may
    keep a peer to some paths (`Peer.accepts`: a rung forced or disabled)."""
    link_peer = getattr(source, "peer_key", None)
    if link_peer is not None and link_peer != peer.public_key:
        return "message for one peer on another peer's link"
    if peer.accepts is not None and not peer.accepts(source):
        return "message on a path not allowed for its peer"
    return None


def endpoint_bytes(endpoint: Endpoint) -> bytes:
    """The sender address a cookie is bound to: a UDP address, or the peer a link
    authenticated (links of one rung share a description, not a peer)."""
    peer_key = getattr(endpoint, "peer_key", None)
    if isinstance(peer_key, bytes):
        return peer_key
    if isinstance(endpoint, tuple) and len(endpoint) >= 2:
        try:
            return ipaddress.ip_address(endpoint[0]).packed + int(endpoint[1]).to_bytes(2, "little")
        except (ValueError, TypeError, OverflowError):
            pass
    return repr(endpoint).encode()


def limiter_key(endpoint: Endpoint) -> str:
    """The source `handshake_limiter` counts a message against (see the module header)."""
    peer_key = getattr(endpoint, "peer_key", None)
    if isinstance(peer_key, bytes):
        return "link " + peer_key.hex()
    if isinstance(endpoint, tuple) and endpoint:
        return source_key(endpoint[0])
    return UNKNOWN_SOURCE


class Device:
    def __init__(
        self,
        static_private: bytes,
        *,
        mtu: int = DEFAULT_MTU,
        rng: Callable[[int], bytes] = os.urandom,
        ephemeral_source: Callable[[], bytes] = x25519_private,
    ) -> None:
        if len(static_private) != 32:
            raise DeviceError("static private key must be 32 bytes")
        self.static_private = static_private
        self.static_public = x25519_public(static_private)
        self.mtu = mtu
        self._rng = rng
        # Timer jitter needs no secret randomness (wireguard-go: fastrandn); drawing it
        # from `rng` cost a getrandom system call per packet sent after a reply.
        self._jitter = random.Random(int.from_bytes(rng(8), "little"))
        self.new_ephemeral = ephemeral_source
        self.cookie_checker = CookieChecker(self.static_public, rng)
        self._peers: dict[bytes, Peer] = {}
        self._index: dict[int, tuple[Peer, Keypair | None]] = {}
        self._route_hosts: dict[bytes, Peer] = {}
        self._route_networks: list[tuple[int, int, int, Peer]] = []
        self._nonce = bytearray(12)
        self.transmits: list[tuple[bytes, Endpoint]] = []
        self.events: deque[Event] = deque()
        self.drops: Counter[str] = Counter()
        self.cookie_replies_sent = 0
        self.handshake_limiter = RateLimiter(HANDSHAKE_RATE_PER_SOURCE, HANDSHAKE_RATE_OVERALL)
        # The peer whose packet `receive` last returned (set, not allocated, per packet):
        # the caller's packet filter judges a packet by who sent it.
        self.received_from: Peer | None = None
        # Peers whose timers an authenticated message changed (e.g. a keepalive now due in
        # KEEPALIVE_TIMEOUT after data came in): the caller re-arms theirs and clears this.
        self.timers_changed: set[Peer] = set()

    def __repr__(self) -> str:
        return f"<Device peers={len(self._peers)}>"

    # --- peers and cryptokey routing --------------------------------------------

    def add_peer(
        self,
        public_key: bytes,
        *,
        preshared_key: bytes,
        allowed_ips: tuple[IPNetwork, ...] = (),
        endpoint: Endpoint | None = None,
        persistent_keepalive: float = 0.0,
        owner: object = None,
    ) -> Peer:
        if public_key == self.static_public:
            raise DeviceError(f"peer {owner!r} has this node's own public key")
        if public_key in self._peers:
            raise DeviceError(f"peer {owner!r} has the same public key as peer {self._peers[public_key].owner!r}")
        peer = Peer(
            self, public_key, preshared_key=preshared_key, allowed_ips=allowed_ips,
            endpoint=endpoint, persistent_keepalive=persistent_keepalive, owner=owner,
        )
        self._peers[public_key] = peer
        self._rebuild_routes()
        return peer

    def remove_peer(self, peer: Peer) -> None:
        if self._peers.get(peer.public_key) is not peer:
            return
        peer.zero_keys()
        for index, (owner, _) in list(self._index.items()):
            if owner is peer:
                del self._index[index]
        del self._peers[peer.public_key]
        self._rebuild_routes()

    def peer(self, public_key: bytes) -> Peer | None:
        return self._peers.get(public_key)

    @property
    def peers(self) -> Iterator[Peer]:
        return iter(list(self._peers.values()))

    def _rebuild_routes(self) -> None:
        hosts: dict[bytes, Peer] = {}
        networks: list[tuple[int, int, int, int, Peer]] = []
        for peer in self._peers.values():
            for net in peer.allowed_ips:
                if net.prefixlen == net.max_prefixlen:
                    hosts[net.network_address.packed] = peer
                else:
                    networks.append((net.prefixlen, net.version, int(net.network_address), int(net.netmask), peer))
        networks.sort(key=lambda item: -item[0])  # longest prefix first
        self._route_hosts = hosts
        self._route_networks = [(v, n, m, p) for _, v, n, m, p in networks]

    def route(self, packet: bytes | bytearray | memoryview, length: int) -> Peer | None:
        """The peer whose allowed IPs hold the packet's destination."""
        if length < 20:
            return None
        version = packet[0] >> 4
        if version == 4:
            dst = bytes(packet[16:20])
        elif version == 6 and length >= 40:
            dst = bytes(packet[24:40])
        else:
            return None
        return self._lookup(version, dst)

    def _lookup(self, version: int, address: bytes) -> Peer | None:
        """The peer owning `address` in the allowed-IPs table (longest prefix)."""
        peer = self._route_hosts.get(address)
        if peer is not None:
            return peer
        value = int.from_bytes(address, "big")
        for net_version, network, mask, candidate in self._route_networks:
            if net_version == version and value & mask == network:
                return candidate
        return None

    # --- inbound -----------------------------------------------------------------

    def receive(
        self,
        data: bytes | bytearray | memoryview,
        source: Endpoint,
        now: float,
        wall: float,
        out: bytearray,
        *,
        under_load: bool = False,
    ) -> int:
        size = len(data)
        if size >= TRANSPORT_MIN_SIZE and data[0] == 4 and data[1] == 0 and data[2] == 0 and data[3] == 0:
            return self._receive_transport(data, size, source, now, wall, out)
        self._receive_handshake(data, source, now, wall, under_load)
        return 0

    def _receive_transport(
        self, data: bytes | bytearray | memoryview, size: int, source: Endpoint, now: float, wall: float, out: bytearray
    ) -> int:
        _, receiver, counter = TRANSPORT_HEADER.unpack_from(data)
        entry = self._index.get(receiver)
        if entry is None or entry[1] is None:
            self.drops["unknown receiver index"] += 1
            return 0
        peer, kp = entry
        if source.__class__ is not tuple or not peer.accepts_udp:
            refused = _refused_path(source, peer)
            if refused is not None:
                self.count_drop(refused, peer)
                return 0
        if now - kp.created >= REJECT_AFTER_TIME:
            self.count_drop("keypair expired", peer)
            return 0
        plain = size - TRANSPORT_MIN_SIZE
        if plain > len(out):
            self.count_drop("packet larger than buffer", peer)
            return 0
        nonce = self._nonce
        NONCE_COUNTER.pack_into(nonce, 4, counter)  # already unpacked: no slice of the datagram
        try:
            kp.receiver.decrypt_into(nonce, data[16:size], None, memoryview(out)[:plain])
        except InvalidTag:
            self.count_drop("authentication failed", peer)
            return 0
        if not kp.replay.check_and_update(counter):
            self.count_drop("replayed counter", peer)
            return 0
        peer.on_transport(kp, source, size, plain > 0, now, wall)
        if plain == 0:
            return 0  # keepalive
        length = _ip_length(out, plain)
        if length == 0:
            self.count_drop("malformed inner packet", peer)
            return 0
        # Cryptokey routing: the source must route back to this very peer
        # (wireguard-go: allowedips.Lookup(src) != peer), so a peer cannot
        # claim addresses another peer owns by a longer prefix.
        version = out[0] >> 4
        source = bytes(out[12:16]) if version == 4 else bytes(out[8:24])
        if self._lookup(version, source) is not peer:
            self.count_drop("inner source not allowed for peer", peer)
            return 0
        self.received_from = peer
        return length

    def _receive_handshake(
        self, data: bytes | bytearray | memoryview, source: Endpoint, now: float, wall: float, under_load: bool
    ) -> None:
        try:
            kind = message_type(data)
        except MessageError:
            self.drops["malformed message"] += 1
            return
        raw = bytes(data)
        message = parse(raw)
        if kind == MSG_COOKIE_REPLY:
            assert isinstance(message, CookieReply)
            entry = self._index.get(message.receiver)
            if entry is None:
                self.drops["cookie reply not for us"] += 1
            elif not entry[0].cookie.consume_reply(message, now):
                self.count_drop("cookie reply not for us", entry[0])
            else:
                entry[0].retry_with_cookie(message.receiver, source, now, wall)
            return
        checker = self.cookie_checker
        if not checker.check_mac1(raw):
            self.drops["bad mac1"] += 1
            return
        if under_load:
            cookie_source = endpoint_bytes(source)
            if not checker.check_mac2(raw, cookie_source, now):
                sender = int.from_bytes(raw[4:8], "little")
                self.transmits.append((checker.create_reply(raw, sender, cookie_source, now), source))
                self.cookie_replies_sent += 1
                return
            limited = self.handshake_limiter.limit_key(limiter_key(source), now)
            if limited is not None:
                self.drops[f"handshake over the {limited.by} rate limit"] += 1
                return
        if kind == MSG_INITIATION:
            assert isinstance(message, Initiation)
            self._consume_initiation(message, raw, source, now)
        else:
            assert isinstance(message, Response)
            self._consume_response(message, source, now, wall)

    def _consume_initiation(self, message: Initiation, raw: bytes, source: Endpoint, now: float) -> None:
        try:
            consumed = consume_initiation(
                message, local_static_private=self.static_private, local_static_public=self.static_public
            )
        except HandshakeError:
            self.drops["initiation does not authenticate"] += 1
            return
        peer = self._peers.get(consumed.remote_static)
        if peer is None:
            self.drops["initiation from unknown key"] += 1
            return
        refused = _refused_path(source, peer)
        if refused is not None:
            self.count_drop(refused, peer)
            return
        reason = peer.check_initiation(consumed.timestamp, now)
        if reason is not None:
            if not peer.answer_again(raw, source, now):
                self.count_drop(reason, peer)
            return
        if self.static_public < consumed.remote_static and peer.ours_goes_ahead(consumed.timestamp, source, now):
            # Both sides initiated along this path at once: answering would discard our own
            # initiation, and the peer, answering ours, would discard theirs: both answers
            # lost. The smaller key's initiation goes ahead; the peer answers it.
            self.count_drop("initiation crossing ours (ours goes ahead)", peer)
            return
        peer.answer_initiation(consumed, message.sender, source, now, raw)

    def _consume_response(self, message: Response, source: Endpoint, now: float, wall: float) -> None:
        entry = self._index.get(message.receiver)
        noise = entry[0].pending_initiation(message.receiver) if entry is not None and entry[1] is None else None
        if entry is None or noise is None:
            self.drops["response without a pending initiation"] += 1
            return
        peer = entry[0]
        refused = _refused_path(source, peer)
        if refused is not None:
            self.count_drop(refused, peer)
            return
        try:
            final = consume_response(
                message, noise, local_static_private=self.static_private, preshared_key=peer.preshared_key
            )
        except HandshakeError:
            self.count_drop("response does not authenticate", peer)
            return
        peer.on_response(final, message.sender, source, now, wall)

    # --- timers ------------------------------------------------------------------

    def get_timer(self) -> float | None:
        deadlines = [t for t in (p.get_timer() for p in self._peers.values()) if t is not None]
        return min(deadlines) if deadlines else None

    def handle_timer(self, now: float, wall: float) -> None:
        for peer in list(self._peers.values()):
            deadline = peer.get_timer()
            if deadline is not None and deadline <= now:
                peer.handle_timer(now, wall)

    # --- services for peers ---------------------------------------------------------

    def queue_transmit(self, peer: Peer, datagram: bytes, to: Endpoint | None = None) -> None:
        endpoint = to if to is not None else peer.endpoint
        if endpoint is None:
            self.count_drop("peer has no endpoint", peer)
            return
        self.transmits.append((datagram, endpoint))

    def allocate_index(self, peer: Peer, keypair: Keypair | None) -> int:
        while True:
            index = int.from_bytes(self._rng(4), "little")
            if index and index not in self._index:
                self._index[index] = (peer, keypair)
                return index

    def set_index(self, index: int, peer: Peer, keypair: Keypair) -> None:
        self._index[index] = (peer, keypair)

    def release_index(self, index: int) -> None:
        if index:
            self._index.pop(index, None)

    def release_keypair(self, keypair: Keypair | None) -> None:
        if keypair is not None:
            entry = self._index.get(keypair.local_index)
            if entry is not None and entry[1] is keypair:
                del self._index[keypair.local_index]

    def random_below(self, bound: int) -> int:
        """A number in [0, bound) for timer jitter: not for anything secret."""
        return self._jitter.randrange(bound)

    def emit(self, event: Event) -> None:
        self.events.append(event)

    def count_drop(self, reason: str, peer: Peer | None = None) -> None:
        """Count a dropped datagram by `reason`, node-wide and, when the drop is
        after the peer it is for is known, in that peer's `drops` too."""
        self.drops[reason] += 1
        if peer is not None:
            peer.drops[reason] += 1


def _ip_length(packet: bytearray, size: int) -> int:
    """The IP packet's own length (padding removed), or 0 if malformed."""
    version = packet[0] >> 4
    if version == 4 and size >= 20:
        length = (packet[2] << 8) | packet[3]
        return length if 20 <= length <= size else 0
    if version == 6 and size >= 40:
        length = 40 + ((packet[4] << 8) | packet[5])
        return length if length <= size else 0
    return 0
