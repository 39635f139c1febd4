"""`tunnelmesh coordinator migrate`: move a network's database to another backend (a
SQLite file to PostgreSQL, typically, to run several coordinators), verified.

Every row of every table is copied as stored: the signed records keep their exact
JSON text, so every signature still verifies, and the version counter and each row's
version move over unchanged, so nodes carry on with `since=N` as if nothing happened.
The copy is one transaction on each side (the source's holds its writers' lock, so a
coordinator still running on it cannot change it halfway); then both are read again
and compared row by row. The target must hold no network yet.
"""

from __future__ import annotations

from dataclasses import dataclass

from .base import Store, StoreError
from .schema import TABLES


@dataclass(frozen=True)
class Migrated:
    rows: dict[str, int]  # table -> rows copied
    version: int  # the map version, the same on both sides


async def migrate(source: Store, target: Store) -> Migrated:
    """Copy every row of `source` into the empty `target`, then check they agree."""
    if await target.network() is not None:
        raise StoreError(f"{target.where} already holds a network: migrate into an empty database (a new one, "
                         "or drop what is there first)")
    async with source.transaction():  # the writers' lock: nothing changes the source meanwhile
        if await source.network() is None:
            raise StoreError(f"{source.where} holds no network: nothing to migrate")
        copied = {table: await source.rows(table) for table in TABLES}
        async with target.transaction():
            if await target.network() is not None:
                raise StoreError(f"{target.where} was given a network meanwhile; nothing was copied")
            for table in TABLES:
                await target.insert_rows(table, copied[table])
    for table in TABLES:
        if await target.rows(table) != copied[table]:
            raise StoreError(f"the copy of table {table} in {target.where} differs from the source after the "
                             "migration: do not use it (drop the target database and migrate again)")
    version = await target.read_version()
    return Migrated({table: len(rows) for table, rows in copied.items()}, version)
