"""Fuzzing every loader of a node's state files (tunnelmesh/netstate.py): network.json,
the peer map cache, revocations.json, bindings.json, policy.json, the admin's invite
ledger and admin key. Random bytes, a valid file cut short, a byte changed, a value in
its JSON replaced by another: the loader gives back the file's content or its one typed
error (StateError; MembershipError for the admin key), never another exception; a damaged
peer map cache is only ignored (issue 17, part 5). tunnelmesh.toml and network.secret
are fuzzed in test_config_fuzz.py."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.property.test_membership_fuzz import mutation
from tests.unit.test_damaged_state import NodeDir, joined_state
from tunnelmesh.admission import InviteLedger
from tunnelmesh.membership import AdminKey, InviteGrant, MembershipError
from tunnelmesh.netstate import NetworkState, StateError, invite_ledger, load_peer_map

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

Valid = tuple[NodeDir, dict[str, bytes]]


@pytest.fixture(scope="module")
def valid(tmp_path_factory: pytest.TempPathFactory) -> Valid:
    """A node's state directory as its daemon leaves it (a revoked member, a policy), with
    an invite ledger and an admin key as the admin's machine has them, and every file's bytes."""
    node = joined_state(tmp_path_factory.mktemp("state") / "node")
    with invite_ledger(node.paths.invites, node.world.network) as ledger:
        ledger.add(InviteGrant.from_wire(node.world.invite(name="later").grant, node.world.admin.public))
    node.world.admin.save(node.paths.state_dir / "admin.key")
    return node, {path.name: path.read_bytes() for path in node.paths.state_dir.iterdir() if path.is_file()}


@contextmanager
def state_dir_with(valid: Valid, name: str, content: bytes) -> Iterator[NodeDir]:
    """A copy of the valid state directory in which `name` holds `content`."""
    node, _ = valid
    with tempfile.TemporaryDirectory() as scratch:
        copy = Path(scratch) / "node"
        shutil.copytree(node.paths.state_dir, copy)
        (copy / name).write_bytes(content)
        os.chmod(copy / "admin.key", 0o600)
        paths = type(node.paths)(copy, copy / "tunnelmesh.toml")
        yield NodeDir(node.world, paths, node.me, node.gone)


def load_network_state(node: NodeDir) -> Any:
    return NetworkState.load(node.paths.network_state)


def load_map(node: NodeDir) -> Any:
    state = NetworkState.load(node.paths.network_state)
    peer_map, rejected = load_peer_map(node.paths.peer_map_cache, state)
    return peer_map.to_cache(), peer_map.bindings_to_wire(), rejected


def load_ledger(node: NodeDir) -> Any:
    with invite_ledger(node.paths.invites, node.world.network) as ledger:
        assert isinstance(ledger, InviteLedger)
        return ledger.to_wire()


def load_admin_key(node: NodeDir) -> Any:
    return AdminKey.load(node.paths.state_dir / "admin.key").public


# file name -> (loader, the one error it may raise)
LOADERS: dict[str, tuple[Callable[[NodeDir], Any], type[Exception]]] = {
    "network.json": (load_network_state, StateError),
    "peermap.json": (load_map, StateError),
    "revocations.json": (load_map, StateError),
    "bindings.json": (load_map, StateError),
    "policy.json": (load_map, StateError),
    "invites.json": (load_ledger, StateError),
    "admin.key": (load_admin_key, MembershipError),
}
names = st.sampled_from(sorted(LOADERS))


def outcome(valid: Valid, name: str, content: bytes) -> tuple[str, Any]:
    """("ok", what was loaded) or ("refused", the error's text); anything else propagates."""
    loader, error = LOADERS[name]
    with state_dir_with(valid, name, content) as node:
        try:
            return "ok", loader(node)
        except error as exc:
            return "refused", str(exc)


def check(valid: Valid, name: str, content: bytes) -> None:
    result, said = outcome(valid, name, content)
    if name == "peermap.json":  # a cache the coordinator gives back: ignored, never an error
        assert result == "ok"
    if result == "refused" and name != "admin.key":
        path_named = any(str(part).endswith(name) for part in said.split())
        assert path_named and ("restore it from a backup" in said or "cannot read" in said), said


@FUZZ
@given(names, st.binary(max_size=600))
def test_random_bytes(valid: Valid, name: str, content: bytes) -> None:
    check(valid, name, content)


@FUZZ
@given(names, st.integers(min_value=0, max_value=1 << 20))
def test_a_valid_file_cut_short(valid: Valid, name: str, cut: int) -> None:
    raw = valid[1][name]
    check(valid, name, raw[: cut % len(raw)])


@FUZZ
@given(names, st.integers(min_value=0, max_value=1 << 20), st.integers(min_value=1, max_value=255))
def test_a_byte_changed(valid: Valid, name: str, where: int, xor: int) -> None:
    raw = bytearray(valid[1][name])
    raw[where % len(raw)] ^= xor
    check(valid, name, bytes(raw))


@FUZZ
@given(st.sampled_from(sorted(n for n in LOADERS if n.endswith(".json"))), st.data())
def test_values_in_the_json_changed(valid: Valid, name: str, data: st.DataObject) -> None:
    changed = data.draw(mutation(json.loads(valid[1][name])), label="changed")
    check(valid, name, json.dumps(changed).encode())


def test_the_valid_files_load(valid: Valid) -> None:
    """The baseline the mutations start from: every file as it is loads."""
    for name in LOADERS:
        assert outcome(valid, name, valid[1][name])[0] == "ok", name
