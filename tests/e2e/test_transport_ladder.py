"""The transport ladder end to end: real daemons in namespaces, paths cut with nftables.

A network of three: `hub` (admin, embedded coordinator and relay) and the pair
under test, `a` and `b`. Rules inside a's namespace cut UDP and then TCP
between a and b only, so the pair climbs UDP -> SSH -> relay and, with the
rules gone, comes back to UDP. Bounds are generous (each switch within 30 s);
the real figures are `tools.bench`'s.
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tools.lab import Lab
from tools.mesh import MeshNode, block_path, build_network, diagnostics, rung_of, wait_for_handshakes

pytestmark = pytest.mark.e2e

SWITCH_BOUND = 30.0
STREAM_PORT = 5201


def wait_for_rung(mesh: dict[str, MeshNode], a: str, b: str, rung: str, timeout: float) -> float:
    """Seconds until a's session with b and b's with a both send on `rung`."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if rung_of(mesh[a], b) == rung and rung_of(mesh[b], a) == rung:
            return time.monotonic() - start
        time.sleep(0.5)
    pytest.fail(f"{a}<->{b} not on {rung} within {timeout:g} s\n{diagnostics(mesh)}")


def ping_gaps(log: str) -> list[int]:
    """Runs of unanswered echo requests in `ping -O` output (each entry: how many in a row)."""
    answered = {int(m) for m in re.findall(r"icmp_seq=(\d+) ttl=", log)}
    if not answered:
        return []
    gaps, run = [], 0
    for seq in range(min(answered), max(answered) + 1):
        if seq in answered:
            if run:
                gaps.append(run)
            run = 0
        else:
            run += 1
    return gaps


def peer_status(member: MeshNode, peer: str) -> dict[str, Any]:
    return next(p for p in member.status()["peers"] if p["name"] == peer)


def test_udp_then_ssh_then_relay_and_back_keeps_a_tcp_stream(lab: Lab) -> None:
    mesh = build_network(lab, ["hub", "a", "b"])
    a, b = mesh["a"], mesh["b"]
    work = Path(lab.workdir)
    stop_file, sent, received = work / "stream.stop", work / "stream.sent", work / "stream.received"
    try:
        wait_for_handshakes(mesh, timeout=40)
        assert rung_of(a, "b") == "udp" and rung_of(b, "a") == "udp", diagnostics(mesh)
        b.node.popen(sys.executable, "-m", "tools.stream", "serve", b.mesh_ip, str(STREAM_PORT), str(received),
                     log_name="stream-serve")
        time.sleep(1.0)
        sender = a.node.popen(sys.executable, "-m", "tools.stream", "send", b.mesh_ip, str(STREAM_PORT), str(sent),
                              "--rate", "128", "--stop-file", str(stop_file), "--max-seconds", "240",
                              log_name="stream-send")
        pinger = a.node.popen("ping", "-O", "-i", "0.2", "-W", "1", b.mesh_ip, log_name="ping")
        time.sleep(3.0)

        block_path(a, b, udp=True)
        to_ssh = wait_for_rung(mesh, "a", "b", "ssh", SWITCH_BOUND)
        why = peer_status(a, "b")["why_not_better"]
        assert why and why.startswith("UDP: "), why
        time.sleep(11.0)  # at most one change per 10 s: let the hold pass before the next cut

        block_path(a, b, udp=True, tcp=True)
        to_relay = wait_for_rung(mesh, "a", "b", "relay", SWITCH_BOUND)
        why = peer_status(a, "b")["why_not_better"]
        assert "UDP: " in why and "SSH: " in why, why
        time.sleep(11.0)

        block_path(a, b)
        back = wait_for_rung(mesh, "a", "b", "udp", SWITCH_BOUND + 20)  # a probe every 20 s, then the hold

        time.sleep(2.0)
        stop_file.touch()
        assert sender.wait(timeout=90) == 0
        deadline = time.monotonic() + 30
        while not received.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        pinger.terminate()
        pinger.wait(timeout=10)
        out, into = json.loads(sent.read_text()), json.loads(received.read_text())
        assert out["error"] is None and into["error"] is None, (out, into)
        assert out["bytes"] > 1 << 20 and (out["bytes"], out["sha256"]) == (into["bytes"], into["sha256"])
        gaps = ping_gaps(a.node.log("ping"))
        transitions = peer_status(a, "b")["transitions"]
        print(f"switches: to ssh {to_ssh:.1f} s, to relay {to_relay:.1f} s, back to udp {back:.1f} s; "
              f"ping gaps (200 ms pings lost in a row): {gaps}; stream {out['bytes']} bytes intact; "
              f"a's transitions: {[(t['previous'], t['rung'], t['why']) for t in transitions]}")
        assert all(gap * 0.2 < SWITCH_BOUND for gap in gaps), gaps
        assert [t["rung"] for t in transitions][-3:] == ["ssh", "relay", "udp"], transitions
    finally:
        stop_file.touch()
        for member in mesh.values():
            member.down(check=False)


def test_flapping_udp_changes_rungs_no_faster_than_the_hold(lab: Lab) -> None:
    mesh = build_network(lab, ["hub", "a", "b"])
    a, b = mesh["a"], mesh["b"]
    try:
        wait_for_handshakes(mesh, timeout=40)
        pinger = a.node.popen("ping", "-i", "0.2", "-W", "1", b.mesh_ip, log_name="ping")  # traffic flows throughout
        start = time.monotonic()
        blocked = False
        while time.monotonic() - start < 60:  # a drop rule toggled every 3 s for 60 s
            blocked = not blocked
            block_path(a, b, udp=blocked)
            time.sleep(3.0)
        block_path(a, b)
        # Then random loss (nft numgen) on a's underlay for 30 s.
        a.node.set_loss(30)
        time.sleep(30.0)
        a.node.set_loss(0)
        elapsed = time.monotonic() - start
        pinger.terminate()
        pinger.wait(timeout=10)
        for member, peer in ((a, "b"), (b, "a")):
            status = peer_status(member, peer)
            changes = status["rung_changes"]
            allowed = int(elapsed // 10) + 1
            assert changes <= allowed, (member.name, changes, allowed, status["transitions"])
            times = [t["at"] for t in status["transitions"]]
            assert all(later - earlier >= 9.5 for earlier, later in zip(times, times[1:])), status["transitions"]
            print(f"{member.name}: {changes} rung changes in {elapsed:.0f} s of flapping "
                  f"(probe interval now {status['probe_interval']:g} s): "
                  f"{[(t['previous'], t['rung'], t['why']) for t in status['transitions']]}")
    finally:
        for member in mesh.values():
            member.down(check=False)


def test_a_node_whose_only_way_out_is_the_coordinators_port_reaches_every_peer(lab: Lab) -> None:
    mesh = build_network(lab, ["hub", "a", "d"], start=False)  # the hub (embedded coordinator) is up
    hub, a, d = mesh["hub"], mesh["a"], mesh["d"]
    wire = d.node.interfaces[0]
    # On d's wire: out only TCP to the coordinator's port, in only that connection's replies.
    d.node.nft(f"""table inet tm_only_http {{
  chain out {{
    type filter hook output priority 0; policy accept;
    oifname "{wire}" ip daddr {hub.underlay} tcp dport 7400 accept
    oifname "{wire}" drop
  }}
  chain in {{
    type filter hook input priority 0; policy accept;
    iifname "{wire}" ip saddr {hub.underlay} tcp sport 7400 ct state established accept
    iifname "{wire}" drop
  }}
}}
""")
    try:
        a.up()
        d.up()
        wait_for_handshakes(mesh, timeout=60)
        for peer in ("hub", "a"):
            assert rung_of(d, peer) == "relay", diagnostics(mesh)
            assert d.node.run("ping", "-c", "3", "-i", "0.2", "-W", "2", mesh[peer].mesh_ip,
                              check=False).returncode == 0, diagnostics(mesh)
        assert rung_of(hub, "a") == "udp" and rung_of(a, "hub") == "udp"  # the others keep their direct path
        why = peer_status(d, "a")["why_not_better"]
        assert "UDP: " in why and "SSH: " in why, why
    finally:
        for member in mesh.values():
            member.down(check=False)
