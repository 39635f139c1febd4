"""A node under a handshake flood (issue 17, part 1), in the netns lab, real daemons.

Three members (`tools.mesh.build_network`): b (admin, embedded coordinator), a (the node
attacked) and c (joined, but its daemon is started only during the flood: a new peer
a has never had a handshake with). A hostile namespace h on the same switch runs
tests/support/handshake_sprayer.py at a's UDP port: thousands of initiations a second,
half junk, half with a valid mac1 (anyone can compute it from a's public key, which is
public), and once a cookie came back one in ten of those with a valid mac2 too.

While it sprays: a answers with cookie replies (counted at h) and limits h's initiations
that carry a valid mac2 to its per-source bucket (a's counters); c comes up with a (its
first initiation gets a cookie, and the cookie makes it go again at once with a valid
mac2);
the established b-a session loses at most 1 % of 200 pings at 20/s; a's daemon uses a
bounded share of the CPU. The figures are printed.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path

import pytest

from tools.lab import Lab, clean_environment
from tools.mesh import MeshNode, build_network, diagnostics, rung_of
from tunnelmesh.wireguard.constants import REKEY_TIMEOUT, REKEY_TIMEOUT_JITTER_MAX
from tunnelmesh.wireguard.device import HANDSHAKE_RATE_PER_SOURCE

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
FLOOD_RATE = 3000  # datagrams a second from h
FLOOD_SECONDS = 20.0  # long enough for c's whole start and 10 s of pings inside it
PINGS, PING_INTERVAL = 200, 0.05
MAX_PING_LOSS = 0.01
#: c's first initiation is answered with a cookie, and the cookie reply makes c go again
#: at once with mac2 (WireGuard would wait REKEY_TIMEOUT, 5 s and jitter: 5.2 s measured
#: before). Measured 0.33-0.48 s alone. Beside the rest of the suite on 2 cores, a's socket
#: buffer can overflow with the flood and lose c's initiation itself, which then costs
#: one retry of WireGuard's (5.07 s seen once): the bound allows that one retry.
NEW_PEER_BOUND = REKEY_TIMEOUT + REKEY_TIMEOUT_JITTER_MAX + 1.0
#: a's daemon's CPU time over the flood / its duration: boundedness, not speed. The daemon is
#: one event loop (about 1 core at most): bounded means it is not spent on the flood
#: (0.12 measured at 3,000/s, 0.21 at 8,000/s).
MAX_CORES = 0.6
MAX_RSS_GROWTH_KIB = 8 * 1024  # a's RSS after the flood less before it: nothing kept per datagram or source
SOURCE_LIMITED = "handshake over the source rate limit"


def rss_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status)[1])  # type: ignore[index]


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (fields 14 and 15 of /proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pings_once(member: MeshNode, peer: str) -> bool:
    return member.tm("ping", peer, "-c", "1", "--timeout", "1", check=False, timeout=15).returncode == 0


def under_load_lines(member: MeshNode) -> int:
    """How often the daemon logged that it went under load."""
    return Path(member.log_path).read_text(errors="replace").count("answering with cookies")


def until(condition: object, timeout: float, what: str, mesh: dict[str, MeshNode]) -> float:
    """Poll `condition` (a callable) until true; the seconds it took. Fails naming `what`."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if condition():  # type: ignore[operator]
            return time.monotonic() - start
        time.sleep(0.1)
    pytest.fail(f"{what} not within {timeout:g} s\n{diagnostics(mesh)}")


def test_a_flooded_node_answers_with_cookies_keeps_its_sessions_and_admits_a_new_peer(lab: Lab) -> None:
    switch = lab.add_switch("sw")
    mesh = build_network(lab, ["b", "a", "c"], switch=switch, start=False)
    a, b, c = mesh["a"], mesh["b"], mesh["c"]
    a.up()
    until(lambda: pings_once(b, "a"), 30, "the b-a session", mesh)
    hostile = lab.add_node("h")
    lab.connect(hostile, switch)
    node = a.status()["node"]
    pid, port = node["pid"], node["listen_port"]

    cpu_before, rss_before, started = cpu_seconds(pid), rss_kib(pid), time.monotonic()
    sprayer = hostile.popen(
        sys.executable, "-m", "tests.support.handshake_sprayer", "--target", f"{a.underlay}:{port}",
        "--public-key", node["wireguard_public_key"], "--rate", str(FLOOD_RATE), "--seconds", str(FLOOD_SECONDS),
        env={**clean_environment(), "PYTHONPATH": str(REPO)}, log_name="sprayer")
    hostile.wait_for_log("sprayer", "sprayer: spraying", timeout=15)
    # The under-load switch is on: a says so once (not per packet).
    until(lambda: under_load_lines(a) > 0, 10, "a's under-load switch", mesh)
    pinger = b.node.popen("ping", "-c", str(PINGS), "-i", str(PING_INTERVAL), "-W", "2", a.mesh_ip, log_name="ping")

    c.up()
    new_peer_seconds = until(lambda: pings_once(c, "a"), 30, "the new peer c's session with a", mesh)
    assert sprayer.poll() is None, "the flood ended before c came up: make FLOOD_SECONDS longer"

    pinger.wait(timeout=PINGS * PING_INTERVAL + 30)
    assert sprayer.poll() is None, "the flood ended before the pings did: make FLOOD_SECONDS longer"
    sprayer.wait(timeout=FLOOD_SECONDS + 30)
    cpu_used, elapsed = cpu_seconds(pid) - cpu_before, time.monotonic() - started
    rss_growth = rss_kib(pid) - rss_before
    ping_log = b.node.log("ping")
    counts = re.search(r"(\d+) packets transmitted, (\d+) received", ping_log)
    assert counts, ping_log
    sent_pings, received_pings = int(counts[1]), int(counts[2])
    spray_line = re.search(r"sprayer: result (.*)", hostile.log("sprayer"))
    assert spray_line, hostile.log("sprayer")
    spray = json.loads(spray_line[1])
    drops = a.status()["drops"]
    lines = under_load_lines(a)

    figures = {
        "initiations a second sent": spray["per_second"], "sent": spray["sent"], "flood seconds": spray["seconds"],
        "cookie replies received": spray["cookie_replies"], "other replies": spray["other_replies"],
        "new peer up after (s)": round(new_peer_seconds, 2), "pings sent": sent_pings,
        "pings lost": sent_pings - received_pings, "a's CPU (cores)": round(cpu_used / elapsed, 3),
        "a's under-load log lines": lines, "a's RSS growth (KiB)": rss_growth,
        "new peer's rung": rung_of(c, "a"),
        "a's drops": {k: v for k, v in drops.items() if "mac" in k or "handshake" in k or "initiation" in k},
    }
    print("handshake flood figures: " + json.dumps(figures))

    assert spray["per_second"] >= 1000, f"the sprayer did not flood: {figures}"
    # Cookie replies for the initiations without a valid mac2 (all but the first second's
    # worth before the switch went on).
    assert spray["cookie_replies"] >= spray["sent"]["mac1"] // 2, figures
    assert spray["other_replies"] == {}, figures  # no junk is ever answered with a handshake
    # h's initiations with a valid mac2 stay within h's bucket: the rest are counted drops.
    assert spray["sent"]["mac2"] > 0 and drops.get(SOURCE_LIMITED, 0) > 0, figures
    mac2_let_through = spray["sent"]["mac2"] - drops.get(SOURCE_LIMITED, 0)
    assert mac2_let_through <= HANDSHAKE_RATE_PER_SOURCE.burst + HANDSHAKE_RATE_PER_SOURCE.per_second * (spray["seconds"] + 1), figures
    assert new_peer_seconds <= NEW_PEER_BOUND, figures
    assert sent_pings == PINGS and sent_pings - received_pings <= PINGS * MAX_PING_LOSS, figures
    assert cpu_used / elapsed < MAX_CORES, figures
    assert rss_growth < MAX_RSS_GROWTH_KIB, figures
    assert lines == 1, figures  # one line for the flood, never one per packet
