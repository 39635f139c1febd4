"""The SSH rung's own server before anyone has logged in, real asyncssh on 127.0.0.1: any
bytes instead of SSH, a client that connects and says nothing (dropped after the login
timeout), and a flood of connections that never log in (bounded: the excess is dropped at
once and counted, and a member gets in once the flood is gone) (issue 17, part 5)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncssh
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.links import Directory, new_identity
from tests.links.test_ssh import Node, Sink, run
from tunnelmesh.identity import NodeIdentity
from tunnelmesh.links import LinkError
from tunnelmesh.links.ssh import SshRung

LOGIN_TIMEOUT = 0.3  # the server's, short so that a silent client is dropped quickly here
CLOSE_BOUND = 10.0  # generous: how long any pre-login connection may live here
REFUSED_FLOOD = "ssh: refused too many connections not logged in"


@pytest.fixture(scope="module")
def identities() -> list[NodeIdentity]:
    return [new_identity() for _ in range(2)]


@asynccontextmanager
async def server_and_member(identities: list[NodeIdentity], *, login_timeout: float = LOGIN_TIMEOUT,
                            max_unauthenticated: int = 64,
                            max_unauthenticated_per_source: int = 64) -> AsyncIterator[tuple[Node, Node]]:
    """(server, member): a rung serving on 127.0.0.1 and a member that can dial it."""
    directory = Directory()
    for identity in identities:
        directory.members[identity.public.ssh_public_key] = identity.public.wg_public_key
    nodes = []
    for identity, serve in zip(identities, (True, False)):
        host_key = asyncssh.generate_private_key("ssh-ed25519")
        sink = Sink()
        rung = SshRung(identity=identity, host_key=host_key, port=0 if serve else None, directory=directory,
                       sink=sink, listen_host="127.0.0.1", login_timeout=login_timeout,
                       max_unauthenticated=max_unauthenticated,
                       max_unauthenticated_per_source=max_unauthenticated_per_source)
        await rung.start()
        nodes.append(Node(identity, host_key, sink, rung))
    server, member = nodes
    directory.where[server.wg] = [server.target()]
    try:
        yield server, member
    finally:
        for node in nodes:
            await node.rung.close()


async def closed_after(port: int, data: bytes) -> tuple[float, bytes]:
    """Connect, send `data` (and keep our end open): how long until the server closed its
    end, and what it sent."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    started = time.monotonic()
    try:
        writer.write(data)
        received = b""
        async with asyncio.timeout(CLOSE_BOUND):
            with_reset = False
            try:
                while chunk := await reader.read(65536):
                    received += chunk
            except ConnectionResetError:
                with_reset = True
        assert with_reset or reader.at_eof()
        return time.monotonic() - started, received
    finally:
        writer.close()


async def member_gets_in(server: Node, member: Node) -> None:
    link = await member.rung.dial(server.wg)
    await server.sink.until(lambda: server.sink.ups)
    assert link.peer_key == server.wg and server.sink.ups[-1].peer_key == member.wg
    link.close()


VERSION = b"SSH-2.0-hostile\r\n"
garbage = st.one_of(
    st.binary(max_size=4096),
    st.binary(max_size=4096).map(lambda b: VERSION + b),  # a version line, then anything
    st.binary(min_size=1, max_size=64).map(lambda b: b * (20_000 // len(b) + 1)),  # past the banner line limit
)


@settings(max_examples=40, deadline=None)
@given(garbage)
def test_garbage_before_login_is_dropped_and_the_server_goes_on(identities: list[NodeIdentity], data: bytes) -> None:
    async def main() -> None:
        async with server_and_member(identities) as (server, member):
            assert server.rung.port is not None
            took, answer = await closed_after(server.rung.port, data)
            assert took < LOGIN_TIMEOUT + CLOSE_BOUND
            assert answer == b"" or answer.startswith(b"SSH-2.0-")  # its version, then at most a kexinit/disconnect
            assert not server.rung._unauthenticated and not server.sink.ups
            await member_gets_in(server, member)

    run(main())


@pytest.mark.parametrize("said", [b"", VERSION, VERSION[:5]], ids=["nothing", "version only", "half a version"])
def test_a_silent_client_is_dropped_after_the_login_timeout(identities: list[NodeIdentity], said: bytes) -> None:
    async def main() -> float:
        async with server_and_member(identities) as (server, _):
            assert server.rung.port is not None
            took, _answer = await closed_after(server.rung.port, said)
            assert not server.rung._unauthenticated
            return took

    # The default login timeout is 10 s: closed within CLOSE_BOUND, it was the configured one.
    assert run(main()) < CLOSE_BOUND


def test_a_flood_of_connections_not_logged_in_is_bounded_and_counted(
    identities: list[NodeIdentity], caplog: pytest.LogCaptureFixture
) -> None:
    cap, flood = 8, 200

    async def main() -> None:
        # A login timeout far longer than the test: the excess must go at once, not time out.
        async with server_and_member(identities, login_timeout=60.0, max_unauthenticated=cap) as (server, member):
            assert server.rung.port is not None
            conns = [await asyncio.open_connection("127.0.0.1", server.rung.port) for _ in range(flood)]
            try:
                async with asyncio.timeout(CLOSE_BOUND):  # every one of them taken in by the server
                    while server.rung.drops[REFUSED_FLOOD] < flood - cap:
                        await asyncio.sleep(0.01)
                assert len(server.rung._unauthenticated) == cap
                assert server.rung.drops[REFUSED_FLOOD] == flood - cap
                async with asyncio.timeout(CLOSE_BOUND):  # the refused are closed, not held
                    assert len(await conns[-1][0].read()) < 256  # at most the server's version line
                with pytest.raises(LinkError):  # a member too must wait for the flood to pass
                    await member.rung.dial(server.wg)
            finally:
                for _, writer in conns:
                    writer.close()
            async with asyncio.timeout(CLOSE_BOUND):
                while server.rung._unauthenticated:
                    await asyncio.sleep(0.01)
            await member_gets_in(server, member)
            assert not server.rung._unauthenticated  # a logged-in member does not hold a slot

    caplog.set_level(logging.INFO, logger="tunnelmesh.ssh")
    run(main())
    refusals = [r.getMessage() for r in caplog.records if "not logged in already" in r.getMessage()]
    assert len(refusals) == 1  # once per address a minute, however many


def test_a_flood_from_one_address_leaves_room_for_members_elsewhere(identities: list[NodeIdentity]) -> None:
    per_source, flood = 4, 100
    hostile = "127.0.0.2"  # the member dials from 127.0.0.1

    async def main() -> None:
        async with server_and_member(identities, login_timeout=60.0, max_unauthenticated=64,
                                     max_unauthenticated_per_source=per_source) as (server, member):
            assert server.rung.port is not None
            conns = [await asyncio.open_connection("127.0.0.1", server.rung.port, local_addr=(hostile, 0))
                     for _ in range(flood)]
            try:
                async with asyncio.timeout(CLOSE_BOUND):
                    while server.rung.drops[REFUSED_FLOOD] < flood - per_source:
                        await asyncio.sleep(0.01)
                assert sorted(server.rung._unauthenticated.values()) == [hostile] * per_source
                await member_gets_in(server, member)  # while the flood holds its share
            finally:
                for _, writer in conns:
                    writer.close()

    run(main())
