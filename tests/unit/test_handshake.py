"""The handshake between two real devices on an in-memory wire: initiation,
response, key confirmation, replay and flood protection, authentication
failures, the cookie path under load and the loss of each message."""

from __future__ import annotations

import ipaddress

import pytest

from tests.support.wire import A_ADDR, A_IP, B_ADDR, B_IP, PSK, PeerPair, ipv4_packet, kind, seeded_rng
from tunnelmesh.wireguard import Device, HandshakeCompleted
from tunnelmesh.wireguard.constants import LABEL_MAC1, REKEY_TIMEOUT
from tunnelmesh.wireguard.crypto import hash_, mac, x25519_public
from tunnelmesh.wireguard.device import endpoint_bytes
from tunnelmesh.wireguard.peer import CROSSING_WINDOW
from tunnelmesh.wireguard.messages import TRANSPORT_HEADER, parse

INIT, RESP, COOKIE, DATA = 1, 2, 3, 4


def kinds(pair: PeerPair, direction: str) -> list[int]:
    return [kind(d) for d in pair.sent(direction)]


def force_initiation(pair: PeerPair) -> bytes:
    """A fresh initiation from A, ignoring A's 5 s rate limit; returned, not queued."""
    pair.a_peer.last_sent_handshake = float("-inf")
    pair.a_peer.send_handshake_initiation(pair.now, pair.wall)
    (datagram, _), = pair.a.transmits
    pair.a.transmits.clear()
    assert kind(datagram) == INIT
    return datagram


def with_mac1(datagram: bytes, receiver_public: bytes) -> bytes:
    """Recompute mac1 after tampering with the body, so the body gets checked."""
    body = datagram[:-32]
    return body + mac(hash_(LABEL_MAC1, receiver_public), body) + datagram[-16:]


# --- the happy path --------------------------------------------------------------


def test_first_packet_is_staged_and_starts_a_handshake() -> None:
    pair = PeerPair()
    assert pair.send("a", b"hi") == 0
    assert list(pair.a_peer.staged) == [ipv4_packet(A_IP, B_IP, b"hi")]
    (datagram, endpoint), = pair.a.transmits
    assert (kind(datagram), len(datagram), endpoint) == (INIT, 148, B_ADDR)


def test_initiation_response_then_first_data_confirms_the_session() -> None:
    pair = PeerPair()
    pair.send("a", b"hi")
    pair.deliver()
    assert kinds(pair, "a->b") == [INIT, DATA]
    assert kinds(pair, "b->a") == [RESP]
    assert pair.delivered_to_b == [ipv4_packet(A_IP, B_IP, b"hi")]
    assert pair.a_peer.staged == type(pair.a_peer.staged)()
    # Both sides now use the same session, named by each other's indices.
    a_kp, b_kp = pair.a_peer.current, pair.b_peer.current
    assert a_kp is not None and b_kp is not None and pair.b_peer.next is None
    assert (a_kp.initiator, b_kp.initiator) == (True, False)
    assert a_kp.remote_index == b_kp.local_index and b_kp.remote_index == a_kp.local_index


def test_handshake_completion_is_reported_on_both_sides() -> None:
    pair = PeerPair()
    pair.handshake()
    # Each side names where the proof came from: A the response, B A's confirmation.
    assert [e for e in pair.a.events if isinstance(e, HandshakeCompleted)] == [HandshakeCompleted(pair.a_peer, True, B_ADDR)]
    assert [e for e in pair.b.events if isinstance(e, HandshakeCompleted)] == [HandshakeCompleted(pair.b_peer, False, A_ADDR)]
    assert pair.a_peer.last_handshake == pair.b_peer.last_handshake == pair.now


def test_responder_keeps_the_new_keypair_in_next_and_sends_only_the_response() -> None:
    pair = PeerPair()
    pair.send("a", b"hi")
    (initiation, _), = pair.a.transmits
    pair.a.transmits.clear()
    pair.inject("b", initiation)
    (response, endpoint), = pair.b.transmits
    assert (kind(response), len(response), endpoint) == (RESP, 92, A_ADDR)
    assert pair.b_peer.next is not None and pair.b_peer.current is None
    # Until confirmed, B's own traffic is staged: nothing is sent on `next`,
    # and no competing initiation goes out (the response counts as B's
    # handshake for the 5 s rate limit, as in wireguard-go).
    assert pair.send("b", b"early") == 0
    assert [kind(d) for d, _ in pair.b.transmits] == [RESP]
    assert list(pair.b_peer.staged) == [ipv4_packet(B_IP, A_IP, b"early")]


def test_responder_flushes_its_staged_packets_once_confirmed() -> None:
    pair = PeerPair()
    pair.send("a", b"hi")
    (initiation, _), = pair.a.transmits
    pair.a.transmits.clear()
    pair.inject("b", initiation)
    pair.send("b", b"early")
    pair.deliver()
    assert pair.delivered_to_a == [ipv4_packet(B_IP, A_IP, b"early")]
    assert pair.delivered_to_b == [ipv4_packet(A_IP, B_IP, b"hi")]
    assert kinds(pair, "b->a") == [RESP, DATA]
    assert pair.b_peer.current is not None and pair.b_peer.next is None


def test_initiator_without_staged_data_confirms_with_a_keepalive() -> None:
    pair = PeerPair()
    pair.handshake()
    keepalives = pair.sent("a->b", DATA)
    assert [len(d) for d in keepalives] == [32]
    assert pair.delivered_to_b == []
    assert pair.b_peer.current is not None and pair.b_peer.next is None


def test_all_staged_packets_are_flushed_in_order_after_the_handshake() -> None:
    pair = PeerPair()
    packets = [ipv4_packet(A_IP, B_IP, bytes([i]) * (i + 1)) for i in range(5)]
    for packet in packets:
        assert pair.send_packet("a", packet) == 0
    assert [kind(d) for d, _ in pair.a.transmits] == [INIT]  # one initiation for all five
    pair.deliver()
    assert pair.delivered_to_b == packets
    assert kinds(pair, "a->b") == [INIT] + [DATA] * 5  # no extra keepalive


def test_staged_queue_keeps_the_newest_128_packets() -> None:
    pair = PeerPair()
    for i in range(130):
        pair.send("a", i.to_bytes(2, "big"))
    assert pair.a.drops["staged queue full"] == 2
    pair.deliver()
    assert len(pair.delivered_to_b) == 128
    assert pair.delivered_to_b[0] == ipv4_packet(A_IP, B_IP, (2).to_bytes(2, "big"))


# --- replay and flood protection -----------------------------------------------------


def test_replayed_initiation_is_dropped_as_replayed() -> None:
    pair = PeerPair()
    pair.handshake()
    initiation = pair.sent("a->b", INIT)[0]
    next_before = pair.b_peer.next
    current_before = pair.b_peer.current
    pair.advance(30)
    pair.inject("b", initiation)
    assert pair.b.drops["replayed or old initiation timestamp"] == 1
    assert pair.b.transmits == []
    assert pair.b_peer.current is current_before and pair.b_peer.next is next_before


def test_initiation_with_an_older_timestamp_is_rejected_and_a_newer_one_accepted() -> None:
    pair = PeerPair()
    pair.handshake()
    pair.advance(10)
    pair.wall -= 60  # the initiator's wall clock went backwards
    pair.inject("b", force_initiation(pair))
    assert pair.b.drops["replayed or old initiation timestamp"] == 1
    assert pair.b.transmits == []
    pair.advance(10)
    pair.wall += 120
    pair.inject("b", force_initiation(pair))
    assert [kind(d) for d, _ in pair.b.transmits] == [RESP]


def test_initiation_within_the_same_timestamp_granule_is_rejected() -> None:
    pair = PeerPair()
    pair.handshake()
    pair.advance(6)
    pair.wall = pair.wall - (pair.wall % 1)  # a whole second, then 1 ms later
    first = force_initiation(pair)
    pair.wall += 0.001  # TAI64N keeps only ~16 ms granules (whitened)
    pair.now += 0.5  # well clear of the flood limit
    second = force_initiation(pair)
    pair.inject("b", first)
    pair.inject("b", second)
    assert pair.b.drops["replayed or old initiation timestamp"] == 1


def test_initiation_flood_over_50_per_second_is_dropped() -> None:
    pair = PeerPair()
    pair.handshake()
    pair.now += 0.010  # 10 ms later on the monotonic clock ...
    pair.wall += 1.0  # ... with a fresh timestamp, so only the rate is wrong
    pair.inject("b", force_initiation(pair))
    assert pair.b.drops["initiation flood (over 50/s from one peer)"] == 1
    assert pair.b.transmits == []
    pair.now += 0.011  # 21 ms after the consumed one
    pair.wall += 1.0
    pair.inject("b", force_initiation(pair))
    assert [kind(d) for d, _ in pair.b.transmits] == [RESP]


def test_flooded_initiation_does_not_advance_the_timestamp() -> None:
    pair = PeerPair()
    pair.handshake()
    pair.now += 0.005
    pair.wall += 1.0
    flooded = force_initiation(pair)
    pair.inject("b", flooded)
    assert pair.b.drops["initiation flood (over 50/s from one peer)"] == 1
    pair.now += 1.0
    pair.inject("b", flooded)  # the same message, no longer a flood: accepted
    assert [kind(d) for d, _ in pair.b.transmits] == [RESP]


# --- authentication failures --------------------------------------------------------------


def test_wrong_psk_makes_the_response_fail_to_authenticate() -> None:
    pair = PeerPair()
    pair.b_peer.preshared_key = bytes(32)  # B is configured for another network
    pair.send("a", b"hi")
    pair.deliver()
    assert kinds(pair, "b->a") == [RESP]  # the initiation itself does not involve the PSK
    assert pair.a.drops["response does not authenticate"] == 1
    assert pair.a_peer.current is None
    assert list(pair.a_peer.staged) == [ipv4_packet(A_IP, B_IP, b"hi")]
    assert pair.delivered_to_b == []


def test_initiation_from_an_unknown_static_key_is_dropped() -> None:
    pair = PeerPair()
    stranger = Device(seeded_rng(99)(32), rng=seeded_rng(98))
    stranger_peer = stranger.add_peer(
        x25519_public(pair.b_private), preshared_key=PSK,
        allowed_ips=(ipaddress.ip_network(f"{B_IP}/32"),), endpoint=B_ADDR,
    )
    stranger_peer.send_handshake_initiation(pair.now, pair.wall)
    (initiation, _), = stranger.transmits
    pair.inject("b", initiation, source=("192.0.2.99", 51820))
    assert pair.b.drops["initiation from unknown key"] == 1
    assert pair.b.transmits == []


def test_initiation_for_another_responder_fails_mac1() -> None:
    pair = PeerPair()
    pair.send("a", b"hi")
    (initiation, _), = pair.a.transmits
    pair.inject("a", initiation)  # A is not the responder this was made for
    assert pair.a.drops["bad mac1"] == 1


@pytest.mark.parametrize("offset", [4, 8, 60, 100, 116, 131])
def test_initiation_with_bad_mac1_is_dropped_before_any_work(offset: int) -> None:
    pair = PeerPair()
    pair.send("a", b"hi")
    (initiation, _), = pair.a.transmits
    tampered = bytearray(initiation)
    tampered[offset] ^= 0x20
    pair.inject("b", bytes(tampered))
    assert pair.b.drops == {"bad mac1": 1}
    assert pair.b.transmits == [] and pair.b_peer.next is None


def test_response_with_bad_mac1_is_dropped() -> None:
    pair = PeerPair()
    pair.send("a", b"hi")
    pair.drop = lambda direction, d: direction == "b->a"
    pair.deliver()
    response = bytearray(pair.sent("b->a", RESP)[0])
    response[70] ^= 1  # inside mac1 (bytes 60..76)
    pair.inject("a", bytes(response))
    assert pair.a.drops == {"bad mac1": 1}
    assert pair.a_peer.current is None


def test_initiation_with_valid_mac1_but_corrupt_static_is_dropped() -> None:
    pair = PeerPair()
    pair.send("a", b"hi")
    (initiation, _), = pair.a.transmits
    tampered = bytearray(initiation)
    tampered[50] ^= 1  # encrypted static
    pair.inject("b", with_mac1(bytes(tampered), x25519_public(pair.b_private)))
    assert pair.b.drops == {"initiation does not authenticate": 1}


def test_initiation_with_low_order_ephemeral_is_dropped_not_raised() -> None:
    pair = PeerPair()
    pair.send("a", b"hi")
    (initiation, _), = pair.a.transmits
    tampered = initiation[:8] + bytes(32) + initiation[40:]  # the all-zero point
    pair.inject("b", with_mac1(tampered, x25519_public(pair.b_private)))
    assert pair.b.drops == {"initiation does not authenticate": 1}


def test_replayed_response_is_dropped() -> None:
    pair = PeerPair()
    pair.handshake()
    response = pair.sent("b->a", RESP)[0]
    current = pair.a_peer.current
    pair.inject("a", response)
    assert pair.a.drops == {"response without a pending initiation": 1}
    assert pair.a_peer.current is current


def test_response_to_an_unknown_index_is_dropped() -> None:
    pair = PeerPair()
    pair.send("a", b"hi")
    pair.drop = lambda direction, d: direction == "b->a"
    pair.deliver()
    response = bytearray(pair.sent("b->a", RESP)[0])
    response[8:12] = (int.from_bytes(response[8:12], "little") ^ 1).to_bytes(4, "little")
    pair.inject("a", with_mac1(bytes(response), x25519_public(pair.a_private)))
    assert pair.a.drops == {"response without a pending initiation": 1}


# --- cookies under load -------------------------------------------------------------------


def test_initiation_without_mac2_under_load_gets_a_cookie_reply() -> None:
    pair = PeerPair()
    pair.under_load = "b"
    pair.drop = lambda direction, d: direction == "a->b" and kind(d) == INIT and d[-16:] != bytes(16)
    pair.send("a", b"hi")
    initiation = pair.a.transmits[0][0]
    assert initiation[-16:] == bytes(16)  # no cookie yet: mac2 is zero
    pair.deliver()
    assert kinds(pair, "b->a") == [COOKIE]
    reply = pair.sent("b->a", COOKIE)[0]
    assert len(reply) == 64
    assert parse(reply).receiver == parse(initiation).sender
    assert pair.b.cookie_replies_sent == 1
    assert pair.b_peer.next is None and pair.b_peer.current is None
    assert pair.a.drops == {} and pair.b.drops == {}


def test_a_cookie_reply_makes_the_initiation_go_again_at_once_with_a_valid_mac2() -> None:
    # WireGuard waits REKEY_TIMEOUT (5 s) for the retry; a flooded peer is reached sooner
    # when the retry goes as soon as the cookie arrives (issue 17: within 5 s under a flood).
    pair = PeerPair()
    pair.under_load = "b"
    pair.send("a", b"hi")
    pair.deliver()
    retry = pair.sent("a->b", INIT)[1]
    assert retry[-16:] != bytes(16)
    assert pair.b.cookie_checker.check_mac2(retry, endpoint_bytes(A_ADDR), pair.now)
    assert kinds(pair, "b->a") == [COOKIE, RESP]
    assert pair.delivered_to_b == [ipv4_packet(A_IP, B_IP, b"hi")]
    assert pair.b.cookie_replies_sent == 1


def test_only_one_initiation_per_attempt_goes_again_for_a_cookie() -> None:
    # Anyone on the path can make a cookie reply: each earns at most one extra initiation
    # per initiation made otherwise, never a loop.
    pair = PeerPair()
    pair.under_load = "b"
    pair.drop = lambda direction, d: direction == "a->b" and kind(d) == INIT and d[-16:] != bytes(16)
    pair.send("a", b"hi")
    pair.deliver()  # the cookie came; the retry with mac2 was lost
    assert len(pair.sent("a->b", INIT)) == 2
    retry = pair.sent("a->b", INIT)[1]
    # A valid cookie reply to the retry too (as b, or anyone who saw the retry, can make):
    reply = pair.b.cookie_checker.create_reply(retry, parse(retry).sender, endpoint_bytes(A_ADDR), pair.now)
    pair.inject("a", reply)
    assert len(pair.sent("a->b", INIT)) == 2 and pair.a.drops == {}
    first_retry = pair.a_peer.t_retransmit
    assert first_retry is not None and first_retry - pair.now >= 5.0  # the timer's retry, as WireGuard's


def test_cookie_is_bound_to_the_source_address() -> None:
    pair = PeerPair()
    pair.under_load = "b"
    pair.send("a", b"hi")
    pair.deliver()
    pair.advance(6)
    retry = force_initiation(pair)
    pair.inject("b", retry, source=("192.0.2.77", 51820))  # A moved: the cookie does not fit
    assert [kind(d) for d, _ in pair.b.transmits] == [COOKIE]
    assert pair.b.cookie_replies_sent == 2


def test_response_without_mac2_under_load_gets_a_cookie_reply_too() -> None:
    pair = PeerPair()
    pair.under_load = "a"
    pair.drop = lambda direction, d: direction == "b->a" and kind(d) == RESP and d[-16:] != bytes(16)
    pair.send("a", b"hi")
    pair.deliver()  # (the response b sends again with mac2 is lost here)
    assert kinds(pair, "b->a") == [RESP, RESP]
    assert kinds(pair, "a->b") == [INIT, COOKIE]
    assert pair.a.cookie_replies_sent == 1
    assert pair.a_peer.current is None


def test_a_cookie_for_our_response_sends_it_again_at_once_with_a_valid_mac2() -> None:
    # The initiator is the one under load (its own handshake, while it is flooded): the
    # responder sends the same response again with mac2, rather than the pair waiting for
    # the initiator's retry after REKEY_TIMEOUT.
    pair = PeerPair()
    pair.under_load = "a"
    pair.send("a", b"hi")
    pair.deliver()
    assert kinds(pair, "b->a") == [RESP, RESP] and kinds(pair, "a->b")[:2] == [INIT, COOKIE]
    first, second = pair.sent("b->a", RESP)
    assert first[:60] == second[:60] and second[-16:] != bytes(16)  # the same response, now with mac2
    assert pair.a.cookie_checker.check_mac2(second, endpoint_bytes(B_ADDR), pair.now)
    assert pair.delivered_to_b == [ipv4_packet(A_IP, B_IP, b"hi")]
    assert pair.a.cookie_replies_sent == 1 and pair.a_peer.current is not None


def test_cookie_reply_for_an_unknown_index_is_dropped() -> None:
    pair = PeerPair()
    pair.under_load = "b"
    pair.send("a", b"hi")
    pair.drop = lambda direction, d: direction == "b->a"
    pair.deliver()
    reply = bytearray(pair.sent("b->a", COOKIE)[0])
    reply[4] ^= 1
    pair.inject("a", bytes(reply))
    assert pair.a.drops == {"cookie reply not for us": 1}


def test_forged_cookie_reply_is_dropped() -> None:
    pair = PeerPair()
    pair.under_load = "b"
    pair.send("a", b"hi")
    pair.drop = lambda direction, d: direction == "b->a"
    pair.deliver()
    reply = bytearray(pair.sent("b->a", COOKIE)[0])
    reply[40] ^= 1
    pair.inject("a", bytes(reply))
    assert pair.a.drops == {"cookie reply not for us": 1}
    pair.advance(6)
    assert force_initiation(pair)[-16:] == bytes(16)  # no cookie stored


def test_cookie_secret_rotates_after_120_seconds() -> None:
    pair = PeerPair()
    pair.under_load = "b"
    pair.send("a", b"hi")
    (initiation, _), = pair.a.transmits
    pair.a.transmits.clear()
    pair.inject("b", initiation)
    (reply, _), = pair.b.transmits
    pair.b.transmits.clear()
    pair.inject("a", reply)
    pair.a.transmits.clear()  # the retry with mac2 the reply made at once: not delivered here
    born = pair.now
    checker, source = pair.b.cookie_checker, endpoint_bytes(A_ADDR)

    pair.advance(119)
    message = force_initiation(pair)
    assert message[-16:] != bytes(16)
    assert checker.check_mac2(message, source, pair.now)
    # The same mac2 stops validating once the secret is older than 120 s.
    assert not checker.check_mac2(message, source, born + 120.5)

    # After rotation a new secret is in use: the old cookie is worthless.
    pair.now = born + 121
    pair.inject("b", message)
    assert pair.b.cookie_replies_sent == 2
    assert not checker.check_mac2(message, source, pair.now)


def test_initiator_stops_using_a_cookie_after_120_seconds() -> None:
    pair = PeerPair()
    pair.under_load = "b"
    pair.send("a", b"hi")
    (initiation, _), = pair.a.transmits
    pair.a.transmits.clear()
    pair.inject("b", initiation)
    (reply, _), = pair.b.transmits
    pair.b.transmits.clear()
    pair.inject("a", reply)
    pair.a.transmits.clear()  # the retry with mac2 the reply made at once: not delivered here
    pair.advance(119.9)
    assert force_initiation(pair)[-16:] != bytes(16)
    pair.advance(0.2)
    assert force_initiation(pair)[-16:] == bytes(16)


# --- loss of each handshake message ------------------------------------------------------


def drop_first(direction: str, message_type: int):
    dropped: list[bytes] = []

    def drop(way: str, datagram: bytes) -> bool:
        if not dropped and way == direction and kind(datagram) == message_type:
            dropped.append(datagram)
            return True
        return False

    return drop, dropped


@pytest.mark.parametrize("lost", [("a->b", INIT), ("b->a", RESP)], ids=["initiation", "response"])
def test_lost_handshake_message_is_recovered_by_the_retransmit_timer(lost: tuple[str, int]) -> None:
    pair = PeerPair()
    pair.drop, dropped = drop_first(*lost)
    start = pair.now
    pair.send("a", b"hi")
    pair.deliver()
    assert len(dropped) == 1
    assert pair.delivered_to_b == [] and pair.a_peer.current is None
    retry_at = pair.a_peer.t_retransmit
    assert 5.0 <= retry_at - start <= 5.334
    pair.run_until(retry_at - 0.001)
    assert len(pair.sent("a->b", INIT)) == 1  # nothing before the deadline
    pair.run_until(retry_at)
    assert len(pair.sent("a->b", INIT)) == 2
    assert pair.delivered_to_b == [ipv4_packet(A_IP, B_IP, b"hi")]
    assert pair.a_peer.t_retransmit is None and pair.a_peer.handshake_attempts == 0


def test_lost_confirmation_is_recovered_by_the_new_handshake_timer() -> None:
    # The confirming packet is A's first data packet. A believes the session is
    # up (its retransmit timer is stopped); B keeps the keypair in `next` and
    # stages its own traffic. A sent data and heard nothing back, so after
    # KEEPALIVE_TIMEOUT + REKEY_TIMEOUT (+ jitter) A starts a new handshake,
    # whose confirmation releases B's staged packet.
    pair = PeerPair()
    pair.drop, dropped = drop_first("a->b", DATA)
    start = pair.now
    pair.send("a", b"lost")
    pair.deliver()
    assert len(dropped) == 1 and pair.delivered_to_b == []
    assert pair.a_peer.current is not None and pair.a_peer.t_retransmit is None
    assert pair.b_peer.current is None and pair.b_peer.next is not None
    pair.advance(1)
    assert pair.send("b", b"reply") == 0
    assert pair.b.transmits == []  # rate-limited: B answered a handshake 1 s ago
    new_handshake = pair.a_peer.t_new_handshake
    assert 15.0 <= new_handshake - start <= 15.334
    pair.run_until(new_handshake)
    assert len(pair.sent("a->b", INIT)) == 2
    assert pair.delivered_to_a == [ipv4_packet(B_IP, A_IP, b"reply")]
    assert pair.b_peer.current is not None and pair.b_peer.next is None


def test_lost_confirmation_is_also_recovered_by_any_later_packet() -> None:
    pair = PeerPair()
    pair.drop, dropped = drop_first("a->b", DATA)
    pair.send("a", b"lost")
    pair.deliver()
    pair.advance(2)
    pair.send("a", b"second")
    pair.deliver()
    assert pair.delivered_to_b == [ipv4_packet(A_IP, B_IP, b"second")]
    assert pair.b_peer.current is not None and pair.b_peer.next is None


def test_simultaneous_initiations_converge_on_one_session() -> None:
    pair = PeerPair()
    pair.send("a", b"from a")
    pair.send("b", b"from b")
    pair.run_until(pair.now + 30)
    assert pair.delivered_to_b == [ipv4_packet(A_IP, B_IP, b"from a")]
    assert pair.delivered_to_a == [ipv4_packet(B_IP, A_IP, b"from b")]
    a_kp, b_kp = pair.a_peer.current, pair.b_peer.current
    assert a_kp.local_index == b_kp.remote_index and a_kp.remote_index == b_kp.local_index


def crossing_pair() -> tuple[PeerPair, Device, Device]:
    """Both sides have an initiation queued for the other, sent along the same path at the
    same moment; returns the pair and its devices, the smaller key's first."""
    pair = PeerPair()
    pair.send("a", b"from a")
    pair.send("b", b"from b")
    smaller, larger = sorted((pair.a, pair.b), key=lambda device: device.static_public)
    return pair, smaller, larger


def side(pair: PeerPair, device: Device) -> str:
    return "a" if device is pair.a else "b"


def test_initiations_crossing_on_one_path_complete_one_handshake_at_once() -> None:
    # Both sides initiate at the same moment along the same path (two daemons whose
    # ladders probe on the same tick). Each answering the other would discard its own
    # initiation, so both answers would be dropped and the pair would wait for a retry,
    # crossing again if the retries are in step. The smaller key's initiation goes ahead.
    pair, smaller, larger = crossing_pair()
    pair.deliver_once()  # the two initiations cross
    assert smaller.drops == {"initiation crossing ours (ours goes ahead)": 1} and not larger.drops
    pair.deliver()
    assert pair.delivered_to_b == [ipv4_packet(A_IP, B_IP, b"from a")]
    assert pair.delivered_to_a == [ipv4_packet(B_IP, A_IP, b"from b")]
    # Ours went once more to where theirs came from (for a first copy lost there): the
    # peer, having answered it, refuses the copy.
    assert len(pair.sent(f"{side(pair, smaller)}->{side(pair, larger)}", INIT)) == 2
    assert len(pair.sent(f"{side(pair, larger)}->{side(pair, smaller)}", INIT)) == 1  # no retry was needed
    assert larger.drops == {"replayed or old initiation timestamp": 1}
    kp = {"a": pair.a_peer.current, "b": pair.b_peer.current}
    assert (kp[side(pair, smaller)].initiator, kp[side(pair, larger)].initiator) == (True, False)
    assert kp["a"].local_index == kp["b"].remote_index and kp["a"].remote_index == kp["b"].local_index


def test_a_crossing_initiation_whose_copy_was_lost_is_sent_again_where_theirs_came_from() -> None:
    # The smaller key's first initiation is lost (the larger one's NAT had no mapping for
    # it yet); the larger's arrives, within the crossing window, and is left unanswered:
    # ours goes again at once to where theirs came from, and that one is answered.
    pair, smaller, larger = crossing_pair()
    lost = side(pair, smaller) + "->" + side(pair, larger)
    pair.drop, _ = drop_first(lost, INIT)
    began = pair.now
    pair.deliver()
    assert pair.delivered_to_b == [ipv4_packet(A_IP, B_IP, b"from a")]
    assert pair.delivered_to_a == [ipv4_packet(B_IP, A_IP, b"from b")]
    assert len(pair.sent(lost, INIT)) == 2 and pair.now == began  # no wait for a retry


def test_after_ours_went_ahead_in_vain_the_next_crossing_initiation_is_answered() -> None:
    # The larger key refuses every initiation of the smaller's (its clock is behind the
    # timestamps the larger has seen): ours going ahead makes no session, so the next
    # crossing is answered and the larger's handshake completes, one retry later.
    pair, smaller, larger = crossing_pair()
    larger_peer = pair.a_peer if larger is pair.a else pair.b_peer
    larger_peer.last_timestamp = b"\xff" * 12
    pair.deliver_once()
    assert smaller.drops["initiation crossing ours (ours goes ahead)"] == 1
    pair.run_until(pair.now + REKEY_TIMEOUT + 1.0)
    assert pair.a_peer.current is not None and pair.b_peer.current is not None
    assert pair.delivered_to_a and pair.delivered_to_b


def test_an_initiation_arriving_after_the_crossing_window_is_answered() -> None:
    # Ours went out on this path over CROSSING_WINDOW ago: had the peer got it, its answer
    # would be here; theirs is no crossing, and is answered as WireGuard answers it.
    pair, smaller, larger = crossing_pair()
    smaller.transmits.clear()  # the smaller key's initiation is lost on its way
    (initiation, _), = larger.transmits
    larger.transmits.clear()
    pair.advance(CROSSING_WINDOW)
    pair.inject(side(pair, smaller), initiation)
    assert not smaller.drops
    assert [kind(d) for d, _ in smaller.transmits] == [RESP]


def test_an_initiation_crossing_ours_on_another_path_gets_ours_sent_that_way() -> None:
    # Ours went one way (UDP, say, now cut, or an SSH link that is being closed because
    # both sides dialled), theirs came another, at the same moment: a crossing all the
    # same. Ours goes back the way theirs came, which works, and the peer answers it.
    pair, smaller, larger = crossing_pair()
    smaller.transmits.clear()  # the smaller key's initiation is lost on its way
    (initiation, _), = larger.transmits
    larger.transmits.clear()
    other_path = ("198.51.100.7", 2222)
    pair.inject(side(pair, smaller), initiation, source=other_path)
    assert smaller.drops == {"initiation crossing ours (ours goes ahead)": 1}
    assert [(kind(d), to) for d, to in smaller.transmits] == [(INIT, other_path)]
    (ours, _), = smaller.transmits
    smaller.transmits.clear()
    pair.inject(side(pair, larger), ours)
    assert [kind(d) for d, _ in larger.transmits] == [RESP]


def test_transport_header_counter_starts_at_zero_for_each_session() -> None:
    pair = PeerPair()
    pair.handshake()
    pair.advance(6)
    pair.a_peer.send_handshake_initiation(pair.now, pair.wall)
    pair.deliver()
    counters = [TRANSPORT_HEADER.unpack_from(d)[2] for d in pair.sent("a->b", DATA)]
    assert counters == [0, 0]


def test_a_cookie_reply_from_elsewhere_sends_nothing_anywhere() -> None:
    # A forged cookie reply with another source (anyone on the path can make one from the
    # mac1 it saw) must not make us send our handshake to an address of its choosing.
    pair = PeerPair()
    pair.under_load = "b"
    pair.drop = lambda direction, d: direction == "b->a"
    pair.send("a", b"hi")
    pair.deliver()
    initiation = pair.sent("a->b", INIT)[0]
    reply = pair.b.cookie_checker.create_reply(initiation, parse(initiation).sender, endpoint_bytes(A_ADDR), pair.now)
    pair.a.transmits.clear()
    pair.inject("a", reply, source=("203.0.113.66", 4444))
    assert pair.a.transmits == [] and len(pair.sent("a->b", INIT)) == 1
    # (The cookie itself is taken, as WireGuard takes one from any address: the retry after
    # REKEY_TIMEOUT carries it, and a wrong one only earns another cookie reply.)
