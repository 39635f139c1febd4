"""Unit tests for tunnelmesh.config and tunnelmesh.paths (no network)."""

from __future__ import annotations

import base64
import ipaddress
import os
import stat
import textwrap
from pathlib import Path

import pytest

from tests.links import new_identity
from tunnelmesh.config import (
    DEFAULT_HOST_KEY,
    ConfigError,
    NodeConfig,
    PeerConfig,
    check_peer_keys,
    load_config,
    read_network_secret,
    starter_config,
    write_network_secret,
)
from tunnelmesh.identity import DEFAULT_HOST_KEY as IDENTITY_DEFAULT_HOST_KEY
from tunnelmesh.identity import IdentityError, PublicIdentity
from tunnelmesh.paths import DEFAULT_CONFIG, DEFAULT_STATE_DIR, Paths, resolve_paths


def wg_key(seed: int) -> str:
    return base64.b64encode(bytes([seed]) * 32).decode()


KEY_B = wg_key(2)
KEY_C = wg_key(3)

MINIMAL = """\
[node]
name = "alpha"
mesh_ip = "100.100.0.1"
"""


def write(tmp_path: Path, text: str, name: str = "tunnelmesh.toml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def load(tmp_path: Path, text: str) -> NodeConfig:
    return load_config(write(tmp_path, text), state_dir=tmp_path / "state")


def load_error(tmp_path: Path, text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, text)
    return info.value


def with_peer(peer: str, node: str = MINIMAL) -> str:
    return node + "\n[[peers]]\n" + textwrap.dedent(peer)


# --------------------------------------------------------------------------- paths


class TestPaths:
    def test_defaults(self) -> None:
        p = resolve_paths(None, None, environ={})
        assert p == Paths(Path(DEFAULT_STATE_DIR), Path(DEFAULT_CONFIG))
        assert p.control_socket == Path("/var/lib/tunnelmesh/control.sock")
        assert p.pid_file == Path("/var/lib/tunnelmesh/tunnelmesh.pid")
        assert p.log_file.parent == Path(DEFAULT_STATE_DIR)
        assert p.network_secret == Path("/var/lib/tunnelmesh/network.secret")
        assert p.dedicated_key == Path("/var/lib/tunnelmesh/identity_ed25519")

    def test_state_dir_argument_only_puts_everything_in_it(self, tmp_path: Path) -> None:
        p = resolve_paths(str(tmp_path / "n1"), None, environ={})
        assert p.state_dir == tmp_path / "n1"
        assert p.config == tmp_path / "n1" / "tunnelmesh.toml"
        for derived in (p.control_socket, p.pid_file, p.log_file, p.network_secret, p.dedicated_key):
            assert derived.parent == tmp_path / "n1"

    def test_state_dir_from_environment(self) -> None:
        p = resolve_paths(None, None, environ={"TUNNELMESH_STATE_DIR": "/srv/tm"})
        assert p == Paths(Path("/srv/tm"), Path("/srv/tm/tunnelmesh.toml"))

    def test_config_from_environment(self) -> None:
        p = resolve_paths(None, None, environ={"TUNNELMESH_CONFIG": "/etc/x.toml"})
        assert p == Paths(Path(DEFAULT_STATE_DIR), Path("/etc/x.toml"))

    def test_arguments_beat_environment(self) -> None:
        env = {"TUNNELMESH_STATE_DIR": "/env/state", "TUNNELMESH_CONFIG": "/env/c.toml"}
        p = resolve_paths("/arg/state", "/arg/c.toml", environ=env)
        assert p == Paths(Path("/arg/state"), Path("/arg/c.toml"))
        # each setting on its own: an environment config is still a given config
        p = resolve_paths("/arg/state", None, environ=env)
        assert p == Paths(Path("/arg/state"), Path("/env/c.toml"))
        p = resolve_paths(None, "/arg/c.toml", environ=env)
        assert p == Paths(Path("/env/state"), Path("/arg/c.toml"))

    def test_empty_values_count_as_unset(self) -> None:
        env = {"TUNNELMESH_STATE_DIR": "", "TUNNELMESH_CONFIG": ""}
        assert resolve_paths("", "", environ=env) == Paths(Path(DEFAULT_STATE_DIR), Path(DEFAULT_CONFIG))

    def test_relative_arguments_become_absolute(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.chdir(tmp_path)
        p = resolve_paths("node", "c.toml", environ={})
        assert p == Paths(tmp_path / "node", tmp_path / "c.toml")

    def test_paths_is_frozen(self) -> None:
        p = resolve_paths(None, None, environ={})
        with pytest.raises(AttributeError):
            p.state_dir = Path("/x")  # type: ignore[misc]


# --------------------------------------------------------------------------- valid configs


FULL = f"""\
[node]
name = "alpha"
identity = "keys/id_ed25519"
passphrase_file = "key.pass"
network_secret_file = "net.secret"
mesh_ip = "100.100.0.1"
mesh_prefix = 16
listen_port = 0
interface = "tm-1.x_y"
mtu = 1280

[[peers]]
name = "beta"
wireguard_public_key = "{KEY_B}"
mesh_ip = "100.100.0.2"
endpoint = "192.0.2.2:51820"
persistent_keepalive = 25
allowed_ips = ["10.1.0.0/24", "fd00::/64", "100.100.0.2/32", "10.1.0.0/24"]

[[peers]]
name = "gamma"
wireguard_public_key = "{KEY_C}"
mesh_ip = "100.100.0.3"
endpoint = "[2001:db8::1]:4000"
"""


class TestValid:
    def test_full_example(self, tmp_path: Path) -> None:
        cfg = load(tmp_path, FULL)
        assert cfg.path == tmp_path / "tunnelmesh.toml"
        assert cfg.name == "alpha"
        assert cfg.identity == str(tmp_path / "keys/id_ed25519")
        assert cfg.passphrase_file == tmp_path / "key.pass"
        assert cfg.network_secret_file == tmp_path / "net.secret"
        assert cfg.mesh_ip == ipaddress.IPv4Address("100.100.0.1")
        assert cfg.mesh_prefix == 16
        assert cfg.mesh_network == ipaddress.IPv4Network("100.100.0.0/16")
        assert (cfg.listen_port, cfg.interface, cfg.mtu) == (0, "tm-1.x_y", 1280)
        beta, gamma = cfg.peers
        assert isinstance(beta, PeerConfig)
        assert beta.name == "beta" and beta.identity is None
        assert beta.wireguard_public_key == bytes([2]) * 32
        assert beta.endpoint == ("192.0.2.2", 51820)
        assert beta.persistent_keepalive == 25
        assert beta.allowed_ips == (
            ipaddress.ip_network("100.100.0.2/32"),
            ipaddress.ip_network("10.1.0.0/24"),
            ipaddress.ip_network("fd00::/64"),
        )
        assert beta.line == 12
        assert gamma.endpoint == ("2001:db8::1", 4000)
        assert gamma.persistent_keepalive == 0
        assert gamma.allowed_ips == (ipaddress.ip_network("100.100.0.3/32"),)
        assert gamma.line == 20

    def test_defaults(self, tmp_path: Path) -> None:
        cfg = load(tmp_path, MINIMAL)
        assert cfg.identity == DEFAULT_HOST_KEY == "/etc/ssh/ssh_host_ed25519_key"
        assert cfg.passphrase_file is None
        assert cfg.network_secret_file == tmp_path / "state" / "network.secret"
        assert (cfg.mesh_prefix, cfg.listen_port, cfg.interface, cfg.mtu) == (24, 51820, "tm0", 1420)
        assert cfg.peers == ()

    def test_relative_paths_are_relative_to_the_config_directory(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        sub = tmp_path / "etc"
        sub.mkdir()
        monkeypatch.chdir(tmp_path)
        cfg = load_config(
            write(sub, MINIMAL.replace("[node]", '[node]\nidentity = "../k"\nnetwork_secret_file = "s"')),
            state_dir=Path("state"),
        )
        assert cfg.identity == str(tmp_path / "k")
        assert cfg.network_secret_file == sub / "s"
        cfg = load_config(Path("etc/tunnelmesh.toml"), state_dir=Path("state"))
        assert cfg.path == sub / "tunnelmesh.toml"
        assert cfg.identity == str(tmp_path / "k")

    def test_default_secret_is_in_relative_state_dir_made_absolute(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.chdir(tmp_path)
        cfg = load_config(write(tmp_path, MINIMAL), state_dir=Path("st"))
        assert cfg.network_secret_file == tmp_path / "st" / "network.secret"

    @pytest.mark.parametrize(
        "value",
        ["agent", "agent:SHA256:" + "A" * 43, "agent:SHA256:nThbg6kXUpJWGl7E1IGOCspRomTxdCARLviKw6E5SY8"],
    )
    def test_agent_identity(self, tmp_path: Path, value: str) -> None:
        cfg = load(tmp_path, MINIMAL + f'identity = "{value}"\n')
        assert cfg.identity == value

    @pytest.mark.parametrize(
        ("endpoint", "expected"),
        [
            ("192.0.2.2:1", ("192.0.2.2", 1)),
            ("[2001:db8::1]:65535", ("2001:db8::1", 65535)),
            ("[2001:0db8:0::1]:51820", ("2001:db8::1", 51820)),
            ("vpn.example.org:51820", ("vpn.example.org", 51820)),
            ("vpn.example.org.:51820", ("vpn.example.org.", 51820)),
            ("localhost:7", ("localhost", 7)),
        ],
    )
    def test_endpoints(self, tmp_path: Path, endpoint: str, expected: tuple[str, int]) -> None:
        cfg = load(
            tmp_path,
            with_peer(f'name = "b"\nwireguard_public_key = "{KEY_B}"\nmesh_ip = "100.100.0.2"\nendpoint = "{endpoint}"\n'),
        )
        assert cfg.peers[0].endpoint == expected

    def test_peers_as_inline_tables(self, tmp_path: Path) -> None:
        text = (
            "peers = [\n"
            f'  {{ name = "b", wireguard_public_key = "{KEY_B}", mesh_ip = "100.100.0.2" }},\n'
            f'  {{ name = "c", wireguard_public_key = "{KEY_C}", mesh_ip = "100.100.0.3" }},\n'
            "]\n" + MINIMAL
        )
        cfg = load(tmp_path, text)
        assert [p.name for p in cfg.peers] == ["b", "c"]
        assert [p.line for p in cfg.peers] == [2, 3]
        err = load_error(tmp_path, text.replace('mesh_ip = "100.100.0.3"', 'mesh_ip = "100.100.0.2"'))
        assert err.line == 3 and "already used by peer 'b'" in err.message

    def test_dotted_keys(self, tmp_path: Path) -> None:
        cfg = load(tmp_path, 'node.name = "alpha"\nnode.mesh_ip = "100.100.0.1"\n')
        assert cfg.name == "alpha"

    def test_comments_crlf_and_bom(self, tmp_path: Path) -> None:
        text = "\ufeff# c\r\n[node] # c\r\nname = 'alpha' # c\r\nmesh_ip = \"\"\"100.100.0.1\"\"\"\r\n"
        path = tmp_path / "c.toml"
        path.write_bytes(text.encode())
        assert load_config(path, state_dir=tmp_path).name == "alpha"

    def test_results_are_frozen(self, tmp_path: Path) -> None:
        cfg = load(tmp_path, FULL)
        with pytest.raises(AttributeError):
            cfg.name = "x"  # type: ignore[misc]
        with pytest.raises(AttributeError):
            cfg.peers[0].name = "x"  # type: ignore[misc]


# --------------------------------------------------------------------------- errors


class TestConfigError:
    def test_str_with_and_without_line(self) -> None:
        assert str(ConfigError(Path("/a/b.toml"), 7, "bad")) == "/a/b.toml:7: bad"
        assert str(ConfigError(Path("/a/b.toml"), None, "bad")) == "/a/b.toml: bad"
        e = ConfigError("/a/b.toml", 3, "m")
        assert (e.path, e.line, e.message) == (Path("/a/b.toml"), 3, "m")
        assert isinstance(e, Exception)


class TestSyntax:
    def test_toml_syntax_error_has_line(self, tmp_path: Path) -> None:
        err = load_error(tmp_path, '[node]\nname = "alpha"\nmesh_ip = 100.100.0.1\n')
        assert err.line == 3
        assert err.path == tmp_path / "tunnelmesh.toml"
        assert str(err).startswith(f"{tmp_path / 'tunnelmesh.toml'}:3: invalid TOML")
        assert "column" in err.message

    def test_duplicate_table(self, tmp_path: Path) -> None:
        err = load_error(tmp_path, MINIMAL + "\n[node]\n")
        assert err.line == 5

    def test_error_at_end_of_document(self, tmp_path: Path) -> None:
        err = load_error(tmp_path, '[node]\nname = "a"\nx = [1,\n')
        assert err.line is not None and err.line >= 3

    def test_huge_integer(self, tmp_path: Path) -> None:
        err = load_error(tmp_path, MINIMAL + "mtu = 1" + "0" * 5000 + "\n")
        assert "invalid TOML" in err.message

    def test_deep_nesting(self, tmp_path: Path) -> None:
        err = load_error(tmp_path, "x = " + "[" * 5000 + "]" * 5000 + "\n")
        assert "TOML" in err.message or "nested" in err.message

    def test_not_utf8(self, tmp_path: Path) -> None:
        path = tmp_path / "c.toml"
        path.write_bytes(b'[node]\nname = "\xff"\n')
        with pytest.raises(ConfigError) as info:
            load_config(path, state_dir=tmp_path)
        assert info.value.line == 2 and "UTF-8" in info.value.message


class TestUnreadable:
    def test_missing_file(self, tmp_path: Path) -> None:
        with pytest.raises(ConfigError) as info:
            load_config(tmp_path / "nope.toml", state_dir=tmp_path)
        assert info.value.line is None
        assert "No such file or directory" in str(info.value)
        assert str(info.value).startswith(str(tmp_path / "nope.toml") + ": ")

    def test_directory(self, tmp_path: Path) -> None:
        with pytest.raises(ConfigError) as info:
            load_config(tmp_path, state_dir=tmp_path)
        assert "Is a directory" in str(info.value)

    def test_permission_denied(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        path = write(tmp_path, MINIMAL)
        path.chmod(0)
        if os.access(path, os.R_OK):  # root reads anything: make open() fail the way it would

            def denied(*args: object, **kwargs: object) -> None:
                raise PermissionError(13, "Permission denied", str(path))

            monkeypatch.setattr("builtins.open", denied)
        with pytest.raises(ConfigError) as info:
            load_config(path, state_dir=tmp_path)
        monkeypatch.undo()
        assert str(info.value) == f"{path}: cannot read config: Permission denied"

    def test_bad_path(self, tmp_path: Path) -> None:
        with pytest.raises(ConfigError):
            load_config(Path("a\x00b"), state_dir=tmp_path)

    def test_too_large(self, tmp_path: Path) -> None:
        path = tmp_path / "big.toml"
        path.write_bytes(b"#" * (2 << 20))
        with pytest.raises(ConfigError, match="larger than"):
            load_config(path, state_dir=tmp_path)


class TestStructure:
    def test_missing_node(self, tmp_path: Path) -> None:
        err = load_error(tmp_path, "# nothing\n")
        assert err.line is None and "[node]" in err.message

    def test_node_not_a_table(self, tmp_path: Path) -> None:
        err = load_error(tmp_path, '\nnode = "x"\n')
        assert err.line == 2

    def test_peers_not_an_array_of_tables(self, tmp_path: Path) -> None:
        err = load_error(tmp_path, MINIMAL + "[peers]\nname = 'b'\n")
        assert err.line == 4 and "[[peers]]" in err.message

    def test_peer_not_a_table(self, tmp_path: Path) -> None:
        err = load_error(tmp_path, "peers = [1]\n" + MINIMAL)
        assert err.line == 1

    @pytest.mark.parametrize(
        ("text", "line", "key"),
        [
            ("colour = 1\n" + MINIMAL, 1, "colour"),
            (MINIMAL + "colour = 1\n", 4, "colour"),
            (MINIMAL + "[node.sub]\nx = 1\n", 4, "sub"),
            (with_peer(f'name = "b"\nwireguard_public_key = "{KEY_B}"\nmesh_ip = "100.100.0.2"\nport = 1\n'), 9, "port"),
            ("[[firewall]]\n" + MINIMAL, 1, "firewall"),
        ],
    )
    def test_unknown_keys(self, tmp_path: Path, text: str, line: int, key: str) -> None:
        err = load_error(tmp_path, text)
        assert err.line == line
        assert f"unknown key '{key}'" in err.message
        assert "allowed keys:" in err.message

    def test_unknown_key_lists_allowed(self, tmp_path: Path) -> None:
        err = load_error(tmp_path, MINIMAL + "mesh_ipp = 1\n")
        for key in ("name", "identity", "mesh_ip", "mesh_prefix", "listen_port", "interface", "mtu"):
            assert key in err.message
        err = load_error(tmp_path, with_peer('wat = 1\n'))
        for key in ("wireguard_public_key", "endpoint", "persistent_keepalive", "allowed_ips"):
            assert key in err.message
        err = load_error(tmp_path, 'x = 1\n' + MINIMAL)
        assert "allowed keys: node, peers" in err.message

    def test_missing_required_node_keys(self, tmp_path: Path) -> None:
        err = load_error(tmp_path, '# c\n[node]\nname = "a"\n')
        assert err.line == 2 and "'mesh_ip'" in err.message
        err = load_error(tmp_path, '[node]\nmesh_ip = "100.100.0.1"\n')
        assert err.line == 1 and "'name'" in err.message

    def test_missing_required_peer_keys(self, tmp_path: Path) -> None:
        err = load_error(tmp_path, with_peer(f'wireguard_public_key = "{KEY_B}"\n'))
        assert err.line == 5 and "'name'" in err.message
        err = load_error(tmp_path, with_peer(f'name = "b"\nwireguard_public_key = "{KEY_B}"\n'))
        assert err.line == 5 and "'mesh_ip'" in err.message


class TestTypes:
    @pytest.mark.parametrize(
        ("line", "expected"),
        [
            ("name = 5", "name must be a string, not an integer"),
            ('mesh_ip = ["100.100.0.1"]', "mesh_ip must be a string, not an array"),
            ("mtu = 1420.0", "mtu must be an integer, not a float"),
            ("mtu = true", "mtu must be an integer, not a boolean"),
            ('listen_port = "51820"', "listen_port must be an integer, not a string"),
            ("mesh_prefix = 1979-05-27", "mesh_prefix must be an integer, not a date/time"),
            ("interface = {a = 1}", "interface must be a string, not a table"),
            ("identity = false", "identity must be a string"),
            ("passphrase_file = 1", "passphrase_file must be a string"),
            ("network_secret_file = []", "network_secret_file must be a string"),
        ],
    )
    def test_node_types(self, tmp_path: Path, line: str, expected: str) -> None:
        key = line.split(" ")[0]
        text = "[node]\n" + "\n".join(
            l for l in ['name = "alpha"', 'mesh_ip = "100.100.0.1"'] if not l.startswith(key + " ")
        ) + f"\n{line}\n"
        err = load_error(tmp_path, text)
        assert expected in err.message
        assert err.line == text.splitlines().index(line) + 1

    @pytest.mark.parametrize(
        ("line", "expected"),
        [
            ("persistent_keepalive = 2.5", "persistent_keepalive must be an integer"),
            ("persistent_keepalive = true", "persistent_keepalive must be an integer"),
            ("endpoint = 51820", "endpoint must be a string"),
            ('allowed_ips = "10.0.0.0/8"', "allowed_ips must be an array of strings"),
            ("allowed_ips = [1]", "allowed_ips entries must be strings"),
            ("wireguard_public_key = 7", "wireguard_public_key must be a string"),
            ("identity = 7", "identity must be a string"),
        ],
    )
    def test_peer_types(self, tmp_path: Path, line: str, expected: str) -> None:
        key = line.split(" ")[0]
        body = ['name = "b"', f'wireguard_public_key = "{KEY_B}"', 'mesh_ip = "100.100.0.2"']
        body = [b for b in body if not b.startswith(key + " ")] + [line]
        text = with_peer("\n".join(body) + "\n")
        err = load_error(tmp_path, text)
        assert expected in err.message
        assert err.line == text.splitlines().index(line) + 1


class TestValues:
    @pytest.mark.parametrize(
        "name", ["", "Alpha", "a_b", "-a", "a-", "a" * 64, "a.b", "ä", "a b"]
    )
    def test_bad_node_names(self, tmp_path: Path, name: str) -> None:
        err = load_error(tmp_path, f'[node]\nmesh_ip = "100.100.0.1"\nname = "{name}"\n')
        assert err.line == 3 and "name" in err.message

    def test_good_long_name(self, tmp_path: Path) -> None:
        assert load(tmp_path, f'[node]\nmesh_ip = "100.100.0.1"\nname = "{"a-9" * 21}"\n').name == "a-9" * 21

    @pytest.mark.parametrize(
        "ip",
        ["100.100.0.256", "100.100.0", "::1", "fd00::1", "100.100.0.01", " 100.100.0.1", "0.0.0.0",
         "127.0.0.1", "224.0.0.1", "255.255.255.255", "100.100.0.1/24", ""],
    )
    def test_bad_node_mesh_ip(self, tmp_path: Path, ip: str) -> None:
        err = load_error(tmp_path, f'[node]\nname = "a"\nmesh_ip = "{ip}"\n')
        assert err.line == 3 and "mesh_ip" in err.message

    def test_mesh_ip_is_network_or_broadcast_address(self, tmp_path: Path) -> None:
        err = load_error(tmp_path, '[node]\nname = "a"\nmesh_ip = "100.100.0.0"\n')
        assert "network address of 100.100.0.0/24" in err.message and err.line == 3
        err = load_error(tmp_path, '[node]\nname = "a"\nmesh_ip = "100.100.0.255"\n')
        assert "broadcast address" in err.message
        cfg = load(tmp_path, '[node]\nname = "a"\nmesh_ip = "100.100.0.255"\nmesh_prefix = 32\n')
        assert cfg.mesh_prefix == 32

    def test_bad_peer_mesh_ip(self, tmp_path: Path) -> None:
        text = with_peer(f'name = "b"\nwireguard_public_key = "{KEY_B}"\nmesh_ip = "100.100.0.x"\n')
        err = load_error(tmp_path, text)
        assert err.line == 8 and "'100.100.0.x' is not an IPv4 address" in err.message
        assert "peer 'b'" in err.message

    @pytest.mark.parametrize(
        ("line", "fragment"),
        [
            ("listen_port = 65536", "listen_port must be between 0 and 65535"),
            ("listen_port = -1", "listen_port"),
            ("mtu = 1279", "mtu must be between 1280 and 9000"),
            ("mtu = 9001", "mtu"),
            ("mesh_prefix = 33", "mesh_prefix"),
            ("mesh_prefix = 0", "mesh_prefix"),
            ('interface = "a-very-long-name0"', "interface"),
            ('interface = ""', "interface"),
            ('interface = "tm/0"', "interface"),
            ('interface = "tm 0"', "interface"),
            ('interface = ".."', "interface"),
            ('identity = ""', "identity: must not be empty"),
            ('identity = "agent:"', "agent:SHA256"),
            ('identity = "agent:MD5:aa:bb"', "agent:SHA256"),
            ('identity = "agent:SHA256:short"', "agent:SHA256"),
            ('network_secret_file = ""', "network_secret_file: must not be empty"),
            ('passphrase_file = "a\\u0000b"', "NUL"),
        ],
    )
    def test_bad_node_values(self, tmp_path: Path, line: str, fragment: str) -> None:
        err = load_error(tmp_path, MINIMAL + line + "\n")
        assert fragment in err.message
        assert err.line == 4

    def test_passphrase_file_with_agent(self, tmp_path: Path) -> None:
        err = load_error(tmp_path, MINIMAL + 'identity = "agent"\npassphrase_file = "p"\n')
        assert err.line == 5 and "passphrase_file" in err.message

    @pytest.mark.parametrize(
        ("endpoint", "fragment"),
        [
            ("192.0.2.2", "host:port"),
            ("192.0.2.2:", "port must be 1 to 65535"),
            (":51820", "host:port"),
            ("192.0.2.2:0", "port must be 1 to 65535"),
            ("192.0.2.2:65536", "port must be 1 to 65535"),
            ("192.0.2.2:99999999", "port"),
            ("192.0.2.2:-1", "port"),
            ("192.0.2.2:+1", "port"),
            ("192.0.2.2:１２", "port"),
            ("192.0.2.2:http", "port"),
            ("2001:db8::1:51820", "[address]:port"),
            ("[2001:db8::1]51820", "host:port"),
            ("[2001:db8::1:51820", "host:port"),
            ("[192.0.2.1]:51820", "IPv6"),
            ("[zz::1]:1", "IPv6"),
            ("192.0.2.256:1", "neither an IP address nor a host name"),
            ("bad_host:1", "neither"),
            ("-bad.example:1", "neither"),
            ("a..b:1", "neither"),
            ("host name:1", "neither"),
            ("", "host:port"),
        ],
    )
    def test_bad_endpoints(self, tmp_path: Path, endpoint: str, fragment: str) -> None:
        text = with_peer(
            f'name = "b"\nwireguard_public_key = "{KEY_B}"\nmesh_ip = "100.100.0.2"\nendpoint = "{endpoint}"\n'
        )
        err = load_error(tmp_path, text)
        assert fragment in err.message
        assert err.line == 9

    @pytest.mark.parametrize("value", ["-1", "65536"])
    def test_bad_keepalive(self, tmp_path: Path, value: str) -> None:
        text = with_peer(
            f'name = "b"\nwireguard_public_key = "{KEY_B}"\nmesh_ip = "100.100.0.2"\npersistent_keepalive = {value}\n'
        )
        err = load_error(tmp_path, text)
        assert err.line == 9 and "persistent_keepalive" in err.message

    @pytest.mark.parametrize(
        ("value", "fragment"),
        [
            ('["10.1.0.1/24"]', "did you mean 10.1.0.0/24?"),
            ('["10.1.0.0/33"]', "not an IP network"),
            ('["nope"]', "not an IP network"),
            ('["10.1.0.0/24",\n  "fd00::1/64"]', "did you mean fd00::/64?"),
        ],
    )
    def test_bad_allowed_ips(self, tmp_path: Path, value: str, fragment: str) -> None:
        text = with_peer(
            f'name = "b"\nwireguard_public_key = "{KEY_B}"\nmesh_ip = "100.100.0.2"\nallowed_ips = {value}\n'
        )
        err = load_error(tmp_path, text)
        assert fragment in err.message
        # the offending entry's own line (the second one is on the next line)
        assert err.line == (10 if "\n" in value else 9)

    @pytest.mark.parametrize(
        "key",
        [
            base64.b64encode(bytes(31)).decode(),
            base64.b64encode(bytes(33)).decode(),
            "A" * 43,
            "!" * 44,
            "",
            base64.b64encode(bytes(32)).decode(),  # all zeros
        ],
    )
    def test_bad_wireguard_keys(self, tmp_path: Path, key: str) -> None:
        text = with_peer(f'name = "b"\nwireguard_public_key = "{key}"\nmesh_ip = "100.100.0.2"\n')
        err = load_error(tmp_path, text)
        assert err.line == 7 and "wireguard_public_key" in err.message


class TestPeerRules:
    def peer(self, name: str, key: str, ip: str, extra: str = "") -> str:
        return f'\n[[peers]]\nname = "{name}"\nwireguard_public_key = "{key}"\nmesh_ip = "{ip}"\n{extra}'

    def test_both_identity_and_key(self, tmp_path: Path) -> None:
        text = MINIMAL + self.peer("b", KEY_B, "100.100.0.2", 'identity = "ssh-ed25519 AAAA wg=x att=y"\n')
        err = load_error(tmp_path, text)
        assert "not both" in err.message and err.line == 7

    def test_neither_identity_nor_key(self, tmp_path: Path) -> None:
        err = load_error(tmp_path, MINIMAL + '\n[[peers]]\nname = "b"\nmesh_ip = "100.100.0.2"\n')
        assert "needs identity" in err.message and "wireguard_public_key" in err.message
        assert err.line == 5

    def test_duplicate_mesh_ip_node_vs_peer(self, tmp_path: Path) -> None:
        err = load_error(tmp_path, MINIMAL + self.peer("b", KEY_B, "100.100.0.1"))
        assert err.line == 8 and "this node's own mesh_ip" in err.message

    def test_duplicate_mesh_ip_peer_vs_peer(self, tmp_path: Path) -> None:
        text = MINIMAL + self.peer("b", KEY_B, "100.100.0.2") + self.peer("c", KEY_C, "100.100.0.2")
        err = load_error(tmp_path, text)
        assert err.line == 13
        assert "mesh_ip 100.100.0.2 is already used by peer 'b' (line 5)" in err.message
        assert str(err) == (
            f"{tmp_path / 'tunnelmesh.toml'}:13: peer 'c': mesh_ip 100.100.0.2 is already used by peer 'b' (line 5)"
        )

    def test_duplicate_peer_names(self, tmp_path: Path) -> None:
        text = MINIMAL + self.peer("b", KEY_B, "100.100.0.2") + self.peer("b", KEY_C, "100.100.0.3")
        err = load_error(tmp_path, text)
        assert err.line == 11 and "duplicate peer name" in err.message

    def test_peer_named_like_node(self, tmp_path: Path) -> None:
        err = load_error(tmp_path, MINIMAL + self.peer("alpha", KEY_B, "100.100.0.2"))
        assert err.line == 6 and "name of this node" in err.message

    def test_same_wireguard_key(self, tmp_path: Path) -> None:
        text = MINIMAL + self.peer("b", KEY_B, "100.100.0.2") + self.peer("c", KEY_B, "100.100.0.3")
        err = load_error(tmp_path, text)
        assert "cloned machines?" in err.message and "peer 'b'" in err.message
        assert err.line == 10

    def test_same_key_different_spelling_is_still_the_same_key(self, tmp_path: Path) -> None:
        spaced = " " + KEY_B + " "
        text = MINIMAL + self.peer("b", KEY_B, "100.100.0.2") + self.peer("c", spaced, "100.100.0.3")
        assert "cloned machines?" in load_error(tmp_path, text).message

    def test_allowed_ips_routed_twice(self, tmp_path: Path) -> None:
        text = (
            MINIMAL
            + self.peer("b", KEY_B, "100.100.0.2", 'allowed_ips = ["10.1.0.0/24"]\n')
            + self.peer("c", KEY_C, "100.100.0.3", 'allowed_ips = ["10.1.0.0/24"]\n')
        )
        err = load_error(tmp_path, text)
        assert "10.1.0.0/24 is already routed via peer 'b'" in err.message and err.line == 15

    def test_allowed_ips_with_own_address(self, tmp_path: Path) -> None:
        text = MINIMAL + self.peer("b", KEY_B, "100.100.0.2", 'allowed_ips = ["100.100.0.1/32"]\n')
        assert "own mesh address" in load_error(tmp_path, text).message

    def test_peer_mesh_ip_routed_via_other_peer(self, tmp_path: Path) -> None:
        text = (
            MINIMAL
            + self.peer("b", KEY_B, "100.100.0.2", 'allowed_ips = ["100.100.0.3/32"]\n')
            + self.peer("c", KEY_C, "100.100.0.3")
        )
        err = load_error(tmp_path, text)
        assert err.line == 14 and "already routed via peer 'b'" in err.message

    def test_overlapping_but_different_routes_are_fine(self, tmp_path: Path) -> None:
        text = (
            MINIMAL
            + self.peer("b", KEY_B, "100.100.0.2", 'allowed_ips = ["0.0.0.0/0", "::/0"]\n')
            + self.peer("c", KEY_C, "100.100.0.3", 'allowed_ips = ["10.0.0.0/8"]\n')
        )
        assert len(load(tmp_path, text).peers) == 2


class TestSecretsStayOut:
    def test_wireguard_key_value_is_never_echoed(self, tmp_path: Path) -> None:
        private = base64.b64encode(os.urandom(33)).decode()
        text = MINIMAL + f'\n[[peers]]\nname = "b"\nwireguard_public_key = "{private}"\nmesh_ip = "100.100.0.2"\n'
        err = load_error(tmp_path, text)
        assert private not in str(err) and private[:8] not in str(err)

    def test_pasted_private_key_is_not_echoed(self, tmp_path: Path) -> None:
        body = base64.b64encode(os.urandom(64)).decode()
        text = MINIMAL.replace('"alpha"', f'"""-----BEGIN OPENSSH PRIVATE KEY-----\n{body}\n"""')
        err = load_error(tmp_path, text)
        assert body[:10] not in str(err) and "character string" in err.message

    def test_unknown_secretish_key_value_not_echoed(self, tmp_path: Path) -> None:
        secret = base64.b64encode(os.urandom(32)).decode()
        err = load_error(tmp_path, MINIMAL + f'network_secret = "{secret}"\n')
        assert secret not in str(err) and "network_secret" in err.message


# --------------------------------------------------------------------------- network secret


class TestNetworkSecret:
    def test_write_then_read(self, tmp_path: Path) -> None:
        path = tmp_path / "sub" / "network.secret"
        secret = write_network_secret(path)
        assert len(secret) == 32
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert read_network_secret(path) == secret
        assert base64.b64decode(path.read_text().strip()) == secret

    def test_write_ignores_a_permissive_umask(self, tmp_path: Path) -> None:
        old = os.umask(0)
        try:
            write_network_secret(tmp_path / "s")
        finally:
            os.umask(old)
        assert stat.S_IMODE((tmp_path / "s").stat().st_mode) == 0o600

    def test_refuses_to_overwrite(self, tmp_path: Path) -> None:
        path = tmp_path / "s"
        first = write_network_secret(path)
        with pytest.raises(ConfigError, match="refusing to overwrite"):
            write_network_secret(path)
        assert read_network_secret(path) == first

    def test_refuses_to_follow_into_existing_via_symlink(self, tmp_path: Path) -> None:
        (tmp_path / "target").write_text("x")
        (tmp_path / "link").symlink_to(tmp_path / "target")
        with pytest.raises(ConfigError):
            write_network_secret(tmp_path / "link")
        assert (tmp_path / "target").read_text() == "x"

    def test_write_unwritable_dir(self, tmp_path: Path) -> None:
        (tmp_path / "f").write_text("")
        with pytest.raises(ConfigError, match="cannot create network secret"):
            write_network_secret(tmp_path / "f" / "s")

    @pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660, 0o602, 0o620])
    def test_refuses_group_or_other_access(self, tmp_path: Path, mode: int) -> None:
        path = tmp_path / "s"
        write_network_secret(path)
        path.chmod(mode)
        with pytest.raises(ConfigError) as info:
            read_network_secret(path)
        assert f"chmod 600 {path}" in str(info.value)

    def test_owner_only_read_is_fine(self, tmp_path: Path) -> None:
        path = tmp_path / "s"
        secret = write_network_secret(path)
        path.chmod(0o400)
        assert read_network_secret(path) == secret

    def test_missing(self, tmp_path: Path) -> None:
        with pytest.raises(ConfigError, match="No such file"):
            read_network_secret(tmp_path / "nope")

    def test_not_a_regular_file(self, tmp_path: Path) -> None:
        d = tmp_path / "d"
        d.mkdir(mode=0o700)
        d.chmod(0o700)
        with pytest.raises(ConfigError, match="not a regular file"):
            read_network_secret(d)

    @pytest.mark.parametrize(
        "content",
        [
            b"",
            b"zqxjkvw plmnbq hunter2pass",
            base64.b64encode(b"s" * 31),
            base64.b64encode(b"s" * 33),
            base64.b64encode(b"s" * 32)[:-1],
            b"\xff\xfe" * 30,
            base64.b64encode(b"s" * 32) + b"\n" + base64.b64encode(b"t" * 32),
        ],
    )
    def test_bad_content_is_refused_without_echo(self, tmp_path: Path, content: bytes) -> None:
        path = tmp_path / "s"
        path.write_bytes(content)
        path.chmod(0o600)
        with pytest.raises(ConfigError) as info:
            read_network_secret(path)
        message = str(info.value)
        assert "base64 of 32 bytes" in message
        for chunk in content.split():
            if len(chunk) >= 6:
                assert chunk[:6].decode("latin-1") not in message

    def test_whitespace_around_is_fine(self, tmp_path: Path) -> None:
        path = tmp_path / "s"
        path.write_bytes(b"  " + base64.b64encode(b"k" * 32) + b"\n\n")
        path.chmod(0o600)
        assert read_network_secret(path) == b"k" * 32


# --------------------------------------------------------------------------- own key, starter


class TestCheckPeerKeys:
    def test_own_key_as_peer(self, tmp_path: Path) -> None:
        text = MINIMAL + f'\n\n[[peers]]\nname = "b"\nwireguard_public_key = "{KEY_B}"\nmesh_ip = "100.100.0.2"\n'
        cfg = load(tmp_path, text)
        check_peer_keys(cfg, bytes([9]) * 32)
        with pytest.raises(ConfigError) as info:
            check_peer_keys(cfg, bytes([2]) * 32)
        assert info.value.line == 6
        assert "peer 'b' uses this node's own key" in info.value.message
        assert info.value.path == tmp_path / "tunnelmesh.toml"

    def test_no_peers(self, tmp_path: Path) -> None:
        check_peer_keys(load(tmp_path, MINIMAL), bytes(32))


class TestStarterConfig:
    def test_loads(self, tmp_path: Path) -> None:
        text = starter_config(name="alpha", identity="/etc/ssh/ssh_host_ed25519_key", mesh_ip="100.100.0.1")
        path = write(tmp_path, text)
        cfg = load_config(path, state_dir=tmp_path / "st")
        assert (cfg.name, str(cfg.mesh_ip), cfg.listen_port, cfg.peers) == ("alpha", "100.100.0.1", 51820, ())
        assert cfg.identity == "/etc/ssh/ssh_host_ed25519_key"
        assert text.count("#") > 10  # commented

    def test_example_peer_block_is_valid_when_uncommented(self, tmp_path: Path) -> None:
        text = starter_config(name="alpha", identity="agent", mesh_ip="100.100.0.1", listen_port=0)
        block = text.split("# [[peers]]", 1)[1]
        peer = ["[[peers]]"]
        for line in block.splitlines():
            line = line.removeprefix("# ")
            if line.startswith("identity") or line.startswith("# "):
                continue
            peer.append(line)
        peer.append(f'wireguard_public_key = "{KEY_B}"')
        cfg = load(tmp_path, text + "\n".join(peer) + "\n")
        assert cfg.peers[0].name == "beta" and cfg.listen_port == 0

    def test_quoting(self, tmp_path: Path) -> None:
        odd = 'keys/my "odd" \\ key\tfile'
        text = starter_config(name="a", identity=odd, mesh_ip="100.100.0.1")
        assert load(tmp_path, text).identity == str(tmp_path / odd)

    @pytest.mark.parametrize(
        "kwargs",
        [
            dict(name="Bad Name", identity="agent", mesh_ip="100.100.0.1"),
            dict(name="a", identity="agent", mesh_ip="300.0.0.1"),
            dict(name="a", identity="", mesh_ip="100.100.0.1"),
            dict(name="a", identity="agent", mesh_ip="100.100.0.1", listen_port=70000),
            dict(name="a", identity="agent", mesh_ip="100.100.0.1", listen_port="1"),
        ],
    )
    def test_refuses_bad_values(self, kwargs: dict[str, object]) -> None:
        with pytest.raises(ValueError):
            starter_config(**kwargs)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- identity lines


def test_garbage_identity_line_is_a_config_error(tmp_path: Path) -> None:
    text = MINIMAL + '\n[[peers]]\nname = "b"\nidentity = "ssh-ed25519 garbage wg=x att=y"\nmesh_ip = "100.100.0.2"\n'
    err = load_error(tmp_path, text)
    assert err.line == 7 and "peer 'b'" in err.message and "identit" in err.message


@pytest.fixture(scope="module")
def identity_lines() -> list[str]:
    """Two real identity lines, of fresh Ed25519 key files."""
    return [new_identity().public.to_line() for _ in range(2)]


class TestIdentityLines:
    def test_valid_identity_line(self, tmp_path: Path, identity_lines: list[str]) -> None:
        text = MINIMAL + f'\n[[peers]]\nname = "b"\nidentity = "{identity_lines[0]}"\nmesh_ip = "100.100.0.2"\n'
        cfg = load(tmp_path, text)
        peer = cfg.peers[0]
        expected = PublicIdentity.from_line(identity_lines[0])
        assert isinstance(peer.identity, PublicIdentity)
        assert peer.identity.fingerprint == expected.fingerprint
        assert peer.wireguard_public_key == bytes(expected.wg_public_key)
        assert len(peer.wireguard_public_key) == 32

    def test_two_peers_with_one_identity(self, tmp_path: Path, identity_lines: list[str]) -> None:
        text = MINIMAL
        for n in range(2):
            text += f'\n[[peers]]\nname = "p{n}"\nidentity = "{identity_lines[0]}"\nmesh_ip = "100.100.0.{n + 2}"\n'
        err = load_error(tmp_path, text)
        assert "cloned machines?" in err.message and err.line == 10

    def test_own_identity_as_peer(self, tmp_path: Path, identity_lines: list[str]) -> None:
        text = MINIMAL + f'\n[[peers]]\nname = "b"\nidentity = "{identity_lines[1]}"\nmesh_ip = "100.100.0.2"\n'
        cfg = load(tmp_path, text)
        own = PublicIdentity.from_line(identity_lines[1]).wg_public_key
        with pytest.raises(ConfigError, match="uses this node's own key"):
            check_peer_keys(cfg, bytes(own))

    @pytest.mark.parametrize("part", ["wg", "att", "ssh"])
    def test_tampered_identity_line_fails_verification(
        self, tmp_path: Path, identity_lines: list[str], part: str
    ) -> None:
        fields = identity_lines[0].split()
        other = identity_lines[1].split()
        if part == "wg":  # another node's derived key with this node's attestation
            fields = [*fields[:2], next(f for f in other if f.startswith("wg=")), *[f for f in fields if f.startswith("att=")]]
        elif part == "att":
            fields = [*fields[:2], *[f for f in fields if f.startswith("wg=")], next(f for f in other if f.startswith("att="))]
        else:
            fields = [*other[:2], *fields[2:]]
        line = " ".join(fields)
        with pytest.raises(IdentityError) as expected:
            PublicIdentity.from_line(line)
        text = MINIMAL + f'\n[[peers]]\nname = "b"\nidentity = "{line}"\nmesh_ip = "100.100.0.2"\n'
        err = load_error(tmp_path, text)
        assert err.line == 7
        assert str(expected.value) in err.message


def test_default_host_key_agrees_with_identity_module() -> None:
    assert IDENTITY_DEFAULT_HOST_KEY == DEFAULT_HOST_KEY


# --- [coordinator] ------------------------------------------------------------------------------

COORDINATED = """\
[node]
name = "alpha"

[coordinator]
url = "http://192.0.2.1:7400/"
serve = "0.0.0.0:7400"
"""


def test_coordinator_table_gives_url_serve_and_default_db(tmp_path: Path) -> None:
    config = load(tmp_path, COORDINATED)
    assert config.mesh_ip is None and config.peers == ()
    assert config.coordinator is not None
    assert config.coordinator.url == "http://192.0.2.1:7400"
    assert config.coordinator.serve == ("0.0.0.0", 7400)
    assert config.coordinator.db == (tmp_path / "state" / "coordinator.db").absolute()
    assert config.coordinator.trusted_proxies == frozenset()
    behind = load(tmp_path, COORDINATED + 'trusted_proxies = ["192.0.2.9", "2001:db8::9"]\n')
    assert behind.coordinator is not None and behind.coordinator.trusted_proxies == {"192.0.2.9", "2001:db8::9"}


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ('[node]\nmesh_ip = "100.100.0.1"', "assigned by the coordinator"),
        ('[coordinator]\nurl = "ftp://x"', "must be http://host:port"),
        ('[coordinator]\nurl = "http://192.0.2.1:7400"\nserve = "nowhere"', "must be IPv4:port"),
        ('[coordinator]\nurl = "http://192.0.2.1:7400"\nserve = "0.0.0.0:70000"', "must be IPv4:port"),
        ('[coordinator]\nurl = "http://192.0.2.1:7400"\nflavour = 1', "unknown key 'flavour'"),
        ('[coordinator]\nurl = "http://192.0.2.1:7400"\nserve = "0.0.0.0:7400"\ntrusted_proxies = ["nginx"]',
         "trusted_proxies must be a list of IP addresses"),
        ('[coordinator]\nurl = "http://192.0.2.1:7400"\ntrusted_proxies = ["192.0.2.9"]', "needs serve"),
        ('[coordinator]\nserve = "0.0.0.0:7400"', "missing required key 'url'"),
        ('[coordinator]\nurl = "http://x"\n\n[[peers]]\nname = "b"\nwireguard_public_key = "' + KEY_B
         + '"\nmesh_ip = "100.100.0.2"', "[[peers]] are not used with a [coordinator]"),
    ],
)
def test_coordinator_table_refusals(tmp_path: Path, extra: str, expected: str) -> None:
    if extra.startswith("[node]"):
        text = 'name = "alpha"\n'.join(["[node]\n", extra.removeprefix("[node]\n") + '\n[coordinator]\nurl = "http://x"\n'])
    else:
        text = '[node]\nname = "alpha"\n\n' + extra + "\n"
    error = load_error(tmp_path, text)
    assert expected in str(error)
    assert error.line is not None or "peers" in expected


def test_starter_config_with_coordinator_parses(tmp_path: Path) -> None:
    text = starter_config(name="beta", identity="agent", coordinator_url="http://192.0.2.1:7400", serve="0.0.0.0:7400")
    config = load(tmp_path, text)
    assert config.coordinator is not None and config.coordinator.serve == ("0.0.0.0", 7400)
    joined = load(tmp_path, starter_config(name="beta", identity="agent", coordinator_url="http://192.0.2.1:7400"))
    assert joined.coordinator is not None and joined.coordinator.serve is None
    assert joined.coordinator.ca_file is None


def test_starter_config_writes_the_ca_file_and_the_cli_takes_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tunnelmesh.cli import EXIT_USAGE, main

    text = starter_config(name="beta", identity="agent", coordinator_url="https://192.0.2.1:8443",
                          ca_file="/etc/tunnelmesh/my ca.pem")
    config = load(tmp_path, text)
    assert config.coordinator is not None and config.coordinator.ca_file == Path("/etc/tunnelmesh/my ca.pem")
    with pytest.raises(ValueError, match="ca_file"):
        starter_config(name="a", identity="agent", mesh_ip="100.100.0.1", ca_file="/etc/tunnelmesh/ca.pem")
    # `init` and `join --ca-file`: refused before anything is written or sent when the file is no CA.
    not_pem = tmp_path / "ca.pem"
    not_pem.write_text("not a certificate\n")
    state = tmp_path / "node"
    for args in (["join", "tm1.anything", "--new-key"], ["init", "--new-key", "--url", "https://192.0.2.1:8443"]):
        assert main(["--state-dir", str(state), *args, "--ca-file", str(not_pem)]) == EXIT_USAGE
        assert f"--ca-file: CA file {not_pem} holds no PEM certificate" in capsys.readouterr().err
        assert not (state / "tunnelmesh.toml").exists()
    assert main(["--state-dir", str(state), "init", "--static", "--mesh-ip", "100.100.0.1", "--new-key",
                 "--ca-file", str(not_pem)]) == EXIT_USAGE
    assert "--ca-file is for a network with a coordinator" in capsys.readouterr().err


# --- [transports] ---------------------------------------------------------------------------------

TRANSPORTS = COORDINATED.replace('serve = "0.0.0.0:7400"\n', "") + "\n[transports]\n"


def test_transports_defaults_and_per_peer_choices(tmp_path: Path) -> None:
    from tunnelmesh.config import DEFAULT_SSH_PORT, RungChoice

    plain = load(tmp_path, COORDINATED).transports
    assert plain.default.enabled == ("udp", "ssh", "relay") and plain.ssh_port == DEFAULT_SSH_PORT
    assert plain.relay_listen is None and plain.relay_url is None
    config = load(tmp_path, TRANSPORTS + 'rungs = ["relay", "udp"]\nssh_port = 0\n\n'
                  '[transports.peers.nas]\nforce = "relay"\n\n[transports.peers.phone]\nrungs = ["udp"]\n').transports
    assert config.default == RungChoice(rungs=("udp", "relay"))  # kept best first
    assert config.ssh_port == 0
    assert config.for_peer("nas").enabled == ("relay",) and config.for_peer("phone").enabled == ("udp",)
    assert config.for_peer("anyone") == config.default


def test_relay_true_serves_on_the_default_port_or_where_told(tmp_path: Path) -> None:
    from tunnelmesh.config import DEFAULT_RELAY_PORT

    served = load(tmp_path, TRANSPORTS + "relay = true\n").transports
    assert served.relay_listen == ("0.0.0.0", DEFAULT_RELAY_PORT) and served.relay_url is None
    told = load(tmp_path, TRANSPORTS + 'relay = true\nrelay_listen = "192.0.2.5:8080"\n'
                'relay_url = "https://relay.example.org/"\n').transports
    assert told.relay_listen == ("192.0.2.5", 8080) and told.relay_url == "https://relay.example.org"


@pytest.mark.parametrize(("extra", "expected"), [
    ('rungs = ["udp", "carrier-pigeon"]', "rungs must be a non-empty list of distinct rungs"),
    ("rungs = []", "rungs must be a non-empty list"),
    ('rungs = ["udp", "udp"]', "distinct rungs"),
    ('rungs = ["udp"]\nforce = "ssh"', "force 'ssh' must be one of the enabled rungs"),
    ("ssh_port = 70000", "ssh_port must be between 0 and 65535"),
    ('ssh_bridge_user = "Root;rm"', "not a valid account name"),
    ('relay = "yes"', "relay must be true or false"),
    ('relay_url = "http://192.0.2.5:7401"', "relay_url needs relay = true"),
    ('relay_listen = "0.0.0.0:7401"', "relay_listen needs relay = true"),
    ('relay = true\nrelay_listen = "anywhere"', "relay_listen 'anywhere' must be IPv4:port"),
    ('relay = true\nrelay_url = "ws://192.0.2.5:7401"', "relay_url: relay 'ws://192.0.2.5:7401': expected http(s)"),
    ("flavour = 1", "unknown key 'flavour'"),
    ('[transports.peers.nas]\nforce = "teleport"', "force 'teleport' must be one of the enabled rungs"),
])
def test_transports_refusals_name_the_key_and_line(tmp_path: Path, extra: str, expected: str) -> None:
    error = load_error(tmp_path, TRANSPORTS + extra + "\n")
    assert expected in str(error) and error.line is not None


def test_relay_and_other_rungs_need_a_coordinator(tmp_path: Path) -> None:
    assert "relay = true needs a [coordinator]" in str(load_error(tmp_path, MINIMAL + "\n[transports]\nrelay = true\n"))
    assert "need a [coordinator]" in str(load_error(tmp_path, MINIMAL + '\n[transports]\nforce = "relay"\n'))


# --- [coordinator] TLS: the coordinator's own certificate, pinned ----------------------------------

PIN = "sha256:" + "0123456789abcdef" * 4
PINNED = """\
[node]
name = "alpha"

[coordinator]
url = "https://192.0.2.1:7400"
"""


def test_tls_fingerprint_and_the_served_certificate(tmp_path: Path) -> None:
    spelled = "SHA256:" + ":".join(PIN[7 + i:9 + i] for i in range(0, 64, 2)).upper()  # as openssl prints it
    config = load(tmp_path, PINNED + f'tls_fingerprint = "{spelled}"\n')
    assert config.coordinator is not None and config.coordinator.tls_fingerprint == PIN
    assert config.coordinator.tls_cert is None and config.coordinator.tls_key is None
    served = load(tmp_path, PINNED + f'serve = "0.0.0.0:7400"\ntls_fingerprint = "{PIN}"\n'
                                     'tls_cert = "c.pem"\ntls_key = "/etc/tunnelmesh/c.key"\n')
    assert served.coordinator is not None
    assert served.coordinator.tls_cert == (tmp_path / "c.pem").absolute()
    assert served.coordinator.tls_key == Path("/etc/tunnelmesh/c.key")
    assert load(tmp_path, COORDINATED).coordinator.tls_fingerprint is None  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("extra", "key", "expected"),
    [
        ('tls_fingerprint = "sha256:beef"', "tls_fingerprint", 'must be "sha256:" and 64 hex digits'),
        ("tls_fingerprint = 7", "tls_fingerprint", "tls_fingerprint must be a string"),
        (f'tls_fingerprint = "{PIN}"\nca_file = "ca.pem"', "tls_fingerprint", "keep one"),
        ('serve = "0.0.0.0:7400"\ntls_cert = "c.pem"', "tls_cert", "tls_key is missing"),
        ('serve = "0.0.0.0:7400"\ntls_key = "c.key"', "tls_key", "tls_cert is missing"),
        ('tls_cert = "c.pem"\ntls_key = "c.key"', "tls_cert", "needs serve"),
    ],
)
def test_tls_refusals_name_the_line(tmp_path: Path, extra: str, key: str, expected: str) -> None:
    text = PINNED + extra + "\n"
    error = load_error(tmp_path, text)
    assert expected in error.message, error.message
    lines = text.splitlines()
    assert error.line is not None and lines[error.line - 1].startswith(key), (error.line, text)


def test_a_pin_over_http_is_refused_with_its_line(tmp_path: Path) -> None:
    text = PINNED.replace("https://", "http://") + f'tls_fingerprint = "{PIN}"\n'
    error = load_error(tmp_path, text)
    assert "tls_fingerprint needs an https:// url" in error.message and error.line == 6


def test_starter_config_writes_the_pin_and_the_certificate(tmp_path: Path) -> None:
    text = starter_config(name="alpha", identity="agent", coordinator_url="https://192.0.2.1:7400",
                          serve="0.0.0.0:7400", tls_fingerprint=PIN, tls_cert="/s/coordinator-tls.pem",
                          tls_key="/s/coordinator-tls.key")
    coordinator = load(tmp_path, text).coordinator
    assert coordinator is not None and coordinator.tls_fingerprint == PIN
    assert (coordinator.tls_cert, coordinator.tls_key) == (Path("/s/coordinator-tls.pem"), Path("/s/coordinator-tls.key"))
    with pytest.raises(ValueError, match="https://"):
        starter_config(name="alpha", identity="agent", coordinator_url="http://192.0.2.1:7400", tls_fingerprint=PIN)
    with pytest.raises(ValueError, match="coordinator"):
        starter_config(name="alpha", identity="agent", mesh_ip="100.100.0.1", tls_fingerprint=PIN)


class TestFilterTable:
    """`[filter]`: this node's own allow-rules (docs/filter.md); bad ones refused with line and reason."""

    def test_absent_means_no_node_rules(self, tmp_path: Path) -> None:
        assert load(tmp_path, MINIMAL).filter_rules is None

    def test_empty_table_means_no_rules_but_a_filter(self, tmp_path: Path) -> None:
        assert load(tmp_path, MINIMAL + "[filter]\n").filter_rules == ()

    def test_rules_are_checked_in_file_order(self, tmp_path: Path) -> None:
        config = load(tmp_path, MINIMAL + '[[filter.allow]]\nfrom = "alice"\nproto = "tcp"\nports = [22, "8000-8100"]\n'
                                          '[[filter.allow]]\nfrom = ["10.2.0.0/16", "group:admins"]\nproto = "icmp"\n')
        assert config.filter_rules is not None
        first, second = config.filter_rules
        assert (first.origin, first.number, first.line, first.ports) == ("node", 1, 4, ((22, 22), (8000, 8100)))
        assert [str(s) for s in second.sources] == ["10.2.0.0/16", "group:admins"] and second.line == 8

    @pytest.mark.parametrize(("rule", "line", "reason"), [
        ('from = "alice"\nproto = "tcp"\nports = [70000]\n', 7, "node rule 1: ports: 70000: ports are 0 to 65535"),
        ('from = "alice"\nproto = "tcp"\n', 4, "node rule 1: missing 'ports'"),
        ('from = "alice"\nproto = "gre"\n', 6, "node rule 1: proto 'gre': expected tcp, udp, icmp, icmpv6 or any"),
        ('from = "10.0.0.1/8"\nproto = "icmp"\n', 5, "has host bits set (did you mean 10.0.0.0/8?)"),
        ('from = "alice"\nto = "bob"\nproto = "icmp"\n', 6, "node rule 1: unknown key 'to'"),
        ('from = "alice"\nproto = "icmp"\nports = [1]\n', 7, "icmp and icmpv6 have no ports"),
    ])
    def test_a_bad_rule_is_refused_with_its_line_and_reason(self, tmp_path: Path, rule: str, line: int,
                                                            reason: str) -> None:
        err = load_error(tmp_path, MINIMAL + "[[filter.allow]]\n" + rule)
        assert (err.line, reason in err.message) == (line, True), str(err)

    def test_an_array_of_tables_or_an_unknown_key_is_refused(self, tmp_path: Path) -> None:
        assert load_error(tmp_path, "[[filter]]\n" + MINIMAL).message == "[filter]: expected a table"
        err = load_error(tmp_path, MINIMAL + "[filter]\ndeny = []\n")
        assert err.line == 5 and "unknown key 'deny'" in err.message
