"""Transports other than UDP: the SSH and WebSocket-relay rungs of the ladder.

A `Link` is one path to one peer on one rung. The protocol core treats it as an
opaque endpoint (hashable by identity, like the (host, port) tuple of a UDP
endpoint): `Peer.endpoint` may hold a link, and the data path sends to it with
`link.send(datagram)` where it would `sendto` a UDP address. Whatever a link
receives goes to its `LinkSink` one WireGuard message at a time, with the link
as the source, exactly as a UDP datagram goes to the core with its address.

The link layer authenticates *who* is at the other end (SSH keys, signed relay
challenge); the WireGuard messages it carries stay end-to-end encrypted and
are authenticated again by the core.
"""

from __future__ import annotations

import logging
from typing import ClassVar, Protocol

from tunnelmesh.clock import SYSTEM_CLOCK, Clock

# Largest WireGuard message a link carries: a transport message for the largest
# MTU we allow (9000) plus header, tag and padding. Anything bigger is a
# counted drop (and, on a byte stream, the end of that connection).
MAX_MESSAGE = 9000 + 32 + 16


#: Repeats of the same refusal (same address, same cause) are logged once per this many seconds.
REFUSAL_LOG_INTERVAL = 60.0
REFUSAL_LOG_ENTRIES = 1024


class RefusalLog:
    """Logs a refusal once per (address, cause) per interval, with how many were not
    logged: a scanner cannot flood the log, whatever keys it makes up. Bounded: when
    full, the oldest entries go (and may be logged again)."""

    def __init__(self, logger: logging.Logger, clock: Clock = SYSTEM_CLOCK) -> None:
        self._logger = logger
        self._clock = clock
        self._last: dict[tuple[str, str], tuple[float, int]] = {}

    def __call__(self, address: str, cause: str, message: str) -> None:
        now = self._clock.monotonic()
        key = (address, cause)
        last = self._last.get(key)
        if last is not None and now - last[0] < REFUSAL_LOG_INTERVAL:
            self._last[key] = (last[0], last[1] + 1)
            return
        again = f" (and {last[1]} more times since)" if last is not None and last[1] else ""
        self._logger.warning("%s%s", message, again)
        self._last.pop(key, None)
        if len(self._last) >= REFUSAL_LOG_ENTRIES:
            del self._last[next(iter(self._last))]
        self._last[key] = (now, 0)


class LinkError(Exception):
    """A link could not be made; the text says why, for `status` (e.g.
    "connection refused on 203.0.113.7:2222")."""


class Link:
    """One path to one peer. Subclasses implement `send` and `close`."""

    rung: ClassVar[str] = ""  # "ssh" or "relay"

    def __init__(self, peer_key: bytes, description: str) -> None:
        self.peer_key = peer_key  # the peer's WireGuard public key, as authenticated by the link
        self.description = description  # e.g. "ssh 203.0.113.7:2222", "relay ws://198.51.100.1:7400"
        self.closed = False

    def send(self, datagram: bytes | bytearray | memoryview) -> None:
        """Queue one WireGuard message; never blocks. Copies `datagram` (the caller
        reuses its buffer). When the link's send buffer is over its bound, the
        message is dropped and counted in `drops`."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.description}>"

    # Identity hashing on purpose: two links to the same peer are different endpoints.
    __hash__ = object.__hash__


class LinkSink(Protocol):
    """Where links deliver: the daemon's data path (and the ladder, through it)."""

    def link_up(self, link: Link) -> None:
        """`link` to `link.peer_key` is authenticated and usable (dialled or accepted)."""

    def link_down(self, link: Link, reason: str) -> None:
        """`link` is gone (closed by either side, or failed); `reason` is for status/logs."""

    def receive(self, link: Link, message: bytes | bytearray | memoryview) -> None:
        """One WireGuard message arrived on `link` (valid only during the call)."""
