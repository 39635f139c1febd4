"""The SSH and relay rungs in the daemon: what they know of the network, and their lifetimes.

`PeerMapDirectory` answers the SSH rung's two questions from the node's
verified peer map: is this SSH key a current member (server side), and where
and with which attested host key can that member be dialled (client side).
The coordinator only relays a member's SSH endpoint record; it is verified
against the member's own identity here, before anyone dials it.

`SshServer` and `RelayConnection` are actors holding the rungs open for the
daemon's lifetime; the links they make deliver straight into the data path.
`RelayPool` keeps one `RelayConnection` per relay that members serve (relay =
true), as the peer map offers them.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tunnelmesh.identity import NodeIdentity, PublicIdentity
from tunnelmesh.links.attest import AttestationError, NewestAttestations, SshEndpoint, verify_attestation
from tunnelmesh.links.relay import RelayClient, RelayGuard, relay_url
from tunnelmesh.links.ssh import SshRung, SshTarget, endpoint_targets
from tunnelmesh.membership import PeerMap

from .messages import SyncRelays
from .runtime import Actor

if TYPE_CHECKING:
    from .runtime import Supervisor

log = logging.getLogger("tunnelmesh.links")


#: Hosts of a member the SSH rung dials, in order: the address the coordinator saw, then its own.
SSH_HOSTS = 3

@dataclass
class Transports:
    """The daemon's non-UDP rungs (None when not available in this mode)."""

    ssh: SshRung | None = None
    relay: RelayClient | None = None  # the coordinator's
    #: Relays that members serve (relay = true), by URL, kept by actors.links.RelayPool.
    node_relays: dict[str, RelayClient] = field(default_factory=dict)

    def relays(self) -> list[RelayClient]:
        return ([self.relay] if self.relay is not None else []) + list(self.node_relays.values())


class PeerMapDirectory:
    """The SSH rung's view of the members, from the verified peer map."""

    def __init__(self, peer_map: PeerMap, clock: Callable[[], float] = time.time) -> None:
        self.peer_map = peer_map
        self.clock = clock  # wall time, for the records' issue times
        self._by_ssh_key: dict[str, bytes] = {}
        self._indexed_version = -1
        self._verified: dict[bytes, tuple[str, SshEndpoint | None]] = {}  # wg key -> (record JSON, result)
        self._newest = NewestAttestations()  # an older record than one seen is a replay

    def member_by_ssh_key(self, ssh_public_key: str) -> bytes | None:
        peer_map = self.peer_map
        if self._indexed_version != peer_map.version or len(self._by_ssh_key) != len(peer_map.members):
            self._by_ssh_key = {m.identity.ssh_public_key: key for key, m in peer_map.members.items()}
            self._indexed_version = peer_map.version
        key = self._by_ssh_key.get(ssh_public_key)
        return key if key is not None and key in peer_map.members else None

    def endpoint(self, wg_key: bytes) -> SshEndpoint | None:
        """The member's SSH endpoint record, verified once per version of it, and only if
        no newer one of the member's was seen (else None: not dialled, logged once)."""
        member = self.peer_map.members.get(wg_key)
        endpoints = self.peer_map.endpoints.get(wg_key)
        if member is None or endpoints is None or endpoints.ssh is None:
            return None
        record = json.dumps(endpoints.ssh, sort_keys=True)
        cached = self._verified.get(wg_key)
        if cached is not None and cached[0] == record:
            return cached[1]
        try:
            verified: SshEndpoint | None = self._newest.check(
                wg_key, verify_attestation(endpoints.ssh, member.identity), self.clock())
        except AttestationError as exc:
            log.warning("%s: SSH endpoint record refused: %s", member.name, exc)
            verified = None
        self._verified[wg_key] = (record, verified)
        return verified

    def check_all(self) -> None:
        """Verify every member's SSH endpoint record now (after each map change), not only
        when dialled: a record is then seen as soon as it is served, and an older one served
        after it is refused even if no one dialled in between."""
        for wg_key in list(self.peer_map.members):
            self.endpoint(wg_key)

    def is_member(self, wg_key: bytes) -> bool:
        return wg_key in self.peer_map.members

    def targets(self, wg_key: bytes) -> list[SshTarget]:
        endpoint = self.endpoint(wg_key)
        endpoints = self.peer_map.endpoints.get(wg_key)
        if endpoint is None or endpoints is None or not endpoints.addresses:
            return []
        # Where the coordinator saw the member first, then the member's own addresses; tried
        # in turn (5 s each at worst), so only the first few.
        hosts = list(dict.fromkeys(host for host, _ in endpoints.candidates(self.peer_map.network)))
        return [target for host in hosts[:SSH_HOSTS] for target in endpoint_targets(endpoint, host)]


class SshServer(Actor):
    """Holds the SSH rung (server and dialled links) open; started before the actors run,
    so a busy port is a start-up error."""

    name = "ssh"
    policy = "fatal"

    def __init__(self, rung: SshRung) -> None:
        super().__init__()
        self.rung = rung

    async def run(self) -> None:
        await asyncio.Event().wait()

    async def stop(self) -> None:
        await self.rung.close()


class RelayConnection(Actor):
    """The node's one outbound WebSocket to a relay; reconnects with backoff on its own."""

    name = "relay"
    policy = "restart"

    def __init__(self, client: RelayClient, name: str = "relay") -> None:
        super().__init__()
        self.client = client
        self.name = name

    async def run(self) -> None:
        await self.client.run()

    def status(self) -> dict[str, Any]:
        return self.client.status()


#: Relays served by members that a node connects to, besides the coordinator's: each is
#: one WebSocket kept open, so a map offering many cannot make a node hold many.
MAX_NODE_RELAYS = 4



class RelayPool(Actor):
    """The node's connections to relays that members serve, as the verified peer map
    lists them (up to MAX_NODE_RELAYS, by member name; one per relay however it is
    spelt, never the coordinator's again), plus `own` (this node's own relay, reached on
    loopback, so members that reach only it can reach this node too). `clients` is
    shared with the sessions, which probe through every connected relay.

    A member's relay is made with a `RelayGuard` (checked where it leads when it connects:
    a private address only if the member registered it, as its peer map endpoints say
    then); `own` with none, as the node's own config chose it."""

    name = "relays"
    policy = "restart"

    def __init__(self, peer_map: PeerMap, own: tuple[str, str] | None, coordinator: str,
                 make: Callable[[str, str, RelayGuard | None], RelayClient], clients: dict[str, RelayClient],
                 supervisor: Supervisor) -> None:
        super().__init__()
        self.peer_map = peer_map
        self.own = own  # (url, relay id)
        self.coordinator = relay_url(coordinator)
        self.make = make  # (url, relay id, guard) -> client
        self.clients = clients
        self.supervisor = supervisor
        self._actors: dict[str, RelayConnection] = {}

    def wanted(self) -> dict[str, str]:
        """url -> relay id (the member's key in base64) of the relays to hold."""
        offered = sorted((m.name, e.relay, base64.b64encode(key).decode()) for key, m in self.peer_map.members.items()
                         if (e := self.peer_map.endpoints.get(key)) is not None and e.relay is not None)
        urls = dict([self.own]) if self.own is not None else {}
        seen = {self.coordinator}
        for _, url, relay in offered:
            if len(urls) >= MAX_NODE_RELAYS + (self.own is not None):
                break
            if relay_url(url) not in seen:
                seen.add(relay_url(url))
                urls[url] = relay
        return urls

    async def setup(self) -> None:
        await self._sync()

    async def handle(self, message: Any) -> Any:
        if isinstance(message, SyncRelays):
            await self._sync()
            return None
        raise ValueError(f"unknown message {type(message).__name__}")

    async def _sync(self) -> None:
        wanted = self.wanted()
        for url in [u for u, client in self.clients.items() if wanted.get(u) != client.relay]:
            log.info("relay %s: no longer offered", url)
            await self.supervisor.remove(self._actors.pop(url))  # its links go down with it
            self.clients.pop(url).close()
        for url, relay in wanted.items():
            if url not in self._actors:
                client = self.clients[url] = self.make(url, relay, self.guard(url, relay))
                self._actors[url] = connection = RelayConnection(client, name=f"relay {url}")
                self.supervisor.add(connection)


    def guard(self, url: str, relay: str) -> RelayGuard | None:
        """The check of where a member's relay leads: against that member's registered
        addresses as they are when it connects (none for this node's own relay)."""
        if self.own is not None and url == self.own[0]:
            return None
        key = base64.b64decode(relay)

        def registered() -> frozenset[str]:
            endpoints = self.peer_map.endpoints.get(key)
            return frozenset(host for host, _ in endpoints.addresses) if endpoints is not None else frozenset()

        return RelayGuard(registered)


def member_identities(peer_map: PeerMap, own: NodeIdentity) -> Callable[[bytes], PublicIdentity | None]:
    """Who may use this node's relay: the current members and the node itself."""
    own_key = own.public.wg_public_key

    def identity_for(wg_key: bytes) -> PublicIdentity | None:
        if wg_key == own_key:
            return own.public
        member = peer_map.members.get(wg_key)
        return member.identity if member is not None else None

    return identity_for
