"""The coordinator's state: one SQLite file (docs/coordinator.md, "Storage").

The file is created mode 0600 (it holds who is in the network and where they are; it
does not hold the network secret: the admin's machine seals that to each joiner). It runs in WAL
mode with ``synchronous=FULL``: an answered request is on disk. Every write is
one ``BEGIN IMMEDIATE`` transaction (`Store.transaction`), so a refused or
failed operation leaves no row behind. The schema is versioned with
``PRAGMA user_version`` and migrated forward at open; a file from a newer
tunnelmesh is refused rather than guessed at.

Signed records are stored as the JSON they arrived as and served as stored:
nodes verify them, the coordinator is not trusted to. Every change that
nodes must see bumps one version counter (``network.version``) and writes the
new value on the changed row, so ``GET /v1/map?since=N`` is "rows with
version > N". Pending join requests and invite use counts are not part of the
map and do not bump it.

Every sqlite3 error becomes a `StoreError` whose message says what to do.
"""

from __future__ import annotations

import functools
import json
import os
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeVar

from tunnelmesh.membership import Entry, MemberEntry, b64

#: Schema versions, applied in order; entry i takes the file to user_version i + 1.
MIGRATIONS: list[tuple[str, ...]] = [
    (
        """CREATE TABLE network (
            id INTEGER PRIMARY KEY CHECK (id = 1),
            record TEXT NOT NULL,
            secret TEXT NOT NULL,
            secret_epoch INTEGER NOT NULL,
            secret_record TEXT,
            secret_version INTEGER NOT NULL,
            version INTEGER NOT NULL)""",
        """CREATE TABLE members (
            wg_key TEXT PRIMARY KEY,
            name TEXT NOT NULL UNIQUE,
            host INTEGER NOT NULL UNIQUE,
            ipv4 TEXT NOT NULL,
            ipv6 TEXT NOT NULL,
            fingerprint TEXT NOT NULL,
            identity TEXT NOT NULL,
            entry TEXT NOT NULL,
            addresses TEXT NOT NULL DEFAULT '[]',
            last_seen INTEGER,
            version INTEGER NOT NULL)""",
        """CREATE TABLE invites (
            invite_key TEXT PRIMARY KEY,
            record TEXT NOT NULL,
            used INTEGER NOT NULL)""",
        """CREATE TABLE revocations (
            wg_key TEXT PRIMARY KEY,
            record TEXT NOT NULL,
            at INTEGER NOT NULL,
            version INTEGER NOT NULL)""",
        """CREATE TABLE pending (
            wg_key TEXT PRIMARY KEY,
            name TEXT NOT NULL UNIQUE,
            host INTEGER NOT NULL UNIQUE,
            identity TEXT NOT NULL,
            fingerprint TEXT NOT NULL,
            requested INTEGER NOT NULL,
            approved INTEGER NOT NULL DEFAULT 0)""",
        "CREATE INDEX members_version ON members (version)",
        "CREATE INDEX revocations_version ON revocations (version)",
    ),
    # 2: what a member offers for the SSH rung (opaque JSON; nodes verify it), NULL for nothing.
    ("ALTER TABLE members ADD COLUMN ssh TEXT",),
    # 3: the URL of the relay a member serves (relay = true), NULL for none.
    ("ALTER TABLE members ADD COLUMN relay TEXT",),
    # 4: the coordinator no longer holds the network secret (the admin's machine seals it to
    # each joiner); a pending request reserves no name or address, and a join with an invite
    # waits in it for the admin's countersignature. Old pending rows are dropped (joiners
    # ask again).
    (
        "UPDATE network SET secret = ''",
        "DROP TABLE pending",
        """CREATE TABLE pending (
            wg_key TEXT PRIMARY KEY,
            name TEXT NOT NULL,
            identity TEXT NOT NULL,
            fingerprint TEXT NOT NULL,
            requested INTEGER NOT NULL,
            source TEXT NOT NULL,
            entry TEXT,
            proof TEXT,
            approved INTEGER NOT NULL DEFAULT 0,
            sealed TEXT,
            refused TEXT)""",
        "CREATE INDEX pending_source ON pending (source)",
    ),
    # 5: the network policy (the admin-signed record, as it arrived), the latest only; a
    # network from before it has none (docs/filter.md, "What is in force").
    (
        """CREATE TABLE policy (
            id INTEGER PRIMARY KEY CHECK (id = 1),
            record TEXT NOT NULL,
            policy_version INTEGER NOT NULL,
            version INTEGER NOT NULL)""",
    ),
    # 6: a member's candidate record (tunnelmesh.nat.candidates, as it arrived: nodes verify
    # it too) and its version, the newest taken; NULL until the member registers one.
    ("ALTER TABLE members ADD COLUMN candidates TEXT", "ALTER TABLE members ADD COLUMN candidates_version INTEGER"),
]

_P = ParamSpec("_P")
_R = TypeVar("_R")


class StoreError(Exception):
    """The coordinator's database cannot be used; the message says what to do."""


@dataclass(frozen=True)
class NetworkRow:
    record: dict[str, Any]
    epoch: int
    secret_record: dict[str, Any] | None
    secret_version: int
    version: int


@dataclass(frozen=True)
class MemberRow:
    wg_key: str
    name: str
    host: int
    identity: str
    entry: dict[str, Any]
    addresses: list[str]
    last_seen: int | None
    version: int
    ssh: dict[str, Any] | None
    relay: str | None = None
    candidates: dict[str, Any] | None = None  # the member's signed candidate record, the newest taken

    @property
    def is_device(self) -> bool:
        """A plain WireGuard device (`DeviceEntry`): stored with no identity line, as it has none."""
        return not self.identity


@dataclass(frozen=True)
class RevocationRow:
    record: dict[str, Any]
    at: int
    version: int


@dataclass(frozen=True)
class PolicyRow:
    record: dict[str, Any]
    policy_version: int  # the record's own version (signed)
    version: int  # the map version of its last change


@dataclass(frozen=True)
class PendingRow:
    """A join waiting for the admin: a request for approval (`entry` None), or a join with
    an invite (`entry`: the invite-signed entry, `proof`: the SSHSIG over its body) waiting
    for the admin's machine to countersign. Nothing is reserved by it."""

    wg_key: str
    name: str
    identity: str
    fingerprint: str
    requested: int
    source: str
    entry: dict[str, Any] | None = None
    proof: str | None = None
    approved: bool = False
    sealed: dict[str, Any] | None = None  # the network secret the admin sealed to the joiner
    refused: str | None = None  # why the admin's machine refused it


def _guarded(method: Callable[Concatenate[Store, _P], _R]) -> Callable[Concatenate[Store, _P], _R]:
    """sqlite3 errors never escape: they become a StoreError that says what to do."""

    @functools.wraps(method)
    def wrapper(self: Store, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return method(self, *args, **kwargs)
        except sqlite3.Error as exc:
            raise self.error(exc) from None

    return wrapper


def _json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


def _loads(text: str) -> Any:
    """A stored JSON column; a damaged one is a StoreError, not a crash."""
    try:
        return json.loads(text)
    except (TypeError, ValueError, RecursionError):
        raise StoreError("a row of the coordinator database holds damaged JSON (was it edited by hand?); "
                         "restore the file from a backup") from None


class Store:
    """The coordinator's SQLite file. Not thread-safe: one event loop uses it."""

    def __init__(self, path: Path, conn: sqlite3.Connection) -> None:
        self.path = path
        self._conn = conn
        self._conn.row_factory = sqlite3.Row
        self._depth = 0
        self._bumped = False
        self._listeners: list[Callable[[], None]] = []

    @classmethod
    def open(cls, path: Path) -> Store:
        """Open (creating it, mode 0600) and migrate the database at `path`."""
        path = Path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            os.close(os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o600))
        except OSError as exc:
            raise StoreError(f"cannot open the coordinator database {path}: {exc.strerror or exc} "
                             "(check that its directory is writable by this user)") from None
        try:
            conn = sqlite3.connect(path, isolation_level=None, timeout=5.0)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open the coordinator database {path}: {exc}") from None
        store = cls(path, conn)
        try:
            store._prepare()
        except BaseException:
            conn.close()
            raise
        return store

    def close(self) -> None:
        self._conn.close()

    def error(self, exc: sqlite3.Error) -> StoreError:
        """What a sqlite3 error means for whoever runs this coordinator."""
        name = getattr(exc, "sqlite_errorname", "")
        where = f"coordinator database {self.path}"
        if name.startswith("SQLITE_FULL"):
            return StoreError(f"{where}: the disk is full; free some space (the change was not saved)")
        if name.startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB")):
            return StoreError(f"{where} is damaged (corrupt, or not a database): restore it from a backup, "
                              "or move it aside to start a new one (the network must then be set up again)")
        if name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")):
            return StoreError(f"{where} is locked by another process (another coordinator on the same file?); "
                              "stop it or use another --db")
        if name.startswith("SQLITE_READONLY"):
            return StoreError(f"{where} is read-only: make it and its directory writable by this user")
        if name.startswith("SQLITE_CANTOPEN"):
            return StoreError(f"cannot open the {where}: check that its directory exists and is writable")
        if name.startswith("SQLITE_IOERR"):
            return StoreError(f"{where}: disk I/O error; check the disk (the change was not saved)")
        if name.startswith("SQLITE_CONSTRAINT"):
            return StoreError(f"{where}: the change conflicts with what is stored ({exc}); "
                              "was the file edited by hand?")
        return StoreError(f"{where}: {exc}")

    @_guarded
    def _prepare(self) -> None:
        self._conn.execute("PRAGMA journal_mode=WAL").fetchone()
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.execute("PRAGMA foreign_keys=ON")
        self._conn.execute("PRAGMA secure_delete=ON")  # the secret files of old versions leave no trace
        with self.transaction():
            current = self._conn.execute("PRAGMA user_version").fetchone()[0]
            if current > len(MIGRATIONS):
                raise StoreError(f"{self.path} was made by a newer tunnelmesh (schema version {current}; this one "
                                 f"knows up to {len(MIGRATIONS)}): upgrade tunnelmesh, or use another --db")
            for number in range(current + 1, len(MIGRATIONS) + 1):
                for statement in MIGRATIONS[number - 1]:
                    self._conn.execute(statement)
                self._conn.execute(f"PRAGMA user_version = {number}")

    # --- transactions and change notification ------------------------------------------------

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """All or nothing: every write inside commits together, or none does. Nests
        (only the outermost commits). Listeners hear of a version bump after commit."""
        if self._depth:
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
            return
        try:
            self._conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise self.error(exc) from None
        self._depth, self._bumped = 1, False
        try:
            yield
            self._conn.execute("COMMIT")
        except BaseException as exc:
            if self._conn.in_transaction:
                try:
                    self._conn.execute("ROLLBACK")
                except sqlite3.Error:
                    pass  # the original failure is what matters; SQLite rolls back on close anyway
            if isinstance(exc, sqlite3.Error):
                raise self.error(exc) from None
            raise
        finally:
            self._depth = 0
        if self._bumped:
            for listener in list(self._listeners):
                listener()

    def add_listener(self, listener: Callable[[], None]) -> None:
        """Call `listener` after each committed change that bumped the version (wakes long-polls)."""
        self._listeners.append(listener)

    def remove_listener(self, listener: Callable[[], None]) -> None:
        self._listeners.remove(listener)

    def _bump(self) -> int:
        row = self._conn.execute("UPDATE network SET version = version + 1 RETURNING version").fetchone()
        if row is None:
            raise StoreError(f"coordinator database {self.path}: no network is set up")
        self._bumped = True
        return int(row[0])

    # --- network ----------------------------------------------------------------------------

    @property
    @_guarded
    def version(self) -> int:
        """The version counter (0 before setup)."""
        row = self._conn.execute("SELECT version FROM network").fetchone()
        return 0 if row is None else int(row[0])

    @_guarded
    def network(self) -> NetworkRow | None:
        row = self._conn.execute("SELECT * FROM network").fetchone()
        if row is None:
            return None
        return NetworkRow(_loads(row["record"]), row["secret_epoch"],
                          None if row["secret_record"] is None else _loads(row["secret_record"]),
                          row["secret_version"], row["version"])

    @_guarded
    def set_network(self, record: dict[str, Any]) -> int:
        """Take a network (secret epoch 0, no secret record yet). Setting up is a change: version 1."""
        with self.transaction():
            self._conn.execute(
                "INSERT INTO network (id, record, secret, secret_epoch, secret_record, secret_version, version) "
                "VALUES (1, ?, '', 0, NULL, 0, 0)", (_json(record),))
            return self._bump()

    @_guarded
    def set_secret(self, record: dict[str, Any], epoch: int) -> int:
        """The admin's record of a new secret (sealed to each member; the secret itself is not here)."""
        with self.transaction():
            version = self._bump()
            self._conn.execute("UPDATE network SET secret_epoch = ?, secret_record = ?, secret_version = ?",
                               (epoch, _json(record), version))
            return version

    @_guarded
    def policy(self) -> PolicyRow | None:
        row = self._conn.execute("SELECT * FROM policy").fetchone()
        return None if row is None else PolicyRow(_loads(row["record"]), row["policy_version"], row["version"])

    @_guarded
    def set_policy(self, record: dict[str, Any], policy_version: int) -> int | None:
        """Keep the admin's network policy record in place of the stored one, if its version
        is above the stored one's: the new map version, or None (nothing changed) if not."""
        with self.transaction():
            stored = self._conn.execute("SELECT policy_version FROM policy").fetchone()
            if stored is not None and stored[0] >= policy_version:
                return None
            version = self._bump()
            self._conn.execute(
                "INSERT INTO policy (id, record, policy_version, version) VALUES (1, ?, ?, ?) ON CONFLICT (id) DO "
                "UPDATE SET record = excluded.record, policy_version = excluded.policy_version, "
                "version = excluded.version", (_json(record), policy_version, version))
            return version

    # --- members ------------------------------------------------------------------------------

    @staticmethod
    def _member(row: sqlite3.Row) -> MemberRow:
        return MemberRow(row["wg_key"], row["name"], row["host"], row["identity"], _loads(row["entry"]),
                         _loads(row["addresses"]), row["last_seen"], row["version"],
                         None if row["ssh"] is None else _loads(row["ssh"]), row["relay"],
                         None if row["candidates"] is None else _loads(row["candidates"]))

    @_guarded
    def member(self, wg_key: str) -> MemberRow | None:
        row = self._conn.execute("SELECT * FROM members WHERE wg_key = ?", (wg_key,)).fetchone()
        return None if row is None else self._member(row)

    @_guarded
    def member_named(self, name: str) -> MemberRow | None:
        row = self._conn.execute("SELECT * FROM members WHERE name = ?", (name,)).fetchone()
        return None if row is None else self._member(row)

    @_guarded
    def members(self, since: int = 0) -> list[MemberRow]:
        """Members whose row changed after version `since` (all of them for 0)."""
        rows = self._conn.execute("SELECT * FROM members WHERE version > ? ORDER BY host", (since,))
        return [self._member(row) for row in rows]

    @_guarded
    def add_member(self, entry: dict[str, Any], member: Entry, host: int) -> int:
        """Store a verified entry as it arrived (`entry`), at host number `host`. A device
        has no identity: its identity and fingerprint columns are empty (`MemberRow.is_device`)."""
        identity = member.identity.to_line() if isinstance(member, MemberEntry) else ""
        with self.transaction():
            version = self._bump()
            self._conn.execute(
                "INSERT INTO members (wg_key, name, host, ipv4, ipv6, fingerprint, identity, entry, version) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (b64(member.wg_key), member.name, host, str(member.ipv4), str(member.ipv6),
                 member.ssh_fingerprint or "", identity, _json(entry), version))
            return version

    @_guarded
    def set_endpoints(self, wg_key: str, addresses: list[str], now: int, ssh: dict[str, Any] | None = None,
                      relay: str | None = None) -> bool:
        """Record where a member was seen, what it offers for the SSH rung and the relay it
        serves (None: nothing); bumps the version only if any of them changed."""
        with self.transaction():
            row = self._conn.execute("SELECT addresses, ssh, relay FROM members WHERE wg_key = ?", (wg_key,)).fetchone()
            if row is None:
                return False
            stored_ssh = None if row["ssh"] is None else _loads(row["ssh"])
            changed = _loads(row["addresses"]) != addresses or stored_ssh != ssh or row["relay"] != relay
            if changed:
                self._conn.execute("UPDATE members SET addresses = ?, ssh = ?, relay = ?, version = ? WHERE wg_key = ?",
                                   (_json(addresses), None if ssh is None else _json(ssh), relay, self._bump(),
                                    wg_key))
            self._conn.execute("UPDATE members SET last_seen = ? WHERE wg_key = ?", (now, wg_key))
            return changed

    @_guarded
    def set_candidates(self, wg_key: str, record: dict[str, Any], version: int) -> int | None:
        """Keep a member's candidate record (verified) in place of the stored one if its
        version is above the stored one's (bumping the map version): None then, and for the
        stored record again; else the stored version that refuses it (a replay, or the
        member's clock went back)."""
        with self.transaction():
            row = self._conn.execute("SELECT candidates, candidates_version FROM members WHERE wg_key = ?",
                                     (wg_key,)).fetchone()
            if row is None or (row["candidates"] is not None and _loads(row["candidates"]) == record):
                return None
            stored = row["candidates_version"]
            if stored is not None and stored >= version:
                return int(stored)
            self._conn.execute(
                "UPDATE members SET candidates = ?, candidates_version = ?, version = ? WHERE wg_key = ?",
                (_json(record), version, self._bump(), wg_key))
            return None

    @_guarded
    def host_taken(self, host: int) -> bool:
        """Whether a member holds host number `host` (pending requests hold nothing)."""
        return self._conn.execute("SELECT 1 FROM members WHERE host = ?", (host,)).fetchone() is not None

    @_guarded
    def free_hosts(self, count: int = 1) -> list[int]:
        """The `count` lowest host numbers >= 1 that no member holds."""
        used = {row[0] for row in self._conn.execute("SELECT host FROM members")}
        free: list[int] = []
        candidate = 1
        while len(free) < count:
            if candidate not in used:
                free.append(candidate)
            candidate += 1
        return free

    def free_host(self) -> int:
        return self.free_hosts(1)[0]

    # --- invites --------------------------------------------------------------------------------

    @_guarded
    def invite_uses(self, invite_key: str) -> int:
        row = self._conn.execute("SELECT used FROM invites WHERE invite_key = ?", (invite_key,)).fetchone()
        return 0 if row is None else int(row[0])

    @_guarded
    def use_invite(self, invite_key: str, grant: dict[str, Any]) -> None:
        with self.transaction():
            self._conn.execute(
                "INSERT INTO invites (invite_key, record, used) VALUES (?, ?, 1) "
                "ON CONFLICT (invite_key) DO UPDATE SET used = used + 1", (invite_key, _json(grant)))

    # --- revocations ------------------------------------------------------------------------------

    @_guarded
    def revocation(self, wg_key: str) -> RevocationRow | None:
        row = self._conn.execute("SELECT * FROM revocations WHERE wg_key = ?", (wg_key,)).fetchone()
        return None if row is None else RevocationRow(_loads(row["record"]), row["at"], row["version"])

    @_guarded
    def revocations(self, since: int = 0) -> list[dict[str, Any]]:
        rows = self._conn.execute("SELECT record FROM revocations WHERE version > ? ORDER BY version", (since,))
        return [_loads(row["record"]) for row in rows]

    @_guarded
    def revoke(self, wg_key: str, record: dict[str, Any], at: int, *, drop_member: bool) -> int:
        """Keep the revocation (replacing an older one for the key), drop the key's pending
        request and, if the revocation covers its entry, its member row."""
        with self.transaction():
            version = self._bump()
            self._conn.execute(
                "INSERT INTO revocations (wg_key, record, at, version) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (wg_key) DO UPDATE SET record = excluded.record, at = excluded.at, version = excluded.version",
                (wg_key, _json(record), at, version))
            self._conn.execute("DELETE FROM pending WHERE wg_key = ?", (wg_key,))
            if drop_member:
                self._conn.execute("DELETE FROM members WHERE wg_key = ?", (wg_key,))
            return version

    # --- pending joins (approval requests, and invited joins waiting to be countersigned) ---------

    @staticmethod
    def _pending(row: sqlite3.Row) -> PendingRow:
        return PendingRow(row["wg_key"], row["name"], row["identity"], row["fingerprint"], row["requested"],
                          row["source"], None if row["entry"] is None else _loads(row["entry"]), row["proof"],
                          bool(row["approved"]), None if row["sealed"] is None else _loads(row["sealed"]),
                          row["refused"])

    @_guarded
    def pending(self, wg_key: str, fresh_since: int) -> PendingRow | None:
        """The key's pending join, unless it was made before `fresh_since` (expired)."""
        row = self._conn.execute("SELECT * FROM pending WHERE wg_key = ? AND requested >= ?",
                                 (wg_key, fresh_since)).fetchone()
        return None if row is None else self._pending(row)

    @_guarded
    def waiting(self, fresh_since: int) -> list[PendingRow]:
        """Joins the admin has neither approved nor refused, made since `fresh_since`, oldest first."""
        rows = self._conn.execute("SELECT * FROM pending WHERE NOT approved AND refused IS NULL AND requested >= ? "
                                  "ORDER BY requested, name", (fresh_since,))
        return [self._pending(row) for row in rows]

    @_guarded
    def pending_count(self, fresh_since: int, *, invited: bool, source: str | None = None) -> int:
        """How many unexpired requests for approval (invited=False) or invited joins wait,
        from one source address or from all (admitted and refused ones, kept to be collected,
        do not)."""
        query = ("SELECT count(*) FROM pending WHERE requested >= ? AND NOT approved AND refused IS NULL "
                 "AND (entry IS NOT NULL) = ?")
        args: tuple[Any, ...] = (fresh_since, invited)
        if source is not None:
            query += " AND source = ?"
            args += (source,)
        return int(self._conn.execute(query, args).fetchone()[0])

    @_guarded
    def put_pending(self, request: PendingRow) -> None:
        """Add a pending join, or replace the key's earlier one."""
        with self.transaction():
            self._conn.execute(
                "INSERT OR REPLACE INTO pending (wg_key, name, identity, fingerprint, requested, source, entry, proof, "
                "approved, sealed, refused) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (request.wg_key, request.name, request.identity, request.fingerprint, request.requested,
                 request.source, None if request.entry is None else _json(request.entry), request.proof,
                 int(request.approved), None if request.sealed is None else _json(request.sealed), request.refused))

    @_guarded
    def mark_approved(self, wg_key: str, sealed: dict[str, Any]) -> None:
        with self.transaction():
            self._conn.execute("UPDATE pending SET approved = 1, sealed = ? WHERE wg_key = ?", (_json(sealed), wg_key))

    @_guarded
    def mark_refused(self, wg_key: str, reason: str) -> bool:
        with self.transaction():
            cursor = self._conn.execute("UPDATE pending SET refused = ? WHERE wg_key = ? AND NOT approved",
                                        (reason, wg_key))
            return cursor.rowcount > 0

    @_guarded
    def delete_pending(self, wg_key: str) -> None:
        with self.transaction():
            self._conn.execute("DELETE FROM pending WHERE wg_key = ?", (wg_key,))

    @_guarded
    def purge_pending(self, before: int) -> int:
        """Drop pending joins made before `before` (expired)."""
        with self.transaction():
            return self._conn.execute("DELETE FROM pending WHERE requested < ?", (before,)).rowcount
