"""The control socket's connections are the control actor's: a daemon stopping while clients
are connected (an `events` subscriber, a command still waiting, an idle connection) leaves no
task and no descriptor behind (issue 12, item 4)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from actors.control import ControlServer, EventBus
from actors.runtime import Leftovers, Supervisor


def test_stopping_with_clients_connected_leaves_nothing_behind(tmp_path: Path) -> None:
    async def main() -> list[str]:
        leftovers = Leftovers()
        socket_path = tmp_path / "control.sock"
        supervisor = Supervisor()
        never, started = asyncio.Event(), asyncio.Event()

        async def slow(_: dict[str, Any]) -> str:
            started.set()
            await never.wait()  # a command that waits (as a ping does) when the daemon stops
            return "late"

        supervisor.add(ControlServer(socket_path, {"slow": slow}, EventBus()))
        running = asyncio.ensure_future(supervisor.run())
        for _ in range(1000):  # bounded: the server binds within a few turns of the loop
            if socket_path.exists():
                break
            await asyncio.sleep(0)
        subscriber = await asyncio.open_unix_connection(str(socket_path))
        subscriber[1].write(b'{"cmd":"events"}\n')
        assert b'"ok":true' in await subscriber[0].readline()
        idle = await asyncio.open_unix_connection(str(socket_path))
        waiting = await asyncio.open_unix_connection(str(socket_path))
        waiting[1].write(b'{"cmd":"slow"}\n')
        await asyncio.wait_for(started.wait(), 5.0)  # the server took the request in (and idle, accepted before it)
        supervisor.shutdown("down requested")
        assert (await running).reason == "down requested"
        for reader, writer in (subscriber, waiting, idle):
            assert await asyncio.wait_for(reader.read(), 5.0) == b""  # the daemon's end closed each
            writer.close()
            await writer.wait_closed()
        return await leftovers.found()

    assert asyncio.run(main()) == []
