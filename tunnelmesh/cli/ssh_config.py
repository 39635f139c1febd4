"""`tunnelmesh ssh-config`: known_hosts and an ssh_config snippet from the running
daemon's verified view of the members' sshd host keys (tunnelmesh/exports/ssh_config.py)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tunnelmesh import control_client
from tunnelmesh.exports.ssh_config import (
    KNOWN_HOSTS, SSH_CONFIG, ExportError, closed_to_others, include_line, render, write_export,
)
from tunnelmesh.paths import Paths

from .common import EXIT_OK, CliError


def default_out_dir(paths: Paths) -> Path:
    """Beside the config: /etc/tunnelmesh/ssh by default, a place root writes and every
    user's ssh can read. With --state-dir (and no --config) the config is in the state
    directory (0700), and so is this: `closed_note` says so."""
    return paths.config.parent / "ssh"


def closed_note(out_dir: Path) -> str | None:
    """What to tell the user (on stderr) when other users' ssh cannot read the files in `out_dir`."""
    closed = closed_to_others(out_dir)
    if closed is None:
        return None
    where, mode = closed
    return (f"note: other users cannot read {where} (mode {mode:04o}), so the Include line works for root only: "
            "for every user's ssh, write the files where they can read them, with `tunnelmesh ssh-config --out DIR` "
            "(e.g. /etc/tunnelmesh/ssh)")


def cmd_ssh_config(args: argparse.Namespace, paths: Paths) -> int:
    out_dir = Path(args.out).absolute() if args.out else default_out_dir(paths)
    hosts = control_client.ssh_hosts(paths.control_socket)
    try:
        export = render(hosts, out_dir)
        include = include_line(out_dir)
        if args.json:  # what would be written; nothing is
            print(json.dumps({
                "network": hosts.network, "out": str(out_dir), "include": include,
                "known_hosts": {"path": str(out_dir / KNOWN_HOSTS), "text": export.known_hosts},
                "ssh_config": {"path": str(out_dir / SSH_CONFIG), "text": export.ssh_config},
                "hosts": list(export.hosts), "left_out": export.left_out,
            }, indent=2))
        else:
            write_export(export, out_dir)
    except ExportError as exc:
        raise CliError(str(exc)) from None
    note = closed_note(out_dir)
    if note is not None:
        print(note, file=sys.stderr)
    if args.json:
        return EXIT_OK
    print(f"wrote {out_dir / KNOWN_HOSTS} and {out_dir / SSH_CONFIG}: "
          f"{len(export.hosts)} host{'' if len(export.hosts) == 1 else 's'}"
          + (f" ({', '.join(export.hosts)})" if export.hosts else ""))
    for name, why in export.left_out.items():
        print(f"left out {name}: {why}")
    print("add this line once, at the top of ~/.ssh/config (before any Host block):")
    print(include)
    return EXIT_OK
