"""The SSH rung against a real asyncssh server and client on 127.0.0.1, in process."""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import shutil
import subprocess
import time
from collections.abc import Awaitable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import asyncssh
import pytest

from tests.conftest import unavailable
from tests.links import Directory, new_identity, public_key_text, write_key
from tests.support.wait import until
from tunnelmesh.identity import NodeIdentity
from tunnelmesh.identity_agent import load_identity_agent
from tunnelmesh.links import MAX_MESSAGE, Link, LinkError
from tunnelmesh.links import ssh as sshmod
from tunnelmesh.links.framing import FrameDecoder, frame
from tunnelmesh.links.ssh import SEND_BUFFER_LIMIT, SshLink, SshRung, SshTarget, load_or_create_host_key

T = TypeVar("T")
TEST_TIMEOUT = 30.0  # seconds for any one test's event loop


def run(coro: Awaitable[T]) -> T:
    async def bounded() -> T:
        async with asyncio.timeout(TEST_TIMEOUT):
            return await coro

    return asyncio.run(bounded())


# --- A sink that records, as the daemon's data path would receive -------------------------


@dataclass
class Sink:
    ups: list[Link] = field(default_factory=list)
    downs: list[tuple[Link, str]] = field(default_factory=list)
    received: list[tuple[Link, bytes]] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def link_up(self, link: Link) -> None:
        self.ups.append(link)
        self.changed.set()

    def link_down(self, link: Link, reason: str) -> None:
        self.downs.append((link, reason))
        self.changed.set()

    def receive(self, link: Link, message: bytes | bytearray | memoryview) -> None:
        self.received.append((link, bytes(message)))
        self.changed.set()

    async def until(self, condition: Any, timeout: float = 5.0) -> None:
        async with asyncio.timeout(timeout):
            while not condition():
                self.changed.clear()
                await self.changed.wait()


@dataclass
class Node:
    identity: NodeIdentity
    host_key: asyncssh.SSHKey
    sink: Sink
    rung: SshRung

    @property
    def wg(self) -> bytes:
        return self.identity.public.wg_public_key

    def target(self, host_key: asyncssh.SSHKey | None = None) -> SshTarget:
        key = public_key_text(host_key or self.host_key)
        return SshTarget("127.0.0.1", self.rung.port or 0, key, sshmod.USERNAME, "daemon")


@pytest.fixture(scope="module")
def identities() -> list[NodeIdentity]:
    return [new_identity() for _ in range(3)]


async def make_node(identity: NodeIdentity, directory: Directory, *, serve: bool = True) -> Node:
    host_key = asyncssh.generate_private_key("ssh-ed25519")
    sink = Sink()
    rung = SshRung(identity=identity, host_key=host_key, port=0 if serve else None, directory=directory,
                   sink=sink, listen_host="127.0.0.1")
    await rung.start()
    return Node(identity, host_key, sink, rung)


async def pair(identities: list[NodeIdentity]) -> tuple[Directory, Node, Node]:
    """Nodes a and b, members of one directory that knows where both serve."""
    directory = Directory()
    a, b = identities[0], identities[1]
    for node in (a, b):
        directory.members[node.public.ssh_public_key] = node.public.wg_public_key
    na, nb = await make_node(a, directory), await make_node(b, directory)
    directory.where[na.wg] = [na.target()]
    directory.where[nb.wg] = [nb.target()]
    return directory, na, nb


async def close_all(*nodes: Node) -> None:
    for node in nodes:
        await node.rung.close()


# --- Host key -------------------------------------------------------------------------------


def test_host_key_made_once_0600_and_reloaded(tmp_path: Path) -> None:
    path = tmp_path / "ssh_host_ed25519_key"
    made = load_or_create_host_key(path)
    assert made.algorithm == b"ssh-ed25519"
    assert path.stat().st_mode & 0o777 == 0o600
    assert load_or_create_host_key(path).public_data == made.public_data
    assert list(tmp_path.iterdir()) == [path]  # no temp file left


def test_host_key_refusals_say_what_to_do(tmp_path: Path) -> None:
    path = tmp_path / "key"
    load_or_create_host_key(path)
    path.chmod(0o644)
    with pytest.raises(LinkError, match="chmod 600"):
        load_or_create_host_key(path)
    path.chmod(0o600)
    path.write_bytes(b"not a key")
    with pytest.raises(LinkError, match="not an unencrypted Ed25519 private key; remove it"):
        load_or_create_host_key(path)


# --- Dialling and frames ----------------------------------------------------------------------


def test_member_dials_and_frames_flow_both_ways(identities: list[NodeIdentity]) -> None:
    async def main() -> None:
        _, a, b = await pair(identities)
        try:
            link = await a.rung.dial(b.wg)
            assert link.rung == "ssh" and link.description == f"ssh 127.0.0.1:{b.rung.port}"
            assert await a.rung.dial(b.wg) is link  # a live link is reused
            await b.sink.until(lambda: b.sink.ups)
            back = b.sink.ups[0]
            assert back.peer_key == a.wg and a.sink.ups == [link] and link.peer_key == b.wg
            for size in (1, 148, MAX_MESSAGE):
                link.send(bytes([size % 256]) * size)
            await b.sink.until(lambda: len(b.sink.received) == 3)
            assert [len(m) for _, m in b.sink.received] == [1, 148, MAX_MESSAGE]
            assert all(src is back for src, _ in b.sink.received)
            back.send(b"reply")
            await a.sink.until(lambda: a.sink.received)
            assert a.sink.received == [(link, b"reply")]
            status = a.rung.status()
            assert status["links"] == 1 and status["port"] == a.rung.port and not status["drops"]
            link.close()
            await b.sink.until(lambda: b.sink.downs)
            assert a.sink.downs == [(link, "closed by this node")] and a.rung.link(b.wg) is None
        finally:
            await close_all(a, b)

    run(main())


class OrderSink(Sink):
    """A Sink that also keeps the order of ups and downs."""

    def __init__(self) -> None:
        super().__init__()
        self.order: list[tuple[str, Link]] = []

    def link_up(self, link: Link) -> None:
        self.order.append(("up", link))
        super().link_up(link)

    def link_down(self, link: Link, reason: str) -> None:
        self.order.append(("down", link))
        super().link_down(link, reason)


def test_a_link_that_replaces_another_is_announced_before_the_old_one_goes_down(
        identities: list[NodeIdentity]) -> None:
    # Both sides dialled at once and the smaller dialler's link replaced the one a session
    # had just moved onto: announced down first, it made the session take SSH for failing
    # and search again (an e2e TUI run: "SSH is failing" 1 s after the move to SSH).
    async def main() -> None:
        _, a, b = await pair(identities)
        larger, smaller = (a, b) if a.wg > b.wg else (b, a)
        larger.sink = larger.rung.sink = OrderSink()  # type: ignore[misc]
        try:
            first = await larger.rung.dial(smaller.wg)
            # The smaller side's own dial, as when both dial at once (dial would reuse the live link).
            second = await smaller.rung._dial(larger.wg)
            sink = larger.sink
            assert isinstance(sink, OrderSink)
            await sink.until(lambda: len(sink.order) == 3)
            survivor = larger.rung.link(smaller.wg)
            assert survivor is not None and survivor is not first and survivor.peer_key == smaller.wg
            assert sink.order == [("up", first), ("up", survivor), ("down", first)], sink.order
            assert smaller.rung.link(larger.wg) is second
        finally:
            await close_all(a, b)

    run(main())


class CountingStream:
    """The real channel underneath, with its writes counted."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.writes: list[int] = []

    def write(self, data: bytearray) -> None:
        self.writes.append(len(data))
        self.inner.write(data)

    def get_write_buffer_size(self) -> int:
        return int(self.inner.get_write_buffer_size())

    def close(self) -> None:
        self.inner.close()


def test_a_batch_of_sends_is_one_channel_write(identities: list[NodeIdentity]) -> None:
    async def main() -> None:
        _, a, b = await pair(identities)
        try:
            link = await a.rung.dial(b.wg)
            link._stream = counting = CountingStream(link._stream)
            for _ in range(10):
                link.send(b"x" * 100)
            await b.sink.until(lambda: len(b.sink.received) == 10)
            assert counting.writes == [10 * 102]
        finally:
            await close_all(a, b)

    run(main())


def test_non_member_refused_and_logged_once(identities: list[NodeIdentity], caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        directory, a, b = await pair(identities)
        outsider = await make_node(identities[2], directory, serve=False)
        outsider_directory = Directory(where={b.wg: [b.target()]})
        outsider.rung.directory = outsider_directory
        try:
            for _ in range(3):
                with pytest.raises(LinkError, match="refused our key"):
                    await outsider.rung.dial(b.wg)
            assert b.rung.drops["ssh: refused key of no current member"] >= 3
            assert not b.sink.ups
        finally:
            await close_all(a, b, outsider)

    with caplog.at_level(logging.WARNING, logger="tunnelmesh.ssh"):
        run(main())
    refusals = [r for r in caplog.records if "key of no current member" in r.getMessage()]
    assert len(refusals) == 1, [r.getMessage() for r in refusals]
    assert identities[2].fingerprint in refusals[0].getMessage()


def test_member_host_key_for_the_wrong_peer_is_refused(identities: list[NodeIdentity], caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        directory, a, b = await pair(identities)
        c = await make_node(identities[2], directory)
        directory.members[identities[2].public.ssh_public_key] = c.wg
        # c's endpoint, listed as b's with b's attested host key: c must not pass as b.
        directory.where[b.wg] = [SshTarget("127.0.0.1", c.rung.port or 0, public_key_text(b.host_key), "tunnelmesh", "daemon")]
        try:
            for _ in range(2):
                with pytest.raises(LinkError) as caught:
                    await a.rung.dial(b.wg)
                assert str(caught.value) == f"host key of 127.0.0.1:{c.rung.port} is not the one {sshmod.short_key(b.wg)} attested"
            assert not c.sink.ups and not a.sink.ups
        finally:
            await close_all(a, b, c)

    with caplog.at_level(logging.WARNING, logger="tunnelmesh.ssh"):
        run(main())
    assert len([r for r in caplog.records if "is not the one" in r.getMessage()]) == 1


def test_dial_errors_are_human(identities: list[NodeIdentity], monkeypatch: pytest.MonkeyPatch) -> None:
    async def main() -> None:
        directory, a, b = await pair(identities)
        silent = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)  # accepts, never speaks SSH
        silent_port = silent.sockets[0].getsockname()[1]
        closed_port = b.rung.port
        await b.rung.close()
        try:
            with pytest.raises(LinkError, match=f"^connection refused on 127.0.0.1:{closed_port}$"):
                await a.rung.dial(b.wg)
            directory.where[b.wg] = [
                SshTarget("127.0.0.1", silent_port, public_key_text(b.host_key), "tunnelmesh", "daemon"),
                SshTarget("127.0.0.1", closed_port or 0, public_key_text(b.host_key), "tunnelmesh", "daemon"),
            ]
            with pytest.raises(LinkError) as caught:
                await a.rung.dial(b.wg)
            assert str(caught.value) == (
                f"timed out after 0.5 s connecting to 127.0.0.1:{silent_port}; "
                f"connection refused on 127.0.0.1:{closed_port}"
            )
            directory.where[b.wg] = []
            with pytest.raises(LinkError, match="attested no SSH endpoint"):
                await a.rung.dial(b.wg)
        finally:
            silent.close()
            await close_all(a)

    monkeypatch.setattr(sshmod, "DIAL_TIMEOUT", 0.5)
    run(main())


def test_close_cancels_and_awaits_a_dial_in_flight(identities: list[NodeIdentity]) -> None:
    """The rung owns its dials: none outlives close(), even one stuck on a silent server."""
    async def main() -> None:
        directory, a, b = await pair(identities)
        await b.rung.close()
        silent = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)  # accepts, never speaks SSH
        directory.where[b.wg] = [SshTarget("127.0.0.1", silent.sockets[0].getsockname()[1],
                                           public_key_text(b.host_key), "tunnelmesh", "daemon")]
        try:
            dialler = asyncio.create_task(a.rung.dial(b.wg))
            while not any(t.get_name().startswith("ssh dial ") for t in asyncio.all_tasks()):
                await asyncio.sleep(0)
            await a.rung.close()
            assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("ssh dial ")]
            with pytest.raises(asyncio.CancelledError):
                await dialler
        finally:
            silent.close()

    run(main())


def test_bind_failure_names_the_port(identities: list[NodeIdentity]) -> None:
    async def main() -> None:
        _, a, b = await pair(identities)
        clash = SshRung(identity=identities[2], host_key=a.host_key, port=a.rung.port, directory=Directory(),
                        sink=Sink(), listen_host="127.0.0.1")
        try:
            with pytest.raises(LinkError, match=f"cannot serve SSH on 127.0.0.1:{a.rung.port}: .*choose another SSH port"):
                await clash.start()
        finally:
            await close_all(a, b)

    run(main())


# --- What the server refuses ------------------------------------------------------------------


async def raw_client(node: Node, identity_key: asyncssh.SSHKey | None = None, **kwargs: Any) -> asyncssh.SSHClientConnection:
    """A plain asyncssh client, logged in to `node` with a member's key."""
    return await asyncssh.connect(
        "127.0.0.1", node.rung.port, username="tunnelmesh", client_keys=[identity_key], known_hosts=None,
        config=None, agent_path=None, **kwargs,
    )


async def pair_and_member(identities: list[NodeIdentity], member: NodeIdentity) -> tuple[Node, Node]:
    """pair(), with `member` (whose key a raw client uses) a member too."""
    directory, a, b = await pair(identities)
    directory.members[member.public.ssh_public_key] = member.public.wg_public_key
    return a, b


@pytest.fixture(scope="module")
def member_key(tmp_path_factory: pytest.TempPathFactory) -> tuple[asyncssh.SSHKey, NodeIdentity]:
    """A private key and its identity: for raw clients that behave badly."""
    path = write_key(tmp_path_factory.mktemp("member") / "id")
    from tunnelmesh.identity import load_identity_file

    return asyncssh.read_private_key(path), asyncio.run(load_identity_file(path))


def test_key_queries_do_not_tell_member_keys_from_others(
    identities: list[NodeIdentity], member_key: tuple[asyncssh.SSHKey, NodeIdentity], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 13, defect 9b: an unsigned public-key query (what anyone holding only a public
    key can send) got PK_OK for members' keys only. Now every key query is answered alike
    and membership is decided on the signed login."""
    key, identity = member_key
    stranger = asyncssh.generate_private_key("ssh-ed25519")
    answered: list[bytes] = []

    def pk_ok(auth: Any, pkttype: int, pktid: int, packet: Any) -> None:
        # The client's side of PK_OK: note it, and sign nothing (an outsider has no private key).
        answered.append(auth._keypair.public_data)
        auth._conn.try_next_auth()

    monkeypatch.setitem(asyncssh.auth._ClientPublicKeyAuth._packet_handlers,  # type: ignore[attr-defined]
                        asyncssh.auth.MSG_USERAUTH_PK_OK, pk_ok)

    async def main() -> None:
        a, b = await pair_and_member(identities, identity)
        try:
            for client_key in (key, stranger):
                with pytest.raises(asyncssh.PermissionDenied):
                    await raw_client(b, client_key)
            assert answered == [key.public_data, stranger.public_data]
            # Queries are not refusals: nothing counted until a signed login.
            assert not b.rung.drops["ssh: refused key of no current member"]
        finally:
            await close_all(a, b)

    run(main())


def test_signed_logins_decide_membership(
    identities: list[NodeIdentity], member_key: tuple[asyncssh.SSHKey, NodeIdentity]
) -> None:
    """After the query, a member's signed login passes; a stranger's good signature fails
    like a bad one (PermissionDenied), and is counted as a refused key."""
    key, identity = member_key
    stranger = asyncssh.generate_private_key("ssh-ed25519")

    async def main() -> None:
        a, b = await pair_and_member(identities, identity)
        try:
            async with await raw_client(b, key):
                pass
            with pytest.raises(asyncssh.PermissionDenied):
                await raw_client(b, stranger)
            assert b.rung.drops["ssh: refused key of no current member"] == 1
        finally:
            await close_all(a, b)

    run(main())


def test_shell_exec_pty_and_forwarding_refused(identities: list[NodeIdentity], member_key: tuple[asyncssh.SSHKey, NodeIdentity]) -> None:
    key, identity = member_key

    async def main() -> None:
        a, b = await pair_and_member(identities, identity)
        try:
            async with await raw_client(b, key) as conn:
                for attempt in (
                    conn.create_process("id"),
                    conn.create_process(),  # a shell
                    conn.create_process(subsystem="sftp"),
                    conn.create_process(subsystem="tunnelmesh", term_type="xterm"),
                ):
                    with pytest.raises(asyncssh.ChannelOpenError):
                        await attempt
                with pytest.raises(asyncssh.ChannelOpenError):
                    await conn.open_connection("127.0.0.1", a.rung.port)
                with pytest.raises(asyncssh.ChannelOpenError):
                    await conn.open_unix_connection("/run/sshd.sock")
                with pytest.raises(asyncssh.ChannelListenError):
                    await conn.forward_remote_port("127.0.0.1", 0, "127.0.0.1", 1)
            for cause in ("exec request", "shell request", "unknown subsystem", "port forwarding"):
                assert b.rung.drops[f"ssh: refused {cause}"] >= 1, (cause, b.rung.drops)
            with pytest.raises(asyncssh.PermissionDenied):  # no password logins, whatever the password
                await asyncssh.connect("127.0.0.1", b.rung.port, username="tunnelmesh", password="x",
                                       client_keys=None, known_hosts=None, config=None, agent_path=None)
            assert not b.sink.ups
        finally:
            await close_all(a, b)

    run(main())


# --- Hostile and stuck peers ------------------------------------------------------------------


class RawSession(asyncssh.SSHClientSession[bytes]):
    def __init__(self) -> None:
        self.data = bytearray()
        self.closed = asyncio.Event()

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        self.data += data

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed.set()


@pytest.mark.parametrize(
    "garbage, counter, reason",
    [
        (frame(b"ok") + b"\xff\xff" + bytes(100), "ssh: oversize frame", "peer sent an oversize frame"),
        (frame(b"ok") + b"\x00\x00", "ssh: bad frame", "peer sent a bad frame"),
    ],
)
def test_bad_frames_count_and_close(
    identities: list[NodeIdentity], member_key: tuple[asyncssh.SSHKey, NodeIdentity], garbage: bytes, counter: str, reason: str
) -> None:
    key, identity = member_key

    async def main() -> None:
        a, b = await pair_and_member(identities, identity)
        try:
            async with await raw_client(b, key) as conn:
                chan, session = await conn.create_session(RawSession, subsystem="tunnelmesh", encoding=None)
                chan.write(garbage)
                async with asyncio.timeout(5):
                    await session.closed.wait()
            assert b.rung.drops[counter] == 1
            assert [m for _, m in b.sink.received] == [b"ok"]
            assert [r for _, r in b.sink.downs] == [reason]
            assert b.rung.status()["links"] == 0
        finally:
            await close_all(a, b)

    run(main())


def test_a_peer_that_stops_reading_costs_drops_not_memory(
    identities: list[NodeIdentity], member_key: tuple[asyncssh.SSHKey, NodeIdentity]
) -> None:
    key, identity = member_key

    async def main() -> None:
        a, b = await pair_and_member(identities, identity)
        try:
            async with await raw_client(b, key) as conn:
                chan, session = await conn.create_session(RawSession, subsystem="tunnelmesh", encoding=None)
                chan.pause_reading()  # and so the SSH window is never opened again
                await b.sink.until(lambda: b.sink.ups)
                link = b.sink.ups[0]
                assert isinstance(link, SshLink)
                message = bytes(1400)
                deadline = time.monotonic() + 10
                for _ in range(400):  # 400 loop turns of 64 sends: ~36 MB offered
                    for _ in range(64):
                        link.send(message)
                    await asyncio.sleep(0)
                    queued = link._stream.get_write_buffer_size() + len(link._pending)
                    assert queued <= SEND_BUFFER_LIMIT + 64 * len(frame(message))
                    if time.monotonic() > deadline:
                        break
                assert b.rung.drops["ssh: send buffer full"] > 10000
                assert not link.closed  # slow is not hostile: the link stays
        finally:
            await close_all(a, b)

    run(main())


# --- One link per pair -------------------------------------------------------------------------


def test_simultaneous_dials_leave_one_link_on_both_sides(identities: list[NodeIdentity]) -> None:
    async def main() -> None:
        _, a, b = await pair(identities)
        try:
            for _ in range(3):  # the race goes differently each time; the answer must not
                await asyncio.gather(a.rung.dial(b.wg), b.rung.dial(a.wg))
                winner = min(a.wg, b.wg)

                def settled() -> bool:  # the losing connection's close has reached both sides
                    kept = (a.rung.link(b.wg), b.rung.link(a.wg))
                    return (all(link is not None and link.dialler == winner for link in kept)
                            and a.rung.status()["links"] == 1 and b.rung.status()["links"] == 1)

                await until("both sides keep only the link the lower key dialled", settled)
                kept_a, kept_b = a.rung.link(b.wg), b.rung.link(a.wg)
                assert kept_a is not None and kept_b is not None
                kept_a.send(b"ping")
                await b.sink.until(lambda: any(m == b"ping" for _, m in b.sink.received))
                assert [src for src, m in b.sink.received if m == b"ping"] == [kept_b]
                b.sink.received.clear()
                kept_a.close()
                await b.sink.until(lambda: b.rung.link(a.wg) is None)
        finally:
            await close_all(a, b)

    run(main())


# --- An identity held by ssh-agent ----------------------------------------------------------------


@pytest.fixture
def agent_with_key(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    if not all(shutil.which(t) for t in ("ssh-agent", "ssh-add")):
        unavailable("needs OpenSSH's ssh-agent and ssh-add (run tools/setup.sh)")
    sock = str(tmp_path / "agent.sock")
    proc = subprocess.Popen(["ssh-agent", "-D", "-a", sock], env={"PATH": "/usr/bin:/bin"},
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 5
        while not os.path.exists(sock):
            assert time.monotonic() < deadline and proc.poll() is None, "ssh-agent did not start"
            time.sleep(0.01)
        key = write_key(tmp_path / "agent_id")
        subprocess.run(["ssh-add", str(key)], env={"SSH_AUTH_SOCK": sock, "PATH": "/usr/bin:/bin"},
                       check=True, capture_output=True, stdin=subprocess.DEVNULL, timeout=10)
        yield sock, key
    finally:
        proc.kill()
        proc.wait(timeout=5)


def test_agent_held_identity_dials(identities: list[NodeIdentity], agent_with_key: tuple[str, Path]) -> None:
    sock, _ = agent_with_key

    async def main() -> None:
        directory, a, b = await pair(identities)
        agent_identity = await load_identity_agent(None, agent_path=sock)
        directory.members[agent_identity.public.ssh_public_key] = agent_identity.public.wg_public_key
        dialler = await make_node(agent_identity, directory, serve=False)
        try:
            link = await dialler.rung.dial(b.wg)
            link.send(b"from the agent's key")
            await b.sink.until(lambda: b.sink.received)
            assert b.sink.received[0][0].peer_key == agent_identity.public.wg_public_key
        finally:
            await close_all(a, b, dialler)

    run(main())


# --- The daemon's end of the bridge, without sshd (tests/e2e/test_ssh_bridge.py has sshd) -----


def test_bridge_socket_header_membership_and_frames(identities: list[NodeIdentity], tmp_path: Path) -> None:
    async def main() -> None:
        directory, a, b = await pair(identities)
        socket_path = tmp_path / "bridge.sock"
        await b.rung.start_bridge(socket_path, {os.getuid()})
        assert socket_path.stat().st_mode & 0o777 == 0o660
        assert b.rung.status()["bridge"] == str(socket_path)
        a_b64 = base64.b64encode(a.wg).decode()
        try:
            for header, cause in (
                (b"GET / HTTP/1.0\n", "bridge bad header"),
                (b"tunnelmesh-bridge 1 " + b"A" * 200, "bridge bad header"),
                (f"tunnelmesh-bridge 1 {base64.b64encode(bytes(32)).decode()}\n".encode(), "bridge key of no current member"),
            ):
                reader, writer = await asyncio.open_unix_connection(str(socket_path))
                writer.write(header)
                async with asyncio.timeout(5):
                    assert await reader.read() == b""  # closed on us
                writer.close()
                assert b.rung.drops[f"ssh: refused {cause}"] >= 1
            reader, writer = await asyncio.open_unix_connection(str(socket_path))
            writer.write(f"tunnelmesh-bridge 1 {a_b64}\n".encode() + frame(b"hello"))  # frames may follow at once
            await b.sink.until(lambda: b.sink.received)
            link = b.sink.ups[0]
            assert (link.peer_key, link.description) == (a.wg, "ssh-bridge (local sshd)")
            assert b.sink.received == [(link, b"hello")]
            link.send(b"back")
            decoder = FrameDecoder()
            async with asyncio.timeout(5):
                assert [bytes(m) for m in decoder.feed(await reader.readexactly(6))] == [b"back"]
            writer.close()
            await b.sink.until(lambda: b.sink.downs)
            assert b.sink.downs == [(link, "the bridge command exited")]
        finally:
            await close_all(a, b)
        assert not socket_path.exists()

    run(main())


def test_the_host_key_is_made_without_following_a_planted_link(tmp_path: Path) -> None:
    """The host key goes through the one writer: a symlink at the old fixed temp name is
    neither followed nor truncated (issue 13, defect 7)."""
    victim = tmp_path / "victim"
    victim.write_text("keep me")
    path = tmp_path / "ssh_host_key"
    (tmp_path / f".{path.name}.tmp").symlink_to(victim)
    key = load_or_create_host_key(path)
    assert victim.read_text() == "keep me"
    assert (path.stat().st_mode & 0o777) == 0o600 and load_or_create_host_key(path).public_data == key.public_data
