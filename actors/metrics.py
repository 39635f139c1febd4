"""The daemon's Prometheus metrics (docs/metrics.md): what `status` says, as metric families.

`StatusCollector` is a prometheus_client collector over one `Status` snapshot: a scrape
takes the snapshot through the control API (the same answers `tunnelmesh status` gets,
asked of the actors that own them), so the data path pays nothing for metrics.
`MetricsEndpoint` is what the daemon serves: the status source, set once the control
API exists (a scrape before that is a 503), and the embedded coordinator's collector on
the node that serves it.

Label values are bounded: `peer` is a member's name (the membership bounds it), `actor`
an actor's name, `rung`, `state` and `reason` come from fixed sets in the code (a
drop reason carrying an OS error names one of the errno strings).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.registry import Collector

from tunnelmesh.config import RUNG_NAMES
from tunnelmesh.metrics import MetricsError, counter, gauge, metrics_url, relay_families, serve_metrics, state_set

from .messages import PeerStatus, Status

if TYPE_CHECKING:
    from tunnelmesh.config import NodeConfig
    from tunnelmesh.coordinator.metrics import CoordinatorCollector

    from .daemon import ServedSite

log = logging.getLogger("tunnelmesh.metrics")

#: PeerStatus.state's values.
PEER_STATES = ("up", "handshaking", "idle", "waiting", "unreachable")
#: The coordinator connection's states as metrics say them: CoordinatorStatus.state is
#: "connecting", "connected" or, in words, what went wrong ("error" here).
COORDINATOR_STATES = ("connecting", "connected", "error")


class StatusCollector(Collector):
    """The metric families of one status snapshot."""

    def __init__(self, status: Status) -> None:
        self.status = status

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily | InfoMetricFamily]:
        status, node = self.status, self.status.node
        info = InfoMetricFamily("tunnelmesh_node", "This node: its name, software version and mode.")
        info.add_metric([], {"node": node.name, "version": node.version, "mode": node.mode})
        yield info
        yield GaugeMetricFamily("tunnelmesh_start_time_seconds", "When the daemon started (Unix time).",
                                value=node.started)
        yield from _peers(status.peers)
        yield counter("tunnelmesh_drops", "Packets the data path and the protocol core dropped, by reason.",
                      "reason", status.drops)
        if status.filter is not None:
            yield counter("tunnelmesh_filter_drops", "Packets the packet filter dropped, by reason.",
                          "reason", status.filter.drops)
            yield counter("tunnelmesh_filter_spoofed", "Packets from a peer with a source address not its own.",
                          "peer", status.filter.spoofed_by_peer)
            yield counter("tunnelmesh_filter_denied", "Inbound packets from a peer that no rule allows.",
                          "peer", status.filter.denied_by_peer)
            yield GaugeMetricFamily("tunnelmesh_filter_flows", "Flows the packet filter tracks now.",
                                    value=status.filter.flows)
        actors = {a.name: a for a in node.actors}
        yield counter("tunnelmesh_actor_restarts", "Restarts of an actor after a crash (peer sessions summed).",
                      "actor", {name: a.restarts for name, a in actors.items()})
        yield gauge("tunnelmesh_actor_mailbox_depth", "Messages waiting in an actor's mailbox.",
                    "actor", {name: a.queued for name, a in actors.items()})
        yield counter("tunnelmesh_actor_mailbox_dropped", "Best-effort messages an actor's full mailbox dropped.",
                      "actor", {name: a.dropped for name, a in actors.items()})
        yield counter("tunnelmesh_actor_task_failures", "Child tasks of an actor that ended with an error.",
                      "actor", {name: a.task_failures for name, a in actors.items()})
        yield CounterMetricFamily("tunnelmesh_events_dropped", "Events slow control subscribers did not take.",
                                  value=node.events_dropped)
        coordinator = node.coordinator
        if coordinator is not None:
            state = coordinator.state if coordinator.state in COORDINATOR_STATES else "error"
            yield gauge("tunnelmesh_coordinator_connection_state",
                        "The connection to the coordinator: 1 for the state it is in.",
                        "state", {s: int(s == state) for s in COORDINATOR_STATES})
            yield GaugeMetricFamily("tunnelmesh_peer_map_version", "The version of the peer map this node holds.",
                                    value=coordinator.version)
            yield GaugeMetricFamily("tunnelmesh_peer_map_members", "Members in the peer map (this node included).",
                                    value=coordinator.members)
        relay = node.transports.serving_relay
        if relay is not None:
            yield from relay_families("tunnelmesh_relay", "this node's relay", connections=relay.connections,
                                      frames=relay.relayed_frames, relayed_bytes=relay.relayed_bytes,
                                      drops=relay.drops, refusals=relay.refusals)


def _peers(peers: tuple[PeerStatus, ...]) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
    by_name = {p.name: p for p in peers}

    def each(name: str, documentation: str, value: Callable[[PeerStatus], int]) -> CounterMetricFamily:
        return counter(name, documentation, "peer", {n: value(p) for n, p in by_name.items()})

    yield each("tunnelmesh_peer_rx_bytes", "Bytes of transport messages received from the peer.", lambda p: p.rx_bytes)
    yield each("tunnelmesh_peer_tx_bytes", "Bytes of transport messages sent to the peer.", lambda p: p.tx_bytes)
    yield each("tunnelmesh_peer_rx_packets", "Transport messages received from the peer (keepalives included).",
               lambda p: p.rx_packets)
    yield each("tunnelmesh_peer_tx_packets", "Transport messages sent to the peer (keepalives included).",
               lambda p: p.tx_packets)
    yield each("tunnelmesh_peer_handshakes", "Handshakes completed with the peer since its session started.",
               lambda p: p.handshakes)
    yield each("tunnelmesh_peer_rung_changes", "Changes of rung since the peer's session started.",
               lambda p: p.rung_changes)
    yield state_set("tunnelmesh_peer_rung", "The rung carrying the peer's packets: 1 for the one in use.",
                    "peer", "rung", RUNG_NAMES, {n: p.path.rung if p.path else None for n, p in by_name.items()})
    yield state_set("tunnelmesh_peer_state", "The peer session's state: 1 for the one it is in.",
                    "peer", "state", PEER_STATES, {n: p.state for n, p in by_name.items()})
    yield gauge("tunnelmesh_peer_rtt_seconds",
                "The last round trip measured to the peer: a handshake this node initiated, or a ping.",
                "peer", {n: p.rtt_ms / 1000 for n, p in by_name.items() if p.rtt_ms is not None})
    yield gauge("tunnelmesh_peer_last_handshake_timestamp_seconds", "When the last handshake completed (Unix time).",
                "peer", {n: p.last_handshake for n, p in by_name.items() if p.last_handshake is not None})
    drops = CounterMetricFamily("tunnelmesh_peer_drops", "Packets for the peer the protocol core dropped, by reason "
                                "(those dropped once it knew the peer; also in tunnelmesh_drops).",
                                labels=["peer", "reason"])
    for name, peer in sorted(by_name.items()):
        for reason, count in sorted(peer.drops.items()):
            drops.add_metric([name, reason], count)
    yield drops


class MetricsEndpoint:
    """The daemon's metrics source (tunnelmesh.metrics.Source): the status snapshot once
    `status` is set, and `coordinator`'s collector where the node embeds one."""

    def __init__(self, coordinator: CoordinatorCollector | None = None) -> None:
        self.status: Callable[[], Awaitable[Status]] | None = None
        self.coordinator = coordinator

    async def collectors(self) -> list[Collector] | None:
        if self.status is None:
            return None
        collectors: list[Collector] = [StatusCollector(await self.status())]
        if self.coordinator is not None:
            await self.coordinator.count()
            collectors.append(self.coordinator)
        return collectors


async def start_metrics(config: NodeConfig, coordinator: ServedSite | None) -> tuple[ServedSite, MetricsEndpoint]:
    """Serve `[metrics]` (with the embedded coordinator's, when `coordinator` is its site):
    the port is taken before the actors run, so a busy one is a start-up error. The
    endpoint answers 503 until its `status` is set."""
    from tunnelmesh.coordinator.metrics import CoordinatorCollector

    from .daemon import ServedSite, StartupError  # lazily: the daemon imports this module

    assert config.metrics_listen is not None
    endpoint = MetricsEndpoint(CoordinatorCollector(coordinator.runner.app) if coordinator is not None else None)
    try:
        runner = await serve_metrics(endpoint.collectors, config.metrics_listen)
    except MetricsError as exc:
        raise StartupError(f"{exc} ([metrics] listen in {config.path})") from None
    log.info("metrics: serving Prometheus metrics on %s (no authentication)", metrics_url(config.metrics_listen))
    return ServedSite("metrics", runner), endpoint
