"""The daemon's Prometheus metrics (actors/metrics.py, tunnelmesh/metrics.py): a status
snapshot becomes metric families that the Prometheus text parser reads back with the
snapshot's values; any status renders; the endpoint answers 503 until the daemon's
status is there; `[metrics]` in the config and its listen address are checked."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from hypothesis import HealthCheck, given, settings
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from actors.messages import (
    ActorStatus, CoordinatorStatus, FilterStatus, NodeStatus, PeerStatus, RelayServerStatus, Status, TransportsStatus, from_json,
    to_json,
)
from actors.metrics import MetricsEndpoint, StatusCollector
from tests.unit.test_config import load, load_error
from tests.unit.test_control_schema import PEER, instances
from tunnelmesh.coordinator.app import serve
from tunnelmesh.fields import FieldError
from tunnelmesh.metrics import DEFAULT_METRICS_LISTEN, metrics_app, parse_listen

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape_text(*collectors: Collector) -> str:
    registry = CollectorRegistry(auto_describe=False)
    for collector in collectors:
        registry.register(collector)
    return generate_latest(registry).decode()


def samples(text: str) -> tuple[Samples, dict[str, str]]:
    """Every sample by (name, sorted labels), and each family's type, as Prometheus reads them."""
    values: Samples = {}
    types = {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        for sample in family.samples:
            values[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return values, types


def node(**changes: Any) -> NodeStatus:
    base = NodeStatus(
        name="alpha", mesh_ip="100.100.0.1", mesh_ipv6=None, interface="tm0", listen_port=51820, version="0.1",
        started=1700000000.0, pid=42, mode="coordinator", fingerprint="SHA256:x", ssh_public_key="ssh-ed25519 AAAA",
        wireguard_public_key="AAAA", coordinator=None, serving_coordinator=None, admission=None,
        transports=TransportsStatus(ssh=None, relay=None, node_relays=(), serving_relay=None), events_dropped=3,
        actors=(ActorStatus("mesh", queued=2, dropped=0, restarts=1, task_failures=0, tasks=0),
                ActorStatus("sessions", queued=0, dropped=5, restarts=0, task_failures=1, tasks=2)),
    )
    return dataclasses.replace(base, **changes)


BETA = dataclasses.replace(PEER, rx_packets=7, tx_packets=9, handshakes=2, rtt_ms=12.5,
                           drops={"replayed counter": 3, "inner source not allowed for peer": 1})
GAMMA = dataclasses.replace(PEER, name="gamma", path=None, state="waiting", last_handshake=None, rx_bytes=0,
                            tx_bytes=0)  # no path, nothing measured yet


def coordinator(state: str) -> CoordinatorStatus:
    return CoordinatorStatus(url="https://192.0.2.1:7400", network="SHA256:n", state=state, tls_fingerprint=None,
                             since=1.0, error=None, version=17, observed=None, members=3, revocations=0, rejected={})


def test_a_status_snapshot_reads_back_as_the_same_values() -> None:
    relay = RelayServerStatus(connections=2, peers={}, drops={"receiver slow": 4}, refusals={}, relayed_frames=30,
                              relayed_bytes=4096)
    status = Status(node=node(coordinator=coordinator("connected"),
                              transports=TransportsStatus(ssh=None, relay=None, node_relays=(), serving_relay=relay)),
                    peers=(BETA, GAMMA), drops={"no peer for destination": 6, "udp send: No buffer space available": 1},
                    filter=FilterStatus(enabled=True, in_force="", policy_version=1, node_rules=0, error=None,
                                        warnings=(), drops={"denied": 5, "spoofed": 1}, spoofed_by_peer={"b": 1},
                                        rules=(), flows=2, max_flows=10, max_flows_per_peer=4, related=0,
                                        denied_by_peer={"b": 4, "gamma": 1}))
    values, types = samples(scrape_text(StatusCollector(status)))

    def at(name: str, **labels: str) -> float:
        return values[(name, tuple(sorted(labels.items())))]

    assert at("tunnelmesh_peer_rx_bytes_total", peer="b") == 10 and at("tunnelmesh_peer_tx_bytes_total", peer="b") == 20
    assert at("tunnelmesh_peer_rx_packets_total", peer="b") == 7 and at("tunnelmesh_peer_tx_packets_total", peer="b") == 9
    assert at("tunnelmesh_peer_handshakes_total", peer="b") == 2 and at("tunnelmesh_peer_rung_changes_total", peer="b") == 1
    assert at("tunnelmesh_peer_rx_bytes_total", peer="gamma") == 0
    assert [at("tunnelmesh_peer_rung", peer="b", rung=r) for r in ("udp", "ssh", "relay")] == [1, 0, 0]
    assert [at("tunnelmesh_peer_rung", peer="gamma", rung=r) for r in ("udp", "ssh", "relay")] == [0, 0, 0]
    assert at("tunnelmesh_peer_state", peer="gamma", state="waiting") == 1
    assert at("tunnelmesh_peer_state", peer="gamma", state="up") == 0
    assert at("tunnelmesh_peer_rtt_seconds", peer="b") == pytest.approx(0.0125)
    assert ("tunnelmesh_peer_rtt_seconds", (("peer", "gamma"),)) not in values  # none measured: no sample
    assert at("tunnelmesh_peer_last_handshake_timestamp_seconds", peer="b") == 1700000001.0
    assert at("tunnelmesh_drops_total", reason="no peer for destination") == 6
    assert at("tunnelmesh_peer_drops_total", peer="b", reason="replayed counter") == 3
    assert at("tunnelmesh_peer_drops_total", peer="b", reason="inner source not allowed for peer") == 1
    assert not any(name == "tunnelmesh_peer_drops_total" and ("peer", "gamma") in labels for name, labels in values)
    assert at("tunnelmesh_filter_drops_total", reason="denied") == 5 and at("tunnelmesh_filter_flows") == 2
    assert at("tunnelmesh_filter_denied_total", peer="b") == 4 and at("tunnelmesh_filter_denied_total", peer="gamma") == 1
    assert at("tunnelmesh_filter_spoofed_total", peer="b") == 1
    assert at("tunnelmesh_actor_restarts_total", actor="mesh") == 1
    assert at("tunnelmesh_actor_mailbox_depth", actor="mesh") == 2
    assert at("tunnelmesh_actor_mailbox_dropped_total", actor="sessions") == 5
    assert at("tunnelmesh_actor_task_failures_total", actor="sessions") == 1
    assert at("tunnelmesh_events_dropped_total") == 3
    assert [at("tunnelmesh_coordinator_connection_state", state=s) for s in ("connecting", "connected", "error")] \
        == [0, 1, 0]
    assert at("tunnelmesh_peer_map_version") == 17 and at("tunnelmesh_peer_map_members") == 3
    assert at("tunnelmesh_relay_relayed_frames_total") == 30 and at("tunnelmesh_relay_relayed_bytes_total") == 4096
    assert at("tunnelmesh_relay_drops_total", reason="receiver slow") == 4
    assert at("tunnelmesh_node_info", node="alpha", version="0.1", mode="coordinator") == 1
    assert types["tunnelmesh_peer_rx_bytes"] == "counter" and types["tunnelmesh_peer_rtt_seconds"] == "gauge"


def test_a_coordinator_state_in_words_is_the_error_state() -> None:
    status = Status(node=node(coordinator=coordinator("refused: 403 this node was revoked")), peers=(), drops={})
    values, _ = samples(scrape_text(StatusCollector(status)))
    assert values[("tunnelmesh_coordinator_connection_state", (("state", "error"),))] == 1
    assert not any(labels and "revoked" in str(labels) for _, labels in values)  # no free text in a label


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(status=instances(Status))
def test_any_status_renders_and_parses_with_each_peers_counters(status: Status) -> None:
    values, _ = samples(scrape_text(StatusCollector(status)))
    last = {p.name: p for p in status.peers}  # a name given twice: the last one's values
    for name, peer in last.items():  # a Prometheus sample is a float64: counters past 2**53 round
        assert values[("tunnelmesh_peer_rx_bytes_total", (("peer", name),))] == float(peer.rx_bytes)
        for reason, count in peer.drops.items():
            assert values[("tunnelmesh_peer_drops_total", (("peer", name), ("reason", reason)))] == float(count)
        ones = [values[("tunnelmesh_peer_rung", (("peer", name), ("rung", r)))] for r in ("udp", "ssh", "relay")]
        assert sum(ones) == (1 if peer.path is not None and peer.path.rung in ("udp", "ssh", "relay") else 0)


def test_the_endpoint_answers_503_until_the_status_is_there_then_the_metrics() -> None:
    async def main() -> None:
        endpoint = MetricsEndpoint()
        runner = await serve(metrics_app(endpoint.collectors), "127.0.0.1", 0)
        host, port = runner.addresses[0][:2]
        try:
            async with aiohttp.ClientSession() as http:
                async with http.get(f"http://{host}:{port}/metrics") as early:
                    assert early.status == 503
                asked = []

                async def status() -> Status:
                    asked.append(1)
                    return Status(node=node(), peers=(BETA,), drops={})

                endpoint.status = status
                for scrape in (1, 2):
                    async with http.get(f"http://{host}:{port}/metrics") as response:
                        assert response.status == 200 and response.content_type == "text/plain"
                        values, _ = samples(await response.text())
                    assert values[("tunnelmesh_peer_tx_packets_total", (("peer", "b"),))] == 9
                    assert len(asked) == scrape  # a fresh snapshot per scrape
        finally:
            await runner.cleanup()

    asyncio.run(main())


@pytest.mark.parametrize(("text", "expected"), [
    ("127.0.0.1:9469", ("127.0.0.1", 9469)), ("0.0.0.0:1", ("0.0.0.0", 1)), ("[::1]:9469", ("::1", 9469)),
])
def test_listen_addresses(text: str, expected: tuple[str, int]) -> None:
    assert parse_listen(text) == expected


@pytest.mark.parametrize(("text", "says"), [
    ("localhost:9469", "a host name"), ("127.0.0.1", "expected IPv4:port"), ("127.0.0.1:0", "1 to 65535"),
    ("::1:9469", "[address]:port"), ("", "expected"),
])
def test_bad_listen_addresses_say_what_is_expected(text: str, says: str) -> None:
    with pytest.raises(FieldError) as info:
        parse_listen(text)
    assert says in str(info.value) and 'e.g. "127.0.0.1:9469"' in str(info.value)


MINIMAL = '[node]\nname = "alpha"\nmesh_ip = "100.100.0.1"\n'


def test_metrics_are_off_without_the_table_and_on_loopback_with_an_empty_one(tmp_path: Path) -> None:
    assert load(tmp_path, MINIMAL).metrics_listen is None
    assert load(tmp_path, MINIMAL + "[metrics]\n").metrics_listen == DEFAULT_METRICS_LISTEN == ("127.0.0.1", 9469)
    assert load(tmp_path, MINIMAL + '[metrics]\nlisten = "[::1]:9100"\n').metrics_listen == ("::1", 9100)


@pytest.mark.parametrize(("table", "says"), [
    ('listen = "localhost:9469"', "[metrics]: listen 'localhost:9469' is not an address to listen on (a host name)"),
    ("listen = 9469", "[metrics]: listen must be a string, not"),
    ('port = 9469', "[metrics]: unknown key 'port'; allowed keys: listen"),
])
def test_a_bad_metrics_table_is_a_clear_error_with_its_line(tmp_path: Path, table: str, says: str) -> None:
    error = load_error(tmp_path, MINIMAL + "\n[metrics]\n" + table + "\n")
    assert says in str(error) and error.line == 6, str(error)


def test_metrics_must_be_a_table(tmp_path: Path) -> None:
    assert "metrics must be a table ([metrics])" in str(load_error(tmp_path, 'metrics = "127.0.0.1:9469"\n' + MINIMAL))


def test_a_peer_status_without_drops_from_an_older_daemon_decodes_with_none() -> None:
    older = {key: value for key, value in to_json(BETA).items() if key != "drops"}
    assert from_json(PeerStatus, older) == dataclasses.replace(BETA, drops={})
    assert from_json(PeerStatus, to_json(BETA)) == BETA
