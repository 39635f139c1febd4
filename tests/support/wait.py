"""Readiness by a signal: bounded polls of a condition, never a fixed sleep.

`wait_for` in plain code (the e2e tests drive processes), `until` inside an event loop,
`wait_listening` for a server in a lab namespace. Each gives up after `timeout` seconds
(and a matching number of polls) saying what did not happen.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TypeVar

import pytest

from tools.lab import Netns

T = TypeVar("T")


def wait_for(what: str, check: Callable[[], T], timeout: float, details: Callable[[], str] = lambda: "",
             interval: float = 0.05) -> T:
    """Call check() until it returns something truthy, and return that; fail saying `what`
    did not happen within `timeout` s, with details()."""
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / interval) + 2):
        result = check()
        if result:
            return result
        if time.monotonic() >= deadline:
            break
        time.sleep(interval)
    pytest.fail(f"{what} did not happen within {timeout:g} s\n{details()}", pytrace=False)


async def until(what: str, condition: Callable[[], object], timeout: float = 5.0, interval: float = 0.01) -> None:
    """Wait, polling on the running loop's clock, until condition() holds; AssertionError
    saying `what` after `timeout` s."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    for _ in range(int(timeout / interval) + 2):
        if condition():
            return
        if loop.time() > deadline:
            break
        await asyncio.sleep(interval)
    raise AssertionError(f"timed out after {timeout:g} s waiting until {what}")


def wait_listening(node: Netns, port: int, timeout: float = 15.0) -> None:
    """Until something listens on tcp/`port` inside `node`'s namespace, asked of the kernel
    (`ss`) rather than by connecting: a one-shot server would take a probe for its client."""
    wait_for(f"a listener on tcp/{port} in {node.name}",
             lambda: node.run("ss", "-Hltn", f"sport = :{port}").stdout.strip(), timeout, interval=0.1)
