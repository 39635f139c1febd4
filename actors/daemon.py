"""The daemon: config -> identity -> membership -> I/O edges -> the node (actors/node.py)
-> the services and actors only a daemon has.

`run_daemon` is the only entry from the CLI into `actors/` (`tunnelmesh up`): it loads
what the node starts from (`_load`), opens the node's edges (`_open_edges`), builds the
node on them, starts what runs beside it (`_start_services`: the TUN's addresses, the
embedded coordinator, the transports), adds the actors only a daemon has (coordinator
client, admitter, relay pool, control socket) and runs it.

Everything that can fail for a reason the user can fix (config, key, secret,
port, TUN) fails before the TUN device exists or removes it again, so a failed
start leaves no half-configured interface behind.
"""

from __future__ import annotations

import asyncio
import base64
import gc
import ipaddress
import logging
import os
import pwd
import shutil
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tunnelmesh import __version__
from tunnelmesh.clock import Clock
from tunnelmesh.config import ConfigError, NodeConfig, check_peer_keys, load_config, read_network_secret
from tunnelmesh.control_client import ControlError, NotRunning, request
from tunnelmesh.files import FileError, check_state_dir, lock_dir, read_pid, remove_stale_temps, write_atomic
from tunnelmesh.filter import Member
from tunnelmesh.identity import IdentityError, NodeIdentity
from tunnelmesh.paths import Paths
from tunnelmesh.wireguard import derive_psk

from .agent_identity import AgentProbe, load_daemon_identity, needed_for
from .control import ControlServer
from .datapath import DataPath
from .edges import UdpBind, UdpError
from .filter import FilterInputs
from .links import Transports
from .messages import PeerSpec, SyncFilter, SyncRelays
from .nat_prober import NatProber, local_addresses
from .node import Addresses, Node
from .runtime import Actor, Leftovers
from .tun import TunDevice, TunError

# A static node imports only what it runs: what coordinator mode, the relays, the SSH rung,
# the metrics and port mapping need (aiohttp, asyncssh, prometheus_client, async_upnp_client,
# SQLite) is imported where they start (tests/unit/test_startup_imports.py holds it so).
if TYPE_CHECKING:
    from tunnelmesh.coordinator.relay import Relay
    from tunnelmesh.links.attest import BridgeEndpoint
    from tunnelmesh.membership import MapSnapshot, PeerMap, PolicyRecord
    from tunnelmesh.netstate import NetworkState

    from .admitter import Admitter
    from .coordinator_client import CoordinatorClient
    from .links import PeerMapDirectory
    from .metrics import MetricsEndpoint
    from .port_mapper import PortMapper

log = logging.getLogger("tunnelmesh.daemon")


class StartupError(Exception):
    """The daemon cannot start; the message says why and what to do."""


async def _resolve(endpoint: tuple[str, int] | None) -> tuple[str, int] | None:
    if endpoint is None:
        return None
    host, port = endpoint
    if ":" in host:
        raise StartupError(f"peer endpoint [{host}]:{port}: IPv6 underlay addresses are not supported yet; use an IPv4 address or name")
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, family=socket.AF_INET, type=socket.SOCK_DGRAM)
    except socket.gaierror as exc:
        raise StartupError(f"cannot resolve peer endpoint {host}:{port}: {exc.strerror}") from None
    return infos[0][4][0], port


#: How old a temp file in the state directory must be to be taken for one a kill left (s).
STALE_TEMP_AGE = 60.0


def _refuse_answering_socket(paths: Paths) -> None:
    """With the lock free, a control socket should refuse connections (its daemon is gone);
    one that answers, or hangs, is a live daemon that holds no lock (one started by a
    tunnelmesh from before the lock): refused, never taken over."""
    if not (paths.control_socket.exists() or paths.control_socket.is_symlink()):
        return
    try:
        request(paths.control_socket, "ping_daemon", timeout=2)
    except NotRunning:
        return  # connection refused: stale
    except (ControlError, OSError):
        pass
    raise StartupError(f"a daemon answers on {paths.control_socket} without holding the state directory's lock "
                       "(started by an older tunnelmesh?); stop it with `tunnelmesh down`")


def claim_state_dir(paths: Paths) -> int:
    """Own the state directory for this daemon's life (`tunnelmesh.files.lock_dir`): the fd
    holding the lock. Refuses if a live daemon holds it; otherwise a pid file and control
    socket found there were left by a daemon that was killed or crashed, and are removed,
    as are the temp files of writes a kill cut short."""
    try:
        lock = lock_dir(paths.state_dir)
    except FileError as exc:
        raise StartupError(str(exc)) from None
    if lock is None:
        pid = read_pid(paths.pid_file)
        raise StartupError(f"tunnelmesh is already running with state dir {paths.state_dir}"
                           f"{f' (pid {pid})' if pid is not None else ''}; stop it with `tunnelmesh down`")
    try:
        _refuse_answering_socket(paths)
    except StartupError:
        os.close(lock)
        raise
    left = [path for path in (paths.pid_file, paths.control_socket) if path.is_symlink() or path.exists()]
    if left:
        pid = read_pid(paths.pid_file)
        for path in left:
            path.unlink(missing_ok=True)
        log.warning("removed %s left by a daemon that did not shut down (%s: killed or crashed)",
                    " and ".join(str(path) for path in left), f"pid {pid}" if pid is not None else "no pid")
    try:  # `tunnelmesh` commands write here without the lock: only temp files long past any write
        temps = remove_stale_temps(paths.state_dir, time.time() - STALE_TEMP_AGE)
    except OSError as exc:
        log.warning("cannot remove the temp files of cut-short writes in %s: %s", paths.state_dir, exc)
    else:
        if temps:
            log.info("removed the temp files of %d writes a kill cut short: %s", len(temps), ", ".join(temps))
    return lock


class ServedSite(Actor):
    """An aiohttp site the daemon serves: the embedded coordinator (on the node that made
    the network) or this node's relay (relay = true). Started before the actors run, so
    a busy port is a start-up error; this actor holds it open and closes it at shutdown,
    then awaits `after` (closes the coordinator's store)."""

    policy = "fatal"

    def __init__(self, name: str, runner: Any, after: Callable[[], Awaitable[None]] | None = None) -> None:
        super().__init__()
        self.name = name
        self.runner = runner
        self.after = after

    async def run(self) -> None:
        await asyncio.Event().wait()

    async def stop(self) -> None:
        await self.runner.cleanup()
        if self.after is not None:
            await self.after()


async def _start_coordinator(config: NodeConfig) -> ServedSite:
    from tunnelmesh.coordinator.app import make_app, serve
    from tunnelmesh.coordinator.cluster import ClusterSettingError, join_cluster
    from tunnelmesh.coordinator.reflection import start_reflection
    from tunnelmesh.coordinator.store import StoreError, open_store, read_password_file
    from tunnelmesh.tls import TlsError, certificate_fingerprint, server_context

    assert config.coordinator is not None and config.coordinator.serve is not None
    host, port = config.coordinator.serve
    tls = None  # plain HTTP: behind a TLS-terminating proxy (or an http:// network)
    if config.coordinator.tls_cert is not None and config.coordinator.tls_key is not None:
        try:
            tls = server_context(config.coordinator.tls_cert, config.coordinator.tls_key)
        except TlsError as exc:
            raise StartupError(f"embedded coordinator: {exc} ([coordinator] tls_cert, tls_key in {config.path})") from None
    coordinator = config.coordinator
    try:
        password = None if coordinator.db_password_file is None else read_password_file(coordinator.db_password_file)
    except StoreError as exc:
        raise StartupError(f"embedded coordinator: [coordinator] db_password_file {exc}") from None
    try:
        store = await open_store(coordinator.db, password)
    except StoreError as exc:
        raise StartupError(f"embedded coordinator: {exc}") from None
    app = make_app(store, trusted_proxies=coordinator.trusted_proxies)
    try:  # on PostgreSQL: relays across the coordinators sharing the database
        pin = None if coordinator.tls_cert is None else certificate_fingerprint(coordinator.tls_cert)
        join_cluster(app, store, (host, port), pin, coordinator.cluster_url)
    except (TlsError, ClusterSettingError) as exc:
        await store.close()
        raise StartupError(f"embedded coordinator: {exc} ([coordinator] cluster_url, tls_cert in {config.path})"
                           ) from None
    reflection = None
    if config.coordinator.stun is not None:  # before serving: the register reply and the metrics find it in app
        try:
            reflection = await start_reflection(app, config.coordinator.stun)
        except OSError as exc:
            await store.close()
            raise StartupError(f"embedded coordinator: STUN reflection cannot listen on {exc.strerror} (set "
                               f"[coordinator] stun and stun_alternate, or stun = false, in {config.path})") from None

    async def close() -> None:
        if reflection is not None:
            reflection.close()
        await store.close()

    try:
        runner = await serve(app, host, port, tls)
    except OSError as exc:
        await close()
        raise StartupError(f"embedded coordinator: cannot listen on {host}:{port}: {exc.strerror} "
                           f"(set [coordinator] serve in {config.path})") from None
    return ServedSite("coordinator", runner, close)


async def _set_up_network(paths: Paths, state: NetworkState, ca_file: str | None, tls_fingerprint: str | None,
                          policy: PolicyRecord | None) -> None:
    """On the admin node: make sure its embedded coordinator holds the network and at
    least the network policy this node keeps (idempotent; the first start after `init`
    is when it happens)."""
    from tunnelmesh.coordinator.client import Coordinator, CoordinatorError
    from tunnelmesh.membership import AdminKey, MembershipError

    try:
        admin = AdminKey.load(paths.admin_key)
    except MembershipError as exc:
        raise StartupError(str(exc)) from None
    try:
        async with Coordinator(state.url, admin=admin, ca_file=ca_file, tls_fingerprint=tls_fingerprint) as coordinator:
            await coordinator.setup(state.network.to_wire(), state.member.to_wire())
            if policy is not None and await coordinator.offer_policy(policy.to_wire()):
                log.info("network policy v%d re-sent to the coordinator (it held an older one or none: a first "
                         "start, or a database restored from an older backup)", policy.version)
    except CoordinatorError as exc:
        raise StartupError(f"embedded coordinator at {state.url}: {exc}") from None


@dataclass
class TransportSetup:
    """What starting the transports gave the rest of the assembly, beside the rungs in
    `Transports`: the records to register with the coordinator, this node's relay, and
    what to call when the peer map changes."""

    ssh_record: dict[str, Any] | None = None  # this node's signed SSH endpoint, for the coordinator
    relay_offer: dict[str, Any] | None = None  # the relay this node serves, for the coordinator
    relay_service: ServedSite | None = None
    relay_served: Relay | None = None  # what relay_service serves, for status
    own_relay: tuple[str, str] | None = None  # where this node reaches its own relay (loopback), its id
    on_map_changed: list[Callable[[], None]] = field(default_factory=list)
    directory: PeerMapDirectory | None = None  # the members' verified SSH endpoints (coordinator mode)


async def _start_transports(
    config: NodeConfig, paths: Paths, identity: NodeIdentity, state: NetworkState,
    current_map: Callable[[], MapSnapshot], datapath: DataPath, transports: Transports, setup: TransportSetup,
) -> None:
    """Start the SSH rung (if any peer may use it: its own server, and the bridge behind
    this machine's sshd when set up), this node's relay (relay = true) and make the
    coordinator's relay client (if any peer may use the relay rung). Each goes into
    `transports` or `setup` as soon as it runs, so that a later failure closes it."""
    from tunnelmesh.links import LinkError
    from tunnelmesh.links.attest import BridgeEndpoint
    from tunnelmesh.links.bridge import BridgeError, read_system_host_key, write_authorized_keys
    from tunnelmesh.links.relay import RelayClient
    from tunnelmesh.links.ssh import SshRung, load_or_create_host_key

    from .links import PeerMapDirectory

    transports_config = config.transports
    wanted = {rung for choice in (transports_config.default, *transports_config.peers.values())
              for rung in choice.enabled}
    if transports_config.relay_listen is not None:
        await _start_relay_service(config, identity, state, current_map, setup, datapath.clock)
    if "relay" in wanted:
        transports.relay = RelayClient(state.url, identity, state.network.network, datapath, ca_file=_ca_file(config),
                                       tls_fingerprint=_tls_fingerprint(config), clock=datapath.clock)
    # Every member's SSH endpoint record verified as soon as it is served (for the SSH rung and
    # `tunnelmesh ssh-config`), so an older one served later is refused.
    directory = setup.directory = PeerMapDirectory(current_map, datapath.clock)
    directory.check_all()
    setup.on_map_changed.append(directory.check_all)
    sshd_host_keys = _sshd_host_keys(config)
    if "ssh" not in wanted:
        if sshd_host_keys:  # attested for `ssh <this node>` alone: no SSH rung to offer
            setup.ssh_record = await _ssh_record(config, identity, port=None, host_key=None, bridge=None,
                                                 issued=int(datapath.clock.wall()), sshd_host_keys=sshd_host_keys)
        return
    port = transports_config.ssh_port or None
    try:
        host_key = load_or_create_host_key(paths.ssh_host_key) if port is not None else None
        rung = SshRung(identity=identity, host_key=host_key, port=port, directory=directory, sink=datapath,
                       clock=datapath.clock)
        await rung.start()
    except LinkError as exc:
        raise StartupError(f"SSH rung: {exc} ([transports] ssh_port in {config.path})") from None
    transports.ssh = rung
    bridge = None
    if transports_config.ssh_bridge_user is not None:
        user = transports_config.ssh_bridge_user
        try:
            account = pwd.getpwnam(user)
            bridge = BridgeEndpoint(port=transports_config.ssh_bridge_port, user=user, host_key=read_system_host_key())
            await rung.start_bridge(paths.bridge_socket, {account.pw_uid}, account.pw_gid)
        except KeyError:
            raise StartupError(f"[transports] ssh_bridge_user: no account {user!r}; make it with "
                               f"`tunnelmesh ssh-bridge --setup --user {user}` ({config.path})") from None
        except (BridgeError, LinkError, OSError) as exc:
            raise StartupError(f"SSH bridge: {exc}") from None
        command = f"{_tunnelmesh_program()} --state-dir {paths.state_dir}"

        def authorize_members() -> None:
            members = [(key, m.identity.ssh_public_key, m.name) for key, m in current_map().members.items()]
            try:
                write_authorized_keys(user, members, command)
            except (BridgeError, OSError) as exc:
                log.error("SSH bridge: cannot update %s's authorized_keys: %s", user, exc)

        authorize_members()
        setup.on_map_changed.append(authorize_members)
    host_key_line = " ".join(host_key.export_public_key("openssh").decode().split()[:2]) if host_key else None
    if port is not None or bridge is not None or sshd_host_keys:
        setup.ssh_record = await _ssh_record(config, identity, port=port, host_key=host_key_line, bridge=bridge,
                                             issued=int(datapath.clock.wall()),  # its epoch: newer records win
                                             sshd_host_keys=sshd_host_keys)


async def _ssh_record(config: NodeConfig, identity: NodeIdentity, *, port: int | None, host_key: str | None,
                      bridge: BridgeEndpoint | None, issued: int, sshd_host_keys: tuple[str, ...]) -> dict[str, Any]:
    """This node's signed SSH endpoint record, which must fit the coordinator's bound on it:
    one it refuses (400 on /v1/register) would keep the node from ever getting its peers."""
    from tunnelmesh.links.attest import make_attestation
    from tunnelmesh.membership.peermap import MAX_SSH_ATTESTATION, ssh_record_size

    record = await make_attestation(identity, port=port, host_key=host_key, bridge=bridge, issued=issued,
                                    sshd_host_keys=sshd_host_keys)
    size = ssh_record_size(record)
    if size > MAX_SSH_ATTESTATION:
        keys_size = ssh_record_size({"sshd_host_keys": sorted(set(sshd_host_keys))})
        found = "" if config.transports.sshd_host_keys is not None else f", found as {SSHD_HOST_KEYS}"
        raise StartupError(
            f"[transports] sshd_host_keys: the SSH endpoint record is {size} bytes, over the coordinator's limit "
            f"of {MAX_SSH_ATTESTATION}; its {len(set(sshd_host_keys))} sshd host keys{found} take {keys_size} of "
            f"them: list fewer or smaller keys (e.g. the ed25519 one) ({config.path})")
    return record


#: Where the machine's sshd keeps its host keys, unless [transports] sshd_host_keys says.
SSHD_HOST_KEYS = "/etc/ssh/ssh_host_*_key.pub"


def _sshd_host_keys(config: NodeConfig) -> tuple[str, ...]:
    """The machine sshd's host keys this node attests (for `tunnelmesh ssh-config` on the
    others): the configured files, where one that cannot be read is a start-up error, or
    else those of SSHD_HOST_KEYS, where a key peers would refuse (DSA) is left out."""
    from tunnelmesh.links.attest import MAX_SSHD_HOST_KEYS, AttestationError, read_sshd_host_keys

    configured = config.transports.sshd_host_keys
    if configured is not None:
        try:
            keys = read_sshd_host_keys(configured)
        except AttestationError as exc:
            raise StartupError(f"{exc} ([transports] sshd_host_keys in {config.path})") from None
        if len(set(keys)) > MAX_SSHD_HOST_KEYS:
            raise StartupError(f"[transports] sshd_host_keys: at most {MAX_SSHD_HOST_KEYS} keys ({config.path})")
        return keys
    found: list[str] = []
    for path in sorted(Path("/").glob(SSHD_HOST_KEYS.lstrip("/")))[:MAX_SSHD_HOST_KEYS]:
        try:
            found += read_sshd_host_keys([path])
        except AttestationError as exc:
            log.info("not attested for ssh-config: %s", exc)
    return tuple(found)


async def _start_relay_service(config: NodeConfig, identity: NodeIdentity, state: NetworkState,
                               current_map: Callable[[], MapSnapshot], setup: TransportSetup, clock: Clock) -> None:
    """This node's relay (relay = true): /relay on its own port for the current members."""
    from aiohttp import web

    from tunnelmesh.coordinator.relay import Relay
    from tunnelmesh.coordinator.app import serve

    from .links import member_identities

    assert config.transports.relay_listen is not None
    host, port = config.transports.relay_listen
    relay_id = base64.b64encode(identity.public.wg_public_key).decode()
    relay = Relay(state.network.network, member_identities(current_map, identity), relay_id, clock=clock)
    app = web.Application()
    app.router.add_get("/relay", relay.handler)

    async def close_connections(app: web.Application) -> None:
        await relay.close()  # before the runner waits for handlers: held WebSockets would hold it up

    app.on_shutdown.append(close_connections)
    try:
        runner = await serve(app, host, port)
    except OSError as exc:
        raise StartupError(f"relay: cannot listen on {host}:{port}: {exc.strerror} "
                           f"([transports] relay_listen in {config.path})") from None
    setup.relay_service, setup.relay_served = ServedSite("relay-service", runner), relay
    url = config.transports.relay_url
    setup.relay_offer = {"url": url} if url is not None else {"port": port}
    setup.own_relay = (f"http://{'127.0.0.1' if host == '0.0.0.0' else host}:{port}", relay_id)
    setup.on_map_changed.append(relay.member_changed)
    log.info("relay: serving members on %s:%d (%s)", host, port, url or "at the address the coordinator sees")


def _ca_file(config: NodeConfig) -> str | None:
    """The private CA for the coordinator's and relay's TLS, as the HTTP clients take it."""
    ca_file = config.coordinator.ca_file if config.coordinator is not None else None
    return str(ca_file) if ca_file is not None else None


def _tls_fingerprint(config: NodeConfig) -> str | None:
    """The coordinator's own certificate, pinned: its clients (and its relay's) trust that alone."""
    return config.coordinator.tls_fingerprint if config.coordinator is not None else None


def _tunnelmesh_program() -> str:
    """This installation's `tunnelmesh`, by absolute path (sshd runs forced commands
    with a minimal PATH)."""
    beside = Path(sys.executable).with_name("tunnelmesh")
    return str(beside) if beside.exists() else (shutil.which("tunnelmesh") or "/usr/bin/tunnelmesh")


def _static_peers(config: NodeConfig, endpoints: list[tuple[str, int] | None]) -> list[PeerSpec]:
    return [
        PeerSpec(peer.name, peer.mesh_ip, peer.identity.fingerprint if peer.identity is not None else None,
                 peer.wireguard_public_key, peer.allowed_ips, endpoint, peer.persistent_keepalive,
                 plain_wireguard=peer.identity is None)
        for peer, endpoint in zip(config.peers, endpoints)
    ]


def _static_members(config: NodeConfig) -> tuple[Member, ...]:
    """The static config's peers as the packet filter sees them: a peer's allowed IPs
    beyond its mesh address are routes it may send from."""
    return tuple(Member(peer.name, peer.wireguard_public_key, peer.mesh_ip, None,
                        tuple(net for net in peer.allowed_ips if net != ipaddress.ip_network(peer.mesh_ip)))
                 for peer in config.peers)


@dataclass(frozen=True)
class Loaded:
    """What the daemon starts from, read and checked: the config, the identity, in
    coordinator mode the joined network and the cached peer map, and the PSK."""

    config: NodeConfig
    identity: NodeIdentity
    state: NetworkState | None  # None in static mode
    peer_map: PeerMap | None  # None in static mode
    psk: bytes = field(repr=False)


@dataclass
class Services:
    """What the daemon runs beside the node's edges, started before the actors run so that
    a busy port or a bad record is a start-up error: the embedded coordinator, and the
    transports (the rungs, in the node's `Transports`, and `transport_setup`)."""

    coordinator: ServedSite | None = None
    coordinator_address: str | None = None  # where the embedded coordinator listens, for status
    transport_setup: TransportSetup = field(default_factory=TransportSetup)
    metrics: tuple[ServedSite, MetricsEndpoint] | None = None  # [metrics]: the site, and what it serves


def _check_state_dir(paths: Paths) -> None:
    try:
        check_state_dir(paths.state_dir)  # root writes there: nobody else may be able to
    except FileError as exc:
        raise StartupError(str(exc)) from None


async def _load(paths: Paths) -> Loaded | None:
    """The config, the identity (a key file or ssh-agent), the membership and the network secret.
    None: stopped while waiting for the ssh-agent to hold the identity's key."""
    state: NetworkState | None = None
    peer_map: PeerMap | None = None
    try:
        config = load_config(paths.config, state_dir=paths.state_dir)
        try:
            identity = await load_daemon_identity(config, paths)
        except IdentityError as exc:
            raise _identity_config_error(config, exc) from None
        if identity is None:
            return None
        if config.coordinator is None:
            check_peer_keys(config, identity.public.wg_public_key)
        else:
            from tunnelmesh.netstate import StateError  # lazily: membership is coordinator mode's

            try:
                state, peer_map = _load_membership(paths, identity)
            except StateError as exc:
                raise StartupError(str(exc)) from None
            # The config is the word on how to reach the coordinator (network.json keeps the URL joined with).
            state = replace(state, url=config.coordinator.url)
        secret = read_network_secret(config.network_secret_file)
        psk = derive_psk(secret)
    except (ConfigError, IdentityError) as exc:
        raise StartupError(str(exc)) from None
    return Loaded(config, identity, state, peer_map, psk)


def _addresses(loaded: Loaded) -> Addresses:
    config, state = loaded.config, loaded.state
    if state is not None:
        network = state.network
        return Addresses(
            ipaddress.IPv4Interface(f"{state.member.ipv4}/{network.cidr4.prefixlen}"),
            ipaddress.IPv6Interface(f"{state.member.ipv6}/{network.ula6.prefixlen}"), (),
        )
    assert config.mesh_ip is not None
    return Addresses(ipaddress.IPv4Interface(f"{config.mesh_ip}/{config.mesh_prefix}"), None,
                     tuple(net for peer in config.peers for net in peer.allowed_ips))


async def _initial_peers(config: NodeConfig, cached_map: MapSnapshot | None) -> list[PeerSpec]:
    """The peers the node starts with: the cached map's members, or the static config's
    peers (their endpoints resolved now: a name that does not resolve is a start-up error)."""
    if cached_map is not None:
        from .coordinator_client import peer_spec

        return [peer_spec(member, cached_map, config.transports) for member in cached_map.members.values()]
    return _static_peers(config, [await _resolve(peer.endpoint) for peer in config.peers])


def _open_edges(config: NodeConfig) -> tuple[UdpBind, TunDevice]:
    """The UDP socket and the TUN device (not configured yet)."""
    try:
        bind = UdpBind.open(config.listen_port, offload=config.offload)
    except UdpError as exc:
        raise StartupError(f"{exc} ({config.path})") from None
    try:
        tun = TunDevice.create(config.interface, offload=config.offload)
    except TunError as exc:
        bind.close()
        raise StartupError(str(exc)) from None
    return bind, tun


async def _start_services(paths: Paths, loaded: Loaded, tun: TunDevice, node: Node,
                          current_map: Callable[[], MapSnapshot]) -> Services:
    """Configure the TUN, start the embedded coordinator (on the node that serves it) and
    the transports (coordinator mode). On a start-up error everything opened so far,
    the node's edges too, is closed again."""
    config, state = loaded.config, loaded.state
    addresses, transports = node.addresses, node.parts.transports
    services = Services()
    try:
        await tun.configure(addresses.ipv4, config.mtu, addresses.routes, address6=addresses.ipv6)
        if config.coordinator is not None and config.coordinator.serve is not None:
            services.coordinator = await _start_coordinator(config)
            services.coordinator_address = "{}:{}".format(*config.coordinator.serve)
            if state is not None and paths.admin_key.exists():
                await _set_up_network(paths, state, _ca_file(config), _tls_fingerprint(config),
                                      loaded.peer_map.policy if loaded.peer_map is not None else None)
        if state is not None:
            await _start_transports(config, paths, loaded.identity, state, current_map, node.datapath, transports,
                                    services.transport_setup)
        if config.metrics_listen is not None:  # last: nothing after it can fail and leave it open
            from .metrics import start_metrics

            services.metrics = await start_metrics(config, services.coordinator)
    except (TunError, StartupError) as exc:
        if transports.ssh is not None:
            await transports.ssh.close()
        if services.transport_setup.relay_service is not None:
            await services.transport_setup.relay_service.stop()
        if services.coordinator is not None:
            await services.coordinator.stop()
        tun.close()
        node.parts.bind.close()
        raise StartupError(str(exc)) from None
    return services


async def run_daemon(paths: Paths) -> int:
    """Run until `down`, SIGTERM or SIGINT. Returns the process exit code."""
    _check_state_dir(paths)
    lock = claim_state_dir(paths)  # held until the process ends: released by the kernel even on SIGKILL
    try:
        return await _run_claimed(paths)
    finally:
        os.close(lock)


async def _run_claimed(paths: Paths) -> int:
    leftovers = Leftovers()  # what is open now (the state directory's lock too) is not the daemon's to close
    loaded = await _load(paths)
    if loaded is None:
        return 0
    config, identity, state = loaded.config, loaded.identity, loaded.state
    cached_map = loaded.peer_map.snapshot() if loaded.peer_map is not None else None
    peers = await _initial_peers(config, cached_map)
    bind, tun = _open_edges(config)
    node = Node(name=config.name, interface=config.interface, identity=identity, mtu=config.mtu, tun=tun, bind=bind,
                addresses=_addresses(loaded), psk=loaded.psk, transports=Transports(), peers=peers)
    client: CoordinatorClient | None = None

    def current_map() -> MapSnapshot:
        """The peer map as its readers take it: the coordinator client's latest snapshot
        (the cached map's until the client exists: the transports start before it)."""
        snapshot = client.snapshot if client is not None else cached_map
        assert snapshot is not None
        return snapshot

    services = await _start_services(paths, loaded, tun, node, current_map)
    transports, setup, datapath = node.parts.transports, services.transport_setup, node.datapath
    if state is None:
        static = FilterInputs(_static_members(config), None)
        node.add_filter(node_rules=config.filter_rules, inputs=lambda: static, network=False)
    else:  # coordinator mode's actors, imported here alone: a static node never loads them
        from tunnelmesh.links.relay import RelayClient
        from tunnelmesh.nat.report import CONFIGURED, Candidate

        from .admitter import Admitter
        from .coordinator_client import CoordinatorClient
        from .filter import snapshot_inputs
        from .links import RelayConnection, RelayPool, SshServer
        from .port_mapper import PortMapper

        packet_filter = node.add_filter(node_rules=config.filter_rules, network=True,
                                        inputs=lambda: snapshot_inputs(current_map(), state.policy_expected))
        setup.on_map_changed.append(lambda: packet_filter.tell_latest(SyncFilter, SyncFilter()))
    if services.coordinator is not None:
        node.add(services.coordinator)
    if transports.ssh is not None:
        node.add(SshServer(transports.ssh))
    if transports.relay is not None:
        node.add(RelayConnection(transports.relay))
    if setup.relay_service is not None:
        node.add(setup.relay_service)
    admitter: Admitter | None = None
    port_mapper: PortMapper | None = None
    if state is not None and loaded.peer_map is not None:
        client = node.add(CoordinatorClient(
            state, identity, loaded.peer_map, node.mesh, node.bus, cache_path=paths.peer_map_cache,
            secret_path=config.network_secret_file, listen_port=datapath.port,
            on_revoked=lambda why: node.shutdown(why, exit_code=1),
            transports=config.transports, ssh_record=setup.ssh_record,
            relay_offer=setup.relay_offer, on_map_changed=setup.on_map_changed,
            ca_file=_ca_file(config), interface=config.interface, tls_fingerprint=_tls_fingerprint(config),
            clock=node.parts.clock,
            public_endpoint=None if config.nat.public_endpoint is None else Candidate(*config.nat.public_endpoint,
                                                                                      CONFIGURED),
            urls=config.coordinator.urls if config.coordinator is not None else (),
            # The coordinator's relay rung follows the client to the coordinator in use.
            on_coordinator_url=[transports.relay.move_to] if transports.relay is not None else [],
        ))
        if config.nat.port_mapping:  # the gateway's mapping of our UDP port, registered as a candidate
            port_mapper = node.add(PortMapper(datapath.port, [client.set_mapped],
                                              protocols=config.nat.port_mapping_protocols,
                                              lifetime=config.nat.port_mapping_lifetime))
        if paths.admin_key.exists():  # the admin's machine countersigns joins made with an invite
            admitter = node.add(Admitter(paths, node.bus, lambda: client.url))  # the coordinator in use
        if transports.relay is not None:  # relays that members serve, as the map offers them
            ca_file = _ca_file(config)
            pool = node.add(RelayPool(
                current_map, setup.own_relay, state.url,
                lambda url, relay, guard: RelayClient(url, identity, state.network.network, datapath, ca_file=ca_file,
                                                      relay=relay, guard=guard, clock=datapath.clock),
                transports, node.supervisor))
            setup.on_map_changed.append(lambda: pool.tell_latest(SyncRelays, SyncRelays()))
    prober = node.add(NatProber(  # from the WireGuard port: the coordinator's reflection service, [nat] stun_servers
        send=datapath.bind.sendto, register=datapath.register_datagrams, port=datapath.port,
        servers=lambda: [*(f"{host}:{port}" for host, port in (client.stun_servers if client else ())),
                         *config.nat.stun_servers],
        local_addresses=lambda: local_addresses(config.interface), probe_interval=config.nat.probe_interval,
        on_change=[client.set_nat_report] if client is not None else [], clock=node.parts.clock))
    node.mesh.own_nat = lambda: prober.report  # sessions choose how to punch by it (tunnelmesh/punch.py)
    api = node.control_api(coordinator=client, serving_coordinator=services.coordinator_address, admitter=admitter,
                           serving_relay=setup.relay_served, ssh_directory=setup.directory,
                           agent_probe=AgentProbe(identity, needed_for(config)), nat_prober=prober,
                           port_mapper=port_mapper)
    node.add(ControlServer(paths.control_socket, api.handlers(), node.bus))
    if services.metrics is not None:
        metrics_site, metrics = services.metrics
        metrics.status = lambda: api.status({})  # a scrape is a `status`: the actors answer, the data path pays nothing
        node.add(metrics_site)

    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, node.shutdown, f"signal {signal.Signals(signum).name}")
    try:
        write_atomic(paths.pid_file, f"{os.getpid()}\n".encode())
    except FileError as exc:
        log.warning("%s", exc)  # `down` only waits on it: not worth failing the start for
    log.info(
        "tunnelmesh %s up: %s %s on %s, UDP port %d, %d peers, identity %s%s",
        __version__, config.name, node.addresses.ipv4.ip, config.interface, datapath.port, len(node.peers),
        identity.public.fingerprint, f", coordinator {state.url}" if state is not None else ", static mode",
    )
    # What start-up made (modules, config, actors) lives as long as the daemon: out of the
    # collector's reach, a full collection no longer walks it (a pause in the data path).
    gc.freeze()
    try:
        result = await node.run()
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
        for path in (paths.pid_file, paths.control_socket):
            try:
                path.unlink()
            except FileNotFoundError:
                pass
    left = await leftovers.found()
    if left:
        log.error("left behind at shutdown: %s", "; ".join(left))
    log.info("tunnelmesh down: %s", result.reason)
    return result.exit_code


def _load_membership(paths: Paths, identity: NodeIdentity) -> tuple[NetworkState, PeerMap]:
    """The joined network and the cached peer map; refuses a node that was revoked or
    whose key is not the one that joined."""
    from tunnelmesh.netstate import NetworkState, StateError, load_peer_map

    state = NetworkState.load(paths.network_state)
    if state.member.wg_key != identity.public.wg_public_key:
        raise StateError(
            f"this node joined as {state.member.name} with the key {state.member.identity.fingerprint}, but its "
            f"identity is now {identity.public.fingerprint}; restore that key, or join again with a new invite"
        )
    peer_map, rejected = load_peer_map(paths.peer_map_cache, state)
    for reason in rejected:
        log.warning("peer map cache: %s", reason)
    revocation = peer_map.revoked(state.member)
    if revocation is not None:
        raise StateError(f"this node ({state.member.name}) was revoked by the network admin; "
                         "to come back, join again with a new invite")
    return state, peer_map


def _identity_config_error(config: Any, exc: IdentityError) -> ConfigError:
    """An identity that cannot be loaded (unreadable key file, no agent, ...) is a
    config problem: name the config file and the line of [node] identity."""
    from tunnelmesh.config import Locator

    try:
        line = Locator(config.path.read_text(errors="replace")).line_of("node", "identity")
    except OSError:
        line = None
    return ConfigError(config.path, line, f"[node]: identity: {exc}")


def configure_logging(level: str, log_file: Path | None = None) -> None:
    handler: logging.Handler = logging.FileHandler(log_file) if log_file else logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("asyncssh").setLevel(logging.WARNING)
