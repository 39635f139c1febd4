"""The CLI's side of the control socket (docs/control.md; the server is actors/control.py).

`request` sends one command and returns its raw JSON result; `status`, `peers`, `ping`,
`filter_show`, `filter_test`, `ssh_hosts`, `netcheck` and `events` return the schema's dataclasses (actors/messages.py), after checking that
the daemon speaks this client's CONTROL_VERSION.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

from actors.messages import (
    CONTROL_VERSION, ControlSchemaError, Event, FilterRules, FilterVerdict, Netcheck, Peers, PingResult, SshHosts,
    Status, Subscribed, from_json,
)

T = TypeVar("T")

#: The largest reply read (a status of a very large mesh is far below it): whatever is at
#: the socket's path, the CLI's memory stays bounded.
MAX_REPLY = 16 * 1024 * 1024


class ControlError(Exception):
    pass


class NotRunning(ControlError):
    pass


def _connect(path: Path, timeout: float) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(str(path))
    except (FileNotFoundError, ConnectionRefusedError, PermissionError) as exc:
        sock.close()
        raise _connect_error(path, exc) from None
    return sock


def _connect_error(path: Path, exc: OSError) -> ControlError:
    """What a failed connect to the control socket means, for people (the CLI and the TUI)."""
    if isinstance(exc, PermissionError):
        return ControlError(f"permission denied on {path}: run as root (the control socket is owner-only)")
    return NotRunning(f"tunnelmesh is not running (no daemon at {path}); start it with `tunnelmesh up`")


def request(path: Path, cmd: str, timeout: float = 15.0, **args: Any) -> Any:
    with _connect(path, timeout) as sock:
        sock.sendall(json.dumps({"cmd": cmd, **args}).encode() + b"\n")
        reply = _read_line(sock)
    return _result(reply)


def _result(reply: dict[str, Any], missing: str = "unknown error") -> Any:
    """A reply's result; its error as a ControlError."""
    if not reply.get("ok"):
        raise ControlError(str(reply.get("error", missing)))
    return reply.get("result")


def status(path: Path) -> Status:
    return _versioned(Status, request(path, "status"))


def peers(path: Path) -> Peers:
    return _versioned(Peers, request(path, "peers"))


def ping(path: Path, peer: str, wait: float) -> PingResult:
    return _typed(PingResult, request(path, "ping", timeout=wait + 10, peer=peer, wait=wait))


def filter_show(path: Path) -> FilterRules:
    return _versioned(FilterRules, request(path, "filter_show"))


def filter_test(path: Path, peer: str, proto: str, port: int | None) -> FilterVerdict:
    fields: dict[str, Any] = {"peer": peer, "proto": proto} | ({"port": port} if port is not None else {})
    return _versioned(FilterVerdict, request(path, "filter_test", **fields))


def ssh_hosts(path: Path) -> SshHosts:
    return _versioned(SshHosts, request(path, "ssh_hosts"))


def netcheck(path: Path) -> Netcheck:
    """A fresh NAT check and reachability report: the daemon's STUN retries and TCP
    connects take up to a minute at worst."""
    return _versioned(Netcheck, request(path, "netcheck", timeout=90.0))


def events(path: Path) -> Iterator[Event]:
    """The daemon's events as they happen, until it stops or the caller does."""
    with _connect(path, 15.0) as sock:
        sock.settimeout(None)
        sock.sendall(b'{"cmd":"events"}\n')
        reader = sock.makefile("rb")
        reply = _parse_reply(reader.readline(MAX_REPLY + 1) or b"{}")
        _versioned(Subscribed, _result(reply, "the daemon closed the connection without answering"))
        while line := reader.readline(MAX_REPLY + 1):
            yield _typed(Event, _parse_reply(line))


def _versioned(cls: type[T], result: Any) -> T:
    """A reply that carries the control version: one from a daemon of another version is
    refused by its number, before any field can be misread."""
    version = result.get("control_version") if isinstance(result, dict) else None
    if version != CONTROL_VERSION:
        raise ControlError(f"the daemon speaks control version {version}, this client {CONTROL_VERSION}: "
                           "run the same tunnelmesh version for both (restart the daemon after an upgrade)")
    return _typed(cls, result)


def _typed(cls: type[T], result: Any) -> T:
    try:
        return from_json(cls, result)
    except ControlSchemaError as exc:
        raise ControlError(f"the daemon's reply does not fit control version {CONTROL_VERSION}: {exc}") from None


def _read_line(sock: socket.socket) -> dict[str, Any]:
    chunks, size = [], 0
    while size <= MAX_REPLY:
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            raise ControlError("the daemon did not answer in time") from None
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
        if chunk.endswith(b"\n"):
            break
    data = b"".join(chunks)
    if not data:
        raise ControlError("the daemon closed the connection without answering")
    return _parse_reply(data)


def _parse_reply(data: bytes) -> dict[str, Any]:
    """One reply line as a JSON object; ControlError for anything else (too long included)."""
    if len(data) > MAX_REPLY:
        raise ControlError(f"the daemon's reply is larger than {MAX_REPLY // (1024 * 1024)} MiB")
    try:
        reply = json.loads(data)
    except (ValueError, RecursionError):
        raise ControlError("the daemon sent a malformed reply") from None
    if not isinstance(reply, dict):
        raise ControlError("the daemon sent a malformed reply")
    return reply
