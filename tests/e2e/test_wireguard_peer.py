"""A plain WireGuard peer (real wireguard-go, configured with `wg`) joins a
tunnelmesh mesh the way the docs say: `tunnelmesh show --wg --show-secrets
--endpoint <underlay>` of each node pasted into its config, and a
`wireguard_public_key` [[peers]] entry in each node's config.

    switch sw (192.0.2.0/24)
    ├── a, b, c   tunnelmesh up          tm0 100.100.0.1-3
    └── wg        wireguard-go -f <if>   <if> 100.100.0.9

It exchanges traffic with every tunnelmesh node both ways, and keeps doing so across
a rekey (REKEY_AFTER_TIME = 120 s), which the test waits for with pings running.
wireguard-go's control socket /var/run/wireguard/<if>.sock is global, so the
interface name is unique per run; the process is killed by PID in a finalizer.
"""

from __future__ import annotations

import os
import re
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.wireguard_go import start_wireguard_go

from tests.conftest import unavailable
from tools.lab import find_tool
from tools.mesh import build_static_mesh, diagnostics, peer_block, wait_for_handshakes

pytestmark = pytest.mark.e2e

WG_MESH_IP = "100.100.0.9"
WG_PORT = 51820
REKEY_AFTER_TIME = 120
REKEY_WAIT = 160  # seconds from the first handshake until a new one must have happened
PORT = 5002

RECEIVER = r"""
import hashlib, socket, sys
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((sys.argv[1], int(sys.argv[2])))
srv.listen(1)
srv.settimeout(30)
print("ready", flush=True)
conn, _ = srv.accept()
conn.settimeout(30)
h, n = hashlib.sha256(), 0
for _ in range(1_000_000):
    chunk = conn.recv(1 << 16)
    if not chunk:
        break
    h.update(chunk)
    n += len(chunk)
print(n, h.hexdigest(), flush=True)
conn.close()
"""

SENDER = r"""
import hashlib, os, socket, sys, time
data = os.urandom(int(sys.argv[3]))
deadline = time.monotonic() + 20
for _ in range(200):
    try:
        s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
        break
    except OSError as exc:
        if time.monotonic() > deadline:
            sys.exit(f"could not connect: {exc}")
        time.sleep(0.1)
else:
    sys.exit("could not connect")
s.settimeout(30)
s.sendall(data)
s.shutdown(socket.SHUT_WR)
s.recv(1)
print(len(data), hashlib.sha256(data).hexdigest())
"""


class WireGuardGo:
    def __init__(self, node, ifname: str, proc: subprocess.Popen, underlay: str) -> None:
        self.node, self.ifname, self.proc, self.underlay = node, ifname, proc, underlay

    def dump(self) -> str:
        try:
            return self.node.run("wg", "show", self.ifname, "dump", check=False, timeout=10).stdout
        except Exception as exc:  # noqa: BLE001 - only for messages
            return f"(wg show failed: {exc})"

    def latest_handshakes(self) -> dict[str, int]:
        """Peer public key -> latest-handshake (unix seconds, 0 = never), from `wg show dump`."""
        out = {}
        for line in self.dump().splitlines()[1:]:
            fields = line.split("\t")
            if len(fields) >= 5 and fields[4].isdigit():
                out[fields[0]] = int(fields[4])
        return out

    def diagnostics(self) -> str:
        return (f"--- wireguard-go ({self.ifname}): wg show dump ---\n{self.dump()}\n"
                f"--- wireguard-go log (tail) ---\n{self.node.log('wireguard-go')[-2500:]}")


@pytest.fixture
def wg_tools():
    missing = [t for t in ("wireguard-go", "wg", "ping") if find_tool(t) is None]
    if missing:
        unavailable(f"missing {', '.join(missing)} (apt-get install wireguard-go wireguard-tools iputils-ping)")
    if not os.path.exists("/dev/net/tun"):
        unavailable("no /dev/net/tun")


@pytest.fixture
def mesh_with_wg(wg_tools, lab, request):
    """Three tunnelmesh nodes and a wireguard-go node, configured and up."""
    mesh = build_static_mesh(lab, ["a", "b", "c"], start=False)
    node = lab.add_node("wg")
    underlay = lab.connect(node, lab.switches["sw"])

    ifname = f"tmwg{secrets.token_hex(5)}"  # 14 characters, unique per run
    wg = WireGuardGo(node, ifname, start_wireguard_go(node, ifname, request.addfinalizer), underlay)

    # The wireguard-go side, configured only from what `tunnelmesh show --wg` prints.
    private = node.run("wg", "genkey").stdout.strip()
    public = node.run("wg", "pubkey", input=private + "\n").stdout.strip()
    sections = []
    for member in mesh.values():
        shown = member.tm("show", "--wg", "--show-secrets", "--endpoint", member.underlay).stdout
        assert "PresharedKey = " in shown and f"AllowedIPs = {member.mesh_ip}/32" in shown, shown
        sections.append(shown)
    conf = Path(lab.workdir) / "wg.conf"
    fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(f"[Interface]\nPrivateKey = {private}\nListenPort = {WG_PORT}\n\n" + "\n".join(sections))
    node.run("wg", "setconf", ifname, str(conf))
    node.run("ip", "addr", "add", f"{WG_MESH_IP}/24", "dev", ifname)
    node.run("ip", "link", "set", ifname, "up")

    # The tunnelmesh side: a plain WireGuard peer in each node's config.
    for member in mesh.values():
        member.append_config(peer_block("wgpeer", wireguard_public_key=public, mesh_ip=WG_MESH_IP,
                                        endpoint=f"{underlay}:{WG_PORT}"))
    for member in mesh.values():
        member.up()
    return mesh, wg


def ping(node, address: str, count: int = 2, wait: int = 2) -> subprocess.CompletedProcess:
    return node.run("ping", "-n", "-c", str(count), "-W", str(wait), address, check=False,
                    timeout=count * (wait + 1) + 10)


def ping_counts(output: str) -> tuple[int, int]:
    m = re.search(r"(\d+) packets transmitted, (\d+) received", output)
    assert m, f"no ping summary in:\n{output[-2000:]}"
    return int(m.group(1)), int(m.group(2))


@pytest.mark.long
def test_wireguard_go_peer_exchanges_traffic_both_ways_across_a_rekey(mesh_with_wg, lab):
    mesh, wg = mesh_with_wg

    def details() -> str:
        return f"{diagnostics(mesh)}\n{wg.diagnostics()}"

    try:
        wait_for_handshakes(mesh, timeout=20)  # includes every node's session to wgpeer
    except TimeoutError as exc:
        pytest.fail(f"{exc}\n{details()}", pytrace=False)

    # Both ways, with every tunnelmesh node.
    keys = {}
    for member in mesh.values():
        keys[member.name] = member.status()["node"]["wireguard_public_key"]
        there = ping(wg.node, member.mesh_ip)
        back = ping(member.node, WG_MESH_IP)
        assert there.returncode == 0, f"wg -> {member.name} failed:\n{there.stdout}\n{details()}"
        assert back.returncode == 0, f"{member.name} -> wg failed:\n{back.stdout}\n{details()}"
        peer = {p["name"]: p for p in member.status()["peers"]}["wgpeer"]
        assert peer["state"] == "up" and peer["fingerprint"] is None, f"{member.name}'s wgpeer: {peer}"

    # A TCP stream each way between wireguard-go and node a.
    a = mesh["a"]
    for src, dst, dst_ip in ((wg.node, a.node, a.mesh_ip), (a.node, wg.node, WG_MESH_IP)):
        log_name = f"receiver-{src.name}"
        receiver = dst.popen(sys.executable, "-c", RECEIVER, dst_ip, str(PORT), log_name=log_name)
        dst.wait_for_log(log_name, "ready", timeout=10)
        sent = src.run(sys.executable, "-c", SENDER, dst_ip, str(PORT), str(4 << 20), check=False, timeout=60)
        try:
            receiver.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pytest.fail(f"receiver on {dst.name} still running 30 s after the sender ended "
                        f"({sent.stdout}{sent.stderr}):\n{dst.log(log_name)}\n{details()}", pytrace=False)
        got = dst.log(log_name).replace("ready", "", 1).strip()
        assert sent.returncode == 0 and sent.stdout.strip() == got, (
            f"4 MiB {src.name} -> {dst.name}: sent {sent.stdout.strip()!r} {sent.stderr.strip()}, received {got!r}\n{details()}"
        )

    before = wg.latest_handshakes()
    missing = [name for name, key in keys.items() if not before.get(key)]
    assert not missing, f"wireguard-go has no handshake with {missing}\n{details()}"
    first = min(before[key] for key in keys.values())

    # Keep pings running both ways at -i 1 until every session has rekeyed.
    pingers = {}
    for member in mesh.values():
        pingers[f"wg-{member.name}"] = wg.node.popen("ping", "-n", "-i", "1", "-W", "2", "-c", str(REKEY_WAIT + 30),
                                                     member.mesh_ip, log_name=f"ping-wg-{member.name}")
    pingers["a-wg"] = a.node.popen("ping", "-n", "-i", "1", "-W", "2", "-c", str(REKEY_WAIT + 30), WG_MESH_IP,
                                   log_name="ping-a-wg")
    rekeyed_at = None
    deadline = first + REKEY_WAIT
    for _ in range(REKEY_WAIT * 2 + 10):
        now = wg.latest_handshakes()
        if all(now.get(key, 0) > before[key] for key in keys.values()):
            rekeyed_at = time.time()
            break
        if time.time() > deadline:
            break
        assert all(p.poll() is None for p in pingers.values()), "a ping stopped early"
        time.sleep(1)
    if rekeyed_at is None:
        for p in pingers.values():
            p.send_signal(signal.SIGINT)
        pytest.fail(
            f"no new handshake between wireguard-go and every tunnelmesh node within {REKEY_WAIT} s of the first "
            f"(REKEY_AFTER_TIME is {REKEY_AFTER_TIME} s): before {before}, now {wg.latest_handshakes()}\n{details()}",
            pytrace=False,
        )
    after = wg.latest_handshakes()
    print(f"rekeyed {rekeyed_at - first:.0f} s after the first handshake: {before} -> {after}")
    time.sleep(5)  # pings keep flowing on the new keys
    for p in pingers.values():
        p.send_signal(signal.SIGINT)  # ping prints its summary and exits
    for name, p in pingers.items():
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pytest.fail(f"ping {name} did not stop on SIGINT", pytrace=False)
    for name in pingers:
        src = wg.node if name.startswith("wg-") else a.node
        output = src.log(f"ping-{name}")
        sent, received = ping_counts(output)
        assert sent >= 10, f"ping {name} sent only {sent}:\n{output[-1500:]}"
        assert sent - received <= 3, (
            f"ping {name} lost {sent - received} of {sent} across the rekey (at most 3 allowed):\n"
            f"{output[-1500:]}\n{details()}"
        )

    # And both ways again, on the new keys.
    for member in mesh.values():
        there = ping(wg.node, member.mesh_ip)
        back = ping(member.node, WG_MESH_IP)
        assert there.returncode == 0 and back.returncode == 0, (
            f"after the rekey: wg -> {member.name} {there.returncode}, {member.name} -> wg {back.returncode}\n{details()}"
        )
