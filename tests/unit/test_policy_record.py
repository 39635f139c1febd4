"""The network policy as an admin-signed record (tunnelmesh.membership.PolicyRecord), the
node's PeerMap keeping the highest version it verified, and the kept file beside the
peer map cache (tunnelmesh.netstate) that no lost cache or coordinator can roll back.

Every refusal is checked by its message, so a test cannot pass because a record was
refused for another reason than the one it is about."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from tests.support.membership import JSON, NOW, World, resign, update
from tunnelmesh.filter import STARTER_POLICY, parse_policy
from tunnelmesh.membership import MAX_POLICY_TEXT, MembershipError, PeerMap, PolicyRecord
from tunnelmesh.netstate import NetworkState, StateError, load_peer_map, load_policy, save_peer_map

OPEN_SSH = STARTER_POLICY + '\n[[allow]]\nfrom = "*"\nproto = "tcp"\nports = [22]\n'
#: A policy whose error is on line 4 (a port out of range).
BAD_PORT = '[[allow]]\nfrom = "*"\nproto = "tcp"\nports = [70000]\n'


@pytest.fixture(scope="module")
def world() -> World:
    return World.create()


@pytest.fixture(scope="module")
def other() -> World:
    return World.create()


def record(world: World, version: int, text: str = STARTER_POLICY, issued: int = NOW) -> PolicyRecord:
    return PolicyRecord.create(world.admin, version, text, issued)


def wire(world: World, version: int, text: str = STARTER_POLICY) -> JSON:
    return record(world, version, text).to_wire()


def with_body(signed: JSON, **body: Any) -> JSON:
    changed = copy.deepcopy(signed)
    changed["body"].update(body)
    return changed


# --- the record ---------------------------------------------------------------------------------


def test_a_signed_policy_verifies_and_round_trips(world: World) -> None:
    made = record(world, 3, OPEN_SSH)
    parsed = PolicyRecord.from_wire(json.loads(json.dumps(made.to_wire())), world.network)
    assert parsed == made and (parsed.version, parsed.text, parsed.issued) == (3, OPEN_SSH, NOW)
    assert parsed.network == world.network.network
    assert len(parse_policy(parsed.text).rules) == 2


def test_a_policy_signed_by_another_key_is_refused(world: World, other: World) -> None:
    forged = resign(wire(world, 2), other.admin, "policy")
    with pytest.raises(MembershipError, match="network policy v2: signature does not verify"):
        PolicyRecord.from_wire(forged, world.network)


def test_a_policy_of_another_network_is_refused(world: World, other: World) -> None:
    with pytest.raises(MembershipError, match="network policy is for another network"):
        PolicyRecord.from_wire(wire(other, 2), world.network)


@pytest.mark.parametrize(("field", "value"), [("text", OPEN_SSH), ("version", 9), ("issued", NOW + 1)])
def test_a_tampered_policy_is_refused(field: str, value: Any, world: World) -> None:
    with pytest.raises(MembershipError, match="signature does not verify"):
        PolicyRecord.from_wire(with_body(wire(world, 2), **{field: value}), world.network)


def test_a_policy_record_signed_as_another_kind_is_refused(world: World) -> None:
    as_secret = resign(wire(world, 2), world.admin, "secret")
    with pytest.raises(MembershipError, match="signature does not verify"):
        PolicyRecord.from_wire(as_secret, world.network)


def test_an_invalid_policy_is_refused_when_signed_and_when_verified_with_its_line_and_reason(world: World) -> None:
    reason = r"network policy v2:4: network rule 1: ports: 70000: ports are 0 to 65535"
    with pytest.raises(MembershipError, match=reason):
        record(world, 2, BAD_PORT)
    signed_anyway = resign(with_body(wire(world, 2), text=BAD_PORT), world.admin, "policy")  # an admin's own bug
    with pytest.raises(MembershipError, match=reason):
        PolicyRecord.from_wire(signed_anyway, world.network)


def test_an_oversized_policy_is_refused_before_its_signature_is_checked(world: World) -> None:
    big = STARTER_POLICY + "#" * (MAX_POLICY_TEXT - len(STARTER_POLICY)) + "\n"
    with pytest.raises(MembershipError, match="larger than 64 KiB"):
        record(world, 2, big)
    with pytest.raises(MembershipError, match="expected text of at most 65536 characters"):
        PolicyRecord.from_wire(with_body(wire(world, 2), text=big), world.network)
    multibyte = STARTER_POLICY + "# " + "é" * (MAX_POLICY_TEXT // 2) + "\n"  # few characters, many bytes
    with pytest.raises(MembershipError, match="larger than 64 KiB"):
        PolicyRecord.from_wire(resign(with_body(wire(world, 2), text=multibyte), world.admin, "policy"),
                               world.network)


@pytest.mark.parametrize(("change", "match"), [
    ({"version": 0}, "network policy version: expected an integer from 1"),
    ({"version": "2"}, "network policy version: expected an integer"),
    ({"text": None}, "network policy text: expected text"),
    ({"issued": -1}, "issued: expected an integer"),
])
def test_malformed_policy_fields_are_refused(change: JSON, match: str, world: World) -> None:
    with pytest.raises(MembershipError, match=match):
        PolicyRecord.from_wire(resign(with_body(wire(world, 2), **change), world.admin, "policy"), world.network)


def test_a_policy_with_missing_or_extra_keys_is_refused(world: World) -> None:
    extra = resign(with_body(wire(world, 2), to="everyone"), world.admin, "policy")
    with pytest.raises(MembershipError, match="network policy body: unexpected 'to'"):
        PolicyRecord.from_wire(extra, world.network)
    with pytest.raises(MembershipError, match="network policy: missing sig"):
        PolicyRecord.from_wire({"body": wire(world, 2)["body"]}, world.network)


# --- the peer map ------------------------------------------------------------------------------


def with_policy(policy: JSON | None, version: int = 1, full: bool = True) -> JSON:
    sent = update(version=version, full=full)
    if policy is not None:
        sent["policy"] = policy
    return sent


def test_a_newer_policy_replaces_the_kept_one_and_is_reported(world: World) -> None:
    peer_map = PeerMap(world.network, world.wg(0))
    first = peer_map.apply(with_policy(wire(world, 1)))
    assert first.new_policy == record(world, 1) and peer_map.snapshot().policy == record(world, 1)
    again = peer_map.apply(with_policy(wire(world, 1), version=2))
    assert again.new_policy is None and again.rejected == []  # every full map carries it
    newer = peer_map.apply(with_policy(wire(world, 2, OPEN_SSH), version=3, full=False))
    assert newer.new_policy is not None and newer.new_policy.version == 2
    assert peer_map.policy is not None and peer_map.policy.text == OPEN_SSH
    assert peer_map.snapshot().policy == peer_map.policy


def test_an_older_policy_is_refused_and_counted(world: World) -> None:
    peer_map = PeerMap(world.network, world.wg(0))
    peer_map.apply(with_policy(wire(world, 3, OPEN_SSH)))
    replayed = peer_map.apply(with_policy(wire(world, 2), version=5))  # the map's own version is newer
    assert replayed.new_policy is None
    assert replayed.rejected == ["network policy refused: version 2 is older than version 3, which this node has "
                                 "(a replayed policy)"]
    assert peer_map.rejected["network policy refused"] == 1
    assert peer_map.policy is not None and peer_map.policy.version == 3 and peer_map.version == 5


def test_another_record_with_the_kept_version_is_refused(world: World) -> None:
    peer_map = PeerMap(world.network, world.wg(0))
    peer_map.apply(with_policy(wire(world, 2)))
    changes = peer_map.apply(with_policy(wire(world, 2, OPEN_SSH), version=2))
    assert changes.rejected == ["network policy refused: another record with version 2, which this node has (the "
                                "one it verified first stays)"]
    assert peer_map.policy is not None and peer_map.policy.text == STARTER_POLICY


def test_a_forged_policy_is_refused_and_the_kept_one_stays(world: World, other: World) -> None:
    peer_map = PeerMap(world.network, world.wg(0))
    peer_map.apply(with_policy(wire(world, 1)))
    forged = resign(wire(world, 2, OPEN_SSH), other.admin, "policy")
    changes = peer_map.apply(with_policy(forged, version=2))
    assert changes.rejected == ["network policy refused: network policy v2: signature does not verify"]
    assert changes.new_policy is None and peer_map.policy == record(world, 1)


def test_a_map_without_a_policy_leaves_the_kept_one_in_force(world: World) -> None:
    peer_map = PeerMap(world.network, world.wg(0))
    peer_map.apply(with_policy(wire(world, 1)))
    changes = peer_map.apply(with_policy(None, version=2))
    assert changes.new_policy is None and changes.rejected == [] and peer_map.policy == record(world, 1)


def test_a_network_without_a_policy_has_none_in_its_snapshot(world: World) -> None:
    """A network from before the packet filter: the map never carries one (the filter
    actor then keeps the behaviour from before it: docs/filter.md)."""
    peer_map = PeerMap(world.network, world.wg(0))
    peer_map.apply(update(version=1))
    assert peer_map.snapshot().policy is None and "policy" not in peer_map.to_cache()


# --- kept on disk ------------------------------------------------------------------------------


@pytest.fixture
def state(world: World) -> NetworkState:
    return NetworkState("https://coordinator.example:7400", world.network, world.entry(0))


def test_the_policy_survives_a_reload_and_the_loss_of_the_cache(tmp_path: Path, world: World,
                                                                 state: NetworkState) -> None:
    cache = tmp_path / "peermap.json"
    peer_map = PeerMap(world.network, world.wg(0))
    peer_map.apply(with_policy(wire(world, 2, OPEN_SSH)))
    save_peer_map(cache, peer_map)
    reloaded, rejected = load_peer_map(cache, state)
    assert rejected == [] and reloaded.policy == peer_map.policy and reloaded.snapshot().policy == peer_map.policy

    cache.unlink()  # the cache may be lost; the kept policy may not
    reloaded, _ = load_peer_map(cache, state)
    assert reloaded.policy == peer_map.policy
    changes = reloaded.apply(with_policy(wire(world, 1), version=1))
    assert changes.rejected == ["network policy refused: version 1 is older than version 2, which this node has "
                                "(a replayed policy)"]
    assert load_policy(cache, world.network) == peer_map.policy


def test_a_newer_policy_replaces_the_kept_file(tmp_path: Path, world: World, state: NetworkState) -> None:
    cache = tmp_path / "peermap.json"
    peer_map = PeerMap(world.network, world.wg(0))
    peer_map.apply(with_policy(wire(world, 1)))
    save_peer_map(cache, peer_map)
    peer_map.apply(with_policy(wire(world, 4, OPEN_SSH), version=2))
    save_peer_map(cache, peer_map)
    kept = load_policy(cache, world.network)
    assert kept is not None and kept.version == 4


def test_a_damaged_kept_policy_is_an_error_that_says_what_to_do(tmp_path: Path, world: World,
                                                                state: NetworkState) -> None:
    cache = tmp_path / "peermap.json"
    (tmp_path / "policy.json").write_text(json.dumps(with_body(wire(world, 2), text=OPEN_SSH)))
    with pytest.raises(StateError, match=r"policy.json is damaged \(network policy v2: signature does not verify\); "
                                         "restore it from a backup, or remove it"):
        load_peer_map(cache, state)


def test_a_kept_policy_of_another_network_is_ignored(tmp_path: Path, world: World, other: World,
                                                     state: NetworkState) -> None:
    """A revoked node that joined another network keeps its files: the old network's
    policy is no policy of the new one."""
    cache = tmp_path / "peermap.json"
    (tmp_path / "policy.json").write_text(json.dumps(wire(other, 7)))
    peer_map, rejected = load_peer_map(cache, state)
    assert peer_map.policy is None and rejected == []
    peer_map.apply(with_policy(wire(world, 1)))
    save_peer_map(cache, peer_map)
    assert load_policy(cache, world.network) == record(world, 1)
