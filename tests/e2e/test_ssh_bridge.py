"""The SSH rung through Debian's real sshd and its forced command, in network namespaces.

Layout: sshd runs in namespace `srv` (192.0.2.1:2222) with a temp config and host key;
a dialling node runs in namespace `cli` (192.0.2.2) as a subprocess; the daemon's end of
the bridge (an SshRung with its bridge socket) runs in this test process. sshd runs the
real `.venv/bin/tunnelmesh ssh-bridge` as a per-run system account that
`setup_account` makes and the finalizer removes.
"""

from __future__ import annotations

import asyncio
import json
import os
import pwd
import secrets
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
from tools.lab import PROJECT_ROOT, Lab, Node
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


@pytest.fixture
def bridge_account(require_root: None) -> Iterator[tuple[str, Path]]:
    """A per-run system account made by `setup_account`, and the state directory it
    was given access to; both removed afterwards whatever happens."""
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
        subprocess.run(["userdel", "--remove", user], capture_output=True, timeout=30, check=False,
                       env={"PATH": "/usr/sbin:/sbin:/usr/bin:/bin"})
        shutil.rmtree(state_dir, ignore_errors=True)


def _hidden_ancestor(path: Path) -> tuple[Path, str] | None:
    """The first directory on `path` that other users cannot search, and the name under
    it that the path goes through: e.g. (/root, ".pyenv") for a pyenv Python in /root."""
    for parent in reversed(path.parents):
        if parent != path.parents[-1] and not parent.stat().st_mode & stat.S_IXOTH:
            return parent, path.relative_to(parent).parts[0]
    return None


def start_sshd(lab: Lab, node: Node, workdir: Path, user: str) -> str:
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
        f"Port {SSHD_PORT}\nListenAddress {node.addresses[0]}\nHostKey {key_path}\nPidFile none\n"
        "UsePAM no\nStrictModes yes\nPubkeyAuthentication yes\nPasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\nPermitRootLogin no\nAuthorizedKeysFile .ssh/authorized_keys\n"
        f"AllowUsers {user}\nLogLevel VERBOSE\n"
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


def test_frames_flow_through_sshd_and_the_forced_command(lab: Lab, bridge_account: tuple[str, Path]) -> None:
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
