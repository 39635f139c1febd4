"""`tunnelmesh wg-export` against a real coordinator (aiohttp on 127.0.0.1, SQLite) and
the real admin commands: the device is admitted at a free address, served in the map,
refused when it clashes, and revoked like any member."""

from __future__ import annotations

import asyncio
import re
import secrets
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.support.coordinator import SECRET, World, now, serving, snapshot
from tunnelmesh import network as admin_commands
from tunnelmesh.coordinator.client import Coordinator, CoordinatorError
from tunnelmesh.exports.wg import export_device
from tunnelmesh.membership import DeviceEntry, PeerMap, RequestAuth, b64, device_body
from tunnelmesh.network import NetworkError
from tunnelmesh.wireguard import derive_psk

PHONE_KEY = bytes(range(1, 33))


@pytest.fixture(scope="module")
def world() -> World:
    return World.create()


def device(world: World, *, name: str = "phone", key: bytes = PHONE_KEY, served_by: str = "admin", host: int = 5,
           signer: Any = None) -> dict[str, Any]:
    ipv4, ipv6 = world.network.host(host)
    body = device_body(world.network.network, name, key, served_by, ipv4, ipv6, now())
    return {"body": body, "admin_sig": (signer or world.admin).sign("device", body)}


def test_a_device_is_admitted_served_in_the_map_and_revoked_like_a_member(tmp_path: Path, world: World) -> None:
    async def scenario() -> None:
        async with serving(tmp_path / "coordinator.db", world, admit=False) as served:
            paths = served.machine.paths
            with pytest.raises(NetworkError, match="knows no address of admin"):  # nothing registered
                await export_device(paths, "phone")
            made = await export_device(paths, "phone", endpoint="192.0.2.1:51820")
            assert made.device.ipv4 == world.network.host(2)[0]  # host 1 is the admin node's
            assert made.private_key is not None and made.preshared_key == derive_psk(SECRET)
            assert (made.server_name, made.server_key) == ("admin", world.nodes[0].public.wg_public_key)
            given = await export_device(paths, "tablet", via="admin", endpoint="192.0.2.1:51820",
                                        public_key=b64(PHONE_KEY))
            assert given.private_key is None and given.device.wg_key == PHONE_KEY
            assert given.device.ipv4 == world.network.host(3)[0]
            with pytest.raises(NetworkError, match="admitted already"):
                await export_device(paths, "phone", endpoint="192.0.2.1:51820")
            with pytest.raises(NetworkError, match="no member 'nobody'"):
                await export_device(paths, "laptop", via="nobody", endpoint="192.0.2.1:51820")

            async with Coordinator(served.url, admin=world.admin) as admin:
                node = PeerMap(world.network, world.nodes[1].public.wg_public_key)
                changes = node.apply(await admin.admin_map())
            assert {d.name for d in changes.devices_added} == {"phone", "tablet"}
            assert node.devices[PHONE_KEY].served_by == "admin"

            revocation = await admin_commands.revoke(paths, "tablet")
            assert revocation.wg_key == PHONE_KEY and revocation.ssh is None
            async with Coordinator(served.url, admin=world.admin) as admin:
                changes = node.apply(await admin.admin_map())
            assert [d.name for d, _ in changes.devices_removed] == ["tablet"]
            assert await served.store.member(b64(PHONE_KEY)) is None

    asyncio.run(scenario())


def test_the_coordinator_refuses_a_device_that_clashes_and_changes_nothing(tmp_path: Path, world: World) -> None:
    db = tmp_path / "coordinator.db"

    async def refused(admin: Coordinator, wire: dict[str, Any], status: int, pattern: str) -> None:
        before = snapshot(db)
        with pytest.raises(CoordinatorError) as info:
            await admin.add_device(wire)
        assert info.value.status == status and re.search(pattern, str(info.value)), str(info.value)
        assert snapshot(db) == before

    async def scenario() -> None:
        async with serving(db, world, admit=False) as served:
            async with Coordinator(served.url, admin=world.admin) as admin:
                await refused(admin, device(world, host=1), 409, "was taken meanwhile")
                await refused(admin, device(world, key=world.nodes[0].public.wg_public_key), 409, "already a member")
                await refused(admin, device(world, served_by="nobody"), 409, "no member 'nobody'")
                await refused(admin, device(world, signer=World.create().admin), 403, "does not verify")
                await admin.add_device(device(world))
                await refused(admin, device(world, key=bytes(range(3, 35)), host=7), 409, "name 'phone' is taken")
                await refused(admin, device(world, name="tablet", key=bytes(range(2, 34)), served_by="phone", host=6),
                              409, "a device serves nothing")
            # A request signed in the device's name is refused before any signature check.
            auth = RequestAuth(b64(PHONE_KEY), now(), secrets.token_hex(16), bytes(64))
            async with aiohttp.ClientSession() as http:
                async with http.get(served.url + "/v1/map", headers={"Authorization": auth.header()}) as response:
                    answer = await response.json()
            assert response.status == 403 and "plain WireGuard device" in answer["error"], answer
            assert DeviceEntry.from_wire((await served.store.member(b64(PHONE_KEY))).entry, world.network).name == "phone"

    asyncio.run(scenario())
