"""The records the admin key signs and every node checks, join tokens, the admin key, sealed secrets.

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
- ``DeviceEntry``: a plain WireGuard device (a phone): name, its own X25519 key,
  the member that serves it (``served_by``), mesh IPv4 and IPv6; admin-signed
  only. It has no SSH identity, so it only ever talks to its serving node, over UDP.
- ``Revocation``: the admin revokes a WireGuard key. Nodes keep revocations
  for good; an entry for a revoked key stays refused unless its authorisation
  is newer than the revocation (a new invite or approval made afterwards).
- ``SecretRecord``: a new network secret, sealed to each current member's
  X25519 key (`seal`), signed by the admin.
- ``PolicyRecord``: the network policy (the packet filter's TOML, docs/filter.md),
  with a version that only grows, signed by the admin.

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
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from tunnelmesh import files
from tunnelmesh.fields import Fields
from tunnelmesh.filter.policy import PolicyError, parse_policy
from tunnelmesh.identity import IdentityError, PublicIdentity
from tunnelmesh.tls import check_pinned_url, parse_pin

DOMAIN = b"tunnelmesh membership v1\x00"
TOKEN_PREFIX = "tmjoin1-"
ADMIN_KEY_HEADER = "tunnelmesh-admin-ed25519"
SEAL_INFO = b"tunnelmesh sealed secret v1"
DEFAULT_CIDR = "100.64.0.0/10"
MAX_TOKEN_CHARS = 4096
#: The largest network policy text (UTF-8 bytes) a record may carry: a policy of a few
#: hundred rules is about 20 KiB, and every node keeps and re-verifies it.
MAX_POLICY_TEXT = 64 * 1024


class MembershipError(ValueError):
    """A record, token or request that must be refused; the message says why."""


# --- encoding ----------------------------------------------------------------------------


def canonical(obj: Any) -> bytes:
    """The one byte string a JSON value is signed as."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def key_fingerprint(public_key: bytes) -> str:
    """OpenSSH-style fingerprint of a raw Ed25519 key: the network's name for its admin key."""
    return "SHA256:" + base64.b64encode(hashlib.sha256(public_key).digest()).decode().rstrip("=")


#: The checks of record fields, refusing with a MembershipError.
check = Fields(MembershipError)
unb64 = check.base64
check_name = check.name


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
        try:
            files.write_secret(path, f"{ADMIN_KEY_HEADER} {b64(seed)}\n".encode(), replace=False)
        except files.FileError as exc:
            raise MembershipError(f"cannot write the admin key: {exc}") from None

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
        wire = check.object(wire, "network")
        check.keys(wire, {"body", "sig"}, "network")
        body = check.object(wire["body"], "network body")
        check.keys(body, {"admin_key", "cidr4", "ula6", "created"}, "network body")
        admin_key = unb64(body["admin_key"], "admin key", 32)
        if pinned is not None and key_fingerprint(admin_key) != pinned:
            raise MembershipError(
                f"this coordinator serves network {key_fingerprint(admin_key)}, not {pinned} (wrong coordinator URL, "
                "or a token for another network)"
            )
        try:
            cidr4 = ipaddress.IPv4Network(check.text(body["cidr4"], "cidr4", 32))
            ula6 = ipaddress.IPv6Network(check.text(body["ula6"], "ula6", 64))
        except ValueError as exc:
            raise MembershipError(f"network body: {exc}") from None
        if not 8 <= cidr4.prefixlen <= 28 or ula6.prefixlen != 48 or not ula6.subnet_of(ipaddress.IPv6Network("fd00::/8")):
            raise MembershipError("network body: CIDR must be /8 to /28 and the IPv6 prefix a ULA /48")
        info = cls(admin_key, cidr4, ula6, check.integer(body["created"], "created"), wire["sig"])
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
        wire = check.object(wire, "invite")
        check.keys(wire, {"body", "sig"}, "invite")
        body = check.object(wire["body"], "invite body")
        check.keys(body, {"network", "invite_key", "name", "expires", "uses", "created"}, "invite body")
        network = check.text(body["network"], "invite network", 64)
        if network != key_fingerprint(admin_key):
            raise MembershipError(f"the invite is for network {network}, not this network ({key_fingerprint(admin_key)})")
        name = body["name"]
        if name is not None:
            check_name(name, "invite name")
        grant = cls(network, unb64(body["invite_key"], "invite key", 32), name,
                    check.integer(body["expires"], "expires"), check.integer(body["uses"], "uses", 0, 1_000_000),
                    check.integer(body["created"], "created"), wire["sig"])
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
    #: The network policy version in force when the invite was made (0: none, a network
    #: from before the filter). Handed over out of band with the rest of the token, so a
    #: coordinator cannot hide from the joiner that the network has a policy.
    policy: int = 0

    def encode(self) -> str:
        fields: dict[str, Any] = {"url": self.url, "network": self.network, "grant": self.grant,
                                  "key": b64(self.invite_seed)}
        if self.tls is not None:  # left out otherwise: a token without it reads as before
            fields["tls"] = self.tls
        if self.policy:  # likewise
            fields["policy"] = self.policy
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
        payload = check.object(payload, "join token")
        check.keys(payload, {"url", "network", "grant", "key"}, "join token", {"tls", "policy"})
        url = check.text(payload["url"], "coordinator URL", 2048)
        if not url.startswith(("http://", "https://")):
            raise MembershipError("join token: the coordinator URL must be http:// or https://")
        tls = None
        if "tls" in payload:
            try:
                tls = parse_pin(payload["tls"])
                check_pinned_url(url, tls)
            except ValueError as exc:
                raise MembershipError(f"join token: {exc}") from None
        policy = check.integer(payload.get("policy", 0), "join token: network policy version", 0)
        return cls(url, check.text(payload["network"], "network", 64), check.object(payload["grant"], "invite"),
                   unb64(payload["key"], "invite key", 32), tls, policy)

    def invite_key(self) -> Ed25519PrivateKey:
        return Ed25519PrivateKey.from_private_bytes(self.invite_seed)


def make_invite(admin: AdminKey, url: str, *, name: str | None, expires: int, uses: int, now: int,
                rng: Any = os.urandom, tls: str | None = None, policy: int = 0) -> Token:
    """`tls`: the coordinator's certificate pin, carried to the joiner like the admin key's fingerprint;
    `policy`: the network policy version in force (0: none)."""
    if name is not None:
        check_name(name, "invite name")
    seed = rng(32)
    invite_public = Ed25519PrivateKey.from_private_bytes(seed).public_key().public_bytes_raw()
    body = {"network": admin.fingerprint, "invite_key": b64(invite_public), "name": name,
            "expires": expires, "uses": uses, "created": now}
    return Token(url, admin.fingerprint, {"body": body, "sig": admin.sign("invite", body)}, seed, tls, policy)


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

    @property
    def ssh_fingerprint(self) -> str | None:
        """The SSH key that speaks for this member (None only for a `DeviceEntry`)."""
        return self.identity.fingerprint

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
        wire = check.object(wire, "member")
        if "grant" in wire:
            check.keys(wire, {"body", "grant", "invite_sig"}, "member")
        else:
            check.keys(wire, {"body", "admin_sig"}, "member")
        body = check.object(wire["body"], "member body")
        check.keys(body, {"network", "name", "identity", "ipv4", "ipv6", "joined"}, "member body")
        name, ipv4, ipv6, joined = _entry_fields(body, network)
        try:
            identity = PublicIdentity.from_line(check.text(body["identity"], "identity", 8192))
        except IdentityError as exc:
            raise MembershipError(f"member {name}: {exc}") from None
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


def _entry_fields(body: dict[str, Any], network: NetworkInfo
                  ) -> tuple[str, ipaddress.IPv4Address, ipaddress.IPv6Address, int]:
    """What member and device entries share: the network, the name, a host's two mesh
    addresses of this network (the same host number in both), the time it joined."""
    if body["network"] != network.network:
        raise MembershipError(f"member entry is for another network ({check.text(body['network'], 'network', 64)})")
    name = check_name(body["name"], "member name")
    try:
        ipv4 = ipaddress.IPv4Address(check.text(body["ipv4"], "ipv4", 16))
        ipv6 = ipaddress.IPv6Address(check.text(body["ipv6"], "ipv6", 64))
    except ValueError as exc:
        raise MembershipError(f"member {name}: {exc}") from None
    index = network.host_index(ipv4)
    if not 1 <= index < network.cidr4.num_addresses - 1 or network.host(index) != (ipv4, ipv6):
        raise MembershipError(f"member {name}: addresses {ipv4} / {ipv6} are not a host of {network.cidr4} / {network.ula6}")
    return name, ipv4, ipv6, check.integer(body["joined"], "joined")


@dataclass(frozen=True)
class DeviceEntry:
    """A plain WireGuard device admitted by the admin (`tunnelmesh wg-export`): its own
    X25519 key and no SSH identity, so it proves nothing but that key and speaks only
    plain WireGuard over UDP to the one member that serves it (`served_by`, by name).
    Other nodes keep it for its bindings (name, addresses) and never handshake with it.
    Signed by the admin only (kind "device"): there is no invite form."""

    network: str
    name: str
    wg_key: bytes
    served_by: str
    ipv4: ipaddress.IPv4Address
    ipv6: ipaddress.IPv6Address
    joined: int
    admin_sig: str

    grant = None  # never invite-signed (what the peer map asks of every entry)
    ssh_fingerprint = None  # no SSH key speaks for it

    @property
    def authorized_at(self) -> int:
        return self.joined

    def body(self) -> dict[str, Any]:
        return device_body(self.network, self.name, self.wg_key, self.served_by, self.ipv4, self.ipv6, self.joined)

    def to_wire(self) -> dict[str, Any]:
        return {"body": self.body(), "admin_sig": self.admin_sig}

    @classmethod
    def create(cls, admin: AdminKey, network: NetworkInfo, name: str, wg_key: bytes, served_by: str, host: int,
               now: int) -> DeviceEntry:
        """Sign a device entry for host number `host`, checked as every node will check it."""
        ipv4, ipv6 = network.host(host)
        body = device_body(network.network, name, wg_key, served_by, ipv4, ipv6, now)
        return cls.from_wire({"body": body, "admin_sig": admin.sign("device", body)}, network)

    @classmethod
    def from_wire(cls, wire: Any, network: NetworkInfo) -> DeviceEntry:
        wire = check.object(wire, "device")
        check.keys(wire, {"body", "admin_sig"}, "device")
        body = check.object(wire["body"], "device body")
        check.keys(body, {"network", "name", "wg_key", "served_by", "ipv4", "ipv6", "joined"}, "device body")
        name, ipv4, ipv6, joined = _entry_fields(body, network)
        wg_key = unb64(body["wg_key"], f"device {name}: WireGuard key", 32)
        if wg_key == bytes(32):
            raise MembershipError(f"device {name}: the WireGuard key is all zeros (not a public key)")
        served_by = check_name(body["served_by"], f"device {name}: served_by")
        if served_by == name:
            raise MembershipError(f"device {name}: a device cannot serve itself")
        _verify(network.admin_key, "device", body, wire["admin_sig"], f"device {name}")
        entry = cls(network.network, name, wg_key, served_by, ipv4, ipv6, joined, wire["admin_sig"])
        _canonical_form(entry, body, f"device {name}")
        return entry


#: Any admitted entry of the peer map.
Entry = MemberEntry | DeviceEntry


def parse_entry(wire: Any, network: NetworkInfo) -> Entry:
    """A member entry or, when its body carries a bare "wg_key", a device entry."""
    body = wire.get("body") if isinstance(wire, dict) else None
    if isinstance(body, dict) and "wg_key" in body:
        return DeviceEntry.from_wire(wire, network)
    return MemberEntry.from_wire(wire, network)


def device_body(network: str, name: str, wg_key: bytes, served_by: str, ipv4: ipaddress.IPv4Address,
                ipv6: ipaddress.IPv6Address, joined: int) -> dict[str, Any]:
    return {"network": network, "name": name, "wg_key": b64(wg_key), "served_by": served_by, "ipv4": str(ipv4),
            "ipv6": str(ipv6), "joined": joined}


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
    wire = check.object(wire, what)
    check.keys(wire, {"body", "sig"}, what)
    body = check.object(wire["body"], f"{what} body")
    check.keys(body, keys, f"{what} body")
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
    def create(cls, admin: AdminKey, member: Entry, now: int) -> Revocation:
        revocation = cls(admin.fingerprint, member.wg_key, member.name, now, "", member.ssh_fingerprint)
        return replace(revocation, signature=admin.sign("revoke", revocation.body()))

    @classmethod
    def from_wire(cls, wire: Any, network: NetworkInfo) -> Revocation:
        wire = check.object(wire, "revocation")
        optional = {"ssh"} if isinstance(wire.get("body"), dict) and "ssh" in wire["body"] else set()
        wire, body = _admin_record(wire, "revocation", {"network", "wg_key", "name", "at"} | optional, network)
        ssh = None if "ssh" not in body else _ssh_fingerprint(body["ssh"])
        revocation = cls(network.network, unb64(body["wg_key"], "revoked key", 32), check_name(body["name"]),
                         check.integer(body["at"], "at"), wire["sig"], ssh)
        _verify(network.admin_key, "revoke", body, wire["sig"], "revocation")
        _canonical_form(revocation, body, "revocation")
        return revocation

    def covers(self, member: Entry) -> bool:
        """A revocation refuses every entry for the key -- or, if it names one, for any key
        the same SSH key attests -- authorised at or before it."""
        same = member.wg_key == self.wg_key or (self.ssh is not None and member.ssh_fingerprint == self.ssh)
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
        sealed = check.object(body["sealed"], "sealed secrets")
        for key, value in sealed.items():
            unb64(key, "sealed-for key", 32)
            check.text(value, "sealed secret", 256)
        record = cls(network.network, check.integer(body["epoch"], "epoch", 1), dict(sealed), check.integer(body["at"], "at"), wire["sig"])
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


@dataclass(frozen=True)
class PolicyRecord:
    """The network policy (docs/filter.md), signed by the admin. `version` only grows:
    nodes keep the highest they verified and refuse an older one (no rollback), so
    `tunnelmesh policy set` signs the current version + 1. The text is checked with
    `parse_policy` when it is signed and again wherever it is verified: a record whose
    text does not parse is refused with the line and the reason."""

    network: str
    version: int
    text: str
    issued: int
    signature: str

    def body(self) -> dict[str, Any]:
        return {"network": self.network, "version": self.version, "text": self.text, "issued": self.issued}

    def to_wire(self) -> dict[str, Any]:
        return {"body": self.body(), "sig": self.signature}

    @classmethod
    def create(cls, admin: AdminKey, version: int, text: str, now: int) -> PolicyRecord:
        _check_policy_text(text, version)
        body = {"network": admin.fingerprint, "version": version, "text": text, "issued": now}
        return cls(admin.fingerprint, version, text, now, admin.sign("policy", body))

    @classmethod
    def from_wire(cls, wire: Any, network: NetworkInfo) -> PolicyRecord:
        """Parse and verify: the shape and the size first, then the signature, then the text
        (parsing costs more than a signature check, and only the admin's text gets that far)."""
        wire, body = _admin_record(wire, "network policy", {"network", "version", "text", "issued"}, network)
        version = check.integer(body["version"], "network policy version", 1)
        text = check.text(body["text"], "network policy text", MAX_POLICY_TEXT)
        record = cls(network.network, version, text, check.integer(body["issued"], "issued"), wire["sig"])
        _verify(network.admin_key, "policy", body, wire["sig"], f"network policy v{version}")
        _canonical_form(record, body, f"network policy v{version}")
        _check_policy_text(text, version)
        return record


def _check_policy_text(text: str, version: int) -> None:
    """A policy text a record may carry: at most MAX_POLICY_TEXT bytes, and one that parses
    (refused with its line and the reason otherwise)."""
    if len(text.encode("utf-8", "surrogatepass")) > MAX_POLICY_TEXT:
        raise MembershipError(f"network policy v{version}: larger than {MAX_POLICY_TEXT // 1024} KiB")
    if version < 1:
        raise MembershipError(f"network policy version {version}: versions start at 1")
    try:
        parse_policy(text, f"network policy v{version}")
    except PolicyError as exc:
        raise MembershipError(str(exc)) from None
