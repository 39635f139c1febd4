"""No state is lost to bad input (issue 17, part 2; docs/architecture.md "State files and
damage"): a revoked node that tries to join again keeps every file until the new join has
been checked whole, and the daemon's start refuses damaged state it cannot get back, with
an error that names the file and says what to do, while a damaged peer map cache (the
coordinator gives it back) is only ignored.

Real coordinator (aiohttp over SQLite on 127.0.0.1), real SSH keys, the real `join`."""

from __future__ import annotations

import asyncio
import os
import random
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import asyncssh
import pytest

from actors.daemon import STALE_TEMP_AGE, StartupError, _load_membership, claim_state_dir
from tests.support.coordinator import World, now, serving
from tunnelmesh.control_client import NotRunning, request
from tunnelmesh.files import lock_dir
from tunnelmesh.filter import STARTER_POLICY
from tunnelmesh.membership import (
    AdminKey,
    MemberEntry,
    MembershipError,
    PeerMap,
    PolicyRecord,
    Revocation,
    Token,
    make_invite,
)
from tunnelmesh.netstate import (
    NetworkState,
    StateError,
    invite_ledger,
    load_peer_map,
    save_peer_map,
    save_revocations,
)
from tunnelmesh.network import NetworkError, join, revoke
from tunnelmesh.paths import Paths

#: What a revoked node's failed join must leave as it was, byte for byte.
KEPT = ("network.json", "peermap.json", "tunnelmesh.toml", "revocations.json", "bindings.json", "network.secret")


def key_file(directory: Path) -> str:
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = directory / "identity_ed25519"
    path.write_bytes(asyncssh.generate_private_key("ssh-ed25519").export_private_key())
    os.chmod(path, 0o600)
    return str(path)


def contents(paths: Paths) -> dict[str, bytes]:
    return {name: (paths.state_dir / name).read_bytes() for name in KEPT}


def invite(world: World, url: str, *, created: int | None = None, uses: int = 1, expires_in: int = 3600) -> str:
    """A token the admin's machine made (kept in its ledger), for the coordinator at `url`."""
    made = now() - 10 if created is None else created
    token = make_invite(world.admin, url, name=None, expires=made + expires_in, uses=uses, now=made)
    world.invites.append(token.grant)
    return token.encode()


async def joined(paths: Paths, token: str, key: str) -> NetworkState:
    return (await join(paths, token_or_url=token, name="j", identity_spec=key, listen_port=51820, wait=20)).state


def test_a_revoked_nodes_join_with_a_bad_token_deletes_nothing_and_a_good_one_replaces_it(tmp_path: Path) -> None:
    world = World.create()  # its identities are made outside the loop

    async def scenario() -> None:
        paths = Paths(tmp_path / "j", tmp_path / "j" / "tunnelmesh.toml")
        key = key_file(paths.state_dir)
        async with serving(tmp_path / "coordinator.db", world) as served:
            old_reusable = invite(world, served.url, uses=0)
            first = await joined(paths, invite(world, served.url), key)
            revocation = await revoke(served.machine.paths, "j")
            save_revocations(paths.revocations, [revocation])  # as the node's daemon keeps it on the next map
            assert load_peer_map(paths.peer_map_cache, first)[0].revoked(first.member) is not None
            before = contents(paths)

            real = Token.parse(invite(world, served.url))
            stretched = {**real.grant, "body": {**real.grant["body"], "uses": 0}}  # not what the admin signed
            forged = Token(served.url, real.network, stretched, real.invite_seed).encode()
            other = make_invite(AdminKey.generate(), served.url, name=None, expires=now() + 600, uses=1, now=now())
            refused = {
                "tmjoin-not-a-token": (MembershipError, "not a join token"),
                forged: (NetworkError, "not signed by this network's admin key"),
                other.encode(): (NetworkError, "another network|not this network"),
                invite(world, served.url, created=now() - 7200): (NetworkError, "the invite expired"),
                old_reusable: (Exception, "revoked"),  # older than the revocation: the coordinator refuses it
            }
            for token, (error, says) in refused.items():
                with pytest.raises(error, match=says):
                    await joined(paths, token, key)
                assert contents(paths) == before, f"a refused join ({says}) changed the node's files"

            deadline = time.monotonic() + 5  # a new invite must be made after the revocation
            while now() <= revocation.at and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            again = await joined(paths, invite(world, served.url, created=now()), key)
        assert again.member.authorized_at > revocation.at
        after = contents(paths)
        assert after["network.json"] != before["network.json"] and after["tunnelmesh.toml"]
        peer_map, _ = load_peer_map(paths.peer_map_cache, NetworkState.load(paths.network_state))
        assert peer_map.revoked(again.member) is None
        assert peer_map.revocations_of(again.member) == [revocation]  # the old revocation is kept

    asyncio.run(scenario())


# --- the daemon's start on damaged state files ------------------------------------------------


@dataclass(frozen=True)
class NodeDir:
    """A node's state directory as its daemon leaves it: a member of a network in which
    another member was revoked, with a network policy."""

    world: World
    paths: Paths
    me: MemberEntry
    gone: MemberEntry


def joined_state(directory: Path) -> NodeDir:
    world = World.create()
    admin, me, gone = (world.entry(world.admin_member(i, name, i + 1)) for i, name in enumerate(("admin", "me", "gone")))
    directory.mkdir(mode=0o700)
    paths = Paths(directory, directory / "tunnelmesh.toml")
    NetworkState("http://192.0.2.1:7400", world.network, me).save(paths.network_state)
    peer_map = PeerMap(world.network, me.wg_key)
    full = {"version": 2, "full": True, "members": [m.to_wire() for m in (admin, me, gone)], "revocations": [],
            "secret": None, "endpoints": {}}
    peer_map.apply(full)
    revocation = Revocation.create(world.admin, gone, now() + 1)
    peer_map.apply({**full, "version": 3, "full": False, "members": [], "revocations": [revocation.to_wire()]})
    peer_map.policy = PolicyRecord.create(world.admin, 1, STARTER_POLICY, now())
    save_peer_map(paths.peer_map_cache, peer_map)
    return NodeDir(world, paths, me, gone)


def files_in(paths: Paths) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(paths.state_dir.iterdir())}


def damage(path: Path, how: str) -> None:
    raw = path.read_bytes()
    path.write_bytes({"truncated": raw[: len(raw) // 2], "empty": b"", "garbage": b"\x00\xff{[" * 7,
                      "wrong shape": b'"just a string"\n'}[how])


HOW = ("truncated", "empty", "garbage", "wrong shape")


@pytest.mark.parametrize("how", HOW)
def test_a_damaged_peer_map_cache_is_ignored_and_no_revocation_binding_or_policy_is_lost(
        tmp_path: Path, how: str, caplog: pytest.LogCaptureFixture) -> None:
    node = joined_state(tmp_path / "node")
    damage(node.paths.peer_map_cache, how)
    kept = {name: raw for name, raw in files_in(node.paths).items() if name != "peermap.json"}
    state, peer_map = _load_membership(node.paths, node.world.nodes[1])
    assert state.member == node.me and not peer_map.members  # resynced from the coordinator once it runs
    assert peer_map.revoked(node.gone) is not None
    assert peer_map.bindings["name:gone"] == node.gone.wg_key
    assert peer_map.policy is not None and peer_map.policy.version == 1
    assert "peer map cache" in caplog.text and "ignored" in caplog.text
    assert {name: raw for name, raw in files_in(node.paths).items() if name != "peermap.json"} == kept


@pytest.mark.parametrize("how", HOW)
@pytest.mark.parametrize("name, what, says", [
    ("network.json", "network state", "start over in a new state directory"),
    ("revocations.json", "revocations", "remove it if there is none (this node then takes the coordinator's word"),
    ("bindings.json", "bindings", "remove it if there is none (this node then takes the coordinator's word"),
    ("policy.json", "network policy", "remove it if there is none (this node then takes the coordinator's word"),
])
def test_a_damaged_file_no_coordinator_gives_back_stops_the_start_naming_it_and_nothing_is_deleted(
        tmp_path: Path, how: str, name: str, what: str, says: str) -> None:
    node = joined_state(tmp_path / "node")
    path = node.paths.state_dir / name
    damage(path, how)
    before = files_in(node.paths)
    with pytest.raises(StateError) as refused:
        _load_membership(node.paths, node.world.nodes[1])
    message = str(refused.value)
    assert f"{what} {path} is damaged" in message and "restore it from a backup" in message and says in message
    assert files_in(node.paths) == before


def test_a_damaged_invite_ledger_is_an_error_that_says_what_to_do(tmp_path: Path) -> None:
    node = joined_state(tmp_path / "node")
    ledger = node.paths.invites
    ledger.write_bytes(b'{"invites": [')
    with pytest.raises(StateError, match=rf"invite ledger {ledger} is damaged \(not JSON.*restore it from a backup"):
        with invite_ledger(ledger, node.world.network):
            pass
    assert ledger.read_bytes() == b'{"invites": ['


# --- stale pid files and control sockets -------------------------------------------------------


def stale_leftovers(paths: Paths, pid: int) -> None:
    """A pid file and a control socket as a SIGKILLed daemon leaves them: the socket file
    is there, but nothing listens (connecting is refused)."""
    paths.pid_file.write_text(f"{pid}\n")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(paths.control_socket))
    listener.close()
    with pytest.raises(NotRunning):
        request(paths.control_socket, "ping_daemon", timeout=2)


def holder(paths: Paths) -> subprocess.Popen[str]:
    """Another process holding the state directory's lock, as a running daemon does; its
    pid is in the pid file. Ready once it says so."""
    program = ("import sys, time; from tunnelmesh.files import lock_dir; "
               f"fd = lock_dir({str(paths.state_dir)!r}); print('held' if fd is not None else 'not held', flush=True); "
               "time.sleep(60)")
    process = subprocess.Popen([sys.executable, "-c", program], stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None and process.stdout.readline().strip() == "held"
    paths.pid_file.write_text(f"{process.pid}\n")
    return process


def test_the_lock_is_the_daemons_and_the_kernel_drops_it_on_sigkill(tmp_path: Path) -> None:
    paths = Paths(tmp_path, tmp_path / "tunnelmesh.toml")
    process = holder(paths)
    try:
        stale_leftovers(paths, process.pid)
        with pytest.raises(StartupError, match=rf"already running with state dir {tmp_path} \(pid {process.pid}\)"):
            claim_state_dir(paths)
        assert paths.pid_file.exists() and paths.control_socket.exists()  # a live daemon's: left alone
    finally:
        process.kill()
        process.wait(timeout=10)
    lock = claim_state_dir(paths)  # the killed holder's lock went with it
    try:
        assert not paths.pid_file.exists() and not paths.control_socket.exists()  # stale: removed
        assert lock_dir(tmp_path) is None
    finally:
        os.close(lock)
    again = lock_dir(tmp_path)
    assert again is not None
    os.close(again)


def test_a_stale_pid_file_naming_a_live_process_of_someone_else_does_not_block_the_start(tmp_path: Path) -> None:
    """After a SIGKILL the pid may be reused by any process: the lock, not the pid, decides."""
    paths = Paths(tmp_path, tmp_path / "tunnelmesh.toml")
    stale_leftovers(paths, os.getppid())
    lock = claim_state_dir(paths)
    os.close(lock)
    assert not paths.pid_file.exists() and not paths.control_socket.exists()


# --- a kill in the middle of a state write ----------------------------------------------------

WRITER = """
import sys
from pathlib import Path
from tunnelmesh.netstate import NetworkState, load_peer_map, save_peer_map, write_atomic
state_dir = Path(sys.argv[1])
state = NetworkState.load(state_dir / "network.json")
peer_map, _ = load_peer_map(state_dir / "peermap.json", state)
kept = {name: (state_dir / name).read_bytes() for name in ("revocations.json", "bindings.json", "policy.json")}
print("writing", flush=True)
for _ in range(1_000_000):  # bounded: killed long before
    peer_map.version += 1
    save_peer_map(state_dir / "peermap.json", peer_map)
    for name, raw in kept.items():
        write_atomic(state_dir / name, raw)
"""


def test_sigkill_in_the_middle_of_state_writes_leaves_every_file_whole(tmp_path: Path) -> None:
    node = joined_state(tmp_path / "node")
    original = files_in(node.paths)
    rng = random.Random(17)
    versions = []
    for _ in range(8):
        writer = subprocess.Popen([sys.executable, "-c", WRITER, str(node.paths.state_dir)], stdout=subprocess.PIPE,
                                  text=True)
        try:
            assert writer.stdout is not None and writer.stdout.readline().strip() == "writing"
            time.sleep(rng.uniform(0.0, 0.05))  # the moment to kill at, drawn by the RNG
        finally:
            writer.kill()
            writer.wait(timeout=10)
        now_in = files_in(node.paths)
        assert {name for name in now_in if not name.startswith(".")} == original.keys()  # a temp file at most
        for name in ("network.json", "revocations.json", "bindings.json", "policy.json", "network.secret"):
            assert now_in.get(name) == original.get(name), f"{name} changed by a killed write"
        _, peer_map = _load_membership(node.paths, node.world.nodes[1])  # every file whole and verified
        assert peer_map.revoked(node.gone) is not None
        versions.append(peer_map.version)
    assert max(versions) > 3, f"the writer never wrote before it was killed: {versions}"
    print(f"peer map versions after each kill: {versions}; temp files left: "
          f"{sorted(name for name in files_in(node.paths) if name.startswith('.'))}")


def test_the_temp_files_of_writes_a_kill_cut_short_go_at_the_next_start_and_only_they(tmp_path: Path) -> None:
    paths = Paths(tmp_path, tmp_path / "tunnelmesh.toml")
    left = [tmp_path / ".peermap.json.0123456789abcdef.tmp", tmp_path / ".revocations.json.fedcba9876543210.tmp"]
    young = tmp_path / ".policy.json.00112233445566aa.tmp"  # a `tunnelmesh` command may be writing it now
    other = [tmp_path / ".notes.tmp", tmp_path / "peermap.json.0123456789abcdef.tmp", tmp_path / "keep.json"]
    for path in [*left, young, *other]:
        path.write_bytes(b"{")
    long_ago = time.time() - 2 * STALE_TEMP_AGE
    for path in [*left, *other]:
        os.utime(path, (long_ago, long_ago))
    os.close(claim_state_dir(paths))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in (young, *other))


def test_a_control_socket_that_answers_without_the_lock_is_a_live_daemon_and_is_not_taken_over(
        tmp_path: Path) -> None:
    """A daemon that holds no lock (started by a tunnelmesh from before it) still answers on
    its socket: refused, and its socket stays."""
    paths = Paths(tmp_path, tmp_path / "tunnelmesh.toml")
    program = ("import socket, sys, time; s = socket.socket(socket.AF_UNIX); s.bind(sys.argv[1]); s.listen(); "
               "print('listening', flush=True); c, _ = s.accept(); c.recv(100); "
               "c.sendall(b'{\"ok\": true, \"result\": null}\\n'); time.sleep(60)")
    daemon = subprocess.Popen([sys.executable, "-c", program, str(paths.control_socket)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert daemon.stdout is not None and daemon.stdout.readline().strip() == "listening"
        with pytest.raises(StartupError, match="a daemon answers on .* without holding the state directory's lock"):
            claim_state_dir(paths)
        assert paths.control_socket.exists()
    finally:
        daemon.kill()
        daemon.wait(timeout=10)
