"""Which of its coordinators a node talks to, when its config lists several
(`[coordinator] urls`, docs/config.md): sans-IO, the clock passed in.

All the coordinators of one network serve one database, so any of them answers the
same; the order is the admin's preference. The coordinator client
(actors/coordinator_client.py) tells this what happened to the one in use and asks
where to go and how long to wait first.

Rules:
1. The node starts on the first URL, the preferred one.
2. The one in use failing (no answer, a 5xx, an answer that is no coordinator's:
   `unreachable`) moves the node to the next URL at once, after the last to the
   first. Only when every URL failed in a row (a whole round) does it wait first:
   BACKOFF_MIN doubling to BACKOFF_MAX, one step per round.
3. A refusal (4xx: revoked, unknown key) is the network's answer, the same from every
   coordinator: the node stays (`stay`) and waits the same backoff. So does a failure
   of the node's own (its address went away).
4. A register answered (`connected`) ends the streak: the next round waits from
   BACKOFF_MIN again.
5. Connected on a later URL, the node asks the preferred one whether it answers
   (`preferred_due`), PREFERRED_RETRY seconds after it connected and as long after
   each ask that got no answer, spread by up to ±SPREAD of that so that the nodes
   which failed over together do not come back together; when it answers
   (`preferred_answered`) the node goes back to it. A round that reaches the
   preferred one on its own (rule 2) ends the asking.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

BACKOFF_MIN, BACKOFF_MAX = 1.0, 30.0
PREFERRED_RETRY = 60.0
SPREAD = 0.2


class CoordinatorUrls:
    """The node's coordinator URLs, best first, and which one is in use."""

    def __init__(self, urls: Sequence[str], *, preferred_retry: float = PREFERRED_RETRY,
                 spread: Callable[[], float] = random.random) -> None:
        """`spread()`: a number in [0, 1) that places each ask of the preferred URL within
        ±SPREAD of `preferred_retry`."""
        if not urls:
            raise ValueError("at least one coordinator URL")
        self.urls = tuple(urls)
        self.preferred_retry = preferred_retry
        self.spread = spread
        self.index = 0
        self.failures = 0  # `unreachable` in a row, across URLs (read only)
        self._backoff = BACKOFF_MIN  # the wait after the next failed round (or refusal)
        self._preferred_at: float | None = None  # when to ask the preferred one next (on a later URL)

    @property
    def current(self) -> str:
        return self.urls[self.index]

    @property
    def preferred(self) -> str:
        return self.urls[0]

    def connected(self, now: float) -> None:
        """A register at the current URL was answered."""
        self.failures, self._backoff = 0, BACKOFF_MIN
        if self.index == 0:
            self._preferred_at = None
        elif self._preferred_at is None:
            self._preferred_at = self._after(now)

    def unreachable(self) -> float:
        """The current URL failed: move to the next; the seconds to wait before trying it."""
        self.failures += 1
        self.index = (self.index + 1) % len(self.urls)
        if self.index == 0:
            self._preferred_at = None
        return 0.0 if self.failures % len(self.urls) else self._next_backoff()

    def stay(self) -> float:
        """A failure that moves nothing (a refusal; this node's own): the seconds to wait
        before the current URL is tried again."""
        self.failures = 0
        return self._next_backoff()

    def preferred_due(self) -> float | None:
        """When to ask the preferred URL whether it answers; None: not now (on it, or not
        connected to the one in use)."""
        return None if self.index == 0 else self._preferred_at

    def preferred_answered(self) -> None:
        """The preferred URL answered: it is the one in use from now on."""
        self.index, self._preferred_at = 0, None

    def preferred_silent(self, now: float) -> None:
        """The preferred URL did not answer: ask again later."""
        self._preferred_at = self._after(now)

    def _after(self, now: float) -> float:
        return now + self.preferred_retry * (1 - SPREAD + 2 * SPREAD * self.spread())

    def _next_backoff(self) -> float:
        wait, self._backoff = self._backoff, min(self._backoff * 2, BACKOFF_MAX)
        return wait
