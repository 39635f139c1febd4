"""Hostile requests to a real coordinator on 127.0.0.1. Malformed HTTP: each is answered 400
and counted, and the log gets one line per source a minute, never a traceback. Requests it
refuses, sent in a loop: one line per source, endpoint and status a minute (issue 17, part 5)."""

from __future__ import annotations

import asyncio
import logging

import aiohttp
import pytest

from tests.support.coordinator import UNLIMITED
from tests.support.databases import Database
from tunnelmesh.coordinator.app import make_app, serve
from tunnelmesh.coordinator.guards import MALFORMED_REQUESTS
from tunnelmesh.coordinator.store import open_store
from tunnelmesh.ratelimit import RateLimiter

# Each breaks HTTP/1.1 framing in another way; one per connection.
MALFORMED = [
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(32)),  # a TLS ClientHello to plain HTTP
    b"GET /v1/network HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
    b"POST /v1/register HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"GET /v1/network HTTP/9.9\r\nHost: x\r\n\r\n",
    b"GET /v1/network HTTP/1.1\r\nHost: x\r\nX-Long: " + b"a" * 20_000 + b"\r\n\r\n",
    b"GET /v1/\x00network HTTP/1.1\r\n\r\n",
    b"GET /v1/network HTTP/1.1\r\nbad header line\r\n\r\n",
    b"GET /v1/network HTTP/1.1\r\nHost: x\r\n\r\nNOT A METHOD / HTTP/1.1\r\n\r\n",  # the second request on a connection
]


async def send_raw(port: int, data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(10):
            return await reader.read()  # the coordinator answers and closes the connection
    finally:
        writer.close()


def test_malformed_http_is_one_counted_line_never_a_traceback(database: Database,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> int:
        store = await open_store(database.url)
        app = make_app(store)
        runner = await serve(app, "127.0.0.1", 0)
        try:
            port = runner.addresses[0][1]
            for _ in range(3):
                for data in MALFORMED:
                    assert b" 400 Bad Request\r\n" in await send_raw(port, data)
            return app[MALFORMED_REQUESTS].count
        finally:
            await runner.cleanup()
            await store.close()

    caplog.set_level(logging.DEBUG)
    counted = asyncio.run(main())
    assert counted == 3 * len(MALFORMED)
    assert [r for r in caplog.records if r.exc_info or r.exc_text or "Traceback" in r.getMessage()] == []
    lines = [r.getMessage() for r in caplog.records if "malformed" in r.getMessage().lower()]
    assert len(lines) == 1 and lines[0].startswith("malformed HTTP request from 127.0.0.1: 400"), lines
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_refused_requests_in_a_loop_are_one_line_per_kind_a_minute(database: Database,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    """Well-framed requests the coordinator refuses (bad JSON, a member request without a
    signature), sent over and over: each kind is logged once, the rest counted in it later."""
    async def main() -> list[int]:
        store = await open_store(database.url)
        runner = await serve(make_app(store, limiter=RateLimiter(UNLIMITED, UNLIMITED)), "127.0.0.1", 0)
        try:
            base = f"http://127.0.0.1:{runner.addresses[0][1]}"
            statuses = []
            async with aiohttp.ClientSession() as session:
                for _ in range(50):
                    for path, body in (("/v1/join/propose", b"{not json"), ("/v1/register", b"{}")):
                        async with session.post(base + path, data=body) as response:
                            statuses.append(response.status)
            return statuses
        finally:
            await runner.cleanup()
            await store.close()

    caplog.set_level(logging.INFO)
    assert sorted(set(asyncio.run(main()))) == [400, 401]
    lines = [r.getMessage() for r in caplog.records if " refused (" in r.getMessage()]
    assert len(lines) == 2, lines
    assert lines[0].startswith("POST /v1/join/propose refused (400) from 127.0.0.1: ")
    assert lines[1].startswith("POST /v1/register refused (401) from 127.0.0.1: ")
