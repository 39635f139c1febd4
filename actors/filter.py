"""The filter actor: the one owner of the node's `PacketFilter` (tunnelmesh.filter).

It compiles the rules this node enforces from three things: the members and the
network policy (`inputs()`: the coordinator client's latest `MapSnapshot`, or the
static config's peers), this node's own `[[filter.allow]]` rules (its config), and
this node as a `Member`. It compiles at start and on every `SyncFilter` (told with
`tell_latest` on each change of the peer map), and swaps the result in whole; the
data path reads `DataPath.filter` per packet, in the same thread, so a packet sees
either the old rules or the new.

What is in force (docs/filter.md, "What is in force"):

- no network policy, none expected and no `[filter]` table: no filter at all
  (`DataPath.filter` is None, every packet passes as before the filter): a static mesh
  without `[filter]`, or a network from before the filter whose admin has not set a
  policy yet;
- otherwise the network policy's rules (none without one) and the node's own, over
  default deny. A node that knows a policy exists (its invite token said so:
  `FilterInputs.policy_expected`) but has not verified one of at least that version
  (the coordinator withholds it) denies: a coordinator cannot switch the filter off.

A network policy that does not parse (it is admin-signed and verified, so this should
not happen) is logged and shown in `status`, and the policy before it stays in force,
compiled with the current members (with none before it: no network rules, fail
closed). Compile warnings are logged and shown too.

Denied inbound packets are logged by the actor's timer, at most one line per peer
every DENIED_LOG_EVERY seconds, with how many packets it stands for (retransmits of one
denied connection attempt count each: the line counts packets, not flows).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from tunnelmesh.clock import Clock
from tunnelmesh.filter import EMPTY_POLICY, Member, PacketFilter, Policy, PolicyError, Rule, compile_rules, parse_policy
from tunnelmesh.filter.engine import DENIED

from .messages import (
    FilterOrigin, FilterPeerRules, FilterRuleHits, FilterRules, FilterStatus, FilterVerdict, GetFilterStatus,
    ShowFilter, SyncFilter, TestFilter,
)
from .runtime import Actor

if TYPE_CHECKING:
    from tunnelmesh.membership import MapSnapshot

    from .datapath import DataPath

log = logging.getLogger("tunnelmesh.filter")

#: Seconds between the log lines about denied packets of one peer.
DENIED_LOG_EVERY = 10.0
#: Distinct protocol/ports named in one such line (the rest only counted).
DENIED_NAMED = 4
PROTOCOLS = ("tcp", "udp", "icmp", "icmpv6")


class SignedPolicy(Protocol):
    """The network policy record as the peer map holds it (verified, admin-signed)."""

    @property
    def version(self) -> int: ...

    @property
    def text(self) -> str: ...


@dataclass(frozen=True, slots=True)
class FilterInputs:
    """What the rules are compiled from besides the node's own: the members, the network
    policy (None: none set, or static mode) and the lowest policy version this node knows
    exists (`NetworkState.policy_expected`: its invite's; 0: none known)."""

    members: tuple[Member, ...]
    policy: SignedPolicy | None
    policy_expected: int = 0


def snapshot_inputs(snapshot: MapSnapshot, policy_expected: int) -> FilterInputs:
    """The filter's inputs from a verified peer map (coordinator mode). Members advertise
    no routes yet: a packet from one comes from its mesh addresses only. Plain WireGuard
    devices are judged by their names and addresses like members."""
    members = tuple(Member(m.name, m.wg_key, m.ipv4, m.ipv6)
                    for m in (*snapshot.members.values(), *snapshot.devices.values()))
    return FilterInputs(members, snapshot.policy, policy_expected)


class FilterActor(Actor):
    name = "filter"
    policy = "restart"

    def __init__(self, datapath: DataPath, *, local: Member, node_rules: tuple[Rule, ...] | None,
                 inputs: Callable[[], FilterInputs], network: bool, clock: Clock) -> None:
        """`node_rules`: the config's `[filter]` rules, None without a `[filter]` table;
        `network`: whether this node gets a network policy (coordinator mode)."""
        super().__init__()
        self.datapath = datapath
        self.local = local
        self.node_rules = node_rules
        self.inputs = inputs
        self.network = network
        self.clock = clock
        self.filter: PacketFilter | None = None
        self.policy_version: int | None = None  # of `network_policy`
        self.policy_expected = 0  # a policy of at least this version exists, per the invite
        self.network_policy: Policy | None = None  # the one in force (parsed)
        self.error: str | None = None  # the last network policy refused
        self.in_force = ""
        self._warnings: tuple[str, ...] = ()
        self._denied_logged = 0  # the filter's denied count at the last log line
        # What the rules in force were compiled from: the members and the network policy.
        self._compiled_from: tuple[tuple[Member, ...], Policy | None] | None = None
        self._ticker: asyncio.Task[None] | None = None

    async def setup(self) -> None:
        self.compile()  # again: what changed while it was not running (a restart)
        if self._ticker is None or self._ticker.done():  # a restart keeps the running one
            self._ticker = self.start_task(self._log_denied_every(), name="denied-flows log")

    async def handle(self, message: Any) -> Any:
        if isinstance(message, SyncFilter):
            self.compile()
            return None
        if isinstance(message, GetFilterStatus):
            return self.status()
        if isinstance(message, ShowFilter):
            return self.show()
        if isinstance(message, TestFilter):
            return self.test(message)
        raise ValueError(f"unknown message {type(message).__name__}")

    # --- compiling ----------------------------------------------------------------------

    def compile(self) -> None:
        inputs = self.inputs()
        self.policy_expected = inputs.policy_expected
        self._take_policy(inputs.policy if inputs.policy is None or inputs.policy.version >= self.policy_expected
                          else None)  # older than the invite said: withheld as much as none (fail closed)
        if inputs.policy is None and self.node_rules is None and not self.policy_expected:
            self.filter = self.datapath.filter = None
        else:
            self._compile_rules(inputs.members)
        in_force = self._describe()
        if in_force != self.in_force:
            log.info("packet filter: %s", in_force)
            self.in_force = in_force

    def _compile_rules(self, members: tuple[Member, ...]) -> None:
        """Compile and swap in, unless nothing the compiler reads changed: a map change
        of endpoints only must not cost O(members x rules) in the event loop nor make
        every flow be rechecked (the node rules never change while running)."""
        if (self.filter is not None and self._compiled_from is not None and self._compiled_from[0] == members
                and self._compiled_from[1] is self.network_policy):
            return
        self._compiled_from = (members, self.network_policy)
        compiled = compile_rules(self.network_policy or EMPTY_POLICY, self.node_rules or (), self.local, members)
        if self.filter is None:
            self.filter = PacketFilter(compiled)
            self._denied_logged = 0
            self.datapath.filter = self.filter
        else:
            self.filter.swap(compiled, self.clock.monotonic())
        if compiled.warnings != self._warnings:
            for warning in compiled.warnings:
                log.warning("packet filter: %s", warning)
        self._warnings = compiled.warnings

    def _take_policy(self, record: SignedPolicy | None) -> None:
        """Parse a new network policy (once per version); a refused one leaves the one before."""
        if record is None:
            self.network_policy = self.policy_version = self.error = None
            return
        if record.version == self.policy_version:
            return
        try:
            self.network_policy = parse_policy(record.text, f"network policy v{record.version}")
        except PolicyError as exc:
            if self.error != str(exc):
                log.error("%s; the rules before it stay in force", exc)
            self.error = str(exc)
            return
        self.policy_version, self.error = record.version, None

    def _describe(self) -> str:
        nodes = "" if self.node_rules is None else f"this node's [filter] rules ({len(self.node_rules)})"
        if self.filter is None:
            if self.network:
                return ("network policy: none set (a network from before the filter: every packet is allowed, as "
                        "before); the admin sets one with `tunnelmesh policy set FILE`")
            return "off: no [filter] table in the config (every packet is allowed)"
        if self.network_policy is None:
            where = ("network policy: refused (see error); " if self.error else
                     f"network policy v>={self.policy_expected} expected, not received from the coordinator yet: "
                     "denying; " if self.policy_expected else
                     "network policy: none set; " if self.network else "")
            return f"{where}{nodes or 'no rules'} only: all other inbound traffic is denied except replies"
        own = sum(1 for rule in self.filter.compiled.rules if rule.origin == "network")
        text = f"network policy v{self.policy_version} ({own} rule{'' if own == 1 else 's'} for this node)"
        return text + (f" and {nodes}" if nodes else "") + ": all other inbound traffic is denied except replies"

    # --- what the control commands ask ------------------------------------------------------

    def status(self) -> FilterStatus:
        f = self.filter
        return FilterStatus(
            enabled=f is not None, in_force=self.in_force, policy_version=self.policy_version,
            node_rules=len(self.node_rules or ()), error=self.error, warnings=self._warnings,
            drops=dict(f.drops) if f is not None else {},
            spoofed_by_peer=dict(f.spoofed) if f is not None else {},
            rules=self._rules(), flows=len(f.flows) if f is not None else 0,
            max_flows=f.flows.limit if f is not None else 0,
            max_flows_per_peer=f.flows.peer_limit if f is not None else 0,
            related=f.related if f is not None else 0,
            denied_by_peer=dict(f.denied) if f is not None else {},
        )

    def _rules(self) -> tuple[FilterRuleHits, ...]:
        f = self.filter
        if f is None:
            return ()
        return tuple(FilterRuleHits(rule.describe(), hits) for rule, hits in zip(f.compiled.rules, f.rule_hits))

    def show(self) -> FilterRules:
        f = self.filter
        peers: list[FilterPeerRules] = []
        if f is not None:
            for member in sorted(self.inputs().members, key=lambda m: m.name):
                if member.key == self.local.key:
                    continue
                origins = tuple(FilterOrigin(
                    origin=str(row["from"]), tcp=str(row.get("tcp", "")), udp=str(row.get("udp", "")),
                    icmp=bool(row.get("icmp", False)), icmpv6=bool(row.get("icmpv6", False)),
                    spoofed=bool(row.get("spoofed", False)),
                ) for row in f.effective(member.key))
                peers.append(FilterPeerRules(member.name, origins))
        return FilterRules(enabled=f is not None, in_force=self.in_force, rules=self._rules(), peers=tuple(peers))

    def test(self, request: TestFilter) -> FilterVerdict:
        if request.proto not in PROTOCOLS:
            raise ValueError(f"protocol {request.proto!r}: expected one of {', '.join(PROTOCOLS)}")
        if not 0 <= request.port <= 65535:
            raise ValueError(f"port {request.port}: expected 0 to 65535")
        member = self._member(request.peer)
        if self.filter is None:
            allowed, reason = True, f"no packet filter in force ({self.in_force})"
        else:
            allowed, reason = self.filter.explain(member.key, request.proto, request.port)
        return FilterVerdict(peer=member.name, proto=request.proto, port=request.port, allowed=allowed, reason=reason)

    def _member(self, key: str) -> Member:
        """The member named `key`, or with the mesh address `key`."""
        try:
            address: ipaddress.IPv4Address | ipaddress.IPv6Address | None = ipaddress.ip_address(key)
        except ValueError:
            address = None
        for member in self.inputs().members:
            if member.key != self.local.key and (member.name == key or
                                                 (address is not None and address in (member.ipv4, member.ipv6))):
                return member
        raise ValueError(f"no peer {key!r} (a member's name or mesh address; `tunnelmesh peers` lists them)")

    # --- the denied-flows log ------------------------------------------------------------------

    async def _log_denied_every(self) -> None:
        while True:
            await asyncio.sleep(DENIED_LOG_EVERY)
            self.log_denied()

    def log_denied(self) -> None:
        """One line per peer for the inbound packets denied since the last call: the first
        few distinct protocol/ports named, the rest counted (the filter keeps only the
        latest few)."""
        f = self.filter
        if f is None:
            return
        denied = f.drops[DENIED]
        new, self._denied_logged = denied - self._denied_logged, denied
        by_peer: dict[str, list[str]] = {}
        while f.recent_denied:
            peer, proto, port = f.recent_denied.popleft()
            by_peer.setdefault(peer, []).append(f"{proto}/{port}" if proto in ("tcp", "udp") else proto)
        for peer, packets in sorted(by_peer.items()):
            named = list(dict.fromkeys(packets))[:DENIED_NAMED]
            distinct = len(set(packets))
            more = distinct - len(named)
            log.warning("packet filter: denied %d packet%s from %s to: %s%s", len(packets),
                        "s" if len(packets) > 1 else "", peer, ", ".join(named), f" and {more} more" if more > 0 else "")
        unnamed = new - sum(len(packets) for packets in by_peer.values())
        if unnamed > 0:
            log.warning("packet filter: and %d more denied packets (status --json counts them)", unnamed)
