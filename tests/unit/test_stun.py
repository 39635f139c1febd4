"""tunnelmesh.nat.stun: Binding requests and answers over aioice's codec; untrusted bytes
give StunError or a message, nothing else; answers are never larger than requests."""

from __future__ import annotations

import struct

import pytest
from aioice import stun as codec
from hypothesis import given
from hypothesis import strategies as st

from tunnelmesh.nat.stun import (
    REQUEST_SIZE,
    BindingRequest,
    BindingResponse,
    StunError,
    binding_request,
    binding_response,
    looks_like_stun,
    parse_binding_request,
    parse_binding_response,
)

ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).map(str)
addresses = st.tuples(st.one_of(ipv4, ipv6), st.integers(0, 65535))


def _message(method: codec.Method, klass: codec.Class, attributes: dict[str, object]) -> bytes:
    return bytes(codec.Message(method, klass, b"\x01" * 12, attributes))


def test_a_request_is_padded_to_the_largest_answer_and_parses_back() -> None:
    for change_ip in (False, True):
        for change_port in (False, True):
            transaction_id, datagram = binding_request(change_ip=change_ip, change_port=change_port)
            assert len(datagram) == REQUEST_SIZE and looks_like_stun(datagram)
            assert parse_binding_request(datagram) == BindingRequest(transaction_id, change_ip, change_port,
                                                                     REQUEST_SIZE)
            # FINGERPRINT is there (aioice checks it), SOFTWARE carries the padding
            attributes = codec.parse_message(datagram).attributes
            assert "FINGERPRINT" in attributes and attributes["SOFTWARE"].startswith("tunnelmesh")
            assert ("CHANGE-REQUEST" in attributes) == (change_ip or change_port)


def test_two_requests_have_different_transaction_ids() -> None:
    assert binding_request()[0] != binding_request()[0]


@given(source=addresses, origin=st.none() | addresses, other=st.none() | addresses,
       change_ip=st.booleans(), change_port=st.booleans())
def test_a_full_size_request_gets_every_attribute_back(source, origin, other, change_ip, change_port) -> None:
    transaction_id, datagram = binding_request(change_ip=change_ip, change_port=change_port)
    answer = binding_response(parse_binding_request(datagram), source, origin=origin, other=other)
    assert len(answer) <= len(datagram)
    assert parse_binding_response(answer) == BindingResponse(transaction_id, source, origin, other)
    assert "FINGERPRINT" in codec.parse_message(answer).attributes


@given(size=st.integers(0, REQUEST_SIZE), source=addresses, origin=addresses, other=addresses)
def test_an_answer_is_never_larger_than_its_request(size, source, origin, other) -> None:
    request = BindingRequest(b"\x02" * 12, False, False, size)
    try:
        answer = binding_response(request, source, origin=origin, other=other)
    except StunError:
        assert size < 20 + 4 + 4 + (4 if ":" not in source[0] else 16)  # not even the mapped address fits
        return
    assert len(answer) <= size
    parsed = parse_binding_response(answer)
    assert parsed.mapped == source  # the one attribute every answer has


def test_a_minimal_request_from_another_client_is_answered_only_as_far_as_it_is_large() -> None:
    bare = _message(codec.Method.BINDING, codec.Class.REQUEST, {})  # 20 bytes
    with pytest.raises(StunError, match="too small"):
        binding_response(parse_binding_request(bare), ("192.0.2.9", 9), origin=None, other=None)
    padded = _message(codec.Method.BINDING, codec.Class.REQUEST, {"SOFTWARE": "x" * 20})  # 44 bytes
    answer = binding_response(parse_binding_request(padded), ("192.0.2.9", 9), origin=("192.0.2.1", 1),
                              other=("192.0.2.2", 2))
    parsed = parse_binding_response(answer)
    assert len(answer) == 44 and parsed.mapped == ("192.0.2.9", 9)
    assert parsed.other == ("192.0.2.2", 2) and parsed.origin is None  # OTHER-ADDRESS first, then no room


def _append(datagram: bytes, kind: int, value: bytes) -> bytes:
    """`datagram` with one more attribute (a 4-byte multiple) and its length put right."""
    return (datagram[:2] + struct.pack("!H", len(datagram) - 20 + 4 + len(value)) + datagram[4:]
            + struct.pack("!HH", kind, len(value)) + value)


@pytest.mark.parametrize("attributes", [
    {"USERNAME": "alice"},
    {"MESSAGE-INTEGRITY": b"\x00" * 20},
    {"PRIORITY": 1},
    {"XOR-PEER-ADDRESS": ("192.0.2.1", 1)},
])
def test_a_request_with_attributes_the_server_does_not_serve_is_refused(attributes) -> None:
    with pytest.raises(StunError, match="does not serve"):
        parse_binding_request(_message(codec.Method.BINDING, codec.Class.REQUEST, attributes))


def test_unknown_comprehension_optional_attributes_are_ignored() -> None:
    datagram = _message(codec.Method.BINDING, codec.Class.REQUEST, {"ICE-CONTROLLING": 7})
    assert parse_binding_request(datagram).size == len(datagram)
    # a type aioice does not know, in the optional range: appended by hand
    assert parse_binding_request(_append(datagram, 0xC0DE, b"abcd")).transaction_id == b"\x01" * 12
    with pytest.raises(StunError, match="0x0026"):  # PADDING: would ask for a padded (larger) answer
        parse_binding_request(_append(datagram, 0x0026, bytes(4)))


@pytest.mark.parametrize(("method", "klass"), [
    (codec.Method.BINDING, codec.Class.INDICATION),
    (codec.Method.BINDING, codec.Class.RESPONSE),
    (codec.Method.BINDING, codec.Class.ERROR),
    (codec.Method.ALLOCATE, codec.Class.REQUEST),
])
def test_only_binding_requests_are_requests(method, klass) -> None:
    with pytest.raises(StunError, match="not a Binding request"):
        parse_binding_request(_message(method, klass, {"XOR-MAPPED-ADDRESS": ("192.0.2.1", 1)}))


def test_a_response_needs_a_mapped_address_and_takes_the_classic_one_too() -> None:
    with pytest.raises(StunError, match="without a mapped address"):
        parse_binding_response(_message(codec.Method.BINDING, codec.Class.RESPONSE, {}))
    with pytest.raises(StunError, match="not a Binding success response"):
        parse_binding_response(_message(codec.Method.BINDING, codec.Class.ERROR, {"ERROR-CODE": (420, "no")}))
    classic = _message(codec.Method.BINDING, codec.Class.RESPONSE, {"MAPPED-ADDRESS": ("198.51.100.7", 7)})
    assert parse_binding_response(classic).mapped == ("198.51.100.7", 7)


def test_a_wrong_fingerprint_is_refused() -> None:
    _, datagram = binding_request()
    damaged = datagram[:-1] + bytes([datagram[-1] ^ 1])
    with pytest.raises(StunError, match="fingerprint"):
        parse_binding_request(damaged)


def test_wireguard_messages_do_not_look_like_stun() -> None:
    for kind, size in ((1, 148), (2, 92), (3, 64), (4, 32)):
        assert not looks_like_stun(bytes([kind, 0, 0, 0]) + b"\x21\x12\xa4\x42" + bytes(size - 8))


def test_looks_like_stun_checks_every_header_rule() -> None:
    _, datagram = binding_request()
    assert looks_like_stun(datagram)
    assert not looks_like_stun(datagram[:-4])  # length no longer matches
    assert not looks_like_stun(bytes([0x40]) + datagram[1:])  # top bits
    assert not looks_like_stun(datagram[:4] + b"\0\0\0\0" + datagram[8:])  # cookie
    odd = datagram[:2] + struct.pack("!H", len(datagram) - 20 + 2) + datagram[4:] + b"\0\0"
    assert not looks_like_stun(odd)  # not a multiple of 4
    assert not looks_like_stun(datagram[:19])


PARSERS = (parse_binding_request, parse_binding_response)


@given(st.binary(max_size=200))
def test_random_bytes_give_stun_error_or_a_message(data: bytes) -> None:
    for parse in PARSERS:
        try:
            parse(data)
        except StunError:
            pass
    looks_like_stun(data)


def _valid_messages() -> st.SearchStrategy[bytes]:
    requests = st.builds(lambda ip, port: binding_request(change_ip=ip, change_port=port)[1],
                         st.booleans(), st.booleans())
    answers = st.builds(
        lambda source, origin, other: binding_response(BindingRequest(b"\x03" * 12, False, False, REQUEST_SIZE),
                                                       source, origin=origin, other=other),
        addresses, addresses, addresses)
    return requests | answers


@given(_valid_messages(), st.lists(st.tuples(st.integers(0, 99), st.integers(0, 255)), min_size=1, max_size=6),
       st.integers(-8, 8))
def test_mutated_messages_give_stun_error_or_a_message(message: bytes, flips, cut: int) -> None:
    data = bytearray(message)
    for position, value in flips:
        data[position % len(data)] = value
    if cut > 0:
        data = data[:-cut]
    elif cut < 0:
        data += bytes(-cut)
    for keep_length in (False, True):
        if keep_length:  # keep the header's length consistent so the attribute walk is reached
            data[2:4] = struct.pack("!H", (len(data) - 20) & 0xFFFF)
        for parse in PARSERS:
            try:
                parse(bytes(data))
            except StunError:
                pass
