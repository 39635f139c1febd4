"""The peer session actor: one per peer.

It owns the peer's timer (a single `loop.call_at`, re-armed whenever the
core's next deadline moves earlier, as aioquic's asyncio layer does), turns
core events into one log line each and control-socket events, and answers
status and ping requests. The WireGuard state itself lives in the core's
`Peer`, which the data path also touches (same thread, no locks needed).

It also runs the peer's transport ladder (tunnelmesh.ladder, sans-IO): it
feeds the ladder handshakes (with the rung they came in on), link failures
and, once a second, the core's view of unanswered traffic; it carries out
the ladder's actions: probes (handshake initiations on chosen rungs, dialling
an SSH link first if need be) and switches (setting `peer.endpoint` to the
rung's UDP address or link, which is all the data path looks at).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import time
from typing import TYPE_CHECKING, Any

from tunnelmesh import ladder as rungs
from tunnelmesh.config import RungChoice
from tunnelmesh.ladder import Ladder, Probe, Switch
from tunnelmesh.links import Link, LinkError
from tunnelmesh.packets import icmp_echo
from tunnelmesh.wireguard import EndpointChanged, Event, HandshakeCompleted, HandshakeGaveUp, KeysZeroed, Peer
from tunnelmesh.wireguard.constants import KEEPALIVE_TIMEOUT, REKEY_TIMEOUT

from .links import Transports
from .messages import GetStatus, Ping, Start
from .runtime import Actor

if TYPE_CHECKING:
    from .control import EventBus
    from .datapath import DataPath

TICK = 1.0  # the ladder's clock: failure detection and probes are in whole seconds
UNANSWERED_AFTER = KEEPALIVE_TIMEOUT + REKEY_TIMEOUT  # the core's new-handshake timer, set when data is sent



def rung_of(endpoint: object) -> str:
    return rungs.UDP if isinstance(endpoint, tuple) else endpoint.rung  # type: ignore[attr-defined]


def describe(endpoint: object) -> str:
    return f"udp {_show(endpoint)}" if isinstance(endpoint, tuple) else str(getattr(endpoint, "description", endpoint))

log = logging.getLogger("tunnelmesh.session")



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
        *,
        wg_key: bytes = b"",
        transports: Transports | None = None,
        choice: RungChoice = RungChoice(rungs=(rungs.UDP,)),
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
        self.wg_key = wg_key
        self.transports = transports or Transports()
        unusable = {r: "disabled in the config" for r in rungs.RUNGS if r not in choice.rungs}
        if choice.force is not None:
            unusable.update({r: f"the config forces {choice.force}" for r in rungs.RUNGS if r != choice.force})
        self.ladder = Ladder(choice.enabled, unusable=unusable)
        self.udp_address: tuple[str, int] | None = None  # where the peer's UDP port is, as far as we know
        self.udp_candidates: tuple[tuple[str, int], ...] = ()  # every address it may be at (SetCandidates)
        self._evidence: dict[str, object] = {}  # rung -> the endpoint a handshake last came from on it
        self._stray_seen = float("-inf")
        self._want_probe: set[str] = set()  # rungs to probe once their link is up
        self._dialling: asyncio.Task[None] | None = None
        self._tick_handle: asyncio.TimerHandle | None = None
        self.transitions: list[dict[str, Any]] = []  # the last few rung changes, for status

    def allows(self, endpoint: object) -> bool:
        """Whether the config lets this peer's traffic use `endpoint`'s rung."""
        return rung_of(endpoint) in self.ladder.rungs

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
            source = event.source if event.source is not None else (self.peer.endpoint if self.peer else None)
            rung = rung_of(source) if source is not None else None
            if first:
                log.info("%s: session up via %s", self.peer_name, describe(source))
            self.events.publish({"event": "handshake", "peer": self.peer_name, "initiator": event.initiator,
                                 "rung": rung})
            if rung is not None:
                self._evidence[rung] = source
                if rung == rungs.UDP:
                    self.udp_address = source  # type: ignore[assignment]
                self._apply(self.ladder.handshake(rung, time.monotonic()))
        elif isinstance(event, HandshakeGaveUp):
            self.last_error = f"no handshake reply for 90 s since {time.strftime('%H:%M:%S')}"
            log.warning("%s: %s", self.peer_name, self.last_error)
            self.events.publish({"event": "handshake_failed", "peer": self.peer_name})
        elif isinstance(event, KeysZeroed):
            self.events.publish({"event": "keys_zeroed", "peer": self.peer_name})
        elif isinstance(event, EndpointChanged):
            # Roaming within a rung (a new UDP address, a reconnected link); rung changes are `_switch`'s.
            if isinstance(event.endpoint, tuple):
                self.udp_address = event.endpoint
            log.info("%s: endpoint now %s", self.peer_name, describe(event.endpoint))
            self.events.publish({"event": "endpoint", "peer": self.peer_name, "endpoint": describe(event.endpoint)})

    # --- the transport ladder ---------------------------------------------------------

    def _apply(self, actions: list[rungs.Action]) -> None:
        for action in actions:
            if isinstance(action, Probe):
                self._probe(action.rungs)
            else:
                self._switch(action)

    def _endpoint(self, rung: str) -> object | None:
        """Where to send on `rung` now, or None (and the ladder told why)."""
        endpoints = self._endpoints(rung)
        return endpoints[0] if endpoints else None

    def _endpoints(self, rung: str) -> list[object]:
        """Where a probe on `rung` goes now, best first; empty if nowhere (and the ladder
        told why). For UDP, every address the peer may be at: the first that answers
        carries traffic. Called while other actions are carried out, so what the ladder
        makes of it waits for the next tick."""
        now = time.monotonic()
        if rung == rungs.UDP:
            known = (self.udp_address,) if self.udp_address is not None else ()
            addresses = list(dict.fromkeys(known + self.udp_candidates))
            if not addresses:
                self.ladder.unavailable(rung, "no UDP address known yet", now)
            return addresses  # type: ignore[return-value]
        if rung == rungs.SSH:
            ssh = self.transports.ssh
            if ssh is None:
                self.ladder.unavailable(rung, "this node runs no SSH rung", now)
                return []
            link = ssh.link(self.wg_key)
            if link is None:
                self._dial()
                return []
            return [link]
        relays = self.transports.relays()
        if not relays:
            self.ladder.unavailable(rung, "no relay (static mesh)", now)
            return []
        links = [relay.link(self.wg_key) for relay in relays if relay.state == "connected"]
        if not links:  # a probe through each relay: the first both ends hold carries traffic
            self.ladder.unavailable(rung, "; ".join(f"relay: {r.error or r.state}" for r in relays), now)
        return links  # type: ignore[return-value]

    def _probe(self, probe_rungs: tuple[str, ...]) -> None:
        assert self.peer is not None
        endpoints: list[object] = []
        for rung in probe_rungs:
            on_rung = self._endpoints(rung)
            endpoints += on_rung
            if not on_rung and rung == rungs.SSH and self._dialling is not None:
                self._want_probe.add(rung)  # sent when the link is up
        if endpoints:
            self.peer.send_probe(tuple(endpoints), time.monotonic(), time.time())
            self.datapath.flush()

    def _dial(self) -> None:
        ssh = self.transports.ssh
        if ssh is None or self._dialling is not None or self._stopped:
            return

        async def dial() -> None:
            try:
                await ssh.dial(self.wg_key)  # link_up reaches us through the data path
            except LinkError as exc:
                self._want_probe.discard(rungs.SSH)
                self._apply(self.ladder.unavailable(rungs.SSH, str(exc), time.monotonic()))
            finally:
                self._dialling = None

        self._dialling = asyncio.ensure_future(dial())

    def on_link_up(self, link: Link) -> None:
        assert self.peer is not None
        endpoint = self.peer.endpoint
        # SSH: one connection per pair, so a new one replaces the old. Not so for relays: a
        # relay's link outlives reconnects, and another relay is another path, which only a
        # handshake through it proves (the peer may not hold that relay).
        if link.rung == rungs.SSH and endpoint is not None and endpoint is not link and rung_of(endpoint) == rungs.SSH:
            self.peer.endpoint = link
        if link.rung in self._want_probe:
            self._want_probe.discard(link.rung)
            # Only the side that dialled probes on a new link: initiations crossing on it would
            # each discard the other's pending one (both answers dropped, ~10 s lost).
            if getattr(link, "dialler", self.peer.device.static_public) == self.peer.device.static_public:
                self.peer.send_probe((link,), time.monotonic(), time.time())
                self.datapath.flush()

    def on_link_down(self, link: Link, reason: str) -> None:
        if self.peer is not None and self.peer.endpoint is link:
            self._apply(self.ladder.unavailable(link.rung, reason, time.monotonic()))

    def _switch(self, action: Switch) -> None:
        assert self.peer is not None
        endpoint = self._evidence.get(action.rung)
        if endpoint is None or getattr(endpoint, "closed", False):
            endpoint = self._endpoint(action.rung)
        if endpoint is None:  # gone since the evidence came: the ladder stays where the packets go
            self.ladder.revert(action)
            return
        self.peer.endpoint = endpoint
        if isinstance(endpoint, tuple):
            self.udp_address = endpoint  # e.g. followed to a new address: UDP probes go there now
        if action.previous is None:
            return  # the first choice: "session up via ..." says it
        why = self.why_not_better()
        log.info("%s: path %s -> %s (%s)%s", self.peer_name, action.previous, describe(endpoint), action.why,
                 f"; {why}" if why else "")
        change = {"event": "path", "peer": self.peer_name, "rung": action.rung, "previous": action.previous,
                  "endpoint": describe(endpoint), "why": action.why, "at": time.time()}
        self.transitions = (self.transitions + [change])[-8:]
        self.events.publish(change)

    def _tick(self) -> None:
        self._tick_handle = None
        if self._stopped or self.peer is None:
            return
        peer = self.peer
        now = time.monotonic()
        unanswered = peer.t_new_handshake - UNANSWERED_AFTER if peer.t_new_handshake is not None else None
        stray = None
        if peer.stray_source is not None:
            stray = (rung_of(peer.stray_source), peer.stray_at)
            if peer.stray_at > self._stray_seen:  # only newer than what we took: never a stale address
                self._stray_seen = peer.stray_at
                self._evidence[stray[0]] = peer.stray_source
        try:
            if self.ladder.current is None and not self.ladder.searching and peer.t_retransmit is not None:
                self._apply(self.ladder.start(now))  # the search gave up; traffic wants the peer again
            searching = bool(self.ladder.searching)
            self._apply(self.ladder.tick(now, unanswered_since=unanswered, received_on_current=peer.endpoint_rx_at,
                                         stray=stray))
            if searching and not self.ladder.searching and self.ladder.current is None:
                peer.abandon_handshake()  # the search gave up: quiet until new traffic asks for the peer
        except Exception:
            log.exception("%s: ladder tick failed", self.peer_name)
        self._tick_handle = asyncio.get_running_loop().call_later(TICK, self._tick)

    def why_not_better(self) -> str:
        now, wall = time.monotonic(), time.time()
        parts = []
        for rung, text, since in self.ladder.why_not_better(now):
            when = f" since {time.strftime('%H:%M:%S', time.localtime(wall - (now - since)))}" if since is not None else ""
            parts.append(f"{rungs.LABELS[rung]}: {text}{when}")
        return "; ".join(parts)

    # --- mailbox --------------------------------------------------------------------

    async def handle(self, message: Any) -> Any:
        if isinstance(message, Start):
            assert self.peer is not None
            if isinstance(self.peer.endpoint, tuple):
                self.udp_address = self.peer.endpoint
            self._apply(self.ladder.start(time.monotonic()))
            self.reschedule()
            if self._tick_handle is None:
                self._tick_handle = asyncio.get_running_loop().call_later(TICK, self._tick)
            return None
        if isinstance(message, GetStatus):
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
                    "path": self.path(), "rung": self.ladder.current}
        finally:
            self.datapath.pings.pop(key, None)
        # The rung the answer came on: where the last authenticated packet came from.
        peer = self.peer
        answered_on = rung_of(peer.stray_source) if peer.stray_source is not None and peer.stray_at >= peer.endpoint_rx_at \
            else (rung_of(peer.endpoint) if peer.endpoint is not None else None)
        return {"peer": self.peer_name, "ok": True, "rtt_ms": round((answered - sent) * 1000, 3), "path": self.path(),
                "rung": answered_on}

    def path(self) -> str:
        endpoint = self.peer.endpoint if self.peer is not None else None
        return describe(endpoint) if endpoint is not None else "none"

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
            "endpoint": (_show(peer.endpoint) if isinstance(peer.endpoint, tuple) else describe(peer.endpoint))
            if peer.endpoint is not None else None,
            "path": describe(peer.endpoint) if peer.endpoint is not None else None,
            "transport": rung_of(peer.endpoint) if peer.endpoint is not None else None,
            "rung": self.ladder.current,
            "rung_changes": self.ladder.changes,
            "probe_interval": self.ladder.probe_interval,
            "transitions": self.transitions,
            "state": state,
            "last_handshake": self.last_handshake_wall,
            "last_handshake_ago": round(now - peer.last_handshake, 1) if peer.last_handshake is not None else None,
            "rx_bytes": peer.rx_bytes,
            "tx_bytes": peer.tx_bytes,
            "persistent_keepalive": peer.persistent_keepalive,
            "why_not_better": "; ".join(p for p in (self.why_not_better(), self.last_error) if p) or None,
        }

    async def stop(self) -> None:
        self._stopped = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._tick_handle is not None:
            self._tick_handle.cancel()
            self._tick_handle = None
        if self._dialling is not None:
            self._dialling.cancel()


def _show(endpoint: object) -> str:
    if isinstance(endpoint, tuple) and len(endpoint) >= 2:
        host, port = endpoint[0], endpoint[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(endpoint)
