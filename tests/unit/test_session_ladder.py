"""PeerSession's ladder glue (actors/session.py), between the sans-IO ladder and the core.

The ladder (test_ladder.py) and the core (test_core_probe.py) are tested alone; here the
session drives them as the daemon does: two real protocol cores (`Device`), each behind a
real `DataPath` and `Mesh.add`, exchanging real WireGuard messages over an in-memory
network, with the real event loop machinery (the session's `call_at` timers and its
once-a-second tick).

What is not real, and why each stand-in behaves like the thing it replaces:
- Time is virtual: one `Clock` is the event loop's clock (`VirtualLoop.time`) and the
  `time` module as actors.session and actors.datapath see it, so core deadlines, loop
  timers and the ladder's clock agree, and a 90 s scenario takes a fraction of a second.
  The clock jumps from one due timer to the next (at most 1/8 s at a time).
- The UDP socket is a `MemorySocket`: `sendto` lands in the socket bound to the address
  (readiness through an eventfd, so `DataPath.start`'s reader runs `_on_udp_readable`).
- The TUN device is one end of a Unix datagram socketpair; at the other end a tiny
  "kernel" answers ICMP echo requests, so traffic is answered as a real peer's would be.
- SSH and relay links are `MemoryLink`s (real `Link` subclasses) that hand each message to
  the other end's data path a loop iteration later than a UDP datagram would arrive (a
  link is no faster than direct UDP); `MemorySshRung` dials at once or fails with a
  `LinkError`, and calls `link_up` on both ends as `SshRung` does.
- A path is cut per rung and direction (`Net.block`): its messages are lost, as a firewall
  rule would lose them.

No sockets leave the process: the only descriptors are eventfds and Unix socketpairs.
A test never awaits anything but the clock (`Net.run_for`/`run_until`): with nothing ready,
the loop would block in a real select() while virtual time stood still.
"""

from __future__ import annotations

import asyncio
import heapq
import ipaddress
import os
import socket
import struct
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

import actors.datapath as datapath_module
import actors.session as session_module
from actors.control import EventBus
from actors.datapath import DataPath
from actors.mesh import Mesh
from actors.messages import GetStatus, PeerSpec, Ping, Start
from actors.runtime import Supervisor
from actors.links import Transports
from actors.session import TICK, PeerSession, describe
from tests.support.wire import A_ADDR, A_IP, B_ADDR, B_IP, PSK, kind, seeded_rng
from tunnelmesh.config import RungChoice
from tunnelmesh.ladder import BETTER_PROBE, FAILING_AFTER, GIVE_UP, HAPPY_EYEBALLS, HOLD, RELAY, RESEARCH, SSH, UDP
from tunnelmesh.links import Link, LinkError
from tunnelmesh.packets import icmp_echo
from tunnelmesh.wireguard import Device
from tunnelmesh.wireguard.constants import REKEY_TIMEOUT, REKEY_TIMEOUT_JITTER_MAX

INIT, RESP = 1, 2  # WireGuard message types
STEP = 0.125  # the longest stride of the clock between timers (conditions are checked that often)
SPINS = 24  # loop iterations per step: enough for a handshake, its confirmation and a ping
START = 1000.0  # the monotonic clock at the start of every scenario
WALL0 = 1_700_000_000.0  # wall time at monotonic 0
APP_IDENT = 0x7E57  # ICMP identifier of the test's own pings (the session's are random)
SSH_REFUSED = "connection refused on 192.0.2.2:2222"
A2 = ("198.51.100.1", 40000)  # a's address after its NAT's mapping changed
ALL = RungChoice()


# --- virtual time ----------------------------------------------------------------------------


class Clock:
    """Virtual time, as `time` for actors.session and actors.datapath and as the loop's clock."""

    def __init__(self) -> None:
        self.now = START

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return WALL0 + self.now

    @staticmethod
    def localtime(secs: float | None = None) -> time.struct_time:
        return time.localtime(secs)

    def strftime(self, fmt: str, t: time.struct_time | None = None) -> str:
        return time.strftime(fmt, t if t is not None else time.localtime(self.time()))


def wall_clock(monotonic: float) -> str:
    """How the session shows a monotonic instant in `status` ("since HH:MM:SS")."""
    return time.strftime("%H:%M:%S", time.localtime(WALL0 + monotonic))


class VirtualLoop(asyncio.SelectorEventLoop):
    """An event loop whose clock is the test's: `call_at`/`call_later` run when the test
    has moved the clock to their time, never in real time. It keeps the times timers are
    due, so the test can move the clock from one to the next (each timer runs at its own
    time: two jittered retransmits are never rounded into one instant)."""

    def __init__(self, clock: Clock) -> None:
        super().__init__()
        self._virtual = clock
        self._due: list[float] = []  # a heap; entries of cancelled timers only cost a spare step

    def time(self) -> float:
        return self._virtual.now

    def call_at(self, when: float, callback: Callable[..., object], *args: object,  # type: ignore[override]
                context: Any = None) -> asyncio.TimerHandle:
        heapq.heappush(self._due, when)
        return super().call_at(when, callback, *args, context=context)

    def next_due(self) -> float | None:
        """The earliest time a timer is due after now."""
        while self._due and self._due[0] <= self._virtual.now:
            heapq.heappop(self._due)
        return self._due[0] if self._due else None


# --- the in-memory network -----------------------------------------------------------------------


@dataclass(frozen=True)
class Sent:
    """One message put on a path: when, on which rung, from and to which node (`to`: the
    UDP address it was sent to), its WireGuard type, and whether the path delivered it."""

    at: float
    rung: str
    src: str
    dst: str
    kind: int
    delivered: bool
    to: tuple[str, int] | None = None


class Net:
    def __init__(self, clock: Clock, loop: VirtualLoop) -> None:
        self.clock = clock
        self.loop = loop
        self.nodes: dict[str, Node] = {}
        self.sockets: dict[tuple[str, int], MemorySocket] = {}
        self.blocked: set[tuple[str, str, str]] = set()  # (rung, from, to)
        self.log: list[Sent] = []
        self.held: list[tuple[MemorySocket, bytes, tuple[str, int]]] = []
        self.hold_next: tuple[str, str] | None = None  # (from, to): keep the next UDP datagram back
        self.after_link_arrival: Callable[[MemoryLink, bytes], None] | None = None
        self.after_link_up: Callable[[SshMemoryLink, SshMemoryLink], None] | None = None

    def block(self, rung: str, src: str | None = None, dst: str | None = None) -> None:
        """Lose `rung`'s messages from `src` to `dst` (both ways when not given)."""
        for a, b in ((src, dst),) if src is not None else (("a", "b"), ("b", "a")):
            self.blocked.add((rung, a, b))  # type: ignore[arg-type]

    def unblock(self, rung: str) -> None:
        self.blocked = {entry for entry in self.blocked if entry[0] != rung}

    def carries(self, rung: str, src: str, dst: str) -> bool:
        return (rung, src, dst) not in self.blocked

    def record(self, rung: str, src: str, dst: str, datagram: bytes, delivered: bool,
               to: tuple[str, int] | None = None) -> None:
        self.log.append(Sent(self.clock.now, rung, src, dst, kind(datagram), delivered, to))

    def sent(self, *, src: str | None = None, rung: str | None = None, kind: int | None = None,
             since: float = float("-inf")) -> list[Sent]:
        return [s for s in self.log if (src is None or s.src == src) and (rung is None or s.rung == rung)
                and (kind is None or s.kind == kind) and s.at >= since]

    def node_by_key(self, public_key: bytes) -> Node:
        return next(n for n in self.nodes.values() if n.device.static_public == public_key)

    def rebind(self, node: Node, address: tuple[str, int]) -> None:
        """`node`'s UDP port is now reached at `address` (a NAT's new mapping); the old one is gone."""
        del self.sockets[node.sock.address]
        node.sock.address = address
        self.sockets[address] = node.sock

    def udp(self, datagram: bytes, sender: MemorySocket, to: tuple[str, int]) -> None:
        target = self.sockets.get(to)
        if target is None:  # nobody there
            self.record(UDP, sender.node.name, "", datagram, False, to)
            return
        ok = self.carries(UDP, sender.node.name, target.node.name)
        self.record(UDP, sender.node.name, target.node.name, datagram, ok, to)
        if ok and self.hold_next == (sender.node.name, target.node.name):
            self.hold_next = None
            self.held.append((target, datagram, sender.address))
        elif ok:
            target.arrive(datagram, sender.address)

    def release_held(self) -> int:
        """Deliver the datagrams kept back (late, as a slow path would)."""
        held, self.held = self.held, []
        for target, datagram, source in held:
            target.arrive(datagram, source)
        return len(held)

    # --- driving the loop ---

    async def _spin(self) -> None:
        """Run what is ready now, and what that makes ready (the network has no latency)."""
        for _ in range(SPINS):
            await asyncio.sleep(0)

    async def _advance(self, limit: float) -> None:
        """Move the clock to the next due timer (no further than STEP on, nor past `limit`) and run."""
        due = self.loop.next_due()
        self.clock.now = min(due if due is not None else limit, limit, self.clock.now + STEP)
        await self._spin()

    async def run_for(self, seconds: float) -> None:
        """Let `seconds` of virtual time pass, running everything when it falls due."""
        end = self.clock.now + seconds
        await self._spin()
        while self.clock.now < end:
            await self._advance(end)

    async def run_until(self, condition: Callable[[], bool], limit: float, what: str) -> float:
        """Run until `condition()` holds; returns the virtual time it took (fails after `limit` s)."""
        began = self.clock.now
        await self._spin()
        while not condition():
            if self.clock.now >= began + limit:
                pytest.fail(f"not within {limit:g} s: {what}")
            await self._advance(began + limit)
        return self.clock.now - began


class MemorySocket:
    """A node's UDP socket on the in-memory network (what DataPath uses of a socket)."""

    def __init__(self, net: Net, node: Node, address: tuple[str, int]) -> None:
        self.net = net
        self.node = node
        self.address = address
        self.inbox: deque[tuple[bytes, tuple[str, int]]] = deque()
        self._ready = os.eventfd(0, os.EFD_NONBLOCK)  # readable while the inbox is not empty
        net.sockets[address] = self

    def fileno(self) -> int:
        return self._ready

    def getsockname(self) -> tuple[str, int]:
        return self.address

    def sendto(self, datagram: bytes | memoryview, address: tuple[str, int]) -> int:
        self.net.udp(bytes(datagram), self, address)
        return len(datagram)

    def arrive(self, datagram: bytes, source: tuple[str, int]) -> None:
        self.inbox.append((datagram, source))
        os.eventfd_write(self._ready, 1)

    def recvfrom_into(self, buf: bytearray) -> tuple[int, tuple[str, int]]:
        if not self.inbox:
            try:
                os.eventfd_read(self._ready)
            except BlockingIOError:
                pass
            raise BlockingIOError
        datagram, source = self.inbox.popleft()
        buf[: len(datagram)] = datagram
        return len(datagram), source

    def close(self) -> None:
        os.close(self._ready)


class MemoryLink(Link):
    """One end of an in-memory SSH or relay connection between two nodes."""

    def __init__(self, net: Net, owner: Node, peer: Node, description: str) -> None:
        super().__init__(peer.device.static_public, description)
        self.net = net
        self.owner = owner
        self.peer = peer

    def far(self) -> MemoryLink:
        raise NotImplementedError

    def send(self, datagram: bytes | bytearray | memoryview) -> None:
        data = bytes(datagram)
        far = self.far()
        ok = not self.closed and self.net.carries(self.rung, self.owner.name, self.peer.name)
        self.net.record(self.rung, self.owner.name, self.peer.name, data, ok)
        if ok:  # a loop iteration later than a UDP datagram: a link is a stream behind its framing
            self.net.loop.call_soon(self.net.loop.call_soon, self._arrive, far, data)

    def _arrive(self, far: MemoryLink, data: bytes) -> None:
        if not far.closed:
            far.owner.datapath.receive(far, data)
            if self.net.after_link_arrival is not None:
                self.net.after_link_arrival(far, data)

    def close(self) -> None:
        self.drop("closed")

    def drop(self, reason: str) -> None:
        raise NotImplementedError


class SshMemoryLink(MemoryLink):
    rung = SSH

    def __init__(self, net: Net, owner: Node, peer: Node, dialler: bytes) -> None:
        super().__init__(net, owner, peer, f"ssh {peer.address[0]}:2222")
        self.other: SshMemoryLink | None = None
        self.dialler = dialler  # as SshLink: the WireGuard key of the side that dialled

    def far(self) -> MemoryLink:
        assert self.other is not None
        return self.other

    def drop(self, reason: str) -> None:
        """The connection ends: both ends closed now, each side told by `link_down`."""
        if self.closed:
            return
        for end in (self, self.far()):
            end.closed = True
            self.net.loop.call_soon(end.owner.datapath.link_down, end, reason)


class RelayMemoryLink(MemoryLink):
    rung = RELAY

    def __init__(self, net: Net, owner: Node, peer: Node) -> None:
        super().__init__(net, owner, peer, "relay ws://192.0.2.9:7400")

    def far(self) -> MemoryLink:
        return self.peer.relay.link(self.owner.device.static_public)

    def send(self, datagram: bytes | bytearray | memoryview) -> None:
        if self.owner.relay.state != "connected":  # as RelayClient: a counted drop, not an error
            self.net.record(self.rung, self.owner.name, self.peer.name, bytes(datagram), False)
            return
        super().send(datagram)

    def drop(self, reason: str) -> None:
        self.closed = True


class MemorySshRung:
    """What PeerSession uses of `SshRung`: `link` (a live link or None) and `dial`."""

    def __init__(self, net: Net, node: Node) -> None:
        self.net = net
        self.node = node
        self.links: dict[bytes, SshMemoryLink] = {}
        self.refuse: str | None = None  # dials fail with this (the peer's SSH server is gone)
        self.dials = 0

    def link(self, wg_key: bytes) -> SshMemoryLink | None:
        found = self.links.get(wg_key)
        return found if found is not None and not found.closed else None

    async def dial(self, wg_key: bytes) -> SshMemoryLink:
        self.dials += 1
        await asyncio.sleep(0)  # connecting takes a loop iteration at least
        live = self.link(wg_key)
        if live is not None:
            return live
        if self.refuse is not None:
            raise LinkError(self.refuse)
        peer = self.net.node_by_key(wg_key)
        if not self.net.carries(SSH, self.node.name, peer.name):
            await asyncio.sleep(5.0)
            raise LinkError(f"timed out after 5 s connecting to {peer.address[0]}:2222")
        dialler = self.node.device.static_public
        mine, theirs = SshMemoryLink(self.net, self.node, peer, dialler), SshMemoryLink(self.net, peer, self.node, dialler)
        mine.other, theirs.other = theirs, mine
        self.links[wg_key] = mine
        peer.ssh.links[self.node.device.static_public] = theirs
        self.node.datapath.link_up(mine)  # as SshRung: the sink hears of both ends
        peer.datapath.link_up(theirs)
        if self.net.after_link_up is not None:
            self.net.after_link_up(mine, theirs)
        return mine


class MemoryRelayClient:
    """What PeerSession uses of `RelayClient`: `state`, `error` and one link per peer."""

    def __init__(self, net: Net, node: Node) -> None:
        self.net = net
        self.node = node
        self.state = "connected"
        self.error: str | None = None
        self.url = "ws://192.0.2.9:7400"
        self._links: dict[bytes, RelayMemoryLink] = {}

    def link(self, peer_key: bytes) -> RelayMemoryLink:
        found = self._links.get(peer_key)
        if found is None:
            found = self._links[peer_key] = RelayMemoryLink(self.net, self.node, self.net.node_by_key(peer_key))
            self.node.datapath.link_up(found)  # as RelayClient.link while connected
        return found


class Node:
    """One daemon: its core, data path, event bus, rungs and mesh, and the "kernel" behind its TUN."""

    def __init__(self, net: Net, name: str, private: bytes, address: tuple[str, int], mesh_ip: str, seed: int) -> None:
        self.net = net
        self.name = name
        self.address = address
        self.mesh_ip = ipaddress.IPv4Address(mesh_ip)
        self.device = Device(private, rng=seeded_rng(seed))
        self.sock = MemorySocket(net, self, address)
        self.tun, self.app = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.tun.setblocking(False)
        self.app.setblocking(False)
        self.datapath = DataPath(self.device, self.tun.fileno(), self.sock)  # type: ignore[arg-type]
        self.bus = EventBus()
        self._events = self.bus.subscribe()
        self.events: list[dict[str, Any]] = []
        self.ssh = MemorySshRung(net, self)
        self.relay = MemoryRelayClient(net, self)
        transports = Transports(ssh=self.ssh, relay=self.relay)  # type: ignore[arg-type]
        self.mesh = Mesh(self.device, self.datapath, Supervisor(), self.bus, self.mesh_ip, PSK, transports)
        self.echo_replies: list[tuple[float, int]] = []  # (when, seq) of answers to the app's pings
        net.nodes[name] = self

    def start(self) -> None:
        self.datapath.start()
        self.net.loop.add_reader(self.app.fileno(), self._kernel)

    def stop(self) -> None:
        self.net.loop.remove_reader(self.app.fileno())
        self.datapath.stop()
        self.tun.close()
        self.app.close()
        self.sock.close()

    def session(self, peer: Node) -> PeerSession:
        return self.mesh.sessions[peer.device.static_public]

    def bus_events(self, event: str | None = None) -> list[dict[str, Any]]:
        while not self._events.empty():
            self.events.append(self._events.get_nowait())
        return [e for e in self.events if event is None or e["event"] == event]

    def ping(self, peer: Node, seq: int) -> None:
        """An application's echo request to `peer`, written into the TUN."""
        self.app.send(icmp_echo(self.mesh_ip, peer.mesh_ip, APP_IDENT, seq, b"tunnelmesh test"))

    def _kernel(self) -> None:
        """What the kernel behind the TUN does with what the tunnel delivers: echo requests
        to us are answered (back into the TUN), answers to the app's pings are noted."""
        while True:
            try:
                packet = self.app.recv(65536)
            except BlockingIOError:
                return
            if len(packet) < 28 or packet[0] >> 4 != 4 or packet[9] != 1:
                continue
            ihl = (packet[0] & 0x0F) * 4
            icmp_type = packet[ihl]
            ident, seq = struct.unpack_from("!HH", packet, ihl + 4)
            src, dst = ipaddress.IPv4Address(packet[12:16]), ipaddress.IPv4Address(packet[16:20])
            if icmp_type == 8 and dst == self.mesh_ip:
                self.app.send(icmp_echo(dst, src, ident, seq, packet[ihl + 8:], reply=True))
            elif icmp_type == 0 and ident == APP_IDENT:
                self.echo_replies.append((self.net.clock.now, seq))


class Pinger:
    """An application on `node` pinging `peer` every `interval` s: traffic that wants answers."""

    def __init__(self, net: Net, node: Node, peer: Node, interval: float = 0.5) -> None:
        self.net, self.node, self.peer, self.interval = net, node, peer, interval
        self.seq = 0
        self._handle: asyncio.TimerHandle | None = None
        self._send()

    def _send(self) -> None:
        self.seq += 1
        self.node.ping(self.peer, self.seq)
        self._handle = self.net.loop.call_later(self.interval, self._send)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def answered_since(self, when: float) -> int:
        return sum(1 for at, _ in self.node.echo_replies if at >= when)


@dataclass
class Pair:
    net: Net
    a: Node
    b: Node

    @property
    def sa(self) -> PeerSession:
        """a's session with b."""
        return self.a.session(self.b)

    @property
    def sb(self) -> PeerSession:
        """b's session with a."""
        return self.b.session(self.a)


Scenario = Callable[[Pair], Awaitable[None]]


def spec(peer: Node, *, endpoint: tuple[str, int] | None, choice: RungChoice) -> PeerSpec:
    return PeerSpec(name=peer.name, mesh_ip=peer.mesh_ip, fingerprint=None, wg_key=peer.device.static_public,
                    allowed_ips=(ipaddress.IPv4Network(f"{peer.mesh_ip}/32"),), endpoint=endpoint,
                    persistent_keepalive=0, choice=choice)


async def _connected(net: Net, a_choice: RungChoice, b_choice: RungChoice, blocked: tuple[str, ...],
                     body: Scenario) -> None:
    """a knows b's UDP address, b learns a's from a's first message (so only a initiates:
    no crossing initiations). b starts half a tick before a: two daemons' once-a-second
    ticks are never in phase, and in phase their probes would cross on every retry."""
    rng = seeded_rng(7)
    a = Node(net, "a", rng(32), A_ADDR, A_IP, seed=11)
    b = Node(net, "b", rng(32), B_ADDR, B_IP, seed=12)
    pair = Pair(net, a, b)
    a.mesh.add(spec(b, endpoint=B_ADDR, choice=a_choice))
    b.mesh.add(spec(a, endpoint=None, choice=b_choice))
    a.start()
    b.start()
    for rung in blocked:
        net.block(rung)
    try:
        await pair.sb.handle(Start())
        await net.run_for(0.5)
        await pair.sa.handle(Start())
        await body(pair)
    finally:
        for node in (a, b):
            for session in node.mesh.sessions.values():
                await session.stop()
            node.stop()


@pytest.fixture
def simulate(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., None]]:
    """Run a scenario on a fresh pair, in virtual time."""

    def run(body: Scenario, *, a_choice: RungChoice = ALL, b_choice: RungChoice = ALL,
            blocked: tuple[str, ...] = ()) -> None:
        clock = Clock()
        monkeypatch.setattr(session_module, "time", clock)
        monkeypatch.setattr(datapath_module, "time", clock)
        with asyncio.Runner(loop_factory=lambda: VirtualLoop(clock)) as runner:
            loop = runner.get_loop()
            assert isinstance(loop, VirtualLoop)
            net = Net(clock, loop)
            runner.run(_connected(net, a_choice, b_choice, blocked, body))

    yield run


# --- shared steps ----------------------------------------------------------------------------------


async def up_on_udp(p: Pair) -> None:
    await p.net.run_until(lambda: p.sa.ladder.current == UDP and p.sb.ladder.current == UDP, 1.0, "session up on UDP")


async def udp_fails_over_to_ssh(p: Pair) -> tuple[Pinger, float, float]:
    """Up on UDP, then UDP cut both ways under traffic: returns the pinger, when it began
    (after REKEY_TIMEOUT, so probes may start a new handshake) and when a switched to SSH."""
    await up_on_udp(p)
    await p.net.run_for(REKEY_TIMEOUT + 1)
    p.net.block(UDP)
    pinger = Pinger(p.net, p.a, p.b)
    began = p.net.clock.now
    await p.net.run_until(lambda: p.sa.ladder.current == SSH, 10.0, "a on SSH after UDP failed")
    return pinger, began, p.net.clock.now


def consistent(session: PeerSession) -> dict[str, Any]:
    """`status` for one peer, checked against the session's own state; returns it. (Every
    scenario here makes fewer than the 8 changes `transitions` keeps, and gives no handshake up.)"""
    snap = session.snapshot()
    endpoint = session.peer.endpoint if session.peer is not None else None
    assert snap["rung"] == session.ladder.current
    assert snap["transport"] == (session_module.rung_of(endpoint) if endpoint is not None else None)
    assert snap["rung"] == snap["transport"], snap  # the ladder's rung is where packets go
    assert snap["path"] == (describe(endpoint) if endpoint is not None else None)
    assert snap["rung_changes"] == session.ladder.changes == len(snap["transitions"]), snap
    rungs_seen = [t["previous"] for t in snap["transitions"][:1]] + [t["rung"] for t in snap["transitions"]]
    assert all(t["previous"] == before for t, before in zip(snap["transitions"], rungs_seen)), snap["transitions"]
    if snap["transitions"]:
        assert snap["transitions"][-1]["rung"] == snap["rung"]
        assert snap["transitions"][-1]["endpoint"] == snap["path"]
    better = [label for rung, label in ((UDP, "UDP: "), (SSH, "SSH: ")) if rung_rank(rung) < rung_rank(snap["rung"])]
    parts = snap["why_not_better"].split("; ") if snap["why_not_better"] else []
    assert [part[: len(label)] for part, label in zip(parts, better)] == better and len(parts) == len(better), snap
    return snap


def rung_rank(rung: str) -> int:
    return (UDP, SSH, RELAY).index(rung)


# --- (1) a handshake on UDP -------------------------------------------------------------------------


def test_a_handshake_on_udp_makes_udp_the_rung_and_its_source_the_endpoint(simulate: Callable[..., None]) -> None:
    async def body(p: Pair) -> None:
        await up_on_udp(p)
        assert (p.sa.ladder.current, p.sa.peer.endpoint, p.sa.udp_address) == (UDP, B_ADDR, B_ADDR)
        # b had no address for a: it learnt it from a's authenticated handshake.
        assert (p.sb.ladder.current, p.sb.peer.endpoint, p.sb.udp_address) == (UDP, A_ADDR, A_ADDR)
        assert p.a.bus_events("handshake") == [{"event": "handshake", "peer": "b", "initiator": True, "rung": UDP}]
        assert p.b.bus_events("handshake") == [{"event": "handshake", "peer": "a", "initiator": False, "rung": UDP}]
        # The first choice is not a change: no transition, no 'path' event, nothing dialled.
        assert p.a.bus_events("path") == [] and p.sa.transitions == [] and p.sa.ladder.changes == 0
        assert p.a.ssh.dials == p.b.ssh.dials == 0
        assert p.net.sent(rung=SSH) == [] and p.net.sent(rung=RELAY) == []
        snap = consistent(p.sa)
        assert (snap["state"], snap["path"], snap["why_not_better"]) == ("up", "udp 192.0.2.2:51820", None)
        answer = await p.sa.handle(Ping(timeout=2.0))
        await p.net.run_until(answer.done, 2.5, "the session's ping answered or timed out")
        pong = answer.result()
        assert (pong["ok"], pong["rung"], pong["path"]) == (True, UDP, "udp 192.0.2.2:51820"), pong

    simulate(body)


# --- (2) a switch to SSH --------------------------------------------------------------------------------


def test_udp_failing_switches_to_ssh_sets_the_link_and_records_the_transition(simulate: Callable[..., None]) -> None:
    async def body(p: Pair) -> None:
        pinger, began, switched = await udp_fails_over_to_ssh(p)
        link = p.a.ssh.link(p.b.device.static_public)
        assert link is not None and p.sa.peer.endpoint is link
        # Failure is data unanswered for FAILING_AFTER (from the send, plus the core's
        # timer jitter), seen on the next whole-second tick.
        assert FAILING_AFTER <= switched - began <= FAILING_AFTER + REKEY_TIMEOUT_JITTER_MAX + 1.0 + STEP
        (change,) = p.sa.transitions
        assert change == {"event": "path", "peer": "b", "rung": SSH, "previous": UDP, "endpoint": "ssh 192.0.2.2:2222",
                          "why": "udp failing", "at": WALL0 + switched}
        assert p.a.bus_events("path") == [change]
        snap = consistent(p.sa)
        since = p.sa.ladder.reasons[UDP].since
        assert began <= since <= began + REKEY_TIMEOUT_JITTER_MAX
        assert snap["why_not_better"] == f"UDP: no reply for 3 s while sending since {wall_clock(since)}"
        # The search dialled SSH and sent the initiation on the new link (it was not up
        # when the probe was made: _want_probe).
        assert p.a.ssh.dials == 1
        assert [s.src for s in p.net.sent(rung=SSH, kind=INIT)] == ["a"]
        # b moves too, on the first packet of a's on the link (it confirms the handshake),
        # and the pings are answered over SSH.
        await p.net.run_until(lambda: p.sb.ladder.current == SSH, 2.0, "b on SSH")
        assert p.sb.peer.endpoint is p.b.ssh.link(p.a.device.static_public)
        assert [(t["previous"], t["rung"], t["why"]) for t in p.sb.transitions] == [(UDP, SSH, "peer moved")]
        await p.net.run_for(2.0)
        assert pinger.answered_since(switched) >= 3
        pinger.stop()

    simulate(body)


# --- (3) the current link goes down -------------------------------------------------------------------------


def test_the_current_link_going_down_probes_the_next_rung_at_once(simulate: Callable[..., None]) -> None:
    async def body(p: Pair) -> None:
        pinger, _, switched = await udp_fails_over_to_ssh(p)
        await p.net.run_for(HOLD + 1 - (p.net.clock.now - switched))  # the hold has passed
        p.a.ssh.refuse = p.b.ssh.refuse = SSH_REFUSED  # the SSH server is gone with its connection
        link = p.sa.peer.endpoint
        assert isinstance(link, SshMemoryLink)
        down = p.net.clock.now
        link.drop("connection lost")
        await p.net.run_for(STEP)
        # The ladder searched at once: an initiation of a's went out on the relay, and a
        # redial of SSH was tried (refused).
        assert [s.at for s in p.net.sent(src="a", rung=RELAY, kind=INIT)] == [down]
        assert p.sa.ladder.searching[:2] == [SSH, RELAY]
        assert p.a.ssh.dials == 2
        await p.net.run_until(lambda: p.sa.ladder.current == RELAY, 10.0, "a on the relay")
        change = p.sa.transitions[-1]
        assert (change["previous"], change["rung"], change["why"]) == (SSH, RELAY, "ssh failing")
        assert p.sa.peer.endpoint is p.a.relay.link(p.b.device.static_public)
        snap = consistent(p.sa)
        assert f"SSH: {SSH_REFUSED} since " in snap["why_not_better"], snap["why_not_better"]
        pinger.stop()

    simulate(body)


# --- (4) a switch whose path vanished -------------------------------------------------------------------------


async def ssh_switch_reverted(p: Pair) -> Pinger:
    """Up on UDP, then UDP cut under traffic: a's search reaches b on SSH, but b's SSH
    connection ends with its answer (the answer and the channel's close read together, as
    SSH reads them from one segment), so a's core completes the handshake on a link that
    is closed by the time the session carries out the ladder's switch."""
    await up_on_udp(p)
    await p.net.run_for(REKEY_TIMEOUT + 1)

    def die_with_answer(link: MemoryLink, datagram: bytes) -> None:
        if link.owner is p.a and kind(datagram) == RESP and isinstance(link, SshMemoryLink):
            p.a.ssh.refuse = p.b.ssh.refuse = SSH_REFUSED  # and the server is gone
            p.net.after_link_arrival = None
            link.drop("connection reset")

    p.net.after_link_arrival = die_with_answer
    p.net.block(UDP)
    pinger = Pinger(p.net, p.a, p.b)
    await p.net.run_until(lambda: len(p.a.bus_events("handshake")) == 2, 10.0, "a's handshake on SSH")
    assert p.a.bus_events("handshake")[-1]["rung"] == SSH
    return pinger


def test_a_switch_whose_link_closed_before_it_was_made_is_reverted(simulate: Callable[..., None]) -> None:
    async def body(p: Pair) -> None:
        pinger = await ssh_switch_reverted(p)
        # The ladder decided to switch to SSH; the session found the link closed and undid it.
        assert p.sa.ladder.current == UDP and p.sa.peer.endpoint == B_ADDR
        assert p.sa.ladder.changes == 0 and p.sa.transitions == [] and p.a.bus_events("path") == []
        consistent(p.sa)
        # The failover goes on to the relay rather than staying on the failing rung.
        await p.net.run_until(lambda: p.sa.ladder.current == RELAY, 30.0, "a on the relay")
        assert p.sa.peer.endpoint is p.a.relay.link(p.b.device.static_public)
        change = p.sa.transitions[-1]
        assert (change["previous"], change["rung"], change["why"]) == (UDP, RELAY, "udp failing")
        consistent(p.sa)
        pinger.stop()

    simulate(body)


def test_a_reverted_switch_leaves_the_search_going_and_holds_nothing(simulate: Callable[..., None]) -> None:
    # Once Ladder.revert undid only `current` and `changes`: the hold ran from a change that
    # never happened and the search stopped, so the relay's first handshake was held back.
    async def body(p: Pair) -> None:
        pinger = await ssh_switch_reverted(p)
        assert p.sa.ladder.current == UDP  # reverted, as the test above checks
        seen = len(p.a.bus_events("handshake"))
        handshakes: list[tuple[float, str]] = []  # (when, rung) of a's handshakes from now on

        def on_relay() -> bool:
            events = p.a.bus_events("handshake")
            handshakes.extend((p.net.clock.now, e["rung"]) for e in events[seen + len(handshakes):])
            return p.sa.ladder.current == RELAY

        await p.net.run_until(on_relay, 30.0, "a on the relay")
        pinger.stop()
        # The first handshake on the relay is acted on at once: nothing is held by the undone switch.
        first_on_relay = next(at for at, rung in handshakes if rung == RELAY)
        assert p.sa.ladder.last_change == first_on_relay, (handshakes, p.sa.ladder.last_change)

    simulate(body)


# --- (5) packets on another rung ----------------------------------------------------------------------------


def test_packets_on_another_rung_move_the_endpoint_only_once_the_current_rung_is_silent(
        simulate: Callable[..., None]) -> None:
    async def body(p: Pair) -> None:
        await up_on_udp(p)
        await p.net.run_for(REKEY_TIMEOUT + 1)
        # UDP is lost from b to a only: a hears nothing, switches to SSH and sends there,
        # while b still hears a on UDP (a's probe, the confirming keepalive) for a moment.
        p.net.block(UDP, "b", "a")
        pinger = Pinger(p.net, p.a, p.b)
        p.net.hold_next = ("a", "b")  # one of a's UDP packets will come late
        await p.net.run_until(lambda: p.sa.ladder.current == SSH, 10.0, "a on SSH")
        b_link = p.b.ssh.link(p.a.device.static_public)
        assert b_link is not None
        await p.net.run_until(lambda: p.sb.peer.stray_source is b_link, 1.0, "a's packets reaching b on SSH")
        last_on_udp = p.sb.peer.endpoint_rx_at
        # Authenticated packets on SSH do not move b while UDP has been heard within FAILING_AFTER.
        while p.net.clock.now < last_on_udp + FAILING_AFTER - STEP:
            await p.net.run_for(STEP)
            assert p.sb.peer.endpoint == A_ADDR and p.sb.ladder.current == UDP
            assert p.sb.transitions == []
        await p.net.run_until(lambda: p.sb.ladder.current == SSH, 1.0 + STEP, "b on SSH once UDP is silent")
        assert p.sb.peer.endpoint is b_link
        (change,) = p.sb.transitions
        assert (change["previous"], change["rung"], change["why"]) == (UDP, SSH, "peer moved")
        assert p.net.clock.now - last_on_udp >= FAILING_AFTER
        consistent(p.sb)
        # A late packet on the old rung (authenticated, within the replay window) changes nothing.
        await p.net.run_for(1.0)
        assert p.net.release_held() == 1
        await p.net.run_for(STEP)
        assert p.sb.peer.stray_source == A_ADDR  # it did arrive
        await p.net.run_for(2 * FAILING_AFTER)
        assert p.sb.peer.endpoint is b_link and p.sb.ladder.current == SSH and len(p.sb.transitions) == 1
        assert pinger.answered_since(p.net.clock.now - 2.0) >= 3
        pinger.stop()

    simulate(body)


# --- (6) rungs the config leaves out ---------------------------------------------------------------------


def test_a_rung_disabled_in_the_config_is_never_dialled_nor_probed(simulate: Callable[..., None]) -> None:
    no_ssh = RungChoice(rungs=(UDP, RELAY))

    async def body(p: Pair) -> None:
        await up_on_udp(p)
        await p.net.run_for(REKEY_TIMEOUT + 1)
        p.net.block(UDP)
        pinger = Pinger(p.net, p.a, p.b)
        await p.net.run_until(lambda: p.sa.ladder.current == RELAY, 10.0, "a on the relay")
        change = p.sa.transitions[-1]
        assert (change["previous"], change["rung"], change["why"]) == (UDP, RELAY, "udp failing")
        await p.net.run_for(BETTER_PROBE + 5)  # the way back probes better rungs: still not SSH
        assert p.a.ssh.dials == p.b.ssh.dials == 0 and p.net.sent(rung=SSH) == []
        assert p.net.sent(src="a", rung=UDP, kind=INIT, since=p.sa.ladder.last_change)  # UDP was probed
        snap = consistent(p.sa)
        assert snap["why_not_better"].split("; ")[1] == "SSH: disabled in the config", snap["why_not_better"]
        assert p.sa.ladder.why_not_better(p.net.clock.now)[1] == (SSH, "disabled in the config", None)
        pinger.stop()

    simulate(body, a_choice=no_ssh, b_choice=no_ssh)


def test_a_forced_rung_is_the_only_one_probed_and_status_says_the_config_forces_it(
        simulate: Callable[..., None]) -> None:
    async def body(p: Pair) -> None:
        # b allows every rung (a peer's config is its own) and, not knowing a's address,
        # searches over SSH too: a must neither dial, nor probe, nor answer on SSH or UDP.
        await p.net.run_until(lambda: p.sa.ladder.current == RELAY, 1.0, "a up on the relay")
        pinger = Pinger(p.net, p.a, p.b)
        await p.net.run_for(BETTER_PROBE + 10)
        assert p.sa.ladder.current == RELAY and p.sa.peer.endpoint is p.a.relay.link(p.b.device.static_public)
        assert p.net.sent(src="a", rung=UDP) == [] and p.net.sent(src="a", rung=SSH) == []
        assert p.a.ssh.dials == 0
        snap = consistent(p.sa)
        assert snap["why_not_better"] == "UDP: the config forces relay; SSH: the config forces relay"
        assert snap["rung_changes"] == 0
        assert pinger.answered_since(p.net.clock.now - 5.0) >= 8
        pinger.stop()

    simulate(body, a_choice=RungChoice(force=RELAY))


# --- (7) status through every rung and back ---------------------------------------------------------------------


def test_status_follows_the_ladder_down_to_the_relay_and_back_to_udp(simulate: Callable[..., None]) -> None:
    async def body(p: Pair) -> None:
        pinger, _, switched = await udp_fails_over_to_ssh(p)
        snap = consistent(p.sa)
        assert (snap["rung"], snap["rung_changes"]) == (SSH, 1)
        await p.net.run_for(HOLD + 1 - (p.net.clock.now - switched))
        p.a.ssh.refuse = p.b.ssh.refuse = SSH_REFUSED
        link = p.sa.peer.endpoint
        assert isinstance(link, SshMemoryLink)
        link.drop("connection lost")
        await p.net.run_until(lambda: p.sa.ladder.current == RELAY, 10.0, "a on the relay")
        snap = consistent(p.sa)
        assert (snap["rung"], snap["rung_changes"], snap["path"]) == (RELAY, 2, "relay ws://192.0.2.9:7400")
        assert snap["why_not_better"].startswith("UDP: ") and "; SSH: " in snap["why_not_better"]
        on_relay = p.net.clock.now
        p.net.unblock(UDP)
        await p.net.run_until(lambda: p.sa.ladder.current == UDP, BETTER_PROBE + 2.0, "a back on UDP")
        assert p.net.clock.now - on_relay <= BETTER_PROBE + 1.0 + STEP  # the next probe of better rungs
        snap = consistent(p.sa)
        assert (snap["rung"], snap["rung_changes"], snap["path"], snap["why_not_better"]) == (
            UDP, 3, "udp 192.0.2.2:51820", None)
        assert [(t["previous"], t["rung"], t["why"]) for t in snap["transitions"]] == [
            (UDP, SSH, "udp failing"), (SSH, RELAY, "ssh failing"), (RELAY, UDP, "step down after a probe")]
        times = [t["at"] for t in snap["transitions"]]
        assert all(later - earlier >= HOLD for earlier, later in zip(times, times[1:])), times
        assert [e for e in p.a.bus_events("path")] == snap["transitions"]
        assert await p.sa.handle(GetStatus()) == p.sa.snapshot()
        await p.net.run_until(lambda: p.sb.ladder.current == UDP, 2 * FAILING_AFTER, "b back on UDP")
        consistent(p.sb)
        await p.net.run_for(2.0)
        assert pinger.answered_since(p.net.clock.now - 2.0) >= 3
        pinger.stop()

    simulate(body)


# --- more of the glue: a reconnected link, a peer's new address, a search that gives up ---------------


def test_a_new_connection_on_the_current_rung_becomes_the_endpoint_without_a_rung_change(
        simulate: Callable[..., None]) -> None:
    async def body(p: Pair) -> None:
        pinger, _, _ = await udp_fails_over_to_ssh(p)
        await p.net.run_until(lambda: p.sb.ladder.current == SSH, 2.0, "b on SSH")
        await p.net.run_for(REKEY_TIMEOUT)
        for node in (p.a, p.b):  # no relay either: SSH must come back by itself
            node.relay.state, node.relay.error = "unreachable", "connection refused on 192.0.2.9:7400"
        old = p.sa.peer.endpoint
        assert isinstance(old, SshMemoryLink)
        at_link_up: dict[str, object] = {}

        def endpoints_at_link_up(mine: SshMemoryLink, theirs: SshMemoryLink) -> None:
            # Before anything came over the new connection (the core's own roaming would
            # move the endpoint then): only the sessions' on_link_up has acted.
            at_link_up.update({mine.owner.name: mine.owner.session(mine.peer).peer.endpoint is mine,
                               theirs.owner.name: theirs.owner.session(theirs.peer).peer.endpoint is theirs})

        p.net.after_link_up = endpoints_at_link_up
        down = p.net.clock.now
        old.drop("connection reset")  # both sides search, both dial: a's dial makes the link
        await p.net.run_until(lambda: p.a.ssh.link(p.b.device.static_public) is not None, 1.0, "SSH redialled")
        assert at_link_up == {"a": True, "b": True}
        new = p.a.ssh.link(p.b.device.static_public)
        assert new is not old and p.sa.peer.endpoint is new and p.sb.peer.endpoint is new.far()
        # Only the side that dialled probes on the new link (crossing initiations would each
        # discard the other's), so the handshake there ends both searches at once.
        await p.net.run_until(lambda: not p.sa.ladder.searching and not p.sb.ladder.searching, 1.0, "searches over")
        assert [s.src for s in p.net.sent(rung=SSH, kind=INIT, since=down)] == ["a"]
        assert p.sa.peer.endpoint is new and p.sa.ladder.current == SSH and len(p.sa.transitions) == 1
        assert p.sb.ladder.current == SSH and len(p.sb.transitions) == 1
        consistent(p.sa)
        await p.net.run_for(2.0)
        assert pinger.answered_since(p.net.clock.now - 2.0) >= 3
        pinger.stop()

    simulate(body)


def test_a_peer_roaming_within_udp_is_followed_and_probed_at_its_new_address(simulate: Callable[..., None]) -> None:
    async def body(p: Pair) -> None:
        await up_on_udp(p)
        p.net.rebind(p.a, A2)  # a's NAT changes its mapping: UDP from a now comes from A2
        pinger = Pinger(p.net, p.a, p.b)
        await p.net.run_until(lambda: p.sb.peer.endpoint == A2, 1.0, "b sending to A2")
        # Roaming within a rung is the core's (WireGuard's); the ladder sees no change.
        assert p.sb.ladder.current == UDP and p.sb.transitions == []
        assert [e["endpoint"] for e in p.b.bus_events("endpoint")] == ["udp 192.0.2.1:51820", "udp 198.51.100.1:40000"]
        assert consistent(p.sb)["endpoint"] == "198.51.100.1:40000"
        pinger.stop()
        # And it is where b's own UDP probes go once b's traffic finds UDP failing.
        await p.net.run_for(REKEY_TIMEOUT + 1)
        p.net.block(UDP)
        cut = p.net.clock.now
        b_pings = Pinger(p.net, p.b, p.a)
        await p.net.run_until(lambda: bool(p.net.sent(src="b", rung=UDP, kind=INIT, since=cut)), 10.0,
                              "b probing UDP")
        b_pings.stop()
        assert {s.to for s in p.net.sent(src="b", rung=UDP, kind=INIT, since=cut)} == {A2}

    simulate(body)


async def peer_moves_to_a_new_udp_address(p: Pair) -> Pinger:
    """On SSH, a's NAT changes a's UDP address to A2 while UDP is cut; once UDP is back, a
    steps down (its probe now comes from A2) and b, hearing a on UDP from A2 and nothing on
    SSH, follows it there."""
    pinger, _, _ = await udp_fails_over_to_ssh(p)
    await p.net.run_until(lambda: p.sb.ladder.current == SSH, 2.0, "b on SSH")
    p.net.rebind(p.a, A2)
    p.net.unblock(UDP)
    await p.net.run_until(lambda: p.sa.ladder.current == UDP, BETTER_PROBE + 2.0, "a back on UDP")
    await p.net.run_until(lambda: p.sb.ladder.current == UDP, FAILING_AFTER + 2.0, "b back on UDP")
    return pinger


def test_a_peer_heard_on_udp_from_a_new_address_is_followed_there(simulate: Callable[..., None]) -> None:
    async def body(p: Pair) -> None:
        pinger = await peer_moves_to_a_new_udp_address(p)
        # b's endpoint is the address a's packets came from (the stray's), not the one it knew.
        assert p.sb.peer.endpoint == A2
        change = p.sb.transitions[-1]
        assert (change["previous"], change["rung"], change["why"], change["endpoint"]) == (
            SSH, UDP, "peer moved", "udp 198.51.100.1:40000")
        assert consistent(p.sb)["endpoint"] == "198.51.100.1:40000"
        await p.net.run_for(2.0)
        assert pinger.answered_since(p.net.clock.now - 2.0) >= 3
        pinger.stop()

    simulate(body)


def test_udp_probes_go_to_the_address_the_peer_was_followed_to(simulate: Callable[..., None]) -> None:
    # Once PeerSession._switch moved peer.endpoint to the stray address but not udp_address,
    # so the session's own UDP probes still went to the address the peer had left.
    async def body(p: Pair) -> None:
        pinger = await peer_moves_to_a_new_udp_address(p)
        pinger.stop()
        await p.net.run_for(HOLD + 1.0)
        # Now UDP fails for b's traffic (a sends nothing, so only b searches): b probes UDP.
        p.net.block(UDP)
        cut = p.net.clock.now
        b_pings = Pinger(p.net, p.b, p.a)
        await p.net.run_until(lambda: bool(p.net.sent(src="b", rung=UDP, kind=INIT, since=cut)), 10.0,
                              "b probing UDP")
        b_pings.stop()
        assert {s.to for s in p.net.sent(src="b", rung=UDP, kind=INIT, since=cut)} == {A2}

    simulate(body)


def test_a_search_that_gave_up_stays_quiet_until_traffic_asks_for_the_peer(simulate: Callable[..., None]) -> None:
    # Once PeerSession._tick took peer.t_retransmit, which the search's own probes keep armed,
    # for new traffic: the search restarted on the next tick and a peer that was down was
    # dialled and probed on every rung forever.
    async def body(p: Pair) -> None:
        await p.net.run_until(lambda: p.sa.ladder.current is None and not p.sa.ladder.searching, GIVE_UP + 2.0,
                              "a's search giving up")
        gave_up, dials = p.net.clock.now, p.a.ssh.dials
        await p.net.run_for(2 * GIVE_UP / 3)
        # What the ladder sends (SSH dials, initiations on the links) stops with its search;
        # the core's own UDP retries are WireGuard's and not checked here.
        assert p.sa.ladder.searching == [] and p.sa.ladder.current is None
        assert p.a.ssh.dials == dials and p.net.sent(src="a", rung=RELAY, since=gave_up + TICK) == []
        # Traffic for the peer starts the search again, and the relay is back.
        p.net.unblock(RELAY)
        p.a.ping(p.b, 1)
        await p.net.run_until(lambda: p.sa.ladder.current == RELAY, TICK + 2 * HAPPY_EYEBALLS + RESEARCH,
                              "a up on the relay")

    simulate(body, blocked=(UDP, SSH, RELAY))
