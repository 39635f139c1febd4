"""The coordinator's Prometheus metrics (docs/metrics.md): members, connected nodes, its
relay and its links to other coordinators, read from the service's live state at scrape time. Served by the standalone
coordinator (`tunnelmesh coordinator --metrics ADDR`) and, for the embedded one, on
the daemon's own metrics endpoint."""

from __future__ import annotations

import logging
from collections.abc import Iterator

from aiohttp import web
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from tunnelmesh.metrics import Source, counter, gauge, relay_families

from .app import SERVICE
from .cluster import CLUSTER
from .reflection import REFLECTION
from .service import CONNECTED_GRACE, MAX_WAIT
from .store import StoreError

log = logging.getLogger("tunnelmesh.coordinator.metrics")


class CoordinatorCollector(Collector):
    """The metric families of the coordinator app `app` (made by app.make_app)."""

    def __init__(self, app: web.Application) -> None:
        self.service = app[SERVICE]
        self.reflection = app.get(REFLECTION)
        self.cluster = app.get(CLUSTER)
        self.members: int | None = None  # counted before each scrape (the store is async; collect is not)

    async def count(self) -> None:
        try:
            self.members = await self.service.store.member_count()
        except StoreError as exc:  # the scrape goes on without it; the store's trouble is logged
            log.error("metrics: cannot count the members: %s", exc)
            self.members = None

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        service = self.service
        if self.members is not None:
            yield GaugeMetricFamily("tunnelmesh_coordinator_members", "Members of the network (devices included).",
                                    value=self.members)
        yield GaugeMetricFamily("tunnelmesh_coordinator_nodes_connected",
                                "Members that asked for the peer map in the last "
                                f"{MAX_WAIT + CONNECTED_GRACE:.0f} s (nodes long-poll it).",
                                value=service.nodes_connected())
        if self.reflection is not None:
            yield CounterMetricFamily("tunnelmesh_coordinator_stun_answered", "STUN Binding requests answered.",
                                      value=self.reflection.answered)
            dropped = CounterMetricFamily("tunnelmesh_coordinator_stun_dropped", "Datagrams to the STUN reflection "
                                          "service left unanswered, by reason.", labels=["reason"])
            for reason, count in self.reflection.dropped.items():
                dropped.add_metric([reason], count)
            yield dropped
        if self.cluster is not None:  # coordinators on one PostgreSQL database
            status = self.cluster.status()
            yield gauge("tunnelmesh_coordinator_cluster_link_up", "Links to the other coordinators (relays across "
                        "coordinators): 1 up, 0 not.", "url", {url: int(state == "up")
                                                               for url, state in status["links"].items()})
            yield counter("tunnelmesh_coordinator_cluster_refusals", "Cluster links refused, by reason.", "reason",
                          status["refusals"])
            yield counter("tunnelmesh_coordinator_cluster_drops", "Frames from other coordinators' links dropped, by "
                          "reason (frames for them: tunnelmesh_coordinator_relay_drops).", "reason", status["drops"])
        relay = service.relay_served
        if relay is None:
            return  # made on first use: no connection yet
        status = relay.status()
        yield from relay_families("tunnelmesh_coordinator_relay", "the coordinator's relay",
                                  connections=status["connections"], frames=relay.relayed_frames,
                                  relayed_bytes=relay.relayed_bytes, drops=relay.drops, refusals=relay.refusals)


def coordinator_source(app: web.Application) -> Source:
    """What the standalone coordinator's metrics endpoint serves: `app`'s collector."""
    collector = CoordinatorCollector(app)

    async def collectors() -> list[Collector]:
        await collector.count()
        return [collector]

    return collectors
