"""The candidate record: where a member's WireGuard UDP port may be reached, signed by
the member itself, carried by the coordinator in the peer map (docs/nat.md, "Candidates").

The coordinator relays the record but cannot forge or alter it, nor serve an old one in
place of a newer: every holder keeps the newest version seen per member
(`links.attest.NewestRecords`) and refuses older ones.

Wire form (a JSON object, exactly these keys)::

    {"candidates": [{"address": "192.0.2.7:51820", "kind": "local"}, ...],
                    # at most MAX_CANDIDATES, IPv4:port in canonical spelling, no address
                    # twice; kind one of report.KINDS (local, mapped, configured, reflexive)
     "mapping": "endpoint-independent",   # report.BEHAVIOURS: what the member's NAT prober
     "filtering": "address-dependent",    # found (RFC 4787 / 5780); "unknown" before it knows
     "version": 1767225600123,            # Unix milliseconds when made: newer replaces older
     "sig": "<standard base64 of an SSHSIG blob>"}

at most MAX_CANDIDATE_RECORD bytes of compact JSON. The signature is `NodeIdentity.sign`
in namespace SIGN_NAMESPACE over::

    b"tunnelmesh candidates v1\\x00" || wg_public_key (32 bytes)
        || canonical JSON of {"candidates", "filtering", "mapping", "version"}

(links.attest.signed_message), so a record is bound to the member's WireGuard key as
well as to its SSH key. A member signs a new record only when what it says changes.

Sans-IO apart from logging: time is passed in.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from tunnelmesh.fields import FieldError, parse_endpoint
from tunnelmesh.identity import NodeIdentity, PublicIdentity
from tunnelmesh.links.attest import NewestRecords, parse_signature, sign_record, signed_message, verify_signed
from tunnelmesh.membership.peermap import MAX_CANDIDATE_RECORD, ssh_record_size

from .report import (BEHAVIOURS, CONFIGURED, KINDS, LOCAL, MAPPED, REFLEXIVE, UNKNOWN, Address, Candidate, NatReport,
                     PeerNat)

__all__ = [
    "CandidateError",
    "CandidateRecord",
    "MAX_CANDIDATES",
    "SIGN_NAMESPACE",
    "VerifiedCandidates",
    "make_candidate_record",
    "order_candidates",
    "own_candidates",
    "verify_candidate_record",
]

log = logging.getLogger("tunnelmesh.nat")

SIGN_NAMESPACE = "tunnelmesh-candidates-v1@tunnelmesh"
_PREFIX = b"tunnelmesh candidates v1\x00"
_KEYS = {"candidates", "mapping", "filtering", "version", "sig"}
_CANDIDATE_KEYS = {"address", "kind"}
#: Interface addresses, a mapped, a configured and a few reflexive addresses fit easily.
MAX_CANDIDATES = 12
_MAX_ADDRESS = len("255.255.255.255:65535")
#: `version` in Unix milliseconds: after 2001, and a JSON integer any parser keeps exactly.
MIN_VERSION = 1_000_000_000_000
MAX_VERSION = 2**53 - 1
#: How often (seconds) a node says again that one member's record does not verify.
WARN_INTERVAL = 60.0

_MALFORMED = "malformed candidate record"


class CandidateError(ValueError):
    """The record is malformed, unsigned, signed by another key or stale; the text says which."""


@dataclass(frozen=True, slots=True)
class CandidateRecord:
    """A verified record: the member's candidates (in its order) and its NAT's behaviour."""

    candidates: tuple[Candidate, ...]
    nat: PeerNat
    version: int


def _candidate(value: Any) -> Candidate:
    if not isinstance(value, dict) or set(value) != _CANDIDATE_KEYS:
        raise CandidateError(f"{_MALFORMED}: a candidate must be an object with exactly address, kind")
    address, kind = value["address"], value["kind"]
    if kind not in KINDS:
        raise CandidateError(f"{_MALFORMED}: a candidate's kind must be one of {', '.join(KINDS)}")
    if not isinstance(address, str) or len(address) > _MAX_ADDRESS:
        raise CandidateError(f"{_MALFORMED}: a candidate's address must be IPv4:port")
    try:
        host, port = parse_endpoint(address, ipv4_only=True)
    except FieldError as exc:
        raise CandidateError(f"{_MALFORMED}: candidate address: {exc}") from None
    if f"{host}:{port}" != address:
        raise CandidateError(f"{_MALFORMED}: candidate address {address!r} is not in canonical form")
    return Candidate(host, port, kind)


def _parse(wire: Any) -> tuple[CandidateRecord, bytes]:
    if not isinstance(wire, dict) or set(wire) != _KEYS:
        raise CandidateError(f"{_MALFORMED}: expected an object with exactly candidates, mapping, filtering, "
                             "version, sig")
    if ssh_record_size(wire) > MAX_CANDIDATE_RECORD:
        raise CandidateError(f"{_MALFORMED}: larger than {MAX_CANDIDATE_RECORD} bytes")
    listed = wire["candidates"]
    if not isinstance(listed, list) or len(listed) > MAX_CANDIDATES:
        raise CandidateError(f"{_MALFORMED}: candidates must be a list of at most {MAX_CANDIDATES}")
    candidates = tuple(_candidate(item) for item in listed)
    if len({c.address for c in candidates}) != len(candidates):
        raise CandidateError(f"{_MALFORMED}: an address is listed twice")
    mapping, filtering, version = wire["mapping"], wire["filtering"], wire["version"]
    if mapping not in BEHAVIOURS or filtering not in BEHAVIOURS:
        raise CandidateError(f"{_MALFORMED}: mapping and filtering must be one of {', '.join(BEHAVIOURS)}")
    if type(version) is not int or not MIN_VERSION <= version <= MAX_VERSION:
        raise CandidateError(f"{_MALFORMED}: version must be a time in Unix milliseconds")
    reflexive = tuple(c.address for c in candidates if c.kind == REFLEXIVE)
    record = CandidateRecord(candidates, PeerNat(mapping, filtering, reflexive), version)
    return record, parse_signature(wire["sig"], _MALFORMED, CandidateError)


def _signed_message(wg_public_key: bytes, record: CandidateRecord) -> bytes:
    body = {"candidates": _candidates_wire(record.candidates), "mapping": record.nat.mapping,
            "filtering": record.nat.filtering, "version": record.version}
    return signed_message(_PREFIX, wg_public_key, body)


def _candidates_wire(candidates: Iterable[Candidate]) -> list[dict[str, str]]:
    return [{"address": f"{c.host}:{c.port}", "kind": c.kind} for c in candidates]


def verify_candidate_record(wire: Any, identity: PublicIdentity) -> CandidateRecord:
    """The record in `wire`, if `identity` signed exactly it; else CandidateError. Whether
    it is the newest is the holder's check (`VerifiedCandidates`, the coordinator's store)."""
    record, sig = _parse(wire)
    verify_signed(identity, sig, _signed_message(identity.wg_public_key, record), SIGN_NAMESPACE, "candidate record",
                  CandidateError)
    return record


async def make_candidate_record(identity: NodeIdentity, candidates: Iterable[Candidate], *, mapping: str = UNKNOWN,
                                filtering: str = UNKNOWN, version: int) -> dict[str, Any]:
    """The signed wire form, made at `version` (Unix milliseconds: now); CandidateError if
    the fields would not verify. With an ssh-agent identity, one agent call (bounded)."""
    wire: dict[str, Any] = {"candidates": _candidates_wire(candidates), "mapping": mapping, "filtering": filtering,
                            "version": version, "sig": ""}
    record, _ = _parse(wire)  # the same checks a peer makes, before signing anything
    wire["sig"] = await sign_record(identity, _signed_message(identity.public.wg_public_key, record), SIGN_NAMESPACE)
    return wire


def own_candidates(local: Iterable[Address], *, report: NatReport | None = None, mapped: Candidate | None = None,
                   configured: Candidate | None = None) -> tuple[Candidate, ...]:
    """What a node lists in its record: its interface addresses (`local`, with its port),
    the port mapper's, the configured public endpoint and the reflexive addresses the
    prober saw. An address is listed once, as its first kind in that order; past
    MAX_CANDIDATES, interface addresses give way (a peer on the node's own LAN is rare
    beside one that needs the outside addresses)."""
    found: dict[Address, Candidate] = {}
    reflexive = report.reflexive if report is not None else ()
    for candidate in (*(Candidate(host, port, LOCAL) for host, port in local),
                      *(c for c in (mapped, configured) if c is not None),
                      *(Candidate(host, port, REFLEXIVE) for host, port in reflexive)):
        found.setdefault(candidate.address, candidate)
    chosen = sorted(found.values(), key=lambda c: c.kind == LOCAL)  # stable: the others first
    return tuple(chosen[:MAX_CANDIDATES])


# Where a candidate goes in the order a peer tries them (lower first).
_SAME_LAN, _OBSERVED, _ELSEWHERE = 0, 4, 5
_RANK = {MAPPED: 1, CONFIGURED: 2, REFLEXIVE: 3, LOCAL: _ELSEWHERE}


def order_candidates(record: CandidateRecord | None, observed: Iterable[Address],
                     lan: Iterable[ipaddress.IPv4Network]) -> tuple[Address, ...]:
    """A peer's addresses best first: any candidate on a subnet this node is on (`lan`:
    the same LAN, no NAT between), then its mapped, configured and reflexive ones, then
    what the coordinator saw (`observed`, its order), then its other interface addresses
    (another LAN's private address may be someone else's here). Each address once."""
    networks = tuple(lan)
    ranked: list[tuple[int, Address]] = []
    for candidate in record.candidates if record is not None else ():
        on_lan = any(ipaddress.IPv4Address(candidate.host) in net for net in networks)
        ranked.append((_SAME_LAN if on_lan else _RANK[candidate.kind], candidate.address))
    ranked += [(_OBSERVED, address) for address in observed]
    ranked.sort(key=lambda item: item[0])  # stable: each group in the order given
    return tuple(dict.fromkeys(address for _, address in ranked))


class VerifiedCandidates:
    """The candidate records a node verified, the newest per member: what `order_candidates`
    works from. A record that does not verify, or is older than one seen (a replay), is
    dropped with a warning (at most one per member per WARN_INTERVAL) and the member's
    last verified record, if any, stays."""

    def __init__(self) -> None:
        self._newest = NewestRecords("candidate record", CandidateError, per_second=1000)
        self._wires: dict[bytes, Any] = {}  # the wire form of each record kept: the same again is not re-verified
        self._warned: dict[bytes, float] = {}
        self.records: dict[bytes, CandidateRecord] = {}
        self.dropped = 0

    def take(self, name: str, wg_key: bytes, identity: PublicIdentity, wire: Any, now: float
             ) -> CandidateRecord | None:
        """Member `name`'s record after `wire` (None: it sent none); `now` in Unix seconds."""
        if wire is None or wire == self._wires.get(wg_key):
            return self.records.get(wg_key)
        try:
            record = verify_candidate_record(wire, identity)
            self._newest.check(wg_key, record.version, now)
        except CandidateError as exc:
            self.dropped += 1
            if now - self._warned.get(wg_key, float("-inf")) >= WARN_INTERVAL:
                self._warned[wg_key] = now
                log.warning("member %s: %s (its last verified record and the coordinator's observation are "
                            "used instead)", name, exc)
            return self.records.get(wg_key)
        self._wires[wg_key], self.records[wg_key] = wire, record
        return record

    def keep_only(self, members: Mapping[bytes, Any]) -> None:
        """Forget the records of members no longer in the map (their newest versions stay)."""
        for key in [k for k in self.records if k not in members]:
            del self.records[key], self._wires[key]
