"""The PostgreSQL backend, through asyncpg: several coordinators on one database
(docs/coordinator.md, "Running several coordinators").

Every write transaction first takes one transaction-scoped advisory lock, so writes
are serialised across all coordinators as SQLite's ``BEGIN IMMEDIATE`` serialises
them within one: a check made in a transaction (an address free, an invite unused)
still holds at its commit. Reads need no lock (READ COMMITTED; a consistent read of
one moment is a REPEATABLE READ, read-only transaction). A transaction that moved the
map version, or changed a pending join, says so with ``NOTIFY`` (delivered at commit,
to every coordinator LISTENing on its own connection); `catch_up` reads the version
too, for a notification lost with a dropped connection. Any role that may connect may
NOTIFY on any channel: every payload carries a MAC with a key derived from the
database's cluster secret, and one without is ignored (counted). A member's relay connection
coming to or leaving a coordinator is announced on the same channel (`set_relay_presence`). The schema version is the ``schema_version`` row.

The connection string's password never appears in a message or a log line: `where`
shows the string without it.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
import re
import urllib.parse
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from functools import lru_cache
from typing import Any

from .base import CATCH_UP_INTERVAL, PUNCH, Row, Store, StoreError, Transaction
from .schema import MIGRATIONS, postgres_ddl

log = logging.getLogger("tunnelmesh.coordinator.store")

#: The advisory lock every write transaction takes (an arbitrary constant: "tm" + "writ").
WRITERS_LOCK = 0x746D_77726974
#: The NOTIFY channel of changes (payload: the new map version, or PENDING: a pending join
#: came, went or was decided, which wakes the admin's wait and the joiners' confirms).
CHANNEL = "tunnelmesh_changes"
PENDING = "pending"
#: Bytes of the MAC every notification carries (128 bits).
MAC_SIZE = 16
#: How often the listening connection must answer a query to be kept (a half-open one hears nothing).
LISTENER_CHECK = 30.0
#: Connections per coordinator (the listener's is apart).
POOL_SIZE = 10
#: How long a connection attempt or a statement may take before the request gets a 503.
TIMEOUT = 10.0

_PLACEHOLDER = re.compile(r"\?")


@lru_cache(maxsize=256)
def numbered(sql: str) -> str:
    """`?` placeholders as PostgreSQL's $1, $2, ... (no query of ours has a literal `?`)."""
    count = iter(range(1, 1000))
    return _PLACEHOLDER.sub(lambda _: f"${next(count)}", sql)


def without_password(dsn: str) -> str:
    """The connection string as it may be shown: its password (if any) cut out."""
    try:
        parts = urllib.parse.urlsplit(dsn)
        query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
        kept = [(k, v) for k, v in query if "password" not in k.lower()]  # password, sslpassword
        parts = parts._replace(query=urllib.parse.urlencode(kept, safe="/"))
        if parts.password is not None:
            host = parts.netloc.rsplit("@", 1)[1]
            parts = parts._replace(netloc=f"{parts.username}@{host}" if parts.username else host)
        return urllib.parse.urlunsplit(parts)
    except ValueError:
        return "postgresql://(a connection string that does not parse)"


def _asyncpg() -> Any:
    try:
        import asyncpg
    except ImportError:
        raise StoreError("--db names a PostgreSQL database but asyncpg is not installed: "
                         "pip install 'tunnelmesh[postgresql]'") from None
    return asyncpg


class PostgresStore(Store):
    """The coordinator's PostgreSQL database, shared with other coordinators."""

    backend = "postgresql"
    shared = True

    def __init__(self, dsn: str, pool: Any, password: str | None) -> None:
        super().__init__(without_password(dsn))
        self._dsn = dsn
        self._password = password
        self._pool = pool
        self._listener: Any = None
        self._notify_key = b""  # set at open, from the cluster secret
        self._watching = False  # a (re)connect of the listener in flight
        self._listener_checked = float("-inf")
        self.forged_notifications = 0
        self._asyncpg = _asyncpg()

    @classmethod
    async def open(cls, dsn: str, password: str | None = None) -> PostgresStore:
        """Connect to `dsn` (`password`, if given, in place of one in it or PGPASSWORD) and migrate."""
        asyncpg = _asyncpg()
        where = without_password(dsn)
        try:
            pool = await asyncpg.create_pool(dsn, password=password, min_size=1, max_size=POOL_SIZE,
                                             timeout=TIMEOUT, command_timeout=TIMEOUT)
        except Exception as exc:  # asyncpg raises OSError, its own errors, ValueError for a bad DSN, timeouts
            raise _connect_error(where, exc) from None
        store = cls(dsn, pool, password)
        try:
            await store._prepare()
            store._notify_key = hmac.new(await store.cluster_secret(), b"tunnelmesh notify", hashlib.sha256).digest()
            await store._watch()
        except BaseException:
            await store.close()
            raise
        return store

    async def close(self) -> None:
        if self._listener is not None and not self._listener.is_closed():
            try:
                await self._listener.close(timeout=TIMEOUT)
            except Exception:  # closing anyway; nothing to tell
                self._listener.terminate()
        self._listener = None
        try:
            async with asyncio.timeout(TIMEOUT):
                await self._pool.close()
        except Exception:
            self._pool.terminate()

    def error(self, exc: BaseException) -> StoreError:
        """What an asyncpg error means for whoever runs this coordinator (its `where`: the
        connection string, which the HTTP answers leave out)."""
        error = self._error(exc)
        error.where = self.where
        return error

    def _error(self, exc: BaseException) -> StoreError:
        where = f"coordinator database {self.where}"
        state = getattr(exc, "sqlstate", "") or ""
        if state == "53300":
            return StoreError(f"{where}: the database server has no connection left (max_connections): raise it, "
                              f"or run fewer coordinators (each holds up to {POOL_SIZE + 1})")
        if isinstance(exc, asyncio.TimeoutError) or state in {"57014", "55P03"}:
            return StoreError(f"{where}: the database did not answer within {TIMEOUT:g} s (overloaded, a lock held "
                              "long, or the server unreachable); the change was not saved")
        if state == "53100":
            return StoreError(f"{where}: the database server's disk is full; free some space (the change was not "
                              "saved)")
        if state.startswith("23"):
            return StoreError(f"{where}: the change conflicts with what is stored ({exc}); was the database edited "
                              "by hand?")
        if state.startswith(("08", "57P")) or isinstance(exc, OSError) or (
                type(exc).__name__ in {"ConnectionDoesNotExistError", "InterfaceError"}):
            return StoreError(f"{where}: the database server cannot be reached ({type(exc).__name__}: {exc}); "
                              "is it running? (the change was not saved)")
        if state in {"25006", "42501"}:
            return StoreError(f"{where}: the database refuses writes ({exc}): give this role write access, or "
                              "point --db at the primary")
        return StoreError(f"{where}: {type(exc).__name__}: {exc}")

    async def _prepare(self) -> None:
        async with self.transaction():
            await self._execute("CREATE TABLE IF NOT EXISTS schema_version ("
                                "id INTEGER PRIMARY KEY CHECK (id = 1), version INTEGER NOT NULL)")
            row = await self._fetchone("SELECT version FROM schema_version")
            current = 0 if row is None else int(row[0])
            if current > len(MIGRATIONS):
                raise StoreError(f"{self.where} was made by a newer tunnelmesh (schema version {current}; this one "
                                 f"knows up to {len(MIGRATIONS)}): upgrade tunnelmesh, or use another --db")
            for number in range(current + 1, len(MIGRATIONS) + 1):
                for statement in MIGRATIONS[number - 1]:
                    await self._execute(postgres_ddl(statement))
            if current < len(MIGRATIONS):
                await self._execute("INSERT INTO schema_version (id, version) VALUES (1, ?) ON CONFLICT (id) DO "
                                    "UPDATE SET version = excluded.version", (len(MIGRATIONS),))
        self.version = await self.read_version()

    # --- announcements ---------------------------------------------------------------------

    async def _announce(self, transaction: Transaction) -> None:
        if transaction.bumped is not None:
            await self._notify(str(transaction.bumped))
        if transaction.pending_changed:
            await self._notify(PENDING)

    async def _announce_presence(self, payload: str) -> None:
        await self._notify(payload)

    async def _notify(self, body: str) -> None:
        """NOTIFY `body`, authenticated: any role that may connect to the database may
        NOTIFY on any channel, so the coordinators take only payloads that carry a MAC
        made with a key only they hold (derived from the cluster secret, in the database)."""
        await self._fetchone("SELECT pg_notify(?, ?)", (CHANNEL, f"{self._mac(body)} {body}"))

    def _mac(self, body: str) -> str:
        digest = hmac.new(self._notify_key, body.encode(), hashlib.sha256).digest()[:MAC_SIZE]
        return base64.urlsafe_b64encode(digest).decode().rstrip("=")

    @property
    def poll_interval(self) -> float | None:
        listening = self._listener is not None and not self._listener.is_closed()
        return None if listening else CATCH_UP_INTERVAL

    async def announce_punch(self, asker: str, peer: str) -> None:
        await self._notify(f"{PUNCH} {asker} {peer}")

    def _notified(self, connection: Any, pid: int, channel: str, signed: str) -> None:
        mac, _, payload = signed.partition(" ")
        if not hmac.compare_digest(mac.encode(), self._mac(payload).encode()):
            self.forged_notifications += 1  # not from a coordinator: ignored (status/metrics count it)
            if self.forged_notifications == 1:
                log.warning("ignored a %s notification without a coordinator's MAC (another role on the database "
                            "server sends on the channel?); further ones are counted, not logged", CHANNEL)
            return
        if payload == PENDING:
            self._pending_moved()
            return
        if self._presence_notified(payload) or self._punch_notified(payload):
            return
        try:
            version = int(payload)
        except ValueError:
            log.warning("ignored a %s notification that is not a version: %.40r", CHANNEL, payload)
            return
        self._advance(version)

    async def _watch(self) -> None:
        """(Re)open the LISTEN connection if it is gone, or silent: one that does not answer
        a query every LISTENER_CHECK s is dropped (a half-open connection hears nothing).
        One attempt at a time: a caller finding one in flight goes on. A failure is logged,
        and `catch_up`'s reads carry the changes meanwhile."""
        if self._watching:
            return
        self._watching = True
        try:
            await self._check_listener()
            if self._listener is not None:
                return
            try:
                connection = await self._asyncpg.connect(self._dsn, password=self._password, timeout=TIMEOUT)
                await connection.add_listener(CHANNEL, self._notified)
            except Exception as exc:
                log.warning("%s; changes made through other coordinators reach this one's nodes within %g s "
                            "instead of at once until it can listen again", self.error(exc), CATCH_UP_INTERVAL)
                return
            self._listener, self._listener_checked = connection, self._monotonic()
        finally:
            self._watching = False

    async def _check_listener(self) -> None:
        listener = self._listener
        if listener is None:
            return
        if not listener.is_closed():
            if self._monotonic() - self._listener_checked < LISTENER_CHECK:
                return
            self._listener_checked = self._monotonic()
            try:
                await listener.fetchval("SELECT 1", timeout=TIMEOUT)
                return
            except Exception:  # gone or stuck: a new one is made
                pass
        listener.terminate()
        self._listener = None

    # --- the primitives --------------------------------------------------------------------

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[Any]:
        transaction = self._in_transaction()
        if transaction is not None:
            yield transaction.connection
            return
        try:
            async with self._pool.acquire(timeout=TIMEOUT) as connection:
                yield connection
        except StoreError:
            raise
        except Exception as exc:
            raise self.error(exc) from None

    async def _fetchone(self, sql: str, args: Sequence[Any] = ()) -> Row | None:
        async with self._connection() as connection:
            try:
                row: Row | None = await connection.fetchrow(numbered(sql), *args)
                return row
            except Exception as exc:
                raise self.error(exc) from None

    async def _fetchall(self, sql: str, args: Sequence[Any] = ()) -> list[Row]:
        async with self._connection() as connection:
            try:
                return list(await connection.fetch(numbered(sql), *args))
            except Exception as exc:
                raise self.error(exc) from None

    async def _execute(self, sql: str, args: Sequence[Any] = ()) -> int:
        async with self._connection() as connection:
            try:
                status = await connection.execute(numbered(sql), *args)
            except Exception as exc:
                raise self.error(exc) from None
        count = status.rsplit(" ", 1)[-1]  # "UPDATE 3", "INSERT 0 1", "CREATE TABLE"
        return int(count) if count.isdigit() else 0

    @asynccontextmanager
    async def _begin(self, transaction: Transaction) -> AsyncIterator[None]:
        try:
            connection = await self._pool.acquire(timeout=TIMEOUT)
        except Exception as exc:
            raise self.error(exc) from None
        try:
            isolation = "read_committed" if transaction.write else "repeatable_read"
            handle = connection.transaction(isolation=isolation, readonly=not transaction.write)
            transaction.connection = connection
            try:
                try:
                    await handle.start()
                    if transaction.write:  # a wait for the lock may be cancelled too: rolled back below
                        await connection.execute("SELECT pg_advisory_xact_lock($1)", WRITERS_LOCK)
                except Exception as exc:
                    raise self.error(exc) from None
                yield
            except BaseException:
                try:
                    await handle.rollback()
                except Exception:
                    pass  # the original failure is what matters; the server rolls back a dropped connection
                raise
            try:
                await handle.commit()
            except Exception as exc:
                raise self.error(exc) from None
        finally:
            await self._pool.release(connection)


def _connect_error(where: str, exc: BaseException) -> StoreError:
    name = type(exc).__name__
    if (getattr(exc, "sqlstate", "") or "").startswith("28"):  # a wrong password, an unknown role, pg_hba.conf
        return StoreError(f"cannot log in to {where}: {exc}; check the user in --db, give the password with "
                          "--db-password-file or PGPASSWORD, and that the server's pg_hba.conf admits this host")
    if name == "InvalidCatalogNameError":
        return StoreError(f"{where}: {exc}; create it first (createdb), then start the coordinator again")
    if isinstance(exc, (ValueError, OverflowError)):
        return StoreError(f"--db {where}: not a PostgreSQL connection string ({exc}); e.g. "
                          "postgresql://tunnelmesh@db.example/tunnelmesh")
    if (getattr(exc, "sqlstate", "") or "") == "53300":
        return StoreError(f"{where}: the database server has no connection left (max_connections): raise it, or "
                          "run fewer coordinators")
    return StoreError(f"cannot reach the coordinator database {where}: {name}: {exc} (is PostgreSQL running there, "
                      "and does it accept this host?)")
