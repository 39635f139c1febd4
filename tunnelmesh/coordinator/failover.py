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
3. A refusal (`refused`: a 4xx, e.g. an unknown key) from the preferred URL is the
   network's answer: the node stays and waits the same backoff. From a later URL it may
   be that coordinator's own (on the wrong database, a wrong --admin, a proxy's
   maintenance page answering 403/404): the node stays and backs off too, but the
   REFUSALS_TO_MOVE-th in a row counts as that URL failing (rule 2). A failure of the
   node's own (its address went away) stays (`stay`). A refusal starts the round anew:
   the URL answered. (A verifiable revocation is no refusal: the client stops for good.)
4. A register answered (`connected`) ends the streak: the next round waits from
   BACKOFF_MIN again.
5. On a later URL, whatever it answers (connected, refusing, backing off), the node
   asks the preferred one whether it answers (`preferred_due`), PREFERRED_RETRY seconds
   after it left the preferred one and as long after each ask that got no answer,
   spread by up to ±SPREAD of that so that the nodes which failed over together do not
   come back together; when it answers (`preferred_answered`) the node goes back to it.
   A round that reaches the preferred one on its own (rule 2) ends the asking.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

BACKOFF_MIN, BACKOFF_MAX = 1.0, 30.0
PREFERRED_RETRY = 60.0
REFUSALS_TO_MOVE = 3
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
        self.refusals = 0  # refusals in a row from the later URL in use (read only)
        self._backoff = BACKOFF_MIN  # the wait after the next failed round (or refusal)
        self._preferred_at: float | None = None  # when to ask the preferred one next: on a later URL only

    @property
    def current(self) -> str:
        return self.urls[self.index]

    @property
    def preferred(self) -> str:
        return self.urls[0]

    def connected(self) -> None:
        """A register at the current URL was answered."""
        self.failures, self.refusals, self._backoff = 0, 0, BACKOFF_MIN

    def unreachable(self, now: float) -> float:
        """The current URL failed: move to the next; the seconds to wait before trying it."""
        self.failures += 1
        self.refusals = 0
        self.index = (self.index + 1) % len(self.urls)
        if self.index == 0:
            self._preferred_at = None
        elif self._preferred_at is None:  # just left the preferred one
            self._preferred_at = self._after(now)
        return 0.0 if self.failures % len(self.urls) else self._next_backoff()

    def refused(self, now: float) -> float:
        """The current URL refused (a 4xx): the seconds to wait before the next try, at it
        or, at the REFUSALS_TO_MOVE-th refusal in a row from a later URL, at the next."""
        if self.index == 0:
            return self.stay()
        self.refusals += 1
        return self.stay() if self.refusals < REFUSALS_TO_MOVE else self.unreachable(now)

    def stay(self) -> float:
        """A failure that moves nothing (this node's own, a refusal that does not): the
        seconds to wait before the current URL is tried again."""
        self.failures = 0
        return self._next_backoff()

    def preferred_due(self) -> float | None:
        """When to ask the preferred URL whether it answers; None: not at all (on it)."""
        return self._preferred_at

    def preferred_answered(self) -> None:
        """The preferred URL answered: it is the one in use from now on."""
        self.index, self.refusals, self._preferred_at = 0, 0, None

    def preferred_silent(self, now: float) -> None:
        """The preferred URL did not answer: ask again later."""
        self._preferred_at = self._after(now)

    def _after(self, now: float) -> float:
        return now + self.preferred_retry * (1 - SPREAD + 2 * SPREAD * self.spread())

    def _next_backoff(self) -> float:
        wait, self._backoff = self._backoff, min(self._backoff * 2, BACKOFF_MAX)
        return wait
