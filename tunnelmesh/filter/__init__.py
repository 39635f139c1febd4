"""The packet filter's sans-IO core: default deny inbound, stateful, anti-spoofing.

- `packet`: reading IPv4/IPv6 + TCP/UDP/ICMP echo headers in place; drop reasons.
- `policy`: the rule model and the policy documents (TOML), `PolicyError` with lines.
- `compiled`: policy + node rules + members -> per-peer lookups (`compile_rules`).
- `conntrack`: the bounded flow table, its timeouts and timer-wheel expiry.
- `engine`: `PacketFilter`, what the data path calls per packet.
- `starter`: the starter policy `init` writes.

Semantics (evaluation order, how node and network rules combine, what is never
filtered): docs/filter.md.
"""

from tunnelmesh.filter.compiled import Compiled, Member, compile_rules
from tunnelmesh.filter.engine import PacketFilter
from tunnelmesh.filter.policy import (
    EMPTY_POLICY,
    Policy,
    PolicyError,
    Rule,
    Selector,
    parse_node_rules,
    parse_node_rules_text,
    parse_policy,
)
from tunnelmesh.filter.starter import OPEN_PORT_HINT, STARTER_POLICY

__all__ = [
    "EMPTY_POLICY", "OPEN_PORT_HINT", "STARTER_POLICY", "Compiled", "Member", "PacketFilter", "Policy",
    "PolicyError", "Rule", "Selector", "compile_rules", "parse_node_rules", "parse_node_rules_text", "parse_policy",
]
