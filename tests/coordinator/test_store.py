"""The coordinator's SQLite store: a private WAL file, versioned schema, one version
counter recorded on every changed row, all-or-nothing transactions, and storage
failures as StoreError with a message that says what to do."""

from __future__ import annotations

import sqlite3
import stat
from contextlib import closing
from pathlib import Path

import pytest

from tests.support.coordinator import SECRET, World, row_counts, snapshot
from tunnelmesh.coordinator.store import MIGRATIONS, PendingRow, Store, StoreError
from tunnelmesh.membership import b64


@pytest.fixture(scope="module")
def world() -> World:
    return World.create()


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "state" / "coordinator.db"


def with_network(db: Path, world: World) -> Store:
    store = Store.open(db)
    store.set_network(world.network.to_wire(), SECRET)
    return store


def add(store: Store, world: World, i: int, name: str, host: int) -> int:
    wire = world.admin_member(i, name, host)
    return store.add_member(wire, world.entry(wire), host)


def key(world: World, i: int) -> str:
    return b64(world.nodes[i].public.wg_public_key)


def pending(world: World, i: int, name: str, host: int) -> PendingRow:
    identity = world.nodes[i].public
    return PendingRow(key(world, i), name, host, identity.to_line(), identity.fingerprint, 1, False)


def test_open_creates_a_private_wal_file_at_the_latest_schema(db: Path) -> None:
    store = Store.open(db)
    try:
        assert store.network() is None and store.version == 0
        store.use_invite("k", {})  # any write, so that the WAL file exists
        for path in (db, db.with_name(db.name + "-wal")):
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    finally:
        store.close()
    with closing(sqlite3.connect(db)) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)


def test_reopened_store_keeps_everything(db: Path, world: World) -> None:
    store = with_network(db, world)
    add(store, world, 0, "admin", 1)
    add(store, world, 1, "one", 2)
    store.set_endpoints(key(world, 1), ["192.0.2.1:51820"], 1234)
    store.use_invite("invite-key", {"grant": True})
    store.add_pending(pending(world, 2, "later", 3))
    store.revoke(key(world, 1), {"revocation": True}, 99, drop_member=True)
    before, version = snapshot(db), store.version
    store.close()

    reopened = Store.open(db)
    try:
        assert snapshot(db) == before and reopened.version == version
        network = reopened.network()
        assert network is not None and network.secret == SECRET and network.record == world.network.to_wire()
        assert [m.name for m in reopened.members()] == ["admin"]
        assert reopened.invite_uses("invite-key") == 1
        assert reopened.revocation(key(world, 1)) is not None
        assert [p.name for p in reopened.waiting()] == ["later"]
    finally:
        reopened.close()


def test_a_version_1_file_is_migrated_and_keeps_its_members(db: Path, world: World) -> None:
    """Schemas 2 and 3 added members.ssh and members.relay: a file from before them opens with
    every member, offering nothing."""
    db.parent.mkdir()
    with closing(sqlite3.connect(db)) as conn:
        for statement in MIGRATIONS[0]:
            conn.execute(statement)
        conn.execute("PRAGMA user_version = 1")
        conn.commit()
    store = with_network(db, world)
    try:
        add(store, world, 0, "admin", 1)
        store.close()
        store = Store.open(db)
        admin = store.member(key(world, 0))
        assert admin is not None and admin.ssh is None and admin.relay is None
        assert store.set_endpoints(key(world, 0), [], 1, {"host_key": "k"}, "http://192.0.2.1:7401")
        admin = store.member(key(world, 0))
        assert admin is not None and admin.ssh == {"host_key": "k"} and admin.relay == "http://192.0.2.1:7401"
    finally:
        store.close()
    with closing(sqlite3.connect(db)) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS) == 3


def test_an_ssh_offer_is_kept_and_a_change_of_it_bumps_the_version(db: Path, world: World) -> None:
    store = with_network(db, world)
    try:
        add(store, world, 0, "admin", 1)
        version = store.version
        assert store.set_endpoints(key(world, 0), ["192.0.2.1:1"], 200, {"port": 22})
        assert not store.set_endpoints(key(world, 0), ["192.0.2.1:1"], 201, {"port": 22})  # the same: no bump
        assert store.member(key(world, 0)).ssh == {"port": 22}  # type: ignore[union-attr]
        assert store.set_endpoints(key(world, 0), ["192.0.2.1:1"], 202)  # withdrawn: a change too
        admin = store.member(key(world, 0))
        assert store.version == version + 2 and admin is not None and admin.ssh is None and admin.last_seen == 202
    finally:
        store.close()


def test_a_relay_offer_is_kept_and_a_change_of_it_bumps_the_version(db: Path, world: World) -> None:
    store = with_network(db, world)
    try:
        add(store, world, 0, "admin", 1)
        version = store.version
        assert store.set_endpoints(key(world, 0), ["192.0.2.1:1"], 200, None, "http://192.0.2.1:7401")
        assert not store.set_endpoints(key(world, 0), ["192.0.2.1:1"], 201, None, "http://192.0.2.1:7401")
        assert store.set_endpoints(key(world, 0), ["192.0.2.1:1"], 202)  # withdrawn
        admin = store.member(key(world, 0))
        assert store.version == version + 2 and admin is not None and admin.relay is None
    finally:
        store.close()


def test_a_file_from_a_newer_tunnelmesh_is_refused(db: Path) -> None:
    Store.open(db).close()
    with closing(sqlite3.connect(db)) as conn:
        conn.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    with pytest.raises(StoreError, match="made by a newer tunnelmesh.*upgrade tunnelmesh"):
        Store.open(db)


def test_a_damaged_file_is_refused_with_what_to_do(db: Path) -> None:
    db.parent.mkdir()
    db.write_bytes(b"this is not a database, " * 400)
    with pytest.raises(StoreError, match="damaged.*restore it from a backup"):
        Store.open(db)


def test_every_change_records_the_new_version_on_its_row(db: Path, world: World) -> None:
    store = with_network(db, world)
    try:
        assert store.version == 1
        v_admin = add(store, world, 0, "admin", 1)
        v_one = add(store, world, 1, "one", 2)
        assert (v_admin, v_one) == (2, 3)
        assert [m.version for m in store.members()] == [2, 3]
        assert [m.name for m in store.members(since=2)] == ["one"]

        assert store.set_endpoints(key(world, 0), ["192.0.2.1:1"], 100)
        assert store.version == 4 and store.member(key(world, 0)).version == 4  # type: ignore[union-attr]
        assert not store.set_endpoints(key(world, 0), ["192.0.2.1:1"], 200)  # same addresses: no bump
        admin = store.member(key(world, 0))
        assert store.version == 4 and admin is not None and admin.last_seen == 200

        v_revoke = store.revoke(key(world, 1), {"r": 1}, 50, drop_member=True)
        assert store.revocation(key(world, 1)).version == v_revoke == 5  # type: ignore[union-attr]
        assert store.revocations(since=4) == [{"r": 1}] and store.revocations(since=5) == []
        assert store.member(key(world, 1)) is None

        v_secret = store.set_secret({"s": 1}, bytes(32), 1)
        network = store.network()
        assert network is not None and network.secret_version == v_secret == network.version == 6
        assert network.epoch == 1 and network.secret == bytes(32)
    finally:
        store.close()


def test_free_host_is_the_lowest_not_held_by_a_member_or_a_pending_request(db: Path, world: World) -> None:
    store = with_network(db, world)
    try:
        assert store.free_host() == 1
        add(store, world, 0, "admin", 1)
        add(store, world, 1, "three", 3)
        store.add_pending(pending(world, 2, "two", 2))
        assert store.free_host() == 4 and store.host_taken(2) and not store.host_taken(5)
        store.delete_pending(key(world, 2))
        assert store.free_host() == 2
    finally:
        store.close()


def test_a_failed_transaction_leaves_nothing_and_wakes_nobody(db: Path, world: World) -> None:
    store = with_network(db, world)
    woken: list[int] = []
    store.add_listener(lambda: woken.append(store.version))
    try:
        before = snapshot(db)
        with pytest.raises(RuntimeError), store.transaction():
            add(store, world, 0, "admin", 1)
            store.use_invite("k", {})
            raise RuntimeError("refused halfway")
        assert snapshot(db) == before and woken == []
        store.add_pending(pending(world, 1, "p", 2))  # not part of the map: no wake-up
        assert woken == []
        add(store, world, 0, "admin", 1)
        assert woken == [2]  # the rolled-back bump is gone too
    finally:
        store.close()


def test_sqlite_errors_become_store_errors_and_roll_back(db: Path, world: World) -> None:
    store = with_network(db, world)
    try:
        add(store, world, 0, "admin", 1)
        before = row_counts(db)
        with pytest.raises(StoreError, match="conflicts with what is stored"):
            add(store, world, 1, "other", 1)  # host 1 is taken
        # A full disk, as SQLite sees it: the database may not grow.
        pages = store._conn.execute("PRAGMA page_count").fetchone()[0]
        store._conn.execute(f"PRAGMA max_page_count = {pages}")
        with pytest.raises(StoreError, match="disk is full"):
            store.use_invite("k" * 10_000, {"padding": "x" * 100_000})
        assert row_counts(db) == before
    finally:
        store.close()
