"""Building and reading the few IP packets the daemon makes itself (the
in-tunnel ping). Pure functions, no I/O."""

from __future__ import annotations

import ipaddress
import struct

ICMP = 1
ICMP_ECHO_REPLY = 0
ICMP_ECHO_REQUEST = 8
#: The payload of the daemon's own in-tunnel echo (`tunnelmesh ping`): the receiving
#: daemon answers such a request itself, before its packet filter.
DAEMON_PING_PAYLOAD = b"tunnelmesh ping"
#: The whole request as `icmp_echo` makes it: IPv4 header (no options), ICMP header, payload.
DAEMON_PING_LENGTH = 20 + 8 + len(DAEMON_PING_PAYLOAD)
#: The daemons' capability exchange in the tunnel (actors/datapath.py): an echo request with
#: CAPS_REQUEST to the peer's mesh IP is answered by the peer's daemon, never by its kernel,
#: with CAPS_REPLY and the capabilities it has, space-separated. A peer that is no TunnelMesh
#: daemon (wireguard-go, an older daemon) lets its kernel echo the request: that says nothing.
CAPS_REQUEST = b"tunnelmesh caps?"
CAPS_REQUEST_LENGTH = 20 + 8 + len(CAPS_REQUEST)
CAPS_REPLY = b"tunnelmesh caps:"
#: It completes the TCP/UDP checksums of what it writes to its TUN (the kernel's `NEEDS_CSUM`):
#: segments sent to it may leave theirs partial.
CAPS_COMPLETES_CHECKSUMS = b"csum"


def checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071)."""
    if len(data) % 2:
        data += b"\x00"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def icmp_echo(src: ipaddress.IPv4Address, dst: ipaddress.IPv4Address, ident: int, seq: int, payload: bytes, *, reply: bool = False) -> bytes:
    kind = ICMP_ECHO_REPLY if reply else ICMP_ECHO_REQUEST
    icmp = struct.pack("!BBHHH", kind, 0, 0, ident, seq) + payload
    icmp = icmp[:2] + struct.pack("!H", checksum(icmp)) + icmp[4:]
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(icmp), ident, 0, 64, ICMP, 0, src.packed, dst.packed)
    header = header[:10] + struct.pack("!H", checksum(header)) + header[12:]
    return header + icmp


def echo_reply_key(packet: bytes | bytearray | memoryview, length: int) -> tuple[int, int] | None:
    """(identifier, sequence) if the packet is an IPv4 ICMP echo reply."""
    if length < 28 or packet[0] >> 4 != 4 or packet[9] != ICMP:
        return None
    ihl = (packet[0] & 0x0F) * 4
    if length < ihl + 8 or packet[ihl] != ICMP_ECHO_REPLY:
        return None
    ident, seq = struct.unpack_from("!HH", packet, ihl + 4)
    return ident, seq


def daemon_echo_request(packet: bytearray | memoryview, length: int, to: bytes,
                        payload: bytes = DAEMON_PING_PAYLOAD) -> bool:
    """Whether the packet is a daemon's own echo request (as `icmp_echo` builds it with
    `payload`: DAEMON_PING_PAYLOAD, CAPS_REQUEST) to the IPv4 address `to` (4 bytes).
    Cheap first: the length."""
    return (length == 28 + len(payload) and packet[0] == 0x45 and packet[9] == ICMP
            and packet[20] == ICMP_ECHO_REQUEST and packet[16:20] == to and packet[28:length] == payload)


def echo_reply_in_place(packet: bytearray | memoryview, length: int) -> None:
    """Turn an IPv4 echo request (no IP options) into its reply: addresses swapped, type 0,
    ICMP checksum recomputed (the IP header's sum does not change with the swap)."""
    source = bytes(packet[12:16])  # a copy: `packet` may be a memoryview
    packet[12:16] = packet[16:20]
    packet[16:20] = source
    packet[20] = ICMP_ECHO_REPLY
    packet[22:24] = b"\x00\x00"
    packet[22:24] = struct.pack("!H", checksum(bytes(packet[20:length])))
