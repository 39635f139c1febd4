"""The coordinator's state (docs/coordinator.md, "Storage"): what both backends share.

`Store` holds every operation the service needs, written once over four primitives
that a backend provides (`_fetchone`, `_fetchall`, `_execute`, `_begin`): SQLite
(tunnelmesh.coordinator.store.sqlite, the default, embedded) and PostgreSQL
(tunnelmesh.coordinator.store.postgres, for several coordinators on one database).
The queries are written in the SQL both engines take, with ``?`` placeholders.

Every write is one transaction (`Store.transaction`), and write transactions are
serialised across every coordinator on the database (SQLite: ``BEGIN IMMEDIATE``;
PostgreSQL: a transaction-scoped advisory lock), so a check made inside one still
holds at its commit: no address is given twice, no one-time invite used twice, under
any interleaving of coordinators. A refused or failed operation leaves no row behind.

Signed records are stored as the JSON they arrived as and served as stored: nodes
verify them, the coordinator is not trusted to. Every change that nodes must see
bumps one version counter (``network.version``) and writes the new value on the
changed row, so ``GET /v1/map?since=N`` is "rows with version > N". Pending join
requests and invite use counts are not part of the map and do not bump it.

`version` is the newest version this process knows committed, kept without a query:
its own commits move it, and so do other coordinators' (PostgreSQL NOTIFY, and
`catch_up`, a read at most once a second, for a notification that was missed).
Listeners hear of each move (they wake the long-polls). Every database error becomes
a `StoreError` whose message says what to do.
"""

from __future__ import annotations

import binascii
import asyncio
import json
import os
import time
from base64 import b64decode
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Protocol

from tunnelmesh.membership import Entry, MemberEntry, b64

#: The longest a coordinator goes without reading the version itself (a missed notification).
CATCH_UP_INTERVAL = 1.0
#: An announcement of where a member's relay connection is: "relay KEY COORDINATOR URL", URL
#: GONE when that coordinator no longer holds it, KEY EVERY_KEY when it holds none any more.
PRESENCE = "relay"
GONE = "-"
#: The announcement of a punch request, PUNCH ASKER PEER (member keys in base64): the
#: coordinator the peer long-polls hands it its notice (tunnelmesh.coordinator.punch).
PUNCH = "punch"
EVERY_KEY = "*"
#: How many random bytes the coordinators' shared secret has.
CLUSTER_SECRET_SIZE = 32

#: Hears an announcement of relay presence: (member key in base64 or EVERY_KEY, coordinator id,
#: its URL or None for gone).
PresenceListener = Callable[[str, str, str | None], None]


class StoreError(Exception):
    """The coordinator's database cannot be used; the message says what to do. `where`:
    the database as the message names it, if that is not for everyone's eyes (a
    PostgreSQL connection string: its host, user and name stay out of HTTP answers)."""

    where: str | None = None


class Row(Protocol):
    """A result row: sqlite3.Row and asyncpg.Record both read by column name and position."""

    def __getitem__(self, key: str | int) -> Any: ...


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


@dataclass
class Transaction:
    """The transaction the current task is in (a backend keeps its connection here)."""

    write: bool
    task: asyncio.Task[Any] | None  # the one task it belongs to (a task started inside does not inherit it)
    connection: Any = None
    bumped: int | None = None  # the version this transaction moved the counter to
    pending_changed: bool = False  # a pending join came, went, or was decided
    depth: int = 1


def _json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


def _loads(text: str) -> Any:
    """A stored JSON column; a damaged one is a StoreError, not a crash."""
    try:
        return json.loads(text)
    except (TypeError, ValueError, RecursionError):
        raise StoreError("a row of the coordinator database holds damaged JSON (was it edited by hand?); "
                         "restore the database from a backup") from None


def _maybe(text: str | None) -> Any:
    return None if text is None else _loads(text)


class Store:
    """The coordinator's database, over a backend's primitives. One event loop uses it;
    its tasks may run transactions concurrently (each in its own context)."""

    #: "sqlite" or "postgresql": what `tunnelmesh coordinator` logs and status shows.
    backend = ""
    #: Whether other coordinators may share this database (and forward relay frames among them).
    shared = False

    def __init__(self, where: str, monotonic: Callable[[], float] = time.monotonic) -> None:
        self.where = where  # the database, for messages (no secret: a PostgreSQL DSN's password is cut)
        self.version = 0
        self._listeners: list[Callable[[], None]] = []
        self._pending_listeners: list[Callable[[], None]] = []
        self._presence_listeners: list[PresenceListener] = []
        self._punch_listeners: list[Callable[[str, str], None]] = []
        self._current: ContextVar[Transaction | None] = ContextVar(f"store-transaction-{id(self)}", default=None)
        self._monotonic = monotonic
        self._caught_up_at = float("-inf")

    # --- what a backend provides -------------------------------------------------------------

    async def _fetchone(self, sql: str, args: Sequence[Any] = ()) -> Row | None:
        raise NotImplementedError

    async def _fetchall(self, sql: str, args: Sequence[Any] = ()) -> list[Row]:
        raise NotImplementedError

    async def _execute(self, sql: str, args: Sequence[Any] = ()) -> int:
        """Run a statement; how many rows it changed."""
        raise NotImplementedError

    def _begin(self, transaction: Transaction) -> AbstractAsyncContextManager[None]:
        """Open `transaction` (a write one serialised against every other writer), commit
        it when the block ends, roll it back if it raises."""
        raise NotImplementedError

    async def _announce(self, transaction: Transaction) -> None:
        """Last thing in a transaction that changed the version or a pending join: tell the
        other coordinators (at its commit)."""

    async def _watch(self) -> None:
        """Make sure the other coordinators' announcements reach this process."""

    async def _announce_presence(self, payload: str) -> None:
        """Tell every coordinator (this one too) of a PRESENCE change: here, this one alone."""
        self._presence_notified(payload)

    async def close(self) -> None:
        raise NotImplementedError

    # --- transactions and change notification ------------------------------------------------

    @asynccontextmanager
    async def transaction(self, *, write: bool = True) -> AsyncIterator[None]:
        """All or nothing: every write inside commits together, or none does. Nests (only
        the outermost commits; a write inside a read-only one is a bug). Listeners hear of
        a version bump after commit. `write=False`: a consistent read of one moment."""
        current = self._in_transaction()
        if current is not None:
            if write and not current.write:
                raise RuntimeError("a write inside a read-only store transaction")
            current.depth += 1
            try:
                yield
            finally:
                current.depth -= 1
            return
        transaction = Transaction(write, asyncio.current_task())
        token = self._current.set(transaction)
        try:
            async with self._begin(transaction):
                yield
                if transaction.bumped is not None or transaction.pending_changed:
                    await self._announce(transaction)
        finally:
            self._current.reset(token)
        if transaction.bumped is not None:
            self._advance(transaction.bumped)
        if transaction.pending_changed:
            self._pending_moved()

    def _in_transaction(self) -> Transaction | None:
        """The transaction the current task is in: a task started inside one copies the
        context but is not in it (its connection and lock are the starter's, for as long as
        the starter holds them)."""
        transaction = self._current.get()
        return transaction if transaction is not None and transaction.task is asyncio.current_task() else None

    def add_listener(self, listener: Callable[[], None]) -> None:
        """Call `listener` each time the known version moves (wakes long-polls)."""
        self._listeners.append(listener)

    def remove_listener(self, listener: Callable[[], None]) -> None:
        self._listeners.remove(listener)

    def add_pending_listener(self, listener: Callable[[], None]) -> None:
        """Call `listener` when a pending join came, went or was decided, through this
        coordinator or another (wakes the admin's wait and the joiners' confirms)."""
        self._pending_listeners.append(listener)

    def remove_pending_listener(self, listener: Callable[[], None]) -> None:
        self._pending_listeners.remove(listener)

    def _pending_moved(self) -> None:
        for listener in list(self._pending_listeners):
            listener()

    def _touch_pending(self) -> None:
        transaction = self._in_transaction()
        assert transaction is not None and transaction.write, "a pending join changed outside a write transaction"
        transaction.pending_changed = True

    def _advance(self, version: int) -> None:
        """A version committed (here, or by another coordinator): move to it, tell listeners."""
        if version <= self.version:
            return
        self.version = version
        for listener in list(self._listeners):
            listener()

    async def catch_up(self) -> None:
        """Read the version (at most once per CATCH_UP_INTERVAL, whoever asks): a change
        whose announcement was lost still reaches this coordinator's long-polls."""
        now = self._monotonic()
        if now - self._caught_up_at < CATCH_UP_INTERVAL:
            return
        self._caught_up_at = now
        await self._watch()
        self._advance(await self.read_version())

    @property
    def poll_interval(self) -> float | None:
        """How often a waiting long-poll should `catch_up` itself: None while every commit
        that matters is heard of as it happens (this backend's announcements work)."""
        return None

    async def read_version(self) -> int:
        """The version counter as the database holds it now (0 before setup)."""
        row = await self._fetchone("SELECT version FROM network")
        return 0 if row is None else int(row[0])

    async def _bump(self) -> int:
        transaction = self._in_transaction()
        assert transaction is not None and transaction.write, "a version bump outside a write transaction"
        row = await self._fetchone("UPDATE network SET version = version + 1 RETURNING version")
        if row is None:
            raise StoreError(f"coordinator database {self.where}: no network is set up")
        transaction.bumped = version = int(row[0])
        return version

    # --- network ----------------------------------------------------------------------------

    async def network(self) -> NetworkRow | None:
        row = await self._fetchone("SELECT * FROM network")
        if row is None:
            return None
        return NetworkRow(_loads(row["record"]), int(row["secret_epoch"]), _maybe(row["secret_record"]),
                          int(row["secret_version"]), int(row["version"]))

    async def set_network(self, record: dict[str, Any]) -> int:
        """Take a network (secret epoch 0, no secret record yet). Setting up is a change: version 1."""
        async with self.transaction():
            await self._execute(
                "INSERT INTO network (id, record, secret, secret_epoch, secret_record, secret_version, version) "
                "VALUES (1, ?, '', 0, NULL, 0, 0)", (_json(record),))
            return await self._bump()

    async def set_secret(self, record: dict[str, Any], epoch: int) -> int:
        """The admin's record of a new secret (sealed to each member; the secret itself is not here)."""
        async with self.transaction():
            version = await self._bump()
            await self._execute("UPDATE network SET secret_epoch = ?, secret_record = ?, secret_version = ?",
                                (epoch, _json(record), version))
            return version

    async def policy(self) -> PolicyRow | None:
        row = await self._fetchone("SELECT * FROM policy")
        return None if row is None else PolicyRow(_loads(row["record"]), int(row["policy_version"]),
                                                  int(row["version"]))

    async def set_policy(self, record: dict[str, Any], policy_version: int) -> int | None:
        """Keep the admin's network policy record in place of the stored one, if its version
        is above the stored one's: the new map version, or None (nothing changed) if not."""
        async with self.transaction():
            stored = await self._fetchone("SELECT policy_version FROM policy")
            if stored is not None and stored[0] >= policy_version:
                return None
            version = await self._bump()
            await self._execute(
                "INSERT INTO policy (id, record, policy_version, version) VALUES (1, ?, ?, ?) ON CONFLICT (id) DO "
                "UPDATE SET record = excluded.record, policy_version = excluded.policy_version, "
                "version = excluded.version", (_json(record), policy_version, version))
            return version

    # --- members ------------------------------------------------------------------------------

    @staticmethod
    def _member(row: Row) -> MemberRow:
        last_seen = row["last_seen"]
        return MemberRow(row["wg_key"], row["name"], int(row["host"]), row["identity"], _loads(row["entry"]),
                         _loads(row["addresses"]), None if last_seen is None else int(last_seen), int(row["version"]),
                         _maybe(row["ssh"]), row["relay"], _maybe(row["candidates"]))

    async def member(self, wg_key: str) -> MemberRow | None:
        row = await self._fetchone("SELECT * FROM members WHERE wg_key = ?", (wg_key,))
        return None if row is None else self._member(row)

    async def member_named(self, name: str) -> MemberRow | None:
        row = await self._fetchone("SELECT * FROM members WHERE name = ?", (name,))
        return None if row is None else self._member(row)

    async def members(self, since: int = 0) -> list[MemberRow]:
        """Members whose row changed after version `since` (all of them for 0)."""
        # Sorted here, not by ORDER BY host: that makes SQLite walk the host index and skip
        # members_version, a scan of the whole table for a delta of one row.
        rows = await self._fetchall("SELECT * FROM members WHERE version > ?", (since,))
        return sorted((self._member(row) for row in rows), key=lambda member: member.host)

    async def member_count(self) -> int:
        row = await self._fetchone("SELECT count(*) FROM members")
        return 0 if row is None else int(row[0])

    async def add_member(self, entry: dict[str, Any], member: Entry, host: int) -> int:
        """Store a verified entry as it arrived (`entry`), at host number `host`. A device
        has no identity: its identity and fingerprint columns are empty (`MemberRow.is_device`)."""
        identity = member.identity.to_line() if isinstance(member, MemberEntry) else ""
        async with self.transaction():
            version = await self._bump()
            await self._execute(
                "INSERT INTO members (wg_key, name, host, ipv4, ipv6, fingerprint, identity, entry, version) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (b64(member.wg_key), member.name, host, str(member.ipv4), str(member.ipv6),
                 member.ssh_fingerprint or "", identity, _json(entry), version))
            return version

    async def set_endpoints(self, wg_key: str, addresses: list[str], now: int, ssh: dict[str, Any] | None = None,
                            relay: str | None = None) -> bool:
        """Record where a member was seen, what it offers for the SSH rung and the relay it
        serves (None: nothing); bumps the version only if any of them changed. A register
        that changes nothing (most: nodes register every 15 s) writes only the time seen,
        outside the writers' lock."""
        row = await self._fetchone("SELECT addresses, ssh, relay FROM members WHERE wg_key = ?", (wg_key,))
        if row is None:
            return False
        if _loads(row["addresses"]) == addresses and _maybe(row["ssh"]) == ssh and row["relay"] == relay:
            await self._execute("UPDATE members SET last_seen = ? WHERE wg_key = ?", (now, wg_key))
            return False
        async with self.transaction():  # read again under the lock: another coordinator may have written
            row = await self._fetchone("SELECT addresses, ssh, relay FROM members WHERE wg_key = ?", (wg_key,))
            if row is None:
                return False
            changed = _loads(row["addresses"]) != addresses or _maybe(row["ssh"]) != ssh or row["relay"] != relay
            if changed:
                await self._execute(
                    "UPDATE members SET addresses = ?, ssh = ?, relay = ?, version = ? WHERE wg_key = ?",
                    (_json(addresses), None if ssh is None else _json(ssh), relay, await self._bump(), wg_key))
            await self._execute("UPDATE members SET last_seen = ? WHERE wg_key = ?", (now, wg_key))
            return changed

    async def set_candidates(self, wg_key: str, record: dict[str, Any], version: int) -> int | None:
        """Keep a member's candidate record (verified) in place of the stored one if its
        version is above the stored one's (bumping the map version): None then, and for the
        stored record again; else the stored version that refuses it (a replay, or the
        member's clock went back)."""
        async with self.transaction():
            row = await self._fetchone("SELECT candidates, candidates_version FROM members WHERE wg_key = ?",
                                       (wg_key,))
            if row is None or (row["candidates"] is not None and _loads(row["candidates"]) == record):
                return None
            stored = row["candidates_version"]
            if stored is not None and stored >= version:
                return int(stored)
            await self._execute(
                "UPDATE members SET candidates = ?, candidates_version = ?, version = ? WHERE wg_key = ?",
                (_json(record), version, await self._bump(), wg_key))
            return None

    async def host_taken(self, host: int) -> bool:
        """Whether a member holds host number `host` (pending requests hold nothing)."""
        return await self._fetchone("SELECT 1 FROM members WHERE host = ?", (host,)) is not None

    async def free_hosts(self, count: int = 1) -> list[int]:
        """The `count` lowest host numbers >= 1 that no member holds."""
        used = {int(row[0]) for row in await self._fetchall("SELECT host FROM members")}
        free: list[int] = []
        candidate = 1
        while len(free) < count:
            if candidate not in used:
                free.append(candidate)
            candidate += 1
        return free

    async def free_host(self) -> int:
        return (await self.free_hosts(1))[0]

    # --- invites --------------------------------------------------------------------------------

    async def invite_uses(self, invite_key: str) -> int:
        row = await self._fetchone("SELECT used FROM invites WHERE invite_key = ?", (invite_key,))
        return 0 if row is None else int(row[0])

    async def use_invite(self, invite_key: str, grant: dict[str, Any]) -> None:
        async with self.transaction():
            await self._execute(
                "INSERT INTO invites (invite_key, record, used) VALUES (?, ?, 1) "
                "ON CONFLICT (invite_key) DO UPDATE SET used = invites.used + 1", (invite_key, _json(grant)))

    # --- revocations ------------------------------------------------------------------------------

    async def revocation(self, wg_key: str) -> RevocationRow | None:
        row = await self._fetchone("SELECT * FROM revocations WHERE wg_key = ?", (wg_key,))
        return None if row is None else RevocationRow(_loads(row["record"]), int(row["at"]), int(row["version"]))

    async def revocations(self, since: int = 0) -> list[dict[str, Any]]:
        rows = await self._fetchall("SELECT record FROM revocations WHERE version > ? ORDER BY version", (since,))
        return [_loads(row["record"]) for row in rows]

    async def revoke(self, wg_key: str, record: dict[str, Any], at: int, *, drop_member: bool) -> int:
        """Keep the revocation (replacing an older one for the key), drop the key's pending
        request and, if the revocation covers its entry, its member row."""
        async with self.transaction():
            version = await self._bump()
            await self._execute(
                "INSERT INTO revocations (wg_key, record, at, version) VALUES (?, ?, ?, ?) ON CONFLICT (wg_key) "
                "DO UPDATE SET record = excluded.record, at = excluded.at, version = excluded.version",
                (wg_key, _json(record), at, version))
            if await self._execute("DELETE FROM pending WHERE wg_key = ?", (wg_key,)):
                self._touch_pending()
            if drop_member:
                await self._execute("DELETE FROM members WHERE wg_key = ?", (wg_key,))
            return version

    # --- pending joins (approval requests, and invited joins waiting to be countersigned) ---------

    @staticmethod
    def _pending(row: Row) -> PendingRow:
        return PendingRow(row["wg_key"], row["name"], row["identity"], row["fingerprint"], int(row["requested"]),
                          row["source"], _maybe(row["entry"]), row["proof"], bool(row["approved"]),
                          _maybe(row["sealed"]), row["refused"])

    async def pending(self, wg_key: str, fresh_since: int) -> PendingRow | None:
        """The key's pending join, unless it was made before `fresh_since` (expired)."""
        row = await self._fetchone("SELECT * FROM pending WHERE wg_key = ? AND requested >= ?", (wg_key, fresh_since))
        return None if row is None else self._pending(row)

    async def waiting(self, fresh_since: int) -> list[PendingRow]:
        """Joins the admin has neither approved nor refused, made since `fresh_since`, oldest first."""
        rows = await self._fetchall("SELECT * FROM pending WHERE approved = 0 AND refused IS NULL AND requested >= ? "
                                    "ORDER BY requested, name", (fresh_since,))
        return [self._pending(row) for row in rows]

    async def pending_count(self, fresh_since: int, *, invited: bool, source: str | None = None) -> int:
        """How many unexpired requests for approval (invited=False) or invited joins wait,
        from one source address or from all (admitted and refused ones, kept to be collected,
        do not)."""
        query = (f"SELECT count(*) FROM pending WHERE requested >= ? AND approved = 0 AND refused IS NULL "
                 f"AND entry IS {'NOT ' if invited else ''}NULL")
        args: tuple[Any, ...] = (fresh_since,)
        if source is not None:
            query += " AND source = ?"
            args += (source,)
        row = await self._fetchone(query, args)
        return 0 if row is None else int(row[0])

    async def put_pending(self, request: PendingRow) -> None:
        """Add a pending join, or replace the key's earlier one."""
        async with self.transaction():
            await self._execute(
                "INSERT INTO pending (wg_key, name, identity, fingerprint, requested, source, entry, proof, approved, "
                "sealed, refused) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (wg_key) DO UPDATE SET "
                "name = excluded.name, identity = excluded.identity, fingerprint = excluded.fingerprint, "
                "requested = excluded.requested, source = excluded.source, entry = excluded.entry, "
                "proof = excluded.proof, approved = excluded.approved, sealed = excluded.sealed, "
                "refused = excluded.refused",
                (request.wg_key, request.name, request.identity, request.fingerprint, request.requested,
                 request.source, None if request.entry is None else _json(request.entry), request.proof,
                 int(request.approved), None if request.sealed is None else _json(request.sealed), request.refused))
            self._touch_pending()

    async def mark_approved(self, wg_key: str, sealed: dict[str, Any]) -> None:
        async with self.transaction():
            await self._execute("UPDATE pending SET approved = 1, sealed = ? WHERE wg_key = ?", (_json(sealed), wg_key))
            self._touch_pending()

    async def mark_refused(self, wg_key: str, reason: str) -> bool:
        async with self.transaction():
            refused = await self._execute("UPDATE pending SET refused = ? WHERE wg_key = ? AND approved = 0",
                                          (reason, wg_key)) > 0
            if refused:
                self._touch_pending()
            return refused

    async def delete_pending(self, wg_key: str) -> None:
        async with self.transaction():
            if await self._execute("DELETE FROM pending WHERE wg_key = ?", (wg_key,)):
                self._touch_pending()

    async def purge_pending(self, before: int) -> int:
        """Drop pending joins made before `before` (expired)."""
        async with self.transaction():
            return await self._execute("DELETE FROM pending WHERE requested < ?", (before,))

    # --- punch requests across coordinators (tunnelmesh.coordinator.punch) ---------------------------

    async def announce_punch(self, asker: str, peer: str) -> None:
        """Tell the other coordinators that `asker` asked for a punch with `peer`: the one
        `peer` long-polls hands it its notice. With no other coordinator, nothing to do."""

    def add_punch_listener(self, listener: Callable[[str, str], None]) -> None:
        """Call `listener(asker, peer)` for each punch request announced by a coordinator."""
        self._punch_listeners.append(listener)

    def remove_punch_listener(self, listener: Callable[[str, str], None]) -> None:
        self._punch_listeners.remove(listener)

    def _punch_notified(self, payload: str) -> bool:
        """Pass a PUNCH announcement to the listeners; False if `payload` is not one."""
        parts = payload.split(" ")
        if len(parts) != 3 or parts[0] != PUNCH:
            return False
        for listener in list(self._punch_listeners):
            listener(parts[1], parts[2])
        return True

    # --- relays across coordinators (tunnelmesh.coordinator.cluster) -------------------------------

    def add_presence_listener(self, listener: PresenceListener) -> None:
        """Call `listener` for each announcement of relay presence, this coordinator's own too."""
        self._presence_listeners.append(listener)

    def remove_presence_listener(self, listener: PresenceListener) -> None:
        self._presence_listeners.remove(listener)

    def _presence_notified(self, payload: str) -> bool:
        """Pass a PRESENCE announcement to the listeners; False if `payload` is not one."""
        parts = payload.split(" ")
        if len(parts) != 4 or parts[0] != PRESENCE:
            return False
        _, key, coordinator, url = parts
        for listener in list(self._presence_listeners):
            listener(key, coordinator, None if url == GONE else url)
        return True

    async def relay_presence(self) -> list[tuple[str, str, str]]:
        """Every (member key, coordinator id, its URL) of the relay connections held now."""
        rows = await self._fetchall("SELECT wg_key, coordinator, url FROM relay_presence")
        return [(row[0], row[1], row[2]) for row in rows]

    async def set_relay_presence(self, wg_key: str, coordinator: str, url: str | None, now: int) -> None:
        """Record that `coordinator`, reached at `url`, holds the relay connection of `wg_key`,
        or (url None) that it no longer does: only its own row goes, so a member that moved to
        another coordinator meanwhile stays where it is. Announced to every coordinator. No
        writers' lock: the row is one member's, and no check depends on it."""
        if url is None:
            await self._execute("DELETE FROM relay_presence WHERE wg_key = ? AND coordinator = ?", (wg_key, coordinator))
        else:
            await self._execute(
                "INSERT INTO relay_presence (wg_key, coordinator, url, since) VALUES (?, ?, ?, ?) ON CONFLICT (wg_key) "
                "DO UPDATE SET coordinator = excluded.coordinator, url = excluded.url, since = excluded.since",
                (wg_key, coordinator, url, now))
        await self._announce_presence(f"{PRESENCE} {wg_key} {coordinator} {url or GONE}")

    async def drop_relay_presence(self, coordinator: str) -> None:
        """`coordinator` holds no relay connection any more (it is stopping): announced."""
        await self._execute("DELETE FROM relay_presence WHERE coordinator = ?", (coordinator,))
        await self._announce_presence(f"{PRESENCE} {EVERY_KEY} {coordinator} {GONE}")

    async def touch_relay_presence(self, coordinator: str, now: int) -> None:
        """`coordinator` is alive: one of its rows (any: the newest `since` of a coordinator's
        rows is its heartbeat) is stamped `now`. Not announced; nothing if it holds none."""
        await self._execute("UPDATE relay_presence SET since = ? WHERE coordinator = ? AND wg_key = "
                            "(SELECT wg_key FROM relay_presence WHERE coordinator = ? LIMIT 1)",
                            (now, coordinator, coordinator))

    async def drop_stale_relay_presence(self, before: int) -> list[str]:
        """Drop every row of each coordinator whose newest row is older than `before` (it is
        gone: it would have touched one); the coordinators dropped, each announced."""
        rows = await self._fetchall("SELECT coordinator FROM relay_presence GROUP BY coordinator "
                                    "HAVING max(since) < ?", (before,))
        dropped = []
        for coordinator in (row[0] for row in rows):
            # Unless it wrote a row since the read: then it lives.
            if await self._execute("DELETE FROM relay_presence WHERE coordinator = ? AND NOT EXISTS (SELECT 1 FROM "
                                   "relay_presence WHERE coordinator = ? AND since >= ?)",
                                   (coordinator, coordinator, before)):
                await self._announce_presence(f"{PRESENCE} {EVERY_KEY} {coordinator} {GONE}")
                dropped.append(coordinator)
        return dropped

    async def cluster_secret(self) -> bytes:
        """The secret the coordinators on this database prove themselves to each other with,
        made (under the writers' lock, once) by the first that asks. Never logged, never served."""
        row = await self._fetchone("SELECT secret FROM cluster")
        if row is None:
            async with self.transaction():
                await self._execute("INSERT INTO cluster (id, secret) VALUES (1, ?) ON CONFLICT (id) DO NOTHING",
                                    (b64(os.urandom(CLUSTER_SECRET_SIZE)),))
            row = await self._fetchone("SELECT secret FROM cluster")
        try:
            secret = b64decode(row[0], validate=True) if row is not None else b""
        except (binascii.Error, ValueError, TypeError):
            secret = b""
        if len(secret) != CLUSTER_SECRET_SIZE:
            raise StoreError(f"coordinator database {self.where}: the cluster secret is damaged (was it edited by "
                             "hand?); delete the row of table cluster and restart every coordinator")
        return secret

    # --- whole tables (tunnelmesh coordinator migrate) ---------------------------------------------

    async def rows(self, table: str) -> list[dict[str, Any]]:
        """Every row of `table` (one of schema.TABLES) as column -> value, in a stable order."""
        rows = await self._fetchall(f"SELECT * FROM {table} ORDER BY 1")
        return [dict(zip(_columns(row), tuple(row))) for row in rows]

    async def insert_rows(self, table: str, rows: list[dict[str, Any]]) -> None:
        """Insert rows as `rows` returns them (inside the caller's transaction)."""
        for row in rows:
            columns = list(row)
            await self._execute(f"INSERT INTO {table} ({', '.join(columns)}) VALUES "
                                f"({', '.join('?' for _ in columns)})", [row[c] for c in columns])


def _columns(row: Row) -> list[str]:
    keys = getattr(row, "keys", None)
    return list(keys()) if keys is not None else []
