"""The data path's TUN offloads (actors/datapath.py) end to end, no root: [segment] of the
TSO/USO super-packets a TUN with the virtio-net header hands over, NEEDS_CSUM packets,
the drops for what the kernel should never hand over, the drain budget, and [coalesce]
of received TCP segments into super-packets for the TUN.

The TUN is a stand-in with `vnet_hdr` on (the in-memory TUN of tests/support/memnet.py
has none): reads are prepared header + packet, writes are recorded. The UDP side is real
loopback sockets, and node B's Device (tests/support/wire.PeerPair) opens what A's data
path sends and seals what A's data path receives. Every checksum is checked against
RFC 1071 over 16-bit words (tunnelmesh.packets.checksum), not the code under test."""

from __future__ import annotations

import ipaddress
import random
import socket
import struct
from collections import deque
from collections.abc import Iterator
from typing import Any

import pytest

import actors.datapath
from actors.datapath import DataPath
from actors.edges import UdpBind
from tests.support.wire import A_IP, B_IP, PeerPair
from tests.unit.test_datapath_offloads import gro_socket, receive_groups
from tests.unit.test_datapath_stages import FixedClock, _Owner
from tunnelmesh.filter import EMPTY_POLICY, Member, PacketFilter, Policy, compile_rules, parse_policy
from tunnelmesh.filter.engine import DENIED
from tunnelmesh.offload import GSO_NONE, GSO_TCPV4, GSO_TCPV6, GSO_UDP_L4, NEEDS_CSUM, VNET_HDR, VNET_HDR_SIZE
from tunnelmesh.packets import checksum, icmp_echo

A_IP6 = "fd00::1"
B_IP6 = "fd00::2"
MTU = 1420
TCP, UDP = 6, 17
FIN, RST, PSH, ACK = 0x01, 0x04, 0x08, 0x10
#: NOP, NOP, timestamps: the 12 option bytes of most Linux TCP segments.
TIMESTAMPS = b"\x01\x01\x08\x0a" + struct.pack("!II", 123456, 654321)
NO_HEADER = bytes(VNET_HDR_SIZE)


class OffloadTun:
    """A TUN with the virtio-net header and TSO/USO on: `reads` (header + packet each)
    are handed out one per `readv`, what the data path writes lands in `written`."""

    vnet_hdr = True
    offloads = "csum tso uso"
    name = "tm-offload"

    def __init__(self) -> None:
        self.reads: deque[bytes] = deque()
        self.written: list[bytes] = []

    def readv(self, bufs: list[bytearray]) -> int:
        if not self.reads:
            raise BlockingIOError
        data = self.reads.popleft()
        bufs[0][:len(data)] = data
        return len(data)

    def write(self, data: memoryview) -> int:
        self.written.append(bytes(data))
        return len(data)

    def fileno(self) -> int:
        return -1  # never registered: the tests call the readiness callbacks themselves

    def close(self) -> None:
        pass


# --------------------------------------------------------------------------- packets


def _addresses(version: int, src: str, dst: str) -> bytes:
    return ipaddress.ip_address(src).packed + ipaddress.ip_address(dst).packed


def pseudo_header(version: int, src: str, dst: str, proto: int, l4_length: int) -> bytes:
    addresses = _addresses(version, src, dst)
    if version == 4:
        return addresses + struct.pack("!BBH", 0, proto, l4_length)
    return addresses + struct.pack("!I3xB", l4_length, proto)


def ip_packet(version: int, src: str, dst: str, proto: int, l4: bytes, *, ip_id: int = 0, df: bool = True) -> bytes:
    """An IPv4 (no options, valid header checksum) or IPv6 packet around `l4`."""
    if version == 6:
        return struct.pack("!IHBB", 6 << 28, len(l4), proto, 64) + _addresses(6, src, dst) + l4
    header = struct.pack("!BBHHHBBH", 0x45, 0, 20 + len(l4), ip_id, 0x4000 if df else 0, 64, proto, 0)
    header += _addresses(4, src, dst)
    return header[:10] + struct.pack("!H", checksum(header)) + header[12:] + l4


def tcp_packet(version: int, src: str, dst: str, seq: int, payload: bytes, *, sport: int = 40000, flags: int = ACK,
               options: bytes = b"", ip_id: int = 0, checksummed: bool = True) -> bytes:
    """A TCP segment in an IP packet; its checksum whole, or 0 (`checksummed` False)."""
    offset = (20 + len(options)) // 4
    tcp = struct.pack("!HHIIBBHHH", sport, 80, seq, 777, offset << 4, flags, 500, 0, 0) + options + payload
    if checksummed:
        value = checksum(pseudo_header(version, src, dst, TCP, len(tcp)) + tcp)
        tcp = tcp[:16] + struct.pack("!H", value) + tcp[18:]
    return ip_packet(version, src, dst, TCP, tcp, ip_id=ip_id)


def udp_packet(version: int, src: str, dst: str, payload: bytes) -> bytes:
    """A UDP datagram in an IP packet, its checksum field 0 (the offloads fill it)."""
    return ip_packet(version, src, dst, UDP, struct.pack("!HHHH", 5353, 53, 8 + len(payload), 0) + payload)


def addresses_a_to_b(version: int) -> tuple[str, str]:
    return (A_IP, B_IP) if version == 4 else (A_IP6, B_IP6)


def tso_read(version: int, payload: bytes, gso_size: int, *, options: bytes = b"", seq: int = 1000) -> bytes:
    """What the kernel hands a TUN reader for a TCP send of `payload`: one super-packet."""
    src, dst = addresses_a_to_b(version)
    packet = tcp_packet(version, src, dst, seq, payload, options=options, flags=ACK | PSH, checksummed=False)
    l4 = 20 if version == 4 else 40
    gso_type = GSO_TCPV4 if version == 4 else GSO_TCPV6
    return VNET_HDR.pack(NEEDS_CSUM, gso_type, l4 + 20 + len(options), gso_size, l4, 16) + packet


def uso_read(version: int, payload: bytes, gso_size: int) -> bytes:
    src, dst = addresses_a_to_b(version)
    l4 = 20 if version == 4 else 40
    return VNET_HDR.pack(NEEDS_CSUM, GSO_UDP_L4, l4 + 8, gso_size, l4, 6) + udp_packet(version, src, dst, payload)


def needs_csum_read(version: int, proto: int, payload: bytes) -> bytes:
    """A single packet whose L4 checksum field holds only the pseudo-header sum, as the
    kernel leaves it with checksum offload (NEEDS_CSUM, no segmentation)."""
    src, dst = addresses_a_to_b(version)
    if proto == TCP:
        packet = bytearray(tcp_packet(version, src, dst, 5, payload, checksummed=False))
        field_offset = 16
    else:
        packet = bytearray(udp_packet(version, src, dst, payload))
        field_offset = 6
    l4 = 20 if version == 4 else 40
    partial = 0xFFFF - checksum(pseudo_header(version, src, dst, proto, len(packet) - l4))  # the sum, not inverted
    struct.pack_into("!H", packet, l4 + field_offset, partial)
    return VNET_HDR.pack(NEEDS_CSUM, GSO_NONE, 0, 0, l4, field_offset) + packet


def check_segment(packet: bytes) -> tuple[int, int, bytes]:
    """Check a TCP or UDP packet's lengths and checksums; (protocol, TCP sequence number
    or 0, payload)."""
    if packet[0] >> 4 == 4:
        assert packet[0] == 0x45, "IPv4 options"
        assert struct.unpack_from("!H", packet, 2)[0] == len(packet), "IPv4 total length"
        assert checksum(packet[:20]) == 0, "IPv4 header checksum"
        version, l4, proto = 4, 20, packet[9]
        src, dst = str(ipaddress.IPv4Address(packet[12:16])), str(ipaddress.IPv4Address(packet[16:20]))
    else:
        assert struct.unpack_from("!H", packet, 4)[0] == len(packet) - 40, "IPv6 payload length"
        version, l4, proto = 6, 40, packet[6]
        src, dst = str(ipaddress.IPv6Address(packet[8:24])), str(ipaddress.IPv6Address(packet[24:40]))
    segment = packet[l4:]
    assert checksum(pseudo_header(version, src, dst, proto, len(segment)) + segment) == 0, "L4 checksum"
    if proto == UDP:
        assert struct.unpack_from("!H", segment, 4)[0] == len(segment), "UDP length"
        assert segment[6:8] != b"\0\0", "UDP checksum left out"
        return proto, 0, segment[8:]
    return proto, struct.unpack_from("!I", segment, 4)[0], segment[(segment[12] >> 4) * 4:]


# --------------------------------------------------------------------------- node A


class Node:
    """Node A's data path on the offload TUN and a loopback UdpBind, with a session to B,
    whose packets arrive at a loopback socket (UDP_GRO on); B's Device opens them."""

    def __init__(self) -> None:
        self.pair = PeerPair(a_allows=(f"{B_IP}/32", f"{B_IP6}/128"), b_allows=(f"{A_IP}/32", f"{A_IP6}/128"))
        self.pair.handshake()
        self.pair.a_peer.owner = self.pair.b_peer.owner = _Owner()
        self.receiver = gro_socket()
        self.pair.a_peer.endpoint = self.receiver.getsockname()
        self.bind = UdpBind.open(0)
        self.tun = OffloadTun()
        self.datapath = DataPath(self.pair.a, self.tun, self.bind, FixedClock(self.pair.now, self.pair.wall))

    def send(self, reads: list[bytes]) -> list[bytes]:
        """`reads` into the TUN, one readiness callback: what B opened, in arrival order.
        Every datagram that arrived must open."""
        self.tun.reads.extend(reads)
        self.datapath._on_tun_readable()
        opened = []
        for datagram in (datagram for group in receive_groups(self.receiver) for datagram in group):
            before = len(self.pair.delivered_to_b)
            assert self.pair.inject("b", datagram, ("127.0.0.1", self.bind.port)), (
                f"B could not open a datagram of {len(datagram)} B: {self.pair.b.drops}")
            opened.append(self.pair.delivered_to_b[before])
        return opened

    def receive(self, packets: list[bytes]) -> list[bytes]:
        """B seals `packets` to A; they reach A's UDP port from a loopback socket in that
        order, one readiness callback: what A's data path wrote to the TUN."""
        self.pair.b.transmits.clear()
        for packet in packets:
            assert self.pair.send_packet("b", packet)
        sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            for datagram, _ in self.pair.b.transmits:
                sender.sendto(datagram, ("127.0.0.1", self.bind.port))
        finally:
            sender.close()
        self.pair.b.transmits.clear()
        self.datapath._on_udp_readable()
        written, self.tun.written = self.tun.written, []
        return written

    def close(self) -> None:
        self.receiver.close()
        self.bind.close()


@pytest.fixture
def node() -> Iterator[Node]:
    made = Node()
    try:
        yield made
    finally:
        made.close()


# --------------------------------------------------------------------------- [segment]


def mtu_sized(version: int, options: bytes) -> int:
    """The gso_size the kernel picks for this MTU: whole segments exactly MTU long."""
    return MTU - (20 if version == 4 else 40) - 20 - len(options)


@pytest.mark.parametrize("options", [b"", TIMESTAMPS], ids=["no options", "timestamps"])
@pytest.mark.parametrize("version", [4, 6], ids=["ipv4", "ipv6"])
def test_tcp_super_packets_arrive_as_valid_segments_in_order(node: Node, version: int, options: bytes) -> None:
    """Segment sizes that are not a multiple of 16 and below the MTU are padded on a copy
    (padding in place would overwrite the next segment's payload before it is sealed)."""
    rng = random.Random(version * 100 + len(options))
    sizes = [1001, 999, 536, 1, 17, mtu_sized(version, options), mtu_sized(version, options) - 1]
    sizes += [rng.randint(1, mtu_sized(version, options)) for _ in range(5)]
    for gso_size in sizes:
        payload = rng.randbytes(rng.randint(gso_size + 1, min(60000, gso_size * 45)))
        opened = node.send([tso_read(version, payload, gso_size, options=options, seq=1000)])
        joined = b""
        for packet in opened:
            proto, seq, data = check_segment(packet)
            assert proto == TCP and seq == 1000 + len(joined), f"gso_size {gso_size}: out of order"
            assert len(data) <= gso_size and len(packet) <= MTU
            joined += data
        assert joined == payload, f"gso_size {gso_size}: {len(joined)} of {len(payload)} B, or corrupted"
        assert len(opened) == -(-len(payload) // gso_size)
    assert not node.datapath.drops and not node.pair.b.drops


@pytest.mark.parametrize("version", [4, 6], ids=["ipv4", "ipv6"])
def test_udp_super_packets_arrive_as_valid_datagrams_in_order(node: Node, version: int) -> None:
    rng = random.Random(version)
    for gso_size in (1001, 536, 3, MTU - (20 if version == 4 else 40) - 8):
        tail = gso_size // 2 + 1  # the last datagram shorter
        payload = rng.randbytes(gso_size * 20 + tail)
        opened = node.send([uso_read(version, payload, gso_size)])
        parts = [check_segment(packet) for packet in opened]
        assert [proto for proto, _, _ in parts] == [UDP] * 21
        assert b"".join(data for _, _, data in parts) == payload
        assert [len(data) for _, _, data in parts] == [gso_size] * 20 + [tail]
    assert not node.datapath.drops


@pytest.mark.parametrize("proto", [TCP, UDP], ids=["tcp", "udp"])
@pytest.mark.parametrize("version", [4, 6], ids=["ipv4", "ipv6"])
def test_a_packet_that_needs_its_checksum_gets_a_valid_one(node: Node, version: int, proto: int) -> None:
    payload = random.Random(5).randbytes(333)
    (packet,) = node.send([needs_csum_read(version, proto, payload)])
    assert check_segment(packet)[::2] == (proto, payload)
    assert not node.datapath.drops


def _bad_reads() -> dict[str, bytes]:
    """Super-packets whose virtio-net header and packet do not fit together."""
    tcp4 = tso_read(4, bytes(3000), 1000)[VNET_HDR_SIZE:]
    tcp6 = tso_read(6, bytes(3000), 1000)[VNET_HDR_SIZE:]
    return {
        "tcpv4 type on an IPv6 packet": VNET_HDR.pack(NEEDS_CSUM, GSO_TCPV4, 60, 1000, 40, 16) + tcp6,
        "gso_size 0": VNET_HDR.pack(NEEDS_CSUM, GSO_TCPV4, 40, 0, 20, 16) + tcp4,
        "udp type on a TCP packet": VNET_HDR.pack(NEEDS_CSUM, GSO_UDP_L4, 28, 1000, 20, 6) + tcp4,
        "headers only": tso_read(4, b"", 1000),
        "ipv6 l4 inside its header": VNET_HDR.pack(NEEDS_CSUM, GSO_TCPV6, 60, 1000, 20, 16) + tcp6,
        "tcp data offset below 5": tso_read(4, bytes(3000), 1000)[:VNET_HDR_SIZE + 32] + b"\x40" + tcp4[33:],
        "truncated": tso_read(4, bytes(3000), 1000)[:VNET_HDR_SIZE + 30],
    }


@pytest.mark.parametrize("bad", list(_bad_reads()), ids=list(_bad_reads()))
def test_a_malformed_super_packet_is_a_counted_drop(node: Node, bad: str) -> None:
    good = tcp_packet(4, A_IP, B_IP, 1, b"after")
    assert node.send([_bad_reads()[bad], NO_HEADER + good]) == [good]  # the batch goes on
    assert node.datapath.drops == {"malformed super-packet from the TUN": 1}


@pytest.mark.parametrize("csum_start, csum_offset", [(20, 2000), (5, 16), (20, 324)],
                         ids=["beyond the packet", "inside the IP header", "field's last byte beyond"])
def test_bad_checksum_offsets_are_a_counted_drop(node: Node, csum_start: int, csum_offset: int) -> None:
    read = needs_csum_read(4, TCP, bytes(305))  # a packet of 345 B: its last word at 343
    bad = VNET_HDR.pack(NEEDS_CSUM, GSO_NONE, 0, 0, csum_start, csum_offset) + read[VNET_HDR_SIZE:]
    good = tcp_packet(4, A_IP, B_IP, 1, b"after")
    assert node.send([bad, NO_HEADER + good]) == [good]
    assert node.datapath.drops == {"bad checksum offsets from the TUN": 1}


@pytest.mark.parametrize("too_big", ["packet", "super-packet"])
def test_a_packet_larger_than_the_mtu_is_a_counted_drop(node: Node, too_big: str) -> None:
    """As after `ip link set tm0 mtu 3000` with the tunnel's MTU still 1420: the big one
    is dropped, counted, and the rest of the batch still arrives."""
    small = [tcp_packet(4, A_IP, B_IP, i, bytes([i]) * 940) for i in range(64)]
    if too_big == "packet":
        big = NO_HEADER + tcp_packet(4, A_IP, B_IP, 99, b"y" * 2960)  # 3000 B
    else:
        big = tso_read(4, b"y" * 6000, 2960)  # segments of 3000 B
    opened = node.send([NO_HEADER + packet for packet in small[:61]] + [big]
                       + [NO_HEADER + packet for packet in small[61:]])
    assert opened == small
    ((reason, count),) = node.datapath.drops.items()
    assert "larger than the MTU" in reason and count == 1
    assert not any("internal error" in reason for reason in node.datapath.drops)


def test_one_readiness_callback_seals_about_batch_packets_counting_segments(node: Node) -> None:
    """A super-packet counts as the packets it holds: TUN and UDP still take turns."""
    batch = actors.datapath.BATCH
    per_read, gso_size, reads = 45, 100, 40
    rng = random.Random(8)
    payloads = [rng.randbytes(per_read * gso_size) for _ in range(reads)]
    node.tun.reads.extend(tso_read(4, payload, gso_size, seq=1000 + i * len(payload))
                          for i, payload in enumerate(payloads))
    peer = node.pair.a_peer
    sealed_per_call, left_per_call = [], []
    for _ in range(reads):  # bound: each call takes at least one read
        if not node.tun.reads:
            break
        before = peer.tx_packets
        node.datapath._on_tun_readable()
        sealed_per_call.append(peer.tx_packets - before)
        left_per_call.append(len(node.tun.reads))
        receive_groups(node.receiver)  # emptied so the receive buffer never fills (nothing checked here)
    assert batch - per_read <= sealed_per_call[0] <= batch + per_read, sealed_per_call
    assert left_per_call[0] > 0, "one callback drained every read"
    assert sum(sealed_per_call) == reads * per_read and not node.datapath.drops


# --------------------------------------------------------------------------- [coalesce]


def test_received_segments_are_joined_per_flow_in_arrival_order(node: Node) -> None:
    def flow(version: int, sport: int, seq: int, sizes: list[int], fill: int, last_flags: int = ACK) -> list[bytes]:
        src, dst = (B_IP, A_IP) if version == 4 else (B_IP6, A_IP6)
        packets, at = [], seq
        for index, size in enumerate(sizes):
            flags = last_flags if index == len(sizes) - 1 else ACK
            packets.append(tcp_packet(version, src, dst, at, bytes([fill + index]) * size, sport=sport,
                                      flags=flags, options=TIMESTAMPS, ip_id=index))
            at += size
        return packets

    one = flow(4, 1, 100, [1000] * 8 + [10], 0x10, last_flags=ACK | PSH)
    other = flow(4, 2, 5, [1000], 0x60)
    six = flow(6, 3, 7, [900] * 4, 0x70)
    ping = bytes(icmp_echo(ipaddress.IPv4Address(B_IP), ipaddress.IPv4Address(A_IP), 9, 1, b"ping"))
    arrival = one[:5] + other + six[:2] + [ping] + six[2:] + one[5:]
    written = node.receive(arrival)
    assert not node.datapath.drops and not node.pair.a.drops

    segments_of: dict[bytes, list[bytes]] = {}  # the TUN writes (checksums completed), per flow
    for write in written:
        flags, gso_type, header_length, gso_size, csum_start, csum_offset = VNET_HDR.unpack_from(write)
        packet = bytearray(write[VNET_HDR_SIZE:])
        if gso_type == GSO_NONE and not flags:
            assert write[:VNET_HDR_SIZE] == NO_HEADER  # a packet that is no TCP segment goes as it came
            assert bytes(packet) in arrival
            segments_of.setdefault(_flow_key(packet), []).append(bytes(packet))
            continue
        assert flags == NEEDS_CSUM and gso_type in (GSO_NONE, GSO_TCPV4 if packet[0] >> 4 == 4 else GSO_TCPV6)
        assert csum_offset == 16
        # Complete the checksum as the kernel would: sum from csum_start over the partial field.
        field = csum_start + csum_offset
        struct.pack_into("!H", packet, field, checksum(bytes(packet[csum_start:])))
        if gso_type == GSO_NONE:  # a segment that joined nothing: the sender's own, checksum and all
            assert bytes(packet) in arrival
            segments_of.setdefault(_flow_key(packet), []).append(bytes(packet))
            continue
        proto, seq, payload = check_segment(bytes(packet))
        assert proto == TCP and header_length == csum_start + 20 + len(TIMESTAMPS)
        segments_of.setdefault(_flow_key(packet), []).append(bytes(packet))
        assert len(payload) > gso_size  # joined from several
    for sent in (one, other, six, [ping]):
        key = _flow_key(sent[0])
        assert _tcp_stream(segments_of.pop(key)) == _tcp_stream(sent), f"flow {key!r} not in arrival order"
    assert not segments_of
    assert len(written) < len(arrival)  # something was joined


def _flow_key(packet: bytes | bytearray) -> bytes:
    if packet[0] >> 4 == 6:
        return bytes(packet[8:40]) + bytes(packet[40:44])
    return bytes(packet[12:20]) + (bytes(packet[20:24]) if packet[9] == TCP else b"")


def _tcp_stream(packets: list[bytes]) -> list[tuple[int, bytes]] | list[bytes]:
    """The (first sequence number, joined payload) of a flow's packets in order, or the
    packets themselves when not TCP."""
    if packets[0][0] == 0x45 and packets[0][9] != TCP:
        return packets
    parts = [check_segment(packet) for packet in packets]
    for (_, seq, data), (_, following, _) in zip(parts, parts[1:]):
        assert (seq + len(data)) & 0xFFFFFFFF == following, "a gap or a reordering"
    return [(parts[0][1], b"".join(data for _, _, data in parts))]


class CountingFilter(PacketFilter):
    """The real filter, counting the inbound packets it is asked about."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.asked = 0

    def inbound(self, peer_key: bytes, packet: Any, length: int, now: float) -> bool:
        self.asked += 1
        return super().inbound(peer_key, packet, length, now)


def _judged_by(node: Node, policy: Policy) -> CountingFilter:
    """A's data path behind the real filter with `policy` (b may send what it allows)."""
    home = Member("a", node.pair.b_peer.public_key, ipaddress.IPv4Address(A_IP), ipaddress.IPv6Address(A_IP6))
    peer = Member("b", node.pair.a_peer.public_key, ipaddress.IPv4Address(B_IP), ipaddress.IPv6Address(B_IP6))
    node.datapath.filter = counting = CountingFilter(compile_rules(policy, (), home, [peer]))
    return counting


PORT_80 = parse_policy('[[allow]]\nfrom = ["b"]\nproto = "tcp"\nports = [80]\n')


def _segments(count: int, *, sport: int = 40000, first: int = 0, last_flags: int = ACK) -> list[bytes]:
    return [tcp_packet(4, B_IP, A_IP, 1000 * index, bytes([index]) * 1000, sport=sport, ip_id=index,
                       flags=last_flags if index == first + count - 1 else ACK)
            for index in range(first, first + count)]


def test_the_filter_judges_the_first_segment_of_each_joined_super_packet_only(node: Node) -> None:
    counting = _judged_by(node, PORT_80)
    written = node.receive(_segments(8))
    assert counting.asked == 1 and len(written) == 1  # one super-packet, judged once
    assert VNET_HDR.unpack_from(written[0])[1] == GSO_TCPV4

    # Segments the filter refuses start no super-packet for their flow's next segments to
    # join: each is asked about and dropped.
    counting = _judged_by(node, EMPTY_POLICY)
    assert node.receive(_segments(4, sport=40001)) == []
    assert counting.asked == 4 and counting.drops[DENIED] == 4


def test_a_segment_that_could_change_the_verdict_is_judged(node: Node) -> None:
    """What joins unjudged has the first segment's addresses, ports and flags: a FIN or RST
    (a flow's state moves), another port, or the next batch after a policy change is asked."""
    counting = _judged_by(node, PORT_80)
    node.receive(_segments(3) + _segments(1, first=3, last_flags=ACK | FIN) + _segments(1, first=4, last_flags=ACK | RST))
    assert counting.asked == 3

    counting = _judged_by(node, PORT_80)
    other_port = bytearray(_segments(1, first=8)[0])
    struct.pack_into("!HH", other_port, 22, 81, 0)  # destination port 81, checksum recomputed below
    struct.pack_into("!H", other_port, 36, checksum(pseudo_header(4, B_IP, A_IP, TCP, len(other_port) - 20)
                                                    + bytes(other_port[20:])))
    written = node.receive(_segments(3, first=5) + [bytes(other_port)])
    assert counting.asked == 2 and counting.drops[DENIED] == 1 and len(written) == 1

    counting = _judged_by(node, parse_policy('[[allow]]\nfrom = ["b"]\nproto = "tcp"\nports = [22]\n'))
    assert node.receive(_segments(4, first=9)) == []  # the same flow, port 80 no longer allowed
    assert counting.asked == 4 and counting.drops[DENIED] == 4
