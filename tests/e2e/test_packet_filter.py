"""The packet filter in a real static mesh of three nodes (issue 14), through the CLI.

Each node's own `[[filter.allow]]` rules open tcp/22 to some members only:

    a accepts tcp/22 from b and c;   b accepts tcp/22 from a;   c accepts tcp/22 from a

so b and c cannot reach each other at all, nobody reaches any other port, and every
node has an outbound connection that gets its replies. Static mode is IPv4 only (no
IPv6 mesh addresses), so IPv6 through the same rules is tested in process
(tests/unit/test_filter_in_process.py), as is a peer speaking from another member's
address inside its own route; here a spoofed source never leaves its node.
"""

from __future__ import annotations

import sys

import pytest

from tests.e2e.test_coordinator import wait_until
from tools.mesh import MeshNode, build_static_mesh, diagnostics, wait_for_handshakes

pytestmark = pytest.mark.e2e

ACCEPTS = {"a": ("b", "c"), "b": ("a",), "c": ("a",)}
PORTS = (22, 8080)
CONNECT_TIMEOUT = 3.0

# Listens on the mesh address's tcp/22 and tcp/8080 and answers each connection with
# the node's name; prints "ready" once listening. Killed with the lab.
LISTENER = r"""
import selectors, socket, sys
host, name = sys.argv[1], sys.argv[2].encode()
sel = selectors.DefaultSelector()
for port in (22, 8080):
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((host, port))
    srv.listen(16)
    sel.register(srv, selectors.EVENT_READ)
print("ready", flush=True)
for _ in range(10_000):
    for key, _ in sel.select(timeout=120):
        conn, _ = key.fileobj.accept()
        conn.sendall(b"hello from " + name)
        conn.close()
"""

# Connects and prints what the listener says; exit 1 if it cannot within the timeout.
CONNECT = r"""
import socket, sys
try:
    with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3])) as s:
        print(s.recv(100).decode())
except OSError as exc:
    sys.exit(f"no connection: {exc}")
"""

# A UDP packet to b's tcp/22 port with c's mesh address as its source, written with a raw socket.
SPOOF = r"""
import socket, struct, sys
src, dst = socket.inet_aton(sys.argv[1]), socket.inet_aton(sys.argv[2])
udp = struct.pack("!HHHH", 5353, 22, 12, 0) + b"spam"
ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 1, 0, 64, 17, 0, src, dst)
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
for _ in range(3):
    s.sendto(ip + udp, (sys.argv[2], 0))
"""


def filter_config(accepts: tuple[str, ...]) -> str:
    return "".join(f'\n[[filter.allow]]\nfrom = "{name}"\nproto = "tcp"\nports = [22]\n' for name in accepts)


def connects(src: MeshNode, dst: MeshNode, port: int) -> bool:
    result = src.node.run(sys.executable, "-c", CONNECT, dst.mesh_ip, str(port), str(CONNECT_TIMEOUT), check=False,
                          timeout=CONNECT_TIMEOUT + 10)
    if result.returncode == 0:
        assert result.stdout.strip() == f"hello from {dst.name}", result.stdout
    return result.returncode == 0


def filter_drops(member: MeshNode) -> dict[str, int]:
    return member.status()["filter"]["drops"]  # type: ignore[no-any-return]


def test_node_rules_open_tcp_22_to_chosen_members_only_and_replies_pass(lab):
    mesh = build_static_mesh(lab, list(ACCEPTS), start=False)
    for name, member in mesh.items():
        member.append_config(filter_config(ACCEPTS[name]))
        member.up()
    try:
        wait_for_handshakes(mesh, timeout=20.0)  # by `tunnelmesh ping`: answered whatever the rules say
    except TimeoutError as exc:
        pytest.fail(f"{exc}\n{diagnostics(mesh)}", pytrace=False)
    for member in mesh.values():
        member.node.popen(sys.executable, "-c", LISTENER, member.mesh_ip, member.name, log_name="listener")
        member.node.wait_for_log("listener", "ready", timeout=10)

    outcomes = {(src, dst, port): connects(mesh[src], mesh[dst], port)
                for src in mesh for dst in mesh if src != dst for port in PORTS}
    expected = {(src, dst, port): port == 22 and src in ACCEPTS[dst] for src, dst, port in outcomes}
    assert outcomes == expected, diagnostics(mesh)

    for name, member in mesh.items():
        status = member.status()["filter"]
        assert status["enabled"] and status["in_force"].startswith(f"this node's [filter] rules ({len(ACCEPTS[name])})")
        denied = sum(1 for src, dst, port in outcomes if dst == name and not expected[(src, dst, port)])
        assert status["drops"].get("denied", 0) >= denied, diagnostics(mesh)  # a refused SYN is retried
        refused_by = {src for src, dst, port in outcomes if dst == name and not expected[(src, dst, port)]}
        assert set(status["denied_by_peer"]) == refused_by, status["denied_by_peer"]  # whose packets were denied
        assert sum(status["denied_by_peer"].values()) == status["drops"].get("denied", 0), status
        assert [rule["hits"] > 0 for rule in status["rules"]] == [True] * len(ACCEPTS[name]), status

    verdict = mesh["b"].tm("filter", "test", "a", "tcp", "22")
    assert verdict.stdout.strip() == f"tcp/22 from a: allowed: node rule 1 (line {_rule_line(mesh['b'])}): from a tcp 22"
    refused = mesh["b"].tm("filter", "test", "c", "tcp", "22", check=False)
    assert refused.returncode == 1 and "tcp/22 from c: denied" in refused.stdout
    shown = mesh["a"].tm("filter", "show").stdout
    assert f"b may open here:\n  from {mesh['b'].mesh_ip}: tcp 22\n" in shown, shown

    # A packet with another member's source address never leaves its node (a's outbound check).
    before = filter_drops(mesh["a"]).get("not_from_this_node", 0)
    mesh["a"].node.run(sys.executable, "-c", SPOOF, mesh["c"].mesh_ip, mesh["b"].mesh_ip)
    wait_until("a's filter dropped the 3 packets with c's source",
               lambda: filter_drops(mesh["a"]).get("not_from_this_node", 0) - before >= 3, 10, mesh)
    assert filter_drops(mesh["a"]).get("not_from_this_node", 0) - before == 3, diagnostics(mesh)
    assert "spoofed" not in filter_drops(mesh["b"])


def _rule_line(member: MeshNode) -> int:
    """The line of the first [[filter.allow]] in the node's config."""
    with open(member.config_path) as f:
        return next(i for i, line in enumerate(f, 1) if line.strip() == "[[filter.allow]]")
