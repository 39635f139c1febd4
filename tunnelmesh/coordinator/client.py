"""Talking to a coordinator (docs/coordinator.md, "HTTP API"): what nodes, `join`
and the admin commands use.

Member requests are signed with the node's SSH identity key, admin requests with
the admin key (`RequestAuth`). Every failure is a `CoordinatorError` whose
message is the coordinator's own refusal, or a connection problem phrased for
whoever runs the command; `Revoked` carries the revocation the coordinator
answered with (the caller verifies it before believing it).
"""

from __future__ import annotations

import asyncio
import json
import os
from types import TracebackType
from typing import Any, Literal

import aiohttp

from tunnelmesh.clock import SYSTEM_CLOCK, Clock
from tunnelmesh.identity import IdentityError, NodeIdentity
from tunnelmesh.links import LinkError
from tunnelmesh.links.proxy import connect_failure, proxy_for
from tunnelmesh.membership import REQUEST_NAMESPACE, AdminKey, RequestAuth, b64, request_message, sign_admin_request
from tunnelmesh.tls import check_pinned_url, client_ssl

#: Extra time allowed on top of a long-poll's wait before giving up on an answer.
LONG_POLL_SLACK = 10.0
#: The largest answer read (after decompression): a peer map of thousands of members is far
#: below it; whatever answers at the URL, the node's memory stays bounded.
MAX_ANSWER = 16 * 1024 * 1024
#: How long the coordinator holds a join with an invite for the admin's countersignature
#: (tunnelmesh.coordinator.service.COUNTERSIGN_WAIT).
COUNTERSIGN_WAIT = 10.0

Signer = Literal["admin", "member"] | None


class CoordinatorError(Exception):
    """A refusal or a failure to talk to the coordinator; the message is for users.
    `status` is the HTTP status, or None when there was no answer."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class Revoked(CoordinatorError):
    """The coordinator says this node was revoked, with the (unverified) revocation."""

    def __init__(self, message: str, status: int, revocation: dict[str, Any]) -> None:
        super().__init__(message, status)
        self.revocation = revocation


class AnswerTooLarge(Exception):
    """An answer's body went past the limit (raised by `_read_bounded`)."""


async def _read_bounded(response: aiohttp.ClientResponse, limit: int) -> bytes:
    """The whole body, read no further than `limit` bytes (AnswerTooLarge past it); the
    time it may take is the request's timeout (a slow drip or an endless body ends there)."""
    if response.content_length is not None and response.content_length > limit:
        raise AnswerTooLarge
    body = bytearray()
    async for chunk in response.content.iter_chunked(64 * 1024):
        body += chunk
        if len(body) > limit:
            raise AnswerTooLarge
    return bytes(body)


class Coordinator:
    """One coordinator URL, over one HTTP session (use as an async context manager).

    Through the proxy that HTTP_PROXY/HTTPS_PROXY/NO_PROXY name for the URL (chosen
    here, as for the relay); https:// verifies the certificate: with `tls_fingerprint`
    (``sha256:...``, the coordinator's own certificate, pinned) that one certificate
    only, else against the system's CAs plus those in `ca_file` for a private CA."""

    def __init__(self, url: str, *, identity: NodeIdentity | None = None, admin: AdminKey | None = None,
                 timeout: float = 10.0, ca_file: str | None = None, tls_fingerprint: str | None = None,
                 clock: Clock = SYSTEM_CLOCK) -> None:
        self.clock = clock  # the signed requests' times
        self.url = url.rstrip("/")
        self.identity = identity
        self.admin = admin
        self.timeout = timeout
        self.proxy = proxy_for(self.url)
        self.pinned = tls_fingerprint is not None
        try:
            check_pinned_url(self.url, tls_fingerprint)
            self._ssl = client_ssl(ca_file, tls_fingerprint)
        except (LinkError, ValueError) as exc:
            raise CoordinatorError(str(exc)) from None
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Coordinator:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout))
        return self

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    # --- the one way requests are made ---------------------------------------------------------

    async def _headers(self, sign: Signer, method: str, path: str, raw: bytes) -> dict[str, str]:
        headers = {"Content-Type": "application/json"} if raw else {}
        now = int(self.clock.wall())
        if sign == "admin":
            if self.admin is None:
                raise CoordinatorError("this request needs the admin key")
            headers["Authorization"] = sign_admin_request(self.admin, method, path, raw, now)
        elif sign == "member":
            if self.identity is None:
                raise CoordinatorError("this request needs the node's identity")
            nonce = os.urandom(16).hex()
            try:
                signature = await self.identity.sign(request_message(method, path, now, nonce, raw), REQUEST_NAMESPACE)
            except IdentityError as exc:
                raise CoordinatorError(f"cannot sign the request: {exc}") from None
            headers["Authorization"] = RequestAuth(b64(self.identity.public.wg_public_key), now, nonce,
                                                   signature).header()
        return headers

    async def _call(self, method: str, path: str, body: dict[str, Any] | None = None, *, sign: Signer = None,
                    timeout: float | None = None) -> dict[str, Any]:
        """The JSON answer; CoordinatorError (or Revoked) for anything else."""
        if self._session is None:
            raise CoordinatorError("use the Coordinator client as `async with Coordinator(url) as c:`")
        raw = b"" if body is None else json.dumps(body, separators=(",", ":")).encode()
        headers = await self._headers(sign, method, path, raw)
        total = self.timeout if timeout is None else timeout
        try:
            async with self._session.request(method, self.url + path, data=raw or None, headers=headers,
                                             proxy=self.proxy, ssl=self._ssl,
                                             timeout=aiohttp.ClientTimeout(total=total)) as response:
                status = response.status
                payload = await _read_bounded(response, MAX_ANSWER)
        except (aiohttp.ClientConnectorError, aiohttp.ClientHttpProxyError, aiohttp.ServerFingerprintMismatch) as exc:
            hint = ""
            if isinstance(exc, aiohttp.ClientConnectorCertificateError) and not self.pinned:
                hint = (": if the coordinator uses its own certificate, pin it with --tls-fingerprint sha256:... "
                        "(`tunnelmesh status` on the admin node shows it; a standalone coordinator logs it at start)")
            raise CoordinatorError(f"cannot reach the coordinator at {self.url}: "
                                   f"{connect_failure(exc, self.proxy)}{hint}") from None
        except asyncio.TimeoutError:
            raise CoordinatorError(f"the coordinator at {self.url} did not answer within {total:g} s") from None
        except AnswerTooLarge:
            raise CoordinatorError(f"{self.url} answered with more than {MAX_ANSWER // (1024 * 1024)} MiB: "
                                   "is it a tunnelmesh coordinator?") from None
        except (aiohttp.ClientError, ValueError) as exc:
            raise CoordinatorError(f"cannot talk to the coordinator at {self.url}: {exc or type(exc).__name__}") from None
        try:
            answer = json.loads(payload)
        except (ValueError, RecursionError):
            answer = None
        if not isinstance(answer, dict):
            raise CoordinatorError(f"{self.url} answered HTTP {status} without a JSON object: is it a tunnelmesh "
                                   "coordinator?", status)
        if status >= 400:
            error = answer.get("error")
            message = error if isinstance(error, str) else f"the coordinator answered HTTP {status}"
            revocation = answer.get("revocation")
            if status == 403 and isinstance(revocation, dict):
                raise Revoked(message, status, revocation)
            raise CoordinatorError(message, status)
        return answer

    @staticmethod
    def _field(answer: dict[str, Any], key: str, kind: type) -> Any:
        value = answer.get(key)
        if not isinstance(value, kind):
            raise CoordinatorError(f"the coordinator's answer lacks {key!r}")
        return value

    # --- joining ----------------------------------------------------------------------------------

    async def network(self) -> dict[str, Any]:
        """The network record (unverified: the caller checks it against the pinned key)."""
        return self._field(await self._call("GET", "/v1/network"), "network", dict)

    async def propose(self, identity_line: str, name: str | None, grant: dict[str, Any]) -> dict[str, Any]:
        """The member body the coordinator proposes for this joiner (to be signed)."""
        answer = await self._call("POST", "/v1/join/propose", {"identity": identity_line, "name": name, "grant": grant})
        return self._field(answer, "body", dict)

    async def confirm(self, entry: dict[str, Any], proof: bytes) -> dict[str, Any]:
        """The join result for an invite-signed entry and the identity proof once the admin's
        machine countersigned it; {"pending": True, ...} while it has not yet (ask again)."""
        return await self._call("POST", "/v1/join/confirm", {"entry": entry, "proof": b64(proof)},
                                timeout=COUNTERSIGN_WAIT + LONG_POLL_SLACK)

    async def join_request(self, identity_line: str, name: str, t: int, proof: bytes) -> dict[str, Any]:
        """{"pending": True, ...} until the admin approves, then the join result."""
        return await self._call("POST", "/v1/join/request",
                                {"identity": identity_line, "name": name, "t": t, "proof": b64(proof)})

    # --- members ----------------------------------------------------------------------------------

    async def register(self, listen_port: int, addresses: list[str],
                       ssh: dict[str, Any] | None = None, relay: dict[str, Any] | None = None,
                       candidates: dict[str, Any] | None = None) -> dict[str, Any]:
        """Where this node listens; `ssh` is what it offers for the SSH rung, `relay` the
        relay it serves ({"url": ...} or {"port": N}); each register says them again:
        leaving one out withdraws it. `candidates`, its signed candidate record, replaces
        the stored one only if newer; left out, the stored one stays."""
        body: dict[str, Any] = {"listen_port": listen_port, "addresses": addresses}
        if ssh is not None:
            body["ssh"] = ssh
        if relay is not None:
            body["relay"] = relay
        if candidates is not None:
            body["candidates"] = candidates
        return await self._call("POST", "/v1/register", body, sign="member")

    async def map(self, since: int, wait: float, *, punch: bool = False) -> dict[str, Any]:
        """The peer map update after version `since`, held up to `wait` s for a change.
        With `punch`, the reply may carry "punch" notices (and a notice ends the wait). It
        asks for members' candidate records (`candidates=1`): this version's map parser takes them."""
        return await self._call("GET", f"/v1/map?since={since}&wait={wait:g}&candidates=1{'&punch=1' if punch else ''}",
                                sign="member", timeout=wait + LONG_POLL_SLACK)

    async def punch(self, peer_key: bytes) -> dict[str, Any]:
        """Ask the coordinator to tell this node and the peer to punch towards each other now."""
        return await self._call("POST", "/v1/punch", {"peer": b64(peer_key)}, sign="member")

    # --- admin ------------------------------------------------------------------------------------

    async def setup(self, network: dict[str, Any], member: dict[str, Any] | None,
                    policy: dict[str, Any] | None = None) -> dict[str, Any]:
        """Give the coordinator the network (idempotent for the same one) and, with `policy`,
        a network policy record it is to hold at least (the same record again changes
        nothing; a newer one it holds stays)."""
        answer = await self._call("POST", "/v1/admin/setup", {"network": network, "member": member}, sign="admin")
        if policy is not None:
            await self.offer_policy(policy)
        return answer

    async def set_policy(self, record: dict[str, Any]) -> dict[str, Any]:
        """A network policy record of a higher version than the coordinator's (409 if not)."""
        return await self._call("POST", "/v1/admin/policy", {"record": record}, sign="admin")

    async def offer_policy(self, record: dict[str, Any]) -> bool:
        """A network policy record the coordinator is to hold at least: whether it took it
        (it held an older one, or none: a coordinator restored from an old backup); the
        same record, or a newer one it holds, stays."""
        try:
            answer = await self.set_policy(record)
        except CoordinatorError as exc:
            if exc.status != 409:  # 409: it holds a newer one
                raise
            return False
        return answer.get("changed") is True

    async def pending(self, wait: float = 0, *, invited: bool = False) -> list[dict[str, Any]]:
        """Joins waiting for the admin (only those with an invite if `invited`), held up to
        `wait` s until there is one."""
        answer = await self._call("GET", f"/v1/admin/pending?wait={wait:g}&invited={int(invited)}", sign="admin",
                                  timeout=wait + LONG_POLL_SLACK)
        waiting = self._field(answer, "pending", list)
        if not all(isinstance(item, dict) for item in waiting):
            raise CoordinatorError(f"{self.url} answered a pending list that is not a list of objects")
        return waiting

    async def approve(self, member: dict[str, Any], sealed: dict[str, Any]) -> dict[str, Any]:
        """Admit a pending join: the admin-signed entry and the secret sealed to the joiner."""
        return await self._call("POST", "/v1/admin/approve", {"member": member, "secret": sealed}, sign="admin")

    async def add_device(self, device: dict[str, Any]) -> dict[str, Any]:
        """Admit a plain WireGuard device: its admin-signed entry (`tunnelmesh wg-export`)."""
        return await self._call("POST", "/v1/admin/device", {"member": device}, sign="admin")

    async def refuse(self, wg_key: str, reason: str) -> dict[str, Any]:
        return await self._call("POST", "/v1/admin/refuse", {"wg_key": wg_key, "reason": reason}, sign="admin")

    async def revoke(self, revocation: dict[str, Any]) -> dict[str, Any]:
        return await self._call("POST", "/v1/admin/revoke", {"revocation": revocation}, sign="admin")

    async def rotate_secret(self, record: dict[str, Any]) -> dict[str, Any]:
        """A new secret record (the secret sealed to each member; the secret itself stays here)."""
        return await self._call("POST", "/v1/admin/secret", {"record": record}, sign="admin")

    async def admin_map(self) -> dict[str, Any]:
        return await self._call("GET", "/v1/admin/map", sign="admin")
