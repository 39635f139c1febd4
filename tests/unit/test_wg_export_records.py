"""The device entry (`DeviceEntry`) of `tunnelmesh wg-export`: signed and parsed strictly,
kept in the peer map apart from the members, under the same bindings and revocations."""

from __future__ import annotations

import copy
import functools
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.property.test_membership_fuzz import FUZZ, applied_or_unchanged, json_values, mutation, parse_or_none
from tests.support.membership import NOW, World, update
from tunnelmesh.membership import (
    DeviceEntry,
    MemberEntry,
    MembershipError,
    PeerMap,
    Revocation,
    b64,
    canonical,
    device_body,
    parse_entry,
)

PHONE_KEY = bytes(range(1, 33))


@functools.cache
def world() -> World:
    return World.create()


def device_wire(name: str = "phone", key: bytes = PHONE_KEY, served_by: str = "node0", host: int = 20,
                joined: int = NOW, signer: Any = None) -> dict[str, Any]:
    w = world()
    ipv4, ipv6 = w.network.host(host)
    body = device_body(w.network.network, name, key, served_by, ipv4, ipv6, joined)
    return {"body": body, "admin_sig": (signer or w.admin).sign("device", body)}


def test_a_device_entry_round_trips_and_is_told_from_a_member_entry() -> None:
    w = world()
    device = DeviceEntry.create(w.admin, w.network, "phone", PHONE_KEY, "node0", 20, NOW)
    assert (device.name, device.wg_key, device.served_by, device.ipv4) == ("phone", PHONE_KEY, "node0", w.network.host(20)[0])
    assert device.grant is None and device.ssh_fingerprint is None and device.authorized_at == NOW
    assert parse_entry(device.to_wire(), w.network) == device
    assert isinstance(parse_entry(w.admin_member(1), w.network), MemberEntry)


@pytest.mark.parametrize(("change", "why"), [
    (lambda wire: wire["body"].update(wg_key=b64(bytes(32))), "all zeros"),
    (lambda wire: wire["body"].update(wg_key=b64(bytes(31))), "WireGuard key"),
    (lambda wire: wire["body"].update(served_by="phone"), "cannot serve itself"),
    (lambda wire: wire["body"].update(served_by="no such name!"), "served_by"),
    (lambda wire: wire["body"].update(ipv4="10.0.0.1"), "not a host"),
    (lambda wire: wire["body"].update(extra=1), "device body"),
    (lambda wire: wire.update(grant={}), "device"),
    (lambda wire: wire["body"].update(network="SHA256:" + "A" * 43), "another network"),
])
def test_a_bad_device_entry_is_refused_saying_why(change: Any, why: str) -> None:
    wire = device_wire()
    change(wire)
    wire["admin_sig"] = world().admin.sign("device", wire["body"])  # signed as it is: the check is of the content
    with pytest.raises(MembershipError, match=why):
        DeviceEntry.from_wire(wire, world().network)


def test_only_the_admin_key_signing_a_device_entry_as_a_device_makes_one() -> None:
    w = world()
    other = World.create()
    with pytest.raises(MembershipError, match="signature does not verify"):
        DeviceEntry.from_wire(device_wire(signer=other.admin), w.network)
    wire = device_wire()
    wire["admin_sig"] = w.admin.sign("member", wire["body"])  # another kind of record's signature
    with pytest.raises(MembershipError, match="signature does not verify"):
        DeviceEntry.from_wire(wire, w.network)


def test_revoking_a_device_names_its_key_and_no_ssh_key() -> None:
    w = world()
    device = DeviceEntry.from_wire(device_wire(), w.network)
    revocation = Revocation.create(w.admin, device, NOW + 5)
    assert revocation.ssh is None and "ssh" not in revocation.to_wire()["body"]
    assert Revocation.from_wire(revocation.to_wire(), w.network) == revocation
    assert revocation.covers(device)
    assert not revocation.covers(DeviceEntry.from_wire(device_wire(joined=NOW + 6), w.network))  # admitted again after


def node0_map() -> PeerMap:
    peer_map = PeerMap(world().network, world().wg(0))
    peer_map.apply(update([world().admin_member(0), world().admin_member(1)], version=1))
    return peer_map


def test_the_peer_map_keeps_devices_apart_from_members_and_reports_them() -> None:
    peer_map = node0_map()
    changes = peer_map.apply(update([world().admin_member(0), world().admin_member(1), device_wire()], version=2))
    assert [d.name for d in changes.devices_added] == ["phone"] and not changes.added
    assert PHONE_KEY in peer_map.devices and PHONE_KEY not in peer_map.members
    assert peer_map.snapshot().devices[PHONE_KEY].served_by == "node0"
    again = PeerMap(world().network, world().wg(0))
    again.apply(peer_map.to_cache())  # the on-disk cache keeps it
    assert again.devices == peer_map.devices
    # A full map without it: gone (its bindings stay).
    changes = peer_map.apply(update([world().admin_member(0), world().admin_member(1)], version=3))
    assert [d.name for d, _ in changes.devices_removed] == ["phone"] and not peer_map.devices
    assert peer_map.bindings["name:phone"] == PHONE_KEY


def test_a_revocation_removes_a_device_for_good() -> None:
    peer_map = node0_map()
    peer_map.apply(update([device_wire()], full=False, version=2))
    device = peer_map.devices[PHONE_KEY]
    revocation = Revocation.create(world().admin, device, NOW + 10).to_wire()
    changes = peer_map.apply(update([device_wire()], [revocation], full=False, version=3))
    assert [d.name for d, _ in changes.devices_removed] == ["phone"] and not peer_map.devices
    assert any("revoked" in reason for reason in changes.rejected)  # the entry signed before it stays out
    assert peer_map.key_revoked(PHONE_KEY)


def test_a_device_cannot_take_a_members_name_address_or_key() -> None:
    peer_map = node0_map()
    for wire, why in ((device_wire(name="node1"), "name node1"), (device_wire(host=2), "ipv4"),
                      (device_wire(key=world().wg(1), name="x"), "its key is a member's"),
                      (device_wire(key=world().wg(0), name="y"), "its key is a member's")):
        changes = peer_map.apply(update([wire], full=False, version=peer_map.version + 1))
        assert not changes.devices_added and any(why in r for r in changes.rejected), (why, changes.rejected)
    assert not peer_map.devices


# --- hypothesis: like tests/property/test_membership_fuzz.py, for the new form ----------------------


@FUZZ
@given(value=json_values)
def test_arbitrary_json_as_an_entry_raises_only_membership_error(value: Any) -> None:
    parse_or_none(lambda v: parse_entry(v, world().network), value)
    parse_or_none(lambda v: parse_entry({"body": {"wg_key": "x", **v} if isinstance(v, dict) else v,
                                         "admin_sig": ""}, world().network), value)


@FUZZ
@given(data=st.data())
def test_a_mutated_device_entry_is_accepted_only_if_nothing_signed_changed(data: st.DataObject) -> None:
    original = device_wire()
    mutated = data.draw(mutation(original))
    entry = parse_or_none(lambda v: parse_entry(v, world().network), mutated)
    if entry is not None:
        assert isinstance(entry, DeviceEntry)
        assert canonical(entry.body()) == canonical(original["body"]) == canonical(mutated["body"])


@FUZZ
@given(data=st.data())
def test_an_admin_signed_device_body_is_accepted_only_as_it_is_written_back(data: st.DataObject) -> None:
    wire = copy.deepcopy(device_wire())
    wire["body"] = data.draw(mutation(wire["body"]))
    try:
        wire["admin_sig"] = world().admin.sign("device", wire["body"])
    except (TypeError, ValueError):  # not JSON (NaN, ...): nothing to sign
        return
    entry = parse_or_none(lambda v: DeviceEntry.from_wire(v, world().network), wire)
    if entry is not None:
        assert entry.to_wire() == wire
        assert DeviceEntry.from_wire(entry.to_wire(), world().network) == entry


@FUZZ
@given(data=st.data())
def test_a_mutated_update_with_a_device_never_admits_what_was_not_signed(data: st.DataObject) -> None:
    original = update([world().admin_member(1), device_wire()], full=False, version=5)
    mutated = data.draw(mutation(original))
    peer_map = node0_map()
    if not applied_or_unchanged(peer_map, mutated):
        return
    assert {canonical(d.body()) for d in peer_map.devices.values()} <= {canonical(device_wire()["body"])}
    assert not set(peer_map.devices) & set(peer_map.members)
