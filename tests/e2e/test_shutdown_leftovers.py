"""Nothing left behind after `down` (issue 12, item 4): two coordinator-mode daemons
with the SSH rung carrying their traffic (dials and links), the coordinator's relay
and a relay on a node connected, are stopped with `down`; each exits 0 and its log
has no "left behind at shutdown" line (actors.runtime.Leftovers: tasks, file
descriptors and threads that were not there when the daemon started).

The daemons run in the foreground (not `up --detach`) so that their exit status is
the test's to see."""

from __future__ import annotations

import subprocess
import time

import pytest

from tools.lab import Lab, clean_environment
from tools.mesh import TUNNELMESH, MeshNode, build_network, diagnostics, rung_of, wait_for_handshakes

pytestmark = pytest.mark.e2e

LEFT_BEHIND = "left behind at shutdown"
#: a serves a relay of its own; the pair is kept to SSH, so a dials or is dialled at once.
CONFIGS = {"a": '\n[transports]\nrelay = true\n\n[transports.peers.b]\nforce = "ssh"\n',
           "b": '\n[transports.peers.a]\nforce = "ssh"\n'}


def start_in_foreground(member: MeshNode) -> subprocess.Popen:
    process = member.node.popen(*TUNNELMESH, "--state-dir", str(member.node.state_dir), "up", log_name="daemon",
                                env={**clean_environment(), **member.env})
    member.node.wait_for_log("daemon", r"tunnelmesh \S+ up: ", timeout=40)
    return process


def relays_connected(member: MeshNode, node_relays: int) -> bool:
    transports = member.status()["node"]["transports"]
    return (transports["relay"]["state"] == "connected"
            and sum(r["state"] == "connected" for r in transports["node_relays"]) >= node_relays)


def test_down_leaves_no_task_fd_or_thread_behind_and_exits_0(lab: Lab) -> None:
    mesh = build_network(lab, ["a", "b"], start=False)  # a runs (detached): it embeds the coordinator
    a, b = mesh["a"], mesh["b"]
    a.down()  # to run it again in the foreground, with its config below
    assert LEFT_BEHIND not in a.log_tail(1 << 20), a.log_tail()
    for member in (a, b):
        member.append_config(CONFIGS[member.name])
    processes = {member.name: start_in_foreground(member) for member in (a, b)}
    try:
        wait_for_handshakes(mesh, timeout=40)
        assert rung_of(a, "b") == "ssh" and rung_of(b, "a") == "ssh", diagnostics(mesh)
        pong = a.tm("ping", "b", "-c", "3", check=False)
        assert pong.returncode == 0, (pong.stdout, pong.stderr)
        # b holds the coordinator's relay and a's; a the coordinator's and its own (loopback).
        deadline = time.monotonic() + 40
        while not (relays_connected(a, 1) and relays_connected(b, 1)):
            assert time.monotonic() < deadline, f"relays not connected within 40 s\n{diagnostics(mesh)}"
            time.sleep(0.5)
    finally:
        for member in (b, a):
            member.down(check=False)
    codes = {name: process.wait(timeout=30) for name, process in processes.items()}
    logs = {member.name: member.node.log("daemon") for member in (a, b)}
    for name, log in logs.items():
        assert "tunnelmesh down: down requested" in log, log[-3000:]
        assert LEFT_BEHIND not in log, "\n".join(line for line in log.splitlines() if LEFT_BEHIND in line)
    assert codes == {"a": 0, "b": 0}, {name: logs[name][-3000:] for name in codes}
