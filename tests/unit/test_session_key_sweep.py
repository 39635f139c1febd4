"""Session keys in nothing a daemon writes or shows (issue 17, part 4).

The secret sweep (tests/e2e/test_secret_sweep.py) cannot seek session keys: they exist
only inside the daemons. Here two whole daemons run in one process and in virtual time
(tests/support/memnet.py, as tests/unit/test_two_nodes_in_process.py), every logger at
DEBUG, and every transport key the handshakes derive is recorded as it is made (the
core's `derive_keys`, wrapped). After handshakes, a rekey, pings and a peer failing,
everything the daemons logged, every event on their buses and every control reply
(`status`, `peers`, `ping`) is searched for those keys and the static keys, in raw, hex
and base64 forms: none may appear.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest

from actors.messages import PeerSpec, to_json
from actors.runtime import Leftovers
from tests.support.membership import identities
from tests.support.memnet import Daemon, Net, VirtualClock, VirtualLoop
from tests.support.secret_search import search
from tests.support.wire import A_ADDR, A_IP, B_ADDR, B_IP
from tunnelmesh.identity import NodeIdentity
from tunnelmesh.wireguard import noise, peer
from tunnelmesh.wireguard.constants import REKEY_AFTER_TIME


def spec(name: str, identity: NodeIdentity, ip: str, endpoint: tuple[str, int] | None) -> PeerSpec:
    return PeerSpec(name=name, mesh_ip=ipaddress.IPv4Address(ip), fingerprint=identity.fingerprint,
                    wg_key=identity.public.wg_public_key, allowed_ips=(ipaddress.ip_network(f"{ip}/32"),),
                    endpoint=endpoint, persistent_keepalive=0, candidates=(endpoint,) if endpoint else ())


@pytest.fixture
def session_keys(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[bytes]]:
    """Every transport key the core derives while the test runs."""
    made: list[bytes] = []

    def recording(state: noise.NoiseState, *, initiator: bool) -> tuple[bytes, bytes]:
        keys = noise.derive_keys(state, initiator=initiator)
        made.extend(keys)
        return keys

    monkeypatch.setattr(peer, "derive_keys", recording)
    yield made


def test_no_session_key_in_any_log_event_or_control_reply(session_keys: list[bytes],
                                                         caplog: pytest.LogCaptureFixture) -> None:
    a_id, b_id = identities()[:2]
    shown: list[Any] = []  # every control reply, as the socket would send it

    async def scenario(net: Net) -> None:
        leftovers = Leftovers()
        a = Daemon(net, "a", a_id, A_ADDR, A_IP, [spec("b", b_id, B_IP, B_ADDR)], seed=11)
        b = Daemon(net, "b", b_id, B_ADDR, B_IP, [spec("a", a_id, A_IP, None)], seed=12)
        b_running = asyncio.ensure_future(b.node.run())
        await net.run_for(0.5)
        a_running = asyncio.ensure_future(a.node.run())
        await net.run_until(lambda: bool(a.bus_events("handshake")), 2.0, "a handshake")

        async def control(node: Daemon, command: str, **fields: Any) -> None:
            reply = await net.complete(node.api.handlers()[command](fields), 10.0, f"{node.name}: {command}")
            shown.append(to_json(reply))

        for node, other in ((a, "b"), (b, "a")):
            await control(node, "ping", peer=other, timeout=2.0)
            await control(node, "status")
            await control(node, "peers")
        await net.run_for(REKEY_AFTER_TIME + 10.0)  # a rekey: new keys, derived and used
        await control(a, "ping", peer="b", timeout=2.0)
        net.block("udp")  # the peer goes quiet: handshakes retried and given up, logged
        await control(a, "ping", peer="b", timeout=2.0)
        await net.run_for(120.0)
        for node in (a, b):
            await control(node, "status")
            shown.extend(node.bus_events())
            assert await net.complete(node.api.down({}), 2.0, f"{node.name}: down") == "stopping"
        await net.run_until(lambda: a_running.done() and b_running.done(), 5.0, "both daemons stopped")
        assert await leftovers.found() == []

    caplog.set_level(logging.DEBUG)
    clock = VirtualClock()
    with asyncio.Runner(loop_factory=lambda: VirtualLoop(clock)) as runner:
        loop = runner.get_loop()
        assert isinstance(loop, VirtualLoop)
        runner.run(scenario(Net(clock, loop)))

    assert len(session_keys) >= 8, "two handshakes at least (a rekey), both sides' keys recorded"
    secrets = {f"session key {i}": key for i, key in enumerate(session_keys)}
    for name, identity in (("a", a_id), ("b", b_id)):
        secrets[f"{name}'s X25519 private key"] = identity.static_private
    written = "\n".join(f"{r.levelname} {r.name}: {r.getMessage()}\n{r.exc_text or ''}" for r in caplog.records)
    everything = (written + "\n" + json.dumps(shown, default=str)).encode()
    assert caplog.records and shown  # something was said: the search below has text to search
    assert search(everything, secrets) == []
    assert search(everything + session_keys[-1].hex().encode(), secrets)  # and it can find one
