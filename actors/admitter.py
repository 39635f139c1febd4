"""The admitter: on the admin's machine, countersigns joins made with an invite.

Only admin-signed entries are members (docs/coordinator.md, "Joining"). The coordinator
holds each join made with an invite until this actor -- in the daemon of the node that
holds the admin key -- has checked it against the admin's own invite ledger and kept
bindings (`tunnelmesh.admission`) and answered with the admin-signed entry and the
network secret sealed to the joiner, or with the reason it refuses. It long-polls the
coordinator's pending list, so a join completes as soon as it is confirmed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from tunnelmesh.coordinator.client import CoordinatorError
from tunnelmesh.membership import MembershipError
from tunnelmesh.network import Admin, NetworkError, countersign_pending
from tunnelmesh.paths import Paths

from .control import EventBus
from .messages import AdmissionDecided, AdmissionStatus
from .runtime import Actor

log = logging.getLogger("tunnelmesh.admitter")

#: How long one wait for pending joins lasts (the coordinator answers at once when one comes).
POLL_WAIT = 25.0
BACKOFF_START = 1.0
BACKOFF_MAX = 30.0


class Admitter(Actor):
    """Countersigns joins with an invite as they arrive (admin's machine only)."""

    name = "admitter"
    policy = "restart"

    def __init__(self, paths: Paths, bus: EventBus, coordinator_url: Callable[[], str] | None = None) -> None:
        super().__init__()
        self.paths = paths
        self.bus = bus
        # The coordinator the node's client uses now (it fails over between [coordinator]
        # urls); None: the one the network state names.
        self.coordinator_url = coordinator_url
        self.countersigned = 0
        self.refused = 0
        self.problem: str | None = None

    def status(self) -> AdmissionStatus:
        return AdmissionStatus(countersigned=self.countersigned, refused=self.refused, problem=self.problem)

    async def run(self) -> None:
        backoff = BACKOFF_START
        loop = asyncio.get_running_loop()
        while True:
            try:
                admin = Admin.load(self.paths)
                url = self.coordinator_url() if self.coordinator_url is not None else None
                async with admin.coordinator(url) as coordinator:
                    while True:
                        asked = loop.time()
                        waiting = await coordinator.pending(POLL_WAIT, invited=True)
                        if not waiting and loop.time() - asked < BACKOFF_START:
                            await asyncio.sleep(BACKOFF_START)  # answered at once with nothing: no busy loop
                        decisions = await countersign_pending(admin, coordinator, waiting)
                        self.problem = None
                        backoff = BACKOFF_START
                        for line in decisions:
                            log.info("admission: %s", line)
                            outcome = _outcome(line)
                            self.bus.publish(AdmissionDecided(outcome=outcome, detail=line))
                            self.countersigned += outcome == "countersigned"
                            self.refused += outcome == "refused"
                        decided = sum(_outcome(line) in ("countersigned", "refused") for line in decisions)
                        if decided < len(waiting):  # some could not be decided now: no busy loop
                            await asyncio.sleep(BACKOFF_START)
            except (CoordinatorError, NetworkError, MembershipError) as exc:
                if str(exc) != self.problem:
                    log.warning("admission: cannot countersign joins now: %s", exc)
                self.problem = str(exc)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX)


def _outcome(decision: str) -> str:
    """What `countersign_pending` did with one join, from its line: "countersigned",
    "refused", "ignored" (malformed) or "deferred" (could not decide now, asked again)."""
    for outcome in ("countersigned", "refused", "ignored"):
        if decision.startswith(outcome):
            return outcome
    return "deferred"
