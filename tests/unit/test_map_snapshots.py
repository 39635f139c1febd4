"""Readers of the peer map take immutable snapshots (issue 12, item 1): the coordinator
client owns the one `PeerMap`; the SSH directory, the relay pool, the node's relay and
the bridge's keys read `MapSnapshot`s, and the relay pool replaces (never changes in
place) the relay set the sessions read."""

from __future__ import annotations

import asyncio
import base64
from typing import Any

import pytest

from actors.links import PeerMapDirectory, RelayPool, Transports, member_identities
from actors.messages import SyncRelays
from actors.runtime import Supervisor
from tests.support.membership import World, update
from tunnelmesh.identity import PublicIdentity
from tunnelmesh.links.relay import RelayGuard
from tunnelmesh.membership import PeerMap


@pytest.fixture(scope="module")
def world() -> World:
    return World.create()


def b64(key: bytes) -> str:
    return base64.b64encode(key).decode()


def listed(world: World, members: list[int], relays: dict[int, str] | None = None, version: int = 1
           ) -> dict[str, Any]:
    """Node 0's full map with `members`, member i offering relays[i]."""
    relays = relays or {}
    endpoints = {b64(world.wg(i)): {"addresses": [f"192.0.2.{i}:51820"], "last_seen": None,
                                    **({"relay": relays[i]} if i in relays else {})} for i in members}
    return update([world.admin_member(i) for i in (0, *members)], endpoints=endpoints, version=version)


def test_a_snapshot_is_one_version_that_later_changes_do_not_touch(world: World) -> None:
    peers = PeerMap(world.network, world.wg(0))
    peers.apply(listed(world, [1, 2]))
    before = peers.snapshot()
    peers.apply(listed(world, [2, 3], version=2))
    after = peers.snapshot()
    assert (before.version, set(before.members), set(before.endpoints)) == (1, {world.wg(1), world.wg(2)},
                                                                             {world.wg(1), world.wg(2)})
    assert (after.version, set(after.members)) == (2, {world.wg(2), world.wg(3)})
    with pytest.raises(TypeError):
        before.members[world.wg(4)] = world.entry(4)  # type: ignore[index]
    with pytest.raises(TypeError):
        del after.endpoints[world.wg(2)]  # type: ignore[attr-defined]
    with pytest.raises(AttributeError):
        after.version = 3  # type: ignore[misc]


def test_readers_follow_the_current_snapshot(world: World) -> None:
    peers = PeerMap(world.network, world.wg(0))
    peers.apply(listed(world, [1, 2]))
    current = [peers.snapshot()]
    directory = PeerMapDirectory(lambda: current[0])
    relay_identity = member_identities(lambda: current[0], world.nodes[0])

    def identity_for(wg_key: bytes) -> PublicIdentity | None:
        return asyncio.run(relay_identity(wg_key))

    ssh_key_1 = world.nodes[1].public.ssh_public_key
    assert directory.member_by_ssh_key(ssh_key_1) == world.wg(1) and directory.is_member(world.wg(1))
    assert identity_for(world.wg(1)) == world.nodes[1].public
    peers.apply(listed(world, [2], version=2))  # the owner changed the map: readers still see version 1
    assert directory.is_member(world.wg(1))
    current[0] = peers.snapshot()  # until the owner publishes the next snapshot
    assert directory.member_by_ssh_key(ssh_key_1) is None and not directory.is_member(world.wg(1))
    assert identity_for(world.wg(1)) is None and identity_for(world.wg(0)) == world.nodes[0].public


class FakeRelayClient:
    """What the pool needs of a relay client: its id, and being closed."""

    def __init__(self, relay: str) -> None:
        self.relay, self.closed = relay, False

    def close(self) -> None:
        self.closed = True


def test_the_relay_pool_replaces_the_relay_set_the_sessions_read(world: World) -> None:
    peers = PeerMap(world.network, world.wg(0))
    peers.apply(listed(world, [1, 2], {1: "http://192.0.2.1:7401"}))
    current = [peers.snapshot()]
    transports = Transports()

    def make(url: str, relay: str, guard: RelayGuard | None) -> Any:
        return FakeRelayClient(relay)

    async def scenario() -> None:
        pool = RelayPool(lambda: current[0], None, "http://198.51.100.1:7400", make, transports, Supervisor())
        await pool.setup()
        first = transports.node_relays
        assert list(first) == ["http://192.0.2.1:7401"]
        [old] = transports.relays()
        await pool.handle(SyncRelays())  # nothing changed: the same set
        assert transports.node_relays is first
        peers.apply(listed(world, [1, 2], {2: "http://192.0.2.2:7401"}, version=2))
        current[0] = peers.snapshot()
        await pool.handle(SyncRelays())
        assert list(first) == ["http://192.0.2.1:7401"]  # what a session took before is as it was
        assert list(transports.node_relays) == ["http://192.0.2.2:7401"]
        assert old.closed  # type: ignore[attr-defined]
        with pytest.raises(TypeError):
            transports.node_relays["x"] = old  # type: ignore[index]

    asyncio.run(scenario())
