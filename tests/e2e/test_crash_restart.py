"""Daemons killed with SIGKILL and started on damaged state files (issue 17, part 2;
docs/architecture.md "State files and damage"), in the netns lab, through the CLI.

A three-node network (`tools.mesh.build_network`, embedded coordinator on the admin
node); a daemon is SIGKILLed at moments a seeded RNG picks (printed: TM_CRASH_SEED=<n>
repeats a run): right after an admin action that makes every node write its peer map
(`policy set`, the revocation of a fourth member), while the ladder moves a pair off a
blocked UDP path, or at an idle moment. Each time the pid file and control socket stay
behind; `up` must start anyway and every pair must ping within 10 s; the state files
must parse, and no revocation, binding or policy version may be lost. The crash-to-all-
pairs times are printed.
"""

from __future__ import annotations

import json
import os
import random
import signal
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tools.lab import Lab
from tools.mesh import OPEN_POLICY, MeshNode, block_path, build_network, diagnostics, rung_of, wait_for_handshakes

pytestmark = pytest.mark.e2e

ROUNDS = 5
PING_BOUND = 10.0  # s from `up` to every pair pinging (issue 17)
STATE_FILES = ("network.json", "peermap.json", "revocations.json", "bindings.json", "policy.json")


@dataclass(frozen=True)
class Kept:
    """What a node keeps for good, as its files say."""

    revocations: frozenset[str]
    bindings: frozenset[tuple[str, str]]
    policy: int

    def lost_since(self, before: Kept) -> list[str]:
        lost = [f"revocation {r[:60]}" for r in before.revocations - self.revocations]
        lost += [f"binding {b}" for b in before.bindings - self.bindings]
        if self.policy < before.policy:
            lost.append(f"policy v{before.policy} (now v{self.policy})")
        return lost


def state_files(member: MeshNode) -> dict[str, Any]:
    """Every state file the node has, parsed (a damaged one fails the test, naming it)."""
    parsed = {}
    for name in STATE_FILES:
        path = Path(member.node.state_dir) / name
        if path.exists():
            try:
                parsed[name] = json.loads(path.read_bytes())
            except ValueError as exc:
                pytest.fail(f"{member.name}'s {name} does not parse after a crash: {exc}")
    return parsed


def kept(member: MeshNode) -> Kept:
    files = state_files(member)
    bindings = files.get("bindings.json", {}).get("bindings", {})
    return Kept(frozenset(json.dumps(r, sort_keys=True) for r in files.get("revocations.json", [])),
                frozenset(bindings.items()), files.get("policy.json", {}).get("body", {}).get("version", 0))


def pid_of(member: MeshNode) -> int:
    return int((Path(member.node.state_dir) / "tunnelmesh.pid").read_text())


def sigkill(member: MeshNode) -> None:
    """SIGKILL the node's daemon and wait until it is gone (bounded)."""
    pid = pid_of(member)
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.02)  # reaped by init: the process is a detached daemon
    assert not Path(f"/proc/{pid}").exists(), f"{member.name}'s daemon (pid {pid}) survived SIGKILL"


def pings(a: MeshNode, b: MeshNode) -> bool:
    return a.node.run("ping", "-c", "1", "-W", "1", b.mesh_ip, check=False, timeout=10).returncode == 0


def until_all_pairs_ping(mesh: dict[str, MeshNode], bound: float, rng: random.Random) -> float:
    """Seconds until every ordered pair has answered a ping (pairs tried in a random
    order each pass); fails with diagnostics after `bound`."""
    start = time.monotonic()
    waiting = [(a, b) for a in mesh.values() for b in mesh.values() if a is not b]
    while waiting and time.monotonic() - start < bound:
        rng.shuffle(waiting)
        waiting = [(a, b) for a, b in waiting if not pings(a, b)]
    if waiting:
        pytest.fail(f"not every pair pings within {bound:g} s: {[f'{a.name}->{b.name}' for a, b in waiting]}\n"
                    f"{diagnostics(mesh)}")
    return time.monotonic() - start


def restart_after_crash(member: MeshNode) -> None:
    """`up` where a SIGKILLed daemon left its pid file and control socket."""
    state = Path(member.node.state_dir)
    assert (state / "tunnelmesh.pid").exists() and (state / "control.sock").exists(), "nothing stale to start over"
    refused = member.tm("status", check=False)
    assert refused.returncode != 0 and "not running" in refused.stderr, refused.stderr
    member.up()


def set_policy(admin: MeshNode, version_note: int) -> None:
    path = f"{admin.node.state_dir}/network-policy.toml"
    with open(path, "w") as f:
        f.write(f"# crash round {version_note}\n{OPEN_POLICY}")
    admin.tm("policy", "set", path)


def join_without_up(lab: Lab, admin: MeshNode, name: str) -> MeshNode:
    """A fourth member that joins and never runs: something to revoke."""
    node = lab.add_node(name)
    member = MeshNode(node, lab.connect(node, lab.switches["sw"]), "")
    member.tm("join", admin.tm("invite").stdout.strip(), "--name", name, "--new-key")
    return member


def mtime(member: MeshNode, name: str) -> float:
    try:
        return (Path(member.node.state_dir) / name).stat().st_mtime
    except FileNotFoundError:
        return 0.0


def wait_kept_everywhere(mesh: Iterable[MeshNode], want: Any, what: str, timeout: float = 30) -> None:
    """Until want(kept(member)) holds on every node (bounded)."""
    deadline = time.monotonic() + timeout
    missing: list[str] = []
    while time.monotonic() < deadline:
        missing = [m.name for m in mesh if not want(kept(m))]
        if not missing:
            return
        time.sleep(0.2)
    pytest.fail(f"{what}: not on {missing} within {timeout:g} s")


def test_sigkill_at_random_moments_then_up_again(lab: Lab) -> None:
    seed = int(os.environ.get("TM_CRASH_SEED", random.randrange(1 << 32)))
    print(f"TM_CRASH_SEED={seed}")
    rng = random.Random(seed)
    mesh = build_network(lab, ["a", "b", "c"])
    admin = mesh["a"]
    try:
        wait_for_handshakes(mesh, timeout=40)
        join_without_up(lab, admin, "d")
        kinds = ["policy write", "revocation write", "rung change", "idle", rng.choice(["policy write", "rung change"])]
        rng.shuffle(kinds)
        times: list[tuple[str, str, float, float]] = []
        policy_version = kept(admin).policy
        for number, kind in enumerate(kinds[:ROUNDS], 1):
            victim = mesh[rng.choice(sorted(mesh))]
            before = {name: kept(member) for name, member in mesh.items()}
            blocked: MeshNode | None = None
            if kind in ("policy write", "revocation write"):
                written = mtime(victim, "peermap.json")
                if kind == "policy write":
                    set_policy(admin, number)
                    policy_version += 1
                else:
                    admin.tm("revoke", "d")
                delay = rng.uniform(0.0, 0.3)
                time.sleep(delay)  # the moment to kill at, drawn by the RNG (not a wait for anything)
                sigkill(victim)
                moment = (f"{delay * 1000:.0f} ms after it, {victim.name}'s peer map "
                          f"{'already rewritten' if mtime(victim, 'peermap.json') != written else 'not yet rewritten'}")
            elif kind == "rung change":
                blocked = mesh[rng.choice(sorted(set(mesh) - {victim.name}))]
                block_path(victim, blocked, udp=True)
                delay = rng.uniform(1.0, 6.0)
                deadline = time.monotonic() + delay
                while time.monotonic() < deadline:  # keep traffic on the pair so the ladder has to move
                    pings(victim, blocked)
                rung = rung_of(victim, blocked.name)
                sigkill(victim)
                block_path(victim, blocked)  # lifted: the restart is measured, not the ladder
                moment = f"{delay:.1f} s after UDP {victim.name}<->{blocked.name} was cut, on rung {rung}"
            else:
                delay = rng.uniform(0.0, 2.0)
                time.sleep(delay)  # an idle moment drawn by the RNG
                sigkill(victim)
                moment = f"idle, {delay:.1f} s into the round"
            killed = time.monotonic()
            print(f"round {number}: {kind}: SIGKILL {victim.name} ({moment})")
            restart_after_crash(victim)
            started = time.monotonic() - killed
            pinging = until_all_pairs_ping(mesh, PING_BOUND, rng) + started
            times.append((kind, victim.name, started, pinging))
            for name, member in mesh.items():
                lost = kept(member).lost_since(before[name])
                assert not lost, f"round {number}: {name} lost {lost}"
        refused = admin.tm("up", "--detach", check=False)  # a live daemon still owns its state directory
        assert refused.returncode != 0 and f"(pid {pid_of(admin)})" in refused.stderr, refused.stderr

        # What the crashes may have delayed, every node has in the end: the revocation and the policy.
        wait_kept_everywhere(mesh.values(), lambda k: k.policy == policy_version, f"policy v{policy_version}")
        if "revocation write" in kinds[:ROUNDS]:
            wait_kept_everywhere(mesh.values(), lambda k: len(k.revocations) >= 1, "the revocation of d")
            assert all("d" not in {p["name"] for p in m.status()["peers"]} for m in mesh.values())
        print("crash -> up done -> every pair pinging (s):")
        for kind, name, started, pinging in times:
            print(f"  {kind:17} {name}: up after {started:5.2f}, all pairs ping after {pinging:5.2f}")
    finally:
        for member in mesh.values():
            member.down(check=False)


def files_of(member: MeshNode) -> dict[str, bytes]:
    """Every file in the node's state directory but the log the detached `up` appends to."""
    return {p.name: p.read_bytes() for p in sorted(Path(member.node.state_dir).iterdir())
            if p.is_file() and p.name != "tunnelmesh.log"}


def test_start_on_damaged_state_files(lab: Lab) -> None:
    mesh = build_network(lab, ["a", "b", "c"])
    b, c = mesh["b"], mesh["c"]
    rng = random.Random(0)
    try:
        wait_for_handshakes(mesh, timeout=40)
        # A truncated peer map cache: ignored, the node resyncs from the coordinator.
        b.down()
        kept_before = kept(b)
        cache = Path(b.node.state_dir) / "peermap.json"
        cache.write_bytes(cache.read_bytes()[:40])
        b.up()
        print(f"b on a truncated peermap.json: every pair pings {until_all_pairs_ping(mesh, 30, rng):.2f} s after up")
        assert "peer map cache" in b.log_tail(20000) and "ignored" in b.log_tail(20000)
        assert not kept(b).lost_since(kept_before)
        assert json.loads(cache.read_bytes())["members"]  # rewritten whole from what the coordinator sent

        # Damaged files no coordinator gives back: a clear error, exit non-zero, nothing deleted.
        c.down()
        for name, damage in (("network.json", b'{"url": "https://'), ("revocations.json", b"\x00" * 16),
                             ("bindings.json", b'{"bindings": {'), ("policy.json", b"[")):
            path = Path(c.node.state_dir) / name
            good = path.read_bytes()
            path.write_bytes(damage)
            before = files_of(c)
            refused = c.tm("up", "--detach", check=False, timeout=40)
            output = refused.stdout + refused.stderr
            assert refused.returncode != 0, f"up started on a damaged {name}:\n{output}"
            assert f"{path} is damaged" in output and "restore it from a backup" in output, output
            assert "Traceback" not in output, output
            assert files_of(c) == before, f"a start on a damaged {name} changed the state directory"
            assert "tm0" not in c.node.run("ip", "link").stdout, "a failed start left its interface"
            path.write_bytes(good)
        c.up()
        until_all_pairs_ping(mesh, 30, rng)
    finally:
        for member in mesh.values():
            member.down(check=False)
