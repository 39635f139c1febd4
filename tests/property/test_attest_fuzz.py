"""Fuzzing the SSH endpoint attestation: whatever JSON comes in, only AttestationError
comes out, and no change to a signed record verifies."""

from __future__ import annotations

import asyncio
import base64
import copy
import functools
from typing import Any

import asyncssh
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.links import new_identity, public_key_text
from tunnelmesh.identity import NodeIdentity
from tunnelmesh.links.attest import (
    AttestationError,
    BridgeEndpoint,
    SshEndpoint,
    make_attestation,
    verify_attestation,
)

FUZZ = settings(max_examples=300, deadline=None)
ISSUED = 1_767_225_600


@functools.cache
def nodes() -> tuple[NodeIdentity, NodeIdentity]:
    return new_identity(), new_identity()


@functools.cache
def host_keys() -> tuple[str, str]:
    return (
        public_key_text(asyncssh.generate_private_key("ssh-ed25519")),
        public_key_text(asyncssh.generate_private_key("ecdsa-sha2-nistp256")),
    )


@functools.cache
def sshd_keys() -> tuple[str, ...]:
    """The machine sshd's keys, as a node reads them: one of each type OpenSSH makes."""
    return tuple(sorted([host_keys()[1], public_key_text(asyncssh.generate_private_key("ssh-ed25519")),
                         public_key_text(asyncssh.generate_private_key("ssh-rsa", key_size=2048))]))


@functools.cache
def signed() -> dict[str, Any]:
    daemon_key, sshd_key = host_keys()
    bridge = BridgeEndpoint(22, "tunnelmesh", sshd_key)
    return asyncio.run(make_attestation(nodes()[0], port=2222, host_key=daemon_key, bridge=bridge, issued=ISSUED,
                                        sshd_host_keys=reversed(sshd_keys())))  # made sorted


def refused(wire: Any) -> str:
    with pytest.raises(AttestationError) as caught:
        verify_attestation(wire, nodes()[0].public)
    return str(caught.value)


def test_round_trip_and_bound_to_the_signer() -> None:
    daemon_key, sshd_key = host_keys()
    assert verify_attestation(signed(), nodes()[0].public) == SshEndpoint(
        2222, daemon_key, BridgeEndpoint(22, "tunnelmesh", sshd_key), ISSUED, sshd_keys()
    )
    with pytest.raises(AttestationError, match="does not verify|another key"):
        verify_attestation(signed(), nodes()[1].public)


def test_serving_nothing_is_a_valid_record() -> None:
    wire = asyncio.run(make_attestation(nodes()[1], port=None, host_key=None, bridge=None, issued=ISSUED))
    assert verify_attestation(wire, nodes()[1].public) == SshEndpoint(None, None, None, ISSUED)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda w: w.update(port=True), "port number"),
        (lambda w: w.update(port=0), "port number"),
        (lambda w: w.update(host_key=None), "both"),
        (lambda w: w.update(extra=1), "exactly"),
        (lambda w: w["bridge"].update(user="Root; rm"), "account name"),
        (lambda w: w["bridge"].update(host_key="ssh-ed25519 AAAA"), "not a valid SSH public key"),
        (lambda w: w.update(host_key=w["host_key"] + " comment"), "'<type> <base64>'"),
        (lambda w: w.update(sig=w["sig"] + "="), "base64"),
        (lambda w: w.update(port=2223), "does not verify"),
        (lambda w: w.update(issued=ISSUED + 1), "does not verify"),
        (lambda w: w.update(issued=True), "issued must be"),
        (lambda w: w.update(issued=str(ISSUED)), "issued must be"),
        (lambda w: w.update(issued=-1), "issued must be"),
        (lambda w: [w.pop("issued"), w.pop("sshd_host_keys")], "without an issue time"),
        (lambda w: w.pop("sshd_host_keys"), "without sshd_host_keys"),
        (lambda w: w.pop("issued"), "exactly"),
        (lambda w: w.update(sshd_host_keys=w["sshd_host_keys"][::-1]), "sorted"),
        (lambda w: w.update(sshd_host_keys=w["sshd_host_keys"][:1] * 2), "without repeats"),
        (lambda w: w.update(sshd_host_keys=w["sshd_host_keys"][1:]), "does not verify"),
        (lambda w: w.update(sshd_host_keys=sorted(w["sshd_host_keys"] + [public_key_text(
            asyncssh.generate_private_key("ssh-ed25519"))])), "does not verify"),
        (lambda w: w.update(sshd_host_keys=[w["sshd_host_keys"][0] + "\nHost *"]), "'<type> <base64>'"),
        (lambda w: w.update(sshd_host_keys=w["sshd_host_keys"][0]), "must be a list"),
        (lambda w: w.update(sshd_host_keys=[w["host_key"]] * 7), "at most 6"),
    ],
)
def test_refusals_say_why(change: Any, message: str) -> None:
    wire = copy.deepcopy(signed())
    change(wire)
    assert message in refused(wire)


def test_make_refuses_what_peers_would() -> None:
    with pytest.raises(AttestationError, match="port number"):
        asyncio.run(make_attestation(nodes()[0], port=70000, host_key=host_keys()[0], bridge=None, issued=ISSUED))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=40),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=20,
)


@FUZZ
@given(json_values)
def test_any_json_only_attestation_error(wire: Any) -> None:
    refused(wire)


@FUZZ
@given(st.sampled_from(["port", "host_key", "bridge", "sshd_host_keys", "issued", "sig", "bridge.port", "bridge.user",
                        "bridge.host_key", "sshd_host_keys.0", "sshd_host_keys.2"]),
       json_values)
def test_no_field_replacement_verifies(field: str, value: Any) -> None:
    wire = copy.deepcopy(signed())
    if "." in field:
        table, key = field.split(".")
        wire[table][int(key) if key.isdigit() else key] = value
    else:
        wire[field] = value
    if wire != signed():
        refused(wire)


@FUZZ
@given(st.integers(min_value=0), st.integers(min_value=0, max_value=255))
def test_no_changed_signature_byte_verifies(pos: int, flip: int) -> None:
    wire = copy.deepcopy(signed())
    raw = bytearray(base64.b64decode(wire["sig"]))
    raw[pos % len(raw)] ^= flip or 1
    wire["sig"] = base64.b64encode(bytes(raw)).decode()
    refused(wire)
