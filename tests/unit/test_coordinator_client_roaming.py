"""A node whose address went away (it roamed to another network) drops its coordinator
session instead of registering on it: the session's connections may be bound to the old
address and would hang until a timeout (issue 18, found by tests/e2e/test_nat_recovery.py).
A new session, or an address only added, registers as before. No network: the
coordinator is a stand-in that records registers, the machine's addresses are given."""

from __future__ import annotations

import asyncio
import ipaddress
from pathlib import Path
from typing import Any

import pytest

import actors.coordinator_client as coordinator_client
from actors.control import EventBus
from actors.coordinator_client import CoordinatorClient
from actors.runtime import Actor
from tests.support.membership import World
from tunnelmesh.coordinator.client import CoordinatorError
from tunnelmesh.membership import PeerMap
from tunnelmesh.netstate import NetworkState

OLD, NEW = ipaddress.ip_interface("198.51.100.2/29"), ipaddress.ip_interface("198.51.100.18/29")


class RegisterRecorder:
    """Stands in for a coordinator session: what was registered on it."""

    def __init__(self) -> None:
        self.registered: list[list[str]] = []

    async def register(self, listen_port: int, addresses: list[str], **offers: Any) -> dict[str, Any]:
        self.registered.append(addresses)
        return {}


class IdleMesh(Actor):
    name = "mesh"

    async def handle(self, message: Any) -> None:
        return None


@pytest.fixture
def client(tmp_path: Path) -> CoordinatorClient:
    world = World.create()
    state = NetworkState("https://coordinator.example:7400", world.network, world.entry(0))
    peer_map = PeerMap(world.network, world.wg(0))
    made = CoordinatorClient(state, world.nodes[0], peer_map, IdleMesh(), EventBus(),  # type: ignore[arg-type]
                             cache_path=tmp_path / "peermap.json", secret_path=tmp_path / "secret",
                             listen_port=51820, on_revoked=lambda why: None)
    made.lan = (OLD,)
    return made


def addresses_now(monkeypatch: pytest.MonkeyPatch, *interfaces: ipaddress.IPv4Interface) -> None:
    async def local_interfaces(tunnel: str) -> list[ipaddress.IPv4Interface]:
        return list(interfaces)
    monkeypatch.setattr(coordinator_client, "local_interfaces", local_interfaces)


def test_a_session_in_use_is_dropped_once_an_address_went_away(client: CoordinatorClient,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    session = RegisterRecorder()
    client._coordinator = session  # type: ignore[assignment]
    addresses_now(monkeypatch, NEW)
    with pytest.raises(CoordinatorError, match="198.51.100.2 went away"):
        asyncio.run(client._register(session))  # type: ignore[arg-type]
    assert session.registered == [] and client.lan == (OLD,)  # the next session sees the change
    fresh = RegisterRecorder()
    asyncio.run(client._register(fresh))  # type: ignore[arg-type]
    assert fresh.registered == [["198.51.100.18:51820"]] and client.lan == (NEW,)


def test_an_address_only_added_registers_on_the_same_session(client: CoordinatorClient,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    session = RegisterRecorder()
    client._coordinator = session  # type: ignore[assignment]
    addresses_now(monkeypatch, OLD, NEW)
    asyncio.run(client._register(session))  # type: ignore[arg-type]
    assert session.registered == [["198.51.100.2:51820", "198.51.100.18:51820"]]
