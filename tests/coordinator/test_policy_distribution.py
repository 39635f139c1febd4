"""The network policy through the coordinator: the store keeps the latest record (schema
5, one row, never an older version), the admin-signed endpoint takes it, the peer map
serves it (full maps and deltas, by version), and `tunnelmesh.network.set_policy` --
what `tunnelmesh policy set` runs -- checks, signs the next version and sends it."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import pytest

from tests.coordinator.test_service import refused
from tests.support.coordinator import World, join, now, serving, snapshot
from tests.support.databases import Database
from tunnelmesh import network as admin_commands
from tunnelmesh.coordinator.client import Coordinator
from tunnelmesh.coordinator.store import open_store
from tunnelmesh.filter import STARTER_POLICY
from tunnelmesh.membership import PeerMap, PolicyRecord, Token, make_invite
from tunnelmesh.netstate import NetworkState, load_policy
from tunnelmesh.paths import Paths

OPEN_SSH = STARTER_POLICY + '\n[[allow]]\nfrom = "*"\nproto = "tcp"\nports = [22]\n'


@pytest.fixture(scope="module")
def world() -> World:
    return World.create()


@pytest.fixture
def db(database: Database) -> Database:
    """Every test here runs on both backends (tests/conftest.py `database`)."""
    return database


def signed(world: World, version: int, text: str = STARTER_POLICY) -> dict[str, object]:
    return PolicyRecord.create(world.admin, version, text, now()).to_wire()


def test_the_store_keeps_the_latest_policy_only_and_never_an_older_version(db: Database, world: World) -> None:
    async def scenario() -> None:
        store = await open_store(db.url)
        try:
            await store.set_network(world.network.to_wire())
            assert await store.policy() is None
            v1 = await store.set_policy({"p": 1}, 1)
            assert v1 == store.version == 2
            v3 = await store.set_policy({"p": 3}, 3)
            row = await store.policy()
            assert row is not None and (row.record, row.policy_version, row.version) == ({"p": 3}, 3, v3)
            assert await store.set_policy({"p": 2}, 2) is None and await store.set_policy({"p": 3, "again": 1}, 3) is None
            assert store.version == v3 and await store.policy() == row  # refused: nothing changed, no bump
        finally:
            await store.close()

    asyncio.run(scenario())
    assert db.query("SELECT count(*) FROM policy") == [(1,)]


def test_the_endpoint_takes_only_admin_signed_newer_policies_and_the_map_serves_them(db: Database, world: World) -> None:
    other = World.create()

    async def scenario() -> None:
        async with serving(db, world) as served:
            url = served.url
            await join(url, world, 1, world.invite(), "one")
            async with Coordinator(url, admin=world.admin) as admin, \
                    Coordinator(url, identity=world.nodes[1]) as member, \
                    Coordinator(url, admin=other.admin) as rogue:
                full = await member.map(0, 0)
                assert "policy" not in full  # none set: nodes from before the filter take the map
                first = signed(world, 1)
                await refused(db, rogue.set_policy(first), 401, "not this network's admin")
                forged = dict(first, sig=other.admin.sign("policy", first["body"]))  # type: ignore[arg-type]
                await refused(db, admin.set_policy(forged), 403, "network policy v1: signature does not verify")
                invalid = json.loads(json.dumps(first))
                invalid["body"]["text"] = "[[allow]]\nfrom = 7\nproto = \"tcp\"\nports = [22]\n"
                invalid["sig"] = world.admin.sign("policy", invalid["body"])
                await refused(db, admin.set_policy(invalid), 403, r"network policy v1:2: network rule 1: from: expected a string")

                assert (await admin.set_policy(first))["changed"] is True
                assert (await admin.set_policy(first))["changed"] is False  # the same record again: nothing
                await refused(db, admin.set_policy(signed(world, 1, OPEN_SSH)), 409,
                              "at version 1 already: a new one must have a higher version than that, not 1")
                delta = await member.map(full["version"], 0)
                assert delta["policy"] == first
                assert "policy" not in await member.map(delta["version"], 0)  # unchanged since

                second = signed(world, 2, OPEN_SSH)
                await admin.set_policy(second)
                await refused(db, admin.set_policy(signed(world, 1, OPEN_SSH)), 409, "at version 2 already")
                assert (await member.map(delta["version"], 0))["policy"] == second
                assert (await member.map(0, 0))["policy"] == second
                peer_map = PeerMap(world.network, world.nodes[1].public.wg_public_key)
                changes = peer_map.apply(await member.map(0, 0))
                assert changes.rejected == [] and changes.new_policy == PolicyRecord.from_wire(second, world.network)

    asyncio.run(scenario())


def test_setup_hands_over_a_policy_and_keeps_a_newer_one(db: Database, world: World) -> None:
    """What `init --external-coordinator` and the admin node's daemon do at each start."""

    async def scenario() -> None:
        async with serving(db, world) as served:
            async with Coordinator(served.url, admin=world.admin) as admin:
                admin_node = served.admin_node
                await admin.setup(world.network.to_wire(), admin_node, signed(world, 1))
                await admin.setup(world.network.to_wire(), admin_node, signed(world, 1))  # again: a new record of v1
                newer = signed(world, 2, OPEN_SSH)
                await admin.set_policy(newer)
                await admin.setup(world.network.to_wire(), admin_node, signed(world, 1))  # an older kept one
                assert (await served.store.policy()).record == newer  # type: ignore[union-attr]

    asyncio.run(scenario())


def test_policy_set_checks_first_signs_the_next_version_and_never_goes_below_what_the_admin_keeps(
        db: Database, world: World, tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[[allow]]\nfrom = "*"\nproto = "tcp"\nports = [70000]\n')

    async def scenario() -> None:
        async with serving(db, world) as served:
            paths = served.machine.paths
            before = snapshot(db)
            with pytest.raises(admin_commands.NetworkError,
                               match=re.escape(f"{bad}:4: network rule 1: ports: 70000: ports are 0 to 65535, low "
                                               "end first; nothing was changed")):
                admin_commands.read_policy_file(bad)
            with pytest.raises(admin_commands.NetworkError, match=r"bad.toml:4: .*nothing was changed"):
                await admin_commands.set_policy(paths, bad.read_text(), bad)
            assert snapshot(db) == before

            first, sent = await admin_commands.set_policy(paths, STARTER_POLICY, "p.toml")
            assert (first.version, sent) == (1, "set")
            assert load_policy(paths.peer_map_cache, world.network) == first  # kept here, no daemon needed
            assert (await admin_commands.set_policy(paths, STARTER_POLICY, "p.toml")) == (first, "unchanged")
            second, _ = await admin_commands.set_policy(paths, OPEN_SSH, "p.toml")
            assert second.version == 2 and (await served.store.policy()).policy_version == 2  # type: ignore[union-attr]
            with pytest.raises(admin_commands.NetworkError, match="changed meanwhile .now version 2, the edit started "
                                                                  "from version 1.: nothing was sent"):
                await admin_commands.set_policy(paths, STARTER_POLICY + "# edited\n", "p.toml", based_on=1)

            # The admin's machine kept v2 (its daemon saved the map); the coordinator's
            # database is rolled back to v1: the next version signed is still 3.
            await served.machine.countersign()  # keeps the map as the admin node's daemon does
            assert load_policy(paths.peer_map_cache, world.network) == second
            db.execute("UPDATE policy SET record = ?, policy_version = 1", json.dumps(first.to_wire()))
            third, _ = await admin_commands.set_policy(paths, STARTER_POLICY + "# three\n", "p.toml")
            assert third.version == 3

    asyncio.run(scenario())


def test_policy_set_with_the_same_text_re_sends_it_to_a_coordinator_restored_without_it(
        db: Database, world: World) -> None:
    async def scenario() -> None:
        async with serving(db, world, admit=False) as served:
            paths = served.machine.paths
            first, _ = await admin_commands.set_policy(paths, OPEN_SSH, "p.toml")
            db.execute("DELETE FROM policy")  # a database from a backup older than the policy
            assert (await admin_commands.set_policy(paths, OPEN_SSH, "p.toml")) == (first, "re-sent")
            assert (await served.store.policy()).record == first.to_wire()  # type: ignore[union-attr]
            assert (await admin_commands.set_policy(paths, OPEN_SSH, "p.toml")) == (first, "unchanged")
            async with Coordinator(served.url, admin=world.admin) as admin:  # the admin daemon's start
                assert await admin.offer_policy(first.to_wire()) is False
                db.execute("DELETE FROM policy")
                assert await admin.offer_policy(first.to_wire()) is True
                assert (await served.store.policy()).record == first.to_wire()  # type: ignore[union-attr]

    asyncio.run(scenario())


def test_a_joiner_keeps_the_policy_version_its_invite_names(db: Database, world: World, tmp_path: Path) -> None:
    """What `tunnelmesh join` writes: network.json says which policy version exists, whatever
    the coordinator's map held (here none: it withholds it)."""

    async def scenario() -> None:
        async with serving(db, world) as served:
            token = make_invite(world.admin, served.url, name=None, expires=now() + 600, uses=1, now=now() - 10,
                                policy=2)
            world.invites.append(token.grant)
            served.machine.keep_invites()
            result = await join(served.url, world, 1, Token.parse(token.encode()), "joiner")
            paths = Paths(tmp_path / "joiner", tmp_path / "joiner" / "tunnelmesh.toml")
            state, peer_map, secret = admin_commands._check_result(served.url, world.network, world.nodes[1], result,
                                                                   Token.parse(token.encode()).policy, None)
            admin_commands._keep_joined(paths, state, peer_map, secret)
            assert NetworkState.load(paths.network_state) == state and state.policy_expected == 2
            assert load_policy(paths.peer_map_cache, world.network) is None  # withheld: the filter denies

    asyncio.run(scenario())
