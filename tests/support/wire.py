"""Two protocol cores joined by an in-memory wire (STYLE.md: h11's PeerPair).

Nothing here opens a socket or reads a clock: the test steps `now` by hand.
"""

from __future__ import annotations

import ipaddress
import random
import struct
from collections.abc import Callable, Iterable

from tunnelmesh.wireguard import Device, Peer
from tunnelmesh.wireguard.crypto import x25519_public

PSK = bytes(range(32))
A_ADDR = ("192.0.2.1", 51820)
B_ADDR = ("192.0.2.2", 51820)
A_IP = "100.100.0.1"
B_IP = "100.100.0.2"


def seeded_rng(seed: int) -> Callable[[int], bytes]:
    generator = random.Random(seed)
    return lambda n: generator.randbytes(n)


def ipv4_packet(src: str, dst: str, payload: bytes, proto: int = 17) -> bytes:
    total = 20 + len(payload)
    header = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, total, 0, 0, 64, proto, 0,
        ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed,
    )
    return header + payload


def ipv6_packet(src: str, dst: str, payload: bytes, next_header: int = 17) -> bytes:
    header = struct.pack(
        "!IHBB16s16s", 6 << 28, len(payload), next_header, 64,
        ipaddress.IPv6Address(src).packed, ipaddress.IPv6Address(dst).packed,
    )
    return header + payload


def kind(datagram: bytes) -> int:
    """The WireGuard message type of a datagram (first byte; reserved bytes ignored)."""
    return datagram[0]


def _networks(cidrs: Iterable[str]) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(ipaddress.ip_network(c) for c in cidrs)


class PeerPair:
    """Node A and node B, each a Device with the other as its only peer.

    `deliver()` moves every queued datagram to the device its endpoint names,
    unless `drop` says otherwise; `now` and `wall` are stepped by the test.
    `under_load` is False, True (both devices) or "a" / "b" (only that one).
    `a_allows` / `b_allows` are the allowed IPs A configures for B and B for A.
    """

    def __init__(
        self,
        *,
        persistent_keepalive: float = 0.0,
        mtu: int = 1420,
        seed: int = 1,
        a_allows: Iterable[str] = (f"{B_IP}/32",),
        b_allows: Iterable[str] = (f"{A_IP}/32",),
    ) -> None:
        rng = seeded_rng(seed)
        self.a_private = rng(32)
        self.b_private = rng(32)
        self.now = 1000.0
        self.wall = 1_700_000_000.0
        self.a = Device(self.a_private, mtu=mtu, rng=rng)
        self.b = Device(self.b_private, mtu=mtu, rng=rng)
        self.a_peer: Peer = self.a.add_peer(
            x25519_public(self.b_private), preshared_key=PSK,
            allowed_ips=_networks(a_allows), endpoint=B_ADDR,
            persistent_keepalive=persistent_keepalive, owner="b",
        )
        self.b_peer: Peer = self.b.add_peer(
            x25519_public(self.a_private), preshared_key=PSK,
            allowed_ips=_networks(b_allows), endpoint=A_ADDR,
            persistent_keepalive=persistent_keepalive, owner="a",
        )
        self.delivered_to_a: list[bytes] = []
        self.delivered_to_b: list[bytes] = []
        self.wire_log: list[tuple[str, bytes]] = []
        self.drop: Callable[[str, bytes], bool] = lambda direction, datagram: False
        self.under_load: bool | str = False

    def advance(self, seconds: float) -> None:
        self.now += seconds
        self.wall += seconds

    def at(self, when: float) -> None:
        """Set the monotonic clock to `when`, moving the wall clock along."""
        self.advance(when - self.now)

    def send(self, sender: str, payload: bytes = b"hello") -> int:
        src, dst = (A_IP, B_IP) if sender == "a" else (B_IP, A_IP)
        return self.send_packet(sender, ipv4_packet(src, dst, payload))

    def send_packet(self, sender: str, packet: bytes) -> int:
        """Encrypt any inner packet as the daemon would; queues the datagram
        and returns its size, or 0 if the packet was staged."""
        device, peer = (self.a, self.a_peer) if sender == "a" else (self.b, self.b_peer)
        buf = bytearray(max(device.mtu, len(packet)) + 32)
        buf[: len(packet)] = packet
        out = bytearray(len(buf) + 64)
        size = peer.encrypt(buf, len(packet), out, self.now, self.wall)
        if size:
            device.transmits.append((bytes(out[:size]), peer.endpoint))
        return size

    def handshake(self) -> None:
        """A initiates and B confirms with A's keepalive; the wire ends quiet."""
        self.a_peer.send_handshake_initiation(self.now, self.wall)
        self.deliver()
        assert self.a_peer.current is not None and self.b_peer.current is not None

    def inject(self, to: str, datagram: bytes, source: tuple[str, int] | None = None) -> int:
        """Hand one datagram straight to a device (no drop hook, not logged)."""
        if to == "a":
            return self._into(self.a, datagram, source or B_ADDR, self.delivered_to_a)
        return self._into(self.b, datagram, source or A_ADDR, self.delivered_to_b)

    def sent(self, direction: str, message_type: int | None = None) -> list[bytes]:
        """Datagrams that went onto the wire ("a->b" or "b->a"), dropped or not."""
        return [d for way, d in self.wire_log if way == direction and (message_type is None or kind(d) == message_type)]

    def run_until(self, deadline: float) -> None:
        """Step the clock from timer deadline to timer deadline up to `deadline`
        (absolute), firing timers and delivering after each step."""
        while True:
            timers = [t for t in (self.a.get_timer(), self.b.get_timer()) if t is not None]
            nxt = min(timers) if timers else None
            if nxt is None or nxt > deadline:
                break
            self.advance(max(0.0, nxt - self.now))
            self.tick()
            self.deliver()
        self.advance(deadline - self.now)

    def deliver(self, rounds: int = 10) -> int:
        """Move datagrams until the wire is quiet; returns how many moved."""
        moved = 0
        for _ in range(rounds):
            if not (self.a.transmits or self.b.transmits):
                return moved
            moved += self.deliver_once()
        if self.a.transmits or self.b.transmits:
            raise AssertionError("wire did not go quiet")
        return moved

    def deliver_once(self) -> int:
        """Move only what is queued now (answers stay queued); returns how many moved."""
        batch = [("a->b", d, e) for d, e in self.a.transmits] + [("b->a", d, e) for d, e in self.b.transmits]
        self.a.transmits.clear()
        self.b.transmits.clear()
        moved = 0
        for direction, datagram, endpoint in batch:
            self.wire_log.append((direction, datagram))
            if self.drop(direction, datagram):
                continue
            moved += 1
            if direction == "a->b":
                assert endpoint == B_ADDR, endpoint
                self._into(self.b, datagram, A_ADDR, self.delivered_to_b)
            else:
                assert endpoint == A_ADDR, endpoint
                self._into(self.a, datagram, B_ADDR, self.delivered_to_a)
        return moved

    def _loaded(self, device: Device) -> bool:
        if isinstance(self.under_load, str):
            return (device is self.a) == (self.under_load == "a")
        return bool(self.under_load)

    def _into(self, device: Device, datagram: bytes, source: tuple[str, int], sink: list[bytes]) -> int:
        out = bytearray(max(device.mtu, len(datagram)) + 64)
        n = device.receive(datagram, source, self.now, self.wall, out, under_load=self._loaded(device))
        if n:
            sink.append(bytes(out[:n]))
        return n

    def tick(self) -> None:
        self.a.handle_timer(self.now, self.wall)
        self.b.handle_timer(self.now, self.wall)
