"""The coordinator's HTTP API end to end: the aiohttp service on 127.0.0.1 over a real
SQLite file, driven through the client with real SSH identities. Every refusal
must say why and leave every table exactly as it was."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator, Awaitable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.support.databases import Database, assert_no_secret, sqlite_database
from tests.support.coordinator import (
    JSON,
    SECRET,
    World,
    confirmed,
    identities,
    invited,
    join,
    join_request,
    now,
    post_from,
    prepare,
    request_body,
    row_counts,
    running,
    serving,
    set_up,
    snapshot,
)
from tests.support.rsa import attested_line, rsa_key_with_exponent
from tests.support.wait import until
from tunnelmesh import network as admin_commands
from tunnelmesh.admission import sealed_secret
from tunnelmesh.config import read_network_secret
from tunnelmesh.coordinator import guards, service
from tunnelmesh.coordinator.bodies import MAX_SSH_OFFER
from tunnelmesh.coordinator.client import Coordinator, CoordinatorError, Revoked
from tunnelmesh.coordinator.guards import MAX_BODY
from tunnelmesh.coordinator.store import PendingRow, StoreError
from tunnelmesh.coordinator.store.sqlite import SqliteStore
from tunnelmesh.membership import (
    JOIN_WINDOW,
    REQUEST_NAMESPACE,
    MemberEntry,
    NetworkInfo,
    PeerMap,
    RequestAuth,
    Revocation,
    SecretRecord,
    Token,
    b64,
    request_message,
    sign_admin_request,
    unb64,
    unseal,
)
from tunnelmesh.netstate import save_network_secret
from tunnelmesh.ratelimit import Rate, RateLimiter


@pytest.fixture(scope="module")
def world() -> World:
    return World.create()


@pytest.fixture
def db(database: Database) -> Database:
    """Every test here runs on both backends (tests/conftest.py `database`)."""
    return database


@asynccontextmanager
async def with_network(db: Database, world: World, **options: Any) -> AsyncIterator[str]:
    """A running coordinator that holds the world's network (admin node at host 1), with
    the admin's machine countersigning joins with an invite as they come."""
    async with serving(db, world, **options) as served:
        yield served.url


async def refused(db: Path, call: Awaitable[Any], status: int, pattern: str) -> CoordinatorError:
    """`call` fails with `status` and a message matching `pattern`, and changes no row."""
    before = snapshot(db)
    with pytest.raises(CoordinatorError) as info:
        await call
    assert info.value.status == status, str(info.value)
    assert re.search(pattern, str(info.value)), str(info.value)
    assert snapshot(db) == before
    return info.value


def key(world: World, i: int) -> str:
    return b64(world.nodes[i].public.wg_public_key)


async def revoke(url: str, world: World, member: JSON) -> JSON:
    revocation = Revocation.create(world.admin, world.entry(member), now()).to_wire()
    async with Coordinator(url, admin=world.admin) as admin:
        await admin.revoke(revocation)
    return revocation


def test_setup_takes_one_network_idempotently(db: Path, tmp_path: Path, world: World) -> None:
    other = World.create()

    async def scenario() -> None:
        async with running(db) as (url, _):
            async with Coordinator(url) as anyone:
                await refused(db, anyone.network(), 503, "no network yet")
            admin_node = await set_up(url, world)
            async with Coordinator(url) as anyone:
                assert await anyone.network() == world.network.to_wire()
            async with Coordinator(url, admin=world.admin) as admin:
                assert (await admin.setup(world.network.to_wire(), admin_node))["created"] is False
            async with Coordinator(url, admin=other.admin) as rogue:
                await refused(db, rogue.setup(other.network.to_wire(), None), 409, "already serves network")
                await refused(db, rogue.setup(world.network.to_wire(), None), 401, "not this network's admin")
        assert row_counts(db)["members"] == 1

        only = tmp_path / "only.db"
        async with running(only, admin_fingerprint=world.admin.fingerprint) as (url, _):
            async with Coordinator(url, admin=other.admin) as rogue:
                await refused(only, rogue.setup(other.network.to_wire(), None), 403, "serves only network")
            await set_up(url, world)

    asyncio.run(scenario())


def test_join_by_invite_end_to_end(db: Database, world: World) -> None:
    async def scenario() -> JSON:
        async with with_network(db, world) as url:
            return await join(url, world, 1, world.invite(), "one")

    result = asyncio.run(scenario())
    network = NetworkInfo.from_wire(result["network"], world.admin.fingerprint)
    member = MemberEntry.from_wire(result["member"], network)
    assert (member.name, member.ipv4, member.wg_key) == ("one", network.host(2)[0], world.nodes[1].public.wg_public_key)
    assert member.grant is None and set(result["member"]) == {"body", "admin_sig"}  # countersigned by the admin
    assert result["secret"]["epoch"] == 0  # sealed by the admin's machine, which holds the secret
    assert unseal(world.nodes[1].static_private, unb64(result["secret"]["sealed"], "sealed")) == SECRET
    peer_map = PeerMap(network, member.wg_key)
    changes = peer_map.apply(result["map"])
    assert changes.rejected == [] and [m.name for m in changes.added] == ["admin"]
    # The pending row stays (approved) until it expires: a joiner that lost the answer asks again.
    assert row_counts(db) == {"network": 1, "members": 2, "invites": 1, "revocations": 0, "pending": 1, "policy": 0}


def test_one_time_invite_is_used_up_even_between_propose_and_confirm(db: Database, world: World) -> None:
    async def scenario() -> None:
        async with with_network(db, world) as url:
            token = world.invite()
            first = await prepare(url, world, 1, token, "one")
            second = await prepare(url, world, 2, token, "two")  # proposals store nothing
            async with Coordinator(url) as anyone:
                await anyone.confirm(*first)
                await refused(db, anyone.confirm(*second), 410, "^the invite was already used")
            await refused(db, join(url, world, 3, token, "three"), 410, "^the invite was already used")

    asyncio.run(scenario())


def test_expired_invite_is_refused_at_propose_and_at_confirm(db: Database, world: World) -> None:
    shift = [0.0]

    async def scenario() -> None:
        async with with_network(db, world, clock=lambda: time.time() + shift[0]) as url:
            old = world.invite(created=now() - 7200, expires=now() - 3600)
            await refused(db, join(url, world, 1, old, "one"), 410,
                          r"^the invite expired at \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC")
            short = world.invite(expires=now() + 60)
            entry, proof = await prepare(url, world, 1, short, "one")
            shift[0] = 120  # it expires before the joiner confirms
            async with Coordinator(url) as anyone:
                await refused(db, anyone.confirm(entry, proof), 410, "expired")

    asyncio.run(scenario())


def test_forged_grant_and_foreign_token_are_refused(db: Database, world: World) -> None:
    other = World.create()
    foreign = other.invite()
    body = dict(foreign.grant["body"], network=world.admin.fingerprint)
    forged = Token(foreign.url, world.admin.fingerprint, {"body": body, "sig": other.admin.sign("invite", body)},
                   foreign.invite_seed)

    async def scenario() -> None:
        async with with_network(db, world) as url:
            await refused(db, join(url, world, 1, forged, "one"), 403, "not signed by this network's admin key")
            entry, proof = await invited(world, 1, world.body(1, "one", 2), forged)  # straight to confirm
            async with Coordinator(url) as anyone:
                await refused(db, anyone.confirm(entry, proof), 403, "not signed by this network's admin key")
            await refused(db, join(url, world, 1, foreign, "one"), 403,
                          f"not this network \\({re.escape(world.admin.fingerprint)}\\)")

    asyncio.run(scenario())


def test_cloned_key_and_taken_name_are_conflicts(db: Database, world: World) -> None:
    async def scenario() -> None:
        async with with_network(db, world) as url:
            await join(url, world, 1, world.invite(), "one")
            await refused(db, join(url, world, 1, world.invite(), "copy"), 409, r"cloned machine.*--new-key")
            await refused(db, join(url, world, 2, world.invite(), "one"), 409, "'one' is taken")
            named = world.invite(name="fixed")
            await refused(db, join(url, world, 2, named, "other"), 403, "for the name 'fixed'")
            assert MemberEntry.from_wire((await join(url, world, 2, named))["member"], world.network).name == "fixed"

    asyncio.run(scenario())


def test_join_proof_and_clock_are_checked_at_confirm(db: Database, world: World) -> None:
    async def scenario() -> None:
        async with with_network(db, world) as url:
            token = world.invite(created=now() - 1000)
            entry, _ = await prepare(url, world, 1, token, "one")
            _, wrong = await prepare(url, world, 2, token, "one")  # another key's proof
            stale, stale_proof = await invited(world, 1, world.body(1, "one", 2, joined=now() - JOIN_WINDOW - 60), token)
            async with Coordinator(url) as anyone:
                await refused(db, anyone.confirm(entry, wrong), 401, "did not prove it holds its identity key")
                await refused(db, anyone.confirm(stale, stale_proof), 403, "off the coordinator's clock")

    asyncio.run(scenario())


def test_revoked_key_needs_an_invite_newer_than_the_revocation(db: Database, world: World) -> None:
    async def scenario() -> None:
        async with with_network(db, world) as url:
            reusable = world.invite(uses=0)
            first = await join(url, world, 1, reusable, "one")
            revocation = await revoke(url, world, first["member"])
            await refused(db, join(url, world, 1, reusable, "one"), 403,
                          "^this key was revoked; ask the admin for a new invite$")
            again = await join(url, world, 1, world.invite(created=now() + 1), "one")
            async with Coordinator(url, identity=world.nodes[1]) as one:
                update = await one.map(0, 0)  # a member again, not refused as revoked
            assert update["revocations"] == [revocation]
            peer_map = PeerMap(world.network, world.nodes[2].public.wg_public_key)
            assert "one" in {m.name for m in peer_map.apply(update).added}
            assert again["member"] in update["members"]

    asyncio.run(scenario())


def test_join_by_approval(db: Database, world: World) -> None:
    async def scenario() -> None:
        async with serving(db, world) as served:
            url, machine = served.url, served.machine
            first = await join_request(url, world, 2, "late")
            assert first == {"pending": True, "name": "late"}  # no address: nothing is reserved
            assert await join_request(url, world, 2, "late") == first
            await refused(db, join_request(url, world, 3, "skewed", t=now() - JOIN_WINDOW - 60), 403, "clock")

            async with Coordinator(url, admin=world.admin) as admin:
                waiting = await admin.pending()
                ipv4, ipv6 = map(str, world.network.host(2))
                assert [(p["kind"], p["name"], p["fingerprint"], p["ipv4"], p["ipv6"]) for p in waiting] == [
                    ("request", "late", world.nodes[2].fingerprint, ipv4, ipv6)]
                sealed = sealed_secret(world.entry(world.admin_member(2, "late", 2)), SECRET, 0)
                await refused(db, admin.approve(world.admin_member(2, "renamed", 2), sealed), 409,
                              "does not match the pending join")
                await refused(db, admin.approve(world.admin_member(4, "nobody", 6), sealed), 404, "no pending join")
                await refused(db, admin.approve(world.admin_member(2, "late", 1), sealed), 409,
                              "address 100.64.0.1 was taken meanwhile")
                for wrong in ({"epoch": 0}, {"epoch": "0", "sealed": ""}, {"epoch": 0, "sealed": "!"},
                              {"epoch": 0, "sealed": "A" * 400}, "sealed"):
                    await refused(db, admin.approve(world.admin_member(2, "late", 2), wrong), 400,  # type: ignore[arg-type]
                                  "secret must be|sealed secret|secret epoch")
            # What `tunnelmesh approve late --fingerprint ...` does on the admin's machine.
            approved = await admin_commands.approve(machine.paths, "late", world.nodes[2].fingerprint)
            async with Coordinator(url, admin=world.admin) as admin:
                assert await admin.pending() == []
            result = await join_request(url, world, 2, "late")
            assert result["member"] == approved.to_wire() and approved.ipv4 == world.network.host(2)[0]
            assert unseal(world.nodes[2].static_private, unb64(result["secret"]["sealed"], "sealed")) == SECRET
            assert approved.to_wire() in result["map"]["members"]
            # The answer was lost: asking again (with a fresh proof) gets it again.
            assert (await join_request(url, world, 2, "late"))["member"] == approved.to_wire()
            # Asked under another name, it still gets the entry the admin signed, nothing else.
            assert (await join_request(url, world, 2, "renamed"))["member"] == approved.to_wire()
            await refused(db, join_request(url, world, 3, "late"), 409, "'late' is taken by another member")

    asyncio.run(scenario())


def test_map_full_then_only_what_changed(db: Database, world: World) -> None:
    async def scenario() -> None:
        async with with_network(db, world) as url:
            await join(url, world, 1, world.invite(), "one")
            async with Coordinator(url, identity=world.nodes[1]) as one:
                full = await one.map(0, 0)
                assert full["full"] is True and len(full["members"]) == 2 and full["secret"] is None
                assert set(full["endpoints"]) == {key(world, 0), key(world, 1)}
                version = full["version"]
                assert await one.map(version, 0) == {"version": version, "full": False, "members": [],
                                                     "revocations": [], "secret": None, "endpoints": {}}
                two = (await join(url, world, 2, world.invite(), "two"))["member"]
                delta = await one.map(version, 0)
                assert (delta["members"], delta["revocations"], list(delta["endpoints"])) == ([two], [], [key(world, 2)])
                revocation = await revoke(url, world, two)
                gone = await one.map(delta["version"], 0)
                assert (gone["members"], gone["revocations"]) == ([], [revocation])

            peer_map = PeerMap(world.network, world.nodes[1].public.wg_public_key)
            for update in (full, delta, gone):
                peer_map.apply(update)
            assert {m.name for m in peer_map.members.values()} == {"admin"}
            assert peer_map.version == gone["version"]

    asyncio.run(scenario())


@pytest.fixture
def held_polls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The `since` of every map long-poll the coordinator starts to hold: the signal that a
    poll reached the server (a spy around the real handler's wait, which runs unchanged)."""
    held: list[int] = []
    hold = service._Service._wait_past

    async def spied(self: Any, since: int, wait: float) -> None:
        if wait > 0 and self.store.version == since:
            held.append(since)
        await hold(self, since, wait)

    monkeypatch.setattr(service._Service, "_wait_past", spied)
    return held


def test_long_poll_waits_and_wakes_on_a_change(db: Database, world: World, held_polls: list[int]) -> None:
    async def scenario() -> None:
        async with with_network(db, world) as url:
            await join(url, world, 1, world.invite(), "one")
            loop = asyncio.get_running_loop()
            async with Coordinator(url, identity=world.nodes[1]) as one:
                version = (await one.map(0, 0))["version"]
                started = loop.time()
                idle = await one.map(version, 0.4)
                assert loop.time() - started >= 0.35 and idle["version"] == version and idle["members"] == []

                poll = asyncio.create_task(one.map(version, 20))
                await until("the coordinator holds the poll", lambda: version in held_polls)
                assert not poll.done()
                two = (await join(url, world, 2, world.invite(), "two"))["member"]
                changed = loop.time()
                # Woken by the change, well before its own 20 s are up (a protocol bound, not a speed).
                update = await asyncio.wait_for(poll, 10.0)
                assert loop.time() - changed < 10.0
                assert update["members"] == [two] and update["version"] > version

    asyncio.run(scenario())


def test_register_records_the_observed_address_first(db: Database, world: World) -> None:
    async def scenario() -> None:
        async with with_network(db, world) as url:
            await join(url, world, 1, world.invite(), "one")
            async with Coordinator(url, identity=world.nodes[1]) as one:
                version = (await one.map(0, 0))["version"]
                reply = await one.register(51820, ["192.0.2.7:4500", "127.0.0.1:51820"])
                assert reply == {"observed": "127.0.0.1:51820"}
                update = await one.map(version, 0)
                assert update["version"] == version + 1
                seen = update["endpoints"][key(world, 1)]
                assert seen["addresses"] == ["127.0.0.1:51820", "192.0.2.7:4500"]
                assert abs(seen["last_seen"] - now()) <= 2
                await one.register(51820, ["192.0.2.7:4500"])  # the same list: no new version
                assert (await one.map(0, 0))["version"] == version + 1
                await refused(db, one.register(51820, ["192.0.2.7"]), 400, "expected IPv4:port")
                await refused(db, one.register(0, []), 400, "listen_port")
                await refused(db, one.register(1, ["192.0.2.1:1"] * 9), 400, "at most 8")

    asyncio.run(scenario())


def test_register_keeps_an_opaque_ssh_offer_and_serves_it_in_the_map(db: Database, world: World) -> None:
    offer = {"host_key": "ssh-ed25519 AAAA", "port": 2222, "sig": "anything: nodes verify it"}

    async def scenario() -> None:
        async with with_network(db, world) as url:
            await join(url, world, 1, world.invite(), "one")
            async with Coordinator(url, identity=world.nodes[1]) as one:
                await one.register(51820, [])
                version = (await one.map(0, 0))["version"]
                assert "ssh" not in (await one.map(0, 0))["endpoints"][key(world, 1)]
                await one.register(51820, [], ssh=offer)
                update = await one.map(version, 0)
                assert update["version"] == version + 1 and update["endpoints"][key(world, 1)]["ssh"] == offer
                assert "ssh" not in update["endpoints"].get(key(world, 0), {})
                await one.register(51820, [], ssh=offer)  # the same offer: no new version
                assert (await one.map(0, 0))["version"] == version + 1
                await refused(db, one.register(51820, [], ssh={"pad": "x" * MAX_SSH_OFFER}), 400,
                              f"at most {MAX_SSH_OFFER} bytes")
                for wrong in ([offer], "ssh", 7):
                    await refused(db, one.register(51820, [], ssh=wrong), 400, "ssh must be a JSON object")  # type: ignore[arg-type]
                await one.register(51820, [])  # said again without it: withdrawn
                withdrawn = await one.map(version + 1, 0)
                assert withdrawn["version"] == version + 2 and "ssh" not in withdrawn["endpoints"][key(world, 1)]

    asyncio.run(scenario())


def test_register_takes_a_relay_offer_by_url_or_port_and_serves_it_in_the_map(db: Database, world: World) -> None:
    async def scenario() -> None:
        async with with_network(db, world) as url:
            await join(url, world, 1, world.invite(), "one")
            async with Coordinator(url, identity=world.nodes[1]) as one:
                await one.register(51820, [], relay={"port": 7401})  # plain HTTP where the request came from
                endpoints = (await one.map(0, 0))["endpoints"][key(world, 1)]
                assert endpoints["relay"] == "http://127.0.0.1:7401"
                await one.register(51820, [], relay={"url": "https://relay.example.org/mesh/"})
                assert (await one.map(0, 0))["endpoints"][key(world, 1)]["relay"] == "https://relay.example.org/mesh"
                for wrong, why in (({"url": "ftp://x:1"}, "expected http"), ({"url": "http://u:p@x:1"}, "expected http"),
                                   ({"url": "http://x:1/?q"}, "expected http"), ({"port": 0}, "relay port"),
                                   ({"port": 1, "url": "http://x:1"}, "relay must be"), ("http://x:1", "relay must be"),
                                   ({"url": "http://" + "x" * 300}, "at most 256")):
                    await refused(db, one.register(51820, [], relay=wrong), 400, why)  # type: ignore[arg-type]
                await one.register(51820, [])  # said again without it: withdrawn
                assert "relay" not in (await one.map(0, 0))["endpoints"][key(world, 1)]

    asyncio.run(scenario())


def test_signed_requests_are_not_replayable_or_stale(db: Database, world: World) -> None:
    async def scenario() -> None:
        async with with_network(db, world) as url, aiohttp.ClientSession() as http:
            path = "/v1/admin/map"
            header = sign_admin_request(world.admin, "GET", path, b"", now())
            async with http.get(url + path, headers={"Authorization": header}) as response:
                assert response.status == 200
            async with http.get(url + path, headers={"Authorization": header}) as response:
                assert response.status == 401 and "replayed" in (await response.json())["error"]
            old = sign_admin_request(world.admin, "GET", path, b"", now() - 1000)
            async with http.get(url + path, headers={"Authorization": old}) as response:
                assert response.status == 401 and "fix the clock" in (await response.json())["error"]
            signed_elsewhere = sign_admin_request(world.admin, "GET", "/v1/admin/pending", b"", now())
            async with http.get(url + path, headers={"Authorization": signed_elsewhere}) as response:
                assert response.status == 401 and "does not verify" in (await response.json())["error"]

    asyncio.run(scenario())


def test_unknown_node_is_401_and_revoked_node_is_403_with_its_revocation(db: Database, world: World) -> None:
    async def scenario() -> None:
        async with with_network(db, world) as url:
            one = (await join(url, world, 1, world.invite(), "one"))["member"]
            async with Coordinator(url, identity=world.nodes[5]) as stranger:
                await refused(db, stranger.map(0, 0), 401, "unknown node")
                await refused(db, stranger.register(51820, []), 401, "unknown node")
            revocation = await revoke(url, world, one)
            async with Coordinator(url, identity=world.nodes[1]) as revoked:
                error = await refused(db, revoked.map(0, 0), 403, "^this node was revoked by the admin$")
            assert isinstance(error, Revoked) and error.revocation == revocation
            assert Revocation.from_wire(error.revocation, world.network).wg_key == world.nodes[1].public.wg_public_key

    asyncio.run(scenario())


def test_secret_rotation_takes_only_the_next_epoch(db: Database, world: World) -> None:
    other = World.create()
    new_secret = bytes(range(100, 132))

    async def scenario() -> None:
        async with serving(db, world) as served:
            url = served.url
            await join(url, world, 1, world.invite(), "one")
            async with Coordinator(url, admin=world.admin) as admin, \
                    Coordinator(url, identity=world.nodes[1]) as member:
                full = await member.map(0, 0)
                version, members = full["version"], [world.entry(m) for m in full["members"]]

                def record(epoch: int) -> JSON:
                    return SecretRecord.create(world.admin, epoch, new_secret, members, now()).to_wire()

                forged = dict(record(1), sig=other.admin.sign("secret", record(1)["body"]))
                await refused(db, admin.rotate_secret(record(2)), 409, "must have epoch 1, not 2")
                await refused(db, admin.rotate_secret(forged), 403, "does not verify")
                first = record(1)
                await admin.rotate_secret(first)
                save_network_secret(served.machine.paths.network_secret, new_secret)  # as rotate-secret keeps it
                await refused(db, admin.rotate_secret(first), 409, "must have epoch 2, not 1")
                update = await member.map(version, 0)
                assert update["secret"] == first
                opened = SecretRecord.from_wire(update["secret"], world.network).open_for(
                    world.nodes[1].public.wg_public_key, world.nodes[1].static_private)
                assert opened == new_secret
                assert (await member.map(update["version"], 0))["secret"] is None
            late = await join(url, world, 3, world.invite(), "three")
            assert late["secret"]["epoch"] == 1
            assert unseal(world.nodes[3].static_private, unb64(late["secret"]["sealed"], "sealed")) == new_secret

    asyncio.run(scenario())


@pytest.mark.parametrize(("path", "data", "status", "pattern"), [
    ("/v1/join/propose", b"not json", 400, "not JSON"),
    ("/v1/join/propose", b"[1, 2]", 400, "the body: expected a JSON object"),
    ("/v1/join/propose", b"[" * 30_000, 400, "not JSON"),  # nested too deeply, under 32 KiB
    ("/v1/join/request", b'{"identity": "x", "name": "a", "t": NaN, "proof": ""}', 400, "not JSON"),
    ("/v1/join/confirm", b'{"entry": {}}', 400, "the body: missing proof"),
    ("/v1/join/confirm", b'{"entry": {}, "proof": "", "more": 1}', 400, "unexpected 'more'"),
    # Cheap checks before the identity line is parsed: the grant, the name.
    ("/v1/join/propose", b'{"identity": "ssh-ed25519 AAAA", "name": "a", "grant": {}}', 403, "invite: missing body"),
    ("/v1/join/request", b'{"identity": "x", "name": "Bad Name", "t": 1, "proof": ""}', 400, "name must be"),
    ("/v1/join/propose", b"x" * (guards.UNAUTHENTICATED_MAX_BODY + 1), 413, "larger than 32 KiB"),
    ("/v1/admin/revoke", b"x" * (MAX_BODY + 1), 413, "larger than 256 KiB"),
    ("/v1/admin/revoke", b"{}", 401, "Authorization"),
    ("/v1/nowhere", b"{}", 404, "not found"),
])
def test_malformed_requests_get_a_json_error_that_says_what_is_wrong(
        db: Database, world: World, path: str, data: bytes, status: int, pattern: str) -> None:
    async def scenario() -> None:
        async with with_network(db, world) as url, aiohttp.ClientSession() as http:
            before = snapshot(db)
            async with http.post(url + path, data=data) as response:
                assert response.status == status
                error = json.loads(await response.read())["error"]
                assert re.search(pattern, error), error
            assert snapshot(db) == before

    asyncio.run(scenario())


def test_members_are_served_as_stored_and_nodes_refuse_tampered_ones(db: Database, world: World) -> None:
    async def scenario() -> JSON:
        async with with_network(db, world) as url:
            await join(url, world, 1, world.invite(), "one")
            [(text,)] = db.query("SELECT entry FROM members WHERE name = 'one'")
            entry = json.loads(text)
            entry["body"]["name"] = "intruder"
            db.execute("UPDATE members SET entry = ? WHERE name = 'one'", json.dumps(entry))
            async with Coordinator(url, admin=world.admin) as admin:
                return await admin.admin_map()

    update = asyncio.run(scenario())
    assert any(m["body"]["name"] == "intruder" for m in update["members"])
    peer_map = PeerMap(world.network, world.nodes[0].public.wg_public_key)
    changes = peer_map.apply(update)
    assert peer_map.members == {} and any("member refused" in reason for reason in changes.rejected)


def test_a_restarted_coordinator_keeps_its_state(db: Database, world: World) -> None:
    async def scenario() -> None:
        async with serving(db, world) as served:
            url, machine = served.url, served.machine
            await join(url, world, 1, world.invite(), "one")
            async with Coordinator(url, identity=world.nodes[1]) as one:
                before = await one.map(0, 0)
        async with running(db) as (url, _):
            async with Coordinator(url, identity=world.nodes[1]) as one:
                assert await one.map(0, 0) == before
            machine.moved(url)
            async with machine.admitting():
                two = await join(url, world, 2, world.invite(), "two")
            assert two["member"]["body"]["ipv4"] == str(world.network.host(3)[0])

    asyncio.run(scenario())


def test_connection_problems_are_phrased_for_users(tmp_path: Path) -> None:
    async def scenario() -> CoordinatorError:
        async with running(tmp_path / "gone.db") as (url, _):
            pass  # the port is free again
        async with Coordinator(url) as coordinator:
            with pytest.raises(CoordinatorError) as info:
                await coordinator.network()
        return info.value

    error = asyncio.run(scenario())
    assert error.status is None and re.fullmatch(r"cannot reach the coordinator at http://127\.0\.0\.1:\d+: "
                                                 r"connection refused on 127\.0\.0\.1:\d+", str(error)), str(error)



def test_shutdown_answers_held_long_polls_at_once(db: Database, world: World, held_polls: list[int]) -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        server = AsyncExitStack()
        url = await server.enter_async_context(with_network(db, world))
        try:
            await join(url, world, 1, world.invite(), "one")
            async with Coordinator(url, identity=world.nodes[1]) as one:
                version = (await one.map(0, 0))["version"]
                poll = asyncio.create_task(one.map(version, 25))
                await until("the coordinator holds the poll", lambda: version in held_polls)
                stopping = loop.time()
                await server.aclose()
                # An answer (a poll still held when the shutdown grace ends is cut off, and the
                # client raises), long before the poll's own 25 s are up.
                assert (await asyncio.wait_for(poll, 10.0))["version"] == version
                assert loop.time() - stopping < 10.0
        finally:
            await server.aclose()

    asyncio.run(scenario())


def test_storage_failure_is_503_with_what_to_do_and_stores_nothing(tmp_path: Path, world: World) -> None:
    db = sqlite_database(tmp_path)  # a full disk as SQLite sees it (PostgreSQL's: test_store_postgres)

    async def scenario() -> None:
        async with running(db) as (url, store):
            await set_up(url, world)
            assert isinstance(store, SqliteStore)
            pages = store._conn.execute("PRAGMA page_count").fetchone()[0]
            store._conn.execute(f"PRAGMA max_page_count = {pages}")  # the disk is full, as SQLite sees it
            with pytest.raises(StoreError):
                for filler in range(1000):  # use up the room left in the pages there are
                    await store.use_invite(f"filler{filler}", {"padding": "x" * 200})
            with pytest.raises(StoreError):  # the pending table's too (a join is held there first)
                for filler in range(1000):
                    await store.put_pending(PendingRow(f"filler{filler}", "filler", "x" * 200, "", now(),
                                                       "192.0.2.1"))
            await refused(db, join(url, world, 1, world.invite(), "one"), 503, "^coordinator database .* disk is full")

    asyncio.run(scenario())


def test_a_lost_join_answer_can_be_fetched_again(db: Database, world: World) -> None:
    """The same signed entry confirmed twice (the first answer was lost) gets the same
    result, and does not spend another use of the invite."""
    async def scenario() -> None:
        async with with_network(db, world) as url:
            token = world.invite(uses=1)
            entry, proof = await prepare(url, world, 1, token, "lost")
            first = await confirmed(url, entry, proof)
            counts = row_counts(db)
            again = await confirmed(url, entry, proof)
            assert again["member"] == first["member"] and again["secret"] == first["secret"]
            assert row_counts(db) == counts
            await refused(db, join(url, world, 2, token, "second"), 410, "already used")
    asyncio.run(scenario())


# --- issue 13: only the admin admits, the coordinator holds no secret, requests hold nothing --------


def test_an_invite_signed_entry_is_no_member_until_the_admins_machine_countersigns(
        db: Database, world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """Defect 1: an invite holder and a coordinator cannot make a member. The join waits in
    the coordinator (202, ask again) and is in no map until the admin's machine checked
    it and signed its own entry; an invite-signed entry is no approval. (Before, confirm
    stored the invite-signed entry as a member at once and served it to every node.)"""
    monkeypatch.setattr(service, "COUNTERSIGN_WAIT", 0.3)

    async def scenario() -> None:
        async with serving(db, world, admit=False) as served:
            url, machine = served.url, served.machine
            entry, proof = await prepare(url, world, 1, world.invite(), "one")
            async with Coordinator(url) as joiner:
                waiting = await joiner.confirm(entry, proof)
            assert waiting["pending"] is True and waiting["countersign"] is True
            assert await served.store.member(key(world, 1)) is None
            async with Coordinator(url, admin=world.admin) as admin:
                assert [m["body"]["name"] for m in (await admin.admin_map())["members"]] == ["admin"]
                listed = await admin.pending(0, invited=True)
                assert [(p["kind"], p["name"], p["entry"], p["proof"]) for p in listed] == [
                    ("invite", "one", entry, b64(proof))]
                sealed = sealed_secret(world.entry(world.admin_member(1, "one", 2)), SECRET, 0)
                await refused(db, admin.approve(entry, sealed), 403, "must be signed by the admin key")
            decisions = await machine.countersign()
            assert [line.split(" ")[0] for line in decisions] == ["countersigned"], decisions
            result = await confirmed(url, entry, proof)
            member = world.entry(result["member"])
            assert member.grant is None and member.wg_key == world.nodes[1].public.wg_public_key
            assert entry not in result["map"]["members"] and result["member"] in result["map"]["members"]

    asyncio.run(scenario())


def test_a_refused_join_is_told_why_and_a_new_invite_can_be_used_after(
        db: Database, world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """The admin's machine refuses a join with an invite it did not make; the joiner is
    told why, once, and a join with a proper invite then goes through (the refused row
    is gone: it did not stay, rolled back with the refusal, refusing every later join)."""
    monkeypatch.setattr(service, "COUNTERSIGN_WAIT", 5.0)

    async def scenario() -> None:
        async with serving(db, world, admit=False) as served:
            url, machine = served.url, served.machine
            entry, proof = await prepare(url, world, 1, world.invite(kept=False), "one")
            async with Coordinator(url) as joiner:
                confirm = asyncio.create_task(joiner.confirm(entry, proof))
                decisions = await machine.countersign(wait=5)
                assert [line.split(" ")[0] for line in decisions] == ["refused"], decisions
                with pytest.raises(CoordinatorError) as info:
                    await confirm
            assert info.value.status == 403
            assert re.search("refused this join: this invite was not made on the admin's machine", str(info.value))
            assert row_counts(db)["pending"] == 0
            async with machine.admitting():
                result = await join(url, world, 1, world.invite(), "one")
            assert world.entry(result["member"]).name == "one"

    asyncio.run(scenario())


def test_rotate_secret_seals_only_to_admin_signed_members_and_the_database_keeps_no_secret(
        db: Database, world: World) -> None:
    """Defect 1 (the next rotate-secret) and defect 6 (seal end to end): an invite-signed
    entry put into the coordinator's members (its operator holds an invite key) gets no
    sealed secret from `tunnelmesh rotate-secret`, which seals to the admin's own view of
    the members; neither the set-up secret nor the rotated one is in the database file."""
    async def scenario() -> bytes:
        async with serving(db, world) as served:
            url, machine = served.url, served.machine
            await join(url, world, 1, world.invite(), "one")
            intruder = (await invited(world, 4, world.body(4, "intruder", 5), world.invite(uses=0)))[0]
            await served.store.add_member(intruder, world.entry(intruder), 5)  # the coordinator's word only
            epoch, count = await admin_commands.rotate_secret(machine.paths)
            assert (epoch, count) == (1, 2)
            new_secret = read_network_secret(machine.paths.network_secret)  # kept on the admin's machine
            assert new_secret != SECRET
            async with Coordinator(url, identity=world.nodes[1]) as one:
                record = SecretRecord.from_wire((await one.map(0, 0))["secret"], world.network)
            assert set(record.sealed) == {key(world, 0), key(world, 1)}  # not the intruder's key
            assert record.open_for(world.nodes[1].public.wg_public_key, world.nodes[1].static_private) == new_secret
            late = await join(url, world, 3, world.invite(), "three")  # sealed by the admin's machine
            assert late["secret"]["epoch"] == 1
            assert unseal(world.nodes[3].static_private, unb64(late["secret"]["sealed"], "sealed")) == new_secret
            return new_secret

    new_secret = asyncio.run(scenario())
    assert_no_secret(db, SECRET, new_secret)


def test_a_request_for_approval_reserves_no_name_and_no_address(db: Database, world: World) -> None:
    """Defect 3: an unauthenticated request holds nothing. Two keys may ask for one name;
    a joiner with an invite takes that name and the address proposed for it meanwhile;
    the admin is offered distinct addresses and cannot approve a name taken since.
    (Before, the first request held the name and an address for an hour.)"""
    async def scenario() -> None:
        async with serving(db, world) as served:
            url = served.url
            assert await join_request(url, world, 2, "late") == {"pending": True, "name": "late"}
            assert await join_request(url, world, 3, "late") == {"pending": True, "name": "late"}
            async with Coordinator(url, admin=world.admin) as admin:
                offered = [(p["name"], p["fingerprint"], p["ipv4"]) for p in await admin.pending()]
            assert sorted(offered) == sorted([("late", world.nodes[2].fingerprint, str(world.network.host(2)[0])),
                                              ("late", world.nodes[3].fingerprint, str(world.network.host(3)[0]))])
            taken = await join(url, world, 4, world.invite(), "late")
            assert world.entry(taken["member"]).ipv4 == world.network.host(2)[0]
            with pytest.raises(admin_commands.NetworkError, match="name late is bound to another member's key"):
                await admin_commands.approve(served.machine.paths, "late", world.nodes[2].fingerprint)
            async with Coordinator(url, admin=world.admin) as admin:
                assert len(await admin.pending()) == 2  # still waiting; the admin decides

    asyncio.run(scenario())


def test_expired_pending_joins_are_ignored_wherever_they_are_read(
        db: Database, world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """Defect 3: a pending join older than PENDING_TTL is not listed, approved, counted or
    countersigned, whether or not another request came since (before, expired requests
    were cleaned only when a new one arrived). Joins are made on a clock an hour back;
    the admin acts now."""
    monkeypatch.setattr(service, "COUNTERSIGN_WAIT", 0.2)
    past = service.PENDING_TTL + 60
    shift = [0]

    async def scenario() -> None:
        async with serving(db, world, admit=False, clock=lambda: time.time() + shift[0]) as served:
            url = served.url
            shift[0], then = -past, now() - past  # the joins come an hour back (unsigned: no clock check)
            await join_request(url, world, 2, "late", t=then)
            entry, proof = await prepare(url, world, 1, world.invite(created=then - 10), "one")
            assert (await confirmed(url, entry, proof, tries=1))["pending"] is True
            assert row_counts(db)["pending"] == 2
            shift[0] = 0  # an hour later; no request came since
            async with Coordinator(url, admin=world.admin) as admin:
                assert await admin.pending() == [] and await admin.pending(0, invited=True) == []
                sealed = sealed_secret(world.entry(world.admin_member(2, "late", 2)), SECRET, 0)
                await refused(db, admin.approve(world.admin_member(2, "late", 2), sealed), 404, "expired")
            assert await served.machine.countersign() == []
            assert row_counts(db)["pending"] == 2  # stored still, read nowhere
            assert await join_request(url, world, 2, "late") == {"pending": True, "name": "late"}  # afresh

    asyncio.run(scenario())


def test_requests_for_approval_are_bounded_per_source_and_in_all_and_never_block_invited_joins(
        db: Database, world: World) -> None:
    """Defect 3: at most PENDING_PER_SOURCE requests wait from one source address (as its
    trusted proxy says) while others still may, at most PENDING_LIMIT in all, and a flood
    of them leaves a join with an invite unaffected (it has its own limit)."""
    strangers = identities(service.PENDING_LIMIT + 2)

    async def scenario() -> None:
        async with serving(db, world, trusted_proxies=frozenset({"127.0.0.1"})) as served, \
                aiohttp.ClientSession() as http:
            url = served.url
            bodies = [await request_body(world, 0, f"s{n}", node=node) for n, node in enumerate(strangers)]
            for n in range(service.PENDING_PER_SOURCE):
                assert (await post_from(http, url, "/v1/join/request", bodies[n], "198.51.100.1"))[0] == 202
            status, answer = await post_from(http, url, "/v1/join/request", bodies[-1], "198.51.100.1")
            assert status == 429 and "4 joins from 198.51.100.1 are already waiting" in answer["error"], answer
            # The same key asking again is no new request; another source may still ask.
            assert (await post_from(http, url, "/v1/join/request", bodies[0], "198.51.100.1"))[0] == 202
            for n in range(service.PENDING_PER_SOURCE, service.PENDING_LIMIT):
                source = f"203.0.113.{n // service.PENDING_PER_SOURCE}"
                assert (await post_from(http, url, "/v1/join/request", bodies[n], source))[0] == 202, n
            status, answer = await post_from(http, url, "/v1/join/request", bodies[-1], "192.0.2.99")
            assert status == 429 and "64 joins are already waiting for approval" in answer["error"], answer
            status, answer = await post_from(http, url, "/v1/join/request", dict(bodies[-1], identity="x"), "192.0.2.9")
            assert status == 400 and "identity line" in answer["error"], answer
            assert row_counts(db)["pending"] == service.PENDING_LIMIT
            result = await join(url, world, 1, world.invite(), "one")  # countersigned all the same
            assert world.entry(result["member"]).name == "one"

    asyncio.run(scenario())


# --- CPU cost before authentication (issue 13, defect 4) ---------------------------------------


def frozen(at: float = 1000.0) -> Any:
    """A monotonic clock that stands still: no token comes back during a test."""
    return lambda: at


async def get_from(http: aiohttp.ClientSession, url: str, path: str, forwarded: str | None = None
                   ) -> tuple[int, JSON, str | None]:
    """(status, JSON answer, Retry-After) of an unsigned GET."""
    headers = {} if forwarded is None else {"X-Forwarded-For": forwarded}
    async with http.get(url + path, headers=headers) as response:
        return response.status, await response.json(), response.headers.get("Retry-After")


def test_a_flood_of_unauthenticated_requests_from_one_source_gets_429_while_another_gets_through(db: Path) -> None:
    limiter = RateLimiter(Rate(per_second=0.01, burst=5), Rate(per_second=1000.0, burst=1000))

    async def scenario() -> None:
        async with running(db, limiter=limiter, monotonic=frozen()) as (url, _), \
                aiohttp.ClientSession() as http, \
                aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=("127.0.0.2", 0))) as other:
            for _ in range(5):  # no network yet: answered 503 by the handler, so it got through
                assert (await get_from(http, url, "/v1/network"))[0] == 503
            status, answer, retry_after = await get_from(http, url, "/v1/network")
            assert status == 429 and retry_after == "100", (status, answer)
            assert answer == {"error": "too many requests from 127.0.0.1: try again in 100 s"}
            # Every endpoint that takes unsigned requests shares the source's bucket...
            for path in ("/v1/join/propose", "/v1/join/confirm", "/v1/join/request", "/v1/admin/setup"):
                async with http.post(url + path, json={}) as response:
                    assert response.status == 429 and response.headers["Retry-After"] == "100", path
            for path in ("/relay", "/v1/cluster/relay"):  # before any WebSocket upgrade or challenge
                async with http.get(url + path) as response:
                    assert response.status == 429, path
            # ...signed requests are not charged to it (their signature is what they cost)...
            async with http.get(url + "/v1/map") as response:
                assert response.status == 401
            # ...and another source still gets through.
            assert (await get_from(other, url, "/v1/network"))[0] == 503
            assert limiter.refused == {"source": 7, "overall": 0}

    asyncio.run(scenario())


def test_behind_a_trusted_proxy_each_forwarded_address_has_its_own_bucket_and_others_cannot_choose_one(
        db: Path) -> None:
    limiter = RateLimiter(Rate(per_second=0.01, burst=2), Rate(per_second=1000.0, burst=1000))

    async def scenario() -> None:
        async with running(db, limiter=limiter, monotonic=frozen(), trusted_proxies=frozenset({"127.0.0.1"})) \
                as (url, _), aiohttp.ClientSession() as http:
            for source in ("192.0.2.1", "192.0.2.2"):
                assert [(await get_from(http, url, "/v1/network", source))[0] for _ in range(3)] == [503, 503, 429]
            status, answer, _ = await get_from(http, url, "/v1/network", "spoofed, 192.0.2.1")
            assert status == 429 and "192.0.2.1" in answer["error"]  # the proxy's own entry is the last one
        limiter_untrusted = RateLimiter(Rate(per_second=0.01, burst=2), Rate(per_second=1000.0, burst=1000))
        async with running(db, limiter=limiter_untrusted, monotonic=frozen()) as (url, _), \
                aiohttp.ClientSession() as http:
            statuses = [(await get_from(http, url, "/v1/network", f"192.0.2.{n}"))[0] for n in range(3)]
            assert statuses == [503, 503, 429]  # an untrusted client's header buys no fresh bucket

    asyncio.run(scenario())


def test_a_request_without_a_signature_carries_at_most_32_kib_even_chunked(db: Path) -> None:
    # Parsing JSON costs up to ~50 us per KiB: 256 KiB bodies at the overall rate would cost
    # the admin node's event loop a quarter of a core.
    big = b'{"identity": "' + b"x" * guards.UNAUTHENTICATED_MAX_BODY + b'"}'

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(big), 4096):
            yield big[start:start + 4096]

    async def scenario() -> None:
        async with running(db) as (url, _), aiohttp.ClientSession() as http:
            for data in (big, chunks()):
                async with http.post(url + "/v1/join/request", data=data) as response:
                    assert response.status == 413
                    assert "larger than 32 KiB" in (await response.json())["error"]

    asyncio.run(scenario())


def test_the_default_limits_refuse_a_flood_after_the_burst(db: Path) -> None:
    async def scenario() -> None:
        async with running(db, limiter=None, monotonic=frozen()) as (url, _), aiohttp.ClientSession() as http:
            statuses = [(await get_from(http, url, "/v1/network"))[0] for _ in range(guards.PER_SOURCE_RATE.burst + 3)]
            assert statuses == [503] * guards.PER_SOURCE_RATE.burst + [429] * 3

    asyncio.run(scenario())


@pytest.fixture
def signature_checks(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Counts of every signature check the coordinator makes, through its seams: member and
    admin requests (as the service calls them) and SSH signatures (tunnelmesh.identity)."""
    import tunnelmesh.identity as identity_module

    calls = {"member": 0, "admin": 0, "ssh": 0}

    def counting(name: str, function: Any) -> Any:
        def counted(*args: Any) -> Any:
            calls[name] += 1
            return function(*args)
        return counted

    monkeypatch.setattr(service, "verify_member_request", counting("member", service.verify_member_request))
    monkeypatch.setattr(service, "verify_admin_request", counting("admin", service.verify_admin_request))
    monkeypatch.setattr(identity_module, "_check_signature", counting("ssh", identity_module._check_signature))
    return calls


def test_stale_and_replayed_requests_are_refused_before_their_signature_is_checked(
        db: Database, world: World, signature_checks: dict[str, int]) -> None:
    offset = [0.0]

    async def scenario() -> None:
        async with running(db, clock=lambda: time.time() + offset[0]) as (url, _), aiohttp.ClientSession() as http:
            await set_up(url, world)  # the admin node (identity 0) is a member now
            signature_checks.update(member=0, admin=0, ssh=0)
            offset[0] = 1000.0  # every request is now 1000 s old to the coordinator
            async with Coordinator(url, identity=world.nodes[0]) as member, \
                    Coordinator(url, admin=world.admin) as admin:
                await refused(db, member.map(0, 0), 401, "off the coordinator's clock")
                await refused(db, member.register(51820, []), 401, "off the coordinator's clock")
                await refused(db, admin.admin_map(), 401, "off the coordinator's clock")
                assert signature_checks == {"member": 0, "admin": 0, "ssh": 0}
                offset[0] = 0.0
                await member.map(0, 0)
                # The seams do count (ssh: the request, and the stored identity's attestation
                # unless an earlier test left it in the service's cache).
                assert signature_checks["member"] == 1 and signature_checks["ssh"] in (1, 2)
            # A replay (same nonce) is refused before its signature is checked as well.
            path, nonce, t = "/v1/map?since=0&wait=0", "ab" * 16, now()
            signature = await world.nodes[0].sign(request_message("GET", path, t, nonce, b""), REQUEST_NAMESPACE)
            header = RequestAuth(key(world, 0), t, nonce, signature).header()
            statuses = []
            for _ in range(3):
                async with http.get(url + path, headers={"Authorization": header}) as response:
                    statuses.append(response.status)
            assert statuses == [200, 401, 401]
            assert signature_checks["member"] == 2

    asyncio.run(scenario())


@pytest.mark.parametrize("e", [3, 2**31 - 1])
def test_an_rsa_identity_with_a_costly_exponent_is_refused_before_any_signature_check(
        db: Database, world: World, e: int, signature_checks: dict[str, int]) -> None:
    line = attested_line(rsa_key_with_exponent(e))

    async def scenario() -> None:
        async with running(db) as (url, _), Coordinator(url) as joiner:
            await set_up(url, world)
            signature_checks.update(member=0, admin=0, ssh=0)
            for call in (joiner.propose(line, "hostile", world.invite().grant),
                         joiner.join_request(line, "hostile", now(), b"not a proof")):
                await refused(db, call, 400, f"public exponent {e} refused: only e = 65537")
            assert signature_checks == {"member": 0, "admin": 0, "ssh": 0}

    asyncio.run(scenario())
