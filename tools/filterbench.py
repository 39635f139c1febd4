"""Microbenchmark of the packet filter: nanoseconds per packet, in and out, with 10 and
1,000 rules.

    python -m tools.filterbench [--packets N] [--peers P]

The node under test has P peers (default 100). Each rule set is a network policy text
(parsed and compiled as the daemon would: the compile time is shown too) whose rules
mix member, group and CIDR sources with single ports, ranges and lists; the packets
measured hit the last rules, so the port lookup works on full tables. Each figure is
the best of 5 runs of N calls (default 200,000) of the real entry point on a reused
buffer, loop overhead included: what the data path would pay per packet.

Cases:
  in: new flow    TCP to a port a rule allows (judged by the rules, no flow entry)
  in: reply       the answer of a flow this node opened (a flow-table hit)
  in: denied      TCP to a port no rule allows (counted drop)
  in: spoofed     a source that is not the peer's (counted drop)
  out: flow       a packet of a tracked flow (a flow-table hit)
"""

from __future__ import annotations

import argparse
import ipaddress
import sys
import time
from collections.abc import Callable

from tunnelmesh.filter import Member, PacketFilter, compile_rules, parse_policy
from tunnelmesh.filter.packet import ACK, SYN, TCP

RULE_COUNTS = (10, 1000)
RUNS = 5


def members(peers: int) -> tuple[Member, list[Member]]:
    def make(i: int) -> Member:
        return Member(f"peer{i}", i.to_bytes(32, "big"), ipaddress.IPv4Address(0x64400000 + i),
                      ipaddress.IPv6Address(f"fd00::{i:x}"), ())
    return make(1), [make(i) for i in range(2, peers + 2)]


def policy_text(rules: int, peers: int) -> str:
    admins = ", ".join(f'"peer{i}"' for i in range(2, min(peers, 20) + 2))
    lines = ["[groups]", f"admins = [{admins}]", ""]
    for i in range(rules):
        source = (f'"peer{2 + i % peers}"', '"group:admins"', '"100.64.0.0/24"')[i % 3]
        ports = (f"[{1000 + i}]", f'["{20000 + 10 * i}-{20005 + 10 * i}"]', f"[{1000 + i}, {40000 + i}]")[i % 3]
        lines += ["[[allow]]", f"from = [{source}]", f'proto = "{("tcp", "udp")[i % 2]}"', f"ports = {ports}", ""]
    # What the measured packets hit: the last rule, for peer2 on tcp.
    lines += ["[[allow]]", 'from = ["peer2"]', 'proto = "tcp"', "ports = [64000]", ""]
    return "\n".join(lines)


def tcp4(src: int, dst: int, sport: int, dport: int, flags: int) -> bytearray:
    packet = bytearray(40)
    packet[0], packet[3], packet[9] = 0x45, 40, TCP
    packet[12:16], packet[16:20] = src.to_bytes(4, "big"), dst.to_bytes(4, "big")
    packet[20:24] = sport.to_bytes(2, "big") + dport.to_bytes(2, "big")
    packet[32], packet[33] = 5 << 4, flags
    return packet


def per_packet_ns(call: Callable[[bytes, bytearray, int, float], bool], key: bytes, packet: bytearray,
                  count: int) -> float:
    length = len(packet)
    best = float("inf")
    for _ in range(RUNS):
        start = time.perf_counter_ns()
        for _ in range(count):
            call(key, packet, length, 1.0)
        best = min(best, (time.perf_counter_ns() - start) / count)
    return best


def measure(rules: int, peers: int, count: int) -> tuple[float, dict[str, float]]:
    home, others = members(peers)
    start = time.perf_counter()
    compiled = compile_rules(parse_policy(policy_text(rules, peers)), (), home, others)
    compile_ms = (time.perf_counter() - start) * 1000
    f = PacketFilter(compiled)
    peer = others[0]
    me, them = int(home.ipv4), int(peer.ipv4)  # type: ignore[arg-type]
    f.outbound(peer.key, tcp4(me, them, 50000, 443, SYN), 40, 1.0)  # a flow of this node's own
    cases = {
        "in: new flow": (f.inbound, tcp4(them, me, 40000, 64000, ACK)),
        "in: reply": (f.inbound, tcp4(them, me, 443, 50000, ACK)),
        "in: denied": (f.inbound, tcp4(them, me, 40000, 64001, ACK)),
        "in: spoofed": (f.inbound, tcp4(them + 999, me, 40000, 64000, ACK)),
        "out: flow": (f.outbound, tcp4(me, them, 50000, 443, ACK)),
    }
    results = {}
    for name, (call, packet) in cases.items():
        assert call(peer.key, packet, len(packet), 1.0) is name.startswith(("in: new", "in: reply", "out")), name
        results[name] = per_packet_ns(call, peer.key, packet, count)
    return compile_ms, results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.filterbench", description=__doc__.splitlines()[0])
    parser.add_argument("--packets", type=int, default=200_000, help="calls per run (default 200000)")
    parser.add_argument("--peers", type=int, default=100, help="peers of the node (default 100)")
    args = parser.parse_args(argv)
    if args.packets < 1 or args.peers < 1:
        parser.error("--packets and --peers must be at least 1")
    table = {rules: measure(rules, args.peers, args.packets) for rules in RULE_COUNTS}
    print(f"packet filter, ns per packet (best of {RUNS} x {args.packets:,} calls, {args.peers} peers, "
          f"Python {sys.version.split()[0]})")
    print(f"{'case':<16}" + "".join(f"{f'{r:,} rules':>14}" for r in RULE_COUNTS))
    for case in table[RULE_COUNTS[0]][1]:
        print(f"{case:<16}" + "".join(f"{table[r][1][case]:>14.0f}" for r in RULE_COUNTS))
    print(f"{'compile (ms)':<16}" + "".join(f"{table[r][0]:>14.1f}" for r in RULE_COUNTS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
