"""Compiling rules for one node: policy + node rules + members -> per-peer lookups.

The data path asks, per inbound packet that is not part of a tracked flow: may this
peer open a flow to (protocol, port) from this source address? Everything that does
not depend on the packet is decided here, once per policy or membership change:

1. The rules that apply to this node, in evaluation order: the node's own rules
   (file order), then the network policy's rules whose `to` names this node
   (document order). A rule's index in `Compiled.rules` is its counter's index.
2. For each peer, its *origins*: the address blocks a packet from it may come from.
   Its mesh IPv4 (/32) and IPv6 (/128), each route it advertises, and each CIDR of a
   rule's `from` that lies strictly inside one of those routes (carved out, so that
   a CIDR rule covering part of a route applies to exactly that part). Other members'
   mesh addresses inside its routes are *not* origins (a route must not let a peer
   speak as another member): a packet from one of them is spoofed.
3. For each origin, the rules whose `from` matches it (a member-level selector that
   names the peer, or a CIDR containing the whole origin), compiled into an `Allow`:
   per protocol the first matching rule for every port, as disjoint port segments
   (single ports in a dict, longer spans for bisect), and for ICMP echo the first rule.
   Identical match sets share one `Allow`.

Per packet that leaves one dict lookup (the peer by its WireGuard key), the origin
(one int compare for the mesh address, a short longest-prefix-first scan for routes),
and a dict or bisect lookup of the port. Everything here is immutable once built;
the engine swaps a whole `Compiled` at a time.
"""

from __future__ import annotations

import bisect
import dataclasses
import heapq
import ipaddress
import itertools
from collections.abc import Iterable, Mapping

from tunnelmesh.filter.policy import Policy, Rule, Selector, format_ports

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
NO_RULE = -1


@dataclasses.dataclass(frozen=True, slots=True)
class Member:
    """What the filter needs of a member (the peer map's entry, or this node)."""

    name: str
    key: bytes  # WireGuard public key
    ipv4: ipaddress.IPv4Address | None
    ipv6: ipaddress.IPv6Address | None
    routes: tuple[IPNetwork, ...] = ()


class PortMap:
    """For each port, the index of the first rule allowing it (or NO_RULE)."""

    __slots__ = ("single", "los", "his", "rules")

    def __init__(self, segments: list[tuple[int, int, int]]) -> None:
        self.single: dict[int, int] = {lo: rule for lo, hi, rule in segments if lo == hi}
        spans = [s for s in segments if s[0] != s[1]]
        self.los = tuple(lo for lo, _, _ in spans)
        self.his = tuple(hi for _, hi, _ in spans)
        self.rules = tuple(rule for _, _, rule in spans)

    def rule(self, port: int) -> int:
        found = self.single.get(port, NO_RULE)
        if found != NO_RULE:
            return found
        i = bisect.bisect_right(self.los, port) - 1
        if i >= 0 and port <= self.his[i]:
            return self.rules[i]
        return NO_RULE

    def segments(self) -> list[tuple[int, int, int]]:
        out = [(p, p, r) for p, r in self.single.items()] + list(zip(self.los, self.his, self.rules))
        return sorted(out)


class Allow:
    """What new flows one origin may open: per protocol, the first allowing rule."""

    __slots__ = ("tcp", "udp", "icmp", "icmp6")

    def __init__(self, tcp: PortMap, udp: PortMap, icmp: int, icmp6: int) -> None:
        self.tcp = tcp
        self.udp = udp
        self.icmp = icmp  # ICMP echo request: first rule index, or NO_RULE
        self.icmp6 = icmp6

    def describe(self) -> dict[str, object]:
        def ports(portmap: PortMap) -> str:
            return format_ports(tuple((lo, hi) for lo, hi, _ in _merge_adjacent(portmap.segments(), by_rule=False)))
        return {"tcp": ports(self.tcp), "udp": ports(self.udp), "icmp": self.icmp != NO_RULE,
                "icmpv6": self.icmp6 != NO_RULE}


class PeerView:
    """One peer's origins and what each may open (see the module header)."""

    __slots__ = ("name", "key", "v4", "v6", "allow4", "allow6", "routes4", "routes6", "origins")

    def __init__(self, member: Member, allow4: Allow | None, allow6: Allow | None,
                 routes: list[tuple[IPNetwork, Allow | None]]) -> None:
        self.name = member.name
        self.key = member.key
        self.v4 = int(member.ipv4) if member.ipv4 is not None else -1
        self.v6 = int(member.ipv6) if member.ipv6 is not None else -1
        self.allow4 = allow4
        self.allow6 = allow6
        routes = sorted(routes, key=lambda r: -r[0].prefixlen)  # longest prefix first
        self.routes4 = tuple((int(n.network_address), int(n.netmask), a) for n, a in routes if n.version == 4)
        self.routes6 = tuple((int(n.network_address), int(n.netmask), a) for n, a in routes if n.version == 6)
        self.origins = tuple(routes)  # for display only

    def origin(self, version: int, address: int) -> Allow | None:
        """The Allow of the origin `address` is in; None: not this peer's to use."""
        if version == 4:
            if address == self.v4:
                return self.allow4
            for network, mask, allow in self.routes4:
                if address & mask == network:
                    return allow
            return None
        if address == self.v6:
            return self.allow6
        for network, mask, allow in self.routes6:
            if address & mask == network:
                return allow
        return None


class LocalView:
    """This node's addresses and routes: where inbound packets may be going."""

    __slots__ = ("v4", "v6", "nets4", "nets6")

    def __init__(self, member: Member) -> None:
        self.v4 = int(member.ipv4) if member.ipv4 is not None else -1
        self.v6 = int(member.ipv6) if member.ipv6 is not None else -1
        self.nets4 = tuple((int(n.network_address), int(n.netmask)) for n in member.routes if n.version == 4)
        self.nets6 = tuple((int(n.network_address), int(n.netmask)) for n in member.routes if n.version == 6)

    def accepts(self, version: int, address: int) -> bool:
        if version == 4:
            if address == self.v4:
                return True
            return any(address & mask == network for network, mask in self.nets4)
        if address == self.v6:
            return True
        return any(address & mask == network for network, mask in self.nets6)


@dataclasses.dataclass(frozen=True, slots=True)
class Compiled:
    """One node's compiled filter: swapped whole (`PacketFilter.swap`)."""

    local: LocalView
    peers: Mapping[bytes, PeerView]
    rules: tuple[Rule, ...]  # evaluation order; index = counter index
    warnings: tuple[str, ...]


def _members_of(selector: Selector, policy: Policy) -> frozenset[str] | None:
    """Member names a member-level selector covers (None for "*" and CIDRs)."""
    if selector.kind == "member":
        return frozenset((selector.name,))
    if selector.kind in ("group", "tag"):
        sets = policy.groups if selector.kind == "group" else policy.tags
        return sets.get(selector.name, frozenset())
    return None


def _merge_adjacent(segments: list[tuple[int, int, int]], by_rule: bool = True) -> list[tuple[int, int, int]]:
    out: list[tuple[int, int, int]] = []
    for lo, hi, rule in segments:
        if out and out[-1][1] + 1 == lo and (out[-1][2] == rule or not by_rule):
            out[-1] = (out[-1][0], hi, out[-1][2])
        else:
            out.append((lo, hi, rule))
    return out


def _segments(spans: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """(lo, hi, rule) spans -> disjoint (lo, hi, first rule) segments: a sweep over the
    span ends with a heap of the active spans by rule index (n log n for any overlap)."""
    points = sorted({lo for lo, _, _ in spans} | {hi + 1 for _, hi, _ in spans})
    by_start = sorted(spans)
    active: list[tuple[int, int]] = []  # (rule, hi)
    out: list[tuple[int, int, int]] = []
    j = 0
    for a, b in itertools.pairwise(points):
        while j < len(by_start) and by_start[j][0] == a:
            heapq.heappush(active, (by_start[j][2], by_start[j][1]))
            j += 1
        while active and active[0][1] < a:
            heapq.heappop(active)
        if active:
            out.append((a, b - 1, active[0][0]))
    return _merge_adjacent(out)


def _allow(rules: tuple[Rule, ...], matched: tuple[int, ...]) -> Allow:
    spans: dict[str, list[tuple[int, int, int]]] = {"tcp": [], "udp": []}
    first = {"icmp": NO_RULE, "icmpv6": NO_RULE}
    for index in matched:  # ascending: the first rule wins where rules overlap
        rule = rules[index]
        for proto in rule.protocols:
            if proto in spans:
                spans[proto].extend((lo, hi, index) for lo, hi in rule.ports)
            elif first[proto] == NO_RULE:
                first[proto] = index
    return Allow(PortMap(_segments(spans["tcp"])), PortMap(_segments(spans["udp"])), first["icmp"], first["icmpv6"])


def compile_rules(policy: Policy, node_rules: tuple[Rule, ...], local: Member, members: Iterable[Member]) -> Compiled:
    """Compile what `local` accepts from each of `members` (`local` itself is skipped)."""
    members = [m for m in members if m.key != local.key]
    names = {m.name for m in members} | {local.name}
    warnings: list[str] = []
    for rule in node_rules:
        for selector in rule.sources:
            sets = {"group": policy.groups, "tag": policy.tags}.get(selector.kind)
            if sets is not None and selector.name not in sets:
                warnings.append(f"{rule.describe()}: {selector} is not defined in the network policy: it matches no one")
    rules = node_rules + tuple(r for r in policy.rules if _targets(r, local.name, policy))
    # Per rule: the member names it covers, whether it covers everyone, its CIDRs.
    covered = []
    for rule in rules:
        member_sets = [_members_of(s, policy) for s in rule.sources]
        everyone = any(s.kind == "any" for s in rule.sources)
        named = frozenset[str]().union(*(m for m in member_sets if m is not None)) & names
        cidrs = tuple((s.network.version, int(s.network.network_address), int(s.network.netmask), s.network.prefixlen)
                      for s in rule.sources if s.network is not None)
        covered.append((everyone, named, cidrs))
    all_cidrs = {s.network for r in rules for s in r.sources if s.network is not None}
    mesh_addresses = {ipaddress.ip_network(a) for m in [*members, local] for a in (m.ipv4, m.ipv6) if a is not None}
    cache: dict[tuple[int, ...], Allow] = {}

    def allow_for(member: Member, origin: IPNetwork) -> Allow:
        net, plen = int(origin.network_address), origin.prefixlen
        matched = tuple(i for i, (everyone, named, cidrs) in enumerate(covered)
                        if everyone or member.name in named
                        or any(v == origin.version and plen >= p and net & mask == base for v, base, mask, p in cidrs))
        if matched not in cache:
            cache[matched] = _allow(rules, matched)
        return cache[matched]

    peers: dict[bytes, PeerView] = {}
    for member in members:
        own = {ipaddress.ip_network(a) for a in (member.ipv4, member.ipv6) if a is not None}
        origins: dict[IPNetwork, Allow | None] = {}
        for route in member.routes:
            origins[route] = allow_for(member, route)
            inside = [c for c in all_cidrs if c.version == route.version and c != route and c.subnet_of(route)]  # type: ignore[arg-type]
            for cidr in inside:
                origins[cidr] = allow_for(member, cidr)
        for address in (mesh_addresses - own) if member.routes else ():  # after the carving: exclusion wins
            if any(address.version == r.version and address.subnet_of(r) for r in member.routes):  # type: ignore[arg-type]
                origins[address] = None
        allow4 = allow_for(member, ipaddress.ip_network(member.ipv4)) if member.ipv4 is not None else None
        allow6 = allow_for(member, ipaddress.ip_network(member.ipv6)) if member.ipv6 is not None else None
        peers[member.key] = PeerView(member, allow4, allow6, list(origins.items()))
    return Compiled(LocalView(local), peers, rules, tuple(warnings))


def _targets(rule: Rule, name: str, policy: Policy) -> bool:
    for selector in rule.targets:
        covered = _members_of(selector, policy)
        if covered is None or name in covered:
            return True
    return False
