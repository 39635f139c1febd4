"""The peer session actor: one per peer, the one writer of its peer's path and keys.

It owns the peer's timer (a single `loop.call_at`, re-armed whenever the core's
next deadline moves earlier than the armed one; a later one waits for the armed
timer to fire early and re-arm, so traffic costs no timer per batch) and its path
selector (tunnelmesh.path_selector, sans-IO). The WireGuard state lives in the
core's `Peer`, which the data path also touches (same thread, no locks); of it,
only this session writes `endpoint` (where packets go) and `preshared_key`.
Others send it messages: candidates (`SetCandidates`), the PSK (`SetPsk`),
status and ping requests. The data path calls `on_event`, `reschedule`,
`on_link_up` and `on_link_down` directly, on the event loop thread, after each
batch: the hot path's documented exception to message passing.

It turns core events into one log line each and typed events on the bus, feeds
the selector (handshakes with the path they came on, link failures and, once a
second, on the mesh's `Ticker` that ticks every session on one timer, the core's
view of unanswered traffic; a session whose path is at rest, on the best rung with
nothing to probe or decide, or whose search gave up, stops ticking until traffic, its
timer or an input that changes the path wakes it, so an idle daemon is not woken every
second) and carries out what it returns:
probes (handshake initiations on chosen rungs, dialling an SSH link first if need
be) and switches (setting `peer.endpoint` to the rung's UDP address or link).

Time comes from the `Clock` it is given; the event loop's clock must be the
clock's `monotonic` (it is in production; tests/support/memnet.py makes it so).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from tunnelmesh import ladder as rungs
from tunnelmesh.clock import SYSTEM_CLOCK, Clock
from tunnelmesh.config import UDP_ONLY, RungChoice
from tunnelmesh.links import Link, LinkError
from tunnelmesh.nat.report import NatReport, PeerNat
from tunnelmesh.packets import CAPS_REQUEST, DAEMON_PING_PAYLOAD, icmp_echo
from tunnelmesh.path_selector import PathSelector, Probe, Switch, Transition, describe, rung_of
from tunnelmesh.punch import KEEP_OPEN_SCHEDULE, SCHEDULE, Punch, keeps_open, spray_targets, sweep_due, why_not_direct
from tunnelmesh.wireguard import Event, HandshakeCompleted, HandshakeGaveUp, KeysZeroed, NewSource, Peer
from tunnelmesh.wireguard.constants import KEEPALIVE_TIMEOUT, REKEY_TIMEOUT

from . import messages as m
from .links import Transports
from .runtime import Actor

if TYPE_CHECKING:
    from .control import EventBus
    from .datapath import DataPath

TICK = 1.0  # the ladder's clock: failure detection and probes are in whole seconds
UNANSWERED_AFTER = KEEPALIVE_TIMEOUT + REKEY_TIMEOUT  # the core's new-handshake timer, set when data is sent
CAPS_RETRY = 600.0  # seconds: how soon a question about the peer's capabilities that went unanswered is asked again
KEYS_LIFETIME = 180.0  # WireGuard's reject-after time: keys younger than this make a session "up"
#: A peer's punch notices are acted on at most this often: each end asks at most once per
#: probe interval (BETTER_PROBE at the shortest), less a margin for the notices' delivery.
PUNCH_SPACING = rungs.BETTER_PROBE - 2.0

log = logging.getLogger("tunnelmesh.session")


class Ticker:
    """The sessions' once-a-second ladder tick on one loop timer: a node's N peers wake the
    daemon once a second, not N times at N phases of it. A session subscribes at Start
    (its first tick comes within a period) and unsubscribes when it stops; the timer runs
    while anyone is subscribed."""

    def __init__(self, period: float = TICK) -> None:
        self.period = period
        self._callbacks: dict[Callable[[], None], None] = {}  # an ordered set: ticked in subscription order
        self._handle: asyncio.TimerHandle | None = None

    def subscribe(self, callback: Callable[[], None]) -> None:
        self._callbacks[callback] = None
        if self._handle is None:
            self._handle = asyncio.get_running_loop().call_later(self.period, self._fire)

    def unsubscribe(self, callback: Callable[[], None]) -> None:
        self._callbacks.pop(callback, None)
        if not self._callbacks and self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _fire(self) -> None:
        self._handle = asyncio.get_running_loop().call_later(self.period, self._fire)
        for callback in list(self._callbacks):  # one may unsubscribe (itself) while ticked
            try:
                callback()
            except Exception:  # one session's failure must not cost the others their tick
                log.exception("ladder tick failed")


def path_status(endpoint: object | None) -> m.PathStatus | None:
    return m.PathStatus(rung_of(endpoint), describe(endpoint)) if endpoint is not None else None


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
        choice: RungChoice = UDP_ONLY,
        candidates: tuple[tuple[str, int], ...] = (),
        clock: Clock = SYSTEM_CLOCK,
        request_punch: Callable[[bytes], None] | None = None,
        own_nat: Callable[[], NatReport | None] = lambda: None,
        peer_nat: PeerNat = PeerNat(),
        punch_refused: Callable[[], str | None] = lambda: None,
        ticker: Ticker | None = None,
        plain_wireguard: bool = False,
    ) -> None:
        super().__init__()
        self.name = f"session:{name}"
        self.peer_name = name
        self.mesh_ip = mesh_ip
        self.own_mesh_ip = own_mesh_ip
        self.fingerprint = fingerprint
        # A daemon answers data within 1 s (its keepalive), so 3 s of silence is a failing
        # path. A plain WireGuard peer answers after 10 s: its silence is left to the core's
        # WireGuard timers (a new handshake after 15 s of unanswered data, retried for 90 s);
        # its one UDP rung and address would be all a search could probe anyway.
        self.plain_wireguard = plain_wireguard
        self.datapath = datapath
        self.events = events
        self.clock = clock
        self.peer: Peer | None = None  # set by the mesh right after add_peer
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # the timer's; asked once (a getpid per ask)
        self._armed_at: float | None = None
        self._ping_seq = 0
        self._ping_ident = int.from_bytes(os.urandom(2), "big")
        self.last_handshake_wall: float | None = None
        self.handshakes = 0  # completed since the session started
        self.rtt: float | None = None  # seconds: the last round trip measured (handshake initiated, or ping)
        self.last_error: str | None = None
        self._stopped = False  # removed from the mesh: never re-arm the timer
        self.wg_key = wg_key
        self.transports = transports or Transports()
        self.selector = PathSelector(choice, candidates=candidates)
        self._want_probe: set[str] = set()  # rungs to probe once their link is up
        self._dialling: asyncio.Task[None] | None = None
        self.ticker = ticker or Ticker()  # the mesh's, shared by its sessions
        self._ticking = False  # subscribed to the ticker
        self._resting = False  # the ticks stopped at rest (PathSelector.at_rest): the next input starts them
        # Hole punching (tunnelmesh/punch.py): asking the coordinator to tell both ends, and
        # the punch in progress when told. `request_punch` is None without a coordinator.
        self.request_punch = request_punch
        self.own_nat = own_nat  # this node's NAT, as its prober last found it
        self.peer_nat = peer_nat  # the peer's, as its candidate record says
        self.punch_refused = punch_refused  # why the last punch request failed, if it did (status)
        self._punch: Punch | None = None
        self._punch_handle: asyncio.TimerHandle | None = None
        self._swept_at = float("-inf")  # when a punch last began a sweep of the whole port range
        self._punch_asked = float("-inf")
        self.punches_unanswered = 0  # punches since the last UDP handshake that none answered
        self._punch_told = float("-inf")  # when a notice was last acted on
        self._caps_asked_at = float("-inf")  # when the peer's daemon was last asked what it can do
        self.punch_notices_ignored = 0  # notices while UDP worked, or within a probe interval of the last

    # --- timers (called by the data path, on the event loop thread) ----------------

    def reschedule(self) -> None:
        """After the core saw this peer's packets or its timer fired: the loop timer is armed
        for the core's earliest deadline when that moved earlier. One that moved later keeps
        the armed timer, which then fires early, finds nothing due and re-arms (traffic moves
        the deadlines later with nearly every packet: no timer is cancelled and made per
        batch). Traffic also wakes the ladder's tick, stopped while the path was at rest."""
        peer = self.peer
        if peer is None or self._stopped:
            return
        if self._resting:
            self._start_ticking()
        deadline = peer.get_timer()
        armed = self._armed_at
        if deadline is None or armed is not None and armed <= deadline:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._armed_at = deadline
        # The loop's clock is the clock's monotonic, the core's `now`.
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        self._timer = loop.call_at(deadline, self._fire)

    def _fire(self) -> None:
        self._timer = None
        self._armed_at = None
        assert self.peer is not None
        try:
            self.peer.handle_timer(self.clock.monotonic(), self.clock.wall())
        except Exception:  # logged with the session's name; the timer is re-armed
            log.exception("%s: timer handler failed", self.name)
        self._send_now()

    def _send_now(self) -> None:
        """Send what the core queued outside a data-path batch, and re-arm the timer it may
        have set (a probe's retry): the data path re-arms only the peers its batches touched."""
        self.datapath.flush()
        self.reschedule()

    # --- events from the core ------------------------------------------------------

    def on_event(self, event: Event) -> None:
        if isinstance(event, HandshakeCompleted):
            self._handshake(event)
        elif isinstance(event, NewSource):
            self._roam(event.source)
        elif isinstance(event, HandshakeGaveUp):
            self._unreachable("no handshake reply")
        elif isinstance(event, KeysZeroed):
            self.events.publish(m.KeysZeroed(self.peer_name))

    def _unreachable(self, what: str) -> None:
        """The core's retries or the ladder's search ended unanswered (90 s): `status` says so
        until the next handshake (the first reason and time), the log once until then, the
        event bus each time."""
        if self.last_error is None:  # the first, until the next handshake: not per retry round
            log.warning("%s: %s for 90 s", self.peer_name, what)
            self.last_error = f"{what} for 90 s since {time.strftime('%H:%M:%S', time.localtime(self.clock.wall()))}"
        self.events.publish(m.HandshakeFailed(self.peer_name))

    def _handshake(self, event: HandshakeCompleted) -> None:
        assert self.peer is not None
        first = self.last_handshake_wall is None
        self.last_handshake_wall = self.clock.wall()
        self.handshakes += 1
        if event.initiator and self.peer.handshake_rtt is not None:
            self.rtt = self.peer.handshake_rtt
        self.last_error = None
        source = event.source if event.source is not None else self.peer.endpoint
        if first:
            log.info("%s: session up via %s", self.peer_name, describe(source))
        self.events.publish(m.HandshakeDone(self.peer_name, event.initiator,
                                            rung_of(source) if source is not None else None))
        if source is None:
            self._ask_caps()
            return
        if rung_of(source) == rungs.SSH:
            self._want_probe.discard(rungs.SSH)  # proven: no probe left to send on a new link
        if rung_of(source) == rungs.UDP:
            self._end_punch(answered=True)  # the rest of its schedule and spray are not needed
            self.punches_unanswered = 0
        if source != self.peer.endpoint:
            self._roam(source)  # within its rung the path follows the proof, as WireGuard's would
        self._apply(self.selector.handshake(source, self.clock.monotonic()))
        self._ask_caps()

    def _ask_caps(self) -> None:
        """Ask the peer's daemon, in the tunnel, what it can do (DataPath.ask_caps), once the
        handshake's path is settled: after every handshake (a restarted peer may do less),
        but after one that went unanswered at most every CAPS_RETRY s (a question nothing
        answers is data sent unanswered: the ladder would probe, a handshake would follow,
        and with it another question)."""
        assert self.peer is not None
        now = self.clock.monotonic()
        if self.datapath.caps_unanswered(self.peer) and now - self._caps_asked_at < CAPS_RETRY:
            return
        self._caps_asked_at = now
        self._ping_seq = (self._ping_seq + 1) & 0xFFFF
        key = (self._ping_ident, self._ping_seq)
        self.datapath.ask_caps(self.peer, icmp_echo(self.own_mesh_ip, self.mesh_ip, *key, CAPS_REQUEST), key)

    def _roam(self, source: object) -> None:
        peer = self.peer
        assert peer is not None
        if source == peer.endpoint or not self.selector.roam(source, peer.endpoint):
            return  # another rung's message: evidence for the selector's next tick
        self._set_endpoint(source)
        log.info("%s: endpoint now %s", self.peer_name, describe(source))
        status = path_status(source)
        assert status is not None
        self.events.publish(m.EndpointRoamed(self.peer_name, status))

    def _set_endpoint(self, endpoint: object) -> None:
        """The one place the peer's send path changes."""
        assert self.peer is not None
        self.peer.use_endpoint(endpoint)

    # --- the transport ladder ---------------------------------------------------------

    def _apply(self, actions: list[rungs.Action]) -> None:
        if actions and self._resting:
            self._start_ticking()
        for action in actions:
            if isinstance(action, Probe):
                self._probe(action.rungs)
            else:
                self._switch(action)

    def _endpoints(self, rung: str) -> list[object]:
        """Where a probe on `rung` goes now, best first; empty if nowhere (and the ladder
        told why). For UDP, every address the peer may be at: the first that answers
        carries traffic. Called while other actions are carried out, so what the ladder
        makes of it waits for the next tick."""
        now = self.clock.monotonic()
        selector = self.selector
        if rung == rungs.UDP:
            addresses = selector.udp_targets()
            if not addresses:
                selector.unavailable(rung, "no UDP address known yet", now)
            return addresses  # type: ignore[return-value]
        if rung == rungs.SSH:
            ssh = self.transports.ssh
            if ssh is None:
                selector.unavailable(rung, "this node runs no SSH rung", now)
                return []
            link = ssh.link(self.wg_key)
            if link is None:
                self._dial()
                return []
            return [link]
        relays = self.transports.relays()
        if not relays:
            selector.unavailable(rung, "no relay (static mesh)", now)
            return []
        links = [relay.link(self.wg_key) for relay in relays if relay.state == "connected"]
        if not links:  # a probe through each relay: the first both ends hold carries traffic
            selector.unavailable(rung, "; ".join(f"relay: {r.error or r.state}" for r in relays), now)
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
            self.peer.send_probe(tuple(endpoints), self.clock.monotonic(), self.clock.wall(),
                                 retransmit=self._core_retries())
            self._send_now()
        if rungs.UDP in probe_rungs:
            self._ask_punch()

    def _core_retries(self) -> bool:
        """Whether the core retries a probe's initiation (to the path in use) when nobody
        answers: only while there is no working path (a new session, a failing rung). A
        probe for a better path is the ladder's to repeat: retried on the path in use, it
        would redo the handshake there every probe interval."""
        ladder = self.selector.ladder
        return ladder.current is None or bool(ladder.searching)

    # --- hole punching (tunnelmesh/punch.py) ------------------------------------------

    def _ask_punch(self) -> None:
        """A UDP probe goes out after one went unanswered: ask the coordinator to have both
        ends punch (at most once per probe interval)."""
        now = self.clock.monotonic()
        if self.request_punch is None or rungs.UDP not in self.selector.ladder.reasons \
                or not self.selector.udp_targets() or now - self._punch_asked < self.selector.probe_interval:
            return
        self._punch_asked = now
        self.request_punch(self.wg_key)

    def _punch_wanted(self) -> bool:
        """Whether to act on a punch notice: not while UDP carries the session (nothing to
        punch for), and at most one per PUNCH_SPACING (a member may ask, and a coordinator
        tell, as often as it likes; each punch sends bursts). Others are counted."""
        now, ladder = self.clock.monotonic(), self.selector.ladder
        if (ladder.current == rungs.UDP and not ladder.searching) or now - self._punch_told < PUNCH_SPACING:
            self.punch_notices_ignored += 1
            return False
        self._punch_told = now
        return True

    def _start_punch(self) -> None:
        """The coordinator told both ends to punch now: on a schedule anchored at now, from
        when WireGuard's rate limit lets an initiation go (a handshake under 5 s ago). A
        spray still going on (a sweep takes ~32 s) goes on in the new punch."""
        targets = tuple(self.selector.udp_targets())
        if not self.selector.udp_allowed or not targets or self._stopped or self.peer is None:
            return
        now, own, earlier = self.clock.monotonic(), self.own_nat(), self._punch
        self._end_punch()
        sweep = False
        if earlier is not None and earlier.spraying:
            spray, what = earlier.spray_left(), "the rest of the spray"
        else:
            sweep = sweep_due(self._swept_at, now, self.selector.probe_interval)
            spray = spray_targets(own, self.peer_nat, sweep=sweep)
            what = "the port block, then the range" if sweep else "the port block"
        schedule = KEEP_OPEN_SCHEDULE if keeps_open(own, self.peer_nat) else SCHEDULE
        self._punch = punch = Punch(now, self.peer.next_initiation_at(now), targets, spray, schedule)
        if punch.spraying and sweep:
            self._swept_at = now
        log.info("%s: punching towards %d candidate(s) for %.1f s%s", self.peer_name, len(targets), schedule[-1],
                 f" and guessed port(s): {what}" if punch.spraying else "")
        self._punch_handle = asyncio.get_running_loop().call_at(punch.next_at or now, self._punch_step)

    def _punch_step(self) -> None:
        self._punch_handle = None
        punch, peer = self._punch, self.peer
        if punch is None or peer is None or self._stopped:
            return
        now = self.clock.monotonic()
        candidates, batch = punch.due(now)
        if candidates:
            peer.send_probe(candidates, now, self.clock.wall(), retransmit=self._core_retries())
        if batch and not peer.spray(list(batch)):  # a handshake (the relay's rekey) took the initiation
            if peer.send_probe(punch.candidates, now, self.clock.wall(), retransmit=self._core_retries()):
                peer.spray(list(batch))
        self._send_now()
        next_at = punch.next_at
        if next_at is None:
            self._end_punch()
        else:
            self._punch_handle = asyncio.get_running_loop().call_at(next_at, self._punch_step)

    def _end_punch(self, *, answered: bool = False) -> None:
        """The punch in progress is over: answered (a UDP handshake came), or not (its
        schedule ran out, or a new notice replaces it)."""
        if self._punch_handle is not None:
            self._punch_handle.cancel()
            self._punch_handle = None
        if self._punch is not None and not answered:
            self.punches_unanswered += 1
        self._punch = None

    def _punch_story(self) -> str | None:
        """Why punching found no direct path, for `status`."""
        if not self.punches_unanswered:
            return None
        times = "once" if self.punches_unanswered == 1 else f"{self.punches_unanswered} times"
        nats = why_not_direct(self.own_nat(), self.peer_nat)
        return f"punched {times}, no answer" + (f": {nats}" if nats else "")

    def _dial(self) -> None:
        ssh = self.transports.ssh
        if ssh is None or self._dialling is not None or self._stopped:
            return

        async def dial() -> None:
            try:
                link = await ssh.dial(self.wg_key)  # link_up reaches us through the data path
                if getattr(link, "dialler", None) != self._own_key:
                    self._want_probe.discard(rungs.SSH)  # the peer's link won: its dialler probes on it
            except LinkError as exc:
                self._want_probe.discard(rungs.SSH)
                self._apply(self.selector.unavailable(rungs.SSH, str(exc), self.clock.monotonic()))
            finally:
                self._dialling = None

        self._dialling = self.start_task(dial(), name="ssh dial")

    @property
    def _own_key(self) -> bytes:
        assert self.peer is not None
        return self.peer.device.static_public

    def on_link_up(self, link: Link) -> None:
        if self._stopped:
            return
        assert self.peer is not None
        endpoint = self.peer.endpoint
        # SSH: one connection per pair, so a new one replaces the old. Not so for relays: a
        # relay's link outlives reconnects, and another relay is another path, which only a
        # handshake through it proves (the peer may not hold that relay).
        if link.rung == rungs.SSH and endpoint is not None and endpoint is not link and rung_of(endpoint) == rungs.SSH:
            self._set_endpoint(link)
        # Only the side that dialled probes on a new link: initiations crossing on it would
        # each discard the other's pending one (both answers dropped, ~10 s lost). A side that
        # hears of the peer's link keeps its wish: when both dialled at once, its own link may
        # be the one that stays (SshRung's tie-break), and then the probe is its to send.
        if link.rung in self._want_probe and getattr(link, "dialler", self._own_key) == self._own_key:
            self._want_probe.discard(link.rung)
            self.peer.send_probe((link,), self.clock.monotonic(), self.clock.wall(), retransmit=self._core_retries())
            self._send_now()

    def on_link_down(self, link: Link, reason: str) -> None:
        if not self._stopped and self.peer is not None and self.peer.endpoint is link:
            self._apply(self.selector.unavailable(link.rung, reason, self.clock.monotonic()))

    def _switch(self, action: Switch) -> None:
        assert self.peer is not None
        endpoint = self.selector.evidence(action.rung)
        if endpoint is None:
            endpoints = self._endpoints(action.rung)
            endpoint = endpoints[0] if endpoints else None
        if endpoint is None:  # gone since the evidence came: the ladder stays where the packets go
            self.selector.revert(action)
            return
        self._set_endpoint(endpoint)
        change = self.selector.switched(action, endpoint, self.clock.wall())
        if change is None:
            return  # the first choice: "session up via ..." says it
        why = self.why_not_better()
        log.info("%s: path %s -> %s (%s)%s", self.peer_name, action.previous, change.endpoint, action.why,
                 f"; {why}" if why else "")
        self.events.publish(self._path_changed(change))

    def _path_changed(self, change: Transition) -> m.PathChanged:
        return m.PathChanged(self.peer_name, m.PathStatus(change.rung, change.endpoint), change.previous, change.why,
                             change.at)

    def _tick(self) -> None:
        if self._stopped or self.peer is None:
            self._stop_ticking()
            return
        peer = self.peer
        now = self.clock.monotonic()
        unanswered = self._unanswered_since(peer)
        try:
            actions, gave_up = self.selector.tick(
                now, current=peer.endpoint, unanswered_since=unanswered, received_on_current=peer.endpoint_rx_at,
                other=peer.other_source, other_at=peer.other_at, handshaking=peer.t_retransmit is not None)
            self._apply(actions)
            if gave_up:
                peer.abandon_handshake()  # the search gave up: quiet until new traffic asks for the peer
                if peer.endpoint is not None:  # no endpoint ever: it waits to be contacted
                    self._unreachable("no path found")
            if self.selector.at_rest(now, current=peer.endpoint, unanswered_since=unanswered, other=peer.other_source,
                                     other_at=peer.other_at, handshaking=peer.t_retransmit is not None):
                self._stop_ticking()  # an idle daemon's peers wake nothing until traffic or a message
                self._resting = True
        except Exception:
            log.exception("%s: ladder tick failed", self.peer_name)

    def _unanswered_since(self, peer: Peer) -> float | None:
        """Since when traffic to the peer has waited for an answer, for the ladder: data sent
        (the core's new-handshake timer, set by the first unanswered send) or packets staged
        for a handshake (keys expired: nothing can be sent, so the timer never starts). None
        for a plain WireGuard peer, whose silence is left to the core's WireGuard timers."""
        if self.plain_wireguard:
            return None
        sent = peer.t_new_handshake - UNANSWERED_AFTER if peer.t_new_handshake is not None else None
        # Staged packets count once the core's own retry (a new initiation, REKEY_TIMEOUT on)
        # had its chance: one lost response must not move a healthy pair off its rung (a
        # probe within REKEY_TIMEOUT repeats the initiation, which the peer answers once per path).
        staged = peer.staged_since + REKEY_TIMEOUT if peer.staged else None
        if staged is not None and (sent is None or staged < sent):
            return staged
        return sent

    def _start_ticking(self) -> None:
        self._resting = False
        if not self._ticking:
            self.ticker.subscribe(self._tick)
            self._ticking = True

    def _stop_ticking(self) -> None:
        if self._ticking:
            self.ticker.unsubscribe(self._tick)
            self._ticking = False

    def why_not_better(self) -> str:
        now, wall = self.clock.monotonic(), self.clock.wall()
        parts = []
        for rung, text, since in self.selector.why_not_better(now):
            when = f" since {time.strftime('%H:%M:%S', time.localtime(wall - (now - since)))}" if since is not None else ""
            parts.append(f"{rungs.LABELS[rung]}: {text}{when}")
        return "; ".join(parts)

    # --- mailbox --------------------------------------------------------------------

    async def handle(self, message: Any) -> Any:
        if isinstance(message, m.Start):
            assert self.peer is not None
            self._apply(self.selector.start(self.peer.endpoint, self.clock.monotonic()))
            self.reschedule()
            self._start_ticking()
            return None
        if isinstance(message, m.SetCandidates):
            assert self.peer is not None
            self.peer_nat = message.nat
            send_to = self.selector.set_candidates(message.addresses, up=self.is_up(self.clock.monotonic()),
                                                   current=self.peer.endpoint)
            if send_to is not None:
                self._set_endpoint(send_to)
                await self.handle(m.Start())
            return None
        if isinstance(message, m.SetPsk):
            assert self.peer is not None
            self.peer.preshared_key = message.psk  # used from the next handshake on
            return None
        if isinstance(message, m.GetStatus):
            return self.status()
        if isinstance(message, m.Punch):
            if self._punch_wanted():
                self._start_punch()
            return None
        if isinstance(message, m.ProbeNow):
            probing, detail = self.selector.ladder.probe_better_now(self.clock.monotonic())
            return m.ProbeResult(self.peer_name, probing, detail)
        if isinstance(message, m.Ping):
            # Send now, wait elsewhere: status requests must not queue behind a ping.
            return self.start_task(self._ping(message.timeout), name="ping")
        raise ValueError(f"unknown message {type(message).__name__}")

    async def _ping(self, timeout: float) -> m.PingResult:
        assert self.peer is not None
        self._ping_seq = (self._ping_seq + 1) & 0xFFFF
        key = (self._ping_ident, self._ping_seq)
        future: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self.datapath.pings[key] = future
        packet = icmp_echo(self.own_mesh_ip, self.mesh_ip, key[0], key[1], DAEMON_PING_PAYLOAD)
        sent = self.clock.monotonic()
        self.datapath.send_packet(self.peer, packet)
        try:
            async with asyncio.timeout(timeout):
                answered = await future
        except asyncio.TimeoutError:
            return m.PingResult(self.peer_name, False, path_status(self.peer.endpoint),
                                error=f"no reply from {self.mesh_ip} within {timeout:g} s")
        finally:
            self.datapath.pings.pop(key, None)
        # The rung the answer came on: where the last authenticated packet came from.
        peer = self.peer
        source = peer.other_source if peer.other_source is not None and peer.other_at >= peer.endpoint_rx_at \
            else peer.endpoint
        self.rtt = answered - sent
        return m.PingResult(self.peer_name, True, path_status(peer.endpoint), rtt_ms=round(self.rtt * 1000, 3),
                            answered_on=rung_of(source) if source is not None else None)

    def is_up(self, now: float) -> bool:
        """A session with keys younger than WireGuard's reject-after time."""
        current = self.peer.current if self.peer is not None else None
        return current is not None and now - current.created < KEYS_LIFETIME

    def status(self) -> m.PeerStatus:
        peer = self.peer
        assert peer is not None
        now = self.clock.monotonic()
        if peer.endpoint is None:
            state = "waiting"  # no endpoint: waits to be contacted
        elif self.selector.ladder.peer_gone():
            state = "unreachable"  # its search gave up and nothing came since: keys or not
        elif self.is_up(now):
            state = "up"
        elif peer.t_retransmit is not None:
            state = "handshaking"
        else:
            state = "idle"
        refused = self.punch_refused() if self.selector.ladder.current != rungs.UDP else None  # moot on UDP
        return m.PeerStatus(
            name=self.peer_name,
            mesh_ip=str(self.mesh_ip),
            fingerprint=self.fingerprint,
            path=path_status(peer.endpoint),
            state=state,
            rung_changes=self.selector.changes,
            probe_interval=self.selector.probe_interval,
            transitions=tuple(self._path_changed(change) for change in self.selector.transitions),
            last_handshake=self.last_handshake_wall,
            last_handshake_ago=round(now - peer.last_handshake, 1) if peer.last_handshake is not None else None,
            rx_bytes=peer.rx_bytes,
            tx_bytes=peer.tx_bytes,
            persistent_keepalive=int(peer.persistent_keepalive),
            why_not_better="; ".join(p for p in (self.why_not_better(), self._punch_story(), refused,
                                                   self.last_error) if p)
            or None,
            rtt_ms=round(self.rtt * 1000, 3) if self.rtt is not None else None,
            rx_packets=peer.rx_packets,
            tx_packets=peer.tx_packets,
            handshakes=self.handshakes,
            candidates=tuple(f"{host}:{port}" for host, port in self.selector.udp_targets()),
            drops=dict(peer.drops),
            inner_checksums="partial" if peer.completes_checksums else "whole",
        )

    async def stop(self) -> None:
        self._stopped = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._stop_ticking()
        if self._punch_handle is not None:
            self._punch_handle.cancel()
            self._punch_handle = None
