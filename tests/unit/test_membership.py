"""Unit tests for tunnelmesh.membership: signed records, tokens, the admin key file,
sealed secrets, signed requests, the replay guard and the node's peer map.

Every refusal is checked by its message, so a test cannot pass because a record was
refused for some other reason than the one it is about."""

from __future__ import annotations

import asyncio
import base64
import copy
import dataclasses
import json
import os
import re
import stat
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from tests.support.membership import JSON, NOW, SECRET, World, reattested, resign, update
from tunnelmesh.membership import (
    JOIN_NAMESPACE,
    REQUEST_NAMESPACE,
    REQUEST_WINDOW,
    TOKEN_PREFIX,
    AdminKey,
    Endpoints,
    InviteGrant,
    MemberEntry,
    MembershipError,
    NetworkInfo,
    PeerMap,
    ReplayGuard,
    RequestAuth,
    Revocation,
    SecretRecord,
    Token,
    b64,
    canonical,
    join_proof_message,
    key_fingerprint,
    member_body,
    parse_endpoints,
    request_message,
    seal,
    sign_admin_request,
    sign_member_as_admin,
    sign_member_with_invite,
    unseal,
    verify_admin_request,
    verify_join_proof,
    verify_member_request,
)


@pytest.fixture(scope="module")
def world() -> World:
    return World.create()


@pytest.fixture(scope="module")
def other() -> World:
    """Another network (another admin key) with the same node identities."""
    return World.create()


@pytest.fixture
def peer_map(world: World) -> PeerMap:
    """Node 0's view of `world`."""
    return PeerMap(world.network, world.wg(0))


def refused(match: str) -> AbstractContextManager[pytest.ExceptionInfo[MembershipError]]:
    return pytest.raises(MembershipError, match=match)


#: How a record whose signature does not match its body is refused (invites say it their own way).
BAD_SIGNATURE = "signature does not verify|not signed by this network's admin key"


def changed(wire: JSON, **body: Any) -> JSON:
    """A deep copy of `wire` with body fields replaced (the signature left as it was)."""
    out = copy.deepcopy(wire)
    out["body"].update(body)
    return out


# --- every signed record, generically ------------------------------------------------------


@dataclass(frozen=True)
class Kind:
    """How to make a valid wire record of one kind in a world, and parse it in a world."""

    id: str
    sign_kind: str
    sig_field: str
    make: Callable[[World], JSON]
    parse: Callable[[World, JSON], Any]


def _parse_member(w: World, wire: JSON) -> MemberEntry:
    return MemberEntry.from_wire(wire, w.network)


KINDS = [
    Kind("network", "network", "sig", lambda w: w.network.to_wire(),
         lambda w, wire: NetworkInfo.from_wire(wire, w.network.network)),
    Kind("invite", "invite", "sig", lambda w: w.invite(name="node1").grant,
         lambda w, wire: InviteGrant.from_wire(wire, w.admin.public)),
    Kind("member-admin", "member", "admin_sig", lambda w: w.admin_member(1), _parse_member),
    Kind("member-invite", "member", "invite_sig", lambda w: w.invited_member(1), _parse_member),
    Kind("revocation", "revoke", "sig", lambda w: w.revocation(1).to_wire(),
         lambda w, wire: Revocation.from_wire(wire, w.network)),
    Kind("secret", "secret", "sig", lambda w: w.secret([0, 1, 2]).to_wire(),
         lambda w, wire: SecretRecord.from_wire(wire, w.network)),
]
BY_ID = {kind.id: kind for kind in KINDS}
kinds = pytest.mark.parametrize("kind", KINDS, ids=[k.id for k in KINDS])


@kinds
def test_record_round_trips(kind: Kind, world: World) -> None:
    wire = kind.make(world)
    record = kind.parse(world, wire)
    assert record.to_wire() == wire
    again = json.loads(json.dumps(record.to_wire()))  # through real JSON text
    assert kind.parse(world, again) == record


@kinds
def test_record_from_another_network_refused(kind: Kind, world: World, other: World) -> None:
    match = {"network": "this coordinator serves network", "invite": "the invite is for network"}.get(
        kind.id, "another network")
    with refused(match):
        kind.parse(other, kind.make(world))


def sign_as(kind: Kind, wire: JSON, admin: AdminKey) -> JSON:
    """`wire` with its body signed by `admin` in the record's signature field."""
    signed = copy.deepcopy(wire)
    signed[kind.sig_field] = admin.sign(kind.sign_kind, signed["body"])
    return signed


@kinds
def test_record_signed_by_another_key_refused(kind: Kind, world: World, other: World) -> None:
    wire = sign_as(kind, kind.make(world), other.admin)
    with refused(BAD_SIGNATURE):
        kind.parse(world, wire)


@kinds
@pytest.mark.parametrize("damage", ["flip", "not base64", "short", "missing value"])
def test_record_with_damaged_signature_refused(kind: Kind, damage: str, world: World) -> None:
    wire = kind.make(world)
    sig = base64.b64decode(wire[kind.sig_field])
    wire[kind.sig_field] = {
        "flip": b64(sig[:10] + bytes([sig[10] ^ 1]) + sig[11:]),
        "not base64": "!" * 88,
        "short": b64(sig[:63]),
        "missing value": None,
    }[damage]
    with refused(f"{BAD_SIGNATURE}|signature: (not valid base64|expected base64 text|expected 64 bytes)"):
        kind.parse(world, wire)


@kinds
def test_record_with_missing_or_extra_keys_refused(kind: Kind, world: World) -> None:
    wire = kind.make(world)
    for where in ("wire", "body"):
        keys = list(wire) if where == "wire" else list(wire["body"])
        for key in keys:
            damaged = copy.deepcopy(wire)
            del (damaged if where == "wire" else damaged["body"])[key]
            expected = "missing admin_sig" if key == "grant" else f"missing {key}"
            if kind.id == "revocation" and key == "ssh":
                expected = BAD_SIGNATURE  # optional (records made before it), but signed when present
            with refused(expected):
                kind.parse(world, damaged)
        damaged = copy.deepcopy(wire)
        (damaged if where == "wire" else damaged["body"])["extra"] = 1
        with refused("unexpected 'extra'"):
            kind.parse(world, damaged)


@kinds
@pytest.mark.parametrize("value", [None, [], "text", 7])
def test_record_that_is_not_an_object_refused(kind: Kind, value: Any, world: World) -> None:
    with refused("expected a JSON object"):
        kind.parse(world, value)
    wire = kind.make(world)
    wire["body"] = value
    with refused("expected a JSON object"):
        kind.parse(world, wire)


# Each signed body field, changed to a value that passes every other check, so that only
# the signature can refuse it.
TAMPERED: list[tuple[str, str, Callable[[World], dict[str, Any]]]] = [
    ("network", "cidr4", lambda w: {"cidr4": "10.0.0.0/8"}),
    ("network", "ula6", lambda w: {"ula6": "fd00:1:2::/48"}),
    ("network", "created", lambda w: {"created": NOW}),
    ("invite", "invite_key", lambda w: {"invite_key": b64(bytes(range(32)))}),
    ("invite", "name", lambda w: {"name": None}),
    ("invite", "expires", lambda w: {"expires": NOW + 3601}),
    ("invite", "uses", lambda w: {"uses": 0}),
    ("invite", "created", lambda w: {"created": NOW - 101}),
    *[(member, field, change) for member in ("member-admin", "member-invite") for field, change in [
        ("name", lambda w: {"name": "node9"}),
        ("identity", lambda w: {"identity": w.nodes[2].public.to_line()}),
        ("addresses", lambda w: {"ipv4": str(w.network.host(9)[0]), "ipv6": str(w.network.host(9)[1])}),
        ("joined", lambda w: {"joined": NOW + 1}),
    ]],
    ("revocation", "wg_key", lambda w: {"wg_key": b64(w.wg(2))}),
    ("revocation", "name", lambda w: {"name": "node9"}),
    ("revocation", "at", lambda w: {"at": NOW + 1001}),
    ("secret", "epoch", lambda w: {"epoch": 2}),
    ("secret", "sealed", lambda w: {"sealed": {}}),
    ("secret", "at", lambda w: {"at": NOW + 1}),
]


@pytest.mark.parametrize(("kind_id", "field", "change"), TAMPERED, ids=[f"{k}-{f}" for k, f, _ in TAMPERED])
def test_tampered_body_field_refused(kind_id: str, field: str, change: Callable[[World], dict[str, Any]],
                                     world: World) -> None:
    kind = BY_ID[kind_id]
    wire = kind.make(world)
    with refused(BAD_SIGNATURE):
        kind.parse(world, changed(wire, **change(world)))


def test_network_admin_key_swapped_refused(world: World, other: World) -> None:
    wire = changed(world.network.to_wire(), admin_key=b64(other.admin.public))
    with refused("this coordinator serves network"):
        NetworkInfo.from_wire(wire, world.network.network)
    with refused("network: signature does not verify"):
        NetworkInfo.from_wire(wire)  # unpinned: only the signature stands in the way


def test_member_with_tampered_grant_refused(world: World) -> None:
    wire = world.invited_member(1)
    wire["grant"]["body"]["uses"] = 0
    with refused("not signed by this network's admin key"):
        MemberEntry.from_wire(wire, world.network)


@pytest.mark.parametrize(("field", "value"), [
    ("cidr4", "10.0.0.0/7"), ("cidr4", "10.0.0.0/29"), ("cidr4", "10.0.0.1/24"), ("cidr4", "fd00::/48"), ("cidr4", "x"),
    ("ula6", "2001:db8::/48"), ("ula6", "fd00::/64"), ("ula6", "10.0.0.0/8"), ("ula6", "fd00::1/48"),
])
def test_network_record_with_bad_prefix_refused(field: str, value: str, world: World) -> None:
    wire = resign(changed(world.network.to_wire(), **{field: value}), world.admin, "network")
    with refused("network body"):
        NetworkInfo.from_wire(wire)


def test_network_create_and_hosts() -> None:
    admin = AdminKey.generate()
    info = NetworkInfo.create(admin, "10.1.0.0/16", NOW, rng=lambda n: bytes(range(1, n + 1)))
    assert str(info.ula6) == "fd01:203:405::/48"
    assert info.network == admin.fingerprint == key_fingerprint(admin.public)
    assert [str(a) for a in info.host(1)] == ["10.1.0.1", "fd01:203:405::1"]
    assert info.host_index(info.host(300)[0]) == 300
    for index in (0, 65535, -1):
        with refused(f"no host number {index}"):
            info.host(index)
    for cidr, match in (("10.0.0.0/7", "prefix must be"), ("10.0.0.0/29", "prefix must be"),
                        ("10.0.0.1/24", "network CIDR"), ("nonsense", "network CIDR")):
        with refused(match):
            NetworkInfo.create(admin, cidr, NOW)


# --- member entries ---------------------------------------------------------------------------------


def test_member_entry_properties(world: World) -> None:
    admin_entry = world.entry(1, joined=NOW + 5)
    assert admin_entry.wg_key == world.wg(1)
    assert admin_entry.authorized_at == NOW + 5  # approvals: when the admin signed
    token = world.invite(created=NOW - 50)
    invited = MemberEntry.from_wire(world.invited_member(1, token), world.network)
    assert invited.authorized_at == NOW - 50  # invites: when the admin made the grant
    assert invited.grant == InviteGrant.from_wire(token.grant, world.admin.public)


def test_member_name_must_match_named_invite(world: World) -> None:
    token = world.invite(name="alpha")
    assert MemberEntry.from_wire(world.invited_member(1, token, name="alpha"), world.network).name == "alpha"
    with refused("the invite was made for the name 'alpha'"):
        MemberEntry.from_wire(world.invited_member(1, token, name="beta"), world.network)


@pytest.mark.parametrize("joined", [NOW - 101, NOW + 3601])
def test_member_joined_outside_grant_validity_refused(joined: int, world: World) -> None:
    token = world.invite(created=NOW - 100, expires=NOW + 3600)
    with refused("joined outside the invite's validity"):
        MemberEntry.from_wire(world.invited_member(1, token, joined=joined), world.network)


@pytest.mark.parametrize("joined", [NOW - 100, NOW + 3600])
def test_member_joined_at_grant_edges_accepted(joined: int, world: World) -> None:
    token = world.invite(created=NOW - 100, expires=NOW + 3600)
    assert MemberEntry.from_wire(world.invited_member(1, token, joined=joined), world.network).joined == joined


def test_member_invite_signature_by_another_invite_key_refused(world: World) -> None:
    wire = world.invited_member(1, world.invite())
    wire["invite_sig"] = world.invited_member(1, world.invite())["invite_sig"]
    with refused("member node1: signature does not verify"):
        MemberEntry.from_wire(wire, world.network)


def test_member_signed_by_invite_key_without_grant_refused(world: World) -> None:
    """An invite key is no admin key: its signature in admin_sig means nothing."""
    wire = world.invited_member(1)
    with refused("member node1: signature does not verify"):
        MemberEntry.from_wire({"body": wire["body"], "admin_sig": wire["invite_sig"]}, world.network)


@pytest.mark.parametrize("case", ["network address", "broadcast address", "outside the network",
                                  "v6 of another host", "v6 outside the ULA", "v4 in v6 field", "v6 in v4 field",
                                  "not an address"])
def test_member_addresses_must_be_one_host_of_the_network(case: str, world: World) -> None:
    net4, net6 = world.network.cidr4, world.network.ula6
    v4, v6 = world.network.host(2)
    ipv4, ipv6 = {
        "network address": (str(net4.network_address), str(net6.network_address)),
        "broadcast address": (str(net4.broadcast_address), str(net6.network_address + 255)),
        "outside the network": ("192.0.2.2", str(v6)),
        "v6 of another host": (str(v4), str(net6.network_address + 3)),
        "v6 outside the ULA": (str(v4), "fd99::2"),
        "v4 in v6 field": (str(v4), str(v4)),
        "v6 in v4 field": (str(v6), str(v6)),
        "not an address": ("node", str(v6)),
    }[case]
    body = dict(world.body(1), ipv4=ipv4, ipv6=ipv6)
    with refused("member node1: "):
        MemberEntry.from_wire(sign_member_as_admin(body, world.admin), world.network)


@pytest.mark.parametrize("case", ["attestation of another key", "wg key of another node", "garbage", "empty"])
def test_member_identity_line_must_verify(case: str, world: World) -> None:
    one, two = world.nodes[1].public, world.nodes[2].public
    line = {
        "attestation of another key": dataclasses.replace(one, attestation=two.attestation).to_line(),
        "wg key of another node": dataclasses.replace(one, wg_public_key=two.wg_public_key).to_line(),
        "garbage": "ssh-ed25519 AAAA wg=AA== att=AA==",
        "empty": "",
    }[case]
    body = dict(world.body(1), identity=line)
    with refused("member node1: (attestation|malformed)"):
        MemberEntry.from_wire(sign_member_as_admin(body, world.admin), world.network)


@pytest.mark.parametrize("name", ["", "-a", "a-", "A", "a_b", "a" * 64, None, 5])
def test_member_name_checked(name: Any, world: World) -> None:
    body = dict(world.body(1), name=name)
    with refused("member name must be"):
        MemberEntry.from_wire(sign_member_as_admin(body, world.admin), world.network)


@pytest.mark.parametrize(("kind_id", "field", "value"), [
    ("network", "ula6", "FD00:1::/48"),
    ("network", "cidr4", "100.64.0.0/255.255.255.0"),
    ("member-admin", "ipv6", "upper"),
    ("member-admin", "identity", "padded"),
    ("revocation", "wg_key", "noncanonical"),
    ("invite", "invite_key", "noncanonical"),
])
def test_record_signed_in_a_second_spelling_refused(kind_id: str, field: str, value: str, world: World) -> None:
    """A value has one spelling: otherwise to_wire (the peer map cache) would not give
    back what was signed, and the record would be lost at the next restart."""
    kind = BY_ID[kind_id]
    wire = kind.make(world)
    body = wire["body"]
    if value == "upper":
        value = body[field].upper()
    elif value == "padded":
        value = body[field] + " "
    elif value == "noncanonical":  # same bytes, different unused low bits in the last character
        alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
        value = body[field][:-2] + alphabet[alphabet.index(body[field][-2]) ^ 1] + "="
        assert base64.b64decode(value) == base64.b64decode(body[field])
    with refused("not in canonical form"):
        kind.parse(world, sign_as(kind, changed(wire, **{field: value}), world.admin))


# --- tokens ------------------------------------------------------------------------------------------


def encode_payload(payload: Any) -> str:
    return TOKEN_PREFIX + base64.urlsafe_b64encode(json.dumps(payload).encode()).decode().rstrip("=")


@pytest.fixture(scope="module")
def token(world: World) -> Token:
    return world.invite(name="node1", uses=3)


def test_token_round_trip(token: Token, world: World) -> None:
    text = token.encode()
    assert text.startswith(TOKEN_PREFIX) and "\n" not in text and "=" not in text
    assert Token.parse(text) == token
    assert Token.parse(f"  {text}\n") == token  # pasted with whitespace
    grant = InviteGrant.from_wire(Token.parse(text).grant, world.admin.public)
    assert grant.invite_key == token.invite_key().public_key().public_bytes_raw()
    assert (grant.name, grant.uses, grant.network) == ("node1", 3, world.admin.fingerprint)


def _token_payload(token: Token) -> JSON:
    return {"url": token.url, "network": token.network, "grant": token.grant, "key": b64(token.invite_seed)}


DAMAGED_TOKENS: dict[str, tuple[Callable[[Token], Any], str]] = {
    "not text": (lambda t: None, "not a join token"),
    "empty": (lambda t: "", "not a join token"),
    "wrong prefix": (lambda t: "tmjoin2-" + t.encode()[len(TOKEN_PREFIX):], "a token starts with 'tmjoin1-'"),
    "prefix only": (lambda t: TOKEN_PREFIX, "damaged"),
    "one character": (lambda t: t.encode()[:len(TOKEN_PREFIX) + 1], "damaged"),
    "truncated by half": (lambda t: t.encode()[:len(t.encode()) // 2], "damaged"),
    "last character lost": (lambda t: t.encode()[:-1], "damaged"),
    "last four characters lost": (lambda t: t.encode()[:-4], "damaged"),
    "not base64": (lambda t: TOKEN_PREFIX + "!!!!****", "damaged"),
    "not ascii": (lambda t: TOKEN_PREFIX + "ééé", "damaged"),
    "too long": (lambda t: TOKEN_PREFIX + "A" * 5000, "not a join token"),
    "not an object": (lambda t: encode_payload([1, 2]), "join token: expected a JSON object"),
    "missing key": (lambda t: encode_payload({k: v for k, v in _token_payload(t).items() if k != "key"}),
                    "join token: missing key"),
    "extra key": (lambda t: encode_payload({**_token_payload(t), "more": 1}), "join token: unexpected 'more'"),
    "ftp url": (lambda t: encode_payload({**_token_payload(t), "url": "ftp://x"}), "must be http:// or https://"),
    "url without scheme": (lambda t: encode_payload({**_token_payload(t), "url": "coordinator:7400"}),
                           "must be http:// or https://"),
    "url not text": (lambda t: encode_payload({**_token_payload(t), "url": 7}), "coordinator URL"),
    "grant not an object": (lambda t: encode_payload({**_token_payload(t), "grant": "x"}),
                            "invite: expected a JSON object"),
    "short key": (lambda t: encode_payload({**_token_payload(t), "key": b64(bytes(31))}),
                  "invite key: expected 32 bytes"),
    "key not base64": (lambda t: encode_payload({**_token_payload(t), "key": "***"}), "invite key: not valid base64"),
}


@pytest.mark.parametrize("case", list(DAMAGED_TOKENS))
def test_damaged_token_refused_with_a_reason(case: str, token: Token) -> None:
    make, match = DAMAGED_TOKENS[case]
    with refused(match):
        Token.parse(make(token))


def test_make_invite_checks_the_name(world: World) -> None:
    with refused("invite name must be"):
        world.invite(name="Not A Name")


# --- the admin key file ------------------------------------------------------------------------------


def test_admin_key_save_load_round_trip(tmp_path: Path) -> None:
    key = AdminKey.generate()
    path = tmp_path / "admin.key"
    old = os.umask(0)  # the file must be 0600 whatever the umask
    try:
        key.save(path)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    loaded = AdminKey.load(path)
    assert loaded.public == key.public and loaded.fingerprint == key.fingerprint
    assert loaded.sign("network", {"x": 1}) == key.sign("network", {"x": 1})  # Ed25519 is deterministic
    assert path.read_text().split()[1] not in repr(loaded)  # the seed never shows


def test_admin_key_save_refuses_to_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "admin.key"
    path.write_text("keep me")
    with refused("already exists; refusing to overwrite it"):
        AdminKey.generate().save(path)
    assert path.read_text() == "keep me"


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o644, 0o700 | 0o010])
def test_admin_key_load_refuses_a_file_others_can_read(mode: int, tmp_path: Path) -> None:
    path = tmp_path / "admin.key"
    AdminKey.generate().save(path)
    path.chmod(mode)
    with refused("readable by its owner only"):
        AdminKey.load(path)


@pytest.mark.parametrize("content", [
    b"", b"hello", b"tunnelmesh-admin-ed25519", b"tunnelmesh-admin-ed25519 !!!!",
    b"tunnelmesh-admin-ed25519 " + base64.b64encode(bytes(16)),
    b"ssh-ed25519 " + base64.b64encode(bytes(32)),
    b"tunnelmesh-admin-ed25519 " + base64.b64encode(bytes(32)) + b" extra",
    b"\xff\xfe\x00\x01 binary garbage \x80",
])
def test_admin_key_load_refuses_garbage(content: bytes, tmp_path: Path) -> None:
    path = tmp_path / "admin.key"
    path.write_bytes(content)
    path.chmod(0o600)
    with refused("not a tunnelmesh admin key"):
        AdminKey.load(path)


def test_admin_key_load_missing_file(tmp_path: Path) -> None:
    with refused("cannot read the admin key .*No such file"):
        AdminKey.load(tmp_path / "absent")


# --- sealed secrets ----------------------------------------------------------------------------------


def test_seal_round_trip_and_wrong_recipient(world: World) -> None:
    one, two = world.nodes[1], world.nodes[2]
    blob = seal(one.public.wg_public_key, SECRET)
    assert blob != seal(one.public.wg_public_key, SECRET)  # a fresh ephemeral key each time
    assert len(blob) == 32 + len(SECRET) + 16
    assert unseal(one.static_private, blob) == SECRET
    with refused("not sealed to this node's key"):
        unseal(two.static_private, blob)


@pytest.mark.parametrize("damage", ["ephemeral", "ciphertext", "tag", "truncated", "too short", "zero ephemeral"])
def test_damaged_sealed_secret_refused(damage: str, world: World) -> None:
    node = world.nodes[1]
    blob = seal(node.public.wg_public_key, SECRET)
    damaged = {
        "ephemeral": bytes([blob[0] ^ 1]) + blob[1:],
        "ciphertext": blob[:40] + bytes([blob[40] ^ 1]) + blob[41:],
        "tag": blob[:-1] + bytes([blob[-1] ^ 1]),
        "truncated": blob[:-1],
        "too short": blob[:47],
        "zero ephemeral": bytes(32) + blob[32:],
    }[damage]
    with refused("sealed secret"):
        unseal(node.static_private, damaged)


def test_secret_record_open_for(world: World) -> None:
    record = world.secret([1, 2], epoch=4)
    assert set(record.sealed) == {b64(world.wg(1)), b64(world.wg(2))}
    assert record.open_for(world.wg(1), world.nodes[1].static_private) == SECRET
    assert record.open_for(world.wg(2), world.nodes[2].static_private) == SECRET
    assert record.open_for(world.wg(3), world.nodes[3].static_private) is None
    with refused("not sealed to this node's key"):
        record.open_for(world.wg(1), world.nodes[2].static_private)


def test_secret_record_of_wrong_size_refused_when_opened(world: World) -> None:
    record = world.secret([1], secret=bytes(16))
    with refused("not 32 bytes"):
        record.open_for(world.wg(1), world.nodes[1].static_private)


@pytest.mark.parametrize(("sealed", "match"), [
    ({"short": "AAAA"}, "sealed-for key"),
    ({b64(bytes(32)): 5}, "sealed secret"),
    ({b64(bytes(32)): "A" * 257}, "sealed secret"),
    ([], "sealed secrets: expected a JSON object"),
])
def test_secret_record_sealed_map_checked(sealed: Any, match: str, world: World) -> None:
    wire = resign(changed(world.secret([1]).to_wire(), sealed=sealed), world.admin, "secret")
    with refused(match):
        SecretRecord.from_wire(wire, world.network)


def test_secret_record_epoch_starts_at_one(world: World) -> None:
    wire = resign(changed(world.secret([1]).to_wire(), epoch=0), world.admin, "secret")
    with refused("epoch: expected an integer from 1"):
        SecretRecord.from_wire(wire, world.network)


# --- join proofs and signed requests ------------------------------------------------------------


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_join_proof(world: World) -> None:
    body = world.body(1)
    proof = b64(run(world.nodes[1].sign(join_proof_message(body), JOIN_NAMESPACE)))
    verify_join_proof(world.nodes[1].public, body, proof)
    with refused("did not prove it holds its identity key"):
        verify_join_proof(world.nodes[2].public, body, proof)
    with refused("did not prove it holds its identity key"):
        verify_join_proof(world.nodes[1].public, dict(body, joined=NOW + 1), proof)
    with refused("join proof: not valid base64"):
        verify_join_proof(world.nodes[1].public, body, "???")


REQUEST = ("POST", "/v1/admin/revoke?x=1", b'{"revocation": 1}')


def test_admin_request_round_trip(world: World) -> None:
    header = sign_admin_request(world.admin, *REQUEST, now=NOW, rng=lambda n: bytes(range(n)))
    assert header.startswith("TM1 ")
    auth = RequestAuth.parse(header)
    assert (auth.who, auth.timestamp, auth.nonce) == ("admin", NOW, bytes(range(16)).hex())
    assert RequestAuth.parse(auth.header()) == auth
    verify_admin_request(auth, world.admin.public, *REQUEST)
    verify_admin_request(auth, world.admin.public, "post", *REQUEST[1:])  # the method is case-blind


@pytest.mark.parametrize("change", ["key", "method", "path", "query", "body", "time", "nonce", "signature"])
def test_admin_request_changed_refused(change: str, world: World, other: World) -> None:
    method, path, body = REQUEST
    auth = RequestAuth.parse(sign_admin_request(world.admin, method, path, body, NOW))
    key = world.admin.public
    if change == "key":
        key = other.admin.public
    elif change == "method":
        method = "GET"
    elif change == "path":
        path = "/v1/admin/secret?x=1"
    elif change == "query":
        path = "/v1/admin/revoke?x=2"
    elif change == "body":
        body += b" "
    elif change == "time":
        auth = dataclasses.replace(auth, timestamp=NOW + 1)
    elif change == "nonce":
        auth = dataclasses.replace(auth, nonce="0" * 32)
    else:
        auth = dataclasses.replace(auth, signature=auth.signature[:-1] + bytes([auth.signature[-1] ^ 1]))
    with refused("admin request signature does not verify"):
        verify_admin_request(auth, key, method, path, body)


def member_auth(world: World, i: int, namespace: str = REQUEST_NAMESPACE, nonce: str = "ab" * 16) -> RequestAuth:
    signature = run(world.nodes[i].sign(request_message(*REQUEST[:2], NOW, nonce, REQUEST[2]), namespace))
    return RequestAuth(b64(world.wg(i)), NOW, nonce, signature)


def test_member_request_round_trip(world: World) -> None:
    auth = RequestAuth.parse(member_auth(world, 1).header())
    assert auth.who == b64(world.wg(1))
    verify_member_request(auth, world.nodes[1].public, *REQUEST)


@pytest.mark.parametrize("change", ["identity", "path", "body", "namespace"])
def test_member_request_changed_refused(change: str, world: World) -> None:
    method, path, body = REQUEST
    auth = member_auth(world, 1, JOIN_NAMESPACE if change == "namespace" else REQUEST_NAMESPACE)
    identity = world.nodes[2 if change == "identity" else 1].public
    path = "/v1/map" if change == "path" else path
    body = b"{}" if change == "body" else body
    with refused("request signature does not verify"):
        verify_member_request(auth, identity, method, path, body)


def test_member_signature_is_no_admin_signature(world: World) -> None:
    with refused("admin request signature does not verify"):
        verify_admin_request(member_auth(world, 1), world.admin.public, *REQUEST)


def auth_header(payload: Any) -> str:
    return "TM1 " + base64.urlsafe_b64encode(json.dumps(payload).encode()).decode().rstrip("=")


GOOD_AUTH = {"who": "admin", "t": NOW, "n": "0f" * 16, "sig": b64(bytes(64))}
BAD_HEADERS: dict[str, tuple[Any, str]] = {
    "none": (None, "expected 'TM1 ...'"),
    "bearer": ("Bearer abc", "expected 'TM1 ...'"),
    "lower case scheme": ("tm1 " + auth_header(GOOD_AUTH)[4:], "expected 'TM1 ...'"),
    "empty": ("TM1 ", "malformed Authorization header"),
    "not base64": ("TM1 !!!!", "malformed Authorization header"),
    "not ascii": ("TM1 ééé", "malformed Authorization header"),
    "too long": ("TM1 " + "A" * 9000, "expected 'TM1 ...'"),
    "list": (auth_header([1]), "Authorization: expected a JSON object"),
    "missing sig": (auth_header({k: v for k, v in GOOD_AUTH.items() if k != "sig"}), "Authorization: missing sig"),
    "extra": (auth_header({**GOOD_AUTH, "x": 1}), "Authorization: unexpected 'x'"),
    "short nonce": (auth_header({**GOOD_AUTH, "n": "0f"}), "nonce must be 32 hex digits"),
    "upper-case nonce": (auth_header({**GOOD_AUTH, "n": "0F" * 16}), "nonce must be 32 hex digits"),
    "long nonce": (auth_header({**GOOD_AUTH, "n": "0f" * 17}), "nonce: expected text"),
    "nonce not text": (auth_header({**GOOD_AUTH, "n": 5}), "nonce: expected text"),
    "who not a key": (auth_header({**GOOD_AUTH, "who": "root"}), "member key"),
    "who short key": (auth_header({**GOOD_AUTH, "who": b64(bytes(31))}), "member key: expected 32 bytes"),
    "negative time": (auth_header({**GOOD_AUTH, "t": -1}), "timestamp: expected an integer"),
    "time as bool": (auth_header({**GOOD_AUTH, "t": True}), "timestamp: expected an integer"),
    "time as float": (auth_header({**GOOD_AUTH, "t": 1.5}), "timestamp: expected an integer"),
    "sig not base64": (auth_header({**GOOD_AUTH, "sig": "***"}), "request signature: not valid base64"),
}


@pytest.mark.parametrize("case", list(BAD_HEADERS))
def test_malformed_authorization_refused(case: str) -> None:
    header, match = BAD_HEADERS[case]
    with refused(match):
        RequestAuth.parse(header)


def test_good_authorization_template_parses() -> None:
    """The base of BAD_HEADERS is valid, so each case fails for its own reason."""
    assert RequestAuth.parse(auth_header(GOOD_AUTH)).who == "admin"


# --- the replay guard ----------------------------------------------------------------------------


def nonce_auth(n: int, timestamp: int = NOW) -> RequestAuth:
    return RequestAuth("admin", timestamp, f"{n:032x}", bytes(64))


def test_replay_guard_refuses_a_nonce_twice() -> None:
    guard = ReplayGuard()
    guard.check(nonce_auth(1), NOW)
    guard.check(nonce_auth(2), NOW)
    with refused("replayed request refused"):
        guard.check(nonce_auth(1), NOW + 5)
    with refused("replayed request refused"):  # the nonce, not the whole request, is what counts
        guard.check(nonce_auth(1, NOW + 5), NOW + 5)


@pytest.mark.parametrize(("offset", "ok"), [(0, True), (REQUEST_WINDOW, True), (-REQUEST_WINDOW, True),
                                            (REQUEST_WINDOW + 1, False), (-REQUEST_WINDOW - 1, False)])
def test_replay_guard_window(offset: int, ok: bool) -> None:
    guard = ReplayGuard()
    if ok:
        guard.check(nonce_auth(1, NOW + offset), NOW)
    else:
        with refused(re.escape(f"{offset:+d} s off the coordinator's clock")):
            guard.check(nonce_auth(1, NOW + offset), NOW)
        guard.check(nonce_auth(1, NOW), NOW)  # a refused request does not use up its nonce


def test_replay_guard_memory_is_bounded() -> None:
    guard = ReplayGuard(window=10, limit=3)
    for n in range(3):
        guard.check(nonce_auth(n), NOW)
    with refused("too many requests"):
        guard.check(nonce_auth(3), NOW + 5)
    assert len(guard._seen) == 3
    guard.check(nonce_auth(4, NOW + 11), NOW + 11)  # the old nonces fell out of the window
    assert len(guard._seen) == 1
    with refused("off the coordinator's clock"):  # and so cannot be replayed either
        guard.check(nonce_auth(0), NOW + 11)
    for n in range(5, 7):
        guard.check(nonce_auth(n, NOW + 11), NOW + 11)
    assert len(guard._seen) == 3


def test_replay_guard_precheck_comes_before_the_signature_and_records_nothing() -> None:
    # The coordinator runs precheck before checking a signature, record after it passed:
    # stale and replayed requests cost no signature check, unsigned ones fill no table.
    guard = ReplayGuard()
    with refused("off the coordinator's clock"):
        guard.precheck(nonce_auth(1, NOW - 1000), NOW)
    guard.precheck(nonce_auth(1), NOW)
    guard.precheck(nonce_auth(1), NOW)  # nothing recorded: a forged copy cannot burn a nonce
    assert guard._seen == {}
    guard.record(nonce_auth(1), NOW)
    with refused("replayed"):
        guard.precheck(nonce_auth(1), NOW)
    with refused("replayed"):  # two copies that both passed precheck: the second is refused here
        guard.record(nonce_auth(1), NOW)


# --- endpoints --------------------------------------------------------------------------------------


def test_parse_endpoints() -> None:
    parsed = parse_endpoints({"addresses": ["192.0.2.7:51820", "10.0.0.1:1"], "last_seen": NOW})
    assert parsed == Endpoints((("192.0.2.7", 51820), ("10.0.0.1", 1)), NOW)
    assert parse_endpoints({"addresses": [], "last_seen": None}) == Endpoints()
    relayed = parse_endpoints({"addresses": [], "last_seen": None, "relay": "https://relay.example.org:8443/"})
    assert relayed.relay == "https://relay.example.org:8443" and relayed.to_wire()["relay"] == relayed.relay
    # A key from a newer coordinator is ignored (dropped), not a reason to refuse the map.
    later = parse_endpoints({"addresses": ["192.0.2.7:51820"], "last_seen": NOW, "hole": {"x": 1}})
    assert later == Endpoints((("192.0.2.7", 51820),), NOW) and "hole" not in later.to_wire()


@pytest.mark.parametrize(("value", "match"), [
    ([], "endpoints: expected a JSON object"),
    ({"addresses": []}, "endpoints: missing last_seen"),
    ({"addresses": "192.0.2.7:1", "last_seen": None}, "at most 8 addresses"),
    ({"addresses": ["192.0.2.7:1"] * 9, "last_seen": None}, "at most 8 addresses"),
    ({"addresses": [], "last_seen": True}, "last_seen: expected an integer"),
    ({"addresses": [], "last_seen": -5}, "last_seen: expected an integer"),
    *[({"addresses": [bad], "last_seen": None}, "expected IPv4:port|endpoint: expected text") for bad in [
        "192.0.2.7", "192.0.2.7:0", "192.0.2.7:65536", ":80", "[2001:db8::1]:80", "host:80", "192.0.2.7:-1",
        "192.0.2.7: 80", "192.0.2.7:8x", "1.2.3:80", 80, None, "1" * 65]],
    *[({"addresses": [], "last_seen": None, "relay": bad}, "relay") for bad in [
        "ws://192.0.2.7:1", "http://", "http://a:b@192.0.2.7:1", "http://192.0.2.7:1/?x", "http://192.0.2.7:1#f",
        "http://a..b:1", "http://" + "a" * 64 + ":1", "http://a:80/x\r\nFAKE", "http://a\x1b[2J:1",
        "http://127.0.0.1:7401", "http://169.254.169.254", "http://0.0.0.0:1", "http://1.2.3:7",
        "http://192.0.2.7:99999", "http://192.0.2.7:0", 7, {"url": "http://x"}, "http://" + "x" * 300]],
])
def test_parse_endpoints_refuses(value: Any, match: str) -> None:
    with refused(match):
        parse_endpoints(value)


# --- the peer map -----------------------------------------------------------------------------------


def names(entries: Any) -> set[str]:
    return {entry.name for entry in entries}


def removed(changes: Any) -> dict[str, str]:
    return {entry.name: reason for entry, reason in changes.removed}


ENDPOINT = {"addresses": ["192.0.2.7:51820"], "last_seen": NOW}


def test_peer_map_add_and_own_entry_skipped(peer_map: PeerMap, world: World) -> None:
    listed = update([world.admin_member(0), world.admin_member(1), world.admin_member(2)], version=7)
    changes = peer_map.apply(listed)
    assert names(changes.added) == {"node1", "node2"}
    assert set(peer_map.members) == {world.wg(1), world.wg(2)}
    assert peer_map.version == 7
    assert not changes.removed and not changes.rejected and changes.revoked_self is None
    again = peer_map.apply(listed)
    assert not again.added and not again.removed and not again.rejected


def test_peer_map_endpoints(peer_map: PeerMap, world: World) -> None:
    endpoints = {b64(world.wg(1)): ENDPOINT, b64(world.wg(0)): ENDPOINT, b64(world.wg(3)): ENDPOINT,
                 b64(world.wg(2)): {"addresses": ["nowhere"], "last_seen": None}}
    changes = peer_map.apply(update([world.admin_member(1), world.admin_member(2)], endpoints=endpoints))
    expected = Endpoints((("192.0.2.7", 51820),), NOW)
    assert changes.endpoints == {world.wg(1): expected}  # own and unknown keys ignored
    assert peer_map.endpoints == {world.wg(1): expected}
    assert [r for r in changes.rejected if r.startswith("endpoints refused")] == changes.rejected
    assert len(changes.rejected) == 1 and peer_map.rejected["endpoints refused"] == 1
    again = peer_map.apply(update(full=False, version=2, endpoints={b64(world.wg(1)): ENDPOINT}))
    assert again.endpoints == {}  # unchanged endpoints are not reported again
    bad_key = peer_map.apply(update(full=False, version=3, endpoints={"not a key": ENDPOINT}))
    assert bad_key.rejected == ["endpoints refused: member key: not valid base64"]


def test_peer_map_full_and_delta(peer_map: PeerMap, world: World) -> None:
    peer_map.apply(update([world.admin_member(1), world.admin_member(2)], endpoints={b64(world.wg(1)): ENDPOINT},
                          version=5))
    delta = peer_map.apply(update([world.admin_member(3)], full=False, version=6))
    assert names(delta.added) == {"node3"} and not delta.removed
    assert names(peer_map.members.values()) == {"node1", "node2", "node3"}
    full = peer_map.apply(update([world.admin_member(2), world.admin_member(3)], version=7))
    assert removed(full) == {"node1": "no longer listed by the coordinator"}
    assert world.wg(1) not in peer_map.endpoints
    assert peer_map.version == 7


@pytest.mark.parametrize("full", [True, False])
def test_peer_map_never_rolls_back_to_an_older_version(full: bool, peer_map: PeerMap, world: World) -> None:
    """A replayed map, or a coordinator restored from an old backup, changes nothing."""
    peer_map.apply(update([world.admin_member(1), world.admin_member(2)], version=6))
    before = canonical(peer_map.to_cache())
    with refused("peer map version 5 is older than version 6, which this node already has"):
        peer_map.apply(update([world.admin_member(3)], full=full, version=5))
    assert canonical(peer_map.to_cache()) == before
    assert names(peer_map.apply(update([world.admin_member(3)], full=False, version=6)).added) == {"node3"}


def test_peer_map_newer_entry_replaces_older(peer_map: PeerMap, world: World) -> None:
    peer_map.apply(update([world.admin_member(1)]))
    changes = peer_map.apply(update([world.admin_member(1, joined=NOW + 9)], full=False, version=2))
    assert removed(changes) == {"node1": "replaced by a newer entry"}
    assert [m.joined for m in changes.added] == [NOW + 9]
    assert peer_map.members[world.wg(1)].joined == NOW + 9


def test_revocation_removes_member_and_outlives_replayed_maps(peer_map: PeerMap, world: World) -> None:
    before = update([world.admin_member(1), world.admin_member(2)], endpoints={b64(world.wg(1)): ENDPOINT})
    peer_map.apply(before)
    revocation = world.revocation(1, at=NOW + 1000)
    changes = peer_map.apply(update(revocations=[revocation.to_wire()], full=False, version=2))
    assert removed(changes) == {"node1": f"revoked by the admin at {NOW + 1000}"}
    assert changes.revoked_self is None
    assert world.wg(1) not in peer_map.members and world.wg(1) not in peer_map.endpoints
    assert peer_map.revocations == {world.wg(1): revocation}

    for version, replay in enumerate((before, update([world.admin_member(1, joined=NOW + 1000)])), start=3):
        replay["version"] = version  # a coordinator serving an older (or forged-late) map as if new
        replayed = peer_map.apply(replay)
        assert world.wg(1) not in peer_map.members
        assert f"member node1 refused: its key was revoked at {NOW + 1000}" in replayed.rejected
    assert peer_map.revocations == {world.wg(1): revocation}  # a full map without it changes nothing


def test_entry_authorised_after_revocation_is_accepted(peer_map: PeerMap, world: World) -> None:
    revocation = world.revocation(1, at=NOW + 1000)
    peer_map.apply(update(revocations=[revocation.to_wire()]))
    changes = peer_map.apply(update([world.admin_member(1, joined=NOW + 1001)], [revocation.to_wire()]))
    assert names(changes.added) == {"node1"} and not changes.rejected
    # An entry the admin signed at or before the revocation does not do.
    late = PeerMap(world.network, world.wg(0))
    refused_late = late.apply(update([world.admin_member(1, joined=NOW + 1000)], [revocation.to_wire()]))
    assert not refused_late.added
    assert refused_late.rejected == [f"member node1 refused: its key was revoked at {NOW + 1000}"]


def test_earlier_revocation_does_not_replace_a_later_one(peer_map: PeerMap, world: World) -> None:
    late, early = world.revocation(1, at=NOW + 2000), world.revocation(1, at=NOW + 1000)
    peer_map.apply(update(revocations=[late.to_wire(), early.to_wire()]))
    assert peer_map.revocations[world.wg(1)] == late
    changes = peer_map.apply(update([world.admin_member(1, joined=NOW + 1500)], [early.to_wire()]))
    assert not changes.added and world.wg(1) not in peer_map.members


def test_own_revocation_sets_revoked_self(peer_map: PeerMap, world: World) -> None:
    own = world.revocation(0, at=NOW + 1000)
    changes = peer_map.apply(update([world.admin_member(1)], [own.to_wire(), world.revocation(2).to_wire()]))
    assert changes.revoked_self == own
    assert names(changes.added) == {"node1"}


def test_revoked_self_is_the_latest_own_revocation(peer_map: PeerMap, world: World) -> None:
    """Listed in any order, the node is told of the revocation that covers the most."""
    late, early = world.revocation(0, at=NOW + 2000), world.revocation(0, at=NOW + 1000)
    assert peer_map.apply(update(revocations=[late.to_wire(), early.to_wire()])).revoked_self == late
    assert peer_map.apply(update(revocations=[early.to_wire()])).revoked_self == late


def test_old_own_revocation_does_not_stop_a_readmitted_node(peer_map: PeerMap, world: World) -> None:
    """Re-admitting a key takes a new invite or approval (docs/coordinator.md); the map
    that lists the new entry still carries the old revocation, which no longer covers it."""
    own = world.revocation(0, at=NOW + 1000)
    readmitted = world.admin_member(0, joined=NOW + 1002)
    changes = peer_map.apply(update([readmitted, world.admin_member(1)], [own.to_wire()]))
    assert changes.revoked_self is None
    assert names(changes.added) == {"node1"}
    still_revoked = PeerMap(world.network, world.wg(0))
    old_entry = world.admin_member(0, joined=NOW + 999)
    assert still_revoked.apply(update([old_entry], [own.to_wire()])).revoked_self == own


def _unsigned(w: World, other: World) -> JSON:
    return {"body": w.body(3), "admin_sig": None}


def _other_admin(w: World, other: World) -> JSON:
    return sign_member_as_admin(w.body(3), other.admin)


def _other_invite_key(w: World, other: World) -> JSON:
    wire = w.invited_member(3)
    wire["invite_sig"] = w.invited_member(3)["invite_sig"]  # made with another grant's key
    return wire


def _grant_of_other_network(w: World, other: World) -> JSON:
    token = other.invite()
    return sign_member_with_invite(w.body(3), token)  # grant and invite key valid, but of the other network


TAMPERED_MEMBERS = [_unsigned, _other_admin, _other_invite_key, _grant_of_other_network]


@pytest.mark.parametrize("forge", TAMPERED_MEMBERS, ids=[f.__name__.strip("_") for f in TAMPERED_MEMBERS])
def test_peer_map_refuses_tampered_member(forge: Callable[[World, World], JSON], peer_map: PeerMap, world: World,
                                          other: World) -> None:
    changes = peer_map.apply(update([world.admin_member(1), forge(world, other), world.admin_member(2)]))
    assert names(changes.added) == {"node1", "node2"}  # the others still count
    assert world.wg(3) not in peer_map.members
    assert len(changes.rejected) == 1 and changes.rejected[0].startswith("member refused: ")
    assert peer_map.rejected == {"member refused": 1}
    peer_map.apply(update([forge(world, other)], full=False, version=2))
    assert peer_map.rejected == {"member refused": 2}


def test_peer_map_refuses_forged_revocation(peer_map: PeerMap, world: World, other: World) -> None:
    forged = resign(world.revocation(1).to_wire(), other.admin, "revoke")
    changes = peer_map.apply(update([world.admin_member(1)], [forged]))
    assert names(changes.added) == {"node1"} and not peer_map.revocations
    assert changes.rejected == ["revocation refused: revocation: signature does not verify"]
    assert peer_map.rejected == {"revocation refused": 1}


@pytest.mark.parametrize("clash", ["name", "ipv4"])
def test_peer_map_refuses_name_or_address_clash(clash: str, peer_map: PeerMap, world: World) -> None:
    peer_map.apply(update([world.admin_member(1)]))
    entry = world.admin_member(2, name="node1") if clash == "name" else world.admin_member(2, host=2)
    changes = peer_map.apply(update([entry], full=False, version=2))
    assert not changes.added and world.wg(2) not in peer_map.members
    bound = "name node1" if clash == "name" else f"ipv4 {world.network.host(2)[0]}"
    assert changes.rejected == [f"member {entry['body']['name']} refused: {bound} is bound to another key "
                                "(only a revocation of that key frees it)"]


def test_full_map_leaving_a_member_out_does_not_free_its_name_or_address(peer_map: PeerMap, world: World) -> None:
    """A full map that no longer lists a member hides it (availability), but its name and
    address stay bound to its key: only a revocation frees them."""
    peer_map.apply(update([world.admin_member(1)]))
    taker = world.admin_member(2, host=2, name="node1", joined=NOW - 50)  # claims to be older, too
    changes = peer_map.apply(update([taker], version=2))
    assert removed(changes) == {"node1": "no longer listed by the coordinator"}
    assert not changes.added and world.wg(2) not in peer_map.members
    assert len(changes.rejected) == 1 and "is bound to another key" in changes.rejected[0]
    assert peer_map.bindings["name:node1"] == world.wg(1)
    revoked = peer_map.apply(update([taker], [world.revocation(1).to_wire()], version=3))
    assert names(revoked.added) == {"node1"} and peer_map.members[world.wg(2)].name == "node1"
    assert peer_map.bindings["name:node1"] == world.wg(2) and revoked.bindings_changed


def test_a_readmitted_member_hidden_by_a_map_keeps_its_name_and_address(peer_map: PeerMap, world: World) -> None:
    """A revocation older than the holder's re-admission frees nothing, even while a map
    leaves the holder out."""
    revocation = world.revocation(1, at=NOW + 1000)
    peer_map.apply(update([world.admin_member(1)], [revocation.to_wire()]))
    peer_map.apply(update([world.admin_member(1, joined=NOW + 2000)], [revocation.to_wire()], version=2))
    assert world.wg(1) in peer_map.members
    taker = world.admin_member(2, host=2, name="node1", joined=NOW + 3000)
    changes = peer_map.apply(update([taker], [revocation.to_wire()], version=3))  # node1 left out
    assert not changes.added and "is bound to another key" in changes.rejected[0]
    assert peer_map.bindings["name:node1"] == world.wg(1) and not peer_map.key_revoked(world.wg(1))


def test_bindings_of_the_node_itself_hold(world: World) -> None:
    """This node's own name and address are bound to it as well."""
    own_view = PeerMap(world.network, world.wg(0))
    own_view.apply(update([world.admin_member(0)]))
    changes = own_view.apply(update([world.admin_member(0), world.admin_member(1, name="node0")], version=2))
    assert not changes.added and "name node0 is bound to another key" in changes.rejected[0]


def test_invite_signed_entries_are_not_members(peer_map: PeerMap, world: World) -> None:
    """Whoever holds an invite key (old, expired or used up) cannot make a member: only the
    admin's countersignature does (tunnelmesh.admission)."""
    expired = world.invite(created=NOW - 9000, expires=NOW - 5000)
    changes = peer_map.apply(update([world.invited_member(1), world.invited_member(2, expired, joined=NOW - 6000),
                                     world.admin_member(3)]))
    assert names(changes.added) == {"node3"}
    assert changes.rejected == [f"member node{i} refused: signed with an invite key only, not countersigned by the "
                                "admin" for i in (1, 2)]


def test_ssh_key_revocation_covers_a_fresh_x25519_key(peer_map: PeerMap, world: World) -> None:
    """A revoked member cannot attest a new X25519 key with its SSH key and come back, nor
    hold two X25519 keys for one SSH key while it is a member."""
    peer_map.apply(update([world.admin_member(1)]))
    fresh = reattested(world.nodes[1], X25519PrivateKey.generate().public_key().public_bytes_raw())
    twin = sign_member_as_admin(member_body(world.network.network, "twin", fresh, *world.network.host(9), NOW + 1),
                                world.admin)
    twice = peer_map.apply(update([twin], full=False, version=2))
    assert not twice.added and "is bound to another key" in twice.rejected[0]
    revocation = world.revocation(1, at=NOW + 1000)
    assert revocation.ssh == world.nodes[1].public.fingerprint
    back = sign_member_as_admin(member_body(world.network.network, "back", fresh, *world.network.host(9), NOW + 999),
                                world.admin)
    changes = peer_map.apply(update([back], [revocation.to_wire()], full=False, version=3))
    assert not changes.added and changes.rejected == [f"member back refused: its key was revoked at {NOW + 1000}"]


def test_revocation_without_ssh_fingerprint_still_parses(world: World) -> None:
    """Revocations kept from before they named the SSH key stay valid (by WireGuard key)."""
    body = {"network": world.network.network, "wg_key": b64(world.wg(1)), "name": "node1", "at": NOW}
    old = Revocation.from_wire({"body": body, "sig": world.admin.sign("revoke", body)}, world.network)
    assert old.ssh is None and old.covers(world.entry(1)) and not old.covers(world.entry(2))


def test_secret_epochs_only_move_forward(peer_map: PeerMap, world: World, other: World) -> None:
    two = world.secret([0, 1], epoch=2)
    assert peer_map.apply(update(secret=two.to_wire())).new_secret == two
    for stale in (world.secret([0], epoch=1), two, world.secret([0], epoch=2, at=NOW + 5)):
        assert peer_map.apply(update(secret=stale.to_wire(), full=False, version=2)).new_secret is None
        assert peer_map.secret == two
    three = world.secret([0], epoch=3)
    assert peer_map.apply(update(secret=three.to_wire(), full=False, version=3)).new_secret == three
    forged = resign(world.secret([0], epoch=9).to_wire(), other.admin, "secret")
    changes = peer_map.apply(update(secret=forged, full=False, version=4))
    assert changes.new_secret is None and peer_map.secret == three
    assert changes.rejected == ["secret record refused: secret record: signature does not verify"]
    assert peer_map.secret.open_for(world.wg(0), world.nodes[0].static_private) == SECRET


def test_cache_round_trip(peer_map: PeerMap, world: World) -> None:
    peer_map.apply(update(
        [world.admin_member(1), world.admin_member(2), world.admin_member(3)],
        [world.revocation(3).to_wire(), world.revocation(4).to_wire()],
        secret=world.secret([0, 1, 2], epoch=5).to_wire(),
        endpoints={b64(world.wg(1)): ENDPOINT, b64(world.wg(2)): {"addresses": [], "last_seen": None}},
        version=12))
    cache = json.loads(json.dumps(peer_map.to_cache()))  # as written to peermap.json
    fresh = PeerMap(world.network, world.wg(0))
    changes = fresh.apply(cache)
    assert not changes.rejected
    assert fresh.members == peer_map.members and names(fresh.members.values()) == {"node1", "node2"}
    assert fresh.revocations == peer_map.revocations and set(fresh.revocations) == {world.wg(3), world.wg(4)}
    assert fresh.secret == peer_map.secret and fresh.secret is not None and fresh.secret.epoch == 5
    assert fresh.endpoints == peer_map.endpoints and fresh.version == 12
    assert canonical(fresh.to_cache()) == canonical(cache)


BAD_UPDATES: dict[str, tuple[Callable[[JSON], Any], str]] = {
    "not an object": (lambda u: [u], "peer map: expected a JSON object"),
    "missing version": (lambda u: {k: v for k, v in u.items() if k != "version"}, "peer map: missing version"),
    "extra key": (lambda u: {**u, "more": 1}, "peer map: unexpected 'more'"),
    "version as bool": (lambda u: {**u, "version": True}, "version: expected an integer"),
    "full not bool": (lambda u: {**u, "full": 1}, "'full' must be true or false"),
    "members not a list": (lambda u: {**u, "members": {}}, "members: expected a list"),
    "revocations not a list": (lambda u: {**u, "revocations": None}, "revocations: expected a list"),
    "endpoints not an object": (lambda u: {**u, "endpoints": []}, "endpoints: expected a JSON object"),
}


@pytest.mark.parametrize("case", list(BAD_UPDATES))
def test_malformed_update_refused_and_changes_nothing(case: str, peer_map: PeerMap, world: World) -> None:
    peer_map.apply(update([world.admin_member(1), world.admin_member(2)], version=3))
    before = canonical(peer_map.to_cache())
    good = update([world.admin_member(3)], [world.revocation(1).to_wire()], secret=world.secret([0]).to_wire(),
                  full=False, version=9)
    make, match = BAD_UPDATES[case]
    with refused(match):
        peer_map.apply(make(good))
    assert canonical(peer_map.to_cache()) == before
