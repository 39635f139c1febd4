"""The WebSocket relay end to end on 127.0.0.1: a real aiohttp server with `Relay`
(bare, or inside the coordinator), real `RelayClient`s and raw aiohttp WebSocket
clients with real SSH identities, and WireGuard messages made by the real core.

What must hold: members reach each other both ways; the source of every frame is
the sender's authenticated key; strangers, bad and replayed signatures are
refused (and logged once); garbage is a counted drop; a reader that stops costs
the relay a bounded queue, not memory; a revoked member is cut off; and
nothing the relay forwards contains the plaintext.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.support.coordinator import (
    AdminMachine,
    World,
    identities,
    join,
    now,
    running,
    set_up,
)
from tests.support.wait import until
from tests.support.wire import PeerPair
from tunnelmesh.coordinator import relay as relay_module
from tunnelmesh.coordinator.client import Coordinator
from tunnelmesh.coordinator.relay import MembershipUnknown, Relay
from tunnelmesh.coordinator.app import serve
from tunnelmesh.identity import NodeIdentity, PublicIdentity
from tunnelmesh.links import MAX_MESSAGE, Link
from tunnelmesh.links.relay import (
    COORDINATOR_RELAY,
    NAMESPACE,
    OK,
    QUEUE_BYTES,
    QUEUE_FRAMES,
    RelayClient,
    auth_message,
)
from tunnelmesh.membership import Revocation

NETWORK = "SHA256:relay-test-network"
LOG = "tunnelmesh.coordinator.relay"


@pytest.fixture(scope="module", autouse=True)
def _identities() -> None:
    identities()  # made outside the tests' event loops (loading one runs a loop of its own)


def key(i: int) -> bytes:
    return identities()[i].public.wg_public_key


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


class Sink:
    """A LinkSink that keeps everything it is told."""

    def __init__(self) -> None:
        self.up: list[Link] = []
        self.down: list[tuple[Link, str]] = []
        self.received: list[tuple[bytes, bytes]] = []

    def link_up(self, link: Link) -> None:
        self.up.append(link)

    def link_down(self, link: Link, reason: str) -> None:
        self.down.append((link, reason))

    def receive(self, link: Link, message: bytes | bytearray | memoryview) -> None:
        self.received.append((link.peer_key, bytes(message)))


def scenario(coroutine: Awaitable[Any], timeout: float = 60.0) -> Any:
    async def bounded() -> Any:
        return await asyncio.wait_for(coroutine, timeout)
    return asyncio.run(bounded())


@asynccontextmanager
async def relay_server(members: dict[bytes, PublicIdentity | None]) -> AsyncIterator[tuple[str, Relay]]:
    """A bare app with only the relay, over `members` (change the dict, then call
    member_changed; a key mapped to None: its membership cannot be checked now)."""
    async def identity_for(wg_key: bytes) -> PublicIdentity | None:
        if wg_key in members and members[wg_key] is None:
            raise MembershipUnknown("the database cannot be reached")
        return members.get(wg_key)

    relay = Relay(NETWORK, identity_for)
    app = web.Application()
    app.router.add_get("/relay", relay.handler)

    async def close(app: web.Application) -> None:
        await relay.close()

    app.on_shutdown.append(close)
    runner = await serve(app, "127.0.0.1", 0)
    try:
        host, port = runner.addresses[0][:2]
        yield f"http://{host}:{port}", relay
    finally:
        await runner.cleanup()


def members(*indices: int) -> dict[bytes, PublicIdentity]:
    return {key(i): identities()[i].public for i in indices}


@asynccontextmanager
async def client(url: str, i: int, *, network: str = NETWORK, connected: bool = True
                 ) -> AsyncIterator[tuple[RelayClient, Sink]]:
    """A RelayClient of identity i, running; waits until it is connected (unless told not to)."""
    sink = Sink()
    relay_client = RelayClient(url, identities()[i], network, sink)
    task = asyncio.create_task(relay_client.run())
    try:
        if connected:
            await until(f"client {i} is connected", lambda: relay_client.state == "connected" or task.done())
            if task.done():
                task.result()
        yield relay_client, sink
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def raw_auth(http: aiohttp.ClientSession, url: str, signer: NodeIdentity, *, claim: bytes | None = None,
                   relay: str = COORDINATOR_RELAY) -> tuple[aiohttp.ClientWebSocketResponse, str]:
    """A raw WebSocket that answers the challenge with `signer`'s signature for the key `claim`
    (its own by default), meant for relay `relay`; the socket and the auth message it sent."""
    ws = await http.ws_connect(url + "/relay")
    hello = json.loads((await ws.receive()).data)
    assert hello["relay"] == 1 and hello["network"] == NETWORK
    wg_key = signer.public.wg_public_key if claim is None else claim
    signature = await signer.sign(auth_message(NETWORK, base64.b64decode(hello["challenge"]), wg_key, relay),
                                  NAMESPACE)
    auth = json.dumps({"wg_key": b64(wg_key), "sig": b64(signature)})
    await ws.send_str(auth)
    return ws, auth


async def member(http: aiohttp.ClientSession, url: str, i: int) -> aiohttp.ClientWebSocketResponse:
    ws, _ = await raw_auth(http, url, identities()[i])
    answer = await ws.receive()
    assert answer.data == OK, answer
    return ws


async def closed_with(ws: aiohttp.ClientWebSocketResponse) -> tuple[int, str]:
    message = await ws.receive()
    assert message.type is aiohttp.WSMsgType.CLOSE, message
    return message.data, message.extra


def test_two_members_exchange_messages_both_ways() -> None:
    async def run() -> None:
        async with relay_server(members(1, 2)) as (url, relay):
            async with client(url, 1) as (one, one_sink), client(url, 2) as (two, two_sink):
                to_two, to_one = one.link(key(2)), two.link(key(1))
                assert one.link(key(2)) is to_two and to_two.rung == "relay" and to_two.description == f"relay {url}"
                assert to_two in one_sink.up  # made while connected: up at once
                to_two.send(b"\x04hello two" + bytes(100))
                to_one.send(bytearray(b"\x04hello one"))
                to_one.send(memoryview(b"\x01" + bytes(MAX_MESSAGE - 1)))  # the largest message passes
                await until("both got theirs", lambda: len(two_sink.received) == 1 and len(one_sink.received) == 2)
                assert two_sink.received == [(key(1), b"\x04hello two" + bytes(100))]
                assert one_sink.received == [(key(2), b"\x04hello one"), (key(2), b"\x01" + bytes(MAX_MESSAGE - 1))]
                # The link the relay's frame arrived on is the one this node uses for that peer.
                assert one.link(key(2)) is to_two and two.link(key(1)) is to_one
                assert relay.status()["connections"] == 2 and relay.drops == {}
                assert one.status()["state"] == "connected" and one.error is None and one.drops == {}

    scenario(run())


def test_links_are_stable_across_reconnects_and_count_drops_while_down() -> None:
    async def run() -> None:
        current = members(1, 2)
        async with relay_server(current) as (url, relay):
            async with client(url, 1) as (one, sink), client(url, 2) as (_, two_sink):
                link = one.link(key(2))
                del current[key(1)]
                relay.member_changed()  # one is cut off ...
                await until("one is down", lambda: one.state != "connected")
                assert sink.down and sink.down[-1][0] is link and "no longer a member" in sink.down[-1][1]
                link.send(b"lost")
                assert one.drops["relay: not connected"] == 1 and link.drops is one.drops
                current[key(1)] = identities()[1].public  # ... and let back in: it reconnects after 1 s
                await until("one is back", lambda: one.state == "connected", 5)
                assert sink.up.count(link) == 2 and one.link(key(2)) is link
                link.send(b"found")
                await until("two got it", lambda: two_sink.received == [(key(1), b"found")])
                link.close()
                link.send(b"closed")
                assert one.drops["relay: link closed"] == 1 and one.link(key(2)) is not link

    scenario(run())


def test_the_source_is_the_authenticated_sender_never_the_frame(caplog: pytest.LogCaptureFixture) -> None:
    async def run() -> None:
        async with relay_server(members(1, 2, 3)) as (url, relay), aiohttp.ClientSession() as http:
            async with client(url, 2) as (_, two_sink):
                mallory = await member(http, url, 3)
                # The frame's only key is the destination; whatever follows is the message.
                await mallory.send_bytes(key(2) + key(1) + b"\x04from one, honest")
                await until("two got it", lambda: len(two_sink.received) == 1)
                assert two_sink.received == [(key(3), key(1) + b"\x04from one, honest")]
                # Claiming another member's key with one's own signature is refused.
                ws, _ = await raw_auth(http, url, identities()[3], claim=key(1))
                code, reason = await closed_with(ws)
                assert code == 4001 and "does not verify" in reason
                assert relay.refusals == {"bad signature": 1}
                await mallory.close()

    with caplog.at_level(logging.WARNING, LOG):
        scenario(run())


def test_an_answer_meant_for_another_relay_is_refused() -> None:
    """A member serving a relay could hand another relay's challenge to a member logging in
    to it, and pass the answer on: the answer names the relay it was meant for."""
    async def run() -> None:
        async with relay_server(members(1, 2)) as (url, relay), aiohttp.ClientSession() as http:
            ws, _ = await raw_auth(http, url, identities()[1], relay=b64(key(2)))  # meant for 2's relay
            code, reason = await closed_with(ws)
            assert code == 4001 and "does not verify" in reason
            assert relay.status()["connections"] == 0
            node_relay = Relay(NETWORK, members(1, 2).get, b64(key(2)))
            assert node_relay.relay == b64(key(2))

    scenario(run())


def test_strangers_bad_and_replayed_signatures_are_refused_and_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    async def run() -> None:
        async with relay_server(members(1, 2)) as (url, relay), aiohttp.ClientSession() as http:
            for _ in range(3):
                ws, _ = await raw_auth(http, url, identities()[5])
                assert await closed_with(ws) == (4001, relay_module.AUTH_FAILED_REASON)
            # A good answer to one challenge is worth nothing against the next.
            first, auth = await raw_auth(http, url, identities()[1])
            assert (await first.receive()).data == OK
            await first.close()
            for _ in range(2):
                replay = await http.ws_connect(url + "/relay")
                await replay.receive()
                await replay.send_str(auth)
                code, reason = await closed_with(replay)
                assert code == 4001 and "does not verify" in reason
            for garbage in ("{}", "[]", "not json", json.dumps({"wg_key": "x", "sig": "y"}), "x" * 10_000):
                ws = await http.ws_connect(url + "/relay")
                await ws.receive()
                await ws.send_str(garbage)
                code, _ = await closed_with(ws)
                assert code == 4000
            ws = await http.ws_connect(url + "/relay")
            await ws.receive()
            await ws.send_bytes(b"\x00" * 64)
            assert (await closed_with(ws))[0] == 4000
            # A RelayClient that is not a member says why.
            async with client(url, 4, connected=False) as (stranger, _):
                await until("the stranger gives up", lambda: stranger.state == "unreachable")
                assert "4001" in (stranger.error or "") and "not a member" in (stranger.error or "")
            assert relay.refusals == {"not a member": 4, "bad signature": 2, "malformed": 6}
            assert relay.status()["connections"] == 0

    with caplog.at_level(logging.WARNING, LOG):
        scenario(run())
    refused = [r.getMessage() for r in caplog.records if r.name == LOG and "refused" in r.getMessage()]
    strangers = [line for line in refused if b64(key(5)) in line]
    assert len(strangers) == 1 and "not a member" in strangers[0], refused
    assert len([line for line in refused if "does not verify" in line]) == 1, refused


def test_strangers_cannot_tell_member_keys_from_others(monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 13, defect 9a: "not a member" and "bad signature" were told apart (4003 / 4001),
    so anyone could ask the relay whether a key is a member. Now one answer, after one
    signature check either way (a stranger's against the key its signature names)."""
    checks: list[str] = []
    verify = relay_module.verify_sshsig

    def counted(key: str, *args: Any) -> None:
        checks.append(key.split(" ")[0])
        verify(key, *args)

    monkeypatch.setattr(relay_module, "verify_sshsig", counted)

    async def answer(http: aiohttp.ClientSession, url: str, wg_key: bytes, sig: str | None,
                     signer: NodeIdentity | None = None) -> tuple[int, str]:
        if signer is not None:
            ws, _ = await raw_auth(http, url, signer, claim=wg_key)
        else:
            ws = await http.ws_connect(url + "/relay")
            await ws.receive()
            await ws.send_str(json.dumps({"wg_key": b64(wg_key), "sig": sig}))
        return await closed_with(ws)

    async def run() -> None:
        async with relay_server(members(1, 2)) as (url, relay), aiohttp.ClientSession() as http:
            stranger, member_key = identities()[5], key(1)
            answers = {
                "stranger, its own good signature": await answer(http, url, stranger.public.wg_public_key, None,
                                                                 stranger),
                "member's key, another key's signature": await answer(http, url, member_key, None, stranger),
                "member's key, a signature for another key": await answer(http, url, member_key, None,
                                                                          identities()[3]),
                "stranger, garbage signature": await answer(http, url, stranger.public.wg_public_key, b64(b"x" * 64)),
                "member's key, garbage signature": await answer(http, url, member_key, b64(b"x" * 64)),
            }
            assert len(set(answers.values())) == 1, answers
            assert answers["member's key, garbage signature"] == (4001, relay_module.AUTH_FAILED_REASON)
            # A signature is checked for members and strangers alike (the garbage ones too).
            assert len(checks) == 5
            assert relay.refusals == {"not a member": 2, "bad signature": 3}

    scenario(run())


def test_a_silent_client_is_refused_after_the_auth_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(relay_module, "AUTH_TIMEOUT", 0.3)

    async def run() -> None:
        async with relay_server(members(1)) as (url, relay), aiohttp.ClientSession() as http:
            ws = await http.ws_connect(url + "/relay")
            await ws.receive()
            code, reason = await closed_with(ws)
            assert code == 4008 and "no authentication within 0.3 s" in reason
            assert relay.refusals == {"timed out": 1}

    scenario(run())


def test_garbage_frames_are_counted_drops_and_the_connection_lives_on() -> None:
    async def run() -> None:
        async with relay_server(members(1, 2)) as (url, relay), aiohttp.ClientSession() as http:
            async with client(url, 2) as (_, two_sink):
                one = await member(http, url, 1)
                for frame in (b"", b"\x01", key(2), key(2) + bytes(MAX_MESSAGE + 1), key(5) + b"\x04to nobody",
                              key(4) + b"\x04not connected"):
                    await one.send_bytes(frame)
                await one.send_str("text after auth")
                await one.send_bytes(key(2) + b"\x04still here")
                await until("two got the good one", lambda: two_sink.received == [(key(1), b"\x04still here")])
                assert relay.drops == {"short frame": 3, "oversize frame": 1, "destination not connected": 2,
                                       "text frame": 1}
                # Far beyond any message: aiohttp ends that connection (1009); the relay serves on.
                await one.send_bytes(key(2) + bytes(relay_module.READ_LIMIT + 1))
                code, _ = await closed_with(one)
                assert code == aiohttp.WSCloseCode.MESSAGE_TOO_BIG
                await until("the relay counted it", lambda: relay.drops["protocol error"] == 1)
                again = await member(http, url, 1)
                await again.send_bytes(key(2) + b"\x04back")
                await until("two got it", lambda: len(two_sink.received) == 2)
                await again.close()

    scenario(run())


def test_a_reader_that_stops_costs_a_bounded_queue_and_blocks_no_one() -> None:
    async def run() -> None:
        async with relay_server(members(1, 2, 3)) as (url, relay), aiohttp.ClientSession() as http:
            async with client(url, 3) as (_, three_sink):
                stalled = await member(http, url, 2)  # authenticates, then never reads again
                one = await member(http, url, 1)
                frame = key(2) + b"\x04" + bytes(8191)
                worst = (0, 0)
                for n in range(4000):  # 32 MiB: more than the socket buffers on the way can hold
                    await one.send_bytes(frame)
                    if n % 200 == 0:
                        await asyncio.sleep(0)
                        peer = relay.status()["peers"][b64(key(2))]
                        worst = max(worst, (peer["queued"], peer["queued_bytes"]))
                await one.send_bytes(key(3) + b"\x04meanwhile")
                await until("three is served meanwhile", lambda: three_sink.received == [(key(1), b"\x04meanwhile")])
                await until("the relay read it all", lambda: sum(relay.drops.values()) > 0 and
                            relay.status()["peers"][b64(key(2))]["queued"] > 0)
                peer = relay.status()["peers"][b64(key(2))]
                worst = max(worst, (peer["queued"], peer["queued_bytes"]))
                assert relay.drops["receiver slow"] > 1000, relay.drops
                assert worst[0] <= QUEUE_FRAMES and worst[1] <= QUEUE_BYTES, worst
                await stalled.close()
                await one.close()

    scenario(run(), timeout=120)


def test_a_new_connection_of_the_same_member_replaces_the_old() -> None:
    async def run() -> None:
        async with relay_server(members(1)) as (url, relay), aiohttp.ClientSession() as http:
            old = await member(http, url, 1)
            new = await member(http, url, 1)
            assert await closed_with(old) == (4009, "replaced by a newer connection of the same member")
            assert relay.status()["connections"] == 1
            await new.close()
            await until("it is gone", lambda: relay.status()["connections"] == 0)

    scenario(run())


def test_a_connection_cut_off_forwards_nothing_while_it_closes() -> None:
    async def run() -> None:
        current = members(1, 2)
        async with relay_server(current) as (url, relay), aiohttp.ClientSession() as http:
            one, two = await member(http, url, 1), await member(http, url, 2)
            del current[key(1)]
            relay.member_changed()  # 1 is asked to close; it does not read, so its close waits
            await one.send_bytes(key(2) + b"sent after the cut")
            with pytest.raises(TimeoutError):
                await two.receive(timeout=0.5)
            await until("1 is gone", lambda: relay.status()["connections"] == 1)
            await one.close()
            await two.close()

    scenario(run())


def test_the_coordinator_relays_for_members_and_cuts_off_a_revoked_one(tmp_path: Path) -> None:
    world = World.create()

    async def run() -> None:
        async with running(tmp_path / "coordinator.db") as (url, _):
            async with aiohttp.ClientSession() as http:
                with pytest.raises(aiohttp.WSServerHandshakeError) as early:
                    await http.ws_connect(url + "/relay")
                assert early.value.status == 503  # no network yet: nothing to relay for
            admin_node = await set_up(url, world)
            machine = AdminMachine.create(tmp_path / "admin", url, world, admin_node)
            async with machine.admitting():  # the admin's machine countersigns the two joins
                one = (await join(url, world, 1, world.invite(), "one"))["member"]
                await join(url, world, 2, world.invite(), "two")
            network = world.network.network
            sinks = [Sink(), Sink()]
            clients = [RelayClient(url, world.nodes[i], network, sinks[i - 1]) for i in (1, 2)]
            tasks = [asyncio.create_task(c.run()) for c in clients]
            try:
                await until("both connected", lambda: all(c.state == "connected" for c in clients))
                clients[0].link(world.nodes[2].public.wg_public_key).send(b"\x04via the coordinator")
                await until("two got it", lambda: sinks[1].received == [
                    (world.nodes[1].public.wg_public_key, b"\x04via the coordinator")])
                revocation = Revocation.create(world.admin, world.entry(one), now())
                async with Coordinator(url, admin=world.admin) as admin:
                    await admin.revoke(revocation.to_wire())
                await until("one is cut off", lambda: clients[0].state != "connected", 3)
                assert "no longer a member" in sinks[0].down[-1][1]
                await until("one is refused from now on", lambda: "not a member" in (clients[0].error or ""), 5)
                assert clients[1].state == "connected"
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

    scenario(run())


def test_what_the_relay_forwards_never_contains_the_plaintext() -> None:
    """Two real WireGuard cores handshake and talk through the relay; everything it
    delivered is captured, and the inner payload appears in none of it."""
    secret = b"the relay must never see this plaintext"

    async def run() -> None:
        pair = PeerPair()
        async with relay_server(members(1, 2)) as (url, _):
            async with client(url, 1) as (one, a_sink), client(url, 2) as (two, b_sink):
                to_b, to_a = one.link(key(2)), two.link(key(1))

                done = [0, 0]  # how many of b's and a's received messages went into the cores

                async def carry() -> None:
                    """Move whatever the cores queued through the relay, until the wire is quiet."""
                    for _ in range(10):
                        if not (pair.a.transmits or pair.b.transmits):
                            return
                        want = [done[0] + len(pair.a.transmits), done[1] + len(pair.b.transmits)]
                        for datagram, _ in pair.a.transmits:
                            to_b.send(datagram)
                        for datagram, _ in pair.b.transmits:
                            to_a.send(datagram)
                        pair.a.transmits.clear()
                        pair.b.transmits.clear()
                        await until("the relay delivered", lambda: [len(b_sink.received), len(a_sink.received)] == want)
                        for _, message in b_sink.received[done[0]:]:
                            pair.inject("b", message)
                        for _, message in a_sink.received[done[1]:]:
                            pair.inject("a", message)
                        done[:] = want
                    raise AssertionError("the wire did not go quiet")

                pair.a_peer.send_handshake_initiation(pair.now, pair.wall)
                await carry()
                assert pair.a_peer.current is not None and pair.b_peer.current is not None
                pair.send("a", secret)
                pair.send("b", secret[::-1])
                await carry()
                assert any(secret in packet for packet in pair.delivered_to_b)
                assert any(secret[::-1] in packet for packet in pair.delivered_to_a)
                forwarded = [message for _, message in a_sink.received + b_sink.received]
                assert len(forwarded) >= 4  # initiation, response, and the two data messages
                for message in forwarded:
                    assert secret not in message and secret[::-1] not in message and secret[:12] not in message

    scenario(run())


def test_membership_that_cannot_be_checked_keeps_a_connected_member_and_asks_a_new_one_to_try_later() -> None:
    """The coordinator's database out of reach: a recheck keeps who is connected (a member
    is not cut off for that), a newcomer is told 1013 'try again later', and the checks a
    burst of changes starts run one at a time."""
    async def run() -> None:
        current: dict[bytes, PublicIdentity | None] = dict(members(1, 2))
        async with relay_server(current) as (url, relay), aiohttp.ClientSession() as http:
            one = await member(http, url, 1)
            current[key(1)] = None  # its membership cannot be checked now
            for _ in range(5):
                relay.member_changed()
            await until("the checks are done", lambda: not relay._checking)
            assert relay.status()["connections"] == 1  # kept
            current[key(2)] = None
            ws, _ = await raw_auth(http, url, identities()[2])
            assert await closed_with(ws) == (relay_module.TRY_LATER, "the relay cannot check membership now; "
                                                                     "try again later")
            assert relay.refusals["membership unknown"] == 1
            del current[key(1)]  # now it can be told: no longer a member
            relay.member_changed()
            assert await closed_with(one) == (relay_module.NOT_MEMBER, "no longer a member of this network")

    scenario(run())
