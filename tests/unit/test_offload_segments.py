"""tunnelmesh/offload.py: splitting TSO/USO super-packets into segments and joining
received TCP segments back into one (actors/datapath.py `_seal_segments`, `_deliver`).

Super-packets are built as the kernel hands them over a TUN with IFF_VNET_HDR: the IP
length covers the whole, the TCP/UDP checksum field holds the folded pseudo-header sum
(the device finishes it). Every segment and every coalesced packet is then checked on
its own against a reference written here: RFC 1071 over 16-bit words
(tunnelmesh.packets.checksum), headers read with struct."""

from __future__ import annotations

import ipaddress
import random
import struct
from typing import Any, NamedTuple

import pytest

from tunnelmesh.offload import (
    GSO_ECN, GSO_NONE, GSO_TCPV4, GSO_TCPV6, GSO_UDP_L4, MAX_PACKET, MAX_SEGMENTS, NEEDS_CSUM, VNET_HDR,
    VNET_HDR_SIZE, Coalescer, complete_checksum, segments, super_packet_layout,
)
from tunnelmesh.packets import checksum

TCP, UDP, HOP_BY_HOP = 6, 17, 0
FIN, SYN, RST, PSH, ACK, URG, ECE, CWR = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40, 0x80
SRC4, DST4 = ipaddress.IPv4Address("192.0.2.1").packed, ipaddress.IPv4Address("198.51.100.2").packed
SRC6, DST6 = ipaddress.IPv6Address("2001:db8::1").packed, ipaddress.IPv6Address("2001:db8::2").packed
DF = 0x4000
#: TCP options as Linux sends them on an established flow: NOP NOP timestamps.
TIMESTAMPS = bytes((1, 1, 8, 10)) + struct.pack("!II", 0x01020304, 0x05060708)
#: A hop-by-hop header (PadN only) between an IPv6 header and its TCP/UDP header.
HOP_BY_HOP_PADDING = bytes((0, 1, 4, 0, 0, 0, 0))
SLACK = 64  # the data path's buffers are larger than any packet they hold


def payload_of(size: int, seed: int = 0) -> bytes:
    """Seeded random bytes: a misplaced or repeated chunk shows."""
    return random.Random(seed).randbytes(size)


def fold(total: int) -> int:
    """RFC 1071 end-around carry."""
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def words(data: bytes) -> int:
    data = data + b"\x00" * (len(data) & 1)
    return sum(struct.unpack(f"!{len(data) // 2}H", data))


def pseudo_header(packet: bytes, proto: int, l4_length: int) -> bytes:
    """RFC 793 / RFC 8200 section 8.1 pseudo-header (no routing header in these packets)."""
    if packet[0] >> 4 == 4:
        return packet[12:20] + struct.pack("!BBH", 0, proto, l4_length)
    return packet[8:40] + struct.pack("!IxxxB", l4_length, proto)


def tcp_header(seq: int, flags: int, *, options: bytes = b"", ack: int = 0x0A0B0C0D, window: int = 501,
               sport: int = 40000, dport: int = 5201) -> bytes:
    offset = 5 + len(options) // 4
    return struct.pack("!HHIIBBHHH", sport, dport, seq, ack, offset << 4, flags, window, 0, 0) + options


def udp_header(length: int, sport: int = 40001, dport: int = 5202) -> bytes:
    return struct.pack("!HHHH", sport, dport, length, 0)


def ip_packet(version: int, proto: int, l4: bytes, *, ip_id: int = 0x1234, tos: int = 0, ttl: int = 64,
              fragment: int = DF, ipv4_options: bytes = b"", hop_by_hop: bool = False, flow_label: int = 0x12345,
              partial: bool = False) -> bytearray:
    """An IPv4/IPv6 packet around a TCP/UDP header and payload `l4`, its length fields
    covering all of it and its IPv4 header checksum valid; the L4 checksum is whole, or
    with `partial` the folded pseudo-header sum the kernel leaves for the device."""
    if version == 4:
        ihl = 5 + len(ipv4_options) // 4
        header = bytearray(struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, tos, ihl * 4 + len(l4), ip_id, fragment, ttl,
                                       proto, 0, SRC4, DST4) + ipv4_options)
        header[10:12] = struct.pack("!H", checksum(bytes(header)))
    else:
        extension = bytes((proto,)) + HOP_BY_HOP_PADDING if hop_by_hop else b""
        header = bytearray(struct.pack("!IHBB16s16s", 6 << 28 | tos << 20 | flow_label, len(extension) + len(l4),
                                       HOP_BY_HOP if hop_by_hop else proto, ttl, SRC6, DST6) + extension)
    packet = header + l4
    set_l4_checksum(packet, len(header), proto, partial=partial)
    return packet


def set_l4_checksum(packet: bytearray, l4: int, proto: int, *, partial: bool = False) -> None:
    field = l4 + (16 if proto == TCP else 6)
    packet[field:field + 2] = bytes(2)
    pseudo = pseudo_header(bytes(packet), proto, len(packet) - l4)
    if partial:
        value = fold(words(pseudo))
    else:
        value = checksum(pseudo + bytes(packet[l4:]))
        value = value or (0xFFFF if proto == UDP else 0)
    packet[field:field + 2] = struct.pack("!H", value)


def refresh(packet: bytearray) -> bytearray:
    """Checksums made valid again after a test changed a header field."""
    l4, proto = l4_of(packet)
    if packet[0] >> 4 == 4:
        packet[10:12] = bytes(2)
        packet[10:12] = struct.pack("!H", checksum(bytes(packet[:l4])))
    set_l4_checksum(packet, l4, proto)
    return packet


def tcp_packet(version: int, seq: int, payload: bytes, flags: int = ACK, *, options: bytes = TIMESTAMPS,
               partial: bool = False, **fields: Any) -> bytearray:
    """A TCP packet; `fields`: of tcp_header and ip_packet."""
    tcp_fields = {k: fields.pop(k) for k in ("ack", "window", "sport", "dport") if k in fields}
    return ip_packet(version, TCP, tcp_header(seq, flags, options=options, **tcp_fields) + payload,
                     partial=partial, **fields)


def udp_packet(version: int, payload: bytes, *, partial: bool = False, **fields: Any) -> bytearray:
    return ip_packet(version, UDP, udp_header(8 + len(payload)) + payload, partial=partial, **fields)


class Parsed(NamedTuple):
    version: int
    l4: int  # offset of the TCP/UDP header
    proto: int
    header: int  # offset of the payload
    ip_id: int
    seq: int
    flags: int
    payload: bytes


def check_packet(packet: bytes) -> Parsed:
    """Every header field a receiver checks, asserted valid; the packet's parts."""
    version = packet[0] >> 4
    l4, proto = l4_of(packet)
    if version == 4:
        assert checksum(packet[:l4]) == 0, "IPv4 header checksum"
        assert struct.unpack_from("!H", packet, 2)[0] == len(packet), "IPv4 total length"
        ip_id = struct.unpack_from("!H", packet, 4)[0]
    else:
        assert version == 6
        assert struct.unpack_from("!H", packet, 4)[0] == len(packet) - 40, "IPv6 payload length"
        ip_id = 0
    assert checksum(pseudo_header(packet, proto, len(packet) - l4) + packet[l4:]) == 0, "TCP/UDP checksum"
    if proto == TCP:
        header = l4 + (packet[l4 + 12] >> 4) * 4
        seq, flags = struct.unpack_from("!I", packet, l4 + 4)[0], packet[l4 + 13]
    else:
        assert proto == UDP
        assert struct.unpack_from("!H", packet, l4 + 4)[0] == len(packet) - l4, "UDP length"
        header, seq, flags = l4 + 8, 0, 0
    return Parsed(version, l4, proto, header, ip_id, seq, flags, bytes(packet[header:]))


def gso_type_of(version: int, proto: int) -> int:
    return GSO_UDP_L4 if proto == UDP else GSO_TCPV4 if version == 4 else GSO_TCPV6


def split(packet: bytes, gso_size: int, *, gso_type: int | None = None, csum_start: int | None = None) -> list[bytes]:
    """`segments` over the super-packet as `_seal_segments` runs it: each segment copied
    out (sealed) before the next is asked for."""
    whole = check_packet(finished(packet))
    buf = bytearray(packet) + bytes(SLACK)
    view, length = memoryview(buf), len(packet)
    if gso_type is None:
        gso_type = gso_type_of(whole.version, whole.proto)
    layout = super_packet_layout(view, length, gso_type, gso_size, whole.l4 if csum_start is None else csum_start)
    assert layout is not None
    full = layout[1] + layout[2] + gso_size
    return [bytes(view[start:min(start + full, length)]) for start in segments(view, length, layout, gso_size)]


def finished(packet: bytes) -> bytes:
    """A packet whose TCP/UDP checksum field holds the folded pseudo-header sum (asserted)
    with the checksum finished as the device does: the sum from the L4 header on, the
    field included."""
    l4, proto = l4_of(packet)
    field = l4 + (16 if proto == TCP else 6)
    assert struct.unpack_from("!H", packet, field)[0] == fold(words(pseudo_header(packet, proto, len(packet) - l4))), \
        "partial checksum"
    whole = bytearray(packet)
    whole[field:field + 2] = struct.pack("!H", 0xFFFF - fold(words(packet[l4:])))
    return bytes(whole)


def l4_of(packet: bytes) -> tuple[int, int]:
    """(offset, protocol) of the TCP/UDP header of a packet built here."""
    if packet[0] >> 4 == 4:
        return (packet[0] & 0x0F) * 4, packet[9]
    return (48, packet[40]) if packet[6] == HOP_BY_HOP else (40, packet[6])


def check_segments(original: bytes, parts: list[bytes], gso_size: int) -> None:
    """Each segment valid on its own, consecutive in IP id and sequence, flags where TCP
    puts them, and together the original payload."""
    first = check_packet(finished(original))
    assert len(parts) == max(1, -(-len(first.payload) // gso_size))
    parsed = [check_packet(part) for part in parts]
    assert b"".join(p.payload for p in parsed) == first.payload
    for index, part in enumerate(parsed):
        assert len(part.payload) == (gso_size if index < len(parts) - 1 else len(first.payload) - index * gso_size)
        assert parts[index][:part.l4] == _with_ip_fields(original[:first.l4], parts[index][:first.l4])
        if part.version == 4:
            assert part.ip_id == (first.ip_id + index) & 0xFFFF
        if part.proto == TCP:
            assert part.seq == (first.seq + index * gso_size) & 0xFFFFFFFF
            expected = first.flags
            if index < len(parts) - 1:
                expected &= ~(FIN | PSH)
            if index:
                expected &= ~CWR
            assert part.flags == expected
        # ports, ACK, window, options, UDP ports: the super-packet's
        assert _l4_fixed_fields(parts[index], part) == _l4_fixed_fields(original, part)


def _l4_fixed_fields(packet: bytes, parsed: Parsed) -> bytes:
    """The TCP/UDP header without the fields each segment has its own of (sequence
    number, flags, checksum, UDP length)."""
    header = bytearray(packet[parsed.l4:parsed.header])
    for a, b in ((4, 8), (13, 14), (16, 18)) if parsed.proto == TCP else ((4, 8),):
        header[a:b] = bytes(b - a)
    return bytes(header)


def _with_ip_fields(original_ip: bytes, segment_ip: bytes) -> bytes:
    """The super-packet's IP header with the fields a segment changes taken from the
    segment (those are checked on their own)."""
    changed = bytearray(original_ip)
    spans = [(2, 6), (10, 12)] if original_ip[0] >> 4 == 4 else [(4, 6)]
    for a, b in spans:
        changed[a:b] = segment_ip[a:b]
    return bytes(changed)


# --- segments ------------------------------------------------------------------------


@pytest.mark.parametrize("version", [4, 6])
@pytest.mark.parametrize("options", [b"", TIMESTAMPS], ids=["no-options", "timestamps"])
@pytest.mark.parametrize("payload_size", [1448 * 3, 1448 * 3 + 1, 1448 * 44 + 7, 1449, 60000])
def test_tcp_super_packet_splits_into_valid_segments(version: int, options: bytes, payload_size: int) -> None:
    original = bytes(tcp_packet(version, 0xFFFFF000, payload_of(payload_size), ACK | PSH, options=options,
                                partial=True, ip_id=0xFFFE))  # sequence and IP id wrap on the way
    check_segments(original, split(original, 1448), 1448)


@pytest.mark.parametrize("version", [4, 6])
@pytest.mark.parametrize("flags", [ACK | FIN, ACK | PSH | FIN | CWR, ACK | CWR | ECE, ACK])
def test_fin_and_psh_only_on_the_last_segment_cwr_only_on_the_first(version: int, flags: int) -> None:
    original = bytes(tcp_packet(version, 1000, payload_of(3000), flags, partial=True))
    parts = split(original, 1000, gso_type=gso_type_of(version, TCP) | GSO_ECN)
    check_segments(original, parts, 1000)
    assert [check_packet(p).flags for p in parts] == [
        flags & ~(FIN | PSH), flags & ~(FIN | PSH | CWR), flags & ~CWR]


@pytest.mark.parametrize("version", [4, 6])
@pytest.mark.parametrize("payload_size", [1200 * 5, 1200 * 5 - 1, 1201, 1])
def test_udp_super_packet_splits_into_datagrams(version: int, payload_size: int) -> None:
    original = bytes(udp_packet(version, payload_of(payload_size, 3), partial=True, ip_id=77))
    parts = split(original, 1200)
    check_segments(original, parts, 1200)
    assert [len(check_packet(p).payload) for p in parts][:-1] == [1200] * (len(parts) - 1)


def test_udp_segment_whose_checksum_is_zero_carries_0xffff() -> None:
    """0 in a UDP checksum means "none": a segment whose sum comes out 0 is sent as 0xFFFF."""
    datagram = udp_packet(4, payload_of(98) + bytes(2))
    datagram[26:28] = bytes(2)
    # The checksum, added as the last word, makes the data's sum 0xFFFF: its checksum 0.
    last = checksum(pseudo_header(bytes(datagram), UDP, len(datagram) - 20) + bytes(datagram[20:]))
    second_payload = payload_of(98) + struct.pack("!H", last)
    original = bytes(udp_packet(4, payload_of(100, 9) + second_payload, partial=True))
    parts = split(original, 100)
    check_segments(original, parts, 100)
    assert parts[1][28:] == second_payload and parts[1][26:28] == b"\xff\xff"


def test_ipv4_options_and_ipv6_extension_headers_are_repeated_in_every_segment() -> None:
    with_options = bytes(tcp_packet(4, 5, payload_of(2500), ACK | PSH, ipv4_options=bytes((1, 1, 1, 0)),
                                    partial=True))
    check_segments(with_options, split(with_options, 1000), 1000)
    for proto in (TCP, UDP):
        l4 = tcp_header(5, ACK, options=TIMESTAMPS) if proto == TCP else udp_header(8 + 2500)
        extended = bytes(ip_packet(6, proto, l4 + payload_of(2500), hop_by_hop=True, partial=True))
        parts = split(extended, 1000, gso_type=gso_type_of(6, proto), csum_start=48)
        check_segments(extended, parts, 1000)
        assert all(p[40:48] == extended[40:48] for p in parts)


def test_a_payload_no_larger_than_gso_size_is_one_segment() -> None:
    original = bytes(tcp_packet(4, 9, payload_of(1000), ACK | PSH | CWR, partial=True))
    (only,) = split(original, 1000)
    assert check_packet(only).flags == ACK | PSH | CWR
    assert only == finished(original)


def test_segments_are_written_in_place_over_the_super_packet() -> None:
    """Segment i starts at i * gso_size: its headers over the end of segment i-1's
    payload, so the payload itself never moves."""
    original = bytes(tcp_packet(4, 9, payload_of(4000), partial=True))
    buf = bytearray(original)
    view = memoryview(buf)
    layout = super_packet_layout(view, len(buf), GSO_TCPV4, 1000, 20)
    assert layout == (4, 20, 32)
    starts = []
    for start in segments(view, len(buf), layout, 1000):
        starts.append(start)
        assert buf[start + 52:start + 52 + 1000] == original[52 + start:52 + start + 1000]
    assert starts == [0, 1000, 2000, 3000]


# --- complete_checksum ---------------------------------------------------------------


@pytest.mark.parametrize("version", [4, 6])
@pytest.mark.parametrize("proto", [TCP, UDP])
@pytest.mark.parametrize("size", [0, 1, 2, 1399, 1400])
def test_complete_checksum_matches_the_reference(version: int, proto: int, size: int) -> None:
    whole = (tcp_packet(version, 77, payload_of(size, 5)) if proto == TCP else udp_packet(version, payload_of(size, 5)))
    partial = tcp_packet(version, 77, payload_of(size, 5), partial=True) if proto == TCP else \
        udp_packet(version, payload_of(size, 5), partial=True)
    l4 = 20 if version == 4 else 40
    offset = 16 if proto == TCP else 6
    field = l4 + offset
    reference = struct.unpack_from("!H", whole, field)[0]
    buf = partial + bytes(SLACK)
    assert complete_checksum(memoryview(buf), len(partial), l4, offset)
    assert struct.unpack_from("!H", buf, field)[0] in ({reference, 0xFFFF} if reference == 0 else {reference})
    assert buf[:len(partial)] == whole or reference == 0
    check_packet(bytes(buf[:len(partial)]))


@pytest.mark.parametrize(("csum_start", "csum_offset", "accepted"), [
    (20, 16, True),  # TCP over IPv4
    (20, 6, True),  # UDP over IPv4
    (19, 16, False),  # inside the IP header
    (0, 16, False),
    (20, 60 - 20 - 2, True),  # the field is the packet's last two bytes
    (20, 60 - 20 - 1, False),  # the field would end past the packet
    (60, 0, False),
    (1000, 16, False),
    (20, 65535, False),
])
def test_complete_checksum_refuses_offsets_outside_the_packet(csum_start: int, csum_offset: int,
                                                                accepted: bool) -> None:
    packet = tcp_packet(4, 1, payload_of(20), options=b"", partial=True)
    assert len(packet) == 60
    buf = packet + b"\xaa" * SLACK
    before = bytes(buf)
    assert complete_checksum(memoryview(buf), len(packet), csum_start, csum_offset) is accepted
    if not accepted:
        assert buf == before, "a refused packet is left as it was"
    assert buf[len(packet):] == before[len(packet):], "nothing written past the packet"


# --- super_packet_layout ---------------------------------------------------------------


def layout_of(packet: bytes | bytearray, gso_type: int, gso_size: int = 1000, csum_start: int = 20,
              length: int | None = None) -> tuple[int, int, int] | None:
    buf = bytearray(packet) + bytes(SLACK)
    return super_packet_layout(memoryview(buf), len(packet) if length is None else length, gso_type, gso_size,
                               csum_start)


def test_layout_of_well_formed_super_packets() -> None:
    assert layout_of(tcp_packet(4, 1, payload_of(3000), partial=True), GSO_TCPV4) == (4, 20, 32)
    assert layout_of(tcp_packet(4, 1, payload_of(3000), partial=True), GSO_TCPV4 | GSO_ECN) == (4, 20, 32)
    assert layout_of(tcp_packet(4, 1, payload_of(3000), options=b"", partial=True), GSO_TCPV4) == (4, 20, 20)
    assert layout_of(tcp_packet(6, 1, payload_of(3000), partial=True), GSO_TCPV6, csum_start=40) == (6, 40, 32)
    assert layout_of(udp_packet(4, payload_of(3000), partial=True), GSO_UDP_L4) == (4, 20, 8)
    assert layout_of(udp_packet(6, payload_of(3000), partial=True), GSO_UDP_L4, csum_start=40) == (6, 40, 8)
    options = tcp_packet(4, 1, payload_of(3000), ipv4_options=bytes(8), partial=True)
    assert layout_of(options, GSO_TCPV4) == (4, 28, 32)
    assert layout_of(tcp_packet(4, 1, b"x", partial=True), GSO_TCPV4, gso_size=MAX_PACKET - 52) == (4, 20, 32)


def _mutated(packet: bytearray, at: int, value: int) -> bytearray:
    packet[at] = value
    return packet


TCP4 = bytes(tcp_packet(4, 1, payload_of(3000), partial=True))
TCP6 = bytes(tcp_packet(6, 1, payload_of(3000), partial=True))
UDP4 = bytes(udp_packet(4, payload_of(3000), partial=True))
UDP6 = bytes(udp_packet(6, payload_of(3000), partial=True))


@pytest.mark.parametrize(("packet", "gso_type", "gso_size", "csum_start", "length"), [
    pytest.param(TCP6, GSO_TCPV4, 1000, 40, None, id="tcpv4-with-ipv6"),
    pytest.param(TCP4, GSO_TCPV6, 1000, 20, None, id="tcpv6-with-ipv4"),
    pytest.param(TCP4, GSO_TCPV6, 1000, 40, None, id="tcpv6-with-ipv4-csum-start-40"),
    pytest.param(_mutated(bytearray(TCP4), 0, 0x55), GSO_TCPV4, 1000, 20, None, id="version-5"),
    pytest.param(_mutated(bytearray(UDP4), 0, 0x55), GSO_UDP_L4, 1000, 20, None, id="udp-version-5"),
    pytest.param(_mutated(bytearray(UDP4), 0, 0x05), GSO_UDP_L4, 1000, 20, None, id="udp-version-0"),
    pytest.param(_mutated(bytearray(TCP4), 9, UDP), GSO_TCPV4, 1000, 20, None, id="tcpv4-protocol-udp"),
    pytest.param(UDP4, GSO_TCPV4, 1000, 20, None, id="tcpv4-with-udp"),
    pytest.param(TCP4, GSO_UDP_L4, 1000, 20, None, id="udp-l4-with-tcp"),
    pytest.param(_mutated(bytearray(TCP4), 0, 0x44), GSO_TCPV4, 1000, 20, None, id="ihl-4"),
    pytest.param(_mutated(bytearray(UDP4), 0, 0x40), GSO_UDP_L4, 1000, 20, None, id="udp-ihl-0"),
    pytest.param(_mutated(bytearray(TCP4), 32, 0x40), GSO_TCPV4, 1000, 20, None, id="tcp-data-offset-4"),
    pytest.param(_mutated(bytearray(TCP6), 52, 0x00), GSO_TCPV6, 1000, 40, None, id="tcp6-data-offset-0"),
    pytest.param(TCP4, GSO_TCPV4, 1000, 20, 52, id="tcp-no-payload"),
    pytest.param(TCP6, GSO_TCPV6, 1000, 40, 72, id="tcp6-no-payload"),
    pytest.param(UDP4, GSO_UDP_L4, 1000, 20, 28, id="udp-no-payload"),
    pytest.param(UDP6, GSO_UDP_L4, 1000, 40, 48, id="udp6-no-payload"),
    pytest.param(TCP4, GSO_TCPV4, 1000, 20, 27, id="shorter-than-any-header"),
    pytest.param(TCP4, GSO_TCPV4, 1000, 20, 45, id="tcp-header-cut"),
    pytest.param(TCP4, GSO_TCPV4, 0, 20, None, id="gso-size-0"),
    pytest.param(TCP4, GSO_TCPV4, MAX_PACKET - 51, 20, None, id="segment-over-65535"),
    pytest.param(UDP6, GSO_UDP_L4, MAX_PACKET - 47, 40, None, id="udp6-segment-over-65535"),
    pytest.param(TCP4, GSO_NONE, 1000, 20, None, id="gso-none"),
    pytest.param(UDP4, 3, 1000, 20, None, id="gso-udp-ufo"),
    pytest.param(TCP4, 2, 1000, 20, None, id="gso-type-2"),
    pytest.param(TCP4, GSO_ECN, 1000, 20, None, id="ecn-alone"),
    pytest.param(TCP6, GSO_TCPV6, 1000, 39, None, id="tcp6-csum-start-in-ip-header"),
    pytest.param(UDP6, GSO_UDP_L4, 1000, 0, None, id="udp6-csum-start-0"),
    pytest.param(TCP6, GSO_TCPV6, 1000, len(TCP6) - 19, None, id="tcp6-csum-start-at-the-end"),
    pytest.param(UDP6, GSO_UDP_L4, 1000, len(UDP6) - 8, None, id="udp6-csum-start-at-the-end"),
])
def test_layout_refuses_inconsistent_headers(packet: bytes, gso_type: int, gso_size: int, csum_start: int,
                                             length: int | None) -> None:
    assert layout_of(packet, gso_type, gso_size, csum_start, length) is None


# --- Coalescer -----------------------------------------------------------------------


def deliver(packets: list[bytes | bytearray]) -> list[bytes]:
    """What `_deliver` writes to the TUN for these decrypted packets, in order (each
    packet in a buffer larger than itself, as the plaintext buffer is)."""
    coalescer, writes = Coalescer(), []
    for packet in packets:
        plain = memoryview(bytearray(packet) + b"\xee" * SLACK)
        length = len(packet)
        if coalescer.pending:
            if coalescer.continues(plain, length):
                coalescer.append(plain, length)
                continue
            writes.append(bytes(coalescer.finish()))
        if coalescer.start(plain, length):
            continue
        writes.append(VNET_HDR.pack(0, GSO_NONE, 0, 0, 0, 0) + bytes(packet))
    if coalescer.pending:
        writes.append(bytes(coalescer.finish()))
    return writes


def check_write(write: bytes) -> tuple[int, Parsed]:
    """(segments joined, the packet as parsed) for a TUN write: a packet behind an empty
    header, one segment with its checksum left to the kernel, or a TSO packet whose header
    and partial checksum the kernel accepts."""
    flags, gso_type, hdr_len, gso_size, csum_start, csum_offset = VNET_HDR.unpack_from(write)
    packet = write[VNET_HDR_SIZE:]
    if gso_type == GSO_NONE and not flags:
        assert (hdr_len, gso_size, csum_start, csum_offset) == (0, 0, 0, 0)
        return 1, check_packet(packet)
    if gso_type == GSO_NONE:
        l4 = 20 if packet[0] >> 4 == 4 else 40
        assert (flags, hdr_len, gso_size, csum_start, csum_offset) == (NEEDS_CSUM, 0, 0, l4, 16)
        return 1, check_packet(finished(packet))
    version = packet[0] >> 4
    assert (flags, gso_type) == (NEEDS_CSUM, GSO_TCPV4 if version == 4 else GSO_TCPV6)
    l4 = 20 if version == 4 else 40
    assert (csum_start, csum_offset) == (l4, 16)
    assert hdr_len == l4 + (packet[l4 + 12] >> 4) * 4
    assert len(packet) <= MAX_PACKET
    whole = check_packet(finished(packet))
    assert len(whole.payload) > gso_size
    count = -(-len(whole.payload) // gso_size)
    return count, whole


def alone(packet: bytes | bytearray) -> bytes:
    """The write of a packet that joins nothing, as `deliver` models `_deliver`: behind an
    empty header as it came, or, for a segment the coalescer took (what it may take is
    tested on its own above) whose sender left the checksum partial (the field holds the
    folded pseudo-header sum, by this file's own arithmetic), with NEEDS_CSUM."""
    if Coalescer().start(memoryview(bytearray(packet)), len(packet)):
        l4 = 20 if packet[0] >> 4 == 4 else 40
        field = struct.unpack_from("!H", packet, l4 + 16)[0]
        if field % 0xFFFF == fold(words(pseudo_header(bytes(packet), TCP, len(packet) - l4))) % 0xFFFF:
            return VNET_HDR.pack(NEEDS_CSUM, GSO_NONE, 0, 0, l4, 16) + bytes(packet)
    return bytes(VNET_HDR_SIZE) + bytes(packet)


def coalesced(packets: list[bytes | bytearray]) -> list[int]:
    """How many segments each TUN write joined."""
    return [check_write(write)[0] for write in deliver(packets)]


def flow(version: int, sizes: list[int], *, first_seq: int = 1000, flags: int = ACK, **fields: Any) -> list[bytearray]:
    """Consecutive segments of one flow with these payload sizes."""
    packets, seq = [], first_seq
    for index, size in enumerate(sizes):
        packets.append(tcp_packet(version, seq, payload_of(size, index), flags, ip_id=index, **fields))
        seq = (seq + size) & 0xFFFFFFFF
    return packets


@pytest.mark.parametrize("version", [4, 6])
@pytest.mark.parametrize("options", [b"", TIMESTAMPS], ids=["no-options", "timestamps"])
@pytest.mark.parametrize(("payload_size", "flags"), [(1448 * 10, ACK | PSH), (1448 * 10 + 5, ACK | PSH),
                                                     (1448 * 44, ACK), (1448 * 2 - 1, ACK)])
def test_segments_of_a_super_packet_coalesce_back_into_it(version: int, options: bytes, payload_size: int,
                                                          flags: int) -> None:
    original = bytes(tcp_packet(version, 0xFFFFF000, payload_of(payload_size), flags, options=options, partial=True,
                                ip_id=0xFFF0))
    (write,) = deliver(split(original, 1448))
    l4 = 20 if version == 4 else 40
    header = l4 + 20 + len(options)
    assert VNET_HDR.unpack_from(write) == (NEEDS_CSUM, gso_type_of(version, TCP), header, 1448, l4, 16)
    assert write[VNET_HDR_SIZE:] == original  # the partial checksum is the kernel's too
    count, whole = check_write(write)
    assert count == -(-payload_size // 1448)
    assert whole.payload == payload_of(payload_size) and whole.flags == flags


@pytest.mark.parametrize("version", [4, 6])
def test_a_single_segment_goes_alone_as_it_came(version: int) -> None:
    packet = flow(version, [1000])[0]
    assert deliver([packet]) == [bytes(VNET_HDR_SIZE) + bytes(packet)]  # its checksum whole: the kernel checks it
    # Its sender left the checksum partial (a daemon that knows this one completes it):
    # the kernel completes it.
    l4 = 20 if version == 4 else 40
    partial = ip_packet(version, TCP, bytes(packet[l4:]), partial=True)
    (write,) = deliver([partial])
    assert VNET_HDR.unpack_from(write) == (NEEDS_CSUM, GSO_NONE, 0, 0, l4, 16)
    assert finished(write[VNET_HDR_SIZE:]) == bytes(ip_packet(version, TCP, bytes(packet[l4:])))
    # Neither whole nor partial (damaged before the tunnel): as it came, for the kernel to drop.
    packet[l4 + 16] ^= 0xFF
    assert deliver([packet]) == [bytes(VNET_HDR_SIZE) + bytes(packet)]
    # A short segment after it closes nothing: two segments, joined.
    assert coalesced(flow(version, [1000, 10])) == [2]


def test_psh_segment_is_joined_and_closes_the_packet() -> None:
    packets = flow(4, [1000, 1000, 1000, 1000])
    packets[1] = refresh(_mutated(packets[1], 33, ACK | PSH))
    writes = deliver(packets)
    assert [check_write(w)[0] for w in writes] == [2, 2]
    assert check_write(writes[0])[1].flags == ACK | PSH
    assert check_write(writes[1])[1].flags == ACK
    # A PSH segment starts nothing: nothing could follow it.
    lone = flow(4, [1000, 1000])
    lone[0] = refresh(_mutated(lone[0], 33, ACK | PSH))
    assert coalesced(lone) == [1, 1]


def test_a_shorter_segment_closes_the_packet_a_longer_one_is_refused() -> None:
    assert coalesced(flow(4, [1000, 999, 999])) == [2, 1]
    assert coalesced(flow(4, [1000, 1000, 1001, 1001])) == [2, 2]
    assert coalesced(flow(6, [1000, 1000, 1000, 1])) == [4]


def test_at_most_64_segments_and_65535_bytes() -> None:
    assert coalesced(flow(4, [10] * (MAX_SEGMENTS + 6))) == [MAX_SEGMENTS, 6]
    assert coalesced(flow(6, [10] * (2 * MAX_SEGMENTS))) == [MAX_SEGMENTS, MAX_SEGMENTS]
    header = 20 + 20 + len(TIMESTAMPS)
    # 44 segments of 1460 and a last one that ends the packet at exactly 65535 bytes.
    last = MAX_PACKET - header - 44 * 1460
    assert coalesced(flow(4, [1460] * 44 + [last])) == [45]
    assert coalesced(flow(4, [1460] * 44 + [last + 1])) == [44, 1]
    writes = deliver(flow(4, [1460] * 44 + [last]))
    assert len(writes[0]) == VNET_HDR_SIZE + MAX_PACKET


def _other(packet: bytearray, at: int, value: bytes) -> bytearray:
    packet[at:at + len(value)] = value
    return refresh(packet)


V4_TCP, V6_TCP = 20, 40  # TCP header offsets
REFUSED_SECOND_SEGMENTS = {
    # another flow
    "source-port": (4, lambda p: _other(p, V4_TCP, struct.pack("!H", 40002))),
    "destination-port": (6, lambda p: _other(p, V6_TCP + 2, struct.pack("!H", 5203))),
    "source-address-v4": (4, lambda p: _other(p, 12, bytes((192, 0, 2, 9)))),
    "destination-address-v4": (4, lambda p: _other(p, 19, b"\x09")),
    "source-address-v6": (6, lambda p: _other(p, 23, b"\x09")),
    "destination-address-v6": (6, lambda p: _other(p, 39, b"\x09")),
    "tos": (4, lambda p: _other(p, 1, b"\x01")),
    "ttl": (4, lambda p: _other(p, 8, b"\x3f")),
    "traffic-class": (6, lambda p: _other(p, 1, b"\x12")),
    "flow-label": (6, lambda p: _other(p, 3, b"\x46")),
    "hop-limit": (6, lambda p: _other(p, 7, b"\x3f")),
    "ipv6-not-tcp": (6, lambda p: _other(p, 6, bytes((UDP,)))),
    "ipv4-not-tcp": (4, lambda p: _other(p, 9, bytes((UDP,)))),
    "ipv6-after-ipv4": (4, lambda p: tcp_packet(6, 2000, bytes(p[52:]))),
    "ipv4-after-ipv6": (6, lambda p: tcp_packet(4, 2000, bytes(p[72:]))),
    # the stream does not continue
    "sequence-gap": (4, lambda p: _other(p, V4_TCP + 4, struct.pack("!I", 2001))),
    "sequence-behind": (6, lambda p: _other(p, V6_TCP + 4, struct.pack("!I", 1999))),
    "retransmission": (4, lambda p: _other(p, V4_TCP + 4, struct.pack("!I", 1000))),
    "ack": (4, lambda p: _other(p, V4_TCP + 8, struct.pack("!I", 0x0A0B0C0E))),
    "window": (6, lambda p: _other(p, V6_TCP + 14, struct.pack("!H", 502))),
    "timestamp": (4, lambda p: _other(p, V4_TCP + 24, b"\x02")),
    "options-length": (4, lambda p: tcp_packet(4, 2000, bytes(p[52:]), options=TIMESTAMPS + bytes(4))),
    "no-options": (6, lambda p: tcp_packet(6, 2000, bytes(p[72:]), options=b"")),
    # flags the kernel would not merge
    **{f"flag-{name}": (4, lambda p, flag=flag: _other(p, V4_TCP + 13, bytes((ACK | flag,))))
       for name, flag in (("syn", SYN), ("fin", FIN), ("rst", RST), ("urg", URG), ("ece", ECE), ("cwr", CWR))},
    "flag-fin-v6": (6, lambda p: _other(p, V6_TCP + 13, bytes((ACK | FIN,)))),
    "no-ack": (4, lambda p: _other(p, V4_TCP + 13, bytes((PSH,)))),
    # IPv4 fragments and options
    "more-fragments": (4, lambda p: _other(p, 6, b"\x20")),
    "fragment-offset": (4, lambda p: _other(p, 6, b"\x00\x01")),
    "fragment-offset-high": (4, lambda p: _other(p, 6, b"\x01\x00")),
    "ipv4-options": (4, lambda p: tcp_packet(4, 2000, bytes(p[52:]), ipv4_options=bytes((1, 1, 1, 0)))),
    "ipv6-extension-header": (6, lambda p: tcp_packet(6, 2000, bytes(p[72:]), hop_by_hop=True)),
    # no payload: a pure ACK
    "no-payload": (4, lambda p: tcp_packet(4, 2000, b"")),
}


@pytest.mark.parametrize("name", list(REFUSED_SECOND_SEGMENTS))
def test_coalescer_refuses_to_join(name: str) -> None:
    version, change = REFUSED_SECOND_SEGMENTS[name]
    first, unchanged, third = flow(version, [1000, 1000, 1000])
    assert coalesced([first, unchanged, third]) == [3], "the unchanged segment is joined"
    second = change(bytearray(unchanged))
    # Each goes alone: the changed one joins neither the first nor the third (which continues the first).
    assert deliver([first, second, third]) == [alone(p) for p in (first, second, third)]


@pytest.mark.parametrize("name", ["more-fragments", "fragment-offset", "ipv4-options", "ipv6-extension-header",
                                  "flag-syn", "flag-fin", "flag-rst", "flag-urg", "flag-cwr", "no-ack", "no-payload",
                                  "ipv4-not-tcp", "ipv6-not-tcp"])
def test_coalescer_starts_nothing_with_a_segment_it_could_not_join(name: str) -> None:
    version, change = REFUSED_SECOND_SEGMENTS[name]
    packet = change(flow(version, [1000, 1000])[1])
    coalescer = Coalescer()
    assert not coalescer.start(memoryview(packet), len(packet))
    assert not coalescer.pending
    assert deliver([packet, packet]) == [bytes(VNET_HDR_SIZE) + bytes(packet)] * 2


def test_ipv4_segments_without_dont_fragment_are_joined() -> None:
    assert coalesced(flow(4, [1000, 1000, 1000], fragment=0)) == [3]


@pytest.mark.parametrize(("fragment", "at", "value"), [
    pytest.param(DF, 6, b"\x00", id="dont-fragment-changes"),
    pytest.param(0, 4, struct.pack("!H", 9999), id="ip-id-jumps-without-dont-fragment"),
    pytest.param(DF, 6, b"\xc0", id="reserved-flag"),
    pytest.param(DF, V4_TCP + 12, bytes((0x81,)), id="tcp-ae-bit-differs"),
])
def test_header_differences_the_kernel_would_not_join(fragment: int, at: int, value: bytes) -> None:
    packets = flow(4, [1000, 1000], fragment=fragment)
    packets[1] = _other(packets[1], at, value)
    assert coalesced(packets) == [1, 1]


def test_coalescer_is_reusable_after_finish() -> None:
    coalescer = Coalescer()
    first = flow(6, [500, 500])
    for _ in range(2):
        assert not coalescer.continues(memoryview(first[0]), len(first[0]))  # nothing pending
        assert coalescer.start(memoryview(first[0]), len(first[0]))
        assert coalescer.continues(memoryview(first[1]), len(first[1]))
        coalescer.append(memoryview(first[1]), len(first[1]))
        count, whole = check_write(bytes(coalescer.finish()))
        assert count == 2 and whole.payload == payload_of(500, 0) + payload_of(500, 1)
        assert not coalescer.pending
