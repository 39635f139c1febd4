"""Hole punching, sans-IO (tunnelmesh/punch.py): the schedule of a punch, the port spray
towards a NAT that maps per destination (the predicted port block first, then a sweep of
the range; bounded in count and rate), and what the
protocol core gives it: a probe the core does not retry on the path in use, and a spray
that grows no bookkeeping per port. The map reply's notices parse (hypothesis)."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from tests.support.wire import B_ADDR, PeerPair, kind
from tunnelmesh.coordinator.punch import INBOX, take_notices
from tunnelmesh.membership import b64
from tunnelmesh.nat.report import (
    ADDRESS_AND_PORT_DEPENDENT, ENDPOINT_INDEPENDENT, NONE, NatReport, PeerNat, ServerResult,
)
from tunnelmesh.punch import (
    BLOCK, KEEP_OPEN_SCHEDULE, LOWEST_PORT, SCHEDULE, SPRAY_BATCH, SPRAY_LIMIT, SPRAY_STEP, SWEEP_EVERY, SWEEP_SECONDS,
    Punch, keeps_open, spray_targets, sweep_due, why_not_direct,
)
from tunnelmesh.wireguard.constants import REKEY_TIMEOUT

INIT = 1
HARD_PEER = PeerNat(ADDRESS_AND_PORT_DEPENDENT, ADDRESS_AND_PORT_DEPENDENT, (("203.0.113.9", 40_000),))
EASY = NatReport(checked_at=1.0, mapping=ENDPOINT_INDEPENDENT, filtering=ADDRESS_AND_PORT_DEPENDENT,
                 reflexive=(("198.51.100.2", 51820),), servers=(ServerResult("x:3478", ("198.51.100.2", 51820), 1.0),))
HARD = NatReport(checked_at=1.0, mapping=ADDRESS_AND_PORT_DEPENDENT, filtering=ADDRESS_AND_PORT_DEPENDENT,
                 reflexive=(("198.51.100.2", 40_123),), servers=EASY.servers)


def run(punch: Punch, until: float) -> list[tuple[float, tuple[Any, ...], tuple[Any, ...]]]:
    """Drive `punch` as the session's timer does: at each `next_at`, until it is over."""
    sent = []
    while punch.next_at is not None and punch.next_at <= until:
        at = punch.next_at
        candidates, batch = punch.due(at)
        assert candidates or batch, f"woken at {at} for nothing"
        sent.append((at, candidates, batch))
    return sent


def test_candidates_go_out_on_the_schedule_and_the_punch_ends() -> None:
    targets = (("192.0.2.5", 51820), ("198.51.100.7", 51820))
    punch = Punch(100.0, 100.0, targets)
    sent = run(punch, 200.0)
    assert [round(at - 100.0, 3) for at, _, _ in sent] == list(SCHEDULE)
    assert all(candidates == targets and batch == () for _, candidates, batch in sent)
    assert punch.next_at is None
    # Longer than WireGuard's rate limit: a side that must wait for it still overlaps the other.
    assert SCHEDULE[-1] > REKEY_TIMEOUT + 1


def test_steps_missed_while_late_go_out_once() -> None:
    punch = Punch(0.0, 0.0, (("192.0.2.5", 51820),))
    candidates, _ = punch.due(1.0)  # the loop was busy: 0, 0.1, 0.3 and 0.7 are all due
    assert candidates == (("192.0.2.5", 51820),)
    assert punch.next_at == SCHEDULE[4]
    assert punch.due(1.2) == ((), ())


def test_the_schedule_is_anchored_at_the_notice_so_both_sides_windows_overlap() -> None:
    """One side may send at once, the other only when WireGuard's rate limit ends (up to
    REKEY_TIMEOUT later), its notice a round trip later still: they overlap."""
    target = (("192.0.2.5", 51820),)
    prompt = [at for at, _, _ in run(Punch(0.0, 0.0, target), 100.0)]
    held = [at for at, _, _ in run(Punch(0.5, 0.5 + REKEY_TIMEOUT, target), 100.0)]
    assert held[0] == 0.5 + REKEY_TIMEOUT  # the steps that fell in the wait: once, when it ends
    assert held[-1] == 0.5 + SCHEDULE[-1]  # and the rest on the notice's schedule
    assert held[0] < prompt[-1]  # both send at once for a while


def test_the_easy_side_sprays_the_block_first_then_the_range_bounded_in_count_and_rate() -> None:
    host, port = HARD_PEER.reflexive[0]  # 40000: in the block 39936-40959
    block = list(spray_targets(EASY, HARD_PEER))
    assert len(block) == BLOCK - 1 == len(set(block))  # the rest of the block, each once
    assert (host, port) not in block  # a candidate already
    assert block[:4] == [(host, port + 1), (host, port - 1), (host, port + 2), (host, port - 2)]  # nearest first
    assert {p for _, p in block} | {port} == set(range(39936, 39936 + BLOCK))

    swept = list(spray_targets(EASY, HARD_PEER, sweep=True))
    assert swept[:len(block)] == block  # the prediction first
    assert len(swept) == len(set(swept)) <= SPRAY_LIMIT  # each once, bounded
    assert {p for _, p in swept} | {port} == set(range(LOWEST_PORT, 65536))  # the whole range, no privileged port
    rest = [p for _, p in swept[len(block):]]
    assert [abs(p - port) for p in rest] == sorted(abs(p - port) for p in rest)  # then nearest first

    punch = Punch(10.0, 10.0, (HARD_PEER.reflexive[0],), spray_targets(EASY, HARD_PEER, sweep=True))
    sent = run(punch, 1000.0)
    batches = [(at, batch) for at, _, batch in sent if batch]
    assert [a for _, batch in batches for a in batch] == swept  # every address once, in order
    assert max(len(batch) for _, batch in batches) <= SPRAY_BATCH
    times = [at for at, _ in batches]
    assert all(b - a >= SPRAY_STEP - 1e-9 for a, b in zip(times, times[1:]))  # at most SPRAY_BATCH per step
    assert times[-1] - times[0] >= (len(swept) / SPRAY_BATCH - 1) * SPRAY_STEP - 1e-9  # ~32 s: 2000 a second
    assert times[-1] - times[0] <= SWEEP_SECONDS
    assert punch.next_at is None


def test_a_spray_goes_on_in_the_next_punch() -> None:
    first = Punch(0.0, 0.0, (HARD_PEER.reflexive[0],), spray_targets(EASY, HARD_PEER, sweep=True))
    early = [a for _, _, batch in run(first, 5.0) for a in batch]
    assert len(early) < SPRAY_LIMIT // 2 and first.spraying
    second = Punch(5.05, 5.05, (HARD_PEER.reflexive[0],), first.spray_left())
    late = [a for _, _, batch in run(second, 1000.0) for a in batch]
    assert early + late == list(spray_targets(EASY, HARD_PEER, sweep=True))  # no gap, no repeat


def test_two_reflexive_addresses_each_get_their_block() -> None:
    two = list(spray_targets(EASY, PeerNat(ADDRESS_AND_PORT_DEPENDENT, reflexive=(("203.0.113.9", 40_000),
                                                                                  ("203.0.113.10", 50_000)))))
    assert len(two) == 2 * (BLOCK - 1) == len(set(two))
    assert {h for h, _ in two} == {"203.0.113.9", "203.0.113.10"}


def test_a_sweep_is_rare_and_the_hard_side_keeps_its_mapping_open_for_it() -> None:
    assert sweep_due(float("-inf"), 0.0, 20.0)  # never swept
    assert not sweep_due(100.0, 100.0 + SWEEP_EVERY * 20.0 - 1, 20.0)
    assert sweep_due(100.0, 100.0 + SWEEP_EVERY * 20.0, 20.0)
    assert keeps_open(HARD, PeerNat(ENDPOINT_INDEPENDENT, ADDRESS_AND_PORT_DEPENDENT, (("203.0.113.9", 51820),)))
    assert not keeps_open(HARD, HARD_PEER) and not keeps_open(EASY, PeerNat(ENDPOINT_INDEPENDENT))
    assert not keeps_open(HARD, PeerNat())  # the peer's NAT unknown: it will not spray
    # Every REPEAT seconds at most, for as long as the peer's sweep can last after its notice.
    gaps = [b - a for a, b in zip(KEEP_OPEN_SCHEDULE, KEEP_OPEN_SCHEDULE[1:])]
    assert max(gaps) <= 2.0 and KEEP_OPEN_SCHEDULE[-1] >= REKEY_TIMEOUT + SWEEP_SECONDS


def test_no_spray_unless_only_the_peer_maps_per_destination() -> None:
    assert list(spray_targets(HARD, HARD_PEER, sweep=True)) == []  # two hard NATs: guessing cannot meet
    easy_peer = PeerNat(ENDPOINT_INDEPENDENT, ENDPOINT_INDEPENDENT, (("203.0.113.9", 1),))
    assert list(spray_targets(EASY, easy_peer, sweep=True)) == []
    assert list(spray_targets(EASY, PeerNat(ADDRESS_AND_PORT_DEPENDENT), sweep=True)) == []  # no port to start from
    assert list(spray_targets(None, HARD_PEER)) != []  # this node's NAT unknown yet: try
    low = list(spray_targets(EASY, PeerNat(ADDRESS_AND_PORT_DEPENDENT, reflexive=(("203.0.113.9", 1100),))))
    assert {p for _, p in low} == set(range(LOWEST_PORT, 2048)) - {1100}  # no privileged port


def test_why_not_direct_in_words() -> None:
    assert why_not_direct(HARD, HARD_PEER) == "both behind NATs that map per destination"
    assert why_not_direct(EASY, HARD_PEER) is None
    assert why_not_direct(NatReport(checked_at=1.0, mapping=NONE), PeerNat()) == \
        "this node's UDP gets no answer from STUN servers"
    assert why_not_direct(None, HARD_PEER) is None


# --- what the core gives a punch ------------------------------------------------------------


def test_a_probe_for_a_better_path_is_not_retried_on_the_path_in_use() -> None:
    pair = PeerPair()
    pair.handshake()
    peer = pair.a_peer
    pair.advance(REKEY_TIMEOUT + 1)
    pair.a.transmits.clear()
    assert peer.send_probe((("203.0.113.50", 4000),), pair.now, pair.wall, retransmit=False)
    assert peer.t_retransmit is None  # nothing goes to the endpoint later
    pair.advance(REKEY_TIMEOUT * 3)
    pair.tick()
    assert [endpoint for _, endpoint in pair.a.transmits] == [("203.0.113.50", 4000)]

    # The ladder's search (no working path) keeps the core's retries.
    pair.advance(REKEY_TIMEOUT + 1)
    assert peer.send_probe((("203.0.113.50", 4000),), pair.now, pair.wall)
    assert peer.t_retransmit is not None


def test_a_spray_repeats_the_outstanding_initiation_and_notes_no_port() -> None:
    pair = PeerPair()
    peer = pair.a_peer
    assert not peer.spray([("203.0.113.9", 40_001)])  # nothing outstanding: nothing sent
    assert peer.send_probe((B_ADDR,), pair.now, pair.wall, retransmit=False)
    ((initiation, _),) = pair.a.transmits
    pair.a.transmits.clear()
    ports = [("203.0.113.9", 40_000 + i) for i in range(SPRAY_BATCH)]
    assert peer.spray(ports)
    assert pair.a.transmits == [(initiation, p) for p in ports]
    assert kind(initiation) == INIT
    assert list(peer._hs_sent_to) == [B_ADDR] and list(peer._hs_sent_once) == [B_ADDR]


# --- the map reply's notices (untrusted: the coordinator's word) ----------------------------


def test_notices_are_taken_out_of_the_reply() -> None:
    key = bytes(range(32))
    reply = {"version": 3, "punch": [{"peer": b64(key)}, {"peer": "short"}, {"peer": b64(key), "x": 1}, 7]}
    assert take_notices(reply) == ([key], 3)
    assert "punch" not in reply
    assert take_notices({"version": 3}) == ([], 0)
    assert take_notices({"punch": "all"}) == ([], 1)
    many = {"punch": [{"peer": b64(key)}] * (INBOX + 5)}
    assert take_notices(many) == ([key] * INBOX, 5)


@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=60),
                    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                    max_leaves=30))
def test_any_notices_give_keys_or_a_counted_drop(value: Any) -> None:
    reply = {"version": 1, "punch": value}
    keys, dropped = take_notices(reply)
    assert "punch" not in reply and all(len(k) == 32 for k in keys) and dropped >= 0
    assert len(keys) + dropped >= (len(value) if isinstance(value, list) else 1)
