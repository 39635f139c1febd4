"""Hostile input on the control socket (actors/control.py), against the real server on a
Unix socket: any bytes, lines over MAX_REQUEST, bad UTF-8, JSON of the wrong shape, half
lines that end or stall, and a thousand connections at once. Every line gets one JSON reply
or the connection is closed; nothing is held for ever; the server goes on answering
(issue 17, part 5)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from actors.control import MAX_REQUEST, ControlServer, EventBus
from tests.property.test_membership_fuzz import json_values
from tunnelmesh import control_client

T = TypeVar("T")
REQUEST_TIMEOUT = 1.0  # the server's, shortened so a stalled client is dropped quickly here
MAX_CONNECTIONS = 32
CLIENT_TIMEOUT = 10.0  # the test's own bound on any one reply


async def typed(request: dict[str, Any]) -> str:
    """A handler that checks its argument's type, as the real ones do."""
    count = request.get("count")
    if isinstance(count, bool) or not isinstance(count, int):
        raise ValueError("'count' must be an integer")
    return "x" * min(max(count, 0), 10)


async def ping_daemon(_: dict[str, Any]) -> str:
    return "running"


@dataclass
class Served:
    """A ControlServer running on its own event loop in a thread."""

    path: Path
    server: ControlServer
    loop: asyncio.AbstractEventLoop

    def on_loop(self, read: Callable[[], T]) -> T:
        """`read()` evaluated on the server's loop (its state is that loop's)."""
        async def call() -> T:
            return read()

        return asyncio.run_coroutine_threadsafe(call(), self.loop).result(CLIENT_TIMEOUT)

    def connections(self) -> int:
        return self.on_loop(lambda: len(self.server._connections))

    def until_no_connections(self) -> None:
        async def wait() -> None:
            async with asyncio.timeout(CLIENT_TIMEOUT):
                while self.server._connections:
                    await asyncio.sleep(0.01)

        asyncio.run_coroutine_threadsafe(wait(), self.loop).result(CLIENT_TIMEOUT + 1)

    def connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(CLIENT_TIMEOUT)
        deadline = time.monotonic() + CLIENT_TIMEOUT
        while True:
            try:
                sock.connect(str(self.path))
                return sock
            except BlockingIOError:  # the listen backlog is full (a flood): the server catches up
                if time.monotonic() > deadline:
                    sock.close()
                    raise
                time.sleep(0.001)

    def alive(self) -> None:
        with self.connect() as sock:
            sock.sendall(b'{"cmd":"ping_daemon"}\n')
            sock.shutdown(socket.SHUT_WR)
            assert json.loads(read_all(sock)) == {"ok": True, "result": "running"}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    path = tmp_path_factory.mktemp("control") / "control.sock"
    loop = asyncio.new_event_loop()
    started: Future[ControlServer] = Future()
    stopping = asyncio.Event()

    async def serve() -> None:
        server = ControlServer(path, {"typed": typed, "ping_daemon": ping_daemon}, EventBus(),
                               request_timeout=REQUEST_TIMEOUT, max_connections=MAX_CONNECTIONS)
        task = asyncio.ensure_future(server.run())
        async with asyncio.timeout(CLIENT_TIMEOUT):
            while not path.exists():  # bound by the timeout above: the server binds within a few turns
                await asyncio.sleep(0.01)
        started.set_result(server)
        await stopping.wait()
        await server.stop()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),), daemon=True)
    thread.start()
    served = Served(path, started.result(CLIENT_TIMEOUT), loop)
    try:
        yield served
    finally:
        loop.call_soon_threadsafe(stopping.set)
        thread.join(CLIENT_TIMEOUT)
        loop.close()
        assert not thread.is_alive()


def read_all(sock: socket.socket, limit: int = 1 << 20) -> bytes:
    """Everything the server sends until it closes (bounded)."""
    chunks, size = [], 0
    while size <= limit:
        chunk = sock.recv(65536)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def replies(data: bytes) -> list[dict[str, Any]]:
    """The reply lines of a whole exchange, each a JSON object with a boolean 'ok'."""
    out = [json.loads(line) for line in data.split(b"\n") if line]
    assert data.endswith(b"\n") or not data
    for reply in out:
        assert isinstance(reply, dict) and isinstance(reply["ok"], bool)
    return out


def exchange(served: Served, data: bytes) -> list[dict[str, Any]]:
    with served.connect() as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        return replies(read_all(sock))


def is_events(line: bytes) -> bool:
    """Whether the server reads `line` as the `events` request."""
    try:
        request = json.loads(line)
    except (ValueError, RecursionError):
        return False
    return isinstance(request, dict) and request.get("cmd") == "events"


FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

@FUZZ
@given(st.binary(max_size=2000))
def test_any_bytes_get_one_reply_per_line(served: Served, data: bytes) -> None:
    lines = (data + b"\n").split(b"\n")[:-1]
    assume(not any(is_events(line) for line in lines))  # that turns the connection into a stream
    got = exchange(served, data + b"\n")
    assert len(got) == len(lines)
    for line, reply in zip(lines, got):
        try:
            request = json.loads(line)
        except ValueError:
            assert reply["ok"] is False and reply["error"].startswith("bad request: ")
        else:
            if not (isinstance(request, dict) and request.get("cmd") in ("typed", "ping_daemon", "events")):
                assert reply["ok"] is False
    served.alive()


@FUZZ
@given(json_values, json_values)
def test_json_of_any_shape_gets_a_reply(served: Served, request: Any, count: Any) -> None:
    """A request that is not an object, a 'cmd' that is not a string or not known, an
    argument of the wrong type: an error reply each, and the connection stays usable."""
    assume(request not in ("events", "typed", "ping_daemon") and not is_events(json.dumps(request).encode()))
    lines = [json.dumps(request), json.dumps({"cmd": request}), json.dumps({"cmd": "typed", "count": count})]
    got = exchange(served, "\n".join(lines).encode() + b'\n{"cmd":"ping_daemon"}\n')
    assert len(got) == 4 and got[-1] == {"ok": True, "result": "running"}
    assert all(reply["ok"] is False for reply in got[:2])
    valid_count = isinstance(count, int) and not isinstance(count, bool)
    assert got[2]["ok"] is valid_count


def test_bad_utf8_is_a_bad_request(served: Served) -> None:
    got = exchange(served, b'{"cmd":"\xff\xfe"}\n{"cmd":"ping_\xc3daemon"}\n{"cmd":"ping_daemon"}\n')
    assert [reply["ok"] for reply in got] == [False, False, True]
    assert got[0]["error"].startswith("bad request: ") and "utf-8" in got[0]["error"].lower()


@pytest.mark.parametrize("newline", [b"\n", b""])
def test_line_over_the_limit_is_refused_and_closed(served: Served, newline: bytes) -> None:
    with served.connect() as sock:
        # Sent from a thread: the server stops reading at the limit, so sendall may block.
        sender = threading.Thread(target=lambda: _send_ignoring_reset(sock, b"a" * (MAX_REQUEST + 10_000) + newline))
        sender.start()
        got = replies(read_all(sock))
        sender.join(CLIENT_TIMEOUT)
    assert got == [{"ok": False, "error": f"request larger than {MAX_REQUEST} bytes"}]
    served.until_no_connections()
    served.alive()


def _send_ignoring_reset(sock: socket.socket, data: bytes) -> None:
    try:
        sock.sendall(data)
    except OSError:
        pass  # the server closed on us half-way, as it should


def test_half_line_then_close_is_answered_and_forgotten(served: Served) -> None:
    got = exchange(served, b'{"cmd":"ping_dae')
    assert len(got) == 1 and got[0]["ok"] is False
    served.until_no_connections()


def test_half_line_then_stall_is_dropped_after_the_request_timeout(served: Served) -> None:
    before = served.on_loop(lambda: served.server.timed_out)
    with served.connect() as sock:
        sock.sendall(b'{"cmd":"ping_daemon"')  # and nothing more, connection kept open
        got = replies(read_all(sock))  # returns once the server closes: bounded by CLIENT_TIMEOUT
    assert got == [{"ok": False, "error": f"no whole request line within {REQUEST_TIMEOUT:g} s"}]
    assert served.on_loop(lambda: served.server.timed_out) == before + 1
    served.until_no_connections()


def test_a_client_that_never_reads_is_dropped(served: Served) -> None:
    """Requests pipelined by a client that never takes the replies: the replies fill the
    socket, the server gives up within the request timeout instead of waiting for ever."""
    before = served.on_loop(lambda: served.server.timed_out)
    with served.connect() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        request = json.dumps({"cmd": "x" * 60_000}).encode() + b"\n"  # each error reply is ~60 KB
        sent = 0
        try:
            for _ in range(200):  # bounded; the server stops reading once its replies back up
                sock.sendall(request)
                sent += 1
        except (socket.timeout, OSError):
            pass
        served.until_no_connections()  # while this end is still open: the server dropped it
    assert sent > 0 and served.on_loop(lambda: served.server.timed_out) > before


def test_a_thousand_connections_at_once_are_bounded(served: Served) -> None:
    refused_before = served.on_loop(lambda: served.server.refused)
    socks = []
    try:
        for _ in range(1000):
            socks.append(served.connect())
        # Each connection is taken in by the server (an accepted one holds a slot, the rest
        # are answered and closed): wait until every one was seen.
        async def settle() -> None:
            async with asyncio.timeout(CLIENT_TIMEOUT * 3):
                while served.server.refused - refused_before + len(served.server._connections) < 1000:
                    await asyncio.sleep(0.01)

        asyncio.run_coroutine_threadsafe(settle(), served.loop).result(CLIENT_TIMEOUT * 3 + 1)
        assert served.connections() == MAX_CONNECTIONS
        assert served.on_loop(lambda: served.server.refused) - refused_before == 1000 - MAX_CONNECTIONS
        answers = [replies(read_all(sock)) for sock in socks[MAX_CONNECTIONS:MAX_CONNECTIONS + 20]]
        assert all(a == [{"ok": False, "error": f"too many control connections (over {MAX_CONNECTIONS})"}]
                   for a in answers)
    finally:
        for sock in socks:
            sock.close()
    served.until_no_connections()
    served.alive()


# --- The CLI's client against whatever answers on the socket --------------------------------


@dataclass
class HostileDaemon:
    """A Unix socket server that answers each request with `answer` and closes."""

    path: Path
    answer: bytes = b""


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HostileDaemon]:
    daemon = HostileDaemon(tmp_path_factory.mktemp("hostile") / "control.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(daemon.path))
    listener.listen(8)
    listener.settimeout(0.2)
    done = threading.Event()

    def serve() -> None:
        while not done.is_set():
            try:
                conn, _ = listener.accept()
            except socket.timeout:
                continue
            with conn:
                conn.settimeout(CLIENT_TIMEOUT)
                with contextlib.suppress(OSError):
                    conn.recv(65536)
                    conn.sendall(daemon.answer)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield daemon
    finally:
        done.set()
        thread.join(CLIENT_TIMEOUT)
        listener.close()


@FUZZ
@given(st.one_of(st.binary(max_size=500), json_values.map(lambda v: json.dumps(v).encode() + b"\n")))
def test_client_takes_any_answer_as_a_result_or_a_control_error(hostile: HostileDaemon, answer: bytes) -> None:
    hostile.answer = answer
    try:
        control_client.status(hostile.path)
    except control_client.ControlError:
        pass  # the one kind of failure the CLI words for its user


def test_client_refuses_a_reply_over_its_limit(hostile: HostileDaemon, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(control_client, "MAX_REPLY", 100_000)
    hostile.answer = b'{"ok":true,"result":"' + b"a" * 200_000 + b'"}\n'
    with pytest.raises(control_client.ControlError, match="larger than"):
        control_client.request(hostile.path, "status")
