"""`tunnelmesh ssh-config` against Debian's real sshd and OpenSSH client, in namespaces.

Two members (`tools.mesh.build_network`): a (admin, embedded coordinator) and b. b's
daemon attests the host key of an sshd that runs in b's namespace on b's mesh address
(`[transports] sshd_host_keys`: that sshd's own key file, never the host's /etc/ssh).
On a, `tunnelmesh ssh-config` writes known_hosts and the snippet; then `ssh -F snippet
-o BatchMode=yes b true` logs in with StrictHostKeyChecking=yes and no prompt, over the
mesh (sshd sees a's mesh address). sshd restarted with a new host key is refused
("Host key verification failed") until b attests the new key (b restarts) and ssh-config
runs again.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import asyncssh

from tests.conftest import unavailable
from tests.links import public_key_text
from tests.support.wait import wait_for
from tools.lab import Lab, Node, clean_environment, find_tool
from tools.mesh import MeshNode, build_network, diagnostics, wait_for_handshakes
from tunnelmesh.exports.ssh_config import network_tag

SSHD = "/usr/sbin/sshd"
SSH_PORT = 22


def write_key(path: Path, kind: str = "ssh-ed25519") -> str:
    """A new private key at `path` (0600) and its .pub beside it; returns "<type> <base64>"."""
    key = asyncssh.generate_private_key(kind)
    path.touch(mode=0o600)
    path.write_bytes(key.export_private_key("openssh"))
    public = public_key_text(key)
    Path(f"{path}.pub").write_text(public + " test\n")
    return public


def start_sshd(node: Node, workdir: Path, address: str, host_key: Path, log_name: str) -> subprocess.Popen:
    """sshd in `node` on `address`:22 with `host_key`, letting root in with the keys in
    workdir/authorized_keys. /run is a fresh tmpfs in the mount namespace `ip netns exec`
    makes (for /run/sshd), so the host's /run is never touched."""
    config = workdir / "sshd_config"
    config.write_text(
        f"Port {SSH_PORT}\nListenAddress {address}\nHostKey {host_key}\nPidFile none\nUsePAM no\n"
        f"StrictModes no\nPermitRootLogin prohibit-password\nAuthorizedKeysFile {workdir / 'authorized_keys'}\n"
        "PubkeyAuthentication yes\nPasswordAuthentication no\nKbdInteractiveAuthentication no\nLogLevel VERBOSE\n"
    )
    script = f"set -e\nmount -t tmpfs -o mode=0755,size=1m tmpfs /run\nmkdir -m 0755 /run/sshd\nexec {SSHD} -D -e -f {config}"
    proc = node.popen("sh", "-c", script, log_name=log_name)
    node.wait_for_log(log_name, r"Server listening on", timeout=10)
    return proc


def ssh_to(member: MeshNode, peer: str, snippet: Path, client_key: Path, home: Path) -> subprocess.CompletedProcess:
    """`ssh -F snippet -o BatchMode=yes <peer> true` in `member`'s namespace, as root."""
    env = {**clean_environment(), "HOME": str(home)}  # not root's own ~/.ssh
    return member.node.run("ssh", "-F", str(snippet), "-o", "BatchMode=yes", "-o", "ConnectTimeout=10",
                           "-o", "IdentitiesOnly=yes", "-i", str(client_key), "-l", "root", peer, "true",
                           check=False, timeout=60, env=env)


def wait_for_attested(member: MeshNode, peer: str, key: str, timeout: float = 30.0) -> dict:
    """`ssh-config --json` on `member` until `peer`'s known_hosts lines hold `key`."""
    def attested() -> dict | None:
        shown = json.loads(member.tm("ssh-config", "--json").stdout)
        lines = shown["known_hosts"]["text"].splitlines()
        return shown if f"{peer}.{network_tag(shown['network'])}.tunnelmesh {key}" in lines else None

    return wait_for(f"{peer}'s key {key[:40]}... in {member.name}'s ssh-config", attested, timeout,
                    lambda: diagnostics({member.name: member}), interval=0.5)


def test_ssh_reaches_the_peers_sshd_with_its_attested_key_and_refuses_a_changed_one(lab: Lab) -> None:
    if not os.access(SSHD, os.X_OK):
        unavailable("needs Debian's openssh-server (/usr/sbin/sshd; run tools/setup.sh)")
    if find_tool("ssh") is None:
        unavailable("needs OpenSSH's ssh (openssh-client)")
    mesh = build_network(lab, ["a", "b"], start=False)  # a (the coordinator) is up
    a, b = mesh["a"], mesh["b"]
    workdir = Path(lab.workdir)
    sshd_dir, out, home = workdir / "b-sshd", workdir / "a-ssh", workdir / "a-home"
    sshd_dir.mkdir(mode=0o700)
    home.mkdir(mode=0o700)
    host_key = sshd_dir / "ssh_host_ed25519_key"
    first_key = write_key(host_key)
    client_key = workdir / "client_id"
    (sshd_dir / "authorized_keys").write_text(write_key(client_key) + "\n")
    b.append_config(f'\n[transports]\nsshd_host_keys = ["{host_key}.pub"]\n')
    try:
        b.up()
        wait_for_handshakes(mesh, timeout=60)
        sshd = start_sshd(b.node, sshd_dir, b.mesh_ip, host_key, "sshd")

        shown = wait_for_attested(a, "b", first_key)
        assert shown["hosts"] == ["b"] and shown["left_out"] == {}, shown
        assert not out.exists()  # --json writes nothing
        written = a.tm("ssh-config", "--out", str(out))
        printed = written.stdout
        assert printed.splitlines()[-1] == f'Include "{out}/ssh_config"', printed
        # The lab's work directory is 0700 (mkdtemp): other users' ssh could not read the files; it says so.
        assert f"other users cannot read {workdir} (mode 0700)" in written.stderr, written.stderr
        snippet = out / "ssh_config"
        assert (out / "known_hosts").read_text() == shown["known_hosts"]["text"]
        assert f"HostName {b.mesh_ip}\n" in snippet.read_text()

        first = ssh_to(a, "b", snippet, client_key, home)
        assert first.returncode == 0, (first.stderr, b.node.log("sshd")[-3000:])
        # Over the mesh: sshd saw a's mesh address, and asked nothing (BatchMode, strict checking).
        assert f"Accepted publickey for root from {a.mesh_ip}" in b.node.log("sshd"), b.node.log("sshd")[-3000:]
        assert "Permanently added" not in first.stderr and not list(home.iterdir()), first.stderr

        # sshd gets a new host key; b's daemon still attests the old one: refused, not asked.
        sshd.terminate()
        sshd.wait(timeout=10)
        host_key.unlink()
        Path(f"{host_key}.pub").unlink()
        second_key = write_key(host_key)
        start_sshd(b.node, sshd_dir, b.mesh_ip, host_key, "sshd-2")
        refused = ssh_to(a, "b", snippet, client_key, home)
        assert refused.returncode == 255, (refused.returncode, refused.stderr)
        assert "Host key verification failed" in refused.stderr, refused.stderr
        assert "Accepted publickey" not in b.node.log("sshd-2"), b.node.log("sshd-2")[-3000:]

        # b restarts and attests the new key: ssh-config again, and ssh gets in.
        b.down()
        b.up()
        wait_for_handshakes(mesh, timeout=60)
        wait_for_attested(a, "b", second_key)
        a.tm("ssh-config", "--out", str(out))
        assert first_key not in (out / "known_hosts").read_text()
        again = ssh_to(a, "b", snippet, client_key, home)
        assert again.returncode == 0, (again.stderr, b.node.log("sshd-2")[-3000:])
    finally:
        for member in mesh.values():
            member.down(check=False)

