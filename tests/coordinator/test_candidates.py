"""The coordinator carries members' candidate records (tunnelmesh.nat.candidates):
/v1/register checks a record as peers will (size, shape, signature by the member, not
from the future; a record that fails is dropped, not the register) and keeps it only if
newer than the stored one; the map serves it in the member's endpoints to nodes that ask
for it, where a node verifies it again. Real service on 127.0.0.1, real
SQLite file, real SSH identities."""

from __future__ import annotations

import asyncio
import copy
from pathlib import Path
from typing import Any

import pytest

from actors import coordinator_client
from actors.control import EventBus
from actors.messages import SetCandidates
from actors.runtime import Actor, Supervisor
from tests.coordinator.test_service import db, key, with_network, world  # noqa: F401 (fixtures)
from tests.support.coordinator import World, join, now
from tests.support.databases import Database
from tests.support.wait import until
from tunnelmesh.coordinator.client import Coordinator
from tunnelmesh.links.attest import MAX_FUTURE
from tunnelmesh.membership import PeerMap
from tunnelmesh.nat.candidates import VerifiedCandidates, make_candidate_record
from tunnelmesh.nat.report import CONFIGURED, LOCAL, MAPPED, REFLEXIVE, Candidate, NatReport
from tunnelmesh.netstate import NetworkState


def record(world: World, i: int, version: int, *candidates: Candidate) -> dict[str, Any]:
    return asyncio.run(make_candidate_record(world.nodes[i], candidates, mapping="endpoint-independent",
                                             filtering="address-dependent", version=version))


def test_register_takes_a_newer_record_serves_it_and_refuses_an_older_one(db: Database, world: World) -> None:
    v1 = now() * 1000
    first = record(world, 1, v1, Candidate("192.168.7.2", 51820, LOCAL), Candidate("198.51.100.4", 6000, REFLEXIVE))
    second = record(world, 1, v1 + 1, Candidate("192.168.7.2", 51820, LOCAL))
    by_other = record(world, 2, v1 + 2, Candidate("192.168.7.2", 51820, LOCAL))
    future = record(world, 1, (now() + MAX_FUTURE + 60) * 1000)

    async def scenario() -> None:
        async with with_network(db, world) as url:
            await join(url, world, 1, world.invite(), "one")
            async with Coordinator(url, identity=world.nodes[1]) as one:
                await one.register(51820, [])
                version = (await one.map(0, 0))["version"]
                assert "candidates" not in (await one.map(0, 0))["endpoints"][key(world, 1)]
                assert await one.register(51820, [], candidates=first) == {"observed": "127.0.0.1:51820"}
                update = await one.map(version, 0)
                assert update["version"] == version + 1 and update["endpoints"][key(world, 1)]["candidates"] == first
                await one.register(51820, [], candidates=first)  # the same record: no new version
                await one.register(51820, [])  # none said: the stored one stays
                assert (await one.map(0, 0))["version"] == version + 1
                # A node verifies what the map serves (the coordinator's word counts for nothing).
                peers = PeerMap(world.network, world.nodes[0].public.wg_public_key)
                peers.apply(await one.map(0, 0))
                member = peers.members[world.nodes[1].public.wg_public_key]
                held = VerifiedCandidates()
                got = held.take("one", member.wg_key, member.identity,
                                peers.endpoints[member.wg_key].candidate_record, now())
                assert got is not None and got.version == v1 and got.nat.reflexive == (("198.51.100.4", 6000),)

                await one.register(51820, [], candidates=second)  # newer: replaces
                assert (await one.map(0, 0))["endpoints"][key(world, 1)]["candidates"] == second
                stale = await one.register(51820, [], candidates=first)  # older: refused, said why
                assert f"version {v1} is not newer than the stored one's ({v1 + 1})" in stale["candidates_refused"]
                assert (await one.map(0, 0))["endpoints"][key(world, 1)]["candidates"] == second
                assert (await one.map(0, 0))["version"] == version + 2

                # A record that fails (another key's, altered, 11 minutes ahead, malformed) is
                # dropped with the reason; the rest of the register is taken (its "ssh" here).
                tampered = copy.deepcopy(second)
                tampered["candidates"][0]["address"] = "192.168.7.3:51820"
                bad: list[tuple[Any, str]] = [(by_other, "by another key"), (tampered, "does not verify"),
                                              (future, "in the future")]
                bad += [(wrong, "malformed candidate record")
                        for wrong in ([second], "x", {"candidates": []}, {**second, "pad": "x" * 9000})]
                for n, (wrong, why) in enumerate(bad):
                    answer = await one.register(51820, [], ssh={"n": n}, candidates=wrong)
                    assert answer["observed"] == "127.0.0.1:51820" and why in answer["candidates_refused"], answer
                    served = (await one.map(0, 0))["endpoints"][key(world, 1)]
                    assert served["ssh"] == {"n": n} and served["candidates"] == second

    asyncio.run(scenario())


def test_only_a_poll_that_asks_gets_candidate_records(db: Database, world: World) -> None:
    """Nodes from before candidate records refuse endpoint keys they do not know (and with
    them the whole map): a map request gets the records only with `candidates=1`."""
    signed = record(world, 1, now() * 1000, Candidate("192.168.7.2", 51820, LOCAL))

    async def scenario() -> None:
        async with with_network(db, world) as url:
            await join(url, world, 1, world.invite(), "one")
            async with Coordinator(url, identity=world.nodes[1]) as one:
                await one.register(51820, [], candidates=signed)
                for query, served in (("", False), ("&punch=1", False), ("&candidates=1", True),
                                      ("&candidates=1&punch=1", True)):
                    update = await one._call("GET", f"/v1/map?since=0&wait=0{query}", sign="member")
                    assert ("candidates" in update["endpoints"][key(world, 1)]) is served, query
                assert (await one.map(0, 0))["endpoints"][key(world, 1)]["candidates"] == signed  # the client asks

    asyncio.run(scenario())


class QuietMesh(Actor):
    """The mesh's side of the client's messages, kept: the candidates each peer was given."""

    name = "mesh"

    def __init__(self) -> None:
        super().__init__()
        self.candidates: dict[bytes, tuple[tuple[str, int], ...]] = {}

    async def handle(self, message: Any) -> None:
        if isinstance(message, SetCandidates):
            self.candidates[message.wg_key] = message.addresses


def test_changed_candidates_are_registered_at_once_during_the_long_poll_and_none_is_lost(
        db: Database, world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """set_nat_report / set_mapped while the client waits in its long-poll: a register on
    the same session carries a newly signed record (the periodic register is pushed out of
    the test's reach), the last of several quick changes is what the map ends with, and an
    unchanged report registers nothing."""
    monkeypatch.setattr(coordinator_client, "REGISTER_INTERVAL", 3600.0)
    registers: list[dict[str, Any] | None] = []
    real_register = Coordinator.register

    async def counted(self: Coordinator, *args: Any, candidates: dict[str, Any] | None = None, **kwargs: Any) -> Any:
        answer = await real_register(self, *args, candidates=candidates, **kwargs)
        registers.append(candidates)  # once answered: the coordinator has stored it
        return answer

    monkeypatch.setattr(Coordinator, "register", counted)
    reflexive = NatReport(now(), "endpoint-independent", "address-and-port-dependent",
                          reflexive=(("198.51.100.9", 40000),))
    mapped = Candidate("198.51.100.9", 40100, MAPPED)

    async def record_served(url: str) -> dict[str, Any] | None:
        async with Coordinator(url, identity=world.nodes[1]) as one:
            return (await one.map(0, 0))["endpoints"][key(world, 1)].get("candidates")

    async def scenario() -> None:
        async with with_network(db, world) as url:
            joined = await join(url, world, 1, world.invite(), "one")
            state = NetworkState(url, world.network, world.entry(joined["member"]))
            supervisor = Supervisor()
            mesh = supervisor.add(QuietMesh())
            client = coordinator_client.CoordinatorClient(
                state, world.nodes[1], PeerMap(world.network, world.nodes[1].public.wg_public_key),
                mesh,  # type: ignore[arg-type]
                EventBus(), cache_path=tmp_path / "peermap.json", secret_path=tmp_path / "secret", listen_port=51820,
                on_revoked=lambda why: None, public_endpoint=Candidate("203.0.113.77", 51820, CONFIGURED))
            supervisor.add(client)
            running = asyncio.create_task(supervisor.run())
            try:
                await until("the first register", lambda: client.connection == "connected" and registers, 20)
                first = await record_served(url)
                assert first is not None and first == registers[0]
                # [nat] public_endpoint, from the first record on
                assert {"address": "203.0.113.77:51820", "kind": "configured"} in first["candidates"]
                client.set_nat_report(reflexive)  # the client sits in its long-poll (25 s)
                await until("the reflexive address registered", lambda: len(registers) == 2, 20)
                served = await record_served(url)
                assert served is not None and served["version"] > first["version"]
                assert {"address": "198.51.100.9:40000", "kind": "reflexive"} in served["candidates"]
                assert served["mapping"] == "endpoint-independent"
                client.set_nat_report(reflexive)  # the same again: nothing to register
                client.set_mapped(mapped)  # two changes in a row: the last one wins
                client.set_mapped(None)
                client.set_mapped(mapped)
                await until("the mapped address registered", lambda: any(
                    r is not None and {"address": "198.51.100.9:40100", "kind": "mapped"} in r["candidates"]
                    for r in registers), 20)
                await asyncio.sleep(1)  # a window in which a stray register (a busy loop) would show
                served = await record_served(url)
                assert served is not None
                assert {"address": "198.51.100.9:40100", "kind": "mapped"} in served["candidates"]
                # The connect, the report, one for the three quick calls; the same report again: none.
                assert len(registers) == 3, registers
            finally:
                supervisor.shutdown("test over")
                await running

    asyncio.run(scenario())


def test_a_node_starting_from_a_map_without_records_gets_those_of_unchanged_members(
        db: Database, world: World, tmp_path: Path) -> None:
    """A join's map and the cache of a node from before candidate records carry none (maps
    leave them out unless asked): the client's first poll is a full one, so the records of
    members that have not changed since arrive at once, not at their next change."""
    two = record(world, 2, now() * 1000, Candidate("198.51.100.20", 51820, LOCAL))

    async def scenario() -> None:
        async with with_network(db, world) as url:
            joined = await join(url, world, 1, world.invite(), "one")
            await join(url, world, 2, world.invite(), "two")
            async with Coordinator(url, identity=world.nodes[2]) as node:
                await node.register(51820, [], candidates=two)
            peers = PeerMap(world.network, world.nodes[1].public.wg_public_key)
            async with Coordinator(url, identity=world.nodes[1]) as node:  # as an older node asked
                peers.apply(await node._call("GET", "/v1/map?since=0&wait=0", sign="member"))
            assert peers.endpoints[world.nodes[2].public.wg_public_key].candidate_record is None
            state = NetworkState(url, world.network, world.entry(joined["member"]))
            supervisor = Supervisor()
            mesh = supervisor.add(QuietMesh())
            client = coordinator_client.CoordinatorClient(
                state, world.nodes[1], peers, mesh,  # type: ignore[arg-type]
                EventBus(), cache_path=tmp_path / "peermap.json", secret_path=tmp_path / "secret", listen_port=51820,
                on_revoked=lambda why: None)
            supervisor.add(client)
            running = asyncio.create_task(supervisor.run())
            try:  # within the long-poll's 25 s, which a poll for changes since the map's version would wait out
                await until("member two's record", lambda: ("198.51.100.20", 51820) in mesh.candidates.get(
                    world.nodes[2].public.wg_public_key, ()), 15)
            finally:
                supervisor.shutdown("test over")
                await running

    asyncio.run(scenario())
