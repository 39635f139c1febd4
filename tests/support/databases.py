"""The coordinator's database in tests, on either backend: a SQLite file in the test's
temporary directory, or a fresh database on a throwaway PostgreSQL server
(tools/pgserver.py: one server per test worker, one database per test).

`Database.url` is what `open_store` and `--db` take. `query`/`execute` reach the
database over a connection of their own, synchronously (a test may call them while its
event loop runs): the test's view from outside the coordinator, as an admin's psql or
sqlite3 would have it.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import itertools
import sqlite3
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunnelmesh.coordinator.store.schema import TABLES

BACKENDS = ("sqlite", "postgresql")
_numbers = itertools.count(1)


@dataclass(frozen=True)
class Database:
    backend: str
    url: str  # a SQLite file's path, or a PostgreSQL connection string
    home: Path  # a private directory of the test's (the admin machine's state goes there)

    @property
    def path(self) -> Path:
        assert self.backend == "sqlite", "a PostgreSQL database has no file"
        return Path(self.url)

    def query(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        """Rows of `sql` (`?` placeholders), each a tuple."""
        if self.backend == "sqlite":
            with closing(sqlite3.connect(self.url)) as conn:
                return [tuple(row) for row in conn.execute(sql, args).fetchall()]
        return _in_thread(self._pg(sql, args, fetch=True))

    def execute(self, sql: str, *args: Any) -> None:
        """Run `sql` and commit."""
        if self.backend == "sqlite":
            with closing(sqlite3.connect(self.url)) as conn, conn:
                conn.execute(sql, args)
            return
        _in_thread(self._pg(sql, args, fetch=False))

    async def _pg(self, sql: str, args: tuple[Any, ...], *, fetch: bool) -> list[tuple[Any, ...]]:
        import asyncpg

        from tunnelmesh.coordinator.store.postgres import numbered

        conn = await asyncpg.connect(self.url)
        try:
            if fetch:
                return [tuple(row) for row in await conn.fetch(numbered(sql), *args)]
            await conn.execute(numbered(sql), *args)
            return []
        finally:
            await conn.close()

    def snapshot(self) -> dict[str, list[tuple[Any, ...]]]:
        """Every row of every table."""
        return {table: self.query(f"SELECT * FROM {table} ORDER BY 1") for table in TABLES}

    def row_counts(self) -> dict[str, int]:
        return {table: len(rows) for table, rows in self.snapshot().items()}


def assert_no_secret(db: Database, *secrets: bytes) -> None:
    """No secret, raw or in base64 or hex, in the database: the SQLite file and its WAL
    byte for byte, or every row of a PostgreSQL database as text."""
    if db.backend == "sqlite":
        files = [path.read_bytes() for path in (db.path, db.path.with_name(db.path.name + "-wal")) if path.exists()]
    else:
        files = [repr(db.snapshot()).encode()]
    for secret in secrets:
        for form in (secret, base64.b64encode(secret), base64.b64encode(secret)[:40], secret.hex().encode()):
            assert not any(form in data for data in files), f"the secret is in {db.url}"


def _in_thread(work: Any) -> Any:
    """Run a coroutine to completion on a loop of its own (the caller's may be running)."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, work).result(timeout=60)


def sqlite_database(tmp_path: Path) -> Database:
    return Database("sqlite", str(tmp_path / "state" / "coordinator.db"), tmp_path / "admin")


def postgres_database(server: Any, tmp_path: Path) -> Database:
    """A new empty database on `server` (a started tools.pgserver.TemporaryPostgres)."""
    return Database("postgresql", server.create_database(f"t{next(_numbers)}"), tmp_path / "admin")
