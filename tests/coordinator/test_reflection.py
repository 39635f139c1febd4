"""The coordinator's STUN reflection service (tunnelmesh/coordinator/reflection.py) over
real UDP sockets on loopback: what it answers and from where, what it drops and counts,
its rate limits, where nodes learn of it (the register reply) and its settings."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from aioice import stun as codec
from hypothesis import given
from hypothesis import strategies as st

from tests.support.coordinator import UNLIMITED, World, set_up
from tests.support.databases import Database
from tests.unit.test_config import load, load_error
from tunnelmesh.coordinator.client import Coordinator
from tunnelmesh.coordinator.metrics import CoordinatorCollector
from tunnelmesh.coordinator.reflection import (
    Reflection,
    ReflectionAddresses,
    StunSettingError,
    reflection_addresses,
    start_reflection,
    stun_servers,
)
from tunnelmesh.coordinator.app import make_app, serve
from tunnelmesh.coordinator.store import open_store
from tunnelmesh.nat.stun import BindingResponse, binding_request, parse_binding_response
from tunnelmesh.ratelimit import Rate, RateLimiter

Address = tuple[str, int]
ANSWER_WAIT = 5.0  # generous: an answer on loopback takes well under a millisecond


@asynccontextmanager
async def reflecting(primary: Address, alternate: Address | None, *, limiter: RateLimiter | None = None,
                     clock: list[float] | None = None, named: frozenset[str] = frozenset()
                     ) -> AsyncIterator[Reflection]:
    reflection = Reflection(ReflectionAddresses(primary, alternate, named), limiter=limiter,
                            **({"monotonic": lambda: clock[0]} if clock is not None else {}))
    await reflection.start()
    try:
        yield reflection
    finally:
        reflection.close()


@asynccontextmanager
async def client(host: str = "127.0.0.1") -> AsyncIterator[socket.socket]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    sock.bind((host, 0))
    try:
        yield sock
    finally:
        sock.close()


async def receive(sock: socket.socket) -> tuple[bytes, Address]:
    data, source = await asyncio.wait_for(asyncio.get_running_loop().sock_recvfrom(sock, 2048), ANSWER_WAIT)
    return data, source


async def ask(sock: socket.socket, server: Address, *, change_ip: bool = False,
              change_port: bool = False) -> tuple[BindingResponse, Address]:
    """One Binding request from `sock` to `server`: the answer and where it came from."""
    transaction_id, request = binding_request(change_ip=change_ip, change_port=change_port)
    await asyncio.get_running_loop().sock_sendto(sock, request, server)
    data, source = await receive(sock)
    answer = parse_binding_response(data)
    assert answer.transaction_id == transaction_id and len(data) <= len(request)
    return answer, source


def test_it_answers_with_the_source_address_and_changes_port_from_the_alternate() -> None:
    async def scenario() -> None:
        async with reflecting(("127.0.0.1", 0), ("127.0.0.1", 0)) as reflection, client() as sock:
            (_, primary), (_, alternate) = reflection.bound
            assert primary != alternate
            me = sock.getsockname()
            answer, source = await ask(sock, ("127.0.0.1", primary))
            assert source == ("127.0.0.1", primary)
            assert answer.mapped == me and answer.origin == source and answer.other == ("127.0.0.1", alternate)
            answer, source = await ask(sock, ("127.0.0.1", primary), change_port=True)
            assert source == ("127.0.0.1", alternate) == answer.origin and answer.mapped == me
            # one address: a change of address cannot be made, and is not answered
            await asyncio.get_running_loop().sock_sendto(sock, binding_request(change_ip=True)[1],
                                                         ("127.0.0.1", primary))
            answer, source = await ask(sock, ("127.0.0.1", alternate))  # the next thing to come back
            assert source == ("127.0.0.1", alternate) and answer.other == ("127.0.0.1", primary)
            assert reflection.answered == 3 and reflection.dropped["cannot-change"] == 1
            # Not named by a setting (it is where the coordinator serves): by port alone, so
            # that nodes send to their coordinator URL's host, not to a private or loopback
            # address seen from behind a port-forward or a reverse proxy.
            assert reflection.advertised() == [{"port": primary}, {"port": alternate}]

    asyncio.run(scenario())


def test_with_two_addresses_every_change_is_answered_from_the_right_socket() -> None:
    async def scenario() -> None:
        async with reflecting(("127.0.0.1", 0), ("127.0.0.2", 0), named=frozenset({"127.0.0.1", "127.0.0.2"})
                              ) as reflection, client() as sock:
            assert len(reflection.bound) == 4
            primary, alternate = (port for ip, port in reflection.bound if ip == "127.0.0.1")
            server = ("127.0.0.1", primary)
            for change_ip, change_port, expected in ((False, False, server), (False, True, ("127.0.0.1", alternate)),
                                                     (True, False, ("127.0.0.2", primary)),
                                                     (True, True, ("127.0.0.2", alternate))):
                answer, source = await ask(sock, server, change_ip=change_ip, change_port=change_port)
                assert source == expected == answer.origin
                assert answer.other == ("127.0.0.2", alternate)
            assert reflection.advertised() == [{"host": "127.0.0.1", "port": primary},  # the settings named them
                                               {"host": "127.0.0.2", "port": alternate}]

    asyncio.run(scenario())


def test_on_the_wildcard_it_answers_from_the_address_asked() -> None:
    async def scenario() -> None:
        async with reflecting(("0.0.0.0", 0), ("0.0.0.0", 0)) as reflection, client() as sock:
            (_, primary), (_, alternate) = reflection.bound
            for host in ("127.0.0.1", "127.0.0.3"):
                answer, source = await ask(sock, (host, primary))
                assert source == (host, primary) == answer.origin and answer.other == (host, alternate)
                answer, source = await ask(sock, (host, primary), change_port=True)
                assert source == (host, alternate)
            assert reflection.advertised() == [{"port": primary}, {"port": alternate}]  # the URL's host

    asyncio.run(scenario())


def test_on_the_ipv6_wildcard_it_answers_ipv4_and_ipv6_clients_in_their_own_family() -> None:
    async def scenario() -> None:
        async with reflecting(("::", 0), ("::", 0)) as reflection, client() as v4:
            (_, primary), (_, alternate) = reflection.bound
            answer, source = await ask(v4, ("127.0.0.1", primary), change_port=True)
            assert answer.mapped == v4.getsockname() and source == ("127.0.0.1", alternate) == answer.origin
            v6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
            try:
                v6.setblocking(False)
                v6.bind(("::1", 0))
                answer, source = await ask(v6, ("::1", primary))
                assert answer.mapped == v6.getsockname()[:2] and answer.origin == ("::1", primary)
                assert answer.other == ("::1", alternate)
            finally:
                v6.close()

    asyncio.run(scenario())


def _message(method: codec.Method, klass: codec.Class, attributes: dict[str, object]) -> bytes:
    return bytes(codec.Message(method, klass, attributes=attributes))


def test_garbage_oversized_and_other_messages_get_nothing_and_are_counted() -> None:
    unwanted = {
        "not-stun": [b"", b"\x01\x00\x00\x00" + bytes(144), bytes(100)],  # a WireGuard initiation's shape
        "not-binding-request": [_message(codec.Method.ALLOCATE, codec.Class.REQUEST, {"SOFTWARE": "x" * 100}),
                                _message(codec.Method.BINDING, codec.Class.RESPONSE,
                                         {"XOR-MAPPED-ADDRESS": ("192.0.2.1", 1), "SOFTWARE": "x" * 80}),
                                _message(codec.Method.BINDING, codec.Class.REQUEST,
                                         {"USERNAME": "u", "SOFTWARE": "x" * 100})],
        "oversized": [bytes(2000), binding_request()[1] + bytes(1000)],
        "undersized": [_message(codec.Method.BINDING, codec.Class.REQUEST, {})],  # 20 bytes: no room to answer
    }

    async def scenario() -> None:
        async with reflecting(("127.0.0.1", 0), ("127.0.0.1", 0)) as reflection, client() as sock:
            server = ("127.0.0.1", reflection.bound[0][1])
            for datagrams in unwanted.values():
                for datagram in datagrams:
                    await asyncio.get_running_loop().sock_sendto(sock, datagram, server)
            await ask(sock, server)  # what comes back first is this answer: nothing came for the rest
            assert reflection.answered == 1
            assert {reason: reflection.dropped[reason] for reason in unwanted} == \
                {reason: len(datagrams) for reason, datagrams in unwanted.items()}
            assert reflection.dropped["rate-limited"] == 0

    asyncio.run(scenario())


def test_garbage_takes_no_token_from_those_who_send_requests() -> None:
    clock = [100.0]
    limiter = RateLimiter(Rate(per_second=1.0, burst=2), Rate(per_second=1.0, burst=2), now=clock[0])

    async def scenario() -> None:
        async with reflecting(("127.0.0.1", 0), None, limiter=limiter, clock=clock) as reflection, client() as sock:
            server = ("127.0.0.1", reflection.bound[0][1])
            for _ in range(50):
                await asyncio.get_running_loop().sock_sendto(sock, bytes(100), server)
            await ask(sock, server)
            await ask(sock, server)
            assert reflection.dropped["not-stun"] == 50 and reflection.answered == 2

    asyncio.run(scenario())


@pytest.mark.parametrize(("overall", "answered", "remembered"), [
    (Rate(per_second=1.0, burst=1000), 16 * 3, 4),  # each source its burst; the table keeps 4 (LRU)
    (Rate(per_second=1.0, burst=8), 8, 1),  # the overall bucket runs dry during the third source
])
def test_each_source_and_the_whole_service_are_rate_limited(overall: Rate, answered: int, remembered: int) -> None:
    clock = [100.0]  # stands still: no bucket refills during the flood
    per_source = Rate(per_second=1.0, burst=3)
    limiter = RateLimiter(per_source, overall, max_sources=4, now=clock[0])

    async def scenario() -> None:
        async with reflecting(("127.0.0.1", 0), None, limiter=limiter, clock=clock) as reflection:
            server = ("127.0.0.1", reflection.bound[0][1])
            assert reflection.advertised() == [{"port": server[1]}]  # no alternate
            answers = []
            for last in range(10, 26):  # 16 sources, 5 requests each
                async with client(f"127.0.0.{last}") as sock:
                    for _ in range(5):
                        await asyncio.get_running_loop().sock_sendto(sock, binding_request()[1], server)
                    # answers are sent before a datagram is counted, and loopback delivers at once
                    await until_counted(reflection, 5 * (last - 9))
                    received = drain(sock)
                    assert len(received) <= per_source.burst
                    answers += received
            assert len(answers) == reflection.answered == answered
            assert reflection.dropped["rate-limited"] == 16 * 5 - answered
            # a source refused by the overall bucket only keeps a full bucket, which is forgotten
            assert len(limiter) == remembered
            clock[0] += 60.0  # refilled: a source is answered again
            async with client("127.0.0.10") as sock:
                await ask(sock, server)

    asyncio.run(scenario())


def drain(sock: socket.socket) -> list[bytes]:
    """What `sock` has received and not read yet."""
    datagrams = []
    while True:
        try:
            datagrams.append(sock.recv(2048))
        except BlockingIOError:
            return datagrams


async def until_counted(reflection: Reflection, datagrams: int) -> None:
    """Until the service has seen `datagrams` (answered or dropped), within ANSWER_WAIT."""
    deadline = asyncio.get_running_loop().time() + ANSWER_WAIT
    while reflection.answered + sum(reflection.dropped.values()) < datagrams:
        assert asyncio.get_running_loop().time() < deadline, "the service did not read every datagram"
        await asyncio.sleep(0.01)


def test_a_taken_default_alternate_port_is_a_warning_and_the_primary_serves_alone(
        caplog: pytest.LogCaptureFixture) -> None:
    """The alternate as a default (port + 1, no setting) may be taken by something else on
    the host: the service runs without it rather than the daemon not at all."""
    async def scenario() -> None:
        async with client() as taken:
            port = taken.getsockname()[1]
            addresses = ReflectionAddresses(("127.0.0.1", 0), ("127.0.0.1", port), alternate_optional=True)
            reflection = Reflection(addresses)
            with caplog.at_level("WARNING", logger="tunnelmesh.coordinator.reflection"):
                await reflection.start()
            try:
                assert len(reflection.bound) == 1 and reflection.advertised() == [{"port": reflection.bound[0][1]}]
                assert "without its alternate socket" in caplog.text and "stun_alternate" in caplog.text
                async with client() as sock:
                    answer, _ = await ask(sock, ("127.0.0.1", reflection.bound[0][1]))
                    assert answer.mapped == sock.getsockname() and answer.other is None
            finally:
                reflection.close()

    asyncio.run(scenario())


def test_a_taken_port_is_an_error_naming_it_and_leaves_nothing_open() -> None:
    async def scenario() -> None:
        async with client() as taken:
            port = taken.getsockname()[1]
            reflection = Reflection(ReflectionAddresses(("127.0.0.1", 0), ("127.0.0.1", port)))
            with pytest.raises(OSError, match=f"UDP 127.0.0.1:{port}"):
                await reflection.start()
            assert reflection.bound == []

    asyncio.run(scenario())


def test_nodes_learn_it_in_the_register_reply_and_it_is_in_the_metrics(database: Database) -> None:
    world = World.create()

    async def scenario() -> None:
        store = await open_store(database.url)
        app = make_app(store, limiter=RateLimiter(UNLIMITED, UNLIMITED))
        reflection = await start_reflection(app, ReflectionAddresses(("0.0.0.0", 0), ("0.0.0.0", 0)))
        runner = await serve(app, "127.0.0.1", 0)
        try:
            url = "http://{}:{}".format(*runner.addresses[0][:2])
            await set_up(url, world)  # its admin node (identity 0) is a member
            async with Coordinator(url, identity=world.nodes[0]) as node:
                reply = await node.register(51820, [])
            ports = [port for _, port in reflection.bound]
            assert reply["stun"] == [{"port": ports[0]}, {"port": ports[1]}]  # at the URL's host
            assert stun_servers(reply["stun"], "127.0.0.1") == (("127.0.0.1", ports[0]), ("127.0.0.1", ports[1]))
            async with client() as sock:
                await ask(sock, ("127.0.0.1", ports[0]))
                await asyncio.get_running_loop().sock_sendto(sock, b"junk", ("127.0.0.1", ports[0]))
                await until_counted(reflection, 2)
            families = {family.name: family for family in CoordinatorCollector(app).collect()}
            assert families["tunnelmesh_coordinator_stun_answered"].samples[0].value == 1
            dropped = {sample.labels["reason"]: sample.value
                       for sample in families["tunnelmesh_coordinator_stun_dropped"].samples}
            assert dropped["not-stun"] == 1 and sum(dropped.values()) == 1
        finally:
            await runner.cleanup()
            reflection.close()
            await store.close()

    asyncio.run(scenario())


def test_the_register_reply_is_read_with_care() -> None:
    assert stun_servers(None, "c.example") == ()
    assert stun_servers("7400", "c.example") == ()
    hostile = [{"port": 7400}, {"port": "7401"}, {"port": 0}, {"port": True}, {"host": "not an ip", "port": 1},
               {"host": 5, "port": 2}, "x", {"host": "192.0.2.1", "port": 7401}, {"port": 7400}]
    assert stun_servers(hostile, "c.example") == (("c.example", 7400),)  # at most 4 looked at, duplicates once
    assert stun_servers([{"port": 7400}], "") == ()  # no host to send to
    # A host the coordinator names must be one the prober may use: IPv4, not loopback,
    # link-local, unspecified, multicast or reserved (its word must not aim nodes inward).
    for inward in ("127.0.0.1", "169.254.169.254", "0.0.0.0", "224.0.0.1", "240.0.0.1", "2001:db8::1", "::1", "c"):
        assert stun_servers([{"host": inward, "port": 3478}], "c.example") == (), inward
    assert stun_servers([{"host": "198.51.100.7", "port": 3478}], "c") == (("198.51.100.7", 3478),)
    # The URL's host is where this node reaches its coordinator: a name or IPv4, not IPv6 (the prober's IPv4 only).
    assert stun_servers([{"port": 7400}], "127.0.0.1") == (("127.0.0.1", 7400),)
    assert stun_servers([{"port": 7400}], "2001:db8::1") == ()


@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.sampled_from(["host", "port", "x"]),
                                                                                inner, max_size=3), max_leaves=12))
def test_any_json_in_the_reply_gives_well_formed_servers(value: object) -> None:
    for host, port in stun_servers(value, "c.example"):
        assert isinstance(host, str) and host and type(port) is int and 1 <= port <= 65535


COORDINATED = '[node]\nname = "alpha"\n\n[coordinator]\nurl = "http://192.0.2.1:7400/"\nserve = "0.0.0.0:7400"\n'


def test_settings_default_to_the_coordinators_port_and_the_next(tmp_path: Path) -> None:
    def stun_of(extra: str) -> ReflectionAddresses | None:
        coordinator = load(tmp_path, COORDINATED + extra).coordinator
        assert coordinator is not None
        return coordinator.stun

    assert stun_of("") == ReflectionAddresses(("0.0.0.0", 7400), ("0.0.0.0", 7401), alternate_optional=True)
    assert stun_of("stun = false\n") is None
    assert stun_of('stun = "192.0.2.1:3478"\nstun_alternate = "192.0.2.2:3479"\n') == \
        ReflectionAddresses(("192.0.2.1", 3478), ("192.0.2.2", 3479), frozenset({"192.0.2.1", "192.0.2.2"}))
    assert stun_of('stun = "192.0.2.1:3478"\n') == \
        ReflectionAddresses(("192.0.2.1", 3478), ("192.0.2.1", 3479), frozenset({"192.0.2.1"}), alternate_optional=True)
    assert stun_of("stun_alternate = false\n") == ReflectionAddresses(("0.0.0.0", 7400), None)
    # Serving on a specific address: used, not advertised (it may be private behind a port-forward).
    assert reflection_addresses(None, None, ("10.1.2.3", 7400)) == \
        ReflectionAddresses(("10.1.2.3", 7400), ("10.1.2.3", 7401), alternate_optional=True)


@pytest.mark.parametrize(("extra", "key", "message"), [
    ('stun = "nowhere"\n', "stun", "expected host:port"),
    ('stun = "stun.example.org:3478"\n', "stun", "must be an IP address"),
    ("stun = 3478\n", "stun", "must be \"IP:port\" or false"),
    ('stun = "192.0.2.1:65535"\n', "stun", "set stun_alternate"),
    ('stun_alternate = "0.0.0.0:7400"\n', "stun_alternate", "must differ from stun"),
    ('stun_alternate = "192.0.2.2:7401"\n', "stun_alternate", "both on specific addresses"),
    ('stun_alternate = "[2001:db8::1]:7401"\n', "stun_alternate", "same address family"),
    ('stun = false\nstun_alternate = "192.0.2.2:7401"\n', "stun_alternate", "needs stun"),
])
def test_wrong_settings_are_refused_with_the_key_and_line(tmp_path: Path, extra: str, key: str, message: str) -> None:
    error = load_error(tmp_path, COORDINATED + extra)
    line = (COORDINATED + extra).splitlines().index(next(row for row in extra.splitlines() if row.startswith(key))) + 1
    assert message in str(error) and f"[coordinator]: {key}" in str(error) and f":{line}" in str(error)


def test_settings_without_serve_are_refused(tmp_path: Path) -> None:
    text = COORDINATED.replace('serve = "0.0.0.0:7400"\n', "") + "stun = false\n"
    assert "stun is for the embedded coordinator (needs serve)" in str(load_error(tmp_path, text))


def test_a_host_name_to_serve_on_gives_the_wildcard() -> None:
    assert reflection_addresses(None, None, ("coordinator.example", 7400)) == \
        ReflectionAddresses(("0.0.0.0", 7400), ("0.0.0.0", 7401), alternate_optional=True)
    with pytest.raises(StunSettingError) as info:
        reflection_addresses("nope", None, ("0.0.0.0", 7400))
    assert info.value.key == "stun"
