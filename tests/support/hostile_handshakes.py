"""Handshake initiations anyone can make who knows only the target's public key (which
is public): junk, initiations with a valid mac1, and -- once the target has sent a cookie
reply to this sender's address -- with a valid mac2 too. None of them authenticates
(the body is random), so each one that gets past the cookie and the rate limit costs
the target a Diffie-Hellman and ends as "initiation does not authenticate".

Sans-IO; used by tests/unit/test_under_load.py and the sprayer
(tests/support/handshake_sprayer.py) of tests/e2e/test_handshake_flood.py.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

from nacl.bindings import crypto_aead_xchacha20poly1305_ietf_decrypt
from nacl.exceptions import CryptoError

from tunnelmesh.wireguard.constants import LABEL_COOKIE, LABEL_MAC1
from tunnelmesh.wireguard.crypto import hash_, mac

INITIATION_BODY = 116  # type, sender, ephemeral, encrypted static, encrypted timestamp
INITIATION_HEADER = b"\x01\x00\x00\x00"
REMEMBERED = 4096  # mac1s kept to open cookie replies with (a reply's associated data)


class HostileInitiations:
    def __init__(self, target_public: bytes, rng: Callable[[int], bytes]) -> None:
        self._mac1_key = hash_(LABEL_MAC1, target_public)
        self._cookie_key = hash_(LABEL_COOKIE, target_public)
        self._rng = rng
        self._mac1_by_sender: OrderedDict[int, bytes] = OrderedDict()
        self.cookie: bytes | None = None

    def junk(self) -> bytes:
        """The size and header of an initiation, random after it: mac1 fails."""
        return INITIATION_HEADER + self._rng(144)

    def initiation(self, *, with_mac2: bool = False) -> bytes:
        """A random initiation with a valid mac1, and a valid mac2 if asked and a cookie
        is held (else mac2 is zero, as a sender without a cookie sends)."""
        body = INITIATION_HEADER + self._rng(INITIATION_BODY - 4)
        mac1 = mac(self._mac1_key, body)
        sender = int.from_bytes(body[4:8], "little")
        self._mac1_by_sender[sender] = mac1
        if len(self._mac1_by_sender) > REMEMBERED:
            self._mac1_by_sender.popitem(last=False)
        mac2 = mac(self.cookie, body + mac1) if with_mac2 and self.cookie is not None else bytes(16)
        return body + mac1 + mac2

    def take_reply(self, reply: bytes) -> bool:
        """Open a cookie reply to one of our initiations; keep its cookie. False if it is not one."""
        if len(reply) != 64 or reply[0] != 3:
            return False
        mac1 = self._mac1_by_sender.get(int.from_bytes(reply[4:8], "little"))
        if mac1 is None:
            return False
        try:
            self.cookie = crypto_aead_xchacha20poly1305_ietf_decrypt(reply[32:64], mac1, reply[8:32], self._cookie_key)
        except CryptoError:
            return False
        return True
