"""The NAT prober actor (actors/nat_prober.py) over real loopback sockets: its requests
leave through a real data path's UDP socket (UdpBind) and its answers come back through
the data path's demux, from the coordinator's real reflection service (one or two
addresses) or, for the failures it never makes, a small faulty server."""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from actors.datapath import DataPath
from actors.edges import UdpBind
from actors.nat_prober import TRIES, CheckNat, NatProber
from actors.runtime import Supervisor
from tests.support.memnet import MemoryTun
from tests.support.wait import until
from tests.support.wire import seeded_rng
from tunnelmesh.config import ConfigError, parse_config
from tunnelmesh.config.model import NatConfig
from tunnelmesh.coordinator.reflection import Reflection, ReflectionAddresses, stun_servers
from tunnelmesh.nat.report import (
    ADDRESS_AND_PORT_DEPENDENT, ADDRESS_DEPENDENT, ENDPOINT_INDEPENDENT, NONE, UNKNOWN, NatReport,
)
from tunnelmesh.nat.stun import binding_request, binding_response, parse_binding_request
from tunnelmesh.wireguard import Device


@dataclass
class Faulty:
    """A STUN server on two ports of 127.0.0.1 that fails RFC 5780's change requests in a
    way the real service (tunnelmesh.coordinator.reflection) never does: it answers them
    from the address asked ("ignore") or not at all ("drop")."""

    changes: str
    says_other: tuple[str, int] | None = None  # OTHER-ADDRESS in its answers (None: its other socket)
    sockets: list[socket.socket] = field(default_factory=list)
    requests: int = 0

    def open(self) -> None:
        for _ in range(2):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind(("127.0.0.1", 0))
            sock.setblocking(False)
            self.sockets.append(sock)
            asyncio.get_running_loop().add_reader(sock.fileno(), self._answer, sock)

    def name(self) -> str:
        return "127.0.0.1:%d" % self.sockets[0].getsockname()[1]

    def _answer(self, sock: socket.socket) -> None:
        data, source = sock.recvfrom(2048)
        request = parse_binding_request(data)
        self.requests += 1
        if (request.change_ip or request.change_port) and self.changes == "drop":
            return
        here, other = (s.getsockname() for s in (sock, self.sockets[1] if sock is self.sockets[0] else self.sockets[0]))
        sock.sendto(binding_response(request, source, origin=here, other=self.says_other or other), source)

    def close(self) -> None:
        for sock in self.sockets:
            asyncio.get_running_loop().remove_reader(sock.fileno())
            sock.close()


@pytest.fixture
def datapath() -> Iterator[DataPath]:
    rng = seeded_rng(5)
    tun, bind = MemoryTun("tm-nat"), UdpBind.open(0)
    try:
        yield DataPath(Device(rng(32), rng=seeded_rng(6)), tun, bind)
    finally:
        bind.close()
        tun.close()


def run(datapath: DataPath, scenario: Callable[[DataPath], Awaitable[None]]) -> None:
    """Run `scenario` in a new event loop with the data path reading its socket."""
    async def started() -> None:
        datapath.start()
        try:
            await scenario(datapath)
        finally:
            datapath.stop()

    asyncio.run(started())


async def reflection(second_ip: str | None = None) -> tuple[Reflection, list[str]]:
    """The coordinator's real reflection service on ephemeral ports of 127.0.0.1 (and of
    `second_ip`), and its servers as a node reads them from the register reply."""
    service = Reflection(ReflectionAddresses(("127.0.0.1", 0), (second_ip or "127.0.0.1", 0)))
    await service.start()
    return service, [f"{host}:{port}" for host, port in stun_servers(service.advertised(), "127.0.0.1")]


async def faulty(changes: str) -> Faulty:
    server = Faulty(changes)
    server.open()
    return server


def prober(datapath: DataPath, servers: list[str], local: list[str] | None = None,
           seen: list[NatReport] | None = None, probe_interval: float = 300.0) -> NatProber:
    async def local_addresses() -> list[str]:
        return list(local or [])

    return NatProber(send=datapath.bind.sendto, register=datapath.register_datagrams, port=datapath.port,
                     servers=lambda: servers, local_addresses=local_addresses,
                     on_change=[seen.append] if seen is not None else (), probe_interval=probe_interval)


def test_no_nat_on_loopback_and_the_port_is_the_wireguard_port(datapath: DataPath) -> None:
    async def scenario(running: DataPath) -> None:
        service, names = await reflection()
        try:
            seen: list[NatReport] = []
            nat = prober(running, names, local=["127.0.0.1"], seen=seen)
            report = await nat.check()
        finally:
            service.close()
        assert report.mapping == NONE
        assert report.reflexive == (("127.0.0.1", running.port),)
        assert report.udp_works and report.error is None and report.checked_at is not None
        assert report.servers[0].server == names[0] and report.servers[0].rtt_ms is not None
        assert nat.report is report and seen == [report]
    run(datapath, scenario)


def test_the_coordinators_reflection_service_as_it_advertises_itself(datapath: DataPath) -> None:
    """The real service, found as a node finds it (the register reply's "stun", primary and
    alternate): the alternate is not asked before the change-port test, so that test still
    says something; it is asked as the mapping test."""
    async def scenario(running: DataPath) -> None:
        service, names = await reflection()
        try:
            assert len(names) == 2
            report = await prober(running, names).check()
        finally:
            service.close()
        assert (report.mapping, report.filtering) == (ENDPOINT_INDEPENDENT, ADDRESS_DEPENDENT)
        assert [result.server for result in report.servers] == names[:1]
        assert service.answered == 3  # test I, change port, the alternate
    run(datapath, scenario)


def test_a_reflection_service_on_two_addresses_tells_everything(datapath: DataPath) -> None:
    async def scenario(running: DataPath) -> None:
        service, names = await reflection("127.0.0.2")
        try:
            report = await prober(running, names, local=["127.0.0.1"]).check()
        finally:
            service.close()
        assert (report.mapping, report.filtering) == (NONE, ENDPOINT_INDEPENDENT)
        assert report.reflexive == (("127.0.0.1", running.port),)
    run(datapath, scenario)


@pytest.mark.parametrize(("changes", "filtering", "requests"), [
    ("drop", ADDRESS_AND_PORT_DEPENDENT, 2 + TRIES),  # no answer to "change port" (retried to the end)
    ("ignore", UNKNOWN, 3),  # answered from the address asked: the test says nothing
])
def test_change_requests_unanswered_or_ignored(datapath: DataPath, changes: str, filtering: str,
                                               requests: int) -> None:
    async def scenario(running: DataPath) -> None:
        server = await faulty(changes)
        try:
            report = await prober(running, [server.name()]).check()
        finally:
            server.close()
        assert (report.mapping, report.filtering) == (ENDPOINT_INDEPENDENT, filtering)
        assert server.requests == requests
    run(datapath, scenario)


def test_filtering_not_retested_while_the_nat_may_remember_the_other_port(datapath: DataPath) -> None:
    async def scenario(running: DataPath) -> None:
        service, names = await reflection()
        try:
            nat = prober(running, names)
            first = await nat.check()
            before = service.answered
            second = await nat.check()
        finally:
            service.close()
        assert first.filtering == second.filtering == ADDRESS_DEPENDENT
        assert service.answered - before == 2  # test I and the other port; no change-port test
    run(datapath, scenario)


def test_an_other_address_aiming_inward_is_not_followed(datapath: DataPath) -> None:
    """A server's OTHER-ADDRESS is its word: a link-local one (a cloud's metadata service,
    say) gets no request, and without a trusted other address no change test is made."""
    async def scenario(running: DataPath) -> None:
        server = Faulty("ignore", says_other=("169.254.169.254", 80))
        server.open()
        nat = prober(running, [server.name()])
        sent: list[tuple[str, int]] = []
        send = nat.send

        def recorded(data: bytes, to: tuple[str, int]) -> None:
            sent.append(to)
            if to[0] == "127.0.0.1":  # a regression must not send off this machine either
                send(data, to)

        nat.send = recorded
        try:
            report = await nat.check()
            assert server.requests == 1 and {f"{host}:{port}" for host, port in sent} == {server.name()}
        finally:
            server.close()
        assert report.udp_works and report.filtering == UNKNOWN
    run(datapath, scenario)


def test_silent_and_unresolvable_servers_are_reported(datapath: DataPath) -> None:
    async def scenario(running: DataPath) -> None:
        quiet = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        quiet.bind(("127.0.0.1", 0))  # takes the requests, answers nothing
        try:
            report = await prober(running, [f"127.0.0.1:{quiet.getsockname()[1]}", "no-such-host.invalid:3478"]).check()
        finally:
            quiet.close()
        assert not report.udp_works and report.mapping == UNKNOWN and report.reflexive == ()
        assert report.error is not None and "no STUN server answered" in report.error
        assert [result.error for result in report.servers] == [f"no answer to {TRIES} tries",
                                                              "cannot resolve no-such-host.invalid:3478"]
    run(datapath, scenario)


def test_no_server_known(datapath: DataPath) -> None:
    async def scenario(running: DataPath) -> None:
        report = await prober(running, []).check()
        assert report.error is not None and "no STUN server known" in report.error
        assert report.checked_at is not None and report.servers == ()
    run(datapath, scenario)


def test_unsolicited_and_malformed_answers_are_dropped_and_counted(datapath: DataPath) -> None:
    async def scenario(running: DataPath) -> None:
        nat = prober(running, [])
        sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            # A well-formed STUN answer no request waits for: a request's own bytes serve (a
            # STUN message whose transaction id is unknown).
            sender.sendto(binding_request()[1], ("127.0.0.1", running.port))
            await until("the answer is counted", lambda: nat.unsolicited == 1)
            assert running.drops["not a WireGuard message"] == 0
            # An answer with a pending id that does not parse: the request gets "bad answer".
            transaction_id, request = binding_request()
            answer: asyncio.Future[object] = asyncio.get_running_loop().create_future()
            nat._pending[transaction_id] = answer  # as _ask would hold it
            sender.sendto(request[:8] + transaction_id + request[20:], ("127.0.0.1", running.port))
            result = await asyncio.wait_for(answer, 5)
            assert isinstance(result, str) and result.startswith("bad answer") and nat.malformed == 1
            # Not STUN at all: left for the data path to count.
            sender.sendto(b"\x00garbage", ("127.0.0.1", running.port))
            await until("the data path counts it", lambda: running.drops["not a WireGuard message"] == 1)
        finally:
            sender.close()
    run(datapath, scenario)


def test_the_actor_checks_at_start_and_when_asked(datapath: DataPath) -> None:
    async def scenario(running: DataPath) -> None:
        service, names = await reflection()
        supervisor = Supervisor()
        seen: list[NatReport] = []
        nat = supervisor.add(prober(running, names, local=["127.0.0.1"], seen=seen))
        task = asyncio.create_task(supervisor.run())
        try:
            await until("the first check", lambda: len(seen) == 1, timeout=30)
            assert seen[0].mapping == NONE
            asked = await nat.ask(CheckNat(), timeout=30)
            assert asked is nat.report and asked.mapping == NONE
            assert len(seen) == 1  # nothing changed: no callback
        finally:
            supervisor.shutdown("test over")
            await task
            service.close()
    run(datapath, scenario)


def test_the_actor_checks_again_when_the_servers_change(datapath: DataPath) -> None:
    async def scenario(running: DataPath) -> None:
        (first, first_names), (second, second_names) = await reflection(), await reflection("127.0.0.2")
        servers = first_names[:1]
        supervisor = Supervisor()
        seen: list[NatReport] = []
        nat = prober(running, servers, seen=seen)
        supervisor.add(nat)
        task = asyncio.create_task(supervisor.run())
        try:
            await until("the first check", lambda: len(seen) == 1, timeout=30)
            servers.append(second_names[0])  # the list the prober reads at each comparison
            await until("a check of both servers", lambda: len(nat.report.servers) == 2, timeout=30)
            assert [result.reflexive for result in nat.report.servers] == [("127.0.0.1", running.port)] * 2
        finally:
            supervisor.shutdown("test over")
            await task
            first.close()
            second.close()
    run(datapath, scenario)




# --- the [nat] table ------------------------------------------------------------------------

BASE = '[node]\nname = "a"\nmesh_ip = "10.9.0.1"\n'


def nat_config(tmp_path: Path, table: str) -> NatConfig:
    return parse_config(BASE + table, path=tmp_path / "config.toml", state_dir=tmp_path).nat


def test_nat_table_defaults_and_values(tmp_path: Path) -> None:
    assert nat_config(tmp_path, "") == NatConfig((), 300)
    assert nat_config(tmp_path, '[nat]\nstun_servers = ["198.51.100.7:3478", "stun.example.org:3478"]\n'
                                'probe_interval = 60\n') == NatConfig(("198.51.100.7:3478", "stun.example.org:3478"), 60)


@pytest.mark.parametrize(("table", "expected"), [
    ('[nat]\nstun_servers = "198.51.100.7:3478"\n', ':5: [nat]: stun_servers must be a list of "host:port"'),
    ('[nat]\nstun_servers = ["198.51.100.7"]\n', ":5: [nat]: stun_servers: '198.51.100.7': expected host:port"),
    ('[nat]\nstun_servers = [' + ", ".join(f'"198.51.100.{i}:3478"' for i in range(9)) + "]\n",
     ":5: [nat]: stun_servers: at most 8"),
    ("[nat]\nprobe_interval = 5\n", ":5: [nat]: probe_interval must be between 30 and 86400 seconds, got 5"),
    ("[nat]\nport = 1\n", ":5: [nat]: unknown key 'port'"),
])
def test_nat_table_refusals_name_the_line(tmp_path: Path, table: str, expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        nat_config(tmp_path, table)
    assert expected in str(caught.value)


# --- untrusted datagrams -----------------------------------------------------------------------

@given(st.binary(max_size=200), st.booleans())
def test_any_stun_looking_datagram_is_taken_counted_or_answered_never_raised(body: bytes, pending: bool) -> None:
    """Whatever follows a STUN header (with an id a request waits for, or not), the
    handler takes it: an unknown id is counted, a known one gets its answer or "bad
    answer"; nothing is raised into the data path."""
    nat = prober_without_socket()
    transaction_id = bytes(range(12))
    body = body[: len(body) // 4 * 4]
    datagram = struct.pack("!HHI", 0x0101, len(body), 0x2112A442) + transaction_id + body

    async def scenario() -> None:
        answer: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        if pending:
            nat._pending[transaction_id] = answer  # as _ask holds it
        assert nat._on_datagram(memoryview(datagram), ("192.0.2.1", 3478)) is True
        if pending:
            result = answer.result()
            assert isinstance(result, str) and result.startswith("bad answer") or isinstance(result, tuple)
        else:
            assert nat.unsolicited == 1

    asyncio.run(scenario())


def prober_without_socket() -> NatProber:
    async def no_addresses() -> list[str]:
        return []

    return NatProber(send=lambda data, address: 0, register=lambda handler: None, port=51820, servers=list,
                     local_addresses=no_addresses)
