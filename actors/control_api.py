"""What the control socket's commands do (docs/control.md).

`ControlApi` answers `status`, `peers`, `ping`, `probe`, `down`, `ping_daemon`,
`filter_show`, `filter_test`, `ssh_hosts` and `netcheck` with the
dataclasses of actors/messages.py; the control server (actors/control.py) turns them
into JSON. Everything it reads is handed to it when the daemon is assembled: it
asks actors for what they own (the mesh for its sessions, each session for its
status) and reads the counters and status of the I/O edges directly.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import math
import os
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from tunnelmesh import __version__

from .control import EventBus, Handler
from .messages import (
    ActorStatus, AgentStatus, Identity, WhoAmI, FilterRules, FilterVerdict, FindSession, GetFilterStatus, GetStatus,
    ListPeers, Netcheck, NodeStatus, PeerStatus, Ping, PingResult, Peers, ProbeNow, ProbeResult, RelayClientStatus,
    RelayServerStatus, ShowFilter, SpinStatus, SshHosts, SshStatus, Status, TestFilter, TransportsStatus, from_json,
)
from .netcheck import netcheck, ssh_endpoints
from .runtime import Actor
from .spin import SpinningSelector

if TYPE_CHECKING:
    from tunnelmesh.coordinator.relay import Relay
    from tunnelmesh.wireguard import Device

    from .admitter import Admitter
    from .coordinator_client import CoordinatorClient
    from .datapath import DataPath
    from .filter import FilterActor
    from .links import PeerMapDirectory, Transports
    from .mesh import Mesh
    from .nat_prober import NatProber
    from .port_mapper import PortMapper

#: Bounds of a ping's wait, in seconds: a ping holds a control connection open that long.
PING_WAIT_MIN, PING_WAIT_MAX, PING_WAIT_DEFAULT = 0.1, 30.0, 5.0


class ControlApi:
    def __init__(
        self,
        *,
        name: str,
        interface: str,
        mesh_ip: ipaddress.IPv4Address,
        mesh_ipv6: ipaddress.IPv6Address | None,
        started: float,
        identity: Actor,
        mesh: Mesh,
        device: Device,
        datapath: DataPath,
        bus: EventBus,
        shutdown: Callable[[str], None],
        actors: Callable[[], list[ActorStatus]],
        transports: Transports,
        coordinator: CoordinatorClient | None = None,
        serving_coordinator: str | None = None,
        admitter: Admitter | None = None,
        serving_relay: Relay | None = None,
        packet_filter: FilterActor | None = None,
        ssh_directory: PeerMapDirectory | None = None,
        identity_source: str = "",
        agent_probe: Callable[[], Awaitable[AgentStatus | None]] | None = None,
        nat_prober: NatProber | None = None,
        port_mapper: PortMapper | None = None,
    ) -> None:
        self.name = name
        self.interface = interface
        self.mesh_ip = mesh_ip
        self.mesh_ipv6 = mesh_ipv6
        self.started = started
        self.identity = identity
        self.mesh = mesh
        self.device = device
        self.datapath = datapath
        self.bus = bus
        self.shutdown = shutdown
        self.actors = actors
        self.transports = transports
        self.coordinator = coordinator
        self.serving_coordinator = serving_coordinator
        self.admitter = admitter
        self.serving_relay = serving_relay
        self.packet_filter = packet_filter
        self.ssh_directory = ssh_directory
        self.identity_source = identity_source
        self.agent_probe = agent_probe  # an ssh-agent identity: asks its agent (actors/agent_identity.py)
        self.nat_prober = nat_prober
        self.port_mapper = port_mapper  # its `mapping`: the gateway's mapping of the UDP port, or None

    def handlers(self) -> dict[str, Handler]:
        return {"status": self.status, "peers": self.peers, "ping": self.ping, "probe": self.probe, "down": self.down,
                "ping_daemon": self.ping_daemon, "filter_show": self.filter_show, "filter_test": self.filter_test,
                "ssh_hosts": self.ssh_hosts, "netcheck": self.netcheck}

    async def status(self, _: dict[str, Any]) -> Status:
        return Status(node=await self.node(), peers=await self._peers(), drops=dict(self.device.drops + self.datapath.drops),
                      filter=await self.packet_filter.ask(GetFilterStatus()) if self.packet_filter is not None else None)

    async def filter_show(self, _: dict[str, Any]) -> FilterRules:
        return await self._filter().ask(ShowFilter())  # type: ignore[no-any-return]

    async def filter_test(self, request: dict[str, Any]) -> FilterVerdict:
        peer, proto, port = request.get("peer"), request.get("proto"), request.get("port", 0)
        if not isinstance(peer, str) or not isinstance(proto, str):
            raise ValueError("'peer' (a name or mesh address) and 'proto' (tcp, udp, icmp or icmpv6) are required")
        if proto in ("tcp", "udp") and "port" not in request:
            raise ValueError(f"'port' is required for {proto}")
        if isinstance(port, bool) or not isinstance(port, int):
            raise ValueError("'port' must be an integer (0 to 65535)")
        return await self._filter().ask(TestFilter(peer, proto, port))  # type: ignore[no-any-return]

    def _filter(self) -> FilterActor:
        if self.packet_filter is None:
            raise ValueError("this daemon runs no packet filter")
        return self.packet_filter

    async def peers(self, _: dict[str, Any]) -> Peers:
        return Peers(peers=await self._peers())

    async def ping(self, request: dict[str, Any]) -> PingResult:
        wait = request.get("wait", PING_WAIT_DEFAULT)
        if isinstance(wait, bool) or not isinstance(wait, (int, float)) or not math.isfinite(wait):
            raise ValueError("'wait' must be a number of seconds")
        session = await self.mesh.ask(FindSession(str(request.get("peer", ""))))
        reply = await session.ask(Ping(min(max(float(wait), PING_WAIT_MIN), PING_WAIT_MAX)))
        return await reply  # type: ignore[no-any-return]  # the session sends and hands back a future

    async def probe(self, request: dict[str, Any]) -> ProbeResult:
        session = await self.mesh.ask(FindSession(str(request.get("peer", ""))))
        return await session.ask(ProbeNow())  # type: ignore[no-any-return]

    async def ssh_hosts(self, _: dict[str, Any]) -> SshHosts:
        if self.ssh_directory is None or self.coordinator is None:
            raise ValueError("a static mesh has no signed SSH endpoint records, so no verified sshd host keys")
        me: Identity = await self.identity.ask(WhoAmI())
        return SshHosts(network=self.coordinator.state.network.network,
                        hosts=self.ssh_directory.ssh_hosts(base64.b64decode(me.wireguard_public_key)))

    async def netcheck(self, _: dict[str, Any]) -> Netcheck:
        if self.nat_prober is None:
            raise ValueError("this daemon runs no NAT prober")
        ssh: list[tuple[str, str, int]] = []
        if self.ssh_directory is not None and self.coordinator is not None:
            me: Identity = await self.identity.ask(WhoAmI())
            ssh = ssh_endpoints(self.ssh_directory, self.coordinator.snapshot, base64.b64decode(me.wireguard_public_key))
        return await netcheck(self.nat_prober, port_mapping=self.port_mapper.mapping if self.port_mapper else None,
                              coordinator_url=self.coordinator.url if self.coordinator is not None else None,
                              relay_urls=[relay.url for relay in self.transports.relays()], ssh=ssh,
                              port_mapping_error=self.port_mapper.error if self.port_mapper else None)

    async def down(self, _: dict[str, Any]) -> str:
        self.shutdown("down requested")
        return "stopping"

    async def ping_daemon(self, _: dict[str, Any]) -> str:
        return "running"

    async def _peers(self) -> tuple[PeerStatus, ...]:
        return tuple([await session.ask(GetStatus()) for session in await self.mesh.ask(ListPeers())])

    async def node(self) -> NodeStatus:
        me: Identity = await self.identity.ask(WhoAmI())
        transports = self.transports
        # The edges' own status() are plain dicts (tunnelmesh/ does not import actors/): from_json
        # checks each against the schema, so a drift fails here with the field's name.
        return NodeStatus(
            name=self.name, mesh_ip=str(self.mesh_ip), mesh_ipv6=str(self.mesh_ipv6) if self.mesh_ipv6 else None,
            interface=self.interface, listen_port=self.datapath.port, version=__version__, started=self.started,
            pid=os.getpid(), mode="static" if self.coordinator is None else "coordinator",
            fingerprint=me.fingerprint, ssh_public_key=me.ssh_public_key,
            wireguard_public_key=me.wireguard_public_key,
            coordinator=self.coordinator.status() if self.coordinator else None,
            serving_coordinator=self.serving_coordinator,
            admission=self.admitter.status() if self.admitter is not None else None,
            transports=TransportsStatus(
                ssh=from_json(SshStatus, transports.ssh.status()) if transports.ssh is not None else None,
                relay=from_json(RelayClientStatus, transports.relay.status()) if transports.relay is not None else None,
                node_relays=tuple(from_json(RelayClientStatus, relay.status())
                                  for relay in transports.node_relays.values()),
                serving_relay=from_json(RelayServerStatus, self.serving_relay.status())
                if self.serving_relay is not None else None,
            ),
            events_dropped=self.bus.dropped,
            actors=self._actors(),
            identity_source=self.identity_source,
            agent=await self.agent_probe() if self.agent_probe is not None else None,
            nat=self.nat_prober.report if self.nat_prober is not None else None,
            port_mapping=self.port_mapper.mapping if self.port_mapper is not None else None,
            offloads=self.datapath.offloads,
            spin=_spin_status(),
        )

    def _actors(self) -> tuple[ActorStatus, ...]:
        """Every actor's mailbox, the peer sessions summed into one entry ("sessions"): one
        line per peer would grow the status with the mesh and say less."""
        others, sessions = [], []
        for stats in self.actors():
            (sessions if stats.name.startswith("session:") else others).append(stats)
        if sessions:
            others.append(ActorStatus("sessions", *(sum(getattr(s, f) for s in sessions)
                                                    for f in ("queued", "dropped", "restarts", "task_failures", "tasks"))))
        return tuple(others)


def _spin_status() -> SpinStatus | None:
    """The running loop's spin counters, if it is the daemon's SpinningLoop."""
    spinner = getattr(asyncio.get_running_loop(), "spinner", None)
    if not isinstance(spinner, SpinningSelector):
        return None
    return SpinStatus(spins=spinner.spins, caught=spinner.caught, seconds=round(spinner.spun, 3))
