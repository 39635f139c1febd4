"""`tunnelmesh wg-export NAME`: admit a plain WireGuard device (a phone) to a coordinator
network and write the `wg-quick` config it needs (docs/exports.md).

The device gets a `DeviceEntry` (tunnelmesh.membership.records): its own X25519 key,
made here or given by the user (`--public-key`: the private key never leaves the
device), mesh addresses allocated like a member's, signed by the admin key, revocable
with `tunnelmesh revoke NAME`. One member serves it (`--via`, default this node): that
node peers with it over UDP like any plain WireGuard peer, under the packet filter;
other nodes keep its entry only for its name and addresses. The config's one peer is
that node, and its AllowedIPs are that node's mesh addresses only: the serving node does
not forward between peers (no member routes yet), so nothing else of the mesh would
answer through it, and a config claiming more would only send traffic into a void.
"""

from __future__ import annotations

import io
import ipaddress
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import segno
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from tunnelmesh import files
from tunnelmesh.config import ConfigError, load_config
from tunnelmesh.config.secret import read_network_secret
from tunnelmesh.fields import FieldError, parse_endpoint
from tunnelmesh.membership import (
    DeviceEntry,
    Entry,
    MembershipError,
    NetworkInfo,
    PeerMap,
    b64,
    check_name,
    parse_endpoints,
    unb64,
)
from tunnelmesh.network import Admin, NetworkError
from tunnelmesh.paths import Paths
from tunnelmesh.wireguard import derive_psk

#: The device keeps its NAT mapping open with this (seconds, as tunnelmesh members do): the
#: serving node has no address for it until its first handshake and cannot initiate.
KEEPALIVE = 25


@dataclass(frozen=True)
class WgExport:
    """What a device's wg-quick config says. The keys never show in a repr."""

    device: DeviceEntry
    server_name: str
    server_key: bytes
    server_addresses: tuple[str, ...]  # the serving node's mesh IPv4 and IPv6
    endpoint: str  # host:port the device sends to
    preshared_key: bytes = field(repr=False)
    private_key: bytes | None = field(default=None, repr=False)  # None: the user's own (--public-key)

    def config(self) -> str:
        """The wg-quick config: [Interface] with the device's key and mesh addresses, one
        [Peer] (the serving node). Without a private key (`--public-key`), a comment
        where the device's own goes."""
        device = self.device
        private = (f"PrivateKey = {b64(self.private_key)}" if self.private_key is not None
                   else "# PrivateKey = (this device's own private key: it never left the device)")
        return "\n".join([
            f"# tunnelmesh device {device.name}, served by {self.server_name} (network {device.network})",
            "[Interface]",
            private,
            f"Address = {device.ipv4}/32, {device.ipv6}/128",
            "",
            "[Peer]",
            f"# {self.server_name}: only its own mesh addresses are reachable through it",
            f"PublicKey = {b64(self.server_key)}",
            f"PresharedKey = {b64(self.preshared_key)}",
            f"Endpoint = {self.endpoint}",
            f"AllowedIPs = {self.server_addresses[0]}/32, {self.server_addresses[1]}/128",
            f"PersistentKeepalive = {KEEPALIVE}",
            "",
        ])

    def qr_text(self) -> str:
        """The config without its comments, for the QR code: the apps ignore them, and a
        shorter text is a smaller code (one that fits an 80-column terminal)."""
        return "\n".join(line for line in self.config().splitlines() if not line.startswith("#")) + "\n"

    def to_json(self) -> dict[str, Any]:
        device = self.device
        return {"name": device.name, "public_key": b64(device.wg_key),
                "private_key": b64(self.private_key) if self.private_key is not None else None,
                "ipv4": str(device.ipv4), "ipv6": str(device.ipv6), "served_by": self.server_name,
                "server_public_key": b64(self.server_key), "endpoint": self.endpoint,
                "allowed_ips": [f"{self.server_addresses[0]}/32", f"{self.server_addresses[1]}/128"],
                "config": self.config()}


def qr_code(text: str) -> str:
    """`text` as a QR code drawn in the terminal (what the WireGuard apps scan)."""
    out = io.StringIO()
    segno.make_qr(text, error="l").terminal(out=out, compact=True)  # never a Micro QR: the apps read only QR
    return out.getvalue()


def parse_public_key(text: str) -> bytes:
    """A WireGuard public key as `wg pubkey` prints it (base64 of 32 bytes, not all zeros)."""
    try:
        key = unb64(text.strip(), "the public key", 32)
    except MembershipError as exc:
        raise NetworkError(f"{exc} (give what `wg pubkey` prints)") from None
    if key == bytes(32):
        raise NetworkError("the public key is all zeros: not a WireGuard public key")
    return key


def free_host(network: NetworkInfo, peer_map: PeerMap, admitted: list[Entry]) -> int:
    """The lowest host number no admitted entry holds and no kept binding of a key still
    in the network holds (the coordinator refuses a taken one: then export again)."""
    used = {network.host_index(entry.ipv4) for entry in admitted}
    for binding, key in peer_map.bindings.items():
        if binding.startswith("ipv4:") and not peer_map.key_revoked(key):
            used.add(network.host_index(ipaddress.IPv4Address(binding[5:])))
    host = 1
    while host in used:
        host += 1
    network.host(host)  # refuses a host past the end of the network's range
    return host


def _refuse_a_static_mesh(paths: Paths) -> None:
    """A static mesh has no coordinator to admit a device to (Admin.load would only say
    "join or init"): say so, and what a static mesh does instead."""
    if paths.network_state.exists() or not paths.config.exists():
        return  # joined, or nothing here: Admin.load says what is missing
    try:
        static = load_config(paths.config, state_dir=paths.state_dir).coordinator is None
    except ConfigError:
        return  # Admin.load's own message stands
    if static:
        raise NetworkError(f"wg-export admits a device to a network with a coordinator; {paths.config} is a static "
                           "mesh (no [coordinator]): there, a plain WireGuard device is one more [[peers]] entry in "
                           "the nodes' configs, and `tunnelmesh show --wg` prints the [Peer] section it needs for "
                           "this node")


async def export_device(paths: Paths, name: str, *, via: str | None = None, endpoint: str | None = None,
                        public_key: str | None = None) -> WgExport:
    """Admit the device `name` (a new key made here, or `public_key`), served by the member
    `via` (default: this node), and return its config. The serving node's endpoint is
    `endpoint`, else the first address it registered with the coordinator."""
    check_name(name, "the device's name")
    _refuse_a_static_mesh(paths)
    admin = Admin.load(paths)
    network = admin.state.network
    private: bytes | None = None
    if public_key is None:
        made = X25519PrivateKey.generate()
        private, key = made.private_bytes_raw(), made.public_key().public_bytes_raw()
    else:
        key = parse_public_key(public_key)
    if endpoint is not None:
        try:
            parse_endpoint(endpoint)
        except FieldError as exc:
            raise NetworkError(f"--endpoint {endpoint!r}: {exc}") from None
    try:
        psk = derive_psk(read_network_secret(paths.network_secret))
    except ConfigError as exc:
        raise NetworkError(f"{exc}: the device needs the network's pre-shared key") from None
    async with admin.coordinator() as coordinator:
        peer_map, members = await admin.members(coordinator)
        server_name = via if via is not None else admin.state.member.name
        server = next((m for m in members if m.name == server_name), None)
        if server is None:
            names = ", ".join(sorted(m.name for m in members))
            raise NetworkError(f"no member {server_name!r} to serve the device (members: {names})")
        admitted: list[Entry] = [*members, *peer_map.devices.values()]
        taken = next((e for e in admitted if e.name == name or e.wg_key == key), None)
        if taken is not None:
            raise NetworkError(f"{taken.name!r} is admitted already with that name or key: revoke it first, or choose "
                               "another name")
        if endpoint is None:
            endpoint = _registered_endpoint(await coordinator.admin_map(), server.wg_key, network)
            if endpoint is None:
                raise NetworkError(f"the coordinator knows no address of {server.name} (is its daemon running?): "
                                   "give the one the device reaches it at with --endpoint HOST:PORT")
        device = DeviceEntry.create(admin.key, network, name, key, server.name, free_host(network, peer_map, admitted),
                                    int(time.time()))
        clash = peer_map.binding_clash(device)
        if clash is not None:
            raise NetworkError(f"{clash} is bound to another member's key (revoke that member first)")
        await coordinator.add_device(device.to_wire())
    return WgExport(device, server.name, server.wg_key, (str(server.ipv4), str(server.ipv6)), endpoint, psk, private)


def _registered_endpoint(raw_map: Any, wg_key: bytes, network: NetworkInfo) -> str | None:
    """The first address the member registered with the coordinator (the coordinator's word:
    only an address to send to, the handshake proves the node)."""
    try:
        endpoints = parse_endpoints(raw_map["endpoints"][b64(wg_key)])
    except (KeyError, TypeError, MembershipError):
        return None
    candidates = endpoints.candidates(network)
    return f"{candidates[0][0]}:{candidates[0][1]}" if candidates else None


def write_config(path: Path, export: WgExport) -> None:
    """The config to a file, 0600 (it holds the device's private key and the PSK)."""
    try:
        files.write_secret(path, export.config().encode())
    except files.FileError as exc:
        raise NetworkError(f"cannot write {path}: {exc}") from None
