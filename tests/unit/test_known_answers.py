"""Known answers for the WireGuard primitives and message fields, computed in
this file from the whitepaper's formulas (section 5.4) and never from the core:

    HASH(x)      = BLAKE2s-256(x)                      hashlib.blake2s
    MAC(k, x)    = keyed BLAKE2s, 16-byte digest       hashlib.blake2s(key=, digest_size=16)
    HMAC(k, x)   = RFC 2104 over BLAKE2s (block 64)    written out below
    KDF_n(k, x)  = T1..Tn, T0 = HMAC(k, x), Ti = HMAC(T0, T(i-1) || i)
    DH, AEAD     = libsodium through PyNaCl (the core uses `cryptography`)
    XAEAD        = XChaCha20-Poly1305 (PyNaCl)
    TAI64N       = 12 bytes: 0x400000000000000a + Unix seconds, nanoseconds, big-endian

The core's messages are then compared against these values: the whole
initiation and response with injected ephemerals, mac1, mac2 after a cookie
reply, the cookie reply's encryption, and the little-endian indices/counters
at their offsets. The initial chaining key and hash are also compared with
the constants other implementations publish (e.g. boringtun).
"""

from __future__ import annotations

import hashlib
import hmac as std_hmac
import ipaddress
import random
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nacl.bindings import (
    crypto_aead_chacha20poly1305_ietf_decrypt,
    crypto_aead_chacha20poly1305_ietf_encrypt,
    crypto_aead_xchacha20poly1305_ietf_decrypt,
    crypto_scalarmult,
    crypto_scalarmult_base,
)
from nacl.exceptions import CryptoError

from tests.support.wire import ipv4_packet
from tunnelmesh.wireguard import Device
from tunnelmesh.wireguard import crypto as core_crypto
from tunnelmesh.wireguard import noise as core_noise
from tunnelmesh.wireguard.constants import COOKIE_REFRESH_TIME

CONSTRUCTION = b"Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s"
IDENTIFIER = b"WireGuard v1 zx2c4 Jason@zx2c4.com"
LABEL_MAC1 = b"mac1----"
LABEL_COOKIE = b"cookie--"

# Published by other implementations (boringtun's noise/handshake.rs):
# HASH(CONSTRUCTION) and HASH(HASH(CONSTRUCTION) || IDENTIFIER).
PUBLISHED_INITIAL_CHAIN_KEY = bytes([
    96, 226, 109, 174, 243, 39, 239, 192, 46, 195, 53, 226, 160, 37, 210, 208,
    22, 235, 66, 6, 248, 114, 119, 245, 45, 56, 209, 152, 139, 120, 205, 54,
])
PUBLISHED_INITIAL_HASH = bytes([
    34, 17, 179, 97, 8, 26, 197, 102, 105, 18, 67, 219, 69, 138, 213, 50,
    45, 156, 108, 102, 34, 147, 232, 183, 14, 225, 156, 101, 186, 7, 158, 243,
])


# --- the whitepaper's functions, written out --------------------------------------------


def HASH(*parts: bytes) -> bytes:
    return hashlib.blake2s(b"".join(parts)).digest()


def MAC(key: bytes, data: bytes) -> bytes:
    return hashlib.blake2s(data, digest_size=16, key=key).digest()


def HMAC(key: bytes, data: bytes) -> bytes:
    """RFC 2104 with BLAKE2s (64-byte blocks), without the hmac module."""
    block = 64
    if len(key) > block:
        key = HASH(key)
    key = key.ljust(block, b"\0")
    inner = HASH(bytes(b ^ 0x36 for b in key), data)
    return HASH(bytes(b ^ 0x5C for b in key), inner)


def KDF(n: int, key: bytes, data: bytes) -> list[bytes]:
    t0 = HMAC(key, data)
    out, prev = [], b""
    for i in range(1, n + 1):
        prev = HMAC(t0, prev + bytes([i]))
        out.append(prev)
    return out


def DH(private: bytes, public: bytes) -> bytes:
    return crypto_scalarmult(private, public)


def PUB(private: bytes) -> bytes:
    return crypto_scalarmult_base(private)


def AEAD(key: bytes, counter: int, plaintext: bytes, aad: bytes) -> bytes:
    return crypto_aead_chacha20poly1305_ietf_encrypt(plaintext, aad, bytes(4) + struct.pack("<Q", counter), key)


def AEAD_OPEN(key: bytes, counter: int, ciphertext: bytes, aad: bytes) -> bytes:
    return crypto_aead_chacha20poly1305_ietf_decrypt(ciphertext, aad, bytes(4) + struct.pack("<Q", counter), key)


def TAI64N(seconds: int, nanos: int) -> bytes:
    return struct.pack(">QI", 0x400000000000000A + seconds, nanos)


def u32(value: int) -> bytes:
    return struct.pack("<I", value)


# --- primitives ----------------------------------------------------------------------------


def test_hand_written_hmac_is_rfc_2104() -> None:
    for key, data in [(b"", b""), (b"k" * 32, b"data"), (b"x" * 64, b"y" * 100), (b"z" * 65, b"long key")]:
        assert HMAC(key, data) == std_hmac.new(key, data, hashlib.blake2s).digest()


def test_initial_chaining_key_and_hash_are_the_published_constants() -> None:
    assert HASH(CONSTRUCTION) == PUBLISHED_INITIAL_CHAIN_KEY
    assert HASH(PUBLISHED_INITIAL_CHAIN_KEY, IDENTIFIER) == PUBLISHED_INITIAL_HASH
    assert core_noise.INITIAL_CHAIN_KEY == PUBLISHED_INITIAL_CHAIN_KEY
    assert core_noise.INITIAL_HASH == PUBLISHED_INITIAL_HASH


@settings(max_examples=50, deadline=None)
@given(key=st.binary(min_size=32, max_size=32), data=st.binary(max_size=200))
def test_kdf_is_the_whitepaper_kdf(key: bytes, data: bytes) -> None:
    t1, t2, t3 = KDF(3, key, data)
    assert core_crypto.kdf1(key, data) == t1
    assert core_crypto.kdf2(key, data) == (t1, t2)
    assert core_crypto.kdf3(key, data) == (t1, t2, t3)
    assert core_crypto.hmac_(key, data) == HMAC(key, data)


@settings(max_examples=50, deadline=None)
@given(key=st.binary(min_size=16, max_size=32), data=st.binary(max_size=200))
def test_mac_and_hash(key: bytes, data: bytes) -> None:
    assert core_crypto.mac(key, data) == MAC(key, data)
    assert core_crypto.hash_(data, key) == HASH(data, key)


@pytest.mark.parametrize(
    ("wall", "expected_hex"),
    [
        (0.0, "400000000000000a" "00000000"),
        (1.0, "400000000000000b" "00000000"),
        # 0.5 s = 500000000 ns; whitened to a multiple of 2^24: 29 * 2^24 = 486539264.
        (1_700_000_000.5, f"{0x400000000000000A + 1_700_000_000:016x}" "1d000000"),
        (1_700_000_000.999, f"{0x400000000000000A + 1_700_000_000:016x}" f"{(999_000_000 >> 24) << 24:08x}"),
    ],
)
def test_tai64n_known_answers(wall: float, expected_hex: str) -> None:
    assert core_crypto.tai64n(wall).hex() == expected_hex


def test_tai64n_is_wireguard_go_and_linux_base() -> None:
    """0x400000000000000a: TAI64 label 2^62 plus the 10 s TAI-UTC offset."""
    assert core_crypto.tai64n(1_234_567_890.0) == TAI64N(1_234_567_890, 0)
    assert core_crypto.tai64n(1_234_567_890.0)[:8] == (2**62 + 10 + 1_234_567_890).to_bytes(8, "big")


@settings(max_examples=50, deadline=None)
@given(seconds=st.integers(0, 2**34), nanos=st.integers(0, 999_999_999))
def test_tai64n_whitens_the_low_24_bits_of_nanoseconds(seconds: int, nanos: int) -> None:
    stamp = core_crypto.tai64n(seconds + nanos / 1e9)
    got_seconds, got_nanos = struct.unpack(">QI", stamp)
    assert got_nanos & 0xFFFFFF == 0
    # The float wall clock may round across a 2^24 ns step; never by more.
    expected = TAI64N(seconds, (nanos >> 24) << 24)
    assert abs((got_seconds * 10**9 + got_nanos) - int.from_bytes(expected[:8], "big") * 10**9 - int.from_bytes(expected[8:], "big")) <= 1 << 24


# --- whole handshake messages from the whitepaper --------------------------------------


class Setup:
    """Two Devices with known statics, ephemerals, PSK and clock."""

    def __init__(self, seed: int = 7) -> None:
        rnd = random.Random(seed)
        self.si, self.sr = rnd.randbytes(32), rnd.randbytes(32)
        self.ei, self.er = rnd.randbytes(32), rnd.randbytes(32)
        self.psk = core_crypto.derive_psk(rnd.randbytes(32))
        self.si_pub, self.sr_pub = PUB(self.si), PUB(self.sr)
        self.addr_i, self.addr_r = ("192.0.2.1", 40001), ("192.0.2.2", 51820)
        self.ip_i, self.ip_r = "100.100.0.1", "100.100.0.2"
        self.now, self.wall = 1000.0, 1_700_000_042.0
        dev_rng = random.Random(seed + 1)
        self.i = Device(self.si, rng=dev_rng.randbytes, ephemeral_source=lambda: self.ei)
        self.r = Device(self.sr, rng=dev_rng.randbytes, ephemeral_source=lambda: self.er)
        self.i_peer = self.i.add_peer(
            self.sr_pub, preshared_key=self.psk, allowed_ips=(ipaddress.ip_network(f"{self.ip_r}/32"),), endpoint=self.addr_r
        )
        self.r_peer = self.r.add_peer(
            self.si_pub, preshared_key=self.psk, allowed_ips=(ipaddress.ip_network(f"{self.ip_i}/32"),), endpoint=self.addr_i
        )
        self.out = bytearray(2048)

    def initiation(self) -> bytes:
        self.i_peer.last_sent_handshake = float("-inf")  # no 5 s rate limit in these tests
        self.i_peer.send_handshake_initiation(self.now, self.wall)
        (datagram, to), = self.i.transmits
        self.i.transmits.clear()
        assert to == self.addr_r
        return datagram

    def to_responder(self, datagram: bytes, *, under_load: bool = False, source: tuple[str, int] | None = None) -> list[bytes]:
        assert self.r.receive(datagram, source or self.addr_i, self.now, self.wall, self.out, under_load=under_load) == 0
        sent = [d for d, _ in self.r.transmits]
        self.r.transmits.clear()
        return sent

    def to_initiator(self, datagram: bytes) -> list[bytes]:
        n = self.i.receive(datagram, self.addr_r, self.now, self.wall, self.out)
        assert n == 0
        sent = [d for d, _ in self.i.transmits]
        self.i.transmits.clear()
        return sent


def whitepaper_initiation(s: Setup, sender: int, timestamp: bytes) -> tuple[bytes, bytes, bytes]:
    """Whitepaper 5.4.2; returns (message, C, H)."""
    c = HASH(CONSTRUCTION)
    h = HASH(HASH(c, IDENTIFIER), s.sr_pub)
    e_pub = PUB(s.ei)
    c = KDF(1, c, e_pub)[0]
    h = HASH(h, e_pub)
    c, k = KDF(2, c, DH(s.ei, s.sr_pub))
    enc_static = AEAD(k, 0, s.si_pub, h)
    h = HASH(h, enc_static)
    c, k = KDF(2, c, DH(s.si, s.sr_pub))
    enc_time = AEAD(k, 0, timestamp, h)
    h = HASH(h, enc_time)
    body = u32(1) + u32(sender) + e_pub + enc_static + enc_time
    return body + MAC(HASH(LABEL_MAC1, s.sr_pub), body) + bytes(16), c, h


def whitepaper_response(s: Setup, sender: int, receiver: int, c: bytes, h: bytes) -> tuple[bytes, bytes, bytes]:
    """Whitepaper 5.4.3 and 5.4.5; returns (message, T_send_i, T_recv_i)."""
    e_pub = PUB(s.er)
    c = KDF(1, c, e_pub)[0]
    h = HASH(h, e_pub)
    c = KDF(1, c, DH(s.er, PUB(s.ei)))[0]
    c = KDF(1, c, DH(s.er, s.si_pub))[0]
    c, tau, k = KDF(3, c, s.psk)
    h = HASH(h, tau)
    enc_empty = AEAD(k, 0, b"", h)
    body = u32(2) + u32(sender) + u32(receiver) + e_pub + enc_empty
    t_send_i, t_recv_i = KDF(2, c, b"")
    return body + MAC(HASH(LABEL_MAC1, s.si_pub), body) + bytes(16), t_send_i, t_recv_i


def test_initiation_is_the_whitepaper_message_byte_for_byte() -> None:
    s = Setup()
    initiation = s.initiation()
    pending = s.i_peer.pending_initiation(int.from_bytes(initiation[4:8], "little"))
    assert pending is not None, "bytes 4..8 are not the little-endian index of the pending initiation"
    expected, _, _ = whitepaper_initiation(s, int.from_bytes(initiation[4:8], "little"), TAI64N(1_700_000_042, 0))
    assert len(initiation) == 148
    assert initiation[0:4] == b"\x01\x00\x00\x00"
    assert initiation[8:40] == expected[8:40], "unencrypted ephemeral"
    assert initiation[40:88] == expected[40:88], "encrypted static"
    assert initiation[88:116] == expected[88:116], "encrypted timestamp"
    assert initiation[116:132] == MAC(HASH(LABEL_MAC1, s.sr_pub), initiation[0:116]), "mac1"
    assert initiation[132:148] == bytes(16), "mac2 without a cookie"
    assert initiation == expected


def test_response_and_transport_keys_are_the_whitepaper_ones() -> None:
    s = Setup()
    initiation = s.initiation()
    i_index = int.from_bytes(initiation[4:8], "little")
    _, c, h = whitepaper_initiation(s, i_index, TAI64N(1_700_000_042, 0))
    (response,) = s.to_responder(initiation)
    r_index = int.from_bytes(response[4:8], "little")
    expected, t_send_i, t_recv_i = whitepaper_response(s, r_index, i_index, c, h)
    assert len(response) == 92
    assert response[0:4] == b"\x02\x00\x00\x00"
    assert response[8:12] == u32(i_index), "receiver is the initiator's sender index, little-endian"
    assert response[12:44] == expected[12:44], "unencrypted ephemeral"
    assert response[44:60] == expected[44:60], "encrypted nothing"
    assert response[60:76] == MAC(HASH(LABEL_MAC1, s.si_pub), response[0:60]), "mac1"
    assert response[76:92] == bytes(16), "mac2 without a cookie"
    assert response == expected
    assert s.r_peer.next is not None and s.r_peer.next.local_index == r_index

    # The initiator confirms with a keepalive: counter 0 under T_send_i.
    (keepalive,) = s.to_initiator(response)
    assert keepalive[:16] == u32(4) + u32(r_index) + struct.pack("<Q", 0)
    assert AEAD_OPEN(t_send_i, 0, keepalive[16:], b"") == b""
    assert s.i_peer.current.local_index == i_index and s.i_peer.current.remote_index == r_index

    # Data: counter 1, padded to 16, under T_send_i; the answer under T_recv_i.
    packet = ipv4_packet(s.ip_i, s.ip_r, b"known answer")  # 32 bytes: no padding needed
    packet2 = ipv4_packet(s.ip_i, s.ip_r, b"x")  # 21 bytes, padded to 32
    for counter, p in ((1, packet), (2, packet2)):
        buf = bytearray(2048)
        buf[: len(p)] = p
        size = s.i_peer.encrypt(buf, len(p), s.out, s.now, s.wall)
        datagram = bytes(s.out[:size])
        assert datagram[:16] == u32(4) + u32(r_index) + struct.pack("<Q", counter)
        assert AEAD_OPEN(t_send_i, counter, datagram[16:], b"") == p + bytes(-len(p) % 16)
    reply = ipv4_packet(s.ip_r, s.ip_i, b"reply")
    datagram = u32(4) + u32(i_index) + struct.pack("<Q", 0) + AEAD(t_recv_i, 0, reply + bytes(-len(reply) % 16), b"")
    n = s.i.receive(datagram, s.addr_r, s.now, s.wall, s.out)
    assert bytes(s.out[:n]) == reply, dict(s.i.drops)


def test_a_flipped_mac1_bit_is_dropped() -> None:
    s = Setup()
    initiation = bytearray(s.initiation())
    initiation[120] ^= 1
    assert s.to_responder(bytes(initiation)) == []
    assert s.r.drops["bad mac1"] == 1


# --- cookies --------------------------------------------------------------------------


def test_cookie_reply_is_xchacha_sealed_under_the_cookie_key_with_mac1_as_aad() -> None:
    s = Setup()
    initiation = s.initiation()
    (reply,) = s.to_responder(initiation, under_load=True)
    assert len(reply) == 64
    assert reply[0:4] == b"\x03\x00\x00\x00"
    assert reply[4:8] == initiation[4:8], "receiver is the initiation's sender index"
    nonce, sealed = reply[8:32], reply[32:64]
    key = HASH(LABEL_COOKIE, s.sr_pub)
    cookie = crypto_aead_xchacha20poly1305_ietf_decrypt(sealed, initiation[116:132], nonce, key)
    assert len(cookie) == 16
    with pytest.raises(CryptoError):  # the aad is exactly this message's mac1
        crypto_aead_xchacha20poly1305_ietf_decrypt(sealed, bytes(16), nonce, key)
    with pytest.raises(CryptoError):  # and the key is derived from the responder's public key
        crypto_aead_xchacha20poly1305_ietf_decrypt(sealed, initiation[116:132], nonce, HASH(LABEL_COOKIE, s.si_pub))
    assert s.r_peer.next is None and s.r.cookie_replies_sent == 1


def test_mac2_after_a_cookie_reply_is_mac_of_the_cookie_and_gets_through() -> None:
    s = Setup()
    first = s.initiation()
    (reply,) = s.to_responder(first, under_load=True)
    cookie = crypto_aead_xchacha20poly1305_ietf_decrypt(reply[32:64], first[116:132], reply[8:32], HASH(LABEL_COOKIE, s.sr_pub))
    # The initiator goes again at once (not after REKEY_TIMEOUT): a new initiation with mac2.
    (second,) = s.to_initiator(reply)
    assert s.i.drops["cookie reply not for us"] == 0
    assert second[116:132] == MAC(HASH(LABEL_MAC1, s.sr_pub), second[0:116]), "mac1"
    assert second[132:148] == MAC(cookie, second[0:132]), "mac2 = MAC(cookie, msg[0:132])"
    assert second[132:148] != bytes(16)
    # Under load, the responder now answers (a response, not another cookie).
    (answer,) = s.to_responder(second, under_load=True)
    assert answer[0] == 2 and len(answer) == 92, dict(s.r.drops)

    # The cookie is bound to the sender's address: from another port it is refused.
    s.now += 5.5
    s.wall += 5.5
    third = s.initiation()
    assert third[132:148] == MAC(cookie, third[0:132])
    (again,) = s.to_responder(third, under_load=True, source=("192.0.2.1", 40002))
    assert again[0] == 3 and len(again) == 64


def test_mac2_is_zero_again_once_the_cookie_is_older_than_120_s() -> None:
    s = Setup()
    first = s.initiation()
    (reply,) = s.to_responder(first, under_load=True)
    s.to_initiator(reply)
    s.now += COOKIE_REFRESH_TIME + 1
    s.wall += COOKIE_REFRESH_TIME + 1
    assert s.initiation()[132:148] == bytes(16)


def test_a_cookie_reply_under_the_wrong_aad_is_ignored() -> None:
    """A reply sealed for another mac1 (or replayed) leaves mac2 zero."""
    s = Setup()
    first = s.initiation()
    (reply,) = s.to_responder(first, under_load=True)
    s.now += 5.5
    s.wall += 5.5
    s.initiation()  # a newer initiation: its mac1 is now the one a reply must match
    assert s.to_initiator(reply) == []
    assert s.i.drops["cookie reply not for us"] == 1
    s.now += 5.5
    s.wall += 5.5
    assert s.initiation()[132:148] == bytes(16)
