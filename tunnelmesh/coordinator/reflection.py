"""The coordinator's STUN reflection service (docs/coordinator.md, "STUN reflection"): a
UDP Binding responder that tells a node the address and port its datagrams come from
(its reflexive address), for the NAT prober. The embedded and the standalone coordinator
start it alike.

Sockets. `primary` (default: the coordinator's own address and port number, over UDP) and
`alternate` (default: the same address, port + 1) give RFC 5780's change requests
somewhere to answer from. With both on one address there are two sockets and a request
may ask for a change of port. With two addresses (both given, neither the wildcard) the
four address and port pairs are bound, so a change of address, port or both can be
answered. A socket on the wildcard address learns which of the host's addresses a
request was sent to (IP_PKTINFO / IPV6_PKTINFO) and answers from that same address.

Per datagram, in order (each drop is counted by its reason, in `dropped`):
1. larger than MAX_REQUEST: "oversized";
2. no STUN header (tunnelmesh.nat.stun.looks_like_stun): "not-stun". These two cost a
   length and a few bytes' comparison, and take no token: a flood of garbage does not
   use up the tokens of those who send requests;
3. the source's bucket and the overall one (tunnelmesh.ratelimit: PER_SOURCE_RATE under
   OVERALL_RATE, at most MAX_SOURCES sources remembered): "rate-limited". Everything
   that costs more (parsing, answering) comes after it;
4. anything but a Binding request tunnelmesh.nat.stun accepts: "not-binding-request";
5. a change of address or port it has no socket for: "cannot-change";
6. an answer would be larger than the request (tunnelmesh.nat.stun: no amplification):
   "undersized";
7. the socket's send buffer full or the send refused: "send-failed".
Nothing else is ever sent: no error responses. The answer carries the transaction id,
the source address, and this service's own addresses (RESPONSE-ORIGIN, OTHER-ADDRESS).

OTHER-ADDRESS says where a change request is answered from: the other address if there
is one (else this one) and the other port. A client compares it with the address it
asked to know which changes this service can make.

Nodes find the service in the /v1/register reply: "stun": a list of {"port": N} (send to
the coordinator URL's host) or {"host": IP, "port": N} (an address the `stun` or
`stun_alternate` setting named), the primary first; `advertised` writes it and
`stun_servers` reads it. An address taken from where the coordinator serves is never
advertised: behind a port-forward it is a private one, behind a reverse proxy loopback.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import socket
import struct
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from tunnelmesh.fields import FieldError, parse_endpoint, shown
from tunnelmesh.membership.peermap import reachable_ipv4
from tunnelmesh.nat.stun import StunError, binding_response, looks_like_stun, parse_binding_request
from tunnelmesh.ratelimit import Rate, RateLimiter

log = logging.getLogger("tunnelmesh.coordinator.reflection")

Address = tuple[str, int]

#: A prober asks a few servers a few times per check (with retries): 20 at once, then 5 a second.
PER_SOURCE_RATE = Rate(per_second=5.0, burst=20)
#: What the whole service answers at most, whoever sends (spoofed sources included).
OVERALL_RATE = Rate(per_second=200.0, burst=200)
MAX_SOURCES = 4096
#: Larger than any Binding request a prober sends (tunnelmesh.nat.stun.REQUEST_SIZE is 100).
MAX_REQUEST = 548
#: Datagrams read per wake-up of one socket, so that a flooded socket yields to the loop.
BATCH = 64
_IP_PKTINFO = 8  # linux/in.h; Python 3.11's socket module lacks the constant
_DROP_REASONS = ("oversized", "not-stun", "rate-limited", "not-binding-request", "cannot-change", "undersized",
                 "send-failed")


@dataclass(frozen=True, slots=True)
class ReflectionAddresses:
    """Where the service listens: `alternate` None serves no change requests."""

    primary: Address
    alternate: Address | None
    #: The addresses the settings named (`stun`, `stun_alternate`): advertised with their
    #: host. Others are advertised by port alone (nodes send to the coordinator URL's host).
    named: frozenset[str] = frozenset()
    #: The alternate is the default (port + 1), not a setting: if that port is taken the
    #: service runs without it (a warning), rather than not at all.
    alternate_optional: bool = False


class StunSettingError(FieldError):
    """A `stun` or `stun_alternate` setting that is wrong; `key` says which."""

    def __init__(self, key: str, detail: str) -> None:
        super().__init__(f"{key} {detail}")
        self.key = key
        self.detail = detail


def reflection_addresses(stun: object, alternate: object, serve: Address | None) -> ReflectionAddresses | None:
    """The `stun` and `stun_alternate` settings (config keys, or the command line's flags;
    None when not given) of a coordinator serving on `serve` (None: a node that serves
    none): None when `stun` is false. StunSettingError naming the setting that is wrong."""
    if serve is None:
        for key, value in (("stun", stun), ("stun_alternate", alternate)):
            if value is not None:
                raise StunSettingError(key, "is for the embedded coordinator (needs serve)")
        return None
    if stun is False:
        if alternate is not None:
            raise StunSettingError("stun_alternate", "needs stun (it is false)")
        return None
    named: set[str] = set()
    if stun is None or stun is True:  # the coordinator's own address (a host name: every address) and port
        primary = serve if _is_ip(serve[0]) else ("0.0.0.0", serve[1])
    else:
        primary = _ip_endpoint(stun, "stun")
        named.add(primary[0])
    if alternate is False:
        return ReflectionAddresses(primary, None, frozenset(named))
    if alternate is None:
        if primary[1] == 65535:
            raise StunSettingError("stun", "on port 65535 leaves no port + 1 for the alternate: set stun_alternate")
        other = (primary[0], primary[1] + 1 if primary[1] else 0)
    else:
        other = _ip_endpoint(alternate, "stun_alternate")
        named.add(other[0])
    first, second = ipaddress.ip_address(primary[0]), ipaddress.ip_address(other[0])
    if first.version != second.version:
        raise StunSettingError("stun_alternate", "must be of the same address family as stun")
    if other == primary and primary[1] != 0:
        raise StunSettingError("stun_alternate", "must differ from stun (in its port, its address or both)")
    if first != second and (first.is_unspecified or second.is_unspecified):
        raise StunSettingError("stun_alternate", "on another address than stun needs both on specific addresses "
                               "(not 0.0.0.0 or ::)")
    return ReflectionAddresses(primary, other, frozenset(named), alternate_optional=alternate is None)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _is_ipv4(host: str) -> bool:
    return _is_ip(host) and ipaddress.ip_address(host).version == 4


def _ip_endpoint(value: object, key: str) -> Address:
    example = "\"192.0.2.1:3478\""
    if not isinstance(value, str):
        raise StunSettingError(key, f"must be \"IP:port\" or false, e.g. {example}")
    try:
        host, port = parse_endpoint(value)
    except FieldError as exc:
        raise StunSettingError(key, f"{shown(value)}: {exc}, e.g. {example}") from None
    if not _is_ip(host):
        raise StunSettingError(key, f"{shown(value)}: the host must be an IP address, e.g. {example}")
    return host, port


class _Socket:
    """One bound UDP socket of the service; `ip` None on the wildcard address."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        host, self.port = sock.getsockname()[:2]
        self.ip: str | None = None if ipaddress.ip_address(host).is_unspecified else host
        self.v6 = sock.family == socket.AF_INET6

    def send(self, data: bytes, destination: Address, source_ip: str) -> None:
        """Send from `source_ip` (which matters on the wildcard address)."""
        if self.v6:  # a dual-stack socket speaks IPv4 as IPv4-mapped IPv6 addresses
            destination, source_ip = (_as_ipv6(destination[0]), destination[1]), _as_ipv6(source_ip)
        packed = ipaddress.ip_address(source_ip).packed
        if self.v6:
            pktinfo = (socket.IPPROTO_IPV6, socket.IPV6_PKTINFO, struct.pack("=16sI", packed, 0))
        else:
            pktinfo = (socket.IPPROTO_IP, _IP_PKTINFO, struct.pack("=i4s4s", 0, packed, bytes(4)))
        self.sock.sendmsg([data], [pktinfo], 0, destination)


def _open(address: Address) -> _Socket:
    host, port = address
    family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.setblocking(False)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, 1)
        else:
            sock.setsockopt(socket.IPPROTO_IP, _IP_PKTINFO, 1)
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"UDP {host}:{port}: {exc.strerror}") from None
    return _Socket(sock)


def _as_ipv6(host: str) -> str:
    ip = ipaddress.ip_address(host)
    return f"::ffff:{ip}" if ip.version == 4 else host


def _unmapped(host: str) -> str:
    """An IPv4-mapped IPv6 address as IPv4 (what the client sent from or to), others as they are."""
    ip = ipaddress.ip_address(host)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


def _destination(ancillary: list[tuple[int, int, bytes]], fallback: str) -> str:
    """The address a datagram was sent to, from its PKTINFO (`fallback` without one)."""
    for level, kind, data in ancillary:
        if level == socket.IPPROTO_IP and kind == _IP_PKTINFO and len(data) >= 12:
            return str(ipaddress.IPv4Address(data[8:12]))
        if level == socket.IPPROTO_IPV6 and kind == socket.IPV6_PKTINFO and len(data) >= 16:
            return _unmapped(str(ipaddress.IPv6Address(data[:16])))
    return fallback


class Reflection:
    """The service on `addresses`; `start` binds its sockets, `close` closes them.
    `answered` counts answers, `dropped` the datagrams not answered by reason."""

    def __init__(self, addresses: ReflectionAddresses, *, limiter: RateLimiter | None = None,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.addresses = addresses
        self.monotonic = monotonic
        if limiter is None:
            limiter = RateLimiter(PER_SOURCE_RATE, OVERALL_RATE, max_sources=MAX_SOURCES, now=monotonic())
        self.limiter = limiter
        self.answered = 0
        self.dropped: Counter[str] = Counter(dict.fromkeys(_DROP_REASONS, 0))
        self._sockets: dict[tuple[str | None, int], _Socket] = {}
        self._ips: tuple[str | None, ...] = ()  # the addresses bound (two: a change of address is possible)
        self._ports: tuple[int, ...] = ()  # the ports bound on each (two: a change of port is possible)
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> None:
        """Bind every socket (OSError, with nothing left open, when one cannot be) and serve."""
        primary, alternate = self.addresses.primary, self.addresses.alternate
        self._loop = asyncio.get_running_loop()
        try:
            ports = [self._add(_open(primary))]
            # port 0 asks for ephemeral ports: the alternate's is then another one
            if alternate is not None and (alternate[1] != primary[1] or alternate[1] == 0):
                try:
                    ports.append(self._add(_open((primary[0], alternate[1]))))
                except OSError as exc:
                    if not self.addresses.alternate_optional:
                        raise
                    log.warning("STUN reflection without its alternate socket (%s): nodes' NAT probers cannot "
                                "tell how their NATs map ports; set a free one in [coordinator] stun_alternate "
                                "(tunnelmesh coordinator --stun-alternate)", exc.strerror)
                    alternate = None
            if alternate is not None and alternate[0] != primary[0]:  # the other address, on each port
                for port in ports:
                    self._add(_open((alternate[0], port)))
        except OSError:
            self.close()
            raise
        self._ips = tuple(dict.fromkeys(ip for ip, _ in self._sockets))
        self._ports = tuple(ports)
        for bound in self._sockets.values():
            self._loop.add_reader(bound.sock.fileno(), self._readable, bound)
        log.info("STUN reflection on UDP %s", ", ".join(f"{ip or '*'}:{port}" for ip, port in self._sockets))

    def _add(self, bound: _Socket) -> int:
        self._sockets[(bound.ip, bound.port)] = bound
        return bound.port

    def close(self) -> None:
        for bound in self._sockets.values():
            if self._loop is not None:
                self._loop.remove_reader(bound.sock.fileno())
            bound.sock.close()
        self._sockets.clear()

    @property
    def bound(self) -> list[Address]:
        """The (address, port) of each socket, the wildcard as the family's unspecified address."""
        return [(bound.sock.getsockname()[0], port) for (_, port), bound in self._sockets.items()]

    def advertised(self) -> list[dict[str, Any]]:
        """The register reply's "stun": the primary socket, then the other address and port;
        with its host only if a setting named it (the module's docstring says why)."""
        servers = [next(iter(self._sockets))]
        if len(self._sockets) > 1:
            servers.append((self._ips[-1], self._ports[-1]))
        named = self.addresses.named
        return [{"host": ip, "port": port} if ip in named else {"port": port} for ip, port in servers]

    def _readable(self, bound: _Socket) -> None:
        space = socket.CMSG_SPACE(20)  # in6_pktinfo, the larger of the two
        for _ in range(BATCH):
            try:
                data, ancillary, flags, source = bound.sock.recvmsg(MAX_REQUEST, space)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # an ICMP error for an earlier answer, say: nothing to do with this read
                log.debug("STUN reflection: receive: %s", exc)
                continue
            self._handle(bound, data, bool(flags & socket.MSG_TRUNC), (_unmapped(source[0]), source[1]),
                         _destination(ancillary, bound.sock.getsockname()[0]))

    def _handle(self, received: _Socket, data: bytes, truncated: bool, source: Address, here: str) -> None:
        if truncated:
            self.dropped["oversized"] += 1
            return
        if not looks_like_stun(data):
            self.dropped["not-stun"] += 1
            return
        if self.limiter.limit(source[0], self.monotonic()) is not None:
            self.dropped["rate-limited"] += 1
            return
        try:
            request = parse_binding_request(data)
        except StunError:
            self.dropped["not-binding-request"] += 1
            return
        other_ip = next((ip for ip in self._ips if ip is not None and ip != here), None)
        other_port = next((port for port in self._ports if port != received.port), None)
        answering = self._sockets.get((other_ip if request.change_ip else received.ip,
                                       other_port if request.change_port else received.port))
        if (request.change_ip and other_ip is None) or (request.change_port and other_port is None) \
                or answering is None:
            self.dropped["cannot-change"] += 1
            return
        origin = (answering.ip or here, answering.port)
        other = (other_ip or here, other_port or received.port) if other_ip or other_port else None
        try:
            answer = binding_response(request, source, origin=origin, other=other)
        except StunError:
            self.dropped["undersized"] += 1
            return
        try:
            answering.send(answer, source, origin[0])
        except OSError as exc:
            self.dropped["send-failed"] += 1
            if exc.errno not in (errno.EAGAIN, errno.ENOBUFS):
                log.debug("STUN reflection: send to %s:%d: %s", *source, exc)
            return
        self.answered += 1


#: The reflection service beside a coordinator app, when it runs one (for the register
#: reply and the metrics).
REFLECTION = web.AppKey("reflection", Reflection)


async def start_reflection(app: web.Application, addresses: ReflectionAddresses) -> Reflection:
    """Start the service on `addresses` for `app` (before `app` is served: its register
    reply and metrics find it there). OSError when a socket cannot be bound."""
    reflection = Reflection(addresses)
    await reflection.start()
    app[REFLECTION] = reflection
    return reflection


MAX_ADVERTISED = 4


def stun_servers(value: object, coordinator_host: str) -> tuple[Address, ...]:
    """A register reply's "stun" as (host, port) pairs to send Binding requests to: an
    entry without a host is at `coordinator_host` (the host of the coordinator URL).
    Entries that are not well formed are left out (a coordinator's word, checked, never
    trusted to be sane), and so are hosts the prober cannot or must not use: it speaks IPv4
    only, and a host the coordinator names must pass `reachable_ipv4` (not loopback,
    link-local, ...: a coordinator's word must not aim nodes at their own machine)."""
    if not isinstance(value, list):
        return ()
    servers: list[Address] = []
    for entry in value[:MAX_ADVERTISED]:
        if not isinstance(entry, dict):
            continue
        port, host = entry.get("port"), entry.get("host", coordinator_host)
        if type(port) is not int or not 1 <= port <= 65535 or not isinstance(host, str) or not host:
            continue
        if not (reachable_ipv4(host) if "host" in entry else not _is_ip(host) or _is_ipv4(host)):
            continue
        servers.append((host, port))
    return tuple(dict.fromkeys(servers))
