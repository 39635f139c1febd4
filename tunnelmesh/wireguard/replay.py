"""The anti-replay window of wireguard-go and Linux (RFC 6479 style).

A ring of 128 blocks of 64 bits. A counter is accepted when it is below the
reject limit, not more than 8128 behind the highest seen, and not seen before.
Callers check it only after the packet's tag has verified, so forged packets
cannot move the window.
"""

from __future__ import annotations

from .constants import REJECT_AFTER_MESSAGES, REPLAY_RING_BLOCKS, REPLAY_WINDOW

_BLOCK_SHIFT = 6
_BIT_MASK = 63
_RING_MASK = REPLAY_RING_BLOCKS - 1


class ReplayWindow:
    __slots__ = ("_last", "_ring")

    def __init__(self) -> None:
        self._last = 0
        self._ring = [0] * REPLAY_RING_BLOCKS

    def check_and_update(self, counter: int, limit: int = REJECT_AFTER_MESSAGES) -> bool:
        if counter >= limit:
            return False
        block = counter >> _BLOCK_SHIFT
        last = self._last
        if counter > last:
            current = last >> _BLOCK_SHIFT
            diff = min(block - current, REPLAY_RING_BLOCKS)
            ring = self._ring
            for i in range(current + 1, current + diff + 1):
                ring[i & _RING_MASK] = 0
            self._last = counter
        elif last - counter > REPLAY_WINDOW:
            return False
        index = block & _RING_MASK
        bit = 1 << (counter & _BIT_MASK)
        old = self._ring[index]
        if old & bit:
            return False
        self._ring[index] = old | bit
        return True
