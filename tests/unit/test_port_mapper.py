"""The port mapper actor's loop (actors/port_mapper.py) when an attempt fails in a way
no protocol module names (a library's bug, a gateway's odd answer): it stays alive, says
why once per distinct reason, withdraws the mapping, and maps again.

The gateway side is scripted (`_ask` overridden): in-process there is no gateway we may
send to (the host's default gateway is not ours); tests/e2e/test_port_mapping.py runs
the real one (miniupnpd) through the daemon.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque

import pytest

from actors import port_mapper
from actors.port_mapper import PortMapper
from actors.runtime import Supervisor
from tests.support.wait import until
from tunnelmesh.nat.portmap.client import UPNP, Mapping, PortMapError
from tunnelmesh.nat.report import MAPPED, Candidate

GRANTED = Mapping(UPNP, "192.0.2.1", "192.0.2.10", 51820, "203.0.113.7", 51820, 0)  # renewed after MIN_RENEW


class ScriptedMapper(PortMapper):
    """Each attempt takes the next outcome: a Mapping is granted, an exception raised."""

    def __init__(self, outcomes: list[Mapping | Exception], seen: list[Candidate | None]) -> None:
        super().__init__(51820, [seen.append])
        self.outcomes = deque(outcomes)
        self.attempts = 0

    async def _ask(self) -> Mapping:
        self.attempts += 1
        outcome = self.outcomes.popleft() if self.outcomes else PortMapError({UPNP: "script over"})
        if isinstance(outcome, Exception):
            raise outcome
        return outcome


def test_unexpected_errors_neither_end_the_loop_nor_repeat_in_the_log(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(port_mapper, "RETRY_FIRST", 0.01)
    monkeypatch.setattr(port_mapper, "MIN_RENEW", 0.01)
    caplog.set_level(logging.INFO, logger="tunnelmesh.nat")
    seen: list[Candidate | None] = []
    outcomes: list[Mapping | Exception] = [
        KeyError("NewExternalIPAddress"), KeyError("NewExternalIPAddress"),  # one reason, twice
        GRANTED,  # mapped
        RuntimeError("Session is closed"),  # the renewal fails oddly: the mapping is withdrawn
        GRANTED,  # and made again
    ]

    async def scenario() -> None:
        supervisor = Supervisor()
        mapper = supervisor.add(ScriptedMapper(outcomes, seen))
        task = asyncio.create_task(supervisor.run())
        try:
            await until("the script played out", lambda: mapper.attempts > len(outcomes))
            assert mapper.task_failures == 0 and mapper.restarts == 0
            assert mapper.error == f"{UPNP}: script over"  # the loop still runs, now failing as expected
        finally:
            supervisor.shutdown("test over")
            await task

    asyncio.run(scenario())
    mapped = Candidate("203.0.113.7", 51820, MAPPED)
    assert seen == [mapped, None, mapped, None]
    said = [record.getMessage() for record in caplog.records if "no port mapping" in record.getMessage()]
    assert said == ["nat: no port mapping: unexpected KeyError: 'NewExternalIPAddress'",
                    "nat: no port mapping: unexpected RuntimeError: Session is closed",
                    f"nat: no port mapping: {UPNP}: script over"]
    unexpected = [record for record in caplog.records if "unexpected" in record.getMessage()]
    assert all(record.exc_info for record in unexpected)  # with the traceback: a bug to report
