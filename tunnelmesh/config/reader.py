"""Reading typed values out of a parsed config's tables: each getter raises a
`ConfigError` naming the file and the line of the key (tunnelmesh/config/checker.py
checks the sections with them)."""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tunnelmesh.config.locator import Locator
from tunnelmesh.config.model import ConfigError
from tunnelmesh.fields import shown


def type_name(value: object) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a float"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return "a date/time"


class TableReader:
    """Typed getters over parsed TOML whose errors name the file and the line."""

    def __init__(self, path: Path, text: str, state_dir: Path) -> None:
        self.path = path
        self.base = path.absolute().parent
        self.state_dir = Path(os.path.abspath(state_dir))
        self.loc = Locator(text)

    def error(self, message: str, *where: Any) -> ConfigError:
        return ConfigError(self.path, self.loc.line_of(*where) if where else None, message)

    # -- typed getters

    def check_keys(self, table: Mapping[str, Any], allowed: tuple[str, ...], what: str, *where: Any) -> None:
        for key in table:
            if key not in allowed:
                raise self.error(
                    f"{what}: unknown key {shown(key)}; allowed keys: {', '.join(allowed)}",
                    *where,
                    key,
                )

    def get_str(
        self, table: Mapping[str, Any], key: str, what: str, *where: Any, required: bool = False
    ) -> str | None:
        if key not in table:
            if required:
                raise self.error(f"{what}: missing required key {key!r}", *where)
            return None
        value = table[key]
        if not isinstance(value, str):
            raise self.error(f"{what}: {key} must be a string, not {type_name(value)}", *where, key)
        return value

    def get_int(
        self, table: Mapping[str, Any], key: str, what: str, *where: Any, default: int, lo: int, hi: int, hint: str = ""
    ) -> int:
        if key not in table:
            return default
        value = table[key]
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(f"{what}: {key} must be an integer, not {type_name(value)}", *where, key)
        if not lo <= value <= hi:
            raise self.error(f"{what}: {key} must be between {lo} and {hi}{hint}, got {value}", *where, key)
        return value

    def get_path(self, table: Mapping[str, Any], key: str, what: str, *where: Any) -> Path | None:
        value = self.get_str(table, key, what, *where)
        if value is None:
            return None
        return self.to_path(value, f"{what}: {key}", *where, key)

    def to_path(self, value: str, what: str, *where: Any) -> Path:
        if not value.strip():
            raise self.error(f"{what}: must not be empty", *where)
        if "\x00" in value:
            raise self.error(f"{what}: must not contain a NUL character", *where)
        p = Path(os.path.expanduser(value))
        return Path(os.path.abspath(self.base / p))

    def get_ipv4(self, table: Mapping[str, Any], key: str, what: str, *where: Any) -> ipaddress.IPv4Address:
        value = self.get_str(table, key, what, *where, required=True)
        assert value is not None
        try:
            ip = ipaddress.IPv4Address(value)
        except ValueError:
            raise self.error(f"{what}: {key}: {shown(value)} is not an IPv4 address", *where, key) from None
        if ip.is_unspecified or ip.is_multicast or ip.is_loopback or ip == ipaddress.IPv4Address("255.255.255.255"):
            raise self.error(f"{what}: {key}: {ip} cannot be a mesh address", *where, key)
        return ip
