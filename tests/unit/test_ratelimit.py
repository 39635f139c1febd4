"""tunnelmesh.ratelimit in virtual time: the bucket arithmetic, the per-source and overall
limits, the bounded table and its garbage collection, and that the coordinator's default
rates let real clients through (docs/coordinator.md, "HTTP API")."""

from __future__ import annotations

import pytest

from tunnelmesh.coordinator.guards import MAX_SOURCES, OVERALL_RATE, PER_SOURCE_RATE
from tunnelmesh.ratelimit import (
    UNKNOWN_SOURCE,
    Rate,
    RateLimiter,
    TokenBucket,
    source_key,
)

T0 = 1000.0
WIDE = Rate(per_second=1e9, burst=10**9)  # an overall bucket that never says no here


def test_bucket_gives_its_burst_then_one_token_per_interval() -> None:
    bucket = TokenBucket(Rate(per_second=2.0, burst=3), T0)
    for _ in range(3):
        assert bucket.wait(T0) == 0.0
        bucket.take()
    assert bucket.wait(T0) == pytest.approx(0.5)
    assert bucket.wait(T0 + 0.25) == pytest.approx(0.25)  # half a token came back
    assert bucket.wait(T0 + 0.5) == 0.0
    bucket.take()
    assert bucket.wait(T0 + 0.5) == pytest.approx(0.5)
    assert bucket.wait(T0 + 100.0) == 0.0
    assert bucket.tokens == 3.0  # refilled to the burst, not beyond
    assert bucket.full_at() == T0 + 100.0


def test_a_clock_that_goes_back_refills_nothing() -> None:
    bucket = TokenBucket(Rate(per_second=1.0, burst=1), T0)
    bucket.take()
    assert bucket.wait(T0 - 50.0) == pytest.approx(1.0)
    assert bucket.wait(T0 + 1.0) == 0.0


@pytest.mark.parametrize("rate", [(0.0, 1), (-1.0, 1), (float("inf"), 1), (float("nan"), 1), (1.0, 0)])
def test_nonsense_rates_are_refused(rate: tuple[float, int]) -> None:
    with pytest.raises(ValueError, match="positive, finite"):
        Rate(*rate)


def test_one_source_is_limited_and_another_is_not() -> None:
    limiter = RateLimiter(Rate(per_second=1.0, burst=5), WIDE, now=T0)
    assert all(limiter.limit("192.0.2.1", T0) is None for _ in range(5))
    refused = limiter.limit("192.0.2.1", T0)
    assert refused is not None and refused.by == "source" and refused.wait == pytest.approx(1.0)
    assert limiter.limit("192.0.2.2", T0) is None  # its own bucket
    assert limiter.limit("192.0.2.1", T0 + 1.0) is None  # one token back after a second
    assert limiter.limit("192.0.2.1", T0 + 1.0) is not None
    assert limiter.refused == {"source": 2, "overall": 0}


def test_the_overall_bucket_bounds_everyone_together() -> None:
    limiter = RateLimiter(Rate(per_second=1.0, burst=5), Rate(per_second=10.0, burst=20), now=T0)
    allowed = sum(limiter.limit(f"192.0.2.{i}", T0) is None for i in range(1, 101))
    assert allowed == 20
    refused = limiter.limit("198.51.100.1", T0)
    assert refused is not None and refused.by == "overall" and refused.wait == pytest.approx(0.1)
    # Over ten seconds 100 new sources a second get 10 a second through, not 100.
    allowed = sum(limiter.limit(f"203.0.113.{i % 250}", T0 + 0.01 * i) is None for i in range(1, 1001))
    assert allowed == pytest.approx(100, abs=1)


def test_a_flooding_source_does_not_drain_the_overall_bucket() -> None:
    limiter = RateLimiter(Rate(per_second=1.0, burst=5), Rate(per_second=1.0, burst=10), now=T0)
    for _ in range(1000):
        limiter.limit("192.0.2.1", T0)
    assert limiter.refused["source"] == 995
    assert sum(limiter.limit(f"198.51.100.{i}", T0) is None for i in range(1, 6)) == 5


def test_ipv6_sources_are_counted_by_their_64() -> None:
    assert source_key("2001:db8:1:2:aaaa::1") == source_key("2001:db8:1:2:ffff::9") == "2001:db8:1:2::/64"
    assert source_key("2001:db8:1:3::1") != source_key("2001:db8:1:2::1")
    assert source_key("::ffff:192.0.2.7") == "192.0.2.7"
    assert source_key("192.0.2.7") == "192.0.2.7"
    assert source_key(None) == source_key("") == source_key("not an address") == UNKNOWN_SOURCE
    limiter = RateLimiter(Rate(per_second=1.0, burst=2), WIDE, now=T0)
    assert limiter.limit("2001:db8::1", T0) is None
    assert limiter.limit("2001:db8::2", T0) is None
    assert limiter.limit("2001:db8::3", T0) is not None  # same /64, same bucket
    assert len(limiter) == 1


def test_the_table_is_bounded_and_evicts_the_least_recently_seen() -> None:
    limiter = RateLimiter(Rate(per_second=0.001, burst=2), WIDE, max_sources=3, now=T0)
    for host in ("192.0.2.1", "192.0.2.2", "192.0.2.3"):
        assert limiter.limit(host, T0) is None
    assert limiter.limit("192.0.2.1", T0) is None  # .1 is now the most recently seen
    assert limiter.limit("192.0.2.1", T0) is not None
    assert limiter.limit("192.0.2.4", T0) is None  # evicts .2, the least recently seen
    assert len(limiter) == 3 and limiter.evicted == 1
    assert limiter.limit("192.0.2.1", T0) is not None  # .1 kept its (empty) bucket
    for i in range(10_000):
        limiter.limit(f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}", T0)
    assert len(limiter) == 3


def test_buckets_that_refilled_are_collected_without_a_timer() -> None:
    rate = Rate(per_second=1.0, burst=4)  # an empty bucket refills in 4 s
    limiter = RateLimiter(rate, WIDE, now=T0)
    for i in range(100):
        for _ in range(4):
            limiter.limit(f"192.0.2.{i}", T0 + i * 0.01)
    assert len(limiter) == 100
    limiter.limit("198.51.100.1", T0 + 3.0)  # none is full yet
    assert len(limiter) == 101
    limiter.limit("198.51.100.2", T0 + 4.495)  # the first 50 are full again (drained before +0.5 s): gone
    assert len(limiter) == 52
    limiter.limit("198.51.100.2", T0 + 5.5)  # all of them, and 198.51.100.1 (full since +4 s)
    assert len(limiter) == 1
    # A full bucket is the same as none: the source gets its whole burst again.
    assert all(limiter.limit("192.0.2.0", T0 + 5.5) is None for _ in range(4))


def test_a_drained_bucket_is_kept_until_it_refilled() -> None:
    limiter = RateLimiter(Rate(per_second=1.0, burst=4), WIDE, now=T0)
    for _ in range(10):
        limiter.limit("192.0.2.1", T0)
    limiter.limit("192.0.2.2", T0 + 3.9)
    assert len(limiter) == 2  # .1 is still owed 0.1 s: forgetting it would refill it early
    assert limiter.limit("192.0.2.1", T0 + 3.9) is None
    assert limiter.limit("192.0.2.1", T0 + 3.9) is None
    assert limiter.limit("192.0.2.1", T0 + 3.9) is None
    assert limiter.limit("192.0.2.1", T0 + 3.9) is not None  # 3.9 tokens, not 4


# --- the coordinator's defaults let real clients through ----------------------------------------


def coordinator_limiter() -> RateLimiter:
    return RateLimiter(PER_SOURCE_RATE, OVERALL_RATE, max_sources=MAX_SOURCES, now=T0)


def test_default_rates_let_a_joiner_wait_for_approval_for_ten_minutes() -> None:
    limiter = coordinator_limiter()
    now = T0
    for _ in range(5):  # network, propose, confirm and a retry or two
        assert limiter.limit("192.0.2.10", now) is None
    for _ in range(300):  # `tunnelmesh join --name` asks every 2 s for 10 minutes
        now += 2.0
        assert limiter.limit("192.0.2.10", now) is None
    assert limiter.refused == {"source": 0, "overall": 0}


def test_default_rates_let_five_nodes_join_at_once_and_relay_from_one_nat() -> None:
    limiter = coordinator_limiter()
    for node in range(5):  # an e2e network: each node from its own namespace
        for _ in range(4):
            assert limiter.limit(f"192.0.2.{node + 1}", T0) is None
    for _ in range(20):  # twenty members behind one NAT reconnect to the relay together
        assert limiter.limit("198.51.100.1", T0 + 0.1) is None
    assert limiter.refused == {"source": 0, "overall": 0}


def test_default_rates_bound_a_flood() -> None:
    limiter = coordinator_limiter()
    passed = sum(limiter.limit("203.0.113.66", T0 + i * 0.001) is None for i in range(10_000))  # 10 s
    assert passed <= PER_SOURCE_RATE.burst + 10 * PER_SOURCE_RATE.per_second + 1
    passed = sum(limiter.limit(f"10.0.{i >> 8 & 255}.{i & 255}", T0 + 20 + i * 0.001) is None for i in range(10_000))
    assert passed <= OVERALL_RATE.burst + 10 * OVERALL_RATE.per_second + 1
