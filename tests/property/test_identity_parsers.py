"""Fuzzing the identity parsers: whatever text or bytes come in, only IdentityError
comes out, and no mutation of a valid identity line or signature is accepted."""

from __future__ import annotations

import asyncio
import base64
import functools
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tunnelmesh.identity import (
    IdentityError,
    NodeIdentity,
    PublicIdentity,
    fingerprint_of,
    load_identity_file,
    verify_sshsig,
)

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
NAMESPACE = "fuzz@tunnelmesh"
MESSAGE = b"fuzz message"
B64_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/="


@dataclass(frozen=True)
class Sample:
    node: NodeIdentity
    line: str
    sshsig: bytes


@functools.cache
def samples() -> tuple[Sample, ...]:
    """One Ed25519 and one RSA identity, made once (keys from `cryptography`, so no
    ssh-keygen is needed to fuzz)."""
    private_keys = [ed25519.Ed25519PrivateKey.generate(), rsa.generate_private_key(65537, 2048)]

    async def load(path: Path) -> Sample:
        node = await load_identity_file(path)
        return Sample(node, node.public.to_line(), await node.sign(MESSAGE, NAMESPACE))

    out = []
    with tempfile.TemporaryDirectory() as d:
        for i, key in enumerate(private_keys):
            path = Path(d) / f"key{i}"
            path.write_bytes(
                key.private_bytes(
                    serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
                )
            )
            out.append(asyncio.run(load(path)))
    return tuple(out)


def parse(line: str) -> PublicIdentity | None:
    """from_line, with IdentityError (the only allowed failure) as None."""
    try:
        return PublicIdentity.from_line(line)
    except IdentityError:
        return None


def mutate_bytes(data: bytes, op: int, pos: int, value: int) -> bytes:
    pos %= len(data) + 1
    if op == 0:  # flip bits of one byte
        if not data:
            return bytes([value])
        pos %= len(data)
        return data[:pos] + bytes([data[pos] ^ (value or 1)]) + data[pos + 1 :]
    if op == 1:  # truncate
        return data[:pos]
    if op == 2:  # insert a byte
        return data[:pos] + bytes([value]) + data[pos:]
    return data[:pos] + data[pos + 1 :]  # delete a byte


@FUZZ
@given(st.text())
@example("")
@example("ssh-ed25519 AAAA wg= att=")
@example("ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAAAAQ== wg=AA== att=AA==")
def test_from_line_arbitrary_text(text: str) -> None:
    parse(text)


tokens = st.sampled_from(
    ["ssh-ed25519", "ssh-rsa", "ecdsa-sha2-nistp256", "sk-ssh-ed25519@openssh.com", "wg=", "att=", "=", " ", "\t", "\n"]
)
b64_text = st.binary(max_size=80).map(lambda b: base64.b64encode(b).decode())


@FUZZ
@given(st.lists(st.one_of(tokens, b64_text, st.text(alphabet=B64_CHARS, max_size=60)), max_size=8))
def test_from_line_structured_text(parts: list[str]) -> None:
    # Pieces that look like identity lines get further into the parser than random text.
    parse(" ".join(parts))
    parse("".join(parts))


@FUZZ
@example(which=0, pos=80, op=1, char="\t")  # whitespace inside the key field, once accepted
@given(
    which=st.integers(0, 1),
    pos=st.integers(0, 10_000),
    op=st.integers(0, 2),
    char=st.one_of(st.sampled_from(B64_CHARS + " \t"), st.characters()),
)
def test_mutated_valid_line_is_refused(which: int, pos: int, op: int, char: str) -> None:
    sample = samples()[which]
    line = sample.line
    pos %= len(line) + 1
    if op == 0:
        mutated = line[:pos] + char + line[pos + 1 :]
    elif op == 1:
        mutated = line[:pos] + char + line[pos:]
    else:
        mutated = line[:pos] + line[pos + 1 :]
    result = parse(mutated)
    # Only a mutation that changes nothing (or only outer whitespace) may still parse.
    if result is not None:
        assert mutated.strip() == line
        assert result == sample.node.public


@FUZZ
@given(
    which=st.integers(0, 1),
    field=st.integers(1, 3),
    op=st.integers(0, 3),
    pos=st.integers(0, 10_000),
    value=st.integers(0, 255),
)
def test_mutated_fields_with_valid_base64_are_refused(which: int, field: int, op: int, pos: int, value: int) -> None:
    # Re-encoding canonically gets every mutation past base64, into key decoding,
    # low-order and signature checks.
    sample = samples()[which]
    fields = sample.line.split(" ")
    prefix = ("", "", "wg=", "att=")[field]
    data = base64.b64decode(fields[field][len(prefix) :])
    mutated = mutate_bytes(data, op, pos, value)
    fields[field] = prefix + base64.b64encode(mutated).decode()
    result = parse(" ".join(fields))
    if mutated == data:
        assert result == sample.node.public
    else:
        assert result is None


@FUZZ
@given(st.integers(0, 1), st.integers(0, 1), st.integers(0, 1))
def test_fields_from_different_identities_are_refused(key_from: int, wg_from: int, att_from: int) -> None:
    lines = [s.line.split(" ") for s in samples()]
    line = " ".join(lines[key_from][:2] + [lines[wg_from][2], lines[att_from][3]])
    result = parse(line)
    assert (result is not None) == (key_from == wg_from == att_from)


@FUZZ
@given(st.text())
@example("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIA==")
def test_fingerprint_of_arbitrary_text(text: str) -> None:
    try:
        assert fingerprint_of(text).startswith("SHA256:")
    except IdentityError:
        pass


@FUZZ
@given(which=st.integers(0, 1), signature=st.binary(max_size=600), namespace=st.text(max_size=20))
def test_verify_sshsig_arbitrary_bytes(which: int, signature: bytes, namespace: str) -> None:
    pub = samples()[which].node.public.ssh_public_key
    try:
        verify_sshsig(pub, signature, MESSAGE, namespace)
    except IdentityError:
        return
    raise AssertionError("random bytes verified as a signature")


@FUZZ
@given(which=st.integers(0, 1), op=st.integers(0, 3), pos=st.integers(0, 10_000), value=st.integers(0, 255))
def test_mutated_sshsig_is_refused(which: int, op: int, pos: int, value: int) -> None:
    sample = samples()[which]
    mutated = mutate_bytes(sample.sshsig, op, pos, value)
    pub = sample.node.public.ssh_public_key
    try:
        verify_sshsig(pub, mutated, MESSAGE, NAMESPACE)
    except IdentityError:
        assert mutated != sample.sshsig
    else:
        assert mutated == sample.sshsig
