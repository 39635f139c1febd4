"""Mesh identities from SSH keys: files, a real ssh-agent, attestations, refusals.

Keys are made by ssh-keygen at test time; agents are real `ssh-agent -D` processes.
OpenSSH's own `ssh-keygen -Y sign/check-novalidate` is the oracle for the SSHSIG
envelope, so the derivation is checked against an independent implementation.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import shutil
import struct
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import asyncssh
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from tests.conftest import unavailable
from tests.support.rsa import attested_line, rsa_key_with_exponent
from tests.support.ssh_agent import Agent, keygen, openssh_fingerprint, require_openssh, running_agent
from tunnelmesh.identity import (
    ATTEST_NAMESPACE,
    ATTEST_PREFIX,
    DEFAULT_HOST_KEY,
    KEY_KDF_INFO,
    KEY_MESSAGE,
    KEY_NAMESPACE,
    PASSPHRASE_ENV,
    IdentityError,
    NodeIdentity,
    PublicIdentity,
    fingerprint_of,
    load_identity,
    load_identity_file,
    verify_sshsig,
)
from tunnelmesh.identity_agent import load_identity_agent


@pytest.fixture(scope="session", autouse=True)
def openssh_tools() -> None:
    """Checked before the session-wide keys: this module's keys come from ssh-keygen, its
    agents are real ssh-agents."""
    require_openssh()


T = TypeVar("T")
PASSPHRASE = "correct horse battery staple"


def run(coro: Awaitable[T]) -> T:
    return asyncio.run(coro)  # type: ignore[arg-type]


def fails(coro: Awaitable[Any]) -> str:
    """The IdentityError message `coro` must raise."""
    with pytest.raises(IdentityError) as info:
        run(coro)
    return str(info.value)


# --- keys -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Keys:
    dir: Path
    ed25519: Path
    ed25519_pw: Path
    rsa: Path
    rsa_pw: Path
    rsa_pem_pw: Path
    ecdsa: Path
    ecdsa_pw: Path
    ecdsa_pem: Path
    rsa_1024: Path
    ed25519_other: Path
    passphrase_file: Path


@pytest.fixture(scope="session")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    d = tmp_path_factory.mktemp("keys")
    pw_file = d / "passphrase"
    pw_file.write_text(PASSPHRASE + "\n")  # trailing newline as an editor leaves it
    return Keys(
        dir=d,
        ed25519=keygen(d / "ed25519", "-t", "ed25519"),
        ed25519_pw=keygen(d / "ed25519_pw", "-t", "ed25519", passphrase=PASSPHRASE),
        rsa=keygen(d / "rsa", "-t", "rsa", "-b", "2048"),
        rsa_pw=keygen(d / "rsa_pw", "-t", "rsa", "-b", "2048", passphrase=PASSPHRASE),
        rsa_pem_pw=keygen(d / "rsa_pem_pw", "-t", "rsa", "-b", "2048", "-m", "PEM", passphrase=PASSPHRASE),
        ecdsa=keygen(d / "ecdsa", "-t", "ecdsa"),
        ecdsa_pw=keygen(d / "ecdsa_pw", "-t", "ecdsa", passphrase=PASSPHRASE),
        ecdsa_pem=keygen(d / "ecdsa_pem", "-t", "ecdsa", "-m", "PEM"),
        rsa_1024=keygen(d / "rsa_1024", "-t", "rsa", "-b", "1024"),
        ed25519_other=keygen(d / "ed25519_other", "-t", "ed25519"),
        passphrase_file=pw_file,
    )


@pytest.fixture(scope="session")
def identities(keys: Keys) -> dict[str, NodeIdentity]:
    """Loaded once: the key files most tests use."""

    async def load() -> dict[str, NodeIdentity]:
        return {
            "ed25519": await load_identity_file(keys.ed25519),
            "rsa": await load_identity_file(keys.rsa),
            "other": await load_identity_file(keys.ed25519_other),
        }

    return run(load())


def pub_line(key: Path) -> str:
    kind, b64, *_ = Path(f"{key}.pub").read_text().split()
    return f"{kind} {b64}"


# --- a real ssh-agent -------------------------------------------------------------------


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[Agent]:
    with running_agent(str(tmp_path / "agent.sock")) as a:
        yield a


# --- an independent SSHSIG implementation: OpenSSH's ssh-keygen -Y ------------------------


def ssh_string(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def read_strings(data: bytes) -> list[bytes]:
    out, pos = [], 0
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos : pos + 4])
        out.append(data[pos + 4 : pos + 4 + n])
        pos += 4 + n
    return out


def openssh_sign(key: Path, namespace: str, message: bytes, tmp: Path) -> bytes:
    """The binary SSHSIG blob `ssh-keygen -Y sign` makes."""
    msg = tmp / "msg"
    msg.write_bytes(message)
    sig = Path(f"{msg}.sig")
    sig.unlink(missing_ok=True)
    subprocess.run(
        ["ssh-keygen", "-q", "-Y", "sign", "-f", str(key), "-n", namespace, str(msg)],
        check=True,
        capture_output=True,
        stdin=subprocess.DEVNULL,
    )
    armored = sig.read_text().splitlines()
    return base64.b64decode("".join(armored[1:-1]))


def inner_signature(sshsig: bytes) -> bytes:
    """string(alg) || string(sig) from an SSHSIG blob (after magic and version)."""
    assert sshsig[:6] == b"SSHSIG"
    _pub, _ns, _reserved, _hash, sig_blob = read_strings(sshsig[10:])
    return sig_blob


def openssh_check(pub: str, namespace: str, message: bytes, sshsig: bytes, tmp: Path) -> bool:
    b64 = base64.b64encode(sshsig).decode()
    armored = "-----BEGIN SSH SIGNATURE-----\n"
    armored += "\n".join(b64[i : i + 70] for i in range(0, len(b64), 70))
    armored += "\n-----END SSH SIGNATURE-----\n"
    sig = tmp / "check.sig"
    sig.write_text(armored)
    result = subprocess.run(
        ["ssh-keygen", "-Y", "check-novalidate", "-n", namespace, "-s", str(sig)],
        input=message,
        capture_output=True,
    )
    return result.returncode == 0


def hkdf(raw_signature: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=KEY_KDF_INFO).derive(raw_signature)


# --- loading key files ------------------------------------------------------------------


@pytest.mark.parametrize("name", ["ed25519", "ed25519_pw", "rsa", "rsa_pw", "rsa_pem_pw"])
def test_key_file_gives_a_verified_identity(keys: Keys, name: str) -> None:
    path: Path = getattr(keys, name)
    node = run(load_identity_file(path, passphrase_file=keys.passphrase_file))

    node.public.verify()
    assert node.public.ssh_public_key == pub_line(path)
    assert node.public.fingerprint == openssh_fingerprint(Path(f"{path}.pub"))
    assert len(node.static_private) == 32
    wg_public = X25519PrivateKey.from_private_bytes(node.static_private).public_key().public_bytes_raw()
    assert node.public.wg_public_key == wg_public
    assert PublicIdentity.from_line(node.public.to_line()) == node.public


def test_passphrase_protected_and_plain_copies_of_a_key_agree(keys: Keys, tmp_path: Path) -> None:
    # Encryption is storage only: the identity is the key's.
    copy = tmp_path / "copy"
    shutil.copy(keys.ed25519_pw, copy)
    copy.chmod(0o600)
    subprocess.run(
        ["ssh-keygen", "-q", "-p", "-P", PASSPHRASE, "-N", "", "-f", str(copy)], check=True, capture_output=True
    )
    protected = run(load_identity_file(keys.ed25519_pw, passphrase=PASSPHRASE))
    plain = run(load_identity_file(copy))
    assert protected.public == plain.public
    assert protected.static_private == plain.static_private


def test_derivation_matches_openssh_sshsig(keys: Keys, identities: dict[str, NodeIdentity], tmp_path: Path) -> None:
    # ssh-keygen -Y sign builds the same envelope; its Ed25519 signature, through the
    # documented HKDF, must give our static key, and its attestation ours.
    node = identities["ed25519"]
    sig_blob = inner_signature(openssh_sign(keys.ed25519, KEY_NAMESPACE, KEY_MESSAGE, tmp_path))
    alg, raw = read_strings(sig_blob)
    assert alg == b"ssh-ed25519" and len(raw) == 64
    assert hkdf(raw) == node.static_private

    attest = openssh_sign(keys.ed25519, ATTEST_NAMESPACE, ATTEST_PREFIX + node.public.wg_public_key, tmp_path)
    assert inner_signature(attest) == node.public.attestation


def test_known_answer_pins_the_derivation(tmp_path: Path) -> None:
    # A fixed Ed25519 key and its expected X25519 public key: changing any derivation
    # constant changes every mesh identity, and must fail here first.
    seed = bytes(range(32))
    pem = Ed25519PrivateKey.from_private_bytes(seed).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    path = tmp_path / "kat"
    path.write_bytes(pem)
    node = run(load_identity_file(path))
    assert node.public.ssh_public_key == (
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIAOhB7/zzhC+HXDdGOdLwJln5NYwm6UNXx3chmQSVTG4"
    )
    assert base64.b64encode(node.public.wg_public_key).decode() == "A8Gp/4JRecYKaWjrQWDDHn5KEbmM+4FEqG1t0M0bBD0="


def test_passphrase_from_environment_is_used_and_scrubbed(keys: Keys, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(PASSPHRASE_ENV, PASSPHRASE)
    node = run(load_identity_file(keys.rsa_pw, prompt=True))  # stdin is not a TTY under pytest
    assert node.public.ssh_public_key == pub_line(keys.rsa_pw)
    assert PASSPHRASE_ENV not in os.environ


def test_passphrase_file_wins_over_environment(keys: Keys, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(PASSPHRASE_ENV, "not it")
    run(load_identity_file(keys.ed25519_pw, passphrase_file=keys.passphrase_file))
    assert os.environ[PASSPHRASE_ENV] == "not it"  # last resort only: not even read


def test_protected_key_without_any_passphrase_source_is_refused(keys: Keys, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(PASSPHRASE_ENV, raising=False)
    message = fails(load_identity_file(keys.ed25519_pw, prompt=True))
    assert str(keys.ed25519_pw) in message and "passphrase" in message


@pytest.mark.parametrize("name", ["ed25519_pw", "rsa_pw", "rsa_pem_pw"])
def test_wrong_passphrase_is_refused_without_echoing_it(keys: Keys, name: str, tmp_path: Path) -> None:
    path: Path = getattr(keys, name)
    wrong = "hunter2-wrong-passphrase"
    message = fails(load_identity_file(path, passphrase=wrong))
    assert message == f"wrong passphrase for {path}"

    wrong_file = tmp_path / "wrong"
    wrong_file.write_text(wrong)
    assert fails(load_identity_file(path, passphrase_file=wrong_file)) == f"wrong passphrase for {path}"


def test_unreadable_passphrase_file_is_named(keys: Keys, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-passphrase"
    assert str(missing) in fails(load_identity_file(keys.ed25519_pw, passphrase_file=missing))


@pytest.mark.parametrize("name", ["ecdsa", "ecdsa_pw", "ecdsa_pem"])
def test_ecdsa_key_file_is_refused_with_a_way_out(keys: Keys, name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(PASSPHRASE_ENV, raising=False)
    path: Path = getattr(keys, name)
    # The encrypted one too, before any passphrase is asked for.
    message = fails(load_identity_file(path))
    assert "ECDSA" in message and "randomized" in message
    assert "Ed25519 or RSA" in message and "ssh-keygen -t ed25519" in message
    assert str(path) in message


def test_dsa_key_file_is_refused(tmp_path: Path) -> None:
    # Made by asyncssh, as OpenSSH 9.8 and later make no DSA keys (old ones are still around).
    path = tmp_path / "dsa"
    path.write_bytes(asyncssh.generate_private_key("ssh-dss").export_private_key("openssh"))
    path.chmod(0o600)
    message = fails(load_identity_file(path))
    assert "DSA" in message and "ssh-keygen -t ed25519" in message


def test_short_rsa_key_is_refused(keys: Keys) -> None:
    message = fails(load_identity_file(keys.rsa_1024))
    assert "1024 bits" in message and "2048" in message


def test_bad_files_are_named_in_the_error(keys: Keys, tmp_path: Path) -> None:
    missing = tmp_path / "missing"
    assert fails(load_identity_file(missing)) == f"cannot read SSH key {missing}: No such file or directory"

    garbage = tmp_path / "garbage"
    garbage.write_bytes(b"-----BEGIN OPENSSH PRIVATE KEY-----\nnot a key\n-----END OPENSSH PRIVATE KEY-----\n")
    assert str(garbage) in fails(load_identity_file(garbage))

    pub = Path(f"{keys.ed25519}.pub")
    message = fails(load_identity_file(pub))
    assert str(pub) in message and "public key" in message

    assert str(tmp_path) in fails(load_identity_file(tmp_path))  # a directory


def test_default_spec_is_the_host_key() -> None:
    if not os.access(DEFAULT_HOST_KEY, os.R_OK):
        unavailable(f"needs a readable {DEFAULT_HOST_KEY} (openssh-server installed, run as root)")
    node = run(load_identity(""))
    assert node.public.fingerprint == openssh_fingerprint(Path(DEFAULT_HOST_KEY + ".pub"))
    assert run(load_identity()).public == node.public


# --- attestations -----------------------------------------------------------------------


def flip(data: bytes, index: int) -> bytes:
    return data[:index] + bytes([data[index] ^ 0x01]) + data[index + 1 :]


@pytest.mark.parametrize("kind", ["ed25519", "rsa"])
def test_tampered_attestations_fail(identities: dict[str, NodeIdentity], kind: str) -> None:
    good = identities[kind].public
    other = identities["other"].public
    att = good.attestation
    forged = [
        # a flipped byte in the algorithm name, a length, the signature's first and last byte
        replace(good, attestation=flip(att, 5)),
        replace(good, attestation=flip(att, 3)),
        replace(good, attestation=flip(att, len(att) - 64)),
        replace(good, attestation=flip(att, len(att) - 1)),
        replace(good, attestation=att + b"\x00"),
        replace(good, attestation=b""),
        # someone else's X25519 key under this SSH key, and this attestation for it
        replace(good, wg_public_key=other.wg_public_key),
        # another key's attestation (valid, for its own SSH key) presented for this one
        replace(good, wg_public_key=other.wg_public_key, attestation=other.attestation),
        replace(good, attestation=other.attestation),
        replace(good, wg_public_key=flip(good.wg_public_key, 0)),
    ]
    for identity in forged:
        with pytest.raises(IdentityError):
            identity.verify()
        with pytest.raises(IdentityError):
            PublicIdentity.from_line(identity.to_line())
    good.verify()  # and the untouched one still passes


def test_rsa_attestation_with_another_hash_is_refused(keys: Keys, identities: dict[str, NodeIdentity]) -> None:
    # A valid signature by the right key, but rsa-sha2-512 (or SHA-1 ssh-rsa): refused,
    # so there is one signature per key and message, as the derivation needs.
    good = identities["rsa"].public
    key = asyncssh.read_private_key(str(keys.rsa))
    signed = (
        b"SSHSIG"
        + ssh_string(ATTEST_NAMESPACE.encode())
        + ssh_string(b"")
        + ssh_string(b"sha512")
        + ssh_string(hashlib.sha512(ATTEST_PREFIX + good.wg_public_key).digest())
    )
    assert key.sign(signed, b"rsa-sha2-256") == good.attestation  # our envelope, rebuilt
    for alg in (b"rsa-sha2-512", b"ssh-rsa"):
        other_hash = key.sign(signed, alg)
        assert key.convert_to_public().verify(signed, other_hash)  # a real, valid signature...
        with pytest.raises(IdentityError, match="refused"):  # ...that we refuse
            replace(good, attestation=other_hash).verify()


def test_low_order_x25519_key_is_refused_even_when_attested(keys: Keys, identities: dict[str, NodeIdentity], tmp_path: Path) -> None:
    pub = identities["ed25519"].public.ssh_public_key
    low_order = bytes(32)  # the all-zero point: every DH with it is zero
    att = inner_signature(openssh_sign(keys.ed25519, ATTEST_NAMESPACE, ATTEST_PREFIX + low_order, tmp_path))
    with pytest.raises(IdentityError, match="low-order"):
        PublicIdentity(pub, low_order, att).verify()

    # Control: the same OpenSSH-made attestation for an ordinary key is accepted.
    wg = X25519PrivateKey.generate().public_key().public_bytes_raw()
    att = inner_signature(openssh_sign(keys.ed25519, ATTEST_NAMESPACE, ATTEST_PREFIX + wg, tmp_path))
    PublicIdentity(pub, wg, att).verify()


def test_identity_line_format(identities: dict[str, NodeIdentity]) -> None:
    public = identities["ed25519"].public
    kind, key, wg, att = public.to_line().split(" ")
    assert f"{kind} {key}" == public.ssh_public_key
    assert wg == "wg=" + base64.b64encode(public.wg_public_key).decode()
    assert att == "att=" + base64.b64encode(public.attestation).decode()
    assert PublicIdentity.from_line(public.to_line() + "\n") == public


def noncanonical(field: str) -> str:
    """The same bytes with the unused low bits of the last base64 digit set."""
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    body = field.rstrip("=")
    last = alphabet.index(body[-1])
    assert last & 0b11 == 0  # 32 bytes: 2 unused bits
    changed = body[:-1] + alphabet[last | 0b01] + field[len(body) :]
    assert base64.b64decode(changed.split("=", 1)[1]) == base64.b64decode(field.split("=", 1)[1])
    return changed


def test_malformed_identity_lines_are_refused(identities: dict[str, NodeIdentity]) -> None:
    line = identities["ed25519"].public.to_line()
    kind, key, wg, att = line.split(" ")
    wg_unpadded = wg.rstrip("=")
    bad = [
        "",
        line + " comment",
        f"{kind} {key} {att} {wg}",  # fields swapped
        f"{kind} {key} wg:{wg[3:]} {att}",
        f"{kind} {key} {wg_unpadded} {att}",  # base64 padding missing
        f"{kind} {key} {noncanonical(wg)} {att}",  # same bytes, another encoding
        f"{kind}  {key} {wg} {att}",
        f"ssh-rsa {key} {wg} {att}",  # declared type is not the key's
        f"{kind} {key}\t{wg} {att}",
    ]
    for text in bad:
        with pytest.raises(IdentityError):
            PublicIdentity.from_line(text)


def test_refused_key_types_in_identity_lines_say_why(keys: Keys, identities: dict[str, NodeIdentity]) -> None:
    rest = identities["ed25519"].public.to_line().split(" ", 2)[2]
    sk_blob = ssh_string(b"sk-ssh-ed25519@openssh.com") + ssh_string(bytes(32)) + ssh_string(b"ssh:")
    sk = f"sk-ssh-ed25519@openssh.com {base64.b64encode(sk_blob).decode()}"
    with pytest.raises(IdentityError, match="FIDO"):
        PublicIdentity.from_line(f"{sk} {rest}")
    with pytest.raises(IdentityError, match="ECDSA"):
        PublicIdentity.from_line(f"{pub_line(keys.ecdsa)} {rest}")


def test_fingerprints_are_openssh_fingerprints(keys: Keys) -> None:
    for key in (keys.ed25519, keys.rsa, keys.ecdsa):
        pub = Path(f"{key}.pub")
        assert fingerprint_of(pub.read_text()) == openssh_fingerprint(pub)  # comment allowed
    for bad in ("", "ssh-ed25519", "ssh-ed25519 AAAA", "ssh-rsa " + pub_line(keys.ed25519).split()[1]):
        with pytest.raises(IdentityError):
            fingerprint_of(bad)


# --- SSHSIG signatures by the node ------------------------------------------------------


@pytest.mark.parametrize("kind", ["ed25519", "rsa"])
def test_node_signatures_verify_here_and_in_openssh(identities: dict[str, NodeIdentity], kind: str, tmp_path: Path) -> None:
    node = identities[kind]
    pub = node.public.ssh_public_key
    sig = run(node.sign(b"join me", "coordinator@tunnelmesh"))

    verify_sshsig(pub, sig, b"join me", "coordinator@tunnelmesh")
    assert openssh_check(pub, "coordinator@tunnelmesh", b"join me", sig, tmp_path)
    with pytest.raises(IdentityError):
        verify_sshsig(pub, sig, b"join you", "coordinator@tunnelmesh")
    with pytest.raises(IdentityError):
        verify_sshsig(pub, sig, b"join me", "git")
    with pytest.raises(IdentityError):
        verify_sshsig(identities["other"].public.ssh_public_key, sig, b"join me", "coordinator@tunnelmesh")
    with pytest.raises(IdentityError):
        verify_sshsig(pub, flip(sig, len(sig) - 1), b"join me", "coordinator@tunnelmesh")


def test_openssh_signatures_verify(keys: Keys, tmp_path: Path) -> None:
    sig = openssh_sign(keys.ed25519, "file", b"data", tmp_path)
    verify_sshsig(pub_line(keys.ed25519), sig, b"data", "file")
    # ssh-keygen signs RSA with rsa-sha2-512, which we refuse (one algorithm per key type).
    sig = openssh_sign(keys.rsa, "file", b"data", tmp_path)
    with pytest.raises(IdentityError, match="refused"):
        verify_sshsig(pub_line(keys.rsa), sig, b"data", "file")


def test_sign_refuses_the_derivation_namespaces(identities: dict[str, NodeIdentity]) -> None:
    # Otherwise a peer that gets us to sign could learn our mesh key, or get an
    # attestation for its own X25519 key under our name.
    node = identities["ed25519"]
    for namespace in (KEY_NAMESPACE, ATTEST_NAMESPACE, "tunnelmesh-key-v2@tunnelmesh", ""):
        with pytest.raises(IdentityError):
            run(node.sign(KEY_MESSAGE, namespace))


# --- secrets stay secret ----------------------------------------------------------------


def secret_forms(secret: bytes) -> list[str]:
    return [secret.hex(), secret.hex().upper(), base64.b64encode(secret).decode().rstrip("="), repr(secret)[2:-1]]


def test_repr_and_str_hide_secrets(keys: Keys, identities: dict[str, NodeIdentity], tmp_path: Path) -> None:
    node = identities["ed25519"]
    raw_challenge_sig = read_strings(
        inner_signature(openssh_sign(keys.ed25519, KEY_NAMESPACE, KEY_MESSAGE, tmp_path))
    )[1]
    key = asyncssh.read_private_key(str(keys.ed25519))
    ssh_seed = key.export_private_key("openssh")
    shown = repr(node) + str(node) + repr(node._signer) + f"{node}"
    assert node.public.fingerprint in shown  # says something useful...
    for secret in (node.static_private, raw_challenge_sig[:32], raw_challenge_sig[32:]):
        for form in secret_forms(secret):
            assert form not in shown  # ...and nothing secret
    assert ssh_seed.decode().splitlines()[2] not in shown
    assert not hasattr(node, "__dict__")  # no place for vars() to reveal anything else


def test_error_messages_carry_no_secrets(keys: Keys, identities: dict[str, NodeIdentity]) -> None:
    node = identities["rsa"]
    messages = [
        fails(load_identity_file(keys.rsa_pw, passphrase="x" + PASSPHRASE)),
        fails(load_identity_file(keys.rsa_pem_pw, passphrase="x" + PASSPHRASE)),
        fails(node.sign(b"", KEY_NAMESPACE)),
    ]
    for message in messages:
        assert PASSPHRASE not in message
        for form in secret_forms(node.static_private):
            assert form not in message


# --- ssh-agent ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["ed25519", "rsa"])
def test_agent_and_file_give_the_same_identity(agent: Agent, keys: Keys, identities: dict[str, NodeIdentity], kind: str) -> None:
    path: Path = getattr(keys, kind)
    agent.add(path)
    from_agent = run(load_identity_agent(None, agent_path=agent.sock))
    from_file = identities[kind]
    assert from_agent.public.wg_public_key == from_file.public.wg_public_key
    assert from_agent.static_private == from_file.static_private
    assert from_agent.public == from_file.public  # attestation bytes too: deterministic
    assert "ssh-agent" in repr(from_agent)

    sig = run(from_agent.sign(b"hello", "test@tunnelmesh"))
    assert sig == run(from_file.sign(b"hello", "test@tunnelmesh"))
    verify_sshsig(from_file.public.ssh_public_key, sig, b"hello", "test@tunnelmesh")


def test_agent_key_selectors(agent: Agent, keys: Keys, identities: dict[str, NodeIdentity], monkeypatch: pytest.MonkeyPatch) -> None:
    agent.add(keys.ed25519)
    agent.add(keys.rsa)
    agent.add(keys.ecdsa)  # present but never chosen
    want = identities["rsa"].public

    by_fp = run(load_identity_agent(want.fingerprint, agent_path=agent.sock))
    by_pub_file = run(load_identity_agent(f"{keys.rsa}.pub", agent_path=agent.sock))
    by_line = run(load_identity_agent(Path(f"{keys.rsa}.pub").read_text(), agent_path=agent.sock))
    assert by_fp.public == by_pub_file.public == by_line.public == want

    message = fails(load_identity_agent(None, agent_path=agent.sock))
    assert "several" in message and want.fingerprint in message
    assert identities["ed25519"].public.fingerprint in message

    message = fails(load_identity_agent(f"{keys.ecdsa}.pub", agent_path=agent.sock))
    assert "ECDSA" in message and "ssh-keygen -t ed25519" in message

    message = fails(load_identity_agent(identities["other"].public.fingerprint, agent_path=agent.sock))
    assert identities["other"].public.fingerprint in message and "not in the ssh-agent" in message

    message = fails(load_identity_agent("nonsense", agent_path=agent.sock))  # taken for a comment
    assert "comment 'nonsense' is not in the ssh-agent" in message and want.fingerprint in message

    monkeypatch.setenv("SSH_AUTH_SOCK", agent.sock)
    assert run(load_identity(f"agent:{want.fingerprint}")).public == want


def test_agent_with_only_refused_keys_says_so(agent: Agent, keys: Keys) -> None:
    agent.add(keys.ecdsa)
    message = fails(load_identity_agent(None, agent_path=agent.sock))
    assert "no Ed25519 or RSA key" in message and "ecdsa" in message and "ssh-keygen -t ed25519" in message


def test_agent_not_running(agent: Agent, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    assert "SSH_AUTH_SOCK is not set" in fails(load_identity_agent())
    assert "SSH_AUTH_SOCK is not set" in fails(load_identity("agent"))

    nowhere = str(tmp_path / "no-agent.sock")
    message = fails(load_identity_agent(agent_path=nowhere))
    assert nowhere in message and "cannot reach ssh-agent" in message

    agent.stop()  # a stale socket left by a dead agent
    monkeypatch.setenv("SSH_AUTH_SOCK", agent.sock)
    message = fails(load_identity("agent"))
    assert agent.sock in message and "cannot reach ssh-agent" in message


def test_agent_dying_after_load_is_a_clear_error(agent: Agent, keys: Keys) -> None:
    agent.add(keys.ed25519)
    node = run(load_identity_agent(agent_path=agent.sock))
    agent.stop()
    assert "cannot reach ssh-agent" in fails(node.sign(b"x", "test@tunnelmesh"))


def test_expired_agent_key(agent: Agent, keys: Keys) -> None:
    agent.add(keys.ed25519, "-t", "2")
    node = run(load_identity_agent(agent_path=agent.sock))  # usable while it lasts
    fingerprint = node.public.fingerprint

    async def wait_gone() -> None:
        deadline = time.monotonic() + 6
        while time.monotonic() < deadline:
            async with asyncssh.connect_agent(agent.sock) as client:
                if not await client.get_keys():
                    return
            await asyncio.sleep(0.1)
        raise AssertionError("ssh-agent never expired the key")

    run(wait_gone())
    message = fails(node.sign(b"x", "test@tunnelmesh"))
    assert fingerprint in message and "no longer in the ssh-agent" in message and "ssh-add -t" in message
    message = fails(load_identity_agent(fingerprint, agent_path=agent.sock))
    assert fingerprint in message and "not in the ssh-agent" in message


def test_confirm_required_agent_key_is_refused(agent: Agent, keys: Keys) -> None:
    # The fixture's agent has SSH_ASKPASS=/bin/false: it asks, gets "no", refuses. With a
    # real askpass a human would decide, which no test can do deterministically.
    agent.add(keys.ed25519, "-c")
    message = fails(load_identity_agent(agent_path=agent.sock))
    assert "refused to sign" in message and "ssh-add -c" in message
    assert run(_agent_key_count(agent.sock)) == 1  # refused, not gone


async def _agent_key_count(sock: str) -> int:
    async with asyncssh.connect_agent(sock) as client:
        return len(await client.get_keys())


# --- a misbehaving agent: a real agent behind a proxy that rewrites its traffic -----------

SSH_AGENTC_SIGN_REQUEST = 13
SSH_AGENT_SIGN_RESPONSE = 14


async def misbehaving_proxy(
    listen: str, upstream: str, rewrite_request: Callable[[bytes], bytes], rewrite_response: Callable[[bytes], bytes]
) -> asyncio.AbstractServer:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_unix_connection(upstream)
        try:
            while True:
                try:
                    (n,) = struct.unpack(">I", await reader.readexactly(4))
                    request = await reader.readexactly(n)
                except asyncio.IncompleteReadError:
                    return
                if request[0] == SSH_AGENTC_SIGN_REQUEST:
                    request = rewrite_request(request)
                up_writer.write(struct.pack(">I", len(request)) + request)
                (n,) = struct.unpack(">I", await up_reader.readexactly(4))
                response = await up_reader.readexactly(n)
                if response[0] == SSH_AGENT_SIGN_RESPONSE:
                    response = rewrite_response(response)
                writer.write(struct.pack(">I", len(response)) + response)
        finally:
            up_writer.close()
            writer.close()

    return await asyncio.start_unix_server(handle, path=listen)


def through_proxy(
    agent: Agent, tmp_path: Path, coro: Callable[[str], Awaitable[T]], *,
    request: Callable[[bytes], bytes] = lambda r: r, response: Callable[[bytes], bytes] = lambda r: r,
) -> T:
    async def go() -> T:
        listen = str(tmp_path / "proxy.sock")
        server = await misbehaving_proxy(listen, agent.sock, request, response)
        try:
            return await coro(listen)
        finally:
            server.close()
            await server.wait_closed()

    return run(go())


def test_agent_answering_rsa_with_another_algorithm_is_refused(agent: Agent, keys: Keys, tmp_path: Path) -> None:
    agent.add(keys.rsa)

    def ask_for_sha512(request: bytes) -> bytes:
        assert request[-4:] == struct.pack(">I", 2)  # we asked for rsa-sha2-256...
        return request[:-4] + struct.pack(">I", 4)  # ...the proxy asks for rsa-sha2-512

    with pytest.raises(IdentityError, match="rsa-sha2-512.*refused"):
        through_proxy(agent, tmp_path, lambda sock: load_identity_agent(agent_path=sock), request=ask_for_sha512)
    # Control: the same proxy passing requests unchanged works.
    node = through_proxy(agent, tmp_path, lambda sock: load_identity_agent(agent_path=sock))
    assert node.public.ssh_public_key == pub_line(keys.rsa)


def test_agent_with_changing_signatures_is_refused(agent: Agent, keys: Keys, tmp_path: Path) -> None:
    agent.add(keys.ed25519)
    count = 0

    def corrupt_every_other(response: bytes) -> bytes:
        nonlocal count
        count += 1
        return flip(response, len(response) - 1) if count % 2 == 0 else response

    with pytest.raises(IdentityError, match="different signature each time"):
        through_proxy(agent, tmp_path, lambda sock: load_identity_agent(agent_path=sock), response=corrupt_every_other)


def test_agent_signing_with_another_key_is_caught(agent: Agent, keys: Keys, identities: dict[str, NodeIdentity], tmp_path: Path) -> None:
    # The proxy makes the agent sign with another of its keys: the attestation cannot
    # verify against the key we asked for, and loading says so instead of handing peers
    # an identity they would reject.
    agent.add(keys.ed25519)
    agent.add(keys.ed25519_other)
    asked = base64.b64decode(identities["ed25519"].public.ssh_public_key.split()[1])
    other = base64.b64decode(identities["other"].public.ssh_public_key.split()[1])

    def swap_key(request: bytes) -> bytes:
        assert request[1:].startswith(ssh_string(asked))
        return request[:1] + ssh_string(other) + request[1 + len(ssh_string(asked)) :]

    fingerprint = identities["ed25519"].public.fingerprint
    with pytest.raises(IdentityError, match="attestation"):
        through_proxy(agent, tmp_path, lambda sock: load_identity_agent(fingerprint, agent_path=sock), request=swap_key)


# --- RSA public exponent and modulus size (issue 13, defect 4) -----------------------------
#
# Checking an RSA signature costs about bits(e) modular squarings of the modulus: e = 65537
# (what ssh-keygen makes) costs 17; a hostile key with e = 2**31 - 1 or a huge modulus made
# every coordinator, relay and peer that checked it work up to ~40 times harder.


@pytest.fixture
def expensive_work(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Counts of the costly steps: decoding a public key and checking a signature with it."""
    import tunnelmesh.identity as identity_module

    calls = {"decode": 0, "verify": 0}
    decode, check = identity_module._decode_public, identity_module._check_signature

    def counting_decode(*args: Any) -> Any:
        calls["decode"] += 1
        return decode(*args)

    def counting_check(*args: Any) -> Any:
        calls["verify"] += 1
        return check(*args)

    monkeypatch.setattr(identity_module, "_decode_public", counting_decode)
    monkeypatch.setattr(identity_module, "_check_signature", counting_check)
    return calls


@pytest.mark.parametrize("e", [3, 2**31 - 1])
def test_rsa_identity_with_another_exponent_is_refused_before_any_signature_check(
        e: int, expensive_work: dict[str, int]) -> None:
    line = attested_line(rsa_key_with_exponent(e))
    with pytest.raises(IdentityError) as info:
        PublicIdentity.from_line(line)
    message = str(info.value)
    assert f"public exponent {e} refused" in message and "65537" in message and "ssh-keygen -t ed25519" in message
    assert expensive_work == {"decode": 0, "verify": 0}
    with pytest.raises(IdentityError, match="public exponent"):
        verify_sshsig(line.split(" wg=")[0], b"anything", b"data", "file")
    assert expensive_work == {"decode": 0, "verify": 0}


def test_rsa_identity_made_the_same_way_with_exponent_65537_is_accepted(expensive_work: dict[str, int]) -> None:
    # The control: the helpers above make lines that pass when only the exponent is right.
    PublicIdentity.from_line(attested_line(rsa_key_with_exponent(65537)))
    assert expensive_work == {"decode": 1, "verify": 1}


def test_rsa_exponent_is_shown_by_its_size_when_it_is_huge() -> None:
    huge = (1 << 2040) + 1
    blob = ssh_string(b"ssh-rsa") + ssh_string(huge.to_bytes(256, "big")) + ssh_string(b"\x00" + b"\xc5" * 256)
    with pytest.raises(IdentityError, match=r"public exponent of 2048 bits refused"):
        verify_sshsig(f"ssh-rsa {base64.b64encode(blob).decode()}", b"x", b"data", "file")
    # A non-canonical spelling of 65537 (a leading zero byte) is refused as well: one
    # encoding per key, so one fingerprint per key.
    blob = ssh_string(b"ssh-rsa") + ssh_string(b"\x00\x01\x00\x01") + ssh_string(b"\x00" + b"\xc5" * 256)
    with pytest.raises(IdentityError, match=r"public exponent 65537 refused"):
        verify_sshsig(f"ssh-rsa {base64.b64encode(blob).decode()}", b"x", b"data", "file")


def test_rsa_modulus_over_8192_bits_is_refused_before_it_is_decoded(expensive_work: dict[str, int]) -> None:
    n = (1 << 8192) | 1  # 8193 bits: never decoded, so it need not be a real modulus
    blob = ssh_string(b"ssh-rsa") + ssh_string(b"\x01\x00\x01") + ssh_string(b"\x00" + n.to_bytes(1025, "big"))
    wg = base64.b64encode(bytes(range(32))).decode()
    line = f"ssh-rsa {base64.b64encode(blob).decode()} wg={wg} att=AAAA"
    with pytest.raises(IdentityError, match=r"RSA key of 8193 bits refused: RSA keys need 2048 to 8192 bits"):
        PublicIdentity.from_line(line)
    assert expensive_work == {"decode": 0, "verify": 0}


def test_rsa_key_file_with_another_exponent_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "rsa_e3"
    path.write_bytes(rsa_key_with_exponent(3).export_private_key())
    path.chmod(0o600)
    message = fails(load_identity_file(path))
    assert str(path) in message and "public exponent 3 refused" in message


def test_rsa_agent_key_with_another_exponent_is_refused(agent: Agent, tmp_path: Path) -> None:
    path = tmp_path / "rsa_e3"
    path.write_bytes(rsa_key_with_exponent(3).export_private_key())
    path.chmod(0o600)
    try:
        agent.add(path)
    except subprocess.CalledProcessError:
        pytest.fail("ssh-add refused an RSA key with e = 3: this test needs another way to put one in an agent")
    message = fails(load_identity_agent(None, agent_path=agent.sock))
    assert "holds no Ed25519 or RSA key usable" in message and "public exponent 3 refused" in message
