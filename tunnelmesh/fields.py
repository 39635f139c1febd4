"""Checks of values that come from outside (JSON records and request bodies, config
values), shared by tunnelmesh.membership, tunnelmesh.config and the coordinator service.

`Fields` holds the JSON checks and raises the caller's own error type (a record that
fails is a MembershipError, a request body a 400), with one wording everywhere:
``"<what>: expected ..."``. `parse_endpoint` is the one host:port parser. Messages
never repeat a long value in full (`shown`): it may be a pasted private key.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
from collections.abc import Callable, Mapping
from typing import Any

#: What a network member's or a node's name may be: one DNS label, lower case.
NAME_RULE = "must be 1 to 63 characters of a-z, 0-9 and '-', not starting or ending with '-'"
_NAME_RE = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
_HOST_LABEL_RE = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_PORT_RE = re.compile(r"[0-9]{1,5}")
#: The longest base64 text decoded at all (a record is at most 64 KiB).
MAX_BASE64_CHARS = 4 * 64 * 1024


class FieldError(ValueError):
    """A value that cannot be used; the message says why (the caller names the value)."""


def shown(value: str) -> str:
    """A value fit for an error message: short and on one line, else not shown at all."""
    if len(value) > 64 or any(c in value for c in "\r\n"):
        return f"(a {len(value)}-character string)"
    return repr(value)


def is_name(value: Any) -> bool:
    """Whether `value` is a name as NAME_RULE says."""
    return isinstance(value, str) and _NAME_RE.fullmatch(value) is not None


def decode_base64(value: str, size: int | None = None) -> bytes | None:
    """Strict standard base64 (of exactly `size` bytes if given), else None."""
    if len(value) > MAX_BASE64_CHARS:
        return None
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return None
    return data if size is None or len(data) == size else None


class Fields:
    """The JSON field checks, raising ``error(message)``: e.g. ``Fields(MembershipError)``."""

    def __init__(self, error: Callable[[str], Exception]) -> None:
        self.error = error

    def object(self, value: Any, what: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.error(f"{what}: expected a JSON object")
        return value

    def list(self, value: Any, what: str) -> list[Any]:
        if not isinstance(value, list):
            raise self.error(f"{what}: expected a list")
        return value

    def keys(self, obj: Mapping[str, Any], required: set[str], what: str,
             optional: frozenset[str] | set[str] = frozenset()) -> None:
        missing = required - obj.keys()
        extra = obj.keys() - required - optional
        if missing:
            raise self.error(f"{what}: missing {', '.join(sorted(missing))}")
        if extra:
            # Bounded and quoted: these names come from whoever sent the object.
            names = ", ".join(sorted(repr(str(k))[:40] for k in extra)[:5])
            raise self.error(f"{what}: unexpected {names}{', ...' if len(extra) > 5 else ''}")

    def integer(self, value: Any, what: str, lo: int = 0, hi: int = 2**53) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise self.error(f"{what}: expected an integer from {lo} to {hi}")
        return value

    def text(self, value: Any, what: str, limit: int = 1024) -> str:
        if not isinstance(value, str) or len(value) > limit:
            raise self.error(f"{what}: expected text of at most {limit} characters")
        return value

    def base64(self, value: Any, what: str, size: int | None = None) -> bytes:
        if not isinstance(value, str) or len(value) > MAX_BASE64_CHARS:
            raise self.error(f"{what}: expected base64 text")
        data = decode_base64(value)
        if data is None:
            raise self.error(f"{what}: not valid base64")
        if size is not None and len(data) != size:
            raise self.error(f"{what}: expected {size} bytes, got {len(data)}")
        return data

    def name(self, value: Any, what: str = "name") -> str:
        if not is_name(value):
            raise self.error(f"{what} {NAME_RULE}")
        return value


def parse_endpoint(text: str, *, ipv4_only: bool = False) -> tuple[str, int]:
    """``host:port`` as (host, port): the host an IPv4 address, an IPv6 address in brackets
    or a DNS name -- or, with `ipv4_only`, an IPv4 address only. Raises FieldError saying
    what is wrong; the caller names the value."""
    usage = "expected IPv4:port" if ipv4_only else "expected host:port, or [IPv6 address]:port"
    if text.startswith("[") and not ipv4_only:
        close = text.find("]")
        if close < 0 or not text.startswith(":", close + 1):
            raise FieldError(usage)
        host_text, port_text = text[1:close], text[close + 2:]
        try:
            host = str(ipaddress.IPv6Address(host_text))
        except ValueError:
            raise FieldError("not an IPv6 address in brackets") from None
    else:
        host_text, sep, port_text = text.rpartition(":")
        if not sep or not host_text or (ipv4_only and ":" in host_text):
            raise FieldError(usage)
        if ":" in host_text:
            raise FieldError("write an IPv6 address as [address]:port")
        try:
            host = str(ipaddress.IPv4Address(host_text))
        except ValueError:
            if ipv4_only:
                raise FieldError(f"{usage} ({shown(host_text)} is not an IPv4 address)") from None
            if not _is_host_name(host_text):
                raise FieldError(f"{shown(host_text)} is neither an IP address nor a host name") from None
            host = host_text
    if _PORT_RE.fullmatch(port_text) is None or not 1 <= int(port_text) <= 65535:
        raise FieldError(f"{usage} (the port must be 1 to 65535)" if ipv4_only else "port must be 1 to 65535")
    return host, int(port_text)


def _is_host_name(text: str) -> bool:
    """DNS labels (any case, a trailing dot allowed), not all numbers (a mistyped address)."""
    name = text[:-1] if text.endswith(".") else text
    labels = name.split(".")
    return (len(name) <= 253 and all(_HOST_LABEL_RE.fullmatch(label) for label in labels)
            and not all(label.isdigit() for label in labels))
