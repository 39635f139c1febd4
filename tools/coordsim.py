"""Coordinators at scale, simulated: N lightweight nodes (real HTTP clients, real SSH-key
signatures through tunnelmesh's own client, no TUN, all on 127.0.0.1) join real
`tunnelmesh coordinator` processes, register an endpoint, stay connected in the map
long-poll, and hear of one change. Figures for issue 19; nothing is asserted.

One run (N nodes, a backend, 1 or 2 coordinators), step by step:

1. N node identities from fresh in-memory Ed25519 keys (tunnelmesh.identity derives the
   mesh key and attestation as for a key file), a network and its admin key.
2. Seed: the network, the admin node and all but the joining sample (`--joins`) go into
   the database as admin-signed entries before any coordinator starts. Why: a join uses
   the unauthenticated endpoints, which every coordinator limits to OVERALL_RATE (20
   requests/s, whoever sends), and its answer carries the whole map (O(N) bytes), so
   10,000 joins would take over 1,000 s and O(N^2) bytes.
3. The coordinators start as subprocesses on the database (`--plain-http --no-stun
   --metrics`); each simulated node is given one of them (node i: i mod count).
4. Join (the approval flow, timed: joins/s): each of the sample's nodes sends `POST
   /v1/join/request`, the admin (`GET /v1/admin/pending`, `POST /v1/admin/approve` with an
   admin-signed entry and the secret sealed to the node) approves it, the node asks again,
   collects its entry and unseals the secret. Joiners come from JOIN_SOURCES source
   addresses in 127.0.0.0/8 (PENDING_PER_SOURCE allows 4 waiting joins per address) at
   most JOIN_WORKERS at once (PENDING_LIMIT: 64 waiting); the rate limits stay as shipped.
5. Register: every node says where it listens (`POST /v1/register`, member-signed).
6. Connect: every node long-polls `GET /v1/map?since=V&wait=25` from the version the
   admin reads once (a node with its peer map cached does the same after a restart),
   until the coordinators' metrics count all N connected. RSS before and now: KiB/node.
7. Change (`--changes` times): node 0 registers a new port through coordinator 0; each
   node's first answer with a newer version is timed from just before that request.
   With 2 coordinators this includes the cross-coordinator notification.

Coordinator CPU is utime+stime from /proc/<pid>/stat, summed over the coordinators, for
the whole run (per phase in the JSON). The client side (this process) shares the same
2 cores; its CPU is in the JSON: a change's time-to-all includes this process reading
every node's answer and sending its next long-poll.

    python -m tools.coordsim --nodes 100,1000,10000 --db sqlite,postgresql \\
        --coordinators 1,2 --json-out docs/coordsim.json --chart docs/coordsim.png
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import os
import platform
import resource
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import aiohttp
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tools.benchreport import parse_cpu_model
from tools.coordsimreport import (
    BACKENDS,
    COORDINATOR_COUNTS,
    change_latencies,
    change_summary,
    changes_summary,
    document,
    draw,
    format_table,
    metric_value,
    parse_choices,
    parse_counts,
    parent_of,
    per_node_kib,
    plan,
    proc_stat_times,
)
from tunnelmesh.admission import sealed_secret
from tunnelmesh.coordinator.client import Coordinator, CoordinatorError
from tunnelmesh.coordinator.store import open_store
from tunnelmesh.identity import NodeIdentity, PublicIdentity, _FileSigner, _split_key_text
from tunnelmesh.membership import (
    JOIN_NAMESPACE,
    AdminKey,
    MemberEntry,
    NetworkInfo,
    join_proof_message,
    member_body,
    sign_member_as_admin,
    unb64,
    unseal,
)

JSON = dict[str, Any]
#: Room for 65,534 hosts (a /24 holds 254).
CIDR = "100.64.0.0/16"
LONG_POLL_WAIT = 25.0
#: Joins in flight at once (under the coordinator's PENDING_LIMIT of 64 waiting), and the
#: source addresses they come from, 127.0.2.1 upwards (PENDING_PER_SOURCE: 4 each).
JOIN_WORKERS = 48
JOIN_SOURCES = 48
#: Registers in flight at once.
REGISTER_CONCURRENCY = 256
#: How long a phase may take at most: a base plus so much per node.
PHASE_BASE_S = 60.0
PHASE_PER_NODE_S = 0.05
#: Pause between changes, so each starts with every node parked in its long-poll again.
SETTLE_S = 2.0
#: The throwaway PostgreSQL's connection limit: the coordinators' pools and the seeding.
POSTGRES_CONNECTIONS = 200
CONNECTED_METRIC = "tunnelmesh_coordinator_nodes_connected"


def phase_deadline(nodes: int) -> float:
    return time.monotonic() + PHASE_BASE_S + PHASE_PER_NODE_S * nodes


async def new_identity() -> NodeIdentity:
    """A node identity from a fresh Ed25519 key held in memory, derived as a key file's is
    (tunnelmesh.identity has no public constructor from a key object: see the report)."""
    key = Ed25519PrivateKey.generate()
    line = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    key_type, blob = _split_key_text(line.decode("ascii"), allow_comment=False)
    return await NodeIdentity._derive(_FileSigner(key, key_type, blob, "coordsim"))


class SimClient(Coordinator):
    """tunnelmesh's coordinator client over a session the simulation gives it (its
    connection pool and source address), so 10,000 nodes need not hold 10,000 pools. Not
    used as a context manager: whoever made the session closes it."""

    def __init__(self, url: str, session: aiohttp.ClientSession, **options: Any) -> None:
        super().__init__(url, **options)
        self._session = session


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class CoordinatorProcess:
    """One `tunnelmesh coordinator` subprocess serving `db` on 127.0.0.1, its metrics beside."""

    def __init__(self, db: str, log_path: Path) -> None:
        self.db = db
        self.port, self.metrics_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.metrics_url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        argv = [sys.executable, "-m", "tunnelmesh", "coordinator", "--listen", f"127.0.0.1:{self.port}",
                "--db", self.db, "--plain-http", "--no-stun", "--log-level", "warning",
                "--metrics", f"127.0.0.1:{self.metrics_port}"]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)  # Ctrl-C reaches us; we stop it

    def _proc(self, name: str) -> str:
        assert self.process is not None
        return Path(f"/proc/{self.process.pid}/{name}").read_text()

    def cpu_seconds(self) -> float:
        return proc_stat_times(self._proc("stat"), os.sysconf("SC_CLK_TCK"))[0]

    def rss_kib(self) -> float:
        for line in self._proc("status").splitlines():
            if line.startswith("VmRSS:"):
                return float(line.split()[1])
        raise RuntimeError("no VmRSS in /proc/<pid>/status")

    async def connected(self, http: aiohttp.ClientSession) -> float:
        """The nodes this coordinator counts as connected (its metrics)."""
        async with http.get(self.metrics_url) as response:
            value = metric_value(await response.text(), CONNECTED_METRIC)
        return value or 0.0

    async def wait_ready(self, http: aiohttp.ClientSession, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"the coordinator exited ({self.process.returncode}): {self.log_tail()}")
            with contextlib.suppress(aiohttp.ClientError, OSError):
                await self.connected(http)
                return
            await asyncio.sleep(0.1)
        raise RuntimeError(f"the coordinator did not serve its metrics within {timeout:g} s: {self.log_tail()}")

    def log_tail(self, size: int = 2000) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-size:]
        return ""

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)


@dataclass
class SimNode:
    index: int
    identity: NodeIdentity
    coordinator: int
    since: int = 0
    answers: list[tuple[float, int]] = field(default_factory=list)  # (monotonic time, version) that moved it
    polls: int = 0
    errors: int = 0

    @property
    def name(self) -> str:
        return f"n{self.index}"


@dataclass(frozen=True)
class World:
    admin: AdminKey
    network: NetworkInfo
    secret: bytes

    def entry(self, identity: PublicIdentity, name: str, host: int) -> JSON:
        ipv4, ipv6 = self.network.host(host)
        return sign_member_as_admin(member_body(self.network.network, name, identity, ipv4, ipv6, int(time.time())),
                                    self.admin)


async def seed(db: str, world: World, admin_identity: NodeIdentity, seeded: list[SimNode]) -> None:
    """The network, the admin node (host 1) and `seeded` (hosts 2...) written into the
    database through the coordinator's own store in one transaction, each an admin-signed
    entry the coordinator verifies as it would an approval's."""
    store = await open_store(db)
    try:
        async with store.transaction():
            await store.set_network(world.network.to_wire())
            for host, (identity, name) in enumerate([(admin_identity, "admin"),
                                                     *((node.identity, node.name) for node in seeded)], start=1):
                wire = world.entry(identity.public, name, host)
                await store.add_member(wire, MemberEntry.from_wire(wire, world.network), host)
    finally:
        await store.close()


# --- the phases ---------------------------------------------------------------------------------


async def ask_to_join(client: Coordinator, node: SimNode, deadline: float, refused: list[int]) -> JSON:
    """One `POST /v1/join/request` as `tunnelmesh join URL --name` sends it, asked again
    after a second while the rate limit refuses it (429, counted in `refused`)."""
    while True:
        now = int(time.time())
        line = node.identity.public.to_line()
        request = {"identity": line, "name": node.name, "t": now}
        proof = await node.identity.sign(join_proof_message({"request": request}), JOIN_NAMESPACE)
        try:
            return await client.join_request(line, node.name, now, proof)
        except CoordinatorError as exc:
            if exc.status != 429 or time.monotonic() > deadline:
                raise
            refused[0] += 1
        await asyncio.sleep(1.0)


async def join_one(client: Coordinator, node: SimNode, world: World, approved: asyncio.Event, deadline: float,
                   refused: list[int]) -> None:
    first = await ask_to_join(client, node, deadline, refused)
    if not first.get("pending"):
        raise RuntimeError(f"{node.name}: admitted before any approval: {first}")
    async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
        await approved.wait()
    result = await ask_to_join(client, node, deadline, refused)
    member = MemberEntry.from_wire(result.get("member"), world.network)
    if member.wg_key != node.identity.public.wg_public_key:
        raise RuntimeError(f"{node.name}: the collected entry is for another key")
    if unseal(node.identity.static_private, unb64(result["secret"]["sealed"], "sealed secret")) != world.secret:
        raise RuntimeError(f"{node.name}: the sealed secret does not open to the network's")
    node.since = int(result["map"]["version"])


async def approve_all(admin: Coordinator, world: World, waiting_for: dict[str, tuple[SimNode, asyncio.Event]],
                      deadline: float) -> None:
    """The admin approves each sample node's request as it shows up in the pending list
    (the fingerprint checked against the node's, as `tunnelmesh approve` does)."""
    left = dict(waiting_for)
    while left and time.monotonic() < deadline:
        for item in await admin.pending(wait=1.0):
            match = left.get(str(item.get("name")))
            if item.get("kind") != "request" or match is None:
                continue
            node, approved = match
            identity = PublicIdentity.from_line(str(item["identity"]))
            if identity.fingerprint != node.identity.fingerprint:
                raise RuntimeError(f"the pending join {node.name} is for another key")
            body = member_body(world.network.network, node.name, identity, ipaddress.IPv4Address(item["ipv4"]),
                               ipaddress.IPv6Address(item["ipv6"]), int(time.time()))
            wire = sign_member_as_admin(body, world.admin)
            await admin.approve(wire, sealed_secret(MemberEntry.from_wire(wire, world.network), world.secret, 0))
            del left[node.name]
            approved.set()
    if left:
        raise RuntimeError(f"{len(left)} joins were not approved in time")


async def join_phase(urls: list[str], admin: Coordinator, world: World, joiners: list[SimNode]) -> JSON:
    deadline = phase_deadline(len(joiners) * 4)
    sessions = [aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=(f"127.0.2.{i + 1}", 0)))
                for i in range(JOIN_SOURCES)]
    refused = [0]
    events = {node.name: (node, asyncio.Event()) for node in joiners}
    queue: asyncio.Queue[SimNode] = asyncio.Queue()
    for node in joiners:
        queue.put_nowait(node)

    async def worker(number: int) -> None:
        session = sessions[number % JOIN_SOURCES]
        while not queue.empty():
            node = queue.get_nowait()
            await join_one(SimClient(urls[node.coordinator], session), node, world, events[node.name][1], deadline,
                           refused)

    started = time.monotonic()
    try:
        async with asyncio.TaskGroup() as group:
            group.create_task(approve_all(admin, world, events, deadline))
            for number in range(min(JOIN_WORKERS, len(joiners))):
                group.create_task(worker(number))
    finally:
        for session in sessions:
            await session.close()
    took = time.monotonic() - started
    return {"join_s": took, "joins_per_s": len(joiners) / took if joiners else None, "join_refused_429": refused[0]}


async def register_phase(clients: list[Coordinator], nodes: list[SimNode]) -> JSON:
    limit = asyncio.Semaphore(REGISTER_CONCURRENCY)

    async def register(node: SimNode) -> None:
        async with limit:
            await clients[node.index].register(51820, [f"198.51.100.{node.index % 250 + 1}:51820"])

    started = time.monotonic()
    async with asyncio.TaskGroup() as group:
        for node in nodes:
            group.create_task(register(node))
    took = time.monotonic() - started
    return {"register_s": took, "registers_per_s": len(nodes) / took}


async def long_poll(client: Coordinator, node: SimNode, stop: asyncio.Event, deadline: float,
                    failures: Counter[str]) -> None:
    """What a node's daemon does while up: ask for the map after its version, again at
    once after each answer; after a failure (counted by message), a second later."""
    while not stop.is_set() and time.monotonic() < deadline:
        try:
            answer = await client.map(node.since, LONG_POLL_WAIT)
        except CoordinatorError as exc:
            node.errors += 1
            failures[str(exc)] += 1
            await asyncio.sleep(1.0)
            continue
        arrived = time.monotonic()
        node.polls += 1
        version = int(answer["version"])
        if version > node.since:
            node.answers.append((arrived, version))
            node.since = version


async def wait_connected(http: aiohttp.ClientSession, coordinators: list[CoordinatorProcess], nodes: int,
                         deadline: float) -> float:
    """Until the coordinators' metrics count every node connected; how many they counted."""
    counted = 0.0
    while time.monotonic() < deadline:
        counted = sum([await c.connected(http) for c in coordinators])
        if counted >= nodes:
            break
        await asyncio.sleep(0.5)
    return counted


async def change_phase(changer: Coordinator, nodes: list[SimNode], changes: int) -> tuple[list[JSON], list[float]]:
    summaries: list[JSON] = []
    pooled: list[float] = []
    for number in range(changes):
        old = nodes[0].since
        if any(node.since != old for node in nodes):
            raise RuntimeError("the nodes do not all hold the same map version before the change")
        started = time.monotonic()
        await changer.register(51821 + number, ["198.51.100.1:51820"])
        deadline = phase_deadline(len(nodes))
        while time.monotonic() < deadline and any(node.since <= old for node in nodes):
            await asyncio.sleep(0.02)
        latencies, missing = change_latencies([node.answers for node in nodes], started, old)
        summaries.append(change_summary(latencies, missing))
        pooled += latencies
        await asyncio.sleep(SETTLE_S)
    return summaries, pooled


# --- one run ------------------------------------------------------------------------------------


def client_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def server_cpu_seconds(pid: int) -> float:
    """CPU of a server that forks a process per connection (PostgreSQL's postmaster): its
    own, that of the children it reaped, and that of each child still running."""
    ticks = os.sysconf("SC_CLK_TCK")
    own, reaped = proc_stat_times(Path(f"/proc/{pid}/stat").read_text(), ticks)
    total = own + reaped
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            text = (entry / "stat").read_text()
        except OSError:
            continue  # gone meanwhile
        if parent_of(text) == pid:
            total += sum(proc_stat_times(text, ticks))
    return total


class Meter:
    """CPU seconds of the coordinators, of the database server (PostgreSQL: its process
    tree; SQLite works inside the coordinators) and of this process, per phase."""

    def __init__(self, coordinators: list[CoordinatorProcess], database_pid: int | None) -> None:
        self.coordinators = coordinators
        self.database_pid = database_pid
        self.cpu: dict[str, JSON] = {"coordinator": {}, "database": {}, "client": {}}
        self._mark = self._read()

    def _read(self) -> dict[str, float]:
        return {"coordinator": sum(c.cpu_seconds() for c in self.coordinators),
                "database": 0.0 if self.database_pid is None else server_cpu_seconds(self.database_pid),
                "client": client_cpu_seconds()}

    def phase(self, name: str) -> None:
        now = self._read()
        for what, seconds in now.items():
            self.cpu[what][name] = seconds - self._mark[what]
        self._mark = now

    def figures(self) -> JSON:
        figures: JSON = {f"{what}_cpu_by_phase_s": phases for what, phases in self.cpu.items()}
        figures.update({f"{what}_cpu_s": sum(phases.values()) for what, phases in self.cpu.items()})
        if self.database_pid is None:
            figures["database_cpu_s"] = None
        return figures


async def simulate(db: str, workdir: Path, nodes: int, coordinator_count: int, joins: int, changes: int,
                   progress: Any, database_pid: int | None = None) -> JSON:
    """One run against `db` (served by the process `database_pid`, if any); the figures
    (JSON), `failed` saying why when a phase failed."""
    result: JSON = {"nodes": nodes, "coordinators": coordinator_count, "joined": min(joins, nodes),
                    "seeded": nodes - min(joins, nodes), "failed": None}
    started = time.monotonic()
    admin_identity = await new_identity()
    sim = [SimNode(i, await new_identity(), i % coordinator_count) for i in range(nodes)]
    result["identities_s"] = time.monotonic() - started
    admin_key = AdminKey.generate()
    world = World(admin_key, NetworkInfo.create(admin_key, CIDR, int(time.time()) - 3600), os.urandom(32))
    joiners, seeded = sim[:result["joined"]], sim[result["joined"]:]
    progress(f"seeding {len(seeded)} members")
    await seed(db, world, admin_identity, seeded)
    coordinators = [CoordinatorProcess(db, workdir / f"coordinator{i}.log") for i in range(coordinator_count)]
    stop = asyncio.Event()
    polls: list[asyncio.Task[None]] = []
    failures: Counter[str] = Counter()
    member_http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
    try:
        for process in coordinators:
            process.start()
        for process in coordinators:
            await process.wait_ready(member_http)
        meter = Meter(coordinators, database_pid)
        urls = [c.url for c in coordinators]
        admin = SimClient(urls[0], member_http, admin=admin_key)
        clients = [SimClient(urls[node.coordinator], member_http, identity=node.identity) for node in sim]
        progress(f"{len(joiners)} joins through the approval flow")
        result.update(await join_phase(urls, admin, world, joiners))
        meter.phase("join")
        progress(f"{nodes} registers")
        result.update(await register_phase(clients, sim))
        meter.phase("register")
        full = await admin.admin_map()
        result["full_map_bytes"] = len(json.dumps(full, separators=(",", ":")))
        for node in sim:
            node.since = int(full["version"])
        rss_before = sum(c.rss_kib() for c in coordinators)
        progress(f"{nodes} long-polls")
        connect_started = time.monotonic()
        poll_deadline = phase_deadline(nodes) + changes * (PHASE_BASE_S + SETTLE_S)
        polls = [asyncio.create_task(long_poll(clients[node.index], node, stop, poll_deadline, failures)) for node in sim]
        counted = await wait_connected(member_http, coordinators, nodes, phase_deadline(nodes))
        result["connect_s"] = time.monotonic() - connect_started
        if counted < nodes:
            raise RuntimeError(f"only {counted:.0f} of {nodes} nodes counted connected in time")
        await asyncio.sleep(SETTLE_S)
        rss_connected = sum(c.rss_kib() for c in coordinators)
        result.update(rss_before_kib=rss_before, rss_connected_kib=rss_connected,
                      kib_per_node=per_node_kib(rss_before, rss_connected, nodes))
        meter.phase("connect")
        progress(f"{changes} change(s)")
        summaries, pooled = await change_phase(clients[0], sim, changes)
        meter.phase("changes")
        result.update(changes=summaries, **changes_summary(summaries, pooled))
        result.update(meter.figures())
    except (RuntimeError, CoordinatorError, OSError, TimeoutError, ExceptionGroup) as exc:
        result["failed"] = describe(exc)
    finally:
        stop.set()
        for task in polls:
            task.cancel()
        await asyncio.gather(*polls, return_exceptions=True)
        result["poll_errors"] = sum(node.errors for node in sim)
        result["polls"] = sum(node.polls for node in sim)
        result["nodes_answered"] = sum(1 for node in sim if node.polls)
        result["poll_failures"] = dict(failures.most_common(5))
        await member_http.close()
        for process in coordinators:
            process.stop()
        if result["failed"]:
            result["coordinator_logs"] = [process.log_tail(1000) for process in coordinators]
    result["client_rss_max_kib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result["run_s"] = time.monotonic() - started
    return result


def describe(exc: BaseException) -> str:
    """One line for a failed run: the first leaf of an exception group."""
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return f"{type(exc).__name__}: {exc}"


@contextlib.contextmanager
def database(backend: str, workdir: Path) -> Any:
    """A fresh database for one run: (an SQLite path, None), or (a DSN on a throwaway
    PostgreSQL, its postmaster's pid)."""
    if backend == "sqlite":
        yield str(workdir / "coordinator.db"), None
        return
    from tools.pgserver import TemporaryPostgres
    with TemporaryPostgres(durable=True, max_connections=POSTGRES_CONNECTIONS) as pg:
        dsn = pg.create_database("sim")
        yield dsn, int((pg.data / "postmaster.pid").read_text().split()[0])


async def run_one(nodes: int, backend: str, coordinators: int, args: argparse.Namespace) -> JSON:
    with tempfile.TemporaryDirectory(prefix="coordsim-") as directory:
        workdir = Path(directory)
        with database(backend, workdir) as (db, database_pid):
            result = await simulate(db, workdir, nodes, coordinators, args.joins, args.changes,
                                    lambda text: print(f"  N={nodes} {backend} x{coordinators}: {text}", flush=True),
                                    database_pid)
    result["backend"] = backend
    return result


def raise_open_files(needed: int) -> int:
    """Raise this process's (and so the coordinators') open-file limit as far as allowed."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard == resource.RLIM_INFINITY else min(hard, max(soft, needed))
    if wanted > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def machine() -> JSON:
    try:
        cpu_model = parse_cpu_model(Path("/proc/cpuinfo").read_text())
    except OSError:
        cpu_model = "unknown"
    return {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "cpu_model": cpu_model,
            "cpus": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version()}


def arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tools.coordsim", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=parse_counts, default=[100], metavar="N,N...",
                        help="simulated node counts, e.g. 100,1000,10000 (default 100)")
    parser.add_argument("--db", type=lambda text: parse_choices(text, BACKENDS), default=["sqlite"],
                        metavar="sqlite,postgresql", help="backends (default sqlite; postgresql needs root and "
                                                          "Debian's postgresql, tools/pgserver.py)")
    parser.add_argument("--coordinators", type=lambda text: parse_choices(text, COORDINATOR_COUNTS), default=[1],
                        metavar="1,2", help="coordinator counts (default 1; 2 only on postgresql)")
    parser.add_argument("--joins", type=int, default=1000, metavar="J",
                        help="nodes that join through the approval flow, the rest seeded (default 1000)")
    parser.add_argument("--changes", type=int, default=3, help="changes timed per run (default 3)")
    parser.add_argument("--json-out", metavar="FILE", help="write every run's figures as JSON")
    parser.add_argument("--chart", metavar="FILE.png", help="draw the figures (matplotlib: the bench extra)")
    args = parser.parse_args(argv)
    if args.joins < 0 or args.changes < 1:
        parser.error("--joins must be at least 0 and --changes at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = arguments(argv)
    runs = plan(args.nodes, args.db, args.coordinators)
    if not runs:
        print("nothing to run: SQLite runs one coordinator only (add --coordinators 1 or --db postgresql)",
              file=sys.stderr)
        return 2
    limit = raise_open_files(max(args.nodes) + 1024)
    command = shlex.join(["python", "-m", "tools.coordsim", *(sys.argv[1:] if argv is None else argv)])
    host = machine()
    results: list[JSON] = []
    for nodes, backend, count in runs:
        if nodes + 256 > limit:
            results.append({"nodes": nodes, "backend": backend, "coordinators": count,
                            "failed": f"needs about {nodes + 256} open files, the limit is {limit}"})
        else:
            print(f"N={nodes} {backend} x{count}:", flush=True)
            results.append(asyncio.run(run_one(nodes, backend, count, args)))
            print(format_table(results[-1:]), flush=True)
        if args.json_out:  # after each run: a later run that cannot finish loses nothing measured
            Path(args.json_out).write_text(json.dumps(document(results, host, command), indent=1) + "\n")
    print(format_table(results))
    if args.chart:
        draw(document(results, host, command), args.chart)
    return 0 if all(not r.get("failed") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
