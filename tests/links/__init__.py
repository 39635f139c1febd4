"""Tests of the link rungs, and the helpers they share with the property and e2e tests."""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

import asyncssh

from tunnelmesh.identity import NodeIdentity, load_identity_file


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
