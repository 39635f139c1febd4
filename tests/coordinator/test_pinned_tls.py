"""The coordinator's own TLS, pinned: a real aiohttp TLS server on 127.0.0.1 with a
certificate made the way `tunnelmesh init` makes it, and the coordinator and relay
clients with the right pin, a wrong one, and none."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.support.coordinator import identities
from tests.support.databases import Database
from tunnelmesh.coordinator.client import Coordinator, CoordinatorError
from tunnelmesh.coordinator.app import make_app, serve
from tunnelmesh.coordinator.store import open_store
from tunnelmesh.links import LinkError
from tunnelmesh.links.relay import RelayClient
from tunnelmesh.tls import server_context, write_certificate

WRONG = "sha256:" + "ab" * 32


class _Sink:
    def link_up(self, link: Any) -> None: ...

    def link_down(self, link: Any, reason: str) -> None: ...

    def receive(self, link: Any, message: Any) -> None: ...


async def _network_call(url: str, **options: Any) -> CoordinatorError:
    """The coordinator's answer to GET /v1/network, which before set-up is a refusal."""
    async with Coordinator(url, **options) as coordinator:
        with pytest.raises(CoordinatorError) as info:
            await coordinator.network()
    return info.value


def _serving_tls(tmp_path: Path, scenario: Any, db: Database) -> Any:
    """Run `scenario(url, pin)` against a fresh coordinator over `db` serving TLS on 127.0.0.1."""
    pin = write_certificate(tmp_path / "c.pem", tmp_path / "c.key", "127.0.0.1")

    async def main() -> Any:
        store = await open_store(db.url)
        runner = await serve(make_app(store), "127.0.0.1", 0, server_context(tmp_path / "c.pem", tmp_path / "c.key"))
        try:
            host, port = runner.addresses[0][:2]
            return await scenario(f"https://{host}:{port}", pin)
        finally:
            await runner.cleanup()
            await store.close()

    return asyncio.run(main())


def test_the_right_pin_talks_to_the_coordinator_and_a_wrong_one_is_refused(tmp_path: Path, database: Database) -> None:
    async def scenario(url: str, pin: str) -> None:
        right = await _network_call(url, tls_fingerprint=pin)
        assert right.status == 503, str(right)  # the coordinator's own answer, over TLS: not set up yet
        wrong = await _network_call(url, tls_fingerprint=WRONG)
        assert wrong.status is None
        message = str(wrong)
        assert pin in message and WRONG in message and "tls_fingerprint" in message, message
        assert "refusing" in message
        # No pin: the system's CAs do not know a self-made certificate; the error says how to pin it.
        unpinned = await _network_call(url)
        assert unpinned.status is None and "certificate verify failed" in str(unpinned), str(unpinned)
        assert "--tls-fingerprint" in str(unpinned) and "tunnelmesh status" in str(unpinned)

    _serving_tls(tmp_path, scenario, database)


def test_the_coordinators_relay_is_pinned_too(tmp_path: Path, database: Database) -> None:
    identity = identities()[0]

    async def scenario(url: str, pin: str) -> tuple[str, str]:
        answers = []
        for fingerprint in (pin, WRONG):
            client = RelayClient(url, identity, "SHA256:x", _Sink(), tls_fingerprint=fingerprint)
            async with aiohttp.ClientSession() as session:
                with pytest.raises(LinkError) as info:
                    await client._connect(session)
            answers.append(str(info.value))
        return answers[0], answers[1]

    right, wrong = _serving_tls(tmp_path, scenario, database)
    assert "answered HTTP 503" in right, right  # past TLS: the relay is there once the network is set up
    # Both fingerprints named: the pinned one and the one the server presented.
    assert WRONG in wrong and len(set(re.findall(r"sha256:[0-9a-f]{64}", wrong))) == 2 and "refusing" in wrong, wrong


def test_a_pin_over_plain_http_is_refused_rather_than_ignored(tmp_path: Path) -> None:
    with pytest.raises(CoordinatorError, match="not https://"):
        Coordinator("http://127.0.0.1:7400", tls_fingerprint=WRONG)
    with pytest.raises(LinkError, match="not https://"):
        RelayClient("http://127.0.0.1:7400", identities()[0], "SHA256:x", _Sink(), tls_fingerprint=WRONG)
