"""The node's verified view of the network: `PeerMap`, what an update changed
(`MapChanges`), the unsigned parts of the map (`Endpoints`, relay URLs), and what
readers get of it (`MapSnapshot`: the map at one version, never changed).

Sans-IO: no sockets, no clock reads, no asyncio.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from tunnelmesh.fields import FieldError, parse_endpoint
from tunnelmesh.membership.records import (
    DeviceEntry,
    Entry,
    MemberEntry,
    MembershipError,
    NetworkInfo,
    PolicyRecord,
    Revocation,
    SecretRecord,
    b64,
    check,
    parse_entry,
    unb64,
)

MAX_ENDPOINTS = 8


@dataclass(frozen=True)
class Endpoints:
    """Where a member was last seen: unsigned, the coordinator's word (availability only)."""

    addresses: tuple[tuple[str, int], ...] = ()
    last_seen: int | None = None
    #: The member's SSH endpoint attestation (tunnelmesh.links.attest), signed by the member
    #: itself: kept as given here and verified by the SSH rung before use.
    ssh: dict[str, Any] | None = None
    #: The URL of the WebSocket relay the member serves (relay = true), if any.
    relay: str | None = None
    #: The member's candidate record (tunnelmesh.nat.candidates), signed by the member
    #: itself: kept as given here and verified by the coordinator client before use.
    candidate_record: dict[str, Any] | None = None

    def candidates(self, network: NetworkInfo) -> tuple[tuple[str, int], ...]:
        """The unsigned addresses nodes may send to: where the coordinator saw the member,
        then the member's own word (`sendable` ones)."""
        return tuple((host, port) for host, port in self.addresses if sendable(host, network))

    def to_wire(self) -> dict[str, Any]:
        wire: dict[str, Any] = {"addresses": [f"{h}:{p}" for h, p in self.addresses], "last_seen": self.last_seen}
        if self.ssh is not None:
            wire["ssh"] = self.ssh
        if self.relay is not None:
            wire["relay"] = self.relay
        if self.candidate_record is not None:
            wire["candidates"] = self.candidate_record
        return wire


def sendable(host: str, network: NetworkInfo) -> bool:
    """Whether nodes send to a member's address: a unicast one outside the mesh's own range
    (one in it would route the handshake into the tunnel itself)."""
    return reachable_unicast(host) and ipaddress.IPv4Address(host) not in network.cidr4


#: The largest SSH endpoint record (its `ssh_record_size`) the coordinator takes on
#: /v1/register (MAX_SSH_OFFER) and a node takes from the peer map.
MAX_SSH_ATTESTATION = 8192
#: The largest candidate record (tunnelmesh.nat.candidates), measured the same way.
MAX_CANDIDATE_RECORD = 8192


def ssh_record_size(ssh: Mapping[str, Any]) -> int:
    """An SSH endpoint (or candidate) record's size as the coordinator, the nodes and a
    starting daemon all measure it: bytes of compact JSON (what a node sends; ASCII, so
    bytes = characters)."""
    return len(json.dumps(ssh, separators=(",", ":")))


def parse_endpoints(value: Any) -> Endpoints:
    obj = check.object(value, "endpoints")
    ssh = obj.get("ssh")
    # Keys this version does not know are ignored, in endpoints alone (the rest of the map is
    # strict): they are the coordinator's unsigned hints, and a newer coordinator's additions
    # must not make a node refuse the whole map, its new members and revocations with it.
    check.keys(obj, {"addresses", "last_seen"}, "endpoints", frozenset(obj))
    relay = obj.get("relay")
    if ssh is not None and (not isinstance(ssh, dict) or ssh_record_size(ssh) > MAX_SSH_ATTESTATION):
        raise MembershipError(f"endpoints: ssh must be an object of at most {MAX_SSH_ATTESTATION} bytes")
    record = obj.get("candidates")
    if record is not None and (not isinstance(record, dict) or ssh_record_size(record) > MAX_CANDIDATE_RECORD):
        raise MembershipError(f"endpoints: candidates must be an object of at most {MAX_CANDIDATE_RECORD} bytes")
    addresses = obj["addresses"]
    if not isinstance(addresses, list) or len(addresses) > MAX_ENDPOINTS:
        raise MembershipError(f"endpoints: at most {MAX_ENDPOINTS} addresses")
    parsed = []
    for item in addresses:
        parsed.append(parse_address(item))
    last_seen = obj["last_seen"]
    return Endpoints(tuple(parsed), None if last_seen is None else check.integer(last_seen, "last_seen"), ssh,
                     None if relay is None else parse_relay_url(relay), record)


MAX_RELAY_URL = 256


_RELAY_URL_RE = re.compile(r"(?P<scheme>https?)://(?P<host>[A-Za-z0-9.-]{1,253})(?::(?P<port>[0-9]{1,5}))?"
                           r"(?P<path>(?:/[A-Za-z0-9._~-]*)*)", re.ASCII | re.IGNORECASE)
_HOST_LABEL_RE = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?", re.ASCII)
_DEFAULT_PORTS = {"http": 80, "https": 443}
#: A label resolvers and URL parsers may read as a number (decimal, octal, hex): a host
#: ending in one is an address in another spelling, not a name.
_NUMERIC_LABEL_RE = re.compile(r"[0-9]+|0x[0-9a-f]*", re.ASCII)
#: Names of this machine besides *.localhost (RFC 6761, and what /etc/hosts files say).
_LOCAL_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"})
#: "This network" (RFC 1122): Linux reaches the local machine through 0.0.0.0, and none of it is elsewhere.
_THIS_NETWORK = ipaddress.IPv4Network("0.0.0.0/8")


def parse_relay_url(value: Any) -> str:
    """A member's relay URL as the map carries it, in canonical form: http(s)://host[:port]
    [/path] with an IPv4 address or a DNS name (LDH labels) for the host, nothing else
    (no credentials, query, fragment or escapes; printable ASCII only, as it is shown in
    logs and status). Not loopback, link-local, multicast or unspecified: a member's word
    must not send every node to its own machine or its cloud's metadata service. Scheme
    and host lowercased, the default port and a trailing slash dropped, so one relay has
    one spelling. The relay's WebSocket is <url>/relay.

    An address is taken only as a canonical dotted quad: resolvers (inet_aton) and URL
    parsers read `0x7f.0.0.1`, `0xa9fea9fe`, `2130706433` or `127.1` as addresses too,
    so a host whose last label looks like a number (digits, or 0x and hex) is refused
    rather than passed on as a name. So are names that mean this machine (`localhost`,
    `*.localhost`) and one-label names (completed by the resolver's search list, never
    a relay elsewhere). Where a name leads is checked when a node connects
    (tunnelmesh.links.relay.RelayGuard), as DNS answers then."""
    text = check.text(value, "relay", MAX_RELAY_URL)
    match = _RELAY_URL_RE.fullmatch(text)
    problem = "expected http(s)://host:port" if match is None else None
    if match is not None:
        scheme, host = match["scheme"].lower(), match["host"].lower().rstrip(".")
        port = int(match["port"]) if match["port"] is not None else _DEFAULT_PORTS[scheme]
        try:
            address: ipaddress.IPv4Address | None = ipaddress.IPv4Address(host)
        except ValueError:
            address = None
        if not 1 <= port <= 65535:
            problem = "the port must be 1 to 65535"
        elif address is not None:
            if not relay_address_usable(address):
                problem = "a loopback, link-local, multicast or reserved address is no relay for others"
        elif not host or not all(_HOST_LABEL_RE.fullmatch(label) for label in host.split(".")):
            problem = "the host must be an IPv4 address or a DNS name"
        elif _NUMERIC_LABEL_RE.fullmatch(host.rsplit(".", 1)[-1]):
            problem = "an address must be written as a dotted quad (e.g. 192.0.2.7), not in another form"
        elif "." not in host or host in _LOCAL_NAMES or host.endswith(".localhost"):
            problem = "the host must be a fully qualified name of another machine (not localhost or a one-label name)"
    if problem is not None or match is None:
        shown = text[:80].encode("ascii", "backslashreplace").decode()
        raise MembershipError(f"relay {shown!r}: {problem}")
    shown_port = "" if port == _DEFAULT_PORTS[scheme] else f":{port}"
    return f"{scheme}://{host}{shown_port}{match['path'].rstrip('/')}"


def relay_address_usable(address: ipaddress.IPv4Address) -> bool:
    """Whether a relay may be at `address` at all, for anyone: not loopback, link-local,
    multicast, unspecified, "this network", broadcast or reserved. (Private-use addresses
    pass here; a node allows them only where the relay's member registered itself.)"""
    return reachable_unicast(str(address)) and address not in _THIS_NETWORK


def reachable_unicast(host: str) -> bool:
    """Whether an IPv4 address can be where another machine's peer listens: not loopback,
    unspecified, multicast, broadcast, link-local or reserved. Addresses in the map are a
    member's word, unsigned: nodes send only to these."""
    address = ipaddress.IPv4Address(host)
    return not (address.is_loopback or address.is_unspecified or address.is_multicast or address.is_link_local
                or address.is_reserved)


def reachable_ipv4(host: str) -> bool:
    """Whether `host` is an IPv4 address that passes `reachable_unicast` (a name or an IPv6
    address: False)."""
    try:
        return reachable_unicast(host)
    except ValueError:
        return False


def parse_address(item: Any) -> tuple[str, int]:
    """An address a member says it is reached at: IPv4:port."""
    text = check.text(item, "endpoint", 64)
    try:
        return parse_endpoint(text, ipv4_only=True)
    except FieldError as exc:
        raise MembershipError(f"endpoint {text!r}: {exc}") from None


@dataclass
class MapChanges:
    added: list[MemberEntry] = field(default_factory=list)
    removed: list[tuple[MemberEntry, str]] = field(default_factory=list)
    endpoints: dict[bytes, Endpoints] = field(default_factory=dict)
    revoked_self: Revocation | None = None
    new_secret: SecretRecord | None = None
    new_policy: PolicyRecord | None = None  # a newer network policy was verified and is now in force
    rejected: list[str] = field(default_factory=list)
    bindings_changed: bool = False
    devices_added: list[DeviceEntry] = field(default_factory=list)
    devices_removed: list[tuple[DeviceEntry, str]] = field(default_factory=list)


def bindings_of(member: Entry) -> tuple[str, ...]:
    """What an entry binds to its key, for good: its name, its mesh IPv4 address and its
    SSH key (one X25519 key per SSH key; a device has none)."""
    ssh = () if member.ssh_fingerprint is None else (f"ssh:{member.ssh_fingerprint}",)
    return f"name:{member.name}", f"ipv4:{member.ipv4}", *ssh


def parse_bindings(value: Any) -> tuple[dict[str, bytes], dict[bytes, int]]:
    """The kept bindings as `bindings_to_wire` writes them: {"bindings": {"name:web":
    "<wg key b64>", ...}, "authorized": {"<wg key b64>": time}} -- which key holds what, and
    when the admin last authorised each holder (a revocation frees its bindings only if it
    is as late)."""
    obj = check.object(value, "bindings")
    check.keys(obj, {"bindings", "authorized"}, "bindings")
    parsed: dict[str, bytes] = {}
    for key, wg in check.object(obj["bindings"], "bindings").items():
        kind, _, rest = check.text(key, "binding", 128).partition(":")
        if kind == "ipv4":
            try:
                ipaddress.IPv4Address(rest)
            except ValueError:
                raise MembershipError(f"binding {key[:40]!r}: not an IPv4 address") from None
        elif kind not in ("name", "ssh") or not rest:
            raise MembershipError(f"binding {key[:40]!r}: expected name:, ipv4: or ssh:")
        parsed[key] = unb64(wg, "bound key", 32)
    authorized = {unb64(k, "bound key", 32): check.integer(t, "authorized") for k, t in
                  check.object(obj["authorized"], "authorized").items()}
    return parsed, authorized


@dataclass(frozen=True, slots=True)
class MapSnapshot:
    """The verified members and their endpoints at one version of the map: what every
    reader works from (the SSH rung's directory, the relay pool, the node's relay, the
    bridge's authorized keys). Never changed: the coordinator client, the one owner of
    the `PeerMap`, makes a new one after each change, so a reader sees one whole
    version, never a map half-way through an update."""

    version: int
    network: NetworkInfo
    members: Mapping[bytes, MemberEntry]  # read-only, by WireGuard key
    endpoints: Mapping[bytes, Endpoints]  # read-only, by WireGuard key
    #: The network policy in force (the highest version verified), None when the admin has
    #: set none (a network from before the packet filter: docs/filter.md, "What is in force").
    policy: PolicyRecord | None = None
    revocations: int = 0  # how many the node keeps (for good)
    rejected: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))  # refused so far, by reason
    #: Plain WireGuard devices (`DeviceEntry`), by WireGuard key: apart from `members`, whose
    #: readers (SSH rung, relays, bridge) need an SSH identity a device does not have.
    devices: Mapping[bytes, DeviceEntry] = field(default_factory=lambda: MappingProxyType({}))


class PeerMap:
    """The verified peer map a node works from, and what it keeps for good.

    `apply` takes an update from the coordinator (or the on-disk cache) and returns what
    changed; records that do not verify are refused, counted in `rejected` and named in
    the result. Kept for good, whatever any later update says (docs/coordinator.md,
    "Threat model"):

    - revocations, by WireGuard key and by SSH key: nothing can bring back a key one
      covers, nor a fresh X25519 key attested by a revoked SSH key;
    - bindings: the first admin-signed entry that names a name, a mesh address or an
      SSH key binds it to that entry's WireGuard key. Another key gets it only once the
      bound key is revoked (an admin-signed record), never because an entry claims an
      earlier time, nor because a map leaves the holder out;
    - the version: an update older than the one this node has is refused (no rollback);
    - the network policy: the highest version verified. An older one, or another record
      with the same version, is refused; a map without one leaves it in force (a policy
      is replaced, never removed).

    Devices (`DeviceEntry`, plain WireGuard keys the admin admitted) are kept in `devices`,
    under the same revocations and bindings (name and address), and reported apart
    (`MapChanges.devices_added` / `devices_removed`): only their serving node peers with them.

    Only admin-signed member entries are members. Invite-signed entries are what a joiner
    hands the coordinator; the admin's machine checks them against its own invite ledger
    and countersigns (tunnelmesh.admission), so no invite key can make or rebind a member."""

    def __init__(self, network: NetworkInfo, own_wg_key: bytes) -> None:
        self.network = network
        self.own_wg_key = own_wg_key
        self.members: dict[bytes, MemberEntry] = {}
        self.devices: dict[bytes, DeviceEntry] = {}
        self.endpoints: dict[bytes, Endpoints] = {}
        self.revocations: dict[bytes, Revocation] = {}
        self._revoked_ssh: dict[str, Revocation] = {}
        self.bindings: dict[str, bytes] = {}
        self.authorized: dict[bytes, int] = {}  # bound key -> when the admin last authorised it
        self.secret: SecretRecord | None = None
        self.policy: PolicyRecord | None = None
        self.own: MemberEntry | None = None  # this node's entry, when a map lists it
        self.version = 0
        self.rejected: Counter[str] = Counter()

    def snapshot(self) -> MapSnapshot:
        """The map as it is now, for readers (copies: later changes do not show in it)."""
        return MapSnapshot(self.version, self.network, MappingProxyType(dict(self.members)),
                           MappingProxyType(dict(self.endpoints)), self.policy, len(self.revocations),
                           MappingProxyType(dict(self.rejected)), MappingProxyType(dict(self.devices)))

    def _kept_for(self, member: Entry) -> tuple[Revocation | None, Revocation | None]:
        ssh = member.ssh_fingerprint
        return self.revocations.get(member.wg_key), None if ssh is None else self._revoked_ssh.get(ssh)

    def revoked(self, member: Entry) -> Revocation | None:
        for revocation in self._kept_for(member):
            if revocation is not None and revocation.covers(member):
                return revocation
        return None

    def revocations_of(self, member: Entry) -> list[Revocation]:
        """Every kept revocation of the member's key or SSH key, whenever made."""
        return [r for r in dict.fromkeys(self._kept_for(member)) if r is not None]

    def key_revoked(self, wg_key: bytes) -> bool:
        """Whether a bound key is out for good: its current entry is revoked or, when it is
        not listed now, a kept revocation names it or the SSH key bound to it."""
        member: Entry | None = self.members.get(wg_key) or self.devices.get(wg_key)
        if member is None and self.own is not None and self.own.wg_key == wg_key:
            member = self.own
        if member is not None:
            return self.revoked(member) is not None
        # Not listed now (a map may hide it): revoked only by a revocation at or after its
        # last authorisation, never by one that a later re-admission overrode.
        authorized = self.authorized.get(wg_key, 0)
        found = [self.revocations.get(wg_key), *(self._revoked_ssh.get(binding[4:]) for binding, key
                                                 in self.bindings.items() if key == wg_key and binding.startswith("ssh:"))]
        return any(r is not None and r.at >= authorized for r in found)

    def keep(self, revocation: Revocation) -> None:
        """Keep a verified revocation (the latest per key and per SSH key: it covers most)."""
        kept = self.revocations.get(revocation.wg_key)
        if kept is None or kept.at < revocation.at:
            self.revocations[revocation.wg_key] = revocation
        if revocation.ssh is not None:
            kept = self._revoked_ssh.get(revocation.ssh)
            if kept is None or kept.at < revocation.at:
                self._revoked_ssh[revocation.ssh] = revocation

    def add_revocations(self, wires: Any, changes: MapChanges) -> None:
        for wire in check.list(wires, "revocations"):
            try:
                revocation = Revocation.from_wire(wire, self.network)
            except MembershipError as exc:
                self._reject(changes, f"revocation refused: {exc}")
                continue
            self.keep(revocation)
            own = self.own
            if revocation.wg_key == self.own_wg_key:
                changes.revoked_self = self.revocations[revocation.wg_key]  # the latest, which covers most
            elif own is not None and revocation.covers(own) and revocation.ssh is not None:
                changes.revoked_self = self._revoked_ssh[revocation.ssh]
            for member in [m for m in self.members.values() if revocation.covers(m)]:
                del self.members[member.wg_key]
                self.endpoints.pop(member.wg_key, None)
                changes.removed.append((member, f"revoked by the admin at {revocation.at}"))
            for device in [d for d in self.devices.values() if revocation.covers(d)]:
                del self.devices[device.wg_key]
                changes.devices_removed.append((device, f"revoked by the admin at {revocation.at}"))

    def binding_clash(self, member: Entry) -> str | None:
        """What of `member` is bound to another key that is not revoked, if anything."""
        for binding in bindings_of(member):
            holder = self.bindings.get(binding)
            if holder is not None and holder != member.wg_key and not self.key_revoked(holder):
                return binding.replace(":", " ", 1)
        return None

    def bind(self, member: Entry, changes: MapChanges) -> None:
        for binding in bindings_of(member):
            if self.bindings.get(binding) != member.wg_key:
                self.bindings[binding] = member.wg_key
                changes.bindings_changed = True
        if self.authorized.get(member.wg_key, -1) < member.authorized_at:
            self.authorized[member.wg_key] = member.authorized_at
            changes.bindings_changed = True

    def apply(self, update: Any) -> MapChanges:
        changes = MapChanges()
        update = check.object(update, "peer map")
        # "policy" only when there is one to send: a node from before the filter takes the rest.
        check.keys(update, {"version", "full", "members", "revocations", "secret", "endpoints"}, "peer map",
                   {"policy"})
        version = check.integer(update["version"], "version")
        full = update["full"]
        if not isinstance(full, bool):
            raise MembershipError("peer map: 'full' must be true or false")
        if version < self.version:
            raise MembershipError(
                f"peer map version {version} is older than version {self.version}, which this node already has: "
                "refused (a replayed map, or a coordinator database restored from an older backup)")
        # Everything that can refuse the whole update is checked before anything changes.
        revocations = check.list(update["revocations"], "revocations")
        wires = check.list(update["members"], "members")
        endpoint_items = check.object(update["endpoints"], "endpoints").items()
        self.add_revocations(revocations, changes)
        parsed: list[Entry] = []
        for wire in wires:
            try:
                parsed.append(parse_entry(wire, self.network))
            except MembershipError as exc:
                self._reject(changes, f"member refused: {exc}")
        listed = {member.wg_key for member in parsed}
        if full:  # availability only: an unlisted member keeps its bindings
            for key in [k for k in self.members if k not in listed]:
                changes.removed.append((self.members.pop(key), "no longer listed by the coordinator"))
                self.endpoints.pop(key, None)
            for key in [k for k in self.devices if k not in listed]:
                changes.devices_removed.append((self.devices.pop(key), "no longer listed by the coordinator"))
        if changes.revoked_self is not None and any(
                isinstance(m, MemberEntry) and m.wg_key == self.own_wg_key and m.grant is None
                and self.revoked(m) is None for m in parsed):
            changes.revoked_self = None  # re-admitted by an approval made after it
        for member in parsed:
            if member.grant is not None:
                self._reject(changes, f"member {member.name} refused: signed with an invite key only, not "
                                      "countersigned by the admin")
                continue
            revocation = self.revoked(member)
            if revocation is not None:
                self._reject(changes, f"member {member.name} refused: its key was revoked at {revocation.at}")
                continue
            if isinstance(member, DeviceEntry) and (member.wg_key == self.own_wg_key or member.wg_key in self.members):
                self._reject(changes, f"device {member.name} refused: its key is a member's")
                continue
            clash = self.binding_clash(member)
            if clash is not None:
                self._reject(changes, f"member {member.name} refused: {clash} is bound to another key "
                                      "(only a revocation of that key frees it)")
                continue
            self.bind(member, changes)
            if isinstance(member, DeviceEntry):
                self._take_device(member, changes)
                continue
            if member.wg_key == self.own_wg_key:
                self.own = member
                continue
            known = self.members.get(member.wg_key)
            if known is not None and known == member:
                continue
            if known is not None:
                changes.removed.append((known, "replaced by a newer entry"))
            self.members[member.wg_key] = member
            changes.added.append(member)
        for key_b64, value in endpoint_items:
            try:
                key = unb64(key_b64, "member key", 32)
                endpoints = parse_endpoints(value)
            except MembershipError as exc:
                self._reject(changes, f"endpoints refused: {exc}")
                continue
            if key in self.members and self.endpoints.get(key) != endpoints:
                self.endpoints[key] = endpoints
                changes.endpoints[key] = endpoints
        if update["secret"] is not None:
            try:
                record = SecretRecord.from_wire(update["secret"], self.network)
            except MembershipError as exc:
                self._reject(changes, f"secret record refused: {exc}")
            else:
                if self.secret is None or record.epoch > self.secret.epoch:
                    self.secret = record
                    changes.new_secret = record
        if update.get("policy") is not None:
            self.take_policy(update["policy"], changes)
        self.version = max(self.version, version)
        return changes

    def _take_device(self, device: DeviceEntry, changes: MapChanges) -> None:
        known = self.devices.get(device.wg_key)
        if known == device:
            return
        if known is not None:
            changes.devices_removed.append((known, "replaced by a newer entry"))
        self.devices[device.wg_key] = device
        changes.devices_added.append(device)

    def take_policy(self, wire: Any, changes: MapChanges) -> None:
        """Verify a network policy record and put it in force if it is newer than the one
        kept; refuse (counted, named in `changes`) one that does not verify, an older one
        (a replay: the coordinator cannot roll the policy back) and a second record with
        the version kept."""
        try:
            record = PolicyRecord.from_wire(wire, self.network)
        except MembershipError as exc:
            self._reject(changes, f"network policy refused: {exc}")
            return
        kept = self.policy
        if kept is None or record.version > kept.version:
            self.policy = changes.new_policy = record
        elif record.version < kept.version:
            self._reject(changes, f"network policy refused: version {record.version} is older than version "
                                  f"{kept.version}, which this node has (a replayed policy)")
        elif record != kept:
            self._reject(changes, f"network policy refused: another record with version {record.version}, which "
                                  "this node has (the one it verified first stays)")

    def _reject(self, changes: MapChanges, reason: str) -> None:
        self.rejected[reason.split(":")[0]] += 1
        changes.rejected.append(reason)

    def to_cache(self) -> dict[str, Any]:
        """A full update that `apply` takes back (the on-disk cache)."""
        return {
            "version": self.version, "full": True,
            "members": [m.to_wire() for m in (*self.members.values(), *self.devices.values())],
            "revocations": [r.to_wire() for r in self.revocations.values()],
            "secret": self.secret.to_wire() if self.secret is not None else None,
            "endpoints": {b64(k): e.to_wire() for k, e in self.endpoints.items()},
            **({"policy": self.policy.to_wire()} if self.policy is not None else {}),
        }

    def bindings_to_wire(self) -> dict[str, Any]:
        return {"bindings": {binding: b64(key) for binding, key in sorted(self.bindings.items())},
                "authorized": {b64(key): at for key, at in sorted(self.authorized.items())}}

