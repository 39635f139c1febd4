"""The actor runtime (actors/runtime.py): what must arrive does (tell_latest, ask),
best-effort messages drop counted (tell), an actor's child tasks end with it and never
fail silently, the supervisor's numbers, and the leftovers check."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from typing import Any

import pytest

from actors.messages import ActorStatus
from actors.runtime import Actor, Leftovers, Supervisor
from tests.support.wait import until


class Recorder(Actor):
    """Keeps what it handles; `gate` holds it before each message (a busy actor)."""

    name = "recorder"
    mailbox_size = 4

    def __init__(self) -> None:
        super().__init__()
        self.handled: list[Any] = []
        self.gate = asyncio.Event()
        self.gate.set()

    async def handle(self, message: Any) -> Any:
        await self.gate.wait()
        self.handled.append(message)
        return message


async def drain(actor: Recorder, count: int) -> None:
    """Run the actor until it handled `count` messages."""
    task = asyncio.create_task(actor.run())
    await until(f"the actor handled {count} messages", lambda: len(actor.handled) >= count)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


def test_a_full_mailbox_loses_nothing_sent_with_tell_latest() -> None:
    async def scenario() -> Recorder:
        actor = Recorder()
        for i in range(actor.mailbox_size + 3):
            actor.tell(("told", i))
        for version in range(3):  # every key three times; only the last should arrive
            for key in range(100):
                actor.tell_latest(key, ("latest", key, version))
        await drain(actor, actor.mailbox_size + 100)
        return actor

    actor = asyncio.run(scenario())
    assert actor.dropped_messages == 3  # tell is best effort, and counted
    assert actor.handled == ([("told", i) for i in range(actor.mailbox_size)]
                             + [("latest", key, 2) for key in range(100)])
    assert len(actor.mailbox) == 0


def test_a_latest_message_keeps_the_place_its_key_first_took() -> None:
    async def scenario() -> list[Any]:
        actor = Recorder()
        actor.tell("a")
        actor.tell_latest("k", 1)
        actor.tell("b")
        actor.tell_latest("k", 2)  # replaces 1 in its place, before b
        actor.tell_latest("j", 1)
        await drain(actor, 4)
        actor.tell_latest("k", 3)  # k was handled: a new place, at the end
        actor.tell("c")
        await drain(actor, 6)
        return actor.handled

    assert asyncio.run(scenario()) == ["a", 2, "b", 1, 3, "c"]


def test_ask_waits_for_room_in_a_full_mailbox_and_is_answered() -> None:
    async def scenario() -> tuple[Any, list[Any]]:
        actor = Recorder()
        for i in range(actor.mailbox_size):
            actor.tell(i)
        task = asyncio.create_task(actor.run())
        answer = await actor.ask("question")
        task.cancel()
        return answer, actor.handled

    answer, handled = asyncio.run(scenario())
    assert answer == "question" and handled == [0, 1, 2, 3, "question"]


def test_a_cancel_arriving_as_the_answer_does_is_not_lost() -> None:
    """The asker is cancelled (the daemon stops) in the loop turn its answer arrives in:
    it must end cancelled. Python 3.11's asyncio.wait_for returned the answer instead and
    left the task marked as cancelling: it then sat in its next TaskGroup and the daemon's
    shutdown waited for it for ever (seen after a coordinator failover)."""
    async def scenario() -> tuple[bool, int]:
        actor = Recorder()
        asker = asyncio.create_task(actor.ask("question"))
        request = await actor.mailbox.get()  # the actor's side, by hand: answer, then cancel at once
        request.reply.set_result("answer")
        asker.cancel()
        try:
            await asker
        except asyncio.CancelledError:
            return True, asker.cancelling()
        return False, asker.cancelling()

    assert asyncio.run(scenario()) == (True, 1)


class Parent(Actor):
    """Starts one child task that runs until cancelled and notes that it was."""

    name = "parent"

    def __init__(self) -> None:
        super().__init__()
        self.child: asyncio.Task[None] | None = None
        self.child_ended = False
        self.started = asyncio.Event()

    async def run(self) -> None:
        self.child = self.start_task(self._child(), name="waiter")
        await asyncio.Event().wait()

    async def _child(self) -> None:
        self.started.set()
        try:
            await asyncio.Event().wait()
        finally:
            self.child_ended = True


def test_child_tasks_are_cancelled_and_awaited_when_the_actor_is_removed() -> None:
    async def scenario() -> Parent:
        supervisor = Supervisor()
        parent = Parent()
        supervisor.add(parent)
        running = asyncio.create_task(supervisor.run())
        await parent.started.wait()
        assert supervisor.stats()[0].tasks == 1
        await supervisor.remove(parent)
        supervisor.shutdown("test over")
        await running
        return parent

    parent = asyncio.run(scenario())
    assert parent.child is not None and parent.child.cancelled() and parent.child_ended


def test_child_tasks_are_cancelled_and_awaited_at_shutdown() -> None:
    async def scenario() -> Parent:
        supervisor = Supervisor()
        parent = supervisor.add(Parent())
        running = asyncio.create_task(supervisor.run())
        await parent.started.wait()  # type: ignore[attr-defined]
        supervisor.shutdown("test over")
        await running
        return parent  # type: ignore[return-value]

    parent = asyncio.run(scenario())
    assert parent.child is not None and parent.child.done() and parent.child_ended


def test_a_crashing_child_is_logged_with_the_actors_and_the_tasks_name_and_counted(
        caplog: pytest.LogCaptureFixture) -> None:
    async def boom() -> None:
        raise ValueError("boom")

    async def scenario() -> tuple[Recorder, list[ActorStatus]]:
        supervisor = Supervisor()
        actor = supervisor.add(Recorder())
        task = actor.start_task(boom(), name="exploder")
        with pytest.raises(ValueError):
            await task
        return actor, supervisor.stats()  # type: ignore[return-value]

    with caplog.at_level(logging.ERROR, logger="tunnelmesh.actors"):
        actor, stats = asyncio.run(scenario())
    [record] = [r for r in caplog.records if r.name == "tunnelmesh.actors"]
    assert record.getMessage() == "actor recorder: task exploder failed: boom"
    assert record.exc_info is not None and record.exc_info[0] is ValueError
    assert stats == [ActorStatus("recorder", queued=0, dropped=0, restarts=0, task_failures=1, tasks=0)]


class CrashOnce(Actor):
    name = "crash-once"

    def __init__(self) -> None:
        super().__init__()
        self.runs = 0
        self.again = asyncio.Event()

    async def run(self) -> None:
        self.runs += 1
        if self.runs == 1:
            raise RuntimeError("first run fails")
        self.again.set()
        await asyncio.Event().wait()


def test_stats_show_queued_dropped_and_restarts(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> list[ActorStatus]:
        supervisor = Supervisor()
        crashing = supervisor.add(CrashOnce())
        idle = supervisor.add(Recorder())
        idle.gate.clear()  # type: ignore[attr-defined]
        for i in range(6):
            idle.tell(i)
        idle.tell_latest("k", "v")
        running = asyncio.create_task(supervisor.run())
        await crashing.again.wait()  # type: ignore[attr-defined]  # after the restart backoff (0.5 s)
        stats = supervisor.stats()
        supervisor.shutdown("test over")
        await running
        return stats

    with caplog.at_level(logging.CRITICAL, logger="tunnelmesh.actors"):
        stats = asyncio.run(scenario())
    # The recorder took one message and waits at its gate: 3 bounded + 1 latest still queued.
    assert stats == [ActorStatus("crash-once", queued=0, dropped=0, restarts=1, task_failures=0, tasks=0),
                     ActorStatus("recorder", queued=4, dropped=2, restarts=0, task_failures=0, tasks=0)]


def test_leftovers_names_a_task_an_fd_and_a_thread_started_after_it_and_not_stopped() -> None:
    stop = threading.Event()

    async def scenario() -> tuple[list[str], list[str]]:
        before = asyncio.create_task(asyncio.Event().wait(), name="from before")
        check = Leftovers()
        assert await check.found() == []
        leaked = asyncio.create_task(asyncio.Event().wait(), name="leaked")
        read, write = os.pipe()
        thread = threading.Thread(target=stop.wait, name="leaked-thread")
        thread.start()
        found = await check.found(settle=0.1)
        for task in (before, leaked):
            task.cancel()
        os.close(read)
        os.close(write)
        stop.set()
        thread.join()
        await asyncio.sleep(0)
        return found, await check.found()

    found, after_cleanup = asyncio.run(scenario())
    assert len(found) == 4, found
    assert found[0].startswith("task 'leaked' (") and found[3] == "thread 'leaked-thread'"
    assert all(line.startswith("fd ") and "(pipe:[" in line for line in found[1:3])
    assert after_cleanup == []



def test_leftovers_lets_a_close_under_way_finish() -> None:
    """A transport closes on the loop's next iterations: closed just before the check,
    its socket is not left behind."""
    async def scenario() -> list[str]:
        check = Leftovers()
        server = await asyncio.start_server(lambda reader, writer: writer.close(), "127.0.0.1", 0)
        reader, writer = await asyncio.open_connection(*server.sockets[0].getsockname()[:2])
        server.close()
        await server.wait_closed()
        writer.close()  # the socket itself goes when the loop runs connection_lost
        return await check.found()

    assert asyncio.run(scenario()) == []
