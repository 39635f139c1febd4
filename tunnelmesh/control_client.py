"""The CLI's side of the control socket (see actors/control.py)."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any


class ControlError(Exception):
    pass


class NotRunning(ControlError):
    pass


def _connect(path: Path, timeout: float) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(str(path))
    except (FileNotFoundError, ConnectionRefusedError):
        sock.close()
        raise NotRunning(f"tunnelmesh is not running (no daemon at {path}); start it with `tunnelmesh up`") from None
    except PermissionError:
        sock.close()
        raise ControlError(f"permission denied on {path}: run as root (the control socket is owner-only)") from None
    return sock


def request(path: Path, cmd: str, timeout: float = 15.0, **args: Any) -> Any:
    with _connect(path, timeout) as sock:
        sock.sendall(json.dumps({"cmd": cmd, **args}).encode() + b"\n")
        reply = _read_line(sock)
    if not reply.get("ok"):
        raise ControlError(str(reply.get("error", "unknown error")))
    return reply.get("result")


def events(path: Path) -> Iterator[dict[str, Any]]:
    with _connect(path, 15.0) as sock:
        sock.settimeout(None)
        sock.sendall(b'{"cmd":"events"}\n')
        reader = sock.makefile("rb")
        for line in reader:
            yield json.loads(line)


def _read_line(sock: socket.socket) -> dict[str, Any]:
    chunks = []
    while True:
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            raise ControlError("the daemon did not answer in time") from None
        if not chunk:
            break
        chunks.append(chunk)
        if chunk.endswith(b"\n"):
            break
    data = b"".join(chunks)
    if not data:
        raise ControlError("the daemon closed the connection without answering")
    try:
        reply = json.loads(data)
    except ValueError:
        raise ControlError("the daemon sent a malformed reply") from None
    if not isinstance(reply, dict):
        raise ControlError("the daemon sent a malformed reply")
    return reply
