"""The per-peer counters of `status` (rtt_ms, rx/tx packets, handshakes, UDP candidates, drops), filled by two
whole daemons in virtual time on a UDP path with a known delay: the round trip each
side reports is the one the network gives, and the counters move with the traffic."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from actors.messages import to_json
from tests.unit.test_two_nodes_in_process import Pair, Scenario, two_daemons, up_on_udp

__all__ = ["two_daemons"]  # the fixture, used by name

ONE_WAY = 0.05  # seconds each UDP datagram takes


def test_the_round_trip_and_the_counters_follow_the_network_and_the_traffic(
        two_daemons: Callable[[Scenario], None]) -> None:
    async def body(p: Pair) -> None:
        p.net.udp_delay = ONE_WAY  # before a's first initiation: a starts half a second after b
        await up_on_udp(p)

        async def peer_of(node: Any) -> dict[str, Any]:
            (seen,) = (await p.status(node))["peers"]
            return seen  # type: ignore[no-any-return]

        a_sees, b_sees = await peer_of(p.a), await peer_of(p.b)
        assert a_sees["rtt_ms"] == pytest.approx(2 * ONE_WAY * 1000)  # a initiated: its handshake is timed
        assert b_sees["rtt_ms"] is None  # b only answered: nothing measured yet
        assert a_sees["handshakes"] == b_sees["handshakes"] == 1
        assert a_sees["tx_packets"] >= 1 and b_sees["rx_packets"] == a_sees["tx_packets"]  # the confirmation
        for seen in (a_sees, b_sees):  # the address that works leads the UDP candidates
            assert seen["path"]["endpoint"] == f"udp {seen['candidates'][0]}", seen

        assert await p.pings_answered(p.a, p.b, count=5) == 5
        a_after, b_after = await peer_of(p.a), await peer_of(p.b)
        assert a_after["tx_packets"] - a_sees["tx_packets"] >= 5 and a_after["rx_packets"] - a_sees["rx_packets"] >= 5
        assert b_after["rx_packets"] == a_after["tx_packets"] and b_after["tx_packets"] == a_after["rx_packets"]
        assert a_after["tx_bytes"] > a_sees["tx_bytes"] and b_after["rx_bytes"] == a_after["tx_bytes"]

        pong = to_json(await p.net.complete(p.b.api.ping({"peer": "a", "wait": 2}), 3.0, "b's ping of a"))
        assert pong["ok"], pong
        assert (await peer_of(p.b))["rtt_ms"] == pong["rtt_ms"] == pytest.approx(2 * ONE_WAY * 1000)

        assert b_after["drops"] == {}  # nothing b took was dropped
        p.net.hold_next = ("a", "b")  # a's next datagram to b is kept back, then arrives twice
        p.a.ping(p.b, p.seq)
        p.seq += 1
        await p.net.run_until(lambda: bool(p.net.held), 2.0, "a datagram from a held")
        ((target, datagram, source),) = p.net.held
        target.arrive(datagram, source)
        p.net.release_held()  # the same one again: its counter is already taken
        await p.net.run_for(ONE_WAY)
        assert (await peer_of(p.b))["drops"] == {"replayed counter": 1}
        assert (await p.status(p.b))["drops"]["replayed counter"] == 1  # and node-wide

    two_daemons(body)
