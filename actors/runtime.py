"""The actor runtime: bounded mailboxes, one root TaskGroup, a stated crash policy.

An actor owns its state and is reached through messages:

- `ask` (request and reply, with a timeout): what must arrive and be answered;
- `tell_latest(key, message)`: what must arrive but only its latest value matters
  (a peer's candidates): never refused however full the mailbox is; a newer message
  for a key still waiting replaces it in its place, so the mailbox holds at most one
  per key beside the bounded messages;
- `tell` (fire and forget): best-effort traffic only; a full mailbox drops the
  message and counts it, so a slow actor never blocks its callers.

The data path is the one exception: it calls the protocol core directly (see datapath.py).

Crash policy, per actor: `restart` (with doubling backoff from 0.5 s to 30 s,
and the daemon stops if an actor crashes 5 times within 60 s) or `fatal`
(the daemon shuts down cleanly). Either way the crash is logged with the
actor's name and traceback; no task ever dies silently. An actor's own
concurrent work runs in child tasks (`start_task`): cancelled and awaited when
the actor stops, a failure logged and counted.

Shutdown is an exception (`Shutdown`) raised inside the root TaskGroup, as in
hypercorn; `Supervisor.run` returns after every actor's `stop` ran, in
reverse start order. `Leftovers` then says what was not stopped.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Hashable
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from tunnelmesh.clock import SYSTEM_CLOCK, Clock
from tunnelmesh.tasks import cancel_and_wait

from .messages import ActorStatus

log = logging.getLogger("tunnelmesh.actors")

T = TypeVar("T")
Policy = Literal["restart", "fatal"]
MAX_CRASHES = 5
CRASH_WINDOW = 60.0
#: How long an actor's child tasks get to finish once cancelled; one still running after
#: this is logged (and shows in the leftovers check) rather than holding up shutdown.
CHILD_STOP_TIMEOUT = 5.0
#: How long the leftovers check lets closings already under way finish.
SETTLE = 1.0


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


class _Slot:
    """The place in a mailbox of the latest message for one key (the message is kept
    beside, replaced by each newer one until the slot is reached)."""

    __slots__ = ("key",)

    def __init__(self, key: Hashable) -> None:
        self.key = key


class Mailbox:
    """Messages in arrival order. `size` bounds those put with `offer` and `put`; a
    latest-per-key message takes one slot per key however full the mailbox is, so what
    it holds is bounded by `size` plus the number of keys."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._entries: deque[Any] = deque()
        self._bounded = 0  # entries that count against `size`
        self._latest: dict[Hashable, Any] = {}
        self._arrived = asyncio.Event()
        self._freed = asyncio.Event()

    def __len__(self) -> int:
        return len(self._entries)

    def offer(self, message: Any) -> bool:
        """Add unless full; whether it was added."""
        if self._bounded >= self.size:
            return False
        self._append(message)
        self._bounded += 1
        return True

    async def put(self, message: Any) -> None:
        """Add, waiting for room."""
        while self._bounded >= self.size:
            self._freed.clear()
            await self._freed.wait()
        self._append(message)
        self._bounded += 1

    def put_latest(self, key: Hashable, message: Any) -> None:
        if key not in self._latest:
            self._append(_Slot(key))
        self._latest[key] = message

    async def get(self) -> Any:
        while not self._entries:
            self._arrived.clear()
            await self._arrived.wait()
        entry = self._entries.popleft()
        if entry.__class__ is _Slot:
            return self._latest.pop(entry.key)
        self._bounded -= 1
        self._freed.set()
        return entry

    def _append(self, entry: Any) -> None:
        self._entries.append(entry)
        self._arrived.set()


class Actor:
    """Subclasses implement `handle(message)`; `setup`/`stop` are optional."""

    name = "actor"
    policy: Policy = "restart"
    mailbox_size = 256

    def __init__(self) -> None:
        self.mailbox = Mailbox(self.mailbox_size)
        self.dropped_messages = 0  # told while the mailbox was full
        self.restarts = 0  # after a crash (policy "restart")
        self.task_failures = 0  # child tasks that ended with an exception
        self._children: set[asyncio.Task[Any]] = set()

    def tell(self, message: Any) -> bool:
        """Best effort: dropped (and counted) when the mailbox is full."""
        if self.mailbox.offer(message):
            return True
        self.dropped_messages += 1
        return False

    def tell_latest(self, key: Hashable, message: Any) -> None:
        """Never dropped: the latest message per `key` reaches the actor (an older one
        still waiting is replaced; keys are handled in the order they first arrived)."""
        self.mailbox.put_latest(key, message)

    async def ask(self, body: Any, timeout: float = 10.0) -> Any:
        request = Request(body)
        async with asyncio.timeout(timeout):
            await self.mailbox.put(request)
        async with asyncio.timeout(timeout):
            return await request.reply

    def start_task(self, coro: Coroutine[Any, Any, T], *, name: str) -> asyncio.Task[T]:
        """Run `coro` as a child of this actor: cancelled and awaited when the actor
        stops; an exception it ends with is logged with both names and counted."""
        task = asyncio.get_running_loop().create_task(coro, name=f"{self.name}: {name}")
        self._children.add(task)
        task.add_done_callback(self._child_done)
        return task

    def _child_done(self, task: asyncio.Task[Any]) -> None:
        self._children.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            self.task_failures += 1
            log.error("actor %s: task %s failed: %s", self.name, task.get_name().removeprefix(f"{self.name}: "),
                      exc, exc_info=exc)

    async def stop_tasks(self) -> None:
        """Cancel the child tasks and wait for them (bounded; see CHILD_STOP_TIMEOUT)."""
        children = list(self._children)
        if not children:
            return
        for task in children:
            task.cancel()
        _, pending = await asyncio.wait(children, timeout=CHILD_STOP_TIMEOUT)
        for task in pending:
            log.error("actor %s: task %s still running %g s after it was cancelled", self.name,
                      task.get_name(), CHILD_STOP_TIMEOUT)

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
    def __init__(self, clock: Clock = SYSTEM_CLOCK) -> None:
        self.clock = clock
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
            await cancel_and_wait(task)
        await self._stop(actor)

    def spawn(self, name: str, coro_factory: Callable[[], Awaitable[None]], policy: Policy = "fatal") -> None:
        """Supervise a plain coroutine (e.g. a server loop) like an actor."""
        actor = _CoroutineActor(name, coro_factory, policy)
        self.add(actor)

    def shutdown(self, reason: str, exit_code: int = 0) -> None:
        if self._shutdown is not None and not self._shutdown.done():
            self._shutdown.set_result(Shutdown(reason, exit_code))

    def stats(self) -> list[ActorStatus]:
        return [ActorStatus(actor.name, len(actor.mailbox), actor.dropped_messages, actor.restarts,
                           actor.task_failures, len(actor._children)) for actor in self.actors]

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
                await self._stop(actor)
        assert result is not None
        return result

    @staticmethod
    async def _stop(actor: Actor) -> None:
        await actor.stop_tasks()  # before `stop` releases what they may use
        try:
            await actor.stop()
        except Exception:
            log.exception("%s: error while stopping", actor.name)

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
                now = self.clock.monotonic()
                crashes = [t for t in crashes if now - t < CRASH_WINDOW] + [now]
                if len(crashes) >= MAX_CRASHES:
                    raise Shutdown(f"actor {actor.name} crashed {len(crashes)} times in {CRASH_WINDOW:.0f} s", exit_code=1) from exc
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 30.0)
                actor.restarts += 1
                log.warning("restarting actor %s", actor.name)


class _CoroutineActor(Actor):
    def __init__(self, name: str, factory: Callable[[], Awaitable[None]], policy: Policy) -> None:
        super().__init__()
        self.name = name
        self.policy = policy
        self._factory = factory

    async def run(self) -> None:
        await self._factory()


class Leftovers:
    """What a daemon started and did not stop: made before it starts anything, asked
    after it stopped everything. Asyncio tasks (besides the asker), open file
    descriptors and threads that exist then but did not before."""

    def __init__(self) -> None:
        self._tasks = asyncio.all_tasks()
        self._fds = _open_fds()
        self._threads = set(threading.enumerate())

    async def found(self, settle: float = SETTLE) -> list[str]:
        """One line per thing left behind (empty: none). Shuts the event loop's default
        executor down first, as asyncio.run would next, so that its idle worker threads
        are not counted while one still busy is (its join would wait for it). What is
        closing already (a transport closes on the loop's next iterations, TLS after its
        close_notify exchange) gets up to `settle` seconds to finish."""
        loop = asyncio.get_running_loop()
        await loop.shutdown_default_executor()
        deadline = loop.time() + settle
        while (left := self._left()) and loop.time() < deadline:
            await asyncio.sleep(0.01)
        return left

    def _left(self) -> list[str]:
        current = asyncio.current_task()
        found = [f"task {task.get_name()!r} ({task.get_coro()!r})" for task in asyncio.all_tasks()
                 if task is not current and task not in self._tasks and not task.done()]
        found += [f"fd {fd} ({_described(fd, target)})" for fd, target in sorted(_open_fds().items())
                  if self._fds.get(fd) != target]
        found += [f"thread {thread.name!r}" for thread in threading.enumerate()
                  if thread not in self._threads and thread.is_alive()]
        return found


def _described(fd: int, target: str) -> str:
    """What an fd refers to; for a socket also its kind and addresses, which say whose it is."""
    if not target.startswith("socket:"):
        return target
    try:
        with socket.socket(fileno=os.dup(fd)) as sock:
            try:
                peer = f" to {sock.getpeername()}"
            except OSError:
                peer = ""
            return f"{target} {sock.family.name} {sock.type.name} at {sock.getsockname()}{peer}"
    except OSError:
        return target


def _open_fds() -> dict[int, str]:
    """This process's open file descriptors and what each refers to. The descriptor that
    lists the directory is closed by the time it is read, so it is not among them."""
    fds = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            fds[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue
    return fds
