"""Two protocol cores joined by an in-memory wire (STYLE.md: h11's PeerPair).

Nothing here opens a socket or reads a clock: the test steps `now` by hand.
"""

from __future__ import annotations

import ipaddress
import random
import struct
from collections.abc import Callable

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


class PeerPair:
    """Node A and node B, each a Device with the other as its only peer.

    `deliver()` moves every queued datagram to the device its endpoint names,
    unless `drop` says otherwise; `now` and `wall` are stepped by the test.
    """

    def __init__(self, *, persistent_keepalive: float = 0.0, mtu: int = 1420, seed: int = 1) -> None:
        rng = seeded_rng(seed)
        self.a_private = rng(32)
        self.b_private = rng(32)
        self.now = 1000.0
        self.wall = 1_700_000_000.0
        self.a = Device(self.a_private, mtu=mtu, rng=rng)
        self.b = Device(self.b_private, mtu=mtu, rng=rng)
        self.a_peer: Peer = self.a.add_peer(
            x25519_public(self.b_private), preshared_key=PSK,
            allowed_ips=(ipaddress.ip_network(f"{B_IP}/32"),), endpoint=B_ADDR,
            persistent_keepalive=persistent_keepalive, tag="b",
        )
        self.b_peer: Peer = self.b.add_peer(
            x25519_public(self.a_private), preshared_key=PSK,
            allowed_ips=(ipaddress.ip_network(f"{A_IP}/32"),), endpoint=A_ADDR,
            persistent_keepalive=persistent_keepalive, tag="a",
        )
        self.delivered_to_a: list[bytes] = []
        self.delivered_to_b: list[bytes] = []
        self.wire_log: list[tuple[str, bytes]] = []
        self.drop: Callable[[str, bytes], bool] = lambda direction, datagram: False
        self.under_load = False

    def advance(self, seconds: float) -> None:
        self.now += seconds
        self.wall += seconds

    def send(self, sender: str, payload: bytes = b"hello") -> int:
        device, peer = (self.a, self.a_peer) if sender == "a" else (self.b, self.b_peer)
        src, dst = (A_IP, B_IP) if sender == "a" else (B_IP, A_IP)
        packet = ipv4_packet(src, dst, payload)
        buf = bytearray(device.mtu + 32)
        buf[: len(packet)] = packet
        out = bytearray(device.mtu + 64)
        size = peer.encrypt(buf, len(packet), out, self.now, self.wall)
        if size:
            device.transmits.append((bytes(out[:size]), peer.endpoint))
        return size

    def deliver(self, rounds: int = 10) -> int:
        """Move datagrams until the wire is quiet; returns how many moved."""
        moved = 0
        for _ in range(rounds):
            batch = [("a->b", d, e) for d, e in self.a.transmits] + [("b->a", d, e) for d, e in self.b.transmits]
            self.a.transmits.clear()
            self.b.transmits.clear()
            if not batch:
                return moved
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
        raise AssertionError("wire did not go quiet")

    def _into(self, device: Device, datagram: bytes, source: tuple[str, int], sink: list[bytes]) -> None:
        out = bytearray(device.mtu + 64)
        n = device.receive(datagram, source, self.now, self.wall, out, under_load=self.under_load)
        if n:
            sink.append(bytes(out[:n]))

    def tick(self) -> None:
        self.a.handle_timer(self.now, self.wall)
        self.b.handle_timer(self.now, self.wall)
