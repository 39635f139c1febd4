"""The coordinator's HTTP API (docs/coordinator.md, "HTTP API") over a `Store`.

The coordinator is trusted for availability, not membership: it checks every
signed record before storing it (so it refuses what nodes would refuse, with a
message that says why), but it serves records as stored and nodes verify them
again. Admission (a join, an approval) checks and stores in one transaction,
so a refusal leaves no row behind.

Errors are ``{"error": "..."}`` with a status that fits: 400 malformed, 401
unknown key or bad signature, 403 refused, 404, 409 conflict, 410 expired or
used up, 503 not set up or storage failure. Nothing a client sends gives a 500.
Secrets, tokens and signatures are never logged.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from aiohttp import web

from tunnelmesh.identity import IdentityError, PublicIdentity
from tunnelmesh.membership import (
    JOIN_WINDOW,
    DeviceEntry,
    InviteGrant,
    MemberEntry,
    MembershipError,
    NetworkInfo,
    PolicyRecord,
    ReplayGuard,
    RequestAuth,
    Revocation,
    SecretRecord,
    b64,
    check_name,
    member_body,
    parse_entry,
    unb64,
    verify_admin_request,
    verify_join_proof,
    verify_member_request,
)

from . import bodies
from .cluster import CLUSTER
from .guards import Refused, loggable
from .punch import PunchBoard
from .reflection import REFLECTION
from .relay import MembershipUnknown, Relay
from .replies import MapReplies
from .store import MemberRow, NetworkRow, PendingRow, Store, StoreError

log = logging.getLogger("tunnelmesh.coordinator.server")

#: The longest a map long-poll is held, whatever the client asks.
MAX_WAIT = 30.0
#: Joins waiting for the admin: how long one waits before it expires, how many requests for
#: approval may wait at once and from one source address, and how many invited joins (which
#: have their own limit, so a flood of requests for approval never blocks them).
PENDING_TTL = 3600
PENDING_LIMIT = 64
PENDING_PER_SOURCE = 4
INVITED_LIMIT = 256
#: How long a join with an invite is held for the admin's machine to countersign it before
#: the joiner is told to ask again, and the longest an admin's wait for pending joins lasts.
COUNTERSIGN_WAIT = 10.0
#: How long shutdown waits for requests in flight (long-polls are woken at once).
SHUTDOWN_TIMEOUT = 2.0
#: A node counts as connected while its last map request is at most MAX_WAIT + this old.
CONNECTED_GRACE = 10.0


class _Service:
    """The handlers, over one store, with one replay guard and one wake-up for long-polls."""

    def __init__(self, store: Store, clock: Callable[[], float], admin_fingerprint: str | None,
                 trusted_proxies: frozenset[str] = frozenset(), monotonic: Callable[[], float] = time.monotonic
                 ) -> None:
        self.store = store
        self.clock = clock
        self.monotonic = monotonic
        self.polled: dict[str, float] = {}  # member key -> when it last asked for the map (metrics)
        self.admin_fingerprint = admin_fingerprint
        self.trusted_proxies = trusted_proxies
        self.guard = ReplayGuard()
        self._changed = asyncio.Event()
        self._pending_changed = asyncio.Event()
        self._closing = False
        self._relay: Relay | None = None
        self.punches = PunchBoard()  # punch notices waiting for members' long-polls (tunnelmesh/coordinator/punch.py)
        self.replies = MapReplies()  # the map replies of the current version, shared by the long-polls it wakes

    def _wake(self) -> None:
        self._wake_polls()
        if self._relay is not None:
            self._relay.member_changed()

    def _wake_polls(self) -> None:
        """Wake every map long-poll: each checks whether it has something to answer."""
        self._changed.set()
        self._changed = asyncio.Event()

    def _wake_pending(self) -> None:
        """A pending join came, or was approved or refused: wake who waits on one."""
        self._pending_changed.set()
        self._pending_changed = asyncio.Event()

    async def lifetime(self, app: web.Application) -> AsyncIterator[None]:
        self.store.add_listener(self._wake)
        self.store.add_pending_listener(self._wake_pending)
        self.store.add_punch_listener(self._punch_from_elsewhere)
        yield
        self.store.remove_punch_listener(self._punch_from_elsewhere)
        self.store.remove_pending_listener(self._wake_pending)
        self.store.remove_listener(self._wake)

    def _punch_from_elsewhere(self, asker: str, peer: str) -> None:
        """A punch request made through another coordinator: the notice, if `peer` polls here."""
        if self.punches.notice(peer, asker, self.monotonic()):
            self._wake_polls()

    async def on_shutdown(self, app: web.Application) -> None:
        """Answer held long-polls now and close relay connections rather than holding shutdown up."""
        self._closing = True
        self._wake()
        self._wake_pending()
        if self._relay is not None:
            await self._relay.close()

    # --- shared checks ------------------------------------------------------------------------

    async def _network_row(self) -> NetworkRow:
        row = await self.store.network()
        if row is None:
            raise Refused(503, "this coordinator has no network yet: run `tunnelmesh init --url` with its URL "
                               "(or start the admin node that embeds it)")
        return row

    async def _network(self) -> NetworkInfo:
        try:
            return NetworkInfo.from_wire((await self._network_row()).record)
        except MembershipError as exc:
            raise StoreError(f"the stored network record does not verify ({exc}); restore the database") from None

    def _auth(self, request: web.Request) -> RequestAuth:
        with bodies.status(401):
            return RequestAuth.parse(request.headers.get("Authorization"))

    def _check_admin(self, request: web.Request, raw: bytes, admin_key: bytes) -> None:
        auth = self._auth(request)
        if auth.who != "admin":
            raise Refused(403, "this request needs the admin key")
        now = self.clock()
        with bodies.status(401):
            self.guard.precheck(auth, now)  # cheap first: a stale or replayed request costs no signature check
            verify_admin_request(auth, admin_key, request.method, request.path_qs, raw)
            self.guard.record(auth, now)

    async def _admin(self, request: web.Request) -> tuple[NetworkInfo, bytes]:
        """An admin-signed request: the network and the raw body."""
        raw = await request.read()
        network = await self._network()
        self._check_admin(request, raw, network.admin_key)
        return network, raw

    async def _admin_body(self, request: web.Request, fields: set[str]) -> tuple[NetworkInfo, dict[str, Any]]:
        """An admin-signed request whose body is a JSON object with exactly `fields`."""
        network, raw = await self._admin(request)
        body = bodies.parse(raw)
        bodies.body_field.keys(body, fields, "the body")
        return network, body

    async def _member(self, request: web.Request) -> tuple[MemberRow, bytes]:
        """A member-signed request: the member and the raw body. The cheap checks (the
        header, membership, the time window, the nonce) come before the body is read and
        before the signature is checked: an outsider costs the coordinator no signature
        check, a member's stale or replayed request neither."""
        auth = self._auth(request)
        if auth.who == "admin":
            raise Refused(403, "this request needs a member's key, not the admin key")
        key = b64(unb64(auth.who, "member key", 32))
        member = await self.store.member(key)
        if member is None:
            revocation = await self.store.revocation(key)
            if revocation is not None:
                raise Refused(403, "this node was revoked by the admin", revocation=revocation.record)
            raise Refused(401, "unknown node: this key is not a member of the network (join it first)")
        if member.is_device:
            raise Refused(403, f"{member.name} is a plain WireGuard device: it has no SSH key to sign requests with")
        with bodies.status(401):
            self.guard.precheck(auth, self.clock())
        raw = await request.read()
        now = self.clock()
        with bodies.status(401):
            try:
                identity = bodies.identity_of(member.identity)
            except IdentityError as exc:
                raise StoreError(f"the stored identity of {member.name} is damaged ({exc}); restore the database") from None
            verify_member_request(auth, identity, request.method, request.path_qs, raw)
            self.guard.record(auth, now)  # checks the window's nonces again: the body read may have let a copy by
        return member, raw

    async def _check_invite(self, grant: InviteGrant, now: int) -> None:
        if grant.expires < now:
            raise Refused(410, f"the invite expired at {bodies.utc(grant.expires)}; ask the admin for a new one")
        await self._check_uses(grant)

    async def _check_uses(self, grant: InviteGrant) -> None:
        if grant.uses and await self.store.invite_uses(b64(grant.invite_key)) >= grant.uses:
            times = "" if grant.uses == 1 else f" {grant.uses} times, all it allows"
            raise Refused(410, f"the invite was already used{times}; ask the admin for a new one")

    async def _check_newcomer(self, identity: PublicIdentity, name: str) -> None:
        """The key is not a member yet (cloned machines share one) and no member has the name.
        Pending joins hold nothing: the admin decides between them."""
        key = b64(identity.wg_public_key)
        existing = await self.store.member(key)
        if existing is not None:
            raise Refused(409, f"this key is already a member (as {existing.name!r}): is this a cloned machine? "
                               "give it a key of its own with `tunnelmesh join --new-key`")
        if await self.store.member_named(name) is not None:
            raise Refused(409, f"the name {name!r} is taken by another member; choose another with --name")

    def _fresh_since(self, now: int) -> int:
        """Pending joins made before this have expired (wherever pending rows are read)."""
        return now - PENDING_TTL

    async def _check_room(self, now: int, source: str, *, invited: bool) -> None:
        """Bound pending joins: requests for approval per source address and in all, invited
        joins in all (apart, so a flood of requests never blocks invited joins)."""
        fresh = self._fresh_since(now)
        await self.store.purge_pending(fresh)
        if invited:
            if await self.store.pending_count(fresh, invited=True) >= INVITED_LIMIT:
                raise Refused(429, f"{INVITED_LIMIT} invited joins are already waiting for the admin's machine to "
                                   "countersign them: is its daemon running? try again later")
            return
        if await self.store.pending_count(fresh, invited=False, source=source) >= PENDING_PER_SOURCE:
            raise Refused(429, f"{PENDING_PER_SOURCE} joins from {source} are already waiting for approval; "
                               f"try again later (unapproved requests expire after {PENDING_TTL // 60} minutes)")
        if await self.store.pending_count(fresh, invited=False) >= PENDING_LIMIT:
            raise Refused(429, f"{PENDING_LIMIT} joins are already waiting for approval; try again later "
                               f"(unapproved requests expire after {PENDING_TTL // 60} minutes)")

    async def _check_not_revoked(self, wg_key: bytes, authorized_at: int) -> None:
        revocation = await self.store.revocation(b64(wg_key))
        if revocation is not None and authorized_at <= revocation.at:
            raise Refused(403, "this key was revoked; ask the admin for a new invite")

    async def _map(self, since: int, *, candidates: bool = False) -> dict[str, Any]:
        """The peer map update: everything changed after version `since` (all for 0); the
        members' candidate records only for `candidates` (bodies.endpoints says why). Read
        once per (version, since, candidates) however many long-polls a change wakes: they
        share the answer (`MapReplies`)."""
        return await self.replies.get(self.store.version, since, candidates, self._read_map)

    async def _read_map(self, since: int, candidates: bool) -> dict[str, Any]:
        async with self.store.transaction(write=False):  # one moment: the version and the rows agree
            row = await self._network_row()
            members = await self.store.members(since)
            update = {
                "version": row.version, "full": since == 0,
                "members": [m.entry for m in members],
                "revocations": await self.store.revocations(since),
                "secret": row.secret_record if row.secret_version > since else None,
                "endpoints": {m.wg_key: bodies.endpoints(m, candidates=candidates) for m in members},
            }
            policy = await self.store.policy()
        if policy is not None and policy.version > since:  # left out otherwise: nodes from before it take the rest
            update["policy"] = policy.record
        return update

    async def _join_result(self, member: MemberRow, waiting: PendingRow) -> dict[str, Any]:
        """What an admitted joiner collects: its admin-signed entry, the network secret the
        admin's machine sealed to it, and the map."""
        return {"network": (await self._network_row()).record, "member": member.entry, "secret": waiting.sealed,
                "map": await self._map(0)}

    async def _collect(self, key: str, now: int) -> dict[str, Any] | None:
        """The join result if the admin admitted this key (the approved row stays until it
        expires: a joiner that lost the answer asks again within the TTL; the sealed secret
        is nowhere else). Raises if the admin's machine refused it: the refused row goes
        (told once; asking again starts a new join). Call it outside a transaction, or the
        refusal's rollback would keep the refused row."""
        waiting = await self.store.pending(key, self._fresh_since(now))
        if waiting is None:
            return None
        if waiting.refused is not None:
            await self.store.delete_pending(key)
            raise Refused(403, f"the admin's machine refused this join: {waiting.refused}")
        member = await self.store.member(key)
        if not waiting.approved or member is None or waiting.sealed is None:
            return None
        log.info("%s collected its admitted join", member.name)
        return await self._join_result(member, waiting)

    async def _admitted_again(self, entry: dict[str, Any], now: int) -> bool:
        """Whether this very invite-signed entry was admitted and waits to be collected: a
        joiner whose answer was lost asks again after its own join used the invite up (or
        after the join window). A cheap lookup; the proof is checked before any answer."""
        match = re.search(r" wg=(\S+) ", str(entry["body"].get("identity")))
        waiting = None if match is None else await self.store.pending(match[1], self._fresh_since(now))
        return waiting is not None and waiting.approved and waiting.entry == entry

    # --- joining --------------------------------------------------------------------------------

    async def network(self, request: web.Request) -> web.Response:
        return web.json_response({"network": (await self._network_row()).record})

    async def propose(self, request: web.Request) -> web.Response:
        """A member body for the joiner to sign with the invite key. Stores nothing."""
        body = bodies.parse(await request.read())
        bodies.body_field.keys(body, {"identity", "name", "grant"}, "the body")
        network = await self._network()
        with bodies.status(403):
            grant = InviteGrant.from_wire(body["grant"], network.admin_key)
        now = int(self.clock())
        await self._check_invite(grant, now)  # cheap checks before the identity's signature
        name = body["name"] if body["name"] is not None else grant.name
        if name is None:
            raise Refused(400, "this invite does not name the node: give a name (--name)")
        check_name(name)
        if grant.name is not None and name != grant.name:
            raise Refused(403, f"this invite is for the name {grant.name!r}")
        identity = bodies.identity(body["identity"])
        await self._check_newcomer(identity, name)
        await self._check_not_revoked(identity.wg_public_key, grant.created)
        ipv4, ipv6 = bodies.addresses(network, await self.store.free_host())
        joined = max(now, grant.created)  # an entry must not predate its invite (clock skew)
        return web.json_response({"body": member_body(network.network, name, identity, ipv4, ipv6, joined)})

    async def confirm(self, request: web.Request) -> web.Response:
        """Check the invite-signed entry and the proof, and hold it for the admin's machine to
        countersign (docs/coordinator.md, "Joining"): answered with the join result once it
        did, with 403 if it refused, else with 202 after COUNTERSIGN_WAIT (ask again)."""
        body = bodies.parse(await request.read())
        bodies.body_field.keys(body, {"entry", "proof"}, "the body")
        network = await self._network()
        entry = body["entry"]
        if not isinstance(entry, dict) or "grant" not in entry or not isinstance(entry.get("body"), dict):
            raise Refused(403, "a join must be signed with an invite key (admin-signed entries come by approval)")
        now = int(self.clock())
        # Cheap checks first: the grant (one Ed25519 signature), its expiry and uses, the time.
        with bodies.status(403):
            grant = InviteGrant.from_wire(entry["grant"], network.admin_key)
        if not await self._admitted_again(entry, now):
            await self._check_invite(grant, now)
            joined = bodies.body_field.integer(entry["body"].get("joined"), "joined")
            if abs(joined - now) > JOIN_WINDOW:
                raise Refused(403, f"the join time is {joined - now:+d} s off the coordinator's clock "
                                   f"(more than {JOIN_WINDOW} s): fix the clock and join again")
        with bodies.status(403):
            member = MemberEntry.from_wire(entry, network)
        with bodies.status(401):
            verify_join_proof(member.identity, entry["body"], body["proof"])
        key = b64(member.wg_key)
        source = self._client_address(request) or ""
        result = await self._collect(key, now)
        if result is not None:
            return web.json_response(result)
        async with self.store.transaction():
            await self._check_newcomer(member.identity, member.name)
            await self._check_not_revoked(member.wg_key, member.authorized_at)
            waiting = await self.store.pending(key, self._fresh_since(now))
            if waiting is None or waiting.entry != entry:
                if waiting is None:
                    await self._check_room(now, source, invited=True)
                await self.store.put_pending(PendingRow(key, member.name, member.identity.to_line(),
                                                  member.identity.fingerprint, now, source, entry,
                                                  str(body["proof"])))
                log.info("%s (%s) joins with an invite; waiting for the admin's machine to countersign",
                         member.name, member.identity.fingerprint)
        return await self._await_countersign(key, now)

    async def _await_countersign(self, key: str, now: int) -> web.Response:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + COUNTERSIGN_WAIT
        while not self._closing:
            changed = self._pending_changed
            result = await self._collect(key, now)
            if result is not None:
                return web.json_response(result)
            if await self.store.pending(key, self._fresh_since(now)) is None:
                raise Refused(409, "the join request is gone (expired or replaced): run the join again")
            try:
                async with asyncio.timeout(deadline - loop.time()):
                    await changed.wait()
            except TimeoutError:
                break
        return web.json_response({"pending": True, "countersign": True,
                                  "message": "waiting for the admin's machine to countersign the join "
                                             "(its daemon does it at once when it runs)"}, status=202)

    async def request_join(self, request: web.Request) -> web.Response:
        """Join by approval: the request waits, holding no name or address, until the admin
        approves it; once approved, the joiner's next request gets the join result."""
        body = bodies.parse(await request.read())
        bodies.body_field.keys(body, {"identity", "name", "t", "proof"}, "the body")
        await self._network()  # 503 before set-up
        name = check_name(body["name"])
        t = bodies.body_field.integer(body["t"], "t")
        now = int(self.clock())
        if abs(t - now) > JOIN_WINDOW:  # cheap checks before the signatures
            raise Refused(403, f"the request time is {t - now:+d} s off the coordinator's clock "
                               f"(more than {JOIN_WINDOW} s): fix the clock")
        identity = bodies.identity(body["identity"])
        bodies.verify_request_proof(identity, {"identity": body["identity"], "name": name, "t": t}, body["proof"])
        key = b64(identity.wg_public_key)
        source = self._client_address(request) or ""
        result = await self._collect(key, now)
        if result is not None:
            return web.json_response(result)
        async with self.store.transaction():
            await self._check_newcomer(identity, name)
            waiting = await self.store.pending(key, self._fresh_since(now))
            if waiting is not None and waiting.entry is not None:
                raise Refused(409, "this key already joins with an invite; wait for that join")
            if waiting is None:
                await self._check_room(now, source, invited=False)
                log.info("%s (%s) asks to join; waiting for `tunnelmesh approve %s`", name, identity.fingerprint, name)
            if waiting is None or waiting.name != name or waiting.approved:
                await self.store.put_pending(PendingRow(key, name, identity.to_line(), identity.fingerprint, now, source))
        return web.json_response({"pending": True, "name": name}, status=202)

    # --- members --------------------------------------------------------------------------------

    async def register(self, request: web.Request) -> web.Response:
        """Where the member can be reached: the address its request came from first, and
        what it offers for the SSH rung and as a relay (absent: nothing); its signed
        candidate record replaces the stored one if newer (absent: the stored one stays)."""
        member, raw = await self._member(request)
        body = bodies.parse(raw)
        bodies.body_field.keys(body, {"listen_port", "addresses"}, "the body", frozenset({"ssh", "relay", "candidates"}))
        port = bodies.body_field.integer(body["listen_port"], "listen_port", 1, 65535)
        ssh = bodies.ssh_offer(body.get("ssh"))
        observed = bodies.observed_ipv4(self._client_address(request))
        endpoints = bodies.member_addresses(body["addresses"], None if observed is None else f"{observed}:{port}")
        relay = bodies.relay_offer(body.get("relay"), observed)
        await self.store.set_endpoints(member.wg_key, endpoints, int(self.clock()), ssh, relay)
        reply: dict[str, Any] = {"observed": f"{observed or f'[{self._client_address(request)}]'}:{port}"}
        if (reflection := request.app.get(REFLECTION)) is not None:  # where to ask for the reflexive address
            reply["stun"] = reflection.advertised()
        if (refused := await bodies.take_candidates(self.store, member, body.get("candidates"), self.clock())) is not None:
            reply["candidates_refused"] = refused
        if relay is None and body.get("relay") is not None:
            reply["relay_refused"] = ("the relay's port alone needs an IPv4 address to go with, and this request "
                                      "came from none: set [transports] relay_url")
        return web.json_response(reply)

    def _client_address(self, request: web.Request) -> str | None:
        """Where a request came from: behind a trusted reverse proxy (TLS termination), the
        address that proxy put last in X-Forwarded-For (the one it saw; earlier entries are
        the client's word); otherwise the connection's."""
        remote = request.remote
        forwarded = request.headers.get("X-Forwarded-For") if remote in self.trusted_proxies else None
        if forwarded:
            last = forwarded.rsplit(",", 1)[-1].strip()
            try:
                return str(ipaddress.ip_address(last))
            except ValueError:
                return None  # a trusted proxy that sends garbage: no address rather than its own
        return remote

    async def map(self, request: web.Request) -> web.Response:
        member, _ = await self._member(request)
        self.polled[member.wg_key] = self.monotonic()
        since = int(bodies.query_number(request, "since", whole=True))
        wait = min(bodies.query_number(request, "wait", whole=False), MAX_WAIT)
        takes_punch = request.query.get("punch") == "1"  # it parses "punch" in the reply
        if takes_punch:
            self.punches.polled(member.wg_key, self.monotonic())
            await self._wait_past(since, wait, punch_for=member.wg_key)
        else:
            await self._wait_past(since, wait)
        reply = await self._map(since, candidates=bodies.takes_candidates(request))
        notices = self.punches.take(member.wg_key, self.monotonic()) if takes_punch else []
        if notices:
            reply = {**reply, "punch": notices}  # the map part is shared with other long-polls
        return web.json_response(reply)

    async def _wait_past(self, since: int, wait: float, *, punch_for: str | None = None) -> None:
        """Hold a long-poll until the version moves past `since` (if it is there now), or
        a punch notice waits for `punch_for`. The store's version moves with this and other
        coordinators' commits; while it cannot hear the others (`poll_interval`), the
        wait reads the version itself now and then."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        await self.store.catch_up()  # at most once a second, whoever asks: a lost announcement
        while not self._closing and self.store.version == since and not (
                punch_for is not None and self.punches.waiting(punch_for, self.monotonic())):
            changed = self._changed
            remaining = deadline - loop.time()
            interval = self.store.poll_interval
            try:
                async with asyncio.timeout(remaining if interval is None else min(remaining, interval)):
                    await changed.wait()
            except TimeoutError:
                if loop.time() >= deadline:
                    return
                await self.store.catch_up()

    # --- admin ----------------------------------------------------------------------------------

    async def setup(self, request: web.Request) -> web.Response:
        """Take a network (idempotent for the same one), with the admin node's own entry."""
        raw = await request.read()
        body = bodies.parse(raw)
        bodies.body_field.keys(body, {"network"}, "the body", frozenset({"member"}))
        with bodies.status(403):
            network = NetworkInfo.from_wire(body["network"])
        if self.admin_fingerprint is not None and network.network != self.admin_fingerprint:
            raise Refused(403, f"this coordinator serves only network {self.admin_fingerprint} (its --admin), "
                               f"not {network.network}")
        self._check_admin(request, raw, network.admin_key)
        member: MemberEntry | None = None
        if body.get("member") is not None:
            with bodies.status(403):
                member = MemberEntry.from_wire(body["member"], network)
            if member.grant is not None:
                raise Refused(403, "the admin node's own entry must be signed by the admin key")
        async with self.store.transaction():
            row = await self.store.network()
            if row is not None:
                if row.record == body["network"]:
                    return web.json_response({"network": network.network, "created": False})
                raise Refused(409, f"this coordinator already serves network {(await self._network()).network}")
            await self.store.set_network(body["network"])
            if member is not None:
                await self.store.add_member(body["member"], member, network.host_index(member.ipv4))
        log.info("serving network %s (%s, %s)", network.network, network.cidr4, network.ula6)
        return web.json_response({"network": network.network, "created": True})

    async def pending(self, request: web.Request) -> web.Response:
        """Joins waiting for the admin (`?wait=S`: held up to S s until there is one;
        `&invited=1`: only joins with an invite, what the admin's daemon countersigns). A
        request for approval comes with the addresses proposed for it (distinct, reserved
        by nothing); an invited join with its invite-signed entry and proof, for the
        admin's machine to check and countersign."""
        network, _ = await self._admin(request)
        wait = min(bodies.query_number(request, "wait", whole=False), MAX_WAIT)
        invited = request.query.get("invited") == "1"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while True:
            changed = self._pending_changed
            rows = [row for row in await self.store.waiting(self._fresh_since(int(self.clock())))
                    if row.entry is not None or not invited]
            if rows or self._closing or loop.time() >= deadline:
                break
            try:
                async with asyncio.timeout(deadline - loop.time()):
                    await changed.wait()
            except TimeoutError:
                break
        hosts = iter(await self.store.free_hosts(sum(1 for row in rows if row.entry is None)))
        waiting = []
        for row in rows:
            item: dict[str, Any] = {"name": row.name, "identity": row.identity, "fingerprint": row.fingerprint,
                                    "requested": row.requested}
            if row.entry is None:
                ipv4, ipv6 = bodies.addresses(network, next(hosts))
                item.update(kind="request", ipv4=str(ipv4), ipv6=str(ipv6))
            else:
                item.update(kind="invite", entry=row.entry, proof=row.proof)
            waiting.append(item)
        return web.json_response({"pending": waiting})

    async def approve(self, request: web.Request) -> web.Response:
        """Admit a pending joiner with the admin-signed entry made for it, and the network
        secret the admin sealed to it."""
        network, body = await self._admin_body(request, {"member", "secret"})
        with bodies.status(403):
            member = MemberEntry.from_wire(body["member"], network)
        if member.grant is not None:
            raise Refused(403, "an approval must be signed by the admin key")
        sealed = bodies.sealed_secret(body["secret"])
        key = b64(member.wg_key)
        now = int(self.clock())
        async with self.store.transaction():
            waiting = await self.store.pending(key, self._fresh_since(now))
            if waiting is None:
                raise Refused(404, f"no pending join for {member.identity.fingerprint} (expired, or never made)")
            if waiting.approved:
                raise Refused(409, f"{waiting.name} is already approved")
            if waiting.refused is not None:
                raise Refused(409, f"{waiting.name} was refused: {waiting.refused}")
            if (waiting.name, waiting.identity) != (member.name, member.identity.to_line()):
                raise Refused(409, "the approved entry does not match the pending join (name or identity differ): "
                                   "run `tunnelmesh pending` and approve again")
            host = network.host_index(member.ipv4)
            if await self.store.host_taken(host):
                raise Refused(409, f"the address {member.ipv4} was taken meanwhile: approve again")
            await self._check_newcomer(member.identity, member.name)
            await self._check_not_revoked(member.wg_key, member.authorized_at)
            if waiting.entry is not None:  # checked again here: other joins may have used it since it waited
                with bodies.status(403):
                    invited = MemberEntry.from_wire(waiting.entry, network)
                assert invited.grant is not None
                await self._check_uses(invited.grant)
                await self.store.use_invite(b64(invited.grant.invite_key), invited.grant.to_wire())
            await self.store.add_member(body["member"], member, host)
            await self.store.mark_approved(key, sealed)
        log.info("admitted %s as %s (%s)", member.name, member.ipv4, member.identity.fingerprint)
        return web.json_response({"approved": member.name, "ipv4": str(member.ipv4), "ipv6": str(member.ipv6)})

    async def device(self, request: web.Request) -> web.Response:
        """Admit a plain WireGuard device (`tunnelmesh wg-export`), stored like a member, served
        by a member that exists; no pending join, nothing sealed to it (docs/exports.md)."""
        network, body = await self._admin_body(request, {"member"})
        with bodies.status(403):
            device = DeviceEntry.from_wire(body["member"], network)
        key = b64(device.wg_key)
        async with self.store.transaction():
            existing = await self.store.member(key)
            if existing is not None:
                raise Refused(409, f"this key is already a member (as {existing.name!r})")
            if await self.store.member_named(device.name) is not None:
                raise Refused(409, f"the name {device.name!r} is taken by another member; choose another")
            server = await self.store.member_named(device.served_by)
            if server is None or server.is_device:
                raise Refused(409, f"no member {device.served_by!r} to serve the device (a device serves nothing)")
            if await self.store.host_taken(host := network.host_index(device.ipv4)):
                raise Refused(409, f"the address {device.ipv4} was taken meanwhile: export again")
            await self._check_not_revoked(device.wg_key, device.authorized_at)
            await self.store.add_member(body["member"], device, host)
        log.info("admitted the WireGuard device %s as %s, served by %s", device.name, device.ipv4, device.served_by)
        return web.json_response({"admitted": device.name, "ipv4": str(device.ipv4), "ipv6": str(device.ipv6)})

    async def refuse(self, request: web.Request) -> web.Response:
        """The admin's machine refuses a pending join, saying why (the joiner is told)."""
        _, body = await self._admin_body(request, {"wg_key", "reason"})
        key = b64(unb64(body["wg_key"], "wg_key", 32))
        reason = body["reason"]
        if not isinstance(reason, str) or not 0 < len(reason) <= 500:
            raise Refused(400, "reason must be text of 1 to 500 characters")
        if not await self.store.mark_refused(key, reason):
            raise Refused(404, "no pending join for that key")
        log.info("the admin's machine refused the join of %s: %s", key, loggable(reason))
        return web.json_response({"refused": key})

    async def revoke(self, request: web.Request) -> web.Response:
        network, body = await self._admin_body(request, {"revocation"})
        with bodies.status(403):
            revocation = Revocation.from_wire(body["revocation"], network)
        key = b64(revocation.wg_key)
        async with self.store.transaction():
            kept = await self.store.revocation(key)
            if kept is not None and kept.at >= revocation.at:
                return web.json_response({"version": self.store.version, "changed": False})
            row = await self.store.member(key)
            version = await self.store.revoke(key, body["revocation"], revocation.at,
                                        drop_member=row is not None and self._covers(revocation, row, network))
        log.info("revoked %s (%s)", revocation.name, key)
        return web.json_response({"version": version, "changed": True})

    @staticmethod
    def _covers(revocation: Revocation, row: MemberRow, network: NetworkInfo) -> bool:
        """Whether the revocation removes this member (an entry that no longer verifies goes too)."""
        try:
            return revocation.covers(parse_entry(row.entry, network))
        except MembershipError:
            return True

    async def secret(self, request: web.Request) -> web.Response:
        """A new network secret: the next epoch, sealed by the admin to the members."""
        network, body = await self._admin_body(request, {"record"})
        with bodies.status(403):
            record = SecretRecord.from_wire(body["record"], network)
        async with self.store.transaction():
            epoch = (await self._network_row()).epoch
            if record.epoch != epoch + 1:
                raise Refused(409, f"the new secret must have epoch {epoch + 1}, not {record.epoch}: "
                                   "fetch the map and rotate again")
            version = await self.store.set_secret(body["record"], record.epoch)
            unsealed = [m.name for m in await self.store.members() if m.wg_key not in record.sealed and not m.is_device]
        if unsealed:
            log.warning("network secret epoch %d is not sealed for %s: they keep the old secret",
                        record.epoch, ", ".join(unsealed))
        log.info("network secret rotated to epoch %d (sealed for %d nodes)", record.epoch, len(record.sealed))
        return web.json_response({"epoch": record.epoch, "version": version})

    async def policy(self, request: web.Request) -> web.Response:
        """A new network policy: a record whose version is above the stored one's (the same
        record again changes nothing; nodes keep the highest version they verified)."""
        network, body = await self._admin_body(request, {"record"})
        with bodies.status(403):
            record = PolicyRecord.from_wire(body["record"], network)
        async with self.store.transaction():
            stored = await self.store.policy()
            if stored is not None and stored.record == body["record"]:
                return web.json_response({"policy_version": record.version, "changed": False})
            version = await self.store.set_policy(body["record"], record.version)
            if version is None:
                assert stored is not None
                raise Refused(409, f"the network policy is at version {stored.policy_version} already: a new one "
                                   f"must have a higher version than that, not {record.version} (`tunnelmesh policy "
                                   "set` signs the next one)")
        log.info("network policy v%d set (%d bytes)", record.version, len(record.text))
        return web.json_response({"policy_version": record.version, "changed": True, "version": version})

    async def admin_map(self, request: web.Request) -> web.Response:
        await self._admin(request)
        # Read afresh, not shared: what the admin inspects is what the database holds now.
        return web.json_response(await self._read_map(0, bodies.takes_candidates(request)))

    # --- the WebSocket relay (tunnelmesh.coordinator.relay) --------------------------------------

    async def _relay_identity(self, wg_key: bytes) -> PublicIdentity | None:
        """The relay's view of membership: the member's stored identity, None for anyone else
        (and, logged, for a member whose stored identity is damaged: refused rather than
        trusted). MembershipUnknown while the database cannot be read."""
        try:
            member = await self.store.member(b64(wg_key))
        except StoreError as exc:
            log.error("relay: cannot check membership of %s: %s", b64(wg_key), exc)
            raise MembershipUnknown(str(exc)) from None
        try:
            return None if member is None or member.is_device else bodies.identity_of(member.identity)
        except IdentityError as exc:
            log.error("relay: cannot check membership of %s: %s", b64(wg_key), exc)
            return None

    def nodes_connected(self) -> int:
        """Members that asked for the map within MAX_WAIT + CONNECTED_GRACE: a node's client
        long-polls again as soon as one is answered, and one is held MAX_WAIT at most."""
        since = self.monotonic() - MAX_WAIT - CONNECTED_GRACE
        return sum(1 for at in self.polled.values() if at >= since)

    @property
    def relay_served(self) -> Relay | None:
        """The relay, once a member has used it."""
        return self._relay

    async def relay(self, request: web.Request) -> web.StreamResponse:
        """GET /relay: made on first use, once the network exists (it never changes after)."""
        if self._relay is None:
            network = (await self._network()).network
            if self._relay is None:  # not made by another connection meanwhile: one relay, or members miss each other
                self._relay = Relay(network, self._relay_identity)
                if (cluster := request.app.get(CLUSTER)) is not None:  # other coordinators on its database
                    cluster.serve(self._relay)
        return await self._relay.handler(request)
