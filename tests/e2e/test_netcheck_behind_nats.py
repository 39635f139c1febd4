"""`tunnelmesh netcheck` and the NAT facts in `status`, from daemons behind lab NAT routers.

Three members, each behind a router of its own (tools/natlab.py): a port-restricted cone
("easy"), a symmetric NAT ("hard"), and one whose router lets no UDP out ("walled"); the
standalone coordinator on two outside addresses (tools/mesh.build_nat_network). Through
the CLI: `netcheck --json` gives each one's NAT, what it can reach and how fast;
`netcheck` reads as a report; `status` has the same facts. Without a daemon, netcheck
says to start one.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from actors.messages import Netcheck, from_json
from tests.support.wait import wait_for
from tools.mesh import MeshNode, build_nat_network, diagnostics
from tools.natlab import NatLab

TYPES = {"easy": "port-restricted", "hard": "symmetric", "walled": "udp-blocked"}


def netcheck(member: MeshNode) -> tuple[int, dict[str, Any]]:
    proc = member.tm("netcheck", "--json", check=False, timeout=120)
    assert proc.returncode in (0, 1), proc.stderr
    reply = json.loads(proc.stdout)
    from_json(Netcheck, reply)  # the control schema, field by field
    return proc.returncode, reply


def coordinator_checked(member: MeshNode) -> bool:
    """The prober asked the coordinator's reflection service (once the register reply named it)."""
    nat = member.status()["node"]["nat"]
    return nat is not None and bool(nat["servers"])


def test_netcheck_and_status_behind_nat_routers(lab) -> None:
    net = build_nat_network(NatLab(lab), TYPES)
    for member in net.mesh.values():
        wait_for(f"{member.name}'s prober asks the coordinator", lambda m=member: coordinator_checked(m), 60,
                 lambda: diagnostics(net.mesh))
    results = {name: netcheck(member) for name, member in net.mesh.items()}

    code, easy = results["easy"]
    assert code == 0 and easy["udp"] is True, easy
    assert (easy["nat"]["mapping"], easy["nat"]["filtering"]) == ("endpoint-independent", "address-and-port-dependent")
    assert easy["nat"]["reflexive"] == [[net.sites["easy"].public, 51820]]  # masquerade kept the port
    assert easy["nat"]["servers"][0]["rtt_ms"] is not None and easy["nat"]["error"] is None
    coordinator = easy["coordinator"]
    assert coordinator["what"] == "coordinator" and coordinator["target"] == f"{net.coordinator.addresses[0]}:443"
    assert coordinator["latency_ms"] is not None and coordinator["latency_ms"] >= 0, coordinator
    assert [relay["target"] for relay in easy["relays"]] == [coordinator["target"]]
    assert all(relay["latency_ms"] is not None for relay in easy["relays"]), easy["relays"]
    # The other members' SSH ports are behind their routers, which take no new inbound TCP.
    assert [reach["what"] for reach in easy["ssh"]] == ["ssh to hard", "ssh to walled"]
    assert all(reach["latency_ms"] is None and reach["error"] for reach in easy["ssh"]), easy["ssh"]
    assert easy["port_mapping"] is None

    code, hard = results["hard"]
    assert code == 0 and hard["nat"]["mapping"] == "address-and-port-dependent", hard
    assert len(hard["nat"]["reflexive"]) > 1  # a new port per destination
    assert {host for host, _ in hard["nat"]["reflexive"]} == {net.sites["hard"].public}

    code, walled = results["walled"]
    assert code == 1 and walled["udp"] is False, walled
    assert (walled["nat"]["mapping"], walled["nat"]["filtering"]) == ("unknown", "unknown")
    assert "no STUN server answered" in walled["nat"]["error"]
    assert walled["nat"]["servers"][0]["error"] == "no answer to 4 tries"
    assert walled["coordinator"]["latency_ms"] is not None  # TCP goes out: the relay rung can work

    # The report for people, and the same facts in status.
    easy_member = net.mesh["easy"]
    text = easy_member.tm("netcheck", timeout=120).stdout
    assert "  * UDP: yes" in text and "  * Mapping: endpoint-independent (easy NAT" in text, text
    assert f"  * Reflexive address: {net.sites['easy'].public}:51820" in text, text
    assert "ssh to hard at" in text and "unreachable" in text, text
    walled_text = net.mesh["walled"].tm("netcheck", check=False, timeout=120)
    assert walled_text.returncode == 1 and "  * UDP: no" in walled_text.stdout, walled_text.stdout
    status = easy_member.tm("status").stdout
    assert (f"nat: endpoint-independent mapping, address-and-port-dependent filtering; seen as "
            f"{net.sites['easy'].public}:51820; port mapping none") in status, status
    assert easy_member.status()["node"]["nat"]["mapping"] == "endpoint-independent"


def test_netcheck_without_a_daemon_says_to_start_one(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "tunnelmesh", "--state-dir", str(tmp_path), "netcheck"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert "netcheck runs in the daemon" in proc.stderr and "start it with `tunnelmesh up`" in proc.stderr
