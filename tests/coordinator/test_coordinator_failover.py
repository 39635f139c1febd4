"""A node with several coordinator URLs (`[coordinator] urls`) fails over between the
coordinators of its network (tunnelmesh/coordinator/failover.py) and never touches its
peers for it: its map and the map's version stay, the mesh is told no membership change,
it long-polls the next coordinator for what changed since its version, and goes back to
the preferred one once that answers again (a 429 is an answer), asking it whatever the
one in use answers. A refusal (unknown key) from the preferred one is the network's
answer and moves it nowhere; a later one refusing again and again is left for the next;
a revocation stops the node wherever it comes from.

Real coordinators on 127.0.0.1, each an aiohttp app of its own over one store (as
coordinators share a PostgreSQL database), stopped and started again at the same URL;
the real CoordinatorClient and HTTP client; real SSH identities. The mesh's side is an
actor that keeps what it is told."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from actors.control import EventBus
from actors.coordinator_client import CoordinatorClient
from actors.messages import AddPeers, RemovePeer, SyncPeers
from actors.runtime import Actor, Supervisor
from tests.coordinator.test_relay import Sink
from tests.support.coordinator import UNLIMITED, AdminMachine, World, join, now, running, set_up
from tests.support.wait import until
from tunnelmesh.coordinator import failover
from tunnelmesh.coordinator.client import Coordinator
from tunnelmesh.coordinator.app import make_app, serve
from tunnelmesh.coordinator.store import Store
from tunnelmesh.links import relay as relay_module
from tunnelmesh.links.relay import RelayClient
from tunnelmesh.membership import PeerMap, Revocation
from tunnelmesh.nat.report import MAPPED, Candidate
from tunnelmesh.netstate import NetworkState
from tunnelmesh.ratelimit import Rate, RateLimiter

#: How often a node on a later coordinator asks the preferred one again (60 s in a daemon).
PREFERRED_RETRY = 0.2
LOG = "tunnelmesh.coordinator"
JSON = dict[str, Any]


class Recorded:
    """A coordinator of its own over a shared store, stopped and started again at the same
    URL (with the same `limiter`: its buckets stay as they were); the requests it answered,
    in order, with the status ("GET /v1/map?since=... 200"). A held long-poll shows once
    it is answered."""

    def __init__(self, store: Store, limiter: RateLimiter | None = None) -> None:
        self.store = store
        self.limiter = limiter if limiter is not None else RateLimiter(UNLIMITED, UNLIMITED)  # one is falsy while empty
        self.port = 0
        self.requests: list[str] = []
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        app = make_app(self.store, limiter=self.limiter)

        async def answered(request: web.Request, response: web.StreamResponse) -> None:
            self.requests.append(f"{request.method} {request.path_qs} {response.status}")

        app.on_response_prepare.append(answered)
        self._runner = await serve(app, "127.0.0.1", self.port)
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def asked(self, prefix: str) -> list[str]:
        return [request for request in self.requests if request.startswith(prefix)]


class MeshRecorder(Actor):
    """The mesh's side of the client: every message it is told, in order."""

    name = "mesh"

    def __init__(self) -> None:
        super().__init__()
        self.told: list[Any] = []

    async def handle(self, message: Any) -> None:
        self.told.append(message)

    def membership(self, since: int = 0) -> list[Any]:
        """The membership messages from the `since`-th message on."""
        return [m for m in self.told[since:] if isinstance(m, (SyncPeers, AddPeers, RemovePeer))]


@asynccontextmanager
async def network(tmp_path: Path, world: World) -> AsyncIterator[tuple[str, Store, AdminMachine, JSON]]:
    """A coordinator holding the world's network with node one joined: (its URL, its store,
    the admin's machine, node one's member entry). The coordinators under test are more
    apps over its store."""
    async with running(tmp_path / "coordinator.db") as (url, store):
        admin_node = await set_up(url, world)
        machine = AdminMachine.create(tmp_path / "admin", url, world, admin_node)
        async with machine.admitting():
            joined = await join(url, world, 1, world.invite(), "one")
        yield url, store, machine, joined["member"]


@asynccontextmanager
async def coordinators(store: Store, count: int) -> AsyncIterator[list[Recorded]]:
    made = [Recorded(store) for _ in range(count)]
    try:
        for coordinator in made:
            await coordinator.start()
        yield made
    finally:
        for coordinator in made:
            await coordinator.stop()


@asynccontextmanager
async def node(world: World, i: int, member: JSON, urls: list[str], tmp_path: Path,
               **options: Any) -> AsyncIterator[tuple[CoordinatorClient, MeshRecorder]]:
    """Node i's coordinator client over `urls`, running beside its mesh's recorder."""
    supervisor = Supervisor()
    mesh = MeshRecorder()
    client = CoordinatorClient(
        NetworkState(urls[0], world.network, world.entry(member)), world.nodes[i],
        PeerMap(world.network, world.nodes[i].public.wg_public_key), mesh,  # type: ignore[arg-type]
        EventBus(), cache_path=tmp_path / f"peermap{i}.json", secret_path=tmp_path / f"secret{i}",
        listen_port=51820, urls=urls, preferred_retry=PREFERRED_RETRY, **options)
    supervisor.add(mesh)
    supervisor.add(client)
    running_ = asyncio.create_task(supervisor.run())
    try:
        yield client, mesh
    finally:
        supervisor.shutdown("test over")
        await running_


def test_a_stopped_coordinator_moves_the_node_to_the_next_and_back_without_touching_its_peers(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, LOG)
    world = World.create()

    async def scenario() -> None:
        async with network(tmp_path, world) as (url, store, machine, one), coordinators(store, 2) as (first, second):
            followed: list[str] = []
            async with node(world, 1, one, [first.url, second.url], tmp_path,
                            on_revoked=lambda why: None, on_coordinator_url=[followed.append]) as (client, mesh):
                await until("connected to the first, the map handed on", lambda: client.connection == "connected"
                            and len(mesh.membership()) == 2, 20)
                version, told = client.peer_map.version, len(mesh.told)
                # The start's (from the empty cache), then the first map's.
                assert [(type(m), [s.name for s in m.specs]) for m in mesh.membership()] == [
                    (SyncPeers, []), (AddPeers, ["admin"])]

                await first.stop()
                await until("connected to the second", lambda: client.url == second.url
                            and client.connection == "connected", 20)
                status = client.status()
                assert (status.url, status.urls, status.version) == (second.url, (first.url, second.url), version)
                assert client.peer_map.version == version  # the map is the node's: it kept it
                switched = [r.getMessage() for r in caplog.records if "switched to" in r.getMessage()]
                assert len(switched) == 1 and switched[0].startswith(f"coordinator {first.url} unreachable (")
                assert switched[0].endswith(f"); switched to {second.url}")

                # A change made through another coordinator of the database reaches the node
                # on the second, which asks for what changed since the version it kept.
                async with machine.admitting():
                    await join(url, world, 2, world.invite(), "two")
                await until("member two in the map", lambda: len(client.snapshot.members) == 2, 20)
                assert second.asked(f"GET /v1/map?since={version}&")
                assert [(type(m), [s.name for s in m.specs]) for m in mesh.membership(told)] == [(AddPeers, ["two"])]

                await first.start()  # at the same URL
                await until("back on the first", lambda: client.url == first.url
                            and client.connection == "connected", 20)
                assert first.asked("GET /v1/network")  # it asked before going back
                assert [type(m) for m in mesh.membership(told)] == [AddPeers]  # nothing more from the moves
                assert followed == [first.url, second.url, first.url]  # the relay rung follows
                assert client.status().url == first.url
                assert client.snapshot.version > version

    asyncio.run(asyncio.wait_for(scenario(), 90))


@asynccontextmanager
async def proxy_answering(status: int, asked: list[str] | None = None) -> AsyncIterator[str]:
    """What a reverse proxy in front of a coordinator answers when that is down (502) or
    under maintenance (403, 404): `status` and a page of HTML, to every request (listed
    in `asked`). Its URL."""
    async def page(request: web.Request) -> web.Response:
        if asked is not None:
            asked.append(f"{request.method} {request.path}")
        return web.Response(status=status, text=f"<html><body>{status}</body></html>", content_type="text/html")

    app = web.Application()
    app.router.add_route("*", "/{path:.*}", page)
    runner = await serve(app, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


def test_a_5xx_answer_is_failed_over_at_once_and_the_preferred_one_asked_until_it_answers(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The preferred URL answers 502 (a proxy whose coordinator is down): the node goes on
    to the next without waiting and, there, keeps asking the preferred one, staying while
    it answers 502."""
    caplog.set_level(logging.DEBUG, LOG)
    world = World.create()

    async def scenario() -> None:
        async with network(tmp_path, world) as (_, store, _, one), coordinators(store, 1) as (second,), \
                proxy_answering(502) as proxy:
            async with node(world, 1, one, [proxy, second.url], tmp_path, on_revoked=lambda why: None) as (client, _):
                await until("connected to the second", lambda: client.url == second.url
                            and client.connection == "connected", 20)
                switched = [r.getMessage() for r in caplog.records if "switched to" in r.getMessage()]
                assert len(switched) == 1 and switched[0].startswith(f"coordinator {proxy} unreachable (")
                assert "answered HTTP 502 without a JSON object" in switched[0]
                await until("the preferred one asked twice", lambda: sum(
                    "still not answering" in r.getMessage() for r in caplog.records) >= 2, 10)
                assert client.url == second.url and client.connection == "connected"

    asyncio.run(asyncio.wait_for(scenario(), 60))


def test_a_refusal_is_the_networks_answer_and_moves_the_node_nowhere(tmp_path: Path) -> None:
    """A revoked node stops at the preferred coordinator's 403 (the revocation verifies);
    a key that is no member's (401) is refused again there after the backoff. Neither
    asks the next coordinator."""
    world = World.create()
    stopped: list[str] = []

    async def scenario() -> None:
        async with network(tmp_path, world) as (url, store, _, one), coordinators(store, 2) as (first, second):
            async with Coordinator(url, admin=world.admin) as admin:
                await admin.revoke(Revocation.create(world.admin, world.entry(one), now()).to_wire())
            async with node(world, 1, one, [first.url, second.url], tmp_path, on_revoked=stopped.append) as (client, _):
                await until("node one stopped", lambda: stopped, 20)
                assert "was revoked by the network admin" in stopped[0]
                assert first.asked("POST /v1/register") and client.url == first.url
            ghost = world.admin_member(3, "ghost", 9)  # signed by the admin, never given to a coordinator
            async with node(world, 3, ghost, [first.url, second.url], tmp_path, on_revoked=stopped.append) as (
                    client, _):
                await until("refused twice", lambda: len(first.asked("POST /v1/register")) == 3
                            and client.connection == "unreachable", 20)
                assert client.url == first.url
                assert client.error is not None and "unknown node" in client.error
            assert second.requests == [] and len(stopped) == 1

    asyncio.run(asyncio.wait_for(scenario(), 60))


def test_a_later_coordinator_that_refuses_the_node_does_not_keep_it_from_the_preferred_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """The preferred coordinator is down at start; the next URL answers 404 (a proxy's
    maintenance page) to the node's every register, so it is never connected there. It
    keeps asking the preferred one while it backs off, and goes back once that answers."""
    monkeypatch.setattr(failover, "REFUSALS_TO_MOVE", 1000)  # no leaving the proxy but by the asks
    caplog.set_level(logging.INFO, LOG)
    world = World.create()
    asked: list[str] = []

    async def scenario() -> None:
        async with network(tmp_path, world) as (_, store, _, one), coordinators(store, 1) as (first,), \
                proxy_answering(404, asked) as proxy:
            await first.stop()
            async with node(world, 1, one, [first.url, proxy], tmp_path, on_revoked=lambda why: None) as (client, _):
                # Its answer handled, not only asked (the proxy records the request before the client reads the 404).
                await until("refused by the proxy", lambda: asked and client.url == proxy
                            and client.connection == "unreachable", 20)
                assert "HTTP 404" in (client.error or "")
                await first.start()
                await until("back on the first", lambda: client.url == first.url
                            and client.connection == "connected", 20)
                assert f"switching back from {proxy}" in caplog.text
                assert set(asked) == {"POST /v1/register"}  # the proxy was asked only to register
                registers = len(first.asked("POST /v1/register"))
                client.set_mapped(Candidate("198.51.100.9", 40100, MAPPED))  # registered beside the long-poll
                await until("following the first's map", lambda: len(first.asked("POST /v1/register")) > registers, 20)

    asyncio.run(asyncio.wait_for(scenario(), 60))


def test_a_later_coordinator_refusing_again_and_again_is_left_for_the_next(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The preferred one down, the next answers 403 (a proxy's maintenance page): after
    REFUSALS_TO_MOVE refusals in a row the node tries the URL after it."""
    caplog.set_level(logging.INFO, LOG)
    world = World.create()
    asked: list[str] = []

    async def scenario() -> None:
        async with network(tmp_path, world) as (_, store, _, one), coordinators(store, 2) as (first, third), \
                proxy_answering(403, asked) as proxy:
            await first.stop()
            async with node(world, 1, one, [first.url, proxy, third.url], tmp_path,
                            on_revoked=lambda why: None) as (client, _):
                await until("connected to the third", lambda: client.url == third.url
                            and client.connection == "connected", 30)
                assert asked == ["POST /v1/register"] * failover.REFUSALS_TO_MOVE
                switched = [r.getMessage() for r in caplog.records if "switched to" in r.getMessage()]
                assert switched[-1].startswith(
                    f"coordinator {proxy} refused this node {failover.REFUSALS_TO_MOVE} times in a row (")
                assert switched[-1].endswith(f"); switched to {third.url}")
                registers = len(third.asked("POST /v1/register"))
                client.set_mapped(Candidate("198.51.100.9", 40100, MAPPED))  # registered beside the long-poll
                await until("following the third's map", lambda: len(third.asked("POST /v1/register")) > registers, 20)

    asyncio.run(asyncio.wait_for(scenario(), 60))


def test_a_revocation_from_a_later_coordinator_stops_the_node_there(tmp_path: Path) -> None:
    world = World.create()
    stopped: list[str] = []

    async def scenario() -> None:
        async with network(tmp_path, world) as (url, store, _, one), coordinators(store, 3) as (first, second, third):
            async with Coordinator(url, admin=world.admin) as admin:
                await admin.revoke(Revocation.create(world.admin, world.entry(one), now()).to_wire())
            await first.stop()
            async with node(world, 1, one, [first.url, second.url, third.url], tmp_path,
                            on_revoked=stopped.append) as (client, _):
                await until("node one stopped", lambda: stopped, 20)
                assert "was revoked by the network admin" in stopped[0]
                assert client.url == second.url and len(second.asked("POST /v1/register")) == 1
            assert third.requests == [] and len(stopped) == 1

    asyncio.run(asyncio.wait_for(scenario(), 60))


def test_a_preferred_coordinator_that_rate_limits_the_ask_answers_and_the_node_goes_back(tmp_path: Path) -> None:
    """429 to `GET /v1/network` (the unsigned requests' budget spent): the coordinator is
    up, and the node's register there (signed) is not limited so."""
    world = World.create()
    spent = Rate(per_second=1e-6, burst=1)  # one request, then none for days

    async def scenario() -> None:
        async with network(tmp_path, world) as (_, store, _, one), coordinators(store, 1) as (second,):
            first = Recorded(store, RateLimiter(spent, spent))
            await first.start()
            try:
                async with Coordinator(first.url) as anyone:
                    await anyone.network()  # the one request both its buckets allow
                await first.stop()
                async with node(world, 1, one, [first.url, second.url], tmp_path,
                                on_revoked=lambda why: None) as (client, _):
                    await until("connected to the second", lambda: client.url == second.url
                                and client.connection == "connected", 20)
                    await first.start()  # its buckets still empty
                    await until("back on the first", lambda: client.url == first.url
                                and client.connection == "connected", 20)
                answers = [request.rsplit(" ", 1)[1] for request in first.asked("GET /v1/network")]
                assert answers[0] == "200" and set(answers[1:]) == {"429"}, answers
            finally:
                await first.stop()

    asyncio.run(asyncio.wait_for(scenario(), 60))


@asynccontextmanager
async def relay_client(world: World, i: int, url: str) -> AsyncIterator[tuple[RelayClient, Sink]]:
    """Node i's client of the relay of the coordinator at `url`, running."""
    sink = Sink()
    made = RelayClient(url, world.nodes[i], world.network.network, sink)
    task = asyncio.create_task(made.run())
    try:
        yield made, sink
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def test_the_relay_client_follows_the_coordinator_in_use_at_once_keeping_its_links(tmp_path: Path) -> None:
    """`move_to` (what the coordinator client calls on a switch): the connection to the
    relay left is closed and one to the new coordinator's relay made at once, the links
    stay the same objects (a session keeps its endpoint), messages flow through the new."""
    world = World.create()

    async def scenario() -> None:
        async with network(tmp_path, world) as (url, store, machine, _), coordinators(store, 2) as (first, second):
            async with machine.admitting():
                await join(url, world, 2, world.invite(), "two")
            two_key = world.nodes[2].public.wg_public_key
            async with relay_client(world, 1, first.url) as (one, sink), relay_client(world, 2, second.url) as (
                    two, two_sink):
                await until("both connected", lambda: one.state == two.state == "connected", 20)
                link = one.link(two_key)
                assert link in sink.up
                one.move_to(first.url + "/")  # the same relay, however spelt: nothing to do
                await asyncio.sleep(0)
                assert one.state == "connected" and sink.down == []
                one.move_to(second.url)
                await until("one moved", lambda: len(sink.up) == 2 and one.state == "connected", 20)
                assert (one.url, one.ws_url) == (second.url, second.url.replace("http:", "ws:") + "/relay")
                assert sink.down == [(link, f"following the coordinator to {one.ws_url}")]
                assert sink.up == [link, link] and one.link(two_key) is link and link.description == f"relay {second.url}"
                link.send(b"\x04through the second coordinator's relay")
                await until("two got it", lambda: two_sink.received == [
                    (world.nodes[1].public.wg_public_key, b"\x04through the second coordinator's relay")], 20)

    asyncio.run(asyncio.wait_for(scenario(), 60))


def test_a_relay_client_waiting_to_retry_a_dead_relay_moves_without_waiting_out_its_backoff(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(relay_module, "FIRST_RETRY", 3600.0)  # a retry of the dead one would come too late
    world = World.create()

    async def scenario() -> None:
        async with network(tmp_path, world) as (_, store, _, _), coordinators(store, 2) as (dead, alive):
            await dead.stop()
            async with relay_client(world, 1, dead.url) as (one, _):
                await until("one failed once", lambda: one.state == "unreachable", 20)
                one.move_to(alive.url)  # while it waits out its backoff
                await until("one on the live relay", lambda: one.state == "connected", 20)
                assert one.ws_url.startswith(alive.url.replace("http:", "ws:"))

    asyncio.run(asyncio.wait_for(scenario(), 60))
