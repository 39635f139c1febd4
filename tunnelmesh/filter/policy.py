"""The filter's rules and the policy documents that hold them (sans-IO, no clock).

There are only allow-rules. A rule says who may open new flows (`from`), to which
nodes (`to`, network policy only: a node's own rules are about itself), with which
protocols and destination ports. Two documents hold them:

- the network policy (admin-written, signed and distributed; docs/filter.md):
  ``[groups]`` and ``[tags]`` (name -> member names), then ``[[allow]]`` rules;
- a node's own rules, ``[[filter.allow]]`` in its config: what this node accepts on
  top of the network's. They may name the network policy's groups and tags.

A source selector is a member name, ``group:NAME``, ``tag:NAME``, a CIDR or single
address (matching packets whose inner source is inside it: a member's mesh address
or an address of a route it advertises) or ``*`` (every member). Targets (`to`) are
the same minus CIDRs. Protocols: tcp, udp, icmp (echo), icmpv6 (echo), or any (all
four). Ports: ``"*"``, a number, ``"lo-hi"``, or a list of these; required when tcp or
udp is named, refused for icmp/icmpv6-only rules, only ``"*"`` with ``any``.

Parsing refuses an invalid document with `PolicyError` (a `ConfigError`): its path,
the line of the offending key (`Locator`) and the reason; the caller keeps the old
policy. See docs/filter.md for how rules combine and are evaluated.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tunnelmesh.config.locator import Locator
from tunnelmesh.config.model import ConfigError
from tunnelmesh.fields import NAME_RULE, is_name, shown

PROTOCOLS = ("tcp", "udp", "icmp", "icmpv6")
PORTED = frozenset(("tcp", "udp"))
ALL_PORTS = ((0, 65535),)
MAX_POLICY_BYTES = 1 << 20
MAX_RULES = 10_000
MAX_LIST = 10_000  # selectors, ports, or group members in one list

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
_RANGE_RE = re.compile(r"([0-9]{1,5})-([0-9]{1,5})")
_TOML_POS_RE = re.compile(r" \(at line (\d+), column (\d+)\)$")


class PolicyError(ConfigError):
    """A policy document (or a node's [filter] table) that cannot be used."""


@dataclasses.dataclass(frozen=True, slots=True)
class Selector:
    """Who a rule is about: kind "any", "member", "group", "tag" or "cidr"."""

    kind: str
    name: str = ""
    network: IPNetwork | None = None

    def __str__(self) -> str:
        if self.kind == "any":
            return "*"
        if self.kind == "cidr":
            return str(self.network)
        return self.name if self.kind == "member" else f"{self.kind}:{self.name}"


EVERYONE = Selector("any")


@dataclasses.dataclass(frozen=True, slots=True)
class Rule:
    """One allow-rule. Equal rules (whatever their place) share a hit counter."""

    sources: tuple[Selector, ...]
    targets: tuple[Selector, ...]
    protocols: frozenset[str]
    ports: tuple[tuple[int, int], ...]  # merged, sorted; used for tcp/udp only
    origin: str  # "node" or "network"
    number: int = dataclasses.field(default=0, compare=False)  # 1-based, in its document
    line: int | None = dataclasses.field(default=None, compare=False)

    def describe(self) -> str:
        where = f"{self.origin} rule {self.number}" + (f" (line {self.line})" if self.line else "")
        protos = "/".join(p for p in PROTOCOLS if p in self.protocols)
        text = f"{where}: from {', '.join(map(str, self.sources))}"
        if self.origin == "network":
            text += f" to {', '.join(map(str, self.targets))}"
        text += f" {protos}"
        if self.protocols & PORTED:
            text += " " + format_ports(self.ports)
        return text


@dataclasses.dataclass(frozen=True, slots=True)
class Policy:
    """A checked network policy: groups, tags (name -> member names) and its rules."""

    groups: Mapping[str, frozenset[str]]
    tags: Mapping[str, frozenset[str]]
    rules: tuple[Rule, ...]


#: No network policy yet: nothing is allowed in but replies (docs/filter.md).
EMPTY_POLICY = Policy({}, {}, ())


def format_ports(ports: tuple[tuple[int, int], ...]) -> str:
    if ports == ALL_PORTS:
        return "*"
    return ",".join(str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in ports)


class _Reader:
    """The checks, raising PolicyError at the line of what they check."""

    def __init__(self, path: Path, loc: Locator) -> None:
        self.path = path
        self.loc = loc

    def error(self, message: str, *where: Any) -> PolicyError:
        return PolicyError(self.path, self.loc.line_of(*where), message)

    def keys(self, table: Any, allowed: tuple[str, ...], what: str, *where: Any) -> Mapping[str, Any]:
        if not isinstance(table, dict):
            raise self.error(f"{what}: expected a table", *where)
        for key in table:
            if key not in allowed:
                raise self.error(f"{what}: unknown key {shown(key)} (expected one of: {', '.join(allowed)})", *where, key)
        return table

    def strings(self, value: Any, what: str, *where: Any) -> list[str]:
        """A string or a list of strings, as a list."""
        items = value if isinstance(value, list) else [value]
        if len(items) > MAX_LIST:
            raise self.error(f"{what}: more than {MAX_LIST} entries", *where)
        if not items:
            raise self.error(f"{what}: empty list", *where)
        for i, item in enumerate(items):
            if not isinstance(item, str):
                raise self.error(f"{what}: expected a string or a list of strings", *where, *((i,) if isinstance(value, list) else ()))
        return items

    def name_sets(self, data: Mapping[str, Any], key: str) -> dict[str, frozenset[str]]:
        table = data.get(key, {})
        if not isinstance(table, dict):
            raise self.error(f"[{key}]: expected a table of name = [member names]", key)
        out: dict[str, frozenset[str]] = {}
        for name, members in table.items():
            if not is_name(name):
                raise self.error(f"[{key}] {shown(name)}: a name {NAME_RULE}", key, name)
            if not isinstance(members, list):
                raise self.error(f"[{key}] {name}: expected a list of member names", key, name)
            for i, member in enumerate(self.strings(members, f"[{key}] {name}", key, name) if members else []):
                if not is_name(member):
                    raise self.error(f"[{key}] {name}: {shown(member)} is not a member name ({NAME_RULE})", key, name, i)
            out[name] = frozenset(members)
        return out

    def selector(self, text: str, what: str, where: tuple[Any, ...], sets: Mapping[str, Mapping[str, Any]] | None,
                 cidr: bool) -> Selector:
        if text == "*":
            return EVERYONE
        kind, sep, name = text.partition(":")
        if sep and kind in ("group", "tag"):
            if not is_name(name):
                raise self.error(f"{what}: {shown(text)}: a {kind} name {NAME_RULE}", *where)
            if sets is not None and name not in sets[kind]:
                raise self.error(f"{what}: {kind} {shown(name)} is not defined in [{kind}s]", *where)
            return Selector(kind, name)
        if is_name(text):
            return Selector("member", text)
        if not cidr:
            raise self.error(f"{what}: {shown(text)} is not a member name, group:NAME, tag:NAME or \"*\"", *where)
        try:
            return Selector("cidr", network=ipaddress.ip_network(text, strict=True))
        except ValueError:
            pass
        try:
            loose = ipaddress.ip_network(text, strict=False)
        except ValueError:
            raise self.error(f"{what}: {shown(text)} is not a member name, group:NAME, tag:NAME, address, CIDR "
                             "or \"*\"", *where) from None
        raise self.error(f"{what}: {shown(text)} has host bits set (did you mean {loose}?)", *where)

    def ports(self, value: Any, what: str, where: tuple[Any, ...]) -> tuple[tuple[int, int], ...]:
        items = value if isinstance(value, list) else [value]
        if not items or len(items) > MAX_LIST:
            raise self.error(f"{what}: expected 1 to {MAX_LIST} entries", *where)
        spans: list[tuple[int, int]] = []
        for i, item in enumerate(items):
            at = where + ((i,) if isinstance(value, list) else ())
            if item == "*":
                spans.append(ALL_PORTS[0])
                continue
            if isinstance(item, int) and not isinstance(item, bool):
                lo = hi = item
            elif isinstance(item, str) and (m := _RANGE_RE.fullmatch(item)):
                lo, hi = int(m.group(1)), int(m.group(2))
            else:
                raise self.error(f"{what}: {shown(str(item))}: expected a port number, \"lo-hi\" or \"*\"", *at)
            if not 0 <= lo <= hi <= 65535:
                shown_span = str(lo) if lo == hi else f"{lo}-{hi}"
                raise self.error(f"{what}: {shown_span}: ports are 0 to 65535, low end first", *at)
            spans.append((lo, hi))
        spans.sort()
        merged: list[tuple[int, int]] = []
        for lo, hi in spans:  # overlapping or adjacent spans become one: one canonical form
            if merged and lo <= merged[-1][1] + 1:
                merged[-1] = (merged[-1][0], max(hi, merged[-1][1]))
            else:
                merged.append((lo, hi))
        return tuple(merged)

    def rule(self, raw: Any, where: tuple[Any, ...], number: int, origin: str,
             sets: Mapping[str, Mapping[str, Any]] | None) -> Rule:
        what = f"{origin} rule {number}"
        allowed = ("from", "to", "proto", "ports") if origin == "network" else ("from", "proto", "ports")
        table = self.keys(raw, allowed, what, *where)
        for key in ("from", "proto"):
            if key not in table:
                raise self.error(f"{what}: missing {key!r}", *where)
        sources = tuple(self.selector(text, f"{what}: from", where + ("from",), sets, cidr=True)
                        for text in self.strings(table["from"], f"{what}: from", *where, "from"))
        targets: tuple[Selector, ...] = (EVERYONE,)
        if "to" in table:
            targets = tuple(self.selector(text, f"{what}: to", where + ("to",), sets, cidr=False)
                            for text in self.strings(table["to"], f"{what}: to", *where, "to"))
        protocols: set[str] = set()
        for proto in self.strings(table["proto"], f"{what}: proto", *where, "proto"):
            if proto == "any":
                protocols.update(PROTOCOLS)
            elif proto in PROTOCOLS:
                protocols.add(proto)
            else:
                raise self.error(f"{what}: proto {shown(proto)}: expected tcp, udp, icmp, icmpv6 or any", *where, "proto")
        ports: tuple[tuple[int, int], ...] = ()
        if "ports" in table:
            if not protocols & PORTED:
                raise self.error(f"{what}: ports: icmp and icmpv6 have no ports; remove 'ports'", *where, "ports")
            ports = self.ports(table["ports"], f"{what}: ports", where + ("ports",))
            if protocols >= set(PROTOCOLS) and ports != ALL_PORTS:
                raise self.error(f"{what}: proto 'any' takes ports = \"*\" (or no 'ports'); to open a port for "
                                 "tcp and udp write proto = [\"tcp\", \"udp\"]", *where, "ports")
        elif protocols >= set(PROTOCOLS):
            ports = ALL_PORTS
        elif protocols & PORTED:
            raise self.error(f"{what}: missing 'ports' (e.g. ports = [22], [\"8000-8100\"] or \"*\")", *where)
        return Rule(sources, targets, frozenset(protocols), ports, origin, number, self.loc.line_of(*where))

    def rules(self, value: Any, where: tuple[Any, ...], origin: str,
              sets: Mapping[str, Mapping[str, Any]] | None) -> tuple[Rule, ...]:
        if not isinstance(value, list):
            raise self.error("allow: expected [[allow]] tables", *where)
        if len(value) > MAX_RULES:
            raise self.error(f"allow: more than {MAX_RULES} rules", *where)
        return tuple(self.rule(raw, where + (i,), i + 1, origin, sets) for i, raw in enumerate(value))


def _load(text: str, path: Path) -> Mapping[str, Any]:
    if len(text) > MAX_POLICY_BYTES:
        raise PolicyError(path, None, f"policy is larger than {MAX_POLICY_BYTES} bytes")
    try:
        return tomllib.loads(text.removeprefix("\ufeff"))
    except tomllib.TOMLDecodeError as exc:
        message, line = str(exc), None
        if m := _TOML_POS_RE.search(message):
            line, message = int(m.group(1)), f"{message[: m.start()]} (column {m.group(2)})"
        raise PolicyError(path, line, f"invalid TOML: {message}") from None
    except (RecursionError, ValueError) as exc:
        raise PolicyError(path, None, f"invalid TOML: {type(exc).__name__}") from None


def parse_policy(text: str, path: Path | str = "<network policy>") -> Policy:
    """Check a network policy document. Raises PolicyError only."""
    path = Path(path)
    data = _load(text, path)
    try:
        reader = _Reader(path, Locator(text.removeprefix("\ufeff")))
        reader.keys(data, ("groups", "tags", "allow"), "top level")
        sets = {"group": reader.name_sets(data, "groups"), "tag": reader.name_sets(data, "tags")}
        rules = reader.rules(data.get("allow", []), ("allow",), "network", sets)
        return Policy(sets["group"], sets["tag"], rules)
    except PolicyError:
        raise
    except RecursionError:
        raise PolicyError(path, None, "policy nested too deeply") from None


def parse_node_rules(table: Any, loc: Locator, path: Path, where: tuple[Any, ...] = ("filter",)) -> tuple[Rule, ...]:
    """Check a node config's ``[filter]`` table (``loc`` is the config's Locator and
    ``where`` the table's key path in it). Groups and tags it names are the network
    policy's, resolved when compiling. Raises PolicyError only."""
    reader = _Reader(Path(path), loc)
    reader.keys(table, ("allow",), "[filter]", *where)
    return reader.rules(table.get("allow", []), where + ("allow",), "node", None)


def parse_node_rules_text(text: str, path: Path | str = "<node rules>") -> tuple[Rule, ...]:
    """The ``[filter]`` table of a whole node-config-shaped TOML text (other tables
    ignored): for tests and `tunnelmesh filter` commands that read the config."""
    path = Path(path)
    data = _load(text, path)
    return parse_node_rules(data.get("filter", {}), Locator(text.removeprefix("\ufeff")), path)
