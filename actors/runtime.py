"""The actor runtime: bounded mailboxes, one root TaskGroup, a stated crash policy.

An actor owns its state and is reached only through `tell` (fire and forget;
a full mailbox drops the message and counts it, so a slow actor never blocks
its callers) or `ask` (request and reply, with a timeout). The data path is
the one exception: it calls the protocol core directly (see datapath.py).

Crash policy, per actor: `restart` (with doubling backoff from 0.5 s to 30 s,
and the daemon stops if an actor crashes 5 times within 60 s) or `fatal`
(the daemon shuts down cleanly). Either way the crash is logged with the
actor's name and traceback; no task ever dies silently.

Shutdown is an exception (`Shutdown`) raised inside the root TaskGroup, as in
hypercorn; `Supervisor.run` returns after every actor's `stop` ran, in
reverse start order.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

log = logging.getLogger("tunnelmesh.actors")

Policy = Literal["restart", "fatal"]
MAX_CRASHES = 5
CRASH_WINDOW = 60.0


class Shutdown(Exception):
    """Raised inside the root TaskGroup to stop the daemon; carries the reason."""

    def __init__(self, reason: str, exit_code: int = 0) -> None:
        super().__init__(reason)
        self.reason = reason
        self.exit_code = exit_code


@dataclass
class Request:
    """A message that wants an answer: the actor sets `reply`."""

    body: Any
    reply: asyncio.Future[Any] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class Actor:
    """Subclasses implement `handle(message)`; `setup`/`stop` are optional."""

    name = "actor"
    policy: Policy = "restart"
    mailbox_size = 256

    def __init__(self) -> None:
        self.mailbox: asyncio.Queue[Any] = asyncio.Queue(self.mailbox_size)
        self.dropped_messages = 0

    def tell(self, message: Any) -> bool:
        try:
            self.mailbox.put_nowait(message)
            return True
        except asyncio.QueueFull:
            self.dropped_messages += 1
            return False

    async def ask(self, body: Any, timeout: float = 10.0) -> Any:
        request = Request(body)
        await asyncio.wait_for(self.mailbox.put(request), timeout)
        return await asyncio.wait_for(request.reply, timeout)

    async def setup(self) -> None:
        """Runs once before the first message (and again after a restart)."""

    async def run(self) -> None:
        await self.setup()
        while True:
            message = await self.mailbox.get()
            if isinstance(message, Request):
                try:
                    result = await self.handle(message.body)
                except Exception as exc:  # the asker gets the error; the actor lives on
                    if not message.reply.done():
                        message.reply.set_exception(exc)
                    continue
                if not message.reply.done():
                    message.reply.set_result(result)
            else:
                await self.handle(message)

    async def handle(self, message: Any) -> Any:
        raise NotImplementedError

    async def stop(self) -> None:
        """Release what the actor holds. Must not raise."""


class Supervisor:
    def __init__(self) -> None:
        self.actors: list[Actor] = []
        self._tasks: dict[Actor, asyncio.Task[None]] = {}
        self._group: asyncio.TaskGroup | None = None
        self._shutdown: asyncio.Future[Shutdown] | None = None

    def add(self, actor: Actor) -> Actor:
        self.actors.append(actor)
        if self._group is not None:
            self._tasks[actor] = self._group.create_task(self._supervise(actor), name=actor.name)
        return actor

    async def remove(self, actor: Actor) -> None:
        """Stop one actor for good (e.g. the session of a revoked peer)."""
        if actor not in self.actors:
            return
        self.actors.remove(actor)
        task = self._tasks.pop(actor, None)
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        try:
            await actor.stop()
        except Exception:
            log.exception("%s: error while stopping", actor.name)

    def spawn(self, name: str, coro_factory: Callable[[], Awaitable[None]], policy: Policy = "fatal") -> None:
        """Supervise a plain coroutine (e.g. a server loop) like an actor."""
        actor = _CoroutineActor(name, coro_factory, policy)
        self.add(actor)

    def shutdown(self, reason: str, exit_code: int = 0) -> None:
        if self._shutdown is not None and not self._shutdown.done():
            self._shutdown.set_result(Shutdown(reason, exit_code))

    async def run(self) -> Shutdown:
        self._shutdown = asyncio.get_running_loop().create_future()
        result: Shutdown | None = None
        try:
            async with asyncio.TaskGroup() as group:
                self._group = group
                for actor in self.actors:
                    self._tasks[actor] = group.create_task(self._supervise(actor), name=actor.name)
                group.create_task(self._wait_for_shutdown(), name="shutdown")
        except* Shutdown as caught:
            result = caught.exceptions[0]  # type: ignore[assignment]
        finally:
            self._group = None
            self._tasks.clear()
            for actor in reversed(self.actors):
                try:
                    await actor.stop()
                except Exception:
                    log.exception("%s: error while stopping", actor.name)
        assert result is not None
        return result

    async def _wait_for_shutdown(self) -> None:
        assert self._shutdown is not None
        raise await self._shutdown

    async def _supervise(self, actor: Actor) -> None:
        crashes: list[float] = []
        backoff = 0.5
        while True:
            try:
                await actor.run()
                return
            except asyncio.CancelledError:
                raise
            except Shutdown:
                raise
            except Exception as exc:
                log.error("actor %s crashed: %s", actor.name, exc, exc_info=True)
                if actor.policy == "fatal":
                    raise Shutdown(f"actor {actor.name} failed: {exc}", exit_code=1) from exc
                now = time.monotonic()
                crashes = [t for t in crashes if now - t < CRASH_WINDOW] + [now]
                if len(crashes) >= MAX_CRASHES:
                    raise Shutdown(f"actor {actor.name} crashed {len(crashes)} times in {CRASH_WINDOW:.0f} s", exit_code=1) from exc
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 30.0)
                log.warning("restarting actor %s", actor.name)


class _CoroutineActor(Actor):
    def __init__(self, name: str, factory: Callable[[], Awaitable[None]], policy: Policy) -> None:
        super().__init__()
        self.name = name
        self.policy = policy
        self._factory = factory

    async def run(self) -> None:
        await self._factory()
