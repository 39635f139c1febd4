"""`cancel_and_wait` (tunnelmesh/tasks.py): stopping a task never eats a cancel of the
caller's own, and no code of the project stops tasks the way that does."""

from __future__ import annotations

import ast
import asyncio
from contextlib import suppress
from pathlib import Path

import pytest

from tunnelmesh.tasks import cancel_and_wait

ROOT = Path(__file__).resolve().parents[2]


async def slow_to_stop(stopping: asyncio.Event) -> None:
    """A task that takes a few loop turns to finish once cancelled (closing a socket)."""
    try:
        await asyncio.sleep(3600)
    finally:
        stopping.set()
        await asyncio.sleep(0.01)


async def stop_child_then_carry_on(stop: object, stopping: asyncio.Event, after: list[str]) -> None:
    child = asyncio.create_task(slow_to_stop(stopping))
    await asyncio.sleep(0)
    if stop is cancel_and_wait:
        await cancel_and_wait(child)
    else:  # the pattern the helper replaced
        child.cancel()
        with suppress(asyncio.CancelledError):
            await child
    after.append("carried on")  # what a cancelled caller must never reach
    await asyncio.sleep(3600)


@pytest.mark.parametrize("stop", [cancel_and_wait, "suppress"])
def test_a_cancel_of_the_caller_while_it_waits_reaches_the_caller(stop: object) -> None:
    async def main() -> list[str]:
        stopping, after = asyncio.Event(), []
        caller = asyncio.create_task(stop_child_then_carry_on(stop, stopping, after))
        await stopping.wait()  # the child is finishing: now the caller is cancelled (a shutdown)
        caller.cancel()
        await asyncio.wait([caller], timeout=2)
        caller.cancel()  # the old pattern's caller is still running: stopped for good
        await asyncio.wait([caller])
        return after

    after = asyncio.run(main())
    if stop is cancel_and_wait:
        assert after == []
    else:  # proves the test can tell: the old pattern lost the cancel
        assert after == ["carried on"]


def test_the_tasks_own_end_is_not_raised() -> None:
    async def fails_when_cancelled() -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            raise ConnectionResetError("closing failed") from None

    async def main() -> bool:
        task = asyncio.create_task(fails_when_cancelled())
        await asyncio.sleep(0)
        await cancel_and_wait(task)
        done = asyncio.create_task(asyncio.sleep(0))
        await done
        await cancel_and_wait(done)  # one that has ended already
        return task.done() and isinstance(task.exception(), ConnectionResetError)

    assert asyncio.run(main())


def swallowed_cancels(source: str) -> list[int]:
    """Lines that catch CancelledError without raising again: `with suppress(...
    CancelledError ...)` and `except ... CancelledError ...:` with no `raise` inside."""
    def names_cancel(node: ast.AST) -> bool:
        return any(isinstance(n, (ast.Name, ast.Attribute)) and (getattr(n, "id", None) or getattr(n, "attr", None))
                   == "CancelledError" for n in ast.walk(node))

    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.With, ast.AsyncWith)):
            for item in node.items:
                call = item.context_expr
                if isinstance(call, ast.Call) and getattr(call.func, "id", getattr(call.func, "attr", None)) == "suppress" \
                        and any(names_cancel(arg) for arg in call.args):
                    lines.append(node.lineno)
        elif isinstance(node, ast.ExceptHandler) and node.type is not None and names_cancel(node.type):
            if not any(isinstance(n, ast.Raise) for n in ast.walk(node)):
                lines.append(node.lineno)
    return lines


def test_the_finder_sees_both_spellings() -> None:
    assert swallowed_cancels("from contextlib import suppress\nimport asyncio\nasync def f(t):\n"
                             "    with suppress(asyncio.CancelledError):\n        await t\n") == [4]
    assert swallowed_cancels("async def f(t):\n    try:\n        await t\n    except CancelledError:\n"
                             "        pass\n") == [4]
    assert swallowed_cancels("async def f(t):\n    try:\n        await t\n    except CancelledError:\n"
                             "        cleanup()\n        raise\n") == []


def test_no_code_of_the_project_swallows_a_cancel() -> None:
    found = [f"{path.relative_to(ROOT)}:{line}" for folder in ("tunnelmesh", "actors", "tools")
             for path in sorted((ROOT / folder).rglob("*.py")) for line in swallowed_cancels(path.read_text())]
    assert not found, f"use tunnelmesh.tasks.cancel_and_wait (or re-raise): {found}"
