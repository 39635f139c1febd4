"""Hole punching, sans-IO (tunnelmesh/punch.py): the schedule of a punch, the port spray
towards a NAT that maps per destination (bounded in count and rate), and what the
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
    LOWEST_PORT, SCHEDULE, SPRAY_BATCH, SPRAY_PORTS, SPRAY_STEP, Punch, spray_targets, why_not_direct,
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
    punch = Punch(100.0, targets)
    sent = run(punch, 200.0)
    assert [round(at - 100.0, 3) for at, _, _ in sent] == list(SCHEDULE)
    assert all(candidates == targets and batch == () for _, candidates, batch in sent)
    assert punch.next_at is None


def test_steps_missed_while_late_go_out_once() -> None:
    punch = Punch(0.0, (("192.0.2.5", 51820),))
    candidates, _ = punch.due(1.0)  # the loop was busy: 0, 0.1, 0.3 and 0.7 are all due
    assert candidates == (("192.0.2.5", 51820),)
    assert punch.next_at == SCHEDULE[4]
    assert punch.due(1.2) == ((), ())


def test_the_easy_side_sprays_near_the_hard_sides_reflexive_port_bounded_in_count_and_rate() -> None:
    spray = spray_targets(EASY, HARD_PEER)
    host, port = HARD_PEER.reflexive[0]  # 40000: in the block 39936-40959
    assert len(spray) == SPRAY_PORTS - 1 == len(set(spray))  # the rest of the block
    assert (host, port) not in spray  # a candidate already
    assert spray[:4] == ((host, port + 1), (host, port - 1), (host, port + 2), (host, port - 2))  # nearest first
    assert {p for _, p in spray} | {port} == set(range(39936, 39936 + SPRAY_PORTS))
    assert all(h == host for h, _ in spray)
    two = spray_targets(EASY, PeerNat(ADDRESS_AND_PORT_DEPENDENT, reflexive=(("203.0.113.9", 40_000),
                                                                              ("203.0.113.10", 50_000))))
    assert len(two) == SPRAY_PORTS and {h for h, _ in two[:4]} == {"203.0.113.9", "203.0.113.10"}  # shared fairly

    punch = Punch(10.0, (HARD_PEER.reflexive[0],), spray)
    sent = run(punch, 100.0)
    batches = [(at, batch) for at, _, batch in sent if batch]
    assert [p for _, batch in batches for p in batch] == list(spray)  # every port once, in order
    assert max(len(batch) for _, batch in batches) <= SPRAY_BATCH
    times = [at for at, _ in batches]
    assert all(b - a >= SPRAY_STEP - 1e-9 for a, b in zip(times, times[1:]))  # spread over time: no burst
    assert times[-1] - times[0] >= (SPRAY_PORTS / SPRAY_BATCH - 1) * SPRAY_STEP - 1e-9
    assert punch.next_at is None


def test_no_spray_unless_only_the_peer_maps_per_destination() -> None:
    assert spray_targets(HARD, HARD_PEER) == ()  # two hard NATs: guessing cannot meet
    assert spray_targets(EASY, PeerNat(ENDPOINT_INDEPENDENT, ENDPOINT_INDEPENDENT, (("203.0.113.9", 1),))) == ()
    assert spray_targets(EASY, PeerNat(ADDRESS_AND_PORT_DEPENDENT)) == ()  # no reflexive port to start from
    assert spray_targets(None, HARD_PEER) != ()  # this node's NAT unknown yet: try
    low = spray_targets(EASY, PeerNat(ADDRESS_AND_PORT_DEPENDENT, reflexive=(("203.0.113.9", 1100),)))
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
    ports = [("203.0.113.9", 40_000 + i) for i in range(SPRAY_PORTS)]
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
