"""The admin's side of admission: what the admin key checks before it signs a member.

Sans-IO: no sockets, no clock reads (times are passed in), no asyncio.

Only admin-signed member entries are members (`tunnelmesh.membership.PeerMap`). A
joiner with an invite token signs its entry with the invite key and proves it holds
its SSH key; the coordinator keeps that request until the admin's machine -- its
daemon, automatically (actors/admitter.py) -- checks it here and countersigns:

- the invite is one this machine made (`InviteLedger`, ``<state>/invites.json``), not
  revoked, not expired by the admin's own clock (the joiner's `joined` is not taken),
  and not used up, counting every key it ever admitted, not only current members;
- the key is not a member already, and a revoked key (or SSH key) comes back only with
  an invite made after its revocation;
- the name, the mesh address and the SSH key are not bound to another key that is not
  revoked (the admin's own kept bindings, as every node keeps them);
- the entry the admin signs is made here, with the admin's time as `joined`.

So neither a coordinator nor anyone holding an invite key (old, expired or used) can
make a member, rebind a name or an address, or bring a revoked member back.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from tunnelmesh.membership import (
    AdminKey,
    InviteGrant,
    MemberEntry,
    MembershipError,
    NetworkInfo,
    PeerMap,
    b64,
    member_body,
    seal,
    sign_member_as_admin,
    unb64,
    verify_join_proof,
)

def invite_id(invite_key: bytes) -> str:
    """The short name of an invite, as `tunnelmesh invites` shows it: hex, so that it can be
    typed, grepped and matched as it is (a base64 fingerprint carries '+' and '/')."""
    return hashlib.sha256(invite_key).hexdigest()[:12]


@dataclass
class InviteRecord:
    grant: InviteGrant
    used_by: list[str] = field(default_factory=list)  # WireGuard keys (base64) admitted with it
    revoked_at: int | None = None

    @property
    def id(self) -> str:
        return invite_id(self.grant.invite_key)

    def uses_left(self) -> int | None:
        """None for a reusable invite."""
        return None if self.grant.uses == 0 else max(0, self.grant.uses - len(self.used_by))

    def to_wire(self) -> dict[str, Any]:
        return {"grant": self.grant.to_wire(), "used_by": self.used_by, "revoked_at": self.revoked_at}


class InviteLedger:
    """Every invite the admin's machine made and every key each one admitted, and every
    entry the admin key signed for a joiner (`admitted`: WireGuard key -> entry wire), kept
    for good: the admin's own bindings never depend on what a coordinator echoes back."""

    def __init__(self, records: dict[str, InviteRecord] | None = None,
                 admitted: dict[str, dict[str, Any]] | None = None) -> None:
        self.records: dict[str, InviteRecord] = records or {}
        self.admitted: dict[str, dict[str, Any]] = admitted or {}

    def add(self, grant: InviteGrant) -> InviteRecord:
        record = self.records.setdefault(b64(grant.invite_key), InviteRecord(grant))
        return record

    def find(self, prefix: str) -> InviteRecord:
        """The one invite whose id starts with `prefix`."""
        matches = [r for r in self.records.values() if prefix and r.id.startswith(prefix)]
        if len(matches) != 1:
            known = ", ".join(sorted(r.id for r in self.records.values())) or "none"
            raise MembershipError(f"{'no' if not matches else 'more than one'} invite {prefix!r} "
                                  f"(invites: {known}; see `tunnelmesh invites`)")
        return matches[0]

    def revoke(self, prefix: str, now: int) -> InviteRecord:
        record = self.find(prefix)
        if record.revoked_at is None:
            record.revoked_at = now
        return record

    def signed(self, network: NetworkInfo) -> list[MemberEntry]:
        """The entries the admin signed for joiners (each re-verified)."""
        return [MemberEntry.from_wire(wire, network) for wire in self.admitted.values()]

    def to_wire(self) -> dict[str, Any]:
        return {"invites": [record.to_wire() for record in self.records.values()], "admitted": self.admitted}

    @classmethod
    def from_wire(cls, wire: Any, network: NetworkInfo) -> InviteLedger:
        if not isinstance(wire, dict) or set(wire) != {"invites", "admitted"} or not isinstance(wire["invites"], list) \
                or not isinstance(wire["admitted"], dict):
            raise MembershipError("invite ledger: expected {\"invites\": [...], \"admitted\": {...}}")
        admitted = wire["admitted"]
        for key, entry in admitted.items():
            member = MemberEntry.from_wire(entry, network)
            if member.grant is not None or b64(member.wg_key) != key:
                raise MembershipError("invite ledger: an admitted entry is not the admin's for its key")
        records: dict[str, InviteRecord] = {}
        for item in wire["invites"]:
            if not isinstance(item, dict) or set(item) != {"grant", "used_by", "revoked_at"}:
                raise MembershipError("invite ledger: each invite has grant, used_by and revoked_at")
            grant = InviteGrant.from_wire(item["grant"], network.admin_key)
            used_by = item["used_by"]
            if not isinstance(used_by, list):
                raise MembershipError("invite ledger: used_by must be a list")
            for key in used_by:
                unb64(key, "invite user", 32)
            revoked_at = item["revoked_at"]
            if revoked_at is not None and (isinstance(revoked_at, bool) or not isinstance(revoked_at, int)):
                raise MembershipError("invite ledger: revoked_at must be a time or null")
            records[b64(grant.invite_key)] = InviteRecord(grant, list(used_by), revoked_at)
        return cls(records, dict(admitted))


@dataclass(frozen=True)
class Countersigned:
    """What the admin hands the coordinator for one joiner."""

    member: MemberEntry
    wire: dict[str, Any]
    invite: InviteRecord | None


def _held_hosts(peer_map: PeerMap) -> set[int]:
    """Host numbers that a current member or a kept binding to a key that is not revoked holds."""
    network = peer_map.network
    held = {network.host_index(m.ipv4) for m in peer_map.members.values()}
    if peer_map.own is not None:
        held.add(network.host_index(peer_map.own.ipv4))
    for binding, key in peer_map.bindings.items():
        if binding.startswith("ipv4:") and not peer_map.key_revoked(key):
            held.add(network.host_index(ipaddress.IPv4Address(binding[5:])))
    return held


def choose_host(peer_map: PeerMap, proposed: ipaddress.IPv4Address, wg_key: bytes) -> int:
    """The proposed host if this key may have it, else the lowest host nobody holds."""
    network = peer_map.network
    index = network.host_index(proposed)
    holder = peer_map.bindings.get(f"ipv4:{proposed}")
    if index not in _held_hosts(peer_map) or holder == wg_key:
        return index
    held = _held_hosts(peer_map)
    for candidate in range(1, network.cidr4.num_addresses - 1):
        if candidate not in held:
            return candidate
    raise MembershipError(f"the network is full: no free address left in {network.cidr4}")


def check_newcomer(peer_map: PeerMap, candidate: MemberEntry, *, authorized_after: int | None) -> None:
    """Refuse a key that is a member already, one revoked without an authorisation made
    after it (`authorized_after`: the invite's creation; None for the admin's own
    approval, which is that authorisation), and names, addresses or SSH keys bound to
    another key."""
    current = peer_map.members.get(candidate.wg_key)
    if current is not None or (peer_map.own is not None and peer_map.own.wg_key == candidate.wg_key):
        name = current.name if current is not None else peer_map.own.name  # type: ignore[union-attr]
        raise MembershipError(f"this key is already a member (as {name!r}): is this a cloned machine? give it a "
                              "key of its own with `tunnelmesh join --new-key`")
    if authorized_after is not None:
        for revocation in peer_map.revocations_of(candidate):
            if authorized_after <= revocation.at:
                raise MembershipError(f"this key was revoked at {revocation.at}; it takes an invite made after "
                                      "that to come back")
    clash = peer_map.binding_clash(candidate)
    if clash is not None:
        raise MembershipError(f"{clash} is bound to another member's key (revoke that member first)")


def countersign_invited(*, admin: AdminKey, network: NetworkInfo, ledger: InviteLedger, peer_map: PeerMap,
                        entry: Mapping[str, Any], proof: Any, now: int) -> Countersigned:
    """Check an invite-signed join request and make the admin-signed entry for it. The
    caller records `invite.used_by` durably before handing the entry on."""
    member = MemberEntry.from_wire(entry, network)
    grant = member.grant
    if grant is None:
        raise MembershipError("not a join with an invite (approvals are made by `tunnelmesh approve`)")
    record = ledger.records.get(b64(grant.invite_key))
    if record is None:
        raise MembershipError("this invite was not made on the admin's machine (or its invite list "
                              "<state>/invites.json was lost): ask the admin for a new one")
    if record.revoked_at is not None:
        raise MembershipError(f"the admin revoked this invite ({record.id}); ask for a new one")
    if grant.expires < now:
        raise MembershipError("the invite has expired; ask the admin for a new one")
    key = b64(member.wg_key)
    left = record.uses_left()
    if left is not None and left == 0 and key not in record.used_by:
        raise MembershipError(f"the invite {record.id} was already used {grant.uses} time(s), all it allows")
    verify_join_proof(member.identity, entry["body"], proof)
    kept = ledger.admitted.get(key)
    if kept is not None and member.wg_key not in peer_map.members:
        signed = MemberEntry.from_wire(kept, network)
        if peer_map.revoked(signed) is None:
            # Signed before, but the coordinator never took it (the hand-over failed): the
            # same entry again, never a second one under another name or address.
            return Countersigned(signed, kept, record)
    host = choose_host(peer_map, member.ipv4, member.wg_key)
    ipv4, ipv6 = network.host(host)
    body = member_body(network.network, member.name, member.identity, ipv4, ipv6, now)
    wire = sign_member_as_admin(body, admin)
    signed = MemberEntry.from_wire(wire, network)
    check_newcomer(peer_map, signed, authorized_after=grant.created)
    if key not in record.used_by:
        record.used_by.append(key)
    ledger.admitted[key] = wire
    return Countersigned(signed, wire, record)


def sealed_secret(member: MemberEntry, secret: bytes, epoch: int) -> dict[str, Any]:
    """The network secret for a new member, sealed to its key by the admin's machine (the
    coordinator never holds it)."""
    return {"epoch": epoch, "sealed": b64(seal(member.wg_key, secret))}
