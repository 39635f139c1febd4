"""PCP (RFC 6887) MAP: the request a client sends to its gateway's UDP port 5351 and the
answer it parses. Sans-IO; the exchange is in client.py.

Hand-written because no maintained Python library speaks PCP. Parsing is strict: a
datagram that is not a well-formed MAP answer to our request (same nonce, protocol and
internal port) raises `PcpError`, never another exception. A gateway that speaks only
NAT-PMP answers with a NAT-PMP "unsupported version" (RFC 6887 section 9): that raises
`PcpUnsupportedVersion`, which tells the client to fall back.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

VERSION = 2
OP_MAP = 1
RESPONSE_BIT = 0x80
PROTOCOL_UDP = 17
HEADER_SIZE = 24
MAP_SIZE = 36
MAX_SIZE = 1100  # RFC 6887 section 7
NONCE_SIZE = 12

#: RFC 6887 section 7.4.
RESULTS = {
    0: "success",
    1: "unsupported version",
    2: "not authorized (the gateway refuses mappings for this client)",
    3: "malformed request",
    4: "unsupported opcode",
    5: "unsupported option",
    6: "malformed option",
    7: "network failure (the gateway has no external address yet)",
    8: "no resources (no ports left to map)",
    9: "unsupported protocol",
    10: "user exceeded quota",
    11: "cannot provide the suggested external address or port",
    12: "address mismatch (a NAT between us and the gateway?)",
    13: "excessive remote peers",
}
SUCCESS = 0
UNSUPPORTED_VERSION = 1


class PcpError(ValueError):
    """A datagram that is not a well-formed PCP answer to our request."""


class PcpRefused(Exception):
    """A well-formed answer with a non-zero result code; `lifetime` is how long the
    gateway says the error holds (seconds)."""

    def __init__(self, result: int, lifetime: int) -> None:
        self.result = result
        self.lifetime = lifetime
        super().__init__(f"PCP result {result}: {describe(result)}")


class PcpUnsupportedVersion(Exception):
    """The gateway answered in another version (NAT-PMP's 0): it does not speak PCP. Not a
    PcpError: an exchange drops malformed datagrams but stops at this answer."""


def describe(result: int) -> str:
    return RESULTS.get(result, "unknown result code")


@dataclass(frozen=True, slots=True)
class MapAnswer:
    lifetime: int  # seconds; 0 answers a deletion
    epoch: int
    internal_port: int
    external_port: int
    external_address: str


def map_request(nonce: bytes, client_address: str, internal_port: int, lifetime: int,
                external_port: int = 0) -> bytes:
    """A MAP request for UDP `internal_port` of `client_address` (our address towards the
    gateway, which it checks against the packet's source); lifetime 0 deletes the mapping
    made with the same nonce."""
    if len(nonce) != NONCE_SIZE:
        raise ValueError(f"a PCP nonce is {NONCE_SIZE} bytes")
    if not 1 <= internal_port <= 0xFFFF or not 0 <= external_port <= 0xFFFF:
        raise ValueError("port out of range")
    if not 0 <= lifetime <= 0xFFFFFFFF:
        raise ValueError(f"lifetime {lifetime} out of range")
    header = struct.pack("!BBHI16s", VERSION, OP_MAP, 0, lifetime, _as_ipv6(client_address))
    body = struct.pack("!12sB3xHH16s", nonce, PROTOCOL_UDP, internal_port, external_port,
                       _as_ipv6("0.0.0.0"))
    return header + body


def parse_map(data: bytes, nonce: bytes, internal_port: int) -> MapAnswer:
    """The answer to `map_request(nonce, _, internal_port, ...)`. PcpRefused on a
    non-zero result; PcpUnsupportedVersion when the gateway speaks NAT-PMP only."""
    if len(data) < 4:
        raise PcpError(f"answer of {len(data)} bytes, shorter than any PCP header")
    if data[0] != VERSION:
        raise PcpUnsupportedVersion(f"answer of version {data[0]}, not PCP's {VERSION}")
    if len(data) < HEADER_SIZE or len(data) > MAX_SIZE or len(data) % 4:
        raise PcpError(f"answer of {len(data)} bytes: not a PCP answer (24 to 1100, a multiple of 4)")
    _, answered_op, _, result, lifetime, epoch = struct.unpack_from("!BBBBII", data)
    if answered_op != OP_MAP | RESPONSE_BIT:
        raise PcpError(f"answer to opcode {answered_op & 0x7F} (response bit {answered_op >> 7}), expected MAP")
    if result != SUCCESS:
        raise PcpRefused(result, lifetime)
    if len(data) < HEADER_SIZE + MAP_SIZE:
        raise PcpError(f"MAP answer of {len(data)} bytes, shorter than {HEADER_SIZE + MAP_SIZE}")
    answered_nonce, protocol, answered_port, external_port, external = struct.unpack_from(
        "!12sB3xHH16s", data, HEADER_SIZE)
    if answered_nonce != nonce:
        raise PcpError("answer for another nonce (another request, or spoofed)")
    if protocol != PROTOCOL_UDP or answered_port != internal_port:
        raise PcpError(f"answer for protocol {protocol} port {answered_port}, asked UDP {internal_port}")
    _check_options(data[HEADER_SIZE + MAP_SIZE:])
    address = ipaddress.IPv6Address(external)
    mapped = address.ipv4_mapped
    if lifetime and not external_port:
        raise PcpError("answer maps external port 0")
    return MapAnswer(lifetime, epoch, answered_port, external_port, str(mapped or address))


def _check_options(data: bytes) -> None:
    """Options are code, reserved, length, data padded to 4 bytes; none is needed here,
    but they must fit exactly."""
    offset = 0
    while offset < len(data):
        if len(data) - offset < 4:
            raise PcpError("truncated option header")
        (length,) = struct.unpack_from("!H", data, offset + 2)
        offset += 4 + (length + 3) // 4 * 4
        if offset > len(data):
            raise PcpError("option longer than the answer")


def _as_ipv6(address: str) -> bytes:
    """PCP carries IPv4 addresses as IPv4-mapped IPv6 (::ffff:a.b.c.d)."""
    parsed = ipaddress.ip_address(address)
    if parsed.version == 4:
        return b"\x00" * 10 + b"\xff\xff" + parsed.packed
    return parsed.packed
