"""The SQLite backend: one file, the default (embedded in the admin's node, or a
standalone coordinator). One coordinator process per file.

The file is created mode 0600 (it holds who is in the network and where they are; it
does not hold the network secret: the admin's machine seals that to each joiner). It
runs in WAL mode with ``synchronous=FULL``: an answered request is on disk. A write
transaction is ``BEGIN IMMEDIATE``. The schema version is ``PRAGMA user_version``; a
file from a newer tunnelmesh is refused rather than guessed at.

sqlite3 calls are synchronous and short: they run on the event loop. The tasks of
the one loop share the one connection, so a transaction holds a lock the others wait
for (and a read outside any transaction takes it too, never seeing one half-done).
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from .base import Row, Store, StoreError, Transaction
from .schema import MIGRATIONS


class SqliteStore(Store):
    """The coordinator's SQLite file."""

    backend = "sqlite"

    def __init__(self, path: Path, conn: sqlite3.Connection) -> None:
        super().__init__(str(path))
        self.path = path
        self._conn = conn
        self._conn.row_factory = sqlite3.Row
        self._lock = asyncio.Lock()

    @classmethod
    async def open(cls, path: Path) -> SqliteStore:
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
            await store._prepare()
        except BaseException:
            conn.close()
            raise
        return store

    async def close(self) -> None:
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
                              "stop it or use another --db (several coordinators share a PostgreSQL database)")
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

    async def _prepare(self) -> None:
        try:
            self._conn.execute("PRAGMA journal_mode=WAL").fetchone()
            self._conn.execute("PRAGMA synchronous=FULL")
            self._conn.execute("PRAGMA foreign_keys=ON")
            self._conn.execute("PRAGMA secure_delete=ON")  # the secret files of old versions leave no trace
        except sqlite3.Error as exc:
            raise self.error(exc) from None
        async with self.transaction():
            current = (await self._fetchone("PRAGMA user_version") or (0,))[0]
            if current > len(MIGRATIONS):
                raise StoreError(f"{self.path} was made by a newer tunnelmesh (schema version {current}; this one "
                                 f"knows up to {len(MIGRATIONS)}): upgrade tunnelmesh, or use another --db")
            for number in range(current + 1, len(MIGRATIONS) + 1):
                for statement in MIGRATIONS[number - 1]:
                    await self._execute(statement)
                await self._execute(f"PRAGMA user_version = {number}")
        self.version = await self.read_version()

    # --- the primitives --------------------------------------------------------------------

    def _run(self, sql: str, args: Sequence[Any]) -> sqlite3.Cursor:
        try:
            return self._conn.execute(sql, tuple(args))
        except sqlite3.Error as exc:
            raise self.error(exc) from None

    @asynccontextmanager
    async def _outside(self) -> AsyncIterator[None]:
        """A statement outside any transaction waits for the one in progress."""
        if self._in_transaction() is not None:
            yield
            return
        async with self._lock:
            yield

    async def _fetchone(self, sql: str, args: Sequence[Any] = ()) -> Row | None:
        async with self._outside():
            row: Row | None = self._run(sql, args).fetchone()
            return row

    async def _fetchall(self, sql: str, args: Sequence[Any] = ()) -> list[Row]:
        async with self._outside():
            return list(self._run(sql, args).fetchall())

    async def _execute(self, sql: str, args: Sequence[Any] = ()) -> int:
        async with self._outside():
            return self._run(sql, args).rowcount

    @asynccontextmanager
    async def _begin(self, transaction: Transaction) -> AsyncIterator[None]:
        async with self._lock:
            self._run("BEGIN IMMEDIATE" if transaction.write else "BEGIN", ())
            try:
                yield
                self._run("COMMIT", ())
            except BaseException:
                if self._conn.in_transaction:
                    try:
                        self._conn.execute("ROLLBACK")
                    except sqlite3.Error:
                        pass  # the original failure is what matters; SQLite rolls back on close anyway
                raise
