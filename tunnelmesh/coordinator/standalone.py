"""`tunnelmesh coordinator`: the coordinator on its own (no admin key, no tunnel), with a
TLS certificate of its own unless given one, and its Prometheus metrics when asked."""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import ssl
from contextlib import AsyncExitStack
from pathlib import Path

from tunnelmesh.fields import FieldError, parse_endpoint, shown
from tunnelmesh.metrics import metrics_url, serve_metrics
from tunnelmesh.tls import certificate_fingerprint, load_or_make, server_context

from .metrics import coordinator_source
from .reflection import reflection_addresses, start_reflection
from .service import make_app, serve
from .store import Store

log = logging.getLogger("tunnelmesh.coordinator.server")


def _listen_address(listen: str) -> tuple[str, int]:
    try:
        return parse_endpoint(listen)
    except FieldError as exc:
        raise OSError(errno.EINVAL, f"listen address {shown(listen)}: {exc}, e.g. 0.0.0.0:7400") from None


def standalone_tls_files(db: Path) -> tuple[Path, Path]:
    """Where a standalone coordinator keeps the certificate it made: next to its database."""
    return db.with_name(db.stem + "-tls.pem"), db.with_name(db.stem + "-tls.key")


def _standalone_tls(host: str, db: Path, tls_cert: Path | None, tls_key: Path | None) -> ssl.SSLContext:
    """The standalone coordinator's TLS: the given certificate, or its own (made on first
    start next to `db`); its fingerprint is logged for `init --tls-fingerprint`."""
    if tls_cert is None or tls_key is None:
        tls_cert, tls_key = standalone_tls_files(db)
        pin, made = load_or_make(tls_cert, tls_key, host if host != "0.0.0.0" else socket.gethostname())
        log.info("coordinator TLS: %s certificate %s", "made the" if made else "serving its", tls_cert)
    else:
        pin = certificate_fingerprint(tls_cert)
    context = server_context(tls_cert, tls_key)
    log.info("coordinator TLS fingerprint %s (give it to `tunnelmesh init --external-coordinator "
             "--tls-fingerprint`)", pin)
    return context


async def run_standalone(listen: str, db: Path, admin_fingerprint: str | None,
                         trusted_proxies: frozenset[str] = frozenset(), *, tls_cert: Path | None = None,
                         tls_key: Path | None = None, plain_http: bool = False,
                         metrics: tuple[str, int] | None = None, stun: tuple[object, object] = (None, None)) -> None:
    """`tunnelmesh coordinator`: serve the database at `db` on `listen` until cancelled:
    TLS with `tls_cert`/`tls_key`, or a certificate of its own (made on first start
    next to `db`); plain HTTP with `plain_http` (behind a TLS-terminating proxy); its
    Prometheus metrics on `metrics` (docs/metrics.md); its STUN reflection service as
    `stun` (the `--stun` and `--stun-alternate` settings) says. TlsError for a certificate
    it cannot use, MetricsError when the metrics' port is taken, StunSettingError for a
    wrong `stun`."""
    host, port = _listen_address(listen)
    reflection_at = reflection_addresses(*stun, (host, port))
    context = None if plain_http else _standalone_tls(host, db, tls_cert, tls_key)
    store = Store.open(db)
    async with AsyncExitStack() as running:
        running.callback(store.close)
        app = make_app(store, admin_fingerprint=admin_fingerprint, trusted_proxies=trusted_proxies)
        if reflection_at is not None:  # before serving: the register reply and the metrics find it in app
            running.callback((await start_reflection(app, reflection_at)).close)
        running.push_async_callback((await serve(app, host, port, context)).cleanup)
        if metrics is not None:
            running.push_async_callback((await serve_metrics(coordinator_source(app), metrics)).cleanup)
            log.info("coordinator metrics on %s (no authentication)", metrics_url(metrics))
        log.info("coordinator listening on %s://%s:%d (database %s)", "http" if context is None else "https",
                 host, port, db)
        await asyncio.Event().wait()
