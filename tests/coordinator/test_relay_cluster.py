"""Relays across coordinators (tunnelmesh.coordinator.cluster): two real coordinator apps,
each over its own PostgreSQL store on one real throwaway database, forwarding relay frames
between them over an authenticated WebSocket; real members joined through the admin's
machine, real RelayClients, each on the relay of the coordinator it was given.

What must hold: members on different coordinators reach each other both ways, each frame
stamped with its true source; a member that moves to the other coordinator is reached
there; a link that does not prove the cluster secret is refused (logged once, the secret
nowhere in the log); a link that goes down costs counted drops and comes back; a revoked
member's frames go nowhere; two coordinators given one URL keep each other's presence, a
crashed one's is dropped once its heartbeat is stale, and presence lost to a database
outage is recorded again.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import socket
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.coordinator.test_relay import Sink, scenario
from tests.support.coordinator import UNLIMITED, AdminMachine, World, join, now, set_up
from tests.support.databases import Database, postgres_database
from tests.support.wait import until
from tunnelmesh.coordinator import cluster as cluster_module
from tunnelmesh.coordinator.client import Coordinator
from tunnelmesh.coordinator.cluster import AUTH_FAILED, CLUSTER_PATH, STALE_AFTER, Cluster, default_cluster_url, proof
from tunnelmesh.coordinator.relay import Relay
from tunnelmesh.coordinator.app import make_app
from tunnelmesh.coordinator.metrics import CoordinatorCollector
from tunnelmesh.coordinator.standalone import run_standalone
from tunnelmesh.coordinator.store import StoreError, open_store
from tunnelmesh.links.relay import RelayClient
from tunnelmesh.membership import Revocation
from tunnelmesh.ratelimit import RateLimiter
from tunnelmesh.tls import client_ssl, server_context, write_certificate

LOG = "tunnelmesh.coordinator.cluster"


@pytest.fixture(scope="module")
def world() -> World:
    return World.create()


@dataclass
class Side:
    """One coordinator: its URL, its cluster and its app."""

    url: str
    cluster: Cluster
    app: web.Application

    @property
    def relay(self) -> Relay:
        relay = self.cluster.relay
        assert relay is not None, "no member used this coordinator's relay yet"
        return relay

    def knows(self, i: int, world: World, side: Side) -> bool:
        """Whether this coordinator knows member i is at `side` and its link there is up."""
        place = self.cluster.where.get(world.nodes[i].public.wg_public_key)
        link = self.cluster._links.get(side.cluster.id)
        return place is not None and place[0] == side.cluster.id and link is not None and link.queue is not None


@dataclass(frozen=True)
class Certificate:
    """The certificate every coordinator serves, and its pin."""

    cert: Path
    key: Path
    pin: str


@asynccontextmanager
async def coordinator(stack: AsyncExitStack, db: Database, tls: Certificate | None = None,
                      checks: Certificate | None = None, same_url_as: Side | None = None) -> AsyncIterator[Side]:
    """A coordinator over its own store on `db`, with its cluster, as `tunnelmesh
    coordinator --cluster-url` runs it (on a port chosen first: the URL is its own, or
    `same_url_as`'s cluster URL, given by mistake). With `tls`, the cluster URL is a second
    site serving that certificate (members and the admin's machine keep the plain one), and
    the others' is checked against `checks` (default: the same)."""
    store = await open_store(db.url)
    stack.push_async_callback(store.close)
    sockets = [socket.socket() for _ in range(1 if tls is None else 2)]
    for listening in sockets:
        listening.bind(("127.0.0.1", 0))
    url, cluster_url = (f"{scheme}://127.0.0.1:{s.getsockname()[1]}" for s, scheme in zip(
        sockets * 2, ("http", "http" if tls is None else "https")))
    app = make_app(store, limiter=RateLimiter(UNLIMITED, UNLIMITED))
    checks = checks or tls
    if same_url_as is not None:
        cluster_url = same_url_as.cluster.url or ""
    cluster = Cluster(store, cluster_url, True if checks is None else client_ssl(None, checks.pin))
    cluster.attach(app)
    runner = web.AppRunner(app, shutdown_timeout=2.0)
    await runner.setup()
    stack.push_async_callback(runner.cleanup)
    await web.SockSite(runner, sockets[0]).start()
    if tls is not None:
        await web.SockSite(runner, sockets[1], ssl_context=server_context(tls.cert, tls.key)).start()
    yield Side(url, cluster, app)


@asynccontextmanager
async def mesh(db: Database, world: World, on: dict[int, int], tls: Certificate | None = None
               ) -> AsyncIterator[tuple[list[Side], dict[int, Any]]]:
    """Coordinators A and B on `db` (the network set up through A), members `on`'s keys
    joined and each connected (a RelayClient) to the relay of coordinator on[i]:
    (sides, i -> (client, sink, its member entry as joined))."""
    async with AsyncExitStack() as stack:
        sides = [await stack.enter_async_context(coordinator(stack, db, tls)) for _ in range(2)]
        admin_node = await set_up(sides[0].url, world)
        machine = AdminMachine.create(db.home, sides[0].url, world, admin_node)
        async with machine.admitting():
            entries = {i: (await join(sides[0].url, world, i, world.invite(), f"node{i}"))["member"] for i in on}
        clients: dict[int, Any] = {}
        for i, where in on.items():
            sink = Sink()
            client = RelayClient(sides[where].url, world.nodes[i], world.network.network, sink)
            task = asyncio.create_task(client.run())
            stack.push_async_callback(_stopped, task)
            clients[i] = (client, sink, entries[i])
        await until("every member is connected", lambda: all(c[0].state == "connected" for c in clients.values()))
        for i, where in on.items():  # each coordinator knows where the other's members are, its link up
            other = sides[1 - where]
            await until(f"coordinator {1 - where} knows member {i}", lambda: other.knows(i, world, sides[where]))
        yield sides, clients


async def _stopped(task: asyncio.Task[None]) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


def key(world: World, i: int) -> bytes:
    return world.nodes[i].public.wg_public_key


def test_members_on_two_coordinators_reach_each_other_and_a_moved_member_is_reached_there(
        postgres_server: Any, tmp_path: Path, world: World) -> None:
    db = postgres_database(postgres_server, tmp_path)

    async def run() -> None:
        async with mesh(db, world, {1: 0, 2: 1, 3: 1}) as (sides, clients):
            a, b = sides
            (one, one_sink, _), (two, two_sink, _), (three, three_sink, _) = clients[1], clients[2], clients[3]
            one.link(key(world, 2)).send(b"\x04one to two")
            two.link(key(world, 1)).send(b"\x04two to one" + bytes(1400))
            await until("both got theirs", lambda: len(one_sink.received) == 1 and len(two_sink.received) == 1)
            assert two_sink.received == [(key(world, 1), b"\x04one to two")]
            assert one_sink.received == [(key(world, 2), b"\x04two to one" + bytes(1400))]
            assert a.relay.relayed_frames == 2 == b.relay.relayed_frames  # each: the one it sent, the one it took
            assert a.relay.drops == {} and b.relay.drops == {} and a.cluster.drops == {} == b.cluster.drops
            metrics = {family.name: family for family in CoordinatorCollector(a.app).collect()}
            assert [(sample.labels["url"], sample.value)
                    for sample in metrics["tunnelmesh_coordinator_cluster_link_up"].samples] == [(b.cluster.url, 1)]

            two.move_to(a.url)  # two fails over to A: B's members reach it there
            await until("two is at A", lambda: b.knows(2, world, a) and two.state == "connected")
            three.link(key(world, 2)).send(b"\x04three to two, now at A")
            two.link(key(world, 3)).send(b"\x04two at A to three")
            await until("both got theirs", lambda: len(two_sink.received) == 2 and len(three_sink.received) == 1)
            assert two_sink.received[1] == (key(world, 3), b"\x04three to two, now at A")
            assert three_sink.received == [(key(world, 2), b"\x04two at A to three")]
            assert key(world, 2) not in b.relay.status()["peers"] and b.relay.drops == {}

    scenario(run())


def test_a_link_without_the_cluster_secret_is_refused_and_logged_once(
        postgres_server: Any, tmp_path: Path, world: World, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    db = postgres_database(postgres_server, tmp_path)
    caplog.set_level(logging.INFO, LOG)
    monkeypatch.setattr(cluster_module, "FIRST_RETRY", 0.1)

    async def attempt(http: aiohttp.ClientSession, url: str, secret: bytes) -> tuple[int, str]:
        """A link's authentication with `secret`: how it was closed, or (0, its answer)."""
        async with http.ws_connect(url.replace("http", "ws") + CLUSTER_PATH) as ws:
            hello = json.loads((await ws.receive()).data)
            theirs, mine = base64.b64decode(hello["challenge"]), os.urandom(32)
            await ws.send_str(json.dumps({"coordinator": "impostor", "challenge": base64.b64encode(mine).decode(),
                                          "proof": base64.b64encode(proof(secret, b"client", theirs, mine)).decode()}))
            answer = await ws.receive()
            return (answer.data, "") if answer.type is aiohttp.WSMsgType.CLOSE else (0, answer.data)

    async def run() -> None:
        async with mesh(db, world, {1: 0, 2: 1}) as (sides, clients), aiohttp.ClientSession() as http:
            a, b = sides
            secret = b.cluster.secret
            assert len(secret) == 32 and a.cluster.secret == secret  # one secret, from the database
            for _ in range(2):
                assert await attempt(http, b.url, os.urandom(32)) == (AUTH_FAILED, "")
            assert b.cluster.refusals == {"bad proof": 2}
            refused = [r.getMessage() for r in caplog.records if "refused a link" in r.getMessage()]
            assert len(refused) == 1 and "does not match this database's cluster secret" in refused[0]
            code, answer = await attempt(http, b.url, secret)  # the true secret: B proves itself in turn
            assert code == 0 and "proof" in json.loads(answer)
            # A coordinator that holds another secret gets no link: its frames are counted drops.
            a.cluster.secret = os.urandom(32)
            for ws in list(b.cluster._inbound):
                await ws.close()
            await until("A's link is down", lambda: a.cluster._links[b.cluster.id].queue is None)
            clients[1][0].link(key(world, 2)).send(b"\x04lost")
            await until("the frame is dropped", lambda: a.relay.drops["cluster link down"] == 1)
            await until("B refused A's link", lambda: b.cluster.refusals["bad proof"] >= 3)
            await until("A says why", lambda: "refused" in (a.cluster._links[b.cluster.id].error or ""))
        text = caplog.text
        for shown in (secret, a.cluster.secret):
            assert shown.hex() not in text and base64.b64encode(shown).decode() not in text

    scenario(run())


def test_a_link_that_goes_down_counts_drops_and_comes_back(postgres_server: Any, tmp_path: Path, world: World,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    db = postgres_database(postgres_server, tmp_path)
    monkeypatch.setattr(cluster_module, "FIRST_RETRY", 0.1)

    async def run() -> None:
        async with mesh(db, world, {1: 0, 2: 1}) as (sides, clients):
            a, b = sides
            (one, _, _), (_, two_sink, _) = clients[1], clients[2]
            for ws in list(b.cluster._inbound):  # the link from A breaks
                await ws.close()
            await until("A's link is down", lambda: a.cluster._links[b.cluster.id].queue is None)
            one.link(key(world, 2)).send(b"\x04while down")
            await until("the frame is dropped", lambda: a.relay.drops == {"cluster link down": 1})
            await until("A's link is back", lambda: a.knows(2, world, b), 10)
            one.link(key(world, 2)).send(b"\x04after")
            await until("two got it", lambda: two_sink.received == [(key(world, 1), b"\x04after")])
            assert "up" in a.cluster.status()["links"].values()

    scenario(run())


def test_a_revoked_members_frames_are_not_forwarded(postgres_server: Any, tmp_path: Path, world: World) -> None:
    db = postgres_database(postgres_server, tmp_path)

    async def run() -> None:
        async with mesh(db, world, {1: 0, 2: 1}) as (sides, clients):
            a, b = sides
            (one, one_sink, entry), (two, two_sink, _) = clients[1], clients[2]
            revocation = Revocation.create(world.admin, world.entry(entry), now())
            async with Coordinator(b.url, admin=world.admin) as admin:
                await admin.revoke(revocation.to_wire())  # through B: A hears of it by NOTIFY
            await until("one is cut off at A", lambda: one.state != "connected", 5)
            await until("B forgets where one was", lambda: key(world, 1) not in b.cluster.where, 5)
            one.link(key(world, 2)).send(b"\x04from a revoked member")
            two.link(key(world, 1)).send(b"\x04to a revoked member")
            await until("B dropped the frame to one", lambda: b.relay.drops["destination not connected"] == 1)
            assert two_sink.received == [] and one_sink.received == []
            assert a.relay.relayed_frames == 0 and b.relay.relayed_frames == 0

    scenario(run())


def test_members_of_one_coordinator_are_withdrawn_when_it_stops(postgres_server: Any, tmp_path: Path,
                                                               world: World) -> None:
    db = postgres_database(postgres_server, tmp_path)

    async def run() -> None:
        async with mesh(db, world, {1: 0, 2: 1}) as (sides, _):
            a, b = sides
            await b.cluster._stop()  # what B's cleanup does
            await until("A forgets B's members", lambda: key(world, 2) not in a.cluster.where)
            assert b.cluster.id not in a.cluster._links
        assert db.query("SELECT count(*) FROM relay_presence") == [(0,)]

    scenario(run())


def test_a_coordinator_that_cannot_prove_the_secret_gets_no_frames(tmp_path: Path) -> None:
    """Mutual: the connecting side checks the answer too; an impostor at a coordinator's
    URL (it takes the link and answers with a made-up proof) carries nothing."""

    async def impostor(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.send_str(json.dumps({"cluster": 1, "coordinator": "b", "challenge": base64.b64encode(
            os.urandom(32)).decode()}))
        await ws.receive()
        await ws.send_str(json.dumps({"proof": base64.b64encode(os.urandom(32)).decode()}))
        await ws.receive()
        return ws

    async def run() -> None:
        app = web.Application()
        app.router.add_get(CLUSTER_PATH, impostor)
        runner = web.AppRunner(app)
        await runner.setup()
        listening = socket.socket()
        listening.bind(("127.0.0.1", 0))
        await web.SockSite(runner, listening).start()
        store = await open_store(tmp_path / "coordinator.db")
        try:
            cluster = Cluster(store, "http://127.0.0.1:1")
            cluster.secret = os.urandom(32)
            cluster._heard(base64.b64encode(bytes(32)).decode(), "b", f"http://127.0.0.1:{listening.getsockname()[1]}")
            link = cluster._links["b"]
            await until("the link is refused", lambda: "did not prove" in (link.error or ""))
            assert link.queue is None and cluster.forward(bytes(32), bytes(32) + b"\x04x") == "cluster link down"
            assert link.task is not None
            link.task.cancel()
            await asyncio.gather(link.task, return_exceptions=True)
        finally:
            await store.close()
            await runner.cleanup()

    scenario(run())


def test_presence_rows_move_with_the_member_and_the_secret_is_made_once(database: Database) -> None:
    """The store's side on both backends: a coordinator deletes only its own row; every
    change is announced (SQLite: to this process alone); one secret, however often asked."""

    async def run() -> None:
        store = await open_store(database.url)
        heard: list[tuple[str, str, str | None]] = []
        store.add_presence_listener(lambda *announced: heard.append(announced))
        try:
            await store.set_relay_presence("k1", "a", "http://192.0.2.1:7400", 1)
            await store.set_relay_presence("k1", "b", "http://192.0.2.2:7400", 2)  # moved to b
            await store.set_relay_presence("k1", "a", None, 3)  # a's late goodbye leaves b's row
            await store.set_relay_presence("k2", "a", "http://192.0.2.1:7400", 4)
            assert sorted(await store.relay_presence()) == [("k1", "b", "http://192.0.2.2:7400"),
                                                            ("k2", "a", "http://192.0.2.1:7400")]
            await store.drop_relay_presence("a")
            assert await store.relay_presence() == [("k1", "b", "http://192.0.2.2:7400")]
            await until("every announcement is heard", lambda: len(heard) == 5)
            assert heard == [("k1", "a", "http://192.0.2.1:7400"), ("k1", "b", "http://192.0.2.2:7400"),
                             ("k1", "a", None), ("k2", "a", "http://192.0.2.1:7400"), ("*", "a", None)]
            secret = await store.cluster_secret()
            assert len(secret) == 32 and await store.cluster_secret() == secret
        finally:
            await store.close()

    scenario(run())


@pytest.mark.parametrize("given", [True, False], ids=["cluster-url", "loopback-listen-only"])
def test_tunnelmesh_coordinator_on_postgresql_serves_the_cluster_link_and_says_where_it_is_reached(
        postgres_server: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture, given: bool) -> None:
    """`tunnelmesh coordinator --db postgresql://... --listen 127.0.0.1:PORT --plain-http`: the
    link's greeting at its address; with --cluster-url the log says it is reached there,
    without one it says (a warning) that a loopback --listen gives the others no URL."""
    db = postgres_database(postgres_server, tmp_path)
    caplog.set_level(logging.INFO, LOG)
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()  # free for the coordinator to take

    async def run() -> None:
        url = f"http://127.0.0.1:{port}"
        serving = asyncio.create_task(run_standalone(f"127.0.0.1:{port}", db.url, None, plain_http=True,
                                                     stun=(False, None), cluster_url=url if given else None))
        said = f"reach it at {url}" if given else "no --cluster-url, and --listen gives none"
        try:
            await until("it says where the others reach it", lambda: said in caplog.text or serving.done(), 10)
            assert said in caplog.text, caplog.text
            assert given or any(r.levelno == logging.WARNING and said in r.getMessage() for r in caplog.records)
            async with aiohttp.ClientSession() as http, http.ws_connect(f"ws://127.0.0.1:{port}{CLUSTER_PATH}") as ws:
                hello = json.loads((await ws.receive()).data)
            assert hello["cluster"] == 1 and len(base64.b64decode(hello["challenge"])) == 32
        finally:
            serving.cancel()
            await asyncio.gather(serving, return_exceptions=True)

    scenario(run())


def test_links_over_tls_check_the_certificate_the_coordinators_serve(
        postgres_server: Any, tmp_path: Path, world: World) -> None:
    """Over https the link is pinned to the one certificate every coordinator serves: it
    carries frames; a coordinator serving another certificate gets no link."""
    db = postgres_database(postgres_server, tmp_path)
    certificates = [Certificate(tmp_path / f"{n}.pem", tmp_path / f"{n}.key", write_certificate(
        tmp_path / f"{n}.pem", tmp_path / f"{n}.key", "127.0.0.1")) for n in ("ours", "other")]

    async def run() -> None:
        async with mesh(db, world, {1: 0, 2: 1}, certificates[0]) as (sides, clients):
            (one, _, _), (_, two_sink, _) = clients[1], clients[2]
            assert all((side.cluster.url or "").startswith("https://") for side in sides)
            one.link(key(world, 2)).send(b"\x04over TLS")
            await until("two got it", lambda: two_sink.received == [(key(world, 1), b"\x04over TLS")])
            async with AsyncExitStack() as stack:  # a third coordinator serving (so pinning) another certificate
                third = await stack.enter_async_context(coordinator(stack, db, certificates[1]))
                link = third.cluster._link_to(sides[1].cluster.id, sides[1].cluster.url or "")
                assert link is not None
                await until("its link is refused", lambda: "another TLS certificate" in (link.error or ""))
                assert link.queue is None

    scenario(run())


def test_no_default_cluster_url_from_a_loopback_or_wildcard_listen_address() -> None:
    """Two hosts each listening on 127.0.0.1:7400 behind a local TLS proxy would share a
    derived URL: only an address the others can reach gives one."""
    for host in ("127.0.0.1", "127.0.1.1", "::1", "[::1]", "localhost", "c1.localhost", "0.0.0.0", "::", ""):
        assert default_cluster_url(host, 7400, True) is None, host
    assert default_cluster_url("10.0.0.11", 0, True) is None
    assert default_cluster_url("10.0.0.11", 7400, True) == "https://10.0.0.11:7400"
    assert default_cluster_url("2001:db8::1", 7400, False) == "http://[2001:db8::1]:7400"
    assert default_cluster_url("c1.example", 7400, True) == "https://c1.example:7400"


def test_two_coordinators_given_one_url_keep_each_others_presence(postgres_server: Any, tmp_path: Path,
                                                                  world: World) -> None:
    """A coordinator starting at a URL another one holds rows at does not take them for a
    crashed predecessor's: the other is alive, its members stay reachable."""
    db = postgres_database(postgres_server, tmp_path)

    async def run() -> None:
        async with mesh(db, world, {1: 0, 2: 1}) as (sides, _), AsyncExitStack() as stack:
            a, b = sides
            third = await stack.enter_async_context(coordinator(stack, db, same_url_as=a))  # started: it loaded
            assert third.cluster.url == a.cluster.url and third.cluster.where[key(world, 1)][0] == a.cluster.id
            assert sorted(db.query("SELECT coordinator FROM relay_presence")) == sorted(
                [(a.cluster.id,), (b.cluster.id,)])
            assert b.knows(1, world, a)

    scenario(run())


def test_a_crashed_coordinators_presence_is_dropped_once_its_heartbeat_is_stale(
        postgres_server: Any, tmp_path: Path, world: World) -> None:
    """A coordinator that touches its rows stays however old they are; one that stopped
    touching them (crashed, at any URL) loses them to whoever refreshes next."""
    db = postgres_database(postgres_server, tmp_path)

    async def run() -> None:
        async with mesh(db, world, {1: 0, 2: 1}) as (sides, _):
            a, b = sides
            crashed = base64.b64encode(key(world, 3)).decode()
            long_ago = int(now()) - int(STALE_AFTER) - 60
            await a.cluster.store.set_relay_presence(crashed, "crashed", "http://127.0.0.1:1", long_ago)
            db.execute("UPDATE relay_presence SET since = ? WHERE coordinator = ?", long_ago, b.cluster.id)
            await b.cluster._check_presence()  # B beats: alive, its rows old
            await a.cluster._check_presence()
            assert sorted(db.query("SELECT coordinator FROM relay_presence")) == sorted(
                [(a.cluster.id,), (b.cluster.id,)])
            await until("B forgets the crashed coordinator's member", lambda: key(world, 3) not in b.cluster.where)
            assert b.knows(1, world, a) and a.knows(2, world, b) and "crashed" not in a.cluster._links

    scenario(run())


def test_presence_heartbeat_and_stale_drop_in_the_store(database: Database) -> None:
    """Both backends: a touch stamps one of the coordinator's rows; a coordinator whose
    newest row is older than the cut-off loses all of them, announced; the others keep theirs."""

    async def run() -> None:
        store = await open_store(database.url)
        heard: list[tuple[str, str, str | None]] = []
        store.add_presence_listener(lambda *announced: heard.append(announced))
        try:
            for wg_key, coordinator in (("k1", "a"), ("k2", "a"), ("k3", "b"), ("k4", "b")):
                await store.set_relay_presence(wg_key, coordinator, f"http://{coordinator}.example:7400", 100)
            await store.touch_relay_presence("b", 300)
            await store.touch_relay_presence("nobody", 300)  # holds no row: nothing
            assert await store.drop_stale_relay_presence(200) == ["a"]
            assert sorted(row[0] for row in await store.relay_presence()) == ["k3", "k4"]
            assert heard[-1] == ("*", "a", None)
            assert await store.drop_stale_relay_presence(200) == []
        finally:
            await store.close()

    scenario(run())


def test_a_failed_presence_write_is_retried(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The database out of reach for two writes: the member's row is written once it answers."""
    monkeypatch.setattr(cluster_module, "FIRST_RETRY", 0.01)

    async def run() -> None:
        store = await open_store(tmp_path / "coordinator.db")
        write = store.set_relay_presence
        failures = [StoreError("the database server cannot be reached")] * 2

        async def flaky(*args: Any) -> None:
            if failures:
                raise failures.pop()
            await write(*args)

        monkeypatch.setattr(store, "set_relay_presence", flaky)
        cluster = Cluster(store, "http://127.0.0.1:1")
        writer = asyncio.create_task(cluster._write_presence())
        try:
            cluster.present(bytes(32), True)
            await until("the row is written", lambda: failures == [] and not cluster._dirty and
                        not cluster._store_failing)
            assert await store.relay_presence() == [(base64.b64encode(bytes(32)).decode(), cluster.id,
                                                     "http://127.0.0.1:1")]
        finally:
            writer.cancel()
            await asyncio.gather(writer, return_exceptions=True)
            await store.close()

    scenario(run())


def test_a_refresh_records_again_a_member_here_whose_row_went_missing(postgres_server: Any, tmp_path: Path,
                                                                      world: World) -> None:
    """A member connected to A whose row is gone (its write lost, or dropped while A could
    not reach the database) is reachable from B again after A's next refresh."""
    db = postgres_database(postgres_server, tmp_path)

    async def run() -> None:
        async with mesh(db, world, {1: 0, 2: 1}) as (sides, clients):
            a, b = sides
            (_, one_sink, _), (two, _, _) = clients[1], clients[2]
            db.execute("DELETE FROM relay_presence WHERE coordinator = ?", a.cluster.id)
            await b.cluster._load()
            assert key(world, 1) not in b.cluster.where
            await a.cluster._check_presence()
            await until("B knows where one is again", lambda: b.knows(1, world, a))
            two.link(key(world, 1)).send(b"\x04two to one, after")
            await until("one got it", lambda: one_sink.received == [(key(world, 2), b"\x04two to one, after")])

    scenario(run())
