"""Tests of the link rungs, and the helpers they share with the property and e2e tests."""

from __future__ import annotations

import asyncio
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import asyncssh

from tunnelmesh.identity import NodeIdentity, load_identity_file
from tunnelmesh.links.ssh import SshTarget


def write_key(path: Path) -> Path:
    """A fresh Ed25519 private key file (0600, OpenSSH format) at `path`."""
    key = asyncssh.generate_private_key("ssh-ed25519")
    path.touch(mode=0o600)
    path.write_bytes(key.export_private_key("openssh"))
    return path


def new_identity() -> NodeIdentity:
    """A node identity from a fresh Ed25519 key (the key file is gone afterwards)."""
    with tempfile.TemporaryDirectory() as d:
        return asyncio.run(load_identity_file(write_key(Path(d) / "id")))


def public_key_text(key: asyncssh.SSHKey) -> str:
    """'<type> <base64>' of a key, without comment."""
    return " ".join(key.export_public_key("openssh").decode("ascii").split()[:2])


@dataclass
class Directory:
    """The membership as the SSH rung sees it: members by SSH key, and where each can
    be dialled (the real small thing a daemon gives, not a mock)."""

    members: dict[str, bytes] = field(default_factory=dict)
    where: dict[bytes, list[SshTarget]] = field(default_factory=dict)

    def member_by_ssh_key(self, ssh_public_key: str) -> bytes | None:
        return self.members.get(ssh_public_key)

    def is_member(self, wg_key: bytes) -> bool:
        return wg_key in self.members.values()

    def targets(self, wg_key: bytes) -> list[SshTarget]:
        return self.where.get(wg_key, [])
