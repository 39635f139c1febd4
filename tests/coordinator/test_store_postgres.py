"""Several coordinators on one PostgreSQL database (docs/coordinator.md, "Running several
coordinators"), each a store of its own on a real server: a commit through one reaches
the others' version and listeners by NOTIFY, a lost listener connection is noticed and
caught up with, and admissions made through both at once never give an address twice
nor use an invite beyond its limit (the writers' lock makes a check inside a transaction
hold at its commit)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.coordinator.test_store import add
from tests.support.coordinator import World
from tests.support.databases import Database, postgres_database
from tests.support.wait import until
from tunnelmesh.coordinator.store import Store, open_store
from tunnelmesh.coordinator.store.base import CATCH_UP_INTERVAL
from tunnelmesh.coordinator.store.postgres import CHANNEL, PostgresStore
from tunnelmesh.coordinator.store.schema import MIGRATIONS

#: The invite the concurrent admissions share, and how many uses it grants.
INVITE, INVITE_USES = "invite-key", 2


@pytest.fixture(scope="module")
def world() -> World:
    return World.create()


@pytest.fixture
def pg(postgres_server: Any, tmp_path: Path) -> Database:
    return postgres_database(postgres_server, tmp_path)


@asynccontextmanager
async def two_coordinators(db: Database) -> AsyncIterator[tuple[Store, Store]]:
    """Two stores on `db`, as two coordinators have them."""
    first = await open_store(db.url)
    try:
        second = await open_store(db.url)
        try:
            yield first, second
        finally:
            await second.close()
    finally:
        await first.close()


def test_coordinators_starting_together_on_a_new_database_set_it_up_once(pg: Database) -> None:
    async def scenario() -> None:
        stores = await asyncio.gather(*(open_store(pg.url) for _ in range(3)))
        try:
            assert [store.version for store in stores] == [0, 0, 0]
        finally:
            for store in stores:
                await store.close()

    asyncio.run(scenario())
    assert pg.query("SELECT id, version FROM schema_version") == [(1, len(MIGRATIONS))]


def test_a_commit_through_one_coordinator_moves_the_others_version_and_wakes_its_listeners(
        pg: Database, world: World) -> None:
    async def scenario() -> None:
        async with two_coordinators(pg) as (first, second):
            heard: dict[Store, list[int]] = {first: [], second: []}
            for store in (first, second):
                store.add_listener(lambda store=store: heard[store].append(store.version))  # type: ignore[misc]
            assert first.poll_interval is None and second.poll_interval is None  # both listening

            await first.set_network(world.network.to_wire())
            await until("the second coordinator hears of the network", lambda: second.version == 1)
            await add(first, world, 0, "admin", 1)
            await until("the second coordinator hears of the admin", lambda: second.version == 2)
            await first.use_invite("k", {})  # not part of the map: nobody is told
            await add(second, world, 1, "one", 2)  # the other way round
            await until("the first coordinator hears of the new member", lambda: first.version == 3)
            assert heard == {first: [1, 2, 3], second: [1, 2, 3]}  # every move once, no catch_up asked
            one = await first.member_named("one")
            assert one is not None and one.version == 3

    asyncio.run(scenario())


def test_a_lost_listener_connection_is_polled_for_until_catch_up_listens_again(pg: Database, world: World) -> None:
    async def scenario() -> None:
        async with two_coordinators(pg) as (first, second):
            heard: list[int] = []
            second.add_listener(lambda: heard.append(second.version))
            await first.set_network(world.network.to_wire())
            await until("the second coordinator hears of the network", lambda: second.version == 1)

            killed = pg.query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE "
                              "datname = current_database() AND query LIKE 'LISTEN%'")
            assert killed == [(True,), (True,)]  # each coordinator's listener connection
            await until("the second coordinator notices it no longer hears",
                        lambda: second.poll_interval == CATCH_UP_INTERVAL)
            await add(first, world, 0, "admin", 1)
            assert first.version == 2 and second.version == 1 and heard == [1]  # no NOTIFY reaches it now

            await second.catch_up()  # what a waiting long-poll does every poll_interval
            assert second.version == 2 and heard == [1, 2] and second.poll_interval is None  # listening again
            await add(first, world, 1, "one", 2)
            await until("the second coordinator hears at once again", lambda: second.version == 3)
            assert heard == [1, 2, 3]

    asyncio.run(scenario())


def test_a_writer_cancelled_waiting_for_the_lock_or_holding_it_leaves_the_lock_free(pg: Database,
                                                                                    world: World) -> None:
    """A request whose client went away is cancelled wherever it is; its transaction is
    rolled back before its connection goes back to the pool, and the writers' lock, which
    every coordinator on the database waits for, is free again."""
    def lock_waiters() -> int:
        return int(pg.query("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted")[0][0])

    async def scenario() -> None:
        reported: list[str] = []  # asyncpg tells the loop of a connection reset mid-transaction
        asyncio.get_running_loop().set_exception_handler(lambda _, context: reported.append(context["message"]))
        async with two_coordinators(pg) as (first, second):
            await first.set_network(world.network.to_wire())
            holding = asyncio.Event()

            async def hold() -> None:
                async with first.transaction():
                    await add(first, world, 0, "admin", 1)
                    holding.set()
                    await asyncio.Event().wait()  # until cancelled

            holder = asyncio.create_task(hold())
            await holding.wait()
            waiter = asyncio.create_task(add(second, world, 1, "one", 2))
            await until("the second coordinator waits for the writers' lock", lambda: lock_waiters() == 1)
            for task in (waiter, holder):
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
            assert await second.members() == [] and await second.read_version() == 1
            assert await asyncio.wait_for(add(second, world, 1, "one", 2), 10) == 2  # the lock is free
            assert await asyncio.wait_for(add(first, world, 0, "admin", 1), 10) == 3
        assert reported == []
        assert pg.query("SELECT count(*) FROM pg_stat_activity WHERE state LIKE 'idle in transaction%'") == [(0,)]

    asyncio.run(scenario())


# --- admissions through two coordinators at once --------------------------------------------------


async def pause(turns: int) -> None:
    """Let the other admissions run `turns` times (hypothesis picks where)."""
    for _ in range(turns):
        await asyncio.sleep(0)


async def join(store: Store, world: World, i: int, invited: bool, turns: int) -> tuple[str, int]:
    """A join as the service admits it: the address chosen when the join was proposed
    (outside any transaction, so another coordinator may take it meanwhile), then checked
    and stored in one transaction, the invite's uses counted there too. (outcome, host)."""
    host = await store.free_host()
    await pause(turns)
    wire = world.admin_member(i, f"node{i}", host)
    async with store.transaction():
        if await store.host_taken(host):
            return "address taken", host
        await pause(turns)
        if invited:
            if await store.invite_uses(INVITE) >= INVITE_USES:
                return "used up", host
            await pause(turns)
            await store.use_invite(INVITE, {"uses": INVITE_USES})
        await store.add_member(wire, world.entry(wire), host)
    return "joined", host


async def use_invite(store: Store, turns: int) -> tuple[str, int]:
    async with store.transaction():
        if await store.invite_uses(INVITE) >= INVITE_USES:
            return "used up", 0
        await pause(turns)
        await store.use_invite(INVITE, {"uses": INVITE_USES})
    return "used", 0


#: (which coordinator, what, turns given to the others at each step); one node each.
admissions = st.lists(st.tuples(st.integers(0, 1), st.sampled_from(["join", "invited join", "invite"]),
                                st.integers(0, 3)), min_size=2, max_size=6)


@settings(max_examples=25, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(steps=admissions)
def test_concurrent_admissions_through_two_coordinators_never_give_an_address_twice_nor_overuse_an_invite(
        pg: Database, world: World, steps: list[tuple[int, str, int]]) -> None:
    async def scenario() -> None:
        async with two_coordinators(pg) as stores:
            for table in ("members", "invites"):  # the database is the test's; each example starts afresh
                pg.execute(f"DELETE FROM {table}")
            if await stores[0].network() is None:
                await stores[0].set_network(world.network.to_wire())
            before = await stores[0].read_version()
            outcomes = await asyncio.gather(*(
                use_invite(stores[which], turns) if what == "invite"
                else join(stores[which], world, i, what == "invited join", turns)
                for i, (which, what, turns) in enumerate(steps)))  # a StoreError (UNIQUE) fails the test

            members = await stores[1].members()
            joined = [host for outcome, host in outcomes if outcome == "joined"]
            assert sorted(m.host for m in members) == sorted(joined) and len(set(joined)) == len(joined)
            assert all(host in joined for outcome, host in outcomes if outcome == "address taken")
            consumed = sum(1 for (outcome, _), (_, what, _) in zip(outcomes, steps)
                           if outcome == "used" or (outcome == "joined" and what == "invited join"))
            uses = await stores[1].invite_uses(INVITE)
            assert uses == consumed <= INVITE_USES
            if any(outcome == "used up" for outcome, _ in outcomes):
                assert uses == INVITE_USES  # refused only at the limit
            version = before + len(joined)
            assert await stores[0].read_version() == version
            await until("both coordinators know the last version",
                        lambda: stores[0].version == stores[1].version == version)

    asyncio.run(scenario())


def test_a_notification_without_a_coordinators_mac_is_ignored_and_counted(pg: Database, world: World) -> None:
    """Any role that may connect may NOTIFY on any channel: a forged version (which would
    make every long-poll return at once, forever), a forged pending or punch, a replayed
    payload with another MAC: all ignored, counted; a real change is still heard."""
    async def scenario() -> None:
        async with two_coordinators(pg) as (first, second):
            assert isinstance(second, PostgresStore)
            await first.set_network(world.network.to_wire())
            await until("the second coordinator hears of the network", lambda: second.version == 1)
            woken: list[str] = []
            second.add_pending_listener(lambda: woken.append("pending"))
            second.add_punch_listener(lambda asker, peer: woken.append("punch"))
            outsider = await asyncpg.connect(pg.url)
            try:
                for payload in ("1000000", "pending", "punch a b", "AAAAAAAAAAAAAAAAAAAAAA 1000000",
                                second._mac("999") + " 1000000", "", "x y"):
                    await outsider.execute("SELECT pg_notify($1, $2)", CHANNEL, payload)
                await until("all seven counted", lambda: second.forged_notifications == 7)
            finally:
                await outsider.close()
            assert second.version == 1 and woken == []
            await add(first, world, 0, "admin", 1)  # a coordinator's own: heard
            await until("the real change is heard", lambda: second.version == 2)

    asyncio.run(scenario())
