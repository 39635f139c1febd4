"""RSS per peer for tools.bench: one daemon alone in a fresh lab with N static peers
configured (N in PEER_COUNTS), its idle RSS at each N, and the least-squares slope in KiB
per peer.

The peers are made up: random WireGuard public keys, mesh IPs 100.100.1.1 onwards (the
node's own is 100.100.0.1 with a /16 mesh prefix), and no endpoints for tunnelmesh and
wireguard-go, so that no daemon sends anything: the figure is what holding a peer costs,
not what talking to it costs. tunnelmesh gets them as `[[peers]]` tables with
`wireguard_public_key` (docs/config.md), wireguard-go through `wg set`, nebula as
`static_host_map` entries (its only per-peer configuration: any holder of a certificate
of the CA is a peer; entries need an underlay address, made up in 203.0.113.0/24 and
never contacted as nothing is sent to those mesh IPs).
"""

from __future__ import annotations

import base64
import ipaddress
import secrets
import time
from pathlib import Path
from typing import Any

from tools.benchlab import (BenchError, fresh_lab, nebula_ca, nebula_config, need_nebula, rss_mib, start_nebula,
                            start_wireguard_go, wg_key_pair)
from tools.benchreport import PEER_COUNTS, per_peer_slope_kib
from tools.lab import Lab
from tools.mesh import MeshNode, peer_block

OWN_IP = "100.100.0.1"
PREFIXLEN = 16  # room for PEER_COUNTS' largest
SETTLE_S = 1.0  # after the daemon is ready: start-up work (imports, first timers) done before RSS is read


def made_up_peers(count: int) -> list[tuple[str, str]]:
    """`count` (WireGuard public key base64, mesh IP) pairs, IPs from 100.100.1.1 up."""
    first = int(ipaddress.IPv4Address("100.100.1.1"))
    return [(base64.b64encode(secrets.token_bytes(32)).decode(), str(ipaddress.IPv4Address(first + i)))
            for i in range(count)]


def tunnelmesh_rss(lab: Lab, count: int) -> float | None:
    node = lab.add_node("a")
    member = MeshNode(node, lab.connect(node, lab.add_switch("sw")), OWN_IP)
    member.tm("init", "--static", "--name", "a", "--mesh-ip", OWN_IP, "--new-key")
    config = Path(member.config_path)
    text = config.read_text()
    if "mesh_prefix = 24" not in text:
        raise BenchError("tunnelmesh init's config has no `mesh_prefix = 24` line to widen")
    config.write_text(text.replace("mesh_prefix = 24", f"mesh_prefix = {PREFIXLEN}", 1)
                      + "".join(peer_block(f"p{i}", wireguard_public_key=key, mesh_ip=ip)
                                for i, (key, ip) in enumerate(made_up_peers(count))))
    member.up()
    status = member.status()
    if len(status["peers"]) != count:
        raise BenchError(f"tunnelmesh lists {len(status['peers'])} peers, {count} configured")
    time.sleep(SETTLE_S)
    return rss_mib(int(status["node"]["pid"]))[0]


def wireguard_go_rss(lab: Lab, count: int, sockets: list[Path]) -> float | None:
    node = lab.add_node("a")
    lab.connect(node, lab.add_switch("sw"))
    ifname = f"wgf{secrets.token_hex(2)}"
    proc = start_wireguard_go(node, ifname, sockets)
    key_file, _ = wg_key_pair(node)
    peers = [arg for key, ip in made_up_peers(count) for arg in ("peer", key, "allowed-ips", f"{ip}/32")]
    node.run("wg", "set", ifname, "private-key", str(key_file), *peers, timeout=60)
    listed = node.run("wg", "show", ifname, "peers").stdout.split()
    if len(listed) != count:
        raise BenchError(f"wireguard-go lists {len(listed)} peers, {count} configured")
    node.run("ip", "addr", "add", f"{OWN_IP}/{PREFIXLEN}", "dev", ifname)
    node.run("ip", "link", "set", ifname, "up")
    time.sleep(SETTLE_S)
    return rss_mib(proc.pid)[0]


def nebula_rss(lab: Lab, count: int) -> float | None:
    need_nebula()
    node = lab.add_node("a")
    lab.connect(node, lab.add_switch("sw"))
    dev = f"nebf{secrets.token_hex(2)}"
    hosts = {ip: f"203.0.113.{1 + i % 250}:{4243 + i // 250}" for i, (_, ip) in enumerate(made_up_peers(count))}
    config = nebula_config(node, nebula_ca(lab, node), "a", f"{OWN_IP}/{PREFIXLEN}", dev, hosts)
    proc = start_nebula(node, config, dev, OWN_IP)
    time.sleep(SETTLE_S)
    if proc.poll() is not None:
        raise BenchError(f"nebula exited with {proc.returncode}: {node.log('nebula')[-300:]}")
    return rss_mib(proc.pid)[0]


def measure(system: str, rec: dict[str, Any]) -> None:
    """RSS at each of PEER_COUNTS for `system` (tunnelmesh, wireguard-go or nebula; each
    count in a fresh lab) into rec as rss_peers<N>_mib, and rss_per_peer_kib; raises on
    the first failure."""
    by_count: dict[int, float | None] = {}
    for count in PEER_COUNTS:
        sockets: list[Path] = []
        with fresh_lab(sockets) as lab:
            if system == "tunnelmesh":
                by_count[count] = tunnelmesh_rss(lab, count)
            elif system == "wireguard-go":
                by_count[count] = wireguard_go_rss(lab, count, sockets)
            elif system == "nebula":
                by_count[count] = nebula_rss(lab, count)
            else:
                raise ValueError(system)
        rec[f"rss_peers{count}_mib"] = by_count[count]
    rec["rss_per_peer_kib"] = per_peer_slope_kib(by_count)
