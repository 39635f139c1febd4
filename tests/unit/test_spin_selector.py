"""The daemon loop's selector (actors/spin.py): it polls for a moment after the turn
that ends a quiet spell, never under a steady stream, and never past a timeout."""

from __future__ import annotations

import selectors
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from actors.spin import SpinningSelector


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    a.setblocking(False)
    yield a, b
    a.close()
    b.close()


def send_later(sock: socket.socket, delay: float) -> threading.Thread:
    thread = threading.Timer(delay, sock.send, args=(b"x",))
    thread.start()
    return thread


def ready_after(selector: SpinningSelector, receiver: socket.socket, timeout: float) -> bool:
    ready = selector.select(timeout)
    if ready:
        receiver.recv(16)
    return bool(ready)


def test_the_answer_after_a_quiet_spell_is_polled_for(pair: tuple[socket.socket, socket.socket]) -> None:
    receiver, sender = pair
    with SpinningSelector(spin=2.0, quiet=0.02) as selector:
        selector.register(receiver, selectors.EVENT_READ)
        send_later(sender, 0.05)
        assert ready_after(selector, receiver, 5)  # a blocking wait of 50 ms: a quiet spell ended
        assert selector.spins == 0
        send_later(sender, 0.01)  # the answer, well within the spin
        started = time.monotonic()
        assert ready_after(selector, receiver, 5)
        assert time.monotonic() - started < 1.5
        assert (selector.spins, selector.caught) == (1, 1)


def test_a_steady_stream_never_spins(pair: tuple[socket.socket, socket.socket]) -> None:
    receiver, sender = pair
    with SpinningSelector(spin=2.0, quiet=0.5) as selector:
        selector.register(receiver, selectors.EVENT_READ)
        for _ in range(5):  # each datagram already waiting: no wait is a quiet spell
            sender.send(b"x")
            assert ready_after(selector, receiver, 5)
        assert selector.spins == 0


def test_one_spin_per_quiet_spell_and_never_past_the_timeout(pair: tuple[socket.socket, socket.socket]) -> None:
    receiver, sender = pair
    with SpinningSelector(spin=30.0, quiet=0.02) as selector:
        selector.register(receiver, selectors.EVENT_READ)
        send_later(sender, 0.05)
        assert ready_after(selector, receiver, 5)
        started = time.monotonic()
        assert not ready_after(selector, receiver, 0.05)  # spins, but only as long as the timeout
        assert time.monotonic() - started < 5
        assert (selector.spins, selector.caught) == (1, 0)
        assert not ready_after(selector, receiver, 0.01)  # no quiet spell ended since: it just waits
        assert selector.spins == 1
        assert selector.select(0) == []  # a loop with callbacks waiting never spins
