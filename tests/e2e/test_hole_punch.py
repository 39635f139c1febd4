"""Coordinated hole punching end to end: real daemons in namespaces.

- A pair that must stay on the relay (UDP and TCP between them cut) probes for a better
  path every probe interval (and asks for a punch each time) without redoing its
  WireGuard handshake on the relay each time: the core no longer retries a probe's
  initiation on the path in use.
- Two nodes behind two port-restricted NATs (masquerade that drops unsolicited inbound),
  the coordinator outside, kept on the relay while UDP between the sites is cut: once the
  cut is lifted, the pair ends direct within a bound at the ladder's next probe.
  Unanswered UDP mappings last 2 s on the routers, so a probe of one side opens its NAT
  only briefly: the other side's probes must come at the same moment. Here they do (b
  followed a onto the relay, so their return probes are in phase) and cross; the punch
  notices that follow find UDP working and are ignored (docs/transports.md, "Hole
  punching"), so this test does not count punches: the next test needs its punch.
- A node behind a symmetric NAT (`masquerade random,fully-random`: a new random port of
  the whole range per destination) facing one behind a port-restricted NAT: the easy side
  knows from the peer's candidate record that its NAT is hard, and sweeps the range while
  the hard side keeps its mapping towards it open; the pair ends direct.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from tools.lab import Lab, Node, _replace_table
from tools.mesh import MeshNode, block_path, build_nat_network, build_network, diagnostics, rung_of, wait_for_handshakes
from tools.natlab import NatLab, set_conntrack_timeouts
from tunnelmesh.ladder import BETTER_PROBE, HOLD
from tunnelmesh.wireguard.constants import REKEY_AFTER_TIME

pytestmark = pytest.mark.e2e

WINDOW = 3 * BETTER_PROBE + 5  # three probe intervals and some
UNANSWERED_MAPPING = 2  # s: how long the routers keep a UDP mapping nothing answered


def peer_status(member: MeshNode, peer: str) -> dict[str, Any]:
    return next(p for p in member.status()["peers"] if p["name"] == peer)


def wait_for_rung(mesh: dict[str, MeshNode], a: str, b: str, rung: str, timeout: float) -> float:
    """Seconds until a's session with b and b's with a are both up and send on `rung`
    (pings nudge them; a new session sends to a UDP candidate before anything answers)."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        ends = (peer_status(mesh[a], b), peer_status(mesh[b], a))
        if all(end["state"] == "up" and end["path"] is not None and end["path"]["rung"] == rung for end in ends):
            return time.monotonic() - start
        mesh[a].node.run("ping", "-c", "1", "-W", "1", mesh[b].mesh_ip, check=False)
    pytest.fail(f"{a}<->{b} not on {rung} within {timeout:g} s\n{diagnostics(mesh)}")


def punches(member: MeshNode, peer: str) -> int:
    """How many punches `member`'s session with `peer` has made (one log line each)."""
    with open(member.log_path, errors="replace") as f:
        return f.read().count(f"{peer}: punching towards ")


def test_a_pair_on_the_relay_probes_without_a_handshake_every_probe_interval(lab: Lab) -> None:
    mesh = build_network(lab, ["hub", "a", "b"], start=False)
    a, b = mesh["a"], mesh["b"]
    block_path(a, b, udp=True, tcp=True)  # before they start: the pair can only meet on the relay
    try:
        a.up()
        b.up()
        wait_for_handshakes(mesh, timeout=60)
        wait_for_rung(mesh, "a", "b", "relay", 30)
        window = time.time()
        before = {x.name: (peer_status(x, y.name)["handshakes"], punches(x, y.name)) for x, y in ((a, b), (b, a))}
        time.sleep(WINDOW)  # the scenario: the pair idles on the relay for three probe intervals
        after = {x.name: (peer_status(x, y.name)["handshakes"], punches(x, y.name)) for x, y in ((a, b), (b, a))}
        last = {x.name: round(peer_status(x, y.name)["last_handshake"] - window, 1) for x, y in ((a, b), (b, a))}
        print(f"over {WINDOW:g} s on the relay, (handshakes, punches) per side: before {before}, after {after}; "
              f"last handshake {last} s into the window")
        for name in ("a", "b"):
            # The probes went on: every probe interval a punch was asked for, and both ends punched.
            assert after[name][1] - before[name][1] >= 2, (before, after, diagnostics(mesh))
            # Only WireGuard's own rekey (every REKEY_AFTER_TIME) may add a handshake here.
            assert after[name][0] - before[name][0] <= WINDOW // REKEY_AFTER_TIME + 1, (before, after)
        assert rung_of(a, "b") == "relay" and rung_of(b, "a") == "relay", diagnostics(mesh)
        why = peer_status(a, "b")["why_not_better"]
        assert "UDP: " in why and "no answer" in why, why  # "punched N times, no answer"
    finally:
        for member in mesh.values():
            member.down(check=False)


def cut_udp(node: Node, other: str) -> None:
    """Inside `node`'s namespace, drop UDP to and from `other` (a router's outside address)."""
    node.nft(_replace_table("inet", "tm_cut", [
        "  chain out {", "    type filter hook output priority 0; policy accept;",
        f"    ip daddr {other} meta l4proto udp drop", "  }",
        "  chain in {", "    type filter hook input priority 0; policy accept;",
        f"    ip saddr {other} meta l4proto udp drop", "  }",
    ]))


def test_two_port_restricted_nats_end_direct_at_the_next_probe_once_the_cut_is_lifted(lab: Lab) -> None:
    net = build_nat_network(NatLab(lab), {"a": "port-restricted", "b": "port-restricted"})
    mesh, a, b = net.mesh, net.mesh["a"], net.mesh["b"]
    for site in net.sites.values():  # an unanswered mapping opens the NAT only briefly
        set_conntrack_timeouts(site.router, udp=UNANSWERED_MAPPING)
    public_b = net.sites["b"].public
    try:
        cut_udp(a.node, public_b)
        wait_for_rung(mesh, "a", "b", "relay", 60)
        cut_since = time.monotonic()
        time.sleep(max(0.0, HOLD + 1 - (time.monotonic() - cut_since)))
        a.node.nft(_replace_table("inet", "tm_cut", []))
        took = wait_for_rung(mesh, "a", "b", "udp", BETTER_PROBE + HOLD + 15)
        status = peer_status(a, "b")
        print(f"direct {took:.1f} s after the cut was lifted; a's path {status['path']}; "
              f"punches a {punches(a, 'b')}, b {punches(b, 'a')}")
        assert status["path"]["endpoint"].startswith(f"udp {public_b}:"), status
        assert status["transitions"][-1]["why"] == "step down after a probe", status
        assert a.node.run("ping", "-c", "3", "-i", "0.2", "-W", "2", b.mesh_ip, check=False).returncode == 0
    finally:
        for member in mesh.values():
            member.down(check=False)


def test_a_symmetric_nat_facing_a_port_restricted_one_ends_direct_through_the_spray(lab: Lab) -> None:
    net = build_nat_network(NatLab(lab), {"a": "symmetric", "b": "port-restricted"})
    mesh, a, b = net.mesh, net.mesh["a"], net.mesh["b"]
    try:
        took = wait_for_rung(mesh, "a", "b", "udp", 3 * BETTER_PROBE + HOLD)
        status = peer_status(b, "a")
        print(f"symmetric x port-restricted: direct after {took:.1f} s; b's path to a {status['path']}; "
              f"punches a {punches(a, 'b')}, b {punches(b, 'a')}")
        # b reaches a at a's public address, at the port a's NAT gave its flow to b (the sweep found it).
        host, port = status["path"]["endpoint"].removeprefix("udp ").rsplit(":", 1)
        assert host == net.sites["a"].public and 1024 <= int(port) <= 65535, status
        with open(b.log_path, errors="replace") as f:
            assert "guessed port(s): the port block, then the range" in f.read(), diagnostics(mesh)  # b swept
        assert a.node.run("ping", "-c", "3", "-i", "0.2", "-W", "2", b.mesh_ip, check=False).returncode == 0
    finally:
        for member in mesh.values():
            member.down(check=False)
