"""RSA keys ssh-keygen would not make (another public exponent), and identity lines with a
real attestation by them: what a hostile joiner could send (issue 13, defect 4)."""

from __future__ import annotations

import base64
import hashlib
import math
import struct

import asyncssh
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from tunnelmesh.identity import ATTEST_NAMESPACE, ATTEST_PREFIX


def _string(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def rsa_key_with_exponent(e: int, bits: int = 2048) -> asyncssh.SSHKey:
    """A valid RSA private key whose public exponent is `e` (ssh-keygen and cryptography
    make only 65537 or 3), from fresh primes."""
    while True:
        base = rsa.generate_private_key(65537, bits).private_numbers()
        p, q = base.p, base.q
        lam = (p - 1) * (q - 1) // math.gcd(p - 1, q - 1)
        if math.gcd(e, lam) == 1:
            break
    d = pow(e, -1, lam)
    numbers = rsa.RSAPrivateNumbers(p, q, d, rsa.rsa_crt_dmp1(d, p), rsa.rsa_crt_dmq1(d, q),
                                    rsa.rsa_crt_iqmp(p, q), rsa.RSAPublicNumbers(e, p * q))
    pem = numbers.private_key().private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                              serialization.NoEncryption())
    return asyncssh.import_private_key(pem)


def attested_line(key: asyncssh.SSHKey) -> str:
    """An identity line of `key` with a real attestation (as a node with that key makes)."""
    wg = X25519PrivateKey.generate().public_key().public_bytes_raw()
    signed = (b"SSHSIG" + _string(ATTEST_NAMESPACE.encode()) + _string(b"") + _string(b"sha512")
              + _string(hashlib.sha512(ATTEST_PREFIX + wg).digest()))
    public = " ".join(key.export_public_key().decode().split()[:2])
    attestation = key.sign(signed, b"rsa-sha2-256")
    return f"{public} wg={base64.b64encode(wg).decode()} att={base64.b64encode(attestation).decode()}"
