"""How a node gets out through HTTP proxies and TLS termination: which proxy a URL
goes through, the TLS context for a private CA, and why a connection failed.

aiohttp's `trust_env` looks up WSS_PROXY/WS_PROXY for WebSocket URLs, which no
one sets, so the proxy is chosen here, explicitly, the way curl does it:
ws:// and http:// use HTTP_PROXY, wss:// and https:// use HTTPS_PROXY (the
lowercase spelling wins), NO_PROXY lists hosts to reach directly.
Certificate verification is always on; a CA file adds a private CA.
"""

from __future__ import annotations

import os
import socket
import ssl
import urllib.parse
import urllib.request
from collections.abc import Mapping

import aiohttp

from tunnelmesh.links import LinkError

_PROXY_SCHEME = {"http": "http", "ws": "http", "https": "https", "wss": "https"}


def _variable(environ: Mapping[str, str], name: str) -> str:
    """An environment variable in either spelling, lowercase first (as curl and urllib do)."""
    return (environ.get(name.lower()) or environ.get(name.upper()) or "").strip()


def proxy_for(url: str, environ: Mapping[str, str] = os.environ) -> str | None:
    """The proxy URL to reach `url` through, or None to connect directly."""
    parts = urllib.parse.urlsplit(url)
    scheme = _PROXY_SCHEME.get(parts.scheme.lower())
    if scheme is None or not parts.hostname:
        return None
    proxy = _variable(environ, f"{scheme}_proxy")
    if not proxy:
        return None
    no_proxy = _variable(environ, "no_proxy")
    # urllib's matcher: "*", exact hosts, domain suffixes (with or without a leading
    # dot) and host:port entries. Like curl, it knows no CIDR ranges.
    host = parts.hostname if parts.port is None else f"{parts.hostname}:{parts.port}"
    if no_proxy and urllib.request.proxy_bypass_environment(host, {"no": no_proxy}):
        return None
    return proxy if "://" in proxy else f"http://{proxy}"


def ssl_context(ca_file: str | None) -> ssl.SSLContext | None:
    """The TLS context: None for the system's CAs, else those plus the CA(s) in `ca_file`
    (PEM). Verification is on either way. LinkError if the file cannot be used."""
    if ca_file is None:
        return None
    context = ssl.create_default_context()
    try:
        context.load_verify_locations(cafile=ca_file)
    except ssl.SSLError:  # an OSError too: first
        raise LinkError(f"CA file {ca_file} holds no PEM certificate") from None
    except OSError as exc:
        raise LinkError(f"CA file {ca_file}: {exc.strerror or exc}") from None
    return context


def _endpoint(host: str | None, port: int | None) -> str:
    return f"[{host}]:{port}" if host and ":" in host else f"{host}:{port}"


def connect_failure(exc: aiohttp.ClientError, proxy: str | None) -> str:
    """Why a connection (direct, or through `proxy`) failed, for status and errors:
    "connection refused on 198.51.100.1:7400", "proxy 192.0.2.9:8888 refused CONNECT (403 Forbidden)",
    "TLS: certificate verify failed on 203.0.113.5:443 (unable to get local issuer certificate)"."""
    if isinstance(exc, aiohttp.ServerFingerprintMismatch):
        from tunnelmesh.tls import mismatch_message

        return mismatch_message(_endpoint(exc.host, exc.port), exc.expected, exc.got)
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        error = exc.certificate_error
        detail = getattr(error, "verify_message", None) or str(error)
        return f"TLS: certificate verify failed on {_endpoint(exc.host, exc.port)} ({detail})"
    if isinstance(exc, aiohttp.ClientConnectorSSLError):
        return f"TLS: handshake with {_endpoint(exc.host, exc.port)} failed ({exc.os_error})"
    if isinstance(exc, aiohttp.ClientHttpProxyError):
        # aiohttp names the target in the error; the proxy is the one we chose.
        where = urllib.parse.urlsplit(proxy or "")
        return f"proxy {_endpoint(where.hostname, where.port)} refused CONNECT ({exc.status} {exc.message})"
    if isinstance(exc, aiohttp.ClientConnectorError):
        error = exc.os_error
        if isinstance(error, socket.gaierror):
            reason = f"cannot resolve {exc.host}"
        elif error.errno:
            reason = f"{os.strerror(error.errno).lower()} on {_endpoint(exc.host, exc.port)}"
        else:
            reason = f"{error or type(error).__name__} on {_endpoint(exc.host, exc.port)}"
        return f"proxy {reason}" if isinstance(exc, aiohttp.ClientProxyConnectionError) else reason
    return str(exc) or type(exc).__name__
