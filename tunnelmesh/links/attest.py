"""The SSH endpoint a node registers with the coordinator, signed by its identity.

Peers dial a node's SSH rung only at an endpoint the node itself vouched for, and
accept only the host key it named: the coordinator relays the record but cannot
forge or alter it.

Wire form (a JSON object, exactly these keys)::

    {"port": 2222 | null,                      # the daemon's own SSH server
     "host_key": "ssh-ed25519 AAAA..." | null, # its host key (both null or both set)
     "bridge": null | {"port": 22, "user": "tunnelmesh",
                       "host_key": "ssh-ed25519 AAAA..."},  # the machine's sshd
     "sshd_host_keys": ["ecdsa-sha2-nistp256 AAAA...", "ssh-ed25519 AAAA..."],
                        # every host key of the machine's sshd (sorted, no repeats, at most
                        # MAX_SSHD_HOST_KEYS; may be empty): what `tunnelmesh ssh-config`
                        # writes into known_hosts for `ssh <node>`
     "issued": 1767225600,                     # when the node made it (Unix seconds)
     "sig": "<standard base64 of an SSHSIG blob>"}

The signature is `NodeIdentity.sign` in namespace SIGN_NAMESPACE over::

    b"tunnelmesh ssh endpoint v3\\x00" || wg_public_key (32 bytes)
        || canonical JSON of {"bridge", "host_key", "issued", "port", "sshd_host_keys"}
           (sorted keys, no spaces, ASCII)

so the record is bound to the node's WireGuard key as well as to its SSH key, and
one record has one signed spelling.

`issued` is the record's epoch: a node makes a new record whenever it starts (a new
host key comes with a restart), and whoever keeps a member's endpoint keeps the newest
it has seen (`NewestAttestations`) and refuses an older one. Else the coordinator, or
anyone on the path to it, could serve an old record after a host-key change, and nodes
would accept the old host key again. Records without `issued` (tunnelmesh before it)
are refused, saying so, and so are records without `sshd_host_keys` (v2): every node of
a network is upgraded together.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncssh

from tunnelmesh.identity import IdentityError, NodeIdentity, PublicIdentity, verify_sshsig

__all__ = [
    "AttestationError",
    "BridgeEndpoint",
    "NewestAttestations",
    "NewestRecords",
    "SIGN_NAMESPACE",
    "SshEndpoint",
    "check_host_key",
    "make_attestation",
    "parse_signature",
    "refuse_stale",
    "read_sshd_host_keys",
    "sign_record",
    "signed_message",
    "verify_attestation",
    "verify_signed",
]

SIGN_NAMESPACE = "tunnelmesh-ssh-endpoint-v1@tunnelmesh"
_PREFIX = b"tunnelmesh ssh endpoint v3\x00"  # v1 had no `issued`, v2 no `sshd_host_keys`

# Host keys need not sign deterministically (unlike identities), so ECDSA is fine here.
_HOST_KEY_TYPES = ("ssh-ed25519", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384", "ecdsa-sha2-nistp521", "ssh-rsa")
_HOST_KEY = re.compile(r"([a-z0-9-]+) ([A-Za-z0-9+/]+={0,2})")
MAX_HOST_KEY = 4096  # characters: a 16384-bit RSA key is under 3000
MAX_SIG = 12000  # characters of base64: an RSA-16384 SSHSIG is under 6000
_USER = re.compile(r"[a-z_][a-z0-9_-]{0,31}")  # what useradd accepts by default
_KEYS = {"port", "host_key", "bridge", "sshd_host_keys", "issued", "sig"}
_V2_KEYS = {"port", "host_key", "bridge", "issued", "sig"}
_V1_KEYS = {"port", "host_key", "bridge", "sig"}
#: Host keys of the machine's sshd a record may name: OpenSSH makes three types, and the
#: record must fit the coordinator's bound on it (MAX_SSH_OFFER).
MAX_SSHD_HOST_KEYS = 6
_BRIDGE_KEYS = {"port", "user", "host_key"}
#: `issued` in Unix seconds: after 2001, and a JSON integer any parser keeps exactly.
MIN_ISSUED = 1_000_000_000
MAX_ISSUED = 2**53 - 1
#: How far in the future (by the verifier's clock) a record may be issued: more, and one
#: node's fast clock would make its later, honest records look older than that one.
MAX_FUTURE = 600


class AttestationError(ValueError):
    """The record is malformed, unsigned or signed by another key; the text says which."""


@dataclass(frozen=True, slots=True)
class BridgeEndpoint:
    """The machine's own sshd, whose forced command bridges to the daemon."""

    port: int
    user: str  # the dedicated account `tunnelmesh ssh-bridge --setup` made
    host_key: str  # sshd's host key, "<type> <base64>"


@dataclass(frozen=True, slots=True)
class SshEndpoint:
    """Where and how a node can be reached over SSH; every field checked and signed."""

    port: int | None  # the daemon's own SSH server, None if it serves none
    host_key: str | None
    bridge: BridgeEndpoint | None
    issued: int = 0  # when the node made the record (Unix seconds): newer ones win
    #: Every host key of the machine's sshd, "<type> <base64>", sorted: for `ssh <node>`.
    sshd_host_keys: tuple[str, ...] = ()


def _port(value: Any, what: str) -> int:
    if type(value) is not int or not 1 <= value <= 65535:
        raise AttestationError(f"malformed SSH endpoint: {what} must be a port number 1..65535")
    return value


def check_host_key(value: Any, what: str) -> str:
    """A public key in "<type> <base64>" form, parsed, in its one canonical spelling;
    AttestationError naming `what` if it is not."""
    if not isinstance(value, str) or len(value) > MAX_HOST_KEY:
        raise AttestationError(f"malformed SSH endpoint: {what} must be an SSH public key")
    match = _HOST_KEY.fullmatch(value)
    if match is None or match.group(1) not in _HOST_KEY_TYPES:
        raise AttestationError(
            f"malformed SSH endpoint: {what} must be '<type> <base64>' with type one of "
            + ", ".join(_HOST_KEY_TYPES)
        )
    try:
        key = asyncssh.import_public_key(value)
        canonical = key.export_public_key("openssh").decode("ascii").split()[:2]
    except Exception:  # asyncssh/cryptography raise many types for hostile input
        raise AttestationError(f"malformed SSH endpoint: {what} is not a valid SSH public key") from None
    if canonical != value.split():
        raise AttestationError(f"malformed SSH endpoint: {what} is not in canonical form")
    return value


def _bridge(value: Any) -> BridgeEndpoint | None:
    if value is None:
        return None
    if not isinstance(value, dict) or set(value) != _BRIDGE_KEYS:
        raise AttestationError(
            "malformed SSH endpoint: bridge must be null or an object with exactly port, user, host_key"
        )
    user = value["user"]
    if not isinstance(user, str) or _USER.fullmatch(user) is None:
        raise AttestationError("malformed SSH endpoint: bridge user is not a valid account name")
    return BridgeEndpoint(_port(value["port"], "bridge port"), user, check_host_key(value["host_key"], "bridge host key"))


def _sshd_host_keys(value: Any) -> tuple[str, ...]:
    """The machine sshd's host keys: a list of distinct keys in sorted order (one signed spelling)."""
    if not isinstance(value, list) or len(value) > MAX_SSHD_HOST_KEYS:
        raise AttestationError(f"malformed SSH endpoint: sshd_host_keys must be a list of at most "
                               f"{MAX_SSHD_HOST_KEYS} SSH public keys")
    keys = tuple(check_host_key(key, "an sshd host key") for key in value)
    if list(keys) != sorted(set(keys)):
        raise AttestationError("malformed SSH endpoint: sshd_host_keys must be sorted, without repeats")
    return keys


def _parse(wire: Any) -> tuple[SshEndpoint, bytes]:
    if isinstance(wire, dict) and set(wire) == _V1_KEYS:
        raise AttestationError("SSH endpoint without an issue time (made by an older tunnelmesh) refused: "
                               "an old record could be replayed after a host-key change; upgrade that node")
    if isinstance(wire, dict) and set(wire) == _V2_KEYS:
        raise AttestationError("SSH endpoint without sshd_host_keys (made by an older tunnelmesh) refused: "
                               "upgrade that node")
    if not isinstance(wire, dict) or set(wire) != _KEYS:
        raise AttestationError("malformed SSH endpoint: expected an object with exactly port, host_key, bridge, "
                               "sshd_host_keys, issued, sig")
    port, host_key, issued = wire["port"], wire["host_key"], wire["issued"]
    if (port is None) != (host_key is None):
        raise AttestationError("malformed SSH endpoint: port and host_key must both be set or both be null")
    if type(issued) is not int or not MIN_ISSUED <= issued <= MAX_ISSUED:
        raise AttestationError("malformed SSH endpoint: issued must be a time in Unix seconds")
    endpoint = SshEndpoint(
        None if port is None else _port(port, "port"),
        None if host_key is None else check_host_key(host_key, "host key"),
        _bridge(wire["bridge"]),
        issued,
        _sshd_host_keys(wire["sshd_host_keys"]),
    )
    return endpoint, parse_signature(wire["sig"], "malformed SSH endpoint", AttestationError)


def parse_signature(sig: Any, what: str, error: type[ValueError]) -> bytes:
    """A member-signed record's "sig": canonical standard base64 of at most MAX_SIG
    characters, decoded; else `error` saying "<what>: ..."."""
    if not isinstance(sig, str) or len(sig) > MAX_SIG:
        raise error(f"{what}: sig must be base64 text")
    try:
        raw = binascii.a2b_base64(sig.encode("ascii"), strict_mode=True)
    except (binascii.Error, UnicodeError, ValueError):
        raise error(f"{what}: sig is not base64") from None
    if base64.b64encode(raw).decode("ascii") != sig:
        raise error(f"{what}: sig is not canonical base64")
    return raw


def signed_message(prefix: bytes, wg_public_key: bytes, body: dict[str, Any]) -> bytes:
    """What a member signs of a record: `prefix` (the record type and version), its
    WireGuard key (the record is bound to it as well as to the SSH key) and the canonical
    JSON of `body` (sorted keys, no spaces, ASCII: one signed spelling)."""
    return prefix + wg_public_key + json.dumps(body, sort_keys=True, separators=(",", ":")).encode("ascii")


def verify_signed(identity: PublicIdentity, sig: bytes, message: bytes, namespace: str, what: str,
                  error: type[ValueError]) -> None:
    """Whether `identity`'s SSH key made `sig` over `message`; else `error` naming the node."""
    try:
        verify_sshsig(identity.ssh_public_key, sig, message, namespace)
    except IdentityError as exc:
        raise error(f"{what} of {_who(identity)} refused: {exc}") from None


async def sign_record(identity: NodeIdentity, message: bytes, namespace: str) -> str:
    """The "sig" of a record: `identity`'s SSHSIG over `message`, standard base64 (with an
    ssh-agent identity one agent call, bounded by identity_agent.AGENT_TIMEOUT)."""
    return base64.b64encode(await identity.sign(message, namespace)).decode("ascii")


def _bridge_wire(bridge: BridgeEndpoint | None) -> dict[str, Any] | None:
    return None if bridge is None else {"port": bridge.port, "user": bridge.user, "host_key": bridge.host_key}


def _signed_message(wg_public_key: bytes, endpoint: SshEndpoint) -> bytes:
    body = {
        "port": endpoint.port,
        "host_key": endpoint.host_key,
        "bridge": _bridge_wire(endpoint.bridge),
        "sshd_host_keys": list(endpoint.sshd_host_keys),
        "issued": endpoint.issued,
    }
    return signed_message(_PREFIX, wg_public_key, body)


def _who(identity: PublicIdentity) -> str:
    try:
        return identity.fingerprint
    except IdentityError:  # the refusal must name the node even when its key is malformed
        return "a node with a malformed SSH key"


def verify_attestation(wire: Any, identity: PublicIdentity) -> SshEndpoint:
    """The endpoint in `wire`, if `identity` signed exactly it; else AttestationError."""
    endpoint, sig = _parse(wire)
    verify_signed(identity, sig, _signed_message(identity.wg_public_key, endpoint), SIGN_NAMESPACE, "SSH endpoint",
                  AttestationError)
    return endpoint


async def make_attestation(
    identity: NodeIdentity, *, port: int | None, host_key: str | None, bridge: BridgeEndpoint | None, issued: int,
    sshd_host_keys: Iterable[str] = (),
) -> dict[str, Any]:
    """The signed wire form, made at `issued` (Unix seconds: now, for a starting daemon);
    AttestationError if the fields would not verify."""
    wire: dict[str, Any] = {
        "port": port,
        "host_key": host_key,
        "bridge": _bridge_wire(bridge),
        "sshd_host_keys": sorted(set(sshd_host_keys)),
        "issued": issued,
        "sig": "",
    }
    endpoint, _ = _parse(wire)  # the same checks a peer makes, before signing anything
    wire["sig"] = await sign_record(identity, _signed_message(identity.public.wg_public_key, endpoint), SIGN_NAMESPACE)
    return wire


def read_sshd_host_keys(paths: Iterable[Path]) -> tuple[str, ...]:
    """The public keys in `paths` (OpenSSH .pub files: "<type> <base64> [comment]"), each
    checked as a peer will check it, for `make_attestation`; AttestationError naming the
    file that cannot be read or holds no usable key."""
    keys = []
    for path in paths:
        try:
            words = path.read_text(encoding="ascii", errors="replace").split()
        except OSError as exc:
            raise AttestationError(f"sshd host key {path}: {exc.strerror}") from None
        try:
            keys.append(check_host_key(" ".join(words[:2]), f"sshd host key {path}"))
        except AttestationError as exc:
            raise AttestationError(str(exc).removeprefix("malformed SSH endpoint: ")) from None
    return tuple(keys)


def _when(issued: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(issued))


def refuse_stale(what: str, issued: float, newest: float, now: float, error: type[ValueError]) -> None:
    """`error` if a record issued at `issued` (Unix seconds) is older than `newest`, the
    newest of its member's records seen, or issued more than MAX_FUTURE ahead of `now`."""
    if issued > now + MAX_FUTURE:
        raise error(f"{what} issued in the future ({_when(issued)}) refused: fix that node's clock")
    if issued < newest:
        raise error(f"{what} issued {_when(issued)} refused: older than the one already seen (issued "
                    f"{_when(newest)}), so a replay, or that node's clock went back")


class NewestRecords:
    """The newest version of one kind of member-signed record seen per member (by
    WireGuard key), so that an older one, served again after the member made a new one,
    is refused. Kept for members that leave too: one that comes back must not get its old
    record accepted either. A version counts `per_second` per second of Unix time."""

    def __init__(self, what: str, error: type[ValueError], *, per_second: int = 1) -> None:
        self.what, self.error, self.per_second = what, error, per_second
        self._newest: dict[bytes, int] = {}

    def check(self, wg_key: bytes, version: int, now: float) -> None:
        """Keep `version` as `wg_key`'s newest if it is no older than the newest seen and
        not issued more than MAX_FUTURE ahead of `now`; `error` saying why not."""
        newest = self._newest.get(wg_key, 0)
        refuse_stale(self.what, version / self.per_second, newest / self.per_second, now, self.error)
        self._newest[wg_key] = version


class NewestAttestations:
    """The newest SSH endpoint record seen per member (`NewestRecords` of `issued`): an
    older one, served again after the member changed its host key, is refused."""

    def __init__(self) -> None:
        self._records = NewestRecords("SSH endpoint", AttestationError)

    def check(self, wg_key: bytes, endpoint: SshEndpoint, now: float) -> SshEndpoint:
        """`endpoint` (verified) if it is no older than the newest seen for `wg_key` and not
        issued more than MAX_FUTURE ahead of `now`; AttestationError saying why not."""
        self._records.check(wg_key, endpoint.issued, now)
        return endpoint
