"""Prometheus metrics end to end (docs/metrics.md): real daemons and a real standalone
coordinator in lab namespaces serve /metrics on their namespace's loopback; it is scraped
from inside the namespace and read with the Prometheus text parser. The per-peer
counters move with a few hundred pings through the tunnel and agree with `status`; the
embedded and the standalone coordinator count members and connected nodes; a bad
`[metrics]` table or a taken port stops `up` with a clear error."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.test_bad_config import leftovers, line_number, member, up
from tests.e2e.test_coordinator import run_coordinator, stop
from tests.support.wait import wait_for
from tools.lab import Lab, Node, clean_environment
from tools.mesh import MeshNode, build_network, diagnostics, wait_for_handshakes

pytestmark = pytest.mark.e2e
__all__ = ["member"]  # the fixture, used by name

LISTEN = "127.0.0.1:9469"  # each namespace has its own loopback
URL = f"http://{LISTEN}/metrics"
PINGS = 300
ECHO_BYTES = 84  # an ICMP echo of ping's default 56 data bytes, with its IPv4 header
# Scraped without any proxy, whatever the environment says.
SCRAPE = ("import sys, urllib.request; opener = urllib.request.build_opener(urllib.request.ProxyHandler({})); "
          "sys.stdout.write(opener.open(sys.argv[1], timeout=10).read().decode())")

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(node: Node) -> Samples:
    """/metrics of the process listening on the namespace's LISTEN, as Prometheus reads it."""
    text = node.run(sys.executable, "-c", SCRAPE, URL, env=clean_environment(), timeout=20).stdout
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    key = (name, tuple(sorted(labels.items())))
    assert key in samples, f"no {name}{labels} in {sorted(k for k in samples if k[0] == name)}"
    return samples[key]


def with_metrics(member: MeshNode) -> None:
    member.append_config(f'\n[metrics]\nlisten = "{LISTEN}"\n')


def peer_status(member: MeshNode, peer: str) -> dict:
    return next(p for p in member.status()["peers"] if p["name"] == peer)


def test_peer_counters_move_with_traffic_and_the_embedded_coordinator_counts_its_nodes(lab: Lab) -> None:
    mesh = build_network(lab, ["a", "b"], start=False)  # a runs: it embeds the coordinator
    a, b = mesh["a"], mesh["b"]
    for node in (a, b):
        with_metrics(node)
    a.down()
    a.up()
    b.up()
    wait_for_handshakes(mesh, timeout=40)
    context = lambda: diagnostics(mesh)  # noqa: E731 - for failure messages

    # The embedded coordinator's metrics are on the admin node's own endpoint.
    wait_for("both nodes polling a's coordinator", lambda: value(
        scrape(a.node), "tunnelmesh_coordinator_nodes_connected") == 2, 30, context, interval=0.5)
    first = scrape(a.node)
    assert value(first, "tunnelmesh_coordinator_members") == 2
    assert value(first, "tunnelmesh_peer_map_members") == 2
    on_b = scrape(b.node)
    assert value(on_b, "tunnelmesh_coordinator_connection_state", state="connected") == 1
    assert ("tunnelmesh_coordinator_members", ()) not in on_b  # b serves no coordinator
    assert value(on_b, "tunnelmesh_node_info", node="b", version=b.status()["node"]["version"],
                 mode="coordinator") == 1

    before = scrape(a.node)
    assert value(before, "tunnelmesh_peer_rung", peer="b", rung="udp") == 1
    assert value(before, "tunnelmesh_peer_rung", peer="b", rung="relay") == 0
    assert value(before, "tunnelmesh_peer_handshakes_total", peer="b") >= 1
    pinged = a.node.run("ping", "-n", "-q", "-c", str(PINGS), "-i", "0.01", "-W", "2", b.mesh_ip, check=False,
                        timeout=60)
    assert pinged.returncode == 0, f"{pinged.stdout}\n{pinged.stderr}\n{context()}"
    a.tm("ping", "b", "-c", "1")  # a round trip the daemon measures itself
    after = scrape(a.node)
    status = peer_status(a, "b")  # taken after the scrape: at least what it said

    for direction in ("tx", "rx"):  # echo requests out, replies in: one transport message each
        packets = value(after, f"tunnelmesh_peer_{direction}_packets_total", peer="b") - \
            value(before, f"tunnelmesh_peer_{direction}_packets_total", peer="b")
        sent = value(after, f"tunnelmesh_peer_{direction}_bytes_total", peer="b") - \
            value(before, f"tunnelmesh_peer_{direction}_bytes_total", peer="b")
        assert packets >= PINGS and sent >= PINGS * ECHO_BYTES, (direction, packets, sent)
        assert status[f"{direction}_packets"] >= value(after, f"tunnelmesh_peer_{direction}_packets_total", peer="b")
        assert status[f"{direction}_bytes"] >= value(after, f"tunnelmesh_peer_{direction}_bytes_total", peer="b")
    rtt = value(after, "tunnelmesh_peer_rtt_seconds", peer="b")
    assert 0 < rtt < 5 and status["rtt_ms"] is not None
    # b saw the same traffic from its side.
    on_b = scrape(b.node)
    assert value(on_b, "tunnelmesh_peer_rx_packets_total", peer="a") >= PINGS
    assert value(on_b, "tunnelmesh_actor_restarts_total", actor="mesh") == 0
    assert value(on_b, "tunnelmesh_events_dropped_total") == 0


def test_the_standalone_coordinator_serves_its_metrics(lab: Lab) -> None:
    switch = lab.add_switch("sw")
    coordinator = lab.add_node("coord")
    lab.connect(coordinator, switch)
    process = run_coordinator(coordinator, f"{coordinator.state_dir}/coordinator.db", "--metrics", LISTEN)
    try:
        mesh = build_network(lab, ["a", "b"], switch=switch, coordinator=coordinator)
        wait_for_handshakes(mesh, timeout=40)
        context = lambda: diagnostics(mesh) + coordinator.log("coordinator")[-3000:]  # noqa: E731
        wait_for("both nodes polling the coordinator", lambda: value(
            scrape(coordinator), "tunnelmesh_coordinator_nodes_connected") == 2, 30, context, interval=0.5)
        assert value(scrape(coordinator), "tunnelmesh_coordinator_members") == 2
        assert f"{URL} (no authentication)" in coordinator.log("coordinator")
    finally:
        stop(process)
    assert coordinator.run("ss", "-Htln", f"sport = :{LISTEN.rsplit(':', 1)[1]}").stdout.strip() == "", \
        "the metrics port outlived the coordinator"


@pytest.mark.parametrize(("listen", "says"), [
    ("localhost:9469", "is not an address to listen on (a host name)"),
    ("127.0.0.1", "expected IPv4:port"),
])
def test_a_bad_metrics_address_stops_up_naming_the_line(member: MeshNode, listen: str, says: str) -> None:
    path = Path(member.config_path)
    text = path.read_text() + f'\n[metrics]\nlisten = "{listen}"\n'
    path.write_text(text)
    refused = up(member)
    assert refused.returncode == 2, refused
    assert f"{path}:{line_number(text, r'listen = .*')}: [metrics]: listen" in refused.stderr, refused.stderr
    assert says in refused.stderr and 'e.g. "127.0.0.1:9469"' in refused.stderr, refused.stderr
    assert leftovers(member) == []


def test_a_taken_metrics_port_stops_up_and_leaves_nothing(member: MeshNode) -> None:
    holder = member.node.popen(sys.executable, "-c", "import socket, time; s = socket.socket(); "
                               f"s.bind(('127.0.0.1', {LISTEN.rsplit(':', 1)[1]})); s.listen(); print('bound', flush=True); "
                               "time.sleep(120)", log_name="holder")
    wait_for("the port is taken", lambda: "bound" in member.node.log("holder"), 10, lambda: "")
    with_metrics(member)
    refused = up(member)
    assert refused.returncode != 0, refused
    assert f"metrics: cannot listen on {URL}: Address already in use ([metrics] listen in" in refused.stderr, \
        refused.stderr
    assert leftovers(member) == []
    holder.terminate()
