"""A real three-node static mesh in the netns lab, driven through the CLI.

Each test builds its own mesh (`tools.mesh.build_static_mesh`: `init --static`, ids
exchanged as `[[peers]]`, `up --detach`) on one switch, so a failure in one test
never leaks into the next. Every wait is bounded and says what did not happen, with
every node's `status --json` and daemon log tail.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.wait import wait_for
from tools.bench import IPERF_PORT, iperf3
from tools.mesh import MeshNode, build_static_mesh, diagnostics, wait_for_handshakes

pytestmark = pytest.mark.e2e

NAMES = ["a", "b", "c"]
PORT = 5001
HANDSHAKE_TIMEOUT = 20.0

# Accepts one TCP connection on host:port and writes what arrives to a file; bounded
# by a 60 s stall timeout and a count of reads. Prints "ready" once listening.
RECEIVER = r"""
import socket, sys
host, port, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((host, port))
srv.listen(1)
srv.settimeout(60)
print("ready", flush=True)
conn, _ = srv.accept()
conn.settimeout(60)
n = 0
with open(out, "wb") as f:
    for _ in range(10_000_000):
        chunk = conn.recv(1 << 16)
        if not chunk:
            break
        f.write(chunk)
        n += len(chunk)
print("received", n, flush=True)
conn.close()
"""

# Connects (retrying for up to 20 s), sends a file, half-closes and waits for the
# receiver to close, so the data has arrived when it exits 0.
SENDER = r"""
import socket, sys, time
host, port, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
deadline = time.monotonic() + 20
for _ in range(200):
    try:
        s = socket.create_connection((host, port), timeout=5)
        break
    except OSError as exc:
        if time.monotonic() > deadline:
            sys.exit(f"could not connect to {host}:{port}: {exc}")
        time.sleep(0.1)
else:
    sys.exit(f"could not connect to {host}:{port}")
s.settimeout(60)
start = time.monotonic()
with open(path, "rb") as f:
    s.sendfile(f)
s.shutdown(socket.SHUT_WR)
s.recv(1)
elapsed = time.monotonic() - start
print(f"sent in {elapsed:.2f} s")
"""


# --------------------------------------------------------------------------- helpers


def ping(member: MeshNode, address: str, count: int = 2, wait: int = 2) -> subprocess.CompletedProcess:
    return member.node.run("ping", "-n", "-c", str(count), "-W", str(wait), address, check=False,
                           timeout=count * (wait + 1) + 10)


def up_mesh(lab, names=NAMES) -> dict[str, MeshNode]:
    mesh = build_static_mesh(lab, names)
    try:
        wait_for_handshakes(mesh, timeout=HANDSHAKE_TIMEOUT)
    except TimeoutError as exc:
        pytest.fail(f"{exc}\n{diagnostics(mesh)}", pytrace=False)
    return mesh


def random_file(lab, name: str, megabytes: int) -> Path:
    path = Path(lab.workdir) / name
    with open(path, "wb") as f:
        for _ in range(megabytes):
            f.write(os.urandom(1 << 20))
    return path


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def transfer(lab, mesh, src: MeshNode, dst: MeshNode, megabytes: int, timeout: float = 150) -> float:
    """Send a random file src -> dst over TCP through the tunnel; assert it arrived
    byte-identical; return the seconds it took."""
    blob = random_file(lab, f"blob-{src.name}-{dst.name}", megabytes)
    out = Path(lab.workdir) / f"received-{dst.name}"
    log_name = f"receiver-{src.name}"
    receiver = dst.node.popen(sys.executable, "-c", RECEIVER, dst.mesh_ip, str(PORT), str(out), log_name=log_name)
    dst.node.wait_for_log(log_name, "ready", timeout=10)
    started = time.monotonic()
    try:
        sent = src.node.run(sys.executable, "-c", SENDER, dst.mesh_ip, str(PORT), str(blob), check=False, timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{megabytes} MB {src.name} -> {dst.name} not sent within {timeout:g} s\n"
                    f"receiver: {dst.node.log(log_name)}\n{diagnostics(mesh)}", pytrace=False)
    elapsed = time.monotonic() - started
    assert sent.returncode == 0, (
        f"sender {src.name} -> {dst.name} failed: {sent.stdout}{sent.stderr}\n"
        f"receiver: {dst.node.log(log_name)}\n{diagnostics(mesh)}"
    )
    try:
        receiver.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail(f"receiver on {dst.name} did not finish: {dst.node.log(log_name)}", pytrace=False)
    size = blob.stat().st_size
    got = out.stat().st_size if out.exists() else None
    assert got == size, f"{dst.name} received {got} bytes of {size}; receiver: {dst.node.log(log_name)}"
    assert sha256(out) == sha256(blob), f"{megabytes} MB {src.name} -> {dst.name} arrived with a different sha256"
    blob.unlink()
    out.unlink()
    return elapsed


def ping_counts(output: str) -> tuple[int, int]:
    m = re.search(r"(\d+) packets transmitted, (\d+) received", output)
    assert m, f"no ping summary in:\n{output[-2000:]}"
    return int(m.group(1)), int(m.group(2))


def tcp_retransmits(member: MeshNode) -> int:
    """TcpRetransSegs of the node's namespace (/proc/net/snmp is per namespace)."""
    text = member.node.run("cat", "/proc/net/snmp").stdout
    header, values = [line.split() for line in text.splitlines() if line.startswith("Tcp:")][:2]
    return int(values[header.index("RetransSegs")])


def status_peers(member: MeshNode) -> dict[str, dict]:
    return {p["name"]: p for p in member.status()["peers"]}


# --------------------------------------------------------------------------- tests


def test_every_pair_pings_both_ways_and_status_shows_recent_handshakes(lab):
    mesh = up_mesh(lab)
    failed = []
    for a in mesh.values():
        for b in mesh.values():
            if a is not b:
                result = ping(a, b.mesh_ip, count=2, wait=2)
                if result.returncode != 0:
                    failed.append(f"{a.name} -> {b.name} ({b.mesh_ip}):\n{result.stdout}{result.stderr}")
    assert not failed, "mesh pings failed:\n" + "\n".join(failed) + "\n" + diagnostics(mesh)

    for member in mesh.values():
        peers = status_peers(member)
        others = {m.name: m for m in mesh.values() if m is not member}
        assert set(peers) == set(others), f"{member.name} lists peers {sorted(peers)}, expected {sorted(others)}"
        for name, peer in peers.items():
            context = f"{member.name}'s peer {name}: {peer}\n{member.diagnostics()}"
            assert peer["state"] == "up", context
            assert peer["mesh_ip"] == others[name].mesh_ip, context
            assert peer["path"] == {"rung": "udp", "endpoint": f"udp {others[name].underlay}:51820"}, context
            ago = peer["last_handshake_ago"]
            assert ago is not None and 0 <= ago < 30, f"handshake not recent: {context}"
            assert peer["rx_bytes"] > 0 and peer["tx_bytes"] > 0, f"no traffic counted after pings: {context}"
        # No link-local address: the kernel sends nothing of its own (router solicitations,
        # MLD reports) into the tunnel, where no peer routes it.
        addresses = member.node.run("ip", "-6", "addr", "show", "dev", "tm0").stdout
        assert "fe80:" not in addresses, f"{member.name}'s tm0 has a link-local address:\n{addresses}"
        drops = member.status()["drops"]
        assert "no peer for destination" not in drops, f"{member.name} dropped packets for no peer: {drops}"


def test_50_mb_transfer_arrives_byte_identical(lab):
    mesh = up_mesh(lab)
    elapsed = transfer(lab, mesh, mesh["a"], mesh["c"], 50)
    print(f"50 MB a -> c in {elapsed:.1f} s ({50 * 8 / elapsed:.0f} Mbit/s)")


def test_fixed_rate_ping_loses_at_most_one(lab):
    mesh = up_mesh(lab)
    pairs = [("a", "b"), ("b", "c"), ("c", "a")]
    procs = {
        (x, y): mesh[x].node.popen("ping", "-n", "-i", "0.2", "-c", "100", "-W", "2", mesh[y].mesh_ip,
                                   log_name=f"ping-{x}-{y}")
        for x, y in pairs
    }
    for (x, y), proc in procs.items():
        try:
            proc.wait(timeout=45)
        except subprocess.TimeoutExpired:
            pytest.fail(f"ping {x} -> {y} (100 at 0.2 s) still running after 45 s:\n"
                        f"{mesh[x].node.log(f'ping-{x}-{y}')[-1500:]}\n{diagnostics(mesh)}", pytrace=False)
    for x, y in pairs:
        output = mesh[x].node.log(f"ping-{x}-{y}")
        sent, received = ping_counts(output)
        assert sent == 100, f"ping {x} -> {y} sent {sent}, not 100:\n{output[-1500:]}"
        assert sent - received <= 1, (
            f"ping {x} -> {y} lost {sent - received} of {sent} (at most 1 allowed):\n{output[-1500:]}\n{diagnostics(mesh)}"
        )


def test_one_way_stream_keeps_its_session_and_path(lab):
    """A stream nothing answers (UDP, b sends no data back) is not a dead path: b's daemon
    keepalives it within the 3 s failure check, so a neither probes nor handshakes again
    (with WireGuard's 10 s keepalive a re-handshook every few seconds)."""
    mesh = up_mesh(lab, ["a", "b"])
    a, b = mesh["a"], mesh["b"]
    before = status_peers(a)["b"]
    server = b.node.popen("iperf3", "-s", "-p", str(IPERF_PORT), log_name="iperf3-oneway")
    wait_for("iperf3 listening on b", lambda: f":{IPERF_PORT}" in b.node.run("ss", "-Hltn", check=False).stdout,
             timeout=10, details=lambda: b.node.log("iperf3-oneway")[-500:] if server.poll() is not None else "")
    result = json.loads(iperf3(a.node, b.mesh_ip, 8, "-u", "-b", "1M"))  # once more on a control-connection reset
    assert "error" not in result, f"one-way UDP stream failed: {result['error']}\n{diagnostics(mesh)}"
    after = status_peers(a)["b"]
    assert after["handshakes"] == before["handshakes"], (
        f"a handshook again during a one-way stream: {before['handshakes']} -> {after['handshakes']}\n"
        f"{diagnostics(mesh)}")
    assert after["path"] == before["path"], f"path moved: {before['path']} -> {after['path']}\n{diagnostics(mesh)}"
    assert after["tx_bytes"] - before["tx_bytes"] > 800_000, f"the stream did not cross the tunnel: {after}"


def test_transfer_completes_intact_under_5_percent_loss(lab):
    mesh = up_mesh(lab)
    a, b = mesh["a"], mesh["b"]
    b.node.set_loss(5)
    before = tcp_retransmits(a)
    elapsed = transfer(lab, mesh, a, b, 10)
    retransmits = tcp_retransmits(a) - before
    print(f"10 MB a -> b under 5% loss in {elapsed:.1f} s, {retransmits} TCP retransmits")
    # The loss was really on the wire: TCP had to retransmit through the tunnel.
    assert retransmits > 0, "no TCP retransmits on a: was the 5% loss on b in effect?"


def test_restarted_daemon_rehandshakes_and_traffic_resumes(lab):
    mesh = up_mesh(lab)
    a, b, c = mesh["a"], mesh["b"], mesh["c"]
    pids = {m.name: m.status()["node"]["pid"] for m in mesh.values()}
    b.down()
    assert ping(a, b.mesh_ip, count=1, wait=1).returncode != 0, "a still reaches b while b is down"
    restarted = time.time()
    b.up()
    assert b.status()["node"]["pid"] != pids["b"], "b did not get a new daemon"

    for src, dst in ((a, b), (c, b), (b, a), (b, c)):
        wait_for(f"ping {src.name} -> {dst.name} after b restarted",
                 lambda: ping(src, dst.mesh_ip, count=1, wait=1).returncode == 0, 30, lambda: diagnostics(mesh))
    for member in (a, c):
        status = member.status()
        assert status["node"]["pid"] == pids[member.name], f"{member.name}'s daemon was restarted"
        peer = {p["name"]: p for p in status["peers"]}["b"]
        assert peer["state"] == "up", f"{member.name}'s session to b is not up: {peer}\n{diagnostics(mesh)}"
        assert peer["last_handshake"] is not None and peer["last_handshake"] >= restarted - 1, (
            f"{member.name} has no new handshake with b since its restart: {peer}\n{diagnostics(mesh)}"
        )


def test_down_leaves_nothing_behind(lab):
    mesh = up_mesh(lab, ["a", "b"])
    a = mesh["a"]
    state = Path(a.node.state_dir)
    pid = a.status()["node"]["pid"]
    assert "tm0" in a.node.run("ip", "link").stdout, "tm0 missing while up"
    assert (state / "control.sock").exists() and (state / "tunnelmesh.pid").exists()

    a.down()
    links = a.node.run("ip", "link").stdout
    routes = a.node.run("ip", "route").stdout
    udp = a.node.run("ss", "-Hnul").stdout
    procs = subprocess.run(["pgrep", "-a", "-f", re.escape(str(state)) + "( |/|$)"],
                           capture_output=True, text=True, timeout=10).stdout
    leftovers = {
        "tm0 interface": "tm0" in links,
        "route to 100.100.0.0/24": "100.100.0." in routes,
        "control socket": (state / "control.sock").exists() or (state / "control.sock").is_symlink(),
        "pid file": (state / "tunnelmesh.pid").exists(),
        f"daemon process {pid}": Path(f"/proc/{pid}").exists(),
        "process with its state dir": bool(procs.strip()),
        "UDP socket on 51820": ":51820 " in udp,
    }
    left = [what for what, there in leftovers.items() if there]
    assert not left, (
        f"`down` left behind: {left}\nip link:\n{links}\nip route:\n{routes}\nprocesses:\n{procs}\n"
        f"ss:\n{udp}\nlog:\n{a.log_tail()}"
    )
    assert "tunnelmesh down" in a.log_tail(), f"no shutdown line in the log:\n{a.log_tail()}"
    # The other node is unaffected and `status` on the stopped one says so.
    status = a.tm("status", check=False)
    assert status.returncode == 1 and "not running" in status.stderr, f"{status.returncode}: {status.stderr}"
    assert mesh["b"].status()["node"]["pid"] > 0
