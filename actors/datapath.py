"""The hot data path: the one place that does not pass messages.

DESIGN.md's exception to the actor rule. Per packet there is no queue hop, no
task switch, no log call and no buffer allocated (only small slice views):
`loop.add_reader` callbacks drain the non-blocking TUN and UDP edges
(actors/edges.py) into buffers allocated once, and call the protocol core
directly. The stages, in order:

    outbound: TUN readable -> readv -> Device.route -> [filter] -> Peer.encrypt -> send
    inbound:  UDP readable -> recvfrom_into -> demux -> Device.receive -> deliver
    deliver:  in-tunnel ping answers taken -> [filter] -> write to the TUN

`[filter]` is where the packet filter (tunnelmesh.filter, docs/filter.md) decides,
one place per direction: `self.filter`, a `PacketFilter` the filter actor
(actors/filter.py) sets and swaps rules in, or None (no filter configured: no call
per packet). It judges an inbound packet by the peer that sent it, which the core
notes in `Device.received_from`; what it drops it counts itself. With a filter, the
daemon's own echo request (`tunnelmesh ping`) is answered here, before the filter,
so that it works whatever the policy says (it reveals that the daemon runs, no
more). The demux hands datagrams that are not WireGuard (a first byte other
than 1-4 or non-zero reserved bytes: STUN, port-mapping answers) to whoever
registered for them (`register_datagrams`), so other protocols share the one UDP
port; transport messages (first byte 4) go straight to the core, which checks
the rest. Handshake messages (1-3), from UDP or a link, are counted by the
under-load switch (`LoadDetector`): above UNDER_LOAD_HANDSHAKES_PER_SECOND the
core answers those without a valid mac2 with cookie replies and passes those
with one through its per-source rate limit (`Device.handshake_limiter`); its
drops are counted in `Device.drops`, never logged per packet.

A peer's endpoint is a UDP address (a tuple) or a link of the SSH or relay
rung (tunnelmesh.links): the send is then `link.send`, which copies the
datagram into the link's own buffer. Links deliver what they receive to
`receive` (the data path is their `LinkSink`), one message per call, with the
side effects flushed once per event-loop iteration.

After each batch the core's side effects are flushed: datagrams it queued
(handshakes, keepalives, staged packets) are sent, its events go to the peer
sessions (`on_event`, a direct call: they own the peers' paths), and the
sessions of touched peers re-arm their timers if a deadline moved earlier.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING

from tunnelmesh.clock import SYSTEM_CLOCK, Clock
from tunnelmesh.packets import DAEMON_PING_LENGTH, daemon_echo_request, echo_reply_in_place, echo_reply_key
from tunnelmesh.wireguard import Device, Peer
from tunnelmesh.wireguard.constants import TRANSPORT_MIN_SIZE

from .edges import Address, Bind, Tun

if TYPE_CHECKING:
    import ipaddress

    from tunnelmesh.filter import PacketFilter
    from tunnelmesh.links import Link

    from .session import PeerSession

log = logging.getLogger("tunnelmesh.datapath")

BATCH = 512  # packets per readiness callback, so TUN and UDP take turns
# Under load (cookie replies instead of handshakes) when more than this many
# handshake messages arrive within one second (wireguard-go: a backlog of
# 1/8 of its handshake queue; here there is no queue, so count a rate).
UNDER_LOAD_HANDSHAKES_PER_SECOND = 256
UNDER_LOAD_HOLD = 1.0
UNDER_LOAD_LOG_EVERY = 60.0  # seconds between "under load" lines, however often it flaps

#: Takes a datagram that is not WireGuard (and its source) and says whether it was its.
DatagramHandler = Callable[[memoryview, Address], bool]


class LoadDetector:
    """The under-load switch, sans-IO: on when more than `threshold` handshake messages
    arrive in one window of a second, and on until `hold` seconds after the last
    message over the threshold (wireguard-go keeps it `UnderLoadAfterTime`, 1 s).
    `entered` counts the times it went on; `handshakes` every message counted."""

    __slots__ = ("entered", "handshakes", "hold", "threshold", "until", "_in_window", "_window_start")

    def __init__(self, threshold: int = UNDER_LOAD_HANDSHAKES_PER_SECOND, hold: float = UNDER_LOAD_HOLD) -> None:
        self.threshold = threshold
        self.hold = hold
        self.until = float("-inf")
        self.entered = 0
        self.handshakes = 0
        self._window_start = float("-inf")
        self._in_window = 0

    def active(self, now: float) -> bool:
        return now < self.until

    def count(self, now: float) -> bool:
        """One handshake message arrived at `now`: whether the node is under load."""
        self.handshakes += 1
        if now - self._window_start >= 1.0:
            self._window_start = now
            self._in_window = 0
        self._in_window += 1
        if self._in_window > self.threshold:
            if now >= self.until:
                self.entered += 1
            self.until = now + self.hold
        return now < self.until


class DataPath:
    def __init__(self, device: Device, tun: Tun, bind: Bind, clock: Clock = SYSTEM_CLOCK, *,
                 mesh_ip: ipaddress.IPv4Address | None = None) -> None:
        self.device = device
        self.tun = tun
        self.bind = bind
        self.clock = clock
        self.filter: PacketFilter | None = None
        self._mesh_ip = mesh_ip.packed if mesh_ip is not None else b""  # where the daemon's ping comes to
        self.port = bind.port
        mtu = device.mtu
        # Buffers allocated once: packets from the TUN (room for padding),
        # datagrams to send, datagrams received, plaintext to the TUN.
        self._tun_buf = bytearray(mtu + 64)
        self._tun_bufs = [self._tun_buf]
        self._out_buf = bytearray(mtu + 64 + TRANSPORT_MIN_SIZE)
        self._out_view = memoryview(self._out_buf)
        self._udp_buf = bytearray(65536)
        self._udp_view = memoryview(self._udp_buf)
        self._plain_buf = bytearray(65536)
        self._plain_view = memoryview(self._plain_buf)
        self._touched: set[Peer] = set()
        self.load = LoadDetector()
        self._load_logged_at = float("-inf")
        self._datagram_handlers: list[DatagramHandler] = []
        self.drops: Counter[str] = Counter()
        self.pings: dict[tuple[int, int], asyncio.Future[float]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._flush_pending = False

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self.tun.fileno(), self._on_tun_readable)
        self._loop.add_reader(self.bind.fileno(), self._on_udp_readable)

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.remove_reader(self.tun.fileno())
            self._loop.remove_reader(self.bind.fileno())
            self._loop = None

    def register_datagrams(self, handler: DatagramHandler) -> None:
        """Hand `handler` the datagrams on the UDP port that are not WireGuard (the NAT
        prober's STUN answers, port-mapping replies). Handlers are asked in turn."""
        self._datagram_handlers.append(handler)

    # --- outbound ------------------------------------------------------------------

    def _on_tun_readable(self) -> None:
        try:
            self._drain_tun()
        except Exception:
            self._internal_error("outbound")
        self.flush()

    def _drain_tun(self) -> None:
        device, buf, bufs, out, out_view = self.device, self._tun_buf, self._tun_bufs, self._out_buf, self._out_view
        readv, sendto, touched, packet_filter = self.tun.readv, self.bind.sendto, self._touched, self.filter
        now, wall = self.clock.monotonic(), self.clock.wall()
        if packet_filter is not None:
            packet_filter.expire(now)
        for _ in range(BATCH):
            try:
                length = readv(bufs)
            except BlockingIOError:
                break
            except OSError as exc:
                self.drops[f"tun read: {exc.strerror}"] += 1
                break
            peer = device.route(buf, length)
            if peer is None:
                self.drops["no peer for destination"] += 1
                continue
            # [filter] outbound
            if packet_filter is not None and not packet_filter.outbound(peer.public_key, buf, length, now):
                continue
            touched.add(peer)
            size = peer.encrypt(buf, length, out, now, wall)
            if size:
                endpoint = peer.endpoint
                if endpoint.__class__ is not tuple:
                    if endpoint is None:
                        self.drops["peer has no endpoint"] += 1
                    else:
                        endpoint.send(out_view[:size])
                    continue
                try:
                    sendto(out_view[:size], endpoint)
                except BlockingIOError:
                    self.drops["udp send buffer full"] += 1
                except OSError as exc:
                    self.drops[f"udp send: {exc.strerror}"] += 1

    # --- inbound --------------------------------------------------------------------

    def _on_udp_readable(self) -> None:
        try:
            self._drain_udp()
        except Exception:
            self._internal_error("inbound")
        self.flush()

    def _internal_error(self, direction: str) -> None:
        # Policy: the packet in hand is dropped and counted, the error logged
        # (first time with its traceback), and the data path carries on.
        self.drops[f"internal error ({direction})"] += 1
        if self.drops[f"internal error ({direction})"] == 1:
            log.exception("datapath: %s batch failed", direction)
        else:
            log.error("datapath: %s batch failed again", direction)

    def _drain_udp(self) -> None:
        device, view, plain, udp_buf = self.device, self._udp_view, self._plain_buf, self._udp_buf
        recvfrom_into, deliver = self.bind.recvfrom_into, self._deliver
        now, wall = self.clock.monotonic(), self.clock.wall()
        under_load = self.load.active(now)
        if self.filter is not None:
            self.filter.expire(now)
        for _ in range(BATCH):
            try:
                size, source = recvfrom_into(udp_buf)
            except BlockingIOError:
                break
            except OSError as exc:
                self.drops[f"udp receive: {exc.strerror}"] += 1
                continue
            if size == 0 or udp_buf[0] != 4:  # demux: transport messages go straight on
                if size < 4 or not 0 < udp_buf[0] < 4 or udp_buf[1] or udp_buf[2] or udp_buf[3]:
                    self._other_datagram(view[:size], source)
                    continue
                under_load = self._count_handshake(now)
            length = device.receive(view[:size], source, now, wall, plain, under_load=under_load)
            if length:
                deliver(length, now)

    def _other_datagram(self, datagram: memoryview, source: Address) -> None:
        for handler in self._datagram_handlers:
            if handler(datagram, source):
                return
        self.drops["not a WireGuard message"] += 1

    def _deliver(self, length: int, now: float) -> None:
        """The one way a decrypted packet (at the start of the plaintext buffer) leaves
        the tunnel: to the daemon's own ping, else through the filter to the TUN."""
        if self.pings and self._answer_ping(length, now):
            return
        packet_filter = self.filter
        if packet_filter is not None:  # [filter] inbound
            peer = self.device.received_from
            assert peer is not None  # set by the receive that returned this packet
            if length == DAEMON_PING_LENGTH and daemon_echo_request(self._plain_buf, length, self._mesh_ip):
                self._answer_daemon_ping(peer, length, now)
                return
            if not packet_filter.inbound(peer.public_key, self._plain_buf, length, now):
                return
        try:
            self.tun.write(self._plain_view[:length])
        except BlockingIOError:
            self.drops["tun write would block"] += 1
        except OSError as exc:
            self.drops[f"tun write: {exc.strerror}"] += 1

    # --- links (the SSH and relay rungs) ------------------------------------------------

    def receive(self, link: Link, message: bytes | bytearray | memoryview) -> None:
        """One WireGuard message from a link: the same path as a UDP datagram."""
        now = self.clock.monotonic()
        try:
            under_load = self._count_handshake(now) if message and message[0] != 4 else now < self.load.until
            length = self.device.receive(message, link, now, self.clock.wall(), self._plain_buf, under_load=under_load)
            if length:
                self._deliver(length, now)
        except Exception:
            self._internal_error("inbound")
        device = self.device
        if (device.transmits or device.events or self._touched) and not self._flush_pending and self._loop is not None:
            self._flush_pending = True
            self._loop.call_soon(self.flush)

    def link_up(self, link: Link) -> None:
        session = self._session_for(link)
        if session is not None:
            session.on_link_up(link)

    def link_down(self, link: Link, reason: str) -> None:
        session = self._session_for(link)
        if session is not None:
            session.on_link_down(link, reason)

    def _session_for(self, link: Link) -> PeerSession | None:
        peer = self.device.peer(link.peer_key)
        return peer.owner if peer is not None else None

    def _count_handshake(self, now: float) -> bool:
        load = self.load
        entered = load.entered
        under_load = load.count(now)
        if load.entered != entered and now - self._load_logged_at >= UNDER_LOAD_LOG_EVERY:
            self._load_logged_at = now  # a line per flood, not per packet
            log.warning("datapath: over %d handshake messages a second: answering with cookies, "
                        "limiting handshakes per source", load.threshold)
        return under_load

    def _answer_ping(self, length: int, now: float) -> bool:
        key = echo_reply_key(self._plain_buf, length)
        future = self.pings.pop(key, None) if key is not None else None
        if future is None:
            return False
        if not future.done():
            future.set_result(now)
        return True

    def _answer_daemon_ping(self, peer: Peer, length: int, now: float) -> None:
        """Answer the peer daemon's echo request to this node (in the plaintext buffer)
        straight back to it: not through the TUN, so no packet filter rule is needed."""
        echo_reply_in_place(self._plain_buf, length)
        size = peer.encrypt(self._plain_buf, length, self._out_buf, now, self.clock.wall())
        if size and peer.endpoint is not None:
            self.send_to(self._out_view[:size], peer.endpoint)
        self._touched.add(peer)

    # --- side effects of the core -------------------------------------------------------

    def flush(self) -> None:
        self._flush_pending = False
        device = self.device
        if device.transmits:
            for datagram, endpoint in device.transmits:
                self.send_to(datagram, endpoint)
            device.transmits.clear()
        touched = self._touched
        while device.events:
            event = device.events.popleft()
            session: PeerSession = event.peer.owner
            try:
                session.on_event(event)
            except Exception:  # one session's failure must not lose the other events of the batch
                self.drops["internal error (event)"] += 1
                log.exception("%s: %s failed", session.name, type(event).__name__)
            touched.add(event.peer)
        for peer in touched:
            peer.owner.reschedule()
        touched.clear()

    def send_packet(self, peer: Peer, packet: bytes) -> None:
        """Send a packet the daemon made itself (the in-tunnel ping)."""
        buf = bytearray(self.device.mtu + 64)
        buf[: len(packet)] = packet
        size = peer.encrypt(buf, len(packet), self._out_buf, self.clock.monotonic(), self.clock.wall())
        if size and peer.endpoint is not None:
            self.send_to(self._out_view[:size], peer.endpoint)
        self._touched.add(peer)
        self.flush()

    def send_to(self, datagram: bytes | memoryview, endpoint: object) -> None:
        """Send one datagram the core queued (off the per-packet path)."""
        if endpoint.__class__ is not tuple:
            endpoint.send(datagram)  # type: ignore[attr-defined]
            return
        try:
            self.bind.sendto(datagram, endpoint)  # type: ignore[arg-type]
        except BlockingIOError:
            self.drops["udp send buffer full"] += 1
        except OSError as exc:
            self.drops[f"udp send: {exc.strerror}"] += 1
