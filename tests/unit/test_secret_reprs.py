"""No secret in a repr: every object holding secret material (invite seeds, the PSK, the
network secret, private keys, session keys) prints without it, in any encoding.

A repr reaches logs (an actor's failed message, `log.debug("%r", ...)`), tracebacks with
locals and test failure output; none of them may carry the secret. The sweep at the end
keeps new dataclasses honest: a field whose name says it is secret must be `repr=False`."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import importlib
import inspect
import pkgutil
import re
import traceback
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

import actors
import tunnelmesh
from actors.messages import SetPsk
from tests.links import write_key
from tunnelmesh.coordinator.store import NetworkRow
from tunnelmesh.identity import load_identity_file
from tunnelmesh.membership import AdminKey, Token
from tunnelmesh.wireguard.crypto import x25519_private, x25519_public
from tunnelmesh.wireguard.device import Device
from tunnelmesh.wireguard.keypair import Keypair

# Printable on purpose: the raw bytes show up as readable text in a bytes repr.
SECRET = bytes(range(0x41, 0x61))


def _forms(secret: bytes) -> list[str]:
    """The ways a secret could appear in text: raw (as a bytes repr shows it), hex, base64,
    URL-safe base64 (padded or not)."""
    forms = [
        repr(secret)[2:-1],
        secret.hex(),
        secret.hex().upper(),
        base64.b64encode(secret).decode(),
        base64.urlsafe_b64encode(secret).decode(),
    ]
    return forms + [form.rstrip("=") for form in forms]


def assert_hidden(obj: object, secret: bytes) -> None:
    for text in (repr(obj), str(obj)):
        for form in _forms(secret):
            assert form not in text, f"secret shown in {type(obj).__name__}'s repr/str: {text}"


def test_forms_catch_a_leak() -> None:
    """The check itself: a plain repr of the bytes is caught."""
    with pytest.raises(AssertionError):
        assert_hidden(("x", SECRET), SECRET)
    with pytest.raises(AssertionError):
        assert_hidden(base64.urlsafe_b64encode(SECRET).decode().rstrip("="), SECRET)


def test_token_hides_the_invite_seed() -> None:
    token = Token("https://coord.example", "net", {"kind": "invite"}, SECRET)
    assert_hidden(token, SECRET)
    # What it is for still works: the token carries the seed.
    assert Token.parse(token.encode()).invite_seed == SECRET


def test_set_psk_hides_the_psk() -> None:
    assert_hidden(SetPsk(SECRET), SECRET)


def test_network_row_holds_no_secret() -> None:
    """The coordinator does not hold the network secret; whatever the row holds prints
    without one."""
    values: dict[str, Any] = {}
    for f in dataclasses.fields(NetworkRow):
        values[f.name] = SECRET if f.name == "secret" else ({} if "record" in f.name else 1)
    assert_hidden(NetworkRow(**values), SECRET)


def test_admin_key_hides_its_seed() -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = AdminKey(Ed25519PrivateKey.from_private_bytes(SECRET))
    assert_hidden(key, SECRET)


def test_node_identity_hides_its_private_key(tmp_path: Path) -> None:
    identity = asyncio.run(load_identity_file(write_key(tmp_path / "id")))
    assert_hidden(identity, identity.static_private)


def test_device_peer_and_keypair_hide_their_keys() -> None:
    private = x25519_private()
    device = Device(private)
    peer = device.add_peer(x25519_public(x25519_private()), preshared_key=SECRET)
    keypair = Keypair(peer, bytes(32 * [7]), bytes(32 * [9]), local_index=1, remote_index=2, created=0.0,
                      initiator=True)
    assert_hidden(device, private)
    assert_hidden(peer, SECRET)
    assert_hidden(keypair, bytes(32 * [7]))
    assert_hidden(keypair, bytes(32 * [9]))


def _raise_with(token: Token, psk: SetPsk) -> None:
    raise RuntimeError(f"failed with {len(token.grant)} and {len(psk.psk)}")


def test_traceback_with_locals_hides_secrets() -> None:
    """Even a traceback formatted with its locals (as some loggers and test runners do)."""
    token = Token("https://coord.example", "net", {}, SECRET)
    try:
        _raise_with(token, SetPsk(SECRET))
    except RuntimeError as exc:
        text = "".join(traceback.TracebackException.from_exception(exc, capture_locals=True).format())
    assert "token" in text and "psk" in text
    assert_hidden(text, SECRET)


# --- the sweep -------------------------------------------------------------------------------

# A field name that says the value is secret material.
_SECRET_NAME = re.compile(r"(^|_)(secret|seed|psk|preshared|private|passphrase|password|session_key)(_|$)")
# Names that match but hold no secret, and why.
_NOT_SECRET = {
    "secret_record",  # the admin's record of a rotation: the secret sealed to each member
    "new_secret",  # MapChanges: such a record (sealed), not the secret
    "secret_version",  # a counter
    "secret_epoch",  # a counter
    "network_secret_file",  # a path
    "passphrase_file",  # a path
}


def _modules() -> Iterator[ModuleType]:
    for package in (tunnelmesh, actors):
        yield package
        for info in pkgutil.walk_packages(package.__path__, f"{package.__name__}."):
            if not info.name.endswith("__main__"):
                yield importlib.import_module(info.name)


def test_no_dataclass_shows_a_secret_field() -> None:
    shown = []
    checked = 0
    for module in _modules():
        for name, cls in vars(module).items():
            if inspect.isclass(cls) and cls.__module__ == module.__name__ and dataclasses.is_dataclass(cls):
                for f in dataclasses.fields(cls):
                    if _SECRET_NAME.search(f.name) and f.name not in _NOT_SECRET:
                        checked += 1
                        if f.repr:
                            shown.append(f"{module.__name__}.{name}.{f.name}")
    assert checked >= 2  # Token.invite_seed and SetPsk.psk at least: the sweep sees the package
    assert not shown, f"secret fields in a dataclass repr (use field(repr=False)): {shown}"
