"""What keeps hole punching from being turned on others (docs/transports.md, "Hole punching"): a punch
sprays only at the peer's reflexive addresses the coordinator saw it connect from and that
nodes may send to (actors.coordinator_client.peer_candidates), and a session acts on a
peer's notices only without a working UDP path, at most once per PUNCH_SPACING
(actors/session.py). Sessions in virtual time over tests/support/memnet.py, as
tests/unit/test_punch_session.py drives them."""

from __future__ import annotations

import asyncio
import base64
import ipaddress
from collections.abc import Callable
from pathlib import Path
from typing import Any

from actors.control import EventBus
from actors.coordinator_client import CoordinatorClient, peer_candidates
from actors.messages import Punch, to_json
from actors.session import PUNCH_SPACING
from tests.support.coordinator import World as CoordinatorWorld
from tests.support.coordinator import join, serving
from tests.support.membership import World, update
from tests.support.wire import B_ADDR
from tests.unit.test_nat_candidates import NOW, make, nodes
from tests.unit.test_punch_session import on_the_relay
from tests.unit.test_session_ladder import (  # noqa: F401 (simulate: the fixture)
    Pair, simulate, udp_fails_over_to_ssh, up_on_udp)
from tunnelmesh.coordinator.client import Coordinator
from tunnelmesh.ladder import UDP
from tunnelmesh.membership import PeerMap
from tunnelmesh.nat.candidates import VerifiedCandidates
from tunnelmesh.nat.report import ADDRESS_AND_PORT_DEPENDENT, ENDPOINT_INDEPENDENT, REFLEXIVE, Candidate, NatReport, \
    PeerNat
from tunnelmesh.netstate import NetworkState
from tunnelmesh.punch import SCHEDULE
from tunnelmesh.wireguard.constants import REKEY_TIMEOUT

INIT = 1
SEEN_FROM = "203.0.113.50"  # where the coordinator saw the member connect from
HARD_PEER = PeerNat(ADDRESS_AND_PORT_DEPENDENT, ADDRESS_AND_PORT_DEPENDENT, (("203.0.113.9", 20_500),))
EASY_SELF = NatReport(checked_at=1.0, mapping=ENDPOINT_INDEPENDENT)


def reflexive_kept(reflexive: tuple[str, ...], seen_from: str = SEEN_FROM) -> tuple[tuple[str, int], ...]:
    """The member's reflexive addresses a peer spec keeps (where a punch may spray), from a
    verified record listing `reflexive` hosts, the coordinator having seen it at `seen_from`."""
    world = World.create()
    key = nodes()[0].public.wg_public_key
    wire = make(candidates=tuple(Candidate(host, 40_000 + i, REFLEXIVE) for i, host in enumerate(reflexive)))
    endpoints: dict[str, Any] = {base64.b64encode(key).decode(): {"addresses": [f"{seen_from}:51820"],
                                                                  "last_seen": 1, "candidates": wire}}
    peers = PeerMap(world.network, nodes()[1].public.wg_public_key)
    peers.apply(update([World(world.admin, world.network, nodes()).admin_member(0)], endpoints=endpoints))
    snapshot = peers.snapshot()
    member = snapshot.members[key]
    held = VerifiedCandidates()
    record = held.take(member.name, key, member.identity, snapshot.endpoints[key].candidate_record, NOW)
    assert record is not None and len(record.nat.reflexive) == len(reflexive)  # the record itself says them all
    _, nat = peer_candidates(key, snapshot, record, [ipaddress.IPv4Network("192.168.1.0/24")])
    assert nat.mapping == ADDRESS_AND_PORT_DEPENDENT  # the rest of what it said stays
    return nat.reflexive


def test_only_reflexive_addresses_at_the_observed_ip_that_nodes_may_send_to_are_sprayed_at() -> None:
    world = World.create()
    in_mesh = str(next(world.network.cidr4.hosts()))
    assert reflexive_kept((SEEN_FROM,)) == ((SEEN_FROM, 40_000),)
    # Loopback, multicast, the mesh's own range, the unspecified and broadcast addresses,
    # and a public address the member was not seen at: none is a spray target.
    assert reflexive_kept(("127.0.0.1", "224.0.0.251", in_mesh, "0.0.0.0", "255.255.255.255", "198.51.100.7",
                           SEEN_FROM)) == ((SEEN_FROM, 40_006),)
    # Not even when the coordinator says it saw the member there (it cannot forge the record,
    # but it could name any address as the observation).
    for host in ("127.0.0.1", "224.0.0.251", in_mesh):
        assert reflexive_kept((host,), seen_from=host) == ()


def punch_sends(notices: int) -> list[tuple[float, tuple[str, int] | None]]:
    """What a sends over UDP (when, after the first notice, and where) for `notices` notices
    0.5 s apart, on the relay; after the spacing, checks one more notice is acted on."""
    sends: list[tuple[float, tuple[str, int] | None]] = []

    async def body(p: Pair, asked: list[tuple[str, float]]) -> None:
        told = p.net.clock.now
        await p.sa.handle(Punch(p.b.device.static_public))
        first = p.sa._punch
        assert first is not None
        for _ in range(notices - 1):
            await p.net.run_for(0.5)
            await p.sa.handle(Punch(p.b.device.static_public))  # a repeat: counted, and the punch goes on
        assert p.sa._punch is first and p.sa.punch_notices_ignored == notices - 1
        await p.net.run_for(SCHEDULE[-1] + REKEY_TIMEOUT)
        sends.extend((round(s.at - told, 3), s.to) for s in p.net.sent(src="a", rung=UDP, kind=INIT, since=told))
        await p.net.run_until(lambda: p.net.clock.now - told >= PUNCH_SPACING, PUNCH_SPACING, "the spacing over")
        await p.sa.handle(Punch(p.b.device.static_public))
        assert p.sa._punch is not None and p.sa._punch is not first and p.sa.punch_notices_ignored == notices - 1

    on_the_relay(body)
    return sends


def test_notices_within_the_spacing_punch_once() -> None:
    once = punch_sends(1)
    assert [to for _, to in once].count(B_ADDR) >= 2  # the punch's schedule, to the peer's candidate
    assert punch_sends(3) == once


def test_a_notice_on_a_working_udp_path_sends_nothing(simulate: Any) -> None:
    async def body(p: Pair) -> None:
        await up_on_udp(p)
        await p.net.run_for(1.0)  # past the handshake's own initiation
        p.sa.own_nat, p.sa.peer_nat = (lambda: EASY_SELF), HARD_PEER
        told = p.net.clock.now
        await p.sa.handle(Punch(p.b.device.static_public))
        await p.net.run_for(SCHEDULE[-1] + 2)
        assert p.sa._punch is None and p.sa.punch_notices_ignored == 1 and p.sa.punches_unanswered == 0
        assert p.net.sent(src="a", kind=INIT, since=told) == []

    simulate(body)


class MeshWithRefusals:
    """The part of the mesh actor the coordinator client's punch requests touch."""

    def __init__(self) -> None:
        self.punch_requester: Callable[[bytes], None] | None = None
        self.punch_refusals: dict[bytes, str] = {}


def test_a_failed_punch_request_is_kept_per_peer_until_one_succeeds(tmp_path: Path) -> None:
    """Against a real coordinator (tests/coordinator/test_punch.py's): refused while the peer
    takes no notices (409), then told, which clears it; unreachable when not connected."""
    world = CoordinatorWorld.create()

    async def scenario() -> None:
        async with serving(tmp_path / "c.db", world) as served:
            entry = await join(served.url, world, 1, world.invite(), "one")
            await join(served.url, world, 2, world.invite(), "two")
            key_two = world.nodes[2].public.wg_public_key
            mesh = MeshWithRefusals()
            client = CoordinatorClient(
                NetworkState(served.url, world.network, world.entry(entry["member"])), world.nodes[1],
                PeerMap(world.network, world.nodes[1].public.wg_public_key), mesh,  # type: ignore[arg-type]
                EventBus(), cache_path=tmp_path / "peermap.json", secret_path=tmp_path / "secret", listen_port=51820,
                on_revoked=lambda why: None)
            client.request_punch(key_two)  # no coordinator session yet
            assert mesh.punch_refusals == {key_two: "no punch: the coordinator is unreachable"}
            async with Coordinator(served.url, identity=world.nodes[1]) as one, \
                    Coordinator(served.url, identity=world.nodes[2]) as two:
                await client._ask_punch(one, key_two)
                refusal = mesh.punch_refusals[key_two]
                assert refusal.startswith("punch request failed: ") and "punch=1" in refusal, refusal
                version = (await one.map(0, 0))["version"]
                for node in (one, two):
                    await node.map(version, 0, punch=True)  # both take notices now
                await client._ask_punch(one, key_two)
                assert mesh.punch_refusals == {}

    asyncio.run(scenario())


def test_status_says_why_the_last_punch_request_failed_off_udp_only(simulate: Any) -> None:
    async def body(p: Pair) -> None:
        await up_on_udp(p)
        p.a.mesh.punch_refusals[p.b.device.static_public] = "punch request failed: no such peer"
        assert "punch request failed" not in (to_json(p.sa.status())["why_not_better"] or "")  # moot on UDP
        pinger, _, _ = await udp_fails_over_to_ssh(p)
        pinger.stop()
        assert "punch request failed: no such peer" in to_json(p.sa.status())["why_not_better"]

    simulate(body)
