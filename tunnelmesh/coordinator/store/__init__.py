"""The coordinator's database (docs/coordinator.md, "Storage"): SQLite by default,
PostgreSQL for several coordinators on one database. `open_store` picks by what
`--db` names: a ``postgresql://`` (or ``postgres://``) connection string, or a file."""

from __future__ import annotations

from pathlib import Path

from .base import (
    MemberRow,
    NetworkRow,
    PendingRow,
    PolicyRow,
    RevocationRow,
    Store,
    StoreError,
)

POSTGRES_SCHEMES = ("postgresql://", "postgres://")


def is_postgres(db: str | Path) -> bool:
    return isinstance(db, str) and db.startswith(POSTGRES_SCHEMES)


async def open_store(db: str | Path, password: str | None = None) -> Store:
    """The store `db` names, opened and migrated (`password`: PostgreSQL's, in place of one
    in the connection string or PGPASSWORD): StoreError says what is wrong."""
    if is_postgres(db):
        from .postgres import PostgresStore  # lazily: asyncpg only for those who use it

        return await PostgresStore.open(str(db), password)
    from .sqlite import SqliteStore

    return await SqliteStore.open(Path(db))


__all__ = ["MemberRow", "NetworkRow", "PendingRow", "PolicyRow", "RevocationRow", "Store", "StoreError",
           "is_postgres", "open_store"]
