"""Revocation on the data plane: a revoked node whose daemon keeps running.

The node (x) is cut off from the coordinator (nftables in its namespace drop
everything to and from the coordinator's address) before it is revoked, so it
never learns of it: its daemon runs on, with the peer map and session keys it
had. Every other node learns of the revocation from the coordinator and must
refuse x on every rung it used: u over UDP, s over SSH, v over the relay that u
serves (the coordinator's relay is out of x's reach). Within 10 s x's pings to
each of them fail and what x sends is refused (counted by the others); the
others keep pinging each other throughout.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.e2e.test_candidates_and_node_relays import cut_off, network
from tools.lab import Lab
from tools.mesh import MeshNode, block_path, diagnostics, rung_of

pytestmark = pytest.mark.e2e

#: How soon after `revoke` returns every other node must refuse x (issue 17).
REFUSE_WITHIN = 10.0
#: Pings between the others while x is revoked (0.2 s apart) and how many may be lost.
BACKGROUND_PINGS = 75
BACKGROUND_LOSS = 3
#: The counters (status paths containing these) of what a node refuses from a key that is no
#: member: WireGuard messages (over UDP), SSH logins, relay connections (the relay's own).
WIREGUARD_REFUSED = ("initiation from unknown key", "unknown receiver index")
SSH_REFUSED = ("refused key of no current member",)
RELAY_REFUSED = ("refusals.not a member",)


def counters(tree: Any, path: str = "") -> Iterator[tuple[str, int]]:
    """Every integer in a status document, as (dotted path, value)."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from counters(value, f"{path}.{key}" if path else str(key))
    elif isinstance(tree, list):
        for index, value in enumerate(tree):
            yield from counters(value, f"{path}[{index}]")
    elif isinstance(tree, int) and not isinstance(tree, bool):
        yield path, tree


def refusal_count(member: MeshNode, *reasons: str) -> int:
    """The sum of the counters in `member`'s status whose path names one of `reasons`."""
    return sum(value for path, value in counters(member.status()) if any(r in path for r in reasons))


def wait_for(what: str, check: Callable[[], bool], timeout: float, mesh: dict[str, MeshNode]) -> float:
    """Seconds until check() holds; fails with every node's diagnostics after `timeout`."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if check():
            return time.monotonic() - start
        time.sleep(0.2)
    pytest.fail(f"{what}: not within {timeout:g} s\n{diagnostics(mesh)}")


def pings(member: MeshNode, other: MeshNode, count: int = 1) -> bool:
    return member.node.run("ping", "-c", str(count), "-i", "0.2", "-W", "1", other.mesh_ip,
                           check=False).returncode == 0


def lost(process: subprocess.Popen, log: str, count: int) -> int:
    """Pings a background `ping -c count` lost (it printed its summary to its log)."""
    process.wait(timeout=count * 0.2 + 30)
    with open(log) as f:
        out = f.read()
    for line in out.splitlines():
        if "packets transmitted" in line:
            return count - int(line.split(",")[1].split()[0])
    raise AssertionError(f"no ping summary: {out!r}")


def test_a_revoked_node_that_keeps_running_is_refused_on_every_rung(lab: Lab) -> None:
    switch = lab.add_switch("sw", "192.0.2.0/24")
    mesh = network(lab, {"hub": [switch], "u": [switch], "s": [switch], "v": [switch], "x": [switch]},
                   configs={"u": "\n[transports]\nrelay = true\n"})
    hub, u, s, v, x = (mesh[name] for name in ("hub", "u", "s", "v", "x"))
    others = (u, s, v)
    wanted = {"u": "udp", "s": "ssh", "v": "relay"}
    background: list[tuple[str, subprocess.Popen, str]] = []
    try:
        # x loses the coordinator for good (and with it the coordinator's relay); s is reached
        # over SSH only, v over the relay only (u's: the one both can reach).
        cut_off(x, hub)
        block_path(s, x, udp=True)
        block_path(v, x, udp=True, tcp=True)

        def on_wanted_rungs() -> bool:
            for member in others:
                member.node.run("ping", "-c", "1", "-W", "1", x.mesh_ip, check=False)
                if rung_of(member, "x") != wanted[member.name] or rung_of(x, member.name) != wanted[member.name]:
                    return False
            return all(pings(a, b) for a in (*others, hub) for b in (*others, hub) if a is not b)
        wait_for("u, s, v reach x over udp, ssh, relay (both sides), all others ping", on_wanted_rungs, 90, mesh)
        for member in others:
            assert pings(x, member, count=2), f"x -> {member.name} before the revocation\n{diagnostics(mesh)}"
        x_key = x.status()["node"]["wireguard_public_key"]
        serving = u.status()["node"]["transports"]["serving_relay"]
        assert x_key in serving["peers"], serving  # x is on u's relay before it is revoked
        before = {"udp": refusal_count(u, *WIREGUARD_REFUSED), "ssh": refusal_count(s, *SSH_REFUSED),
                  "relay": refusal_count(u, *RELAY_REFUSED)}

        for a, b in ((u, s), (s, v), (v, u), (hub, u)):
            log_name = f"ping-{b.name}"
            background.append((f"{a.name}->{b.name}", a.node.popen(
                "ping", "-c", str(BACKGROUND_PINGS), "-i", "0.2", "-W", "1", b.mesh_ip, log_name=log_name),
                f"{lab.workdir}/{a.name}.{log_name}.log"))
        hub.tm("revoke", "x")
        revoked = time.monotonic()

        # Every other node drops x, and x's traffic gets through to none of them.
        def refused() -> bool:
            return (all("x" not in {p["name"] for p in m.status()["peers"]} for m in (*others, hub))
                    and x_key not in u.status()["node"]["transports"]["serving_relay"]["peers"]
                    and not any(pings(x, m) for m in others))
        took = wait_for("every other node refuses x", refused, REFUSE_WITHIN - (time.monotonic() - revoked), mesh)
        print(f"x refused by u (udp), s (ssh), v (relay) {time.monotonic() - revoked:.2f} s after revoke "
              f"({took:.2f} s of waiting)")

        # What x keeps sending is refused and counted: its handshakes and old-session data as
        # from an unknown key (u), its SSH login as no current member (s), its relay
        # connection as not a member (u's relay, which v's frames from x would cross).
        def counted() -> bool:
            x.tm("ping", "u", "-c", "1", "--timeout", "1", check=False)
            x.tm("ping", "s", "-c", "1", "--timeout", "1", check=False)
            x.tm("ping", "v", "-c", "1", "--timeout", "1", check=False)
            return (refusal_count(u, *WIREGUARD_REFUSED) > before["udp"]
                    and refusal_count(s, *SSH_REFUSED) > before["ssh"]
                    and refusal_count(u, *RELAY_REFUSED) > before["relay"])
        wait_for("u, s and u's relay count x's attempts as refused", counted, 60, mesh)
        print("refused after the revocation:", {m.name: {path: value for path, value in counters(m.status())
                                                         if any(r in path for r in (*WIREGUARD_REFUSED, *SSH_REFUSED,
                                                                                    *RELAY_REFUSED))}
                                                for m in others})
        assert not any(pings(x, m, count=2) for m in others), diagnostics(mesh)
        # x never heard of it: its daemon runs on with its old peers, the coordinator out of reach.
        assert {p["name"] for p in x.status()["peers"]} >= {"u", "s", "v"}, x.diagnostics()
        assert "revoked" not in x.log_tail(10**6), x.diagnostics()

        for pair, process, log in background:
            missing = lost(process, log, BACKGROUND_PINGS)
            assert missing <= BACKGROUND_LOSS, f"{pair}: {missing} of {BACKGROUND_PINGS} pings lost\n{diagnostics(mesh)}"
        background.clear()
    finally:
        for _, process, _ in background:
            process.kill()
            process.wait()
        for member in mesh.values():
            member.down(check=False)
