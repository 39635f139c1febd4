"""Port mapping against a real miniupnpd (tools/miniupnpd.py) on a NAT-lab router, through
the real daemon: the mapping is made, renewed and deleted on `down`, by each of PCP,
NAT-PMP and UPnP IGD (and, the control, expires when its daemon is SIGKILLed: nothing
renews it); two nodes behind one router both get a UPnP mapping (the second on another
external port); and a pair behind two symmetric NATs, each router running miniupnpd,
ends on a direct UDP path through the mapped candidates.

What miniupnpd holds is read from its own side: its nftables table (a `dnat` rule per
mapping) and its log, not from our client.
"""

from __future__ import annotations

import re
import sys
import time
from typing import Any

import pytest

from tools.lab import Lab
from tools.mesh import MeshNode, build_network, diagnostics
from tools.miniupnpd import Miniupnpd, start_miniupnpd
from tools.natlab import NatLab, Site, start_coturn

from tests.e2e.test_crash_restart import sigkill
from tests.support.wait import wait_for

pytestmark = pytest.mark.e2e

LIFETIME = 20  # s asked for: renewed every 10 s, so a mapping alive after 2 lifetimes was renewed
WG_PORT = 51820


def mapped_to(router: Miniupnpd, address: str) -> bool:
    """Whether miniupnpd's table forwards UDP to address:51820 (a mapping exists)."""
    return re.search(rf"dnat ip to {re.escape(address)}:{WG_PORT}\b", router.ruleset()) is not None


def home_network(lab: Lab, sites: dict[str, str], nat_config: str,
                 nodes: dict[str, str] | None = None) -> tuple[dict[str, MeshNode], dict[str, Miniupnpd]]:
    """A coordinator (`hub`, public) and behind each site (name -> NAT type) a router
    running miniupnpd; `nodes` (node name -> site name; default: one node per site, named
    as it) join with `nat_config` in their [nat] table."""
    natlab = NatLab(lab)
    stun = natlab.add_public("stun", addresses=2)
    start_coturn(stun, stun.addresses[0], stun.addresses[1])
    homes: dict[str, Site] = {name: natlab.add_site(f"r-{name}", nat_type) for name, nat_type in sites.items()}
    daemons = {name: start_miniupnpd(site, stun.addresses[0]) for name, site in homes.items()}
    mesh = build_network(lab, ["hub"], switch=natlab.outside)
    hub = mesh["hub"]
    for name, site_name in (nodes or {name: name for name in sites}).items():
        node = natlab.add_inside_node(homes[site_name], name)
        member = mesh[name] = MeshNode(node, node.addresses[0], "")
        member.tm("join", hub.tm("invite").stdout.strip(), "--name", name, "--new-key")
        member.append_config(f"\n[nat]\n{nat_config}\n")
        member.up()
    return mesh, daemons


def announced(member: MeshNode) -> re.Match[str] | None:
    """The daemon's log line for the mapping it got: (address, port, protocol, lifetime)."""
    return re.search(r"port mapping UDP ([\d.]+):(\d+) -> [\d.]+:51820 by (\S+) \((\d+) s\)", member.log_tail(20000))


@pytest.mark.parametrize("protocol", ["pcp", "nat-pmp", "upnp"])
def test_mapping_is_made_renewed_and_deleted_on_down(lab: Lab, protocol: str) -> None:
    mesh, daemons = home_network(lab, {"alpha": "port-restricted"},
                                 f'port_mapping_protocols = ["{protocol}"]\nport_mapping_lifetime = {LIFETIME}')
    alpha, router = mesh["alpha"], daemons["alpha"]

    def details() -> str:
        return f"{diagnostics(mesh)}\n--- miniupnpd ---\n{router.log()[-3000:]}\n{router.ruleset()}"

    wait_for("mapped", lambda: mapped_to(router, alpha.underlay), 30, details)
    made = announced(alpha)
    assert made is not None, details()
    assert made[1] == router.site.public and made[3] == protocol, made[0]
    shown = alpha.status()["node"]["port_mapping"]  # what `status` and the candidate record carry
    assert shown == {"host": made[1], "port": int(made[2]), "kind": "mapped"}, shown
    if protocol == "upnp":  # the SSDP search went to the gateway alone, not to the LAN's multicast group
        searches = router.ssdp_searches()
        assert searches["unicast"] >= 1 and searches["multicast"] == 0, searches
        # The counter's control: a multicast search from the node is counted.
        alpha.node.run(sys.executable, "-c", "import socket; socket.socket(socket.AF_INET, socket.SOCK_DGRAM)"
                       ".sendto(b'M-SEARCH * HTTP/1.1', ('239.255.255.250', 1900))")
        wait_for("a multicast search counted", lambda: router.ssdp_searches()["multicast"] == 1, 5, details)

    time.sleep(2 * LIFETIME + 2)  # unrenewed, miniupnpd would have removed it by now
    assert mapped_to(router, alpha.underlay), f"mapping gone after {2 * LIFETIME} s: not renewed\n{details()}"

    alpha.down()
    wait_for("deleted by `down`", lambda: not mapped_to(router, alpha.underlay), 5, details)
    assert f"port mapping UDP {made[1]}:{made[2]} deleted" in alpha.log_tail(20000)

    # The control: a daemon that can neither renew nor delete (SIGKILL) loses its mapping
    # within a lifetime (after its last renewal), so the one alive above was renewed.
    alpha.up()
    wait_for("mapped again after `up`", lambda: mapped_to(router, alpha.underlay), 30, details)
    sigkill(alpha)
    killed = time.monotonic()
    wait_for("expired after SIGKILL", lambda: not mapped_to(router, alpha.underlay), LIFETIME + 10, details)
    assert time.monotonic() - killed > 1, "gone at once: deleted, not expired"


def test_two_nodes_behind_one_router_both_get_a_upnp_mapping(lab: Lab) -> None:
    # The first to ask gets the WireGuard port; miniupnpd refuses it to the second
    # (718 ConflictInMappingEntry: mapped to another host), which tries random ports.
    mesh, daemons = home_network(lab, {"home": "port-restricted"}, 'port_mapping_protocols = ["upnp"]',
                                 nodes={"alpha": "home", "beta": "home"})
    router = daemons["home"]

    def details() -> str:
        return f"{diagnostics(mesh)}\n--- miniupnpd ---\n{router.log()[-3000:]}\n{router.ruleset()}"

    for name in ("alpha", "beta"):
        wait_for(f"{name} mapped", lambda: announced(mesh[name]) is not None, 30, details)
    ports = {name: int(announced(mesh[name])[2]) for name in ("alpha", "beta")}  # type: ignore[index]
    assert sorted(ports.values())[0] != sorted(ports.values())[1] and WG_PORT in ports.values(), ports
    for name, port in ports.items():  # miniupnpd's own rule for each: its external port to the node's 51820
        rule = rf"dport {port} [^\n]*dnat ip to {re.escape(mesh[name].underlay)}:{WG_PORT}\b"
        assert re.search(rule, router.ruleset()), f"no rule {rule}\n{details()}"
        assert mesh[name].status()["node"]["port_mapping"]["port"] == port


def peer(member: MeshNode, name: str) -> dict[str, Any]:
    return next(p for p in member.status()["peers"] if p["name"] == name)


def direct(member: MeshNode, name: str) -> bool:
    """The session is up (handshake done) on a UDP path (the rung is "udp" before then too)."""
    state = peer(member, name)
    return state["state"] == "up" and state["path"] is not None and state["path"]["rung"] == "udp"


def test_pair_behind_two_symmetric_nats_with_port_mapping_ends_direct(lab: Lab) -> None:
    # Without port mapping this pair ends on the relay (the table; checked by hand
    # with port_mapping = false: relay for 45 s): each router maps every new flow to a
    # random port of its block, so neither reflexive port reaches the other node.
    mesh, daemons = home_network(lab, {"alpha": "symmetric", "beta": "symmetric"}, "port_mapping = true")
    for name, router in daemons.items():
        wait_for(f"{name} mapped", lambda: mapped_to(router, mesh[name].underlay), 30, lambda: diagnostics(mesh))
    alpha, beta = mesh["alpha"], mesh["beta"]
    mapped = {name: f"{router.site.public}:{WG_PORT}" for name, router in daemons.items()}

    def direct_both_ways() -> bool:
        alpha.tm("ping", "beta", "-c", "1", "--timeout", "1", check=False)  # traffic that wants a path
        return direct(alpha, "beta") and direct(beta, "alpha")

    wait_for("alpha<->beta direct", direct_both_ways, 90, lambda: diagnostics(mesh), interval=1.0)
    # Each learnt the other's mapped address from its signed candidates (a symmetric
    # NAT's reflexive ports are random ones of the whole range: 51820 is only the mapping's).
    assert mapped["beta"] in peer(alpha, "beta")["candidates"], diagnostics(mesh)
    assert mapped["alpha"] in peer(beta, "alpha")["candidates"], diagnostics(mesh)
    assert alpha.tm("ping", "beta", "-c", "3", "--timeout", "2").returncode == 0
