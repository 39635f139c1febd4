"""Signed coordinator requests and the joiner's proof that it holds its SSH key.

Sans-IO: no sockets, no clock reads (times are passed in).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from tunnelmesh.identity import IdentityError, PublicIdentity, verify_sshsig
from tunnelmesh.membership.records import DOMAIN, AdminKey, MembershipError, b64, canonical, check, unb64

JOIN_NAMESPACE = "tunnelmesh-join-v1@tunnelmesh"
REQUEST_NAMESPACE = "tunnelmesh-request-v1@tunnelmesh"
#: A signed request older or newer than this is refused (clock skew allowance).
REQUEST_WINDOW = 120
#: How far a join's `joined` time may be from the coordinator's clock.
JOIN_WINDOW = 300

_NONCE_RE = re.compile(r"[0-9a-f]{32}")


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
        payload = check.object(payload, "Authorization")
        check.keys(payload, {"who", "t", "n", "sig"}, "Authorization")
        nonce = check.text(payload["n"], "nonce", 32)
        if _NONCE_RE.fullmatch(nonce) is None:
            raise MembershipError("Authorization: nonce must be 32 hex digits")
        who = check.text(payload["who"], "who", 64)
        if who != "admin":
            unb64(who, "member key", 32)
        return cls(who, check.integer(payload["t"], "timestamp"), nonce, unb64(payload["sig"], "request signature"))


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
