"""The coordinator's metrics (tunnelmesh/coordinator/metrics.py) over a real coordinator on
127.0.0.1: members, nodes connected (a map request within MAX_WAIT + CONNECTED_GRACE, on
the coordinator's monotonic clock, stepped here), and what its relay passed on, scraped
over HTTP from the metrics endpoint and read with the Prometheus text parser."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp

from tests.coordinator.test_relay import Sink, scenario
from tests.support.coordinator import UNLIMITED, AdminMachine, World, join, set_up
from tests.support.databases import Database
from tests.support.wait import until
from tests.unit.test_metrics_exposition import Samples, samples
from tunnelmesh.coordinator.client import Coordinator
from tunnelmesh.coordinator.metrics import coordinator_source
from tunnelmesh.coordinator.app import make_app, serve
from tunnelmesh.coordinator.service import CONNECTED_GRACE, MAX_WAIT
from tunnelmesh.coordinator.store import open_store
from tunnelmesh.links.relay import RelayClient
from tunnelmesh.metrics import serve_metrics
from tunnelmesh.ratelimit import RateLimiter


def test_members_connected_nodes_and_relayed_traffic(database: Database, tmp_path: Path) -> None:
    world = World.create()
    clock = [1000.0]  # the coordinator's monotonic clock

    async def run() -> None:
        store = await open_store(database.url)
        app = make_app(store, limiter=RateLimiter(UNLIMITED, UNLIMITED), monotonic=lambda: clock[0])
        runner = await serve(app, "127.0.0.1", 0)
        metrics = await serve_metrics(coordinator_source(app), ("127.0.0.1", 0))
        url = "http://{}:{}".format(*runner.addresses[0][:2])
        metrics_url = "http://{}:{}/metrics".format(*metrics.addresses[0][:2])
        tasks: list[asyncio.Task[None]] = []
        try:
            async with aiohttp.ClientSession() as http:
                async def scrape() -> Samples:
                    async with http.get(metrics_url) as response:
                        assert response.status == 200
                        return samples(await response.text())[0]

                admin_node = await set_up(url, world)
                machine = AdminMachine.create(tmp_path / "admin", url, world, admin_node)
                async with machine.admitting():
                    await join(url, world, 1, world.invite(), "one")
                    await join(url, world, 2, world.invite(), "two")
                first = await scrape()
                assert first[("tunnelmesh_coordinator_members", ())] == 3
                assert first[("tunnelmesh_coordinator_nodes_connected", ())] == 0  # nobody asked for the map yet
                assert ("tunnelmesh_coordinator_relay_relayed_frames_total", ()) not in first  # no relay before its first use

                for i in (1, 2):
                    async with Coordinator(url, identity=world.nodes[i]) as node:
                        await node.map(0, 0)
                    clock[0] += 10.0
                assert (await scrape())[("tunnelmesh_coordinator_nodes_connected", ())] == 2
                clock[0] += MAX_WAIT + CONNECTED_GRACE - 10.0  # one's request is now too old, two's just not
                assert (await scrape())[("tunnelmesh_coordinator_nodes_connected", ())] == 1

                sinks = [Sink(), Sink()]
                clients = [RelayClient(url, world.nodes[i], world.network.network, sinks[i - 1]) for i in (1, 2)]
                tasks += [asyncio.create_task(c.run()) for c in clients]
                await until("both connected to the relay", lambda: all(c.state == "connected" for c in clients))
                to_two = clients[0].link(world.nodes[2].public.wg_public_key)
                for size in (10, 100, 1000):
                    to_two.send(b"\x04" + bytes(size - 1))
                await until("two got three", lambda: len(sinks[1].received) == 3)
                relayed = await scrape()
                assert relayed[("tunnelmesh_coordinator_relay_connections", ())] == 2
                assert relayed[("tunnelmesh_coordinator_relay_relayed_frames_total", ())] == 3
                assert relayed[("tunnelmesh_coordinator_relay_relayed_bytes_total", ())] == 1110
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await metrics.cleanup()
            await runner.cleanup()
            await store.close()

    scenario(run())
