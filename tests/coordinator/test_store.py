"""The coordinator's store, on both backends (tests/conftest.py `database`): versioned
schema, one version counter recorded on every changed row, all-or-nothing transactions,
consistent reads, and storage failures as StoreError with a message that says what to do.
Then what is particular to each: SQLite's private WAL file, PostgreSQL's connection
string (whose password no message shows)."""

from __future__ import annotations

import asyncio
import base64
import json
import stat
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.support.coordinator import SECRET, World
from tests.support.databases import Database, assert_no_secret, sqlite_database
from tunnelmesh.coordinator.store import PendingRow, Store, StoreError, open_store
from tunnelmesh.coordinator.store.postgres import without_password
from tunnelmesh.coordinator.store.schema import MIGRATIONS, TABLES, postgres_ddl
from tunnelmesh.coordinator.store.sqlite import SqliteStore
from tunnelmesh.membership import SecretRecord, b64

#: A time the pending rows of these tests were made after (none has expired).
FRESH = 0
#: A password in connection strings that no message may show.
PASSWORD = "hunter2-not-for-logs"


@pytest.fixture(scope="module")
def world() -> World:
    return World.create()


@pytest.fixture
def db(database: Database) -> Database:
    return database


@pytest.fixture
def sqlite_db(tmp_path: Path) -> Database:
    """For what only SQLite's file has (its mode, WAL, a damaged file, a full disk)."""
    return sqlite_database(tmp_path)


@asynccontextmanager
async def opened(db: Database, world: World | None = None) -> AsyncIterator[Store]:
    """The store on `db`, holding `world`'s network if given; closed afterwards."""
    store = await open_store(db.url)
    try:
        if world is not None:
            await store.set_network(world.network.to_wire())
        yield store
    finally:
        await store.close()


async def add(store: Store, world: World, i: int, name: str, host: int) -> int:
    wire = world.admin_member(i, name, host)
    return await store.add_member(wire, world.entry(wire), host)


def key(world: World, i: int) -> str:
    return b64(world.nodes[i].public.wg_public_key)


def pending(world: World, i: int, name: str, requested: int = 1, source: str = "192.0.2.1",
            entry: dict[str, object] | None = None) -> PendingRow:
    identity = world.nodes[i].public
    return PendingRow(key(world, i), name, identity.to_line(), identity.fingerprint, requested, source, entry,
                      None if entry is None else "proof")


def schema_version(db: Database) -> int:
    """The schema version the database records (SQLite: user_version; PostgreSQL: its row)."""
    if db.backend == "sqlite":
        return int(db.query("PRAGMA user_version")[0][0])
    return int(db.query("SELECT version FROM schema_version")[0][0])


def set_schema_version(db: Database, version: int) -> None:
    if db.backend == "sqlite":
        db.execute(f"PRAGMA user_version = {version}")
    else:
        db.execute("UPDATE schema_version SET version = ?", version)


def create_at_schema(db: Database, version: int) -> None:
    """An empty database as a tunnelmesh of schema `version` left it."""
    statements = [statement for migration in MIGRATIONS[:version] for statement in migration]
    if db.backend == "sqlite":
        db.path.parent.mkdir(parents=True, exist_ok=True)
        statements.append(f"PRAGMA user_version = {version}")
    else:
        statements = ["CREATE TABLE schema_version (id INTEGER PRIMARY KEY CHECK (id = 1), version INTEGER NOT NULL)",
                      *map(postgres_ddl, statements), f"INSERT INTO schema_version (id, version) VALUES (1, {version})"]
    for statement in statements:
        db.execute(statement)


# --- what both backends do alike ---------------------------------------------------------------


def test_a_new_database_is_at_the_latest_schema_with_every_table_empty(db: Database) -> None:
    async def scenario() -> None:
        async with opened(db) as store:
            assert await store.network() is None and store.version == 0 and await store.read_version() == 0

    asyncio.run(scenario())
    assert schema_version(db) == len(MIGRATIONS)
    assert db.row_counts() == dict.fromkeys(TABLES, 0)
    asyncio.run(scenario())  # opened again: nothing to migrate, nothing changed
    assert schema_version(db) == len(MIGRATIONS)


def test_reopened_store_keeps_everything(db: Database, world: World) -> None:
    async def scenario() -> None:
        async with opened(db, world) as store:
            await add(store, world, 0, "admin", 1)
            await add(store, world, 1, "one", 2)
            await store.set_endpoints(key(world, 1), ["192.0.2.1:51820"], 1234)
            await store.use_invite("invite-key", {"grant": True})
            await store.put_pending(pending(world, 2, "later"))
            await store.revoke(key(world, 1), {"revocation": True}, 99, drop_member=True)
            before, version = db.snapshot(), store.version

        async with opened(db) as reopened:
            assert db.snapshot() == before and reopened.version == version
            network = await reopened.network()
            assert network is not None and network.record == world.network.to_wire()
            assert [m.name for m in await reopened.members()] == ["admin"]
            assert await reopened.invite_uses("invite-key") == 1
            assert await reopened.revocation(key(world, 1)) is not None
            assert [p.name for p in await reopened.waiting(FRESH)] == ["later"]

    asyncio.run(scenario())


def test_a_version_1_database_is_migrated_and_keeps_its_members(db: Database, world: World) -> None:
    """Schemas 2 and 3 added members.ssh and members.relay, schema 5 the network policy,
    schema 6 members' candidate records: a database from before them opens with every
    member, offering nothing, and no policy (a network from before the packet filter)."""
    create_at_schema(db, 1)

    async def scenario() -> None:
        async with opened(db, world) as store:
            await add(store, world, 0, "admin", 1)
        async with opened(db) as store:
            admin = await store.member(key(world, 0))
            assert admin is not None and admin.ssh is None and admin.relay is None and admin.candidates is None
            assert await store.set_endpoints(key(world, 0), [], 1, {"host_key": "k"}, "http://192.0.2.1:7401")
            admin = await store.member(key(world, 0))
            assert admin is not None and admin.ssh == {"host_key": "k"} and admin.relay == "http://192.0.2.1:7401"
            assert await store.policy() is None
            assert await store.set_candidates(key(world, 0), {"version": 2}, 2) is None  # taken: none stored before
            assert await store.set_candidates(key(world, 0), {"version": 1}, 1) == 2  # older than the stored one
            admin = await store.member(key(world, 0))
            assert admin is not None and admin.candidates == {"version": 2}

    asyncio.run(scenario())
    assert schema_version(db) == len(MIGRATIONS) == 7


def test_a_version_3_database_loses_its_stored_secret_and_its_pending_reservations(db: Database,
                                                                                 world: World) -> None:
    """Schema 4: the secret column of an older database is blanked and the old pending
    table (which reserved a name and an address) is dropped."""
    create_at_schema(db, 3)
    db.execute("INSERT INTO network (id, record, secret, secret_epoch, secret_record, secret_version, version) "
               "VALUES (1, ?, ?, 0, NULL, 0, 1)", json.dumps(world.network.to_wire()),
               base64.b64encode(SECRET).decode())
    db.execute("INSERT INTO pending (wg_key, name, host, identity, fingerprint, requested, approved) "
               "VALUES ('k', 'squatter', 5, 'line', 'fp', 1, 0)")
    assert db.query("SELECT secret FROM network") == [(base64.b64encode(SECRET).decode(),)]

    async def scenario() -> None:
        async with opened(db) as store:
            network = await store.network()
            assert network is not None and network.record == world.network.to_wire()
            assert await store.waiting(0) == [] and await store.free_host() == 1
            await store.use_invite("k", {})  # a write after the migration

    asyncio.run(scenario())
    assert schema_version(db) == len(MIGRATIONS)
    if db.backend == "sqlite":
        db.query("PRAGMA wal_checkpoint(TRUNCATE)")  # secure_delete: the old pages are overwritten, not left
    assert_no_secret(db, SECRET)


def test_a_database_from_a_newer_tunnelmesh_is_refused(db: Database) -> None:
    async def scenario() -> None:
        async with opened(db):
            pass
        set_schema_version(db, len(MIGRATIONS) + 1)
        with pytest.raises(StoreError, match="made by a newer tunnelmesh.*upgrade tunnelmesh, or use another --db"):
            await open_store(db.url)

    asyncio.run(scenario())
    assert schema_version(db) == len(MIGRATIONS) + 1  # left as it was


def test_a_row_of_damaged_json_is_a_store_error_that_says_what_to_do(db: Database, world: World) -> None:
    async def scenario() -> None:
        async with opened(db, world) as store:
            await add(store, world, 0, "admin", 1)
            db.execute("UPDATE members SET entry = ? WHERE host = 1", '{"body": {"name": "adm')  # edited by hand
            for read in (store.member(key(world, 0)), store.members()):
                with pytest.raises(StoreError, match="damaged JSON.*restore the database from a backup"):
                    await read

    asyncio.run(scenario())


@pytest.mark.parametrize("offer", [{"ssh": {"port": 22}}, {"relay": "http://192.0.2.1:7401"}], ids=["ssh", "relay"])
def test_an_offer_for_the_ssh_or_relay_rung_is_kept_and_a_change_of_it_bumps_the_version(
        db: Database, world: World, offer: dict[str, Any]) -> None:
    [(column, value)] = offer.items()

    async def scenario() -> None:
        async with opened(db, world) as store:
            await add(store, world, 0, "admin", 1)
            version = store.version
            assert await store.set_endpoints(key(world, 0), ["192.0.2.1:1"], 200, **offer)
            assert not await store.set_endpoints(key(world, 0), ["192.0.2.1:1"], 201, **offer)  # the same: no bump
            admin = await store.member(key(world, 0))
            assert admin is not None and getattr(admin, column) == value and admin.last_seen == 201
            assert await store.set_endpoints(key(world, 0), ["192.0.2.1:1"], 202)  # withdrawn: a change too
            admin = await store.member(key(world, 0))
            assert store.version == version + 2 and admin is not None and getattr(admin, column) is None
            assert admin.last_seen == 202

    asyncio.run(scenario())


def test_every_change_records_the_new_version_on_its_row(db: Database, world: World) -> None:
    async def scenario() -> None:
        async with opened(db, world) as store:
            assert store.version == 1
            v_admin = await add(store, world, 0, "admin", 1)
            v_one = await add(store, world, 1, "one", 2)
            assert (v_admin, v_one) == (2, 3)
            assert [m.version for m in await store.members()] == [2, 3]
            assert [m.name for m in await store.members(since=2)] == ["one"]
            one = await store.member_named("one")
            assert await store.member_count() == 2 and one is not None and one.host == 2

            assert await store.set_endpoints(key(world, 0), ["192.0.2.1:1"], 100)
            assert store.version == 4 and (await store.member(key(world, 0))).version == 4  # type: ignore[union-attr]
            assert not await store.set_endpoints(key(world, 0), ["192.0.2.1:1"], 200)  # same addresses: no bump
            admin = await store.member(key(world, 0))
            assert store.version == 4 and admin is not None and admin.last_seen == 200

            v_revoke = await store.revoke(key(world, 1), {"r": 1}, 50, drop_member=True)
            assert (await store.revocation(key(world, 1))).version == v_revoke == 5  # type: ignore[union-attr]
            assert await store.revocations(since=4) == [{"r": 1}] and await store.revocations(since=5) == []
            assert await store.member(key(world, 1)) is None

            v_secret = await store.set_secret({"s": 1}, 1)
            network = await store.network()
            assert network is not None and network.secret_version == v_secret == network.version == 6
            assert network.epoch == 1 and network.secret_record == {"s": 1}

            assert await store.set_policy({"p": 2}, 2) == 7
            assert await store.set_policy({"p": 1}, 1) is None and await store.set_policy({"p": 2}, 2) is None
            policy = await store.policy()
            assert policy is not None and (policy.record, policy.policy_version, policy.version) == ({"p": 2}, 2, 7)
            assert store.version == await store.read_version() == 7

    asyncio.run(scenario())


def test_free_hosts_are_the_lowest_no_member_holds_and_pending_joins_hold_none(db: Database, world: World) -> None:
    """Issue 13, defect 3: a request waiting for approval reserves no address (the old
    store counted pending rows in host_taken and free_host)."""
    async def scenario() -> None:
        async with opened(db, world) as store:
            assert await store.free_host() == 1 and await store.free_hosts(3) == [1, 2, 3]
            await add(store, world, 0, "admin", 1)
            await add(store, world, 1, "three", 3)
            await store.put_pending(pending(world, 2, "two"))
            assert await store.free_host() == 2 and not await store.host_taken(2) and await store.host_taken(3)
            assert await store.free_hosts(3) == [2, 4, 5]

    asyncio.run(scenario())


def test_pending_joins_expire_wherever_they_are_read_and_are_counted_apart(db: Database, world: World) -> None:
    async def scenario() -> None:
        async with opened(db, world) as store:
            await store.put_pending(pending(world, 1, "old", requested=100))
            await store.put_pending(pending(world, 2, "new", requested=200))
            await store.put_pending(pending(world, 3, "other", requested=200, source="198.51.100.9"))
            await store.put_pending(pending(world, 4, "invited", requested=200, entry={"body": {}, "grant": {}}))
            # Made before `fresh_since`: expired, read nowhere, even before it is purged.
            assert await store.pending(key(world, 1), 101) is None and await store.pending(key(world, 1), 100)
            assert [p.name for p in await store.waiting(101)] == ["invited", "new", "other"]
            assert await store.pending_count(101, invited=False) == 2
            assert await store.pending_count(100, invited=False) == 3
            assert await store.pending_count(101, invited=False, source="192.0.2.1") == 1
            assert await store.pending_count(101, invited=True) == 1
            invited = await store.pending(key(world, 4), 101)
            assert invited is not None and invited.entry == {"body": {}, "grant": {}} and invited.proof == "proof"
            # Approved or refused: no longer waiting for the admin; the approval keeps the sealed secret.
            await store.mark_approved(key(world, 2), {"epoch": 0, "sealed": "c2VhbGVk"})
            assert await store.mark_refused(key(world, 3), "no")
            assert not await store.mark_refused(key(world, 2), "too late")
            assert [p.name for p in await store.waiting(101)] == ["invited"]
            approved, refused = await store.pending(key(world, 2), 101), await store.pending(key(world, 3), 101)
            assert approved is not None and approved.approved
            assert approved.sealed == {"epoch": 0, "sealed": "c2VhbGVk"}
            assert refused is not None and refused.refused == "no"
            # put_pending replaces the key's row (a new request starts afresh).
            await store.put_pending(pending(world, 3, "again", requested=300))
            again = await store.pending(key(world, 3), 101)
            assert again is not None and (again.name, again.refused) == ("again", None)
            assert await store.purge_pending(101) == 1 and await store.pending(key(world, 1), 0) is None
            await store.delete_pending(key(world, 4))
            assert await store.pending(key(world, 4), 0) is None
            assert store.version == 1  # pending joins are not part of the map

    asyncio.run(scenario())


def test_the_store_holds_no_network_secret(db: Database, world: World) -> None:
    """Issue 13, defect 6: set-up and rotation hand the coordinator records only; no
    byte of the secret reaches the database (the old store kept it in network.secret)."""
    new_secret = bytes(range(200, 232))

    async def scenario() -> None:
        async with opened(db, world) as store:
            await add(store, world, 0, "admin", 1)
            record = SecretRecord.create(world.admin, 1, new_secret, [world.entry(world.admin_member(0, "admin", 1))],
                                         5)
            await store.set_secret(record.to_wire(), 1)

    asyncio.run(scenario())
    assert_no_secret(db, SECRET, new_secret)


def test_a_failed_transaction_leaves_nothing_and_wakes_nobody(db: Database, world: World) -> None:
    async def scenario() -> None:
        async with opened(db, world) as store:
            woken: list[int] = []
            store.add_listener(lambda: woken.append(store.version))
            before = db.snapshot()
            with pytest.raises(RuntimeError, match="refused halfway"):
                async with store.transaction():
                    await add(store, world, 0, "admin", 1)
                    await store.use_invite("k", {})
                    assert woken == []  # not before the commit
                    raise RuntimeError("refused halfway")
            assert db.snapshot() == before and woken == [] and store.version == 1
            await store.put_pending(pending(world, 1, "p"))  # not part of the map: no wake-up
            assert woken == []
            async with store.transaction():  # two bumps, one commit: wake-ups after it only
                await add(store, world, 0, "admin", 1)  # the rolled-back bump is gone too: version 2
                await store.set_policy({"p": 1}, 1)
                assert woken == []
            # PostgreSQL may also tell of the first bump (its NOTIFY, heard at the same commit).
            assert woken in ([3], [2, 3]) and await store.read_version() == 3

    asyncio.run(scenario())


def test_a_conflicting_write_is_a_store_error_and_rolls_back(db: Database, world: World) -> None:
    async def scenario() -> None:
        async with opened(db, world) as store:
            await add(store, world, 0, "admin", 1)
            before, version = db.snapshot(), store.version
            with pytest.raises(StoreError, match="conflicts with what is stored"):
                await add(store, world, 1, "other", 1)  # host 1 is taken
            with pytest.raises(StoreError, match="conflicts with what is stored"):
                await add(store, world, 1, "admin", 2)  # so is the name
            assert db.snapshot() == before and store.version == version == await store.read_version()
            await add(store, world, 1, "other", 2)  # the store is usable afterwards
            assert store.version == version + 1

    asyncio.run(scenario())


def test_a_read_only_transaction_reads_one_moment_and_refuses_a_write(db: Database, world: World) -> None:
    async def scenario() -> None:
        async with opened(db, world) as store:
            await add(store, world, 0, "admin", 1)
            async with store.transaction(write=False):
                version = await store.read_version()
                db.execute("UPDATE network SET version = version + 1")  # another writer commits meanwhile
                assert [m.name for m in await store.members()] == ["admin"]
                assert await store.read_version() == version
                with pytest.raises(RuntimeError, match="a write inside a read-only store transaction"):
                    await store.use_invite("k", {})
            assert await store.read_version() == version + 1 and await store.invite_uses("k") == 0

    asyncio.run(scenario())


# --- SQLite's file ------------------------------------------------------------------------------


def test_open_creates_a_private_wal_file(sqlite_db: Database) -> None:
    async def scenario() -> None:
        async with opened(sqlite_db) as store:
            await store.use_invite("k", {})  # any write, so that the WAL file exists
            for path in (sqlite_db.path, sqlite_db.path.with_name(sqlite_db.path.name + "-wal")):
                assert stat.S_IMODE(path.stat().st_mode) == 0o600, path

    asyncio.run(scenario())
    assert sqlite_db.query("PRAGMA journal_mode") == [("wal",)]


def test_a_damaged_file_is_refused_with_what_to_do(sqlite_db: Database) -> None:
    sqlite_db.path.parent.mkdir()
    sqlite_db.path.write_bytes(b"this is not a database, " * 400)
    with pytest.raises(StoreError, match="damaged.*restore it from a backup"):
        asyncio.run(open_store(sqlite_db.url))


def test_a_full_disk_is_a_store_error_and_rolls_back(sqlite_db: Database, world: World) -> None:
    async def scenario() -> None:
        async with opened(sqlite_db, world) as store:
            assert isinstance(store, SqliteStore)
            before = sqlite_db.row_counts()
            # A full disk, as SQLite sees it: the database may not grow.
            pages = store._conn.execute("PRAGMA page_count").fetchone()[0]
            store._conn.execute(f"PRAGMA max_page_count = {pages}")
            with pytest.raises(StoreError, match="disk is full"):
                await store.use_invite("k" * 10_000, {"padding": "x" * 100_000})
            assert sqlite_db.row_counts() == before and await store.invite_uses("k" * 10_000) == 0

    asyncio.run(scenario())


# --- PostgreSQL's connection string -----------------------------------------------------------


def socket_dsn(server: Any, database: str, password: str | None = PASSWORD, user: str = "postgres") -> str:
    """A connection string to `database` on the test server's Unix socket (trust: any password passes)."""
    login = user if password is None else f"{user}:{password}"
    return f"postgresql://{login}@/{database}?host={server.socket_dir}"


@pytest.mark.parametrize("case", ["no such database", "no such role", "no such socket", "nothing on the port",
                                  "a bad address", "a bad port", "password in the query"])
def test_a_postgresql_database_that_cannot_be_used_says_what_to_do_and_never_shows_the_password(
        postgres_server: Any, case: str) -> None:
    dsn, what_to_do = {
        "no such database": (socket_dsn(postgres_server, "nosuchdb"), r'"nosuchdb" does not exist; create it first'),
        "no such role": (socket_dsn(postgres_server, "postgres", user="nobody"),
                         r'cannot log in to .*role "nobody" does not exist; check the user'),
        "no such socket": (f"postgresql://postgres:{PASSWORD}@/x?host={postgres_server.socket_dir}/nowhere",
                           r"cannot reach .*\(is PostgreSQL running there"),
        "nothing on the port": (f"postgresql://postgres:{PASSWORD}@127.0.0.1:1/x",
                                r"cannot reach .*Connect call failed.*\(is PostgreSQL running there"),
        "a bad address": (f"postgresql://postgres:{PASSWORD}@[::1/x", "not a PostgreSQL connection string.*e.g. "),
        "a bad port": (f"postgresql://postgres:{PASSWORD}@localhost:port/x", "not a PostgreSQL connection string"),
        "password in the query": (f"postgresql://postgres@/nosuchdb?host={postgres_server.socket_dir}&"
                                  f"password={PASSWORD}", "create it first"),
    }[case]
    with pytest.raises(StoreError, match=what_to_do) as refused:
        asyncio.run(asyncio.wait_for(open_store(dsn), 30))
    assert PASSWORD not in str(refused.value)
    if case == "no such database":  # the password given apart (--db-password-file) is not shown either
        with pytest.raises(StoreError, match=what_to_do) as refused:
            asyncio.run(open_store(socket_dsn(postgres_server, "nosuchdb", None), PASSWORD))
        assert PASSWORD not in str(refused.value)


def test_an_open_postgresql_store_shows_its_connection_string_without_the_password(postgres_server: Any) -> None:
    name = "shown"
    postgres_server.create_database(name)

    async def scenario() -> None:
        for dsn in (socket_dsn(postgres_server, name),
                    f"postgresql://postgres@/{name}?password={PASSWORD}&host={postgres_server.socket_dir}"):
            store = await open_store(dsn)
            try:
                assert PASSWORD not in store.where and name in store.where and store.backend == "postgresql"
            finally:
                await store.close()

    asyncio.run(scenario())


def test_a_task_started_inside_a_transaction_is_not_in_it(database: Database, world: World) -> None:
    """A task copies its starter's context, transaction included: it must not write on the
    starter's connection outside its lock, nor lose its version bump."""
    async def scenario() -> None:
        async with opened(database, world) as store:
            heard: list[int] = []
            store.add_listener(lambda: heard.append(store.version))
            async with store.transaction():
                child = asyncio.get_running_loop().create_task(add(store, world, 1, "one", 2))
            await child  # its own transaction, after the starter's
            assert store.version == await store.read_version() == 2 and heard == [2]

    asyncio.run(scenario())


@pytest.mark.parametrize(("dsn", "shown"), [
    ("postgresql://tm:hunter2@db.example/tm", "postgresql://tm@db.example/tm"),
    ("postgresql://tm@db.example/tm?sslpassword=hunter2&sslmode=require",
     "postgresql://tm@db.example/tm?sslmode=require"),
    ("postgresql://tm:hunter2@db.example/tm?password=hunter2", "postgresql://tm@db.example/tm"),
    ("postgresql://:hunter2@db.example/tm", "postgresql://db.example/tm"),
    ("postgresql://tm@/tm?host=/run/postgresql", "postgresql://tm@/tm?host=/run/postgresql"),
])
def test_a_connection_string_is_shown_without_any_password(dsn: str, shown: str) -> None:
    assert without_password(dsn) == shown
