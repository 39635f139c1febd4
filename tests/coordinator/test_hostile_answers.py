"""The coordinator client (tunnelmesh/coordinator/client.py) against a hostile HTTP server on
127.0.0.1: huge bodies, endless bodies, a slow drip, a stall, a gzip bomb, invalid or
deeply nested JSON, fields of the wrong type. Each ends in a CoordinatorError that says what
happened, within the client's timeout, with bounded memory (issue 17, part 5)."""

from __future__ import annotations

import asyncio
import gzip
import time
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import pytest
from aiohttp import web

from tunnelmesh.coordinator.client import MAX_ANSWER, Coordinator, CoordinatorError

TIMEOUT = 1.5  # the client's, short so that the time-limit cases end quickly here
MAX_MEMORY = 3 * MAX_ANSWER  # the answer at its limit, and what aiohttp buffers around it


async def huge_length(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "application/json"})
    response.content_length = 1 << 40
    await response.prepare(request)
    await response.write(b"{" * 1024)
    await asyncio.sleep(3600)  # the client must not wait for the rest
    return response


async def endless(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "application/json"})
    await response.prepare(request)  # chunked, no length
    chunk = b"[" + b" " * (256 * 1024 - 1)
    for _ in range(4 * MAX_ANSWER // len(chunk)):  # bounded: far past the client's limit
        await response.write(chunk)
    return response


async def drip(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "application/json"})
    await response.prepare(request)
    for _ in range(3600):  # a byte at a time, for far longer than the client waits
        await response.write(b" ")
        await asyncio.sleep(0.05)
    return response


async def stall(_: web.Request) -> web.Response:
    await asyncio.sleep(3600)  # never even the headers
    return web.Response()


async def gzip_bomb(_: web.Request) -> web.Response:
    body = gzip.compress(b" " * (2 * MAX_ANSWER), compresslevel=9)  # ~32 KiB on the wire
    return web.Response(body=body, headers={"Content-Encoding": "gzip", "Content-Type": "application/json"})


def fixed(body: bytes, status: int = 200) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def answer(_: web.Request) -> web.Response:
        return web.Response(body=body, status=status, content_type="application/json")

    return answer


HOSTILE: dict[str, tuple[Callable[[web.Request], Awaitable[web.StreamResponse]], str]] = {
    # mode: (handler, what the error says)
    "huge-length": (huge_length, "answered with more than 16 MiB"),
    "endless": (endless, "answered with more than 16 MiB"),
    "gzip-bomb": (gzip_bomb, "answered with more than 16 MiB"),
    "drip": (drip, f"did not answer within {TIMEOUT:g} s"),
    "stall": (stall, f"did not answer within {TIMEOUT:g} s"),
    "invalid-json": (fixed(b'{"network": '), "without a JSON object"),
    "bad-utf8": (fixed(b'{"network": "\xff\xfe"}'), "without a JSON object"),
    "deep-json": (fixed(b"[" * 200_000 + b"]" * 200_000), "without a JSON object"),
    "not-an-object": (fixed(b"[1, 2, 3]"), "without a JSON object"),
    "wrong-type": (fixed(b'{"network": 5}'), "lacks 'network'"),
    "error-of-wrong-type": (fixed(b'{"error": {"x": 1}, "revocation": 7}', status=403), "answered HTTP 403"),
}


@asynccontextmanager
async def hostile_server() -> AsyncIterator[str]:
    app = web.Application()
    for mode, (handler, _) in HOSTILE.items():
        app.router.add_get(f"/{mode}/v1/network", handler)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        host, port = runner.addresses[0][:2]
        yield f"http://{host}:{port}"
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("mode", list(HOSTILE))
def test_hostile_answer_is_a_clear_error_in_bounded_time_and_memory(mode: str) -> None:
    async def main() -> tuple[str, float]:
        async with hostile_server() as base:
            async with Coordinator(f"{base}/{mode}", timeout=TIMEOUT) as coordinator:
                started = time.monotonic()
                with pytest.raises(CoordinatorError) as refused:
                    await coordinator.network()
                return str(refused.value), time.monotonic() - started

    tracemalloc.start()
    try:
        message, took = asyncio.run(main())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert HOSTILE[mode][1] in message
    assert took < TIMEOUT + 10  # a generous bound: it ends at the client's timeout, never later
    assert peak < MAX_MEMORY, f"{peak / 2**20:.1f} MiB"
