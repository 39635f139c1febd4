"""Which relays a node holds (actors.links.RelayPool.wanted) and which addresses it
sends to (Endpoints.candidates): both come from members' unsigned word in the peer
map, so both are bounded and filtered. No network: the pool is asked, never run."""

from __future__ import annotations

import base64

import pytest

from actors.links import MAX_NODE_RELAYS, RelayPool, Transports
from tests.support.membership import World, update
from tunnelmesh.links.relay import RelayClient, RelayGuard
from tunnelmesh.membership import Endpoints, PeerMap, parse_endpoints

COORDINATOR = "http://198.51.100.1:7400"


@pytest.fixture(scope="module")
def world() -> World:
    return World.create()


def b64(key: bytes) -> str:
    return base64.b64encode(key).decode()


def peer_map(world: World, relays: dict[int, str]) -> PeerMap:
    """Node 0's map with members 1..5, member i offering relays[i]."""
    peers = PeerMap(world.network, world.wg(0))
    endpoints = {b64(world.wg(i)): {"addresses": [], "last_seen": None, **({"relay": relays[i]} if i in relays else {})}
                 for i in range(1, 6)}
    changes = peers.apply(update([world.admin_member(i) for i in range(6)], endpoints=endpoints))
    assert not changes.rejected, changes.rejected
    return peers


def pool(peers: PeerMap, own: tuple[str, str] | None = None) -> RelayPool:
    def make(url: str, relay: str, guard: RelayGuard | None) -> RelayClient:
        raise AssertionError("wanted() makes no client")

    return RelayPool(peers.snapshot, own, COORDINATOR, make, Transports(), supervisor=None)  # type: ignore[arg-type]


def test_each_offered_relay_once_by_member_name_with_its_id(world: World) -> None:
    peers = peer_map(world, {3: "http://192.0.2.3:7401", 1: "https://relay.example.org"})
    assert pool(peers).wanted() == {"https://relay.example.org": b64(world.wg(1)),
                                    "http://192.0.2.3:7401": b64(world.wg(3))}


def test_the_coordinators_relay_and_second_spellings_are_not_held_twice(world: World) -> None:
    # Member 2 offers the coordinator's own relay; 4 offers 1's relay spelt another way.
    peers = peer_map(world, {1: "http://192.0.2.3:7401", 2: "HTTP://198.51.100.1:7400/", 4: "http://192.0.2.3:7401/"})
    assert pool(peers).wanted() == {"http://192.0.2.3:7401": b64(world.wg(1))}


def test_at_most_a_few_relays_plus_its_own(world: World) -> None:
    peers = peer_map(world, {i: f"http://192.0.2.{i}:7401" for i in range(1, 6)})
    own = ("http://127.0.0.1:7401", b64(world.wg(0)))
    wanted = pool(peers, own).wanted()
    assert len(wanted) == MAX_NODE_RELAYS + 1 and wanted[own[0]] == own[1]
    assert list(wanted)[1:] == [f"http://192.0.2.{i}:7401" for i in range(1, MAX_NODE_RELAYS + 1)]


def test_candidates_are_unicast_addresses_outside_the_mesh(world: World) -> None:
    inside = str(world.network.cidr4.network_address + 9)
    endpoints = parse_endpoints({"addresses": ["192.0.2.7:51820", "127.0.0.1:1", "0.0.0.0:2", "224.0.0.1:3",
                                               "169.254.169.254:80", "240.0.0.1:4", f"{inside}:5", "10.1.2.3:6"],
                                 "last_seen": None})
    assert endpoints.candidates(world.network) == (("192.0.2.7", 51820), ("10.1.2.3", 6))
    assert Endpoints().candidates(world.network) == ()


def test_member_relays_are_guarded_by_their_members_addresses_and_its_own_is_not(world: World) -> None:
    peers = PeerMap(world.network, world.wg(0))
    endpoints = {b64(world.wg(1)): {"addresses": ["192.0.2.3:51820", "10.0.0.5:51820"], "last_seen": None,
                                    "relay": "http://192.0.2.3:7401"}}
    assert not peers.apply(update([world.admin_member(i) for i in range(2)], endpoints=endpoints)).rejected
    own = ("http://127.0.0.1:7401", b64(world.wg(0)))
    relays = pool(peers, own)
    assert relays.guard(*own) is None  # the node's own config chose it
    guard = relays.guard("http://192.0.2.3:7401", b64(world.wg(1)))
    assert guard is not None and guard.registered() == {"192.0.2.3", "10.0.0.5"}
    # A member that has not registered (or is gone) has no private address of its own.
    assert relays.guard("http://192.0.2.9:7401", b64(world.wg(2))).registered() == frozenset()  # type: ignore[union-attr]
