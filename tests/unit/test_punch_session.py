"""Hole punching in the session actor (actors/session.py), in virtual time over the in-memory
network of tests/support/memnet.py, as tests/unit/test_session_ladder.py drives it: when a
session asks the coordinator for a punch, what it sends when told, and that a pair on the
relay probes for UDP without redoing its handshake there every probe interval."""

from __future__ import annotations

from collections.abc import Callable

from actors.coordinator_client import PERSISTENT_KEEPALIVE
from actors.messages import Punch, SetCandidates, to_json
from tests.unit.test_session_ladder import Pair, _connected, in_virtual_time
from tests.support.wire import A_ADDR, B_ADDR
from tunnelmesh.config import RungChoice
from tunnelmesh.ladder import BETTER_PROBE, HOLD, RELAY, SSH, UDP
from tunnelmesh.nat.report import ADDRESS_AND_PORT_DEPENDENT, ENDPOINT_INDEPENDENT, NatReport, PeerNat
from tunnelmesh.punch import BLOCK, SCHEDULE, SPRAY_LIMIT, SWEEP_SECONDS
from tunnelmesh.wireguard.constants import REKEY_TIMEOUT

INIT = 1
ALL = RungChoice()
HARD_HOST = "203.0.113.9"  # a peer's reflexive address behind a "hard" NAT: nothing answers there


def on_the_relay(body: Callable[[Pair, list[tuple[str, float]]], object]) -> None:
    """a and b with UDP and SSH cut, on the relay; each session's punch requests are
    recorded as (who, when); b knows a's UDP address too (the coordinator's candidates)."""
    async def scenario(p: Pair) -> None:
        asked: list[tuple[str, float]] = []
        p.a.mesh.punch_requester = lambda key: asked.append(("a", p.net.clock.now))
        p.b.mesh.punch_requester = lambda key: asked.append(("b", p.net.clock.now))
        await p.sb.handle(SetCandidates(p.a.device.static_public, (A_ADDR,)))
        for session in (p.sa, p.sb):  # as the coordinator client's peers have: the core's timer runs
            session.peer.persistent_keepalive = PERSISTENT_KEEPALIVE
        await p.net.run_until(lambda: p.sa.selector.ladder.current == RELAY == p.sb.selector.ladder.current, 30.0,
                              "a and b on the relay")
        await body(p, asked)  # type: ignore[misc]

    in_virtual_time(lambda net: _connected(net, ALL, ALL, (UDP, SSH), scenario))


def test_a_pair_on_the_relay_asks_for_a_punch_each_probe_interval_and_keeps_its_handshake() -> None:
    async def body(p: Pair, asked: list[tuple[str, float]]) -> None:
        await p.net.run_for(HOLD)  # the search's last handshakes settle
        began, handshakes = p.net.clock.now, (p.sa.handshakes, p.sb.handshakes)
        await p.net.run_for(3 * BETTER_PROBE + 1)
        # Three return probes each, each asking for a punch, never faster than the interval.
        for side in ("a", "b"):
            times = [at for who, at in asked if who == side and at >= began]
            assert len(times) == 3, asked
            assert all(b - a >= BETTER_PROBE for a, b in zip(times, times[1:])), times
        # The probes went out on UDP (and were lost there) ...
        assert len({s.at for s in p.net.sent(src="a", rung=UDP, kind=INIT, since=began)}) >= 3
        # ... and not one ended in a handshake on the relay: the core did not retry them there.
        assert (p.sa.handshakes, p.sb.handshakes) == handshakes, ((p.sa.handshakes, p.sb.handshakes), handshakes)
        assert p.net.sent(src="a", rung=RELAY, kind=INIT, since=began) == []

    on_the_relay(body)


def test_told_to_punch_both_send_on_the_schedule_and_step_down_to_udp() -> None:
    async def body(p: Pair, asked: list[tuple[str, float]]) -> None:
        await p.net.run_for(HOLD)
        p.net.unblock(UDP)
        p.sa.own_nat = lambda: NatReport(checked_at=1.0, mapping=ENDPOINT_INDEPENDENT)
        p.sa.peer_nat = PeerNat(ADDRESS_AND_PORT_DEPENDENT, ADDRESS_AND_PORT_DEPENDENT, ((HARD_HOST, 20_500),))
        told = p.net.clock.now
        await p.sa.handle(Punch(p.b.device.static_public))
        await p.sb.handle(Punch(p.a.device.static_public))
        await p.net.run_until(lambda: p.sa.selector.ladder.current == UDP == p.sb.selector.ladder.current, 5.0,
                              "a and b on UDP after the punch")
        assert p.sa.peer.endpoint == B_ADDR and p.sb.peer.endpoint == A_ADDR
        # a sprayed a's "hard" NAT's ports until the handshake on UDP, and not after it.
        direct = p.net.clock.now
        await p.net.run_for(2.0)
        sprayed = [s.at for s in p.net.sent(src="a", rung=UDP, kind=INIT, since=told) if s.to and s.to[0] == HARD_HOST]
        assert sprayed and max(sprayed) <= direct, (len(sprayed), direct)
        assert p.sa.selector.transitions[-1].why == "step down after a probe"
        # The first initiations crossed; whichever was answered, both went out at once.
        assert {s.src for s in p.net.sent(rung=UDP, kind=INIT, since=told) if s.at - told < 0.05} == {"a", "b"}
        assert to_json(p.sa.status())["why_not_better"] is None

    on_the_relay(body)


def test_a_punch_nobody_answers_is_told_in_status_and_a_hard_peer_gets_a_bounded_spray() -> None:
    async def body(p: Pair, asked: list[tuple[str, float]]) -> None:
        p.sa.own_nat = lambda: NatReport(checked_at=1.0, mapping=ENDPOINT_INDEPENDENT)
        p.sa.peer_nat = PeerNat(ADDRESS_AND_PORT_DEPENDENT, ADDRESS_AND_PORT_DEPENDENT, (("203.0.113.9", 20_500),))
        told = p.net.clock.now
        await p.sa.handle(Punch(p.b.device.static_public))
        await p.net.run_for(REKEY_TIMEOUT + SWEEP_SECONDS + 1)
        sent = p.net.sent(src="a", rung=UDP, kind=INIT, since=told)
        sprayed = [s.to for s in sent if s.to is not None and s.to[0] == "203.0.113.9"]
        # The first punch sweeps: the block around the reflexive port first, then the whole range, once.
        assert len(sprayed) == SPRAY_LIMIT - 1 == len(set(sprayed))
        assert all(20_480 <= port < 20_480 + BLOCK for _, port in sprayed[:BLOCK - 1])
        spray_times = [s.at for s in sent if s.to is not None and s.to[0] == "203.0.113.9"]
        assert spray_times[-1] - spray_times[0] >= 30.0  # about 2000 a second, not one burst
        # Every step of the schedule, anchored at the notice, to the candidate; from when
        # WireGuard's rate limit let an initiation go (the session came up on the relay a
        # moment ago): the steps that fell before, once then. (A ladder probe may come first.)
        steps = [round(s.at - told, 3) for s in sent if s.to == B_ADDR and s.at <= told + SCHEDULE[-1] + 1e-6]
        began = next(i for i in range(len(steps)) if steps[i:] == sorted({max(steps[i], t) for t in SCHEDULE}))
        assert steps[began] <= REKEY_TIMEOUT, steps
        why = to_json(p.sa.status())["why_not_better"]
        assert "punched once, no answer" in why, why
        p.sa.own_nat = lambda: NatReport(checked_at=1.0, mapping=ADDRESS_AND_PORT_DEPENDENT)
        assert "no answer: both behind NATs that map per destination" in to_json(p.sa.status())["why_not_better"]

    on_the_relay(body)
