"""Poll before sleeping: after a quiet spell, the daemon's event loop asks the kernel
again for a moment before it blocks in epoll_wait.

A packet that arrives while a process sleeps pays for the wake-up and a cold cache:
40-100 us a turn here against ~10 us for the same callback warm. A ping through the
tunnel pays it three times (the request on the TUN, at the peer, the reply on UDP).
Go's runtime keeps an idle thread spinning for a moment before it parks, which is
part of why nebula and wireguard-go answer sooner; this is the same idea for one
asyncio loop. A turn that ends a quiet spell (a blocking wait of at least `quiet`)
is usually one end of a request: the selector then polls (epoll_wait with timeout 0,
yielding the CPU in between) for up to `spin` seconds before it blocks, so the
answer finds the loop awake. Once per quiet spell, so an idle daemon spins a moment
per keepalive, and never under a steady stream, whose waits are shorter: polling
there only takes the CPU from the processes that make and take the stream.
"""

from __future__ import annotations

import asyncio
import os
import selectors
import time

#: How long the loop polls after the turn that ended a quiet spell (s): a round trip on
#: a LAN or between namespaces answers within it; longer only burns CPU.
SPIN = 0.0005
#: A blocking wait at least this long is a quiet spell (s). Under a steady stream the
#: loop's waits are shorter (spinning after every turn cost 10% of the UDP 64 B
#: packets/s here).
QUIET = 0.0003


class SpinningSelector(selectors.EpollSelector):
    """An epoll selector that, after a quiet spell, polls for `spin` seconds after the
    turn that ended it before it blocks again (see the module docstring)."""

    def __init__(self, spin: float = SPIN, quiet: float = QUIET) -> None:
        super().__init__()
        self._spin = spin
        self._quiet = quiet
        self._hot_until = 0.0  # monotonic: poll instead of sleeping until then
        self.spins = 0  # quiet spells ended by a turn that the loop then polled after
        self.caught = 0  # of those, the polls that found something ready

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        poll = super().select
        if timeout is not None and timeout <= 0:
            return poll(timeout)
        now = time.monotonic()
        until = self._hot_until if timeout is None else min(self._hot_until, now + timeout)
        if now < until:
            self._hot_until = 0.0  # one spin per quiet spell
            self.spins += 1
            started = now
            while now < until:
                ready = poll(0)
                if ready:
                    self.caught += 1
                    return ready
                os.sched_yield()  # the CPU to whatever else runs here (a pinger, the peer's iperf)
                now = time.monotonic()
            if timeout is not None:
                timeout = max(0.0, timeout - (now - started))
        ready = poll(timeout)
        if ready:
            woke = time.monotonic()
            if woke - now >= self._quiet:  # sparse traffic: the answer to what this turn sends is polled for
                self._hot_until = woke + self._spin
        return ready


def spinning_loop() -> asyncio.AbstractEventLoop:
    """A new event loop on a SpinningSelector (for asyncio.Runner's loop_factory)."""
    return asyncio.SelectorEventLoop(SpinningSelector())
