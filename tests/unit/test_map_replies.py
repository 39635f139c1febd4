"""MapReplies (tunnelmesh/coordinator/replies.py): the long-polls one change wakes share
one read per `since`; a read cut short is read again by whoever still waits; a waiter's
own cancel always reaches it, also when the shared read is cancelled in the same turn."""

from __future__ import annotations

import asyncio
from typing import Any

from tunnelmesh.coordinator.replies import MapReplies


class Store:
    """A read that waits until released, counting the reads."""

    def __init__(self) -> None:
        self.reads = 0
        self.release = asyncio.Event()

    async def read(self, since: int, candidates: bool) -> dict[str, Any]:
        self.reads += 1
        await self.release.wait()
        return {"since": since, "read": self.reads}


async def reader_and_waiter(replies: MapReplies, store: Store) -> tuple[asyncio.Task, asyncio.Task]:
    """Two long-polls for the same `since`: the first reads, the second waits for its read."""
    reader = asyncio.create_task(replies.get(5, 4, False, store.read))
    await asyncio.sleep(0)
    waiter = asyncio.create_task(replies.get(5, 4, False, store.read))
    await asyncio.sleep(0)
    return reader, waiter


def test_waiters_share_one_read() -> None:
    async def main() -> None:
        replies, store = MapReplies(), Store()
        asks = [asyncio.create_task(replies.get(5, 4, False, store.read)) for _ in range(3)]
        await asyncio.sleep(0)
        store.release.set()
        answers = await asyncio.gather(*asks)
        assert store.reads == 1 and all(a is answers[0] for a in answers)

    asyncio.run(main())


def test_a_read_cut_short_is_read_again_by_the_waiter() -> None:
    async def main() -> None:
        first, second = await reader_and_waiter(MapReplies(), store := Store())
        first.cancel()  # the request that reads goes away: the one waiting reads itself
        await asyncio.sleep(0)
        store.release.set()
        assert (await second)["read"] == 2
        assert first.cancelled()

    asyncio.run(main())


def test_a_waiters_own_cancel_reaches_it_also_when_the_shared_read_is_cancelled_with_it() -> None:
    async def main() -> None:
        reader, waiter = await reader_and_waiter(MapReplies(), store := Store())
        reader.cancel()  # a shutdown: both in one turn
        waiter.cancel()
        await asyncio.wait([reader, waiter], timeout=2)
        assert reader.cancelled() and waiter.cancelled(), waiter  # not reading again for a request that is gone
        assert store.reads == 1

    asyncio.run(main())
