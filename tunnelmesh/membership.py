"""Who is in the network: the records the admin key signs and every node checks.

Sans-IO: no sockets, no clock reads (times are passed in), no asyncio.

Trust model (docs/coordinator.md): the coordinator is trusted for availability,
not for membership. Every record that changes membership is signed, and a node
accepts it only if it verifies against the admin public key pinned at join:

- ``NetworkInfo``: the network's admin key, IPv4 CIDR and IPv6 ULA /48.
- ``InviteGrant``: the admin authorises an *invite key* (Ed25519) for a name,
  an expiry and a number of uses. The invite token carries the invite private
  key, so the joiner -- not the coordinator -- signs its member entry with it.
- ``MemberEntry``: name, SSH identity (with its derived WireGuard key and the
  SSH key's attestation of it), mesh IPv4 and IPv6; authorised either by the
  admin's signature (the admin node itself, approvals) or by a grant plus the
  invite key's signature.
- ``Revocation``: the admin revokes a WireGuard key. Nodes keep revocations
  for good; an entry for a revoked key stays refused unless its authorisation
  is newer than the revocation (a new invite or approval made afterwards).
- ``SecretRecord``: a new network secret, sealed to each current member's
  X25519 key (`seal`), signed by the admin.

Every signature is Ed25519 over ``DOMAIN + kind + "\\0" + canonical JSON``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import ipaddress
import json
import os
import re
import urllib.parse
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from tunnelmesh.identity import IdentityError, PublicIdentity, verify_sshsig
from tunnelmesh.tls import check_pinned_url, parse_pin

DOMAIN = b"tunnelmesh membership v1\x00"
TOKEN_PREFIX = "tmjoin1-"
ADMIN_KEY_HEADER = "tunnelmesh-admin-ed25519"
JOIN_NAMESPACE = "tunnelmesh-join-v1@tunnelmesh"
REQUEST_NAMESPACE = "tunnelmesh-request-v1@tunnelmesh"
SEAL_INFO = b"tunnelmesh sealed secret v1"
DEFAULT_CIDR = "100.64.0.0/10"
MAX_RECORD_BYTES = 64 * 1024
MAX_TOKEN_CHARS = 4096
MAX_ENDPOINTS = 8
#: A signed request older or newer than this is refused (clock skew allowance).
REQUEST_WINDOW = 120
#: How far a join's `joined` time may be from the coordinator's clock.
JOIN_WINDOW = 300

_NAME_RE = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
_NONCE_RE = re.compile(r"[0-9a-f]{32}")


class MembershipError(ValueError):
    """A record, token or request that must be refused; the message says why."""


# --- encoding ----------------------------------------------------------------------------


def canonical(obj: Any) -> bytes:
    """The one byte string a JSON value is signed as."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def unb64(value: Any, what: str, size: int | None = None) -> bytes:
    if not isinstance(value, str) or len(value) > 4 * MAX_RECORD_BYTES:
        raise MembershipError(f"{what}: expected base64 text")
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise MembershipError(f"{what}: not valid base64") from None
    if size is not None and len(data) != size:
        raise MembershipError(f"{what}: expected {size} bytes, got {len(data)}")
    return data


def key_fingerprint(public_key: bytes) -> str:
    """OpenSSH-style fingerprint of a raw Ed25519 key: the network's name for its admin key."""
    return "SHA256:" + base64.b64encode(hashlib.sha256(public_key).digest()).decode().rstrip("=")


def _obj(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise MembershipError(f"{what}: expected a JSON object")
    return value


def _keys(obj: Mapping[str, Any], required: set[str], what: str, optional: set[str] = frozenset()) -> None:  # type: ignore[assignment]
    missing = required - obj.keys()
    extra = obj.keys() - required - optional
    if missing:
        raise MembershipError(f"{what}: missing {', '.join(sorted(missing))}")
    if extra:
        # Bounded and quoted: these names come from whoever sent the record.
        shown = ", ".join(sorted(repr(str(k))[:40] for k in extra)[:5])
        raise MembershipError(f"{what}: unexpected {shown}{', ...' if len(extra) > 5 else ''}")


def _int(value: Any, what: str, lo: int = 0, hi: int = 2**53) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise MembershipError(f"{what}: expected an integer from {lo} to {hi}")
    return value


def _str(value: Any, what: str, limit: int = 1024) -> str:
    if not isinstance(value, str) or len(value) > limit:
        raise MembershipError(f"{what}: expected text of at most {limit} characters")
    return value


def check_name(value: Any, what: str = "name") -> str:
    if not isinstance(value, str) or _NAME_RE.fullmatch(value) is None:
        raise MembershipError(f"{what} must be 1 to 63 characters of a-z, 0-9 and '-', not starting or ending with '-'")
    return value


def _sign(key: Ed25519PrivateKey, kind: str, body: Mapping[str, Any]) -> str:
    return b64(key.sign(DOMAIN + kind.encode() + b"\0" + canonical(body)))


def _canonical_form(record: Any, body: Mapping[str, Any], what: str) -> None:
    """Refuse a signed body that is not the one the record writes back (`to_wire`), e.g. an
    upper-case IPv6 address or non-canonical base64: it would not verify once re-serialised
    (the peer map cache, the network state file)."""
    if record.body() != body:
        raise MembershipError(f"{what}: not in canonical form (a value is spelled differently from how it is written)")


def _verify(public_key: bytes, kind: str, body: Mapping[str, Any], signature: Any, what: str) -> None:
    sig = unb64(signature, f"{what} signature", 64)
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(sig, DOMAIN + kind.encode() + b"\0" + canonical(body))
    except (InvalidSignature, ValueError):
        raise MembershipError(f"{what}: signature does not verify") from None


# --- keys ----------------------------------------------------------------------------------


class AdminKey:
    """The network's admin key (Ed25519). Lives only on the admin's machine (0600)."""

    __slots__ = ("_key", "public")

    def __init__(self, key: Ed25519PrivateKey) -> None:
        self._key = key
        self.public: bytes = key.public_key().public_bytes_raw()

    def __repr__(self) -> str:
        return f"AdminKey({self.fingerprint})"

    @property
    def fingerprint(self) -> str:
        return key_fingerprint(self.public)

    @classmethod
    def generate(cls) -> AdminKey:
        return cls(Ed25519PrivateKey.generate())

    def sign(self, kind: str, body: Mapping[str, Any]) -> str:
        return _sign(self._key, kind, body)

    def sign_bytes(self, data: bytes) -> bytes:
        return self._key.sign(data)

    def save(self, path: Path) -> None:
        """Write the key, mode 0600, refusing to overwrite one."""
        seed = self._key.private_bytes_raw()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(f"{ADMIN_KEY_HEADER} {b64(seed)}\n")

    @classmethod
    def load(cls, path: Path) -> AdminKey:
        try:
            st = os.stat(path)
            if st.st_mode & 0o077:
                raise MembershipError(f"{path}: the admin key must be readable by its owner only (chmod 600 {path})")
            text = Path(path).read_text()
        except OSError as exc:
            raise MembershipError(f"cannot read the admin key {path}: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise MembershipError(f"{path}: not a tunnelmesh admin key") from None
        parts = text.split()
        if len(parts) != 2 or parts[0] != ADMIN_KEY_HEADER:
            raise MembershipError(f"{path}: not a tunnelmesh admin key")
        try:
            seed = base64.b64decode(parts[1], validate=True)
            return cls(Ed25519PrivateKey.from_private_bytes(seed))
        except (binascii.Error, ValueError):
            raise MembershipError(f"{path}: not a tunnelmesh admin key") from None


# --- sealed secrets ---------------------------------------------------------------------------


def seal(recipient_public: bytes, plaintext: bytes, rng: Any = os.urandom) -> bytes:
    """Encrypt to an X25519 public key: ephemeral X25519, HKDF-SHA256, ChaCha20-Poly1305."""
    ephemeral = X25519PrivateKey.from_private_bytes(rng(32))
    ephemeral_public = ephemeral.public_key().public_bytes_raw()
    shared = ephemeral.exchange(X25519PublicKey.from_public_bytes(recipient_public))
    key = HKDF(hashes.SHA256(), 32, salt=ephemeral_public + recipient_public, info=SEAL_INFO).derive(shared)
    return ephemeral_public + ChaCha20Poly1305(key).encrypt(bytes(12), plaintext, None)


def unseal(private_key: bytes, blob: bytes) -> bytes:
    if len(blob) < 32 + 16:
        raise MembershipError("sealed secret too short")
    own = X25519PrivateKey.from_private_bytes(private_key)
    own_public = own.public_key().public_bytes_raw()
    try:
        shared = own.exchange(X25519PublicKey.from_public_bytes(blob[:32]))
    except ValueError:
        raise MembershipError("sealed secret: bad ephemeral key") from None
    key = HKDF(hashes.SHA256(), 32, salt=blob[:32] + own_public, info=SEAL_INFO).derive(shared)
    try:
        return ChaCha20Poly1305(key).decrypt(bytes(12), blob[32:], None)
    except InvalidTag:
        raise MembershipError("sealed secret was not sealed to this node's key") from None


# --- records -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class NetworkInfo:
    admin_key: bytes
    cidr4: ipaddress.IPv4Network
    ula6: ipaddress.IPv6Network
    created: int
    signature: str

    @property
    def network(self) -> str:
        return key_fingerprint(self.admin_key)

    def body(self) -> dict[str, Any]:
        return {"admin_key": b64(self.admin_key), "cidr4": str(self.cidr4), "ula6": str(self.ula6), "created": self.created}

    def to_wire(self) -> dict[str, Any]:
        return {"body": self.body(), "sig": self.signature}

    @classmethod
    def create(cls, admin: AdminKey, cidr4: str, now: int, rng: Any = os.urandom) -> NetworkInfo:
        try:
            net = ipaddress.IPv4Network(cidr4)
        except ValueError as exc:
            raise MembershipError(f"network CIDR {cidr4!r}: {exc}") from None
        if net.prefixlen > 28 or net.prefixlen < 8:
            raise MembershipError(f"network CIDR {net}: prefix must be from /8 to /28")
        ula = ipaddress.IPv6Network((b"\xfd" + rng(5) + bytes(10), 48))
        body = {"admin_key": b64(admin.public), "cidr4": str(net), "ula6": str(ula), "created": now}
        return cls(admin.public, net, ula, now, admin.sign("network", body))

    @classmethod
    def from_wire(cls, wire: Any, pinned: str | None = None) -> NetworkInfo:
        """Parse and verify (self-signed by its admin key; if `pinned`, that key's fingerprint)."""
        wire = _obj(wire, "network")
        _keys(wire, {"body", "sig"}, "network")
        body = _obj(wire["body"], "network body")
        _keys(body, {"admin_key", "cidr4", "ula6", "created"}, "network body")
        admin_key = unb64(body["admin_key"], "admin key", 32)
        if pinned is not None and key_fingerprint(admin_key) != pinned:
            raise MembershipError(
                f"this coordinator serves network {key_fingerprint(admin_key)}, not {pinned} (wrong coordinator URL, "
                "or a token for another network)"
            )
        try:
            cidr4 = ipaddress.IPv4Network(_str(body["cidr4"], "cidr4", 32))
            ula6 = ipaddress.IPv6Network(_str(body["ula6"], "ula6", 64))
        except ValueError as exc:
            raise MembershipError(f"network body: {exc}") from None
        if not 8 <= cidr4.prefixlen <= 28 or ula6.prefixlen != 48 or not ula6.subnet_of(ipaddress.IPv6Network("fd00::/8")):
            raise MembershipError("network body: CIDR must be /8 to /28 and the IPv6 prefix a ULA /48")
        info = cls(admin_key, cidr4, ula6, _int(body["created"], "created"), wire["sig"])
        _verify(admin_key, "network", body, wire["sig"], "network")
        _canonical_form(info, body, "network")
        return info

    def host(self, index: int) -> tuple[ipaddress.IPv4Address, ipaddress.IPv6Address]:
        """The mesh addresses of host number `index` (1 = first usable)."""
        if not 1 <= index < self.cidr4.num_addresses - 1:
            raise MembershipError(f"no host number {index} in {self.cidr4}")
        return self.cidr4.network_address + index, self.ula6.network_address + index

    def host_index(self, ipv4: ipaddress.IPv4Address) -> int:
        return int(ipv4) - int(self.cidr4.network_address)


@dataclass(frozen=True)
class InviteGrant:
    network: str
    invite_key: bytes
    name: str | None
    expires: int
    uses: int  # 0 = reusable until it expires
    created: int
    signature: str

    def body(self) -> dict[str, Any]:
        return {"network": self.network, "invite_key": b64(self.invite_key), "name": self.name,
                "expires": self.expires, "uses": self.uses, "created": self.created}

    def to_wire(self) -> dict[str, Any]:
        return {"body": self.body(), "sig": self.signature}

    @classmethod
    def from_wire(cls, wire: Any, admin_key: bytes) -> InviteGrant:
        wire = _obj(wire, "invite")
        _keys(wire, {"body", "sig"}, "invite")
        body = _obj(wire["body"], "invite body")
        _keys(body, {"network", "invite_key", "name", "expires", "uses", "created"}, "invite body")
        network = _str(body["network"], "invite network", 64)
        if network != key_fingerprint(admin_key):
            raise MembershipError(f"the invite is for network {network}, not this network ({key_fingerprint(admin_key)})")
        name = body["name"]
        if name is not None:
            check_name(name, "invite name")
        grant = cls(network, unb64(body["invite_key"], "invite key", 32), name,
                    _int(body["expires"], "expires"), _int(body["uses"], "uses", 0, 1_000_000),
                    _int(body["created"], "created"), wire["sig"])
        if grant.expires < grant.created:
            raise MembershipError("the invite expires before it was made")
        try:
            _verify(admin_key, "invite", body, wire["sig"], "invite")
        except MembershipError:
            raise MembershipError("the invite is not signed by this network's admin key (forged or corrupted token)") from None
        _canonical_form(grant, body, "invite")
        return grant


@dataclass(frozen=True)
class Token:
    """What `tunnelmesh invite` prints: where to go, which network, and the invite key."""

    url: str
    network: str
    grant: dict[str, Any]  # InviteGrant wire form; verified once the admin key is known
    invite_seed: bytes = field(repr=False)  # the invite's private key: never in a repr or a log
    #: The coordinator's own TLS certificate, pinned ("sha256:<hex>"), when it serves one.
    tls: str | None = None

    def encode(self) -> str:
        fields = {"url": self.url, "network": self.network, "grant": self.grant, "key": b64(self.invite_seed)}
        if self.tls is not None:  # left out otherwise: a token without it reads as before
            fields["tls"] = self.tls
        payload = canonical(fields)
        return TOKEN_PREFIX + base64.urlsafe_b64encode(payload).decode().rstrip("=")

    @classmethod
    def parse(cls, text: Any) -> Token:
        if not isinstance(text, str):
            raise MembershipError("not a join token")
        text = text.strip()
        if not text.startswith(TOKEN_PREFIX) or len(text) > MAX_TOKEN_CHARS:
            raise MembershipError(f"not a join token (a token starts with {TOKEN_PREFIX!r}; get one from `tunnelmesh invite`)")
        data = text[len(TOKEN_PREFIX):]
        try:
            raw = base64.urlsafe_b64decode(data + "=" * (-len(data) % 4))
            payload = json.loads(raw)
        except (binascii.Error, ValueError, RecursionError):
            raise MembershipError("join token is damaged (copy it again, whole)") from None
        payload = _obj(payload, "join token")
        _keys(payload, {"url", "network", "grant", "key"}, "join token", {"tls"})
        url = _str(payload["url"], "coordinator URL", 2048)
        if not url.startswith(("http://", "https://")):
            raise MembershipError("join token: the coordinator URL must be http:// or https://")
        tls = None
        if "tls" in payload:
            try:
                tls = parse_pin(payload["tls"])
                check_pinned_url(url, tls)
            except ValueError as exc:
                raise MembershipError(f"join token: {exc}") from None
        return cls(url, _str(payload["network"], "network", 64), _obj(payload["grant"], "invite"),
                   unb64(payload["key"], "invite key", 32), tls)

    def invite_key(self) -> Ed25519PrivateKey:
        return Ed25519PrivateKey.from_private_bytes(self.invite_seed)


def make_invite(admin: AdminKey, url: str, *, name: str | None, expires: int, uses: int, now: int,
                rng: Any = os.urandom, tls: str | None = None) -> Token:
    """`tls`: the coordinator's certificate pin, carried to the joiner like the admin key's fingerprint."""
    if name is not None:
        check_name(name, "invite name")
    seed = rng(32)
    invite_public = Ed25519PrivateKey.from_private_bytes(seed).public_key().public_bytes_raw()
    body = {"network": admin.fingerprint, "invite_key": b64(invite_public), "name": name,
            "expires": expires, "uses": uses, "created": now}
    return Token(url, admin.fingerprint, {"body": body, "sig": admin.sign("invite", body)}, seed, tls)


@dataclass(frozen=True)
class MemberEntry:
    network: str
    name: str
    identity: PublicIdentity
    ipv4: ipaddress.IPv4Address
    ipv6: ipaddress.IPv6Address
    joined: int
    admin_sig: str | None = None
    grant: InviteGrant | None = None
    invite_sig: str | None = None

    @property
    def wg_key(self) -> bytes:
        return self.identity.wg_public_key

    @property
    def authorized_at(self) -> int:
        """When the admin authorised this entry: what a revocation is compared with."""
        return self.grant.created if self.grant is not None else self.joined

    def body(self) -> dict[str, Any]:
        return member_body(self.network, self.name, self.identity, self.ipv4, self.ipv6, self.joined)

    def to_wire(self) -> dict[str, Any]:
        wire: dict[str, Any] = {"body": self.body()}
        if self.grant is not None:
            wire["grant"] = self.grant.to_wire()
            wire["invite_sig"] = self.invite_sig
        else:
            wire["admin_sig"] = self.admin_sig
        return wire

    @classmethod
    def from_wire(cls, wire: Any, network: NetworkInfo) -> MemberEntry:
        """Parse and verify a member entry of `network` (signature chain, attestation, addresses)."""
        wire = _obj(wire, "member")
        if "grant" in wire:
            _keys(wire, {"body", "grant", "invite_sig"}, "member")
        else:
            _keys(wire, {"body", "admin_sig"}, "member")
        body = _obj(wire["body"], "member body")
        _keys(body, {"network", "name", "identity", "ipv4", "ipv6", "joined"}, "member body")
        if body["network"] != network.network:
            raise MembershipError(f"member entry is for another network ({_str(body['network'], 'network', 64)})")
        name = check_name(body["name"], "member name")
        try:
            identity = PublicIdentity.from_line(_str(body["identity"], "identity", 8192))
        except IdentityError as exc:
            raise MembershipError(f"member {name}: {exc}") from None
        try:
            ipv4 = ipaddress.IPv4Address(_str(body["ipv4"], "ipv4", 16))
            ipv6 = ipaddress.IPv6Address(_str(body["ipv6"], "ipv6", 64))
        except ValueError as exc:
            raise MembershipError(f"member {name}: {exc}") from None
        index = network.host_index(ipv4)
        if not 1 <= index < network.cidr4.num_addresses - 1 or network.host(index) != (ipv4, ipv6):
            raise MembershipError(f"member {name}: addresses {ipv4} / {ipv6} are not a host of {network.cidr4} / {network.ula6}")
        joined = _int(body["joined"], "joined")
        if "grant" in wire:
            grant = InviteGrant.from_wire(wire["grant"], network.admin_key)
            if grant.name is not None and grant.name != name:
                raise MembershipError(f"member {name}: the invite was made for the name {grant.name!r}")
            if not grant.created <= joined <= grant.expires:
                raise MembershipError(f"member {name}: joined outside the invite's validity")
            _verify(grant.invite_key, "member", body, wire["invite_sig"], f"member {name}")
            entry = cls(network.network, name, identity, ipv4, ipv6, joined, None, grant, wire["invite_sig"])
        else:
            _verify(network.admin_key, "member", body, wire["admin_sig"], f"member {name}")
            entry = cls(network.network, name, identity, ipv4, ipv6, joined, wire["admin_sig"])
        _canonical_form(entry, body, f"member {name}")
        return entry


def member_body(network: str, name: str, identity: PublicIdentity, ipv4: ipaddress.IPv4Address,
                ipv6: ipaddress.IPv6Address, joined: int) -> dict[str, Any]:
    return {"network": network, "name": name, "identity": identity.to_line(), "ipv4": str(ipv4),
            "ipv6": str(ipv6), "joined": joined}


def sign_member_with_invite(body: dict[str, Any], token: Token) -> dict[str, Any]:
    return {"body": body, "grant": token.grant, "invite_sig": _sign(token.invite_key(), "member", body)}


def sign_member_as_admin(body: dict[str, Any], admin: AdminKey) -> dict[str, Any]:
    return {"body": body, "admin_sig": admin.sign("member", body)}


def _admin_record(wire: Any, what: str, keys: set[str], network: NetworkInfo) -> tuple[dict[str, Any], dict[str, Any]]:
    """The shape every admin-signed record of a network shares: {"body": {...}, "sig"}."""
    wire = _obj(wire, what)
    _keys(wire, {"body", "sig"}, what)
    body = _obj(wire["body"], f"{what} body")
    _keys(body, keys, f"{what} body")
    if body["network"] != network.network:
        raise MembershipError(f"{what} is for another network")
    return wire, body


@dataclass(frozen=True)
class Revocation:
    """The admin revokes a member: its WireGuard key and, when it names one, every key its
    SSH key attests (an SSH key can attest any X25519 key; revoking only the X25519 key
    would let a revoked member attest a fresh one and come back)."""

    network: str
    wg_key: bytes
    name: str
    at: int
    signature: str
    ssh: str | None = None  # the SSH key's fingerprint ("SHA256:..."); absent in records made before it

    def body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"network": self.network, "wg_key": b64(self.wg_key), "name": self.name, "at": self.at}
        if self.ssh is not None:
            body["ssh"] = self.ssh
        return body

    def to_wire(self) -> dict[str, Any]:
        return {"body": self.body(), "sig": self.signature}

    @classmethod
    def create(cls, admin: AdminKey, member: MemberEntry, now: int) -> Revocation:
        body = {"network": admin.fingerprint, "wg_key": b64(member.wg_key), "name": member.name, "at": now,
                "ssh": member.identity.fingerprint}
        return cls(admin.fingerprint, member.wg_key, member.name, now, admin.sign("revoke", body),
                   member.identity.fingerprint)

    @classmethod
    def from_wire(cls, wire: Any, network: NetworkInfo) -> Revocation:
        wire = _obj(wire, "revocation")
        optional = {"ssh"} if isinstance(wire.get("body"), dict) and "ssh" in wire["body"] else set()
        wire, body = _admin_record(wire, "revocation", {"network", "wg_key", "name", "at"} | optional, network)
        ssh = None if "ssh" not in body else _ssh_fingerprint(body["ssh"])
        revocation = cls(network.network, unb64(body["wg_key"], "revoked key", 32), check_name(body["name"]),
                         _int(body["at"], "at"), wire["sig"], ssh)
        _verify(network.admin_key, "revoke", body, wire["sig"], "revocation")
        _canonical_form(revocation, body, "revocation")
        return revocation

    def covers(self, member: MemberEntry) -> bool:
        """A revocation refuses every entry for the key -- or, if it names one, for any key
        the same SSH key attests -- authorised at or before it."""
        same = member.wg_key == self.wg_key or (self.ssh is not None and member.identity.fingerprint == self.ssh)
        return same and member.authorized_at <= self.at


_SSH_FINGERPRINT_RE = re.compile(r"SHA256:[A-Za-z0-9+/]{43}")


def _ssh_fingerprint(value: Any) -> str:
    if not isinstance(value, str) or _SSH_FINGERPRINT_RE.fullmatch(value) is None:
        raise MembershipError("revocation: ssh must be an SSH key fingerprint (SHA256:...)")
    return value


@dataclass(frozen=True)
class SecretRecord:
    network: str
    epoch: int
    sealed: dict[str, str]  # WireGuard key (base64) -> sealed secret (base64)
    at: int
    signature: str

    def body(self) -> dict[str, Any]:
        return {"network": self.network, "epoch": self.epoch, "sealed": self.sealed, "at": self.at}

    def to_wire(self) -> dict[str, Any]:
        return {"body": self.body(), "sig": self.signature}

    @classmethod
    def create(cls, admin: AdminKey, epoch: int, secret: bytes, members: list[MemberEntry], now: int) -> SecretRecord:
        sealed = {b64(m.wg_key): b64(seal(m.wg_key, secret)) for m in members}
        body = {"network": admin.fingerprint, "epoch": epoch, "sealed": sealed, "at": now}
        return cls(admin.fingerprint, epoch, sealed, now, admin.sign("secret", body))

    @classmethod
    def from_wire(cls, wire: Any, network: NetworkInfo) -> SecretRecord:
        wire, body = _admin_record(wire, "secret record", {"network", "epoch", "sealed", "at"}, network)
        sealed = _obj(body["sealed"], "sealed secrets")
        for key, value in sealed.items():
            unb64(key, "sealed-for key", 32)
            _str(value, "sealed secret", 256)
        record = cls(network.network, _int(body["epoch"], "epoch", 1), dict(sealed), _int(body["at"], "at"), wire["sig"])
        _verify(network.admin_key, "secret", body, wire["sig"], "secret record")
        _canonical_form(record, body, "secret record")
        return record

    def open_for(self, wg_key: bytes, static_private: bytes) -> bytes | None:
        """The new secret if it was sealed for this node, else None."""
        blob = self.sealed.get(b64(wg_key))
        if blob is None:
            return None
        secret = unseal(static_private, unb64(blob, "sealed secret"))
        if len(secret) != 32:
            raise MembershipError("sealed secret is not 32 bytes")
        return secret


# --- join proof and signed requests ------------------------------------------------------------


def join_proof_message(body: Mapping[str, Any]) -> bytes:
    """What the joiner signs with its SSH identity key to prove it holds it."""
    return canonical({"join": body})


def verify_join_proof(identity: PublicIdentity, body: Mapping[str, Any], proof: Any) -> None:
    try:
        verify_sshsig(identity.ssh_public_key, unb64(proof, "join proof"), join_proof_message(body), JOIN_NAMESPACE)
    except IdentityError as exc:
        raise MembershipError(f"the joiner did not prove it holds its identity key: {exc}") from None


def request_message(method: str, path: str, timestamp: int, nonce: str, body: bytes) -> bytes:
    """What a signed coordinator request signs: method, path with query, time, nonce, body hash."""
    return "\n".join([method.upper(), path, str(timestamp), nonce, hashlib.sha256(body).hexdigest()]).encode()


@dataclass(frozen=True)
class RequestAuth:
    """The ``Authorization: TM1 <base64url JSON>`` header of a signed request.

    ``who`` is ``"admin"`` (Ed25519 by the admin key) or a member's WireGuard key
    in base64 (SSHSIG by that member's SSH key, namespace REQUEST_NAMESPACE)."""

    who: str
    timestamp: int
    nonce: str
    signature: bytes

    def header(self) -> str:
        payload = canonical({"who": self.who, "t": self.timestamp, "n": self.nonce, "sig": b64(self.signature)})
        return "TM1 " + base64.urlsafe_b64encode(payload).decode().rstrip("=")

    @classmethod
    def parse(cls, header: Any) -> RequestAuth:
        if not isinstance(header, str) or not header.startswith("TM1 ") or len(header) > 8192:
            raise MembershipError("missing or malformed Authorization header (expected 'TM1 ...')")
        data = header[4:]
        try:
            payload = json.loads(base64.urlsafe_b64decode(data + "=" * (-len(data) % 4)))
        except (binascii.Error, ValueError, RecursionError):
            raise MembershipError("malformed Authorization header") from None
        payload = _obj(payload, "Authorization")
        _keys(payload, {"who", "t", "n", "sig"}, "Authorization")
        nonce = _str(payload["n"], "nonce", 32)
        if _NONCE_RE.fullmatch(nonce) is None:
            raise MembershipError("Authorization: nonce must be 32 hex digits")
        who = _str(payload["who"], "who", 64)
        if who != "admin":
            unb64(who, "member key", 32)
        return cls(who, _int(payload["t"], "timestamp"), nonce, unb64(payload["sig"], "request signature"))


def sign_admin_request(admin: AdminKey, method: str, path: str, body: bytes, now: int, rng: Any = os.urandom) -> str:
    nonce = rng(16).hex()
    return RequestAuth("admin", now, nonce, admin.sign_bytes(DOMAIN + b"request\0" + request_message(method, path, now, nonce, body))).header()


def verify_admin_request(auth: RequestAuth, admin_key: bytes, method: str, path: str, body: bytes) -> None:
    try:
        Ed25519PublicKey.from_public_bytes(admin_key).verify(
            auth.signature, DOMAIN + b"request\0" + request_message(method, path, auth.timestamp, auth.nonce, body))
    except (InvalidSignature, ValueError):
        raise MembershipError("admin request signature does not verify (not this network's admin key)") from None


def verify_member_request(auth: RequestAuth, identity: PublicIdentity, method: str, path: str, body: bytes) -> None:
    try:
        verify_sshsig(identity.ssh_public_key, auth.signature,
                      request_message(method, path, auth.timestamp, auth.nonce, body), REQUEST_NAMESPACE)
    except IdentityError as exc:
        raise MembershipError(f"request signature does not verify: {exc}") from None


class ReplayGuard:
    """Refuses a signed request seen before, or outside the time window. Memory is bounded:
    nonces are kept only for the window, and at most `limit` of them."""

    def __init__(self, window: int = REQUEST_WINDOW, limit: int = 100_000) -> None:
        self.window = window
        self.limit = limit
        self._seen: dict[str, int] = {}

    def check(self, auth: RequestAuth, now: float) -> None:
        """`precheck` and `record` in one (for a request whose signature was checked)."""
        self.precheck(auth, now)
        self.record(auth, now)

    def precheck(self, auth: RequestAuth, now: float) -> None:
        """The cheap half, to run BEFORE checking the signature (so a stale or replayed
        request costs no signature check): the time window and the nonce. Records nothing."""
        if abs(auth.timestamp - now) > self.window:
            raise MembershipError(f"request time is {auth.timestamp - now:+.0f} s off the coordinator's clock "
                                  f"(more than {self.window} s: fix the clock)")
        if auth.nonce in self._seen:
            raise MembershipError("replayed request refused")

    def record(self, auth: RequestAuth, now: float) -> None:
        """The nonce of a request whose signature verified (only then: anyone could fill
        the table with nonces of requests they cannot sign). The nonce is checked again
        here: a copy that passed `precheck` meanwhile is still refused, once."""
        if auth.nonce in self._seen:
            raise MembershipError("replayed request refused")
        if len(self._seen) >= self.limit:
            self._seen = {n: t for n, t in self._seen.items() if abs(t - now) <= self.window}
            if len(self._seen) >= self.limit:
                raise MembershipError("too many requests; try again shortly")
        self._seen[auth.nonce] = auth.timestamp


# --- the node's view of the network ----------------------------------------------------------------


@dataclass
class Endpoints:
    """Where a member was last seen: unsigned, the coordinator's word (availability only)."""

    addresses: tuple[tuple[str, int], ...] = ()
    last_seen: int | None = None
    #: The member's SSH endpoint attestation (tunnelmesh.links.attest), signed by the member
    #: itself: kept as given here and verified by the SSH rung before use.
    ssh: dict[str, Any] | None = None
    #: The URL of the WebSocket relay the member serves (relay = true), if any.
    relay: str | None = None

    def candidates(self, network: NetworkInfo) -> tuple[tuple[str, int], ...]:
        """The addresses nodes send to: unicast ones outside the mesh's own range (one in it
        would route the handshake into the tunnel itself). The list is the member's word."""
        return tuple((host, port) for host, port in self.addresses
                     if reachable_unicast(host) and ipaddress.IPv4Address(host) not in network.cidr4)

    def to_wire(self) -> dict[str, Any]:
        wire: dict[str, Any] = {"addresses": [f"{h}:{p}" for h, p in self.addresses], "last_seen": self.last_seen}
        if self.ssh is not None:
            wire["ssh"] = self.ssh
        if self.relay is not None:
            wire["relay"] = self.relay
        return wire


MAX_SSH_ATTESTATION = 2048  # bytes of JSON, as the coordinator caps it


def parse_endpoints(value: Any) -> Endpoints:
    obj = _obj(value, "endpoints")
    ssh = obj.get("ssh")
    _keys(obj, {"addresses", "last_seen"}, "endpoints", frozenset({"ssh", "relay"}))
    relay = obj.get("relay")
    if ssh is not None and (not isinstance(ssh, dict) or len(json.dumps(ssh)) > MAX_SSH_ATTESTATION):
        raise MembershipError(f"endpoints: ssh must be an object of at most {MAX_SSH_ATTESTATION} bytes")
    addresses = obj["addresses"]
    if not isinstance(addresses, list) or len(addresses) > MAX_ENDPOINTS:
        raise MembershipError(f"endpoints: at most {MAX_ENDPOINTS} addresses")
    parsed = []
    for item in addresses:
        parsed.append(parse_address(item))
    last_seen = obj["last_seen"]
    return Endpoints(tuple(parsed), None if last_seen is None else _int(last_seen, "last_seen"), ssh,
                     None if relay is None else parse_relay_url(relay))


MAX_RELAY_URL = 256


_RELAY_URL_RE = re.compile(r"(?P<scheme>https?)://(?P<host>[A-Za-z0-9.-]{1,253})(?::(?P<port>[0-9]{1,5}))?"
                           r"(?P<path>(?:/[A-Za-z0-9._~-]*)*)", re.ASCII | re.IGNORECASE)
_HOST_LABEL_RE = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?", re.ASCII)
_DEFAULT_PORTS = {"http": 80, "https": 443}
#: A label resolvers and URL parsers may read as a number (decimal, octal, hex): a host
#: ending in one is an address in another spelling, not a name.
_NUMERIC_LABEL_RE = re.compile(r"[0-9]+|0x[0-9a-f]*", re.ASCII)
#: Names of this machine besides *.localhost (RFC 6761, and what /etc/hosts files say).
_LOCAL_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"})
#: "This network" (RFC 1122): Linux reaches the local machine through 0.0.0.0, and none of it is elsewhere.
_THIS_NETWORK = ipaddress.IPv4Network("0.0.0.0/8")


def parse_relay_url(value: Any) -> str:
    """A member's relay URL as the map carries it, in canonical form: http(s)://host[:port]
    [/path] with an IPv4 address or a DNS name (LDH labels) for the host, nothing else
    (no credentials, query, fragment or escapes; printable ASCII only, as it is shown in
    logs and status). Not loopback, link-local, multicast or unspecified: a member's word
    must not send every node to its own machine or its cloud's metadata service. Scheme
    and host lowercased, the default port and a trailing slash dropped, so one relay has
    one spelling. The relay's WebSocket is <url>/relay.

    An address is taken only as a canonical dotted quad: resolvers (inet_aton) and URL
    parsers read `0x7f.0.0.1`, `0xa9fea9fe`, `2130706433` or `127.1` as addresses too,
    so a host whose last label looks like a number (digits, or 0x and hex) is refused
    rather than passed on as a name. So are names that mean this machine (`localhost`,
    `*.localhost`) and one-label names (completed by the resolver's search list, never
    a relay elsewhere). Where a name leads is checked when a node connects
    (tunnelmesh.links.relay.RelayGuard), as DNS answers then."""
    text = _str(value, "relay", MAX_RELAY_URL)
    match = _RELAY_URL_RE.fullmatch(text)
    problem = "expected http(s)://host:port" if match is None else None
    if match is not None:
        scheme, host = match["scheme"].lower(), match["host"].lower().rstrip(".")
        port = int(match["port"]) if match["port"] is not None else _DEFAULT_PORTS[scheme]
        try:
            address: ipaddress.IPv4Address | None = ipaddress.IPv4Address(host)
        except ValueError:
            address = None
        if not 1 <= port <= 65535:
            problem = "the port must be 1 to 65535"
        elif address is not None:
            if not relay_address_usable(address):
                problem = "a loopback, link-local, multicast or reserved address is no relay for others"
        elif not host or not all(_HOST_LABEL_RE.fullmatch(label) for label in host.split(".")):
            problem = "the host must be an IPv4 address or a DNS name"
        elif _NUMERIC_LABEL_RE.fullmatch(host.rsplit(".", 1)[-1]):
            problem = "an address must be written as a dotted quad (e.g. 192.0.2.7), not in another form"
        elif "." not in host or host in _LOCAL_NAMES or host.endswith(".localhost"):
            problem = "the host must be a fully qualified name of another machine (not localhost or a one-label name)"
    if problem is not None or match is None:
        shown = text[:80].encode("ascii", "backslashreplace").decode()
        raise MembershipError(f"relay {shown!r}: {problem}")
    shown_port = "" if port == _DEFAULT_PORTS[scheme] else f":{port}"
    return f"{scheme}://{host}{shown_port}{match['path'].rstrip('/')}"


def relay_address_usable(address: ipaddress.IPv4Address) -> bool:
    """Whether a relay may be at `address` at all, for anyone: not loopback, link-local,
    multicast, unspecified, "this network", broadcast or reserved. (Private-use addresses
    pass here; a node allows them only where the relay's member registered itself.)"""
    return reachable_unicast(str(address)) and address not in _THIS_NETWORK


def reachable_unicast(host: str) -> bool:
    """Whether an IPv4 address can be where another machine's peer listens: not loopback,
    unspecified, multicast, broadcast, link-local or reserved. Addresses in the map are a
    member's word, unsigned: nodes send only to these."""
    address = ipaddress.IPv4Address(host)
    return not (address.is_loopback or address.is_unspecified or address.is_multicast or address.is_link_local
                or address.is_reserved)


def parse_address(item: Any) -> tuple[str, int]:
    text = _str(item, "endpoint", 64)
    host, sep, port = text.rpartition(":")
    try:
        address = ipaddress.IPv4Address(host)
        number = int(port) if port.isdigit() else -1
    except ValueError:
        address, number = None, -1
    if not sep or address is None or not 1 <= number <= 65535:
        raise MembershipError(f"endpoint {text!r}: expected IPv4:port")
    return str(address), number


@dataclass
class MapChanges:
    added: list[MemberEntry] = field(default_factory=list)
    removed: list[tuple[MemberEntry, str]] = field(default_factory=list)
    endpoints: dict[bytes, Endpoints] = field(default_factory=dict)
    revoked_self: Revocation | None = None
    new_secret: SecretRecord | None = None
    rejected: list[str] = field(default_factory=list)
    bindings_changed: bool = False


def bindings_of(member: MemberEntry) -> tuple[str, ...]:
    """What a member entry binds to its key, for good: its name, its mesh IPv4 address and
    its SSH key (one X25519 key per SSH key)."""
    return f"name:{member.name}", f"ipv4:{member.ipv4}", f"ssh:{member.identity.fingerprint}"


def parse_bindings(value: Any) -> tuple[dict[str, bytes], dict[bytes, int]]:
    """The kept bindings as `bindings_to_wire` writes them: {"bindings": {"name:web":
    "<wg key b64>", ...}, "authorized": {"<wg key b64>": time}} -- which key holds what, and
    when the admin last authorised each holder (a revocation frees its bindings only if it
    is as late)."""
    obj = _obj(value, "bindings")
    _keys(obj, {"bindings", "authorized"}, "bindings")
    parsed: dict[str, bytes] = {}
    for key, wg in _obj(obj["bindings"], "bindings").items():
        kind, _, rest = _str(key, "binding", 128).partition(":")
        if kind == "ipv4":
            try:
                ipaddress.IPv4Address(rest)
            except ValueError:
                raise MembershipError(f"binding {key[:40]!r}: not an IPv4 address") from None
        elif kind not in ("name", "ssh") or not rest:
            raise MembershipError(f"binding {key[:40]!r}: expected name:, ipv4: or ssh:")
        parsed[key] = unb64(wg, "bound key", 32)
    authorized = {unb64(k, "bound key", 32): _int(t, "authorized") for k, t in
                  _obj(obj["authorized"], "authorized").items()}
    return parsed, authorized


class PeerMap:
    """The verified peer map a node works from, and what it keeps for good.

    `apply` takes an update from the coordinator (or the on-disk cache) and returns what
    changed; records that do not verify are refused, counted in `rejected` and named in
    the result. Kept for good, whatever any later update says (docs/coordinator.md,
    "Threat model"):

    - revocations, by WireGuard key and by SSH key: nothing can bring back a key one
      covers, nor a fresh X25519 key attested by a revoked SSH key;
    - bindings: the first admin-signed entry that names a name, a mesh address or an
      SSH key binds it to that entry's WireGuard key. Another key gets it only once the
      bound key is revoked (an admin-signed record), never because an entry claims an
      earlier time, nor because a map leaves the holder out;
    - the version: an update older than the one this node has is refused (no rollback).

    Only admin-signed member entries are members. Invite-signed entries are what a joiner
    hands the coordinator; the admin's machine checks them against its own invite ledger
    and countersigns (tunnelmesh.admission), so no invite key can make or rebind a member."""

    def __init__(self, network: NetworkInfo, own_wg_key: bytes) -> None:
        self.network = network
        self.own_wg_key = own_wg_key
        self.members: dict[bytes, MemberEntry] = {}
        self.endpoints: dict[bytes, Endpoints] = {}
        self.revocations: dict[bytes, Revocation] = {}
        self._revoked_ssh: dict[str, Revocation] = {}
        self.bindings: dict[str, bytes] = {}
        self.authorized: dict[bytes, int] = {}  # bound key -> when the admin last authorised it
        self.secret: SecretRecord | None = None
        self.own: MemberEntry | None = None  # this node's entry, when a map lists it
        self.version = 0
        self.rejected: Counter[str] = Counter()

    def revoked(self, member: MemberEntry) -> Revocation | None:
        for revocation in (self.revocations.get(member.wg_key), self._revoked_ssh.get(member.identity.fingerprint)):
            if revocation is not None and revocation.covers(member):
                return revocation
        return None

    def revocations_of(self, member: MemberEntry) -> list[Revocation]:
        """Every kept revocation of the member's key or SSH key, whenever made."""
        found = (self.revocations.get(member.wg_key), self._revoked_ssh.get(member.identity.fingerprint))
        return [r for r in dict.fromkeys(found) if r is not None]

    def key_revoked(self, wg_key: bytes) -> bool:
        """Whether a bound key is out for good: its current entry is revoked or, when it is
        not listed now, a kept revocation names it or the SSH key bound to it."""
        member = self.members.get(wg_key)
        if member is None and self.own is not None and self.own.wg_key == wg_key:
            member = self.own
        if member is not None:
            return self.revoked(member) is not None
        # Not listed now (a map may hide it): revoked only by a revocation at or after its
        # last authorisation, never by one that a later re-admission overrode.
        authorized = self.authorized.get(wg_key, 0)
        found = [self.revocations.get(wg_key), *(self._revoked_ssh.get(binding[4:]) for binding, key
                                                 in self.bindings.items() if key == wg_key and binding.startswith("ssh:"))]
        return any(r is not None and r.at >= authorized for r in found)

    def keep(self, revocation: Revocation) -> None:
        """Keep a verified revocation (the latest per key and per SSH key: it covers most)."""
        kept = self.revocations.get(revocation.wg_key)
        if kept is None or kept.at < revocation.at:
            self.revocations[revocation.wg_key] = revocation
        if revocation.ssh is not None:
            kept = self._revoked_ssh.get(revocation.ssh)
            if kept is None or kept.at < revocation.at:
                self._revoked_ssh[revocation.ssh] = revocation

    def add_revocations(self, wires: Any, changes: MapChanges) -> None:
        for wire in _list(wires, "revocations"):
            try:
                revocation = Revocation.from_wire(wire, self.network)
            except MembershipError as exc:
                self._reject(changes, f"revocation refused: {exc}")
                continue
            self.keep(revocation)
            own = self.own
            if revocation.wg_key == self.own_wg_key:
                changes.revoked_self = self.revocations[revocation.wg_key]  # the latest, which covers most
            elif own is not None and revocation.covers(own) and revocation.ssh is not None:
                changes.revoked_self = self._revoked_ssh[revocation.ssh]
            for member in [m for m in self.members.values() if revocation.covers(m)]:
                del self.members[member.wg_key]
                self.endpoints.pop(member.wg_key, None)
                changes.removed.append((member, f"revoked by the admin at {revocation.at}"))

    def binding_clash(self, member: MemberEntry) -> str | None:
        """What of `member` is bound to another key that is not revoked, if anything."""
        for binding in bindings_of(member):
            holder = self.bindings.get(binding)
            if holder is not None and holder != member.wg_key and not self.key_revoked(holder):
                return binding.replace(":", " ", 1)
        return None

    def bind(self, member: MemberEntry, changes: MapChanges) -> None:
        for binding in bindings_of(member):
            if self.bindings.get(binding) != member.wg_key:
                self.bindings[binding] = member.wg_key
                changes.bindings_changed = True
        if self.authorized.get(member.wg_key, -1) < member.authorized_at:
            self.authorized[member.wg_key] = member.authorized_at
            changes.bindings_changed = True

    def apply(self, update: Any) -> MapChanges:
        changes = MapChanges()
        update = _obj(update, "peer map")
        _keys(update, {"version", "full", "members", "revocations", "secret", "endpoints"}, "peer map")
        version = _int(update["version"], "version")
        full = update["full"]
        if not isinstance(full, bool):
            raise MembershipError("peer map: 'full' must be true or false")
        if version < self.version:
            raise MembershipError(
                f"peer map version {version} is older than version {self.version}, which this node already has: "
                "refused (a replayed map, or a coordinator database restored from an older backup)")
        # Everything that can refuse the whole update is checked before anything changes.
        revocations = _list(update["revocations"], "revocations")
        wires = _list(update["members"], "members")
        endpoint_items = _obj(update["endpoints"], "endpoints").items()
        self.add_revocations(revocations, changes)
        parsed: list[MemberEntry] = []
        for wire in wires:
            try:
                parsed.append(MemberEntry.from_wire(wire, self.network))
            except MembershipError as exc:
                self._reject(changes, f"member refused: {exc}")
        listed = {member.wg_key for member in parsed}
        if full:  # availability only: an unlisted member keeps its bindings
            for key in [k for k in self.members if k not in listed]:
                changes.removed.append((self.members.pop(key), "no longer listed by the coordinator"))
                self.endpoints.pop(key, None)
        if changes.revoked_self is not None and any(
                m.wg_key == self.own_wg_key and m.grant is None and self.revoked(m) is None for m in parsed):
            changes.revoked_self = None  # re-admitted by an approval made after it
        for member in parsed:
            if member.grant is not None:
                self._reject(changes, f"member {member.name} refused: signed with an invite key only, not "
                                      "countersigned by the admin")
                continue
            revocation = self.revoked(member)
            if revocation is not None:
                self._reject(changes, f"member {member.name} refused: its key was revoked at {revocation.at}")
                continue
            clash = self.binding_clash(member)
            if clash is not None:
                self._reject(changes, f"member {member.name} refused: {clash} is bound to another key "
                                      "(only a revocation of that key frees it)")
                continue
            self.bind(member, changes)
            if member.wg_key == self.own_wg_key:
                self.own = member
                continue
            known = self.members.get(member.wg_key)
            if known is not None and known == member:
                continue
            if known is not None:
                changes.removed.append((known, "replaced by a newer entry"))
            self.members[member.wg_key] = member
            changes.added.append(member)
        for key_b64, value in endpoint_items:
            try:
                key = unb64(key_b64, "member key", 32)
                endpoints = parse_endpoints(value)
            except MembershipError as exc:
                self._reject(changes, f"endpoints refused: {exc}")
                continue
            if key in self.members and self.endpoints.get(key) != endpoints:
                self.endpoints[key] = endpoints
                changes.endpoints[key] = endpoints
        if update["secret"] is not None:
            try:
                record = SecretRecord.from_wire(update["secret"], self.network)
            except MembershipError as exc:
                self._reject(changes, f"secret record refused: {exc}")
            else:
                if self.secret is None or record.epoch > self.secret.epoch:
                    self.secret = record
                    changes.new_secret = record
        self.version = max(self.version, version)
        return changes

    def _reject(self, changes: MapChanges, reason: str) -> None:
        self.rejected[reason.split(":")[0]] += 1
        changes.rejected.append(reason)

    def to_cache(self) -> dict[str, Any]:
        """A full update that `apply` takes back (the on-disk cache)."""
        return {
            "version": self.version, "full": True,
            "members": [m.to_wire() for m in self.members.values()],
            "revocations": [r.to_wire() for r in self.revocations.values()],
            "secret": self.secret.to_wire() if self.secret is not None else None,
            "endpoints": {b64(k): e.to_wire() for k, e in self.endpoints.items()},
        }

    def bindings_to_wire(self) -> dict[str, Any]:
        return {"bindings": {binding: b64(key) for binding, key in sorted(self.bindings.items())},
                "authorized": {b64(key): at for key, at in sorted(self.authorized.items())}}


def _list(value: Any, what: str) -> list[Any]:
    if not isinstance(value, list):
        raise MembershipError(f"{what}: expected a list")
    return value
