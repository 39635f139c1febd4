"""tunnelmesh.nat.portmap natpmp and pcp codecs: requests as RFC 6886/6887 lay them out,
answers parsed strictly (the answer to *this* request, or an error naming why), result
codes with their text, and untrusted bytes giving only the codec's own errors."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tunnelmesh.nat.portmap import natpmp, pcp

NONCE = bytes(range(12))
ports = st.integers(1, 65535)
lifetimes = st.integers(0, 0xFFFFFFFF)


def natpmp_map_answer(internal: int, external: int, lifetime: int, result: int = 0, epoch: int = 7) -> bytes:
    return struct.pack("!BBHIHHI", 0, 129, result, epoch, internal, external, lifetime)


def pcp_map_answer(nonce: bytes, internal: int, external: int, lifetime: int, address: str = "192.0.2.9",
                   result: int = 0, options: bytes = b"") -> bytes:
    header = struct.pack("!BBBBII12x", 2, 0x81, 0, result, lifetime, 11)
    mapped = b"\x00" * 10 + b"\xff\xff" + ipaddress.IPv4Address(address).packed
    return header + struct.pack("!12sB3xHH16s", nonce, 17, internal, external, mapped) + options


# ------------------------------------------------------------------ NAT-PMP


def test_natpmp_requests_follow_rfc_6886() -> None:
    assert natpmp.external_address_request() == b"\x00\x00"
    assert natpmp.map_request(51820, 51820, 7200) == struct.pack("!BBHHHI", 0, 1, 0, 51820, 51820, 7200)
    deletion = natpmp.map_request(51820, 0, 0)  # RFC 6886 3.4: lifetime 0 and external port 0
    assert struct.unpack("!BBHHHI", deletion) == (0, 1, 0, 51820, 0, 0)


@given(internal=ports, external=ports, lifetime=st.integers(1, 0xFFFFFFFF))
def test_natpmp_map_answer_round_trips(internal: int, external: int, lifetime: int) -> None:
    answer = natpmp.parse_map(natpmp_map_answer(internal, external, lifetime), internal)
    assert (answer.internal_port, answer.external_port, answer.lifetime, answer.epoch) == (internal, external, lifetime, 7)


def test_natpmp_external_address_answer() -> None:
    data = struct.pack("!BBHI4s", 0, 128, 0, 99, bytes([203, 0, 113, 5]))
    assert natpmp.parse_external_address(data) == natpmp.ExternalAddress(99, "203.0.113.5")


@pytest.mark.parametrize("result", sorted(natpmp.RESULTS.keys() - {0}) + [77])
def test_natpmp_refusals_name_the_result(result: int) -> None:
    with pytest.raises(natpmp.NatPmpRefused) as refused:
        natpmp.parse_map(natpmp_map_answer(51820, 0, 0, result=result), 51820)
    assert refused.value.result == result
    assert natpmp.describe(result) in str(refused.value)
    # RFC 6886 3.5: an "unsupported version" answer may stop after the header.
    with pytest.raises(natpmp.NatPmpRefused):
        natpmp.parse_external_address(struct.pack("!BBHI", 0, 128, result, 0))


@pytest.mark.parametrize("data, why", [
    (natpmp_map_answer(51820, 51820, 60)[:15], "expected 16"),
    (natpmp_map_answer(51820, 51820, 60) + b"\x00", "expected 16"),
    (natpmp_map_answer(4000, 51820, 60), "internal port 4000"),
    (natpmp_map_answer(51820, 0, 60), "external port 0"),
    (b"\x02" + natpmp_map_answer(51820, 51820, 60)[1:], "version 2"),
    (struct.pack("!BBHI4s", 0, 128, 0, 1, bytes(4)), "opcode 128"),
    (b"\x00\x81", "shorter than"),
])
def test_natpmp_malformed_answers_say_why(data: bytes, why: str) -> None:
    with pytest.raises(natpmp.NatPmpError, match=why):
        natpmp.parse_map(data, 51820)


@given(st.binary(max_size=64))
def test_natpmp_garbage_gives_only_codec_errors(data: bytes) -> None:
    for parse in (natpmp.parse_external_address, lambda d: natpmp.parse_map(d, 51820)):
        try:
            parse(data)
        except (natpmp.NatPmpError, natpmp.NatPmpRefused):
            pass


# ------------------------------------------------------------------ PCP


def test_pcp_map_request_follows_rfc_6887() -> None:
    request = pcp.map_request(NONCE, "198.51.100.2", 51820, 7200, 51820)
    assert len(request) == pcp.HEADER_SIZE + pcp.MAP_SIZE
    version, opcode, _, lifetime, client = struct.unpack_from("!BBHI16s", request)
    assert (version, opcode, lifetime) == (2, 1, 7200)
    assert ipaddress.IPv6Address(client).ipv4_mapped == ipaddress.IPv4Address("198.51.100.2")
    nonce, protocol, internal, external, suggested = struct.unpack_from("!12sB3xHH16s", request, 24)
    assert (nonce, protocol, internal, external) == (NONCE, 17, 51820, 51820)
    assert ipaddress.IPv6Address(suggested).ipv4_mapped == ipaddress.IPv4Address("0.0.0.0")
    deletion = pcp.map_request(NONCE, "198.51.100.2", 51820, 0)  # RFC 6887 15: same nonce, lifetime 0
    assert struct.unpack_from("!I", deletion, 4) == (0,) and deletion[24:36] == NONCE


@given(nonce=st.binary(min_size=12, max_size=12), internal=ports, external=ports,
       lifetime=st.integers(1, 0xFFFFFFFF), address=st.ip_addresses(v=4).map(str))
def test_pcp_map_answer_round_trips(nonce: bytes, internal: int, external: int, lifetime: int, address: str) -> None:
    answer = pcp.parse_map(pcp_map_answer(nonce, internal, external, lifetime, address), nonce, internal)
    assert answer == pcp.MapAnswer(lifetime, 11, internal, external, address)


def test_pcp_answer_with_options_is_accepted_when_they_fit() -> None:
    option = struct.pack("!BBH", 0x7F, 0, 5) + b"abcde" + b"\x00" * 3  # padded to 4
    assert pcp.parse_map(pcp_map_answer(NONCE, 51820, 51820, 60, options=option), NONCE, 51820).lifetime == 60
    with pytest.raises(pcp.PcpError, match="option longer"):
        pcp.parse_map(pcp_map_answer(NONCE, 51820, 51820, 60, options=option[:8]), NONCE, 51820)


@pytest.mark.parametrize("result", sorted(pcp.RESULTS.keys() - {0}) + [200])
def test_pcp_refusals_name_the_result(result: int) -> None:
    with pytest.raises(pcp.PcpRefused) as refused:
        pcp.parse_map(pcp_map_answer(NONCE, 51820, 0, 30, result=result), NONCE, 51820)
    assert (refused.value.result, refused.value.lifetime) == (result, 30)
    assert pcp.describe(result) in str(refused.value)


def test_a_natpmp_only_gateway_is_told_apart() -> None:
    # RFC 6887 9: a NAT-PMP server answers a PCP request with its own "unsupported version".
    with pytest.raises(pcp.PcpUnsupportedVersion):
        pcp.parse_map(struct.pack("!BBHI", 0, 129, 1, 0), NONCE, 51820)


@pytest.mark.parametrize("data, why", [
    (pcp_map_answer(bytes(12), 51820, 51820, 60), "another nonce"),
    (pcp_map_answer(NONCE, 4000, 51820, 60), "port 4000"),
    (pcp_map_answer(NONCE, 51820, 0, 60), "external port 0"),
    (pcp_map_answer(NONCE, 51820, 51820, 60)[:58], "multiple of 4"),
    (pcp_map_answer(NONCE, 51820, 51820, 60)[:56], "shorter than 60"),
    (pcp_map_answer(NONCE, 51820, 51820, 60) + bytes(1100), "1100"),
    (b"\x02\x01" + pcp_map_answer(NONCE, 51820, 51820, 60)[2:], "response bit 0"),
    (b"\x02", "shorter than any"),
])
def test_pcp_malformed_answers_say_why(data: bytes, why: str) -> None:
    with pytest.raises(pcp.PcpError, match=why):
        pcp.parse_map(data, NONCE, 51820)


@given(st.binary(max_size=128))
def test_pcp_garbage_gives_only_codec_errors(data: bytes) -> None:
    try:
        pcp.parse_map(data, NONCE, 51820)
    except (pcp.PcpError, pcp.PcpRefused, pcp.PcpUnsupportedVersion):
        pass


@given(st.binary(min_size=36, max_size=36), st.binary(max_size=64))
def test_pcp_garbage_after_a_valid_header_gives_only_codec_errors(body: bytes, options: bytes) -> None:
    data = struct.pack("!BBBBII12x", 2, 0x81, 0, 0, 60, 1) + body + options
    try:
        pcp.parse_map(data, body[:12], 51820)
    except pcp.PcpError:
        pass


def test_requests_refuse_out_of_range_values() -> None:
    with pytest.raises(ValueError):
        natpmp.map_request(0, 0, 60)
    with pytest.raises(ValueError):
        pcp.map_request(b"short", "198.51.100.2", 51820, 60)
    with pytest.raises(ValueError):
        pcp.map_request(NONCE, "198.51.100.2", 51820, 1 << 32)
