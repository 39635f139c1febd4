"""Fuzzing the inner packets a peer sends through a session, as the receiving device reads
them after decryption (tunnelmesh/wireguard/device.py: the IP length that trims the padding,
cryptokey routing of the source). Whatever a member encrypts, the receiver delivers exactly
what a plain reading of the header says (the packet trimmed to its IP length, its source one
the sender owns) or drops it with one counted reason; never an exception. What is delivered
goes on to the packet filter, fuzzed in test_filter_fuzz.py (issue 17, part 5)."""

from __future__ import annotations

import collections
import functools
import ipaddress
import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.wire import A_IP, B_IP, PeerPair, ipv4_packet, ipv6_packet

FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
MTU = 1420
A_IPV6 = "fd00::a"
B_IPV6 = "fd00::b"
OWNED_BY_A = {ipaddress.ip_address(A_IP).packed, ipaddress.ip_address(A_IPV6).packed}
DROPS = {"malformed inner packet", "inner source not allowed for peer"}


@functools.cache
def pair() -> PeerPair:
    """A session from A to B, B allowing A its IPv4 and IPv6 address (one for all examples:
    each sends one more message on it)."""
    session = PeerPair(mtu=MTU, a_allows=(f"{B_IP}/32", f"{B_IPV6}/128"), b_allows=(f"{A_IP}/32", f"{A_IPV6}/128"))
    session.handshake()
    return session


def padded(packet: bytes) -> bytes:
    """The plaintext the sender seals: padded with zeros to 16 bytes, never past the MTU."""
    size = (len(packet) + 15) & ~15
    if size > MTU:
        size = len(packet) if len(packet) > MTU else MTU
    return packet + bytes(size - len(packet))


def expected(packet: bytes) -> bytes | None:
    """A plain reading of what B delivers: None if it must drop it."""
    plain = padded(packet)
    version = plain[0] >> 4
    if version == 4 and len(plain) >= 20:
        length = struct.unpack_from("!H", plain, 2)[0]
        source = plain[12:16]
        if not 20 <= length <= len(plain):
            return None
    elif version == 6 and len(plain) >= 40:
        length = 40 + struct.unpack_from("!H", plain, 4)[0]
        source = plain[8:24]
        if length > len(plain):
            return None
    else:
        return None
    return plain[:length] if source in OWNED_BY_A else None


sources = st.sampled_from([A_IP, B_IP, "100.100.0.3", "10.0.0.1"])
sources6 = st.sampled_from([A_IPV6, B_IPV6, "fd00::c", "::1"])
payloads = st.binary(max_size=1500)


def with_length(packet: bytes, offset: int, value: int) -> bytes:
    return packet[:offset] + struct.pack("!H", value) + packet[offset + 2:]


packets = st.one_of(
    st.binary(min_size=1, max_size=1600),
    st.builds(ipv4_packet, sources, st.just(B_IP), payloads),
    st.builds(ipv6_packet, sources6, st.just(B_IPV6), payloads),
    # a header whose own length says more, or less, than the packet holds
    st.tuples(st.builds(ipv4_packet, sources, st.just(B_IP), payloads), st.integers(0, 0xFFFF))
    .map(lambda c: with_length(c[0], 2, c[1])),
    st.tuples(st.builds(ipv6_packet, sources6, st.just(B_IPV6), payloads), st.integers(0, 0xFFFF))
    .map(lambda c: with_length(c[0], 4, c[1])),
    st.tuples(st.builds(ipv4_packet, sources, st.just(B_IP), payloads), st.integers(1, 60))
    .map(lambda c: c[0][: c[1]]),  # cut short
)


@FUZZ
@given(packets)
def test_an_inner_packet_is_delivered_as_its_header_says_or_dropped_and_counted(packet: bytes) -> None:
    session = pair()
    drops_before = collections.Counter(session.b.drops)
    delivered_before = len(session.delivered_to_b)
    assert session.send_packet("a", packet)
    session.deliver()
    delivered = session.delivered_to_b[delivered_before:]
    dropped = collections.Counter(session.b.drops) - drops_before
    want = expected(packet)
    if want is None:
        assert delivered == [] and sum(dropped.values()) == 1 and set(dropped) <= DROPS, dropped
    else:
        assert delivered == [want] and not dropped
