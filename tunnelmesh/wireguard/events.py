"""What the protocol core tells its caller happened, besides bytes to send.

The daemon turns these into log lines, status and control-socket events.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Hashable, Union

if TYPE_CHECKING:
    from .peer import Peer


@dataclass(frozen=True, slots=True)
class HandshakeCompleted:
    """`source` is where the proof came from: the response (initiator) or the
    first packet on the new keypair (responder). The transport ladder reads
    its kind (UDP address or link) as the rung that works."""

    peer: Peer
    initiator: bool
    source: Hashable = None


@dataclass(frozen=True, slots=True)
class HandshakeGaveUp:
    """No answer for REKEY_ATTEMPT_TIME; staged packets were dropped."""

    peer: Peer


@dataclass(frozen=True, slots=True)
class KeysZeroed:
    peer: Peer


@dataclass(frozen=True, slots=True)
class NewSource:
    """An authenticated transport message came from `source`, which is not the peer's
    endpoint (said once per change of that other source). The core does not move the
    endpoint: the caller decides whether the peer roamed or another path carried it."""

    peer: Peer
    source: Hashable


Event = Union[HandshakeCompleted, HandshakeGaveUp, KeysZeroed, NewSource]
