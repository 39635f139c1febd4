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
import math
import os
import signal
import socket
import time
from pathlib import Path
from typing import Any

from tunnelmesh import __version__
from tunnelmesh.config import ConfigError, check_peer_keys, load_config, read_network_secret
from tunnelmesh.control_client import NotRunning, request
from tunnelmesh.identity import IdentityError, NodeIdentity, load_identity
from tunnelmesh.paths import Paths
from tunnelmesh.wireguard import Device, derive_psk

from .control import ControlServer, EventBus
from .datapath import DataPath, UdpError, open_udp_socket
from .runtime import Actor, Supervisor
from .session import PeerSession, Ping, Start, Status
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

    def __init__(self, tun: TunDevice, sock: socket.socket, datapath: DataPath) -> None:
        super().__init__()
        self.tun = tun
        self.sock = sock
        self.datapath = datapath

    async def run(self) -> None:
        self.datapath.start()
        await asyncio.Event().wait()  # held until shutdown

    async def stop(self) -> None:
        self.datapath.stop()
        self.tun.close()
        self.sock.close()


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


async def run_daemon(paths: Paths) -> int:
    """Run until `down`, SIGTERM or SIGINT. Returns the process exit code."""
    try:
        config = load_config(paths.config, state_dir=paths.state_dir)
        try:
            identity = await load_identity(config.identity, passphrase_file=config.passphrase_file)
        except IdentityError as exc:
            raise _identity_config_error(config, exc) from None
        check_peer_keys(config, identity.public.wg_public_key)
        psk = derive_psk(read_network_secret(config.network_secret_file))
    except (ConfigError, IdentityError) as exc:
        raise StartupError(str(exc)) from None
    if _already_running(paths):
        raise StartupError(f"tunnelmesh is already running with state dir {paths.state_dir}; stop it with `tunnelmesh down`")
    endpoints = [await _resolve(peer.endpoint) for peer in config.peers]

    try:
        sock = open_udp_socket(config.listen_port)
    except UdpError as exc:
        raise StartupError(f"{exc} ({config.path})") from None
    try:
        tun = TunDevice.create(config.interface)
    except TunError as exc:
        sock.close()
        raise StartupError(str(exc)) from None
    try:
        routes = [net for peer in config.peers for net in peer.allowed_ips]
        await tun.configure(ipaddress.IPv4Interface(f"{config.mesh_ip}/{config.mesh_prefix}"), config.mtu, routes)
    except TunError as exc:
        tun.close()
        sock.close()
        raise StartupError(str(exc)) from None

    device = Device(identity.static_private, mtu=config.mtu)
    datapath = DataPath(device, tun.fd, sock)
    bus = EventBus()
    supervisor = Supervisor()
    started = time.time()
    sessions: dict[str, PeerSession] = {}
    for peer_config, endpoint in zip(config.peers, endpoints):
        session = PeerSession(
            peer_config.name, peer_config.mesh_ip, config.mesh_ip,
            peer_config.identity.fingerprint if peer_config.identity is not None else None, datapath, bus,
        )
        session.peer = device.add_peer(
            peer_config.wireguard_public_key, preshared_key=psk, allowed_ips=peer_config.allowed_ips,
            endpoint=endpoint, persistent_keepalive=peer_config.persistent_keepalive, tag=session,
        )
        sessions[peer_config.name] = session

    identity_actor = IdentityActor(identity)

    async def status(_: dict[str, Any]) -> dict[str, Any]:
        me = await identity_actor.ask("whoami")
        peers = [await session.ask(Status()) for session in sessions.values()]
        drops = dict(device.drops + datapath.drops)
        return {
            "node": {
                "name": config.name, "mesh_ip": str(config.mesh_ip), "interface": config.interface,
                "listen_port": datapath.port, "version": __version__, "started": started, "pid": os.getpid(),
                "mode": "static", "coordinator": None, **me,
            },
            "peers": peers,
            "drops": drops,
        }

    async def ping(req: dict[str, Any]) -> dict[str, Any]:
        session = _find_session(sessions, str(req.get("peer", "")))
        wait = req.get("wait", 5.0)
        if isinstance(wait, bool) or not isinstance(wait, (int, float)) or not math.isfinite(wait):
            raise ValueError("'wait' must be a number of seconds")
        wait = min(max(float(wait), 0.1), 30.0)
        reply = await session.ask(Ping(wait))  # the session sends and hands back a future
        return await reply

    async def down(_: dict[str, Any]) -> str:
        supervisor.shutdown("down requested")
        return "stopping"

    async def alive(_: dict[str, Any]) -> str:
        return "running"

    supervisor.add(identity_actor)
    supervisor.add(EdgesActor(tun, sock, datapath))
    for session in sessions.values():
        supervisor.add(session)
    supervisor.add(ControlServer(paths.control_socket, {
        "status": status, "peers": status, "ping": ping, "down": down, "ping_daemon": alive,
    }, bus))

    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, supervisor.shutdown, f"signal {signal.Signals(signum).name}")
    paths.pid_file.write_text(f"{os.getpid()}\n")
    for session in sessions.values():
        session.tell(Start())
    log.info(
        "tunnelmesh %s up: %s %s on %s, UDP port %d, %d peers, identity %s",
        __version__, config.name, config.mesh_ip, config.interface, datapath.port, len(sessions), identity.public.fingerprint,
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
    log.info("tunnelmesh down: %s", result.reason)
    return result.exit_code


def _identity_config_error(config: Any, exc: IdentityError) -> ConfigError:
    """An identity that cannot be loaded (unreadable key file, no agent, ...) is a
    config problem: name the config file and the line of [node] identity."""
    from tunnelmesh.config import _Locator

    try:
        line = _Locator(config.path.read_text(errors="replace")).line_of("node", "identity")
    except OSError:
        line = None
    return ConfigError(config.path, line, f"[node]: identity: {exc}")


def _find_session(sessions: dict[str, PeerSession], key: str) -> PeerSession:
    if key in sessions:
        return sessions[key]
    for session in sessions.values():
        if str(session.mesh_ip) == key:
            return session
    known = ", ".join(sorted(sessions)) or "none"
    raise ValueError(f"no peer named {key!r} (peers: {known})")


def configure_logging(level: str, log_file: Path | None = None) -> None:
    handler: logging.Handler = logging.FileHandler(log_file) if log_file else logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("asyncssh").setLevel(logging.WARNING)
