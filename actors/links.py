"""The SSH and relay rungs in the daemon: what they know of the network, and their lifetimes.

`PeerMapDirectory` answers the SSH rung's two questions from the node's
verified peer map: is this SSH key a current member (server side), and where
and with which attested host key can that member be dialled (client side).
The coordinator only relays a member's SSH endpoint record; it is verified
against the member's own identity here, before anyone dials it.

`SshServer` and `RelayConnection` are actors holding the rungs open for the
daemon's lifetime; the links they make deliver straight into the data path.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from tunnelmesh.links.attest import AttestationError, SshEndpoint, verify_attestation
from tunnelmesh.links.relay import RelayClient
from tunnelmesh.links.ssh import SshRung, SshTarget, endpoint_targets
from tunnelmesh.membership import PeerMap

from .runtime import Actor

log = logging.getLogger("tunnelmesh.links")


class PeerMapDirectory:
    """The SSH rung's view of the members, from the verified peer map."""

    def __init__(self, peer_map: PeerMap) -> None:
        self.peer_map = peer_map
        self._by_ssh_key: dict[str, bytes] = {}
        self._indexed_version = -1
        self._verified: dict[bytes, tuple[str, SshEndpoint | None]] = {}  # wg key -> (record JSON, result)

    def member_by_ssh_key(self, ssh_public_key: str) -> bytes | None:
        peer_map = self.peer_map
        if self._indexed_version != peer_map.version or len(self._by_ssh_key) != len(peer_map.members):
            self._by_ssh_key = {m.identity.ssh_public_key: key for key, m in peer_map.members.items()}
            self._indexed_version = peer_map.version
        key = self._by_ssh_key.get(ssh_public_key)
        return key if key is not None and key in peer_map.members else None

    def endpoint(self, wg_key: bytes) -> SshEndpoint | None:
        """The member's SSH endpoint record, verified once per version of it."""
        member = self.peer_map.members.get(wg_key)
        endpoints = self.peer_map.endpoints.get(wg_key)
        if member is None or endpoints is None or endpoints.ssh is None:
            return None
        record = json.dumps(endpoints.ssh, sort_keys=True)
        cached = self._verified.get(wg_key)
        if cached is not None and cached[0] == record:
            return cached[1]
        try:
            verified: SshEndpoint | None = verify_attestation(endpoints.ssh, member.identity)
        except AttestationError as exc:
            log.warning("%s: SSH endpoint record refused: %s", member.name, exc)
            verified = None
        self._verified[wg_key] = (record, verified)
        return verified

    def is_member(self, wg_key: bytes) -> bool:
        return wg_key in self.peer_map.members

    def targets(self, wg_key: bytes) -> list[SshTarget]:
        endpoint = self.endpoint(wg_key)
        endpoints = self.peer_map.endpoints.get(wg_key)
        if endpoint is None or endpoints is None or not endpoints.addresses:
            return []
        return endpoint_targets(endpoint, endpoints.addresses[0][0])  # where the coordinator saw the member


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
    """The node's one outbound WebSocket to the relay; reconnects with backoff on its own."""

    name = "relay"
    policy = "restart"

    def __init__(self, client: RelayClient) -> None:
        super().__init__()
        self.client = client

    async def run(self) -> None:
        await self.client.run()

    def status(self) -> dict[str, Any]:
        return self.client.status()
