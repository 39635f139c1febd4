"""Two whole daemons in one process, in virtual time (issue 12, items 4 and 5).

Each node is assembled by actors/node.py, as `tunnelmesh up` assembles it, over the
in-memory edges and rungs of tests/support/memnet.py (its header says what is not real,
and why): its supervisor runs its actors (identity, edges, mesh, peer sessions, the SSH
rung's holder), and the test reaches it only as the daemon's users do: through the
application behind its TUN, its control commands (ControlApi's handlers, called
in-process), and the mesh's mailbox, told what the coordinator client tells it. Every
scenario ends with `down` on both: both supervisors return, and nothing the daemons
started (task, descriptor, thread) is left behind.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from actors.messages import AddPeers, PeerSpec, RemovePeer, SetCandidates, SyncPeers, to_json
from actors.runtime import Leftovers
from tests.support.membership import identities
from tests.support.memnet import Daemon, Net, VirtualClock, VirtualLoop
from tests.support.wire import A_ADDR, A_IP, B_ADDR, B_IP
from tunnelmesh.config import RungChoice
from tunnelmesh.identity import NodeIdentity
from tunnelmesh.ladder import BETTER_PROBE, FAILING_AFTER, SSH, UDP
from tunnelmesh.wireguard.constants import REKEY_TIMEOUT

PING_EVERY = 0.5  # the application's pings while traffic is wanted


def peer(name: str, identity: NodeIdentity, mesh_ip: str, *, endpoint: tuple[str, int] | None,
         choice: RungChoice = RungChoice()) -> PeerSpec:
    """A peer as the coordinator client hands it to the mesh (actors.coordinator_client.peer_spec)."""
    return PeerSpec(name=name, mesh_ip=ipaddress.IPv4Address(mesh_ip), fingerprint=identity.fingerprint,
                    wg_key=identity.public.wg_public_key, allowed_ips=(ipaddress.IPv4Network(f"{mesh_ip}/32"),),
                    endpoint=endpoint, persistent_keepalive=0, choice=choice,
                    candidates=(endpoint,) if endpoint is not None else ())


@dataclass
class Pair:
    net: Net
    a: Daemon
    b: Daemon
    a_id: NodeIdentity
    b_id: NodeIdentity
    seq: int = 1  # of the application's next ping

    async def status(self, node: Daemon) -> dict[str, Any]:
        """`tunnelmesh status` on `node`, as the control socket would answer it."""
        return to_json(await self.net.complete(node.api.status({}), 2.0, f"{node.name}'s status"))  # type: ignore[no-any-return]

    async def path_rung(self, node: Daemon) -> str | None:
        (peer_status,) = (await self.status(node))["peers"]
        return peer_status["path"]["rung"] if peer_status["path"] is not None else None

    async def ping_until(self, src: Daemon, dst: Daemon, condition: Callable[[], bool], limit: float,
                         what: str) -> None:
        """The application behind `src` pings `dst` every PING_EVERY s until `condition()` holds."""
        began = self.net.clock.now
        while not condition():
            if self.net.clock.now >= began + limit:
                pytest.fail(f"not within {limit:g} s: {what}")
            src.ping(dst, self.seq)
            self.seq += 1
            await self.net.run_for(PING_EVERY)

    async def pings_answered(self, src: Daemon, dst: Daemon, count: int = 3) -> int:
        """Send `count` pings from the application behind `src`; how many of them `dst` answered
        by the time the last had PING_EVERY s."""
        sent = range(self.seq, self.seq + count)
        self.seq += count
        for seq in sent:
            src.ping(dst, seq)
            await self.net.run_for(PING_EVERY)
        return sum(1 for _, seq in src.echo_replies if seq in sent)


Scenario = Callable[[Pair], Awaitable[None]]


async def _run(net: Net, a_id: NodeIdentity, b_id: NodeIdentity, body: Scenario) -> None:
    """a knows b's UDP address, b learns a's from a's first message (so only a initiates), and
    b starts half a tick before a (in phase, their ladders' probes would cross on every retry)."""
    leftovers = Leftovers()
    a = Daemon(net, "a", a_id, A_ADDR, A_IP, [peer("b", b_id, B_IP, endpoint=B_ADDR)], seed=11)
    b = Daemon(net, "b", b_id, B_ADDR, B_IP, [peer("a", a_id, A_IP, endpoint=None)], seed=12)
    b_running = asyncio.ensure_future(b.node.run())
    await net.run_for(0.5)
    a_running = asyncio.ensure_future(a.node.run())
    await body(Pair(net, a, b, a_id, b_id))

    for node in (a, b):
        assert await net.complete(node.api.down({}), 1.0, f"{node.name}: down") == "stopping"
    await net.run_until(lambda: a_running.done() and b_running.done(), 2.0, "both daemons stopped")
    for running in (a_running, b_running):
        assert (running.result().reason, running.result().exit_code) == ("down requested", 0)
    assert await leftovers.found() == []


@pytest.fixture
def two_daemons() -> Iterator[Callable[[Scenario], None]]:
    """Run a scenario on two fresh daemons, in virtual time."""
    a_id, b_id = identities()[:2]  # made once per process, before the loop runs (they run their own)

    def run(body: Scenario) -> None:
        clock = VirtualClock()
        with asyncio.Runner(loop_factory=lambda: VirtualLoop(clock)) as runner:
            loop = runner.get_loop()
            assert isinstance(loop, VirtualLoop)
            runner.run(_run(Net(clock, loop), a_id, b_id, body))

    yield run


async def up_on_udp(p: Pair) -> None:
    await p.net.run_until(lambda: bool(p.a.bus_events("handshake")) and bool(p.b.bus_events("handshake")), 1.0,
                          "a handshake between a and b")
    assert await p.path_rung(p.a) == await p.path_rung(p.b) == UDP


# --- (a) handshake and data ---------------------------------------------------------------------------


def test_two_daemons_handshake_on_udp_and_carry_the_applications_traffic(
        two_daemons: Callable[[Scenario], None]) -> None:
    async def body(p: Pair) -> None:
        await up_on_udp(p)
        assert p.a.bus_events("handshake") == [{"event": "handshake", "peer": "b", "initiator": True, "rung": UDP}]
        status = await p.status(p.a)
        assert (status["node"]["name"], status["node"]["mesh_ip"], status["node"]["fingerprint"]) == \
            ("a", A_IP, p.a_id.fingerprint)
        (b_seen,) = status["peers"]
        assert (b_seen["name"], b_seen["state"], b_seen["path"]) == ("b", "up", {"rung": UDP, "endpoint": "udp 192.0.2.2:51820"})
        assert await p.pings_answered(p.a, p.b) == 3
        assert await p.pings_answered(p.b, p.a) == 3
        pong = to_json(await p.net.complete(p.a.api.ping({"peer": "b", "wait": 2}), 3.0, "a's ping of b"))
        assert (pong["ok"], pong["answered_on"]) == (True, UDP), pong

    two_daemons(body)


# --- (b) rung changes ------------------------------------------------------------------------------------


def test_udp_cut_both_ways_moves_both_daemons_to_ssh_and_back_to_udp_once_it_returns(
        two_daemons: Callable[[Scenario], None]) -> None:
    async def body(p: Pair) -> None:
        await up_on_udp(p)
        await p.net.run_for(REKEY_TIMEOUT + 1)  # past the first handshake: probes may start a new one
        p.net.block(UDP)
        a_path = p.a.session(p.b).selector.ladder
        b_path = p.b.session(p.a).selector.ladder
        await p.ping_until(p.a, p.b, lambda: a_path.current == SSH and b_path.current == SSH, 12.0, "both on SSH")
        assert await p.path_rung(p.a) == await p.path_rung(p.b) == SSH
        assert [e["path"]["rung"] for e in p.a.bus_events("path")] == [SSH]
        assert await p.pings_answered(p.a, p.b) == 3
        assert (await p.status(p.a))["node"]["transports"]["ssh"]["links"] == 1

        p.net.unblock(UDP)
        await p.ping_until(p.a, p.b, lambda: a_path.current == UDP and b_path.current == UDP,
                           BETTER_PROBE + FAILING_AFTER + 4.0, "both back on UDP")
        assert await p.path_rung(p.a) == await p.path_rung(p.b) == UDP
        assert [e["path"]["rung"] for e in p.a.bus_events("path")] == [SSH, UDP]
        assert await p.pings_answered(p.a, p.b) == 3

    two_daemons(body)


# --- (c) peer-map changes -----------------------------------------------------------------------------------


def test_a_removed_peer_is_refused_by_the_core_and_works_again_once_added_back(
        two_daemons: Callable[[Scenario], None]) -> None:
    async def body(p: Pair) -> None:
        await up_on_udp(p)
        b_key = p.b_id.public.wg_public_key
        await p.net.complete(p.a.mesh.ask(RemovePeer(b_key, "revoked by the admin")), 1.0, "b removed")
        assert (await p.status(p.a))["peers"] == []
        assert p.a.bus_events("peer_removed") == [{"event": "peer_removed", "peer": "b", "reason": "revoked by the admin"}]
        refused = p.a.device.drops["unknown receiver index"]
        assert await p.pings_answered(p.b, p.a) == 0  # b still holds keys a no longer knows
        assert p.a.device.drops["unknown receiver index"] - refused == 3
        assert await p.pings_answered(p.a, p.b) == 0
        assert p.a.datapath.drops["no peer for destination"] == 3

        # Listed again, with no address known yet: nowhere to send until the candidates come.
        back = peer("b", p.b_id, B_IP, endpoint=None, choice=RungChoice(rungs=(UDP,)))
        await p.net.complete(p.a.mesh.ask(AddPeers((back,))), 1.0, "b added back")
        assert [e["peer"] for e in p.a.bus_events("peer_added")] == ["b"]
        assert await p.pings_answered(p.a, p.b) == 0
        assert (await p.status(p.a))["peers"][0]["state"] == "waiting"
        p.a.mesh.tell_latest(b_key, SetCandidates(b_key, (B_ADDR,)))
        await p.net.run_until(lambda: len(p.a.bus_events("handshake")) == 2, 1.0, "a's handshake with b, added back")
        assert await p.path_rung(p.a) == UDP
        assert await p.pings_answered(p.a, p.b) == 3
        assert await p.pings_answered(p.b, p.a) == 3

    two_daemons(body)


def test_the_whole_member_set_adds_what_is_missing_removes_the_rest_and_keeps_the_others(
        two_daemons: Callable[[Scenario], None]) -> None:
    """What a restarted coordinator client tells the mesh first (SyncPeers)."""
    async def body(p: Pair) -> None:
        await up_on_udp(p)
        session = p.a.session(p.b)
        b = peer("b", p.b_id, B_IP, endpoint=B_ADDR)
        await p.net.complete(p.a.mesh.ask(SyncPeers((b,))), 1.0, "the same set")
        assert p.a.session(p.b) is session and p.a.bus_events("peer_removed") == []  # kept, keys and all
        assert await p.pings_answered(p.a, p.b) == 3
        await p.net.complete(p.a.mesh.ask(SyncPeers(())), 1.0, "an empty set")
        assert p.a.bus_events("peer_removed") == [{"event": "peer_removed", "peer": "b", "reason": "no longer a member"}]
        assert (await p.status(p.a))["peers"] == []
        await p.net.complete(p.a.mesh.ask(SyncPeers((b,))), 1.0, "b again")
        assert [e["peer"] for e in p.a.bus_events("peer_added")] == ["b"]
        await p.net.run_until(lambda: len(p.a.bus_events("handshake")) == 2, 2.0, "a's handshake with b, synced back")
        assert await p.pings_answered(p.a, p.b) == 3
        # The same key with a changed entry (here: its rungs) replaces the session.
        before = p.a.session(p.b)
        changed = peer("b", p.b_id, B_IP, endpoint=B_ADDR, choice=RungChoice(rungs=(UDP,)))
        await p.net.complete(p.a.mesh.ask(SyncPeers((changed,))), 1.0, "b changed")
        assert p.a.session(p.b) is not before and p.a.mesh.specs[b.wg_key] == changed
        assert [e["reason"] for e in p.a.bus_events("peer_removed")] == ["no longer a member", "replaced by a newer entry"]

    two_daemons(body)


# --- (d) down, with work in flight ------------------------------------------------------------------------------


def test_down_while_a_control_ping_waits_and_an_ssh_link_is_up_leaves_nothing_behind(
        two_daemons: Callable[[Scenario], None]) -> None:
    async def body(p: Pair) -> None:
        await up_on_udp(p)
        await p.net.run_for(REKEY_TIMEOUT + 1)
        p.net.block(UDP)
        a_path = p.a.session(p.b).selector.ladder
        await p.ping_until(p.a, p.b, lambda: a_path.current == SSH, 12.0, "a on SSH")
        p.net.block(SSH)
        waiting = asyncio.ensure_future(p.a.api.ping({"peer": "b", "wait": 30}))  # unanswered: held open by down
        await p.net.run_for(1.0)
        assert not waiting.done()  # `down` follows with it in flight: the session's ping task is stopped

    two_daemons(body)
