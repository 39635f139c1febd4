"""Fuzzing tunnelmesh/offload.py. Random well-formed super-packets split by `segments`
into valid packets and, for TCP, joined by the Coalescer back into super-packets that
split into the very same packets. Damaged or arbitrary input (headers, lengths, gso
types, offsets) never raises: `super_packet_layout` says None, `complete_checksum`
False, the Coalescer writes packets alone; whatever they accept still comes out right
and nothing past the packet's length is read or written. Helpers and the reference
checks are the unit tests' (tests/unit/test_offload_segments.py)."""

from __future__ import annotations

import struct
from typing import NamedTuple

from hypothesis import given, settings
from hypothesis import strategies as st

from tests.unit.test_offload_segments import (
    ACK, CWR, ECE, FIN, PSH, SLACK, TCP, TIMESTAMPS, UDP, alone, check_segments, check_write, deliver, finished, flow,
    gso_type_of,
    ip_packet, payload_of, pseudo_header, split, tcp_header, udp_header,
)
from tunnelmesh.offload import (
    GSO_ECN, GSO_NONE, GSO_TCPV4, GSO_TCPV6, GSO_UDP_L4, MAX_PACKET, MAX_SEGMENTS, VNET_HDR, VNET_HDR_SIZE,
    complete_checksum, partial_checksum_at, segments, super_packet_layout,
)
from tunnelmesh.packets import checksum

FUZZ = settings(max_examples=150, deadline=None)
#: What is in a buffer past the packet: two different fillers must give the same answer.
TAILS = (b"\x00" * SLACK, b"\xa5" * SLACK)


class SuperPacket(NamedTuple):
    packet: bytes  # as the kernel hands it over: lengths of the whole, checksum partial
    gso_type: int
    gso_size: int
    csum_start: int
    joinable: bool  # segments the Coalescer joins (TCP, flags ACK or ACK|PSH, no IP options)


@st.composite
def super_packets(draw: st.DrawFn) -> SuperPacket:
    version = draw(st.sampled_from([4, 6]))
    proto = draw(st.sampled_from([TCP, UDP]))
    # Mostly what the Coalescer joins; the rest it must leave alone.
    ipv4_options = draw(st.sampled_from([b"", b"", b"", bytes((1, 1, 1, 0)), bytes(40)])) if version == 4 else b""
    hop_by_hop = version == 6 and draw(st.sampled_from([False, False, True]))
    l4 = 20 + len(ipv4_options) if version == 4 else 48 if hop_by_hop else 40
    flags = ACK
    if proto == TCP:
        options = draw(st.sampled_from([b"", TIMESTAMPS, b"\x01" * 40]))
        flags |= draw(st.sampled_from([0, 0, PSH, PSH, PSH | FIN, FIN, CWR, CWR | ECE | PSH]))
        header = tcp_header(draw(st.integers(0, 0xFFFFFFFF)), flags, options=options)
    else:
        header = udp_header(0)  # the length is set below
    room = MAX_PACKET - l4 - len(header)
    gso_size = min(room, draw(st.one_of(st.sampled_from([1, 536, 1220, 1448, 1500]), st.integers(1, 1500))))
    # Whole multiples of gso_size or not, one segment to far more than the Coalescer joins.
    count = draw(st.one_of(st.sampled_from([1, 2, MAX_SEGMENTS, MAX_SEGMENTS + 1]), st.integers(1, 100)))
    size = max(1, min(room, count * gso_size - draw(st.one_of(st.just(0), st.integers(0, gso_size - 1)))))
    payload = payload_of(size, draw(st.integers(0, 2**32)))
    if proto == UDP:
        header = udp_header(8 + size)
    packet = ip_packet(version, proto, header + payload, ip_id=draw(st.integers(0, 0xFFFF)), ipv4_options=ipv4_options,
                       hop_by_hop=hop_by_hop, fragment=draw(st.sampled_from([0, 0x4000])), partial=True)
    gso_type = gso_type_of(version, proto) | (GSO_ECN if flags & CWR else 0)
    joinable = proto == TCP and flags & ~PSH == ACK and not ipv4_options and not hop_by_hop
    return SuperPacket(bytes(packet), gso_type, gso_size, l4, joinable)


def unjoined(writes: list[bytes]) -> list[bytes]:
    """The TUN writes split back into packets, as the kernel would for a TSO packet, and
    with their checksums completed where they were left to it."""
    packets = []
    for write in writes:
        check_write(write)
        flags, gso_type, _, gso_size, csum_start, _ = VNET_HDR.unpack_from(write)
        packet = write[VNET_HDR_SIZE:]
        if gso_type != GSO_NONE:
            packets.extend(split(packet, gso_size, csum_start=csum_start))
        else:
            packets.append(finished(packet) if flags else packet)
    return packets


@FUZZ
@given(super_packets())
def test_super_packets_split_into_valid_segments_that_join_back(sp: SuperPacket) -> None:
    parts = split(sp.packet, sp.gso_size, gso_type=sp.gso_type, csum_start=sp.csum_start)
    check_segments(sp.packet, parts, sp.gso_size)
    if sp.gso_type == GSO_UDP_L4:
        return  # the Coalescer joins TCP only
    writes = deliver(parts)
    assert unjoined(writes) == parts
    if sp.joinable:
        assert len(writes) == -(-len(parts) // MAX_SEGMENTS)
        if len(parts) <= MAX_SEGMENTS:
            assert writes[0] == alone(parts[0]) if len(parts) == 1 else writes[0][VNET_HDR_SIZE:] == sp.packet


@st.composite
def damaged_packets(draw: st.DrawFn) -> bytes:
    """Bytes near a super-packet (a few bytes changed, cut short) or any bytes at all."""
    if draw(st.booleans()):
        return draw(st.binary(max_size=120))
    packet = bytearray(draw(super_packets()).packet)
    for at, value in draw(st.lists(st.tuples(st.integers(0, 79), st.integers(0, 255)), max_size=4)):
        if at < len(packet):
            packet[at] = value
    return bytes(packet[:draw(st.one_of(st.just(len(packet)), st.integers(0, len(packet))))])


GSO_TYPES = st.one_of(st.sampled_from([GSO_NONE, GSO_TCPV4, GSO_TCPV6, GSO_UDP_L4, GSO_TCPV4 | GSO_ECN,
                                       GSO_TCPV6 | GSO_ECN, GSO_UDP_L4 | GSO_ECN]), st.integers(0, 255))
OFFSETS = st.one_of(st.sampled_from([0, 6, 16, 19, 20, 40, 48]), st.integers(0, 0xFFFF))


def in_buffer(packet: bytes, tail: bytes) -> tuple[bytearray, memoryview]:
    buf = bytearray(packet) + tail
    return buf, memoryview(buf)


@FUZZ
@given(damaged_packets(), st.data(), GSO_TYPES, st.one_of(st.integers(0, 1600), st.integers(0, 0xFFFF)), OFFSETS)
def test_layout_and_segments_take_any_input(packet: bytes, data: st.DataObject, gso_type: int, gso_size: int,
                                            csum_start: int) -> None:
    length = data.draw(st.integers(0, len(packet)))
    layouts = {super_packet_layout(in_buffer(packet, tail)[1], length, gso_type, gso_size, csum_start)
               for tail in TAILS}
    assert len(layouts) == 1, "the answer depends on bytes past the packet"
    (layout,) = layouts
    if layout is None:
        return
    version, l4, l4_header = layout
    assert version == packet[0] >> 4 in (4, 6)
    assert l4_header == (8 if gso_type & ~GSO_ECN == GSO_UDP_L4 else (packet[l4 + 12] >> 4) * 4)
    assert l4_header == 8 or l4_header >= 20, "a TCP header is at least 20 bytes"
    header = l4 + l4_header
    assert header < length and header + gso_size <= MAX_PACKET
    proto = UDP if l4_header == 8 else TCP
    for tail in TAILS:
        buf, view = in_buffer(packet, tail)
        payloads = []
        for start in segments(view, length, layout, gso_size):
            segment = bytes(view[start:min(start + header + gso_size, length)])
            payloads.append(segment[header:])
            # Whatever the headers said, each segment's lengths and checksums are right.
            if version == 4:
                assert checksum(segment[:l4]) == 0
                assert struct.unpack_from("!H", segment, 2)[0] == len(segment)
            else:
                assert struct.unpack_from("!H", segment, 4)[0] == len(segment) - 40
            assert checksum(pseudo_header(segment, proto, len(segment) - l4) + segment[l4:]) == 0
        assert b"".join(payloads) == packet[header:length]
        assert all(len(p) == gso_size for p in payloads[:-1]) and 0 < len(payloads[-1]) <= gso_size
        assert buf[len(packet):] == tail, "written past the packet"


@FUZZ
@given(damaged_packets(), st.data())
def test_complete_checksum_takes_any_offsets(packet: bytes, data: st.DataObject) -> None:
    length = data.draw(st.integers(0, len(packet)))
    csum_start = data.draw(st.one_of(OFFSETS, st.integers(0, length + 2)))
    near_the_end = st.integers(-3, 1).map(lambda delta: max(0, length - 2 - csum_start + delta))
    csum_offset = data.draw(st.one_of(OFFSETS, near_the_end))
    field = csum_start + csum_offset
    results = []
    for tail in TAILS:
        buf, view = in_buffer(packet, tail)
        accepted = complete_checksum(view, length, csum_start, csum_offset)
        assert accepted is (csum_start >= 20 and field + 2 <= length)
        results.append(bytes(buf[:len(packet)]))
        assert buf[len(packet):] == tail, "written past the packet"
        if not accepted:
            assert buf[:len(packet)] == packet
            continue
        assert buf[:field] == packet[:field] and buf[field + 2:len(packet)] == packet[field + 2:]
        assert buf[field:field + 2] != b"\x00\x00"
        if csum_offset % 2 == 0:
            # The partial sum that was in the field and the data with the result sum to 0xFFFF.
            region = bytes(buf[csum_start:length])
            assert checksum(region + b"\x00" * (len(region) & 1) + packet[field:field + 2]) == 0
    assert results[0] == results[1], "the answer depends on bytes past the packet"


def masked(packet: bytes) -> bytes:
    """A TCP segment without the fields that segmenting a joined packet rewrites and that
    the Coalescer neither checks nor keeps: IP length, IP id, DF and reserved flag, header
    checksum, TCP reserved bits and AE, TCP checksum, urgent pointer (offload.py joins
    segments that differ in these; see the xfail unit tests)."""
    out = bytearray(packet)
    if out[0] >> 4 == 4:
        out[2:6] = bytes(4)
        out[10:12] = bytes(2)
        out[6] &= ~0xC0  # DF and the reserved bit
        l4 = 20
    else:
        out[4:6] = bytes(2)
        l4 = 40
    out[l4 + 12] &= 0xF0  # the reserved bits and AE
    out[l4 + 16:l4 + 20] = bytes(4)  # and the urgent pointer: no URG flag in what is joined
    return bytes(out)


@st.composite
def received_packets(draw: st.DrawFn) -> list[bytes]:
    """Segments of one or two flows as a peer sends them, a few bytes of some changed, some
    cut short, other packets between them."""
    packets: list[bytes] = []
    for _ in range(draw(st.integers(1, 2))):
        count = draw(st.one_of(st.integers(1, 80), st.sampled_from([MAX_SEGMENTS, MAX_SEGMENTS + 1])))
        sizes = draw(st.lists(st.sampled_from([1, 100, 1000, 1448]), min_size=count, max_size=count))
        version = draw(st.sampled_from([4, 6]))
        packets.extend(bytes(p) for p in flow(version, sizes, first_seq=draw(st.integers(0, 0xFFFFFFFF)),
                                              fragment=draw(st.sampled_from([0, 0x4000]))))
    for _ in range(draw(st.integers(0, 6))):
        index = draw(st.integers(0, len(packets) - 1))
        packet = bytearray(packets[index])
        packet[draw(st.integers(0, min(79, len(packet) - 1)))] = draw(st.integers(0, 255))
        packets[index] = bytes(packet)
    for _ in range(draw(st.integers(0, 3))):
        index = draw(st.integers(0, len(packets) - 1))
        packets[index] = packets[index][:draw(st.integers(0, len(packets[index])))]
    for _ in range(draw(st.integers(0, 3))):
        packets.insert(draw(st.integers(0, len(packets))), draw(damaged_packets()))
    return packets


def check_writes(packets: list[bytes], writes: list[bytes]) -> None:
    """Each TUN write is one packet as `alone` says (unchanged, or its checksum left to the
    kernel), or a valid TSO packet that splits back into the next packets (but for what
    `masked` leaves out)."""
    at = 0
    for write in writes:
        _, gso_type, _, gso_size, csum_start, _ = VNET_HDR.unpack_from(write)
        if gso_type == GSO_NONE:
            assert write == alone(packets[at]), "a packet written alone is written as it came but for its checksum"
            at += 1
            continue
        count, _ = check_write(write)
        assert count <= MAX_SEGMENTS
        parts = split(write[VNET_HDR_SIZE:], gso_size, csum_start=csum_start)
        assert [masked(p) for p in parts] == [masked(p) for p in packets[at:at + count]]
        at += count
    assert at == len(packets)


@FUZZ
@given(received_packets())
def test_coalescer_joins_only_what_splits_back_into_the_segments(packets: list[bytes]) -> None:
    check_writes(packets, deliver(packets))


@FUZZ
@given(st.lists(damaged_packets(), max_size=12))
def test_coalescer_takes_any_bytes(packets: list[bytes]) -> None:
    """Any bytes, passed as `_deliver` does (in a buffer longer than the packet)."""
    check_writes(packets, deliver(packets))


@FUZZ
@given(version=st.sampled_from([4, 6]), proto=st.sampled_from([TCP, UDP]), payload=st.binary(max_size=300),
       garbage=st.integers(0, 0xFFFF), ipv4_options=st.sampled_from([b"", b"\x01" * 4, b"\x01" * 8]))
def test_a_checksum_left_partial_is_found_and_completes_to_the_right_one(
        version: int, proto: int, payload: bytes, garbage: int, ipv4_options: bytes) -> None:
    """A packet whose sender left its checksum partial is written for the kernel to
    complete, which gives the one right checksum; one with its whole checksum, or with
    anything else in the field, is not (the kernel checks it)."""
    l4_bytes = (tcp_header(7, ACK) if proto == TCP else udp_header(8 + len(payload))) + payload
    options = ipv4_options if version == 4 else b""
    right = bytes(ip_packet(version, proto, l4_bytes, ipv4_options=options))
    partial = ip_packet(version, proto, l4_bytes, ipv4_options=options, partial=True)
    l4 = len(partial) - len(l4_bytes)
    field = l4 + (16 if proto == TCP else 6)
    assert partial_checksum_at(partial, len(partial)) == (l4, field - l4)
    assert finished(bytes(partial)) == right or (proto == UDP and right[field:field + 2] == b"\xff\xff")
    whole_is_partial = right[field:field + 2] == partial[field:field + 2]  # they can coincide: it completes to itself
    assert (partial_checksum_at(right, len(right)) is not None) == whole_is_partial
    other = bytearray(partial)
    other[field:field + 2] = garbage.to_bytes(2, "big")
    if garbage % 0xFFFF != int.from_bytes(partial[field:field + 2], "big") % 0xFFFF:
        assert partial_checksum_at(other, len(other)) is None


@FUZZ
@given(data=st.binary(max_size=120), slack=st.integers(0, 64))
def test_finding_a_partial_checksum_takes_any_bytes(data: bytes, slack: int) -> None:
    buffer = bytearray(data) + bytes(slack)
    where = partial_checksum_at(buffer, len(data))
    assert bytes(buffer) == data + bytes(slack)  # it only reads
    if where is not None:
        csum_start, csum_offset = where
        assert csum_offset in (6, 16) and 20 <= csum_start and csum_start + csum_offset + 2 <= len(data)
