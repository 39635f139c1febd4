"""Property tests for tunnelmesh.config: load_config raises ConfigError and nothing else,
whatever the file holds; valid configs round-trip; error lines point into the file."""

from __future__ import annotations

import base64
import ipaddress
import os
import stat
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from tunnelmesh.config import (
    NODE_KEYS,
    PEER_KEYS,
    ConfigError,
    NodeConfig,
    load_config,
    parse_config,
    read_network_secret,
    starter_config,
)

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

CFG_PATH = Path("/nonexistent-dir/tunnelmesh.toml")
STATE = Path("/nonexistent-dir/state")


def check(text: str) -> NodeConfig | None:
    """Parse; only ConfigError may come out, and its line must point into the text."""
    try:
        return parse_config(text, path=CFG_PATH, state_dir=STATE)
    except ConfigError as exc:
        assert exc.path == CFG_PATH
        assert isinstance(exc.message, str) and exc.message
        # the catch-all in parse_config must never be what produced the error
        assert "internal error" not in exc.message, str(exc)
        if exc.line is not None:
            assert 1 <= exc.line <= text.count("\n") + 1, (exc.line, str(exc))
        assert str(exc).startswith(f"{CFG_PATH}:")
        return None


def wg_key(seed: int) -> str:
    return base64.b64encode(seed.to_bytes(2, "big") * 16).decode()


# --------------------------------------------------------------------------- a tiny TOML writer


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        out = []
        for c in v:
            if c in '"\\':
                out.append("\\" + c)
            elif c < " " or c == "\x7f":
                out.append(f"\\u{ord(c):04x}")
            else:
                out.append(c)
        return '"' + "".join(out) + '"'
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{toml_key(k)} = {toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(v)


def toml_key(k: str) -> str:
    if k and all(c.isascii() and (c.isalnum() or c in "_-") for c in k):
        return k
    return toml_value(k)


def to_toml(node: dict[str, Any] | None, peers: list[dict[str, Any]], extra_top: dict[str, Any]) -> tuple[str, dict]:
    """Serialize; also return where each key was written: {(table..., key): line}."""
    lines: list[str] = []
    where: dict[tuple[Any, ...], int] = {}
    for k, v in extra_top.items():
        lines.append(f"{toml_key(k)} = {toml_value(v)}")
        where[(k,)] = len(lines)
    if node is not None:
        lines.append("")
        lines.append("[node]")
        where[("node",)] = len(lines)
        for k, v in node.items():
            lines.append(f"{toml_key(k)} = {toml_value(v)}")
            where[("node", k)] = len(lines)
    for i, peer in enumerate(peers):
        lines.append("")
        lines.append("[[peers]]")
        where[("peers", i)] = len(lines)
        for k, v in peer.items():
            lines.append(f"{toml_key(k)} = {toml_value(v)}")
            where[("peers", i, k)] = len(lines)
    return "\n".join(lines) + "\n", where


# --------------------------------------------------------------------------- strategies

scalars = st.one_of(
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=30),
)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4), max_leaves=8)

ipv4s = st.builds(
    lambda a, b: f"100.{a}.{b // 256}.{b % 256}",
    st.integers(0, 255),
    st.integers(0, 65535),
)
interesting_strings = st.one_of(
    ipv4s,
    st.sampled_from(
        [
            "", " ", "100.100.0.1", "100.100.0.256", "::1", "[::1]:1", "192.0.2.1:51820", "a:b:c",
            "agent", "agent:", "agent:SHA256:" + "A" * 43, "10.0.0.0/8", "10.0.0.1/8", "tm0",
            "x" * 16, "é", "\x00", "ssh-ed25519 AAAA wg= att=", wg_key(1), "-", "a..b:1",
        ]
    ),
    st.text(max_size=40),
)
any_value = st.one_of(values, interesting_strings, st.lists(interesting_strings, max_size=4))

key_names = st.one_of(st.sampled_from(NODE_KEYS + PEER_KEYS), st.text(min_size=1, max_size=12))


@st.composite
def valid_configs(draw: st.DrawFn) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    n_peers = draw(st.integers(0, 6))
    ips = draw(
        st.lists(st.integers(1, 254), min_size=n_peers + 1, max_size=n_peers + 1, unique=True)
    )
    node: dict[str, Any] = {"name": "node", "mesh_ip": f"100.100.0.{ips[0]}"}
    if draw(st.booleans()):
        node["listen_port"] = draw(st.integers(0, 65535))
    if draw(st.booleans()):
        node["mtu"] = draw(st.integers(1280, 9000))
    if draw(st.booleans()):
        node["interface"] = draw(st.from_regex(r"[A-Za-z0-9_-]{1,15}", fullmatch=True))
    if draw(st.booleans()):
        node["identity"] = draw(st.sampled_from(["agent", "key", "/k/id_ed25519"]))
    peers = []
    extra_nets = draw(st.lists(st.integers(0, 255), max_size=n_peers * 2, unique=True))
    for i in range(n_peers):
        peer: dict[str, Any] = {
            "name": f"peer-{i}",
            "wireguard_public_key": wg_key(i + 1),
            "mesh_ip": f"100.100.0.{ips[i + 1]}",
        }
        if draw(st.booleans()):
            host = draw(st.sampled_from(["192.0.2.7", "[2001:db8::7]", "peer.example.org"]))
            peer["endpoint"] = f"{host}:{draw(st.integers(1, 65535))}"
        if draw(st.booleans()):
            peer["persistent_keepalive"] = draw(st.integers(0, 65535))
        mine = extra_nets[i * 2 : i * 2 + 2]
        if mine:
            peer["allowed_ips"] = [f"10.{n}.0.0/16" for n in mine]
        peers.append(peer)
    return node, peers


# --------------------------------------------------------------------------- properties


@SETTINGS
@given(st.text(max_size=400))
@example("[node]\nname = 'a'\nmesh_ip = '100.100.0.1'\nmtu = 1" + "0" * 5000)
@example("a = " + "[" * 3000)
@example("a = " + "[" * 3000 + "]" * 3000)
@example("[[peers]]\n[node]\n")
@example("peers = [[]]\n[node]\n")
@example("peers = 'x'\n[node]\n")
@example("node.name = 1")
def test_arbitrary_text(text: str) -> None:
    check(text)


toml_fragments = st.sampled_from(
    [
        "[node]\n", "[[peers]]\n", "[peers]\n", "[node.x]\n", "[[node]]\n", 'name = "a"\n',
        'name = "alpha"\n', 'mesh_ip = "100.100.0.1"\n', 'mesh_ip = "100.100.0.2"\n',
        'mesh_ip = "100.100.0.1/24"\n', f'wireguard_public_key = "{wg_key(1)}"\n',
        f'wireguard_public_key = "{wg_key(2)}"\n', 'identity = "agent"\n',
        'identity = "ssh-ed25519 AAAA wg=AA att=AA"\n', 'endpoint = "192.0.2.1:1"\n',
        'endpoint = "[::1]:0"\n', "allowed_ips = [\"10.0.0.0/8\",\n  \"fd00::/8\"]\n",
        "allowed_ips = [1, [2]]\n", "mtu = 1420\n", "mtu = 1e3\n", "listen_port = -1\n",
        "persistent_keepalive = true\n", "mesh_prefix = 33\n", 'x = """\nmulti\n"""\n',
        "y = '''\n[node]\n'''\n", "# comment\n", "\n", "z = {a = 1, b = [1,2]}\n",
        "peers = [{name = 'b'}]\n", "node = 1\n", "d = 1979-05-27T07:32:00Z\n", '"quoted key" = 1\n',
        "'lit.key' = 2\n", "a.b.c = 3\n", "= 1\n", "[", "]", '"', "'", "{", "}", ",", "=",
    ]
)


@SETTINGS
@given(st.lists(toml_fragments, max_size=25))
def test_tomlish_text(fragments: list[str]) -> None:
    check("".join(fragments))


@SETTINGS
@given(
    st.one_of(st.none(), st.dictionaries(key_names, any_value, max_size=10)),
    st.lists(st.dictionaries(key_names, any_value, max_size=8), max_size=4),
    st.dictionaries(st.sampled_from(["x", "filter", "peers2", "name"]), any_value, max_size=2),
)
def test_structured_random_values(
    node: dict[str, Any] | None, peers: list[dict[str, Any]], extra: dict[str, Any]
) -> None:
    text, _ = to_toml(node, peers, extra)
    check(text)


@SETTINGS
@given(valid_configs())
def test_valid_configs_round_trip(config: tuple[dict[str, Any], list[dict[str, Any]]]) -> None:
    node, peers = config
    text, _ = to_toml(node, peers, {})
    cfg = check(text)
    assert cfg is not None
    assert str(cfg.mesh_ip) == node["mesh_ip"]
    assert cfg.listen_port == node.get("listen_port", 51820)
    assert cfg.mtu == node.get("mtu", 1420)
    assert len(cfg.peers) == len(peers)
    for got, want in zip(cfg.peers, peers):
        assert got.name == want["name"]
        assert got.wireguard_public_key == base64.b64decode(want["wireguard_public_key"])
        assert got.allowed_ips[0] == ipaddress.ip_network(f"{want['mesh_ip']}/32")
        assert len(got.allowed_ips) == 1 + len(want.get("allowed_ips", []))
        assert got.persistent_keepalive == want.get("persistent_keepalive", 0)
        assert (got.endpoint is None) == ("endpoint" not in want)


@SETTINGS
@given(valid_configs(), st.data())
def test_one_bad_value_is_reported_at_its_line(
    config: tuple[dict[str, Any], list[dict[str, Any]]], data: st.DataObject
) -> None:
    """Replace one value of a valid config by a wrong one: the error (if the new value is
    refused) names that key's line, or its table's header line."""
    node, peers = config
    tables: list[tuple[tuple[Any, ...], dict[str, Any]]] = [(("node",), node)]
    tables += [(("peers", i), p) for i, p in enumerate(peers)]
    table_path, table = data.draw(st.sampled_from(tables))
    key = data.draw(st.sampled_from(sorted(table)))
    table[key] = data.draw(any_value)
    text, where = to_toml(node, peers, {})
    try:
        parse_config(text, path=CFG_PATH, state_dir=STATE)
    except ConfigError as exc:
        # a cross-check (duplicates) may point at another peer; otherwise, this key
        if any(marker in exc.message for marker in CROSS_CHECKS):
            allowed_lines = set(where.values())
        else:
            allowed_lines = {where[table_path + (key,)], where[table_path]}
        assert exc.line in allowed_lines, (exc.line, str(exc), text)


@st.composite
def damaged_configs(draw: st.DrawFn) -> str:
    """A valid config with several keys set to other values, deleted, or (rarely) added:
    gets past the first checks into the later ones (cross-peer rules, endpoints, ...)."""
    node, peers = draw(valid_configs())
    tables: list[tuple[dict[str, Any], tuple[str, ...]]] = [(node, NODE_KEYS)]
    tables += [(p, PEER_KEYS) for p in peers]
    for _ in range(draw(st.integers(1, 5))):
        table, keys = draw(st.sampled_from(tables))
        action = draw(st.sampled_from(["set"] * 6 + ["copy"] * 3 + ["delete", "unknown"]))
        key = draw(st.sampled_from(keys))
        if action == "set":
            table[key] = draw(any_value)
        elif action == "copy":  # a value from another table: duplicates, cross-check paths
            other, _ = draw(st.sampled_from(tables))
            if key in other:
                table[key] = other[key]
        elif action == "delete":
            table.pop(key, None)
        else:
            table[draw(st.text(min_size=1, max_size=8))] = 1
    return to_toml(node, peers, {})[0]


@SETTINGS
@given(damaged_configs())
def test_damaged_valid_configs(text: str) -> None:
    check(text)


toml_literals = st.one_of(
    interesting_strings.map(toml_value),
    st.sampled_from(
        [
            "1", "0", "-1", "65536", "1e3", "inf", "nan", "true", "[]", "[1, 'a']", "{}", "{a = 1}",
            "1979-05-27", "07:32:00", "0x10", "'''\nx'''", '"\\u0000"', '"unterminated', "[[1], [2]]",
            '"""\n[node]\nname = 1\n"""', "[\n  '10.0.0.0/8', # c\n  'fd00::/8',\n]",
        ]
    ),
)


GOOD_LITERALS: dict[str, list[str]] = {
    "name": ['"alpha"', '"beta"', '"gamma"', "'d-1'"],
    "mesh_ip": ['"100.100.0.1"', '"100.100.0.2"', '"100.100.0.3"', "'10.0.0.9'"],
    "identity": ['"agent"', '"key"'],
    "wireguard_public_key": [f'"{wg_key(n)}"' for n in range(1, 4)],
    "endpoint": ['"192.0.2.1:51820"', '"[2001:db8::2]:1"', "'vpn.example.org:9'"],
    "persistent_keepalive": ["0", "25"],
    "allowed_ips": ['["10.1.0.0/24"]', '["10.1.0.0/24", "fd00::/64"]', "[\n  '10.2.0.0/16', # c\n]"],
    "mesh_prefix": ["24", "16"],
    "listen_port": ["0", "51820"],
    "interface": ['"tm0"'],
    "mtu": ["1420"],
    "passphrase_file": ['"p"'],
    "network_secret_file": ['"""s"""'],
}


def _dedupe_keys(lines: list[str]) -> list[str]:
    """Drop repeated keys within a section (keeps the text valid TOML more often)."""
    out: list[str] = []
    seen: set[str] = set()
    for line in lines:
        if line.startswith("["):
            seen = set()
            out.append(line)
            continue
        key = line.split(" ", 1)[0]
        if key not in seen:
            seen.add(key)
            out.append(line)
    return out


@st.composite
def tomlish_documents(draw: st.DrawFn) -> str:
    """Mostly well-formed TOML: one [node], some [[peers]], keys mostly of the right
    table, values from a list of interesting literals (some of them broken)."""
    sections = ["[node]"] + ["[[peers]]"] * draw(st.integers(0, 4))
    if draw(st.integers(0, 9)) == 0:
        sections.append(draw(st.sampled_from(["[peers]", "[node.x]", "[[node]]", "[x]", "[node]"])))
    sections = draw(st.permutations(sections))
    out = []
    for header in sections:
        out.append(header)
        own = NODE_KEYS if header == "[node]" else PEER_KEYS
        pool = st.sampled_from(own) if draw(st.integers(0, 9)) else st.sampled_from(NODE_KEYS + PEER_KEYS)
        required = ["name", "mesh_ip"] + (["wireguard_public_key"] if header == "[[peers]]" else [])
        for key in [*required, *draw(st.lists(pool, unique=True, max_size=6))]:
            if key in required and out[-1].startswith(key + " "):
                continue
            good = GOOD_LITERALS.get(key)
            if good is not None and draw(st.integers(0, 4)):
                literal = draw(st.sampled_from(good))
            else:
                literal = draw(toml_literals)
            out.append(f"{key} = {literal}")
        out = _dedupe_keys(out)
    return "\n".join(out) + "\n"


@SETTINGS
@given(tomlish_documents())
def test_tomlish_documents(text: str) -> None:
    check(text)


CROSS_CHECKS = ("already", "same WireGuard key", "duplicate peer name", "name of this node", "own mesh")

mutations = st.sampled_from(["delete", "insert", "duplicate", "swap", "truncate", "replace_char"])


@SETTINGS
@given(valid_configs(), st.lists(st.tuples(mutations, st.integers(0, 10_000), st.integers(0, 10_000), st.text(max_size=12) | toml_fragments), min_size=1, max_size=4))
def test_mutated_valid_configs(
    config: tuple[dict[str, Any], list[dict[str, Any]]], edits: list[tuple[str, int, int, str]]
) -> None:
    text, _ = to_toml(*config, {})
    for kind, a, b, fragment in edits:
        lines = text.split("\n")
        if kind == "delete" and text:
            i = a % len(text)
            text = text[:i] + text[i + 1 + b % 20 :]
        elif kind == "insert":
            i = a % (len(text) + 1)
            text = text[:i] + fragment + text[i:]
        elif kind == "duplicate":
            i = a % len(lines)
            lines.insert(b % (len(lines) + 1), lines[i])
            text = "\n".join(lines)
        elif kind == "swap":
            i, j = a % len(lines), b % len(lines)
            lines[i], lines[j] = lines[j], lines[i]
            text = "\n".join(lines)
        elif kind == "truncate":
            text = text[: a % (len(text) + 1)]
        elif kind == "replace_char" and text:
            i = a % len(text)
            text = text[:i] + (fragment[:1] or "\x00") + text[i + 1 :]
    check(text)


@settings(max_examples=50, deadline=None)
@given(st.binary(max_size=300))
def test_load_config_on_arbitrary_bytes(raw: bytes) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "c.toml"
        path.write_bytes(raw)
        try:
            load_config(path, state_dir=Path(d))
        except ConfigError as exc:
            assert exc.path == path


@settings(max_examples=100, deadline=None)
@given(st.binary(min_size=6, max_size=100))
def test_network_secret_content_never_in_errors(raw: bytes) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "network.secret"
        path.write_bytes(raw)
        os.chmod(path, stat.S_IRUSR | stat.S_IWUSR)
        try:
            secret = read_network_secret(path)
        except ConfigError as exc:
            message = str(exc)
            text = raw.decode("latin-1")
            for token in text.split():
                assume(token not in str(path))
                if len(token) >= 6 and token not in "network secret must hold the base64 of 32 bytes (and nothing else)":
                    assert token not in message
        else:
            assert len(secret) == 32
            assert base64.b64decode(raw.strip()) == secret


@SETTINGS
@given(
    st.from_regex(r"[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?", fullmatch=True),
    st.text(min_size=1, max_size=40).filter(lambda s: "\x00" not in s and s.strip()),
    st.integers(0, 65535),
    st.integers(1, 254),
)
def test_starter_config_always_loads(name: str, identity: str, port: int, host: int) -> None:
    if identity.startswith("agent:"):
        identity = "x" + identity
    text = starter_config(name=name, identity=identity, mesh_ip=f"100.100.0.{host}", listen_port=port)
    cfg = check(text)
    assert cfg is not None
    assert (cfg.name, cfg.listen_port) == (name, port)


@SETTINGS
@given(
    st.one_of(st.none(), st.dictionaries(key_names, any_value, max_size=6)),
    st.lists(st.dictionaries(key_names, any_value, max_size=5), max_size=3),
    st.dictionaries(st.text(min_size=1, max_size=6), scalars, max_size=2),
)
def test_locator_finds_every_written_key(
    node: dict[str, Any] | None, peers: list[dict[str, Any]], extra: dict[str, Any]
) -> None:
    """The line finder agrees with where the writer put each key and table, for any key
    spelling (bare, quoted with escapes) and any value (multi-line arrays included)."""
    import tomllib

    from tunnelmesh.config import Locator

    text, where = to_toml(node, peers, extra)
    try:
        tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        assume(False)
    lines = Locator(text).lines
    for path, line in where.items():
        assert lines.get(path) == line, (path, line, text)
