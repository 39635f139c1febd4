"""Poll before sleeping: after a quiet spell, the daemon's event loop asks the kernel
again for a moment before it blocks in epoll_wait.

A packet that arrives while a process sleeps pays for the wake-up and a cold cache:
40-100 us a turn here against ~10 us for the same callback warm. A ping through the
tunnel pays it three times (the request on the TUN, at the peer, the reply on UDP).
Go's runtime keeps an idle thread spinning for a moment before it parks, which is
part of why nebula and wireguard-go answer sooner; this is the same idea for one
asyncio loop. A turn that ends a quiet spell (a blocking wait of at least `quiet`)
is usually one end of a request: the selector then polls (epoll_wait with timeout 0,
yielding the CPU in between) for a moment before it blocks, so the answer finds the
loop awake. Under a steady stream the waits are shorter than `quiet` and it never
spins.

What it may burn is bounded twice. A spin that catches nothing, and whose answer
the longest spin would not have caught either (the answering side, an answer from
across a WAN), halves the next one, down to `shortest`; one that catches something,
or misses what the longest would have caught, restores `longest`. And all spinning
together stays within `share` of the wall-clock time (a token bucket holding at most
`burst` seconds), whatever the traffic: a stream with a packet every millisecond
would otherwise spin after each.
"""

from __future__ import annotations

import asyncio
import os
import selectors
import time
from collections.abc import Callable

#: The longest spin (s): a round trip on a LAN or between namespaces answers within it.
LONGEST = 0.0005
#: The shortest spin (s), where spins that catch nothing end up.
SHORTEST = 0.00005
#: A blocking wait at least this long is a quiet spell (s). Under a steady stream the
#: loop's waits are shorter (spinning after every turn cost 10% of the UDP 64 B
#: packets/s here).
QUIET = 0.0003
#: At most this share of the wall-clock time goes to spinning, in bursts of at most
#: `BURST` seconds.
SHARE = 0.05
BURST = 0.002


class SpinningSelector(selectors.EpollSelector):
    """An epoll selector that, after a quiet spell, polls for a moment after the turn
    that ended it before it blocks again (see the module docstring)."""

    def __init__(self, longest: float = LONGEST, shortest: float = SHORTEST, quiet: float = QUIET,
                 share: float = SHARE, burst: float = BURST) -> None:
        super().__init__()
        self._longest, self._shortest, self._quiet, self._share, self._burst = longest, shortest, quiet, share, burst
        self._next = longest  # the next spin's length
        self._armed = False  # a quiet spell just ended: the next blocking select spins first
        self._budget = burst  # seconds of spinning allowed now
        self._refilled_at = time.monotonic()
        self.spins = 0  # quiet spells the loop then polled after
        self.caught = 0  # of those, the spins that found something ready
        self.spun = 0.0  # seconds spent spinning

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        poll = super().select
        if timeout is not None and timeout <= 0:
            return poll(timeout)
        now = time.monotonic()
        spun_from = None
        if self._armed:
            self._armed = False  # one spin per quiet spell
            self._budget = min(self._burst, self._budget + (now - self._refilled_at) * self._share)
            self._refilled_at = now
            length = min(self._next, self._budget, self._longest if timeout is None else timeout)
            if length >= self._shortest:
                ready = self._spin(poll, now, now + length)
                after = time.monotonic()
                self._budget -= after - now
                self.spun += after - now
                if ready:
                    self._next = self._longest
                    return ready
                spun_from = now
                if timeout is not None:
                    timeout = max(0.0, timeout - (after - now))
                now = after
        ready = poll(timeout)
        woke = time.monotonic()
        if spun_from is not None:  # a spin that caught nothing
            if woke - spun_from > self._longest:  # nor would the longest have: shorter next time
                self._next = max(self._shortest, self._next / 2)
            elif ready:  # the longest would have: it again (a spin cut short by a timer changes nothing)
                self._next = self._longest
        if ready and woke - now >= self._quiet:  # sparse traffic: the answer to this turn is polled for
            self._armed = True
        return ready

    def _spin(self, poll: Callable[[float | None], list[tuple[selectors.SelectorKey, int]]], now: float,
              until: float) -> list[tuple[selectors.SelectorKey, int]]:
        self.spins += 1
        while now < until:
            ready = poll(0)
            if ready:
                self.caught += 1
                return ready
            os.sched_yield()  # the CPU to whatever else runs here (a pinger, the peer's iperf)
            now = time.monotonic()
        return []


class SpinningLoop(asyncio.SelectorEventLoop):
    """The daemon's event loop: a SelectorEventLoop on a SpinningSelector (`spinner`,
    whose counters `status` shows)."""

    def __init__(self) -> None:
        self.spinner = SpinningSelector()
        super().__init__(self.spinner)
