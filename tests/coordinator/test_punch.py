"""`POST /v1/punch` end to end: the aiohttp service on 127.0.0.1 over a real SQLite file,
driven through the client with real SSH identities. Both members are told through their
long-polls at once; a node that does not take notices is never sent the key its parser
would refuse; requests are member-signed and rate-limited per pair and per node."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from tests.support.coordinator import World, join, serving
from tests.support.databases import Database
from tunnelmesh.coordinator import punch
from tunnelmesh.coordinator.client import Coordinator, CoordinatorError
from tunnelmesh.membership import PeerMap, b64


@pytest.fixture(scope="module")
def world() -> World:
    return World.create()


class Clock:
    """The coordinator's monotonic clock, moved by the test (the rate limits' time)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@asynccontextmanager
async def members(db: Database, world: World, clock: Clock) -> AsyncIterator[tuple[str, Coordinator, Coordinator]]:
    """A coordinator on `clock` with members "one" and "two" (identities 1 and 2), and a
    client signed by each."""
    async with serving(db, world, monotonic=clock) as served:
        await join(served.url, world, 1, world.invite(), "one")
        await join(served.url, world, 2, world.invite(), "two")
        async with Coordinator(served.url, identity=world.nodes[1]) as one, \
                Coordinator(served.url, identity=world.nodes[2]) as two:
            yield served.url, one, two


async def fails(call: object, status: int, text: str) -> None:
    with pytest.raises(CoordinatorError) as info:
        await call  # type: ignore[misc]
    assert info.value.status == status and text in str(info.value), str(info.value)


def test_both_members_are_told_through_their_long_polls(database: Database, world: World) -> None:
    clock = Clock()

    async def scenario() -> None:
        async with members(database, world, clock) as (url, one, two):
            key_one, key_two = (world.nodes[i].public.wg_public_key for i in (1, 2))
            version = (await one.map(0, 0))["version"]
            # Neither has said it takes notices: refused, and nothing is queued for later.
            await fails(one.punch(key_two), 409, "punch=1")
            await one.map(version, 0, punch=True)
            if database.backend == "sqlite":  # one coordinator: it knows two takes no notices
                await fails(one.punch(key_two), 409, "takes no punch notices")
            else:  # two may long-poll another coordinator on the database: the request is announced to them
                assert await one.punch(key_two) == {"told": True}
                assert (await one.map(version, 0, punch=True))["punch"] == [{"peer": b64(key_two)}]
                clock.now += punch.PAIR_INTERVAL
            await two.map(version, 0, punch=True)

            polls = [asyncio.create_task(node.map(version, 20, punch=True)) for node in (one, two)]
            assert await one.punch(key_two) == {"told": True}
            replies = await asyncio.wait_for(asyncio.gather(*polls), 10.0)  # woken, not timed out
            assert replies[0]["punch"] == [{"peer": b64(key_two)}]
            assert replies[1]["punch"] == [{"peer": b64(key_one)}]
            assert replies[0]["version"] == version  # the map did not change: only the notice woke it

            # Within PAIR_INTERVAL the pair was told already, whoever asks.
            assert await two.punch(key_one) == {"told": False}
            assert "punch" not in await one.map(version, 0, punch=True)
            clock.now += punch.PAIR_INTERVAL
            assert await two.punch(key_one) == {"told": True}

            # A poll without punch=1 (a node from before punching) never gets the key,
            # and its map parser takes the reply; the notice stays for a punch=1 poll.
            plain = await one.map(0, 0)
            assert "punch" not in plain
            PeerMap(world.network, key_one).apply(plain)
            assert (await one.map(version, 0, punch=True))["punch"] == [{"peer": b64(key_two)}]

            # Notices expire unread.
            clock.now += punch.PAIR_INTERVAL
            assert await one.punch(key_two) == {"told": True}
            clock.now += punch.NOTICE_TTL
            assert "punch" not in await two.map(version, 0, punch=True)

    asyncio.run(scenario())


def test_refusals_and_the_per_node_limit(database: Database, world: World) -> None:
    clock = Clock()

    async def scenario() -> None:
        async with members(database, world, clock) as (url, one, two):
            key_one, key_two = (world.nodes[i].public.wg_public_key for i in (1, 2))
            async with Coordinator(url, identity=world.nodes[3]) as outsider, Coordinator(url) as anonymous:
                for node in (one, two):
                    await node.map(0, 0, punch=True)
                await fails(one.punch(key_one), 400, "itself")
                await fails(one.punch(world.nodes[4].public.wg_public_key), 404, "no member")
                await fails(one._call("POST", "/v1/punch", {"peer": "not base64!"}, sign="member"), 400, "peer")
                await fails(one._call("POST", "/v1/punch", {"peer": b64(key_two), "x": 1}, sign="member"), 400, "x")
                await fails(outsider.punch(key_two), 401, "not a member")
                await fails(anonymous._call("POST", "/v1/punch", {"peer": b64(key_two)}), 401, "")

                told = [(await one.punch(key_two))["told"] for _ in range(punch.NODE_LIMIT)]
                assert told == [True] + [False] * (punch.NODE_LIMIT - 1)
                await fails(one.punch(key_two), 429, f"at most {punch.NODE_LIMIT}")
                assert (await two.punch(key_one))["told"] is False  # the other node has its own allowance
                clock.now += punch.NODE_WINDOW
                for node in (one, two):
                    await node.map(0, 0, punch=True)  # still taking notices, after so long
                assert (await one.punch(key_two))["told"] is True

    asyncio.run(scenario())
