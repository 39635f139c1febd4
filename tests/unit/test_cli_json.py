"""`--json` on every command that reads state (issue 15, part 5): the parser offers it,
and `id`, `show --wg` and `version` print what their text form says, as JSON."""

from __future__ import annotations

import argparse
import base64
import json
from pathlib import Path

import pytest

from actors.messages import CONTROL_VERSION
from tunnelmesh import __version__, cli
from tunnelmesh.identity import PublicIdentity

#: Commands with no --json, and why: they change state, run something, or already speak JSON.
NOT_READING = {
    "init": "makes a network", "join": "joins one", "invite": "makes a token", "approve": "admits",
    "revoke": "removes a member", "rotate-secret": "changes the secret", "coordinator": "runs a server",
    "up": "runs the daemon", "down": "stops it", "events": "is JSON lines already",
    "ssh-bridge": "sets up an account or is sshd's forced command", "policy set": "signs a policy",
    "policy edit": "edits one", "tui": "is the terminal UI",
}


def _commands(parser: argparse.ArgumentParser, prefix: str = "") -> dict[str, argparse.ArgumentParser]:
    found = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                path = f"{prefix}{name}"
                nested = _commands(sub, f"{path} ")
                found.update(nested or {path: sub})
    return found


def test_every_command_that_reads_state_offers_json() -> None:
    commands = _commands(cli.build_parser())
    assert {"status", "peers", "ping", "id", "show", "version", "filter show"} <= commands.keys()
    without = [name for name, sub in commands.items()
               if name not in NOT_READING and not any("--json" in a.option_strings for a in sub._actions)]
    assert not without, f"commands that read state but offer no --json: {without}"


def tm(state_dir: Path, *args: str) -> int:
    return cli.main(["--state-dir", str(state_dir), *args])


def test_id_show_and_version_print_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = tmp_path / "admin"
    assert tm(state, "init", "--name", "admin", "--new-key", "--url", "https://192.0.2.1:7400") == 0
    capsys.readouterr()

    assert tm(state, "id") == 0
    line = capsys.readouterr().out.strip()
    assert tm(state, "id", "--json") == 0
    shown = json.loads(capsys.readouterr().out)
    public = PublicIdentity.from_line(line)
    assert shown == {"identity": line, "fingerprint": public.fingerprint, "ssh_public_key": public.ssh_public_key,
                     "wireguard_public_key": base64.b64encode(public.wg_public_key).decode()}

    assert tm(state, "show", "--wg", "--json", "--endpoint", "192.0.2.1") == 0
    peer = json.loads(capsys.readouterr().out)
    assert peer["public_key"] == shown["wireguard_public_key"] and peer["preshared_key"] is None
    assert peer["endpoint"] == f"192.0.2.1:{peer['listen_port']}" and peer["allowed_ips"][0].endswith("/32")
    assert tm(state, "show", "--wg", "--json", "--show-secrets") == 0
    with_secret = json.loads(capsys.readouterr().out)
    assert len(base64.b64decode(with_secret["preshared_key"])) == 32 and with_secret["endpoint"] is None

    assert tm(state, "version", "--json") == 0
    assert json.loads(capsys.readouterr().out) == {"version": __version__, "control_version": CONTROL_VERSION}
