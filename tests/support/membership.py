"""A small signed network for membership tests: an admin key, its network record, node
identities (real Ed25519 SSH keys loaded through tunnelmesh.identity) and helpers that
sign the records an admin, an invite holder or a coordinator would produce.

Nothing here reads a clock: every time is an explicit integer around `NOW`.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncssh

from tunnelmesh.identity import (
    ATTEST_NAMESPACE,
    ATTEST_PREFIX,
    NodeIdentity,
    PublicIdentity,
    _sshsig_signed_data,
    load_identity,
)
from tunnelmesh.membership import (
    AdminKey,
    MemberEntry,
    NetworkInfo,
    Revocation,
    SecretRecord,
    Token,
    make_invite,
    member_body,
    sign_member_as_admin,
    sign_member_with_invite,
)

NOW = 1_700_000_000
CIDR = "100.64.0.0/24"
URL = "https://coordinator.example:7400"
SECRET = bytes(range(32))
JSON = dict[str, Any]


def load_ed25519_identity(directory: Path) -> NodeIdentity:
    """A fresh Ed25519 SSH key written 0600 and loaded as a mesh identity."""
    key = asyncssh.generate_private_key("ssh-ed25519")
    fd, name = tempfile.mkstemp(dir=directory)
    with os.fdopen(fd, "wb") as f:
        f.write(key.export_private_key())
    os.chmod(name, 0o600)
    return asyncio.run(load_identity(name))


@functools.cache
def identities(count: int = 6) -> tuple[NodeIdentity, ...]:
    """`count` node identities, made once per test process."""
    with tempfile.TemporaryDirectory() as directory:
        return tuple(load_ed25519_identity(Path(directory)) for _ in range(count))


def reattested(identity: NodeIdentity, wg_public: bytes) -> PublicIdentity:
    """Another X25519 key attested by the same SSH key: what a member could make up to
    come back after a revocation of its X25519 key alone."""
    signed = _sshsig_signed_data(ATTEST_NAMESPACE, ATTEST_PREFIX + wg_public)
    attestation = asyncio.run(identity._signer.sign(signed))
    public = PublicIdentity(identity.public.ssh_public_key, wg_public, attestation)
    public.verify()
    return public


def resign(wire: JSON, admin: AdminKey, kind: str) -> JSON:
    """`wire` with its body (re-)signed by `admin` as a `kind` record."""
    signed = copy.deepcopy(wire)
    signed["sig"] = admin.sign(kind, signed["body"])
    return signed


@dataclass(frozen=True)
class World:
    """One network: node i is called f"node{i}" and is host number i + 1."""

    admin: AdminKey
    network: NetworkInfo
    nodes: tuple[NodeIdentity, ...]

    @classmethod
    def create(cls, cidr: str = CIDR) -> World:
        admin = AdminKey.generate()
        return cls(admin, NetworkInfo.create(admin, cidr, NOW - 10_000), identities())

    def wg(self, i: int) -> bytes:
        return self.nodes[i].public.wg_public_key

    def body(self, i: int, *, name: str | None = None, host: int | None = None, joined: int = NOW) -> JSON:
        ipv4, ipv6 = self.network.host(i + 1 if host is None else host)
        return member_body(self.network.network, name or f"node{i}", self.nodes[i].public, ipv4, ipv6, joined)

    def admin_member(self, i: int, **body: Any) -> JSON:
        return sign_member_as_admin(self.body(i, **body), self.admin)

    def invite(self, *, name: str | None = None, created: int = NOW - 100, expires: int = NOW + 3600,
               uses: int = 1) -> Token:
        return make_invite(self.admin, URL, name=name, expires=expires, uses=uses, now=created)

    def invited_member(self, i: int, token: Token | None = None, **body: Any) -> JSON:
        return sign_member_with_invite(self.body(i, **body), token or self.invite())

    def entry(self, i: int, **body: Any) -> MemberEntry:
        return MemberEntry.from_wire(self.admin_member(i, **body), self.network)

    def revocation(self, i: int, at: int = NOW + 1000) -> Revocation:
        return Revocation.create(self.admin, self.entry(i), at)

    def secret(self, members: Iterable[int], epoch: int = 1, secret: bytes = SECRET, at: int = NOW) -> SecretRecord:
        return SecretRecord.create(self.admin, epoch, secret, [self.entry(i) for i in members], at)


def update(members: Iterable[JSON] = (), revocations: Iterable[JSON] = (), *, secret: JSON | None = None,
           endpoints: JSON | None = None, full: bool = True, version: int = 1) -> JSON:
    """A peer map update as the coordinator sends it."""
    return {"version": version, "full": full, "members": list(members), "revocations": list(revocations),
            "secret": secret, "endpoints": endpoints or {}}
