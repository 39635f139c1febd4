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

from .cluster import check_cluster_url, join_cluster
from .app import make_app, serve
from .metrics import coordinator_source
from .reflection import reflection_addresses, start_reflection
from .store import is_postgres, open_store

log = logging.getLogger("tunnelmesh.coordinator.server")


def _listen_address(listen: str) -> tuple[str, int]:
    try:
        return parse_endpoint(listen)
    except FieldError as exc:
        raise OSError(errno.EINVAL, f"listen address {shown(listen)}: {exc}, e.g. 0.0.0.0:7400") from None


def standalone_tls_files(db: Path) -> tuple[Path, Path]:
    """Where a standalone coordinator keeps the certificate it made: next to its database."""
    return db.with_name(db.stem + "-tls.pem"), db.with_name(db.stem + "-tls.key")


class TlsSettingError(ValueError):
    """A coordinator on PostgreSQL has no file to keep a certificate of its own beside."""


def _standalone_tls(host: str, db: str | Path, tls_cert: Path | None, tls_key: Path | None
                    ) -> tuple[ssl.SSLContext, str]:
    """The standalone coordinator's TLS and its certificate's pin: the given certificate, or
    its own (made on first start next to a SQLite `db`); its fingerprint is logged for `init
    --tls-fingerprint`. Coordinators on PostgreSQL are several and must serve one
    certificate: given (and each checks the others' against it: tunnelmesh.coordinator.cluster)."""
    if tls_cert is None or tls_key is None:
        if is_postgres(db):
            raise TlsSettingError("a coordinator on PostgreSQL needs --tls-cert and --tls-key (every coordinator of "
                                  "the network serves the same certificate, so nodes pin one), or --plain-http "
                                  "behind a TLS-terminating proxy")
        tls_cert, tls_key = standalone_tls_files(Path(db))
        pin, made = load_or_make(tls_cert, tls_key, host if host != "0.0.0.0" else socket.gethostname())
        log.info("coordinator TLS: %s certificate %s", "made the" if made else "serving its", tls_cert)
    else:
        pin = certificate_fingerprint(tls_cert)
    context = server_context(tls_cert, tls_key)
    log.info("coordinator TLS fingerprint %s (give it to `tunnelmesh init --external-coordinator "
             "--tls-fingerprint`)", pin)
    return context, pin


async def run_standalone(listen: str, db: str | Path, admin_fingerprint: str | None,
                         trusted_proxies: frozenset[str] = frozenset(), *, tls_cert: Path | None = None,
                         tls_key: Path | None = None, plain_http: bool = False,
                         metrics: tuple[str, int] | None = None, stun: tuple[object, object] = (None, None),
                         db_password: str | None = None, cluster_url: str | None = None) -> None:
    """`tunnelmesh coordinator`: serve the database `db` on `listen` until cancelled: a
    SQLite file, or a PostgreSQL connection string (several coordinators may share one;
    `db_password` in place of one in it). TLS with `tls_cert`/`tls_key`, or a certificate
    of its own (made on first start next to a SQLite `db`); plain HTTP with `plain_http` (behind a TLS-terminating proxy); its
    Prometheus metrics on `metrics` (docs/metrics.md); its STUN reflection service as
    `stun` (the `--stun` and `--stun-alternate` settings) says. TlsError for a certificate
    it cannot use, MetricsError when the metrics' port is taken, StunSettingError for a
    wrong `stun`, TlsSettingError for PostgreSQL without a certificate. On PostgreSQL it
    forwards relay frames with the other coordinators, which reach it at `cluster_url`
    (default: from `listen`, unless that is on every interface, loopback or port 0: then
    its log says its members cannot be reached from the others); ClusterSettingError for
    a wrong one."""
    host, port = _listen_address(listen)
    reflection_at = reflection_addresses(*stun, (host, port))
    if cluster_url is not None:
        check_cluster_url(cluster_url)  # before anything starts
    tls = None if plain_http else _standalone_tls(host, db, tls_cert, tls_key)
    context = None if tls is None else tls[0]
    store = await open_store(db, db_password)
    async with AsyncExitStack() as running:
        running.push_async_callback(store.close)
        app = make_app(store, admin_fingerprint=admin_fingerprint, trusted_proxies=trusted_proxies)
        # The others serve the same certificate: theirs is checked against it.
        join_cluster(app, store, (host, port), None if tls is None else tls[1], cluster_url)
        if reflection_at is not None:  # before serving: the register reply and the metrics find it in app
            running.callback((await start_reflection(app, reflection_at)).close)
        running.push_async_callback((await serve(app, host, port, context)).cleanup)
        if metrics is not None:
            running.push_async_callback((await serve_metrics(coordinator_source(app), metrics)).cleanup)
            log.info("coordinator metrics on %s (no authentication)", metrics_url(metrics))
        log.info("coordinator listening on %s://%s:%d (%s database %s)", "http" if context is None else "https",
                 host, port, store.backend, store.where)
        await asyncio.Event().wait()
