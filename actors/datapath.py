"""The hot data path: the one place that does not pass messages.

DESIGN.md's exception to the actor rule. Per packet there is no queue hop, no
task switch, no log call and no buffer allocated (only small slice views, and the
integers a segment's checksums are summed in; a super-packet's header template):
`loop.add_reader` callbacks drain the non-blocking TUN and UDP edges
(actors/edges.py) into buffers allocated once, and call the protocol core
directly. The stages, in order:

    outbound: TUN readable -> readv -> Device.route -> [filter] -> [segment] -> Peer.encrypt -> batch -> send
    inbound:  UDP readable -> recvmsg_into -> [split] -> demux -> Device.receive -> deliver
    deliver:  in-tunnel ping answers, capability questions and answers taken -> [coalesce] or [filter] -> [coalesce] -> write to the TUN

Segments to a peer whose daemon said it completes checksums (`ask_caps`, after each
handshake; docs/architecture.md "Inner checksums between daemons") leave their TCP/UDP
checksums partial, and a packet that comes with its checksum partial is written for the
kernel to complete.

A UDP batch that wrote to the TUN ends, after its flush (its events may move the
endpoint), with the outbound drain: what the kernel answered (a ping's reply, TCP's
ACKs) is queued by the time the write returns, so it leaves in the same loop turn
rather than after another epoll wake-up.

The offloads (docs/architecture.md, "Data path"): with a TUN that has the virtio-net
header (actors/tun.py), a read may be a TCP or UDP super-packet of up to 64 KiB;
`[segment]` splits it in place into MTU-sized packets (tunnelmesh.offload.segments),
each sealed as it is made, and `[coalesce]` joins consecutive received segments of a TCP
flow into one super-packet for one write (tunnelmesh.offload.Coalescer), written at the
end of the batch at the latest. Sealed datagrams to one UDP address are laid end to end
in one buffer and leave in one `sendmsg` with UDP_SEGMENT (`batch`, up to 64), and what
the kernel joined on receive (UDP_GRO) is `[split]` back. The filter judges a
super-packet once: its headers are every segment's. Without the offloads (older
kernels, the in-memory doubles of the tests) each stage passes single packets through.

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
sessions of touched peers (sent to, or named in the core's `timers_changed`: an
authenticated transport message came from them, or their initiation was answered)
re-arm their timers if a deadline moved earlier.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import struct
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING

from tunnelmesh.clock import SYSTEM_CLOCK, Clock
from tunnelmesh.offload import (
    GSO_NONE, MAX_PACKET, NEEDS_CSUM, VNET_HDR, VNET_HDR_SIZE, Coalescer, complete_checksum, partial_checksum_at,
    segments, super_packet_layout,
)
from tunnelmesh.packets import (
    CAPS_COMPLETES_CHECKSUMS, CAPS_REPLY, CAPS_REQUEST, CAPS_REQUEST_LENGTH, DAEMON_PING_LENGTH, daemon_echo_request,
    echo_reply_in_place, echo_reply_key, icmp_echo,
)
from tunnelmesh.wireguard import Device, Peer
from tunnelmesh.wireguard.constants import TRANSPORT_MIN_SIZE

from .edges import GRO_CMSG_SPACE, SOL_UDP, UDP_SEGMENT, Address, Bind, Tun, gro_segment_size

if TYPE_CHECKING:
    from tunnelmesh.filter import PacketFilter
    from tunnelmesh.links import Link

    from .session import PeerSession

log = logging.getLogger("tunnelmesh.datapath")

BATCH = 512  # packets per readiness callback (a super-packet's segments each count), so TUN and UDP take turns
GSO_SEGMENTS = 64  # datagrams per sendmsg at most (the kernel's UDP_MAX_SEGMENTS)
PARTIAL_SINGLES_FROM = 512  # bytes: a single packet this long to a peer that completes checksums is left partial
GSO_BYTES = 65507 - 1500  # a batch stops short of the largest UDP payload, with room for one more
#: sendmsg errors that mean "no GSO here" (a device without checksum offload, a kernel
#: without it): the batch goes again a datagram at a time, and batching stays off.
GSO_REFUSED = frozenset({errno.EIO, errno.ENOPROTOOPT, errno.EOPNOTSUPP})
#: "not this batch" (segments larger than the route's MTU): it goes again a datagram at a
#: time, batching stays on for the others.
GSO_NOT_THIS_BATCH = errno.EINVAL
_ONE_DATAGRAM = (0,)
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
        # The virtio-net header's room before every TUN packet (0 without offloads).
        self._hdr = hdr = VNET_HDR_SIZE if tun.vnet_hdr else 0
        # Buffers allocated once: packets from the TUN (super-packets with the
        # offloads; room for padding), a segment that must be padded, the send batch of
        # sealed datagrams, datagrams received, plaintext to the TUN (after the header).
        self._tun_buf = bytearray(hdr + (MAX_PACKET if hdr else mtu) + 64)
        self._tun_bufs = [self._tun_buf]
        self._tun_packet = memoryview(self._tun_buf)[hdr:]
        self._scratch = bytearray(mtu + 64)
        self._scratch_view = memoryview(self._scratch)
        self._out_buf = bytearray(GSO_BYTES + mtu + 64 + TRANSPORT_MIN_SIZE)
        self._out_view = memoryview(self._out_buf)
        self._udp_buf = bytearray(65536)
        self._udp_bufs = [self._udp_buf]
        self._udp_view = memoryview(self._udp_buf)
        self._plain_buf = bytearray(hdr + 65536)
        self._plain_view = memoryview(self._plain_buf)
        self._plain = self._plain_view[hdr:]
        self._coalescer = Coalescer() if hdr else None
        # The send batch: datagrams to one UDP address, all `_batch_size` long but the
        # last, end to end at the start of `_out_buf`.
        self._batch_to: Address | None = None
        self._batch_len = 0
        self._batch_size = 0
        self._batch_count = 0
        self._batch_closed = False  # a shorter datagram ended it
        self._gso_max = GSO_SEGMENTS if bind.gso else 1
        self._segment_cmsgs: dict[int, list[tuple[int, int, bytes]]] = {}
        self._touched: set[Peer] = set()
        self.load = LoadDetector()
        self._load_logged_at = float("-inf")
        self._datagram_handlers: list[DatagramHandler] = []
        self.drops: Counter[str] = Counter()
        self.pings: dict[tuple[int, int], asyncio.Future[float]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._flush_pending = False
        self._wrote_tun = False  # since the UDP batch began
        self._plain_header_set = False  # the plaintext buffer's virtio-net header is not all zero

    @property
    def offloads(self) -> str:
        """The kernel offloads in use, for `status`: "tun csum tso uso, udp gso gro", "none"."""
        parts = [f"tun {self.tun.offloads}"] if self._hdr else []  # "tun none": the header without offloads
        udp = " ".join(name for name, on in (("gso", self._gso_max > 1), ("gro", self.bind.gro)) if on)
        if udp:
            parts.append(f"udp {udp}")
        return ", ".join(parts) or "none"

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
        if self._batch_count:  # what the batch holds leaves before the callback returns
            self._send_batch()
        self.flush()

    def _drain_tun(self) -> None:
        device, buf, bufs, packet, hdr = self.device, self._tun_buf, self._tun_bufs, self._tun_packet, self._hdr
        readv, touched, packet_filter, seal = self.tun.readv, self._touched, self.filter, self._seal
        now, wall = self.clock.monotonic(), self.clock.wall()
        if packet_filter is not None:
            packet_filter.expire(now)
        budget, mtu = BATCH, device.mtu
        while budget > 0:
            budget -= 1
            try:
                length = readv(bufs) - hdr
            except BlockingIOError:
                break
            except OSError as exc:
                self.drops[f"tun read: {exc.strerror}"] += 1
                break
            peer = device.route(packet, length)
            if peer is None:
                self.drops["no peer for destination"] += 1
                continue
            # [filter] outbound
            if packet_filter is not None and not packet_filter.outbound(peer.public_key, packet, length, now):
                continue
            touched.add(peer)
            if hdr and (buf[0] or buf[1]):  # the kernel left a checksum or a segmentation to us
                flags, gso_type, _, gso_size, csum_start, csum_offset = VNET_HDR.unpack_from(buf)
                if gso_type:
                    budget -= self._seal_segments(peer, length, gso_type, gso_size, csum_start, now, wall)
                    continue
                # A peer that completes checksums gets a large one partial too (a small one costs
                # less to sum than to look at), when it can tell (`partial_checksum_at`).
                if flags & NEEDS_CSUM and not (length >= PARTIAL_SINGLES_FROM and peer.completes_checksums
                                               and partial_checksum_at(packet, length) == (csum_start, csum_offset)) \
                        and not complete_checksum(packet, length, csum_start, csum_offset):
                    self.drops["bad checksum offsets from the TUN"] += 1
                    continue
            if length > mtu:  # the interface's MTU raised under us (`ip link set ... mtu`)
                self.drops["packet larger than the MTU"] += 1
                continue
            seal(peer, packet, length, now, wall)

    def _seal_segments(self, peer: Peer, length: int, gso_type: int, gso_size: int, csum_start: int,
                       now: float, wall: float) -> int:
        """[segment]: seal the super-packet in the TUN buffer a segment at a time; how many
        segments it had (0 when it was dropped)."""
        packet = self._tun_packet
        layout = super_packet_layout(packet, length, gso_type, gso_size, csum_start)
        if layout is None:
            self.drops["malformed super-packet from the TUN"] += 1
            return 0
        header = layout[1] + layout[2]
        full = header + gso_size
        mtu, scratch, seal = self.device.mtu, self._scratch, self._seal
        if full > mtu:
            self.drops["packet larger than the MTU"] += 1
            return 0
        # A peer that completes checksums gets them partial (IPv6: only without extension
        # headers, which it can classify): a quarter of the work a segment costs here.
        checksums = not peer.completes_checksums or layout[1] > 40
        for start in segments(packet, length, layout, gso_size, checksums=checksums):
            size = full if start + full < length else length - start
            if size & 15 and size < mtu and start + size < length:
                # Its padding would land on the next segment's payload: pad a copy.
                scratch[:size] = packet[start:start + size]
                seal(peer, self._scratch_view, size, now, wall)
            else:
                seal(peer, packet[start:], size, now, wall)
        return -(-(length - header) // gso_size)

    def _seal(self, peer: Peer, packet: memoryview, length: int, now: float, wall: float) -> None:
        """Seal one packet into the send batch, or hand it to the peer's link."""
        at = self._batch_len
        size = peer.encrypt(packet, length, self._out_view[at:], now, wall)
        if not size:
            return  # staged until a session is up
        endpoint = peer.endpoint
        if endpoint.__class__ is not tuple:
            if endpoint is None:
                self.drops["peer has no endpoint"] += 1
            else:
                endpoint.send(self._out_view[at:at + size])
            return
        if self._batch_count:
            if (not self._batch_closed and size <= self._batch_size and at + size <= GSO_BYTES
                    and (endpoint is self._batch_to or endpoint == self._batch_to)):
                self._batch_len = at + size
                self._batch_count += 1
                self._batch_closed = size < self._batch_size
                if self._batch_count >= self._gso_max:
                    self._send_batch()
                return
            self._send_batch()
            self._out_view[:size] = self._out_view[at:at + size]  # a memmove: the two may overlap
        self._batch_to = endpoint
        self._batch_len = self._batch_size = size
        self._batch_count = 1
        if self._gso_max == 1:
            self._send_batch()

    def _send_batch(self) -> None:
        """Send the batch: one datagram with sendto, several in one GSO sendmsg."""
        count, length, size, to = self._batch_count, self._batch_len, self._batch_size, self._batch_to
        self._batch_count = self._batch_len = 0
        self._batch_closed = False
        datagrams = self._out_view[:length]
        try:
            if count == 1:
                self.bind.sendto(datagrams, to)
            else:
                cmsg = self._segment_cmsgs.get(size)
                if cmsg is None:
                    cmsg = self._segment_cmsgs[size] = [(SOL_UDP, UDP_SEGMENT, struct.pack("=H", size))]
                self.bind.sendmsg([datagrams], cmsg, 0, to)
        except BlockingIOError:
            self.drops["udp send buffer full"] += count
        except OSError as exc:
            if count > 1 and (exc.errno in GSO_REFUSED or exc.errno == GSO_NOT_THIS_BATCH):
                if exc.errno in GSO_REFUSED:
                    self._gso_max = 1
                    log.warning("datapath: the kernel refused a batched UDP send (%s): sending a datagram per call",
                                exc.strerror)
                for start in range(0, length, size):
                    self.send_to(datagrams[start:start + size], to)
            else:
                self.drops[f"udp send: {exc.strerror}"] += count

    # --- inbound --------------------------------------------------------------------

    def _on_udp_readable(self) -> None:
        self._wrote_tun = False
        try:
            self._drain_udp()
        except Exception:
            self._internal_error("inbound")
        self._write_coalesced()  # the pending super-packet leaves with its batch
        self.flush()  # first: the batch's events may move the endpoint the answers go to
        if self._wrote_tun:
            # The kernel's answers to what was just written (a ping's reply, TCP's ACKs) are
            # queued on the TUN already: they leave now, not after another loop turn.
            self._on_tun_readable()

    def _internal_error(self, direction: str) -> None:
        # Policy: the packet in hand is dropped and counted, the error logged
        # (first time with its traceback), and the data path carries on.
        self.drops[f"internal error ({direction})"] += 1
        if self.drops[f"internal error ({direction})"] == 1:
            log.exception("datapath: %s batch failed", direction)
        else:
            log.error("datapath: %s batch failed again", direction)

    def _drain_udp(self) -> None:
        device, view, plain, udp_buf, udp_bufs = self.device, self._udp_view, self._plain, self._udp_buf, self._udp_bufs
        bind, deliver = self.bind, self._deliver
        gro, recvmsg_into, recvfrom_into = bind.gro, bind.recvmsg_into if bind.gro else None, bind.recvfrom_into
        now, wall = self.clock.monotonic(), self.clock.wall()
        under_load = self.load.active(now)
        if self.filter is not None:
            self.filter.expire(now)
        budget = BATCH
        while budget > 0:
            budget -= 1
            try:
                if gro:
                    size, ancillary, _, source = recvmsg_into(udp_bufs, GRO_CMSG_SPACE)
                    step = gro_segment_size(ancillary, size) if ancillary else size
                else:
                    size, source = recvfrom_into(udp_buf)
                    step = size
            except BlockingIOError:
                break
            except OSError as exc:
                self.drops[f"udp receive: {exc.strerror}"] += 1
                continue
            # [split]: the datagrams the kernel joined (UDP_GRO), each `step` long but the last
            if step < size:
                budget -= -(-size // step) - 1  # each joined datagram counts
            for start in range(0, size, step) if step < size else _ONE_DATAGRAM:
                end = start + step if start + step < size else size
                if end == start or udp_buf[start] != 4:  # demux: transport messages go straight on
                    if (end - start < 4 or not 0 < udp_buf[start] < 4 or udp_buf[start + 1] or udp_buf[start + 2]
                            or udp_buf[start + 3]):
                        self._other_datagram(view[start:end], source)
                        continue
                    under_load = self._count_handshake(now)
                length = device.receive(view[start:end], source, now, wall, plain, under_load=under_load)
                if length:
                    deliver(length, now)

    def _other_datagram(self, datagram: memoryview, source: Address) -> None:
        for handler in self._datagram_handlers:
            if handler(datagram, source):
                return
        self.drops["not a WireGuard message"] += 1

    def _deliver(self, length: int, now: float) -> None:
        """The one way a decrypted packet (at the start of the plaintext buffer) leaves
        the tunnel: to the daemon's own ping, else joined to the pending super-packet when
        it continues it (judged with its first segment), else through the filter to the TUN."""
        if self.pings and self._answer_ping(length, now):
            return
        sender = self.device.received_from
        if sender is not None and sender.caps_question is not None and self._take_caps_answer(length, now):
            return
        plain = self._plain
        if length == CAPS_REQUEST_LENGTH and daemon_echo_request(plain, length, self._mesh_ip, CAPS_REQUEST):
            self._answer_caps()
            return
        coalescer = self._coalescer
        if coalescer is not None and coalescer.pending and coalescer.continues(plain, length):
            # [coalesce] The pending super-packet's next segment: the same addresses, ports
            # and flags (ACK), so the same sender (cryptokey routing) and the same verdict
            # as its first segment, which passed the filter in this batch.
            coalescer.append(plain, length)
            return
        packet_filter = self.filter
        if packet_filter is not None:  # [filter] inbound
            peer = self.device.received_from
            assert peer is not None  # set by the receive that returned this packet
            if length == DAEMON_PING_LENGTH and daemon_echo_request(plain, length, self._mesh_ip):
                self._answer_daemon_ping(peer, length, now)
                return
            if not packet_filter.inbound(peer.public_key, plain, length, now):
                return
        if coalescer is not None:  # [coalesce]
            if coalescer.pending:
                self._write_tun(coalescer.finish())
            if coalescer.start(plain, length):
                return
        if self._hdr:
            self._set_plain_header(length)
        self._write_tun(self._plain_view[:self._hdr + length])

    def _set_plain_header(self, length: int) -> None:
        """The virtio-net header of a packet written alone: its checksum left to the kernel
        when its sender left it partial (`partial_checksum_at`: whoever sent it, so that a
        restart on either side loses nothing), else empty."""
        where = partial_checksum_at(self._plain, length)
        if where is not None:
            VNET_HDR.pack_into(self._plain_buf, 0, NEEDS_CSUM, GSO_NONE, 0, 0, where[0], where[1])
            self._plain_header_set = True
        elif self._plain_header_set:
            VNET_HDR.pack_into(self._plain_buf, 0, 0, GSO_NONE, 0, 0, 0, 0)
            self._plain_header_set = False

    def _write_coalesced(self) -> None:
        coalescer = self._coalescer
        if coalescer is not None and coalescer.pending:
            self._write_tun(coalescer.finish())

    def _write_tun(self, data: memoryview) -> None:
        self._wrote_tun = True
        try:
            self.tun.write(data)
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
            length = self.device.receive(message, link, now, self.clock.wall(), self._plain, under_load=under_load)
            if length:
                self._deliver(length, now)
                self._write_coalesced()
        except Exception:
            self._internal_error("inbound")
        device = self.device
        if (device.transmits or device.events or device.timers_changed or self._touched) and not self._flush_pending \
                and self._loop is not None:
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
        key = echo_reply_key(self._plain, length)
        future = self.pings.pop(key, None) if key is not None else None
        if future is None:
            return False
        if not future.done():
            future.set_result(now)
        return True

    # --- what the daemons can do, asked in the tunnel (tunnelmesh.packets CAPS_*) ------------

    def ask_caps(self, peer: Peer, request: bytes, key: tuple[int, int]) -> None:
        """Ask the peer's daemon what it can do (`request`: the session's echo request with
        CAPS_REQUEST, `key` its (ident, seq)), after every handshake: the peer may have
        restarted with less. Until it answers, what is sent to it carries whole checksums.
        Without the offloads nothing would be left partial: nothing is asked."""
        peer.completes_checksums = False
        if not self._hdr:
            return
        peer.caps_question = key  # one question out per peer: a later one replaces it
        self._send_own(peer, request)

    def caps_unanswered(self, peer: Peer) -> bool:
        """Whether the last question to the peer is still out (nothing answered it, not
        even a kernel's echo: its ICMP is dropped, or it is down)."""
        return peer.caps_question is not None

    def _take_caps_answer(self, length: int, now: float) -> bool:
        """Whether the packet answers one of our requests (then it is taken): the peer's
        daemon answers with CAPS_REPLY and its capabilities; a kernel echoes the request,
        which leaves the peer getting whole checksums. A keepalive acknowledges the answer:
        the peer's daemon sent data that nothing else would answer, and its ladder would
        take that for a failing path."""
        plain = self._plain
        peer = self.device.received_from
        assert peer is not None  # set by the receive that returned this packet
        if echo_reply_key(plain, length) != peer.caps_question:
            return False
        peer.caps_question = None
        payload = bytes(plain[(plain[0] & 0x0F) * 4 + 8:length])
        peer.completes_checksums = (payload.startswith(CAPS_REPLY)
                                    and CAPS_COMPLETES_CHECKSUMS in payload[len(CAPS_REPLY):].split())
        peer.send_keepalive(now, self.clock.wall())
        return True

    def _answer_caps(self) -> None:
        """The peer's daemon asks what this one can do: the answer goes straight back, not
        through the TUN or the filter. With the offloads this node completes the checksums
        it finds left partial in what it writes to the TUN (`_set_plain_header`)."""
        peer = self.device.received_from
        assert peer is not None  # set by the receive that returned this packet
        plain = self._plain
        ident, seq = struct.unpack_from("!HH", plain, 24)
        answer = icmp_echo(ipaddress.IPv4Address(bytes(plain[16:20])), ipaddress.IPv4Address(bytes(plain[12:16])),
                           ident, seq, CAPS_REPLY + (CAPS_COMPLETES_CHECKSUMS if self._hdr else b""), reply=True)
        self._send_own(peer, answer)

    def _answer_daemon_ping(self, peer: Peer, length: int, now: float) -> None:
        """Answer the peer daemon's echo request to this node (in the plaintext buffer)
        straight back to it: not through the TUN, so no packet filter rule is needed."""
        echo_reply_in_place(self._plain, length)
        size = peer.encrypt(self._plain, length, self._out_buf, now, self.clock.wall())
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
        if device.timers_changed:
            touched |= device.timers_changed
            device.timers_changed.clear()
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
        """Send a packet the daemon made itself (the in-tunnel ping), and flush."""
        self._send_own(peer, packet)
        self.flush()

    def _send_own(self, peer: Peer, packet: bytes) -> None:
        buf = bytearray(self.device.mtu + 64)
        buf[: len(packet)] = packet
        size = peer.encrypt(buf, len(packet), self._out_buf, self.clock.monotonic(), self.clock.wall())
        if size and peer.endpoint is not None:
            self.send_to(self._out_view[:size], peer.endpoint)
        self._touched.add(peer)

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
