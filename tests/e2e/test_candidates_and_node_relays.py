"""Every known endpoint, and relays on nodes, end to end: real daemons in namespaces.

- Two nodes behind one NAT, the coordinator outside: the address the coordinator
  sees (the NAT's) does not lead back inside, so only the addresses the nodes
  register themselves (their LAN addresses) can carry UDP between them. With the
  pair kept to UDP, their session must come up on those.
- A node with `relay = true` serves /relay; when the coordinator (and with it its
  relay) is out of reach and UDP and SSH between two nodes are cut, they carry on
  through that node's relay.
- A rung forced on both sides is the only one used, from the first handshake on.
"""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from tools.lab import Lab, Switch, _replace_table
from tools.mesh import COORDINATOR_PORT, MeshNode, block_path, diagnostics, rung_of

pytestmark = pytest.mark.e2e


def network(lab: Lab, placement: dict[str, list[Switch]], *, configs: dict[str, str] | None = None
            ) -> dict[str, MeshNode]:
    """init on the first node (embedded coordinator), join the others; each node on the
    switches `placement` names (the first address is where the coordinator is told to be
    for the admin). `configs` are appended to a node's config before it starts."""
    configs = configs or {}
    mesh: dict[str, MeshNode] = {}
    for name, switches in placement.items():
        node = lab.add_node(name)
        addresses = [lab.connect(node, switch) for switch in switches]
        mesh[name] = MeshNode(node, addresses[0], "")
    admin = next(iter(mesh.values()))
    admin.tm("init", "--name", admin.name, "--new-key", "--url", f"http://{admin.underlay}:{COORDINATOR_PORT}")
    if admin.name in configs:
        admin.append_config(configs[admin.name])
    admin.up()
    for member in mesh.values():
        if member is not admin:
            member.tm("join", admin.tm("invite").stdout.strip(), "--name", member.name, "--new-key")
            if member.name in configs:
                member.append_config(configs[member.name])
            member.up()
    for member in mesh.values():
        with open(f"{member.node.state_dir}/network.json") as f:
            member.mesh_ip = json.load(f)["member"]["body"]["ipv4"]
    return mesh


def peer_status(member: MeshNode, peer: str) -> dict[str, Any] | None:
    return next((p for p in member.status()["peers"] if p["name"] == peer), None)


def wait_until_up(member: MeshNode, peer: str, other: MeshNode, timeout: float) -> dict[str, Any]:
    """Until `member`'s session with `peer` is up (nudged by in-tunnel pings); its status."""
    deadline = time.monotonic() + timeout
    status = None
    while time.monotonic() < deadline:
        status = peer_status(member, peer)
        if status is not None and status["state"] == "up":
            return status
        member.node.run("ping", "-c", "1", "-W", "1", other.mesh_ip, check=False)
    raise AssertionError(f"{member.name} -> {peer} not up within {timeout:g} s: {status}")


def assert_pong(member: MeshNode, peer: str, rung: str) -> None:
    """`tunnelmesh ping` answers, sent and answered on `rung`."""
    out = member.tm("ping", peer, "-c", "1", "--timeout", "5").stdout
    assert out.startswith(f"pong from {peer} via {rung} ") and "answer came on" not in out, out


def keep_to(peer: str, rungs: str) -> str:
    return f"\n[transports.peers.{peer}]\n{rungs}\n"


def test_two_nodes_behind_one_nat_find_each_other_on_their_own_addresses(lab: Lab) -> None:
    outside = lab.add_switch("out", "198.51.100.0/24")
    lan = lab.add_switch("lan", "203.0.113.0/24")
    lab.add_router("nat", outside, lan)
    mesh = network(lab, {"hub": [outside], "a": [lan], "b": [lan]},
                   configs={"a": keep_to("b", 'rungs = ["udp"]'), "b": keep_to("a", 'rungs = ["udp"]')})
    a, b = mesh["a"], mesh["b"]
    try:
        status = wait_until_up(a, "b", b, timeout=40)
        # The coordinator saw both at the NAT's address, which does not lead back in; the
        # session runs on b's own LAN address, which b registered beside it.
        assert status["path"]["endpoint"].startswith(f"udp {b.node.addresses[0]}:"), (status, diagnostics(mesh))
        assert status["path"]["rung"] == "udp"
        assert_pong(a, "b", "udp")
        assert a.node.run("ping", "-c", "3", "-i", "0.2", "-W", "2", b.mesh_ip, check=False).returncode == 0
    finally:
        for member in mesh.values():
            member.down(check=False)


def cut_off(member: MeshNode, hub: MeshNode) -> None:
    """Inside `member`'s namespace, drop everything to and from `hub` (coordinator and its relay)."""
    member.node.nft(_replace_table("inet", "tm_no_hub", [
        "  chain out {", "    type filter hook output priority 0; policy accept;",
        f"    ip daddr {hub.underlay} drop", "  }",
        "  chain in {", "    type filter hook input priority 0; policy accept;",
        f"    ip saddr {hub.underlay} drop", "  }",
    ]))


def test_a_node_with_relay_true_carries_two_peers_when_the_coordinator_is_out_of_reach(lab: Lab) -> None:
    switch = lab.add_switch("sw", "192.0.2.0/24")
    mesh = network(lab, {"hub": [switch], "r": [switch], "a": [switch], "b": [switch]})
    hub, r, a, b = mesh["hub"], mesh["r"], mesh["a"], mesh["b"]
    try:
        # r turns its relay on while the others run: they learn it from the peer map and connect.
        r.down()
        r.append_config("\n[transports]\nrelay = true\n")
        r.up()
        url = f"http://{r.underlay}:7401"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            relays = [n.status()["node"]["transports"]["node_relays"] for n in (a, b)]
            if all(any(x["url"] == f"ws://{r.underlay}:7401/relay" and x["state"] == "connected" for x in rs)
                   for rs in relays):
                break
            time.sleep(0.5)
        else:
            raise AssertionError(f"a and b did not connect to {url}: {relays}\n{diagnostics(mesh)}")
        wait_until_up(a, "b", b, timeout=30)
        assert f"relay ws://{r.underlay}:7401/relay: connected" in a.tm("status").stdout
        assert "serving a relay for members: " in r.tm("status").stdout
        # The coordinator and its relay out of reach for both; UDP and SSH between them cut.
        cut_off(a, hub)
        cut_off(b, hub)
        block_path(a, b, udp=True, tcp=True)
        deadline = time.monotonic() + 45
        status = None
        while time.monotonic() < deadline:
            a.node.run("ping", "-c", "1", "-W", "1", b.mesh_ip, check=False)
            status = peer_status(a, "b")
            if status is not None and status["path"] is not None and status["path"]["rung"] == "relay" and rung_of(b, "a") == "relay":
                break
        else:
            raise AssertionError(f"a and b not on the relay within 45 s: {status}\n{diagnostics(mesh)}")
        assert status["path"] == {"rung": "relay", "endpoint": f"relay {url}"}, status
        assert_pong(a, "b", "relay")
        assert a.node.run("ping", "-c", "3", "-i", "0.2", "-W", "2", b.mesh_ip, check=False).returncode == 0
        serving = r.status()["node"]["transports"]["serving_relay"]
        assert serving is not None and serving["connections"] >= 3, serving  # a, b and r itself
    finally:
        for member in mesh.values():
            member.down(check=False)


def test_a_rung_forced_on_both_sides_carries_the_first_handshake(lab: Lab) -> None:
    switch = lab.add_switch("sw", "192.0.2.0/24")
    mesh = network(lab, {"hub": [switch], "a": [switch], "b": [switch]},
                   configs={"a": keep_to("b", 'force = "ssh"'), "b": keep_to("a", 'force = "ssh"')})
    a, b = mesh["a"], mesh["b"]
    try:
        status = wait_until_up(a, "b", b, timeout=40)
        assert status["path"]["rung"] == "ssh" and status["path"]["endpoint"].startswith("ssh"), status
        assert status["transitions"] == [], status  # never on another rung first
        other = peer_status(b, "a")
        assert other is not None and other["path"]["rung"] == "ssh" and other["transitions"] == [], other
        assert_pong(a, "b", "ssh")
        for member, peer in ((a, "b"), (b, "a")):
            assert f"{peer}: session up via ssh" in member.log_tail(20000), member.log_tail()
    finally:
        for member in mesh.values():
            member.down(check=False)
