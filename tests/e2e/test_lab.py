"""The netns lab itself: topology, fault injection, NAT, and that teardown leaves nothing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.wait import wait_for
from tools.lab import PROJECT_ROOT, CommandError, Lab, cleanup_leftovers, clean_environment

# A UDP echo server that answers "<data> from <ip>:<port>" (the source it saw) and exits
# by itself after 120 s idle.
ECHO_SERVER = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.settimeout(120)
print("ready", flush=True)
for _ in range(100000):
    data, addr = s.recvfrom(2048)
    s.sendto(data + f" from {addr[0]}:{addr[1]}".encode(), addr)
"""

# Sends up to `tries` datagrams, 0.3 s apart; prints the first reply and exits 0, else 1.
UDP_CLIENT = r"""
import socket, sys
host, port, tries = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(0.3)
for _ in range(tries):
    try:
        s.sendto(b"hello", (host, port))
        print(s.recvfrom(2048)[0].decode())
        sys.exit(0)
    except (socket.timeout, ConnectionRefusedError):
        pass
sys.exit(1)
"""


def netns_names() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30, check=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return False
    return stat[stat.rfind(b")") + 2 : stat.rfind(b")") + 3] not in (b"Z", b"X")


def ping(node, address: str, count: int = 1) -> subprocess.CompletedProcess:
    return node.run("ping", "-n", "-c", str(count), "-i", "0.2", "-W", "1", address, check=False)


def two_nodes(lab: Lab):
    """a (192.0.2.1) and b (192.0.2.2) on one switch, once a reaches b: a fresh veth may
    take a moment to carry on a loaded machine, and a lone first ping of 1 s can miss it."""
    switch = lab.add_switch("lan")
    a, b = lab.add_node("a"), lab.add_node("b")
    lab.connect(a, switch)
    lab.connect(b, switch)
    wait_for("a reaches b on the fresh switch", lambda: ping(a, "192.0.2.2").returncode == 0, 15)
    return a, b


def start_echo(node, port: int) -> None:
    node.popen(sys.executable, "-c", ECHO_SERVER, str(port), log_name=f"echo{port}")
    node.wait_for_log(f"echo{port}", "ready")


def udp_exchange(node, address: str, port: int, tries: int = 5) -> subprocess.CompletedProcess:
    return node.run(sys.executable, "-c", UDP_CLIENT, address, str(port), str(tries), check=False)


def test_two_nodes_on_a_switch_ping_each_other(lab):
    a, b = two_nodes(lab)
    assert (a.addresses, b.addresses) == (["192.0.2.1"], ["192.0.2.2"])
    assert a.interfaces == ["eth0"]
    assert ping(a, "192.0.2.2").returncode == 0
    assert ping(b, "192.0.2.1").returncode == 0
    assert ping(a, "192.0.2.99").returncode != 0  # nobody there: ping can fail here


def test_nodes_are_isolated_from_the_host(lab):
    a, _ = two_nodes(lab)
    links = a.run("ip", "-o", "link", "show").stdout
    assert [line.split(":")[1].strip().split("@")[0] for line in links.splitlines()] == ["lo", "eth0"]
    routes = a.run("ip", "route", "show").stdout
    assert "default" not in routes


def test_full_loss_stops_ping_and_zero_restores_it(lab):
    a, b = two_nodes(lab)
    assert ping(a, "192.0.2.2").returncode == 0
    b.set_loss(100)
    assert ping(a, "192.0.2.2", count=2).returncode != 0
    b.set_loss(0)
    wait_for("ping gets through again with the loss lifted", lambda: ping(a, "192.0.2.2").returncode == 0, 15)


def test_partial_loss_drops_some_but_not_all(lab):
    a, b = two_nodes(lab)
    assert ping(a, "192.0.2.2").returncode == 0  # the neighbour is resolved before ARP can be lost too
    b.set_loss(30)  # each way: an echo survives with p = 0.49
    out = a.run("ping", "-n", "-q", "-c", "200", "-i", "0.005", "-W", "1", "192.0.2.2", check=False).stdout
    received = int(out.split(" received")[0].rsplit(",", 1)[1])
    assert 40 <= received <= 160, out


def test_block_udp_blocks_and_unblock_restores(lab):
    a, b = two_nodes(lab)
    start_echo(b, 4000)
    ok = udp_exchange(a, "192.0.2.2", 4000)
    assert ok.returncode == 0 and ok.stdout.startswith("hello from 192.0.2.1:"), ok
    b.block_udp()
    assert udp_exchange(a, "192.0.2.2", 4000).returncode == 1
    assert ping(a, "192.0.2.2").returncode == 0  # only UDP is blocked
    b.unblock()
    assert udp_exchange(a, "192.0.2.2", 4000).returncode == 0


def test_block_udp_on_one_port_leaves_others(lab):
    a, b = two_nodes(lab)
    start_echo(b, 4000)
    start_echo(b, 4001)
    b.block_udp(4000)
    assert udp_exchange(a, "192.0.2.2", 4000).returncode == 1
    assert udp_exchange(a, "192.0.2.2", 4001).returncode == 0
    b.unblock()
    assert udp_exchange(a, "192.0.2.2", 4000).returncode == 0


def test_blocked_sender_sees_no_local_error(lab):
    """Drops happen on the wire: sendto() succeeds, as behind a real firewall."""
    a, _ = two_nodes(lab)
    a.block_udp()
    script = "import socket; socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'x', ('192.0.2.2', 9))"
    a.run(sys.executable, "-c", script)


def test_router_masquerades_inside_nodes(lab):
    wan = lab.add_switch("wan", "203.0.113.0/24")
    home = lab.add_switch("home", "198.51.100.0/24")
    router = lab.add_router("r", outside=wan, inside=home)
    laptop, server = lab.add_node("laptop"), lab.add_node("server")
    lab.connect(laptop, home)
    lab.connect(server, wan)
    start_echo(server, 5000)
    reply = udp_exchange(laptop, server.addresses[0], 5000)
    assert reply.returncode == 0, reply
    assert reply.stdout.startswith(f"hello from {router.addresses[0]}:")  # the NAT's outside address
    # Nothing gets in unasked, even for a server that knows the route to the inside.
    server.run("ip", "route", "add", str(home.subnet), "via", router.addresses[0])
    assert ping(server, laptop.addresses[0]).returncode != 0


def test_run_error_says_command_code_and_output(lab):
    a = lab.add_node("a")
    with pytest.raises(CommandError) as info:
        a.run("sh", "-c", "echo to-out; echo to-err >&2; exit 3")
    text = str(info.value)
    assert "exit 3" in text and "exited with 3" in text and "to-out" in text and "to-err" in text
    assert info.value.returncode == 3


def test_run_timeout_kills_the_command(lab):
    a = lab.add_node("a")
    started = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired):
        a.run("sleep", "30", timeout=0.5)
    assert time.monotonic() - started < 10
    assert a.run("sh", "-c", "ip netns identify $$").stdout.strip() == a.netns
    assert subprocess.run(["ip", "netns", "pids", a.netns], capture_output=True, text=True).stdout.split() == []


def test_daemon_environment_has_no_proxies_and_venv_first(lab, monkeypatch):
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:1")
    monkeypatch.setenv("no_proxy", "x")
    monkeypatch.setenv("SSH_AUTH_SOCK", "/nonexistent/agent")
    env = clean_environment()
    assert not {"HTTPS_PROXY", "no_proxy", "SSH_AUTH_SOCK"} & env.keys()
    assert env["PATH"].split(os.pathsep)[0] == str(PROJECT_ROOT / ".venv" / "bin")
    a = lab.add_node("a")
    proc = a.popen("env", log_name="env")
    proc.wait(timeout=10)
    names = {line.split("=", 1)[0] for line in a.log("env").splitlines() if "=" in line}
    assert "PATH" in names
    assert not [n for n in names if n.upper().endswith("_PROXY") or n == "SSH_AUTH_SOCK"]


def test_cleanup_removes_namespaces_processes_and_workdir(make_lab):
    lab = make_lab()
    a, b = two_nodes(lab)
    sleeper = a.popen("sleep", "600")
    a.run("sh", "-c", "sleep 600 >/dev/null 2>&1 &")  # untracked: must die with the namespace
    stray = [int(p) for p in subprocess.run(["ip", "netns", "pids", a.netns], capture_output=True, text=True).stdout.split()]
    assert sleeper.pid in stray and len(stray) == 2
    workdir = Path(lab.workdir)
    assert workdir.is_dir() and Path(a.state_dir).is_dir()
    assert {a.netns, b.netns, f"{lab.prefix}lan"} <= netns_names()

    lab.cleanup()

    assert not [n for n in netns_names() if n.startswith(lab.prefix)]
    assert not workdir.exists()
    assert sleeper.returncode is not None
    assert not any(alive(pid) for pid in stray)
    lab.cleanup()  # idempotent, does not raise


def test_context_manager_tears_down_on_error(make_lab):
    lab = make_lab()
    with pytest.raises(RuntimeError, match="boom"):
        with lab:
            lab.add_node("a")
            raise RuntimeError("boom")
    assert not [n for n in netns_names() if n.startswith(lab.prefix)]
    assert not Path(lab.workdir).exists()


CHILD_LAB = r"""
import os, sys, time
from tools.lab import Lab
lab = Lab(prefix=sys.argv[1])
a = lab.add_node("a")
sleeper = a.popen("sleep", "300")
with open(sys.argv[2], "w") as f:
    f.write(f"{lab.workdir} {sleeper.pid}")
if sys.argv[3] == "crash":
    os._exit(0)  # no atexit, no cleanup: a hard crash
time.sleep(60)
"""


def run_child_lab(prefix: str, tmp_path: Path, mode: str) -> tuple[subprocess.Popen, Path, int]:
    ready = tmp_path / "ready"
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD_LAB, prefix, str(ready), mode],
        cwd=PROJECT_ROOT,
        env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)},
        stdin=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while not (ready.exists() and ready.read_text()) and time.monotonic() < deadline and child.poll() is None:
        time.sleep(0.05)
    assert ready.exists(), "child lab did not start"
    workdir, pid = ready.read_text().split()
    return child, Path(workdir), int(pid)


def test_sigterm_tears_the_lab_down(require_root, tmp_path):
    from tests.conftest import RUN_PREFIX

    prefix = f"{RUN_PREFIX}term-"
    child, workdir, sleeper = run_child_lab(prefix, tmp_path, "wait")
    try:
        assert f"{prefix}a" in netns_names() and alive(sleeper)
        child.send_signal(signal.SIGTERM)
        assert child.wait(timeout=30) == -signal.SIGTERM
    finally:
        child.kill()
        child.wait()
    assert f"{prefix}a" not in netns_names()
    assert not workdir.exists()
    assert not alive(sleeper)


def test_cleanup_leftovers_removes_crashed_runs_but_not_live_labs(require_root, make_lab, tmp_path):
    from tests.conftest import RUN_PREFIX

    base = f"{RUN_PREFIX}left-"
    live = Lab(prefix=f"{base}live-")
    try:
        live.add_node("x")
        child, workdir, sleeper = run_child_lab(f"{base}dead-", tmp_path, "crash")
        child.wait(timeout=30)
        assert f"{base}dead-a" in netns_names() and workdir.is_dir() and alive(sleeper)

        removed = cleanup_leftovers(base)

        assert any(f"{base}dead-a" in item for item in removed), removed
        assert f"{base}dead-a" not in netns_names()
        assert not workdir.exists()
        assert not alive(sleeper)
        assert f"{base}live-x" in netns_names()  # a running lab is left alone
    finally:
        live.cleanup()
    assert cleanup_leftovers(base) == []


def test_lab_refuses_addresses_outside_the_documentation_ranges(lab):
    with pytest.raises(Exception, match="documentation"):
        lab.add_switch("bad", "10.0.0.0/24")
