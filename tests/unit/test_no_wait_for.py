"""Python 3.11's `asyncio.wait_for` loses a cancel that arrives in the loop turn its
awaitable finishes: it returns the result, and the task goes on marked as cancelling, so
the next TaskGroup it enters waits for ever and a daemon's shutdown hangs with it (fixed
in 3.12, which builds wait_for on `asyncio.timeout`). The project supports 3.11: its code
uses `async with asyncio.timeout(...)`, which passes such a cancel on."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def wait_for_calls(source: str) -> list[int]:
    """Lines that call `asyncio.wait_for` (or a bare `wait_for` imported from asyncio)."""
    tree = ast.parse(source)
    imported = {alias.asname or alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                and node.module == "asyncio" for alias in node.names if alias.name == "wait_for"}
    lines = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if (isinstance(func, ast.Attribute) and func.attr == "wait_for" and isinstance(func.value, ast.Name)
                and func.value.id == "asyncio") or (isinstance(func, ast.Name) and func.id in imported):
            lines.append(node.lineno)
    return lines


def test_the_finder_sees_both_spellings() -> None:
    assert wait_for_calls("import asyncio\nasync def f(x):\n    await asyncio.wait_for(x, 1)\n") == [3]
    assert wait_for_calls("from asyncio import wait_for as w\nasync def f(x):\n    await w(x, 1)\n") == [3]
    assert wait_for_calls("import asyncio\nasync def f(x):\n    async with asyncio.timeout(1):\n"
                          "        await x\n") == []


def test_no_code_of_the_project_uses_asyncio_wait_for() -> None:
    found = [f"{path.relative_to(ROOT)}:{line}" for folder in ("tunnelmesh", "actors", "tools")
             for path in sorted((ROOT / folder).rglob("*.py")) for line in wait_for_calls(path.read_text())]
    assert found == [], f"use `async with asyncio.timeout(...)` instead of asyncio.wait_for at {found}"
