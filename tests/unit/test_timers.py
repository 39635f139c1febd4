"""Every timer rule, on a hand-stepped clock (wireguard-go's timers.go and the
keepKeyFresh* checks of send.go/receive.go). Deadlines are asserted exactly
where they are deterministic, and within [5, 5.334] s where jitter applies."""

from __future__ import annotations

import pytest

from tests.support.wire import A_IP, B_IP, PeerPair, ipv4_packet, kind
from tunnelmesh.wireguard import HandshakeGaveUp, KeysZeroed
from tunnelmesh.wireguard.constants import (
    KEEPALIVE_TIMEOUT,
    MAX_HANDSHAKE_ATTEMPTS,
    REJECT_AFTER_MESSAGES,
    REJECT_AFTER_TIME,
    REKEY_AFTER_MESSAGES,
    REKEY_AFTER_TIME,
    REKEY_ON_RECEIVE_AGE,
    REKEY_TIMEOUT,
    ZERO_KEYS_AFTER,
)

INIT, RESP, COOKIE, DATA = 1, 2, 3, 4


def session(**kwargs) -> tuple[PeerPair, float]:
    """A confirmed session, A the initiator; returns the pair and the time it began."""
    pair = PeerPair(**kwargs)
    pair.handshake()
    return pair, pair.now


def queued(pair: PeerPair, side: str) -> list[int]:
    device = pair.a if side == "a" else pair.b
    return [kind(d) for d, _ in device.transmits]


def test_constants_are_the_whitepaper_values() -> None:
    assert (REKEY_AFTER_TIME, REJECT_AFTER_TIME, REKEY_TIMEOUT, KEEPALIVE_TIMEOUT) == (120, 180, 5, 10)
    assert REKEY_ON_RECEIVE_AGE == 165 and ZERO_KEYS_AFTER == 540
    assert REKEY_AFTER_MESSAGES == 2**60 and REJECT_AFTER_MESSAGES == 2**64 - 2**13 - 1
    assert MAX_HANDSHAKE_ATTEMPTS == 18


# --- rekeying on send ------------------------------------------------------------------


def test_initiator_rekeys_on_send_once_the_session_is_120_seconds_old() -> None:
    pair, start = session()
    pair.at(start + 119.999)
    assert pair.send("a", b"x") > 0
    assert queued(pair, "a") == [DATA]
    pair.a.transmits.clear()
    pair.at(start + REKEY_AFTER_TIME)
    assert pair.send("a", b"y") > 0  # the data still goes out on the old session
    assert sorted(queued(pair, "a")) == [INIT, DATA]


def test_responder_never_rekeys_on_the_age_of_its_sending_key() -> None:
    pair, start = session()
    for age in (120.0, 150.0, 179.9):
        pair.at(start + age)
        assert pair.send("b", b"x") > 0
        assert queued(pair, "b") == [DATA]
        pair.b.transmits.clear()


def test_initiator_rekeys_after_rekey_after_messages() -> None:
    pair, _ = session()
    pair.advance(6)  # past the rate limit of the first handshake
    kp = pair.a_peer.current
    kp.send_counter = REKEY_AFTER_MESSAGES - 2
    pair.send("a", b"x")
    assert queued(pair, "a") == [DATA]
    pair.send("a", b"y")  # the 2^60th message
    assert sorted(queued(pair, "a")) == [INIT, DATA, DATA]
    pair.deliver()
    assert pair.delivered_to_b == [ipv4_packet(A_IP, B_IP, b"x"), ipv4_packet(A_IP, B_IP, b"y")]
    assert pair.a_peer.current is not kp and pair.a_peer.previous is kp


def test_responder_rekeys_after_rekey_after_messages() -> None:
    pair, _ = session()
    pair.advance(6)
    kp = pair.b_peer.current
    kp.send_counter = REKEY_AFTER_MESSAGES - 1
    pair.send("b", b"x")
    assert sorted(queued(pair, "b")) == [INIT, DATA]
    pair.deliver()
    assert pair.delivered_to_a == [ipv4_packet(B_IP, A_IP, b"x")]
    new = pair.b_peer.current
    assert new is not kp and new.initiator and new.send_counter == 1  # B's keepalive on it


def test_sending_is_refused_at_reject_after_time() -> None:
    pair, start = session()
    pair.at(start + REJECT_AFTER_TIME - 0.001)
    assert pair.send("b", b"last") > 0
    pair.b.transmits.clear()
    pair.at(start + REJECT_AFTER_TIME)
    assert pair.send("b", b"late") == 0
    assert list(pair.b_peer.staged) == [ipv4_packet(B_IP, A_IP, b"late")]
    assert queued(pair, "b") == [INIT]  # staged, and a handshake started


def test_staged_packet_waits_for_the_new_session_after_reject_after_time() -> None:
    pair, start = session()
    pair.at(start + REJECT_AFTER_TIME)
    assert pair.send("a", b"late") == 0
    assert queued(pair, "a") == [INIT]
    pair.deliver()
    assert pair.delivered_to_b == [ipv4_packet(A_IP, B_IP, b"late")]
    assert pair.a_peer.current.created == pair.now


def test_staged_since_is_when_the_first_of_the_waiting_packets_was_staged() -> None:
    # The session's ladder takes staged packets for unanswered traffic from this time.
    pair, start = session()
    pair.drop = lambda direction, datagram: True
    pair.at(start + REJECT_AFTER_TIME)
    pair.send("a", b"first")
    pair.advance(2)
    pair.send("a", b"second")
    assert len(pair.a_peer.staged) == 2 and pair.a_peer.staged_since == start + REJECT_AFTER_TIME
    pair.a_peer.abandon_handshake()
    pair.advance(1)
    pair.send("a", b"again")
    assert pair.a_peer.staged_since == pair.now  # a new wait


def test_abandoning_the_handshake_forgets_data_sent_unanswered() -> None:
    # Data sent before the ladder's search gave up starts no handshake later (only new
    # traffic does), and no retries go on.
    pair, _ = session()
    pair.advance(1)
    pair.drop = lambda direction, datagram: True
    pair.send("a", b"into the void")
    assert pair.a_peer.t_new_handshake is not None
    pair.a_peer.abandon_handshake()
    assert (pair.a_peer.t_new_handshake, pair.a_peer.t_retransmit) == (None, None)
    pair.a.transmits.clear()
    pair.advance(KEEPALIVE_TIMEOUT + REKEY_TIMEOUT + 1)
    pair.tick()
    assert INIT not in queued(pair, "a")


def test_sending_is_refused_at_reject_after_messages() -> None:
    pair, _ = session()
    pair.advance(6)
    kp = pair.a_peer.current
    kp.send_counter = REJECT_AFTER_MESSAGES - 1
    assert pair.send("a", b"last") > 0  # counter 2^64 - 2^13 - 2 is still usable
    assert sorted(queued(pair, "a")) == [INIT, DATA]
    pair.a.transmits.clear()
    assert pair.send("a", b"refused") == 0
    assert list(pair.a_peer.staged) == [ipv4_packet(A_IP, B_IP, b"refused")]
    assert pair.a.transmits == []  # the rekey already went out: rate-limited
    assert kp.send_counter == REJECT_AFTER_MESSAGES


def test_last_usable_counter_is_accepted_by_the_receiver() -> None:
    pair, _ = session()
    pair.a_peer.current.send_counter = REJECT_AFTER_MESSAGES - 1
    pair.send("a", b"last")
    pair.a.transmits[:] = [t for t in pair.a.transmits if kind(t[0]) == DATA]
    pair.deliver()
    assert pair.delivered_to_b == [ipv4_packet(A_IP, B_IP, b"last")]


def test_receiving_on_a_keypair_older_than_180_seconds_is_dropped() -> None:
    pair, start = session()
    pair.send("a", b"early")
    pair.send("a", b"late")
    (early, _), (late, _) = pair.a.transmits
    pair.a.transmits.clear()
    pair.at(start + REJECT_AFTER_TIME - 0.001)
    assert pair.inject("b", early) > 0
    pair.at(start + REJECT_AFTER_TIME)
    assert pair.inject("b", late) == 0
    assert pair.b.drops == {"keypair expired": 1}


# --- rekeying on receive -------------------------------------------------------------------


def test_initiator_rekeys_on_receive_after_165_seconds_once() -> None:
    pair, start = session()
    pair.at(start + REKEY_ON_RECEIVE_AGE)
    pair.send("b", b"at 165")
    pair.deliver_once()
    assert queued(pair, "a") == []  # not older than 165 s yet
    pair.at(start + REKEY_ON_RECEIVE_AGE + 0.5)
    pair.send("b", b"after 165")
    pair.deliver_once()
    assert queued(pair, "a") == [INIT]
    assert pair.a_peer.sent_last_minute_handshake is True
    pair.a.transmits.clear()  # lost
    pair.at(start + 172)  # past the 5 s rate limit
    pair.send("b", b"again")
    pair.deliver_once()
    assert queued(pair, "a") == []  # acted on once only
    assert len(pair.delivered_to_a) == 3


def test_responder_does_not_rekey_on_receive() -> None:
    pair, start = session()
    pair.at(start + 170)
    pair.send("a", b"x")
    pair.a.transmits[:] = [t for t in pair.a.transmits if kind(t[0]) == DATA]  # drop A's own rekey
    pair.deliver_once()
    assert pair.delivered_to_b == [ipv4_packet(A_IP, B_IP, b"x")]
    assert queued(pair, "b") == []
    assert pair.b_peer.sent_last_minute_handshake is False


def test_last_minute_flag_is_cleared_by_a_completed_handshake() -> None:
    pair, start = session()
    pair.at(start + 166)
    pair.send("b", b"x")
    pair.deliver()
    assert len(pair.sent("a->b", INIT)) == 2
    assert pair.a_peer.sent_last_minute_handshake is False
    assert pair.a_peer.current.created == start + 166


# --- retransmission and giving up ----------------------------------------------------------


def test_initiation_is_retried_every_5_seconds_plus_jitter_20_times_then_given_up() -> None:
    pair = PeerPair()
    pair.drop = lambda direction, datagram: True  # B is unreachable
    pair.send("a", b"hi")
    sent_at = [pair.now]
    while True:
        deadline = pair.a.get_timer()
        assert deadline == pair.a_peer.t_retransmit
        assert 5.0 <= deadline - sent_at[-1] <= 5.334
        pair.at(deadline)
        pair.tick()
        pair.deliver()
        if pair.a_peer.t_retransmit is None:
            break
        sent_at.append(pair.now)
    assert len(pair.sent("a->b", INIT)) == len(sent_at) == 20
    assert list(pair.a.events) == [HandshakeGaveUp(pair.a_peer)]
    assert len(pair.a_peer.staged) == 0
    assert pair.a_peer.t_zero_keys == pair.now + ZERO_KEYS_AFTER
    # Nothing more goes out until new traffic asks for a handshake.
    pair.run_until(pair.now + 100)
    assert len(pair.sent("a->b", INIT)) == 20


def test_new_traffic_after_giving_up_starts_a_fresh_round_of_attempts() -> None:
    pair = PeerPair()
    pair.drop = lambda direction, datagram: True
    pair.send("a", b"hi")
    pair.run_until(pair.now + 120)
    assert isinstance(pair.a.events[-1], HandshakeGaveUp)
    pair.drop = lambda direction, datagram: False
    pair.send("a", b"again")
    assert pair.a_peer.handshake_attempts == 0
    pair.deliver()
    assert pair.delivered_to_b == [ipv4_packet(A_IP, B_IP, b"again")]


def test_retry_counter_counts_each_retransmission() -> None:
    pair = PeerPair()
    pair.drop = lambda direction, datagram: True
    pair.send("a", b"hi")
    for attempt in (1, 2, 3):
        pair.at(pair.a_peer.t_retransmit)
        pair.tick()
        assert pair.a_peer.handshake_attempts == attempt


def test_retransmit_timer_is_not_fired_before_its_deadline() -> None:
    pair = PeerPair()
    pair.send("a", b"hi")
    pair.a.transmits.clear()
    pair.at(pair.a_peer.t_retransmit - 0.001)
    pair.tick()
    assert pair.a.transmits == []
    pair.advance(0.001)
    pair.tick()
    assert queued(pair, "a") == [INIT]


def test_no_second_initiation_within_rekey_timeout() -> None:
    pair = PeerPair()
    first = pair.now
    pair.a_peer.send_handshake_initiation(pair.now, pair.wall)
    pair.at(first + REKEY_TIMEOUT - 0.001)
    pair.a_peer.send_handshake_initiation(pair.now, pair.wall)
    pair.send("a", b"x")
    assert queued(pair, "a") == [INIT]
    pair.at(first + REKEY_TIMEOUT)
    pair.a_peer.send_handshake_initiation(pair.now, pair.wall)
    assert queued(pair, "a") == [INIT, INIT]


# --- zeroing keys ----------------------------------------------------------------------------


def test_keys_are_zeroed_540_seconds_after_the_last_session() -> None:
    pair, start = session()
    confirmation = pair.sent("a->b", DATA)[0]  # a packet on the zeroed session
    assert pair.a.get_timer() == start + ZERO_KEYS_AFTER
    assert pair.b.get_timer() == start + ZERO_KEYS_AFTER
    pair.at(start + ZERO_KEYS_AFTER - 0.001)
    pair.tick()
    assert pair.a_peer.current is not None and not any(isinstance(e, KeysZeroed) for e in pair.a.events)
    pair.at(start + ZERO_KEYS_AFTER)
    pair.tick()
    assert pair.a.events[-1] == KeysZeroed(pair.a_peer)
    assert pair.b.events[-1] == KeysZeroed(pair.b_peer)
    assert (pair.a_peer.previous, pair.a_peer.current, pair.a_peer.next) == (None, None, None)
    assert pair.a._index == {} and pair.b._index == {}
    assert pair.inject("b", confirmation) == 0
    assert pair.b.drops == {"unknown receiver index": 1}
    assert pair.a.get_timer() is None
    # A new packet is staged and starts a handshake again.
    assert pair.send("a", b"after") == 0
    assert queued(pair, "a") == [INIT]
    pair.deliver()
    assert pair.delivered_to_b == [ipv4_packet(A_IP, B_IP, b"after")]


def test_a_new_session_postpones_zeroing() -> None:
    pair, start = session()
    pair.at(start + 300)
    pair.a_peer.send_handshake_initiation(pair.now, pair.wall)
    pair.deliver()
    assert pair.a.get_timer() == start + 300 + ZERO_KEYS_AFTER
    pair.at(start + ZERO_KEYS_AFTER)
    pair.tick()
    assert pair.a_peer.current is not None and pair.a.events.count(KeysZeroed(pair.a_peer)) == 0


def test_giving_up_zeroes_residue_540_seconds_later() -> None:
    pair = PeerPair()
    pair.drop = lambda direction, datagram: True
    pair.send("a", b"hi")
    pair.run_until(pair.now + 120)
    gave_up_at = pair.a_peer.t_zero_keys - ZERO_KEYS_AFTER
    pair.run_until(gave_up_at + ZERO_KEYS_AFTER)
    assert pair.a.events[-1] == KeysZeroed(pair.a_peer)
    assert pair.a._index == {}


# --- keepalives ------------------------------------------------------------------------------


@pytest.mark.parametrize("timeout", [KEEPALIVE_TIMEOUT, 1.0], ids=["WireGuard's 10 s", "the ladder's 1 s"])
def test_passive_keepalive_after_data_when_nothing_was_sent_back(timeout: float) -> None:
    pair, _ = session()
    pair.b_peer.keepalive_timeout = timeout
    pair.advance(1)
    received_at = pair.now
    pair.send("a", b"ping")
    pair.deliver()
    assert pair.b_peer.t_send_keepalive == received_at + timeout
    pair.at(received_at + timeout - 0.001)
    pair.tick()
    assert pair.b.transmits == []
    pair.at(received_at + timeout)
    pair.tick()
    (keepalive, _), = pair.b.transmits
    assert (kind(keepalive), len(keepalive)) == (DATA, 32)
    pair.deliver()
    assert pair.delivered_to_a == []
    assert pair.b_peer.t_send_keepalive is None
    assert pair.a_peer.t_new_handshake is None  # the keepalive answered A's data


def test_no_passive_keepalive_when_data_was_sent_back() -> None:
    pair, _ = session()
    pair.advance(1)
    pair.send("a", b"ping")
    pair.deliver()
    pair.advance(3)
    pair.send("b", b"pong")
    pair.deliver()
    assert pair.b_peer.t_send_keepalive is None
    pair.run_until(pair.now + 60)
    assert len(pair.sent("b->a", DATA)) == 1  # the pong only
    assert pair.delivered_to_a == [ipv4_packet(B_IP, A_IP, b"pong")]


def test_keepalive_is_not_sent_for_received_keepalives() -> None:
    pair, start = session()  # B received A's confirming keepalive
    assert pair.b_peer.t_send_keepalive is None
    pair.run_until(start + 60)
    assert pair.sent("b->a", DATA) == []


def test_more_data_while_a_keepalive_is_pending_asks_for_another() -> None:
    pair, _ = session()
    pair.advance(1)
    first = pair.now
    pair.send("a", b"one")
    pair.deliver()
    pair.advance(2)
    pair.send("a", b"two")
    pair.deliver()
    assert pair.b_peer.t_send_keepalive == first + KEEPALIVE_TIMEOUT  # not pushed back
    assert pair.b_peer.need_another_keepalive is True
    pair.at(first + KEEPALIVE_TIMEOUT)
    pair.tick()
    assert queued(pair, "b") == [DATA]
    assert pair.b_peer.t_send_keepalive == first + 2 * KEEPALIVE_TIMEOUT
    assert pair.b_peer.need_another_keepalive is False


def test_persistent_keepalive_fires_after_each_interval_of_silence() -> None:
    pair, start = session(persistent_keepalive=25)
    assert pair.a_peer.t_persistent_keepalive == start + 25
    assert pair.a.get_timer() == start + 25
    pair.at(start + 25)
    pair.tick()
    (keepalive, _), = pair.a.transmits
    assert len(keepalive) == 32
    assert pair.a_peer.t_persistent_keepalive == start + 50
    pair.a.transmits.clear()
    pair.b.transmits.clear()
    # Any authenticated traffic pushes the next one back.
    pair.at(start + 40)
    pair.send("a", b"data")
    assert pair.a_peer.t_persistent_keepalive == start + 65


def test_persistent_keepalive_keeps_going_without_any_traffic() -> None:
    pair, start = session(persistent_keepalive=25)
    pair.drop = lambda direction, datagram: direction == "b->a"
    pair.run_until(start + 101)
    keepalives = [d for d in pair.sent("a->b", DATA) if len(d) == 32]
    assert len(keepalives) == 1 + 4  # the confirmation, then at 25, 50, 75, 100


def test_no_persistent_keepalive_when_disabled() -> None:
    pair, start = session()
    assert pair.a_peer.t_persistent_keepalive is None
    pair.run_until(start + 100)
    assert len(pair.sent("a->b", DATA)) == 1  # only the confirmation


# --- new handshake when the peer goes quiet ------------------------------------------------


def test_new_handshake_15_seconds_after_unanswered_data() -> None:
    pair, _ = session()
    pair.advance(1)
    sent_at = pair.now
    pair.drop = lambda direction, datagram: True
    pair.send("a", b"into the void")
    deadline = pair.a_peer.t_new_handshake
    assert 15.0 <= deadline - sent_at <= 15.334
    pair.advance(4)
    pair.send("a", b"more")
    assert pair.a_peer.t_new_handshake == deadline  # not pushed back by more data
    pair.a.transmits.clear()
    pair.at(deadline - 0.001)
    pair.tick()
    assert pair.a.transmits == []
    pair.at(deadline)
    pair.tick()
    assert queued(pair, "a") == [INIT]


def test_answer_within_15_seconds_cancels_the_new_handshake() -> None:
    pair, _ = session()
    pair.advance(1)
    pair.send("a", b"ping")
    pair.deliver()
    assert pair.a_peer.t_new_handshake is not None
    pair.advance(3)
    pair.send("b", b"pong")
    pair.deliver()
    assert pair.a_peer.t_new_handshake is None
    pair.run_until(pair.now + 30)
    assert len(pair.sent("a->b", INIT)) == 1


def test_keepalives_do_not_arm_the_new_handshake_timer() -> None:
    pair, _ = session(persistent_keepalive=25)
    pair.drop = lambda direction, datagram: True
    pair.run_until(pair.now + 30)
    assert pair.a_peer.t_new_handshake is None
    assert len(pair.sent("a->b", INIT)) == 1


# --- get_timer -------------------------------------------------------------------------------


def test_get_timer_is_the_earliest_deadline() -> None:
    pair, start = session(persistent_keepalive=25)
    pair.advance(2)
    pair.send("b", b"data")
    pair.deliver()
    # A: zero keys at 540, persistent at 2 + 25, passive keepalive at 2 + 10.
    peer = pair.a_peer
    assert peer.t_zero_keys == start + 540
    assert peer.t_persistent_keepalive == start + 27
    assert peer.t_send_keepalive == start + 12
    assert peer.get_timer() == pair.a.get_timer() == start + 12
    pair.at(start + 12)
    pair.tick()
    assert peer.get_timer() == start + 12 + 25  # the keepalive re-armed the persistent one


def test_get_timer_is_none_for_an_idle_peer() -> None:
    pair = PeerPair()
    assert pair.a.get_timer() is None and pair.a_peer.get_timer() is None
