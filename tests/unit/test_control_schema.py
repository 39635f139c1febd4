"""The control schema (docs/control.md): every status and event type round-trips through
the socket's JSON, replies carry the version, and JSON that does not fit is refused with
the field's name. Also the API end to end over a real socket: status, the events stream
and the count of events a slow subscriber lost."""

from __future__ import annotations

import asyncio
import ipaddress
import json
from collections import Counter
from dataclasses import fields, is_dataclass
from pathlib import Path
from types import UnionType
from typing import Any, Union, get_args, get_origin, get_type_hints

import pytest
from hypothesis import given, strategies as st

from actors import messages
from actors.control import EVENT_QUEUE, ControlServer, EventBus
from actors.control_api import ControlApi
from actors.links import Transports
from actors.messages import (
    CONTROL_VERSION, EVENTS, ControlSchemaError, Event, HandshakeDone, PathChanged, PathStatus, Peers, PeerStatus,
    PingResult, Identity, Status, Subscribed, WhoAmI, from_json, to_json,
)
from actors.runtime import Actor, Supervisor
from tunnelmesh import control_client
from tunnelmesh.control_client import ControlError, _versioned

#: The replies, and every part of one (each status type is named ...Status).
REPLIES = [Peers, PingResult, Subscribed, messages.Netcheck] + [
    cls for name, cls in vars(messages).items() if name.endswith("Status") and is_dataclass(cls)]


def instances(hint: Any) -> st.SearchStrategy[Any]:
    """Any value of `hint`, a type of the control schema (finite floats: JSON has no NaN)."""
    origin = get_origin(hint)
    if origin in (Union, UnionType):
        return st.one_of(*(instances(option) for option in get_args(hint)))
    if origin is tuple:
        items = get_args(hint)
        if len(items) == 2 and items[1] is Ellipsis:
            return st.lists(instances(items[0]), max_size=3).map(tuple)
        return st.tuples(*(instances(item) for item in items))  # fixed length: an address
    if origin is dict:
        return st.dictionaries(st.text(max_size=8), instances(get_args(hint)[1]), max_size=3)
    if hint is type(None):
        return st.none()
    if hint is float:
        return st.floats(allow_nan=False, allow_infinity=False)
    if hint in (str, int, bool):
        return st.from_type(hint)
    hints = get_type_hints(hint)
    return st.builds(hint, **{f.name: instances(hints[f.name]) for f in fields(hint)})


@pytest.mark.parametrize("cls", [*EVENTS.values(), *REPLIES], ids=lambda cls: cls.__name__)
@given(data=st.data())
def test_every_event_and_reply_round_trips_through_the_sockets_json(cls: type, data: st.DataObject) -> None:
    obj = data.draw(instances(cls))
    wire = json.loads(json.dumps(to_json(obj)))
    assert from_json(Event if issubclass(cls, Event) else cls, wire) == obj
    if issubclass(cls, Event):
        assert wire["event"] == cls.kind


def test_the_replies_cover_status_and_the_events_are_every_event_class() -> None:
    assert {Status, Peers, PeerStatus, PathStatus, PingResult, Subscribed} <= set(REPLIES)
    event_classes = {cls for cls in vars(messages).values()
                     if isinstance(cls, type) and issubclass(cls, Event) and cls is not Event}
    assert set(EVENTS.values()) == event_classes  # an event left out of EVENTS could not be read back
    assert len({cls.kind for cls in event_classes}) == len(event_classes)


def test_status_peers_and_the_subscription_carry_the_control_version() -> None:
    assert CONTROL_VERSION == 1
    for reply in (Status, Peers, Subscribed):  # a field with the version as its default: set by every reply
        assert {f.name: f.default for f in fields(reply)}["control_version"] == CONTROL_VERSION
    assert to_json(Peers(peers=())) == {"peers": [], "control_version": CONTROL_VERSION}


def test_json_that_does_not_fit_is_refused_naming_the_field() -> None:
    path = to_json(PathChanged("b", PathStatus("ssh", "ssh 192.0.2.2:2222"), "udp", "udp failing", 1.5))
    with pytest.raises(ControlSchemaError, match=r"unknown event kind 'teleported'.*daemon newer"):
        from_json(Event, {**path, "event": "teleported"})
    with pytest.raises(ControlSchemaError, match=r"Event\(path\): unknown field 'colour'"):
        from_json(Event, {**path, "colour": "red"})
    with pytest.raises(ControlSchemaError, match=r"Event\(path\)\.path: missing field 'endpoint'"):
        from_json(Event, {**path, "path": {"rung": "ssh"}})
    with pytest.raises(ControlSchemaError, match=r"Event\(path\)\.at: expected a number, got 'soon'"):
        from_json(Event, {**path, "at": "soon"})
    with pytest.raises(ControlSchemaError, match=r"expected a 'handshake' event, got 'path'"):
        from_json(HandshakeDone, path)
    with pytest.raises(ControlSchemaError, match=r"Subscribed\.control_version: expected an integer, got True"):
        from_json(Subscribed, {"control_version": True})
    with pytest.raises(ControlSchemaError, match=r"Peers\.peers: expected list, got dict"):
        from_json(Peers, {"peers": {}, "control_version": 1})


def test_the_client_refuses_a_reply_of_another_control_version_by_its_number() -> None:
    with pytest.raises(ControlError, match="speaks control version 2, this client 1"):
        _versioned(Peers, {"peers": [], "control_version": 2, "renamed": True})
    with pytest.raises(ControlError, match="does not fit control version 1: Peers: unknown field 'new'"):
        _versioned(Peers, {"peers": [], "control_version": 1, "new": 0})
    assert _versioned(Peers, {"peers": [], "control_version": 1}) == Peers(peers=())


def test_the_bus_takes_typed_events_only() -> None:
    with pytest.raises(TypeError, match="an event is one of the Event dataclasses"):
        EventBus().publish({"event": "handshake", "peer": "b"})  # type: ignore[arg-type]


# --- the API over a real socket ---------------------------------------------------------


class _Identity(Actor):
    name = "identity"

    async def handle(self, message: Any) -> Any:
        assert isinstance(message, WhoAmI)
        return Identity("SHA256:abc", "ssh-ed25519 AAAA a", "d2c=")


class _Session(Actor):
    def __init__(self, status: PeerStatus) -> None:
        super().__init__()
        self.name = f"session:{status.name}"
        self.status = status

    async def handle(self, message: Any) -> Any:
        return self.status


class _Mesh(Actor):
    name = "mesh"

    def __init__(self, sessions: list[_Session]) -> None:
        super().__init__()
        self.sessions = sessions

    async def handle(self, message: Any) -> Any:
        return self.sessions


class _Drops:
    offloads = "tun csum tso, udp gso"

    def __init__(self, drops: dict[str, int], port: int = 0) -> None:
        self.drops, self.port = Counter(drops), port


PEER = PeerStatus(
    name="b", mesh_ip="100.100.0.2", fingerprint=None, path=PathStatus("udp", "udp 192.0.2.2:51820"), state="up",
    rung_changes=1, probe_interval=20.0, transitions=(PathChanged("b", PathStatus("udp", "udp 192.0.2.2:51820"),
                                                                  "relay", "peer moved", 1700000000.5),),
    last_handshake=1700000001.0, last_handshake_ago=3.5, rx_bytes=10, tx_bytes=20, persistent_keepalive=0,
    why_not_better=None,
)


async def _request(path: Path, line: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, Any]:
    reader, writer = await asyncio.open_unix_connection(str(path))
    writer.write(line)
    return reader, writer, json.loads(await reader.readline())


def test_status_and_events_over_the_socket_and_a_slow_subscriber_counted(tmp_path: Path) -> None:
    async def main() -> None:
        socket_path = tmp_path / "control.sock"
        bus = EventBus()
        supervisor = Supervisor()
        identity, mesh = supervisor.add(_Identity()), supervisor.add(_Mesh([supervisor.add(_Session(PEER))]))
        api = ControlApi(
            name="a", interface="tm0", mesh_ip=ipaddress.IPv4Address("100.100.0.1"), mesh_ipv6=None,
            started=1700000000.0, identity=identity, mesh=mesh, device=_Drops({"bad mac": 2}),  # type: ignore[arg-type]
            datapath=_Drops({"no route": 1}, port=51820), bus=bus, shutdown=supervisor.shutdown,  # type: ignore[arg-type]
            actors=supervisor.stats, transports=Transports(),
        )
        supervisor.add(ControlServer(socket_path, api.handlers(), bus))
        running = asyncio.ensure_future(supervisor.run())
        for _ in range(1000):  # the server binds within a few turns of the loop
            if socket_path.exists():
                break
            await asyncio.sleep(0)
        reader, writer, subscribed = await _request(socket_path, b'{"cmd":"events"}\n')
        assert subscribed == {"ok": True, "result": {"control_version": CONTROL_VERSION}}
        event = HandshakeDone(peer="b", initiator=True, rung="udp")
        bus.publish(event)
        assert from_json(Event, json.loads(await reader.readline())) == event
        slow = bus.subscribe()  # never read: loses what does not fit its queue
        for _ in range(EVENT_QUEUE + 3):
            bus.publish(event)
        bus.unsubscribe(slow)
        writer.close()

        _, writer, reply = await _request(socket_path, b'{"cmd":"status"}\n')
        writer.close()
        status = from_json(Status, reply["result"])
        assert status.control_version == CONTROL_VERSION and status.peers == (PEER,)
        assert status.node.events_dropped == 3 + 3  # the slow one, and the stream (published in one go)
        assert (status.node.name, status.node.listen_port, status.node.mode) == ("a", 51820, "static")
        assert (status.node.fingerprint, status.node.mesh_ipv6) == ("SHA256:abc", None)
        assert status.drops == {"bad mac": 2, "no route": 1}
        assert status.node.transports.node_relays == () and status.node.coordinator is None
        # Every actor's mailbox, the peer sessions summed into one entry.
        assert [a.name for a in status.node.actors] == ["identity", "mesh", "control", "sessions"], status.node.actors
        assert all(a.dropped == a.restarts == a.task_failures == 0 for a in status.node.actors)

        # The CLI's client: the subscription's version checked, each event typed.
        stream = control_client.events(socket_path)
        first = asyncio.ensure_future(asyncio.to_thread(next, stream))
        while not first.done():  # until it has subscribed and taken one
            bus.publish(event)
            await asyncio.sleep(0.01)
        assert first.result() == event
        stream.close()

        _, writer, reply = await _request(socket_path, b'{"cmd":"peers"}\n')
        writer.close()
        assert from_json(Peers, reply["result"]) == Peers(peers=(PEER,))
        _, writer, reply = await _request(socket_path, b'{"cmd":"down"}\n')
        writer.close()
        assert reply == {"ok": True, "result": "stopping"}
        assert (await running).reason == "down requested"
        assert not socket_path.exists()

    asyncio.run(main())
