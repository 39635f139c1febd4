"""Map replies shared by the long-polls one change wakes.

A change wakes every held `GET /v1/map`; most of them ask with the same `since` (the
version before the change). The first to ask reads the reply from the store; the
others wait for that read and take the same answer, so a change costs the database
one read per distinct `since`, not one per node. Replies are kept for the current
version only (the next change makes new ones) and are never mutated by their takers.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

Reply = dict[str, Any]

#: Distinct (since, candidates) replies kept for one version; beyond, the oldest go.
MAX_KEPT = 256


class MapReplies:
    """The replies read at one version, by (since, candidates)."""

    def __init__(self) -> None:
        self._version = -1
        self._replies: dict[tuple[int, bool], asyncio.Future[Reply]] = {}

    async def get(self, version: int, since: int, candidates: bool,
                  read: Callable[[int, bool], Awaitable[Reply]]) -> Reply:
        """The reply for `since` at `version` (the version this coordinator knows), read by
        `read(since, candidates)` once. Read-only for the caller: copy before changing."""
        if version != self._version:
            self._version, self._replies = version, {}
        key = (since, candidates)
        for _ in range(2):  # a shared read cut short (its request cancelled) is read again, once
            shared = self._replies.get(key)
            if shared is None:
                return await self._read(key, read)
            try:
                return await asyncio.shield(shared)
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if not shared.cancelled() or (current is not None and current.cancelling()):
                    raise  # this request itself was cancelled (also when the shared read was too)
        return await read(since, candidates)

    async def _read(self, key: tuple[int, bool], read: Callable[[int, bool], Awaitable[Reply]]) -> Reply:
        if len(self._replies) >= MAX_KEPT:
            del self._replies[next(iter(self._replies))]
        shared: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self._replies[key] = shared
        try:
            reply = await read(*key)
        except BaseException as exc:
            if self._replies.get(key) is shared:
                del self._replies[key]  # not kept: the next asker reads again
            if isinstance(exc, asyncio.CancelledError):
                shared.cancel()
            else:
                shared.set_exception(exc)
                shared.exception()  # retrieved here: waiters re-raise it, none need be there
            raise
        shared.set_result(reply)
        return reply
