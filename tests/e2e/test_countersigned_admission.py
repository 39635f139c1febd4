"""Admission through the CLI, in the netns lab: the admin's daemon countersigns joins
made with an invite, and neither an invite key nor the coordinator's database can admit
or rebind a member without it (issue 13, defects 1 and 2).

A standalone coordinator runs in its own namespace, so the test can write its SQLite
file behind its back as a coordinator operator could."""

from __future__ import annotations

import sqlite3

import pytest

from tests.e2e.test_coordinator import peer_names, start_coordinator, stop
from tools.lab import Lab
from tools.mesh import MeshNode, build_network, wait_for_handshakes

pytestmark = pytest.mark.e2e


def join(lab: Lab, name: str, token: str, *, as_name: str | None = None) -> tuple[MeshNode, str, int]:
    """A new node in the lab tries `join`; its stderr and exit code."""
    node = lab.add_node(name)
    member = MeshNode(node, lab.connect(node, lab.switches["sw"]), "")
    proc = member.tm("join", token, "--name", as_name or name, "--new-key", "--wait", "30", check=False)
    return member, proc.stderr + proc.stdout, proc.returncode


def test_only_the_admins_countersignature_admits(lab: Lab) -> None:
    coordinator, process, db = start_coordinator(lab)
    mesh = build_network(lab, ["admin", "b"], switch=lab.switches["sw"], coordinator=coordinator)
    admin, b = mesh["admin"], mesh["b"]
    try:
        wait_for_handshakes(mesh, timeout=40)
        # A one-time invite admits x; the admin then revokes x.
        once = admin.tm("invite").stdout.strip()
        x, out, code = join(lab, "x", once)
        assert code == 0, out
        admin.tm("revoke", "x")

        # The coordinator's operator resets the invite's use count: the coordinator itself
        # would take the token again, and y -- a new key holding x's used one-time token --
        # asks to join. The admin's machine counts every use it ever countersigned.
        with sqlite3.connect(db) as conn:
            conn.execute("UPDATE invites SET used = 0")
        _, out, code = join(lab, "y", once)
        assert code != 0 and "already used 1 time(s)" in out, out

        # The operator drops b's row: the coordinator proposes b's name to another key.
        # The admin's kept bindings refuse it; b stays b everywhere.
        with sqlite3.connect(db) as conn:
            conn.execute("DELETE FROM members WHERE name = 'b'")
        fresh = admin.tm("invite").stdout.strip()
        _, out, code = join(lab, "z", fresh, as_name="b")
        assert code != 0 and "name b is bound to another member's key" in out, out

        # An invite the admin revoked admits nobody, whatever the coordinator says.
        made = admin.tm("invite")
        invite_id = made.stderr.split()[1].rstrip(";")
        assert "revoked" in admin.tm("invite", "--revoke", invite_id).stdout
        _, out, code = join(lab, "w", made.stdout.strip())
        assert code != 0 and "the admin revoked this invite" in out, out
        listing = admin.tm("invites").stdout
        assert invite_id in listing and "revoked" in listing

        # Nobody but admin and b is a member anywhere.
        assert peer_names(admin) == {"b"} and peer_names(b) == {"admin"}
    finally:
        for member in mesh.values():
            member.down(check=False)
        stop(process)
