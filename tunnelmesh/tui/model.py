"""What the TUI computes from the daemon's replies, apart from any widget: rates from
successive counters, the search filter, the reconnect back-off, and the words and numbers
the screens show. Plain functions and small classes, with time passed in (unit tested in
tests/unit/test_tui_model.py)."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from actors.messages import (
    AdmissionDecided, CoordinatorChanged, EndpointRoamed, Event, FilterStatus, HandshakeDone, HandshakeFailed,
    KeysZeroed, NodeRevoked, PathChanged, PeerAdded, PeerRemoved, PeerStatus, SecretRotated,
)

#: Samples of throughput kept per peer for the sparkline (one per status poll).
HISTORY = 120


@dataclass(slots=True)
class Rates:
    """Bytes per second received from and sent to one peer, between the last two samples."""

    rx: float
    tx: float


@dataclass(slots=True)
class _Sample:
    at: float
    rx_bytes: int
    tx_bytes: int


@dataclass(slots=True)
class RateMeter:
    """Rates per peer from the daemon's byte counters, sampled at each status poll. The first
    sample of a peer has no rate; counters that went back (a restarted daemon, a re-added
    peer) start over rather than show a negative rate."""

    history: dict[str, deque[float]] = field(default_factory=dict)  # rx+tx bytes/s, oldest first
    _last: dict[str, _Sample] = field(default_factory=dict)
    _rates: dict[str, Rates] = field(default_factory=dict)

    def sample(self, name: str, now: float, rx_bytes: int, tx_bytes: int) -> Rates | None:
        last = self._last.get(name)
        self._last[name] = _Sample(now, rx_bytes, tx_bytes)
        if last is None or now <= last.at or rx_bytes < last.rx_bytes or tx_bytes < last.tx_bytes:
            self._rates.pop(name, None)
            return None
        elapsed = now - last.at
        rates = Rates((rx_bytes - last.rx_bytes) / elapsed, (tx_bytes - last.tx_bytes) / elapsed)
        self._rates[name] = rates
        self.history.setdefault(name, deque(maxlen=HISTORY)).append(rates.rx + rates.tx)
        return rates

    def rates(self, name: str) -> Rates | None:
        return self._rates.get(name)

    def keep_only(self, names: Iterable[str]) -> None:
        """Forget peers that are gone (a removed peer's counters are not a new one's)."""
        keep = set(names)
        for table in (self.history, self._last, self._rates):
            for name in set(table) - keep:
                del table[name]


def matches(query: str, peer: PeerStatus) -> bool:
    """The search (`/`): a case-insensitive part of the peer's name or mesh address."""
    query = query.strip().lower()
    return not query or query in peer.name.lower() or query in peer.mesh_ip


def visible(peers: Iterable[PeerStatus], query: str) -> list[PeerStatus]:
    """The peers the table shows: those the search matches, by name."""
    return sorted((p for p in peers if matches(query, p)), key=lambda p: p.name)


@dataclass(slots=True)
class Backoff:
    """Delays between reconnect attempts while the daemon is down: doubling from `first` up
    to `limit` seconds, back to `first` once connected. Bounded, so a daemon that comes
    back is found within `limit` seconds."""

    first: float = 0.5
    limit: float = 8.0
    attempts: int = 0

    def next(self) -> float:
        delay = min(self.first * 2 ** min(self.attempts, 32), self.limit)
        self.attempts += 1
        return delay

    def reset(self) -> None:
        self.attempts = 0


def rate(value: float | None) -> str:
    """Bytes per second, for people: "-" before two samples."""
    if value is None:
        return "-"
    for unit in ("B/s", "KB/s", "MB/s"):
        if value < 1000:
            return f"{value:.0f} {unit}" if unit == "B/s" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} GB/s"


def ago(seconds: float | None) -> str:
    """A duration since something, for people: "-" when it never happened."""
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f} s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.0f} h ago"


def rtt(ms: float | None) -> str:
    return "-" if ms is None else f"{ms:.1f} ms" if ms < 100 else f"{ms:.0f} ms"


def filter_drops(status: FilterStatus | None) -> dict[str, str]:
    """Per peer name, what the packet filter dropped of its packets, in words ("3 denied,
    1 spoofed"); a peer with none is left out (an empty cell)."""
    if status is None:
        return {}
    kinds = (("denied", status.denied_by_peer), ("spoofed", status.spoofed_by_peer))
    names = {name for _, counts in kinds for name, n in counts.items() if n}
    return {name: ", ".join(f"{counts[name]} {kind}" for kind, counts in kinds if counts.get(name)) for name in names}


def describe(event: Event) -> str:
    """One event as a line of the event log."""
    if isinstance(event, PathChanged):
        return f"{event.peer}: {event.previous} -> {event.path.rung} ({event.why}); now {event.path.endpoint}"
    if isinstance(event, EndpointRoamed):
        return f"{event.peer}: endpoint now {event.path.endpoint}"
    if isinstance(event, HandshakeDone):
        who = "we initiated" if event.initiator else "they initiated"
        return f"{event.peer}: handshake ({who}, {event.rung or 'no path'})"
    if isinstance(event, HandshakeFailed):
        return f"{event.peer}: no handshake reply for 90 s"
    if isinstance(event, KeysZeroed):
        return f"{event.peer}: session keys expired"
    if isinstance(event, PeerAdded):
        return f"{event.peer} joined ({event.mesh_ip})"
    if isinstance(event, PeerRemoved):
        return f"{event.peer} removed: {event.reason}"
    if isinstance(event, NodeRevoked):
        return f"this node ({event.peer}) was revoked by the admin: the daemon stops"
    if isinstance(event, CoordinatorChanged):
        return f"coordinator: {event.state}" + (f" ({event.error})" if event.error else "")
    if isinstance(event, SecretRotated):
        return f"network secret rotated (epoch {event.epoch})"
    if isinstance(event, AdmissionDecided):
        return f"admission {event.outcome}: {event.detail}"
    return event.kind


def clock(at: float | None = None) -> str:
    """Local wall-clock time of a log line."""
    return time.strftime("%H:%M:%S", time.localtime(at))
