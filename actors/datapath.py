"""The hot data path: the one place that does not pass messages.

DESIGN.md's exception to the actor rule. Per packet there is no queue hop, no
task switch, no log call and no buffer allocated (only small slice views):
`loop.add_reader` callbacks drain
the non-blocking TUN and UDP descriptors into buffers allocated once, and
call the protocol core directly.

    TUN readable -> read packet -> Device.route -> Peer.encrypt -> sendto
    UDP readable -> recvfrom_into -> Device.receive -> write to TUN

A peer's endpoint is a UDP address (a tuple) or a link of the SSH or relay
rung (tunnelmesh.links): the send is then `link.send`, which copies the
datagram into the link's own buffer. Links deliver what they receive to
`receive` (the data path is their `LinkSink`), one message per call, with the
side effects flushed once per event-loop iteration.

After each batch the core's side effects are flushed: datagrams it queued
(handshakes, keepalives, staged packets) are sent, its events go to the
peer-session actors' mailboxes, and the sessions of touched peers re-arm
their timers if a deadline moved earlier.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import time
from collections import Counter
from typing import TYPE_CHECKING

from tunnelmesh.packets import echo_reply_key
from tunnelmesh.wireguard import Device, Peer
from tunnelmesh.wireguard.constants import TRANSPORT_MIN_SIZE

if TYPE_CHECKING:
    from tunnelmesh.links import Link

    from .session import PeerSession

log = logging.getLogger("tunnelmesh.datapath")

BATCH = 512  # packets per readiness callback, so TUN and UDP take turns
SOCKET_BUFFER = 8 << 20
# Under load (cookie replies instead of handshakes) when more than this many
# handshake messages arrive within one second (wireguard-go: a backlog of
# 1/8 of its handshake queue; here there is no queue, so count a rate).
UNDER_LOAD_HANDSHAKES_PER_SECOND = 256
UNDER_LOAD_HOLD = 1.0


class UdpError(Exception):
    pass


def open_udp_socket(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            try:
                sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER)
            except OSError:
                pass
        sock.bind(("0.0.0.0", port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise UdpError(
                f"UDP port {port} is in use (another tunnelmesh or WireGuard?); set listen_port in the config"
            ) from None
        raise UdpError(f"cannot bind UDP port {port}: {exc.strerror}") from None
    sock.setblocking(False)
    return sock


class DataPath:
    def __init__(self, device: Device, tun_fd: int, sock: socket.socket) -> None:
        self.device = device
        self.tun_fd = tun_fd
        self.sock = sock
        self.port = sock.getsockname()[1]
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
        self._handshake_window_start = 0.0
        self._handshakes_in_window = 0
        self._under_load_until = 0.0
        self.drops: Counter[str] = Counter()
        self.pings: dict[tuple[int, int], asyncio.Future[float]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._flush_pending = False

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self.tun_fd, self._on_tun_readable)
        self._loop.add_reader(self.sock.fileno(), self._on_udp_readable)

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.remove_reader(self.tun_fd)
            self._loop.remove_reader(self.sock.fileno())
            self._loop = None

    # --- outbound ------------------------------------------------------------------

    def _on_tun_readable(self) -> None:
        try:
            self._drain_tun()
        except Exception:
            self._internal_error("outbound")
        self.flush()

    def _drain_tun(self) -> None:
        device, buf, bufs, out, out_view = self.device, self._tun_buf, self._tun_bufs, self._out_buf, self._out_view
        fd, sock, touched = self.tun_fd, self.sock, self._touched
        now, wall = time.monotonic(), time.time()
        for _ in range(BATCH):
            try:
                length = os.readv(fd, bufs)
            except BlockingIOError:
                break
            except OSError as exc:
                self.drops[f"tun read: {exc.strerror}"] += 1
                break
            peer = device.route(buf, length)
            if peer is None:
                self.drops["no peer for destination"] += 1
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
                    sock.sendto(out_view[:size], endpoint)
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
        device, sock, view, plain, plain_view = self.device, self.sock, self._udp_view, self._plain_buf, self._plain_view
        fd, udp_buf = self.tun_fd, self._udp_buf
        now, wall = time.monotonic(), time.time()
        under_load = now < self._under_load_until
        for _ in range(BATCH):
            try:
                size, source = sock.recvfrom_into(udp_buf)
            except BlockingIOError:
                break
            except OSError as exc:
                self.drops[f"udp receive: {exc.strerror}"] += 1
                continue
            if size and udp_buf[0] != 4:
                under_load = self._count_handshake(now)
            length = device.receive(view[:size], source, now, wall, plain, under_load=under_load)
            if length:
                if self.pings and self._answer_ping(length, now):
                    continue
                try:
                    os.write(fd, plain_view[:length])
                except BlockingIOError:
                    self.drops["tun write would block"] += 1
                except OSError as exc:
                    self.drops[f"tun write: {exc.strerror}"] += 1

    # --- links (the SSH and relay rungs) ------------------------------------------------

    def receive(self, link: Link, message: bytes | bytearray | memoryview) -> None:
        """One WireGuard message from a link: the same path as a UDP datagram."""
        now = time.monotonic()
        try:
            under_load = self._count_handshake(now) if message and message[0] != 4 else now < self._under_load_until
            length = self.device.receive(message, link, now, time.time(), self._plain_buf, under_load=under_load)
            if length and not (self.pings and self._answer_ping(length, now)):
                try:
                    os.write(self.tun_fd, self._plain_view[:length])
                except BlockingIOError:
                    self.drops["tun write would block"] += 1
                except OSError as exc:
                    self.drops[f"tun write: {exc.strerror}"] += 1
        except Exception:
            self._internal_error("inbound")
        device = self.device
        if (device.transmits or device.events) and not self._flush_pending and self._loop is not None:
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
        return peer.tag if peer is not None else None

    def _count_handshake(self, now: float) -> bool:
        if now - self._handshake_window_start >= 1.0:
            self._handshake_window_start = now
            self._handshakes_in_window = 0
        self._handshakes_in_window += 1
        if self._handshakes_in_window > UNDER_LOAD_HANDSHAKES_PER_SECOND:
            self._under_load_until = now + UNDER_LOAD_HOLD
        return now < self._under_load_until

    def _answer_ping(self, length: int, now: float) -> bool:
        key = echo_reply_key(self._plain_buf, length)
        future = self.pings.pop(key, None) if key is not None else None
        if future is None:
            return False
        if not future.done():
            future.set_result(now)
        return True

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
            session: PeerSession = event.peer.tag
            session.on_event(event)
            touched.add(event.peer)
        for peer in touched:
            peer.tag.reschedule()
        touched.clear()

    def send_packet(self, peer: Peer, packet: bytes) -> None:
        """Send a packet the daemon made itself (the in-tunnel ping)."""
        buf = bytearray(self.device.mtu + 64)
        buf[: len(packet)] = packet
        size = peer.encrypt(buf, len(packet), self._out_buf, time.monotonic(), time.time())
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
            self.sock.sendto(datagram, endpoint)
        except BlockingIOError:
            self.drops["udp send buffer full"] += 1
        except OSError as exc:
            self.drops[f"udp send: {exc.strerror}"] += 1
