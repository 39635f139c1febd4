"""The TUI app without a daemon (tests/e2e/test_tui.py has it with real ones): it says
where it looked and how to start one, and keeps trying with the bounded back-off; what a
daemon says is shown as text, never read as markup (a reason may hold "[...]"), and an ssh-agent that is gone is named with what waits for it."""

from __future__ import annotations

import asyncio
from pathlib import Path

from textual.widgets import DataTable, Static

from actors.messages import (
    AgentStatus, CoordinatorStatus, NodeStatus, PathChanged, PathStatus, PeerStatus, Status, TransportsStatus,
)
from tests.support.wait import until
from tunnelmesh.paths import resolve_paths
from tunnelmesh.tui.app import TunnelMeshApp
from tunnelmesh.tui.screens import PeerDetail

HOSTILE = "relay: [/b] [errno 111] [link=x]refused[/]"


def test_without_a_daemon_it_says_where_it_looked_and_keeps_trying(tmp_path: Path) -> None:
    async def scenario() -> None:
        app = TunnelMeshApp(resolve_paths(str(tmp_path), None))
        async with app.run_test(size=(160, 40)):
            banner = app.query_one("#banner", Static)
            await until("the down banner", lambda: banner.display, 5.0)
            assert str(banner.render()).startswith(
                f"daemon not running at {tmp_path}/control.sock - start it with `tunnelmesh up`\ntrying again in ")
            await until("a third attempt (0.5 s, then 1 s)", lambda: app.backoff.attempts >= 3, 5.0)
            assert not app.connected and app.query_one("#peers", DataTable).row_count == 0

    asyncio.run(scenario())


def test_what_the_daemon_says_is_shown_as_text_not_markup(tmp_path: Path) -> None:
    change = PathChanged("b", PathStatus("relay", "relay wss://[::1]:7400"), "udp", HOSTILE, 0.0)
    peer = PeerStatus(name="b", mesh_ip="100.64.0.2", fingerprint=None, path=change.path, state="up", rung_changes=1,
                      probe_interval=20.0, transitions=(change,), last_handshake=None, last_handshake_ago=None,
                      rx_bytes=0, tx_bytes=0, persistent_keepalive=0, why_not_better=HOSTILE)
    coordinator = CoordinatorStatus("https://[::1]:7400", "n", "unreachable", None, 0.0, HOSTILE, 1, None, 2, 0, {})
    node = NodeStatus(name="a", mesh_ip="100.64.0.1", mesh_ipv6=None, interface="tm0", listen_port=51820,
                      version="0", started=0.0, pid=1, mode="coordinator", fingerprint="SHA256:x", ssh_public_key="k",
                      wireguard_public_key="w", coordinator=coordinator, serving_coordinator=None, admission=None,
                      transports=TransportsStatus(None, None, (), None), events_dropped=0, actors=(),
                      agent=AgentStatus("/run/[b]agent.sock", "SHA256:x", "unreachable", ("a restart", "SSH logins")))

    async def scenario() -> None:
        app = TunnelMeshApp(resolve_paths(str(tmp_path), None))
        async with app.run_test(size=(160, 40)) as pilot:
            app._update(Status(node=node, peers=(peer,), drops={"[/y]": 1}))  # as a poll would
            header = str(app.query_one("#node", Static).render())
            assert f"unreachable - {HOSTILE};" in header and "drops: [/y] 1" in header, header
            assert "ssh-agent at /run/[b]agent.sock: unreachable; needed for a restart, SSH logins" in header, header
            assert str(app.query_one("#peers", DataTable).get_row("b")[-1]) == HOSTILE
            await pilot.press("d")
            await until("the detail view", lambda: isinstance(app.screen, PeerDetail), 5.0)
            detail = str(app.screen.query_one("#detail", Static).render())
            assert f"why not better  {HOSTILE}" in detail and "relay wss://[::1]:7400" in detail, detail

    asyncio.run(scenario())
