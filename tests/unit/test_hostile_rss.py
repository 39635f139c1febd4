"""A sustained blast of hostile input does not grow the listener: the control socket and
the coordinator each run in a process of their own, take 10,000 hostile requests after a
warm-up, and their RSS grows by less than RSS_GROWTH_LIMIT; they answer afterwards. A leak
check, not a performance test (issue 17, part 5)."""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import aiohttp

from actors.control import MAX_REQUEST

BLAST = 10_000  # hostile requests measured
WARM_UP = 1_000  # sent first, so that caches and pools are full before the first measure
CONCURRENCY = 32
RSS_GROWTH_LIMIT = 20 * 1024  # KiB
READY_TIMEOUT = 30.0
REQUEST_TIMEOUT = 10.0

CONTROL_SERVER = """
import asyncio, sys
from pathlib import Path
from actors.control import ControlServer, EventBus

async def ping_daemon(_):
    return "running"

async def main():
    path = Path(sys.argv[1])
    server = ControlServer(path, {"ping_daemon": ping_daemon}, EventBus(), request_timeout=5.0)
    task = asyncio.ensure_future(server.run())
    while not path.exists():
        await asyncio.sleep(0.01)
    print("ready", flush=True)
    await task

asyncio.run(main())
"""

COORDINATOR = """
import asyncio, sys
from pathlib import Path
from tunnelmesh.coordinator.app import make_app, serve
from tunnelmesh.coordinator.store import open_store
from tunnelmesh.ratelimit import Rate, RateLimiter

async def main():
    unlimited = Rate(per_second=1e9, burst=10**9)  # every request parsed, none turned away early
    runner = await serve(make_app(await open_store(Path(sys.argv[1])), limiter=RateLimiter(unlimited, unlimited)),
                         "127.0.0.1", 0)
    print("ready", runner.addresses[0][1], flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


@contextmanager
def server_process(program: str, argument: str) -> Iterator[tuple[subprocess.Popen[str], list[str]]]:
    """The program in a process of its own (its RSS is the server's alone), and the words
    of its "ready" line."""
    process = subprocess.Popen([sys.executable, "-c", program, argument], stdout=subprocess.PIPE, text=True,
                               cwd=Path(__file__).resolve().parents[2])
    try:
        assert process.stdout is not None
        ready = asyncio.run(_ready_line(process))
        assert ready[:1] == ["ready"], ready
        yield process, ready[1:]
        assert process.poll() is None, "the server died under the blast"
    finally:
        process.kill()
        process.wait(timeout=10)


async def _ready_line(process: subprocess.Popen[str]) -> list[str]:
    assert process.stdout is not None
    return (await asyncio.wait_for(asyncio.to_thread(process.stdout.readline), READY_TIMEOUT)).split()


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


async def blast(count: int, one: Callable[[int], Awaitable[None]]) -> None:
    """`count` hostile requests, CONCURRENCY at a time."""
    slots = asyncio.Semaphore(CONCURRENCY)

    async def bounded(i: int) -> None:
        async with slots:
            await asyncio.wait_for(one(i), REQUEST_TIMEOUT)

    await asyncio.gather(*(bounded(i) for i in range(count)))


def measured(pid: int, one: Callable[[int], Awaitable[None]]) -> tuple[int, int]:
    asyncio.run(blast(WARM_UP, one))
    before = rss_kib(pid)
    asyncio.run(blast(BLAST, one))
    return before, rss_kib(pid)


# --- the control socket -----------------------------------------------------------------------


def control_request(path: Path) -> Callable[[int], Awaitable[None]]:
    rng = random.Random(17)
    huge = b"x" * (MAX_REQUEST + 1024)

    async def one(i: int) -> None:
        kind = i % 100
        if kind == 0:
            data = huge + b"\n"  # one in a hundred: over the line limit
        elif kind < 20:
            data = rng.randbytes(rng.randrange(1, 300))  # raw bytes, then the half line ends
        elif kind < 40:
            data = b'{"cmd":"\xff\xfe"}\n'  # bad UTF-8
        elif kind < 70:
            data = json.dumps(rng.choice([[1, 2], {"cmd": 5}, {"cmd": "nope" * 20}, None, "x"])).encode() + b"\n"
        else:
            data = b'{"cmd":"ping_daemon"}\n'
        reader, writer = await asyncio.open_unix_connection(str(path))
        try:
            writer.write(data)
            writer.write_eof()
            await reader.read()
        except ConnectionResetError:
            pass  # a line over the limit: the server closed before taking all of it
        finally:
            writer.close()

    return one


def test_control_socket_rss_is_flat_under_a_blast(tmp_path: Path) -> None:
    path = tmp_path / "control.sock"
    with server_process(CONTROL_SERVER, str(path)) as (process, _):
        before, after = measured(process.pid, control_request(path))
        reply = asyncio.run(_control_alive(path))
    assert reply == {"ok": True, "result": "running"}
    assert after - before < RSS_GROWTH_LIMIT, f"RSS {before} KiB -> {after} KiB"


async def _control_alive(path: Path) -> object:
    reader, writer = await asyncio.open_unix_connection(str(path))
    writer.write(b'{"cmd":"ping_daemon"}\n')
    reply = json.loads(await asyncio.wait_for(reader.readline(), REQUEST_TIMEOUT))
    writer.close()
    return reply


# --- the coordinator --------------------------------------------------------------------------

MALFORMED_HTTP = [
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(40)),
    b"GET /v1/network HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
    b"POST /v1/join/propose HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"GET /v1/network HTTP/1.1\r\nX-Long: " + b"a" * 20_000 + b"\r\n\r\n",
]


def coordinator_request(port: int) -> Callable[[int], Awaitable[None]]:
    rng = random.Random(23)
    base = f"http://127.0.0.1:{port}"
    session: aiohttp.ClientSession | None = None

    async def one(i: int) -> None:
        nonlocal session
        if session is None or session.closed:
            session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT))
        kind = i % 10
        if kind < 4:  # broken framing, on a connection of its own
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                writer.write(MALFORMED_HTTP[i % len(MALFORMED_HTTP)])
                await reader.read()
            except ConnectionResetError:
                pass
            finally:
                writer.close()
            return
        if kind < 6:
            body = rng.randbytes(rng.randrange(0, 2000))  # not JSON
        elif kind < 8:
            body = json.dumps({"identity": "ssh-ed25519 AAAA" + "x" * rng.randrange(0, 500), "name": i}).encode()
        elif kind == 8:
            body = b"{" * 40_000 + b"}" * 40_000  # over the unauthenticated body limit
        else:
            body = b'{"listen_port": 51820}'  # a member request without a signature
        path = "/v1/register" if kind == 9 else "/v1/join/propose"
        async with session.post(base + path, data=body, headers={"Content-Type": "application/json"}) as response:
            await response.read()
            assert 400 <= response.status < 500, response.status

    async def close() -> None:
        if session is not None:
            await session.close()

    one.close = close  # type: ignore[attr-defined]
    return one


def test_coordinator_rss_is_flat_under_a_blast(tmp_path: Path) -> None:
    with server_process(COORDINATOR, str(tmp_path / "c.db")) as (process, words):
        port = int(words[0])
        one = coordinator_request(port)

        async def run_blast(count: int) -> None:
            try:
                await blast(count, one)
            finally:
                await one.close()  # type: ignore[attr-defined]

        asyncio.run(run_blast(WARM_UP))
        before = rss_kib(process.pid)
        asyncio.run(run_blast(BLAST))
        after = rss_kib(process.pid)
        alive = asyncio.run(_coordinator_alive(port))
    assert alive == 503  # not set up: its own answer, so it still serves
    assert after - before < RSS_GROWTH_LIMIT, f"RSS {before} KiB -> {after} KiB"


async def _coordinator_alive(port: int) -> int:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)) as session:
        async with session.get(f"http://127.0.0.1:{port}/v1/network") as response:
            return response.status
