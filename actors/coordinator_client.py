"""The coordinator client actor: registration, the peer map stream, the cached map.

It owns the node's `PeerMap` (verified records, revocations kept for good), the
one copy anything changes; every other reader takes `snapshot`, the map at one
version, replaced (never changed) after each update. It hands the mesh actor
what changed: membership changes and the pre-shared key are
awaited (`ask`), candidates go as the latest per peer (`tell_latest`), so a full
resync of a large map loses nothing to a full mailbox. It long-polls `GET /v1/map` with the last
version it has, so a change reaches it within a round trip and a reconnect
fetches only what it missed.

It also registers this node's candidates (tunnelmesh.nat.candidates): its interface
addresses, the NAT prober's reflexive addresses (`set_nat_report`), the port mapper's
address (`set_mapped`) and the configured public endpoint, in a record it signs anew
only when they change, registered again at once (beside the long-poll, on the same
session) when they do. Peers' records are verified here (`VerifiedCandidates`) and
their candidates handed on best first (same LAN first). Every verified change is written to the on-disk
cache before it is acted on. When the coordinator cannot be reached, nothing
else changes: the sessions keep running on what is known, and the client
retries with backoff (1 s doubling to 30 s). With several coordinator URLs it
fails over between them instead (tunnelmesh/coordinator/failover.py: the next at
once, backoff after a whole round, back to the preferred one when it answers),
keeping its map and version and telling the mesh nothing; the relay client
follows it (`on_coordinator_url`). When one of this machine's addresses has
gone (the node roamed), the session in use is dropped at its next register, not used:
its connections may be bound to the old address; a new session dials from the new one.
"""

from __future__ import annotations

import asyncio
import dataclasses
import http
import ipaddress
import logging
import socket
import urllib.parse
from collections.abc import Callable, Coroutine, Mapping, Sequence
from pathlib import Path
from typing import Any


from tunnelmesh.clock import SYSTEM_CLOCK, Clock
from tunnelmesh.config import UDP_ONLY, TransportsConfig
from tunnelmesh.coordinator.client import Coordinator, CoordinatorError, Revoked
from tunnelmesh.coordinator.failover import PREFERRED_RETRY, REFUSALS_TO_MOVE, CoordinatorUrls
from tunnelmesh.coordinator.punch import take_notices
from tunnelmesh.coordinator.reflection import stun_servers
from tunnelmesh.identity import IdentityError, NodeIdentity
from tunnelmesh.membership import (
    MAX_ENDPOINTS, DeviceEntry, MapSnapshot, MemberEntry, MembershipError, PeerMap, Revocation,
)
from tunnelmesh.membership.peermap import sendable
from tunnelmesh.nat.candidates import (
    CandidateError, CandidateRecord, VerifiedCandidates, make_candidate_record, order_candidates, own_candidates,
)
from tunnelmesh.nat.report import UNKNOWN, Address, Candidate, NatReport, PeerNat
from tunnelmesh.netstate import NetworkState, StateError, save_peer_map, save_network_secret
from tunnelmesh.wireguard import derive_psk

from .control import EventBus
from .mesh import Mesh
from .nat_prober import local_interfaces
from .messages import (
    AddPeers, CoordinatorChanged, CoordinatorStatus, NodeRevoked, PeerSpec, Punch, RemovePeer, SecretRotated, SetCandidates,
    SetPsk, SyncPeers,
)
from .runtime import Actor

log = logging.getLogger("tunnelmesh.coordinator")

REGISTER_INTERVAL = 15.0
LONG_POLL = 25.0
PERSISTENT_KEEPALIVE = 25  # keeps NAT mappings open between members
#: Asking the preferred coordinator whether it answers again: a cheap unsigned GET, bounded.
PREFERRED_ASK_TIMEOUT = 5.0


class AddressGone(CoordinatorError):
    """This node's address went away (it roamed): a new session, at the same coordinator."""


class _BackToPreferred:
    """The long-poll ended because the preferred coordinator answers again."""


BACK_TO_PREFERRED = _BackToPreferred()


def is_refusal(exc: CoordinatorError) -> bool:
    """Whether the coordinator in use answered with a refusal (a 4xx: an unknown key, a
    revocation that does not verify) rather than failed (no answer, a 5xx, an answer that
    is no coordinator's)."""
    return exc.status is not None and 400 <= exc.status < 500


def peer_candidates(wg_key: bytes, snapshot: MapSnapshot, record: CandidateRecord | None,
                    lan: Sequence[ipaddress.IPv4Network]) -> tuple[tuple[Address, ...], PeerNat]:
    """A member's addresses best first (its verified candidate record, ordered for this
    node's subnets `lan`, then where the coordinator saw it) and what it said of its NAT.
    Of its reflexive addresses (where a punch sprays ports: tunnelmesh/punch.py) only those
    at the IP the coordinator saw it connect from stay, so that a member cannot point other
    nodes' sprays at an address of its choosing."""
    endpoints = snapshot.endpoints.get(wg_key)
    observed = endpoints.candidates(snapshot.network) if endpoints is not None else ()
    ordered = order_candidates(record, observed, lan)
    nat = record.nat if record is not None else PeerNat()
    seen_from = endpoints.addresses[0][0] if endpoints is not None and endpoints.addresses else None
    reflexive = tuple(a for a in nat.reflexive if a[0] == seen_from and sendable(a[0], snapshot.network))
    return tuple(a for a in ordered if sendable(a[0], snapshot.network)), dataclasses.replace(nat, reflexive=reflexive)


def peer_spec(member: MemberEntry, snapshot: MapSnapshot, transports: TransportsConfig = TransportsConfig(), *,
              records: Mapping[bytes, CandidateRecord] | None = None, lan: Sequence[ipaddress.IPv4Network] = ()
              ) -> PeerSpec:
    """`records`: the verified candidate records (none: only the coordinator's addresses)."""
    record = records.get(member.wg_key) if records is not None else None
    addresses, nat = peer_candidates(member.wg_key, snapshot, record, lan)
    return PeerSpec(
        name=member.name, mesh_ip=member.ipv4, fingerprint=member.identity.fingerprint, wg_key=member.wg_key,
        allowed_ips=(ipaddress.IPv4Network(f"{member.ipv4}/32"), ipaddress.IPv6Network(f"{member.ipv6}/128")),
        endpoint=addresses[0] if addresses else None,
        persistent_keepalive=PERSISTENT_KEEPALIVE, choice=transports.for_peer(member.name),
        candidates=addresses, nat=nat,
    )


def device_spec(device: DeviceEntry) -> PeerSpec:
    """A plain WireGuard device this node serves: UDP only (a phone has nothing else), no
    SSH identity, no endpoint until it makes a handshake (it is behind NAT: it keeps the
    mapping open with its own keepalive), only its own mesh addresses."""
    return PeerSpec(
        name=device.name, mesh_ip=device.ipv4, fingerprint=None, wg_key=device.wg_key,
        allowed_ips=(ipaddress.IPv4Network(f"{device.ipv4}/32"), ipaddress.IPv6Network(f"{device.ipv6}/128")),
        endpoint=None, persistent_keepalive=0, choice=UDP_ONLY, plain_wireguard=True,
    )


def peer_specs(snapshot: MapSnapshot, own_name: str, transports: TransportsConfig,
               records: Mapping[bytes, CandidateRecord], lan: Sequence[ipaddress.IPv4Network]
               ) -> tuple[PeerSpec, ...]:
    """Every peer of this node in the map: the members, and the devices it serves."""
    return (*(peer_spec(m, snapshot, transports, records=records, lan=lan) for m in snapshot.members.values()),
            *(device_spec(d) for d in snapshot.devices.values() if d.served_by == own_name))


class CoordinatorClient(Actor):
    name = "coordinator-client"
    policy = "restart"

    def __init__(
        self, state: NetworkState, identity: NodeIdentity, peer_map: PeerMap, mesh: Mesh, bus: EventBus,
        *, cache_path: Path, secret_path: Path, listen_port: int, on_revoked: Callable[[str], None],
        transports: TransportsConfig = TransportsConfig(), ssh_record: dict[str, Any] | None = None,
        relay_offer: dict[str, Any] | None = None, ca_file: str | None = None,
        on_map_changed: list[Callable[[], None]] | None = None, interface: str = "",
        tls_fingerprint: str | None = None, clock: Clock = SYSTEM_CLOCK, public_endpoint: Candidate | None = None,
        urls: Sequence[str] = (), on_coordinator_url: Sequence[Callable[[str], None]] = (),
        preferred_retry: float = PREFERRED_RETRY,
    ) -> None:
        """`urls`: the coordinators to fail over between, best first (none: `state.url`
        alone); `preferred_retry`: how often, on a later one, the first is asked again;
        `on_coordinator_url`: called with the URL of each coordinator connected to (the
        relay client follows it)."""
        super().__init__()
        self.clock = clock
        self.state = state
        self.urls = CoordinatorUrls(urls or (state.url,), preferred_retry=preferred_retry)
        self.on_coordinator_url = on_coordinator_url
        self.identity = identity
        self.peer_map = peer_map
        self.snapshot = peer_map.snapshot()  # what readers get: replaced after every update
        self.mesh = mesh
        self.bus = bus
        self.cache_path = cache_path
        self.secret_path = secret_path
        self.listen_port = listen_port
        self.on_revoked = on_revoked
        self.transports = transports
        self.ssh_record = ssh_record  # this node's signed SSH endpoint, registered with its address
        self.ca_file = ca_file
        self.tls_fingerprint = tls_fingerprint  # the coordinator's certificate, pinned
        self.relay_offer = relay_offer  # the relay this node serves, registered with its address
        self.relay_refused: Any = None  # why the coordinator did not take the offer, as it last said
        # Members, their endpoints or the network policy changed (called once `snapshot` shows
        # it). The caller's list itself: it may append later.
        self.on_map_changed = on_map_changed if on_map_changed is not None else []
        self.interface = interface  # the tunnel's: its addresses are not where peers find us
        self.connection = "connecting"
        self._published_url = self.url  # the URL CoordinatorChanged last named
        self.since = clock.wall()
        self.error: str | None = None
        self.observed: str | None = None
        self.stun_servers: tuple[Address, ...] = ()  # the coordinator's STUN reflection service (register reply)
        # Hole punching: sessions ask through the mesh; the coordinator session in use, and
        # the peers a punch request is in flight for (one at a time per peer).
        self._coordinator: Coordinator | None = None
        self._punching: set[bytes] = set()
        mesh.punch_requester = self.request_punch
        # This node's candidates: what it has learnt, the record it last signed and what that
        # says (signed anew only when this changes), and the wake-up for a prompt register.
        self.public_endpoint = public_endpoint  # [nat] public_endpoint, kind "configured"
        self.nat_report: NatReport | None = None
        self.mapped: Candidate | None = None
        self.lan: tuple[ipaddress.IPv4Interface, ...] = ()  # this machine's addresses, as last read
        self._record: dict[str, Any] | None = None
        self._record_says: tuple[object, ...] | None = None
        self._record_version = 0
        self._candidates_refused: str | None = None
        self._candidates_changed = asyncio.Event()
        self.verified = VerifiedCandidates()  # peers' candidate records, the newest verified

    def status(self) -> CoordinatorStatus:
        """From the snapshot (never the PeerMap itself: the control actor asks this)."""
        snapshot = self.snapshot
        return CoordinatorStatus(
            url=self.url, network=self.state.network.network, state=self.connection,
            tls_fingerprint=self.tls_fingerprint, since=self.since, error=self.error, version=snapshot.version,
            observed=self.observed, members=len(snapshot.members) + 1, revocations=snapshot.revocations,
            rejected=dict(snapshot.rejected), urls=self.urls.urls,
        )

    @property
    def url(self) -> str:
        """The coordinator in use (or being connected to)."""
        return self.urls.current

    def _set_connection(self, state: str, error: str | None = None, *, logged: bool = False) -> None:
        """`logged`: the caller said why in the log already (a switch)."""
        if state != self.connection or error != self.error or self.url != self._published_url:
            if state == "connected":
                log.info("coordinator %s: connected (peer map version %d)", self.url, self.peer_map.version)
            elif not logged:
                log.warning("coordinator %s: %s%s", self.url, state, f": {error}" if error else "")
            self.bus.publish(CoordinatorChanged(state, error, self.url))
            self.connection, self.error, self.since, self._published_url = state, error, self.clock.wall(), self.url

    # The coordinator's map went below our version: ask for full maps. Also the first poll of
    # a run: a cache from a join or from before candidate records (maps leave them out unless
    # asked, docs/coordinator.md) lacks the records of members unchanged since.
    _behind = True

    _restarted = False  # setup ran before: this one follows a crash

    async def setup(self) -> None:
        """At start and after a crash: the mesh gets the whole member set, and every session
        its verified candidates (sessions made before, as the daemon's initial peers from the
        cache, began with unverified ones). After a crash also the rest of what `apply` hands
        on (the PSK, the map-changed hooks), so that nothing the map took before the crash is
        lost: the map's version has moved on, and no update will bring it again."""
        snapshot = self.snapshot
        self._verify_records(snapshot.members)
        await self.mesh.ask(SyncPeers(peer_specs(snapshot, self.state.member.name, self.transports,
                                                 self.verified.records, self._lan_networks())))
        self._send_candidates(snapshot.members)
        if not self._restarted:
            self._restarted = True
            return
        if self.peer_map.secret is not None:
            await self._install_secret()
        for call in self.on_map_changed:
            call()

    async def run(self) -> None:
        """Connect to the coordinator in use and follow its peer map, failing over between
        `urls` (tunnelmesh/coordinator/failover.py) without touching the peers: the map,
        its version and the sessions stay as they are across a switch."""
        await self.setup()
        while True:
            url = self.url
            try:
                async with Coordinator(url, identity=self.identity, ca_file=self.ca_file, clock=self.clock,
                                       tls_fingerprint=self.tls_fingerprint) as coordinator:
                    await self._follow(coordinator)
                self._back_to_preferred()
                continue
            except Revoked as exc:
                if self._revoked(exc.revocation):
                    return
                wait = self._failed(url, CoordinatorError(
                    "it claims this node was revoked, with a revocation that does not verify", exc.status))
            except (CoordinatorError, MembershipError) as exc:
                wait = self._failed(url, exc)
            finally:
                self._coordinator = None
            if await self._preferred_answers_within(wait):
                self._back_to_preferred()

    def _back_to_preferred(self) -> None:
        log.info("coordinator %s answers again: switching back from %s", self.urls.preferred, self.url)
        self.urls.preferred_answered()
        self._set_connection("connecting", logged=True)

    async def _preferred_answers_within(self, wait: float) -> bool:
        """Wait `wait` seconds before the next try; on a later coordinator, one that refuses
        this node or cannot be reached too, asking the preferred one meanwhile whenever
        due. Whether it answered (then the wait is over)."""
        if self.urls.preferred_due() is None:
            await asyncio.sleep(wait)
            return False
        try:
            async with asyncio.timeout(wait):
                await self._preferred_answers()
        except TimeoutError:
            return False
        return True

    async def _follow(self, coordinator: Coordinator) -> None:
        """Register, then long-poll the map and apply it, until something fails (raised) or
        the preferred coordinator answers again (returns)."""
        await self._register(coordinator)
        self.urls.connected()
        self._set_connection("connected")
        self._coordinator = coordinator
        for follow in self.on_coordinator_url:
            follow(coordinator.url)
        last_register = self.clock.monotonic()
        while True:
            # After a refused rollback, only a full map: asking for what changed
            # since our version would skip what the coordinator stored below it.
            since = 0 if self._behind else self.peer_map.version
            update = await self._poll(coordinator, since)
            if update is BACK_TO_PREFERRED:
                return
            # Punches first: they need only the members known, not the map applied.
            self._tell_punches(self._take_punch_notices(update))
            self._set_connection("connected")
            try:
                await self.apply(update)  # refuses a version older than ours (no rollback)
            except MembershipError:
                self._behind = True
                raise
            self._behind = False
            if self.clock.monotonic() - last_register >= REGISTER_INTERVAL:
                await self._register(coordinator)
                last_register = self.clock.monotonic()

    def _failed(self, url: str, exc: CoordinatorError | MembershipError) -> float:
        """What a failure at `url` leads to (a switch, said in one line, or a wait); the
        seconds to wait before the next try."""
        refused = isinstance(exc, CoordinatorError) and is_refusal(exc)
        if refused:  # a later coordinator refusing again and again may be the one wrong: moves on
            wait = self.urls.refused(self.clock.monotonic())
        elif isinstance(exc, CoordinatorError) and not isinstance(exc, AddressGone):
            wait = self.urls.unreachable(self.clock.monotonic())
        else:  # the node's own
            wait = self.urls.stay()
        if self.url == url:  # stays
            self._set_connection("unreachable", str(exc))
            return wait
        # Each switch of a streak's first round is said; of later rounds (all down) only at debug.
        level = logging.WARNING if self.urls.failures <= len(self.urls.urls) else logging.DEBUG
        log.log(level, "coordinator %s %s (%s); switched to %s%s", url,
                f"refused this node {REFUSALS_TO_MOVE} times in a row" if refused else "unreachable", exc, self.url,
                f" in {wait:g} s: none of the {len(self.urls.urls)} answered" if wait else "")
        self._set_connection("unreachable" if wait else "connecting", str(exc), logged=True)
        return wait

    def request_punch(self, wg_key: bytes) -> None:
        """A session wants a punch with its peer (on the event loop; never waits): asked
        of the coordinator now, unless it is unreachable or a request for the peer is on."""
        coordinator = self._coordinator
        if coordinator is None:
            self.mesh.punch_refusals[wg_key] = "no punch: the coordinator is unreachable"
            return
        if wg_key in self._punching:
            return
        self._punching.add(wg_key)
        self.start_task(self._ask_punch(coordinator, wg_key), name="punch request")

    async def _ask_punch(self, coordinator: Coordinator, wg_key: bytes) -> None:
        """Ask; why it failed, if it did, goes to the peer's status (Mesh.punch_refusals)."""
        member = self.snapshot.members.get(wg_key)
        try:
            await coordinator.punch(wg_key)
            self.mesh.punch_refusals.pop(wg_key, None)
        except CoordinatorError as exc:  # e.g. the peer runs a daemon from before punching
            log.info("punch with %s: %s", member.name if member is not None else "a peer", exc)
            self.mesh.punch_refusals[wg_key] = f"punch request failed: {exc}"
        finally:
            self._punching.discard(wg_key)

    def _take_punch_notices(self, update: Any) -> list[bytes]:
        keys, dropped = take_notices(update)
        if dropped:
            log.warning("coordinator: %d malformed punch notice(s) dropped", dropped)
        return keys

    def _tell_punches(self, keys: list[bytes]) -> None:
        """The coordinator told this node to punch towards these members, now."""
        for key in keys:
            if key in self.snapshot.members:
                self.mesh.tell_latest((Punch, key), Punch(key))

    async def _poll(self, coordinator: Coordinator, since: int) -> Any:
        """The long-poll's answer, or BACK_TO_PREFERRED. Meanwhile, whenever this node's
        candidates change, it registers again on the same session (a change during a
        register is not lost: it sets the flag again, for another register after this one),
        and on a later coordinator than the preferred one it asks that one, when due,
        whether it answers again. The first of them to end ends the others; a failure is
        raised as itself (not inside an ExceptionGroup): the run loop fails over or backs
        off on a CoordinatorError."""
        async def register_on_change() -> None:
            while True:
                await self._candidates_changed.wait()
                self._candidates_changed.clear()
                try:
                    await self._register(coordinator)
                except asyncio.CancelledError:  # the poll ended mid-register: not known to have
                    self._candidates_changed.set()  # reached the coordinator, so again next poll
                    raise

        works: list[Coroutine[Any, Any, Any]] = [coordinator.map(since, LONG_POLL, punch=True), register_on_change()]
        if self.urls.preferred_due() is not None:
            works.append(self._preferred_answers())
        outcome: list[Any] = []  # the first result or failure
        tasks: list[asyncio.Task[None]] = []

        async def first_ends_all(work: Coroutine[Any, Any, Any]) -> None:
            try:
                outcome.append(await work)
            except Exception as exc:
                outcome.append(exc)
            for task in tasks:
                if task is not asyncio.current_task():
                    task.cancel()

        async with asyncio.TaskGroup() as group:
            tasks.extend(group.create_task(first_ends_all(work)) for work in works)
        if isinstance(outcome[0], Exception):
            raise outcome[0]
        return outcome[0]

    async def _preferred_answers(self) -> _BackToPreferred:
        """Ask the preferred coordinator whenever due, until it answers (a cheap unsigned
        GET: whether the node gets on there is for the register after the switch). A 429
        is an answer: it is up, its unsigned requests only rate-limited (a register is
        signed: not limited so)."""
        while True:
            due = self.urls.preferred_due()
            assert due is not None, "asked only on a later coordinator"
            await asyncio.sleep(max(0.0, due - self.clock.monotonic()))
            try:
                async with Coordinator(self.urls.preferred, ca_file=self.ca_file, tls_fingerprint=self.tls_fingerprint,
                                       timeout=PREFERRED_ASK_TIMEOUT) as preferred:
                    await preferred.network()
                return BACK_TO_PREFERRED
            except CoordinatorError as exc:
                if exc.status == http.HTTPStatus.TOO_MANY_REQUESTS:
                    return BACK_TO_PREFERRED
                log.debug("coordinator %s: still not answering: %s", self.urls.preferred, exc)
            self.urls.preferred_silent(self.clock.monotonic())

    def set_nat_report(self, report: NatReport) -> None:
        """The NAT prober's latest report (on the event loop): its reflexive addresses and
        NAT behaviour go into the record, registered at once if that changes it."""
        self.nat_report = report
        self._wake_if_changed()

    def set_mapped(self, candidate: Candidate | None) -> None:
        """The port mapper's address (kind "mapped"; None: no mapping now), as for set_nat_report."""
        self.mapped = candidate
        self._wake_if_changed()

    def _record_content(self) -> tuple[tuple[Candidate, ...], str, str]:
        """What this node's candidate record says now: its candidates and NAT behaviour."""
        local = [(str(interface.ip), self.listen_port) for interface in self.lan]
        report = self.nat_report
        candidates = own_candidates(local, report=report, mapped=self.mapped, configured=self.public_endpoint)
        return (candidates, *((report.mapping, report.filtering) if report is not None else (UNKNOWN, UNKNOWN)))

    def _wake_if_changed(self) -> None:
        if self._record_content() != self._record_says:
            self._candidates_changed.set()

    async def _candidate_record(self) -> dict[str, Any] | None:
        """This node's signed record, made anew only if what it says changed (with an
        ssh-agent identity, signing is an agent call, bounded at 5 s); if signing fails,
        the last one (logged, tried again at the next register)."""
        says = self._record_content()
        if says == self._record_says:
            return self._record
        candidates, mapping, filtering = says
        version = max(int(self.clock.wall() * 1000), self._record_version + 1)  # strictly increasing
        try:
            self._record = await make_candidate_record(self.identity, candidates, mapping=mapping,
                                                       filtering=filtering, version=version)
        except (IdentityError, CandidateError) as exc:
            log.warning("cannot sign this node's candidate record: %s", exc)
            return self._record
        self._record_says, self._record_version = says, version
        return self._record

    def _lan_networks(self) -> list[ipaddress.IPv4Network]:
        return [interface.network for interface in self.lan]

    async def _register(self, coordinator: Coordinator) -> None:
        lan = tuple(await local_interfaces(self.interface))
        gone = {interface.ip for interface in self.lan} - {interface.ip for interface in lan}
        if gone and coordinator is self._coordinator:
            # The session's connections may be bound to an address that went away (the node
            # roamed): they would hang until a timeout. A new session dials from the new one.
            raise AddressGone(f"this node's address {', '.join(map(str, sorted(gone)))} went away: reconnecting")
        lan_changed, self.lan = lan != self.lan, lan
        # The interface addresses go unsigned too: the SSH rung dials the hosts of the unsigned
        # list (actors/links.py), and a node whose record cannot be signed is still found.
        own = [f"{interface.ip}:{self.listen_port}" for interface in lan]
        reply = await coordinator.register(self.listen_port, own[:MAX_ENDPOINTS - 1], ssh=self.ssh_record,
                                           relay=self.relay_offer, candidates=await self._candidate_record())
        self.observed = reply.get("observed") if isinstance(reply, dict) else None
        self.stun_servers = stun_servers(reply.get("stun") if isinstance(reply, dict) else None,
                                         urllib.parse.urlsplit(self.url).hostname or "")
        refused = reply.get("relay_refused") if isinstance(reply, dict) else None
        if refused != self.relay_refused and refused is not None:
            log.warning("coordinator: this node's relay is not offered to members: %s", str(refused)[:300])
        self.relay_refused = refused
        refused = reply.get("candidates_refused") if isinstance(reply, dict) else None
        if refused != self._candidates_refused and refused is not None:
            log.warning("coordinator: this node's candidate record was not taken: %s", str(refused)[:300])
        self._candidates_refused = refused
        if lan_changed:  # which peers' candidates are on our LAN may have changed
            self._send_candidates(self.snapshot.members)

    def _verify_records(self, keys: Mapping[bytes, Any]) -> None:
        """Verify the candidate records of the members `keys` names (the map's endpoints)."""
        snapshot, now = self.snapshot, self.clock.wall()
        self.verified.keep_only(snapshot.members)
        for key in keys:
            member, endpoints = snapshot.members.get(key), snapshot.endpoints.get(key)
            if member is not None and endpoints is not None:
                self.verified.take(member.name, key, member.identity, endpoints.candidate_record, now)

    def _send_candidates(self, keys: Mapping[bytes, Any]) -> None:
        """Each of these members' sessions gets its addresses, best first, and its NAT."""
        lan = self._lan_networks()
        for key in keys:
            addresses, nat = peer_candidates(key, self.snapshot, self.verified.records.get(key), lan)
            if addresses:
                self.mesh.tell_latest(key, SetCandidates(key, addresses, nat))

    async def apply(self, update: Any) -> None:
        """Verify an update, cache it, and hand the mesh what changed."""
        changes = self.peer_map.apply(update)
        self.snapshot = self.peer_map.snapshot()
        for reason in changes.rejected:
            log.warning("peer map: %s", reason)
        if changes.revoked_self is not None and self._revoked(changes.revoked_self.to_wire()):
            return
        if changes.new_secret is not None:
            await self._install_secret()
        try:
            save_peer_map(self.cache_path, self.peer_map)
        except StateError as exc:
            log.error("%s", exc)  # the map in memory is still right; the next change retries
        own = self.state.member.name
        for member, reason in (*changes.removed, *((d, r) for d, r in changes.devices_removed if d.served_by == own)):
            await self.mesh.ask(RemovePeer(member.wg_key, reason))
        self._verify_records(changes.endpoints)
        lan = self._lan_networks()
        added = (*(peer_spec(m, self.snapshot, self.transports, records=self.verified.records, lan=lan)
                   for m in changes.added),
                 *(device_spec(d) for d in changes.devices_added if d.served_by == own))
        if added:
            await self.mesh.ask(AddPeers(added))
        if changes.new_policy is not None:
            log.info("network policy v%d (issued %d) verified and in force", changes.new_policy.version,
                     changes.new_policy.issued)
        if (changes.added or changes.removed or changes.endpoints or changes.new_policy is not None
                or changes.devices_added or changes.devices_removed):
            for call in self.on_map_changed:
                call()
        added_keys = {m.wg_key for m in changes.added}
        self._send_candidates({key: None for key in changes.endpoints if key not in added_keys})

    async def _install_secret(self) -> None:
        record = self.peer_map.secret
        assert record is not None
        try:
            secret = record.open_for(self.state.member.wg_key, self.identity.static_private)
        except MembershipError as exc:
            log.error("network secret epoch %d: %s", record.epoch, exc)
            return
        if secret is None:
            log.warning("network secret epoch %d was not sealed for this node", record.epoch)
            return
        try:
            save_network_secret(self.secret_path, secret)
        except StateError as exc:
            log.error("%s", exc)
        await self.mesh.ask(SetPsk(derive_psk(secret)))
        log.info("network secret rotated to epoch %d", record.epoch)
        self.bus.publish(SecretRotated(record.epoch))

    def _revoked(self, wire: Any) -> bool:
        """Stop for good if the revocation verifies and names this node; else ignore it."""
        try:
            revocation = Revocation.from_wire(wire, self.state.network)
        except MembershipError as exc:
            log.warning("coordinator sent a revocation that does not verify: %s", exc)
            return False
        if not revocation.covers(self.state.member):
            return False
        self.peer_map.keep(revocation)
        try:
            save_peer_map(self.cache_path, self.peer_map)
        except StateError as exc:
            log.error("%s", exc)
        try:
            self.secret_path.unlink()
        except OSError:
            pass
        message = f"this node ({revocation.name}) was revoked by the network admin; stopping"
        log.error("%s", message)
        self.bus.publish(NodeRevoked(revocation.name))
        self.on_revoked(message)
        return True
