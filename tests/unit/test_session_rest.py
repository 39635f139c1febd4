"""A session's timers and ladder ticks when traffic stops and starts (actors/session.py),
on the in-memory network in virtual time: an idle pair on the best rung stops ticking and
traffic wakes it, a session on a worse rung keeps probing, data that comes in arms the
passive keepalive at once, and a flow of packets does not re-arm the timer per batch."""

from __future__ import annotations

from tests.support.memnet import Node
from tests.unit.test_session_ladder import ALL, Pair, Pinger, _connected, in_virtual_time, up_on_udp
from tunnelmesh.config import UDP_ONLY, RungChoice
from tunnelmesh.ladder import FAILING_AFTER, FRESH, SSH, UDP
from tunnelmesh.packets import icmp_echo
from tunnelmesh.wireguard.constants import KEEPALIVE_TIMEOUT

#: Long enough for any probe, answer or stray packet of the set-up to stop mattering.
SETTLE = 2 * FRESH + FAILING_AFTER


def simulate(body, *, blocked: tuple[str, ...] = (), choice: RungChoice = ALL, rungs: bool = True,  # type: ignore[no-untyped-def]
             plain_wireguard: bool = False) -> None:
    in_virtual_time(lambda net: _connected(net, choice, choice, blocked, body, rungs=rungs,
                                           plain_wireguard=plain_wireguard))


def one_way(sender: Node, receiver: Node, seq: int) -> None:
    """A packet the receiver's "kernel" does not answer (an echo reply nobody asked for)."""
    sender.app.send(icmp_echo(sender.mesh_ip, receiver.mesh_ip, 7, seq, b"one way", reply=True))


def test_an_idle_pair_on_udp_stops_ticking_and_traffic_wakes_it() -> None:
    async def body(p: Pair) -> None:
        await up_on_udp(p)
        await p.net.run_for(SETTLE)
        assert not p.sa._ticking and not p.sb._ticking
        assert p.a.mesh.ticker._handle is None and p.b.mesh.ticker._handle is None  # nothing wakes them each second
        pinger = Pinger(p.net, p.a, p.b)
        await p.net.run_for(0.1)
        assert p.sa._ticking and p.sb._ticking  # both saw the traffic
        await p.net.run_for(5.0)
        assert p.sa._ticking and pinger.answered_since(0) >= 10
        pinger.stop()
        await p.net.run_for(SETTLE)
        assert not p.sa._ticking and not p.sb._ticking

    simulate(body)


def test_udp_cut_while_the_pair_rested_is_left_for_ssh_once_traffic_flows() -> None:
    async def body(p: Pair) -> None:
        await up_on_udp(p)
        await p.net.run_for(SETTLE)
        assert not p.sa._ticking
        p.net.block(UDP)
        pinger = Pinger(p.net, p.a, p.b)
        began = p.net.clock.now
        took = await p.net.run_until(lambda: p.sa.selector.ladder.current == SSH, 15.0, "a on SSH after UDP was cut")
        assert took <= 15.0
        await p.net.run_until(lambda: pinger.answered_since(began + took) > 0, 10.0, "pings answered over SSH")
        pinger.stop()

    simulate(body)


def test_a_session_on_a_worse_rung_keeps_ticking_to_probe_the_better_one() -> None:
    async def body(p: Pair) -> None:
        await p.net.run_until(lambda: p.sa.selector.ladder.current == SSH, 20.0, "a on SSH with UDP blocked")
        probes_before = len(p.net.sent(src="a", rung=UDP, kind=1))
        await p.net.run_for(3 * SETTLE)  # no traffic at all
        assert p.sa._ticking
        assert len(p.net.sent(src="a", rung=UDP, kind=1)) > probes_before  # UDP is still asked for
        p.net.unblock(UDP)
        await p.net.run_until(lambda: p.sa.selector.ladder.current == UDP, 120.0, "a back on UDP")

    simulate(body, blocked=(UDP,))


def test_data_coming_in_arms_the_passive_keepalive_at_once() -> None:
    """b gets data it sends nothing back for: the keepalive that tells a its packets arrive
    leaves on time (the armed timer was minutes away: only the data path saw the packet)."""
    async def body(p: Pair) -> None:
        await up_on_udp(p)
        await p.net.run_for(SETTLE)
        keepalive = p.sb.peer.keepalive_timeout
        for seq in range(1, 21):  # 10 s of data one way
            one_way(p.a, p.b, seq)
            sent = p.net.clock.now
            await p.net.run_for(0.5)
            if seq == 1:
                assert p.sb._armed_at is not None and p.sb._armed_at <= sent + keepalive + 0.01
        answers = [s.at for s in p.net.sent(src="b", kind=4) if s.at >= sent - 10]
        assert answers, "b never confirmed a's one-way data"
        assert p.sa.selector.ladder.changes == 0 and not p.sa.selector.ladder.searching  # a never thought UDP failed

    simulate(body)


def _one_way_for(seconds: float):  # type: ignore[no-untyped-def]
    """A scenario: a sends b data one way for `seconds`; a's session must neither handshake
    again nor move (the keepalive that tells a its packets arrive must come in time)."""
    async def body(p: Pair) -> None:
        await up_on_udp(p)
        await p.net.run_for(SETTLE)
        handshakes = p.sa.handshakes
        for seq in range(1, int(seconds / 0.5) + 1):
            one_way(p.a, p.b, seq)
            await p.net.run_for(0.5)
        assert p.sa.handshakes == handshakes, f"{p.sa.handshakes - handshakes} handshakes during a one-way stream"
        assert p.sa.selector.ladder.changes == 0 and not p.sa.selector.ladder.searching

    return body


def test_a_one_way_stream_keeps_its_session_with_udp_alone() -> None:
    """Without SSH and relay rungs too: the same 3 s check picks between a peer's UDP
    addresses, and b's keepalive comes within 1 s."""
    simulate(_one_way_for(20.0), choice=UDP_ONLY, rungs=False)


def test_a_one_way_stream_to_a_plain_wireguard_peer_keeps_its_session() -> None:
    """b keepalives after WireGuard's 10 s, as a phone or wg-quick does: a's path is judged
    by WireGuard's own 15 s rule, not the 3 s one between daemons."""
    async def check_timers(p: Pair) -> None:
        assert p.sb.peer is not None and p.sb.peer.keepalive_timeout == KEEPALIVE_TIMEOUT
        await body(p)

    body = _one_way_for(20.0)
    simulate(check_timers, choice=UDP_ONLY, plain_wireguard=True)


def test_a_plain_wireguard_peer_that_went_away_is_left_to_wireguards_timers() -> None:
    """b vanishes while a sends: a's path is not failed after 3 s (a plain peer answers after
    10 s); the core's own new handshake goes out 15 s after the first unanswered packet."""
    async def body(p: Pair) -> None:
        await up_on_udp(p)
        await p.net.run_for(SETTLE)
        p.net.block(UDP)
        first = p.net.clock.now
        for seq in range(1, 41):  # 20 s of data a -> b, nothing arrives
            one_way(p.a, p.b, seq)
            await p.net.run_for(0.5)
        initiations = [s.at - first for s in p.net.sent(src="a", kind=1, since=first)]
        assert initiations and 15.0 <= initiations[0] < 16.0, f"a's initiations at {initiations} s"
        assert p.sa.selector.ladder.changes == 0 and not p.sa.selector.ladder.searching

    simulate(body, choice=UDP_ONLY, plain_wireguard=True)


def test_a_flow_of_packets_does_not_re_arm_the_timer_per_packet() -> None:
    async def body(p: Pair) -> None:
        await up_on_udp(p)
        await p.net.run_for(SETTLE)
        loop, armed = p.net.loop, []
        call_at = loop.call_at

        def counted(when, callback, *args, **kwargs):  # type: ignore[no-untyped-def]
            if callback == p.sa._fire:
                armed.append(when)
            return call_at(when, callback, *args, **kwargs)

        loop.call_at = counted  # type: ignore[method-assign]
        pinger = Pinger(p.net, p.a, p.b, interval=0.05)
        await p.net.run_for(5.0)
        pinger.stop()
        assert pinger.answered_since(0) >= 90
        assert 0 < len(armed) <= 10, armed  # about one per keepalive period of the flow, not one per packet

    simulate(body)
