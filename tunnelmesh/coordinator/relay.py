"""The relay's side of the WebSocket relay rung (protocol: tunnelmesh.links.relay;
docs/transports.md, "WebSocket relay"): a reusable aiohttp handler that the
coordinator serves at GET /relay, and that any node with relay = true can serve
over its own verified peer map.

Trust: a connection is one member, proved by a signature over a fresh challenge
and checked against the member's CURRENT identity; every frame it sends is
stamped with that member's key as the source, so no member can speak as
another. The relay enforces membership on both ends (only connected members are
destinations) and re-checks connected members when membership changes.

What it cannot do: read or alter what it carries. The messages are WireGuard's,
encrypted and authenticated end to end; the relay sees who talks to whom, the
sizes and timing of messages and each connection's address.

Nothing a client sends can crash it or make it hold more than the bounds:
malformed frames are counted drops, each connection's outbound queue is bounded
in frames and bytes (a slow reader loses messages, counted), refusals close the
socket with a 4xxx code and are logged once per (address, reason) per minute.

Several coordinators on one database (tunnelmesh.coordinator.cluster): a frame whose
destination is not connected here goes to `remote`, which passes it to the coordinator
holding that member's connection; frames from there come in through `deliver`, and
`presence` hears of each member that connects here or leaves.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import os
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from aiohttp import WSMsgType, web

from tunnelmesh.clock import SYSTEM_CLOCK, Clock
from tunnelmesh.identity import (
    SSHSIG_MAGIC,
    IdentityError,
    PublicIdentity,
    verify_sshsig,
)
from tunnelmesh.links import RefusalLog
from tunnelmesh.links.relay import (
    CHALLENGE_SIZE,
    COORDINATOR_RELAY,
    HEARTBEAT,
    KEY_SIZE,
    MAX_FRAME,
    NAMESPACE,
    OK,
    VERSION,
    FrameQueue,
    auth_message,
)
from tunnelmesh.tasks import cancel_and_wait

log = logging.getLogger("tunnelmesh.coordinator.relay")

#: How long a client has to answer the challenge.
AUTH_TIMEOUT = 10.0
#: How long closing one connection may take before its socket is cut.
CLOSE_TIMEOUT = 2.0
#: aiohttp's own cap on one incoming WebSocket message. Above MAX_FRAME so that a
#: somewhat oversize frame is a counted drop; far larger ones end the connection (1009).
READ_LIMIT = 64 * 1024
#: The longest authentication message taken (an RSA-16384 SSHSIG is about 2.8 KiB in base64).
MAX_AUTH = 8192

# Close codes (4000-4999 are the application's): what went wrong, for the client's status.
MALFORMED = 4000
#: A key that is no current member and a signature that does not verify get this one
#: answer, alike in code, reason and work done: else anyone could ask the relay which
#: keys are members.
AUTH_FAILED = 4001
BAD_SIGNATURE = AUTH_FAILED
AUTH_FAILED_REASON = "not a member of this network, or the signature does not verify"
NOT_MEMBER = 4003  # only to a connected member that is removed or revoked (it proved who it is)
AUTH_TIMED_OUT = 4008
REPLACED = 4009
SHUTTING_DOWN = 1001
TRY_LATER = 1013  # WebSocket's "try again later": membership cannot be checked now (its database)
#: The drop of a frame whose destination is connected neither here nor (known) elsewhere.
NOT_CONNECTED = "destination not connected"
_REFUSED = {MALFORMED: "malformed", AUTH_FAILED: "bad signature", NOT_MEMBER: "not a member",
            AUTH_TIMED_OUT: "timed out", SHUTTING_DOWN: "shutting down", TRY_LATER: "membership unknown"}


class Refusal(Exception):
    """A client refused during authentication: the close code and the reason it is told;
    `cause` is what the relay counts and logs (it may say more than the client is told)."""

    def __init__(self, code: int, reason: str, cause: str | None = None) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason
        self.cause = cause if cause is not None else _REFUSED[code]


def hello(network: str, challenge: bytes) -> str:
    """The relay's first message."""
    return json.dumps({"relay": VERSION, "network": network, "challenge": base64.b64encode(challenge).decode()})


def parse_auth(data: Any) -> tuple[bytes, bytes]:
    """The (wg_key, SSHSIG) of a client's authentication message; Refusal if malformed."""
    if not isinstance(data, str) or len(data) > MAX_AUTH:
        raise Refusal(MALFORMED, f"expected one JSON text message of at most {MAX_AUTH} bytes")
    try:
        answer = json.loads(data)
    except (ValueError, RecursionError):
        raise Refusal(MALFORMED, "the authentication message is not JSON") from None
    if not isinstance(answer, dict) or answer.keys() != {"wg_key", "sig"}:
        raise Refusal(MALFORMED, "expected {\"wg_key\": ..., \"sig\": ...}")
    values = []
    for field in ("wg_key", "sig"):
        try:
            value = answer[field]
            values.append(base64.b64decode(value, validate=True) if isinstance(value, str) else b"")
        except (binascii.Error, ValueError):
            values.append(b"")
    wg_key, signature = values
    if len(wg_key) != KEY_SIZE:
        raise Refusal(MALFORMED, "wg_key must be 32 bytes of base64")
    if not signature:
        raise Refusal(MALFORMED, "sig must be an SSHSIG signature in base64")
    return wg_key, signature


def signer_key(signature: bytes) -> str | None:
    """The public key an SSHSIG blob says it is by ("type base64"), or None if the blob is
    not one: what a non-member's signature is checked against, so that refusing it takes
    the same work as refusing a member's bad one."""
    header = len(SSHSIG_MAGIC) + 4
    if signature[:len(SSHSIG_MAGIC)] != SSHSIG_MAGIC or len(signature) < header + 4:
        return None
    size = int.from_bytes(signature[header:header + 4], "big")
    blob = signature[header + 4:header + 4 + size]
    if len(blob) != size or len(blob) < 4:
        return None
    type_size = int.from_bytes(blob[:4], "big")
    key_type = blob[4:4 + type_size]
    if len(key_type) != type_size or not key_type or not all(0x21 <= c < 0x7f for c in key_type):
        return None
    return f"{key_type.decode()} {base64.b64encode(blob).decode()}"  # verify_sshsig parses it strictly


def frame_problem(frame: bytes) -> str | None:
    """Why a client's frame cannot be forwarded (the drop's reason), or None if it can."""
    if len(frame) <= KEY_SIZE:
        return "short frame"
    if len(frame) > MAX_FRAME:
        return "oversize frame"
    return None


class MembershipUnknown(Exception):
    """`identity_for` cannot tell now whether a key is a member (the coordinator's database
    cannot be reached): a new connection is told to try later, a connected one is kept."""


class _Connection:
    """One authenticated member's WebSocket."""

    def __init__(self, key: bytes, ssh_key: str, ws: web.WebSocketResponse, request: web.Request, since: float
                 ) -> None:
        self.key = key
        self.ssh_key = ssh_key
        self.ws = ws
        self.request = request
        self.remote = request.remote or "?"
        self.since = since  # wall time
        self.queue = FrameQueue()


#: Takes (source key, frame as the member sent it) for a destination not connected here:
#: None if it passed the frame on, else why it dropped it.
Remote = Callable[[bytes, bytes], str | None]
#: Hears (member key, True) when a member's connection is here, (key, False) when it is gone.
Presence = Callable[[bytes, bool], None]


class Relay:
    """The relay for one network. `identity_for(wg_key)` names the current members (None
    for anyone else; awaited: the coordinator's asks its database); call `member_changed`
    whenever membership may have changed. `remote` and `presence`: see the module's doc."""

    def __init__(self, network: str, identity_for: Callable[[bytes], Awaitable[PublicIdentity | None]],
                 relay: str = COORDINATOR_RELAY, clock: Clock = SYSTEM_CLOCK, *, remote: Remote | None = None,
                 presence: Presence | None = None) -> None:
        self.network = network
        self.identity_for = identity_for
        self.relay = relay  # this relay's id, which clients sign (links.relay.auth_message)
        self.remote = remote
        self.presence = presence
        self.drops: Counter[str] = Counter()
        self.refusals: Counter[str] = Counter()
        self.relayed_frames = 0  # frames passed on to their destination's queue
        self.relayed_bytes = 0  # their WireGuard bytes (the destination key taken off)
        self._connections: dict[bytes, _Connection] = {}
        self._background: set[asyncio.Task[None]] = set()  # closes and membership checks in flight
        self._checking = self._check_again = False  # a membership check runs; another is due after it
        self.clock = clock
        self._log_refusal = RefusalLog(log, clock)
        self._closed = False

    async def handler(self, request: web.Request) -> web.StreamResponse:
        """GET /relay: authenticate a member, then carry its frames until it goes."""
        # No compression: WireGuard messages are ciphertext, deflate would only cost CPU.
        ws = web.WebSocketResponse(heartbeat=HEARTBEAT, max_msg_size=READ_LIMIT, timeout=CLOSE_TIMEOUT, compress=False)
        await ws.prepare(request)
        try:
            connection = await self._authenticate(ws, request)
        except Refusal as exc:
            await ws.close(code=exc.code, message=exc.reason.encode())
            return ws
        except ConnectionError:
            return ws  # gone before it finished authenticating
        try:
            await self._carry(connection)
        finally:
            self._drop(connection)
        return ws

    async def _authenticate(self, ws: web.WebSocketResponse, request: web.Request) -> _Connection:
        challenge = os.urandom(CHALLENGE_SIZE)
        await ws.send_str(hello(self.network, challenge))
        who = "a client"
        problem: str | None = None  # why a signature did not verify, for the relay's own log
        try:
            if self._closed:
                raise Refusal(SHUTTING_DOWN, "the relay is shutting down")
            try:
                message = await ws.receive(timeout=AUTH_TIMEOUT)
            except TimeoutError:
                raise Refusal(AUTH_TIMED_OUT, f"no authentication within {AUTH_TIMEOUT:g} s") from None
            if message.type is not WSMsgType.TEXT:
                raise Refusal(MALFORMED, "expected the authentication message (JSON text)")
            wg_key, signature = parse_auth(message.data)
            who = base64.b64encode(wg_key).decode()
            try:
                identity = await self.identity_for(wg_key)
            except MembershipUnknown as exc:
                raise Refusal(TRY_LATER, "the relay cannot check membership now; try again later",
                              "membership unknown") from exc
            # A stranger's signature is checked too (against the key it names), so that it is
            # refused after the same work as a member's bad one, with the same answer.
            checked = identity.ssh_public_key if identity is not None else signer_key(signature)
            try:
                signed = auth_message(self.network, challenge, wg_key, self.relay)
                verify_sshsig(checked or "", signature, signed, NAMESPACE)
            except IdentityError as exc:
                problem = str(exc)
            if identity is None:
                raise Refusal(AUTH_FAILED, AUTH_FAILED_REASON, "not a member")
            if problem is not None:
                raise Refusal(AUTH_FAILED, AUTH_FAILED_REASON, "bad signature")
        except Refusal as exc:
            self.refusals[exc.cause] += 1
            remote = request.remote or "?"
            # The relay's own log says which it was (the client is not told).
            detail = problem if exc.cause == "bad signature" else None if exc.code == AUTH_FAILED else exc.reason
            shown = f"{exc.cause} ({detail})" if detail else exc.cause
            self._log_refusal(remote, exc.cause, f"relay: refused {who} from {remote}: {shown}")
            raise
        if self._closed:  # close() began while it authenticated
            raise Refusal(SHUTTING_DOWN, "the relay is shutting down")
        await ws.send_str(OK)
        connection = _Connection(wg_key, identity.ssh_public_key, ws, request, self.clock.wall())
        old = self._connections.get(wg_key)
        if old is not None:
            self._kick(old, REPLACED, "replaced by a newer connection of the same member")
        self._connections[wg_key] = connection
        if self.presence is not None:
            self.presence(wg_key, True)
        log.info("relay: %s connected from %s", who, connection.remote)
        return connection

    async def _carry(self, connection: _Connection) -> None:
        ws = connection.ws
        writer = asyncio.create_task(connection.queue.drain(ws))
        try:
            while True:
                message = await ws.receive()
                if message.type is WSMsgType.BINARY:
                    if self._connections.get(connection.key) is connection:
                        self._forward(connection.key, message.data)
                    else:  # cut off (no longer a member, or replaced): nothing more goes through
                        self.drops["sender cut off"] += 1
                elif message.type is WSMsgType.TEXT:
                    self.drops["text frame"] += 1
                else:
                    if message.type is WSMsgType.ERROR:
                        self.drops["protocol error"] += 1  # e.g. a frame beyond READ_LIMIT: aiohttp closes
                    return
        finally:
            await cancel_and_wait(writer)

    def _forward(self, source: bytes, frame: bytes) -> None:
        """One frame from `source`: to its destination, stamped with `source` (never the
        frame's say), or a counted drop. The packet path: no logging, one copy."""
        problem = frame_problem(frame)
        if problem is None:
            target = self._connections.get(frame[:KEY_SIZE])
            if target is not None:
                problem = self._put(target, source + memoryview(frame)[KEY_SIZE:])
            elif self.remote is not None:
                problem = self.remote(source, frame)
            else:
                problem = NOT_CONNECTED
        self._count(problem, len(frame) - KEY_SIZE)

    def deliver(self, destination: bytes, stamped: bytes) -> None:
        """A frame another coordinator's relay took from a member connected there: to
        `destination` here as `stamped` (source key + message, stamped there), or a counted drop."""
        target = self._connections.get(destination)
        self._count(NOT_CONNECTED if target is None else self._put(target, stamped), len(stamped) - KEY_SIZE)

    @staticmethod
    def _put(target: _Connection, stamped: bytes) -> str | None:
        return None if target.queue.put(stamped) else "receiver slow"

    def _count(self, problem: str | None, size: int) -> None:
        """A frame passed on (`size` WireGuard bytes), or dropped for `problem`."""
        if problem is None:
            self.relayed_frames += 1
            self.relayed_bytes += size
        else:
            self.drops[problem] += 1

    def _kick(self, connection: _Connection, code: int, reason: str) -> None:
        """Close `connection` soon (from sync code); its socket is cut if closing stalls."""
        self._drop(connection)
        self._in_background(self._close(connection, code, reason))

    def _drop(self, connection: _Connection) -> None:
        """`connection` no longer carries its member's frames (unless already replaced)."""
        if self._connections.get(connection.key) is connection:
            del self._connections[connection.key]
            if self.presence is not None:
                self.presence(connection.key, False)

    def _in_background(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    @staticmethod
    async def _close(connection: _Connection, code: int, reason: str) -> None:
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT):
                await connection.ws.close(code=code, message=reason.encode())
        except TimeoutError:
            transport = connection.request.transport
            if transport is not None:
                transport.abort()

    def member_changed(self) -> None:
        """Close (soon) the connections of keys that are no longer (the same) members. One
        check runs at a time; changes during it make one more after it."""
        if self._checking:
            self._check_again = True
        elif self._connections:
            self._checking = True
            self._in_background(self._recheck())

    async def _recheck(self) -> None:
        try:
            self._check_again = True
            while self._check_again:
                self._check_again = False
                for key, connection in list(self._connections.items()):
                    try:
                        identity = await self.identity_for(key)
                    except MembershipUnknown:
                        continue  # kept: its database cannot say now, and a member is not cut off for that
                    if identity is None or identity.ssh_public_key != connection.ssh_key:
                        log.info("relay: closing %s: no longer a member", base64.b64encode(key).decode())
                        self._kick(connection, NOT_MEMBER, "no longer a member of this network")
        finally:
            self._checking = False

    def status(self) -> dict[str, Any]:
        return {
            "connections": len(self._connections),
            "peers": {base64.b64encode(key).decode(): {"remote": c.remote, "since": c.since, "queued": len(c.queue),
                                                       "queued_bytes": c.queue.bytes}
                      for key, c in self._connections.items()},
            "drops": dict(self.drops),
            "refusals": dict(self.refusals),
            "relayed_frames": self.relayed_frames,
            "relayed_bytes": self.relayed_bytes,
        }

    async def close(self) -> None:
        """Close every connection (for shutdown); new ones are turned away."""
        self._closed = True
        for connection in list(self._connections.values()):
            self._kick(connection, SHUTTING_DOWN, "the relay is shutting down")
        if self._background:
            await asyncio.wait(set(self._background))
