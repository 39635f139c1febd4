"""A transport keypair: the two AEAD keys of one session, the send counter,
the receive replay window and the indices that name it on the wire.

Python cannot wipe key bytes held by `cryptography`'s objects; "zeroing" a
keypair means dropping every reference to it (and to its raw keys) so nothing
can use it again.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from .replay import ReplayWindow

if TYPE_CHECKING:
    from .peer import Peer


class Keypair:
    __slots__ = ("peer", "sender", "receiver", "local_index", "remote_index", "send_counter", "replay", "created", "initiator")

    def __init__(
        self, peer: Peer, send_key: bytes, receive_key: bytes, *, local_index: int, remote_index: int, created: float, initiator: bool
    ) -> None:
        self.peer = peer
        self.sender = ChaCha20Poly1305(send_key)
        self.receiver = ChaCha20Poly1305(receive_key)
        self.local_index = local_index
        self.remote_index = remote_index
        self.send_counter = 0
        self.replay = ReplayWindow()
        self.created = created
        self.initiator = initiator

    def __repr__(self) -> str:
        role = "initiator" if self.initiator else "responder"
        return f"<Keypair {role} local={self.local_index:#010x} sent={self.send_counter}>"
