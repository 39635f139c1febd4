"""`tunnelmesh tui`: the terminal UI (tunnelmesh/tui/, docs/tui.md)."""

from __future__ import annotations

import argparse

from tunnelmesh.paths import Paths

from .common import EXIT_OK

DESCRIPTION = (
    "A live view of the running daemon through its control socket (<state-dir>/control.sock): this node, a table "
    "of peers (rung and why not a better one, round trip, last handshake, rx/tx rates, spoofed packets dropped), "
    "the selected peer's throughput and the event log. Keys: p ping the selected peer, r re-probe its better rungs "
    "now, d or enter its detail (path, changes of rung, counters), / search by name, q quit; on the admin's machine "
    "also a pending joins (approve), i invite (a token to copy), x revoke (after a confirmation). When the daemon is "
    "down it says so and reconnects by itself when it is back. Another node on this machine: `tunnelmesh "
    "--state-dir DIR tui`."
)


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("tui", help="a live terminal UI of this node, its peers and events", description=DESCRIPTION)
    p.set_defaults(func=cmd_tui)


def cmd_tui(args: argparse.Namespace, paths: Paths) -> int:
    from tunnelmesh.tui.app import TunnelMeshApp  # textual loads only for this command

    TunnelMeshApp(paths).run()
    return EXIT_OK
