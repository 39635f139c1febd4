"""One WireGuard peer: handshake state, keypairs, staged packets and timers.

Outbound flow (the caller holds a packet read from the TUN device):

1. `Device.route` picks the peer whose allowed IPs hold the destination.
2. `Peer.encrypt` seals the packet with the current keypair into the caller's
   buffer and returns the datagram length; without a usable keypair the
   packet is staged (at most MAX_STAGED_PACKETS) and a handshake starts.
3. Sealing may also start a rekey: either side rekeys after
   REKEY_AFTER_MESSAGES, the session's initiator also after REKEY_AFTER_TIME.
4. Anything the peer must send on its own (handshake messages, keepalives,
   staged packets once a session exists) is appended to `Device.transmits`.

Keypair rotation follows wireguard-go: an initiator uses a new keypair at
once (previous <- current <- new); a responder keeps it as `next` and sends
nothing on it until the first packet arrives on it (key confirmation).

Timers are deadlines (monotonic seconds, None when unset), changed only by the
`_timers_*` hooks named after protocol events and fired only by the
`_expired_*` handlers, as in wireguard-go's timers.go. `get_timer` returns the
earliest deadline; `handle_timer(now, wall)` runs whatever is due.
"""

from __future__ import annotations

import ipaddress
from collections import Counter, deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Hashable

from .constants import (
    KEEPALIVE_TIMEOUT,
    MAX_HANDSHAKE_ATTEMPTS,
    MAX_STAGED_PACKETS,
    PADDING_MULTIPLE,
    REJECT_AFTER_MESSAGES,
    REJECT_AFTER_TIME,
    REKEY_AFTER_MESSAGES,
    REKEY_AFTER_TIME,
    REKEY_ON_RECEIVE_AGE,
    REKEY_TIMEOUT,
    REKEY_TIMEOUT_JITTER_MAX,
    TAG_SIZE,
    TRANSPORT_HEADER_SIZE,
    ZERO_KEYS_AFTER,
)
from .cookie import CookieGenerator
from .crypto import NONCE_COUNTER, dh, tai64n
from .events import HandshakeCompleted, HandshakeGaveUp, KeysZeroed, NewSource
from .keypair import Keypair
from .messages import TRANSPORT_HEADER
from .noise import ConsumedInitiation, NoiseState, create_initiation, create_response, derive_keys

if TYPE_CHECKING:
    from .device import Device

Endpoint = Hashable
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_NO_HANDSHAKE = 0
_INITIATION_SENT = 1
_ZERO_PAD = bytes(PADDING_MULTIPLE)
# An initiation of the peer's that arrives within this long of ours going out crossed ours
# in flight (a round trip, generously; see `ours_goes_ahead`).
CROSSING_WINDOW = 1.0


class Peer:
    def __init__(
        self,
        device: Device,
        public_key: bytes,
        *,
        preshared_key: bytes,
        allowed_ips: tuple[IPNetwork, ...] = (),
        endpoint: Endpoint | None = None,
        persistent_keepalive: float = 0.0,
        owner: Any = None,
    ) -> None:
        if len(public_key) != 32 or len(preshared_key) != 32:
            raise ValueError("public key and pre-shared key must be 32 bytes")
        self.device = device
        self.public_key = public_key
        self.preshared_key = preshared_key
        self.allowed_ips = allowed_ips
        # Where this peer's messages go: written by the caller only (its path selector). The
        # core never moves it; it reports where authenticated messages come from instead
        # (`HandshakeCompleted.source`, `NewSource`, the three fields below), and answers a
        # handshake message the way it came.
        self.endpoint = endpoint
        self.endpoint_rx_at = float("-inf")  # last authenticated transport message from `endpoint`
        self.other_source: Endpoint | None = None  # the latest other source of one, and when
        self.other_at = float("-inf")
        # The caller's rule on which paths this peer's messages may come from (None: any);
        # messages from others are dropped, so nothing is answered or learnt there. Its answer
        # for UDP addresses is kept apart: the one check a UDP transport message costs.
        self.accepts: Callable[[Endpoint], bool] | None = None
        self.accepts_udp = True
        self.persistent_keepalive = persistent_keepalive
        # How long after data received, with nothing sent back, a keepalive answers it
        # (WireGuard: 10 s). The transport ladder shortens it, so that its 3 s "sent and not
        # answered" check is not tripped by a peer that merely had nothing to say.
        self.keepalive_timeout = KEEPALIVE_TIMEOUT
        self.owner = owner  # the caller's object for this peer (the daemon: its PeerSession)
        # What the caller's data path learnt in the tunnel (actors/datapath.py, CAPS_*): the
        # peer's daemon completes the TCP/UDP checksums of what it delivers, so ours may be
        # left partial. Known per session: every new session (a restarted peer may do
        # less) and zeroed keys forget it until the peer says so again. And the question
        # out, the (ident, seq) of its echo request.
        self.completes_checksums = False
        self.caps_question: tuple[int, int] | None = None
        self.cookie = CookieGenerator(public_key)
        self.static_static = dh(device.static_private, public_key)

        # Handshake state.
        self._hs_stage = _NO_HANDSHAKE
        self._hs_noise: NoiseState | None = None
        self._hs_index = 0
        self._hs_packet = b""  # the outstanding initiation, as sent (a probe may repeat it on another path)
        self._hs_sent_to: dict[Endpoint, float] = {}  # where it went, and when it last went there
        # When it went to each path, if it went there only once: an answer on a path it went
        # to more than once cannot say which copy it answers (Karn), so it gives no round trip.
        self._hs_sent_once: dict[Endpoint, float | None] = {}
        # Ours went ahead of a crossing initiation of the peer's and no handshake has completed
        # since: the next crossing is answered (the peer may be refusing ours).
        self._went_ahead = False
        self.last_timestamp = b"\x00" * 12  # greatest TAI64N consumed, against replay
        self.last_initiation_consumed = float("-inf")
        # The last initiation answered, our answer, and the paths it was sent on: the same
        # initiation arriving again on another path (a ladder probe on several rungs) gets
        # the same answer there, so a path that loses answers cannot hide the others.
        self._answered: tuple[bytes, bytes, float, list[Endpoint]] | None = None
        self.last_sent_handshake = float("-inf")

        # Keypairs.
        self.previous: Keypair | None = None
        self.current: Keypair | None = None
        self.next: Keypair | None = None
        self.staged: deque[bytes] = deque()
        self.staged_since = float("-inf")  # when the packets staged now began to wait (meaningful while any are)
        self._nonce = bytearray(12)

        # Timer deadlines.
        self.t_retransmit: float | None = None
        self._cookie_retry = False  # whether a cookie reply may make our last handshake message go again now
        self._response: tuple[int, bytes, Endpoint] | None = None  # our last response: index, body (no macs), where
        self.t_send_keepalive: float | None = None
        self.t_new_handshake: float | None = None
        self.t_zero_keys: float | None = None
        self.t_persistent_keepalive: float | None = None
        self.need_another_keepalive = False
        self.handshake_attempts = 0
        self.sent_last_minute_handshake = False

        # What `status` shows.
        self.last_handshake: float | None = None  # monotonic
        # The round trip of our last answered initiation (seconds, from sending it to the
        # response), None when that answer was ambiguous or this side answered instead.
        self.handshake_rtt: float | None = None
        self.rx_bytes = 0
        self.tx_bytes = 0
        self.rx_packets = 0  # authenticated transport messages, keepalives included
        self.tx_packets = 0
        # Datagrams for this peer the core dropped, by reason (`Device.count_drop`; also
        # counted node-wide): touched on the drop path only.
        self.drops: Counter[str] = Counter()

    def __repr__(self) -> str:
        return f"<Peer {self.owner!r}>"

    # --- outbound data path ------------------------------------------------

    def encrypt(self, buf: bytearray, length: int, out: bytearray, now: float, wall: float) -> int:
        """Seal the `length`-byte packet at the start of `buf` into `out`.

        `buf` must have room for up to 15 padding bytes after the packet, and
        `out` for 32 + padded length. Returns the datagram length, or 0 when
        the packet was staged because no session is ready yet.
        """
        kp = self.current
        if kp is None or kp.send_counter >= REJECT_AFTER_MESSAGES or now - kp.created >= REJECT_AFTER_TIME:
            self._stage(bytes(memoryview(buf)[:length]), now, wall)
            return 0
        mtu = self.device.mtu
        padded = (length + PADDING_MULTIPLE - 1) & ~(PADDING_MULTIPLE - 1)
        if padded > mtu:
            padded = length if length > mtu else mtu
        if padded != length:
            buf[length:padded] = _ZERO_PAD[: padded - length]
        size = self._seal(kp, memoryview(buf)[:padded], out)
        self._after_send(kp, length, size, now, wall)
        return size

    def _seal(self, kp: Keypair, plaintext: memoryview | bytes, out: bytearray) -> int:
        counter = kp.send_counter
        kp.send_counter = counter + 1
        TRANSPORT_HEADER.pack_into(out, 0, 4, kp.remote_index, counter)
        nonce = self._nonce
        NONCE_COUNTER.pack_into(nonce, 4, counter)
        end = TRANSPORT_HEADER_SIZE + len(plaintext) + TAG_SIZE
        kp.sender.encrypt_into(nonce, plaintext, None, memoryview(out)[TRANSPORT_HEADER_SIZE:end])
        return end

    def _after_send(self, kp: Keypair, length: int, size: int, now: float, wall: float) -> None:
        self.tx_bytes += size
        self.tx_packets += 1
        self._timers_any_authenticated_packet_traversal(now)
        self._timers_any_authenticated_packet_sent()
        if length:
            self._timers_data_sent(now)
        # wireguard-go's keepKeyFreshSending: either side rekeys on the message
        # count; only the session's initiator on its age.
        if kp.send_counter >= REKEY_AFTER_MESSAGES or (kp.initiator and now - kp.created >= REKEY_AFTER_TIME):
            self.send_handshake_initiation(now, wall)

    def _send_payload(self, payload: bytes, now: float, wall: float, to: Endpoint | None = None) -> bool:
        """Seal and queue a packet that does not come from the caller's buffers
        (keepalives, staged packets), to `to` or else the endpoint. Returns False if no
        keypair is usable."""
        kp = self.current
        if kp is None or kp.send_counter >= REJECT_AFTER_MESSAGES or now - kp.created >= REJECT_AFTER_TIME:
            return False
        mtu = self.device.mtu
        padded = min((len(payload) + PADDING_MULTIPLE - 1) & ~(PADDING_MULTIPLE - 1), max(mtu, len(payload)))
        plaintext = payload + bytes(padded - len(payload))
        out = bytearray(TRANSPORT_HEADER_SIZE + padded + TAG_SIZE)
        size = self._seal(kp, plaintext, out)
        self.device.queue_transmit(self, bytes(out), to)
        self._after_send(kp, len(payload), size, now, wall)
        return True

    def send_keepalive(self, now: float, wall: float) -> None:
        """An empty transport message; starts a handshake if there is no session."""
        if self.staged:
            self._flush_staged(now, wall)
            return
        if not self._send_payload(b"", now, wall):
            self.send_handshake_initiation(now, wall)

    def _stage(self, packet: bytes, now: float, wall: float) -> None:
        staged = self.staged
        if not staged:
            self.staged_since = now
        if len(staged) >= MAX_STAGED_PACKETS:
            staged.popleft()
            self.device.count_drop("staged queue full", self)
        staged.append(packet)
        self.send_handshake_initiation(now, wall)

    def _flush_staged(self, now: float, wall: float, to: Endpoint | None = None) -> None:
        staged = self.staged
        while staged:
            if not self._send_payload(staged[0], now, wall, to):
                self.send_handshake_initiation(now, wall)
                return
            staged.popleft()

    # --- handshake -----------------------------------------------------------

    def send_handshake_initiation(self, now: float, wall: float, *, retry: bool = False) -> None:
        if not retry:
            self.handshake_attempts = 0
        if now - self.last_sent_handshake < REKEY_TIMEOUT:
            return
        self._new_initiation(now, wall)
        self.device.queue_transmit(self, self._hs_packet)
        if self.endpoint is not None:
            self._sent_initiation_to(self.endpoint, now)

    def send_probe(self, endpoints: tuple[Endpoint, ...], now: float, wall: float, *,
                   retransmit: bool = True) -> bool:
        """Send a handshake initiation to each of `endpoints` (the transport ladder's
        probe: only a handshake gets an answer). An initiation still outstanding is
        repeated as it is, so whichever path carries it first completes the one
        handshake; otherwise a new one starts, within the REKEY_TIMEOUT rate limit.
        Returns False when the rate limit held it back.

        With `retransmit` False a new initiation is not retried by the core's timer
        (unless a handshake was being retried already): the caller probes again on its
        own schedule. A retry goes to `endpoint`, the path in use: a probe for a better
        path that nobody answers would end in a needless handshake there."""
        outstanding = self._hs_stage == _INITIATION_SENT and now - self.last_sent_handshake < REKEY_TIMEOUT
        if not outstanding:
            if now - self.last_sent_handshake < REKEY_TIMEOUT:
                return False
            self.handshake_attempts = 0
            retrying = self.t_retransmit is not None
            self._new_initiation(now, wall)
            if not retransmit and not retrying:
                self.t_retransmit = None
        transmits = self.device.transmits
        for endpoint in endpoints:
            transmits.append((self._hs_packet, endpoint))
            self._sent_initiation_to(endpoint, now)
        return True

    def next_initiation_at(self, now: float) -> float:
        """When `send_probe` can next send an initiation: now if one is outstanding or the
        REKEY_TIMEOUT rate limit allows a new one, else when the limit ends."""
        if self._hs_stage == _INITIATION_SENT and now - self.last_sent_handshake < REKEY_TIMEOUT:
            return now
        return max(now, self.last_sent_handshake + REKEY_TIMEOUT)

    def spray(self, endpoints: list[Endpoint]) -> bool:
        """Send the outstanding initiation, as it is, to more `endpoints` without noting
        them (a port spray towards a NAT that maps per destination: hundreds of guesses,
        of which one at most answers): no bookkeeping grows per port, and an answer from
        one gives no round trip. False if no initiation is outstanding."""
        if self._hs_stage != _INITIATION_SENT:
            return False
        packet = self._hs_packet
        self.device.transmits.extend((packet, endpoint) for endpoint in endpoints)
        return True

    def _sent_initiation_to(self, endpoint: Endpoint, now: float) -> None:
        self._hs_sent_once[endpoint] = None if endpoint in self._hs_sent_to else now
        self._hs_sent_to[endpoint] = now

    def abandon_handshake(self) -> None:
        """The caller gave up reaching the peer (the transport ladder's search found no
        path): no more retries, staged packets dropped, and data sent before now starts no
        new handshake later. New traffic starts afresh (and a persistent keepalive, as in
        WireGuard: it is what keeps a NAT mapping open for the peer)."""
        self.t_retransmit = None
        self.t_new_handshake = None
        self.handshake_attempts = 0
        self.staged.clear()

    def _new_initiation(self, now: float, wall: float) -> None:
        self.last_sent_handshake = now
        device = self.device
        ephemeral = device.new_ephemeral()
        device.release_index(self._hs_index)
        self._hs_index = device.allocate_index(self, None)
        body, noise = create_initiation(
            local_static_private=device.static_private,
            local_static_public=device.static_public,
            remote_static=self.public_key,
            static_static=self.static_static,
            sender=self._hs_index,
            timestamp=tai64n(wall),
            ephemeral_private=ephemeral,
        )
        self._hs_noise = noise
        self._hs_stage = _INITIATION_SENT
        self._hs_packet = self.cookie.add_macs(body, now)
        self._hs_sent_to = {}
        self._hs_sent_once = {}
        self._cookie_retry = True
        self._timers_any_authenticated_packet_traversal(now)
        self._timers_any_authenticated_packet_sent()
        self._timers_handshake_initiated(now)

    def retry_with_cookie(self, index: int, source: Endpoint, now: float, wall: float) -> None:
        """The other side, under load, sent a cookie for our handshake message `index` (our
        outstanding initiation, or the response we last sent): send it again with mac2 to
        where the cookie came from, at once, rather than waiting for the initiator's retry
        after REKEY_TIMEOUT as WireGuard does, so that a flooded peer is reached in well
        under 5 s. An initiation goes again as a new one; a response as it was, with new
        macs. Once per message made otherwise, and only back to where that message went: a
        forged cookie reply (anyone on the path can make one) then earns one extra message
        to the same place, never a loop nor a message elsewhere."""
        if not self._cookie_retry:
            return
        if self._hs_stage == _INITIATION_SENT and self._hs_index == index and source in self._hs_sent_to:
            self._new_initiation(now, wall)
            self._sent_initiation_to(source, now)
            packet = self._hs_packet
        elif self._response is not None and self._response[0] == index and self._response[2] == source:
            packet = self.cookie.add_macs(self._response[1], now)
        else:
            return
        self._cookie_retry = False
        self.device.transmits.append((packet, source))

    def pending_initiation(self, index: int) -> NoiseState | None:
        """The Noise state of our outstanding initiation with this index."""
        if self._hs_stage == _INITIATION_SENT and self._hs_index == index:
            return self._hs_noise
        return None

    def on_response(self, noise: NoiseState, remote_index: int, source: Endpoint, now: float, wall: float) -> None:
        """Our initiation was answered: the new keypair is current at once."""
        send_key, receive_key = derive_keys(noise, initiator=True)
        sent = self._hs_sent_once.get(source)
        self.handshake_rtt = now - sent if sent is not None else None
        local_index = self._hs_index
        self._clear_handshake(keep_index=True)
        kp = Keypair(self, send_key, receive_key, local_index=local_index, remote_index=remote_index, created=now, initiator=True)
        self.device.set_index(local_index, self, kp)
        self._timers_any_authenticated_packet_traversal(now)
        self._timers_any_authenticated_packet_received()
        self._begin_session(kp, now)
        self._timers_handshake_complete(now, initiator=True, source=source)
        # Key confirmation (the responder waits for a packet on this keypair), back the way
        # the answer came: the caller may move the endpoint there once it hears of it.
        if self.staged:
            self._flush_staged(now, wall, source)
        else:
            self._send_payload(b"", now, wall, source)

    def ours_goes_ahead(self, timestamp: bytes, source: Endpoint, now: float) -> bool:
        """Called for an initiation of the peer's (its `timestamp`) from `source`, when our
        key is the smaller: whether to leave it unanswered because it crossed our own
        outstanding one in flight (ours went out under CROSSING_WINDOW ago, on this path
        or another: two SSH links dialled at once, a probe on several rungs), so that the
        peer answers ours. Not if ours went ahead at the last crossing and no handshake
        completed since: the peer may refuse ours (its clock ahead of ours, say), and
        then only an answer to theirs makes a session.

        When ours goes ahead, the peer's initiation is refused from now on, its copies
        on other paths and its replays too (as for one answered), and ours goes to
        `source` at once: the way theirs came works, while ours may have been lost where
        it went (a NAT with no mapping yet, a link closing)."""
        last_sent = max(self._hs_sent_to.values(), default=float("-inf"))
        crossed = self._hs_stage == _INITIATION_SENT and now - last_sent < CROSSING_WINDOW
        if not crossed or self._went_ahead:
            self._went_ahead = False
            return False
        self._went_ahead = True  # so at most once per initiation of ours: the next crossing is answered
        self.last_timestamp = max(self.last_timestamp, timestamp)
        self.device.transmits.append((self._hs_packet, source))
        self._hs_sent_once[source] = None  # sent again: its answer gives no round trip
        return True

    def check_initiation(self, timestamp: bytes, now: float) -> str | None:
        """Why an authenticated initiation must be ignored, or None."""
        if timestamp <= self.last_timestamp:
            return "replayed or old initiation timestamp"
        if now - self.last_initiation_consumed <= 1 / 50:
            return "initiation flood (over 50/s from one peer)"
        return None

    def answer_again(self, raw: bytes, source: Endpoint, now: float) -> bool:
        """Resend our answer if `raw` is the initiation we last answered, arriving on a
        path it has not been answered on, within REKEY_TIMEOUT. No state changes; the
        answer (92 bytes) is smaller than the initiation, so this amplifies nothing."""
        answered = self._answered
        if answered is None or answered[0] != raw or now - answered[2] >= REKEY_TIMEOUT or len(answered[3]) >= 3 \
                or any(type(source) is type(earlier) for earlier in answered[3]):
            return False  # once per kind of path: a replay from more UDP addresses gets nothing
        answered[3].append(source)
        self.device.transmits.append((answered[1], source))
        return True

    def answer_initiation(self, consumed: ConsumedInitiation, remote_index: int, source: Endpoint, now: float,
                          raw: bytes = b"") -> None:
        """Answer an authenticated initiation. The new keypair waits in `next`
        until the initiator's first packet confirms it."""
        device = self.device
        self.last_timestamp = consumed.timestamp
        self.last_initiation_consumed = max(self.last_initiation_consumed, now)
        # A response counts as our handshake for the REKEY_TIMEOUT rate limit
        # (wireguard-go's SendHandshakeResponse): traffic staged before the
        # initiator confirms must not start a competing initiation.
        self.last_sent_handshake = now
        self._clear_handshake(keep_index=False)
        local_index = device.allocate_index(self, None)
        body, noise = create_response(
            consumed.state,
            remote_static=consumed.remote_static,
            remote_ephemeral=consumed.remote_ephemeral,
            preshared_key=self.preshared_key,
            sender=local_index,
            receiver=remote_index,
            ephemeral_private=device.new_ephemeral(),
        )
        send_key, receive_key = derive_keys(noise, initiator=False)
        kp = Keypair(self, send_key, receive_key, local_index=local_index, remote_index=remote_index, created=now, initiator=False)
        device.set_index(local_index, self, kp)
        self._begin_session(kp, now)
        self._timers_any_authenticated_packet_traversal(now)
        self._timers_any_authenticated_packet_received()
        # The answer goes back the way the initiation came, whatever the send
        # path: that is what lets a probe on one rung prove that rung.
        answer = self.cookie.add_macs(body, now)
        device.transmits.append((answer, source))
        self._answered = (raw, answer, now, [source])
        self._response, self._cookie_retry = (local_index, body, source), True
        self._timers_any_authenticated_packet_sent()
        device.timers_changed.add(self)  # a new session: its key-zeroing deadline, its keepalives

    def _clear_handshake(self, *, keep_index: bool) -> None:
        if not keep_index:
            self.device.release_index(self._hs_index)
        self._hs_index = 0
        self._hs_noise = None
        self._hs_stage = _NO_HANDSHAKE

    def _begin_session(self, kp: Keypair, now: float) -> None:
        self.completes_checksums = False  # until this session's peer says so (the caller asks)
        release = self.device.release_keypair
        if kp.initiator:
            if self.next is not None:
                release(self.previous)
                release(self.current)
                self.previous, self.next = self.next, None
            else:
                release(self.previous)
                self.previous = self.current
            self.current = kp
        else:
            release(self.next)
            release(self.previous)
            self.next, self.previous = kp, None
        self._timers_session_derived(now)

    def on_confirmed(self, kp: Keypair, source: Endpoint, now: float, wall: float) -> None:
        """First packet on the `next` keypair: it becomes current."""
        self.device.release_keypair(self.previous)
        self.previous, self.current, self.next = self.current, kp, None
        self._timers_handshake_complete(now, initiator=False, source=source)
        self._flush_staged(now, wall, source)

    def on_transport(self, kp: Keypair, source: Endpoint, size: int, data: bool, now: float, wall: float) -> None:
        """Bookkeeping for an authenticated, non-replayed transport message."""
        if kp is self.next:
            self.on_confirmed(kp, source, now, wall)
        if source == self.endpoint:
            self.endpoint_rx_at = now
        else:
            if source != self.other_source:
                self.other_source = source
                self.device.emit(NewSource(self, source))
            self.other_at = now
        self.rx_bytes += size
        self.rx_packets += 1
        current = self.current
        if (
            current is not None
            and current.initiator
            and not self.sent_last_minute_handshake
            and now - current.created > REKEY_ON_RECEIVE_AGE
        ):
            self.sent_last_minute_handshake = True
            self.send_handshake_initiation(now, wall)
        self._timers_any_authenticated_packet_traversal(now)
        self._timers_any_authenticated_packet_received()
        if data:
            self._timers_data_received(now)
        self.device.timers_changed.add(self)

    def use_endpoint(self, endpoint: Endpoint | None) -> None:
        """The caller moves the send path. What the core reports about other sources starts
        afresh from here: a message from anywhere but the new endpoint is reported again,
        even from where messages came before."""
        self.endpoint = endpoint
        if endpoint is not None and endpoint == self.other_source:
            self.endpoint_rx_at = self.other_at  # messages came from there: they count as the path's
        self.other_source = None
        self.other_at = float("-inf")

    def zero_keys(self) -> None:
        self.completes_checksums = False
        release = self.device.release_keypair
        release(self.previous)
        release(self.current)
        release(self.next)
        self.previous = self.current = self.next = None
        self._clear_handshake(keep_index=False)
        self.staged.clear()

    # --- timers --------------------------------------------------------------

    def get_timer(self) -> float | None:
        """The earliest deadline of the timers set, if any (asked after every batch that
        touched the peer: no list made)."""
        earliest = self.t_retransmit
        for t in (self.t_send_keepalive, self.t_new_handshake, self.t_zero_keys, self.t_persistent_keepalive):
            if t is not None and (earliest is None or t < earliest):
                earliest = t
        return earliest

    def handle_timer(self, now: float, wall: float) -> None:
        if self.t_retransmit is not None and now >= self.t_retransmit:
            self.t_retransmit = None
            self._expired_retransmit_handshake(now, wall)
        if self.t_send_keepalive is not None and now >= self.t_send_keepalive:
            self.t_send_keepalive = None
            self._expired_send_keepalive(now, wall)
        if self.t_new_handshake is not None and now >= self.t_new_handshake:
            self.t_new_handshake = None
            self._expired_new_handshake(now, wall)
        if self.t_zero_keys is not None and now >= self.t_zero_keys:
            self.t_zero_keys = None
            self._expired_zero_keys()
        if self.t_persistent_keepalive is not None and now >= self.t_persistent_keepalive:
            self.t_persistent_keepalive = None
            self._expired_persistent_keepalive(now, wall)

    def _jitter(self) -> float:
        return self.device.random_below(int(REKEY_TIMEOUT_JITTER_MAX * 1000)) / 1000

    def _expired_retransmit_handshake(self, now: float, wall: float) -> None:
        if self.handshake_attempts > MAX_HANDSHAKE_ATTEMPTS:
            self.t_send_keepalive = None
            self.staged.clear()
            if self.t_zero_keys is None:
                self.t_zero_keys = now + ZERO_KEYS_AFTER
            self.device.emit(HandshakeGaveUp(self))
            return
        self.handshake_attempts += 1
        self.send_handshake_initiation(now, wall, retry=True)

    def _expired_send_keepalive(self, now: float, wall: float) -> None:
        self.send_keepalive(now, wall)
        if self.need_another_keepalive:
            self.need_another_keepalive = False
            self.t_send_keepalive = now + self.keepalive_timeout

    def _expired_new_handshake(self, now: float, wall: float) -> None:
        self.send_handshake_initiation(now, wall)

    def _expired_zero_keys(self) -> None:
        self.zero_keys()
        self.device.emit(KeysZeroed(self))

    def _expired_persistent_keepalive(self, now: float, wall: float) -> None:
        if self.persistent_keepalive > 0:
            self.send_keepalive(now, wall)

    def _timers_data_sent(self, now: float) -> None:
        if self.t_new_handshake is None:
            self.t_new_handshake = now + KEEPALIVE_TIMEOUT + REKEY_TIMEOUT + self._jitter()

    def _timers_data_received(self, now: float) -> None:
        if self.t_send_keepalive is None:
            self.t_send_keepalive = now + self.keepalive_timeout
        else:
            self.need_another_keepalive = True

    def _timers_any_authenticated_packet_sent(self) -> None:
        self.t_send_keepalive = None

    def _timers_any_authenticated_packet_received(self) -> None:
        self.t_new_handshake = None

    def _timers_handshake_initiated(self, now: float) -> None:
        self.t_retransmit = now + REKEY_TIMEOUT + self._jitter()

    def _timers_handshake_complete(self, now: float, *, initiator: bool, source: Endpoint) -> None:
        self._went_ahead = False
        self.t_retransmit = None
        self.handshake_attempts = 0
        self.sent_last_minute_handshake = False
        self.last_handshake = now
        self.device.emit(HandshakeCompleted(self, initiator, source))

    def _timers_session_derived(self, now: float) -> None:
        self.t_zero_keys = now + ZERO_KEYS_AFTER

    def _timers_any_authenticated_packet_traversal(self, now: float) -> None:
        if self.persistent_keepalive > 0:
            self.t_persistent_keepalive = now + self.persistent_keepalive


__all__ = ["Peer", "Endpoint"]
