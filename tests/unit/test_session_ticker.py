"""The sessions' shared ladder tick (actors.session.Ticker): a node's peers are ticked
together on one loop timer, so N idle peers wake the daemon once a second, not N times."""

from __future__ import annotations

import ipaddress

import pytest

from actors.messages import PeerSpec, Start
from actors.session import TICK, Ticker
from tests.support.memnet import Net, Node
from tests.support.wire import A_ADDR, A_IP, B_ADDR, B_IP, seeded_rng
from tests.unit.test_session_ladder import in_virtual_time

C_ADDR, C_IP = ("192.0.2.3", 51820), "100.100.0.3"


def test_sessions_subscribed_at_different_times_are_ticked_at_the_same_instants() -> None:
    async def body(net: Net) -> None:
        ticker = Ticker()
        start = net.clock.now
        ticks: dict[str, list[float]] = {"a": [], "b": [], "c": []}
        ticker.subscribe(lambda: ticks["a"].append(net.clock.now))
        await net.run_for(0.3)
        ticker.subscribe(lambda: ticks["b"].append(net.clock.now))
        await net.run_for(0.4)
        ticker.subscribe(lambda: ticks["c"].append(net.clock.now))
        await net.run_for(3.0 * TICK)
        assert [round(t - start, 6) for t in ticks["a"]] == [1.0, 2.0, 3.0]
        assert ticks["b"] == ticks["a"] and ticks["c"] == ticks["a"]  # one timer, not one per subscriber

    in_virtual_time(body)


def test_the_timer_stops_with_the_last_subscriber() -> None:
    async def body(net: Net) -> None:
        ticker = Ticker()
        ticks: list[float] = []

        def tick() -> None:
            ticks.append(net.clock.now)

        ticker.subscribe(tick)
        await net.run_for(1.5 * TICK)
        ticker.unsubscribe(tick)
        ticker.unsubscribe(tick)  # twice: nothing happens
        await net.run_for(5.0 * TICK)
        assert len(ticks) == 1
        assert ticker._handle is None  # nothing left to wake the loop

    in_virtual_time(body)


def test_a_failing_subscriber_costs_the_others_nothing(caplog: pytest.LogCaptureFixture) -> None:
    async def body(net: Net) -> None:
        ticker = Ticker()
        ticks: list[float] = []

        def broken() -> None:
            raise RuntimeError("broken")

        ticker.subscribe(broken)
        ticker.subscribe(lambda: ticks.append(net.clock.now))
        await net.run_for(2.5 * TICK)
        assert len(ticks) == 2

    in_virtual_time(body)
    assert "ladder tick failed" in caplog.text


def test_a_nodes_sessions_share_its_mesh_ticker_while_they_run() -> None:
    async def body(net: Net) -> None:
        rng = seeded_rng(7)
        a = Node(net, "a", rng(32), A_ADDR, A_IP, seed=11)
        others = [Node(net, "b", rng(32), B_ADDR, B_IP, seed=12), Node(net, "c", rng(32), C_ADDR, C_IP, seed=13)]
        sessions = [a.mesh.add(PeerSpec(name=o.name, mesh_ip=o.mesh_ip, fingerprint=None, wg_key=o.device.static_public,
                                        allowed_ips=(ipaddress.IPv4Network(f"{o.mesh_ip}/32"),), endpoint=o.address,
                                        persistent_keepalive=0))
                    for o in others]
        assert all(session.ticker is a.mesh.ticker for session in sessions)
        a.start()
        try:
            for session in sessions:
                await session.handle(Start())
            assert a.mesh.ticker._handle is not None
            for session in sessions:
                await session.stop()
            assert a.mesh.ticker._handle is None  # both unsubscribed: the ladder's timer is gone
        finally:
            for node in (a, *others):
                node.stop()

    in_virtual_time(body)
