"""A node's mesh identity, derived from an SSH key.

Theory of operation
===================

A node is known by an SSH public key (Ed25519 or RSA). Its WireGuard (X25519) static
key is *derived* from that SSH key, with one derivation for every key type and every
source, so a key gives the same mesh identity whether it is read from a file or used
through ssh-agent (which never hands out private keys, only signatures):

1. The SSH key signs a fixed challenge, wrapped in the SSHSIG envelope of OpenSSH's
   PROTOCOL.sshsig under a namespace of our own, so the signature can never be one
   that an SSH login or ``git``/``ssh-keygen -Y`` signing would ask for::

       signed = b"SSHSIG" || string(namespace) || string(b"")      # reserved
                          || string(b"sha512") || string(SHA-512(message))

   ``string(x)`` is SSH's uint32 big-endian length followed by ``x``.
   namespace = ``KEY_NAMESPACE`` = "tunnelmesh-key-v1@tunnelmesh",
   message   = ``KEY_MESSAGE``  = b"tunnelmesh: derive the X25519 static key of this
   SSH key, version 1".
2. ``static_private = HKDF-SHA256(ikm=raw signature, salt=absent (RFC 5869: 32 zero
   bytes), info=KEY_KDF_INFO=b"tunnelmesh x25519 v1", length=32)``. The raw signature
   is the signature without its algorithm name: the 64-byte Ed25519 signature, or the
   RSA PKCS#1 v1.5 signature made with ``rsa-sha2-256`` (never another algorithm).
   The 32 bytes are stored as they are; X25519 clamping is the X25519 library's job.
3. The X25519 public key travels with an *attestation*: the SSH signature blob
   (``string(alg) || string(sig)``) over the SSHSIG envelope with namespace
   ``ATTEST_NAMESPACE`` = "tunnelmesh-attest-v1@tunnelmesh" and message
   ``ATTEST_PREFIX + wg_public_key`` = b"tunnelmesh attest v1\\x00" + 32 bytes.
   Peers check it against the SSH public key (``PublicIdentity.verify``) before
   trusting the X25519 key.

Why it works: Ed25519 and RSA PKCS#1 v1.5 signatures are deterministic, so the same key
always gives the same signature, from a file or from the agent. ECDSA and DSA signatures
are randomized, FIDO ``sk-*`` signatures carry a counter and touch flags: all refused,
with a message that says how to make a key that works. Every derivation signs the
challenge twice and refuses a signer whose two answers differ.

Rules
=====

- The signature over the key challenge *is* the mesh private key. It, the derived key,
  private SSH keys and passphrases never appear in a log, an exception message or a
  repr. Errors from asyncssh are replaced by our own fixed wording (``from None``), since
  their text is not ours to vet.
- ``NodeIdentity.sign`` refuses our reserved namespaces (``tunnelmesh-key-*`` and
  ``tunnelmesh-attest-*``): otherwise whoever can ask this node to sign (a coordinator,
  a relay challenge) could obtain its mesh private key or an attestation for an X25519
  key of their choosing.
- RSA signatures are made and accepted only as ``rsa-sha2-256`` (the agent is asked with
  flag ``SSH_AGENT_RSA_SHA2_256`` and its answer checked). RSA moduli must have 2048 to
  8192 bits and the public exponent must be 65537 (what ssh-keygen makes): checking a
  signature costs about e's bit length times the modulus size squared, so a key with a
  huge exponent or modulus (16384 bits: 23x, e = 2**2040 + 1: 37x the cost of RSA-2048)
  would make every coordinator, relay and peer that checks it do that work. Every RSA
  public key is bounded in ``_check_key_type``, before it is decoded or used.
- Anyone who can use the ssh-agent socket -- including any host reached with agent
  forwarding while the agent holds the key -- can derive the mesh key of every agent key.
  Prefer the host key or a dedicated key file for a daemon; forward agents only to
  trusted hosts.
- ``ssh-keygen -Y sign -n tunnelmesh-key-v1@tunnelmesh`` run on the challenge would
  print the mesh private key's seed: do not sign arbitrary files in our namespaces.
- Python cannot wipe ``bytes``; secrets live as long as the objects holding them.

Identity line (``PublicIdentity.to_line``), standard base64 with padding::

    <ssh-type> <ssh-key-b64> wg=<x25519-public-b64> att=<attestation-b64>
"""

from __future__ import annotations

import base64
import binascii
import getpass
import hashlib
import hmac
import os
import re
import struct
import sys
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, Union

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.padding import PKCS1v15
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey, RSAPublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

# asyncssh (~0.15 s of imports) only where it is needed: key files cryptography does not
# read (encrypted, PEM), key types other than ours, SSH logins. Checking identities and
# loading an unencrypted OpenSSH key file, what every start does, need only cryptography.
if TYPE_CHECKING:
    import asyncssh

#: An identity key (Ed25519 or RSA), public or private, as cryptography holds it.
PublicKey = Union[Ed25519PublicKey, RSAPublicKey]
PrivateKey = Union[Ed25519PrivateKey, RSAPrivateKey]

__all__ = [
    "ATTEST_NAMESPACE",
    "ATTEST_PREFIX",
    "DEFAULT_HOST_KEY",
    "IdentityError",
    "KEY_KDF_INFO",
    "KEY_MESSAGE",
    "KEY_NAMESPACE",
    "NodeIdentity",
    "PASSPHRASE_ENV",
    "PublicIdentity",
    "fingerprint_of",
    "load_identity",
    "load_identity_file",
    "verify_sshsig",
]

# --- Constants of the derivation (changing any of them changes every mesh key) -------

KEY_NAMESPACE = "tunnelmesh-key-v1@tunnelmesh"
KEY_MESSAGE = b"tunnelmesh: derive the X25519 static key of this SSH key, version 1"
KEY_KDF_INFO = b"tunnelmesh x25519 v1"
ATTEST_NAMESPACE = "tunnelmesh-attest-v1@tunnelmesh"
ATTEST_PREFIX = b"tunnelmesh attest v1\x00"

# --- PROTOCOL.sshsig ------------------------------------------------------------------

SSHSIG_MAGIC = b"SSHSIG"
SSHSIG_VERSION = 1
SSHSIG_HASH = b"sha512"  # the only message hash we make or accept

# Namespaces NodeIdentity.sign refuses: signing in them would give away the mesh key
# (key-*) or vouch for someone else's X25519 key (attest-*), in this or a later version.
_RESERVED_NAMESPACE_PREFIXES = ("tunnelmesh-key-", "tunnelmesh-attest-")

# --- Policy -------------------------------------------------------------------------

DEFAULT_HOST_KEY = "/etc/ssh/ssh_host_ed25519_key"
PASSPHRASE_ENV = "TUNNELMESH_KEY_PASSPHRASE"
RSA_MIN_BITS = 2048
RSA_MAX_BITS = 8192  # bounds the cost of checking a hostile key (OpenSSH allows 16384)
#: The only RSA public exponent accepted, as the SSH wire format's mpint (canonical: no
#: leading zero byte), which is what ssh-keygen and OpenSSL make.
RSA_EXPONENT = 65537
_RSA_EXPONENT_MPINT = b"\x01\x00\x01"

_ED25519 = "ssh-ed25519"
_RSA = "ssh-rsa"
# Key type -> the one signature algorithm we make and accept for it.
_SIG_ALG = {_ED25519: b"ssh-ed25519", _RSA: b"rsa-sha2-256"}
_SSH_AGENT_RSA_SHA2_256 = 2  # agent sign-request flag (draft-miller-ssh-agent)

_LINE = re.compile(r"(\S+) (\S+) wg=(\S+) att=(\S+)")

_HOW_TO_MAKE_ONE = (
    "TunnelMesh needs an Ed25519 or RSA SSH key (their signatures are deterministic); "
    "make one with: ssh-keygen -t ed25519 -f ~/.ssh/tunnelmesh_ed25519"
)


class IdentityError(Exception):
    """Message is safe to show to a user (no key material)."""


# --- SSH wire format --------------------------------------------------------------------


def _string(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


class _Reader:
    """Strict reader of SSH wire strings; any malformation is an IdentityError."""

    __slots__ = ("_data", "_pos", "_what")

    def __init__(self, data: bytes, what: str) -> None:
        self._data = data
        self._pos = 0
        self._what = what

    def raw(self, n: int) -> bytes:
        if n > len(self._data) - self._pos:
            raise IdentityError(f"malformed {self._what}: truncated")
        out = self._data[self._pos : self._pos + n]
        self._pos += n
        return out

    def uint32(self) -> int:
        return int(struct.unpack(">I", self.raw(4))[0])

    def string(self) -> bytes:
        return self.raw(self.uint32())

    def end(self) -> None:
        if self._pos != len(self._data):
            raise IdentityError(f"malformed {self._what}: trailing bytes")


def _sshsig_signed_data(namespace: str, message: bytes) -> bytes:
    """The bytes an SSH key actually signs for an SSHSIG signature (PROTOCOL.sshsig)."""
    return (
        SSHSIG_MAGIC
        + _string(namespace.encode("utf-8"))
        + _string(b"")
        + _string(SSHSIG_HASH)
        + _string(hashlib.sha512(message).digest())
    )


def _b64decode(text: str, what: str) -> bytes:
    """Strict, canonical base64: one encoding per value, so lines cannot be malleated."""
    try:
        raw = binascii.a2b_base64(text.encode("ascii"), strict_mode=True)
    except (binascii.Error, UnicodeError, ValueError):
        raise IdentityError(f"malformed {what}: not base64") from None
    if base64.b64encode(raw).decode("ascii") != text:
        raise IdentityError(f"malformed {what}: not canonical base64")
    return raw


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _fingerprint_blob(blob: bytes) -> str:
    # As OpenSSH prints it: SHA256: + unpadded standard base64 of SHA-256(key blob).
    return "SHA256:" + _b64(hashlib.sha256(blob).digest()).rstrip("=")


# --- Public keys ------------------------------------------------------------------------


def _refusal_reason(key_type: str) -> str:
    """Why a key type cannot be an identity."""
    if key_type.endswith("-cert-v01@openssh.com"):
        why = "SSH certificates are not identities; use the plain key they certify"
    elif key_type.startswith("sk-"):
        why = (
            f"FIDO security-key ({key_type}) signatures include a counter and touch "
            "flags, so they differ every time (and each needs a touch) and give no stable mesh key"
        )
    elif key_type.startswith("ecdsa-"):
        why = f"ECDSA ({key_type}) signatures are randomized, so they differ every time and give no stable mesh key"
    elif key_type == "ssh-dss":
        why = "DSA (ssh-dss) signatures are randomized, so they differ every time and give no stable mesh key"
    else:
        why = f"key type {key_type!r} is not supported"
    return why


def _refusal(key_type: str) -> str:
    """Why a key type cannot be an identity, and what to do instead."""
    return f"{_refusal_reason(key_type)}. {_HOW_TO_MAKE_ONE}"


def _split_key_text(text: str, *, allow_comment: bool) -> tuple[str, bytes]:
    """'<type> <base64> [comment]' -> (type, blob), with the blob's own type checked."""
    fields = text.split()
    if len(fields) < 2 or (len(fields) > 2 and not allow_comment):
        raise IdentityError("malformed SSH public key: expected '<type> <base64>'")
    key_type = fields[0]
    blob = _b64decode(fields[1], "SSH public key")
    reader = _Reader(blob, "SSH public key")
    if reader.string() != key_type.encode("ascii", errors="replace"):
        raise IdentityError("malformed SSH public key: type does not match the key")
    return key_type, blob


def _rsa_public_parts(blob: bytes) -> tuple[bytes, int]:
    """(e as its wire mpint, bit length of n) of an ssh-rsa key blob; nothing is decoded
    into a key, so a hostile blob costs only its length to look at."""
    reader = _Reader(blob, "RSA public key")
    reader.string()  # "ssh-rsa"
    e = reader.string()
    n = reader.string()
    reader.end()
    return e, int.from_bytes(n, "big").bit_length()


def _shown_exponent(e: bytes) -> str:
    """An exponent for an error message: its value when short, else only its size."""
    if len(e) <= 8:
        return str(int.from_bytes(e, "big"))
    return f"of {len(e) * 8} bits"


def _key_problem(key_type: str, blob: bytes) -> str | None:
    """Why this key cannot be a mesh identity (None: it can). IdentityError for a
    malformed RSA blob."""
    if key_type not in _SIG_ALG:
        return _refusal_reason(key_type)
    if key_type == _RSA:
        e, bits = _rsa_public_parts(blob)
        if e != _RSA_EXPONENT_MPINT:
            return (
                f"RSA key with public exponent {_shown_exponent(e)} refused: only e = {RSA_EXPONENT} "
                f"is accepted (what ssh-keygen makes; other exponents make checking its signatures "
                f"costly)"
            )
        if not RSA_MIN_BITS <= bits <= RSA_MAX_BITS:
            return f"RSA key of {bits} bits refused: RSA keys need {RSA_MIN_BITS} to {RSA_MAX_BITS} bits"
    return None


def _check_key_type(key_type: str, blob: bytes) -> None:
    """Raise the user-facing refusal unless this key can be a mesh identity. Every RSA
    public key that enters (identity lines, key files, agent keys) passes here before it
    is decoded or any signature is checked with it."""
    problem = _key_problem(key_type, blob)
    if problem is not None:
        raise IdentityError(f"{problem}. {_HOW_TO_MAKE_ONE}")


def _decode_public(key_type: str, blob: bytes) -> object:
    """The key of a blob whose type `_split_key_text` checked: an identity key by
    cryptography, any other type (a fingerprint's) by asyncssh."""
    try:
        if key_type in _SIG_ALG:
            key = serialization.load_ssh_public_key(f"{key_type} {_b64(blob)}".encode("ascii"))
            if not isinstance(key, (Ed25519PublicKey, RSAPublicKey)):
                raise ValueError("not the key type the blob names")
            return key
        import asyncssh

        return asyncssh.import_public_key(f"{key_type} {_b64(blob)}")
    except Exception:  # asyncssh/cryptography raise many types for hostile input
        raise IdentityError("malformed SSH public key: not a valid key") from None


def _parse_identity_key(text: str) -> tuple[str, bytes, PublicKey]:
    """A usable identity public key ('<type> <base64>'), fully checked."""
    key_type, blob = _split_key_text(text, allow_comment=False)
    _check_key_type(key_type, blob)
    key = _decode_public(key_type, blob)
    assert isinstance(key, (Ed25519PublicKey, RSAPublicKey))  # _check_key_type let only ours through
    return key_type, blob, key


def _raw_signature(sig_blob: bytes, key_type: str) -> bytes:
    """The signature bytes inside an SSH signature blob, if its algorithm is ours."""
    reader = _Reader(sig_blob, "SSH signature")
    alg = reader.string()
    raw = reader.string()
    reader.end()
    if alg != _SIG_ALG[key_type]:
        raise IdentityError(
            f"signature algorithm {alg.decode('ascii', errors='replace')!r} refused: "
            f"{key_type} keys must sign with {_SIG_ALG[key_type].decode()}"
        )
    return raw


def _check_signature(key_type: str, key: PublicKey, signed: bytes, sig_blob: bytes) -> None:
    raw = _raw_signature(sig_blob, key_type)  # structure and algorithm first
    try:
        if isinstance(key, Ed25519PublicKey):
            key.verify(raw, signed)
        else:  # rsa-sha2-256, the one RSA algorithm _raw_signature lets through
            key.verify(raw, signed, PKCS1v15(), hashes.SHA256())
    except Exception:  # a hostile signature must only ever mean "invalid"
        raise IdentityError("signature does not verify") from None


def fingerprint_of(ssh_public_key: str) -> str:
    """OpenSSH's fingerprint ("SHA256:...") of '<type> <base64> [comment]'."""
    if not isinstance(ssh_public_key, str):
        raise IdentityError("malformed SSH public key: not text")
    key_type, blob = _split_key_text(ssh_public_key, allow_comment=True)
    _decode_public(key_type, blob)  # a fingerprint of garbage would look trustworthy
    return _fingerprint_blob(blob)


def verify_sshsig(ssh_public_key: str, signature: bytes, message: bytes, namespace: str) -> None:
    """Check an SSHSIG signature (binary blob, PROTOCOL.sshsig) of `message` by the key.

    Raises IdentityError unless the blob names this key and this namespace, uses SHA-512
    and the key type's one signature algorithm, and the signature is valid. Compatible
    with ``ssh-keygen -Y sign`` for Ed25519 keys (ssh-keygen signs RSA with SHA-512,
    which we refuse).
    """
    key_type, blob, key = _parse_identity_key(ssh_public_key)
    if not isinstance(signature, (bytes, bytearray)):
        raise IdentityError("malformed SSHSIG signature: not bytes")
    reader = _Reader(bytes(signature), "SSHSIG signature")
    if reader.raw(len(SSHSIG_MAGIC)) != SSHSIG_MAGIC or reader.uint32() != SSHSIG_VERSION:
        raise IdentityError("malformed SSHSIG signature: bad magic or version")
    signer_blob = reader.string()
    sig_namespace = reader.string()
    reserved = reader.string()
    hash_alg = reader.string()
    sig_blob = reader.string()
    reader.end()
    if not hmac.compare_digest(signer_blob, blob):
        raise IdentityError("SSHSIG signature is by another key")
    if sig_namespace != namespace.encode("utf-8"):
        raise IdentityError("SSHSIG signature is for another namespace")
    if reserved != b"" or hash_alg != SSHSIG_HASH:
        raise IdentityError("SSHSIG signature uses an unsupported hash or reserved field")
    _check_signature(key_type, key, _sshsig_signed_data(namespace, message), sig_blob)


@dataclass(frozen=True, slots=True)
class PublicIdentity:
    """What a node tells others: its SSH key, derived X25519 key, and the attestation."""

    ssh_public_key: str  # "ssh-ed25519 AAAA..." (type + base64, no comment)
    wg_public_key: bytes  # 32-byte X25519 public key
    attestation: bytes  # SSH signature blob over the attestation message

    def __post_init__(self) -> None:
        if not isinstance(self.ssh_public_key, str):
            raise IdentityError("malformed identity: SSH public key is not text")
        if not isinstance(self.wg_public_key, bytes) or len(self.wg_public_key) != 32:
            raise IdentityError("malformed identity: X25519 public key is not 32 bytes")
        if not isinstance(self.attestation, bytes):
            raise IdentityError("malformed identity: attestation is not bytes")

    @property
    def fingerprint(self) -> str:
        return fingerprint_of(self.ssh_public_key)

    def verify(self) -> None:
        """Raise IdentityError unless the SSH key attests this X25519 key."""
        key_type, _, key = _parse_identity_key(self.ssh_public_key)
        try:
            # Low-order points make every Diffie-Hellman with this peer all-zero.
            X25519PrivateKey.from_private_bytes(bytes(32)).exchange(
                X25519PublicKey.from_public_bytes(self.wg_public_key)
            )
        except ValueError:
            raise IdentityError("X25519 public key refused: low-order point") from None
        signed = _sshsig_signed_data(ATTEST_NAMESPACE, ATTEST_PREFIX + self.wg_public_key)
        try:
            _check_signature(key_type, key, signed, self.attestation)
        except IdentityError as exc:
            raise IdentityError(f"attestation of {self.fingerprint} is invalid: {exc}") from None

    def to_line(self) -> str:
        return (
            f"{self.ssh_public_key} wg={_b64(self.wg_public_key)} att={_b64(self.attestation)}"
        )

    @classmethod
    def from_line(cls, line: str) -> PublicIdentity:
        """Parse AND verify an identity line; IdentityError for anything malformed."""
        if not isinstance(line, str):
            raise IdentityError("malformed identity line: not text")
        # Exactly one space between fields and no other whitespace: one spelling per line.
        match = _LINE.fullmatch(line.strip())
        if match is None:
            raise IdentityError(
                "malformed identity line: expected '<ssh-type> <ssh-b64> wg=<b64> att=<b64>'"
            )
        key_type, key_b64, wg_b64, att_b64 = match.groups()
        ssh_public_key = f"{key_type} {key_b64}"
        _split_key_text(ssh_public_key, allow_comment=False)  # shape before anything else
        wg = _b64decode(wg_b64, "X25519 public key")
        att = _b64decode(att_b64, "attestation")
        identity = cls(ssh_public_key, wg, att)
        identity.verify()
        return identity


# --- Private side: signers --------------------------------------------------------------


class _Signer(Protocol):
    key_type: str
    blob: bytes
    source: str

    async def sign(self, data: bytes) -> bytes:
        """SSH signature blob (string(alg) || string(sig)) over `data`, alg checked."""
        ...

    def client_keys(self) -> AbstractAsyncContextManager[list[asyncssh.SSHKey | asyncssh.SSHKeyPair]]:
        """This key alone, for `asyncssh.connect(client_keys=...)`, while the block lasts."""
        ...


class _FileSigner:
    """An SSH private key read from a file, held in this process."""

    __slots__ = ("_key", "key_type", "blob", "source")

    def __init__(self, key: PrivateKey, key_type: str, blob: bytes, source: str) -> None:
        self._key = key
        self.key_type = key_type
        self.blob = blob
        self.source = source

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.key_type} from {self.source}>"

    async def sign(self, data: bytes) -> bytes:
        try:
            if isinstance(self._key, Ed25519PrivateKey):
                raw = self._key.sign(data)
            else:  # deterministic, as asyncssh signs it: the same mesh key as ever
                raw = self._key.sign(data, PKCS1v15(), hashes.SHA256())
        except Exception:
            raise IdentityError(f"signing with the key from {self.source} failed") from None
        return _string(_SIG_ALG[self.key_type]) + _string(raw)

    @asynccontextmanager
    async def client_keys(self) -> AsyncIterator[list[asyncssh.SSHKey | asyncssh.SSHKeyPair]]:
        import asyncssh  # an SSH login: the rung has imported it already

        yield [asyncssh.import_private_key(self._key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()))]


# The ssh-agent signer is tunnelmesh.identity_agent's.


# --- Private side: NodeIdentity ---------------------------------------------------------


class NodeIdentity:
    """This node's identity: the public part, the derived X25519 private key, and the
    SSH key (in this process, or in ssh-agent) to sign with.

    Anyone who can use the ssh-agent socket an agent identity comes from -- e.g. a host
    reached with agent forwarding -- can derive the same mesh private key.
    """

    __slots__ = ("public", "static_private", "_signer", "origin")

    def __init__(self, public: PublicIdentity, static_private: bytes, signer: _Signer, *,
                 origin: str | None = None) -> None:
        self.public = public
        self.static_private = static_private  # 32-byte X25519 private key
        self._signer = signer
        #: Where the mesh key came from (shown in status): the signer, or a cache.
        self.origin = origin or signer.source

    def __repr__(self) -> str:
        # Never the private key: only what is public, and where the key lives.
        return (
            f"NodeIdentity({self.public.fingerprint} {self._signer.key_type} "
            f"from {self._signer.source})"
        )

    @property
    def agent_path(self) -> str | None:
        """The ssh-agent socket that holds the SSH key; None for a key file."""
        return getattr(self._signer, "agent_path", None)

    __str__ = __repr__

    @property
    def fingerprint(self) -> str:
        return self.public.fingerprint

    async def sign(self, data: bytes, namespace: str) -> bytes:
        """SSHSIG signature blob (PROTOCOL.sshsig binary form) of `data` by the SSH key.

        Check it with `verify_sshsig`; armored, ``ssh-keygen -Y check-novalidate`` accepts
        it too. Our own reserved namespaces are refused (see the module header).
        """
        if not namespace:
            raise IdentityError("SSHSIG namespace must not be empty")
        if namespace.startswith(_RESERVED_NAMESPACE_PREFIXES):
            raise IdentityError(f"namespace {namespace!r} is reserved for key derivation")
        sig_blob = await self._signer.sign(_sshsig_signed_data(namespace, data))
        return (
            SSHSIG_MAGIC
            + struct.pack(">I", SSHSIG_VERSION)
            + _string(self._signer.blob)
            + _string(namespace.encode("utf-8"))
            + _string(b"")
            + _string(SSHSIG_HASH)
            + _string(sig_blob)
        )

    @asynccontextmanager
    async def ssh_client_keys(self) -> AsyncIterator[list[asyncssh.SSHKey | asyncssh.SSHKeyPair]]:
        """This key alone, as `asyncssh.connect(client_keys=...)` wants it, for logging in
        to a peer's SSH server. An agent key works only while its agent connection is
        open, so use it inside this block until the login is done."""
        async with self._signer.client_keys() as keys:
            yield keys

    @classmethod
    async def _derive(cls, signer: _Signer, origin: str | None = None) -> NodeIdentity:
        challenge = _sshsig_signed_data(KEY_NAMESPACE, KEY_MESSAGE)
        first = _raw_signature(await signer.sign(challenge), signer.key_type)
        second = _raw_signature(await signer.sign(challenge), signer.key_type)
        if not hmac.compare_digest(first, second):
            # A signer that randomizes would give a new mesh key on every start.
            raise IdentityError(
                f"the key from {signer.source} gives a different signature each time, so "
                f"it cannot define a stable mesh identity. {_HOW_TO_MAKE_ONE}"
            )
        static_private = HKDF(
            algorithm=hashes.SHA256(), length=32, salt=None, info=KEY_KDF_INFO
        ).derive(first)
        wg_public = X25519PrivateKey.from_private_bytes(static_private).public_key()
        wg_public_raw = wg_public.public_bytes_raw()
        attestation = await signer.sign(
            _sshsig_signed_data(ATTEST_NAMESPACE, ATTEST_PREFIX + wg_public_raw)
        )
        public = PublicIdentity(f"{signer.key_type} {_b64(signer.blob)}", wg_public_raw, attestation)
        public.verify()  # a signer that signs with the wrong key is caught here, not by peers
        return cls(public, static_private, signer, origin=origin)


# --- Loading from a file ----------------------------------------------------------------


def _read_passphrase_file(path: str | os.PathLike[str]) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise IdentityError(
            f"cannot read passphrase file {os.fspath(path)}: {exc.strerror}"
        ) from None
    return data.rstrip(b"\r\n")  # editors add a final newline; it is not the passphrase


def _get_passphrase(
    path: str,
    passphrase: str | None,
    passphrase_file: str | os.PathLike[str] | None,
    prompt: bool,
) -> bytes | str:
    """Explicit, then file, then an interactive prompt, then the environment."""
    if passphrase is not None:
        return passphrase
    if passphrase_file is not None:
        return _read_passphrase_file(passphrase_file)
    if prompt and sys.stdin is not None and sys.stdin.isatty():
        # Blocks the event loop, which only happens at interactive startup.
        return getpass.getpass(f"Passphrase for {path}: ")
    from_env = os.environ.pop(PASSPHRASE_ENV, None)  # scrubbed: children must not inherit it
    if from_env is not None:
        return from_env
    raise IdentityError(
        f"{path} is protected by a passphrase: give a passphrase file, run interactively, "
        f"or as a last resort set {PASSPHRASE_ENV}"
    )


def _unencrypted_openssh_key(data: bytes) -> PrivateKey | None:
    """The key of an unencrypted OpenSSH-format Ed25519 or RSA key file (what ssh-keygen and
    `tunnelmesh init --new-key` make) read by cryptography alone; None for anything else,
    which `load_identity_file` reads with asyncssh as before (its messages, its formats)."""
    if not data.lstrip().startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----"):
        return None
    try:
        key = serialization.load_ssh_private_key(data, None)
    except Exception:  # encrypted, damaged, or a type cryptography lacks
        return None
    return key if isinstance(key, (Ed25519PrivateKey, RSAPrivateKey)) else None


def _key_type_from_public_part(data: bytes) -> tuple[str, bytes] | None:
    """The key's type and blob before decrypting, when the format shows them (OpenSSH
    format and unencrypted PEM do), so a refused key type is refused before a prompt."""
    import asyncssh

    try:
        key = asyncssh.import_public_key(data)
    except Exception:
        return None
    return key.algorithm.decode("ascii", errors="replace"), bytes(key.public_data)


async def load_identity_file(
    path: str | os.PathLike[str],
    *,
    passphrase: str | None = None,
    passphrase_file: str | os.PathLike[str] | None = None,
    prompt: bool = False,
) -> NodeIdentity:
    """The identity of an Ed25519 or RSA private key file (OpenSSH or PEM format)."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        hint = ""
        if path == DEFAULT_HOST_KEY and isinstance(exc, FileNotFoundError):
            hint = " (create the host keys with `ssh-keygen -A`, or choose another key)"
        raise IdentityError(f"cannot read SSH key {path}: {exc.strerror}{hint}") from None

    for pem_type, key_type in ((b"EC", "ecdsa-sha2-*"), (b"DSA", "ssh-dss")):
        if b"-----BEGIN " + pem_type + b" PRIVATE KEY-----" in data:
            raise IdentityError(f"{path}: {_refusal(key_type)}")
    fast = _unencrypted_openssh_key(data)
    if fast is not None:
        public = fast.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        key_type, blob = _split_key_text(public.decode("ascii"), allow_comment=False)
        try:
            _check_key_type(key_type, blob)
        except IdentityError as exc:
            raise IdentityError(f"{path}: {exc}") from None
        return await NodeIdentity._derive(_FileSigner(fast, key_type, blob, path), origin=f"key file {path}")
    import asyncssh

    early = _key_type_from_public_part(data)
    if early is not None:
        try:
            _check_key_type(*early)
        except IdentityError as exc:
            raise IdentityError(f"{path}: {exc}") from None

    encrypted = False
    key: asyncssh.SSHKey | None = None
    try:
        key = asyncssh.import_private_key(data)
    except asyncssh.KeyImportError as exc:
        # The one asyncssh message we rely on; any other failure means "not a key".
        encrypted = str(exc).startswith("Passphrase must be specified")
    except Exception:
        pass
    if key is None and encrypted:
        secret = _get_passphrase(path, passphrase, passphrase_file, prompt)
        try:
            key = asyncssh.import_private_key(data, secret)
        except Exception:  # asyncssh says "incorrect passphrase" in several ways
            raise IdentityError(f"wrong passphrase for {path}") from None
        finally:
            del secret
    if key is None:
        if early is not None and b"PRIVATE KEY" not in data:
            raise IdentityError(f"cannot use {path}: it is a public key; give the private key file")
        raise IdentityError(f"cannot use {path}: not an SSH private key in OpenSSH or PEM format")

    key_type = key.algorithm.decode("ascii", errors="replace")
    blob = bytes(key.public_data)
    try:
        _check_key_type(key_type, blob)
    except IdentityError as exc:
        raise IdentityError(f"{path}: {exc}") from None
    # Held as cryptography's key, as the fast path holds it: one signer for every key file.
    private = serialization.load_ssh_private_key(key.export_private_key("openssh"), None)
    assert isinstance(private, (Ed25519PrivateKey, RSAPrivateKey))  # _check_key_type let only ours through
    return await NodeIdentity._derive(_FileSigner(private, key_type, blob, path), origin=f"key file {path}")


async def load_identity(
    spec: str = DEFAULT_HOST_KEY, *, passphrase_file: str | os.PathLike[str] | None = None,
    agent_path: str | os.PathLike[str] | None = None,
) -> NodeIdentity:
    """`spec`: a key file path, "agent" or "agent:<selector>"; "" means DEFAULT_HOST_KEY.
    An agent key is asked of the agent at `agent_path`, else at $SSH_AUTH_SOCK.

    A passphrase-protected file asks at the terminal when there is one.
    """
    if spec == "agent" or spec.startswith("agent:"):
        from tunnelmesh.identity_agent import load_identity_agent

        return await load_identity_agent(spec[len("agent:") :] or None,
                                         agent_path=os.fspath(agent_path) if agent_path else None)
    return await load_identity_file(
        spec or DEFAULT_HOST_KEY, passphrase_file=passphrase_file, prompt=True
    )

