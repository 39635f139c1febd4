"""WireGuard wire formats: message types 1-4.

Every field is little-endian. The type is a u32 whose upper three bytes are
"reserved zero"; a non-zero reserved byte therefore makes an unknown type.
`parse` accepts any bytes-like object and raises only `MessageError`.
Transport messages are not turned into objects on the data path: the device
reads their header in place with `TRANSPORT_HEADER.unpack_from`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final, Union

from .constants import (
    COOKIE_REPLY_SIZE,
    INITIATION_SIZE,
    MSG_COOKIE_REPLY,
    MSG_INITIATION,
    MSG_RESPONSE,
    MSG_TRANSPORT,
    RESPONSE_SIZE,
    TRANSPORT_MIN_SIZE,
)

__all__ = [
    "MessageError",
    "Initiation",
    "Response",
    "CookieReply",
    "TransportHeader",
    "Message",
    "parse",
    "message_type",
    "TRANSPORT_HEADER",
]


class MessageError(ValueError):
    """A datagram that is not a well-formed WireGuard message."""


_INITIATION: Final = struct.Struct("<II32s48s28s16s16s")
_RESPONSE: Final = struct.Struct("<III32s16s16s16s")
_COOKIE_REPLY: Final = struct.Struct("<II24s32s")
TRANSPORT_HEADER: Final = struct.Struct("<IIQ")


@dataclass(frozen=True, slots=True)
class Initiation:
    sender: int
    ephemeral: bytes
    encrypted_static: bytes
    encrypted_timestamp: bytes
    mac1: bytes
    mac2: bytes

    def encode(self) -> bytes:
        return _INITIATION.pack(
            MSG_INITIATION, self.sender, self.ephemeral, self.encrypted_static,
            self.encrypted_timestamp, self.mac1, self.mac2,
        )


@dataclass(frozen=True, slots=True)
class Response:
    sender: int
    receiver: int
    ephemeral: bytes
    encrypted_nothing: bytes
    mac1: bytes
    mac2: bytes

    def encode(self) -> bytes:
        return _RESPONSE.pack(
            MSG_RESPONSE, self.sender, self.receiver, self.ephemeral,
            self.encrypted_nothing, self.mac1, self.mac2,
        )


@dataclass(frozen=True, slots=True)
class CookieReply:
    receiver: int
    nonce: bytes
    encrypted_cookie: bytes

    def encode(self) -> bytes:
        return _COOKIE_REPLY.pack(MSG_COOKIE_REPLY, self.receiver, self.nonce, self.encrypted_cookie)


@dataclass(frozen=True, slots=True)
class TransportHeader:
    """Only for tests and tools; the data path unpacks the header in place."""

    receiver: int
    counter: int
    ciphertext: bytes

    def encode(self) -> bytes:
        return TRANSPORT_HEADER.pack(MSG_TRANSPORT, self.receiver, self.counter) + self.ciphertext


Message = Union[Initiation, Response, CookieReply, TransportHeader]

_SIZES: Final = {
    MSG_INITIATION: INITIATION_SIZE,
    MSG_RESPONSE: RESPONSE_SIZE,
    MSG_COOKIE_REPLY: COOKIE_REPLY_SIZE,
}


def message_type(data: bytes | bytearray | memoryview) -> int:
    """The message type, checked against the exact size the type demands."""
    size = len(data)
    if size < 4:
        raise MessageError(f"datagram of {size} bytes is too short for a message type")
    kind = int.from_bytes(data[:4], "little")
    if kind == MSG_TRANSPORT:
        if size < TRANSPORT_MIN_SIZE:
            raise MessageError(f"transport message of {size} bytes is shorter than {TRANSPORT_MIN_SIZE}")
        return kind
    expected = _SIZES.get(kind)
    if expected is None:
        raise MessageError(f"unknown message type {kind:#x}")
    if size != expected:
        raise MessageError(f"message type {kind} must be {expected} bytes, got {size}")
    return kind


def parse(data: bytes | bytearray | memoryview) -> Message:
    kind = message_type(data)
    raw = bytes(data)
    if kind == MSG_INITIATION:
        _, sender, eph, static, ts, mac1, mac2 = _INITIATION.unpack(raw)
        return Initiation(sender, eph, static, ts, mac1, mac2)
    if kind == MSG_RESPONSE:
        _, sender, receiver, eph, empty, mac1, mac2 = _RESPONSE.unpack(raw)
        return Response(sender, receiver, eph, empty, mac1, mac2)
    if kind == MSG_COOKIE_REPLY:
        _, receiver, nonce, cookie = _COOKIE_REPLY.unpack(raw)
        return CookieReply(receiver, nonce, cookie)
    _, receiver, counter = TRANSPORT_HEADER.unpack_from(raw)
    return TransportHeader(receiver, counter, raw[TRANSPORT_HEADER.size:])
