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
    """Whether `db` names a PostgreSQL database (StoreError for a string that looks meant
    as one but is not: a typo must not become an empty SQLite file and an empty network)."""
    if not isinstance(db, str):
        return False
    if db.lower().startswith(POSTGRES_SCHEMES):
        if not db.startswith(POSTGRES_SCHEMES):
            raise StoreError(f"--db {db.split('://', 1)[0]}://...: write the scheme in lower case, postgresql://")
        return True
    if db.lower().startswith("postgres") or "://" in db:
        shown = f"{db.split('://', 1)[0]}://..." if "://" in db else repr(db)
        raise StoreError(f"--db {shown} is neither a file nor a postgresql:// connection string (e.g. "
                         "postgresql://tunnelmesh@db.example/tunnelmesh)")
    return False


def read_password_file(path: str | Path) -> str:
    """PostgreSQL's password: the first line of `path` (StoreError if it cannot be read
    or is empty; the message never holds the password)."""
    try:
        with open(path, encoding="utf-8") as f:
            password = f.readline().rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as exc:
        raise StoreError(f"{path}: cannot read it ({getattr(exc, 'strerror', None) or type(exc).__name__})") from None
    if not password:
        raise StoreError(f"{path}: its first line is empty")
    return password


async def open_store(db: str | Path, password: str | None = None) -> Store:
    """The store `db` names, opened and migrated (`password`: PostgreSQL's, in place of one
    in the connection string or PGPASSWORD): StoreError says what is wrong."""
    if is_postgres(db):
        from .postgres import PostgresStore  # lazily: asyncpg only for those who use it

        return await PostgresStore.open(str(db), password)
    from .sqlite import SqliteStore

    return await SqliteStore.open(Path(db))


__all__ = ["MemberRow", "NetworkRow", "PendingRow", "PolicyRow", "RevocationRow", "Store", "StoreError",
           "is_postgres", "open_store", "read_password_file"]
