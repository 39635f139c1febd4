"""`tunnelmesh tui` against real daemons in namespaces: the app runs in this process with
textual's Pilot, pointed at a node's control socket (a Unix socket in its state directory,
on this host's file system). The peer table fills, a rung change (UDP cut with nftables)
reaches the event log, the ping and re-probe keys answer, the detail view shows the
change, a stopped daemon shows as down and a restarted one is picked up again; on the
admin's node, an invite comes as a token to copy, a pending join is approved and a
member revoked, each after a confirmation. An SVG of the main screen is kept in the
test's directory (and in TUNNELMESH_TUI_SNAPSHOT, when set, for a person to look at)."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from textual.widgets import DataTable, Input, RichLog, Static, TextArea

from tests.support.wait import until
from tools.lab import PROJECT_ROOT, Lab, clean_environment
from tools.mesh import TUNNELMESH, MeshNode, block_path, build_network, diagnostics, wait_for_handshakes
from tunnelmesh.membership import Token
from tunnelmesh.paths import resolve_paths
from tunnelmesh.tui.admin import Confirm, PendingJoins, ShowToken
from tunnelmesh.tui.app import TunnelMeshApp
from tunnelmesh.tui.screens import PeerDetail

pytestmark = pytest.mark.e2e

SIZE = (200, 50)  # wide enough that no log line the test looks for is wrapped


def app_for(member: MeshNode) -> TunnelMeshApp:
    return TunnelMeshApp(resolve_paths(str(member.node.state_dir), None), poll=0.5)


def event_log(app: TunnelMeshApp) -> str:
    return "\n".join(line.text for line in app.query_one("#events", RichLog).lines)


def table_rows(app: TunnelMeshApp) -> dict[str, list[str]]:
    table = app.query_one("#peers", DataTable)
    return {str(row.key.value): [str(cell) for cell in table.get_row(row.key)] for row in table.ordered_rows}


async def wait(what: str, condition: Callable[[], object], timeout: float, app: TunnelMeshApp,
               mesh: dict[str, MeshNode]) -> None:
    try:
        await until(what, condition, timeout=timeout, interval=0.1)
    except AssertionError as exc:
        details = await asyncio.to_thread(diagnostics, mesh)
        pytest.fail(f"{exc} (screen {app.screen!r})\n--- the TUI's event log ---\n{event_log(app)}\n"
                    f"--- its table ---\n{table_rows(app)}\n"
                    f"{details}", pytrace=False)


async def follow_a_live_node(mesh: dict[str, MeshNode], shots: Path) -> None:
    a, b = mesh["a"], mesh["b"]
    app = app_for(a)
    async with app.run_test(size=SIZE) as pilot:
        await wait("the peer table lists hub and b, up", lambda: {
            name: row[2] for name, row in table_rows(app).items()} == {"hub": "up", "b": "up"}, 20, app, mesh)
        node = str(app.query_one("#node", Static).render())
        assert node.startswith("a ") and a.mesh_ip in node and "coordinator" in node, node

        table = app.query_one("#peers", DataTable)
        table.move_cursor(row=table.get_row_index("b"))
        await pilot.press("p")
        await wait("the ping key's answer in the event log", lambda: "ping b: " in event_log(app)
                   and " ms, answered on udp" in event_log(app), 15, app, mesh)
        await wait("b's round trip in the RTT column", lambda: table_rows(app)["b"][4].endswith(" ms"), 5, app, mesh)

        # The search narrows the table to matching names, and escape gives it all back.
        await pilot.press("slash", "h", "u")
        await wait("the search to leave only hub", lambda: list(table_rows(app)) == ["hub"], 5, app, mesh)
        await pilot.press("escape")
        await wait("every peer back after the search", lambda: set(table_rows(app)) == {"hub", "b"}, 5, app, mesh)
        assert not app.query_one("#search", Input).display

        # Traffic that notices the cut, then UDP between a and b cut: the ladder climbs.
        pinger = a.node.popen("ping", "-i", "0.2", "-W", "1", b.mesh_ip, log_name="tui-ping")
        try:
            await asyncio.to_thread(block_path, a, b, udp=True)
            await wait("a rung change of b in the event log", lambda: "b: udp -> " in event_log(app), 40, app, mesh)
            await wait("b's row on another rung", lambda: table_rows(app)["b"][3] in ("ssh", "relay"), 10, app, mesh)
            table.move_cursor(row=table.get_row_index("b"))
            await pilot.press("r")
            await wait("the re-probe key's answer", lambda: "re-probe b: probing UDP" in event_log(app), 10, app,
                       mesh)
            await wait("a few polls of b's rates for the sparkline",
                       lambda: len(app.rates.history.get("b", ())) >= 3, 10, app, mesh)
            app.save_screenshot("tui-main.svg", str(shots))

            await pilot.press("d")
            await wait("the detail view", lambda: isinstance(app.screen, PeerDetail), 5, app, mesh)
            detail = str(app.screen.query_one("#detail", Static).render())
            assert "why not better  UDP: " in detail and "packets" in detail, detail
            assert f"UDP candidates  {b.underlay}:" in detail, detail  # b's UDP address, from the map or proven
            await wait("the rung change in the detail's history",
                       lambda: app.screen.query_one("#transitions", DataTable).row_count >= 1, 5, app, mesh)
            app.save_screenshot("tui-detail.svg", str(shots))
            await pilot.press("escape")
        finally:
            pinger.terminate()
            pinger.wait(timeout=10)
            await asyncio.to_thread(block_path, a, b)

        await asyncio.to_thread(a.down)
        banner = app.query_one("#banner", Static)
        await wait("the daemon shown as down", lambda: banner.display and not app.connected, 20, app, mesh)
        assert f"daemon not running at {a.node.state_dir}/control.sock" in str(banner.render())
        assert "lost the daemon" in event_log(app)
        app.save_screenshot("tui-down.svg", str(shots))

        await asyncio.to_thread(a.up)
        await wait("the TUI back with the daemon", lambda: app.connected and not banner.display
                   and "connected to the daemon at" in event_log(app).split("lost the daemon")[-1], 30, app, mesh)
        await wait("the table refilled by the new daemon", lambda: set(table_rows(app)) == {"hub", "b"}, 20, app, mesh)


async def admin_views(state_dir: str, shots: str, victim: str, joiner: str, joiner_fingerprint: str) -> None:
    """On the admin's node, in its namespace (the admin's calls go to the coordinator, as
    `tunnelmesh pending`'s do): an invite as a token to copy, a pending join approved with
    the fingerprint the joiner printed, and a revocation that only a "yes" carries out."""
    app = TunnelMeshApp(resolve_paths(state_dir, None), poll=0.5)

    def log_has(text: str) -> Callable[[], bool]:
        return lambda: text in event_log(app)

    async with app.run_test(size=SIZE) as pilot:
        await until("the hub's peer table", lambda: victim in table_rows(app), 20)
        assert app.admin and "admin key here" in str(app.query_one("#node", Static).render())
        await pilot.press("i")
        await until("the invite token dialog", lambda: isinstance(app.screen, ShowToken), 20)
        token = app.screen.query_one("#token", TextArea).text
        assert Token.parse(token).grant["body"]["uses"] == 1  # a real token, for one machine
        assert token not in event_log(app)  # shown to copy, never logged
        await pilot.press("c")  # the dialog's key, not typed into the token
        assert app.clipboard == token and app.screen.query_one("#token", TextArea).text == token
        app.save_screenshot("tui-invite.svg", shots)
        await pilot.press("escape")

        await pilot.press("a")
        await until("the pending joins screen, loaded", lambda: isinstance(app.screen, PendingJoins) and str(
            app.screen.query_one("#pending-title", Static).render()).startswith("joins waiting for approval: 1 "), 20)
        pending = app.screen.query_one("#pending", DataTable)
        row = [str(cell) for cell in pending.get_row_at(0)]
        assert row[:3] == [joiner, joiner_fingerprint, "request"], row  # the key the joiner printed
        app.save_screenshot("tui-pending.svg", shots)
        await pilot.press("a")
        await until("the approve confirmation", lambda: isinstance(app.screen, Confirm), 5)
        assert joiner_fingerprint in str(app.screen.query_one(".question", Static).render())
        await pilot.press("y")
        await until("the pending joins empty after the approval", lambda: isinstance(app.screen, PendingJoins) and str(
            app.screen.query_one("#pending-title", Static).render()).startswith("joins waiting for approval: none"), 30)
        await pilot.press("escape")

        table = app.query_one("#peers", DataTable)
        table.move_cursor(row=table.get_row_index(victim))
        await pilot.press("x")
        await until("the revoke confirmation", lambda: isinstance(app.screen, Confirm), 5)
        app.save_screenshot("tui-revoke.svg", shots)
        await pilot.press("n")
        await until("the confirmation gone", lambda: not isinstance(app.screen, Confirm), 5)
        for poll in ("a", "a second"):  # the answer handled, then the daemon asked twice since (not a fixed sleep)
            await until(f"{poll} status poll after the no", lambda before=app.status_at: app.status_at > before, 10)
        # "no" revokes nothing: no revoke under way (a "yes" starts it at once), none done, the victim still listed.
        assert not [w for w in app.workers if w.group == "admin"], list(app.workers)
        assert "revoked" not in event_log(app) and victim in table_rows(app)
        await pilot.press("x")
        await until("the revoke confirmation again", lambda: isinstance(app.screen, Confirm), 5)
        await pilot.press("y")
        await until(f"{victim} revoked", log_has(f"revoked {victim}: every node drops it"), 30)
        await until(f"{victim} gone from the table", lambda: victim not in table_rows(app), 30)


#: Runs `admin_views` inside a node's namespace.
ADMIN_DRIVER = ("import asyncio, sys; sys.path.insert(0, sys.argv[1]); from tests.e2e.test_tui import admin_views; "
                "asyncio.run(admin_views(*sys.argv[2:]))")


def test_the_tui_follows_a_live_node_and_its_daemon_going_and_coming_back(lab: Lab, tmp_path: Path) -> None:
    switch = lab.add_switch("sw")
    mesh = build_network(lab, ["hub", "a", "b"], switch=switch)
    try:
        wait_for_handshakes(mesh, timeout=40)
        asyncio.run(follow_a_live_node(mesh, tmp_path))
        # A join without a token waits for the admin: the TUI approves it.
        hub = mesh["hub"]
        coordinator = hub.status()["node"]["coordinator"]
        c = lab.add_node("c")
        lab.connect(c, switch)
        joining = c.popen(*TUNNELMESH, "--state-dir", str(c.state_dir), "join", coordinator["url"], "--name", "c",
                          "--network", coordinator["network"], "--tls-fingerprint", coordinator["tls_fingerprint"],
                          "--new-key", "--wait", "120", log_name="join", env=clean_environment())
        asked = c.wait_for_log("join", r"approve c --fingerprint (SHA256:\S+)`", timeout=60)
        fingerprint = re.search(r"approve c --fingerprint (SHA256:\S+)`", asked).group(1)  # type: ignore[union-attr]
        driver = hub.node.run(sys.executable, "-c", ADMIN_DRIVER, str(PROJECT_ROOT), str(hub.node.state_dir),
                              str(tmp_path), "b", "c", fingerprint, check=False, timeout=150)
        assert driver.returncode == 0, f"{driver.stdout}\n{driver.stderr}\n{diagnostics(mesh)}"
        assert joining.wait(timeout=60) == 0, c.log("join")
        assert "joined network" in c.log("join")
        main = tmp_path / "tui-main.svg"
        assert main.read_text().startswith("<svg")
        keep = os.environ.get("TUNNELMESH_TUI_SNAPSHOT")
        if keep:
            for shot in tmp_path.glob("tui-*.svg"):
                shutil.copy(shot, Path(keep) / shot.name)
        print(f"TUI snapshots: {sorted(str(p) for p in tmp_path.glob('tui-*.svg'))}", file=sys.stderr)
    finally:
        for member in mesh.values():
            member.down(check=False)
