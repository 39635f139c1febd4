"""The admin's views, offered when this machine holds the network's admin key: joins
waiting for approval, an invite token to copy, revoking a member after a confirmation.
They call what `tunnelmesh pending`, `approve`, `invite` and `revoke` call (tunnelmesh/
network.py through the CLI's own runners), in a thread: the coordinator may be slow, the
screen never waits for it."""

from __future__ import annotations

import asyncio
from functools import partial
from typing import TYPE_CHECKING, Any, ClassVar

from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen, Screen
from textual.widgets import Button, DataTable, Footer, Static, TextArea

from tunnelmesh.cli.common import CliError, _run, _run_local
from tunnelmesh.cli.network import asked_at
from tunnelmesh.paths import Paths

if TYPE_CHECKING:
    from .app import TunnelMeshApp

#: How long an invite made here is valid (as `tunnelmesh invite`'s default).
INVITE_VALID = 3600


async def _off_thread(call: Any) -> Any:
    """`call()` in a thread (file I/O, the admin key, the coordinator): the UI carries on.
    Its refusals come as CliError (the CLI's runners); anything else too, so that a failed
    admin call is a message on the screen rather than the end of the TUI."""
    try:
        return await asyncio.to_thread(call)
    except CliError:
        raise
    except Exception as exc:  # noqa: BLE001 - e.g. the coordinator unreachable (OSError, aiohttp)
        raise CliError(f"{type(exc).__name__}: {exc}") from None


class Confirm(ModalScreen[bool]):
    """A yes/no question; y/enter yes, n/escape no."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("y", "answer(True)", "Yes"), Binding("n,escape", "answer(False)", "No"),
    ]

    def __init__(self, question: str) -> None:
        super().__init__()
        self.question = question

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Static(self.question, classes="question", markup=False)
            with Horizontal(classes="buttons"):
                yield Button("Yes (y)", variant="error", id="yes")
                yield Button("No (n)", variant="primary", id="no")

    def on_mount(self) -> None:
        self.query_one("#no", Button).focus()  # the safe answer is the default

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")

    def action_answer(self, yes: bool) -> None:
        self.dismiss(yes)


class ShowToken(ModalScreen[None]):
    """An invite token, selectable in a read-only field; c copies it (the terminal's clipboard, OSC 52)."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("c", "copy", "Copy"), Binding("escape,q", "dismiss", "Close"),
    ]

    def __init__(self, token: str) -> None:
        super().__init__()
        self.token = token

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Static(f"Invite for one machine, valid {INVITE_VALID // 60} min. On it: "
                         "`tunnelmesh join <token>` (c: copy, escape: close)", classes="question")
            # Read-only: selectable (for terminals without OSC 52), and the keys stay this dialog's.
            yield TextArea(self.token, id="token", read_only=True, soft_wrap=True)

    def action_copy(self) -> None:
        self.app.copy_to_clipboard(self.token)
        self.notify("token copied to the clipboard")


def make_invite(app: TunnelMeshApp) -> None:
    """`tunnelmesh invite`: one machine, INVITE_VALID seconds; the token in a dialog."""
    from tunnelmesh.network import make_token

    async def invite() -> None:
        try:
            token = await _off_thread(partial(_run_local, partial(make_token, app.paths, expires_in=INVITE_VALID,
                                                                  reusable=False, name=None)))
        except CliError as exc:
            app.log_line(f"invite: {exc}")
            return
        app.log_line("invite made (single use, 1 h)")  # never the token itself: it admits a machine
        app.push_screen(ShowToken(token))

    app.run_worker(invite(), group="admin")


def confirm_revoke(app: TunnelMeshApp, name: str) -> None:
    """`tunnelmesh revoke NAME`, once the person said yes."""
    from tunnelmesh.network import revoke

    peer = app.peer(name)
    fingerprint = peer.fingerprint if peer is not None and peer.fingerprint else "no fingerprint"

    async def revoking() -> None:
        try:
            done = await _off_thread(partial(_run, revoke(app.paths, name)))
        except CliError as exc:
            app.log_line(f"revoke {name}: {exc}")
            return
        app.log_line(f"revoked {done.name}: every node drops it within seconds; it still knows the network "
                     "secret (`tunnelmesh rotate-secret` replaces it)")

    def answered(yes: bool | None) -> None:
        if yes:
            app.run_worker(revoking(), group="admin")

    app.push_screen(Confirm(f"Revoke {name} ({fingerprint})?\nEvery node refuses it within seconds, and it stops. "
                            "There is no undo: it would have to join again."), answered)


class PendingJoins(Screen[None]):
    """`tunnelmesh pending`, live on request (r), and `approve` for the selected join (a)."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("a", "approve", "Approve"), Binding("r", "reload", "Reload"),
        Binding("escape,q", "app.pop_screen", "Back"),
    ]

    def __init__(self, paths: Paths) -> None:
        super().__init__()
        self.paths = paths
        self.waiting: list[dict[str, Any]] = []

    def compose(self) -> ComposeResult:
        yield Static("joins waiting for approval: loading ...", id="pending-title", markup=False)
        yield DataTable(id="pending", cursor_type="row", zebra_stripes=True)
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#pending", DataTable).add_columns("Name", "Fingerprint", "Kind", "Would get", "Asked")
        self.action_reload()

    @work(exclusive=True, group="pending")
    async def action_reload(self) -> None:
        from tunnelmesh.network import pending

        title = self.query_one("#pending-title", Static)
        try:
            self.waiting = await _off_thread(partial(_run, pending(self.paths)))
        except CliError as exc:
            title.update(f"joins waiting for approval: {exc}")
            return
        table = self.query_one("#pending", DataTable)
        table.clear()
        for i, p in enumerate(self.waiting):
            invited = p.get("kind") == "invite"
            table.add_row(Text(str(p.get("name"))), Text(str(p.get("fingerprint"))),  # the coordinator's words
                          "invite (the admin daemon countersigns)" if invited else "request",
                          "" if invited else str(p.get("ipv4")),
                          asked_at(p.get("requested")), key=str(i))
        title.update(f"joins waiting for approval: {len(self.waiting) or 'none'} "
                     "(a: approve the selected one, after comparing its fingerprint with what its `join` printed)")

    def action_approve(self) -> None:
        table = self.query_one("#pending", DataTable)
        if table.row_count == 0:
            return
        request = self.waiting[int(table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value or 0)]
        if request.get("kind") == "invite":
            self.notify("a join with an invite is countersigned by the admin's daemon, not approved here")
            return
        name, fingerprint = str(request.get("name")), str(request.get("fingerprint"))

        def answered(yes: bool | None) -> None:
            if yes:
                self.approve(name, fingerprint)

        self.app.push_screen(Confirm(f"Approve {name} with the key {fingerprint}?\nOnly if the joining machine "
                                     "printed this fingerprint."), answered)

    @work(group="admin")
    async def approve(self, name: str, fingerprint: str) -> None:
        from tunnelmesh.network import approve

        try:
            member = await _off_thread(partial(_run, approve(self.paths, name, fingerprint)))
        except CliError as exc:
            self.notify(f"approve {name}: {exc}", severity="error")
            return
        self.notify(f"approved {member.name} as {member.ipv4}")
        self.action_reload()
