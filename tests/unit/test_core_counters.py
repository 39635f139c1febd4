"""What the core counts for `status` and /metrics: transport messages each way
(`rx_packets`, `tx_packets`, next to the byte counters) and the initiator's
handshake round trip (`handshake_rtt`), measured only when the answer can only be
to one copy of the initiation (Karn's rule); and each peer's drops by reason
(`Peer.drops`), for datagrams dropped once the peer they are for is known."""

from __future__ import annotations

import pytest

from tests.support.wire import A_ADDR, A_IP, B_ADDR, B_IP, PeerPair, ipv4_packet, kind
from tunnelmesh.wireguard.constants import MAX_STAGED_PACKETS, REJECT_AFTER_TIME

INIT, RESP = 1, 2
OTHER_UDP = ("198.51.100.7", 4242)


def initiation_from_a(pair: PeerPair) -> bytes:
    ((initiation, _), *_) = pair.a.transmits
    pair.a.transmits.clear()
    assert kind(initiation) == INIT
    return initiation


def answer(pair: PeerPair, initiation: bytes, *, after: float, source: tuple[str, int] = B_ADDR) -> None:
    """B answers `initiation`; the response reaches A from `source`, `after` seconds later."""
    pair.inject("b", initiation, source=A_ADDR)
    ((response, _),) = pair.b.transmits
    pair.b.transmits.clear()
    assert kind(response) == RESP
    pair.advance(after)
    pair.inject("a", response, source=source)


def test_the_initiator_measures_the_round_trip_of_its_answered_initiation() -> None:
    pair = PeerPair()
    pair.a_peer.send_handshake_initiation(pair.now, pair.wall)
    answer(pair, initiation_from_a(pair), after=0.25)
    assert pair.a_peer.handshake_rtt == pytest.approx(0.25)
    assert pair.b_peer.handshake_rtt is None  # the responder sent no initiation to time


def test_a_probe_times_the_path_that_answered() -> None:
    pair = PeerPair()
    pair.a_peer.send_probe((OTHER_UDP,), pair.now, pair.wall)
    initiation = initiation_from_a(pair)
    pair.advance(1.0)
    pair.a_peer.send_probe((B_ADDR,), pair.now, pair.wall)  # the same initiation, later, on another path
    assert initiation_from_a(pair) == initiation
    answer(pair, initiation, after=0.1, source=B_ADDR)
    assert pair.a_peer.handshake_rtt == pytest.approx(0.1)


def test_an_answer_on_a_path_the_initiation_went_to_twice_gives_no_round_trip() -> None:
    pair = PeerPair()
    pair.handshake()
    assert pair.a_peer.handshake_rtt == pytest.approx(0.0)
    pair.advance(200.0)  # past the rate limit: a fresh initiation
    pair.a_peer.send_probe((B_ADDR,), pair.now, pair.wall)
    initiation = initiation_from_a(pair)
    pair.advance(1.0)
    pair.a_peer.send_probe((B_ADDR,), pair.now, pair.wall)  # repeated: which copy is answered?
    assert initiation_from_a(pair) == initiation
    answer(pair, initiation, after=0.1)
    assert pair.a_peer.current is not None and pair.a_peer.handshake_rtt is None


def test_transport_messages_are_counted_each_way_with_their_bytes() -> None:
    pair = PeerPair()
    pair.handshake()  # A's confirming keepalive is one transport message A->B
    assert (pair.a_peer.tx_packets, pair.b_peer.rx_packets) == (1, 1)
    assert (pair.a_peer.rx_packets, pair.b_peer.tx_packets) == (0, 0)
    sizes = [pair.send("b", b"x" * n) for n in (10, 100, 1000)]
    pair.deliver()
    assert pair.b_peer.tx_packets == 3 and pair.b_peer.tx_bytes == sum(sizes)
    assert pair.a_peer.rx_packets == 3 and pair.a_peer.rx_bytes == sum(sizes)
    pair.inject("a", bytes(pair.wire_log[-1][1]))  # a replay is dropped, not counted
    assert pair.a_peer.rx_packets == 3 and pair.a.drops["replayed counter"] == 1


def test_drops_after_the_peer_is_known_are_counted_for_that_peer_and_node_wide() -> None:
    pair = PeerPair()
    pair.handshake()
    pair.send("b", b"first")
    pair.deliver()
    assert pair.a_peer.drops == {}  # packets that pass leave a peer's drops untouched
    pair.inject("a", bytes(pair.wire_log[-1][1]))  # replayed
    pair.send("b", b"tampered")
    ((sealed, _),) = pair.b.transmits
    pair.b.transmits.clear()
    pair.inject("a", sealed[:-1] + bytes([sealed[-1] ^ 1]))  # its tag no longer authenticates
    pair.send_packet("b", ipv4_packet("100.100.0.9", A_IP, b"not b's address"))
    bad_length = bytearray(ipv4_packet(B_IP, A_IP, b"short"))
    bad_length[2:4] = (0xFFFF).to_bytes(2, "big")  # claims more than it holds
    pair.send_packet("b", bytes(bad_length))
    pair.deliver()
    pair.send("b", b"late")
    ((late, _),) = pair.b.transmits
    pair.b.transmits.clear()
    pair.advance(REJECT_AFTER_TIME)
    pair.inject("a", late)
    expected = {"replayed counter": 1, "authentication failed": 1, "inner source not allowed for peer": 1,
                "malformed inner packet": 1, "keypair expired": 1}
    assert pair.a_peer.drops == expected
    assert {reason: pair.a.drops[reason] for reason in expected} == expected  # node-wide as before


def test_drops_before_any_peer_is_known_are_counted_node_wide_only() -> None:
    pair = PeerPair()
    pair.handshake()
    pair.inject("a", bytes([4, 0, 0, 0]) + bytes(4) + bytes(8) + bytes(16))  # no such receiver index
    pair.inject("a", b"\x09junk")  # not a WireGuard message
    assert pair.a.drops["unknown receiver index"] == 1 and pair.a.drops["malformed message"] == 1
    assert pair.a_peer.drops == {}


def test_packets_staged_past_the_queue_are_that_peers_drops() -> None:
    pair = PeerPair()  # no handshake: every packet is staged
    for n in range(MAX_STAGED_PACKETS + 2):
        assert pair.send("a", bytes([n])) == 0
    assert pair.a_peer.drops == {"staged queue full": 2} and pair.a.drops["staged queue full"] == 2
