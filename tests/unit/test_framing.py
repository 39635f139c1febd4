"""The frame codec of the SSH rung: round trips, split frames, refusals."""

from __future__ import annotations

import pytest

from tunnelmesh.links import MAX_MESSAGE
from tunnelmesh.links.framing import FrameDecoder, FramingError, OversizeFrame, encode_into, frame


def messages(decoder: FrameDecoder, data: bytes) -> list[bytes]:
    return [bytes(m) for m in decoder.feed(data)]


def test_frame_is_length_then_message() -> None:
    assert frame(b"\x01\x02\x03") == b"\x00\x03\x01\x02\x03"
    assert frame(bytes(MAX_MESSAGE))[:2] == MAX_MESSAGE.to_bytes(2, "big")


def test_encode_into_appends_to_a_batch() -> None:
    batch = bytearray()
    encode_into(batch, b"a")
    encode_into(batch, memoryview(b"bc"))
    assert batch == b"\x00\x01a\x00\x02bc"


@pytest.mark.parametrize("size", [0, MAX_MESSAGE + 1])
def test_encoder_refuses_what_a_decoder_would(size: int) -> None:
    with pytest.raises(FramingError):
        frame(bytes(size))


def test_decoder_one_byte_at_a_time() -> None:
    stream = frame(b"hello") + frame(bytes(MAX_MESSAGE)) + frame(b"x")
    decoder = FrameDecoder()
    out = [m for i in range(len(stream)) for m in messages(decoder, stream[i : i + 1])]
    assert out == [b"hello", bytes(MAX_MESSAGE), b"x"]
    assert decoder.buffered == 0


def test_decoder_keeps_a_partial_frame() -> None:
    decoder = FrameDecoder()
    assert messages(decoder, frame(b"abc") + b"\x00\x05ab") == [b"abc"]
    assert decoder.buffered == 4
    assert messages(decoder, b"cde" + frame(b"z")) == [b"abcde", b"z"]


def test_oversize_length_refused_before_the_body_arrives() -> None:
    decoder = FrameDecoder()
    with pytest.raises(OversizeFrame):
        messages(decoder, (MAX_MESSAGE + 1).to_bytes(2, "big"))
    assert decoder.buffered == 0
    with pytest.raises(FramingError):  # broken for good: the boundaries are lost
        messages(decoder, frame(b"ok"))


def test_empty_frame_refused_after_the_good_ones() -> None:
    decoder = FrameDecoder()
    got: list[bytes] = []
    with pytest.raises(FramingError) as caught:
        for m in decoder.feed(frame(b"first") + b"\x00\x00"):
            got.append(bytes(m))
    assert got == [b"first"]
    assert not isinstance(caught.value, OversizeFrame)
