"""Several coordinators on one PostgreSQL database (docs/coordinator.md, "Running several
coordinators"): two real coordinator apps, each over its own store (its own connection
pool and LISTEN connection), on one real throwaway PostgreSQL database.

- a change made through one reaches long-polls held by the other at once (NOTIFY), a
  revocation within 10 s;
- a node moving to the other coordinator with the version it has gets only what changed;
- concurrent joins through both never give an address twice nor use a one-time invite
  beyond its uses, whatever the interleaving (hypothesis picks who joins where, with
  which invite, in which order).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.coordinator import SECRET, AdminMachine, World, join, join_request, now, serve_store, set_up
from tests.support.databases import Database, postgres_database
from tests.support.wait import until
from tunnelmesh.admission import sealed_secret
from tunnelmesh.coordinator import service
from tunnelmesh.coordinator.client import Coordinator, CoordinatorError
from tunnelmesh.coordinator.store import open_store
from tunnelmesh.membership import InviteGrant, Revocation, b64

#: The issue's bound for a revocation to reach the nodes of another coordinator.
REVOCATION_BOUND = 10.0


@pytest.fixture(scope="module")
def world() -> World:
    return World.create()


@asynccontextmanager
async def two_coordinators(db: Database, world: World, *, admit: bool = True
                           ) -> AsyncIterator[tuple[str, str, AdminMachine]]:
    """Coordinators A and B on `db` (the network set up through A) and the admin's machine,
    countersigning through A in the background unless not `admit`: (url A, url B, machine)."""
    async with AsyncExitStack() as stack:
        urls = []
        for _ in range(2):
            store = await open_store(db.url)
            stack.push_async_callback(store.close)
            urls.append(await stack.enter_async_context(serve_store(store)))
        admin_node = await set_up(urls[0], world)
        machine = AdminMachine.create(db.home, urls[0], world, admin_node)
        if admit:
            await stack.enter_async_context(machine.admitting())
        yield urls[0], urls[1], machine


@pytest.fixture
def holding(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The `since` of every map long-poll a coordinator starts to hold (a spy around the real
    wait, which runs unchanged): the signal that a poll reached its coordinator."""
    held: list[int] = []
    hold = service._Service._wait_past

    async def spied(self: Any, since: int, wait: float, **kwargs: Any) -> None:
        if wait > 0:
            held.append(since)
        await hold(self, since, wait, **kwargs)

    monkeypatch.setattr(service._Service, "_wait_past", spied)
    return held


def test_a_revocation_through_one_coordinator_reaches_long_polls_on_the_other(
        postgres_server: Any, tmp_path: Path, world: World, holding: list[int]) -> None:
    db = postgres_database(postgres_server, tmp_path)

    async def scenario() -> float:
        async with two_coordinators(db, world) as (a, b, _):
            one = await join(a, world, 1, world.invite(), "one")
            await join(b, world, 2, world.invite(), "two")  # joined through the other: the same network
            async with Coordinator(b, identity=world.nodes[2]) as two:
                current = await two.map(0, 0)
                assert {world.entry(m).name for m in current["members"]} == {"admin", "one", "two"}
                poll = asyncio.ensure_future(two.map(current["version"], 25))
                await until("B holds the poll", lambda: current["version"] in holding)  # before the change
                revocation = Revocation.create(world.admin, world.entry(one["member"]), now()).to_wire()
                started = time.monotonic()
                async with Coordinator(a, admin=world.admin) as admin:
                    await admin.revoke(revocation)
                update = await asyncio.wait_for(poll, REVOCATION_BOUND + 5)
                took = time.monotonic() - started
            assert update["revocations"] == [revocation] and update["version"] > current["version"]
            return took

    took = asyncio.run(scenario())
    assert took < REVOCATION_BOUND, f"the revocation took {took:.1f} s to reach the other coordinator's node"


def test_a_node_moving_to_the_other_coordinator_gets_only_what_changed(
        postgres_server: Any, tmp_path: Path, world: World) -> None:
    db = postgres_database(postgres_server, tmp_path)

    async def scenario() -> None:
        async with two_coordinators(db, world) as (a, b, _):
            await join(a, world, 1, world.invite(), "one")
            async with Coordinator(a, identity=world.nodes[1]) as on_a:
                seen = await on_a.map(0, 0)
                await on_a.register(51820, ["192.0.2.10:51820"])
            await join(a, world, 3, world.invite(), "three")
            async with Coordinator(b, identity=world.nodes[1]) as on_b:  # a failover, version in hand
                delta = await on_b.map(seen["version"], 0)
            assert not delta["full"]
            assert {world.entry(m).name for m in delta["members"]} == {"one", "three"}  # its register, the newcomer
            assert "192.0.2.10:51820" in delta["endpoints"][b64(world.nodes[1].public.wg_public_key)]["addresses"]

    asyncio.run(scenario())


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(plan=st.lists(st.tuples(st.sampled_from("ab"), st.sampled_from(["shared", "own"])), min_size=2, max_size=5),
       order=st.randoms(use_true_random=False))
def test_concurrent_joins_through_two_coordinators_never_share_an_address_nor_overuse_an_invite(
        postgres_server: Any, tmp_path_factory: pytest.TempPathFactory, world: World, plan: list[tuple[str, str]],
        order: Any) -> None:
    db = postgres_database(postgres_server, tmp_path_factory.mktemp("joins"))
    shared = world.invite(uses=1)  # one-time: at most one of those who hold it gets in

    async def attempt(url: str, i: int, token: Any) -> str:
        try:
            result = await join(url, world, i, token, f"node{i}")
        except CoordinatorError as exc:
            assert exc.status in (403, 409, 410), str(exc)  # refused with a reason, never a 5xx
            return f"refused {exc.status}"
        return "joined" if result.get("member") else "pending"

    async def scenario() -> tuple[list[str], list[Any]]:
        async with two_coordinators(db, world) as (a, b, _):
            joins = [attempt(a if where == "a" else b, i, shared if which == "shared" else world.invite())
                     for i, (where, which) in enumerate(plan, start=1)]
            order.shuffle(joins)
            outcomes = await asyncio.gather(*joins)
        return outcomes, db.query("SELECT host, wg_key FROM members")

    outcomes, members = asyncio.run(scenario())
    hosts = [host for host, _ in members]
    assert len(hosts) == len(set(hosts)), f"an address given twice: {members}"
    holders = {b64(world.nodes[i].public.wg_public_key) for i, (_, which) in enumerate(plan, start=1)
               if which == "shared"}
    assert len(holders & {key for _, key in members}) <= 1, "a one-time invite let two nodes in"
    used = db.query("SELECT used FROM invites WHERE invite_key = ?",
                    b64(InviteGrant.from_wire(shared.grant, world.admin.public).invite_key))
    assert used in ([], [(1,)]), used
    own = sum(1 for _, which in plan if which == "own")
    assert outcomes.count("joined") >= own, outcomes  # a join with an invite of its own is never refused


def test_two_approvals_of_one_one_time_invite_through_two_coordinators_admit_one(
        postgres_server: Any, tmp_path: Path, world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """The coordinators' own check, apart from the admin machine's ledger (which refuses a
    second use too): two joins with one one-time invite wait, one at each coordinator; the
    admin's approvals of both, one through each, at once: one is admitted, the other is
    410, and the invite counts one use."""
    monkeypatch.setattr(service, "COUNTERSIGN_WAIT", 0.2)
    db = postgres_database(postgres_server, tmp_path)
    token = world.invite(uses=1)

    async def approve(url: str, i: int, name: str, host: int) -> int:
        member = world.admin_member(i, name, host)
        async with Coordinator(url, admin=world.admin) as admin:
            try:
                await admin.approve(member, sealed_secret(world.entry(member), SECRET, 0))
            except CoordinatorError as exc:
                assert exc.status in (409, 410) and "already used" in str(exc), str(exc)
                return exc.status
        return 200

    async def scenario() -> list[int]:
        async with two_coordinators(db, world, admit=False) as (a, b, _):
            for url, i, name in ((a, 1, "one"), (b, 2, "two")):
                waiting = await join(url, world, i, token, name)
                assert waiting.get("countersign") is True, waiting  # held for the admin's machine
            return await asyncio.gather(approve(a, 1, "one", 2), approve(b, 2, "two", 3))

    assert sorted(asyncio.run(scenario())) == [200, 410]
    used = db.query("SELECT used FROM invites WHERE invite_key = ?",
                    b64(InviteGrant.from_wire(token.grant, world.admin.public).invite_key))
    assert used == [(1,)]


def test_a_punch_asked_through_one_coordinator_reaches_the_peer_long_polling_the_other(
        postgres_server: Any, tmp_path: Path, world: World, holding: list[int]) -> None:
    db = postgres_database(postgres_server, tmp_path)

    async def scenario() -> None:
        async with two_coordinators(db, world) as (a, b, _):
            await join(a, world, 1, world.invite(), "one")
            await join(b, world, 2, world.invite(), "two")
            key_one, key_two = (world.nodes[i].public.wg_public_key for i in (1, 2))
            async with Coordinator(a, identity=world.nodes[1]) as one, \
                    Coordinator(b, identity=world.nodes[2]) as two:
                version = (await one.map(0, 0, punch=True))["version"]  # each takes notices where it polls
                await two.map(version, 0, punch=True)
                polls = [asyncio.ensure_future(node.map(version, 20, punch=True)) for node in (one, two)]
                await until("both polls are held", lambda: holding.count(version) == 2)
                assert await one.punch(key_two) == {"told": True}  # at A, naming a peer that polls B
                replies = await asyncio.wait_for(asyncio.gather(*polls), 10.0)  # woken, not timed out
                assert replies[0]["punch"] == [{"peer": b64(key_two)}]
                assert replies[1]["punch"] == [{"peer": b64(key_one)}]
                assert replies[1]["version"] == version  # only the notice woke B's poll
                assert await one.punch(key_two) == {"told": False}  # the pair was told: within PAIR_INTERVAL

    asyncio.run(scenario())


def test_a_database_failure_is_503_that_names_no_connection_string(
        postgres_server: Any, tmp_path: Path, world: World) -> None:
    """The answer says what failed, not where the database is (host, user, name): that
    stays in the coordinator's log."""
    db = postgres_database(postgres_server, tmp_path)

    async def scenario() -> CoordinatorError:
        async with two_coordinators(db, world) as (a, _, _):
            db.execute("DROP TABLE pending")  # the database broken under the coordinator
            with pytest.raises(CoordinatorError) as info:
                await join(a, world, 1, world.invite(), "one")
            return info.value

    error = asyncio.run(scenario())
    assert error.status == 503 and "(its PostgreSQL database)" in str(error), str(error)
    assert db.url.split("?")[0] not in str(error) and "host=" not in str(error)


def test_two_approvals_giving_one_address_through_two_coordinators_admit_one(
        postgres_server: Any, tmp_path: Path, world: World) -> None:
    """Two joins by approval wait (one asked at each coordinator); two approvals giving
    both the same free address (each made from a listing taken before the other joined),
    one through each coordinator at once: one is admitted, the other is told the address
    was taken meanwhile (409), and the address is held once."""
    db = postgres_database(postgres_server, tmp_path)

    async def approve(url: str, i: int, name: str) -> int:
        member = world.admin_member(i, name, 2)  # both at host 2, the lowest free one
        async with Coordinator(url, admin=world.admin) as admin:
            try:
                await admin.approve(member, sealed_secret(world.entry(member), SECRET, 0))
            except CoordinatorError as exc:
                assert exc.status == 409 and "taken meanwhile" in str(exc), str(exc)
                return exc.status
        return 200

    async def scenario() -> list[int]:
        async with two_coordinators(db, world, admit=False) as (a, b, _):
            await join_request(a, world, 1, "one")
            await join_request(b, world, 2, "two")
            return await asyncio.gather(approve(a, 1, "one"), approve(b, 2, "two"))

    assert sorted(asyncio.run(scenario())) == [200, 409]
    assert db.query("SELECT count(*) FROM members WHERE host = 2") == [(1,)]
