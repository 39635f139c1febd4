"""The WebSocket relay rung (docs/transports.md, "WebSocket relay"): for networks
where only HTTP(S) gets out, a node holds one outbound WebSocket to a relay (the
coordinator's /relay, or a node with relay = true) and sends every peer's
WireGuard messages through it.

Protocol, on GET /relay: the relay sends ``{"relay": 1, "network": N,
"challenge": b64(32 random bytes)}``; the node answers ``{"wg_key": b64, "sig":
b64(SSHSIG)}``, its SSH identity's signature over `auth_message` in the
namespace `NAMESPACE`; the relay checks it against the current member with
that key and answers ``{"ok": true}`` or closes with a 4xxx code and a reason.
The message names the relay the node meant to reach (`COORDINATOR_RELAY`, or
the relay node's WireGuard key in base64), so a member serving a relay cannot
pass a challenge of another relay on and log in there with the answer.
Then binary frames only: node -> relay ``destination key (32) || message``,
relay -> node ``source key (32) || message``, the source stamped by the relay
from the authenticated connection. The messages are WireGuard's, end-to-end
encrypted: the relay sees who talks to whom, sizes and timing, never contents.

This module holds what both ends share (the message signed, the bounded frame
queue) and the node's side, `RelayClient`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import ipaddress
import json
import logging
import socket
import urllib.parse
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Collection
from typing import Any, Protocol

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult

from tunnelmesh.clock import SYSTEM_CLOCK, Clock
from tunnelmesh.identity import IdentityError, NodeIdentity
from tunnelmesh.links import MAX_MESSAGE, Link, LinkError, LinkSink, RefusalLog
from tunnelmesh.links.proxy import connect_failure, proxy_for
from tunnelmesh.membership import relay_address_usable
from tunnelmesh.tasks import cancel_and_wait
from tunnelmesh.tls import check_pinned_url, client_ssl

log = logging.getLogger("tunnelmesh.links.relay")

NAMESPACE = "tunnelmesh-relay-v1@tunnelmesh"
AUTH_PREFIX = b"tunnelmesh-relay-v1\0"
VERSION = 1
KEY_SIZE = 32
CHALLENGE_SIZE = 32
#: The largest frame either side sends: a key and the largest message.
MAX_FRAME = KEY_SIZE + MAX_MESSAGE
#: Per connection, frames waiting to be written: at most this many, and this many bytes.
QUEUE_FRAMES = 512
QUEUE_BYTES = 2 * 1024 * 1024
#: WebSocket pings: a peer that answers none within half of this is gone.
HEARTBEAT = 20.0
#: Connecting (TCP, proxy, TLS, upgrade) and authenticating, together.
CONNECT_TIMEOUT = 15.0
#: Reconnecting: the first wait, doubled after each failure up to the last.
FIRST_RETRY = 1.0
LAST_RETRY = 30.0
#: A connection served this long counts as working: the next failure retries after FIRST_RETRY.
STABLE = 10.0
#: Links made for sources the relay names: a relay cannot make a node keep more.
MAX_LINKS = 4096
#: The relay's answer to a good authentication, exactly.
OK = json.dumps({"ok": True})


#: The relay id of the coordinator's relay (a node's relay is named by its WireGuard key in base64).
COORDINATOR_RELAY = "coordinator"


def auth_message(network: str, challenge: bytes, wg_key: bytes, relay: str) -> bytes:
    """What a node signs to prove to relay `relay` of `network` that it holds `wg_key`'s identity."""
    return AUTH_PREFIX + network.encode() + b"\0" + relay.encode() + b"\0" + challenge + wg_key


def _ended(message: aiohttp.WSMessage, when: str) -> str:
    """Why a connection ended, from the message that ended it (a refusal is a 4xxx close
    with the relay's reason)."""
    where = f" {when}" if when else ""
    if message.type is aiohttp.WSMsgType.CLOSE:
        reason = str(message.extra or "")[:200]
        return f"the relay closed the connection{where} ({message.data}{': ' + reason if reason else ''})"
    if message.type is aiohttp.WSMsgType.ERROR:
        return f"the relay connection failed{where}: {message.data or type(message.data).__name__}"
    return f"the relay connection was closed{where}"


class _Socket(Protocol):
    """What FrameQueue writes to: aiohttp's client and server WebSockets alike."""

    async def send_bytes(self, data: bytes) -> None: ...


class FrameQueue:
    """Frames waiting for one WebSocket, bounded in count and bytes, written by one task
    (`drain`). A full queue refuses a frame (the caller counts the drop): a slow
    reader costs at most the bound, never more memory."""

    def __init__(self, max_frames: int = QUEUE_FRAMES, max_bytes: int = QUEUE_BYTES) -> None:
        self.max_frames = max_frames
        self.max_bytes = max_bytes
        self.bytes = 0
        self._frames: deque[bytes] = deque()
        self._ready = asyncio.Event()

    def __len__(self) -> int:
        return len(self._frames)

    def put(self, frame: bytes) -> bool:
        if len(self._frames) >= self.max_frames or self.bytes + len(frame) > self.max_bytes:
            return False
        self._frames.append(frame)
        self.bytes += len(frame)
        self._ready.set()
        return True

    async def drain(self, ws: _Socket) -> None:
        """Write frames as they come, until cancelled or the socket fails (its reader
        sees the close and ends the connection)."""
        frames = self._frames
        try:
            while True:
                await self._ready.wait()
                self._ready.clear()
                while frames:
                    frame = frames.popleft()
                    self.bytes -= len(frame)
                    await ws.send_bytes(frame)
        except ConnectionError:
            pass


def relay_url(url: str) -> str:
    """The relay's WebSocket URL for a coordinator URL: http(s)://host:port[/prefix] ->
    ws(s)://host:port[/prefix]/relay."""
    parts = urllib.parse.urlsplit(url)
    scheme = {"http": "ws", "https": "wss", "ws": "ws", "wss": "wss"}.get(parts.scheme.lower())
    if scheme is None or not parts.netloc:
        raise LinkError(f"relay URL {url!r}: expected http(s)://host:port")
    return urllib.parse.urlunsplit((scheme, parts.netloc, parts.path.rstrip("/") + "/relay", "", ""))


def parse_hello(data: Any, network: str) -> bytes:
    """The challenge in a relay's first message; LinkError if it is not one for `network`."""
    try:
        hello = json.loads(data) if isinstance(data, str) and len(data) < 1024 else None
    except (ValueError, RecursionError):
        hello = None
    if not isinstance(hello, dict) or hello.get("relay") != VERSION or not isinstance(hello.get("challenge"), str):
        raise LinkError("the server did not greet as a tunnelmesh relay (version 1)")
    if hello.get("network") != network:
        raise LinkError(f"the relay serves another network ({str(hello.get('network'))[:80]!r}), not {network}")
    try:
        challenge = base64.b64decode(hello["challenge"], validate=True)
    except (binascii.Error, ValueError):
        challenge = b""
    if len(challenge) != CHALLENGE_SIZE:
        raise LinkError("the relay's challenge is not 32 bytes of base64")
    return challenge


# --- where a member's relay may lead -----------------------------------------------------------

#: Resolves a host name to IPv4 addresses for a port: `system_resolve`, or a test's own.
Resolve = Callable[[str, int], Awaitable[list[str]]]


async def system_resolve(host: str, port: int) -> list[str]:
    """The system resolver's IPv4 addresses for `host` (socket.gaierror if none)."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, family=socket.AF_INET, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


#: Why a relay address is refused, as counted (a fixed set: hosts come from members' word).
REFUSED_UNUSABLE = "loopback, link-local, multicast or reserved address"
REFUSED_PRIVATE = "private address its member did not register"


def relay_address_problem(address: str, registered: Collection[str]) -> str | None:
    """Why a member's relay may not be at `address` (None if it may): never loopback,
    link-local, multicast, unspecified or reserved; a private-use (not global) address
    only if it is one the relay's member registered itself, that is its own network."""
    ip = ipaddress.IPv4Address(address)
    if not relay_address_usable(ip):
        return REFUSED_UNUSABLE
    if not ip.is_global and address not in registered:
        return REFUSED_PRIVATE
    return None


class RelayRefused(LinkError):
    """A member's relay URL leads where no node connects (`cause`: one of the REFUSED_* texts)."""

    def __init__(self, message: str, host: str, cause: str) -> None:
        super().__init__(message)
        self.host = host
        self.cause = cause


class RelayGuard:
    """Where the relay a member offers may lead, checked when a node connects (the URL is
    the member's unsigned word, and DNS answers what it likes, so the name's checks in
    `parse_relay_url` are not enough): `registered` gives the member's registered
    addresses now, `resolve` resolves names (the system's resolver by default). The
    connection goes to the addresses checked here, not to a second lookup of the name."""

    def __init__(self, registered: Callable[[], Collection[str]], resolve: Resolve = system_resolve) -> None:
        self.registered = registered
        self.resolve = resolve

    async def addresses(self, host: str, port: int) -> list[str]:
        """The addresses of `host` a node may connect to; RelayRefused if none, and what
        the resolver raises (socket.gaierror) if the name does not resolve."""
        try:
            found = [str(ipaddress.IPv4Address(host))]
        except ValueError:
            found = await self.resolve(host, port)
        registered = self.registered()
        problems = {address: relay_address_problem(address, registered) for address in found}
        allowed = [address for address, problem in problems.items() if problem is None]
        if not allowed:
            address, cause = next(((a, p) for a, p in problems.items() if p is not None), ("none", REFUSED_UNUSABLE))
            where = host if address == host else f"{host} (resolves to {address})"
            raise RelayRefused(f"relay host {where} refused: {cause}; a member's relay must be at a public "
                               "address or one the member registered from", host, cause)
        return allowed


class _GuardedResolver(AbstractResolver):
    """aiohttp's resolver for one relay connection: the relay's host through its guard,
    any other (a proxy the node's environment names) through the system's."""

    def __init__(self, host: str, guard: RelayGuard) -> None:
        self.host = host
        self.guard = guard

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        if host.rstrip(".").lower() == self.host:
            addresses = await self.guard.addresses(self.host, port)
        else:
            addresses = await system_resolve(host, port)
        return [ResolveResult(hostname=host, host=address, port=port, family=socket.AF_INET, proto=0,
                              flags=socket.AI_NUMERICHOST) for address in addresses]

    async def close(self) -> None:
        pass


class RelayLink(Link):
    """The path to one peer through one relay. Stable across reconnects: the daemon
    keeps it as the peer's endpoint; while the relay is away, sends are counted drops."""

    rung = "relay"

    def __init__(self, client: RelayClient, peer_key: bytes) -> None:
        super().__init__(peer_key, f"relay {client.url}")
        self._client = client
        self.drops = client.drops  # one count per relay: the reasons say which way it went wrong

    def send(self, datagram: bytes | bytearray | memoryview) -> None:
        self._client._send(self, datagram)

    def close(self) -> None:
        self.closed = True
        self._client._forget(self)


class RelayClient:
    """A node's one connection to one relay, kept up (with backoff) by `run`."""

    def __init__(self, url: str, identity: NodeIdentity, network: str, sink: LinkSink, *,
                 ca_file: str | None = None, relay: str = COORDINATOR_RELAY, guard: RelayGuard | None = None,
                 tls_fingerprint: str | None = None, clock: Clock = SYSTEM_CLOCK
                 ) -> None:
        self.pin = tls_fingerprint
        self.url, self.ws_url = self._checked(url)
        self.identity = identity
        self.network = network
        self.sink = sink
        self.relay = relay  # which relay this is meant to be, named in what we sign
        # A member's relay is checked where it leads (None: the coordinator's, or this node's
        # own, which the node's own config chose).
        self.guard = guard
        self.clock = clock
        self.refused: Counter[str] = Counter()
        self._refusals = RefusalLog(log, clock)
        self._ssl = client_ssl(ca_file, tls_fingerprint)
        self.state = "connecting"  # "connecting", "connected" or "unreachable"
        self.error: str | None = None
        self.drops: Counter[str] = Counter()
        self.connected_since: float | None = None
        self._links: dict[bytes, RelayLink] = {}
        self._queue: FrameQueue | None = None  # while connected
        self._moved = asyncio.Event()  # move_to gave another URL: connect there at once

    # --- the links --------------------------------------------------------------------------

    def link(self, peer_key: bytes) -> RelayLink:
        """The one link to `peer_key` through this relay (made on first use)."""
        link = self._links.get(peer_key)
        if link is None:
            link = self._links[peer_key] = RelayLink(self, bytes(peer_key))
            if self._queue is not None:
                self.sink.link_up(link)
        return link

    def close(self) -> None:
        """For good (the relay is no longer offered): every link is closed, so no session
        keeps sending into it."""
        for link in list(self._links.values()):
            link.close()

    def _forget(self, link: RelayLink) -> None:
        if self._links.get(link.peer_key) is link:
            del self._links[link.peer_key]

    def _send(self, link: RelayLink, datagram: bytes | bytearray | memoryview) -> None:
        queue = self._queue
        if queue is None:
            self.drops["relay: not connected"] += 1
        elif link.closed:
            self.drops["relay: link closed"] += 1
        elif len(datagram) > MAX_MESSAGE:
            self.drops["relay: oversize message"] += 1
        elif not queue.put(link.peer_key + datagram):  # the one copy: key and message in one frame
            self.drops["relay: send queue full"] += 1

    def _deliver(self, frame: bytes) -> None:
        if len(frame) <= KEY_SIZE:
            self.drops["relay: malformed frame"] += 1
            return
        source = frame[:KEY_SIZE]
        link = self._links.get(source)
        if link is None:
            if len(self._links) >= MAX_LINKS:
                self.drops["relay: too many sources"] += 1
                return
            link = self.link(source)
        self.sink.receive(link, memoryview(frame)[KEY_SIZE:])

    # --- the connection ---------------------------------------------------------------------

    def _checked(self, url: str) -> tuple[str, str]:
        """(url, its relay's WebSocket URL); LinkError if the pin would go unchecked."""
        ws_url = relay_url(url.rstrip("/"))
        try:  # the coordinator's relay is pinned like the coordinator (the same certificate)
            check_pinned_url(ws_url, self.pin)
        except ValueError as exc:
            raise LinkError(str(exc)) from None
        return url.rstrip("/"), ws_url

    def move_to(self, url: str) -> None:
        """Use the relay of the coordinator at `url` from now on (the node's coordinator
        client switched to it: tunnelmesh/coordinator/failover.py): the connection to the
        one left is closed and one to the new made at once. The links stay, as across any
        reconnect; the same URL again changes nothing."""
        url, ws_url = self._checked(url)
        if ws_url == self.ws_url:
            return
        log.info("relay %s: following the coordinator to %s", self.ws_url, ws_url)
        self.url, self.ws_url = url, ws_url
        for link in self._links.values():
            link.description = f"relay {url}"
        self._moved.set()

    async def run(self) -> None:
        """Hold the connection, reconnecting with backoff, until cancelled; after a
        `move_to`, to the new URL at once (whatever the old connection was doing)."""
        while True:
            self._moved.clear()
            async with asyncio.TaskGroup() as group:
                holding = group.create_task(self._hold(), name=f"relay {self.ws_url}")
                await self._moved.wait()
                holding.cancel()
            self.state, self.error = "connecting", None

    async def _hold(self) -> None:
        """Hold the connection to `ws_url`, reconnecting with backoff."""
        delay = FIRST_RETRY
        host = urllib.parse.urlsplit(self.ws_url).hostname or ""
        connector = None if self.guard is None else aiohttp.TCPConnector(
            resolver=_GuardedResolver(host, self.guard), use_dns_cache=False)
        async with aiohttp.ClientSession(connector=connector) as session:
            while True:
                self.state = "connecting"
                try:
                    ws = await self._connect(session)
                except RelayRefused as exc:
                    self.refused[exc.cause] += 1
                    self._refusals(exc.host, exc.cause, f"relay {self.ws_url}: {exc}")
                    self.state, self.error = "unreachable", str(exc)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, LAST_RETRY)
                    continue
                except LinkError as exc:
                    self._failed(str(exc))
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, LAST_RETRY)
                    continue
                served_since = self.clock.monotonic()
                reason = await self._serve(ws)
                self._failed(reason)
                self.state = "connecting"
                # A connection that held a while starts the backoff afresh; one cut off at once
                # (e.g. replaced by another connection of ours) does not retry every second.
                delay = FIRST_RETRY if self.clock.monotonic() - served_since >= STABLE else min(delay * 2, LAST_RETRY)
                await asyncio.sleep(delay)

    def _failed(self, reason: str) -> None:
        if reason != self.error:  # once per change, not once per retry
            log.warning("relay %s: %s", self.ws_url, reason)
        self.state, self.error = "unreachable", reason

    async def _connect(self, session: aiohttp.ClientSession) -> aiohttp.ClientWebSocketResponse:
        """A connected, authenticated WebSocket to the relay; LinkError saying why not."""
        proxy = proxy_for(self.ws_url)
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                await self._check_target(proxy)
                ws = await session.ws_connect(self.ws_url, proxy=proxy, ssl=self._ssl, heartbeat=HEARTBEAT,
                                              max_msg_size=MAX_FRAME + 1)  # aiohttp refuses sizes >= the limit
                try:
                    await self._authenticate(ws)
                except BaseException:
                    await ws.close()
                    raise
        except aiohttp.WSServerHandshakeError as exc:
            if proxy is not None and self.ws_url.startswith("ws:"):
                # A forwarding proxy drops the Upgrade header of a plain-HTTP request.
                shown = urllib.parse.urlsplit(proxy)
                raise LinkError(f"{self.ws_url} through proxy {shown.hostname}:{shown.port} answered HTTP {exc.status} instead of a "
                                "WebSocket: proxies pass WebSockets only through CONNECT, that is for https:// "
                                "relay URLs (put TLS in front of the coordinator)") from None
            raise LinkError(f"{self.ws_url} answered HTTP {exc.status} instead of a WebSocket "
                            "(is it a tunnelmesh coordinator or relay?)") from None
        except TimeoutError:
            raise LinkError(f"no answer from {self.ws_url} within {CONNECT_TIMEOUT:g} s") from None
        except aiohttp.ClientError as exc:
            raise LinkError(connect_failure(exc, proxy)) from None
        except (ValueError, OSError) as exc:  # e.g. a host name the IDNA codec refuses: never a crash
            raise LinkError(f"cannot connect to {self.ws_url}: {type(exc).__name__}") from None
        return ws

    async def _check_target(self, proxy: str | None) -> None:
        """The guard's word on where the relay is, for what aiohttp does not resolve through
        it: an address literal (never resolved), and any host reached through a proxy (the
        proxy resolves it: checked as the local resolver answers, passed on if it cannot)."""
        if self.guard is None:
            return
        parts = urllib.parse.urlsplit(self.ws_url)
        host, port = parts.hostname or "", parts.port or (443 if parts.scheme == "wss" else 80)
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            if proxy is None:
                return  # the session's resolver checks it, and the connection uses what it checked
        try:
            await self.guard.addresses(host, port)
        except OSError:
            pass  # a name only the proxy can resolve

    async def _authenticate(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        hello = await ws.receive()
        if hello.type is not aiohttp.WSMsgType.TEXT:
            raise LinkError(_ended(hello, "before greeting"))
        challenge = parse_hello(hello.data, self.network)
        wg_key = self.identity.public.wg_public_key
        try:
            signature = await self.identity.sign(auth_message(self.network, challenge, wg_key, self.relay), NAMESPACE)
        except IdentityError as exc:
            raise LinkError(f"cannot sign the relay's challenge: {exc}") from None
        await ws.send_str(json.dumps({"wg_key": base64.b64encode(wg_key).decode(),
                                      "sig": base64.b64encode(signature).decode()}))
        answer = await ws.receive()
        if answer.type is not aiohttp.WSMsgType.TEXT:
            raise LinkError(_ended(answer, "during authentication"))
        if answer.data != OK:
            raise LinkError("the relay answered the authentication with something other than ok")

    async def _serve(self, ws: aiohttp.ClientWebSocketResponse) -> str:
        """Carry frames until the connection ends; why it ended."""
        queue = FrameQueue()
        self._queue = queue
        self.state, self.error, self.connected_since = "connected", None, self.clock.wall()
        log.info("relay %s: connected", self.ws_url)
        writer = asyncio.create_task(queue.drain(ws))
        reason = "the relay connection was closed"
        try:
            for link in list(self._links.values()):
                self.sink.link_up(link)
            while True:
                message = await ws.receive()
                if message.type is aiohttp.WSMsgType.BINARY:
                    self._deliver(message.data)
                elif message.type is aiohttp.WSMsgType.TEXT:
                    self.drops["relay: text frame"] += 1
                else:
                    reason = _ended(message, "")
                    return reason
        finally:
            self._queue = None
            self.connected_since = None
            try:
                await cancel_and_wait(writer)
                await ws.close()
            finally:  # also when this task is cancelled meanwhile: the links go down all the same
                if self._moved.is_set():  # cancelled by run: the coordinator in use moved
                    reason = f"following the coordinator to {self.ws_url}"
                for link in list(self._links.values()):
                    self.sink.link_down(link, reason)

    def status(self) -> dict[str, Any]:
        queue = self._queue
        return {"url": self.ws_url, "state": self.state, "error": self.error,
                "connected_since": self.connected_since, "links": len(self._links),
                "queued": 0 if queue is None else len(queue), "queued_bytes": 0 if queue is None else queue.bytes,
                "drops": dict(self.drops), "refused": dict(self.refused)}
