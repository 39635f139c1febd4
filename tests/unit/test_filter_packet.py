"""The filter's header parser: what it reads, and every drop reason (fail closed)."""

from __future__ import annotations

import ipaddress

import pytest

from tests.support.ippackets import (
    ACK,
    ICMP,
    ICMPV6,
    SYN,
    TCP,
    UDP,
    icmp,
    icmp_error,
    ipv4,
    ipv6,
    ping4,
    ping6,
    tcp,
    tcp4,
    tcp6,
    udp,
    udp4,
    udp6,
)
from tunnelmesh.filter import packet as p

A4, B4 = "100.64.0.2", "100.64.0.1"
A6, B6 = "fd00::2", "fd00::1"


def parse(buf: bytearray, length: int | None = None) -> tuple[str | None, p.Headers]:
    headers = p.Headers()
    return p.parse(buf, len(buf) if length is None else length, headers), headers


def test_ipv4_tcp_fields_are_read_in_place() -> None:
    reason, h = parse(tcp4(A4, B4, 40000, 22, SYN))
    assert reason is None
    assert (h.version, h.proto, h.sport, h.dport, h.flags) == (4, TCP, 40000, 22, SYN)
    assert (h.src, h.dst) == (int(ipaddress.IPv4Address(A4)), int(ipaddress.IPv4Address(B4)))


def test_ipv4_options_and_trailing_bytes_in_the_buffer() -> None:
    packet = ipv4(A4, B4, UDP, udp(5000, 53), ihl=7)
    reason, h = parse(packet + bytearray(100), len(packet))  # a reused buffer is longer
    assert reason is None and (h.proto, h.dport) == (UDP, 53)


def test_memoryview_of_a_larger_buffer() -> None:
    buf = bytearray(2048)
    packet = udp6(A6, B6, 1, 443)
    buf[: len(packet)] = packet
    reason, h = parse(memoryview(buf), len(packet))  # type: ignore[arg-type]
    assert reason is None and (h.version, h.dport, h.src) == (6, 443, int(ipaddress.IPv6Address(A6)))


def test_icmp_echo_identifier_is_both_ports() -> None:
    for packet, version in ((ping4(A4, B4, 99), 4), (ping6(A6, B6, 99, reply=True), 6)):
        reason, h = parse(packet)
        assert reason is None
        assert (h.version, h.sport, h.dport) == (version, 99, 99)


def test_dont_fragment_is_not_a_fragment() -> None:
    assert parse(ipv4(A4, B4, TCP, tcp(1, 2), fragment=0x4000))[0] is None


def test_ipv6_skippable_extension_headers() -> None:
    chain = ((p.HOP_BY_HOP, bytes(6)), (p.DESTINATION_OPTIONS, bytes(6)), (p.ROUTING, bytes(6)))
    reason, h = parse(ipv6(A6, B6, TCP, tcp(1, 22), extensions=chain))
    assert reason is None and (h.proto, h.dport) == (TCP, 22)


@pytest.mark.parametrize("packet, length, reason", [
    (bytearray(), 0, p.TRUNCATED),
    (ipv4(A4, B4, TCP, tcp(1, 2))[:19], None, p.TRUNCATED),
    (ipv6(A6, B6, TCP, tcp(1, 2))[:39], None, p.TRUNCATED),
    (ipv4(A4, B4, TCP, tcp(1, 2), version=5), None, p.BAD_VERSION),
    (ipv4(A4, B4, TCP, tcp(1, 2), ihl=4), None, p.BAD_HEADER),
    (ipv4(A4, B4, TCP, tcp(1, 2), total=19), None, p.BAD_HEADER),
    (ipv4(A4, B4, TCP, tcp(1, 2), total=1000), None, p.TRUNCATED),
    (ipv4(A4, B4, TCP, tcp(1, 2), fragment=0x2000), None, p.FRAGMENTED),  # MF
    (ipv4(A4, B4, TCP, tcp(1, 2), fragment=0x0010), None, p.FRAGMENTED),  # offset
    (ipv4(A4, B4, TCP, tcp(1, 2)[:19]), None, p.TRUNCATED),
    (ipv4(A4, B4, TCP, tcp(1, 2, offset=4)), None, p.BAD_HEADER),
    (ipv4(A4, B4, TCP, tcp(1, 2, offset=6)[:20]), None, p.TRUNCATED),
    (ipv4(A4, B4, UDP, udp(1, 2)[:7]), None, p.TRUNCATED),
    (ipv4(A4, B4, UDP, udp(1, 2, length=7)), None, p.BAD_HEADER),
    (ipv4(A4, B4, UDP, udp(1, 2, length=100)), None, p.BAD_HEADER),
    (ipv4(A4, B4, ICMP, icmp(8)[:7]), None, p.TRUNCATED),
    (ipv4(A4, B4, ICMP, icmp(5)), None, p.ICMP_TYPE),  # redirect
    (ipv6(A6, B6, ICMPV6, icmp(137)), None, p.ICMP_TYPE),  # redirect
    (ipv4(A4, B4, ICMPV6, icmp(128)), None, p.UNKNOWN_PROTOCOL),  # ICMPv6 in IPv4
    (ipv4(A4, B4, 47, bytes(20)), None, p.UNKNOWN_PROTOCOL),  # GRE
    (ipv6(A6, B6, ICMP, icmp(8)), None, p.EXTENSION_HEADER),  # ICMP in IPv6
    (ipv6(A6, B6, ICMPV6, icmp(135)), None, p.ICMP_TYPE),  # neighbour solicitation
    (ipv6(A6, B6, TCP, tcp(1, 2), payload_length=500), None, p.TRUNCATED),
    (ipv6(A6, B6, TCP, tcp(1, 2), extensions=((p.FRAGMENT, bytes(6)),)), None, p.FRAGMENTED),
    (ipv6(A6, B6, TCP, tcp(1, 2), extensions=((51, bytes(6)),)), None, p.EXTENSION_HEADER),  # AH
    (ipv6(A6, B6, 59, b""), None, p.EXTENSION_HEADER),  # no next header
    (ipv6(A6, B6, TCP, tcp(1, 2), extensions=((p.DESTINATION_OPTIONS, bytes(6)), (p.HOP_BY_HOP, bytes(6)))),
     None, p.EXTENSION_HEADER),  # hop-by-hop not first
    (ipv6(A6, B6, TCP, tcp(1, 2), extensions=((p.ROUTING, bytes((0, 1)) + bytes(4)),)), None,
     p.EXTENSION_HEADER),  # segments left: not for us
    (ipv6(A6, B6, TCP, tcp(1, 2), extensions=((p.DESTINATION_OPTIONS, bytes(6)),) * 5), None,
     p.EXTENSION_HEADER),  # too long a chain
    (ipv6(A6, B6, p.DESTINATION_OPTIONS, b"", payload_length=4) + bytearray(8), None, p.TRUNCATED),
])
def test_drop_reasons(packet: bytearray, length: int | None, reason: str) -> None:
    assert parse(packet, length)[0] == reason


def test_extension_header_running_past_the_payload_is_truncated() -> None:
    packet = ipv6(A6, B6, TCP, tcp(1, 2), extensions=((p.DESTINATION_OPTIONS, bytes(6)),))
    packet[41] = 200  # header length far beyond the payload
    assert parse(packet)[0] == p.TRUNCATED


def test_every_parser_reason_is_listed() -> None:
    assert len(set(p.PARSER_DROPS)) == len(p.PARSER_DROPS) == 8


def test_tcp6_and_ack_flags() -> None:
    reason, h = parse(tcp6(A6, B6, 22, 40000, SYN | ACK))
    assert reason is None and h.flags == SYN | ACK and h.sport == 22


def test_udp4_ports() -> None:
    reason, h = parse(udp4(A4, B4, 5353, 53))
    assert reason is None and (h.sport, h.dport) == (5353, 53)


def test_icmp_error_quoting_udp_reads_the_quoted_flow() -> None:
    reason, h = parse(icmp_error(A4, B4, udp4(B4, A4, 5000, 53), code=3))  # port unreachable
    assert reason is None and (h.proto, h.icmp_type) == (ICMP, 3)
    assert (h.quoted_proto, h.quoted_src, h.quoted_dst) == (UDP, int(ipaddress.IPv4Address(B4)),
                                                           int(ipaddress.IPv4Address(A4)))
    assert (h.quoted_sport, h.quoted_dport) == (5000, 53)


def test_packet_too_big_quoting_tcp6_with_only_8_bytes_of_tcp() -> None:
    quoted = tcp6(B6, A6, 5000, 443, ACK)[:48]  # the IPv6 header and 8 bytes: all an error must quote
    reason, h = parse(icmp_error(A6, B6, quoted, kind=2, rest=1280))
    assert reason is None and (h.proto, h.icmp_type, h.quoted_proto) == (ICMPV6, 2, TCP)
    assert (h.quoted_src, h.quoted_dst) == (int(ipaddress.IPv6Address(B6)), int(ipaddress.IPv6Address(A6)))
    assert (h.quoted_sport, h.quoted_dport) == (5000, 443)


def test_time_exceeded_quoting_an_echo_names_its_identifier_and_kind() -> None:
    reason, h = parse(icmp_error(A4, B4, ping4(B4, A4, 42), kind=11))
    assert reason is None and (h.quoted_proto, h.quoted_sport, h.quoted_dport, h.quoted_request) == (ICMP, 42, 42, True)
    reason, h = parse(icmp_error(A6, B6, ping6(B6, A6, 42, reply=True), kind=3))
    assert reason is None and (h.quoted_proto, h.quoted_sport, h.quoted_request) == (ICMPV6, 42, False)


def test_echo_after_an_error_clears_the_quote() -> None:
    headers = p.Headers()
    error = icmp_error(A4, B4, udp4(B4, A4, 5000, 53))
    assert p.parse(error, len(error), headers) is None and headers.quoted_proto == UDP
    echo = ping4(A4, B4)
    assert p.parse(echo, len(echo), headers) is None and headers.quoted_proto == 0


@pytest.mark.parametrize("error", [
    icmp_error(A4, B4, udp4(B4, A4, 1, 2)[:27]),  # 7 bytes of UDP
    icmp_error(A4, B4, udp4(B4, A4, 1, 2)[:19]),  # not even the IP header
    icmp_error(A4, B4, b""),
    icmp_error(A4, B4, udp6(B6, A6, 1, 2)),  # IPv6 quoted in ICMP
    icmp_error(A6, B6, udp4(B4, A4, 1, 2)),  # IPv4 quoted in ICMPv6
    icmp_error(A4, B4, ipv4(B4, A4, UDP, udp(1, 2), ihl=4)),
    icmp_error(A4, B4, ipv4(B4, A4, UDP, udp(1, 2), total=19)),
    icmp_error(A4, B4, ipv4(B4, A4, UDP, udp(1, 2), fragment=0x2000)),  # a quoted first fragment
    icmp_error(A4, B4, ipv4(B4, A4, UDP, udp(1, 2), fragment=0x0010)),  # a later one: no ports
    icmp_error(A4, B4, ipv4(B4, A4, UDP, udp(1, 2), ihl=6)[:31]),  # options eat the 8 bytes
    icmp_error(A4, B4, ipv4(B4, A4, 47, bytes(8))),  # GRE
    icmp_error(A4, B4, icmp_error(B4, A4, udp4(A4, B4, 1, 2))),  # an error about an error
    icmp_error(A6, B6, udp6(B6, A6, 1, 2)[:47]),
    icmp_error(A6, B6, ipv6(B6, A6, UDP, udp(1, 2), extensions=((p.DESTINATION_OPTIONS, bytes(6)),))),
    icmp_error(A6, B6, ipv6(B6, A6, ICMPV6, icmp(135))),  # neighbour solicitation
    icmp_error(A6, B6, bytearray(b"\x40") + udp6(B6, A6, 1, 2)[1:]),  # version 4 in an IPv6 quote
])
def test_malformed_or_truncated_quote_is_dropped(error: bytearray) -> None:
    assert parse(error)[0] == p.BAD_QUOTE
