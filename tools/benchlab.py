"""Lab helpers shared by tools.bench (the workload) and tools.footprint (RSS per peer):
bounded waits, a lab torn down however the block ends, a daemon's RSS and CPU time, an
interface's byte counters, and starting wireguard-go and nebula in a namespace."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from tools.benchreport import MTU, parse_link_stats, parse_proc_stat_cpu, parse_voluntary_switches
from tools.lab import Lab, Node, clean_environment, find_tool

READY_TIMEOUT = 20.0  # for each "wait until X is there" loop
MESH_PREFIXLEN = 24
WG_PORT = 51820
NEBULA_PORT = 4242
TICKS_PER_S = os.sysconf("SC_CLK_TCK")
MAX_TREE = 64  # processes counted in one daemon's tree: a bound, far above any real daemon


class BenchError(RuntimeError):
    pass


def log(text: str) -> None:
    print(f"bench: {text}", file=sys.stderr, flush=True)


def wait_until(what: str, check: Callable[[], bool], timeout: float = READY_TIMEOUT, interval: float = 0.05,
               alive: Callable[[], str | None] | None = None) -> None:
    """Poll check() until true, bounded in time. alive() returns a reason to give up early."""
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / interval) + 2):
        if check():
            return
        if alive is not None:
            dead = alive()
            if dead:
                raise BenchError(f"{what}: {dead}")
        if time.monotonic() >= deadline:
            break
        time.sleep(interval)
    raise BenchError(f"{what}: not within {timeout:g} s")


def process_alive(proc: subprocess.Popen, node: Node, log_name: str) -> Callable[[], str | None]:
    def check() -> str | None:
        if proc.poll() is None:
            return None
        tail = " | ".join(node.log(log_name).strip().splitlines()[-5:])
        return f"process exited with {proc.returncode}: {tail}"
    return check


@contextmanager
def fresh_lab(sockets: list[Path]) -> Iterator[Lab]:
    """A lab torn down however the block ends; a second Ctrl-C cannot cut the teardown
    short. `sockets`: wireguard-go UAPI sockets to remove too (filled in while it runs)."""
    lab = Lab()
    try:
        yield lab
    finally:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            lab.cleanup()
            for sock in sockets:  # wireguard-go's UAPI socket, if it died without removing it
                sock.unlink(missing_ok=True)
        finally:
            signal.signal(signal.SIGINT, previous)


def rss_mib(pid: int) -> tuple[float | None, float | None]:
    """(VmRSS, VmHWM) of a process in MiB, from /proc/<pid>/status."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None, None
    values = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) / 1024  # kB
    return values.get("VmRSS"), values.get("VmHWM")


def process_tree(pid: int) -> list[int]:
    """pid and its descendants (a daemon that forks workers counts them too), at most MAX_TREE."""
    found, pending = [], [pid]
    while pending and len(found) < MAX_TREE:
        current = pending.pop()
        found.append(current)
        try:
            tasks = os.listdir(f"/proc/{current}/task")
        except OSError:
            continue
        for task in tasks:
            try:
                pending += [int(child) for child in Path(f"/proc/{current}/task/{task}/children").read_text().split()]
            except OSError:
                pass
    return found


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime of every process in the daemons' trees, BenchError if one is gone
    (a daemon that died did not really run the workload)."""
    total = 0.0
    for root in pids:
        for pid in process_tree(root):
            try:
                total += parse_proc_stat_cpu(Path(f"/proc/{pid}/stat").read_text(), TICKS_PER_S)
            except FileNotFoundError:
                if pid == root:
                    raise BenchError(f"daemon process {pid} is gone") from None
    return total


def wake_counts(pids: list[int]) -> dict[int, int]:
    """Voluntary context switches so far of every thread of every process in the
    daemons' trees, by thread id: each is one time the thread slept and was woken (not
    counting preemption, which says more about the machine than the daemon). BenchError if
    a daemon is gone."""
    counts: dict[int, int] = {}
    for root in pids:
        for pid in process_tree(root):
            try:
                tasks = list(Path(f"/proc/{pid}/task").iterdir())
            except FileNotFoundError:
                if pid == root:
                    raise BenchError(f"daemon process {pid} is gone") from None
                continue
            for task in tasks:
                try:
                    counts[int(task.name)] = parse_voluntary_switches((task / "status").read_text())
                except FileNotFoundError:  # a thread that ended meanwhile
                    pass
    return counts


def idle_wakeups_per_minute(pids: list[int], settle: float, seconds: float) -> float:
    """How often the daemons wake while the tunnel is up and nothing is sent: wake-ups
    per minute over `seconds`, after `settle` seconds for what connecting left to do (the
    handshake's probes, the passive keepalive after the first pings). A thread that ended
    meanwhile counts what it did before the window as nothing."""
    time.sleep(settle)
    before, began = wake_counts(pids), time.monotonic()
    time.sleep(seconds)
    after = wake_counts(pids)
    woken = sum(count - before.get(tid, 0) for tid, count in after.items())
    return woken / (time.monotonic() - began) * 60


def link_counters(node: Node, ifname: str) -> dict[str, int]:
    """rx_bytes/tx_bytes of an interface in node's namespace."""
    return parse_link_stats(node.run("ip", "-j", "-s", "link", "show", "dev", ifname).stdout)


def has_address(node: Node, ifname: str, address: str) -> bool:
    proc = node.run("ip", "-o", "-4", "addr", "show", "dev", ifname, check=False)
    return proc.returncode == 0 and f" {address}/" in proc.stdout


# --- wireguard-go ----------------------------------------------------------------------------


def wg_key_pair(node: Node) -> tuple[Path, str]:
    """A new private key in a 0600 file in node's state dir, and its public key."""
    private = node.run("wg", "genkey").stdout.strip()
    public = node.run("wg", "pubkey", input=private + "\n").stdout.strip()
    key_file = Path(node.state_dir, "wg.key")
    key_file.touch(mode=0o600)
    key_file.write_text(private + "\n")
    return key_file, public


def start_wireguard_go(node: Node, ifname: str, sockets: list[Path]) -> subprocess.Popen:
    """wireguard-go in the foreground on a new interface, once `wg` can talk to it. The
    process is the daemon itself (`ip netns exec` execs it): its pid is the daemon's."""
    sockets.append(Path("/var/run/wireguard", f"{ifname}.sock"))
    env = dict(clean_environment(), WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD="1")
    proc = node.popen("wireguard-go", "-f", ifname, env=env, log_name="wireguard-go")
    wait_until(f"{node.name}: wireguard-go interface {ifname}",
               lambda: node.run("wg", "show", ifname, check=False).returncode == 0,
               alive=process_alive(proc, node, "wireguard-go"))
    return proc


# --- nebula ------------------------------------------------------------------------------------

NEBULA_CONFIG = """\
pki:
  ca: {ca}
  cert: {cert}
  key: {key}
static_host_map:
{static_host_map}
lighthouse:
  am_lighthouse: false
  interval: 60
  hosts: []
listen:
  host: 0.0.0.0
  port: {port}
punchy:
  punch: false
cipher: aes
tun:
  disabled: false
  dev: {dev}
  drop_local_broadcast: false
  drop_multicast: false
  tx_queue: 500
  mtu: {mtu}
logging:
  level: info
  format: text
firewall:
  outbound:
    - port: any
      proto: any
      host: any
  inbound:
    - port: any
      proto: any
      host: any
"""


def need_nebula() -> None:
    for tool in ("nebula", "nebula-cert"):
        if find_tool(tool) is None:
            raise BenchError(f"`{tool}` not installed (apt-get install --no-install-recommends nebula)")


def nebula_ca(lab: Lab, node: Node) -> Path:
    """A new nebula CA in the lab's work dir (its directory)."""
    pki = Path(lab.workdir, "nebula-pki")
    pki.mkdir(mode=0o700)
    node.run("nebula-cert", "ca", "-name", "tunnelmesh-bench", "-out-crt", str(pki / "ca.crt"),
             "-out-key", str(pki / "ca.key"))
    return pki


def nebula_config(node: Node, pki: Path, name: str, mesh_cidr: str, dev: str, hosts: dict[str, str]) -> Path:
    """Sign `name`'s certificate for `mesh_cidr` and write its config into node's state
    dir: tunnel `dev`, `hosts` (mesh IP -> "underlay:port") as its static_host_map."""
    node.run("nebula-cert", "sign", "-name", name, "-ip", mesh_cidr,
             "-ca-crt", str(pki / "ca.crt"), "-ca-key", str(pki / "ca.key"),
             "-out-crt", str(pki / f"{name}.crt"), "-out-key", str(pki / f"{name}.key"))
    config = Path(node.state_dir, "nebula.yml")
    config.write_text(NEBULA_CONFIG.format(
        ca=pki / "ca.crt", cert=pki / f"{name}.crt", key=pki / f"{name}.key",
        static_host_map="\n".join(f'  "{ip}": ["{underlay}"]' for ip, underlay in hosts.items()),
        port=NEBULA_PORT, dev=dev, mtu=MTU["nebula"]))
    return config


def start_nebula(node: Node, config: Path, dev: str, mesh_ip: str) -> subprocess.Popen:
    """nebula in node's namespace, once its interface has mesh_ip."""
    proc = node.popen("nebula", "-config", str(config), log_name="nebula")
    wait_until(f"{node.name}: nebula interface {dev} with {mesh_ip}", lambda: has_address(node, dev, mesh_ip),
               alive=process_alive(proc, node, "nebula"))
    return proc
