"""The network policy through the CLI, in the netns lab (issue 14, items 1-2): `init`'s
starter policy is in force on every node, `tunnelmesh policy set` on the admin's machine
reaches every node's verified map within 10 s, an invalid file is refused with its line
and changes nothing, and neither a record signed by another key nor an older record the
coordinator replays is taken by any node.

A standalone coordinator runs in its own namespace, so the test can write its SQLite
file behind its back as a coordinator operator could."""

from __future__ import annotations

import json
import sqlite3
import sys
import time
from typing import Any

import pytest

from tests.e2e.test_coordinator import run_coordinator, start_coordinator, stop, wait_until
from tests.e2e.test_packet_filter import LISTENER, connects
from tools.lab import Lab
from tools.mesh import OPEN_POLICY, MeshNode, build_network, diagnostics, wait_for_handshakes
from tunnelmesh.filter import STARTER_POLICY
from tunnelmesh.membership import AdminKey

pytestmark = pytest.mark.e2e

ADMINS_SSH = STARTER_POLICY + '''
[groups]
admins = ["admin"]

[[allow]]
from = "group:admins"
proto = "tcp"
ports = [22]
'''
#: The error is on line 4.
BAD_PORT = '[[allow]]\nfrom = "*"\nproto = "tcp"\nports = [70000]\n'
REFUSED = "network policy refused"

#: Hands the coordinator a record, with a request the admin key signs (as `policy set`
#: would); prints the answer's status and error.
SEND_AS_ADMIN = """
import asyncio, json, sys
from tunnelmesh.coordinator.client import CoordinatorError
from tunnelmesh.network import Admin
from tunnelmesh.paths import resolve_paths

async def main():
    async with Admin.load(resolve_paths(sys.argv[1], None)).coordinator() as coordinator:
        try:
            await coordinator.set_policy(json.loads(sys.argv[2]))
        except CoordinatorError as exc:
            return {"status": exc.status, "error": str(exc)}
        return {"status": 200}

print(json.dumps(asyncio.run(main())))
"""


def policy_of(member: MeshNode) -> dict[str, Any] | None:
    """What `tunnelmesh policy show --json` says this node verified."""
    return json.loads(member.tm("policy", "show", "--json").stdout)  # type: ignore[no-any-return]


def versions(mesh: dict[str, MeshNode]) -> dict[str, int | None]:
    return {name: (shown or {}).get("version") for name, shown in ((n, policy_of(m)) for n, m in mesh.items())}


def refusals(member: MeshNode) -> int:
    return int(member.status()["node"]["coordinator"]["rejected"].get(REFUSED, 0))


def stored_policy(db: str) -> dict[str, Any]:
    with sqlite3.connect(db) as conn:
        return json.loads(conn.execute("SELECT record FROM policy").fetchone()[0])  # type: ignore[no-any-return]


def replay(db: str, record: dict[str, Any]) -> None:
    """What an operator of the coordinator can do: serve any record as the latest, at a map
    version every node has yet to see."""
    with sqlite3.connect(db) as conn:
        version = conn.execute("UPDATE network SET version = version + 1 RETURNING version").fetchone()[0]
        conn.execute("UPDATE policy SET record = ?, policy_version = ?, version = ?",
                     (json.dumps(record), record["body"]["version"], version))


def test_the_network_policy_reaches_every_node_and_cannot_be_forged_or_rolled_back(lab: Lab) -> None:
    coordinator, process, db = start_coordinator(lab)
    mesh = build_network(lab, ["admin", "b", "c"], switch=lab.switches["sw"], coordinator=coordinator, policy=None)
    admin = mesh["admin"]
    state = admin.node.state_dir
    try:
        # init's starter policy, version 1, is what every node verified at its join.
        assert versions(mesh) == {"admin": 1, "b": 1, "c": 1}
        assert all(policy_of(m)["text"] == STARTER_POLICY for m in mesh.values())  # type: ignore[index]
        starter = stored_policy(db)

        # `policy set` reaches every node's verified map within 10 s.
        with open(f"{state}/admins-ssh.toml", "w") as f:
            f.write(ADMINS_SSH)
        admin.tm("policy", "set", f"{state}/admins-ssh.toml")
        took = wait_until("policy v2 on every node", lambda: set(versions(mesh).values()) == {2}, 10, mesh)
        assert all(policy_of(m)["text"] == ADMINS_SSH for m in mesh.values()), took  # type: ignore[index]

        # An invalid file is refused with its line and the reason; nothing changes.
        with open(f"{state}/bad.toml", "w") as f:
            f.write(BAD_PORT)
        proc = admin.tm("policy", "set", f"{state}/bad.toml", check=False)
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert f"{state}/bad.toml:4: network rule 1: ports: 70000: ports are 0 to 65535" in proc.stderr
        assert stored_policy(db)["body"]["version"] == 2 and set(versions(mesh).values()) == {2}

        # A record signed by another key: the coordinator refuses it, even from the admin...
        forged_body = {**stored_policy(db)["body"], "version": 3, "text": STARTER_POLICY + '\n[[allow]]\nfrom = "*"'
                       '\nproto = "any"\n', "issued": int(time.time())}
        forged = {"body": forged_body, "sig": AdminKey.generate().sign("policy", forged_body)}
        answer = json.loads(admin.node.run(sys.executable, "-c", SEND_AS_ADMIN, state, json.dumps(forged)).stdout)
        assert answer == {"status": 403, "error": "network policy v3: signature does not verify"}
        # ...and every node refuses it when its operator serves it anyway.
        stop(process)
        replay(db, forged)
        process = run_coordinator(coordinator, db)
        wait_until("every node refused the forged policy", lambda: all(refusals(m) >= 1 for m in mesh.values()),
                   30, mesh)
        for member in mesh.values():
            with open(member.log_path) as f:
                assert f"{REFUSED}: network policy v3: signature does not verify" in f.read(), member.name

        # An older record, replayed by the coordinator's operator: every node refuses it.
        stop(process)
        replay(db, starter)
        process = run_coordinator(coordinator, db)
        wait_until("every node refused the replayed policy", lambda: all(refusals(m) >= 2 for m in mesh.values()),
                   30, mesh)
        for member in mesh.values():
            with open(member.log_path) as f:
                assert f"{REFUSED}: version 1 is older than version 2, which this node has" in f.read(), member.name
        assert set(versions(mesh).values()) == {2}
        assert all(policy_of(m)["text"] == ADMINS_SSH for m in mesh.values())  # type: ignore[index]
    finally:
        for member in mesh.values():
            member.down(check=False)
        stop(process)


def test_the_embedded_coordinator_takes_inits_starter_policy_at_the_first_up(lab: Lab) -> None:
    """The usual network: the admin node's own coordinator gets the starter policy from it
    at its first start, and a node that joins verifies it."""
    mesh = build_network(lab, ["admin", "b"], policy=None)
    try:
        assert versions(mesh) == {"admin": 1, "b": 1}
        assert policy_of(mesh["b"])["text"] == STARTER_POLICY  # type: ignore[index]
    finally:
        for member in mesh.values():
            member.down(check=False)


def test_a_joiner_whose_coordinator_withholds_the_policy_denies_until_the_admin_re_sends_it(lab: Lab) -> None:
    """The invite says policy v2 is in force; the coordinator (restored from a backup older
    than any policy) serves none: the new node denies unsolicited inbound instead of
    running no filter, and `policy set` with the same file gives the coordinator its
    record back."""
    coordinator, process, db = start_coordinator(lab)
    mesh = build_network(lab, ["admin", "b"], switch=lab.switches["sw"], coordinator=coordinator)
    admin = mesh["admin"]
    try:
        assert versions(mesh) == {"admin": 2, "b": 2}
        stop(process)
        with sqlite3.connect(db) as conn:
            conn.execute("DELETE FROM policy")
        process = run_coordinator(coordinator, db)

        node = lab.add_node("c")
        mesh["c"] = joiner = MeshNode(node, lab.connect(node, lab.switches["sw"]), "")
        joiner.tm("join", admin.tm("invite").stdout.strip(), "--name", "c", "--new-key")
        with open(f"{node.state_dir}/network.json") as f:
            state = json.load(f)
        assert state["policy_expected"] == 2
        joiner.mesh_ip = state["member"]["body"]["ipv4"]
        joiner.up()
        wait_for_handshakes(mesh, timeout=20.0)  # `tunnelmesh ping`: answered whatever the filter says
        assert policy_of(joiner) is None
        in_force = joiner.status()["filter"]
        assert in_force["enabled"] and in_force["in_force"].startswith(
            "network policy v>=2 expected, not received from the coordinator yet: denying"), in_force
        for member in (mesh["b"], joiner):
            member.node.popen(sys.executable, "-c", LISTENER, member.mesh_ip, member.name, log_name="listener")
            member.node.wait_for_log("listener", "ready", timeout=10)
        assert not connects(mesh["b"], joiner, 22), diagnostics(mesh)
        assert connects(joiner, mesh["b"], 22), diagnostics(mesh)  # its own connections' replies pass

        with open(f"{admin.node.state_dir}/network-policy.toml", "w") as f:
            f.write(OPEN_POLICY)
        sent = admin.tm("policy", "set", f"{admin.node.state_dir}/network-policy.toml").stdout
        assert "v2 was sent to it again" in sent, sent
        wait_until("c verified policy v2", lambda: versions({"c": joiner}) == {"c": 2}, 10, mesh)
        wait_until("c lets b in", lambda: connects(mesh["b"], joiner, 22), 10, mesh)
    finally:
        for member in mesh.values():
            member.down(check=False)
        stop(process)
