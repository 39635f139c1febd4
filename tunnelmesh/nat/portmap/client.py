"""Asking the default gateway for a UDP port mapping: PCP, then NAT-PMP, then UPnP IGD,
each bounded in time. The first that grants a mapping is used again to renew and to
delete it.

PCP and NAT-PMP requests go from their own ephemeral socket to the gateway's port 5351
(RFC 6886/6887 allow any client port; the mapping is for the WireGuard port named in the
request), retransmitted at 250 ms doubling, as both RFCs say, but only a few times: a
network without a PCP/NAT-PMP server must not hold the mapper up for a minute.
"""

from __future__ import annotations

import asyncio
import os
import random
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from pyroute2 import AsyncIPRoute

from . import natpmp, pcp
from .upnp import CONFLICT_IN_MAPPING_ENTRY, UpnpGateway, UpnpUnavailable

PCP, NAT_PMP, UPNP = "pcp", "nat-pmp", "upnp"
PROTOCOLS = (PCP, NAT_PMP, UPNP)
SERVER_PORT = 5351
FIRST_WAIT = 0.25  # RFC 6886 3.1 / RFC 6887 8.1.1: the first retransmission interval
TRIES = 4  # 0.25 + 0.5 + 1 + 2: 3.75 s without an answer means no server
MAIN_TABLE = 254
#: UPnP: external ports tried after the first is mapped to another host (718), e.g. another
#: node behind the same router holding the WireGuard port; each is one AddPortMapping.
CONFLICT_TRIES = 8
RANDOM_PORTS = (1024, 65535)
T = TypeVar("T")


class PortMapError(Exception):
    """No protocol gave a mapping; says why for each protocol tried."""

    def __init__(self, reasons: dict[str, str]) -> None:
        self.reasons = reasons
        super().__init__("; ".join(f"{name}: {why}" for name, why in reasons.items()) or "no protocol to try")


class NoAnswer(Exception):
    """Nothing answered (or something refused the datagram: nothing listens)."""


@dataclass(frozen=True, slots=True)
class Mapping:
    """A mapping the gateway granted: UDP external_address:external_port to
    local_address:internal_port, for `lifetime` seconds from when it was granted."""

    protocol: str  # one of PROTOCOLS
    gateway: str
    local_address: str  # our address towards the gateway
    internal_port: int
    external_address: str
    external_port: int
    lifetime: int
    nonce: bytes = b""  # PCP: renewing and deleting reuse the mapping's nonce


async def default_gateway() -> str | None:
    """The IPv4 default route's gateway in the main table, or None."""
    async with AsyncIPRoute() as ipr:
        async for route in await ipr.route("dump", family=socket.AF_INET):
            if route["dst_len"] == 0 and route.get("table") == MAIN_TABLE and route.get("RTA_GATEWAY"):
                return str(route.get("RTA_GATEWAY"))
    return None


def local_address_towards(gateway: str) -> str:
    """Our source address for packets to `gateway` (a connected UDP socket sends nothing)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.connect((gateway, SERVER_PORT))
        return str(sock.getsockname()[0])


#: What one protocol's failure raises (the next protocol is tried).
MAP_ERRORS = (NoAnswer, natpmp.NatPmpRefused, natpmp.NatPmpError, pcp.PcpRefused, pcp.PcpError,
              pcp.PcpUnsupportedVersion, UpnpUnavailable, OSError)


class _Answers(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes | Exception] = asyncio.Queue(maxsize=16)

    def datagram_received(self, data: bytes, addr: object) -> None:
        if not self.queue.full():
            self.queue.put_nowait(data)

    def error_received(self, exc: Exception) -> None:
        if not self.queue.full():
            self.queue.put_nowait(exc)


async def exchange(local_address: str, gateway: str, request: bytes, parse: Callable[[bytes], T],
                   tries: int = TRIES, first_wait: float = FIRST_WAIT) -> T:
    """Send `request` to gateway:5351 until `parse` accepts an answer. Datagrams it
    rejects with ValueError (garbage, answers to other requests) are dropped; its other
    exceptions (a refusal) end the exchange. NoAnswer after `tries` sends."""
    loop = asyncio.get_running_loop()
    transport, answers = await loop.create_datagram_endpoint(
        _Answers, local_addr=(local_address, 0), remote_addr=(gateway, SERVER_PORT))
    try:
        wait = first_wait
        for _ in range(tries):
            transport.sendto(request)
            deadline = loop.time() + wait
            while (left := deadline - loop.time()) > 0:
                try:
                    async with asyncio.timeout(left):
                        answer = await answers.queue.get()
                except TimeoutError:
                    break
                if isinstance(answer, ConnectionRefusedError):
                    raise NoAnswer(f"{gateway}:{SERVER_PORT} refused (nothing listens)")
                if isinstance(answer, Exception):
                    raise NoAnswer(f"{gateway}:{SERVER_PORT}: {answer}")
                try:
                    return parse(answer)
                except ValueError:
                    continue  # not an answer to this request: keep waiting
            wait *= 2
        raise NoAnswer(f"no answer from {gateway}:{SERVER_PORT} after {tries} tries")
    finally:
        transport.close()


class PortMapClient:
    """Maps one UDP port at one gateway. `protocols`: which to try, in order."""

    def __init__(self, gateway: str, local_address: str, protocols: Sequence[str] = PROTOCOLS) -> None:
        unknown = set(protocols) - set(PROTOCOLS)
        if unknown:
            raise ValueError(f"unknown port mapping protocols {sorted(unknown)}; known: {', '.join(PROTOCOLS)}")
        self.gateway = gateway
        self.local_address = local_address
        self.protocols = tuple(protocols)
        self._upnp: UpnpGateway | None = None

    async def map(self, internal_port: int, lifetime: int, previous: Mapping | None = None) -> Mapping:
        """A mapping of UDP `internal_port`; `previous` (a renewal) is asked of its own
        protocol first, for the same external port. PortMapError when none grants one."""
        order = self.protocols
        if previous is not None and previous.protocol in order:
            order = (previous.protocol, *(p for p in order if p != previous.protocol))
        reasons: dict[str, str] = {}
        for protocol in order:
            same = previous if previous is not None and previous.protocol == protocol else None
            try:
                return await self._MAPPERS[protocol](self, internal_port, lifetime, same)
            except MAP_ERRORS as exc:
                reasons[protocol] = str(exc) or type(exc).__name__
        raise PortMapError(reasons)

    async def delete(self, mapping: Mapping) -> None:
        """Ask the gateway to remove `mapping` (lifetime 0). Errors are the caller's to log."""
        if mapping.protocol == PCP:
            request = pcp.map_request(mapping.nonce, self.local_address, mapping.internal_port, 0)
            await exchange(self.local_address, self.gateway, request,
                           lambda data: pcp.parse_map(data, mapping.nonce, mapping.internal_port))
        elif mapping.protocol == NAT_PMP:
            request = natpmp.map_request(mapping.internal_port, 0, 0)
            await exchange(self.local_address, self.gateway, request,
                           lambda data: natpmp.parse_map(data, mapping.internal_port))
        else:
            await (await self._upnp_gateway()).delete_udp(mapping.external_port)

    async def _map_pcp(self, internal_port: int, lifetime: int, previous: Mapping | None) -> Mapping:
        nonce = previous.nonce if previous is not None else os.urandom(pcp.NONCE_SIZE)
        suggested = previous.external_port if previous is not None else internal_port
        request = pcp.map_request(nonce, self.local_address, internal_port, lifetime, suggested)
        answer = await exchange(self.local_address, self.gateway, request,
                                lambda data: pcp.parse_map(data, nonce, internal_port))
        return Mapping(PCP, self.gateway, self.local_address, internal_port, answer.external_address,
                       answer.external_port, answer.lifetime, nonce)

    async def _map_natpmp(self, internal_port: int, lifetime: int, previous: Mapping | None) -> Mapping:
        external = await exchange(self.local_address, self.gateway, natpmp.external_address_request(),
                                  natpmp.parse_external_address)
        suggested = previous.external_port if previous is not None else internal_port
        request = natpmp.map_request(internal_port, suggested, lifetime)
        answer = await exchange(self.local_address, self.gateway, request,
                                lambda data: natpmp.parse_map(data, internal_port))
        return Mapping(NAT_PMP, self.gateway, self.local_address, internal_port, external.address,
                       answer.external_port, answer.lifetime)

    async def _map_upnp(self, internal_port: int, lifetime: int, previous: Mapping | None) -> Mapping:
        """The same external port as before (a renewal) or as the internal one; if the
        gateway has it mapped to another host, random ones (IGD v1 has no AddAnyPortMapping)."""
        gateway = await self._upnp_gateway()
        first = previous.external_port if previous is not None else internal_port
        candidates = [first, *(random.randint(*RANDOM_PORTS) for _ in range(CONFLICT_TRIES))]
        try:
            for tried, external_port in enumerate(candidates, 1):
                try:
                    await gateway.add_udp(self.local_address, internal_port, external_port, lifetime)
                    break
                except UpnpUnavailable as exc:
                    if exc.code != CONFLICT_IN_MAPPING_ENTRY or tried == len(candidates):
                        raise
            external_address = await gateway.external_address()
        except UpnpUnavailable as exc:
            if exc.code is None:
                self._upnp = None  # found again next time: the router may have restarted on another HTTP port
            raise
        return Mapping(UPNP, self.gateway, self.local_address, internal_port, external_address, external_port, lifetime)

    async def _upnp_gateway(self) -> UpnpGateway:
        if self._upnp is None:
            self._upnp = await UpnpGateway.discover(self.local_address, self.gateway)
        return self._upnp

    _MAPPERS = {PCP: _map_pcp, NAT_PMP: _map_natpmp, UPNP: _map_upnp}
