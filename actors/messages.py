"""Every message the actors exchange, and every event the daemon publishes.

Frozen, slotted dataclasses, in one place: the mailboxes take the first section,
the event stream and the control API (docs/control.md) the second. A message
says what it asks for; nothing here holds a live object's state.
"""

from __future__ import annotations

import ipaddress
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from types import UnionType
from typing import Any, ClassVar, TypeVar, Union, get_args, get_origin, get_type_hints

from tunnelmesh.config import UDP_ONLY, RungChoice
from tunnelmesh.nat.report import Candidate, NatReport, PeerNat

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
    choice: RungChoice = UDP_ONLY  # the rungs this peer may use
    #: Every UDP address the peer may be at, best first (tunnelmesh.nat.candidates.
    #: order_candidates: its verified candidate record, then where the coordinator saw
    #: it); the ladder's UDP probes go to all.
    candidates: tuple[Address, ...] = ()
    #: What the peer's verified candidate record says of its NAT (unknown without one).
    nat: PeerNat = PeerNat()
    #: A plain WireGuard peer (a phone, wg-quick), not a tunnelmesh daemon: it keepalives
    #: by WireGuard's own timers, so its path is judged by them too.
    plain_wireguard: bool = False


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
class SyncPeers:
    """To the mesh: these are all the peers. The ones missing are added, the others removed,
    those it has are kept as they are. A (re)started coordinator client sends it first, so
    that nothing it told the mesh before it crashed can have been lost."""

    specs: tuple[PeerSpec, ...]


@dataclass(frozen=True, slots=True)
class SetCandidates:
    """To the mesh, then the peer's session: the coordinator's word on where a peer's UDP
    port may be (best first). What the ladder probes next; the first is sent to at once
    only while the session is not up, so it never overrides an endpoint learnt from
    authenticated packets. Only the latest per peer matters (coalesced, never dropped)."""

    wg_key: bytes
    addresses: tuple[Address, ...]
    nat: PeerNat = PeerNat()  # as in PeerSpec


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
class WhoAmI:
    """To the identity actor: this node's public identity (an `Identity`)."""


@dataclass(frozen=True, slots=True)
class Identity:
    """This node's public identity: never a secret."""

    fingerprint: str
    ssh_public_key: str
    wireguard_public_key: str  # base64


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
class Punch:
    """To the mesh, then the peer's session: the coordinator told both ends of the pair to
    punch now (tunnelmesh/punch.py: handshake initiations to the peer's UDP candidates on a
    short schedule, and a port spray towards a NAT that maps per destination)."""

    wg_key: bytes


@dataclass(frozen=True, slots=True)
class ProbeNow:
    """To a session: probe the better rungs now, under the ladder's rules (a ProbeResult)."""


@dataclass(frozen=True, slots=True)
class SyncRelays:
    """To the relay pool: the peer map changed; hold the relays it offers now."""


@dataclass(frozen=True, slots=True)
class SyncFilter:
    """To the filter actor: the members or the network policy changed; compile from the latest."""


@dataclass(frozen=True, slots=True)
class GetFilterStatus:
    """To the filter actor: what is in force and its counters (a FilterStatus)."""


@dataclass(frozen=True, slots=True)
class ShowFilter:
    """To the filter actor: the rules in force and what each peer may open here (FilterRules)."""


@dataclass(frozen=True, slots=True)
class TestFilter:
    """To the filter actor: would a new flow from `peer` (name or mesh address) pass, and
    by which rule (a FilterVerdict)."""

    peer: str
    proto: str  # tcp, udp, icmp or icmpv6
    port: int  # tcp/udp destination port; 0 for icmp


# --- events and the control API (docs/control.md) ---------------------------------------
#
# What the daemon tells the outside: events (published on the EventBus, streamed by the
# `events` command) and the replies of the control socket's commands. `to_json` is the
# one way any of them becomes the socket's JSON and `from_json` the way back (the CLI, the
# TUI, the round-trip test). Fields hold plain values only (str, int, float, bool, None,
# tuples, string-keyed dicts, these dataclasses), so that the two are exact inverses.

#: The control schema's version. Within a version fields are only added; a field removed or
#: changed in meaning or type bumps it (docs/control.md).
CONTROL_VERSION = 1


class ControlSchemaError(ValueError):
    """JSON that does not fit the control schema this side speaks."""


@dataclass(frozen=True, slots=True)
class PathStatus:
    """Where a peer's packets go now: the rung and the endpoint on it. The one key for it."""

    rung: str  # "udp", "ssh" or "relay"
    endpoint: str  # "udp 198.51.100.7:51820", "ssh to ...", "relay wss://..."


class Event:
    """Base of every event; `kind` is its value under the "event" key."""

    __slots__ = ()
    kind: ClassVar[str]


@dataclass(frozen=True, slots=True)
class PeerAdded(Event):
    kind: ClassVar[str] = "peer_added"
    peer: str
    mesh_ip: str


@dataclass(frozen=True, slots=True)
class PeerRemoved(Event):
    kind: ClassVar[str] = "peer_removed"
    peer: str
    reason: str


@dataclass(frozen=True, slots=True)
class HandshakeDone(Event):
    kind: ClassVar[str] = "handshake"
    peer: str
    initiator: bool  # this node sent the initiation
    rung: str | None  # the rung the handshake came in on


@dataclass(frozen=True, slots=True)
class HandshakeFailed(Event):
    """No handshake reply for 90 s: the core gave up until traffic asks again."""

    kind: ClassVar[str] = "handshake_failed"
    peer: str


@dataclass(frozen=True, slots=True)
class KeysZeroed(Event):
    kind: ClassVar[str] = "keys_zeroed"
    peer: str


@dataclass(frozen=True, slots=True)
class PathChanged(Event):
    """The peer's packets moved to another rung (the first choice is no change)."""

    kind: ClassVar[str] = "path"
    peer: str
    path: PathStatus  # where they go now
    previous: str  # the rung they left
    why: str
    at: float  # Unix time


@dataclass(frozen=True, slots=True)
class EndpointRoamed(Event):
    """Same rung, new endpoint (a new UDP address, a reconnected link)."""

    kind: ClassVar[str] = "roamed"
    peer: str
    path: PathStatus


@dataclass(frozen=True, slots=True)
class CoordinatorChanged(Event):
    kind: ClassVar[str] = "coordinator"
    state: str  # as CoordinatorStatus.state
    error: str | None
    # Added within control version 1 (a default: an event from an older daemon still decodes).
    url: str | None = None  # the coordinator in use (as CoordinatorStatus.url)


@dataclass(frozen=True, slots=True)
class SecretRotated(Event):
    kind: ClassVar[str] = "secret_rotated"
    epoch: int


@dataclass(frozen=True, slots=True)
class NodeRevoked(Event):
    """This node was revoked by the network admin; the daemon stops."""

    kind: ClassVar[str] = "revoked"
    peer: str  # this node's name, as the revocation gives it


@dataclass(frozen=True, slots=True)
class AdmissionDecided(Event):
    """(Admin's machine) what the admitter did with one join made with an invite."""

    kind: ClassVar[str] = "admission"
    outcome: str  # "countersigned", "refused", "ignored" (malformed) or "deferred" (asked again later)
    detail: str


EVENTS: dict[str, type[Event]] = {cls.kind: cls for cls in (
    PeerAdded, PeerRemoved, HandshakeDone, HandshakeFailed, KeysZeroed, PathChanged, EndpointRoamed,
    CoordinatorChanged, SecretRotated, NodeRevoked, AdmissionDecided,
)}


@dataclass(frozen=True, slots=True)
class Subscribed:
    """The reply to `events`, before the stream starts."""

    control_version: int = CONTROL_VERSION


@dataclass(frozen=True, slots=True)
class PeerStatus:
    name: str
    mesh_ip: str
    fingerprint: str | None
    path: PathStatus | None  # None: no endpoint known yet
    state: str  # "up", "handshaking", "idle", "waiting" or "unreachable"
    rung_changes: int
    probe_interval: float  # seconds between probes of better rungs
    transitions: tuple[PathChanged, ...]  # the last few, oldest first
    last_handshake: float | None  # Unix time
    last_handshake_ago: float | None  # seconds
    rx_bytes: int
    tx_bytes: int
    persistent_keepalive: int
    why_not_better: str | None
    # Added within control version 1 (defaults: a reply from an older daemon still decodes).
    rtt_ms: float | None = None  # the last round trip measured: a handshake this node initiated, or a ping
    rx_packets: int = 0  # transport messages, keepalives included
    tx_packets: int = 0
    handshakes: int = 0  # completed since the session started
    candidates: tuple[str, ...] = ()  # "host:port" UDP addresses a probe goes to, the one known to work first
    #: datagrams for this peer the core dropped, by reason (once it knew the peer they were for)
    drops: dict[str, int] = field(default_factory=dict)
    #: "partial": the peer's daemon completes TCP/UDP checksums, what this node sends it leaves
    #: them partial; "whole": it does not (or has not said so since the last handshake)
    inner_checksums: str = "whole"


@dataclass(frozen=True, slots=True)
class SshHost:
    """One other member's sshd, for `tunnelmesh ssh-config`."""

    name: str
    mesh_ip: str
    mesh_ipv6: str | None
    fingerprint: str  # of its identity
    #: "<type> <base64>", signed by its identity in its newest SSH endpoint record; empty: none
    host_keys: tuple[str, ...]
    identity_is_host_key: bool  # its identity is one of them (the machine's host key)
    why_none: str | None  # why host_keys is empty


@dataclass(frozen=True, slots=True)
class SshHosts:
    """The reply to `ssh_hosts`: the daemon's verified view of the members' sshd host keys."""

    network: str
    hosts: tuple[SshHost, ...]
    control_version: int = CONTROL_VERSION


@dataclass(frozen=True, slots=True)
class Reach:
    """One TCP connect `netcheck` made: to what, and how long it took (None: it failed)."""

    what: str  # "coordinator", "relay", "ssh to <member>"
    target: str  # "host:port"
    latency_ms: float | None
    error: str | None = None


@dataclass(frozen=True, slots=True)
class Netcheck:
    """The reply to `netcheck`: a fresh NAT check and what this node can reach."""

    nat: NatReport
    udp: bool  # a STUN server answered over UDP from the WireGuard port
    port_mapping: Candidate | None  # the router's mapping (UPnP IGD, NAT-PMP, PCP), if any
    coordinator: Reach | None  # None: a static mesh
    relays: tuple[Reach, ...]
    ssh: tuple[Reach, ...]  # a few members' SSH endpoints
    control_version: int = CONTROL_VERSION
    port_mapping_error: str | None = None  # why there is no port mapping (the port mapper's last failure)


@dataclass(frozen=True, slots=True)
class Peers:
    """The reply to `peers`."""

    peers: tuple[PeerStatus, ...]
    control_version: int = CONTROL_VERSION


@dataclass(frozen=True, slots=True)
class PingResult:
    peer: str
    ok: bool
    path: PathStatus | None  # where the echo was sent
    rtt_ms: float | None = None  # when ok
    answered_on: str | None = None  # the rung the reply came in on, when ok
    error: str | None = None  # when not ok


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """The reply to `probe`: whether a better-rung probe is due now, and what happens."""

    peer: str
    probing: bool  # false: nothing to probe (on the best rung, searching, no path yet)
    detail: str  # in words: "probing UDP now", "probing UDP in 7 s (after the hold)", why not


@dataclass(frozen=True, slots=True)
class CoordinatorStatus:
    url: str  # the coordinator in use (one of `urls`)
    network: str
    state: str  # "connecting", "connected" or what went wrong
    tls_fingerprint: str | None
    since: float  # Unix time of the last state change
    error: str | None
    version: int  # the peer map's
    observed: str | None  # this node's address as the coordinator sees it
    members: int
    revocations: int
    rejected: dict[str, int]  # entries refused, by reason
    # Added within control version 1 (a default: a reply from an older daemon still decodes).
    urls: tuple[str, ...] = ()  # every coordinator the node may use, in order of preference


@dataclass(frozen=True, slots=True)
class AdmissionStatus:
    countersigned: int
    refused: int
    problem: str | None


@dataclass(frozen=True, slots=True)
class SshStatus:
    port: int | None  # None: dials only, serves no SSH
    bridge: str | None
    links: int
    drops: dict[str, int]


@dataclass(frozen=True, slots=True)
class RelayClientStatus:
    url: str
    state: str  # "connecting", "connected" or "unreachable"
    error: str | None
    connected_since: float | None
    links: int
    queued: int
    queued_bytes: int
    drops: dict[str, int]
    refused: dict[str, int]


@dataclass(frozen=True, slots=True)
class RelayConnectionStatus:
    remote: str
    since: float
    queued: int
    queued_bytes: int


@dataclass(frozen=True, slots=True)
class RelayServerStatus:
    connections: int
    peers: dict[str, RelayConnectionStatus]  # by WireGuard public key (base64)
    drops: dict[str, int]
    refusals: dict[str, int]
    relayed_frames: int = 0  # frames passed on (added within control version 1)
    relayed_bytes: int = 0  # their WireGuard bytes


@dataclass(frozen=True, slots=True)
class TransportsStatus:
    ssh: SshStatus | None
    relay: RelayClientStatus | None  # the coordinator's relay
    node_relays: tuple[RelayClientStatus, ...]  # relays members serve
    serving_relay: RelayServerStatus | None  # this node's own


@dataclass(frozen=True, slots=True)
class AgentStatus:
    """The ssh-agent an agent identity's key lives in. Running sessions never need it
    (the mesh key is in memory); `needed_for` is what does, while it is not back."""

    socket: str
    fingerprint: str  # the identity's SSH key
    state: str  # "holds the key", "key missing" or "unreachable"
    needed_for: tuple[str, ...]  # empty while the agent holds the key


@dataclass(frozen=True, slots=True)
class SpinStatus:
    """The daemon loop's polling after quiet spells (actors/spin.py), since the start."""

    spins: int  # quiet spells the loop polled after before it slept
    caught: int  # of those, the ones whose polling found the answer
    seconds: float  # time spent polling


@dataclass(frozen=True, slots=True)
class ActorStatus:
    """One actor's mailbox and health (the peer sessions are summed into one, "sessions")."""

    name: str
    queued: int  # messages waiting in its mailbox
    dropped: int  # best-effort messages dropped because the mailbox was full
    restarts: int
    task_failures: int  # child tasks that ended with an exception
    tasks: int  # child tasks running


@dataclass(frozen=True, slots=True)
class FilterRuleHits:
    rule: str  # the rule as written ("network rule 2 (line 14): from group:admins to * tcp 22")
    hits: int  # new flows it admitted (the first rule that allows a flow is credited)


@dataclass(frozen=True, slots=True)
class FilterStatus:
    """The packet filter: what is in force, and its counters since the daemon started."""

    enabled: bool  # the data path filters packets (false: every packet passes, as before the filter)
    in_force: str  # what is in force, in words
    policy_version: int | None  # the network policy's, None: none set (or static mode)
    node_rules: int  # [[filter.allow]] rules of this node's config
    error: str | None  # the last network policy refused (the rules before it stay)
    warnings: tuple[str, ...]  # e.g. a node rule naming a group the policy does not define
    drops: dict[str, int]  # packets dropped, by reason (docs/filter.md)
    spoofed_by_peer: dict[str, int]  # packets from a peer with a source that is not its
    rules: tuple[FilterRuleHits, ...]  # in evaluation order
    flows: int  # tracked flows now
    max_flows: int  # the table's bound (new flows are dropped beyond it)
    max_flows_per_peer: int  # what one peer's new flows may take of it
    related: int  # ICMP errors passed because they belong to a tracked flow
    # Added within control version 1 (a reply from an older daemon still decodes).
    denied_by_peer: dict[str, int] = field(default_factory=dict)  # inbound packets no rule allows, by peer name


@dataclass(frozen=True, slots=True)
class FilterOrigin:
    """What one address block of a peer (its mesh address, a route) may open here."""

    origin: str  # an address or a CIDR
    tcp: str  # destination ports: "" none, "*" all, "22,8000-8100"
    udp: str
    icmp: bool  # ICMP echo
    icmpv6: bool  # ICMPv6 echo
    spoofed: bool  # another member's address inside the peer's route: always dropped


@dataclass(frozen=True, slots=True)
class FilterPeerRules:
    peer: str
    origins: tuple[FilterOrigin, ...]  # mesh addresses first, then routes (longest prefix first)


@dataclass(frozen=True, slots=True)
class FilterRules:
    """The reply to `filter_show`."""

    enabled: bool
    in_force: str
    rules: tuple[FilterRuleHits, ...]  # in evaluation order
    peers: tuple[FilterPeerRules, ...]  # by name; empty when the filter is not enabled
    control_version: int = CONTROL_VERSION


@dataclass(frozen=True, slots=True)
class FilterVerdict:
    """The reply to `filter_test`: would a new flow from the peer's mesh address pass."""

    peer: str
    proto: str
    port: int
    allowed: bool
    reason: str  # the rule that allows it, or why not
    control_version: int = CONTROL_VERSION


@dataclass(frozen=True, slots=True)
class NodeStatus:
    name: str
    mesh_ip: str
    mesh_ipv6: str | None
    interface: str
    listen_port: int
    version: str  # the software's
    started: float  # Unix time
    pid: int
    mode: str  # "static" or "coordinator"
    fingerprint: str
    ssh_public_key: str
    wireguard_public_key: str
    coordinator: CoordinatorStatus | None
    serving_coordinator: str | None  # where the embedded coordinator listens
    admission: AdmissionStatus | None  # the admin's machine only
    transports: TransportsStatus
    events_dropped: int  # events a slow subscriber did not take
    actors: tuple[ActorStatus, ...]  # mailboxes: what waits, what a full one dropped; restarts
    #: Where the mesh key came from: "key file PATH", "ssh-agent at PATH", or the mesh key cache.
    identity_source: str = ""
    agent: AgentStatus | None = None  # an ssh-agent identity's agent, asked now; None: a key file
    nat: NatReport | None = None  # the NAT prober's latest report; None: no prober (in-process tests)
    port_mapping: Candidate | None = None  # the router's mapping of the WireGuard port, if any
    #: The data path's kernel offloads in use, e.g. "tun csum tso uso, udp gso gro"; "none".
    offloads: str = ""
    spin: SpinStatus | None = None  # None: an event loop without it (in-process tests)


@dataclass(frozen=True, slots=True)
class Status:
    """The reply to `status`."""

    node: NodeStatus
    peers: tuple[PeerStatus, ...]
    drops: dict[str, int]  # packets the data path dropped, by reason
    control_version: int = CONTROL_VERSION
    filter: FilterStatus | None = None  # None: the node runs no filter actor (in-process tests)


def to_json(obj: object) -> Any:
    """The control socket's JSON for an event or reply (or any value inside one)."""
    if isinstance(obj, Event):
        return {"event": obj.kind, **{f.name: to_json(getattr(obj, f.name)) for f in fields(obj)}}
    if is_dataclass(obj):
        return {f.name: to_json(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, tuple):
        return [to_json(item) for item in obj]
    if isinstance(obj, dict):
        return {str(key): to_json(value) for key, value in obj.items()}
    if obj is None or isinstance(obj, (str, int, float)):
        return obj
    raise TypeError(f"{type(obj).__name__} has no control JSON")


T = TypeVar("T")


def from_json(cls: type[T], data: Any) -> T:
    """The `cls` (a status type, or `Event` for any event) that `to_json` made `data` from.
    Raises ControlSchemaError, naming the field, on anything else."""
    return _decode(cls, data, cls.__name__)  # type: ignore[no-any-return]


def _decode(hint: Any, data: Any, where: str) -> Any:
    if hint is Any:
        return data
    origin = get_origin(hint)
    if origin in (Union, UnionType):
        options = get_args(hint)
        if data is None and type(None) in options:
            return None
        (inner,) = [option for option in options if option is not type(None)]
        return _decode(inner, data, where)
    if origin is tuple:
        items = get_args(hint)
        values = _expect(data, list, where)
        if len(items) == 2 and items[1] is Ellipsis:
            return tuple(_decode(items[0], value, f"{where}[{i}]") for i, value in enumerate(values))
        if len(values) != len(items):  # a fixed-length tuple (an address: host and port)
            raise ControlSchemaError(f"{where}: expected {len(items)} items, got {len(values)}")
        return tuple(_decode(item, value, f"{where}[{i}]") for i, (item, value) in enumerate(zip(items, values)))
    if origin is dict:
        value_hint = get_args(hint)[1]
        return {key: _decode(value_hint, value, f"{where}.{key}") for key, value in _expect(data, dict, where).items()}
    if isinstance(hint, type) and issubclass(hint, Event):
        kind = _expect(data, dict, where).get("event")
        if kind not in EVENTS:
            raise ControlSchemaError(f"{where}: unknown event kind {kind!r} (control version {CONTROL_VERSION} knows "
                                     f"{', '.join(sorted(EVENTS))}); is the daemon newer than this client?")
        if hint is not Event and kind != hint.kind:
            raise ControlSchemaError(f"{where}: expected a {hint.kind!r} event, got {kind!r}")
        body = {key: value for key, value in data.items() if key != "event"}
        return _decode_dataclass(EVENTS[kind], body, f"{where}({kind})")
    if is_dataclass(hint):
        return _decode_dataclass(hint, data, where)
    if hint is float:
        if isinstance(data, (int, float)) and not isinstance(data, bool):
            return float(data)
        raise ControlSchemaError(f"{where}: expected a number, got {data!r}"[:300])
    if hint is int and isinstance(data, bool):
        raise ControlSchemaError(f"{where}: expected an integer, got {data!r}")
    return _expect(data, hint, where)


def _decode_dataclass(cls: Any, data: Any, where: str) -> Any:
    data = _expect(data, dict, where)
    hints = get_type_hints(cls)
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ControlSchemaError(f"{where}: unknown field {', '.join(map(repr, unknown))} (control version "
                                 f"{CONTROL_VERSION}); is the daemon newer than this client?")
    missing = [name for name, f in known.items()
               if name not in data and f.default is MISSING and f.default_factory is MISSING]
    if missing:
        raise ControlSchemaError(f"{where}: missing field {', '.join(map(repr, missing))}")
    return cls(**{name: _decode(hints[name], value, f"{where}.{name}") for name, value in data.items()})


def _expect(data: Any, kind: type, where: str) -> Any:
    if not isinstance(data, kind):
        raise ControlSchemaError(f"{where}: expected {kind.__name__}, got {type(data).__name__}")
    return data
