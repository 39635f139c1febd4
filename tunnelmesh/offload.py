"""Offloads of the TUN device, sans-IO: the virtio-net header, segmentation and coalescing.

With `IFF_VNET_HDR` and `TUNSETOFFLOAD` the kernel hands the TUN reader TCP (TSO) and UDP
(USO) super-packets of up to 64 KiB, each behind a 10-byte virtio-net header, and takes
them back the same way. One read then carries what would otherwise take dozens, which is
where a Python data path spends its time (one syscall and one interpreter round per
packet). This module does the two halves the kernel leaves to the device:

- `segments`: split a super-packet into MTU-sized packets with valid headers and
  checksums, in place, right before each is encrypted (wireguard-go's `gsoSplit`);
- `Coalescer`: join consecutive received TCP segments of one flow back into one
  super-packet before the TUN write, its checksum left to the kernel (`NEEDS_CSUM`,
  wireguard-go's `tcpGRO`);
- `partial_checksum_at`: whether a single TCP or UDP packet came with its checksum left
  partial (by a sender that knows the receiver completes it), so that it too is written
  for the kernel to complete.

Checksums are the Internet checksum (RFC 1071) computed on whole integers: the sum of the
16-bit words of `data` is congruent to `int.from_bytes(data, "big")` modulo 0xFFFF, one
C call instead of a loop over words.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

#: struct virtio_net_hdr, in the host's byte order (the legacy header of a TUN device).
VNET_HDR = struct.Struct("=BBHHHH")  # flags, gso_type, hdr_len, gso_size, csum_start, csum_offset
VNET_HDR_SIZE = VNET_HDR.size
NEEDS_CSUM = 1  # VIRTIO_NET_HDR_F_NEEDS_CSUM: the checksum at csum_start+csum_offset is partial
GSO_NONE = 0
GSO_TCPV4 = 1
GSO_TCPV6 = 4
GSO_UDP_L4 = 5
GSO_ECN = 0x80
MAX_PACKET = 65535  # an IPv4 total length; what a TSO super-packet holds at most
MAX_SEGMENTS = 64  # what one coalesced packet may hold (the kernel's UDP_MAX_SEGMENTS too)

TCP = 6
UDP = 17
DONT_FRAGMENT = 0x40  # in IPv4 header byte 6
TCP_FIN = 0x01
TCP_PSH = 0x08
TCP_ACK = 0x10
TCP_CWR = 0x80

_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")


def fold(total: int) -> int:
    """`total` (a sum of 16-bit words, however large) as a one's-complement 16-bit sum:
    0xFFFF for a non-zero multiple of 0xFFFF (the sum of non-zero data is never 0)."""
    folded = total % 0xFFFF
    return folded if folded or not total else 0xFFFF


def word_sum(data: bytes | bytearray | memoryview) -> int:
    """The sum of `data`'s 16-bit big-endian words, unfolded (an odd last byte is padded)."""
    value = int.from_bytes(data, "big")
    return value << 8 if len(data) & 1 else value


def finish_checksum(total: int) -> int:
    """The checksum field for a one's-complement sum `total` taken with the field zero.
    A result of 0 is sent as 0xFFFF, as the kernel does (`CSUM_MANGLED_0`): for UDP 0
    would mean "no checksum", for TCP the two are the same number."""
    checksum = 0xFFFF - fold(total)
    return checksum or 0xFFFF


def pseudo_header_sum(packet: bytes | bytearray | memoryview, version: int, proto: int, l4_length: int) -> int:
    """The word sum of the TCP/UDP pseudo-header: addresses, protocol, L4 length."""
    addresses = packet[12:20] if version == 4 else packet[8:40]
    return int.from_bytes(addresses, "big") + proto + l4_length


def complete_checksum(packet: memoryview, length: int, csum_start: int, csum_offset: int) -> bool:
    """Finish a `NEEDS_CSUM` packet's checksum as the device would: the field holds the
    partial (pseudo-header) sum; sum from `csum_start` to the end and store the result.
    False when the offsets do not fit the packet."""
    field = csum_start + csum_offset
    if field + 2 > length or csum_start < 20:
        return False
    _U16.pack_into(packet, field, finish_checksum(word_sum(packet[csum_start:length])))
    return True


def partial_checksum_at(packet: bytes | bytearray | memoryview, length: int) -> tuple[int, int] | None:
    """(csum_start, csum_offset) when the packet is an unfragmented TCP or UDP packet (IPv4,
    or IPv6 without extension headers) whose checksum field holds just the pseudo-header
    sum, as a sender leaves it for a receiver that completes it; else None. Written with
    `NEEDS_CSUM` and these offsets, the kernel completes it (or never checks it, on local
    delivery); a whole checksum that happens to equal that sum completes to itself. Any
    other packet keeps its checksum for the kernel to check."""
    if length < 28:
        return None
    first = packet[0]
    if first >> 4 == 4:
        l4 = (first & 0x0F) * 4
        if l4 < 20 or packet[6] & ~DONT_FRAGMENT or packet[7]:  # a fragment, or the reserved flag
            return None
        proto, version = packet[9], 4
    elif first >> 4 == 6:
        l4, proto, version = 40, packet[6], 6
    else:
        return None
    if proto == TCP:
        offset = 16
        if l4 + 20 > length:
            return None
    elif proto == UDP:
        offset = 6
        if l4 + 8 > length:
            return None
    else:
        return None
    field = (packet[l4 + offset] << 8) | packet[l4 + offset + 1]
    if field % 0xFFFF != fold(pseudo_header_sum(packet, version, proto, length - l4)) % 0xFFFF:
        return None  # 0x0000 and 0xFFFF are the same sum
    return l4, offset


def ipv4_header_checksum(header: bytes | bytearray | memoryview) -> int:
    """The IPv4 header checksum of `header` (its checksum field must be zero)."""
    return 0xFFFF - fold(int.from_bytes(header, "big"))


def super_packet_layout(packet: memoryview, length: int, gso_type: int, gso_size: int,
                        csum_start: int) -> tuple[int, int, int] | None:
    """(IP version, L4 offset, L4 header length) of a super-packet the kernel handed over,
    or None when its headers do not describe a packet `segments` can split."""
    kind = gso_type & ~GSO_ECN
    if length < 28 or gso_size < 1:
        return None
    version = packet[0] >> 4
    if kind == GSO_TCPV4 or (kind == GSO_UDP_L4 and version == 4):
        if version != 4:
            return None
        l4 = (packet[0] & 0x0F) * 4
        if l4 < 20 or (packet[9] != (TCP if kind == GSO_TCPV4 else UDP)):
            return None
    elif kind == GSO_TCPV6 or (kind == GSO_UDP_L4 and version == 6):
        if version != 6:
            return None
        l4 = csum_start  # after any extension headers; the kernel says where
        if l4 < 40:
            return None
    else:
        return None
    if kind == GSO_UDP_L4:
        l4_header = 8
    else:
        if l4 + 20 > length:
            return None
        l4_header = (packet[l4 + 12] >> 4) * 4
        if l4_header < 20:
            return None
    if l4 + l4_header >= length or l4 + l4_header + gso_size > MAX_PACKET:
        return None  # no payload, or segments larger than any packet
    return version, l4, l4_header


def segments(packet: memoryview, length: int, layout: tuple[int, int, int], gso_size: int, *,
             checksums: bool = True) -> Iterator[int]:
    """Split the super-packet at the start of `packet` (`length` bytes) into packets of
    at most `gso_size` payload bytes, in place: each is made whole in turn and its start
    yielded; it ends `header + gso_size` later, or at `length` for the last. Without
    `checksums` each TCP/UDP checksum is left partial (the pseudo-header sum, as in a
    `NEEDS_CSUM` packet), for a receiver that completes it: a quarter of the sender's work.

    Segment i's payload already lies at `header + i * gso_size`, so its headers are
    written just before it, over the end of segment i-1's payload, which the caller has
    sealed by then. So: consume each segment before asking for the next. Padding a
    segment in place would overwrite the next one's payload: the caller copies a
    segment out when it must pad it and it is not the last."""
    version, l4, l4_header = layout
    header = l4 + l4_header
    template = bytes(packet[:header])
    payload = length - header
    count = (payload + gso_size - 1) // gso_size
    proto = TCP if l4_header != 8 else UDP
    addresses = pseudo_header_sum(template, version, proto, 0)
    ip_id = (template[4] << 8) | template[5] if version == 4 else 0
    seq = _U32.unpack_from(template, l4 + 4)[0] if proto == TCP else 0
    flags = template[l4 + 13] if proto == TCP else 0
    for index in range(count):
        start = index * gso_size
        size = gso_size if index < count - 1 else payload - index * gso_size
        total = header + size
        if index:
            packet[start:start + header] = template
        if version == 4:
            _U16.pack_into(packet, start + 2, total)
            _U16.pack_into(packet, start + 4, (ip_id + index) & 0xFFFF)
            packet[start + 10] = packet[start + 11] = 0
            _U16.pack_into(packet, start + 10, ipv4_header_checksum(packet[start:start + l4]))
        else:
            _U16.pack_into(packet, start + 4, total - 40)
        at = start + l4
        if proto == TCP:
            _U32.pack_into(packet, at + 4, (seq + index * gso_size) & 0xFFFFFFFF)
            segment_flags = flags
            if index < count - 1:
                segment_flags &= ~(TCP_FIN | TCP_PSH)
            if index:
                segment_flags &= ~TCP_CWR
            packet[at + 13] = segment_flags
            field = at + 16
        else:
            _U16.pack_into(packet, at + 4, total - l4)
            field = at + 6
        if checksums:
            packet[field] = packet[field + 1] = 0
            _U16.pack_into(packet, field, finish_checksum(addresses + total - l4 + word_sum(packet[at:start + total])))
        else:
            _U16.pack_into(packet, field, fold(addresses + total - l4))
        yield start


class Coalescer:
    """Received TCP segments of one flow, joined into one super-packet for one TUN write.

    The pending packet sits after room for its virtio-net header in `buf`. The data
    path asks `continues` for each decrypted packet: if it does, `append` it; if not,
    write `finish()` (when `pending`) and then `start` with it, or write it alone when
    it cannot start one. Only segments that the kernel would merge itself are joined: the
    same addresses, ports, ACK, window and options, the next sequence number, flags ACK
    or ACK|PSH, every segment but the last of the same size; IPv4 with the same DF and,
    without DF, IP ids counting up (Linux's inet_gro_receive and tcp_gro_receive).
    Segment checksums are not checked: the tunnel authenticated every byte, and the
    joined packet's checksum is the kernel's to complete."""

    __slots__ = ("buf", "view", "pending", "_version", "_l4", "_header", "_size", "_count", "_next_seq", "_next_id",
                 "_closed", "_psh")

    def __init__(self) -> None:
        self.buf = bytearray(VNET_HDR_SIZE + MAX_PACKET)
        self.view = memoryview(self.buf)
        self.pending = 0  # bytes of the pending packet (0: none)
        self._version = 4
        self._l4 = 20
        self._header = 40
        self._size = 0  # payload bytes of the first segment: the gso_size
        self._count = 0
        self._next_seq = 0
        self._next_id = -1  # the IPv4 id the next segment must have; -1: any (DF set, or IPv6)
        self._closed = False
        self._psh = False

    @staticmethod
    def _layout(packet: memoryview, length: int) -> tuple[int, int] | None:
        """(L4 offset, header length) of a TCP data segment with flags ACK or ACK|PSH that
        can be joined (IPv4 without options or fragmentation, IPv6 without extension
        headers), else None."""
        if length < 40:
            return None
        first = packet[0]
        if first == 0x45:
            if packet[9] != TCP or (packet[6] & ~DONT_FRAGMENT) or packet[7]:  # fragments, the reserved flag
                return None
            l4 = 20
        elif first >> 4 == 6:
            if length < 60 or packet[6] != TCP:
                return None
            l4 = 40
        else:
            return None
        if packet[l4 + 13] & ~TCP_PSH != TCP_ACK:
            return None
        header = l4 + (packet[l4 + 12] >> 4) * 4
        if header < l4 + 20 or header >= length:
            return None
        return l4, header

    def start(self, packet: memoryview, length: int) -> bool:
        """Make the packet the pending one, if it is a segment that can be joined (not
        when it has PSH: nothing would follow it); False and nothing pending otherwise."""
        layout = self._layout(packet, length)
        if layout is None or packet[layout[0] + 13] & TCP_PSH:
            return False
        self._l4, self._header = layout
        self._version = packet[0] >> 4
        self._size = length - self._header
        self._count = 1
        self._next_seq = (_U32.unpack_from(packet, self._l4 + 4)[0] + self._size) & 0xFFFFFFFF
        self._next_id = -1 if self._version == 6 or packet[6] else (_U16.unpack_from(packet, 4)[0] + 1) & 0xFFFF
        self._closed = self._psh = False
        self.buf[VNET_HDR_SIZE:VNET_HDR_SIZE + length] = packet[:length]
        self.pending = length
        return True

    def continues(self, packet: memoryview, length: int) -> bool:
        """Whether the packet is the pending flow's next segment and fits."""
        if self._closed or not self.pending or self._count >= MAX_SEGMENTS:
            return False
        l4, header = self._l4, self._header
        size = length - header
        if size < 1 or size > self._size or self.pending + size > MAX_PACKET or packet[l4 + 13] & ~TCP_PSH != TCP_ACK:
            return False
        mine = self.view[VNET_HDR_SIZE:]
        if packet[l4 + 12] != mine[l4 + 12]:  # data offset, reserved bits, AE
            return False
        if self._version == 4:
            if (packet[0] != 0x45 or packet[9] != TCP or packet[6] != mine[6] or packet[7] or packet[1] != mine[1]
                    or packet[8] != mine[8] or packet[12:24] != mine[12:24]
                    or (self._next_id >= 0 and _U16.unpack_from(packet, 4)[0] != self._next_id)):
                return False
        elif (packet[0] >> 4 != 6 or packet[6] != TCP or packet[:4] != mine[:4] or packet[7] != mine[7]
              or packet[8:44] != mine[8:44]):
            return False
        return (_U32.unpack_from(packet, l4 + 4)[0] == self._next_seq and packet[l4 + 8:l4 + 12] == mine[l4 + 8:l4 + 12]
                and packet[l4 + 14:l4 + 16] == mine[l4 + 14:l4 + 16] and packet[l4 + 20:header] == mine[l4 + 20:header])

    def append(self, packet: memoryview, length: int) -> None:
        header, end = self._header, VNET_HDR_SIZE + self.pending
        size = length - header
        self.buf[end:end + size] = packet[header:length]
        self.pending += size
        self._count += 1
        self._next_seq = (self._next_seq + size) & 0xFFFFFFFF
        if self._next_id >= 0:
            self._next_id = (self._next_id + 1) & 0xFFFF
        if packet[self._l4 + 13] & TCP_PSH:
            self._psh = self._closed = True
        elif size < self._size:
            self._closed = True

    def finish(self) -> memoryview:
        """The pending packet with its virtio-net header, ready for one TUN write; nothing
        is pending afterwards. One segment goes as it came (its checksum left to the kernel
        when its sender left it partial); several go as a TSO packet whose checksum the
        kernel completes."""
        buf, length, l4 = self.buf, self.pending, self._l4
        packet = self.view[VNET_HDR_SIZE:]
        self.pending = 0
        if self._count == 1:
            if partial_checksum_at(packet, length) is not None:
                VNET_HDR.pack_into(buf, 0, NEEDS_CSUM, GSO_NONE, 0, 0, l4, 16)
            else:
                VNET_HDR.pack_into(buf, 0, 0, GSO_NONE, 0, 0, 0, 0)
            return self.view[:VNET_HDR_SIZE + length]
        if self._version == 4:
            _U16.pack_into(packet, 2, length)
            packet[10] = packet[11] = 0
            _U16.pack_into(packet, 10, ipv4_header_checksum(packet[:20]))
            gso_type = GSO_TCPV4
        else:
            _U16.pack_into(packet, 4, length - 40)
            gso_type = GSO_TCPV6
        if self._psh:
            packet[l4 + 13] |= TCP_PSH
        _U16.pack_into(packet, l4 + 16, fold(pseudo_header_sum(packet, self._version, TCP, length - l4)))
        VNET_HDR.pack_into(buf, 0, NEEDS_CSUM, gso_type, self._header, self._size, l4, 16)
        return self.view[:VNET_HDR_SIZE + length]
