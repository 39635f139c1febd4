"""Per-source token buckets under one overall bucket, for the coordinator's unauthenticated
endpoints and for handshakes under load (tunnelmesh.wireguard.device). Sans-IO: every call
takes `now` (monotonic seconds); nothing here reads a clock.

Shape (after wireguard-go's ratelimiter/ratelimiter.go, written anew):

- Each source has a token bucket: `Rate.burst` tokens, refilled at `Rate.per_second`. A
  request takes one token; without one it is refused, with how long until there is one.
  A new source starts full (wireguard-go starts it with one token taken, as here: the
  request that made it is charged).
- A source is its IPv4 address, or the /64 of an IPv6 address (as WireGuard's kernel
  ratelimiter keys IPv6): one host holds a whole /64, so keying on the full address
  would give it 2**64 buckets.
- Memory is bounded by `max_sources`. wireguard-go garbage-collects every second the
  entries idle for more than a second; here the table is kept in least-recently-used
  order and, on every call, entries idle long enough to have refilled are dropped from
  its old end (a refilled bucket is the same as no bucket, so nothing is lost): O(1)
  amortized, no timer. When the table is still full, the least recently used source is
  evicted (its bucket starts full again if it returns).
- Eviction means a sender with more addresses than the table holds could get fresh
  buckets; the overall bucket is what bounds the total work then: every request must
  also find a token there, so the endpoints behind the limiter cost at most
  `overall.burst` requests at once and `overall.per_second` per second, whoever sends.
  The source bucket is checked first and the overall one is charged only if the source
  may go on, so one flooding source cannot drain the overall bucket for the others.
"""

from __future__ import annotations

import ipaddress
import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import NamedTuple

__all__ = ["UNKNOWN_SOURCE", "Limited", "Rate", "RateLimiter", "TokenBucket", "source_key"]

#: The key of requests whose source is not known (no peer address, or a trusted proxy
#: that sent something that is not an address): they share one bucket.
UNKNOWN_SOURCE = "?"


@dataclass(frozen=True, slots=True)
class Rate:
    """`burst` requests at once, then `per_second` on average."""

    per_second: float
    burst: int

    def __post_init__(self) -> None:
        if not (self.per_second > 0 and math.isfinite(self.per_second)) or self.burst < 1:
            raise ValueError(f"a rate needs a positive, finite refill and a burst of at least 1, not {self}")

    @property
    def refill_time(self) -> float:
        """Seconds an empty bucket takes to be full again."""
        return self.burst / self.per_second


class TokenBucket:
    """One bucket; time passed in. Tokens are fractional so slow rates stay exact."""

    __slots__ = ("last", "rate", "tokens")

    def __init__(self, rate: Rate, now: float) -> None:
        self.rate = rate
        self.tokens = float(rate.burst)
        self.last = now

    def _refill(self, now: float) -> None:
        if now > self.last:  # a clock that went back refills nothing (and takes nothing)
            self.tokens = min(float(self.rate.burst), self.tokens + (now - self.last) * self.rate.per_second)
            self.last = now

    def wait(self, now: float) -> float:
        """0.0 if a token is there now, else the seconds until one is."""
        self._refill(now)
        return 0.0 if self.tokens >= 1.0 else (1.0 - self.tokens) / self.rate.per_second

    def take(self) -> None:
        """Take the token `wait` just said is there."""
        self.tokens -= 1.0

    def full_at(self) -> float:
        """When this bucket will be full again (then it is the same as a new one)."""
        return self.last + (self.rate.burst - self.tokens) / self.rate.per_second


def source_key(address: str | None) -> str:
    """What a source is counted as: an IPv4 address (IPv4-mapped IPv6 unwrapped), the /64
    of an IPv6 address, or UNKNOWN_SOURCE."""
    try:
        ip = ipaddress.ip_address(address or "")
    except ValueError:
        return UNKNOWN_SOURCE
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((int(ip) >> 64 << 64, 64)))
    return str(ip)


class Limited(NamedTuple):
    """A refusal: `by` "source" or "overall", and the seconds until it would pass."""

    by: str
    wait: float


class RateLimiter:
    """Per-source buckets (at most `max_sources` of them) under one overall bucket.
    `refused` counts refusals by the bucket that said no; `evicted`, sources evicted
    from a full table."""

    def __init__(self, per_source: Rate, overall: Rate, *, max_sources: int = 4096, now: float = 0.0) -> None:
        if max_sources < 1:
            raise ValueError("a rate limiter needs room for at least one source")
        self.per_source = per_source
        self.max_sources = max_sources
        self._overall = TokenBucket(overall, now)
        self._sources: OrderedDict[str, TokenBucket] = OrderedDict()
        self.refused = {"source": 0, "overall": 0}
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._sources)

    def limit(self, source: str | None, now: float) -> Limited | None:
        """None when a request from `source` may go on (a token is taken from its bucket
        and from the overall one), else which bucket refused it and how long to wait."""
        return self.limit_key(source_key(source), now)

    def limit_key(self, key: str, now: float) -> Limited | None:
        """`limit` for a source already named: a `source_key`, or a name that is no
        address (the data path names a link by the peer it authenticated)."""
        self._collect(now)
        bucket = self._sources.get(key)
        if bucket is None:
            if len(self._sources) >= self.max_sources:
                self._sources.popitem(last=False)  # the least recently used: see the module header
                self.evicted += 1
            bucket = self._sources[key] = TokenBucket(self.per_source, now)
        else:
            self._sources.move_to_end(key)
        for by, which in (("source", bucket), ("overall", self._overall)):
            wait = which.wait(now)
            if wait > 0.0:
                self.refused[by] += 1
                return Limited(by, wait)
        bucket.take()
        self._overall.take()
        return None

    def _collect(self, now: float) -> None:
        """Drop, from the least recently used end, the buckets that are full again.

        The scan stops at the first bucket that is not full yet, so a call looks at one
        bucket more than it drops: O(1) amortized. That bucket was used less than
        `refill_time` ago (an older one would be full), and those behind it later still:
        after every call, each bucket left was used within the last `refill_time`. A full
        bucket behind a draining one may stay until that one is full too."""
        while self._sources:
            key, bucket = next(iter(self._sources.items()))
            if bucket.full_at() > now:
                return
            del self._sources[key]
