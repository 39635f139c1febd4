"""Where a member's relay URL may send every node (issue 13, defect 5): the URL is the
member's unsigned word, so `parse_relay_url` takes an address only as a canonical dotted
quad (no other spelling a resolver reads as an address, no localhost), and
`RelayGuard` checks where a name leads when a node connects: never loopback,
link-local, multicast or reserved, a private address only if the member registered
it. No real DNS: the guard's resolver is the test's."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest

from tests.support.coordinator import identities
from tunnelmesh.links import Link
from tunnelmesh.links.relay import (
    REFUSED_PRIVATE,
    REFUSED_UNUSABLE,
    RelayClient,
    RelayGuard,
    RelayRefused,
    _GuardedResolver,
    relay_address_problem,
)
from tunnelmesh.membership import MembershipError, parse_relay_url

NETWORK = "SHA256:relay-guard-test"


# --- the URL as the map carries it ---------------------------------------------------------


@pytest.mark.parametrize("url", [
    "http://localhost:7401", "http://LOCALHOST.:7401", "http://relay.localhost:7401",
    "http://localhost.localdomain", "http://ip6-localhost",
    "http://0x7f000001:7401", "http://0x7f.0.0.1:7401", "http://0xa9fea9fe", "http://0XA9FEA9FE",
    "http://2130706433", "http://127.1", "http://0177.0.0.1", "http://127.0.0.01", "http://0x7f.1",
    "http://169.254.0x1.1", "http://relay.0x10", "http://a.b.c.123",
    "http://metadata", "http://relay:7401",
    "http://0.1.2.3:7401", "http://255.255.255.255", "http://240.0.0.1",
])
def test_parse_relay_url_refuses_addresses_in_disguise_and_this_machine(url: str) -> None:
    with pytest.raises(MembershipError, match="relay"):
        parse_relay_url(url)


@pytest.mark.parametrize("url, canonical", [
    ("http://192.0.2.3:7401", "http://192.0.2.3:7401"),
    ("HTTPS://Relay.Example.org:443/", "https://relay.example.org"),
    ("http://10.1.2.3:7401", "http://10.1.2.3:7401"),  # private: checked against the member when connecting
    ("http://1.relay.example.org", "http://1.relay.example.org"),
    ("http://relay.0x-example.org", "http://relay.0x-example.org"),
])
def test_parse_relay_url_keeps_dotted_quads_and_names(url: str, canonical: str) -> None:
    assert parse_relay_url(url) == canonical


# --- where it leads, when a node connects ----------------------------------------------------


def resolver(answers: dict[str, list[str]]) -> Callable[[str, int], Awaitable[list[str]]]:
    async def resolve(host: str, port: int) -> list[str]:
        if host not in answers:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return answers[host]
    return resolve


def guard(answers: dict[str, list[str]], registered: set[str] | None = None) -> RelayGuard:
    return RelayGuard(lambda: frozenset(registered or ()), resolver(answers))


@pytest.mark.parametrize("address, registered, problem", [
    ("127.0.0.1", {"127.0.0.1"}, REFUSED_UNUSABLE),
    ("169.254.169.254", {"169.254.169.254"}, REFUSED_UNUSABLE),
    ("0.0.0.0", set(), REFUSED_UNUSABLE),
    ("0.1.2.3", set(), REFUSED_UNUSABLE),
    ("224.0.0.1", set(), REFUSED_UNUSABLE),
    ("240.0.0.1", set(), REFUSED_UNUSABLE),
    ("255.255.255.255", set(), REFUSED_UNUSABLE),
    ("10.0.0.5", set(), REFUSED_PRIVATE),
    ("192.168.1.1", {"192.168.1.2"}, REFUSED_PRIVATE),
    ("100.64.0.1", set(), REFUSED_PRIVATE),  # shared address space: not global either
    ("192.0.2.3", set(), REFUSED_PRIVATE),  # documentation ranges are not global
    ("10.0.0.5", {"10.0.0.5"}, None),  # the member's own network: it registered from there
    ("192.0.2.3", {"192.0.2.3"}, None),
    ("8.8.8.8", set(), None),
])
def test_relay_address_problem(address: str, registered: set[str], problem: str | None) -> None:
    assert relay_address_problem(address, registered) == problem


def test_guard_refuses_names_that_resolve_inside() -> None:
    async def check() -> None:
        answers = {"evil.example.org": ["127.0.0.1"], "meta.example.org": ["169.254.169.254"],
                   "lan.example.org": ["10.0.0.5"], "mixed.example.org": ["127.0.0.1", "10.0.0.5", "8.8.8.8"]}
        g = guard(answers)
        for host, cause in [("evil.example.org", REFUSED_UNUSABLE), ("meta.example.org", REFUSED_UNUSABLE),
                            ("lan.example.org", REFUSED_PRIVATE)]:
            with pytest.raises(RelayRefused, match="refused") as refused:
                await g.addresses(host, 80)
            assert refused.value.cause == cause and refused.value.host == host
        # Only the addresses that pass are the ones connected to.
        assert await g.addresses("mixed.example.org", 80) == ["8.8.8.8"]
        # Where the member registered from, a private address is its own network.
        assert await guard(answers, {"10.0.0.5"}).addresses("lan.example.org", 80) == ["10.0.0.5"]
        # Literals are checked the same way, without the resolver.
        with pytest.raises(RelayRefused):
            await g.addresses("10.0.0.5", 80)
        assert await guard({}, {"192.0.2.3"}).addresses("192.0.2.3", 7401) == ["192.0.2.3"]
        with pytest.raises(socket.gaierror):
            await g.addresses("unknown.example.org", 80)
    asyncio.run(check())


def test_guard_asks_for_the_members_addresses_when_it_connects() -> None:
    registered: set[str] = set()

    async def check() -> None:
        g = RelayGuard(lambda: frozenset(registered), resolver({"r.example.org": ["10.0.0.5"]}))
        with pytest.raises(RelayRefused):
            await g.addresses("r.example.org", 80)
        registered.add("10.0.0.5")  # the member registers from its LAN: the same guard now agrees
        assert await g.addresses("r.example.org", 80) == ["10.0.0.5"]
    asyncio.run(check())


def test_aiohttp_gets_the_checked_addresses_for_the_relay_host_only() -> None:
    async def check() -> None:
        resolve = _GuardedResolver("r.example.org", guard({"r.example.org": ["127.0.0.1", "192.0.2.3"]}, {"192.0.2.3"}))
        results = await resolve.resolve("R.example.org.", 7401)
        assert [(r["host"], r["port"], r["hostname"]) for r in results] == [("192.0.2.3", 7401, "R.example.org.")]
        # A proxy's host is the node's own environment's choice: resolved as the system does.
        proxy = await resolve.resolve("127.0.0.1", 3128)
        assert [r["host"] for r in proxy] == ["127.0.0.1"]
    asyncio.run(check())


# --- the client: refused, counted, logged once, never connected ----------------------------


class Sink:
    def link_up(self, link: Link) -> None: ...
    def link_down(self, link: Link, reason: str) -> None: ...
    def receive(self, link: Link, message: bytes | bytearray | memoryview) -> None: ...


@pytest.fixture(scope="module", autouse=True)
def _identities() -> None:
    identities()


def client(url: str, g: RelayGuard) -> RelayClient:
    return RelayClient(url, identities()[0], NETWORK, Sink(), relay="member-relay", guard=g)


async def listening() -> tuple[asyncio.Server, list[Any]]:
    """A loopback TCP server that notes every connection made to it."""
    accepted: list[Any] = []

    def note(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)
        writer.close()

    return await asyncio.start_server(note, "127.0.0.1", 0), accepted


def test_client_never_connects_where_the_name_leads_inside() -> None:
    """The session's resolver is the guard: the name resolves (in the test's resolver) to
    the loopback address a server listens on, and no connection reaches it. Without the
    guard, aiohttp would resolve the name itself (and, here without DNS, fail to)."""
    async def check() -> None:
        server, accepted = await listening()
        port = server.sockets[0].getsockname()[1]
        checked = guard({"relay.example.org": ["127.0.0.1"]})
        relay = client(f"http://relay.example.org:{port}", checked)
        connector = aiohttp.TCPConnector(resolver=_GuardedResolver("relay.example.org", checked), use_dns_cache=False)
        async with server, aiohttp.ClientSession(connector=connector) as session:
            with pytest.raises(RelayRefused, match="resolves to 127.0.0.1"):
                await relay._connect(session)
        assert accepted == []
    asyncio.run(check())


def test_client_refuses_an_unregistered_private_literal_before_connecting() -> None:
    async def check() -> None:
        relay = client("http://10.9.8.7:7401", guard({}, {"192.0.2.3"}))
        async with aiohttp.ClientSession() as session:
            with pytest.raises(RelayRefused, match="10.9.8.7 refused: private address"):
                await relay._connect(session)
    asyncio.run(check())


def test_client_run_counts_and_logs_a_refusal_once(caplog: pytest.LogCaptureFixture) -> None:
    async def check() -> None:
        relay = client("http://relay.example.org:7401", guard({"relay.example.org": ["169.254.169.254"]}))
        task = asyncio.create_task(relay.run())
        try:
            async with asyncio.timeout(10):
                while not relay.refused:
                    await asyncio.sleep(0.01)
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        status = relay.status()
        assert status["refused"] == {REFUSED_UNUSABLE: 1} and status["state"] == "unreachable"
        assert "resolves to 169.254.169.254" in status["error"]
        relay._refusals("relay.example.org", REFUSED_UNUSABLE, "again")  # the same cause again: not logged
    with caplog.at_level(logging.WARNING, logger="tunnelmesh.links.relay"):
        asyncio.run(check())
    refusals = [r for r in caplog.records if "refused" in r.getMessage() or r.getMessage() == "again"]
    assert len(refusals) == 1, [r.getMessage() for r in caplog.records]
