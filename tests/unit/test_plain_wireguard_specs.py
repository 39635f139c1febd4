"""Which peers the daemon treats as plain WireGuard (`PeerSpec.plain_wireguard`: WireGuard's
own keepalive and silence timers, docs/transports.md): devices admitted with `wg-export`
and static peers given by their WireGuard key alone, never a peer given by its identity."""

from __future__ import annotations

import ipaddress
from pathlib import Path

from actors.coordinator_client import device_spec
from actors.daemon import _static_peers
from tests.links import new_identity
from tests.unit.test_config import KEY_B, MINIMAL, load
from tunnelmesh.membership.records import DeviceEntry


def test_a_device_is_a_plain_wireguard_peer() -> None:
    device = DeviceEntry(network="net", name="phone", wg_key=bytes(range(32)), served_by="alpha",
                         ipv4=ipaddress.IPv4Address("100.100.0.9"), ipv6=ipaddress.IPv6Address("fd00::9"),
                         joined=1, admin_sig="")
    assert device_spec(device).plain_wireguard


def test_a_static_peer_is_plain_wireguard_only_when_given_by_its_key(tmp_path: Path) -> None:
    line = new_identity().public.to_line()
    config = load(tmp_path, MINIMAL
                  + f'\n[[peers]]\nname = "daemon"\nidentity = "{line}"\nmesh_ip = "100.100.0.2"\n'
                  + f'\n[[peers]]\nname = "phone"\nwireguard_public_key = "{KEY_B}"\nmesh_ip = "100.100.0.3"\n')
    specs = {spec.name: spec for spec in _static_peers(config, [None, None])}
    assert not specs["daemon"].plain_wireguard and specs["daemon"].fingerprint is not None
    assert specs["phone"].plain_wireguard and specs["phone"].fingerprint is None
