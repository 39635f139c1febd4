"""What the protocol core gives the transport ladder: `Peer.send_probe` (an
initiation on chosen paths, within the REKEY_TIMEOUT rate limit), responses
sent back the way the initiation came, `HandshakeCompleted.source`, and
cross-kind roaming left to the ladder (`roam_across_kinds`, `stray_source`,
`endpoint_rx_at`).

Datagrams are carried by hand here (not `PeerPair.deliver`, which knows only
the two UDP addresses), so each test says which path a datagram took."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from tests.support.wire import A_ADDR, A_IP, B_ADDR, B_IP, PeerPair, ipv4_packet, kind
from tunnelmesh.wireguard import EndpointChanged, HandshakeCompleted
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


def session(*, roam_across_kinds: bool = True) -> PeerPair:
    pair = PeerPair()
    pair.a_peer.roam_across_kinds = pair.b_peer.roam_across_kinds = roam_across_kinds
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
@pytest.mark.parametrize("roam", [True, False], ids=["roaming", "no cross-kind roaming"])
def test_the_response_goes_to_the_initiations_source(source: object, roam: bool) -> None:
    pair = PeerPair()
    pair.b_peer.roam_across_kinds = roam
    pair.a_peer.send_probe((source,), pair.now, pair.wall)
    carry(pair, "a", source)
    ((response, to),) = take(pair, "b")
    assert (kind(response), to) == (RESP, source)


def test_a_probe_on_a_link_completes_there_and_each_side_names_its_proofs_source() -> None:
    pair = PeerPair()
    pair.a_peer.roam_across_kinds = pair.b_peer.roam_across_kinds = False
    a_end, b_end = Link("ssh to b"), Link("ssh from a")  # one link, as each side sees it
    pair.a_peer.send_probe((a_end,), pair.now, pair.wall)
    carry(pair, "a", b_end)
    carry(pair, "b", a_end)  # the response, back on the link
    assert completed(pair, "a") == [HandshakeCompleted(pair.a_peer, True, a_end)]
    # A's send path is still UDP: its confirming keepalive goes there, and B's
    # proof is that packet.
    ((keepalive, to),) = take(pair, "a")
    assert (kind(keepalive), to) == (DATA, B_ADDR)
    pair.inject("b", keepalive, source=A_ADDR)
    assert completed(pair, "b") == [HandshakeCompleted(pair.b_peer, False, A_ADDR)]
    assert (pair.a_peer.endpoint, pair.b_peer.endpoint) == (B_ADDR, A_ADDR)


# --- roaming across kinds ---------------------------------------------------------------------


def test_without_cross_kind_roaming_a_packet_from_a_link_is_stray() -> None:
    pair = session(roam_across_kinds=False)
    pair.advance(1)
    link = Link("relay")
    assert pair.inject("b", data_from_a(pair), source=link) > 0  # delivered all the same
    peer = pair.b_peer
    assert (peer.endpoint, peer.stray_source, peer.stray_at) == (A_ADDR, link, pair.now)
    assert not [e for e in pair.b.events if isinstance(e, EndpointChanged)]


def test_without_cross_kind_roaming_another_udp_address_still_roams() -> None:
    pair = session(roam_across_kinds=False)
    pair.advance(1)
    pair.inject("b", data_from_a(pair), source=OTHER_UDP)
    peer = pair.b_peer
    assert (peer.endpoint, peer.endpoint_rx_at, peer.stray_source) == (OTHER_UDP, pair.now, None)
    assert [e for e in pair.b.events if isinstance(e, EndpointChanged)] == [EndpointChanged(peer, OTHER_UDP)]


def test_without_cross_kind_roaming_links_roam_among_themselves() -> None:
    pair = PeerPair()
    pair.b_peer.endpoint = Link("ssh")
    pair.b_peer.roam_across_kinds = False
    pair.a_peer.send_probe((B_ADDR,), pair.now, pair.wall)
    carry(pair, "a", Link("relay"))
    assert pair.b_peer.endpoint == Link("relay") and pair.b_peer.stray_source is None


def test_with_cross_kind_roaming_a_link_takes_over_as_in_wireguard() -> None:
    pair = session()
    link = Link("relay")
    pair.inject("b", data_from_a(pair), source=link)
    assert (pair.b_peer.endpoint, pair.b_peer.stray_source) == (link, None)


def test_a_stray_handshake_leaves_the_endpoint_too() -> None:
    pair = session(roam_across_kinds=False)
    pair.advance(REKEY_TIMEOUT)
    link = Link("ssh")
    pair.a_peer.send_probe((link,), pair.now, pair.wall)
    carry(pair, "a", link)
    assert (pair.b_peer.endpoint, pair.b_peer.stray_source, pair.b_peer.stray_at) == (A_ADDR, link, pair.now)


# --- endpoint_rx_at -----------------------------------------------------------------------------


def test_endpoint_rx_at_follows_packets_from_the_endpoint_only() -> None:
    pair = session(roam_across_kinds=False)
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
    pair.a_peer.roam_across_kinds = pair.b_peer.roam_across_kinds = False
    size = pair.send_packet("a", ipv4_packet(A_IP, B_IP, b"for b"))
    datagram = take(pair, "a")[0][0]
    assert size
    mallory = AuthenticatedLink("ssh", b"\x07" * 32)  # a link whose other end is some third member
    before = pair.b_peer.endpoint
    assert pair.inject("b", datagram, source=mallory) == 0
    assert pair.b.drops["message for one peer on another peer's link"] == 1
    assert pair.b_peer.endpoint == before and pair.b_peer.stray_source is None


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
    pair.b_peer.path_allowed = _links_only  # b forces a link rung for a
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
    pair = session(roam_across_kinds=False)
    data = data_from_a(pair)
    pair.b_peer.path_allowed, pair.b_peer.udp_refused = _links_only, True
    received_before = pair.b_peer.rx_bytes
    assert pair.inject("b", data, source=A_ADDR) == 0
    assert pair.b.drops["message on a path not allowed for its peer"] == 1
    assert pair.b_peer.rx_bytes == received_before
    # A response arriving over UDP for an initiation of a peer kept to links is dropped too.
    pair.a_peer.path_allowed, pair.a_peer.udp_refused = _links_only, True
    pair.advance(REKEY_TIMEOUT + 0.1)
    assert pair.a_peer.send_probe((B_ADDR,), pair.now, pair.wall)
    carry(pair, "a", Link("ssh"))
    ((response, _),) = take(pair, "b")
    pair.inject("a", response, source=B_ADDR)
    assert pair.a.drops["message on a path not allowed for its peer"] == 1
    assert completed(pair, "a") == []
