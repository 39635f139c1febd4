"""Which proxy a URL goes through (HTTP_PROXY/HTTPS_PROXY/NO_PROXY, either spelling),
and the TLS context for a private CA."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest

from tests.support.tls import make_ca
from tunnelmesh.links import LinkError
from tunnelmesh.links.proxy import proxy_for, ssl_context

HTTP = "http://192.0.2.9:8888"
HTTPS = "http://192.0.2.10:3128"


@pytest.mark.parametrize("url, expected", [
    ("ws://198.51.100.1:7400/relay", HTTP),
    ("http://198.51.100.1:7400", HTTP),
    ("wss://coordinator.example/relay", HTTPS),
    ("https://coordinator.example:8443", HTTPS),
    ("WSS://COORDINATOR.EXAMPLE/relay", HTTPS),
    ("ftp://198.51.100.1/", None),
    ("not a url", None),
])
def test_ws_urls_use_the_http_and_https_proxies(url: str, expected: str | None) -> None:
    assert proxy_for(url, {"HTTP_PROXY": HTTP, "HTTPS_PROXY": HTTPS}) == expected


def test_no_proxy_set_means_direct() -> None:
    assert proxy_for("wss://coordinator.example/relay", {}) is None
    assert proxy_for("wss://coordinator.example/relay", {"HTTP_PROXY": HTTP}) is None  # only HTTPS_PROXY counts
    assert proxy_for("ws://coordinator.example/relay", {"HTTPS_PROXY": HTTPS}) is None
    assert proxy_for("ws://coordinator.example/relay", {"HTTP_PROXY": "  "}) is None


def test_lowercase_wins_over_uppercase_and_either_works_alone() -> None:
    assert proxy_for("ws://a.example", {"http_proxy": HTTP, "HTTP_PROXY": HTTPS}) == HTTP
    assert proxy_for("ws://a.example", {"http_proxy": HTTP}) == HTTP
    assert proxy_for("wss://a.example", {"https_proxy": HTTPS}) == HTTPS
    assert proxy_for("ws://a.example", {"HTTP_PROXY": HTTP, "no_proxy": "a.example", "NO_PROXY": ""}) is None
    assert proxy_for("ws://a.example", {"HTTP_PROXY": HTTP, "NO_PROXY": "a.example"}) is None


def test_a_proxy_without_a_scheme_is_http() -> None:
    assert proxy_for("wss://a.example", {"HTTPS_PROXY": "192.0.2.10:3128"}) == "http://192.0.2.10:3128"


@pytest.mark.parametrize("no_proxy, bypassed", [
    ("*", True),
    ("coordinator.example", True),
    (".example", True),
    ("example", True),  # a bare domain covers its subdomains, as in curl
    ("other.example, coordinator.example", True),
    ("  COORDINATOR.example  ", True),
    ("coordinator.example:7400", True),
    ("coordinator.example:7401", False),
    ("ordinator.example", False),
    ("198.51.100.1", False),
    ("", False),
    (",,", False),
])
def test_no_proxy_forms(no_proxy: str, bypassed: bool) -> None:
    env = {"HTTP_PROXY": HTTP, "NO_PROXY": no_proxy}
    assert proxy_for("ws://coordinator.example:7400/relay", env) == (None if bypassed else HTTP)


def test_no_proxy_matches_addresses_exactly() -> None:
    env = {"HTTPS_PROXY": HTTPS, "no_proxy": "127.0.0.1,198.51.100.1"}
    assert proxy_for("wss://198.51.100.1:7400/relay", env) is None
    assert proxy_for("wss://127.0.0.1/relay", env) is None
    assert proxy_for("wss://198.51.100.10:7400/relay", env) == HTTPS


def test_ssl_context_keeps_verification_on(tmp_path: Path) -> None:
    assert ssl_context(None) is None  # aiohttp's default: the system's CAs, verified
    ca, _ = make_ca().write(tmp_path, "ca")
    context = ssl_context(str(ca))
    assert context is not None
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    assert any(cert["subject"] == ((("commonName", "tunnelmesh test CA"),),) for cert in context.get_ca_certs())


def test_an_unusable_ca_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(LinkError, match=r"CA file .*missing\.pem: No such file or directory"):
        ssl_context(str(tmp_path / "missing.pem"))
    garbage = tmp_path / "garbage.pem"
    garbage.write_bytes(b"not a certificate\n" * 10)
    with pytest.raises(LinkError, match=r"CA file .*garbage\.pem holds no PEM certificate"):
        ssl_context(str(garbage))
    with pytest.raises(LinkError, match=r"CA file .*: Is a directory"):
        ssl_context(str(tmp_path))

