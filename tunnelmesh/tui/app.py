"""`tunnelmesh tui`: the daemon, live, in a terminal (docs/tui.md).

One asyncio worker holds the connection: it polls `status` once a second and follows the
`events` stream; when either fails it shows the daemon as down and tries again with a
bounded back-off, and picks up where it was when the daemon is back. Pings and probes
run in workers of their own, the admin's coordinator calls in threads: a slow daemon or
coordinator never holds the screen.
"""

from __future__ import annotations

import asyncio
import time
from typing import ClassVar

from textual import work
from textual.app import App, ComposeResult
from textual.binding import Binding, BindingType
from rich.text import Text
from textual.containers import Horizontal, Vertical
from textual.markup import escape
from textual.widgets import DataTable, Footer, Input, RichLog, Sparkline, Static

from actors.messages import PeerStatus, Status
from tunnelmesh.control_client import ControlError, NotRunning
from tunnelmesh.paths import Paths

from . import model
from .client import AsyncControlClient

#: Seconds between status polls (the rates are per poll).
POLL = 1.0
#: Seconds a ping from the TUI waits for its answer.
PING_WAIT = 3.0

COLUMNS = (("name", "Peer"), ("mesh_ip", "Mesh IP"), ("state", "State"), ("rung", "Rung"), ("rtt", "RTT"),
           ("handshake", "Handshake"), ("rx", "RX"), ("tx", "TX"), ("drops", "Filtered"), ("why", "Why not better"))


class SearchBox(Input):
    """The `/` search: escape clears it and gives the keys back to the table."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "clear", "Clear search")]

    def action_clear(self) -> None:
        self.value = ""
        self.display = False
        self.app.query_one("#peers", DataTable).focus()


class TunnelMeshApp(App[None]):
    CSS_PATH = "tui.tcss"
    TITLE = "tunnelmesh"
    AUTO_FOCUS = "#peers"  # not the (hidden) search box: keys are commands until `/`
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("p", "ping", "Ping"),
        Binding("r", "probe", "Re-probe"),
        Binding("d", "detail", "Detail"),
        Binding("slash", "search", "Search"),
        Binding("a", "admin", "Pending joins"),
        Binding("i", "invite", "Invite"),
        Binding("x", "revoke", "Revoke"),
        Binding("q", "quit", "Quit"),
    ]

    def __init__(self, paths: Paths, *, poll: float = POLL) -> None:
        super().__init__()
        self.paths = paths
        self.socket = paths.control_socket
        self.client = AsyncControlClient(self.socket)
        self.poll = poll
        self.status: Status | None = None
        self.status_at = 0.0  # wall time of the last status
        self.connected = False
        self.query_text = ""
        self.rates = model.RateMeter()
        self.backoff = model.Backoff()
        self.last_ping: dict[str, float] = {}  # ms, by peer: the RTT shown until the daemon measures one
        self.admin = paths.admin_key.exists()

    def compose(self) -> ComposeResult:
        with Vertical(id="top"):
            yield Static("connecting ...", id="node")
            yield Static("", id="banner", markup=False)
        yield SearchBox(placeholder="search peers by name or address (enter: keep, escape: clear)", id="search")
        yield DataTable(id="peers", cursor_type="row", zebra_stripes=True)
        with Horizontal(id="bottom"):
            with Vertical(id="throughput"):
                yield Static("throughput", id="throughput-title", markup=False)
                yield Sparkline([], id="sparkline")
            yield RichLog(id="events", max_lines=1000)
        yield Footer()

    def on_mount(self) -> None:
        table = self.query_one("#peers", DataTable)
        for key, label in COLUMNS:
            table.add_column(label, key=key)
        self.query_one("#search", Input).display = False
        self.query_one("#banner", Static).display = False
        self.query_one("#events", RichLog).border_title = "events"
        self.stay_connected()

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action in ("ping", "probe", "detail", "search", "admin", "invite", "revoke") and len(self.screen_stack) > 1:
            return False  # about the main screen's table (a screen above has its own keys)
        if action in ("admin", "invite", "revoke"):
            return self.admin  # the admin key is on this machine
        return True

    # --- the connection ---------------------------------------------------------------

    @work(exclusive=True, group="connection")
    async def stay_connected(self) -> None:
        """Until the app ends: connected, follow the daemon; down, say so and retry."""
        while True:
            try:
                status = await self.client.status()
                self.backoff.reset()
                self._show_up(status)
                await self._follow()
            except ControlError as exc:
                delay = self.backoff.next()
                self._show_down(exc, delay)
                await asyncio.sleep(delay)

    async def _follow(self) -> None:
        """Poll status and read events until one of them fails (a ControlError); the
        task group ends the other with it."""
        try:
            async with asyncio.TaskGroup() as both:
                both.create_task(self._read_events())
                both.create_task(self._poll_status())
        except* ControlError as failed:
            raise failed.exceptions[0] from None

    async def _poll_status(self) -> None:
        while True:
            await asyncio.sleep(self.poll)
            self._update(await self.client.status())

    async def _read_events(self) -> None:
        async for event in self.client.events():
            self.log_line(model.describe(event))
        raise ControlError("the daemon closed the event stream")

    def _show_up(self, status: Status) -> None:
        was_down = not self.connected and self.status is not None
        self.connected = True
        self.query_one("#banner", Static).display = False
        self._dim(False)
        self.log_line(f"connected to the daemon at {self.socket}" + (" again" if was_down else ""))
        self._update(status)

    def _show_down(self, why: ControlError, retry_in: float) -> None:
        if self.connected:
            self.log_line(f"lost the daemon: {why}")
        self.connected = False
        banner = self.query_one("#banner", Static)
        # Not running is the usual case; a daemon that answers but cannot say its status (it
        # waits for its ssh-agent key, say) gives its own words.
        first = (f"daemon not running at {self.socket} - start it with `tunnelmesh up`" if isinstance(why, NotRunning)
                 else f"the daemon at {self.socket}: {why}")
        banner.update(f"{first}\ntrying again in {retry_in:g} s (attempt {self.backoff.attempts})")
        banner.display = True
        self._dim(True)
        if self.status is not None:
            self.query_one("#node", Static).update(
                f"{self._node_text(self.status)}\n[i]as last known, at {model.clock(self.status_at)}[/i]")

    def _dim(self, offline: bool) -> None:
        """The last known view stays while the daemon is away, dimmed."""
        for widget in ("#node", "#peers", "#bottom"):
            self.query_one(widget).set_class(offline, "offline")

    # --- what the screen shows --------------------------------------------------------

    def _update(self, status: Status) -> None:
        self.status = status
        self.status_at = time.time()
        now = time.monotonic()
        for peer in status.peers:
            self.rates.sample(peer.name, now, peer.rx_bytes, peer.tx_bytes)
        self.rates.keep_only(p.name for p in status.peers)
        self.query_one("#node", Static).update(self._node_text(status))
        self._fill_table()
        self._show_throughput()

    def _node_text(self, status: Status) -> str:
        node = status.node
        addresses = " ".join(a for a in (node.mesh_ip, node.mesh_ipv6) if a)
        # What the daemon says is text, never markup: an error may hold "[...]".
        line = f"[b]{escape(node.name)}[/b]  " + escape(
            f"{addresses}  {node.mode}  {node.interface} udp/{node.listen_port}  v{node.version}")
        coordinator = node.coordinator
        if coordinator is not None:
            seen = f", seen as {coordinator.observed}" if coordinator.observed else ""
            line += escape(f"\ncoordinator {coordinator.url} ({coordinator.network}): {coordinator.state}"
                           f"{f' - {coordinator.error}' if coordinator.error else ''}; {coordinator.members} "
                           f"members, map v{coordinator.version}{seen}")
        drops = {**status.drops, **(status.filter.drops if status.filter is not None else {})}
        counted = ", ".join(f"{reason} {n}" for reason, n in sorted(drops.items()) if n)
        up = sum(p.state == "up" for p in status.peers)
        line += f"\npeers {up}/{len(status.peers)} up" + (f"; drops: {escape(counted)}" if counted else "")
        if self.admin:
            line += "; admin key here"
        agent = node.agent
        if agent is not None and agent.needed_for:  # the agent is gone or lost the key: say what waits for it
            line += escape(f"\nssh-agent at {agent.socket}: {agent.state}; needed for {', '.join(agent.needed_for)}")
        return line

    def _fill_table(self) -> None:
        assert self.status is not None
        table = self.query_one("#peers", DataTable)
        shown = model.visible(self.status.peers, self.query_text)
        filtered = model.filter_drops(self.status.filter)
        wanted = [p.name for p in shown]
        for row in list(table.rows):
            if row.value not in wanted:
                table.remove_row(row)
        for peer in shown:
            cells = self._cells(peer, filtered.get(peer.name, ""))
            if peer.name in table.rows:
                for (key, _), value in zip(COLUMNS, cells):
                    table.update_cell(peer.name, key, value, update_width=True)
            else:
                table.add_row(*cells, key=peer.name)
        if [row.key.value for row in table.ordered_rows] != wanted:
            table.sort("name")

    def _cells(self, peer: PeerStatus, filtered: str) -> tuple[str | Text, ...]:
        rates = self.rates.rates(peer.name)
        measured = peer.rtt_ms if peer.rtt_ms is not None else self.last_ping.get(peer.name)
        return (peer.name, peer.mesh_ip, peer.state, peer.path.rung if peer.path else "-", model.rtt(measured),
                model.ago(peer.last_handshake_ago), model.rate(rates.rx if rates else None),
                model.rate(rates.tx if rates else None), filtered,
                Text(peer.why_not_better or ""))  # free text: a Text, which the table does not read as markup

    def _show_throughput(self) -> None:
        name = self.selected()
        history = list(self.rates.history.get(name, ())) if name else []
        # Two samples at least: the widget draws a lone value as a full bar.
        self.query_one("#sparkline", Sparkline).data = history if len(history) >= 2 else []
        title = "throughput: select a peer"
        if name:
            title = f"{name} rx+tx: {model.rate(history[-1] if history else None)}"
            if history:
                title += f", peak {model.rate(max(history))} in the last {len(history) * self.poll:g} s"
        self.query_one("#throughput-title", Static).update(title)

    def on_data_table_row_highlighted(self, _: DataTable.RowHighlighted) -> None:
        self._show_throughput()

    def on_data_table_row_selected(self, _: DataTable.RowSelected) -> None:
        self.action_detail()

    def log_line(self, text: str) -> None:
        self.query_one("#events", RichLog).write(f"{model.clock()} {text}")

    def selected(self) -> str | None:
        """The name of the peer under the table's cursor."""
        table = self.query_one("#peers", DataTable)
        if table.row_count == 0:
            return None
        return table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value

    def peer(self, name: str) -> PeerStatus | None:
        return next((p for p in self.status.peers if p.name == name), None) if self.status else None

    # --- keys -------------------------------------------------------------------------

    def action_ping(self) -> None:
        if (name := self.selected()) is not None:
            self.ping(name)

    @work(group="ping")
    async def ping(self, name: str) -> None:
        self.log_line(f"ping {name} ...")
        try:
            result = await self.client.ping(name, PING_WAIT)
        except ControlError as exc:
            self.log_line(f"ping {name}: {exc}")
            return
        if result.ok and result.rtt_ms is not None:
            self.last_ping[name] = result.rtt_ms
            if self.status is not None:
                self._fill_table()
            self.log_line(f"ping {name}: {result.rtt_ms:.2f} ms, answered on {result.answered_on} "
                          f"(sent {result.path.endpoint if result.path else 'nowhere'})")
        else:
            self.log_line(f"ping {name}: no answer ({result.error})")

    def action_probe(self) -> None:
        if (name := self.selected()) is not None:
            self.probe(name)

    @work(group="probe")
    async def probe(self, name: str) -> None:
        try:
            result = await self.client.probe(name)
        except ControlError as exc:
            self.log_line(f"re-probe {name}: {exc}")
            return
        self.log_line(f"re-probe {name}: {result.detail}")

    def action_detail(self) -> None:
        from .screens import PeerDetail

        if (name := self.selected()) is not None:
            self.push_screen(PeerDetail(name))

    def action_search(self) -> None:
        search = self.query_one("#search", Input)
        search.display = True
        search.focus()

    def on_input_changed(self, event: Input.Changed) -> None:
        if event.input.id == "search":
            self.query_text = event.value
            if self.status is not None:
                self._fill_table()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        if event.input.id == "search":
            self.query_one("#peers", DataTable).focus()

    def action_admin(self) -> None:
        from .admin import PendingJoins

        self.push_screen(PendingJoins(self.paths))

    def action_invite(self) -> None:
        from .admin import make_invite

        make_invite(self)

    def action_revoke(self) -> None:
        from .admin import confirm_revoke

        if (name := self.selected()) is not None:
            confirm_revoke(self, name)
