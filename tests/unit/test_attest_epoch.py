"""The SSH endpoint attestation's epoch (issue 13, defect 9c): a record carries the time
its node made it, signed, and whoever keeps a member's endpoint keeps the newest seen, so
an old record (an old host key) served again after a host-key change is refused."""

from __future__ import annotations

import asyncio
import base64
import functools
import logging
from typing import Any

import asyncssh
import pytest

from actors.links import PeerMapDirectory
from tests.links import public_key_text
from tests.support.membership import World, update
from tunnelmesh.links.attest import (
    MAX_FUTURE,
    AttestationError,
    NewestAttestations,
    SshEndpoint,
    make_attestation,
    verify_attestation,
)
from tunnelmesh.membership import PeerMap

T0 = 1_767_225_600


@functools.cache
def world() -> World:
    return World.create()


@functools.cache
def host_keys() -> tuple[str, str]:
    return tuple(public_key_text(asyncssh.generate_private_key("ssh-ed25519")) for _ in range(2))  # type: ignore[return-value]


class WallClock:
    """A clock whose wall time is `now[0]` (the directory reads only that)."""

    def __init__(self, now: list[float]) -> None:
        self.now = now

    def monotonic(self) -> float:
        return self.now[0]

    def wall(self) -> float:
        return self.now[0]


def record(i: int, host_key: str, issued: int) -> dict[str, Any]:
    return asyncio.run(make_attestation(world().nodes[i], port=2222, host_key=host_key, bridge=None, issued=issued))


def test_the_issue_time_is_signed_and_an_old_format_record_is_refused() -> None:
    wire = record(1, host_keys()[0], T0)
    assert verify_attestation(wire, world().nodes[1].public).issued == T0
    moved = dict(wire, issued=T0 + 3600)  # a record made to look newer does not verify
    with pytest.raises(AttestationError, match="does not verify"):
        verify_attestation(moved, world().nodes[1].public)
    old = {k: v for k, v in wire.items() if k not in ("issued", "sshd_host_keys")}  # the v1 form
    with pytest.raises(AttestationError, match="without an issue time .* upgrade that node"):
        verify_attestation(old, world().nodes[1].public)


def test_newest_attestations_refuse_older_and_future_records() -> None:
    newest = NewestAttestations()
    key, other = b"k" * 32, b"o" * 32
    first, rotated = SshEndpoint(2222, host_keys()[0], None, T0), SshEndpoint(2222, host_keys()[1], None, T0 + 60)
    assert newest.check(key, first, T0) is first
    assert newest.check(key, first, T0 + 1) is first  # the same record again: fine
    assert newest.check(key, rotated, T0 + 61) is rotated
    with pytest.raises(AttestationError, match="older than the one already seen .* a replay"):
        newest.check(key, first, T0 + 62)
    assert newest.check(other, first, T0 + 62) is first  # per member
    with pytest.raises(AttestationError, match="in the future .* fix that node's clock"):
        newest.check(key, SshEndpoint(2222, host_keys()[1], None, T0 + 62 + MAX_FUTURE + 1), T0 + 62)


def test_the_directory_refuses_a_replayed_record_after_a_host_key_change(caplog: pytest.LogCaptureFixture) -> None:
    w, now = world(), [float(T0)]
    peers = PeerMap(w.network, w.wg(0))
    directory = PeerMapDirectory(peers.snapshot, clock=WallClock(now))
    key = base64.b64encode(w.wg(1)).decode()

    def serve(wire: dict[str, Any]) -> None:
        endpoints = {key: {"addresses": ["192.0.2.1:51820"], "last_seen": None, "ssh": wire}}
        assert not peers.apply(update([w.admin_member(0), w.admin_member(1)], endpoints=endpoints)).rejected
        directory.check_all()  # as after every map change

    old, new = record(1, host_keys()[0], T0 - 3600), record(1, host_keys()[1], T0)
    serve(old)
    assert directory.endpoint(w.wg(1)) == SshEndpoint(2222, host_keys()[0], None, T0 - 3600)
    serve(new)  # the member restarted with a new host key
    now[0] += 60
    with caplog.at_level(logging.WARNING, logger="tunnelmesh.links"):
        serve(old)  # and the coordinator (or the path to it) serves the old one again
        assert directory.endpoint(w.wg(1)) is None and directory.targets(w.wg(1)) == []
    refused = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(refused) == 1 and "older than the one already seen" in refused[0], refused
    serve(new)
    assert directory.endpoint(w.wg(1)) == SshEndpoint(2222, host_keys()[1], None, T0)
