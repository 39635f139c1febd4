"""`tunnelmesh pending` and the TUI's pending joins view against a hostile coordinator (a
real aiohttp server on 127.0.0.1 answering the real admin client): a `requested` time that
is a string, a bool, huge, negative or NaN is shown as "?", never a crash of the CLI or of
the TUI (whose workers end the app when they raise); a list of other things than objects is
a clear error, and control characters in names never reach the terminal."""

from __future__ import annotations

import asyncio
import contextlib
import io
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from aiohttp import web
from textual.widgets import DataTable

from tests.support.coordinator import AdminMachine, World
from tests.support.wait import until
from tunnelmesh.cli import main
from tunnelmesh.cli.network import asked_at
from tunnelmesh.tui.admin import PendingJoins
from tunnelmesh.tui.app import TunnelMeshApp

SANE = 1_767_225_600  # 2026-01-01
HOSTILE_TIMES: list[Any] = ["yesterday", "[b]now[/b]", True, 10**30, 1e308, -5, float("nan"), None, [1], {"t": 1}]


def rows(world: World, answered: int) -> list[dict[str, Any]]:
    """One pending request per hostile `requested`, then `answered` + 1 with a sane time (a
    reload sees one more than the list before it)."""
    identity = world.nodes[1].public.to_line()
    made = [{"kind": "request", "name": f"h{i}", "identity": identity, "ipv4": "100.64.0.9", "requested": value}
            for i, value in enumerate(HOSTILE_TIMES)]
    return [*made, *({"kind": "request", "name": f"sane{i}", "identity": identity, "ipv4": "100.64.0.9",
                      "requested": SANE} for i in range(answered + 1))]


@contextlib.asynccontextmanager
async def hostile_coordinator(world: World, state_dir: Path,
                              listed: Callable[[World, int], list[Any]] = rows) -> AsyncIterator[AdminMachine]:
    """A coordinator whose pending list is `listed` (the hostile rows by default), and the
    admin's machine (admin key, network state) pointing at it."""
    answered = 0

    async def pending(_: web.Request) -> web.Response:
        nonlocal answered
        answer = listed(world, answered)
        answered += 1
        return web.json_response({"pending": answer})  # json.dumps writes NaN as NaN; json.loads reads it

    app = web.Application()
    app.router.add_get("/v1/admin/pending", pending)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        host, port = runner.addresses[0][:2]
        admin_node = world.admin_member(0, "admin", 1)
        yield AdminMachine.create(state_dir, f"http://{host}:{port}", world, admin_node)
    finally:
        await runner.cleanup()


def test_only_a_sane_unix_time_is_shown_as_a_date() -> None:
    for value in HOSTILE_TIMES:
        assert asked_at(value) == "?", value
    assert asked_at(SANE) == time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(SANE))
    assert asked_at(float(SANE)) == asked_at(SANE) and asked_at(0) != "?"


def pending_through_the_cli(world: World, state_dir: Path,
                            listed: Callable[[World, int], list[Any]] = rows) -> tuple[int, str, str]:
    """`tunnelmesh pending` against the hostile coordinator: exit code, stdout, stderr."""
    async def scenario() -> tuple[int, str, str]:
        async with hostile_coordinator(world, state_dir, listed) as machine:
            out, err = io.StringIO(), io.StringIO()

            def run() -> int:
                with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                    return main(["--state-dir", str(machine.paths.state_dir), "pending"])

            return await asyncio.to_thread(run), out.getvalue(), err.getvalue()  # main runs its own event loop

    return asyncio.run(scenario())


def test_the_cli_lists_hostile_times_as_unknown(tmp_path: Path) -> None:
    world = World.create()  # outside the loop: it loads SSH identities with asyncio.run
    code, printed, _ = pending_through_the_cli(world, tmp_path / "admin")
    assert code == 0, printed
    lines = printed.splitlines()
    assert [line.split()[0] for line in lines] == [f"h{i}" for i in range(len(HOSTILE_TIMES))] + ["sane0"], printed
    assert all(line.endswith("asked ?") for line in lines[:-1]), printed
    assert lines[-1].endswith(f"asked {asked_at(SANE)}"), printed


def test_a_pending_list_of_other_things_than_objects_is_a_clear_error(tmp_path: Path) -> None:
    world = World.create()
    code, printed, said = pending_through_the_cli(world, tmp_path / "admin", lambda _world, _n: ["h0", 7, None])
    assert code != 0 and printed == "", printed
    assert "answered a pending list that is not a list of objects" in said and "Traceback" not in said, said


def test_the_cli_never_hands_the_coordinators_control_characters_to_the_terminal(tmp_path: Path) -> None:
    def listed(world: World, _n: int) -> list[Any]:
        (row,) = rows(world, 0)[-1:]
        return [{**row, "name": "evil\x1b]0;owned\x07", "ipv4": "\x1b[2J"}]

    code, printed, _ = pending_through_the_cli(World.create(), tmp_path / "admin", listed)
    assert code == 0 and "\x1b" not in printed and "\x07" not in printed, repr(printed)
    assert printed.startswith("'evil\\x1b]0;owned\\x07'  SHA256:") and "would get '\\x1b[2J'" in printed, printed


def test_the_tui_pending_view_shows_hostile_times_as_unknown_and_carries_on(tmp_path: Path) -> None:
    world = World.create()  # outside the loop: it loads SSH identities with asyncio.run

    async def scenario() -> None:
        async with hostile_coordinator(world, tmp_path / "admin") as machine:
            app = TunnelMeshApp(machine.paths)  # no daemon: the pending view needs only the coordinator
            async with app.run_test(size=(160, 40)) as pilot:
                screen = PendingJoins(machine.paths)
                await app.push_screen(screen)
                table = screen.query_one("#pending", DataTable)
                await until("the pending joins listed", lambda: table.row_count == len(HOSTILE_TIMES) + 1, 10.0)
                asked = [str(table.get_row_at(i)[-1]) for i in range(table.row_count)]
                assert asked == ["?"] * len(HOSTILE_TIMES) + [asked_at(SANE)], asked
                await pilot.press("r")  # the reload's list has one more: shown, and the app is still running
                await until("the reloaded list", lambda: table.row_count == len(HOSTILE_TIMES) + 2, 10.0)
                assert str(table.get_row_at(0)[-1]) == "?" and app.is_running and app.screen is screen

    asyncio.run(scenario())
