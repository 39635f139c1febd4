"""Where each key, table and array element of a TOML text is: the line numbers that
config errors name (tomllib gives values only)."""

from __future__ import annotations

import bisect
import re
import tomllib
from collections.abc import Mapping
from typing import Any


class Locator:
    """Finds the line of each key, table and array element of a TOML text.

    Runs only on text that ``tomllib`` has already accepted, so it can be a small
    structural scanner. Paths are tuples of keys and array indexes, e.g.
    ``("peers", 1, "mesh_ip")``. It never raises: on any surprise it keeps what it
    found so far, and lookups fall back to the nearest enclosing item.
    """

    def __init__(self, text: str) -> None:
        self.s = text
        self.i = 0
        self.lines: dict[tuple[Any, ...], int] = {}
        self._newlines = [m.start() for m in re.finditer("\n", text)]
        try:
            self._document()
        except Exception:  # noqa: BLE001 - best effort; RecursionError included
            pass

    def line_of(self, *path: Any) -> int | None:
        for n in range(len(path), 0, -1):
            line = self.lines.get(tuple(path[:n]))
            if line is not None:
                return line
        return None

    # -- scanning helpers

    def _line_at(self, pos: int) -> int:
        return bisect.bisect_left(self._newlines, pos) + 1

    def _record(self, path: tuple[Any, ...], pos: int) -> None:
        line = self._line_at(pos)
        for n in range(1, len(path) + 1):
            self.lines.setdefault(path[:n], line)

    def _eof(self) -> bool:
        return self.i >= len(self.s)

    def _skip_blank(self) -> None:
        """Spaces and tabs only."""
        s = self.s
        while self.i < len(s) and s[self.i] in " \t":
            self.i += 1

    def _skip_all(self) -> None:
        """Whitespace, newlines and comments."""
        s = self.s
        while self.i < len(s):
            c = s[self.i]
            if c in " \t\r\n":
                self.i += 1
            elif c == "#":
                end = s.find("\n", self.i)
                self.i = len(s) if end < 0 else end
            else:
                return

    def _expect(self, token: str) -> None:
        if not self.s.startswith(token, self.i):
            raise ValueError("unexpected text")
        self.i += len(token)

    # -- grammar

    def _document(self) -> None:
        table: tuple[Any, ...] = ()
        aot: dict[tuple[Any, ...], int] = {}
        while True:
            self._skip_all()
            if self._eof():
                return
            start = self.i
            if self.s.startswith("[[", self.i):
                self.i += 2
                keys = self._key()
                self._skip_blank()
                self._expect("]]")
                parent = self._resolve(keys[:-1], aot) + (keys[-1],)
                index = aot.get(parent, 0)
                aot[parent] = index + 1
                table = parent + (index,)
                self._record(table, start)
            elif self.s[self.i] == "[":
                self.i += 1
                keys = self._key()
                self._skip_blank()
                self._expect("]")
                table = self._resolve(keys, aot)
                self._record(table, start)
            else:
                self._keyval(table)

    @staticmethod
    def _resolve(keys: tuple[str, ...], aot: Mapping[tuple[Any, ...], int]) -> tuple[Any, ...]:
        out: tuple[Any, ...] = ()
        for k in keys:
            out += (k,)
            if out in aot:
                out += (aot[out] - 1,)
        return out

    def _keyval(self, prefix: tuple[Any, ...]) -> None:
        start = self.i
        keys = self._key()
        path = prefix + keys
        self._record(path, start)
        self._skip_blank()
        self._expect("=")
        self._skip_blank()
        self._value(path)

    def _key(self) -> tuple[str, ...]:
        s = self.s
        keys: list[str] = []
        while True:
            self._skip_blank()
            if self._eof():
                raise ValueError("eof in key")
            c = s[self.i]
            if c == '"':
                start = self.i
                self._basic_string()
                raw = s[start : self.i]
                keys.append(tomllib.loads(f"k = {raw}")["k"])
            elif c == "'":
                end = s.index("'", self.i + 1)
                keys.append(s[self.i + 1 : end])
                self.i = end + 1
            else:
                m = re.compile(r"[A-Za-z0-9_-]+").match(s, self.i)
                if not m:
                    raise ValueError("bad key")
                keys.append(m.group())
                self.i = m.end()
            self._skip_blank()
            if self.i < len(s) and s[self.i] == ".":
                self.i += 1
                continue
            return tuple(keys)

    def _basic_string(self) -> None:
        s = self.s
        j = self.i + 1
        while s[j] != '"':
            j += 2 if s[j] == "\\" else 1
        self.i = j + 1

    def _multiline(self, quote: str) -> None:
        s = self.s
        j = self.i + 3
        while not s.startswith(quote * 3, j):
            j += 2 if (quote == '"' and s[j] == "\\") else 1
            if j >= len(s):
                raise ValueError("eof in string")
        j += 3
        extra = 0
        while extra < 2 and j < len(s) and s[j] == quote:
            j += 1
            extra += 1
        self.i = j

    def _value(self, path: tuple[Any, ...]) -> None:
        s = self.s
        self._record(path, self.i)
        if s.startswith('"""', self.i):
            self._multiline('"')
        elif s.startswith("'''", self.i):
            self._multiline("'")
        elif s[self.i] == '"':
            self._basic_string()
        elif s[self.i] == "'":
            self.i = s.index("'", self.i + 1) + 1
        elif s[self.i] == "[":
            self.i += 1
            index = 0
            while True:
                self._skip_all()
                if s[self.i] == "]":
                    self.i += 1
                    return
                self._value(path + (index,))
                index += 1
                self._skip_all()
                if s[self.i] == ",":
                    self.i += 1
        elif s[self.i] == "{":
            self.i += 1
            while True:
                self._skip_all()
                if s[self.i] == "}":
                    self.i += 1
                    return
                self._keyval(path)
                self._skip_all()
                if s[self.i] == ",":
                    self.i += 1
        else:  # number, boolean, date/time: up to a delimiter
            m = re.compile(r"[^,\]}#\r\n]*").match(s, self.i)
            assert m is not None
            self.i = m.end()
