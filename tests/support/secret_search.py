"""Seeking secrets in what a program wrote: raw, hex (either case), base64 and base64url,
at every alignment inside a longer base64 text. Used by the secret sweeps
(tests/e2e/test_secret_sweep.py, tests/unit/test_session_key_sweep.py)."""

from __future__ import annotations

import base64
from collections.abc import Callable


def base64_forms(secret: bytes, alphabet: Callable[[bytes], bytes]) -> list[bytes]:
    """The base64 characters that `secret` alone determines, at each of the three
    alignments it can have inside a longer base64 text (so a secret in the middle of an
    encoded blob is found too)."""
    forms = []
    for shift in range(3):
        encoded = alphabet(bytes(shift) + secret)
        first = -(-8 * shift // 6)  # the first character with no bits of the padding bytes
        last = 8 * (shift + len(secret)) // 6  # past the last character made of the secret's bits only
        forms.append(encoded[first:last])
    return forms


def encodings(secret: bytes) -> dict[str, bytes]:
    """The forms of `secret` sought: raw, hex (either case), base64 and base64url."""
    forms = {"raw": secret, "hex": secret.hex().encode(), "HEX": secret.hex().upper().encode()}
    for name, alphabet in (("base64", base64.b64encode), ("base64url", base64.urlsafe_b64encode)):
        for shift, form in enumerate(base64_forms(secret, alphabet)):
            forms[f"{name}@{shift}"] = form
    return forms


def search(text: bytes, secrets: dict[str, bytes]) -> list[str]:
    """Every (secret, form) of `secrets` found in `text`, named."""
    return [f"{name} ({form})" for name, secret in secrets.items()
            for form, needle in encodings(secret).items() if needle in text]
