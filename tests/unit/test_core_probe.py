"""What the protocol core gives the path selector: `Peer.send_probe` (an initiation on
chosen paths, within the REKEY_TIMEOUT rate limit), handshake messages answered and
confirmed the way they came, `HandshakeCompleted.source`, and where authenticated
messages come from (`NewSource`, `endpoint_rx_at`, `other_source`/`other_at`): the
core never moves `Peer.endpoint` itself.

Datagrams are carried by hand here (not `PeerPair.deliver`, which knows only
the two UDP addresses), so each test says which path a datagram took."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from tests.support.wire import A_ADDR, A_IP, B_ADDR, B_IP, PeerPair, ipv4_packet, kind
from tunnelmesh.wireguard import HandshakeCompleted, NewSource
from tunnelmesh.wireguard.constants import REKEY_TIMEOUT

INIT, RESP, DATA = 1, 2, 4
OTHER_UDP = ("198.51.100.7", 4242)


@dataclass(frozen=True)
class Link:
    """A stand-in for an SSH or relay link: an endpoint that is not a UDP address."""

    name: str


def take(pair: PeerPair, side: str) -> list[tuple[bytes, object]]:
    """Everything `side` has queued, removed from its queue."""
    device = pair.a if side == "a" else pair.b
    out = list(device.transmits)
    device.transmits.clear()
    return out


def carry(pair: PeerPair, side: str, source: object) -> list[tuple[bytes, object]]:
    """Move everything `side` queued to the other device, arriving from `source`
    (whatever endpoint it was queued for); returns what was carried."""
    moved = take(pair, side)
    for datagram, _ in moved:
        pair.inject("b" if side == "a" else "a", datagram, source=source)  # type: ignore[arg-type]
    return moved


def session() -> PeerPair:
    pair = PeerPair()
    pair.handshake()
    pair.a.events.clear()
    pair.b.events.clear()
    return pair


def data_from_a(pair: PeerPair) -> bytes:
    pair.send("a", b"payload")
    ((datagram, _),) = take(pair, "a")
    return datagram


def completed(pair: PeerPair, side: str) -> list[HandshakeCompleted]:
    device = pair.a if side == "a" else pair.b
    return [e for e in device.events if isinstance(e, HandshakeCompleted)]


# --- send_probe ------------------------------------------------------------------------


def test_a_probe_repeats_the_outstanding_initiation_to_every_endpoint() -> None:
    pair = PeerPair()
    pair.a_peer.send_handshake_initiation(pair.now, pair.wall)
    ((initiation, endpoint),) = take(pair, "a")
    assert (kind(initiation), endpoint) == (INIT, B_ADDR)
    pair.advance(REKEY_TIMEOUT - 0.5)
    endpoints = (B_ADDR, Link("ssh"), Link("relay"))
    assert pair.a_peer.send_probe(endpoints, pair.now, pair.wall)
    assert take(pair, "a") == [(initiation, e) for e in endpoints]


def test_a_probe_without_an_outstanding_initiation_starts_one() -> None:
    pair = PeerPair()
    endpoints = (B_ADDR, Link("ssh"))
    assert pair.a_peer.send_probe(endpoints, pair.now, pair.wall)
    sent = take(pair, "a")
    assert [e for _, e in sent] == list(endpoints)
    assert {d for d, _ in sent} == {sent[0][0]} and kind(sent[0][0]) == INIT
    assert pair.a_peer.last_sent_handshake == pair.now
    # It is a real handshake: B answers it and A completes.
    pair.inject("b", sent[0][0], source=A_ADDR)
    carry(pair, "b", B_ADDR)
    assert pair.a_peer.current is not None


def test_a_probe_after_the_rate_limit_starts_a_fresh_initiation() -> None:
    pair = PeerPair()
    pair.a_peer.send_probe((B_ADDR,), pair.now, pair.wall)
    ((first, _),) = take(pair, "a")
    pair.advance(REKEY_TIMEOUT)
    assert pair.a_peer.send_probe((B_ADDR, Link("ssh")), pair.now, pair.wall)
    ((second, _), (again, _)) = take(pair, "a")
    assert second == again and kind(second) == INIT and second != first
    assert pair.a_peer.last_sent_handshake == pair.now


@pytest.mark.parametrize("side", ["a", "b"], ids=["having initiated", "having answered"])
def test_a_probe_within_the_rate_limit_of_a_finished_handshake_is_held_back(side: str) -> None:
    pair = PeerPair()
    pair.a_peer.send_handshake_initiation(pair.now, pair.wall)
    carry(pair, "a", A_ADDR)  # B answers: that counts as B's handshake
    ((response, _),) = take(pair, "b")
    if side == "a":
        pair.inject("a", response, source=B_ADDR)  # A completes (and confirms)
        take(pair, "a")
    peer = pair.a_peer if side == "a" else pair.b_peer
    pair.advance(REKEY_TIMEOUT - 0.1)
    assert peer.send_probe((Link("ssh"),), pair.now, pair.wall) is False
    assert take(pair, side) == []
    pair.advance(0.1)
    assert peer.send_probe((Link("ssh"),), pair.now, pair.wall) is True


# --- responses go back the way the initiation came -------------------------------------------


@pytest.mark.parametrize("source", [OTHER_UDP, Link("ssh")], ids=["other UDP address", "link"])
def test_the_response_goes_to_the_initiations_source(source: object) -> None:
    pair = PeerPair()
    pair.a_peer.send_probe((source,), pair.now, pair.wall)
    carry(pair, "a", source)
    ((response, to),) = take(pair, "b")
    assert (kind(response), to) == (RESP, source)
    assert pair.b_peer.endpoint == A_ADDR  # answered there, not moved there


def test_a_probe_on_a_link_completes_there_and_is_confirmed_there() -> None:
    pair = PeerPair()
    a_end, b_end = Link("ssh to b"), Link("ssh from a")  # one link, as each side sees it
    pair.a_peer.send_probe((a_end,), pair.now, pair.wall)
    carry(pair, "a", b_end)
    carry(pair, "b", a_end)  # the response, back on the link
    assert completed(pair, "a") == [HandshakeCompleted(pair.a_peer, True, a_end)]
    # The confirming keepalive goes back the way the answer came, whatever the endpoint,
    # and it is B's proof.
    ((keepalive, to),) = take(pair, "a")
    assert (kind(keepalive), to) == (DATA, a_end)
    pair.inject("b", keepalive, source=b_end)
    assert completed(pair, "b") == [HandshakeCompleted(pair.b_peer, False, b_end)]
    assert (pair.a_peer.endpoint, pair.b_peer.endpoint) == (B_ADDR, A_ADDR)  # the caller moves them, not the core


def test_staged_packets_go_back_the_way_the_answer_came() -> None:
    pair = PeerPair()
    pair.a_peer.endpoint = None  # nowhere to send yet: the caller probes candidates
    pair.send("a", b"staged")
    assert take(pair, "a") == []
    pair.a_peer.send_probe((OTHER_UDP, B_ADDR), pair.now, pair.wall)
    ((initiation, _), _) = take(pair, "a")
    pair.inject("b", initiation, source=A_ADDR)
    carry(pair, "b", B_ADDR)
    ((staged, to),) = take(pair, "a")
    assert (kind(staged), to) == (DATA, B_ADDR) and pair.a_peer.endpoint is None


# --- where authenticated messages come from ---------------------------------------------------------


@pytest.mark.parametrize("source", [OTHER_UDP, Link("relay")], ids=["another UDP address", "a link"])
def test_a_message_from_elsewhere_is_reported_once_and_moves_nothing(source: object) -> None:
    pair = session()
    pair.advance(1)
    assert pair.inject("b", data_from_a(pair), source=source) > 0  # delivered all the same
    peer = pair.b_peer
    assert (peer.endpoint, peer.other_source, peer.other_at) == (A_ADDR, source, pair.now)
    assert [e for e in pair.b.events if isinstance(e, NewSource)] == [NewSource(peer, source)]
    pair.advance(1)
    pair.inject("b", data_from_a(pair), source=source)
    assert peer.other_at == pair.now and len([e for e in pair.b.events if isinstance(e, NewSource)]) == 1
    pair.inject("b", data_from_a(pair), source=A_ADDR)
    assert peer.endpoint_rx_at == pair.now and peer.other_source == source


def test_a_new_other_source_is_reported_again() -> None:
    pair = session()
    pair.inject("b", data_from_a(pair), source=OTHER_UDP)
    pair.inject("b", data_from_a(pair), source=Link("relay"))
    pair.inject("b", data_from_a(pair), source=OTHER_UDP)
    assert [e.source for e in pair.b.events if isinstance(e, NewSource)] == [OTHER_UDP, Link("relay"), OTHER_UDP]


def test_after_the_caller_moves_the_endpoint_a_former_source_is_reported_again() -> None:
    pair = session()
    pair.inject("b", data_from_a(pair), source=OTHER_UDP)
    peer = pair.b_peer
    peer.use_endpoint(OTHER_UDP)  # the caller followed it
    assert (peer.endpoint_rx_at, peer.other_source) == (pair.now, None)  # its messages count as the path's
    pair.b.events.clear()
    peer.use_endpoint(A_ADDR)  # and moved back (say, a handshake answered from there)
    pair.advance(1)
    pair.inject("b", data_from_a(pair), source=OTHER_UDP)
    assert list(pair.b.events) == [NewSource(peer, OTHER_UDP)]  # the peer is still there: said again


def test_a_udp_message_costs_no_call_of_the_callers_rule_while_udp_is_accepted() -> None:
    pair = session()
    asked: list[object] = []
    pair.b_peer.accepts = lambda source: asked.append(source) is None and not isinstance(source, tuple)
    assert pair.inject("b", data_from_a(pair), source=A_ADDR) > 0
    assert asked == []
    link = AuthenticatedLink("relay", pair.a.static_public)
    assert pair.inject("b", data_from_a(pair), source=link) > 0 and asked == [link]  # links are asked


def test_a_handshake_from_elsewhere_is_its_source_only() -> None:
    pair = session()
    pair.advance(REKEY_TIMEOUT)
    link = Link("ssh")
    pair.a_peer.send_probe((link,), pair.now, pair.wall)
    carry(pair, "a", link)
    assert (pair.b_peer.endpoint, pair.b_peer.other_source) == (A_ADDR, None)


# --- endpoint_rx_at -----------------------------------------------------------------------------


def test_endpoint_rx_at_follows_packets_from_the_endpoint_only() -> None:
    pair = session()
    peer = pair.b_peer
    pair.advance(2)
    pair.inject("b", data_from_a(pair), source=A_ADDR)
    heard = pair.now
    assert peer.endpoint_rx_at == heard
    pair.advance(2)
    pair.inject("b", data_from_a(pair), source=Link("ssh"))  # stray: not from the endpoint
    assert peer.endpoint_rx_at == heard
    forged = bytearray(data_from_a(pair))
    forged[-1] ^= 1
    pair.inject("b", bytes(forged), source=A_ADDR)  # not authenticated
    assert peer.endpoint_rx_at == heard
    pair.advance(1)
    pair.inject("b", data_from_a(pair), source=A_ADDR)
    assert peer.endpoint_rx_at == pair.now


# --- one-way loss on the path the initiation reaches first ----------------------------------------


def test_a_probe_completes_on_the_rung_that_works_when_the_first_path_loses_the_answer() -> None:
    pair = PeerPair()
    link = Link("ssh")
    pair.a_peer.send_probe((B_ADDR, link), pair.now, pair.wall)
    (via_udp, _), (via_link, _) = take(pair, "a")
    pair.inject("b", via_udp, source=A_ADDR)
    take(pair, "b")  # B's answer on UDP is lost (UDP works only from A to B)
    pair.advance(0.05)
    pair.inject("b", via_link, source=link)  # the same initiation, later, on the link
    answers = take(pair, "b")
    for response, _ in answers:
        pair.inject("a", response, source=link)
    assert completed(pair, "a") and completed(pair, "a")[0].source == link


def test_a_repeated_initiation_is_answered_again_once_per_new_path_and_only_briefly() -> None:
    pair = PeerPair()
    link = Link("ssh")
    pair.a_peer.send_probe((B_ADDR, link), pair.now, pair.wall)
    (via_udp, _), (via_link, _) = take(pair, "a")
    pair.inject("b", via_udp, source=A_ADDR)
    first = take(pair, "b")
    pair.inject("b", via_udp, source=A_ADDR)  # the same path again: a replay, dropped
    assert take(pair, "b") == [] and pair.b.drops["replayed or old initiation timestamp"] == 1
    pair.inject("b", via_link, source=link)
    assert take(pair, "b") == [(first[0][0], link)]  # the same answer, on the new path
    pair.inject("b", via_link, source=link)
    assert take(pair, "b") == []
    pair.inject("b", via_udp, source=("198.51.100.9", 4444))  # another UDP address: a replay, not a new rung
    assert take(pair, "b") == []
    pair.advance(5.0)  # REKEY_TIMEOUT later the stored answer is not used any more
    other = Link("relay")
    pair.inject("b", via_link, source=other)
    assert take(pair, "b") == []


def test_a_message_on_a_link_that_authenticated_another_peer_is_dropped() -> None:
    pair = PeerPair()
    pair.handshake()
    size = pair.send_packet("a", ipv4_packet(A_IP, B_IP, b"for b"))
    datagram = take(pair, "a")[0][0]
    assert size
    mallory = AuthenticatedLink("ssh", b"\x07" * 32)  # a link whose other end is some third member
    before = pair.b_peer.endpoint
    assert pair.inject("b", datagram, source=mallory) == 0
    assert pair.b.drops["message for one peer on another peer's link"] == 1
    assert pair.b_peer.endpoint == before and pair.b_peer.other_source is None


@dataclass(frozen=True)
class AuthenticatedLink:
    """A link that names the peer its transport authenticated, as SSH and relay links do."""

    name: str
    peer_key: bytes


# --- paths the caller allows (a forced or disabled rung) ---------------------------------------


def _links_only(endpoint: object) -> bool:
    return not isinstance(endpoint, tuple)


def test_an_initiation_on_a_path_not_allowed_is_neither_answered_nor_learnt() -> None:
    pair = PeerPair()
    pair.b_peer.accepts = _links_only  # b forces a link rung for a
    pair.b_peer.endpoint = None
    pair.a_peer.send_handshake_initiation(pair.now, pair.wall)
    carry(pair, "a", A_ADDR)
    assert take(pair, "b") == []
    assert pair.b.drops["message on a path not allowed for its peer"] == 1
    assert pair.b_peer.endpoint is None and completed(pair, "b") == []
    # The same initiation on an allowed path is answered there.
    link = Link("ssh")
    pair.a_peer.send_probe((link,), pair.now, pair.wall)
    carry(pair, "a", link)
    ((response, to),) = take(pair, "b")
    assert (kind(response), to) == (RESP, link)


def test_data_and_responses_on_a_path_not_allowed_are_dropped() -> None:
    pair = session()
    data = data_from_a(pair)
    pair.b_peer.accepts, pair.b_peer.accepts_udp = _links_only, False
    received_before = pair.b_peer.rx_bytes
    assert pair.inject("b", data, source=A_ADDR) == 0
    assert pair.b.drops["message on a path not allowed for its peer"] == 1
    assert pair.b_peer.rx_bytes == received_before
    # A response arriving over UDP for an initiation of a peer kept to links is dropped too.
    pair.a_peer.accepts, pair.a_peer.accepts_udp = _links_only, False
    pair.advance(REKEY_TIMEOUT + 0.1)
    assert pair.a_peer.send_probe((B_ADDR,), pair.now, pair.wall)
    carry(pair, "a", Link("ssh"))
    ((response, _),) = take(pair, "b")
    pair.inject("a", response, source=B_ADDR)
    assert pair.a.drops["message on a path not allowed for its peer"] == 1
    assert completed(pair, "a") == []
