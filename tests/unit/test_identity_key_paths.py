"""A key file gives one mesh identity whichever library reads it.

An unencrypted OpenSSH-format Ed25519 or RSA key (what ssh-keygen and `init --new-key`
make) is read and signed with by cryptography alone, so that a start imports no asyncssh;
every other key file (encrypted, PEM) is read by asyncssh as before. Both must derive
the same X25519 key and attestation, and give an SSH login the same key.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from pathlib import Path

import pytest

import tunnelmesh.identity as identity_module
from tunnelmesh.identity import NodeIdentity, load_identity_file

PASSPHRASE = "correct horse"


def keygen(path: Path, *args: str) -> Path:
    subprocess.run(["ssh-keygen", "-q", "-N", "", "-C", "", "-f", str(path), *args], check=True, timeout=60)
    return path


def protect(source: Path, target: Path) -> Path:
    """The same key, passphrase-protected (so asyncssh reads it)."""
    shutil.copy(source, target)
    subprocess.run(["ssh-keygen", "-q", "-p", "-P", "", "-N", PASSPHRASE, "-f", str(target)], check=True, timeout=60)
    return target


def load(path: Path, passphrase_file: Path | None = None) -> NodeIdentity:
    return asyncio.run(load_identity_file(path, passphrase_file=passphrase_file))


@pytest.mark.parametrize("kind", [["-t", "ed25519"], ["-t", "rsa", "-b", "2048"]], ids=["ed25519", "rsa"])
def test_both_readers_derive_the_same_identity(tmp_path: Path, kind: list[str],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    plain = keygen(tmp_path / "key", *kind)
    protected = protect(plain, tmp_path / "key_pw")
    passphrase = tmp_path / "passphrase"
    passphrase.write_text(PASSPHRASE)

    read_by_cryptography = load(plain)
    read_by_asyncssh = load(protected, passphrase)
    assert read_by_cryptography.public == read_by_asyncssh.public
    assert read_by_cryptography.static_private == read_by_asyncssh.static_private

    # Without the fast path the plain file goes through asyncssh too: the same again.
    monkeypatch.setattr(identity_module, "_unencrypted_openssh_key", lambda data: None)
    assert load(plain).public == read_by_cryptography.public


def test_the_fast_path_takes_only_unencrypted_openssh_identity_keys(tmp_path: Path) -> None:
    ed25519 = keygen(tmp_path / "ed25519", "-t", "ed25519").read_bytes()
    assert identity_module._unencrypted_openssh_key(ed25519) is not None
    assert identity_module._unencrypted_openssh_key(keygen(tmp_path / "ecdsa", "-t", "ecdsa").read_bytes()) is None
    protected = protect(tmp_path / "ed25519", tmp_path / "ed25519_pw").read_bytes()
    assert identity_module._unencrypted_openssh_key(protected) is None
    pem = keygen(tmp_path / "rsa_pem", "-t", "rsa", "-b", "2048", "-m", "PEM").read_bytes()
    assert identity_module._unencrypted_openssh_key(pem) is None


def test_an_ssh_login_gets_the_key_of_the_identity(tmp_path: Path) -> None:
    node = load(keygen(tmp_path / "key", "-t", "ed25519"))

    async def login_keys() -> list[bytes]:
        async with node.ssh_client_keys() as keys:
            return [bytes(key.public_data) for key in keys]

    assert asyncio.run(login_keys()) == [identity_module._split_key_text(node.public.ssh_public_key,
                                                                         allow_comment=False)[1]]
