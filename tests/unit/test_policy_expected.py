"""A coordinator cannot switch the packet filter off on a new node by withholding the
network policy (issue 14, docs/filter.md "What is in force"): the invite token carries
the policy version in force, the node keeps it in network.json, and a node that knows a
policy exists but has not verified one denies instead of letting everything in."""

from __future__ import annotations

import base64
import ipaddress
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pytest

from actors.filter import FilterActor, FilterInputs
from tests.support.coordinator import AdminMachine, now
from tests.support.coordinator import World as ServedWorld
from tests.support.membership import World
from tunnelmesh.clock import SystemClock
from tunnelmesh.filter import STARTER_POLICY, Member, PacketFilter, parse_node_rules_text
from tunnelmesh.membership import TOKEN_PREFIX, MembershipError, PolicyRecord, Token, canonical, make_invite
from tunnelmesh.netstate import NetworkState, StateError, keep_policy, load_policy
from tunnelmesh.network import make_token

URL = "https://192.0.2.1:7400"
PEER = Member("a", bytes(range(32)), ipaddress.IPv4Address("100.64.0.2"), None)
LOCAL = Member("b", bytes(range(1, 33)), ipaddress.IPv4Address("100.64.0.3"), None)
SSH_FROM_ALL = '[[allow]]\nfrom = "*"\nproto = "tcp"\nports = [22]\n'


def payload(token: str) -> dict[str, Any]:
    data = token[len(TOKEN_PREFIX):]
    return json.loads(base64.urlsafe_b64decode(data + "=" * (-len(data) % 4)))  # type: ignore[no-any-return]


def encoded(fields: dict[str, Any]) -> str:
    return TOKEN_PREFIX + base64.urlsafe_b64encode(canonical(fields)).decode().rstrip("=")


# --- the token and network.json ---------------------------------------------------------------


def test_an_invite_carries_the_policy_version_in_force() -> None:
    token = make_invite(World.create().admin, URL, name=None, expires=2000, uses=1, now=1000, policy=4)
    assert Token.parse(token.encode()).policy == 4


def test_a_token_without_a_policy_version_reads_as_before_and_says_none() -> None:
    token = make_invite(World.create().admin, URL, name=None, expires=2000, uses=1, now=1000).encode()
    assert "policy" not in payload(token)  # a network without a policy makes the tokens it made before
    assert Token.parse(token).policy == 0


@pytest.mark.parametrize("value", [-1, "3", True, 1.5])
def test_a_malformed_policy_version_in_a_token_is_refused(value: object) -> None:
    fields = payload(make_invite(World.create().admin, URL, name=None, expires=2000, uses=1, now=1000).encode())
    with pytest.raises(MembershipError, match="join token: network policy version: expected an integer"):
        Token.parse(encoded({**fields, "policy": value}))


def test_network_json_keeps_the_expected_version_and_an_old_one_reads_as_none(tmp_path: Path) -> None:
    world = World.create()
    path = tmp_path / "network.json"
    NetworkState(URL, world.network, world.entry(0), policy_expected=3).save(path)
    assert NetworkState.load(path).policy_expected == 3
    old = json.loads(path.read_text())
    del old["policy_expected"]  # as `join` wrote it before the packet filter
    path.write_text(json.dumps(old))
    assert NetworkState.load(path).policy_expected == 0
    path.write_text(json.dumps({**old, "policy_expected": "3"}))
    with pytest.raises(StateError, match="policy_expected: expected an integer of at least 0"):
        NetworkState.load(path)


def test_invite_puts_the_admins_kept_policy_version_in_the_token(tmp_path: Path) -> None:
    world = ServedWorld.create()
    machine = AdminMachine.create(tmp_path / "admin", "http://127.0.0.1:9", world, world.admin_member(0, "admin", 1))
    assert Token.parse(make_token(machine.paths, expires_in=600, reusable=False, name=None)).policy == 0
    cache = machine.paths.peer_map_cache
    keep_policy(cache, world.network, PolicyRecord.create(world.admin, 3, STARTER_POLICY, now()))
    keep_policy(cache, world.network, PolicyRecord.create(world.admin, 2, STARTER_POLICY, now()))  # never lowered
    assert (kept := load_policy(cache, world.network)) is not None and kept.version == 3
    assert Token.parse(make_token(machine.paths, expires_in=600, reusable=False, name=None)).policy == 3


# --- the filter actor: what is in force ---------------------------------------------------------


@dataclass
class Record:
    version: int
    text: str


@dataclass
class DataPath:
    """What the filter actor sets: the filter the data path consults per packet."""

    filter: PacketFilter | None = None


def filter_actor(inputs: FilterInputs, node_rules: str | None = None) -> tuple[FilterActor, DataPath]:
    datapath = DataPath()
    rules = parse_node_rules_text(node_rules) if node_rules is not None else None
    actor = FilterActor(cast(Any, datapath), local=LOCAL, node_rules=rules, inputs=lambda: inputs, network=True,
                        clock=SystemClock())
    actor.compile()
    return actor, datapath


def test_no_policy_and_none_expected_runs_no_filter_as_before() -> None:
    actor, datapath = filter_actor(FilterInputs((PEER, LOCAL), None, 0))
    assert datapath.filter is None and actor.in_force.startswith("network policy: none set (a network from before")


def test_a_withheld_policy_that_the_invite_announced_denies_all_but_the_nodes_own_rules() -> None:
    actor, datapath = filter_actor(FilterInputs((PEER, LOCAL), None, 2))
    assert datapath.filter is not None
    assert datapath.filter.explain(PEER.key, "tcp", 22)[0] is False
    assert datapath.filter.explain(PEER.key, "icmp")[0] is False
    assert actor.in_force == ("network policy v>=2 expected, not received from the coordinator yet: denying; no "
                              "rules only: all other inbound traffic is denied except replies")
    assert actor.status().enabled and actor.status().policy_version is None

    own, own_path = filter_actor(FilterInputs((PEER, LOCAL), None, 2),
                                 '[[filter.allow]]\nfrom = "a"\nproto = "tcp"\nports = [80]\n')
    assert own_path.filter is not None and own_path.filter.explain(PEER.key, "tcp", 80)[0] is True
    assert own.in_force.startswith("network policy v>=2 expected, not received from the coordinator yet: denying; "
                                   "this node's [filter] rules (1) only")


def test_an_older_policy_than_the_invite_announced_is_not_taken_and_the_announced_one_is() -> None:
    inputs = FilterInputs((PEER, LOCAL), Record(1, SSH_FROM_ALL), 2)  # a replay of v1 to a node invited at v2
    actor, datapath = filter_actor(inputs)
    assert datapath.filter is not None and datapath.filter.explain(PEER.key, "tcp", 22)[0] is False
    assert actor.in_force.startswith("network policy v>=2 expected, not received from the coordinator yet")

    actor.inputs = lambda: FilterInputs((PEER, LOCAL), Record(2, SSH_FROM_ALL), 2)
    actor.compile()
    assert datapath.filter.explain(PEER.key, "tcp", 22)[0] is True
    assert actor.in_force.startswith("network policy v2 (1 rule for this node)")
