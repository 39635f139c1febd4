"""The NAT prober's classification agrees with coturn's for every NAT type (issue 18).

One network, one member behind a router of each type of tools/natlab.py, a standalone
coordinator on two outside addresses (its STUN reflection service can then change
address and port), and coturn on another outside host with two addresses, named in
every member's `[nat] stun_servers`. Each daemon's prober asks both from its WireGuard
port; `turnutils_natdiscovery` asks coturn from the same machine. Their verdicts must be
the same, type by type.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

from tests.support.wait import wait_for
from tools.mesh import MeshNode, build_nat_network, diagnostics
from tools.natlab import BEHAVIOUR, NAT_TYPES, STUN_PORT, NatLab, natdiscovery, start_coturn

def member_name(nat_type: str) -> str:
    return "n-" + "".join(word[0] for word in nat_type.split("-"))  # n-n, n-fc, n-ar, n-pr, n-s, n-ub, n-two


def checked(member: MeshNode) -> dict[str, Any] | None:
    """The prober's report once it asked the coordinator's reflection service besides coturn
    (the register reply names it; without an answer from its primary, its alternate is
    asked as a server of its own too)."""
    nat = member.status()["node"]["nat"]
    return nat if nat is not None and nat["checked_at"] is not None and len(nat["servers"]) >= 2 else None


def test_the_probers_classification_agrees_with_coturn_for_every_nat_type(lab) -> None:
    nat = NatLab(lab)
    stun = nat.add_public("stun", addresses=2)
    start_coturn(stun, *stun.addresses)
    types = {member_name(t): t for t in NAT_TYPES}
    net = build_nat_network(nat, dict(types), start=False)
    for member in net.mesh.values():
        member.append_config(f'\n[nat]\nstun_servers = ["{stun.addresses[0]}:{STUN_PORT}"]\n')
    admin = next(iter(net.mesh.values()))
    admin.down()  # it runs already (joins need it): again with the config
    for member in net.mesh.values():
        member.up()

    with ThreadPoolExecutor(len(types)) as pool:
        coturn = {name: pool.submit(natdiscovery, member.node, stun.addresses[0]) for name, member in net.mesh.items()}
        reports = {name: wait_for(f"{name}'s prober asks both servers", lambda m=member: checked(m), 60,
                                  lambda: diagnostics(net.mesh)) for name, member in net.mesh.items()}
        verdicts = {name: future.result() for name, future in coturn.items()}

    found = {types[name]: (report["mapping"], report["filtering"]) for name, report in reports.items()}
    by_coturn = {types[name]: (verdict.mapping, verdict.filtering) for name, verdict in verdicts.items()}
    details = "\n".join(f"== {types[name]}: prober {reports[name]}\ncoturn: {verdicts[name].output[-1500:]}"
                        for name in net.mesh)
    assert found == by_coturn, details
    assert found == BEHAVIOUR, details  # what each type is, in case both were wrong alike
    # Where UDP goes out, both servers answered and the reflexive address is the router's.
    for name, report in reports.items():
        router = net.sites[name].public
        if types[name] in ("udp-blocked", "tcp-web-only"):
            assert report["reflexive"] == [] and "no STUN server answered" in report["error"], report
        elif types[name] == "none":
            assert report["reflexive"] == [[net.mesh[name].underlay, report["reflexive"][0][1]]], report
        else:
            assert {host for host, _ in report["reflexive"]} == {router}, report
