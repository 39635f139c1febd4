"""Fuzzing the frame decoder: any bytes in any chunking give the same messages as one
reference parse, or FramingError, and never anything else; buffering stays bounded."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from tunnelmesh.links import MAX_MESSAGE
from tunnelmesh.links.framing import HEADER, FrameDecoder, FramingError, frame

FUZZ = settings(max_examples=400, deadline=None)


def reference(stream: bytes) -> tuple[list[bytes], bool]:
    """Messages of a whole stream and whether it hits a bad length (written plainly)."""
    out, pos = [], 0
    while len(stream) - pos >= 2:
        size = int.from_bytes(stream[pos : pos + 2], "big")
        if size == 0 or size > MAX_MESSAGE:
            return out, True
        if pos + 2 + size > len(stream):
            break
        out.append(stream[pos + 2 : pos + 2 + size])
        pos += 2 + size
    return out, False


def decode_in_chunks(stream: bytes, cuts: list[int]) -> tuple[list[bytes], bool]:
    decoder = FrameDecoder()
    out: list[bytes] = []
    bounds = sorted({c % (len(stream) + 1) for c in cuts} | {0, len(stream)})
    try:
        for start, end in zip(bounds, bounds[1:]):
            for message in decoder.feed(stream[start:end]):
                out.append(bytes(message))
            assert decoder.buffered < HEADER + MAX_MESSAGE
    except FramingError:
        return out, True
    return out, False


chunk_cuts = st.lists(st.integers(min_value=0, max_value=40000), max_size=30)
# Lengths near the interesting edges, mixed with raw noise.
lengths = st.sampled_from([0, 1, 2, 255, 256, MAX_MESSAGE - 1, MAX_MESSAGE, MAX_MESSAGE + 1, 0xFFFF])
noisy = st.lists(
    st.one_of(
        st.binary(max_size=64),
        lengths.map(lambda n: n.to_bytes(2, "big")),
        st.integers(min_value=1, max_value=MAX_MESSAGE).map(lambda n: frame(bytes([n % 251]) * n)),
    ),
    max_size=8,
).map(b"".join)


@FUZZ
@given(noisy, chunk_cuts)
def test_any_bytes_any_chunking_same_as_reference(stream: bytes, cuts: list[int]) -> None:
    assert decode_in_chunks(stream, cuts) == reference(stream)


@FUZZ
@given(st.lists(st.binary(min_size=1, max_size=MAX_MESSAGE), max_size=6), chunk_cuts)
def test_round_trip(messages: list[bytes], cuts: list[int]) -> None:
    stream = b"".join(frame(m) for m in messages)
    assert decode_in_chunks(stream, cuts) == (messages, False)
