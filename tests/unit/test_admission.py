"""The admin's side of admission (tunnelmesh.admission, sans-IO): what the admin key
checks before it countersigns a join made with an invite (issue 13, defects 1 and 2).

Only admin-signed member entries are members, so whoever holds an invite key -- every
member that joined with a token keeps one, old and expired tokens too -- together with
a coordinator cannot admit a member or rebind a name or address: each case here is
refused by `countersign_invited`, and the invite-signed entry alone is no member on any
node (`PeerMap` refuses it; before the change a node took it whenever its `joined`,
chosen by the joiner, fell inside the invite's validity).
"""

from __future__ import annotations

import asyncio
import os
import re
from typing import Any

import pytest

from tests.support.membership import JSON, NOW, World, reattested, update
from tunnelmesh.admission import InviteLedger, countersign_invited, sealed_secret
from tunnelmesh.identity import PublicIdentity
from tunnelmesh.membership import (
    JOIN_NAMESPACE,
    InviteGrant,
    MemberEntry,
    MembershipError,
    PeerMap,
    Token,
    b64,
    join_proof_message,
    member_body,
    sign_member_with_invite,
    unb64,
    unseal,
)


@pytest.fixture(scope="module")
def world() -> World:
    return World.create()


class Admin:
    """The admin's machine: its ledger of invites made and its peer map (the admin node
    is node 0; node 1 is a member that joined before)."""

    def __init__(self, world: World) -> None:
        self.world = world
        self.ledger = InviteLedger()
        self.peer_map = PeerMap(world.network, world.wg(0))
        self.peer_map.apply(update([world.admin_member(0), world.admin_member(1)], version=1))

    def invite(self, *, kept: bool = True, **options: Any) -> Token:
        token = self.world.invite(**options)
        if kept:  # `tunnelmesh invite` writes the ledger before the token exists
            self.ledger.add(InviteGrant.from_wire(token.grant, self.world.admin.public))
        return token

    def countersign(self, entry: JSON, proof: str, now: int = NOW) -> MemberEntry:
        signed = countersign_invited(admin=self.world.admin, network=self.world.network, ledger=self.ledger,
                                     peer_map=self.peer_map, entry=entry, proof=proof, now=now)
        # What countersign_pending does next (and the admin node's map then says).
        self.peer_map.apply(update([signed.wire], version=self.peer_map.version + 1, full=False))
        assert signed.member.wg_key in self.peer_map.members, "the countersigned entry is a member"
        return signed.member

    def refuses(self, entry: JSON, proof: str, pattern: str, now: int = NOW) -> None:
        used = {key: list(record.used_by) for key, record in self.ledger.records.items()}
        with pytest.raises(MembershipError, match=pattern):
            countersign_invited(admin=self.world.admin, network=self.world.network, ledger=self.ledger,
                                peer_map=self.peer_map, entry=entry, proof=proof, now=now)
        assert {key: record.used_by for key, record in self.ledger.records.items()} == used, "a refusal counts no use"
        no_member_anywhere(self.world, entry)  # nor is the invite-signed entry a member on its own

    def revoke(self, i: int, at: int) -> None:
        self.peer_map.apply(update(revocations=[self.world.revocation(i, at).to_wire()],
                                   version=self.peer_map.version + 1, full=False))


def joining(world: World, i: int, token: Token, *, identity: PublicIdentity | None = None, name: str | None = None,
            host: int | None = None, joined: int = NOW) -> tuple[JSON, str]:
    """Node i's invite-signed entry and its proof (by node i's SSH key) over the body."""
    public = world.nodes[i].public if identity is None else identity
    ipv4, ipv6 = world.network.host(i + 1 if host is None else host)
    body = member_body(world.network.network, name or f"node{i}", public, ipv4, ipv6, joined)
    proof = asyncio.run(world.nodes[i].sign(join_proof_message(body), JOIN_NAMESPACE))
    return sign_member_with_invite(body, token), b64(proof)


def no_member_anywhere(world: World, entry: JSON) -> None:
    """A node (node 5) given the invite-signed entry in a full map does not take it."""
    peer_map = PeerMap(world.network, world.wg(5))
    changes = peer_map.apply(update([world.admin_member(0), entry], version=1))
    assert MemberEntry.from_wire(entry, world.network).wg_key not in peer_map.members
    assert any("signed with an invite key only" in reason for reason in changes.rejected), changes.rejected


def test_a_valid_join_is_countersigned_with_the_admins_time_and_its_use_counted(world: World) -> None:
    admin = Admin(world)
    token = admin.invite(created=NOW - 100, expires=NOW + 3600)
    entry, proof = joining(world, 2, token, joined=NOW - 50)
    no_member_anywhere(world, entry)  # the invite-signed entry alone is no member
    member = admin.countersign(entry, proof, now=NOW + 7)
    assert member.grant is None and member.joined == NOW + 7  # the admin's clock, not the joiner's word
    assert (member.name, member.ipv4, member.wg_key) == ("node2", world.network.host(3)[0], world.wg(2))
    invite_key = InviteGrant.from_wire(token.grant, world.admin.public).invite_key
    assert admin.ledger.records[b64(invite_key)].used_by == [b64(world.wg(2))]
    # The admin's machine seals the secret to the joiner (the coordinator never holds it).
    sealed = sealed_secret(member, bytes(range(32)), 3)
    assert sealed["epoch"] == 3
    assert unseal(world.nodes[2].static_private, unb64(sealed["sealed"], "sealed")) == bytes(range(32))


def test_an_invite_expired_by_the_admins_clock_is_refused_whatever_joined_says(world: World) -> None:
    admin = Admin(world)
    token = admin.invite(created=NOW - 100, expires=NOW + 60)
    entry, proof = joining(world, 2, token, joined=NOW)  # inside the invite's validity
    admin.refuses(entry, proof, "the invite has expired", now=NOW + 61)


def test_an_invite_the_admins_machine_did_not_make_is_refused(world: World) -> None:
    admin = Admin(world)
    entry, proof = joining(world, 2, admin.invite(kept=False))  # e.g. made with a copy of the admin key
    admin.refuses(entry, proof, "not made on the admin's machine")


def test_a_revoked_invite_is_refused(world: World) -> None:
    admin = Admin(world)
    token = admin.invite(uses=0)
    record = next(iter(admin.ledger.records.values()))
    admin.ledger.revoke(record.id[:6], NOW - 1)
    entry, proof = joining(world, 2, token)
    assert re.fullmatch(r"[0-9a-f]{12}", record.id)
    admin.refuses(entry, proof, re.escape(f"the admin revoked this invite ({record.id})"))


def test_a_one_time_invite_counts_every_key_it_ever_admitted_even_revoked_ones(world: World) -> None:
    admin = Admin(world)
    token = admin.invite(uses=1, created=NOW - 100, expires=NOW + 3600)
    admin.countersign(*joining(world, 2, token))
    admin.revoke(2, NOW + 10)
    assert world.wg(2) not in admin.peer_map.members  # no current member holds the invite's use now
    # Another key with the same token: the use is spent, whoever holds it now.
    admin.refuses(*joining(world, 3, token, joined=NOW + 20), "already used 1 time", now=NOW + 20)


def test_a_revoked_member_cannot_come_back_under_a_new_key_with_its_own_old_token(world: World) -> None:
    """Issue 13: "bring a revoked member back under a new key with its own expired
    one-time token" -- and with it unexpired, and with a reusable invite made before the
    revocation: its SSH key is revoked, whatever X25519 key it attests."""
    admin = Admin(world)
    one_time = admin.invite(uses=1, created=NOW - 100, expires=NOW + 600)
    reusable = admin.invite(uses=0, created=NOW - 100, expires=NOW + 100_000)
    admin.countersign(*joining(world, 2, one_time))
    admin.revoke(2, NOW + 10)
    fresh = reattested(world.nodes[2], os.urandom(32))  # the same SSH key, a new X25519 key
    # (joined: the joiner's word, inside each invite's validity; now: the admin's clock)
    for token, joined, now, why in ((one_time, NOW + 500, NOW + 700, "expired"),
                                    (one_time, NOW + 20, NOW + 20, "already used"),
                                    (reusable, NOW + 20, NOW + 20, "revoked at")):
        entry, proof = joining(world, 2, token, identity=fresh, name="back", host=9, joined=joined)
        admin.refuses(entry, proof, why, now=now)
    # Only an invite made after the revocation brings it back: the admin's decision.
    later = admin.invite(uses=1, created=NOW + 30, expires=NOW + 600)
    back = admin.countersign(*joining(world, 2, later, identity=fresh, name="back", host=9, joined=NOW + 40),
                             now=NOW + 40)
    assert back.wg_key == fresh.wg_public_key


def test_a_name_or_an_address_bound_to_another_key_is_not_handed_over(world: World) -> None:
    admin = Admin(world)
    reusable = admin.invite(uses=0)
    admin.refuses(*joining(world, 2, reusable, name="node1"), "name node1 is bound to another member's key")
    # The coordinator proposed node 1's address: the admin signs another, free one instead.
    member = admin.countersign(*joining(world, 2, reusable, host=2))
    assert member.ipv4 == world.network.host(3)[0] and admin.peer_map.members[world.wg(1)].ipv4 == world.network.host(2)[0]
    # A coordinator that hides node 1 (a full map without it) frees neither its name nor its address.
    admin.peer_map.apply(update([world.admin_member(0), world.admin_member(2, host=3)], version=10))
    assert world.wg(1) not in admin.peer_map.members
    admin.refuses(*joining(world, 3, reusable, name="node1"), "name node1 is bound")
    hidden = admin.countersign(*joining(world, 3, reusable, host=2))
    assert hidden.ipv4 not in {world.network.host(h)[0] for h in (1, 2, 3)}
    # Once node 1 is revoked (an admin-signed record), its name may go to another key.
    admin.revoke(1, NOW + 5)
    assert admin.countersign(*joining(world, 4, reusable, name="node1"), now=NOW + 6).name == "node1"


def test_a_member_key_is_not_admitted_twice(world: World) -> None:
    admin = Admin(world)
    admin.refuses(*joining(world, 1, admin.invite(), name="copy", host=7), "already a member.*cloned machine")


def test_a_forged_proof_is_refused(world: World) -> None:
    admin = Admin(world)
    entry, _ = joining(world, 2, admin.invite())
    _, other_proof = joining(world, 3, admin.invite())
    admin.refuses(entry, other_proof, "prove")


def test_a_key_signed_before_gets_the_same_entry_again_never_a_second_one(world: World) -> None:
    """If the hand-over to the coordinator failed, the admin's machine signs nothing new
    for that key: the entry it keeps goes again, whatever the new request says."""
    admin = Admin(world)
    entry, proof = joining(world, 2, admin.invite(uses=0))
    first = countersign_invited(admin=world.admin, network=world.network, ledger=admin.ledger,
                                peer_map=admin.peer_map, entry=entry, proof=proof, now=NOW)
    other, other_proof = joining(world, 2, admin.invite(uses=0), name="renamed")
    again = countersign_invited(admin=world.admin, network=world.network, ledger=admin.ledger,
                                peer_map=admin.peer_map, entry=other, proof=other_proof, now=NOW + 5)
    assert again.wire == first.wire and again.member.name == "node2"
    assert InviteLedger.from_wire(admin.ledger.to_wire(), world.network).admitted == {b64(world.wg(2)): first.wire}
