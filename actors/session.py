"""The peer session actor: one per peer.

It owns the peer's timer (a single `loop.call_at`, re-armed whenever the
core's next deadline moves earlier, as aioquic's asyncio layer does), turns
core events into one log line each and control-socket events, and answers
status and ping requests. The WireGuard state itself lives in the core's
`Peer`, which the data path also touches (same thread, no locks needed).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tunnelmesh.packets import icmp_echo
from tunnelmesh.wireguard import EndpointChanged, Event, HandshakeCompleted, HandshakeGaveUp, KeysZeroed, Peer

from .runtime import Actor

if TYPE_CHECKING:
    from .control import EventBus
    from .datapath import DataPath

log = logging.getLogger("tunnelmesh.session")


@dataclass(frozen=True, slots=True)
class Ping:
    timeout: float


@dataclass(frozen=True, slots=True)
class Status:
    pass


@dataclass(frozen=True, slots=True)
class Start:
    """Bring the session up: handshake now if we know where the peer is."""


class PeerSession(Actor):
    policy = "restart"

    def __init__(
        self,
        name: str,
        mesh_ip: ipaddress.IPv4Address,
        own_mesh_ip: ipaddress.IPv4Address,
        fingerprint: str | None,
        datapath: DataPath,
        events: EventBus,
    ) -> None:
        super().__init__()
        self.name = f"session:{name}"
        self.peer_name = name
        self.mesh_ip = mesh_ip
        self.own_mesh_ip = own_mesh_ip
        self.fingerprint = fingerprint
        self.datapath = datapath
        self.events = events
        self.peer: Peer | None = None  # set by the daemon right after add_peer
        self._timer: asyncio.TimerHandle | None = None
        self._armed_at: float | None = None
        self._ping_seq = 0
        self._ping_ident = int.from_bytes(os.urandom(2), "big")
        self.last_handshake_wall: float | None = None
        self.last_error: str | None = None
        self._stopped = False  # removed from the mesh: never re-arm the timer

    # --- timers (called by the data path, on the event loop thread) ----------------

    def reschedule(self) -> None:
        peer = self.peer
        if peer is None or self._stopped:
            return
        deadline = peer.get_timer()
        if deadline == self._armed_at:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._armed_at = deadline
        if deadline is not None:
            loop = asyncio.get_running_loop()
            # The loop's clock is time.monotonic, the core's `now`.
            self._timer = loop.call_at(deadline, self._fire)

    def _fire(self) -> None:
        self._timer = None
        self._armed_at = None
        assert self.peer is not None
        try:
            self.peer.handle_timer(time.monotonic(), time.time())
        except Exception:  # logged with the session's name; the timer is re-armed
            log.exception("%s: timer handler failed", self.name)
        self.datapath.flush()
        self.reschedule()

    # --- events from the core ------------------------------------------------------

    def on_event(self, event: Event) -> None:
        if isinstance(event, HandshakeCompleted):
            first = self.last_handshake_wall is None
            self.last_handshake_wall = time.time()
            self.last_error = None
            if first:
                log.info("%s: session up via udp %s", self.peer_name, _show(self.peer.endpoint if self.peer else None))
            self.events.publish({"event": "handshake", "peer": self.peer_name, "initiator": event.initiator})
        elif isinstance(event, HandshakeGaveUp):
            self.last_error = f"no handshake reply for 90 s since {time.strftime('%H:%M:%S')}"
            log.warning("%s: %s", self.peer_name, self.last_error)
            self.events.publish({"event": "handshake_failed", "peer": self.peer_name})
        elif isinstance(event, KeysZeroed):
            self.events.publish({"event": "keys_zeroed", "peer": self.peer_name})
        elif isinstance(event, EndpointChanged):
            log.info("%s: endpoint now %s", self.peer_name, _show(event.endpoint))
            self.events.publish({"event": "endpoint", "peer": self.peer_name, "endpoint": _show(event.endpoint)})

    # --- mailbox --------------------------------------------------------------------

    async def handle(self, message: Any) -> Any:
        if isinstance(message, Start):
            assert self.peer is not None
            if self.peer.endpoint is not None:
                self.peer.send_keepalive(time.monotonic(), time.time())
                self.datapath.flush()
            self.reschedule()
            return None
        if isinstance(message, Status):
            return self.snapshot()
        if isinstance(message, Ping):
            # Send now, wait elsewhere: status requests must not queue behind a ping.
            return asyncio.ensure_future(self._ping(message.timeout))
        raise ValueError(f"unknown message {type(message).__name__}")

    async def _ping(self, timeout: float) -> dict[str, Any]:
        assert self.peer is not None
        self._ping_seq = (self._ping_seq + 1) & 0xFFFF
        key = (self._ping_ident, self._ping_seq)
        future: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self.datapath.pings[key] = future
        packet = icmp_echo(self.own_mesh_ip, self.mesh_ip, key[0], key[1], b"tunnelmesh ping")
        sent = time.monotonic()
        self.datapath.send_packet(self.peer, packet)
        try:
            answered = await asyncio.wait_for(future, timeout)
        except asyncio.TimeoutError:
            return {"peer": self.peer_name, "ok": False, "error": f"no reply from {self.mesh_ip} within {timeout:g} s",
                    "path": self.path()}
        finally:
            self.datapath.pings.pop(key, None)
        return {"peer": self.peer_name, "ok": True, "rtt_ms": round((answered - sent) * 1000, 3), "path": self.path()}

    def path(self) -> str:
        endpoint = self.peer.endpoint if self.peer is not None else None
        return f"udp {_show(endpoint)}" if endpoint is not None else "none"

    def is_up(self, now: float) -> bool:
        """A session with keys younger than WireGuard's reject-after time (180 s)."""
        current = self.peer.current if self.peer is not None else None
        return current is not None and now - current.created < 180

    def snapshot(self) -> dict[str, Any]:
        peer = self.peer
        assert peer is not None
        now = time.monotonic()
        if self.is_up(now):
            state = "up"
        elif peer.endpoint is None:
            state = "waiting"  # no endpoint: waits to be contacted
        elif peer.t_retransmit is not None:
            state = "handshaking"
        else:
            state = "idle"
        return {
            "name": self.peer_name,
            "mesh_ip": str(self.mesh_ip),
            "fingerprint": self.fingerprint,
            "endpoint": _show(peer.endpoint) if peer.endpoint is not None else None,
            "transport": "udp" if peer.endpoint is not None else None,
            "state": state,
            "last_handshake": self.last_handshake_wall,
            "last_handshake_ago": round(now - peer.last_handshake, 1) if peer.last_handshake is not None else None,
            "rx_bytes": peer.rx_bytes,
            "tx_bytes": peer.tx_bytes,
            "persistent_keepalive": peer.persistent_keepalive,
            "why_not_better": self.last_error,
        }

    async def stop(self) -> None:
        self._stopped = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


def _show(endpoint: object) -> str:
    if isinstance(endpoint, tuple) and len(endpoint) >= 2:
        host, port = endpoint[0], endpoint[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(endpoint)
