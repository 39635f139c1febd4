"""Policy documents: what they mean once parsed, and each refusal with its line."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from tunnelmesh.config import Locator
from tunnelmesh.filter import (
    STARTER_POLICY,
    PolicyError,
    Selector,
    parse_node_rules,
    parse_node_rules_text,
    parse_policy,
)
from tunnelmesh.filter.policy import ALL_PORTS, EVERYONE


def refusal(text: str) -> PolicyError:
    with pytest.raises(PolicyError) as info:
        parse_policy(text, "policy.toml")
    return info.value


def test_starter_policy_allows_echo_from_everyone_and_nothing_else() -> None:
    policy = parse_policy(STARTER_POLICY)
    assert len(policy.rules) == 1
    rule = policy.rules[0]
    assert (rule.sources, rule.targets, rule.protocols, rule.ports) == ((EVERYONE,), (EVERYONE,),
                                                                        frozenset({"icmp", "icmpv6"}), ())
    assert STARTER_POLICY.splitlines()[rule.line - 1] == "[[allow]]"  # type: ignore[operator]


def test_full_rule_is_read() -> None:
    policy = parse_policy("""
[groups]
admins = ["alice", "bob"]
empty = []
[tags]
servers = ["db1"]
[[allow]]
from = ["group:admins", "carol", "10.0.0.0/8", "fd00::5", "*"]
to = ["tag:servers", "dave"]
proto = ["tcp", "udp"]
ports = [443, "8000-8100", 22, "8050-9000", 9001]
""")
    assert policy.groups == {"admins": frozenset({"alice", "bob"}), "empty": frozenset()}
    rule = policy.rules[0]
    assert rule.sources == (Selector("group", "admins"), Selector("member", "carol"),
                            Selector("cidr", network=ipaddress.ip_network("10.0.0.0/8")),
                            Selector("cidr", network=ipaddress.ip_network("fd00::5/128")), EVERYONE)
    assert rule.targets == (Selector("tag", "servers"), Selector("member", "dave"))
    assert rule.ports == ((22, 22), (443, 443), (8000, 9001))  # merged, sorted
    assert (rule.number, rule.line, rule.origin) == (1, 7, "network")


def test_any_means_all_four_and_every_port() -> None:
    rule = parse_policy('[[allow]]\nfrom = "*"\nproto = "any"\n').rules[0]
    assert rule.protocols == {"tcp", "udp", "icmp", "icmpv6"} and rule.ports == ALL_PORTS
    assert parse_policy('[[allow]]\nfrom = "*"\nproto = "any"\nports = "*"\n').rules[0] == rule


def test_empty_document_is_the_empty_policy() -> None:
    policy = parse_policy("# nothing yet\n")
    assert policy.rules == () and policy.groups == {} and policy.tags == {}


def test_equal_rules_compare_equal_wherever_they_are() -> None:
    text = '[[allow]]\nfrom = "*"\nproto = "icmp"\n'
    a, b = parse_policy(text + "\n" + text).rules
    assert a == b and a.line != b.line


@pytest.mark.parametrize("text, line, words", [
    ("[[allow]]\nfrom = *\n", 2, "invalid TOML"),
    ("[[allow]]\nfrom = \"*\"\nproto = \"icmp\"\nport = 5\n", 4, "unknown key 'port'"),
    ("hello = 1\n", 1, "unknown key 'hello'"),
    ("[[allow]]\nproto = \"icmp\"\n", 1, "missing 'from'"),
    ("[[allow]]\nfrom = \"*\"\n", 1, "missing 'proto'"),
    ("[[allow]]\nfrom = \"*\"\nproto = \"tcp\"\n", 1, "missing 'ports'"),
    ("[[allow]]\nfrom = \"*\"\nproto = \"gre\"\n", 3, "expected tcp, udp, icmp, icmpv6 or any"),
    ("[[allow]]\nfrom = \"*\"\nproto = \"icmp\"\nports = [1]\n", 4, "icmp and icmpv6 have no ports"),
    ("[[allow]]\nfrom = \"*\"\nproto = \"any\"\nports = [22]\n", 4, "proto 'any' takes ports"),
    ("[[allow]]\nfrom = \"*\"\nproto = \"tcp\"\nports = [\n  22,\n  70000,\n]\n", 6, "ports are 0 to 65535"),
    ("[[allow]]\nfrom = \"*\"\nproto = \"tcp\"\nports = \"9-1\"\n", 4, "low end first"),
    ("[[allow]]\nfrom = \"*\"\nproto = \"tcp\"\nports = [true]\n", 4, "expected a port number"),
    ("[[allow]]\nfrom = \"*\"\nproto = \"tcp\"\nports = []\n", 4, "expected 1 to"),
    ("[[allow]]\nfrom = \"group:ops\"\nproto = \"icmp\"\n", 2, "group 'ops' is not defined in [groups]"),
    ("[[allow]]\nfrom = \"10.0.0.1/8\"\nproto = \"icmp\"\n", 2, "did you mean 10.0.0.0/8"),
    ("[[allow]]\nfrom = \"Not A Name\"\nproto = \"icmp\"\n", 2, "is not a member name"),
    ("[[allow]]\nfrom = []\nproto = \"icmp\"\n", 2, "empty list"),
    ("[[allow]]\nfrom = [1]\nproto = \"icmp\"\n", 2, "expected a string"),
    ("[[allow]]\nfrom = \"*\"\nto = \"10.0.0.0/8\"\nproto = \"icmp\"\n", 3, "is not a member name, group:NAME"),
    ("[groups]\nAdmins = [\"a\"]\n", 2, "a name must be"),
    ("[groups]\nadmins = \"alice\"\n", 2, "expected a list of member names"),
    ("[tags]\nweb = [\"ok\", \"BAD\"]\n", 2, "'BAD' is not a member name"),
    ("allow = 5\n", 1, "expected [[allow]] tables"),
    ("[[allow]]\nfrom = \"*\"\nproto = \"icmp\"\n[[allow]]\nfrom = \"*\"\nproto = 3\n", 6, "expected a string"),
])
def test_refusals_name_the_line_and_the_reason(text: str, line: int, words: str) -> None:
    error = refusal(text)
    assert error.line == line, str(error)
    assert words in error.message, str(error)
    assert str(error).startswith(f"policy.toml:{line}: ")


def test_too_large_a_document_is_refused() -> None:
    assert "larger than" in refusal("#" * (1 << 20 + 1)).message


def test_node_rules_take_no_targets_and_may_name_undefined_groups() -> None:
    rules = parse_node_rules_text('[node]\nname = "x"\n[[filter.allow]]\nfrom = "group:ops"\nproto = "icmp"\n')
    assert rules[0].origin == "node" and rules[0].line == 3 and rules[0].sources == (Selector("group", "ops"),)
    with pytest.raises(PolicyError) as info:
        parse_node_rules_text('[[filter.allow]]\nfrom = "*"\nto = "bob"\nproto = "icmp"\n', "node.toml")
    assert info.value.line == 3 and "unknown key 'to'" in info.value.message


def test_node_rules_from_a_config_table_use_its_locator() -> None:
    text = '[node]\nname = "x"\n\n[filter]\nallow = [\n  {from = "*", proto = "tcp", ports = 99999},\n]\n'
    import tomllib
    with pytest.raises(PolicyError) as info:
        parse_node_rules(tomllib.loads(text)["filter"], Locator(text), Path("/etc/tunnelmesh.toml"))
    assert str(info.value) == "/etc/tunnelmesh.toml:6: node rule 1: ports: 99999: ports are 0 to 65535, low end first"
