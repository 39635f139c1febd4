"""What the TUI computes (tunnelmesh/tui/model.py): rates from successive status polls,
the search filter, the reconnect back-off, and the words it shows."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from actors.messages import FilterStatus, PathChanged, PathStatus, PeerStatus
from tunnelmesh.tui import model


def peer(name: str, mesh_ip: str = "100.64.0.2") -> PeerStatus:
    return PeerStatus(name=name, mesh_ip=mesh_ip, fingerprint=None, path=None, state="up", rung_changes=0,
                      probe_interval=20.0, transitions=(), last_handshake=None, last_handshake_ago=None, rx_bytes=0,
                      tx_bytes=0, persistent_keepalive=0, why_not_better=None)


# --- rates -------------------------------------------------------------------------------


def test_rates_are_the_counters_growth_over_the_time_between_polls() -> None:
    meter = model.RateMeter()
    assert meter.sample("b", 10.0, 1000, 500) is None  # one sample: no rate yet
    assert meter.rates("b") is None
    assert meter.sample("b", 12.0, 5000, 700) == model.Rates(rx=2000.0, tx=100.0)
    assert meter.rates("b") == model.Rates(2000.0, 100.0)
    assert meter.sample("b", 12.5, 5000, 700) == model.Rates(0.0, 0.0)
    assert list(meter.history["b"]) == [2100.0, 0.0]  # rx+tx per poll, for the sparkline


def test_counters_that_go_back_start_over_instead_of_a_negative_rate() -> None:
    meter = model.RateMeter()
    meter.sample("b", 1.0, 10_000, 10_000)
    assert meter.sample("b", 2.0, 300, 20_000) is None  # the daemon restarted: rx counts from 0 again
    assert meter.rates("b") is None
    assert meter.sample("b", 3.0, 600, 20_100) == model.Rates(300.0, 100.0)
    assert meter.sample("b", 3.0, 700, 20_200) is None  # no time passed: no rate (never a division by zero)


def test_peers_that_are_gone_are_forgotten() -> None:
    meter = model.RateMeter()
    for now in (1.0, 2.0):
        meter.sample("b", now, int(now * 100), 0)
        meter.sample("c", now, int(now * 100), 0)
    meter.keep_only(["c"])
    assert meter.rates("b") is None and "b" not in meter.history
    assert meter.sample("b", 3.0, 0, 0) is None  # a new b starts afresh
    assert meter.rates("c") == model.Rates(100.0, 0.0)


def test_the_history_is_bounded() -> None:
    meter = model.RateMeter()
    for i in range(model.HISTORY + 50):
        meter.sample("b", float(i), i * 10, 0)
    assert len(meter.history["b"]) == model.HISTORY


@given(st.lists(st.tuples(st.floats(0.0, 1e6), st.integers(0, 2**63), st.integers(0, 2**63)), max_size=30))
def test_rates_are_never_negative_whatever_the_polls(samples: list[tuple[float, int, int]]) -> None:
    meter = model.RateMeter()
    for now, rx, tx in samples:
        rates = meter.sample("b", now, rx, tx)
        assert rates is None or (rates.rx >= 0 and rates.tx >= 0)


# --- search --------------------------------------------------------------------------------


def test_search_matches_a_part_of_the_name_in_any_case_or_the_address() -> None:
    peers = [peer("beta", "100.64.0.2"), peer("Gamma", "100.64.0.3"), peer("alphabet", "100.64.0.12")]
    assert [p.name for p in model.visible(peers, "")] == ["Gamma", "alphabet", "beta"]
    assert [p.name for p in model.visible(peers, "BET")] == ["alphabet", "beta"]
    assert [p.name for p in model.visible(peers, " gam ")] == ["Gamma"]
    assert [p.name for p in model.visible(peers, "0.12")] == ["alphabet"]
    assert model.visible(peers, "delta") == []


# --- back-off ------------------------------------------------------------------------------


def test_reconnect_back_off_doubles_to_its_limit_and_starts_over_once_connected() -> None:
    backoff = model.Backoff(first=0.5, limit=8.0)
    assert [backoff.next() for _ in range(7)] == [0.5, 1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    assert backoff.attempts == 7
    backoff.reset()
    assert backoff.next() == 0.5


def test_the_back_off_stays_bounded_after_very_many_attempts() -> None:
    backoff = model.Backoff(first=0.5, limit=8.0, attempts=10_000)
    assert backoff.next() == 8.0


# --- words ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "text"), [(None, "-"), (0.0, "0 B/s"), (999.0, "999 B/s"), (1500.0, "1.5 KB/s"),
                                             (2_500_000.0, "2.5 MB/s"), (3e9, "3.0 GB/s")])
def test_rates_for_people(value: float | None, text: str) -> None:
    assert model.rate(value) == text


def test_a_rung_change_in_the_event_log_says_from_where_to_where_and_why() -> None:
    change = PathChanged("b", PathStatus("ssh", "ssh 192.0.2.2:2222"), "udp", "udp failing", 0.0)
    assert model.describe(change) == "b: udp -> ssh (udp failing); now ssh 192.0.2.2:2222"


def test_the_filter_column_says_what_was_dropped_of_each_peer() -> None:
    status = FilterStatus(enabled=True, in_force="", policy_version=1, node_rules=0, error=None, warnings=(), drops={},
                          spoofed_by_peer={"b": 1, "c": 0}, rules=(), flows=0, max_flows=1, max_flows_per_peer=1,
                          related=0, denied_by_peer={"b": 3, "d": 2})
    assert model.filter_drops(status) == {"b": "3 denied, 1 spoofed", "d": "2 denied"}
    assert model.filter_drops(None) == {}
