"""The NAT prober actor: where the node's WireGuard UDP port is seen from outside.

It sends STUN Binding requests (tunnelmesh.nat.stun) from the node's own WireGuard
port: through the data path's socket (`send`, the bind's `sendto`), its answers handed
back by the data path's demux (`register`, `DataPath.register_datagrams`), so the
reflexive address it learns is the one peers' packets reach. It asks the coordinator's
reflection service and the STUN servers configured (`servers()`, "host:port" each,
read at each check), RFC 5780's tests in their order (tunnelmesh.nat.classify): each
server at its primary address, the filtering tests at one server that can change its
address or port, then the mapping tests at the servers' other addresses.

`report` is the latest `NatReport`, replaced (never changed) after each check; the
callbacks it was given are called with it when what it says changed (behaviours,
reflexive addresses, error), not for a new time or round-trip alone. A check runs at
start, every `probe_interval`, when the machine's addresses or the server list change
(compared every ADDRESS_POLL seconds), and when asked (`CheckNat`, for `netcheck`).

Each request is retried on a bounded schedule (TRIES, doubling from FIRST_WAIT).
Answers are matched by transaction id; a STUN message no request waits for (late,
duplicate, forged) is dropped and counted in `unsolicited`, one that does not parse in
`malformed`; nothing is logged per packet.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from tunnelmesh.clock import SYSTEM_CLOCK, Clock
from tunnelmesh.nat.classify import (
    FILTER_MEMORY, Binding, Observations, can_change_address, can_change_port, classify, mapping_destinations,
    reflexive_addresses,
)
from tunnelmesh.nat.report import Address, NatReport, ServerResult

from .datapath import DatagramHandler
from .runtime import Actor

log = logging.getLogger("tunnelmesh.nat")

DEFAULT_PROBE_INTERVAL = 300.0
ADDRESS_POLL = 10.0  # seconds between comparisons of the machine's addresses and the server list
TRIES, FIRST_WAIT = 4, 0.25  # a request is sent at most 4 times, waiting 0.25, 0.5, 1, 2 s: 3.75 s at most
RESOLVE_TIMEOUT = 5.0
MAX_SERVERS = 8  # servers asked per check: each costs at most 5 requests of TRIES datagrams

#: The answer to one request: the response, where it came from, the round trip in ms.
Answer = tuple[Any, Address, float]


@dataclass(frozen=True, slots=True)
class CheckNat:
    """Ask: run a check now (after any running one) and reply with its NatReport."""


async def local_interfaces(tunnel: str) -> list[ipaddress.IPv4Interface]:
    """This machine's own IPv4 addresses (with their subnets) that a peer on a shared
    network could reach directly (its "local" candidates, so two nodes behind one NAT or
    on one LAN find each other; the subnets say which peers' candidates are on our LAN):
    global scope, not the tunnel's, not loopback or link-local. Empty if they cannot be
    read (logged)."""
    from pyroute2 import AsyncIPRoute  # lazily: ~0.1 s of imports that a start can skip
    from pyroute2.netlink.exceptions import NetlinkError

    try:
        async with AsyncIPRoute() as ipr:
            found = [(msg.get("IFA_LABEL"), msg.get("IFA_ADDRESS"), msg["prefixlen"])
                     async for msg in await ipr.addr("dump", family=socket.AF_INET) if msg["scope"] == 0]
    except (NetlinkError, OSError) as exc:
        log.warning("cannot list this machine's addresses for the coordinator: %s", exc)
        return []
    interfaces = []
    for label, text, prefix in found:
        address = ipaddress.ip_interface(f"{text}/{prefix}") if isinstance(text, str) else None
        if (isinstance(address, ipaddress.IPv4Interface) and label != tunnel
                and not (address.is_loopback or address.is_link_local)):
            interfaces.append(address)
    return interfaces


async def local_addresses(tunnel: str) -> list[str]:
    """The addresses of `local_interfaces` alone (what the NAT prober takes as its own)."""
    return [str(interface.ip) for interface in await local_interfaces(tunnel)]


class NatProber(Actor):
    name = "nat-prober"
    policy = "restart"

    def __init__(
        self, *, send: Callable[[bytes, Address], object], register: Callable[[DatagramHandler], None], port: int,
        servers: Callable[[], Sequence[str]], local_addresses: Callable[[], Awaitable[list[str]]],
        on_change: Sequence[Callable[[NatReport], None]] = (), probe_interval: float = DEFAULT_PROBE_INTERVAL,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        super().__init__()
        self.send = send
        self.port = port  # the WireGuard port the requests leave from
        self.servers = servers
        self.local_addresses = local_addresses
        self.on_change = list(on_change)
        self.probe_interval = probe_interval
        self.clock = clock
        self.report = NatReport()
        self.unsolicited = 0  # STUN messages no request waited for
        self.malformed = 0  # STUN-looking datagrams that a request waited for but did not parse
        self._pending: dict[bytes, asyncio.Future[Answer | str]] = {}
        self._checking = asyncio.Lock()
        # The filtering tests: their outcome, and when a mapping test last opened the NAT
        # towards a server's other address (the tests are not run again while it may hold).
        self._filter_tests: tuple[bool | None, bool | None] = (None, None)
        self._alternates_asked_at = float("-inf")
        self._local: frozenset[Address] = frozenset()  # the addresses of the last check
        self._scheduler: asyncio.Task[None] | None = None
        register(self._on_datagram)

    async def setup(self) -> None:
        if self._scheduler is None or self._scheduler.done():  # setup runs again after a restart
            self._scheduler = self.start_task(self._schedule(), name="schedule")

    async def handle(self, message: Any) -> Any:
        if isinstance(message, CheckNat):
            return await self.check()
        raise ValueError(f"unknown message {type(message).__name__}")

    async def _schedule(self) -> None:
        """Check at start, every probe_interval, and when the addresses or servers change.
        Without a server the addresses are not read (a netlink dump every ADDRESS_POLL on
        an idle static node): a check then only says that no server is known."""
        seen: tuple[list[str], list[str]] | None = None
        last = float("-inf")
        while True:
            servers = list(self.servers())
            now_seen = (sorted(await self.local_addresses()) if servers else [], servers)
            if now_seen != seen or self.clock.monotonic() - last >= self.probe_interval:
                if seen is not None and now_seen != seen:
                    log.info("nat: addresses or STUN servers changed: checking again")
                seen = now_seen
                await self.check()
                last = self.clock.monotonic()
            await asyncio.sleep(min(ADDRESS_POLL, self.probe_interval))

    # --- one check --------------------------------------------------------------------

    async def check(self) -> NatReport:
        async with self._checking:  # one at a time: reports replace each other in order
            report = await self._check()
            previous, self.report = self.report, report
        if _facts(report) != _facts(previous):
            if report.error:
                log.info("nat: %s", report.error)
            else:
                log.info("nat: mapping %s, filtering %s, seen as %s", report.mapping, report.filtering,
                         ", ".join(f"{host}:{port}" for host, port in report.reflexive) or "nothing")
            for callback in self.on_change:
                try:
                    callback(report)
                except Exception:  # one reader's failure must not keep the report from the others
                    log.exception("nat: a report callback failed")
        return report

    async def _check(self) -> NatReport:
        names = list(dict.fromkeys(self.servers()))[:MAX_SERVERS]
        checked_at = self.clock.wall()
        if not names:  # the addresses unread: a static node then never loads pyroute2
            return NatReport(checked_at, error="no STUN server known: the coordinator offers none (yet) "
                                               "and [nat] stun_servers is empty")
        local = frozenset((host, self.port) for host in await self.local_addresses())
        if local != self._local:  # another network: what opened the old NAT says nothing of this one
            self._local, self._alternates_asked_at = local, float("-inf")
        resolved = await asyncio.gather(*(self._resolve(name) for name in names))
        # Test I at the first server alone, then at the others at once, but not at the first's
        # other addresses (the coordinator lists its alternate too): a packet there would open
        # the NAT for the first's change-port answer before that test (see classify).
        first = await self._test_one(names[0], resolved[0])
        skip = set(_alternates(*first[2:]))
        rest = await asyncio.gather(*(self._test_one(name, address) for name, address in zip(names[1:], resolved[1:])
                                      if address not in skip))
        results = tuple(result for result, *_ in (first, *rest))
        asked = {binding.destination: binding for _, binding, *_ in (first, *rest) if binding is not None}
        testable = [(primary, other) for _, _, primary, other in (first, *rest) if primary and other]
        if not any(result.reflexive for result in results):
            return NatReport(checked_at, servers=results,
                             error="no STUN server answered over UDP (UDP blocked, or the servers are down)")
        # The filtering tests, before anything goes to an other address.
        if self.clock.monotonic() - self._alternates_asked_at >= FILTER_MEMORY:
            self._filter_tests = await self._filtering(testable)
        alternates = [address for address in dict.fromkeys(a for pair in testable for a in _alternates(*pair))
                      if address not in asked]
        if alternates:
            self._alternates_asked_at = self.clock.monotonic()
        for destination, answer in zip(alternates, await asyncio.gather(*(self._ask(d) for d in alternates))):
            asked[destination] = Binding(destination, None if isinstance(answer, str) else answer[0].mapped)
        bindings = tuple(asked.values())
        change_port, change_address = self._filter_tests
        mapping, filtering = classify(Observations(bindings, local, change_port, change_address))
        return NatReport(checked_at, mapping, filtering, reflexive_addresses(bindings), results)

    async def _test_one(self, name: str, address: Address | None
                        ) -> tuple[ServerResult, Binding | None, Address | None, Address | None]:
        """Test I at one server: its result, the binding, and (its address, its OTHER-ADDRESS)
        when it answered with one."""
        if address is None:
            return ServerResult(name, None, None, f"cannot resolve {name}"), None, None, None
        answer = await self._ask(address)
        if isinstance(answer, str):
            return ServerResult(name, None, None, answer), Binding(address, None), None, None
        response, _, rtt = answer
        return (ServerResult(name, response.mapped, round(rtt, 2)), Binding(address, response.mapped), address,
                _trusted_other(address, response.other))

    async def _filtering(self, testable: list[tuple[Address, Address]]) -> tuple[bool | None, bool | None]:
        """(change port answered, change IP and port answered) at the first server that can
        change both, else the first that can change its port; None where not asked."""
        both = [primary for primary, other in testable if can_change_address(primary, other)]
        ports = [primary for primary, other in testable if can_change_port(primary, other)]
        if both:
            port_answer, address_answer = await asyncio.gather(
                self._ask(both[0], change_port=True), self._ask(both[0], change_ip=True, change_port=True))
            return (_changed(both[0], port_answer, change_ip=False),
                    _changed(both[0], address_answer, change_ip=True))
        if ports:
            return _changed(ports[0], await self._ask(ports[0], change_port=True), change_ip=False), None
        return None, None

    async def _resolve(self, name: str) -> Address | None:
        host, _, port = name.rpartition(":")
        try:
            async with asyncio.timeout(RESOLVE_TIMEOUT):
                infos = await asyncio.get_running_loop().getaddrinfo(
                    host.strip("[]"), int(port), family=socket.AF_INET, type=socket.SOCK_DGRAM)
        except (OSError, ValueError, TimeoutError):
            return None
        return infos[0][4][:2] if infos else None

    async def _ask(self, destination: Address, *, change_ip: bool = False, change_port: bool = False) -> Answer | str:
        """One Binding request, retried: the answer, or why there is none."""
        from tunnelmesh.nat.stun import binding_request  # lazily, as in _on_datagram

        transaction_id, request = binding_request(change_ip=change_ip, change_port=change_port)
        answer: asyncio.Future[Answer | str] = asyncio.get_running_loop().create_future()
        self._pending[transaction_id] = answer
        wait = FIRST_WAIT
        try:
            for _ in range(TRIES):
                sent_at = self.clock.monotonic()
                try:
                    self.send(request, destination)
                except OSError as exc:
                    return f"cannot send: {exc.strerror or exc}"
                try:
                    async with asyncio.timeout(wait):
                        result = await asyncio.shield(answer)
                except TimeoutError:
                    wait *= 2
                    continue
                if isinstance(result, str):
                    return result
                response, source, received_at = result
                return response, source, (received_at - sent_at) * 1000  # the round trip of the last try
            return f"no answer to {TRIES} tries"
        finally:
            del self._pending[transaction_id]

    def _on_datagram(self, datagram: memoryview, source: Address) -> bool:
        """The data path's handler for non-WireGuard datagrams: takes STUN messages."""
        # lazily: aioice's codec, ~0.1 s of imports, only once a STUN server is asked or a
        # datagram that is not WireGuard's comes (rare: a dict look-up each time after)
        from tunnelmesh.nat.stun import TRANSACTION_ID_SIZE, StunError, looks_like_stun, parse_binding_response

        if not looks_like_stun(datagram):  # type: ignore[arg-type]  # slices and compares only
            return False
        answer = self._pending.get(bytes(datagram[8:8 + TRANSACTION_ID_SIZE]))
        if answer is None or answer.done():
            self.unsolicited += 1
            return True
        try:
            answer.set_result((parse_binding_response(bytes(datagram)), source, self.clock.monotonic()))
        except StunError as exc:  # an error response, or garbage with a guessed id
            self.malformed += 1
            answer.set_result(f"bad answer: {exc}"[:200])
        return True


def _changed(primary: Address, answer: Answer | str, *, change_ip: bool) -> bool | None:
    """Whether a change request was answered from a changed address; None when the server
    answered from the one asked (it does not change: the test says nothing)."""
    if isinstance(answer, str):
        return False if answer.startswith("no answer") else None
    source = answer[1]
    moved = source[1] != primary[1] and (source[0] != primary[0] or not change_ip)
    return True if moved else None


def _trusted_other(server: Address, other: Address | None) -> Address | None:
    """A server's OTHER-ADDRESS if requests may go there (else None: no change tests there):
    the server's word must not aim the prober at this machine or its network's internal
    services, so a reachable unicast IPv4 address, or loopback from a server on loopback."""
    from tunnelmesh.membership import reachable_ipv4  # lazily: membership is coordinator mode's

    if other is None or reachable_ipv4(other[0]):
        return other
    # Both are IP addresses: the server's from resolving its name, the other from the answer.
    return other if all(ipaddress.ip_address(host).is_loopback for host in (server[0], other[0])) else None


def _alternates(primary: Address | None, other: Address | None) -> tuple[Address, ...]:
    return mapping_destinations(primary, other) if primary is not None else ()


def _facts(report: NatReport) -> tuple[Any, ...]:
    return report.mapping, report.filtering, report.reflexive, report.error
