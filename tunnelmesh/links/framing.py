"""Framing of WireGuard messages on a byte stream (the SSH rung and its bridge).

Frame format: a 2-byte big-endian length N, then N bytes holding exactly one
WireGuard message, with 1 <= N <= MAX_MESSAGE. No padding, no type byte, no
version: the stream's other end is authenticated before the first frame, and the
WireGuard message inside says what it is.

A frame with N == 0 or N > MAX_MESSAGE can only come from a broken or hostile peer,
and after it the stream cannot be resynchronised: the decoder raises FramingError
and the caller counts the drop and closes the connection. The length is checked
before any of the body is buffered, so a peer cannot make us hold more than one
frame's worth of bytes (MAX_MESSAGE + 1) per connection.

Sans-IO: no sockets here, so the same code serves asyncssh channels, the bridge's
Unix socket and the property tests.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

from tunnelmesh.links import MAX_MESSAGE

__all__ = ["HEADER", "FrameDecoder", "FramingError", "OversizeFrame", "encode_into", "frame"]

HEADER = 2
_LENGTH = struct.Struct(">H")


class FramingError(ValueError):
    """The stream is not a sequence of valid frames; close it."""


class OversizeFrame(FramingError):
    """A frame announced more than MAX_MESSAGE bytes."""


def _check_size(size: int) -> None:
    if size == 0:
        raise FramingError("empty frame")
    if size > MAX_MESSAGE:
        raise OversizeFrame(f"frame of {size} bytes is over the {MAX_MESSAGE}-byte limit")


def encode_into(buffer: bytearray, message: bytes | bytearray | memoryview) -> None:
    """Append one frame holding `message` to `buffer` (one copy of the message)."""
    size = len(message)
    _check_size(size)
    buffer += _LENGTH.pack(size)
    buffer += message


def frame(message: bytes | bytearray | memoryview) -> bytes:
    """One frame holding `message`."""
    out = bytearray()
    encode_into(out, message)
    return bytes(out)


class FrameDecoder:
    """Incremental decoder: `feed` bytes as they arrive, iterate the messages.

    Frames that arrive whole in one `feed` are handed out as memoryview slices of the
    fed data (no copy); only a frame split across feeds is gathered in the one
    bytearray buffer. A message is valid until the generator is advanced. Iterate each
    `feed` to the end before the next one. After a FramingError the decoder stays
    broken (every later feed raises again): the stream has lost its frame boundaries.
    """

    __slots__ = ("_pending", "_error")

    def __init__(self) -> None:
        self._pending = bytearray()  # the start of a frame split across feeds
        self._error: FramingError | None = None

    @property
    def buffered(self) -> int:
        """Bytes held for an incomplete frame (at most HEADER + MAX_MESSAGE - 1)."""
        return len(self._pending)

    def _fail(self, size: int) -> None:
        try:
            _check_size(size)
        except FramingError as exc:
            self._error = exc
            self._pending.clear()
            raise

    def feed(self, data: bytes | bytearray | memoryview) -> Iterator[bytes | memoryview]:
        """Yield every message completed by `data`, in order; FramingError at the
        first bad length (the messages before it are still yielded)."""
        if self._error is not None:
            raise self._error
        view = memoryview(data).cast("B")
        pending = self._pending
        pos = 0
        if pending:
            if len(pending) < HEADER:
                pos = min(HEADER - len(pending), len(view))
                pending += view[:pos]
                if len(pending) < HEADER:
                    return
            (size,) = _LENGTH.unpack_from(pending)
            self._fail(size)
            take = min(HEADER + size - len(pending), len(view) - pos)
            pending += view[pos : pos + take]
            pos += take
            if len(pending) < HEADER + size:
                return
            message = bytes(pending[HEADER:])  # a copy: the buffer is reused below
            pending.clear()
            yield message
        while len(view) - pos >= HEADER:
            (size,) = _LENGTH.unpack_from(view, pos)
            self._fail(size)
            end = pos + HEADER + size
            if end > len(view):
                break
            yield view[pos + HEADER : end]
            pos = end
        pending += view[pos:]
