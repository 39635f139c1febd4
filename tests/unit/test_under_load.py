"""Handshake floods, in virtual time: the under-load switch (actors/datapath.py
`LoadDetector`) and the per-source rate limit in the core's handshake path
(`Device.handshake_limiter`, after wireguard-go's device/receive.go: under load, no valid
mac2 -> cookie reply; a valid mac2 -> the per-source limiter; then the handshake)."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from types import SimpleNamespace

import pytest

from actors.datapath import UNDER_LOAD_HANDSHAKES_PER_SECOND, UNDER_LOAD_HOLD, DataPath, LoadDetector
from actors.edges import UdpBind
from tests.support.hostile_handshakes import HostileInitiations
from tests.support.memnet import MemoryTun
from tests.support.wire import A_IP, B_IP, PeerPair, ipv4_packet, kind, seeded_rng
from tunnelmesh.wireguard import Device
from tunnelmesh.wireguard.device import HANDSHAKE_RATE_PER_SOURCE, limiter_key

INIT, RESP, COOKIE = 1, 2, 3
HOSTILE = ("192.0.2.66", 40000)
SOURCE_LIMITED = "handshake over the source rate limit"
NOT_AUTHENTIC = "initiation does not authenticate"


# --- the under-load switch ---------------------------------------------------------------


def test_the_switch_enters_above_the_threshold_holds_and_leaves() -> None:
    detector = LoadDetector()
    start = 100.0
    step = 0.5 / UNDER_LOAD_HANDSHAKES_PER_SECOND  # the threshold's worth in half a second
    for i in range(UNDER_LOAD_HANDSHAKES_PER_SECOND):
        assert not detector.count(start + i * step)
    over = start + UNDER_LOAD_HANDSHAKES_PER_SECOND * step
    assert detector.count(over)  # one more within the second: under load
    assert detector.entered == 1
    # Held for UNDER_LOAD_HOLD after the last message over the threshold, with nothing arriving...
    assert detector.active(over + UNDER_LOAD_HOLD - 0.001)
    # ...and off after it.
    assert not detector.active(over + UNDER_LOAD_HOLD)
    assert not detector.count(over + UNDER_LOAD_HOLD + 0.5)  # one message alone does not turn it on
    assert detector.entered == 1


def test_a_rate_at_the_threshold_never_switches_it_on() -> None:
    detector = LoadDetector()
    per_second = UNDER_LOAD_HANDSHAKES_PER_SECOND
    assert not any(detector.count(10.0 + i / per_second) for i in range(per_second * 20))
    assert detector.entered == 0 and detector.handshakes == per_second * 20


def test_a_sustained_flood_keeps_it_on_once_and_it_leaves_a_hold_after_the_flood() -> None:
    detector = LoadDetector()
    rate = UNDER_LOAD_HANDSHAKES_PER_SECOND * 4
    times = [50.0 + i / rate for i in range(rate * 5)]
    states = [detector.count(t) for t in times]
    first = states.index(True)
    assert first == UNDER_LOAD_HANDSHAKES_PER_SECOND  # the 257th message of the first second
    assert all(states[first:])  # a new counting window starts every second: the hold bridges it
    assert detector.entered == 1
    assert detector.active(times[-1] + UNDER_LOAD_HOLD - 0.01)
    assert not detector.active(times[-1] + UNDER_LOAD_HOLD)


# --- the limiter in the core's handshake path --------------------------------------------


def _hostile_with_cookie(pair: PeerPair, source: tuple[str, int] = HOSTILE) -> HostileInitiations:
    """A hostile sender at `source` that got a cookie from B (under load) by asking once."""
    hostile = HostileInitiations(pair.b.static_public, seeded_rng(77))
    pair.inject("b", hostile.initiation(), source=source)
    ((reply, to),) = pair.b.transmits
    pair.b.transmits.clear()
    assert to == source and hostile.take_reply(reply)
    return hostile


def test_without_a_valid_mac2_every_initiation_gets_a_cookie_reply_and_no_work() -> None:
    pair = PeerPair()
    pair.under_load = "b"
    hostile = HostileInitiations(pair.b.static_public, seeded_rng(5))
    for _ in range(200):
        pair.inject("b", hostile.initiation(), source=HOSTILE)
        pair.inject("b", hostile.junk(), source=HOSTILE)
    assert [kind(d) for d, _ in pair.b.transmits] == [COOKIE] * 200
    assert all(to == HOSTILE for _, to in pair.b.transmits)
    assert pair.b.cookie_replies_sent == 200
    assert pair.b.drops == {"bad mac1": 200}  # none got to the Diffie-Hellman
    assert len(pair.b.handshake_limiter) == 0  # a cookie is asked before the limiter is


def test_a_flooding_source_with_valid_mac2_is_limited_to_its_bucket() -> None:
    pair = PeerPair()
    pair.under_load = "b"
    hostile = _hostile_with_cookie(pair)
    for _ in range(100):
        pair.inject("b", hostile.initiation(with_mac2=True), source=HOSTILE)
    burst = HANDSHAKE_RATE_PER_SOURCE.burst
    assert pair.b.drops == {NOT_AUTHENTIC: burst, SOURCE_LIMITED: 100 - burst}
    assert pair.b.transmits == []  # a limited message gets no answer at all
    # A second on, the bucket has refilled by the per-second rate (capped at the burst).
    pair.advance(1.0)
    for _ in range(100):
        pair.inject("b", hostile.initiation(with_mac2=True), source=HOSTILE)
    assert pair.b.drops[NOT_AUTHENTIC] == 2 * burst
    assert pair.b.drops[SOURCE_LIMITED] == 200 - 2 * burst


def test_another_source_is_not_limited_and_its_valid_mac2_is_accepted() -> None:
    """While HOSTILE floods with valid mac2s, peer A (its own address) gets its cookie,
    retries with a valid mac2, and the handshake completes."""
    pair = PeerPair()
    pair.under_load = "b"
    hostile = _hostile_with_cookie(pair)
    for _ in range(50):
        pair.inject("b", hostile.initiation(with_mac2=True), source=HOSTILE)
    pair.send("a", b"hi")
    pair.deliver()  # a cookie for A's first initiation; A goes again at once, with mac2
    assert [kind(d) for d in pair.sent("b->a")] == [COOKIE, RESP]
    assert pair.delivered_to_b == [ipv4_packet(A_IP, B_IP, b"hi")]
    assert pair.b.drops[SOURCE_LIMITED] >= 40  # the flood was limited all along


def test_not_under_load_nothing_is_limited_and_transport_never_touches_the_limiter() -> None:
    pair = PeerPair()
    pair.handshake()
    hostile = HostileInitiations(pair.b.static_public, seeded_rng(6))
    for _ in range(50):
        pair.inject("b", hostile.initiation(), source=HOSTILE)
    assert pair.b.drops == {NOT_AUTHENTIC: 50}  # all processed: the switch is the caller's
    pair.under_load = "b"
    for _ in range(50):
        pair.send("a", b"data")
    assert pair.deliver() == 50
    assert len(pair.delivered_to_b) == 50
    assert len(pair.b.handshake_limiter) == 0


def _link(peer_key: bytes) -> SimpleNamespace:
    """What the core looks at in a link (SSH, relay): the peer it authenticated."""
    return SimpleNamespace(peer_key=peer_key)


def test_the_source_is_the_address_or_for_a_link_the_peer_it_authenticated() -> None:
    assert limiter_key(("192.0.2.7", 51820)) == limiter_key(("192.0.2.7", 40000)) == "192.0.2.7"
    assert limiter_key(("2001:db8:1:2::7", 51820, 0, 0)) == limiter_key(("2001:db8:1:2::9", 1, 0, 0)) == "2001:db8:1:2::/64"
    assert limiter_key(_link(b"\x01" * 32)) != limiter_key(_link(b"\x02" * 32))
    # Two links: one peer's flood over its link does not use up the other's bucket.
    pair = PeerPair()
    pair.under_load = "b"
    flooding, quiet = _link(b"\x01" * 32), _link(b"\x02" * 32)
    for link in (flooding, quiet):
        hostile = HostileInitiations(pair.b.static_public, seeded_rng(8))
        pair.b.receive(hostile.initiation(), link, pair.now, pair.wall, bytearray(2048), under_load=True)
        ((reply, _),) = pair.b.transmits
        pair.b.transmits.clear()
        assert hostile.take_reply(reply)
        link.hostile = hostile
    for _ in range(30):
        pair.b.receive(flooding.hostile.initiation(with_mac2=True), flooding, pair.now, pair.wall, bytearray(2048), under_load=True)
    assert pair.b.drops[SOURCE_LIMITED] == 30 - HANDSHAKE_RATE_PER_SOURCE.burst
    pair.b.receive(quiet.hostile.initiation(with_mac2=True), quiet, pair.now, pair.wall, bytearray(2048), under_load=True)
    # The quiet link's went on, to the Diffie-Hellman (where a random initiation fails).
    assert pair.b.drops == {SOURCE_LIMITED: 30 - HANDSHAKE_RATE_PER_SOURCE.burst, NOT_AUTHENTIC: HANDSHAKE_RATE_PER_SOURCE.burst + 1}


# --- the switch and the core together, through the data path ------------------------------


class SteppedClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def monotonic(self) -> float:
        return self.now

    def wall(self) -> float:
        return 1_700_000_000.0 + self.now


@pytest.fixture
def datapath() -> Iterator[tuple[DataPath, SteppedClock]]:
    rng = seeded_rng(3)
    clock = SteppedClock(500.0)
    tun, bind = MemoryTun("tm-test"), UdpBind.open(0)
    try:
        yield DataPath(Device(rng(32), rng=seeded_rng(4)), tun, bind, clock), clock
    finally:
        bind.close()
        tun.close()


def _received(sock: socket.socket) -> list[bytes]:
    got = []
    for _ in range(10_000):
        try:
            got.append(sock.recv(2048))
        except BlockingIOError:
            return got
    raise AssertionError("more datagrams than sent")


def test_through_the_data_path_a_flood_turns_on_cookies_only_for_its_hold(datapath: tuple[DataPath, SteppedClock]) -> None:
    path, clock = datapath
    path.load = LoadDetector(threshold=8)  # a small threshold keeps the loopback queues short
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sender.bind(("127.0.0.1", 0))
    sender.setblocking(False)
    try:
        hostile = HostileInitiations(path.device.static_public, seeded_rng(11))
        for _ in range(12):
            sender.sendto(hostile.initiation(), ("127.0.0.1", path.port))
        sender.sendto(b"\x04\x00\x00\x00" + bytes(28), ("127.0.0.1", path.port))  # transport: not counted
        path._on_udp_readable()
        replies = _received(sender)
        assert [kind(r) for r in replies] == [COOKIE] * 4  # the 9th to the 12th
        assert path.load.handshakes == 12 and path.load.entered == 1
        assert path.device.drops == {NOT_AUTHENTIC: 8, "unknown receiver index": 1}
        # With a cookie, the same sender is limited per source while the flood lasts.
        assert hostile.take_reply(replies[0])
        for _ in range(10):
            sender.sendto(hostile.initiation(with_mac2=True), ("127.0.0.1", path.port))
        path._on_udp_readable()
        assert path.device.drops[SOURCE_LIMITED] == 10 - HANDSHAKE_RATE_PER_SOURCE.burst
        # A hold after the last message over the threshold, handshakes are processed again.
        clock.now += UNDER_LOAD_HOLD
        sender.sendto(hostile.initiation(), ("127.0.0.1", path.port))
        path._on_udp_readable()
        assert _received(sender) == []
        assert path.device.drops[NOT_AUTHENTIC] == 8 + HANDSHAKE_RATE_PER_SOURCE.burst + 1
        assert path.device.cookie_replies_sent == 4
    finally:
        sender.close()
