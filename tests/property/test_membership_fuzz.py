"""Fuzzing the membership parsers: whatever JSON-like value comes in, only
MembershipError comes out, and no mutation of a valid signed record that changes what
was signed is ever accepted (nor does a refused peer map update change the map)."""

from __future__ import annotations

import base64
import copy
import functools
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.support.membership import NOW, World, update
from tunnelmesh.membership import (
    InviteGrant,
    MemberEntry,
    MembershipError,
    NetworkInfo,
    PeerMap,
    RequestAuth,
    Revocation,
    SecretRecord,
    Token,
    b64,
    canonical,
    parse_endpoints,
    sign_admin_request,
    verify_admin_request,
)

FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
REQUEST = ("POST", "/v1/register", b'{"listen_port": 51820}')

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=24),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=16,
)


@functools.cache
def world() -> World:
    return World.create()


def fresh_map() -> PeerMap:
    """Node 0's map, already holding node 1 and the revocation of node 3 (so that a
    refused update has something to spoil, and node 3 something to get round)."""
    peer_map = PeerMap(world().network, world().wg(0))
    peer_map.apply(update([world().admin_member(1)], [world().revocation(3).to_wire()], version=3))
    return peer_map


# --- the valid records every mutation starts from ------------------------------------------------


@functools.cache
def samples() -> dict[str, Any]:
    w = world()
    return {
        "network": w.network.to_wire(),
        "invite": w.invite(name="node1").grant,
        "member-admin": w.admin_member(1),
        "member-invite": w.invited_member(2, w.invite(name="node2")),
        "revocation": w.revocation(3).to_wire(),
        "secret": w.secret([0, 1]).to_wire(),
        "update": update([w.admin_member(1), w.invited_member(2), w.admin_member(3), w.admin_member(4)],
                         [w.revocation(5).to_wire()],
                         secret=w.secret([0, 1]).to_wire(), full=False, version=5,
                         endpoints={b64(w.wg(1)): {"addresses": ["192.0.2.1:51820"], "last_seen": NOW}}),
        "token": w.invite(name="node1").encode(),
        "header": sign_admin_request(w.admin, *REQUEST, now=NOW),
    }


PARSERS: dict[str, Callable[[Any], Any]] = {
    "network": lambda v: NetworkInfo.from_wire(v, world().network.network),
    "invite": lambda v: InviteGrant.from_wire(v, world().admin.public),
    "member-admin": lambda v: MemberEntry.from_wire(v, world().network),
    "member-invite": lambda v: MemberEntry.from_wire(v, world().network),
    "revocation": lambda v: Revocation.from_wire(v, world().network),
    "secret": lambda v: SecretRecord.from_wire(v, world().network),
    "update": lambda v: fresh_map().apply(v),
    "token": Token.parse,
    "header": RequestAuth.parse,
    "endpoints": parse_endpoints,
    "network-unpinned": NetworkInfo.from_wire,
}


def signed_parts(kind: str, wire: Any) -> bytes:
    """The canonical bytes of everything a record's signatures cover."""
    if kind == "member-invite":
        return canonical([wire["body"], wire["grant"]["body"]])
    return canonical(wire["body"])


def parse_or_none(parser: Callable[[Any], Any], value: Any) -> Any:
    """The parser's answer, or None for MembershipError (any other exception fails the test)."""
    try:
        return parser(value)
    except MembershipError:
        return None


def applied_or_unchanged(peer_map: PeerMap, update: Any) -> bool:
    """Apply `update` to `peer_map`: True if it was taken; a refused one (MembershipError)
    must have left the map as it was."""
    before = canonical(peer_map.to_cache())
    try:
        peer_map.apply(update)
    except MembershipError:
        assert canonical(peer_map.to_cache()) == before, "a refused update changed the map"
        return False
    return True


def test_samples_are_valid() -> None:
    """Every mutation starts from a record that is accepted as it is."""
    for kind, value in samples().items():
        assert PARSERS[kind](value) is not None, kind
    changes = fresh_map().apply(samples()["update"])
    # node2's entry is signed with an invite key only (not countersigned by the admin): it
    # is a valid record, and no member; node3 is revoked.
    assert [m.name for m in changes.added] == ["node4"]
    assert [r.split(":")[0] for r in changes.rejected] == ["member node2 refused", "member node3 refused"]


# --- arbitrary values ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(PARSERS))
@FUZZ
@given(value=json_values)
@example(value={"body": {}, "sig": ""})
@example(value={"body": {"network": [], "name": {}, "identity": None, "ipv4": 1, "ipv6": 2, "joined": 3},
                "admin_sig": None})
@example(value=float("nan"))
def test_arbitrary_json_raises_only_membership_error(kind: str, value: Any) -> None:
    parse_or_none(PARSERS[kind], value)


@pytest.mark.parametrize("kind", ["token", "header"])
@FUZZ
@given(text=st.text(max_size=200) | st.text(max_size=200).map(lambda t: "tmjoin1-" + t)
       | st.text(max_size=200).map(lambda t: "TM1 " + t)
       | st.binary(max_size=150).map(lambda b: "tmjoin1-" + base64.urlsafe_b64encode(b).decode())
       | st.binary(max_size=150).map(lambda b: "TM1 " + base64.urlsafe_b64encode(b).decode()))
@example(text="tmjoin1-" + "W" * 3000)
@example(text="TM1 " + "W" * 3000)
def test_arbitrary_text_raises_only_membership_error(kind: str, text: str) -> None:
    parse_or_none(PARSERS[kind], text)


# --- mutations of valid records -------------------------------------------------------------------


Path = tuple[Any, ...]


def all_paths(value: Any, prefix: Path = ()) -> list[Path]:
    out = [prefix]
    if isinstance(value, dict):
        for key, item in value.items():
            out += all_paths(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            out += all_paths(item, (*prefix, index))
    return out


def get(value: Any, path: Path) -> Any:
    for step in path:
        value = value[step]
    return value


def mutate_text(text: str, op: int, pos: int, char: str) -> str:
    pos %= len(text) + 1
    if op == 0:  # truncate
        return text[:pos]
    if op == 1:  # insert
        return text[:pos] + char + text[pos:]
    if op == 2 and text:  # replace one character
        pos %= len(text)
        return text[:pos] + (char if char != text[pos] else chr(ord(char) ^ 1)) + text[pos + 1:]
    return text[:pos] + text[pos + 1:]  # delete one character


@st.composite
def text_mutation(draw: st.DrawFn, original: str) -> str:
    """`original` with one to three characters truncated at, inserted, replaced or deleted."""
    text = original
    for _ in range(draw(st.integers(1, 3))):
        text = mutate_text(text, draw(st.integers(0, 3)), draw(st.integers(0, 1 << 12)),
                           draw(st.sampled_from("A/+=_-.:0aZ \n\x00é")))
    return text


@st.composite
def mutation(draw: st.DrawFn, original: Any) -> Any:
    """`original` with one to three changes at random places in its JSON tree."""
    value = copy.deepcopy(original)
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(all_paths(value)))
        current = get(value, path)
        op = draw(st.sampled_from(["replace", "delete", "add", "tweak"]))
        if op == "replace" or (op == "tweak" and not isinstance(current, (str, int))):
            new = draw(json_values)
        elif op == "tweak" and isinstance(current, str):
            new = draw(text_mutation(current))
        elif op == "tweak":
            new = draw(st.sampled_from([current + 1, current - 1, -current, float(current), str(current), True,
                                        current * 2**40]))
        elif op == "add" and isinstance(current, dict):
            current[draw(st.text(max_size=8))] = draw(json_values)
            continue
        elif op == "add" and isinstance(current, list):
            current.insert(draw(st.integers(0, len(current))), draw(json_values))
            continue
        elif op == "delete" and path:
            parent = get(value, path[:-1])
            del parent[path[-1]]
            continue
        else:
            new = draw(json_values)
        if not path:
            return new
        get(value, path[:-1])[path[-1]] = new
    return value


SIGNED = ["network", "invite", "member-admin", "member-invite", "revocation", "secret"]


@pytest.mark.parametrize("kind", SIGNED)
@FUZZ
@given(data=st.data())
def test_mutated_signed_record_accepted_only_if_nothing_signed_changed(kind: str, data: st.DataObject) -> None:
    original = samples()[kind]
    mutated = data.draw(mutation(original))
    record = parse_or_none(PARSERS[kind], mutated)
    if record is None:
        return
    assert signed_parts(kind, mutated) == signed_parts(kind, original)
    assert canonical(record.to_wire()["body"]) == canonical(original["body"])


ADMIN_SIGNED = {"network": ("sig", "network"), "invite": ("sig", "invite"), "member-admin": ("admin_sig", "member"),
                "revocation": ("sig", "revoke"), "secret": ("sig", "secret")}


@pytest.mark.parametrize("kind", list(ADMIN_SIGNED))
@FUZZ
@given(data=st.data())
def test_admin_signed_body_accepted_only_as_it_is_written_back(kind: str, data: st.DataObject) -> None:
    """Even a body the admin did sign is accepted only in the one form `to_wire` gives
    back, so a record survives the peer map cache and the state file."""
    sig_field, sign_kind = ADMIN_SIGNED[kind]
    wire = copy.deepcopy(samples()[kind])
    wire["body"] = data.draw(mutation(wire["body"]))
    try:
        wire[sig_field] = world().admin.sign(sign_kind, wire["body"])
    except (TypeError, ValueError):  # not JSON (NaN, ...): nothing to sign
        return
    record = parse_or_none(PARSERS[kind], wire)
    if record is not None:
        assert record.to_wire() == wire
        assert PARSERS[kind](record.to_wire()) == record


@FUZZ
@given(data=st.data())
def test_mutated_peer_map_update(data: st.DataObject) -> None:
    original = samples()["update"]
    mutated = data.draw(mutation(original))
    peer_map = fresh_map()
    if not applied_or_unchanged(peer_map, mutated):
        return
    # Whatever got in is one of the records that were signed, unchanged.
    members = {canonical(m["body"]) for m in original["members"]} | {canonical(samples()["member-admin"]["body"])}
    assert {canonical(m.body()) for m in peer_map.members.values()} <= members
    assert {canonical(r.body()) for r in peer_map.revocations.values()} <= {
        canonical(r["body"]) for r in [*original["revocations"], world().revocation(3).to_wire()]}
    assert peer_map.secret is None or canonical(peer_map.secret.body()) == canonical(original["secret"]["body"])
    assert world().wg(3) not in peer_map.members  # revoked before: no mutation brings it back
    assert world().wg(3) in peer_map.revocations
    assert all(m.grant is None for m in peer_map.members.values())  # only admin-signed entries are members


@FUZZ
@given(data=st.data())
def test_mutated_token(data: st.DataObject) -> None:
    token = parse_or_none(Token.parse, data.draw(text_mutation(samples()["token"])))
    if token is not None:  # the token itself is not signed, but the grant inside it is
        grant = parse_or_none(PARSERS["invite"], token.grant)
        assert grant is None or canonical(token.grant["body"]) == canonical(
            Token.parse(samples()["token"]).grant["body"])


@FUZZ
@given(data=st.data())
def test_mutated_authorization_header(data: st.DataObject) -> None:
    auth = parse_or_none(RequestAuth.parse, data.draw(text_mutation(samples()["header"])))
    if auth is None:
        return
    try:
        verify_admin_request(auth, world().admin.public, *REQUEST)
    except MembershipError:
        return
    original = RequestAuth.parse(samples()["header"])
    assert (auth.timestamp, auth.nonce, auth.signature) == (original.timestamp, original.nonce, original.signature)
