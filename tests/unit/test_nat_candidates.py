"""The candidate record (tunnelmesh.nat.candidates): a member signs its candidates and
NAT behaviour, bound to its WireGuard key, with a version; holders keep the newest, so a
stale record (replayed by the coordinator or anyone) is refused and a newer one replaces
the old. Untrusted JSON gives CandidateError only (hypothesis)."""

from __future__ import annotations

import asyncio
import base64
import copy
import functools
import ipaddress
import logging
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from actors.coordinator_client import peer_spec
from tests.links import new_identity
from tests.support.membership import World, update
from tunnelmesh.config import ConfigError
from tunnelmesh.config.checker import parse_config
from tunnelmesh.identity import NodeIdentity
from tunnelmesh.links.attest import MAX_FUTURE
from tunnelmesh.membership import PeerMap
from tunnelmesh.membership.peermap import MAX_CANDIDATE_RECORD
from tunnelmesh.nat.candidates import (
    MAX_CANDIDATES,
    CandidateError,
    CandidateRecord,
    VerifiedCandidates,
    make_candidate_record,
    order_candidates,
    own_candidates,
    verify_candidate_record,
)
from tunnelmesh.nat.report import (
    ADDRESS_AND_PORT_DEPENDENT,
    CONFIGURED,
    ENDPOINT_INDEPENDENT,
    LOCAL,
    MAPPED,
    REFLEXIVE,
    Candidate,
    NatReport,
    PeerNat,
)

V0 = 1_767_225_600_000  # ms
NOW = V0 / 1000
SAMPLE = (Candidate("192.168.1.10", 51820, LOCAL), Candidate("198.51.100.7", 40001, MAPPED),
          Candidate("203.0.113.9", 51820, CONFIGURED), Candidate("198.51.100.7", 61000, REFLEXIVE))


@functools.cache
def nodes() -> tuple[NodeIdentity, NodeIdentity]:
    return new_identity(), new_identity()


def make(version: int = V0, candidates: tuple[Candidate, ...] = SAMPLE, i: int = 0) -> dict[str, Any]:
    return asyncio.run(make_candidate_record(nodes()[i], candidates, mapping=ADDRESS_AND_PORT_DEPENDENT,
                                             filtering=ENDPOINT_INDEPENDENT, version=version))


@functools.cache
def signed() -> dict[str, Any]:
    return make()


def refused(wire: Any) -> str:
    with pytest.raises(CandidateError) as caught:
        verify_candidate_record(wire, nodes()[0].public)
    return str(caught.value)


def test_round_trip_bound_to_the_signer_and_its_wireguard_key() -> None:
    record = verify_candidate_record(signed(), nodes()[0].public)
    assert record == CandidateRecord(SAMPLE, PeerNat(ADDRESS_AND_PORT_DEPENDENT, ENDPOINT_INDEPENDENT,
                                                     (("198.51.100.7", 61000),)), V0)
    assert record.nat.hard
    with pytest.raises(CandidateError, match="by another key"):
        verify_candidate_record(signed(), nodes()[1].public)
    # The same SSH key with another WireGuard key: the record names the key it was made for.
    other = type(nodes()[0].public)(nodes()[0].public.ssh_public_key, nodes()[1].public.wg_public_key,
                                    nodes()[0].public.attestation)
    with pytest.raises(CandidateError, match="does not verify"):
        verify_candidate_record(signed(), other)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda w: w["candidates"][0].update(address="192.168.1.11:51820"), "does not verify"),
        (lambda w: w["candidates"][0].update(kind=MAPPED), "does not verify"),
        (lambda w: w["candidates"].reverse(), "does not verify"),
        (lambda w: w["candidates"].pop(), "does not verify"),
        (lambda w: w.update(mapping=ENDPOINT_INDEPENDENT), "does not verify"),
        (lambda w: w.update(version=V0 + 1), "does not verify"),
        (lambda w: w["candidates"][0].update(kind="relay"), "kind must be one of"),
        (lambda w: w["candidates"][0].update(address="192.168.001.10:51820"), "IPv4"),
        (lambda w: w["candidates"][0].update(address="192.168.1.10:051820"), "IPv4:port"),
        (lambda w: w["candidates"][0].update(address="[::1]:51820"), "IPv4"),
        (lambda w: w["candidates"][0].update(address="host.example:51820"), "IPv4"),
        (lambda w: w["candidates"][0].update(port=1), "exactly address, kind"),
        (lambda w: w["candidates"].append(w["candidates"][0]), "listed twice"),
        (lambda w: w.update(candidates=w["candidates"] * 4), f"at most {MAX_CANDIDATES}"),
        (lambda w: w.update(filtering="cone"), "mapping and filtering must be one of"),
        (lambda w: w.update(version=True), "Unix milliseconds"),
        (lambda w: w.update(version=NOW), "Unix milliseconds"),  # seconds, or a float
        (lambda w: w.update(version=2**53), "Unix milliseconds"),
        (lambda w: w.update(sig=w["sig"] + "="), "base64"),
        (lambda w: w.update(sig="x" * MAX_CANDIDATE_RECORD), "larger than"),
        (lambda w: w.pop("version"), "exactly candidates"),
        (lambda w: w.update(extra=None), "exactly candidates"),
    ],
)
def test_tampered_malformed_or_oversized_records_are_refused_saying_why(change: Any, message: str) -> None:
    wire = copy.deepcopy(signed())
    change(wire)
    assert message in refused(wire)


def test_make_refuses_what_peers_would() -> None:
    with pytest.raises(CandidateError, match="listed twice"):
        make(candidates=(SAMPLE[0], SAMPLE[0]))
    with pytest.raises(CandidateError, match="Unix milliseconds"):
        make(version=int(NOW))


def test_stale_records_are_refused_a_newer_one_replaces_the_old_and_warnings_are_rate_limited(
        caplog: pytest.LogCaptureFixture) -> None:
    key, public = nodes()[0].public.wg_public_key, nodes()[0].public
    older, newer = signed(), make(V0 + 5000, SAMPLE[:1])
    held = VerifiedCandidates()
    assert held.take("a", key, public, older, NOW).version == V0  # type: ignore[union-attr]
    assert held.take("a", key, public, newer, NOW).candidates == SAMPLE[:1]  # type: ignore[union-attr]
    with caplog.at_level(logging.WARNING, logger="tunnelmesh.nat"):
        # The coordinator (or anyone on the path) serves the old one again: refused, the newer stays.
        assert held.take("a", key, public, older, NOW + 1).version == V0 + 5000  # type: ignore[union-attr]
        assert held.take("a", key, public, older, NOW + 2).version == V0 + 5000  # type: ignore[union-attr]
    assert held.dropped == 2
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "member a: candidate record issued" in warnings[0] and "a replay" in warnings[0]
    # A tampered record is dropped the same way; the last verified one stays.
    tampered = copy.deepcopy(newer)
    tampered["candidates"][0]["address"] = "192.0.2.66:51820"
    assert held.take("a", key, public, tampered, NOW + 120).candidates == SAMPLE[:1]  # type: ignore[union-attr]
    assert held.dropped == 3
    # From the future (a fast clock): refused.
    future = make(V0 + (MAX_FUTURE + 10) * 1000)
    assert held.take("a", key, public, future, NOW).version == V0 + 5000  # type: ignore[union-attr]
    # A member that leaves and comes back gets no old record accepted either.
    held.keep_only({})
    assert held.records == {}
    assert held.take("a", key, public, older, NOW + 200) is None


def test_own_candidates_list_each_address_once_and_interface_addresses_give_way() -> None:
    report = NatReport(NOW, "none", ENDPOINT_INDEPENDENT, reflexive=(("192.168.1.10", 51820), ("198.51.100.7", 61000)))
    mapped, configured = Candidate("198.51.100.7", 40001, MAPPED), Candidate("203.0.113.9", 51820, CONFIGURED)
    got = own_candidates([("192.168.1.10", 51820)], report=report, mapped=mapped, configured=configured)
    # The reflexive address that is an interface address stays "local" (no NAT there).
    assert set(got) == {Candidate("192.168.1.10", 51820, LOCAL), mapped, configured,
                        Candidate("198.51.100.7", 61000, REFLEXIVE)}
    many = [(f"10.0.{i}.1", 51820) for i in range(MAX_CANDIDATES + 3)]
    got = own_candidates(many, report=report, mapped=mapped, configured=configured)
    assert len(got) == MAX_CANDIDATES and mapped in got and configured in got
    assert own_candidates([]) == ()


def test_order_same_lan_first_then_mapped_configured_reflexive_observed_other_lans() -> None:
    record = CandidateRecord((Candidate("10.9.0.5", 51820, LOCAL), Candidate("198.51.100.7", 61000, REFLEXIVE),
                              Candidate("192.168.1.10", 51820, LOCAL), Candidate("203.0.113.9", 51820, CONFIGURED),
                              Candidate("198.51.100.7", 40001, MAPPED)), PeerNat(), V0)
    observed = (("198.51.100.7", 51820), ("192.168.1.10", 51820))
    lan = [ipaddress.IPv4Network("192.168.1.0/24")]
    assert order_candidates(record, observed, lan) == (
        ("192.168.1.10", 51820), ("198.51.100.7", 40001), ("203.0.113.9", 51820), ("198.51.100.7", 61000),
        ("198.51.100.7", 51820), ("10.9.0.5", 51820))
    assert order_candidates(None, observed, lan) == observed  # no verified record: the coordinator's word


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**60, 2**60) | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=12), inner, max_size=6),
    max_leaves=40,
)


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_arbitrary_json_gives_only_a_clear_error(value: Any) -> None:
    with pytest.raises(CandidateError):
        verify_candidate_record(value, nodes()[0].public)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(["candidates", "mapping", "filtering", "version", "sig"]), json_values,
       st.integers(0, 3), st.sampled_from(["address", "kind"]))
def test_any_change_to_a_signed_record_is_refused(key: str, value: Any, index: int, field: str) -> None:
    wire = copy.deepcopy(signed())
    if key == "candidates" and isinstance(value, str):
        wire["candidates"][index][field] = value  # inside a candidate, too
    else:
        wire[key] = value
    if wire == signed():
        return  # hypothesis drew the value already there
    with pytest.raises(CandidateError):
        verify_candidate_record(wire, nodes()[0].public)


def test_a_configured_public_endpoint_is_an_ipv4_address_and_port(tmp_path: Path) -> None:
    base = '[node]\nname = "x"\nidentity = "/tmp/key"\n[coordinator]\nurl = "https://192.0.2.1:7400"\n[nat]\n'
    parse = functools.partial(parse_config, path=tmp_path / "tunnelmesh.toml", state_dir=tmp_path)
    assert parse(base + 'public_endpoint = "198.51.100.7:51820"\n').nat.public_endpoint == ("198.51.100.7", 51820)
    assert parse(base).nat.public_endpoint is None
    for wrong, says in (('"vpn.example.org:51820"', "is not an IPv4 address"), ('"198.51.100.7"', "expected IPv4:port"),
                        ("51820", "must be a string")):
        with pytest.raises(ConfigError, match=f"tunnelmesh.toml:7: \\[nat\\]: public_endpoint.*{says}"):
            parse(base + f"public_endpoint = {wrong}\n")


def test_a_peer_spec_carries_the_verified_candidates_best_first_and_the_peers_nat() -> None:
    """What the coordinator client hands the mesh for a member (actors.coordinator_client.
    peer_spec): its record's candidates ordered for this node's LAN, then the coordinator's
    observation; its NAT. A record that does not verify leaves the observation alone."""
    world = World.create()
    network_world = World(world.admin, world.network, nodes())
    key = nodes()[0].public.wg_public_key
    wire = make(candidates=(Candidate("192.168.1.10", 51820, LOCAL), Candidate("198.51.100.7", 61000, REFLEXIVE)))
    endpoints = {base64.b64encode(key).decode(): {"addresses": ["203.0.113.50:51820"], "last_seen": 1,
                                                  "candidates": wire}}
    peers = PeerMap(world.network, nodes()[1].public.wg_public_key)
    peers.apply(update([network_world.admin_member(0)], endpoints=endpoints))
    snapshot = peers.snapshot()
    member = snapshot.members[key]
    held = VerifiedCandidates()
    held.take(member.name, key, member.identity, snapshot.endpoints[key].candidate_record, NOW)
    spec = peer_spec(member, snapshot, records=held.records, lan=[ipaddress.IPv4Network("192.168.1.0/24")])
    assert spec.candidates == (("192.168.1.10", 51820), ("198.51.100.7", 61000), ("203.0.113.50", 51820))
    assert spec.endpoint == ("192.168.1.10", 51820) and spec.nat.hard
    assert peer_spec(member, snapshot).candidates == (("203.0.113.50", 51820),)  # no verified record
    assert peer_spec(member, snapshot).nat == PeerNat()
