"""The coordinator's STUN reflection service, a real `tunnelmesh coordinator` process (and
the admin node's embedded coordinator) in a lab namespace: it answers Binding requests
(and RFC 5780 changes of port and address from its other sockets), and under a flood from 200 source addresses with
oversized and garbage datagrams mixed in it answers only Binding requests, within the
rate limiter's overall bound, and counts the rest in its metrics."""

from __future__ import annotations

import json
import sys
import urllib.parse

import pytest

from tests.e2e.test_coordinator import run_coordinator
from tools.lab import PROJECT_ROOT, Lab, Node, clean_environment
from tools.mesh import COORDINATOR_PORT, build_network
from tunnelmesh.coordinator.reflection import OVERALL_RATE, PER_SOURCE_RATE

pytestmark = pytest.mark.e2e

METRICS_PORT = 9400
FLOOD_SOURCES, FLOOD_ROUNDS = 200, 10


def stun_client(node: Node, *args: str) -> dict:
    env = clean_environment() | {"PYTHONPATH": str(PROJECT_ROOT)}
    proc = node.run(sys.executable, "-m", "tests.support.stun_flood", *args, env=env, timeout=90)
    return json.loads(proc.stdout)


def scrape(node: Node) -> dict[str, float]:
    """The coordinator's STUN samples, by name and labels as written."""
    url = f"http://{node.addresses[0]}:{METRICS_PORT}/metrics"
    text = node.run("python3", "-c", f"import urllib.request; print(urllib.request.urlopen({url!r}, "
                                     "timeout=5).read().decode())").stdout
    return {name: float(value) for name, _, value in (line.rpartition(" ") for line in text.splitlines())
            if name.startswith("tunnelmesh_coordinator_stun_")}


def coordinator_and_client(lab: Lab, *options: str, extra_address: str | None = None) -> tuple[Node, Node]:
    switch = lab.add_switch("sw")
    coordinator, client = lab.add_node("coord"), lab.add_node("client")
    lab.connect(coordinator, switch)
    lab.connect(client, switch)
    if extra_address is not None:
        coordinator.run("ip", "addr", "add", f"{extra_address}/24", "dev", coordinator.interfaces[0])
    run_coordinator(coordinator, f"{coordinator.state_dir}/coordinator.db", "--plain-http",
                    "--metrics", f"{coordinator.addresses[0]}:{METRICS_PORT}", *options)
    return coordinator, client


def test_the_standalone_coordinator_answers_from_each_of_its_addresses_and_ports(lab: Lab) -> None:
    second = "192.0.2.200"
    coordinator, client = coordinator_and_client(lab, "--stun-alternate", f"{second}:{COORDINATOR_PORT + 1}",
                                                 extra_address=second)
    first = coordinator.addresses[0]
    answers = stun_client(client, "ask", first, str(COORDINATOR_PORT))
    plain, port, address = answers["plain"], answers["change_port"], answers["change_ip"]
    assert plain is not None and port is not None and address is not None, answers
    assert plain["ours"] and plain["mapped"] == [client.addresses[0], answers["local"][1]]
    assert plain["source"] == plain["origin"] == [first, COORDINATOR_PORT]
    assert plain["other"] == [second, COORDINATOR_PORT + 1]
    assert port["source"] == port["origin"] == [first, COORDINATOR_PORT + 1]
    assert address["source"] == address["origin"] == [second, COORDINATOR_PORT]
    assert all(answer["size"] <= answer["request_size"] for answer in (plain, port, address))
    samples = scrape(coordinator)
    assert samples["tunnelmesh_coordinator_stun_answered_total"] == 3
    assert "STUN reflection on UDP" in coordinator.log("coordinator")


def test_a_flood_from_many_sources_is_answered_within_the_limiters_bound(lab: Lab) -> None:
    coordinator, client = coordinator_and_client(lab)
    # 200 source addresses on the client; the coordinator routes them back to it
    sources = "198.51.100.0/24"
    client.run("ip", "-batch", "-", input="".join(f"addr add 198.51.100.{i}/32 dev {client.interfaces[0]}\n"
                                                  for i in range(1, FLOOD_SOURCES + 1)))
    coordinator.run("ip", "route", "add", sources, "via", client.addresses[0])
    report = stun_client(client, "flood", coordinator.addresses[0], str(COORDINATOR_PORT), "--sources", sources,
                         "--count", str(FLOOD_SOURCES), "--rounds", str(FLOOD_ROUNDS))
    answers = report["answers"]
    answered = sum(answers.values())
    assert report["unexpected"] == 0, report  # nothing but answers to its Binding requests came back
    assert answered > 0 and report["last_answer"] is not None, report
    window = report["last_answer"] - report["first_send"]  # every answer was sent within it
    assert answered <= OVERALL_RATE.burst + OVERALL_RATE.per_second * window, (answered, window)
    assert max(answers.values()) <= PER_SOURCE_RATE.burst + PER_SOURCE_RATE.per_second * window
    assert answered < report["requests"] == FLOOD_SOURCES * FLOOD_ROUNDS  # the limiter did refuse some

    samples = scrape(coordinator)
    assert samples["tunnelmesh_coordinator_stun_answered_total"] == answered
    dropped = {urllib.parse.unquote(name.split('reason="')[1].rstrip('"}')): value for name, value in samples.items()
               if name.startswith("tunnelmesh_coordinator_stun_dropped_total")}
    assert dropped["rate-limited"] > 0 and dropped["send-failed"] == 0
    # the oversized and the garbage were dropped for what they were, before the limiter
    assert dropped["oversized"] > 0 and dropped["not-stun"] > 0
    seen = answered + sum(dropped.values())  # at most what was sent (the kernel may drop some on a full buffer)
    assert seen <= report["sent"]
    # it is still there and answers a newcomer once the flood is over
    again = stun_client(client, "ask", coordinator.addresses[0], str(COORDINATOR_PORT))
    assert again["plain"] is not None and again["plain"]["ours"]


def test_the_embedded_coordinator_answers_by_default_on_its_port_and_the_next(lab: Lab) -> None:
    mesh = build_network(lab, ["admin", "member"])
    admin, member = mesh["admin"], mesh["member"]
    answers = stun_client(member.node, "ask", admin.underlay, str(COORDINATOR_PORT))
    plain, port = answers["plain"], answers["change_port"]
    assert plain is not None and plain["mapped"] == [member.underlay, answers["local"][1]], answers
    assert plain["origin"] == [admin.underlay, COORDINATOR_PORT] and plain["other"] == [admin.underlay,
                                                                                         COORDINATOR_PORT + 1]
    assert port is not None and port["source"] == [admin.underlay, COORDINATOR_PORT + 1]
    assert answers["change_ip"] is None  # one address: no change of address, and no answer
