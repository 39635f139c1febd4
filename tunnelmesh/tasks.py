"""Stopping a task without losing a cancel of one's own."""

from __future__ import annotations

import asyncio
from typing import Any


async def cancel_and_wait(task: asyncio.Future[Any]) -> None:
    """Cancel `task` and wait until it has ended, however it ends (its error is the
    task's own business: retrieved, not raised). A cancel of the caller while it waits
    still reaches the caller. The obvious `task.cancel()` then `with
    suppress(CancelledError): await task` takes the caller's own cancel for the task's
    and carries on: the caller lives on marked as cancelling, and a TaskGroup waiting
    for it waits for ever (a daemon's shutdown hung so, when a revocation stopped it as
    the relay connection closed). `gather` raises the caller's cancel, not the task's."""
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
