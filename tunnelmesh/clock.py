"""The daemon's one source of time, passed to whatever needs it.

`monotonic` is the clock of deadlines (the protocol core's `now`, the event loop's
`call_at`, the ladder's seconds); `wall` is Unix time (TAI64N timestamps, record
issue times, what `status` shows). Production code takes a `Clock` instead of
calling `time.*` itself, so a test can run whole nodes in virtual time
(tests/support/memnet.py) where the event loop's clock is this clock.
"""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def monotonic(self) -> float: ...

    def wall(self) -> float: ...


class SystemClock:
    """The real clocks. The methods are the C functions themselves: no Python frame
    per read on the data path."""

    monotonic = staticmethod(time.monotonic)
    wall = staticmethod(time.time)


SYSTEM_CLOCK: Clock = SystemClock()
