"""Making, joining and administering a network: what `init`, `join`, `invite`,
`pending`, `approve`, `revoke`, `rotate-secret` and `policy` do, apart from argument parsing.

Admin operations need the admin key (``<state>/admin.key``, made by `init`) and
talk to the coordinator with admin-signed requests; `invite` does not need the
coordinator at all (the token carries everything, see docs/coordinator.md).
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import time
import urllib.parse
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from tunnelmesh import files
from tunnelmesh.admission import InviteRecord, check_newcomer, countersign_invited, sealed_secret
from tunnelmesh.config import NETWORK_SECRET_BYTES, ConfigError, load_config, read_network_secret, starter_config
from tunnelmesh.coordinator.client import Coordinator, CoordinatorError
from tunnelmesh.filter import STARTER_POLICY, PolicyError, parse_policy
from tunnelmesh.identity import IdentityError, NodeIdentity, PublicIdentity, load_identity
from tunnelmesh.membership import (
    JOIN_NAMESPACE,
    MAX_POLICY_TEXT,
    AdminKey,
    Entry,
    MapChanges,
    InviteGrant,
    MemberEntry,
    MembershipError,
    NetworkInfo,
    PeerMap,
    PolicyRecord,
    Revocation,
    SecretRecord,
    Token,
    check_name,
    join_proof_message,
    make_invite,
    member_body,
    sign_member_as_admin,
    sign_member_with_invite,
    b64,
    unb64,
    unseal,
)
from tunnelmesh.netstate import (
    NetworkState,
    StateError,
    invite_ledger,
    keep_policy,
    load_peer_map,
    load_policy,
    save_peer_map,
    save_revocations,
    save_network_secret,
)
from tunnelmesh.paths import Paths
from tunnelmesh.tls import CERT_NAME, KEY_NAME, PIN_PREFIX, TlsError, write_certificate

#: How long `join` without a token waits for the admin's approval by default.
APPROVAL_WAIT = 600.0
APPROVAL_POLL = 2.0


class NetworkError(Exception):
    """An operation that cannot be done; the message says why and what to do."""


@dataclass(frozen=True)
class Joined:
    state: NetworkState
    seconds: float


def _now() -> int:
    return int(time.time())


async def _load(identity_spec: str, passphrase_file: Path | None = None,
                agent_socket: str | None = None) -> NodeIdentity:
    try:
        return await load_identity(identity_spec, passphrase_file=passphrase_file, agent_path=agent_socket)
    except IdentityError as exc:
        raise NetworkError(str(exc)) from None


def _write_config(paths: Paths, text: str, *, replace: bool = False) -> None:
    """The node's config, through the one atomic writer; an existing one is kept (and
    NetworkError raised) unless `replace` (a revoked node joining again)."""
    paths.config.parent.mkdir(parents=True, exist_ok=True)
    try:
        files.write_atomic(paths.config, text.encode(), replace=replace)
    except files.FileError as exc:
        raise NetworkError(str(exc)) from None


def _refuse_existing(paths: Paths) -> None:
    for path, what in ((paths.network_state, "this node is already in a network"),
                       (paths.config, f"{paths.config} already exists")):
        if path.exists():
            raise NetworkError(f"{what}; to start over, stop the daemon and remove {paths.state_dir} "
                               f"(and {paths.config}), or use another --state-dir")


def _revoked_membership(paths: Paths) -> NetworkInfo | None:
    """The network this node was a member of until the admin revoked it, if so: such a
    node may join again (with a new invite). Its old network state, peer map cache and
    config stay until the new join has been checked whole, and are then replaced; its
    key and the revocations and bindings it keeps stay for good."""
    if not paths.network_state.exists():
        return None
    try:
        state = NetworkState.load(paths.network_state)
        peer_map, _ = load_peer_map(paths.peer_map_cache, state)
    except StateError:
        return None  # not ours to judge: _refuse_existing explains what to do
    return state.network if peer_map.revoked(state.member) is not None else None


# --- init ------------------------------------------------------------------------------------


async def create_network(
    paths: Paths, *, name: str, identity_spec: str, listen_port: int, cidr: str, url: str, serve: str | None,
    ca_file: str | None = None, tls_fingerprint: str | None = None, agent_socket: str | None = None,
) -> NetworkState:
    """A new network with this node as its admin and first member, and the starter
    network policy (version 1: ping between members, nothing else). With `serve`, the
    coordinator is embedded (it takes the network at the first `up`; with an https://
    `url` it serves TLS with a certificate made here, pinned in the config and so in
    every invite); without, the coordinator at `url` must be running and is given the
    network now (`tls_fingerprint`: its certificate's pin). `ca_file`: a private CA for
    a TLS proxy in front of the coordinator, used now and written into the config.
    `agent_socket`: an agent identity's ssh-agent, used now and written into the config."""
    _refuse_existing(paths)
    check_name(name, "node name")
    if paths.admin_key.exists():
        raise NetworkError(f"{paths.admin_key} already exists; remove it to make a new network")
    identity = await _load(identity_spec, agent_socket=agent_socket)
    own_tls = serve is not None and url.lower().startswith("https://") and ca_file is None
    cert, key = (str(paths.state_dir / CERT_NAME), str(paths.state_dir / KEY_NAME)) if own_tls else (None, None)
    if own_tls:
        tls_fingerprint = PIN_PREFIX + "0" * 64  # checked with a stand-in: the certificate is made last
    try:
        starter_config(name=name, identity=identity_spec, listen_port=listen_port, coordinator_url=url, serve=serve,
                       ca_file=ca_file, tls_fingerprint=tls_fingerprint, tls_cert=cert, tls_key=key,
                       agent_socket=agent_socket)
    except ValueError as exc:
        raise NetworkError(str(exc)) from None
    admin = AdminKey.generate()
    network = NetworkInfo.create(admin, cidr, _now())
    ipv4, ipv6 = network.host(1)
    member = MemberEntry.from_wire(
        sign_member_as_admin(member_body(network.network, name, identity.public, ipv4, ipv6, _now()), admin), network)
    state = NetworkState(url, network, member, policy_expected=1)
    policy = PolicyRecord.create(admin, 1, STARTER_POLICY, _now())
    peer_map = PeerMap(network, member.wg_key)
    peer_map.policy = policy
    secret = os.urandom(NETWORK_SECRET_BYTES)
    if serve is None:
        try:
            async with Coordinator(url, admin=admin, ca_file=ca_file, tls_fingerprint=tls_fingerprint) as coordinator:
                await coordinator.setup(network.to_wire(), member.to_wire(), policy.to_wire())
        except CoordinatorError as exc:
            raise NetworkError(f"the coordinator at {url} did not take the network: {exc}") from None
    paths.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    if own_tls:
        try:
            tls_fingerprint = write_certificate(Path(str(cert)), Path(str(key)), urllib.parse.urlsplit(url).hostname or "")
        except TlsError as exc:
            raise NetworkError(str(exc)) from None
    admin.save(paths.admin_key)
    save_network_secret(paths.network_secret, secret)
    state.save(paths.network_state)
    save_peer_map(paths.peer_map_cache, peer_map)  # the embedded coordinator takes its policy at the first `up`
    _write_config(paths, starter_config(name=name, identity=identity_spec, listen_port=listen_port,
                                        coordinator_url=url, serve=serve, ca_file=ca_file,
                                        tls_fingerprint=tls_fingerprint, tls_cert=cert, tls_key=key,
                                        agent_socket=agent_socket))
    return state


# --- join ------------------------------------------------------------------------------------


async def join(
    paths: Paths, *, token_or_url: str, name: str | None, identity_spec: str, listen_port: int,
    wait: float = APPROVAL_WAIT, on_pending: Any = None, network_fingerprint: str | None = None,
    ca_file: str | None = None, tls_fingerprint: str | None = None, agent_socket: str | None = None,
) -> Joined:
    """Join with a token, or (given a coordinator URL) by asking the admin's approval.
    `ca_file`: a private CA for the coordinator's TLS; `tls_fingerprint`: the pin of the
    coordinator's own certificate (a token carries it); `agent_socket`: an agent identity's
    ssh-agent: used now and written into the config."""
    started = time.monotonic()
    revoked_from = _revoked_membership(paths)
    if revoked_from is None:
        _refuse_existing(paths)
    if name is not None:
        check_name(name, "node name")
    identity = await _load(identity_spec, agent_socket=agent_socket)
    token: Token | None = None
    if token_or_url.startswith(("http://", "https://")):
        url, pinned = token_or_url.rstrip("/"), network_fingerprint
        if name is None or pinned is None:
            raise NetworkError("joining without a token needs --name (the admin approves it by name) and --network "
                               "SHA256:... (the network's fingerprint, from the admin's `tunnelmesh status`)")
    else:
        token = Token.parse(token_or_url)
        url, pinned = token.url, token.network
        if token.tls is not None:
            if tls_fingerprint is not None and tls_fingerprint != token.tls:
                raise NetworkError(f"--tls-fingerprint {tls_fingerprint} is not the coordinator certificate this "
                                   f"token pins ({token.tls}); drop --tls-fingerprint")
            if ca_file is not None:
                raise NetworkError("this token pins the coordinator's own TLS certificate: drop --ca-file")
            tls_fingerprint = token.tls
    async with Coordinator(url, ca_file=ca_file, tls_fingerprint=tls_fingerprint) as coordinator:
        try:
            network = NetworkInfo.from_wire(await coordinator.network(), pinned)
        except MembershipError as exc:
            raise NetworkError(str(exc)) from None
        if token is not None:
            result = await _join_with_token(coordinator, network, token, identity, name, wait, on_pending)
        else:
            assert name is not None
            result = await _join_by_approval(coordinator, identity, name, wait, on_pending)
    kept = paths.peer_map_cache if revoked_from == network else None  # joining the same network again
    state, peer_map, secret = _check_result(url, network, identity, result, token.policy if token is not None else 0,
                                            kept)
    try:
        starter = starter_config(name=state.member.name, identity=identity_spec, listen_port=listen_port,
                                 coordinator_url=url, ca_file=ca_file, tls_fingerprint=tls_fingerprint,
                                 agent_socket=agent_socket)
    except ValueError as exc:
        raise NetworkError(str(exc)) from None
    # Everything is checked: only now is anything written (a revoked node's old state replaced).
    _keep_joined(paths, state, peer_map, secret)
    _write_config(paths, starter, replace=revoked_from is not None)
    return Joined(state, time.monotonic() - started)


async def _join_with_token(coordinator: Coordinator, network: NetworkInfo, token: Token, identity: NodeIdentity,
                           name: str | None, wait: float, on_pending: Any) -> dict[str, Any]:
    try:
        grant = InviteGrant.from_wire(token.grant, network.admin_key)
    except MembershipError as exc:
        raise NetworkError(str(exc)) from None
    if grant.expires < _now():
        raise NetworkError(f"the invite expired at {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(grant.expires))}; "
                           "ask the admin for a new one (`tunnelmesh invite`)")
    if grant.name is not None and name is not None and name != grant.name:
        raise NetworkError(f"this invite is for the name {grant.name!r}; drop --name or use {grant.name!r}")
    body = await coordinator.propose(identity.public.to_line(), name or grant.name, token.grant)
    try:
        entry = sign_member_with_invite(body, token)
        member = MemberEntry.from_wire(entry, network)
    except MembershipError as exc:
        raise NetworkError(f"the coordinator proposed an entry this node cannot accept: {exc}") from None
    if member.wg_key != identity.public.wg_public_key:
        raise NetworkError("the coordinator proposed an entry for another key")
    proof = await identity.sign(join_proof_message(body), JOIN_NAMESPACE)
    # The coordinator holds the join until the admin's machine countersigns it (at once when
    # its daemon runs); each answer that says "pending" is followed by the same request again.
    deadline = time.monotonic() + wait
    announced = False
    while True:
        asked = time.monotonic()
        result = await coordinator.confirm(entry, proof)
        if not result.get("pending"):
            return result
        await asyncio.sleep(max(0.0, APPROVAL_POLL - (time.monotonic() - asked)))  # never a tight loop
        if not announced and on_pending is not None:
            on_pending({**result, "name": member.name, "fingerprint": identity.public.fingerprint})
            announced = True
        if time.monotonic() >= deadline:
            raise NetworkError(f"the admin's machine did not countersign the join within {wait:.0f} s: its daemon "
                               "countersigns joins with an invite when it runs (`tunnelmesh up` there); "
                               "run `tunnelmesh join` again then")


async def _join_by_approval(coordinator: Coordinator, identity: NodeIdentity, name: str, wait: float,
                            on_pending: Any) -> dict[str, Any]:
    deadline = time.monotonic() + wait
    announced = False
    while True:
        now = _now()
        request = {"identity": identity.public.to_line(), "name": name, "t": now}
        proof = await identity.sign(join_proof_message({"request": request}), JOIN_NAMESPACE)
        result = await coordinator.join_request(identity.public.to_line(), name, now, proof)
        if not result.get("pending"):
            return result
        if not announced and on_pending is not None:
            on_pending({**result, "fingerprint": identity.public.fingerprint})  # for the admin to check
            announced = True
        if time.monotonic() >= deadline:
            raise NetworkError(f"not approved within {wait:.0f} s; the request stays pending: run `tunnelmesh join` "
                               f"again after the admin ran `tunnelmesh approve {name}`")
        await asyncio.sleep(APPROVAL_POLL)


def _check_result(url: str, network: NetworkInfo, identity: NodeIdentity, result: Any, policy_expected: int,
                  kept: Path | None) -> tuple[NetworkState, PeerMap, bytes]:
    """Check the join result: the node's new state, its peer map and the network secret
    (nothing written). `policy_expected`: the network policy version the token says is in
    force (0: none, or no token), kept so the packet filter denies until this node has
    verified that policy. `kept`: the peer map cache of a revoked node joining the same
    network again, whose kept revocations, bindings and policy the new map starts from."""
    try:
        if not isinstance(result, dict):
            raise MembershipError("join result is not an object")
        if NetworkInfo.from_wire(result.get("network"), network.network) != network:
            raise MembershipError("the network record changed during the join")
        member = MemberEntry.from_wire(result.get("member"), network)
        if member.wg_key != identity.public.wg_public_key:
            raise MembershipError("the member entry is for another key")
        if member.grant is not None:
            raise MembershipError("the member entry is not signed by the admin")
        sealed = result.get("secret")
        if not isinstance(sealed, dict):
            raise MembershipError("no network secret in the join result")
        secret = unseal(identity.static_private, unb64(sealed.get("sealed"), "sealed secret"))
        if len(secret) != NETWORK_SECRET_BYTES:
            raise MembershipError("the network secret is not 32 bytes")
        state = NetworkState(url, network, member, policy_expected)
        peer_map = load_peer_map(kept, state)[0] if kept is not None else PeerMap(network, member.wg_key)
        peer_map.version = 0  # the coordinator's map now, whatever version the old cache had
        peer_map.apply(result.get("map"))
    except MembershipError as exc:
        raise NetworkError(f"the coordinator's answer does not verify: {exc}") from None
    except StateError as exc:
        raise NetworkError(str(exc)) from None
    if peer_map.revoked(member) is not None:
        raise NetworkError("the map says this key is revoked; ask the admin for a new invite")
    return state, peer_map, secret


def _keep_joined(paths: Paths, state: NetworkState, peer_map: PeerMap, secret: bytes) -> None:
    """Write a checked join's state (secret last: it completes the join), each file
    replaced all at once."""
    paths.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    state.save(paths.network_state)
    save_peer_map(paths.peer_map_cache, peer_map)
    save_network_secret(paths.network_secret, secret)


# --- admin -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Admin:
    paths: Paths
    state: NetworkState  # its url as the node's config says now (tunnelmesh.toml [coordinator])
    key: AdminKey
    ca_file: str | None = None
    tls_fingerprint: str | None = None  # the coordinator's certificate, pinned (and put in invites)

    @classmethod
    def load(cls, paths: Paths) -> Admin:
        try:
            state = NetworkState.load(paths.network_state)
        except StateError as exc:
            raise NetworkError(str(exc)) from None
        if not paths.admin_key.exists():
            raise NetworkError(f"no admin key at {paths.admin_key}: run this on the machine that ran `tunnelmesh init` "
                               "(or give its --state-dir)")
        try:
            key = AdminKey.load(paths.admin_key)
        except MembershipError as exc:
            raise NetworkError(str(exc)) from None
        if key.fingerprint != state.network.network:
            raise NetworkError(f"{paths.admin_key} is not the admin key of network {state.network.network}")
        url, ca_file, pin = state.url, None, None
        if paths.config.exists():  # the node's config is the word on how to reach the coordinator
            try:
                coordinator = load_config(paths.config, state_dir=paths.state_dir).coordinator
            except ConfigError as exc:
                raise NetworkError(str(exc)) from None
            if coordinator is not None:
                url, ca_file = coordinator.url, str(coordinator.ca_file) if coordinator.ca_file else None
                pin = coordinator.tls_fingerprint
        return cls(paths, replace(state, url=url), key, ca_file, pin)

    def sealed_secret(self, member: MemberEntry, peer_map: PeerMap) -> dict[str, Any]:
        """The network secret as this machine holds it, sealed to a new member's key."""
        try:
            secret = read_network_secret(self.paths.network_secret)
        except ConfigError as exc:
            raise NetworkError(f"{exc}: the admin's machine seals the network secret to each new member") from None
        return sealed_secret(member, secret, peer_map.secret.epoch if peer_map.secret is not None else 0)

    def coordinator(self, url: str | None = None) -> Coordinator:
        """A client of the network's coordinator as the admin: at `url` (one of several on
        one database, the one the daemon uses now), or the one the network state names."""
        return Coordinator(url or self.state.url, admin=self.key, ca_file=self.ca_file,
                           tls_fingerprint=self.tls_fingerprint)

    async def members(self, coordinator: Coordinator) -> tuple[PeerMap, list[MemberEntry]]:
        """Every verified member, this node included. Starts from the revocations this
        machine keeps, so a coordinator that lost or dropped one cannot get a revoked
        node a new secret."""
        try:
            peer_map, _ = load_peer_map(self.paths.peer_map_cache, self.state)
            with invite_ledger(self.paths.invites, self.state.network) as ledger:
                signed = ledger.signed(self.state.network)
        except (StateError, MembershipError) as exc:
            raise NetworkError(str(exc)) from None
        changes = MapChanges()
        for member in signed:  # what this machine signed binds here, whatever the coordinator lists
            if peer_map.revoked(member) is None and peer_map.binding_clash(member) is None:
                peer_map.bind(member, changes)
        peer_map.version = 0  # the admin takes the coordinator's whole map; what is kept still holds
        peer_map.apply(await coordinator.admin_map())
        return peer_map, [self.state.member, *peer_map.members.values()]


def make_token(paths: Paths, *, expires_in: int, reusable: bool, name: str | None) -> str:
    admin = Admin.load(paths)
    now = _now()
    try:
        kept = load_policy(paths.peer_map_cache, admin.state.network)
        # The joiner denies until it has verified at least this version (a coordinator cannot withhold it).
        policy = max(kept.version if kept is not None else 0, admin.state.policy_expected)
        token = make_invite(admin.key, admin.state.url, name=name, expires=now + expires_in,
                            uses=0 if reusable else 1, now=now, tls=admin.tls_fingerprint, policy=policy)
        grant = InviteGrant.from_wire(token.grant, admin.key.public)
        with invite_ledger(paths.invites, admin.state.network) as ledger:  # before the token exists anywhere
            ledger.add(grant)
    except (MembershipError, StateError) as exc:
        raise NetworkError(str(exc)) from None
    return token.encode()


def invites(paths: Paths) -> list[InviteRecord]:
    """Every invite made on this machine, newest first."""
    admin = Admin.load(paths)
    try:
        with invite_ledger(paths.invites, admin.state.network) as ledger:
            return sorted(ledger.records.values(), key=lambda r: r.grant.created, reverse=True)
    except StateError as exc:
        raise NetworkError(str(exc)) from None


def revoke_invite(paths: Paths, invite: str) -> InviteRecord:
    """Refuse every further join with the invite whose id starts with `invite`."""
    admin = Admin.load(paths)
    try:
        with invite_ledger(paths.invites, admin.state.network) as ledger:
            return ledger.revoke(invite, _now())
    except (MembershipError, StateError) as exc:
        raise NetworkError(str(exc)) from None


async def countersign_pending(admin: Admin, coordinator: Coordinator, waiting: list[dict[str, Any]]) -> list[str]:
    """Check and countersign (or refuse) every join with an invite in `waiting` (the
    coordinator's pending list). What the admin's daemon does as joins arrive; returns a
    line per decision, for the log."""
    invited = [p for p in waiting if isinstance(p, dict) and p.get("kind") == "invite"]
    if not invited:
        return []
    peer_map, _ = await admin.members(coordinator)
    decisions = []
    for request in invited:
        try:
            entry, proof = request.get("entry"), request.get("proof")
            wg_key = _wg_key_of(entry)
        except MembershipError as exc:
            decisions.append(f"ignored a pending join the coordinator sent malformed: {exc}")
            continue
        try:
            with invite_ledger(admin.paths.invites, admin.state.network) as ledger:
                signed = countersign_invited(admin=admin.key, network=admin.state.network, ledger=ledger,
                                             peer_map=peer_map, entry=entry, proof=proof, now=_now())
        except MembershipError as exc:
            try:
                await coordinator.refuse(wg_key, str(exc)[:500])
            except CoordinatorError as failed:  # one join that cannot be answered holds up no other
                decisions.append(f"cannot refuse the join of {request.get('name')!r} now: {failed}")
                continue
            decisions.append(f"refused the join of {request.get('name')!r}: {exc}")
            continue
        except StateError as exc:
            decisions.append(f"cannot countersign the join of {request.get('name')!r}: {exc}")
            continue
        try:
            await coordinator.approve(signed.wire, admin.sealed_secret(signed.member, peer_map))
        except CoordinatorError as failed:
            decisions.append(f"cannot hand over the countersigned join of {signed.member.name} now: {failed}")
            continue
        peer_map.bind(signed.member, MapChanges())
        peer_map.members[signed.member.wg_key] = signed.member
        decisions.append(f"countersigned the join of {signed.member.name} as {signed.member.ipv4} "
                         f"({signed.member.identity.fingerprint}, invite {signed.invite.id if signed.invite else '-'})")
    return decisions


def _wg_key_of(entry: Any) -> str:
    try:
        return b64(PublicIdentity.from_line(str(entry["body"]["identity"])).wg_public_key)
    except (IdentityError, KeyError, TypeError) as exc:
        raise MembershipError(f"no identity in the entry ({exc})") from None


def _fingerprint_of(request: dict[str, Any]) -> str | None:
    try:
        return PublicIdentity.from_line(str(request.get("identity"))).fingerprint
    except IdentityError:
        return None


async def pending(paths: Paths) -> list[dict[str, Any]]:
    """Joins waiting for approval; each fingerprint is worked out here from the identity
    line (the coordinator's word is not taken for it)."""
    admin = Admin.load(paths)
    async with admin.coordinator() as coordinator:
        waiting = await coordinator.pending()
    for request in waiting:
        try:
            request["fingerprint"] = PublicIdentity.from_line(str(request.get("identity"))).fingerprint
        except IdentityError as exc:
            request["fingerprint"] = f"(invalid identity: {exc})"
    return waiting


async def approve(paths: Paths, name: str, fingerprint: str) -> MemberEntry:
    """Admit a pending join, but only with the SSH key fingerprint the joiner printed:
    the coordinator's pending list is not trusted to say whose key it is."""
    admin = Admin.load(paths)
    async with admin.coordinator() as coordinator:
        waiting = await coordinator.pending()
        requests = [p for p in waiting if p.get("kind") == "request"]
        named = [p for p in requests if p.get("name") == name]
        if not named:
            names = ", ".join(sorted(str(p.get("name")) for p in requests)) or "none"
            raise NetworkError(f"no pending join named {name!r} (pending: {names})")
        # Several keys may ask for one name (requests hold nothing): the fingerprint picks one.
        match = next((p for p in named if _fingerprint_of(p) == fingerprint), named[0])
        try:
            identity = PublicIdentity.from_line(str(match.get("identity")))
            if identity.fingerprint != fingerprint:
                raise NetworkError(
                    f"the pending join {name!r} is for the key {identity.fingerprint}, not {fingerprint}: "
                    "not approved (compare with what `tunnelmesh join` printed on the joining machine)")
            body = member_body(admin.state.network.network, name, identity, ipaddress.IPv4Address(str(match["ipv4"])),
                               ipaddress.IPv6Address(str(match["ipv6"])), _now())
            member = MemberEntry.from_wire(sign_member_as_admin(body, admin.key), admin.state.network)
            peer_map, _ = await admin.members(coordinator)
            check_newcomer(peer_map, member, authorized_after=None)  # approving a revoked key re-admits it
            with invite_ledger(paths.invites, admin.state.network) as ledger:  # kept before it goes out
                ledger.admitted[b64(member.wg_key)] = member.to_wire()
        except (IdentityError, MembershipError, ValueError, KeyError, StateError) as exc:
            raise NetworkError(f"pending join {name!r} cannot be approved: {exc}") from None
        await coordinator.approve(member.to_wire(), admin.sealed_secret(member, peer_map))
        return member


async def revoke(paths: Paths, peer: str) -> Revocation:
    admin = Admin.load(paths)
    async with admin.coordinator() as coordinator:
        peer_map, members = await admin.members(coordinator)
        admitted: list[Entry] = [*members, *peer_map.devices.values()]  # plain WireGuard devices are revoked alike
        match = next((m for m in admitted if peer in (m.name, str(m.ipv4), m.ssh_fingerprint)), None)
        if match is None:
            names = ", ".join(sorted(m.name for m in admitted))
            raise NetworkError(f"no member {peer!r} (members: {names})")
        if match.wg_key == admin.state.member.wg_key:
            raise NetworkError("refusing to revoke the admin's own node")
        revocation = Revocation.create(admin.key, match, _now())
        try:  # kept here first: whatever the coordinator does with it
            save_revocations(paths.revocations, [revocation])
        except StateError as exc:
            raise NetworkError(str(exc)) from None
        await coordinator.revoke(revocation.to_wire())
    # Invites and revocations are dated in whole seconds, and an invite of the
    # revocation's own second does not outdate it: return once that second is over, so an
    # invite made next (`revoke X && invite`) brings the node back.
    await asyncio.sleep(max(0.0, revocation.at + 1 - time.time()))
    return revocation


async def rotate_secret(paths: Paths) -> tuple[int, int]:
    """A new network secret for every current member. Returns (epoch, members)."""
    admin = Admin.load(paths)
    async with admin.coordinator() as coordinator:
        peer_map, members = await admin.members(coordinator)
        epoch = (peer_map.secret.epoch if peer_map.secret is not None else 0) + 1
        secret = os.urandom(NETWORK_SECRET_BYTES)
        record = SecretRecord.create(admin.key, epoch, secret, members, _now())
        # This machine seals the secret to future joiners: it keeps the new one before the
        # record goes out (a join countersigned meanwhile gets the secret of the new epoch),
        # and puts the old one back if the coordinator does not take it.
        try:
            old = read_network_secret(paths.network_secret)
            save_network_secret(paths.network_secret, secret)
        except ConfigError as exc:
            raise NetworkError(f"{exc}; nothing was rotated") from None
        except StateError as exc:
            raise NetworkError(f"cannot keep the new secret here: {exc}; nothing was rotated") from None
        try:
            await coordinator.rotate_secret(record.to_wire())
        except BaseException:
            save_network_secret(paths.network_secret, old)
            raise
    return epoch, len(members)


# --- the network policy ------------------------------------------------------------------------


#: What `set_policy` sent: a new version, nothing (the coordinator holds the same text),
#: or the record in force again (the coordinator held an older one or none).
PolicySent = Literal["set", "unchanged", "re-sent"]


def check_policy(text: str, source: Path | str) -> None:
    """Refuse a policy that cannot be used, with its file, line and reason (NetworkError)."""
    try:
        parse_policy(text, source)
    except PolicyError as exc:
        raise NetworkError(f"{exc}; nothing was changed") from None


def read_policy_file(path: Path) -> str:
    """A policy file's text, checked (NetworkError with the file, line and reason)."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise NetworkError(f"cannot read {path}: {exc.strerror}") from None
    if len(raw) > MAX_POLICY_TEXT:
        raise NetworkError(f"{path}: larger than {MAX_POLICY_TEXT // 1024} KiB, the most a network policy may be")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise NetworkError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    check_policy(text, path)
    return text


def kept_policy(paths: Paths) -> tuple[NetworkState, PolicyRecord | None]:
    """The network policy in force as this node verified it (any member; no coordinator
    asked, no daemon needed): the kept record beside the peer map cache."""
    try:
        state = NetworkState.load(paths.network_state)
        return state, load_policy(paths.peer_map_cache, state.network)
    except StateError as exc:
        raise NetworkError(str(exc)) from None


async def current_policy(admin: Admin, coordinator: Coordinator) -> PolicyRecord | None:
    """The newest network policy the admin's machine can verify: its own kept one or the
    coordinator's, whichever is newer (a coordinator that lost or rolled back its record
    cannot get the admin to sign a version nodes already have)."""
    peer_map, _ = await admin.members(coordinator)
    return peer_map.policy


async def policy_for_edit(paths: Paths) -> PolicyRecord | None:
    admin = Admin.load(paths)
    async with admin.coordinator() as coordinator:
        return await current_policy(admin, coordinator)


async def set_policy(paths: Paths, text: str, source: Path | str, *, based_on: int | None = None
                     ) -> tuple[PolicyRecord, PolicySent]:
    """Sign `text` (checked first: refused with its line and reason, nothing sent) as the
    next version of the network policy and hand it to the coordinator: the record in
    force, and what was sent. The same text again signs nothing: the record in force is
    offered again, which a coordinator that lost it (restored from an older backup)
    takes back ("re-sent"). With `based_on` (the version an edit started from), refuse
    if the policy changed meanwhile."""
    check_policy(text, source)
    admin = Admin.load(paths)
    async with admin.coordinator() as coordinator:
        current = await current_policy(admin, coordinator)
        version = current.version if current is not None else 0
        if based_on is not None and version != based_on:
            raise NetworkError(f"the network policy changed meanwhile (now version {version}, the edit started from "
                               f"version {based_on}): nothing was sent; edit it again")
        if current is not None and current.text == text:
            return current, "re-sent" if await coordinator.offer_policy(current.to_wire()) else "unchanged"
        try:
            record = PolicyRecord.create(admin.key, version + 1, text, _now())
        except MembershipError as exc:
            raise NetworkError(f"{exc}; nothing was changed") from None
        await coordinator.set_policy(record.to_wire())
    try:
        keep_policy(paths.peer_map_cache, admin.state.network, record)  # also with no daemon running here
    except StateError as exc:
        raise NetworkError(f"network policy v{record.version} was set, but not kept on this machine: {exc}") from None
    return record, "set"
