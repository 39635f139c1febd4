"""The ssh-agent workflow with a real ssh-agent and real ssh-keygen keys: `tunnelmesh keys`,
choosing a key by comment, the daemon's mesh key cache, and the daemon waiting for the agent
(its control socket answering meanwhile)."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from textual.widgets import Static

from actors.agent_identity import CACHE_NAME, load_daemon_identity, probe_agent
from tests.support.ssh_agent import Agent, keygen, openssh_fingerprint, require_openssh, running_agent
from tests.support.wait import until
from tunnelmesh.cli import main
from tunnelmesh.config import ConfigError, load_config
from tunnelmesh.control_client import ControlError, request
from tunnelmesh.identity import IdentityError, load_identity_file
from tunnelmesh.identity_agent import cache_record, cached_identity
from tunnelmesh.paths import Paths
from tunnelmesh.tui.app import TunnelMeshApp


@dataclass(frozen=True)
class Keys:
    ed25519: Path
    rsa: Path
    ecdsa: Path
    twin: Path  # another Ed25519 key with the RSA key's comment


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    require_openssh()
    d = tmp_path_factory.mktemp("agent-keys")
    return Keys(
        ed25519=keygen(d / "ed25519", "-t", "ed25519", comment="alice@laptop"),
        rsa=keygen(d / "rsa", "-t", "rsa", "-b", "2048", comment="alice@desktop"),
        ecdsa=keygen(d / "ecdsa", "-t", "ecdsa", comment="alice@phone"),
        twin=keygen(d / "twin", "-t", "ed25519", comment="alice@desktop"),
    )


@pytest.fixture
def agent(tmp_path: Path, keys: Keys) -> Iterator[Agent]:
    with running_agent(str(tmp_path / "agent.sock")) as a:
        yield a


def fp(key: Path) -> str:
    return openssh_fingerprint(Path(f"{key}.pub"))


def tm(tmp_path: Path, *argv: str) -> list[str]:
    return ["--state-dir", str(tmp_path / "state"), *argv]


def write_config(tmp_path: Path, identity: str, agent_socket: str | None = None, cache: bool = False) -> Paths:
    state = tmp_path / "state"
    state.mkdir(mode=0o700, exist_ok=True)
    lines = ["[node]", 'name = "a"', f'identity = "{identity}"', 'mesh_ip = "10.77.0.1"']
    if agent_socket is not None:
        lines.append(f'agent_socket = "{agent_socket}"')
    if cache:
        lines.append("cache_mesh_key = true")
    (state / "tunnelmesh.toml").write_text("\n".join(lines) + "\n")
    return Paths(state, state / "tunnelmesh.toml")


# --- tunnelmesh keys ---------------------------------------------------------------------


def test_keys_lists_usable_and_unusable_keys_and_the_one_in_use(
    agent: Agent, keys: Keys, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    for key in (keys.ed25519, keys.rsa, keys.ecdsa):
        agent.add(key)
    write_config(tmp_path, f"agent:{fp(keys.rsa)}", agent_socket=agent.sock)  # the socket from the config

    assert main(tm(tmp_path, "keys", "--json")) == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed["socket"] == agent.sock and listed["config_identity"] == f"agent:{fp(keys.rsa)}"
    by_fp = {k["fingerprint"]: k for k in listed["keys"]}
    assert set(by_fp) == {fp(keys.ed25519), fp(keys.rsa), fp(keys.ecdsa)}
    ed, rsa, ecdsa = by_fp[fp(keys.ed25519)], by_fp[fp(keys.rsa)], by_fp[fp(keys.ecdsa)]
    assert (ed["type"], ed["comment"], ed["usable"], ed["why_not"], ed["in_use"]) == \
        ("ssh-ed25519", "alice@laptop", True, None, False)
    assert (rsa["type"], rsa["usable"], rsa["in_use"]) == ("ssh-rsa", True, True)
    assert ecdsa["type"].startswith("ecdsa-") and not ecdsa["usable"] and not ecdsa["in_use"]
    assert "randomized" in ecdsa["why_not"] and "no stable mesh key" in ecdsa["why_not"]

    assert main(tm(tmp_path, "keys")) == 0
    text = capsys.readouterr().out
    rsa_line = next(line for line in text.splitlines() if fp(keys.rsa) in line)
    ecdsa_line = next(line for line in text.splitlines() if fp(keys.ecdsa) in line)
    assert rsa_line.startswith("*") and "alice@desktop" in rsa_line and "usable" in rsa_line
    assert "not usable" in ecdsa_line and "randomized" in ecdsa_line


def test_keys_without_an_agent_says_what_to_do(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    assert main(tm(tmp_path, "keys")) == 1
    err = capsys.readouterr().err
    assert "SSH_AUTH_SOCK is not set" in err and "ssh-agent -s" in err and "--agent-socket" in err

    nowhere = str(tmp_path / "gone.sock")
    assert main(tm(tmp_path, "keys", "--agent-socket", nowhere)) == 1
    err = capsys.readouterr().err
    assert f"cannot reach ssh-agent at {nowhere}" in err and "ssh-agent -s" in err


# --- init --agent by comment -------------------------------------------------------------


def test_init_agent_by_comment_pins_the_fingerprint(
    agent: Agent, keys: Keys, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SSH_AUTH_SOCK", agent.sock)
    for key in (keys.ed25519, keys.rsa, keys.ecdsa):
        agent.add(key)
    assert main(tm(tmp_path, "init", "--static", "--mesh-ip", "10.77.0.1", "--agent", "alice@laptop")) == 0
    config = load_config(tmp_path / "state" / "tunnelmesh.toml", state_dir=tmp_path / "state")
    assert config.identity == f"agent:{fp(keys.ed25519)}"
    capsys.readouterr()
    assert main(tm(tmp_path, "id")) == 0
    assert capsys.readouterr().out.startswith("ssh-ed25519 ")


def test_init_agent_ambiguous_or_missing_lists_the_candidates(
    agent: Agent, keys: Keys, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SSH_AUTH_SOCK", agent.sock)
    for key in (keys.ed25519, keys.rsa, keys.twin):
        agent.add(key)
    init = ("init", "--static", "--mesh-ip", "10.77.0.1", "--agent")

    assert main(tm(tmp_path, *init, "alice@desktop")) == 2
    err = capsys.readouterr().err
    assert "ambiguous" in err and fp(keys.rsa) in err and fp(keys.twin) in err and fp(keys.ed25519) not in err

    assert main(tm(tmp_path, *init, "bob@laptop")) == 2
    err = capsys.readouterr().err
    assert "'bob@laptop' is not in the ssh-agent" in err
    assert all(fp(key) in err for key in (keys.ed25519, keys.rsa, keys.twin))

    assert main(tm(tmp_path, *init)) == 2  # no selector: several usable keys
    assert "several usable keys" in capsys.readouterr().err
    assert not (tmp_path / "state" / "tunnelmesh.toml").exists()


# --- the daemon's identity: cache and waiting ---------------------------------------------


def test_mesh_key_cache_is_0600_used_without_the_agent_and_removed_when_off(
    agent: Agent, keys: Keys, tmp_path: Path
) -> None:
    agent.add(keys.rsa)
    paths = write_config(tmp_path, f"agent:{fp(keys.rsa)}", agent_socket=agent.sock, cache=True)
    config = load_config(paths.config, state_dir=paths.state_dir)
    from_file = asyncio.run(load_identity_file(keys.rsa))

    first = asyncio.run(load_daemon_identity(config, paths))
    assert first is not None and first.public == from_file.public
    assert first.origin == f"ssh-agent at {agent.sock}"
    cache = paths.state_dir / CACHE_NAME
    assert stat.S_IMODE(cache.stat().st_mode) == 0o600
    record = json.loads(cache.read_bytes())
    assert record["identity"] == from_file.public.to_line()

    agent.stop()  # an unattended boot: no agent
    cached = asyncio.run(load_daemon_identity(config, paths))
    assert cached is not None and cached.public == from_file.public
    assert cached.static_private == from_file.static_private
    assert "mesh key cache" in cached.origin
    status = asyncio.run(probe_agent(cached, ("a restart",)))
    assert status is not None and status.state == "unreachable" and status.needed_for == ("a restart",)
    with pytest.raises(IdentityError, match="cannot reach ssh-agent"):  # signing still needs the agent
        asyncio.run(cached.sign(b"x", "test@tunnelmesh"))

    Path(agent.sock).unlink()  # the killed agent left its socket
    with running_agent(agent.sock) as again:  # the agent back, the option off: the cache goes
        again.add(keys.rsa)
        off = write_config(tmp_path, f"agent:{fp(keys.rsa)}", agent_socket=again.sock)
        assert asyncio.run(load_daemon_identity(load_config(off.config, state_dir=off.state_dir), off)) is not None
        assert not cache.exists()


def test_a_cache_of_another_key_is_not_used(agent: Agent, keys: Keys, tmp_path: Path) -> None:
    agent.add(keys.ed25519)
    agent.add(keys.rsa)
    paths = write_config(tmp_path, f"agent:{fp(keys.ed25519)}", agent_socket=agent.sock, cache=True)
    assert asyncio.run(load_daemon_identity(load_config(paths.config, state_dir=paths.state_dir), paths))
    other = write_config(tmp_path, f"agent:{fp(keys.rsa)}", agent_socket=agent.sock, cache=True)
    config = load_config(other.config, state_dir=other.state_dir)
    agent.stop()

    async def start_then_stop() -> object:
        task = asyncio.create_task(load_daemon_identity(config, other))
        message = await wait_answer(other, "ping_daemon")
        assert "waiting for the ssh-agent" in message and fp(keys.rsa) in message
        assert await wait_answer(other, "down") == "stopping"
        return await asyncio.wait_for(task, 10)

    assert asyncio.run(start_then_stop()) is None  # it waited instead of using ed25519's cache


async def wait_answer(paths: Paths, cmd: str) -> str:
    """The control socket's answer to `cmd` once it answers (within 10 s)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while True:
        try:
            return str(await asyncio.to_thread(request, paths.control_socket, cmd, 2))
        except ControlError:
            if loop.time() > deadline:
                raise
            await asyncio.sleep(0.05)


def test_daemon_waits_for_the_key_says_so_and_goes_on_once_added(agent: Agent, keys: Keys, tmp_path: Path) -> None:
    paths = write_config(tmp_path, f"agent:{fp(keys.ed25519)}", agent_socket=agent.sock)
    config = load_config(paths.config, state_dir=paths.state_dir)

    async def scenario() -> None:
        task = asyncio.create_task(load_daemon_identity(config, paths))
        assert "waiting for the ssh-agent" in await wait_answer(paths, "ping_daemon")
        with pytest.raises(ControlError) as info:
            await asyncio.to_thread(request, paths.control_socket, "status", 2)
        message = str(info.value)
        assert f"waiting for the ssh-agent at {agent.sock} to hold key {fp(keys.ed25519)}: ssh-add it" in message
        assert "tunnelmesh down" in message
        assert not task.done()
        await asyncio.to_thread(agent.add, keys.ed25519)
        identity = await asyncio.wait_for(task, 15)  # polled every 2 s
        assert identity is not None and identity.fingerprint == fp(keys.ed25519)
        assert not paths.control_socket.exists()  # the waiting control server is gone

    asyncio.run(scenario())


def test_down_stops_a_waiting_daemon(tmp_path: Path, keys: Keys) -> None:
    nowhere = tmp_path / "no-agent.sock"
    paths = write_config(tmp_path, f"agent:{fp(keys.rsa)}", agent_socket=str(nowhere))
    config = load_config(paths.config, state_dir=paths.state_dir)

    async def scenario() -> object:
        task = asyncio.create_task(load_daemon_identity(config, paths))
        answer = await wait_answer(paths, "ping_daemon")
        assert f"cannot reach ssh-agent at {nowhere}" in answer
        assert paths.pid_file.read_text().strip().isdigit()
        assert await wait_answer(paths, "down") == "stopping"
        return await asyncio.wait_for(task, 10)

    assert asyncio.run(scenario()) is None
    assert not paths.pid_file.exists() and not paths.control_socket.exists()


def test_the_tui_shows_a_waiting_daemon_in_its_own_words(tmp_path: Path, keys: Keys) -> None:
    nowhere = tmp_path / "no-agent.sock"
    paths = write_config(tmp_path, f"agent:{fp(keys.rsa)}", agent_socket=str(nowhere))
    config = load_config(paths.config, state_dir=paths.state_dir)

    async def scenario() -> object:
        task = asyncio.create_task(load_daemon_identity(config, paths))
        await wait_answer(paths, "ping_daemon")
        app = TunnelMeshApp(paths)
        async with app.run_test(size=(160, 40)):
            banner = app.query_one("#banner", Static)
            await until("the banner", lambda: banner.display, 5.0)
            shown = str(banner.render())
            assert shown.startswith(f"the daemon at {paths.control_socket}: tunnelmesh (pid "), shown
            assert "is starting: waiting for the ssh-agent" in shown, shown
            assert "not running" not in shown and not app.connected
        assert await wait_answer(paths, "down") == "stopping"
        return await asyncio.wait_for(task, 10)

    assert asyncio.run(scenario()) is None


# --- the config and the cache record as input ----------------------------------------------


@pytest.mark.parametrize("line, error", [
    ('agent_socket = "/run/agent.sock"', "agent_socket only applies to an ssh-agent identity"),
    ("cache_mesh_key = true", "cache_mesh_key only applies to an ssh-agent identity"),
])
def test_agent_options_are_refused_with_a_key_file(tmp_path: Path, line: str, error: str) -> None:
    config = tmp_path / "tunnelmesh.toml"
    config.write_text(f'[node]\nname = "a"\nidentity = "/etc/key"\nmesh_ip = "10.77.0.1"\n{line}\n')
    with pytest.raises(ConfigError, match=error) as info:
        load_config(config, state_dir=tmp_path)
    assert info.value.line == 5


def test_cache_mesh_key_must_be_a_boolean(tmp_path: Path) -> None:
    config = tmp_path / "tunnelmesh.toml"
    config.write_text('[node]\nname = "a"\nidentity = "agent"\nmesh_ip = "10.77.0.1"\ncache_mesh_key = "yes"\n')
    with pytest.raises(ConfigError, match="cache_mesh_key must be true or false, not a string"):
        load_config(config, state_dir=tmp_path)


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.binary(max_size=300), st.builds(lambda d: json.dumps(d).encode(), st.dictionaries(
    st.sampled_from(["identity", "mesh_key", "other"]),
    st.one_of(st.text(max_size=80), st.integers(), st.none(), st.lists(st.integers(), max_size=3)), max_size=3))))
def test_a_mangled_cache_record_is_a_clear_error(record: bytes) -> None:
    with pytest.raises(IdentityError, match="mesh key cache is not usable"):
        cached_identity(record, "/nowhere.sock", None, origin="test")


def test_a_cache_record_with_another_private_key_or_fingerprint_is_refused(keys: Keys) -> None:
    identity = asyncio.run(load_identity_file(keys.ed25519))
    record = json.loads(cache_record(identity))
    assert cached_identity(json.dumps(record).encode(), "/nowhere.sock", fp(keys.ed25519), "test").public == \
        identity.public
    with pytest.raises(IdentityError, match=re.escape(f"holds {fp(keys.ed25519)}, not the configured {fp(keys.rsa)}")):
        cached_identity(json.dumps(record).encode(), "/nowhere.sock", fp(keys.rsa), "test")
    swapped = {**record, "mesh_key": base64.b64encode(bytes(range(32))).decode()}
    with pytest.raises(IdentityError, match="its private key is not its identity's"):
        cached_identity(json.dumps(swapped).encode(), "/nowhere.sock", None, "test")
