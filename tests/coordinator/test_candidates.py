"""The coordinator carries members' candidate records (tunnelmesh.nat.candidates):
/v1/register checks a record as peers will (size, shape, signature by the member, not
from the future) and keeps it only if newer than the stored one; the map serves it in
the member's endpoints, where a node verifies it again. Real service on 127.0.0.1, real
SQLite file, real SSH identities."""

from __future__ import annotations

import asyncio
import copy
from pathlib import Path
from typing import Any

import pytest

from tests.coordinator.test_service import key, refused, with_network
from tests.support.coordinator import World, join, now
from tunnelmesh.coordinator.client import Coordinator
from tunnelmesh.links.attest import MAX_FUTURE
from tunnelmesh.membership import PeerMap
from tunnelmesh.nat.candidates import VerifiedCandidates, make_candidate_record
from tunnelmesh.nat.report import LOCAL, REFLEXIVE, Candidate


@pytest.fixture(scope="module")
def world() -> World:
    return World.create()


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "coordinator.db"


def record(world: World, i: int, version: int, *candidates: Candidate) -> dict[str, Any]:
    return asyncio.run(make_candidate_record(world.nodes[i], candidates, mapping="endpoint-independent",
                                             filtering="address-dependent", version=version))


def test_register_takes_a_newer_record_serves_it_and_refuses_an_older_one(db: Path, world: World) -> None:
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

                await refused(db, one.register(51820, [], candidates=by_other), 400, "by another key")
                tampered = copy.deepcopy(second)
                tampered["candidates"][0]["address"] = "192.168.7.3:51820"
                await refused(db, one.register(51820, [], candidates=tampered), 400, "does not verify")
                await refused(db, one.register(51820, [], candidates=future), 400, "in the future")
                for wrong in ([second], "x", {"candidates": []}, {**second, "pad": "x" * 9000}):
                    await refused(db, one.register(51820, [], candidates=wrong), 400,  # type: ignore[arg-type]
                                  "malformed candidate record")

    asyncio.run(scenario())
