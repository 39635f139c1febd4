"""`tunnelmesh ssh-config`: the daemon's verified view of the members' sshd host keys
(PeerMapDirectory.ssh_hosts) and the files rendered from it, read back by the real
OpenSSH tools (`ssh -G`, `ssh-keygen -F`)."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import functools
import json
import os
import shutil
import stat
import subprocess
from pathlib import Path
from typing import Any

import asyncssh
import pytest

from actors.links import PeerMapDirectory
from actors.messages import SshHost, SshHosts
from tests.conftest import unavailable
from tests.links import public_key_text
from tests.support.membership import World, update
from tests.unit.test_attest_epoch import WallClock
from tunnelmesh.cli.ssh_config import closed_note, default_out_dir
from tunnelmesh.exports.ssh_config import (
    ExportError, closed_to_others, include_line, network_tag, render, write_export,
)
from tunnelmesh.links.attest import make_attestation
from tunnelmesh.membership import PeerMap
from tunnelmesh.paths import resolve_paths

T0 = 1_767_225_600
NET = "SHA256:" + base64.b64encode(bytes(range(32))).decode().rstrip("=")  # a network id
FINGERPRINT = "SHA256:" + base64.b64encode(bytes(range(1, 33))).decode().rstrip("=")  # a member's identity
ALIAS = "beta.00010203.tunnelmesh"  # its tag: the id's first 4 bytes in hex


@functools.cache
def world() -> World:
    return World.create()


@functools.cache
def sshd_keys() -> tuple[str, ...]:
    return tuple(sorted(public_key_text(asyncssh.generate_private_key(kind))
                        for kind in ("ssh-ed25519", "ecdsa-sha2-nistp256")))


def record(i: int, keys: tuple[str, ...], issued: int = T0) -> dict[str, Any]:
    return asyncio.run(make_attestation(world().nodes[i], port=None, host_key=None, bridge=None, issued=issued,
                                        sshd_host_keys=keys))


def directory_with(records: dict[int, dict[str, Any]]) -> tuple[PeerMap, PeerMapDirectory]:
    """Node 0's view of nodes 0-4, where node i registered records[i] (if any)."""
    w = world()
    peers = PeerMap(w.network, w.wg(0))
    endpoints = {base64.b64encode(w.wg(i)).decode(): {"addresses": [f"192.0.2.{i + 1}:51820"], "last_seen": None,
                                                      "ssh": wire} for i, wire in records.items()}
    assert not peers.apply(update([w.admin_member(i) for i in range(5)], endpoints=endpoints)).rejected
    directory = PeerMapDirectory(peers.snapshot, clock=WallClock([T0 + 10]))
    directory.check_all()
    return peers, directory


def identity_key(i: int) -> str:
    return " ".join(world().nodes[i].public.ssh_public_key.split()[:2])


def test_only_keys_the_member_signed_in_its_newest_record() -> None:
    forged = dict(record(3, sshd_keys()), sshd_host_keys=[identity_key(0)])  # the coordinator swaps a key in
    _, directory = directory_with({
        0: record(0, sshd_keys()),  # this node: never listed
        1: record(1, sshd_keys()),
        2: record(2, tuple(sorted((identity_key(2), *sshd_keys())))),  # its identity is its host key
        3: forged,
        4: record(4, ()),  # attests none
    })
    hosts = {h.name: h for h in directory.ssh_hosts(world().wg(0))}
    assert sorted(hosts) == ["node1", "node2", "node3", "node4"]
    assert hosts["node1"].host_keys == sshd_keys() and not hosts["node1"].identity_is_host_key
    assert hosts["node1"].mesh_ip == str(world().entry(1).ipv4) and hosts["node1"].why_none is None
    assert identity_key(2) in hosts["node2"].host_keys and hosts["node2"].identity_is_host_key
    assert hosts["node3"].host_keys == () and "refused" in (hosts["node3"].why_none or "")
    assert "does not verify" in (hosts["node3"].why_none or "")
    assert hosts["node4"].host_keys == () and "attests no sshd host keys" in (hosts["node4"].why_none or "")


def test_a_replayed_older_record_gives_no_keys() -> None:
    peers, directory = directory_with({1: record(1, sshd_keys(), issued=T0)})
    assert directory.ssh_hosts(world().wg(0))[0].host_keys == sshd_keys()
    old = record(1, sshd_keys()[:1], issued=T0 - 3600)  # before a host-key change
    endpoints = {base64.b64encode(world().wg(1)).decode(): {"addresses": ["192.0.2.2:51820"], "last_seen": None,
                                                            "ssh": old}}
    peers.apply(update([world().admin_member(i) for i in range(5)], endpoints=endpoints))
    node1 = next(h for h in directory.ssh_hosts(world().wg(0)) if h.name == "node1")
    assert node1.host_keys == () and "older than the one already seen" in (node1.why_none or "")


def host(name: str, keys: tuple[str, ...], *, mesh_ip: str = "10.99.0.2", why: str | None = None,
         fingerprint: str = FINGERPRINT) -> SshHost:
    return SshHost(name=name, mesh_ip=mesh_ip, mesh_ipv6=None, fingerprint=fingerprint, host_keys=keys,
                   identity_is_host_key=False, why_none=why)


def test_rendering(tmp_path: Path) -> None:
    export = render(SshHosts(NET, (host("beta", sshd_keys()), host("gamma", (), why="it attests none"))), tmp_path)
    assert export.hosts == ("beta",) and export.left_out == {"gamma": "it attests none"}
    assert [line for line in export.known_hosts.splitlines() if not line.startswith("#")] == [
        f"{ALIAS} {key}" for key in sshd_keys()]
    assert "# gamma: left out: it attests none" in export.known_hosts.splitlines()
    block = export.ssh_config.split("\nHost beta beta.tunnelmesh\n")[1].splitlines()
    assert block == ["    HostName 10.99.0.2", f"    HostKeyAlias {ALIAS}",
                     f'    UserKnownHostsFile "{tmp_path}/known_hosts"', "    GlobalKnownHostsFile none",
                     "    StrictHostKeyChecking yes", "    CheckHostIP no", "    UpdateHostKeys no"]
    assert "Host gamma" not in export.ssh_config and "# gamma: left out: it attests none" in export.ssh_config
    assert include_line(tmp_path) == f'Include "{tmp_path}/ssh_config"'


@pytest.mark.parametrize("bad, why", [
    ("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIA==\nHost *\n  ProxyCommand evil", "'<type> <base64>'"),
    ("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIA==", "not a valid SSH public key"),  # too short
    ("ssh-dss AAAAB3NzaC1kc3MAAACBAP", "type one of"),
    ("ssh-ed25519  AAAA", "'<type> <base64>'"),
])
def test_malformed_keys_leave_the_member_out(tmp_path: Path, bad: str, why: str) -> None:
    export = render(SshHosts(NET, (host("beta", (sshd_keys()[0], bad)),)), tmp_path)
    assert export.hosts == () and why in export.left_out["beta"]
    assert "Host beta" not in export.ssh_config and ALIAS not in export.known_hosts
    # Nothing of the bad value makes a line of its own in either file.
    for text in (export.ssh_config, export.known_hosts):
        assert all(line == "" or line.startswith(("#", "Host ", "    ")) for line in text.splitlines()), text


def test_bad_address_name_fingerprint_or_network(tmp_path: Path) -> None:
    export = render(SshHosts(NET, (host("beta", sshd_keys(), mesh_ip="10.0.0.2\nHost *"),
                                      host("Bad Name", sshd_keys()))), tmp_path)
    assert export.hosts == () and "not an IPv4 address" in export.left_out["beta"]
    assert "Bad Name" not in export.ssh_config + export.known_hosts
    for fingerprint in ("SHA256:x", "SHA256:" + "A" * 42 + "\nHost *\n  ProxyCommand evil", FINGERPRINT + "\nx y"):
        export = render(SshHosts(NET, (host("beta", sshd_keys(), fingerprint=fingerprint),)), tmp_path)
        assert export.hosts == () and "is not SHA256:<base64>" in export.left_out["beta"], fingerprint
        assert ALIAS not in export.known_hosts and "Host beta" not in export.ssh_config
        for text in (export.ssh_config, export.known_hosts):  # the value makes no line of its own
            assert all(line == "" or line.startswith(("#", "Host ", "    ")) for line in text.splitlines()), text
    for bad in ("lab", "SHA256:AAAA", "SHA256:" + "A" * 42 + "\nHost *"):
        with pytest.raises(ExportError, match="not an id"):
            render(SshHosts(bad, ()), tmp_path)
    assert network_tag(world().network.network) == base64.b64decode(world().network.network[7:] + "=")[:4].hex()


def test_output_paths_are_quoted_for_ssh(tmp_path: Path) -> None:
    spaced = tmp_path / "my keys %d"
    export = render(SshHosts(NET, (host("beta", sshd_keys()),)), spaced)
    assert f'UserKnownHostsFile "{tmp_path}/my keys %%d/known_hosts"' in export.ssh_config
    with pytest.raises(ExportError, match="quotes"):
        include_line(tmp_path / 'a"b')


def test_written_atomically_world_readable(tmp_path: Path) -> None:
    out = tmp_path / "out"
    export = render(SshHosts(NET, (host("beta", sshd_keys()),)), out)
    write_export(export, out)
    second = dataclasses.replace(export, known_hosts=export.known_hosts + "# again\n")
    write_export(second, out)  # replaced whole
    assert (out / "known_hosts").read_text() == second.known_hosts
    assert (out / "ssh_config").read_text() == export.ssh_config
    for name in ("known_hosts", "ssh_config"):
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o644
    assert sorted(p.name for p in out.iterdir()) == ["known_hosts", "ssh_config"]  # no temp files left


def test_with_state_dir_the_default_place_is_closed_to_other_users_and_it_says_so(tmp_path: Path) -> None:
    tmp_path.chmod(0o755)  # pytest makes it 0700
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    out = default_out_dir(resolve_paths(str(state), None))  # --state-dir, no --config
    assert out == state / "ssh"
    write_export(render(SshHosts(NET, (host("beta", sshd_keys()),)), out), out)
    assert closed_to_others(out) == (state, 0o700)
    note = closed_note(out) or ""
    assert f"other users cannot read {state} (mode 0700)" in note and "works for root only" in note, note
    assert "`tunnelmesh ssh-config --out DIR`" in note, note
    state.chmod(0o755)  # now only what is above tmp_path may be closed (pytest's own directories)
    closed = closed_to_others(out)
    assert closed is None or not closed[0].is_relative_to(tmp_path), closed
    (out / "known_hosts").chmod(0o600)
    assert closed_to_others(out) == (out / "known_hosts", 0o600)
    assert f"other users cannot read {out / 'known_hosts'} (mode 0600)" in (closed_note(out) or "")


def openssh(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        unavailable(f"needs OpenSSH's {tool} (openssh-client)")
    return path


def test_openssh_reads_the_files_as_meant(tmp_path: Path) -> None:
    export = render(SshHosts(NET, (host("beta", sshd_keys()),)), tmp_path)
    write_export(export, tmp_path)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path)}
    for name in ("beta", "beta.tunnelmesh"):
        shown = subprocess.run([openssh("ssh"), "-G", "-F", str(tmp_path / "ssh_config"), name], capture_output=True,
                               text=True, timeout=30, check=True, env=env).stdout.splitlines()
        for line in ("hostname 10.99.0.2", f"hostkeyalias {ALIAS.lower()}", "stricthostkeychecking true",
                     f"userknownhostsfile {tmp_path}/known_hosts", "globalknownhostsfile none", "checkhostip no",
                     "updatehostkeys false"):
            assert line in shown, (line, shown)
    for key in sshd_keys():
        found = subprocess.run([openssh("ssh-keygen"), "-F", ALIAS, "-f", str(tmp_path / "known_hosts")],
                               capture_output=True, text=True, timeout=30, check=True).stdout
        assert key in found, found


def test_config_names_the_sshd_host_key_files(tmp_path: Path) -> None:
    from tests.unit.test_config import COORDINATED, TRANSPORTS, load, load_error

    assert load(tmp_path, COORDINATED).transports.sshd_host_keys is None  # the daemon reads /etc/ssh
    config = load(tmp_path, TRANSPORTS + 'sshd_host_keys = ["keys/a.pub", "/etc/ssh/b.pub"]\n').transports
    assert config.sshd_host_keys == (tmp_path / "keys" / "a.pub", Path("/etc/ssh/b.pub"))
    assert load(tmp_path, TRANSPORTS + "sshd_host_keys = []\n").transports.sshd_host_keys == ()  # attest none
    for bad in ('"/etc/ssh/a.pub"', "[1]"):
        error = load_error(tmp_path, TRANSPORTS + f"sshd_host_keys = {bad}\n")
        assert "sshd_host_keys must be a list of public key files" in str(error) and error.line is not None


def test_reading_sshd_host_key_files(tmp_path: Path) -> None:
    from tunnelmesh.links.attest import AttestationError, read_sshd_host_keys

    good = tmp_path / "ssh_host_ed25519_key.pub"
    good.write_text(sshd_keys()[0] + " root@host\n")
    assert read_sshd_host_keys([good]) == (sshd_keys()[0],)
    bad = tmp_path / "ssh_host_dsa_key.pub"
    bad.write_text("ssh-dss AAAAB3NzaC1kc3MAAACBAP root@host\n")
    with pytest.raises(AttestationError, match=f"sshd host key {bad} must be"):
        read_sshd_host_keys([good, bad])
    with pytest.raises(AttestationError, match="No such file"):
        read_sshd_host_keys([tmp_path / "missing.pub"])


def test_the_reply_round_trips_through_the_control_schema() -> None:
    from actors.messages import from_json, to_json

    _, directory = directory_with({1: record(1, sshd_keys())})
    reply = SshHosts(world().network.network, directory.ssh_hosts(world().wg(0)))
    assert from_json(SshHosts, json.loads(json.dumps(to_json(reply)))) == reply
