"""The TUI's asyncio control client (tunnelmesh/tui/client.py) over a real Unix socket,
against a server that answers what each test gives it: the same checks and the same
errors as the CLI's client, and bounded waits."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from actors.messages import CONTROL_VERSION, HandshakeDone, PathChanged, PathStatus, to_json
from tunnelmesh.control_client import MAX_REPLY, ControlError, NotRunning
from tunnelmesh.tui.client import AsyncControlClient

Answer = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def serve(tmp_path: Path, answer: Answer, scenario: Callable[[AsyncControlClient], Awaitable[Any]],
          timeout: float = 5.0) -> Any:
    """Run `scenario` with a client of a socket whose every connection `answer` handles."""
    path = tmp_path / "control.sock"

    async def main() -> Any:
        server = await asyncio.start_unix_server(answer, str(path))
        try:
            return await scenario(AsyncControlClient(path, timeout=timeout))
        finally:
            server.close()

    return asyncio.run(main())


def replying(*lines: bytes) -> Answer:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readline()
        for line in lines:
            writer.write(line)
        await writer.drain()
        writer.close()

    return answer


def test_no_daemon_is_not_running_with_the_way_to_start_it(tmp_path: Path) -> None:
    client = AsyncControlClient(tmp_path / "control.sock")
    with pytest.raises(NotRunning, match=r"no daemon at .*control.sock.*tunnelmesh up"):
        asyncio.run(client.status())


def test_a_daemon_of_another_control_version_is_refused_by_its_number(tmp_path: Path) -> None:
    reply = json.dumps({"ok": True, "result": {"control_version": CONTROL_VERSION + 1, "node": {}}}).encode() + b"\n"
    with pytest.raises(ControlError, match=f"speaks control version {CONTROL_VERSION + 1}"):
        serve(tmp_path, replying(reply), lambda client: client.status())


def test_an_error_reply_and_a_reply_off_the_schema_are_control_errors(tmp_path: Path) -> None:
    with pytest.raises(ControlError, match="no peer named x"):
        serve(tmp_path, replying(b'{"ok": false, "error": "no peer named x"}\n'), lambda c: c.probe("x"))
    with pytest.raises(ControlError, match="does not fit control version.*probing"):
        serve(tmp_path, replying(b'{"ok": true, "result": {"peer": "b", "probing": "yes", "detail": ""}}\n'),
              lambda c: c.probe("b"))
    with pytest.raises(ControlError, match="malformed"):
        serve(tmp_path, replying(b"not json\n"), lambda c: c.probe("b"))
    with pytest.raises(ControlError, match="closed the connection without answering"):
        serve(tmp_path, replying(), lambda c: c.probe("b"))


def test_a_probe_reply_is_read_into_its_dataclass(tmp_path: Path) -> None:
    reply = b'{"ok": true, "result": {"peer": "b", "probing": true, "detail": "probing UDP now"}}\n'
    result = serve(tmp_path, replying(reply), lambda c: c.probe("b"))
    assert (result.peer, result.probing, result.detail) == ("b", True, "probing UDP now")


def test_a_silent_daemon_is_given_up_on_within_the_timeout(tmp_path: Path) -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # reads until the client closes; never answers

    with pytest.raises(ControlError, match="did not answer in time"):
        serve(tmp_path, silent, lambda c: c.status(), timeout=0.3)


def test_a_reply_over_the_limit_is_refused_not_read_whole(tmp_path: Path) -> None:
    async def flood(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readline()
        chunk = b"x" * (1 << 20)
        try:
            for _ in range(MAX_REPLY // len(chunk) + 2):
                writer.write(chunk)
                await writer.drain()
        except ConnectionError:
            pass  # the client stopped reading, as it should
        writer.close()

    with pytest.raises(ControlError, match="larger than 16 MiB"):
        serve(tmp_path, flood, lambda c: c.status())


def test_events_are_typed_as_they_come_and_end_with_the_stream(tmp_path: Path) -> None:
    events = [HandshakeDone("b", True, "udp"), PathChanged("b", PathStatus("ssh", "ssh 192.0.2.2:2222"), "udp",
                                                            "udp failing", 1.5)]
    lines = [json.dumps({"ok": True, "result": {"control_version": CONTROL_VERSION}}).encode() + b"\n"]
    lines += [json.dumps(to_json(event)).encode() + b"\n" for event in events]

    async def collect(client: AsyncControlClient) -> list[object]:
        return [event async for event in client.events()]

    assert serve(tmp_path, replying(*lines), collect) == events
    with pytest.raises(ControlError, match="unknown event kind 'rumour'"):
        serve(tmp_path, replying(lines[0], b'{"event": "rumour", "peer": "b"}\n'), collect)
