"""The packet filter in two whole daemons, in one process and in virtual time (issue 14).

As tests/unit/test_two_nodes_in_process.py (whose header says how), with each daemon
running the filter's actor (actors/filter.py) the way `tunnelmesh up` does, its inputs
(members and network policy) what the coordinator client's snapshot would say, changed
by the test and announced with `SyncFilter` as the map-changed hook does. The tests
reach the daemons as users do: packets written by the application behind one TUN and
what arrives behind the other, the control commands, and `status`.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from actors.filter import DENIED_LOG_EVERY, FilterInputs
from actors.messages import FilterRules, FilterVerdict, PeerSpec, Status, SyncFilter, from_json, to_json
from actors.runtime import Leftovers
from tests.support.ippackets import ACK, SYN, tcp4, tcp6, udp4
from tests.support.membership import identities
from tests.support.memnet import Daemon, Net, VirtualClock, VirtualLoop
from tests.support.wire import A_ADDR, A_IP, B_ADDR, B_IP
from tunnelmesh.filter import Member, parse_node_rules_text
from tunnelmesh.identity import NodeIdentity

A_IP6, B_IP6 = "fd00:7e57::1", "fd00:7e57::2"
ROUTE = "10.9.0.0/16"  # a route a advertises (in the spoofing test)
C_IP = "10.9.0.7"  # member c's mesh address, inside a's route
C_KEY = bytes(range(32))
SSH_ONLY_FROM_A = '[[allow]]\nfrom = "a"\nto = "b"\nproto = "tcp"\nports = [22]\n'


@dataclass
class Record:
    """The network policy record (as tunnelmesh.membership's PolicyRecord: version, text)."""

    version: int
    text: str


@dataclass
class Inputs:
    """What the coordinator client's latest snapshot says: the members and the policy."""

    members: tuple[Member, ...]
    policy: Record | None = None

    def __call__(self) -> FilterInputs:
        return FilterInputs(self.members, self.policy)


@dataclass
class Pair:
    net: Net
    a: Daemon
    b: Daemon
    inputs: dict[str, Inputs] = field(default_factory=dict)

    async def status(self, node: Daemon) -> dict[str, Any]:
        reply = await self.net.complete(node.api.status({}), 2.0, f"{node.name}'s status")
        assert from_json(Status, to_json(reply)) == reply  # what the socket sends reads back the same
        return to_json(reply)  # type: ignore[no-any-return]

    async def control(self, node: Daemon, command: str, **fields: Any) -> Any:
        return await self.net.complete(node.api.handlers()[command](fields), 2.0, f"{node.name}: {command}")

    async def set_policy(self, node: Daemon, version: int, text: str) -> None:
        """A new verified policy in `node`'s map, and the map-changed hook's message."""
        assert node.node.filter is not None
        self.inputs[node.name].policy = Record(version, text)
        node.node.filter.tell_latest(SyncFilter, SyncFilter())
        await self.net.run_for(0.1)

    async def deliver(self, src: Daemon, dst: Daemon, packet: bytes | bytearray) -> bool:
        """Write `packet` into `src`'s TUN; whether it came out of `dst`'s."""
        before = len(dst.arrived)
        src.app.send(bytes(packet))
        await self.net.run_for(0.2)
        return bytes(packet) in dst.arrived[before:]


def spec(name: str, identity: NodeIdentity, ips: tuple[str, ...], endpoint: tuple[str, int] | None) -> PeerSpec:
    return PeerSpec(name=name, mesh_ip=ipaddress.IPv4Address(ips[0]), fingerprint=identity.fingerprint,
                    wg_key=identity.public.wg_public_key, allowed_ips=tuple(ipaddress.ip_network(ip) for ip in ips),
                    endpoint=endpoint, persistent_keepalive=0, candidates=(endpoint,) if endpoint else ())


def member(name: str, identity: NodeIdentity, ipv4: str, ipv6: str | None, routes: tuple[str, ...] = ()) -> Member:
    return Member(name, identity.public.wg_public_key, ipaddress.IPv4Address(ipv4),
                  ipaddress.IPv6Address(ipv6) if ipv6 else None, tuple(ipaddress.ip_network(r) for r in routes))


Scenario = Callable[[Pair], Awaitable[None]]


@pytest.fixture
def filtered_pair() -> Iterator[Callable[..., None]]:
    """Run a scenario on two daemons with IPv4 and IPv6 mesh addresses, each with a filter
    (`a_filter=False`: a runs none, as a node of a network from before the filter would)
    whose policy starts as `policy` (None: none set); `a_routes`: routes a advertises."""
    a_id, b_id = identities()[:2]

    def run(body: Scenario, *, policy: str | None, a_filter: bool = True, a_routes: tuple[str, ...] = (),
            b_node_rules: str | None = None) -> None:
        clock = VirtualClock()
        with asyncio.Runner(loop_factory=lambda: VirtualLoop(clock)) as runner:
            loop = runner.get_loop()
            assert isinstance(loop, VirtualLoop)
            runner.run(_run(Net(clock, loop), a_id, b_id, body, policy, a_filter, a_routes, b_node_rules))

    yield run


async def _run(net: Net, a_id: NodeIdentity, b_id: NodeIdentity, body: Scenario, policy: str | None, a_filter: bool,
               a_routes: tuple[str, ...], b_node_rules: str | None) -> None:
    leftovers = Leftovers()
    record = Record(1, policy) if policy is not None else None
    members = (member("a", a_id, A_IP, A_IP6, a_routes), member("b", b_id, B_IP, B_IP6),
               Member("c", C_KEY, ipaddress.IPv4Address(C_IP), None))
    inputs = {"a": Inputs(members, record), "b": Inputs(members, record)}
    a = Daemon(net, "a", a_id, A_ADDR, A_IP, [spec("b", b_id, (B_IP, B_IP6), B_ADDR)], seed=11, mesh_ipv6=A_IP6,
               filter_inputs=inputs["a"] if a_filter else None)
    b = Daemon(net, "b", b_id, B_ADDR, B_IP, [spec("a", a_id, (A_IP, A_IP6, *a_routes), None)], seed=12,
               mesh_ipv6=B_IP6, filter_inputs=inputs["b"],
               node_rules=parse_node_rules_text(b_node_rules) if b_node_rules is not None else None)
    b_running = asyncio.ensure_future(b.node.run())
    await net.run_for(0.5)
    a_running = asyncio.ensure_future(a.node.run())
    await net.run_until(lambda: bool(a.bus_events("handshake")) and bool(b.bus_events("handshake")), 1.0,
                        "a handshake between a and b (never filtered)")
    await body(Pair(net, a, b, inputs))
    for node in (a, b):
        assert await net.complete(node.api.down({}), 1.0, f"{node.name}: down") == "stopping"
    await net.run_until(lambda: a_running.done() and b_running.done(), 2.0, "both daemons stopped")
    assert await leftovers.found() == []


def drops(status: dict[str, Any]) -> dict[str, int]:
    return status["filter"]["drops"]  # type: ignore[no-any-return]


# --- denied, allowed, replies ----------------------------------------------------------------------


def test_a_denied_port_never_reaches_the_tun_and_is_counted_and_replies_to_own_flows_pass(
        filtered_pair: Callable[..., None]) -> None:
    async def body(p: Pair) -> None:
        assert await p.deliver(p.a, p.b, tcp4(A_IP, B_IP, 40000, 22, SYN))  # allowed: a -> b tcp/22
        assert not await p.deliver(p.a, p.b, tcp4(A_IP, B_IP, 40001, 23, SYN))  # denied port
        assert not await p.deliver(p.a, p.b, udp4(A_IP, B_IP, 40002, 22))  # denied protocol
        status = await p.status(p.b)
        assert drops(status) == {"denied": 2}
        assert status["filter"]["rules"] == [
            {"rule": "network rule 1 (line 1): from a to b tcp 22", "hits": 1}]
        # b's answer to a's connection passes a's filter (a's own flow); b's own new connection does not.
        assert await p.deliver(p.b, p.a, tcp4(B_IP, A_IP, 22, 40000, SYN | ACK))
        assert not await p.deliver(p.b, p.a, tcp4(B_IP, A_IP, 40003, 22, SYN))
        assert drops(await p.status(p.a)) == {"denied": 1}
        # IPv6 goes through the same rules.
        assert await p.deliver(p.a, p.b, tcp6(A_IP6, B_IP6, 40004, 22, SYN))
        assert not await p.deliver(p.a, p.b, tcp6(A_IP6, B_IP6, 40005, 8080, SYN))
        assert drops(await p.status(p.b)) == {"denied": 3}

    filtered_pair(body, policy=SSH_ONLY_FROM_A)


def test_the_daemons_own_ping_works_under_a_deny_all_policy_and_the_applications_does_not(
        filtered_pair: Callable[..., None]) -> None:
    async def body(p: Pair) -> None:
        for src, dst in ((p.a, "b"), (p.b, "a")):
            pong = to_json(await p.control(src, "ping", peer=dst, wait=2))
            assert pong["ok"], pong
        p.a.ping(p.b, 1)
        await p.net.run_for(0.5)
        assert p.a.echo_replies == [] and not any(packet[9] == 1 for packet in p.b.arrived)
        status = await p.status(p.b)
        assert drops(status) == {"denied": 1}
        assert status["filter"]["enabled"] and status["filter"]["in_force"].startswith("network policy v1 (0 rules")

    filtered_pair(body, policy="# deny everything but replies\n")


def test_a_rule_swap_keeps_a_flow_still_allowed_and_stops_it_once_not(filtered_pair: Callable[..., None]) -> None:
    async def body(p: Pair) -> None:
        assert await p.deliver(p.a, p.b, tcp4(A_IP, B_IP, 40000, 22, SYN))
        assert await p.deliver(p.b, p.a, tcp4(B_IP, A_IP, 22, 40000, SYN | ACK))
        await p.set_policy(p.b, 2, SSH_ONLY_FROM_A + '[[allow]]\nfrom = "*"\nproto = "icmp"\n')
        assert await p.deliver(p.a, p.b, tcp4(A_IP, B_IP, 40000, 22, ACK))  # the connection goes on
        assert await p.deliver(p.b, p.a, tcp4(B_IP, A_IP, 22, 40000, ACK))
        assert (await p.status(p.b))["filter"]["policy_version"] == 2
        await p.set_policy(p.b, 3, '[[allow]]\nfrom = "*"\nproto = "icmp"\n')
        assert not await p.deliver(p.a, p.b, tcp4(A_IP, B_IP, 40000, 22, ACK))  # no longer allowed
        assert drops(await p.status(p.b)) == {"flow_revoked": 1}

    filtered_pair(body, policy=SSH_ONLY_FROM_A)


def test_an_invalid_policy_is_refused_and_the_rules_before_it_stay(filtered_pair: Callable[..., None]) -> None:
    async def body(p: Pair) -> None:
        await p.set_policy(p.b, 2, '[[allow]]\nfrom = "a"\nproto = "tcp"\nports = [70000]\n')
        status = (await p.status(p.b))["filter"]
        assert status["error"] == "network policy v2:4: network rule 1: ports: 70000: ports are 0 to 65535, low end first"
        assert status["policy_version"] == 1
        assert await p.deliver(p.a, p.b, tcp4(A_IP, B_IP, 40000, 22, SYN))

    filtered_pair(body, policy=SSH_ONLY_FROM_A)


# --- anti-spoofing ----------------------------------------------------------------------------------


def test_a_peer_speaking_as_another_member_inside_its_route_is_dropped_and_counted(
        filtered_pair: Callable[..., None]) -> None:
    """a (running no filter itself) advertises 10.9.0.0/16, where member c's address is."""
    async def body(p: Pair) -> None:
        assert await p.deliver(p.a, p.b, udp4("10.9.0.8", B_IP, 5000, 53))  # from a's route: a's to use
        assert not await p.deliver(p.a, p.b, udp4(C_IP, B_IP, 5000, 53))  # c's address
        assert not await p.deliver(p.a, p.b, udp4("10.8.0.1", B_IP, 5000, 53))  # outside a's allowed IPs
        status = await p.status(p.b)
        assert drops(status) == {"spoofed": 1} and status["filter"]["spoofed_by_peer"] == {"a": 1}
        assert status["drops"]["inner source not allowed for peer"] == 1  # the core's cryptokey routing

    filtered_pair(body, policy='[[allow]]\nfrom = "*"\nproto = "udp"\nports = [53]\n', a_filter=False, a_routes=(ROUTE,))


# --- what is in force, the control commands, the denied-flows log ---------------------------------------


def test_without_a_policy_node_rules_alone_are_in_force_and_status_says_so(filtered_pair: Callable[..., None]) -> None:
    async def body(p: Pair) -> None:
        a, b = (await p.status(p.a))["filter"], (await p.status(p.b))["filter"]
        assert (a["enabled"], a["in_force"]) == (False, "network policy: none set (a network from before the filter: "
                                                        "every packet is allowed, as before); the admin sets one with "
                                                        "`tunnelmesh policy set FILE`")
        assert b["enabled"] and b["in_force"].startswith("network policy: none set; this node's [filter] rules (1) only")
        assert await p.deliver(p.b, p.a, udp4(B_IP, A_IP, 5000, 9999))  # a: no filter, as before
        verdict = await p.control(p.a, "filter_test", peer="b", proto="tcp", port=5)
        assert verdict.allowed and verdict.reason.startswith("no packet filter in force (network policy: none set")
        assert await p.deliver(p.a, p.b, tcp4(A_IP, B_IP, 40000, 22, SYN))
        assert not await p.deliver(p.a, p.b, tcp4(A_IP, B_IP, 40000, 80, SYN))

    filtered_pair(body, policy=None, b_node_rules='[[filter.allow]]\nfrom = "a"\nproto = "tcp"\nports = [22]\n')


def test_filter_show_and_test_answer_per_peer_and_name_the_rule(filtered_pair: Callable[..., None]) -> None:
    async def body(p: Pair) -> None:
        shown = await p.control(p.b, "filter_show")
        assert from_json(FilterRules, to_json(shown)) == shown
        (a_rules, c_rules) = to_json(shown)["peers"]
        assert a_rules["peer"] == "a" and a_rules["origins"] == [
            {"origin": A_IP, "tcp": "22", "udp": "", "icmp": False, "icmpv6": False, "spoofed": False},
            {"origin": A_IP6, "tcp": "22", "udp": "", "icmp": False, "icmpv6": False, "spoofed": False}]
        assert c_rules["origins"][0]["tcp"] == ""
        allowed = await p.control(p.b, "filter_test", peer="a", proto="tcp", port=22)
        assert from_json(FilterVerdict, to_json(allowed)) == allowed
        assert (allowed.allowed, allowed.reason) == (True, "network rule 1 (line 1): from a to b tcp 22")
        denied = await p.control(p.b, "filter_test", peer=A_IP, proto="udp", port=22)
        assert (denied.peer, denied.allowed) == ("a", False) and "no rule allows it" in denied.reason
        for fields, error in (({"peer": "zed", "proto": "tcp", "port": 22}, "no peer 'zed'"),
                              ({"peer": "a", "proto": "gre", "port": 1}, "protocol 'gre'"),
                              ({"peer": "a", "proto": "tcp"}, "'port' is required for tcp"),
                              ({"peer": "a", "proto": "tcp", "port": 65536}, "port 65536")):
            with pytest.raises(ValueError, match=error):
                await p.control(p.b, "filter_test", **fields)
        verdict = await p.control(p.a, "filter_test", peer="b", proto="icmp")  # a accepts nothing but replies
        assert (verdict.port, verdict.allowed) == (0, False)

    filtered_pair(body, policy=SSH_ONLY_FROM_A)


def test_denied_packets_are_logged_once_per_peer_per_interval_with_a_count(
        filtered_pair: Callable[..., None], caplog: pytest.LogCaptureFixture) -> None:
    async def body(p: Pair) -> None:
        for port in (23, 24, 23, 25, 26, 27):
            await p.deliver(p.a, p.b, tcp4(A_IP, B_IP, 40000 + port, port, SYN))
        caplog.clear()
        await p.net.run_for(DENIED_LOG_EVERY)
        lines = [r.getMessage() for r in caplog.records if r.name == "tunnelmesh.filter"]
        assert lines == ["packet filter: denied 6 packets from a to: tcp/23, tcp/24, tcp/25, tcp/26 and 1 more"]
        caplog.clear()
        await p.net.run_for(DENIED_LOG_EVERY)
        assert [r for r in caplog.records if r.name == "tunnelmesh.filter"] == []  # nothing new: nothing said

    with caplog.at_level(logging.INFO, logger="tunnelmesh.filter"):
        filtered_pair(body, policy=SSH_ONLY_FROM_A)


def test_the_daemons_echo_request_is_recognised_and_turned_into_its_reply_in_place() -> None:
    from tunnelmesh.packets import DAEMON_PING_PAYLOAD, daemon_echo_request, echo_reply_in_place, icmp_echo

    a, b = ipaddress.IPv4Address(A_IP), ipaddress.IPv4Address(B_IP)
    request = bytearray(icmp_echo(a, b, 7, 9, DAEMON_PING_PAYLOAD)) + bytearray(16)  # a buffer longer than the packet
    length = len(request) - 16
    assert daemon_echo_request(request, length, b.packed) and not daemon_echo_request(request, length, a.packed)
    assert not daemon_echo_request(bytearray(icmp_echo(a, b, 7, 9, b"tunnelmesh pong")), length, b.packed)
    echo_reply_in_place(request, length)
    assert bytes(request[:length]) == icmp_echo(b, a, 7, 9, DAEMON_PING_PAYLOAD, reply=True)
