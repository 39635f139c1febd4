"""The primitives WireGuard is built from: BLAKE2s HASH/MAC/HMAC/KDF, the
ChaCha20-Poly1305 AEAD with WireGuard's nonce layout, X25519 and TAI64N.

Only the handshake uses these helpers; the per-packet path holds its own
ChaCha20Poly1305 objects and reused buffers (see keypair.py).
"""

from __future__ import annotations

import hashlib
import hmac
import struct

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

KEY_SIZE = 32

# The PSK slot binds a session to one network: psk = BLAKE2s-256 keyed with the
# 32-byte network secret over this label. Bump the version if the rule changes.
PSK_LABEL = b"tunnelmesh psk v1"


def hash_(*parts: bytes) -> bytes:
    h = hashlib.blake2s()
    for part in parts:
        h.update(part)
    return h.digest()


def mac(key: bytes, data: bytes) -> bytes:
    """Keyed BLAKE2s with a 16-byte digest (mac1, mac2, cookies)."""
    return hashlib.blake2s(data, digest_size=16, key=key).digest()


def hmac_(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.blake2s).digest()


def kdf1(key: bytes, data: bytes) -> bytes:
    t0 = hmac_(key, data)
    return hmac_(t0, b"\x01")


def kdf2(key: bytes, data: bytes) -> tuple[bytes, bytes]:
    t0 = hmac_(key, data)
    t1 = hmac_(t0, b"\x01")
    return t1, hmac_(t0, t1 + b"\x02")


def kdf3(key: bytes, data: bytes) -> tuple[bytes, bytes, bytes]:
    t0 = hmac_(key, data)
    t1 = hmac_(t0, b"\x01")
    t2 = hmac_(t0, t1 + b"\x02")
    return t1, t2, hmac_(t0, t2 + b"\x03")


# The AEAD nonce is 4 zero bytes and the 64-bit little-endian counter; the data
# path packs the counter into a reused 12-byte buffer at offset 4.
NONCE_COUNTER = struct.Struct("<Q")


def nonce(counter: int) -> bytes:
    return b"\x00\x00\x00\x00" + NONCE_COUNTER.pack(counter)


def aead_encrypt(key: bytes, counter: int, plaintext: bytes, aad: bytes) -> bytes:
    return ChaCha20Poly1305(key).encrypt(nonce(counter), plaintext, aad)


def aead_decrypt(key: bytes, counter: int, ciphertext: bytes, aad: bytes) -> bytes:
    """Raises cryptography's InvalidTag on a bad tag."""
    return ChaCha20Poly1305(key).decrypt(nonce(counter), ciphertext, aad)


def x25519_private() -> bytes:
    return X25519PrivateKey.generate().private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())


def x25519_public(private: bytes) -> bytes:
    return X25519PrivateKey.from_private_bytes(private).public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def dh(private: bytes, public: bytes) -> bytes:
    """X25519; raises ValueError for a low-order public key (all-zero output)."""
    return X25519PrivateKey.from_private_bytes(private).exchange(X25519PublicKey.from_public_bytes(public))


def derive_psk(network_secret: bytes) -> bytes:
    if len(network_secret) < 16:
        raise ValueError("network secret must be at least 16 bytes")
    return hashlib.blake2s(PSK_LABEL, key=network_secret[:32]).digest()


# TAI64N: 8 bytes of 2^62 + 10 + Unix seconds (the TAI64 label, with TAI ten
# seconds ahead of UTC as in libtai), 4 bytes of nanoseconds, big-endian.
# wireguard-go and Linux both use the base 0x400000000000000a.
_TAI64_BASE = (1 << 62) + 10
# Like wireguard-go, drop the low bits of the nanoseconds (about 16 ms) so the
# timestamp is no precise clock oracle for an observer who can decrypt it.
_WHITENER_MASK = 0x1000000 - 1


def tai64n(wall: float) -> bytes:
    seconds = int(wall)
    nanos = int((wall - seconds) * 1e9)
    nanos -= nanos & _WHITENER_MASK
    return struct.pack(">QI", _TAI64_BASE + seconds, nanos)
