"""Whole nodes in one process, in virtual time: the in-memory doubles of the OS edges.

Two (or more) nodes each run the real protocol core (`Device`), data path, mesh actor,
peer sessions and event bus, assembled by actors/node.py: a `Node` is its parts alone (the
test calls the sessions' handlers), a `Daemon` the whole node with its supervisor running
its actors and its control commands answered in-process. What is not real, and why each
stand-in behaves like the thing it replaces:
- Time is virtual: one `VirtualClock` is every node's `Clock` and the event loop's clock
  (`VirtualLoop.time`), so core deadlines, loop timers and the ladder's clock agree, and a
  90 s scenario takes a fraction of a second. The clock jumps from one due timer to the
  next (at most STEP at a time).
- The UDP socket is a `MemoryBind` (actors.edges.Bind): `sendto` lands in the bind at the
  address (readiness through an eventfd, so `DataPath.start`'s reader runs as for a socket).
- The TUN device is a `MemoryTun` (actors.edges.Tun): one end of a Unix datagram
  socketpair; at the other end a tiny "kernel" answers ICMP echo requests, so traffic is
  answered as a real peer's would be. Closing the device closes both ends.
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
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import pytest

from actors.control import EventBus
from actors.datapath import DataPath
from actors.filter import FilterInputs
from actors.links import SshServer, Transports
from actors.mesh import Mesh
from actors.messages import PeerSpec, to_json
from actors.node import Addresses, NodeParts
from actors.node import Node as RunningNode
from actors.session import PeerSession
from tests.support.wire import PSK, kind, seeded_rng
from tunnelmesh.filter import Rule
from tunnelmesh.identity import NodeIdentity
from tunnelmesh.ladder import RELAY, SSH, UDP
from tunnelmesh.links import Link, LinkError
from tunnelmesh.packets import icmp_echo
from tunnelmesh.wireguard import Device
from tunnelmesh.wireguard.constants import DEFAULT_MTU

STEP = 0.125  # the longest stride of the clock between timers (conditions are checked that often)
SPINS = 24  # loop iterations per step: enough for a handshake, its confirmation and a ping
START = 1000.0  # the monotonic clock at the start of every scenario
WALL0 = 1_700_000_000.0  # wall time at monotonic 0
APP_IDENT = 0x7E57  # ICMP identifier of the test's own pings (the session's are random)

T = TypeVar("T")


# --- virtual time ----------------------------------------------------------------------------


class VirtualClock:
    """Virtual time (a tunnelmesh.clock.Clock): what the nodes are given, and the loop's clock."""

    def __init__(self) -> None:
        self.now = START

    def monotonic(self) -> float:
        return self.now

    def wall(self) -> float:
        return WALL0 + self.now


def wall_clock(monotonic: float) -> str:
    """How the session shows a monotonic instant in `status` ("since HH:MM:SS")."""
    return time.strftime("%H:%M:%S", time.localtime(WALL0 + monotonic))


class VirtualLoop(asyncio.SelectorEventLoop):
    """An event loop whose clock is the test's: `call_at`/`call_later` run when the test
    has moved the clock to their time, never in real time. It keeps the times timers are
    due, so the test can move the clock from one to the next (each timer runs at its own
    time: two jittered retransmits are never rounded into one instant)."""

    def __init__(self, clock: VirtualClock) -> None:
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
    def __init__(self, clock: VirtualClock, loop: VirtualLoop) -> None:
        self.clock = clock
        self.loop = loop
        self.nodes: dict[str, Host] = {}
        self.sockets: dict[tuple[str, int], MemoryBind] = {}
        self.blocked: set[tuple[str, str, str]] = set()  # (rung, from, to)
        self.log: list[Sent] = []
        self.held: list[tuple[MemoryBind, bytes, tuple[str, int]]] = []
        self.hold_next: tuple[str, str] | None = None  # (from, to): keep the next UDP datagram back
        self.udp_delay = 0.0  # seconds each UDP datagram takes (links: none), for a path slower than a link
        self.after_link_arrival: Callable[[MemoryLink, bytes], None] | None = None
        self.after_link_up: Callable[[SshMemoryLink, SshMemoryLink], None] | None = None
        #: While True, SSH dials wait in `held_dials` until `release_dials` lets them connect
        #: together: two sides that dialled at once, as both do when they see UDP fail together.
        self.hold_dials = False
        self.held_dials: list[tuple[str, asyncio.Future[None]]] = []

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

    def node_by_key(self, public_key: bytes) -> Host:
        return next(n for n in self.nodes.values() if n.device.static_public == public_key)

    def rebind(self, node: Host, address: tuple[str, int]) -> None:
        """`node`'s UDP port is now reached at `address` (a NAT's new mapping); the old one is gone."""
        del self.sockets[node.sock.address]
        node.sock.address = address
        self.sockets[address] = node.sock

    def udp(self, datagram: bytes, sender: MemoryBind, to: tuple[str, int]) -> None:
        target = self.sockets.get(to)
        if target is None:  # nobody there
            self.record(UDP, sender.node.name, "", datagram, False, to)
            return
        ok = self.carries(UDP, sender.node.name, target.node.name)
        self.record(UDP, sender.node.name, target.node.name, datagram, ok, to)
        if ok and self.hold_next == (sender.node.name, target.node.name):
            self.hold_next = None
            self.held.append((target, datagram, sender.address))
        elif ok and self.udp_delay:
            self.loop.call_later(self.udp_delay, target.arrive, datagram, sender.address)
        elif ok:
            target.arrive(datagram, sender.address)

    def release_dials(self, first: str) -> int:
        """Let the held SSH dials connect, `first`'s before the others, in one loop iteration."""
        held, self.held_dials = sorted(self.held_dials, key=lambda entry: entry[0] != first), []
        self.hold_dials = False
        for _, gate in held:
            gate.set_result(None)
        return len(held)

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

    async def complete(self, awaitable: Awaitable[T], limit: float, what: str) -> T:
        """Await `awaitable` (an `ask` of an actor, a control command) while the clock runs."""
        task = asyncio.ensure_future(awaitable)
        await self.run_until(task.done, limit, what)
        return task.result()


class MemoryBind:
    """A node's UDP socket on the in-memory network (an actors.edges.Bind), without
    offloads: a datagram per call."""

    gso = False
    gro = False

    def __init__(self, net: Net, node: Host, address: tuple[str, int]) -> None:
        self.net = net
        self.node = node
        self.address = address
        self.port = address[1]
        self.inbox: deque[tuple[bytes, tuple[str, int]]] = deque()
        self._ready = os.eventfd(0, os.EFD_NONBLOCK)  # readable while the inbox is not empty
        net.sockets[address] = self

    def fileno(self) -> int:
        return self._ready

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
        del self.net.sockets[self.address]  # datagrams sent here now reach nobody, as to a closed port
        os.close(self._ready)


class MemoryTun:
    """A node's TUN device (an actors.edges.Tun): one end of a Unix datagram socketpair; the
    other end, `app`, is the kernel's side. Closing the device closes both ends, as closing
    a TUN removes the interface. Plain packets, no virtio-net header."""

    vnet_hdr = False
    offloads = ""

    def __init__(self, name: str) -> None:
        self.name = name
        self._end, self.app = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._end.setblocking(False)
        self.app.setblocking(False)
        self.write = self._end.send
        self.fileno = self._end.fileno
        self._kernel_loop: asyncio.AbstractEventLoop | None = None

    def attach_kernel(self, loop: asyncio.AbstractEventLoop, kernel: Callable[[], None]) -> None:
        """Call `kernel` whenever a packet waits at `app`, for as long as the device exists."""
        self._kernel_loop = loop
        loop.add_reader(self.app.fileno(), kernel)

    def readv(self, buffers: list[bytearray]) -> int:
        return self._end.recvmsg_into(buffers)[0]

    def close(self) -> None:
        if self._kernel_loop is not None:
            self._kernel_loop.remove_reader(self.app.fileno())
        self._end.close()
        self.app.close()


class MemoryLink(Link):
    """One end of an in-memory SSH or relay connection between two nodes."""

    def __init__(self, net: Net, owner: Host, peer: Host, description: str) -> None:
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

    def __init__(self, net: Net, owner: Host, peer: Host, dialler: bytes) -> None:
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

    def __init__(self, net: Net, owner: Host, peer: Host) -> None:
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

    def __init__(self, net: Net, node: Host) -> None:
        self.net = net
        self.node = node
        self.links: dict[bytes, SshMemoryLink] = {}
        self.refuse: str | None = None  # dials fail with this (the peer's SSH server is gone)
        self.dials = 0

    def status(self) -> dict[str, Any]:
        return {"port": 2222, "bridge": None, "links": len(self.links), "drops": {}}

    async def close(self) -> None:
        """As SshRung.close: every link ends (each side told by `link_down`)."""
        for link in list(self.links.values()):
            link.close()

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
        if self.net.hold_dials:
            gate = self.net.loop.create_future()
            self.net.held_dials.append((self.node.name, gate))
            await gate
        dialler = self.node.device.static_public
        mine, theirs = SshMemoryLink(self.net, self.node, peer, dialler), SshMemoryLink(self.net, peer, self.node, dialler)
        mine.other, theirs.other = theirs, mine
        peer.ssh.adopt(theirs)  # as SshRung: the server's end is up first, then the dialler's
        self.adopt(mine)
        if self.net.after_link_up is not None:
            self.net.after_link_up(mine, theirs)
        return mine if not mine.closed else self.links[wg_key]

    def adopt(self, end: SshMemoryLink) -> None:
        """As SshRung.adopt_stream: one link per pair; the smaller dialler's stays, and of
        two dialled by one side the newer one. The loser's connection ends (both ends)."""
        current = self.link(end.peer.device.static_public)
        if current is not None and current.dialler < end.dialler:
            end.close()
            return
        self.links[end.peer.device.static_public] = end
        self.node.datapath.link_up(end)
        if current is not None:  # after the new one is up, as SshRung.adopt_stream
            current.close()


class MemoryRelayClient:
    """What PeerSession uses of `RelayClient`: `state`, `error` and one link per peer."""

    def __init__(self, net: Net, node: Host) -> None:
        self.net = net
        self.node = node
        self.state = "connected"
        self.error: str | None = None
        self.url = "ws://192.0.2.9:7400"
        self._links: dict[bytes, RelayMemoryLink] = {}

    def status(self) -> dict[str, Any]:
        return {"url": self.url, "state": self.state, "error": self.error, "connected_since": None,
                "links": len(self._links), "queued": 0, "queued_bytes": 0, "drops": {}, "refused": {}}

    def link(self, peer_key: bytes) -> RelayMemoryLink:
        found = self._links.get(peer_key)
        if found is None:
            found = self._links[peer_key] = RelayMemoryLink(self.net, self.node, self.net.node_by_key(peer_key))
            self.node.datapath.link_up(found)  # as RelayClient.link while connected
        return found


class Host:
    """A machine on the in-memory network: its UDP port, its TUN device with the "kernel"
    behind it, its SSH and relay rungs, and an application that pings. The node on it
    (core, data path, mesh, event bus) is the subclass's."""

    device: Device
    datapath: DataPath
    mesh: Mesh
    bus: EventBus

    def __init__(self, net: Net, name: str, address: tuple[str, int], mesh_ip: str, *, rungs: bool = True) -> None:
        self.net = net
        self.name = name
        self.address = address
        self.mesh_ip = ipaddress.IPv4Address(mesh_ip)
        self.sock = MemoryBind(net, self, address)
        self.tun = MemoryTun(f"tm-{name}")
        self.tun.attach_kernel(net.loop, self._kernel)
        self.app = self.tun.app
        self.ssh = MemorySshRung(net, self)
        self.relay = MemoryRelayClient(net, self)
        # `rungs` False: a daemon configured with UDP alone (a static mesh without [ssh]).
        self.transports = Transports(ssh=self.ssh, relay=self.relay) if rungs else Transports()  # type: ignore[arg-type]
        self.events: list[dict[str, Any]] = []
        self.echo_replies: list[tuple[float, int]] = []  # (when, seq) of answers to the app's pings
        self.arrived: list[bytes] = []  # every packet the tunnel delivered to the TUN
        net.nodes[name] = self

    def watch(self, bus: EventBus) -> None:
        self._events = bus.subscribe()

    def session(self, peer: Host) -> PeerSession:
        return self.mesh.sessions[peer.device.static_public]

    def bus_events(self, event: str | None = None) -> list[dict[str, Any]]:
        """The events published so far, as the control socket shows them."""
        while not self._events.empty():
            self.events.append(to_json(self._events.get_nowait()))
        return [e for e in self.events if event is None or e["event"] == event]

    def ping(self, peer: Host, seq: int) -> None:
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
            self.arrived.append(packet)
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


class Node(Host):
    """A node's parts (actors.node.NodeParts) without its actors running: the test calls
    the sessions' handlers itself and starts and stops the data path."""

    def __init__(self, net: Net, name: str, private: bytes, address: tuple[str, int], mesh_ip: str, seed: int, *,
                 rungs: bool = True) -> None:
        super().__init__(net, name, address, mesh_ip, rungs=rungs)
        parts = NodeParts(private, mtu=DEFAULT_MTU, tun=self.tun, bind=self.sock, clock=net.clock,
                          mesh_ip=self.mesh_ip, psk=PSK, transports=self.transports, rng=seeded_rng(seed))
        self.device, self.datapath, self.bus, self.mesh = parts.device, parts.datapath, parts.bus, parts.mesh
        self.watch(self.bus)

    def start(self) -> None:
        self.datapath.start()

    def stop(self) -> None:
        self.datapath.stop()
        self.tun.close()
        self.sock.close()


class Daemon(Host):
    """A whole daemon as actors/node.py assembles it (its SSH rung held by the daemon's
    own SshServer actor), run by its supervisor: `run()` until `down`; its control
    commands are `api`'s handlers, called in-process. With `filter_inputs` it runs the
    packet filter's actor (as the daemon does, `network` as in coordinator mode)."""

    def __init__(self, net: Net, name: str, identity: NodeIdentity, address: tuple[str, int], mesh_ip: str,
                 peers: Sequence[PeerSpec], seed: int, *, mesh_ipv6: str | None = None,
                 filter_inputs: Callable[[], FilterInputs] | None = None, node_rules: tuple[Rule, ...] | None = None,
                 network: bool = True) -> None:
        super().__init__(net, name, address, mesh_ip)
        ipv6 = ipaddress.IPv6Interface(f"{mesh_ipv6}/64") if mesh_ipv6 is not None else None
        self.node = RunningNode(
            name=name, interface=self.tun.name, identity=identity, mtu=DEFAULT_MTU, tun=self.tun, bind=self.sock,
            addresses=Addresses(ipaddress.IPv4Interface(f"{mesh_ip}/24"), ipv6, ()), psk=PSK,
            transports=self.transports, peers=peers, clock=net.clock, rng=seeded_rng(seed),
        )
        if filter_inputs is not None:
            self.node.add_filter(node_rules=node_rules, inputs=filter_inputs, network=network)
        self.node.add(SshServer(self.ssh))  # type: ignore[arg-type]
        self.device, self.datapath, self.bus, self.mesh = self.node.device, self.node.datapath, self.node.bus, self.node.mesh
        self.api = self.node.control_api()
        self.watch(self.bus)
