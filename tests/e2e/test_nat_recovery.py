"""Issue 18: a direct path lost under a live session comes back by itself, and a TCP
connection inside the tunnel lives through the loss. Real daemons behind lab NAT routers.

- A mapping that expires mid-session: a node behind a symmetric NAT (a random port per
  flow) and one behind a full-cone NAT are direct; both routers forget every mapping at
  once (conntrack flushed). The symmetric side's next packet leaves from a new port, which
  the other side must take up (b's path to a must end at another port).
- A node roams to another router: its underlay address changes (old link gone, a new one
  behind another port-restricted NAT with another public address).

In both, without any user command: the pair is back on direct UDP (both ends) at the new
mapping within RECOVERY, and one TCP connection opened across the mesh before the loss
delivers every byte, in order, without an error on either end.
"""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.support.wait import wait_for, wait_listening
from tools.lab import Lab
from tools.mesh import MeshNode, NatNetwork, build_nat_network, diagnostics
from tools.natlab import NatLab, flush_conntrack

pytestmark = pytest.mark.e2e

RECOVERY = 90.0  # s from the loss to direct UDP again (generous: a probe interval and a punch)
FIRST_DIRECT = 90.0  # s from up to direct UDP (a symmetric NAT needs the spray)
STREAM_PORT = 5001  # inside b's namespace
STREAM_END = 120.0  # s: TCP's backed-off retransmission after a loss, then every byte in
FRESH_BYTES = 200 * 1024  # more than the sender can have queued before a loss: sent after it

#: In b: accept one connection, read to EOF, check that byte i is i % 251 (printing the
#: count so far every half second), answer the count.
RECEIVER = """
import socket, sys, time
listener = socket.create_server(("0.0.0.0", int(sys.argv[1])))
conn, peer = listener.accept()
total, shown = 0, 0.0
while chunk := conn.recv(65536):
    for offset, byte in enumerate(chunk):
        if byte != (total + offset) % 251:
            print(f"corrupt at byte {total + offset}", flush=True)
            sys.exit(1)
    total += len(chunk)
    if time.monotonic() - shown > 0.5:
        print(f"got {total}", flush=True)
        shown = time.monotonic()
conn.sendall(f"{total}\\n".encode())
conn.close()
print(f"received {total} intact from {peer[0]}", flush=True)
"""

#: In a: one connection; 1 KiB of the pattern every 50 ms until the stop file exists (at
#: most argv[4] s), then half-close and read the receiver's count. Any socket error ends it
#: with a traceback and a non-zero exit: there is no reconnecting.
SENDER = """
import os, socket, sys, time
host, port, stop, limit = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
conn = socket.create_connection((host, port), timeout=10)
conn.settimeout(limit)
print("connected", flush=True)
sent, deadline = 0, time.monotonic() + limit
while not os.path.exists(stop) and time.monotonic() < deadline:
    conn.sendall(bytes((sent + i) % 251 for i in range(1024)))
    sent += 1024
    time.sleep(0.05)
conn.shutdown(socket.SHUT_WR)
answer = conn.makefile().readline().strip()
print(f"sent {sent}, receiver counted {answer}", flush=True)
sys.exit(0 if answer == str(sent) else 1)
"""


class Stream:
    """One TCP connection from a to b across the mesh, carrying data until stopped."""

    def __init__(self, a: MeshNode, b: MeshNode, workdir: Path, limit: float):
        self.stop_file = workdir / "stop-stream"
        self.b = b
        self.receiver = b.node.popen(sys.executable, "-c", RECEIVER, str(STREAM_PORT), log_name="receiver")
        wait_listening(b.node, STREAM_PORT)
        self.sender = a.node.popen(sys.executable, "-c", SENDER, b.mesh_ip, str(STREAM_PORT), str(self.stop_file),
                                   str(limit), log_name="sender")
        self.a = a
        wait_for("the in-tunnel TCP connection", lambda: "connected" in self.log() or self.sender.poll() is not None,
                 30, self.log)
        assert self.sender.poll() is None, self.log()

    def received(self) -> int:
        """The receiver's count so far (its last progress line)."""
        counts = re.findall(r"^got (\d+)$", self.b.node.log("receiver"), re.MULTILINE)
        return int(counts[-1]) if counts else 0

    def log(self) -> str:
        return f"sender: {self.a.node.log('sender')}\nreceiver: {self.b.node.log('receiver')}"

    def finish(self) -> str:
        """Stop sending; every byte must have arrived in order, no error on either end."""
        self.stop_file.touch()
        wait_for("the receiver's count", lambda: self.sender.poll() is not None and self.receiver.poll() is not None,
                 STREAM_END, self.log, interval=0.2)
        assert self.sender.returncode == 0 and self.receiver.returncode == 0, self.log()
        logs = self.a.node.log("sender"), self.b.node.log("receiver")
        return " / ".join(log.strip().splitlines()[-1] for log in logs)


def direct_both_ways(mesh: dict[str, MeshNode], a: str, b: str) -> dict[str, Any] | None:
    """Both ends' status of the other when both are up on UDP, else None (pings nudge them)."""
    ends = {}
    for x, y in ((a, b), (b, a)):
        ends[x] = next((p for p in mesh[x].status()["peers"] if p["name"] == y), None)
    if all(end and end["state"] == "up" and end["path"] and end["path"]["rung"] == "udp" for end in ends.values()):
        return ends
    mesh[a].node.run("ping", "-c", "1", "-W", "1", mesh[b].mesh_ip, check=False)
    return None


def recover(net: NatNetwork, loss: Callable[[], None], moved: bool) -> tuple[float, dict[str, Any], dict[str, Any]]:
    """Up on direct UDP, a stream running, then `loss`; the seconds until both ends are on
    UDP again with b sending to a new endpoint of a, and the ends before and after."""
    mesh = net.mesh
    before = wait_for("a<->b still direct", lambda: direct_both_ways(mesh, "a", "b"), 10, lambda: diagnostics(mesh))
    lost_at = time.monotonic()
    loss()

    def recovered() -> dict[str, Any] | None:
        ends = direct_both_ways(mesh, "a", "b")
        # b must send to where a is now: the old mapping (or address) is gone.
        return ends if ends and ends["b"]["path"]["endpoint"] != before["b"]["path"]["endpoint"] else None

    after = wait_for(f"a<->b direct again after the {'move' if moved else 'flush'}", recovered, RECOVERY,
                     lambda: diagnostics(mesh), interval=0.5)
    return time.monotonic() - lost_at, before, after


def run_scenario(lab: Lab, tmp_path: Path, types: dict[str, str], loss: Callable[[NatLab, NatNetwork], None],
                 moved: bool) -> None:
    nat = NatLab(lab)
    net = build_nat_network(nat, types)
    mesh = net.mesh
    try:
        wait_for("a<->b on direct UDP", lambda: direct_both_ways(mesh, "a", "b"), FIRST_DIRECT,
                 lambda: diagnostics(mesh), interval=0.5)
        stream = Stream(mesh["a"], mesh["b"], tmp_path, FIRST_DIRECT + RECOVERY + 60)
        received_before = stream.received()
        took, before, after = recover(net, lambda: loss(nat, net), moved)
        # The connection carries bytes written after the loss, then every byte arrived.
        wait_for("the stream going on after the loss", lambda: stream.received() > received_before + FRESH_BYTES,
                 STREAM_END, stream.log, interval=0.5)
        result = stream.finish()
        print(f"{types}: direct again {took:.1f} s after the {'move' if moved else 'flush'}; b->a "
              f"{before['b']['path']['endpoint']} -> {after['b']['path']['endpoint']}; a->b "
              f"{after['a']['path']['endpoint']}; transitions: "
              f"{ {x: [t['why'] for t in end['transitions']] for x, end in after.items()} }\n{result}")
        if moved:
            assert after["b"]["path"]["endpoint"].startswith(f"udp {net.sites['a2'].public}:"), after
    finally:
        for member in mesh.values():
            member.down(check=False)


def flush_both(nat: NatLab, net: NatNetwork) -> None:
    """b's router first: were a's flushed first, a packet from a's new port could still meet
    b's router holding mappings a punch left there, and pass before they go."""
    for name in ("b", "a"):
        flush_conntrack(net.sites[name].router)


def roam_a(nat: NatLab, net: NatNetwork) -> None:
    net.sites["a2"] = nat.add_site("a2-r", "port-restricted")
    nat.move(net.mesh["a"].node, net.sites["a2"])


def test_a_flushed_symmetric_and_full_cone_pair_recovers_direct_and_tcp_survives(lab: Lab, tmp_path: Path) -> None:
    run_scenario(lab, tmp_path, {"a": "symmetric", "b": "full-cone"}, flush_both, moved=False)


def test_a_node_roaming_to_another_router_recovers_direct_and_tcp_survives(lab: Lab, tmp_path: Path) -> None:
    run_scenario(lab, tmp_path, {"a": "port-restricted", "b": "port-restricted"}, roam_a, moved=True)
