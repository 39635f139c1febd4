"""The ssh-agent workflow with a real ssh-agent and real ssh-keygen keys: `tunnelmesh keys`,
choosing a key by comment, the daemon's mesh key cache, and the daemon waiting for the agent
(its control socket answering meanwhile)."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import socket
import stat
import struct
from collections.abc import Awaitable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from textual.widgets import Static

from actors import agent_identity
from actors.agent_identity import CACHE_NAME, PROBE_KEPT, AgentProbe, load_daemon_identity, probe_agent
from actors.messages import AgentStatus
from tests.support.ssh_agent import (
    Agent, ScriptedAgent, keygen, openssh_fingerprint, require_openssh, running_agent, scripted_agent, wait_accepting,
)
from tests.support.wait import until
from tunnelmesh import identity_agent
from tunnelmesh.cli import main
from tunnelmesh.config import ConfigError, load_config
from tunnelmesh.control_client import ControlError, request
from tunnelmesh.coordinator.client import Coordinator, CoordinatorError
from tunnelmesh.identity import IdentityError, NodeIdentity, load_identity_file
from tunnelmesh.identity_agent import (
    AgentUnavailable, cache_record, cached_identity, list_agent_keys, load_identity_agent,
)
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


def as_the_users_agent(monkeypatch: pytest.MonkeyPatch, agent: Agent, *held: Path) -> None:
    """`agent`, holding `held`, is the one $SSH_AUTH_SOCK names."""
    monkeypatch.setenv("SSH_AUTH_SOCK", agent.sock)
    for key in held:
        agent.add(key)


def test_init_agent_by_comment_pins_the_fingerprint(
    agent: Agent, keys: Keys, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    as_the_users_agent(monkeypatch, agent, keys.ed25519, keys.rsa, keys.ecdsa)
    assert main(tm(tmp_path, "init", "--static", "--mesh-ip", "10.77.0.1", "--agent", "alice@laptop")) == 0
    config = load_config(tmp_path / "state" / "tunnelmesh.toml", state_dir=tmp_path / "state")
    assert config.identity == f"agent:{fp(keys.ed25519)}"
    capsys.readouterr()
    assert main(tm(tmp_path, "id")) == 0
    assert capsys.readouterr().out.startswith("ssh-ed25519 ")


def test_init_agent_ambiguous_or_missing_lists_the_candidates(
    agent: Agent, keys: Keys, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    as_the_users_agent(monkeypatch, agent, keys.ed25519, keys.rsa, keys.twin)
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


def test_down_stops_a_waiting_daemon_which_the_tui_shows_in_its_own_words(tmp_path: Path, keys: Keys) -> None:
    nowhere = tmp_path / "no-agent.sock"
    paths = write_config(tmp_path, f"agent:{fp(keys.rsa)}", agent_socket=str(nowhere))
    config = load_config(paths.config, state_dir=paths.state_dir)

    async def scenario() -> object:
        task = asyncio.create_task(load_daemon_identity(config, paths))
        answer = await wait_answer(paths, "ping_daemon")
        assert f"cannot reach ssh-agent at {nowhere}" in answer
        assert paths.pid_file.read_text().strip().isdigit()
        app = TunnelMeshApp(paths)
        async with app.run_test(size=(160, 40)):
            banner = app.query_one("#banner", Static)
            await until("the TUI's banner", lambda: banner.display, 5.0)
            shown = str(banner.render())
            assert shown.startswith(f"the daemon at {paths.control_socket}: tunnelmesh (pid "), shown
            assert "is starting: waiting for the ssh-agent" in shown, shown
            assert "not running" not in shown and not app.connected
        assert await wait_answer(paths, "down") == "stopping"
        return await asyncio.wait_for(task, 10)

    assert asyncio.run(scenario()) is None
    assert not paths.pid_file.exists() and not paths.control_socket.exists()


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


# --- the test agent itself: ready when it accepts, ssh-add failures say why ----------------


def test_an_agent_socket_is_ready_when_it_accepts_not_when_its_file_exists(tmp_path: Path) -> None:
    path = str(tmp_path / "slow.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(path)  # the file exists from here; connections are refused until listen()
        with pytest.raises(RuntimeError, match="nothing accepted connections .* Connection refused"):
            wait_accepting(path, timeout=0.3)
        server.listen(1)
        wait_accepting(path)


def test_a_failed_ssh_add_says_why(agent: Agent, tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match=r"ssh-add .*missing failed \(exit \d+\): .*No such file"):
        agent.add(tmp_path / "missing")


# --- a hung or misbehaving agent: every exchange bounded, said as what happened -------------


@pytest.fixture
def short_agent_timeout(monkeypatch: pytest.MonkeyPatch) -> float:
    monkeypatch.setattr(identity_agent, "AGENT_TIMEOUT", 0.5)
    return 0.5


@pytest.fixture
def hung(tmp_path: Path) -> Iterator[ScriptedAgent]:
    """A real socket that accepts and never answers (an agent busy with another client)."""
    with scripted_agent(str(tmp_path / "hung.sock")) as peer:
        yield peer


def through_agent_at(keys: Keys, sock: str) -> NodeIdentity:
    """ed25519's identity, signing through the agent at `sock` (as a cached mesh key does)."""
    return cached_identity(cache_record(asyncio.run(load_identity_file(keys.ed25519))), sock, None, "test")


async def bounded(coro: Awaitable[object]) -> object:
    return await asyncio.wait_for(coro, 15)  # without a bound of its own, the test fails here


def test_a_hung_agent_is_a_clear_error_for_every_exchange(
    hung: ScriptedAgent, keys: Keys, short_agent_timeout: float
) -> None:
    no_answer = f"the ssh-agent at {hung.sock} did not answer within {short_agent_timeout:g} s"
    with pytest.raises(AgentUnavailable, match=re.escape(no_answer)):
        asyncio.run(bounded(list_agent_keys(hung.sock)))
    with pytest.raises(AgentUnavailable, match=re.escape(no_answer)):
        asyncio.run(bounded(load_identity_agent(None, agent_path=hung.sock)))
    identity = through_agent_at(keys, hung.sock)
    with pytest.raises(AgentUnavailable, match=re.escape(no_answer)):
        asyncio.run(bounded(identity.sign(b"x", "test@tunnelmesh")))

    async def log_in() -> None:
        async with identity.ssh_client_keys():
            raise AssertionError("a hung agent gave keys")

    with pytest.raises(AgentUnavailable, match=re.escape(no_answer) + ".*to log in"):
        asyncio.run(bounded(log_in()))
    assert hung.settle() == 4  # list; load (its list); sign; log in: each gave up and hung up


def test_a_hung_agent_does_not_stall_a_coordinator_request(
    hung: ScriptedAgent, keys: Keys, short_agent_timeout: float
) -> None:
    # The request is signed before its HTTP timeout starts: the agent's own bound is all there is.
    identity = through_agent_at(keys, hung.sock)

    async def scenario() -> None:
        async with Coordinator("http://127.0.0.1:9", identity=identity, timeout=30) as coordinator:
            await coordinator.register(51820, [])

    with pytest.raises(CoordinatorError, match=f"cannot sign the request: the ssh-agent at {hung.sock} did not "
                                               "answer within"):
        asyncio.run(bounded(scenario()))


def test_a_daemon_starting_with_a_hung_agent_waits_with_its_control_socket_up(
    hung: ScriptedAgent, keys: Keys, tmp_path: Path, short_agent_timeout: float
) -> None:
    paths = write_config(tmp_path, f"agent:{fp(keys.rsa)}", agent_socket=hung.sock)
    config = load_config(paths.config, state_dir=paths.state_dir)

    async def scenario() -> object:
        task = asyncio.create_task(load_daemon_identity(config, paths))
        message = await wait_answer(paths, "ping_daemon")
        assert f"waiting for the ssh-agent at {hung.sock}" in message and "did not answer within" in message
        with pytest.raises(ControlError, match="is starting: waiting for the ssh-agent"):
            await asyncio.to_thread(request, paths.control_socket, "status", 2)
        assert await wait_answer(paths, "down") == "stopping"
        return await asyncio.wait_for(task, 15)

    assert asyncio.run(scenario()) is None


def test_keys_with_a_hung_agent_says_so(
    hung: ScriptedAgent, tmp_path: Path, capsys: pytest.CaptureFixture[str], short_agent_timeout: float
) -> None:
    assert main(tm(tmp_path, "keys", "--agent-socket", hung.sock)) == 1
    assert f"the ssh-agent at {hung.sock} did not answer within 0.5 s" in capsys.readouterr().err


def test_an_agent_breaking_the_protocol_is_said_to_misbehave(keys: Keys, tmp_path: Path) -> None:
    unknown = struct.pack(">IB", 1, 99)  # an answer of a type no request has
    with scripted_agent(str(tmp_path / "odd.sock"), unknown) as odd:
        for attempt in (list_agent_keys(odd.sock), through_agent_at(keys, odd.sock).sign(b"x", "test@tunnelmesh")):
            with pytest.raises(AgentUnavailable) as info:
                asyncio.run(bounded(attempt))
            message = str(info.value)
            assert message == f"the ssh-agent at {odd.sock} misbehaved: Unknown SSH agent response: 99", message
        assert odd.settle() == 2


def test_status_asks_the_agent_at_most_once_per_interval(
    hung: ScriptedAgent, keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(agent_identity, "PROBE_TIMEOUT", 0.3)
    now = [1000.0]
    probe = AgentProbe(through_agent_at(keys, hung.sock), ("a restart",), clock=lambda: now[0])

    async def three_at_once() -> list[AgentStatus | None]:
        return list(await bounded(asyncio.gather(probe(), probe(), probe())))  # type: ignore[arg-type]

    answers = asyncio.run(three_at_once())
    assert all(a is not None and a.state == "unreachable" and a.needed_for == ("a restart",) for a in answers)
    assert hung.settle() == 1  # one look, shared
    now[0] += PROBE_KEPT - 0.5
    assert asyncio.run(three_at_once()) == answers and hung.settle() == 1  # kept
    now[0] += 1.0
    assert asyncio.run(three_at_once()) == answers and hung.settle() == 2  # looked again


# --- choosing a key: comments, files; --agent-socket for init ---------------------------------


def test_a_comment_naming_a_file_here_is_a_comment(
    agent: Agent, keys: Keys, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    agent.add(keys.ed25519)
    agent.add(keys.rsa)
    monkeypatch.chdir(tmp_path)
    Path("alice@laptop").write_text(Path(f"{keys.rsa}.pub").read_text())  # a file named like the comment
    Path("mine.pub").write_text(Path(f"{keys.rsa}.pub").read_text())
    chosen = asyncio.run(load_identity_agent("alice@laptop", agent_path=agent.sock))
    assert chosen.fingerprint == fp(keys.ed25519)
    assert asyncio.run(load_identity_agent("mine.pub", agent_path=agent.sock)).fingerprint == fp(keys.rsa)
    assert asyncio.run(load_identity_agent("./alice@laptop", agent_path=agent.sock)).fingerprint == fp(keys.rsa)
    with pytest.raises(IdentityError, match="cannot read public key file gone.pub: No such file"):
        asyncio.run(load_identity_agent("gone.pub", agent_path=agent.sock))


def test_init_agent_socket_is_used_and_written_for_the_daemon(
    agent: Agent, keys: Keys, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)  # as under sudo
    agent.add(keys.ed25519)
    agent.add(keys.rsa)
    init = ("init", "--static", "--mesh-ip", "10.77.0.1")
    assert main(tm(tmp_path, *init, "--agent-socket", agent.sock)) == 2
    assert "--agent-socket goes with --agent" in capsys.readouterr().err
    assert main(tm(tmp_path, *init, "--agent", "alice@desktop")) == 2
    err = capsys.readouterr().err
    assert "SSH_AUTH_SOCK is not set" in err and '--agent-socket "$SSH_AUTH_SOCK"' in err

    assert main(tm(tmp_path, *init, "--agent", "alice@desktop", "--agent-socket", agent.sock)) == 0
    paths = Paths(tmp_path / "state", tmp_path / "state" / "tunnelmesh.toml")
    config = load_config(paths.config, state_dir=paths.state_dir)
    assert (config.identity, config.agent_socket) == (f"agent:{fp(keys.rsa)}", Path(agent.sock))
    identity = asyncio.run(load_daemon_identity(config, paths))  # what `up` does, without SSH_AUTH_SOCK
    assert identity is not None and identity.fingerprint == fp(keys.rsa) and identity.agent_path == agent.sock
    capsys.readouterr()
    assert main(tm(tmp_path, "id")) == 0
    assert capsys.readouterr().out.startswith("ssh-rsa ")

    # A network's first node (create_network) the same way.
    network = tmp_path / "network"
    assert main(["--state-dir", str(network / "state"), "init", "--agent", "alice@laptop", "--agent-socket",
                 agent.sock, "--url", "https://192.0.2.1:7400"]) == 0
    config = load_config(network / "state" / "tunnelmesh.toml", state_dir=network / "state")
    assert (config.identity, config.agent_socket) == (f"agent:{fp(keys.ed25519)}", Path(agent.sock))


def test_the_identity_module_has_no_agent_loader_left() -> None:
    import tunnelmesh.identity

    assert not hasattr(tunnelmesh.identity, "load_identity_agent")  # it is tunnelmesh.identity_agent's
    assert "load_identity_agent" not in tunnelmesh.identity.__all__
