"""A node's membership state on disk: which network it joined, and the verified peer map.

Files (all in the state directory, see `tunnelmesh.paths`):

- ``network.json``: the coordinator URL, the network record (its admin key is
  what this node pinned at join), this node's own member entry and the network
  policy version the invite said was in force (``policy_expected``; 0 or absent:
  none known). Written once by `join`/`init`; re-verified on every load.
- ``peermap.json``: the last verified peer map. Rewritten atomically (temp
  file, fsync, rename) after each change, so a crash or a full disk leaves the
  previous version, never half a file. A damaged cache is ignored (the node
  resyncs from the coordinator).

Every file here is written through `tunnelmesh.files.write_atomic`. One that is damaged
anyway (disk, hand edits) stops the daemon's start with its path and what to do,
except the peer map cache (docs/architecture.md "State files and damage").
- ``revocations.json`` (beside the cache): every revocation this node has seen,
  kept for good. Only ever merged into, never dropped with the cache: it is
  what stops a stale or replayed peer map from bringing a revoked key back.
- ``bindings.json`` (beside it): which WireGuard key holds each name, mesh address
  and SSH key, kept for good like the revocations (`PeerMap` rebinds only when the
  holder is revoked).
- ``policy.json`` (beside it): the network policy record with the highest version this
  node verified, kept like the bindings: with the cache lost, a coordinator still cannot
  get the node to take an older policy, nor leave it with none (the packet filter would
  then let everything in: docs/filter.md). A node that joined after the network had a
  policy has none kept yet: ``policy_expected`` (network.json) covers it until then.
- ``network.secret``: replaced atomically when the admin rotates it.
- ``invites.json`` (the admin's machine only): every invite made there and the keys
  each one admitted (`tunnelmesh.admission.InviteLedger`), kept for good.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunnelmesh import files
from tunnelmesh.admission import InviteLedger
from tunnelmesh.config.secret import network_secret_text
from tunnelmesh.membership import (
    MapChanges,
    MemberEntry,
    MembershipError,
    NetworkInfo,
    PeerMap,
    PolicyRecord,
    Revocation,
    parse_bindings,
)

MAX_STATE_BYTES = 16 << 20


class StateError(Exception):
    """A state file is missing, unreadable or does not verify; the message says what to do."""


def write_atomic(path: Path, data: bytes, *, secret: bool = False) -> None:
    """Replace `path` with `data` all at once (the old content survives any failure):
    `tunnelmesh.files.write_atomic`, or `write_secret` (0600) for a secret, with its
    error as a `StateError`."""
    try:
        if secret:
            files.write_secret(path, data)
        else:
            files.write_atomic(path, data)
    except files.FileError as exc:
        raise StateError(str(exc)) from None


def save_network_secret(path: Path, secret: bytes) -> None:
    """The network secret file, as `tunnelmesh.config.read_network_secret` reads it."""
    write_atomic(path, network_secret_text(secret), secret=True)


#: What to do about a damaged file that only this machine holds (no coordinator can be
#: trusted to give it back), by what the file is.
KEPT_FOR_GOOD = {
    "revocations": "which members are revoked (one that dropped a revocation could bring a revoked node back)",
    "bindings": "which key holds each name, address and SSH key",
    "network policy": "the network policy, whatever its version",
}
NETWORK_STATE_REMEDY = ("restore it from a backup, or start over in a new state directory (--state-dir) with a "
                        "new invite from the admin (`tunnelmesh join <token>`)")


def damaged(path: Path, what: str, why: str) -> StateError:
    """The error for a damaged state file: its path, what is wrong and what to do."""
    if what in KEPT_FOR_GOOD:
        remedy = (f"restore it from a backup, or remove it if there is none (this node then takes the "
                  f"coordinator's word again for {KEPT_FOR_GOOD[what]})")
    elif what == "network state":
        remedy = NETWORK_STATE_REMEDY
    else:
        remedy = "restore it from a backup"
    return StateError(f"{what} {path} is damaged ({why}); {remedy}")


def _read_json(path: Path, what: str) -> Any:
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_STATE_BYTES + 1)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise StateError(f"cannot read {what} {path}: {exc.strerror}") from None
    if len(raw) > MAX_STATE_BYTES:
        raise damaged(path, what, f"larger than {MAX_STATE_BYTES} bytes")
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):
        raise damaged(path, what, "not JSON: truncated or overwritten") from None


@dataclass(frozen=True)
class NetworkState:
    url: str
    network: NetworkInfo
    member: MemberEntry
    #: The network policy version this node knows exists from what the admin handed over
    #: (the invite token; `init`: the starter policy): until it has verified such a policy,
    #: its packet filter denies instead of letting everything in (docs/filter.md). 0: none.
    policy_expected: int = 0

    def save(self, path: Path) -> None:
        data = {"url": self.url, "network": self.network.to_wire(), "member": self.member.to_wire(),
                "policy_expected": self.policy_expected}
        write_atomic(path, json.dumps(data, indent=1).encode() + b"\n")

    @classmethod
    def load(cls, path: Path) -> NetworkState:
        try:
            data = _read_json(path, "network state")
        except FileNotFoundError:
            raise StateError(
                f"this node has not joined a network ({path} does not exist): run `tunnelmesh join <token>`, "
                "or `tunnelmesh init` to make a new network"
            ) from None
        try:
            if not isinstance(data, dict) or not isinstance(data.get("url"), str):
                raise MembershipError("expected an object with url, network and member")
            network = NetworkInfo.from_wire(data.get("network"))
            member = MemberEntry.from_wire(data.get("member"), network)
            expected = data.get("policy_expected", 0)  # absent: joined before the packet filter
            if isinstance(expected, bool) or not isinstance(expected, int) or expected < 0:
                raise MembershipError("policy_expected: expected an integer of at least 0")
        except MembershipError as exc:
            raise damaged(path, "network state", f"does not verify: {exc}") from None
        return cls(data["url"], network, member, expected)


REVOCATIONS_FILE = "revocations.json"
BINDINGS_FILE = "bindings.json"
POLICY_FILE = "policy.json"


def _revocations_path(cache: Path) -> Path:
    return cache.with_name(REVOCATIONS_FILE)


def _bindings_path(cache: Path) -> Path:
    return cache.with_name(BINDINGS_FILE)


def _policy_path(cache: Path) -> Path:
    return cache.with_name(POLICY_FILE)


def _read_revocation_wires(path: Path) -> list[Any]:
    try:
        data = _read_json(path, "revocations")
    except FileNotFoundError:
        return []
    if not isinstance(data, list):
        raise damaged(path, "revocations", "not a list")
    return data


def _read_bindings(path: Path) -> tuple[dict[str, bytes], dict[bytes, int]]:
    try:
        data = _read_json(path, "bindings")
    except FileNotFoundError:
        return {}, {}
    try:
        return parse_bindings(data)
    except MembershipError as exc:
        raise damaged(path, "bindings", str(exc)) from None


def load_policy(cache: Path, network: NetworkInfo) -> PolicyRecord | None:
    """The kept network policy (beside the peer map cache at `cache`), verified; None if
    there is none, or only one of a network this node left (a revoked node that joined
    another). One that does not verify is an error: with it lost, a coordinator could
    hand the node an older policy."""
    path = _policy_path(cache)
    try:
        data = _read_json(path, "network policy")
    except FileNotFoundError:
        return None
    body = data.get("body") if isinstance(data, dict) else None
    if isinstance(body, dict) and body.get("network") != network.network:
        return None
    try:
        return PolicyRecord.from_wire(data, network)
    except MembershipError as exc:
        raise damaged(path, "network policy", str(exc)) from None


def load_peer_map(path: Path, state: NetworkState) -> tuple[PeerMap, list[str]]:
    """The kept revocations, bindings and network policy, and the cached peer map
    (re-verified record by record), and what was refused in them. A damaged revocations,
    bindings or policy file is an error, not ignored: they are what no coordinator can
    give back."""
    peer_map = PeerMap(state.network, state.member.wg_key)
    changes = MapChanges()
    peer_map.add_revocations(_read_revocation_wires(_revocations_path(path)), changes)
    peer_map.bindings, peer_map.authorized = _read_bindings(_bindings_path(path))
    peer_map.policy = load_policy(path, state.network)
    if peer_map.binding_clash(state.member) is None:
        peer_map.bind(state.member, changes)
    rejected = changes.rejected
    try:
        cached = _read_json(path, "peer map cache")
    except FileNotFoundError:
        return peer_map, rejected
    except StateError as exc:
        return peer_map, [*rejected, f"{exc}; ignored"]
    try:
        rejected += peer_map.apply(cached).rejected
    except MembershipError as exc:
        rejected.append(f"peer map cache {path} ignored: {exc}")
    return peer_map, rejected


def save_peer_map(path: Path, peer_map: PeerMap) -> None:
    """Write the cache, after merging its revocations into the kept ones and writing the
    bindings and the network policy (all first: the cache may be lost, they may not)."""
    save_revocations(_revocations_path(path), peer_map.revocations.values())
    save_bindings(_bindings_path(path), peer_map)
    if peer_map.policy is not None:  # the peer map only ever replaces it with a newer one
        _save_if_changed(_policy_path(path), peer_map.policy.to_wire(), "network policy")
    write_atomic(path, json.dumps(peer_map.to_cache()).encode() + b"\n")


def keep_policy(cache: Path, network: NetworkInfo, record: PolicyRecord) -> None:
    """Keep `record` (the admin's machine, on signing it) in place of a kept policy of a
    lower version: what the admin re-sends to a coordinator that lost it, and puts in invites."""
    kept = load_policy(cache, network)
    if kept is None or kept.version < record.version:
        _save_if_changed(_policy_path(cache), record.to_wire(), "network policy")


def _save_if_changed(path: Path, wire: Any, what: str) -> None:
    try:
        current = _read_json(path, what)
    except (FileNotFoundError, StateError):
        current = None
    if current != wire:
        write_atomic(path, json.dumps(wire, indent=1).encode() + b"\n")


def save_bindings(path: Path, peer_map: PeerMap) -> None:
    """The bindings as the peer map holds them now (it started from this file and only
    rebinds on a revocation), written when they changed."""
    _save_if_changed(path, peer_map.bindings_to_wire(), "bindings")


@contextmanager
def invite_ledger(path: Path, network: NetworkInfo) -> Iterator[InviteLedger]:
    """The admin's invite ledger, locked for one read-modify-write (`invite` on the command
    line and the daemon's admitter both write it) and written back atomically if changed."""
    lock_fd = os.open(path.with_name(f".{path.name}.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW,
                      0o600)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX)
        try:
            wire = _read_json(path, "invite ledger")
        except FileNotFoundError:
            wire = {"invites": [], "admitted": {}}
        try:
            ledger = InviteLedger.from_wire(wire, network)
        except MembershipError as exc:
            raise damaged(path, "invite ledger", str(exc)) from None
        before = json.dumps(ledger.to_wire())
        yield ledger
        after = ledger.to_wire()
        if json.dumps(after) != before:
            write_atomic(path, json.dumps(after, indent=1).encode() + b"\n", secret=True)
    finally:
        os.close(lock_fd)


def save_revocations(path: Path, revocations: Iterable[Revocation]) -> None:
    """Merge into the kept revocations: what the file already holds stays."""
    kept = {json.dumps(wire, sort_keys=True): wire for wire in _read_revocation_wires(path)}
    before = len(kept)
    for revocation in revocations:
        wire = revocation.to_wire()
        kept.setdefault(json.dumps(wire, sort_keys=True), wire)
    if len(kept) != before or not path.exists():
        write_atomic(path, json.dumps(list(kept.values()), indent=1).encode() + b"\n")
