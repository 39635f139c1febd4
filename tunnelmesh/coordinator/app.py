"""The coordinator's aiohttp application: the routes of the service (service.py) behind
its middlewares (guards.py: JSON errors, the rate limit of what anyone may call), and
how it is served."""

from __future__ import annotations

import logging
import ssl
import time
from collections.abc import Callable

from aiohttp import web

from tunnelmesh.ratelimit import RateLimiter

from .guards import (
    MALFORMED_REQUESTS,
    MAX_BODY,
    MAX_SOURCES,
    OVERALL_RATE,
    PER_SOURCE_RATE,
    RATE_LIMITER,
    MalformedRequests,
    errors,
    rate_limited,
)
from .punch import handler as punch_handler
from .service import SHUTDOWN_TIMEOUT, _Service
from .store import Store

#: The service behind an app, for what reads its state (tunnelmesh.coordinator.metrics).
SERVICE = web.AppKey("service", _Service)



def make_app(store: Store, *, clock: Callable[[], float] = time.time,
             admin_fingerprint: str | None = None, trusted_proxies: frozenset[str] = frozenset(),
             limiter: RateLimiter | None = None, monotonic: Callable[[], float] = time.monotonic) -> web.Application:
    """The coordinator's aiohttp application over `store`. With `admin_fingerprint`,
    only that admin's network can be set up. Requests from `trusted_proxies` (reverse
    proxies in front of it) are taken to come from their X-Forwarded-For address.
    Requests to UNAUTHENTICATED_PATHS go through `limiter` (default: PER_SOURCE_RATE
    under OVERALL_RATE), on the `monotonic` clock."""
    service = _Service(store, clock, admin_fingerprint, trusted_proxies, monotonic)
    if limiter is None:
        limiter = RateLimiter(PER_SOURCE_RATE, OVERALL_RATE, max_sources=MAX_SOURCES, now=monotonic())
    # _errors outermost: it words the limiter's 413 like every other error (its 429 is an answer).
    app = web.Application(client_max_size=MAX_BODY,
                          middlewares=[errors(service._client_address), rate_limited(service._client_address, limiter, monotonic)])
    app[RATE_LIMITER] = limiter
    app[SERVICE] = service
    app[MALFORMED_REQUESTS] = MalformedRequests()
    app.cleanup_ctx.append(service.lifetime)
    app.on_shutdown.append(service.on_shutdown)
    app.router.add_get("/v1/network", service.network)
    app.router.add_post("/v1/join/propose", service.propose)
    app.router.add_post("/v1/join/confirm", service.confirm)
    app.router.add_post("/v1/join/request", service.request_join)
    app.router.add_post("/v1/register", service.register)
    app.router.add_get("/v1/map", service.map)
    app.router.add_post("/v1/punch", punch_handler(service, service._wake_polls))
    app.router.add_post("/v1/admin/setup", service.setup)
    app.router.add_get("/v1/admin/pending", service.pending)
    app.router.add_post("/v1/admin/approve", service.approve)
    app.router.add_post("/v1/admin/device", service.device)
    app.router.add_post("/v1/admin/refuse", service.refuse)
    app.router.add_post("/v1/admin/revoke", service.revoke)
    app.router.add_post("/v1/admin/secret", service.secret)
    app.router.add_post("/v1/admin/policy", service.policy)
    app.router.add_get("/v1/admin/map", service.admin_map)
    app.router.add_get("/relay", service.relay)
    return app


async def serve(app: web.Application, host: str, port: int, ssl_context: ssl.SSLContext | None = None
                ) -> web.AppRunner:
    """Start serving `app` on host:port (TLS with `ssl_context`); the caller cleans the runner up."""
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT,
                           logger=app.get(MALFORMED_REQUESTS, logging.getLogger("aiohttp.server")))
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port, reuse_address=True, ssl_context=ssl_context).start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner

