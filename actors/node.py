"""A node assembled from its parts: the one assembly the daemon and the tests share.

`NodeParts` is the data plane around the protocol core: `Device`, `DataPath`, event
bus, supervisor and mesh, over a TUN and a UDP bind (actors/edges.py) and a `Clock`.
`Node` adds the actors that make it a running node (identity, edges, mesh, the initial
peers' sessions) and its `ControlApi`, and runs them under the supervisor until
`shutdown`. What the node is given is open already (the TUN configured, the socket
bound, the transports started); `run` closes the TUN and the socket when it returns.

actors/daemon.py builds one from the config and real resources, and adds what only a
daemon has (coordinator client, admitter, relays, the control socket);
tests/support/memnet.py builds them from in-memory doubles, in virtual time.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import os
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from tunnelmesh.clock import SYSTEM_CLOCK, Clock
from tunnelmesh.filter import Member, Rule
from tunnelmesh.identity import NodeIdentity
from tunnelmesh.wireguard import Device

from .control import EventBus
from .control_api import ControlApi
from .datapath import DataPath
from .edges import Bind, Tun
from .filter import FilterActor, FilterInputs
from .links import Transports
from .mesh import Mesh
from .messages import Identity, PeerSpec, Start, WhoAmI
from .runtime import Actor, Shutdown, Supervisor

if TYPE_CHECKING:
    from tunnelmesh.coordinator.relay import Relay

    from .admitter import Admitter
    from .coordinator_client import CoordinatorClient
    from .links import PeerMapDirectory
    from .messages import AgentStatus
    from .nat_prober import NatProber
    from .port_mapper import PortMapper

A = TypeVar("A", bound=Actor)


@dataclass(frozen=True)
class Addresses:
    """What the TUN device gets: this node's mesh addresses and the routes into the tunnel."""

    ipv4: ipaddress.IPv4Interface
    ipv6: ipaddress.IPv6Interface | None
    routes: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]


class IdentityActor(Actor):
    """Owns the node's SSH-key identity; answers who this node is."""

    name = "identity"
    policy = "fatal"

    def __init__(self, identity: NodeIdentity) -> None:
        super().__init__()
        self.identity = identity

    async def handle(self, message: Any) -> Any:
        if isinstance(message, WhoAmI):
            public = self.identity.public
            return Identity(public.fingerprint, public.ssh_public_key, base64.b64encode(public.wg_public_key).decode())
        raise ValueError(f"unknown message {type(message).__name__}")


class EdgesActor(Actor):
    """Owns the TUN device and the UDP socket: their lifetime is the daemon's,
    and stopping this actor closes them (which removes the interface and its
    routes)."""

    name = "edges"
    policy = "fatal"

    def __init__(self, tun: Tun, bind: Bind, datapath: DataPath) -> None:
        super().__init__()
        self.tun = tun
        self.bind = bind
        self.datapath = datapath

    async def run(self) -> None:
        self.datapath.start()
        await asyncio.Event().wait()  # held until shutdown

    async def stop(self) -> None:
        self.datapath.stop()
        self.tun.close()
        self.bind.close()


class NodeParts:
    """The protocol core behind its data path, the event bus, the supervisor (on `clock`)
    and the mesh of peer sessions: built, not running."""

    def __init__(
        self, static_private: bytes, *, mtu: int, tun: Tun, bind: Bind, clock: Clock,
        mesh_ip: ipaddress.IPv4Address, psk: bytes, transports: Transports,
        rng: Callable[[int], bytes] = os.urandom,
    ) -> None:
        self.clock = clock
        self.tun = tun
        self.bind = bind
        self.transports = transports
        self.device = Device(static_private, mtu=mtu, rng=rng)
        self.datapath = DataPath(self.device, tun, bind, clock, mesh_ip=mesh_ip)
        self.bus = EventBus()
        self.supervisor = Supervisor(clock)
        self.mesh = Mesh(self.device, self.datapath, self.supervisor, self.bus, mesh_ip, psk, transports, clock=clock)


class Node:
    """A running node: `NodeParts` with its identity, its edges, its mesh and the initial
    peers' sessions under the supervisor. Actors only some nodes have are `add`ed before
    `run`, in the order they start (they stop in reverse)."""

    def __init__(
        self, *, name: str, interface: str, identity: NodeIdentity, mtu: int, tun: Tun, bind: Bind,
        addresses: Addresses, psk: bytes, transports: Transports, peers: Sequence[PeerSpec],
        clock: Clock = SYSTEM_CLOCK, rng: Callable[[int], bytes] = os.urandom,
    ) -> None:
        self.name = name
        self.interface = interface
        self.addresses = addresses
        self.parts = parts = NodeParts(identity.static_private, mtu=mtu, tun=tun, bind=bind, clock=clock,
                                       mesh_ip=addresses.ipv4.ip, psk=psk, transports=transports, rng=rng)
        self.device, self.datapath, self.bus, self.mesh = parts.device, parts.datapath, parts.bus, parts.mesh
        self.supervisor = parts.supervisor
        self.peers = tuple(peers)
        self.filter: FilterActor | None = None
        self.started = clock.wall()
        self.identity = self.add(IdentityActor(identity))  # answers WhoAmI for status
        self.add(EdgesActor(tun, bind, self.datapath))
        self.add(self.mesh)

    def add(self, actor: A) -> A:
        self.supervisor.add(actor)
        return actor

    def add_filter(self, *, node_rules: tuple[Rule, ...] | None, inputs: Callable[[], FilterInputs],
                   network: bool) -> FilterActor:
        """The packet filter's actor (actors/filter.py), for this node as a member (its name,
        key and mesh addresses); tell it `SyncFilter` when `inputs()` changes. It compiles
        now, so the data path filters from its first packet on."""
        ipv6 = self.addresses.ipv6
        local = Member(self.name, self.device.static_public, self.addresses.ipv4.ip, ipv6.ip if ipv6 else None)
        self.filter = self.add(FilterActor(self.datapath, local=local, node_rules=node_rules, inputs=inputs,
                                           network=network, clock=self.parts.clock))
        self.filter.compile()
        return self.filter

    def control_api(
        self, *, coordinator: CoordinatorClient | None = None, serving_coordinator: str | None = None,
        admitter: Admitter | None = None, serving_relay: Relay | None = None,
        ssh_directory: PeerMapDirectory | None = None,
        agent_probe: Callable[[], Awaitable[AgentStatus | None]] | None = None,
        nat_prober: NatProber | None = None, port_mapper: PortMapper | None = None,
    ) -> ControlApi:
        """What the control commands answer, for the control socket (or a test, in-process)."""
        ipv6 = self.addresses.ipv6
        return ControlApi(
            name=self.name, interface=self.interface, mesh_ip=self.addresses.ipv4.ip,
            mesh_ipv6=ipv6.ip if ipv6 is not None else None, started=self.started, identity=self.identity,
            mesh=self.mesh, device=self.device, datapath=self.datapath, bus=self.bus, shutdown=self.shutdown,
            actors=self.supervisor.stats,
            transports=self.parts.transports, coordinator=coordinator, serving_coordinator=serving_coordinator,
            admitter=admitter, serving_relay=serving_relay, packet_filter=self.filter,
            ssh_directory=ssh_directory, identity_source=self.identity.identity.origin, agent_probe=agent_probe,
            nat_prober=nat_prober, port_mapper=port_mapper,
        )

    def shutdown(self, reason: str, exit_code: int = 0) -> None:
        self.supervisor.shutdown(reason, exit_code)

    async def run(self) -> Shutdown:
        """Start the initial peers' sessions and every actor; returns once all have stopped
        (the TUN and the socket closed), with why."""
        for spec in self.peers:
            self.mesh.add(spec).tell_latest(Start, Start())
        return await self.supervisor.run()
