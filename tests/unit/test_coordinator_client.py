"""The coordinator client hands the mesh every change of a large map however small the
mesh's mailbox: membership changes are awaited, candidates kept as the latest per peer
(issue 12, item 3). Through the real `CoordinatorClient.apply`, no network."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from actors.control import EventBus
from actors.coordinator_client import CoordinatorClient
from actors.messages import AddPeers, RemovePeer, SetCandidates, SyncPeers
from actors.runtime import Actor
from tests.support.membership import NOW, World, identities, update
from tunnelmesh.membership import NetworkInfo, PeerMap
from tunnelmesh.netstate import NetworkState

MEMBERS = 1000


class RecordingMesh(Actor):
    """Stands in for the mesh actor: a small mailbox, and a yield per message, so the
    client's messages pile up behind it."""

    name = "mesh"
    mailbox_size = 4

    def __init__(self) -> None:
        super().__init__()
        self.members: dict[bytes, tuple[tuple[str, int], ...]] = {}  # key -> candidates now
        self.removed: list[bytes] = []

    async def handle(self, message: Any) -> None:
        await asyncio.sleep(0)
        if isinstance(message, AddPeers):
            self.members.update((spec.wg_key, spec.candidates) for spec in message.specs)
        elif isinstance(message, SetCandidates):
            assert message.wg_key in self.members, "candidates for a peer the mesh was not given"
            self.members[message.wg_key] = message.addresses
        elif isinstance(message, RemovePeer):
            self.removed.append(message.wg_key)
            del self.members[message.wg_key]
        elif isinstance(message, SyncPeers):
            wanted = {spec.wg_key: spec.candidates for spec in message.specs}
            self.members = {key: self.members.get(key, wanted[key]) for key in wanted}


@pytest.fixture(scope="module")
def world() -> World:
    admin = World.create().admin
    return World(admin, NetworkInfo.create(admin, "100.64.0.0/22", NOW - 10_000), identities(MEMBERS + 1))


def candidate(i: int, round_: int) -> tuple[str, int]:
    """Where member i is registered in this round: every round moves every member."""
    return f"192.0.2.{i % 250 + 1}", 10_000 + round_ * 2_000 + i


def full_map(world: World, entries: list[dict[str, Any]], members: range, round_: int, version: int
             ) -> dict[str, Any]:
    """Node 0 and `members`, each registered at its address of this round."""
    endpoints = {base64.b64encode(world.wg(i)).decode(): {"addresses": ["%s:%d" % candidate(i, round_)],
                                                          "last_seen": NOW}
                 for i in members}
    return update([entries[i] for i in (0, *members)], endpoints=endpoints, version=version)


def node0_client(world: World, mesh: RecordingMesh, tmp_path: Path,
                 on_map_changed: list[Callable[[], None]] | None = None) -> CoordinatorClient:
    """Node 0's coordinator client (never run: the test hands it the updates)."""
    state = NetworkState("https://coordinator.example:7400", world.network, world.entry(0))
    return CoordinatorClient(state, world.nodes[0], PeerMap(world.network, world.wg(0)), mesh,  # type: ignore[arg-type]
                             EventBus(), cache_path=tmp_path / "peermap.json", secret_path=tmp_path / "secret",
                             listen_port=51820, on_revoked=lambda why: None, on_map_changed=on_map_changed)


def test_a_full_resync_of_a_large_map_loses_no_member_and_no_candidate(world: World, tmp_path: Path) -> None:
    everyone = range(1, MEMBERS + 1)
    entries = [world.admin_member(i) for i in range(MEMBERS + 1)]

    async def scenario() -> RecordingMesh:
        mesh = RecordingMesh()
        client = node0_client(world, mesh, tmp_path)
        running = asyncio.create_task(mesh.run())
        await client.apply(full_map(world, entries, everyone, 0, 1))  # every member added
        await client.apply(full_map(world, entries, everyone, 1, 2))  # every member moved ...
        await client.apply(full_map(world, entries, everyone, 2, 3))  # ... twice before the mesh caught up
        await client.apply(full_map(world, entries, range(1, MEMBERS // 2 + 1), 2, 4))  # half no longer listed
        await mesh.ask("barrier")  # everything told before it is handled
        running.cancel()
        assert mesh.dropped_messages == 0
        return mesh

    mesh = asyncio.run(scenario())
    kept = range(1, MEMBERS // 2 + 1)
    assert mesh.members == {world.wg(i): (candidate(i, 2),) for i in kept}
    assert sorted(mesh.removed) == sorted(world.wg(i) for i in range(MEMBERS // 2 + 1, MEMBERS + 1))


def test_the_snapshot_is_replaced_after_each_update_and_readers_are_called_with_it(world: World,
                                                                                  tmp_path: Path) -> None:
    entries = [world.admin_member(i) for i in range(4)]

    async def scenario() -> None:
        mesh = RecordingMesh()
        running = asyncio.create_task(mesh.run())
        seen: list[int] = []
        client = node0_client(world, mesh, tmp_path, [lambda: seen.append(len(client.snapshot.members))])
        empty = client.snapshot
        await client.apply(full_map(world, entries, range(1, 4), 0, 1))
        first = client.snapshot
        await client.apply(full_map(world, entries, range(1, 3), 0, 2))
        assert (len(empty.members), len(first.members), len(client.snapshot.members)) == (0, 3, 2)
        assert (first.version, client.snapshot.version) == (1, 2)
        assert seen == [3, 2]  # each reader called once the new snapshot is in place
        running.cancel()

    asyncio.run(scenario())


class FailingOnceMesh(RecordingMesh):
    """A mesh whose first AddPeers fails (as an ask that timed out would)."""

    failed = False

    async def handle(self, message: Any) -> None:
        if isinstance(message, AddPeers) and not self.failed:
            self.failed = True
            raise TimeoutError("the mesh did not answer in time")
        await super().handle(message)


def test_a_client_restarted_after_a_failed_change_hands_the_mesh_all_it_missed(world: World, tmp_path: Path) -> None:
    entries = [world.admin_member(i) for i in range(4)]
    calls: list[int] = []

    async def scenario() -> RecordingMesh:
        mesh = FailingOnceMesh()
        runner = asyncio.ensure_future(mesh.run())
        client = node0_client(world, mesh, tmp_path, on_map_changed=[lambda: calls.append(client.snapshot.version)])
        await client.setup()  # the first start: nothing to hand on yet
        with pytest.raises(TimeoutError):  # the actor crashes: the map took members 1-3, the mesh did not
            await client.apply(full_map(world, entries, range(1, 4), 0, version=3))
        assert mesh.members == {} and calls == []
        await client.setup()  # what the supervisor's restart runs first
        await mesh.ask("barrier")  # everything told before it is handled
        runner.cancel()
        return mesh

    mesh = asyncio.run(scenario())
    assert mesh.members == {world.wg(i): (candidate(i, 0),) for i in range(1, 4)}
    assert calls == [3]  # the readers (SSH directory, relays, filter) hear of the map they missed
