"""`tunnelmesh coordinator migrate` (tunnelmesh.coordinator.store.copy): a SQLite network
moved to PostgreSQL keeps every row as stored, the signed JSON byte for byte (so every
signature still verifies on the new side) and the map version (so nodes carry on with
their `since`); a target that holds a network, or a source that holds none, is refused.
Then the command itself, and how it takes PostgreSQL's password."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.coordinator.test_store import add, key, opened
from tests.support.coordinator import World, now
from tests.support.databases import Database, postgres_database, sqlite_database
from tunnelmesh.coordinator.store import PendingRow, Store, StoreError
from tunnelmesh.coordinator.store.copy import migrate
from tunnelmesh.coordinator.store.schema import TABLES
from tunnelmesh.filter import STARTER_POLICY
from tunnelmesh.membership import (
    DeviceEntry,
    InviteGrant,
    MemberEntry,
    NetworkInfo,
    PolicyRecord,
    Revocation,
    SecretRecord,
    b64,
    parse_entry,
)

#: The admin's entry as it sits in the source: valid JSON, but not as the store would write it.
HAND_WRITTEN = {"indent": 1, "sort_keys": True}
PASSWORD = "hunter2-not-for-ps"


@pytest.fixture(scope="module")
def world() -> World:
    return World.create()


@pytest.fixture
def sqlite_db(tmp_path: Path) -> Database:
    return sqlite_database(tmp_path)


@pytest.fixture
def pg(postgres_server: Any, tmp_path: Path) -> Database:
    return postgres_database(postgres_server, tmp_path)


async def populate(store: Store, world: World) -> None:
    """A network with a row in every table, and every optional column of a member filled."""
    await store.set_network(world.network.to_wire())
    await add(store, world, 0, "admin", 1)
    await add(store, world, 1, "one", 2)
    await add(store, world, 2, "gone", 3)
    admin, gone = [world.entry(row.entry) for row in await store.members() if row.host in (1, 3)]
    phone = DeviceEntry.create(world.admin, world.network, "phone", bytes(range(1, 33)), "admin", 9, now())
    await store.add_member(phone.to_wire(), phone, 9)
    await store.set_endpoints(key(world, 0), ["192.0.2.1:51820", "[2001:db8::1]:51820"], now(),
                              {"port": 22, "host_key": "ssh-ed25519 AAAA"}, "http://192.0.2.1:7401")
    await store.set_candidates(key(world, 0), {"body": {"version": 5, "candidates": ["192.0.2.1:51820"]},
                                               "sig": "c2ln"}, 5)
    await store.set_endpoints(key(world, 1), ["198.51.100.7:51820"], now())
    await store.set_secret(SecretRecord.create(world.admin, 1, bytes(range(100, 132)),
                                               [admin], now()).to_wire(), 1)
    await store.set_policy(PolicyRecord.create(world.admin, 1, STARTER_POLICY, now()).to_wire(), 1)
    await store.revoke(key(world, 2), Revocation.create(world.admin, gone, now()).to_wire(), now(),
                       drop_member=True)
    token = world.invite(uses=3)
    for _ in range(2):
        await store.use_invite(b64(InviteGrant.from_wire(token.grant, world.admin.public).invite_key), token.grant)
    identity = world.nodes[3].public
    await store.put_pending(PendingRow(key(world, 3), "waiting", identity.to_line(), identity.fingerprint, now(),
                                       "203.0.113.5", {"body": {"name": "waiting"}, "grant": token.grant}, "proof"))
    await store.mark_approved(key(world, 3), {"epoch": 1, "sealed": "c2VhbGVk"})
    identity = world.nodes[4].public
    await store.put_pending(PendingRow(key(world, 4), "refused", identity.to_line(), identity.fingerprint, now(),
                                       "192.0.2.9"))
    await store.mark_refused(key(world, 4), "not on this network")


def populated_source(db: Database, world: World) -> str:
    """`db` (SQLite) populated, with the admin's entry in hand-written JSON: that text."""
    async def scenario() -> None:
        async with opened(db) as store:
            await populate(store, world)

    asyncio.run(scenario())
    text = json.dumps(json.loads(db.query("SELECT entry FROM members WHERE host = 1")[0][0]), **HAND_WRITTEN)
    db.execute("UPDATE members SET entry = ? WHERE host = 1", text)
    return text


def test_a_sqlite_network_moves_to_postgresql_with_every_row_and_signature(sqlite_db: Database, pg: Database,
                                                                           world: World, tmp_path: Path) -> None:
    hand_written = populated_source(sqlite_db, world)
    original = sqlite_db.snapshot()
    assert all(original[table] for table in TABLES), original  # every table has rows to move

    async def scenario() -> None:
        async with opened(sqlite_db) as source, opened(pg) as target:
            done = await migrate(source, target)
            assert done.rows == {table: len(rows) for table, rows in original.items()}
            assert done.version == source.version == await target.read_version()
            for table in TABLES:
                assert await target.rows(table) == await source.rows(table), table
        assert pg.snapshot() == original  # seen from outside too, every column
        assert pg.query("SELECT entry FROM members WHERE host = 1") == [(hand_written,)]  # byte for byte

        back = sqlite_database(tmp_path / "back")  # and back again, to a new SQLite file
        async with opened(pg) as source, opened(back) as target:
            await migrate(source, target)
        assert back.snapshot() == original

        async with opened(pg) as moved:  # a coordinator started on the new database
            assert moved.version == done.version
            network_row = await moved.network()
            assert network_row is not None and network_row.secret_record is not None
            network = NetworkInfo.from_wire(network_row.record, world.admin.fingerprint)
            assert SecretRecord.from_wire(network_row.secret_record, network).epoch == network_row.epoch == 1
            members = await moved.members()
            assert [m.name for m in members] == ["admin", "one", "phone"]
            for row in members:  # as a node checks what the coordinator serves
                entry = parse_entry(row.entry, network)
                assert (b64(entry.wg_key), entry.name) == (row.wg_key, row.name)
                assert row.is_device == isinstance(entry, DeviceEntry)
            assert isinstance(parse_entry(members[0].entry, network), MemberEntry)
            assert members[0].ssh and members[0].relay and members[0].candidates and members[0].addresses
            revoked = [Revocation.from_wire(record, network).wg_key for record in await moved.revocations()]
            assert revoked == [world.nodes[2].public.wg_public_key]
            policy = await moved.policy()
            assert policy is not None and PolicyRecord.from_wire(policy.record, network).text == STARTER_POLICY
            # The map goes on from where it was: a node at `since=version` hears only the new change.
            assert await add(moved, world, 5, "five", 4) == done.version + 1
            assert [m.name for m in await moved.members(since=done.version)] == ["five"]

    asyncio.run(scenario())


def test_a_target_that_holds_a_network_is_refused_and_left_as_it_was(sqlite_db: Database, pg: Database,
                                                                    world: World) -> None:
    populated_source(sqlite_db, world)
    other = World.create()

    async def scenario() -> None:
        async with opened(pg) as target:
            await target.set_network(other.network.to_wire())
        source_before, target_before = sqlite_db.snapshot(), pg.snapshot()
        async with opened(sqlite_db) as source, opened(pg) as target:
            with pytest.raises(StoreError, match="already holds a network: migrate into an empty database"):
                await migrate(source, target)
        assert sqlite_db.snapshot() == source_before and pg.snapshot() == target_before

    asyncio.run(scenario())


def test_a_source_without_a_network_is_refused_and_nothing_is_copied(sqlite_db: Database, pg: Database) -> None:
    async def scenario() -> None:
        async with opened(sqlite_db) as source, opened(pg) as target:
            await source.use_invite("k", {})  # a row, but no network
            with pytest.raises(StoreError, match="holds no network: nothing to migrate"):
                await migrate(source, target)
        assert pg.row_counts() == dict.fromkeys(TABLES, 0)

    asyncio.run(scenario())


# --- the command -------------------------------------------------------------------------------


def tunnelmesh(*args: str) -> subprocess.CompletedProcess[str]:
    """The installed command, as an admin runs it."""
    return subprocess.run([str(Path(sys.executable).parent / "tunnelmesh"), *args], stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=120)


def with_password(dsn: str) -> str:
    return dsn.replace("postgresql://postgres@", f"postgresql://postgres:{PASSWORD}@", 1)


def test_the_migrate_command_copies_checks_and_says_what_next(sqlite_db: Database, pg: Database, world: World,
                                                             tmp_path: Path) -> None:
    populated_source(sqlite_db, world)
    password_file = tmp_path / "db-password"
    password_file.write_text(f"{PASSWORD}\n")
    os.chmod(password_file, 0o600)

    done = tunnelmesh("coordinator", "migrate", "--from", sqlite_db.url, "--to", pg.url,
                      "--db-password-file", str(password_file))
    assert done.returncode == 0, done.stderr
    assert "checked row by row" in done.stdout and "now start the coordinators with --db" in done.stdout
    assert f"{len(sqlite_db.snapshot()['members'])} members" in done.stdout and PASSWORD not in done.stdout
    assert pg.snapshot() == sqlite_db.snapshot()

    again = tunnelmesh("coordinator", "migrate", "--from", sqlite_db.url, "--to", pg.url)
    assert again.returncode == 1 and "already holds a network" in again.stderr, again.stderr
    into_file = tunnelmesh("coordinator", "migrate", "--from", pg.url, "--to", sqlite_db.url)
    assert into_file.returncode == 2 and "exists already: migrate into a new file" in into_file.stderr


#: The two commands that take a PostgreSQL connection string (it goes last).
COMMANDS = {"coordinator": ["coordinator", "--listen", "127.0.0.1:0", "--db"],
            "migrate": ["coordinator", "migrate", "--from", "{tmp}/unused.db", "--to"]}


def command_line(which: str, tmp_path: Path) -> list[str]:
    return [word.replace("{tmp}", str(tmp_path)) for word in COMMANDS[which]]


@pytest.mark.parametrize("which", COMMANDS)
def test_a_password_in_the_connection_string_is_refused(pg: Database, tmp_path: Path, which: str) -> None:
    refused = tunnelmesh(*command_line(which, tmp_path), with_password(pg.url))
    assert refused.returncode == 2, refused.stderr
    assert "--db holds a password" in refused.stderr and "--db-password-file FILE or PGPASSWORD" in refused.stderr
    assert PASSWORD not in refused.stderr + refused.stdout
    assert pg.query("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'") == [(0,)]  # not even connected
    assert not (tmp_path / "unused.db").exists()


@pytest.mark.parametrize("which", COMMANDS)
def test_a_password_file_that_cannot_be_read_is_a_clear_error(pg: Database, tmp_path: Path, which: str) -> None:
    missing = tmp_path / "no-such-password-file"
    refused = tunnelmesh(*command_line(which, tmp_path), pg.url, "--db-password-file", str(missing))
    assert refused.returncode == 1, refused.stderr
    assert f"--db-password-file {missing}: cannot read it (No such file or directory)" in refused.stderr
    assert pg.query("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'") == [(0,)]


def test_a_missing_source_file_is_refused_and_a_failed_migration_leaves_no_target_file(tmp_path: Path) -> None:
    missing, target = tmp_path / "nope.db", tmp_path / "new.db"
    done = tunnelmesh("coordinator", "migrate", "--from", str(missing), "--to", str(target))
    assert done.returncode == 2 and "no such file" in done.stderr, done.stderr
    assert not missing.exists() and not target.exists()  # neither made by the attempt
    empty = tmp_path / "empty.db"
    empty.write_bytes(b"")  # a file, but no network in it
    done = tunnelmesh("coordinator", "migrate", "--from", str(empty), "--to", str(target))
    assert done.returncode == 1 and "holds no network" in done.stderr, done.stderr
    assert sorted(path.name for path in tmp_path.iterdir()) == ["empty.db"]  # the target (and its WAL) went again


@pytest.mark.parametrize(("db", "message"), [
    ("postgresql://u@[::1/db", "--db: not a PostgreSQL connection string (Invalid IPv6 URL)"),
    ("POSTGRESQL://u@h/db", "write the scheme in lower case, postgresql://"),
    ("postgres:/x", "--db 'postgres:/x' is neither a file nor a postgresql:// connection string"),
    ("mysql://u:secret@h/db", "--db mysql://... is neither a file nor a postgresql:// connection string"),
])
def test_a_db_string_meant_as_postgresql_but_not_one_is_a_usage_error_and_makes_no_file(
        tmp_path: Path, db: str, message: str) -> None:
    done = subprocess.run([str(Path(sys.executable).parent / "tunnelmesh"), "coordinator", "--db", db, "--listen",
                           "127.0.0.1:1", "--plain-http", "--no-stun"], cwd=tmp_path, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and message in done.stderr, done.stderr
    assert "secret" not in done.stderr and "Traceback" not in done.stderr
    assert list(tmp_path.iterdir()) == []  # no SQLite file made from a typo
