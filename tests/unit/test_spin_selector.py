"""The daemon loop's selector (actors/spin.py): it polls for a moment after the turn
that ends a quiet spell, never under a steady stream, never past a timeout, less after
spins that caught nothing, and within its share of the time whatever the traffic."""

from __future__ import annotations

import asyncio
import selectors
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from actors.control_api import _spin_status
from actors.messages import SpinStatus
from actors.spin import SpinningLoop, SpinningSelector


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    a.setblocking(False)
    yield a, b
    a.close()
    b.close()


def send_later(sock: socket.socket, delay: float) -> threading.Timer:
    timer = threading.Timer(delay, sock.send, args=(b"x",))
    timer.start()
    return timer


def ready_after(selector: SpinningSelector, receiver: socket.socket, timeout: float | None) -> bool:
    ready = selector.select(timeout)
    if ready:
        receiver.recv(16)
    return bool(ready)


def end_a_quiet_spell(selector: SpinningSelector, receiver: socket.socket, sender: socket.socket) -> None:
    """A blocking wait of ~50 ms that a datagram ends (quiet is 20 ms in these tests)."""
    timer = send_later(sender, 0.05)
    assert ready_after(selector, receiver, 5)
    timer.join()


def test_the_answer_after_a_quiet_spell_is_polled_for(pair: tuple[socket.socket, socket.socket]) -> None:
    receiver, sender = pair
    with SpinningSelector(longest=2.0, quiet=0.02, burst=2.0) as selector:
        selector.register(receiver, selectors.EVENT_READ)
        end_a_quiet_spell(selector, receiver, sender)
        assert selector.spins == 0
        send_later(sender, 0.01)  # the answer, well within the spin
        started = time.monotonic()
        assert ready_after(selector, receiver, None)
        assert time.monotonic() - started < 1.5
        assert (selector.spins, selector.caught) == (1, 1)
        assert 0 < selector.spun < 1.5


def test_a_steady_stream_never_spins(pair: tuple[socket.socket, socket.socket]) -> None:
    receiver, sender = pair
    with SpinningSelector(longest=2.0, quiet=0.5, burst=2.0) as selector:
        selector.register(receiver, selectors.EVENT_READ)
        for _ in range(5):  # each datagram already waiting: no wait is a quiet spell
            sender.send(b"x")
            assert ready_after(selector, receiver, 5)
        assert selector.spins == 0


def test_one_spin_per_quiet_spell_and_never_past_the_timeout(pair: tuple[socket.socket, socket.socket]) -> None:
    receiver, sender = pair
    with SpinningSelector(longest=30.0, quiet=0.02, burst=30.0) as selector:
        selector.register(receiver, selectors.EVENT_READ)
        end_a_quiet_spell(selector, receiver, sender)
        assert selector.select(0) == []  # a loop with callbacks waiting neither spins nor spends the spin
        assert selector.spins == 0
        started = time.monotonic()
        assert not ready_after(selector, receiver, 0.05)  # spins, but only as long as the timeout
        assert time.monotonic() - started < 5
        assert (selector.spins, selector.caught) == (1, 0)
        assert not ready_after(selector, receiver, 0.01)  # no quiet spell ended since: it just waits
        assert selector.spins == 1


def spins_answered_after(selector: SpinningSelector, receiver: socket.socket, sender: socket.socket,
                         delays: list[float]) -> list[float]:
    """A select per delay, with a datagram sent that long after it began: the time each
    select spent spinning."""
    lengths = []
    for delay in delays:
        spun, timer = selector.spun, send_later(sender, delay)
        assert ready_after(selector, receiver, 5)
        timer.join()
        lengths.append(selector.spun - spun)
    return lengths


def the_next_spin_is_the_longest(selector: SpinningSelector, receiver: socket.socket) -> bool:
    """(Nothing comes: the whole spin shows.)"""
    spun = selector.spun
    assert not ready_after(selector, receiver, 1.0)
    return selector.spun - spun >= 0.19


def test_spins_that_catch_nothing_get_shorter_and_one_that_catches_restores_them(
        pair: tuple[socket.socket, socket.socket]) -> None:
    receiver, sender = pair
    with SpinningSelector(longest=0.2, shortest=0.02, quiet=0.02, burst=10.0, share=1.0) as selector:
        selector.register(receiver, selectors.EVENT_READ)
        # The answering side: a request every 0.4 s, nothing in between; each spin gives up,
        # each wait ends a quiet spell. 0, 0.2, 0.1, 0.05, 0.025 (a busy machine may stretch
        # a spin by a few ms).
        lengths = spins_answered_after(selector, receiver, sender, [0.4] * 5)
        assert lengths[0] == 0 and lengths[1] >= 0.19 and 0.09 <= lengths[2] < 0.17, lengths
        assert 0.045 <= lengths[3] < 0.12 and 0.02 <= lengths[4] < 0.08, lengths
        send_later(sender, 0.005)  # caught: the full length again next time
        assert ready_after(selector, receiver, 5) and selector.caught == 1
        end_a_quiet_spell(selector, receiver, sender)
        assert the_next_spin_is_the_longest(selector, receiver)


def test_a_miss_the_longest_spin_would_have_caught_restores_it(pair: tuple[socket.socket, socket.socket]) -> None:
    receiver, sender = pair
    with SpinningSelector(longest=0.2, shortest=0.02, quiet=0.02, burst=10.0, share=1.0) as selector:
        selector.register(receiver, selectors.EVENT_READ)
        spins_answered_after(selector, receiver, sender, [0.4] * 4)  # the spins shrink to 0.025 s
        # An answer the 0.025 s spin misses and 0.2 s would not; its wait ends a quiet spell.
        assert spins_answered_after(selector, receiver, sender, [0.1])[0] < 0.09 and selector.caught == 0
        assert the_next_spin_is_the_longest(selector, receiver)


def test_spinning_stays_within_its_share_of_the_time(pair: tuple[socket.socket, socket.socket]) -> None:
    receiver, sender = pair
    # Halving disabled (shortest == longest): only the budget bounds it.
    with SpinningSelector(longest=0.05, shortest=0.05, quiet=0.02, share=0.1, burst=0.1) as selector:
        selector.register(receiver, selectors.EVENT_READ)
        started = time.monotonic()
        for _ in range(12):  # a packet every ~50 ms, each ending a quiet spell
            end_a_quiet_spell(selector, receiver, sender)
        elapsed = time.monotonic() - started
        # Without the budget: ~11 spins of 50 ms. With it: the burst, then 10% of the time.
        assert selector.spun <= 0.1 + 0.1 * elapsed + 0.05, (selector.spun, elapsed)
        assert selector.spins >= 2  # it did spin: the bound is the budget's, not a spin that never ran


def test_the_daemon_loop_runs_asyncio_and_reports_its_counters() -> None:
    async def main() -> tuple[str, SpinStatus | None]:
        loop = asyncio.get_running_loop()
        woken: asyncio.Future[str] = loop.create_future()
        threading.Timer(0.05, loop.call_soon_threadsafe, args=(woken.set_result, "woken")).start()
        async with asyncio.timeout(5):
            answer = await woken
        await asyncio.sleep(0.01)  # the loop's next wait: it polls first
        return answer, _spin_status()

    async def another_loop() -> SpinStatus | None:
        return _spin_status()

    with asyncio.Runner(loop_factory=SpinningLoop) as runner:
        woken, status = runner.run(main())
    assert woken == "woken"  # a wake-up from another thread (the loop's self-pipe) ends a quiet spell too
    assert status is not None and status.spins >= 1 and status.seconds >= 0
    assert asyncio.run(another_loop()) is None  # a plain asyncio loop has none
