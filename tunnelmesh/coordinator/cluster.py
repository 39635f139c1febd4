"""Relays across coordinators (docs/transports.md, "WebSocket relay"): several coordinators
on one PostgreSQL database forward relay frames among themselves, so two members
connected to different coordinators' relays still reach each other. Nodes are told
nothing: each keeps its one connection to the coordinator it uses.

Presence: when a member's relay connection comes to a coordinator (or leaves it), the
coordinator records it in the database (table relay_presence, one row per member; it
deletes only its own row) and announces it (NOTIFY); every coordinator keeps the map
member -> (coordinator id, URL) in memory, loaded at start, moved by announcements and
read again every PRESENCE_REFRESH s (an announcement lost with a dropped LISTEN
connection). No database read per frame. The id is random per coordinator process.
A write that fails (the database is out of reach) is retried with backoff, and every
PRESENCE_REFRESH s a coordinator records again each member connected here whose row is
missing or another's, so an outage costs reachability only while it lasts.

Liveness: a coordinator that crashed leaves its rows behind. Each coordinator touches one
of its rows every PRESENCE_REFRESH s (the `since` column: the newest of a coordinator's
rows is its heartbeat), and whoever sees a coordinator whose newest row is older than
STALE_AFTER drops all of its rows. Not "rows at my URL": two coordinators given one URL
by mistake would delete each other's. The coordinators' clocks must agree to well within
STALE_AFTER (as they must for pending joins' ages); one whose rows were dropped while it
lived (a long database outage) records them again at its next refresh.

Link: coordinator A passes a frame for a member connected at B over one WebSocket A->B
(GET CLUSTER_PATH on B's --cluster-url), opened as soon as A learns of B. Both ends prove
they know the cluster secret (32 random bytes the first coordinator made in the database;
never served, never logged) by HMAC-SHA256 over both sides' fresh challenges, each side
its own role, so neither answer can be replayed or reflected. A frame on a link is
destination key + source key + WireGuard message; B hands it to its member stamped with
that source: A authenticated the member that sent it. Each link's queue is bounded
(links.relay.FrameQueue); a frame is a counted drop of the relay when the link is down
("cluster link down") or its queue full ("receiver slow"). Links reconnect with backoff.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import json
import logging
import ipaddress
import os
import time
import urllib.parse
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from aiohttp import WSMsgType, web

from tunnelmesh.links import RefusalLog
from tunnelmesh.links.relay import (
    FIRST_RETRY,
    HEARTBEAT,
    KEY_SIZE,
    LAST_RETRY,
    MAX_FRAME,
    STABLE,
    FrameQueue,
)
from tunnelmesh.tls import client_ssl

from .relay import CLOSE_TIMEOUT, NOT_CONNECTED, READ_LIMIT, Relay
from .store import Store, StoreError
from .store.base import EVERY_KEY

log = logging.getLogger("tunnelmesh.coordinator.cluster")

#: Where a coordinator takes links from the others.
CLUSTER_PATH = "/v1/cluster/relay"
VERSION = 1
CHALLENGE_SIZE = 32
PROOF_SIZE = hashlib.sha256().digest_size
#: What each side's proof is over: this, its role, then the two challenges.
PROOF_CONTEXT = b"tunnelmesh-cluster-v1\0"
AUTH_TIMEOUT = 10.0
#: The longest the presence map goes without being read from the database.
PRESENCE_REFRESH = 30.0
#: A coordinator whose newest presence row is older than this is gone: its rows are dropped.
STALE_AFTER = 3 * PRESENCE_REFRESH
#: The most links one coordinator keeps (one per other coordinator).
MAX_LINKS = 64
#: A frame on a link: the relay's frame with the source key after the destination key.
LINK_FRAME = MAX_FRAME + KEY_SIZE
MAX_AUTH = 1024
#: Close codes to a link that does not authenticate.
MALFORMED = 4000
AUTH_FAILED = 4001
LINK_DOWN = "cluster link down"
SLOW = "receiver slow"


class ClusterSettingError(ValueError):
    """A --cluster-url that other coordinators could not reach this one at."""


def proof(secret: bytes, role: bytes, first: bytes, second: bytes) -> bytes:
    """HMAC-SHA256 proof of `secret` for `role` (b"client" or b"server") over two challenges."""
    return hmac.new(secret, PROOF_CONTEXT + role + b"\0" + first + second, hashlib.sha256).digest()


def check_cluster_url(url: str) -> str:
    """`url` (http(s)://host:port[/prefix]) as others reach this coordinator; ClusterSettingError if not one."""
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ClusterSettingError(f"--cluster-url {url!r}: {exc}") from None
    if parts.scheme not in {"http", "https"} or not parts.hostname or port is None or " " in url or (
            parts.query or parts.fragment):
        raise ClusterSettingError(f"--cluster-url {url!r}: expected http(s)://host:port, where the other coordinators "
                                  "reach this one")
    return url.rstrip("/")


def default_cluster_url(host: str, port: int, tls: bool) -> str | None:
    """The URL other coordinators reach this one at, from where it listens. None (for
    --cluster-url to say) for an address on every interface (0.0.0.0, ::: which one the
    others reach is unknown), a loopback one (127.0.0.0/8, ::1, localhost: every host has
    its own, so two coordinators behind local TLS proxies would share a URL) or port 0
    (known only once it listens)."""
    if port == 0 or host in {"", "localhost"} or host.endswith(".localhost"):
        return None
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        address = None  # a name: the others resolve it
    if address is not None and (address.is_unspecified or address.is_loopback):
        return None
    shown = f"[{host}]" if ":" in host else host
    return f"{'https' if tls else 'http'}://{shown}:{port}"


def join_cluster(app: web.Application, store: Store, listen: tuple[str, int], pin: str | None,
                 cluster_url: str | None) -> None:
    """On a shared store (PostgreSQL), forward relay frames with the other coordinators:
    they reach this one at `cluster_url` (checked; default: from `listen`) and serve the
    certificate pinned by `pin` (None: plain HTTP). Nothing on a store of its own."""
    if not store.shared:
        return
    url = check_cluster_url(cluster_url) if cluster_url is not None else default_cluster_url(*listen, pin is not None)
    Cluster(store, url, True if pin is None else client_ssl(None, pin)).attach(app)


def _link_url(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    scheme = "wss" if parts.scheme == "https" else "ws"
    return urllib.parse.urlunsplit((scheme, parts.netloc, parts.path.rstrip("/") + CLUSTER_PATH, "", ""))


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _text(message: Any, name: str) -> str:
    """A short string field of an authentication message; ValueError if missing."""
    value = message.get(name) if isinstance(message, dict) else None
    if not isinstance(value, str) or not value or len(value) > 200:
        raise ValueError(f"no {name}")
    return value


def _bytes(message: Any, name: str, size: int) -> bytes:
    """A base64 field of an authentication message, `size` bytes; ValueError if not."""
    text = _text(message, name)
    try:
        decoded = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"{name} is not base64") from None
    if len(decoded) != size:
        raise ValueError(f"{name} is not {size} bytes")
    return decoded


def _parse(data: Any) -> Any:
    if not isinstance(data, str) or len(data) > MAX_AUTH:
        raise ValueError("expected one short JSON text message")
    try:
        return json.loads(data)
    except (ValueError, RecursionError):
        raise ValueError("not JSON") from None


class _Link:
    """Frames to one other coordinator over one WebSocket, kept up with backoff by `run`."""

    def __init__(self, cluster: Cluster, coordinator: str, url: str) -> None:
        self.cluster = cluster
        self.coordinator = coordinator
        self.url = url
        self.ws_url = _link_url(url)
        self.queue: FrameQueue | None = None  # while up: frames go only to a link that is up
        self.error: str | None = None
        self.task: asyncio.Task[None] | None = None

    def put(self, frame: bytes) -> str | None:
        if self.queue is None:
            return LINK_DOWN
        return None if self.queue.put(frame) else SLOW

    async def run(self) -> None:
        delay = FIRST_RETRY
        async with aiohttp.ClientSession() as session:
            while True:
                started = time.monotonic()
                try:
                    ws = await self._connect(session)
                    try:
                        await self._carry(ws)
                    finally:
                        await ws.close()
                    reason = "the other coordinator " + (
                        "is stopping" if ws.close_code == aiohttp.WSCloseCode.GOING_AWAY else "closed the link")
                except aiohttp.ServerFingerprintMismatch:
                    reason = ("it serves another TLS certificate than this coordinator (every coordinator on the "
                              "database serves the same --tls-cert; someone may be intercepting the connection)")
                except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
                    reason = str(exc) or type(exc).__name__
                self.queue = None
                if reason != self.error:  # once per change, not once per retry
                    log.warning("cluster: link to coordinator %s at %s: %s", self.coordinator, self.url, reason)
                    self.error = reason
                delay = FIRST_RETRY if time.monotonic() - started >= STABLE else min(delay * 2, LAST_RETRY)
                await asyncio.sleep(delay)

    async def _connect(self, session: aiohttp.ClientSession) -> aiohttp.ClientWebSocketResponse:
        """An authenticated link (both ends proved the secret); ValueError saying why not."""
        secret = self.cluster.secret
        async with asyncio.timeout(AUTH_TIMEOUT):
            try:
                ws = await session.ws_connect(self.ws_url, ssl=self.cluster.ssl, heartbeat=HEARTBEAT,
                                              max_msg_size=MAX_AUTH + 1)
            except aiohttp.WSServerHandshakeError as exc:
                raise ValueError(f"{self.ws_url} answered HTTP {exc.status}, not a cluster link (is --cluster-url "
                                 "this coordinator's?)") from None
            try:
                hello = _parse((await ws.receive()).data)
                if _text(hello, "coordinator") != self.coordinator:
                    raise ValueError("another coordinator answers there now (it restarted?)")
                theirs, mine = _bytes(hello, "challenge", CHALLENGE_SIZE), os.urandom(CHALLENGE_SIZE)
                await ws.send_str(json.dumps({"coordinator": self.cluster.id, "challenge": _b64(mine),
                                              "proof": _b64(proof(secret, b"client", theirs, mine))}))
                answer = await ws.receive()
                if answer.type is WSMsgType.CLOSE:
                    raise ValueError(f"refused ({answer.extra or answer.data})")
                if not hmac.compare_digest(_bytes(_parse(answer.data), "proof", PROOF_SIZE),
                                           proof(secret, b"server", mine, theirs)):
                    raise ValueError("it did not prove the cluster secret of this database")
            except BaseException:
                await ws.close()
                raise
        return ws

    async def _carry(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.queue = queue = FrameQueue()
        if self.error is not None:
            log.info("cluster: link to coordinator %s at %s is up again", self.coordinator, self.url)
            self.error = None
        writer = asyncio.create_task(queue.drain(ws))
        try:
            async for _ in ws:  # the other end sends nothing: this waits for the close
                pass
        finally:
            self.queue = None
            writer.cancel()
            await asyncio.gather(writer, return_exceptions=True)


class Cluster:
    """This coordinator's part in forwarding relay frames among the coordinators on one
    database. `url`: where the others reach it (None: it announces no member, so its
    members cannot be reached from the others; frames to theirs still go). `ssl`: what
    aiohttp checks the others' certificate with: the pin of the certificate they all serve
    (default: the system's CAs; over http:// nothing)."""

    def __init__(self, store: Store, url: str | None, ssl: Any = True) -> None:
        self.store = store
        self.url = url
        self.ssl = ssl
        self.id = os.urandom(8).hex()
        self.secret = b""
        self.relay: Relay | None = None
        self.where: dict[bytes, tuple[str, str]] = {}  # member key -> (coordinator id, url)
        self.drops: Counter[str] = Counter()  # of frames that came in over links
        self.refusals: Counter[str] = Counter()
        self._links: dict[str, _Link] = {}
        self._inbound: set[web.WebSocketResponse] = set()
        self._dirty: dict[bytes, bool] = {}  # presence to write: key -> connected here
        self._here: set[bytes] = set()  # members whose relay connection is here (recorded again on refresh)
        self._written = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._log_refusal = RefusalLog(log)
        self._store_failing = False

    def attach(self, app: web.Application) -> None:
        """Serve CLUSTER_PATH in `app` and run with it (the coordinator's relay joins on first use)."""
        app[CLUSTER] = self
        app.router.add_get(CLUSTER_PATH, self.handler)
        app.cleanup_ctx.append(self._lifetime)
        app.on_shutdown.append(self._shutdown)

    def serve(self, relay: Relay) -> None:
        """Forward `relay`'s frames for members connected elsewhere, and announce its members."""
        relay.remote = self.forward
        relay.presence = self.present
        self.relay = relay

    # --- presence ---------------------------------------------------------------------------------

    async def _lifetime(self, app: web.Application) -> AsyncIterator[None]:
        self.secret = await self.store.cluster_secret()
        self.store.add_presence_listener(self._heard)
        try:
            await self._load()
            if self.url is None:
                log.warning("cluster: no --cluster-url, and --listen gives none the other coordinators could reach "
                            "(an address on every interface, a loopback one, or port 0): members connected to this "
                            "coordinator's relay cannot be reached through the other coordinators' relays (it still "
                            "forwards to theirs); give --cluster-url http(s)://HOST:PORT, where the others reach it")
            else:
                log.info("cluster: coordinator %s forwards relay frames with the others; they reach it at %s",
                         self.id, self.url)
            self._tasks = [asyncio.create_task(self._write_presence()), asyncio.create_task(self._refresh())]
            yield
        finally:
            self.store.remove_presence_listener(self._heard)
            await self._stop()

    async def _stop(self) -> None:
        for task in [*self._tasks, *(link.task for link in self._links.values() if link.task is not None)]:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        self._links.clear()
        if self.url is not None:
            try:
                await self.store.drop_relay_presence(self.id)
            except StoreError as exc:
                log.warning("cluster: could not withdraw this coordinator's relay presence: %s", exc)

    async def _shutdown(self, app: web.Application) -> None:
        for ws in list(self._inbound):
            await ws.close(code=aiohttp.WSCloseCode.GOING_AWAY, message=b"shutting down")

    async def _load(self) -> None:
        where = {}
        for key, coordinator, url in await self.store.relay_presence():
            decoded = _member_key(key)
            if decoded is not None:
                where[decoded] = (coordinator, url)
        self.where = where
        places = dict(where.values())
        for coordinator in set(self._links) - places.keys():  # it holds no member now: no link to it
            self._unlink(coordinator)
        for coordinator, url in places.items():
            self._link_to(coordinator, url)

    async def _refresh(self) -> None:
        while True:
            await asyncio.sleep(PRESENCE_REFRESH)
            try:
                await self._check_presence()
            except StoreError as exc:
                log.warning("cluster: cannot read relay presence: %s", exc)

    async def _check_presence(self) -> None:
        """One refresh: beat, drop the rows of coordinators that are gone, read the map
        again, and record again each member here whose row is missing or another's."""
        now = int(time.time())
        if self.url is not None:
            await self.store.touch_relay_presence(self.id, now)
        for gone in await self.store.drop_stale_relay_presence(now - int(STALE_AFTER)):
            log.info("cluster: coordinator %s wrote no relay presence for %.0f s: its members' rows are dropped",
                     gone, STALE_AFTER)
        await self._load()
        if self.url is not None:
            for key in self._here:
                if self.where.get(key, ("",))[0] != self.id:
                    self._dirty.setdefault(key, True)
            if self._dirty:
                self._written.set()

    def _heard(self, key: str, coordinator: str, url: str | None) -> None:
        """An announcement (this coordinator's own too) of where a member's connection is."""
        if key == EVERY_KEY:
            self.where = {k: v for k, v in self.where.items() if v[0] != coordinator}
            self._unlink(coordinator)
            return
        decoded = _member_key(key)
        if decoded is None:
            return
        if url is not None:
            self.where[decoded] = (coordinator, url)
            self._link_to(coordinator, url)
        elif self.where.get(decoded, ("",))[0] == coordinator:  # not where it went meanwhile
            del self.where[decoded]

    def present(self, key: bytes, connected: bool) -> None:
        """The relay's hook: `key`'s connection came here or left (recorded in order, soon)."""
        if connected:
            self._here.add(key)
        else:
            self._here.discard(key)
        if self.url is not None:
            self._dirty[key] = connected
            self._written.set()

    async def _write_presence(self) -> None:
        delay = FIRST_RETRY
        while True:
            await self._written.wait()
            self._written.clear()
            while self._dirty:
                key = next(iter(self._dirty))
                connected = self._dirty.pop(key)
                try:
                    await self.store.set_relay_presence(_b64(key), self.id, self.url if connected else None,
                                                        int(time.time()))
                except StoreError as exc:
                    self._dirty.setdefault(key, connected)  # again, unless it changed meanwhile
                    if not self._store_failing:  # once until it works again
                        log.warning("cluster: cannot record relay presence (frames for members here from other "
                                    "coordinators are dropped meanwhile; retrying): %s", exc)
                    self._store_failing = True
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, LAST_RETRY)
                else:
                    self._store_failing = False
                    delay = FIRST_RETRY

    # --- forwarding -------------------------------------------------------------------------------

    def _link_to(self, coordinator: str, url: str) -> _Link | None:
        link = self._links.get(coordinator)
        if link is None and coordinator != self.id and len(self._links) < MAX_LINKS:
            link = self._links[coordinator] = _Link(self, coordinator, url)
            link.task = asyncio.get_running_loop().create_task(link.run())
        return link

    def _unlink(self, coordinator: str) -> None:
        link = self._links.pop(coordinator, None)
        if link is not None and link.task is not None:
            link.task.cancel()

    def forward(self, source: bytes, frame: bytes) -> str | None:
        """The relay's hook for a destination not connected here: None if passed to the
        coordinator holding it, else why not. The packet path: no logging, one copy."""
        destination = frame[:KEY_SIZE]
        place = self.where.get(destination)
        if place is None or place[0] == self.id:
            return NOT_CONNECTED
        link = self._links.get(place[0])
        if link is None:
            return LINK_DOWN
        return link.put(b"".join((destination, source, memoryview(frame)[KEY_SIZE:])))

    async def handler(self, request: web.Request) -> web.StreamResponse:
        """GET CLUSTER_PATH: another coordinator's link, once it proved the secret."""
        ws = web.WebSocketResponse(heartbeat=HEARTBEAT, max_msg_size=READ_LIMIT, timeout=CLOSE_TIMEOUT,
                                   compress=False)
        await ws.prepare(request)
        remote = request.remote or "?"
        mine = os.urandom(CHALLENGE_SIZE)
        try:
            await ws.send_str(json.dumps({"cluster": VERSION, "coordinator": self.id, "challenge": _b64(mine)}))
            message = await ws.receive(timeout=AUTH_TIMEOUT)
            hello = _parse(message.data)
            coordinator, theirs, claimed = (_text(hello, "coordinator"), _bytes(hello, "challenge", CHALLENGE_SIZE),
                                            _bytes(hello, "proof", PROOF_SIZE))
        except (ValueError, TimeoutError) as exc:
            self._refuse(remote, "malformed", str(exc) or "no authentication in time")
            return await self._closed(ws, MALFORMED)
        except ConnectionError:
            return ws
        if not hmac.compare_digest(claimed, proof(self.secret, b"client", mine, theirs)):
            self._refuse(remote, "bad proof", "its proof does not match this database's cluster "
                         "secret (a coordinator of another database, or not a coordinator)")
            return await self._closed(ws, AUTH_FAILED)
        await ws.send_str(json.dumps({"proof": _b64(proof(self.secret, b"server", theirs, mine))}))
        log.info("cluster: link from coordinator %s (%s)", coordinator, remote)
        self._inbound.add(ws)
        try:
            async for message in ws:
                if message.type is WSMsgType.BINARY:
                    self._take(message.data)
        finally:
            self._inbound.discard(ws)
        return ws

    def _refuse(self, remote: str, cause: str, detail: str) -> None:
        self.refusals[cause] += 1
        self._log_refusal(remote, cause, f"cluster: refused a link from {remote}: {detail}")

    @staticmethod
    async def _closed(ws: web.WebSocketResponse, code: int) -> web.WebSocketResponse:
        await ws.close(code=code, message=b"cluster authentication failed")
        return ws

    def _take(self, frame: bytes) -> None:
        """A frame from another coordinator: to its destination here, or a counted drop."""
        if not 2 * KEY_SIZE < len(frame) <= LINK_FRAME:
            self.drops["malformed frame"] += 1
        elif self.relay is None:
            self.drops[NOT_CONNECTED] += 1
        else:
            self.relay.deliver(frame[:KEY_SIZE], frame[KEY_SIZE:])

    def status(self) -> dict[str, Any]:
        return {"id": self.id, "url": self.url, "members_elsewhere": sum(1 for c, _ in self.where.values()
                                                                         if c != self.id),
                "links": {link.url: "up" if link.queue is not None else (link.error or "connecting")
                          for link in self._links.values()},
                "inbound": len(self._inbound), "drops": dict(self.drops), "refusals": dict(self.refusals)}


def _member_key(key: str) -> bytes | None:
    try:
        decoded = base64.b64decode(key, validate=True)
    except (binascii.Error, ValueError):
        return None
    return decoded if len(decoded) == KEY_SIZE else None


#: The cluster of a coordinator app, when it has one (tunnelmesh.coordinator.service finds it).
CLUSTER = web.AppKey("cluster", Cluster)
