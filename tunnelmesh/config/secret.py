"""The network secret file of a static mesh: base64 of 32 bytes, mode 0600."""

from __future__ import annotations

import base64
import os
import stat
from pathlib import Path

from tunnelmesh import files
from tunnelmesh.fields import decode_base64
from tunnelmesh.config.model import NETWORK_SECRET_BYTES, ConfigError


def _secret_mode_problem(mode: int) -> bool:
    return bool(mode & 0o077)


def read_network_secret(path: Path) -> bytes:
    """Read the network secret: base64 of 32 bytes in a file only its owner can read.

    Raises ``ConfigError`` (never with any part of the file's content)."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise ConfigError(path, None, f"cannot read network secret: {exc.strerror or type(exc).__name__}") from None
    except (ValueError, TypeError) as exc:
        raise ConfigError(path, None, f"cannot read network secret: {exc}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(path, None, "network secret is not a regular file")
        if _secret_mode_problem(st.st_mode):
            raise ConfigError(
                path,
                None,
                f"network secret is accessible by group or others (mode {stat.S_IMODE(st.st_mode):04o}); "
                f"run `chmod 600 {path}`",
            )
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(4097)
    except OSError as exc:
        raise ConfigError(path, None, f"cannot read network secret: {exc.strerror or type(exc).__name__}") from None
    finally:
        os.close(fd)
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        text = ""
    secret = decode_base64(text.strip(), NETWORK_SECRET_BYTES) if len(data) <= 4096 else None
    if secret is None:
        raise ConfigError(path, None, "network secret must hold the base64 of 32 bytes (and nothing else)")
    return secret


def write_network_secret(path: Path) -> bytes:
    """Create a new random network secret file (mode 0600) and return the secret.

    Refuses to overwrite an existing file. Raises ``ConfigError``."""
    path = Path(path)
    secret = os.urandom(NETWORK_SECRET_BYTES)
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ConfigError(path, None, f"cannot create network secret: {path.parent}: {reason}") from None
    try:
        files.write_secret(path, network_secret_text(secret), replace=False)
    except files.FileExists:
        raise ConfigError(path, None, "network secret already exists; refusing to overwrite it") from None
    except files.FileError as exc:
        raise ConfigError(path, None, f"cannot create network secret: {exc.reason}") from None
    return secret


def network_secret_text(secret: bytes) -> bytes:
    """The network secret file's content, as `read_network_secret` reads it."""
    return base64.b64encode(secret) + b"\n"
