"""The anti-replay window at its exact boundaries (wireguard-go's replay.go:
a ring of 128 x 64 bits, 8128 counters behind the highest accepted), and the
rule that the window moves only for packets whose tag verified."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.support.wire import A_IP, B_IP, PeerPair, ipv4_packet
from tunnelmesh.wireguard.constants import REJECT_AFTER_MESSAGES, REPLAY_WINDOW
from tunnelmesh.wireguard.messages import TRANSPORT_HEADER
from tunnelmesh.wireguard.replay import ReplayWindow


def test_window_is_8128() -> None:
    assert REPLAY_WINDOW == 8128


def test_first_counter_zero_is_accepted_once() -> None:
    window = ReplayWindow()
    assert window.check_and_update(0) is True
    assert window.check_and_update(0) is False


def test_first_counter_may_be_anything_below_the_limit() -> None:
    window = ReplayWindow()
    assert window.check_and_update(123_456) is True
    assert window.check_and_update(123_456 - 8128) is True
    assert window.check_and_update(123_456 - 8129) is False


@pytest.mark.parametrize("highest", [8128, 8129, 10_000, 8192 * 3 + 63, 8192 * 3 + 64, 2**40 + 1, REJECT_AFTER_MESSAGES - 1])
def test_highest_minus_8128_is_accepted_and_highest_minus_8129_rejected(highest: int) -> None:
    window = ReplayWindow()
    assert window.check_and_update(highest)
    assert window.check_and_update(highest - 8129) is False
    assert window.check_and_update(highest - 8128) is True
    assert window.check_and_update(highest - 8128) is False  # now a duplicate


def test_counter_zero_falls_out_of_the_window_at_highest_8129() -> None:
    window = ReplayWindow()
    assert window.check_and_update(8129)
    assert window.check_and_update(0) is False
    assert window.check_and_update(1) is True


def test_duplicates_are_rejected_anywhere_in_the_window() -> None:
    window = ReplayWindow()
    for counter in range(0, 9000, 7):
        assert window.check_and_update(counter)
    for counter in range(9000 - 8128, 9000, 7):
        if counter % 7 == 0:
            assert window.check_and_update(counter) is False, counter


def test_reordering_within_the_window_is_accepted_once() -> None:
    counters = list(range(8129))
    random.Random(7).shuffle(counters)
    window = ReplayWindow()
    assert all(window.check_and_update(c) for c in counters)
    assert not any(window.check_and_update(c) for c in counters)


def test_late_counters_in_the_oldest_block_are_still_tracked() -> None:
    window = ReplayWindow()
    assert window.check_and_update(8191)  # block 127: the ring's last slot
    # The window reaches back into block 0, but only as far as 8191 - 8128 = 63.
    assert window.check_and_update(62) is False
    assert window.check_and_update(63) is True
    assert window.check_and_update(63) is False


def test_small_advance_clears_only_the_blocks_it_passes() -> None:
    window = ReplayWindow()
    for counter in range(64, 128):  # block 1
        assert window.check_and_update(counter)
    assert window.check_and_update(200)  # block 3: blocks 2..3 cleared, 1 kept
    assert window.check_and_update(100) is False
    assert window.check_and_update(150) is True


def test_jump_beyond_the_ring_clears_stale_bits() -> None:
    window = ReplayWindow()
    for counter in range(128):  # blocks 0 and 1: ring slots 0 and 1
        assert window.check_and_update(counter)
    jump = 8192 * 2 + 100  # block 257: slot 1; more than 8192 ahead
    assert window.check_and_update(jump)
    # Slots 0 and 1 now stand for blocks 256 and 257: their old bits must be gone.
    assert window.check_and_update(8192 * 2 + 3) is True  # slot 0, bit 3
    assert window.check_and_update(8192 * 2 + 64 + 5) is True  # slot 1, bit 5
    assert window.check_and_update(3) is False  # far behind the window


def test_advance_by_exactly_one_ring_clears_the_reused_slot() -> None:
    window = ReplayWindow()
    assert window.check_and_update(3)  # block 0, slot 0
    assert window.check_and_update(8192 + 10)  # block 128, slot 0 again
    assert window.check_and_update(8192 + 3) is True  # same slot and bit as counter 3


def test_reject_after_messages_is_the_limit() -> None:
    window = ReplayWindow()
    assert window.check_and_update(REJECT_AFTER_MESSAGES) is False
    assert window.check_and_update(2**64 - 1) is False
    assert window.check_and_update(REJECT_AFTER_MESSAGES - 1) is True
    assert REJECT_AFTER_MESSAGES == 2**64 - 2**13 - 1


def test_rejected_over_limit_counter_does_not_move_the_window() -> None:
    window = ReplayWindow()
    assert window.check_and_update(5)
    assert window.check_and_update(2**64 - 1) is False
    assert window.check_and_update(6) is True


def test_explicit_limit_is_honoured() -> None:
    window = ReplayWindow()
    assert window.check_and_update(99, limit=100) is True
    assert window.check_and_update(100, limit=100) is False


# --- a model: the ring is exactly "seen set + 8128 behind the highest" ------------------


def _model_accepts(seen: set[int], highest: int | None, counter: int) -> bool:
    if counter >= REJECT_AFTER_MESSAGES or counter in seen:
        return False
    top = highest if highest is not None else 0
    return counter > top or top - counter <= REPLAY_WINDOW


counter_steps = st.lists(
    st.one_of(
        st.integers(-200, 200),  # reordering near the top
        st.integers(-8300, -8000),  # around the window's edge
        st.integers(8000, 20_000),  # jumps, some past the ring
    ),
    min_size=1,
    max_size=80,
)


@settings(max_examples=200, deadline=None)
@given(start=st.integers(0, 2**62), steps=counter_steps)
def test_window_matches_the_set_model(start: int, steps: list[int]) -> None:
    window = ReplayWindow()
    seen: set[int] = set()
    highest: int | None = None
    position = start
    for step in steps:
        counter = max(0, position + step)
        expected = _model_accepts(seen, highest, counter)
        assert window.check_and_update(counter) is expected, (counter, highest)
        if expected:
            seen.add(counter)
            highest = counter if highest is None else max(highest, counter)
            position = highest


# --- through a device: replay is checked after the tag -------------------------------


def _session() -> PeerPair:
    pair = PeerPair()
    pair.handshake()
    return pair


def _capture(pair: PeerPair, payload: bytes) -> bytes:
    assert pair.send("a", payload)
    (datagram, _), = pair.a.transmits
    pair.a.transmits.clear()
    return datagram


def test_replayed_transport_packet_is_dropped_and_counted() -> None:
    pair = _session()
    datagram = _capture(pair, b"once")
    assert pair.inject("b", datagram) > 0
    assert pair.inject("b", datagram) == 0
    assert pair.b.drops["replayed counter"] == 1
    assert pair.delivered_to_b == [ipv4_packet(A_IP, B_IP, b"once")]


def test_reordered_transport_packets_are_all_delivered() -> None:
    pair = _session()
    datagrams = [_capture(pair, bytes([i]) * 4) for i in range(5)]
    for datagram in reversed(datagrams):
        assert pair.inject("b", datagram) > 0
    assert pair.delivered_to_b == [ipv4_packet(A_IP, B_IP, bytes([i]) * 4) for i in reversed(range(5))]
    assert sum(pair.b.drops.values()) == 0


def test_late_packet_exactly_at_the_window_edge_through_a_device() -> None:
    pair = _session()
    older = _capture(pair, b"older")
    edge = _capture(pair, b"edge")
    edge_counter = TRANSPORT_HEADER.unpack_from(edge)[2]
    pair.a_peer.current.send_counter = edge_counter + 8128
    assert pair.inject("b", _capture(pair, b"newest")) > 0
    assert pair.inject("b", edge) > 0  # highest - 8128
    assert pair.inject("b", older) == 0  # highest - 8129
    assert pair.b.drops["replayed counter"] == 1


def test_forged_packet_with_huge_counter_does_not_move_the_window() -> None:
    pair = _session()
    kp = pair.b_peer.current
    forged = TRANSPORT_HEADER.pack(4, kp.local_index, 2**63) + bytes(48)
    assert pair.inject("b", forged) == 0
    assert pair.b.drops["authentication failed"] == 1
    # Had the window moved to 2**63, this low counter would now be "too old".
    assert pair.inject("b", _capture(pair, b"genuine")) > 0
    assert pair.b.drops["replayed counter"] == 0
    assert pair.delivered_to_b == [ipv4_packet(A_IP, B_IP, b"genuine")]


def test_forged_copy_of_a_future_counter_does_not_burn_it() -> None:
    pair = _session()
    genuine = _capture(pair, b"real")
    forged = bytearray(genuine)
    forged[-1] ^= 1  # same header and counter, bad tag
    assert pair.inject("b", bytes(forged)) == 0
    assert pair.inject("b", genuine) > 0
    assert pair.b.drops == {"authentication failed": 1}
