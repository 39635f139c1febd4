"""The SSH endpoint record's size bound: the coordinator (`ssh_offer` on /v1/register), a
node reading the peer map (`parse_endpoints`) and a starting daemon measure it the same
way (`ssh_record_size`, compact JSON), and a daemon whose record the coordinator would
refuse does not start (it would register forever and never get its peers)."""

from __future__ import annotations

import asyncio
import base64
import functools
import random
import struct
from pathlib import Path
from typing import Any

import asyncssh
import pytest
from hypothesis import given, strategies as st

from actors.daemon import StartupError, _ssh_record, _sshd_host_keys
from tests.links import public_key_text
from tests.support.membership import World
from tests.unit.test_config import load
from tunnelmesh.coordinator.bodies import MAX_SSH_OFFER, ssh_offer
from tunnelmesh.coordinator.guards import Refused
from tunnelmesh.membership import MembershipError, parse_endpoints
from tunnelmesh.membership.peermap import MAX_SSH_ATTESTATION, ssh_record_size

T0 = 1_767_225_600
MINIMAL = '[node]\nname = "alpha"\nmesh_ip = "100.100.0.1"\n'


@functools.cache
def world() -> World:
    return World.create()


def record_of_size(size: int) -> dict[str, Any]:
    """An object whose compact JSON is `size` bytes, and longer with any other separators."""
    base = {"port": 2222, "host_key": None, "bridge": None, "pad": ""}
    base["pad"] = "x" * (size - ssh_record_size(base))
    assert ssh_record_size(base) == size
    return base


def endpoints(ssh: dict[str, Any]) -> dict[str, Any]:
    return {"addresses": ["192.0.2.1:51820"], "last_seen": None, "ssh": ssh}


def test_the_node_and_the_coordinator_take_and_refuse_the_same_records() -> None:
    assert MAX_SSH_OFFER == MAX_SSH_ATTESTATION
    largest = record_of_size(MAX_SSH_ATTESTATION)
    assert ssh_offer(largest) == largest
    assert parse_endpoints(endpoints(largest)).ssh == largest  # spaces after ":" and "," are not counted
    too_large = record_of_size(MAX_SSH_ATTESTATION + 1)
    with pytest.raises(Refused, match=f"at most {MAX_SSH_OFFER} bytes"):
        ssh_offer(too_large)
    with pytest.raises(MembershipError, match=f"at most {MAX_SSH_ATTESTATION} bytes"):
        parse_endpoints(endpoints(too_large))


JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=40),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                    max_size=4), max_leaves=12)


@given(ssh=st.dictionaries(st.text(max_size=8), JSON_VALUES, max_size=6), pad=st.integers(0, 60))
def test_any_record_near_the_bound_is_taken_by_both_or_by_neither(ssh: dict[str, Any], pad: int) -> None:
    ssh["pad"] = "x" * max(0, MAX_SSH_ATTESTATION - 30 - ssh_record_size(ssh) + pad)
    try:
        ssh_offer(ssh)
        coordinator_takes = True
    except Refused:
        coordinator_takes = False
    try:
        parse_endpoints(endpoints(ssh))
        node_takes = True
    except MembershipError:
        node_takes = False
    assert coordinator_takes == node_takes == (ssh_record_size(ssh) <= MAX_SSH_ATTESTATION)


def big_rsa_key(seed: int) -> str:
    """An ssh-rsa public key with a 16384-bit modulus (the largest OpenSSH makes), made
    without generating primes: a public key's checks never factor it."""
    generator = random.Random(seed)
    modulus = generator.getrandbits(16384) | (1 << 16383) | 1

    def field(data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + data

    def mpint(value: int) -> bytes:
        return field(value.to_bytes(value.bit_length() // 8 + 1, "big"))

    blob = field(b"ssh-rsa") + mpint(65537) + mpint(modulus)
    return "ssh-rsa " + base64.b64encode(blob).decode()


def configured(tmp_path: Path, keys: list[str]) -> Any:
    paths = []
    for i, key in enumerate(keys):
        path = tmp_path / f"ssh_host_{i}_key.pub"
        path.write_text(key + " root@host\n")
        paths.append(f'"{path}"')
    return load(tmp_path, MINIMAL + f"[transports]\nsshd_host_keys = [{', '.join(paths)}]\n")


def signed(config: Any) -> dict[str, Any]:
    return asyncio.run(_ssh_record(config, world().nodes[0], port=None, host_key=None, bridge=None, issued=T0,
                                   sshd_host_keys=_sshd_host_keys(config)))


def test_a_record_over_the_coordinators_bound_stops_the_start_naming_the_key_and_its_size(tmp_path: Path) -> None:
    config = configured(tmp_path, [big_rsa_key(seed) for seed in range(4)])
    with pytest.raises(StartupError) as info:
        signed(config)
    message = str(info.value)
    assert "[transports] sshd_host_keys" in message and str(config.path) in message
    size = int(message.split("record is ")[1].split(" bytes")[0])
    assert size > MAX_SSH_ATTESTATION and f"limit of {MAX_SSH_ATTESTATION}" in message


def test_a_record_within_the_bound_is_signed_and_the_coordinator_takes_it(tmp_path: Path) -> None:
    config = configured(tmp_path, [big_rsa_key(0), public_key_text(asyncssh.generate_private_key("ssh-ed25519"))])
    record = signed(config)
    assert len(record["sshd_host_keys"]) == 2 and ssh_record_size(record) <= MAX_SSH_ATTESTATION
    assert ssh_offer(record) == record
