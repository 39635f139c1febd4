"""Wire formats of message types 1-4: sizes, the reserved bytes, round-trips.

Fuzzing with arbitrary and mutated datagrams is in tests/property/test_wire_fuzz.py.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.support.wire import PeerPair, kind
from tunnelmesh.wireguard.constants import (
    COOKIE_REPLY_SIZE,
    INITIATION_SIZE,
    MSG_COOKIE_REPLY,
    MSG_INITIATION,
    MSG_RESPONSE,
    MSG_TRANSPORT,
    RESPONSE_SIZE,
    TRANSPORT_MIN_SIZE,
)
from tunnelmesh.wireguard.messages import (
    TRANSPORT_HEADER,
    CookieReply,
    Initiation,
    MessageError,
    Response,
    TransportHeader,
    message_type,
    parse,
)

u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)


def fixed(n: int) -> st.SearchStrategy[bytes]:
    return st.binary(min_size=n, max_size=n)


initiations = st.builds(Initiation, u32, fixed(32), fixed(48), fixed(28), fixed(16), fixed(16))
responses = st.builds(Response, u32, u32, fixed(32), fixed(16), fixed(16), fixed(16))
cookie_replies = st.builds(CookieReply, u32, fixed(24), fixed(32))
transports = st.builds(TransportHeader, u32, u64, st.binary(min_size=16, max_size=200))


@pytest.fixture(scope="module")
def real_messages() -> dict[int, bytes]:
    """One datagram of each type, as two real devices put them on the wire."""
    pair = PeerPair()
    pair.under_load = "b"
    pair.send("a", b"first")
    pair.deliver()  # initiation -> cookie reply
    pair.under_load = False
    pair.run_until(pair.now + 6)  # retry -> response -> staged data
    found: dict[int, bytes] = {}
    for _, datagram in pair.wire_log:
        found.setdefault(kind(datagram), datagram)
    assert sorted(found) == [1, 2, 3, 4]
    return found


# --- sizes ---------------------------------------------------------------------


def test_real_messages_have_the_protocol_sizes(real_messages: dict[int, bytes]) -> None:
    assert len(real_messages[MSG_INITIATION]) == 148
    assert len(real_messages[MSG_RESPONSE]) == 92
    assert len(real_messages[MSG_COOKIE_REPLY]) == 64
    # "first" in a 20-byte IPv4 header is 25 bytes, padded to 32, plus header and tag.
    assert len(real_messages[MSG_TRANSPORT]) == 16 + 32 + 16


def test_size_constants_match_the_whitepaper() -> None:
    assert (INITIATION_SIZE, RESPONSE_SIZE, COOKIE_REPLY_SIZE, TRANSPORT_MIN_SIZE) == (148, 92, 64, 32)


def test_real_messages_carry_zero_reserved_bytes(real_messages: dict[int, bytes]) -> None:
    for kind_, datagram in real_messages.items():
        assert datagram[:4] == bytes([kind_, 0, 0, 0])


@pytest.mark.parametrize("kind_, size", [(1, 148), (2, 92), (3, 64)])
@pytest.mark.parametrize("delta", [-1, 1, -20, 100])
def test_handshake_message_of_wrong_size_is_rejected(kind_: int, size: int, delta: int) -> None:
    datagram = struct.pack("<I", kind_) + bytes(size + delta - 4)
    with pytest.raises(MessageError, match=f"must be {size} bytes"):
        parse(datagram)


@pytest.mark.parametrize("kind_, size", [(1, 148), (2, 92), (3, 64)])
def test_handshake_message_of_exact_size_parses(kind_: int, size: int) -> None:
    assert message_type(struct.pack("<I", kind_) + bytes(size - 4)) == kind_


def test_transport_message_of_31_bytes_is_rejected_and_32_accepted() -> None:
    with pytest.raises(MessageError, match="shorter than 32"):
        parse(TRANSPORT_HEADER.pack(4, 1, 2) + bytes(15))
    message = parse(TRANSPORT_HEADER.pack(4, 1, 2) + bytes(16))
    assert message == TransportHeader(receiver=1, counter=2, ciphertext=bytes(16))


def test_transport_message_may_be_large() -> None:
    message = parse(TRANSPORT_HEADER.pack(4, 7, 2**64 - 1) + bytes(65000))
    assert isinstance(message, TransportHeader)
    assert (message.receiver, message.counter, len(message.ciphertext)) == (7, 2**64 - 1, 65000)


@pytest.mark.parametrize("length", [0, 1, 2, 3])
def test_datagram_shorter_than_a_type_is_rejected(length: int) -> None:
    with pytest.raises(MessageError, match="too short"):
        parse(b"\x01" * length)


@pytest.mark.parametrize("kind_", [0, 5, 255])
def test_unknown_type_is_rejected(kind_: int) -> None:
    with pytest.raises(MessageError, match="unknown message type"):
        parse(bytes([kind_, 0, 0, 0]) + bytes(144))


@pytest.mark.parametrize("kind_", [1, 2, 3, 4])
@pytest.mark.parametrize("reserved_byte", [1, 2, 3])
def test_non_zero_reserved_byte_makes_an_unknown_type(
    real_messages: dict[int, bytes], kind_: int, reserved_byte: int
) -> None:
    datagram = bytearray(real_messages[kind_])
    datagram[reserved_byte] = 1
    with pytest.raises(MessageError, match="unknown message type"):
        parse(datagram)


@pytest.mark.parametrize("kind_", [1, 2, 3, 4])
def test_truncated_real_message_is_rejected(real_messages: dict[int, bytes], kind_: int) -> None:
    datagram = real_messages[kind_]
    cut = datagram[: min(len(datagram) - 1, 31)]
    with pytest.raises(MessageError):
        parse(cut)


# --- fields and round-trips --------------------------------------------------------


def test_parsed_real_initiation_has_its_fields_in_place(real_messages: dict[int, bytes]) -> None:
    raw = real_messages[MSG_INITIATION]
    message = parse(raw)
    assert isinstance(message, Initiation)
    assert message.sender == int.from_bytes(raw[4:8], "little")
    assert message.ephemeral == raw[8:40]
    assert message.encrypted_static == raw[40:88]
    assert message.encrypted_timestamp == raw[88:116]
    assert message.mac1 == raw[116:132]
    assert message.mac2 == raw[132:148]


def test_indices_chain_initiation_response_and_transport() -> None:
    pair = PeerPair()
    pair.handshake()
    initiation = parse(pair.sent("a->b", MSG_INITIATION)[0])
    response = parse(pair.sent("b->a", MSG_RESPONSE)[0])
    keepalive = parse(pair.sent("a->b", MSG_TRANSPORT)[0])
    assert isinstance(initiation, Initiation) and isinstance(response, Response)
    assert isinstance(keepalive, TransportHeader)
    assert response.receiver == initiation.sender
    assert keepalive.receiver == response.sender
    assert keepalive.counter == 0
    assert len(response.encrypted_nothing) == 16


@pytest.mark.parametrize("kind_", [1, 2, 3, 4])
def test_real_messages_round_trip_byte_for_byte(real_messages: dict[int, bytes], kind_: int) -> None:
    raw = real_messages[kind_]
    assert parse(raw).encode() == raw
    assert parse(bytearray(raw)).encode() == raw
    assert parse(memoryview(raw)).encode() == raw


@settings(max_examples=150, deadline=None)
@given(st.one_of(initiations, responses, cookie_replies, transports))
def test_encode_then_parse_is_identity(message) -> None:
    encoded = message.encode()
    assert parse(encoded) == message
    assert parse(encoded).encode() == encoded


@settings(max_examples=100, deadline=None)
@given(initiations)
def test_encoded_initiation_is_148_bytes_of_type_1(message: Initiation) -> None:
    encoded = message.encode()
    assert len(encoded) == 148 and encoded[:4] == b"\x01\x00\x00\x00"


@settings(max_examples=100, deadline=None)
@given(responses)
def test_encoded_response_is_92_bytes_of_type_2(message: Response) -> None:
    encoded = message.encode()
    assert len(encoded) == 92 and encoded[:4] == b"\x02\x00\x00\x00"


@settings(max_examples=100, deadline=None)
@given(cookie_replies)
def test_encoded_cookie_reply_is_64_bytes_of_type_3(message: CookieReply) -> None:
    encoded = message.encode()
    assert len(encoded) == 64 and encoded[:4] == b"\x03\x00\x00\x00"


@settings(max_examples=100, deadline=None)
@given(transports)
def test_encoded_transport_is_header_plus_ciphertext(message: TransportHeader) -> None:
    encoded = message.encode()
    assert len(encoded) == 16 + len(message.ciphertext) >= 32
    assert TRANSPORT_HEADER.unpack_from(encoded) == (4, message.receiver, message.counter)
