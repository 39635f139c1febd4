"""The network policy enforced by every node's packet filter (issue 14, "Tests"), in a
coordinator-mode network of three (a: the admin, embedding the coordinator; b, c) whose
policy allows ICMP echo from every member and tcp/22 from the group `admins` (b) only,
to every node:

- c cannot open tcp/22 or tcp/8080 on a (nor on b); b can open tcp/22 on a and c but
  not tcp/8080; a opens nothing (it is not an admin);
- replies to a node's own flows pass: b's connections get a's and c's answers although
  nothing may open a flow on b but an echo request, and every node's `ping` to every
  other gets its echo replies, while an echo reply nobody asked for is denied;
- the same over IPv6 (the members' ULA mesh addresses): tcp/8080 is dropped, tcp/22
  from b passes;
- a policy change (`tunnelmesh policy set` on a) is in force on every node's filter
  within 10 s; a connection the new policy still allows carries every byte across the
  change, one it no longer allows stops;
- a packet written into b's TUN with c's mesh address as its source never leaves b:
  in coordinator mode every node filters, so the sender's outbound check drops it
  (`not_from_this_node`, counted on b) before the receiver's anti-spoofing could; the
  receiver's check (`spoofed`, per peer) is tested in process
  (tests/unit/test_filter_in_process.py).

Listeners and clients are real sockets in the nodes' namespaces; the lab removes every
process and namespace whatever happens."""

from __future__ import annotations

import json
import re
import sys
import time
from typing import Any

import pytest

from tests.e2e.test_coordinator import wait_until
from tools.lab import Lab
from tools.mesh import MeshNode, build_network, diagnostics, wait_for_handshakes

pytestmark = pytest.mark.e2e

ADMINS = ("b",)
PORTS = (22, 8080)
CONNECT_TIMEOUT = 3.0
#: The issue's bound for a policy change to be in force everywhere.
POLICY_WITHIN = 10.0


def admins_policy(ports: list[int]) -> str:
    return f'''[groups]
admins = {json.dumps(list(ADMINS))}

[[allow]]
from = "*"
proto = ["icmp", "icmpv6"]

[[allow]]
from = "group:admins"
proto = "tcp"
ports = {json.dumps(ports)}
'''


# Listens on each address given (IPv4 and IPv6) on tcp/22 and tcp/8080; greets each
# connection with a line naming the node, then echoes what it receives. Killed with the lab.
LISTENER = r"""
import socket, sys, threading
name, hosts = sys.argv[1].encode(), sys.argv[2:]

def serve(conn):
    with conn:
        conn.sendall(b"hello from " + name + b"\n")
        while data := conn.recv(4096):
            conn.sendall(data)

def accept(srv):
    while True:
        conn, _ = srv.accept()
        threading.Thread(target=serve, args=(conn,), daemon=True).start()

for host in hosts:
    for port in (22, 8080):
        srv = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind((host, port))
        srv.listen(16)
        threading.Thread(target=accept, args=(srv,), daemon=True).start()
print("ready", flush=True)
threading.Event().wait()
"""

# Tries every (label, host, port) of the JSON list at once; prints {label: the greeting,
# or null when no connection within the timeout}.
CONNECT_ALL = r"""
import json, socket, sys, threading
targets, timeout, got = json.loads(sys.argv[1]), float(sys.argv[2]), {}

def attempt(label, host, port):
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            got[label] = s.makefile().readline().strip()
    except OSError:
        got[label] = None

threads = [threading.Thread(target=attempt, args=tuple(t)) for t in targets]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(json.dumps(got))
"""

# Holds one connection per port to the host and, until the stop file exists, sends a
# numbered line on each every 0.2 s and waits (3 s at most) for its echo: prints
# "ok PORT SEQ" or "lost PORT SEQ" (and stops using that connection).
LONG_LIVED = r"""
import os, socket, sys, time
host, stop, ports = sys.argv[1], sys.argv[2], [int(p) for p in sys.argv[3:]]
conns = {}
for port in ports:
    s = socket.create_connection((host, port), timeout=3)
    s.makefile().readline()
    conns[port] = s
print("connected", flush=True)

def echoed(s, line):
    s.sendall(line)
    got = b""
    while len(got) < len(line):
        chunk = s.recv(len(line) - len(got))
        if not chunk:
            return False
        got += chunk
    return got == line

seq = 0
while not os.path.exists(stop):
    seq += 1
    for port, s in list(conns.items()):
        try:
            ok = echoed(s, f"{port} {seq}\n".encode())
        except OSError:
            ok = False
        print(f"{'ok' if ok else 'lost'} {port} {seq}", flush=True)
        if not ok:
            del conns[port]
    time.sleep(0.2)
print("done", flush=True)
"""

# Packets into this node's TUN with another member's mesh address as their source:
# a UDP datagram per address family (argv: source and destination, IPv4 then IPv6), 3 each.
SPOOF = r"""
import socket, struct, sys
src4, dst4, src6, dst6 = sys.argv[1:5]
udp = struct.pack("!HHHH", 5353, 22, 12, 0) + b"spam"
ip4 = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 1, 0, 64, 17, 0,
                  socket.inet_aton(src4), socket.inet_aton(dst4))
ip6 = struct.pack("!IHBB16s16s", 6 << 28, len(udp), 17, 64,
                  socket.inet_pton(socket.AF_INET6, src6), socket.inet_pton(socket.AF_INET6, dst6))
s4 = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
s6 = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_RAW)
for _ in range(3):
    s4.sendto(ip4 + udp, (dst4, 0))
    s6.sendto(ip6 + udp, (dst6, 0))
"""

# ICMP echo replies nobody asked for, from this node to the destination (3 of them).
UNSOLICITED_REPLY = r"""
import socket, struct, sys

def checksum(data):
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    return ~(total + (total >> 16)) & 0xFFFF

s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
for seq in range(3):
    body = struct.pack("!HH", 0x4242, seq) + b"unsolicited!"  # an even length, for the checksum
    header = struct.pack("!BBH", 0, 0, 0)  # type 0: echo reply
    packet = struct.pack("!BBH", 0, 0, checksum(header + body)) + body
    s.sendto(packet, (sys.argv[1], 0))
"""


def ipv6_of(member: MeshNode) -> str:
    address = member.status()["node"]["mesh_ipv6"]
    assert address, f"{member.name} has no IPv6 mesh address\n{member.diagnostics()}"
    return str(address)


def connect_all(src: MeshNode, targets: dict[str, tuple[str, int]]) -> dict[str, str | None]:
    """The greeting of each target `src` could connect to, None for each it could not."""
    arg = json.dumps([[label, host, port] for label, (host, port) in targets.items()])
    out = src.node.run(sys.executable, "-c", CONNECT_ALL, arg, str(CONNECT_TIMEOUT), timeout=CONNECT_TIMEOUT + 20)
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def pings(src: MeshNode, address: str) -> bool:
    """The system's ping (an application's echo, filtered like any packet; not `tunnelmesh ping`)."""
    return src.node.run("ping", "-c", "3", "-i", "0.2", "-W", "3", address, check=False, timeout=20).returncode == 0


def filter_status(member: MeshNode) -> dict[str, Any]:
    return member.status()["filter"]  # type: ignore[no-any-return]


def drops(member: MeshNode, reason: str) -> int:
    return int(filter_status(member)["drops"].get(reason, 0))


def allows(member: MeshNode, peer: str, proto: str, port: int) -> bool:
    """`tunnelmesh filter test` on `member`: would a new flow from `peer` pass."""
    return member.tm("filter", "test", peer, proto, str(port), check=False).returncode == 0


def set_policy(admin: MeshNode, text: str, name: str) -> None:
    path = f"{admin.node.state_dir}/{name}"
    with open(path, "w") as f:
        f.write(text)
    admin.tm("policy", "set", path)


def test_the_network_policy_is_enforced_on_every_node(lab: Lab) -> None:
    mesh = build_network(lab, ["a", "b", "c"], policy=admins_policy([22]))
    a = mesh["a"]
    try:
        try:
            wait_for_handshakes(mesh, timeout=30.0)  # `tunnelmesh ping`: answered whatever the policy says
        except TimeoutError as exc:
            pytest.fail(f"{exc}\n{diagnostics(mesh)}", pytrace=False)
        v6 = {name: ipv6_of(member) for name, member in mesh.items()}
        first_version = filter_status(a)["policy_version"]
        assert [filter_status(m)["policy_version"] for m in mesh.values()] == [first_version] * 3, diagnostics(mesh)
        for name, member in mesh.items():
            member.node.popen(sys.executable, "-c", LISTENER, name, member.mesh_ip, v6[name], log_name="listener")
            member.node.wait_for_log("listener", "ready", timeout=10)

        check_who_opens_what(mesh, v6)
        check_replies_to_own_flows(mesh, v6)
        check_spoofed_source_never_leaves(mesh, v6)
        check_policy_change(mesh, first_version)
    finally:
        for member in mesh.values():
            member.down(check=False)


def check_who_opens_what(mesh: dict[str, MeshNode], v6: dict[str, str]) -> None:
    """Only b (an admin) opens tcp/22, on every other node, over IPv4 and IPv6; nothing
    opens tcp/8080 or any other port."""
    outcomes: dict[tuple[str, str, str, int], bool] = {}
    for src, member in mesh.items():
        targets = {f"{dst} ipv{family} {port}": (mesh[dst].mesh_ip if family == 4 else v6[dst], port)
                   for dst in mesh if dst != src for family in (4, 6) for port in PORTS}
        for label, greeting in connect_all(member, targets).items():
            dst, family, port = label.split()
            if greeting is not None:
                assert greeting == f"hello from {dst}", (label, greeting)
            outcomes[(src, dst, family, int(port))] = greeting is not None
    expected = {key: key[3] == 22 and key[0] in ADMINS for key in outcomes}
    assert outcomes == expected, diagnostics(mesh)

    a = mesh["a"]
    denied_on_a = sum(1 for (src, dst, _, _), ok in outcomes.items() if dst == "a" and not ok)
    assert drops(a, "denied") >= denied_on_a, diagnostics(mesh)  # a refused SYN is retried
    # "any other port": what the rules say beyond the two listened on.
    for proto, port in (("tcp", 22), ("tcp", 443), ("tcp", 8080), ("udp", 53), ("udp", 22)):
        assert not allows(a, "c", proto, port), (proto, port)
    assert allows(a, "b", "tcp", 22) and not allows(a, "b", "tcp", 8080)


def check_replies_to_own_flows(mesh: dict[str, MeshNode], v6: dict[str, str]) -> None:
    """b's connections above got their answers though nothing may open tcp on b; every
    node's echo requests get their replies; an echo reply nobody asked for is denied."""
    a, b = mesh["a"], mesh["b"]
    assert not allows(b, "a", "tcp", 22) and not allows(b, "c", "tcp", 40000)
    failed = [(src, dst, family) for src in mesh for dst in mesh if dst != src for family in (4, 6)
              if not pings(mesh[src], mesh[dst].mesh_ip if family == 4 else v6[dst])]
    assert failed == [], diagnostics(mesh)

    before = drops(b, "denied")
    a.node.run(sys.executable, "-c", UNSOLICITED_REPLY, b.mesh_ip)
    wait_until("b denied the unsolicited echo replies", lambda: drops(b, "denied") - before >= 3, 10, mesh)


def check_spoofed_source_never_leaves(mesh: dict[str, MeshNode], v6: dict[str, str]) -> None:
    a, b, c = mesh["a"], mesh["b"], mesh["c"]
    before = drops(b, "not_from_this_node")
    b.node.run(sys.executable, "-c", SPOOF, c.mesh_ip, a.mesh_ip, v6["c"], v6["a"])
    wait_until("b's filter dropped the 6 spoofed packets",
               lambda: drops(b, "not_from_this_node") - before >= 6, 10, mesh)
    assert drops(b, "not_from_this_node") - before == 6, diagnostics(mesh)
    assert filter_status(a)["spoofed_by_peer"] == {} and drops(a, "spoofed") == 0, diagnostics(mesh)


def check_policy_change(mesh: dict[str, MeshNode], first_version: int) -> None:
    """Open tcp/8080 to admins too, hold a connection on 22 and one on 8080, close 8080
    again: each change is in force on every node within 10 s; across the second the
    connection on 22 carries every line, the one on 8080 stops."""
    a, b, c = mesh["a"], mesh["b"], mesh["c"]

    def in_force_everywhere(version: int, port_8080_open: bool) -> None:
        started = time.monotonic()
        set_policy(a, admins_policy([22, 8080] if port_8080_open else [22]), f"policy-v{version}.toml")
        wait_until(f"policy v{version} in every node's filter",
                   lambda: all(filter_status(m)["policy_version"] == version for m in mesh.values()),
                   POLICY_WITHIN - (time.monotonic() - started), mesh)
        assert all(allows(m, "b", "tcp", 8080) == port_8080_open for m in (a, c)), diagnostics(mesh)

    in_force_everywhere(first_version + 1, port_8080_open=True)
    stop = f"{b.node.lab.workdir}/stop-long-lived"
    b.node.popen(sys.executable, "-c", LONG_LIVED, a.mesh_ip, stop, "22", "8080", log_name="long-lived")
    b.node.wait_for_log("long-lived", r"ok 8080 3\n", timeout=20)
    seq_at_change = last_seq(b.node.log("long-lived"))

    in_force_everywhere(first_version + 2, port_8080_open=False)
    seq_in_force = last_seq(b.node.log("long-lived"))
    b.node.wait_for_log("long-lived", r"lost 8080 \d+\n", timeout=20)
    b.node.wait_for_log("long-lived", rf"ok 22 {seq_in_force + 10}\n", timeout=30)
    with open(stop, "w"):
        pass
    log = b.node.wait_for_log("long-lived", r"done\n", timeout=10)

    lines = re.findall(r"^(ok|lost) (\d+) (\d+)$", log, re.MULTILINE)
    on_22 = [(result, int(seq)) for result, port, seq in lines if port == "22"]
    assert on_22 == [("ok", seq) for seq in range(1, len(on_22) + 1)], log  # every line, in order
    on_8080 = [(result, int(seq)) for result, port, seq in lines if port == "8080"]
    lost_at = on_8080[-1][1]
    assert on_8080 == [("ok", seq) for seq in range(1, lost_at)] + [("lost", lost_at)], log
    # Stopped by the change: alive when it was set, gone by the first line sent once it was in force.
    assert seq_at_change < lost_at <= seq_in_force + 2, (seq_at_change, seq_in_force, log)
    assert drops(a, "denied") > 0


def last_seq(log: str) -> int:
    found = re.findall(r"^(?:ok|lost) \d+ (\d+)$", log, re.MULTILINE)
    return int(found[-1]) if found else 0
