"""The packet filter the data path calls per packet (sans-IO: time passed in).

Inbound (a decrypted packet from peer P, on its way to the TUN):

1. parse the headers (packet.py); anything not understood is dropped (fail closed);
2. P must be a peer of the compiled rules (else `unknown_peer`);
3. the destination must be this node's mesh address or one of its routes
   (`not_for_this_node`);
4. anti-spoofing: the source must be one of P's origins, its mesh address or a route
   it advertises, never another member's address (`spoofed`, also counted per peer);
5. an ICMP(v6) error passes only if it is RELATED (below), else `icmp_unrelated`;
6. a packet of a tracked flow passes (after a rule swap, a flow P opened is checked
   once against the new rules: if they no longer allow it, its packets are dropped
   both ways as `flow_revoked` until it has been idle for its timeout). An ICMP(v6)
   echo request never matches a flow: only echo replies answer this node's pings;
7. otherwise the rules decide: TCP/UDP by destination port, ICMP(v6) echo requests;
   no rule -> `denied`. A TCP connection (its bare SYN) and a UDP flow a rule
   admitted are tracked as P's (see below); P's share of the table full ->
   `conntrack_peer_full`, the whole table full -> `conntrack_full`. Other TCP
   packets the rules let in open nothing (this node's answers pick the connection
   up, see below).

Outbound (a packet read from the TUN that the router gave to peer P):

1. parse; 2. P known; 3. the source must be this node's (`not_from_this_node`);
4. the destination must be one of P's origins (`not_a_peer_address`): outbound goes
   to known peers' addresses and routes only;
5. an ICMP(v6) error passes only if it is RELATED (below), else `icmp_unrelated`;
6. a packet of a tracked flow refreshes it (dropped if the flow was revoked);
7. a packet that opens a flow (TCP bare SYN, UDP, ICMP(v6) echo request) is tracked
   as this node's, so its replies pass step 5 inbound; table full -> `conntrack_full`.
   An ACK-only TCP packet without a flow is picked up as an established connection
   (as Linux's nf_conntrack_tcp_loose): this node's connection survives a daemon
   restart, a fresh filter and the idle timeout. It is tracked as this node's when
   the rules do not let P reach its local port (then the kernel only has that
   connection because this node opened it: P's packets to that port never reached
   it), as P's otherwise (so that a later swap can still revoke it). Other outbound
   packets (SYN+ACK, RST, FIN without a flow; echo replies) pass untracked: they
   answer a packet of P's that the rules or a flow let in, so they open nothing that
   an inbound packet could not open itself.

RELATED (as Linux conntrack): an ICMP(v6) error (port unreachable, fragmentation
needed, packet too big, time exceeded, parameter problem) quotes the packet its
receiver sent. It passes, either way, only when
- its destination is the quoted packet's source (an error goes back to the sender);
  its source was checked as any packet's (inbound: one of P's origins, so a router
  inside a route P advertises may send it; outbound: this node's or its routes');
- the quoted packet belongs to a flow with P that is tracked, live and not revoked:
  inbound it is this node's packet (quoted source local, destination P's), outbound
  P's (quoted source P's, destination local); a quoted ICMP echo is this node's
  request inbound and P's reply outbound (only this node's pings are tracked).
It never opens, refreshes or moves a flow on; passed errors are counted (`related`).

Why this node's answers never open a flow of its own: a UDP answer from port 53
would otherwise open a way back in that outlives the rule that let the question in.
Flows P opens are rechecked against the rules after every swap, so a connection
stays exactly as long as the rules still allow it.

Counters: every drop reason counts packets (`denied` too, retransmits included); a
rule's hits count the new flows it admitted (a TCP connection, a UDP flow, an ICMP
echo request).

No allocation on the common path beyond the flow key tuple and the ints the parse
reads: the headers go into one reused `Headers`, counters are a list and Counters.
"""

from __future__ import annotations

import collections
import ipaddress
from collections import Counter

from tunnelmesh.filter.compiled import NO_RULE, Allow, Compiled, PeerView
from tunnelmesh.filter.conntrack import DEFAULT_LIMIT, ESTABLISHED, OPENING, Flow, FlowTable
from tunnelmesh.filter.packet import (
    ACK,
    FIN,
    ICMP_ECHO_REQUEST,
    ICMPV6_ECHO_REQUEST,
    RST,
    SYN,
    TCP,
    UDP,
    Headers,
    parse,
)
from tunnelmesh.filter.policy import Rule

Buffer = bytes | bytearray | memoryview

UNKNOWN_PEER = "unknown_peer"
NOT_FOR_THIS_NODE = "not_for_this_node"
NOT_FROM_THIS_NODE = "not_from_this_node"
SPOOFED = "spoofed"
NOT_A_PEER_ADDRESS = "not_a_peer_address"
UNRELATED = "icmp_unrelated"
DENIED = "denied"
FLOW_REVOKED = "flow_revoked"
CONNTRACK_FULL = "conntrack_full"
CONNTRACK_PEER_FULL = "conntrack_peer_full"

#: How many recent denied packets are kept for the daemon's rate-limited log line.
RECENT_DENIED = 32
#: Wheel work per `expire` call (the data path calls it once per batch).
EXPIRE_BUDGET = 64
_OPENING_FLAGS = SYN | ACK | RST | FIN
_PROTO_NAMES = {TCP: "tcp", UDP: "udp", 1: "icmp", 58: "icmpv6"}


class PacketFilter:
    """Decides per packet, in and out; `swap` replaces the rules whole."""

    def __init__(self, compiled: Compiled, *, max_flows: int = DEFAULT_LIMIT,
                 max_flows_per_peer: int | None = None) -> None:
        """`max_flows_per_peer`: the flows one peer may open (default max_flows // 8,
        at least 256)."""
        self.flows = FlowTable(max_flows, max_flows_per_peer)
        self.drops: Counter[str] = Counter()
        self.spoofed: Counter[str] = Counter()  # by peer name
        self.denied: Counter[str] = Counter()  # by peer name: inbound packets no rule allows
        # (peer name, protocol, destination port) of recent denied packets: the
        # daemon drains it into a rate-limited log line.
        self.recent_denied: collections.deque[tuple[str, str, int]] = collections.deque(maxlen=RECENT_DENIED)
        self._headers = Headers()
        self._generation = 0
        self._compiled = compiled
        self.rule_hits: list[int] = [0] * len(compiled.rules)
        self.related = 0  # ICMP(v6) errors passed for a tracked flow

    @property
    def compiled(self) -> Compiled:
        return self._compiled

    def swap(self, compiled: Compiled, now: float) -> None:
        """Use `compiled` from now on. Tracked flows are rechecked lazily, each at its
        next packet (no pause here, however many flows): a flow this node opened
        stays while its remote is still that peer's; a flow the peer opened stays
        while the new rules allow it. Hit counters carry over for unchanged rules."""
        hits: dict[Rule, int] = {}
        for rule, count in zip(self._compiled.rules, self.rule_hits):
            hits[rule] = hits.get(rule, 0) + count
        self.rule_hits = [hits.pop(rule, 0) for rule in compiled.rules]
        self._compiled = compiled
        self._generation += 1
        self.flows.expire(now, EXPIRE_BUDGET)

    def expire(self, now: float) -> None:
        """Bounded expiry work: call once per data-path batch."""
        self.flows.expire(now, EXPIRE_BUDGET)

    def inbound(self, peer_key: bytes, packet: Buffer, length: int, now: float) -> bool:
        h = self._headers
        reason = parse(packet, length, h)
        if reason is not None:
            self.drops[reason] += 1
            return False
        compiled = self._compiled
        peer = compiled.peers.get(peer_key)
        if peer is None:
            self.drops[UNKNOWN_PEER] += 1
            return False
        version = h.version
        if not compiled.local.accepts(version, h.dst):
            self.drops[NOT_FOR_THIS_NODE] += 1
            return False
        allow = peer.origin(version, h.src)
        if allow is None:
            self.drops[SPOOFED] += 1
            self.spoofed[peer.name] += 1
            return False
        proto = h.proto
        if proto != TCP and proto != UDP and h.quoted_proto:
            return self._related(peer, peer_key, True, now)
        key = (peer_key, version, proto, h.src, h.dst, h.sport, h.dport)
        flows = self.flows
        request = proto != TCP and proto != UDP and (h.icmp_type == ICMP_ECHO_REQUEST or
                                                     h.icmp_type == ICMPV6_ECHO_REQUEST)
        flow = None if request else flows.flows.get(key)  # a request is never a reply
        if flow is not None:
            if flow.expires > now:
                if flow.generation != self._generation:
                    self._recheck(flow, allow, h.dport)
                if flow.revoked:
                    self.drops[FLOW_REVOKED] += 1
                    flow.expires = now + flow.timeout
                    return False
                flows.touch(flow, not flow.outbound, h.flags, now)
                return True
            flows.remove(flow)
        if proto == TCP:
            rule = allow.tcp.rule(h.dport)
        elif proto == UDP:
            rule = allow.udp.rule(h.dport)
        elif not request:
            rule = NO_RULE
        else:
            rule = allow.icmp if version == 4 else allow.icmp6
        if rule == NO_RULE:
            self.drops[DENIED] += 1
            self.denied[peer.name] += 1
            self.recent_denied.append((peer.name, _PROTO_NAMES[proto], h.dport))
            return False
        if request:
            self.rule_hits[rule] += 1
            return True
        if proto == TCP and h.flags & _OPENING_FLAGS != SYN:
            return True  # mid-connection: this node's answer picks it up (outbound)
        if flows.add(key, peer_key, proto, now, self._generation) is None:
            self.drops[CONNTRACK_PEER_FULL if flows.peer_full(peer_key) else CONNTRACK_FULL] += 1
            return False
        self.rule_hits[rule] += 1
        return True

    def outbound(self, peer_key: bytes, packet: Buffer, length: int, now: float) -> bool:
        h = self._headers
        reason = parse(packet, length, h)
        if reason is not None:
            self.drops[reason] += 1
            return False
        compiled = self._compiled
        peer = compiled.peers.get(peer_key)
        if peer is None:
            self.drops[UNKNOWN_PEER] += 1
            return False
        version = h.version
        if not compiled.local.accepts(version, h.src):
            self.drops[NOT_FROM_THIS_NODE] += 1
            return False
        allow = peer.origin(version, h.dst)
        if allow is None:
            self.drops[NOT_A_PEER_ADDRESS] += 1
            return False
        proto = h.proto
        if proto != TCP and proto != UDP and h.quoted_proto:
            return self._related(peer, peer_key, False, now)
        key = (peer_key, version, proto, h.dst, h.src, h.dport, h.sport)
        flows = self.flows
        flow = flows.flows.get(key)
        if flow is not None:
            if flow.expires > now:
                if flow.generation != self._generation:
                    self._recheck(flow, allow, h.sport)
                if flow.revoked:
                    self.drops[FLOW_REVOKED] += 1
                    flow.expires = now + flow.timeout
                    return False
                flows.touch(flow, flow.outbound, h.flags, now)
                return True
            flows.remove(flow)
        opener: bytes | None = None  # this node
        if proto == UDP:
            state = OPENING
        elif proto == TCP:
            flags = h.flags & _OPENING_FLAGS
            if flags == SYN:
                state = OPENING
            elif flags == ACK:  # loose pickup: see the module's docstring
                state = ESTABLISHED
                if allow.tcp.rule(h.sport) != NO_RULE:
                    opener = peer_key
            else:
                return True  # SYN+ACK, RST, FIN: answers, they open nothing
        elif h.icmp_type == ICMP_ECHO_REQUEST or h.icmp_type == ICMPV6_ECHO_REQUEST:
            state = OPENING
        else:
            return True  # an echo reply
        if flows.add(key, opener, proto, now, self._generation, state) is None:
            self.drops[CONNTRACK_PEER_FULL if flows.peer_full(opener) else CONNTRACK_FULL] += 1
            return False
        return True

    def _related(self, peer: PeerView, peer_key: bytes, inbound: bool, now: float) -> bool:
        """An ICMP(v6) error whose outer addresses passed the direction's checks: does
        it answer a packet of a live flow with this peer (see the module's RELATED)?"""
        h = self._headers
        quoted = h.quoted_proto
        if h.dst != h.quoted_src or (quoted != TCP and quoted != UDP and h.quoted_request != inbound):
            self.drops[UNRELATED] += 1
            return False
        if inbound:  # the quoted packet is this node's, on its way to P
            remote, local, remote_port, local_port = h.quoted_dst, h.quoted_src, h.quoted_dport, h.quoted_sport
        else:  # P's, on its way here
            remote, local, remote_port, local_port = h.quoted_src, h.quoted_dst, h.quoted_sport, h.quoted_dport
        version = h.version
        allow = peer.origin(version, remote)
        flow = self.flows.flows.get((peer_key, version, quoted, remote, local, remote_port, local_port))
        if allow is None or flow is None or flow.expires <= now:
            self.drops[UNRELATED] += 1
            return False
        if flow.generation != self._generation:
            self._recheck(flow, allow, local_port)
        if flow.revoked:
            self.drops[FLOW_REVOKED] += 1
            return False
        self.related += 1
        return True

    def _recheck(self, flow: Flow, allow: Allow, local_port: int) -> None:
        """A tracked flow's first packet after a swap. The caller has already checked
        that the remote is still this peer's; a flow the peer opened must also still
        be allowed by a rule. A revoked flow is kept, dropping its packets
        both ways, until it has been idle for its timeout: this node's answers then
        cannot reopen it as a flow of its own."""
        flow.generation = self._generation
        ports = allow.tcp if flow.proto == TCP else allow.udp
        flow.revoked = not flow.outbound and ports.rule(local_port) == NO_RULE

    # -- what `tunnelmesh filter test / show` and `status --json` read (not per packet)

    def explain(self, peer_key: bytes, proto: str, port: int = 0) -> tuple[bool, str]:
        """Would `proto`/`port` from the peer's mesh address open a new flow here,
        and by which rule. `proto` is tcp, udp, icmp or icmpv6 (port ignored)."""
        peer = self._compiled.peers.get(peer_key)
        if peer is None:
            return False, "not a peer of this node: everything from it is dropped"
        allow = peer.allow6 if proto == "icmpv6" or peer.allow4 is None else peer.allow4
        if allow is None:
            return False, "the peer has no mesh address for this protocol"
        if proto == "tcp":
            rule = allow.tcp.rule(port)
        elif proto == "udp":
            rule = allow.udp.rule(port)
        elif proto == "icmp":
            rule = allow.icmp
        elif proto == "icmpv6":
            rule = allow.icmp6
        else:
            raise ValueError(f"protocol {proto!r}: expected tcp, udp, icmp or icmpv6")
        if rule == NO_RULE:
            return False, "no rule allows it (default deny; replies to this node's own flows still pass)"
        return True, self._compiled.rules[rule].describe()

    def effective(self, peer_key: bytes) -> list[dict[str, object]]:
        """What the peer may open here, per origin (mesh addresses first, then routes
        longest prefix first; a member's address inside a route: spoofed)."""
        peer = self._compiled.peers.get(peer_key)
        if peer is None:
            return []
        out: list[dict[str, object]] = []
        mesh = [(peer.v4, 4, peer.allow4), (peer.v6, 6, peer.allow6)]
        for address, version, allow in mesh:
            if allow is not None:
                shown = ipaddress.IPv4Address(address) if version == 4 else ipaddress.IPv6Address(address)
                out.append({"from": str(shown), **allow.describe()})
        for network, allow in peer.origins:
            out.append({"from": str(network), **(allow.describe() if allow is not None else {"spoofed": True})})
        return out

    def stats(self) -> dict[str, object]:
        """Counters for `status --json`: drops by reason, spoofed packets by peer,
        ICMP errors passed as related, new flows admitted by each rule, the flow
        table's use."""
        return {
            "drops": dict(self.drops),
            "related": self.related,
            "spoofed_by_peer": dict(self.spoofed),
            "denied_by_peer": dict(self.denied),
            "rules": [{"rule": rule.describe(), "hits": hits} for rule, hits in zip(self._compiled.rules, self.rule_hits)],
            "flows": len(self.flows),
            "max_flows": self.flows.limit,
            "max_flows_per_peer": self.flows.peer_limit,
            "warnings": list(self._compiled.warnings),
        }
