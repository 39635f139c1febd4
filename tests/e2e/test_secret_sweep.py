"""Secret sweep: a whole network's life at debug log level, then a search of everything
it wrote and showed for every secret it knows (issue 17, part 4).

The scenario: `init` (embedded coordinator), `invite` and `join`, a join by approval, a
member whose key is protected by a passphrase, the SSH and relay rungs in use,
`rotate-secret`, `revoke`, and errors provoked (a damaged token, a used one, a bad key
file, a wrong passphrase, an approval with the wrong fingerprint). Every daemon runs
with `--log-level debug`.

Searched: every log the lab and the daemons wrote (tracebacks included), the output
and errors of every command run, `status --json`, `status -v`, `peers --json`,
`events`, `show --wg`, `policy show`, `filter show`, `invites`, `pending`, and a dump
of the coordinator's SQLite database. Sought, in raw bytes, base64 (at every
alignment, so also inside a longer base64 text), base64url and hex: each node's SSH
private key (its seed, so also inside its key file's base64, and the file whole), the X25519 key derived from it,
every epoch's network secret and the PSK derived from it, the admin key's seed, every
invite's seed, and the passphrases. Session keys live only in the daemons' memory (no
test can learn them from outside): tests/unit/test_session_key_sweep.py seeks them in two
daemons run in one process.

`invite` prints a token, which holds the invite seed by design: that output is not
searched (the token itself is sought everywhere else). Nor is `show --show-secrets`,
whose purpose is to print the PSK.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tests.support.secret_search import encodings, search
from tools.lab import Lab, Node
from tools.mesh import (COORDINATOR_PORT, OPEN_POLICY, MeshNode, block_path, diagnostics, rung_of,
                        wait_for_handshakes)
from tunnelmesh.config.secret import read_network_secret
from tunnelmesh.identity import PASSPHRASE_ENV, load_identity_file
from tunnelmesh.membership.records import Token
from tunnelmesh.wireguard.crypto import derive_psk

pytestmark = pytest.mark.e2e


# --- The search -------------------------------------------------------------------------


def test_the_search_finds_a_secret_in_every_form_and_nothing_in_clean_text() -> None:
    secret = os.urandom(32)
    clean = b"2026-01-01 INFO peer b: session up via udp\n" + base64.b64encode(os.urandom(64)) + b"\n"
    assert search(clean, {"planted": secret}) == []
    for form, needle in encodings(secret).items():
        assert search(clean + b"x=" + needle + b"\n", {"planted": secret}), form
    for prefix in (b"", b"a", b"ab"):  # inside a longer encoded text, at every alignment
        for encode in (base64.b64encode, base64.urlsafe_b64encode):
            assert search(clean + encode(prefix + secret + b"tail"), {"planted": secret}), (prefix, encode)
    assert search(clean + json.dumps({"psk": secret.hex()}).encode(), {"planted": secret})


# --- The scenario -----------------------------------------------------------------------


class Sweep:
    """What the scenario knows that must never show (`secrets`) and what it must search
    (`outputs`: name -> text)."""

    def __init__(self) -> None:
        self.secrets: dict[str, bytes] = {}
        self.outputs: dict[str, bytes] = {}
        self.key_files: set[Path] = set()  # taken apart already

    def run(self, member: MeshNode, *args: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
        """A CLI command whose output and errors are searched."""
        proc = member.tm(*args, check=False, timeout=timeout)
        self.outputs[f"{member.name}: tunnelmesh {' '.join(args)}"] = (proc.stdout + proc.stderr).encode()
        if check:
            assert proc.returncode == 0, f"tunnelmesh {' '.join(args)}: {proc.stderr}"
        return proc

    def refused(self, member: MeshNode, *args: str) -> str:
        proc = self.run(member, *args, check=False)
        assert proc.returncode != 0, f"`tunnelmesh {' '.join(args)}` was accepted:\n{proc.stdout}"
        return proc.stderr

    def invite(self, admin: MeshNode, *args: str) -> str:
        """A token (its output is not searched: it is the token); its seed is a secret."""
        token = admin.tm("invite", *args).stdout.strip()
        self.secrets[f"invite seed {len(self.secrets)}"] = Token.parse(token).invite_seed
        self.secrets[f"token {len(self.secrets)}"] = token.encode()
        return token

    def private_key(self, what: str, key_file: Path, passphrase: str | None = None) -> None:
        """The private part of a key file (OpenSSH or PEM; Ed25519 or EC), and the file whole."""
        pem = key_file.read_bytes()
        self.key_files.add(key_file)
        password = passphrase.encode() if passphrase else None
        key = (serialization.load_ssh_private_key(pem, password) if b"OPENSSH PRIVATE KEY" in pem
               else serialization.load_pem_private_key(pem, password))
        if isinstance(key, Ed25519PrivateKey):
            self.secrets[what] = key.private_bytes_raw()
        elif isinstance(key, ec.EllipticCurvePrivateKey):
            self.secrets[what] = key.private_numbers().private_value.to_bytes(key.curve.key_size // 8, "big")
        else:
            raise AssertionError(f"{key_file}: a {type(key).__name__}, which the sweep does not take apart")
        self.secrets[f"{what} file"] = pem

    def private_key_files(self, member: MeshNode) -> None:
        """Every unencrypted private key file in the node's state directory: its identity
        key (--new-key), the SSH rung's host key, the embedded coordinator's TLS key."""
        for path in Path(member.node.state_dir).iterdir():
            if path.is_file() and path not in self.key_files and b"PRIVATE KEY-----" in path.read_bytes()[:100]:
                self.private_key(f"{member.name} {path.name}", path)

    def identity(self, member: MeshNode, key_file: str, passphrase: str | None = None) -> None:
        self.private_key(f"{member.name} SSH identity key", Path(key_file), passphrase)
        identity = asyncio.run(load_identity_file(key_file, passphrase=passphrase))
        self.secrets[f"{member.name} X25519 private key"] = identity.static_private

    def network_secret(self, member: MeshNode) -> bytes | None:
        try:
            secret = read_network_secret(Path(member.node.state_dir) / "network.secret")
        except Exception:  # noqa: BLE001 - a node not joined (yet) has none
            return None
        self.secrets[f"network secret {secret[:2].hex()}"] = secret
        self.secrets[f"PSK of network secret {secret[:2].hex()}"] = derive_psk(secret)
        return secret


def debug_up(member: MeshNode) -> None:
    member.tm("up", "--detach", "--log-level", "debug", timeout=40)


def make_member(lab: Lab, name: str) -> MeshNode:
    node = lab.add_node(name)
    return MeshNode(node, lab.connect(node, lab.switches["sw"]), "")


def mesh_ip(member: MeshNode) -> str:
    with open(f"{member.node.state_dir}/network.json") as f:
        return str(json.load(f)["member"]["body"]["ipv4"])


def wait_until(what: str, check: Callable[[], bool], timeout: float, mesh: dict[str, MeshNode]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.3)
    pytest.fail(f"{what}: not within {timeout:g} s\n{diagnostics(mesh)}")


def passphrase_key(path: str, passphrase: str) -> None:
    """A new Ed25519 key in OpenSSH format, encrypted with `passphrase`."""
    pem = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
        serialization.BestAvailableEncryption(passphrase.encode()))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)


def files_to_search(roots: Iterable[str]) -> dict[str, bytes]:
    """Every log under `roots` (the lab's, the daemons', the popen'd commands')."""
    found = {}
    for root in roots:
        for path in Path(root).rglob("*"):
            if path.is_file() and (path.suffix == ".log" or ".log." in path.name):
                found[str(path)] = path.read_bytes()
    return found


def database_dump(path: str) -> bytes:
    connection = sqlite3.connect(path)
    try:
        return "\n".join(connection.iterdump()).encode()
    finally:
        connection.close()


def test_no_secret_in_any_log_output_or_database(lab: Lab) -> None:
    sweep = Sweep()
    lab.add_switch("sw")
    admin = make_member(lab, "admin")
    b, c, d, e = (make_member(lab, name) for name in ("b", "c", "d", "e"))
    mesh = {"admin": admin}
    events: list[tuple[Node, subprocess.Popen]] = []
    try:
        url = f"https://{admin.underlay}:{COORDINATOR_PORT}"
        sweep.run(admin, "init", "--name", "admin", "--new-key", "--url", url)
        debug_up(admin)
        sweep.identity(admin, f"{admin.node.state_dir}/identity_ed25519")
        with open(f"{admin.node.state_dir}/admin.key") as f:
            sweep.secrets["admin seed"] = base64.b64decode(f.read().split()[1])
        sweep.network_secret(admin)
        events.append((admin.node, admin.node.popen(*_tm(admin, "events"), log_name="events")))
        policy = f"{admin.node.state_dir}/network-policy.toml"
        with open(policy, "w") as f:
            f.write(OPEN_POLICY)
        sweep.run(admin, "policy", "set", policy)

        # b joins with a token; e's attempts are refused.
        token_b = sweep.invite(admin)
        sweep.run(b, "join", token_b, "--name", "b", "--new-key")
        debug_up(b)
        mesh["b"] = b
        sweep.identity(b, f"{b.node.state_dir}/identity_ed25519")
        events.append((b.node, b.node.popen(*_tm(b, "events"), log_name="events")))
        damaged = token_b[:40] + ("A" if token_b[40] != "A" else "B") + token_b[41:]
        sweep.refused(e, "join", damaged, "--name", "e", "--new-key")
        assert "already used" in sweep.refused(e, "join", token_b, "--name", "e", "--new-key")
        bad_key = f"{e.node.state_dir}/bad_key"
        with open(bad_key, "w") as f:
            f.write("-----BEGIN OPENSSH PRIVATE KEY-----\nnot a key\n-----END OPENSSH PRIVATE KEY-----\n")
        os.chmod(bad_key, 0o600)
        sweep.refused(e, "join", sweep.invite(admin), "--name", "e", "--key", bad_key)

        # c's key has a passphrase; e tries it with a wrong one.
        passphrase, wrong = base64.b64encode(os.urandom(24)).decode(), base64.b64encode(os.urandom(24)).decode()
        sweep.secrets.update({"passphrase": passphrase.encode(), "wrong passphrase": wrong.encode()})
        c_key = f"{c.node.state_dir}/protected_ed25519"
        passphrase_key(c_key, passphrase)
        sweep.identity(c, c_key, passphrase)
        e_key = f"{e.node.state_dir}/protected_ed25519"
        with open(c_key, "rb") as src, open(os.open(e_key, os.O_WRONLY | os.O_CREAT, 0o600), "wb") as dst:
            dst.write(src.read())
        e.env = {PASSPHRASE_ENV: wrong}
        sweep.refused(e, "join", sweep.invite(admin), "--name", "e", "--key", e_key)
        c.env = {PASSPHRASE_ENV: passphrase}
        sweep.run(c, "join", sweep.invite(admin), "--name", "c", "--key", c_key)
        debug_up(c)
        mesh["c"] = c

        # d joins by approval (after a wrong fingerprint is refused).
        network = admin.status()["node"]["coordinator"]["network"]
        pin = admin.status()["node"]["coordinator"]["tls_fingerprint"]
        joining = d.node.popen(*_tm(d, "join", url, "--name", "d", "--new-key", "--wait", "60s", "--network", network,
                                    "--tls-fingerprint", pin), log_name="join")
        wait_until("d's join shows as pending", lambda: "d" in sweep.run(admin, "pending").stdout, 20, mesh)
        printed = d.node.wait_for_log("join", r"--fingerprint (SHA256:\S+)`", timeout=20)
        fingerprint = re.search(r"--fingerprint (SHA256:\S+)`", printed).group(1)  # type: ignore[union-attr]
        assert "not approved" in sweep.refused(admin, "approve", "d", "--fingerprint", "SHA256:" + "A" * 43)
        sweep.run(admin, "approve", "d", "--fingerprint", fingerprint)
        assert joining.wait(timeout=30) == 0, d.node.log("join")
        debug_up(d)
        mesh["d"] = d
        sweep.identity(d, f"{d.node.state_dir}/identity_ed25519")
        for member in mesh.values():
            member.mesh_ip = mesh_ip(member)
        wait_for_handshakes(mesh, timeout=60)

        # b reaches c over SSH and d over the coordinator's relay.
        block_path(b, c, udp=True)
        block_path(b, d, udp=True, tcp=True)

        def on_rungs() -> bool:
            for peer in (c, d):
                b.node.run("ping", "-c", "1", "-W", "1", peer.mesh_ip, check=False)
            return rung_of(b, "c") == "ssh" and rung_of(b, "d") == "relay"
        wait_until("b reaches c over ssh and d over the relay", on_rungs, 60, mesh)
        sweep.run(b, "ping", "c", "-c", "2")
        sweep.run(b, "ping", "d", "-c", "2")
        sweep.refused(b, "ping", "nobody", "-c", "1")  # a failed control request: a traceback at debug level

        # A new network secret for all; then d is revoked (its daemon stops).
        before = sweep.network_secret(b)
        sweep.run(admin, "rotate-secret")
        wait_until("every member installs the new secret",
                   lambda: all(sweep.network_secret(m) not in (None, before) for m in mesh.values()), 30, mesh)
        sweep.run(admin, "revoke", "d")
        wait_until("b drops d and d stops",
                   lambda: "d" not in {p["name"] for p in b.status()["peers"]}
                   and d.tm("status", check=False).returncode != 0, 30, mesh)
        del mesh["d"]
        sweep.refused(d, "up", "--detach")

        for member in mesh.values():
            for args in (("status", "--json"), ("status", "-v"), ("peers", "--json"), ("show", "--wg"),
                         ("policy", "show"), ("policy", "show", "--json"), ("filter", "show", "--json")):
                sweep.run(member, *args)
        sweep.run(admin, "invites", "--json")
        sweep.run(admin, "pending", "--json")
    finally:
        for node, process in events:
            process.terminate()
            process.wait(timeout=10)
        for member in (admin, b, c, d, e):
            member.down(check=False)

    # Every secret the scenario knows: the ones above, every epoch's network secret, and
    # every key file the nodes made.
    for member in (admin, b, c, d):
        sweep.network_secret(member)
        sweep.private_key_files(member)
    assert any("ssh_host_ed25519_key" in name for name in sweep.secrets), sweep.secrets.keys()
    assert len([n for n in sweep.secrets if n.startswith("network secret")]) >= 2, sweep.secrets.keys()
    for node, _ in events:
        assert '"event"' in node.log("events"), node.log("events")  # the stream was read
    searched = {**sweep.outputs, **files_to_search([lab.workdir])}
    database = Path(admin.node.state_dir) / "coordinator.db"
    assert database.is_file(), database
    searched["coordinator database dump"] = database_dump(str(database))
    assert b"CREATE TABLE" in searched["coordinator database dump"] and b"INSERT INTO" in searched["coordinator database dump"]
    assert any("tunnelmesh.log" in name for name in searched), searched.keys()
    for member in (admin, b, c, d):  # every daemon logged at debug level
        assert b" DEBUG " in searched[member.log_path], member.log_tail()
    assert b"Traceback" in searched[b.log_path], b.log_tail()  # the failed control request's, at debug level
    # The search is the same one the self-check plants a secret for, here with a real one.
    planted = next(iter(sweep.secrets.items()))
    assert search(b"scratch " + base64.b64encode(planted[1]) + b"\n", dict([planted]))
    print(f"searched {len(searched)} texts ({sum(map(len, searched.values()))} bytes) for {len(sweep.secrets)} "
          f"secrets in {len(encodings(bytes(32)))} forms each")
    leaks = {name: found for name, text in searched.items() if (found := search(text, sweep.secrets))}
    assert not leaks, json.dumps(leaks, indent=1)


def _tm(member: MeshNode, *args: str) -> list[str]:
    return [sys.executable, "-m", "tunnelmesh", "--state-dir", member.node.state_dir, *args]
