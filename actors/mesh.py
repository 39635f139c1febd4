"""The mesh actor: owns the set of peer sessions.

Peers come from the static config at start, or from the coordinator client as
the verified peer map changes. Adding a peer registers it with the protocol
core and starts its session actor; removing one (revoked, no longer listed)
drops it from the core -- its handshakes are then refused as from an unknown
key -- and stops its session.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from tunnelmesh.clock import SYSTEM_CLOCK, Clock
from tunnelmesh.nat.report import NatReport
from tunnelmesh.wireguard import Device

from .messages import (AddPeers, FindSession, ListPeers, PeerAdded, PeerRemoved, PeerSpec, Punch, RemovePeer,
                       SetCandidates, SetPsk, Start, SyncPeers)
from .runtime import Actor
from .links import Transports
from .session import PeerSession, Ticker

if TYPE_CHECKING:
    from .control import EventBus
    from .datapath import DataPath
    from .runtime import Supervisor

log = logging.getLogger("tunnelmesh.mesh")

#: Between daemons, data received and not answered gets a keepalive after this long
#: (WireGuard waits 10 s), well inside the 3 s failure check of the ladder and of the
#: choice between a peer's UDP addresses: with UDP alone too, or a one-way stream would
#: look like a dead path. A plain WireGuard peer keeps WireGuard's timers both ways.
DAEMON_KEEPALIVE = 1.0


class Mesh(Actor):
    name = "mesh"
    policy = "fatal"

    def __init__(
        self, device: Device, datapath: DataPath, supervisor: Supervisor, bus: EventBus,
        own_mesh_ip: ipaddress.IPv4Address, psk: bytes, transports: Transports | None = None,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        super().__init__()
        self.device = device
        self.datapath = datapath
        self.supervisor = supervisor
        self.bus = bus
        self.own_mesh_ip = own_mesh_ip
        self.psk = psk
        self.transports = transports or Transports()
        self.clock = clock
        self.sessions: dict[bytes, PeerSession] = {}
        self.ticker = Ticker()  # every session's ladder tick on one timer
        self.specs: dict[bytes, PeerSpec] = {}  # what each session was made from
        # Hole punching: who asks the coordinator for a punch (the coordinator client sets
        # it; None in a static mesh), and this node's NAT as its prober last found it (the
        # node sets the prober's getter). Sessions read both when they need them.
        self.punch_requester: Callable[[bytes], None] | None = None
        self.own_nat: Callable[[], NatReport | None] = lambda: None
        #: Why the last punch request for a peer failed (the coordinator client keeps it).
        self.punch_refusals: dict[bytes, str] = {}

    def add(self, spec: PeerSpec) -> PeerSession:
        """Register a peer with the core and supervise its session (also before the daemon runs)."""
        session = PeerSession(spec.name, spec.mesh_ip, self.own_mesh_ip, spec.fingerprint, self.datapath, self.bus,
                              wg_key=spec.wg_key, transports=self.transports, choice=spec.choice,
                              candidates=spec.candidates, clock=self.clock, request_punch=self._request_punch,
                              own_nat=lambda: self.own_nat(), peer_nat=spec.nat,
                              punch_refused=lambda: self.punch_refusals.get(spec.wg_key), ticker=self.ticker,
                              plain_wireguard=spec.plain_wireguard)
        selector = session.selector
        session.peer = self.device.add_peer(
            spec.wg_key, preshared_key=self.psk, allowed_ips=spec.allowed_ips,
            # The core sends there at once: only on an allowed rung.
            endpoint=spec.endpoint if selector.udp_allowed else None,
            persistent_keepalive=spec.persistent_keepalive, owner=session,
        )
        if not spec.plain_wireguard:
            session.peer.keepalive_timeout = DAEMON_KEEPALIVE
        if selector.restricted:
            # A forced or disabled rung is neither sent nor answered on.
            session.peer.accepts, session.peer.accepts_udp = selector.allows, selector.udp_allowed
        self.sessions[spec.wg_key] = session
        self.specs[spec.wg_key] = spec
        self.supervisor.add(session)
        return session

    async def _remove(self, wg_key: bytes, reason: str) -> None:
        session = self.sessions.pop(wg_key, None)
        self.specs.pop(wg_key, None)
        self.punch_refusals.pop(wg_key, None)
        if session is None:
            return
        assert session.peer is not None
        self.device.remove_peer(session.peer)
        await self.supervisor.remove(session)
        ssh_link = self.transports.ssh.link(wg_key) if self.transports.ssh is not None else None
        if ssh_link is not None:
            ssh_link.close()  # a removed member keeps no SSH connection to us
        log.info("%s: removed (%s)", session.peer_name, reason)
        self.bus.publish(PeerRemoved(session.peer_name, reason))

    async def handle(self, message: Any) -> Any:
        if isinstance(message, AddPeers):
            for spec in message.specs:
                if spec.wg_key in self.sessions:
                    await self._remove(spec.wg_key, "replaced by a newer entry")
                self.add(spec).tell_latest(Start, Start())
                log.info("%s: added (%s)", spec.name, spec.mesh_ip)
                self.bus.publish(PeerAdded(spec.name, str(spec.mesh_ip)))
            return None
        if isinstance(message, RemovePeer):
            await self._remove(message.wg_key, message.reason)
            return None
        if isinstance(message, SyncPeers):
            wanted = {spec.wg_key: spec for spec in message.specs}
            for key in [key for key in self.sessions if key not in wanted]:
                await self._remove(key, "no longer a member")
            changed = tuple(spec for key, spec in wanted.items()
                            if key not in self.specs or not _same_peer(self.specs[key], spec))
            if changed:
                await self.handle(AddPeers(changed))  # a changed entry replaces the session
            return None
        if isinstance(message, SetCandidates):
            session = self.sessions.get(message.wg_key)
            if session is not None and message.addresses:
                session.tell_latest(SetCandidates, message)  # the session owns its path
            return None
        if isinstance(message, Punch):
            session = self.sessions.get(message.wg_key)
            if session is not None:
                session.tell_latest(Punch, message)
            return None
        if isinstance(message, SetPsk):
            self.psk = message.psk  # for peers added from now on
            for session in self.sessions.values():
                session.tell_latest(SetPsk, message)  # each session owns its peer's keys
            return None
        if isinstance(message, ListPeers):
            return list(self.sessions.values())
        if isinstance(message, FindSession):
            return self._find(message.key)
        raise ValueError(f"unknown message {type(message).__name__}")

    def _request_punch(self, wg_key: bytes) -> None:
        if self.punch_requester is not None:
            self.punch_requester(wg_key)

    def _find(self, key: str) -> PeerSession:
        for session in self.sessions.values():
            if session.peer_name == key or str(session.mesh_ip) == key:
                return session
        known = ", ".join(sorted(s.peer_name for s in self.sessions.values())) or "none"
        raise ValueError(f"no peer named {key!r} (peers: {known})")


def _same_peer(old: PeerSpec, new: PeerSpec) -> bool:
    """Whether `new` is the same entry as `old` but for where the peer may be (which its
    session learns by itself or from SetCandidates)."""
    return (old.name, old.mesh_ip, old.fingerprint, old.allowed_ips, old.choice, old.persistent_keepalive,
            old.plain_wireguard) == \
        (new.name, new.mesh_ip, new.fingerprint, new.allowed_ips, new.choice, new.persistent_keepalive,
         new.plain_wireguard)
