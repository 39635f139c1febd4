"""Networks made with the coordinator, in the netns lab, driven through the CLI.

`tools.mesh.build_network`: `init` on the first node (the admin; embedded
coordinator unless a standalone `tunnelmesh coordinator` runs in its own
namespace), `invite` there, `join <token>` and `up` on the others. Real
daemons, a real aiohttp coordinator and a real SQLite file; every wait is
bounded and says what did not happen.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import sqlite3
import subprocess
import sys
import time
from typing import Any

import pytest

from tools.lab import Lab, Node
from tools.mesh import COORDINATOR_PORT, MeshNode, build_network, diagnostics, wait_for_handshakes

pytestmark = pytest.mark.e2e

TABLES = ("members", "invites", "revocations", "pending")


def ping_ok(a: MeshNode, b: MeshNode, count: int = 2) -> bool:
    return a.node.run("ping", "-c", str(count), "-i", "0.2", "-W", "2", b.mesh_ip, check=False).returncode == 0


def all_pairs_ping(mesh: dict[str, MeshNode]) -> list[str]:
    return [f"{a.name}->{b.name}" for a in mesh.values() for b in mesh.values() if a is not b and not ping_ok(a, b)]


def wait_until(what: str, check: Any, timeout: float, mesh: dict[str, MeshNode], interval: float = 0.5) -> float:
    """Seconds until check() is true; fails with diagnostics after `timeout`."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if check():
            return time.monotonic() - start
        time.sleep(interval)
    pytest.fail(f"{what}: not within {timeout:g} s\n{diagnostics(mesh)}")


def peer_names(member: MeshNode) -> set[str]:
    return {p["name"] for p in member.status()["peers"]}


def row_counts(db: str) -> dict[str, int]:
    with sqlite3.connect(db) as conn:
        return {table: conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0] for table in TABLES}


def start_coordinator(lab: Lab, name: str = "coord") -> tuple[Node, subprocess.Popen, str]:
    switch = lab.switches.get("sw") or lab.add_switch("sw")
    node = lab.add_node(name)
    lab.connect(node, switch)
    db = f"{node.state_dir}/coordinator.db"
    process = run_coordinator(node, db)
    return node, process, db


def run_coordinator(node: Node, db: str, *options: str) -> subprocess.Popen:
    process = node.popen(sys.executable, "-m", "tunnelmesh", "coordinator", "--listen",
                         f"{node.addresses[0]}:{COORDINATOR_PORT}", "--db", db, *options, log_name="coordinator")
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        probe = node.run("python3", "-c", f"import socket; socket.create_connection(('{node.addresses[0]}', "
                                           f"{COORDINATOR_PORT}), timeout=1)", check=False)
        if probe.returncode == 0:
            return process
        if process.poll() is not None:
            break
        time.sleep(0.2)
    pytest.fail(f"standalone coordinator did not start:\n{node.log('coordinator')[-3000:]}")


def kill(process: subprocess.Popen) -> None:
    """SIGKILL: the coordinator gets no chance to answer or close anything."""
    process.kill()
    process.wait(timeout=10)


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


def refusal(member: MeshNode, *args: str) -> str:
    proc = member.tm(*args, check=False)
    assert proc.returncode != 0, f"`tunnelmesh {' '.join(args)}` was accepted:\n{proc.stdout}"
    return proc.stderr


def test_three_joins_ping_and_keep_their_addresses(lab: Lab) -> None:
    mesh = build_network(lab, ["admin", "n1", "n2", "n3"])
    try:
        wait_for_handshakes(mesh, timeout=40)
        assert not all_pairs_ping(mesh), diagnostics(mesh)
        addresses = {name: member.status()["node"]["mesh_ip"] for name, member in mesh.items()}
        assert len(set(addresses.values())) == 4
        status = mesh["n1"].status()
        assert status["node"]["mode"] == "coordinator"
        assert status["node"]["coordinator"]["state"] == "connected"
        assert {p["name"] for p in status["peers"]} == {"admin", "n2", "n3"}
        # Each node also has its address in the network's IPv6 ULA /48.
        v6 = mesh["n3"].status()["node"]["mesh_ipv6"]
        assert v6.startswith("fd")
        assert mesh["n1"].node.run("ping", "-6", "-c", "2", "-i", "0.2", "-W", "2", v6, check=False).returncode == 0

        # Restart a node and the coordinator (embedded in the admin node): same addresses.
        for name in ("n2", "admin"):
            mesh[name].down()
            mesh[name].up()
        wait_for_handshakes(mesh, timeout=40)
        assert {name: member.status()["node"]["mesh_ip"] for name, member in mesh.items()} == addresses
        assert not all_pairs_ping(mesh), diagnostics(mesh)
        wait_until("n3 reconnects to the restarted coordinator",
                   lambda: mesh["n3"].status()["node"]["coordinator"]["state"] == "connected", 40, mesh)
    finally:
        for member in mesh.values():
            member.down(check=False)


def test_bad_tokens_are_refused_and_leave_nothing_behind(lab: Lab) -> None:
    mesh = build_network(lab, ["admin", "ok"])
    admin = mesh["admin"]
    db = f"{admin.node.state_dir}/coordinator.db"
    switch = lab.switches["sw"]
    other = lab.add_node("other")
    lab.connect(other, switch)
    joiner = MeshNode(other, other.addresses[0], "")
    try:
        wait_for_handshakes(mesh, timeout=30)
        before = row_counts(db)

        # A one-time token used twice ("ok" used it when it joined).
        first = admin.tm("invite").stdout.strip()
        spare = lab.add_node("spare")
        lab.connect(spare, switch)
        MeshNode(spare, spare.addresses[0], "").tm("join", first, "--name", "spare", "--new-key")
        before = row_counts(db)
        assert "already used" in refusal(joiner, "join", first, "--name", "x1", "--new-key")

        expired = admin.tm("invite", "--expires", "1s").stdout.strip()
        time.sleep(2.5)  # its lifetime passes (whole seconds); no polling: a try before then would use it
        assert "expired" in refusal(joiner, "join", expired, "--name", "x2", "--new-key")

        # A token whose grant was signed by another admin key (forged).
        elsewhere = lab.add_node("elsewhere")
        lab.connect(elsewhere, switch)
        rogue = MeshNode(elsewhere, elsewhere.addresses[0], "")
        rogue.tm("init", "--name", "rogue", "--new-key", "--url", f"https://{admin.underlay}:{COORDINATOR_PORT}")
        # Its token pins its own certificate: given the admin's, it reaches the admin's coordinator.
        foreign = with_tls(rogue.tm("invite").stdout.strip(), admin.status()["node"]["coordinator"]["tls_fingerprint"])
        # Same coordinator URL, another network: refused before anything is sent.
        assert "another network" in refusal(joiner, "join", foreign, "--name", "x3", "--new-key")
        forged = forge_token(foreign, admin_network(admin))
        assert "not signed by this network's admin key" in refusal(joiner, "join", forged, "--name", "x4", "--new-key")

        assert row_counts(db) == before
        assert not os.path.exists(f"{joiner.node.state_dir}/network.json")
    finally:
        for member in mesh.values():
            member.down(check=False)


def admin_network(admin: MeshNode) -> str:
    with open(f"{admin.node.state_dir}/network.json") as f:
        return json.load(f)["network"]["body"]["admin_key"]


def with_tls(token: str, pin: str) -> str:
    """The token with another coordinator certificate pinned (the pin is not signed: it
    only says which certificate the joiner trusts for the URL)."""
    data = token[len("tmjoin1-"):]
    payload = json.loads(base64.urlsafe_b64decode(data + "=" * (-len(data) % 4)))
    payload["tls"] = pin
    raw = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
    return "tmjoin1-" + base64.urlsafe_b64encode(raw).decode().rstrip("=")


def forge_token(token: str, network_admin_key_b64: str) -> str:
    """A token for the admin's network whose grant is signed by another key."""
    data = token[len("tmjoin1-"):]
    payload = json.loads(base64.urlsafe_b64decode(data + "=" * (-len(data) % 4)))
    fingerprint = "SHA256:" + base64.b64encode(hashlib.sha256(base64.b64decode(network_admin_key_b64)).digest()).decode().rstrip("=")
    payload["network"] = fingerprint
    payload["grant"]["body"]["network"] = fingerprint
    raw = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
    return "tmjoin1-" + base64.urlsafe_b64encode(raw).decode().rstrip("=")


@pytest.mark.long
def test_coordinator_outage_keeps_tunnels_and_cache(lab: Lab) -> None:
    coordinator, process, db = start_coordinator(lab)
    mesh = build_network(lab, ["admin", "b", "c"], switch=lab.switches["sw"], coordinator=coordinator)
    try:
        wait_for_handshakes(mesh, timeout=40)
        members_before = row_counts(db)["members"]
        assert members_before == 3
        kill(process)
        wait_until("nodes notice the coordinator is gone",
                   lambda: mesh["b"].status()["node"]["coordinator"]["state"] != "connected", 40, mesh)

        # 30 s of pings every 200 ms while it is down: at most one lost.
        result = mesh["b"].node.run("ping", "-c", "150", "-i", "0.2", "-W", "1", mesh["c"].mesh_ip,
                                    check=False, timeout=60)
        line = next(l for l in result.stdout.splitlines() if "packets transmitted" in l)
        received = int(line.split(",")[1].split()[0])
        assert received >= 149, line

        # A node restarted during the outage comes back from its cached peer map.
        mesh["c"].down()
        mesh["c"].up()
        wait_until("c reaches a and b from its cache",
                   lambda: ping_ok(mesh["c"], mesh["admin"]) and ping_ok(mesh["c"], mesh["b"]), 30, mesh)

        process = run_coordinator(coordinator, db)
        assert row_counts(db)["members"] == members_before
        wait_until("every node resyncs with the restarted coordinator",
                   lambda: all(m.status()["node"]["coordinator"]["state"] == "connected" for m in mesh.values()),
                   60, mesh)
        assert not all_pairs_ping(mesh), diagnostics(mesh)
    finally:
        for member in mesh.values():
            member.down(check=False)
        stop(process)


def test_revoke_cuts_a_node_off_and_rejoin_needs_a_new_invite(lab: Lab) -> None:
    mesh = build_network(lab, ["admin", "b", "c"])
    admin, b, c = mesh["admin"], mesh["b"], mesh["c"]
    try:
        wait_for_handshakes(mesh, timeout=40)
        reusable = admin.tm("invite", "--reusable").stdout.strip()  # older than the revocation, even of its second
        admin.tm("revoke", "c")
        start = time.monotonic()  # `revoke` returns with its second over: propagation counts from then
        fresh = admin.tm("invite").stdout.strip()  # at once: newer than the revocation
        wait_until("admin and b drop c",
                   lambda: "c" not in peer_names(admin) and "c" not in peer_names(b), 10, mesh, interval=0.2)
        dropped = time.monotonic() - start
        assert not ping_ok(c, b, count=1) and not ping_ok(c, admin, count=1)
        wait_until("c's daemon stops", lambda: c.tm("status", check=False).returncode != 0, 15, mesh)
        assert "revoked" in c.log_tail()
        print(f"revocation propagated in {dropped:.2f} s")

        assert "join again with a new invite" in refusal(c, "up", "--detach")
        # The same key: the old (reusable, older than the revocation) invite is refused...
        key = ["--key", f"{c.node.state_dir}/identity_ed25519"]
        assert "revoked" in refusal(c, "join", reusable, "--name", "c", *key)
        # ...and a new invite lets it back in.
        c.tm("join", fresh, "--name", "c", *key)
        c.up()
        wait_for_handshakes(mesh, timeout=40)
        assert ping_ok(c, b)
    finally:
        for member in mesh.values():
            member.down(check=False)


def test_tampered_database_and_replayed_entries_are_refused(lab: Lab) -> None:
    coordinator, process, db = start_coordinator(lab)
    mesh = build_network(lab, ["admin", "b", "c"], switch=lab.switches["sw"], coordinator=coordinator)
    admin, b, c = mesh["admin"], mesh["b"], mesh["c"]
    try:
        wait_for_handshakes(mesh, timeout=40)
        with sqlite3.connect(db) as conn:
            conn.row_factory = sqlite3.Row
            c_row = dict(conn.execute("SELECT * FROM members WHERE name = 'c'").fetchone())
        admin.tm("revoke", "c")
        wait_until("b drops c", lambda: "c" not in peer_names(b), 10, mesh, interval=0.2)

        # The coordinator's database is changed behind its back: the revoked entry is
        # put back (a replay of the old peer map) and a forged member is added, whose
        # entry is c's signed entry with another name (the signature no longer matches).
        with open(f"{admin.node.state_dir}/admin.key") as f:
            admin_seed = f.read().split()[1].encode()
        with open(db, "rb") as f:
            assert admin_seed not in f.read(), "the admin key is in the coordinator's database"

        # The coordinator's database is changed behind its back: the revoked entry is put
        # back (a replay of the old peer map), an entry whose signature no longer matches
        # (c's, renamed), one with no signature, and one properly signed by another key.
        with open(f"{admin.node.state_dir}/network.json") as f:
            network = json.load(f)["network"]
        rows = [dict(c_row)]
        for number, (name, entry) in enumerate(tampered_entries(c_row["entry"], network), 6):
            rows.append(dict(c_row, wg_key=base64.b64encode(os.urandom(32)).decode(), name=name,
                             host=number, ipv4=entry["body"]["ipv4"], entry=json.dumps(entry)))
        with sqlite3.connect(db) as conn:
            version = conn.execute("SELECT version FROM network").fetchone()[0] + 1
            conn.execute("UPDATE network SET version = ?", (version,))
            for row in rows:
                row["version"] = version
                conn.execute(f"INSERT INTO members ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})",
                             tuple(row.values()))
        # The write bypassed the coordinator's wakeups: restart it so that the nodes' next
        # poll gets the tampered rows.
        stop(process)
        process = run_coordinator(coordinator, db)
        wait_until("the tampered entries reach the nodes and are refused (all four)",
                   lambda: all(sum(m.status()["node"]["coordinator"]["rejected"].values()) >= 4 for m in (admin, b)),
                   40, mesh)
        for member in (admin, b):
            assert {"c", *INTRUDERS}.isdisjoint(peer_names(member)), diagnostics(mesh)
        # And a node restarted from its cache still refuses them.
        b.down()
        b.up()
        wait_until("b reconnects", lambda: b.status()["node"]["coordinator"]["state"] == "connected", 40, mesh)
        assert {"c", *INTRUDERS}.isdisjoint(peer_names(b)), diagnostics(mesh)
        assert not ping_ok(c, b, count=1)
    finally:
        for member in mesh.values():
            member.down(check=False)
        stop(process)


INTRUDERS = ("renamed", "unsigned", "otheradmin")


def tampered_entries(entry_json: str, network: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """Member entries a database writer could make from a real one (c's)."""
    from tunnelmesh.membership import AdminKey, NetworkInfo, sign_member_as_admin

    info = NetworkInfo.from_wire(network)
    out = []
    for number, name in enumerate(INTRUDERS, 6):
        entry = json.loads(entry_json)
        ipv4, ipv6 = info.host(number)
        entry["body"].update(name=name, ipv4=str(ipv4), ipv6=str(ipv6))
        if name == "unsigned":
            entry = {"body": entry["body"], "admin_sig": base64.b64encode(bytes(64)).decode()}
        elif name == "otheradmin":
            entry = sign_member_as_admin(entry["body"], AdminKey.generate())
        out.append((name, entry))
    return out


def test_join_by_approval(lab: Lab) -> None:
    mesh = build_network(lab, ["admin", "b"])
    admin = mesh["admin"]
    node = lab.add_node("late")
    lab.connect(node, lab.switches["sw"])
    late = MeshNode(node, node.addresses[0], "")
    try:
        url = f"https://{admin.underlay}:{COORDINATOR_PORT}"
        network = admin.status()["node"]["coordinator"]["network"]
        pin = admin.status()["node"]["coordinator"]["tls_fingerprint"]
        assert "--network" in refusal(late, "join", url, "--name", "late", "--new-key")
        # Without the pin, the coordinator's own certificate is refused, and the error says where to find it.
        unpinned = refusal(late, "join", url, "--name", "late", "--new-key", "--network", network)
        assert "certificate verify failed" in unpinned and "--tls-fingerprint" in unpinned, unpinned
        wrong = "sha256:" + "0" * 64
        mismatch = refusal(late, "join", url, "--name", "late", "--new-key", "--network", network,
                           "--tls-fingerprint", wrong)
        assert wrong in mismatch and pin in mismatch, mismatch
        joining = node.popen(sys.executable, "-m", "tunnelmesh", "--state-dir", node.state_dir, "join", url,
                             "--name", "late", "--new-key", "--wait", "60s", "--network", network,
                             "--tls-fingerprint", pin, log_name="join")
        wait_until("the request shows as pending", lambda: "late" in admin.tm("pending").stdout, 20, mesh)
        printed = node.wait_for_log("join", r"--fingerprint (SHA256:\S+)`")
        fingerprint = re.search(r"--fingerprint (SHA256:\S+)`", printed).group(1)
        # The admin checks the key: a wrong fingerprint approves nothing.
        wrong = "SHA256:" + "A" * 43
        assert "not approved" in refusal(admin, "approve", "late", "--fingerprint", wrong)
        admin.tm("approve", "late", "--fingerprint", fingerprint)
        assert joining.wait(timeout=30) == 0, node.log("join")
        late.up()
        mesh["late"] = late
        with open(f"{node.state_dir}/network.json") as f:
            late.mesh_ip = json.load(f)["member"]["body"]["ipv4"]
        wait_for_handshakes(mesh, timeout=40)
        assert ping_ok(late, mesh["b"])
    finally:
        for member in mesh.values():
            member.down(check=False)


def test_rotate_secret_reaches_current_members(lab: Lab) -> None:
    mesh = build_network(lab, ["admin", "b", "c"])
    admin = mesh["admin"]
    try:
        wait_for_handshakes(mesh, timeout=40)
        before = {name: read_secret(m) for name, m in mesh.items()}
        assert len(set(before.values())) == 1
        admin.tm("revoke", "c")
        admin.tm("rotate-secret")
        current = ("admin", "b")
        wait_until("admin and b install the new secret",
                   lambda: all(read_secret(mesh[n]) not in ("", before[n]) for n in current), 15, mesh)
        assert read_secret(mesh["admin"]) == read_secret(mesh["b"])
        # A fresh handshake under the new PSK: restart b.
        mesh["b"].down()
        mesh["b"].up()
        wait_until("b and admin handshake with the new secret", lambda: ping_ok(mesh["b"], admin), 30, mesh)
    finally:
        for member in mesh.values():
            member.down(check=False)


def read_secret(member: MeshNode) -> str:
    try:
        with open(f"{member.node.state_dir}/network.secret") as f:
            return f.read().strip()
    except OSError:
        return ""
