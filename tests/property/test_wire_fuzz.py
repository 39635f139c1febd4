"""Hostile bytes: the parser raises only MessageError, and Device.receive never
raises, never delivers and counts exactly one drop for anything that is not a
genuine new message (random bytes, near-valid headers, bit-flipped copies of
real messages, random bodies behind a valid mac1)."""

from __future__ import annotations

import struct
from functools import lru_cache

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.wire import A_ADDR, PeerPair, kind
from tunnelmesh.wireguard.constants import LABEL_MAC1
from tunnelmesh.wireguard.crypto import hash_, mac, x25519_public
from tunnelmesh.wireguard.messages import TRANSPORT_HEADER, MessageError, message_type, parse

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

_SIZES = {1: 148, 2: 92, 3: 64, 4: 32}


@st.composite
def near_valid(draw: st.DrawFn) -> bytes:
    """A type field that is (almost) right and a length at or near a valid one."""
    kind_ = draw(st.sampled_from([0, 1, 2, 3, 4, 5]))
    reserved = draw(st.sampled_from([b"\x00\x00\x00", b"\x00\x00\x00", b"\x01\x00\x00", b"\x00\x00\x80"]))
    size = _SIZES.get(kind_, 32) + draw(st.sampled_from([0, 0, 0, -1, 1, -16, 16, 200]))
    size = max(size, 4)
    return bytes([kind_]) + reserved + draw(st.binary(min_size=size - 4, max_size=size - 4))


datagrams = st.one_of(st.binary(max_size=300), near_valid())


# --- the parser --------------------------------------------------------------------------


@FUZZ
@given(datagrams, st.sampled_from([bytes, bytearray, memoryview]))
def test_parse_raises_only_message_error(data: bytes, wrap) -> None:
    try:
        message = parse(wrap(data))
    except MessageError:
        return
    encoded = message.encode()
    assert encoded == bytes(data)  # whatever parses re-encodes to the same bytes
    assert message_type(data) == kind(data)


@FUZZ
@given(datagrams)
def test_message_type_and_parse_agree(data: bytes) -> None:
    try:
        kind_ = message_type(data)
    except MessageError:
        try:
            parse(data)
        except MessageError:
            return
        raise AssertionError("parse accepted what message_type rejected")
    assert len(data) == _SIZES[kind_] or (kind_ == 4 and len(data) >= 32)
    assert data[1:4] == b"\x00\x00\x00"


# --- the device -------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def established() -> tuple[PeerPair, dict[str, bytes]]:
    """A session whose every message has already been delivered once, so any
    copy (mutated or not) is a replay at best."""
    pair = PeerPair()
    pair.send("a", b"payload one")
    pair.deliver()
    pair.send("b", b"payload two")
    pair.deliver()
    samples = {
        "initiation": pair.sent("a->b", 1)[0],
        "response": pair.sent("b->a", 2)[0],
        "a-data": pair.sent("a->b", 4)[0],
        "b-data": pair.sent("b->a", 4)[0],
    }
    return pair, samples


def receive_is_a_counted_drop(pair: PeerPair, to: str, data: bytes, *, under_load: bool = False) -> None:
    device = pair.a if to == "a" else pair.b
    sink = pair.delivered_to_a if to == "a" else pair.delivered_to_b
    drops_before = sum(device.drops.values())
    delivered_before = len(sink)
    out = bytearray(2048)
    n = device.receive(data, A_ADDR, pair.now, pair.wall, out, under_load=under_load)
    assert n == 0
    assert sum(device.drops.values()) == drops_before + 1, device.drops
    assert len(sink) == delivered_before
    # Nothing is answered, except a cookie reply for a mac1-valid message under load.
    assert device.transmits == [] or under_load
    device.transmits.clear()


@FUZZ
@given(datagrams, st.booleans())
def test_receive_never_raises_on_arbitrary_bytes(data: bytes, under_load: bool) -> None:
    pair, _ = established()
    receive_is_a_counted_drop(pair, "b", data, under_load=under_load)


@FUZZ
@given(
    st.sampled_from(["initiation", "response", "a-data", "b-data"]),
    st.lists(st.integers(0, 8 * 148 - 1), min_size=1, max_size=8, unique=True),
)
def test_bit_flipped_real_messages_are_counted_drops(which: str, bits: list[int]) -> None:
    pair, samples = established()
    original = samples[which]
    mutated = bytearray(original)
    for bit in bits:
        bit %= 8 * len(mutated)
        mutated[bit // 8] ^= 1 << (bit % 8)
    if bytes(mutated) == original:
        return
    to = "b" if which in ("initiation", "a-data") else "a"
    receive_is_a_counted_drop(pair, to, bytes(mutated))


@FUZZ
@given(st.sampled_from(["initiation", "response", "a-data", "b-data"]))
def test_unmodified_replays_of_real_messages_are_counted_drops(which: str) -> None:
    pair, samples = established()
    to = "b" if which in ("initiation", "a-data") else "a"
    receive_is_a_counted_drop(pair, to, samples[which])


@FUZZ
@given(st.binary(min_size=112, max_size=112), st.booleans())
def test_random_initiation_body_with_valid_mac1_is_a_counted_drop(body: bytes, zero_ephemeral: bool) -> None:
    pair, _ = established()
    if zero_ephemeral:
        body = body[:4] + bytes(32) + body[36:]
    message = b"\x01\x00\x00\x00" + body
    message += mac(hash_(LABEL_MAC1, x25519_public(pair.b_private)), message) + bytes(16)
    receive_is_a_counted_drop(pair, "b", message)


@lru_cache(maxsize=1)
def pending() -> tuple[PeerPair, int]:
    """A is waiting for a response to this initiation index."""
    pair = PeerPair(seed=3)
    pair.send("a", b"waiting")
    (initiation, _), = pair.a.transmits
    pair.a.transmits.clear()
    return pair, struct.unpack_from("<I", initiation, 4)[0]


@FUZZ
@given(st.binary(min_size=52, max_size=52), st.booleans())
def test_random_response_to_a_pending_initiation_is_a_counted_drop(body: bytes, zero_ephemeral: bool) -> None:
    pair, index = pending()
    sender, ephemeral, empty = body[:4], body[4:36], body[36:]
    if zero_ephemeral:
        ephemeral = bytes(32)
    message = b"\x02\x00\x00\x00" + sender + struct.pack("<I", index) + ephemeral + empty
    message += mac(hash_(LABEL_MAC1, x25519_public(pair.a_private)), message) + bytes(16)
    receive_is_a_counted_drop(pair, "a", message)
    assert pair.a_peer.current is None
    assert pair.a_peer.pending_initiation(index) is not None  # still waiting for the real one


@FUZZ
@given(st.integers(0, 2**64 - 1), st.binary(min_size=16, max_size=64))
def test_forged_transport_on_a_live_index_is_a_counted_drop(counter: int, ciphertext: bytes) -> None:
    pair, _ = established()
    index = pair.b_peer.current.local_index
    receive_is_a_counted_drop(pair, "b", TRANSPORT_HEADER.pack(4, index, counter) + ciphertext)


def test_session_still_works_after_the_fuzzing() -> None:
    pair, _ = established()
    before = len(pair.delivered_to_b)
    pair.send("a", b"still alive")
    pair.deliver()
    assert len(pair.delivered_to_b) == before + 1
