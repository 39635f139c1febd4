"""The checked node configuration (`NodeConfig` and its parts), its defaults, and
`ConfigError`, the one error every part of tunnelmesh.config raises."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Union

if TYPE_CHECKING:  # pragma: no cover - import only for type checkers
    from tunnelmesh.coordinator.reflection import ReflectionAddresses
    from tunnelmesh.filter.policy import Rule
    from tunnelmesh.identity import PublicIdentity

IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]

DEFAULT_MESH_PREFIX = 24
DEFAULT_LISTEN_PORT = 51820
DEFAULT_INTERFACE = "tm0"
DEFAULT_MTU = 1420
MIN_MTU = 1280
MAX_MTU = 9000
MIN_MESH_PREFIX = 8
NETWORK_SECRET_BYTES = 32
WG_KEY_BYTES = 32
RUNG_NAMES = ("udp", "ssh", "relay")  # the transport ladder, best first
DEFAULT_SSH_PORT = 2222
DEFAULT_RELAY_PORT = 7401
DEFAULT_COORDINATOR_PORT = 7400


# --------------------------------------------------------------------------- errors


class ConfigError(Exception):
    """A config (or network secret) file that cannot be used.

    ``str()`` is ``"<path>:<line>: <message>"``, or ``"<path>: <message>"`` when the
    problem has no line (a missing file, a missing table).
    """

    path: Path
    line: int | None
    message: str

    def __init__(self, path: Path | str, line: int | None, message: str) -> None:
        super().__init__(path, line, message)
        self.path = Path(path)
        self.line = line
        self.message = message

    def __str__(self) -> str:
        if self.line is None:
            return f"{self.path}: {self.message}"
        return f"{self.path}:{self.line}: {self.message}"


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class PeerConfig:
    """One ``[[peers]]`` entry, checked."""

    name: str
    mesh_ip: ipaddress.IPv4Address
    identity: PublicIdentity | None
    #: 32 bytes: the identity's derived WireGuard key, or a plain peer's key.
    wireguard_public_key: bytes
    endpoint: tuple[str, int] | None
    persistent_keepalive: int
    #: Always starts with ``mesh_ip/32``.
    allowed_ips: tuple[IPNetwork, ...]
    #: Line of the peer's ``[[peers]]`` header in the config file.
    line: int


@dataclass(frozen=True)
class CoordinatorConfig:
    """The ``[coordinator]`` table: this node gets its peers from a coordinator."""

    #: How this node reaches the coordinator (http:// or https://): the first of `urls`.
    url: str
    #: Every coordinator of the network this node may use, in order of preference
    #: (`urls`, or `url` alone): it fails over between them (tunnelmesh.coordinator.failover).
    urls: tuple[str, ...]
    #: Serve the embedded coordinator on this (host, port); None = do not serve.
    serve: tuple[str, int] | None
    #: The embedded coordinator's database: its SQLite file, or a PostgreSQL connection
    #: string (without a password) that several coordinators share.
    db: Path | str
    #: A private CA (PEM) to verify the coordinator's and relay's TLS certificates with.
    ca_file: Path | None = None
    #: Reverse proxies in front of the embedded coordinator, trusted for X-Forwarded-For.
    trusted_proxies: frozenset[str] = frozenset()
    #: The coordinator's own certificate, pinned ("sha256:<hex>"): trusted alone, no CA.
    tls_fingerprint: str | None = None
    #: The embedded coordinator serves TLS with this certificate and key (PEM); None = plain HTTP.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    #: The embedded coordinator's STUN reflection service (`stun`, `stun_alternate`); None = off.
    stun: ReflectionAddresses | None = None
    #: On PostgreSQL: the file whose first line is the database's password, and where the
    #: other coordinators reach this one's relay links (default: from `serve`).
    db_password_file: Path | None = field(default=None, repr=False)  # where the secret is: kept out of reprs all the same
    cluster_url: str | None = None


@dataclass(frozen=True)
class RungChoice:
    """Which rungs of the ladder may carry a peer's traffic."""

    #: Enabled rungs, best first.
    rungs: tuple[str, ...] = RUNG_NAMES
    #: Only this rung (for testing a path), or None.
    force: str | None = None

    @property
    def enabled(self) -> tuple[str, ...]:
        return (self.force,) if self.force is not None else self.rungs


#: A static mesh's peers: UDP only (they have no signed SSH endpoints and no relay).
UDP_ONLY = RungChoice(rungs=("udp",))


@dataclass(frozen=True)
class TransportsConfig:
    """The ``[transports]`` table: the ladder and the SSH rung's endpoints."""

    default: RungChoice = RungChoice()
    #: Per-peer overrides, by peer name.
    peers: Mapping[str, RungChoice] = field(default_factory=dict)
    #: TCP port of this daemon's own SSH server (0 = serve none).
    ssh_port: int = DEFAULT_SSH_PORT
    #: The account of the forced-command bridge behind this machine's sshd, if set up.
    ssh_bridge_user: str | None = None
    ssh_bridge_port: int = 22
    #: The machine sshd's host public keys the node attests for `tunnelmesh ssh-config`;
    #: None: every /etc/ssh/ssh_host_*_key.pub (of a type peers accept).
    sshd_host_keys: tuple[Path, ...] | None = None
    #: Serve a WebSocket relay for the other members here (relay = true), or None.
    relay_listen: tuple[str, int] | None = None
    #: How members reach it, if not http://<address the coordinator sees>:<port>.
    relay_url: str | None = None

    def for_peer(self, name: str) -> RungChoice:
        return self.peers.get(name, self.default)


#: The NAT prober's default check interval (seconds) and its bounds.
DEFAULT_PROBE_INTERVAL, MIN_PROBE_INTERVAL, MAX_PROBE_INTERVAL = 300, 30, 86400
MAX_STUN_SERVERS = 8
#: Port mapping (docs/nat.md): the protocols, in the order tried, and the lifetime asked for.
PORT_MAPPING_PROTOCOLS = ("pcp", "nat-pmp", "upnp")
DEFAULT_PORT_MAPPING_LIFETIME, MIN_PORT_MAPPING_LIFETIME, MAX_PORT_MAPPING_LIFETIME = 7200, 20, 86400


@dataclass(frozen=True)
class NatConfig:
    """The ``[nat]`` table: the NAT prober's extra STUN servers and its interval (docs/nat.md)."""

    #: STUN servers asked besides the coordinator's reflection service, "host:port" each.
    stun_servers: tuple[str, ...] = ()
    #: Seconds between checks (also on address changes and when asked).
    probe_interval: int = DEFAULT_PROBE_INTERVAL
    #: Ask the gateway for a UDP mapping of the WireGuard port (PCP, NAT-PMP, UPnP IGD).
    port_mapping: bool = True
    #: Which of "pcp", "nat-pmp", "upnp" to try, in order.
    port_mapping_protocols: tuple[str, ...] = PORT_MAPPING_PROTOCOLS
    #: The lifetime asked for (seconds); the mapping is renewed at half what is granted.
    port_mapping_lifetime: int = DEFAULT_PORT_MAPPING_LIFETIME
    #: An IPv4 address:port that reaches this node's WireGuard port (a port forward made by
    #: hand): a candidate of kind "configured" in its record (docs/nat.md, "Candidates").
    public_endpoint: tuple[str, int] | None = None


@dataclass(frozen=True)
class NodeConfig:
    """A whole config file, checked. Paths in it are absolute."""

    path: Path
    name: str
    #: A private key file path (absolute), ``"agent"`` or ``"agent:SHA256:..."``.
    identity: str
    passphrase_file: Path | None
    network_secret_file: Path
    #: Static mode: this node's mesh address. None with a coordinator (it assigns one).
    mesh_ip: ipaddress.IPv4Address | None
    mesh_prefix: int
    listen_port: int
    interface: str
    mtu: int
    peers: tuple[PeerConfig, ...]
    coordinator: CoordinatorConfig | None = None
    transports: TransportsConfig = TransportsConfig()
    #: The ``[filter]`` table's allow-rules: what this node accepts on top of the network
    #: policy (docs/filter.md). None: no ``[filter]`` table.
    filter_rules: tuple[Rule, ...] | None = None
    #: The ``[metrics]`` table: serve Prometheus metrics on this (host, port) (docs/metrics.md).
    #: None: no ``[metrics]`` table, no metrics served.
    metrics_listen: tuple[str, int] | None = None
    #: An ssh-agent identity's agent socket (absolute); None: $SSH_AUTH_SOCK.
    agent_socket: Path | None = None
    #: Keep an ssh-agent identity's derived mesh key in the state directory (0600), for
    #: starts without the agent (docs/identity.md: the trade-off).
    cache_mesh_key: bool = False
    nat: NatConfig = NatConfig()
    #: Let the kernel hand the data path super-packets (TUN TSO/USO, UDP GSO/GRO) where it
    #: can; false: a packet per system call (for a kernel or device that misbehaves).
    offload: bool = True

    @property
    def mesh_network(self) -> ipaddress.IPv4Network:
        """The network routed into the tunnel interface (``mesh_ip/mesh_prefix``)."""
        assert self.mesh_ip is not None, "static mode only"
        return ipaddress.IPv4Network(f"{self.mesh_ip}/{self.mesh_prefix}", strict=False)
