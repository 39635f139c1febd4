"""What the coordinator (tunnelmesh.coordinator.service) reads from a request and checks
before it acts: JSON bodies and their fields (a value that fails is a 400), query numbers,
identities (verified once and cached), request proofs, and the offers a member registers
(endpoints, relays, SSH attestations, a sealed secret). A MembershipError inside
`status(...)` becomes that HTTP status."""

from __future__ import annotations

import functools
import ipaddress
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from aiohttp import web

from tunnelmesh.fields import Fields
from tunnelmesh.identity import IdentityError, PublicIdentity, verify_sshsig
from tunnelmesh.links.attest import refuse_stale
from tunnelmesh.membership import (JOIN_NAMESPACE, MAX_ENDPOINTS, MembershipError, NetworkInfo, join_proof_message,
                                   parse_address, parse_relay_url, reachable_unicast, unb64)
from tunnelmesh.membership.peermap import MAX_SSH_ATTESTATION, ssh_record_size
from tunnelmesh.nat.candidates import CandidateError, verify_candidate_record

from .guards import Refused
from .store import MemberRow, Store

#: The largest "ssh" object a member may register (its `ssh_record_size`): an RSA identity's
#: signature and the sshd's three host keys (one RSA) take about 2500.
MAX_SSH_OFFER = MAX_SSH_ATTESTATION


#: Parsing an identity line verifies its attestation; members sign every request (each
#: long-poll), so the cache holds a large network's every member: at 4,096 a 10,000-node
#: network evicted on every poll and spent a fifth of the coordinator's CPU here
#: (tools.coordsim). An entry is a few KiB; only members that ask make one.
identity_of = functools.lru_cache(maxsize=65536)(PublicIdentity.from_line)


@contextmanager
def status(status: int) -> Iterator[None]:
    """Answer a MembershipError with `status` (uncaught ones are 400: malformed)."""
    try:
        yield
    except MembershipError as exc:
        raise Refused(status, str(exc)) from None


def utc(t: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))


def no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


#: The checks of request body fields: a value that fails is a 400 (malformed).
body_field = Fields(functools.partial(Refused, 400))


def parse(raw: bytes) -> dict[str, Any]:
    try:
        value = json.loads(raw, parse_constant=no_constant)
    except (ValueError, RecursionError):
        raise Refused(400, "the body is not JSON (or nested too deeply)") from None
    return body_field.object(value, "the body")


def identity(value: Any) -> PublicIdentity:
    if not isinstance(value, str) or len(value) > 8192:
        raise Refused(400, "identity must be an identity line")
    try:
        return identity_of(value)
    except IdentityError as exc:
        raise Refused(400, str(exc)) from None


def query_number(request: web.Request, name: str, *, whole: bool) -> float:
    text = request.query.get(name, "0")
    try:
        value = int(text) if whole else float(text)
    except ValueError:
        value = -1
    if not 0 <= value <= 2**53:  # also refuses NaN
        raise Refused(400, f"{name} must be a {'whole ' if whole else ''}number from 0 to {2**53}")
    return value


def addresses(network: NetworkInfo, host: int) -> tuple[ipaddress.IPv4Address, ipaddress.IPv6Address]:
    try:
        return network.host(host)
    except MembershipError:
        raise Refused(409, f"the network is full: no free address left in {network.cidr4}") from None


def verify_request_proof(identity: PublicIdentity, request_body: dict[str, Any], proof: Any) -> None:
    """The approval path's proof: an SSHSIG by the joiner's key over its request."""
    try:
        verify_sshsig(identity.ssh_public_key, unb64(proof, "join proof"),
                      join_proof_message({"request": request_body}), JOIN_NAMESPACE)
    except IdentityError as exc:
        raise Refused(401, f"the joiner did not prove it holds its identity key: {exc}") from None


def observed_ipv4(remote: str | None) -> str | None:
    """The IPv4 address a request came from (IPv4-mapped IPv6 unwrapped), else None."""
    try:
        address = ipaddress.ip_address(remote or "")
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address):
        return None if address.ipv4_mapped is None else str(address.ipv4_mapped)
    return str(address)


def takes_candidates(request: web.Request) -> bool:
    """Whether a map request opted in to members' candidate records (`candidates=1`)."""
    return request.query.get("candidates") == "1"


def endpoints(member: MemberRow, *, candidates: bool) -> dict[str, Any]:
    """A member's endpoints object in the map: "ssh" only when the member offers it, and
    "candidates" only when it registered a record and the request asked for records
    (`candidates`): nodes from before them refuse endpoint keys they do not know, and would
    refuse the whole map."""
    endpoints: dict[str, Any] = {"addresses": member.addresses, "last_seen": member.last_seen}
    if member.ssh is not None:
        endpoints["ssh"] = member.ssh
    if member.relay is not None:
        endpoints["relay"] = member.relay
    if candidates and member.candidates is not None:
        endpoints["candidates"] = member.candidates
    return endpoints


def member_addresses(value: Any, seen: str | None) -> list[str]:
    """A member's endpoints: `seen` (where its register came from, with its port) first, then
    the register body's "addresses" (IPv4:port, its interface addresses, unsigned: those no
    other machine could reach are left out), at most MAX_ENDPOINTS in all."""
    if not isinstance(value, list) or len(value) > MAX_ENDPOINTS:
        raise Refused(400, f"addresses must be a list of at most {MAX_ENDPOINTS} 'IPv4:port'")
    given = [f"{host}:{port}" for host, port in map(parse_address, value) if reachable_unicast(host)]
    return list(dict.fromkeys([seen, *given] if seen is not None else given))[:MAX_ENDPOINTS]


def relay_offer(value: Any, observed: str | None) -> str | None:
    """The register body's optional "relay": {"url": ...} (how members reach the relay it
    serves, e.g. behind TLS termination) or {"port": N} (plain HTTP at the address its
    request came from)."""
    if value is None:
        return None
    if not isinstance(value, dict) or len(value) != 1 or not value.keys() <= {"url", "port"}:
        raise Refused(400, 'relay must be {"url": "http(s)://host:port"} or {"port": N}')
    if "url" in value:
        return parse_relay_url(value["url"])
    port = body_field.integer(value["port"], "relay port", 1, 65535)
    return None if observed is None else f"http://{observed}:{port}"  # the register answer says why not


def sealed_secret(value: Any) -> dict[str, Any]:
    """The approve body's "secret": {"epoch", "sealed"}, the network secret the admin's
    machine sealed to the joiner (opaque here: the joiner opens and checks it)."""
    if not isinstance(value, dict) or set(value) != {"epoch", "sealed"}:
        raise Refused(400, 'secret must be {"epoch": N, "sealed": "<base64>"}')
    body_field.integer(value["epoch"], "secret epoch")
    if len(unb64(value["sealed"], "sealed secret")) > 256:
        raise Refused(400, "the sealed secret is too long")
    return {"epoch": value["epoch"], "sealed": value["sealed"]}


def ssh_offer(value: Any) -> dict[str, Any] | None:
    """The register body's optional "ssh": a JSON object, opaque here (nodes verify it)."""
    if value is None:
        return None
    if not isinstance(value, dict) or ssh_record_size(value) > MAX_SSH_OFFER:
        raise Refused(400, f"ssh must be a JSON object of at most {MAX_SSH_OFFER} bytes")
    return value


async def take_candidates(store: Store, member: MemberRow, value: Any, now: float) -> str | None:
    """The register body's optional "candidates", the member's candidate record: checked as
    its peers will check it (size, shape, its signature, not from the future), then kept if
    newer than the stored one (the store's check). A record refused says why (the register's
    "candidates_refused") and refuses nothing else: the rest of the register is taken, so a
    node whose clock is fast, or whose record a proxy mangled, is still found."""
    if value is None:
        return None
    try:
        record = verify_candidate_record(value, identity_of(member.identity))
        refuse_stale("candidate record", record.version / 1000, 0, now, CandidateError)
    except CandidateError as exc:
        return f"{exc}: the record was dropped (the rest of the register is taken)"
    stored = await store.set_candidates(member.wg_key, value, record.version)
    if stored is None:
        return None
    return (f"the candidate record's version {record.version} is not newer than the stored one's ({stored}): "
            "a replay, or this node's clock went back")
