"""Transport data: padding within the MTU, trimming on receive, keepalives,
cryptokey routing both ways, malformed inner packets and keypair rotation."""

from __future__ import annotations

import ipaddress
import struct

import pytest

from tests.support.wire import A_IP, B_IP, PSK, PeerPair, ipv4_packet, ipv6_packet, kind, seeded_rng
from tunnelmesh.wireguard import Device, NewSource
from tunnelmesh.wireguard.crypto import x25519_public
from tunnelmesh.wireguard.messages import TRANSPORT_HEADER

DATA = 4


def session(**kwargs) -> PeerPair:
    pair = PeerPair(**kwargs)
    pair.handshake()
    return pair


def only_datagram(pair: PeerPair, side: str = "a") -> bytes:
    device = pair.a if side == "a" else pair.b
    (datagram, _), = device.transmits
    device.transmits.clear()
    return datagram


def open_datagram(pair: PeerPair, datagram: bytes) -> bytes:
    """Decrypt an A->B datagram with B's keys, padding and all."""
    _, receiver, counter = TRANSPORT_HEADER.unpack_from(datagram)
    kp = pair.b_peer.current
    assert kp.local_index == receiver
    return kp.receiver.decrypt(b"\x00" * 4 + struct.pack("<Q", counter), datagram[16:], None)


def packet_of(length: int, src: str = A_IP, dst: str = B_IP) -> bytes:
    return ipv4_packet(src, dst, b"p" * (length - 20))


# --- padding -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "length, padded",
    [(20, 32), (21, 32), (32, 32), (33, 48), (100, 112), (1404, 1408), (1405, 1408), (1409, 1420), (1419, 1420), (1420, 1420)],
)
def test_packet_is_padded_to_16_bytes_but_never_beyond_the_mtu(length: int, padded: int) -> None:
    pair = session(mtu=1420)
    packet = packet_of(length)
    assert len(packet) == length
    size = pair.send_packet("a", packet)
    assert size == 16 + padded + 16
    plaintext = open_datagram(pair, only_datagram(pair))
    assert plaintext == packet + bytes(padded - length)


def test_receiver_trims_the_padding_by_the_ip_length() -> None:
    pair = session()
    packet = packet_of(21)
    pair.send_packet("a", packet)
    pair.deliver()
    assert pair.delivered_to_b == [packet]


def test_ipv6_packet_is_trimmed_by_its_payload_length() -> None:
    pair = session(a_allows=("fd00::2/128",), b_allows=("fd00::1/128",))
    packet = ipv6_packet("fd00::1", "fd00::2", b"six!!")
    assert len(packet) == 45
    assert pair.send_packet("a", packet) == 16 + 48 + 16
    pair.deliver()
    assert pair.delivered_to_b == [packet]


def test_staged_packets_are_padded_the_same_way() -> None:
    pair = PeerPair(mtu=1420)
    packet = packet_of(1419)
    assert pair.send_packet("a", packet) == 0
    pair.deliver()
    (datagram,) = pair.sent("a->b", DATA)
    assert len(datagram) == 16 + 1420 + 16
    assert pair.delivered_to_b == [packet]


def test_smaller_mtu_caps_the_padding() -> None:
    pair = session(mtu=1280)
    assert pair.send_packet("a", packet_of(1275)) == 16 + 1280 + 16


# --- keepalives ------------------------------------------------------------------------


def test_keepalive_is_an_empty_32_byte_message_that_is_not_delivered() -> None:
    pair = session()
    rx_before = pair.b_peer.rx_bytes
    pair.a_peer.send_keepalive(pair.now, pair.wall)
    datagram = only_datagram(pair)
    assert len(datagram) == 32 and kind(datagram) == DATA
    assert open_datagram(pair, datagram) == b""
    assert pair.inject("b", datagram) == 0
    assert pair.delivered_to_b == []
    assert pair.b.drops == {}
    assert pair.b_peer.rx_bytes == rx_before + 32


# --- cryptokey routing on receive -------------------------------------------------------------


def test_inner_source_outside_the_allowed_ips_is_dropped() -> None:
    pair = session()
    pair.send_packet("a", ipv4_packet("100.100.0.9", B_IP, b"spoof"))
    pair.deliver()
    assert pair.delivered_to_b == []
    assert pair.b.drops == {"inner source not allowed for peer": 1}


def test_inner_ipv6_source_outside_the_allowed_ips_is_dropped() -> None:
    pair = session(a_allows=("fd00::2/128",), b_allows=("fd00::1/128",))
    pair.send_packet("a", ipv6_packet("fd00::99", "fd00::2", b"spoof"))
    pair.deliver()
    assert pair.b.drops == {"inner source not allowed for peer": 1}


def test_inner_source_in_an_allowed_network_is_delivered() -> None:
    pair = session(b_allows=("10.0.0.0/8",))
    packet = ipv4_packet("10.20.30.40", B_IP, b"ok")
    pair.send_packet("a", packet)
    pair.deliver()
    assert pair.delivered_to_b == [packet]


def test_inner_source_routed_to_another_peer_is_dropped() -> None:
    # B routes 10.0.0.0/8 to A but 10.1.0.0/16 to C: a packet from A claiming a
    # source in C's range must be dropped (wireguard-go checks
    # allowedips.Lookup(src) == peer, the same longest-prefix table as sending).
    pair = session(b_allows=(f"{A_IP}/32", "10.0.0.0/8"))
    carol = x25519_public(seeded_rng(5)(32))
    pair.b.add_peer(carol, preshared_key=PSK, allowed_ips=(ipaddress.ip_network("10.1.0.0/16"),), owner="c")
    pair.send_packet("a", ipv4_packet("10.1.2.3", B_IP, b"carol's"))
    pair.send_packet("a", ipv4_packet("10.2.0.1", B_IP, b"mine"))
    pair.deliver()
    assert pair.delivered_to_b == [ipv4_packet("10.2.0.1", B_IP, b"mine")]
    assert pair.b.drops == {"inner source not allowed for peer": 1}


def ipv4_with_length(total: int, size: int) -> bytes:
    packet = bytearray(ipv4_packet(A_IP, B_IP, bytes(size - 20)))
    packet[2:4] = total.to_bytes(2, "big")
    return bytes(packet)


@pytest.mark.parametrize(
    "packet",
    [
        pytest.param(b"\x00" * 40, id="version-0"),
        pytest.param(b"\x55" * 40, id="version-5"),
        pytest.param(ipv4_packet(A_IP, B_IP, b"")[:12], id="ipv4-shorter-than-header"),
        pytest.param(ipv4_with_length(2000, 40), id="ipv4-length-beyond-packet"),
        pytest.param(ipv4_with_length(19, 40), id="ipv4-length-below-header"),
        pytest.param(ipv6_packet("fd00::1", "fd00::2", b"x" * 8)[:30], id="ipv6-shorter-than-header"),
        pytest.param(ipv6_packet("fd00::1", "fd00::2", b"x" * 8)[:4] + b"\x04\x00" + bytes(42), id="ipv6-payload-beyond-packet"),
    ],
)
def test_malformed_inner_packet_is_dropped(packet: bytes) -> None:
    pair = session()
    pair.send_packet("a", packet)
    pair.deliver()
    assert pair.delivered_to_b == []
    assert pair.b.drops == {"malformed inner packet": 1}


# --- routing by destination -----------------------------------------------------------------


@pytest.fixture(scope="module")
def routed() -> tuple[Device, dict[str, object]]:
    device = Device(seeded_rng(11)(32), rng=seeded_rng(12))
    keys = seeded_rng(13)
    table = {
        "net8": "10.0.0.0/8",
        "net16": "10.1.0.0/16",
        "host": "10.1.2.3/32",
        "default4": "0.0.0.0/0",
        "v6net8": "fd00::/8",
        "v6net32": "fd00:1::/32",
        "v6host": "fd00:1::5/128",
    }
    peers = {
        name: device.add_peer(
            x25519_public(keys(32)), preshared_key=PSK, allowed_ips=(ipaddress.ip_network(cidr),), owner=name
        )
        for name, cidr in table.items()
    }
    return device, peers


@pytest.mark.parametrize(
    "destination, expected",
    [
        ("10.1.2.3", "host"),
        ("10.1.2.4", "net16"),
        ("10.1.255.255", "net16"),
        ("10.2.0.1", "net8"),
        ("10.255.255.255", "net8"),
        ("11.0.0.1", "default4"),
        ("8.8.8.8", "default4"),
        ("fd00:1::5", "v6host"),
        ("fd00:1::6", "v6net32"),
        ("fd00:2::1", "v6net8"),
        ("fdff::1", "v6net8"),
        ("2001:db8::1", None),  # no IPv6 default route
    ],
)
def test_route_picks_the_longest_matching_prefix(routed, destination: str, expected: str | None) -> None:
    device, peers = routed
    if ":" in destination:
        packet = ipv6_packet("fd00::99", destination, b"x")
    else:
        packet = ipv4_packet("192.0.2.99", destination, b"x")
    peer = device.route(packet, len(packet))
    assert (peer.owner if peer else None) == expected


@pytest.mark.parametrize(
    "packet",
    [b"", b"\x45" * 19, ipv6_packet("fd00::1", "fd00:1::5", b"")[:39], b"\x00" * 40, b"\x75" * 40],
    ids=["empty", "short-ipv4", "short-ipv6", "version-0", "version-7"],
)
def test_route_returns_none_for_packets_it_cannot_read(routed, packet: bytes) -> None:
    device, _ = routed
    assert device.route(packet, len(packet)) is None


def test_route_follows_peer_removal(routed) -> None:
    device, peers = routed
    extra = device.add_peer(
        x25519_public(seeded_rng(14)(32)), preshared_key=PSK, allowed_ips=(ipaddress.ip_network("192.168.0.0/16"),), owner="x"
    )
    packet = ipv4_packet("10.0.0.1", "192.168.1.1", b"x")
    assert device.route(packet, len(packet)) is extra
    device.remove_peer(extra)
    assert device.route(packet, len(packet)) is peers["default4"]


# --- keypair rotation ----------------------------------------------------------------------------


def rekey(pair: PeerPair) -> None:
    pair.advance(6)
    pair.a_peer.send_handshake_initiation(pair.now, pair.wall)
    pair.deliver()


def late_from_b(pair: PeerPair, payload: bytes) -> bytes:
    assert pair.send("b", payload)
    return only_datagram(pair, "b")


def test_keypairs_rotate_through_previous_current_next_across_two_rekeys() -> None:
    pair = session()
    k1_a, k1_b = pair.a_peer.current, pair.b_peer.current
    late_k1 = late_from_b(pair, b"late on k1")
    later_k1 = late_from_b(pair, b"later on k1")

    # Rekey 1 -> 2, watching B between its response and the confirmation.
    pair.advance(6)
    pair.a_peer.send_handshake_initiation(pair.now, pair.wall)
    pair.deliver_once()  # initiation reaches B
    assert pair.b_peer.current is k1_b and pair.b_peer.next is not None and pair.b_peer.previous is None
    pair.deliver()
    k2_a, k2_b = pair.a_peer.current, pair.b_peer.current
    assert (pair.a_peer.previous, pair.a_peer.next) == (k1_a, None)
    assert (pair.b_peer.previous, pair.b_peer.next) == (k1_b, None)
    assert k2_a is not k1_a and k2_b is not k1_b

    # The previous keypair still decrypts packets that were in flight.
    assert pair.inject("a", late_k1) > 0
    late_k2 = late_from_b(pair, b"late on k2")

    rekey(pair)  # 2 -> 3: k1 is gone, k2 is previous
    assert pair.a_peer.previous is k2_a and pair.b_peer.previous is k2_b
    assert pair.inject("a", late_k2) > 0
    assert pair.inject("a", later_k1) == 0
    assert pair.a.drops == {"unknown receiver index": 1}
    assert pair.delivered_to_a == [
        ipv4_packet(B_IP, A_IP, b"late on k1"),
        ipv4_packet(B_IP, A_IP, b"late on k2"),
    ]


def test_sender_always_uses_the_current_keypair() -> None:
    pair = session()
    rekey(pair)
    pair.send("a", b"x")
    _, receiver, counter = TRANSPORT_HEADER.unpack_from(only_datagram(pair))
    assert receiver == pair.a_peer.current.remote_index == pair.b_peer.current.local_index
    assert counter == 1  # the confirming keepalive was 0


def test_responder_drops_unconfirmed_next_when_a_newer_initiation_arrives() -> None:
    pair = session()
    pair.drop = lambda direction, datagram: direction == "b->a"
    rekey(pair)
    first_next = pair.b_peer.next
    assert first_next is not None
    rekey(pair)
    assert pair.b_peer.next is not None and pair.b_peer.next is not first_next
    stale = TRANSPORT_HEADER.pack(4, first_next.local_index, 0) + bytes(16)
    assert pair.inject("b", stale) == 0
    assert pair.b.drops == {"unknown receiver index": 1}


def test_unknown_receiver_index_is_counted() -> None:
    pair = session()
    known = {pair.b_peer.current.local_index}
    index = next(i for i in range(1, 100) if i not in known)
    assert pair.inject("b", TRANSPORT_HEADER.pack(4, index, 0) + bytes(16)) == 0
    assert pair.b.drops == {"unknown receiver index": 1}


def test_transport_to_a_pending_handshake_index_is_counted_as_unknown() -> None:
    pair = PeerPair()
    pair.send("a", b"hi")
    (initiation, _), = pair.a.transmits
    sender = int.from_bytes(initiation[4:8], "little")
    assert pair.inject("a", TRANSPORT_HEADER.pack(4, sender, 0) + bytes(16)) == 0
    assert pair.a.drops == {"unknown receiver index": 1}


def test_datagram_larger_than_the_receive_buffer_is_dropped() -> None:
    pair = session()
    kp = pair.b_peer.current
    out = bytearray(64)
    datagram = TRANSPORT_HEADER.pack(4, kp.local_index, 0) + bytes(16 + 100)
    assert pair.b.receive(datagram, ("192.0.2.1", 51820), pair.now, pair.wall, out) == 0
    assert pair.b.drops == {"packet larger than buffer": 1}


def test_only_an_authenticated_packet_reports_a_new_source() -> None:
    pair = session()
    pair.b.events.clear()
    pair.send("a", b"roaming")
    datagram = only_datagram(pair)
    forged = bytearray(datagram)
    forged[-1] ^= 1
    pair.inject("b", bytes(forged), source=("203.0.113.9", 1))
    assert pair.b_peer.other_source is None and not pair.b.events
    assert pair.inject("b", datagram, source=("198.51.100.7", 4242)) > 0
    assert pair.b_peer.other_source == ("198.51.100.7", 4242)
    assert list(pair.b.events) == [NewSource(pair.b_peer, ("198.51.100.7", 4242))]
