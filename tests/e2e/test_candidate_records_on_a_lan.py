"""Candidate records end to end (docs/nat.md, "Candidates"): real daemons in namespaces.

Two nodes on one LAN behind one NAT, the coordinator outside: the coordinator sees both
at the NAT's address, which does not lead back inside. Each node's cached peer map holds
the other's candidate record, which verifies against its identity and names its LAN
address as a "local" candidate; the session comes up on that address, and the peer's
candidates come best first: the shared LAN, then the NAT's address. When a node's
addresses change, its next register carries a newer record, which reaches its peer.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e.test_candidates_and_node_relays import keep_to, network, peer_status, wait_until_up
from tests.support.wait import wait_for
from tools.lab import Lab
from tools.mesh import MeshNode, diagnostics
from tunnelmesh.membership import Endpoints, MemberEntry
from tunnelmesh.nat.candidates import CandidateRecord, verify_candidate_record
from tunnelmesh.nat.report import LOCAL
from tunnelmesh.netstate import NetworkState, load_peer_map

pytestmark = pytest.mark.e2e

NEW_ADDRESS = "203.0.113.200"  # added to b's LAN interface mid-test (inside the LAN's /24)


def kept(member: MeshNode, peer: MeshNode) -> tuple[MemberEntry, Endpoints] | None:
    """`peer`'s entry and endpoints as `member` keeps them (its cached peer map, re-verified)."""
    state_dir = Path(member.node.state_dir)
    peer_map, _ = load_peer_map(state_dir / "peermap.json", NetworkState.load(state_dir / "network.json"))
    entry = next((m for m in peer_map.members.values() if m.name == peer.name), None)
    endpoints = peer_map.endpoints.get(entry.wg_key) if entry is not None else None
    return None if entry is None or endpoints is None else (entry, endpoints)


def record_of(member: MeshNode, peer: MeshNode) -> CandidateRecord | None:
    """`peer`'s candidate record as `member` keeps it, verified against `peer`'s identity."""
    found = kept(member, peer)
    if found is None or found[1].candidate_record is None:
        return None
    return verify_candidate_record(found[1].candidate_record, found[0].identity)


def test_two_nodes_behind_one_nat_use_their_signed_lan_candidates_and_changes_reach_the_peer(lab: Lab) -> None:
    outside = lab.add_switch("out", "198.51.100.0/24")
    lan = lab.add_switch("lan", "203.0.113.0/24")
    nat = lab.add_router("nat", outside, lan)
    mesh = network(lab, {"hub": [outside], "a": [lan], "b": [lan]},
                   configs={"a": keep_to("b", 'rungs = ["udp"]'), "b": keep_to("a", 'rungs = ["udp"]')})
    a, b = mesh["a"], mesh["b"]
    b_lan = f"{b.node.addresses[0]}:51820"
    try:
        status = wait_until_up(a, "b", b, timeout=40)
        assert status["path"]["endpoint"] == f"udp {b_lan}", (status, diagnostics(mesh))
        assert wait_until_up(b, "a", a, timeout=20)["path"]["endpoint"] == f"udp {a.node.addresses[0]}:51820"
        # b's record, as a keeps it: signed by b, its LAN address a "local" candidate.
        record = record_of(a, b)
        assert record is not None and (b.node.addresses[0], 51820, LOCAL) in [
            (c.host, c.port, c.kind) for c in record.candidates], record
        # Best first: the shared LAN, then where the coordinator saw b (the NAT's address).
        candidates = peer_status(a, "b")["candidates"]  # type: ignore[index]
        assert candidates[0] == b_lan and any(c.startswith(f"{nat.addresses[0]}:") for c in candidates[1:]), \
            candidates
        # b gains an address: its next register (every 15 s) carries a newer record to a.
        b.node.run("ip", "addr", "add", f"{NEW_ADDRESS}/24", "dev", b.node.interfaces[0])
        newer = wait_for("b's new address in its record at a", lambda: (
            (r := record_of(a, b)) is not None and any(c.host == NEW_ADDRESS for c in r.candidates) and r), 45,
            lambda: diagnostics(mesh), interval=0.5)
        assert newer.version > record.version
        wait_for("b's new address among a's candidates for b",
                 lambda: f"{NEW_ADDRESS}:51820" in peer_status(a, "b")["candidates"], 20,  # type: ignore[index]
                 lambda: diagnostics(mesh), interval=0.5)
    finally:
        for member in mesh.values():
            member.down(check=False)

