"""Network-namespace lab: nodes, L2 switches and NAT routers on one machine.

Used by the demo, the e2e tests and the benchmarks. Pure stdlib; it drives `ip` and `nft`.

Theory of operation
-------------------
* Every node, switch and router is its own network namespace named f"{prefix}{name}".
  Nothing is created in the host's namespace: a veth pair is made directly between a
  node's namespace (``eth0``, ``eth1``, ...) and a switch's namespace (``p0``, ``p1``, ...),
  so interface names never collide and never hit the 15-character limit.
* A switch is a Linux bridge ``br0`` inside its own namespace: one L2 segment.
* A router is a node on two switches with IP forwarding on and, by default, nftables
  masquerade towards the outside (plain masquerade behaves as a port-restricted cone NAT,
  ``random`` / ``fully-random`` as symmetric NAT).
* Faults (``block_udp``, ``set_loss``) are injected on the wire: bridge-family nftables
  rules on the node's switch ports, in the switch's namespace. A drop inside the node
  itself would make the sender's ``sendto()`` fail with EPERM, which no real network does.
  Each node owns one table per fault kind in each switch it is connected to.
* Processes started with ``Node.popen`` run in their own session (process group) with
  stdout+stderr in ``{workdir}/{node}.{log_name}.log``; teardown sends SIGTERM to the
  group, SIGKILL after 5 s, then kills whatever else still lives in the namespaces
  (``ip netns pids``) and deletes the namespaces and the workdir.
* Teardown runs from ``Lab.cleanup`` (context-manager exit), at interpreter exit
  (``atexit``) and on SIGTERM. A run killed harder than that leaves namespaces behind:
  ``cleanup_leftovers`` (or ``python -m tools.lab --cleanup``) removes them. Each live
  lab holds an flock on ``/run/tunnelmesh-lab/{prefix}.lock``, so cleaning leftovers never
  touches a lab that is still running in another process.

Safety: underlay subnets must lie in the documentation ranges (192.0.2.0/24,
198.51.100.0/24, 203.0.113.0/24, 2001:db8::/32); all traffic stays inside the lab's
namespaces.
"""

from __future__ import annotations

import argparse
import atexit
import fcntl
import ipaddress
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

__all__ = [
    "Lab",
    "Node",
    "Switch",
    "LabError",
    "CommandError",
    "clean_environment",
    "cleanup_leftovers",
    "find_tool",
    "PROJECT_ROOT",
]

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DOC_NETWORKS = tuple(
    ipaddress.ip_network(n)
    for n in ("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24", "2001:db8::/32")
)
LOCK_DIR = Path("/run/tunnelmesh-lab")
WORKDIR_PREFIX = "tunnelmesh-lab-"
TERM_GRACE = 5.0  # seconds between SIGTERM and SIGKILL at teardown
HOST_TIMEOUT = 30.0  # for every host-side `ip` / `nft` call
SBIN_DIRS = ("/usr/local/sbin", "/usr/sbin", "/sbin")
NAT_MODES = {"masquerade": "masquerade", "random": "masquerade random", "fully-random": "masquerade fully-random"}

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,31}$")
_PREFIX_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,39}$")


class LabError(RuntimeError):
    """The lab could not be built or used as asked."""


class CommandError(LabError, subprocess.CalledProcessError):
    """A command run with check=True exited non-zero; says what ran and what it printed."""

    def __init__(self, returncode: int, cmd: list[str], stdout: str | None, stderr: str | None):
        subprocess.CalledProcessError.__init__(self, returncode, cmd, stdout, stderr)

    def __str__(self) -> str:
        def tail(text: str | None) -> str:
            text = text or ""
            return text if len(text) <= 4000 else "...\n" + text[-4000:]

        return (
            f"command `{shlex.join(self.cmd)}` exited with {self.returncode}\n"
            f"--- stdout ---\n{tail(self.stdout)}\n--- stderr ---\n{tail(self.stderr)}"
        )


# --------------------------------------------------------------------------- helpers


def find_tool(name: str) -> str | None:
    """Absolute path of a tool, also looking in the sbin directories a non-login PATH lacks."""
    path = os.pathsep.join([os.environ.get("PATH", ""), *SBIN_DIRS])
    return shutil.which(name, path=path)


def _tool(name: str) -> str:
    found = find_tool(name)
    if found is None:
        raise LabError(f"`{name}` not found; run tools/setup.sh (needs iproute2 and nftables)")
    return found


def clean_environment() -> dict[str, str]:
    """The environment daemons in the lab start with.

    os.environ without any *_proxy / *_PROXY variable and without SSH_AUTH_SOCK (a lab
    node must not reach the developer's agent), PATH with the project's .venv/bin first
    and the sbin directories present, and PYTHONUNBUFFERED=1 so logs are readable live.
    """
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.lower().endswith("_proxy") and k != "SSH_AUTH_SOCK"
    }
    parts = [str(PROJECT_ROOT / ".venv" / "bin")]
    for part in [*env.get("PATH", "/usr/local/bin:/usr/bin:/bin").split(os.pathsep), *SBIN_DIRS]:
        if part and part not in parts:
            parts.append(part)
    env["PATH"] = os.pathsep.join(parts)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def _host(*argv: str, check: bool = True, input: str | None = None) -> subprocess.CompletedProcess:
    """Run a host-side command (`ip ...`, `nft ...`), bounded in time."""
    cmd = [str(a) for a in argv]
    proc = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        input=input,
        stdin=subprocess.DEVNULL if input is None else None,
        timeout=HOST_TIMEOUT,
    )
    if check and proc.returncode != 0:
        raise CommandError(proc.returncode, cmd, proc.stdout, proc.stderr)
    return proc


def _alive(pid: int) -> bool:
    """True while the process exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    state = stat[stat.rfind(b")") + 2 : stat.rfind(b")") + 3]
    return state not in (b"Z", b"X", b"x")


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _signal_pid(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _netns_list() -> list[str]:
    proc = _host(_tool("ip"), "netns", "list", check=False)
    return [line.split()[0] for line in proc.stdout.splitlines() if line.strip()]


def _netns_pids(netns: str) -> list[int]:
    proc = _host(_tool("ip"), "netns", "pids", netns, check=False)
    me = os.getpid()
    return [int(p) for p in proc.stdout.split() if p.isdigit() and int(p) not in (me, 1)]


def _kill_pids(pids: list[int], grace: float = TERM_GRACE) -> None:
    """SIGTERM, wait up to `grace` seconds for all, SIGKILL the rest."""
    for pid in pids:
        _signal_pid(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.05)
    for pid in pids:
        if _alive(pid):
            _signal_pid(pid, signal.SIGKILL)


def _delete_netns(netns: str) -> bool:
    """Kill what lives in the namespace, then delete it. True if it existed."""
    if netns not in _netns_list():
        return False
    _kill_pids(_netns_pids(netns))
    _host(_tool("ip"), "netns", "del", netns, check=False)
    return True


def _nft_table_name(kind: str, owner: str) -> str:
    return f"lab_{kind}_{owner}".replace("-", "_")


def _replace_table(family: str, table: str, body: list[str]) -> str:
    """An nft script that atomically replaces (or, with no body, deletes) one table.

    nft 1.0.6 has no `destroy`; declaring the table first makes the delete idempotent.
    """
    lines = [f"table {family} {table} {{}}", f"delete table {family} {table}"]
    if body:
        lines += [f"table {family} {table} {{", *body, "}"]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- namespaces


class Netns:
    """Something with its own network namespace in the lab: a node or a switch."""

    def __init__(self, lab: "Lab", name: str):
        self.lab = lab
        self.name = name
        self.netns = f"{lab.prefix}{name}"

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} netns={self.netns}>"

    def run(
        self,
        *argv: str,
        check: bool = True,
        timeout: float = 30,
        env: dict[str, str] | None = None,
        input: str | None = None,
    ) -> subprocess.CompletedProcess:
        """Run argv inside this namespace and wait for it; text mode, output captured.

        env defaults to clean_environment() (a given env is used as the whole
        environment). On timeout the whole process group is killed and
        subprocess.TimeoutExpired is raised; with check=True a non-zero exit raises
        CommandError (a CalledProcessError) naming the command, code, stdout and stderr.
        """
        cmd = [self.lab._ip, "netns", "exec", self.netns, *map(str, argv)]
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=clean_environment() if env is None else env,
            start_new_session=True,
        )
        try:
            out, err = proc.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired:
            _signal_group(proc.pid, signal.SIGKILL)
            try:
                out, err = proc.communicate(timeout=5)
            except subprocess.TimeoutExpired:  # a grandchild in another group holds the pipes
                out, err = "", ""
            proc.kill()
            proc.wait()
            raise subprocess.TimeoutExpired(cmd, timeout, out, err) from None
        except BaseException:
            _signal_group(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
        if check and proc.returncode != 0:
            raise CommandError(proc.returncode, cmd, out, err)
        return subprocess.CompletedProcess(cmd, proc.returncode, out, err)

    def popen(self, *argv: str, env: dict[str, str] | None = None, log_name: str | None = None) -> subprocess.Popen:
        """Start a long-running process in this namespace; stdout+stderr go to its log.

        The log is {workdir}/{name}.{log_name}.log; log_name defaults to the program's
        base name (made unique per node); an explicit log_name that exists is appended
        to. The process is killed (SIGTERM to its process group, SIGKILL after 5 s) at
        cleanup.
        """
        if not argv:
            raise ValueError("popen needs a command")
        if log_name is None:
            base = re.sub(r"[^A-Za-z0-9_.-]", "_", Path(str(argv[0])).name) or "proc"
            log_name, n = base, 1
            while self._log_path(log_name).exists():
                n += 1
                log_name = f"{base}-{n}"
        elif not re.fullmatch(r"[A-Za-z0-9_.-]+", log_name):
            raise ValueError(f"log_name must be a plain file name part, not {log_name!r}")
        cmd = [self.lab._ip, "netns", "exec", self.netns, *map(str, argv)]
        with open(self._log_path(log_name), "ab") as log:
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=clean_environment() if env is None else env,
                start_new_session=True,
            )
        proc.log_name = log_name  # type: ignore[attr-defined]
        self.lab._procs.append(proc)
        return proc

    def log(self, log_name: str) -> str:
        """Contents of a popen log so far ("" if it does not exist yet)."""
        try:
            return self._log_path(log_name).read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_for_log(self, log_name: str, pattern: str, timeout: float = 10.0) -> str:
        """Wait until the log matches the regex `pattern`; return the log. LabError on timeout."""
        deadline = time.monotonic() + timeout
        regex = re.compile(pattern)
        while True:
            text = self.log(log_name)
            if regex.search(text):
                return text
            if time.monotonic() >= deadline:
                raise LabError(
                    f"{self.name}: no /{pattern}/ in log {log_name!r} after {timeout}s; log:\n{text[-4000:]}"
                )
            time.sleep(0.05)

    def nft(self, ruleset: str) -> None:
        """Apply an nft script inside this namespace (`nft -f -`)."""
        self.run("nft", "-f", "-", input=ruleset)

    def _log_path(self, log_name: str) -> Path:
        return Path(self.lab.workdir) / f"{self.name}.{log_name}.log"


class Switch(Netns):
    """An L2 segment: bridge `br0` in its own namespace. Nodes attach with Lab.connect."""

    bridge = "br0"

    def __init__(self, lab: "Lab", name: str, subnet: str):
        super().__init__(lab, name)
        self.subnet = ipaddress.ip_network(subnet)
        self.gateway: str | None = None  # set when a router serves this segment
        self._next_port = 0
        self._used: set[ipaddress._BaseAddress] = set()

    def _allocate(self, address: str | None) -> ipaddress._BaseAddress:
        if address is not None:
            addr = ipaddress.ip_interface(address).ip
            if addr not in self.subnet:
                raise LabError(f"{address} is not in switch {self.name}'s subnet {self.subnet}")
            if addr in self._used:
                raise LabError(f"{address} is already used on switch {self.name}")
        else:
            addr = next((a for a in self.subnet.hosts() if a not in self._used), None)
            if addr is None:
                raise LabError(f"switch {self.name}: subnet {self.subnet} is full")
        self._used.add(addr)
        return addr


class Node(Netns):
    """A host: its own namespace with lo up and underlay interfaces eth0, eth1, ..."""

    def __init__(self, lab: "Lab", name: str):
        super().__init__(lab, name)
        self.state_dir = str(Path(lab.workdir) / name)
        self.addresses: list[str] = []
        self.interfaces: list[str] = []
        self.links: list[tuple[Switch, str, str]] = []  # (switch, switch port, our ifname)
        self._loss = 0
        self._udp_blocked: set[int | None] = set()  # None: all UDP

    def block_udp(self, port: int | None = None) -> None:
        """Drop UDP to and from this node on the wire (all UDP, or only UDP with this
        source or destination port). Cumulative until unblock()."""
        if port is not None and not (isinstance(port, int) and 0 < port < 65536):
            raise ValueError(f"bad UDP port {port!r}")
        self._udp_blocked.add(port)
        self._apply_faults()

    def unblock(self) -> None:
        """Remove every block_udp rule of this node."""
        self._udp_blocked.clear()
        self._apply_faults()

    def set_loss(self, percent: int) -> None:
        """Drop `percent` % of frames into and out of this node, independently per
        direction (nft numgen); 0 removes the loss."""
        if not (isinstance(percent, int) and 0 <= percent <= 100):
            raise ValueError(f"loss must be an int percentage 0..100, not {percent!r}")
        self._loss = percent
        self._apply_faults()

    def set_default_route(self, via: str) -> None:
        family = "-6" if ipaddress.ip_address(via).version == 6 else "-4"
        self.run("ip", family, "route", "replace", "default", "via", via)

    def _apply_faults(self) -> None:
        by_switch: dict[str, tuple[Switch, list[str]]] = {}
        for switch, port, _ in self.links:
            by_switch.setdefault(switch.name, (switch, []))[1].append(port)
        for switch, ports in by_switch.values():
            loss: list[str] = []
            block: list[str] = []
            for port in ports:
                for direction in ("iifname", "oifname"):
                    if self._loss:  # numgen yields 0..99, so 100 % is a plain drop
                        chance = "" if self._loss == 100 else f" numgen random mod 100 < {self._loss}"
                        loss.append(f"    {direction} \"{port}\"{chance} drop")
                    if None in self._udp_blocked:
                        block.append(f"    {direction} \"{port}\" meta l4proto udp drop")
                    else:
                        for udp_port in sorted(p for p in self._udp_blocked if p is not None):
                            block.append(f"    {direction} \"{port}\" udp dport {udp_port} drop")
                            block.append(f"    {direction} \"{port}\" udp sport {udp_port} drop")
            script = ""
            for kind, rules, priority in (("loss", loss, -200), ("block", block, -100)):
                body = [
                    "  chain ports {",
                    f"    type filter hook forward priority {priority}; policy accept;",
                    *rules,
                    "  }",
                ] if rules else []
                script += _replace_table("bridge", _nft_table_name(kind, self.name), body)
            switch.nft(script)


# --------------------------------------------------------------------------- the lab

_LIVE: set["Lab"] = set()
_SIGNAL_LOCK = threading.Lock()
_PREV_SIGTERM: object = None
_SIGTERM_INSTALLED = False


def _cleanup_all() -> None:
    for lab in list(_LIVE):
        lab.cleanup()


def _on_sigterm(signum: int, frame: object) -> None:
    _cleanup_all()
    prev = _PREV_SIGTERM
    signal.signal(signal.SIGTERM, prev if prev is not None else signal.SIG_DFL)  # type: ignore[arg-type]
    if callable(prev):
        prev(signum, frame)
    elif prev != signal.SIG_IGN:
        os.kill(os.getpid(), signal.SIGTERM)  # die of SIGTERM as we would have


def _install_handlers() -> None:
    global _PREV_SIGTERM, _SIGTERM_INSTALLED
    with _SIGNAL_LOCK:
        if _SIGTERM_INSTALLED or threading.current_thread() is not threading.main_thread():
            return
        _PREV_SIGTERM = signal.getsignal(signal.SIGTERM)
        signal.signal(signal.SIGTERM, _on_sigterm)
        _SIGTERM_INSTALLED = True


atexit.register(_cleanup_all)


class Lab:
    """A set of namespaces joined by veth pairs; a context manager that always tears down."""

    def __init__(self, prefix: str | None = None, workdir: str | None = None, keep: bool = False):
        """prefix: namespace name prefix, default "tml<5 hex>-". workdir: directory for
        state dirs and logs, default a new temp dir; it is removed at cleanup only if the
        lab created it and keep is False."""
        self._ip = _tool("ip")
        _tool("nft")
        self.prefix = prefix if prefix is not None else f"tml{secrets.token_hex(3)[:5]}-"
        if not _PREFIX_RE.fullmatch(self.prefix):
            raise ValueError(f"bad lab prefix {self.prefix!r}")
        self.keep = keep
        self.nodes: dict[str, Node] = {}
        self.switches: dict[str, Switch] = {}
        self._procs: list[subprocess.Popen] = []
        self._namespaces: list[str] = []
        self._lock_fd: int | None = None
        self._own_workdir = workdir is None
        self._lock_prefix()
        try:
            if workdir is None:
                self.workdir = tempfile.mkdtemp(prefix=f"{WORKDIR_PREFIX}{self.prefix}")
            else:
                os.makedirs(workdir, exist_ok=True)
                self.workdir = str(Path(workdir).resolve())
            os.write(self._lock_fd, f"{os.getpid()}\n{self.workdir if self._own_workdir else ''}\n".encode())
        except BaseException:
            self._unlock_prefix()
            raise
        _LIVE.add(self)
        _install_handlers()

    def __repr__(self) -> str:
        return f"<Lab prefix={self.prefix!r} workdir={self.workdir!r}>"

    def __enter__(self) -> "Lab":
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

    # -- building

    def add_node(self, name: str) -> Node:
        """A new namespace with lo up and a state dir {workdir}/{name}."""
        node = Node(self, self._claim(name))
        self._add_netns(node.netns)
        os.makedirs(node.state_dir, exist_ok=True)
        self.nodes[name] = node
        return node

    def add_switch(self, name: str, subnet: str = "192.0.2.0/24") -> Switch:
        """An L2 segment: bridge br0 in its own namespace; subnet must be a documentation range."""
        net = ipaddress.ip_network(subnet)
        if not any(net.version == d.version and net.subnet_of(d) for d in DOC_NETWORKS):
            raise LabError(f"subnet {subnet} is outside the documentation ranges the lab may use")
        for other in self.switches.values():
            if other.subnet.overlaps(net):
                raise LabError(f"subnet {subnet} overlaps switch {other.name}'s {other.subnet}")
        switch = Switch(self, self._claim(name), subnet)
        self._add_netns(switch.netns)
        ip = self._ip
        _host(ip, "-n", switch.netns, "link", "add", switch.bridge, "type", "bridge")
        _host(ip, "-n", switch.netns, "link", "set", switch.bridge, "up")
        self.switches[name] = switch
        return switch

    def connect(self, node: Node, switch: Switch, address: str | None = None) -> str:
        """Join node to switch with a veth pair (node side eth<N>); give it `address` or the
        next free one of the switch's subnet; return the address without prefix length.
        If a router serves the switch and the node has no default route, route via it."""
        addr = switch._allocate(address)
        ifname = f"eth{len(node.interfaces)}"
        port = f"p{switch._next_port}"
        switch._next_port += 1
        ip = self._ip
        _host(ip, "-n", node.netns, "link", "add", ifname, "type", "veth", "peer", "name", port, "netns", switch.netns)
        _host(ip, "-n", switch.netns, "link", "set", port, "master", switch.bridge, "up")
        cidr = f"{addr}/{switch.subnet.prefixlen}"
        extra = ["nodad"] if addr.version == 6 else []
        _host(ip, "-n", node.netns, "addr", "add", cidr, "dev", ifname, *extra)
        _host(ip, "-n", node.netns, "link", "set", ifname, "up")
        node.interfaces.append(ifname)
        node.addresses.append(str(addr))
        node.links.append((switch, port, ifname))
        if node._loss or node._udp_blocked:
            node._apply_faults()
        if switch.gateway and switch.gateway not in node.addresses and not self._has_default_route(node, addr.version):
            node.set_default_route(switch.gateway)
        return str(addr)

    def add_router(self, name: str, outside: Switch, inside: Switch, nat: str | None = "masquerade") -> Node:
        """A node on both switches (eth0 outside, eth1 inside) forwarding between them,
        NATing towards the outside unless nat is None. It becomes the inside switch's
        gateway: nodes on it (now or later) without a default route get one via it."""
        router = self.add_node(name)
        self.connect(router, outside)
        gateway = self.connect(router, inside)
        router.run("sysctl", "-qw", "net.ipv4.ip_forward=1")
        router.run("sysctl", "-qw", "net.ipv6.conf.all.forwarding=1", check=False)  # absent without IPv6
        if nat is not None:
            self.nat(router, outside, nat)
        inside.gateway = gateway
        version = ipaddress.ip_address(gateway).version
        for node in self.nodes.values():
            if node is router or not any(sw is inside for sw, _, _ in node.links):
                continue
            if not self._has_default_route(node, version):
                node.set_default_route(gateway)
        return router

    def nat(self, router: Node, outside: Switch, mode: str = "masquerade") -> None:
        """Masquerade what `router` forwards out to `outside`, and drop new connections
        coming in from it. mode: "masquerade" (port-restricted cone), "random" or
        "fully-random" (symmetric)."""
        if mode not in NAT_MODES:
            raise ValueError(f"NAT mode must be one of {sorted(NAT_MODES)}, not {mode!r}")
        ifnames = [ifn for sw, _, ifn in router.links if sw is outside]
        if not ifnames:
            raise LabError(f"router {router.name} is not connected to switch {outside.name}")
        out = ", ".join(f'"{i}"' for i in ifnames)
        body = [
            "  chain postrouting {",
            "    type nat hook postrouting priority srcnat; policy accept;",
            f"    oifname {{ {out} }} {NAT_MODES[mode]}",
            "  }",
            "  chain forward {",
            "    type filter hook forward priority filter; policy accept;",
            "    ct state established,related accept",
            f"    iifname {{ {out} }} drop",
            "  }",
        ]
        router.nft(_replace_table("inet", "lab_nat", body))

    # -- teardown

    def cleanup(self) -> None:
        """Kill the lab's processes, delete its namespaces and (unless keep) its workdir.
        Never raises; safe to call again."""
        try:
            self._stop_processes()
        except Exception as e:  # noqa: BLE001 - teardown must go on
            print(f"lab {self.prefix}: stopping processes: {e}", file=sys.stderr)
        for netns in reversed(list(self._namespaces)):
            try:
                _delete_netns(netns)
                self._namespaces.remove(netns)
            except Exception as e:  # noqa: BLE001
                print(f"lab {self.prefix}: deleting netns {netns}: {e}", file=sys.stderr)
        if self._own_workdir and not self.keep:
            shutil.rmtree(self.workdir, ignore_errors=True)
        self._unlock_prefix()
        _LIVE.discard(self)

    def _stop_processes(self) -> None:
        procs, self._procs = self._procs, []
        for proc in procs:
            _signal_group(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + TERM_GRACE
        for proc in procs:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for proc in procs:
            _signal_group(proc.pid, signal.SIGKILL)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                print(f"lab {self.prefix}: pid {proc.pid} survived SIGKILL", file=sys.stderr)

    # -- internals

    def _claim(self, name: str) -> str:
        if self._lock_fd is None:
            raise LabError("this lab has been cleaned up")
        if not _NAME_RE.fullmatch(name):
            raise ValueError(f"bad lab name {name!r}: letters, digits, '-' and '_', at most 32")
        if name in self.nodes or name in self.switches:
            raise LabError(f"name {name!r} is already used in this lab")
        return name

    def _add_netns(self, netns: str) -> None:
        _host(self._ip, "netns", "add", netns)
        self._namespaces.append(netns)
        _host(self._ip, "-n", netns, "link", "set", "lo", "up")

    def _has_default_route(self, node: Node, version: int) -> bool:
        out = _host(self._ip, f"-{version}", "-n", node.netns, "route", "show", "default").stdout
        return bool(out.strip())

    def _lock_prefix(self) -> None:
        LOCK_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
        fd = os.open(LOCK_DIR / f"{self.prefix}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise LabError(f"lab prefix {self.prefix!r} is in use by a running lab") from None
        os.ftruncate(fd, 0)
        self._lock_fd = fd

    def _unlock_prefix(self) -> None:
        if self._lock_fd is None:
            return
        try:
            os.unlink(LOCK_DIR / f"{self.prefix}.lock")
        except OSError:
            pass
        os.close(self._lock_fd)
        self._lock_fd = None


# --------------------------------------------------------------------------- leftovers


def _live_prefixes() -> set[str]:
    """Prefixes whose lock is held: labs still running (in any process)."""
    live = set()
    if not LOCK_DIR.is_dir():
        return live
    for lock in LOCK_DIR.glob("*.lock"):
        try:
            fd = os.open(lock, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            live.add(lock.name[: -len(".lock")])
        finally:
            os.close(fd)
    return live


def cleanup_leftovers(prefix: str = "tml", force: bool = False) -> list[str]:
    """Remove what crashed runs left: namespaces whose names start with `prefix` (and the
    processes in them), plus their temp workdirs and lock files. Labs still running in
    some process are left alone unless force. Returns what was removed. Never raises."""
    removed: list[str] = []
    try:
        live = set() if force else _live_prefixes()

        def is_live(name: str) -> bool:
            return any(name.startswith(p) for p in live)

        for netns in _netns_list():
            if netns.startswith(prefix) and not is_live(netns):
                pids = _netns_pids(netns)
                _kill_pids(pids)
                _host(_tool("ip"), "netns", "del", netns, check=False)
                removed.append(f"netns {netns}" + (f" (killed pids {' '.join(map(str, pids))})" if pids else ""))
        tmp = Path(tempfile.gettempdir()).resolve()
        for lock in sorted(LOCK_DIR.glob(f"{glob_escape(prefix)}*.lock")) if LOCK_DIR.is_dir() else []:
            lab_prefix = lock.name[: -len(".lock")]
            if is_live(lab_prefix):
                continue
            lines = lock.read_text(errors="replace").splitlines()
            workdir = Path(lines[1]).resolve() if len(lines) > 1 and lines[1] else None
            if workdir and workdir.parent == tmp and workdir.name.startswith(WORKDIR_PREFIX) and workdir.is_dir():
                shutil.rmtree(workdir, ignore_errors=True)
                removed.append(f"workdir {workdir}")
            lock.unlink(missing_ok=True)
    except Exception as e:  # noqa: BLE001 - never raises
        print(f"cleanup_leftovers: {e}", file=sys.stderr)
    return removed


def glob_escape(text: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.lab", description=__doc__.splitlines()[0])
    parser.add_argument("--cleanup", action="store_true", help="remove namespaces and workdirs left by crashed lab runs")
    parser.add_argument("--prefix", default="tml", help="namespace name prefix to clean (default: tml)")
    parser.add_argument("--force", action="store_true", help="also remove labs that are still running")
    args = parser.parse_args(argv)
    if not args.cleanup:
        parser.print_help()
        return 2
    removed = cleanup_leftovers(args.prefix, force=args.force)
    for item in removed:
        print(f"removed {item}")
    if not removed:
        print(f"nothing left over with prefix {args.prefix!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
