"""A real coordinator for tests: the aiohttp service on 127.0.0.1 (port 0) over a
real SQLite file, a network with real SSH identities, and the signed records an
admin, an invite holder or a joiner would make. Times are real (`time.time`):
signed requests are checked against the coordinator's clock.
"""

from __future__ import annotations

import asyncio
import functools
import os
import sqlite3
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncssh

from tunnelmesh.coordinator.client import Coordinator
from tunnelmesh.coordinator.service import make_app, serve
from tunnelmesh.coordinator.store import Store
from tunnelmesh.identity import NodeIdentity, load_identity
from tunnelmesh.membership import (
    JOIN_NAMESPACE,
    AdminKey,
    MemberEntry,
    NetworkInfo,
    Token,
    join_proof_message,
    make_invite,
    member_body,
    sign_member_as_admin,
    sign_member_with_invite,
)

CIDR = "100.64.0.0/24"
SECRET = bytes(range(32))
TABLES = ("network", "members", "invites", "revocations", "pending")
JSON = dict[str, Any]


def now() -> int:
    return int(time.time())


@functools.cache
def identities(count: int = 6) -> tuple[NodeIdentity, ...]:
    """Node identities from fresh Ed25519 SSH keys (written 0600), made once per process."""
    made = []
    with tempfile.TemporaryDirectory() as directory:
        for i in range(count):
            path = Path(directory) / f"id{i}"
            path.write_bytes(asyncssh.generate_private_key("ssh-ed25519").export_private_key())
            os.chmod(path, 0o600)
            made.append(asyncio.run(load_identity(str(path))))
    return tuple(made)


@dataclass(frozen=True)
class World:
    """A network whose admin node is identity 0 at host 1."""

    admin: AdminKey
    network: NetworkInfo
    nodes: tuple[NodeIdentity, ...]

    @classmethod
    def create(cls) -> World:
        admin = AdminKey.generate()
        return cls(admin, NetworkInfo.create(admin, CIDR, now() - 3600), identities())

    def body(self, i: int, name: str, host: int, joined: int | None = None) -> JSON:
        ipv4, ipv6 = self.network.host(host)
        return member_body(self.network.network, name, self.nodes[i].public, ipv4, ipv6,
                           now() if joined is None else joined)

    def admin_member(self, i: int, name: str, host: int, joined: int | None = None) -> JSON:
        return sign_member_as_admin(self.body(i, name, host, joined), self.admin)

    def invite(self, *, name: str | None = None, uses: int = 1, created: int | None = None,
               expires: int | None = None) -> Token:
        created = now() - 10 if created is None else created
        return make_invite(self.admin, "http://127.0.0.1", name=name, uses=uses, now=created,
                           expires=created + 3600 if expires is None else expires)

    def entry(self, wire: JSON) -> MemberEntry:
        return MemberEntry.from_wire(wire, self.network)


@asynccontextmanager
async def running(db: Path, **options: Any) -> AsyncIterator[tuple[str, Store]]:
    """The coordinator over the database at `db`, serving on 127.0.0.1: (url, store)."""
    store = Store.open(db)
    runner = await serve(make_app(store, **options), "127.0.0.1", 0)
    try:
        host, port = runner.addresses[0][:2]
        yield f"http://{host}:{port}", store
    finally:
        await runner.cleanup()
        store.close()


async def set_up(url: str, world: World) -> JSON:
    """Give the coordinator the world's network with the admin node (identity 0, host 1)."""
    admin_node = world.admin_member(0, "admin", 1)
    async with Coordinator(url, admin=world.admin) as coordinator:
        await coordinator.setup(world.network.to_wire(), SECRET, admin_node)
    return admin_node


async def invited(world: World, i: int, body: JSON, token: Token) -> tuple[JSON, bytes]:
    """A member body signed with the token's invite key, and identity i's proof over it."""
    proof = await world.nodes[i].sign(join_proof_message(body), JOIN_NAMESPACE)
    return sign_member_with_invite(body, token), proof


async def prepare(url: str, world: World, i: int, token: Token, name: str | None = None) -> tuple[JSON, bytes]:
    """The first half of `tunnelmesh join <token>`: propose, then sign and prove."""
    async with Coordinator(url) as coordinator:
        body = await coordinator.propose(world.nodes[i].public.to_line(), name, token.grant)
    return await invited(world, i, body, token)


async def join(url: str, world: World, i: int, token: Token, name: str | None = None) -> JSON:
    """What `tunnelmesh join <token>` does; the join result."""
    entry, proof = await prepare(url, world, i, token, name)
    async with Coordinator(url) as coordinator:
        return await coordinator.confirm(entry, proof)


async def join_request(url: str, world: World, i: int, name: str, t: int | None = None) -> JSON:
    """One `POST /v1/join/request` of identity i (the approval path)."""
    identity = world.nodes[i]
    t = now() if t is None else t
    request = {"identity": identity.public.to_line(), "name": name, "t": t}
    proof = await identity.sign(join_proof_message({"request": request}), JOIN_NAMESPACE)
    async with Coordinator(url) as coordinator:
        return await coordinator.join_request(identity.public.to_line(), name, t, proof)


def snapshot(db: Path) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table, read over a connection of its own."""
    with closing(sqlite3.connect(db)) as conn:
        return {table: conn.execute(f"SELECT * FROM {table} ORDER BY 1").fetchall() for table in TABLES}


def row_counts(db: Path) -> dict[str, int]:
    return {table: len(rows) for table, rows in snapshot(db).items()}
