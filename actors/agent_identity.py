"""The daemon's identity when its SSH key lives in ssh-agent (docs/identity.md).

At start (`load_daemon_identity`): the mesh key is derived through the agent and held
in memory only. If the agent cannot be reached or does not hold the key yet, the daemon
uses the mesh key cache when `[node] cache_mesh_key` is on and it holds that key, and
otherwise WAITS: it polls the agent every POLL_INTERVAL seconds, logs that it waits
(at once, then every LOG_EVERY seconds), and answers the control socket meanwhile
(`status` says what it waits for, `ping_daemon` too, `down` stops it). The cache is
written (0600) while the option is on and removed when it is off.

While running (`AgentProbe`): status asks the agent whether it still holds the key, at
most once per PROBE_KEPT seconds (TUI polls and metrics scrapes share the answer).
Running sessions never need it (the mesh key is in memory); what does is said in
`AgentStatus.needed_for`.

Every exchange with the agent is bounded (tunnelmesh.identity_agent.AGENT_TIMEOUT): a
hung agent at start is waited for like an absent one.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tunnelmesh.config import NodeConfig
from tunnelmesh.files import FileError, write_atomic, write_secret
from tunnelmesh.identity import IdentityError, NodeIdentity, load_identity
from tunnelmesh.identity_agent import (
    AgentUnavailable, agent_socket, cache_record, cached_identity, list_agent_keys, load_identity_agent,
)
from tunnelmesh.paths import Paths
from tunnelmesh.tasks import cancel_and_wait

from .control import ControlServer, EventBus
from .messages import AgentStatus

log = logging.getLogger("tunnelmesh.daemon")

#: The mesh key cache's name in the state directory.
CACHE_NAME = "mesh-key.cache"
POLL_INTERVAL = 2.0  # s between looks at the agent while waiting for it
LOG_EVERY = 60.0  # s between "still waiting" lines in the log
PROBE_TIMEOUT = 2.0  # s a status gives the agent to answer (below AGENT_TIMEOUT: a status is quick)
PROBE_KEPT = 5.0  # s a status's answer about the agent is reused


def cache_path(paths: Paths) -> Path:
    return paths.state_dir / CACHE_NAME


def _selector(spec: str) -> str | None:
    """The config's "agent" or "agent:SHA256:..." -> the fingerprint, or None (any key)."""
    return spec[len("agent:"):] or None


def is_agent_identity(spec: str) -> bool:
    return spec == "agent" or spec.startswith("agent:")


class _Waiting(Exception):
    """What the waiting daemon answers to `status`: the message is the state."""


async def load_daemon_identity(config: NodeConfig, paths: Paths) -> NodeIdentity | None:
    """The node's identity; None if the daemon was stopped (`down`, SIGTERM, SIGINT)
    while it waited for the agent. IdentityError for anything waiting cannot fix."""
    if not is_agent_identity(config.identity):
        _remove_cache(paths)
        return await load_identity(config.identity, passphrase_file=config.passphrase_file)
    socket = agent_socket(config.agent_socket)
    selector = _selector(config.identity)
    try:
        identity: NodeIdentity | None = await load_identity_agent(selector, agent_path=socket)
    except AgentUnavailable as exc:
        cached = _read_cache(paths, socket, selector) if config.cache_mesh_key else None
        if cached is not None:
            log.warning("%s; starting with the cached mesh key of %s (%s)", exc, cached.fingerprint,
                        cache_path(paths))
            return cached
        identity = await _wait_for_agent(paths, socket, selector, str(exc))
    if identity is not None:
        if config.cache_mesh_key:
            _write_cache(paths, identity)
        else:
            _remove_cache(paths)
    return identity


def _read_cache(paths: Paths, socket: str, fingerprint: str | None) -> NodeIdentity | None:
    path = cache_path(paths)
    try:
        record = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.warning("cannot read the mesh key cache %s: %s", path, exc.strerror)
        return None
    try:
        return cached_identity(record, socket, fingerprint,
                               origin=f"mesh key cache {path} (ssh-agent at {socket} was unavailable at start)")
    except IdentityError as exc:
        log.warning("%s (%s): not used", exc, path)
        return None


def _write_cache(paths: Paths, identity: NodeIdentity) -> None:
    """Keep the cache equal to the identity just derived through the agent: a stale or
    foreign one is replaced."""
    path, record = cache_path(paths), cache_record(identity)
    try:
        if path.read_bytes() == record:
            return
    except OSError:
        pass
    try:
        write_secret(path, record)
    except FileError as exc:
        log.warning("cannot write the mesh key cache: %s", exc)
        return
    log.info("mesh key of %s cached in %s (cache_mesh_key = true)", identity.fingerprint, path)


def _remove_cache(paths: Paths) -> None:
    path = cache_path(paths)
    try:
        path.unlink()
    except FileNotFoundError:
        return
    except OSError as exc:
        log.warning("cannot remove the mesh key cache %s: %s", path, exc.strerror)
        return
    log.info("removed the mesh key cache %s (cache_mesh_key is off)", path)


def waiting_message(socket: str, fingerprint: str | None, reason: str) -> str:
    key = f"key {fingerprint}" if fingerprint else "an Ed25519 or RSA key"
    return f"waiting for the ssh-agent at {socket} to hold {key}: ssh-add it ({reason})"


async def _wait_for_agent(paths: Paths, socket: str, fingerprint: str | None, reason: str) -> NodeIdentity | None:
    """Poll the agent until it gives the identity, answering the control socket meanwhile.
    None: stopped while waiting."""
    stop = asyncio.Event()
    since = time.time()
    state = {"message": waiting_message(socket, fingerprint, reason)}

    async def status(_: dict[str, Any]) -> str:
        raise _Waiting(f"tunnelmesh (pid {os.getpid()}) is starting: {state['message']}; waiting since "
                       f"{time.strftime('%H:%M:%S', time.localtime(since))} (`tunnelmesh down` stops it)")

    async def ping_daemon(_: dict[str, Any]) -> str:
        return state["message"]

    async def down(_: dict[str, Any]) -> str:
        stop.set()
        return "stopping"

    server = ControlServer(paths.control_socket, {"status": status, "ping_daemon": ping_daemon, "down": down},
                           EventBus())
    serving = asyncio.create_task(server.run(), name="control (waiting for the ssh-agent)")
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        write_atomic(paths.pid_file, f"{os.getpid()}\n".encode())
    except FileError as exc:
        log.warning("%s", exc)
    log.warning("%s", state["message"])
    logged = time.monotonic()
    try:
        while True:
            try:
                async with asyncio.timeout(POLL_INTERVAL):
                    await stop.wait()
            except TimeoutError:
                pass
            if stop.is_set():
                log.info("stopped while %s", state["message"])
                paths.pid_file.unlink(missing_ok=True)
                return None
            try:
                identity = await load_identity_agent(fingerprint, agent_path=socket)
            except AgentUnavailable as exc:
                state["message"] = waiting_message(socket, fingerprint, str(exc))
                if time.monotonic() - logged >= LOG_EVERY:
                    log.warning("still %s", state["message"])
                    logged = time.monotonic()
                continue
            log.info("ssh-agent at %s holds key %s: starting", socket, identity.fingerprint)
            return identity
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
        await server.stop()
        await cancel_and_wait(serving)


def needed_for(config: NodeConfig) -> tuple[str, ...]:
    """What an agent identity's running node cannot do without the agent (sessions can)."""
    needs = ["a restart" + (" (unless the mesh key cache holds the key)" if config.cache_mesh_key else "")]
    if config.coordinator is not None:
        needs.append("requests to the coordinator (each is signed with the SSH key)")
        transports = config.transports
        rungs = {rung for choice in (transports.default, *transports.peers.values()) for rung in choice.enabled}
        if "ssh" in rungs:
            needs.append("the SSH rung's logins to peers")
        if "relay" in rungs:
            needs.append("logins to relays")
    return tuple(needs)


async def probe_agent(identity: NodeIdentity, needs: tuple[str, ...]) -> AgentStatus | None:
    """Whether the agent still holds the identity's key; None for a key file identity."""
    socket = identity.agent_path
    if socket is None:
        return None
    try:
        async with asyncio.timeout(PROBE_TIMEOUT):
            keys = await list_agent_keys(socket)
    except (AgentUnavailable, TimeoutError):
        state = "unreachable"
    else:
        held = any(key.fingerprint == identity.fingerprint for key in keys)
        state = "holds the key" if held else "key missing"
    return AgentStatus(socket=socket, fingerprint=identity.fingerprint, state=state,
                       needed_for=() if state == "holds the key" else needs)


class AgentProbe:
    """`status`'s look at the agent (probe_agent), kept PROBE_KEPT seconds and shared by
    callers that ask while it runs: TUI polls and metrics scrapes do not each open an
    agent connection, nor each wait PROBE_TIMEOUT for a hung agent."""

    def __init__(self, identity: NodeIdentity, needs: tuple[str, ...],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.identity = identity
        self.needs = needs
        self.clock = clock
        self._kept: tuple[float, AgentStatus | None] | None = None  # (good until, answer)
        self._probing: asyncio.Task[AgentStatus | None] | None = None

    async def __call__(self) -> AgentStatus | None:
        if self._kept is not None and self.clock() < self._kept[0]:
            return self._kept[1]
        if self._probing is None:
            self._probing = asyncio.create_task(self._probe(), name="ssh-agent probe")
        return await asyncio.shield(self._probing)  # a caller that gives up does not cancel the others' probe

    async def _probe(self) -> AgentStatus | None:
        try:
            status = await probe_agent(self.identity, self.needs)
            self._kept = (self.clock() + PROBE_KEPT, status)
            return status
        finally:
            self._probing = None
