"""The README's first command: a real three-node mesh in network namespaces.

Each node is a network namespace with its own state directory, running a real
`tunnelmesh up` with a TUN device and a UDP socket. The first node makes the
network (`tunnelmesh init`: admin key, embedded coordinator); the others join
with a token from `tunnelmesh invite`. The demo prints each
node's status, pings every pair through the tunnel (kernel `ping` and the
in-tunnel `tunnelmesh ping`, which says which path answered), shows that the
starter policy `init` wrote denies TCP (default deny), opens one port with
`tunnelmesh policy set`, sends a TCP transfer through it and checks it arrived
intact, shows what Prometheus would scrape on the receiver (`[metrics]`), then tears
everything down.

Run as root: `python -m tools.demo` (the README's command sets up first).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time

from tunnelmesh.filter import STARTER_POLICY

from tools.lab import Lab
from tools.mesh import build_network, wait_for_handshakes

NAMES = ["alpha", "beta", "gamma"]
TRANSFER_MB = 20
PORT = 5001
POLICY_REACHES = 10.0  # seconds for a policy change to be in force on every node (issue 14: within 10 s)
METRICS = "127.0.0.1:9469"  # gamma's /metrics, on its namespace's own loopback
SCRAPE = "import sys, urllib.request; print(urllib.request.urlopen(sys.argv[1], timeout=10).read().decode())"
TRANSFER_RULE = f"""
# The demo's transfer: alpha may open tcp/{PORT} on gamma.
[[allow]]
from = ["alpha"]
to = ["gamma"]
proto = "tcp"
ports = [{PORT}]
"""

RECEIVER = """
import hashlib, socket, sys
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((sys.argv[1], int(sys.argv[2]))); srv.listen(1); srv.settimeout(60)
conn, _ = srv.accept(); conn.settimeout(60); h = hashlib.sha256(); n = 0
while True:
    chunk = conn.recv(1 << 16)
    if not chunk:
        break
    h.update(chunk); n += len(chunk)
print(n, h.hexdigest())
"""

SENDER = """
import socket, sys, time
data = open(sys.argv[3], "rb").read()
for attempt in range(50):
    try:
        s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5); break
    except OSError:
        time.sleep(0.2)
else:
    sys.exit("could not connect")
start = time.monotonic(); s.sendall(data); s.shutdown(socket.SHUT_WR); s.recv(1); s.close()
print(f"{len(data) / (time.monotonic() - start) * 8 / 1e6:.0f}")
"""


def banner(text: str) -> None:
    print(f"\n=== {text} ===", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description="Run a three-node TunnelMesh in network namespaces.")
    parser.add_argument("--keep", action="store_true", help="leave the mesh running until Enter is pressed")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("the demo creates network namespaces and TUN devices: run it as root", file=sys.stderr)
        return 2
    with Lab() as lab:
        banner("3 nodes (namespaces on a 192.0.2.0/24 switch): init + up on alpha, invite + join + up on the others")
        started = time.monotonic()
        mesh = build_network(lab, NAMES, policy=None)  # init's starter policy: ping only
        wait_for_handshakes(mesh)
        print(f"all sessions up {time.monotonic() - started:.1f} s after the first `init`")

        for member in mesh.values():
            banner(f"tunnelmesh status on {member.name} (underlay {member.underlay})")
            print(member.tm("status").stdout, end="")

        banner(f"gamma restarts with Prometheus metrics on: [metrics] listen = \"{METRICS}\"")
        gamma = mesh["gamma"]
        gamma.down()
        gamma.append_config(f'\n[metrics]\nlisten = "{METRICS}"\n')
        gamma.up()
        wait_for_handshakes(mesh)
        print("gamma is up again and every session with it has handshaken")

        banner("every pair pings through the tunnel")
        failures = 0
        for a in mesh.values():
            for b in mesh.values():
                if a is b:
                    continue
                kernel = a.node.run("ping", "-c", "3", "-i", "0.2", "-W", "2", b.mesh_ip, check=False)
                summary = [line for line in kernel.stdout.splitlines() if "packets transmitted" in line or "rtt" in line]
                inner = a.tm("ping", b.name, "-c", "1", check=False)
                ok = kernel.returncode == 0 and inner.returncode == 0
                failures += not ok
                print(f"{a.name:>5} -> {b.name:<5} {'ok  ' if ok else 'FAIL'} {' | '.join(summary)}")
                print(f"{'':14} {inner.stdout.strip() or inner.stderr.strip()}")

        alpha = mesh["alpha"]
        banner(f"default deny: may alpha open tcp/{PORT} on gamma? (`tunnelmesh filter test` on gamma)")
        before = gamma.tm("filter", "test", "alpha", "tcp", str(PORT), check=False)
        print(before.stdout.strip() or before.stderr.strip())
        failures += before.returncode == 0  # the starter policy must deny it

        banner("the admin opens it: `tunnelmesh policy set` on alpha (starter policy + one rule)")
        policy_file = os.path.join(lab.workdir, "policy.toml")
        with open(policy_file, "w") as f:
            f.write(STARTER_POLICY + TRANSFER_RULE)
        print(alpha.tm("policy", "set", policy_file).stdout.strip())
        deadline, after = time.monotonic() + POLICY_REACHES, before
        while time.monotonic() < deadline and after.returncode != 0:
            after = gamma.tm("filter", "test", "alpha", "tcp", str(PORT), check=False)
        print(after.stdout.strip() or after.stderr.strip())
        failures += after.returncode != 0

        banner(f"TCP transfer of {TRANSFER_MB} MB alpha -> gamma through the tunnel")
        blob = os.path.join(lab.workdir, "blob")
        data = os.urandom(TRANSFER_MB << 20)
        with open(blob, "wb") as f:
            f.write(data)
        receiver = gamma.node.popen(sys.executable, "-c", RECEIVER, gamma.mesh_ip, str(PORT), log_name="receiver")
        time.sleep(0.3)
        rate = alpha.node.run(sys.executable, "-c", SENDER, gamma.mesh_ip, str(PORT), blob, timeout=120).stdout.strip()
        receiver.wait(timeout=60)
        got_size, got_hash = gamma.node.log("receiver").split()
        intact = int(got_size) == len(data) and got_hash == hashlib.sha256(data).hexdigest()
        failures += not intact
        print(f"sent {len(data)} bytes at {rate} Mbit/s; received {got_size} bytes, sha256 {'matches' if intact else 'DIFFERS'}")

        banner("what Prometheus scrapes on gamma: its counters for alpha")
        scraped = gamma.node.run(sys.executable, "-c", SCRAPE, f"http://{METRICS}/metrics").stdout
        one_of = ('rung="', 'state="')  # a state-set gauge: show the member that is set
        shown = [line for line in scraped.splitlines() if line.startswith("tunnelmesh_peer_") and 'peer="alpha"' in line
                 and (not any(label in line for label in one_of) or line.endswith(" 1.0"))]
        print("\n".join(shown))
        received = next((float(line.split()[-1]) for line in shown if line.startswith("tunnelmesh_peer_rx_bytes_total")), 0.0)
        failures += received < len(data)  # the transfer came from alpha: gamma counted at least its bytes

        banner("status on alpha after the transfer")
        print(alpha.tm("status").stdout, end="")
        if args.keep:
            input("mesh is running; press Enter to tear it down ")
        banner("tunnelmesh down on every node")
        for member in mesh.values():
            member.down()
        left = [m.name for m in mesh.values() if "tm0" in m.node.run("ip", "link").stdout]
        failures += bool(left)
        print("interfaces removed" if not left else f"tm0 left behind on {left}")
    print("\nDEMO OK" if not failures else f"\nDEMO FAILED ({failures} checks)")
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
