"""Inner checksums between daemons (actors/datapath.py, tunnelmesh.packets CAPS_*): after a
handshake each daemon asks the other, in the tunnel, what it can do; one with the TUN
offloads answers that it completes the TCP/UDP checksums of what it writes to its TUN,
and from then on the segments sent to it leave theirs partial (the sender's costliest
step). A peer that is no TunnelMesh daemon lets its kernel echo the question, which says
nothing, and keeps getting whole checksums.

Two real data paths on loopback UDP (or one data path and a bare Device standing for a
WireGuard peer), TUNs that are stand-ins; every checksum is checked against RFC 1071 over
16-bit words (tunnelmesh.packets.checksum), not the code under test."""

from __future__ import annotations

import ipaddress
import socket
import struct
from collections.abc import Iterator

import pytest

from actors.datapath import DataPath
from actors.edges import UdpBind
from tests.support.wire import A_IP, B_IP, PeerPair
from tests.unit.test_datapath_stages import FixedClock, _Owner
from tests.unit.test_datapath_tun_offload import (
    A_IP6, B_IP6, Node, OffloadTun, addresses_a_to_b, check_segment, ip_packet, needs_csum_read, pseudo_header, tcp_packet, tso_read,
)
from tunnelmesh.offload import GSO_NONE, NEEDS_CSUM, VNET_HDR, VNET_HDR_SIZE
from tunnelmesh.packets import CAPS_COMPLETES_CHECKSUMS, CAPS_REPLY, CAPS_REQUEST, checksum, icmp_echo

TCP, UDP = 6, 17
KEY = (0x4242, 1)  # the request's echo (ident, seq)
ROUNDS = 8  # readiness callbacks per side at most while datagrams go back and forth


class PlainTun(OffloadTun):
    """A TUN without the virtio-net header: a daemon with `offload = false`."""

    vnet_hdr = False
    offloads = ""


class Daemons:
    """Daemon A and daemon B, each a data path on its TUN stand-in and a loopback UdpBind,
    each the other's endpoint."""

    def __init__(self, b_tun: OffloadTun | None = None) -> None:
        self.pair = PeerPair(a_allows=(f"{B_IP}/32", f"{B_IP6}/128"), b_allows=(f"{A_IP}/32", f"{A_IP6}/128"))
        self.pair.handshake()
        self.pair.a_peer.owner = self.pair.b_peer.owner = _Owner()
        self.tuns = {"a": OffloadTun(), "b": b_tun or OffloadTun()}
        self.binds = {"a": UdpBind.open(0), "b": UdpBind.open(0)}
        clock = FixedClock(self.pair.now, self.pair.wall)
        self.paths = {name: DataPath(device, self.tuns[name], self.binds[name], clock,
                                     mesh_ip=ipaddress.IPv4Address(A_IP if name == "a" else B_IP))
                      for name, device in (("a", self.pair.a), ("b", self.pair.b))}
        self.pair.a_peer.use_endpoint(("127.0.0.1", self.binds["b"].port))
        self.pair.b_peer.use_endpoint(("127.0.0.1", self.binds["a"].port))

    def ask(self, asker: str) -> None:
        """`asker` asks the other what it can do, as its session does after a handshake."""
        peer, own, other = ((self.pair.a_peer, A_IP, B_IP) if asker == "a" else (self.pair.b_peer, B_IP, A_IP))
        request = icmp_echo(ipaddress.IPv4Address(own), ipaddress.IPv4Address(other), *KEY, CAPS_REQUEST)
        self.paths[asker].ask_caps(peer, request, KEY)
        self.pump()

    def pump(self) -> None:
        for _ in range(ROUNDS):
            for path in self.paths.values():
                path._on_udp_readable()

    def close(self) -> None:
        for bind in self.binds.values():
            bind.close()


@pytest.fixture
def daemons() -> Iterator[Daemons]:
    made = Daemons()
    try:
        yield made
    finally:
        made.close()


def test_two_daemons_with_the_offloads_learn_that_each_completes_checksums(daemons: Daemons) -> None:
    daemons.ask("a")
    assert daemons.pair.a_peer.completes_checksums  # a may leave its segments to b partial
    assert not daemons.pair.b_peer.completes_checksums  # b has not asked: it sends whole ones
    assert daemons.pair.a_peer.caps_question is None  # answered
    daemons.ask("b")
    assert daemons.pair.b_peer.completes_checksums
    assert daemons.tuns["a"].written == daemons.tuns["b"].written == []  # question and answer stay in the daemons
    assert not daemons.paths["a"].drops and not daemons.paths["b"].drops


def test_a_daemon_without_the_offloads_says_it_completes_nothing() -> None:
    daemons = Daemons(b_tun=PlainTun())
    try:
        daemons.ask("a")
        assert not daemons.pair.a_peer.completes_checksums and daemons.pair.a_peer.caps_question is None
        assert daemons.tuns["b"].written == []  # b's daemon answered, not its kernel
        daemons.ask("b")  # without the offloads nothing is left partial: b does not even ask
        assert daemons.tuns["a"].written == []
    finally:
        daemons.close()


@pytest.mark.parametrize("initiator", ["a", "b"])
def test_a_new_session_or_zeroed_keys_forget_what_the_peer_could_do(initiator: str) -> None:
    """A new handshake may be with a restarted peer that does less: until it says so again
    (the session asks after the handshake), what is sent to it carries whole checksums,
    packets staged for the handshake too. The protocol core forgets it, either side."""
    pair = PeerPair()
    pair.handshake()
    pair.a_peer.completes_checksums = True
    pair.advance(10)
    session = pair.a_peer.current
    (pair.a_peer if initiator == "a" else pair.b_peer).send_handshake_initiation(pair.now, pair.wall)
    pair.deliver()
    assert pair.a_peer.current is not session and pair.a_peer.current is not None
    assert not pair.a_peer.completes_checksums
    pair.a_peer.completes_checksums = True
    pair.a_peer.zero_keys()
    assert not pair.a_peer.completes_checksums


def test_a_kernels_echo_of_the_question_says_nothing_and_is_taken() -> None:
    """B is a plain WireGuard peer (a bare Device): its kernel echoes the request back."""
    pair = PeerPair()
    pair.handshake()
    pair.a_peer.owner = _Owner()
    tun, bind = OffloadTun(), UdpBind.open(0)
    peer_socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    peer_socket.bind(("127.0.0.1", 0))
    peer_socket.settimeout(2)
    try:
        path = DataPath(pair.a, tun, bind, FixedClock(pair.now, pair.wall), mesh_ip=ipaddress.IPv4Address(A_IP))
        pair.a_peer.use_endpoint(peer_socket.getsockname())
        request = icmp_echo(ipaddress.IPv4Address(A_IP), ipaddress.IPv4Address(B_IP), *KEY, CAPS_REQUEST)
        path.ask_caps(pair.a_peer, request, KEY)
        assert pair.inject("b", peer_socket.recv(65536)) and pair.delivered_to_b == [request]
        echo = icmp_echo(ipaddress.IPv4Address(B_IP), ipaddress.IPv4Address(A_IP), *KEY, CAPS_REQUEST, reply=True)
        for answer in (echo, icmp_echo(ipaddress.IPv4Address(B_IP), ipaddress.IPv4Address(A_IP), *KEY,
                                       CAPS_REPLY + CAPS_COMPLETES_CHECKSUMS, reply=True)):
            pair.b.transmits.clear()
            pair.send_packet("b", answer)
            ((datagram, _),) = pair.b.transmits
            peer_socket.sendto(datagram, ("127.0.0.1", bind.port))
            path._on_udp_readable()
        assert not pair.a_peer.completes_checksums  # the echo said nothing; the late answer was for no question
        # B answering a question put to another peer speaks for nobody.
        other = pair.a.add_peer(bytes(range(32)), preshared_key=bytes(32), owner=_Owner())
        path.ask_caps(other, request, KEY)
        answer = icmp_echo(ipaddress.IPv4Address(B_IP), ipaddress.IPv4Address(A_IP), *KEY,
                           CAPS_REPLY + CAPS_COMPLETES_CHECKSUMS, reply=True)
        pair.b.transmits.clear()
        pair.send_packet("b", answer)
        ((datagram, _),) = pair.b.transmits
        peer_socket.sendto(datagram, ("127.0.0.1", bind.port))
        path._on_udp_readable()
        assert not other.completes_checksums and not pair.a_peer.completes_checksums
        assert [w[VNET_HDR_SIZE:] for w in tun.written] == [answer, answer]  # not taken: to the TUN, as any reply
    finally:
        peer_socket.close()
        bind.close()


def finish(write: bytes) -> bytes:
    """A TUN write's packet with its checksum completed as the kernel would for NEEDS_CSUM."""
    flags, gso_type, _, _, csum_start, csum_offset = VNET_HDR.unpack_from(write)
    packet = bytearray(write[VNET_HDR_SIZE:])
    assert gso_type == GSO_NONE
    if flags & NEEDS_CSUM:
        struct.pack_into("!H", packet, csum_start + csum_offset, checksum(bytes(packet[csum_start:])))
    return bytes(packet)


@pytest.mark.parametrize("version", [4, 6])
def test_segments_to_a_peer_that_completes_checksums_leave_them_partial_and_arrive_whole(
        daemons: Daemons, version: int) -> None:
    daemons.ask("a")
    payload = bytes(range(256)) * 20
    daemons.tuns["a"].reads.append(tso_read(version, payload, 1000))
    daemons.paths["a"]._on_tun_readable()
    daemons.pump()
    written = daemons.tuns["b"].written
    assert written, "nothing reached b's TUN"
    received = b""
    for write in written:
        flags, gso_type, _, gso_size, csum_start, csum_offset = VNET_HDR.unpack_from(write)
        assert flags == NEEDS_CSUM and csum_offset == 16  # b leaves every checksum to its kernel
        packet = bytearray(write[VNET_HDR_SIZE:])
        struct.pack_into("!H", packet, csum_start + csum_offset, checksum(bytes(packet[csum_start:])))
        if gso_type == GSO_NONE:
            received += check_segment(bytes(packet))[2]
        else:  # joined: its payload is the segments' in order
            received += bytes(packet[csum_start + 20:])
    assert received == payload
    assert not daemons.paths["b"].drops and not daemons.pair.b.drops


@pytest.mark.parametrize("completes", [True, False])
def test_a_sender_leaves_a_checksum_partial_only_for_a_peer_that_completes_it(completes: bool) -> None:
    """What goes on the wire (B opens it with its bare Device): the segments of a TSO read
    and a large NEEDS_CSUM packet carry the pseudo-header sum for a peer that completes
    checksums, the whole checksum for any other; a small one is completed either way (it
    costs less to sum than the receiver's look at it)."""
    node = Node()
    try:
        node.pair.a_peer.completes_checksums = completes
        opened = node.send([tso_read(4, bytes(3000), 1000), needs_csum_read(4, UDP, bytes(1000)),
                            needs_csum_read(6, TCP, bytes(1200)), needs_csum_read(4, UDP, b"datagram")])
        assert len(opened) == 6
        for packet in opened[:5]:
            version = packet[0] >> 4
            l4 = 20 if version == 4 else 40
            proto = packet[9] if version == 4 else packet[6]
            value = struct.unpack_from("!H", packet, l4 + (16 if proto == TCP else 6))[0]
            partial = 0xFFFF - checksum(pseudo_header(version, *addresses_a_to_b(version), proto, len(packet) - l4))
            if completes:
                assert value == partial
            else:
                check_segment(packet)  # whole
        check_segment(opened[5])
    finally:
        node.close()


def test_a_receiver_leaves_to_its_kernel_the_checksums_it_finds_left_partial() -> None:
    """Whoever sent them (a restart on either side forgets nothing that matters): a TCP or
    UDP packet whose checksum field holds the pseudo-header sum goes with NEEDS_CSUM; one
    with its whole checksum, or any other packet, as it came, for the kernel to check."""
    node = Node()
    try:
        src, dst = B_IP, A_IP

        def partial(packet: bytes, proto: int) -> bytes:
            marked = bytearray(packet)
            value = 0xFFFF - checksum(pseudo_header(4, src, dst, proto, len(packet) - 20))
            struct.pack_into("!H", marked, 20 + (16 if proto == TCP else 6), value)
            return bytes(marked)

        udp = udp_packet_from_b(b"four")
        tcp = tcp_packet(4, src, dst, 9, b"x" * 100, flags=0x18)  # with PSH it joins nothing
        icmp = icmp_echo(ipaddress.IPv4Address(src), ipaddress.IPv4Address(dst), 1, 1, b"not TCP or UDP")
        fragment = bytearray(partial(udp, UDP))
        fragment[6] = 0x20  # more fragments: the checksum covers what this packet does not hold
        struct.pack_into("!H", fragment, 10, 0)
        struct.pack_into("!H", fragment, 10, checksum(bytes(fragment[:20])))
        packets = [partial(udp, UDP), partial(tcp, TCP), udp, tcp, icmp, bytes(fragment)]
        written = node.receive(packets)
        headers = [VNET_HDR.unpack_from(w) for w in written]
        assert headers[:2] == [(NEEDS_CSUM, GSO_NONE, 0, 0, 20, 6), (NEEDS_CSUM, GSO_NONE, 0, 0, 20, 16)]
        assert headers[2:] == [(0, GSO_NONE, 0, 0, 0, 0)] * 4  # whole, or nothing the kernel could complete
        assert [finish(w) for w in written[:2]] == [udp, tcp]  # the kernel's sum is the right one
        assert [w[VNET_HDR_SIZE:] for w in written] == packets  # nothing else touched
    finally:
        node.close()


def udp_packet_from_b(payload: bytes) -> bytes:
    """A UDP datagram B -> A with its whole checksum."""
    udp = struct.pack("!HHHH", 53, 5353, 8 + len(payload), 0) + payload
    value = checksum(pseudo_header(4, B_IP, A_IP, UDP, len(udp)) + udp) or 0xFFFF
    return ip_packet(4, B_IP, A_IP, UDP, udp[:6] + struct.pack("!H", value) + udp[8:])
