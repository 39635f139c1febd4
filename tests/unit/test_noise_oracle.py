"""The Noise part of our handshake, checked against an independent oracle: the
`noiseprotocol` package running Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s with
WireGuard's identifier as prologue and the PSK at position 2.

With the same static keys, ephemerals, PSK and TAI64N payload, the two must
agree byte for byte on
  * the initiation's Noise part (bytes 8..116 = noise message 1),
  * the response's Noise part (bytes 12..60 = noise message 2, empty payload),
  * the final handshake hash H (noise's get_handshake_hash()),
  * the first transport keys (noise's split() cipher states),
in both directions (our initiator against a noise responder and the reverse),
through the four functions of tunnelmesh.wireguard.noise and through two
whole Devices whose ephemerals are injected.

noiseprotocol shares only `cryptography`'s X25519/ChaCha20-Poly1305/BLAKE2s
primitives with us; its symmetric state, HKDF, token processing and PSK
handling are its own.
"""

from __future__ import annotations

import ipaddress
import random
import struct
import warnings

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from noise.connection import Keypair as NoiseKey
from noise.connection import NoiseConnection

from tests.support.wire import ipv4_packet
from tunnelmesh.wireguard import Device
from tunnelmesh.wireguard.constants import CONSTRUCTION, IDENTIFIER
from tunnelmesh.wireguard.crypto import derive_psk, dh, x25519_public
from tunnelmesh.wireguard.messages import Initiation, Response
from tunnelmesh.wireguard.noise import (
    HandshakeError,
    consume_initiation,
    consume_response,
    create_initiation,
    create_response,
    derive_keys,
)

PROTOCOL = b"Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s"
PROLOGUE = b"WireGuard v1 zx2c4 Jason@zx2c4.com"
ZERO16 = bytes(16)

keys32 = st.binary(min_size=32, max_size=32)


def tai64n(seconds: int, nanos: int = 0) -> bytes:
    """TAI64N written out here, not taken from the core (whitepaper 5.4.2)."""
    return struct.pack(">QI", 0x400000000000000A + seconds, nanos)


class Keys:
    """Everything both sides of one handshake need, from one seed."""

    def __init__(self, seed: int) -> None:
        rnd = random.Random(seed)
        self.i_static = rnd.randbytes(32)
        self.r_static = rnd.randbytes(32)
        self.i_ephemeral = rnd.randbytes(32)
        self.r_ephemeral = rnd.randbytes(32)
        self.psk = derive_psk(rnd.randbytes(32))
        self.timestamp = tai64n(1_700_000_000 + rnd.randrange(10**6), rnd.randrange(60) << 24)
        self.i_public = x25519_public(self.i_static)
        self.r_public = x25519_public(self.r_static)


def noise_side(initiator: bool, k: Keys, *, prologue: bytes = PROLOGUE, psk: bytes | None = None) -> NoiseConnection:
    """A started noiseprotocol connection playing one side with fixed keys."""
    conn = NoiseConnection.from_name(PROTOCOL)
    conn.set_prologue(prologue)
    conn.set_psks(psk if psk is not None else k.psk)
    if initiator:
        conn.set_as_initiator()
        conn.set_keypair_from_private_bytes(NoiseKey.STATIC, k.i_static)
        conn.set_keypair_from_public_bytes(NoiseKey.REMOTE_STATIC, k.r_public)
        conn.set_keypair_from_private_bytes(NoiseKey.EPHEMERAL, k.i_ephemeral)
    else:
        conn.set_as_responder()
        conn.set_keypair_from_private_bytes(NoiseKey.STATIC, k.r_static)
        conn.set_keypair_from_private_bytes(NoiseKey.EPHEMERAL, k.r_ephemeral)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "ephemeral keypair already set": on purpose
        conn.start_handshake()
    return conn


def noise_state(conn: NoiseConnection) -> tuple[bytes, bytes]:
    """(ck, h) of a connection whose handshake is still running."""
    symmetric = conn.noise_protocol.symmetric_state
    return bytes(symmetric.ck), bytes(symmetric.h)


def noise_transport_keys(conn: NoiseConnection) -> tuple[bytes, bytes]:
    """(send key, receive key) after noise's Split()."""
    assert conn.handshake_finished
    return bytes(conn.noise_protocol.cipher_state_encrypt.k), bytes(conn.noise_protocol.cipher_state_decrypt.k)


def our_initiation(k: Keys, sender: int = 0x11223344) -> tuple[bytes, object]:
    return create_initiation(
        local_static_private=k.i_static,
        local_static_public=k.i_public,
        remote_static=k.r_public,
        static_static=dh(k.i_static, k.r_public),
        sender=sender,
        timestamp=k.timestamp,
        ephemeral_private=k.i_ephemeral,
    )


def as_initiation(noise_message: bytes, sender: int = 7) -> Initiation:
    assert len(noise_message) == 32 + 48 + 28
    return Initiation(sender, noise_message[:32], noise_message[32:80], noise_message[80:108], ZERO16, ZERO16)


def as_response(noise_message: bytes, sender: int = 9, receiver: int = 7) -> Response:
    assert len(noise_message) == 32 + 16
    return Response(sender, receiver, noise_message[:32], noise_message[32:48], ZERO16, ZERO16)


# --- the oracle itself ---------------------------------------------------------------


def test_oracle_runs_with_the_installed_cryptography() -> None:
    k = Keys(0)
    ni, nr = noise_side(True, k), noise_side(False, k)
    m1 = ni.write_message(k.timestamp)
    assert nr.read_message(m1) == k.timestamp
    ni.read_message(nr.write_message(b""))
    assert ni.handshake_finished and nr.handshake_finished
    assert ni.get_handshake_hash() == nr.get_handshake_hash()
    assert noise_transport_keys(ni) == noise_transport_keys(nr)[::-1]


def test_oracle_tells_prologue_and_psk_apart() -> None:
    """The oracle is sharp enough to catch a wrong prologue or PSK."""
    k = Keys(1)
    reference = noise_side(True, k).write_message(k.timestamp)
    assert noise_side(True, k, prologue=PROLOGUE + b"!").write_message(k.timestamp) != reference
    ours, _ = our_initiation(k)
    assert ours[8:116] == reference
    # The PSK enters at position 2, so it changes message 2 only.
    nr_right, nr_wrong = noise_side(False, k), noise_side(False, k, psk=bytes(32))
    nr_right.read_message(reference)
    nr_wrong.read_message(reference)
    assert nr_right.write_message(b"") != nr_wrong.write_message(b"")


def test_our_constants_are_the_noise_protocol_name_and_prologue() -> None:
    assert (CONSTRUCTION, IDENTIFIER) == (PROTOCOL, PROLOGUE)


# --- the four pure steps, both directions --------------------------------------------


def check_our_initiator_against_noise_responder(k: Keys) -> None:
    body, state = our_initiation(k, sender=0x0A0B0C0D)
    ni, nr = noise_side(True, k), noise_side(False, k)

    # (a) message 1: the same bytes, and noise reads ours.
    m1 = bytes(ni.write_message(k.timestamp))
    assert body[8:116] == m1
    assert bytes(nr.read_message(body[8:116])) == k.timestamp
    assert (state.chain_key, state.hash) == noise_state(ni) == noise_state(nr)

    # (b) message 2 from the noise responder is accepted by us.
    m2 = bytes(nr.write_message(b""))
    final = consume_response(as_response(m2), state, local_static_private=k.i_static, preshared_key=k.psk)
    ni.read_message(m2)

    # (c) the handshake hash, (d) the transport keys.
    assert final.hash == nr.get_handshake_hash() == ni.get_handshake_hash()
    send, receive = derive_keys(final, initiator=True)
    assert (send, receive) == noise_transport_keys(ni)
    assert (receive, send) == noise_transport_keys(nr)


def check_noise_initiator_against_our_responder(k: Keys) -> None:
    ni, nr = noise_side(True, k), noise_side(False, k)
    m1 = bytes(ni.write_message(k.timestamp))

    # (a) we read noise's message 1 and reach the same state.
    consumed = consume_initiation(as_initiation(m1), local_static_private=k.r_static, local_static_public=k.r_public)
    assert consumed.remote_static == k.i_public
    assert consumed.remote_ephemeral == x25519_public(k.i_ephemeral)
    assert consumed.timestamp == k.timestamp
    nr.read_message(m1)
    assert (consumed.state.chain_key, consumed.state.hash) == noise_state(nr)

    # (b) message 2: the same bytes, and noise reads ours.
    body, final = create_response(
        consumed.state,
        remote_static=consumed.remote_static,
        remote_ephemeral=consumed.remote_ephemeral,
        preshared_key=k.psk,
        sender=0x01020304,
        receiver=7,
        ephemeral_private=k.r_ephemeral,
    )
    m2 = bytes(nr.write_message(b""))
    assert body[12:60] == m2
    assert bytes(ni.read_message(body[12:60])) == b""

    # (c) and (d)
    assert final.hash == nr.get_handshake_hash() == ni.get_handshake_hash()
    send, receive = derive_keys(final, initiator=False)
    assert (send, receive) == noise_transport_keys(nr)
    assert (receive, send) == noise_transport_keys(ni)


@pytest.mark.parametrize("seed", range(4))
def test_our_initiator_against_noise_responder(seed: int) -> None:
    check_our_initiator_against_noise_responder(Keys(seed))


@pytest.mark.parametrize("seed", range(4))
def test_noise_initiator_against_our_responder(seed: int) -> None:
    check_noise_initiator_against_our_responder(Keys(seed))


@settings(max_examples=25, deadline=None)
@given(i_static=keys32, r_static=keys32, i_eph=keys32, r_eph=keys32, psk=keys32, seconds=st.integers(0, 2**40))
def test_both_directions_for_any_keys(
    i_static: bytes, r_static: bytes, i_eph: bytes, r_eph: bytes, psk: bytes, seconds: int
) -> None:
    k = Keys(0)
    k.i_static, k.r_static, k.i_ephemeral, k.r_ephemeral, k.psk = i_static, r_static, i_eph, r_eph, psk
    k.i_public, k.r_public = x25519_public(i_static), x25519_public(r_static)
    k.timestamp = tai64n(seconds)
    check_our_initiator_against_noise_responder(k)
    check_noise_initiator_against_our_responder(k)


def test_a_wrong_psk_is_refused_by_our_initiator() -> None:
    """The oracle with another PSK builds a message 2 we must reject."""
    k = Keys(5)
    body, state = our_initiation(k)
    nr = noise_side(False, k, psk=derive_psk(b"another network secret!"))
    nr.read_message(body[8:116])
    with pytest.raises(HandshakeError):
        consume_response(as_response(bytes(nr.write_message(b""))), state, local_static_private=k.i_static, preshared_key=k.psk)


# --- two whole Devices, ephemerals injected -------------------------------------------


def transport(receiver: int, counter: int, ciphertext: bytes) -> bytes:
    return struct.pack("<IIQ", 4, receiver, counter) + ciphertext


class Node:
    """A Device with an injectable ephemeral and its one peer."""

    def __init__(self, static: bytes, addr: tuple[str, int], ip: str) -> None:
        self.static, self.public, self.addr, self.ip = static, x25519_public(static), addr, ip
        self.ephemeral = b""
        self.device = Device(static, ephemeral_source=lambda: self.ephemeral)
        self.peer = None

    def connect(self, other: Node, psk: bytes) -> None:
        self.peer = self.device.add_peer(
            other.public, preshared_key=psk, allowed_ips=(ipaddress.ip_network(f"{other.ip}/32"),), endpoint=other.addr
        )

    def take_one(self) -> tuple[bytes, object]:
        assert len(self.device.transmits) == 1, (self.device.transmits, dict(self.device.drops))
        datagram, to = self.device.transmits.pop()
        return datagram, to


def handshake_against_oracle(ini: Node, resp: Node, k: Keys, now: float, wall: float) -> None:
    """`ini` starts a handshake with `resp`; every message and the resulting
    transport keys are checked against a noise initiator/responder pair."""
    assert (k.i_static, k.r_static) == (ini.static, resp.static)
    ini.ephemeral, resp.ephemeral = k.i_ephemeral, k.r_ephemeral
    ni, nr = noise_side(True, k), noise_side(False, k)
    out = bytearray(2048)

    # Message 1 from the initiating device.
    ini.peer.send_handshake_initiation(now, wall)
    initiation, to = ini.take_one()
    assert (len(initiation), to) == (148, resp.addr)
    assert initiation[8:116] == bytes(ni.write_message(k.timestamp)), "initiation differs from the oracle's message 1"
    nr.read_message(initiation[8:116])

    # Message 2 from the responding device.
    assert resp.device.receive(initiation, ini.addr, now, wall, out) == 0
    response, to = resp.take_one()
    assert (len(response), to) == (92, ini.addr)
    assert response[12:60] == bytes(nr.write_message(b"")), "response differs from the oracle's message 2"
    ni.read_message(response[12:60])
    ini_index = int.from_bytes(initiation[4:8], "little")
    resp_index = int.from_bytes(response[4:8], "little")

    # The initiator completes and confirms with a keepalive (counter 0), which
    # the oracle responder decrypts with its own transport key.
    assert ini.device.receive(response, resp.addr, now, wall, out) == 0
    keepalive, _ = ini.take_one()
    assert keepalive[:16] == transport(resp_index, 0, b"")
    assert nr.decrypt(bytes(keepalive[16:])) == b""

    # Data both ways: our ciphertext opens under the oracle's keys and the
    # oracle's ciphertext opens in our devices.
    packet = ipv4_packet(ini.ip, resp.ip, b"sixteen bytes!!!" * 3)  # 68 bytes, padded to 80
    buf = bytearray(2048)
    buf[: len(packet)] = packet
    size = ini.peer.encrypt(buf, len(packet), out, now, wall)
    assert size == 16 + 80 + 16
    datagram = bytes(out[:size])
    assert datagram[:16] == transport(resp_index, 1, b"")
    assert nr.decrypt(datagram[16:]) == packet + bytes(12)
    assert resp.device.receive(keepalive, ini.addr, now, wall, out) == 0  # confirms the session
    n = resp.device.receive(datagram, ini.addr, now, wall, out)
    assert bytes(out[:n]) == packet, dict(resp.device.drops)

    reply = ipv4_packet(resp.ip, ini.ip, b"pong")
    n = ini.device.receive(transport(ini_index, 0, nr.encrypt(reply + bytes(8))), resp.addr, now, wall, out)
    assert bytes(out[:n]) == reply, dict(ini.device.drops)
    ni.noise_protocol.cipher_state_encrypt.n = 2  # our device already sent counters 0 and 1
    n = resp.device.receive(transport(resp_index, 2, ni.encrypt(packet)), ini.addr, now, wall, out)
    assert bytes(out[:n]) == packet, dict(resp.device.drops)
    assert ini.peer.current.local_index == ini_index and resp.peer.current.local_index == resp_index


def test_two_devices_match_the_oracle_in_both_directions() -> None:
    """A initiates; later B initiates the next handshake on the same devices."""
    rnd = random.Random(42)
    a = Node(rnd.randbytes(32), ("192.0.2.1", 51820), "100.100.0.1")
    b = Node(rnd.randbytes(32), ("192.0.2.2", 51820), "100.100.0.2")
    psk = derive_psk(rnd.randbytes(32))
    a.connect(b, psk)
    b.connect(a, psk)
    wall = 1_700_000_123.0  # a whole second: nanoseconds 0 after whitening

    k = Keys(1)
    k.i_static, k.r_static, k.i_public, k.r_public, k.psk = a.static, b.static, a.public, b.public, psk
    k.timestamp = tai64n(int(wall))
    handshake_against_oracle(a, b, k, now=500.0, wall=wall)

    k = Keys(2)
    k.i_static, k.r_static, k.i_public, k.r_public, k.psk = b.static, a.static, b.public, a.public, psk
    k.timestamp = tai64n(int(wall) + 7, 3 << 24)
    handshake_against_oracle(b, a, k, now=507.0, wall=wall + 7 + (3 << 24) / 1e9 + 1e-6)
