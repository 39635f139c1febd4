"""The port mapper actor: asks the default gateway for a UDP mapping of the node's
WireGuard port (PCP, then NAT-PMP, then UPnP IGD; tunnelmesh.nat.portmap) and keeps it.

`mapping` is the address peers may use, a `Candidate` of kind "mapped" (None: no
mapping now), replaced (never changed); the callbacks it was given (the coordinator
client's `set_mapped`) are called with it whenever it changes, not on a renewal that
keeps it. A granted mapping is renewed at half its lifetime, by the protocol that
granted it (same external port, same PCP nonce). When nothing grants one (no gateway,
no server answers, a refusal) it tries again after a back-off doubling from RETRY_FIRST
to RETRY_MAX, and says so once per distinct reason: a network without any of the three
protocols costs one log line and a few datagrams an hour. Any other exception (a
library's bug, a gateway's odd answer) is handled the same way, with its traceback, so
no dead task leaves the mapping unrenewed. `error` says why there is no mapping
(netcheck shows it). A new gateway or a new local address starts afresh (the old
mapping is on another network). On stop (`down`) the mapping is deleted (lifetime 0),
bounded by DELETE_TIMEOUT.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence

from pyroute2.netlink.exceptions import NetlinkError

from tunnelmesh.nat.portmap.client import (
    MAP_ERRORS, PROTOCOLS, Mapping, PortMapClient, PortMapError, default_gateway, local_address_towards,
)
from tunnelmesh.nat.report import MAPPED, Candidate

from .runtime import Actor

log = logging.getLogger("tunnelmesh.nat")

DEFAULT_LIFETIME = 7200  # seconds asked for
ATTEMPT_TIMEOUT = 30.0  # one attempt of every protocol (each is bounded on its own too)
DELETE_TIMEOUT = 5.0
RETRY_FIRST, RETRY_MAX = 15.0, 900.0
MIN_RENEW = 5.0  # however short the lifetime granted, no faster renewals than this


class NoGateway(Exception):
    pass


#: How an attempt fails on a network without a mapping; anything else is logged with its traceback.
EXPECTED = (NoGateway, PortMapError, TimeoutError, *MAP_ERRORS)


class PortMapper(Actor):
    name = "port-mapper"
    policy = "restart"

    def __init__(self, port: int, on_change: Sequence[Callable[[Candidate | None], None]] = (), *,
                 protocols: Sequence[str] = PROTOCOLS, lifetime: int = DEFAULT_LIFETIME) -> None:
        super().__init__()
        self.port = port  # the WireGuard UDP port to map
        self.on_change = list(on_change)
        self.protocols = tuple(protocols)
        self.lifetime = lifetime
        self.mapping: Candidate | None = None
        self.granted: Mapping | None = None  # what the gateway granted (protocol, lifetime, ...)
        self.error: str | None = None  # why there is no mapping now
        self._client: PortMapClient | None = None

    async def setup(self) -> None:
        self.start_task(self._keep(), name="keep mapping")

    async def _keep(self) -> None:
        retry = RETRY_FIRST
        while True:
            try:
                async with asyncio.timeout(ATTEMPT_TIMEOUT):
                    granted = await self._ask()
            except EXPECTED as exc:
                self._failed(str(exc) or type(exc).__name__)
            except Exception as exc:  # noqa: BLE001 - a library's bug, a gateway's odd answer: keep renewing
                self._client = None  # start afresh (discover the gateway's IGD again)
                self._failed(f"unexpected {type(exc).__name__}: {exc}", unexpected=exc)
            else:
                retry = RETRY_FIRST
                self._got(granted)
                await asyncio.sleep(max(granted.lifetime / 2, MIN_RENEW))
                continue
            await asyncio.sleep(retry)
            retry = min(retry * 2, RETRY_MAX)

    async def _ask(self) -> Mapping:
        try:
            gateway = await default_gateway()
        except NetlinkError as exc:
            raise NoGateway(f"cannot read the routes: {exc}") from None
        if gateway is None:
            raise NoGateway("no IPv4 default route")
        local = local_address_towards(gateway)
        client = self._client
        if client is None or (client.gateway, client.local_address) != (gateway, local):
            client = self._client = PortMapClient(gateway, local, self.protocols)
            self.granted = None  # another network: the old mapping is not this gateway's
        return await client.map(self.port, self.lifetime, self.granted)

    def _got(self, granted: Mapping) -> None:
        renewal = self.granted is not None
        self.granted, self.error = granted, None
        candidate = Candidate(granted.external_address, granted.external_port, MAPPED)
        if candidate != self.mapping:
            log.info("nat: port mapping UDP %s:%d -> %s:%d by %s (%d s)", granted.external_address,
                     granted.external_port, granted.local_address, granted.internal_port, granted.protocol,
                     granted.lifetime)
            self._publish(candidate)
        elif renewal:
            log.debug("nat: port mapping renewed by %s (%d s)", granted.protocol, granted.lifetime)

    def _failed(self, why: str, unexpected: Exception | None = None) -> None:
        self.granted = None
        if why != self.error:
            log.info("nat: no port mapping: %s", why, exc_info=unexpected)
        self.error = why
        if self.mapping is not None:
            self._publish(None)

    def _publish(self, candidate: Candidate | None) -> None:
        self.mapping = candidate
        for callback in self.on_change:
            callback(candidate)

    async def stop(self) -> None:
        """Delete the mapping (the loop is stopped by now: nothing renews it)."""
        granted, client = self.granted, self._client
        if granted is None or client is None:
            return
        self.granted = None
        try:
            async with asyncio.timeout(DELETE_TIMEOUT):
                await client.delete(granted)
            log.info("nat: port mapping UDP %s:%d deleted", granted.external_address, granted.external_port)
        except (TimeoutError, *MAP_ERRORS) as exc:
            log.warning("nat: port mapping UDP %s:%d not deleted (%s); it expires within %d s",
                        granted.external_address, granted.external_port, exc or type(exc).__name__, granted.lifetime)
