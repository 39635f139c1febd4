"""A real coordinator for tests: the aiohttp service on 127.0.0.1 (port 0) over a
real SQLite file, a network with real SSH identities, the signed records an
admin, an invite holder or a joiner would make, and the admin's machine
(`AdminMachine`: a state directory as `tunnelmesh init` leaves it, driven through
the real `tunnelmesh.network.Admin` and `countersign_pending`) that countersigns
joins with an invite while a joiner waits in `POST /v1/join/confirm`. Times are
real (`time.time`): signed requests are checked against the coordinator's clock.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncssh

from tunnelmesh.coordinator.client import Coordinator, CoordinatorError
from tunnelmesh.coordinator.app import make_app, serve
from tunnelmesh.coordinator.store import Store, open_store
from tunnelmesh.identity import NodeIdentity, load_identity
from tunnelmesh.membership import (
    JOIN_NAMESPACE,
    AdminKey,
    InviteGrant,
    MemberEntry,
    MembershipError,
    NetworkInfo,
    Token,
    b64,
    join_proof_message,
    make_invite,
    member_body,
    sign_member_as_admin,
    sign_member_with_invite,
    unb64,
)
from tests.support.databases import Database
from tunnelmesh.netstate import (
    NetworkState,
    StateError,
    invite_ledger,
    save_peer_map,
    save_network_secret,
)
from tunnelmesh.network import Admin, NetworkError, countersign_pending
from tunnelmesh.paths import Paths
from tunnelmesh.ratelimit import Rate, RateLimiter

CIDR = "100.64.0.0/24"
SECRET = bytes(range(32))
JSON = dict[str, Any]
#: A rate limit no test trips unless it means to (tests send from 127.0.0.1 only).
UNLIMITED = Rate(per_second=10_000.0, burst=100_000)

log = logging.getLogger("tests.admin_machine")


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
    """A network whose admin node is identity 0 at host 1. `invites` are the grants of the
    invites the admin made (`invite`), which the admin's machine keeps in its ledger."""

    admin: AdminKey
    network: NetworkInfo
    nodes: tuple[NodeIdentity, ...]
    invites: list[JSON] = field(default_factory=list)

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
               expires: int | None = None, kept: bool = True) -> Token:
        """An invite token, kept in the admin machine's ledger unless `kept` is False (a
        token made elsewhere with the admin key, or one whose ledger was lost)."""
        created = now() - 10 if created is None else created
        token = make_invite(self.admin, "http://127.0.0.1", name=name, uses=uses, now=created,
                            expires=created + 3600 if expires is None else expires)
        if kept:
            self.invites.append(token.grant)
        return token

    def entry(self, wire: JSON) -> MemberEntry:
        return MemberEntry.from_wire(wire, self.network)


@asynccontextmanager
async def running(db: Path | Database, **options: Any) -> AsyncIterator[tuple[str, Store]]:
    """The coordinator over the database `db` (a SQLite file, or a test `Database` on
    either backend), serving on 127.0.0.1: (url, store). Without a `limiter` in
    `options`, one that no test trips by accident."""
    store = await open_store(db.url if isinstance(db, Database) else db)
    try:
        async with serve_store(store, **options) as url:
            yield url, store
    finally:
        await store.close()


@asynccontextmanager
async def serve_store(store: Store, **options: Any) -> AsyncIterator[str]:
    """One coordinator over `store` (several may share one store, as coordinators share a
    PostgreSQL database), serving on 127.0.0.1: its URL."""
    options.setdefault("limiter", RateLimiter(UNLIMITED, UNLIMITED))
    runner = await serve(make_app(store, **options), "127.0.0.1", 0)
    try:
        host, port = runner.addresses[0][:2]
        yield f"http://{host}:{port}"
    finally:
        await runner.cleanup()


async def set_up(url: str, world: World) -> JSON:
    """Give the coordinator the world's network with the admin node (identity 0, host 1)."""
    admin_node = world.admin_member(0, "admin", 1)
    async with Coordinator(url, admin=world.admin) as coordinator:
        await coordinator.setup(world.network.to_wire(), admin_node)
    return admin_node


@dataclass(frozen=True)
class AdminMachine:
    """The admin's machine, as far as admission goes: a state directory as `tunnelmesh
    init` leaves it (network.json, admin.key, network.secret; its invite ledger holds the
    world's invites) and, over it, the real `tunnelmesh.network.Admin`. `countersign` is
    one round of what its daemon's admitter does; `admitting` runs rounds in the
    background, as the daemon would, while joiners wait in their confirm."""

    world: World
    paths: Paths

    @classmethod
    def create(cls, state_dir: Path, url: str, world: World, admin_node: JSON, secret: bytes = SECRET) -> AdminMachine:
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        machine = cls(world, Paths(state_dir, state_dir / "tunnelmesh.toml"))
        world.admin.save(machine.paths.admin_key)
        save_network_secret(machine.paths.network_secret, secret)
        machine.moved(url, admin_node)
        return machine

    def moved(self, url: str, admin_node: JSON | None = None) -> None:
        """The coordinator is at `url` now (a restarted test coordinator has a new port)."""
        member = self.world.entry(admin_node) if admin_node is not None else self.admin().state.member
        NetworkState(url, self.world.network, member).save(self.paths.network_state)

    def admin(self) -> Admin:
        return Admin.load(self.paths)

    def keep_invites(self) -> None:
        """Every invite the world made is one this machine made (`tunnelmesh invite`)."""
        with invite_ledger(self.paths.invites, self.world.network) as ledger:
            for grant in self.world.invites:
                ledger.add(InviteGrant.from_wire(grant, self.world.admin.public))

    async def countersign(self, wait: float = 0) -> list[str]:
        """One round: the joins with an invite waiting (held up to `wait` s until there is
        one), each countersigned or refused by `countersign_pending`; then the map kept,
        as the admin node's daemon keeps it. The decisions, one line each."""
        admin = self.admin()
        async with admin.coordinator() as coordinator:
            waiting = await coordinator.pending(wait, invited=True)
            self.keep_invites()  # each was in the ledger before its token existed
            decisions = await countersign_pending(admin, coordinator, waiting)
            peer_map, _ = await admin.members(coordinator)
        save_peer_map(self.paths.peer_map_cache, peer_map)
        return decisions

    @asynccontextmanager
    async def admitting(self, wait: float = 5.0) -> AsyncIterator[list[str]]:
        """Countersign joins in the background (as the admin node's daemon does) until the
        block ends; yields the decisions as they are made."""
        decisions: list[str] = []

        async def admit() -> None:
            while True:
                try:
                    made = await self.countersign(wait)
                except (CoordinatorError, NetworkError, MembershipError, StateError) as exc:
                    log.warning("the admin's machine cannot countersign now: %s", exc)
                    made = []
                    await asyncio.sleep(0.2)
                decisions.extend(made)
                if made and not any(line.startswith(("countersigned", "refused")) for line in made):
                    await asyncio.sleep(0.2)  # nothing could be decided: no busy loop

        task = asyncio.create_task(admit())
        try:
            yield decisions
        finally:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass


@dataclass(frozen=True)
class Served:
    url: str
    store: Store
    admin_node: JSON
    machine: AdminMachine


@asynccontextmanager
async def serving(db: Path | Database, world: World, *, admit: bool = True, **options: Any) -> AsyncIterator[Served]:
    """A running coordinator that holds the world's network (admin node: identity 0, host
    1) and the admin's machine (state next to `db`, or in its home), countersigning joins in the
    background unless `admit` is False."""
    async with running(db, **options) as (url, store):
        admin_node = await set_up(url, world)
        home = db.home if isinstance(db, Database) else db.parent / f"{db.stem}-admin"
        machine = AdminMachine.create(home, url, world, admin_node)
        if not admit:
            yield Served(url, store, admin_node, machine)
            return
        async with machine.admitting():
            yield Served(url, store, admin_node, machine)


async def invited(world: World, i: int, body: JSON, token: Token) -> tuple[JSON, bytes]:
    """A member body signed with the token's invite key, and identity i's proof over it."""
    proof = await world.nodes[i].sign(join_proof_message(body), JOIN_NAMESPACE)
    return sign_member_with_invite(body, token), proof


async def prepare(url: str, world: World, i: int, token: Token, name: str | None = None) -> tuple[JSON, bytes]:
    """The first half of `tunnelmesh join <token>`: propose, then sign and prove."""
    async with Coordinator(url) as coordinator:
        body = await coordinator.propose(world.nodes[i].public.to_line(), name, token.grant)
    return await invited(world, i, body, token)


async def confirmed(url: str, entry: JSON, proof: bytes, tries: int = 3) -> JSON:
    """What `tunnelmesh join <token>` does once it has signed: confirm, and again while
    the answer is that the admin's machine has not countersigned yet."""
    async with Coordinator(url) as coordinator:
        for _ in range(tries):
            result = await coordinator.confirm(entry, proof)
            if not result.get("pending"):
                break
        return result


async def join(url: str, world: World, i: int, token: Token, name: str | None = None) -> JSON:
    """What `tunnelmesh join <token>` does; the join result (or the last "pending" answer,
    when no admin's machine countersigns)."""
    entry, proof = await prepare(url, world, i, token, name)
    return await confirmed(url, entry, proof)


async def request_body(world: World, i: int, name: str, t: int | None = None, node: NodeIdentity | None = None
                       ) -> JSON:
    """The body of a `POST /v1/join/request` of identity i (or `node`)."""
    identity = world.nodes[i] if node is None else node
    request = {"identity": identity.public.to_line(), "name": name, "t": now() if t is None else t}
    proof = await identity.sign(join_proof_message({"request": request}), JOIN_NAMESPACE)
    return {**request, "proof": b64(proof)}


async def join_request(url: str, world: World, i: int, name: str, t: int | None = None) -> JSON:
    """One `POST /v1/join/request` of identity i (the approval path)."""
    body = await request_body(world, i, name, t)
    async with Coordinator(url) as coordinator:
        return await coordinator.join_request(body["identity"], name, body["t"], unb64(body["proof"], "proof"))


async def post_from(http: aiohttp.ClientSession, url: str, path: str, body: JSON, source: str) -> tuple[int, JSON]:
    """An unsigned POST that a trusted proxy forwards from `source` (the coordinator runs
    with trusted_proxies={"127.0.0.1"}): (status, JSON answer)."""
    async with http.post(url + path, json=body, headers={"X-Forwarded-For": source}) as response:
        return response.status, await response.json()


def snapshot(db: Path | Database) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table, read over a connection of its own."""
    return (db if isinstance(db, Database) else Database("sqlite", str(db), db.parent)).snapshot()


def row_counts(db: Path | Database) -> dict[str, int]:
    return {table: len(rows) for table, rows in snapshot(db).items()}
