"""The packet filter per packet: every rule kind, anti-spoofing, connection tracking
(replies, timeouts, the bound), swaps, and what `filter test/show` and status read.

The node under test is HOME (100.64.0.1, fd00::1, route 10.1.0.0/16); its peers are
ALICE (…2), BOB (…3, route 10.2.0.0/16) and CAROL (…4)."""

from __future__ import annotations

from tests.support.ippackets import (
    ACK,
    ALICE,
    BOB,
    CAROL,
    FIN,
    HOME,
    PEERS,
    RST,
    SYN,
    icmp_error,
    ipv4,
    member,
    ping4,
    ping6,
    tcp4,
    tcp6,
    udp4,
    udp6,
)
from tunnelmesh.filter import (
    EMPTY_POLICY,
    PacketFilter,
    compile_rules,
    parse_node_rules_text,
    parse_policy,
)
from tunnelmesh.filter import engine as e
from tunnelmesh.filter import packet as p
from tunnelmesh.filter.conntrack import TCP_TIMEOUTS, UDP_TIMEOUTS

H4, A4, B4, C4 = "100.64.0.1", "100.64.0.2", "100.64.0.3", "100.64.0.4"
H6, A6, C6 = "fd00::1", "fd00::2", "fd00::4"

POLICY = """
[groups]
admins = ["alice"]

[tags]
home = ["home"]

[[allow]]
from = ["group:admins"]
to = ["tag:home"]
proto = "tcp"
ports = [22]

[[allow]]
from = ["carol"]
proto = ["tcp", "udp"]
ports = ["8000-8100", 9999]

[[allow]]
from = ["10.2.5.0/24"]
proto = "udp"
ports = [53]

[[allow]]
from = ["*"]
proto = "icmp"

[[allow]]
from = ["group:admins"]
to = ["bob"]
proto = "any"
"""


def make(policy: str = POLICY, node: str = "", max_flows: int = 1000) -> PacketFilter:
    compiled = compile_rules(parse_policy(policy), parse_node_rules_text(node), HOME, PEERS)
    return PacketFilter(compiled, max_flows=max_flows)


def test_group_and_tag_rule_opens_one_port_to_one_member_only() -> None:
    f = make()
    assert f.inbound(ALICE.key, tcp4(A4, H4, 40000, 22, SYN), 60, 0.0)
    assert not f.inbound(ALICE.key, tcp4(A4, H4, 40000, 23, SYN), 60, 0.0)
    assert not f.inbound(CAROL.key, tcp4(C4, H4, 40000, 22, SYN), 60, 0.0)
    assert f.drops[e.DENIED] == 2 and f.denied == {"alice": 1, "carol": 1}  # also counted per peer
    assert f.recent_denied[-1] == ("carol", "tcp", 22)
    assert f.stats()["denied_by_peer"] == {"alice": 1, "carol": 1}


def test_same_rule_applies_to_ipv6() -> None:
    f = make()
    assert f.inbound(ALICE.key, tcp6(A6, H6, 40000, 22, SYN), 80, 0.0)
    assert not f.inbound(ALICE.key, tcp6(A6, H6, 40000, 443, SYN), 80, 0.0)


def test_member_rule_with_port_range_and_list_for_tcp_and_udp() -> None:
    f = make()
    for port, allowed in ((7999, False), (8000, True), (8050, True), (8100, True), (8101, False), (9999, True)):
        assert f.inbound(CAROL.key, tcp4(C4, H4, 1000, port, SYN), 40, 0.0) is allowed
        assert f.inbound(CAROL.key, udp4(C4, H4, 1000 + port, port), 29, 0.0) is allowed


def test_cidr_rule_covers_part_of_a_route_only() -> None:
    f = make()
    assert f.inbound(BOB.key, udp4("10.2.5.9", H4, 1000, 53), 29, 0.0)
    assert not f.inbound(BOB.key, udp4("10.2.6.9", H4, 1000, 53), 29, 0.0)  # bob's route, not the CIDR
    assert not f.inbound(BOB.key, udp4(B4, H4, 1000, 53), 29, 0.0)  # bob's mesh address


def test_icmp_echo_from_everyone_but_not_icmpv6() -> None:
    f = make()
    for peer, address in ((ALICE, A4), (BOB, B4), (CAROL, C4)):
        assert f.inbound(peer.key, ping4(address, H4), 32, 0.0)
    assert not f.inbound(CAROL.key, ping6(C6, H6), 52, 0.0)


def test_rule_for_another_node_does_not_apply_here() -> None:
    f = make()  # "any" from admins applies to bob only
    assert not f.inbound(ALICE.key, udp4(A4, H4, 1, 5000), 29, 0.0)


def test_proto_any_and_star_source() -> None:
    f = make('[[allow]]\nfrom = "*"\nproto = "any"\n')
    assert f.inbound(BOB.key, tcp4(B4, H4, 1, 65535, SYN), 40, 0.0)
    assert f.inbound(BOB.key, udp4(B4, H4, 1, 0), 29, 0.0)
    assert f.inbound(BOB.key, ping6("fd00::3", H6), 52, 0.0)


def test_node_rules_add_to_the_network_policy() -> None:
    f = make(node='[[filter.allow]]\nfrom = ["bob"]\nproto = "tcp"\nports = [443]\n')
    assert f.inbound(BOB.key, tcp4(B4, H4, 1, 443, SYN), 40, 0.0)
    assert f.inbound(ALICE.key, tcp4(A4, H4, 1, 22, SYN), 40, 0.0)  # the network's still apply
    assert f.explain(BOB.key, "tcp", 443) == (True, "node rule 1 (line 1): from bob tcp 443")


def test_empty_policy_denies_all_inbound_but_replies() -> None:
    f = PacketFilter(compile_rules(EMPTY_POLICY, (), HOME, PEERS))
    assert not f.inbound(ALICE.key, ping4(A4, H4), 32, 0.0)
    assert f.outbound(ALICE.key, tcp4(H4, A4, 50000, 80, SYN), 40, 0.0)
    assert f.inbound(ALICE.key, tcp4(A4, H4, 80, 50000, SYN | ACK), 40, 0.1)
    assert not f.inbound(ALICE.key, tcp4(A4, H4, 81, 50000, SYN | ACK), 40, 0.1)  # other port: no flow


def test_replies_pass_for_every_tracked_protocol_both_versions() -> None:
    f = make("")
    cases = ((udp4(H4, A4, 5000, 53), udp4(A4, H4, 53, 5000)),
             (ping4(H4, A4, 42), ping4(A4, H4, 42, reply=True)),
             (ping6(H6, A6, 42), ping6(A6, H6, 42, reply=True)),
             (tcp6(H6, A6, 5000, 443, SYN), tcp6(A6, H6, 443, 5000, SYN | ACK)),
             (udp6(H6, A6, 5000, 53), udp6(A6, H6, 53, 5000)))
    for out, reply in cases:
        assert f.outbound(ALICE.key, out, len(out), 0.0)
        assert f.inbound(ALICE.key, reply, len(reply), 0.5)
        assert not f.inbound(BOB.key, reply, len(reply), 0.5)  # another peer: spoofed or no flow
    assert not f.inbound(ALICE.key, ping4(A4, H4, 43, reply=True), 32, 0.5)  # unknown echo id


def test_outbound_answers_open_nothing() -> None:
    f = make("")
    for flags in (SYN | ACK, RST, RST | ACK, FIN | ACK):  # answers to a packet the peer got in
        assert f.outbound(ALICE.key, tcp4(H4, A4, 22, 40000, flags), 40, 0.0)
        assert not f.inbound(ALICE.key, tcp4(A4, H4, 40000, 22, ACK), 40, 0.1)
    assert len(f.flows) == 0


def test_outbound_mid_stream_tcp_without_a_flow_is_picked_up() -> None:
    """A connection of this node's that the table lost (restart, fresh filter, idle
    timeout) keeps working: its next outbound ACK picks it up as established."""
    f = make("")
    assert f.outbound(ALICE.key, tcp4(H4, A4, 50000, 443, ACK), 40, 0.0)
    assert f.inbound(ALICE.key, tcp4(A4, H4, 443, 50000, ACK), 40, TCP_TIMEOUTS[0] + 1)  # established timeout
    assert not f.inbound(ALICE.key, tcp4(A4, H4, 443, 50001, ACK), 40, 1.0)  # another port: nothing
    g = make("")
    g.outbound(ALICE.key, tcp4(H4, A4, 50000, 443, SYN), 40, 0.0)
    g.inbound(ALICE.key, tcp4(A4, H4, 443, 50000, SYN | ACK), 40, 0.0)
    later = TCP_TIMEOUTS[1] + 1  # idle past the established timeout
    assert g.outbound(ALICE.key, tcp4(H4, A4, 50000, 443, ACK), 40, later)
    assert g.inbound(ALICE.key, tcp4(A4, H4, 443, 50000, ACK), 40, later + 1)


def test_picked_up_connection_to_an_allowed_port_stays_revocable() -> None:
    """An outbound ACK from a port the rules open to the peer may be the peer's
    connection: it is tracked as the peer's, and a swap that closes the port cuts it."""
    f = make()  # alice may reach tcp/22
    assert f.outbound(ALICE.key, tcp4(H4, A4, 22, 40000, ACK), 40, 0.0)
    assert f.inbound(ALICE.key, tcp4(A4, H4, 40000, 22, ACK), 40, 0.1)
    f.swap(compile_rules(EMPTY_POLICY, (), HOME, PEERS), 1.0)
    assert not f.outbound(ALICE.key, tcp4(H4, A4, 22, 40000, ACK), 40, 2.0)
    assert not f.inbound(ALICE.key, tcp4(A4, H4, 40000, 22, ACK), 40, 2.0)
    assert f.drops[e.FLOW_REVOKED] == 2


def test_swap_revokes_a_tcp_connection_the_peer_opened() -> None:
    f = make()
    assert f.inbound(ALICE.key, tcp4(A4, H4, 40000, 22, SYN), 40, 0.0)
    f.outbound(ALICE.key, tcp4(H4, A4, 22, 40000, SYN | ACK), 40, 0.0)
    f.swap(compile_rules(EMPTY_POLICY, (), HOME, PEERS), 1.0)
    assert not f.outbound(ALICE.key, tcp4(H4, A4, 22, 40000, ACK), 40, 2.0)  # no pickup of a revoked one
    assert not f.inbound(ALICE.key, tcp4(A4, H4, 40000, 22, ACK), 40, 2.0)


def test_echo_request_is_never_a_reply() -> None:
    f = make("")  # deny all
    assert f.outbound(ALICE.key, ping4(H4, A4, 42), 32, 0.0)
    assert not f.inbound(ALICE.key, ping4(A4, H4, 42), 32, 0.1)  # alice's request, same identifier
    assert f.outbound(ALICE.key, ping6(H6, A6, 42), 52, 0.0)
    assert not f.inbound(ALICE.key, ping6(A6, H6, 42), 52, 0.1)
    assert f.drops[e.DENIED] == 2
    assert f.inbound(ALICE.key, ping4(A4, H4, 42, reply=True), 32, 0.2)


def test_one_peer_cannot_take_the_whole_table() -> None:
    f = make('[[allow]]\nfrom = "*"\nproto = "udp"\nports = "*"\n', max_flows=10)
    f = PacketFilter(f.compiled, max_flows=10, max_flows_per_peer=4)
    for port in range(6):
        f.inbound(ALICE.key, udp4(A4, H4, 1000 + port, 53), 29, 0.0)
    assert len(f.flows) == 4 and f.drops[e.CONNTRACK_PEER_FULL] == 2 and f.drops[e.CONNTRACK_FULL] == 0
    assert f.inbound(BOB.key, udp4(B4, H4, 1000, 53), 29, 0.0)  # others unaffected
    for port in range(5):  # this node's own flows count against the table only
        assert f.outbound(ALICE.key, udp4(H4, A4, 2000 + port, 53), 29, 0.0)
    assert not f.outbound(ALICE.key, udp4(H4, A4, 3000, 53), 29, 0.0)
    assert f.drops[e.CONNTRACK_FULL] == 1
    assert f.inbound(ALICE.key, udp4(A4, H4, 1000 + 9, 53), 29, UDP_TIMEOUTS[0] + 2)  # expired ones free the share


def test_per_peer_share_defaults_to_an_eighth_at_least_256() -> None:
    assert make(max_flows=65_536).flows.peer_limit == 8192
    assert make(max_flows=1000).flows.peer_limit == 256


def test_anti_spoofing() -> None:
    f = make('[[allow]]\nfrom = "*"\nproto = "any"\n')
    assert not f.inbound(ALICE.key, tcp4(C4, H4, 1, 22, SYN), 40, 0.0)  # carol's address from alice
    assert not f.inbound(ALICE.key, tcp4("10.2.0.1", H4, 1, 22, SYN), 40, 0.0)  # bob's route
    assert f.inbound(BOB.key, tcp4("10.2.0.1", H4, 1, 22, SYN), 40, 0.0)
    assert f.drops[e.SPOOFED] == 2 and f.spoofed == {"alice": 2}


def test_route_cannot_speak_for_another_member() -> None:
    wide = ALICE.__class__("bob", BOB.key, BOB.ipv4, BOB.ipv6, (__import__("ipaddress").ip_network("100.64.0.0/24"),))
    f = PacketFilter(compile_rules(parse_policy('[[allow]]\nfrom = "*"\nproto = "any"\n'), (), HOME, (ALICE, wide)))
    assert f.inbound(BOB.key, tcp4("100.64.0.77", H4, 1, 22, SYN), 40, 0.0)  # inside its route
    assert not f.inbound(BOB.key, tcp4(A4, H4, 1, 22, SYN), 40, 0.0)  # alice's address
    assert not f.inbound(BOB.key, tcp4(H4, H4, 1, 22, SYN), 40, 0.0)  # this node's
    assert f.spoofed["bob"] == 2
    assert {"from": "100.64.0.2/32", "spoofed": True} in f.effective(BOB.key)


def test_destination_must_be_this_node() -> None:
    f = make('[[allow]]\nfrom = "*"\nproto = "any"\n')
    assert f.inbound(ALICE.key, udp4(A4, "10.1.2.3", 1, 2), 29, 0.0)  # this node's route
    assert not f.inbound(ALICE.key, udp4(A4, C4, 1, 2), 29, 0.0)
    assert f.drops[e.NOT_FOR_THIS_NODE] == 1


def test_outbound_to_known_peers_only_and_from_this_node() -> None:
    f = make("")
    assert f.outbound(BOB.key, udp4("10.1.9.9", "10.2.3.4", 1, 2), 29, 0.0)  # route to route
    assert not f.outbound(ALICE.key, udp4(H4, C4, 1, 2), 29, 0.0)
    assert not f.outbound(ALICE.key, udp4("192.0.2.1", A4, 1, 2), 29, 0.0)
    assert not f.outbound(b"\x09" * 32, udp4(H4, A4, 1, 2), 29, 0.0)
    assert not f.inbound(b"\x09" * 32, udp4(A4, H4, 1, 2), 29, 0.0)
    assert f.drops == {e.NOT_A_PEER_ADDRESS: 1, e.NOT_FROM_THIS_NODE: 1, e.UNKNOWN_PEER: 2}


def test_parser_drops_are_counted_both_ways() -> None:
    f = make()
    frag = ipv4(A4, H4, p.UDP, bytes(8), fragment=0x2000)
    assert not f.inbound(ALICE.key, frag, len(frag), 0.0)
    assert not f.outbound(ALICE.key, frag, len(frag), 0.0)
    assert f.drops[p.FRAGMENTED] == 2


def test_udp_flow_expires_after_its_timeout_and_lives_while_used() -> None:
    f = make("")
    f.outbound(ALICE.key, udp4(H4, A4, 5000, 53), 29, 0.0)
    assert not f.inbound(ALICE.key, udp4(A4, H4, 53, 5000), 29, UDP_TIMEOUTS[0] + 0.1)
    f.outbound(ALICE.key, udp4(H4, A4, 5000, 53), 29, 100.0)
    assert f.inbound(ALICE.key, udp4(A4, H4, 53, 5000), 29, 101.0)  # now answered: long timeout
    assert f.inbound(ALICE.key, udp4(A4, H4, 53, 5000), 29, 101.0 + UDP_TIMEOUTS[1] - 1)


def test_tcp_states_set_the_timeouts() -> None:
    f = make("")
    syn = tcp4(H4, A4, 5000, 80, SYN)
    f.outbound(ALICE.key, syn, 40, 0.0)
    f.inbound(ALICE.key, tcp4(A4, H4, 80, 5000, SYN | ACK), 40, 1.0)
    assert f.inbound(ALICE.key, tcp4(A4, H4, 80, 5000), 40, 1.0 + TCP_TIMEOUTS[1] - 1)  # established
    f.outbound(ALICE.key, tcp4(H4, A4, 5000, 80, RST), 40, 2.0 + TCP_TIMEOUTS[1])
    now = 2.0 + TCP_TIMEOUTS[1] + TCP_TIMEOUTS[3] + 0.1
    assert not f.inbound(ALICE.key, tcp4(A4, H4, 80, 5000), 40, now)  # closed by RST: 10 s
    f.outbound(ALICE.key, syn, 40, now)  # the same ports again: a new connection
    f.outbound(ALICE.key, tcp4(H4, A4, 5000, 80, FIN | ACK), 40, now + 1)
    assert f.inbound(ALICE.key, tcp4(A4, H4, 80, 5000, FIN | ACK), 40, now + TCP_TIMEOUTS[2])


def test_full_table_drops_new_flows_and_counts_them() -> None:
    f = make("", max_flows=3)
    for port in range(5):
        f.outbound(ALICE.key, udp4(H4, A4, 5000 + port, 53), 29, 0.0)
    assert len(f.flows) == 3 and f.drops[e.CONNTRACK_FULL] == 2
    assert f.outbound(ALICE.key, udp4(H4, A4, 6000, 53), 29, UDP_TIMEOUTS[0] + 2)  # expired ones make room
    assert len(f.flows) == 1


def test_swap_keeps_allowed_flows_and_drops_the_others() -> None:
    two_ports = '[[allow]]\nfrom = "*"\nproto = "udp"\nports = [53, 123]\n'
    f = make(two_ports)
    for port in (53, 123):
        assert f.inbound(ALICE.key, udp4(A4, H4, 5000, port), 29, 0.0)
        assert f.outbound(ALICE.key, udp4(H4, A4, port, 5000), 29, 0.1)  # answers
    f.outbound(ALICE.key, udp4(H4, A4, 7000, 9), 29, 0.2)  # a flow of this node's own
    f.swap(compile_rules(parse_policy(two_ports.replace("53, ", "")), (), HOME, PEERS), 1.0)
    assert f.inbound(ALICE.key, udp4(A4, H4, 5000, 123), 29, 2.0)
    assert not f.outbound(ALICE.key, udp4(H4, A4, 53, 5000), 29, 2.0)  # its answer can't reopen it
    assert not f.inbound(ALICE.key, udp4(A4, H4, 5000, 53), 29, 2.0)
    assert f.drops[e.FLOW_REVOKED] == 2 and f.drops[e.DENIED] == 0
    assert f.inbound(ALICE.key, udp4(A4, H4, 9, 7000), 29, 2.0)  # own flows are kept
    assert not f.outbound(ALICE.key, udp4(H4, A4, 53, 5000), 29, 100.0)  # closed both ways while in use
    assert f.outbound(ALICE.key, udp4(H4, A4, 53, 5000), 29, 100.0 + UDP_TIMEOUTS[1])  # idle: gone


def test_swap_drops_flows_of_a_peer_that_left() -> None:
    f = make("")
    f.outbound(BOB.key, tcp4(H4, B4, 5000, 80, SYN), 40, 0.0)
    f.swap(compile_rules(EMPTY_POLICY, (), HOME, (ALICE,)), 1.0)
    assert not f.inbound(BOB.key, tcp4(B4, H4, 80, 5000, SYN | ACK), 40, 2.0)
    assert f.drops[e.UNKNOWN_PEER] == 1


def test_rule_hits_count_new_flows_and_survive_a_swap_of_unchanged_rules() -> None:
    f = make()
    f.inbound(ALICE.key, tcp4(A4, H4, 1, 22, SYN), 40, 0.0)
    f.inbound(ALICE.key, tcp4(A4, H4, 1, 22, ACK), 40, 0.0)  # the same connection
    f.inbound(CAROL.key, udp4(C4, H4, 1, 9999), 29, 0.0)
    f.inbound(CAROL.key, udp4(C4, H4, 1, 9999), 29, 0.0)  # the same flow
    f.inbound(CAROL.key, ping4(C4, H4), 32, 0.0)
    f.inbound(CAROL.key, ping4(C4, H4), 32, 0.0)  # each echo request is a new exchange
    f.swap(compile_rules(parse_policy(POLICY), parse_node_rules_text(
        '[[filter.allow]]\nfrom = "bob"\nproto = "udp"\nports = "*"\n'), HOME, PEERS), 1.0)
    stats = f.stats()
    assert stats["rules"][0] == {"rule": "node rule 1 (line 1): from bob udp *", "hits": 0}  # type: ignore[index]
    assert [rule["hits"] for rule in stats["rules"][1:5]] == [1, 1, 0, 2]  # type: ignore[index]
    assert stats["flows"] == 2 and stats["max_flows"] == 1000


def test_denied_counts_every_denied_packet_retransmits_included() -> None:
    f = make()
    for _ in range(3):
        f.inbound(CAROL.key, tcp4(C4, H4, 1, 22, SYN), 40, 0.0)
    assert f.drops[e.DENIED] == 3 and list(f.recent_denied) == [("carol", "tcp", 22)] * 3


def test_explain_names_the_first_rule_or_says_default_deny() -> None:
    f = make()
    assert f.explain(ALICE.key, "tcp", 22) == (True, "network rule 1 (line 8): from group:admins to tag:home tcp 22")
    assert f.explain(CAROL.key, "udp", 8050)[1].startswith("network rule 2 (line 14): from carol to * tcp/udp 8000-8100,9999")
    allowed, why = f.explain(ALICE.key, "icmpv6")
    assert not allowed and "default deny" in why
    assert f.explain(b"\x09" * 32, "tcp", 22)[0] is False


def test_effective_lists_each_origin() -> None:
    f = make()
    shown = f.effective(BOB.key)
    assert shown[0] == {"from": B4, "tcp": "", "udp": "", "icmp": True, "icmpv6": False}
    assert {"from": "10.2.5.0/24", "tcp": "", "udp": "53", "icmp": True, "icmpv6": False} in shown
    assert f.effective(b"\x09" * 32) == []


def test_undefined_group_in_node_rules_is_a_warning() -> None:
    f = make(node='[[filter.allow]]\nfrom = "group:ops"\nproto = "icmp"\n')
    assert f.compiled.warnings == ("node rule 1 (line 1): from group:ops icmp: group:ops is not defined in the "
                                   "network policy: it matches no one",)


# -- RELATED: ICMP errors about tracked flows (port unreachable, frag needed, too big)

DAVE = member("dave", 5, ("fd00:9::/32",))  # a peer routing an IPv6 LAN
TCP_443 = '[[allow]]\nfrom = "*"\nproto = "tcp"\nports = [443]\n'


def related(policy: str = "") -> PacketFilter:
    return PacketFilter(compile_rules(parse_policy(policy), (), HOME, (*PEERS, DAVE)))


def test_inbound_port_unreachable_for_this_nodes_udp_flow_passes() -> None:
    for v, home, peer, router, port_unreachable in ((4, H4, A4, A4, 3), (6, H6, A6, A6, 4)):
        f = related()
        sent = (udp4 if v == 4 else udp6)(home, peer, 5000, 53)
        assert f.outbound(ALICE.key, sent, len(sent), 0.0)
        error = icmp_error(router, home, sent, code=port_unreachable)
        assert f.inbound(ALICE.key, error, len(error), 1.0), v
        assert f.related == 1 and not f.drops and f.stats()["related"] == 1


def test_inbound_frag_needed_and_packet_too_big_for_tcp_pass_from_a_router_in_the_peers_route() -> None:
    for peer, home, remote, router, kind, code in ((BOB, H4, "10.2.3.4", "10.2.0.1", 3, 4),
                                                   (DAVE, H6, "fd00:9::80", "fd00:9::1", 2, 0)):
        f = related()
        sent = (tcp4 if home == H4 else tcp6)(home, remote, 5000, 443, SYN)
        assert f.outbound(peer.key, sent, len(sent), 0.0)
        error = icmp_error(router, home, sent[:len(sent) - 12], kind=kind, code=code, rest=1280)  # 8 bytes of TCP
        assert f.inbound(peer.key, error, len(error), 1.0), peer.name
        assert f.related == 1


def test_outbound_port_unreachable_for_the_peers_answer_passes() -> None:
    for home, peer in ((H4, A4), (H6, A6)):
        f = related()
        make_udp = udp4 if home == H4 else udp6
        f.outbound(ALICE.key, make_udp(home, peer, 5000, 53), 60, 0.0)
        answer = make_udp(peer, home, 53, 5000)
        assert f.inbound(ALICE.key, answer, len(answer), 0.1)
        error = icmp_error(home, peer, answer, code=3 if home == H4 else 4)  # the socket has closed since
        assert f.outbound(ALICE.key, error, len(error), 1.0) and f.related == 1


def test_outbound_frag_needed_and_packet_too_big_for_a_tcp_flow_the_peer_opened() -> None:
    for local, router, kind, code in (("10.1.2.3", "10.1.0.1", 3, 4), (H6, H6, 2, 0)):
        f = related(TCP_443)
        peer = A4 if local != H6 else A6
        syn = (tcp4 if local != H6 else tcp6)(peer, local, 40000, 443, SYN)
        assert f.inbound(ALICE.key, syn, len(syn), 0.0)
        error = icmp_error(router, peer, syn, kind=kind, code=code, rest=1280)
        assert f.outbound(ALICE.key, error, len(error), 1.0), local
        assert f.related == 1


def test_inbound_error_about_this_nodes_ping_passes_about_its_echo_reply_does_not() -> None:
    f = related()
    for home, peer, ping in ((H4, A4, ping4), (H6, A6, ping6)):
        f.outbound(ALICE.key, ping(home, peer, 42), 60, 0.0)
        exceeded = icmp_error(peer, home, ping(home, peer, 42), kind=11 if home == H4 else 3)
        assert f.inbound(ALICE.key, exceeded, len(exceeded), 0.5)
        reply = icmp_error(peer, home, ping(home, peer, 42, reply=True), kind=11 if home == H4 else 3)
        assert not f.inbound(ALICE.key, reply, len(reply), 0.5)
    assert f.related == 2 and f.drops == {e.UNRELATED: 2}


BOTH_VERSIONS = ((H4, A4, B4, udp4, tcp4), (H6, A6, "fd00::3", udp6, tcp6))


def unrelated_errors() -> list[tuple[str, bytes, bytearray]]:
    """(direction, peer key, error) about no flow of that peer, with this node holding
    udp 5000->53 to alice and bob, and alice's tcp 40000->443 (both versions)."""
    cases: list[tuple[str, bytes, bytearray]] = []
    for home, alice, bob, make_udp, make_tcp in BOTH_VERSIONS:
        cases += [
            ("in", ALICE.key, icmp_error(alice, home, make_udp(home, alice, 5001, 53))),  # untracked port
            ("in", ALICE.key, icmp_error(alice, home, make_tcp(home, alice, 5000, 53))),  # other protocol
            ("in", BOB.key, icmp_error(bob, home, make_udp(home, alice, 5000, 53))),  # alice's flow, from bob
            ("in", ALICE.key, icmp_error(alice, home, make_udp(home, bob, 5000, 53))),  # bob's flow, from alice
            ("in", ALICE.key, icmp_error(alice, home, make_udp(alice, home, 53, 5000))),  # quotes alice's own packet
            ("out", ALICE.key, icmp_error(home, alice, make_udp(home, alice, 5000, 53))),  # quotes this node's
            ("out", ALICE.key, icmp_error(home, alice, make_tcp(alice, home, 40001, 443, SYN))),
            ("out", BOB.key, icmp_error(home, bob, make_tcp(alice, home, 40000, 443, SYN))),  # not to the quoted source
        ]
    cases.append(("in", ALICE.key, icmp_error(A4, "10.1.2.3", udp4(H4, A4, 5000, 53))))  # not to the quoted source
    return cases


def test_errors_about_no_flow_of_that_peer_are_dropped_both_ways() -> None:
    for direction, key, error in unrelated_errors():
        f = related(TCP_443)
        for home, alice, bob, make_udp, make_tcp in BOTH_VERSIONS:
            for peer, address in ((ALICE.key, alice), (BOB.key, bob)):
                sent = make_udp(home, address, 5000, 53)
                assert f.outbound(peer, sent, len(sent), 0.0)
            syn = make_tcp(alice, home, 40000, 443, SYN)
            assert f.inbound(ALICE.key, syn, len(syn), 0.0)
        flows = len(f.flows)
        passed = (f.inbound if direction == "in" else f.outbound)(key, error, len(error), 1.0)
        assert not passed and f.drops == {e.UNRELATED: 1} and f.related == 0, (direction, bytes(error).hex())
        assert len(f.flows) == flows


def test_malformed_or_truncated_quote_is_dropped_with_its_reason() -> None:
    f = related()
    sent = udp4(H4, A4, 5000, 53)
    f.outbound(ALICE.key, sent, len(sent), 0.0)
    for quoted in (sent[:27], sent[:19], ipv4(H4, A4, p.UDP, bytes(sent[20:]), fragment=0x0010)):
        error = icmp_error(A4, H4, quoted)
        assert not f.inbound(ALICE.key, error, len(error), 1.0)
    assert f.drops == {p.BAD_QUOTE: 3} and f.related == 0


def test_an_error_never_opens_or_refreshes_a_flow() -> None:
    f = related()
    error = icmp_error(A4, H4, udp4(H4, A4, 5000, 53))
    assert not f.inbound(ALICE.key, error, len(error), 0.0) and len(f.flows) == 0  # no flow: none opened
    answer = icmp_error(H4, A4, udp4(A4, H4, 53, 5000))
    assert not f.outbound(ALICE.key, answer, len(answer), 0.0) and len(f.flows) == 0
    sent = udp4(H4, A4, 5000, 53)
    f.outbound(ALICE.key, sent, len(sent), 0.0)
    (flow,) = f.flows.flows.values()
    expires = flow.expires
    assert f.inbound(ALICE.key, error, len(error), 20.0)
    assert flow.expires == expires and flow.state == 0 and len(f.flows) == 1  # not refreshed, not answered
    assert not f.inbound(ALICE.key, error, len(error), UDP_TIMEOUTS[0] + 1)  # the flow has expired
    assert f.drops == {e.UNRELATED: 3}


def test_error_about_a_revoked_flow_is_dropped() -> None:
    f = related(TCP_443)
    syn = tcp4(A4, H4, 40000, 443, SYN)
    f.inbound(ALICE.key, syn, len(syn), 0.0)
    f.swap(compile_rules(EMPTY_POLICY, (), HOME, (*PEERS, DAVE)), 1.0)
    error = icmp_error(H4, A4, syn, code=4, rest=1280)
    assert not f.outbound(ALICE.key, error, len(error), 2.0)
    assert f.drops == {e.FLOW_REVOKED: 1}


def test_error_about_a_flow_whose_remote_left_the_peers_routes_is_dropped() -> None:
    f = related()
    sent = udp4(H4, "10.2.3.4", 5000, 53)
    assert f.outbound(BOB.key, sent, len(sent), 0.0)
    routeless = BOB.__class__("bob", BOB.key, BOB.ipv4, BOB.ipv6, ())
    f.swap(compile_rules(EMPTY_POLICY, (), HOME, (ALICE, routeless, CAROL, DAVE)), 1.0)
    error = icmp_error(B4, H4, sent)
    assert not f.inbound(BOB.key, error, len(error), 2.0) and f.drops == {e.UNRELATED: 1}
