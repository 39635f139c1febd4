"""Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s, as WireGuard uses it.

Four pure steps, one per side and message, with the chaining key C and hash H
passed along explicitly. They build and read the Noise part of messages 1 and
2 (everything before mac1); mac1/mac2 are added by cookie.py, and state such
as indices, timestamps and keypairs lives in peer.py and device.py.

    initiator                              responder
    create_initiation  -- type 1 -->       consume_initiation
    consume_response   <-- type 2 --       create_response
    derive_keys(initiator=True)            derive_keys(initiator=False)

Everything written here is independent of the `noiseprotocol` package, which
the tests use as an oracle for these bytes.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Final

from cryptography.exceptions import InvalidTag

from .constants import CONSTRUCTION, IDENTIFIER, MSG_INITIATION, MSG_RESPONSE
from .crypto import aead_decrypt, aead_encrypt, dh, hash_, kdf1, kdf2, kdf3, x25519_public
from .messages import Initiation, Response

INITIAL_CHAIN_KEY: Final = hash_(CONSTRUCTION)
INITIAL_HASH: Final = hash_(INITIAL_CHAIN_KEY, IDENTIFIER)

_INITIATION_BODY: Final = struct.Struct("<II32s48s28s")
_RESPONSE_BODY: Final = struct.Struct("<III32s16s")


class HandshakeError(Exception):
    """A handshake message that fails authentication. Says nothing secret."""


@dataclass(slots=True)
class NoiseState:
    chain_key: bytes = field(repr=False)
    hash: bytes
    ephemeral_private: bytes = field(default=b"", repr=False)


@dataclass(frozen=True, slots=True)
class ConsumedInitiation:
    remote_static: bytes
    remote_ephemeral: bytes
    timestamp: bytes
    state: NoiseState


def _dh(private: bytes, public: bytes) -> bytes:
    try:
        return dh(private, public)
    except ValueError as exc:  # low-order point: all-zero shared secret
        raise HandshakeError("invalid public key in handshake") from exc


def create_initiation(
    *,
    local_static_private: bytes,
    local_static_public: bytes,
    remote_static: bytes,
    static_static: bytes,
    sender: int,
    timestamp: bytes,
    ephemeral_private: bytes,
) -> tuple[bytes, NoiseState]:
    """Returns the first 116 bytes of a type-1 message (before mac1/mac2)."""
    del local_static_private  # the static-static DH is precomputed per peer
    h = hash_(INITIAL_HASH, remote_static)
    ephemeral = x25519_public(ephemeral_private)
    c = kdf1(INITIAL_CHAIN_KEY, ephemeral)
    h = hash_(h, ephemeral)
    c, k = kdf2(c, _dh(ephemeral_private, remote_static))
    encrypted_static = aead_encrypt(k, 0, local_static_public, h)
    h = hash_(h, encrypted_static)
    c, k = kdf2(c, static_static)
    encrypted_timestamp = aead_encrypt(k, 0, timestamp, h)
    h = hash_(h, encrypted_timestamp)
    body = _INITIATION_BODY.pack(MSG_INITIATION, sender, ephemeral, encrypted_static, encrypted_timestamp)
    return body, NoiseState(c, h, ephemeral_private)


def consume_initiation(message: Initiation, *, local_static_private: bytes, local_static_public: bytes) -> ConsumedInitiation:
    h = hash_(INITIAL_HASH, local_static_public)
    c = kdf1(INITIAL_CHAIN_KEY, message.ephemeral)
    h = hash_(h, message.ephemeral)
    c, k = kdf2(c, _dh(local_static_private, message.ephemeral))
    try:
        remote_static = aead_decrypt(k, 0, message.encrypted_static, h)
    except InvalidTag:
        raise HandshakeError("initiation: static key does not decrypt") from None
    h = hash_(h, message.encrypted_static)
    c, k = kdf2(c, _dh(local_static_private, remote_static))
    try:
        timestamp = aead_decrypt(k, 0, message.encrypted_timestamp, h)
    except InvalidTag:
        raise HandshakeError("initiation: timestamp does not decrypt") from None
    h = hash_(h, message.encrypted_timestamp)
    return ConsumedInitiation(remote_static, message.ephemeral, timestamp, NoiseState(c, h))


def create_response(
    state: NoiseState,
    *,
    remote_static: bytes,
    remote_ephemeral: bytes,
    preshared_key: bytes,
    sender: int,
    receiver: int,
    ephemeral_private: bytes,
) -> tuple[bytes, NoiseState]:
    """Returns the first 60 bytes of a type-2 message (before mac1/mac2)."""
    ephemeral = x25519_public(ephemeral_private)
    c = kdf1(state.chain_key, ephemeral)
    h = hash_(state.hash, ephemeral)
    c = kdf1(c, _dh(ephemeral_private, remote_ephemeral))
    c = kdf1(c, _dh(ephemeral_private, remote_static))
    c, tau, k = kdf3(c, preshared_key)
    h = hash_(h, tau)
    encrypted_nothing = aead_encrypt(k, 0, b"", h)
    h = hash_(h, encrypted_nothing)
    body = _RESPONSE_BODY.pack(MSG_RESPONSE, sender, receiver, ephemeral, encrypted_nothing)
    return body, NoiseState(c, h, ephemeral_private)


def consume_response(
    message: Response, state: NoiseState, *, local_static_private: bytes, preshared_key: bytes
) -> NoiseState:
    c = kdf1(state.chain_key, message.ephemeral)
    h = hash_(state.hash, message.ephemeral)
    c = kdf1(c, _dh(state.ephemeral_private, message.ephemeral))
    c = kdf1(c, _dh(local_static_private, message.ephemeral))
    c, tau, k = kdf3(c, preshared_key)
    h = hash_(h, tau)
    try:
        aead_decrypt(k, 0, message.encrypted_nothing, h)
    except InvalidTag:
        raise HandshakeError("response does not authenticate (wrong key or pre-shared key)") from None
    h = hash_(h, message.encrypted_nothing)
    return NoiseState(c, h)


def derive_keys(state: NoiseState, *, initiator: bool) -> tuple[bytes, bytes]:
    """(send key, receive key) for the first transport keypair."""
    first, second = kdf2(state.chain_key, b"")
    return (first, second) if initiator else (second, first)
