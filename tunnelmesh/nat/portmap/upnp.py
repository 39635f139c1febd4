"""UPnP IGD port mapping over async-upnp-client (its IgdDevice profile): SSDP discovery of
the gateway's InternetGatewayDevice, GetExternalIPAddress, AddPortMapping and
DeletePortMapping.

Only the default gateway's own device is used: the M-SEARCH goes unicast to the gateway's
port 1900 (UDA 1.1 1.3.2), not to the SSDP multicast group, so no other LAN host hears it,
and an answer from any other host is ignored. Every step is bounded in time.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Awaitable
from typing import TypeVar
from urllib.parse import urlsplit

from async_upnp_client.aiohttp import AiohttpRequester
from async_upnp_client.client_factory import UpnpFactory
from async_upnp_client.exceptions import UpnpActionError, UpnpError
from async_upnp_client.profiles.igd import IgdDevice
from async_upnp_client.search import SsdpSearchListener
from async_upnp_client.ssdp import SSDP_PORT
from async_upnp_client.utils import CaseInsensitiveDict

IGD_TYPES = tuple(IgdDevice.DEVICE_TYPES)
WAN_SERVICES = ("urn:schemas-upnp-org:service:WANIPConnection:2", "urn:schemas-upnp-org:service:WANIPConnection:1",
                "urn:schemas-upnp-org:service:WANPPPConnection:1")
SEARCH_SECONDS = 2  # SSDP MX: how long devices may wait before answering
HTTP_SECONDS = 5
DESCRIPTION = "tunnelmesh"
T = TypeVar("T")


CONFLICT_IN_MAPPING_ENTRY = 718  # the external port is mapped to another host (IGD WANIPConnection)


class UpnpUnavailable(Exception):
    """No usable InternetGatewayDevice at the gateway, or it refused the request
    (`code`: the UPnP error code of its refusal, if it gave one)."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


class UpnpGateway:
    """The default gateway's IGD, found by `discover`."""

    def __init__(self, device: IgdDevice, location: str) -> None:
        self.device = device
        self.location = location

    @classmethod
    async def discover(cls, local_address: str, gateway: str, timeout: float = SEARCH_SECONDS + 1) -> UpnpGateway:
        """SSDP M-SEARCH from `local_address`, unicast to `gateway`, for an IGD; the first
        answer from `gateway` wins. UpnpUnavailable when none answers within `timeout` seconds."""
        found: asyncio.Future[str] = asyncio.get_running_loop().create_future()

        def on_answer(headers: CaseInsensitiveDict) -> None:
            location = headers.get_lower("location") or ""
            if (headers.get_lower("st") in IGD_TYPES and urlsplit(location).hostname == gateway
                    and not found.done()):
                found.set_result(location)

        listener = SsdpSearchListener(callback=on_answer, source=(local_address, 0),
                                      target=(gateway, SSDP_PORT),
                                      timeout=SEARCH_SECONDS, search_target=IGD_TYPES[0],
                                      connect_callback=lambda: listener.async_search())
        try:
            await listener.async_start()
            async with asyncio.timeout(timeout):
                location = await found
        except TimeoutError:
            raise UpnpUnavailable(f"no InternetGatewayDevice at {gateway} answered SSDP within {timeout:g} s") from None
        except OSError as exc:
            raise UpnpUnavailable(f"SSDP search failed: {exc}") from None
        finally:
            listener.async_stop()
        try:
            factory = UpnpFactory(AiohttpRequester(timeout=HTTP_SECONDS), non_strict=True)
            async with asyncio.timeout(HTTP_SECONDS * 3):
                device = await factory.async_create_device(location)
        except (UpnpError, TimeoutError, ValueError) as exc:
            raise UpnpUnavailable(f"IGD description at {location}: {exc}") from None
        if not IgdDevice.is_profile_device(device):
            raise UpnpUnavailable(f"{location} describes no InternetGatewayDevice")
        return cls(IgdDevice(device, None), location)

    async def external_address(self) -> str:
        address = await self._call(self.device.async_get_external_ip_address(), "GetExternalIPAddress")
        try:
            return str(ipaddress.IPv4Address(address or ""))
        except ValueError:
            raise UpnpUnavailable(f"the gateway has no usable external address ({address!r})") from None

    async def add_udp(self, internal_client: str, internal_port: int, external_port: int, lease: int) -> None:
        """Map UDP `external_port` (from any remote host) to `internal_client:internal_port`
        for `lease` seconds; AddPortMapping again for the same port renews it."""
        await self._wan_call("AddPortMapping", NewRemoteHost="", NewExternalPort=external_port, NewProtocol="UDP",
                             NewInternalPort=internal_port, NewInternalClient=internal_client, NewEnabled=True,
                             NewPortMappingDescription=DESCRIPTION, NewLeaseDuration=lease)

    async def delete_udp(self, external_port: int) -> None:
        await self._wan_call("DeletePortMapping", NewRemoteHost="", NewExternalPort=external_port, NewProtocol="UDP")

    async def _wan_call(self, action: str, **arguments: object) -> None:
        """Call a WAN connection service's action. Not IgdDevice's add/delete: they send the
        wildcard remote host as "0.0.0.0", which miniupnpd takes for another host than the
        "" of the existing mapping, so a renewal is refused as a conflict (718)."""
        services = [service for service in self.device.profile_device.all_services
                    if service.service_type in WAN_SERVICES and service.has_action(action)]
        if not services:
            raise UpnpUnavailable(f"the gateway's IGD has no {action}")
        await self._call(services[0].action(action).async_call(**arguments), action)

    @staticmethod
    async def _call(call: Awaitable[T], action: str) -> T:
        try:
            async with asyncio.timeout(HTTP_SECONDS):
                return await call
        except (UpnpError, TimeoutError) as exc:
            code = exc.error_code if isinstance(exc, UpnpActionError) else None
            raise UpnpUnavailable(f"{action}: {exc or type(exc).__name__}", code) from None
