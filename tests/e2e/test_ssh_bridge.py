"""The SSH rung through Debian's real sshd and its forced command, in network namespaces.

Layout of the frame and `restrict` tests: sshd runs in namespace `srv` (192.0.2.1:2222)
with a temp config and host key; a dialling node (or the real OpenSSH client) runs in
namespace `cli` (192.0.2.2) as a subprocess; the daemon's end of the bridge (an SshRung
with its bridge socket) runs in this test process. sshd runs the real
`.venv/bin/tunnelmesh ssh-bridge` as a per-run system account that `setup_account`
makes and the finalizer removes.

The whole-session test runs real daemons instead (`tools.mesh.build_network`: hub, a,
b): b's sshd listens on port 22 in b's namespace, and between a and b nothing passes
but TCP to that port, so a's session with b can only run through sshd, its forced
command and b's bridge socket.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import pwd
import secrets
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import asyncssh
import pytest

from tests.conftest import unavailable
from tests.links import Directory, new_identity, public_key_text, write_key
from tests.support.wait import wait_listening
from tools.lab import PROJECT_ROOT, Lab, Node, _replace_table, clean_environment
from tools.mesh import TUNNELMESH as TUNNELMESH_MODULE
from tools.mesh import MeshNode, build_network, diagnostics, rung_of, wait_for_handshakes
from tunnelmesh.control_client import request
from tunnelmesh.identity import load_identity_file
from tunnelmesh.links import Link
from tunnelmesh.links.bridge import setup_account, write_authorized_keys
from tunnelmesh.links.ssh import SshRung
from tunnelmesh.paths import resolve_paths

SSHD = "/usr/sbin/sshd"
SSHD_PORT = 2222
TUNNELMESH = PROJECT_ROOT / ".venv" / "bin" / "tunnelmesh"
MESSAGES = 20

# The dialling node: dial the bridge target, send MESSAGES frames, wait for the echoes,
# print one JSON line. Bounded: the whole run is under 20 s.
CLIENT = r"""
import asyncio, json, sys
from tunnelmesh.identity import load_identity_file
from tunnelmesh.links import LinkError
from tunnelmesh.links.ssh import SshRung, SshTarget

key_file, host, port, host_key, user, peer_hex, count = sys.argv[1:]
peer = bytes.fromhex(peer_hex)

class Directory:
    def member_by_ssh_key(self, key): return None
    def is_member(self, wg): return wg == peer
    def targets(self, wg): return [SshTarget(host, int(port), host_key, user, "bridge")] if wg == peer else []

class Sink:
    def __init__(self): self.got, self.event = [], asyncio.Event()
    def link_up(self, link): pass
    def link_down(self, link, reason): self.event.set()
    def receive(self, link, message): self.got.append(bytes(message).decode()); self.event.set()

async def main():
    identity = await load_identity_file(key_file)
    sink = Sink()
    rung = SshRung(identity=identity, host_key=None, port=None, directory=Directory(), sink=sink)
    try:
        link = await rung.dial(peer)
    except LinkError as exc:
        return {"error": str(exc)}
    for i in range(int(count)):
        link.send(f"ping {i}".encode())
    async with asyncio.timeout(15):
        while len(sink.got) < int(count) and not link.closed:
            sink.event.clear()
            await sink.event.wait()
    result = {"description": link.description, "got": sink.got}
    await rung.close()
    return result

print(json.dumps(asyncio.run(main())), flush=True)
"""


class EchoSink:
    """The daemon's data path, reduced to: answer every "ping N" with "pong N"."""

    def __init__(self) -> None:
        self.ups: list[Link] = []
        self.downs: list[str] = []

    def link_up(self, link: Link) -> None:
        self.ups.append(link)

    def link_down(self, link: Link, reason: str) -> None:
        self.downs.append(reason)

    def receive(self, link: Link, message: bytes | bytearray | memoryview) -> None:
        link.send(b"pong" + bytes(message)[4:])


def remove_account(user: str) -> None:
    """`userdel --remove`, retried for a few seconds while a process of the account (an
    sshd session child that is still exiting) holds it; fails the test if it stays."""
    deadline = time.monotonic() + 10
    while True:
        done = subprocess.run(["userdel", "--remove", user], capture_output=True, text=True, timeout=30, check=False,
                              env={"PATH": "/usr/sbin:/sbin:/usr/bin:/bin"})
        try:
            pwd.getpwnam(user)
        except KeyError:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"cannot remove the test's account {user}: {done.stderr.strip()}")
        time.sleep(0.5)


@pytest.fixture
def bridge_account(require_root: None) -> Iterator[tuple[str, Path]]:
    """A per-run system account made by `setup_account`, and the state directory it
    was given access to; both removed afterwards whatever happens. Ask for it before
    `lab`, so the lab (sshd and what runs as this account) is torn down first."""
    for tool in ("useradd", "userdel", "usermod"):
        if shutil.which(tool, path="/usr/sbin:/sbin:/usr/bin") is None:
            unavailable(f"needs {tool} (passwd package)")
    if not os.access(SSHD, os.X_OK):
        unavailable("needs Debian's openssh-server (/usr/sbin/sshd; run tools/setup.sh)")
    user = f"tmbr{secrets.token_hex(4)}"
    state_dir = Path(tempfile.mkdtemp(prefix="tunnelmesh-bridge-"))
    try:
        setup_account(user, state_dir)
        yield user, state_dir
    finally:
        try:
            remove_account(user)
        finally:
            shutil.rmtree(state_dir, ignore_errors=True)


def _hidden_ancestor(path: Path) -> tuple[Path, str] | None:
    """The first directory on `path` that other users cannot search, and the name under
    it that the path goes through: e.g. (/root, ".pyenv") for a pyenv Python in /root."""
    for parent in reversed(path.parents):
        if parent != path.parents[-1] and not parent.stat().st_mode & stat.S_IXOTH:
            return parent, path.relative_to(parent).parts[0]
    return None


def start_sshd(lab: Lab, node: Node, workdir: Path, user: str, port: int = SSHD_PORT) -> str:
    """Debian's sshd in `node`, in a mount namespace of its own (ip netns exec makes one)
    where /run is a fresh tmpfs holding /run/sshd, so the host's /run is never touched.
    If the venv's Python lives under a directory other users cannot search (pyenv in
    /root), that directory is likewise replaced there by a tmpfs exposing only the one
    entry the interpreter needs. Returns sshd's host key, "<type> <base64>"."""
    host_key = asyncssh.generate_private_key("ssh-ed25519")
    key_path = workdir / "ssh_host_ed25519_key"
    key_path.touch(mode=0o600)
    key_path.write_bytes(host_key.export_private_key("openssh"))
    config = workdir / "sshd_config"
    config.write_text(
        f"Port {port}\nListenAddress {node.addresses[0]}\nHostKey {key_path}\nPidFile none\n"
        "UsePAM no\nStrictModes yes\nPubkeyAuthentication yes\nPasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\nPermitRootLogin no\nAuthorizedKeysFile .ssh/authorized_keys\n"
        f"AllowUsers {user}\nLogLevel VERBOSE\n"
        "Subsystem sftp internal-sftp\n"  # as a stock sshd has one: the forced command must win over it
    )
    script = ["set -e", "mount -t tmpfs -o mode=0755,size=1m tmpfs /run", "mkdir -m 0755 /run/sshd"]
    hidden = _hidden_ancestor(Path(os.path.realpath(sys.executable)))
    if hidden is not None:
        top, name = hidden
        keep = workdir / "exposed"
        keep.mkdir(mode=0o700)
        script += [
            f"mount --bind {top / name} {keep}",
            f"mount -t tmpfs -o mode=0755,size=1m tmpfs {top}",
            f"mkdir {top / name}",
            f"mount --bind {keep} {top / name}",
        ]
    script.append(f"exec {SSHD} -D -e -f {config}")
    node.popen("sh", "-c", "\n".join(script), log_name="sshd")
    node.wait_for_log("sshd", r"Server listening on", timeout=10)
    return public_key_text(host_key)


def run_client(node: Node, key: Path, host: str, host_key: str, user: str, peer: bytes, log_name: str) -> subprocess.Popen:
    return node.popen(sys.executable, "-c", CLIENT, str(key), host, str(SSHD_PORT), host_key, user, peer.hex(),
                      str(MESSAGES), log_name=log_name)


async def wait_for_client(node: Node, proc: subprocess.Popen, log_name: str, timeout: float = 25.0) -> dict:
    deadline = time.monotonic() + timeout
    while proc.poll() is None:
        assert time.monotonic() < deadline, f"client did not finish; log:\n{node.log(log_name)}"
        await asyncio.sleep(0.05)
    lines = [ln for ln in node.log(log_name).splitlines() if ln.startswith("{")]
    assert proc.returncode == 0 and lines, f"client failed ({proc.returncode}); log:\n{node.log(log_name)}"
    return json.loads(lines[-1])


def test_frames_flow_through_sshd_and_the_forced_command(bridge_account: tuple[str, Path], lab: Lab) -> None:
    user, state_dir = bridge_account
    switch = lab.add_switch("lan", "192.0.2.0/24")
    srv, cli = lab.add_node("srv"), lab.add_node("cli")
    server_ip = lab.connect(srv, switch, "192.0.2.1")
    lab.connect(cli, switch, "192.0.2.2")
    workdir = Path(lab.workdir)

    daemon = new_identity()
    member_key, outsider_key = write_key(workdir / "member_id"), write_key(workdir / "outsider_id")
    member = asyncio.run(load_identity_file(member_key))
    write_authorized_keys(
        user,
        [(member.public.wg_public_key, member.public.ssh_public_key, "cli")],
        f"{TUNNELMESH} --state-dir {state_dir}",
    )
    lines = (Path(f"/var/lib/{user}") / ".ssh" / "authorized_keys").read_text().splitlines()
    assert lines[1].startswith(f'restrict,command="{TUNNELMESH} --state-dir {state_dir} ssh-bridge --peer ')
    sshd_key = start_sshd(lab, srv, workdir, user)

    account = pwd.getpwnam(user)
    sink = EchoSink()
    directory = Directory(members={member.public.ssh_public_key: member.public.wg_public_key})
    peer = daemon.public.wg_public_key

    async def main() -> tuple[dict, dict]:
        rung = SshRung(identity=daemon, host_key=None, port=None, directory=directory, sink=sink)
        await rung.start_bridge(resolve_paths(str(state_dir), None).bridge_socket, {account.pw_uid}, account.pw_gid)
        try:
            proc = run_client(cli, member_key, server_ip, sshd_key, user, peer, "member")
            good = await wait_for_client(cli, proc, "member")
            proc = run_client(cli, outsider_key, server_ip, sshd_key, user, peer, "outsider")
            bad = await wait_for_client(cli, proc, "outsider")
            return good, bad
        finally:
            await rung.close()

    good, bad = asyncio.run(main())
    assert good.get("got") == [f"pong {i}" for i in range(MESSAGES)], (good, srv.log("sshd")[-3000:])
    assert good["description"] == f"ssh-bridge {server_ip}:{SSHD_PORT}"
    assert len(sink.ups) == 1 and sink.ups[0].peer_key == member.public.wg_public_key
    assert sink.ups[0].description == "ssh-bridge (local sshd)"
    assert "refused our key" in bad.get("error", ""), bad
    assert len(sink.ups) == 1  # the outsider never reached the daemon


# --- A whole daemon session through sshd:22 and the forced command --------------------------

BRIDGE_PORT = 22  # sshd's port in b's namespace: the only way from a to b
TRANSFER = 4 << 20  # bytes sent a -> b inside the tunnel
STREAM_PORT = 5201

# A fixed amount of tools.stream's deterministic bytes to HOST:PORT, then wait for the
# receiver's close; prints {"bytes", "sha256"}. Bounded by the socket timeouts.
SENDER = r"""
import hashlib, json, socket, sys
from tools.stream import CHUNK, _block

host, port, total = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
digest, sent = hashlib.sha256(), 0
with socket.create_connection((host, port), timeout=30) as conn:
    conn.settimeout(60)
    for index in range(total // CHUNK):
        block = _block(index)
        conn.sendall(block)
        digest.update(block)
        sent += len(block)
    conn.shutdown(socket.SHUT_WR)
    conn.recv(1)
print(json.dumps({"bytes": sent, "sha256": digest.hexdigest()}), flush=True)
"""


@pytest.fixture
def bridge_user(require_root: None) -> Iterator[str]:
    """A fresh name for the bridge account that `tunnelmesh ssh-bridge --setup` makes in
    the test; the account and its home are removed afterwards whatever happens. Ask for
    it before `lab`, so the lab (sshd and the forced commands running as this account)
    is torn down first."""
    for tool in ("useradd", "userdel", "usermod"):
        if shutil.which(tool, path="/usr/sbin:/sbin:/usr/bin") is None:
            unavailable(f"needs {tool} (passwd package)")
    if not os.access(SSHD, os.X_OK) or not Path("/etc/ssh").is_dir():
        unavailable("needs Debian's openssh-server (/usr/sbin/sshd, /etc/ssh; run tools/setup.sh)")
    user = f"tmbr{secrets.token_hex(4)}"
    try:
        yield user
    finally:
        remove_account(user)


def only_tcp_22(member: MeshNode, other: MeshNode) -> None:
    """Inside `member`'s namespace: between it and `other` nothing passes but TCP to
    other's port 22 and its replies (so no UDP, no TCP to other's daemon on 2222, and
    `other` cannot dial `member`'s daemon either)."""
    body = [
        "  chain out {", "    type filter hook output priority 0; policy accept;",
        f"    ip daddr {other.underlay} tcp dport {BRIDGE_PORT} accept",
        f"    ip daddr {other.underlay} meta l4proto {{ tcp, udp }} drop", "  }",
        "  chain in {", "    type filter hook input priority 0; policy accept;",
        f"    ip saddr {other.underlay} tcp sport {BRIDGE_PORT} accept",
        f"    ip saddr {other.underlay} meta l4proto {{ tcp, udp }} drop", "  }",
    ]
    member.node.nft(_replace_table("inet", f"tm_only_ssh_{other.name}", body))


def up_with_sshd_host_key(member: MeshNode, host_key: str, workdir: Path) -> None:
    """`up --detach`, with the daemon (which attests /etc/ssh/ssh_host_ed25519_key.pub as
    the bridge's host key) seeing `host_key` there: a tmpfs over /etc/ssh in the mount
    namespace `ip netns exec` makes, which the detached daemon keeps. The host's /etc/ssh
    is never touched or read."""
    public = workdir / f"{member.name}.sshd_host_ed25519_key.pub"
    public.write_text(host_key + "\n")
    script = "\n".join([
        "set -e",
        "mount -t tmpfs -o mode=0755,size=1m tmpfs /etc/ssh",
        f"cp {shlex.quote(str(public))} /etc/ssh/ssh_host_ed25519_key.pub",
        f"exec {shlex.join([*TUNNELMESH_MODULE, '--state-dir', member.node.state_dir, 'up', '--detach'])}",
    ])
    member.node.run("sh", "-c", script, timeout=60)


def peer_status(member: MeshNode, peer: str) -> dict:
    return next(p for p in member.status()["peers"] if p["name"] == peer)


def test_a_daemon_session_runs_through_sshd_port_22_and_the_forced_command(bridge_user: str, lab: Lab) -> None:
    user = bridge_user
    mesh = build_network(lab, ["hub", "a", "b"], start=False)  # the hub (embedded coordinator) is up
    a, b = mesh["a"], mesh["b"]
    workdir = Path(lab.workdir)
    # The bridge account reaches b's state directory (setup makes that 0710 for its
    # group); the lab's own temp dir above it is 0700: let others search it, not list it.
    os.chmod(workdir, 0o711)
    try:
        setup = b.tm("ssh-bridge", "--setup", "--user", user).stdout
        assert f'ssh_bridge_user = "{user}"' in setup, setup
        account = pwd.getpwnam(user)
        sshd_dir = workdir / "b-sshd"
        sshd_dir.mkdir(mode=0o700)
        sshd_key = start_sshd(lab, b.node, sshd_dir, user, port=BRIDGE_PORT)
        b.append_config(f'\n[transports]\nssh_bridge_user = "{user}"\nssh_bridge_port = {BRIDGE_PORT}\n'
                        '\n[transports.peers.a]\nrungs = ["udp", "ssh"]\n')
        a.append_config('\n[transports.peers.b]\nrungs = ["udp", "ssh"]\n')  # no relay for this pair
        only_tcp_22(a, b)
        up_with_sshd_host_key(b, sshd_key, workdir)
        a.up()

        assert b.status()["node"]["transports"]["ssh"]["bridge"] == f"{b.node.state_dir}/bridge.sock"

        start = time.monotonic()
        wait_for_handshakes(mesh, timeout=90)
        session_up = time.monotonic() - start
        # b's daemon wrote the account's authorized_keys: one forced-command line per member.
        keys = (Path(account.pw_dir) / ".ssh" / "authorized_keys").read_text()
        for name in ("hub", "a"):
            assert any(line.startswith('restrict,command="') and " ssh-bridge --peer " in line
                       and line.endswith(f" tunnelmesh:{name}") for line in keys.splitlines()), keys
        to_b, to_a = peer_status(a, "b"), peer_status(b, "a")
        assert (to_b["path"]["rung"], to_a["path"]["rung"]) == ("ssh", "ssh"), diagnostics(mesh)
        # a dialled the bridge (sshd on 22), not b's daemon on 2222; b got it from its local sshd.
        assert to_b["path"]["endpoint"] == f"ssh-bridge {b.underlay}:{BRIDGE_PORT}", (to_b, diagnostics(mesh))
        assert to_a["path"]["endpoint"] == "ssh-bridge (local sshd)", (to_a, diagnostics(mesh))
        assert f"Accepted publickey for {user} from {a.underlay}" in b.node.log("sshd"), b.node.log("sshd")[-3000:]
        assert rung_of(a, "hub") == "udp" and rung_of(b, "hub") == "udp"  # the others keep their direct path

        # `tunnelmesh ping` (the daemon's own echo) answers on the SSH rung, via the bridge.
        pong = a.tm("ping", "b", "-c", "3", "--timeout", "5").stdout
        assert pong.count(f"pong from b via ssh-bridge {b.underlay}:{BRIDGE_PORT} in ") == 3, pong
        answer = request(resolve_paths(a.node.state_dir, None).control_socket, "ping", timeout=20, peer="b", wait=10)
        assert answer["ok"] and answer["answered_on"] == "ssh", answer

        # In-tunnel traffic: ICMP, then a few MB of TCP, intact.
        assert a.node.run("ping", "-c", "5", "-i", "0.2", "-W", "5", b.mesh_ip, check=False,
                          timeout=60).returncode == 0, diagnostics(mesh)
        received = workdir / "stream.received"
        env = {**clean_environment(), "PYTHONPATH": str(PROJECT_ROOT)}
        server = b.node.popen(sys.executable, "-m", "tools.stream", "serve", b.mesh_ip, str(STREAM_PORT),
                              str(received), env=env, log_name="stream-serve")
        wait_listening(b.node, STREAM_PORT)
        before = peer_status(a, "b")["tx_bytes"]
        start = time.monotonic()
        sent = json.loads(a.node.run(sys.executable, "-c", SENDER, b.mesh_ip, str(STREAM_PORT), str(TRANSFER),
                                     env=env, timeout=180).stdout)
        transfer_time = time.monotonic() - start
        assert server.wait(timeout=30) == 0, b.node.log("stream-serve")
        got = json.loads(received.read_text())
        assert got["error"] is None and sent["bytes"] == TRANSFER, (sent, got)
        assert (got["bytes"], got["sha256"]) == (sent["bytes"], sent["sha256"]), (sent, got)
        after = peer_status(a, "b")
        assert after["tx_bytes"] - before >= TRANSFER, (before, after)
        assert after["path"] == to_b["path"], (after, diagnostics(mesh))
        # The pair never left the SSH rung for another (UDP is cut, the relay off for it).
        for member, peer in ((a, "b"), (b, "a")):
            transitions = peer_status(member, peer)["transitions"]
            assert all(t["path"]["rung"] == "ssh" for t in transitions), (member.name, transitions)
        print(f"sessions up in {session_up:.1f} s; a -> b via {to_b['path']['endpoint']}, b -> a via {to_a['path']['endpoint']}; "
              f"{TRANSFER >> 20} MiB in {transfer_time:.1f} s through the bridge")
    finally:
        for member in mesh.values():
            member.down(check=False)


# --- `restrict` in the bridge account's authorized_keys, against the real OpenSSH client ----

TARGET_PORT = 7070  # a TCP service on the sshd machine's loopback: what a forwarding would reach
LOCAL_PORT = 7071  # -L's listener on the client
REMOTE_PORT = 7072  # what -R asks sshd to listen on

# The target: answers every connection with a greeting and logs it; bounded run time.
TARGET = r"""
import socket, sys, time
port, seconds = int(sys.argv[1]), float(sys.argv[2])
with socket.create_server(("127.0.0.1", port)) as server:
    server.settimeout(0.5)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            conn, peer = server.accept()
        except TimeoutError:
            continue
        with conn:
            conn.settimeout(2)
            try:
                data = conn.recv(4096)
                conn.sendall(b"target says hi")
            except OSError as exc:
                data = repr(exc).encode()
            print("accepted", peer, data, flush=True)
"""

# Connect to 127.0.0.1:PORT, send a line, print {"connected", "got", "error"} as JSON.
PROBE = r"""
import json, socket, sys
out = {"connected": False, "got": "", "error": None}
try:
    with socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=5) as conn:
        out["connected"] = True
        conn.settimeout(5)
        conn.sendall(b"hello\n")
        while len(out["got"]) < 4096 and (data := conn.recv(4096)):
            out["got"] += data.decode(errors="replace")
except OSError as exc:
    out["error"] = repr(exc)
print(json.dumps(out), flush=True)
"""


def ssh_command(key: Path, known_hosts: Path, user: str, host: str, *extra: str) -> list[str]:
    """The real OpenSSH client with no config but ours: only `key`, only the host key in
    `known_hosts`, never a prompt, bounded waits."""
    return [
        "ssh", "-F", "/dev/null", "-v", "-p", str(SSHD_PORT), "-i", str(key), "-o", "IdentitiesOnly=yes",
        "-o", "IdentityAgent=none", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
        "-o", f"UserKnownHostsFile={known_hosts}", "-o", "GlobalKnownHostsFile=/dev/null",
        "-o", "ConnectTimeout=10", "-o", "ServerAliveInterval=5", "-o", "ServerAliveCountMax=2",
        "-o", "ExitOnForwardFailure=yes", "-l", user, *extra, host,
    ]


def test_restrict_refuses_forwarding_and_commands_for_a_member_key(bridge_account: tuple[str, Path], lab: Lab) -> None:
    user, state_dir = bridge_account
    if shutil.which("ssh") is None:
        unavailable("needs the OpenSSH client (ssh; openssh-client)")
    switch = lab.add_switch("lan", "192.0.2.0/24")
    srv, cli = lab.add_node("srv"), lab.add_node("cli")
    server_ip = lab.connect(srv, switch, "192.0.2.1")
    lab.connect(cli, switch, "192.0.2.2")
    workdir = Path(lab.workdir)
    member_key = write_key(workdir / "member_id")
    member = asyncio.run(load_identity_file(member_key))
    write_authorized_keys(user, [(member.public.wg_public_key, member.public.ssh_public_key, "cli")],
                          f"{TUNNELMESH} --state-dir {state_dir}")
    sshd_key = start_sshd(lab, srv, workdir, user)
    known_hosts = workdir / "known_hosts"
    known_hosts.write_text(f"[{server_ip}]:{SSHD_PORT} {sshd_key}\n")
    ssh = functools.partial(ssh_command, member_key, known_hosts, user, server_ip)

    srv.popen(sys.executable, "-c", TARGET, str(TARGET_PORT), "120", log_name="target")
    wait_listening(srv, TARGET_PORT)
    # The target is reachable where sshd runs: a forwarding, if allowed, would get through.
    direct = json.loads(srv.run(sys.executable, "-c", PROBE, str(TARGET_PORT), timeout=30).stdout)
    assert direct["got"] == "target says hi", direct
    assert srv.log("target").count("accepted") == 1

    # A command, a subsystem, a command with a pty: each time sshd runs the forced command
    # instead (it fails, exit 1: no daemon serves this state directory), and a pty is refused.
    for n, extra in enumerate((["id"], ["-s", "sftp"], ["-tt", "id"]), 1):
        done = cli.run(*ssh(*extra[:-1]), extra[-1], check=False, timeout=30)
        output = done.stdout + done.stderr
        assert "Authenticated to" in done.stderr, (extra, done.stderr[-3000:])  # the key did log in
        assert "uid=" not in output, (extra, done.stdout, done.stderr[-3000:])
        assert srv.log("sshd").count("Starting session: forced-command (key-option)") == n, srv.log("sshd")[-3000:]
        if extra[0] == "id":  # (a subsystem's stderr is not sent; with -tt ssh may leave before it comes)
            assert "the tunnelmesh daemon is not running" in output, (extra, done.stdout, done.stderr[-3000:])
        if extra[0] == "-tt":
            assert "PTY allocation request failed" in done.stderr, (extra, done.stderr[-3000:])
        else:
            assert done.returncode == 1, (extra, done.returncode, done.stderr[-3000:])

    # -R: sshd refuses to listen; with ExitOnForwardFailure the client gives up at once.
    try:
        remote = cli.run(*ssh("-N", "-R", f"127.0.0.1:{REMOTE_PORT}:127.0.0.1:{TARGET_PORT}"), check=False, timeout=30)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"ssh -N -R stayed up for 30 s: sshd accepted the remote forwarding\n{exc.stderr}")
    assert "Authenticated to" in remote.stderr, remote.stderr[-3000:]
    assert remote.returncode != 0, remote
    assert f"remote port forwarding failed for listen port {REMOTE_PORT}" in remote.stderr, remote.stderr[-3000:]
    assert not srv.run("ss", "-Hltn", f"sport = :{REMOTE_PORT}").stdout.strip(), "sshd listens for -R"

    # -L: the client listens locally, but sshd refuses each channel to the target.
    local = cli.popen(*ssh("-N", "-L", f"127.0.0.1:{LOCAL_PORT}:127.0.0.1:{TARGET_PORT}"), log_name="ssh-L")
    try:
        cli.wait_for_log("ssh-L", r"Authenticated to", timeout=20)
        wait_listening(cli, LOCAL_PORT)
        through = json.loads(cli.run(sys.executable, "-c", PROBE, str(LOCAL_PORT), timeout=30).stdout)
        assert through["connected"], through  # ssh's own listener took it...
        assert "target says hi" not in through["got"], through  # ...and nothing came back from the target
        cli.wait_for_log("ssh-L", r"administratively prohibited", timeout=10)
        assert srv.log("target").count("accepted") == 1, srv.log("target")  # the target never saw a connection
    finally:
        local.terminate()
        local.wait(timeout=10)
