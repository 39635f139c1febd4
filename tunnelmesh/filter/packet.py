"""Reading the headers the packet filter decides on, in place (sans-IO, no clock).

`parse(buf, length, into)` fills a reused `Headers` and returns None, or a drop reason
(a short constant string) for anything it will not vouch for. Fail closed: a packet
is passed on only when every header up to the ports (or the ICMP echo identifier) was
read and checked, so a bug or a surprise here drops, it never opens.

What is read:
- IPv4: version, IHL (>= 5), total length (within the buffer), fragment bits (MF or an
  offset: dropped, as the ports of a later fragment cannot be known), protocol, the
  two addresses as 32-bit ints.
- IPv6: payload length (within the buffer), then the extension headers that can be
  skipped safely: Hop-by-Hop (first only), Destination Options, and a Routing header
  with no segments left (the packet has reached its destination). At most
  MAX_EXTENSION_HEADERS of them. A Fragment header, anything else (AH, ESP, Mobility,
  "no next header", unknown values) -> dropped. Addresses as 128-bit ints.
- TCP: ports, data offset (>= 5, within the packet), flags. UDP: ports, length field.
- ICMP / ICMPv6: type; for echo request/reply the identifier (it plays the ports' part
  in connection tracking). For an error (ICMP destination unreachable, time exceeded,
  parameter problem; ICMPv6 also packet too big) the packet it quotes, which the
  error's receiver sent: an IP header of the same version (IPv4: not a fragment; IPv6:
  no extension headers) and its first 8 bytes of TCP or UDP (ports) or ICMP echo
  (type, identifier), into the `quoted_*` fields; anything less is `bad_icmp_quote`.
  The engine passes an error only for a tracked flow (RELATED, see engine.py). Other
  ICMP types are dropped (see docs/filter.md).

No allocation on the common path: precompiled `struct.Struct.unpack_from` reads the
buffer where it is (no slice, no bytes object); the results go into the slots of one
`Headers` the caller owns. Only IPv6 addresses build a (big) int.
"""

from __future__ import annotations

import struct

# -- protocol numbers (IANA) and ICMP types (RFC 792, RFC 4443)
TCP = 6
UDP = 17
ICMP = 1
ICMPV6 = 58
ICMP_ECHO_REQUEST = 8
ICMP_ECHO_REPLY = 0
ICMPV6_ECHO_REQUEST = 128
ICMPV6_ECHO_REPLY = 129

# -- TCP flags
FIN = 0x01
SYN = 0x02
RST = 0x04
ACK = 0x10

# -- IPv6 extension headers (RFC 8200 section 4)
HOP_BY_HOP = 0
ROUTING = 43
FRAGMENT = 44
DESTINATION_OPTIONS = 60
#: A longer chain than RFC 8200's recommended order allows (HbH, DstOpt, Routing,
#: DstOpt) is not something a mesh member needs to send.
MAX_EXTENSION_HEADERS = 4

# -- drop reasons of the parser (the engine adds its own: see engine.py)
TRUNCATED = "truncated"
BAD_VERSION = "bad_ip_version"
BAD_HEADER = "bad_header"
FRAGMENTED = "fragment"
EXTENSION_HEADER = "ipv6_extension_header"
UNKNOWN_PROTOCOL = "unknown_protocol"
ICMP_TYPE = "icmp_type"
BAD_QUOTE = "bad_icmp_quote"

PARSER_DROPS = (TRUNCATED, BAD_VERSION, BAD_HEADER, FRAGMENTED, EXTENSION_HEADER, UNKNOWN_PROTOCOL, ICMP_TYPE,
                BAD_QUOTE)

# -- ICMP errors that quote the packet they answer (RFC 792, RFC 4443 section 3). Not
# redirects: they steer routing, and a tunnel's routes are the daemon's, not a peer's.
ICMP_ERRORS = frozenset((3, 11, 12))  # destination unreachable, time exceeded, parameter problem
ICMPV6_ERRORS = frozenset((1, 2, 3, 4))  # ... and packet too big (2)
#: The error's own header before the quoted packet: type, code, checksum, 4 bytes
#: (unused, next-hop MTU, or pointer).
ICMP_ERROR_HEADER = 8

# ver/IHL, total length, flags/fragment offset, protocol, source, destination
_IPV4 = struct.Struct("!B x H 2x H x B 2x I I")
# payload length, next header, source and destination as two 64-bit halves each
_IPV6 = struct.Struct("!4x H B x QQ QQ")
# source port, destination port, data offset, flags
_TCP = struct.Struct("!H H 8x B B")
# source port, destination port, length
_UDP = struct.Struct("!H H H")
# type, identifier (echo only)
_ICMP = struct.Struct("!B 3x H")
# the ports of a quoted TCP or UDP header (its first 8 bytes are all an error must quote)
_PORTS = struct.Struct("!H H")
# next header, header length (in 8-octet units, not counting the first 8)
_EXTENSION = struct.Struct("!B B")
_ROUTING_SEGMENTS_LEFT = 3


class Headers:
    """What `parse` read: one instance, reused for every packet (no allocation)."""

    __slots__ = ("version", "proto", "src", "dst", "sport", "dport", "flags", "icmp_type",
                 "quoted_proto", "quoted_src", "quoted_dst", "quoted_sport", "quoted_dport", "quoted_request")

    def __init__(self) -> None:
        self.version = 0
        self.proto = 0  # TCP, UDP, ICMP or ICMPV6
        self.src = 0
        self.dst = 0
        # TCP/UDP ports. ICMP echo: the identifier in both, so that a request and its
        # reply name the same flow whichever way round the tracker reads them.
        self.sport = 0
        self.dport = 0
        self.flags = 0  # TCP flags
        self.icmp_type = 0
        # An ICMP(v6) error: the packet it quotes (same version as the error; ICMP
        # echo: the identifier in both ports). quoted_proto is 0 for an echo, and
        # only meaningful when proto is ICMP or ICMPV6.
        self.quoted_proto = 0
        self.quoted_src = 0
        self.quoted_dst = 0
        self.quoted_sport = 0
        self.quoted_dport = 0
        self.quoted_request = False  # the quoted packet is an echo request


def parse(buf: bytes | bytearray | memoryview, length: int, into: Headers) -> str | None:
    """Read one IP packet of `length` bytes at the start of `buf` into `into`.

    Returns None when the packet is TCP, UDP, ICMP echo or ICMPv6 echo with every
    header present and sane, or an ICMP(v6) error whose quoted packet is (then
    `into.quoted_proto` is non-zero); otherwise the drop reason. Never raises for
    any content (the caller guarantees ``0 <= length <= len(buf)``)."""
    if length < 1:
        return TRUNCATED
    version = buf[0] >> 4
    if version == 4:
        if length < 20:
            return TRUNCATED
        ver_ihl, total, fragment, proto, src, dst = _IPV4.unpack_from(buf, 0)
        start = (ver_ihl & 0x0F) << 2
        if start < 20 or total < start:
            return BAD_HEADER
        if total > length:
            return TRUNCATED
        if fragment & 0x3FFF:  # MF set or a non-zero offset (DF, 0x4000, is fine)
            return FRAGMENTED
        end = total
    elif version == 6:
        if length < 40:
            return TRUNCATED
        payload, proto, src_hi, src_lo, dst_hi, dst_lo = _IPV6.unpack_from(buf, 0)
        end = 40 + payload
        if end > length:
            return TRUNCATED
        src = (src_hi << 64) | src_lo
        dst = (dst_hi << 64) | dst_lo
        start = 40
        if proto != TCP and proto != UDP and proto != ICMPV6:
            proto, start = _skip_extensions(buf, proto, end)
            if proto < 0:
                return TRUNCATED if proto == -1 else (FRAGMENTED if proto == -2 else EXTENSION_HEADER)
    else:
        return BAD_VERSION
    into.version = version
    into.proto = proto
    into.src = src
    into.dst = dst
    if proto == TCP:
        if end - start < 20:
            return TRUNCATED
        sport, dport, offset, flags = _TCP.unpack_from(buf, start)
        header = (offset >> 4) << 2
        if header < 20:
            return BAD_HEADER
        if header > end - start:
            return TRUNCATED
        into.sport = sport
        into.dport = dport
        into.flags = flags
        return None
    if proto == UDP:
        if end - start < 8:
            return TRUNCATED
        sport, dport, udp_length = _UDP.unpack_from(buf, start)
        if udp_length < 8 or udp_length > end - start:
            return BAD_HEADER
        into.sport = sport
        into.dport = dport
        return None
    if (proto == ICMP and version == 4) or (proto == ICMPV6 and version == 6):
        if end - start < 8:
            return TRUNCATED
        kind, ident = _ICMP.unpack_from(buf, start)
        into.icmp_type = kind
        if version == 4:
            echo = kind == ICMP_ECHO_REQUEST or kind == ICMP_ECHO_REPLY
        else:
            echo = kind == ICMPV6_ECHO_REQUEST or kind == ICMPV6_ECHO_REPLY
        if echo:
            into.quoted_proto = 0
            into.sport = ident
            into.dport = ident
            return None
        if kind in (ICMP_ERRORS if version == 4 else ICMPV6_ERRORS):
            return _parse_quote(buf, start + ICMP_ERROR_HEADER, end, version, into)
        return ICMP_TYPE
    return UNKNOWN_PROTOCOL  # ICMPv6 in IPv4 and ICMP in IPv6 included


def _parse_quote(buf: bytes | bytearray | memoryview, start: int, end: int, version: int, into: Headers) -> str | None:
    """Read the packet an ICMP(v6) error quotes, from `start` to `end`, into the
    `quoted_*` fields: None, or BAD_QUOTE for anything short of a header of the error's
    own IP version and the 8 bytes after it that name a flow. The quoted packet's
    length fields are not checked against what is there: an error quotes only a part."""
    room = end - start
    if version == 4:
        if room < 20:
            return BAD_QUOTE
        ver_ihl, total, fragment, proto, src, dst = _IPV4.unpack_from(buf, start)
        header = (ver_ihl & 0x0F) << 2
        if ver_ihl >> 4 != 4 or header < 20 or total < header or fragment & 0x3FFF:
            return BAD_QUOTE  # a quoted fragment: its ports, if any, were never checked
        echo_request, echo_reply = ICMP_ECHO_REQUEST, ICMP_ECHO_REPLY
        echo_proto = ICMP
    else:
        if room < 40:
            return BAD_QUOTE
        _, proto, src_hi, src_lo, dst_hi, dst_lo = _IPV6.unpack_from(buf, start)
        if buf[start] >> 4 != 6:
            return BAD_QUOTE
        src = (src_hi << 64) | src_lo
        dst = (dst_hi << 64) | dst_lo
        header = 40  # an extension header in the quote: not a packet the filter passed
        echo_request, echo_reply = ICMPV6_ECHO_REQUEST, ICMPV6_ECHO_REPLY
        echo_proto = ICMPV6
    if room < header + 8:
        return BAD_QUOTE
    upper = start + header
    if proto == TCP or proto == UDP:
        sport, dport = _PORTS.unpack_from(buf, upper)
        into.quoted_request = False
    elif proto == echo_proto:
        kind, sport = _ICMP.unpack_from(buf, upper)
        if kind != echo_request and kind != echo_reply:
            return BAD_QUOTE  # an error about an error (RFC 1122 3.2.2) or about ND
        into.quoted_request = kind == echo_request
        dport = sport
    else:
        return BAD_QUOTE
    into.quoted_proto = proto
    into.quoted_src = src
    into.quoted_dst = dst
    into.quoted_sport = sport
    into.quoted_dport = dport
    return None


def _skip_extensions(buf: bytes | bytearray | memoryview, header: int, end: int) -> tuple[int, int]:
    """Walk the IPv6 extension headers from offset 40: (upper-layer protocol, its
    offset), or (-1 truncated | -2 fragment | -3 not understood, 0). Off the common
    path (most IPv6 packets carry none)."""
    offset = 40
    for count in range(MAX_EXTENSION_HEADERS + 1):
        if header == TCP or header == UDP or header == ICMPV6:
            return header, offset
        if header == FRAGMENT:
            return -2, 0
        if count == MAX_EXTENSION_HEADERS:
            break
        if header == HOP_BY_HOP and count != 0:
            return -3, 0  # RFC 8200: only immediately after the IPv6 header
        if header != HOP_BY_HOP and header != DESTINATION_OPTIONS and header != ROUTING:
            return -3, 0
        if end - offset < 8:
            return -1, 0
        following, units = _EXTENSION.unpack_from(buf, offset)
        if header == ROUTING and buf[offset + _ROUTING_SEGMENTS_LEFT] != 0:
            return -3, 0  # this node is not the final destination: not ours to pass
        offset += (units + 1) << 3
        if offset > end:
            return -1, 0
        header = following
    return -3, 0
