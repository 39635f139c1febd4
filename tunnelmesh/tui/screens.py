"""The detail view of one peer (`d` or enter on the table): where its packets go, why not
on a better rung, the last changes of rung, its counters. Live: it reads the app's latest
status once a second."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from textual.app import ComposeResult
from rich.text import Text
from textual.binding import Binding, BindingType
from textual.markup import escape
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Static

from actors.messages import PeerStatus

from . import model

if TYPE_CHECKING:
    from .app import TunnelMeshApp


class PeerDetail(Screen[None]):
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape,q", "app.pop_screen", "Back"),
        Binding("p", "ping", "Ping"),
        Binding("r", "probe", "Re-probe"),
    ]

    def __init__(self, peer: str) -> None:
        super().__init__()
        self.peer = peer

    @property
    def tm(self) -> TunnelMeshApp:
        return self.app  # type: ignore[return-value]

    def compose(self) -> ComposeResult:
        yield Static(id="detail")
        yield Static("changes of rung, oldest first (the daemon keeps the last 8)", id="transitions-title")
        yield DataTable(id="transitions", cursor_type="none", zebra_stripes=True)
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#transitions", DataTable).add_columns("At", "From", "To", "Endpoint", "Why")
        self.show()
        self.set_interval(1.0, self.show)

    def show(self) -> None:
        peer = self.tm.peer(self.peer)
        detail = self.query_one("#detail", Static)
        if peer is None:
            gone = "the daemon is not reachable" if not self.tm.connected else "no such peer any more"
            detail.update(f"[b]{escape(self.peer)}[/b]: {gone}")
            return
        detail.update(self.describe(peer))
        table = self.query_one("#transitions", DataTable)
        table.clear()
        for change in peer.transitions:
            table.add_row(model.clock(change.at), change.previous, change.path.rung, Text(change.path.endpoint),
                          Text(change.why))

    def describe(self, peer: PeerStatus) -> str:
        rates = self.tm.rates.rates(peer.name)
        measured = peer.rtt_ms if peer.rtt_ms is not None else self.tm.last_ping.get(peer.name)
        lines = [
            f"{peer.mesh_ip}  {peer.state}",
            f"fingerprint     {peer.fingerprint or '(a plain WireGuard peer)'}",
            f"path            {peer.path.endpoint if peer.path else 'no endpoint known yet (waits to be contacted)'}",
            f"UDP candidates  {', '.join(peer.candidates) or 'none known (waits to be contacted)'}",
            f"why not better  {peer.why_not_better or '-'}",
            f"rung changes    {peer.rung_changes}; better rungs probed every {peer.probe_interval:g} s",
            f"last handshake  {model.ago(peer.last_handshake_ago)}; {peer.handshakes} since the session started",
            f"round trip      {model.rtt(measured)}",
            f"received        {peer.rx_bytes} bytes, {peer.rx_packets} packets, "
            f"{model.rate(rates.rx if rates else None)}",
            f"sent            {peer.tx_bytes} bytes, {peer.tx_packets} packets, "
            f"{model.rate(rates.tx if rates else None)}",
            f"keepalive       {f'every {peer.persistent_keepalive} s' if peer.persistent_keepalive else 'off'}",
        ]
        # The daemon's words are text, never markup (a reason may hold "[...]").
        return f"[b]{escape(peer.name)}[/b]  " + escape("\n".join(lines))

    def action_ping(self) -> None:
        self.tm.ping(self.peer)

    def action_probe(self) -> None:
        self.tm.probe(self.peer)
