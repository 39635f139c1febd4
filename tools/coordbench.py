"""Coordinator timings in the netns lab: how long `tunnelmesh join` takes, how long
until a joined node's sessions are up, and how long a revocation takes to reach
every node. Figures for the closing notes, printed; nothing is asserted.

Run as root: `python -m tools.coordbench [--nodes 4] [--rounds 3]`.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import time
from datetime import datetime

from tools.lab import Lab
from tools.mesh import MeshNode, build_network, wait_for_handshakes

LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) .*: (\S+): removed \(revoked")


def removal_time(log_path: str, peer: str) -> float | None:
    """Wall time of the daemon's 'PEER: removed (revoked ...)' log line."""
    with open(log_path, errors="replace") as f:
        for line in f:
            match = LOG_TIME.match(line)
            if match and match.group(2) == peer:
                return datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
    return None


def one_round(nodes: int) -> tuple[list[float], float, list[float]]:
    names = ["admin", *(f"n{i}" for i in range(1, nodes))]
    with Lab() as lab:
        started = time.monotonic()
        mesh = build_network(lab, names)
        wait_for_handshakes(mesh, timeout=60)
        all_up = time.monotonic() - started
        # One more join, timed, against a running network.
        late = lab.add_node("late")
        lab.connect(late, lab.switches["sw"])
        newcomer = MeshNode(late, late.addresses[0], "")
        token = mesh["admin"].tm("invite").stdout.strip()
        t0 = time.monotonic()
        out = newcomer.tm("join", token, "--name", "late", "--new-key").stdout
        joins = [time.monotonic() - t0, float(re.search(r"in ([0-9.]+) s", out).group(1))]
        victim = names[-1]
        t_revoke = time.time()
        mesh["admin"].tm("revoke", victim)
        deadline = time.monotonic() + 20
        delays: list[float] = []
        while time.monotonic() < deadline:
            seen = [removal_time(m.log_path, victim) for m in mesh.values() if m.name != victim]
            if all(t is not None for t in seen):
                delays = [t - t_revoke for t in seen if t is not None]
                break
            time.sleep(0.1)
        for member in mesh.values():
            member.down(check=False)
        return joins, all_up, delays


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("needs root (network namespaces)", file=sys.stderr)
        return 2
    wall, reported, ups, revocations = [], [], [], []
    for _ in range(args.rounds):
        joins, all_up, delays = one_round(args.nodes)
        wall.append(joins[0])
        reported.append(joins[1])
        ups.append(all_up)
        revocations += delays
    print(f"join (whole `tunnelmesh join` process, incl. Python start): median {statistics.median(wall):.2f} s "
          f"(min {min(wall):.2f}, max {max(wall):.2f}, n={len(wall)})")
    print(f"join (as the CLI reports it: token parsed to state written): median {statistics.median(reported):.3f} s")
    print(f"{args.nodes} nodes: init + invite + join + up on each until every session is up: "
          f"median {statistics.median(ups):.1f} s")
    if revocations:
        print(f"revocation: `tunnelmesh revoke` started to the peer removed on each other node: median "
              f"{statistics.median(revocations):.2f} s, max {max(revocations):.2f} s (n={len(revocations)})")
    else:
        print("revocation: not seen on every node within 20 s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
