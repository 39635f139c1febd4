"""The coordinator's SQLite store: a private WAL file, versioned schema, one version
counter recorded on every changed row, all-or-nothing transactions, and storage
failures as StoreError with a message that says what to do."""

from __future__ import annotations

import base64
import json
import sqlite3
import stat
from contextlib import closing
from pathlib import Path

import pytest

from tests.support.coordinator import SECRET, World, row_counts, snapshot
from tunnelmesh.coordinator.store import MIGRATIONS, PendingRow, Store, StoreError
from tunnelmesh.membership import SecretRecord, b64

#: A time the pending rows of these tests were made after (none has expired).
FRESH = 0


@pytest.fixture(scope="module")
def world() -> World:
    return World.create()


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "state" / "coordinator.db"


def with_network(db: Path, world: World) -> Store:
    store = Store.open(db)
    store.set_network(world.network.to_wire())
    return store


def add(store: Store, world: World, i: int, name: str, host: int) -> int:
    wire = world.admin_member(i, name, host)
    return store.add_member(wire, world.entry(wire), host)


def key(world: World, i: int) -> str:
    return b64(world.nodes[i].public.wg_public_key)


def pending(world: World, i: int, name: str, requested: int = 1, source: str = "192.0.2.1",
            entry: dict[str, object] | None = None) -> PendingRow:
    identity = world.nodes[i].public
    return PendingRow(key(world, i), name, identity.to_line(), identity.fingerprint, requested, source, entry,
                      None if entry is None else "proof")


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
    store.put_pending(pending(world, 2, "later"))
    store.revoke(key(world, 1), {"revocation": True}, 99, drop_member=True)
    before, version = snapshot(db), store.version
    store.close()

    reopened = Store.open(db)
    try:
        assert snapshot(db) == before and reopened.version == version
        network = reopened.network()
        assert network is not None and network.record == world.network.to_wire()
        assert [m.name for m in reopened.members()] == ["admin"]
        assert reopened.invite_uses("invite-key") == 1
        assert reopened.revocation(key(world, 1)) is not None
        assert [p.name for p in reopened.waiting(FRESH)] == ["later"]
    finally:
        reopened.close()


def test_a_version_1_file_is_migrated_and_keeps_its_members(db: Path, world: World) -> None:
    """Schemas 2 and 3 added members.ssh and members.relay, schema 5 the network policy,
    schema 6 members' candidate records: a file from before them opens with every member,
    offering nothing, and no policy (a network from before the packet filter)."""
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
        assert admin is not None and admin.ssh is None and admin.relay is None and admin.candidates is None
        assert store.set_endpoints(key(world, 0), [], 1, {"host_key": "k"}, "http://192.0.2.1:7401")
        admin = store.member(key(world, 0))
        assert admin is not None and admin.ssh == {"host_key": "k"} and admin.relay == "http://192.0.2.1:7401"
        assert store.policy() is None
        assert store.set_candidates(key(world, 0), {"version": 2}, 2) is None  # taken: none stored before
        assert store.set_candidates(key(world, 0), {"version": 1}, 1) == 2  # older than the stored one
        assert store.member(key(world, 0)).candidates == {"version": 2}  # type: ignore[union-attr]
    finally:
        store.close()
    with closing(sqlite3.connect(db)) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS) == 6


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

        v_secret = store.set_secret({"s": 1}, 1)
        network = store.network()
        assert network is not None and network.secret_version == v_secret == network.version == 6
        assert network.epoch == 1 and network.secret_record == {"s": 1}
    finally:
        store.close()


def test_free_hosts_are_the_lowest_no_member_holds_and_pending_joins_hold_none(db: Path, world: World) -> None:
    """Issue 13, defect 3: a request waiting for approval reserves no address (the old
    store counted pending rows in host_taken and free_host)."""
    store = with_network(db, world)
    try:
        assert store.free_host() == 1 and store.free_hosts(3) == [1, 2, 3]
        add(store, world, 0, "admin", 1)
        add(store, world, 1, "three", 3)
        store.put_pending(pending(world, 2, "two"))
        assert store.free_host() == 2 and not store.host_taken(2) and store.host_taken(3)
        assert store.free_hosts(3) == [2, 4, 5]
    finally:
        store.close()


def test_pending_joins_expire_wherever_they_are_read_and_are_counted_apart(db: Path, world: World) -> None:
    store = with_network(db, world)
    try:
        store.put_pending(pending(world, 1, "old", requested=100))
        store.put_pending(pending(world, 2, "new", requested=200))
        store.put_pending(pending(world, 3, "other", requested=200, source="198.51.100.9"))
        store.put_pending(pending(world, 4, "invited", requested=200, entry={"body": {}, "grant": {}}))
        # Made before `fresh_since`: expired, read nowhere, even before it is purged.
        assert store.pending(key(world, 1), 101) is None and store.pending(key(world, 1), 100) is not None
        assert [p.name for p in store.waiting(101)] == ["invited", "new", "other"]
        assert store.pending_count(101, invited=False) == 2 and store.pending_count(100, invited=False) == 3
        assert store.pending_count(101, invited=False, source="192.0.2.1") == 1
        assert store.pending_count(101, invited=True) == 1
        invited = store.pending(key(world, 4), 101)
        assert invited is not None and invited.entry == {"body": {}, "grant": {}} and invited.proof == "proof"
        # Approved or refused: no longer waiting for the admin; the approval keeps the sealed secret.
        store.mark_approved(key(world, 2), {"epoch": 0, "sealed": "c2VhbGVk"})
        assert store.mark_refused(key(world, 3), "no") and not store.mark_refused(key(world, 2), "too late")
        assert [p.name for p in store.waiting(101)] == ["invited"]
        approved, refused = store.pending(key(world, 2), 101), store.pending(key(world, 3), 101)
        assert approved is not None and approved.approved and approved.sealed == {"epoch": 0, "sealed": "c2VhbGVk"}
        assert refused is not None and refused.refused == "no"
        # put_pending replaces the key's row (a new request starts afresh).
        store.put_pending(pending(world, 3, "again", requested=300))
        again = store.pending(key(world, 3), 101)
        assert again is not None and (again.name, again.refused) == ("again", None)
        assert store.purge_pending(101) == 1 and store.pending(key(world, 1), 0) is None
        store.delete_pending(key(world, 4))
        assert store.pending(key(world, 4), 0) is None
    finally:
        store.close()


def test_the_store_holds_no_network_secret(db: Path, world: World) -> None:
    """Issue 13, defect 6: set-up and rotation hand the coordinator records only; no
    byte of the secret reaches the file (the old store kept it in network.secret)."""
    store = with_network(db, world)
    try:
        add(store, world, 0, "admin", 1)
        new_secret = bytes(range(200, 232))
        record = SecretRecord.create(world.admin, 1, new_secret, [world.entry(world.admin_member(0, "admin", 1))], 5)
        store.set_secret(record.to_wire(), 1)
    finally:
        store.close()
    assert_no_secret(db, SECRET, new_secret)


def assert_no_secret(db: Path, *secrets: bytes) -> None:
    """No secret, raw or in base64 or hex, in the database file or its WAL."""
    files = [path.read_bytes() for path in (db, db.with_name(db.name + "-wal")) if path.exists()]
    for secret in secrets:
        for form in (secret, base64.b64encode(secret), base64.b64encode(secret)[:40], secret.hex().encode()):
            assert not any(form in data for data in files), f"the secret is in {db}"


def test_a_version_3_file_loses_its_stored_secret_and_its_pending_reservations(db: Path, world: World) -> None:
    """Schema 4: the secret column of an older file is blanked and the old pending table
    (which reserved a name and an address) is dropped."""
    db.parent.mkdir()
    with closing(sqlite3.connect(db)) as conn:
        for migration in MIGRATIONS[:3]:
            for statement in migration:
                conn.execute(statement)
        conn.execute("PRAGMA user_version = 3")
        conn.execute("INSERT INTO network (id, record, secret, secret_epoch, secret_record, secret_version, version) "
                     "VALUES (1, ?, ?, 0, NULL, 0, 1)", (json.dumps(world.network.to_wire()),
                                                         base64.b64encode(SECRET).decode()))
        conn.execute("INSERT INTO pending (wg_key, name, host, identity, fingerprint, requested, approved) "
                     "VALUES ('k', 'squatter', 5, 'line', 'fp', 1, 0)")
        conn.commit()
    assert base64.b64encode(SECRET) in db.read_bytes() + (db.with_name(db.name + "-wal").read_bytes()
                                                          if db.with_name(db.name + "-wal").exists() else b"")
    store = Store.open(db)
    try:
        network = store.network()
        assert network is not None and network.record == world.network.to_wire()
        assert store.waiting(0) == [] and store.free_host() == 1
        store.use_invite("k", {})  # a write after the migration
    finally:
        store.close()
    with closing(sqlite3.connect(db)) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    assert_no_secret(db, SECRET)


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
        store.put_pending(pending(world, 1, "p"))  # not part of the map: no wake-up
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
