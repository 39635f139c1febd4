"""Unit tests for tunnelmesh.netstate: the node's membership files (no network)."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import stat
import time
from pathlib import Path

import asyncssh
import pytest

from tunnelmesh.config import read_network_secret
from tunnelmesh.identity import NodeIdentity, load_identity
from tunnelmesh.membership import (
    MembershipError,
    DEFAULT_CIDR,
    AdminKey,
    MemberEntry,
    NetworkInfo,
    PeerMap,
    Revocation,
    member_body,
    sign_member_as_admin,
)
from tunnelmesh.netstate import NetworkState, StateError, load_peer_map, save_peer_map, write_atomic, save_network_secret


def make_identity(tmp_path: Path, name: str) -> NodeIdentity:
    key = asyncssh.generate_private_key("ssh-ed25519")
    path = tmp_path / name
    path.write_bytes(key.export_private_key())
    path.chmod(0o600)
    return asyncio.run(load_identity(str(path)))


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> tuple[AdminKey, NetworkInfo, list[MemberEntry]]:
    tmp = tmp_path_factory.mktemp("keys")
    admin = AdminKey.generate()
    now = int(time.time())
    network = NetworkInfo.create(admin, DEFAULT_CIDR, now)
    members = []
    for index, name in enumerate(["a", "b", "c"], 1):
        identity = make_identity(tmp, name)
        ipv4, ipv6 = network.host(index)
        body = member_body(network.network, name, identity.public, ipv4, ipv6, now)
        members.append(MemberEntry.from_wire(sign_member_as_admin(body, admin), network))
    return admin, network, members


def test_write_atomic_replaces_whole_and_sets_mode(tmp_path: Path) -> None:
    path = tmp_path / "f"
    write_atomic(path, b"one", secret=True)
    write_atomic(path, b"two", secret=True)
    assert path.read_bytes() == b"two"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["f"]


def test_write_atomic_failure_keeps_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "sub" / "f"
    with pytest.raises(StateError, match="previous version is kept"):
        write_atomic(path, b"x")  # no such directory
    target = tmp_path / "g"
    target.write_bytes(b"old")

    def full_disk(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(StateError, match="No space left"):
        write_atomic(target, b"new")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g"]  # no temp file left behind


def test_save_network_secret_is_readable_as_network_secret(tmp_path: Path) -> None:
    path = tmp_path / "network.secret"
    save_network_secret(path, bytes(range(32)))
    assert read_network_secret(path) == bytes(range(32))


def test_network_state_round_trip_and_refusals(tmp_path: Path, world) -> None:
    admin, network, members = world
    path = tmp_path / "network.json"
    NetworkState("http://192.0.2.1:7400", network, members[0]).save(path)
    loaded = NetworkState.load(path)
    assert loaded.member == members[0] and loaded.network == network

    data = json.loads(path.read_text())
    data["member"]["body"]["ipv4"] = str(network.host(9)[0])
    path.write_text(json.dumps(data))
    with pytest.raises(StateError, match="does not verify"):
        NetworkState.load(path)
    path.write_text("{not json")
    with pytest.raises(StateError, match="damaged"):
        NetworkState.load(path)
    with pytest.raises(StateError, match="tunnelmesh join"):
        NetworkState.load(tmp_path / "missing.json")


def test_peer_map_cache_keeps_revocations_and_survives_garbage(tmp_path: Path, world) -> None:
    admin, network, members = world
    state = NetworkState("http://192.0.2.1:7400", network, members[0])
    path = tmp_path / "peermap.json"
    peer_map = PeerMap(network, members[0].wg_key)
    update = {"version": 2, "full": True, "members": [m.to_wire() for m in members], "revocations": [],
              "secret": None, "endpoints": {}}
    peer_map.apply(update)
    revocation = Revocation.create(admin, members[2], int(time.time()) + 1)
    peer_map.apply({**update, "version": 3, "full": False, "members": [], "revocations": [revocation.to_wire()]})
    save_peer_map(path, peer_map)

    loaded, rejected = load_peer_map(path, state)
    assert set(loaded.members) == {members[1].wg_key}
    assert members[2].wg_key in loaded.revocations
    # Replaying the old full map (still listing c) is refused, and as a newer version it
    # changes nothing either (the revocation is kept).
    with pytest.raises(MembershipError, match="older than version 3"):
        loaded.apply(update)
    loaded.apply({**update, "version": 4})
    assert set(loaded.members) == {members[1].wg_key}
    # Bindings are kept beside the cache, for good.
    assert json.loads((tmp_path / "bindings.json").read_text())["bindings"][f"name:{members[1].name}"]

    path.write_text("[]")
    empty, rejected = load_peer_map(path, state)
    assert not empty.members and rejected and "ignored" in rejected[0]
    # The damaged cache is dropped; the revocation is not (it lives in revocations.json).
    assert members[2].wg_key in empty.revocations
    empty.apply(update)
    assert set(empty.members) == {members[1].wg_key}
    path.unlink()
    (tmp_path / "revocations.json").write_text("{}")
    with pytest.raises(StateError, match="restore it from a backup"):
        load_peer_map(path, state)
    (tmp_path / "revocations.json").unlink()
    empty, rejected = load_peer_map(tmp_path / "absent.json", state)
    assert not empty.members and rejected == []
