"""The SSH and relay rungs in the daemon: what they know of the network, and their lifetimes.

`PeerMapDirectory` answers the SSH rung's two questions from the node's
verified peer map (the coordinator client's current snapshot of it): is this SSH
key a current member (server side), and where and with which attested host key
can that member be dialled (client side).
The coordinator only relays a member's SSH endpoint record; it is verified
against the member's own identity here, before anyone dials it.

`SshServer` and `RelayConnection` are actors holding the rungs open for the
daemon's lifetime; the links they make deliver straight into the data path.
`RelayPool` keeps one `RelayConnection` per relay that members serve (relay =
true), as the peer map offers them, and is the one writer of
`Transports.node_relays`, which it replaces (never changes in place) so the
sessions reading it always see a whole set.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from tunnelmesh.clock import SYSTEM_CLOCK, Clock

from .messages import SshHost, SyncRelays
from .runtime import Actor

# The rungs themselves (asyncssh, aiohttp) are imported where coordinator mode first uses
# them: every node imports `Transports`, a static node needs nothing else of this module.
if TYPE_CHECKING:
    from tunnelmesh.identity import NodeIdentity, PublicIdentity
    from tunnelmesh.links.attest import SshEndpoint
    from tunnelmesh.links.relay import RelayClient, RelayGuard
    from tunnelmesh.links.ssh import SshRung, SshTarget
    from tunnelmesh.membership import MapSnapshot

    from .runtime import Supervisor

log = logging.getLogger("tunnelmesh.links")


#: Hosts of a member the SSH rung dials, in order: the address the coordinator saw, then its own.
SSH_HOSTS = 3

@dataclass
class Transports:
    """The daemon's non-UDP rungs (None when not available in this mode)."""

    ssh: SshRung | None = None
    relay: RelayClient | None = None  # the coordinator's
    #: Relays that members serve (relay = true), by URL: replaced as a whole by
    #: actors.links.RelayPool, its one writer, never changed in place.
    node_relays: Mapping[str, RelayClient] = field(default_factory=lambda: MappingProxyType({}))

    def relays(self) -> tuple[RelayClient, ...]:
        return ((self.relay,) if self.relay is not None else ()) + tuple(self.node_relays.values())


class PeerMapDirectory:
    """The SSH rung's view of the members: `current()` is the peer map's latest snapshot."""

    def __init__(self, current: Callable[[], MapSnapshot], clock: Clock = SYSTEM_CLOCK) -> None:
        from tunnelmesh.links.attest import NewestAttestations

        self.current = current
        self.clock = clock  # wall time, for the records' issue times
        self._by_ssh_key: dict[str, bytes] = {}
        self._indexed: MapSnapshot | None = None  # the snapshot _by_ssh_key was made from
        self._verified: dict[bytes, tuple[str, SshEndpoint | None]] = {}  # wg key -> (record JSON, result)
        self._newest = NewestAttestations()  # an older record than one seen is a replay
        self._refused: dict[bytes, str] = {}  # wg key -> why its current record was refused

    def member_by_ssh_key(self, ssh_public_key: str) -> bytes | None:
        snapshot = self.current()
        if snapshot is not self._indexed:
            self._by_ssh_key = {m.identity.ssh_public_key: key for key, m in snapshot.members.items()}
            self._indexed = snapshot
        return self._by_ssh_key.get(ssh_public_key)

    def endpoint(self, wg_key: bytes) -> SshEndpoint | None:
        """The member's SSH endpoint record, verified once per version of it, and only if
        no newer one of the member's was seen (else None: not dialled, logged once)."""
        return self._endpoint(self.current(), wg_key)

    def _endpoint(self, snapshot: MapSnapshot, wg_key: bytes) -> SshEndpoint | None:
        from tunnelmesh.links.attest import AttestationError, verify_attestation

        member = snapshot.members.get(wg_key)
        endpoints = snapshot.endpoints.get(wg_key)
        if member is None or endpoints is None or endpoints.ssh is None:
            return None
        record = json.dumps(endpoints.ssh, sort_keys=True)
        cached = self._verified.get(wg_key)
        if cached is not None and cached[0] == record:
            return cached[1]
        try:
            verified: SshEndpoint | None = self._newest.check(
                wg_key, verify_attestation(endpoints.ssh, member.identity), self.clock.wall())
        except AttestationError as exc:
            log.warning("%s: SSH endpoint record refused: %s", member.name, exc)
            verified = None
            self._refused[wg_key] = str(exc)
        self._verified[wg_key] = (record, verified)
        return verified

    def ssh_hosts(self, own_wg_key: bytes) -> tuple[SshHost, ...]:
        """Every other member's sshd host keys, as `tunnelmesh ssh-config` writes them: only
        those its identity signed in its newest record (the refused ones say why)."""
        snapshot = self.current()
        hosts = []
        for wg_key, member in snapshot.members.items():
            if wg_key == own_wg_key:
                continue
            endpoint = self._endpoint(snapshot, wg_key)
            keys = endpoint.sshd_host_keys if endpoint is not None else ()
            if keys:
                why = None
            elif endpoint is not None:
                why = "its daemon attests no sshd host keys ([transports] sshd_host_keys)"
            elif wg_key in snapshot.endpoints and snapshot.endpoints[wg_key].ssh is not None:
                why = f"its SSH endpoint record was refused: {self._refused.get(wg_key, 'see the log')}"
            else:
                why = "it registered no SSH endpoint record (not connected, or no sshd host keys)"
            identity_key = " ".join(member.identity.ssh_public_key.split()[:2])
            hosts.append(SshHost(name=member.name, mesh_ip=str(member.ipv4), mesh_ipv6=str(member.ipv6),
                                 fingerprint=member.identity.fingerprint, host_keys=keys,
                                 identity_is_host_key=identity_key in keys, why_none=why))
        return tuple(sorted(hosts, key=lambda host: host.name))

    def check_all(self) -> None:
        """Verify every member's SSH endpoint record now (after each map change), not only
        when dialled: a record is then seen as soon as it is served, and an older one served
        after it is refused even if no one dialled in between."""
        snapshot = self.current()
        for wg_key in snapshot.members:
            self._endpoint(snapshot, wg_key)

    def is_member(self, wg_key: bytes) -> bool:
        return wg_key in self.current().members

    def targets(self, wg_key: bytes) -> list[SshTarget]:
        from tunnelmesh.links.ssh import endpoint_targets

        snapshot = self.current()
        endpoint = self._endpoint(snapshot, wg_key)
        endpoints = snapshot.endpoints.get(wg_key)
        if endpoint is None or endpoints is None or not endpoints.addresses:
            return []
        # Where the coordinator saw the member first, then the member's own addresses; tried
        # in turn (5 s each at worst), so only the first few.
        hosts = list(dict.fromkeys(host for host, _ in endpoints.candidates(snapshot.network)))
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
    (`current()`, its latest snapshot) lists them (up to MAX_NODE_RELAYS, by member name;
    one per relay however it is spelt, never the coordinator's again), plus `own` (this
    node's own relay, reached on loopback, so members that reach only it can reach this
    node too). After each change it puts the clients in `transports.node_relays` as a new
    read-only mapping: the sessions probe through every connected relay.

    A member's relay is made with a `RelayGuard` (checked where it leads when it connects:
    a private address only if the member registered it, as its peer map endpoints say
    then); `own` with none, as the node's own config chose it."""

    name = "relays"
    policy = "restart"

    def __init__(self, current: Callable[[], MapSnapshot], own: tuple[str, str] | None, coordinator: str,
                 make: Callable[[str, str, RelayGuard | None], RelayClient], transports: Transports,
                 supervisor: Supervisor) -> None:
        from tunnelmesh.links.relay import relay_url

        super().__init__()
        self.current = current
        self.own = own  # (url, relay id)
        self.coordinator = relay_url(coordinator)
        self.make = make  # (url, relay id, guard) -> client
        self.transports = transports
        self.supervisor = supervisor
        self._clients: dict[str, RelayClient] = {}
        self._actors: dict[str, RelayConnection] = {}

    def wanted(self) -> dict[str, str]:
        """url -> relay id (the member's key in base64) of the relays to hold."""
        from tunnelmesh.links.relay import relay_url

        snapshot = self.current()
        offered = sorted((m.name, e.relay, base64.b64encode(key).decode()) for key, m in snapshot.members.items()
                         if (e := snapshot.endpoints.get(key)) is not None and e.relay is not None)
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
        before = dict(self._clients)
        for url in [u for u, client in self._clients.items() if wanted.get(u) != client.relay]:
            log.info("relay %s: no longer offered", url)
            await self.supervisor.remove(self._actors.pop(url))  # its links go down with it
            self._clients.pop(url).close()
        for url, relay in wanted.items():
            if url not in self._actors:
                client = self._clients[url] = self.make(url, relay, self.guard(url, relay))
                self._actors[url] = connection = RelayConnection(client, name=f"relay {url}")
                self.supervisor.add(connection)
        if self._clients != before:
            self.transports.node_relays = MappingProxyType(dict(self._clients))

    def guard(self, url: str, relay: str) -> RelayGuard | None:
        """The check of where a member's relay leads: against that member's registered
        addresses as they are when it connects (none for this node's own relay)."""
        from tunnelmesh.links.relay import RelayGuard

        if self.own is not None and url == self.own[0]:
            return None
        key = base64.b64decode(relay)

        def registered() -> frozenset[str]:
            endpoints = self.current().endpoints.get(key)
            return frozenset(host for host, _ in endpoints.addresses) if endpoints is not None else frozenset()

        return RelayGuard(registered)


def member_identities(current: Callable[[], MapSnapshot], own: NodeIdentity
                      ) -> Callable[[bytes], Awaitable[PublicIdentity | None]]:
    """Who may use this node's relay: the members of the peer map's latest snapshot
    (`current()`) and the node itself (the relay awaits it: the coordinator's reads a database)."""
    own_key = own.public.wg_public_key

    async def identity_for(wg_key: bytes) -> PublicIdentity | None:
        if wg_key == own_key:
            return own.public
        member = current().members.get(wg_key)
        return member.identity if member is not None else None

    return identity_for
