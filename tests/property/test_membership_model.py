"""A model test of a node's membership state (issue 13): random sequences of admin-signed
entries, invite-signed entries, forged records, revocations, replays and rollbacks,
delivered in random orders, never give the node a binding the admin did not sign for.

The attacker here is the coordinator together with whoever holds invite keys: it picks
what each update lists, its version and whether it is full, replays anything it has seen,
and signs with every invite key (valid, expired or used up). Only the admin key is out of
its reach."""

from __future__ import annotations

import copy
from typing import Any

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.membership import NOW, World, reattested, update
from tunnelmesh.membership import (
    MemberEntry,
    MembershipError,
    PeerMap,
    Revocation,
    bindings_of,
    canonical,
    member_body,
    sign_member_as_admin,
    sign_member_with_invite,
)

WORLD = World.create()
NAMES = ("alpha", "beta", "gamma")
HOSTS = (2, 3, 4)
# Identities: the six test keys, plus a second X25519 key attested by node 1's SSH key
# (what a revoked member would make up to come back).
IDENTITIES = [node.public for node in WORLD.nodes[1:]] + [
    reattested(WORLD.nodes[1], X25519PrivateKey.generate().public_key().public_bytes_raw())]
INVITES = [WORLD.invite(uses=1), WORLD.invite(uses=0), WORLD.invite(created=NOW - 9000, expires=NOW - 5000)]

operation = st.one_of(
    st.tuples(st.just("admin"), st.integers(0, len(IDENTITIES) - 1), st.sampled_from(NAMES),
              st.sampled_from(HOSTS), st.integers(NOW - 100, NOW + 100)),
    st.tuples(st.just("invite"), st.integers(0, len(IDENTITIES) - 1), st.sampled_from(NAMES),
              st.sampled_from(HOSTS), st.integers(0, len(INVITES) - 1)),
    st.tuples(st.just("revoke"), st.integers(0, len(IDENTITIES) - 1), st.integers(NOW - 100, NOW + 100)),
    st.tuples(st.just("deliver"), st.lists(st.integers(0, 40), max_size=4), st.booleans(), st.integers(0, 12)),
    st.tuples(st.just("replay"), st.integers(0, 40)),
)


def _entry(kind: str, identity: int, name: str, host: int, extra: int) -> dict[str, Any]:
    ipv4, ipv6 = WORLD.network.host(host)
    if kind == "admin":
        return sign_member_as_admin(member_body(WORLD.network.network, name, IDENTITIES[identity], ipv4, ipv6, extra),
                                    WORLD.admin)
    body = member_body(WORLD.network.network, name, IDENTITIES[identity], ipv4, ipv6, NOW)
    return sign_member_with_invite(body, INVITES[extra])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(operation, min_size=1, max_size=30))
def test_no_binding_without_the_admins_signature(operations: list[tuple[Any, ...]]) -> None:
    node = PeerMap(WORLD.network, WORLD.wg(0))
    node.apply(update([WORLD.admin_member(0)]))  # this node itself, host 1
    admin_signed: set[bytes] = {canonical(WORLD.admin_member(0)["body"])}
    records: list[dict[str, Any]] = []  # everything made so far, as the coordinator holds it
    revocations: list[dict[str, Any]] = []
    delivered: list[dict[str, Any]] = []
    for op in operations:
        kind = op[0]
        if kind in ("admin", "invite"):
            entry = _entry(*op)
            if kind == "admin":
                admin_signed.add(canonical(entry["body"]))
            records.append(entry)
            continue
        if kind == "revoke":
            target = IDENTITIES[op[1]]
            ipv4, ipv6 = WORLD.network.host(HOSTS[0])
            stand_in = sign_member_as_admin(member_body(WORLD.network.network, "x", target, ipv4, ipv6, NOW), WORLD.admin)
            revocation = Revocation.create(WORLD.admin, MemberEntry.from_wire(stand_in, WORLD.network), op[2])
            revocations.append(revocation.to_wire())
            continue
        if kind == "deliver":
            chosen = [records[i % len(records)] for i in op[1]] if records else []
            message = update(chosen, revocations, full=op[2], version=op[3])
        else:  # replay something delivered before, as it was
            if not delivered:
                continue
            message = copy.deepcopy(delivered[op[1] % len(delivered)])
        before_version = node.version
        before_bindings = dict(node.bindings)
        try:
            node.apply(message)
        except MembershipError:
            assert message["version"] < before_version  # only a rollback refuses a whole update here
            continue
        delivered.append(message)
        _check(node, admin_signed, before_version, before_bindings)


def _check(node: PeerMap, admin_signed: set[bytes], before_version: int, before_bindings: dict[str, bytes]) -> None:
    assert node.version >= before_version
    current = [*node.members.values(), *([node.own] if node.own is not None else [])]
    for member in current:
        assert member.grant is None, "an invite-signed entry became a member"
        assert canonical(member.body()) in admin_signed, "a member the admin did not sign"
        assert node.revoked(member) is None, "a revoked member is listed"
    for binding in ("name", "ipv4", "ssh"):
        values = [b for m in current for b in bindings_of(m) if b.startswith(binding)]
        assert len(values) == len(set(values)), f"two members share a {binding}"
    for member in current:
        for binding in bindings_of(member):
            assert node.bindings[binding] == member.wg_key
    for binding, holder in before_bindings.items():
        if node.bindings[binding] != holder:
            assert node.key_revoked(holder), f"{binding} moved from a key that is not revoked"
