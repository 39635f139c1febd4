"""mac1, mac2 and cookie replies (whitepaper 5.4.4, 5.4.7).

`CookieChecker` is the device-level responder side: it verifies mac1 always,
and under load demands mac2 and answers with an encrypted cookie bound to the
sender's address. `CookieGenerator` is the per-peer sender side: it stamps
mac1/mac2 on outgoing handshake messages and stores cookies from replies.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable

from nacl.bindings import crypto_aead_xchacha20poly1305_ietf_decrypt, crypto_aead_xchacha20poly1305_ietf_encrypt
from nacl.exceptions import CryptoError

from .constants import COOKIE_REFRESH_TIME, COOKIE_SECRET_LIFETIME, LABEL_COOKIE, LABEL_MAC1
from .crypto import hash_, mac
from .messages import CookieReply

_ZERO_MAC = bytes(16)


class CookieChecker:
    def __init__(self, local_static_public: bytes, rng: Callable[[int], bytes]) -> None:
        self._mac1_key = hash_(LABEL_MAC1, local_static_public)
        self._cookie_key = hash_(LABEL_COOKIE, local_static_public)
        self._rng = rng
        self._secret = b""
        self._secret_born = float("-inf")

    def check_mac1(self, message: bytes) -> bool:
        return hmac.compare_digest(mac(self._mac1_key, message[:-32]), message[-32:-16])

    def check_mac2(self, message: bytes, source: bytes, now: float) -> bool:
        if now - self._secret_born > COOKIE_SECRET_LIFETIME:
            return False
        cookie = mac(self._secret, source)
        return hmac.compare_digest(mac(cookie, message[:-16]), message[-16:])

    def create_reply(self, message: bytes, receiver: int, source: bytes, now: float) -> bytes:
        if now - self._secret_born > COOKIE_SECRET_LIFETIME:
            self._secret = self._rng(32)
            self._secret_born = now
        cookie = mac(self._secret, source)
        nonce = self._rng(24)
        sealed = crypto_aead_xchacha20poly1305_ietf_encrypt(cookie, message[-32:-16], nonce, self._cookie_key)
        return CookieReply(receiver, nonce, sealed).encode()


class CookieGenerator:
    """Per peer: the keys derived from the peer's public key, the last mac1 we
    sent (the cookie reply's associated data) and the cookie, if any."""

    __slots__ = ("_mac1_key", "_cookie_key", "_last_mac1", "_cookie", "_cookie_born")

    def __init__(self, remote_static_public: bytes) -> None:
        self._mac1_key = hash_(LABEL_MAC1, remote_static_public)
        self._cookie_key = hash_(LABEL_COOKIE, remote_static_public)
        self._last_mac1: bytes | None = None
        self._cookie = b""
        self._cookie_born = float("-inf")

    def add_macs(self, body: bytes, now: float) -> bytes:
        mac1 = mac(self._mac1_key, body)
        self._last_mac1 = mac1
        if now - self._cookie_born < COOKIE_REFRESH_TIME:
            mac2 = mac(self._cookie, body + mac1)
        else:
            mac2 = _ZERO_MAC
        return body + mac1 + mac2

    def consume_reply(self, reply: CookieReply, now: float) -> bool:
        if self._last_mac1 is None:
            return False
        try:
            cookie = crypto_aead_xchacha20poly1305_ietf_decrypt(
                reply.encrypted_cookie, self._last_mac1, reply.nonce, self._cookie_key
            )
        except CryptoError:
            return False
        self._cookie = cookie
        self._cookie_born = now
        self._last_mac1 = None  # one reply per message we sent
        return True


