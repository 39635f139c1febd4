"""What `tunnelmesh wg-export` prints: the wg-quick config, its QR code, the checks of
what the user gives (a public key), the address it picks, the 0600 file, and what it says
on a static node."""

from __future__ import annotations

import asyncio
import configparser
import os
from pathlib import Path

import pytest
import segno

from tests.support.membership import NOW, World
from tunnelmesh.config import starter_config
from tunnelmesh.exports.wg import WgExport, export_device, free_host, parse_public_key, qr_code, write_config
from tunnelmesh.membership import DeviceEntry, PeerMap, b64
from tunnelmesh.network import NetworkError
from tunnelmesh.paths import Paths

SERVER_KEY = bytes(range(100, 132))
PSK = bytes(range(200, 232))
PRIVATE = bytes(range(50, 82))


def export(private: bytes | None = PRIVATE) -> WgExport:
    w = World.create()
    device = DeviceEntry.create(w.admin, w.network, "phone", bytes(range(1, 33)), "node0", 9, NOW)
    server = w.network.host(1)
    return WgExport(device, "node0", SERVER_KEY, (str(server[0]), str(server[1])), "192.0.2.1:51820", PSK, private)


def sections(config: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(comment_prefixes=("#",), interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys as written
    parser.read_string(config)
    return parser


def as_dict(config: str) -> dict[str, dict[str, str]]:
    return {name: dict(section) for name, section in sections(config).items()}


def test_the_config_is_a_wg_quick_config_of_the_device_and_its_one_serving_node() -> None:
    made = export()
    parsed = sections(made.config())
    device, server = made.device, made.server_addresses
    assert dict(parsed["Interface"]) == {"PrivateKey": b64(PRIVATE), "Address": f"{device.ipv4}/32, {device.ipv6}/128"}
    assert dict(parsed["Peer"]) == {
        "PublicKey": b64(SERVER_KEY), "PresharedKey": b64(PSK), "Endpoint": "192.0.2.1:51820",
        "AllowedIPs": f"{server[0]}/32, {server[1]}/128", "PersistentKeepalive": "25"}
    shown = made.to_json()
    assert shown["config"] == made.config() and shown["served_by"] == "node0" and shown["private_key"] == b64(PRIVATE)


def test_with_the_users_own_key_the_config_has_no_private_key_and_the_keys_never_show_in_a_repr() -> None:
    made = export(private=None)
    assert "PrivateKey" not in sections(made.config())["Interface"]
    assert "# PrivateKey = (this device's own private key" in made.config()
    assert made.to_json()["private_key"] is None
    for secret in (PRIVATE, PSK):
        assert b64(secret) not in repr(export())


def decoded(drawing: str) -> list[list[int]]:
    """The modules (1 = dark) a compact terminal drawing shows: each character is two rows,
    light on a dark terminal ("█" both light, "▀" the top one, "▄" the bottom one)."""
    light = {"█": (1, 1), "▀": (1, 0), "▄": (0, 1), " ": (0, 0)}
    rows: list[list[int]] = []
    for line in drawing.splitlines():
        pairs = [light[char] for char in line]
        rows += [[1 - top for top, _ in pairs], [1 - bottom for _, bottom in pairs]]
    return rows


def test_the_qr_code_is_a_full_qr_code_of_the_config_that_fits_a_terminal() -> None:
    made = export()
    config = made.qr_text()
    assert as_dict(config) == as_dict(made.config())  # only the comments are left out
    assert "#" not in config
    drawing = qr_code(config)
    expected = segno.make_qr(config, error="l")
    assert not expected.is_micro
    rows = [list(row) for row in expected.matrix_iter(scale=1, border=None)]
    assert decoded(drawing)[:len(rows)] == rows
    assert max(len(line) for line in drawing.splitlines()) <= 80


def test_a_public_key_is_taken_only_as_wg_pubkey_prints_one() -> None:
    assert parse_public_key(b64(SERVER_KEY) + "\n") == SERVER_KEY
    for bad, why in (("", "public key"), (b64(bytes(16)), "public key"), ("not base64!", "public key"),
                     (b64(bytes(32)), "all zeros")):
        with pytest.raises(NetworkError, match=why):
            parse_public_key(bad)


def test_the_address_picked_is_the_lowest_no_entry_and_no_live_binding_holds() -> None:
    w = World.create()
    peer_map = PeerMap(w.network, w.wg(0))
    entries = [w.entry(0), w.entry(1)]  # hosts 1 and 2
    assert free_host(w.network, peer_map, entries) == 3
    peer_map.bindings[f"ipv4:{w.network.host(3)[0]}"] = w.wg(4)  # a member the coordinator leaves out still holds it
    assert free_host(w.network, peer_map, entries) == 4


def test_the_config_file_is_written_0600(tmp_path: Path) -> None:
    target, made = tmp_path / "phone.conf", export()
    write_config(target, made)
    assert target.read_text() == made.config()
    assert os.stat(target).st_mode & 0o777 == 0o600


def test_on_a_static_node_it_says_it_needs_a_coordinator_network_and_what_a_static_mesh_does(tmp_path: Path) -> None:
    config = tmp_path / "tunnelmesh.toml"
    config.write_text(starter_config(name="a", identity=str(tmp_path / "id"), mesh_ip="10.99.0.1"))
    with pytest.raises(NetworkError) as refused:
        asyncio.run(export_device(Paths(tmp_path, config), "phone"))
    assert "a network with a coordinator" in str(refused.value) and "static mesh" in str(refused.value)
    assert "[[peers]]" in str(refused.value) and "`tunnelmesh show --wg`" in str(refused.value)
    assert "tunnelmesh join" not in str(refused.value)
