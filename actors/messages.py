"""Every message the actors exchange, and every event the daemon publishes.

Frozen, slotted dataclasses, in one place: the mailboxes take the first section,
the event stream and the control API (docs/control.md) the second. A message
says what it asks for; nothing here holds a live object's state.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from tunnelmesh.config import RungChoice

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = tuple[str, int]

# --- mailboxes -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PeerSpec:
    """One peer as the mesh actor adds it: from the static config or a verified member."""

    name: str
    mesh_ip: ipaddress.IPv4Address
    fingerprint: str | None
    wg_key: bytes
    allowed_ips: tuple[IPNetwork, ...]
    endpoint: Address | None
    persistent_keepalive: int
    choice: RungChoice = RungChoice(rungs=("udp",))  # the rungs this peer may use
    #: Every UDP address the peer may be at (the coordinator's list: where it saw the
    #: peer first, then the peer's own addresses); the ladder's UDP probes go to all.
    candidates: tuple[Address, ...] = ()


@dataclass(frozen=True, slots=True)
class AddPeers:
    """To the mesh: add these peers (a peer already there is replaced)."""

    specs: tuple[PeerSpec, ...]


@dataclass(frozen=True, slots=True)
class RemovePeer:
    """To the mesh: drop this peer from the core and stop its session."""

    wg_key: bytes
    reason: str


@dataclass(frozen=True, slots=True)
class SetCandidates:
    """To the mesh, then the peer's session: the coordinator's word on where a peer's UDP
    port may be (best first). What the ladder probes next; the first is sent to at once
    only while the session is not up, so it never overrides an endpoint learnt from
    authenticated packets. Only the latest per peer matters (coalesced, never dropped)."""

    wg_key: bytes
    addresses: tuple[Address, ...]


@dataclass(frozen=True, slots=True)
class SetPsk:
    """To the mesh, then every session: the pre-shared key from the next handshake on."""

    psk: bytes = field(repr=False)  # messages are what gets printed when an actor is debugged


@dataclass(frozen=True, slots=True)
class ListPeers:
    """To the mesh: the current sessions."""


@dataclass(frozen=True, slots=True)
class FindSession:
    """To the mesh: the session of the peer with this name or mesh IP."""

    key: str


@dataclass(frozen=True, slots=True)
class Start:
    """To a session: bring it up (handshake now if the peer's address is known)."""


@dataclass(frozen=True, slots=True)
class GetStatus:
    """To a session: its status."""


@dataclass(frozen=True, slots=True)
class Ping:
    """To a session: send an in-tunnel ping; the reply is a future of the result."""

    timeout: float


@dataclass(frozen=True, slots=True)
class SyncRelays:
    """To the relay pool: the peer map changed; hold the relays it offers now."""


# --- events and the control API (docs/control.md) ---------------------------------------
