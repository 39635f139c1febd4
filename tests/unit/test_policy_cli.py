"""`tunnelmesh init` (the starter policy and how to open a port) and `tunnelmesh policy
show / set / edit` through `tunnelmesh.cli.main`, with a real coordinator (on 127.0.0.1,
in a thread of its own) where one is needed."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import sys
import threading
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pytest

from tests.support.coordinator import Served, World, serving
from tunnelmesh import cli
from tunnelmesh.cli import policy as cli_policy
from tunnelmesh.filter import OPEN_PORT_HINT, STARTER_POLICY

VALID_RULE = '\n[[allow]]\nfrom = "*"\nproto = "tcp"\nports = [22]\n'
#: Appended to the starter policy (32 lines), the bad port is on line 36.
INVALID_RULE = '\n[[allow]]\nfrom = "*"\nproto = "tcp"\nports = [70000]\n'


def tm(state_dir: Path, *args: str) -> int:
    return cli.main(["--state-dir", str(state_dir), *args])


def test_init_signs_the_starter_policy_and_says_how_to_open_a_port(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    state = tmp_path / "admin"
    assert tm(state, "init", "--name", "admin", "--new-key", "--url", "https://192.0.2.1:7400") == 0
    out = capsys.readouterr().out
    assert "network policy v1 (the starter policy)" in out and OPEN_PORT_HINT in out

    assert tm(state, "policy", "show", "--json") == 0
    shown = json.loads(capsys.readouterr().out)
    assert (shown["version"], shown["text"]) == (1, STARTER_POLICY)
    assert tm(state, "policy", "show") == 0
    out = capsys.readouterr().out
    assert out.startswith("# network policy v1, issued ") and "(verified by this node)" in out
    assert STARTER_POLICY in out


def test_show_on_a_network_without_a_policy_says_what_is_in_force(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    state = tmp_path / "admin"
    tm(state, "init", "--name", "admin", "--new-key", "--url", "https://192.0.2.1:7400")
    for kept in ("policy.json", "peermap.json"):  # as a network made before the filter left it
        (state / kept).unlink()
    capsys.readouterr()
    assert tm(state, "policy", "show") == 0
    assert "no network policy set (a network made before the packet filter): every member reaches every port" \
        in capsys.readouterr().out
    assert tm(state, "policy", "show", "--json") == 0
    assert json.loads(capsys.readouterr().out) is None


def test_set_refuses_an_invalid_file_with_its_line_and_reason_before_anything_else(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(STARTER_POLICY + INVALID_RULE)
    assert tm(tmp_path / "nowhere", "policy", "set", str(bad)) == 2  # no network, no coordinator: not needed
    assert capsys.readouterr().err == (f"tunnelmesh: {bad}:36: network rule 2: ports: 70000: ports are 0 to 65535, "
                                       "low end first; nothing was changed\n")
    assert tm(tmp_path, "policy", "set", str(tmp_path / "missing.toml")) == 2
    assert "cannot read" in capsys.readouterr().err


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    """A coordinator holding a network, and the admin's machine's state (`served.machine`),
    running in a thread: the CLI runs its own event loop."""
    world = World.create()
    ready = threading.Event()
    box: dict[str, object] = {}

    async def run() -> None:
        async with serving(tmp_path / "coordinator.db", world, admit=False) as running:
            stop = asyncio.Event()
            box.update(served=running, stop=stop, loop=asyncio.get_running_loop())
            ready.set()
            await stop.wait()

    thread = threading.Thread(target=asyncio.run, args=(run(),))
    thread.start()
    assert ready.wait(20)
    try:
        yield box["served"]  # type: ignore[misc]
    finally:
        box["loop"].call_soon_threadsafe(box["stop"].set)  # type: ignore[attr-defined]
        thread.join(20)


def stored(served: Served) -> tuple[int, str] | None:
    """The coordinator's policy row (version, text), read over a connection of its own."""
    with closing(sqlite3.connect(served.store.path)) as conn:
        row = conn.execute("SELECT policy_version, record FROM policy").fetchone()
    return None if row is None else (row[0], json.loads(row[1])["body"]["text"])


def editor(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *texts: str) -> None:
    """$EDITOR: its n-th run makes the file it is given texts[n]."""
    script = tmp_path / "editor.py"
    script.write_text(
        "import pathlib, sys\n"
        f"runs = pathlib.Path({str(tmp_path / 'runs')!r})\n"
        "n = int(runs.read_text()) if runs.exists() else 0\n"
        "runs.write_text(str(n + 1))\n"
        f"texts = {list(texts)!r}\n"
        "pathlib.Path(sys.argv[1]).write_text(texts[n])\n")
    monkeypatch.setenv("EDITOR", f"{sys.executable} {script}")
    monkeypatch.delenv("VISUAL", raising=False)


def test_edit_refuses_an_invalid_edit_sends_nothing_and_keeps_the_edit(
        served: Served, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    editor(tmp_path, monkeypatch, STARTER_POLICY + INVALID_RULE)
    monkeypatch.setattr(cli_policy, "_ask", lambda question: False)  # the user does not edit it again
    assert tm(served.machine.paths.state_dir, "policy", "edit") == 2
    err = capsys.readouterr().err
    assert ":36: network rule 2: ports: 70000: ports are 0 to 65535" in err and "nothing was sent" in err
    kept = Path(err.rsplit("your edit is in ", 1)[1].strip())
    assert kept.read_text() == STARTER_POLICY + INVALID_RULE  # the starter policy: none was set
    kept.unlink()
    assert stored(served) is None


def test_edit_again_after_an_invalid_edit_then_send_the_next_version(
        served: Served, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    editor(tmp_path, monkeypatch, STARTER_POLICY + INVALID_RULE, STARTER_POLICY + VALID_RULE)
    questions: list[str] = []
    monkeypatch.setattr(cli_policy, "_ask", lambda question: questions.append(question) or True)
    assert tm(served.machine.paths.state_dir, "policy", "edit") == 0
    assert "network policy v1 set" in capsys.readouterr().out and questions == ["edit it again? [Y/n] "]
    assert stored(served) == (1, STARTER_POLICY + VALID_RULE)


def test_an_unchanged_edit_sends_nothing_and_set_sends_the_next_version(
        served: Served, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    state = served.machine.paths.state_dir
    policy = tmp_path / "policy.toml"
    policy.write_text(STARTER_POLICY)
    assert tm(state, "policy", "set", str(policy)) == 0
    assert "network policy v1 set" in capsys.readouterr().out
    assert tm(state, "policy", "set", str(policy)) == 0
    assert "v1 already has this text: nothing was sent" in capsys.readouterr().out

    editor(tmp_path, monkeypatch, STARTER_POLICY)
    assert tm(state, "policy", "edit") == 0
    assert capsys.readouterr().out == "no change: nothing was sent\n"
    policy.write_text(STARTER_POLICY + VALID_RULE)
    assert tm(state, "policy", "set", str(policy)) == 0
    assert stored(served) == (2, STARTER_POLICY + VALID_RULE)


def test_set_with_the_same_text_says_it_re_sent_it_to_a_coordinator_that_lost_it(
        served: Served, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text(STARTER_POLICY + VALID_RULE)
    assert tm(served.machine.paths.state_dir, "policy", "set", str(policy)) == 0
    with closing(sqlite3.connect(served.store.path)) as conn:  # restored from a backup older than the policy
        conn.execute("DELETE FROM policy")
        conn.commit()
    capsys.readouterr()
    assert tm(served.machine.paths.state_dir, "policy", "set", str(policy)) == 0
    assert capsys.readouterr().out == ("network policy v1 already has this text, but the coordinator held an older "
                                       "version or none (restored from an older backup?): v1 was sent to it again\n")
    assert stored(served) == (1, STARTER_POLICY + VALID_RULE)


def test_policy_help_explains_each_command(capsys: pytest.CaptureFixture[str]) -> None:
    for command, words in (("show", "verified"), ("set", "refused with its line and the reason"),
                           ("edit", "$EDITOR")):
        with pytest.raises(SystemExit):
            cli.main(["policy", command, "--help"])
        assert words in capsys.readouterr().out
