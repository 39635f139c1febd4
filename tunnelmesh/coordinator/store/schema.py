"""The coordinator database's schema, as versioned migrations both backends apply in
order (SQLite: ``PRAGMA user_version``; PostgreSQL: the ``schema_version`` table).

The statements are written once, in the SQL both engines take. The one difference
is integer width: SQLite's INTEGER holds 64 bits, PostgreSQL's 32, so the PostgreSQL
backend reads INTEGER as BIGINT (`postgres_ddl`). Flags are integers (0/1) compared
with ``= 0`` / ``<> 0`` for the same reason: one query text for both.
"""

from __future__ import annotations

import re

#: Schema versions, applied in order; entry i takes the database to version i + 1.
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
    # 7: several coordinators' relays (tunnelmesh.coordinator.cluster): which coordinator holds
    # each member's relay connection and the URL it is reached at by the others, and the secret
    # the coordinators prove themselves to each other with (made by the first one that needs it).
    (
        """CREATE TABLE relay_presence (
            wg_key TEXT PRIMARY KEY,
            coordinator TEXT NOT NULL,
            url TEXT NOT NULL,
            since INTEGER NOT NULL)""",
        """CREATE TABLE cluster (
            id INTEGER PRIMARY KEY CHECK (id = 1),
            secret TEXT NOT NULL)""",
    ),
]

#: The tables a migration (tunnelmesh.coordinator.store.copy) carries over, parents first.
TABLES = ("network", "members", "invites", "revocations", "pending", "policy")

_INTEGER = re.compile(r"\bINTEGER\b")


def postgres_ddl(statement: str) -> str:
    """A migration statement as PostgreSQL takes it: 64-bit integers, as SQLite's are."""
    return _INTEGER.sub("BIGINT", statement)
