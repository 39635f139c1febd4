"""IP packets built by hand for the packet filter's tests (checksums left zero: the
filter never reads them), and a small mesh of members to compile rules for."""

from __future__ import annotations

import ipaddress
import struct

from tunnelmesh.filter import Member
from tunnelmesh.filter.packet import FIN, ICMP, ICMPV6, RST, SYN, TCP, UDP

__all__ = ["FIN", "RST", "SYN", "ACK", "ICMP", "ICMPV6", "TCP", "UDP"]
ACK = 0x10


def ipv4(src: str, dst: str, proto: int, payload: bytes, *, fragment: int = 0, ihl: int = 5,
         total: int | None = None, version: int = 4) -> bytearray:
    options = bytes((ihl - 5) * 4) if ihl > 5 else b""
    length = 20 + len(options) + len(payload) if total is None else total
    header = struct.pack("!BBHHHBBH4s4s", (version << 4) | ihl, 0, length, 1, fragment, 64, proto, 0,
                         ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed)
    return bytearray(header + options + payload)


def ipv6(src: str, dst: str, next_header: int, payload: bytes, *, extensions: tuple[tuple[int, bytes], ...] = (),
         payload_length: int | None = None) -> bytearray:
    """`extensions`: (this header's type, its body after the first two bytes); each is
    padded to a multiple of 8 and chained in order before the upper-layer payload."""
    chain = b""
    types = [t for t, _ in extensions] + [next_header]
    for i, (_, body) in enumerate(extensions):
        raw = bytes((types[i + 1], 0)) + body
        raw += bytes(-len(raw) % 8)
        raw = raw[:1] + bytes((len(raw) // 8 - 1,)) + raw[2:]
        chain += raw
    first = types[0]
    body = chain + payload
    length = len(body) if payload_length is None else payload_length
    header = struct.pack("!IHBB16s16s", 6 << 28, length, first, 64,
                         ipaddress.IPv6Address(src).packed, ipaddress.IPv6Address(dst).packed)
    return bytearray(header + body)


def tcp(sport: int, dport: int, flags: int = ACK, *, offset: int = 5) -> bytes:
    return struct.pack("!HHIIBBHHH", sport, dport, 1, 0, offset << 4, flags, 65535, 0, 0) + bytes(max(0, offset - 5) * 4)


def udp(sport: int, dport: int, data: bytes = b"x", *, length: int | None = None) -> bytes:
    return struct.pack("!HHHH", sport, dport, 8 + len(data) if length is None else length, 0) + data


def icmp(kind: int, ident: int = 7, seq: int = 1) -> bytes:
    return struct.pack("!BBHHH", kind, 0, 0, ident, seq) + b"ping"


def tcp4(src: str, dst: str, sport: int, dport: int, flags: int = ACK) -> bytearray:
    return ipv4(src, dst, TCP, tcp(sport, dport, flags))


def udp4(src: str, dst: str, sport: int, dport: int) -> bytearray:
    return ipv4(src, dst, UDP, udp(sport, dport))


def ping4(src: str, dst: str, ident: int = 7, *, reply: bool = False) -> bytearray:
    return ipv4(src, dst, ICMP, icmp(0 if reply else 8, ident))


def tcp6(src: str, dst: str, sport: int, dport: int, flags: int = ACK) -> bytearray:
    return ipv6(src, dst, TCP, tcp(sport, dport, flags))


def udp6(src: str, dst: str, sport: int, dport: int) -> bytearray:
    return ipv6(src, dst, UDP, udp(sport, dport))


def ping6(src: str, dst: str, ident: int = 7, *, reply: bool = False) -> bytearray:
    return ipv6(src, dst, ICMPV6, icmp(129 if reply else 128, ident))


def icmp_error(src: str, dst: str, quoted: bytes, kind: int | None = None, code: int = 0, rest: int = 0) -> bytearray:
    """An ICMP (IPv4 addresses) or ICMPv6 error from `src` to `dst` quoting `quoted`
    (the packet it answers, or its first bytes). Default: destination unreachable;
    `rest`: the header's last 4 bytes (the next-hop MTU, ...)."""
    v6 = ipaddress.ip_address(src).version == 6
    kind = (1 if v6 else 3) if kind is None else kind
    body = struct.pack("!BBHI", kind, code, 0, rest) + bytes(quoted)
    return ipv6(src, dst, ICMPV6, body) if v6 else ipv4(src, dst, ICMP, body)


def member(name: str, index: int, routes: tuple[str, ...] = ()) -> Member:
    """A member with mesh addresses 100.64.0.<index> and fd00::<index> and a key
    derived from its index."""
    return Member(name, bytes([index]) * 32, ipaddress.IPv4Address(f"100.64.0.{index}"),
                  ipaddress.IPv6Address(f"fd00::{index:x}"), tuple(ipaddress.ip_network(r) for r in routes))


#: This node and its peers in the tests.
HOME = member("home", 1, ("10.1.0.0/16",))
ALICE = member("alice", 2)
BOB = member("bob", 3, ("10.2.0.0/16",))
CAROL = member("carol", 4)
PEERS = (ALICE, BOB, CAROL)
