"""A real ssh-agent drives a two-node static mesh in the netns lab (docs/identity.md), and
a member that joins a coordinator network with an agent key.

One agent holds an Ed25519 and an RSA key (ssh-keygen's); `init --agent ... --agent-socket
PATH` picks one per node (by fingerprint, by comment) in an environment without
SSH_AUTH_SOCK (as under sudo) and writes `[node] agent_socket`, through which the daemons
reach the agent. Killing the agent while
the mesh runs keeps the sessions up and status says the agent is gone; a daemon started
before its key is in the agent waits, says so, and comes up once `ssh-add` adds it.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.ssh_agent import Agent, keygen, openssh_fingerprint, require_openssh, running_agent
from tests.support.wait import wait_for
from tools.lab import Lab
from tools.mesh import MeshNode, build_network, build_static_mesh, diagnostics, wait_for_handshakes

pytestmark = pytest.mark.e2e

WAIT = 30.0  # s: generous bound for a daemon to come up or a status to change


@dataclass(frozen=True)
class AgentKeys:
    agent: Agent
    ed25519: Path
    rsa: Path

    def fingerprint(self, key: Path) -> str:
        return openssh_fingerprint(Path(f"{key}.pub"))


@pytest.fixture
def agent_keys(tmp_path: Path) -> Iterator[AgentKeys]:
    require_openssh()
    ed25519 = keygen(tmp_path / "id_ed25519", "-t", "ed25519", comment="node-a@lab")
    rsa = keygen(tmp_path / "id_rsa", "-t", "rsa", "-b", "3072", comment="node-b@lab")
    with running_agent(str(tmp_path / "agent.sock")) as agent:
        agent.add(ed25519)
        agent.add(rsa)
        yield AgentKeys(agent, ed25519, rsa)


def agent_mesh(lab: Lab, keys: AgentKeys) -> dict[str, MeshNode]:
    """Nodes a (Ed25519, chosen by fingerprint) and b (RSA, chosen by comment), not started;
    init was given the agent socket, their environment has none."""
    socket = ["--agent-socket", keys.agent.sock]
    mesh = build_static_mesh(lab, ["a", "b"], start=False,
                             identity_args={"a": ["--agent", keys.fingerprint(keys.ed25519), *socket],
                                            "b": ["--agent", "node-b@lab", *socket]})
    for member, key in ((mesh["a"], keys.ed25519), (mesh["b"], keys.rsa)):
        text = Path(member.config_path).read_text()
        assert f'identity = "agent:{keys.fingerprint(key)}"\n' in text, text  # init pinned the key by fingerprint
        assert f'agent_socket = "{keys.agent.sock}"' in text, text
    return mesh


def agent_status(member: MeshNode) -> dict[str, object]:
    status = member.status()["node"]
    assert status["agent"] is not None, status
    return status  # type: ignore[no-any-return]


def ping(src: MeshNode, dst: MeshNode) -> None:
    result = src.tm("ping", dst.name, "-c", "1", "--timeout", "3", check=False)
    assert result.returncode == 0, f"{src.name} -> {dst.name}: {result.stdout}{result.stderr}"


def test_agent_mesh_survives_the_agent_going_away(lab: Lab, agent_keys: AgentKeys) -> None:
    mesh = agent_mesh(lab, agent_keys)
    a, b = mesh["a"], mesh["b"]
    for member in mesh.values():
        member.up()
    try:
        wait_for_handshakes(mesh)
        ping(a, b)
        ping(b, a)
        for member, key in ((a, agent_keys.ed25519), (b, agent_keys.rsa)):
            node = agent_status(member)
            assert node["fingerprint"] == agent_keys.fingerprint(key)
            assert node["identity_source"] == f"ssh-agent at {agent_keys.agent.sock}"
            assert node["agent"] == {"socket": agent_keys.agent.sock, "fingerprint": node["fingerprint"],
                                     "state": "holds the key", "needed_for": []}

        agent_keys.agent.stop()
        for member in mesh.values():  # status keeps its look at the agent for a few seconds
            wait_for(f"{member.name}'s status to see the agent gone",
                     lambda m=member: agent_status(m)["agent"]["state"] == "unreachable",  # type: ignore[index]
                     WAIT, member.diagnostics, interval=0.5)
            agent = agent_status(member)["agent"]
            assert "a restart" in agent["needed_for"], agent  # type: ignore[index]
            text = member.tm("status").stdout
            assert f"ssh-agent at {agent_keys.agent.sock}: unreachable (running sessions go on)" in text, text
        for _ in range(3):  # the sessions go on: the mesh key is in memory
            ping(a, b)
            ping(b, a)
        assert all(p["state"] == "up" for member in mesh.values() for p in member.status()["peers"])
    except Exception:
        print(diagnostics(mesh))
        raise


def test_daemon_waits_for_its_key_then_comes_up(lab: Lab, agent_keys: AgentKeys) -> None:
    mesh = agent_mesh(lab, agent_keys)
    a, b = mesh["a"], mesh["b"]
    ssh_add = {"SSH_AUTH_SOCK": agent_keys.agent.sock, "PATH": "/usr/bin:/bin"}
    subprocess.run(["ssh-add", "-d", f"{agent_keys.ed25519}.pub"], env=ssh_add, check=True, capture_output=True)
    b.up()
    try:
        started = a.tm("up", "--detach", timeout=40).stdout  # returns: it does not wait for the agent
        fingerprint = agent_keys.fingerprint(agent_keys.ed25519)
        waiting = f"waiting for the ssh-agent at {agent_keys.agent.sock} to hold key {fingerprint}: ssh-add it"
        assert "tunnelmesh started" in started and waiting in started, started
        status = a.tm("status", check=False)
        assert status.returncode == 1 and waiting in status.stderr and "tunnelmesh down" in status.stderr, status
        assert re.search(r"WARNING tunnelmesh.daemon: " + re.escape(waiting), a.log_tail()), a.log_tail()

        subprocess.run(["ssh-add", str(agent_keys.ed25519)], env=ssh_add, check=True, capture_output=True)
        wait_for("a up once its key is in the agent", lambda: a.tm("status", check=False).returncode == 0, WAIT,
                 a.diagnostics, interval=0.5)
        assert agent_status(a)["agent"]["state"] == "holds the key"  # type: ignore[index]
        wait_for_handshakes(mesh)
        ping(a, b)
    except Exception:
        print(diagnostics(mesh))
        raise


def test_a_member_joins_a_network_with_an_agent_key_and_keeps_its_tunnel_without_the_agent(
        lab: Lab, agent_keys: AgentKeys) -> None:
    """`join TOKEN --agent COMMENT --agent-socket PATH` (no SSH_AUTH_SOCK): the member's
    config pins the key and names the socket; it joins, comes up and pings the admin's
    node; with the agent gone its tunnel goes on and status names the coordinator requests
    among what needs the agent back."""
    mesh = build_network(lab, ["hub", "b"], identity_args={
        "b": ["--agent", "node-b@lab", "--agent-socket", agent_keys.agent.sock]})
    hub, b = mesh["hub"], mesh["b"]
    try:
        text = Path(b.config_path).read_text()
        assert f'identity = "agent:{agent_keys.fingerprint(agent_keys.rsa)}"\n' in text, text
        assert f'agent_socket = "{agent_keys.agent.sock}"' in text, text
        wait_for_handshakes(mesh)
        ping(b, hub)
        assert agent_status(b)["identity_source"] == f"ssh-agent at {agent_keys.agent.sock}"

        agent_keys.agent.stop()
        wait_for("b's status to see the agent gone",
                 lambda: agent_status(b)["agent"]["state"] == "unreachable",  # type: ignore[index]
                 WAIT, b.diagnostics, interval=0.5)
        needed = agent_status(b)["agent"]["needed_for"]  # type: ignore[index]
        assert "a restart" in needed and any(n.startswith("requests to the coordinator") for n in needed), needed
        for _ in range(3):
            ping(b, hub)
            ping(hub, b)
    except Exception:
        print(diagnostics(mesh))
        raise
