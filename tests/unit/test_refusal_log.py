"""RefusalLog: refusals (SSH rung, relay) are logged once per (address, cause) per
minute, so a scanner that makes up a new key for every try cannot flood the log."""

from __future__ import annotations

import logging

import pytest

from tunnelmesh.links import REFUSAL_LOG_ENTRIES, REFUSAL_LOG_INTERVAL, RefusalLog

LOG = "tunnelmesh.test.refusals"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    def wall(self) -> float:
        return 1_700_000_000.0 + self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOG]


def test_one_line_per_address_and_cause_per_interval_with_the_count_of_the_rest(
        clock: Clock, caplog: pytest.LogCaptureFixture) -> None:
    refusals = RefusalLog(logging.getLogger(LOG), clock)
    with caplog.at_level(logging.WARNING, logger=LOG):
        for i in range(100):  # a new key each time, one address
            refusals("203.0.113.9", "key of no current member", f"refused key {i} from 203.0.113.9")
        refusals("203.0.113.9", "port forwarding", "refused port forwarding from 203.0.113.9")
        refusals("198.51.100.4", "key of no current member", "refused key x from 198.51.100.4")
        assert lines(caplog) == ["refused key 0 from 203.0.113.9", "refused port forwarding from 203.0.113.9",
                                 "refused key x from 198.51.100.4"]
        clock.now += REFUSAL_LOG_INTERVAL - 1
        refusals("203.0.113.9", "key of no current member", "still within the interval")
        clock.now += 1
        refusals("203.0.113.9", "key of no current member", "refused key 101 from 203.0.113.9")
        assert lines(caplog)[-1] == "refused key 101 from 203.0.113.9 (and 100 more times since)"
        assert "still within the interval" not in " ".join(lines(caplog))


def test_memory_is_bounded_by_the_entries_kept(clock: Clock, caplog: pytest.LogCaptureFixture) -> None:
    refusals = RefusalLog(logging.getLogger(LOG), clock)
    with caplog.at_level(logging.WARNING, logger=LOG):
        for i in range(REFUSAL_LOG_ENTRIES * 3):
            refusals(f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}", "cause", "refused")
    assert len(refusals._last) <= REFUSAL_LOG_ENTRIES
    assert len(lines(caplog)) == REFUSAL_LOG_ENTRIES * 3  # each address once: new addresses are logged
