"""The control actor: a Unix socket inside the state directory (mode 0600),
speaking JSON lines. The CLI and the TUI reach the daemon only through it.

Request:  {"cmd": "status" | "peers" | "ping" | "down" | "ping_daemon" | "events", ...}
Reply:    {"ok": true, "result": ...} or {"ok": false, "error": "..."}
`events` keeps the connection open and streams one JSON object per event.
Results and events are the dataclasses of actors/messages.py, made JSON by its
`to_json` here and nowhere else; docs/control.md is the schema. The handlers are
`ControlApi`'s (actors/control_api.py). Nothing secret is ever put in a reply.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from .messages import Event, Subscribed, to_json
from .runtime import Actor

log = logging.getLogger("tunnelmesh.control")

MAX_REQUEST = 64 * 1024
# A client gets this long to send each whole request line and to take each reply: a client
# that stalls half-way (or never reads) is dropped rather than holding its connection forever.
REQUEST_TIMEOUT = 30.0
# Connections open at once (`events` subscribers included); more are answered with an error
# and closed, so a flood of connections cannot grow the daemon without bound.
MAX_CONNECTIONS = 64
CONNECTION_STOP_TIMEOUT = 2.0  # a connection's task ends at once when cancelled; this only bounds the wait
EVENT_QUEUE = 256

Handler = Callable[[dict[str, Any]], Awaitable[object]]


class EventBus:
    """Fan-out of daemon events to `events` subscribers; a slow subscriber
    loses events (counted in `dropped`, shown in status) rather than slowing the daemon."""

    def __init__(self) -> None:
        self._subscribers: set[asyncio.Queue[Event]] = set()
        self.dropped = 0

    def publish(self, event: Event) -> None:
        if not isinstance(event, Event):  # what subscribers get is the schema's (docs/control.md)
            raise TypeError(f"an event is one of the Event dataclasses of actors/messages.py, not {type(event).__name__}")
        for queue in self._subscribers:
            try:
                queue.put_nowait(event)
            except asyncio.QueueFull:
                self.dropped += 1

    def subscribe(self) -> asyncio.Queue[Event]:
        queue: asyncio.Queue[Event] = asyncio.Queue(EVENT_QUEUE)
        self._subscribers.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[Event]) -> None:
        self._subscribers.discard(queue)


class ControlServer(Actor):
    name = "control"
    policy = "fatal"

    def __init__(self, path: Path, handlers: dict[str, Handler], bus: EventBus, *,
                 request_timeout: float = REQUEST_TIMEOUT, max_connections: int = MAX_CONNECTIONS) -> None:
        super().__init__()
        self.path = path
        self.handlers = handlers
        self.bus = bus
        self.request_timeout = request_timeout
        self.max_connections = max_connections
        self.refused = 0  # connections turned away because max_connections were open
        self.timed_out = 0  # connections dropped for a request (or a reply) not done in time
        self._server: asyncio.AbstractServer | None = None
        # One task per connection (asyncio's server makes them): this actor's children, ended
        # when it stops, so an `events` subscriber or a waiting ping cannot outlive the daemon.
        self._connections: set[asyncio.Task[Any]] = set()

    async def run(self) -> None:
        if self.path.exists() or self.path.is_symlink():
            self.path.unlink()
        old_umask = os.umask(0o177)  # the socket is created 0600
        try:
            self._server = await asyncio.start_unix_server(self._client, path=str(self.path), limit=MAX_REQUEST)
        finally:
            os.umask(old_umask)
        os.chmod(self.path, 0o600)
        async with self._server:
            await self._server.serve_forever()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        if len(self._connections) >= self.max_connections:
            self.refused += 1
            if self.refused == 1 or self.refused % 1000 == 0:  # a flood is one line per thousand
                log.warning("control socket: %d connections refused (more than %d at once)",
                            self.refused, self.max_connections)
            writer.write(_line({"ok": False, "error": f"too many control connections (over {self.max_connections})"}))
            writer.close()  # no drain: a client that does not read cannot hold this connection
            return
        self._connections.add(task)
        try:
            while True:
                try:
                    async with asyncio.timeout(self.request_timeout):
                        line = await reader.readline()
                except (ValueError, asyncio.LimitOverrunError):
                    await self._reply(writer, {"ok": False, "error": f"request larger than {MAX_REQUEST} bytes"})
                    return
                except TimeoutError:
                    await self._reply(writer, {"ok": False, "error": f"no whole request line within {self.request_timeout:g} s"})
                    raise
                if not line:
                    return
                try:
                    request = json.loads(line)
                    if not isinstance(request, dict) or not isinstance(request.get("cmd"), str):
                        raise ValueError("a request is a JSON object with a string 'cmd'")
                except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
                    await self._reply(writer, {"ok": False, "error": f"bad request: {str(exc)[:200]}"})
                    continue
                if request["cmd"] == "events":
                    await self._stream_events(writer)
                    return
                handler = self.handlers.get(request["cmd"])
                if handler is None:
                    await self._reply(writer, {"ok": False, "error": f"unknown command {request['cmd'][:100]!r}; known: {', '.join(sorted(self.handlers))}, events"})
                    continue
                try:
                    result = to_json(await handler(request))
                except Exception as exc:  # the client gets the reason; the daemon lives on
                    log.debug("control %s failed", request["cmd"], exc_info=True)
                    await self._reply(writer, {"ok": False, "error": str(exc) or type(exc).__name__})
                    continue
                await self._reply(writer, {"ok": True, "result": result})
        except ConnectionError:
            pass
        except TimeoutError:  # a request line not sent, or a reply not taken, in time
            self.timed_out += 1
        finally:
            self._connections.discard(task)
            writer.close()

    async def _reply(self, writer: asyncio.StreamWriter, message: dict[str, Any]) -> None:
        """One reply, taken by the client within the request timeout (TimeoutError if not)."""
        async with asyncio.timeout(self.request_timeout):
            await _send(writer, message)

    async def _stream_events(self, writer: asyncio.StreamWriter) -> None:
        queue = self.bus.subscribe()
        try:
            await _send(writer, {"ok": True, "result": to_json(Subscribed())})
            while True:
                await _send(writer, to_json(await queue.get()))
        finally:
            self.bus.unsubscribe(queue)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        connections = list(self._connections)
        for task in connections:
            task.cancel()
        if connections:
            await asyncio.wait(connections, timeout=CONNECTION_STOP_TIMEOUT)
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass


async def _send(writer: asyncio.StreamWriter, message: dict[str, Any]) -> None:
    writer.write(_line(message))
    await writer.drain()


def _line(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"
