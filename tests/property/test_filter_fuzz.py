"""Property tests for the packet filter: arbitrary bytes never crash the parser nor pass
unasked; the compiled lookup agrees with a plain reading of the rules; the flow table
keeps its bound; replies pass and unsolicited packets do not; a swap keeps exactly
the flows the new rules allow; an ICMP error passes only when related to a flow."""

from __future__ import annotations

import ipaddress

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.support.ippackets import (
    ACK,
    ALICE,
    HOME,
    SYN,
    icmp,
    icmp_error,
    ipv4,
    ipv6,
    member,
    tcp,
    udp,
)
from tunnelmesh.filter import (
    EMPTY_POLICY,
    Member,
    PacketFilter,
    Policy,
    Rule,
    Selector,
    compile_rules,
)
from tunnelmesh.filter import packet as p
from tunnelmesh.filter.compiled import Compiled
from tunnelmesh.filter.policy import ALL_PORTS, EVERYONE, PROTOCOLS

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

BOB = member("bob", 3, ("10.2.0.0/16",))
CAROL = member("carol", 4, ("fd00:9::/32",))
DAVE = member("dave", 5, ("100.64.0.0/24", "10.0.0.0/8"))  # covers other members' addresses
PEERS = (ALICE, BOB, CAROL, DAVE)
NAMES = ("home", "alice", "bob", "carol", "dave", "erin")
CIDRS = ("10.2.5.0/24", "10.2.5.128/25", "10.2.0.0/16", "10.0.0.0/8", "100.64.0.2/32", "100.64.0.0/24",
         "0.0.0.0/0", "fd00::/64", "fd00::3/128", "fd00:9:1::/48", "::/0")
SOURCES4 = ("100.64.0.1", "100.64.0.2", "100.64.0.3", "100.64.0.4", "100.64.0.5", "100.64.0.77", "10.2.5.9",
            "10.2.5.200", "10.2.9.1", "10.9.9.9", "192.0.2.1")
SOURCES6 = ("fd00::1", "fd00::2", "fd00::3", "fd00::4", "fd00::5", "fd00::99", "fd00:9:1::1", "fd00:9:2::1", "fd01::1")
DESTINATIONS4 = ("100.64.0.1", "10.1.3.4", "100.64.0.2")
DESTINATIONS6 = ("fd00::1", "fd00::2")
PORTS = (0, 22, 53, 80, 443, 8000, 8080, 65535)

names = st.sampled_from(NAMES)
selector = st.one_of(
    st.just(EVERYONE), names.map(lambda n: Selector("member", n)),
    st.sampled_from(("admins", "ops", "ghost")).map(lambda n: Selector("group", n)),
    st.sampled_from(("web", "db")).map(lambda n: Selector("tag", n)),
    st.sampled_from(CIDRS).map(lambda c: Selector("cidr", network=ipaddress.ip_network(c))),
)
target = st.one_of(st.just(EVERYONE), names.map(lambda n: Selector("member", n)),
                   st.sampled_from(("admins", "ops")).map(lambda n: Selector("group", n)),
                   st.sampled_from(("web", "db")).map(lambda n: Selector("tag", n)))
span = st.one_of(st.sampled_from(PORTS).map(lambda x: (x, x)),
                 st.tuples(st.sampled_from(PORTS), st.sampled_from(PORTS)).map(lambda t: (min(t), max(t))))


@st.composite
def rules(draw: st.DrawFn, origin: str) -> Rule:
    protocols = frozenset(draw(st.sets(st.sampled_from(PROTOCOLS), min_size=1)))
    ported = bool(protocols & {"tcp", "udp"})
    ports = tuple(sorted(set(draw(st.lists(span, min_size=1, max_size=3))))) if ported else ()
    if len(protocols) == 4:
        ports = ALL_PORTS
    targets = tuple(draw(st.lists(target, min_size=1, max_size=2))) if origin == "network" else (EVERYONE,)
    return Rule(tuple(draw(st.lists(selector, min_size=1, max_size=3))), targets, protocols, ports, origin)


member_sets = st.dictionaries(st.sampled_from(("admins", "ops", "web", "db")), st.frozensets(names, max_size=3))


@st.composite
def policies(draw: st.DrawFn) -> tuple[Policy, tuple[Rule, ...]]:
    sets = draw(member_sets)
    groups = {k: v for k, v in sets.items() if k in ("admins", "ops")}
    tags = {k: v for k, v in sets.items() if k in ("web", "db")}
    network = Policy(groups, tags, tuple(draw(st.lists(rules("network"), max_size=6))))
    return network, tuple(draw(st.lists(rules("node"), max_size=2)))


@st.composite
def packets(draw: st.DrawFn) -> tuple[Member, int, str, str, str, int, int]:
    """(peer, version, source, destination, protocol, destination port, ICMP type)."""
    peer = draw(st.sampled_from(PEERS))
    version = draw(st.sampled_from((4, 6)))
    source = draw(st.sampled_from(SOURCES4 if version == 4 else SOURCES6))
    destination = draw(st.sampled_from(DESTINATIONS4 if version == 4 else DESTINATIONS6))
    proto = draw(st.sampled_from(("tcp", "udp", "icmp" if version == 4 else "icmpv6")))
    echo = (8, 0) if version == 4 else (128, 129)
    return peer, version, source, destination, proto, draw(st.sampled_from(PORTS)), draw(st.sampled_from(echo))


def build(version: int, source: str, destination: str, proto: str, port: int, kind: int, flags: int = ACK) -> bytearray:
    number = {"tcp": p.TCP, "udp": p.UDP, "icmp": p.ICMP, "icmpv6": p.ICMPV6}[proto]
    payload = tcp(40000, port, flags) if proto == "tcp" else udp(40000, port) if proto == "udp" else icmp(kind)
    return (ipv4 if version == 4 else ipv6)(source, destination, number, payload)


def reference(network: Policy, node: tuple[Rule, ...], peer: Member, version: int, source: str, destination: str,
              proto: str, port: int, kind: int) -> bool:
    """The rules read plainly, one packet at a time: anti-spoofing, then any rule."""
    src, dst = ipaddress.ip_address(source), ipaddress.ip_address(destination)
    if dst not in (HOME.ipv4, HOME.ipv6) and not any(dst in r for r in HOME.routes if r.version == version):
        return False
    others = {a for m in (HOME, *PEERS) if m is not peer for a in (m.ipv4, m.ipv6)}
    if src not in (peer.ipv4, peer.ipv6) and (src in others or not any(
            src in r for r in peer.routes if r.version == version)):
        return False

    def covers(s: Selector, who: str) -> bool:
        if s.kind == "any":
            return True
        if s.kind == "member":
            return s.name == who
        if s.kind == "cidr":
            return s.network is not None and s.network.version == version and src in s.network
        return who in (network.groups if s.kind == "group" else network.tags).get(s.name, ())

    for rule in node + tuple(r for r in network.rules if any(covers(t, HOME.name) for t in r.targets)):
        if proto not in rule.protocols:
            continue
        if proto in ("tcp", "udp") and not any(lo <= port <= hi for lo, hi in rule.ports):
            continue
        if proto in ("icmp", "icmpv6") and kind not in (8, 128):
            continue
        if any(s.kind != "cidr" and covers(s, peer.name) or s.kind == "cidr" and covers(s, "") for s in rule.sources):
            return True
    return False


def compiled(network: Policy, node: tuple[Rule, ...]) -> Compiled:
    return compile_rules(network, node, HOME, PEERS)


@st.composite
def mutated_packets(draw: st.DrawFn) -> tuple[bytes, Member]:
    """A well-formed packet from a peer's own address to this node (so the rules decide
    and may let it pass), then maybe a few bytes overwritten or cut short: both
    branches of the check below run."""
    peer = draw(st.sampled_from(PEERS))
    version = draw(st.sampled_from((4, 6)))
    source = str(peer.ipv4 if version == 4 else peer.ipv6)
    destination = str(HOME.ipv4 if version == 4 else HOME.ipv6)
    proto = draw(st.sampled_from(("tcp", "udp", "icmp" if version == 4 else "icmpv6")))
    kind = draw(st.sampled_from((8, 0) if version == 4 else (128, 129)))
    flags = draw(st.sampled_from((SYN, ACK, SYN | ACK, 0x04, 0x01)))
    buf = build(version, source, destination, proto, draw(st.sampled_from(PORTS)), kind, flags)
    if draw(st.booleans()):
        for _ in range(draw(st.integers(1, 3))):
            buf[draw(st.integers(0, len(buf) - 1))] = draw(st.integers(0, 255))
        if draw(st.booleans()):
            del buf[draw(st.integers(0, len(buf))):]
    return bytes(buf), peer


@SETTINGS
@given(st.one_of(st.tuples(st.binary(max_size=120), st.sampled_from(PEERS)), mutated_packets()), policies())
def test_arbitrary_bytes_never_crash_and_pass_only_if_a_rule_allows(case: tuple[bytes, Member],
                                                                    policy: tuple[Policy, tuple[Rule, ...]]) -> None:
    data, peer = case
    f = PacketFilter(compiled(*policy))
    buf = bytearray(data)
    headers = p.Headers()
    reason = p.parse(buf, len(buf), headers)
    assert reason is None or reason in p.PARSER_DROPS
    if f.inbound(peer.key, buf, len(buf), 0.0):
        assert reason is None
        version, proto = headers.version, {p.TCP: "tcp", p.UDP: "udp", p.ICMP: "icmp", p.ICMPV6: "icmpv6"}[headers.proto]
        address = ipaddress.IPv4Address if version == 4 else ipaddress.IPv6Address
        assert reference(*policy, peer, version, str(address(headers.src)), str(address(headers.dst)), proto,
                         headers.dport, headers.icmp_type)
    f.outbound(peer.key, buf, len(buf), 0.0)  # never raises either


@SETTINGS
@given(policies(), st.lists(packets(), min_size=1, max_size=8))
def test_compiled_lookup_agrees_with_the_plain_reading(policy: tuple[Policy, tuple[Rule, ...]],
                                                       cases: list[tuple[Member, int, str, str, str, int, int]]) -> None:
    f = PacketFilter(compiled(*policy))
    for peer, version, source, destination, proto, port, kind in cases:
        packet = build(version, source, destination, proto, port, kind)
        expected = reference(*policy, peer, version, source, destination, proto, port, kind)
        assert f.inbound(peer.key, packet, len(packet), 0.0) is expected, (peer.name, source, destination, proto, port)
        if proto in ("tcp", "udp"):  # `filter test` asks about the peer's mesh IPv4 address
            assert f.explain(peer.key, proto, port)[0] is reference(*policy, peer, 4, str(peer.ipv4), str(HOME.ipv4),
                                                                     proto, port, kind)


@SETTINGS
@given(st.integers(1, 20), st.lists(st.tuples(st.integers(0, 50), st.floats(0, 40), st.sampled_from(("udp", "tcp")),
                                              st.booleans()), max_size=200))
def test_flow_table_never_exceeds_its_bound(limit: int, steps: list[tuple[int, float, str, bool]]) -> None:
    f = PacketFilter(compiled(EMPTY_POLICY, ()), max_flows=limit)
    now = 0.0
    for port, dt, proto, reply in steps:
        now += dt
        out = build(4, "100.64.0.1", "100.64.0.2", proto, 1000 + port, 0, SYN)
        f.outbound(ALICE.key, out, len(out), now)
        if reply:
            back = build(4, "100.64.0.2", "100.64.0.1", proto, 0, 0, SYN | ACK)
            f.inbound(ALICE.key, back, len(back), now)
        f.expire(now)
        table = f.flows
        assert len(table) <= limit
        slotted = [flow for bucket in table._wheel.values() for flow in bucket]
        assert sorted(map(id, slotted)) == sorted(map(id, table.flows.values()))  # each flow in one slot


@SETTINGS
@given(st.lists(st.tuples(st.sampled_from(("tcp", "udp", "icmp", "icmpv6")), st.integers(1, 65535),
                          st.integers(1, 65535)), min_size=1, max_size=20), st.floats(0, 25))
def test_replies_pass_and_unsolicited_packets_do_not(flows: list[tuple[str, int, int]], later: float) -> None:
    f = PacketFilter(compiled(EMPTY_POLICY, ()))
    opened = set()
    for proto, local, remote in flows:
        v6 = proto == "icmpv6"
        home, peer = ("fd00::1", "fd00::2") if v6 else ("100.64.0.1", "100.64.0.2")
        number = {"tcp": p.TCP, "udp": p.UDP, "icmp": p.ICMP, "icmpv6": p.ICMPV6}[proto]
        out = {"tcp": tcp(local, remote, SYN), "udp": udp(local, remote),
               "icmp": icmp(8, local), "icmpv6": icmp(128, local)}[proto]
        back = {"tcp": tcp(remote, local, SYN | ACK), "udp": udp(remote, local),
                "icmp": icmp(0, local), "icmpv6": icmp(129, local)}[proto]
        stray = {"tcp": tcp(remote, local ^ 1, SYN | ACK), "udp": udp(remote, local ^ 1),
                 "icmp": icmp(0, local ^ 1), "icmpv6": icmp(129, local ^ 1)}[proto]
        make = ipv6 if v6 else ipv4
        request = make(home, peer, number, out)
        assert f.outbound(ALICE.key, request, len(request), 0.0)
        opened.add((proto, local))
        reply = make(peer, home, number, back)
        assert f.inbound(ALICE.key, reply, len(reply), later)
        if (proto, local ^ 1) not in opened:
            unsolicited = make(peer, home, number, stray)
            assert not f.inbound(ALICE.key, unsolicited, len(unsolicited), later)


@SETTINGS
@given(policies(), policies(), st.lists(st.sampled_from(PORTS), min_size=1, max_size=6))
def test_swap_keeps_the_flows_still_allowed_and_drops_the_others(before: tuple[Policy, tuple[Rule, ...]],
                                                                 after: tuple[Policy, tuple[Rule, ...]],
                                                                 ports: list[int]) -> None:
    f = PacketFilter(compiled(*before))
    admitted = [port for port in ports if f.inbound(ALICE.key, build(4, "100.64.0.2", "100.64.0.1", "udp", port, 0),
                                                    36, 0.0)]
    f.swap(compiled(*after), 1.0)
    for port in admitted:
        allowed = reference(*after, ALICE, 4, "100.64.0.2", "100.64.0.1", "udp", port, 0)
        answer = build(4, "100.64.0.1", "100.64.0.2", "udp", 0, 0)  # from `port` back to 40000
        answer[20:24] = port.to_bytes(2, "big") + (40000).to_bytes(2, "big")
        assert f.outbound(ALICE.key, answer, len(answer), 2.0) is allowed
        assert f.inbound(ALICE.key, build(4, "100.64.0.2", "100.64.0.1", "udp", port, 0), 36, 2.0) is allowed


# -- RELATED: ICMP errors. This node holds the flows below; errors quoting packets
# made of these addresses and ports (often a flow's own) go either way, maybe mutated.

ADDRESSES = {4: ("100.64.0.1", "10.1.2.3", "100.64.0.2", "100.64.0.3", "10.2.3.4", "10.2.0.1"),
             6: ("fd00::1", "fd00::2", "fd00::3", "fd00:9::80", "fd00:9::1")}
ERROR_PORTS = (5000, 53, 40000, 443, 42)
#: (peer, version, protocol, local, remote, local port, remote port) as the filter
#: keys them; the first opened by this node, the last by the peer (tcp/443 allowed).
FLOWS = ((ALICE, 4, "udp", "100.64.0.1", "100.64.0.2", 5000, 53), (ALICE, 6, "udp", "fd00::1", "fd00::2", 5000, 53),
         (BOB, 4, "tcp", "100.64.0.1", "10.2.3.4", 5000, 443), (CAROL, 6, "tcp", "fd00::1", "fd00:9::80", 5000, 443),
         (ALICE, 4, "icmp", "100.64.0.1", "100.64.0.2", 42, 42), (ALICE, 6, "icmpv6", "fd00::1", "fd00::2", 42, 42),
         (ALICE, 4, "tcp", "10.1.2.3", "100.64.0.2", 443, 40000), (CAROL, 6, "tcp", "fd00::1", "fd00:9::1", 443, 40000))
ERRORS = {4: (3, 11, 12), 6: (1, 2, 3, 4)}


def quoted_packet(version: int, proto: str, source: str, destination: str, sport: int, dport: int,
                  request: bool) -> bytearray:
    number = {"tcp": p.TCP, "udp": p.UDP, "icmp": p.ICMP, "icmpv6": p.ICMPV6}[proto]
    kind = (8 if request else 0) if version == 4 else (128 if request else 129)
    payload = tcp(sport, dport, SYN) if proto == "tcp" else udp(sport, dport) if proto == "udp" else icmp(kind, sport)
    return (ipv4 if version == 4 else ipv6)(source, destination, number, payload)


def related_reference(inbound: bool, peer: Member, version: int, source: str, destination: str, proto: str,
                      quoted_source: str, quoted_destination: str, sport: int, dport: int, request: bool) -> bool:
    """The RELATED rule read plainly: the outer addresses pass the direction's checks,
    the error goes back to the quoted packet's source, which belongs to a flow."""
    src, dst = ipaddress.ip_address(source), ipaddress.ip_address(destination)
    home, remote = (dst, src) if inbound else (src, dst)
    if home not in (HOME.ipv4, HOME.ipv6) and not any(home in r for r in HOME.routes if r.version == version):
        return False
    if not spoken_by(peer, version, remote) or destination != quoted_source:
        return False
    if proto in ("icmp", "icmpv6") and request is not inbound:
        return False
    local, far, local_port, far_port = ((quoted_source, quoted_destination, sport, dport) if inbound else
                                        (quoted_destination, quoted_source, dport, sport))
    if not spoken_by(peer, version, ipaddress.ip_address(far)):
        return False
    return (peer, version, proto, local, far, local_port, far_port) in FLOWS


def spoken_by(peer: Member, version: int, address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    others = {a for m in (HOME, *PEERS) if m is not peer for a in (m.ipv4, m.ipv6)}
    return address in (peer.ipv4, peer.ipv6) or (address not in others and any(
        address in r for r in peer.routes if r.version == version))


@st.composite
def icmp_errors(draw: st.DrawFn) -> tuple[bool, Member, bytearray, tuple[object, ...] | None]:
    """(inbound, peer, error, the reference's arguments or None once mutated)."""
    inbound = draw(st.booleans())
    if draw(st.booleans()):  # about a flow, maybe from or to the wrong peer
        owner, version, proto, local, far, local_port, far_port = draw(st.sampled_from(FLOWS))
        quoted = ((local, far, local_port, far_port) if inbound else (far, local, far_port, local_port))
        peer = owner if draw(st.booleans()) else draw(st.sampled_from(PEERS))
    else:
        version = draw(st.sampled_from((4, 6)))
        proto = draw(st.sampled_from(("tcp", "udp", "icmp" if version == 4 else "icmpv6")))
        quoted = (draw(st.sampled_from(ADDRESSES[version])), draw(st.sampled_from(ADDRESSES[version])),
                  draw(st.sampled_from(ERROR_PORTS)), draw(st.sampled_from(ERROR_PORTS)))
        peer = draw(st.sampled_from(PEERS))
    if proto in ("icmp", "icmpv6"):
        quoted = (*quoted[:3], quoted[2])  # an echo's identifier plays both ports
    request = draw(st.booleans())
    destination = quoted[0] if draw(st.booleans()) else draw(st.sampled_from(ADDRESSES[version]))
    source = quoted[1] if draw(st.booleans()) else draw(st.sampled_from(ADDRESSES[version]))  # the far end or a router
    packet = quoted_packet(version, proto, *quoted, request)
    if draw(st.booleans()):
        packet = packet[:(20 if version == 4 else 40) + 8]  # as little as an error may quote
    error = icmp_error(source, destination, packet, kind=draw(st.sampled_from(ERRORS[version])))
    arguments: tuple[object, ...] | None = (inbound, peer, version, source, destination, proto, *quoted, request)
    if draw(st.booleans()):
        for _ in range(draw(st.integers(1, 3))):
            error[draw(st.integers(0, len(error) - 1))] = draw(st.integers(0, 255))
        if draw(st.booleans()):
            del error[draw(st.integers(0, len(error))):]
        arguments = None
    return inbound, peer, error, arguments


def with_flows() -> PacketFilter:
    tcp_443 = Rule((EVERYONE,), (EVERYONE,), frozenset({"tcp"}), ((443, 443),), "node")
    f = PacketFilter(compiled(EMPTY_POLICY, (tcp_443,)))
    for owner, version, proto, local, far, local_port, far_port in FLOWS:
        opener = local_port != 443
        source, destination, sport, dport = ((local, far, local_port, far_port) if opener else
                                             (far, local, far_port, local_port))
        packet = quoted_packet(version, proto, source, destination, sport, dport, True)
        assert (f.outbound if opener else f.inbound)(owner.key, packet, len(packet), 0.0)
    return f


@SETTINGS
@given(icmp_errors())
@example((False, ALICE, bytearray(  # an error whose IHL was made 6: outbound, it reads as an echo reply
    b"F\x00\x009\x00\x01\x00\x00@\x01\x00\x00d@\x00\x01d@\x00\x02\x03\x00\x00\x00\x00\x00\x00\x00E\x00\x00\x1d"
    b"\x00\x01\x00\x00@\x11\x00\x00d@\x00\x02d@\x00\x01\x005\x13\x88\x00\t\x00\x00x"), None))
def test_icmp_errors_never_crash_open_nothing_and_pass_only_when_related(
        case: tuple[bool, Member, bytearray, tuple[object, ...] | None]) -> None:
    inbound, peer, error, arguments = case
    f = with_flows()
    expiries = {key: flow.expires for key, flow in f.flows.flows.items()}
    passed = (f.inbound if inbound else f.outbound)(peer.key, error, len(error), 1.0)
    as_error = passed
    if arguments is not None:
        assert passed is related_reference(*arguments)  # type: ignore[arg-type]
    elif passed:  # mutated: what the parser read must itself be related, if still an error
        h = p.Headers()
        assert p.parse(error, len(error), h) is None
        # A mutation can make an ordinary packet of it (a longer IPv4 header puts the ICMP
        # type on a 0 byte: an outbound echo reply, an answer that passes and opens nothing).
        as_error = bool(h.quoted_proto)
        if as_error:
            address = ipaddress.IPv4Address if h.version == 4 else ipaddress.IPv6Address
            proto = {p.TCP: "tcp", p.UDP: "udp", p.ICMP: "icmp", p.ICMPV6: "icmpv6"}[h.quoted_proto]
            assert related_reference(inbound, peer, h.version, str(address(h.src)), str(address(h.dst)), proto,
                                     str(address(h.quoted_src)), str(address(h.quoted_dst)), h.quoted_sport,
                                     h.quoted_dport, h.quoted_request)
    assert f.related == int(as_error)
    assert {key: flow.expires for key, flow in f.flows.flows.items()} == expiries  # none opened or refreshed
