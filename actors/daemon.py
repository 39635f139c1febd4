"""Daemon assembly: config -> identity -> I/O edges -> core -> actors.

`run_daemon` is the only entry from the CLI into `actors/` (`tunnelmesh up`).
Everything that can fail for a reason the user can fix (config, key, secret,
port, TUN) fails before the TUN device exists or removes it again, so a failed
start leaves no half-configured interface behind.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import logging
import os
import pwd
import shutil
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunnelmesh import __version__
from tunnelmesh.config import ConfigError, NodeConfig, check_peer_keys, load_config, read_network_secret
from tunnelmesh.control_client import NotRunning, request
from tunnelmesh.files import FileError, check_state_dir, write_atomic
from tunnelmesh.identity import IdentityError, NodeIdentity, load_identity
from tunnelmesh.coordinator.relay import Relay
from tunnelmesh.links.relay import RelayClient
from tunnelmesh.membership import MapSnapshot, PeerMap
from tunnelmesh.netstate import NetworkState, StateError, load_peer_map
from tunnelmesh.paths import Paths
from tunnelmesh.wireguard import Device, derive_psk

from .control import ControlServer, EventBus
from .control_api import ControlApi
from .admitter import Admitter
from .coordinator_client import CoordinatorClient, peer_spec
from .datapath import DataPath
from .edges import Bind, Tun, UdpBind, UdpError
from .links import RelayConnection, RelayPool, SshServer, Transports
from .mesh import Mesh
from .messages import PeerSpec, Start, SyncRelays
from .runtime import Actor, Leftovers, Supervisor
from .tun import TunDevice, TunError

log = logging.getLogger("tunnelmesh.daemon")


class StartupError(Exception):
    """The daemon cannot start; the message says why and what to do."""


class IdentityActor(Actor):
    """Owns the node's SSH-key identity; answers who this node is."""

    name = "identity"
    policy = "fatal"

    def __init__(self, identity: NodeIdentity) -> None:
        super().__init__()
        self.identity = identity

    async def handle(self, message: Any) -> Any:
        if message == "whoami":
            public = self.identity.public
            return {
                "fingerprint": public.fingerprint,
                "ssh_public_key": public.ssh_public_key,
                "wireguard_public_key": base64.b64encode(public.wg_public_key).decode(),
            }
        raise ValueError(f"unknown request {message!r}")


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


def _already_running(paths: Paths) -> bool:
    try:
        request(paths.control_socket, "ping_daemon", timeout=2)
    except NotRunning:
        return False
    except Exception:
        return True
    return True


@dataclass(frozen=True)
class Addresses:
    """What the TUN device gets: this node's mesh addresses and the routes into the tunnel."""

    ipv4: ipaddress.IPv4Interface
    ipv6: ipaddress.IPv6Interface | None
    routes: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]


class ServedSite(Actor):
    """An aiohttp site the daemon serves: the embedded coordinator (on the node that made
    the network) or this node's relay (relay = true). Started before the actors run, so
    a busy port is a start-up error; this actor holds it open and closes it at shutdown,
    then calls `after` (the coordinator's SQLite store)."""

    policy = "fatal"

    def __init__(self, name: str, runner: Any, after: Callable[[], None] | None = None) -> None:
        super().__init__()
        self.name = name
        self.runner = runner
        self.after = after

    async def run(self) -> None:
        await asyncio.Event().wait()

    async def stop(self) -> None:
        await self.runner.cleanup()
        if self.after is not None:
            self.after()


async def _start_coordinator(config: NodeConfig) -> ServedSite:
    from tunnelmesh.coordinator.service import make_app, serve
    from tunnelmesh.coordinator.store import Store, StoreError
    from tunnelmesh.tls import TlsError, server_context

    assert config.coordinator is not None and config.coordinator.serve is not None
    host, port = config.coordinator.serve
    tls = None  # plain HTTP: behind a TLS-terminating proxy (or an http:// network)
    if config.coordinator.tls_cert is not None and config.coordinator.tls_key is not None:
        try:
            tls = server_context(config.coordinator.tls_cert, config.coordinator.tls_key)
        except TlsError as exc:
            raise StartupError(f"embedded coordinator: {exc} ([coordinator] tls_cert, tls_key in {config.path})") from None
    try:
        store = Store.open(config.coordinator.db)
    except StoreError as exc:
        raise StartupError(f"embedded coordinator: {exc}") from None
    try:
        runner = await serve(make_app(store, trusted_proxies=config.coordinator.trusted_proxies), host, port, tls)
    except OSError as exc:
        store.close()
        raise StartupError(f"embedded coordinator: cannot listen on {host}:{port}: {exc.strerror} "
                           f"(set [coordinator] serve in {config.path})") from None
    return ServedSite("coordinator", runner, store.close)


async def _set_up_network(paths: Paths, state: NetworkState, ca_file: str | None, tls_fingerprint: str | None
                          ) -> None:
    """On the admin node: make sure its embedded coordinator holds the network
    (idempotent; the first start after `init` is when it happens)."""
    from tunnelmesh.coordinator.client import Coordinator, CoordinatorError
    from tunnelmesh.membership import AdminKey, MembershipError

    try:
        admin = AdminKey.load(paths.admin_key)
    except MembershipError as exc:
        raise StartupError(str(exc)) from None
    try:
        async with Coordinator(state.url, admin=admin, ca_file=ca_file, tls_fingerprint=tls_fingerprint) as coordinator:
            await coordinator.setup(state.network.to_wire(), state.member.to_wire())
    except CoordinatorError as exc:
        raise StartupError(f"embedded coordinator at {state.url}: {exc}") from None


@dataclass
class Started:
    """What `_start_transports` started, for the rest of the assembly."""

    ssh_record: dict[str, Any] | None = None  # this node's signed SSH endpoint, for the coordinator
    relay_offer: dict[str, Any] | None = None  # the relay this node serves, for the coordinator
    relay_service: ServedSite | None = None
    relay_served: Relay | None = None  # what relay_service serves, for status
    own_relay: tuple[str, str] | None = None  # where this node reaches its own relay (loopback), its id
    on_map_changed: list[Callable[[], None]] = field(default_factory=list)


async def _start_transports(
    config: NodeConfig, paths: Paths, identity: NodeIdentity, state: NetworkState,
    current_map: Callable[[], MapSnapshot], datapath: DataPath, transports: Transports,
) -> Started:
    """Start the SSH rung (if any peer may use it: its own server, and the bridge behind
    this machine's sshd when set up), this node's relay (relay = true) and make the
    coordinator's relay client (if any peer may use the relay rung)."""
    from tunnelmesh.links import LinkError
    from tunnelmesh.links.attest import BridgeEndpoint, make_attestation
    from tunnelmesh.links.bridge import BridgeError, read_system_host_key, write_authorized_keys
    from tunnelmesh.links.relay import RelayClient
    from tunnelmesh.links.ssh import SshRung, load_or_create_host_key

    from .links import PeerMapDirectory

    tcfg = config.transports
    wanted = {rung for choice in (tcfg.default, *tcfg.peers.values()) for rung in choice.enabled}
    started = Started()
    if tcfg.relay_listen is not None:
        await _start_relay_service(config, identity, state, current_map, started)
    if "relay" in wanted:
        transports.relay = RelayClient(state.url, identity, state.network.network, datapath, ca_file=_ca_file(config),
                                       tls_fingerprint=_tls_fingerprint(config))
    if "ssh" not in wanted:
        return started
    port = tcfg.ssh_port or None
    try:
        host_key = load_or_create_host_key(paths.ssh_host_key) if port is not None else None
        directory = PeerMapDirectory(current_map)
        rung = SshRung(identity=identity, host_key=host_key, port=port, directory=directory, sink=datapath)
        await rung.start()
    except LinkError as exc:
        raise StartupError(f"SSH rung: {exc} ([transports] ssh_port in {config.path})") from None
    transports.ssh = rung
    directory.check_all()  # every SSH endpoint record seen, so an older one served later is refused
    started.on_map_changed.append(directory.check_all)
    bridge = None
    if tcfg.ssh_bridge_user is not None:
        user = tcfg.ssh_bridge_user
        try:
            account = pwd.getpwnam(user)
            bridge = BridgeEndpoint(port=tcfg.ssh_bridge_port, user=user, host_key=read_system_host_key())
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
        started.on_map_changed.append(authorize_members)
    host_key_line = " ".join(host_key.export_public_key("openssh").decode().split()[:2]) if host_key else None
    if port is not None or bridge is not None:
        started.ssh_record = await make_attestation(identity, port=port, host_key=host_key_line, bridge=bridge,
                                                    issued=int(time.time()))  # its epoch: newer records win
    return started


async def _start_relay_service(config: NodeConfig, identity: NodeIdentity, state: NetworkState,
                               current_map: Callable[[], MapSnapshot], started: Started) -> None:
    """This node's relay (relay = true): /relay on its own port for the current members."""
    from aiohttp import web

    from tunnelmesh.coordinator.service import serve

    from .links import member_identities

    assert config.transports.relay_listen is not None
    host, port = config.transports.relay_listen
    relay_id = base64.b64encode(identity.public.wg_public_key).decode()
    relay = Relay(state.network.network, member_identities(current_map, identity), relay_id)
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
    started.relay_service, started.relay_served = ServedSite("relay-service", runner), relay
    url = config.transports.relay_url
    started.relay_offer = {"url": url} if url is not None else {"port": port}
    started.own_relay = (f"http://{'127.0.0.1' if host == '0.0.0.0' else host}:{port}", relay_id)
    started.on_map_changed.append(relay.member_changed)
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
                 peer.wireguard_public_key, peer.allowed_ips, endpoint, peer.persistent_keepalive)
        for peer, endpoint in zip(config.peers, endpoints)
    ]


async def run_daemon(paths: Paths) -> int:
    """Run until `down`, SIGTERM or SIGINT. Returns the process exit code."""
    leftovers = Leftovers()  # what is open now is not the daemon's to close
    state: NetworkState | None = None
    peer_map: PeerMap | None = None
    try:
        check_state_dir(paths.state_dir)  # root writes there: nobody else may be able to
    except FileError as exc:
        raise StartupError(str(exc)) from None
    try:
        config = load_config(paths.config, state_dir=paths.state_dir)
        try:
            identity = await load_identity(config.identity, passphrase_file=config.passphrase_file)
        except IdentityError as exc:
            raise _identity_config_error(config, exc) from None
        if config.coordinator is None:
            check_peer_keys(config, identity.public.wg_public_key)
        else:
            state, peer_map = _load_membership(paths, identity)
            # The config is the word on how to reach the coordinator (network.json keeps the URL joined with).
            state = NetworkState(config.coordinator.url, state.network, state.member)
        secret = read_network_secret(config.network_secret_file)
        psk = derive_psk(secret)
    except (ConfigError, IdentityError, StateError) as exc:
        raise StartupError(str(exc)) from None
    if _already_running(paths):
        raise StartupError(f"tunnelmesh is already running with state dir {paths.state_dir}; stop it with `tunnelmesh down`")

    if state is not None:
        network = state.network
        addresses = Addresses(
            ipaddress.IPv4Interface(f"{state.member.ipv4}/{network.cidr4.prefixlen}"),
            ipaddress.IPv6Interface(f"{state.member.ipv6}/{network.ula6.prefixlen}"), (),
        )
        static_endpoints: list[tuple[str, int] | None] = []
    else:
        assert config.mesh_ip is not None
        addresses = Addresses(ipaddress.IPv4Interface(f"{config.mesh_ip}/{config.mesh_prefix}"), None,
                              tuple(net for peer in config.peers for net in peer.allowed_ips))
        static_endpoints = [await _resolve(peer.endpoint) for peer in config.peers]

    try:
        bind = UdpBind.open(config.listen_port)
    except UdpError as exc:
        raise StartupError(f"{exc} ({config.path})") from None
    try:
        tun = TunDevice.create(config.interface)
    except TunError as exc:
        bind.close()
        raise StartupError(str(exc)) from None
    device = Device(identity.static_private, mtu=config.mtu)
    datapath = DataPath(device, tun, bind)
    coordinator_server: ServedSite | None = None
    serving: str | None = None  # where the embedded coordinator listens, for status
    transports = Transports()
    started_transports = Started()
    client: CoordinatorClient | None = None
    cached_map = peer_map.snapshot() if peer_map is not None else None

    def current_map() -> MapSnapshot:
        """The peer map as its readers take it: the coordinator client's latest snapshot
        (the cached map's until the client exists: the transports start before it)."""
        snapshot = client.snapshot if client is not None else cached_map
        assert snapshot is not None
        return snapshot

    try:
        await tun.configure(addresses.ipv4, config.mtu, addresses.routes, address6=addresses.ipv6)
        if config.coordinator is not None and config.coordinator.serve is not None:
            coordinator_server = await _start_coordinator(config)
            serving = "{}:{}".format(*config.coordinator.serve)
            if state is not None and paths.admin_key.exists():
                await _set_up_network(paths, state, _ca_file(config), _tls_fingerprint(config))
        if state is not None and peer_map is not None:
            started_transports = await _start_transports(config, paths, identity, state, current_map, datapath,
                                                         transports)
    except (TunError, StartupError) as exc:
        if transports.ssh is not None:
            await transports.ssh.close()
        if started_transports.relay_service is not None:
            await started_transports.relay_service.stop()
        if coordinator_server is not None:
            await coordinator_server.stop()
        tun.close()
        bind.close()
        raise StartupError(str(exc)) from None

    bus = EventBus()
    supervisor = Supervisor()
    started = time.time()
    mesh = Mesh(device, datapath, supervisor, bus, addresses.ipv4.ip, psk, transports)
    identity_actor = IdentityActor(identity)
    supervisor.add(identity_actor)
    supervisor.add(EdgesActor(tun, bind, datapath))
    supervisor.add(mesh)
    if coordinator_server is not None:
        supervisor.add(coordinator_server)
    if transports.ssh is not None:
        supervisor.add(SshServer(transports.ssh))
    if transports.relay is not None:
        supervisor.add(RelayConnection(transports.relay))
    if started_transports.relay_service is not None:
        supervisor.add(started_transports.relay_service)
    admitter: Admitter | None = None
    if state is None or peer_map is None or cached_map is None:
        initial = _static_peers(config, static_endpoints)
    else:
        initial = [peer_spec(member, cached_map, config.transports) for member in cached_map.members.values()]
        client = CoordinatorClient(
            state, identity, peer_map, mesh, bus, cache_path=paths.peer_map_cache,
            secret_path=config.network_secret_file, listen_port=datapath.port,
            on_revoked=lambda why: supervisor.shutdown(why, exit_code=1),
            transports=config.transports, ssh_record=started_transports.ssh_record,
            relay_offer=started_transports.relay_offer, on_map_changed=started_transports.on_map_changed,
            ca_file=_ca_file(config), interface=config.interface, tls_fingerprint=_tls_fingerprint(config),
        )
        supervisor.add(client)
        if paths.admin_key.exists():  # the admin's machine countersigns joins made with an invite
            admitter = Admitter(paths, bus)
            supervisor.add(admitter)
        if transports.relay is not None:  # relays that members serve, as the map offers them
            ca_file = _ca_file(config)
            pool = RelayPool(current_map, started_transports.own_relay, state.url,
                             lambda url, relay, guard: RelayClient(url, identity, state.network.network, datapath,
                                                                   ca_file=ca_file, relay=relay, guard=guard),
                             transports, supervisor)
            supervisor.add(pool)
            started_transports.on_map_changed.append(lambda: pool.tell_latest(SyncRelays, SyncRelays()))
    sessions = [mesh.add(spec) for spec in initial]

    api = ControlApi(
        name=config.name, interface=config.interface, mesh_ip=addresses.ipv4.ip,
        mesh_ipv6=addresses.ipv6.ip if addresses.ipv6 is not None else None, started=started,
        identity=identity_actor, mesh=mesh, device=device, datapath=datapath, bus=bus, shutdown=supervisor.shutdown,
        transports=transports, coordinator=client, serving_coordinator=serving, admitter=admitter,
        serving_relay=started_transports.relay_served,
    )
    supervisor.add(ControlServer(paths.control_socket, api.handlers(), bus))

    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, supervisor.shutdown, f"signal {signal.Signals(signum).name}")
    try:
        write_atomic(paths.pid_file, f"{os.getpid()}\n".encode())
    except FileError as exc:
        log.warning("%s", exc)  # `down` only waits on it: not worth failing the start for
    for session in sessions:
        session.tell(Start())
    log.info(
        "tunnelmesh %s up: %s %s on %s, UDP port %d, %d peers, identity %s%s",
        __version__, config.name, addresses.ipv4.ip, config.interface, datapath.port, len(sessions),
        identity.public.fingerprint, f", coordinator {state.url}" if state is not None else ", static mode",
    )
    try:
        result = await supervisor.run()
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
