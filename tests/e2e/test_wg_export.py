"""`tunnelmesh wg-export`: a plain WireGuard device admitted to a coordinator network.

    switch sw (192.0.2.0/24)
    ├── a        admin, embedded coordinator      tunnelmesh up
    ├── b        member, serves the device        tunnelmesh up
    └── phone    wireguard-go + `wg`, configured only from what `wg-export` printed

The admin runs `tunnelmesh wg-export phone --via b`; the phone's interface is set up
from the printed wg-quick config the way `wg-quick` does (`wg setconf` with the
wg-quick-only lines taken out, the Address on the interface, a route per AllowedIPs),
and pings b's mesh address through it: first under a network policy that allows only a
and b (b's packet filter drops the device's pings while its session is up), then under
one that allows the device by name. b reports the device as a peer without an SSH
identity; a, which does not serve it, has no session with it. Then `tunnelmesh revoke
phone` on the admin cuts it off: its pings stop within REVOKED_WITHIN.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from pathlib import Path

import pytest

from tests.e2e.test_wireguard_peer import WireGuardGo, wg_tools  # noqa: F401 - wg_tools is a fixture
from tests.support.wait import wait_for
from tests.support.wireguard_go import start_wireguard_go
from tools.mesh import MeshNode, build_network, diagnostics

pytestmark = pytest.mark.e2e

#: How long after `revoke` returns the device's pings must have stopped (generous: the
#: serving node learns of it from its long-poll of the map, within a round trip).
REVOKED_WITHIN = 20.0
#: How long the device may take to reach b at first (the map reaches b, then a handshake).
REACHES_WITHIN = 30.0
#: The network policies: the members only, then the device too (docs/filter.md).
MEMBERS_ONLY = '''[[allow]]
from = ["a", "b"]
proto = "any"
'''
WITH_PHONE = MEMBERS_ONLY + '''
[[allow]]
from = "phone"
to = "b"
proto = "icmp"
'''
#: wg-quick's own lines, which `wg setconf` does not take (`wg-quick strip` drops them).
WG_QUICK_ONLY = ("Address", "DNS", "MTU", "Table", "PreUp", "PostUp", "PreDown", "PostDown", "SaveConfig")


def strip(config: str) -> str:
    """What `wg-quick strip` makes of a config: without the wg-quick-only lines."""
    kept = [line for line in config.splitlines() if line.split("=", 1)[0].strip() not in WG_QUICK_ONLY]
    return "\n".join(kept) + "\n"


def value(config: str, key: str) -> str:
    """The one value of `key` in a wg-quick config."""
    found = [line.split("=", 1)[1].strip() for line in config.splitlines() if line.split("=", 1)[0].strip() == key]
    assert len(found) == 1, f"{key}: {found} in\n{config}"
    return found[0]


def device_in(node, request) -> WireGuardGo:
    """A wireguard-go device in `node`, with no config yet."""
    ifname = f"tmwx{secrets.token_hex(5)}"  # unique per run: the control socket's path is global
    return WireGuardGo(node, ifname, start_wireguard_go(node, ifname, request.addfinalizer), "")


def configure_from(device: WireGuardGo, config: str, workdir: str) -> None:
    """Set the interface up as `wg-quick up` would from `config`."""
    conf = Path(workdir) / "phone-wg.conf"
    fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(strip(config))
    node, ifname = device.node, device.ifname
    node.run("wg", "setconf", ifname, str(conf))
    for address in value(config, "Address").split(","):
        if ":" not in address:  # the lab's underlay is IPv4 only; so is the test's traffic
            node.run("ip", "addr", "add", address.strip(), "dev", ifname)
    node.run("ip", "link", "set", ifname, "up")
    for allowed in value(config, "AllowedIPs").split(","):
        if ":" not in allowed:
            node.run("ip", "route", "add", allowed.strip(), "dev", ifname)


def ping_once(node, address: str) -> bool:
    return node.run("ping", "-n", "-c", "1", "-W", "1", address, check=False, timeout=10).returncode == 0


def peers_of(member: MeshNode) -> dict[str, dict]:
    return {p["name"]: p for p in member.status()["peers"]}


def test_a_wireguard_go_device_from_wg_export_reaches_its_node_until_revoked(wg_tools, lab, request):  # noqa: F811
    mesh = build_network(lab, ["a", "b"], policy=MEMBERS_ONLY)
    a, b = mesh["a"], mesh["b"]
    phone = lab.add_node("phone")
    lab.connect(phone, lab.switches["sw"])
    device = device_in(phone, request)

    exported = json.loads(a.tm("wg-export", "phone", "--via", "b", "--json").stdout)
    config = exported["config"]
    assert exported["served_by"] == "b" and exported["private_key"], exported
    assert value(config, "AllowedIPs") == f"{b.mesh_ip}/32, {exported['allowed_ips'][1]}", config
    assert value(config, "PublicKey") == b.status()["node"]["wireguard_public_key"], config
    assert value(config, "Endpoint").rsplit(":", 1)[0] == b.underlay, config
    configure_from(device, config, lab.workdir)

    def details() -> str:
        return f"config:\n{config}\n{diagnostics(mesh)}\n{device.diagnostics()}"

    # Under a policy that does not name it: the session comes up, b's filter drops the pings.
    deadline = time.monotonic() + REACHES_WITHIN
    while peers_of(b).get("phone", {}).get("state") != "up":
        assert not ping_once(phone, b.mesh_ip), f"the device reached b under a policy that does not allow it\n{details()}"
        if time.monotonic() > deadline:
            pytest.fail(f"no session between the device and b within {REACHES_WITHIN:g} s\n{details()}", pytrace=False)
    assert not any(ping_once(phone, b.mesh_ip) for _ in range(3)), f"allowed without a rule\n{details()}"

    policy = Path(a.node.state_dir) / "with-phone.toml"
    policy.write_text(WITH_PHONE)
    a.tm("policy", "set", str(policy))
    deadline = time.monotonic() + REACHES_WITHIN
    while not ping_once(phone, b.mesh_ip):
        if time.monotonic() > deadline:
            pytest.fail(f"the device did not reach b within {REACHES_WITHIN:g} s of the policy allowing it\n{details()}",
                        pytrace=False)
    served = peers_of(b).get("phone")
    assert served is not None and served["state"] == "up" and served["fingerprint"] is None, f"{served}\n{details()}"
    assert "phone" not in peers_of(a), f"a, which does not serve the device, has a session with it\n{details()}"
    # b's own pings to the device are its own connections: the filter lets them and their answers by.
    assert b.node.run("ping", "-n", "-c", "2", "-W", "2", exported["ipv4"], check=False).returncode == 0, details()

    a.tm("revoke", "phone")
    revoked_at = time.monotonic()
    failures = 0
    while failures < 3:  # three pings in a row unanswered: cut off, not one lost packet
        failures = 0 if ping_once(phone, b.mesh_ip) else failures + 1
        if time.monotonic() - revoked_at > REVOKED_WITHIN:
            pytest.fail(f"the device still reaches b {REVOKED_WITHIN:g} s after `revoke`\n{details()}", pytrace=False)
    print(f"cut off {time.monotonic() - revoked_at:.1f} s after `revoke` returned")
    assert "phone" not in peers_of(b), details()

    # The text form: the config to a 0600 file, a QR code of it on stdout, no key in the text.
    out = Path(lab.workdir) / "tablet.conf"
    shown = a.tm("wg-export", "tablet", "--via", "b", "--out", str(out))
    assert os.stat(out).st_mode & 0o777 == 0o600
    written = out.read_text()
    assert value(written, "PublicKey") == value(config, "PublicKey")  # (its address may be the revoked phone's)
    assert "▀" in shown.stdout and value(written, "PrivateKey") not in shown.stdout, shown.stdout
    assert "admitted tablet" in shown.stderr and "tablet" in {d for d in peers_until(b, "tablet")}, shown.stderr


def peers_until(member: MeshNode, name: str, timeout: float = REACHES_WITHIN) -> dict[str, dict]:
    """`member`'s peers once `name` is among them (the map reaches it within a round trip)."""
    def with_name() -> dict[str, dict] | None:
        peers = peers_of(member)
        return peers if name in peers else None

    return wait_for(f"{name} among {member.name}'s peers", with_name, timeout, lambda: diagnostics({member.name: member}),
                    interval=0.2)
