"""The TUI's side of the control socket (docs/control.md): asyncio, so that the UI's event
loop never waits on the daemon. Every reply is checked as the CLI's client checks it
(tunnelmesh/control_client.py: the same functions, the same errors): the control version
first, then each field against the schema."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from actors.messages import Event, PingResult, ProbeResult, Status, Subscribed
from tunnelmesh.control_client import (
    MAX_REPLY, ControlError, _connect_error, _parse_reply, _result, _typed, _versioned,
)

#: Seconds a request may take to connect and be answered (a ping adds its own wait).
REQUEST_TIMEOUT = 10.0


class AsyncControlClient:
    def __init__(self, path: Path, timeout: float = REQUEST_TIMEOUT) -> None:
        self.path = path
        self.timeout = timeout

    async def _open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        try:
            async with asyncio.timeout(self.timeout):
                return await asyncio.open_unix_connection(str(self.path), limit=MAX_REPLY + 1)
        except (FileNotFoundError, ConnectionRefusedError, PermissionError) as exc:
            raise _connect_error(self.path, exc) from None
        except (asyncio.TimeoutError, OSError) as exc:
            raise ControlError(f"cannot connect to {self.path}: {exc or 'timed out'}") from None

    async def request(self, cmd: str, timeout: float | None = None, **args: Any) -> Any:
        """One command on its own connection, as the CLI sends it; its raw result."""
        reader, writer = await self._open()
        try:
            writer.write(json.dumps({"cmd": cmd, **args}).encode() + b"\n")
            async with asyncio.timeout(timeout or self.timeout):
                line = await reader.readline()
        except asyncio.TimeoutError:
            raise ControlError("the daemon did not answer in time") from None
        except ValueError:  # the line outgrew the reader's limit
            raise ControlError(f"the daemon's reply is larger than {MAX_REPLY // (1024 * 1024)} MiB") from None
        except OSError as exc:
            raise ControlError(f"the control connection failed: {exc}") from None
        finally:
            writer.close()
        if not line:
            raise ControlError("the daemon closed the connection without answering")
        return _result(_parse_reply(line))

    async def status(self) -> Status:
        return _versioned(Status, await self.request("status"))

    async def ping(self, peer: str, wait: float) -> PingResult:
        return _typed(PingResult, await self.request("ping", timeout=wait + self.timeout, peer=peer, wait=wait))

    async def probe(self, peer: str) -> ProbeResult:
        return _typed(ProbeResult, await self.request("probe", peer=peer))

    async def events(self) -> AsyncIterator[Event]:
        """The daemon's events as they come; ends when the daemon closes the stream."""
        reader, writer = await self._open()
        try:
            writer.write(b'{"cmd":"events"}\n')
            async with asyncio.timeout(self.timeout):
                line = await reader.readline()
            _versioned(Subscribed, _result(_parse_reply(line or b"{}"),
                                           "the daemon closed the connection without answering"))
            while line := await reader.readline():
                yield _typed(Event, _parse_reply(line))
        except asyncio.TimeoutError:
            raise ControlError("the daemon did not answer the events request in time") from None
        except ValueError:
            raise ControlError("an event line outgrew the reply limit") from None
        except OSError as exc:
            raise ControlError(f"the event stream failed: {exc}") from None
        finally:
            writer.close()
