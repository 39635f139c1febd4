"""A node with the kernel offloads turned off (`[node] offload = false`) and two with them
on, in one static mesh in the netns lab: each side says what it uses, and traffic both
ways is intact. From a node with offloads TCP leaves the TUN as super-packets
segmented before sealing, in batched UDP sends; the plain node takes them a datagram at
a time and sends a packet per call, which the other side joins back before its TUN.
Between the two with offloads the segments leave their checksums partial (each daemon
said in the tunnel that it completes them); to the plain one they carry whole ones."""

from __future__ import annotations

import pytest

from tests.e2e.test_static_mesh import HANDSHAKE_TIMEOUT, ping, transfer
from tests.support.wait import wait_for
from tools.mesh import MeshNode, build_static_mesh, diagnostics, wait_for_handshakes

pytestmark = pytest.mark.e2e

MEGABYTES = 20
NOT_OFFLOAD_FAULTS = frozenset({"udp send buffer full", "no peer for destination"})


def turn_offloads_off(member: MeshNode) -> None:
    """`offload = false` in the [node] table of the node's config (appending would put it
    in the last [[peers]] table)."""
    with open(member.config_path) as f:
        lines = f.read().splitlines(keepends=True)
    node_table = [i for i, line in enumerate(lines) if line.strip() == "[node]"]
    assert len(node_table) == 1, f"not one [node] table in {member.config_path}:\n{''.join(lines)}"
    lines.insert(node_table[0] + 1, "offload = false\n")
    with open(member.config_path, "w") as f:
        f.write("".join(lines))


def test_a_node_without_offloads_and_one_with_them_carry_traffic_both_ways(lab):
    mesh = build_static_mesh(lab, ["a", "b", "c"], start=False)
    a, b, c = mesh["a"], mesh["b"], mesh["c"]
    turn_offloads_off(b)
    for member in (a, b, c):
        member.up()
    try:
        wait_for_handshakes(mesh, timeout=HANDSHAKE_TIMEOUT)
    except TimeoutError as exc:
        pytest.fail(f"{exc}\n{diagnostics(mesh)}", pytrace=False)

    with_offloads, without = a.status()["node"]["offloads"], b.status()["node"]["offloads"]
    assert "tun csum tso" in with_offloads and "udp gso" in with_offloads, f"a uses: {with_offloads}"
    assert without == "none", f"b (offload = false) uses: {without}"
    print(f"a uses {with_offloads}; b uses {without}")
    for member, offloads in ((a, with_offloads), (b, without)):
        human = member.tm("status").stdout
        assert f"offloads: {offloads}\n" in human, f"no 'offloads:' line in {member.name}'s status:\n{human}"

    def inner_checksums(member: MeshNode) -> dict[str, str]:
        return {peer["name"]: peer["inner_checksums"] for peer in member.status()["peers"]}

    expected = {"a": {"b": "whole", "c": "partial"}, "b": {"a": "whole", "c": "whole"},
                "c": {"a": "partial", "b": "whole"}}
    wait_for("a and c to learn that the other completes checksums",
             lambda: all(inner_checksums(mesh[name]) == says for name, says in expected.items()), 20,
             lambda: f"{ {name: inner_checksums(mesh[name]) for name in expected} }\n{diagnostics(mesh)}")

    before = {member.name: member.status() for member in (a, b, c)}  # drops so far: the handshakes' own
    for src, dst in ((a, b), (b, a), (a, c), (c, a)):
        elapsed = transfer(lab, mesh, src, dst, MEGABYTES)
        print(f"{MEGABYTES} MB {src.name} -> {dst.name} in {elapsed:.1f} s")
        result = ping(src, dst.mesh_ip, count=3, wait=2)
        assert result.returncode == 0, f"ping {src.name} -> {dst.name} failed:\n{result.stdout}{result.stderr}\n" + (
            diagnostics(mesh))
    # Nothing since was dropped, and the batched sends were never refused (that would
    # have turned GSO off). Not faults of segmenting or joining: a full send buffer (the
    # kernel's word) and packets to no peer (the kernel's own IPv6 router solicitations
    # to ff02::2 from the new interface, seconds apart).
    for member, offloads in ((a, with_offloads), (b, without), (c, c.status()["node"]["offloads"])):
        status = member.status()
        new = {kind: count - before[member.name]["drops"].get(kind, 0) for kind, count in status["drops"].items()
               if kind not in NOT_OFFLOAD_FAULTS and count != before[member.name]["drops"].get(kind, 0)}
        assert not new, f"{member.name} dropped during the traffic: {new}\n{diagnostics(mesh)}"
        assert status["node"]["offloads"] == offloads, f"{member.name}'s offloads changed under traffic: {status['node']}"
