"""Prometheus exposition (docs/metrics.md), shared by the daemon and the coordinator.

Nothing here counts anything: a scrape asks the source for collectors (prometheus_client
`Collector`s built from a status snapshot or reading live counters), registers them in
a fresh registry and renders it with `generate_latest`. The hot paths keep their plain
integer counters; the cost of metrics is paid at scrape time only.

The endpoint has no authentication: it listens on loopback unless told otherwise.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from tunnelmesh.fields import FieldError, parse_endpoint, shown

#: Where metrics are served when enabled without an address: loopback only (no auth).
DEFAULT_METRICS_PORT = 9469
DEFAULT_METRICS_LISTEN = ("127.0.0.1", DEFAULT_METRICS_PORT)
METRICS_PATH = "/metrics"

#: What a scrape asks for: the collectors of this moment, or None while the source is not
#: ready (the daemon between opening the port and its actors running): a 503.
Source = Callable[[], Awaitable["list[Collector] | None"]]


def parse_listen(text: str) -> tuple[str, int]:
    """`IPv4:port` or `[IPv6]:port` to bind the metrics endpoint to; a host name is refused
    (which address it binds would depend on the resolver). Raises FieldError saying what is
    wrong and what is expected."""
    try:
        host, port = parse_endpoint(text)
        ipaddress.ip_address(host)
    except (FieldError, ValueError) as exc:
        detail = "a host name" if not isinstance(exc, FieldError) else str(exc)
        raise FieldError(f"{shown(text)} is not an address to listen on ({detail}); expected IPv4:port or "
                         f"[IPv6]:port, e.g. \"127.0.0.1:{DEFAULT_METRICS_PORT}\"") from None
    return host, port


def metrics_app(source: Source) -> web.Application:
    """An aiohttp application serving `source`'s collectors at /metrics."""

    async def handler(_: web.Request) -> web.Response:
        collectors = await source()
        if collectors is None:
            return web.Response(status=503, text="starting: no metrics yet\n")
        registry = CollectorRegistry(auto_describe=False)  # registering then collects nothing
        for collector in collectors:
            registry.register(collector)
        return web.Response(body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get(METRICS_PATH, handler)
    return app


class MetricsError(Exception):
    """The metrics endpoint cannot be served (its port is taken, say)."""


async def serve_metrics(source: Source, listen: tuple[str, int]) -> web.AppRunner:
    """Serve `source` at http://listen/metrics; the caller cleans the runner up."""
    from tunnelmesh.coordinator.app import serve  # lazily: the coordinator serves metrics too

    try:
        return await serve(metrics_app(source), *listen)
    except OSError as exc:  # aiohttp words a bind error at length: the errno says it
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        raise MetricsError(f"metrics: cannot listen on {metrics_url(listen)}: {reason}") from None


def metrics_url(listen: tuple[str, int]) -> str:
    host, port = listen
    return f"http://{f'[{host}]' if ':' in host else host}:{port}{METRICS_PATH}"


def counter(name: str, documentation: str, label: str, values: Mapping[str, int | float]) -> CounterMetricFamily:
    """A counter family with one label, one sample per key of `values`."""
    family = CounterMetricFamily(name, documentation, labels=[label])
    for key, value in sorted(values.items()):
        family.add_metric([key], value)
    return family


def gauge(name: str, documentation: str, label: str, values: Mapping[str, int | float]) -> GaugeMetricFamily:
    """A gauge family with one label, one sample per key of `values`."""
    family = GaugeMetricFamily(name, documentation, labels=[label])
    for key, value in sorted(values.items()):
        family.add_metric([key], value)
    return family


def state_set(name: str, documentation: str, owner_label: str, state_label: str, states: Iterable[str],
              current: Mapping[str, str | None]) -> GaugeMetricFamily:
    """An enum-style gauge: for each owner, one sample per state of the fixed set
    `states`, 1 for the owner's current state and 0 for the others (all 0 for None)."""
    family = GaugeMetricFamily(name, documentation, labels=[owner_label, state_label])
    states = tuple(states)
    for owner, state in sorted(current.items()):
        for candidate in states:
            family.add_metric([owner, candidate], 1 if candidate == state else 0)
    return family


def relay_families(prefix: str, whose: str, *, connections: int, frames: int, relayed_bytes: int,
                   drops: Mapping[str, int], refusals: Mapping[str, int]
                   ) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
    """A relay server's families (the coordinator's, or a node's with relay = true), named
    `prefix`_...; `whose` says whose relay in their help."""
    yield GaugeMetricFamily(f"{prefix}_connections", f"Members connected to {whose}.", value=connections)
    yield CounterMetricFamily(f"{prefix}_relayed_frames", f"Frames {whose} passed on.", value=frames)
    yield CounterMetricFamily(f"{prefix}_relayed_bytes", f"WireGuard bytes {whose} passed on.", value=relayed_bytes)
    yield counter(f"{prefix}_drops", f"Frames {whose} dropped, by reason.", "reason", drops)
    yield counter(f"{prefix}_refusals", f"Connections {whose} refused, by cause.", "cause", refusals)
